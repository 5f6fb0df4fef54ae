//! forkserver: a zygote on libos.
//!
//! At boot the server
//!
//! 1. builds a large read-only **library** template: a generated, sorted dictionary of 32-byte
//!    records (`--lib-mib` MiB of raw bytes, filled page by page by a cheap generator) plus the
//!    app's own code and read-only data (`image_section`), mapped at 512 GiB;
//! 2. creates a **shared heap** for the replies (a reply board and counters);
//! 3. hands both templates to the **zygote** task, which warms its state as ordinary Rust data
//!    in its own heap — a parsed config struct, a `hashbrown::HashMap` index from key bucket to
//!    dictionary page, a scratch buffer — sets up the board in the shared heap, and seals it all
//!    in a [`libos::process::Zygote`] (the snapshot);
//!
//! and then serves a stream of requests — dictionary lookups, generated (`--requests N`) and/or
//! given as keys on the command line — each one in a fresh task spawned from the zygote with the
//! library and the shared heap attached. A request task uses the warm state in place (`&mut
//! State`, its own copy-on-write copy): it looks the key's bucket up in the index, reads the
//! dictionary page (or two) from the library, writes privately into its copy of the state (the
//! scratch buffer, a counter, a map entry: copy-on-write, never seen by the zygote), and reports
//! through the shared heap: its slot on the board (plain data) and the counters, under the
//! board's lock (a `Shared<Board>`, the one handle every request's state copy holds). After
//! each mode a checker task, spawned from the zygote the same way, verifies every reply against
//! the generator, that no private write reached the zygote's state, and that the library maps
//! the app's rodata.
//!
//! It prints each request's spawn latency (the zygote's `spawn` call, and spawn → the task's
//! first instruction) and per-mode totals. `--mode boot` (default) uses the boot's `share=`
//! option; `--mode share|copy|both` chooses explicitly.
//!
//! Without `--lib-mib` the library is 512 MiB if that fits the free memory, else the largest
//! power of two that does (128 MiB in the default 256 MiB guest), and a line says so. An explicit
//! `--lib-mib` that does not fit is refused before anything is built, naming the memory it needs
//! and the `--mem` to boot with.
//!
//! ```console
//! $ cargo xtask run forkserver                    # fits the default guest memory
//! $ cargo xtask run forkserver --release --mem 2G -- --lib-mib 512 --requests 200 --mode both
//! ```
//!
//! Exit codes: 0 all checked; 1 a check failed; 2 bad arguments; 3 not enough memory for the
//! templates or the warm state (the message says how much is needed); 4 a spawn failed.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;
use libos::println;
use libos::process::Zygote;
use libos::shared::{Shared, SharedAlloc, SharedHeap, SharedVec};
use libos::space::{ImageSection, Kind, Mode, Template, TemplateBuilder};
use libos::task::{self, Builder, TaskError};
use libos::time::Instant;

libos::main!(main);

/// The library template: the dictionary, then the app's code and rodata (a fresh L4 entry).
const LIB_VA: u64 = 0x80_0000_0000;
const TEXT_VA: u64 = LIB_VA + (16 << 30);
const RODATA_VA: u64 = LIB_VA + (17 << 30);
/// The shared heap: its own 1 GiB slot.
const HEAP_VA: u64 = 0x2_0000_0000;
const HEAP_LEN: u64 = 4 << 20;
/// Words of the scratch buffer each request overwrites (one page).
const SCRATCH_WORDS: usize = 512;

const PAGE: u64 = 4096;
const RECORD: u64 = 32;
const PER_PAGE: u64 = PAGE / RECORD;
/// Library size without `--lib-mib`, if it fits.
const DEFAULT_LIB_MIB: u64 = 512;
/// Largest `--lib-mib`: the dictionary's slot ends where the text mapping starts (16 GiB).
const MAX_LIB_MIB: u64 = (TEXT_VA - LIB_VA) >> 20;
/// Memory the server needs besides the library's pages, its page tables and the index: the
/// shared heap, task stacks, copy mode's table copies, kernel heap growth, and a margin.
const OVERHEAD_MIB: u64 = 24;
/// Most requests in all: the reply board in the shared heap holds this many replies.
const MAX_REQUESTS: u64 = 50_000;
/// A string the checker looks for in the library's rodata mapping.
static BANNER: &str = "forkserver: the library maps this app's rodata";

