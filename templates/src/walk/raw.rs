//! Raw access to frames: the only module (with the simulated memory's own helpers) that
//! dereferences pointers. Everything above it works with frame numbers and `u64` entries.
//!
//! Everything that writes a table or a data frame is visible only to the cursor (`walk`), so no
//! other engine module can change a table (docs/engine.md, invariant 8). Outside `walk`, the
//! crate can read entries, and the simulation (`sim`) can read and write data bytes and set
//! `ACCESSED`/`DIRTY` the way the CPU does.

use crate::mem::PhysMem;
use x86_64::structures::paging::{PageTableFlags, PhysFrame};

/// Entries per table.
pub(crate) const ENTRIES: usize = 512;
const FRAME: usize = 4096;

fn entry_ptr<M: PhysMem>(mem: &M, table: PhysFrame, index: usize) -> *mut u64 {
    assert!(index < ENTRIES);
    mem.frame_ptr(table).cast::<u64>().wrapping_add(index)
}

/// Read entry `index` of `table`. The caller holds a reference to `table`.
#[inline]
pub(crate) fn read<M: PhysMem>(mem: &M, table: PhysFrame, index: usize) -> u64 {
    let p = entry_ptr(mem, table, index);
    // SAFETY: the caller holds a reference to `table`, so by the `PhysMem` contract its pointer is
    // valid, 8-aligned and 4096 bytes long; `index < 512` keeps the read inside the frame.
    unsafe { p.read() }
}

/// Entries `range` of `table` with their indices, read one at a time as the iterator advances
/// (the range is checked once, not per entry: this runs over every root on every exit). The
/// caller holds a reference to `table` until the iterator is dropped.
#[inline]
pub(crate) fn entries<M: PhysMem>(
    mem: &M,
    table: PhysFrame,
    range: core::ops::Range<usize>,
) -> impl Iterator<Item = (usize, u64)> {
    assert!(range.end <= ENTRIES);
    let p = mem.frame_ptr(table).cast::<u64>();
    range.map(move |i| {
        // SAFETY: the caller holds a reference to `table` while iterating, so `p` is valid,
        // 8-aligned and 4096 bytes long (`PhysMem` contract); `i < range.end <= 512` (asserted
        // above) keeps the read inside the frame.
        (i, unsafe { p.add(i).read() })
    })
}

/// Write entry `index` of `table`. The caller holds a reference to `table` and owns it
/// exclusively (invariant 3); that is a logical rule the cursor enforces, not a memory-safety one.
#[inline]
pub(super) fn write<M: PhysMem>(mem: &M, table: PhysFrame, index: usize, value: u64) {
    let p = entry_ptr(mem, table, index);
    // SAFETY: the caller holds a reference to `table`, so its pointer is valid for writes,
    // 8-aligned and 4096 bytes long (`PhysMem` contract); `entry_ptr` checked `index < 512`.
    unsafe { p.write(value) }
}

/// What the simulated CPU does during a walk: set `ACCESSED` and/or `DIRTY` in entry `index` of
/// `table` (the caller holds a reference to it). Only those two bits can be set this way, so the
/// translation never changes; on a shared table it is exactly the write the tests must catch.
pub(crate) fn set_hardware_bits<M: PhysMem>(mem: &M, table: PhysFrame, index: usize, bits: u64) {
    let allowed = (PageTableFlags::ACCESSED | PageTableFlags::DIRTY).bits();
    assert_eq!(bits & !allowed, 0, "only ACCESSED and DIRTY");
    write(mem, table, index, read(mem, table, index) | bits);
}

/// Write `values` into entries `start..start + values.len()` of `table` (one copy). The caller
/// holds a reference to `table` and owns it exclusively, as for [`write`].
pub(super) fn write_entries<M: PhysMem>(mem: &M, table: PhysFrame, start: usize, values: &[u64]) {
    assert!(
        start
            .checked_add(values.len())
            .is_some_and(|e| e <= ENTRIES)
    );
    let p = mem.frame_ptr(table).cast::<u64>().wrapping_add(start);
    // SAFETY: the range `start..start + len` lies inside the referenced, 8-aligned 4096-byte frame
    // (asserted above); `values` is a distinct Rust allocation, so the ranges do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(values.as_ptr(), p, values.len()) }
}

/// Zero entries `start..start + count` of `table` (one fill), with the same rules as [`write`].
pub(super) fn zero_entries<M: PhysMem>(mem: &M, table: PhysFrame, start: usize, count: usize) {
    assert!(start.checked_add(count).is_some_and(|e| e <= ENTRIES));
    let p = mem.frame_ptr(table).cast::<u64>().wrapping_add(start);
    // SAFETY: `start + count <= 512` (asserted above) keeps the fill inside the referenced,
    // 8-aligned 4096-byte frame.
    unsafe { p.write_bytes(0, count) }
}

/// Fill all 512 entries of `table` with `first + k * step` for entry `k` (the pieces of a split
/// 2 MiB page: one loop, no per-entry call), with the same rules as [`write`].
pub(super) fn write_run<M: PhysMem>(mem: &M, table: PhysFrame, first: u64, step: u64) {
    let p = mem.frame_ptr(table).cast::<u64>();
    let mut value = first;
    for k in 0..ENTRIES {
        // SAFETY: the caller holds a reference to `table`, so `p` is valid for writes of 4096
        // bytes and 8-aligned (`PhysMem` contract); `k < 512` keeps every write inside it.
        unsafe { p.add(k).write(value) };
        value = value.wrapping_add(step);
    }
}

/// Fill a frame with zeroes.
pub(super) fn zero<M: PhysMem>(mem: &M, frame: PhysFrame) {
    let p = mem.frame_ptr(frame);
    // SAFETY: the caller holds a reference to `frame`, so `p` is valid for 4096 bytes of writes.
    unsafe { p.write_bytes(0, FRAME) }
}

/// Copy all 4096 bytes of `src` into `dst` (distinct frames, both referenced by the caller).
pub(super) fn copy<M: PhysMem>(mem: &M, src: PhysFrame, dst: PhysFrame) {
    assert_ne!(src, dst);
    let (s, d) = (mem.frame_ptr(src), mem.frame_ptr(dst));
    // SAFETY: both frames are referenced, so both pointers are valid for 4096 bytes; they are
    // distinct (asserted above) and distinct frames never overlap (`PhysMem` contract).
    unsafe { core::ptr::copy_nonoverlapping(s, d, FRAME) }
}

/// Read `buf.len()` bytes at `offset` in `frame` (`offset + len <= 4096`).
pub(crate) fn read_bytes<M: PhysMem>(mem: &M, frame: PhysFrame, offset: usize, buf: &mut [u8]) {
    assert!(offset.checked_add(buf.len()).is_some_and(|e| e <= FRAME));
    let p = mem.frame_ptr(frame).wrapping_add(offset);
    // SAFETY: `offset + len <= 4096` (asserted above) keeps the read inside the referenced frame;
    // `buf` is a distinct Rust allocation, so the ranges do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) }
}

/// Write `data` at `offset` in the data frame `frame` (`offset + len <= 4096`): what a task's
/// store does (the simulation only; the engine never writes data this way).
pub(crate) fn write_bytes<M: PhysMem>(mem: &M, frame: PhysFrame, offset: usize, data: &[u8]) {
    assert!(offset.checked_add(data.len()).is_some_and(|e| e <= FRAME));
    let p = mem.frame_ptr(frame).wrapping_add(offset);
    // SAFETY: `offset + len <= 4096` (asserted above) keeps the write inside the referenced
    // frame; `data` is a distinct Rust allocation, so the ranges do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
}
