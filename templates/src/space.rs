//! Address spaces: created from templates, changed by faults, `map`, `unmap`, `protect`,
//! turned into new templates by `snapshot`.

use crate::entry::{self, LOWER_HALF_END, SIZE_2M, SIZE_4K};
use crate::error::{Error, Fault, Name};
use crate::flush::Flush;
use crate::mem::PhysMem;
use crate::template::{Kind, PageSize, Perm, Region, Template, Translation, check_range};
use crate::walk::{SpaceStats, Tree};
use alloc::borrow::Cow;
use alloc::vec::Vec;
use smallvec::SmallVec;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

/// How templates are attached at spawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Attach by reference: one entry per 512 GiB (or per 1 GiB slot when templates share a
    /// 512 GiB range). Cost independent of template size.
    Share,
    /// Sharing off: deep-copy every table and take a reference to every data frame (what
    /// fork() does). Observably identical to `Share`; only the cost differs.
    Copy,
}

/// The kind of access that faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

pub use crate::half::{KernelHalf, KernelHalfId};

/// A task's address space: an owned L4, attached template subtrees, private tables.
/// Dropping it releases everything it references.
#[derive(Debug)]
pub struct AddressSpace<M: PhysMem> {
    /// Declared (so dropped) before `templates`: the tree's borrowed entries point into those
    /// templates' tables and frames, which must outlive it (invariant 11).
    /// (The mode is the tree's: a `Mode::Copy` space's counts all its entries.)
    tree: Tree<M>,
    regions: Regions,
    /// The templates the space holds until its tree is gone: they keep alive whatever the tree
    /// borrows (invariant 11). First the `spawned` ones attached at spawn, held for the space's
    /// whole life; then the snapshots of this space that took its own tables over (invariant
    /// 12: the tree borrows those tables now), oldest first. A later snapshot whose ranges
    /// contain all of an earlier held one's drops the earlier one (the later template counts
    /// everything the tree borrows there), so snapshotting the same ranges again and again
    /// holds one.
    templates: SmallVec<[Template<M>; 4]>,
    spawned: usize,
}

/// A space's regions, sorted by address: inline for the usual few (a task's heap and statics, an
/// app template's regions), so that spawning allocates nothing for them.
type Regions = SmallVec<[Region; 4]>;

impl<M: PhysMem> AddressSpace<M> {
    /// A new space with `templates` attached (their claimed 1 GiB slots must be disjoint) and the
    /// kernel half installed. In `Share` mode the cost is one entry per 512 GiB range used, or
    /// per claimed 1 GiB slot in a 512 GiB range claimed by several templates, plus a copy of
    /// the templates' region lists.
    pub fn new(
        mem: &M,
        templates: &[&Template<M>],
        mode: Mode,
        kernel: Option<&KernelHalf>,
    ) -> Result<Self, Error> {
        // One template claims each 512 GiB range once and alone: attach its L4 entries as they
        // are (no merge, no allocation: this is the spawn path). Several: merge their claims.
        // Several templates in pairwise different 512 GiB ranges (libos's spawn: the process
        // memory's template plus the app's) attach the same way, one by one.
        let disjoint = templates.len() <= 8
            && templates.iter().enumerate().all(|(i, a)| {
                templates[..i].iter().all(|b| {
                    a.claims()
                        .iter()
                        .all(|ca| b.claims().iter().all(|cb| ca.l4 != cb.l4))
                })
            });
        let ranges = if disjoint {
            Vec::new()
        } else {
            merge_claims(templates)?
        };
        // A `Copy` space counts every entry and borrows nothing (invariant 11).
        let copy = mode == Mode::Copy;
        let mut tree = match kernel {
            Some(k) => Tree::with_kernel(mem, k, copy)?,
            None => Tree::new(mem, copy)?,
        };
        let mut c = tree.cursor();
        if disjoint {
            for t in templates {
                let tr = t.reader();
                for claim in t.claims() {
                    if let Some(sub) = tr.subtree(claim.l4, None) {
                        c.attach(claim.l4, None, sub)?;
                    }
                }
            }
        }
        for &(l4, _, users, last) in &ranges {
            if users == 1 {
                // The whole 512 GiB range is one template's: one L4 entry.
                if let Some(sub) = templates[last].reader().subtree(l4, None) {
                    c.attach(l4, None, sub)?;
                }
                continue;
            }
            // Several templates: an own L3, one entry per claimed 1 GiB slot.
            for &t in templates {
                let Some(claim) = t.claims().iter().find(|cl| cl.l4 == l4) else {
                    continue;
                };
                let tr = t.reader();
                for j in claim.slots() {
                    if let Some(sub) = tr.subtree(l4, Some(j)) {
                        c.attach(l4, Some(j), sub)?;
                    }
                }
            }
        }
        let mut regions: Regions = templates
            .iter()
            .flat_map(|t| t.regions().iter().cloned())
            .collect();
        regions.sort_by_key(|r| r.start);
        let templates: SmallVec<[Template<M>; 4]> =
            templates.iter().map(|t| (*t).clone()).collect();
        Ok(AddressSpace {
            tree,
            regions,
            spawned: templates.len(),
            templates,
        })
    }

