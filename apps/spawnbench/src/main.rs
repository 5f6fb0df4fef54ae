//! Stencil's spawn benchmark, run inside the guest by `cargo xtask bench`.
//!
//! For each template size (2 MiB … 64 GiB; sizes above guest RAM are alias-backed: every page maps
//! one frame, so the page tables are real and the data is not) and each mode (`share`: attach by
//! reference; `copy`: deep-copy the tables, what fork() does), with 4 KiB and 2 MiB templates:
//!
//! - `spawn_parent`: the parent's `spawn` call until it returns (the child exists, not yet run);
//! - `spawn_first`: spawn → the child's first instruction (TSC; the parent reads it right before
//!   `spawn`, the child stores its own reading first thing);
//! - `spawn_roundtrip`: spawn + the child's exit + join;
//! - `first_write`: the child's first write to a `Private` template page (unshare + copy), timed
//!   in the child;
//! - page-table bytes a new task costs (`PTBYTES` lines);
//! - density: how many tasks from a 1 GiB template are alive at once before memory runs out
//!   (`DENSITY` lines);
//! - the warm-heap series (`heap.rs`): spawning from a `Zygote` whose heap holds 1 MiB … 1 GiB of
//!   live objects (`pages=heap` / `heap-copy`), with the seal's cost (`kind=seal`), the child's
//!   first write into a warm object and the spawn right after the zygote wrote one page
//!   (`kind=spawn_dirty1`);
//! - the request series (`req.rs`): whole requests (spawn, 100 lookups and W page writes by the
//!   shared `reqcore` handler, exit, join) from a zygote holding a 16 MiB … 1 GiB warm state
//!   (`kind=request_wW`, `pages=share` / `copy`), each answer checked.
//!
//! Output lines (parsed by xtask): `RESULT kind=.. size=.. pages=<mode> n=.. p50_ns=.. p99_ns=..`,
//! `PTBYTES size=.. pages=<mode> bytes=..`, `DENSITY size=.. pages=<mode> tasks=..`, `SKIP ..`,
//! `ERROR ..`, and `DONE`. Under `-icount shift=0,sleep=off` the TSC counts instructions, so the
//! `_ns` figures are guest instructions.
//! Arguments: `full` (every size; minutes under TCG), `quick` (fewer sizes and samples; what
//! `cargo xtask bench --quick` runs) or `smoke` (2 MiB templates, a 1 MiB heap and a 2 MiB request state; seconds). `cargo xtask bench` always
//! names the level; without one the app runs `smoke`, so `cargo xtask run spawnbench` finishes
//! within `run`'s default 60 s timeout. Anything else: exit 2 with the usage.
#![no_std]
#![no_main]

extern crate alloc;

mod heap;
mod req;

use alloc::vec::Vec;

use libos::println;
use libos::space::{Kind, Mode, PageSize, Template, TemplateBuilder};
use libos::task::{self, Builder};
use libos::time::Instant;

libos::main!(main);

const BASE: u64 = 0x80_0000_0000; // 512 GiB: a fresh L4 entry
const SIZES: [u64; 7] = [
    2 << 20,
    16 << 20,
    128 << 20,
    1 << 30,
    4 << 30,
    16 << 30,
    64 << 30,
];
const STACK: u64 = 16 << 10;

/// A child's measurement as its exit code (cycles or bytes; saturated to `i32::MAX`).
fn reply(v: u64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn cycles_to_ns(c: u64) -> u64 {
    libos::time::cycles_to_duration(c).as_nanos() as u64
}

/// Most samples of one series.
const MAX_SAMPLES: usize = 1000;

/// Samples kept on the stack: the loop that measures spawn must not write to the parent's own
/// process memory, or every spawn would first re-seal the pages it wrote (a spawn is a fork of
/// it). The stack is libos's (kernel half), not process memory.
struct Samples {
    v: [u64; MAX_SAMPLES],
    n: usize,
}

impl Samples {
    fn new() -> Self {
        Samples {
            v: [0; MAX_SAMPLES],
            n: 0,
        }
    }

    fn push(&mut self, x: u64) {
        if self.n < MAX_SAMPLES {
            self.v[self.n] = x;
            self.n += 1;
        }
    }
}

fn p50_p99(v: &mut [u64]) -> (u64, u64) {
    v.sort_unstable();
    (
        v[v.len() / 2],
        v[(v.len() * 99)
            .div_ceil(100)
            .saturating_sub(1)
            .min(v.len() - 1)],
    )
}

fn mode_name(mode: Mode, page: PageSize) -> &'static str {
    match (mode, page) {
        (Mode::Share, PageSize::Size4KiB) => "share",
        (Mode::Copy, PageSize::Size4KiB) => "copy",
        (Mode::Share, PageSize::Size2MiB) => "share-2m",
        (Mode::Copy, PageSize::Size2MiB) => "copy-2m",
    }
}

