//! `cargo xtask test`: host tests, then every declared QEMU case, then `N passed, N failed`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::apps::{self, App, TestCase};
use crate::cargo_build::{self, BuildRequest, Selection};
use crate::cmdline::kernel_cmdline;
use crate::proc::{self, ChildGuard, Echo, Ending, Interrupted, Stop};
use crate::qemu::check_cmdline_len;
use crate::qemu::{self, Accel, AccelChoice, Firmware, Vm};

/// Lines of serial output shown for a failed case.
const TAIL_LINES: usize = 40;

#[derive(Debug)]
pub struct Options {
    /// A crate outside the workspace whose declared cases to run (no host tests then).
    pub manifest_path: Option<PathBuf>,
    /// `--features` / `--bin` for the app builds.
    pub select: Selection,
    pub filter: Option<String>,
    pub no_host: bool,
    pub no_qemu: bool,
    pub list: bool,
    pub show_output: bool,
    pub accel: AccelChoice,
    pub firmware: Firmware,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
}

fn say(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

/// Runs the harness; returns the exit code (0 iff nothing failed).
pub fn run(root: &Path, opts: &Options) -> Result<i32> {
    let manifest = match &opts.manifest_path {
        Some(m) => Some(
            m.canonicalize()
                .with_context(|| format!("--manifest-path {}", m.display()))?,
        ),
        None => None,
    };
    let meta = apps::load(manifest.as_deref().unwrap_or(&root.join("Cargo.toml")))?;
    let apps = apps::apps(&meta)?;
    // Cargo runs in the outside crate's directory (its toolchain file and config apply).
    let build_dir = match &manifest {
        Some(m) => m.parent().map(Path::to_path_buf).unwrap_or_default(),
        None => root.to_path_buf(),
    };
    let place = Place {
        root,
        dir: &build_dir,
        manifest: manifest.as_deref(),
    };
    let cases: Vec<(&App, &TestCase)> = apps
        .iter()
        .flat_map(|a| a.cases.iter().map(move |c| (a, c)))
        .filter(|(_, c)| opts.filter.as_deref().is_none_or(|f| c.name.contains(f)))
        .collect();
    if opts.list {
        for (app, case) in &cases {
            say(&format!(
                "{} (app {}, {})",
                case.name, app.name, case.machine
            ));
        }
        return Ok(0);
    }
    let mut totals = Totals::default();
    if manifest.is_some() {
        if !opts.no_host {
            say("xtask: host tests: none for --manifest-path (its packages build for the guest)");
        }
    } else if !opts.no_host {
        host_tests(root, &apps, &mut totals)?;
    }
    if !opts.no_qemu {
        qemu_cases(&place, &cases, opts, &mut totals)?;
    }
    say(&format!(
        "{} passed, {} failed",
        totals.passed, totals.failed
    ));
    Ok(if totals.failed == 0 { 0 } else { 1 })
}

/// Reads `N passed` and `M failed` from a libtest `test result:` line.
pub fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let (_, rest) = line.split_once("test result:")?;
    let (mut passed, mut failed) = (None, None);
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        if let [.., n, word] = words.as_slice() {
            let Ok(n) = n.parse::<u64>() else { continue };
            match *word {
                "passed" => passed = Some(n),
                "failed" => failed = Some(n),
                _ => {}
            }
        }
    }
    Some((passed?, failed?))
}

