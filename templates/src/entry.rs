//! Entry encoding: which bits of an x86_64 entry mean what to the engine.
//!
//! Table (non-leaf) entries: `PRESENT | WRITABLE | ACCESSED`, never `NO_EXECUTE`, never
//! `USER_ACCESSIBLE`: permissions are decided at the leaf (x86 ANDs `WRITABLE` and ORs
//! `NO_EXECUTE` over the walk).
//!
//! Leaf entries: `PRESENT | ACCESSED | DIRTY`, plus `WRITABLE` if writable now, `NO_EXECUTE`
//! unless executable, `HUGE_PAGE` for a 2 MiB leaf, and [`COW_BIT`] (software bit 9) for a
//! copy-on-write page (which is then never `WRITABLE`).
//!
//! Ownership bits (docs/engine.md, invariant 11): [`LENT_BIT`] (software bit 10) is set on every
//! entry of a template's tree and says the reference behind the entry is a template's; a space
//! that copies a template's table copies it verbatim, and in a space's table the same bit means
//! *borrowed* (not counted, kept alive by a template the space holds). [`PIECE_BIT`] (software
//! bit 11) marks a 4 KiB leaf that maps one piece of a 2 MiB run (a split 2 MiB page): its
//! reference, when counted, is on the run's head frame.
//!
//! `ACCESSED` and `DIRTY` are set in advance on every entry the engine writes, so the CPU never
//! has a reason to write a shared table (invariants 1 and 9): it only sets those bits when they are
//! clear. Bits 52–62 are unused and left zero.

use x86_64::structures::paging::PageTableFlags as F;

/// Software bit 9: this leaf is copy-on-write (read-only in hardware; a write copies the page, or
/// takes it over if no one else references the frame).
pub const COW_BIT: F = F::BIT_9;

/// Software bit 10: the reference behind this entry is a template's (invariant 11). Counted in
/// the template's own tree (every entry of it carries the bit); in a space's table — a verbatim
/// copy of a template's table, or an attachment — the entry is *borrowed*: the space never
/// counts or releases it, the template it holds keeps the target alive.
pub const LENT_BIT: F = F::BIT_10;

/// Software bit 11: a 4 KiB leaf mapping one 4 KiB piece of a 2 MiB run (what splitting a 2 MiB
/// page leaves). Its reference, when counted, is on the run's head frame (`PhysMem` counts a run
/// there), taken with `inc_ref(head)` and dropped with `dec_ref_huge`.
pub const PIECE_BIT: F = F::BIT_11;

pub(crate) const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
pub(crate) const P: u64 = F::PRESENT.bits();
const W: u64 = F::WRITABLE.bits();
const A: u64 = F::ACCESSED.bits();
const D: u64 = F::DIRTY.bits();
const PS: u64 = F::HUGE_PAGE.bits();
const NX: u64 = F::NO_EXECUTE.bits();
const COW: u64 = COW_BIT.bits();
pub(crate) const LENT: u64 = LENT_BIT.bits();
pub(crate) const PIECE: u64 = PIECE_BIT.bits();

/// One past the highest lower-half address (47-bit canonical user half).
pub(crate) const LOWER_HALF_END: u64 = 1 << 47;
pub(crate) const SIZE_4K: u64 = 1 << 12;
pub(crate) const SIZE_2M: u64 = 1 << 21;
pub(crate) const SIZE_1G: u64 = 1 << 30;

/// Bytes covered by one entry of a table at `level` (4 = L4 … 1 = L1).
#[inline]
pub(crate) const fn span(level: u8) -> u64 {
    1 << (12 + 9 * (level as u32 - 1))
}

/// Index into the table at `level` for `va`.
#[inline]
pub(crate) const fn index(va: u64, level: u8) -> usize {
    ((va >> (12 + 9 * (level as u32 - 1))) & 511) as usize
}

#[inline]
pub(crate) const fn present(e: u64) -> bool {
    e & P != 0
}
#[inline]
pub(crate) const fn huge_bit() -> u64 {
    PS
}
#[inline]
pub(crate) const fn huge(e: u64) -> bool {
    e & PS != 0
}
#[inline]
pub(crate) const fn writable(e: u64) -> bool {
    e & W != 0
}
#[inline]
pub(crate) const fn cow(e: u64) -> bool {
    e & COW != 0
}
#[inline]
pub(crate) const fn lent(e: u64) -> bool {
    e & LENT != 0
}
#[inline]
pub(crate) const fn piece(e: u64) -> bool {
    e & PIECE != 0
}
#[inline]
pub(crate) const fn executable(e: u64) -> bool {
    e & NX == 0
}
#[inline]
pub(crate) const fn addr(e: u64) -> u64 {
    e & ADDR_MASK
}

/// The frame a leaf entry at `level` is counted on: its own frame, or for a 2 MiB leaf and for
/// a piece of a 2 MiB run, the run's head.
#[inline]
pub(crate) const fn counted_frame(e: u64, level: u8) -> u64 {
    if level == 2 || piece(e) {
        addr(e) & !(SIZE_2M - 1)
    } else {
        addr(e)
    }
}

/// An entry pointing at a table.
#[inline]
pub(crate) const fn table(frame_addr: u64) -> u64 {
    frame_addr | P | W | A
}

/// Is `level` a leaf level for entry `e` (an L1 entry, or a huge L2/L3 entry)?
#[inline]
pub(crate) const fn is_leaf(e: u64, level: u8) -> bool {
    level == 1 || huge(e)
}

/// A leaf entry. `level` is 1 (4 KiB) or 2 (2 MiB).
#[inline]
pub(crate) const fn leaf(frame_addr: u64, level: u8, write: bool, exec: bool, cow_: bool) -> u64 {
    let mut e = frame_addr | P | A | D;
    if write {
        e |= W;
    }
    if !exec {
        e |= NX;
    }
    if cow_ {
        e |= COW;
    }
    if level == 2 {
        e |= PS;
    }
    e
}

/// `e` with `WRITABLE` and `COW` replaced.
#[inline]
pub(crate) const fn with_write(e: u64, write: bool, cow_: bool) -> u64 {
    let mut e = e & !(W | COW);
    if write {
        e |= W;
    }
    if cow_ {
        e |= COW;
    }
    e
}

/// `e` with `NO_EXECUTE` set from `exec`.
#[inline]
pub(crate) const fn with_exec(e: u64, exec: bool) -> u64 {
    if exec { e & !NX } else { e | NX }
}
