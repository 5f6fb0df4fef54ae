//! A task's own heap: `talc` over the task's heap region ([`PHEAP`], process memory), with the
//! allocator's state in the region's first page.
//!
//! Because the bookkeeping lives inside the region, it is copied with the heap: a task spawned
//! from another (a fork) starts with a copy-on-write copy of both, so every object the parent
//! had is live in the child at the same address, and the child's allocations and frees change
//! only its own copy. When a task ends its heap goes with its address space: nothing to free
//! object by object, nothing left behind. The region is demand-zero; the heap grows by moving
//! talc's end, committing the new pages as it does (each is touched once, so the page-fault
//! handler maps it): a growth that free memory cannot back fails as an allocation error, like
//! the kernel heap's, instead of faulting later. `reserved_bytes` is what the heap committed.
//!
//! Only the running task ever touches its heap (other tasks see their own at the same address),
//! and interrupt handlers allocate from the kernel heap (`mm::ctx`), so the lock is never
//! contended; it keeps interrupts off while talc runs.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;

use talc::TalcLock;
use talc::base::Talc;
use talc::base::binning::Binning;
use talc::source::Source;

use super::layout::{PAGE_SIZE, PHEAP, PHEAP_SIZE};
use crate::arch::irq::RawIrqSpinlock;

/// Smallest step the heap's end moves by.
const GROW_MIN: usize = 1 << 20;
/// Marks an initialised heap header (the region is demand-zero: a fresh one reads 0).
const MAGIC: u64 = 0x5354_454e_4349_4c48; // "STENCILH"
/// First byte talc manages: the header has the first page to itself.
const START: usize = PHEAP as usize + PAGE_SIZE as usize;
/// End of the heap region.
const END: usize = (PHEAP + PHEAP_SIZE) as usize;

/// Moves the heap's end forward inside the task's (demand-zero) heap region.
#[derive(Debug)]
pub(crate) struct RegionSource {
    /// talc's end of the heap; 0 before the first growth.
    heap_end: usize,
}

// SAFETY: `acquire` hands talc only memory of the task's own heap region, which is mapped
// (demand-zero, writable) for the task's whole life and used by nothing but this heap; each
// growth starts where the last one ended.
unsafe impl Source for RegionSource {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        let want = layout
            .size()
            .checked_add(layout.align())
            .and_then(|n| n.checked_add(PAGE_SIZE as usize))
            .ok_or(())?;
        let fail = || {
            super::heap::note_failed(layout.size(), true);
            Err(())
        };
        let Some(grow) = want
            .max(GROW_MIN)
            .checked_next_multiple_of(PAGE_SIZE as usize)
        else {
            return fail();
        };
        let start = match talc.source.heap_end {
            0 => START,
            end => end,
        };
        let Some(end) = start.checked_add(grow).filter(|&e| e <= END) else {
            return fail();
        };
        // Commit the growth now: fail cleanly (an allocation error) rather than fault later on
        // a page that no frame can back. Keep the spawn reserve for the kernel heap.
        let pages = grow / PAGE_SIZE as usize;
        let need = super::heap::frames_to_grow(pages) + super::heap::RESERVE_FRAMES;
        if need > super::kernel::frames().free_frames() {
            return fail();
        }
        for p in (start..end).step_by(PAGE_SIZE as usize) {
            // SAFETY: `p` is a page of the task's heap region past talc's end (mapped,
            // demand-zero, unused): writing 0 over the 0 it reads as maps its frame.
            unsafe { core::ptr::write_volatile(p as *mut u8, 0) };
        }
        super::heap::note_grown();
        match NonNull::new(talc.source.heap_end as *mut u8) {
            None => {
                // SAFETY: `START..end` lies in the task's heap region, mapped writable and used
                // by nothing else (see the impl's comment).
                let Some(heap_end) = (unsafe { talc.claim(START as *mut u8, end - START) }) else {
                    return fail();
                };
                talc.source.heap_end = heap_end.as_ptr() as usize;
            }
            Some(heap_end) => {
                // SAFETY: `heap_end` is the end talc returned last time, and `heap_end..end` is
                // the next part of the heap region (mapped, unused).
                let new_end = unsafe { talc.extend(heap_end, end as *mut u8) };
                talc.source.heap_end = new_end.as_ptr() as usize;
            }
        }
        Ok(())
    }
}

/// The header at the start of the heap region.
struct Header {
    magic: u64,
    talc: TalcLock<RawIrqSpinlock, RegionSource>,
}

/// The running task's heap, set up on first use.
///
/// # Safety
/// Call only in app context on a task whose process memory is mapped (`mm::ctx::in_app`).
unsafe fn heap() -> &'static TalcLock<RawIrqSpinlock, RegionSource> {
    let h = PHEAP as *mut Header;
    // SAFETY: the heap region's first page is mapped (demand-zero) and belongs to the header;
    // only the running task reaches its copy, and it is not in an allocation right now (the
    // allocator is not reentrant: talc's source never allocates).
    unsafe {
        if (*h).magic != MAGIC {
            core::ptr::write(
                h,
                Header {
                    magic: MAGIC,
                    talc: TalcLock::new(RegionSource { heap_end: 0 }),
                },
            );
        }
        &(*h).talc
    }
}

/// True if `ptr` points into a task heap (rather than the kernel heap).
pub(crate) fn owns(ptr: *mut u8) -> bool {
    (START..END).contains(&(ptr as usize))
}

/// Allocates from the running task's heap.
///
/// # Safety
/// As [`GlobalAlloc::alloc`]; in app context only.
pub(crate) unsafe fn alloc(layout: Layout) -> *mut u8 {
    // SAFETY: the caller is in app context, and forwards `alloc`'s contract.
    unsafe { heap().alloc(layout) }
}

/// Frees a block of the running task's heap.
///
/// # Safety
/// As [`GlobalAlloc::dealloc`], for a block [`owns`] says is in a task heap — the running task's
/// (a block of the heap region always is: every task sees its own copy there).
pub(crate) unsafe fn dealloc(ptr: *mut u8, layout: Layout) {
    // SAFETY: `ptr` is a live block of this task's heap (the caller's contract).
    unsafe { heap().dealloc(ptr, layout) }
}

/// Resizes a block of the running task's heap.
///
/// # Safety
/// As [`GlobalAlloc::realloc`], for a block of the running task's heap.
pub(crate) unsafe fn realloc(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    // SAFETY: as for `dealloc`; `realloc`'s contract forwarded.
    unsafe { heap().realloc(ptr, layout, new_size) }
}

/// The running task's heap statistics (app context: a task whose process memory is mapped).
pub(crate) fn stats() -> super::heap::HeapStats {
    if !super::ctx::ready() {
        return super::heap::HeapStats::default();
    }
    // SAFETY: process memory exists (`ready`); only the counters are read, under the lock.
    let t = unsafe { heap() }.lock();
    let c = t.counters();
    super::heap::HeapStats {
        allocated_bytes: c.allocated_bytes,
        allocation_count: c.allocation_count,
        reserved_bytes: t.source.heap_end.saturating_sub(START) + PAGE_SIZE as usize,
    }
}
