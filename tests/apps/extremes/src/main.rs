//! Extreme arguments at every public libos entry point that takes an address, length, size,
//! count or duration: 0, 1, `u64::MAX`, non-canonical, unaligned, `va + len` wrapping, lengths
//! beyond RAM, `Duration::MAX`, huge counts. Each call must answer with the exact error (or the
//! documented behaviour) — no panic, no overflow, nothing truncated into another address — and
//! afterwards the system must still work (spawn + join) with every frame back at the baseline.
//! `docs/guide.md` ("Limits and errors") lists the rules checked here.
#![no_std]
#![no_main]

extern crate alloc;

use core::fmt::Debug;
use core::time::Duration;

use libos::channel::{self, TrySendError};
use libos::net::{MAX_BACKLOG, NetError, TcpListener, UdpSocket};
use libos::println;
use libos::shared::SharedHeap;
use libos::space::{Error, Fault, ImageSection, Kind, PageSize, Space, TemplateBuilder};
use libos::task::{self, Builder, MAX_STACK, SpawnError, TaskError};
use libos::time::{self, Instant};

libos::main!(main);

/// One past the last lower-half address.
const HALF: u64 = 1 << 47;
/// The address of the issue: bit 48 set; it used to be mapped at 0x4000_0000.
const NON_CANONICAL: u64 = 0x1_0000_4000_0000;
/// The first kernel-half address.
const KERNEL: u64 = 0xffff_8000_0000_0000;
const DATA: u64 = 0x4000_0000;
const PAGE: u64 = 4096;

type Check = Result<(), &'static str>;

fn eq<T: PartialEq + Debug>(got: T, want: T, what: &str) -> Check {
    if got == want {
        Ok(())
    } else {
        println!("FAIL: {what}: got {got:?}, want {want:?}");
        Err("check failed")
    }
}

fn check(ok: bool, what: &str) -> Check {
    eq(ok, true, what)
}

/// An error's message names the bad address.
fn names(e: &Error, addr: u64) -> Check {
    let m = alloc::format!("{e}");
    check(
        m.contains(&alloc::format!("{addr:#x}")),
        "message names the address",
    )
}

fn builder_err(r: Result<TemplateBuilder, Error>) -> Option<Error> {
    r.err()
}

