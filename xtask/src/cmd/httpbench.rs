//! `cargo xtask httpbench`: boots `apps/httpd` once per mode (share, copy) and, as its peer,
//! `bench/linux-httpd` as `/init` of a Linux guest (the same content and request handling, one
//! child forked per connection from the warmed process), each under the same QEMU machine,
//! accelerator, memory, vCPU count and port forwarding; loads each through a forwarded loopback
//! port with [`crate::http`]'s client (the same connections, one request per connection) and
//! prints requests/s and latency percentiles in one table.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::build_apps::{BuildOpts, build_apps};
use crate::cmd::bench::linux_net;
use crate::http::{Load, free_port, get, load, wait_ready};
use crate::qemu::{Accel, Firmware, Machine, PortForward, Vm};

/// Who httpd is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// Stencil's rows, then the Linux rows
    Linux,
    /// Stencil's rows only
    None,
    /// The Linux rows only
    Only,
}

/// `cargo xtask httpbench`: requests/s and latency of `apps/httpd` in share and copy mode, and
/// of the same server on Linux (fork per connection).
#[derive(Debug, clap::Args)]
pub struct HttpBenchCmd {
    /// Client connections at once (each does one request per connection, back to back)
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    /// Seconds of load per row (after 1 s of warm-up)
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Path to fetch
    #[arg(long, default_value = "/hello.txt")]
    pub path: String,
    /// QEMU machine type, for every row (Linux too)
    #[arg(long, value_enum, default_value_t = crate::qemu::Machine::Microvm)]
    pub machine: crate::qemu::Machine,
    /// Build httpd with the dev profile instead of release (linux-httpd is always release)
    #[arg(long)]
    pub debug: bool,
    /// Only this Stencil mode (default: both)
    #[arg(long, value_parser = ["share", "copy"])]
    pub mode: Option<String>,
    /// The peer: `linux` adds two rows for bench/linux-httpd as /init of Debian's kernel
    /// (linux-4k: 4 KiB pages, linux-thp: transparent huge pages; the kernel is fetched with
    /// apt-get once, cached in target/linux-peer), `none` leaves them out, `only` runs them alone
    #[arg(long, value_enum, default_value_t = Peer::Linux)]
    pub peer: Peer,
    /// Size of the warmed content set (the state every worker is spawned or forked from), in MiB
    #[arg(long, default_value_t = 64)]
    pub content_mib: u64,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// apps/httpd with `share=on` (true) or `share=off`.
    Stencil { share: bool },
    /// bench/linux-httpd in the Linux guest, with 4 KiB pages (false) or transparent huge
    /// pages.
    Linux { thp: bool },
}

impl Row {
    fn label(self) -> &'static str {
        match self {
            Row::Stencil { share: true } => "share",
            Row::Stencil { share: false } => "copy",
            Row::Linux { thp: false } => "linux-4k",
            Row::Linux { thp: true } => "linux-thp",
        }
    }
}

/// The rows `cmd` asks for, in the order they run.
pub fn rows(cmd: &HttpBenchCmd) -> Result<Vec<Row>> {
    let stencil: Vec<Row> = match cmd.mode.as_deref() {
        Some("share") => vec![Row::Stencil { share: true }],
        Some("copy") => vec![Row::Stencil { share: false }],
        Some(m) => bail!("--mode {m}: share or copy"),
        None => vec![Row::Stencil { share: true }, Row::Stencil { share: false }],
    };
    let linux = [Row::Linux { thp: false }, Row::Linux { thp: true }];
    Ok(match cmd.peer {
        Peer::Linux => stencil.into_iter().chain(linux).collect(),
        Peer::None => stencil,
        Peer::Only if cmd.mode.is_some() => {
            bail!("--mode picks a Stencil row, and --peer only runs none: drop one of them")
        }
        Peer::Only => linux.to_vec(),
    })
}

/// Guest memory for every row (the same for Stencil and Linux): httpd's room to serve plus
/// twice the content (the content and its page tables and index, with room to spare), and at
/// least 1 GiB: Linux turns transparent huge pages off when it manages less than 512 MiB of RAM
/// (`hugepage_init`), which a 512 MiB guest is after the kernel's own reservations.
pub fn guest_mem(content_mib: u64) -> String {
    let mib = 256u64.saturating_add(content_mib.saturating_mul(2));
    format!("{}M", mib.max(1024))
}