fn host_tests(root: &Path, apps: &[App], totals: &mut Totals) -> Result<()> {
    let mut cmd = Command::new(cargo_build::cargo());
    cmd.current_dir(root)
        .args(["test", "--workspace", "--no-fail-fast"]);
    for app in apps {
        cmd.args(["--exclude", &app.name]);
    }
    say(&format!(
        "xtask: host tests: cargo test --workspace --no-fail-fast{}",
        apps.iter()
            .map(|a| format!(" --exclude {}", a.name))
            .collect::<String>()
    ));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut guard =
        ChildGuard::spawn(&mut cmd, Stop::Terminate).context("cannot run cargo test")?;
    let out = guard.child_mut().stdout.take().expect("piped");
    let counter = proc::lines(
        out,
        Echo::Stdout,
        Totals::default(),
        |t: &mut Totals, line| {
            if let Some((p, f)) = parse_test_result(line) {
                t.passed += p;
                t.failed += f;
            }
        },
    );
    let ending = guard.wait(None)?;
    drop(guard);
    let mut host = counter.join().unwrap_or_default();
    match ending {
        Ending::Interrupted(sig) => return Err(Interrupted(sig).into()),
        Ending::TimedOut => unreachable!("no deadline"),
        Ending::Exited(status) => {
            if !status.success() && host.failed == 0 {
                say(&format!(
                    "xtask: host tests: cargo test failed ({status}) with no failing test \
                     reported (a build error?): counted as 1 failure"
                ));
                host.failed = 1;
            }
        }
    }
    say(&format!(
        "xtask: host tests: {} passed, {} failed",
        host.passed, host.failed
    ));
    totals.passed += host.passed;
    totals.failed += host.failed;
    Ok(())
}

/// Where the apps are built and their sources live.
struct Place<'a> {
    /// The Stencil checkout (file names in symbolized reports are shown relative to it).
    root: &'a Path,
    /// The directory cargo runs in.
    dir: &'a Path,
    /// `--manifest-path`, for a crate outside the workspace.
    manifest: Option<&'a Path>,
}

fn qemu_cases(
    place: &Place<'_>,
    cases: &[(&App, &TestCase)],
    opts: &Options,
    totals: &mut Totals,
) -> Result<()> {
    if cases.is_empty() {
        match &opts.filter {
            Some(f) => say(&format!("xtask: no QEMU test case matches `{f}`")),
            None => say("xtask: no QEMU test cases are declared"),
        }
        return Ok(());
    }
    let qemu_path = match qemu::find_qemu() {
        Ok(p) => p,
        Err(e) => {
            say(&format!("xtask: error: {e:#}"));
            say(&format!(
                "xtask: {} QEMU cases not run: counted as failed",
                cases.len()
            ));
            totals.failed += cases.len() as u64;
            return Ok(());
        }
    };
    let (accel, notice) = qemu::detect_accel(opts.accel)?;
    if let Some(n) = notice {
        eprintln!("{n}");
    }

    // One cargo invocation per profile (usually just one) for all the apps with cases.
    let mut elfs: BTreeMap<(bool, String), Result<std::path::PathBuf, String>> = BTreeMap::new();
    for release in [false, true] {
        let mut wanted: Vec<(String, String)> = Vec::new();
        for (app, case) in cases {
            if case.release == release && !wanted.iter().any(|(n, _)| *n == app.name) {
                wanted.push((app.name.clone(), app.id.clone()));
            }
        }
        if wanted.is_empty() {
            continue;
        }
        let names: Vec<String> = wanted.iter().map(|(n, _)| n.clone()).collect();
        let profile = if release { "release" } else { "dev" };
        say(&format!(
            "xtask: building {} app(s) ({profile}): {}",
            names.len(),
            names.join(" ")
        ));
        let req = BuildRequest {
            dir: place.dir,
            manifest_path: place.manifest,
            packages: &names,
            release,
        };
        let sel = &opts.select;
        let built = if sel.bin.is_some() && names.len() != 1 {
            Err(anyhow::anyhow!(
                "--bin picks a binary of one app, but cases of {} apps are selected ({}); \
                 narrow them with FILTER",
                names.len(),
                names.join(", ")
            ))
        } else {
            cargo_build::build_selected(&req, sel).and_then(|arts| {
                cargo_build::executables_by_package(&arts, &wanted, sel.bin.as_deref())
            })
        };
        match built {
            Ok(map) => {
                for (name, elf) in map {
                    elfs.insert((release, name), Ok(elf));
                }
            }
            Err(e) if e.is::<Interrupted>() => return Err(e),
            Err(e) => {
                say(&format!("xtask: build failed: {e:#}"));
                for name in names {
                    elfs.insert((release, name), Err(format!("build failed: {e:#}")));
                }
            }
        }
    }

    say(&format!(
        "xtask: running {} QEMU case(s) with {accel}",
        cases.len()
    ));
    let env = CaseEnv {
        qemu: &qemu_path,
        accel,
        firmware: opts.firmware,
        show_output: opts.show_output,
        root: place.root,
    };
    let runs: Vec<(&App, &TestCase, Result<PathBuf, String>)> = cases
        .iter()
        .map(
            |&(app, case)| match elfs.get(&(case.release, app.name.clone())) {
                Some(elf) => (app, case, elf.clone()),
                None => unreachable!("every case's app was built or failed"),
            },
        )
        .collect();
    run_cases(&env, &runs, totals, &mut std::io::stdout())
}