fn templates() -> Check {
    let mut filled = 0u32;
    let bad: [(u64, u64, Error); 9] = [
        (
            NON_CANONICAL,
            PAGE,
            Error::NonCanonical {
                addr: NON_CANONICAL,
            },
        ),
        (KERNEL, PAGE, Error::NotLowerHalf { addr: KERNEL }),
        (u64::MAX, 1, Error::NotLowerHalf { addr: u64::MAX }),
        (HALF, PAGE, Error::NonCanonical { addr: HALF }),
        (DATA, 0, Error::Empty),
        (DATA + 1, PAGE, Error::Misaligned { addr: DATA + 1 }),
        (HALF - PAGE, 2 * PAGE, Error::NotLowerHalf { addr: HALF }),
        (PAGE, u64::MAX, Error::NotLowerHalf { addr: HALF }),
        // 64 TiB: more than this machine's RAM, refused before a frame is spent.
        (DATA, 1 << 46, Error::OutOfFrames),
    ];
    for (start, len, want) in bad {
        let r = TemplateBuilder::new().region("r", start, len, Kind::Private, |_, _| filled += 1);
        let e = builder_err(r);
        eq(e.clone(), Some(want), "TemplateBuilder::region")?;
        if let Some(e @ (Error::NonCanonical { addr } | Error::NotLowerHalf { addr })) = &e {
            names(e, *addr)?;
        }
    }
    eq(filled, 0, "no page filled for a refused region")?;
    // The truncation of the issue: nothing may appear at 0x4000_0000 after a refused region.
    let t = TemplateBuilder::new()
        .region("ok", 0x8000_0000, 1, Kind::ReadOnly, |_, p| p.fill(7))
        .and_then(|b| b.seal())
        .map_err(|_| "template")?;
    let h = task::spawn(&[&t], || {
        let mut b = [0u8; 2];
        let unmapped = task::read(DATA, &mut b[..1]) == Err(Fault::Unmapped { addr: DATA });
        // `len = 1` was rounded up to one whole page.
        let whole = task::read(0x8000_0000 + PAGE - 2, &mut b).is_ok() && b == [7, 7];
        i32::from(unmapped) + 2 * i32::from(whole)
    })
    .map_err(|_| "spawn")?;
    eq(
        h.join(),
        Ok(3),
        "nothing at the truncated address; len 1 is one page",
    )?;
    // The last page of the lower half is fine.
    let top = TemplateBuilder::new().region("top", HALF - PAGE, PAGE, Kind::Private, |_, _| {});
    check(top.is_ok(), "region on the last lower-half page")?;
    drop(top);
    eq(
        builder_err(TemplateBuilder::new().blob("b", NON_CANONICAL, Kind::ReadOnly, b"x")),
        Some(Error::NonCanonical {
            addr: NON_CANONICAL,
        }),
        "blob at a non-canonical address",
    )?;
    check(
        TemplateBuilder::new()
            .blob("empty", DATA, Kind::ReadOnly, b"")
            .and_then(|b| b.seal())
            .is_ok(),
        "an empty blob is one zeroed page",
    )?;
    eq(
        builder_err(TemplateBuilder::new().image_section("t", NON_CANONICAL, ImageSection::Text)),
        Some(Error::NonCanonical {
            addr: NON_CANONICAL,
        }),
        "image_section at a non-canonical address",
    )?;
    eq(
        builder_err(TemplateBuilder::new().image_section("t", KERNEL, ImageSection::Rodata)),
        Some(Error::NotLowerHalf { addr: KERNEL }),
        "image_section in the kernel half",
    )?;
    let alias = |start, len, size| {
        builder_err(TemplateBuilder::new().alias_region("a", start, len, Kind::Private, size))
    };
    eq(
        alias(NON_CANONICAL, PAGE, PageSize::Size4KiB),
        Some(Error::NonCanonical {
            addr: NON_CANONICAL,
        }),
        "alias_region non-canonical",
    )?;
    eq(
        alias(DATA, 0, PageSize::Size4KiB),
        Some(Error::Empty),
        "alias_region len 0",
    )?;
    eq(
        alias(DATA, u64::MAX, PageSize::Size4KiB),
        Some(Error::Misaligned { addr: DATA }),
        "alias_region len u64::MAX (not a page multiple)",
    )?;
    eq(
        alias(DATA, !0xfff, PageSize::Size4KiB),
        Some(Error::NotLowerHalf { addr: HALF }),
        "alias_region wrapping",
    )?;
    // 64 TiB of 4 KiB (or 2 MiB) pages needs more page tables than this machine has frames.
    eq(
        alias(0x1000_0000_0000, 1 << 46, PageSize::Size4KiB),
        Some(Error::OutOfFrames),
        "alias_region of 64 TiB, 4 KiB pages",
    )?;
    eq(
        alias(0x1000_0000_0000, 1 << 46, PageSize::Size2MiB),
        Some(Error::OutOfFrames),
        "alias_region of 64 TiB, 2 MiB pages",
    )?;
    eq(
        alias(DATA + PAGE, 2 << 20, PageSize::Size2MiB),
        Some(Error::Misaligned { addr: DATA + PAGE }),
        "alias_region 2 MiB pages at a 4 KiB boundary",
    )?;
    println!("templates ok");
    Ok(())
}

