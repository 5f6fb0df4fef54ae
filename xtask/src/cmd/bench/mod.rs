//! `cargo xtask bench`: how much faster is spawning when page tables are shared? (issue #5)
//!
//! One run measures, side by side: Stencil's spawn (`apps/spawnbench` in a Stencil guest: from
//! templates of 2 MiB … 64 GiB, and from a `Zygote` whose heap holds 1 MiB … 1 GiB of objects),
//! Linux's own fork()/vfork/thread creation in a Linux guest under the same
//! QEMU settings (`linux.rs`), and the same Linux program natively on the host as context. The
//! results are one list of [`Measurement`]s; the output is a terminal table, a CSV file and an
//! SVG plot in `target/bench/` (docs/bench.md explains how to read them).

mod cpio;
mod linux;
pub(crate) mod linux_net;
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
    /// Stencil's spawn benchmark (apps/spawnbench: from templates, and from a zygote's warm heap)
    /// in a Stencil guest
    Stencil,
    /// Linux's fork/vfork/thread in a Linux guest under the same QEMU settings
    Linux,
    /// The same Linux program natively on the host (context)
    Native,
}

#[derive(Debug, Args)]
pub struct BenchCmd {
    /// Fewer sizes and samples: a smoke run in under two minutes
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
    print!(
        "{}",
        report::first_write_table(
            &all,
            &format!(
                "First write to an inherited page: Stencil (a Private template page) vs a forked \
                 Linux child (copy-on-write fault), {setting}: {}",
                match unit {
                    Unit::Ns => "p50 / p99 time",
                    Unit::Instructions => "p50 / p99 guest instructions",
                }
            )
        )
    );
    print!(
        "{}",
        report::heap_table(
            &all,
            &format!(
                "Stencil: spawn from a warm heap (a Zygote holding `heap` bytes of live 4 KiB \
                 objects), {setting}: {}",
                match unit {
                    Unit::Ns => "p50 / p99 time",
                    Unit::Instructions => "p50 / p99 guest instructions",
                }
            )
        )
    );
    print!(
        "{}",
        report::request_table(
            &all,
            &format!(
                "Requests from a warm state (spawn or fork, {} lookups, W page writes, exit, \
                 join or wait; the same reqcore handler on both), {setting}: {}",
                reqcore::LOOKUPS,
                match unit {
                    Unit::Ns => "p50 / p99 time",
                    Unit::Instructions => "p50 / p99 guest instructions",
                }
            )
        )
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
    if all.iter().any(model::is_request) {
        let req_path = out_dir.join("requests.svg");
        match plot::request_svg(&all, unit, &subtitle) {
            Ok(svg) => {
                std::fs::write(&req_path, svg)
                    .with_context(|| format!("cannot write {}", req_path.display()))?;
                written.push(req_path);
            }
            Err(e) => notes.push(format!("request plot: not written: {e:#}")),
        }
    }
    if unit == Unit::Instructions && all.iter().any(|m| m.system == "native") {
        notes.push(
            "native: figures are host nanoseconds (not instructions); not in the plot".to_owned(),
        );
    }
    println!();
    let heads = headline(&all);
    if !heads.is_empty() {
        println!("Headline (p50, this run):");
        for h in &heads {
            println!("  {h}");
        }
        println!();
    }
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

/// Guest RAM of the Stencil guest: the density figure is "tasks alive at once from a 1 GiB
/// template in a 2 GiB guest" (DESIGN.md).
const STENCIL_MEM: &str = "2G";

/// The Stencil part: boots `apps/spawnbench` (release) on q35 with the same accelerator (and
/// `-icount` setting) as the Linux guest; it spawns tasks from templates of 2 MiB .. 64 GiB
/// (alias-backed above guest RAM) in `share` and `copy` mode, with 4 KiB and 2 MiB pages, and
/// prints `RESULT` lines in the Linux peer's format (the `pages` field carries the mode), plus
/// `PTBYTES` (page-table bytes of a new task) and `DENSITY` (tasks alive at once) lines, which
/// become notes. Then the warm-heap series (`pages=heap` / `heap-copy`: a zygote whose heap holds
/// 1 MiB … 1 GiB of live objects; `kind=seal` is its `Zygote::new`), whose `INFO forks` lines
/// (spawns that found the zygote unchanged) become notes too.
fn stencil_part(root: &Path, cmd: &BenchCmd, accel: Option<Accel>) -> Result<PartResult> {
    let Some(accel) = accel else {
        bail!("the Stencil part needs a guest accelerator");
    };
    println!("stencil: building apps/spawnbench (release)");
    let opts = crate::build_apps::BuildOpts {
        release: true,
        manifest_path: None,
    };
    let built = crate::build_apps::build_apps(root, &["spawnbench".to_owned()], &opts)?;
    let (_, elf) = built
        .into_iter()
        .next()
        .context("spawnbench was not built")?;
    let mut vm = qemu::Vm::new(elf, qemu::Machine::Q35, accel);
    vm.qemu = qemu::find_qemu()?;
    vm.mem = STENCIL_MEM.to_owned();
    vm.icount = cmd.icount;
    vm.cmdline = format!("log=warn -- {}", if cmd.quick { "quick" } else { "full" });
    vm.set_firmware(cmd.firmware)?;
    println!("stencil: {}", vm.shell_line());
    let secs = cmd
        .timeout
        .unwrap_or(if cmd.quick { 300 } else { 900 } * if cmd.icount { 2 } else { 1 });
    let start = Instant::now();
    let res = qemu::run_with_lines(&vm, Some(Duration::from_secs(secs)), move |line: &str| {
        let line = line.trim();
        let t = start.elapsed().as_secs_f64();
        if let Some(rest) = line.strip_prefix("RESULT ") {
            let f = model::fields(rest);
            let kind = f.get("kind").copied();
            if let Some(w) = kind.and_then(model::request_writes) {
                let size = f
                    .get("size")
                    .and_then(|s| s.parse().ok())
                    .map_or_else(|| "?".to_owned(), model::size_name);
                println!(
                    "  [{t:6.1} s] stencil: request {size} {} W={w}: p50 {}",
                    f.get("pages").unwrap_or(&"?"),
                    f.get("p50_ns").unwrap_or(&"?")
                );
            } else if kind == Some("spawn_first") || kind == Some("seal") {
                let size = f
                    .get("size")
                    .and_then(|s| s.parse().ok())
                    .map_or_else(|| "?".to_owned(), model::size_name);
                println!(
                    "  [{t:6.1} s] stencil: {size} {}: {} p50 {}",
                    f.get("pages").unwrap_or(&"?"),
                    if kind == Some("seal") {
                        "seal"
                    } else {
                        "spawn"
                    },
                    f.get("p50_ns").unwrap_or(&"?")
                );
            }
        } else if line.starts_with("DENSITY ")
            || line.starts_with("SKIP ")
            || line.starts_with("ERROR ")
        {
            println!("  [{t:6.1} s] stencil: {line}");
        }
    })?;
    if let Some(sig) = res.interrupted {
        return Err(crate::proc::Interrupted(sig).into());
    }
    let serial = String::from_utf8_lossy(&res.serial).into_owned();
    let unit = if cmd.icount {
        Unit::Instructions
    } else {
        Unit::Ns
    };
    let mut out = PartResult::default();
    let mut done = false;
    // Request spawns, and how many of them found the zygote unchanged since the one before.
    let mut req_forks = (0u64, 0u64);
    for line in serial.lines().map(str::trim) {
        if line.starts_with("RESULT ") {
            match model::parse_result(line, "stencil", unit) {
                Some(m) => out.results.push(m),
                None => out.notes.push(format!("stencil: malformed line: {line}")),
            }
        } else if let Some(rest) = line.strip_prefix("PTBYTES ") {
            let f = model::fields(rest);
            if f.get("size") == Some(&"1073741824") {
                out.notes.push(format!(
                    "stencil: page-table bytes a new task costs at 1 GiB, {}: {}",
                    f.get("pages").unwrap_or(&"?"),
                    f.get("bytes").unwrap_or(&"?")
                ));
            }
        } else if let Some(note) = line.strip_prefix("INFO forks ").and_then(heap_forks_note) {
            out.notes.push(note);
        } else if let Some(note) = line
            .strip_prefix("INFO reqstate ")
            .and_then(|rest| request_state_note("stencil", rest))
        {
            out.notes.push(note);
        } else if let Some(rest) = line.strip_prefix("INFO reqforks ") {
            let f = model::fields(rest);
            let count = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            req_forks.0 += count("spawns");
            req_forks.1 += count("clean");
        } else if let Some(rest) = line.strip_prefix("DENSITY ") {
            let f = model::fields(rest);
            out.notes.push(format!(
                "stencil: {} tasks from a 1 GiB template alive at once in a {STENCIL_MEM} guest ({} mode, {} B stacks; then spawn said: {})",
                rest.split("tasks=").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("?"),
                f.get("pages").unwrap_or(&"?"),
                f.get("stack").unwrap_or(&"?"),
                rest.split("reason=").nth(1).and_then(|r| r.split(" elapsed_ms").next()).unwrap_or("?")
            ));
        } else if line.starts_with("SKIP ") || line.starts_with("ERROR ") {
            out.notes.push(format!("stencil: {line}"));
        } else if line == "DONE" {
            done = true;
        }
    }
    if req_forks.0 > 0 {
        out.notes.push(format!(
            "stencil: requests: {} of {} spawns found the zygote unchanged (fork_counts)",
            req_forks.1, req_forks.0
        ));
    }
    println!(
        "stencil: {} results in {:.1} s",
        out.results.len(),
        res.elapsed.as_secs_f64()
    );
    if !done || res.code != 0 {
        out.failed = true;
        out.notes.push(format!(
            "stencil: the guest did not finish ({}); {} results kept",
            res.summary.as_deref().unwrap_or("no DONE line"),
            out.results.len()
        ));
    }
    Ok(out)
}

/// The note for a warm-heap series' `INFO forks` line (how many spawns found the zygote
/// unchanged since the one before); `None` for the template series' lines and malformed ones.
fn heap_forks_note(rest: &str) -> Option<String> {
    let f = model::fields(rest);
    let mode = *f.get("pages")?;
    let label = model::HEAP_MODES.iter().find(|(m, _)| *m == mode)?.1;
    let size = model::size_name(f.get("size")?.parse().ok()?);
    Some(format!(
        "stencil: warm heap of {size}, {label}: {} of {} spawns found the zygote unchanged \
         (fork_counts); after a one-page write, {} of {}",
        f.get("clean")?,
        f.get("spawns")?,
        f.get("dirty1_clean")?,
        f.get("dirty1_spawns")?
    ))
}

/// The warm-heap headline: share spawn p50 at the largest heap against the ≤ 3,500-instruction
/// target, flatness over the sizes, copy / share there, the seal's cost per size and the spawn
/// after a one-page write.
fn heap_headline(all: &[Measurement]) -> Vec<String> {
    let find = |mode: &str, kind: &str, size: u64| {
        all.iter()
            .find(|m| model::is_heap(m) && m.mode == mode && m.kind == kind && m.size == size)
    };
    let (share, copy) = (model::HEAP_MODES[0].0, model::HEAP_MODES[1].0);
    let sizes: std::collections::BTreeSet<u64> = all
        .iter()
        .filter(|m| model::is_heap(m) && m.mode == share && m.kind == "spawn_first")
        .map(|m| m.size)
        .collect();
    let (Some(&small), Some(&big)) = (sizes.first(), sizes.last()) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    let Some(s) = find(share, "spawn_first", big) else {
        return lines;
    };
    let big_name = model::size_name(big);
    lines.push(match s.unit {
        Unit::Instructions => format!(
            "warm heap: share spawn p50 at {big_name} of heap: {:.0} guest instructions \
             (target <= 3500{})",
            s.p50,
            if s.p50 <= 3500.0 { ": met" } else { ": missed" }
        ),
        Unit::Ns => format!(
            "warm heap: share spawn p50 at {big_name} of heap: {} (--icount gives the \
             instruction count the <= 3500 target is about)",
            model::human(s.p50, s.unit)
        ),
    });
    if let Some(s0) = find(share, "spawn_first", small).filter(|_| small != big)
        && s0.p50 > 0.0
    {
        lines.push(format!(
            "warm heap: flatness, share spawn p50 at {big_name} / at {} of heap: {:.2}",
            model::size_name(small),
            s.p50 / s0.p50
        ));
    }
    if let Some(c) = find(copy, "spawn_first", big)
        && s.p50 > 0.0
    {
        lines.push(format!(
            "warm heap: copy / share spawn at {big_name} of heap: {} / {} = {}",
            model::human(c.p50, c.unit),
            model::human(s.p50, s.unit),
            report::ratio_text(c.p50 / s.p50)
        ));
    }
    let seals: Vec<String> = sizes
        .iter()
        .filter_map(|&size| {
            let m = find(share, "seal", size)?;
            #[allow(clippy::cast_precision_loss)]
            let per_mib = m.p50 / (size as f64 / f64::from(1u32 << 20));
            Some(format!(
                "{} {} ({} per MiB)",
                model::size_name(size),
                model::human(m.p50, m.unit),
                model::human(per_mib, m.unit)
            ))
        })
        .collect();
    if !seals.is_empty() {
        lines.push(format!(
            "warm heap: seal (Zygote::new, the first snapshot of the filled heap): {}",
            seals.join(", ")
        ));
    }
    if let Some(d) = find(share, "spawn_dirty1", big) {
        lines.push(format!(
            "warm heap: share spawn at {big_name} of heap right after the zygote wrote one \
             page: {} (unchanged zygote: {})",
            model::human(d.p50, d.unit),
            model::human(s.p50, s.unit)
        ));
    }
    lines
}

/// The note for an `INFO reqstate` line (what a request series' state really holds); `None` for
/// a malformed one.
pub(crate) fn request_state_note(system: &str, rest: &str) -> Option<String> {
    let f = model::fields(rest);
    let size = model::size_name(f.get("size")?.parse().ok()?);
    let heap: f64 = f.get("heap_bytes")?.parse().ok()?;
    let pages = f
        .get("pages")
        .map_or_else(String::new, |p| format!(" ({p})"));
    let huge = f
        .get("huge_pct")
        .map_or_else(String::new, |p| format!(", {p}% huge pages"));
    Some(format!(
        "{system}: request state of {size}{pages}: {} records + index = {:.2} MiB of heap, built \
         in {} ms{huge}",
        f.get("records")?,
        heap / f64::from(1u32 << 20),
        f.get("build_ms")?
    ))
}

/// The request headline: per W at the largest state both systems measured, Stencil `share`
/// beside Linux with 4 KiB pages and with THP (ratios of the p50s), and whether `share` leads
/// at every measured size and W (DESIGN.md's target), naming where it does not.
fn request_headline(all: &[Measurement]) -> Vec<String> {
    let share_sizes: std::collections::BTreeSet<u64> = all
        .iter()
        .filter(|m| model::is_request(m) && m.system == "stencil" && m.mode == "share")
        .map(|m| m.size)
        .collect();
    let linux_sizes: std::collections::BTreeSet<u64> = all
        .iter()
        .filter(|m| model::is_request(m) && m.system == "linux")
        .map(|m| m.size)
        .collect();
    let Some(&big) = share_sizes.intersection(&linux_sizes).last() else {
        return Vec::new();
    };
    let find = |system, mode, w, size| report::find_request(all, system, mode, w, size);
    let ratio = |o: Option<&Measurement>, s: &Measurement| {
        o.filter(|o| o.unit == s.unit && s.p50 > 0.0).map_or_else(
            || "-".to_owned(),
            |o| {
                format!(
                    "{} (= {} share)",
                    model::human(o.p50, o.unit),
                    report::ratio_text(o.p50 / s.p50)
                )
            },
        )
    };
    let mut lines = Vec::new();
    for w in reqcore::WRITES {
        let Some(s) = find("stencil", "share", w, big) else {
            continue;
        };
        lines.push(format!(
            "request at {}, W={w}: Stencil share {}; copy {}; Linux fork 4 KiB {}; THP {}",
            model::size_name(big),
            model::human(s.p50, s.unit),
            ratio(find("stencil", "copy", w, big), s),
            ratio(find("linux", "4k", w, big), s),
            ratio(find("linux", "thp", w, big), s)
        ));
    }
    let mut wins = Vec::new();
    let mut compared = 0;
    for &size in share_sizes.intersection(&linux_sizes) {
        for w in reqcore::WRITES {
            let Some(s) = find("stencil", "share", w, size) else {
                continue;
            };
            for (mode, what) in [("4k", "4 KiB"), ("thp", "THP")] {
                if let Some(l) = find("linux", mode, w, size).filter(|l| l.unit == s.unit) {
                    compared += 1;
                    if l.p50 <= s.p50 {
                        wins.push(format!(
                            "{} W={w} {what} ({} vs {})",
                            model::size_name(size),
                            model::human(l.p50, l.unit),
                            model::human(s.p50, s.unit)
                        ));
                    }
                }
            }
        }
    }
    if compared > 0 {
        lines.push(if wins.is_empty() {
            format!(
                "requests: Stencil share below Linux fork (4 KiB and THP) at every measured \
                 size and W ({compared} pairs; target: lead at every W): met"
            )
        } else {
            format!(
                "requests: Stencil share leads in {} of {compared} pairs (target: lead at every \
                 W): missed; Linux is cheaper at {}",
                compared - wins.len(),
                wins.join(", ")
            )
        });
    }
    lines
}

/// The headline ratios DESIGN.md and issue #5 ask for, from one run's measurements.
fn headline(all: &[Measurement]) -> Vec<String> {
    let find = |system: &str, mode: &str, kind: &str, size: u64| {
        all.iter()
            .find(|m| m.system == system && m.mode == mode && m.kind == kind && m.size == size)
            .map(|m| m.p50)
    };
    const GIB: u64 = 1 << 30;
    let mut lines = Vec::new();
    let share = |size| find("stencil", "share", "spawn_first", size);
    if let (Some(small), Some(big)) = (share(2 << 20), share(64 << 30)) {
        lines.push(format!(
            "flatness: share spawn p50 at 64 GiB / at 2 MiB (target <= 1.25): {:.2}",
            big / small
        ));
    }
    let mut ratio = |label: String, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b)
            && a > 0.0
        {
            lines.push(format!("{label}: {:.1}x", b / a));
        }
    };
    ratio(
        "copy / share spawn at 1 GiB (target >= 1000)".to_owned(),
        share(GIB),
        find("stencil", "copy", "spawn_first", GIB),
    );
    ratio(
        "Linux fork->child (4 KiB pages) / share spawn at 1 GiB (target >= 2500)".to_owned(),
        share(GIB),
        find("linux", "4k", "fork_child_first", GIB),
    );
    ratio(
        "Linux fork->child (THP) / share spawn with 2 MiB templates at 1 GiB (target >= 300)"
            .to_owned(),
        find("stencil", "share-2m", "spawn_first", GIB),
        find("linux", "thp", "fork_child_first", GIB),
    );
    ratio(
        "Linux thread creation / share spawn at 1 GiB (target >= 8)".to_owned(),
        share(GIB),
        find("linux", "4k", "thread_first", GIB),
    );
    for (smode, lmode, what, target) in [
        ("share", "4k", "4 KiB pages", "target: ratio <= 1"),
        (
            "share-2m",
            "thp",
            "THP",
            "target: Stencil <= 15 k instructions",
        ),
    ] {
        if let Some((s, l, r)) = report::first_write_ratio(all, smode, lmode, GIB) {
            let unit = all
                .iter()
                .find(|m| m.system == "stencil")
                .map_or(Unit::Ns, |m| m.unit);
            lines.push(format!(
                "first write at 1 GiB, Stencil {smode} / Linux fork child's copy-on-write fault \
                 ({what}) ({target}): {} / {} = {}",
                model::human(s, unit),
                model::human(l, unit),
                report::ratio_text(r)
            ));
        }
    }
    let unit = all.iter().find(|m| m.system == "stencil").map(|m| m.unit);
    match (share(GIB), unit) {
        (Some(s), Some(Unit::Instructions)) => lines.push(format!(
            "share spawn p50 at 1 GiB: {s:.0} guest instructions (target <= 3000)"
        )),
        (Some(s), Some(u)) => lines.push(format!(
            "share spawn p50 at 1 GiB: {} (--icount gives the deterministic instruction count)",
            model::human(s, u)
        )),
        _ => {}
    }
    lines.extend(heap_headline(all));
    lines.extend(request_headline(all));
    lines
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

#[cfg(test)]
mod tests {
    use super::*;