/// The config the server parses while warming up (a service would read a file).
const CONFIG: &str =
    "# forkserver config\nstride = 1000\nsalt = 0x9e3779b97f4a7c15\nbucket = 100000\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Config {
    records: u64,
    stride: u64,
    salt: u64,
    /// Width of an index bucket, in keys.
    bucket: u64,
}

fn parse_config(text: &str, records: u64) -> Result<Config, String> {
    let mut cfg = Config {
        records,
        stride: 0,
        salt: 0,
        bucket: 0,
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("config line {}: expected key = value", n + 1))?;
        let v = v.trim();
        let num = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        }
        .map_err(|_| format!("config line {}: bad number '{v}'", n + 1))?;
        match k.trim() {
            "stride" => cfg.stride = num,
            "salt" => cfg.salt = num,
            "bucket" => cfg.bucket = num,
            other => return Err(format!("config line {}: unknown key '{other}'", n + 1)),
        }
    }
    if cfg.stride < 2 {
        return Err(String::from("config: stride must be at least 2"));
    }
    if records.checked_mul(cfg.stride).is_none() {
        return Err(format!(
            "config: stride {} is too large for {records} records",
            cfg.stride
        ));
    }
    // A page's keys span at least (PER_PAGE - 1) strides: a bucket no wider than that meets at
    // most two pages, so a lookup reads at most two.
    let widest = (PER_PAGE - 1) * cfg.stride;
    if cfg.bucket == 0 || cfg.bucket > widest {
        return Err(format!(
            "config: bucket must be 1 ..= {widest} (127 strides), not {}",
            cfg.bucket
        ));
    }
    Ok(cfg)
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser: a cheap, well-spread generator.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Config {
    /// Key of record `i`: strictly increasing, not computable backwards without the table.
    fn key(&self, i: u64) -> u64 {
        i * self.stride + mix(i ^ self.salt) % self.stride
    }
    fn value(&self, i: u64) -> u64 {
        mix(i.wrapping_add(self.salt).rotate_left(17))
    }
    /// What the dictionary says about `key` (the reference answer, from the generator alone).
    fn expected(&self, key: u64) -> Option<u64> {
        let i = key / self.stride;
        (i < self.records && self.key(i) == key).then(|| self.value(i))
    }
    fn pages(&self) -> u64 {
        self.records / PER_PAGE
    }
    /// First key of dictionary page `p`.
    fn first_key(&self, p: u64) -> u64 {
        self.key(p * PER_PAGE)
    }
}

