//! Boot-time memory setup: the kernel page tables (the kernel half of every address space),
//! the global frame allocator, and mapping helpers for the kernel half.

use core::sync::atomic::AtomicU32;

use ::x86_64::registers::control::Cr3Flags;
use ::x86_64::structures::paging::{
    FrameAllocator as PtFrameAllocator, Mapper, OffsetPageTable, Page, PageTable,
    PageTableFlags as F, PhysFrame, Size1GiB, Size2MiB, Size4KiB,
};
use ::x86_64::{PhysAddr, VirtAddr};
use spin::Once;

use super::frame::{FrameAllocator, metadata_bytes};
use super::layout::{
    DIRECT_MAP, EARLY_LIMIT, KERNEL_BASE, KHEAP, KSTACKS, PAGE_SIZE, phys_to_virt,
};
use crate::arch::irq::{IrqMutex, RawIrqSpinlock};
use crate::arch::{cpu, mmu};
use crate::memmap::Range;

static FRAMES: Once<FrameAllocator<'static, RawIrqSpinlock>> = Once::new();
static KERNEL_PT: Once<IrqMutex<OffsetPageTable<'static>>> = Once::new();
static KERNEL_ROOT: Once<PhysFrame> = Once::new();
static STACKS_L3: Once<PhysFrame> = Once::new();
static HEAP_L3: Once<PhysFrame> = Once::new();

/// True once [`init`] has built the kernel page tables and started the frame allocator (the
/// kernel heap can grow from then on).
pub(crate) fn ready() -> bool {
    KERNEL_PT.get().is_some()
}

/// The global frame allocator (after [`init`]).
pub fn frames() -> &'static FrameAllocator<'static, RawIrqSpinlock> {
    FRAMES.get().expect("frame allocator used before mm::init")
}

#[allow(
    dead_code,
    reason = "used by the task layer (tasks issue) to build address-space roots"
)]
/// Physical frame of the kernel's L4 table (its upper half is every task's upper half).
pub fn kernel_root() -> PhysFrame {
    *KERNEL_ROOT
        .get()
        .expect("kernel page tables used before mm::init")
}

unsafe extern "C" {
    static __image_start_phys: u8;
    static __image_end_phys: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __data_end: u8;
}

fn sym(p: *const u8) -> u64 {
    p as u64
}

/// Hands out zeroed frames from a fixed physical range below 1 GiB, reached through the boot
/// mapping at `KERNEL_BASE`. Used only while the real page tables are built.
struct BumpFrames {
    next: u64,
    end: u64,
}

// SAFETY: every frame returned is unused RAM inside the reserved bump range, returned once.
unsafe impl PtFrameAllocator<Size4KiB> for BumpFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        if self.next >= self.end {
            return None;
        }
        let p = self.next;
        self.next += PAGE_SIZE;
        // SAFETY: p < EARLY_LIMIT, so KERNEL_BASE + p is mapped writable by the boot tables, and
        // the frame belongs to the bump range, which nothing else uses.
        unsafe { core::ptr::write_bytes((KERNEL_BASE + p) as *mut u8, 0, PAGE_SIZE as usize) };
        Some(PhysFrame::containing_address(PhysAddr::new(p)))
    }
}

/// Hands out zeroed frames from the global allocator (after the switch to the real tables).
struct KernelFrames;

// SAFETY: frames come from the global allocator with count 1 and are owned by the page tables.
unsafe impl PtFrameAllocator<Size4KiB> for KernelFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let pfn = frames().alloc()?;
        let phys = pfn as u64 * PAGE_SIZE;
        // SAFETY: a freshly allocated frame, mapped writable in the direct map.
        unsafe { core::ptr::write_bytes(phys_to_virt(phys) as *mut u8, 0, PAGE_SIZE as usize) };
        Some(PhysFrame::containing_address(PhysAddr::new(phys)))
    }
}

/// Why memory setup failed.
#[derive(Debug)]
pub(crate) enum InitError {
    /// No usable RAM range below 1 GiB can hold the allocator metadata and boot page tables.
    NoEarlyMemory(u64),
    /// The bump range ran out while building the kernel page tables.
    TablesTooBig,
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::NoEarlyMemory(need) => write!(
                f,
                "out of memory: need {} KiB of free RAM below 1 GiB for frame metadata and page tables",
                need / 1024
            ),
            InitError::TablesTooBig => {
                write!(f, "kernel page tables did not fit their reserved range")
            }
        }
    }
}

fn page_flags(f: cpu::Features, writable: bool, exec: bool) -> F {
    let mut flags = F::PRESENT;
    if writable {
        flags |= F::WRITABLE;
    }
    if !exec && f.nx {
        flags |= F::NO_EXECUTE;
    }
    if f.pge {
        flags |= F::GLOBAL;
    }
    flags
}

