//! Test helpers: a task that accesses memory through the software MMU and resolves faults like
//! a kernel, and an invariant checker that walks every live tree.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use templates::sim::{SimMem, SoftMmu};
use templates::{Access, AddressSpace, Fault, Mode, PhysMem, Template};
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

pub const PRESENT: u64 = 1;
pub const WRITABLE: u64 = 1 << 1;
pub const HUGE: u64 = 1 << 7;
pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
pub const LENT: u64 = 1 << 10;
pub const PIECE: u64 = 1 << 11;
pub const MIB2: u64 = 2 << 20;

pub fn frame(addr: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(addr))
}

pub fn entry(mem: &SimMem, table: PhysFrame, i: usize) -> u64 {
    let mut b = [0u8; 8];
    mem.read(table, i * 8, &mut b);
    u64::from_le_bytes(b)
}

/// Access `va` like a task: the MMU raises a fault, the kernel resolves it, the access retries.
/// One `resolve_fault` must be enough: the retry may not fault again (a 2 MiB page's split must
/// make the written piece itself writable, not another one).
pub fn access(
    space: &mut AddressSpace<SimMem>,
    mem: &SimMem,
    va: u64,
    acc: Access,
) -> Result<PhysAddr, Fault> {
    let mmu = SoftMmu::new(mem);
    if let Ok(pa) = mmu.translate(space.root(), va, acc) {
        return Ok(pa);
    }
    space.resolve_fault(VirtAddr::new(va), acc)?.ignore();
    match mmu.translate(space.root(), va, acc) {
        Ok(pa) => Ok(pa),
        Err(f) => panic!("{f:?} again after resolve_fault({va:#x}, {acc:?}) succeeded"),
    }
}

pub fn read_u64(space: &mut AddressSpace<SimMem>, mem: &SimMem, va: u64) -> Result<u64, Fault> {
    access(space, mem, va, Access::Read)?;
    Ok(SoftMmu::new(mem)
        .read_u64(space.root(), va)
        .expect("resolved"))
}

pub fn write_u64(
    space: &mut AddressSpace<SimMem>,
    mem: &SimMem,
    va: u64,
    v: u64,
) -> Result<(), Fault> {
    access(space, mem, va, Access::Write)?;
    SoftMmu::new(mem)
        .write_u64(space.root(), va, v)
        .expect("resolved");
    Ok(())
}

/// The frame a leaf entry's reference is counted on: its own, or the run's head for a 2 MiB leaf
/// and for a piece of a split 2 MiB page (`PIECE_BIT`).
fn counted_on(e: u64, level: u8) -> PhysFrame {
    if level == 2 || e & PIECE != 0 {
        frame(e & ADDR & !(MIB2 - 1))
    } else {
        frame(e & ADDR)
    }
}

/// Walk every tree and compute the count every frame must have: one per counted entry pointing
/// at it (each table's entries counted once however many parents share it) plus one per handle
/// (the roots, `external`). Every entry of a template's tree, and of a `Mode::Copy` space's
/// (`spaces[i].1`), is counted; in a `Mode::Share` space's tables an entry with `LENT_BIT` is
/// borrowed and counts nothing (invariant 11). Returns the counts and, per space (in order), the
/// frames its borrowed entries point at.
pub fn expected_counts(
    mem: &SimMem,
    spaces: &[(PhysFrame, bool)],
    templates: &[PhysFrame],
    external: &[PhysFrame],
) -> (HashMap<PhysFrame, u32>, Vec<HashSet<PhysFrame>>) {
    let mut counts: HashMap<PhysFrame, u32> = HashMap::new();
    let mut seen = HashSet::new();
    let mut borrowed = Vec::new();
    for &r in templates {
        *counts.entry(r).or_default() += 1;
        visit(mem, r, 4, true, &mut counts, &mut seen, &mut HashSet::new());
    }
    for &(r, all_counted) in spaces {
        *counts.entry(r).or_default() += 1;
        let mut b = HashSet::new();
        visit(mem, r, 4, all_counted, &mut counts, &mut seen, &mut b);
        borrowed.push(b);
    }
    for &f in external {
        *counts.entry(f).or_default() += 1;
    }
    (counts, borrowed)
}

fn visit(
    mem: &SimMem,
    table: PhysFrame,
    level: u8,
    all_counted: bool,
    counts: &mut HashMap<PhysFrame, u32>,
    seen: &mut HashSet<PhysFrame>,
    borrowed: &mut HashSet<PhysFrame>,
) {
    if !seen.insert(table) {
        return;
    }
    let n = if level == 4 { 256 } else { 512 };
    let entries = mem.words(table);
    for &e in &entries[..n] {
        if e & PRESENT == 0 {
            continue;
        }
        let leaf = level == 1 || e & HUGE != 0;
        let target = if leaf {
            counted_on(e, level)
        } else {
            frame(e & ADDR)
        };
        if !all_counted && e & LENT != 0 {
            borrowed.insert(target);
            continue;
        }
        *counts.entry(target).or_default() += 1;
        if !leaf {
            visit(mem, target, level - 1, all_counted, counts, seen, borrowed);
        }
    }
}

