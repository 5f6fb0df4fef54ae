//! Address spaces from templates on the real MMU (through QEMU's): isolation between spaces,
//! copy-on-write on the first write, read-only regions refusing writes, snapshot, and every
//! frame back at the baseline once everything is dropped. Also prints spawn latency for both
//! share modes (a figure, not a check).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use libos::println;
use libos::space::{Fault, Kind, Space, Template, TemplateBuilder};
use libos::time::Instant;

libos::main!(main);

const DATA: u64 = 0x4000_0000; // 1 GiB slot 1
const DATA_LEN: u64 = 4 << 20;
const CONSTS: u64 = DATA + DATA_LEN;
const ALIAS: u64 = 0x80_0000_0000; // 512 GiB: its own L4 entry

fn check(ok: bool, what: &str) -> Result<(), &'static str> {
    if ok {
        Ok(())
    } else {
        println!("FAIL: {what}");
        Err("check failed")
    }
}

fn byte_at(s: &mut Space, va: u64) -> u8 {
    let mut b = [0u8];
    s.read(va, &mut b).expect("read inside a region");
    b[0]
}

fn build() -> Template {
    TemplateBuilder::new()
        .region("libdata", DATA, DATA_LEN, Kind::Private, |off, page| {
            page.fill((off >> 12) as u8)
        })
        .and_then(|b| {
            b.region("consts", CONSTS, 64 << 10, Kind::ReadOnly, |_, p| {
                p.fill(0xC0)
            })
        })
        .and_then(|b| b.seal())
        .expect("build template")
}

fn median_p99(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
}

fn spawn_latency(t: &Template, mode: libos::space::Mode, n: usize) -> (u64, u64) {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let s = Space::with_mode(&[t], mode).expect("spawn");
        let t1 = Instant::now();
        drop(s);
        samples.push(t1.duration_since(t0).as_nanos() as u64);
    }
    median_p99(samples)
}

fn main() -> Result<(), &'static str> {
    println!("mode {:?}", libos::space::mode());
    // This task's own heap keeps the pages it commits as it grows: grow it once beyond what the
    // checks below allocate (sample vectors, formatting), so it does not grow in between.
    drop(core::hint::black_box(alloc::vec![0u8; 4 << 20]));
    // The kernel heap keeps the chunks it grows by; count them apart from the engine's frames.
    let heap0 = libos::heap_stats().reserved_bytes / 4096;
    // Cached stacks, top tables and the roots of dropped spaces (kept for reuse) go back first,
    // here and before the end count: like with like.
    libos::task::trim_caches();
    let baseline = libos::free_frames();
    {
        let t = build();
        let page = DATA + 0x1000;
        let mut a = Space::new(&[&t]).expect("spawn a");
        let mut b = Space::new(&[&t]).expect("spawn b");
        check(byte_at(&mut a, page) == 1, "a sees the template")?;
        a.write(page, &[0xAA; 16]).expect("a writes");
        b.write(page, &[0xBB; 16]).expect("b writes");
        check(byte_at(&mut a, page) == 0xAA, "a reads its own write")?;
        check(byte_at(&mut b, page) == 0xBB, "b reads its own write")?;
        let mut c = Space::new(&[&t]).expect("spawn c");
        check(
            byte_at(&mut c, page) == 1,
            "a fresh space sees the original",
        )?;
        check(
            byte_at(&mut a, page + 0x1000) == 2,
            "neighbour page still shared and intact",
        )?;
        let st = a.stats();
        println!(
            "isolation ok: a owns {} table(s) after one write ({:?})",
            st.tables_owned, st
        );
        drop(c);

        match a.write(CONSTS, &[1]) {
            Err(Fault::WriteToReadOnly { region, .. }) => {
                check(&*region == "consts", "fault names the region")?
            }
            other => check(false, &alloc::format!("write to read-only gave {other:?}"))?,
        }
        check(byte_at(&mut a, CONSTS) == 0xC0, "read-only region readable")?;
        println!("read-only ok");

        let snap = a.snapshot(&[(DATA, DATA_LEN)]).expect("snapshot");
        let mut d = Space::new(&[&snap]).expect("spawn from snapshot");
        check(
            byte_at(&mut d, page) == 0xAA,
            "snapshot child sees the server's state",
        )?;
        d.write(page, &[0xDD]).expect("d writes");
        check(byte_at(&mut d, page) == 0xDD, "child's private write")?;
        check(
            byte_at(&mut a, page) == 0xAA,
            "server unchanged by the child",
        )?;
        a.write(page, &[0xA1])
            .expect("server writes after snapshot");
        check(
            byte_at(&mut d, page) == 0xDD,
            "child unchanged by the server",
        )?;
        let mut e = Space::new(&[&snap]).expect("spawn e");
        check(byte_at(&mut e, page) == 0xAA, "snapshot itself unchanged")?;
        println!("snapshot ok");

        // Spawn latency, both modes in this boot (figures only).
        let big = TemplateBuilder::new()
            .alias_region(
                "big",
                ALIAS,
                1 << 30,
                Kind::ReadOnly,
                libos::space::PageSize::Size4KiB,
            )
            .and_then(|b| b.seal())
            .expect("1 GiB alias template");
        for (name, tmpl, n_share, n_copy) in [("4 MiB", &t, 500, 200), ("1 GiB", &big, 500, 5)] {
            let (sp50, sp99) = spawn_latency(tmpl, libos::space::Mode::Share, n_share);
            let (cp50, cp99) = spawn_latency(tmpl, libos::space::Mode::Copy, n_copy);
            println!(
                "spawn {name}: share p50 {} ns p99 {} ns (n={n_share}); copy p50 {} ns p99 {} ns (n={n_copy}); copy/share {}x",
                sp50,
                sp99,
                cp50,
                cp99,
                cp50 / sp50.max(1)
            );
        }
    }
    libos::task::trim_caches();
    let heap_growth = libos::heap_stats().reserved_bytes / 4096 - heap0;
    let end = libos::free_frames();
    println!(
        "free frames: baseline {baseline}, after dropping everything {end} + {heap_growth} kept by the kernel heap"
    );
    check(end + heap_growth == baseline, "frames back at baseline")?;
    println!("frames back at baseline");
    println!("ALL OK");
    Ok(())
}
