//! Hostile but safe app code: each subcase (the first argument) does something an app may do
//! by mistake or on purpose, and checks that libos answers with an error value or ends only the
//! task at fault, instead of freezing or killing the VM.
//!
//! - `display-mutex`: a `Display` impl that, holding a `sync::Mutex`, waits inside `println!`
//!   for another task (on a channel), while that task must print before it lets the formatting
//!   go on; the other task holds its own copy of the same static `Mutex` meanwhile.
//! - `display-reenter`: a `Display` impl that calls `println!` (and a long line, and the logger).
//! - `arena-oom`: arenas that run full (`try_reserve` errs, a push panics) or outgrow RAM.
//! - `fragmented`: a task's own heap grows by 8 MiB on memory with no 4 MiB physical run left
//!   (main's, then one of a task spawned before that growth).
//! - `task-oom` / `main-oom`: a task's own heap cannot grow (a spawned task / the main task).
//! - `spawn-reserve`: spawn and the task heaps refuse before they eat the kernel heap's reserve.
//!
//! Tasks are processes: a spawned task works on its own copy of main's statics and heap, so what
//! crosses between tasks here is an exit code or a channel message.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use libos::channel::{self, Receiver, Sender};
use libos::println;
use libos::space::{Kind, TemplateBuilder};
use libos::sync::Mutex;
use libos::task::{self, TaskError};

libos::main!(main);

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(alloc::format!("FAIL: {what}"))
    }
}

/// Formatting it waits (inside `println!`) for the holder task: it tells the holder to go on,
/// then waits for the holder's value, which the holder sends only after it has printed.
struct WaitsForHolder {
    go: Sender<u8>,
    value: Receiver<u32>,
}

impl fmt::Display for WaitsForHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A `sync::Mutex` of this task, held while waiting: formatting may take locks.
        let mut seen = LAST_SEEN.lock();
        self.go.send(1).map_err(|_| fmt::Error)?;
        let v = self.value.recv().ok_or(fmt::Error)?;
        *seen = v;
        write!(f, "value {v}")
    }
}

/// Main's last value seen by [`WaitsForHolder`] (each task has its own copy of this static).
static LAST_SEEN: Mutex<u32> = Mutex::new(0);

fn display_mutex() -> Result<(), String> {
    // The holder's copy of `LAST_SEEN` is its own: locking it there while main's copy is locked
    // inside the `Display` impl does not wait (tasks share no statics).
    let (go_tx, go_rx) = channel::bounded::<u8>(1);
    let (value_tx, value_rx) = channel::bounded::<u32>(1);
    let holder = task::spawn_with(&[], (go_rx, value_tx), |(go, value)| {
        let mut mine = LAST_SEEN.lock();
        *mine = 7;
        // Wait until main is inside `Display::fmt` (inside its `println!`), then print.
        if go.recv() != Some(1) {
            return 1;
        }
        println!("holder: printing while holding the mutex");
        if value.send(42).is_err() {
            return 2;
        }
        i32::from(*mine != 7) * 3
    })
    .map_err(|e| alloc::format!("FAIL: spawn: {e}"))?;
    // Formatting waits for the holder, which can only release it after its own println!.
    println!(
        "display: {}",
        WaitsForHolder {
            go: go_tx,
            value: value_rx
        }
    );
    check(holder.join() == Ok(0), "holder task ended normally")?;
    check(
        *LAST_SEEN.lock() == 42,
        "main's own static holds the value it received",
    )?;
    println!("display-mutex ok");
    Ok(())
}

/// Prints a line of its own while being formatted, then writes `[nested]` and `pad` x's.
struct Nested {
    pad: usize,
}

impl fmt::Display for Nested {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        println!("inner: printed from inside Display::fmt");
        f.write_str("[nested]")?;
        for _ in 0..self.pad {
            f.write_str("x")?;
        }
        Ok(())
    }
}