/// What every QEMU case of a run shares.
struct CaseEnv<'a> {
    qemu: &'a Path,
    accel: Accel,
    firmware: Firmware,
    show_output: bool,
    /// The Stencil checkout (for symbolized reports).
    root: &'a Path,
}

/// Boots the cases one after another (each with its ELF, or why it has none) and counts them;
/// writes `test NAME (...) ... ok` or `FAILED` with the reasons for each to `out`.
fn run_cases(
    env: &CaseEnv<'_>,
    runs: &[(&App, &TestCase, Result<PathBuf, String>)],
    totals: &mut Totals,
    out: &mut impl Write,
) -> Result<()> {
    for (app, case, elf) in runs {
        let label = format!("test {} ({}, {}) ...", case.name, app.name, case.machine);
        let elf = match elf {
            Ok(elf) => elf.clone(),
            Err(why) => {
                let _ = writeln!(out, "{label} FAILED (not run)\n    {why}");
                totals.failed += 1;
                continue;
            }
        };
        // With live output the label gets a line of its own above the guest's.
        let _ = if env.show_output {
            writeln!(out, "{label}")
        } else {
            write!(out, "{label} ")
        };
        let _ = out.flush();
        let outcome = run_case(env, case, elf)?;
        if outcome.passed {
            totals.passed += 1;
        } else {
            totals.failed += 1;
        }
        let _ = writeln!(out, "{}", outcome.report);
        let _ = out.flush();
    }
    Ok(())
}

/// How one case ended: the rest of its `test ...` line (`ok (1.23 s)`, or `FAILED` and the report).
#[derive(Debug)]
struct Outcome {
    passed: bool,
    report: String,
}

/// The VM of one case, checked as far as it can be before booting (its kernel command line fits
/// the loader, its firmware exists).
fn case_vm(env: &CaseEnv<'_>, case: &TestCase, elf: PathBuf) -> Result<Vm> {
    let mut vm = Vm::new(elf, case.machine, env.accel);
    vm.qemu = env.qemu.to_path_buf();
    vm.mem = case.mem.qemu_arg();
    vm.smp = case.smp;
    vm.cmdline = kernel_cmdline(&case.cmdline, &case.args)?;
    vm.set_firmware(env.firmware)?;
    check_cmdline_len(&vm.cmdline, vm.machine, vm.bios.is_some())?;
    Ok(vm)
}

/// The report of a case that could not be started.
fn not_run(why: &anyhow::Error, vm: Option<&Vm>) -> Outcome {
    let mut report = format!("FAILED (not run)\n    {why:#}");
    if let Some(vm) = vm {
        report.push_str(&format!("\n    command: {}", vm.shell_line()));
    }
    Outcome {
        passed: false,
        report,
    }
}

