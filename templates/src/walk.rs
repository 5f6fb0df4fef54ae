//! The cursor: the only code that walks and changes page tables, and the only code that moves a
//! reference count (docs/engine.md, invariants 2, 3, 8 and 11).
//!
//! * [`Tree`] owns one root (an L4 of count 1) and releases everything below it on drop.
//!   Templates and address spaces each own one; a template's tree marks every entry it writes
//!   with [`LENT_BIT`](crate::LENT_BIT).
//! * [`Reader`] (from `&Tree`): walks, finds leaves, counts, and hands out [`Subtree`]s to attach.
//!   It has no method that writes a table. A sealed `Template` keeps its tree behind an `Arc`,
//!   so a `Reader` is all it can ever give (invariant 1).
//! * [`CursorMut`] (from `&mut Tree` only): the one writer. On its way down it unshares,
//!   allocates missing tables, splits 2 MiB pages, and installs, rewrites or clears entries;
//!   every reference it takes or drops goes with an entry it writes or removes.
//! * [`OwnedPage`]: one counted reference to a data frame (or 2 MiB run, or a piece of one),
//!   released on drop unless a cursor installs it into an entry. [`Subtree`]: a table of a live
//!   template's tree, borrowed from its `Reader`; attaching it borrows it (invariant 11).
//!
//! Ownership rule (invariants 2, 3 and 11): an entry of a space's table is *owned* (counted) or
//! *borrowed* (`LENT_BIT` set: a verbatim copy of a template's entry, counted by that template
//! and kept alive by it, since a space holds its templates until its tree is gone). Every entry
//! of a template's tree is counted. A table is *exclusively owned* by a tree when it is reached
//! through owned entries only; it then has count 1. The cursor writes only to such tables; on
//! its way down it replaces every borrowed table on its path by a verbatim copy (*unshare*),
//! top-down, so only the tables on the path are copied and their siblings stay shared
//! (invariant 4). The copy's entries are the template's, so they are borrowed in turn, and no
//! count moves: an unshare is one frame allocation and one 4 KiB copy.
//!
//! Snapshot (invariant 12): [`CursorMut::snapshot_into`] builds a template from a space's
//! ranges without walking what the space borrows — a template's table covered whole gets one
//! more counted reference, the space's own table covered whole is *lent* (rewritten in place
//! into a template's table, the space's entry becoming borrowed) — so a template's table may
//! have several counted owners, and the last one to release it releases its children.

pub(crate) mod raw;

use crate::entry::{self, span};
use crate::error::Error;
use crate::flush::Flush;
use crate::half::{KernelHalf, KernelHalfId};
use crate::mem::{PhysMem, frame_at};
use alloc::vec::Vec;
use core::marker::PhantomData;
use raw::ENTRIES;
use x86_64::structures::paging::{PhysFrame, Size2MiB};
use x86_64::{PhysAddr, VirtAddr};

/// Entries of an L4 that belong to the lower half: the engine never follows 256..512.
const LOWER_L4: usize = 256;

fn child_range(level: u8) -> core::ops::Range<usize> {
    if level == 4 { 0..LOWER_L4 } else { 0..ENTRIES }
}

#[inline]
fn huge_run(addr: u64) -> PhysFrame<Size2MiB> {
    PhysFrame::containing_address(PhysAddr::new(addr))
}

/// `e` pointing at `addr` instead, every other bit kept.
fn with_addr(e: u64, addr: u64) -> u64 {
    (e & !entry::ADDR_MASK) | addr
}

/// Does entry `e` of a table of a tree hold a counted reference (invariant 11)? In a tree that
/// counts all its entries (`all_counted`: a template's, or a `Mode::Copy` space's) every entry
/// does; in a `Mode::Share` space's, every entry but a borrowed one (`LENT_BIT`).
#[inline]
fn counted(e: u64, all_counted: bool) -> bool {
    all_counted || !entry::lent(e)
}

/// A zeroed table of count 1.
fn alloc_table<M: PhysMem>(mem: &M) -> Result<PhysFrame, Error> {
    let f = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
    raw::zero(mem, f);
    Ok(f)
}

/// Take one more reference to what the counted leaf entry `e` at `level` maps (a 4 KiB frame;
/// for a 2 MiB leaf or a piece of a run, the run's head).
#[inline]
fn retain_leaf<M: PhysMem>(mem: &M, e: u64, level: u8) {
    mem.inc_ref(frame_at(entry::counted_frame(e, level)));
}

/// Drop the reference the counted leaf entry `e` at `level` held.
fn release_leaf<M: PhysMem>(mem: &M, e: u64, level: u8) {
    if level == 1 && !entry::piece(e) {
        mem.dec_ref(frame_at(entry::addr(e)));
    } else {
        mem.dec_ref_huge(huge_run(entry::counted_frame(e, level)));
    }
}

/// Drop one reference to `table` (at `level`, in a tree that counts all its entries if
/// `all_counted`); if it was the last, release what its counted entries point at (borrowed ones
/// are a template's: invariant 11).
///
/// A space's own table has one counted owner (the space); a template's table may have several:
/// its template, and every later template whose incremental snapshot referenced it whole
/// (docs/engine.md, invariant 12). Each owner drops its reference here; only the last one
/// releases the children, and it does so *before* the table's count drops to zero, because a
/// table is freed (and unreadable) once `dec_ref` returns 0. Whether this owner is the last is
/// decided by [`PhysMem::dec_ref_unless_one`], so two owners dropping their references at once
/// (on an SMP kernel whose implementation makes that call atomic) cannot both skip the children.
fn release_table<M: PhysMem>(mem: &M, table: PhysFrame, level: u8, all_counted: bool) {
    if mem.dec_ref_unless_one(table) {
        return;
    }
    // Count 1, and it is ours: no one else can reach the table.
    for (_, e) in raw::entries(mem, table, child_range(level)) {
        if entry::present(e) && counted(e, all_counted) {
            release_entry(mem, e, level, all_counted);
        }
    }
    mem.dec_ref(table);
}

/// Release what the counted entry `e` of a table at `level` points at.
fn release_entry<M: PhysMem>(mem: &M, e: u64, level: u8, all_counted: bool) {
    if entry::is_leaf(e, level) {
        release_leaf(mem, e, level);
    } else {
        release_table(mem, frame_at(entry::addr(e)), level - 1, all_counted);
    }
}

/// A deep copy of the template table `table` for a `Mode::Copy` space (every table below it
/// copied, every data frame retained; the entries keep their `LENT_BIT`, which in a tree that
/// counts all its entries means nothing more): what fork() does. On failure nothing is left
/// allocated.
// Kept out of `attach`, whose `Mode::Share` path is the spawn path.
#[inline(never)]
fn deep_copy<M: PhysMem>(mem: &M, table: PhysFrame, level: u8) -> Result<PhysFrame, Error> {
    let new = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
    if level == 1 {
        raw::copy(mem, table, new);
        for (_, e) in raw::entries(mem, new, 0..ENTRIES) {
            // One test for the common case, a present whole 4 KiB frame (this loop is
            // `Mode::Copy`'s spawn cost).
            if e & (entry::P | entry::PIECE) == entry::P {
                mem.inc_ref(PhysFrame::containing_address(PhysAddr::new(entry::addr(e))));
            } else if entry::present(e) {
                retain_leaf(mem, e, 1);
            }
        }
        return Ok(new);
    }
    raw::zero(mem, new);
    for (i, e) in raw::entries(mem, table, child_range(level)) {
        if !entry::present(e) {
            continue;
        }
        if entry::is_leaf(e, level) {
            retain_leaf(mem, e, level);
            raw::write(mem, new, i, e);
        } else {
            match deep_copy(mem, frame_at(entry::addr(e)), level - 1) {
                Ok(child) => raw::write(mem, new, i, with_addr(e, child.start_address().as_u64())),
                Err(err) => {
                    release_table(mem, new, level, true);
                    return Err(err);
                }
            }
        }
    }
    Ok(new)
}

