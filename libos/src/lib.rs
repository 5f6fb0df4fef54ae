//! # Stencil libos
//!
//! A library OS for x86_64 whose tasks get their address spaces from shared, prebuilt page-table
//! templates. An app is a `#![no_std]`, `#![no_main]` binary crate that depends on `libos` and
//! declares its entry point with [`main!`]:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! libos::main!(main);
//! fn main() {
//!     libos::println!("Hello from Stencil");
//! }
//! ```
//!
//! `cargo xtask run <app>` builds it for `x86_64-unknown-none` and boots it in QEMU. See
//! `docs/ARCHITECTURE.md` for the boot sequence, memory layout and exit codes.
//!
//! The parts without hardware — the scheduler and task lifecycle (`sched`, a state machine), the
//! command line, the memory map, the frame allocator, the argument checks, TSC calibration — also
//! build on the host, where `cargo test -p libos` tests them; everything that touches hardware is
//! compiled only for `target_os = "none"`. The layers are drawn in `docs/ARCHITECTURE.md`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod calibrate;
pub mod cmdline;
#[cfg(any(test, target_os = "none"))]
pub mod handle;
pub mod limits;
pub mod memmap;
pub mod mm;
#[doc(hidden)]
pub mod sched;

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
pub mod arena;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
pub mod channel;
#[cfg(target_os = "none")]
#[doc(hidden)]
pub mod console;
#[cfg(target_os = "none")]
mod drivers;
#[cfg(target_os = "none")]
mod fault;
#[cfg(target_os = "none")]
pub mod net;
#[cfg(target_os = "none")]
pub mod process;
#[cfg(target_os = "none")]
mod procmem;
#[cfg(target_os = "none")]
mod rt;
#[cfg(target_os = "none")]
pub mod shared;
#[cfg(target_os = "none")]
mod shutdown;
#[cfg(target_os = "none")]
pub mod space;
#[cfg(target_os = "none")]
mod stack;
#[cfg(target_os = "none")]
pub mod sync;
#[cfg(target_os = "none")]
pub mod task;
#[cfg(target_os = "none")]
pub mod time;

#[cfg(target_os = "none")]
pub use boot::{cmdline as kernel_cmdline, share_mode};
#[cfg(target_os = "none")]
pub use mm::heap::{HeapStats, stats as heap_stats};
#[cfg(target_os = "none")]
pub use rt::{Termination, args, exit};

/// Frames of RAM currently free in the frame allocator.
///
/// ```no_run
/// libos::println!("{} MiB free", libos::free_frames() * 4096 >> 20);
/// ```
#[cfg(target_os = "none")]
pub fn free_frames() -> usize {
    mm::kernel::frames().free_frames()
}
