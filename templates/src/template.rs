//! Regions, the template builder, and sealed templates.

use crate::entry::{self, SIZE_1G, SIZE_2M, SIZE_4K};
use crate::error::{Error, Name};
use crate::mem::PhysMem;
use crate::walk::{Leaf, Reader, Tree};
use alloc::sync::Arc;
use alloc::vec::Vec;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

/// How a region's frames are shared between the tasks that map it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// One set of frames, writable, every write visible to every task (shared heaps).
    Shared,
    /// Copy-on-write: a task's first write to a page copies it for that task.
    Private,
    /// Never writable: a write is a [`Fault::WriteToReadOnly`](crate::Fault::WriteToReadOnly).
    ReadOnly,
}

/// Leaf size of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB leaves in L1 tables.
    Size4KiB,
    /// 2 MiB leaves in L2 tables (`HUGE_PAGE`).
    Size2MiB,
}

impl PageSize {
    /// Bytes per page.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4KiB => SIZE_4K,
            PageSize::Size2MiB => SIZE_2M,
        }
    }
    pub(crate) const fn level(self) -> u8 {
        match self {
            PageSize::Size4KiB => 1,
            PageSize::Size2MiB => 2,
        }
    }
}

/// Access rights of a region (always readable; kernel-mode, `USER_ACCESSIBLE` never set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    /// Writable (for `Private`: copy-on-write).
    pub write: bool,
    /// Executable (`NO_EXECUTE` clear).
    pub exec: bool,
}

impl Perm {
    /// Read-only data.
    pub const R: Perm = Perm {
        write: false,
        exec: false,
    };
    /// Read-write data.
    pub const RW: Perm = Perm {
        write: true,
        exec: false,
    };
    /// Code.
    pub const RX: Perm = Perm {
        write: false,
        exec: true,
    };
    /// Writable code.
    pub const RWX: Perm = Perm {
        write: true,
        exec: true,
    };
}

/// Where a template region's frames come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Fresh zeroed frames, allocated at `seal()` (2 MiB pages need
    /// [`PhysMem::alloc_huge_frame`]).
    Zeroed,
    /// The given frames, one per page in order, each aligned to the page size (e.g. an image's
    /// sections). The template takes its own reference to each; the caller keeps its own.
    Frames(Vec<PhysAddr>),
    /// One frame (or 2 MiB run) mapped at every page of the region: lets benchmarks build huge
    /// templates without the memory. One reference per page.
    Alias(PhysAddr),
}

/// A region to add to a [`TemplateBuilder`].
#[derive(Debug, Clone)]
pub struct RegionSpec {
    /// Name used in fault reports, e.g. `"libdata"`.
    pub name: Name,
    /// First address (lower half, aligned to `page_size`). Kept as given: [`TemplateBuilder::add`]
    /// rejects a non-canonical or upper-half address rather than truncating it.
    pub start: u64,
    /// Length in bytes (a non-zero multiple of `page_size`).
    pub len: u64,
    /// Sharing behaviour.
    pub kind: Kind,
    /// Executable.
    pub exec: bool,
    /// Leaf size.
    pub page_size: PageSize,
    /// Frames.
    pub backing: Backing,
}

impl RegionSpec {
    /// A non-executable region of 4 KiB pages backed by fresh zeroed frames.
    pub fn new(name: &str, start: u64, len: u64, kind: Kind) -> Self {
        RegionSpec {
            name: Name::from(name),
            start,
            len,
            kind,
            exec: false,
            page_size: PageSize::Size4KiB,
            backing: Backing::Zeroed,
        }
    }
    /// Make it executable.
    pub fn exec(mut self) -> Self {
        self.exec = true;
        self
    }
    /// Use 2 MiB pages.
    pub fn huge(mut self) -> Self {
        self.page_size = PageSize::Size2MiB;
        self
    }
    /// Set the backing.
    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }
}

/// A mapped region of a template or an address space, as recorded for fault resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Name for reports.
    pub name: Name,
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Sharing behaviour.
    pub kind: Kind,
    /// Current access rights.
    pub perm: Perm,
    /// Pages not present are mapped to fresh zeroed frames on first touch (private `map`s).
    pub demand_zero: bool,
    /// Leaf size.
    pub page_size: PageSize,
}