/// A tree of tables rooted at an L4 of count 1, released on drop. Templates and address spaces
/// each own one; only `&mut Tree` gives a [`CursorMut`].
#[derive(Debug)]
pub(crate) struct Tree<M: PhysMem> {
    mem: M,
    root: PhysFrame,
    /// Every entry is counted and carries `LENT_BIT` (invariant 11): a template's tree (so a
    /// space that copies one of its tables borrows the entries) or a `Mode::Copy` space's
    /// (which borrows nothing). Otherwise a `Mode::Share` space's: `LENT_BIT` means borrowed.
    all_counted: bool,
    /// The kernel half installed in the root's entries 256..512, if any: such a root is offered
    /// to [`PhysMem::keep_root`] on drop, its lower half cleared.
    kernel: Option<KernelHalfId>,
}

impl<M: PhysMem> Tree<M> {
    /// A space's tree with an empty root; `all_counted` for a `Mode::Copy` space.
    pub(crate) fn new(mem: &M, all_counted: bool) -> Result<Self, Error> {
        Ok(Tree {
            mem: mem.clone(),
            root: alloc_table(mem)?,
            all_counted,
            kernel: None,
        })
    }

    /// A template's tree with an empty root: every entry written into it is counted and marked
    /// `LENT_BIT`, so a space that copies one of its tables borrows the entries (invariant 11).
    pub(crate) fn template(mem: &M) -> Result<Self, Error> {
        Self::new(mem, true)
    }

    /// A space's tree whose root's upper half is `kernel`, installed verbatim in entries
    /// 256..512 — the engine never follows, counts, changes or frees them (invariant 6) — and
    /// whose lower half is empty; `all_counted` for a `Mode::Copy` space. Each byte of the root
    /// is written once, and none if the memory hands back a root kept from a dropped space
    /// ([`PhysMem::reuse_root`]: already in that state): this is on the spawn path.
    pub(crate) fn with_kernel(
        mem: &M,
        kernel: &KernelHalf,
        all_counted: bool,
    ) -> Result<Self, Error> {
        let root = match mem.reuse_root(kernel) {
            Some(root) => {
                if cfg!(debug_assertions) {
                    let bad = raw::entries(mem, root, 0..ENTRIES).find(|&(i, e)| {
                        e != if i < LOWER_L4 {
                            0
                        } else {
                            kernel.entries()[i - LOWER_L4]
                        }
                    });
                    if let Some((i, e)) = bad {
                        panic!(
                            "a reused root is not an empty one with this kernel half: entry {i} is {e:#x}"
                        );
                    }
                }
                root
            }
            None => {
                let root = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
                raw::zero_entries(mem, root, 0, LOWER_L4);
                raw::write_entries(mem, root, LOWER_L4, kernel.entries());
                root
            }
        };
        Ok(Tree {
            mem: mem.clone(),
            root,
            all_counted,
            kernel: Some(kernel.id()),
        })
    }

    /// The root table.
    pub(crate) fn root(&self) -> PhysFrame {
        self.root
    }

    /// Does every entry count (a template's tree, or a `Mode::Copy` space's)?
    pub(crate) fn all_counted(&self) -> bool {
        self.all_counted
    }

    /// The memory the tree lives in.
    pub(crate) fn mem(&self) -> &M {
        &self.mem
    }

    /// A read-only walk of the tree.
    #[inline]
    pub(crate) fn reader(&self) -> Reader<'_, M> {
        Reader {
            mem: &self.mem,
            root: self.root,
            all_counted: self.all_counted,
        }
    }

    /// The writing cursor: needs the tree exclusively.
    #[inline]
    pub(crate) fn cursor(&mut self) -> CursorMut<'_, M> {
        CursorMut {
            mem: &self.mem,
            root: self.root,
            all_counted: self.all_counted,
            last: None,
            _tree: PhantomData,
        }
    }
}

impl<M: PhysMem> Drop for Tree<M> {
    fn drop(&mut self) {
        // Releases entries 0..256 only: the kernel half is never followed. A space's borrowed
        // entries are skipped: its templates, dropped after it, release them (invariant 11).
        let Some(kernel) = self.kernel else {
            release_table(&self.mem, self.root, 4, self.all_counted);
            return;
        };
        // A space's root: its tree's alone (no template or other tree points at a root).
        let mem = &self.mem;
        debug_assert_eq!(mem.ref_count(self.root), 1, "a root is its tree's alone");
        for (i, e) in raw::entries(mem, self.root, 0..LOWER_L4) {
            if entry::present(e) {
                if counted(e, self.all_counted) {
                    release_entry(mem, e, 4, self.all_counted);
                }
                raw::write(mem, self.root, i, 0);
            }
        }
        // The lower half is empty again, the kernel half as installed: the memory may keep it.
        if !mem.keep_root(self.root, kernel) {
            mem.dec_ref(self.root);
        }
    }
}

/// A present leaf found by a walk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Leaf {
    /// First address the leaf maps.
    pub va: u64,
    /// 1 for a 4 KiB leaf, 2 for a 2 MiB leaf.
    pub level: u8,
    /// The raw entry.
    pub entry: u64,
}

impl Leaf {
    pub(crate) fn size(&self) -> u64 {
        span(self.level)
    }
    pub(crate) fn end(&self) -> u64 {
        self.va + self.size()
    }
}

/// One counted reference to a data frame (level 1), a 2 MiB run (level 2, counted on its head)
/// or a piece of a run (level 1 with `PIECE_BIT`, counted on the run's head), not yet in any
/// entry. A cursor's `map_page` moves it into a leaf entry; dropped instead, it releases the
/// reference, so an error between allocating and installing a page leaks nothing.
#[must_use = "dropping an OwnedPage releases its frame; install it with CursorMut::map_page"]
pub(crate) struct OwnedPage<'a, M: PhysMem> {
    mem: &'a M,
    /// The frame's address, with `PIECE_BIT` for a piece of a run.
    leaf: u64,
    level: u8,
}

impl<'a, M: PhysMem> OwnedPage<'a, M> {
    /// A fresh zeroed 4 KiB frame (level 1) or 2 MiB run (level 2).
    fn zeroed(mem: &'a M, level: u8) -> Result<Self, Error> {
        let leaf = if level == 1 {
            let f = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
            raw::zero(mem, f);
            f.start_address().as_u64()
        } else {
            let run = mem.alloc_huge_frame().ok_or(Error::OutOfFrames)?;
            let base = run.start_address().as_u64();
            for k in 0..512 {
                raw::zero(mem, frame_at(base + k * entry::SIZE_4K));
            }
            base
        };
        Ok(OwnedPage { mem, leaf, level })
    }

    /// A fresh private copy of the 4 KiB page at `src` (which the caller keeps alive).
    fn copy_of(mem: &'a M, src: u64) -> Result<Self, Error> {
        let f = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
        raw::copy(mem, frame_at(src), f);
        Ok(OwnedPage {
            mem,
            leaf: f.start_address().as_u64(),
            level: 1,
        })
    }

    /// One more reference to what the leaf entry `e` at `level` maps (someone holds it: count
    /// above zero); a piece stays a piece.
    fn retain(mem: &'a M, e: u64, level: u8) -> Self {
        retain_leaf(mem, e, level);
        OwnedPage {
            mem,
            leaf: entry::addr(e) | (e & entry::PIECE),
            level,
        }
    }

    /// Give the reference to an entry: the caller writes the returned address (and its
    /// `PIECE_BIT`) into a leaf entry now.
    fn into_entry(self) -> u64 {
        let leaf = self.leaf;
        core::mem::forget(self);
        leaf
    }
}

