//! The local APIC timer: the preemption clock.
//!
//! xAPIC registers are memory-mapped (x2APIC needs QEMU ≥ 8 under TCG). The caller maps the page
//! uncached (at its direct-map address: it is not RAM, so the direct map left it out) and hands
//! the address to [`start_timer`]. The timer is
//! calibrated against the TSC (already calibrated against the PIT) and then runs periodically,
//! one tick per scheduling quantum.

use core::sync::atomic::{AtomicU64, Ordering};

use ::x86_64::registers::model_specific::Msr;

use super::cpu;

/// Vector of the APIC timer interrupt.
pub const TIMER_VECTOR: u64 = 48;
/// Vector of the APIC's spurious interrupt.
pub const SPURIOUS_VECTOR: u64 = 255;

const REG_TPR: u64 = 0x80;
const REG_EOI: u64 = 0xb0;
const REG_SVR: u64 = 0xf0;
const REG_LVT_TIMER: u64 = 0x320;
const REG_INIT_COUNT: u64 = 0x380;
const REG_CUR_COUNT: u64 = 0x390;
const REG_DIVIDE: u64 = 0x3e0;

static BASE: AtomicU64 = AtomicU64::new(0);

fn reg(offset: u64) -> *mut u32 {
    (BASE.load(Ordering::Relaxed) + offset) as *mut u32
}

fn write(offset: u64, value: u32) {
    // SAFETY: BASE maps the local APIC's register page (uncached); `offset` is a register.
    unsafe { reg(offset).write_volatile(value) }
}

fn read(offset: u64) -> u32 {
    // SAFETY: as in `write`.
    unsafe { reg(offset).read_volatile() }
}

/// Signals end of interrupt to the local APIC.
pub fn eoi() {
    if BASE.load(Ordering::Relaxed) != 0 {
        write(REG_EOI, 0);
    }
}

/// Physical address of the local APIC's register page, or `None` when the CPU has no usable
/// local APIC (none at all, globally disabled, or in x2APIC mode, where MMIO does nothing).
pub fn base_phys() -> Option<u64> {
    // CPUID.1:EDX bit 9: on-chip APIC.
    if core::arch::x86_64::__cpuid(1).edx & (1 << 9) == 0 {
        return None;
    }
    // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (checked above); reading it has no
    // side effects.
    let msr = unsafe { Msr::new(0x1b).read() };
    // Bit 11: the APIC is globally enabled; bit 10: x2APIC mode.
    if msr & (1 << 11) == 0 || msr & (1 << 10) != 0 {
        log::warn!("apic: disabled or in x2APIC mode (IA32_APIC_BASE {msr:#x}); no preemption");
        return None;
    }
    Some(msr & 0x000f_ffff_ffff_f000)
}

/// Enables the local APIC whose register page is mapped (uncached) at `mmio`, calibrates its
/// timer against the TSC (running at `tsc_hz`) and starts it with a period of `quantum_us`
/// microseconds. Returns the TSC cycles spent waiting in the calibration window.
///
/// # Safety
/// `mmio` must be the virtual address of the local APIC's register page ([`base_phys`]),
/// mapped uncached and writable, for as long as the system runs.
pub unsafe fn start_timer(mmio: u64, tsc_hz: u64, quantum_us: u64) -> u64 {
    BASE.store(mmio, Ordering::Relaxed);
    write(REG_TPR, 0);
    write(REG_SVR, (1 << 8) | SPURIOUS_VECTOR as u32);
    // Calibrate: divide by 16, count down from the top for 200 µs of TSC time (QEMU's APIC timer
    // runs at 1 GHz: ~12,500 ticks, so the rate is good to 0.01%).
    write(REG_DIVIDE, 0b0011);
    write(REG_LVT_TIMER, 1 << 16); // masked, one-shot
    write(REG_INIT_COUNT, u32::MAX);
    let hz = tsc_hz.max(1);
    let start = cpu::rdtsc();
    let window = hz / 5000;
    while cpu::rdtsc() - start < window {
        core::hint::spin_loop();
    }
    let ticks = u64::from(u32::MAX - read(REG_CUR_COUNT));
    let elapsed = cpu::rdtsc() - start;
    let ticks_per_ms =
        (u128::from(ticks) * u128::from(hz) / 1000 / u128::from(elapsed.max(1))).max(1) as u64;
    let count = (ticks_per_ms * quantum_us / 1000).clamp(1, u64::from(u32::MAX)) as u32;
    write(REG_LVT_TIMER, (1 << 17) | TIMER_VECTOR as u32); // periodic, unmasked
    write(REG_INIT_COUNT, count);
    log::debug!("apic: timer {ticks_per_ms} ticks/ms (÷16), quantum {quantum_us} us");
    elapsed
}
