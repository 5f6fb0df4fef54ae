//! The physical frame allocator, with a reference count per frame.
//!
//! Every 4 KiB frame of RAM has a `u32` reference count and a bit in a free bitmap. A frame is
//! free exactly when its bit is set; an allocated frame starts with count 1, and [`FrameAllocator::dec_ref`]
//! frees it when the count reaches zero. The page-table template engine counts its table and
//! data frames here (invariant 2, docs/engine.md).
//!
//! Counts are atomics, so taking and dropping references needs no lock; the bitmap sits behind a
//! spin lock (allocation and the final release only). Allocation scans the bitmap from a hint,
//! which makes the common alloc/free patterns O(1) amortised. The storage is borrowed, so the same
//! code runs on host tests over a `Vec` and in the kernel over memory carved from the memory map.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use lock_api::{Mutex, RawMutex};

/// A physical frame number (physical address / 4096).
pub type Pfn = usize;

/// Free bitmap plus the hint where the next search starts.
#[derive(Debug)]
struct Bitmap<'a> {
    words: &'a mut [u64],
    hint: usize,
}

impl Bitmap<'_> {
    fn is_free(&self, pfn: Pfn) -> bool {
        self.words[pfn / 64] & (1 << (pfn % 64)) != 0
    }

    fn set_free(&mut self, pfn: Pfn) {
        self.words[pfn / 64] |= 1 << (pfn % 64);
    }

    fn set_used(&mut self, pfn: Pfn) {
        self.words[pfn / 64] &= !(1 << (pfn % 64));
    }

    fn find_one(&mut self) -> Option<Pfn> {
        let n = self.words.len();
        for k in 0..n {
            let i = (self.hint + k) % n;
            let w = self.words[i];
            if w != 0 {
                self.hint = i;
                return Some(i * 64 + w.trailing_zeros() as usize);
            }
        }
        None
    }

    /// First run of `count` free frames starting at a multiple of `align` (frames).
    fn find_run(&self, count: usize, align: usize, limit: usize) -> Option<Pfn> {
        let mut start = 0;
        while start + count <= limit {
            match (start..start + count).rev().find(|&p| !self.is_free(p)) {
                None => return Some(start),
                Some(used) => start = (used + 1).next_multiple_of(align),
            }
        }
        None
    }
}

/// Reference-counted physical frames. See the module documentation.
///
/// `R` is the lock around the bitmap. The kernel uses one that keeps interrupts off while held:
/// the page-fault handler and the scheduler allocate and free frames, so a task preempted while
/// holding a plain spin lock would deadlock the next one.
#[derive(Debug)]
pub struct FrameAllocator<'a, R: RawMutex> {
    counts: &'a [AtomicU32],
    bitmap: Mutex<R, Bitmap<'a>>,
    free: AtomicUsize,
}

/// Bytes of metadata [`FrameAllocator`] needs for `frames` frames: (counts, bitmap).
pub const fn metadata_bytes(frames: usize) -> (usize, usize) {
    (frames * 4, frames.div_ceil(64) * 8)
}

impl<'a, R: RawMutex> FrameAllocator<'a, R> {
    /// An allocator over frames `0..counts.len()`, all of them in use until
    /// [`add_free_range`](Self::add_free_range) says otherwise.
    ///
    /// Every count must be zero (the kernel hands in freshly zeroed memory; checking 4 bytes per
    /// frame here would cost milliseconds of boot under TCG). `bitmap` must hold at least
    /// `counts.len().div_ceil(64)` words; it is cleared here.
    pub fn new(counts: &'a [AtomicU32], bitmap: &'a mut [u64]) -> Self {
        assert!(bitmap.len() * 64 >= counts.len(), "frame bitmap too small");
        bitmap.fill(0);
        FrameAllocator {
            counts,
            bitmap: Mutex::new(Bitmap {
                words: bitmap,
                hint: 0,
            }),
            free: AtomicUsize::new(0),
        }
    }

