//! Calls `exit(7)`: the harness expects xtask to exit with 7.
#![no_std]
#![no_main]

libos::main!(main);

fn main() {
    libos::println!("exiting with 7");
    libos::exit(7);
}
