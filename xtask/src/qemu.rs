//! The one place that knows QEMU: accelerator choice, the command line, running a VM and mapping
//! its exit status to xtask's exit codes (docs/ARCHITECTURE.md, "Exit codes").

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use stencil_abi::ExitCode;
use stencil_abi::exit::{QemuExit, decode_status};

use crate::cmdline::shell_quote;
use crate::proc::{self, ChildGuard, Echo, Ending, Status, Stop};

pub const QEMU: &str = "qemu-system-x86_64";
pub const INSTALL_HINT: &str = "sudo apt-get install qemu-system-x86";

/// xtask's own exit codes (the guest's 0..=105 pass through; the scheme is `stencil_abi::exit`).
pub const EXIT_CRASH: i32 = ExitCode::CRASH.status();
pub const EXIT_TIMEOUT: i32 = ExitCode::TIMEOUT.status();
pub const EXIT_QEMU_FAILED: i32 = ExitCode::QEMU_FAILED.status();
pub const EXIT_XTASK_ERROR: i32 = ExitCode::XTASK_ERROR.status();

/// Where qboot (a tiny firmware that boots PVH kernels quickly) may be installed.
const QBOOT_PATHS: &[&str] = &[
    "/usr/share/qemu/qboot.rom",
    "/usr/local/share/qemu/qboot.rom",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// Minimal virtual machine: no PCI, minimal ACPI (no HPET or PM timer); boots in milliseconds
    #[default]
    Microvm,
    /// A modern PC (Q35 chipset, PCIe, ACPI)
    Q35,
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when the CPU has vmx/svm and /dev/kvm opens read-write, else TCG (with a notice)
    #[default]
    Auto,
    /// QEMU's software emulator
    Tcg,
    /// Linux KVM (fails if /dev/kvm cannot be opened read-write)
    Kvm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        })
    }
}

/// Firmware for q35 (microvm always uses QEMU's own qboot-based bios-microvm.bin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Firmware {
    /// qboot.rom if installed, else QEMU's default (SeaBIOS)
    #[default]
    Auto,
    /// qboot.rom (an error if it is not installed)
    Qboot,
    /// QEMU's default firmware (SeaBIOS)
    Default,
}

/// True if a `flags` line of /proc/cpuinfo lists `vmx` (Intel VT-x) or `svm` (AMD-V).
pub fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo.lines().any(|line| {
        let Some((key, value)) = line.split_once(':') else {
            return false;
        };
        key.trim() == "flags" && value.split_whitespace().any(|f| f == "vmx" || f == "svm")
    })
}

/// The accelerator decision plus a one-line notice to print (why not KVM, or a warning).
pub fn decide_accel(
    choice: AccelChoice,
    cpuinfo: &str,
    kvm_rw: &std::result::Result<(), String>,
) -> Result<(Accel, Option<String>)> {
    let hw = cpu_has_hw_virt(cpuinfo);
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, None)),
        AccelChoice::Kvm => {
            if let Err(e) = kvm_rw {
                bail!("--accel kvm: /dev/kvm cannot be opened read-write: {e}");
            }
            let warning = (!hw).then(|| {
                "stencil: warning: --accel kvm without vmx/svm in /proc/cpuinfo: this KVM is \
                 not hardware virtualization and may be very slow"
                    .to_owned()
            });
            Ok((Accel::Kvm, warning))
        }
        AccelChoice::Auto => {
            if !hw {
                Ok((
                    Accel::Tcg,
                    Some(
                        "stencil: using TCG: /proc/cpuinfo shows no vmx or svm, so /dev/kvm (if \
                         any) is not hardware virtualization"
                            .to_owned(),
                    ),
                ))
            } else if let Err(e) = kvm_rw {
                Ok((
                    Accel::Tcg,
                    Some(format!(
                        "stencil: using TCG: /dev/kvm cannot be opened read-write ({e})"
                    )),
                ))
            } else {
                Ok((Accel::Kvm, None))
            }
        }
    }
}

/// Decides the accelerator from this machine's /proc/cpuinfo and /dev/kvm.
pub fn detect_accel(choice: AccelChoice) -> Result<(Accel, Option<String>)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm_rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| e.to_string());
    decide_accel(choice, &cpuinfo, &kvm_rw)
}

