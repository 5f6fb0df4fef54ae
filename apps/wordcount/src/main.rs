//! wordcount: many tasks cooperating through a shared heap.
//!
//! The app generates a corpus (`--words` words drawn, skewed, from a generated vocabulary of
//! `--vocab` words) and maps it into a read-only template. `--workers` tasks, each in its own
//! address space with the corpus and a shared heap attached, count the words of their slice of
//! the corpus into **one** `hashbrown` map whose table and keys live in the shared heap, guarded
//! by a `libos::sync::Mutex` (taken once per line, so the workers interleave). A checker task
//! then compares the map with a sequential count that the main task made from the generator
//! alone, and frees the map.
//!
//! ```console
//! $ cargo xtask run wordcount -- --workers 32 --words 200000
//! ```
//!
//! Exit codes: 0 the counts match; 1 a mismatch or a failed task; 2 bad arguments; 3 out of
//! memory.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use libos::println;
use libos::shared::{SharedAlloc, SharedHeap, SharedMap as Map, SharedVec};
use libos::space::{Kind, TemplateBuilder};
use libos::sync::Mutex;
use libos::task;
use libos::time::Instant;

libos::main!(main);

const CORPUS_VA: u64 = 0x1_0000_0000;
const HEAP_VA: u64 = 0x2_0000_0000;
const HEAP_LEN: u64 = 8 << 20;
const WORDS_PER_LINE: u64 = 12;
/// Most `--workers`: each is a task with its own stack and address space.
const MAX_WORKERS: u64 = 1024;
/// Most `--vocab`: every distinct word is a key in the 8 MiB shared heap (about 80 bytes with the
/// table), and the skewed picker multiplies two indices below it.
const MAX_VOCAB: u64 = 50_000;
/// Memory the app needs besides three copies of the corpus (the text, the sequential count's
/// keys, the corpus template): the shared heap, stacks, tables and a margin.
const OVERHEAD_MIB: u64 = 24;

/// The shared map: table and keys (words, in `SharedVec`s) in the shared heap. A key hashes like
/// its bytes, so a word is looked up as a `&[u8]` without copying it into the heap first.
type SharedMap = Map<SharedVec<u8>, u64>;

/// Everything the workers share, behind one lock.
struct Counts {
    map: SharedMap,
    /// Words counted so far, by every worker.
    total: u64,
    /// Lock acquisitions (one per line of every worker).
    batches: u64,
    /// The worker that took the lock last, and how often the lock changed hands between workers.
    last_worker: usize,
    handovers: u64,
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Word `v` of the vocabulary: syllables spelling `v + 1` in base 8.
fn vocab_word(v: u64, out: &mut String) {
    const SYL: [&str; 8] = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi"];
    let mut n = v + 1;
    while n > 0 {
        out.push_str(SYL[(n % 8) as usize]);
        n /= 8;
    }
}

/// The `j`-th word's vocabulary index: skewed towards small indices, like natural text.
fn pick(j: u64, vocab: u64) -> u64 {
    let a = mix(j) % vocab;
    let b = mix(j ^ 0xabcdef) % vocab;
    a * b / vocab
}

fn generate(words: u64, vocab: u64) -> String {
    let mut text = String::new();
    for j in 0..words {
        vocab_word(pick(j, vocab), &mut text);
        text.push(if (j + 1) % WORDS_PER_LINE == 0 {
            '\n'
        } else {
            ' '
        });
    }
    text
}

/// Splits the corpus into `n` slices that start and end at line boundaries.
fn slices(text: &str, n: usize) -> Vec<(u64, u64)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for w in 1..=n {
        let mut end = if w == n {
            bytes.len()
        } else {
            (bytes.len() * w / n).max(start)
        };
        while end < bytes.len() && bytes[end - 1] != b'\n' {
            end += 1;
        }
        out.push((start as u64, (end - start) as u64));
        start = end;
    }
    out
}

/// A worker: reads its slice of the corpus from its own address space, line by line, and adds
/// each line's words to the shared map under the lock.
fn worker(w: usize, start: u64, len: u64, counts: &Mutex<Counts>, alloc: &SharedAlloc) -> i32 {
    let mut buf = [0u8; 4096];
    let mut line: Vec<u8> = Vec::new();
    let mut done = 0;
    let mut lines = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        if task::read(CORPUS_VA + start + done, &mut buf[..n]).is_err() {
            return 10;
        }
        done += n as u64;
        for &b in &buf[..n] {
            line.push(b);
            if b == b'\n' {
                if add_line(w, &line, counts, alloc).is_err() {
                    return 11;
                }
                line.clear();
                lines += 1;
                if lines.is_multiple_of(4) {
                    task::yield_now(); // let the other workers in: they interleave on the lock
                }
            }
        }
    }
    if !line.is_empty() && add_line(w, &line, counts, alloc).is_err() {
        return 11;
    }
    0
}