/// Fills one dictionary page: records `key, value, index, key ^ value`.
fn fill_page(cfg: &Config, off: u64, page: &mut [u8; 4096]) {
    let first = off / RECORD;
    for (j, rec) in page.chunks_exact_mut(RECORD as usize).enumerate() {
        let i = first + j as u64;
        let (k, v) = (cfg.key(i), cfg.value(i));
        rec[0..8].copy_from_slice(&k.to_le_bytes());
        rec[8..16].copy_from_slice(&v.to_le_bytes());
        rec[16..24].copy_from_slice(&i.to_le_bytes());
        rec[24..32].copy_from_slice(&(k ^ v).to_le_bytes());
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// One reply on the shared board: plain data, as everything in a shared heap must be. Request
/// `i` writes slot `i`.
#[derive(Debug, Default, Clone, Copy, zerocopy::IntoBytes, zerocopy::Immutable)]
#[repr(C)]
struct Reply {
    key: u64,
    /// The value found, if `found`.
    value: u64,
    /// TSC at the task's first instruction.
    first_tsc: u64,
    req: u32,
    /// The slot has been written.
    done: bool,
    found: bool,
    /// The task's private writes to its copy of the state read back correctly.
    private_ok: bool,
    /// Dictionary pages the lookup read.
    pages: u8,
}

impl Reply {
    fn value(&self) -> Option<u64> {
        self.found.then_some(self.value)
    }
}

libos::share_safe! {
    /// The board in the shared heap, one `Shared<Board>` (the value with its lock): every
    /// request task's copy of the state holds the same handle, so all of them reach the same
    /// slots. A request writes its own slot and bumps the counters under the lock.
    struct Board {
        replies: SharedVec<Reply>,
        hits: u64,
        misses: u64,
        pages_read: u64,
    }
}

/// The zygote's warm state: ordinary Rust data in its heap, used in place by every request
/// task (each one's own copy-on-write copy).
struct State {
    cfg: Config,
    /// Key bucket (`key / cfg.bucket`) → the dictionary page holding the bucket's first key.
    index: HashMap<u32, u32>,
    /// Written by every request task, in its own copy only.
    scratch: Vec<u64>,
    /// Requests this copy served (0 in the zygote, 1 in a request task).
    served: u64,
    /// Keys this copy looked up, with the request number (empty in the zygote).
    recent: HashMap<u64, u32>,
    board: Shared<Board>,
}

/// Warms the state: the index over every page of the dictionary, the scratch buffer, and the
/// board in the shared heap (this task attaches it). `Err`: what ran out.
fn warm(cfg: Config, requests: usize, alloc: SharedAlloc) -> Result<State, String> {
    let pages = cfg.pages();
    let last_key = cfg.key(cfg.records - 1);
    let buckets = last_key / cfg.bucket + 1;
    let too_big = || format!("{buckets} index buckets over {pages} pages do not fit in u32");
    let n = usize::try_from(buckets).map_err(|_| too_big())?;
    let mut index = HashMap::new();
    index
        .try_reserve(n)
        .map_err(|_| format!("no memory for an index of {buckets} buckets"))?;
    for p in 0..pages {
        // The buckets whose first key falls in page p (from bucket 0 for the first page).
        let lo = if p == 0 {
            0
        } else {
            cfg.first_key(p).div_ceil(cfg.bucket)
        };
        let hi = if p + 1 < pages {
            (cfg.first_key(p + 1) - 1) / cfg.bucket
        } else {
            last_key / cfg.bucket
        };
        let page = u32::try_from(p).map_err(|_| too_big())?;
        for b in lo..=hi {
            index.insert(u32::try_from(b).map_err(|_| too_big())?, page);
        }
    }
    let mut replies = SharedVec::new_in(alloc);
    let board_full = |what: &str| {
        format!(
            "the {} MiB shared heap has no room for {what}",
            HEAP_LEN >> 20
        )
    };
    replies
        .try_reserve_exact(requests)
        .map_err(|_| board_full("the reply board"))?;
    for _ in 0..requests {
        replies.push(Reply::default()); // within the capacity reserved: no allocation
    }
    let board = Board {
        replies,
        hits: 0,
        misses: 0,
        pages_read: 0,
    };
    let board = Shared::new_in(board, alloc).map_err(|_| board_full("the board"))?;
    Ok(State {
        cfg,
        index,
        scratch: alloc::vec![0; SCRATCH_WORDS],
        served: 0,
        recent: HashMap::new(),
        board,
    })
}

/// Looks `key` up in the dictionary through the index: the value if present, and the pages read.
/// `Err`: the library could not be read (an exit code).
fn lookup(s: &State, key: u64) -> Result<(Option<u64>, u8), i32> {
    let cfg = &s.cfg;
    let Some(&first) = u32::try_from(key / cfg.bucket)
        .ok()
        .and_then(|b| s.index.get(&b))
    else {
        return Ok((None, 0)); // past the last bucket: no page to read
    };
    let mut page = [0u8; PAGE as usize];
    let mut pages = 0u8;
    let mut p = u64::from(first);
    while p < cfg.pages() {
        if task::read(LIB_VA + p * PAGE, &mut page).is_err() {
            return Err(12);
        }
        pages = pages.saturating_add(1);
        let mut last = 0;
        for rec in page.chunks_exact(RECORD as usize) {
            let (k, v, check) = (u64_at(rec, 0), u64_at(rec, 8), u64_at(rec, 24));
            if k == key {
                if check != k ^ v {
                    return Err(13);
                }
                return Ok((Some(v), pages));
            }
            last = k;
        }
        if key < last {
            break; // within this page's keys, and not one of them
        }
        p += 1; // past this page's last key: the bucket goes on in the next page
    }
    Ok((None, pages))
}

/// The request handler: runs in a task spawned from the zygote, on its own copy of the state.
fn handle(s: &mut State, req: u32, key: u64, first_tsc: u64) -> i32 {
    let (value, pages) = match lookup(s, key) {
        Ok(r) => r,
        Err(code) => return code,
    };
    // Private writes to this task's copy of the warm state (copy-on-write pages of its heap).
    let stamp = (u64::from(req) << 32) | 0xabcd;
    s.scratch.fill(stamp);
    s.served += 1;
    s.recent.insert(key, req);
    let private_ok =
        s.scratch.iter().all(|&w| w == stamp) && s.served == 1 && s.recent.get(&key) == Some(&req);
    // Report through the shared heap: this request's slot and the counters.
    let reply = Reply {
        key,
        value: value.unwrap_or(0),
        first_tsc,
        req,
        done: true,
        found: value.is_some(),
        private_ok,
        pages,
    };
    let reported = s.board.with(|b| {
        if b.replies.replace(req as usize, reply).is_err() {
            return 14;
        }
        if value.is_some() {
            b.hits += 1;
        } else {
            b.misses += 1;
        }
        b.pages_read += u64::from(pages);
        0
    });
    reported.unwrap_or(15)
}

/// The checker: runs in a task spawned from the zygote after a mode's requests. Returns 0 or the
/// code of the first check that failed.
fn check(s: &mut State, expected: &[Option<u64>]) -> i32 {
    // No private write reached the zygote: this copy of its state is as warmed.
    if s.served != 0 || !s.recent.is_empty() || s.scratch.iter().any(|&w| w != 0) {
        return 20;
    }
    // The library maps the app's rodata.
    let mut page = [0u8; PAGE as usize];
    let mut va = RODATA_VA;
    let mut seen = false;
    while !seen && task::read(va, &mut page).is_ok() {
        seen = page.windows(BANNER.len()).any(|w| w == BANNER.as_bytes());
        va += PAGE - BANNER.len() as u64; // overlap so a string across pages is found
    }
    if !seen {
        return 21;
    }
    s.board
        .with(|b| {
            if b.replies.len() != expected.len() {
                return 23;
            }
            let (mut hits, mut pages) = (0, 0);
            let bad = b.replies.with(|replies| {
                for (i, r) in replies.iter().enumerate() {
                    if !r.done {
                        return 23;
                    }
                    if r.req as usize != i || r.value() != expected[i] || !r.private_ok {
                        return 24;
                    }
                    hits += u64::from(r.found);
                    pages += u64::from(r.pages);
                }
                0
            });
            if bad != 0 {
                return bad;
            }
            if b.hits != hits || b.misses != expected.len() as u64 - hits {
                return 26;
            }
            if b.pages_read != pages {
                return 27;
            }
            0
        })
        .unwrap_or(22)
}

struct Args {
    /// `None`: size it from free memory.
    lib_mib: Option<u64>,
    requests: u64,
    modes: Vec<Mode>,
    keys: Vec<u64>,
    quiet: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        lib_mib: None,
        requests: 100,
        modes: alloc::vec![libos::space::mode()],
        keys: Vec::new(),
        quiet: false,
    };
    let args = libos::args();
    let mut i = 0;
    let num = |i: usize, what: &str| -> Result<u64, String> {
        args.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{what} needs a number"))
    };
    while i < args.len() {
        match args[i].as_str() {
            "--lib-mib" => {
                a.lib_mib = Some(num(i + 1, "--lib-mib")?);
                i += 1;
            }
            "--requests" => {
                a.requests = num(i + 1, "--requests")?;
                i += 1;
            }
            "--mode" => {
                a.modes = match args.get(i + 1).map(String::as_str) {
                    Some("share") => alloc::vec![Mode::Share],
                    Some("copy") => alloc::vec![Mode::Copy],
                    Some("both") => alloc::vec![Mode::Share, Mode::Copy],
                    Some("boot") => alloc::vec![libos::space::mode()],
                    _ => return Err(String::from("--mode takes share, copy, both or boot")),
                };
                i += 1;
            }
            "--quiet" => a.quiet = true,
            k => a.keys.push(
                k.parse()
                    .map_err(|_| format!("unknown argument '{k}' (a request is a numeric key)"))?,
            ),
        }
        i += 1;
    }
    match a.lib_mib {
        Some(0) => return Err(String::from("--lib-mib must be at least 1")),
        Some(n) if n > MAX_LIB_MIB => {
            return Err(format!(
                "--lib-mib {n}: at most {MAX_LIB_MIB} (the library's slot is 16 GiB)"
            ));
        }
        _ => {}
    }
    let total = a.requests.saturating_add(a.keys.len() as u64);
    if total > MAX_REQUESTS {
        return Err(format!(
            "{total} requests: at most {MAX_REQUESTS} in all (the reply board in the {} MiB \
             shared heap holds that many)",
            HEAP_LEN >> 20
        ));
    }
    Ok(a)
}

/// Free memory a library of `lib_mib` MiB needs: its pages, its page tables and the
/// index (4 KiB per MiB, counted twice for a margin), and [`OVERHEAD_MIB`].
fn needed_mib(lib_mib: u64) -> u64 {
    lib_mib + lib_mib.div_ceil(128) + OVERHEAD_MIB
}

/// A QEMU `-m` size that leaves `need_mib` free: the next power of two above it and what the
/// kernel keeps, as `512M` or `2G`.
fn mem_hint(need_mib: u64) -> String {
    let mib = (need_mib + 8).next_power_of_two();
    if mib >= 1024 {
        format!("{}G", mib / 1024)
    } else {
        format!("{mib}M")
    }
}

/// The library size: the one asked for if it fits `free_mib`, else without `--lib-mib` the
/// largest power of two up to [`DEFAULT_LIB_MIB`] that fits. `Err`: the message to print.
fn library_size(asked: Option<u64>, free_mib: u64) -> Result<u64, String> {
    if let Some(lib) = asked {
        let need = needed_mib(lib);
        if need > free_mib {
            let mem = mem_hint(need);
            return Err(format!(
                "a {lib} MiB library needs about {need} MiB of free memory and {free_mib} MiB \
                 are free: boot with --mem {mem} (cargo xtask run forkserver --mem {mem} -- \
                 --lib-mib {lib}), or pass a smaller --lib-mib"
            ));
        }
        return Ok(lib);
    }
    let mut lib = DEFAULT_LIB_MIB;
    while lib > 1 && needed_mib(lib) > free_mib {
        lib /= 2;
    }
    if needed_mib(lib) > free_mib {
        return Err(format!(
            "even a 1 MiB library needs about {} MiB of free memory and {free_mib} MiB are \
             free: boot with --mem {}",
            needed_mib(1),
            mem_hint(needed_mib(1))
        ));
    }
    let mut line =
        format!("forkserver: no --lib-mib given: a {lib} MiB library fits the {free_mib} MiB free");
    if lib < DEFAULT_LIB_MIB {
        line.push_str(&format!(
            " ({DEFAULT_LIB_MIB} MiB needs --mem {})",
            mem_hint(needed_mib(DEFAULT_LIB_MIB))
        ));
    }
    println!("{line}");
    Ok(lib)
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Share => "share",
        Mode::Copy => "copy",
    }
}

