//! The smallest Stencil app: greets, echoes its arguments, and exits 0.
#![no_std]
#![no_main]

libos::main!(main);

fn main() {
    libos::println!("Hello from Stencil!");
    for (i, arg) in libos::args().iter().enumerate() {
        libos::println!("arg[{i}] = {arg}");
    }
}