fn shared_heap() -> Check {
    let bad: [(u64, u64, Error); 7] = [
        (
            NON_CANONICAL,
            PAGE,
            Error::NonCanonical {
                addr: NON_CANONICAL,
            },
        ),
        (KERNEL, PAGE, Error::NotLowerHalf { addr: KERNEL }),
        (0x2_0000_0000, 0, Error::Empty),
        (
            0x2_0000_0001,
            PAGE,
            Error::Misaligned {
                addr: 0x2_0000_0001,
            },
        ),
        (0x2_0000_0000, u64::MAX, Error::NotLowerHalf { addr: HALF }),
        (HALF - PAGE, 2 * PAGE, Error::NotLowerHalf { addr: HALF }),
        (0x2_0000_0000, 1 << 46, Error::OutOfFrames),
    ];
    for (start, len, want) in bad {
        eq(
            SharedHeap::new("h", start, len).err(),
            Some(want),
            "SharedHeap::new",
        )?;
    }
    // One byte is one page; every pointer it hands out is one this task can use.
    let heap = SharedHeap::new("h", 0x2_0000_0000, 1).map_err(|_| "shared heap")?;
    eq(heap.stats().capacity, PAGE as usize, "1 byte is one page")?;
    let alloc = heap.allocator();
    let t = heap.template();
    let h = task::spawn(&[&t], move || {
        let mut v = libos::shared::SharedVec::new_in(alloc);
        v.push(0x5eed_u64);
        let p = v.with(|s| s.as_ptr() as u64);
        i32::from((0x2_0000_0000..0x2_0000_1000).contains(&p) && v.get(0) == Some(0x5eed))
    })
    .map_err(|_| "spawn")?;
    eq(h.join(), Ok(1), "shared-heap pointer in the heap's range")?;
    println!("shared heap ok");
    Ok(())
}

fn space() -> Check {
    let mut s = Space::new(&[]).map_err(|_| "space")?;
    let mut b = [0u8; 5];
    eq(
        s.read(NON_CANONICAL, &mut b),
        Err(Fault::NotLowerHalf {
            addr: NON_CANONICAL,
        }),
        "Space::read non-canonical",
    )?;
    eq(
        s.read(u64::MAX - 1, &mut b),
        Err(Fault::NotLowerHalf { addr: u64::MAX - 1 }),
        "Space::read wrapping",
    )?;
    eq(
        s.write(HALF - 1, &[1, 2]),
        Err(Fault::NotLowerHalf { addr: HALF }),
        "Space::write across the lower half's end",
    )?;
    eq(
        s.write(0x1000, &[1]),
        Err(Fault::Unmapped { addr: 0x1000 }),
        "Space::write unmapped",
    )?;
    eq(s.read(0, &mut []), Ok(()), "Space::read of nothing at 0")?;
    eq(s.write(0, &[]), Ok(()), "Space::write of nothing at 0")?;
    eq(
        s.snapshot(&[(NON_CANONICAL, PAGE)]).err(),
        Some(Error::NonCanonical {
            addr: NON_CANONICAL,
        }),
        "Space::snapshot non-canonical",
    )?;
    eq(
        s.snapshot(&[(KERNEL, PAGE)]).err(),
        Some(Error::NotLowerHalf { addr: KERNEL }),
        "Space::snapshot kernel half",
    )?;
    eq(
        s.snapshot(&[(DATA, !0xfff)]).err(),
        Some(Error::NotLowerHalf { addr: HALF }),
        "Space::snapshot wrapping",
    )?;
    eq(
        s.snapshot(&[(DATA, 0)]).err(),
        Some(Error::Empty),
        "Space::snapshot len 0",
    )?;
    // A copy larger than the 64 KiB bounce buffer, across two regions, straddling pages.
    let t = TemplateBuilder::new()
        .region("a", DATA, 128 << 10, Kind::Private, |_, _| {})
        .and_then(|b| b.region("b", DATA + (128 << 10), 128 << 10, Kind::Private, |_, _| {}))
        .and_then(|b| b.seal())
        .map_err(|_| "template")?;
    let mut s = Space::new(&[&t]).map_err(|_| "space")?;
    let data: alloc::vec::Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    eq(s.write(DATA + 100, &data), Ok(()), "200 KB write")?;
    let mut back = alloc::vec![0u8; data.len()];
    eq(s.read(DATA + 100, &mut back), Ok(()), "200 KB read")?;
    check(back == data, "200 KB read back as written")?;
    println!("space ok");
    Ok(())
}

