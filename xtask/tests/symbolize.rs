//! Fault reports are symbolized: `cargo xtask run` boots `tests/apps/pagefault` (it reads an
//! unmapped address in its `main`) and must print the faulting RIP and the backtrace as
//! `function (file:line)` from the ELF's debug info, naming the app's own function and file; and
//! the test harness does the same in the report of a failing case (a crate made by
//! `cargo xtask new` whose `main` panics). Skipped (with a note) without qemu-system-x86_64.
//!
//! It builds into `target/new-crate-test/` (cargo holds the lock on `target/` while the tests
//! run), shared with `new_crate.rs`, so only the first run compiles libos there.

mod common;

use common::{have_qemu, temp_dir, xtask_building as xtask};

#[test]
fn page_fault_report_names_the_function_and_line() {
    if !have_qemu("symbolization test") {
        return;
    }
    let out = xtask()
        .args(["run", "test-pagefault", "--accel", "tcg", "--timeout", "60"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{stdout}\n{stderr}");
    // The raw report is on the serial console (stdout) ...
    assert!(stdout.contains("at RIP 0x"), "{stdout}");
    assert!(stdout.contains("backtrace"), "{stdout}");
    // ... and its symbolized form on stderr: the faulting read is in the app's main (inlined
    // into libos's entry), and the backtrace goes through libos's runtime.
    assert!(
        stderr.contains("stencil: fault report, symbolized from "),
        "{stderr}"
    );
    let rip = stderr
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("RIP 0x"))
        .take_while(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        rip.contains("test_pagefault::main (tests/apps/pagefault/src/main.rs:"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.trim_start().starts_with("#0 ") && l.contains("(libos/src/")),
        "{stderr}"
    );
}

const PANICKING_MAIN: &str = r#"#![no_std]
#![no_main]

libos::main!(main);

fn main() {
    libos::println!("about to fail");
    let v = core::hint::black_box(41);
    panic!("planned failure {}", v + 1);
}
"#;

#[test]
fn failing_case_report_is_symbolized() {
    if !have_qemu("symbolization test") {
        return;
    }
    let tmp = temp_dir("stencil-symbolize-test");
    let dir = tmp.0.join("sym-fail");
    let out = xtask().arg("new").arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The declared case expects `sym-fail: ok` and exit 0; this main panics instead.
    std::fs::write(dir.join("src/main.rs"), PANICKING_MAIN).unwrap();
    let out = xtask()
        .args(["test", "--accel", "tcg", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("test sym-fail-ok (sym-fail, microvm) ... FAILED"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stencil: fault report, symbolized from "),
        "{stdout}"
    );
    // The backtrace passes through the panicking function, named with its file and line.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("  sym_fail::main (") && l.contains("sym-fail/src/main.rs:9)")),
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("0 passed, 1 failed"),
        "{stdout}"
    );
}
