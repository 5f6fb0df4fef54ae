//! Process memory on the MMU: the layout of a task's heap and statics, the first task's
//! mapping, the fork template, each task's top table and the statics' page faults (the layout
//! is drawn in [`crate::process`]'s docs).

use ::x86_64::structures::paging::PhysFrame;
use ::x86_64::{PhysAddr, VirtAddr};
use templates::{AddressSpace, Error, Fault, Perm};

use crate::mm::kernel::{frames, kernel_root};
use crate::mm::layout::{
    PAGE_SIZE, PHEAP, PHEAP_SIZE, PROC_BASE, PROC_END, PSTATICS, PSTATICS_SHADOW, PSTATICS_SIZE,
    phys_to_virt,
};
use crate::space::KernelMem;

unsafe extern "C" {
    static __pdata_start: u8;
    static __pdata_end: u8;
    static __pbss_end: u8;
    static __pdata_load_phys: u8;
}

fn sym(s: *const u8) -> u64 {
    s as u64
}

/// Bytes of per-task statics (initialised part and zeroed part), a whole number of pages.
pub(crate) fn statics_len() -> u64 {
    sym(&raw const __pbss_end) - sym(&raw const __pdata_start)
}

const RW: Perm = Perm {
    write: true,
    exec: false,
};
/// Address bits of a page-table entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;

/// Maps the first task's process memory into `space`: the heap (demand-zero) and the statics,
/// filled with their initial values from the image.
pub(crate) fn map_first(space: &mut AddressSpace<KernelMem>) -> Result<(), Error> {
    let len = statics_len();
    if len > PSTATICS_SIZE {
        // The linker script puts them in one GiB; more cannot be mapped there.
        return Err(Error::TooSmall {
            len: PSTATICS_SIZE,
            min: len,
        });
    }
    space
        .map(VirtAddr::new(PHEAP), PHEAP_SIZE, RW, "heap", false)?
        .ignore();
    // Map the heap's first page (its allocator's header) now: process memory then always has
    // page tables of its own, which the first snapshot hands to its template, so later spawns
    // find it unchanged and share it (an empty range would build a new, empty template at every
    // spawn). The space is not loaded yet: nothing to flush.
    space
        .resolve_fault(VirtAddr::new(PHEAP), templates::Access::Write)
        .map_err(|_| Error::OutOfFrames)?
        .ignore();
    if len == 0 {
        return Ok(());
    }
    space
        .map(VirtAddr::new(PSTATICS_SHADOW), len, RW, "statics", true)?
        .ignore();
    // Copy the initial values (`.pdata`) page by page through the direct map; `.pbss` stays 0.
    let init = sym(&raw const __pdata_end) - sym(&raw const __pdata_start);
    let load = sym(&raw const __pdata_load_phys);
    let mut off = 0;
    while off < init {
        let n = (init - off).min(PAGE_SIZE);
        let t = space
            .translate(VirtAddr::new(PSTATICS_SHADOW + off))
            .ok_or(Error::NotMapped { addr: off })?;
        // SAFETY: the source is the image's load copy of `.pdata` (in RAM the frame allocator
        // never hands out: it is below `__image_end_phys`); the destination a frame just mapped
        // for this space alone; both reached through the direct map, and they do not overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(
                phys_to_virt(load + off) as *const u8,
                phys_to_virt(t.phys.as_u64()) as *mut u8,
                n as usize,
            );
        }
        off += n;
    }
    Ok(())
}

/// The parent's process memory as a template for a child (a snapshot of the range; see the
/// module docs). Changes the parent's tables (its writable pages become copy-on-write): the
/// caller applies the returned flush in the parent, which must be loaded.
pub(crate) fn fork_template(
    space: &mut AddressSpace<KernelMem>,
) -> Result<(crate::space::EngineTemplate, templates::Flush), Error> {
    // The snapshot the space holds now, if any (alive, so its root frame cannot be reused by a
    // new template): the result is that one exactly when nothing changed since.
    let mut held = [None; 4];
    for (h, t) in held.iter_mut().zip(space.held_templates()) {
        *h = Some(t.root());
    }
    let r = space.snapshot(&[(VirtAddr::new(PROC_BASE), PROC_END - PROC_BASE)]);
    FORKS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    if let Ok((t, _)) = &r
        && held.contains(&Some(t.root()))
    {
        CLEAN_FORKS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    }
    r
}

