//! Allocates and frees in loops; checks the heap returns to its baseline each round.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

libos::main!(main);

fn churn(round: usize) -> usize {
    let mut v: Vec<Box<[u8]>> = Vec::new();
    for i in 0..2000 {
        v.push(alloc::vec![(i % 251) as u8; 1 + (i * 37 + round) % 3000].into_boxed_slice());
    }
    let mut map = BTreeMap::new();
    for i in 0..500 {
        map.insert(i, String::from("x").repeat(i % 64));
    }
    // A big one that forces the heap to grow past its first chunk.
    let big = alloc::vec![7u8; 3 << 20];
    let sum = v.iter().map(|b| b.len()).sum::<usize>() + map.len() + big.len();
    v.retain(|b| b.len() % 2 == 0);
    sum
}

fn main() -> Result<(), String> {
    let baseline = libos::heap_stats();
    libos::println!(
        "baseline: {} bytes in {} allocations",
        baseline.allocated_bytes,
        baseline.allocation_count
    );
    for round in 0..20 {
        let sum = churn(round);
        let now = libos::heap_stats();
        if now.allocated_bytes != baseline.allocated_bytes
            || now.allocation_count != baseline.allocation_count
        {
            return Err(alloc::format!(
                "round {round}: heap at {} bytes / {} allocations, baseline {} / {}",
                now.allocated_bytes,
                now.allocation_count,
                baseline.allocated_bytes,
                baseline.allocation_count
            ));
        }
        if round == 0 {
            libos::println!(
                "round 0 touched {sum} bytes; heap reserved {} KiB",
                now.reserved_bytes / 1024
            );
        }
    }
    let end = libos::heap_stats();
    libos::println!(
        "heap back at baseline after 20 rounds: {} bytes in {} allocations (reserved {} KiB)",
        end.allocated_bytes,
        end.allocation_count,
        end.reserved_bytes / 1024
    );
    Ok(())
}
