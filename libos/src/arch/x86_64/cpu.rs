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

/// Executes CPUID for `leaf` (sub-leaf 0).
#[inline]
pub fn cpuid(leaf: u32) -> core::arch::x86_64::CpuidResult {
    __cpuid(leaf)
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

/// The frame-pointer register (RBP): the head of the frame chain for a backtrace (libos and apps
/// are built with frame pointers).
#[inline(always)]
pub fn frame_pointer() -> u64 {
    let rbp: u64;
    // SAFETY: reads a register; no memory access.
    unsafe {
        core::arch::asm!("mov {}, rbp", out(reg) rbp, options(nomem, nostack, preserves_flags))
    };
    rbp
}

/// Switches to the stack whose top is `top` and calls `f` there; `f` never returns, and nothing
/// on the old stack is used again.
///
/// # Safety
/// `top` must be the 16-byte-aligned top of a mapped, writable stack that nothing else uses.
pub unsafe fn run_on_stack(top: u64, f: extern "C" fn() -> !) -> ! {
    // SAFETY: the caller guarantees the stack; `f` never returns, so the old stack is abandoned.
    unsafe {
        core::arch::asm!(
            "mov rsp, {top}",
            "xor ebp, ebp",
            "call {f}",
            "ud2",
            top = in(reg) top,
            f = in(reg) f,
            options(noreturn)
        )
    }
}

/// The id of the task running on this CPU (0: the app's `main`; while idle, the task the CPU
/// idles on). The scheduler's glue sets it on every switch; layers below the task module (the
/// object registry) read it. One CPU for now: one value.
static RUNNING_TASK: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The running task's id (see [`RUNNING_TASK`]).
pub fn running_task() -> u64 {
    RUNNING_TASK.load(core::sync::atomic::Ordering::Relaxed)
}

/// Records the task now running on this CPU.
pub fn set_running_task(id: u64) {
    RUNNING_TASK.store(id, core::sync::atomic::Ordering::Relaxed);
}

/// A kill waits for the running task (set on every switch by the scheduler's glue): kernel
/// context's guard calls [`kill_hook`] where the task leaves libos. One CPU: one value.
static KILL_PENDING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
/// What the scheduler's glue registered to end the running task (`task::glue::end_if_killed`);
/// layers below the task module call it without depending on it.
static KILL_HOOK: spin::Once<fn()> = spin::Once::new();

/// Records whether a kill waits for the task now running.
pub fn set_kill_pending(pending: bool) {
    KILL_PENDING.store(pending, core::sync::atomic::Ordering::Relaxed);
}

/// Registers the function that ends the running task when a kill waits for it.
pub fn set_kill_hook(f: fn()) {
    KILL_HOOK.call_once(|| f);
}

/// Ends the running task if a kill waits for it (may not return).
pub fn kill_hook() {
    if KILL_PENDING.load(core::sync::atomic::Ordering::Relaxed)
        && let Some(f) = KILL_HOOK.get()
    {
        f();
    }
}