fn add_line(w: usize, line: &[u8], counts: &Mutex<Counts>, alloc: &SharedAlloc) -> Result<(), ()> {
    let mut c = counts.lock();
    c.batches += 1;
    if c.last_worker != w {
        c.handovers += 1;
        c.last_worker = w;
    }
    for word in line.split(|b| b.is_ascii_whitespace()) {
        if word.is_empty() {
            continue;
        }
        c.total += 1;
        if let Some(n) = c.map.get_mut(word) {
            *n += 1;
        } else {
            let mut key = SharedVec::new_in(*alloc);
            key.try_reserve_exact(word.len()).map_err(|_| ())?;
            key.extend_from_slice(word);
            c.map.try_reserve(1).map_err(|_| ())?;
            c.map.insert(key, 1);
        }
    }
    Ok(())
}

struct Args {
    workers: usize,
    words: u64,
    vocab: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        workers: 8,
        words: 100_000,
        vocab: 2000,
    };
    let args = libos::args();
    let mut i = 0;
    while i < args.len() {
        let v: u64 = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{} needs a number", args[i]))?;
        match args[i].as_str() {
            "--workers" if v > MAX_WORKERS => {
                return Err(format!("--workers {v}: at most {MAX_WORKERS}"));
            }
            "--vocab" if v > MAX_VOCAB => {
                return Err(format!(
                    "--vocab {v}: at most {MAX_VOCAB} (the counts live in an {} MiB shared heap)",
                    HEAP_LEN >> 20
                ));
            }
            // At most MAX_WORKERS: fits usize.
            "--workers" => a.workers = v as usize,
            "--words" => a.words = v,
            "--vocab" => a.vocab = v,
            other => return Err(format!("unknown argument '{other}'")),
        }
        i += 2;
    }
    if a.workers == 0 || a.words == 0 || a.vocab == 0 {
        return Err(String::from(
            "--workers, --words and --vocab must be at least 1",
        ));
    }
    // The corpus must fit memory three times over (see OVERHEAD_MIB).
    let need_mib = corpus_bytes(a.words, a.vocab)
        .saturating_mul(3)
        .div_ceil(1 << 20)
        .saturating_add(OVERHEAD_MIB);
    let free_mib = ((libos::free_frames() as u64) * 4096) >> 20;
    if need_mib > free_mib {
        return Err(format!(
            "--words {}: the corpus needs about {need_mib} MiB of free memory and {free_mib} MiB \
             are free: pass fewer --words or boot with more --mem",
            a.words
        ));
    }
    Ok(a)
}

/// An upper bound on the corpus size: every word as long as the longest vocabulary word, plus
/// its separator.
fn corpus_bytes(words: u64, vocab: u64) -> u64 {
    let mut longest = String::new();
    vocab_word(vocab - 1, &mut longest);
    words.saturating_mul(longest.len() as u64 + 1)
}

