//! `cargo xtask bench`: how much faster is spawning when page tables are shared? (issue #5)
//!
//! One run measures, side by side: Stencil's spawn (the hook below; the in-guest app comes with
//! the tasks issue), Linux's own fork()/vfork/thread creation in a Linux guest under the same
//! QEMU settings (`linux.rs`), and the same Linux program natively on the host as context. The
//! results are one list of [`Measurement`]s; the output is a terminal table, a CSV file and an
//! SVG plot in `target/bench/` (docs/bench.md explains how to read them).

mod cpio;
mod linux;
mod model;
mod plot;
mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::qemu::{self, Accel, AccelChoice, Firmware};
pub use model::{Measurement, Unit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Part {
    /// Stencil's spawn benchmark in a Stencil guest (not built yet: see the hook in bench/mod.rs)
    Stencil,
    /// Linux's fork/vfork/thread in a Linux guest under the same QEMU settings
    Linux,
    /// The same Linux program natively on the host (context)
    Native,
}

#[derive(Debug, Args)]
pub struct BenchCmd {
    /// Fewer samples: a smoke run in under two minutes
    #[arg(long)]
    quick: bool,
    /// Run the guests under `-icount shift=0,sleep=off` (TCG): the figures are guest
    /// instructions, deterministic and independent of machine noise
    #[arg(long)]
    icount: bool,
    /// Accelerator for every guest (the same for Stencil and Linux)
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Firmware for the q35 guests
    #[arg(long, value_enum, default_value_t = Firmware::Auto)]
    firmware: Firmware,
    /// Run only these parts (repeatable or comma-separated) [default: all]
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// Where results.csv and spawn.svg go [default: target/bench]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Extra kernel options for the Linux guest (appended to its command line)
    #[arg(long, value_name = "OPTIONS")]
    linux_append: Option<String>,
    /// Kill the Linux guest after SECS seconds [default: 240 with --quick, 900 without; twice
    /// that with --icount]
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
}

/// What one part contributed.
#[derive(Debug, Default)]
struct PartResult {
    results: Vec<Measurement>,
    notes: Vec<String>,
    failed: bool,
}

/// Runs the benchmark; the exit code is 0 if every selected part completed, else 1.
pub fn run(root: &Path, cmd: &BenchCmd) -> Result<i32> {
    let start = Instant::now();
    let mut parts = cmd.only.clone();
    if parts.is_empty() {
        parts = vec![Part::Stencil, Part::Linux, Part::Native];
    }
    parts.sort();
    parts.dedup();
    let target = root.join("target");
    let out_dir = cmd.out.clone().unwrap_or_else(|| target.join("bench"));

    let guests = parts
        .iter()
        .any(|p| matches!(p, Part::Stencil | Part::Linux));
    let accel = if guests {
        let (mut accel, notice) = qemu::detect_accel(cmd.accel)?;
        if cmd.icount && accel == Accel::Kvm {
            if cmd.accel == AccelChoice::Kvm {
                bail!("--icount needs TCG (QEMU counts instructions only when it emulates them)");
            }
            println!("bench: --icount: using TCG (instruction counting is TCG-only)");
            accel = Accel::Tcg;
        } else if let Some(n) = notice {
            println!("{n}");
        }
        Some(accel)
    } else {
        None
    };
    let unit = if cmd.icount {
        Unit::Instructions
    } else {
        Unit::Ns
    };
    let setting = match (accel, cmd.icount) {
        (Some(_), true) => "tcg-icount".to_owned(),
        (Some(a), false) => a.to_string(),
        (None, _) => "host".to_owned(),
    };
    println!(
        "bench: {} run, parts: {}, guests: {}{}",
        if cmd.quick { "quick" } else { "full" },
        parts
            .iter()
            .map(|p| format!("{p:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(", "),
        accel.map_or_else(|| "none".to_owned(), |a| a.to_string()),
        if cmd.icount {
            " with -icount shift=0,sleep=off (guest figures are instruction counts)"
        } else {
            ""
        }
    );

    let mut all = Vec::new();
    let mut notes = Vec::new();
    let mut failed = false;
    let mut absorb = |p: PartResult, all: &mut Vec<Measurement>| {
        all.extend(p.results);
        notes.extend(p.notes);
        failed |= p.failed;
    };

    if parts.contains(&Part::Stencil) {
        absorb(stencil_part(root, cmd, accel)?, &mut all);
    }
    let needs_peer = parts
        .iter()
        .any(|p| matches!(p, Part::Linux | Part::Native));
    let peer = if needs_peer {
        println!("bench: building bench/linux-peer (static, release)");
        Some(linux::build_peer(root)?)
    } else {
        None
    };
    if let (true, Some(peer), Some(accel)) = (parts.contains(&Part::Linux), &peer, accel) {
        absorb(linux_part(&target, cmd, accel, peer)?, &mut all);
    }
    if let (true, Some(peer)) = (parts.contains(&Part::Native), &peer) {
        let t = Instant::now();
        println!("native: running {} on the host", peer.display());
        let run = linux::run_native(peer, cmd.quick, Duration::from_secs(600))?;
        println!(
            "native: {} results in {:.1} s",
            run.results.len(),
            t.elapsed().as_secs_f64()
        );
        absorb(
            PartResult {
                failed: !run.complete,
                results: run.results,
                notes: run.notes,
            },
            &mut all,
        );
    }

    let subtitle = format!(
        "QEMU q35 {}, 1 vCPU; {}; {}",
        setting,
        unit_caption(unit),
        if cmd.quick { "--quick" } else { "full run" }
    );
    print!(
        "{}",
        report::table(&all, |system| heading(system, &setting, unit))
    );
    if all.iter().any(|m| m.system == "linux") {
        notes.push(format!(
            "linux: 4, 16 and 64 GiB are not measured: the Linux guest has {} of RAM",
            linux::GUEST_MEM
        ));
    }
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let csv_path = out_dir.join("results.csv");
    std::fs::write(&csv_path, report::csv(&all, &setting))
        .with_context(|| format!("cannot write {}", csv_path.display()))?;
    let mut written = vec![csv_path];
    let svg_path = out_dir.join("spawn.svg");
    match plot::svg(&all, unit, &subtitle) {
        Ok(svg) => {
            std::fs::write(&svg_path, svg)
                .with_context(|| format!("cannot write {}", svg_path.display()))?;
            written.push(svg_path);
        }
        Err(e) => notes.push(format!("plot: not written: {e:#}")),
    }
    if unit == Unit::Instructions && all.iter().any(|m| m.system == "native") {
        notes.push(
            "native: figures are host nanoseconds (not instructions); not in the plot".to_owned(),
        );
    }
    println!();
    for n in &notes {
        println!("note: {n}");
    }
    println!(
        "bench: {} measurements in {:.0} s; wrote {}",
        all.len(),
        start.elapsed().as_secs_f64(),
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    );
    Ok(i32::from(failed || all.is_empty()))
}

fn unit_caption(unit: Unit) -> &'static str {
    match unit {
        Unit::Ns => "guest wall-clock time (host time for native)",
        Unit::Instructions => "guest instructions (-icount shift=0,sleep=off)",
    }
}

fn heading(system: &str, setting: &str, unit: Unit) -> String {
    let what = match unit {
        Unit::Ns => "p50 / p99 time",
        Unit::Instructions => "p50 / p99 guest instructions",
    };
    match system {
        "linux" => format!(
            "Linux guest ({}, q35, {setting}, -m {}, 1 vCPU): {what}",
            "Debian kernel",
            linux::GUEST_MEM
        ),
        "native" => "Native on the host (context only; 2 CPUs shared): p50 / p99 time".to_owned(),
        "stencil" => format!("Stencil (q35, {setting}): {what}"),
        other => format!("{other}: {what}"),
    }
}

/// STENCIL HOOK — the Stencil part of the benchmark.
///
/// The integrator adds an in-guest app `apps/spawnbench` that spawns tasks from templates of
/// 2 MiB .. 64 GiB (as guest RAM allows) in `share` and `copy` mode, and prints `RESULT` lines in
/// the Linux peer's format (`kind=spawn_first size=.. pages=share n=.. p50_ns=.. p99_ns=..`; the
/// `pages` field carries the mode). This function should build it (`crate::build_apps`), boot it
/// like the Linux guest (`qemu::Vm`, same `accel`, `vm.icount = cmd.icount`, machine q35 for a
/// like-for-like comparison), parse its lines with `model::parse_result(line, "stencil", unit)`
/// and return them; the table, CSV and plot pick them up unchanged (the kind `spawn_first` is
/// plotted next to Linux's `fork_child_first`).
fn stencil_part(root: &Path, cmd: &BenchCmd, accel: Option<Accel>) -> Result<PartResult> {
    let _ = (root, cmd, accel);
    println!("stencil: not measured yet: the in-guest spawnbench app is not in the tree");
    Ok(PartResult {
        notes: vec!["stencil: not measured (apps/spawnbench does not exist yet)".to_owned()],
        ..PartResult::default()
    })
}

fn linux_part(target: &Path, cmd: &BenchCmd, accel: Accel, peer: &Path) -> Result<PartResult> {
    let dir = target.join("linux-peer");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let kernel = linux::kernel(&dir)?;
    let initrd = linux::initramfs(&dir, peer)?;
    let secs = cmd
        .timeout
        .unwrap_or(if cmd.quick { 240 } else { 900 } * if cmd.icount { 2 } else { 1 });
    let guest = linux::Guest {
        kernel,
        initrd,
        accel,
        icount: cmd.icount,
        firmware: cmd.firmware,
        quick: cmd.quick,
        append: cmd.linux_append.clone().unwrap_or_default(),
        timeout: Duration::from_secs(secs),
    };
    println!(
        "linux: booting the guest (timeout {secs} s); progress follows, times since QEMU start"
    );
    let run = linux::run_guest(&guest)?;
    println!(
        "linux: {} results in {:.1} s{}",
        run.results.len(),
        run.elapsed.as_secs_f64(),
        if run.complete { "" } else { " (incomplete)" }
    );
    Ok(PartResult {
        failed: !run.complete,
        results: run.results,
        notes: run.notes,
    })
}
