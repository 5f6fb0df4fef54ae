//! Checks that the arguments the harness passes arrive byte for byte.
#![no_std]
#![no_main]

libos::main!(main);

/// Must match `args` in this crate's Cargo.toml test case.
const EXPECTED: [&str; 6] = [
    "plain",
    "two words",
    "quote\"inside",
    "back\\slash",
    "",
    "ünïcode ✓",
];

fn main() -> i32 {
    let got = libos::args();
    for (i, a) in got.iter().enumerate() {
        libos::println!("arg[{i}] = {a:?}");
    }
    if got.len() != EXPECTED.len() || got.iter().zip(EXPECTED).any(|(g, e)| g != e) {
        libos::println!("MISMATCH: expected {EXPECTED:?}");
        return 1;
    }
    libos::println!("all {} arguments intact", got.len());
    0
}