/// `task::read`/`write`/`map_private`/`snapshot`, in a task of its own.
fn task_memory() -> Result<i32, &'static str> {
    let mut b = [0u8; 5];
    eq(
        task::read(NON_CANONICAL, &mut b),
        Err(Fault::NotLowerHalf {
            addr: NON_CANONICAL,
        }),
        "task::read non-canonical",
    )?;
    eq(
        task::read(u64::MAX - 1, &mut b),
        Err(Fault::NotLowerHalf { addr: u64::MAX - 1 }),
        "task::read wrapping",
    )?;
    eq(
        task::write(KERNEL, &b),
        Err(Fault::NotLowerHalf { addr: KERNEL }),
        "task::write kernel half",
    )?;
    eq(task::read(0, &mut []), Ok(()), "task::read of nothing")?;
    eq(task::write(0, &[]), Ok(()), "task::write of nothing")?;
    let bad: [(u64, u64, Error); 8] = [
        (
            NON_CANONICAL,
            PAGE,
            Error::NonCanonical {
                addr: NON_CANONICAL,
            },
        ),
        (KERNEL, PAGE, Error::NotLowerHalf { addr: KERNEL }),
        (u64::MAX, PAGE, Error::NotLowerHalf { addr: u64::MAX }),
        (DATA, 0, Error::Empty),
        (DATA + 1, PAGE, Error::Misaligned { addr: DATA + 1 }),
        (DATA, 1, Error::Misaligned { addr: DATA }),
        (HALF - PAGE, 2 * PAGE, Error::NotLowerHalf { addr: HALF }),
        (DATA, !0xfff, Error::NotLowerHalf { addr: HALF }),
    ];
    for (va, len, want) in bad {
        eq(
            task::map_private("x", va, len),
            Err(want),
            "task::map_private",
        )?;
    }
    // Demand-zero memory beyond RAM is a reservation: mapping 64 TiB costs no frame, and only
    // touched pages get one.
    eq(
        task::map_private("huge", 0x1000_0000_0000, 1 << 46),
        Ok(()),
        "task::map_private of 64 TiB demand-zero",
    )?;
    eq(
        task::write(0x1000_0000_0000 + (1 << 45), b"x"),
        Ok(()),
        "a write in the middle of it",
    )?;
    eq(
        task::snapshot(&[(NON_CANONICAL, PAGE)]).err(),
        Some(Error::NonCanonical {
            addr: NON_CANONICAL,
        }),
        "task::snapshot non-canonical",
    )?;
    eq(
        task::snapshot(&[(KERNEL, PAGE)]).err(),
        Some(Error::NotLowerHalf { addr: KERNEL }),
        "task::snapshot kernel half",
    )?;
    Ok(0)
}

fn stack_sizes() -> Check {
    for bytes in [u64::MAX, MAX_STACK + 1] {
        eq(
            Builder::new().stack_size(bytes).spawn(&[], || 0).err(),
            Some(SpawnError::StackTooLarge {
                requested: bytes,
                max: MAX_STACK,
            }),
            "stack_size too large",
        )?;
    }
    for bytes in [0, 1, MAX_STACK] {
        let h = Builder::new()
            .stack_size(bytes)
            .spawn(&[], || 7)
            .map_err(|_| "spawn with an extreme stack size")?;
        eq(h.join(), Ok(7), "task with stack_size 0 / 1 / MAX_STACK")?;
    }
    println!("stack sizes ok");
    Ok(())
}

