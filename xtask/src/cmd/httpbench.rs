//! `cargo xtask httpbench`: boots `apps/httpd` once per mode (share, copy), loads it from the host
//! through a forwarded loopback port with [`crate::http`]'s client, and prints requests/s and
//! latency percentiles.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::build_apps::{BuildOpts, build_apps};
use crate::http::{Load, free_port, get, load, wait_ready};

/// `cargo xtask httpbench`: requests/s and latency of `apps/httpd`, share vs copy mode.
#[derive(Debug, clap::Args)]
pub struct HttpBenchCmd {
    /// Client connections at once (each does one request per connection, back to back)
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    /// Seconds of load per mode (after 1 s of warm-up)
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Path to fetch
    #[arg(long, default_value = "/hello.txt")]
    pub path: String,
    /// QEMU machine type
    #[arg(long, value_enum, default_value_t = crate::qemu::Machine::Microvm)]
    pub machine: crate::qemu::Machine,
    /// Build httpd with the dev profile instead of release
    #[arg(long)]
    pub debug: bool,
    /// Only this mode (default: both)
    #[arg(long, value_parser = ["share", "copy"])]
    pub mode: Option<String>,
    /// Size of httpd's warmed content set (the snapshot every worker is spawned from), in MiB
    #[arg(long, default_value_t = 64)]
    pub content_mib: u64,
}

/// Boots httpd once per mode, loads it from the host and prints a table.
pub fn run(root: &std::path::Path, cmd: &HttpBenchCmd) -> Result<i32> {
    let opts = BuildOpts {
        release: !cmd.debug,
        manifest_path: None,
    };
    let built = build_apps(root, &["httpd".to_owned()], &opts)?;
    let elf = built
        .into_iter()
        .next()
        .map(|(_, e)| e)
        .context("httpd was not built")?;
    let (accel, notice) = crate::qemu::detect_accel(crate::qemu::AccelChoice::Auto)?;
    if let Some(n) = notice {
        eprintln!("{n}");
    }
    let qemu_path = crate::qemu::find_qemu()?;
    let modes: Vec<&str> = match cmd.mode.as_deref() {
        Some(m) => vec![m],
        None => vec!["share", "copy"],
    };
    let mut rows = Vec::new();
    for mode in modes {
        let port = free_port()?;
        let mut vm = crate::qemu::Vm::new(elf.clone(), cmd.machine, accel);
        vm.qemu = qemu_path.clone();
        let options = vec![format!(
            "share={}",
            if mode == "share" { "on" } else { "off" }
        )];
        let args = ["--content-mib".to_owned(), cmd.content_mib.to_string()];
        vm.cmdline = crate::cmdline::kernel_cmdline(&options, &args)?;
        vm.mem = format!("{}M", 256 + 2 * cmd.content_mib);
        vm.set_firmware(crate::qemu::Firmware::Auto)?;
        vm.ports = vec![crate::qemu::PortForward {
            host: port,
            guest: 80,
        }];
        let limit = Duration::from_secs(cmd.seconds + 90);
        let guest = std::thread::spawn(move || crate::qemu::run(&vm, Some(limit), false));
        let never = AtomicBool::new(false);
        let measured = (|| -> Result<(Load, String)> {
            wait_ready(port, "/", Duration::from_secs(60), &never)?;
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
        let (l, stats) = measured.with_context(|| {
            format!(
                "httpd ({mode}) exited {}; serial output:\n{}",
                run.code,
                String::from_utf8_lossy(&run.serial)
            )
        })?;
        let field = |k: &str| {
            stats
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{k}: ")).map(str::to_owned))
                .unwrap_or_else(|| "?".to_owned())
        };
        rows.push(format!(
            "{mode:<6} {:>9.1} {:>9.2} {:>9.2} {:>7} {:>12} {:>12}",
            l.rps(),
            l.percentile(50.0).as_secs_f64() * 1e3,
            l.percentile(99.0).as_secs_f64() * 1e3,
            l.errors,
            field("spawn_us_p50"),
            field("spawn_us_p99"),
        ));
    }
    println!(
        "httpd under QEMU ({accel}, {}), {} MiB snapshot, GET {}, {} connections, {} s per mode, \
         one request per connection",
        cmd.machine, cmd.content_mib, cmd.path, cmd.connections, cmd.seconds
    );
    println!(
        "{:<6} {:>9} {:>9} {:>9} {:>7} {:>12} {:>12}",
        "mode", "req/s", "p50 ms", "p99 ms", "errors", "spawn p50 us", "spawn p99 us"
    );
    for r in rows {
        println!("{r}");
    }
    Ok(0)
}
