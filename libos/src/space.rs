//! Address spaces built from page-table templates, on the real MMU.
//!
//! This is the bridge between the template engine (`templates` crate) and the hardware:
//! [`KernelMem`] gives the engine the global frame allocator and the direct map; [`Template`]s are
//! built from app data; a [`Space`] is spawned from templates in the boot's share mode
//! (`share=on|off`) with the kernel half attached, and [`Space::read`]/[`Space::write`] run
//! *inside* it: CR3 switches to the space, the copy goes through the MMU, and page faults in the
//! lower half (copy-on-write, demand-zero) are resolved by the engine from the page-fault handler.
//! A task (`libos::task`) runs whole functions inside its own space the same way: the scheduler
//! loads its root on every switch.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, Ordering};

use ::x86_64::registers::control::Cr3Flags;
use ::x86_64::structures::paging::page_table::PageTableEntry;
use ::x86_64::structures::paging::{PageTable, PageTableFlags, PhysFrame, Size2MiB};
use ::x86_64::{PhysAddr, VirtAddr};
use templates::{Access, AddressSpace, Backing, Flush, KernelHalf, PhysMem, RegionSpec};

pub use templates::{Error, Fault, Kind, Mode, PageSize, SpaceStats};

use crate::arch::mmu;
use crate::mm::kernel::{frames, kernel_root};
use crate::mm::layout::{PAGE_SIZE, phys_to_virt};

/// The engine's view of physical memory: the global frame allocator and the direct map.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelMem;

fn pfn(f: PhysFrame) -> usize {
    (f.start_address().as_u64() / PAGE_SIZE) as usize
}

// SAFETY: frames come from the global allocator (count 1, unused by anyone else); `frame_ptr`
// points into the direct map, which maps all RAM writable for the whole run; distinct frames do
// not overlap; a 2 MiB run is counted on its head and freed as a whole.
unsafe impl PhysMem for KernelMem {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        let p = frames().alloc()?;
        Some(PhysFrame::containing_address(PhysAddr::new(
            p as u64 * PAGE_SIZE,
        )))
    }

    fn alloc_huge_frame(&self) -> Option<PhysFrame<Size2MiB>> {
        let head = frames().alloc_contiguous(512, 512)?;
        Some(PhysFrame::containing_address(PhysAddr::new(
            head as u64 * PAGE_SIZE,
        )))
    }

    fn inc_ref(&self, frame: PhysFrame) {
        frames().inc_ref(pfn(frame));
    }

    fn dec_ref(&self, frame: PhysFrame) -> u32 {
        frames().dec_ref(pfn(frame))
    }

    fn dec_ref_huge(&self, run: PhysFrame<Size2MiB>) -> u32 {
        let head = (run.start_address().as_u64() / PAGE_SIZE) as usize;
        let left = frames().dec_ref(head);
        if left == 0 {
            for p in head + 1..head + 512 {
                frames().dec_ref(p);
            }
        }
        left
    }

    fn ref_count(&self, frame: PhysFrame) -> u32 {
        frames().ref_count(pfn(frame))
    }

    fn frame_ptr(&self, frame: PhysFrame) -> *mut u8 {
        phys_to_virt(frame.start_address().as_u64()) as *mut u8
    }

    fn reuse_root(&self, kernel: &KernelHalf) -> Option<PhysFrame> {
        reuse_root(kernel)
    }

    fn keep_root(&self, root: PhysFrame, kernel: templates::KernelHalfId) -> bool {
        keep_root(root, kernel)
    }
}

/// While set, dropped top tables (`procmem::Top`) and roots are freed, not kept
/// (`procmem::release_unkept`).
pub(crate) static NO_KEEP: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

/// Root tables of dropped spaces, kept for reuse (`PhysMem::reuse_root`): each one's lower half
/// is empty (the engine cleared it) and its upper half is the kernel half's exactly, so a spawn
/// that takes one writes none of its 512 entries.
static ROOT_CACHE: crate::arch::irq::IrqMutex<alloc::vec::Vec<PhysFrame>> =
    crate::arch::irq::IrqMutex::new(alloc::vec::Vec::new());
/// Root tables kept at most.
const ROOT_CACHE_MAX: usize = 64;

/// A kept root table for a space with the kernel half `kernel`: only for the one every libos
/// space gets ([`kernel_half`]), whose roots are the only ones kept.
fn reuse_root(kernel: &templates::KernelHalf) -> Option<PhysFrame> {
    if !core::ptr::eq(kernel, kernel_half()) {
        return None;
    }
    ROOT_CACHE.lock().pop()
}