impl<M: PhysMem> Drop for OwnedPage<'_, M> {
    fn drop(&mut self) {
        release_leaf(self.mem, self.leaf, self.level);
    }
}

/// A table of a live template's tree that an entry of a space may point at: the L3 under an L4
/// entry (level 3) or the L2 under an L3 entry (level 2). Borrowed from the tree's [`Reader`],
/// so the table stays alive while it exists; [`CursorMut::attach`] borrows it for good (the
/// space holds the template: invariant 11) or deep-copies it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subtree<'a> {
    entry: u64,
    level: u8,
    _tree: PhantomData<&'a ()>,
}

/// A read-only cursor: walks a tree, changes nothing.
pub(crate) struct Reader<'a, M: PhysMem> {
    mem: &'a M,
    root: PhysFrame,
    /// Every entry is counted (see [`Tree`]).
    all_counted: bool,
}

impl<M: PhysMem> Clone for Reader<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M: PhysMem> Copy for Reader<'_, M> {}

impl<'a, M: PhysMem> Reader<'a, M> {
    /// The present leaf mapping `va`, if any.
    pub(crate) fn leaf(&self, va: u64) -> Option<Leaf> {
        self.next_leaf(va, va + 1).filter(|l| l.va <= va)
    }

    /// The first present leaf that intersects `from..end` (skips absent subtrees a whole entry
    /// at a time).
    pub(crate) fn next_leaf(&self, from: u64, end: u64) -> Option<Leaf> {
        let mut va = from;
        'restart: while va < end {
            let mut table = self.root;
            let mut level = 4u8;
            loop {
                let e = raw::read(self.mem, table, entry::index(va, level));
                let base = va & !(span(level) - 1);
                if !entry::present(e) {
                    va = base + span(level);
                    continue 'restart;
                }
                if entry::is_leaf(e, level) {
                    return Some(Leaf {
                        va: base,
                        level,
                        entry: e,
                    });
                }
                table = frame_at(entry::addr(e));
                level -= 1;
            }
        }
        None
    }

    /// A new reference to the page that `leaf` (found by this reader, the tree unchanged since)
    /// maps: to map the same frame in another tree (the unit tests below).
    #[cfg(test)]
    pub(crate) fn share(&self, leaf: &Leaf) -> OwnedPage<'a, M> {
        debug_assert_eq!(self.leaf(leaf.va).map(|l| l.entry), Some(leaf.entry));
        OwnedPage::retain(self.mem, leaf.entry, leaf.level)
    }

    /// The table under root entry `l4` (`slot` `None`: an L3, 512 GiB), or under entry `slot`
    /// of that L3 (an L2, 1 GiB); `None` if absent.
    #[inline]
    pub(crate) fn subtree(&self, l4: usize, slot: Option<usize>) -> Option<Subtree<'a>> {
        if l4 >= LOWER_L4 {
            return None;
        }
        let mut e = raw::read(self.mem, self.root, l4);
        let mut level = 3;
        if let Some(j) = slot {
            if !entry::present(e) {
                return None;
            }
            e = raw::read(self.mem, frame_at(entry::addr(e)), j);
            level = 2;
        }
        // The engine maps 4 KiB and 2 MiB leaves only: L4 and L3 entries are tables.
        (entry::present(e) && !entry::huge(e)).then_some(Subtree {
            entry: e,
            level,
            _tree: PhantomData,
        })
    }

    /// Does this tree (a `Mode::Share` space's) translate `start..end` exactly as `other` (a
    /// template's tree) does, through the same frames, so that a snapshot of that range would
    /// be `other` again? The two trees are walked side by side; an entry equal in both (the
    /// space borrows the template's table or leaf) ends the walk there, so where the space
    /// still reaches the range through the template's own tables this is O(entries of the
    /// range in the tables above them): for a range of whole L4 entries, one read per entry
    /// and tree. An owned leaf matches the template's if only `LENT_BIT` differs (the template
    /// counts the same frame). A table entry the range covers whole must be the template's
    /// own; anything else is "no" (the caller then takes a full snapshot).
    pub(crate) fn same_as(&self, other: &Reader<'_, M>, start: u64, end: u64) -> bool {
        self.same_rec(self.root, other.root, 4, start, end)
    }

    fn same_rec(&self, a: PhysFrame, b: PhysFrame, level: u8, start: u64, end: u64) -> bool {
        let mut va = start;
        while va < end {
            let base = va & !(span(level) - 1);
            let next = base + span(level);
            let i = entry::index(va, level);
            let (x, y) = (raw::read(self.mem, a, i), raw::read(self.mem, b, i));
            va = next;
            if x == y {
                // Both absent, or the space's entry is the template's own, verbatim (borrowed:
                // it carries `LENT_BIT`, as every entry of a template does).
                continue;
            }
            let covered = base >= start && next <= end;
            if !entry::present(y) && !covered && entry::present(x) && !entry::is_leaf(x, level) {
                // A table the template did not need (nothing of the ranges under it) is fine
                // if it has nothing in the range.
                let (from, to) = (base.max(start), end.min(next));
                if self.next_leaf_in(frame_at(entry::addr(x)), level - 1, from, to) {
                    return false;
                }
                continue;
            }
            if !entry::present(x) || !entry::present(y) {
                return false;
            }
            let leaf = entry::is_leaf(x, level);
            if leaf != entry::is_leaf(y, level) {
                return false;
            }
            if leaf {
                if !covered || x | entry::LENT != y {
                    return false;
                }
            } else if covered
                || !self.same_rec(
                    frame_at(entry::addr(x)),
                    frame_at(entry::addr(y)),
                    level - 1,
                    base.max(start),
                    end.min(next),
                )
            {
                return false;
            }
        }
        true
    }

    /// Is a leaf present in `start..end` under `table` (at `level`)?
    fn next_leaf_in(&self, table: PhysFrame, level: u8, start: u64, end: u64) -> bool {
        let mut va = start;
        while va < end {
            let base = va & !(span(level) - 1);
            let next = base + span(level);
            let e = raw::read(self.mem, table, entry::index(va, level));
            if entry::present(e) {
                if entry::is_leaf(e, level) {
                    return true;
                }
                let (from, to) = (base.max(start), end.min(next));
                if self.next_leaf_in(frame_at(entry::addr(e)), level - 1, from, to) {
                    return true;
                }
            }
            va = next;
        }
        false
    }

    /// Tables below the root and leaf entries in the lower half (a diagnostic walk).
    pub(crate) fn count(&self) -> (usize, usize) {
        let mut n = (0, 0);
        self.count_rec(self.root, 4, &mut n);
        n
    }

    fn count_rec(&self, table: PhysFrame, level: u8, n: &mut (usize, usize)) {
        for i in child_range(level) {
            let e = raw::read(self.mem, table, i);
            if !entry::present(e) {
                continue;
            }
            if entry::is_leaf(e, level) {
                n.1 += 1;
            } else {
                n.0 += 1;
                self.count_rec(frame_at(entry::addr(e)), level - 1, n);
            }
        }
    }

    /// Walk the whole lower half, counting owned and shared tables.
    pub(crate) fn account(&self, s: &mut SpaceStats) {
        s.tables_owned += 1; // the root
        self.account_rec(self.root, 4, true, s);
    }

    fn account_rec(&self, table: PhysFrame, level: u8, owned: bool, s: &mut SpaceStats) {
        let mem = self.mem;
        for i in child_range(level) {
            let e = raw::read(mem, table, i);
            if !entry::present(e) {
                continue;
            }
            let target = frame_at(entry::addr(e));
            let counted = counted(e, self.all_counted);
            if entry::is_leaf(e, level) {
                let pages = (span(level) / entry::SIZE_4K) as usize;
                if owned {
                    s.pages_in_owned_tables += pages;
                    let head = frame_at(entry::counted_frame(e, level));
                    if counted && mem.ref_count(head) == 1 {
                        s.private_pages += pages;
                    }
                } else {
                    s.pages_in_shared_tables += pages;
                }
                continue;
            }
            let child_owned = owned && counted && mem.ref_count(target) == 1;
            if child_owned {
                s.tables_owned += 1;
            } else {
                s.tables_shared += 1;
                if owned {
                    s.shared_attachments += 1;
                }
            }
            self.account_rec(target, level - 1, child_owned, s);
        }
    }
}

