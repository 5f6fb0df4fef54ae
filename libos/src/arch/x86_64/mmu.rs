//! The MMU: which root table is loaded, and TLB invalidation.

use ::x86_64::VirtAddr;
use ::x86_64::registers::control::{Cr3, Cr3Flags};
use ::x86_64::structures::paging::PhysFrame;

/// The loaded root table (CR3) and its flags.
#[inline]
pub fn root() -> (PhysFrame, Cr3Flags) {
    Cr3::read()
}

/// Physical address of the loaded root table.
#[inline]
pub fn root_phys() -> u64 {
    Cr3::read().0.start_address().as_u64()
}

/// Loads `root` as the root table (flushing the non-global TLB entries).
///
/// # Safety
/// `root` must be a valid L4 table that maps the running code, its stack and every kernel
/// structure in use (the kernel half), with `flags` valid for CR3.
#[inline]
pub unsafe fn load_root(root: PhysFrame, flags: Cr3Flags) {
    // SAFETY: the caller guarantees the table maps everything in use.
    unsafe { Cr3::write(root, flags) }
}

/// Invalidates the TLB entry of the page holding `va`.
#[inline]
pub fn flush_page(va: VirtAddr) {
    ::x86_64::instructions::tlb::flush(va);
}

/// Invalidates every non-global TLB entry (reloads the loaded root).
#[inline]
pub fn flush_all() {
    let (root, flags) = Cr3::read();
    // SAFETY: reloading the root that is loaded already changes no mapping; it only drops
    // non-global TLB entries.
    unsafe { Cr3::write(root, flags) };
}
