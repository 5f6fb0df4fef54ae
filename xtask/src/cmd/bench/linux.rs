//! The Linux peer: the `linux-peer` program (bench/linux-peer) built as a static binary, run as
//! `/init` of a Debian kernel booted by the same QEMU command builder as Stencil's apps, and run
//! natively on the host for context.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cpio::{self, Entry};
use super::model::{self, Measurement, Unit};
use crate::cargo_build::{self, BuildRequest};
use crate::proc::{self, ChildGuard, Echo, Ending, Stop};
use crate::qemu::{self, Accel, EXIT_CRASH, EXIT_TIMEOUT, Firmware, Machine, Vm};

/// The peer program's package (and binary) name.
const PEER: &str = "linux-peer";
/// Host target of the static build (glibc with `+crt-static`).
const PEER_TARGET: &str = "x86_64-unknown-linux-gnu";
const PEER_RUSTFLAGS_VAR: &str = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS";
const PEER_RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// Debian's kernel meta package; it depends on the versioned image package.
const META_PACKAGE: &str = "linux-image-amd64";

/// Guest RAM of the Linux peer: room for the 1 GiB region, its page tables and a forked child.
pub const GUEST_MEM: &str = "3G";
/// Kernel options. `transparent_hugepage=always` is Debian's built-in default
/// (CONFIG_TRANSPARENT_HUGEPAGE_ALWAYS=y), spelled out; the peer asks for 4 KiB pages or huge
/// pages per region with madvise either way. `panic=-1`: if /init dies, reboot at once, which
/// `-no-reboot` turns into QEMU exiting (no silent hang).
pub const GUEST_CMDLINE: &str = "console=ttyS0 quiet panic=-1 transparent_hugepage=always";

/// What is unpacked from the kernel package for the NIC (GNU tar wildcards; used by
/// `linux_net`): every virtio transport and core module, virtio-net and the failover modules it
/// depends on.
pub const MODULE_PATTERNS: [&str; 4] = [
    "./lib/modules/*/kernel/drivers/virtio/*.ko",
    "./lib/modules/*/kernel/drivers/net/virtio_net.ko",
    "./lib/modules/*/kernel/drivers/net/net_failover.ko",
    "./lib/modules/*/kernel/net/core/failover.ko",
];

/// Sizes the peer is asked to measure (all fit in the 3 GiB guest).
pub const SIZES: &str = "2M,16M,128M,1G";

/// Builds the peer as a static executable and returns its path.
pub fn build_peer(root: &Path) -> Result<PathBuf> {
    build_static(root, PEER)
}

/// Builds the workspace package `package` (whose binary has its name) as a static executable
/// for the host and returns its path.
pub fn build_static(root: &Path, package: &str) -> Result<PathBuf> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        bail!("the Linux peer is built for {PEER_TARGET}: run the bench on an x86_64 Linux host");
    }
    let packages = [package.to_owned()];
    let req = BuildRequest {
        dir: root,
        manifest_path: None,
        packages: &packages,
        release: true,
    };
    let artifacts = cargo_build::build_for(&req, PEER_TARGET, PEER_RUSTFLAGS_VAR, PEER_RUSTFLAGS)
        .with_context(|| format!("building {package} (static, glibc)"))?;
    artifacts
        .into_iter()
        .find(|a| a.target_name == package)
        .map(|a| a.executable)
        .with_context(|| format!("cargo built no {package} executable"))
}

/// The versioned image package named by `apt-cache depends linux-image-amd64`.
pub fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(|d| d.trim().trim_start_matches('<').trim_end_matches('>'))
        .find(|d| d.starts_with("linux-image-") && !d.contains(' '))
        .map(str::to_owned)
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(tool).is_file())
}

