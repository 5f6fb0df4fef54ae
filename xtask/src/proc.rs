//! Child processes that never outlive xtask.
//!
//! xtask installs flag-setting handlers for SIGINT, SIGTERM and SIGHUP, so a signal never kills it
//! half-way: every wait polls [`pending_signal`], stops the child, and the caller exits with
//! `128 + signal` (130 for Ctrl-C). [`ChildGuard`] kills its child when dropped, so an early
//! return or a panic cannot leave QEMU behind either. QEMU additionally runs in its own process
//! group (the terminal's Ctrl-C reaches only xtask, which then kills QEMU itself) and with a
//! parent-death signal, so even `kill -9` of xtask takes QEMU down.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

static SIGNAL: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

/// How often a wait looks at the child, the clock and the signal flag.
const POLL: Duration = Duration::from_millis(2);

/// How long a terminated (SIGTERM) child gets before it is killed.
const GRACE: Duration = Duration::from_secs(5);

/// At most this much of a child's output is kept in memory (all of it is still echoed).
const CAPTURE_LIMIT: usize = 64 << 20;

/// Error: xtask got this signal and stopped its child; it exits with 128 + signal.
#[derive(Debug)]
pub struct Interrupted(pub i32);

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "interrupted (signal {})", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Installs the handlers; a later signal only sets a flag that [`pending_signal`] reads.
pub fn install_signal_handlers() -> anyhow::Result<()> {
    let flag = SIGNAL.get_or_init(|| Arc::new(AtomicUsize::new(0)));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let number = usize::try_from(sig).expect("signal numbers are positive");
        signal_hook::flag::register_usize(sig, Arc::clone(flag), number)?;
    }
    Ok(())
}

/// The last signal received (SIGINT, SIGTERM or SIGHUP), if any.
pub fn pending_signal() -> Option<i32> {
    let sig = SIGNAL.get()?.load(Ordering::SeqCst);
    (sig != 0).then(|| i32::try_from(sig).unwrap_or(libc::SIGTERM))
}

/// The conventional exit code of a process stopped by `sig`.
pub fn signal_exit_code(sig: i32) -> i32 {
    128 + sig
}

/// Puts the command in its own process group and arranges for the kernel to SIGKILL it when
/// xtask dies (`PR_SET_PDEATHSIG`), whatever the reason.
pub fn isolate(cmd: &mut Command) {
    cmd.process_group(0);
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl and getppid,
    // which are async-signal-safe, touches no lock and allocates nothing (`io::Error` from an OS
    // error code is a plain value).
    unsafe {
        cmd.pre_exec(move || die_with_parent(parent));
    }
}

fn die_with_parent(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG, sig) only changes this process's death signal.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The parent may have died between fork and prctl; then no signal would ever come.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// How a wait ended.
#[derive(Debug)]
pub enum Ending {
    /// The child exited (or was killed by someone else).
    Exited(ExitStatus),
    /// The deadline passed; the child has been stopped.
    TimedOut,
    /// xtask received this signal; the child has been stopped.
    Interrupted(i32),
}

/// How to stop a child early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL at once (QEMU: the guest has nothing to save).
    Kill,
    /// SIGTERM, then SIGKILL after a grace period (cargo: let it clean up its own children).
    Terminate,
}

/// A child process that is stopped and reaped when the guard is dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    reaped: bool,
    stop: Stop,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command, stop: Stop) -> io::Result<Self> {
        let child = cmd.spawn()?;
        Ok(Self {
            child,
            reaped: false,
            stop,
        })
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits until the child exits, the deadline passes or xtask gets a signal.
    pub fn wait(&mut self, deadline: Option<Instant>) -> io::Result<Ending> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.reaped = true;
                return Ok(Ending::Exited(status));
            }
            if let Some(sig) = pending_signal() {
                self.stop_now();
                return Ok(Ending::Interrupted(sig));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.stop_now();
                return Ok(Ending::TimedOut);
            }
            thread::sleep(POLL);
        }
    }

    /// Stops the child the configured way and reaps it.
    fn stop_now(&mut self) {
        if self.reaped {
            return;
        }
        if self.stop == Stop::Terminate {
            self.signal(libc::SIGTERM);
            let until = Instant::now() + GRACE;
            while Instant::now() < until {
                if let Ok(Some(_)) = self.child.try_wait() {
                    self.reaped = true;
                    return;
                }
                thread::sleep(POLL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    fn signal(&self, sig: i32) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) has no memory-safety preconditions. The child is not reaped yet, so
        // its pid still names it and cannot have been reused.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Where a copied stream is echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    Nowhere,
    Stdout,
    Stderr,
}

fn echo_bytes(echo: Echo, bytes: &[u8]) {
    // Errors (a closed terminal, `| head`) must not stop the copy: the capture still matters.
    match echo {
        Echo::Nowhere => {}
        Echo::Stdout => {
            let mut out = io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        Echo::Stderr => {
            let mut err = io::stderr().lock();
            let _ = err.write_all(bytes);
            let _ = err.flush();
        }
    }
}

/// Copies a stream on a thread as it arrives: echoes it live and returns everything it read.
pub fn tee(mut from: impl Read + Send + 'static, echo: Echo) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    echo_bytes(echo, &buf[..n]);
                    if kept.len() < CAPTURE_LIMIT {
                        kept.extend_from_slice(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        kept
    })
}

/// Reads a stream line by line on a thread, echoing each line and handing it to `each`.
pub fn lines<T: Send + 'static>(
    from: impl Read + Send + 'static,
    echo: Echo,
    mut state: T,
    mut each: impl FnMut(&mut T, &str) + Send + 'static,
) -> JoinHandle<T> {
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    echo_bytes(echo, &line);
                    each(&mut state, String::from_utf8_lossy(&line).trim_end());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        state
    })
}

/// A child's status as a plain value: its exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Code(i32),
    Signal(i32),
}

impl From<ExitStatus> for Status {
    fn from(s: ExitStatus) -> Self {
        match (s.code(), s.signal()) {
            (Some(code), _) => Status::Code(code),
            (None, Some(sig)) => Status::Signal(sig),
            (None, None) => Status::Code(-1),
        }
    }
}
