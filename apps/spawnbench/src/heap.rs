//! The warm-heap series: spawning from a zygote whose heap holds 1 MiB … 1 GiB of live Rust
//! objects (`pages=heap`: `share` mode, `pages=heap-copy`: `copy` mode, the fork()-like baseline).
//!
//! Each size runs in a task of its own (a fork of `main`), so its heap goes with it when it ends
//! and the other series never fork it. That task builds `size / 4096` boxed 4 KiB objects filled
//! with a pattern, then measures:
//!
//! - `seal`: the [`Zygote::new`] call, the snapshot of the task's memory (n=1: the first seal
//!   after the objects were written; its cost grows with the pages written since the fork);
//! - per mode: `spawn_parent`, `spawn_first`, `spawn_roundtrip` as the template series does, with
//!   the zygote unchanged since the seal (`INFO forks` says how many spawns found it so);
//! - `first_write`: a child's first write into a warm object (copy-on-write of one heap page),
//!   timed in the child, which also checks that the object holds the zygote's pattern;
//! - `spawn_dirty1`: spawn → the child's first instruction right after the zygote wrote one page
//!   of its heap (the incremental re-seal of that page is part of the spawn).
//!
//! The loops keep their samples on the stack (libos's, not process memory) and children report
//! through their exit codes, so nothing but the measured `spawn_dirty1` writes the zygote's heap.

use alloc::boxed::Box;
use alloc::vec::Vec;

use libos::println;
use libos::process::Zygote;
use libos::space::Mode;
use libos::task::Builder;
use libos::time::Instant;

use super::{Level, STACK, Samples, cycles_to_ns, reply, report};

/// Heap sizes of the full run.
const SIZES: [u64; 4] = [1 << 20, 16 << 20, 256 << 20, 1 << 30];
/// Bytes of one live object.
const OBJ: usize = 4096;
/// The stack of a series' own task: its loops keep several [`Samples`] (8 KB each) on it.
const SERIES_STACK: u64 = 256 << 10;

/// The warm state: many small allocations, not one big one.
type State = Vec<Box<[u8]>>;

/// The byte object `i` is filled with.
fn pattern(i: usize) -> u8 {
    // In range: the remainder is below 251.
    (i % 251) as u8 ^ 0x5a
}

/// Runs the series for every size of `level`, each in its own task.
pub(crate) fn run(level: Level) {
    let sizes: &[u64] = match level {
        Level::Full => &SIZES,
        Level::Quick => &[1 << 20, 256 << 20],
        Level::Smoke => &[1 << 20],
    };
    for &size in sizes {
        let h =
            Builder::new()
                .stack_size(SERIES_STACK)
                .spawn(&[], move || match series(size, level) {
                    Ok(()) => 0,
                    Err(why) => {
                        println!("SKIP size={size} pages=heap reason={why}");
                        1
                    }
                });
        match h.map(|h| h.join()) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => println!("ERROR warm-heap series at {size} bytes ended: {e}"),
            Err(e) => println!("SKIP size={size} pages=heap reason=spawn_failed:{e}"),
        }
    }
}

/// Samples per mode: share is cheap at every size; copy grows with the heap.
fn samples(size: u64, mode: Mode, level: Level) -> usize {
    let base = match (mode, size) {
        (Mode::Share, _) => 1000,
        (Mode::Copy, s) if s <= 16 << 20 => 1000,
        (Mode::Copy, s) if s <= 256 << 20 => 100,
        (Mode::Copy, _) => 30,
    };
    match level {
        Level::Full => base,
        Level::Quick | Level::Smoke => (base / 5).max(2),
    }
}

/// Memory a series of `size` bytes needs besides its heap: the allocator's headers, the
/// zygote's tables, and a `copy` child's tables and first-write copies.
fn headroom(size: u64) -> u64 {
    size / 16 + (32 << 20)
}