pub(crate) static FORKS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
pub(crate) static CLEAN_FORKS: core::sync::atomic::AtomicU64 =
    core::sync::atomic::AtomicU64::new(0);

/// A task's own L3 table for L4 entry 511 (see the module docs). Freed on drop, after the task's
/// space can no longer be loaded.
#[derive(Debug)]
pub(crate) struct Top {
    frame: PhysFrame,
}

fn table(phys: u64) -> *mut u64 {
    phys_to_virt(phys) as *mut u64
}

/// Top tables of ended tasks, kept for reuse: entries 0..511 of every top table are the
/// kernel's (they never change after boot), so a reused one needs only entry 511 written.
static TOP_CACHE: crate::arch::irq::IrqMutex<alloc::vec::Vec<PhysFrame>> =
    crate::arch::irq::IrqMutex::new(alloc::vec::Vec::new());
/// Top tables kept at most.
const TOP_CACHE_MAX: usize = 64;

impl Top {
    /// Makes `space`'s top table and installs it in its root (entry 511): the image as in the
    /// kernel's, and the statics as the space's shadow maps them now. `None`: out of frames.
    pub(crate) fn install(space: &AddressSpace<KernelMem>) -> Option<Top> {
        let kroot = table(kernel_root().start_address().as_u64());
        let root = table(space.root_phys().as_u64());
        // SAFETY: the kernel's root is a live table, only read.
        let k511 = unsafe { *kroot.add(511) };
        let cached = TOP_CACHE.lock().pop();
        let frame = match cached {
            Some(f) => f,
            None => {
                let pfn = frames().alloc()?;
                let f = PhysFrame::containing_address(PhysAddr::new(pfn as u64 * PAGE_SIZE));
                // SAFETY: `f` is a fresh frame of ours; the kernel's L3 for entry 511 is a
                // live table, only read; both through the direct map.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        table(k511 & ADDR),
                        table(f.start_address().as_u64()),
                        511,
                    );
                }
                f
            }
        };
        // SAFETY: `frame` is ours (fresh, or a cached one no root points at any more), its
        // entries 0..511 already the kernel's; `space`'s root is its own, and entry 511 is in
        // the kernel half, which the engine never reads, counts or frees (invariant 6). All
        // reached through the direct map.
        unsafe {
            *table(frame.start_address().as_u64()).add(511) = shadow_entry(root);
            *root.add(511) = (k511 & !ADDR) | frame.start_address().as_u64();
        }
        Some(Top { frame })
    }
}

/// Drops a spawn's space and top table without keeping any of their frames in the caches: a
/// spawn taken back because it ate into the kernel heap's reserve gives every frame back.
/// Interrupts are off meanwhile (so no other space is dropped while the caches are skipped).
pub(crate) fn release_unkept(space: AddressSpace<KernelMem>, top: Top) {
    crate::arch::irq::without(|_| {
        crate::space::NO_KEEP.store(true, core::sync::atomic::Ordering::Relaxed);
        drop(space);
        drop(top);
        crate::space::NO_KEEP.store(false, core::sync::atomic::Ordering::Relaxed);
    });
}

impl Drop for Top {
    fn drop(&mut self) {
        if crate::space::NO_KEEP.load(core::sync::atomic::Ordering::Relaxed) {
            frames().dec_ref((self.frame.start_address().as_u64() / PAGE_SIZE) as usize);
            return;
        }
        let mut cache = TOP_CACHE.lock();
        if cache.len() < TOP_CACHE_MAX && cache.try_reserve(1).is_ok() {
            cache.push(self.frame);
            return;
        }
        drop(cache);
        let pfn = (self.frame.start_address().as_u64() / PAGE_SIZE) as usize;
        frames().dec_ref(pfn);
    }
}