/// What the first phase of a snapshot leaves for later (see [`CursorMut::snapshot_into`]).
struct SnapshotPlan {
    /// Owned subtrees the ranges cover whole, to lend: (the space's table holding the entry,
    /// its index, the template's table to hold it, their level, the first address).
    lend: Vec<(PhysFrame, usize, PhysFrame, u8, u64)>,
    /// Leaves at partly covered positions whose bits change: (address, level, new entry).
    rewrite: Vec<(u64, u8, u64)>,
}

/// The writing cursor over one tree, borrowed exclusively (`Tree::cursor(&mut self)`).
pub(crate) struct CursorMut<'a, M: PhysMem> {
    mem: &'a M,
    root: PhysFrame,
    /// Every entry is counted; every entry written is marked `LENT_BIT` (see [`Tree`]).
    all_counted: bool,
    /// The last exclusively owned leaf table found: (its level, the first address it covers,
    /// the table). An owned table stays owned while the cursor lives (nothing else can reach
    /// it); only `clear` can free it, and `clear` forgets it.
    last: Option<(u8, u64, PhysFrame)>,
    _tree: PhantomData<&'a mut Tree<M>>,
}

impl<'a, M: PhysMem> CursorMut<'a, M> {
    /// Read-only walks of the same tree.
    pub(crate) fn reader(&self) -> Reader<'_, M> {
        Reader {
            mem: self.mem,
            root: self.root,
            all_counted: self.all_counted,
        }
    }

    /// A new reference to a page the caller holds (count above zero: a template's given
    /// backing), to `map_page`.
    pub(crate) fn given_page(&self, addr: PhysAddr, level: u8) -> OwnedPage<'a, M> {
        OwnedPage::retain(self.mem, addr.as_u64(), level)
    }

    /// Is entry `e` of one of this tree's tables borrowed (invariant 11)? Only a `Mode::Share`
    /// space's can be.
    #[inline]
    fn borrowed(&self, e: u64) -> bool {
        !counted(e, self.all_counted)
    }

    /// The ownership bit every entry this cursor writes carries: `LENT_BIT` in a tree that
    /// counts all its entries, none in a `Mode::Share` space's (its own entries are counted).
    #[inline]
    fn lend(&self) -> u64 {
        if self.all_counted { entry::LENT } else { 0 }
    }

    /// Make entry `i` of the owned `table` (at `level`) point at an exclusively owned child
    /// table: unshare it if the entry is borrowed, allocate it if absent and `alloc`.
    /// `Ok(None)`: absent and not `alloc`. A huge leaf in the way is `SplitsHugePage`.
    fn own_child(
        &mut self,
        table: PhysFrame,
        level: u8,
        i: usize,
        va: u64,
        alloc: bool,
    ) -> Result<Option<PhysFrame>, Error> {
        let mem = self.mem;
        let e = raw::read(mem, table, i);
        if !entry::present(e) {
            if !alloc {
                return Ok(None);
            }
            let child = alloc_table(mem)?;
            let t = entry::table(child.start_address().as_u64()) | self.lend();
            raw::write(mem, table, i, t);
            return Ok(Some(child));
        }
        if entry::is_leaf(e, level) {
            return Err(Error::SplitsHugePage { addr: va });
        }
        let child = frame_at(entry::addr(e));
        if !self.borrowed(e) {
            // Counted, in an exclusively owned table: only this tree reaches it (invariant 11).
            debug_assert_eq!(
                mem.ref_count(child),
                1,
                "an owned table is its tree's alone"
            );
            return Ok(Some(child));
        }
        // Unshare a borrowed table (invariants 4 and 11): a verbatim copy. The original is a
        // template's table, so every entry of the copy is a template's (`LENT_BIT`) and is
        // borrowed in turn: no count moves. Only the entry pointing at the copy is owned.
        let copy = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
        raw::copy(mem, child, copy);
        let own = e & !entry::LENT;
        raw::write(mem, table, i, with_addr(own, copy.start_address().as_u64()));
        Ok(Some(copy))
    }

    /// The exclusively owned table at `level` (1: an L1 for a 4 KiB leaf; 2: an L2 for a 2 MiB
    /// leaf) on `va`'s path, unsharing every shared table above it top-down and allocating
    /// missing ones if `alloc`. `Ok(None)`: the path is absent and `alloc` is false.
    fn owned_table(&mut self, va: u64, level: u8, alloc: bool) -> Result<Option<PhysFrame>, Error> {
        let base = va & !(span(level + 1) - 1);
        if let Some((l, b, t)) = self.last
            && l == level
            && b == base
        {
            return Ok(Some(t));
        }
        let mut table = self.root;
        let mut l = 4u8;
        while l > level {
            match self.own_child(table, l, entry::index(va, l), va, alloc)? {
                Some(child) => table = child,
                None => return Ok(None),
            }
            l -= 1;
        }
        self.last = Some((level, base, table));
        Ok(Some(table))
    }

    /// Install `page` at `va` as a leaf with the flag bits of `flags` (a leaf entry whose
    /// address is ignored), unsharing and allocating the path. The entry must be absent
    /// (`Overlap` otherwise); it was not present, so there is nothing to flush. On error the page
    /// is released and the translations are unchanged.
    pub(crate) fn map_page(
        &mut self,
        va: u64,
        page: OwnedPage<'_, M>,
        flags: u64,
    ) -> Result<(), Error> {
        let level = page.level;
        debug_assert!(entry::present(flags) && entry::huge(flags) == (level == 2));
        let t = self
            .owned_table(va, level, true)?
            .ok_or(Error::OutOfFrames)?;
        let i = entry::index(va, level);
        if entry::present(raw::read(self.mem, t, i)) {
            return Err(Error::Overlap { addr: va });
        }
        // Ownership bits come from the page and the tree, never from `flags` (invariant 11).
        let bits = flags & !(entry::LENT | entry::PIECE) | self.lend();
        raw::write(self.mem, t, i, with_addr(bits, 0) | page.into_entry());
        Ok(())
    }

    /// Map a fresh zeroed page of `level` (1: 4 KiB, 2: 2 MiB) at `va`, with the flag bits of
    /// `flags`, as [`map_page`](Self::map_page) does. The path is made first and the page
    /// allocated last, so frames are taken in the order the tables are walked.
    pub(crate) fn map_zeroed(&mut self, va: u64, level: u8, flags: u64) -> Result<(), Error> {
        self.owned_table(va, level, true)?;
        let page = OwnedPage::zeroed(self.mem, level)?;
        self.map_page(va, page, flags)
    }

    /// The entry of the present leaf at `va` (level `level`) in its owned table.
    fn owned_leaf(&mut self, va: u64, level: u8) -> Result<(PhysFrame, usize, u64), Error> {
        let t = self
            .owned_table(va, level, false)?
            .ok_or(Error::NotMapped { addr: va })?;
        let i = entry::index(va, level);
        let e = raw::read(self.mem, t, i);
        if !entry::present(e) || !entry::is_leaf(e, level) {
            return Err(Error::NotMapped { addr: va });
        }
        Ok((t, i, e))
    }

    /// Make the copy-on-write leaf at `va` (level `level`) writable for this tree: unshare its
    /// path, then take its frame over if its entry is owned and no one else references the
    /// frame, or else point the entry at a private copy (dropping the reference to the original
    /// if the entry held one; a borrowed one held none: invariant 11). A 2 MiB leaf is split
    /// first ([`split_huge`](Self::split_huge)): only the 4 KiB page containing `va` is copied.
    /// On error nothing visible changed.
    pub(crate) fn break_cow(&mut self, va: u64, level: u8) -> Result<Flush, Error> {
        let (t, i, e) = self.owned_leaf(va, level)?;
        if level == 2 {
            return self.split_huge(va, t, i, e);
        }
        let mem = self.mem;
        let writable = entry::with_write(e, true, false);
        let owned = !self.borrowed(e);
        if owned && mem.ref_count(frame_at(entry::counted_frame(e, 1))) == 1 {
            // No one else sees this frame (or run): take it over.
            raw::write(mem, t, i, writable);
        } else {
            let copy = OwnedPage::copy_of(mem, entry::addr(e))?;
            let bits = writable & !(entry::LENT | entry::PIECE) | self.lend();
            raw::write(mem, t, i, with_addr(bits, 0) | copy.into_entry());
            if owned {
                release_leaf(mem, e, 1);
            }
        }
        Ok(Flush::Page(VirtAddr::new(va)))
    }

    /// A write to the copy-on-write 2 MiB leaf `e` (entry `i` of this tree's owned L2 `l2`) at
    /// `va`: replace it by an owned L1 of 512 copy-on-write 4 KiB leaves, one per piece of the
    /// run (`PIECE_BIT`), the piece containing `va` copied and writable. A borrowed leaf gives
    /// borrowed pieces (no count moves: the template keeps the run, invariant 11); an owned one
    /// (`Mode::Copy`) gives owned pieces, each counted on the run's head. Two frames are taken:
    /// the L1 and the copy. On error nothing visible changed.
    fn split_huge(&mut self, va: u64, l2: PhysFrame, i: usize, e: u64) -> Result<Flush, Error> {
        let mem = self.mem;
        let l1 = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
        let run = entry::addr(e);
        let k = entry::index(va, 1);
        let copy = match OwnedPage::copy_of(mem, run + k as u64 * entry::SIZE_4K) {
            Ok(p) => p,
            Err(err) => {
                mem.dec_ref(l1);
                return Err(err);
            }
        };
        // A 4 KiB leaf has no `HUGE_PAGE` (bit 7 is PAT there); everything else is kept.
        let piece = with_addr(e, 0) & !entry::huge_bit() | entry::PIECE;
        raw::write_run(mem, l1, piece | run, entry::SIZE_4K);
        let mine = entry::with_write(piece, true, false) & !(entry::LENT | entry::PIECE);
        raw::write(mem, l1, k, mine | self.lend() | copy.into_entry());
        if !self.borrowed(e) {
            // 511 owned pieces: the leaf's own reference is one, take the other 510.
            let head = frame_at(run);
            for _ in 0..ENTRIES - 2 {
                mem.inc_ref(head);
            }
        }
        raw::write(
            mem,
            l2,
            i,
            entry::table(l1.start_address().as_u64()) | self.lend(),
        );
        // One `invlpg` in the 2 MiB page drops its TLB entry.
        Ok(Flush::Page(VirtAddr::new(va & !(entry::SIZE_2M - 1))))
    }

    /// Phase 1 of a leaf rewrite: unshare the path to the leaf at `va` so that
    /// [`rewrite_leaf`](Self::rewrite_leaf) cannot fail. Changes no translation.
    pub(crate) fn unshare_path(&mut self, va: u64, level: u8) -> Result<(), Error> {
        self.owned_leaf(va, level).map(|_| ())
    }

    /// Replace the flag bits of the present leaf at `va` with those of `flags`; the frame (and
    /// so every count) stays as it is.
    pub(crate) fn rewrite_leaf(&mut self, va: u64, level: u8, flags: u64) -> Result<Flush, Error> {
        let (t, i, e) = self.owned_leaf(va, level)?;
        debug_assert!(entry::present(flags) && entry::huge(flags) == entry::huge(e));
        // The frame and how the entry holds it (owned or borrowed, piece) stay (invariant 11).
        let keep = entry::LENT | entry::PIECE;
        let bits = flags & !keep | e & keep;
        raw::write(self.mem, t, i, with_addr(bits, entry::addr(e)));
        Ok(Flush::Page(VirtAddr::new(va)))
    }

    /// Attach `sub` (a table of a template) at root entry `l4` if `slot` is `None` (an L3:
    /// 512 GiB), or at entry `slot` of this tree's own L3 under root entry `l4` (an L2: 1 GiB).
    /// A `Mode::Share` space borrows it: the entry is the template's own, `LENT_BIT` and all,
    /// and no count moves (the space holds the template: invariant 11). A tree that counts all
    /// its entries (`Mode::Copy`) attaches a deep copy instead. The target entry must be absent
    /// (`SlotConflict` otherwise). Absent before: nothing to flush.
    pub(crate) fn attach(
        &mut self,
        l4: usize,
        slot: Option<usize>,
        sub: Subtree<'_>,
    ) -> Result<(), Error> {
        let mem = self.mem;
        let slot_addr = ((l4 as u64) << 39) | ((slot.unwrap_or(0) as u64) << 30);
        if l4 >= LOWER_L4 || sub.level != if slot.is_none() { 3 } else { 2 } {
            return Err(Error::NotLowerHalf { addr: slot_addr });
        }
        let (table, i) = match slot {
            None => (self.root, l4),
            Some(j) => {
                let l3 = self
                    .own_child(self.root, 4, l4, 0, true)?
                    .ok_or(Error::OutOfFrames)?;
                (l3, j)
            }
        };
        if entry::present(raw::read(mem, table, i)) {
            return Err(Error::SlotConflict { slot: slot_addr });
        }
        debug_assert!(entry::lent(sub.entry), "a subtree is a template's");
        let e = if self.all_counted {
            let c = deep_copy(mem, frame_at(entry::addr(sub.entry)), sub.level)?;
            with_addr(sub.entry, c.start_address().as_u64())
        } else {
            sub.entry
        };
        raw::write(mem, table, i, e);
        Ok(())
    }

    /// Copy `ranges` (sorted, disjoint, not touching, 4 KiB aligned, lower half) of this tree
    /// into `dst`, the cursor of a fresh, empty template tree: the work of
    /// `AddressSpace::snapshot` (docs/engine.md, invariant 12). `bits(va, e)` gives the leaf
    /// entry `e` at `va` as the template must have it (a writable `Private` page becomes
    /// copy-on-write); this tree's leaf takes the same bits.
    ///
    /// In a `Mode::Share` space only the space's own tables are walked. A table the range
    /// covers whole and that the space reaches through a borrowed entry (a template's table,
    /// sealed) is referenced by `dst` as it is: one `inc_ref`. One the range covers whole and
    /// that the space owns is *lent*: its entries are rewritten in place into a template's
    /// (every one counted and marked `LENT_BIT`: an owned entry's reference moves to the
    /// template, a borrowed one is taken anew, writable `Private` leaves become copy-on-write),
    /// `dst` takes the space's reference to it, and the space's entry becomes borrowed — so the
    /// space must hold the new template for as long as its tree lives (invariant 11). Tables
    /// the range covers in part are walked: `dst` gets its own tables there, with a counted
    /// reference to every leaf in the range. A tree that counts all its entries
    /// (`Mode::Copy`) is walked down to every leaf (what fork() costs) and lends nothing.
    ///
    /// Three phases, so that on error nothing visible changed and nothing leaked (invariant
    /// 10): build `dst`'s tables and take its references (a failure drops `dst`, which gives
    /// them back); unshare the paths of leaves at partly covered positions whose bits change
    /// (invisible); then, allocating nothing, rewrite those leaves and lend the owned tables.
    /// Returns the flush for this tree (`Flush::All` if a leaf lost `WRITABLE`, else
    /// `Flush::None`) and whether a table was lent.
    ///
    /// `replaced`: the cursor of a template tree that is dropped right after this snapshot if it
    /// lends a table, and that nothing else can reach (its template's only handle). Where a
    /// table being lent borrows an entry that the same position of `replaced` holds, through
    /// tables only `replaced` reaches (count 1 all the way down from its root), the reference
    /// moves: `replaced`'s entry is cleared instead of the new template taking one more, which
    /// `replaced`'s drop would then give back. So re-sealing after a write costs the entries of
    /// the tables on the written path once, not twice plus the old template's release.
    pub(crate) fn snapshot_into(
        &mut self,
        dst: &mut CursorMut<'_, M>,
        ranges: &[(u64, u64)],
        bits: &dyn Fn(u64, u64) -> u64,
        mut replaced: Option<&mut CursorMut<'_, M>>,
    ) -> Result<(Flush, bool), Error> {
        debug_assert!(dst.all_counted, "a snapshot builds a template's tree");
        let mut plan = SnapshotPlan {
            lend: Vec::new(),
            rewrite: Vec::new(),
        };
        for &(start, end) in ranges {
            self.plan_rec(self.root, dst.root, 4, start, end, bits, &mut plan)?;
        }
        // Phase 2: the leaves to rewrite in place, in exclusively owned tables (unshared now).
        let mut fixes = Vec::with_capacity(plan.rewrite.len());
        for &(va, level, new) in &plan.rewrite {
            let (t, i, e) = self.owned_leaf(va, level)?;
            // The frame and how the entry holds it (owned or borrowed, piece) stay.
            let keep = entry::LENT | entry::PIECE;
            fixes.push((t, i, with_addr(new & !keep | e & keep, entry::addr(e))));
        }
        // Phase 3: nothing below can fail.
        let mem = self.mem;
        let mut changed = !fixes.is_empty();
        for (t, i, e) in fixes {
            raw::write(mem, t, i, e);
        }
        let lent = !plan.lend.is_empty();
        for &(s, i, d, level, va) in &plan.lend {
            let e = raw::read(mem, s, i);
            let from = replaced
                .as_deref_mut()
                .and_then(|r| r.sole_table(va, level - 1));
            changed |= self.lend_subtree(frame_at(entry::addr(e)), level - 1, va, bits, from);
            // The template's entry takes the space's reference; the space's is borrowed now.
            raw::write(mem, d, i, e | entry::LENT);
            raw::write(mem, s, i, e | entry::LENT);
        }
        // A cached leaf table may have been lent: it is the template's now.
        self.last = None;
        let flush = if changed { Flush::All } else { Flush::None };
        Ok((flush, lent))
    }

    /// Phase 1 of [`snapshot_into`](Self::snapshot_into) for `start..end` inside the table `s`
    /// of this tree at `level`, whose counterpart in the template tree is `d` (its own, fresh).
    /// Returns whether `d` got (or will get, in phase 3) an entry.
    #[allow(clippy::too_many_arguments)]
    fn plan_rec(
        &mut self,
        s: PhysFrame,
        d: PhysFrame,
        level: u8,
        start: u64,
        end: u64,
        bits: &dyn Fn(u64, u64) -> u64,
        plan: &mut SnapshotPlan,
    ) -> Result<bool, Error> {
        let mem = self.mem;
        let mut any = false;
        let mut va = start;
        while va < end {
            let base = va & !(span(level) - 1);
            let next = base + span(level);
            let i = entry::index(va, level);
            let e = raw::read(mem, s, i);
            va = next;
            if !entry::present(e) {
                continue;
            }
            let covered = base >= start && next <= end;
            if entry::is_leaf(e, level) {
                if !covered {
                    return Err(Error::SplitsHugePage { addr: base });
                }
                let new = bits(base, e);
                // The template's own counted reference (a piece: on its run's head).
                let page = OwnedPage::retain(mem, e, level);
                let keep = entry::LENT | entry::PIECE;
                raw::write(
                    mem,
                    d,
                    i,
                    with_addr(new & !keep, 0) | entry::LENT | page.into_entry(),
                );
                if new != e {
                    plan.rewrite.push((base, level, new));
                }
                any = true;
                continue;
            }
            let child = frame_at(entry::addr(e));
            if covered && self.borrowed(e) {
                // A template's table, sealed: the new template references it as it is.
                mem.inc_ref(child);
                raw::write(mem, d, i, e);
                any = true;
            } else if covered && !self.all_counted {
                // The space's own subtree: lent in phase 3 (it may not change before then).
                plan.lend.push((s, i, d, level, base));
                any = true;
            } else {
                // In part (or a tree that borrows nothing): the template's own table, made by
                // an earlier range through the same table or else now. Linked first, so that
                // an error below leaves it to `dst`'s drop.
                let de = raw::read(mem, d, i);
                let (dc, fresh) = if entry::present(de) {
                    (frame_at(entry::addr(de)), false)
                } else {
                    let dc = alloc_table(mem)?;
                    let t = entry::table(dc.start_address().as_u64()) | entry::LENT;
                    raw::write(mem, d, i, t);
                    (dc, true)
                };
                let (from, to) = (base.max(start), end.min(next));
                if self.plan_rec(child, dc, level - 1, from, to, bits, plan)? || !fresh {
                    any = true;
                } else {
                    // Nothing of the ranges there: no empty table in the template.
                    raw::write(mem, d, i, 0);
                    mem.dec_ref(dc);
                }
            }
        }
        Ok(any)
    }

    /// Phase 3 of a snapshot: turn the exclusively owned `table` (at `level`, mapping from `va`)
    /// and everything it owns below into a template's tables, in place (see
    /// [`snapshot_into`](Self::snapshot_into)). Allocates nothing. Returns whether a leaf's
    /// bits changed (lost `WRITABLE`).
    ///
    /// `from`: the table at the same position of a replaced template's tree that only that
    /// template reaches (see [`snapshot_into`](Self::snapshot_into)); a borrowed entry equal to
    /// its entry there takes that reference over (the entry there is cleared).
    fn lend_subtree(
        &self,
        table: PhysFrame,
        level: u8,
        va: u64,
        bits: &dyn Fn(u64, u64) -> u64,
        from: Option<PhysFrame>,
    ) -> bool {
        let mem = self.mem;
        let mut changed = false;
        for (i, e) in raw::entries(mem, table, 0..ENTRIES) {
            if !entry::present(e) {
                continue;
            }
            let at = va + i as u64 * span(level);
            let old = from.map_or(0, |f| raw::read(mem, f, i));
            let borrowed = self.borrowed(e);
            let moved = borrowed && old == e;
            if moved {
                // The replaced template's reference, which its drop would give back: the new
                // template takes it over instead of taking one more.
                raw::write(mem, from.expect("`old` is 0 without `from`"), i, 0);
            }
            let new = if entry::is_leaf(e, level) {
                let b = bits(at, e);
                changed |= b != e;
                if borrowed && !moved {
                    // The template counts every entry: take the reference it did not hold.
                    retain_leaf(mem, e, level);
                }
                b
            } else {
                let child = frame_at(entry::addr(e));
                if borrowed {
                    if !moved {
                        mem.inc_ref(child);
                    }
                } else {
                    debug_assert_eq!(mem.ref_count(child), 1, "an owned table");
                    // The replaced template's table at the same position, if only it reaches it.
                    let below = (entry::present(old) && !entry::is_leaf(old, level))
                        .then(|| frame_at(entry::addr(old)))
                        .filter(|&c| mem.ref_count(c) == 1);
                    changed |= self.lend_subtree(child, level - 1, at, bits, below);
                }
                e
            };
            if new | entry::LENT != e {
                // A borrowed entry already is a template's, as it stays: no need to write it.
                raw::write(mem, table, i, new | entry::LENT);
            }
        }
        changed
    }

    /// The table at `level` on `va`'s path in this tree (a replaced template's), if every table
    /// on the path, root included, has count 1: reached by this tree alone, so its entries are
    /// released when the tree is dropped.
    fn sole_table(&mut self, va: u64, level: u8) -> Option<PhysFrame> {
        let mem = self.mem;
        let mut table = self.root;
        if mem.ref_count(table) != 1 {
            return None;
        }
        let mut l = 4u8;
        while l > level {
            let e = raw::read(mem, table, entry::index(va, l));
            if !entry::present(e) || entry::is_leaf(e, l) {
                return None;
            }
            table = frame_at(entry::addr(e));
            if mem.ref_count(table) != 1 {
                return None;
            }
            l -= 1;
        }
        Some(table)
    }

    /// Phase 1 of removing `start..end` (4 KiB aligned): unshare every table that the range
    /// covers only partially and that has present entries in it, so that phase 2 can write.
    /// Checks that no 2 MiB leaf is split. Changes no translation.
    pub(crate) fn prepare_clear(&mut self, start: u64, end: u64) -> Result<(), Error> {
        self.prepare_rec(self.root, 4, start, end)
    }

    fn prepare_rec(
        &mut self,
        table: PhysFrame,
        level: u8,
        start: u64,
        end: u64,
    ) -> Result<(), Error> {
        let mut va = start;
        while va < end {
            let base = va & !(span(level) - 1);
            let next = base + span(level);
            let i = entry::index(va, level);
            let e = raw::read(self.mem, table, i);
            let covered = base >= start && next <= end;
            if entry::present(e) && !covered {
                if entry::is_leaf(e, level) {
                    return Err(Error::SplitsHugePage { addr: base });
                }
                if let Some(child) = self.own_child(table, level, i, va, false)? {
                    self.prepare_rec(child, level - 1, va, end.min(next))?;
                }
            }
            va = next;
        }
        Ok(())
    }

    /// Phase 2: clear every entry in `start..end`, releasing whole subtrees where the range
    /// covers them. Needs a successful `prepare_clear` on the same range; allocates nothing.
    pub(crate) fn clear(&mut self, start: u64, end: u64) -> Flush {
        // A cached leaf table may be freed below.
        self.last = None;
        self.clear_rec(self.root, 4, start, end);
        Flush::range(start, end)
    }

    fn clear_rec(&mut self, table: PhysFrame, level: u8, start: u64, end: u64) {
        let mem = self.mem;
        let mut va = start;
        while va < end {
            let base = va & !(span(level) - 1);
            let next = base + span(level);
            let i = entry::index(va, level);
            let e = raw::read(mem, table, i);
            if entry::present(e) {
                if base >= start && next <= end {
                    raw::write(mem, table, i, 0);
                    // A borrowed entry held no reference (invariant 11).
                    if counted(e, self.all_counted) {
                        release_entry(mem, e, level, self.all_counted);
                    }
                } else {
                    let child = frame_at(entry::addr(e));
                    debug_assert!(!self.borrowed(e), "prepare_clear unshared the path");
                    self.clear_rec(child, level - 1, va, end.min(next));
                }
            }
            va = next;
        }
    }
}

