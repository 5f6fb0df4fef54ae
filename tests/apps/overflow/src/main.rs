//! Recurses without bound: the harness expects the guard-page report, exit code 102.
#![no_std]
#![no_main]

libos::main!(main);

#[allow(unconditional_recursion, reason = "the point of this test")]
fn recurse(depth: u64, buf: &mut [u8; 256]) -> u64 {
    let mut local = [0u8; 256];
    local[(depth % 256) as usize] = buf[0].wrapping_add(1);
    core::hint::black_box(&mut local);
    recurse(depth + 1, &mut local) + u64::from(local[0])
}

fn main() {
    libos::println!("recursing");
    let mut buf = [0u8; 256];
    let n = recurse(0, &mut buf);
    libos::println!("unreachable: {n}");
}
