//! Interrupts on and off, and the locks that keep them off.
//!
//! A plain spin lock taken by code that an interrupt (or the preempting timer) can stop would
//! deadlock if the interrupt handler or the next task asked for it. [`RawIrqSpinlock`] (as
//! [`IrqMutex`]) disables interrupts while held and restores the previous state on release; the
//! kernel heap, the frame bitmap, the console and the kernel page tables use it. Code holding one
//! must not yield, sleep or block (the scheduler panics with "yield while holding a kernel lock"
//! instead of freezing with interrupts off) and must not run app code; that is why these locks
//! are not part of the public API.
//!
//! [`IrqOff`] says that the caller turned interrupts off: only [`without`] makes one, for its
//! closure. State that only code with interrupts off may touch (the scheduler's) asks for it.
//! It is not a proof against everything: code holding it can still call [`enable`] (the idle
//! wait does, between two uses of the scheduler), so such state keeps its own overlap check.

use ::x86_64::instructions::interrupts;
use core::marker::PhantomData;

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How many [`RawIrqSpinlock`]s are held right now (one CPU). A task that fails while this is
/// non-zero dies holding a kernel lock, and the system cannot go on safely.
static IRQ_LOCKS_HELD: AtomicUsize = AtomicUsize::new(0);

/// Whether interrupts were on when the outermost of the held locks was taken: they come back on
/// only when the last held lock is released, whatever order the guards are dropped in (a
/// per-lock flag would turn them on while an inner lock is still held if an outer guard is
/// dropped first). One CPU; with several this becomes per-CPU state.
static IRQS_WERE_ON: AtomicBool = AtomicBool::new(false);

/// Number of interrupt-disabling kernel locks currently held.
pub fn irq_locks_held() -> usize {
    IRQ_LOCKS_HELD.load(Ordering::Relaxed)
}

/// Counts a lock just taken (interrupts are off); `were_on` is the state before it.
fn held_one_more(were_on: bool) {
    if IRQ_LOCKS_HELD.fetch_add(1, Ordering::Relaxed) == 0 {
        IRQS_WERE_ON.store(were_on, Ordering::Relaxed);
    }
}

/// A spin lock that keeps interrupts off while held (a `lock_api::RawMutex`).
#[derive(Debug)]
pub struct RawIrqSpinlock {
    locked: AtomicBool,
}

// SAFETY: `lock` only returns once this thread has set `locked` from false to true with Acquire
// ordering, and `unlock` releases it with Release ordering: mutual exclusion holds.
unsafe impl lock_api::RawMutex for RawIrqSpinlock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawIrqSpinlock {
        locked: AtomicBool::new(false),
    };
    type GuardMarker = lock_api::GuardNoSend;

    fn lock(&self) {
        let were_on = interrupts::are_enabled();
        interrupts::disable();
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        held_one_more(were_on);
    }

    fn try_lock(&self) -> bool {
        let were_on = interrupts::are_enabled();
        interrupts::disable();
        if self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            held_one_more(were_on);
            true
        } else {
            if were_on {
                interrupts::enable();
            }
            false
        }
    }

    unsafe fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
        if IRQ_LOCKS_HELD.fetch_sub(1, Ordering::Relaxed) == 1
            && IRQS_WERE_ON.load(Ordering::Relaxed)
        {
            interrupts::enable();
        }
    }
}

/// A mutex that keeps interrupts off while held. Never hold one across a yield, a block, or a
/// call into app code.
pub type IrqMutex<T> = lock_api::Mutex<RawIrqSpinlock, T>;

/// Proof that interrupts are off on this CPU, for as long as the value lives. Only [`without`]
/// makes one; it is neither `Send` nor `Sync`, and the closure gets it by reference, so it
/// cannot outlive the interrupts-off stretch or leave the CPU.
#[derive(Debug)]
pub struct IrqOff {
    _not_send: PhantomData<*const ()>,
}

/// Runs `f` with interrupts off, restoring the previous state afterwards.
#[inline]
pub fn without<R>(f: impl FnOnce(&IrqOff) -> R) -> R {
    interrupts::without_interrupts(|| {
        let token = IrqOff {
            _not_send: PhantomData,
        };
        f(&token)
    })
}

/// True when interrupts are on.
#[inline]
pub fn are_enabled() -> bool {
    interrupts::are_enabled()
}

/// Turns interrupts on.
#[inline]
pub fn enable() {
    interrupts::enable();
}

/// Turns interrupts off.
#[inline]
pub fn disable() {
    interrupts::disable();
}

/// Turns interrupts on and halts until the next one (atomically: `sti; hlt`).
#[inline]
pub fn enable_and_wait() {
    interrupts::enable_and_hlt();
}