/// Keeps the root of a dropped space made with `kernel` (its lower half empty) if it is the
/// kernel half every libos space gets and there is room; true if kept.
fn keep_root(root: PhysFrame, kernel: templates::KernelHalfId) -> bool {
    let half = kernel_half();
    if kernel != half.id() || NO_KEEP.load(core::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    let mut cache = ROOT_CACHE.lock();
    if cache.len() >= ROOT_CACHE_MAX || cache.try_reserve(1).is_err() {
        return false;
    }
    // SAFETY: `root` is the dropped space's, whose only reference the engine hands over here;
    // no CPU has it loaded (its task ended, or its `Space` was left), so this write of its
    // entry 511 (which `Top::install` pointed at the task's top table) through the direct map
    // is the only access. Entry 511 is the kernel half's again, as the kept roots must be.
    unsafe {
        *(phys_to_virt(root.start_address().as_u64()) as *mut u64).add(511) =
            half.entries()[511 - 256];
    }
    cache.push(root);
    true
}

/// Gives the kept root tables back to the frame allocator (`task::trim_caches`).
pub(crate) fn trim_root_cache() {
    let frames_back: Vec<PhysFrame> = core::mem::take(&mut *ROOT_CACHE.lock());
    for f in frames_back {
        frames().dec_ref(pfn(f));
    }
}

/// The engine's sealed template on the real MMU.
pub(crate) type EngineTemplate = templates::Template<KernelMem>;

/// A sealed template (see the `templates` crate): prebuilt page tables that tasks attach by
/// reference at spawn.
///
/// A libos object (`docs/ARCHITECTURE.md`, "Ownership of libos objects"): it belongs to the task
/// that made it, a copy in another task's memory (a fork's) is inert, and it is released when
/// its task ends. `clone` makes another handle to the same template, owned by the running task;
/// give one to a child with `libos::task::spawn_with`. Not `Send`, so a closure cannot capture
/// one:
///
/// ```compile_fail,E0277
/// let t = libos::space::TemplateBuilder::new().seal().expect("empty template");
/// let h = libos::task::spawn(&[], move || i32::from(t.stats().tables > 0)); // refused
/// ```
pub struct Template {
    inner: crate::handle::Owned<EngineTemplate>,
}

impl Template {
    /// Registers an engine template as a libos object of the running task.
    pub(crate) fn from_engine(t: EngineTemplate) -> Template {
        Template {
            inner: crate::handle::Owned::new(t),
        }
    }

    /// The engine template (another reference to it). Panics (ending only the running task) if
    /// the running task does not own this handle.
    pub(crate) fn engine(&self) -> EngineTemplate {
        let _k = crate::mm::ctx::kernel();
        self.inner.with(|t| t.clone())
    }

    /// Size of the template's tables (tables below its root, leaf entries).
    ///
    /// ```no_run
    /// let t = libos::space::TemplateBuilder::new().seal().expect("empty template");
    /// assert_eq!(t.stats().leaves, 0);
    /// ```
    pub fn stats(&self) -> templates::TemplateStats {
        let _k = crate::mm::ctx::kernel();
        // Not through `engine()`: a clone on this task's stack would leak the template's tables
        // if the task were killed while preempted here.
        self.inner.with(|t| t.stats())
    }
}

impl Clone for Template {
    fn clone(&self) -> Template {
        let _k = crate::mm::ctx::kernel();
        Template::from_engine(self.engine())
    }
}

impl core::fmt::Debug for Template {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Template")
            .field("id", &self.inner.id())
            .finish_non_exhaustive()
    }
}

impl crate::handle::sealed::Sealed for Template {}

impl crate::handle::Give for Template {
    fn give_to(&self, task: u64) {
        self.inner.give_to(task);
    }
}

/// Engine templates for a spawn: another reference to each (their handles must be the running
/// task's), for as long as the spawn needs them.
pub(crate) fn engine_templates(ts: &[&Template]) -> Vec<EngineTemplate> {
    ts.iter().map(|t| t.engine()).collect()
}

/// Builds a [`Template`] from app data.
///
/// ```no_run
/// use libos::space::{Kind, TemplateBuilder};
/// let t = TemplateBuilder::new()
///     .region("table", 0x4000_0000, 1 << 20, Kind::ReadOnly, |off, page| page.fill((off >> 12) as u8))
///     .expect("out of memory")
///     .seal()
///     .expect("bad layout");
/// ```
#[derive(Debug)]
pub struct TemplateBuilder {
    state: crate::handle::Owned<BuilderState>,
}

impl Default for TemplateBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// A libos object (`docs/ARCHITECTURE.md`, "Ownership of libos objects"): the builder's state
/// (frames, page tables in the making) is libos's, owned by the task that made the builder; a
/// copy in another task's memory (a fork's) is inert, and an unfinished builder is released
/// when its task ends. Each step takes the state, changes it, and registers it again.
impl TemplateBuilder {
    fn wrap(state: BuilderState) -> TemplateBuilder {
        let _k = crate::mm::ctx::kernel();
        TemplateBuilder {
            state: crate::handle::Owned::new(state),
        }
    }