    /// The root table (for CR3).
    pub fn root(&self) -> PhysFrame {
        self.tree.root()
    }

    /// The root table's physical address (for CR3).
    pub fn root_phys(&self) -> PhysAddr {
        self.tree.root().start_address()
    }

    /// The mode the space was created in.
    pub fn mode(&self) -> Mode {
        if self.tree.all_counted() {
            Mode::Copy
        } else {
            Mode::Share
        }
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The templates this space was spawned from.
    pub fn templates(&self) -> &[Template<M>] {
        &self.templates[..self.spawned]
    }

    /// Every template this space holds until it is dropped: the ones it was spawned from, then
    /// the snapshots of it that took its own tables over (`snapshot`, docs/engine.md invariant
    /// 12), oldest first. Whatever the space borrows (invariant 11), one of these keeps alive.
    pub fn held_templates(&self) -> impl Iterator<Item = &Template<M>> {
        self.templates.iter()
    }

    /// The region containing `va`.
    pub fn region(&self, va: VirtAddr) -> Option<&Region> {
        find(&self.regions, va.as_u64())
    }

    /// What the CPU would translate `va` to now (`None`: not present).
    pub fn translate(&self, va: VirtAddr) -> Option<Translation> {
        let va = va.as_u64();
        if va >= LOWER_HALF_END {
            return None;
        }
        Some(Translation::of(self.tree.reader().leaf(va)?, va))
    }

    /// Resolve a page fault at `va` for `access`: copy-on-write (unsharing the path, then
    /// copying the page, or taking it over if no one else references it), demand-zero, or a
    /// spurious fault (the translation already allows the access: flush the stale TLB entry).
    /// Otherwise a typed [`Fault`]. On `OutOfFrames` the translations are unchanged.
    pub fn resolve_fault(&mut self, va: VirtAddr, access: Access) -> Result<Flush, Fault> {
        let addr = va.as_u64();
        if addr >= LOWER_HALF_END {
            return Err(Fault::NotLowerHalf { addr });
        }
        // Only running out of frames can fail below; anything else would mean the tables do
        // not match the regions, reported as unmapped rather than as a panic.
        let oom = |e| match e {
            Error::OutOfFrames => Fault::OutOfFrames { addr },
            _ => Fault::Unmapped { addr },
        };
        let r = find(&self.regions, addr).ok_or(Fault::Unmapped { addr })?;
        let name = || r.name.clone();
        match access {
            Access::Write if !r.perm.write => {
                return Err(Fault::WriteToReadOnly {
                    addr,
                    region: name(),
                });
            }
            Access::Execute if !r.perm.exec => {
                return Err(Fault::ExecuteNoExec {
                    addr,
                    region: name(),
                });
            }
            _ => {}
        }
        let mut c = self.tree.cursor();
        let page = addr & !(SIZE_4K - 1);
        let Some(l) = c.reader().leaf(addr) else {
            if !r.demand_zero {
                return Err(Fault::Unmapped { addr });
            }
            let flags = entry::leaf(0, 1, r.perm.write, r.perm.exec, false);
            c.map_zeroed(page, 1, flags).map_err(oom)?;
            // The page was not present: nothing to flush.
            return Ok(Flush::None);
        };
        if access == Access::Write && !entry::writable(l.entry) {
            if !entry::cow(l.entry) {
                return Err(Fault::WriteToReadOnly {
                    addr,
                    region: name(),
                });
            }
            // Copy (or take over) the page for this space: `Flush::Page(l.va)`. The faulting
            // 4 KiB page, not the leaf's start: a 2 MiB leaf is split and that page copied.
            return c.break_cow(page, l.level).map_err(oom);
        }
        if access == Access::Execute && !entry::executable(l.entry) {
            return Err(Fault::ExecuteNoExec {
                addr,
                region: name(),
            });
        }
        Ok(Flush::Page(VirtAddr::new(page)))
    }

    /// Map `start..start+len` as private memory (a stack, heap growth): demand-zero, or
    /// populated now with zeroed frames if `populate`. Must not overlap any region.
    pub fn map(
        &mut self,
        start: VirtAddr,
        len: u64,
        perm: Perm,
        name: &str,
        populate: bool,
    ) -> Result<Flush, Error> {
        let start = start.as_u64();
        let end = check_range(start, len, SIZE_4K)?;
        if let Some(r) = self.regions.iter().find(|r| r.start < end && start < r.end) {
            return Err(Error::Overlap {
                addr: r.start.max(start),
            });
        }
        if populate {
            let mut c = self.tree.cursor();
            let flags = entry::leaf(0, 1, perm.write, perm.exec, false);
            let mut va = start;
            let result = loop {
                if va == end {
                    break Ok(());
                }
                if let Err(e) = c.map_zeroed(va, 1, flags) {
                    break Err(e);
                }
                va += SIZE_4K;
            };
            if let Err(e) = result {
                // Every table on the paths of start..va is owned already: no allocation here.
                if va > start {
                    c.prepare_clear(start, va)?;
                    // Mapped by this call and never handed to a CPU: nothing can be cached.
                    c.clear(start, va).ignore();
                }
                return Err(e);
            }
        }
        let region = Region {
            name: Name::from(name),
            start,
            end,
            kind: Kind::Private,
            perm,
            demand_zero: true,
            page_size: PageSize::Size4KiB,
        };
        let at = self.regions.partition_point(|r| r.start < start);
        self.regions.insert(at, region);
        Ok(Flush::None)
    }

    /// Remove every mapping in `start..start+len` (any region kind; holes are fine), unsharing
    /// only tables the range covers partially. Fails before changing anything if the range
    /// splits a 2 MiB page or (while unsharing) frames run out.
    pub fn unmap(&mut self, start: VirtAddr, len: u64) -> Result<Flush, Error> {
        let start = start.as_u64();
        let end = check_range(start, len, SIZE_4K)?;
        check_huge_split(&self.regions, start, end)?;
        let mut c = self.tree.cursor();
        c.prepare_clear(start, end)?;
        let flush = c.clear(start, end);
        carve(&mut self.regions, start, end);
        Ok(flush)
    }

    /// Change the rights of `start..start+len`, which must be covered by `Private` regions.
    /// Writable pages become copy-on-write (or stay writable if they already are); read-only
    /// pages lose their copy-on-write bit. Fails before changing anything on error.
    pub fn protect(&mut self, start: VirtAddr, len: u64, perm: Perm) -> Result<Flush, Error> {
        let start = start.as_u64();
        let end = check_range(start, len, SIZE_4K)?;
        let mut va = start;
        while va < end {
            let r = find(&self.regions, va).ok_or(Error::NotMapped { addr: va })?;
            if r.kind != Kind::Private {
                return Err(Error::NotPrivate {
                    addr: va,
                    region: r.name.clone(),
                });
            }
            va = r.end;
        }
        check_huge_split(&self.regions, start, end)?;
        let new_entry = |e: u64| {
            let w = perm.write && entry::writable(e);
            let cow = perm.write && !entry::writable(e);
            entry::with_exec(entry::with_write(e, w, cow), perm.exec)
        };
        let changed = self.update_leaves(&[(start, end)], |_, e| new_entry(e))?;
        let mut pieces = carve(&mut self.regions, start, end);
        for p in &mut pieces {
            p.perm = perm;
        }
        self.regions.extend(pieces);
        self.regions.sort_by_key(|r| r.start);
        // The changed pages lie in the range; the caller flushes all of it.
        Ok(changed.merge(Flush::range(start, end)))
    }

    /// Apply `f(region, entry) -> entry` (flag bits only) to every present leaf in `ranges`, in
    /// two phases: unshare the paths of the leaves that change (may fail; invisible), then
    /// write. Returns the pages changed.
    fn update_leaves(
        &mut self,
        ranges: &[(u64, u64)],
        f: impl Fn(&Region, u64) -> u64,
    ) -> Result<Flush, Error> {
        let mut c = self.tree.cursor();
        let mut changed = Flush::None;
        for phase in 0..2 {
            for &(start, end) in ranges {
                let mut va = start;
                while let Some(l) = c.reader().next_leaf(va, end) {
                    if l.va < start || l.end() > end {
                        return Err(Error::SplitsHugePage { addr: l.va });
                    }
                    let Some(r) = find(&self.regions, l.va) else {
                        va = l.end();
                        continue;
                    };
                    let new = f(r, l.entry);
                    if new != l.entry {
                        if phase == 0 {
                            c.unshare_path(l.va, l.level)?;
                        } else {
                            changed = changed.merge(c.rewrite_leaf(l.va, l.level, new)?);
                        }
                    }
                    va = l.end();
                }
            }
        }
        Ok(changed)
    }

    /// Turn `ranges` (`(start, len)`, 4 KiB aligned, disjoint) of this space into a new template
    /// — the fork-server primitive. The template maps the same frames; writable `Private` pages
    /// become copy-on-write both in the template and in this space. `Shared` pages stay shared,
    /// demand-zero pages not yet touched stay demand-zero. On error nothing changes.
    ///
    /// Incremental (docs/engine.md, invariant 12): in a `Mode::Share` space, a table the ranges
    /// cover whole is not walked if the space reaches it through a template's (borrowed) entry
    /// — the new template references it — and the space's own tables are handed over to the
    /// new template in place (the space then borrows them, and holds the template). So the
    /// cost is O(entries of the tables the space owns in the ranges): what it changed since it
    /// was spawned or last snapshotted. If nothing changed — the same regions in the ranges,
    /// reached through one held template's tables — the result is that template (a clone of
    /// its handle, no table built) with `Flush::None`, at a cost of O(regions in the ranges +
    /// entries of the ranges at the levels above the template's tables): for ranges of whole
    /// 512 GiB entries, one entry per entry. A `Mode::Copy` space (fork()'s cost model) copies
    /// every leaf entry, as before: O(pages).
    pub fn snapshot(&mut self, ranges: &[(VirtAddr, u64)]) -> Result<(Template<M>, Flush), Error> {
        // A few ranges (libos passes one) are sorted on the stack: the clean path allocates
        // nothing.
        let mut small = [(0u64, 0u64); 4];
        let mut big = Vec::new();
        let rs: &mut [(u64, u64)] = if ranges.len() <= small.len() {
            &mut small[..ranges.len()]
        } else {
            big.resize(ranges.len(), (0, 0));
            &mut big
        };
        for (r, &(s, len)) in rs.iter_mut().zip(ranges) {
            let s = s.as_u64();
            *r = (s, check_range(s, len, SIZE_4K)?);
        }
        rs.sort_unstable();
        let rs: &[(u64, u64)] = rs;
        if let Some(w) = rs.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(Error::Overlap { addr: w[1].0 });
        }
        for &(s, e) in rs {
            check_huge_split(&self.regions, s, e)?;
        }
        // The tree is walked over the ranges with touching ones joined (the same leaves; a
        // 2 MiB leaf cannot straddle a boundary that `check_huge_split` let through), so that
        // a table they cover together is covered whole.
        let walk: Cow<'_, [(u64, u64)]> = if rs.windows(2).any(|w| w[0].1 == w[1].0) {
            let mut joined: Vec<(u64, u64)> = Vec::with_capacity(rs.len());
            for &(s, e) in rs {
                match joined.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => joined.push((s, e)),
                }
            }
            Cow::Owned(joined)
        } else {
            Cow::Borrowed(rs)
        };
        if self.mode() == Mode::Share
            && let Some(t) = self.unchanged_since(rs, &walk)
        {
            return Ok((t, Flush::None));
        }
        // Every leaf lies in a region (the engine maps none outside one). Only a writable leaf
        // can change, so only its region is looked up; leaves come in address order, so the
        // region of the last lookup is tried first.
        let regions: &[Region] = &self.regions;
        let last = core::cell::Cell::new(0usize);
        let bits = |va: u64, e: u64| {
            if !entry::writable(e) {
                return e;
            }
            let r = match regions.get(last.get()).filter(|r| r.contains(va)) {
                Some(r) => Some(r),
                None => {
                    let i = regions.partition_point(|r| r.end <= va);
                    last.set(i);
                    regions.get(i).filter(|r| r.contains(va))
                }
            };
            match r {
                Some(r) if r.kind == Kind::Private => entry::with_write(e, false, true),
                _ => e,
            }
        };
        // The newest held snapshot that this one replaces (its ranges are covered: it is dropped
        // below if a table is lent), if nothing but this space holds it: its references move
        // into the new template instead of being taken anew and then dropped with it.
        let spawned = self.spawned;
        let covered_by_walk = |old: &[(u64, u64)]| {
            old.iter()
                .all(|&(s, e)| walk.iter().any(|&(ns, ne)| ns <= s && e <= ne))
        };
        let mut replaced = self.templates[spawned..]
            .iter_mut()
            .rev()
            .find(|t| covered_by_walk(t.snapshot_ranges()))
            .and_then(|t| t.sole_tree())
            .map(|t| t.cursor());
        // Build the template's tables; dropped (and released) on any error. Every entry of the
        // new tree is counted (invariant 11).
        let mut tree = Tree::template(self.tree.mem())?;
        let (flush, lent) = self.tree.cursor().snapshot_into(
            &mut tree.cursor(),
            &walk,
            &bits,
            replaced.as_mut(),
        )?;
        let regions: Vec<Region> = clipped(&self.regions, rs).collect();
        let t = Template::from_snapshot(tree, regions, walk.into_owned());
        if lent {
            // The tree borrows the tables it lent: hold the template (invariant 11). An earlier
            // snapshot of ranges these contain is no longer needed: everything the tree borrows
            // there, the new template counts (it referenced or took over every table there).
            let walk = t.snapshot_ranges();
            let covers = |old: &[(u64, u64)]| {
                old.iter()
                    .all(|&(s, e)| walk.iter().any(|&(ns, ne)| ns <= s && e <= ne))
            };
            let mut n = 0;
            self.templates.retain(|held| {
                n += 1;
                n <= self.spawned || !covers(held.snapshot_ranges())
            });
            self.templates.push(t.clone());
        }
        Ok((t, flush))
    }

    /// A held template that a snapshot of `ranges` (sorted; `walk`: the same, touching ones
    /// joined) would reproduce: the same regions in the ranges, and the same translations
    /// through the same frames (`Reader::same_as`). The newest snapshot is tried first.
    fn unchanged_since(&self, ranges: &[(u64, u64)], walk: &[(u64, u64)]) -> Option<Template<M>> {
        let (spawned, snaps) = self.templates.split_at(self.spawned);
        let mine = self.tree.reader();
        snaps.iter().rev().chain(spawned).find_map(|t| {
            let same = same_regions(&self.regions, ranges, t.regions())
                && walk.iter().all(|&(s, e)| mine.same_as(&t.reader(), s, e));
            same.then(|| t.clone())
        })
    }

    /// Page-table accounting (walks the owned tables and the shared ones below them).
    pub fn stats(&self) -> SpaceStats {
        let mut s = SpaceStats::default();
        self.tree.reader().account(&mut s);
        s
    }
}

