//! forkserver: a zygote on libos.
//!
//! At boot the server
//!
//! 1. builds a large read-only **library** template: a generated, sorted dictionary of 32-byte
//!    records (`--lib-mib` MiB, filled page by page by a cheap generator) plus the app's own code
//!    and read-only data (`image_section`), mapped at 512 GiB;
//! 2. creates a **shared heap** (a reply board and counters, written by every request task);
//! 3. warms a **private** state of its own: parses a small config and builds a sparse index of
//!    the dictionary (the first key of every page) in memory mapped with `map_private`;
//! 4. **snapshots** that state into a template;
//!
//! and then serves a stream of requests — dictionary lookups, generated (`--requests N`) and/or
//! given as keys on the command line — each one in a fresh task spawned from
//! `[snapshot, library, shared heap]`. A request task binary-searches the index in its own copy
//! of the snapshot, reads one dictionary page from the library, writes privately (copy-on-write)
//! into its snapshot copy, and reports through the shared heap. After each mode a checker task
//! verifies every reply against the generator, that no private write leaked into the snapshot,
//! and that the library maps the app's rodata.
//!
//! It prints each request's spawn latency (the parent's `spawn` call, and spawn → the task's
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
//! templates (the message says how much is needed); 4 a spawn failed.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use libos::println;
use libos::shared::{SharedBox, SharedHeap, SharedVec};
use libos::space::{ImageSection, Kind, Mode, Template, TemplateBuilder};
use libos::sync::Mutex;
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
/// The warmed private state (snapshotted): header page, scratch page, then the index.
const STATE_VA: u64 = 0x4000_0000;
const HEADER_OFF: u64 = 0;
const SCRATCH_OFF: u64 = 4096;
const INDEX_OFF: u64 = 8192;

const PAGE: u64 = 4096;
const RECORD: u64 = 32;
const PER_PAGE: u64 = PAGE / RECORD;
const MAGIC: u64 = 0x5354_454e_4349_4c21; // "STENCIL!"
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
const CONFIG: &str = "# forkserver config\nstride = 1000\nsalt = 0x9e3779b97f4a7c15\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Config {
    records: u64,
    stride: u64,
    salt: u64,
}