/// Finds `qemu-system-x86_64` on PATH.
pub fn find_qemu() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(QEMU);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!("{QEMU} not found on PATH; install it with: {INSTALL_HINT}")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_qboot() -> Option<PathBuf> {
    QBOOT_PATHS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Everything that goes on QEMU's command line.
#[derive(Debug, Clone)]
pub struct Vm {
    pub qemu: PathBuf,
    pub machine: Machine,
    pub accel: Accel,
    pub mem: String,
    pub smp: u32,
    pub kernel: PathBuf,
    pub cmdline: String,
    /// Start QEMU's gdb stub on 127.0.0.1:PORT and wait for the debugger before the first
    /// instruction.
    pub gdb: Option<u16>,
    /// `-bios` for q35 (`None`: QEMU's default).
    pub bios: Option<PathBuf>,
    /// `-initrd` (the Linux peer's initramfs).
    pub initrd: Option<PathBuf>,
    /// `-icount shift=0,sleep=off`: the guest clock counts instructions (TCG only).
    pub icount: bool,
    /// Host ports forwarded to guest TCP ports; non-empty: the VM gets a virtio-net NIC on QEMU
    /// user networking (`virtio-net-device` on microvm, `virtio-net-pci` on q35).
    pub ports: Vec<PortForward>,
}

/// `-p HOST:GUEST`: host TCP port HOST (on 127.0.0.1) forwarded to guest port GUEST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

impl std::str::FromStr for PortForward {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        // Digits only: `u16::from_str` would also take a leading `+`.
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
            _ => Err(format!(
                "'{p}' in '{s}' is not a port number (1-65535); expected HOST:GUEST or PORT"
            )),
        };
        match s.split_once(':') {
            Some((h, g)) => Ok(PortForward {
                host: port(h)?,
                guest: port(g)?,
            }),
            None => {
                let p = port(s)?;
                Ok(PortForward { host: p, guest: p })
            }
        }
    }
}

/// Fails with a clear message if a host port cannot be bound on 127.0.0.1 (QEMU would otherwise
/// fail with a terse "Could not set up host forwarding rule").
pub fn check_host_ports(ports: &[PortForward]) -> Result<()> {
    for p in ports {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", p.host)) {
            bail!(
                "host port {} is not available on 127.0.0.1 ({e}); is another server (or guest) using it? Pick another with --port OTHER:{}",
                p.host,
                p.guest
            );
        }
    }
    Ok(())
}

/// Fails with a clear message if the gdb stub's port cannot be bound on 127.0.0.1 (QEMU would
/// otherwise fail, or the debugger would connect to whatever holds the port).
pub fn check_gdb_port(port: u16) -> Result<()> {
    if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
        bail!(
            "--gdb: port {port} is not available on 127.0.0.1 ({e}); is another debugger or \
             guest using it? Pick another with --gdb=PORT"
        );
    }
    Ok(())
}

impl Vm {
    /// A VM with the defaults; the caller sets the rest.
    pub fn new(kernel: PathBuf, machine: Machine, accel: Accel) -> Self {
        Self {
            qemu: PathBuf::from(QEMU),
            machine,
            accel,
            mem: "256M".to_owned(),
            smp: 1,
            kernel,
            cmdline: String::new(),
            gdb: None,
            bios: None,
            initrd: None,
            icount: false,
            ports: Vec::new(),
        }
    }

    /// Resolves the firmware choice for this VM's machine.
    pub fn set_firmware(&mut self, firmware: Firmware) -> Result<()> {
        self.bios = match (self.machine, firmware) {
            (Machine::Microvm, _) | (Machine::Q35, Firmware::Default) => None,
            (Machine::Q35, Firmware::Auto) => find_qboot(),
            (Machine::Q35, Firmware::Qboot) => Some(find_qboot().with_context(|| {
                format!(
                    "--firmware qboot: none of {} exists",
                    QBOOT_PATHS.join(", ")
                )
            })?),
        };
        Ok(())
    }