/// Builds the kernel page tables, switches to them and starts the frame allocator.
///
/// # Safety
/// Call once, early in boot, while the boot page tables (identity + `KERNEL_BASE` map of the first
/// 1 GiB) are active, with `ram` the normalised usable RAM ranges.
pub(crate) unsafe fn init(ram: &[Range]) -> Result<(), InitError> {
    let feat = cpu::features();
    let max_phys = ram.last().map_or(0, |r| r.end);
    let nframes = (max_phys / PAGE_SIZE) as usize;
    let image_start = sym(&raw const __image_start_phys);
    let image_end = sym(&raw const __image_end_phys).next_multiple_of(PAGE_SIZE);
    let (count_bytes, bitmap_bytes) = metadata_bytes(nframes);
    let meta_bytes = (count_bytes as u64).next_multiple_of(8) + bitmap_bytes as u64;
    let meta_bytes = meta_bytes.next_multiple_of(PAGE_SIZE);
    let image_pages = (image_end - image_start) / PAGE_SIZE;
    // (+ 1: the kernel heap's L3 table)
    let bump_frames = 16 + max_phys.div_ceil(1 << 30) * 2 + image_pages / 512 + 2 + 1;
    let need = meta_bytes + bump_frames * PAGE_SIZE;

    // Place metadata + bump tables in RAM below 1 GiB, above the image.
    let floor = image_end.max(1 << 20);
    let place = ram.iter().find_map(|r| {
        let start = r.start.max(floor);
        (start + need <= r.end.min(EARLY_LIMIT)).then_some(start)
    });
    let meta_phys = place.ok_or(InitError::NoEarlyMemory(need))?;
    let bump_start = meta_phys + meta_bytes;
    let mut bump = BumpFrames {
        next: bump_start,
        end: bump_start + bump_frames * PAGE_SIZE,
    };

    // Build the new tables through the boot mapping (phys p at KERNEL_BASE + p).
    let root = bump.allocate_frame().ok_or(InitError::TablesTooBig)?;
    // SAFETY: `root` is a zeroed frame below 1 GiB reached through the boot mapping; nothing
    // else references it.
    let root_table =
        unsafe { &mut *((KERNEL_BASE + root.start_address().as_u64()) as *mut PageTable) };
    // SAFETY: all frames this mapper touches come from `bump` (below 1 GiB), which the boot
    // mapping at KERNEL_BASE covers.
    let mut pt = unsafe { OffsetPageTable::new(root_table, VirtAddr::new(KERNEL_BASE)) };
    let parent = F::PRESENT | F::WRITABLE;

    // Direct map: 1 GiB pages where every 2 MiB piece holds RAM, else 2 MiB pages.
    let has_ram = |s: u64, e: u64| ram.iter().any(|r| r.start < e && r.end > s);
    let data = page_flags(feat, true, false);
    let mut gib = 0;
    while gib < max_phys {
        let full = (0..512).all(|i| has_ram(gib + i * (2 << 20), gib + (i + 1) * (2 << 20)));
        if full && feat.huge_1g {
            let page = Page::<Size1GiB>::containing_address(VirtAddr::new(DIRECT_MAP + gib));
            let frame = PhysFrame::<Size1GiB>::containing_address(PhysAddr::new(gib));
            // SAFETY: maps RAM into the direct map, which no other mapping aliases mutably.
            unsafe {
                pt.map_to_with_table_flags(page, frame, data | F::HUGE_PAGE, parent, &mut bump)
            }
            .map_err(|_| InitError::TablesTooBig)?
            .ignore();
        } else {
            for i in 0..512u64 {
                let s = gib + i * (2 << 20);
                if s >= max_phys || !has_ram(s, s + (2 << 20)) {
                    continue;
                }
                let page = Page::<Size2MiB>::containing_address(VirtAddr::new(DIRECT_MAP + s));
                let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(s));
                // SAFETY: as above.
                unsafe {
                    pt.map_to_with_table_flags(page, frame, data | F::HUGE_PAGE, parent, &mut bump)
                }
                .map_err(|_| InitError::TablesTooBig)?
                .ignore();
            }
        }
        gib += 1 << 30;
    }

    // The image, with W^X: text R-X, rodata R--, data/bss RW-.
    let sections = [
        (
            sym(&raw const __text_start),
            sym(&raw const __text_end),
            page_flags(feat, false, true),
        ),
        (
            sym(&raw const __rodata_start),
            sym(&raw const __rodata_end),
            page_flags(feat, false, false),
        ),
        (
            sym(&raw const __data_start),
            sym(&raw const __data_end),
            page_flags(feat, true, false),
        ),
    ];
    for (start, end, flags) in sections {
        let mut v = start;
        while v < end {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(v));
            let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(v - KERNEL_BASE));
            // SAFETY: maps the image's own pages at their link addresses, as the boot map did.
            unsafe { pt.map_to_with_table_flags(page, frame, flags, parent, &mut bump) }
                .map_err(|_| InitError::TablesTooBig)?
                .ignore();
            v += PAGE_SIZE;
        }
    }

    // Pre-create the L3 tables of the kernel-stack area and the kernel heap's region so later
    // stack and heap mappings change only tables below the L4 entries that every address space
    // copies: each change is visible in every task at once.
    let stacks_l3 = bump.allocate_frame().ok_or(InitError::TablesTooBig)?;
    let l4_index = (KSTACKS >> 39) as usize & 511;
    pt.level_4_table_mut()[l4_index].set_frame(stacks_l3, parent);
    let heap_l3 = bump.allocate_frame().ok_or(InitError::TablesTooBig)?;
    let l4_index = (KHEAP >> 39) as usize & 511;
    pt.level_4_table_mut()[l4_index].set_frame(heap_l3, parent);

    // Switch. The code, stack and statics all live in the image, which the new tables map at the
    // same addresses.
    // SAFETY: `root` maps everything the kernel touches from here on (image, direct map).
    unsafe { mmu::load_root(root, Cr3Flags::empty()) };
    cpu::enable_global_pages();

    // Start the frame allocator over the metadata area, now reached through the direct map.
    let counts_ptr = phys_to_virt(meta_phys) as *mut AtomicU32;
    let bitmap_ptr = phys_to_virt(meta_phys + (count_bytes as u64).next_multiple_of(8)) as *mut u64;
    // SAFETY: the metadata range is RAM reserved for exactly this purpose, mapped writable in the
    // direct map, suitably aligned (page / 8 bytes), and never used for anything else.
    let (counts, bitmap) = unsafe {
        core::ptr::write_bytes(counts_ptr, 0, nframes);
        (
            core::slice::from_raw_parts(counts_ptr, nframes),
            core::slice::from_raw_parts_mut(bitmap_ptr, nframes.div_ceil(64)),
        )
    };
    let fa = FRAMES.call_once(|| FrameAllocator::new(counts, bitmap));
    for r in ram {
        // Leave the first MiB alone (real-mode leftovers, firmware tables).
        let s = r.start.max(1 << 20);
        if s < r.end {
            fa.add_free_range((s / PAGE_SIZE) as usize, (r.end / PAGE_SIZE) as usize);
        }
    }
    let used_end = bump.next;
    for phys in (image_start..image_end)
        .chain(meta_phys..used_end)
        .step_by(PAGE_SIZE as usize)
    {
        fa.reserve((phys / PAGE_SIZE) as usize);
    }

    // SAFETY: the root table is now reached through the direct map, and the mapper only ever
    // follows frames that the direct map covers.
    let table = unsafe { &mut *(phys_to_virt(root.start_address().as_u64()) as *mut PageTable) };
    // SAFETY: `table` is the active L4; from now on all kernel-half changes go through this mapper.
    let mapper = unsafe { OffsetPageTable::new(table, VirtAddr::new(DIRECT_MAP)) };
    KERNEL_PT.call_once(|| IrqMutex::new(mapper));
    KERNEL_ROOT.call_once(|| root);
    STACKS_L3.call_once(|| stacks_l3);
    HEAP_L3.call_once(|| heap_l3);
    log::debug!(
        "mm: {} MiB RAM, {} frames free, metadata {} KiB at {:#x}, {} boot table frames",
        max_phys >> 20,
        fa.free_frames(),
        meta_bytes / 1024,
        meta_phys,
        (used_end - bump_start) / PAGE_SIZE
    );
    Ok(())
}

