//! Spawn cost, `Share` vs `Copy`, from 2 MiB to 64 GiB of template; the first write to a
//! `Private` page; page-table bytes per space; a zygote's snapshot, clean and after one write.
//! Host side, over simulated memory (alias-backed templates: one data frame mapped everywhere,
//! so 64 GiB needs no 64 GiB of RAM).
//!
//! `cargo bench -p templates --bench spawn` (add `-- --quick` for fewer iterations).

use std::hint::black_box;
use std::time::{Duration, Instant};
use templates::sim::SimMem;
use templates::*;
use x86_64::VirtAddr;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Templates live at 512 GiB: a whole L4 entry of their own.
const BASE: u64 = 512 * GIB;

fn fmt_size(b: u64) -> String {
    if b >= GIB {
        format!("{} GiB", b / GIB)
    } else {
        format!("{} MiB", b / MIB)
    }
}

fn fmt_dur(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns >= 10_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else if ns >= 10_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

struct Stats {
    p50: Duration,
    p99: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Stats {
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn template(m: &SimMem, size: u64, page: PageSize, alias: x86_64::PhysAddr) -> Template<SimMem> {
    let mut b = TemplateBuilder::new(m);
    let mut spec =
        RegionSpec::new("heap", BASE, size, Kind::Private).backing(Backing::Alias(alias));
    spec.page_size = page;
    b.add(spec).expect("layout");
    b.seal().expect("memory")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let m = SimMem::with_poison(1 << 19, false);
    let alias4k = m.alloc_frame().expect("frame").start_address();
    let alias2m = m.alloc_huge_frame().expect("run").start_address();
    let sizes = [
        2 * MIB,
        16 * MIB,
        128 * MIB,
        GIB,
        4 * GIB,
        16 * GIB,
        64 * GIB,
    ];

    for (page, alias) in [(PageSize::Size4KiB, alias4k), (PageSize::Size2MiB, alias2m)] {
        println!("\n== spawn from one Private template, {page:?} pages (alias-backed) ==");
        println!(
            "{:>8} {:>8} | {:>10} {:>10} {:>9} | {:>10} {:>10} {:>10} | {:>9} {:>10}",
            "size",
            "tables",
            "share p50",
            "share p99",
            "share PT",
            "copy p50",
            "copy p99",
            "copy PT",
            "copy/share",
            "copy drop"
        );
        for &size in &sizes {
            let t = template(&m, size, page, alias);
            let tables = t.stats().tables;
            let share_iters = if quick { 200 } else { 2000 };
            let mut share = Vec::with_capacity(share_iters);
            for _ in 0..share_iters {
                let t0 = Instant::now();
                let s = AddressSpace::new(&m, &[&t], Mode::Share, None).expect("spawn");
                share.push(t0.elapsed());
                drop(black_box(s));
            }
            // Accounting walks the shared tables too: outside the timed loop (it evicts caches).
            let share_pt = AddressSpace::new(&m, &[&t], Mode::Share, None)
                .expect("spawn")
                .stats()
                .page_table_bytes();
            // Copy: as many iterations as fit in ~1.5 s (at least 5).
            let budget = Duration::from_millis(if quick { 300 } else { 1500 });
            let (mut copy, mut drops) = (Vec::new(), Vec::new());
            let mut copy_pt = 0;
            let start = Instant::now();
            while copy.len() < 5 || (start.elapsed() < budget && copy.len() < 2000) {
                let t0 = Instant::now();
                let s = AddressSpace::new(&m, &[&t], Mode::Copy, None).expect("spawn");
                copy.push(t0.elapsed());
                if copy.len() == 1 {
                    copy_pt = s.stats().page_table_bytes();
                }
                let t1 = Instant::now();
                drop(black_box(s));
                drops.push(t1.elapsed());
            }
            let (s, c, d) = (stats(share), stats(copy), stats(drops));
            println!(
                "{:>8} {:>8} | {:>10} {:>10} {:>9} | {:>10} {:>10} {:>10} | {:>9.0}x {:>10}",
                fmt_size(size),
                tables,
                fmt_dur(s.p50),
                fmt_dur(s.p99),
                format!("{} KiB", share_pt as u64 / KIB),
                fmt_dur(c.p50),
                fmt_dur(c.p99),
                format!("{} KiB", copy_pt as u64 / KIB),
                c.p50.as_secs_f64() / s.p50.as_secs_f64(),
                fmt_dur(d.p50),
            );
        }
    }

    println!(
        "\n== first write to a Private template page (fault: unshare + copy), 4 KiB pages, 1 GiB template =="
    );
    let t = template(&m, GIB, PageSize::Size4KiB, alias4k);
    for mode in [Mode::Share, Mode::Copy] {
        let iters = if mode == Mode::Share {
            if quick { 200 } else { 2000 }
        } else {
            20
        };
        let (mut first, mut second) = (Vec::new(), Vec::new());
        let (mut before, mut after) = (0, 0);
        let mut frames = 0;
        for i in 0..iters {
            let last = i == iters - 1;
            let mut s = AddressSpace::new(&m, &[&t], mode, None).expect("spawn");
            if last {
                before = s.stats().page_table_bytes();
            }
            let used = m.frames_in_use();
            let va = VirtAddr::new(BASE + 300 * MIB + 4096 * 7);
            let t0 = Instant::now();
            s.resolve_fault(va, Access::Write).expect("cow").ignore();
            first.push(t0.elapsed());
            frames = m.frames_in_use() - used;
            let t1 = Instant::now();
            s.resolve_fault(va + 4096u64, Access::Write)
                .expect("cow")
                .ignore();
            second.push(t1.elapsed());
            if last {
                after = s.stats().page_table_bytes();
            }
        }
        let (f, sc) = (stats(first), stats(second));
        println!(
            "{mode:?}: first write p50 {} p99 {} ({frames} frames: tables + page); next write in the same L1 p50 {} p99 {}; PT bytes {} KiB -> {} KiB",
            fmt_dur(f.p50),
            fmt_dur(f.p99),
            fmt_dur(sc.p50),
            fmt_dur(sc.p99),
            before as u64 / KIB,
            after as u64 / KIB
        );
    }
    drop(t);

    println!(
        "\n== snapshot of a zygote (Share, spawned from a 4 KiB-page template), its whole L4 entry (incremental: docs/engine.md invariant 12) =="
    );
    println!(
        "{:>8} | {:>12} {:>12} | {:>14} {:>14}",
        "size", "clean p50", "clean p99", "1 write p50", "1 write p99"
    );
    for size in [16 * MIB, GIB, 64 * GIB] {
        let t = template(&m, size, PageSize::Size4KiB, alias4k);
        let mut z = AddressSpace::new(&m, &[&t], Mode::Share, None).expect("spawn");
        let whole = [(VirtAddr::new(BASE), 512 * GIB)];
        let iters = if quick { 200 } else { 2000 };
        let (mut clean, mut dirty) = (Vec::new(), Vec::new());
        for i in 0..iters {
            let t0 = Instant::now();
            let (snap, flush) = z.snapshot(&whole).expect("snapshot");
            clean.push(t0.elapsed());
            flush.ignore();
            drop(black_box(snap));
            // One page written since the last snapshot (a different one each time).
            let va = VirtAddr::new(BASE + (i as u64 * 4096 * 7) % size);
            z.resolve_fault(va, Access::Write).expect("cow").ignore();
            let t1 = Instant::now();
            let (snap, flush) = z.snapshot(&whole).expect("snapshot");
            dirty.push(t1.elapsed());
            flush.ignore();
            drop(black_box(snap));
        }
        let (c, d) = (stats(clean), stats(dirty));
        println!(
            "{:>8} | {:>12} {:>12} | {:>14} {:>14}",
            fmt_size(size),
            fmt_dur(c.p50),
            fmt_dur(c.p99),
            fmt_dur(d.p50),
            fmt_dur(d.p99)
        );
    }

    println!("\n== 2 MiB page: first write splits the leaf and copies 4 KiB ==");
    let t = template(&m, GIB, PageSize::Size2MiB, alias2m);
    let mut first = Vec::new();
    for _ in 0..if quick { 20 } else { 100 } {
        let mut s = AddressSpace::new(&m, &[&t], Mode::Share, None).expect("spawn");
        let t0 = Instant::now();
        s.resolve_fault(VirtAddr::new(BASE + 300 * MIB), Access::Write)
            .expect("cow")
            .ignore();
        first.push(t0.elapsed());
    }
    let f = stats(first);
    println!(
        "Share: first write p50 {} p99 {}",
        fmt_dur(f.p50),
        fmt_dur(f.p99)
    );
}