    fn step(
        self,
        f: impl FnOnce(BuilderState) -> Result<BuilderState, Error>,
    ) -> Result<TemplateBuilder, Error> {
        // The state is out of the registry, on this stack only, until `wrap` puts it back (and
        // the app's fill runs meanwhile): a kill waits (`mm::ctx::hold`).
        let _h = crate::mm::ctx::hold();
        let state = {
            let _k = crate::mm::ctx::kernel();
            self.state.take()
        };
        f(state).map(TemplateBuilder::wrap)
    }

    /// An empty builder.
    ///
    /// ```no_run
    /// let b = libos::space::TemplateBuilder::new();
    /// ```
    pub fn new() -> Self {
        Self::wrap(BuilderState::new())
    }

    /// Adds a region of 4 KiB pages at `start` (lower half, page aligned) of `len` bytes whose
    /// contents `fill(offset, page)` writes, page by page, before the template is sealed
    /// (`fill` is app code and runs in app context).
    ///
    /// ```no_run
    /// use libos::space::{Kind, TemplateBuilder};
    /// // 16 MiB, copy-on-write for every task: each page starts filled with its page number.
    /// let b = TemplateBuilder::new()
    ///     .region("data", 0x4000_0000, 16 << 20, Kind::Private, |off, page| {
    ///         page.fill((off >> 12) as u8)
    ///     })
    ///     .expect("out of memory");
    /// ```
    ///
    /// `len` is rounded up to whole pages. Checked before any memory is spent: a non-canonical
    /// `start` is [`Error::NonCanonical`], one in (or a range reaching into) the kernel half
    /// [`Error::NotLowerHalf`], `len == 0` [`Error::Empty`], an unaligned `start`
    /// [`Error::Misaligned`], more pages than there are free frames [`Error::OutOfFrames`].
    pub fn region(
        self,
        name: &str,
        start: u64,
        len: u64,
        kind: Kind,
        fill: impl FnMut(u64, &mut [u8; 4096]),
    ) -> Result<Self, Error> {
        self.step(|b| b.region(name, start, len, kind, fill))
    }

    /// Adds a region holding `bytes` (then zeros to the end of the last page) at `start`; errors
    /// as for [`region`](Self::region).
    ///
    /// ```no_run
    /// use libos::space::{Kind, TemplateBuilder};
    /// let b = TemplateBuilder::new()
    ///     .blob("config", 0x4000_0000, Kind::ReadOnly, b"threads = 4\n")
    ///     .expect("memory");
    /// ```
    pub fn blob(self, name: &str, start: u64, kind: Kind, bytes: &[u8]) -> Result<Self, Error> {
        self.step(|b| b.blob(name, start, kind, bytes))
    }

    /// Maps a section of the app image (its code or read-only data: the same frames, no copy)
    /// read-only at `start`.
    ///
    /// ```no_run
    /// use libos::space::{ImageSection, TemplateBuilder};
    /// let t = TemplateBuilder::new()
    ///     .image_section("text", 0x80_0000_0000, ImageSection::Text)
    ///     .and_then(|b| b.image_section("rodata", 0x81_0000_0000, ImageSection::Rodata))
    ///     .and_then(|b| b.seal())
    ///     .expect("template");
    /// ```
    pub fn image_section(
        self,
        name: &str,
        start: u64,
        section: ImageSection,
    ) -> Result<Self, Error> {
        self.step(|b| b.image_section(name, start, section))
    }

    /// Adds a region backed by the given frames (one per page, in order); the template takes its
    /// own reference to each, the caller keeps theirs.
    pub(crate) fn frames_region(
        self,
        name: &str,
        start: u64,
        kind: Kind,
        frames: Vec<PhysAddr>,
    ) -> Result<Self, Error> {
        self.step(|b| b.frames_region(name, start, kind, frames))
    }

    /// Adds a region whose every page maps the same zeroed frame (for 2 MiB pages: the same
    /// zeroed 2 MiB run): a way to build very large templates (benchmarks) without the memory.
    /// With `Kind::Private`, a task's first write to a page copies it, as for any template.
    /// A region whose leaf page tables alone (one frame per 512 pages) exceed the free memory is
    /// [`Error::OutOfFrames`] at once; other bad arguments give the errors of
    /// [`region`](Self::region).
    ///
    /// ```no_run
    /// use libos::space::{Kind, PageSize, TemplateBuilder};
    /// // 64 GiB of page tables, one 2 MiB run of memory.
    /// let big = TemplateBuilder::new()
    ///     .alias_region("big", 0x80_0000_0000, 64 << 30, Kind::Private, PageSize::Size2MiB)
    ///     .and_then(|b| b.seal())
    ///     .expect("template");
    /// ```
    pub fn alias_region(
        self,
        name: &str,
        start: u64,
        len: u64,
        kind: Kind,
        page_size: PageSize,
    ) -> Result<Self, Error> {
        self.step(|b| b.alias_region(name, start, len, kind, page_size))
    }