/// Boots one case and judges it. A case that cannot be started (its command line too long, its
/// firmware missing, QEMU failing to start) fails with the reason; only an interruption (Ctrl-C)
/// is an error. The time reported is the whole case: boot, HTTP script and shutdown.
fn run_case(env: &CaseEnv<'_>, case: &TestCase, elf: PathBuf) -> Result<Outcome> {
    let start = Instant::now();
    let mut vm = match case_vm(env, case, elf) {
        Ok(vm) => vm,
        Err(e) => return Ok(not_run(&e, None)),
    };
    // A case with an HTTP script: forward a free host port and run the script from a
    // thread while the guest runs (it ends by telling the guest to exit).
    let vm_done = Arc::new(AtomicBool::new(false));
    let script = match &case.http {
        Some(check) => {
            let port = match crate::http::free_port() {
                Ok(p) => p,
                Err(e) => return Ok(not_run(&e, Some(&vm))),
            };
            vm.ports = vec![qemu::PortForward {
                host: port,
                guest: check.guest_port,
            }];
            let check = check.clone();
            let ready = Duration::from_secs(case.timeout);
            let stop = vm_done.clone();
            Some(std::thread::spawn(move || {
                crate::http::run_check(&check, port, ready, &stop)
            }))
        }
        None => None,
    };
    let res = qemu::run(
        &vm,
        Some(Duration::from_secs(case.timeout)),
        env.show_output,
    );
    vm_done.store(true, Ordering::Relaxed);
    let http_fails = script
        .map(|t| {
            t.join()
                .unwrap_or_else(|_| vec!["http script panicked".to_owned()])
        })
        .unwrap_or_default();
    let secs = start.elapsed().as_secs_f64();
    let res = match res {
        Ok(res) => res,
        Err(e) if e.is::<Interrupted>() => return Err(e),
        // The script's complaints are about a guest that never ran: the reason is this.
        Err(e) => return Ok(not_run(&e, Some(&vm))),
    };
    if let Some(sig) = res.interrupted {
        say("interrupted");
        return Err(Interrupted(sig).into());
    }
    let serial = String::from_utf8_lossy(&res.serial);
    let mut reasons = judge(case, res.code, &serial);
    reasons.extend(http_fails);
    if reasons.is_empty() {
        return Ok(Outcome {
            passed: true,
            report: format!("ok ({secs:.2} s)"),
        });
    }
    let mut report = format!("FAILED ({secs:.2} s)\n");
    for r in &reasons {
        report.push_str(&format!("    {r}\n"));
    }
    let stderr = String::from_utf8_lossy(&res.stderr);
    if !stderr.trim().is_empty() {
        report.push_str("    --- QEMU stderr ---\n");
        for l in tail(&stderr, 10) {
            report.push_str(&format!("    {l}\n"));
        }
    }
    if !env.show_output {
        report.push_str(&format!(
            "    --- last {TAIL_LINES} lines of serial output ---\n"
        ));
        for l in tail(&serial, TAIL_LINES) {
            report.push_str(&format!("    | {l}\n"));
        }
    }
    if let Some(sym) = crate::symbolize::report_for_elf(&serial, &vm.kernel, env.root) {
        for l in sym.lines() {
            report.push_str(&format!("    {l}\n"));
        }
    }
    report.push_str(&format!("    command: {}", vm.shell_line()));
    Ok(Outcome {
        passed: false,
        report,
    })
}

