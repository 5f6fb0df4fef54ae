//! The cursor: the only code that walks and changes page tables, and the reference-count
//! bookkeeping that goes with it (retain on copy, release on drop).
//!
//! Ownership rule (invariants 2 and 3): a table is *exclusively owned* by a tree when the tree's
//! root is reached only through tables of count 1 and the table's own count is 1. A cursor
//! writes only to such tables; on its way down it turns every table of count > 1 on its path
//! into a private copy (*unshare*), top-down, so only the tables on the path are copied and their
//! siblings stay shared (invariant 4).

use crate::entry::{self, span};
use crate::error::Error;
use crate::mem::{PhysMem, frame_at};
use crate::raw::{self, ENTRIES};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PhysFrame, Size2MiB};

/// Entries of an L4 that belong to the lower half: the engine never follows 256..512.
const LOWER_L4: usize = 256;

fn child_range(level: u8) -> core::ops::Range<usize> {
    if level == 4 { 0..LOWER_L4 } else { 0..ENTRIES }
}

fn huge_run(addr: u64) -> PhysFrame<Size2MiB> {
    PhysFrame::containing_address(PhysAddr::new(addr))
}

/// A zeroed table of count 1.
pub(crate) fn alloc_table<M: PhysMem>(mem: &M) -> Result<PhysFrame, Error> {
    let f = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
    raw::zero(mem, f);
    Ok(f)
}

/// Take one more reference to what leaf entry `e` maps.
pub(crate) fn retain_leaf<M: PhysMem>(mem: &M, e: u64) {
    mem.inc_ref(frame_at(entry::addr(e)));
}

/// Drop the reference leaf entry `e` held (`level` 1: a 4 KiB frame; 2: a 2 MiB run).
pub(crate) fn release_leaf<M: PhysMem>(mem: &M, e: u64, level: u8) {
    if level == 1 {
        mem.dec_ref(frame_at(entry::addr(e)));
    } else {
        mem.dec_ref_huge(huge_run(entry::addr(e)));
    }
}

/// Take one reference to every child of `table` (a fresh copy of a shared table).
fn retain_children<M: PhysMem>(mem: &M, table: PhysFrame, level: u8) {
    for i in child_range(level) {
        let e = raw::read(mem, table, i);
        if entry::present(e) {
            // Leaves and tables alike are counted on the frame the entry points at.
            mem.inc_ref(frame_at(entry::addr(e)));
        }
    }
}

/// Drop one reference to `table` (at `level`); if it was the last, release its children.
///
/// Children are released *before* the table's own count drops to zero, because a table is
/// freed (and unreadable) once `dec_ref` returns 0. A count of 1 means no one else can reach the
/// table. (If two owners of a shared table drop it concurrently and both read a count of 2,
/// the subtree leaks rather than being used after free; the engine itself is not concurrent.)
pub(crate) fn release_table<M: PhysMem>(mem: &M, table: PhysFrame, level: u8) {
    if mem.ref_count(table) == 1 {
        for i in child_range(level) {
            let e = raw::read(mem, table, i);
            if entry::present(e) {
                release_entry(mem, e, level);
            }
        }
    }
    mem.dec_ref(table);
}

/// Release what entry `e` of a table at `level` points at.
fn release_entry<M: PhysMem>(mem: &M, e: u64, level: u8) {
    if entry::is_leaf(e, level) {
        release_leaf(mem, e, level);
    } else {
        release_table(mem, frame_at(entry::addr(e)), level - 1);
    }
}

/// A deep copy of `table` (every table below it copied, every data frame retained): what
/// fork() does, and what `Mode::Copy` does at spawn. On failure nothing is left allocated.
pub(crate) fn deep_copy<M: PhysMem>(
    mem: &M,
    table: PhysFrame,
    level: u8,
) -> Result<PhysFrame, Error> {
    let new = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
    if level == 1 {
        raw::copy(mem, table, new);
        retain_children(mem, new, 1);
        return Ok(new);
    }
    raw::zero(mem, new);
    for i in child_range(level) {
        let e = raw::read(mem, table, i);
        if !entry::present(e) {
            continue;
        }
        if entry::is_leaf(e, level) {
            retain_leaf(mem, e);
            raw::write(mem, new, i, e);
        } else {
            match deep_copy(mem, frame_at(entry::addr(e)), level - 1) {
                Ok(child) => {
                    let e2 = (e & !entry::ADDR_MASK) | child.start_address().as_u64();
                    raw::write(mem, new, i, e2);
                }
                Err(err) => {
                    release_table(mem, new, level);
                    return Err(err);
                }
            }
        }
    }
    Ok(new)
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

/// A cursor over one tree whose root (an L4 of count 1) the caller owns.
pub(crate) struct Cursor<'a, M: PhysMem> {
    mem: &'a M,
    root: PhysFrame,
}

impl<'a, M: PhysMem> Cursor<'a, M> {
    pub(crate) fn new(mem: &'a M, root: PhysFrame) -> Self {
        Cursor { mem, root }
    }

    /// The present leaf mapping `va`, if any (read-only walk).
    pub(crate) fn leaf(&self, va: u64) -> Option<Leaf> {
        self.next_leaf(va, va + 1).filter(|l| l.va <= va)
    }

    /// The first present leaf that intersects `from..end` (read-only walk; skips absent
    /// subtrees a whole entry at a time).
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