/// The newest `boot/vmlinuz-*` under `dir`.
fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join("boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Debian's kernel image (a bzImage), fetched once with apt-get into `dir` (target/linux-peer).
///
/// Nothing is installed: `apt-get download` fetches the .deb into `dir/download` and only its
/// `./boot` directory is unpacked (`dpkg-deb --fsys-tarfile | tar`; the modules, ~400 MB, are
/// not needed here: the 8250 console, gzip initramfs support and devtmpfs are built in), with
/// the few network modules httpbench's Linux guest loads ([`super::linux_net`]). A
/// `boot/vmlinuz-*` already in `dir` is used as is, so a non-Debian host can drop one there.
pub fn kernel(dir: &Path) -> Result<PathBuf> {
    if let Some(k) = find_vmlinuz(dir) {
        println!(
            "linux: kernel {} (cached; delete {} to fetch it again)",
            k.display(),
            dir.display()
        );
        return Ok(k);
    }
    for tool in ["apt-cache", "apt-get", "dpkg-deb", "tar"] {
        if !on_path(tool) {
            bail!(
                "the Linux peer needs Debian's kernel, fetched with apt ({tool} is not on PATH). \
                 On a non-Debian host, put a bzImage at {}/boot/vmlinuz-<version> (with an 8250 \
                 serial console, gzip initramfs and devtmpfs built in), or use --only native",
                dir.display()
            );
        }
    }
    let depends = run_tool(
        Command::new("apt-cache").args(["depends", META_PACKAGE]),
        "apt-cache depends linux-image-amd64",
    )
    .context("is the package index present? try: sudo apt-get update")?;
    let package = parse_depends(&depends).with_context(|| {
        format!("`apt-cache depends {META_PACKAGE}` names no linux-image-* package:\n{depends}")
    })?;
    println!(
        "linux: fetching Debian's kernel package {package} with `apt-get download` (~70 MB, \
         once; cached in {})",
        dir.display()
    );
    let deb = download(dir, &package)?;
    // The NIC modules of httpbench's Linux guest come from the same package (a few files).
    let mut patterns = vec!["./boot/*"];
    patterns.extend(MODULE_PATTERNS);
    unpack(&deb, dir, &patterns)?;
    let _ = std::fs::remove_file(&deb);
    find_vmlinuz(dir).with_context(|| format!("{} holds no ./boot/vmlinuz-*", deb.display()))
}

/// Fetches the .deb of `package` with `apt-get download` into `dir/download` (nothing is
/// installed) and returns its path.
pub fn download(dir: &Path, package: &str) -> Result<PathBuf> {
    let download = dir.join("download");
    std::fs::create_dir_all(&download)
        .with_context(|| format!("cannot create {}", download.display()))?;
    run_tool(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&download),
        &format!("apt-get download {package}"),
    )?;
    std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|x| x == "deb")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(package))
        })
        .with_context(|| format!("apt-get download left no {package}*.deb"))
}

