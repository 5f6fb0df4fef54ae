//! Hostile but safe app code: each subcase (the first argument) does something an app may do
//! by mistake or on purpose, and checks that libos answers with an error value or ends only the
//! task at fault, instead of freezing or killing the VM.
//!
//! - `display-mutex`: a `Display` impl that locks a contended `sync::Mutex` inside `println!`,
//!   while the holder must print before it releases the lock.
//! - `display-reenter`: a `Display` impl that calls `println!` (and a long line, and the logger).
//! - `arena-oom`: arenas that run full (`try_reserve` errs, a push panics) or outgrow RAM.
//! - `fragmented`: the kernel heap grows by 8 MiB on memory with no 4 MiB physical run left.
//! - `task-oom` / `main-oom`: the kernel heap cannot grow (a spawned task / the main task).
//! - `spawn-reserve`: spawn refuses before it eats the kernel heap's reserve.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

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

static M: Mutex<u32> = Mutex::new(0);
static HELD: AtomicBool = AtomicBool::new(false);

/// Locks `M` while being formatted.
struct LocksMutex;

impl fmt::Display for LocksMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = *M.lock();
        write!(f, "value {v}")
    }
}

fn display_mutex() -> Result<(), String> {
    let holder = task::spawn(&[], || {
        let mut g = M.lock();
        HELD.store(true, Ordering::Release);
        // Let main start its println! while we hold the lock; then print ourselves.
        task::yield_now();
        println!("holder: printing while holding the mutex");
        *g = 42;
        drop(g);
        0
    })
    .map_err(|e| alloc::format!("FAIL: spawn: {e}"))?;
    while !HELD.load(Ordering::Acquire) {
        task::yield_now();
    }
    // Formatting waits for the holder, which can only release after its own println!.
    println!("display: {}", LocksMutex);
    check(holder.join() == Ok(0), "holder task ended normally")?;
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

fn arena_oom() -> Result<(), String> {
    use allocator_api2::vec::Vec as AVec;
    let spawn = |f: fn() -> i32| task::spawn(&[], f).map_err(|e| alloc::format!("FAIL: {e}"));

    // A full arena answers try_reserve with an error; the task goes on using it.
    let t = spawn(|| {
        let arena = libos::arena::Arena::new(0x10_0000_0000, 1 << 20).expect("map arena");
        let mut v: AVec<u8, _> = AVec::new_in(&arena);
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
    })?;
    check(t.join() == Ok(0), "the task with a full arena went on")?;

    // A plain push into a full arena is an allocation failure: that task panics, alone.
    let t = spawn(|| {
        let arena = libos::arena::Arena::new(0x10_0000_0000, 1 << 20).expect("map arena");
        let mut v: AVec<u64, _> = AVec::new_in(&arena);
        for i in 0..1_000_000u64 {
            v.push(i);
        }
        3
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
    task::trim_caches();
    let heap0 = libos::heap_stats().reserved_bytes / 4096;
    let before = libos::free_frames();
    let t = spawn(|| {
        let arena = libos::arena::Arena::new(0x10_0000_0000, 1 << 30).expect("map arena");
        let mut blocks = AVec::new_in(&arena);
        loop {
            let mut b: AVec<u8, _> = AVec::new_in(&arena);
            if b.try_reserve_exact(4000).is_err() || blocks.try_reserve(1).is_err() {
                return 4; // the arena itself ran out first: not what this case is about
            }
            b.push(1);
            blocks.push(b);
        }
    })?;
    let r = t.join();
    println!("arena beyond RAM: task ended: {r:?}");
    check(
        matches!(&r, Err(TaskError::Fault { .. })),
        "the task ran out of RAM in its arena",
    )?;
    task::trim_caches();
    let heap_growth = libos::heap_stats().reserved_bytes / 4096 - heap0;
    let after = libos::free_frames();
    println!(
        "free frames before {before}, after {after} (+{heap_growth} taken by the kernel heap)"
    );
    check(
        after + heap_growth == before,
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

    // A task whose address space exists before the heap grows must see the new heap pages (the
    // kernel half is one live shared subtree): main grows the heap by 8 MiB and frees it, then
    // the older task allocates those pages itself and touches every one. (Only plain data
    // crosses a channel, so the task cannot be sent main's vector.)
    let (tx, rx) = libos::channel::bounded::<u8>(1);
    let reader = libos::task::spawn_with(&[], rx, |rx| {
        let go = rx.recv().expect("main says go");
        let v = alloc::vec![go; 8 << 20];
        v.iter().step_by(4096).map(|&b| i32::from(b)).sum()
    })
    .map_err(|e| alloc::format!("FAIL: spawn: {e}"))?;
    let mut v = alloc::vec![0u8; 8 << 20];
    check(
        v.len() == 8 << 20 && v.iter().step_by(4096).all(|&b| b == 0),
        "8 MiB zeroed vector",
    )?;
    for b in v.iter_mut().step_by(4096) {
        *b = 1;
    }
    drop(v);
    tx.send(1).map_err(|_| String::from("FAIL: reader gone"))?;
    check(
        reader.join() == Ok(2048),
        "a task spawned before the growth uses the new heap pages",
    )?;
    println!("vec![0; 8 MiB] ok, seen by an older task");
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
    let t = task::spawn(&[], || {
        let v = alloc::vec![1u8; 1 << 30];
        i32::from(v[12345])
    })
    .map_err(|e| alloc::format!("FAIL: {e}"))?;
    match t.join() {
        Err(TaskError::Panic(m)) => println!("task-oom: task panicked: {m}"),
        other => check(false, &alloc::format!("expected a panic, got {other:?}"))?,
    }
    // A failed growth in main is an error value, and leaves the heap and RAM as they were.
    task::trim_caches();
    let (heap0, free0) = (libos::heap_stats(), libos::free_frames());
    let mut w: Vec<u8> = Vec::new();
    let r = w.try_reserve(1 << 30);
    let (heap1, free1) = (libos::heap_stats(), libos::free_frames());
    println!(
        "try_reserve(1 GiB) in main: {}; free frames {free0} -> {free1}, heap {heap0:?} -> {heap1:?}",
        if r.is_err() { "Err" } else { "Ok" }
    );
    check(r.is_err(), "try_reserve beyond RAM fails")?;
    check(
        heap0 == heap1 && free0 == free1,
        "a failed growth changes neither the heap nor the free frames",
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
    // is touched, so that the heap can then still grow by 4 MiB. (The handles' Vec is allocated
    // up front: the kernel heap growing for it would use the reserve legitimately.)
    let mut held = Vec::with_capacity(100_000);
    let err = loop {
        let sleeper = || {
            task::sleep(core::time::Duration::from_secs(3600));
            0
        };
        match task::spawn(&[], sleeper) {
            Ok(h) => held.push(h),
            Err(e) => break e,
        }
        if held.len() == held.capacity() {
            return check(false, "never ran out of memory");
        }
    };
    let free = libos::free_frames();
    println!(
        "spawn refused after {} tasks: {err}; {free} frames free (reserve {})",
        held.len(),
        task::SPAWN_RESERVE_FRAMES
    );
    check(
        matches!(err, task::SpawnError::OutOfMemory),
        "the error says out of memory",
    )?;
    check(
        free >= task::SPAWN_RESERVE_FRAMES,
        "spawn left the reserve alone",
    )?;
    let mut v: Vec<u8> = Vec::new();
    // 4 MiB of heap pages, less what talc needs around the block.
    check(
        v.try_reserve_exact((4 << 20) - 8192).is_ok(),
        "the kernel heap grows by 4 MiB out of the reserve",
    )?;
    v.resize((4 << 20) - 8192, 5);
    println!("heap grew into the reserve: {} bytes", v.len());
    drop(v);
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