    /// Make entry `i` of the owned `table` (at `level`) point at an exclusively owned child
    /// table: unshare it if its count is above 1, allocate it if absent and `alloc`.
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
            raw::write(mem, table, i, entry::table(child.start_address().as_u64()));
            return Ok(Some(child));
        }
        if entry::is_leaf(e, level) {
            return Err(Error::SplitsHugePage { addr: va });
        }
        let child = frame_at(entry::addr(e));
        if mem.ref_count(child) == 1 {
            return Ok(Some(child));
        }
        // Unshare: a private copy whose children gain a reference, then drop ours on the original.
        let copy = mem.alloc_frame().ok_or(Error::OutOfFrames)?;
        raw::copy(mem, child, copy);
        retain_children(mem, copy, level - 1);
        raw::write(
            mem,
            table,
            i,
            (e & !entry::ADDR_MASK) | copy.start_address().as_u64(),
        );
        release_table(mem, child, level - 1);
        Ok(Some(copy))
    }

    /// The exclusively owned table at `level` (1: an L1 for a 4 KiB leaf; 2: an L2 for a 2 MiB
    /// leaf) on `va`'s path, unsharing every shared table above it top-down and allocating
    /// missing ones if `alloc`. `Ok(None)`: the path is absent and `alloc` is false.
    pub(crate) fn owned_table(
        &mut self,
        va: u64,
        level: u8,
        alloc: bool,
    ) -> Result<Option<PhysFrame>, Error> {
        let mut table = self.root;
        let mut l = 4u8;
        while l > level {
            match self.own_child(table, l, entry::index(va, l), va, alloc)? {
                Some(child) => table = child,
                None => return Ok(None),
            }
            l -= 1;
        }
        Ok(Some(table))
    }

    /// Write leaf entry `e` for `va` into `table`, which `owned_table(va, level, _)` returned.
    pub(crate) fn set(&mut self, table: PhysFrame, va: u64, level: u8, e: u64) {
        raw::write(self.mem, table, entry::index(va, level), e);
    }

    /// Read the entry for `va` in `table` (as returned by `owned_table(va, level, _)`).
    pub(crate) fn get(&self, table: PhysFrame, va: u64, level: u8) -> u64 {
        raw::read(self.mem, table, entry::index(va, level))
    }

    /// Attach template entry `src` (pointing at a table): at root entry `l4` if `slot` is `None`
    /// (an L3 table: 512 GiB), or at entry `slot` of this tree's own L3 under root entry `l4`
    /// (an L2 table: 1 GiB). `copy`: attach a deep copy instead of a reference.
    pub(crate) fn attach(
        &mut self,
        l4: usize,
        slot: Option<usize>,
        src: u64,
        copy: bool,
    ) -> Result<(), Error> {
        let mem = self.mem;
        let (table, i, child_level) = match slot {
            None => (self.root, l4, 3),
            Some(j) => {
                let l3 = self
                    .own_child(self.root, 4, l4, 0, true)?
                    .ok_or(Error::OutOfFrames)?;
                (l3, j, 2)
            }
        };
        debug_assert!(
            !entry::present(raw::read(mem, table, i)),
            "slots are disjoint"
        );
        let child = frame_at(entry::addr(src));
        let e = if copy {
            let c = deep_copy(mem, child, child_level)?;
            (src & !entry::ADDR_MASK) | c.start_address().as_u64()
        } else {
            mem.inc_ref(child);
            src
        };
        raw::write(mem, table, i, e);
        Ok(())
    }

    /// Entry `i` of the table that root entry `l4` points at (0 if absent).
    pub(crate) fn l3_entry(&self, l4: usize, i: usize) -> u64 {
        let e = raw::read(self.mem, self.root, l4);
        if entry::present(e) {
            raw::read(self.mem, frame_at(entry::addr(e)), i)
        } else {
            0
        }
    }

    /// Entry `l4` of the root.
    pub(crate) fn root_entry(&self, l4: usize) -> u64 {
        raw::read(self.mem, self.root, l4)
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
    pub(crate) fn account(&self, s: &mut crate::space::SpaceStats) {
        s.tables_owned += 1; // the root
        self.account_rec(self.root, 4, true, s);
    }

    fn account_rec(
        &self,
        table: PhysFrame,
        level: u8,
        owned: bool,
        s: &mut crate::space::SpaceStats,
    ) {
        let mem = self.mem;
        for i in child_range(level) {
            let e = raw::read(mem, table, i);
            if !entry::present(e) {
                continue;
            }
            let target = frame_at(entry::addr(e));
            if entry::is_leaf(e, level) {
                let pages = (span(level) / entry::SIZE_4K) as usize;
                if owned {
                    s.pages_in_owned_tables += pages;
                    if mem.ref_count(target) == 1 {
                        s.private_pages += pages;
                    }
                } else {
                    s.pages_in_shared_tables += pages;
                }
                continue;
            }
            let child_owned = owned && mem.ref_count(target) == 1;
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
    pub(crate) fn clear(&mut self, start: u64, end: u64) {
        self.clear_rec(self.root, 4, start, end);
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
                    release_entry(mem, e, level);
                } else {
                    let child = frame_at(entry::addr(e));
                    debug_assert_eq!(mem.ref_count(child), 1, "prepare_clear unshared the path");
                    self.clear_rec(child, level - 1, va, end.min(next));
                }
            }
            va = next;
        }
    }
}
