//! Helpers shared by xtask's integration tests (each test file includes this module; not every
//! file uses every helper).
#![allow(
    dead_code,
    reason = "each test crate uses a different subset of these helpers"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Stencil checkout (xtask's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Whether `qemu-system-x86_64` is on PATH; if not, prints a note naming what is skipped.
pub fn have_qemu(skipped: &str) -> bool {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("qemu-system-x86_64").is_file());
    if !found {
        eprintln!("note: qemu-system-x86_64 not on PATH; {skipped} skipped");
    }
    found
}

/// The xtask binary under test, with no standard input.
pub fn xtask() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.stdin(Stdio::null());
    cmd
}

/// Where tests that build apps put them: `cargo test` holds the lock on `target/` while the tests
/// run, so they share `target/new-crate-test/` (only the first run compiles libos there).
pub fn test_target_dir() -> PathBuf {
    workspace_root().join("target/new-crate-test")
}

/// [`xtask`] building into [`test_target_dir`].
pub fn xtask_building() -> Command {
    let mut cmd = xtask();
    cmd.env("CARGO_TARGET_DIR", test_target_dir());
    cmd
}

/// A temporary directory, removed on every return path.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, empty temporary directory whose name starts with `prefix`.
pub fn temp_dir(prefix: &str) -> TempDir {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    TempDir(dir)
}