/// Per 512 GiB range: (L4 index, claimed slots, how many templates claim in it, the last one
/// that did) — no per-range list, as this is on the spawn path.
type ClaimedRange = (usize, [u64; 8], usize, usize);

/// Merge the templates' claims per 512 GiB range; any slot claimed twice is a conflict.
fn merge_claims<M: PhysMem>(templates: &[&Template<M>]) -> Result<Vec<ClaimedRange>, Error> {
    let mut ranges: Vec<ClaimedRange> = Vec::new();
    for (n, t) in templates.iter().enumerate() {
        for c in t.claims() {
            let at = match ranges.iter().position(|r| r.0 == c.l4) {
                Some(at) => at,
                None => {
                    ranges.push((c.l4, [0; 8], 0, 0));
                    ranges.len() - 1
                }
            };
            let r = &mut ranges[at];
            for w in 0..8 {
                let both = r.1[w] & c.bits[w];
                if both != 0 {
                    let j = (w * 64) as u64 + u64::from(both.trailing_zeros());
                    let slot = (((c.l4 as u64) << 9) | j) << 30;
                    return Err(Error::SlotConflict { slot });
                }
                r.1[w] |= c.bits[w];
            }
            r.2 += 1;
            r.3 = n;
        }
    }
    Ok(ranges)
}