fn parse_config(text: &str, records: u64) -> Result<Config, String> {
    let mut cfg = Config {
        records,
        stride: 0,
        salt: 0,
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
            other => return Err(format!("config line {}: unknown key '{other}'", n + 1)),
        }
    }
    if cfg.stride < 2 {
        return Err(String::from("config: stride must be at least 2"));
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

fn read_u64(va: u64) -> Result<u64, libos::space::Fault> {
    let mut b = [0u8; 8];
    task::read(va, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// One reply on the shared board (and, to main, through a channel): plain data, as everything
/// in a shared heap or a channel must be.
#[derive(Debug, Clone, Copy, zerocopy::IntoBytes, zerocopy::Immutable)]
#[repr(C)]
struct Reply {
    key: u64,
    /// The value found, if `found`.
    value: u64,
    /// TSC at the task's first instruction (to main: cycles from its spawn).
    first_tsc: u64,
    req: u32,
    found: bool,
    /// The task's private write to its snapshot copy read back correctly.
    private_ok: bool,
    _reserved: [u8; 2],
}

impl Reply {
    fn value(&self) -> Option<u64> {
        self.found.then_some(self.value)
    }
}

#[derive(Debug, Default, zerocopy::IntoBytes, zerocopy::Immutable)]
#[repr(C)]
struct Counters {
    hits: u64,
    misses: u64,
    pages_read: u64,
}

/// The board lives in the shared heap: only tasks that attach the heap's template can touch it,
/// so a setup task creates it.
struct Board {
    replies: SharedVec<Reply>,
    counters: SharedBox<Counters>,
}

type BoardCell = Arc<Mutex<Option<Board>>>;

/// The request handler: runs in a task spawned from the snapshot.
fn handle(req: u32, key: u64, board: &BoardCell, first_tsc: u64) -> i32 {
    // The config, from this task's copy of the snapshot.
    let cfg = match (
        read_u64(STATE_VA + HEADER_OFF),
        read_u64(STATE_VA + HEADER_OFF + 8),
        read_u64(STATE_VA + HEADER_OFF + 16),
        read_u64(STATE_VA + HEADER_OFF + 24),
    ) {
        (Ok(MAGIC), Ok(records), Ok(stride), Ok(salt)) => Config {
            records,
            stride,
            salt,
        },
        _ => return 10,
    };
    // Binary search of the sparse index: the last page whose first key is <= key.
    let (mut lo, mut hi) = (0u64, cfg.pages());
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        match read_u64(STATE_VA + INDEX_OFF + mid * 8) {
            Ok(first) if first <= key => lo = mid,
            Ok(_) => hi = mid,
            Err(_) => return 11,
        }
    }
    // One page of the library.
    let mut page = [0u8; PAGE as usize];
    if task::read(LIB_VA + lo * PAGE, &mut page).is_err() {
        return 12;
    }
    let mut value = None;
    for rec in page.chunks_exact(RECORD as usize) {
        let (k, v, check) = (u64_at(rec, 0), u64_at(rec, 8), u64_at(rec, 24));
        if k == key {
            if check != k ^ v {
                return 13;
            }
            value = Some(v);
            break;
        }
    }
    // A private write: this task's own copy of the scratch page (copy-on-write).
    let stamp = (u64::from(req) << 32) | 0xabcd;
    let private_ok = task::write(STATE_VA + SCRATCH_OFF, &stamp.to_le_bytes()).is_ok()
        && read_u64(STATE_VA + SCRATCH_OFF) == Ok(stamp);
    // Report through the shared heap.
    let mut guard = board.lock();
    let Some(b) = guard.as_mut() else { return 14 };
    b.replies.push(Reply {
        key,
        value: value.unwrap_or(0),
        first_tsc,
        req,
        found: value.is_some(),
        private_ok,
        _reserved: [0; 2],
    });
    if value.is_some() {
        b.counters.hits += 1;
    } else {
        b.counters.misses += 1;
    }
    b.counters.pages_read += 1;
    0
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

/// Free memory a library of `lib_mib` MiB needs: its pages, its page tables and the sparse
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

    // 1. Warm: parse the config.
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

    // 3. The shared heap.
    let heap = match SharedHeap::new("board", HEAP_VA, HEAP_LEN) {
        Ok(h) => h,
        Err(e) => {
            println!("forkserver: cannot create the shared heap: {e}");
            return 3;
        }
    };

    // 4. Warm the private state: header (the parsed config), scratch page, sparse index.
    let t0 = Instant::now();
    let state_len = INDEX_OFF + (cfg.pages() * 8).next_multiple_of(PAGE);
    if let Err(e) = task::map_private("state", STATE_VA, state_len) {
        println!("forkserver: cannot map the private state: {e}");
        return 3;
    }
    let mut header = [0u8; 32];
    for (n, w) in [MAGIC, cfg.records, cfg.stride, cfg.salt]
        .iter()
        .enumerate()
    {
        header[n * 8..n * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let mut ok = task::write(STATE_VA + HEADER_OFF, &header).is_ok();
    let mut chunk = [0u8; PAGE as usize];
    let mut p = 0;
    while ok && p < cfg.pages() {
        let n = (cfg.pages() - p).min(PAGE / 8);
        for j in 0..n {
            let at = (j * 8) as usize;
            chunk[at..at + 8].copy_from_slice(&cfg.key((p + j) * PER_PAGE).to_le_bytes());
        }
        ok = task::write(STATE_VA + INDEX_OFF + p * 8, &chunk[..(n * 8) as usize]).is_ok();
        p += n;
    }
    if !ok {
        println!("forkserver: FAIL writing the private state");
        return 1;
    }
    let snapshot = match task::snapshot(&[(STATE_VA, state_len)]) {
        Ok(t) => t,
        Err(e) => {
            println!("forkserver: cannot snapshot: {e}");
            return 3;
        }
    };
    println!(
        "forkserver: snapshot of {} KiB (config + index of {} pages) warmed in {} ms",
        state_len >> 10,
        cfg.pages(),
        t0.elapsed().as_millis()
    );

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
    let keys = Arc::new(keys);

    let board: BoardCell = Arc::new(Mutex::new(None));
    let templates = [&snapshot, &library, &heap.template()];
    let mut failed = false;
    for &mode in &args.modes {
        match serve(mode, &templates, &heap, &board, &keys, &cfg, args.quiet) {
            Ok(()) => {}
            Err(code) => {
                failed = true;
                if code == 4 {
                    return 4;
                }
            }
        }
    }
    // The board's memory is in the shared heap: drop it in a task that attaches it.
    let b = board.clone();
    drop(board);
    let h = Builder::new().spawn(&[&heap.template()], move || {
        drop(b);
        0
    });
    if h.map(|h| h.join()) != Ok(Ok(0)) {
        println!("forkserver: FAIL dropping the board");
        failed = true;
    }
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

/// Serves every request in one mode, then checks the replies. `Err(4)`: a spawn failed.
fn serve(
    mode: Mode,
    templates: &[&Template],
    heap: &SharedHeap,
    board: &BoardCell,
    keys: &Arc<Vec<u64>>,
    cfg: &Config,
    quiet: bool,
) -> Result<(), i32> {
    let name = mode_name(mode);
    let builder = Builder::new().mode(mode);
    // Set up the board in the shared heap.
    let (b, alloc, n) = (board.clone(), heap.allocator(), keys.len());
    let setup = builder.spawn(&[&heap.template()], move || {
        let replies = SharedVec::with_capacity_in(n, alloc);
        let counters = SharedBox::new_in(Counters::default(), alloc);
        *b.lock() = Some(Board { replies, counters });
        0
    });
    if setup.map(|h| h.join()) != Ok(Ok(0)) {
        println!("forkserver: FAIL {name}: setting up the board");
        return Err(1);
    }

    libos::task::trim_caches();
    let free_before = libos::free_frames();
    let mut spawn_ns = Vec::with_capacity(keys.len());
    let mut first_ns = Vec::with_capacity(keys.len());
    let mut starts = Vec::with_capacity(keys.len());
    let wall = Instant::now();
    for (req, &key) in keys.iter().enumerate() {
        let board = board.clone();
        let t0 = Instant::now();
        let h = builder.spawn(templates, move || {
            let first = Instant::now().cycles();
            handle(req as u32, key, &board, first)
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

    // Check the replies in a task that attaches the heap, the library and the snapshot.
    let expected: Vec<Option<u64>> = keys.iter().map(|&k| cfg.expected(k)).collect();
    let (b, starts2) = (board.clone(), Arc::new(starts));
    let (tx, rx) = libos::channel::bounded::<Reply>(keys.len().max(1));
    let checker_starts = starts2.clone();
    let checker = builder.spawn_with(templates, tx, move |tx| {
        // No private write reached the snapshot: the scratch page is still zero here.
        if read_u64(STATE_VA + SCRATCH_OFF) != Ok(0) {
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
        let mut guard = b.lock();
        let Some(board) = guard.as_mut() else {
            return 22;
        };
        if board.replies.len() != expected.len() {
            return 23;
        }
        let mut seen_req = alloc::vec![false; expected.len()];
        let mut hits = 0;
        for r in board.replies.iter() {
            let i = r.req as usize;
            if i >= expected.len() || seen_req[i] || r.value() != expected[i] || !r.private_ok {
                return 24;
            }
            seen_req[i] = true;
            hits += u64::from(r.found);
            let first = r.first_tsc.saturating_sub(checker_starts[i]);
            if tx
                .send(Reply {
                    first_tsc: first,
                    ..*r
                })
                .is_err()
            {
                return 25;
            }
        }
        let c = &board.counters;
        if c.hits != hits || c.misses != expected.len() as u64 - hits {
            return 26;
        }
        if c.pages_read != expected.len() as u64 {
            return 27;
        }
        board.replies.clear();
        *board.counters = Counters::default();
        0
    });
    let code = match checker.map(|h| h.join()) {
        Ok(r) => r,
        Err(e) => {
            println!("forkserver: FAIL {name}: cannot spawn the checker: {e}");
            return Err(4);
        }
    };
    let mut replies = Vec::new();
    while let Ok(Some(r)) = rx.try_recv() {
        replies.push(r);
    }
    replies.sort_unstable_by_key(|r| r.req);
    let mut hits = 0;
    for r in &replies {
        let (req, key, value, first) = (r.req, r.key, r.value(), r.first_tsc);
        let first = libos::time::cycles_to_duration(first).as_nanos() as u64;
        first_ns.push(first);
        hits += u64::from(value.is_some());
        if !quiet {
            let v = match value {
                Some(v) => format!("hit {v:#018x}"),
                None => String::from("miss"),
            };
            println!(
                "{name} req {req:4} key {key:>14} {v:<22} spawn {:>8} us  first instr {:>8} us",
                us(spawn_ns[req as usize]),
                us(first)
            );
        }
    }
    if code != Ok(0) {
        let why = match &code {
            Ok(20) => String::from("a private write leaked into the snapshot"),
            Ok(21) => String::from("the library does not map the app's rodata"),
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
    drop(starts2);
    Ok(())
}
