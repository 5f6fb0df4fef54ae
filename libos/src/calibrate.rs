//! TSC calibration against a 16-bit down-counter (PIT channel 0): the pure part, host-tested
//! over simulated clocks (`cargo test -p libos`). `time.rs` runs it on the real PIT at boot.
//!
//! The PIT counts 1,193,182 Hz in 16 bits, so it wraps every 54.9 ms; a window longer than that
//! read as "elapsed = start - now" is short by a multiple of 65,536 ticks, and the TSC rate comes
//! out several times too high (one busy-host boot measured 16,365 MHz for 2,580). So:
//!
//! 1. **Short windows, polled.** [`WINDOWS`] windows of [`WINDOW_TICKS`] ticks (~0.4 ms each).
//!    Within a window the counter is read continuously, so consecutive readings are microseconds
//!    apart and every wrap is counted ([`ticks_between`]). Each reading is bracketed by two TSC
//!    reads; the bracket's width bounds how far the PIT reading can be from the TSC midpoint, and
//!    a window whose brackets make it uncertain by more than [`MAX_UNCERTAINTY_PPM`] (a host
//!    stall during a reading) is dropped.
//! 2. **Cross-check.** The windows' rates must agree: a strict majority within
//!    [`TOLERANCE_PPM`] of their median (a stall longer than a wrap period *between* readings
//!    gives one wild window, which is outvoted). If they do not, the round is retried up to
//!    [`ROUNDS`] times; then the result is marked untrusted and `time.rs` warns.
//! 3. **Refine with the boot window.** The long window from early boot to the end of the
//!    calibration is read mod 2^16; the short-window rate says how many wraps it spans, which is
//!    unambiguous while the window is under ~1.3 s. Its rate is used when it agrees.
//! 4. **A second source.** When the CPU reports the TSC rate (CPUID 0x15/0x16 or the hypervisor
//!    leaf 0x4000_0010; all zero under QEMU here), the PIT figure must agree with it within
//!    [`REFERENCE_TOLERANCE_PPM`], or the result is untrusted.

use core::fmt;

/// PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// The counter's period in ticks (16 bits).
pub const WRAP: u64 = 1 << 16;
/// Short windows per round.
pub const WINDOWS: usize = 5;
/// Shortest window in PIT ticks (~0.42 ms).
pub const WINDOW_TICKS: u64 = 500;
/// A window is stretched (up to [`MAX_WINDOW_TICKS`]) until its uncertainty is at most this
/// (0.5%): slow PIT readings (a VM exit each under KVM) need longer windows.
pub const TARGET_UNCERTAINTY_PPM: u64 = 5_000;
/// Longest window in PIT ticks (~2.5 ms; well inside one wrap).
pub const MAX_WINDOW_TICKS: u64 = 3_000;
/// Rounds of short windows before giving up on agreement.
pub const ROUNDS: u32 = 3;
/// Windows agree when their rates are within this of the median (2%).
pub const TOLERANCE_PPM: u64 = 20_000;
/// A window whose readings leave its length this uncertain (1%) is dropped.
pub const MAX_UNCERTAINTY_PPM: u64 = 10_000;
/// A CPU-reported rate must agree with the PIT's within this (5%: CPUID 0x16 is nominal).
pub const REFERENCE_TOLERANCE_PPM: u64 = 50_000;
/// Readings in one window before it is abandoned (a PIT that does not count).
pub const MAX_POLLS: u32 = 200_000;

/// The two clocks: the TSC and the PIT's elapsed count modulo 2^16.
pub trait Clocks {
    /// Reads the TSC.
    fn tsc(&mut self) -> u64;
    /// PIT ticks since it was started, modulo 2^16.
    fn pit(&mut self) -> u16;
}

/// One PIT reading bracketed by TSC reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// TSC at the middle of the bracket.
    pub tsc: u64,
    /// Width of the bracket in TSC cycles.
    pub width: u64,
    /// The PIT reading (elapsed ticks mod 2^16).
    pub ticks: u16,
}