    fn m(system: &str, mode: &str, kind: &str, size: u64, p50: f64) -> Measurement {
        Measurement::for_test(
            (system, mode, kind),
            size,
            (p50, p50),
            10,
            Unit::Instructions,
        )
    }

    #[test]
    fn headline_warm_heap_lines() {
        let (mib, gib) = (1 << 20, 1 << 30);
        let ms = vec![
            m("stencil", "share", "spawn_first", gib, 15_000.0),
            m("stencil", "heap", "spawn_first", mib, 3_600.0),
            m("stencil", "heap", "spawn_first", gib, 3_960.0),
            m("stencil", "heap-copy", "spawn_first", gib, 5_940_000.0),
            m("stencil", "heap", "seal", mib, 57_000.0),
            m("stencil", "heap", "seal", gib, 17_408_000.0),
            m("stencil", "heap", "spawn_dirty1", gib, 120_000.0),
        ];
        let h = heap_headline(&ms);
        assert_eq!(
            h,
            [
                "warm heap: share spawn p50 at 1 GiB of heap: 3960 guest instructions \
                 (target <= 3500: missed)",
                "warm heap: flatness, share spawn p50 at 1 GiB / at 1 MiB of heap: 1.10",
                "warm heap: copy / share spawn at 1 GiB of heap: 5.94 M / 3.96 k = 1500x",
                "warm heap: seal (Zygote::new, the first snapshot of the filled heap): \
                 1 MiB 57.0 k (57.0 k per MiB), 1 GiB 17.4 M (17.0 k per MiB)",
                "warm heap: share spawn at 1 GiB of heap right after the zygote wrote one page: \
                 120 k (unchanged zygote: 3.96 k)",
            ]
        );
        // The whole headline carries them after the template lines; none without the series.
        let all = headline(&ms);
        assert_eq!(all[all.len() - h.len()..], h[..]);
        assert!(heap_headline(&ms[..1]).is_empty());
        let met = [m("stencil", "heap", "spawn_first", mib, 3_000.0)];
        assert_eq!(
            heap_headline(&met),
            [
                "warm heap: share spawn p50 at 1 MiB of heap: 3000 guest instructions \
              (target <= 3500: met)"
            ]
        );
    }