    /// QEMU's arguments (without the program name).
    pub fn args(&self) -> Vec<OsString> {
        let machine = match self.machine {
            Machine::Microvm => "microvm,x-option-roms=off,rtc=off,isa-serial=on",
            Machine::Q35 => "q35",
        };
        let mut a: Vec<OsString> = vec!["-M".into(), machine.into()];
        if let Some(bios) = &self.bios {
            a.push("-bios".into());
            a.push(bios.into());
        }
        let accel: &[&str] = match self.accel {
            Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host,-arch-capabilities"],
        };
        a.extend(accel.iter().map(OsString::from));
        if self.icount {
            a.extend(["-icount", "shift=0,sleep=off"].map(OsString::from));
        }
        a.extend(["-m", &self.mem, "-smp", &self.smp.to_string()].map(OsString::from));
        a.push("-kernel".into());
        a.push(self.kernel.clone().into());
        if let Some(initrd) = &self.initrd {
            a.push("-initrd".into());
            a.push(initrd.into());
        }
        a.push("-append".into());
        a.push(self.cmdline.clone().into());
        a.extend(
            [
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-monitor",
                "none",
                "-no-reboot",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
            ]
            .map(OsString::from),
        );
        if !self.ports.is_empty() {
            let mut netdev = "user,id=n0".to_owned();
            for p in &self.ports {
                netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", p.host, p.guest));
            }
            let nic = match self.machine {
                Machine::Microvm => "virtio-net-device,netdev=n0",
                Machine::Q35 => "virtio-net-pci,netdev=n0",
            };
            a.extend([
                "-netdev".into(),
                netdev.into(),
                "-device".into(),
                nic.into(),
            ]);
        }
        if let Some(port) = self.gdb {
            // Not `-s` (tcp::1234): that binds every address and falls back to [::] when
            // 0.0.0.0:1234 is taken, so the stub may not be where xtask says it is.
            a.extend([
                "-gdb".into(),
                format!("tcp:127.0.0.1:{port}").into(),
                "-S".into(),
            ]);
        }
        a
    }

