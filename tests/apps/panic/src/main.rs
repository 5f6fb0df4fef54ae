//! Panics on purpose: the harness expects the message, the location and exit code 100.
#![no_std]
#![no_main]

libos::main!(main);

fn main() {
    libos::println!("about to panic");
    let v = core::hint::black_box(41);
    panic!("deliberate panic: value {}", v + 1);
}
