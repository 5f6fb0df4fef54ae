//! The physical-memory abstraction: the only way the engine reaches frames.

use crate::half::{KernelHalf, KernelHalfId};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PhysFrame, Size2MiB};

/// Physical memory as the engine sees it: frames with reference counts, and a pointer to each.
///
/// All methods take `&self`; implementations use interior mutability (atomics in the kernel).
/// Engine types hold a clone of the handle so that their `Drop` can release frames, so `Clone`
/// must be cheap (a zero-sized handle over a global allocator, or an `Rc`).
///
/// Reference counts:
/// - [`alloc_frame`](Self::alloc_frame) returns a frame with count 1 and **unspecified contents**
///   (the engine zeroes or overwrites every frame it allocates);
/// - [`inc_ref`](Self::inc_ref) / [`dec_ref`](Self::dec_ref) move the count by one; `dec_ref`
///   returns the remaining count and frees the frame when it reaches 0;
/// - counts must work up to at least `u32::MAX` (an alias-backed 64 GiB template points at one
///   frame 16 M times); what happens beyond is the implementation's choice (it may panic).
///
/// 2 MiB runs (only allocated for 2 MiB leaves with fresh backing): a run is counted **on its
/// first 4 KiB frame** (its head). The engine calls `inc_ref(head)`, `ref_count(head)` and
/// [`dec_ref_huge`](Self::dec_ref_huge); it never touches the counts of the other 511 frames.
/// A reference to one 4 KiB piece of a run (a leaf of a split 2 MiB page) is a reference to the
/// run: taken and dropped the same way, on the head. The default `alloc_huge_frame` returns `None` (fresh 2 MiB
/// backing then fails with [`Error::OutOfFrames`](crate::Error::OutOfFrames)); the default
/// `dec_ref_huge` forwards to `dec_ref(head)`, which is right only if the implementation never
/// hands out runs (2 MiB frames then come from the caller, who keeps its own reference).
///
/// # Safety
///
/// The engine reads and writes frames through raw pointers on the strength of this contract:
/// - `frame_ptr(f)` returns a pointer, aligned to at least 8 bytes, valid for reads and writes of
///   4096 bytes for as long as `f`'s count is above zero (for a frame inside a 2 MiB run: as long
///   as the run's head count is above zero);
/// - distinct frames never overlap, and a frame returned by `alloc_frame`/`alloc_huge_frame` is
///   not in use by anyone else;
/// - no one but the engine writes a frame while the engine holds a reference to it, except
///   through mappings the engine itself created (data pages written by the tasks that map them).
pub unsafe trait PhysMem: Clone {
    /// Allocate one 4 KiB frame with count 1 and unspecified contents; `None` when out of memory.
    fn alloc_frame(&self) -> Option<PhysFrame>;
    /// Allocate a 2 MiB-aligned run of 512 frames, counted on its head frame (count 1).
    fn alloc_huge_frame(&self) -> Option<PhysFrame<Size2MiB>> {
        None
    }
    /// Add one reference to a frame whose count is above zero.
    fn inc_ref(&self, frame: PhysFrame);
    /// Drop one reference; returns the remaining count. At 0 the frame was freed.
    fn dec_ref(&self, frame: PhysFrame) -> u32;
    /// Drop one reference to a 2 MiB run (counted on its head); at 0 the whole run was freed.
    fn dec_ref_huge(&self, run: PhysFrame<Size2MiB>) -> u32 {
        self.dec_ref(PhysFrame::containing_address(run.start_address()))
    }
    /// Current count of a frame (of a run: of its head).
    fn ref_count(&self, frame: PhysFrame) -> u32;
    /// Drop one reference to a table frame unless it is the last one: `true` if the count was
    /// above 1 and was decremented, `false` (nothing changed) if it is 1. The engine releases a
    /// table's children only when this returns `false` (the caller then holds the only
    /// reference, reads the table, and drops it with [`dec_ref`](Self::dec_ref)). A template's
    /// table may have several counted owners (incremental snapshots), so an implementation
    /// shared by several CPUs must make this one atomic step (a compare-and-swap loop: "decrement
    /// unless one"); the default, a [`ref_count`](Self::ref_count) check then `dec_ref`, is right
    /// only where frames are released on one CPU at a time.
    fn dec_ref_unless_one(&self, frame: PhysFrame) -> bool {
        if self.ref_count(frame) > 1 {
            self.dec_ref(frame);
            true
        } else {
            false
        }
    }
    /// Where the frame's 4096 bytes can be read and written.
    fn frame_ptr(&self, frame: PhysFrame) -> *mut u8;
    /// A root table for a new space with the kernel half `kernel`, from the ones
    /// [`keep_root`](Self::keep_root) kept: count 1, entries 0..256 zero and entries 256..512
    /// exactly `kernel`'s. The engine then writes none of its 512 entries (a fresh root costs a
    /// fill of all of them: this is the spawn path). `None` (the default: nothing is kept) makes
    /// the engine allocate and fill one.
    fn reuse_root(&self, kernel: &KernelHalf) -> Option<PhysFrame> {
        let _ = kernel;
        None
    }
    /// Offered the root of a space being dropped, made with the kernel half whose identity is
    /// `kernel`: count 1 (the space's reference), entries 0..256 zero again (the engine released
    /// and cleared them), entries 256..512 as the engine installed them, except for whatever the
    /// implementation's own user wrote there (the engine never writes them: invariant 6). `true`:
    /// the implementation keeps it (the reference is now its own) and may hand it out again from
    /// `reuse_root` once entries 256..512 are that kernel half's again (including the bits a CPU
    /// sets in entries it walks: preset `ACCESSED` in the kernel half, or rewrite them); `false`
    /// (the default): the engine frees it.
    fn keep_root(&self, root: PhysFrame, kernel: KernelHalfId) -> bool {
        let _ = (root, kernel);
        false
    }
}

pub(crate) fn frame_at(addr: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(addr))
}