/// Takes one bracketed reading.
pub fn sample(c: &mut impl Clocks) -> Sample {
    let a = c.tsc();
    let ticks = c.pit();
    let b = c.tsc();
    let width = b.saturating_sub(a);
    Sample {
        tsc: a.saturating_add(width / 2),
        width,
        ticks,
    }
}

/// Ticks from reading `earlier` to reading `later` of the counter, assuming fewer than 2^16
/// passed (true for readings polled back to back; a longer gap is caught by the cross-check).
pub fn ticks_between(earlier: u16, later: u16) -> u64 {
    u64::from(later.wrapping_sub(earlier))
}

/// One measured window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// PIT ticks it spanned (wraps counted).
    pub ticks: u64,
    /// TSC cycles between its end readings' midpoints.
    pub cycles: u64,
    /// Bound on its relative error from the readings' brackets and one tick, in ppm.
    pub uncertainty_ppm: u64,
}

impl Window {
    /// The TSC rate this window gives, in Hz.
    pub fn hz(&self) -> u64 {
        rate(self.cycles, self.ticks)
    }
}

/// `cycles` TSC cycles over `ticks` PIT ticks, in Hz (saturating; 0 ticks gives 0).
pub fn rate(cycles: u64, ticks: u64) -> u64 {
    if ticks == 0 {
        return 0;
    }
    u64::try_from(u128::from(cycles) * u128::from(PIT_HZ) / u128::from(ticks)).unwrap_or(u64::MAX)
}

/// Measures one window of at least `want` ticks, polling the counter continuously, and
/// stretched until its uncertainty is at most [`TARGET_UNCERTAINTY_PPM`] or it spans
/// [`MAX_WINDOW_TICKS`]. `None` when the counter does not advance within [`MAX_POLLS`] readings
/// or the TSC does not.
pub fn measure_window(c: &mut impl Clocks, want: u64) -> Option<Window> {
    let start = sample(c);
    let mut last = start;
    let mut ticks = 0u64;
    let mut polls = 0u32;
    loop {
        polls += 1;
        if polls > MAX_POLLS {
            return None;
        }
        let s = sample(c);
        ticks += ticks_between(last.ticks, s.ticks);
        last = s;
        if ticks < want {
            continue;
        }
        let cycles = last.tsc.saturating_sub(start.tsc);
        let u = uncertainty_ppm(start.width, last.width, cycles, ticks);
        if u <= TARGET_UNCERTAINTY_PPM || ticks >= MAX_WINDOW_TICKS {
            let cycles = (cycles > 0).then_some(cycles)?;
            return Some(Window {
                ticks,
                cycles,
                uncertainty_ppm: u,
            });
        }
    }
}

/// Bound on a window's relative error, in ppm: each end's PIT reading happened somewhere in
/// its bracket (half a width from the midpoint at most), plus one tick of quantization.
pub fn uncertainty_ppm(start_width: u64, end_width: u64, cycles: u64, ticks: u64) -> u64 {
    let bracket = (start_width / 2).saturating_add(end_width / 2);
    ppm(bracket, cycles).saturating_add(1_000_000 / ticks.max(1))
}

/// `part / whole` in parts per million (saturating).
pub fn ppm(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return u64::MAX;
    }
    u64::try_from(u128::from(part) * 1_000_000 / u128::from(whole)).unwrap_or(u64::MAX)
}

/// How far `a` is from `b`, in ppm of `b`.
pub fn deviation_ppm(a: u64, b: u64) -> u64 {
    ppm(a.abs_diff(b), b)
}

/// The agreed rate of `rates`: the median of those within `tol_ppm` of the median of all, if
/// they are a strict majority of `of` (the windows attempted, dropped ones included).
pub fn agree(rates: &mut [u64], of: usize, tol_ppm: u64) -> Option<u64> {
    if rates.is_empty() {
        return None;
    }
    rates.sort_unstable();
    let median = rates[rates.len() / 2];
    let close = |r: &u64| deviation_ppm(*r, median) <= tol_ppm;
    let n = rates.iter().filter(|r| close(r)).count();
    if 2 * n <= of {
        return None;
    }
    let first = rates.iter().position(close)?;
    Some(rates[first + n / 2])
}

