//! Monotonic time from the TSC.
//!
//! CPUID 0x15/0x16 read zero under QEMU, so the TSC rate is measured against PIT channel 0 during
//! boot ([`crate::calibrate`] has the method and its host tests): the PIT starts counting as
//! early as possible, boot work runs, and just before `main` a few short polled windows give a
//! cross-checked rate, which the long window from the PIT's start then refines (its 16-bit wraps
//! counted). A rate the CPU reports (CPUID 0x15/0x16, hypervisor leaf 0x4000_0010) must agree.
//! When the windows disagree, the boot log says so loudly (`warn`), the banner marks the figure
//! UNRELIABLE, and [`tsc_calibration`] tells the app. Under `-icount` both clocks follow the
//! instruction count, so the figures are deterministic.

use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use crate::arch::{cpu, pit};
use crate::calibrate::{self, Calibration, Clocks, ReferenceSource};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static CAL_START_TSC: AtomicU64 = AtomicU64::new(0);
static CAL_START_WIDTH: AtomicU64 = AtomicU64::new(0);
static MAIN_TSC: AtomicU64 = AtomicU64::new(0);
static CAL_WAIT_TSC: AtomicU64 = AtomicU64::new(0);
static CALIBRATION: spin::Once<Calibration> = spin::Once::new();

/// The real clocks: `rdtsc` and PIT channel 0.
struct Hardware;

impl Clocks for Hardware {
    fn tsc(&mut self) -> u64 {
        cpu::rdtsc()
    }
    fn pit(&mut self) -> u16 {
        pit::elapsed_ticks()
    }
}

/// The TSC rate the CPU reports, if it reports one (all zero under QEMU here).
fn cpu_reported_rate() -> Option<(ReferenceSource, u64)> {
    use crate::arch::cpu::cpuid as __cpuid;
    let max = __cpuid(0).eax;
    if max >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            let hz = u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax);
            return Some((ReferenceSource::Cpuid15, hz));
        }
    }
    // CPUID.1:ECX bit 31: running under a hypervisor, whose leaf 0x4000_0010 (if there) gives
    // the TSC rate in kHz.
    if __cpuid(1).ecx & (1 << 31) != 0 && __cpuid(0x4000_0000).eax >= 0x4000_0010 {
        let khz = __cpuid(0x4000_0010).eax;
        if khz != 0 {
            return Some((ReferenceSource::Hypervisor, u64::from(khz) * 1000));
        }
    }
    if max >= 0x16 {
        let mhz = __cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return Some((ReferenceSource::Cpuid16, u64::from(mhz) * 1_000_000));
        }
    }
    None
}

/// Starts calibration; `entry_tsc` is the TSC read by the first boot instruction.
pub(crate) fn start_calibration(entry_tsc: u64) {
    BOOT_TSC.store(entry_tsc, Ordering::Relaxed);
    let before = cpu::rdtsc();
    pit::start();
    let start = calibrate::start_bracket(before, cpu::rdtsc());
    CAL_START_TSC.store(start.tsc, Ordering::Relaxed);
    CAL_START_WIDTH.store(start.width, Ordering::Relaxed);
}

/// Finishes calibration: the short windows, then the boot window (the wait is accounted as
/// calibration, not boot work). Warns in the boot log when the figure cannot be trusted.
pub(crate) fn finish_calibration() {
    let wait_start = cpu::rdtsc();
    let start = calibrate::Sample {
        tsc: CAL_START_TSC.load(Ordering::Relaxed),
        width: CAL_START_WIDTH.load(Ordering::Relaxed),
        ticks: 0,
    };
    let cal = calibrate::calibrate(
        &mut Hardware,
        Some(start),
        cpu_reported_rate(),
        |round, w| {
            log::trace!("time: calibration round {round}: window {w:?}");
        },
    );
    TSC_HZ.store(cal.hz, Ordering::Relaxed);
    let cal = *CALIBRATION.call_once(|| cal);
    if cal.trusted {
        log::debug!(
            "time: TSC {cal} ({:?}, {} round(s), windows within {} ppm, boot window {} wrap(s) \
             {:?} Hz, CPU-reported {:?})",
            cal.method,
            cal.rounds,
            cal.spread_ppm,
            cal.boot_window_wraps,
            cal.boot_window_hz,
            cal.reference
        );
    } else {
        log::warn!(
            "time: TSC CALIBRATION IS UNRELIABLE: {cal}; {:?} after {} round(s), windows \
             {} ppm apart, boot window {:?} Hz, CPU-reported {:?}. Every Instant, sleep and \
             benchmark figure of this boot may be wrong (a busy host?)",
            cal.method,
            cal.rounds,
            cal.spread_ppm,
            cal.boot_window_hz,
            cal.reference
        );
    }
    add_calibration_wait(cpu::rdtsc().saturating_sub(wait_start));
}