/// What the Linux row boots.
struct LinuxGuest {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn prepare_linux(root: &Path, machine: Machine) -> Result<LinuxGuest> {
    let httpd = linux_net::build_httpd(root)?;
    let dir = root.join("target").join("linux-peer");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let kernel = linux_net::kernel(&dir)?;
    let modules = linux_net::modules(&dir, &kernel)?;
    let initrd = linux_net::initramfs(&dir, &httpd, &modules, machine)?;
    Ok(LinuxGuest { kernel, initrd })
}

/// Boots httpd once per mode and the Linux guest, loads each from the host and prints a table.
pub fn run(root: &std::path::Path, cmd: &HttpBenchCmd) -> Result<i32> {
    let rows = rows(cmd)?;
    let (accel, notice) = crate::qemu::detect_accel(crate::qemu::AccelChoice::Auto)?;
    if let Some(n) = notice {
        eprintln!("{n}");
    }
    let elf = if rows.iter().any(|r| matches!(r, Row::Stencil { .. })) {
        let opts = BuildOpts {
            release: !cmd.debug,
            manifest_path: None,
        };
        let built = build_apps(root, &["httpd".to_owned()], &opts)?;
        Some(
            built
                .into_iter()
                .next()
                .map(|(_, e)| e)
                .context("httpd was not built")?,
        )
    } else {
        None
    };
    let linux = if rows.iter().any(|r| matches!(r, Row::Linux { .. })) {
        Some(prepare_linux(root, cmd.machine)?)
    } else {
        None
    };
    let qemu_path = crate::qemu::find_qemu()?;
    let mem = guest_mem(cmd.content_mib);
    let mut lines = Vec::new();
    let mut notes = Vec::new();
    let mut failed = 0;
    for row in rows {
        let port = free_port()?;
        let mut vm = match (row, &elf, &linux) {
            (Row::Stencil { share }, Some(elf), _) => {
                let mut vm = Vm::new(elf.clone(), cmd.machine, accel);
                let options = vec![format!("share={}", if share { "on" } else { "off" })];
                let args = ["--content-mib".to_owned(), cmd.content_mib.to_string()];
                vm.cmdline = crate::cmdline::kernel_cmdline(&options, &args)?;
                vm
            }
            (Row::Linux { thp }, _, Some(g)) => linux_vm(g, cmd, accel, thp),
            _ => unreachable!("every row's guest was prepared above"),
        };
        vm.qemu = qemu_path.clone();
        vm.mem = mem.clone();
        vm.set_firmware(Firmware::Auto)?;
        vm.ports = vec![PortForward {
            host: port,
            guest: 80,
        }];
        if matches!(row, Row::Linux { .. }) {
            println!("{}: {}", row.label(), vm.shell_line());
        }
        let (l, stats) = match measure(vm, port, cmd, row) {
            Ok(m) => m,
            Err(e) if e.is::<crate::proc::Interrupted>() => return Err(e),
            // A guest that hangs or crashes costs its row, not the table.
            Err(e) => {
                failed += 1;
                notes.push(format!("{}: not measured: {e:#}", row.label()));
                lines.push(format!("{:<9} {:>9}", row.label(), "failed"));
                continue;
            }
        };
        let field = |k: &str| {
            stats
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{k}: ")).map(str::to_owned))
                .unwrap_or_else(|| "?".to_owned())
        };
        if matches!(row, Row::Linux { .. }) {
            notes.push(format!(
                "{}: {} KiB of the guest's anonymous memory in huge pages (AnonHugePages, at the \
                 end), {} MiB warm state",
                row.label(),
                field("anon_huge_kib"),
                cmd.content_mib
            ));
        }
        if l.errors > 0 {
            notes.push(format!(
                "{}: {} requests failed (counted in errors, not in req/s or latency)",
                row.label(),
                l.errors
            ));
        }
        lines.push(format!(
            "{:<9} {:>9.1} {:>9.2} {:>9.2} {:>7} {:>12} {:>12}",
            row.label(),
            l.rps(),
            l.percentile(50.0).as_secs_f64() * 1e3,
            l.percentile(99.0).as_secs_f64() * 1e3,
            l.errors,
            field("spawn_us_p50"),
            field("spawn_us_p99"),
        ));
    }
    println!(
        "httpd under QEMU ({accel}, {}, -m {mem}, 1 vCPU), {} MiB warm state, GET {}, {} \
         connections, {} s per row, one request per connection",
        cmd.machine, cmd.content_mib, cmd.path, cmd.connections, cmd.seconds
    );
    println!(
        "{:<9} {:>9} {:>9} {:>9} {:>7} {:>12} {:>12}",
        "row", "req/s", "p50 ms", "p99 ms", "errors", "spawn p50 us", "spawn p99 us"
    );
    for r in lines {
        println!("{r}");
    }
    println!(
        "(share/copy: apps/httpd on Stencil, spawn = Zygote::spawn_with; linux-4k/-thp: \
         bench/linux-httpd as /init of Linux {}, 4 KiB pages / transparent huge pages, spawn = \
         fork(); latency measured by the host client)",
        linux
            .as_ref()
            .and_then(|g| linux_net::kernel_version(&g.kernel).ok())
            .unwrap_or_else(|| "-".to_owned())
    );
    for n in notes {
        println!("note: {n}");
    }
    if failed > 0 {
        eprintln!("httpbench: {failed} row(s) not measured (see the notes)");
        return Ok(crate::qemu::EXIT_XTASK_ERROR);
    }
    Ok(0)
}

fn linux_vm(g: &LinuxGuest, cmd: &HttpBenchCmd, accel: Accel, thp: bool) -> Vm {
    let mut vm = Vm::new(g.kernel.clone(), cmd.machine, accel);
    vm.initrd = Some(g.initrd.clone());
    vm.cmdline = linux_net::cmdline(
        cmd.machine,
        accel,
        cmd.content_mib,
        thp,
        linux_net::host_tsc_khz,
    );
    vm
}

/// Boots `vm`, waits for its server, loads it, reads /stats and ends it with /quit. An error
/// carries the guest's exit and its last serial lines.
fn measure(vm: Vm, port: u16, cmd: &HttpBenchCmd, row: Row) -> Result<(Load, String)> {
    // Linux boots in seconds under TCG (Stencil in milliseconds).
    let boot = Duration::from_secs(if matches!(row, Row::Linux { .. }) {
        180
    } else {
        60
    });
    let limit = boot + Duration::from_secs(cmd.seconds + 90);
    let ended = Arc::new(AtomicBool::new(false));
    let ended_in_guest = Arc::clone(&ended);
    let guest = std::thread::spawn(move || {
        let r = crate::qemu::run(&vm, Some(limit), false);
        ended_in_guest.store(true, Ordering::Relaxed);
        r
    });
    let measured = (|| -> Result<(Load, String)> {
        // Stops waiting as soon as the guest has ended.
        wait_ready(port, "/", boot, &ended)?;
        let _ = load(port, &cmd.path, cmd.connections, Duration::from_secs(1));
        let l = load(
            port,
            &cmd.path,
            cmd.connections,
            Duration::from_secs(cmd.seconds),
        );
        let stats = get(port, "/stats")?.text();
        Ok((l, stats))
    })();
    let _ = get(port, "/quit");
    let run = guest
        .join()
        .map_err(|_| anyhow::anyhow!("QEMU thread panicked"))??;
    if let Some(sig) = run.interrupted {
        return Err(crate::proc::Interrupted(sig).into());
    }
    measured.with_context(|| {
        let serial = String::from_utf8_lossy(&run.serial);
        let lines: Vec<&str> = serial.lines().collect();
        format!(
            "the guest exited {} ({}); last serial lines:\n{}",
            run.code,
            run.summary.as_deref().unwrap_or("-"),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cmd: HttpBenchCmd,
    }

    fn parse(args: &[&str]) -> Result<HttpBenchCmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("httpbench").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn rows_by_peer_and_mode() {
        let share = Row::Stencil { share: true };
        let copy = Row::Stencil { share: false };
        let default = parse(&[]).unwrap();
        assert_eq!(default.peer, Peer::Linux);
        let (l4k, lthp) = (Row::Linux { thp: false }, Row::Linux { thp: true });
        assert_eq!(rows(&default).unwrap(), [share, copy, l4k, lthp]);
        let only = parse(&["--peer", "only"]).unwrap();
        assert_eq!(rows(&only).unwrap(), [l4k, lthp]);
        let none = parse(&["--peer", "none", "--mode", "copy"]).unwrap();
        assert_eq!(rows(&none).unwrap(), [copy]);
        let linux_share = parse(&["--peer", "linux", "--mode", "share"]).unwrap();
        assert_eq!(rows(&linux_share).unwrap(), [share, l4k, lthp]);
        let clash = parse(&["--peer", "only", "--mode", "share"]).unwrap();
        assert!(rows(&clash).unwrap_err().to_string().contains("drop one"));
        assert!(parse(&["--peer", "bsd"]).is_err());
        assert!(parse(&["--mode", "linux"]).is_err());
    }

    #[test]
    fn the_linux_guest_gets_the_same_machine_and_memory() {
        assert_eq!(guest_mem(64), "1024M");
        assert_eq!(guest_mem(0), "1024M");
        assert_eq!(guest_mem(1024), "2304M");
        let cmd = parse(&["--machine", "q35", "--content-mib", "16"]).unwrap();
        let g = LinuxGuest {
            kernel: "/k/vmlinuz-6.1.0-57-amd64".into(),
            initrd: "/k/httpd-q35.cpio.gz".into(),
        };
        let mut vm = linux_vm(&g, &cmd, Accel::Tcg, true);
        vm.mem = guest_mem(cmd.content_mib);
        vm.ports = vec![PortForward {
            host: 8080,
            guest: 80,
        }];
        let line = vm.shell_line();
        assert!(line.contains("-M q35 "), "{line}");
        assert!(
            line.contains(" -m 1024M -smp 1 -kernel /k/vmlinuz-6.1.0-57-amd64"),
            "{line}"
        );
        assert!(line.contains(" -initrd /k/httpd-q35.cpio.gz "), "{line}");
        assert!(
            line.contains("always -- --content-mib 16 --pages thp'"),
            "{line}"
        );
        assert!(line.contains("hostfwd=tcp:127.0.0.1:8080-:80"), "{line}");
        assert!(line.contains("virtio-net-pci"), "{line}");
    }
}