/// Counts the wraps in a long window read modulo 2^16: `cycles` TSC cycles ended with the
/// reading `end_ticks` (the counter started at 0 with the window), and `hz` is a rate good to
/// `tol_ppm`. Returns the window's ticks, or `None` when `hz` is not precise enough to tell
/// (the expected count is uncertain by a quarter wrap or more) or the window is empty.
pub fn unwrap_long(cycles: u64, end_ticks: u16, hz: u64, tol_ppm: u64) -> Option<u64> {
    if hz == 0 {
        return None;
    }
    let expected = u128::from(cycles) * u128::from(PIT_HZ) / u128::from(hz);
    if expected * u128::from(tol_ppm) / 1_000_000 >= u128::from(WRAP / 4) {
        return None;
    }
    let measured = u128::from(end_ticks);
    let wraps = (expected + u128::from(WRAP / 2)).saturating_sub(measured) / u128::from(WRAP);
    let ticks = u64::try_from(measured + wraps * u128::from(WRAP)).ok()?;
    (ticks > 0).then_some(ticks)
}

/// Where a calibration's figure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The long window from early boot, its wraps counted with the short windows' rate.
    BootWindow,
    /// The median of the short PIT windows that agreed.
    ShortWindows,
    /// The short windows never agreed: the median of every window (untrusted).
    Disagreeing,
    /// The PIT gave nothing; the CPU-reported rate is used (untrusted).
    Reference,
    /// Nothing worked: a guess of 1 GHz (untrusted).
    Guess,
}

/// Who reported the TSC rate besides the PIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferenceSource {
    /// CPUID leaf 0x15 (crystal ratio).
    Cpuid15,
    /// CPUID leaf 0x16 (nominal base frequency).
    Cpuid16,
    /// Hypervisor CPUID leaf 0x4000_0010 (TSC kHz).
    Hypervisor,
}

/// How the TSC rate was obtained, and whether to believe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    /// The rate in Hz (never 0).
    pub hz: u64,
    /// Where it came from.
    pub method: Method,
    /// False when there is a [`doubt`](Self::doubt): every time figure of this boot may be off.
    pub trusted: bool,
    /// Why the figure is not trusted.
    pub doubt: Option<Doubt>,
    /// Rounds of short windows taken (1 when the first agreed).
    pub rounds: u32,
    /// Spread of the last round's usable windows, (max - min) / median, in ppm.
    pub spread_ppm: u64,
    /// Wraps of the 16-bit counter the boot window spanned (when it was used).
    pub boot_window_wraps: u64,
    /// The boot window's rate with its wraps counted, used or not (`None`: too long to count).
    pub boot_window_hz: Option<u64>,
    /// The CPU-reported rate, if any, and its source.
    pub reference: Option<(ReferenceSource, u64)>,
}

/// Why a calibration is not trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doubt {
    /// No round of short windows had a majority agreeing.
    WindowsDisagree,
    /// The boot window, precise enough to tell, disagrees with the short windows: the clocks
    /// drifted apart during boot.
    BootWindowDisagrees,
    /// The CPU-reported rate disagrees with the PIT's.
    ReferenceDisagrees,
    /// The PIT gave no usable window.
    NoPit,
}

impl fmt::Display for Calibration {
    /// E.g. `2580 MHz` or `16365 MHz UNRELIABLE (PIT windows disagree)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MHz", self.hz / 1_000_000)?;
        if let Some(d) = self.doubt {
            let why = match d {
                Doubt::WindowsDisagree => "PIT windows disagree",
                Doubt::BootWindowDisagrees => "boot window disagrees with the short windows",
                Doubt::ReferenceDisagrees => "CPU-reported rate disagrees",
                Doubt::NoPit if self.method == Method::Reference => {
                    "no PIT reading, CPU-reported rate"
                }
                Doubt::NoPit => "no PIT reading, guessed",
            };
            write!(f, " UNRELIABLE ({why})")?;
        }
        Ok(())
    }
}

