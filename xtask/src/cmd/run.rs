//! `cargo xtask run`: builds an app (or takes `--elf`) and boots it in QEMU until it exits, the
//! timeout passes or Ctrl-C; serial output goes to the terminal, fault reports are symbolized.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;

use crate::build_apps::{BuildOpts, SelectOpts, build_apps_selected};
use crate::parse::{MemSize, Timeout};
use crate::qemu::{self, Accel, AccelChoice, Firmware, Machine, Vm};
use crate::{cmdline, symbolize};

#[derive(Debug, Args)]
pub struct RunCmd {
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

pub fn run(root: &Path, r: RunCmd) -> Result<i32> {
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
    use clap::Parser;

    use super::*;
    use crate::cargo_build::Selection;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        cmd: RunCmd,
    }

    fn try_run_cmd(args: &[&str]) -> Result<RunCmd, clap::Error> {
        Wrap::try_parse_from(["run"].iter().chain(args)).map(|w| w.cmd)
    }

    fn run_cmd(args: &[&str]) -> RunCmd {
        try_run_cmd(args).unwrap()
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
        assert!(try_run_cmd(&["hello", "--gdb=0"]).is_err());
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
    }

    #[test]
    fn an_app_or_elf_is_required() {
        assert!(try_run_cmd(&[]).is_err());
        assert!(try_run_cmd(&["--elf", "/x/app"]).unwrap().app.is_none());
    }
}