    /// The command, ready to spawn.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.qemu);
        cmd.args(self.args());
        cmd
    }

    /// The command as one shell-pasteable line.
    pub fn shell_line(&self) -> String {
        std::iter::once(self.qemu.clone().into_os_string())
            .chain(self.args())
            .map(|w| shell_quote(&w.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What a VM run produced.
#[derive(Debug)]
pub struct RunResult {
    /// xtask's exit code for this run (ARCHITECTURE.md), or 128+signal if xtask was interrupted.
    pub code: i32,
    /// One line for humans when the code is not 0.
    pub summary: Option<String>,
    pub serial: Vec<u8>,
    pub stderr: Vec<u8>,
    pub interrupted: Option<i32>,
    pub elapsed: Duration,
}

/// Where a VM's serial output goes while it runs.
enum SerialSink {
    /// Echo it to the terminal as it arrives (or not).
    Tee(bool),
    /// Hand each line to a callback (not echoed).
    Lines(Box<dyn FnMut(&str) + Send>),
}

/// Boots the VM and waits for it. `live` echoes serial output (QEMU's stdout) and QEMU's stderr
/// to the terminal as it arrives; it is captured either way.
pub fn run(vm: &Vm, timeout: Option<Duration>, live: bool) -> Result<RunResult> {
    run_inner(vm, timeout, SerialSink::Tee(live))
}

/// Boots the VM and waits for it, handing every serial line to `each` as it arrives (nothing is
/// echoed; serial output and QEMU's stderr are captured as with [`run`]).
pub fn run_with_lines(
    vm: &Vm,
    timeout: Option<Duration>,
    each: impl FnMut(&str) + Send + 'static,
) -> Result<RunResult> {
    run_inner(vm, timeout, SerialSink::Lines(Box::new(each)))
}

fn run_inner(vm: &Vm, timeout: Option<Duration>, sink: SerialSink) -> Result<RunResult> {
    let live = matches!(sink, SerialSink::Tee(true));
    check_cmdline_len(&vm.cmdline, vm.machine, vm.bios.is_some())?;
    let mut cmd = vm.command();
    // stdin is not the terminal: a background process group touching the tty would be stopped
    // (SIGTTIN/SIGTTOU), and QEMU must not put the terminal into raw mode.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    proc::isolate(&mut cmd);
    let start = Instant::now();
    let mut guard = match ChildGuard::spawn(&mut cmd, Stop::Kill) {
        Ok(g) => g,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "{} not found; install it with: {INSTALL_HINT}",
                vm.qemu.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot start {}", vm.qemu.display())),
    };
    let out = guard.child_mut().stdout.take().expect("piped");
    let err = guard.child_mut().stderr.take().expect("piped");
    let serial = match sink {
        SerialSink::Tee(live) => proc::tee(out, if live { Echo::Stdout } else { Echo::Nowhere }),
        SerialSink::Lines(mut each) => proc::lines(
            out,
            Echo::Nowhere,
            Vec::new(),
            move |kept: &mut Vec<u8>, line| {
                each(line);
                kept.extend_from_slice(line.as_bytes());
                kept.push(b'\n');
            },
        ),
    };
    let stderr = proc::tee(err, if live { Echo::Stderr } else { Echo::Nowhere });
    let ending = guard.wait(timeout.map(|t| start + t))?;
    let elapsed = start.elapsed();
    drop(guard);
    let serial = serial.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let (code, summary, interrupted) = match ending {
        Ending::Exited(status) => {
            let (code, summary) = map_exit(Status::from(status));
            (code, summary, None)
        }
        Ending::TimedOut => {
            let secs = timeout.unwrap_or_default().as_secs_f64();
            (
                EXIT_TIMEOUT,
                Some(format!(
                    "stencil: timeout: the guest did not exit within {secs} s; QEMU was killed \
                     (exit {EXIT_TIMEOUT})"
                )),
                None,
            )
        }
        Ending::Interrupted(sig) => (
            proc::signal_exit_code(sig),
            Some(format!(
                "stencil: interrupted (signal {sig}); QEMU was killed"
            )),
            Some(sig),
        ),
    };
    Ok(RunResult {
        code,
        summary,
        serial,
        stderr,
        interrupted,
        elapsed,
    })
}

/// What an xtask exit code means, for summaries and test reports.
pub fn describe(code: i32) -> String {
    match ExitCode::from_code(code) {
        Some(c) => c.to_string(),
        None => format!("exit code {code}"),
    }
}

/// Maps QEMU's exit status to xtask's exit code plus a summary line (None for success).
///
/// libos writes `v = code + 1` to isa-debug-exit, QEMU exits `(v << 1) | 1 = 2 * code + 3`
/// (`stencil_abi::exit`).
pub fn map_exit(status: Status) -> (i32, Option<String>) {
    let code = match status {
        Status::Signal(sig) => {
            return (
                EXIT_QEMU_FAILED,
                Some(format!(
                    "stencil: QEMU was killed by signal {sig} (exit {EXIT_QEMU_FAILED})"
                )),
            );
        }
        Status::Code(c) => c,
    };
    match decode_status(code) {
        QemuExit::Guest(ExitCode::SUCCESS) => (0, None),
        QemuExit::Guest(app) => (
            app.status(),
            Some(format!("stencil: {app} (exit {})", app.code())),
        ),
        QemuExit::Reset => (
            EXIT_CRASH,
            Some(format!(
                "stencil: {} (exit {EXIT_CRASH})",
                describe(EXIT_CRASH)
            )),
        ),
        QemuExit::QemuError => (
            EXIT_QEMU_FAILED,
            Some(format!(
                "stencil: QEMU failed (status 1; see its messages above) (exit {EXIT_QEMU_FAILED})"
            )),
        ),
        QemuExit::OutsideScheme { code: app } => (
            EXIT_QEMU_FAILED,
            Some(format!(
                "stencil: the guest reported code {app}, outside the exit-code scheme \
                 (QEMU status {code}) (exit {EXIT_QEMU_FAILED})"
            )),
        ),
        QemuExit::Unexpected(c) => (
            EXIT_QEMU_FAILED,
            Some(format!(
                "stencil: QEMU exited with unexpected status {c} (exit {EXIT_QEMU_FAILED})"
            )),
        ),
    }
}

/// The longest command line, in bytes, that reaches the guest intact on `machine` (`qboot`: q35
/// booted through qboot rather than SeaBIOS). Measured with QEMU 7.2 (the guest itself takes any
/// length its loader places below 1 MiB):
///
/// - microvm: 131,071, Linux's limit on one `execve` argument (`MAX_ARG_STRLEN`, 128 KiB with the
///   NUL); qboot's microvm loader carries all of it;
/// - q35 + qboot: 65,359 arrive intact, longer ones overwrite the memory map; we allow 65,024;
/// - q35 + SeaBIOS: 4,127 arrive intact, longer ones overwrite the PVH start info (or hang the
///   loader); we allow 4,096.
pub fn cmdline_max_len(machine: Machine, qboot: bool) -> usize {
    match (machine, qboot) {
        (Machine::Microvm, _) => 131_071,
        (Machine::Q35, true) => 65_024,
        (Machine::Q35, false) => 4_096,
    }
}

/// Refuses a command line longer than [`cmdline_max_len`], before QEMU could cut or mangle it.
pub fn check_cmdline_len(line: &str, machine: Machine, qboot: bool) -> Result<()> {
    let max = cmdline_max_len(machine, qboot);
    if line.len() > max {
        let (loader, hint) = match (machine, qboot) {
            (Machine::Microvm, _) => ("microvm", " (the host's limit on one QEMU argument)"),
            (Machine::Q35, true) => ("q35 with qboot", " (microvm carries 131071)"),
            (Machine::Q35, false) => (
                "q35 with SeaBIOS",
                " (with --firmware qboot: 65024; microvm: 131071)",
            ),
        };
        bail!(
            "the kernel command line is {} bytes; {loader} carries at most {max} intact{hint}",
            line.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_length_limits() {
        let line = "x".repeat(cmdline_max_len(Machine::Microvm, false));
        check_cmdline_len(&line, Machine::Microvm, false).unwrap();
        let e = check_cmdline_len(&format!("{line}y"), Machine::Microvm, false).unwrap_err();
        assert!(format!("{e}").contains("131072 bytes"), "{e}");
        let e = check_cmdline_len(&"x".repeat(5003), Machine::Q35, false).unwrap_err();
        assert!(
            format!("{e}").contains("5003 bytes; q35 with SeaBIOS carries at most 4096"),
            "{e}"
        );
        check_cmdline_len(&"x".repeat(4096), Machine::Q35, false).unwrap();
        assert!(check_cmdline_len(&"x".repeat(4097), Machine::Q35, false).is_err());
        check_cmdline_len(&"x".repeat(65_024), Machine::Q35, true).unwrap();
        assert!(check_cmdline_len(&"x".repeat(65_025), Machine::Q35, true).is_err());
    }

    const NO_VIRT: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr sse sse2 hypervisor\n";
    const INTEL: &str = "processor\t: 0\nflags\t\t: fpu vme vmx ept sse2\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm npt\n";
    const TRICKY: &str = "model name\t: vmx svm marketing\nflags\t\t: fpu vmxx svmish\n";

    #[test]
    fn hw_virt_detection() {
        assert!(!cpu_has_hw_virt(NO_VIRT));
        assert!(cpu_has_hw_virt(INTEL));
        assert!(cpu_has_hw_virt(AMD));
        assert!(!cpu_has_hw_virt(TRICKY));
        assert!(!cpu_has_hw_virt(""));
    }

    #[test]
    fn auto_accel() {
        let ok = Ok(());
        let denied = Err("Permission denied".to_owned());
        let (a, note) = decide_accel(AccelChoice::Auto, NO_VIRT, &ok).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(note.unwrap().contains("no vmx or svm"));
        let (a, note) = decide_accel(AccelChoice::Auto, INTEL, &denied).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(note.unwrap().contains("Permission denied"));
        assert_eq!(
            decide_accel(AccelChoice::Auto, AMD, &ok).unwrap(),
            (Accel::Kvm, None)
        );
    }

    #[test]
    fn explicit_accel() {
        let ok = Ok(());
        let denied = Err("No such file".to_owned());
        assert_eq!(
            decide_accel(AccelChoice::Tcg, INTEL, &ok).unwrap(),
            (Accel::Tcg, None)
        );
        assert!(decide_accel(AccelChoice::Kvm, INTEL, &denied).is_err());
        assert_eq!(
            decide_accel(AccelChoice::Kvm, INTEL, &ok).unwrap(),
            (Accel::Kvm, None)
        );
        let (a, warn) = decide_accel(AccelChoice::Kvm, NO_VIRT, &ok).unwrap();
        assert_eq!(a, Accel::Kvm);
        assert!(warn.is_some());
    }

    #[test]
    fn exit_mapping() {
        let code = |s| map_exit(Status::Code(s)).0;
        assert_eq!(map_exit(Status::Code(3)), (0, None));
        assert_eq!(code(2 * 7 + 3), 7);
        assert_eq!(code(2 * 99 + 3), 99);
        assert_eq!(code(2 * 100 + 3), 100);
        assert!(map_exit(Status::Code(203)).1.unwrap().contains("panicked"));
        assert_eq!(code(2 * 104 + 3), 104);
        assert_eq!(code(2 * 105 + 3), 105);
        assert!(
            map_exit(Status::Code(213))
                .1
                .unwrap()
                .contains("could not boot")
        );
        assert_eq!(code(2 * 106 + 3), EXIT_QEMU_FAILED);
        assert_eq!(code(2 * 110 + 3), EXIT_QEMU_FAILED);
        assert_eq!(code(255), EXIT_QEMU_FAILED);
        assert_eq!(code(0), EXIT_CRASH);
        assert_eq!(code(1), EXIT_QEMU_FAILED);
        assert_eq!(code(2), EXIT_QEMU_FAILED);
        assert_eq!(code(4), EXIT_QEMU_FAILED);
        assert_eq!(map_exit(Status::Signal(9)).0, EXIT_QEMU_FAILED);
    }

    #[test]
    fn every_code_is_described() {
        for code in 0..=255 {
            let text = describe(code);
            match ExitCode::from_code(code) {
                Some(_) => assert!(!text.starts_with("exit code"), "{code}: {text}"),
                None => assert_eq!(text, format!("exit code {code}")),
            }
        }
    }

    #[test]
    fn command_line_microvm_tcg() {
        let mut vm = Vm::new("/x/app".into(), Machine::Microvm, Accel::Tcg);
        vm.cmdline = "log=debug -- \"a b\"".to_owned();
        vm.set_firmware(Firmware::Auto).unwrap();
        let line = vm.shell_line();
        assert_eq!(
            line,
            "qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,isa-serial=on -accel tcg \
             -cpu max -m 256M -smp 1 -kernel /x/app -append 'log=debug -- \"a b\"' -nodefaults \
             -display none -serial stdio -monitor none -no-reboot -device \
             isa-debug-exit,iobase=0xf4,iosize=0x04"
        );
    }

    #[test]
    fn port_forwards() {
        let p: PortForward = "8080:80".parse().unwrap();
        assert_eq!(
            p,
            PortForward {
                host: 8080,
                guest: 80
            }
        );
        assert_eq!(
            "8000".parse::<PortForward>().unwrap(),
            PortForward {
                host: 8000,
                guest: 8000
            }
        );
        assert!("0:80".parse::<PortForward>().is_err());
        assert!("x:80".parse::<PortForward>().is_err());
        assert!("80:70000".parse::<PortForward>().is_err());
        let mut vm = Vm::new("/x/app".into(), Machine::Microvm, Accel::Tcg);
        vm.ports = vec![
            p,
            PortForward {
                host: 8443,
                guest: 443,
            },
        ];
        let line = vm.shell_line();
        assert!(line.contains(
            "-netdev user,id=n0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:8443-:443 \
             -device virtio-net-device,netdev=n0"
        ));
        vm.machine = Machine::Q35;
        assert!(vm.shell_line().contains("-device virtio-net-pci,netdev=n0"));
        // A port that is taken is reported before QEMU starts.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = taken.local_addr().unwrap().port();
        let err = check_host_ports(&[PortForward { host, guest: 80 }]).unwrap_err();
        assert!(err.to_string().contains("not available"), "{err}");
        let err = check_gdb_port(host).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("--gdb: port {host} is not available on 127.0.0.1")),
            "{err}"
        );
    }

    #[test]
    fn command_line_q35_kvm_gdb() {
        let mut vm = Vm::new("/x/app".into(), Machine::Q35, Accel::Kvm);
        vm.gdb = Some(1234);
        vm.smp = 2;
        vm.mem = "1G".to_owned();
        vm.bios = Some("/q/qboot.rom".into());
        let args: Vec<String> = vm
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.starts_with(
            "-M q35 -bios /q/qboot.rom -accel kvm -cpu host,-arch-capabilities -m 1G -smp 2 "
        ));
        assert!(joined.ends_with(" -gdb tcp:127.0.0.1:1234 -S"));
        assert!(
            args.contains(&String::new()),
            "empty -append is passed as an empty word"
        );
    }
}
