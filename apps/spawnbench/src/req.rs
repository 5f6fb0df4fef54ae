//! The request series (issue #13): the whole request of a fork server, not just its spawn.
//!
//! For each state size (16 MiB, 256 MiB, 1 GiB; `quick`: 16 MiB; `smoke`: 2 MiB) a task of its
//! own (a fork of `main`, as the warm-heap series does) builds the warm state with
//! [`reqcore::State::build`] — a `hashbrown` index plus records, ordinary Rust data in its heap —
//! and seals it with [`Zygote::new`]. Then, in `share` and in `copy` mode and for each
//! W in [`reqcore::WRITES`], every sample is one request: spawn a child from the zygote, the
//! child runs [`reqcore::handle`] on its copy (100 lookups, W writes on distinct pages) and
//! answers its checksum as its exit code, and the zygote joins it. The figure (`kind=request_wW`,
//! `pages=share` / `copy`) runs from before the spawn call until `join` returned.
//!
//! Before each spawn the zygote computes the answer directly ([`reqcore::expected`]: reads only,
//! its stack is libos's), and a child that answers anything else is counted and reported as an
//! `ERROR` line: the run fails rather than giving a number. The Linux peer runs the same crate's
//! handler in a child forked from its warmed process (bench/linux-peer).

use alloc::string::String;

use libos::println;
use libos::process::Zygote;
use libos::space::Mode;
use libos::task::Builder;
use libos::time::Instant;
use reqcore::{Request, State};

use super::{Level, MAX_SAMPLES, STACK, Samples, cycles_to_ns, report};

/// The stack of a series' own task (its loop keeps a [`Samples`] on it).
const SERIES_STACK: u64 = 256 << 10;

/// Runs the series for every size of `level`, each in its own task.
pub(crate) fn run(level: Level) {
    let sizes: &[u64] = match level {
        Level::Full => &reqcore::SIZES,
        Level::Quick => &reqcore::QUICK_SIZES,
        Level::Smoke => &[reqcore::MIN_BYTES],
    };
    for &size in sizes {
        let h =
            Builder::new()
                .stack_size(SERIES_STACK)
                .spawn(&[], move || match series(size, level) {
                    Ok(()) => 0,
                    Err(why) => {
                        println!("SKIP size={size} pages=req reason=\"{why}\"");
                        1
                    }
                });
        match h.map(|h| h.join()) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => println!("ERROR request series at {size} bytes ended: {e}"),
            Err(e) => println!("SKIP size={size} pages=req reason=\"spawn failed: {e}\""),
        }
    }
}

/// Memory a series needs besides its state: a `copy` child's tables (a 1 GiB state has 2 MiB of
/// L1 tables) and the pages 256 writes copy, with room to spare.
fn headroom(size: u64) -> u64 {
    size / 16 + (48 << 20)
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Share => "share",
        Mode::Copy => "copy",
    }
}

/// Builds and seals the state of `size` bytes and measures every (mode, W). `Err`: why not.
fn series(size: u64, level: Level) -> Result<(), String> {
    let free = libos::free_frames() as u64 * 4096;
    let need = size + headroom(size);
    if free < need {
        return Err(alloc::format!(
            "not enough memory: needs {} MiB, has {} MiB free",
            need >> 20,
            free >> 20
        ));
    }
    let t0 = Instant::now();
    let state = State::build(size).map_err(|e| alloc::format!("{e}"))?;
    println!(
        "INFO reqstate size={size} records={} heap_bytes={} build_ms={}",
        state.records(),
        state.heap_bytes(),
        t0.elapsed().as_millis()
    );
    let mut zygote = Zygote::new(state);
    for mode in [Mode::Share, Mode::Copy] {
        for (&w, &kind) in reqcore::WRITES.iter().zip(reqcore::KINDS.iter()) {
            measure(&mut zygote, size, mode, w, kind, level)?;
        }
    }
    // The task's end frees its heap at once (dropping the state first would only write it).
    core::mem::forget(zygote);
    Ok(())
}

/// One (mode, W) series: `reqcore::samples` requests after `reqcore::WARMUP` unmeasured ones.
fn measure(
    zygote: &mut Zygote<State>,
    size: u64,
    mode: Mode,
    writes: u32,
    kind: &'static str,
    level: Level,
) -> Result<(), String> {
    let n = match level {
        Level::Full => reqcore::samples(size, false),
        Level::Quick => reqcore::samples(size, true),
        Level::Smoke => 10,
    }
    .min(MAX_SAMPLES);
    let name = mode_name(mode);
    let builder = Builder::new().mode(mode).stack_size(STACK);
    let mut costs = Samples::new();
    // Children that answered a wrong checksum; children that ended without an answer.
    let (mut wrong, mut failed) = (0u32, 0u32);
    let forks0 = libos::process::fork_counts();
    for i in 0..reqcore::WARMUP + n {
        let req = Request::new(
            reqcore::request_seed(i as u64, writes),
            writes,
            zygote.state(),
        )
        .map_err(|e| alloc::format!("{e}"))?;
        let want = reqcore::exit_code(reqcore::expected(zygote.state(), &req));
        let t0 = Instant::now().cycles();
        let h = zygote
            .spawn_with_builder(builder, &[], move |state| {
                reqcore::exit_code(reqcore::handle(state, &req))
            })
            .map_err(|e| alloc::format!("spawn failed: {e}"))?;
        let got = h.join();
        let t1 = Instant::now().cycles();
        match got {
            Ok(c) if c == want => {
                if i >= reqcore::WARMUP {
                    costs.push(cycles_to_ns(t1.saturating_sub(t0)));
                }
            }
            Ok(_) => wrong += 1,
            Err(_) => failed += 1,
        }
    }
    let forks1 = libos::process::fork_counts();
    println!(
        "INFO reqforks size={size} pages={name} writes={writes} spawns={} clean={}",
        forks1.0 - forks0.0,
        forks1.1 - forks0.1
    );
    if wrong > 0 {
        println!(
            "ERROR requests at {size} bytes, {name}, W={writes}: {wrong} children answered a \
             wrong checksum"
        );
    }
    if failed > 0 {
        println!(
            "ERROR requests at {size} bytes, {name}, W={writes}: {failed} children ended \
             without an answer"
        );
    }
    report(kind, size, name, &mut costs);
    Ok(())
}