fn main() -> i32 {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            println!("wordcount: {e}");
            println!("usage: wordcount [--workers N] [--words N] [--vocab N]");
            return 2;
        }
    };
    let text = generate(args.words, args.vocab);
    println!(
        "wordcount: corpus of {} words ({} KiB), vocabulary {}, {} workers, share={}",
        args.words,
        text.len() >> 10,
        args.vocab,
        args.workers,
        if libos::share_mode() { "on" } else { "off" }
    );

    // The sequential reference, from the generated text in the main task's (kernel) heap.
    let t0 = Instant::now();
    let mut expected: hashbrown::HashMap<String, u64> = hashbrown::HashMap::new();
    for word in text.split_ascii_whitespace() {
        *expected.entry_ref(word).or_insert(0) += 1;
    }
    let sequential = t0.elapsed();

    let corpus = match TemplateBuilder::new()
        .blob("corpus", CORPUS_VA, Kind::ReadOnly, text.as_bytes())
        .and_then(|b| b.seal())
    {
        Ok(t) => t,
        Err(e) => {
            println!("wordcount: cannot build the corpus template: {e}");
            return 3;
        }
    };
    let heap = match SharedHeap::new("counts", HEAP_VA, HEAP_LEN) {
        Ok(h) => h,
        Err(e) => {
            println!("wordcount: cannot create the shared heap: {e}");
            return 3;
        }
    };
    // An empty map allocates nothing, so the main task may create it; only tasks that attach the
    // heap may insert into it, read it or drop it.
    let counts = Arc::new(Mutex::new(Counts {
        map: SharedMap::new_in(heap.allocator()),
        total: 0,
        batches: 0,
        last_worker: usize::MAX,
        handovers: 0,
    }));

    let t0 = Instant::now();
    let mut handles = Vec::new();
    for (w, (start, len)) in slices(&text, args.workers).into_iter().enumerate() {
        let (counts, alloc) = (counts.clone(), heap.allocator());
        match task::spawn(&[&corpus, &heap.template()], move || {
            worker(w, start, len, &counts, &alloc)
        }) {
            Ok(h) => handles.push((w, h)),
            Err(e) => {
                println!("wordcount: FAIL cannot spawn worker {w}: {e}");
                return 1;
            }
        }
    }
    let mut failed = false;
    for (w, h) in handles {
        match h.join() {
            Ok(0) => {}
            Ok(code) => {
                println!("wordcount: FAIL worker {w} ended with {code}");
                failed = true;
            }
            Err(e) => {
                println!("wordcount: FAIL worker {w}: {e}");
                failed = true;
            }
        }
    }
    let parallel = t0.elapsed();
    if failed {
        return 1;
    }

    // Check in a task that attaches the heap; it also frees the map there (its keys live in the
    // shared heap, so dropping them must happen where the heap is mapped).
    let expected = Arc::new(expected);
    let (exp, report) = (expected.clone(), Arc::new(Mutex::new(String::new())));
    let rep = report.clone();
    let (c, workers) = (counts, args.workers);
    let checker = task::spawn(&[&heap.template()], move || {
        let Ok(lock) = Arc::try_unwrap(c) else {
            return 20;
        };
        let counts = lock.into_inner();
        let mut out = String::new();
        let mut bad = 0;
        for (k, &n) in counts.map.iter() {
            let word = core::str::from_utf8(k).unwrap_or("<not utf-8>");
            if exp.get(word) != Some(&n) {
                bad += 1;
                if bad <= 5 {
                    out.push_str(&format!(
                        "  '{word}': shared map {n}, sequential {:?}\n",
                        exp.get(word)
                    ));
                }
            }
        }
        let mut top: Vec<(&[u8], u64)> = counts.map.iter().map(|(k, &n)| (&k[..], n)).collect();
        top.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let top: Vec<String> = top
            .iter()
            .take(5)
            .map(|(k, n)| format!("{} {n}", core::str::from_utf8(k).unwrap_or("?")))
            .collect();
        out.push_str(&format!(
            "distinct={} total={} batches={} lock handovers between workers={} top: {}\n",
            counts.map.len(),
            counts.total,
            counts.batches,
            counts.handovers,
            top.join(", ")
        ));
        *rep.lock() = out;
        let ok = bad == 0
            && counts.map.len() == exp.len()
            && counts.total == exp.values().sum()
            && (workers < 2 || counts.handovers >= workers as u64);
        drop(counts); // frees the table and keys in the shared heap, from inside this task
        if ok { 0 } else { 21 }
    });
    let result = checker.map(|h| h.join());
    let report = report.lock().clone();
    libos::print!("{report}");
    let left = heap.stats();
    match result {
        Ok(Ok(0)) if left.allocation_count == 0 => {
            println!(
                "wordcount: {} workers counted {} words ({} distinct) in {} ms; the shared map \
                 matches the sequential count ({} ms)",
                args.workers,
                args.words,
                expected.len(),
                parallel.as_millis(),
                sequential.as_millis()
            );
            println!("wordcount: ALL OK");
            0
        }
        Ok(Ok(0)) => {
            println!(
                "wordcount: FAIL {} allocations left in the shared heap after the map was dropped",
                left.allocation_count
            );
            1
        }
        Ok(Ok(20)) => {
            println!("wordcount: FAIL the map is still referenced elsewhere");
            1
        }
        Ok(r) => {
            println!(
                "wordcount: FAIL the shared map does not match the sequential count, or the workers never interleaved ({r:?})"
            );
            1
        }
        Err(e) => {
            println!("wordcount: FAIL cannot spawn the checker: {e}");
            1
        }
    }
}