    /// Seals the template: from now on nothing changes it; tasks attach it at spawn.
    ///
    /// ```no_run
    /// use libos::space::{Kind, TemplateBuilder};
    /// let t = TemplateBuilder::new()
    ///     .region("a", 0x4000_0000, 4096, Kind::ReadOnly, |_, _| {})
    ///     .expect("memory")
    ///     .seal()
    ///     .expect("layout");
    /// let h = libos::task::spawn(&[&t], || 0).expect("spawn");
    /// ```
    pub fn seal(self) -> Result<Template, Error> {
        // The state is out of the registry, on this stack only: a kill waits.
        let _h = crate::mm::ctx::hold();
        let state = {
            let _k = crate::mm::ctx::kernel();
            self.state.take()
        };
        state.seal()
    }
}

/// The builder's state, in the kernel heap (see [`TemplateBuilder`]).
#[derive(Debug)]
struct BuilderState {
    inner: templates::TemplateBuilder<KernelMem>,
    held: Vec<(PhysFrame, PageSize)>,
}

impl Drop for BuilderState {
    fn drop(&mut self) {
        let _k = crate::mm::ctx::kernel();
        self.release_held();
    }
}

impl BuilderState {
    fn new() -> Self {
        let _k = crate::mm::ctx::kernel();
        BuilderState {
            inner: templates::TemplateBuilder::new(&KernelMem),
            held: Vec::new(),
        }
    }

    fn release_held(&mut self) {
        for (f, size) in self.held.drain(..) {
            match size {
                PageSize::Size4KiB => {
                    KernelMem.dec_ref(f);
                }
                PageSize::Size2MiB => {
                    KernelMem.dec_ref_huge(PhysFrame::containing_address(f.start_address()));
                }
            }
        }
    }

    fn region(
        mut self,
        name: &str,
        start: u64,
        len: u64,
        kind: Kind,
        mut fill: impl FnMut(u64, &mut [u8; 4096]),
    ) -> Result<Self, Error> {
        kcall(move || {
            let pages = crate::limits::mapping(start, len, true)?;
            if pages > frames().free_frames() as u64 {
                return Err(Error::OutOfFrames);
            }
            let mut backing = Vec::new();
            backing
                .try_reserve_exact(pages as usize)
                .map_err(|_| Error::OutOfFrames)?;
            for i in 0..pages {
                let Some(f) = KernelMem.alloc_frame() else {
                    self.release_held();
                    return Err(Error::OutOfFrames);
                };
                self.held.push((f, PageSize::Size4KiB));
                // SAFETY: a frame we just allocated, reached through the direct map; nobody else
                // references it yet.
                let page = unsafe { &mut *(KernelMem.frame_ptr(f) as *mut [u8; 4096]) };
                page.fill(0);
                // App code: what it allocates and keeps is the task's.
                crate::mm::ctx::app(|| fill(i * PAGE_SIZE, page));
                backing.push(f.start_address());
            }
            let spec = RegionSpec::new(name, start, pages * PAGE_SIZE, kind)
                .backing(Backing::Frames(backing));
            if let Err(e) = self.inner.add(spec) {
                self.release_held();
                return Err(e);
            }
            Ok(self)
        })
    }

    fn blob(self, name: &str, start: u64, kind: Kind, bytes: &[u8]) -> Result<Self, Error> {
        kcall(move || {
            let len = (bytes.len() as u64).max(1);
            self.region(name, start, len, kind, |off, page| {
                let off = off as usize;
                let end = (off + page.len()).min(bytes.len());
                if off < end {
                    page[..end - off].copy_from_slice(&bytes[off..end]);
                }
            })
        })
    }

    fn image_section(
        mut self,
        name: &str,
        start: u64,
        section: ImageSection,
    ) -> Result<Self, Error> {
        kcall(move || {
            let (first, last) = section.bounds();
            let frames: Vec<PhysAddr> = (first..last)
                .step_by(PAGE_SIZE as usize)
                .map(|v| PhysAddr::new(v - crate::mm::layout::KERNEL_BASE))
                .collect();
            if frames.is_empty() {
                return Err(Error::Empty);
            }
            let len = frames.len() as u64 * PAGE_SIZE;
            let mut spec =
                RegionSpec::new(name, start, len, Kind::ReadOnly).backing(Backing::Frames(frames));
            if matches!(section, ImageSection::Text) {
                spec = spec.exec();
            }
            self.inner.add(spec)?;
            Ok(self)
        })
    }

    fn frames_region(
        mut self,
        name: &str,
        start: u64,
        kind: Kind,
        frames: Vec<PhysAddr>,
    ) -> Result<Self, Error> {
        let len = frames.len() as u64 * PAGE_SIZE;
        self.inner
            .add(RegionSpec::new(name, start, len, kind).backing(Backing::Frames(frames)))?;
        Ok(self)
    }

