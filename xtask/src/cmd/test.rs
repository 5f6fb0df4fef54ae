//! `cargo xtask test`: its options; the host tests and QEMU cases themselves run in
//! [`crate::harness`].

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::build_apps::SelectOpts;
use crate::doccheck;
use crate::harness;
use crate::qemu::{AccelChoice, Firmware};

/// The text after `cargo xtask test --help`'s options.
pub const AFTER_HELP: &str = "\
Doc examples (first; --doc runs only them, --no-doc skips them): every fenced example in the
/// and //! comments of libos/src is compiled (not run) for x86_64-unknown-none with the apps'
flags, in crates generated under target/doccheck/; a failure names the example's file and line.
no_run and plain examples must compile, compile_fail ones must not; ignore ones are skipped,
except those that define main!, each compiled as a crate of its own; text and other languages
are not examples.
Host tests: cargo test --workspace --no-fail-fast --exclude <every app>.
QEMU cases: declared in each app's Cargo.toml as [[package.metadata.stencil.test]]
(see docs/xtask.md), built in one cargo call per profile and booted one after another.
With --manifest-path: the declared cases of a crate outside the workspace (no host tests:
its packages build for the guest). A failing case's report includes its fault report
symbolized as `function (file:line)`. Each case has its own timeout (default 60 s).
The last line is `N passed, N failed` (host tests and QEMU cases). Exit status: 0 if nothing
failed (doc examples included), else 1; 130 on Ctrl-C; 113 on an xtask error.";

#[derive(Debug, Args)]
pub struct TestCmd {
    /// Run only the QEMU cases whose name contains this (host tests and doc examples still run
    /// unless --no-host / --no-doc)
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
    /// Only compile libos's doc examples (no host tests, no QEMU cases)
    #[arg(long, conflicts_with_all = ["filter", "no_doc", "list", "manifest_path"])]
    doc: bool,
    /// Skip the doc examples
    #[arg(long)]
    no_doc: bool,
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

impl TestCmd {
    /// Whether the doc examples are checked: not with `--no-doc`, not for `--list` (it only
    /// lists) and not for a crate outside the workspace (they are libos's examples).
    fn doc_step(&self) -> bool {
        !self.no_doc && !self.list && self.manifest_path.is_none()
    }
}

/// Checks the doc examples, then runs the harness; 0 if nothing failed, else 1.
pub fn run(root: &Path, cmd: TestCmd) -> Result<i32> {
    let doc_failed = cmd.doc_step() && doccheck::run(root)?.failed > 0;
    if cmd.doc {
        return Ok(i32::from(doc_failed));
    }
    let code = harness::run(root, &cmd.options())?;
    Ok(if doc_failed { code.max(1) } else { code })
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

    #[test]
    fn doc_step_selection() {
        let parse = |argv: &[&str]| Wrap::try_parse_from(argv).map(|w| w.cmd);
        let all = parse(&["test"]).unwrap();
        assert!(all.doc_step() && !all.doc);
        let only = parse(&["test", "--doc"]).unwrap();
        assert!(only.doc_step() && only.doc);
        assert!(!parse(&["test", "--no-doc"]).unwrap().doc_step());
        assert!(!parse(&["test", "--list"]).unwrap().doc_step());
        assert!(
            !parse(&["test", "--manifest-path", "/x/Cargo.toml"])
                .unwrap()
                .doc_step()
        );
        // A filter selects QEMU cases; the doc examples still run.
        assert!(parse(&["test", "hello"]).unwrap().doc_step());
        for bad in [
            &["test", "--doc", "--no-doc"][..],
            &["test", "--doc", "hello"],
            &["test", "--doc", "--list"],
            &["test", "--doc", "--manifest-path", "/x/Cargo.toml"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