fn report(kind: &str, size: u64, mode: &str, samples: &mut Samples) {
    let n = samples.n;
    if n == 0 {
        return;
    }
    let (p50, p99) = p50_p99(&mut samples.v[..n]);
    println!("RESULT kind={kind} size={size} pages={mode} n={n} p50_ns={p50} p99_ns={p99}");
}

fn build(size: u64, page: PageSize) -> Option<Template> {
    let t0 = Instant::now();
    match TemplateBuilder::new()
        .alias_region("bench", BASE, size, Kind::Private, page)
        .and_then(|b| b.seal())
    {
        Ok(t) => {
            println!(
                "INFO built {} {:?} template in {:?}",
                size,
                page,
                t0.elapsed()
            );
            Some(t)
        }
        Err(e) => {
            println!(
                "SKIP size={size} pages={} reason=template_build_failed:{e}",
                mode_name(Mode::Share, page)
            );
            None
        }
    }
}

/// Samples per (size, mode): share is cheap everywhere; copy grows with the size.
fn samples(size: u64, mode: Mode, level: Level) -> usize {
    let base = match (mode, size) {
        (Mode::Share, _) => 1000,
        (Mode::Copy, s) if s <= 16 << 20 => 1000,
        (Mode::Copy, s) if s <= 128 << 20 => 200,
        (Mode::Copy, s) if s <= 1 << 30 => 30,
        (Mode::Copy, s) if s <= 4 << 30 => 8,
        (Mode::Copy, _) => 3,
    };
    match level {
        Level::Full => base,
        Level::Quick | Level::Smoke => (base / 5).max(2),
    }
}

fn measure(
    t: &Template,
    size: u64,
    mode: Mode,
    page: PageSize,
    level: Level,
) -> Result<(), task::SpawnError> {
    let name = mode_name(mode, page);
    let n = samples(size, mode, level);
    let builder = Builder::new().mode(mode).stack_size(STACK);
    let n = n.min(MAX_SAMPLES);
    let forks0 = libos::process::fork_counts();
    let (mut first, mut round, mut write, mut parent) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    for i in 0..n {
        // spawn → first instruction, and the round trip
        let t0 = libos::time::Instant::now().cycles();
        // The child reports through its exit code (its statics and heap are its own).
        let h = builder.spawn(&[t], move || {
            reply(Instant::now().cycles().saturating_sub(t0))
        })?;
        let tp = Instant::now().cycles();
        let child_first = h.join().map_or(0, |c| c as u64);
        let t1 = Instant::now().cycles();
        parent.push(cycles_to_ns(tp - t0));
        first.push(cycles_to_ns(child_first));
        round.push(cycles_to_ns(t1 - t0));
        // first write to a Private page (unshare + copy) and page-table bytes, in a fresh task
        if i < n.min(200) {
            let va = BASE + (((i as u64 * 4096 * 513) % size) & !4095);
            let h = builder.spawn(&[t], move || {
                let a = Instant::now().cycles();
                task::write(va, &[1]).expect("private template page");
                let b = Instant::now().cycles();
                reply(b - a)
            })?;
            let w = h.join().map_or(0, |c| c as u64);
            write.push(cycles_to_ns(w));
        }
    }
    // Page-table bytes of a task that only spawned (no write).
    let h = builder.spawn(
        &[t],
        || reply(task::space_stats().page_table_bytes() as u64),
    )?;
    let pt_bytes = h.join().map_or(0, |c| c as u64);
    let forks1 = libos::process::fork_counts();
    println!(
        "INFO forks size={size} pages={name} spawns={} clean={}",
        forks1.0 - forks0.0,
        forks1.1 - forks0.1
    );
    report("spawn_parent", size, name, &mut parent);
    report("spawn_first", size, name, &mut first);
    report("spawn_roundtrip", size, name, &mut round);
    report("first_write", size, name, &mut write);
    println!("PTBYTES size={size} pages={name} bytes={pt_bytes}");
    task::trim_caches();
    Ok(())
}

