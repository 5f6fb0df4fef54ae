//! Tasks as processes, end to end: a zygote warms ordinary Rust data — a `hashbrown::HashMap`
//! of 50,000 `String` pairs, a `Vec<String>`, a static counter — and 2,000 children, each a fork
//! of it, read, update and insert in place and bump the static; every child's reply (its exit
//! code) is checked, and afterwards the zygote's data is unchanged and a fresh child sees the
//! original state. Then: closures that capture heap values, and tasks that panic, fault or are
//! killed with live heap objects leave no frame and no kernel-heap byte behind.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use hashbrown::HashMap;
use libos::println;
use libos::process::Zygote;
use libos::sync::Mutex;
use libos::task::{self, TaskError};

mod requests;

libos::main!(main);

/// Entries of the warm map.
const ENTRIES: u32 = 50_000;
/// Children of the main check.
const CHILDREN: u32 = 2_000;

/// A static every child bumps: each sees its own copy.
static COUNTER: AtomicU64 = AtomicU64::new(7);
/// A static holding heap data (filled by the zygote; children see it in place).
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn check(ok: bool, what: &str) -> Result<(), &'static str> {
    if ok {
        Ok(())
    } else {
        println!("FAIL: {what}");
        Err("check failed")
    }
}

/// The warm state of both zygotes here (this file's and `requests`'s).
struct State {
    map: HashMap<String, String>,
    list: Vec<String>,
}

fn key(i: u32) -> String {
    format!("key-{i}")
}

fn value(i: u32) -> String {
    format!("value-{}", i.wrapping_mul(2_654_435_761) % 1_000_003)
}

/// A state of `entries` map entries and `items` list items.
fn warm_sized(entries: u32, items: u32) -> State {
    let mut map = HashMap::with_capacity(entries as usize);
    for i in 0..entries {
        map.insert(key(i), value(i));
    }
    let list = (0..items).map(|i| format!("item {i}")).collect();
    State { map, list }
}

fn warm() -> State {
    warm_sized(ENTRIES, 1000)
}

/// What child `n` does with the state; its exit code is a checksum the zygote recomputes.
fn child_work(state: &mut State, n: u32) -> i32 {
    // Read: a few lookups.
    let mut sum: u32 = 0;
    for j in 0..10 {
        let i = (n * 7 + j * 4_999) % ENTRIES;
        match state.map.get(&key(i)) {
            Some(v) if *v == value(i) => sum = sum.wrapping_add(v.len() as u32),
            _ => return -1,
        }
    }
    // Update in place and insert: visible only to this child.
    let i = n % ENTRIES;
    state
        .map
        .get_mut(&key(i))
        .expect("present")
        .push_str("-mine");
    state.map.insert(format!("new-{n}"), format!("child {n}"));
    state.list[(n % 1000) as usize].push('!');
    if state.map.len() != ENTRIES as usize + 1 || state.map[&key(i)] != format!("{}-mine", value(i))
    {
        return -2;
    }
    // The static: the zygote's value as of the fork, then this child's own.
    let c = COUNTER.fetch_add(u64::from(n) + 1, Ordering::Relaxed);
    if c != 7 || COUNTER.load(Ordering::Relaxed) != 8 + u64::from(n) {
        return -3;
    }
    let mut notes = NOTES.lock();
    if notes.len() != 3 || notes[2] != "c" {
        return -4;
    }
    notes.push(format!("child {n}"));
    (sum % 10_000) as i32
}

fn expected(state: &State, n: u32) -> i32 {
    let mut sum: u32 = 0;
    for j in 0..10 {
        let i = (n * 7 + j * 4_999) % ENTRIES;
        sum = sum.wrapping_add(state.map[&key(i)].len() as u32);
    }
    (sum % 10_000) as i32
}

fn unchanged(state: &State) -> bool {
    state.map.len() == ENTRIES as usize
        && (0..ENTRIES)
            .step_by(97)
            .all(|i| state.map[&key(i)] == value(i))
        && (0..CHILDREN).all(|n| state.map[&key(n % ENTRIES)] == value(n % ENTRIES))
        && !state.map.contains_key("new-0")
        && state
            .list
            .iter()
            .enumerate()
            .all(|(i, s)| *s == format!("item {i}"))
        && COUNTER.load(Ordering::Relaxed) == 7
}

fn zygote() -> Result<(), &'static str> {
    NOTES.lock().extend(["a", "b", "c"].map(String::from));
    let mut zygote = Zygote::new(warm());
    let heap = libos::process::heap_stats();
    println!(
        "zygote: {} entries, {} KiB of live heap in {} allocations",
        zygote.state().map.len(),
        heap.allocated_bytes / 1024,
        heap.allocation_count
    );
    check(
        heap.allocation_count > 2 * ENTRIES as usize,
        "the map lives in the task's heap",
    )?;
    println!("zygote ok");
    for n in 0..CHILDREN {
        // The child gets the state by reference: its own copy-on-write view of it.
        let h = zygote
            .spawn(&[], move |state| child_work(state, n))
            .map_err(|_| "spawn failed")?;
        let want = expected(zygote.state(), n);
        let got = h.join();
        if got != Ok(want) {
            println!("FAIL: child {n} replied {got:?}, expected Ok({want})");
            return Err("child reply");
        }
    }
    println!("children ok");
    check(
        unchanged(zygote.state()),
        "zygote's map, list and static unchanged",
    )?;
    check(NOTES.lock().len() == 3, "zygote's static Vec unchanged")?;
    println!("zygote unchanged ok");
    let h = zygote
        .spawn(&[], |state| i32::from(!unchanged(state)))
        .map_err(|_| "spawn failed")?;
    check(h.join() == Ok(0), "a fresh child sees the original state")?;
    println!("fresh child ok");
    Ok(())
}

