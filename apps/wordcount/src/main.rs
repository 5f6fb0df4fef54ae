//! wordcount: many tasks cooperating through a shared heap, on purpose.
//!
//! The app generates a corpus (`--words` words drawn, skewed, from a generated vocabulary of
//! `--vocab` words) and maps it into a read-only template, makes a shared heap, and counts the
//! corpus sequentially in its own heap (the reference). Its tasks are processes (each one's
//! heap and statics are its own copy), so what the workers share lives in the shared heap:
//!
//! 1. a **coordinator** task, given the corpus and heap templates, creates the shared board
//!    there: one `hashbrown` map (`SharedMap`) whose table and keys are in the heap too, and the
//!    counters, moved into the heap as one `Shared<Board>` — the value with its lock;
//! 2. it spawns `--workers` tasks, each in its own address space with the corpus and the heap
//!    attached; a worker's closure captures the `Shared<Board>` (plain data: which heap, which
//!    value), so every worker reaches the same map. A worker counts its slice of the corpus into
//!    the map under the board's lock (taken once per line, so the workers interleave);
//! 3. it then takes the board out of the heap, compares the map with the sequential count
//!    (forked into it with the rest of the main task's memory), prints the result and drops the
//!    map (its table and keys go back to the heap); the main task checks that no allocation is
//!    left there.
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
use alloc::vec::Vec;

use libos::println;
use libos::shared::{Shared, SharedAlloc, SharedHeap, SharedMap as Map, SharedVec};
use libos::space::{Kind, Template, TemplateBuilder};
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

libos::share_safe! {
    /// What the workers share, moved into the shared heap as one `Shared<Board>`: the map and
    /// the counters, behind the board's one lock.
    struct Board {
        map: SharedMap,
        /// Words counted so far, by every worker.
        total: u64,
        /// Lock acquisitions (one per line of every worker).
        batches: u64,
        /// The worker that took the lock last, and how often the lock changed hands between
        /// workers.
        last_worker: u64,
        handovers: u64,
    }
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
fn worker(w: usize, start: u64, len: u64, board: Shared<Board>, alloc: SharedAlloc) -> i32 {
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
                if add_line(w, &line, board, alloc).is_err() {
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
    if !line.is_empty() && add_line(w, &line, board, alloc).is_err() {
        return 11;
    }
    0
}

fn add_line(w: usize, line: &[u8], board: Shared<Board>, alloc: SharedAlloc) -> Result<(), ()> {
    board
        .with(|b| count_line(w, line, b, alloc))
        .map_err(|_| ())?
}

/// Counts `line` into the board (its lock held).
fn count_line(w: usize, line: &[u8], b: &mut Board, alloc: SharedAlloc) -> Result<(), ()> {
    b.batches += 1;
    if b.last_worker != w as u64 {
        b.last_worker = w as u64;
        b.handovers += 1;
    }
    for word in line.split(|b| b.is_ascii_whitespace()) {
        if word.is_empty() {
            continue;
        }
        b.total += 1;
        if b.map.update(word, |n| *n += 1).is_none() {
            let mut key = SharedVec::new_in(alloc);
            key.try_reserve_exact(word.len()).map_err(|_| ())?;
            key.extend_from_slice(word);
            b.map.try_reserve(1).map_err(|_| ())?;
            b.map.insert(key, 1);
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

    // The sequential reference, from the generated text in the main task's own heap.
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
    let heap_t = heap.template();
    let (alloc, workers) = (heap.allocator(), args.workers);
    let parts = slices(&text, workers);
    drop(text); // the corpus template has its own copy; the coordinator needs only the slices
    // The coordinator attaches the heap (the main task does not) and is given the templates, so
    // it can attach them to the workers it spawns.
    let coordinator = task::spawn_with(
        &[&corpus, &heap_t],
        (corpus.clone(), heap_t.clone()),
        move |(corpus, heap_t)| coordinate(&corpus, &heap_t, alloc, &parts, &expected, sequential),
    );
    let result = match coordinator.map(|h| h.join()) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            println!("wordcount: FAIL the coordinator: {e}");
            1
        }
        Err(e) => {
            println!("wordcount: FAIL cannot spawn the coordinator: {e}");
            1
        }
    };
    let left = heap.stats();
    if result != 0 {
        return result;
    }
    if left.allocation_count != 0 {
        println!(
            "wordcount: FAIL {} allocations left in the shared heap after the map was dropped",
            left.allocation_count
        );
        return 1;
    }
    println!("wordcount: ALL OK");
    0
}

/// The coordinator (runs in a task that attaches the heap): makes the board, runs the workers,
/// checks the map against `expected` (counted in `sequential`), prints the result and frees
/// the map. Returns the app's exit code.
fn coordinate(
    corpus: &Template,
    heap_t: &Template,
    alloc: SharedAlloc,
    parts: &[(u64, u64)],
    expected: &hashbrown::HashMap<String, u64>,
    sequential: core::time::Duration,
) -> i32 {
    let board = Board {
        map: SharedMap::new_in(alloc),
        total: 0,
        batches: 0,
        last_worker: u64::MAX,
        handovers: 0,
    };
    let Ok(board) = Shared::new_in(board, alloc) else {
        println!("wordcount: FAIL the shared heap has no room for the board");
        return 3;
    };

    let t0 = Instant::now();
    let mut handles = Vec::new();
    let mut failed = false;
    for (w, &(start, len)) in parts.iter().enumerate() {
        match task::spawn(&[corpus, heap_t], move || {
            worker(w, start, len, board, alloc)
        }) {
            Ok(h) => handles.push((w, h)),
            Err(e) => {
                println!("wordcount: FAIL cannot spawn worker {w}: {e}");
                failed = true;
                break;
            }
        }
    }
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

    // Every worker has ended: the board is taken out of the heap into this task (which maps
    // the heap); dropping it here frees the table, the keys and its block in the shared heap.
    let board = match board.take() {
        Ok(b) => b,
        Err(e) => {
            println!("wordcount: FAIL cannot take the board back: {e}");
            return 1;
        }
    };
    if failed {
        return 1;
    }
    let map = &board.map;
    // The words, copied out of the shared heap into this task's own memory.
    let mut counted: Vec<(String, u64)> = Vec::with_capacity(map.len());
    map.for_each(|k, &n| {
        let word = k.with(|b| String::from(core::str::from_utf8(b).unwrap_or("<not utf-8>")));
        counted.push((word, n));
    });
    let mut bad = 0;
    for (word, n) in &counted {
        if expected.get(word) != Some(n) {
            bad += 1;
            if bad <= 5 {
                println!(
                    "  '{word}': shared map {n}, sequential {:?}",
                    expected.get(word)
                );
            }
        }
    }
    counted.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let top: Vec<String> = counted
        .iter()
        .take(5)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let (total, handovers) = (board.total, board.handovers);
    println!(
        "distinct={} total={total} batches={} lock handovers between workers={handovers} top: {}",
        map.len(),
        board.batches,
        top.join(", ")
    );
    let workers = parts.len() as u64;
    let ok = bad == 0
        && map.len() == expected.len()
        && total == expected.values().sum::<u64>()
        && (workers < 2 || handovers >= workers);
    drop(top);
    drop(board);
    if ok {
        println!(
            "wordcount: {workers} workers counted {total} words ({} distinct) in {} ms; the \
             shared map matches the sequential count ({} ms)",
            expected.len(),
            parallel.as_millis(),
            sequential.as_millis()
        );
        0
    } else {
        println!(
            "wordcount: FAIL the shared map does not match the sequential count, or the workers \
             never interleaved"
        );
        1
    }
}