/// Tasks from a 1 GiB template alive at once (each sleeps) before spawning fails, or until
/// `cap` tasks (then the figure is a lower bound: `tasks>=`).
fn density(mode: Mode, cap: usize) {
    let Some(t) = build(1 << 30, PageSize::Size4KiB) else {
        return;
    };
    let builder = Builder::new().mode(mode).stack_size(STACK);
    let mut held = Vec::new();
    let start = Instant::now();
    let err = loop {
        match builder.spawn(&[&t], || {
            task::sleep(core::time::Duration::from_secs(1 << 20));
            0
        }) {
            Ok(h) => held.push(h),
            Err(e) => break alloc::format!("{e}"),
        }
        if held.len() >= cap {
            break alloc::format!("stopped at the cap of {cap}");
        }
        if held.len() % 10_000 == 0 {
            println!(
                "INFO density {}: {} tasks alive, {} frames free",
                mode_name(mode, PageSize::Size4KiB),
                held.len(),
                libos::free_frames()
            );
        }
    };
    println!(
        "DENSITY size={} pages={} tasks={}{} stack={} reason={} elapsed_ms={}",
        1u64 << 30,
        mode_name(mode, PageSize::Size4KiB),
        if held.len() >= cap { ">=" } else { "" },
        held.len(),
        STACK,
        err,
        start.elapsed().as_millis()
    );
    for h in &held {
        h.kill();
    }
    for h in held {
        let _ = h.join();
    }
    task::trim_caches();
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Full,
    Quick,
    Smoke,
}

fn main() -> i32 {
    let level = match libos::args().first().map(|s| s.as_str()) {
        Some("full") => Level::Full,
        Some("quick") => Level::Quick,
        Some("smoke") => Level::Smoke,
        None => {
            println!(
                "INFO no level given: smoke (2 MiB templates, a 1 MiB warm heap, a 2 MiB request \
                 state); pass quick or full for more sizes"
            );
            Level::Smoke
        }
        Some(other) => {
            println!("ERROR unknown level '{other}'; usage: spawnbench [full|quick|smoke]");
            return 2;
        }
    };
    if libos::args().len() > 1 {
        println!("ERROR one argument at most; usage: spawnbench [full|quick|smoke]");
        return 2;
    }
    println!(
        "INFO stencil tsc_hz={} free_mib={} level={}",
        libos::time::tsc_hz(),
        (libos::free_frames() * 4096) >> 20,
        match level {
            Level::Full => "full",
            Level::Quick => "quick",
            Level::Smoke => "smoke",
        }
    );
    // Quick: 4 KiB templates up to 1 GiB (building a 64 GiB one takes minutes under TCG), 2 MiB
    // templates up to 64 GiB (cheap: 32 K entries).
    let sizes = |page: PageSize| -> &[u64] {
        match (level, page) {
            (Level::Full, _) => &SIZES,
            (Level::Quick, PageSize::Size4KiB) => &[2 << 20, 128 << 20, 1 << 30],
            (Level::Quick, PageSize::Size2MiB) => &[2 << 20, 1 << 30, 64 << 30],
            (Level::Smoke, _) => &[2 << 20],
        }
    };
    for page in [PageSize::Size4KiB, PageSize::Size2MiB] {
        for &size in sizes(page) {
            let Some(t) = build(size, page) else { continue };
            for mode in [Mode::Share, Mode::Copy] {
                if let Err(e) = measure(&t, size, mode, page, level) {
                    println!(
                        "SKIP size={size} pages={} reason=spawn_failed:{e}",
                        mode_name(mode, page)
                    );
                }
            }
        }
    }
    let (share_cap, copy_cap) = match level {
        Level::Full => (usize::MAX, usize::MAX),
        Level::Quick | Level::Smoke => (5_000, 200),
    };
    density(Mode::Share, share_cap);
    density(Mode::Copy, copy_cap);
    // Last: each size's zygote is a task of its own, so no other series forks its heap.
    heap::run(level);
    // The whole request (spawn, 100 lookups, W page writes, exit, join) from a warm state.
    req::run(level);
    println!("DONE");
    0
}