    fn alias_region(
        mut self,
        name: &str,
        start: u64,
        len: u64,
        kind: Kind,
        page_size: PageSize,
    ) -> Result<Self, Error> {
        kcall(move || {
            crate::limits::mapping(start, len, false)?;
            // The leaf tables alone (one per 512 pages) must fit in free memory: a region of many
            // TiB would otherwise spend every frame (and a long time) before failing at `seal`.
            let leaf_tables = (len / page_size.bytes()).div_ceil(512);
            if leaf_tables > frames().free_frames() as u64 {
                return Err(Error::OutOfFrames);
            }
            let (frame, bytes) = match page_size {
                PageSize::Size4KiB => (
                    KernelMem.alloc_frame().ok_or(Error::OutOfFrames)?,
                    PAGE_SIZE,
                ),
                PageSize::Size2MiB => {
                    let run = KernelMem.alloc_huge_frame().ok_or(Error::OutOfFrames)?;
                    (PhysFrame::containing_address(run.start_address()), 2 << 20)
                }
            };
            // SAFETY: freshly allocated frames, reached through the direct map (contiguous for a run).
            unsafe { core::ptr::write_bytes(KernelMem.frame_ptr(frame), 0, bytes as usize) };
            self.held.push((frame, page_size));
            let mut spec = RegionSpec::new(name, start, len, kind)
                .backing(Backing::Alias(frame.start_address()));
            if page_size == PageSize::Size2MiB {
                spec = spec.huge();
            }
            if let Err(e) = self.inner.add(spec) {
                self.release_held();
                return Err(e);
            }
            Ok(self)
        })
    }

    fn seal(mut self) -> Result<Template, Error> {
        kcall(move || {
            let inner =
                core::mem::replace(&mut self.inner, templates::TemplateBuilder::new(&KernelMem));
            let r = inner.seal();
            // The template holds its own references to the frames now (or the build failed).
            self.release_held();
            r.map(Template::from_engine)
        })
    }
}

/// A section of the app image, for [`TemplateBuilder::image_section`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSection {
    /// Code (mapped read-only and executable).
    Text,
    /// Read-only data.
    Rodata,
}

impl ImageSection {
    fn bounds(self) -> (u64, u64) {
        unsafe extern "C" {
            static __text_start: u8;
            static __text_end: u8;
            static __rodata_start: u8;
            static __rodata_end: u8;
        }
        match self {
            ImageSection::Text => (
                (&raw const __text_start) as u64,
                (&raw const __text_end) as u64,
            ),
            ImageSection::Rodata => (
                (&raw const __rodata_start) as u64,
                (&raw const __rodata_end) as u64,
            ),
        }
    }
}

/// The space the CPU is currently running in (null: the kernel's own tables).
static CURRENT: AtomicPtr<AddressSpace<KernelMem>> = AtomicPtr::new(core::ptr::null_mut());

/// An address space spawned from templates, not loaded by any task: tests and tools read and
/// write inside it.
///
/// A libos object (`docs/ARCHITECTURE.md`, "Ownership of libos objects"): it belongs to the task
/// that made it and is not `Send`; a copy in another task's memory (a fork's) is inert, and it
/// is released when its task ends.
#[derive(Debug)]
pub struct Space {
    inner: crate::handle::Owned<SpaceBox>,
}

/// The engine's space, boxed (its address stays put while it is loaded by [`enter`]).
#[derive(Debug)]
struct SpaceBox(core::mem::ManuallyDrop<alloc::boxed::Box<AddressSpace<KernelMem>>>);

impl Drop for SpaceBox {
    fn drop(&mut self) {
        // Release the tables with interrupts off, as the scheduler does for tasks: the engine's
        // reference counting assumes no other space is dropped halfway through.
        crate::arch::irq::without(|_| {
            // SAFETY: the box is dropped exactly once, here, and never used afterwards.
            unsafe { core::mem::ManuallyDrop::drop(&mut self.0) }
        });
    }
}

static KERNEL_HALF: spin::Once<KernelHalf> = spin::Once::new();

/// The kernel half (L4 entries 256..511) every address space gets. Its L4 entries never change
/// after boot (the L3 tables below them are created up front), so it is read once.
pub(crate) fn kernel_half() -> &'static KernelHalf {
    KERNEL_HALF.call_once(|| {
        // SAFETY: the kernel L4 is a live table reached through the direct map; we only read it.
        let l4 =
            unsafe { &*(phys_to_virt(kernel_root().start_address().as_u64()) as *const PageTable) };
        // `ACCESSED` preset on every present entry, so that no CPU ever writes the kernel half of
        // a task's root (it sets that bit in an entry it walks): a kept root's upper half is
        // still exactly this when it is reused (`PhysMem::reuse_root`).
        let entries: [PageTableEntry; 256] = core::array::from_fn(|i| {
            let mut e = l4[256 + i].clone();
            if e.flags().contains(PageTableFlags::PRESENT) {
                e.set_flags(e.flags() | PageTableFlags::ACCESSED);
            }
            e
        });
        KernelHalf::new(&entries)
    })
}

