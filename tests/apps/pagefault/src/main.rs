//! Reads an unmapped address: the harness expects a page-fault report naming it, exit code 101.
#![no_std]
#![no_main]

libos::main!(main);

/// In the lower half, where nothing is mapped before tasks exist.
const UNMAPPED: usize = 0x0000_1234_5678_9000;

fn main() {
    libos::println!("reading {UNMAPPED:#x}");
    let p = core::hint::black_box(UNMAPPED) as *const u64;
    // Reading through a raw pointer needs `unsafe`; this test exists to do exactly that.
    #[allow(unsafe_code)]
    // SAFETY: not safe at all — the read faults on purpose, and libos ends the app with a report.
    let v = unsafe { p.read_volatile() };
    libos::println!("unreachable: read {v}");
}
