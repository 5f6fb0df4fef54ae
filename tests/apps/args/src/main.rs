//! Checks that the arguments the harness passes arrive byte for byte, however long.
//!
//! Modes (the first argument):
//! - `long N S`: S must be [`pattern`]`(N)`, N characters that need quoting (spaces, quotes,
//!   backslashes) and include a two-byte character;
//! - `straddle K S`: S must be K × `a`, then `✓`, then `end`, and the `✓` must straddle byte 4096
//!   of the kernel command line (where libos used to cut it);
//! - anything else: the arguments must be [`EXPECTED`].
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;

libos::main!(main);

/// Must match `args` in this crate's Cargo.toml test case `args-intact`.
const EXPECTED: [&str; 6] = [
    "plain",
    "two words",
    "quote\"inside",
    "back\\slash",
    "",
    "ünïcode ✓",
];

/// The alphabet [`pattern`] cycles through (40 characters).
const ALPHABET: &str = "0123456789 abcdefghijklmnopqrstuvwxyz\"\\é";

/// `n` characters of [`ALPHABET`], cycled.
fn pattern(n: usize) -> String {
    ALPHABET.chars().cycle().take(n).collect()
}

/// The last `n` characters of `s`.
fn tail(s: &str, n: usize) -> &str {
    let start = s.char_indices().rev().nth(n - 1).map_or(0, |(i, _)| i);
    &s[start..]
}

fn main() -> i32 {
    let got = libos::args();
    let line = libos::kernel_cmdline();
    libos::println!(
        "{} arguments, kernel command line {} bytes",
        got.len(),
        line.len()
    );
    match got.first().map(String::as_str) {
        Some("long") => check_long(got),
        Some("straddle") => check_straddle(got, line),
        _ => check_intact(got),
    }
}

fn count(got: &[String]) -> Option<usize> {
    got.get(1)?.parse().ok()
}

fn check_long(got: &[String]) -> i32 {
    let (Some(n), Some(s), 3) = (count(got), got.get(2), got.len()) else {
        libos::println!("MISMATCH: expected `long N S`");
        return 1;
    };
    let chars = s.chars().count();
    if *s != pattern(n) {
        libos::println!("MISMATCH: {chars} characters arrived, expected pattern({n})");
        return 1;
    }
    libos::println!(
        "long argument intact: {chars} characters, {} bytes, ending {:?}",
        s.len(),
        tail(s, 8)
    );
    0
}

fn check_straddle(got: &[String], line: &str) -> i32 {
    let (Some(k), Some(s), 3) = (count(got), got.get(2), got.len()) else {
        libos::println!("MISMATCH: expected `straddle K S`");
        return 1;
    };
    let mut want = String::from("a").repeat(k);
    want.push_str("✓end");
    if *s != want {
        libos::println!(
            "MISMATCH: {} characters arrived, expected {k} a's, ✓, end",
            s.chars().count()
        );
        return 1;
    }
    if line.is_char_boundary(4096) {
        libos::println!("MISMATCH: no character straddles byte 4096 of the command line");
        return 1;
    }
    let at = line.find('✓').unwrap_or(0);
    libos::println!(
        "straddling character intact: bytes {at}..{} of the command line, argument ends {:?}",
        at + '✓'.len_utf8(),
        tail(s, 4)
    );
    0
}

fn check_intact(got: &[String]) -> i32 {
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
