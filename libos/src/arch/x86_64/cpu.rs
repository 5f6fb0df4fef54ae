//! CPU feature detection and control registers.

use core::arch::x86_64::__cpuid;

/// Features Stencil cares about.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    /// 1 GiB pages (`pdpe1gb`).
    pub huge_1g: bool,
    /// No-execute bit.
    pub nx: bool,
    /// Global pages.
    pub pge: bool,
}

/// Reads the CPU's features.
pub fn features() -> Features {
    // CPUID leaves 1 and 0x8000_0001 exist on every x86_64 CPU.
    let l1 = __cpuid(1);
    let ext = __cpuid(0x8000_0001);
    Features {
        huge_1g: ext.edx & (1 << 26) != 0,
        nx: ext.edx & (1 << 20) != 0,
        pge: l1.edx & (1 << 13) != 0,
    }
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects; CR4.TSD is clear (ring 0 anyway).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Enables global pages (CR4.PGE) if the CPU has them.
pub fn enable_global_pages() {
    use ::x86_64::registers::control::{Cr4, Cr4Flags};
    if features().pge {
        // SAFETY: setting PGE only changes how the TLB keeps global entries; the kernel half is
        // the same in every address space, which is what global entries assume.
        unsafe { Cr4::update(|f| f.insert(Cr4Flags::PAGE_GLOBAL)) };
    }
}
