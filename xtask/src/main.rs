//! `cargo xtask`: Stencil's host tool. It builds apps for `x86_64-unknown-none`, boots them in
//! QEMU and runs the test tiers. See docs/xtask.md for usage and docs/ARCHITECTURE.md for the
//! build flags, kernel command line and exit codes it implements.

mod apps;
mod bench;
mod cargo_build;
mod cmdline;
mod harness;
mod http;
mod new_crate;
mod parse;
mod proc;
mod qemu;
mod symbolize;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::cargo_build::Selection;
use crate::parse::{MemSize, Timeout};
use crate::qemu::{Accel, AccelChoice, EXIT_XTASK_ERROR, Firmware, Machine, Vm};

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

const TEST_HELP: &str = "\
Host tests: cargo test --workspace --no-fail-fast --exclude <every app>.
QEMU cases: declared in each app's Cargo.toml as [[package.metadata.stencil.test]]
(see docs/xtask.md), built in one cargo call per profile and booted one after another.
With --manifest-path: the declared cases of a crate outside the workspace (no host tests:
its packages build for the guest). A failing case's report includes its fault report
symbolized as `function (file:line)`. Each case has its own timeout (default 60 s).
The last line is `N passed, N failed`. Exit status: 0 if nothing failed, else 1;
130 on Ctrl-C; 113 on an xtask error.";

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
    Build(BuildCmd),
    /// Build an app and boot it in QEMU until it exits (or Ctrl-C); serial output goes to the
    /// terminal, fault reports are symbolized
    #[command(after_help = EXIT_CODES_HELP)]
    Run(RunCmd),
    /// Run the host tests, then boot every declared QEMU test case; ends with `N passed, N failed`
    #[command(after_help = TEST_HELP)]
    Test(TestCmd),
    /// Spawn benchmark: Stencil vs Linux's fork() in a Linux guest under the same QEMU, plus the
    /// host natively; table, target/bench/results.csv and target/bench/spawn.svg
    Bench(bench::BenchCmd),
    /// HTTP benchmark: boots apps/httpd (share and copy mode), loads it from the host over a
    /// forwarded loopback port; requests/s and latency percentiles
    Httpbench(http::HttpBenchCmd),
    /// Create a service crate outside the workspace that depends on libos by path; build and
    /// boot it with `cargo xtask run --manifest-path <PATH>/Cargo.toml`
    New(NewCmd),
}

#[derive(Debug, Args)]
struct NewCmd {
    /// Directory to create (must not exist, or be empty)
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// Package name [default: from the directory name]
    #[arg(long)]
    name: Option<String>,
}