fn display_reenter() -> Result<(), String> {
    println!("outer: {}", Nested { pad: 0 });
    // Longer than any small formatting buffer.
    println!("long outer: {} end", Nested { pad: 600 });
    log::info!("logged: {}", Nested { pad: 0 });
    println!("display-reenter ok");
    Ok(())
}

/// Free frames plus the kernel heap's own pages: the heap keeps a page it grew by (its
/// objects freed), so a spawn that allocated kernel objects and gave them back may leave one
/// page there, depending on where the heap's free space happened to be.
fn frames_and_heap() -> usize {
    libos::free_frames() + (libos::heap_stats().reserved_bytes / 4096)
}

fn arena_oom() -> Result<(), String> {
    use allocator_api2::vec::Vec as AVec;
    let spawn = |f: fn() -> i32| task::spawn(&[], f).map_err(|e| alloc::format!("FAIL: {e}"));

    // A full arena answers try_reserve with an error; the task goes on using it.
    let t = spawn(|| {
        libos::arena::Arena::scope(0x10_0000_0000, 1 << 20, |arena| {
            let mut v: AVec<u8, _> = AVec::new_in(arena);
            let r = v.try_reserve(2 << 20);
            println!(
                "try_reserve in a full arena: {}",
                if r.is_err() { "Err" } else { "Ok" }
            );
            if r.is_ok() {
                return 1;
            }
            v.extend_from_slice(&[7u8; 1000]);
            if v.iter().map(|&b| u32::from(b)).sum::<u32>() == 7000 {
                0
            } else {
                2
            }
        })
        .unwrap_or(5)
    })?;
    check(t.join() == Ok(0), "the task with a full arena went on")?;

    // A plain push into a full arena is an allocation failure: that task panics, alone.
    let t = spawn(|| {
        libos::arena::Arena::scope(0x10_0000_0000, 1 << 20, |arena| {
            let mut v: AVec<u64, _> = AVec::new_in(arena);
            for i in 0..1_000_000u64 {
                v.push(i);
            }
            3
        })
        .unwrap_or(5)
    })?;
    match t.join() {
        Err(TaskError::Panic(m)) => {
            println!("arena push past the end: task panicked: {m}");
            check(
                m.contains("memory allocation of"),
                "the panic names the allocation",
            )?;
        }
        other => check(false, &alloc::format!("expected a panic, got {other:?}"))?,
    }

    // An arena larger than RAM: its demand-zero pages run out while the arena's allocator works.
    // Main holds the snapshot of its process memory that its last spawn took: measure right
    // after a `seal` both times (each then includes one), and count what main's own heap
    // committed as the kernel heap's growth is counted.
    task::trim_caches();
    let heap0 = libos::heap_stats().reserved_bytes / 4096;
    let pheap0 = libos::process::heap_stats().reserved_bytes / 4096;
    libos::process::seal().map_err(|e| alloc::format!("FAIL: seal: {e}"))?;
    let before = libos::free_frames();
    let t = spawn(|| {
        libos::arena::Arena::scope(0x10_0000_0000, 1 << 30, |arena| {
            let mut blocks = AVec::new_in(arena);
            loop {
                let mut b: AVec<u8, _> = AVec::new_in(arena);
                if b.try_reserve_exact(4000).is_err() || blocks.try_reserve(1).is_err() {
                    return 4; // the arena itself ran out first: not what this case is about
                }
                b.push(1);
                blocks.push(b);
            }
        })
        .unwrap_or(5)
    })?;
    let r = t.join();
    println!("arena beyond RAM: task ended: {r:?}");
    check(
        matches!(&r, Err(TaskError::Fault { .. })),
        "the task ran out of RAM in its arena",
    )?;
    task::trim_caches();
    let heap_growth = libos::heap_stats().reserved_bytes / 4096 - heap0;
    let pheap_growth = libos::process::heap_stats().reserved_bytes / 4096 - pheap0;
    libos::process::seal().map_err(|e| alloc::format!("FAIL: seal: {e}"))?;
    let after = libos::free_frames();
    println!(
        "free frames before {before}, after {after} (+{heap_growth} taken by the kernel heap, +{pheap_growth} by main's own heap)"
    );
    check(
        after + heap_growth + pheap_growth == before,
        "the arena's frames came back when the task ended",
    )?;
    // The system goes on: spawn and print.
    let t = spawn(|| 5)?;
    check(
        t.join() == Ok(5),
        "a new task runs after the out-of-memory task",
    )?;
    println!("arena-oom ok");
    Ok(())
}