    /// Number of frames this allocator covers.
    pub fn total_frames(&self) -> usize {
        self.counts.len()
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    /// Marks frames `start..end` as free RAM. Frames past the end of the table are ignored.
    pub fn add_free_range(&self, start: Pfn, end: Pfn) {
        let end = end.min(self.counts.len());
        let mut bm = self.bitmap.lock();
        let mut added = 0;
        let mut pfn = start;
        while pfn < end {
            // Whole words at a time where possible.
            let bit = pfn % 64;
            let n = (64 - bit).min(end - pfn);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let w = &mut bm.words[pfn / 64];
            added += (mask & !*w).count_ones() as usize;
            *w |= mask;
            pfn += n;
        }
        self.free.fetch_add(added, Ordering::Relaxed);
    }

    /// Length in frames of the longest run of physically contiguous free frames (a measure of
    /// fragmentation; scans the whole bitmap).
    pub fn largest_free_run(&self) -> usize {
        let bm = self.bitmap.lock();
        let (mut best, mut run) = (0, 0);
        for &w in bm.words.iter() {
            if w == u64::MAX {
                run += 64;
                continue;
            }
            // Free bits at the bottom of `w` end the current run; then look inside the word.
            run += w.trailing_ones() as usize;
            best = best.max(run);
            let mut rest = w >> w.trailing_ones();
            while rest != 0 {
                rest >>= rest.trailing_zeros();
                best = best.max(rest.trailing_ones() as usize);
                rest = rest.checked_shr(rest.trailing_ones()).unwrap_or(0);
            }
            run = w.leading_ones() as usize;
        }
        best.max(run)
    }

    /// Takes a specific free frame (boot-time reservations). Returns false if it was not free.
    pub fn reserve(&self, pfn: Pfn) -> bool {
        let mut bm = self.bitmap.lock();
        if pfn >= self.counts.len() || !bm.is_free(pfn) {
            return false;
        }
        bm.set_used(pfn);
        self.counts[pfn].store(1, Ordering::Relaxed);
        self.free.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Allocates one frame with reference count 1. `None` when memory is exhausted.
    pub fn alloc(&self) -> Option<Pfn> {
        let mut bm = self.bitmap.lock();
        let pfn = bm.find_one()?;
        bm.set_used(pfn);
        self.counts[pfn].store(1, Ordering::Relaxed);
        self.free.fetch_sub(1, Ordering::Relaxed);
        Some(pfn)
    }

    /// Allocates `count` physically contiguous frames, the first a multiple of `align` frames,
    /// each with reference count 1 (each is released on its own).
    pub fn alloc_contiguous(&self, count: usize, align: usize) -> Option<Pfn> {
        if count == 0 {
            return None;
        }
        let mut bm = self.bitmap.lock();
        let start = bm.find_run(count, align.max(1), self.counts.len())?;
        for pfn in start..start + count {
            bm.set_used(pfn);
            self.counts[pfn].store(1, Ordering::Relaxed);
        }
        self.free.fetch_sub(count, Ordering::Relaxed);
        Some(start)
    }

    /// Adds a reference to an allocated frame.
    pub fn inc_ref(&self, pfn: Pfn) {
        let old = self.counts[pfn].fetch_add(1, Ordering::Relaxed);
        debug_assert!(old != 0, "inc_ref of free frame {pfn:#x}");
        assert!(
            old != u32::MAX,
            "reference count overflow on frame {pfn:#x}"
        );
    }

    /// Drops a reference; frees the frame when none is left. Returns the remaining count.
    pub fn dec_ref(&self, pfn: Pfn) -> u32 {
        let old = self.counts[pfn].fetch_sub(1, Ordering::AcqRel);
        assert!(old != 0, "dec_ref of free frame {pfn:#x}");
        if old == 1 {
            let mut bm = self.bitmap.lock();
            bm.set_free(pfn);
            if pfn / 64 < bm.hint {
                bm.hint = pfn / 64;
            }
            self.free.fetch_add(1, Ordering::Relaxed);
        }
        old - 1
    }

    /// Current reference count (0 for a free frame or one that is not RAM).
    pub fn ref_count(&self, pfn: Pfn) -> u32 {
        self.counts[pfn].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use core::sync::atomic::AtomicBool;

    /// A plain spin lock for host tests (the kernel's lock toggles interrupts, which a host
    /// process may not do).
    struct TestLock(AtomicBool);

    // SAFETY: `lock` returns only after flipping the flag from false to true (Acquire); `unlock`
    // clears it (Release).
    unsafe impl RawMutex for TestLock {
        #[allow(clippy::declare_interior_mutable_const)]
        const INIT: Self = TestLock(AtomicBool::new(false));
        type GuardMarker = lock_api::GuardSend;
        fn lock(&self) {
            while !self.try_lock() {
                core::hint::spin_loop();
            }
        }
        fn try_lock(&self) -> bool {
            self.0
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        }
        unsafe fn unlock(&self) {
            self.0.store(false, Ordering::Release);
        }
    }

    fn make(frames: usize) -> FrameAllocator<'static, TestLock> {
        let counts: &'static [AtomicU32] =
            Vec::from_iter((0..frames).map(|_| AtomicU32::new(0))).leak();
        let bits: &'static mut [u64] = alloc::vec![u64::MAX; frames.div_ceil(64)].leak();
        FrameAllocator::new(counts, bits)
    }

    #[test]
    fn starts_all_used_until_ranges_are_added() {
        let fa = make(200);
        assert_eq!(fa.free_frames(), 0);
        assert_eq!(fa.alloc(), None);
        fa.add_free_range(10, 20);
        fa.add_free_range(15, 25); // overlap counts once
        fa.add_free_range(190, 1000); // clipped
        assert_eq!(fa.free_frames(), 15 + 10);
    }

    #[test]
    fn alloc_until_exhausted_then_free_restores_baseline() {
        let fa = make(300);
        fa.add_free_range(1, 300);
        let base = fa.free_frames();
        let mut got = Vec::new();
        while let Some(p) = fa.alloc() {
            assert_eq!(fa.ref_count(p), 1);
            got.push(p);
        }
        assert_eq!(got.len(), 299);
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 299, "a frame was handed out twice");
        assert!(!got.contains(&0));
        for p in got {
            assert_eq!(fa.dec_ref(p), 0);
        }
        assert_eq!(fa.free_frames(), base);
    }

    #[test]
    fn reference_counts_free_at_zero_only() {
        let fa = make(64);
        fa.add_free_range(0, 64);
        let p = fa.alloc().unwrap();
        fa.inc_ref(p);
        fa.inc_ref(p);
        assert_eq!(fa.ref_count(p), 3);
        assert_eq!(fa.dec_ref(p), 2);
        assert_eq!(fa.dec_ref(p), 1);
        assert_eq!(fa.free_frames(), 63);
        assert_eq!(fa.dec_ref(p), 0);
        assert_eq!(fa.free_frames(), 64);
        assert_eq!(fa.ref_count(p), 0);
    }

    #[test]
    #[should_panic(expected = "dec_ref of free frame")]
    fn double_free_is_caught() {
        let fa = make(64);
        fa.add_free_range(0, 64);
        let p = fa.alloc().unwrap();
        fa.dec_ref(p);
        fa.dec_ref(p);
    }

    #[test]
    fn contiguous_runs_respect_alignment_and_holes() {
        let fa = make(4096);
        fa.add_free_range(3, 4096);
        assert!(fa.reserve(600)); // a hole in the first aligned run
        let start = fa.alloc_contiguous(512, 512).unwrap();
        assert_eq!(start % 512, 0);
        assert!(
            start >= 1024,
            "run must skip the frame reserved at 600: {start}"
        );
        for p in start..start + 512 {
            assert_eq!(fa.ref_count(p), 1);
        }
        let small = fa.alloc_contiguous(4, 1).unwrap();
        assert_eq!(small, 3);
        assert_eq!(fa.alloc_contiguous(10_000, 1), None);
        assert!(!fa.reserve(600));
    }

    #[test]
    fn largest_free_run_spans_words_and_sees_holes() {
        let fa = make(1024);
        assert_eq!(fa.largest_free_run(), 0);
        fa.add_free_range(3, 5);
        assert_eq!(fa.largest_free_run(), 2);
        fa.add_free_range(60, 200); // crosses two word boundaries
        assert_eq!(fa.largest_free_run(), 140);
        assert!(fa.reserve(100));
        assert_eq!(fa.largest_free_run(), 99);
        fa.add_free_range(300, 1024);
        assert_eq!(fa.largest_free_run(), 724);
        // Every other frame taken: runs of one.
        let fa = make(256);
        fa.add_free_range(0, 256);
        for p in (0..256).step_by(2) {
            assert!(fa.reserve(p));
        }
        assert_eq!(fa.largest_free_run(), 1);
        // Compare with a plain scan over a pseudo-random pattern.
        let fa = make(4096);
        fa.add_free_range(0, 4096);
        let mut x = 12345u32;
        for p in 0..4096 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if (x >> 16).is_multiple_of(7) {
                assert!(fa.reserve(p));
            }
        }
        let (mut best, mut run) = (0, 0);
        for p in 0..4096 {
            if fa.ref_count(p) == 0 {
                run += 1;
                best = best.max(run);
            } else {
                run = 0;
            }
        }
        assert_eq!(fa.largest_free_run(), best);
    }

    #[test]
    fn freed_low_frames_are_reused_first() {
        let fa = make(1024);
        fa.add_free_range(0, 1024);
        let a: Vec<_> = (0..200).map(|_| fa.alloc().unwrap()).collect();
        fa.dec_ref(a[5]);
        assert_eq!(fa.alloc(), Some(a[5]));
    }
}