/// The engine mode for the boot's `share=` option.
///
/// ```no_run
/// use libos::space::Mode;
/// if libos::space::mode() == Mode::Copy {
///     libos::println!("booted with share=off");
/// }
/// ```
pub fn mode() -> Mode {
    if SHARE.load(Ordering::Relaxed) {
        Mode::Share
    } else {
        Mode::Copy
    }
}

/// The boot's `share=` option (boot sets it once, from the command line, before any task).
static SHARE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(true);

/// Sets the share mode for spaces made from now on (boot calls this with `share=`).
pub(crate) fn set_share_mode(share: bool) {
    SHARE.store(share, Ordering::Relaxed);
}

impl Space {
    /// Spawns a space with `templates` attached, in the boot's share mode.
    pub fn new(templates: &[&Template]) -> Result<Space, Error> {
        Self::with_mode(templates, mode())
    }

    /// Spawns a space in an explicit mode (benchmarks compare both in one boot).
    pub fn with_mode(templates: &[&Template], mode: Mode) -> Result<Space, Error> {
        kcall(move || {
            let inner = crate::arch::irq::without(|_| {
                let ts = engine_templates(templates);
                let refs: Vec<&EngineTemplate> = ts.iter().collect();
                AddressSpace::new(&KernelMem, &refs, mode, Some(kernel_half()))
            })?;
            Ok(Space {
                inner: crate::handle::Owned::new(SpaceBox(core::mem::ManuallyDrop::new(
                    alloc::boxed::Box::new(inner),
                ))),
            })
        })
    }

    /// Runs `f` on the engine's space (kernel context). Panics (ending only the running task)
    /// in a task that does not own this handle.
    fn with_space<R>(&self, f: impl FnOnce(&mut AddressSpace<KernelMem>) -> R) -> R {
        let _k = crate::mm::ctx::kernel();
        self.inner.with(|b| f(&mut b.0))
    }

    /// Page-table accounting for this space.
    pub fn stats(&self) -> SpaceStats {
        self.with_space(|s| s.stats())
    }

    /// Reads `buf.len()` bytes at `va` inside the space (through the MMU). A range outside the
    /// lower half (or wrapping) is [`Fault::NotLowerHalf`], an unmapped byte
    /// [`Fault::Unmapped`]; reading nothing succeeds at any lower-half `va`. The copy goes
    /// through a kernel-heap buffer of at most 64 KiB ([`Fault::OutOfFrames`] if there is none).
    pub fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), Fault> {
        kcall_fault(move || {
            self.with_space(|space| {
                check_access(space, va, buf.len(), false)?;
                if buf.is_empty() {
                    return Ok(());
                }
                // Bounce through the kernel heap: `buf` may live in the caller's own lower half, which
                // is not mapped (or means something else) while this space is loaded. In chunks, so a
                // huge `buf` needs no second buffer of its size.
                let mut bounce = bounce_buffer(va, buf.len())?;
                for (i, chunk) in buf.chunks_mut(BOUNCE).enumerate() {
                    let src = va + (i * BOUNCE) as u64;
                    let tmp = &mut bounce[..chunk.len()];
                    enter(space, || {
                        // SAFETY: `check` found every byte inside a region of this space, which is
                        // loaded; faults (demand-zero) are resolved by the page-fault handler; `tmp` is
                        // in the kernel heap, mapped in every space.
                        unsafe {
                            core::ptr::copy_nonoverlapping(
                                src as *const u8,
                                tmp.as_mut_ptr(),
                                tmp.len(),
                            )
                        }
                    });
                    chunk.copy_from_slice(tmp);
                }
                Ok(())
            })
        })
    }

    /// Writes `data` at `va` inside the space (through the MMU: a `Private` template page is
    /// unshared and copied on the first write). Errors as for [`read`](Self::read), and
    /// [`Fault::WriteToReadOnly`] for a read-only byte.
    pub fn write(&mut self, va: u64, data: &[u8]) -> Result<(), Fault> {
        kcall_fault(move || {
            self.with_space(|space| {
                check_access(space, va, data.len(), true)?;
                if data.is_empty() {
                    return Ok(());
                }
                let mut bounce = bounce_buffer(va, data.len())?; // see `read`
                for (i, chunk) in data.chunks(BOUNCE).enumerate() {
                    let dst = va + (i * BOUNCE) as u64;
                    let tmp = &mut bounce[..chunk.len()];
                    tmp.copy_from_slice(chunk);
                    enter(space, || {
                        // SAFETY: every byte of `dst..dst + len` is in a writable region of this space
                        // (`check`), which is loaded; copy-on-write faults are resolved by the page-fault
                        // handler; `tmp` is in the kernel heap, mapped in every space.
                        unsafe {
                            core::ptr::copy_nonoverlapping(tmp.as_ptr(), dst as *mut u8, tmp.len())
                        }
                    });
                }
                Ok(())
            })
        })
    }

    /// Turns this space's memory into a new template (the fork-server primitive). Each range
    /// `(start, len)` must be page aligned and mapped; a non-canonical start is
    /// [`Error::NonCanonical`], one outside the lower half [`Error::NotLowerHalf`].
    pub fn snapshot(&mut self, ranges: &[(u64, u64)]) -> Result<Template, Error> {
        kcall(move || {
            let r = lower_ranges(ranges)?;
            let (t, flush) = self.with_space(|space| space.snapshot(&r))?;
            flush.ignore(); // the space is not loaded (only `enter` loads it, and it restores CR3)
            Ok(Template::from_engine(t))
        })
    }
}