fn fragmented() -> Result<(), String> {
    // Fill RAM with 1 MiB templates (ascending physical frames), then drop every other one: the
    // free memory is in holes of about 1 MiB, none 4 MiB long.
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    let mut i = 0u32;
    while libos::free_frames() > 2048 {
        let t = TemplateBuilder::new()
            .region("frag", 0x4000_0000, 1 << 20, Kind::Private, |_, p| p[0] = 1)
            .and_then(|b| b.seal())
            .map_err(|e| alloc::format!("FAIL: template {i}: {e}"))?;
        if i.is_multiple_of(2) {
            kept.push(t);
        } else {
            dropped.push(t);
        }
        i += 1;
    }
    // Leave the tail (~8 MiB) in 1 MiB pieces too.
    let mut tail = Vec::new();
    while libos::free_frames() > 400 {
        let t = TemplateBuilder::new()
            .region("tail", 0x4000_0000, 1 << 20, Kind::Private, |_, p| p[0] = 1)
            .and_then(|b| b.seal())
            .map_err(|e| alloc::format!("FAIL: tail template: {e}"))?;
        tail.push(t);
    }
    drop(dropped);
    let run = libos::mm::largest_free_run();
    println!(
        "fragmented: largest free run {} KiB, {} MiB free in {} templates kept",
        run * 4,
        libos::free_frames() / 256,
        kept.len() + tail.len()
    );
    check(run < 1024, "no 4 MiB physically contiguous run is left")?;

    // (Before tasks were processes, this checked that a task spawned before the kernel heap grew
    // saw the new heap pages. App code no longer allocates from the kernel heap: each task has a
    // heap of its own. The equivalent now: main's heap grows by 8 MiB on this memory, and so does
    // the heap of a task spawned before that growth — its heap is a copy of main's as of the
    // spawn, so it grows by itself, on the same fragmented memory — and main's heap does not
    // change with the task's.)
    let (tx, rx) = channel::bounded::<u8>(1);
    let reader = task::spawn_with(&[], rx, |rx| {
        let go = rx.recv().expect("main says go");
        let reserved0 = libos::process::heap_stats().reserved_bytes;
        let v = alloc::vec![go; 8 << 20];
        let grown = libos::process::heap_stats().reserved_bytes - reserved0;
        if grown < 8 << 20 {
            return -1; // the vector did not come from this task's own, grown heap
        }
        v.iter().step_by(4096).map(|&b| i32::from(b)).sum()
    })
    .map_err(|e| alloc::format!("FAIL: spawn: {e}"))?;
    let reserved0 = libos::process::heap_stats().reserved_bytes;
    let mut v = alloc::vec![0u8; 8 << 20];
    check(
        v.len() == 8 << 20 && v.iter().step_by(4096).all(|&b| b == 0),
        "8 MiB zeroed vector",
    )?;
    for b in v.iter_mut().step_by(4096) {
        *b = 1;
    }
    let reserved1 = libos::process::heap_stats().reserved_bytes;
    check(
        reserved1 - reserved0 >= 8 << 20,
        "main's own heap grew by 8 MiB",
    )?;
    drop(v);
    tx.send(2).map_err(|_| String::from("FAIL: reader gone"))?;
    check(
        reader.join() == Ok(2 * 2048),
        "a task spawned before main's growth grows its own heap by 8 MiB and uses every page",
    )?;
    check(
        libos::process::heap_stats().reserved_bytes == reserved1,
        "the task's growth is not main's",
    )?;
    println!("vec![0; 8 MiB] ok, and 8 MiB in an older task's own heap");
    let mut w: Vec<u8> = Vec::new();
    check(w.try_reserve(4 << 20).is_ok(), "try_reserve(4 MiB)")?;
    w.resize(4 << 20, 9);
    check(w.iter().step_by(4096).all(|&b| b == 9), "4 MiB vector")?;
    println!("try_reserve(4 MiB) ok");
    drop((w, kept, tail));
    println!("fragmented ok");
    Ok(())
}