/// Maps a freshly allocated, zeroed frame at `virt` in the kernel half (writable, NX).
/// Returns the frame number, or `None` when memory is exhausted.
pub(crate) fn map_new_kernel_page(virt: u64) -> Option<usize> {
    let pfn = frames().alloc()?;
    let phys = pfn as u64 * PAGE_SIZE;
    // SAFETY: a fresh frame, reached through the direct map.
    unsafe { core::ptr::write_bytes(phys_to_virt(phys) as *mut u8, 0, PAGE_SIZE as usize) };
    match map_4k(virt, phys, page_flags(cpu::features(), true, false)) {
        // The page was not present before, and x86 never caches not-present translations:
        // there is nothing to flush.
        Ok(()) => Some(pfn),
        Err(_) => {
            frames().dec_ref(pfn);
            None
        }
    }
}

/// Maps one 4 KiB kernel-half page `virt` → `phys` that is not mapped yet, creating tables as
/// needed from the frame allocator. Nothing to flush: not-present entries are never cached.
fn map_4k(
    virt: u64,
    phys: u64,
    flags: F,
) -> Result<(), ::x86_64::structures::paging::mapper::MapToError<Size4KiB>> {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt));
    let frame = PhysFrame::containing_address(PhysAddr::new(phys));
    let mut pt = KERNEL_PT.get().expect("mm not initialised").lock();
    // SAFETY: callers pass kernel-half addresses that only this module maps (kernel stacks, the
    // kernel heap's region, device pages in the direct-map range) and a frame nothing else maps
    // writable there.
    unsafe {
        pt.map_to_with_table_flags(
            page,
            frame,
            flags,
            F::PRESENT | F::WRITABLE,
            &mut KernelFrames,
        )
    }
    .map(|flush| flush.ignore())
}