fn tail(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Why a case failed (empty: it passed).
pub fn judge(case: &TestCase, code: i32, serial: &str) -> Vec<String> {
    let mut reasons = Vec::new();
    if code != case.exit {
        reasons.push(format!(
            "exit code: expected {} ({}), got {} ({})",
            case.exit,
            qemu::describe(case.exit),
            code,
            qemu::describe(code)
        ));
        if code == qemu::EXIT_TIMEOUT {
            reasons.push(format!("the guest did not exit within {} s", case.timeout));
        }
    }
    let mut from = 0;
    let mut previous: Option<&str> = None;
    for want in &case.expect {
        match serial[from..].find(want.as_str()) {
            Some(at) => {
                from += at + want.len();
                previous = Some(want);
            }
            None => {
                let place = match previous {
                    Some(p) => format!(" after `{p}`"),
                    None => String::new(),
                };
                let anywhere = if previous.is_some() && serial.contains(want.as_str()) {
                    " (it appears earlier: wrong order)"
                } else {
                    ""
                };
                reasons.push(format!("serial output lacks `{want}`{place}{anywhere}"));
                break;
            }
        }
    }
    for bad in &case.reject {
        if serial.contains(bad.as_str()) {
            reasons.push(format!("serial output contains rejected `{bad}`"));
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_result_lines() {
        let ok = "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; \
                  finished in 0.01s";
        assert_eq!(parse_test_result(ok), Some((12, 0)));
        let bad = "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(parse_test_result(bad), Some((3, 2)));
        assert_eq!(parse_test_result("running 3 tests"), None);
        assert_eq!(parse_test_result("test result: garbage"), None);
    }

    fn case(exit: i32, expect: &[&str], reject: &[&str]) -> TestCase {
        TestCase {
            name: "c".to_owned(),
            machine: Default::default(),
            args: vec![],
            cmdline: vec![],
            exit,
            expect: expect.iter().map(|s| (*s).to_owned()).collect(),
            reject: reject.iter().map(|s| (*s).to_owned()).collect(),
            timeout: 5,
            mem: "256M".parse().unwrap(),
            smp: 1,
            release: false,
            http: None,
        }
    }

    #[test]
    fn judging() {
        let out = "boot\nHello from Stencil\narg[1] = a b\nbye\n";
        assert!(judge(&case(0, &["Hello", "arg[1] = a b"], &["panicked"]), 0, out).is_empty());
        let r = judge(&case(0, &["arg[1]", "Hello"], &[]), 0, out);
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("wrong order"), "{r:?}");
        let r = judge(&case(0, &["missing"], &["bye"]), 100, out);
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(r[0].contains("got 100 (guest panicked)"));
        let r = judge(&case(0, &[], &[]), qemu::EXIT_TIMEOUT, "");
        assert!(r[1].contains("within 5 s"));
        assert!(judge(&case(3, &[], &[]), 3, "").is_empty());
    }

    /// A case whose kernel command line is longer than its loader carries cannot start: it fails
    /// with that reason (without booting anything) and the cases after it still run.
    #[test]
    fn a_case_that_cannot_start_fails_alone() {
        let mut long = case(0, &[], &[]);
        long.name = "too-long".to_owned();
        long.args = vec!["x".repeat(200_000)];
        let mut long_http = long.clone();
        long_http.name = "too-long-http".to_owned();
        long_http.timeout = 60;
        long_http.http = Some(serde_json::from_str("{}").unwrap());
        let app = App {
            name: "app".to_owned(),
            id: "app 0.1.0".to_owned(),
            cases: vec![],
        };
        let elf = || Ok(PathBuf::from("/nonexistent/app"));
        let runs = [
            (&app, &long, elf()),
            (&app, &long_http, elf()),
            (&app, &long, Err("build failed: no".to_owned())),
        ];
        let env = CaseEnv {
            qemu: Path::new("/nonexistent/qemu-system-x86_64"),
            accel: Accel::Tcg,
            firmware: Firmware::Auto,
            show_output: false,
            root: Path::new("/nonexistent"),
        };
        let mut totals = Totals::default();
        let mut out = Vec::new();
        run_cases(&env, &runs, &mut totals, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        let firsts: Vec<&str> = out.lines().filter(|l| l.starts_with("test ")).collect();
        assert_eq!(
            firsts,
            [
                "test too-long (app, microvm) ... FAILED (not run)",
                "test too-long-http (app, microvm) ... FAILED (not run)",
                "test too-long (app, microvm) ... FAILED (not run)",
            ],
            "{out}"
        );
        assert!(out.contains("    build failed: no"), "{out}");
        assert_eq!(
            totals,
            Totals {
                passed: 0,
                failed: 3
            }
        );
        for c in [&long, &long_http] {
            let out = run_case(&env, c, PathBuf::from("/nonexistent/app")).unwrap();
            assert!(!out.passed);
            assert!(out.report.starts_with("FAILED (not run"), "{}", out.report);
            let len = kernel_cmdline(&c.cmdline, &c.args).unwrap().len();
            let why = format!("the kernel command line is {len} bytes");
            assert!(out.report.contains(&why), "{}", out.report);
            assert!(out.report.contains("at most 131071"), "{}", out.report);
        }
    }

    #[test]
    fn tails() {
        assert_eq!(tail("a\nb\nc\n", 2), ["b", "c"]);
        assert_eq!(tail("a", 5), ["a"]);
        assert!(tail("", 5).is_empty());
    }
}