fn us(ns: u64) -> String {
    format!("{}.{:01}", ns / 1000, (ns % 1000) / 100)
}

fn pct(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        0
    } else {
        sorted[(sorted.len() - 1) * p / 100]
    }
}

fn main() -> i32 {
    let free_mib = ((libos::free_frames() as u64) * PAGE) >> 20;
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            println!("forkserver: {e}");
            println!(
                "usage: forkserver [--lib-mib N] [--requests N] [--mode boot|share|copy|both] \
                 [--quiet] [KEY...]"
            );
            return 2;
        }
    };
    let lib_mib = match library_size(args.lib_mib, free_mib) {
        Ok(n) => n,
        Err(e) => {
            println!("forkserver: {e}");
            return 3;
        }
    };
    let boot_mode = mode_name(libos::space::mode());
    println!(
        "forkserver: mode {} (boot share={}), library {} MiB, {} generated + {} given requests",
        args.modes
            .iter()
            .map(|&m| mode_name(m))
            .collect::<Vec<_>>()
            .join(" then "),
        if boot_mode == "share" { "on" } else { "off" },
        lib_mib,
        args.requests,
        args.keys.len()
    );

    // 1. Parse the config (the zygote keeps it in its warm state).
    let records = (lib_mib << 20) / RECORD;
    let cfg = match parse_config(CONFIG, records) {
        Ok(c) => c,
        Err(e) => {
            println!("forkserver: FAIL {e}");
            return 1;
        }
    };

    // 2. The library template: the dictionary, the app's code and rodata.
    let t0 = Instant::now();
    let library = match TemplateBuilder::new()
        .region(
            "dictionary",
            LIB_VA,
            lib_mib << 20,
            Kind::ReadOnly,
            |off, page| fill_page(&cfg, off, page),
        )
        .and_then(|b| b.image_section("text", TEXT_VA, ImageSection::Text))
        .and_then(|b| b.image_section("rodata", RODATA_VA, ImageSection::Rodata))
        .and_then(|b| b.seal())
    {
        Ok(t) => t,
        Err(e) => {
            println!(
                "forkserver: cannot build a {lib_mib} MiB library template: {e} (give QEMU more \
                 memory: --mem {})",
                mem_hint(needed_mib(lib_mib) * 2)
            );
            return 3;
        }
    };
    println!(
        "forkserver: library {} MiB ({} records) + text + rodata built in {} ms",
        lib_mib,
        records,
        t0.elapsed().as_millis()
    );

    // 3. The shared heap, for the replies.
    let heap = match SharedHeap::new("board", HEAP_VA, HEAP_LEN) {
        Ok(h) => h,
        Err(e) => {
            println!("forkserver: cannot create the shared heap: {e}");
            return 3;
        }
    };

    // The requests: the given keys, then generated ones (3 hits : 1 miss).
    let mut keys = args.keys.clone();
    for r in 0..args.requests {
        let i = mix(r ^ 0x5eed) % cfg.records;
        keys.push(if r % 4 == 3 {
            cfg.key(i) + 1 // between two keys (or past the end): a miss
        } else {
            cfg.key(i)
        });
    }

    // 4. The zygote: a task that attaches the library and the shared heap (the main task does
    // not), given the templates so it can attach them to every task it spawns.
    let heap_t = heap.template();
    let (alloc, modes, quiet) = (heap.allocator(), args.modes, args.quiet);
    let zygote = task::spawn_with(
        &[&library, &heap_t],
        (library.clone(), heap_t.clone()),
        move |(library, heap_t)| {
            zygote_main(&[&library, &heap_t], cfg, alloc, &keys, &modes, quiet)
        },
    );
    let mut failed = match zygote.map(|h| h.join()) {
        Ok(Ok(0)) => false,
        Ok(Ok(code @ (3 | 4))) => return code,
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            println!("forkserver: FAIL the zygote: {e}");
            true
        }
        Err(e) => {
            println!("forkserver: FAIL cannot spawn the zygote: {e}");
            return 4;
        }
    };
    // The zygote took the board out of the heap and dropped it, where the heap is mapped.
    let left = heap.stats();
    if left.allocation_count != 0 {
        println!(
            "forkserver: FAIL {} allocations left in the shared heap",
            left.allocation_count
        );
        failed = true;
    }
    if failed {
        println!("forkserver: FAIL");
        1
    } else {
        println!("forkserver: ALL OK");
        0
    }
}

