//! The kernel heap: `talc` over its own virtual region of the kernel half ([`KHEAP`], L4 entry
//! 509), grown by mapping single frames from anywhere in RAM.
//!
//! Growth needs free frames, not physically contiguous ones, so a fragmented RAM does not stop it.
//! The region's L3 table is created at boot and every address space's L4 entry 509 points at it,
//! so a page mapped here is visible in every task at once (the kernel half's one live shared
//! subtree, invariant 1's exception, docs/engine.md). The heap is one talc heap: each growth
//! maps pages right after the last ones and extends it. A growth that cannot complete unmaps what it mapped
//! and frees the page tables it created, so a failed allocation leaves the heap and the free-frame
//! count exactly as they were.

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use talc::TalcLock;
use talc::base::Talc;
use talc::base::binning::Binning;
use talc::source::Source;

use super::kernel::{frames, map_new_kernel_page, ready, reclaim_heap_tables, unmap_kernel_page};
use super::layout::{KHEAP, KHEAP_SIZE, PAGE_SIZE};
use crate::arch::irq::RawIrqSpinlock;

/// Smallest step the heap grows by.
const GROW_MIN: usize = 1 << 20;
/// Entries per page table.
const ENTRIES: usize = 512;

/// Frames that growing the heap by `pages` pages takes at most: the pages, plus the L1 and L2
/// tables that map them (a run of pages may straddle one table boundary at each level; the L3
/// table exists from boot).
pub(crate) const fn frames_to_grow(pages: usize) -> usize {
    pages + pages / ENTRIES + 1 + pages / (ENTRIES * ENTRIES) + 1
}

/// Frames kept free for the kernel heap: enough to grow it by 4 MiB (1,024 pages plus the page
/// tables that map them). Spawns and task-heap growth that would leave fewer fail instead
/// (`task::SPAWN_RESERVE_FRAMES`).
pub(crate) const RESERVE_FRAMES: usize = frames_to_grow(1024);

/// Frames the heap holds (pages and their page tables).
static HEAP_FRAMES: AtomicUsize = AtomicUsize::new(0);
/// Size of the last allocation the heap could not grow for (`usize::MAX`: none since the last
/// successful growth). The panic handler uses it to tell out-of-memory from other panics.
static FAILED_REQUEST: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Grows the heap on demand by mapping frames at the end of its region.
#[derive(Debug)]
pub(crate) struct FrameSource {
    /// End of the mapped part of the region.
    mapped_end: usize,
    /// talc's end of the heap; 0 before the first growth.
    heap_end: usize,
}

impl FrameSource {
    fn fail(layout: Layout) -> Result<(), ()> {
        note_failed(layout.size(), false);
        Err(())
    }
}