/// Page-table accounting of one space (a diagnostic walk of its lower half).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// Tables exclusively owned by the space, root included: its page-table memory.
    pub tables_owned: usize,
    /// Tables reachable only through shared tables or shared themselves (template tables).
    pub tables_shared: usize,
    /// Entries of owned tables that point at shared tables (attachments).
    pub shared_attachments: usize,
    /// 4 KiB pages mapped by leaves in owned tables.
    pub pages_in_owned_tables: usize,
    /// 4 KiB pages mapped by leaves in shared tables.
    pub pages_in_shared_tables: usize,
    /// 4 KiB pages of frames referenced only by this space (private data).
    pub private_pages: usize,
}

impl SpaceStats {
    /// Page-table bytes this space costs on its own.
    pub fn page_table_bytes(&self) -> usize {
        self.tables_owned * entry::SIZE_4K as usize
    }
}

#[cfg(test)]
mod tests {
    //! The owned-entry API on its own, over simulated memory: every reference it takes is given
    //! back, and the cursor never writes through a table it has freed.

    use super::*;
    use crate::sim::SimMem;

    const GIB: u64 = 1 << 30;

    fn rw() -> u64 {
        entry::leaf(0, 1, true, false, false)
    }

    fn count(mem: &SimMem, addr: u64) -> u32 {
        mem.ref_count(frame_at(addr))
    }