/// The zygote task: warms the state, seals it, serves every mode. Returns the app's exit code.
fn zygote_main(
    templates: &[&Template],
    cfg: Config,
    alloc: SharedAlloc,
    keys: &[u64],
    modes: &[Mode],
    quiet: bool,
) -> i32 {
    let t0 = Instant::now();
    let state = match warm(cfg, keys.len(), alloc) {
        Ok(s) => s,
        Err(e) => {
            println!("forkserver: cannot warm the state: {e}");
            return 3;
        }
    };
    let buckets = state.index.len();
    let mut zygote = Zygote::new(state);
    let heap = libos::process::heap_stats();
    println!(
        "forkserver: snapshot: config + index of {buckets} buckets over {} pages + board of {} \
         slots warmed in {} ms ({} KiB of the zygote's heap in use), sealed in a zygote",
        cfg.pages(),
        keys.len(),
        t0.elapsed().as_millis(),
        heap.allocated_bytes >> 10,
    );
    let mut failed = false;
    for &mode in modes {
        match serve(&mut zygote, mode, templates, keys, quiet) {
            Ok(()) => {}
            Err(4) => return 4,
            Err(_) => failed = true,
        }
    }
    // The zygote's own copy was never written by a request either.
    let s = zygote.state();
    if s.served != 0 || !s.recent.is_empty() || s.scratch.iter().any(|&w| w != 0) {
        println!("forkserver: FAIL a private write reached the zygote's own state");
        failed = true;
    }
    // The board is taken out of the shared heap (mapped here) and dropped: its vector goes
    // back to the heap.
    let board = zygote.into_inner().board;
    if let Err(e) = board.take().map(drop) {
        println!("forkserver: FAIL cannot take the board back: {e}");
        failed = true;
    }
    i32::from(failed)
}

