//! What Stencil's guest side (`libos`) and host side (`xtask`) must agree on, in one place:
//!
//! - [`exit`]: the exit-code scheme (0–99 the app's, 100–105 libos's reports, 110–113 and 130
//!   xtask's), each code's meaning, and the `isa-debug-exit` mapping between a code and QEMU's
//!   exit status;
//! - [`cmdline`]: the kernel command line — how xtask encodes kernel options and app arguments
//!   into one `-append` string, and how the guest splits it back.
//!
//! `#![no_std]`; the `alloc` feature adds the parts that build `String`s.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod cmdline;
pub mod exit;

pub use exit::ExitCode;