/// Every frame (tables, and leaves' counted frames) reachable from `root`.
fn reachable(mem: &SimMem, root: PhysFrame, level: u8, out: &mut HashSet<PhysFrame>) {
    if !out.insert(root) {
        return;
    }
    let n = if level == 4 { 256 } else { 512 };
    for &e in &mem.words(root)[..n] {
        if e & PRESENT == 0 {
            continue;
        }
        if level == 1 || e & HUGE != 0 {
            out.insert(counted_on(e, level));
        } else {
            reachable(mem, frame(e & ADDR), level - 1, out);
        }
    }
}

/// Invariants 2 and 11: every allocated frame's count equals its counted references, nothing
/// else is allocated (no leak), and every entry a space borrows points at a frame that one of
/// the templates it holds reaches. The templates the spaces hold are included automatically.
pub fn check_counts(
    mem: &SimMem,
    spaces: &[&AddressSpace<SimMem>],
    templates: &[&Template<SimMem>],
    external: &[PhysFrame],
) {
    let mut troots: Vec<PhysFrame> = templates.iter().map(|t| t.root()).collect();
    troots.extend(
        spaces
            .iter()
            .flat_map(|s| s.held_templates().map(|t| t.root())),
    );
    troots.sort();
    troots.dedup();
    let sroots: Vec<(PhysFrame, bool)> = spaces
        .iter()
        .map(|s| (s.root(), s.mode() == Mode::Copy))
        .collect();
    let (expected, borrowed) = expected_counts(mem, &sroots, &troots, external);
    let actual: HashMap<PhysFrame, u32> = mem.allocated().into_iter().collect();
    for (f, n) in &actual {
        let e = expected.get(f).copied().unwrap_or(0);
        assert_eq!(
            *n,
            e,
            "frame {:#x}: count {n}, references {e}",
            f.start_address().as_u64()
        );
    }
    for (f, e) in &expected {
        assert!(
            actual.contains_key(f),
            "frame {:#x} referenced {e} times but not allocated",
            f.start_address().as_u64()
        );
    }
    // What each template keeps alive, walked once per template however many spaces hold it.
    let mut kept: HashMap<PhysFrame, HashSet<PhysFrame>> = HashMap::new();
    for (s, b) in spaces.iter().zip(&borrowed) {
        for t in s.held_templates() {
            kept.entry(t.root()).or_insert_with(|| {
                let mut k = HashSet::new();
                reachable(mem, t.root(), 4, &mut k);
                k
            });
        }
        for f in b {
            assert!(
                s.held_templates().any(|t| kept[&t.root()].contains(f)),
                "frame {:#x} borrowed by a space but not kept by its templates",
                f.start_address().as_u64()
            );
        }
    }
}

/// A fingerprint of everything in a template that must never change (invariant 1): all its
/// tables, and every data frame of a non-writable leaf (`Shared` pages are writable by design).
pub fn template_fingerprint(mem: &SimMem, t: &Template<SimMem>) -> u64 {
    let mut h = 0u64;
    let mut seen = HashSet::new();
    fp(mem, t.root(), 4, &mut h, &mut seen);
    h
}

fn fp(mem: &SimMem, table: PhysFrame, level: u8, h: &mut u64, seen: &mut HashSet<PhysFrame>) {
    if !seen.insert(table) {
        return;
    }
    *h = h.rotate_left(7) ^ mem.checksum(table);
    let n = if level == 4 { 256 } else { 512 };
    let entries = mem.words(table);
    for &e in &entries[..n] {
        if e & PRESENT == 0 {
            continue;
        }
        if level == 1 || e & HUGE != 0 {
            if e & WRITABLE == 0 {
                let pages = if level == 1 { 1 } else { 512 };
                for k in 0..pages {
                    *h = h.rotate_left(7) ^ mem.checksum(frame((e & ADDR) + k * 4096));
                }
            }
        } else {
            fp(mem, frame(e & ADDR), level - 1, h, seen);
        }
    }
}

/// Allocate a frame the test owns, filled with a recognisable pattern.
pub fn pattern_frame(mem: &SimMem, seed: u64) -> PhysFrame {
    let f = mem.alloc_frame().expect("test frame");
    for w in 0..512u64 {
        mem.write(f, (w * 8) as usize, &pattern(seed, w * 8).to_le_bytes());
    }
    f
}

pub fn pattern(seed: u64, offset: u64) -> u64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ offset).wrapping_add(0x1234_5678) | 1
}