#[derive(Debug, Args)]
struct BuildOpts {
    /// Build with the release profile (default: dev)
    #[arg(long)]
    release: bool,
    /// Cargo.toml of an app crate outside the workspace (one that depends on libos by path); it
    /// builds in its own target directory
    #[arg(long, value_name = "PATH")]
    manifest_path: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SelectOpts {
    /// Cargo features to enable (passed to cargo as --features; repeatable, or comma-separated)
    #[arg(long, value_name = "FEATURES")]
    features: Vec<String>,
    /// The binary to build and boot, for a package with several (passed to cargo as --bin)
    #[arg(long, value_name = "NAME")]
    bin: Option<String>,
}

impl SelectOpts {
    fn selection(&self) -> Selection {
        Selection {
            features: self.features.clone(),
            bin: self.bin.clone(),
        }
    }
}

#[derive(Debug, Args)]
struct BuildCmd {
    /// App package names (default: every app of the workspace, or the --manifest-path crate)
    #[arg(value_name = "APP")]
    apps: Vec<String>,
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    select: SelectOpts,
}

#[derive(Debug, Args)]
struct RunCmd {
    /// The app's package name (an app of the workspace; not needed with --elf or --manifest-path)
    #[arg(value_name = "APP", required_unless_present_any = ["elf", "manifest_path"])]
    app: Option<String>,
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    select: SelectOpts,
    /// Boot this prebuilt ELF instead of building an app
    #[arg(long, value_name = "PATH", conflicts_with_all = ["app", "release", "manifest_path", "features", "bin"])]
    elf: Option<PathBuf>,
    /// Accelerator
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// QEMU machine type
    #[arg(long, value_enum, default_value_t = Machine::Microvm)]
    machine: Machine,
    /// Guest memory, QEMU -m syntax: 256M, 2G, 512 (MiB); suffixes K, M, G, T; a whole number
    /// of MiB, at least 4M (what libos needs to boot)
    #[arg(long, default_value = "256M", value_name = "SIZE")]
    mem: MemSize,
    /// Number of virtual CPUs (Stencil runs on one CPU for now: anything but 1 is an error)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=255))]
    smp: u32,
    /// Firmware for q35 (microvm always uses QEMU's bios-microvm.bin)
    #[arg(long, value_enum, default_value_t = Firmware::Auto)]
    firmware: Firmware,
    /// Start QEMU's gdb stub on 127.0.0.1:PORT [default PORT: 1234]; the guest waits for the
    /// debugger. A port that is taken is an error
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "1234",
          require_equals = true, value_parser = clap::value_parser!(u16).range(1..))]
    gdb: Option<u16>,
    /// Kill the guest after SECS seconds and exit 111 [default: none: the guest runs until it
    /// exits or Ctrl-C; 0: none]
    #[arg(long, value_name = "SECS")]
    timeout: Option<Timeout>,
    /// Build, then print the QEMU command line instead of running it
    #[arg(long)]
    dry_run: bool,
    /// Run under `-icount shift=0,sleep=off` (TCG only): the guest clock counts executed
    /// instructions, so in-guest timings (e.g. the boot banner) become instruction counts
    #[arg(long)]
    icount: bool,
    /// Guest log level: kernel option log=LEVEL
    #[arg(long, value_name = "LEVEL", value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    log: Option<String>,
    /// Turn page-table sharing off: kernel option share=off
    #[arg(long)]
    no_share: bool,
    /// Extra kernel options, passed through as is (repeatable)
    #[arg(long, value_name = "OPTIONS")]
    cmdline: Vec<String>,
    /// Forward host TCP port HOST (127.0.0.1) to guest port GUEST; gives the guest a virtio-net
    /// NIC on QEMU user networking (repeatable; `-p 8080:80`)
    #[arg(short = 'p', long = "port", value_name = "HOST:GUEST")]
    ports: Vec<qemu::PortForward>,
    /// Arguments for the app (after `--`)
    #[arg(last = true, value_name = "APP ARGS")]
    args: Vec<String>,
}

#[derive(Debug, Args)]
struct TestCmd {
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

/// Error: xtask got this signal and stopped its child; it exits with 128 + signal.
#[derive(Debug)]
pub struct Interrupted(pub i32);

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "interrupted (signal {})", self.0)
    }
}

impl std::error::Error for Interrupted {}

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
        Cmd::Build(b) => {
            for (_, elf) in build_apps_selected(&root, &b.apps, &b.build, &b.select.selection())? {
                println!("{}", elf.display());
            }
            Ok(0)
        }
        Cmd::Run(r) => run(&root, r),
        Cmd::Test(t) => harness::run(
            &root,
            &harness::Options {
                manifest_path: t.manifest_path,
                select: t.select.selection(),
                filter: t.filter,
                no_host: t.no_host,
                no_qemu: t.no_qemu,
                list: t.list,
                show_output: t.show_output,
                accel: t.accel,
                firmware: t.firmware,
            },
        ),
        Cmd::Bench(b) => bench::run(&root, &b),
        Cmd::Httpbench(h) => http::bench(&root, &h),
        Cmd::New(n) => {
            let manifest = new_crate::create(&root, &n.path, n.name.as_deref())?;
            println!("created {}", manifest.display());
            println!(
                "build and boot it: cargo xtask run --manifest-path {}",
                manifest.display()
            );
            println!(
                "run its test case: cargo xtask test --manifest-path {}",
                manifest.display()
            );
            Ok(0)
        }
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

/// Builds the named apps (or all of them) in one cargo call; returns (package, ELF) pairs.
fn build_apps(root: &Path, names: &[String], opts: &BuildOpts) -> Result<Vec<(String, PathBuf)>> {
    build_apps_selected(root, names, opts, &Selection::default())
}