/// Closures that capture heap values: the child sees a copy as of the spawn, the parent keeps
/// its own; the parent's copy of the closure is freed in the parent.
fn captures() -> Result<(), &'static str> {
    let before = libos::process::heap_stats();
    for round in 0..200u32 {
        let words: Vec<String> = (0..50).map(|i| format!("w{round}-{i}")).collect();
        let mut map: HashMap<u32, String> = HashMap::new();
        map.insert(round, String::from("here"));
        let h = task::spawn(&[], move || {
            let mut words = words;
            words.push(String::from("child"));
            let ok = words.len() == 51
                && words[0] == format!("w{round}-0")
                && map.get(&round).is_some_and(|s| s == "here");
            i32::from(ok)
        })
        .map_err(|_| "spawn failed")?;
        check(h.join() == Ok(1), "a child sees what its closure captured")?;
    }
    let after = libos::process::heap_stats();
    check(
        after.allocation_count == before.allocation_count,
        "the parent's copies of captured values were freed",
    )?;
    println!("captures ok");
    // Process memory is not for raw mappings, not even its unused part (nor arenas).
    let gap = 0x7fc0_0000_0000;
    check(
        matches!(
            task::map_private("raw", gap, 4096),
            Err(libos::space::Error::Overlap { .. })
        ),
        "map_private into process memory is refused",
    )?;
    check(
        libos::arena::Arena::scope(gap, 1 << 20, |_| ()).is_err(),
        "an arena in process memory is refused",
    )?;
    println!("process memory is not mappable ok");
    Ok(())
}

/// Tasks that end badly with live heap objects: nothing left behind.
fn leaks(n: u32) -> Result<(), &'static str> {
    let run = |n: u32| -> Result<(), &'static str> {
        for i in 0..n {
            let h = task::spawn(&[], move || {
                let mut v: Vec<String> = Vec::new();
                for j in 0..100 {
                    v.push(format!("garbage {i} {j}"));
                }
                COUNTER.fetch_add(1, Ordering::Relaxed);
                match i % 10 {
                    0 => panic!("planned panic {i} with {} live strings", v.len()),
                    1 => {
                        // A planned fault: a write to an unmapped address.
                        let _ = task::write(0x10_0000_0000, b"x");
                        // SAFETY: none — this is the fault under test; the task ends on it.
                        unsafe { core::ptr::write_volatile(0x10_0000_0000 as *mut u8, 1) };
                        0
                    }
                    2 => loop {
                        task::yield_now();
                    },
                    _ => v.len() as i32,
                }
            })
            .map_err(|_| "spawn failed")?;
            if i % 10 == 2 {
                task::yield_now();
                h.kill();
            }
            let r = h.join();
            let ok = match i % 10 {
                0 => matches!(r, Err(TaskError::Panic(_))),
                1 => matches!(r, Err(TaskError::Fault { .. })),
                2 => r == Err(TaskError::Killed),
                _ => r == Ok(100),
            };
            if !ok {
                println!("FAIL: task {i} ended with {r:?}");
                return Err("task end");
            }
        }
        Ok(())
    };
    run(100)?; // warm caches
    task::trim_caches();
    // The task holds its last snapshot (what the next spawn shares): take it now, at both ends,
    // so both counts include the same one.
    libos::process::seal().map_err(|_| "seal")?;
    let frames0 = libos::free_frames();
    let kheap0 = libos::heap_stats();
    let pheap0 = libos::process::heap_stats();
    run(n)?;
    task::trim_caches();
    libos::process::seal().map_err(|_| "seal")?;
    let frames1 = libos::free_frames();
    let kheap1 = libos::heap_stats();
    let pheap1 = libos::process::heap_stats();
    println!(
        "{n} tasks (10% panic, 10% fault, 10% killed): free frames {frames0} -> {frames1}; kernel heap {} -> {} bytes in {} -> {} allocations; own heap {} -> {} allocations",
        kheap0.allocated_bytes,
        kheap1.allocated_bytes,
        kheap0.allocation_count,
        kheap1.allocation_count,
        pheap0.allocation_count,
        pheap1.allocation_count
    );
    check(
        kheap1.allocation_count == kheap0.allocation_count
            && kheap1.allocated_bytes == kheap0.allocated_bytes,
        "kernel heap back at its baseline",
    )?;
    let heap_growth = (kheap1.reserved_bytes - kheap0.reserved_bytes) / 4096;
    check(
        frames1 + heap_growth == frames0,
        "free frames back at their baseline",
    )?;
    check(
        COUNTER.load(Ordering::Relaxed) == 7,
        "children's static bumps stayed theirs",
    )?;
    println!("leaks ok");
    Ok(())
}

fn main() -> Result<(), &'static str> {
    let args = libos::args();
    println!("share mode {:?}", libos::space::mode());
    match args.first().map(String::as_str) {
        Some("requests") => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
            requests::run(n).map_err(|e| {
                println!("FAIL: {e}");
                "requests"
            })?;
        }
        Some("leak") => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
            leaks(n)?;
        }
        _ => {
            zygote()?;
            captures()?;
            leaks(1_000)?;
        }
    }
    println!("ALL OK");
    Ok(())
}