impl Region {
    pub(crate) fn contains(&self, va: u64) -> bool {
        self.start <= va && va < self.end
    }
}

/// Check `start..start+len` is a non-empty, lower-half range aligned to `align`.
pub(crate) fn check_range(start: u64, len: u64, align: u64) -> Result<u64, Error> {
    if !is_canonical(start) {
        return Err(Error::NonCanonical { addr: start });
    }
    if start >= entry::LOWER_HALF_END {
        return Err(Error::NotLowerHalf { addr: start });
    }
    if len == 0 {
        return Err(Error::Empty);
    }
    if !start.is_multiple_of(align) || !len.is_multiple_of(align) {
        return Err(Error::Misaligned { addr: start });
    }
    // `start` is in the lower half, so a range that wraps or ends beyond it crosses its end.
    match start.checked_add(len) {
        Some(end) if end <= entry::LOWER_HALF_END => Ok(end),
        _ => Err(Error::NotLowerHalf {
            addr: entry::LOWER_HALF_END,
        }),
    }
}

/// True when bits 48..64 of `addr` copy bit 47 (the CPU faults on any other address).
pub const fn is_canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == (1 << 17) - 1
}

/// Collects regions, then [`seal`](Self::seal)s them into a [`Template`].
#[derive(Debug)]
pub struct TemplateBuilder<M: PhysMem> {
    mem: M,
    regions: Vec<(Region, Backing)>,
}

impl<M: PhysMem> TemplateBuilder<M> {
    /// An empty builder allocating from `mem`.
    pub fn new(mem: &M) -> Self {
        TemplateBuilder {
            mem: mem.clone(),
            regions: Vec::new(),
        }
    }

    /// Add a region; rejects misaligned, empty, kernel-half, overlapping or badly backed ones.
    pub fn add(&mut self, spec: RegionSpec) -> Result<&mut Self, Error> {
        let size = spec.page_size.bytes();
        let start = spec.start;
        let end = check_range(start, spec.len, size)?;
        let pages = spec.len / size;
        match &spec.backing {
            Backing::Zeroed => {}
            Backing::Frames(frames) => {
                if frames.len() as u64 != pages || frames.iter().any(|f| f.as_u64() % size != 0) {
                    return Err(Error::BadBacking);
                }
            }
            Backing::Alias(f) => {
                if f.as_u64() % size != 0 {
                    return Err(Error::BadBacking);
                }
            }
        }
        if let Some((r, _)) = self
            .regions
            .iter()
            .find(|(r, _)| r.start < end && start < r.end)
        {
            return Err(Error::Overlap {
                addr: r.start.max(start),
            });
        }
        let perm = Perm {
            write: spec.kind != Kind::ReadOnly,
            exec: spec.exec,
        };
        let region = Region {
            name: spec.name,
            start,
            end,
            kind: spec.kind,
            perm,
            demand_zero: false,
            page_size: spec.page_size,
        };
        self.regions.push((region, spec.backing));
        Ok(self)
    }

    /// Build every table and seal the result. On failure (out of frames) nothing is leaked.
    pub fn seal(self) -> Result<Template<M>, Error> {
        let mut tree = Tree::template(&self.mem)?;
        let mut cursor = tree.cursor();
        for (r, backing) in &self.regions {
            let size = r.page_size.bytes();
            let level = r.page_size.level();
            let (write, cow) = leaf_write_bits(r.kind, r.perm.write);
            let flags = entry::leaf(0, level, write, r.perm.exec, cow);
            for (n, va) in (r.start..r.end).step_by(size as usize).enumerate() {
                match backing {
                    Backing::Zeroed => cursor.map_zeroed(va, level, flags)?,
                    Backing::Frames(fs) => {
                        cursor.map_page(va, cursor.given_page(fs[n], level), flags)?
                    }
                    Backing::Alias(f) => {
                        cursor.map_page(va, cursor.given_page(*f, level), flags)?
                    }
                }
            }
        }
        let mut regions: Vec<Region> = self.regions.into_iter().map(|(r, _)| r).collect();
        regions.sort_by_key(|r| r.start);
        Ok(Template::from_parts(tree, regions))
    }
}