/// The parts of `regions` (sorted) inside `ranges` (sorted, disjoint), in address order: a
/// snapshot's region list.
fn clipped<'a>(
    regions: &'a [Region],
    ranges: &'a [(u64, u64)],
) -> impl Iterator<Item = Region> + 'a {
    ranges.iter().flat_map(move |&(s, e)| {
        let from = regions.partition_point(|r| r.end <= s);
        regions[from..]
            .iter()
            .take_while(move |r| r.start < e)
            .map(move |r| {
                let mut piece = r.clone();
                piece.start = piece.start.max(s);
                piece.end = piece.end.min(e);
                piece
            })
    })
}

/// Is `theirs` what [`clipped`] gives for `regions` and `ranges`? Compared in place: this is on
/// the clean snapshot's path, which allocates nothing.
fn same_regions(regions: &[Region], ranges: &[(u64, u64)], theirs: &[Region]) -> bool {
    let mut theirs = theirs.iter();
    for &(s, e) in ranges {
        let from = regions.partition_point(|r| r.end <= s);
        for r in regions[from..].iter().take_while(|r| r.start < e) {
            let Some(t) = theirs.next() else {
                return false;
            };
            // Every field, so that a new one cannot be forgotten here.
            let Region {
                name,
                start,
                end,
                kind,
                perm,
                demand_zero,
                page_size,
            } = t;
            let same = *start == r.start.max(s)
                && *end == r.end.min(e)
                // The same name is most often the same allocation (a snapshot's regions are
                // clones of the space's): no need to compare the bytes then.
                && (alloc::sync::Arc::ptr_eq(name, &r.name) || *name == r.name)
                && *kind == r.kind
                && *perm == r.perm
                && *demand_zero == r.demand_zero
                && *page_size == r.page_size;
            if !same {
                return false;
            }
        }
    }
    theirs.next().is_none()
}