fn task_oom() -> Result<(), String> {
    // The task's own heap commits its growth, so 1 GiB in a 256 MiB guest is an allocation
    // error (a panic that ends the task), not a fault on some later page.
    let t = task::spawn(&[], || {
        let v = alloc::vec![1u8; 1 << 30];
        i32::from(v[12345])
    })
    .map_err(|e| alloc::format!("FAIL: {e}"))?;
    match t.join() {
        Err(TaskError::Panic(m)) => {
            println!("task-oom: task panicked: {m}");
            check(
                m.contains("memory allocation of 1073741824 bytes failed"),
                "the panic names the failed allocation",
            )?;
        }
        other => check(false, &alloc::format!("expected a panic, got {other:?}"))?,
    }
    // A failed growth in main is an error value, and leaves main's heap, the kernel heap and RAM
    // as they were.
    task::trim_caches();
    let (pheap0, heap0, free0) = (
        libos::process::heap_stats(),
        libos::heap_stats(),
        libos::free_frames(),
    );
    let mut w: Vec<u8> = Vec::new();
    let r = w.try_reserve(1 << 30);
    let (pheap1, heap1, free1) = (
        libos::process::heap_stats(),
        libos::heap_stats(),
        libos::free_frames(),
    );
    println!(
        "try_reserve(1 GiB) in main: {}; free frames {free0} -> {free1}, main's heap {pheap0:?} -> {pheap1:?}",
        if r.is_err() { "Err" } else { "Ok" }
    );
    check(r.is_err(), "try_reserve beyond RAM fails")?;
    check(
        pheap0 == pheap1 && heap0 == heap1 && free0 == free1,
        "a failed growth changes neither main's heap, the kernel heap nor the free frames",
    )?;
    // The app goes on, and the heap still works.
    let v = alloc::vec![3u8; 1 << 20];
    check(
        v.iter().map(|&b| usize::from(b)).sum::<usize>() == 3 << 20,
        "heap usable",
    )?;
    println!("task-oom ok");
    Ok(())
}