/// Maps the 4 KiB MMIO page at `phys` uncached at its direct-map address (device pages are not
/// RAM, so the direct map leaves them out). Returns the virtual address; mapping the same page
/// twice returns the existing mapping.
pub(crate) fn map_mmio_page(phys: u64) -> Option<u64> {
    let virt = phys_to_virt(phys);
    let flags = page_flags(cpu::features(), true, false) | F::NO_CACHE | F::WRITE_THROUGH;
    {
        use ::x86_64::structures::paging::mapper::Translate;
        let pt = KERNEL_PT.get()?.lock();
        if pt.translate_addr(VirtAddr::new(virt)).is_some() {
            return Some(virt);
        }
    }
    use ::x86_64::structures::paging::mapper::MapToError;
    match map_4k(virt, phys, flags) {
        Ok(()) | Err(MapToError::PageAlreadyMapped(_)) => Some(virt),
        Err(_) => None,
    }
}

/// Unmaps a kernel-half page mapped by [`map_new_kernel_page`] and drops its frame.
pub(crate) fn unmap_kernel_page(virt: u64) {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt));
    let mut pt = KERNEL_PT.get().expect("mm not initialised").lock();
    if let Ok((frame, flush)) = pt.unmap(page) {
        // The flush goes through arch (it is the same invlpg).
        flush.ignore();
        crate::arch::mmu::flush_page(VirtAddr::new(virt));
        frames().dec_ref((frame.start_address().as_u64() / PAGE_SIZE) as usize);
    }
}

/// Frees the L2 and L1 tables of the kernel-stack area that no longer map anything (after stacks
/// were unmapped). The L3 table stays: every address space's L4 entry 510 points at it.
pub(crate) fn reclaim_stack_tables() {
    if let Some(l3) = STACKS_L3.get() {
        reclaim_tables(l3);
    }
}

/// Frees the L2 and L1 tables of the kernel heap's region that no longer map anything (after a
/// failed growth unmapped its pages). The L3 table stays: every L4 entry 509 points at it.
pub(crate) fn reclaim_heap_tables() {
    if let Some(l3) = HEAP_L3.get() {
        reclaim_tables(l3);
    }
}

/// Frees the empty L2 and L1 tables below the kernel-half L3 table `l3` (4 KiB mappings only).
fn reclaim_tables(l3: &PhysFrame) {
    let table = |f: PhysAddr| {
        // SAFETY: kernel page tables are RAM reached through the direct map; the KERNEL_PT lock
        // held below serialises every change to them.
        unsafe { &mut *(phys_to_virt(f.as_u64()) as *mut PageTable) }
    };
    let _guard = KERNEL_PT.get().expect("mm not initialised").lock();
    let mut freed = 0;
    let l3t = table(l3.start_address());
    for e3 in l3t.iter_mut().filter(|e| !e.is_unused()) {
        let l2t = table(e3.addr());
        for e2 in l2t
            .iter_mut()
            .filter(|e| !e.is_unused() && !e.flags().contains(F::HUGE_PAGE))
        {
            if table(e2.addr()).iter().all(|e| e.is_unused()) {
                frames().dec_ref((e2.addr().as_u64() / PAGE_SIZE) as usize);
                e2.set_unused();
                freed += 1;
            }
        }
        if l2t.iter().all(|e| e.is_unused()) {
            frames().dec_ref((e3.addr().as_u64() / PAGE_SIZE) as usize);
            e3.set_unused();
            freed += 1;
        }
    }
    if freed > 0 {
        // Drop paging-structure caches that may still point at the freed tables.
        mmu::flush_all();
    }
}