    #[test]
    fn request_headline_lines() {
        let (mib16, gib) = (16 << 20, 1 << 30);
        let mut ms = vec![
            m("stencil", "share", "request_w0", gib, 10_000.0),
            m("stencil", "copy", "request_w0", gib, 20_000_000.0),
            m("linux", "4k", "request_w0", gib, 100_000_000.0),
            m("linux", "thp", "request_w0", gib, 4_000_000.0),
            m("stencil", "share", "request_w0", mib16, 10_000.0),
            m("linux", "4k", "request_w0", mib16, 2_000_000.0),
            m("linux", "thp", "request_w0", mib16, 500_000.0),
        ];
        let h = request_headline(&ms);
        assert_eq!(
            h,
            [
                "request at 1 GiB, W=0: Stencil share 10.0 k; copy 20.0 M (= 2000x share); \
                 Linux fork 4 KiB 100 M (= 10000x share); THP 4.00 M (= 400x share)",
                "requests: Stencil share below Linux fork (4 KiB and THP) at every measured size \
                 and W (4 pairs; target: lead at every W): met",
            ]
        );
        // Where Linux is cheaper, the headline says so.
        ms.push(m("stencil", "share", "request_w256", mib16, 900_000.0));
        ms.push(m("linux", "thp", "request_w256", mib16, 800_000.0));
        let h = request_headline(&ms);
        assert_eq!(
            h.last().unwrap(),
            "requests: Stencil share leads in 4 of 5 pairs (target: lead at every W): missed; \
             Linux is cheaper at 16 MiB W=256 THP (800 k vs 900 k)"
        );
        // Without Linux figures (--only stencil) there is nothing to compare.
        assert!(request_headline(&ms[..2]).is_empty());
        assert_eq!(
            request_state_note(
                "linux",
                "size=16777216 pages=thp records=32768 heap_bytes=16842768 build_ms=12 \
                 huge_pct=100"
            )
            .as_deref(),
            Some(
                "linux: request state of 16 MiB (thp): 32768 records + index = 16.06 MiB of \
                 heap, built in 12 ms, 100% huge pages"
            )
        );
        assert_eq!(request_state_note("stencil", "size=1"), None);
    }