    #[test]
    fn a_page_is_released_unless_installed_and_an_occupied_entry_is_refused() {
        let mem = SimMem::new(64);
        let mut tree = Tree::new(&mem, false).unwrap();
        let root_only = mem.frames_in_use();
        let mut c = tree.cursor();
        drop(OwnedPage::zeroed(&mem, 1).unwrap());
        assert_eq!(mem.frames_in_use(), root_only, "a dropped page is freed");
        let page = OwnedPage::zeroed(&mem, 1).unwrap();
        let addr = page.leaf;
        c.map_page(GIB, page, rw()).unwrap();
        // Root + L3 + L2 + L1 + the page.
        assert_eq!(mem.frames_in_use(), root_only + 4);
        let other = OwnedPage::zeroed(&mem, 1).unwrap();
        assert_eq!(
            c.map_page(GIB, other, rw()),
            Err(Error::Overlap { addr: GIB })
        );
        assert_eq!(
            mem.frames_in_use(),
            root_only + 4,
            "the refused page is freed"
        );
        let leaf = c.reader().leaf(GIB + 8).unwrap();
        assert_eq!(entry::addr(leaf.entry), addr);
        assert_eq!(count(&mem, addr), 1);
        drop(tree);
        assert_eq!(mem.frames_in_use(), 0);
    }

