//! Monotonic time from the TSC.
//!
//! CPUID 0x15/0x16 read zero under QEMU, so the TSC rate is measured against PIT channel 0 during
//! boot: the PIT starts counting as early as possible, boot work runs, and just before `main` the
//! elapsed PIT ticks and TSC cycles give the rate (the window is stretched to at least 2 ms).
//! Under `-icount` both clocks follow the instruction count, so the figures are deterministic.

use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use crate::arch::x86_64::{cpu, pit};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static CAL_START_TSC: AtomicU64 = AtomicU64::new(0);
static MAIN_TSC: AtomicU64 = AtomicU64::new(0);
static CAL_WAIT_TSC: AtomicU64 = AtomicU64::new(0);

/// Minimum calibration window in PIT ticks (~2 ms).
const MIN_WINDOW_TICKS: u64 = 2 * pit::PIT_HZ / 1000;

/// Starts calibration; `entry_tsc` is the TSC read by the first boot instruction.
pub(crate) fn start_calibration(entry_tsc: u64) {
    BOOT_TSC.store(entry_tsc, Ordering::Relaxed);
    pit::start();
    CAL_START_TSC.store(cpu::rdtsc(), Ordering::Relaxed);
}

/// Finishes calibration, waiting until the window is long enough (the wait is accounted as
/// calibration, not boot work).
pub(crate) fn finish_calibration() {
    let wait_start = cpu::rdtsc();
    let start = CAL_START_TSC.load(Ordering::Relaxed);
    let (ticks, tsc) = loop {
        let ticks = pit::elapsed_ticks();
        let tsc = cpu::rdtsc();
        if ticks >= MIN_WINDOW_TICKS {
            break (ticks, tsc);
        }
        core::hint::spin_loop();
    };
    let hz = (u128::from(tsc - start) * u128::from(pit::PIT_HZ) / u128::from(ticks)) as u64;
    TSC_HZ.store(hz.max(1), Ordering::Relaxed);
    add_calibration_wait(cpu::rdtsc() - wait_start);
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

/// Converts TSC cycles to a [`Duration`].
pub fn cycles_to_duration(cycles: u64) -> Duration {
    let hz = tsc_hz().max(1);
    let nanos = u128::from(cycles) * 1_000_000_000 / u128::from(hz);
    Duration::from_nanos(nanos as u64)
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

    /// Raw TSC value, for benchmarks that want cycles.
    pub fn cycles(&self) -> u64 {
        self.0
    }
}

/// Time since boot (the first instruction).
pub fn uptime() -> Duration {
    cycles_to_duration(cpu::rdtsc().saturating_sub(BOOT_TSC.load(Ordering::Relaxed)))
}

/// Busy-waits for `d`. (Until the scheduler exists there is nothing else to run.)
pub fn spin_sleep(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        core::hint::spin_loop();
    }
}