/// Builds the warm heap of `size` bytes, seals it and measures both modes. `Err`: why not.
fn series(size: u64, level: Level) -> Result<(), alloc::string::String> {
    let free = libos::free_frames() as u64 * 4096;
    let need = size + headroom(size);
    if free < need {
        // A heap that runs out of frames while it is filled would end the task with a fault.
        return Err(alloc::format!(
            "not_enough_memory:needs_{}_MiB_has_{}_MiB_free",
            need >> 20,
            free >> 20
        ));
    }
    let count = usize::try_from(size / OBJ as u64).map_err(|_| "size_too_large")?;
    if count == 0 {
        return Err("size_below_one_object".into());
    }
    let t0 = Instant::now();
    let mut objs: State = Vec::new();
    objs.try_reserve_exact(count)
        .map_err(|_| "out_of_memory_for_the_index")?;
    for i in 0..count {
        let mut o = Vec::new();
        o.try_reserve_exact(OBJ)
            .map_err(|_| "out_of_memory_for_the_objects")?;
        o.resize(OBJ, pattern(i));
        objs.push(o.into_boxed_slice());
    }
    let filled = t0.elapsed();
    let heap = libos::process::heap_stats();
    println!(
        "INFO heap size={size} objects={count} allocated_bytes={} reserved_bytes={} fill_ms={}",
        heap.allocated_bytes,
        heap.reserved_bytes,
        filled.as_millis()
    );
    let c0 = Instant::now().cycles();
    let mut zygote = Zygote::new(objs);
    let c1 = Instant::now().cycles();
    let mut seal = Samples::new();
    seal.push(cycles_to_ns(c1.saturating_sub(c0)));
    report("seal", size, "heap", &mut seal);
    for mode in [Mode::Share, Mode::Copy] {
        if let Err(e) = measure(&mut zygote, size, count, mode, level) {
            println!(
                "SKIP size={size} pages={} reason=spawn_failed:{e}",
                mode_name(mode)
            );
        }
    }
    // Every object the children wrote or the zygote rewrote still holds the pattern here.
    let bad = (0..count)
        .step_by(count.div_ceil(4096).max(1))
        .chain((0..1000).map(|i| index(i, count)))
        .filter(|&i| {
            let o = &zygote.state()[i];
            o.iter().step_by(512).any(|&b| b != pattern(i))
        })
        .count();
    if bad > 0 {
        println!("ERROR warm heap at {size} bytes: {bad} objects lost their pattern in the zygote");
    }
    // The task's end frees its heap at once; dropping the objects one by one first would
    // copy-on-write every page the allocator's bookkeeping touches.
    core::mem::forget(zygote);
    Ok(())
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Share => "heap",
        Mode::Copy => "heap-copy",
    }
}

/// The object sample `i` writes: 513 apart, so samples meet different pages and PTE tables.
fn index(i: usize, count: usize) -> usize {
    i.wrapping_mul(513) % count
}

fn measure(
    zygote: &mut Zygote<State>,
    size: u64,
    count: usize,
    mode: Mode,
    level: Level,
) -> Result<(), libos::task::SpawnError> {
    let name = mode_name(mode);
    let builder = Builder::new().mode(mode).stack_size(STACK);
    let n = samples(size, mode, level).min(super::MAX_SAMPLES);
    let (mut parent, mut first, mut round, mut write, mut dirty) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    // Children that found the pattern changed; children that ended without a figure.
    let (mut wrong, mut failed) = (0u32, 0u32);
    let forks0 = libos::process::fork_counts();
    for i in 0..n {
        let t0 = Instant::now().cycles();
        let h = zygote.spawn_with_builder(builder, &[], move |_| {
            reply(Instant::now().cycles().saturating_sub(t0))
        })?;
        let tp = Instant::now().cycles();
        let child_first = h.join().ok().and_then(|c| u64::try_from(c).ok());
        let t1 = Instant::now().cycles();
        parent.push(cycles_to_ns(tp.saturating_sub(t0)));
        round.push(cycles_to_ns(t1.saturating_sub(t0)));
        match child_first {
            Some(c) => first.push(cycles_to_ns(c)),
            None => failed += 1,
        }
        if i < n.min(200) {
            let k = index(i, count);
            let h = zygote.spawn_with_builder(builder, &[], move |objs| {
                let want = pattern(k);
                let o = &mut objs[k];
                let a = Instant::now().cycles();
                o[0] = !want;
                let b = Instant::now().cycles();
                if o[OBJ - 1] != want || o[OBJ / 2] != want || o[0] != !want {
                    return -1;
                }
                reply(b.saturating_sub(a))
            })?;
            match h.join() {
                Ok(-1) => wrong += 1,
                Ok(c) => match u64::try_from(c) {
                    Ok(c) => write.push(cycles_to_ns(c)),
                    Err(_) => failed += 1,
                },
                Err(_) => failed += 1,
            }
        }
    }
    let forks1 = libos::process::fork_counts();
    for i in 0..n.min(200) {
        // The zygote writes one page of a warm object (the value it holds: the state stays the
        // same, the page is written), then spawns: the spawn re-seals that page.
        let k = index(i + 7, count);
        zygote.state_mut()[k][OBJ / 2] = core::hint::black_box(pattern(k));
        let t0 = Instant::now().cycles();
        let h = zygote.spawn_with_builder(builder, &[], move |_| {
            reply(Instant::now().cycles().saturating_sub(t0))
        })?;
        match h.join().ok().and_then(|c| u64::try_from(c).ok()) {
            Some(c) => dirty.push(cycles_to_ns(c)),
            None => failed += 1,
        }
    }
    let forks2 = libos::process::fork_counts();
    println!(
        "INFO forks size={size} pages={name} spawns={} clean={} dirty1_spawns={} dirty1_clean={}",
        forks1.0 - forks0.0,
        forks1.1 - forks0.1,
        forks2.0 - forks1.0,
        forks2.1 - forks1.1
    );
    if wrong > 0 {
        println!(
            "ERROR warm heap at {size} bytes, {name}: {wrong} children did not find the pattern"
        );
    }
    if failed > 0 {
        println!(
            "ERROR warm heap at {size} bytes, {name}: {failed} children ended without a figure"
        );
    }
    report("spawn_parent", size, name, &mut parent);
    report("spawn_first", size, name, &mut first);
    report("spawn_roundtrip", size, name, &mut round);
    report("first_write", size, name, &mut write);
    report("spawn_dirty1", size, name, &mut dirty);
    libos::task::trim_caches();
    Ok(())
}