/// Leaf `WRITABLE` and `COW` bits for a page of a template region of `kind`.
pub(crate) fn leaf_write_bits(kind: Kind, write: bool) -> (bool, bool) {
    match kind {
        Kind::Shared => (write, false),
        Kind::Private => (false, write),
        Kind::ReadOnly => (false, false),
    }
}

#[derive(Debug)]
struct Inner<M: PhysMem> {
    tree: Tree<M>,
    regions: Vec<Region>,
    /// Claimed 1 GiB slots: per L4 index (sorted), a bitmap of its 512 L3 slots.
    claims: Vec<Claim>,
    /// A snapshot's ranges `(start, end)` (sorted, disjoint, touching ones joined): all its
    /// tables lie in them. Empty for a built template.
    ranges: Vec<(u64, u64)>,
}

/// The 1 GiB slots a template claims in one 512 GiB range (one L4 entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    pub(crate) l4: usize,
    pub(crate) bits: [u64; 8],
}

impl Claim {
    pub(crate) fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..512).filter(|j| self.bits[j / 64] & (1 << (j % 64)) != 0)
    }
}

/// A sealed, immutable set of mappings with prebuilt tables, attached by reference to every
/// address space spawned from it. Cloning is cheap (a reference count); the tables are released
/// when the last clone and the last space using them are gone.
///
/// Its tables live under a private L4 (never loaded into CR3). Each 1 GiB slot its regions touch
/// is *claimed*: a spawn attaches one L4 entry per 512 GiB if no other template claims slots in
/// it, otherwise one L3 entry per claimed 1 GiB slot.
///
/// Sealed means read-only in the types (docs/engine.md, invariants 1 and 8): the tables sit behind an
/// `Arc`, and the engine's writing cursor needs `&mut` of the tree it writes, so a template can
/// only be walked. Reading works:
///
/// ```
/// use templates::{Kind, RegionSpec, TemplateBuilder, sim::SimMem};
/// use x86_64::VirtAddr;
///
/// let mem = SimMem::new(64);
/// let mut b = TemplateBuilder::new(&mem);
/// b.add(RegionSpec::new("data", 1 << 30, 4096, Kind::Private)).unwrap();
/// let t = b.seal().unwrap();
/// let tr = t.translate(VirtAddr::new(1 << 30)).unwrap();
/// assert!(tr.copy_on_write && !tr.writable);
/// ```
///
/// but nothing on a template, not even through `&mut`, changes a translation:
///
/// ```compile_fail,E0599
/// use templates::{Template, sim::SimMem};
/// fn change(t: &mut Template<SimMem>) {
///     let _ = t.cursor_mut(); // no writing cursor exists for a sealed template
/// }
/// ```
///
/// ```compile_fail,E0599
/// use templates::{Access, Template, sim::SimMem};
/// use x86_64::VirtAddr;
/// fn change(t: &mut Template<SimMem>) {
///     // Faults, maps and protections are resolved in an `AddressSpace`, never in a template.
///     let _ = t.resolve_fault(VirtAddr::new(1 << 30), Access::Write);
/// }
/// ```
#[derive(Debug)]
pub struct Template<M: PhysMem> {
    inner: Arc<Inner<M>>,
}

impl<M: PhysMem> Clone for Template<M> {
    fn clone(&self) -> Self {
        Template {
            inner: self.inner.clone(),
        }
    }
}

impl<M: PhysMem> Template<M> {
    pub(crate) fn from_parts(tree: Tree<M>, regions: Vec<Region>) -> Self {
        Self::from_snapshot(tree, regions, Vec::new())
    }