/// Runs `f` inside `space`: loads its root (and makes it the current space for the page-fault
/// handler), then the running task's again.
fn enter<R>(space: &mut AddressSpace<KernelMem>, f: impl FnOnce() -> R) -> R {
    crate::arch::irq::without(|_| {
        let prev = CURRENT.swap(space, Ordering::AcqRel);
        let (prev_root, flags) = mmu::root();
        // SAFETY: the space's root has the kernel half installed, so code, stack and data
        // stay mapped across the switch.
        unsafe { mmu::load_root(space.root(), Cr3Flags::empty()) };
        let r = f();
        // SAFETY: back to the running task's own root, which was loaded a moment ago.
        unsafe { mmu::load_root(prev_root, flags) };
        CURRENT.store(prev, Ordering::Release);
        r
    })
}

/// Bytes `Space::read`/`write` copy per switch into the space.
const BOUNCE: usize = 64 << 10;

/// A kernel-heap buffer for up to [`BOUNCE`] bytes of a `len`-byte copy at `va`;
/// `Fault::OutOfFrames` if the heap cannot provide it.
fn bounce_buffer(va: u64, len: usize) -> Result<Vec<u8>, Fault> {
    let n = len.min(BOUNCE);
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Fault::OutOfFrames { addr: va })?;
    v.resize(n, 0);
    Ok(v)
}

/// `addr` as a [`VirtAddr`] in the lower half, never truncated (see [`crate::limits::lower_half`]).
pub(crate) fn lower_va(addr: u64) -> Result<VirtAddr, Error> {
    let a = crate::limits::lower_half(addr)?;
    VirtAddr::try_new(a).map_err(|_| Error::NonCanonical { addr })
}

/// Snapshot ranges as engine ranges, each start checked with [`lower_va`].
pub(crate) fn lower_ranges(ranges: &[(u64, u64)]) -> Result<Vec<(VirtAddr, u64)>, Error> {
    let mut r = Vec::new();
    r.try_reserve_exact(ranges.len())
        .map_err(|_| Error::OutOfFrames)?;
    for &(s, l) in ranges {
        r.push((lower_va(s)?, l));
    }
    Ok(r)
}

/// Honours a flush token for the loaded space.
pub(crate) fn apply(flush: Flush) {
    match flush {
        Flush::None => {}
        Flush::Page(va) => mmu::flush_page(va),
        Flush::Range { start, end } => {
            let mut a = start.as_u64() & !(PAGE_SIZE - 1);
            while a < end.as_u64() {
                mmu::flush_page(VirtAddr::new(a));
                a += PAGE_SIZE;
            }
        }
        Flush::All => mmu::flush_all(),
    }
}

/// Checks that `va..va+len` lies in regions of `space` (writable ones for a write): the first
/// byte that does not is the error. A range leaving the lower half (or wrapping) is
/// [`Fault::NotLowerHalf`] (see [`crate::limits::access`]) even where it starts unmapped.
pub(crate) fn check_access(
    space: &AddressSpace<KernelMem>,
    va: u64,
    len: usize,
    write: bool,
) -> Result<(), Fault> {
    let end = crate::limits::access(va, len)?;
    let mut a = va;
    while a < end {
        let r = space
            .region(VirtAddr::new(a))
            .ok_or(Fault::Unmapped { addr: a })?;
        let typed = || {
            space
                .translate(VirtAddr::new(a))
                .is_some_and(|t| is_typed((t.phys.as_u64() / PAGE_SIZE) as usize))
        };
        if write && (!r.perm.write || (r.kind == Kind::Shared && typed())) {
            return Err(Fault::WriteToReadOnly {
                addr: a,
                region: r.name.clone(),
            });
        }
        a = r.end;
    }
    Ok(())
}

