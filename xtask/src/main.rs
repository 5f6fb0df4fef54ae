//! `cargo xtask`: Stencil's host tool. It builds apps for `x86_64-unknown-none`, boots them in
//! QEMU and runs the test tiers. See docs/xtask.md for usage and docs/ARCHITECTURE.md for the
//! build flags, kernel command line and exit codes it implements.
//!
//! This file only parses the command line and dispatches: each subcommand is a module of
//! [`cmd`] that owns its arguments; the machinery they share lives in the modules below them.

mod apps;
mod build_apps;
mod cargo_build;
mod cmd;
mod cmdline;
mod doccheck;
mod harness;
mod http;
mod new_crate;
mod parse;
mod proc;
mod qemu;
mod symbolize;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::proc::Interrupted;
use crate::qemu::EXIT_XTASK_ERROR;

/// The exit-code table of `--help`; `stencil_abi::exit::HelpTable` generates the same text (a test
/// below keeps the two identical).
const EXIT_CODES_HELP: &str = "\
Exit codes of `build` and `run`:
  0-99     the app's own exit code
  100-105  reported by libos: 100 panic, 101 CPU exception,
           102 stack overflow, 103 bad kernel command line,
           104 out of memory, 105 boot failed (bad start info or memory map)
  110      the guest crashed (triple fault / reset: QEMU exited 0)
  111      timeout: the guest was killed
  112      QEMU failed (exited 1 or with an unexpected status)
  113      xtask error (bad usage, build failure, QEMU missing, unknown app)
  130      interrupted (Ctrl-C); QEMU was killed
`test` exits 0 if every test passed, else 1.";

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Stencil's host tool: build apps, boot them in QEMU, run the tests",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build apps for x86_64-unknown-none and print the path of each ELF
    Build(cmd::build::BuildCmd),
    /// Build an app and boot it in QEMU until it exits (or Ctrl-C); serial output goes to the
    /// terminal, fault reports are symbolized
    #[command(after_help = EXIT_CODES_HELP)]
    Run(cmd::run::RunCmd),
    /// Compile libos's doc examples, run the host tests, then boot every declared QEMU test case;
    /// ends with `N passed, N failed`
    #[command(after_help = cmd::test::AFTER_HELP)]
    Test(cmd::test::TestCmd),
    /// Spawn benchmark: Stencil vs Linux's fork() in a Linux guest under the same QEMU, plus the
    /// host natively; table, target/bench/results.csv and target/bench/spawn.svg
    Bench(cmd::bench::BenchCmd),
    /// HTTP benchmark: boots apps/httpd (share and copy mode) and the same server forked per
    /// connection on Linux (4 KiB pages, THP), loads each from the host over a forwarded
    /// loopback port; requests/s and latency percentiles in one table
    Httpbench(cmd::httpbench::HttpBenchCmd),
    /// Create a service crate outside the workspace that depends on libos by path; build and
    /// boot it with `cargo xtask run --manifest-path <PATH>/Cargo.toml`
    New(cmd::new::NewCmd),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { EXIT_XTASK_ERROR } else { 0 });
        }
    };
    // Every guard is dropped inside `real_main`: `exit` runs no destructors.
    let code = match real_main(cli) {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<Interrupted>() {
            Some(Interrupted(sig)) => {
                eprintln!("stencil: interrupted");
                proc::signal_exit_code(*sig)
            }
            None => {
                eprintln!("xtask: error: {e:#}");
                EXIT_XTASK_ERROR
            }
        },
    };
    std::process::exit(code);
}

fn real_main(cli: Cli) -> Result<i32> {
    proc::install_signal_handlers()?;
    let root = workspace_root();
    match cli.command {
        Cmd::Build(c) => cmd::build::run(&root, &c),
        Cmd::Run(c) => cmd::run::run(&root, c),
        Cmd::Test(c) => cmd::test::run(&root, c),
        Cmd::Bench(c) => cmd::bench::run(&root, &c),
        Cmd::Httpbench(c) => cmd::httpbench::run(&root, &c),
        Cmd::New(c) => cmd::new::run(&root, &c),
    }
}

/// The workspace root: the parent of xtask's own directory.
fn workspace_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR at run time too; prefer it (the tree may have moved).
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent().map(Path::to_path_buf).unwrap_or(dir)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn exit_codes_help_matches_the_abi() {
        let generated = format!(
            "Exit codes of `build` and `run`:\n{}\n`test` exits 0 if every test passed, else 1.",
            stencil_abi::exit::HelpTable
        );
        assert_eq!(EXIT_CODES_HELP, generated);
    }

    /// clap's own consistency checks of every subcommand's arguments (conflicts and
    /// requirements name real arguments, no two share a flag).
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_dispatches_its_own_arguments() {
        let parse = |argv: &[&str]| Cli::try_parse_from(argv).map(|c| c.command);
        assert!(matches!(parse(&["x", "build", "hello"]), Ok(Cmd::Build(_))));
        assert!(matches!(parse(&["x", "run", "hello"]), Ok(Cmd::Run(_))));
        assert!(matches!(parse(&["x", "test", "args"]), Ok(Cmd::Test(_))));
        assert!(matches!(
            parse(&["x", "bench", "--quick"]),
            Ok(Cmd::Bench(_))
        ));
        assert!(matches!(parse(&["x", "httpbench"]), Ok(Cmd::Httpbench(_))));
        assert!(matches!(parse(&["x", "new", "/tmp/x"]), Ok(Cmd::New(_))));
        // An option of one subcommand is not another's.
        assert!(parse(&["x", "build", "--quick"]).is_err());
        assert!(parse(&["x", "new", "/tmp/x", "--release"]).is_err());
    }
}
