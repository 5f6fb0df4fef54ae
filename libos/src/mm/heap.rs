//! The kernel heap: `talc`, growing in physically contiguous chunks taken from the frame
//! allocator and used through the direct map (so growing it changes no page table).

use core::alloc::Layout;
use core::sync::atomic::{AtomicUsize, Ordering};

use talc::TalcLock;
use talc::base::Talc;
use talc::base::binning::Binning;
use talc::source::Source;

use super::kernel::frames;
use super::layout::{PAGE_SIZE, phys_to_virt};
use crate::sync::RawIrqSpinlock;

/// Smallest chunk the heap grows by.
const GROW_MIN: usize = 1 << 20;

static HEAP_FRAMES: AtomicUsize = AtomicUsize::new(0);

/// Grows the heap from the frame allocator on demand.
#[derive(Debug)]
pub(crate) struct FrameSource;

// SAFETY: `acquire` only claims memory it has just taken from the frame allocator and never
// hands out again; talc may manage it for the rest of the run.
unsafe impl Source for FrameSource {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        let want = (layout.size() + layout.align() + 4096).max(GROW_MIN);
        let pages = want.div_ceil(PAGE_SIZE as usize);
        let Some(pfn) = frames().alloc_contiguous(pages, 1) else {
            crate::console::emergency_write(format_args!(
                "stencil: out of memory: the kernel heap cannot grow by {} KiB ({} frames free)\n",
                pages * 4,
                frames().free_frames()
            ));
            return Err(());
        };
        let base = phys_to_virt(pfn as u64 * PAGE_SIZE) as *mut u8;
        // SAFETY: `base..base + pages * 4 KiB` is RAM we own exclusively (just allocated), mapped
        // writable in the direct map, and never released while the heap lives.
        match unsafe { talc.claim(base, pages * PAGE_SIZE as usize) } {
            Some(_) => {
                HEAP_FRAMES.fetch_add(pages, Ordering::Relaxed);
                Ok(())
            }
            None => {
                for p in pfn..pfn + pages {
                    frames().dec_ref(p);
                }
                Err(())
            }
        }
    }
}

#[global_allocator]
static HEAP: TalcLock<RawIrqSpinlock, FrameSource> = TalcLock::new(FrameSource);

/// Kernel-heap statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes currently allocated.
    pub allocated_bytes: usize,
    /// Number of live allocations.
    pub allocation_count: usize,
    /// Bytes of RAM the heap has taken from the frame allocator.
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
        reserved_bytes: HEAP_FRAMES.load(Ordering::Relaxed) * PAGE_SIZE as usize,
    }
}