    #[test]
    fn clear_forgets_the_cached_table_it_frees() {
        let mem = SimMem::new(64);
        let mut tree = Tree::new(&mem, false).unwrap();
        let mut c = tree.cursor();
        let p = OwnedPage::zeroed(&mem, 1).unwrap();
        c.map_page(GIB, p, rw()).unwrap();
        // Covers root entry 0 whole: its L3, L2 and L1 (the cached table) are freed.
        c.prepare_clear(0, 512 * GIB).unwrap();
        assert_eq!(c.clear(0, 512 * GIB), Flush::range(0, 512 * GIB));
        assert_eq!(mem.frames_in_use(), 1, "only the root is left");
        // The same L1 range again: a stale cached table would take the write (and the freed
        // frame may already be reused as this very page).
        let p = OwnedPage::zeroed(&mem, 1).unwrap();
        let addr = p.leaf;
        c.map_page(GIB + 4096, p, rw()).unwrap();
        let leaf = c
            .reader()
            .leaf(GIB + 4096)
            .expect("mapped through fresh tables");
        assert_eq!(entry::addr(leaf.entry), addr);
        assert_eq!(mem.frames_in_use(), 5);
        drop(tree);
        assert_eq!(mem.frames_in_use(), 0);
    }

    #[test]
    fn attach_borrows_and_refuses_an_occupied_entry() {
        let mem = SimMem::new(64);
        let mut template = Tree::template(&mem).unwrap();
        {
            let mut c = template.cursor();
            for va in [GIB, 2 * GIB] {
                let p = OwnedPage::zeroed(&mem, 1).unwrap();
                c.map_page(va, p, rw()).unwrap();
            }
        }
        let l4e = raw::read(&mem, template.root(), 0);
        assert!(entry::lent(l4e), "a template's entries are marked lent");
        let l3 = entry::addr(l4e);
        let sealed = &template;
        let whole = sealed.reader().subtree(0, None).unwrap();
        let mut space = Tree::new(&mem, false).unwrap();
        let mut c = space.cursor();
        c.attach(0, None, whole).unwrap();
        assert_eq!(count(&mem, l3), 1, "borrowed: no count moves");
        assert_eq!(
            raw::read(&mem, c.root, 0),
            l4e,
            "the template's entry, verbatim"
        );
        assert_eq!(
            c.attach(0, None, whole),
            Err(Error::SlotConflict { slot: 0 })
        );
        assert_eq!(count(&mem, l3), 1, "a refused attach takes nothing");
        drop(space);
        assert_eq!(
            count(&mem, l3),
            1,
            "dropping the space releases nothing it borrowed"
        );

        // Per 1 GiB slot, into a tree that counts every entry (`Mode::Copy`): a deep copy whose
        // tables are its own, the pages +1.
        let mut space = Tree::new(&mem, true).unwrap();
        let mut c = space.cursor();
        let slot1 = sealed.reader().subtree(0, Some(1)).unwrap();
        let l2 = entry::addr(slot1.entry);
        let page = entry::addr(sealed.reader().leaf(GIB).unwrap().entry);
        c.attach(0, Some(1), slot1).unwrap();
        assert_eq!((count(&mem, l2), count(&mem, page)), (1, 2));
        let mine = c.reader().leaf(GIB).unwrap();
        assert_eq!(entry::addr(mine.entry), page);
        assert!(sealed.reader().subtree(0, Some(3)).is_none());
        drop(space);
        assert_eq!(count(&mem, page), 1);
        drop(template);
        assert_eq!(mem.frames_in_use(), 0);
    }