/// Unpacks the members of `deb` that match `patterns` (GNU tar wildcards) into `dir`
/// (`dpkg-deb --fsys-tarfile | tar`); a pattern that matches nothing is an error.
pub fn unpack(deb: &Path, dir: &Path, patterns: &[&str]) -> Result<()> {
    println!(
        "linux: unpacking {} of {}",
        patterns.join(" "),
        deb.display()
    );
    let mut dpkg = Command::new("dpkg-deb");
    dpkg.arg("--fsys-tarfile")
        .arg(deb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut dpkg = ChildGuard::spawn(&mut dpkg, Stop::Kill).context("cannot run dpkg-deb")?;
    let tar_in = dpkg.child_mut().stdout.take().expect("piped");
    // `-C` goes before the member patterns: GNU tar applies it to the names after it.
    let tar_ok = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-x", "--wildcards"])
        .args(patterns)
        .stdin(tar_in)
        .status()
        .context("cannot run tar")?
        .success();
    let dpkg_ok = matches!(dpkg.wait(None)?, Ending::Exited(s) if s.success());
    if !(tar_ok && dpkg_ok) {
        bail!(
            "unpacking {} from {} failed",
            patterns.join(" "),
            deb.display()
        );
    }
    Ok(())
}

/// Writes the initramfs (`/init` = the peer, `/dev/console`) to `dir/initramfs.cpio.gz`.
pub fn initramfs(dir: &Path, peer: &Path) -> Result<PathBuf> {
    let init = std::fs::read(peer).with_context(|| format!("cannot read {}", peer.display()))?;
    let entries = [
        Entry::dir("dev"),
        // The kernel opens /dev/console for init's stdin/stdout/stderr before devtmpfs exists.
        Entry::char_dev("dev/console", 0o600, 5, 1),
        Entry::dir("proc"),
        Entry::dir("sys"),
        Entry::file("init", 0o755, init),
    ];
    let path = dir.join("initramfs.cpio.gz");
    let bytes = cpio::initramfs(&entries).context("compressing the initramfs")?;
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// What one run of the peer produced.
#[derive(Debug, Default)]
pub struct PeerRun {
    pub results: Vec<Measurement>,
    /// Problems and context for the final report (timeouts, skipped sizes, errors).
    pub notes: Vec<String>,
    /// The run ended with `DONE`.
    pub complete: bool,
    pub elapsed: Duration,
    /// The peer's `INFO kernel=...` line, for the table heading.
    pub info: Option<String>,
}

/// Live progress: a timestamped line per `PROGRESS`, `INFO`, `SKIP` or `ERROR` line.
fn progress(label: &'static str, start: Instant) -> impl FnMut(&str) + Send + 'static {
    move |line: &str| {
        let line = line.trim();
        let t = start.elapsed().as_secs_f64();
        let msg = if let Some(rest) = line.strip_prefix("PROGRESS ") {
            let f = model::fields(rest);
            let what = rest.split_whitespace().next().unwrap_or("?");
            let size = f
                .get("size")
                .and_then(|s| s.parse().ok())
                .map_or_else(|| "?".to_owned(), model::size_name);
            let pages = f.get("pages").unwrap_or(&"?");
            let writes = f
                .get("writes")
                .map_or_else(String::new, |w| format!(" W={w}"));
            match f.get("n") {
                Some(n) => format!("{what} {size} {pages}{writes} (n={n})"),
                None => format!("{what} {size} {pages}{writes}"),
            }
        } else if let Some(rest) = line.strip_prefix("INFO kernel=") {
            format!("running: kernel {rest}")
        } else if line.starts_with("SKIP ")
            || line.starts_with("ERROR ")
            || line.starts_with("WARN ")
        {
            line.to_owned()
        } else {
            return;
        };
        println!("  [{t:6.1} s] {label}: {msg}");
    }
}

/// Reads the peer's output lines into results and notes.
fn collect(lines: &str, system: &str, unit: Unit, run: &mut PeerRun) {
    for line in lines.lines().map(str::trim) {
        if line.starts_with("RESULT ") {
            match model::parse_result(line, system, unit) {
                Some(m) => run.results.push(m),
                None => run.notes.push(format!("{system}: malformed line: {line}")),
            }
        } else if let Some(rest) = line.strip_prefix("SKIP ") {
            let f = model::fields(rest);
            let reason = f.get("reason").unwrap_or(&"?");
            let size = f
                .get("size")
                .and_then(|s| s.parse().ok())
                .map_or_else(|| "?".to_owned(), model::size_name);
            let note = format!("{system}: {size} not measured: {reason}");
            if !run.notes.contains(&note) {
                run.notes.push(note);
            }
        } else if let Some(rest) = line.strip_prefix("WARN ") {
            // The region was not backed as asked (e.g. THP without huge pages): its rows
            // measure something else, so the report says so.
            let f = model::fields(rest);
            let size = f
                .get("size")
                .and_then(|s| s.parse().ok())
                .map_or_else(|| "?".to_owned(), model::size_name);
            run.notes.push(format!(
                "{system}: {size} {}: {}",
                f.get("pages").unwrap_or(&"?"),
                f.get("reason").unwrap_or(&rest)
            ));
        } else if let Some(e) = line.strip_prefix("ERROR ") {
            run.notes.push(format!("{system}: the peer failed: {e}"));
        } else if line == "DONE" {
            run.complete = true;
        } else if line.starts_with("INFO kernel=") {
            run.info = Some(line["INFO ".len()..].to_owned());
        } else if let Some(note) = line
            .strip_prefix("INFO reqstate ")
            .and_then(|rest| super::request_state_note(system, rest))
        {
            run.notes.push(note);
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &lines[lines.len().saturating_sub(n)..] {
        let _ = writeln!(out, "    | {l}");
    }
    out
}

/// Everything about the guest that the report should name.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub accel: Accel,
    pub icount: bool,
    pub firmware: Firmware,
    pub quick: bool,
    /// Extra kernel options (`--linux-append`).
    pub append: String,
    pub timeout: Duration,
}

impl Guest {
    pub fn vm(&self) -> Result<Vm> {
        let mut vm = Vm::new(self.kernel.clone(), Machine::Q35, self.accel);
        vm.mem = GUEST_MEM.to_owned();
        vm.initrd = Some(self.initrd.clone());
        vm.icount = self.icount;
        let mut cmdline = GUEST_CMDLINE.to_owned();
        if !self.append.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.append.trim());
        }
        cmdline.push_str(" -- --sizes ");
        cmdline.push_str(SIZES);
        if self.quick {
            cmdline.push_str(" --quick");
        }
        vm.cmdline = cmdline;
        vm.set_firmware(self.firmware)?;
        Ok(vm)
    }
}

/// Boots the Linux guest with the peer as /init and collects its results. A hang or crash is a
/// note, not an error: the results so far are kept.
pub fn run_guest(g: &Guest) -> Result<PeerRun> {
    let mut vm = g.vm()?;
    vm.qemu = qemu::find_qemu()?;
    println!("linux: {}", vm.shell_line());
    let start = Instant::now();
    let res = qemu::run_with_lines(&vm, Some(g.timeout), progress("linux", start))?;
    if let Some(sig) = res.interrupted {
        return Err(crate::proc::Interrupted(sig).into());
    }
    let serial = String::from_utf8_lossy(&res.serial).into_owned();
    let unit = if g.icount {
        Unit::Instructions
    } else {
        Unit::Ns
    };
    let mut run = PeerRun {
        elapsed: res.elapsed,
        ..PeerRun::default()
    };
    collect(&serial, "linux", unit, &mut run);
    // reboot(RB_POWER_OFF) makes QEMU exit 0, which the Stencil exit-code scheme calls a crash.
    let powered_off = res.code == EXIT_CRASH;
    if res.code == EXIT_TIMEOUT {
        run.notes.push(format!(
            "linux: the guest did not finish within {} s (hung or too slow) and was killed; \
             {} results kept. Last serial lines:\n{}",
            g.timeout.as_secs(),
            run.results.len(),
            tail(&serial, 10)
        ));
    } else if !(run.complete && powered_off) {
        let stderr = String::from_utf8_lossy(&res.stderr);
        // QEMU exits 0 on power-off, on reboot and (panic=-1) after a kernel panic.
        let how = if powered_off {
            "powered off, rebooted or panicked before DONE".to_owned()
        } else {
            format!("QEMU: {}", res.summary.as_deref().unwrap_or("exited"))
        };
        run.notes.push(format!(
            "linux: the guest ended early ({how}); {} results kept. Last serial lines:\n{}{}",
            run.results.len(),
            tail(&serial, 20),
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!("    QEMU stderr: {}", stderr.trim())
            }
        ));
    }
    Ok(run)
}

/// Runs the peer natively (not pid 1) under a timeout.
pub fn run_native(peer: &Path, quick: bool, timeout: Duration) -> Result<PeerRun> {
    let mut cmd = Command::new(peer);
    cmd.args(["--sizes", SIZES]);
    if quick {
        cmd.arg("--quick");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    proc::isolate(&mut cmd);
    let start = Instant::now();
    let mut guard = ChildGuard::spawn(&mut cmd, Stop::Kill)
        .with_context(|| format!("cannot run {}", peer.display()))?;
    let out = guard.child_mut().stdout.take().expect("piped");
    let err = guard.child_mut().stderr.take().expect("piped");
    let kept = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&kept);
    let mut show = progress("native", start);
    let reader = proc::lines(out, Echo::Nowhere, (), move |(), line| {
        show(line);
        if let Ok(mut k) = sink.lock() {
            k.push_str(line);
            k.push('\n');
        }
    });
    let stderr = proc::tee(err, Echo::Stderr);
    let ending = guard.wait(Some(start + timeout))?;
    drop(guard);
    let _ = reader.join();
    let _ = stderr.join();
    let text = kept.lock().map(|k| k.clone()).unwrap_or_default();
    let mut run = PeerRun {
        elapsed: start.elapsed(),
        ..PeerRun::default()
    };
    collect(&text, "native", Unit::Ns, &mut run);
    match ending {
        Ending::Interrupted(sig) => return Err(crate::proc::Interrupted(sig).into()),
        Ending::TimedOut => run.notes.push(format!(
            "native: did not finish within {} s and was killed; {} results kept",
            timeout.as_secs(),
            run.results.len()
        )),
        Ending::Exited(s) if !s.success() || !run.complete => run.notes.push(format!(
            "native: the peer ended with {s}; {} results kept. Last lines:\n{}",
            run.results.len(),
            tail(&text, 10)
        )),
        Ending::Exited(_) => {}
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_of_the_meta_package() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let odd = "linux-image-amd64\n  PreDepends: foo\n |Depends: <linux-image-6.1.0-9-amd64>\n";
        assert_eq!(
            parse_depends(odd).as_deref(),
            Some("linux-image-6.1.0-9-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
        assert_eq!(parse_depends("  Depends: initramfs-tools\n"), None);
    }

    #[test]
    fn collecting_output() {
        let out = "INFO kernel=6.1.0-56-amd64 pid1=true ram=3\n\
                   PROGRESS fork size=2097152 pages=4k n=200\n\
                   RESULT kind=fork_parent size=2097152 pages=4k n=200 p50_ns=10 p99_ns=20\n\
                   RESULT kind=broken\n\
                   SKIP size=4294967296 pages=4k reason=\"4 GiB does not fit in 2 GiB of RAM\"\n\
                   WARN size=16777216 pages=thp reason=\"huge pages back 62% of the 16 MiB region\"\n\
                   RESULT kind=fork_first_write size=2097152 pages=thp n=40 p50_ns=30 p99_ns=40 \
                   huge_pct=100 huge_pct_after=100\n\
                   DONE\n";
        let mut run = PeerRun::default();
        collect(out, "linux", Unit::Instructions, &mut run);
        assert!(run.complete);
        assert_eq!(run.results.len(), 2);
        assert_eq!(run.results[0].unit, Unit::Instructions);
        assert_eq!(run.results[1].kind, "fork_first_write");
        assert_eq!(run.results[1].mode, "thp");
        assert_eq!(run.results[1].p50, 30.0);
        assert_eq!(run.notes.len(), 3, "{:?}", run.notes);
        assert!(run.notes[1].contains("4 GiB not measured: 4 GiB does not fit"));
        assert_eq!(
            run.notes[2],
            "linux: 16 MiB thp: huge pages back 62% of the 16 MiB region"
        );
        assert!(run.info.unwrap().starts_with("kernel=6.1.0-56"));
    }

    #[test]
    fn guest_command_line() {
        let g = Guest {
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initramfs.cpio.gz".into(),
            accel: Accel::Tcg,
            icount: true,
            firmware: Firmware::Default,
            quick: true,
            append: "no5lvl".to_owned(),
            timeout: Duration::from_secs(1),
        };
        let line = g.vm().unwrap().shell_line();
        assert!(
            line.starts_with(
                "qemu-system-x86_64 -M q35 -accel tcg -cpu max -icount shift=0,sleep=off -m 3G"
            ),
            "{line}"
        );
        assert!(line.contains(" -kernel /k/vmlinuz -initrd /k/initramfs.cpio.gz -append"));
        assert!(
            line.contains("transparent_hugepage=always no5lvl -- --sizes 2M,16M,128M,1G --quick'")
        );
    }
}