fn spawn_reserve() -> Result<(), String> {
    // Spawn sleeping tasks until spawn refuses: it must refuse before the kernel heap's reserve
    // is touched, so that the kernel heap can then still grow by 4 MiB. (The handles' Vec is
    // allocated up front, in main's own heap: growing it later would need frames the reserve
    // keeps for the kernel heap.)
    //
    // Main's writes after each spawn (the push below) are copy-on-write faults in its process
    // memory, which the spawn just snapshotted: a data page and the tables on its path, frames
    // that spawn cannot refuse for it. So what spawn leaves is read right after it returns (the
    // counts are locals: main's stack is in the kernel half, not in its process memory).
    let mut held = Vec::with_capacity(100_000);
    let mut least_after_spawn = usize::MAX;
    let (err, before_refused) = loop {
        let sleeper = || {
            task::sleep(core::time::Duration::from_secs(3600));
            0
        };
        // Seal main's memory first (what the spawn's fork point would do: the push below wrote
        // it), so that `before` counts what the spawn itself takes: a refused spawn gives back
        // all of it, but not the snapshot its fork point made of main, which main keeps.
        if libos::process::seal().is_err() {
            return check(false, "sealing main's memory before a spawn");
        }
        let before = frames_and_heap();
        match task::spawn(&[], sleeper) {
            Ok(h) => {
                least_after_spawn = least_after_spawn.min(libos::free_frames());
                held.push(h);
            }
            Err(e) => break (e, before),
        }
        if held.len() == held.capacity() {
            return check(false, "never ran out of memory");
        }
    };
    let free = frames_and_heap();
    println!(
        "spawn refused after {} tasks: {err}; {free} frames free or kernel heap after the refusal, {before_refused} before it, at least {least_after_spawn} free after each spawn (reserve {})",
        held.len(),
        task::SPAWN_RESERVE_FRAMES
    );
    check(
        matches!(err, task::SpawnError::OutOfMemory),
        "the error says out of memory",
    )?;
    check(
        least_after_spawn >= task::SPAWN_RESERVE_FRAMES,
        "every spawn left the reserve alone",
    )?;
    check(
        free == before_refused,
        "the refused spawn took no frame (the kernel heap may keep a page it grew by)",
    )?;
    // A task's own heap keeps off the reserve too: main's growth fails cleanly, changing nothing.
    let mut v: Vec<u8> = Vec::new();
    let r = v.try_reserve_exact(4 << 20);
    let free_now = libos::free_frames();
    println!(
        "try_reserve(4 MiB) in main: {}; {free_now} frames free",
        if r.is_err() { "Err" } else { "Ok" }
    );
    check(
        r.is_err(),
        "main's own heap does not grow into the kernel heap's reserve",
    )?;
    // The kernel heap still takes a 4 MiB block out of the reserve, in one growth: a channel
    // whose queue libos allocates up front in the kernel heap (app code cannot allocate there
    // directly), 64 slots of 64 KiB. (Before tasks were processes, main allocated the block
    // itself; its allocations now go to its own heap, checked above.)
    let heap0 = libos::heap_stats();
    let (big_tx, big_rx) = channel::bounded::<[u8; 64 << 10]>(BIG_SLOTS);
    let heap1 = libos::heap_stats();
    let free1 = libos::free_frames();
    println!(
        "heap grew into the reserve: kernel heap +{} KiB reserved, +{} KiB allocated for a queue of {BIG_SLOTS} x 64 KiB; {free1} frames free",
        (heap1.reserved_bytes - heap0.reserved_bytes) >> 10,
        (heap1.allocated_bytes - heap0.allocated_bytes) >> 10,
    );
    check(
        heap1.allocated_bytes - heap0.allocated_bytes >= BIG_SLOTS << 16,
        "the kernel heap holds the channel's queue",
    )?;
    check(
        free1 < task::SPAWN_RESERVE_FRAMES,
        "the kernel heap took its frames out of the reserve",
    )?;
    check(
        big_tx.try_send([5; 64 << 10]).is_ok()
            && big_rx
                .try_recv()
                .is_ok_and(|v| v.is_some_and(|v| v.iter().all(|&b| b == 5))),
        "a 64 KiB value goes through the queue",
    )?;
    drop((big_tx, big_rx));
    for h in &held {
        h.kill();
    }
    for h in held {
        check(
            h.join() == Err(TaskError::Killed),
            "sleepers end when killed",
        )?;
    }
    println!("spawn-reserve ok");
    Ok(())
}

/// Slots of the channel `spawn-reserve` makes out of the reserve: all of them allocated up front
/// (at most `limits::CHANNEL_PREALLOC` are, 64 now; the check on the heap's growth fails if that
/// shrinks).
const BIG_SLOTS: usize = 64;

fn main_oom() -> Result<(), String> {
    println!("main-oom: allocating 1 GiB");
    let v = alloc::vec![1u8; 1 << 30];
    println!("main-oom: allocated {} bytes", v.len());
    Ok(())
}

fn main() -> Result<(), String> {
    match libos::args().first().map(String::as_str) {
        Some("display-mutex") => display_mutex(),
        Some("display-reenter") => display_reenter(),
        Some("arena-oom") => arena_oom(),
        Some("fragmented") => fragmented(),
        Some("task-oom") => task_oom(),
        Some("spawn-reserve") => spawn_reserve(),
        Some("main-oom") => main_oom(),
        other => Err(alloc::format!("FAIL: unknown subcase {other:?}")),
    }
}
