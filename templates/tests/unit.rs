//! One test (or a few) per operation, each checking behaviour through the software MMU.

mod common;

use common::*;
use templates::sim::{CpuFault, SimMem, SoftMmu};
use templates::*;
use x86_64::structures::paging::page_table::PageTableEntry;
use x86_64::structures::paging::{PageTableFlags, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

const GIB: u64 = 1 << 30;
const BASE: u64 = GIB; // slot 1

fn va(x: u64) -> VirtAddr {
    VirtAddr::new(x)
}

fn mem() -> SimMem {
    SimMem::new(1 << 20)
}

/// A template with code (RX, read-only), data (Private RW), a shared heap, 3 pages each.
fn small_template(m: &SimMem) -> Template<SimMem> {
    let mut b = TemplateBuilder::new(m);
    b.add(RegionSpec::new("libcode", BASE, 3 * 4096, Kind::ReadOnly).exec())
        .unwrap();
    b.add(RegionSpec::new(
        "libdata",
        BASE + 0x10_0000,
        3 * 4096,
        Kind::Private,
    ))
    .unwrap();
    b.add(RegionSpec::new(
        "shheap",
        BASE + 0x40_0000,
        3 * 4096,
        Kind::Shared,
    ))
    .unwrap();
    b.seal().unwrap()
}

fn both_modes() -> [Mode; 2] {
    [Mode::Share, Mode::Copy]
}

#[test]
fn write_to_private_template_page_faults_then_succeeds_and_is_private() {
    for mode in both_modes() {
        let m = mem();
        let t = small_template(&m);
        let fp = template_fingerprint(&m, &t);
        let mut a = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        let mut b = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        let mmu = SoftMmu::new(&m);
        let x = BASE + 0x10_0000 + 8;
        // Before the unshare the CPU raises a write-protect fault on a present page.
        let f = mmu.write_u64(a.root(), x, 7).unwrap_err();
        assert_eq!(
            f,
            CpuFault {
                addr: x,
                present: true,
                write: true,
                fetch: false
            }
        );
        // Reads work without any fault.
        assert_eq!(mmu.read_u64(a.root(), x).unwrap(), 0);
        let flush = a.resolve_fault(va(x), Access::Write).unwrap();
        assert_eq!(flush, Flush::Page(va(BASE + 0x10_0000)));
        mmu.write_u64(a.root(), x, 7).unwrap();
        assert_eq!(mmu.read_u64(a.root(), x).unwrap(), 7);
        assert_eq!(
            mmu.read_u64(b.root(), x).unwrap(),
            0,
            "isolation ({mode:?})"
        );
        write_u64(&mut b, &m, x, 9).unwrap();
        assert_eq!(read_u64(&mut a, &m, x).unwrap(), 7);
        assert_eq!(read_u64(&mut b, &m, x).unwrap(), 9);
        assert_eq!(template_fingerprint(&m, &t), fp, "template never written");
        check_counts(&m, &[&a, &b], &[&t], &[]);
        drop((a, b, t));
        assert_eq!(m.frames_in_use(), 0);
    }
}

#[test]
fn shared_region_writes_visible_everywhere() {
    for mode in both_modes() {
        let m = mem();
        let t = small_template(&m);
        let mut a = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        let mut b = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
        let x = BASE + 0x40_0000 + 4096 + 16;
        write_u64(&mut a, &m, x, 42).unwrap();
        assert_eq!(read_u64(&mut b, &m, x).unwrap(), 42);
        // No unshare was needed: the page is writable in the template.
        assert_eq!(a.stats().private_pages, 0);
    }
}

#[test]
fn unshare_copies_exactly_l3_l2_l1_and_one_page() {
    let m = mem();
    let mut b = TemplateBuilder::new(&m);
    // 4 MiB: two L1 tables under one L2.
    b.add(RegionSpec::new("data", BASE, 2 * MIB2, Kind::Private))
        .unwrap();
    let t = b.seal().unwrap();
    let mut a = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
    let s0 = a.stats();
    assert_eq!(s0.tables_owned, 1, "share: only the root is owned");
    assert_eq!(
        s0.shared_attachments, 1,
        "one L4 entry attaches the template"
    );
    assert_eq!(s0.page_table_bytes(), 4096);
    let before = m.frames_in_use();
    write_u64(&mut a, &m, BASE + 5 * 4096, 1).unwrap();
    let s1 = a.stats();
    assert_eq!(s1.tables_owned, 4, "root + L3 + L2 + L1 copies");
    assert_eq!(
        m.frames_in_use() - before,
        4,
        "3 table copies + 1 page copy"
    );
    assert_eq!(s1.private_pages, 1);
    // The other L1 (second 2 MiB) is still the template's.
    let l2 = {
        let l3 = frame(entry(&m, a.root(), 0) & ADDR);
        frame(entry(&m, l3, 1) & ADDR)
    };
    let tl2 = {
        let l3 = frame(entry(&m, t.root(), 0) & ADDR);
        frame(entry(&m, l3, 1) & ADDR)
    };
    assert_ne!(l2, tl2);
    assert_ne!(
        entry(&m, l2, 0) & ADDR,
        entry(&m, tl2, 0) & ADDR,
        "L1 #0 copied"
    );
    assert_eq!(
        entry(&m, l2, 1) & ADDR,
        entry(&m, tl2, 1) & ADDR,
        "L1 #1 still shared"
    );
    // A second write in the same L1 copies only the page.
    let before = m.frames_in_use();
    write_u64(&mut a, &m, BASE + 6 * 4096, 1).unwrap();
    assert_eq!(m.frames_in_use() - before, 1);
    check_counts(&m, &[&a], &[&t], &[]);
}

#[test]
fn cow_takes_over_a_frame_no_one_else_references() {
    let m = mem();
    let mut a = AddressSpace::new(&m, &[], Mode::Share, None).unwrap();
    a.map(va(BASE), 4096, Perm::RW, "heap", true)
        .unwrap()
        .ignore();
    write_u64(&mut a, &m, BASE, 5).unwrap();
    let (t, flush) = a.snapshot(&[(va(BASE), 4096)]).unwrap();
    assert_eq!(flush, Flush::All);
    assert!(a.translate(va(BASE)).unwrap().copy_on_write);
    drop(t);
    let pa = a.translate(va(BASE)).unwrap().phys;
    let before = m.frames_in_use();
    write_u64(&mut a, &m, BASE, 6).unwrap();
    assert_eq!(
        a.translate(va(BASE)).unwrap().phys,
        pa,
        "taken over, not copied"
    );
    assert_eq!(m.frames_in_use(), before);
}

#[test]
fn read_only_and_unmapped_and_noexec_faults_are_typed_and_named() {
    for mode in both_modes() {
        let m = mem();
        let t = small_template(&m);
        let mut a = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        let e = write_u64(&mut a, &m, BASE + 8, 1).unwrap_err();
        assert_eq!(
            e,
            Fault::WriteToReadOnly {
                addr: BASE + 8,
                region: "libcode".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "write to read-only region 'libcode' at 0x40000008"
        );
        let e = access(&mut a, &m, BASE + 0x10_0000, Access::Execute).unwrap_err();
        assert!(matches!(e, Fault::ExecuteNoExec { ref region, .. } if &**region == "libdata"));
        access(&mut a, &m, BASE, Access::Execute).unwrap();
        let e = read_u64(&mut a, &m, BASE + 0x20_0000).unwrap_err();
        assert_eq!(
            e,
            Fault::Unmapped {
                addr: BASE + 0x20_0000
            }
        );
        let e = a
            .resolve_fault(va(0xffff_8000_0000_0000), Access::Read)
            .unwrap_err();
        assert!(matches!(e, Fault::NotLowerHalf { .. }));
        // A spurious fault (already allowed) asks for a page flush only.
        assert_eq!(
            a.resolve_fault(va(BASE + 8), Access::Read).unwrap(),
            Flush::Page(va(BASE))
        );
    }
}

#[test]
fn demand_zero_map_and_populate() {
    let m = mem();
    let mut a = AddressSpace::new(&m, &[], Mode::Share, None).unwrap();
    assert_eq!(
        a.map(va(0x7000_0000), 8 * 4096, Perm::RW, "stack", false)
            .unwrap(),
        Flush::None
    );
    assert!(
        a.translate(va(0x7000_0000)).is_none(),
        "demand-zero: nothing mapped yet"
    );
    let f = SoftMmu::new(&m)
        .read_u64(a.root(), 0x7000_1000)
        .unwrap_err();
    assert!(!f.present);
    assert_eq!(read_u64(&mut a, &m, 0x7000_1000).unwrap(), 0);
    write_u64(&mut a, &m, 0x7000_1008, 3).unwrap();
    assert_eq!(read_u64(&mut a, &m, 0x7000_1008).unwrap(), 3);
    a.map(va(0x7100_0000), 3 * 4096, Perm::R, "ro", true)
        .unwrap()
        .ignore();
    let tr = a.translate(va(0x7100_2000)).unwrap();
    assert!(!tr.writable && !tr.executable && !tr.copy_on_write);
    assert_eq!(
        read_u64(&mut a, &m, 0x7100_2000).unwrap(),
        0,
        "zeroed despite poisoned memory"
    );
    assert!(matches!(
        write_u64(&mut a, &m, 0x7100_2000, 1),
        Err(Fault::WriteToReadOnly { .. })
    ));
    check_counts(&m, &[&a], &[], &[]);
}

#[test]
fn map_rejects_bad_ranges() {
    let m = mem();
    let t = small_template(&m);
    let mut a = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
    assert_eq!(
        a.map(va(BASE + 4096), 4096, Perm::RW, "x", false),
        Err(Error::Overlap { addr: BASE + 4096 })
    );
    assert_eq!(
        a.map(va(0x1001), 4096, Perm::RW, "x", false),
        Err(Error::Misaligned { addr: 0x1001 })
    );
    assert_eq!(
        a.map(va(0x1000), 0, Perm::RW, "x", false),
        Err(Error::Empty)
    );
    assert!(matches!(
        a.map(va(0x7fff_ffff_f000), 0x2000, Perm::RW, "x", false),
        Err(Error::NotLowerHalf { .. })
    ));
    // Mapping next to template pages in the same L1 unshares the path; the template is intact.
    let fp = template_fingerprint(&m, &t);
    a.map(va(BASE + 3 * 4096), 4096, Perm::RW, "x", true)
        .unwrap()
        .ignore();
    write_u64(&mut a, &m, BASE + 3 * 4096, 1).unwrap();
    assert_eq!(template_fingerprint(&m, &t), fp);
    check_counts(&m, &[&a], &[&t], &[]);
}

#[test]
fn unmap_removes_only_in_this_space() {
    for mode in both_modes() {
        let m = mem();
        let t = small_template(&m);
        let mut a = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        let mut b = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        let flush = a.unmap(va(BASE + 0x10_0000 + 4096), 4096).unwrap();
        assert_eq!(
            flush,
            Flush::Range {
                start: va(BASE + 0x10_1000),
                end: va(BASE + 0x10_2000)
            }
        );
        assert!(a.translate(va(BASE + 0x10_1000)).is_none());
        assert_eq!(
            read_u64(&mut a, &m, BASE + 0x10_1000),
            Err(Fault::Unmapped {
                addr: BASE + 0x10_1000
            })
        );
        assert_eq!(read_u64(&mut a, &m, BASE + 0x10_2000), Ok(0));
        assert_eq!(read_u64(&mut b, &m, BASE + 0x10_1000), Ok(0));
        // Unmapping a whole 1 GiB slot releases the attachment without copying anything.
        let before = a.stats().tables_owned;
        a.unmap(va(GIB * 3), GIB).unwrap().ignore();
        assert_eq!(a.stats().tables_owned, before);
        check_counts(&m, &[&a, &b], &[&t], &[]);
        drop((a, b, t));
        assert_eq!(m.frames_in_use(), 0);
    }
}

#[test]
fn protect_changes_rights_of_private_memory_only() {
    let m = mem();
    let t = small_template(&m);
    let mut a = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
    let data = BASE + 0x10_0000;
    write_u64(&mut a, &m, data, 1).unwrap();
    a.protect(va(data), 3 * 4096, Perm::R).unwrap().ignore();
    assert!(matches!(
        write_u64(&mut a, &m, data, 2),
        Err(Fault::WriteToReadOnly { .. })
    ));
    assert!(matches!(
        write_u64(&mut a, &m, data + 4096, 2),
        Err(Fault::WriteToReadOnly { .. })
    ));
    a.protect(va(data), 3 * 4096, Perm::RWX).unwrap().ignore();
    write_u64(&mut a, &m, data, 2).unwrap();
    write_u64(&mut a, &m, data + 4096, 3).unwrap();
    access(&mut a, &m, data, Access::Execute).unwrap();
    assert!(matches!(
        a.protect(va(BASE), 4096, Perm::RW),
        Err(Error::NotPrivate { .. })
    ));
    assert!(matches!(
        a.protect(va(data), 4 * 4096, Perm::RW),
        Err(Error::NotMapped { .. })
    ));
    let mut b = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
    assert_eq!(read_u64(&mut b, &m, data + 4096), Ok(0));
    check_counts(&m, &[&a, &b], &[&t], &[]);
}

#[test]
fn snapshot_is_a_fork_server() {
    for mode in both_modes() {
        let m = mem();
        let t = small_template(&m);
        let mut server = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        let heap = 2 * GIB;
        server
            .map(va(heap), 16 * 4096, Perm::RW, "heap", false)
            .unwrap()
            .ignore();
        write_u64(&mut server, &m, heap + 8, 100).unwrap();
        write_u64(&mut server, &m, BASE + 0x10_0000, 200).unwrap();
        let (snap, flush) = server
            .snapshot(&[(va(BASE), GIB), (va(heap), GIB)])
            .unwrap();
        assert_eq!(flush, Flush::All);
        let fp = template_fingerprint(&m, &snap);
        let mut kids: Vec<_> = (0..3)
            .map(|_| AddressSpace::new(&m, &[&snap], mode, None).unwrap())
            .collect();
        for (i, k) in kids.iter_mut().enumerate() {
            assert_eq!(read_u64(k, &m, heap + 8), Ok(100));
            assert_eq!(read_u64(k, &m, BASE + 0x10_0000), Ok(200));
            assert_eq!(
                read_u64(k, &m, heap + 5 * 4096),
                Ok(0),
                "untouched demand-zero page"
            );
            write_u64(k, &m, heap + 8, i as u64).unwrap();
            write_u64(k, &m, heap + 9 * 4096, 50 + i as u64).unwrap();
        }
        write_u64(&mut server, &m, heap + 8, 101).unwrap();
        for (i, k) in kids.iter_mut().enumerate() {
            assert_eq!(read_u64(k, &m, heap + 8), Ok(i as u64));
            assert_eq!(read_u64(k, &m, heap + 9 * 4096), Ok(50 + i as u64));
        }
        assert_eq!(read_u64(&mut server, &m, heap + 8), Ok(101));
        assert_eq!(read_u64(&mut server, &m, heap + 9 * 4096), Ok(0));
        // Shared stays shared across the snapshot.
        write_u64(&mut kids[0], &m, BASE + 0x40_0000, 77).unwrap();
        assert_eq!(read_u64(&mut server, &m, BASE + 0x40_0000), Ok(77));
        assert_eq!(
            kids[1]
                .regions()
                .iter()
                .find(|r| r.start == heap)
                .unwrap()
                .name
                .as_ref(),
            "heap"
        );
        assert_eq!(template_fingerprint(&m, &snap), fp);
        let mut spaces: Vec<&AddressSpace<SimMem>> = kids.iter().collect();
        spaces.push(&server);
        check_counts(&m, &spaces, &[&t, &snap], &[]);
        drop((kids, server, t, snap));
        assert_eq!(m.frames_in_use(), 0);
    }
}

#[test]
fn kernel_half_is_copied_verbatim_and_never_followed() {
    let m = mem();
    let mut entries: [PageTableEntry; 256] = core::array::from_fn(|_| PageTableEntry::new());
    // Point at frames that do not exist in the simulated memory: following them would panic.
    entries[0].set_addr(
        PhysAddr::new(0x7777_0000_0000),
        PageTableFlags::PRESENT | PageTableFlags::WRITABLE,
    );
    entries[255].set_addr(
        PhysAddr::new(0x1000),
        PageTableFlags::PRESENT | PageTableFlags::GLOBAL,
    );
    let k = KernelHalf::new(&entries);
    let t = small_template(&m);
    for mode in both_modes() {
        let mut a = AddressSpace::new(&m, &[&t], mode, Some(&k)).unwrap();
        a.unmap(va(0), 1 << 47).unwrap().ignore();
        assert_eq!(entry(&m, a.root(), 256), 0x7777_0000_0000 | 3);
        assert_eq!(entry(&m, a.root(), 511), 0x1000 | 1 | 1 << 8);
        assert!(a.translate(va(0xffff_8000_0000_0000)).is_none());
        drop(a);
    }
    drop(t);
    assert_eq!(m.frames_in_use(), 0);
}

#[test]
fn a_dropped_space_root_is_reused_empty_and_only_with_its_kernel_half() {
    let m = mem();
    m.keep_roots(1);
    let mut entries: [PageTableEntry; 256] = core::array::from_fn(|_| PageTableEntry::new());
    entries[3].set_addr(PhysAddr::new(0x7777_0000_0000), PageTableFlags::PRESENT);
    let k = Box::new(KernelHalf::new(&entries));
    let other = Box::new(KernelHalf::new(&entries));
    let t = small_template(&m);
    for mode in both_modes() {
        // A space that attached a template, wrote a private page and mapped a stack: several
        // entries of its root's lower half in use when it is dropped.
        let mut a = AddressSpace::new(&m, &[&t], mode, Some(&k)).unwrap();
        let x = BASE + 0x10_0000;
        write_u64(&mut a, &m, x, 9).unwrap();
        a.map(va(0x7f00_0000_0000), 2 * 4096, Perm::RW, "stack", true)
            .unwrap()
            .ignore();
        let root = a.root();
        let in_use = m.frames_in_use();
        drop(a);
        assert_eq!(m.kept_roots(), vec![root], "the root is kept, not freed");
        // Everything below the root went: only the root itself is still allocated.
        assert!(m.frames_in_use() < in_use);
        // A space with another kernel half does not get it.
        let c = AddressSpace::new(&m, &[&t], mode, Some(&other)).unwrap();
        assert_ne!(c.root(), root);
        assert_eq!(m.kept_roots(), vec![root]);
        drop(c);
        m.trim_roots();
        // Nor does a space without one; and a space with `k` gets it, empty (SimMem checks the
        // lower half is zero and the kernel half intact when it hands it out).
        let mut a = AddressSpace::new(&m, &[&t], mode, Some(&k)).unwrap();
        let root = a.root();
        drop(a);
        assert_eq!(m.kept_roots(), vec![root]);
        let n = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        assert_ne!(n.root(), root);
        drop(n);
        a = AddressSpace::new(&m, &[&t], mode, Some(&k)).unwrap();
        assert_eq!(a.root(), root, "reused");
        assert!(m.kept_roots().is_empty());
        assert_eq!(entry(&m, a.root(), 259), 0x7777_0000_0000 | 1);
        // It works as a fresh one: the template's page reads as sealed, the write is private.
        assert_eq!(read_u64(&mut a, &m, x), Ok(0));
        write_u64(&mut a, &m, x, 5).unwrap();
        assert_eq!(read_u64(&mut a, &m, x), Ok(5));
        check_counts(&m, &[&a], &[&t], &[]);
        drop(a);
        m.trim_roots();
    }
    drop(t);
    assert_eq!(m.frames_in_use(), 0);
}

#[test]
fn share_spawn_is_flat_copy_spawn_is_linear() {
    let m = mem();
    let alias = pattern_frame(&m, 1);
    let mut owned = Vec::new();
    for size in [MIB2, 64 * MIB2, GIB] {
        let mut b = TemplateBuilder::new(&m);
        b.add(
            RegionSpec::new("big", BASE, size, Kind::Private)
                .backing(Backing::Alias(alias.start_address())),
        )
        .unwrap();
        let t = b.seal().unwrap();
        let s = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
        let c = AddressSpace::new(&m, &[&t], Mode::Copy, None).unwrap();
        assert_eq!(s.stats().tables_owned, 1);
        assert_eq!(c.stats().tables_owned, t.stats().tables + 1);
        assert_eq!(c.stats().tables_shared, 0);
        owned.push((c.stats().tables_owned, size));
        assert_eq!(m.ref_count(alias), 1 + 2 * (size / 4096) as u32);
    }
    assert_eq!(owned, vec![(4, MIB2), (3 + 64, 64 * MIB2), (3 + 512, GIB)]);
    assert_eq!(m.ref_count(alias), 1);
    m.dec_ref(alias);
    assert_eq!(m.frames_in_use(), 0);
}

#[test]
fn templates_in_one_512g_range_attach_per_slot_and_conflicts_are_rejected() {
    let m = mem();
    let mk = |start: u64| {
        let mut b = TemplateBuilder::new(&m);
        b.add(RegionSpec::new("r", start, 4096, Kind::Private))
            .unwrap();
        b.seal().unwrap()
    };
    let t1 = mk(GIB);
    let t2 = mk(2 * GIB);
    let t3 = mk(GIB + 0x1000);
    let t4 = mk(600 * GIB);
    for mode in both_modes() {
        let mut a = AddressSpace::new(&m, &[&t1, &t2, &t4], mode, None).unwrap();
        if mode == Mode::Share {
            let s = a.stats();
            assert_eq!(
                s.tables_owned, 2,
                "root + own L3 for the 512 GiB range with two templates"
            );
            assert_eq!(s.shared_attachments, 3);
        }
        write_u64(&mut a, &m, GIB, 1).unwrap();
        write_u64(&mut a, &m, 2 * GIB, 2).unwrap();
        write_u64(&mut a, &m, 600 * GIB, 3).unwrap();
        assert_eq!(read_u64(&mut a, &m, GIB), Ok(1));
        assert_eq!(
            AddressSpace::new(&m, &[&t1, &t3], mode, None).unwrap_err(),
            Error::SlotConflict { slot: GIB }
        );
        assert_eq!(
            AddressSpace::new(&m, &[&t1, &t1], mode, None).unwrap_err(),
            Error::SlotConflict { slot: GIB }
        );
    }
    check_counts(&m, &[], &[&t1, &t2, &t3, &t4], &[]);
}

#[test]
fn builder_rejects_bad_layouts() {
    let m = mem();
    let mut b = TemplateBuilder::new(&m);
    b.add(RegionSpec::new("a", BASE, 8192, Kind::Private))
        .unwrap();
    assert_eq!(
        b.add(RegionSpec::new("b", BASE + 4096, 8192, Kind::Private))
            .unwrap_err(),
        Error::Overlap { addr: BASE + 4096 }
    );
    assert_eq!(
        b.add(RegionSpec::new("c", BASE + 4096, 4096, Kind::Private).huge())
            .unwrap_err(),
        Error::Misaligned { addr: BASE + 4096 }
    );
    assert_eq!(
        b.add(RegionSpec::new("d", BASE + MIB2, 4096, Kind::Private).huge())
            .unwrap_err(),
        Error::Misaligned { addr: BASE + MIB2 }
    );
    assert_eq!(
        b.add(RegionSpec::new("e", BASE + MIB2, 0, Kind::Private))
            .unwrap_err(),
        Error::Empty
    );
    assert!(matches!(
        b.add(RegionSpec::new(
            "f",
            0xffff_8000_0000_0000,
            4096,
            Kind::Private
        )),
        Err(Error::NotLowerHalf { .. })
    ));
    let bad = Backing::Frames(vec![PhysAddr::new(0x1000)]);
    assert_eq!(
        b.add(RegionSpec::new("g", BASE + MIB2, 8192, Kind::Private).backing(bad))
            .unwrap_err(),
        Error::BadBacking
    );
    assert_eq!(
        b.add(
            RegionSpec::new("h", BASE + MIB2, 4096, Kind::Private)
                .backing(Backing::Alias(PhysAddr::new(0x1001)))
        )
        .unwrap_err(),
        Error::BadBacking
    );
    let t = b.seal().unwrap();
    assert_eq!(t.regions().len(), 1);
    assert_eq!(t.slots(), vec![1]);
}

#[test]
fn given_frames_back_a_region_and_stay_the_callers() {
    let m = mem();
    let frames: Vec<PhysFrame> = (0..3).map(|i| pattern_frame(&m, i)).collect();
    let mut b = TemplateBuilder::new(&m);
    let addrs = frames.iter().map(|f| f.start_address()).collect();
    b.add(
        RegionSpec::new("image", BASE, 3 * 4096, Kind::ReadOnly)
            .exec()
            .backing(Backing::Frames(addrs)),
    )
    .unwrap();
    let t = b.seal().unwrap();
    let mut a = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
    for (i, f) in frames.iter().enumerate() {
        let pa = access(&mut a, &m, BASE + i as u64 * 4096 + 16, Access::Read).unwrap();
        assert_eq!(pa, f.start_address() + 16u64);
        assert_eq!(
            read_u64(&mut a, &m, BASE + i as u64 * 4096 + 16),
            Ok(pattern(i as u64, 16))
        );
    }
    check_counts(&m, &[&a], &[&t], &frames);
    drop((a, t));
    for f in frames {
        assert_eq!(m.dec_ref(f), 0);
    }
    assert_eq!(m.frames_in_use(), 0);
}

#[test]
fn huge_pages_translate_cow_and_refuse_splits() {
    for mode in both_modes() {
        let m = mem();
        let mut b = TemplateBuilder::new(&m);
        b.add(RegionSpec::new("hdata", BASE, 2 * MIB2, Kind::Private).huge())
            .unwrap();
        b.add(
            RegionSpec::new("hcode", BASE + 4 * MIB2, MIB2, Kind::ReadOnly)
                .huge()
                .exec(),
        )
        .unwrap();
        let t = b.seal().unwrap();
        let fp = template_fingerprint(&m, &t);
        let mut a = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        let mut c = AddressSpace::new(&m, &[&t], mode, None).unwrap();
        let tr = a.translate(va(BASE + 0x1234)).unwrap();
        assert_eq!(tr.page_size, PageSize::Size2MiB);
        assert!(tr.copy_on_write && !tr.writable);
        // One fault splits the 2 MiB page and makes the written 4 KiB piece (the last) writable:
        // the CPU's retry succeeds with no second fault, and only that piece was copied.
        let mmu = SoftMmu::new(&m);
        let x = BASE + MIB2 - 8;
        assert!(mmu.write_u64(a.root(), x, 11).unwrap_err().present);
        let flush = a.resolve_fault(va(x), Access::Write).unwrap();
        assert_eq!(flush, Flush::Page(va(BASE)));
        mmu.write_u64(a.root(), x, 11).unwrap();
        let tr = a.translate(va(x)).unwrap();
        assert_eq!(tr.page_size, PageSize::Size4KiB);
        assert!(tr.writable && tr.phys != t.translate(va(x)).unwrap().phys);
        for piece in [BASE, BASE + MIB2 - 2 * 4096] {
            let (mine, theirs) = (
                a.translate(va(piece)).unwrap(),
                t.translate(va(piece)).unwrap(),
            );
            assert!(
                mine.copy_on_write && mine.page_size == PageSize::Size4KiB,
                "{piece:#x}"
            );
            assert_eq!(mine.phys, theirs.phys, "{piece:#x} not copied");
        }
        assert_eq!(read_u64(&mut a, &m, BASE + MIB2 - 8), Ok(11));
        assert_eq!(read_u64(&mut c, &m, BASE + MIB2 - 8), Ok(0));
        assert_eq!(read_u64(&mut a, &m, BASE + MIB2), Ok(0));
        assert_eq!(
            a.unmap(va(BASE + 4096), 4096),
            Err(Error::SplitsHugePage { addr: BASE + 4096 })
        );
        assert_eq!(
            a.protect(va(BASE), 4096, Perm::R),
            Err(Error::SplitsHugePage { addr: BASE + 4096 })
        );
        assert!(matches!(
            a.snapshot(&[(va(BASE + MIB2 / 2), MIB2)]),
            Err(Error::SplitsHugePage { .. })
        ));
        a.protect(va(BASE), MIB2, Perm::R).unwrap().ignore();
        assert!(matches!(
            write_u64(&mut a, &m, BASE, 1),
            Err(Fault::WriteToReadOnly { .. })
        ));
        a.unmap(va(BASE + MIB2), MIB2).unwrap().ignore();
        assert_eq!(
            read_u64(&mut a, &m, BASE + MIB2),
            Err(Fault::Unmapped { addr: BASE + MIB2 })
        );
        assert_eq!(template_fingerprint(&m, &t), fp);
        check_counts(&m, &[&a, &c], &[&t], &[]);
        drop((a, c, t));
        assert_eq!(m.frames_in_use(), 0);
    }
}

#[test]
fn running_out_of_frames_is_an_error_not_a_leak() {
    let m = SimMem::new(64);
    let t = small_template(&m);
    let used = m.frames_in_use();
    m.set_budget(used + 2);
    // Copy needs more than 2 frames.
    assert_eq!(
        AddressSpace::new(&m, &[&t], Mode::Copy, None).unwrap_err(),
        Error::OutOfFrames
    );
    assert_eq!(m.frames_in_use(), used);
    let mut a = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
    // Root took one frame: an unshare needs 3 + 1 page.
    let e = write_u64(&mut a, &m, BASE + 0x10_0000, 1).unwrap_err();
    assert_eq!(
        e,
        Fault::OutOfFrames {
            addr: BASE + 0x10_0000
        }
    );
    assert_eq!(read_u64(&mut a, &m, BASE + 0x10_0000), Ok(0));
    check_counts(&m, &[&a], &[&t], &[]);
    m.set_budget(1000);
    write_u64(&mut a, &m, BASE + 0x10_0000, 1).unwrap();
    drop((a, t));
    assert_eq!(m.frames_in_use(), 0);
}

#[test]
fn flush_tokens_merge() {
    let p = Flush::Page(va(0x1000));
    assert_eq!(Flush::None.merge(p), p);
    assert_eq!(
        p.merge(Flush::Page(va(0x5000))),
        Flush::Range {
            start: va(0x1000),
            end: va(0x5001)
        }
    );
    assert_eq!(p.merge(Flush::All), Flush::All);
}

#[test]
fn cow_bit_is_software_bit_9() {
    assert_eq!(COW_BIT, PageTableFlags::BIT_9);
}

/// A region requested at a non-canonical address used to be truncated into the lower half
/// (`0x1_0000_4000_0000` became `0x4000_0000`); it is an error naming the address now, and so
/// is every address or range that leaves the lower half.
#[test]
fn region_addresses_are_never_truncated() {
    let m = mem();
    let free = m.frames_in_use();
    let cases: [(u64, u64, Error); 8] = [
        (
            0x1_0000_4000_0000,
            4096,
            Error::NonCanonical {
                addr: 0x1_0000_4000_0000,
            },
        ),
        (!0xfff, 4096, Error::NotLowerHalf { addr: !0xfff }),
        (
            0x8000_0000_0000,
            4096,
            Error::NonCanonical {
                addr: 0x8000_0000_0000,
            },
        ),
        (
            0xffff_8000_0000_0000,
            4096,
            Error::NotLowerHalf {
                addr: 0xffff_8000_0000_0000,
            },
        ),
        (
            0x7fff_ffff_f000,
            0x2000,
            Error::NotLowerHalf {
                addr: 0x8000_0000_0000,
            },
        ),
        (
            0x1000,
            !0xfff,
            Error::NotLowerHalf {
                addr: 0x8000_0000_0000,
            },
        ),
        (0x1000, 0, Error::Empty),
        (0x1001, 4096, Error::Misaligned { addr: 0x1001 }),
    ];
    for (start, len, want) in cases {
        let mut b = TemplateBuilder::new(&m);
        assert_eq!(
            b.add(RegionSpec::new("r", start, len, Kind::Private)).err(),
            Some(want.clone()),
            "region at {start:#x} + {len:#x}"
        );
        let msg = want.to_string();
        if let Error::NonCanonical { addr } | Error::NotLowerHalf { addr } = want {
            assert!(msg.contains(&format!("{addr:#x}")), "{msg}");
        }
        // And nothing is mapped at the truncated address.
        let t = b.seal().unwrap();
        let s = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
        assert_eq!(s.region(va(start & 0x7fff_ffff_ffff)), None);
    }
    // The last address of the lower half is fine.
    let mut b = TemplateBuilder::new(&m);
    b.add(RegionSpec::new(
        "top",
        0x7fff_ffff_f000,
        4096,
        Kind::Private,
    ))
    .unwrap();
    let t = b.seal().unwrap();
    let mut s = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
    assert!(s.region(va(0x7fff_ffff_f000)).is_some());
    // Map and snapshot take `VirtAddr`s (canonical by construction): the upper half is refused.
    assert_eq!(
        s.map(va(0xffff_8000_0000_0000), 4096, Perm::RW, "x", false),
        Err(Error::NotLowerHalf {
            addr: 0xffff_8000_0000_0000
        })
    );
    assert_eq!(
        s.snapshot(&[(va(0x7fff_ffff_f000), !0xfff)]).err(),
        Some(Error::NotLowerHalf {
            addr: 0x8000_0000_0000
        })
    );
    assert!(is_canonical(0xffff_8000_0000_0000) && !is_canonical(0x1_0000_4000_0000));
    drop((s, t));
    assert_eq!(m.frames_in_use(), free);
}

/// What the engine did between two points: frames allocated, `frame_ptr` calls (table entries
/// read or written one at a time, tables looped over), references taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Work {
    allocs: u64,
    accesses: u64,
    inc_refs: u64,
}

fn work<T>(m: &SimMem, f: impl FnOnce() -> T) -> (T, Work) {
    let (a, r, i) = (m.alloc_count(), m.frame_accesses(), m.inc_ref_count());
    let out = f();
    let w = Work {
        allocs: m.alloc_count() - a,
        accesses: m.frame_accesses() - r,
        inc_refs: m.inc_ref_count() - i,
    };
    (out, w)
}

/// Incremental snapshot (docs/engine.md, invariant 12): a snapshot costs what the space changed
/// since it was spawned or last snapshotted, not what the template holds. A zygote spawned from
/// a 1 GiB and from a 4 GiB template (4 KiB pages, the heap in L4 entry 255 as in libos):
/// unchanged, its snapshot is its template (no table built, a few entries read); after one
/// written page, the snapshot lends the three tables on that page's path (L3, L2, L1 copies)
/// and references their borrowed entries (about 2 × 511), the same at both sizes; unchanged
/// again, the snapshot is the one just taken.
#[test]
fn snapshot_work_is_what_changed_not_the_template_size() {
    const HEAP: u64 = 0x7f80_0000_0000;
    let whole = [(va(HEAP), 512 * GIB)];
    let mut seen = Vec::new();
    for size in [GIB, 4 * GIB] {
        let m = mem();
        let alias = pattern_frame(&m, 3);
        let mut b = TemplateBuilder::new(&m);
        b.add(
            RegionSpec::new("heap", HEAP, size, Kind::Private)
                .backing(Backing::Alias(alias.start_address())),
        )
        .unwrap();
        let t = b.seal().unwrap();
        let mut z = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();

        // (a) Unchanged since spawn: the template itself, nothing allocated or referenced.
        let (r, clean) = work(&m, || z.snapshot(&whole).unwrap());
        let (s0, f) = r;
        assert_eq!((s0.root(), f), (t.root(), Flush::None));
        assert_eq!((clean.allocs, clean.inc_refs), (0, 0));
        assert!(clean.accesses <= 4, "{clean:?}");

        // (b) One page written: only the tables on its path are walked.
        let page = HEAP + size / 2 + 7 * 4096;
        write_u64(&mut z, &m, page, 42).unwrap();
        let (r, one) = work(&m, || z.snapshot(&whole).unwrap());
        let (s1, f) = r;
        assert_eq!(f, Flush::All, "the written page became copy-on-write");
        assert_ne!(s1.root(), t.root());
        assert_eq!(one.allocs, 1, "the new template's root only: {one:?}");
        assert!(one.inc_refs <= 3 * 512, "{one:?}");
        assert!(one.accesses <= 4 * 512, "{one:?}");
        assert!(z.translate(va(page)).unwrap().copy_on_write);
        assert_eq!(
            z.held_templates().count(),
            2,
            "the spawn template and the snapshot that took the space's tables"
        );

        // (c) Unchanged since that snapshot: the same template again.
        let (r, again) = work(&m, || z.snapshot(&whole).unwrap());
        let (s2, f) = r;
        assert_eq!((s2.root(), f), (s1.root(), Flush::None));
        assert_eq!((again.allocs, again.inc_refs), (0, 0));
        assert!(again.accesses <= 4, "{again:?}");

        // The snapshot behaves as before: a child sees the written page, copy-on-write both ways.
        let mut kid = AddressSpace::new(&m, &[&s1], Mode::Share, None).unwrap();
        assert_eq!(read_u64(&mut kid, &m, page), Ok(42));
        write_u64(&mut z, &m, page, 43).unwrap();
        write_u64(&mut kid, &m, page + 8, 44).unwrap();
        assert_eq!(read_u64(&mut kid, &m, page), Ok(42));
        assert_eq!(read_u64(&mut z, &m, page + 8), Ok(pattern(3, 8)));
        assert_eq!(read_u64(&mut z, &m, page), Ok(43));
        // A third snapshot (the space changed) supersedes the second one in what it holds.
        let (s3, _) = z.snapshot(&whole).unwrap();
        assert_eq!(z.held_templates().count(), 2);
        assert!(z.held_templates().any(|h| h.root() == s3.root()));
        check_counts(&m, &[&z, &kid], &[&t, &s1, &s3], &[alias]);
        drop((z, kid, t, s0, s1, s2, s3));
        m.dec_ref(alias);
        assert_eq!(m.frames_in_use(), 0);
        eprintln!(
            "{} GiB: clean {clean:?}, one page {one:?}, clean again {again:?}",
            size / GIB
        );
        seen.push(one);
    }
    // Independent of the template's size: the path's L3 has one entry per GiB more.
    assert_eq!(seen[0].allocs, seen[1].allocs);
    assert!(seen[0].inc_refs.abs_diff(seen[1].inc_refs) <= 3, "{seen:?}");
    assert!(seen[0].accesses.abs_diff(seen[1].accesses) <= 3, "{seen:?}");
}

/// A template claims exactly the 1 GiB slots its regions touch, across 512 GiB ranges and
/// word boundaries of the slot bitmaps (2 MiB pages over one aliased run, to stay small).
#[test]
fn a_template_claims_exactly_the_slots_its_regions_touch() {
    let m = mem();
    let run = m.alloc_huge_frame().unwrap();
    let mut b = TemplateBuilder::new(&m);
    // Slots 62..=65 of range 0 (a word boundary at 64) and 510..=513 (ranges 0 and 1).
    for (name, slot, n) in [("a", 62u64, 4u64), ("b", 510, 4)] {
        b.add(
            RegionSpec::new(
                name,
                slot * GIB + MIB2 * 511,
                (n - 2) * GIB + 2 * MIB2,
                Kind::ReadOnly,
            )
            .huge()
            .backing(Backing::Alias(run.start_address())),
        )
        .unwrap();
    }
    let t = b.seal().unwrap();
    assert_eq!(t.slots(), vec![62, 63, 64, 65, 510, 511, 512, 513]);
    drop(t);
    m.dec_ref_huge(run);
    assert_eq!(m.frames_in_use(), 0);
}

/// Re-sealing after a write when the previous snapshot is held by the space alone (a zygote whose
/// children are gone): the new snapshot takes over the old one's references on the written path
/// instead of taking new ones that dropping the old one gives back. Same translations, same
/// counts and no leak as when someone else still holds the old snapshot (nothing moves then).
#[test]
fn a_reseal_takes_over_the_references_of_the_snapshot_it_replaces() {
    const HEAP: u64 = 0x7f80_0000_0000;
    let whole = [(va(HEAP), 512 * GIB)];
    let mut seen = Vec::new();
    for keep_old in [false, true] {
        let m = mem();
        let alias = pattern_frame(&m, 3);
        let mut b = TemplateBuilder::new(&m);
        b.add(
            RegionSpec::new("heap", HEAP, GIB, Kind::Private)
                .backing(Backing::Alias(alias.start_address())),
        )
        .unwrap();
        let t = b.seal().unwrap();
        let mut z = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
        let (a, b2) = (HEAP + 5 * 4096, HEAP + 9 * 4096);
        write_u64(&mut z, &m, a, 1).unwrap();
        let (s1, _) = z.snapshot(&whole).unwrap();
        // A child of the first snapshot that ended, or (keep_old) one still running.
        let mut kid = Some(AddressSpace::new(&m, &[&s1], Mode::Share, None).unwrap());
        let old = keep_old.then(|| s1.clone());
        drop(s1);
        if !keep_old {
            kid = None;
        }
        write_u64(&mut z, &m, b2, 2).unwrap();
        let (r, w) = work(&m, || z.snapshot(&whole).unwrap());
        let (s2, f) = r;
        assert_eq!(f, Flush::All);
        assert_eq!(
            z.held_templates().count(),
            2,
            "the spawn template and the new snapshot"
        );
        // Both writes are in the new snapshot, copy-on-write in the space and in a child of it.
        let mut c = AddressSpace::new(&m, &[&s2], Mode::Share, None).unwrap();
        assert_eq!(read_u64(&mut c, &m, a), Ok(1));
        assert_eq!(read_u64(&mut c, &m, b2), Ok(2));
        assert_eq!(read_u64(&mut c, &m, HEAP), Ok(pattern(3, 0)));
        write_u64(&mut c, &m, a, 7).unwrap();
        assert_eq!(read_u64(&mut z, &m, a), Ok(1));
        write_u64(&mut z, &m, b2, 8).unwrap();
        assert_eq!(read_u64(&mut c, &m, b2), Ok(2));
        let mut held: Vec<&Template<SimMem>> = vec![&t, &s2];
        held.extend(old.iter());
        if let Some(mut kid) = kid {
            // The old snapshot's child still sees the first write only.
            assert_eq!(read_u64(&mut kid, &m, a), Ok(1));
            assert_eq!(read_u64(&mut kid, &m, b2), Ok(pattern(3, 0)));
            check_counts(&m, &[&z, &c, &kid], &held, &[alias]);
            drop(kid);
        } else {
            check_counts(&m, &[&z, &c], &held, &[alias]);
        }
        drop((z, c, t, s2, old));
        m.dec_ref(alias);
        assert_eq!(m.frames_in_use(), 0, "nothing leaked");
        seen.push(w);
    }
    // Moved: no reference taken on the written path (its L1 alone has 511 borrowed leaves).
    assert!(seen[0].inc_refs <= 4, "{seen:?}");
    assert!(seen[1].inc_refs >= 511, "{seen:?}");
}

/// Invariant 12: a template's table referenced by a later snapshot has two counted owners, and
/// whichever is dropped last releases it and what it holds, in any order.
#[test]
fn a_table_counted_by_two_templates_is_released_by_the_last() {
    for t_first in [true, false] {
        let m = mem();
        let mut b = TemplateBuilder::new(&m);
        b.add(RegionSpec::new("data", BASE, 2 * MIB2, Kind::Private))
            .unwrap();
        let t = b.seal().unwrap();
        let mut a = AddressSpace::new(&m, &[&t], Mode::Share, None).unwrap();
        write_u64(&mut a, &m, BASE, 1).unwrap();
        // L4 entry 0 whole: A's L3, L2, L1 copies are lent; T's second L1 is referenced.
        let (s, flush) = a.snapshot(&[(va(0), 512 * GIB)]).unwrap();
        assert_eq!(flush, Flush::All);
        let l1_of = |root: PhysFrame| {
            let l3 = frame(entry(&m, root, 0) & ADDR);
            let l2 = frame(entry(&m, l3, 1) & ADDR);
            frame(entry(&m, l2, 1) & ADDR)
        };
        let second = l1_of(t.root());
        assert_eq!(l1_of(s.root()), second, "referenced, not copied");
        assert_eq!(m.ref_count(second), 2, "counted by T's L2 and by S's");
        assert_ne!(
            frame(entry(&m, s.root(), 0) & ADDR),
            frame(entry(&m, t.root(), 0) & ADDR)
        );
        let mut kid = AddressSpace::new(&m, &[&s], Mode::Share, None).unwrap();
        assert_eq!(read_u64(&mut kid, &m, BASE), Ok(1));
        assert_eq!(read_u64(&mut kid, &m, BASE + MIB2), Ok(0));
        drop(a);
        if t_first {
            drop(t);
            assert_eq!(m.ref_count(second), 1);
            check_counts(&m, &[&kid], &[&s], &[]);
            assert_eq!(read_u64(&mut kid, &m, BASE + MIB2 + 8), Ok(0));
            drop((kid, s));
        } else {
            drop((kid, s));
            assert_eq!(m.ref_count(second), 1);
            check_counts(&m, &[], &[&t], &[]);
            drop(t);
        }
        assert_eq!(m.frames_in_use(), 0, "t dropped first: {t_first}");
    }
}