/// [`build_apps`] with `--features` / `--bin`.
fn build_apps_selected(
    root: &Path,
    names: &[String],
    opts: &BuildOpts,
    sel: &Selection,
) -> Result<Vec<(String, PathBuf)>> {
    let (dir, manifest, wanted) = match &opts.manifest_path {
        Some(m) => {
            let m = m
                .canonicalize()
                .with_context(|| format!("--manifest-path {}", m.display()))?;
            let meta = apps::load(&m)?;
            let wanted: Vec<(String, String)> = if names.is_empty() {
                let pkg = meta
                    .packages
                    .iter()
                    .find(|p| p.manifest_path == m)
                    .with_context(|| {
                        format!("{} has no [package]; name the app to build", m.display())
                    })?;
                vec![(pkg.name.clone(), pkg.id.clone())]
            } else {
                names
                    .iter()
                    .map(|n| {
                        let pkg =
                            meta.packages
                                .iter()
                                .find(|p| &p.name == n)
                                .with_context(|| {
                                    format!("no package `{n}` in the workspace of {}", m.display())
                                })?;
                        Ok((pkg.name.clone(), pkg.id.clone()))
                    })
                    .collect::<Result<_>>()?
            };
            let dir = m.parent().map(Path::to_path_buf).unwrap_or_default();
            (dir, Some(m), wanted)
        }
        None => {
            let meta = apps::load(&root.join("Cargo.toml"))?;
            let all = apps::apps(&meta)?;
            let wanted: Vec<(String, String)> = if names.is_empty() {
                all.iter().map(|a| (a.name.clone(), a.id.clone())).collect()
            } else {
                names
                    .iter()
                    .map(|n| apps::find(&all, n).map(|a| (a.name.clone(), a.id.clone())))
                    .collect::<Result<_>>()?
            };
            if wanted.is_empty() {
                bail!("this workspace has no apps (under apps/ or tests/apps/)");
            }
            (root.to_path_buf(), None, wanted)
        }
    };
    let packages: Vec<String> = wanted.iter().map(|(n, _)| n.clone()).collect();
    if sel.bin.is_some() && packages.len() != 1 {
        bail!(
            "--bin picks a binary of one app; name the app ({} selected: {})",
            packages.len(),
            packages.join(", ")
        );
    }
    let req = cargo_build::BuildRequest {
        dir: &dir,
        manifest_path: manifest.as_deref(),
        packages: &packages,
        release: opts.release,
    };
    let artifacts = cargo_build::build_selected(&req, sel)?;
    let map = cargo_build::executables_by_package(&artifacts, &wanted, sel.bin.as_deref())?;
    Ok(packages
        .into_iter()
        .map(|n| {
            let elf = map[&n].clone();
            (n, elf)
        })
        .collect())
}