/// How the TSC rate was obtained and whether it is trusted (see [`crate::calibrate`]). Its
/// `Display` is the banner's figure, e.g. `2580 MHz`, or `… MHz UNRELIABLE (…)`.
///
/// ```no_run
/// let cal = libos::time::tsc_calibration();
/// if !cal.trusted {
///     libos::println!("timings of this run are suspect: TSC {cal}");
/// }
/// ```
pub fn tsc_calibration() -> Calibration {
    CALIBRATION.get().copied().unwrap_or(Calibration {
        hz: tsc_hz().max(1),
        method: calibrate::Method::Guess,
        trusted: false,
        doubt: Some(calibrate::Doubt::NoPit),
        rounds: 0,
        spread_ppm: 0,
        boot_window_wraps: 0,
        boot_window_hz: None,
        reference: None,
    })
}

/// Accounts `cycles` spent only waiting for a calibration window (PIT, APIC timer).
pub(crate) fn add_calibration_wait(cycles: u64) {
    CAL_WAIT_TSC.fetch_add(cycles, Ordering::Relaxed);
}

/// Records the moment the app's `main` is called.
pub(crate) fn mark_main() {
    MAIN_TSC.store(cpu::rdtsc(), Ordering::Relaxed);
}

/// Time spent only waiting for calibration windows to close (not part of [`boot_duration`]).
pub fn calibration_wait() -> Duration {
    cycles_to_duration(CAL_WAIT_TSC.load(Ordering::Relaxed))
}

/// The measured TSC frequency in Hz.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Converts TSC cycles to a [`Duration`] (exact to the nanosecond below; any `u64` fits).
pub fn cycles_to_duration(cycles: u64) -> Duration {
    crate::limits::cycles_to_duration(cycles, tsc_hz())
}

/// Converts a [`Duration`] to TSC cycles, saturating at `u64::MAX` (`Duration::MAX` included).
pub fn duration_to_cycles(d: Duration) -> u64 {
    crate::limits::duration_to_cycles(d, tsc_hz())
}

/// Guest-side boot time: from the first instruction of the PVH entry to the app's `main`, minus
/// the time spent only waiting for calibration windows (see [`calibration_wait`]).
pub fn boot_duration() -> Duration {
    let main = MAIN_TSC.load(Ordering::Relaxed);
    let entry = BOOT_TSC.load(Ordering::Relaxed);
    let wait = CAL_WAIT_TSC.load(Ordering::Relaxed);
    cycles_to_duration(main.saturating_sub(entry).saturating_sub(wait))
}

/// A point in monotonic time (TSC-based).
///
/// ```no_run
/// let t = libos::time::Instant::now();
/// // ... work ...
/// libos::println!("took {:?}", t.elapsed());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instant(u64);

impl Instant {
    /// The current time.
    pub fn now() -> Instant {
        Instant(cpu::rdtsc())
    }

    /// Time since `self`.
    pub fn elapsed(&self) -> Duration {
        Instant::now().duration_since(*self)
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn duration_since(&self, earlier: Instant) -> Duration {
        cycles_to_duration(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`, or `None` if that is past the TSC's range (about two centuries at GHz
    /// rates; `Duration::MAX` always is). There is no `+` operator: it could only panic there.
    ///
    /// ```no_run
    /// use core::time::Duration;
    /// use libos::time::Instant;
    /// let deadline = Instant::now().checked_add(Duration::from_millis(5)).expect("in range");
    /// assert!(Instant::now().checked_add(Duration::MAX).is_none());
    /// ```
    pub fn checked_add(&self, d: Duration) -> Option<Instant> {
        crate::limits::deadline(self.0, d, tsc_hz()).map(Instant)
    }

    /// `self - d`, or `None` if that is before the TSC's zero.
    pub fn checked_sub(&self, d: Duration) -> Option<Instant> {
        self.0.checked_sub(duration_to_cycles(d)).map(Instant)
    }

    /// Raw TSC value, for benchmarks that want cycles.
    pub fn cycles(&self) -> u64 {
        self.0
    }
}

/// Time since boot (the first instruction).
pub fn uptime() -> Duration {
    cycles_to_duration(cpu::rdtsc().saturating_sub(BOOT_TSC.load(Ordering::Relaxed)))
}

/// Busy-waits for `d` (`Duration::MAX`: forever, without overflow). Prefer
/// [`crate::task::sleep`], which lets other tasks run.
pub fn spin_sleep(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        core::hint::spin_loop();
    }
}