/// Serves every request in one mode, then checks the replies. `Err(4)`: a spawn failed.
fn serve(
    zygote: &mut Zygote<State>,
    mode: Mode,
    templates: &[&Template],
    keys: &[u64],
    quiet: bool,
) -> Result<(), i32> {
    let name = mode_name(mode);
    let builder = Builder::new().mode(mode);
    // A clean board (in the shared heap: the zygote's own memory does not change).
    let cleared = zygote.state().board.with(|b| {
        b.replies.with_mut(|r| r.fill(Reply::default()));
        b.hits = 0;
        b.misses = 0;
        b.pages_read = 0;
    });
    match cleared {
        Ok(()) => {}
        Err(e) => {
            println!("forkserver: FAIL {name}: the board: {e}");
            return Err(1);
        }
    }
    let cfg = zygote.state().cfg;

    libos::task::trim_caches();
    let free_before = libos::free_frames();
    let mut spawn_ns = Vec::with_capacity(keys.len());
    let mut first_ns = Vec::with_capacity(keys.len());
    let mut starts = Vec::with_capacity(keys.len());
    let wall = Instant::now();
    for (req, &key) in keys.iter().enumerate() {
        let Ok(req32) = u32::try_from(req) else {
            println!("forkserver: FAIL {name}: request {req}: too many requests");
            return Err(1);
        };
        let t0 = Instant::now();
        let h = zygote.spawn_with_builder(builder, templates, move |s| {
            let first = Instant::now().cycles();
            handle(s, req32, key, first)
        });
        let spawned = t0.elapsed();
        let h = match h {
            Ok(h) => h,
            Err(e) => {
                println!("forkserver: FAIL {name}: request {req}: cannot spawn: {e}");
                return Err(4);
            }
        };
        match h.join() {
            Ok(0) => {}
            Ok(code) => {
                println!("forkserver: FAIL {name}: request {req} ended with {code}");
                return Err(1);
            }
            Err(e) => {
                println!("forkserver: FAIL {name}: request {req}: {e}");
                return Err(1);
            }
        }
        spawn_ns.push(spawned.as_nanos() as u64);
        starts.push(t0.cycles());
    }
    let wall = wall.elapsed();
    libos::task::trim_caches();
    let free_after = libos::free_frames();

    // Check the replies in a task spawned from the zygote like the requests.
    let expected: Vec<Option<u64>> = keys.iter().map(|&k| cfg.expected(k)).collect();
    let checker = zygote.spawn_with_builder(builder, templates, move |s| check(s, &expected));
    let code = match checker.map(|h| h.join()) {
        Ok(r) => r,
        Err(e) => {
            println!("forkserver: FAIL {name}: cannot spawn the checker: {e}");
            return Err(4);
        }
    };
    // The board, read here (this task attaches the heap).
    let mut hits = 0;
    // Copied out of the shared heap (under the board's lock) into this task's memory.
    let replies = match zygote.state().board.with(|b| {
        let mut v = Vec::with_capacity(b.replies.len());
        b.replies.with(|r| v.extend_from_slice(r));
        v
    }) {
        Ok(v) => v,
        Err(e) => {
            println!("forkserver: FAIL {name}: the board: {e}");
            return Err(1);
        }
    };
    for (i, r) in replies.iter().enumerate() {
        let first = r
            .first_tsc
            .saturating_sub(starts.get(i).copied().unwrap_or(0));
        let first = libos::time::cycles_to_duration(first).as_nanos() as u64;
        first_ns.push(first);
        hits += u64::from(r.found);
        if !quiet {
            let v = match r.value() {
                Some(v) => format!("hit {v:#018x}"),
                None => String::from("miss"),
            };
            println!(
                "{name} req {:4} key {:>14} {v:<22} spawn {:>8} us  first instr {:>8} us",
                r.req,
                r.key,
                us(spawn_ns.get(i).copied().unwrap_or(0)),
                us(first)
            );
        }
    }
    if code != Ok(0) {
        let why = match &code {
            Ok(20) => String::from("a private write reached the zygote's state"),
            Ok(21) => String::from("the library does not map the app's rodata"),
            Ok(22) => String::from("the checker cannot lock the board"),
            Ok(23) => String::from("replies missing from the board"),
            Ok(24) => String::from("a reply differs from the sequential reference"),
            Ok(26) | Ok(27) => String::from("the shared counters do not add up"),
            Ok(c) => format!("checker ended with {c}"),
            Err(TaskError::Fault { cause, .. }) => format!("checker faulted: {cause}"),
            Err(e) => format!("checker: {e}"),
        };
        println!("forkserver: FAIL {name}: {why}");
        return Err(1);
    }
    spawn_ns.sort_unstable();
    first_ns.sort_unstable();
    let mean = |v: &[u64]| v.iter().sum::<u64>() / (v.len().max(1) as u64);
    println!(
        "{name}: {} requests checked ({} hits, {} misses) in {} ms ({} req/s); spawn p50 {} us \
         p99 {} us mean {} us; spawn->first instr p50 {} us p99 {} us; frames in use after: {:+}",
        keys.len(),
        hits,
        keys.len() as u64 - hits,
        wall.as_millis(),
        (keys.len() as u128 * 1_000_000_000)
            .checked_div(wall.as_nanos())
            .unwrap_or(0),
        us(pct(&spawn_ns, 50)),
        us(pct(&spawn_ns, 99)),
        us(mean(&spawn_ns)),
        us(pct(&first_ns, 50)),
        us(pct(&first_ns, 99)),
        free_before as i64 - free_after as i64,
    );
    Ok(())
}