/// The reading that starts the boot window: the TSC just before and just after the PIT was
/// started (its count is 0 at some moment in between).
pub fn start_bracket(before: u64, after: u64) -> Sample {
    let width = after.saturating_sub(before);
    Sample {
        tsc: before.saturating_add(width / 2),
        width,
        ticks: 0,
    }
}

/// Calibrates: [`ROUNDS`] rounds of short windows at most, then the boot window (started by
/// `boot_start`, see [`start_bracket`]) when given, then the cross-check with `reference`.
/// `on_window` sees every window (for debug logs).
pub fn calibrate(
    c: &mut impl Clocks,
    boot_start: Option<Sample>,
    reference: Option<(ReferenceSource, u64)>,
    mut on_window: impl FnMut(u32, Option<Window>),
) -> Calibration {
    let mut all = [0u64; WINDOWS];
    let mut short = None;
    let mut rounds = 0;
    let mut spread_ppm = 0;
    let mut end = None;
    let mut usable_any = 0;
    // A first reading is slow (cold code, cold device emulation): take it outside any window.
    sample(c);
    while rounds < ROUNDS && short.is_none() {
        rounds += 1;
        let mut rates = [0u64; WINDOWS];
        let mut n = 0;
        for _ in 0..WINDOWS {
            let w = measure_window(c, WINDOW_TICKS);
            on_window(rounds, w);
            if let Some(w) = w.filter(|w| w.uncertainty_ppm <= MAX_UNCERTAINTY_PPM) {
                rates[n] = w.hz();
                n += 1;
            }
        }
        if n > 0 {
            let r = &mut rates[..n];
            r.sort_unstable();
            spread_ppm = deviation_ppm(r[n - 1], r[n / 2]).max(deviation_ppm(r[0], r[n / 2]));
            all = rates;
            usable_any = n;
        }
        short = agree(&mut rates[..n], WINDOWS, TOLERANCE_PPM);
        if short.is_some() {
            // The boot window ends here: a reading right after the agreeing round.
            end = Some(sample(c));
        }
    }
    let mut cal = Calibration {
        hz: 1_000_000_000,
        method: Method::Guess,
        trusted: false,
        doubt: Some(Doubt::NoPit),
        rounds,
        spread_ppm,
        boot_window_wraps: 0,
        boot_window_hz: None,
        reference,
    };
    match short {
        Some(hz) => {
            cal.hz = hz;
            cal.method = Method::ShortWindows;
            cal.doubt = None;
            // The boot window counts only where its wraps can be counted and its own end
            // readings (a host stall while the PIT was started, say) leave it precise.
            if let (Some(start), Some(end)) = (boot_start, end)
                && let Some(cycles) = end.tsc.checked_sub(start.tsc)
                && let Some(ticks) = unwrap_long(cycles, end.ticks, hz, TOLERANCE_PPM)
                && uncertainty_ppm(start.width, end.width, cycles, ticks) <= TARGET_UNCERTAINTY_PPM
            {
                let long = rate(cycles, ticks);
                cal.boot_window_hz = Some(long);
                if deviation_ppm(long, hz) <= TOLERANCE_PPM {
                    cal.hz = long;
                    cal.method = Method::BootWindow;
                    cal.boot_window_wraps = ticks / WRAP;
                } else {
                    cal.doubt = Some(Doubt::BootWindowDisagrees);
                }
            }
        }
        None if usable_any > 0 => {
            let r = &mut all[..usable_any];
            r.sort_unstable();
            cal.hz = r[usable_any / 2];
            cal.method = Method::Disagreeing;
            cal.doubt = Some(Doubt::WindowsDisagree);
        }
        None => {}
    }
    match reference {
        Some((_, ref_hz)) if ref_hz > 0 => {
            if cal.method == Method::Guess {
                cal.hz = ref_hz;
                cal.method = Method::Reference;
            } else if deviation_ppm(cal.hz, ref_hz) > REFERENCE_TOLERANCE_PPM {
                cal.doubt = cal.doubt.or(Some(Doubt::ReferenceDisagrees));
            }
        }
        _ => {}
    }
    cal.hz = cal.hz.max(1);
    cal.trusted = cal.doubt.is_none();
    cal
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Simulated clocks: real time in picoseconds advances with every read (by the read's cost)
    /// and by injected stalls; the TSC and the PIT are derived from it exactly.
    struct Sim {
        ps: u128,
        tsc_hz: u64,
        /// Cost of a TSC read and of a PIT reading, in ps.
        tsc_cost: u128,
        pit_cost: u128,
        /// PIT started at this time.
        pit_start: u128,
        /// (read number, stall in ps): the host stops the VM just before that read of either
        /// clock. Reads go TSC, PIT, TSC per sample, so a read number of 1 mod 3 (an opening
        /// TSC read) stalls between readings, any other inside a reading's bracket.
        stalls: Vec<(u64, u128)>,
        reads: u64,
        /// Added to every TSC reading (a TSC that jumped relative to the PIT).
        tsc_skew: u64,
        /// Deterministic jitter source.
        seed: u64,
    }

    impl Sim {
        fn new(tsc_hz: u64, pit_cost_ns: u64) -> Sim {
            Sim {
                ps: 1_000_000_000,
                tsc_hz,
                tsc_cost: 20_000,
                pit_cost: u128::from(pit_cost_ns) * 1000,
                pit_start: 1_000_000_000,
                stalls: Vec::new(),
                reads: 0,
                tsc_skew: 0,
                seed: 0x9e37_79b9_7f4a_7c15,
            }
        }
        fn jitter(&mut self, max: u128) -> u128 {
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            u128::from(self.seed) % (max + 1)
        }
        fn stall(&mut self) {
            self.reads += 1;
            let n = self.reads;
            let extra: u128 = self.stalls.iter().filter(|s| s.0 == n).map(|s| s.1).sum();
            self.ps += extra;
        }
        fn tsc_now(&self) -> u64 {
            (self.ps * u128::from(self.tsc_hz) / 1_000_000_000_000) as u64 + self.tsc_skew
        }
        /// Elapsed PIT ticks (exact, unwrapped) since the PIT started.
        fn ticks_now(&self) -> u64 {
            ((self.ps - self.pit_start) * u128::from(PIT_HZ) / 1_000_000_000_000) as u64
        }
        /// Busy boot work between starting the PIT and calibrating.
        fn work(&mut self, ns: u64) {
            self.ps += u128::from(ns) * 1000;
        }
    }

    impl Clocks for Sim {
        fn tsc(&mut self) -> u64 {
            self.stall();
            self.ps += self.tsc_cost;
            self.tsc_now()
        }
        fn pit(&mut self) -> u16 {
            self.stall();
            // The count is latched somewhere inside the (slow) port accesses.
            let j = self.jitter(self.pit_cost);
            self.ps += j;
            let t = self.ticks_now();
            self.ps += self.pit_cost - j;
            (t % WRAP) as u16
        }
    }

    fn within(hz: u64, truth: u64, tol_ppm: u64) -> bool {
        deviation_ppm(hz, truth) <= tol_ppm
    }

    #[test]
    fn wrap_is_counted_between_readings() {
        assert_eq!(ticks_between(0xfff0, 0x0010), 0x20);
        assert_eq!(ticks_between(5, 5), 0);
        assert_eq!(ticks_between(0, 0xffff), 0xffff);
    }

    #[test]
    fn agreement_needs_a_strict_majority() {
        let mut r = [100, 101, 99, 600, 100];
        assert_eq!(agree(&mut r, 5, 20_000), Some(100));
        let mut r = [100, 600, 700];
        assert_eq!(agree(&mut r, 5, 20_000), None);
        let mut r = [100, 100, 600, 600];
        assert_eq!(agree(&mut r, 4, 20_000), None);
        assert_eq!(agree(&mut [], 5, 20_000), None);
    }

    #[test]
    fn long_window_wraps_are_recovered() {
        // 2.58 GHz, 150 ms of boot work: 178,977 ticks = 2 wraps + 47,905.
        let hz = 2_580_000_000u64;
        let ticks = 178_977u64;
        let cycles = ticks * hz / PIT_HZ;
        let end = (ticks % WRAP) as u16;
        assert_eq!(unwrap_long(cycles, end, hz + hz / 100, 20_000), Some(ticks));
        // The old reading (no wraps) would have said 2.58 GHz * 178977/47905 ≈ 9.6 GHz.
        assert!(rate(cycles, u64::from(end)) > 9_000_000_000);
        // Too long to tell: 10 s of boot.
        assert_eq!(unwrap_long(10 * hz, 0, hz, 20_000), None);
        assert_eq!(unwrap_long(cycles, end, 0, 20_000), None);
    }

    #[test]
    fn the_busy_host_boot_is_calibrated_right() {
        // The reported boot: 2,580 MHz, boot work long enough for the PIT to wrap several times.
        for work_ms in [0u64, 3, 54, 55, 60, 120, 300, 900] {
            let mut sim = Sim::new(2_580_000_000, 2_000);
            let start = start_bracket(sim.tsc(), sim.tsc());
            sim.work(work_ms * 1_000_000);
            let cal = calibrate(&mut sim, Some(start), None, |_, _| {});
            assert!(cal.trusted, "{work_ms} ms: {cal:?}");
            if work_ms < 600 {
                assert_eq!(cal.method, Method::BootWindow, "{work_ms} ms: {cal:?}");
                assert_eq!(cal.boot_window_wraps, sim.ticks_now() / WRAP);
                assert!(within(cal.hz, 2_580_000_000, 1_000), "{work_ms} ms: {cal}");
            } else {
                // Too long to count its wraps from a 2% figure: the short windows' rate.
                assert_eq!(cal.method, Method::ShortWindows, "{work_ms} ms: {cal:?}");
                assert!(within(cal.hz, 2_580_000_000, 10_000), "{work_ms} ms: {cal}");
            }
        }
    }

    #[test]
    fn clocks_drifting_apart_during_boot_are_reported() {
        let mut sim = Sim::new(2_000_000_000, 1_000);
        let start = start_bracket(sim.tsc(), sim.tsc());
        sim.work(20_000_000);
        // The TSC gained 2 ms on the PIT during 20 ms of boot work: 10%.
        sim.tsc_skew = 4_000_000;
        let cal = calibrate(&mut sim, Some(start), None, |_, _| {});
        assert_eq!(cal.doubt, Some(Doubt::BootWindowDisagrees), "{cal:?}");
        assert!(
            !cal.trusted && within(cal.hz, 2_000_000_000, 5_000),
            "{cal:?}"
        );
        assert!(
            cal.to_string()
                .contains("UNRELIABLE (boot window disagrees")
        );
        // A stall while the PIT was started makes the boot window imprecise, not wrong.
        let mut sim = Sim::new(2_000_000_000, 1_000);
        let before = sim.tsc();
        sim.work(3_000_000);
        let start = start_bracket(before, sim.tsc());
        sim.work(20_000_000);
        let cal = calibrate(&mut sim, Some(start), None, |_, _| {});
        assert_eq!(
            (cal.method, cal.trusted),
            (Method::ShortWindows, true),
            "{cal:?}"
        );
        assert!(within(cal.hz, 2_000_000_000, 5_000), "{cal:?}");
    }

    #[test]
    fn a_stalled_host_mid_window_is_outvoted() {
        // A 70 ms stall (longer than a wrap) between two readings of the first window, and a
        // 5 ms stall inside a reading of the second (about 1,200 reads per window here).
        let mut sim = Sim::new(2_000_000_000, 1_000);
        sim.stalls.push((601, 70_000_000_000));
        sim.stalls.push((1_700, 5_000_000_000));
        let cal = calibrate(&mut sim, None, None, |_, _| {});
        assert!(cal.trusted, "{cal:?}");
        assert_eq!(cal.rounds, 1);
        assert!(within(cal.hz, 2_000_000_000, 5_000), "{cal}");
    }

    #[test]
    fn a_pit_that_does_not_count_is_reported() {
        struct Dead(u64);
        impl Clocks for Dead {
            fn tsc(&mut self) -> u64 {
                self.0 += 100;
                self.0
            }
            fn pit(&mut self) -> u16 {
                0
            }
        }
        let cal = calibrate(&mut Dead(0), None, None, |_, _| {});
        assert_eq!((cal.method, cal.trusted), (Method::Guess, false));
        assert!(cal.to_string().contains("UNRELIABLE"));
        let r = Some((ReferenceSource::Cpuid16, 2_400_000_000));
        let cal = calibrate(&mut Dead(0), None, r, |_, _| {});
        assert_eq!(
            (cal.method, cal.trusted, cal.hz),
            (Method::Reference, false, 2_400_000_000)
        );
    }

    #[test]
    fn a_disagreeing_reference_makes_it_untrusted() {
        let mut sim = Sim::new(2_000_000_000, 1_000);
        let r = Some((ReferenceSource::Cpuid15, 3_000_000_000));
        let cal = calibrate(&mut sim, None, r, |_, _| {});
        assert!(
            !cal.trusted && within(cal.hz, 2_000_000_000, 5_000),
            "{cal:?}"
        );
        assert!(
            cal.to_string()
                .ends_with("UNRELIABLE (CPU-reported rate disagrees)")
        );
        let mut sim = Sim::new(2_000_000_000, 1_000);
        let r = Some((ReferenceSource::Hypervisor, 2_010_000_000));
        assert!(calibrate(&mut sim, None, r, |_, _| {}).trusted);
    }

    #[test]
    fn windows_that_never_agree_are_untrusted() {
        // Every other window is hit by a stall longer than a wrap: never a majority.
        let mut sim = Sim::new(2_000_000_000, 1_000);
        for k in 0..200 {
            sim.stalls
                .push((49 + 201 * k, 60_000_000_000 + 7_000_000_000 * k as u128));
        }
        let mut seen = 0;
        let cal = calibrate(&mut sim, None, None, |_, _| seen += 1);
        assert!(!cal.trusted, "{cal:?}");
        assert_eq!(cal.method, Method::Disagreeing);
        assert_eq!((cal.rounds, seen), (ROUNDS, ROUNDS as usize * WINDOWS));
        assert!(
            cal.to_string()
                .contains("UNRELIABLE (PIT windows disagree)")
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// 256 cases: any rate, PIT reading cost, boot-work length and up to three stalls
        /// anywhere (inside readings or between them, up to 200 ms): a trusted result is within
        /// the tolerance of the truth, and with at most one stall the result is trusted.
        #[test]
        fn trusted_means_right(
            tsc_mhz in 100u64..8_000,
            pit_cost_ns in 100u64..4_000,
            work_us in 0u64..1_500_000,
            stalls in proptest::collection::vec((1u64..4_000, 0u64..200_000), 0..4),
        ) {
            let truth = tsc_mhz * 1_000_000;
            let mut sim = Sim::new(truth, pit_cost_ns);
            sim.stalls = stalls
                .iter()
                .map(|&(at, us)| (at, u128::from(us) * 1_000_000))
                .collect();
            let before = sim.tsc();
            sim.pit_start = sim.ps;
            let start = start_bracket(before, sim.tsc());
            sim.work(work_us * 1000);
            let cal = calibrate(&mut sim, Some(start), None, |_, _| {});
            prop_assert!(cal.hz > 0);
            if cal.trusted {
                prop_assert!(within(cal.hz, truth, TOLERANCE_PPM), "{:?} truth {}", cal, truth);
            }
            if stalls.len() <= 1 {
                prop_assert!(cal.trusted, "{:?}", cal);
            }
            if cal.method == Method::BootWindow {
                // Its wraps were counted right: the figure is as good as the long window.
                prop_assert!(within(cal.hz, truth, 5_000), "{:?} truth {}", cal, truth);
            }
        }
    }
}