fn time_and_sleep() -> Check {
    eq(
        time::duration_to_cycles(Duration::MAX),
        u64::MAX,
        "Duration::MAX in cycles saturates",
    )?;
    check(
        time::cycles_to_duration(u64::MAX) > Duration::from_secs(100 * 365 * 24 * 3600 / 1000),
        "u64::MAX cycles is a long time, not a wrapped short one",
    )?;
    let now = Instant::now();
    eq(
        now.checked_add(Duration::MAX),
        None,
        "Instant + Duration::MAX",
    )?;
    eq(
        now.checked_sub(Duration::MAX),
        None,
        "Instant - Duration::MAX",
    )?;
    check(
        now.checked_add(Duration::from_millis(1))
            .is_some_and(|t| t > now),
        "Instant + 1 ms",
    )?;
    eq(
        now.duration_since(Instant::now()),
        Duration::ZERO,
        "duration_since a later instant is zero",
    )?;
    task::sleep(Duration::ZERO);
    task::sleep(Duration::from_nanos(1));
    // Sleeping "forever" must not overflow the deadline: the sleeper stays asleep until killed.
    let forever = task::spawn(&[], || {
        task::sleep(Duration::MAX);
        1
    })
    .map_err(|_| "spawn sleeper")?;
    for _ in 0..3 {
        task::yield_now();
    }
    check(!forever.is_finished(), "sleep(Duration::MAX) still asleep")?;
    forever.kill();
    eq(forever.join(), Err(TaskError::Killed), "killed sleeper")?;
    let cal = time::tsc_calibration();
    check(
        cal.hz == time::tsc_hz() && cal.hz > 0,
        "calibration accessor",
    )?;
    println!("TSC calibration: {cal} ({:?})", cal.method);
    println!("time ok");
    Ok(())
}

fn channels() -> Check {
    // Any capacity is accepted without reserving memory for it.
    let (tx, rx) = channel::bounded::<u64>(usize::MAX);
    for i in 0..1000 {
        tx.try_send(i)
            .map_err(|_| "send into an unbounded channel")?;
    }
    eq(rx.len(), 1000, "1000 queued")?;
    eq(rx.try_recv(), Ok(Some(0)), "first out")?;
    let (tx, rx) = channel::bounded::<u8>(0);
    eq(tx.try_send(1), Ok(()), "cap 0 holds one")?;
    eq(tx.try_send(2), Err(TrySendError::Full(2)), "cap 0 is cap 1")?;
    eq(rx.recv(), Some(1), "recv")?;
    println!("channels ok");
    Ok(())
}

fn arena() -> Result<i32, &'static str> {
    use libos::arena::Arena;
    let open = |va, len| Arena::scope(va, len, |_| ()).err();
    let too_small = |len| match open(0x10_0000_0000, len) {
        Some(Error::TooSmall { len: l, min }) => l == len && min > PAGE,
        _ => false,
    };
    check(too_small(0), "Arena::scope len 0")?;
    check(too_small(1), "Arena::scope len 1")?;
    check(too_small(PAGE), "Arena::scope len 4096")?;
    eq(
        open(NON_CANONICAL, 1 << 20),
        Some(Error::NonCanonical {
            addr: NON_CANONICAL,
        }),
        "Arena::scope non-canonical",
    )?;
    eq(
        open(HALF - PAGE, 1 << 20),
        Some(Error::NotLowerHalf { addr: HALF }),
        "Arena::scope across the lower half's end",
    )?;
    eq(
        open(0x10_0000_0000, u64::MAX),
        Some(Error::Misaligned {
            addr: 0x10_0000_0000,
        }),
        "Arena::scope len u64::MAX",
    )?;
    let n = Arena::scope(0x10_0000_0000, 64 << 10, |a| {
        let mut v = allocator_api2::vec::Vec::new_in(a);
        v.extend_from_slice(&[1u8; 100]);
        v.len()
    })
    .map_err(|_| "a small arena")?;
    eq(n, 100, "arena works")?;
    Ok(0)
}