/// Gives the cached top tables and root tables back to the frame allocator
/// (`task::trim_caches`).
pub(crate) fn trim_top_cache() {
    let frames_back: alloc::vec::Vec<PhysFrame> = core::mem::take(&mut *TOP_CACHE.lock());
    for f in frames_back {
        frames().dec_ref((f.start_address().as_u64() / PAGE_SIZE) as usize);
    }
    crate::space::trim_root_cache();
}

/// The engine's entry for the shadow slot under `root` (L4 255, L3 511), or 0 if absent.
///
/// # Safety
/// `root` is a live root table (direct map), with the engine's tables below entry 255.
unsafe fn shadow_entry(root: *mut u64) -> u64 {
    // SAFETY: the caller's contract; each table read is a live table of that tree.
    unsafe {
        let e255 = *root.add(255);
        if e255 & PRESENT == 0 {
            return 0;
        }
        *table(e255 & ADDR).add(511)
    }
}

/// Brings the loaded space's top table up to date with its shadow slot; true if it changed (the
/// caller then flushes the whole TLB: the old L2 may be cached).
pub(crate) fn sync_top() -> bool {
    let root = table(crate::arch::mmu::root_phys() & ADDR);
    // SAFETY: the loaded root is a task's (its own top table at 511) or the kernel's; both are
    // live, reached through the direct map; interrupts are off in the fault handler and in
    // spawn, so nothing changes them meanwhile.
    unsafe {
        let top = table(*root.add(511) & ADDR);
        let want = shadow_entry(root);
        let kl3 = table(*table(kernel_root().start_address().as_u64()).add(511) & ADDR);
        if top == kl3 {
            // No top table of its own (a `Space` being entered, or boot): nothing to mirror.
            return false;
        }
        if *top.add(511) == want {
            return false;
        }
        *top.add(511) = want;
    }
    true
}

/// Is `addr` where the CPU sees this task's statics?
pub(crate) fn is_statics(addr: u64) -> bool {
    // The window is the address space's last GiB: it ends at 2^64.
    const _: () = assert!(PSTATICS.wrapping_add(PSTATICS_SIZE) == 0);
    addr >= PSTATICS
}

/// The shadow address of a statics address.
pub(crate) fn shadow_of(addr: u64) -> u64 {
    addr - PSTATICS + PSTATICS_SHADOW
}

/// The statics address of a shadow address.
pub(crate) fn statics_of(shadow: u64) -> u64 {
    shadow - PSTATICS_SHADOW + PSTATICS
}

/// Is `addr` in the shadow slot (faults there may replace the statics' L2 table)?
pub(crate) fn in_shadow_slot(addr: u64) -> bool {
    (PSTATICS_SHADOW..PROC_END).contains(&addr)
}

/// Is any of `va..va + len` process memory (never reachable through `task::read`/`write`: it
/// holds Rust objects)?
pub(crate) fn overlaps(va: u64, len: u64) -> bool {
    let end = va.saturating_add(len);
    va < PROC_END && PROC_BASE < end
}

/// Resolves a page fault at a statics address through the shadow; `None` when no space is loaded.
pub(crate) fn statics_fault(addr: u64, error_code: u64) -> Option<Result<(), Fault>> {
    let r = crate::space::handle_page_fault(shadow_of(addr), error_code)?;
    after_shadow_fault(addr);
    Some(r)
}

/// After the engine changed the shadow slot: mirror it and flush the statics page `hi`.
pub(crate) fn after_shadow_fault(hi: u64) {
    if sync_top() {
        crate::arch::mmu::flush_all();
    } else {
        crate::arch::mmu::flush_page(VirtAddr::new(hi & !(PAGE_SIZE - 1)));
    }
}
