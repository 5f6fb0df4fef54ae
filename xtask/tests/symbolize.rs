//! Fault reports are symbolized: `cargo xtask run` boots `tests/apps/pagefault` (it reads an
//! unmapped address in its `main`) and must print the faulting RIP and the backtrace as
//! `function (file:line)` from the ELF's debug info, naming the app's own function and file.
//! Skipped (with a note) without qemu-system-x86_64.
//!
//! It builds into `target/new-crate-test/` (cargo holds the lock on `target/` while the tests
//! run), shared with `new_crate.rs`, so only the first run compiles libos there.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn page_fault_report_names_the_function_and_line() {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("qemu-system-x86_64").is_file());
    if !found {
        eprintln!("note: qemu-system-x86_64 not on PATH; symbolization test skipped");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["run", "test-pagefault", "--accel", "tcg", "--timeout", "60"])
        .env(
            "CARGO_TARGET_DIR",
            workspace_root().join("target/new-crate-test"),
        )
        .stdin(Stdio::null())
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
