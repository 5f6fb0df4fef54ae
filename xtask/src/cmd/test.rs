//! `cargo xtask test`: its options; the host tests and QEMU cases themselves run in
//! [`crate::harness`].

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::build_apps::SelectOpts;
use crate::harness;
use crate::qemu::{AccelChoice, Firmware};

/// The text after `cargo xtask test --help`'s options.
pub const AFTER_HELP: &str = "\
Host tests: cargo test --workspace --no-fail-fast --exclude <every app>.
QEMU cases: declared in each app's Cargo.toml as [[package.metadata.stencil.test]]
(see docs/xtask.md), built in one cargo call per profile and booted one after another.
With --manifest-path: the declared cases of a crate outside the workspace (no host tests:
its packages build for the guest). A failing case's report includes its fault report
symbolized as `function (file:line)`. Each case has its own timeout (default 60 s).
The last line is `N passed, N failed`. Exit status: 0 if nothing failed, else 1;
130 on Ctrl-C; 113 on an xtask error.";

#[derive(Debug, Args)]
pub struct TestCmd {
    /// Run only the QEMU cases whose name contains this (host tests still run unless --no-host)
    filter: Option<String>,
    /// Cargo.toml of a crate outside the workspace: run its declared QEMU cases (its packages
    /// are guest crates, so there are no host tests to run)
    #[arg(long, value_name = "PATH")]
    manifest_path: Option<PathBuf>,
    #[command(flatten)]
    select: SelectOpts,
    /// Skip the host tests (cargo test)
    #[arg(long)]
    no_host: bool,
    /// Skip the QEMU cases
    #[arg(long)]
    no_qemu: bool,
    /// List the QEMU cases (after the filter) and exit
    #[arg(long)]
    list: bool,
    /// Show every case's serial output live
    #[arg(long)]
    show_output: bool,
    /// Accelerator for the QEMU cases
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Firmware for q35 cases
    #[arg(long, value_enum, default_value_t = Firmware::Auto)]
    firmware: Firmware,
}

impl TestCmd {
    fn options(self) -> harness::Options {
        harness::Options {
            select: self.select.selection(),
            manifest_path: self.manifest_path,
            filter: self.filter,
            no_host: self.no_host,
            no_qemu: self.no_qemu,
            list: self.list,
            show_output: self.show_output,
            accel: self.accel,
            firmware: self.firmware,
        }
    }
}

/// Runs the harness; 0 if nothing failed, else 1.
pub fn run(root: &Path, cmd: TestCmd) -> Result<i32> {
    harness::run(root, &cmd.options())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;
    use crate::cargo_build::Selection;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        cmd: TestCmd,
    }

    #[test]
    fn manifest_path_features_and_bin_reach_the_options() {
        let w = Wrap::try_parse_from([
            "test",
            "net",
            "--manifest-path",
            "/x/Cargo.toml",
            "--features",
            "a,b",
            "--bin",
            "y",
            "--no-host",
        ])
        .unwrap();
        let o = w.cmd.options();
        assert_eq!(o.manifest_path.as_deref(), Some(Path::new("/x/Cargo.toml")));
        assert_eq!(
            o.select,
            Selection {
                features: vec!["a,b".to_owned()],
                bin: Some("y".to_owned()),
            }
        );
        assert_eq!(o.filter.as_deref(), Some("net"));
        assert!(o.no_host && !o.no_qemu && !o.list && !o.show_output);
    }
}