// SAFETY: `acquire` only hands talc pages it has just mapped, writable, at the end of the heap's
// own region (nothing else maps or uses that region); they stay mapped for the rest of the run.
unsafe impl Source for FrameSource {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        if !ready() {
            // Before memory setup (e.g. a long early log line): an allocation failure, not a
            // panic about a missing frame allocator.
            return Self::fail(layout);
        }
        // Room for the block at any alignment, plus talc's tags.
        let Some(want) = layout
            .size()
            .checked_add(layout.align())
            .and_then(|n| n.checked_add(PAGE_SIZE as usize))
        else {
            return Self::fail(layout);
        };
        // A free gap at the top of the heap merges with the growth: only the rest is needed.
        let top_free = NonNull::new(talc.source.heap_end as *mut u8).map_or(0, |end| {
            // SAFETY: `heap_end` is the current end of the heap, as talc returned it last.
            let reserved = unsafe { talc.reserved(end) };
            end.as_ptr() as usize - reserved.up_to.as_ptr() as usize
        });
        let want = want.saturating_sub(top_free);
        let pages = want.max(GROW_MIN).div_ceil(PAGE_SIZE as usize);
        let start = talc.source.mapped_end;
        let Some(end) = pages
            .checked_mul(PAGE_SIZE as usize)
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= (KHEAP + KHEAP_SIZE) as usize)
        else {
            return Self::fail(layout);
        };
        // Fail fast (and without touching any table) when RAM cannot possibly back it.
        let free_before = frames().free_frames();
        if frames_to_grow(pages) > free_before {
            return Self::fail(layout);
        }
        for i in 0..pages {
            let va = start + i * PAGE_SIZE as usize;
            if map_new_kernel_page(va as u64).is_none() {
                for j in 0..i {
                    unmap_kernel_page((start + j * PAGE_SIZE as usize) as u64);
                }
                reclaim_heap_tables();
                debug_assert_eq!(frames().free_frames(), free_before, "failed growth leaked");
                return Self::fail(layout);
            }
        }
        talc.source.mapped_end = end;
        // Only this code allocates frames meanwhile: the heap lock keeps interrupts off, on the
        // one CPU. So the difference is exactly the pages plus the tables created for them.
        let grown = free_before - frames().free_frames();
        HEAP_FRAMES.fetch_add(grown, Ordering::Relaxed);
        FAILED_REQUEST.store(usize::MAX, Ordering::Relaxed);
        match NonNull::new(talc.source.heap_end as *mut u8) {
            None => {
                // SAFETY: `start..end` was just mapped writable, belongs to the heap region only,
                // and stays mapped for the rest of the run.
                let heap_end = unsafe { talc.claim(start as *mut u8, end - start) };
                let Some(heap_end) = heap_end else {
                    // talc refused the region (too small for its metadata; not with GROW_MIN):
                    // give the pages and their tables back, as if the growth never happened.
                    for j in 0..pages {
                        unmap_kernel_page((start + j * PAGE_SIZE as usize) as u64);
                    }
                    reclaim_heap_tables();
                    talc.source.mapped_end = start;
                    HEAP_FRAMES.fetch_sub(grown, Ordering::Relaxed);
                    return Self::fail(layout);
                };
                talc.source.heap_end = heap_end.as_ptr() as usize;
            }
            Some(heap_end) => {
                // SAFETY: `heap_end` is the end talc returned last time, and the memory from there
                // to `end` was just mapped for the heap alone (as above).
                let new_end = unsafe { talc.extend(heap_end, end as *mut u8) };
                talc.source.heap_end = new_end.as_ptr() as usize;
            }
        }
        Ok(())
    }
}

/// The kernel heap's allocator (the global allocator, `mm::alloc`, sends libos's blocks here).
pub(super) static HEAP: TalcLock<RawIrqSpinlock, FrameSource> = TalcLock::new(FrameSource {
    mapped_end: KHEAP as usize,
    heap_end: 0,
});

/// Records that a heap (the kernel's or a task's) could not grow for an allocation of `size`
/// bytes, for the panic handler's out-of-memory report.
pub(crate) fn note_failed(size: usize, task_heap: bool) {
    FAILED_REQUEST.store(size, Ordering::Relaxed);
    FAILED_IN_TASK_HEAP.store(task_heap, Ordering::Relaxed);
}

/// Whether the last failed growth was a task's heap (else the kernel heap).
static FAILED_IN_TASK_HEAP: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

/// Which heap the last failed growth was: "the task's heap" or "the kernel heap".
pub(crate) fn failed_heap() -> &'static str {
    if FAILED_IN_TASK_HEAP.load(Ordering::Relaxed) {
        "the task's heap"
    } else {
        "the kernel heap"
    }
}

/// Records that a heap grew (any earlier failure is over).
pub(crate) fn note_grown() {
    FAILED_REQUEST.store(usize::MAX, Ordering::Relaxed);
}

/// If the kernel heap's last growth failed (and none succeeded since): the size in bytes of the
/// allocation it was for.
pub(crate) fn failed_request() -> Option<usize> {
    match FAILED_REQUEST.load(Ordering::Relaxed) {
        usize::MAX => None,
        n => Some(n),
    }
}

/// Bytes of RAM the heap holds (as in [`HeapStats::reserved_bytes`]), read without the heap lock.
pub(crate) fn reserved_bytes() -> usize {
    HEAP_FRAMES.load(Ordering::Relaxed) * PAGE_SIZE as usize
}

/// Heap statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes currently allocated.
    pub allocated_bytes: usize,
    /// Number of live allocations.
    pub allocation_count: usize,
    /// Bytes of RAM the heap has taken from the frame allocator: its pages and the page tables
    /// that map them.
    pub reserved_bytes: usize,
}

/// Current kernel-heap statistics (`libos::heap_stats()`).
///
/// ```no_run
/// libos::println!("{:?}", libos::heap_stats());
/// ```
pub fn stats() -> HeapStats {
    let talc = HEAP.lock();
    let c = talc.counters();
    HeapStats {
        allocated_bytes: c.allocated_bytes,
        allocation_count: c.allocation_count,
        reserved_bytes: reserved_bytes(),
    }
}