fn run(root: &Path, r: RunCmd) -> Result<i32> {
    if r.smp != 1 {
        bail!(
            "--smp {}: Stencil runs on one CPU for now (libos starts no other CPU); use --smp 1",
            r.smp
        );
    }
    let kernel = match &r.elf {
        Some(elf) => {
            if !elf.is_file() {
                bail!("--elf {}: no such file", elf.display());
            }
            elf.clone()
        }
        None => {
            let names: Vec<String> = r.app.iter().cloned().collect();
            let built = build_apps_selected(root, &names, &r.build, &r.select.selection())?;
            let [(_, elf)] = <[_; 1]>::try_from(built)
                .map_err(|b| anyhow::anyhow!("expected one app, built {}", b.len()))?;
            elf
        }
    };

    let (mut accel, notice) = qemu::detect_accel(r.accel)?;
    if let Some(n) = notice {
        eprintln!("{n}");
    }
    if r.icount && accel == Accel::Kvm {
        if r.accel == AccelChoice::Kvm {
            bail!("--icount needs TCG (QEMU counts instructions only when it emulates them)");
        }
        eprintln!("stencil: --icount: using TCG (instruction counting is TCG-only)");
        accel = Accel::Tcg;
    }
    let mut options = Vec::new();
    if let Some(level) = &r.log {
        options.push(format!("log={level}"));
    }
    if r.no_share {
        options.push("share=off".to_owned());
    }
    options.extend(r.cmdline.iter().cloned());

    let mut vm = Vm::new(kernel, r.machine, accel);
    vm.mem = r.mem.qemu_arg();
    vm.smp = r.smp;
    vm.gdb = r.gdb;
    vm.icount = r.icount;
    vm.cmdline = cmdline::kernel_cmdline(&options, &r.args)?;
    vm.set_firmware(r.firmware)?;
    vm.ports = r.ports.clone();

    if r.dry_run {
        if let Err(e) = qemu::find_qemu() {
            eprintln!("stencil: warning: {e:#}");
        }
        println!("{}", vm.shell_line());
        return Ok(0);
    }
    vm.qemu = qemu::find_qemu()?;
    qemu::check_host_ports(&vm.ports)?;
    // No timeout unless asked for: a server runs until Ctrl-C.
    let timeout: Option<Duration> = r.timeout.and_then(|t| t.0);
    if let Some(port) = r.gdb {
        qemu::check_gdb_port(port)?;
        eprintln!(
            "stencil: QEMU waits for gdb on 127.0.0.1:{port}; connect with: gdb {} -ex 'target \
             remote 127.0.0.1:{port}'",
            vm.kernel.display()
        );
    }
    let res = qemu::run(&vm, timeout, true)?;
    let serial = String::from_utf8_lossy(&res.serial);
    if let Some(report) = symbolize::report_for_elf(&serial, &vm.kernel, root) {
        eprint!("{report}");
    }
    if res.code != 0
        && let Some(summary) = &res.summary
    {
        eprintln!("{summary}");
    }
    Ok(res.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_cmd(args: &[&str]) -> RunCmd {
        let argv = ["cargo xtask", "run"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Cmd::Run(r) => r,
            other => panic!("not run: {other:?}"),
        }
    }

    /// `run` has no timeout unless one is asked for (a server runs until Ctrl-C); `--timeout 0`
    /// also means none.
    #[test]
    fn run_timeout_defaults_to_none() {
        assert_eq!(run_cmd(&["httpd"]).timeout.and_then(|t| t.0), None);
        assert_eq!(
            run_cmd(&["httpd", "--timeout", "0"])
                .timeout
                .and_then(|t| t.0),
            None
        );
        assert_eq!(
            run_cmd(&["httpd", "--timeout", "5"])
                .timeout
                .and_then(|t| t.0),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn gdb_port_is_optional_and_needs_equals() {
        assert_eq!(run_cmd(&["hello"]).gdb, None);
        assert_eq!(run_cmd(&["hello", "--gdb"]).gdb, Some(1234));
        assert_eq!(run_cmd(&["hello", "--gdb=2345"]).gdb, Some(2345));
        // Without `=`, the next word is not taken as the port.
        let r = run_cmd(&["--gdb", "hello"]);
        assert_eq!((r.gdb, r.app.as_deref()), (Some(1234), Some("hello")));
        assert!(Cli::try_parse_from(["cargo xtask", "run", "hello", "--gdb=0"]).is_err());
    }

    #[test]
    fn features_and_bin_reach_the_selection() {
        let r = run_cmd(&[
            "hello",
            "--features",
            "a,b",
            "--features",
            "c",
            "--bin",
            "x",
        ]);
        assert_eq!(
            r.select.selection(),
            Selection {
                features: vec!["a,b".to_owned(), "c".to_owned()],
                bin: Some("x".to_owned()),
            }
        );
        let Cmd::Test(t) = Cli::try_parse_from([
            "cargo xtask",
            "test",
            "--manifest-path",
            "/x/Cargo.toml",
            "--bin",
            "y",
        ])
        .unwrap()
        .command
        else {
            panic!("not test");
        };
        assert_eq!(t.manifest_path.as_deref(), Some(Path::new("/x/Cargo.toml")));
        assert_eq!(t.select.bin.as_deref(), Some("y"));
    }
}