fn find(regions: &[Region], va: u64) -> Option<&Region> {
    let i = regions.partition_point(|r| r.end <= va);
    regions.get(i).filter(|r| r.contains(va))
}

/// A range boundary inside a 2 MiB-page region must be 2 MiB aligned.
fn check_huge_split(regions: &[Region], start: u64, end: u64) -> Result<(), Error> {
    for r in regions.iter().filter(|r| r.page_size == PageSize::Size2MiB) {
        for b in [start, end] {
            if r.start < b && b < r.end && b % SIZE_2M != 0 {
                return Err(Error::SplitsHugePage { addr: b });
            }
        }
    }
    Ok(())
}

/// Remove `start..end` from `regions`; returns the removed pieces.
fn carve(regions: &mut Regions, start: u64, end: u64) -> Vec<Region> {
    let mut kept = Regions::with_capacity(regions.len() + 1);
    let mut removed = Vec::new();
    for r in regions.drain(..) {
        if r.end <= start || end <= r.start {
            kept.push(r);
            continue;
        }
        if r.start < start {
            let mut left = r.clone();
            left.end = start;
            kept.push(left);
        }
        if end < r.end {
            let mut right = r.clone();
            right.start = end;
            kept.push(right);
        }
        let mut mid = r;
        mid.start = mid.start.max(start);
        mid.end = mid.end.min(end);
        removed.push(mid);
    }
    kept.sort_by_key(|r| r.start);
    *regions = kept;
    removed
}