fn net_arguments() -> Check {
    // Checked before the network is (this boot has no NIC).
    eq(
        TcpListener::bind_with_backlog(80, 0).err(),
        Some(NetError::InvalidInput("backlog 0")),
        "backlog 0",
    )?;
    for backlog in [MAX_BACKLOG + 1, usize::MAX] {
        eq(
            TcpListener::bind_with_backlog(80, backlog).err(),
            Some(NetError::InvalidInput("backlog above MAX_BACKLOG (256)")),
            "huge backlog",
        )?;
    }
    eq(
        TcpListener::bind(0).err(),
        Some(NetError::InvalidInput("TCP port 0")),
        "TCP port 0",
    )?;
    eq(
        UdpSocket::bind(0).err(),
        Some(NetError::InvalidInput("UDP port 0")),
        "UDP port 0",
    )?;
    eq(
        TcpListener::bind_with_backlog(u16::MAX, MAX_BACKLOG).err(),
        Some(NetError::NotInitialized),
        "port 65535, largest backlog: only the missing network is refused",
    )?;
    println!("net arguments ok");
    Ok(())
}

fn in_task(f: fn() -> Result<i32, &'static str>, what: &str) -> Check {
    let h = task::spawn(&[], move || f().unwrap_or(1)).map_err(|_| "spawn")?;
    eq(h.join(), Ok(0), what)
}

fn main() -> Result<(), &'static str> {
    println!("mode {:?}", libos::space::mode());
    // Warm the stack cache, the kernel heap and this task's own heap, then take the baseline.
    // Main is a zygote: it holds the snapshot of its process memory that its last spawn (or
    // `seal`) took, so the baseline and the end are both measured right after a `seal`, each
    // including one such snapshot; its heap keeps the pages it committed, counted like the
    // kernel heap's.
    task::spawn(&[], || 0).map_err(|_| "spawn")?.join().ok();
    drop(core::hint::black_box(alloc::vec![0u8; 1000]));
    task::trim_caches();
    let heap0 = libos::heap_stats().reserved_bytes / 4096;
    let pheap0 = libos::process::heap_stats().reserved_bytes / 4096;
    libos::process::seal().map_err(|_| "seal")?;
    let baseline = libos::free_frames();

    templates()?;
    shared_heap()?;
    space()?;
    in_task(task_memory, "task memory checks")?;
    println!("task memory ok");
    stack_sizes()?;
    time_and_sleep()?;
    channels()?;
    in_task(arena, "arena checks")?;
    println!("arena ok");
    net_arguments()?;

    // The system goes on: a task runs and ends normally, and nothing leaked.
    let t = TemplateBuilder::new()
        .region("after", DATA, 64 << 10, Kind::Private, |off, p| {
            p.fill((off / PAGE) as u8)
        })
        .and_then(|b| b.seal())
        .map_err(|_| "template after the extremes")?;
    let h = task::spawn(&[&t], || {
        let mut b = [0u8];
        if task::read(DATA + 3 * PAGE, &mut b).is_err() || task::write(DATA, b"w").is_err() {
            return -1;
        }
        i32::from(b[0])
    })
    .map_err(|_| "spawn after the extremes")?;
    eq(h.join(), Ok(3), "spawn + join after the extremes")?;
    drop(t);
    println!("still works ok");
    task::trim_caches();
    let heap_growth = libos::heap_stats().reserved_bytes / 4096 - heap0;
    let pheap_growth = libos::process::heap_stats().reserved_bytes / 4096 - pheap0;
    libos::process::seal().map_err(|_| "seal")?;
    let end = libos::free_frames();
    println!(
        "free frames: baseline {baseline}, at the end {end} + {heap_growth} kept by the kernel heap + {pheap_growth} by main's own heap"
    );
    eq(
        end + heap_growth + pheap_growth,
        baseline,
        "frames back at baseline",
    )?;
    println!("frames back at baseline");
    println!("ALL OK");
    Ok(())
}