    #[test]
    fn unshare_copies_a_borrowed_table_verbatim_and_moves_no_count() {
        let mem = SimMem::new(64);
        let mut template = Tree::template(&mem).unwrap();
        let cow = entry::leaf(0, 1, false, false, true);
        {
            let mut c = template.cursor();
            for va in [GIB, GIB + 4096] {
                let p = OwnedPage::zeroed(&mem, 1).unwrap();
                c.map_page(va, p, cow).unwrap();
            }
        }
        let counts = |mem: &SimMem| {
            let mut v = mem.allocated();
            v.sort();
            v
        };
        let before = counts(&mem);
        let mut space = Tree::new(&mem, false).unwrap();
        let mut c = space.cursor();
        c.attach(0, None, template.reader().subtree(0, None).unwrap())
            .unwrap();
        let theirs = template.reader().leaf(GIB + 4096).unwrap();
        c.unshare_path(GIB + 4096, 1).unwrap();
        let mine = c.reader().leaf(GIB + 4096).unwrap();
        assert_eq!(
            mine.entry, theirs.entry,
            "the copy borrows the template's entry"
        );
        assert_eq!(
            mem.frames_in_use(),
            before.len() + 4,
            "root + L3, L2, L1 copies"
        );
        // Every count the template had is unchanged; the new frames have count 1.
        let after = counts(&mem);
        for (f, n) in &before {
            assert!(after.contains(&(*f, *n)), "{f:?} kept its count {n}");
        }
        // A write to a borrowed page copies it even though the frame's count is 1.
        assert_eq!(count(&mem, entry::addr(theirs.entry)), 1);
        c.break_cow(GIB + 4096, 1).unwrap().ignore();
        let written = c.reader().leaf(GIB + 4096).unwrap();
        assert_ne!(entry::addr(written.entry), entry::addr(theirs.entry));
        assert!(!entry::lent(written.entry) && entry::writable(written.entry));
        drop(space);
        assert_eq!(
            counts(&mem),
            before,
            "the space's drop released only its own frames"
        );
        drop(template);
        assert_eq!(mem.frames_in_use(), 0);
    }

    #[test]
    fn a_write_splits_a_borrowed_huge_page_and_copies_one_piece() {
        let mem = SimMem::new(2048);
        let mut template = Tree::template(&mem).unwrap();
        let cow = entry::leaf(0, 2, false, true, true);
        template.cursor().map_zeroed(GIB, 2, cow).unwrap();
        let run = entry::addr(template.reader().leaf(GIB).unwrap().entry);
        for copy in [false, true] {
            let mut space = Tree::new(&mem, copy).unwrap();
            let mut c = space.cursor();
            let sub = template.reader().subtree(0, None).unwrap();
            c.attach(0, None, sub).unwrap();
            let used = mem.frames_in_use();
            let va = GIB + 7 * 4096 + 8;
            assert_eq!(
                c.break_cow(va & !4095, 2),
                Ok(Flush::Page(VirtAddr::new(GIB)))
            );
            // Share: the L3 and L2 copies, the new L1 and one 4 KiB copy. Copy: L1 and copy.
            let new_frames = if copy { 2 } else { 4 };
            assert_eq!(mem.frames_in_use(), used + new_frames);
            let r = c.reader();
            for k in [0u64, 6, 8, 511] {
                let l = r.leaf(GIB + k * 4096).unwrap();
                assert_eq!((l.level, entry::addr(l.entry)), (1, run + k * 4096));
                assert!(entry::piece(l.entry) && entry::cow(l.entry));
                assert!(entry::executable(l.entry) && !entry::huge(l.entry));
                // Borrowed (Share) or counted on the run's head (Copy): see the counts below.
                assert!(entry::lent(l.entry));
            }
            let mine = r.leaf(va).unwrap();
            assert!(entry::writable(mine.entry) && !entry::piece(mine.entry));
            assert!(entry::lent(mine.entry) == copy && !entry::cow(mine.entry));
            // Share: the run is the template's alone; Copy: the 511 owned pieces + the template.
            assert_eq!(count(&mem, run), if copy { 512 } else { 1 });
            drop(space);
            assert_eq!(count(&mem, run), 1);
        }
        drop(template);
        assert_eq!(mem.frames_in_use(), 0);
    }

    #[test]
    fn break_cow_copies_a_shared_page_and_takes_over_a_private_one() {
        let mem = SimMem::new(64);
        let mut a = Tree::new(&mem, false).unwrap();
        let cow = entry::leaf(0, 1, false, false, true);
        {
            let mut c = a.cursor();
            for va in [GIB, GIB + 4096] {
                let p = OwnedPage::zeroed(&mem, 1).unwrap();
                c.map_page(va, p, cow).unwrap();
            }
        }
        // A second tree shares the first page only.
        let mut b = Tree::new(&mem, false).unwrap();
        let shared = a.reader().leaf(GIB).unwrap();
        let alone = entry::addr(a.reader().leaf(GIB + 4096).unwrap().entry);
        b.cursor()
            .map_page(GIB, a.reader().share(&shared), cow)
            .unwrap();
        let mut c = a.cursor();
        assert_eq!(c.break_cow(GIB, 1), Ok(Flush::Page(VirtAddr::new(GIB))));
        let mine = c.reader().leaf(GIB).unwrap();
        assert_ne!(entry::addr(mine.entry), entry::addr(shared.entry), "copied");
        assert!(entry::writable(mine.entry) && !entry::cow(mine.entry));
        assert_eq!(count(&mem, entry::addr(shared.entry)), 1, "b's alone now");
        c.break_cow(GIB + 4096, 1).unwrap().ignore();
        let taken = c.reader().leaf(GIB + 4096).unwrap();
        assert_eq!(entry::addr(taken.entry), alone, "taken over, not copied");
        assert_eq!(
            c.break_cow(GIB + 8192, 1),
            Err(Error::NotMapped { addr: GIB + 8192 })
        );
        drop((a, b));
        assert_eq!(mem.frames_in_use(), 0);
    }
}