/// The frames of every live shared heap (first frame → frame count): memory that holds Rust
/// objects (collection headers, allocator state), so byte-wise writes (`task::write`,
/// `Space::write`) must not change it — a forged header would be a pointer anywhere.
static TYPED: crate::arch::irq::IrqMutex<alloc::collections::BTreeMap<usize, usize>> =
    crate::arch::irq::IrqMutex::new(alloc::collections::BTreeMap::new());

/// Records `pages` frames from `first` as a shared heap's (see [`TYPED`]).
pub(crate) fn mark_typed(first: usize, pages: usize) {
    TYPED.lock().insert(first, pages);
}

/// Forgets the heap whose first frame is `first`.
pub(crate) fn unmark_typed(first: usize) {
    TYPED.lock().remove(&first);
}

/// True when frame `pfn` belongs to a live shared heap. A heap's region maps its frames only (in
/// the heap's template and in any snapshot of it), so one page tells for the whole region.
fn is_typed(pfn: usize) -> bool {
    TYPED
        .lock()
        .range(..=pfn)
        .next_back()
        .is_some_and(|(&first, &n)| pfn < first + n)
}

/// Records the space the CPU now runs in (the scheduler calls this on every switch).
pub(crate) fn set_current(space: &mut AddressSpace<KernelMem>) {
    CURRENT.store(space, Ordering::Release);
}

/// Runs `f` on the running task's address space (interrupts off, so no switch intervenes).
pub(crate) fn with_current<R>(f: impl FnOnce(&mut AddressSpace<KernelMem>) -> R) -> R {
    crate::arch::irq::without(|_| {
        let ptr = CURRENT.load(Ordering::Acquire);
        assert!(!ptr.is_null(), "no address space is loaded");
        // SAFETY: CURRENT points at the loaded space, owned by the running task (or borrowed by
        // `Space::enter`) for as long as it is loaded; interrupts are off, so nothing else runs.
        f(unsafe { &mut *ptr })
    })
}

/// Called by the page-fault handler for lower-half addresses. Returns `Ok` when the fault was
/// resolved (retry the instruction) and the engine's reason otherwise.
pub(crate) fn handle_page_fault(addr: u64, error_code: u64) -> Option<Result<(), Fault>> {
    let ptr = CURRENT.load(Ordering::Acquire);
    if ptr.is_null() {
        return None;
    }
    let access = if error_code & 16 != 0 {
        Access::Execute
    } else if error_code & 2 != 0 {
        Access::Write
    } else {
        Access::Read
    };
    // SAFETY: CURRENT points at the loaded space (the running task's, or one borrowed by
    // `Space::enter`); the fault handler runs with interrupts off, so nothing else touches it.
    let space = unsafe { &mut *ptr };
    Some(space.resolve_fault(VirtAddr::new(addr), access).map(apply))
}

/// Runs libos's side of an app-facing call in kernel context (`mm::ctx`): what it allocates is
/// libos's. The error, if any, is rehomed into the task's heap after.
fn kcall<R>(f: impl FnOnce() -> Result<R, Error>) -> Result<R, Error> {
    // Until the error is in the task's heap, a kill waits (it would leak the kernel's copy).
    let _h = crate::mm::ctx::hold();
    let r = {
        let _k = crate::mm::ctx::kernel();
        f()
    };
    r.map_err(rehome_error)
}

/// [`kcall`] for calls that fail with a [`Fault`].
fn kcall_fault<R>(f: impl FnOnce() -> Result<R, Fault>) -> Result<R, Fault> {
    let _h = crate::mm::ctx::hold();
    let r = {
        let _k = crate::mm::ctx::kernel();
        f()
    };
    r.map_err(rehome_fault)
}

/// A region name in app context: a fresh copy in the running task's heap.
fn rehome_name(n: templates::Name) -> templates::Name {
    alloc::sync::Arc::from(&*n)
}

/// `e` with the region name it may hold copied into the running task's heap (call in app
/// context). The engine's names live in the kernel heap, shared by reference count; an
/// app-owned value holding one would be duplicated, not copied, when the app forks
/// (`docs/ARCHITECTURE.md`, "Tasks as processes").
pub(crate) fn rehome_error(e: Error) -> Error {
    match e {
        Error::NotPrivate { addr, region } => Error::NotPrivate {
            addr,
            region: rehome_name(region),
        },
        e => e,
    }
}

/// [`rehome_error`] for a [`Fault`].
pub(crate) fn rehome_fault(f: Fault) -> Fault {
    match f {
        Fault::WriteToReadOnly { addr, region } => Fault::WriteToReadOnly {
            addr,
            region: rehome_name(region),
        },
        Fault::ExecuteNoExec { addr, region } => Fault::ExecuteNoExec {
            addr,
            region: rehome_name(region),
        },
        f => f,
    }
}