    /// A snapshot of `ranges` (see `Inner::ranges`).
    pub(crate) fn from_snapshot(
        tree: Tree<M>,
        regions: Vec<Region>,
        ranges: Vec<(u64, u64)>,
    ) -> Self {
        let mut claims: Vec<Claim> = Vec::new();
        for r in &regions {
            // The region's 1 GiB slots, a run per 512 GiB range, set a word at a time (a
            // task's heap region spans 256 slots: this is on the re-seal's path).
            let last = (r.end - 1) / SIZE_1G;
            let mut s = r.start / SIZE_1G;
            while s <= last {
                let l4 = (s >> 9) as usize;
                let range_last = s | 511;
                let (j0, j1) = ((s & 511) as usize, (last.min(range_last) & 511) as usize);
                let at = match claims.iter().position(|c| c.l4 == l4) {
                    Some(at) => at,
                    None => {
                        claims.push(Claim { l4, bits: [0; 8] });
                        claims.len() - 1
                    }
                };
                for w in j0 / 64..=j1 / 64 {
                    let lo = if w == j0 / 64 { j0 % 64 } else { 0 };
                    let hi = if w == j1 / 64 { j1 % 64 } else { 63 };
                    claims[at].bits[w] |= (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
                }
                s = range_last + 1;
            }
        }
        claims.sort_unstable_by_key(|c| c.l4);
        // The engine shares templates only through this Arc; a kernel PhysMem is Send + Sync.
        #[allow(clippy::arc_with_non_send_sync)]
        let inner = Arc::new(Inner {
            tree,
            regions,
            claims,
            ranges,
        });
        Template { inner }
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.inner.regions
    }

    /// The 1 GiB slots (`address >> 30`) this template claims, sorted.
    pub fn slots(&self) -> Vec<u64> {
        let claims = self.inner.claims.iter();
        claims
            .flat_map(|c| c.slots().map(move |j| ((c.l4 as u64) << 9) | j as u64))
            .collect()
    }

    /// The template's tree to write, if this handle is the only one (no clone, no space holds
    /// it): only a snapshot that is about to drop it uses this, to move its references into the
    /// snapshot that replaces it (`AddressSpace::snapshot`). Nothing else can see the tables then.
    pub(crate) fn sole_tree(&mut self) -> Option<&mut Tree<M>> {
        Arc::get_mut(&mut self.inner).map(|i| &mut i.tree)
    }

    /// The ranges a snapshot was taken of (empty for a built template).
    pub(crate) fn snapshot_ranges(&self) -> &[(u64, u64)] {
        &self.inner.ranges
    }

    /// Claimed slots per 512 GiB range (what spawn looks at: O(ranges), not O(size)).
    pub(crate) fn claims(&self) -> &[Claim] {
        &self.inner.claims
    }

    /// The template's private L4 (for inspection and tests; never loaded into CR3).
    pub fn root(&self) -> PhysFrame {
        self.inner.tree.root()
    }

    /// What a space spawned from this template translates `va` to before any change of its own
    /// (`None`: not present): a read-only walk of the sealed tables.
    pub fn translate(&self, va: VirtAddr) -> Option<Translation> {
        let va = va.as_u64();
        if va >= entry::LOWER_HALF_END {
            return None;
        }
        Some(Translation::of(self.reader().leaf(va)?, va))
    }

    /// The read-only cursor over the sealed tables: the only access a `Template` gives to them
    /// (its tree sits behind an `Arc`, so no `&mut` and no writing cursor exist).
    pub(crate) fn reader(&self) -> Reader<'_, M> {
        self.inner.tree.reader()
    }

    /// Number of tables below the root, and of leaf entries (a diagnostic walk).
    pub fn stats(&self) -> TemplateStats {
        let (tables, leaves) = self.reader().count();
        TemplateStats { tables, leaves }
    }
}

/// Size of a template's tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TemplateStats {
    /// Tables below the root (L3, L2, L1).
    pub tables: usize,
    /// Leaf entries (pages mapped).
    pub leaves: usize,
}

/// What `translate` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the translated byte.
    pub phys: PhysAddr,
    /// Leaf size.
    pub page_size: PageSize,
    /// `WRITABLE` is set (a copy-on-write page is not writable until its fault is resolved).
    pub writable: bool,
    /// `NO_EXECUTE` is clear.
    pub executable: bool,
    /// The copy-on-write software bit is set.
    pub copy_on_write: bool,
}

impl Translation {
    /// The translation of `va` through `leaf`, the leaf that maps it.
    pub(crate) fn of(leaf: Leaf, va: u64) -> Self {
        Translation {
            phys: PhysAddr::new(entry::addr(leaf.entry) + (va - leaf.va)),
            page_size: if leaf.level == 1 {
                PageSize::Size4KiB
            } else {
                PageSize::Size2MiB
            },
            writable: entry::writable(leaf.entry),
            executable: entry::executable(leaf.entry),
            copy_on_write: entry::cow(leaf.entry),
        }
    }
}