    #[test]
    fn warm_heap_fork_counts_become_notes() {
        assert_eq!(
            heap_forks_note(
                "size=268435456 pages=heap-copy spawns=40 clean=40 dirty1_spawns=20 \
                 dirty1_clean=0"
            )
            .as_deref(),
            Some(
                "stencil: warm heap of 256 MiB, copy: 40 of 40 spawns found the zygote \
                 unchanged (fork_counts); after a one-page write, 0 of 20"
            )
        );
        // The template series' lines stay out of the notes; so do broken ones.
        assert_eq!(
            heap_forks_note("size=2097152 pages=share spawns=401 clean=400"),
            None
        );
        assert_eq!(heap_forks_note("size=1048576 pages=heap spawns=4"), None);
    }

    #[test]
    fn headline_first_write_lines() {
        let gib = 1 << 30;
        let ms = vec![
            m("stencil", "share", "first_write", gib, 27_000.0),
            m("linux", "4k", "fork_first_write", gib, 30_000.0),
            m("stencil", "share-2m", "first_write", gib, 320_000.0),
        ];
        let h = headline(&ms);
        assert_eq!(
            h,
            [
                "first write at 1 GiB, Stencil share / Linux fork child's copy-on-write fault \
                 (4 KiB pages) (target: ratio <= 1): 27.0 k / 30.0 k = 0.90x"
            ],
            "no THP line without Linux's THP figure"
        );
        let mut both = ms;
        both.push(m("linux", "thp", "fork_first_write", gib, 40_000.0));
        let h = headline(&both);
        assert_eq!(h.len(), 2);
        assert!(h[1].contains("Stencil share-2m") && h[1].ends_with("320 k / 40.0 k = 8.00x"));
    }
}
