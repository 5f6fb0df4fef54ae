//! Memory management: layout, physical frames, kernel page tables and the kernel heap.
//!
//! ```text
//!  virtual address                       what                                  L4 index
//!  ──────────────────────────────────────────────────────────────────────────────────────
//!  0x0000_0000_0000_0000 ┐
//!                        │  lower half: per task. Templates attach here in slots   0..255
//!                        │  aligned to their attach level (1 GiB or 512 GiB), so a
//!  0x0000_7fff_ffff_ffff ┘  whole subtree attaches with one entry.
//!        (non-canonical hole)
//!  0xffff_8000_0000_0000 ┐  direct map: all RAM, physical address p at DIRECT_MAP + p   256..
//!                        │  (1 GiB pages when the CPU has them, else 2 MiB; NX)
//!                        ┘
//!  0xffff_fe80_0000_0000 ┐  kernel heap (KHEAP, 512 GiB of address space): 4 KiB pages  509
//!                        │  mapped one frame at a time, from anywhere in RAM, as the
//!                        ┘  heap grows upwards (NX)
//!  0xffff_ff00_0000_0000 ┐  kernel stacks: one slot per stack, an unmapped guard page  510
//!                        ┘  below every stack (a hit is reported as a stack overflow)
//!  0xffff_ffff_8000_0000 ┐  the libos + app image, at KERNEL_BASE + its physical      511
//!                        ┘  address (text R-X, rodata R--, data/bss RW-)
//! ```
//!
//! The upper half (L4 256..511) is the kernel template, identical in every address space
//! (invariant 6, docs/engine.md). The L3 tables of the heap (509) and stack (510) areas are
//! created at boot, so their L4 entries never change: mapping a heap page or a stack changes only
//! tables below them, which every address space shares, and every task sees it at once (the one
//! live shared subtree, invariant 1's exception, docs/engine.md; only libos changes it). Physical
//! memory: the image is loaded at 1 MiB; the frame allocator's metadata and the first page tables are carved
//! from RAM below 1 GiB at boot; everything else is handed out by [`frame::FrameAllocator`], one
//! frame at a time (the kernel heap needs no physically contiguous memory).

pub mod frame;
pub mod layout;

#[cfg(target_os = "none")]
mod alloc;
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
pub(crate) mod ctx;
#[cfg(target_os = "none")]
pub(crate) mod heap;
#[cfg(target_os = "none")]
pub(crate) mod kernel;
#[cfg(target_os = "none")]
pub(crate) mod pheap;

/// Length in 4 KiB frames of the longest physically contiguous run of free RAM (fragmentation;
/// the kernel heap does not need such runs, it maps single frames).
///
/// ```no_run
/// libos::println!("largest free run: {} KiB", libos::mm::largest_free_run() * 4);
/// ```
#[cfg(target_os = "none")]
pub fn largest_free_run() -> usize {
    kernel::frames().largest_free_run()
}
