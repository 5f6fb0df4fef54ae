//! `cargo xtask new` end to end: create a service crate in a temporary directory outside the
//! workspace; a plain host `cargo check` in it must be clean (its `.cargo/config.toml` names the
//! guest target); build it with `cargo xtask run --manifest-path` (libos by path) and boot it in
//! QEMU, checking its output and exit code; and run its declared case with
//! `cargo xtask test --manifest-path`. Skipped (with a note) without qemu-system-x86_64.
//!
//! The crate builds into `target/new-crate-test/` of the Stencil checkout (not its own
//! `target/`), so later runs reuse the compiled libos; the first run from a clean checkout
//! compiles libos and its dependencies (about a minute on two cores).

use std::process::{Command, Stdio};

mod common;

use common::{have_qemu, temp_dir, test_target_dir, xtask_building as xtask};

#[test]
fn new_refuses_a_non_empty_directory() {
    let tmp = temp_dir("stencil-new-crate");
    std::fs::write(tmp.0.join("file"), "x").unwrap();
    let out = xtask().arg("new").arg(&tmp.0).output().unwrap();
    assert_eq!(out.status.code(), Some(113));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn new_crate_builds_and_boots_outside_the_workspace() {
    if !have_qemu("external-crate boot test") {
        return;
    }
    let tmp = temp_dir("stencil-new-crate");
    let dir = tmp.0.join("my-service");
    let out = xtask().arg("new").arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "xtask new failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("[workspace]"), "{text}");
    assert!(text.contains("libos = { path = "), "{text}");
    assert!(dir.join("rust-toolchain.toml").is_file());
    assert!(dir.join("src/main.rs").is_file());
    assert!(dir.join(".cargo/config.toml").is_file());

    // What an IDE runs: a plain `cargo check` in the crate, no xtask.
    let out = Command::new(env!("CARGO"))
        .current_dir(&dir)
        .args(["check", "--quiet", "--message-format=short"])
        .env("CARGO_TARGET_DIR", test_target_dir())
        .env_remove("RUSTFLAGS")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo check failed:\n{stderr}");
    assert!(
        !stderr.contains("warning") && !stderr.contains("error"),
        "cargo check is not clean:\n{stderr}"
    );

    let out = xtask()
        .args([
            "run",
            "--accel",
            "tcg",
            "--timeout",
            "60",
            "--manifest-path",
        ])
        .arg(&manifest)
        .args(["--", "first", "second arg"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for want in [
        "my-service: hello from a service on Stencil, args [\"first\", \"second arg\"]",
        "my-service: 4 tasks read the table, sum 6",
        "my-service: ok",
    ] {
        assert!(stdout.contains(want), "missing `{want}` in:\n{stdout}");
    }

    // The declared case, through the harness.
    let out = xtask()
        .args(["test", "--accel", "tcg", "--manifest-path"])
        .arg(&manifest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}");
    assert!(
        stdout.contains("test my-service-ok (my-service, microvm) ... ok"),
        "{stdout}"
    );
    assert!(
        stdout.contains("host tests: none for --manifest-path"),
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("1 passed, 0 failed"),
        "{stdout}"
    );
}
