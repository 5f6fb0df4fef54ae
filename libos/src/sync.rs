//! Locks that are safe against interrupts on one CPU.
//!
//! A plain spin lock taken by code that an interrupt (or, later, a preempting timer) can stop
//! would deadlock if the interrupt handler or the next task asked for it. [`RawIrqSpinlock`]
//! disables interrupts while held and restores the previous state on release; the heap and the
//! console use it.

use ::x86_64::instructions::interrupts;
use core::sync::atomic::{AtomicBool, Ordering};

/// A spin lock that keeps interrupts off while held (a `lock_api::RawMutex`).
#[derive(Debug)]
pub struct RawIrqSpinlock {
    locked: AtomicBool,
    irqs_were_on: AtomicBool,
}

// SAFETY: `lock` only returns once this thread has set `locked` from false to true with Acquire
// ordering, and `unlock` releases it with Release ordering: mutual exclusion holds.
unsafe impl lock_api::RawMutex for RawIrqSpinlock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawIrqSpinlock {
        locked: AtomicBool::new(false),
        irqs_were_on: AtomicBool::new(false),
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
        self.irqs_were_on.store(were_on, Ordering::Relaxed);
    }

    fn try_lock(&self) -> bool {
        let were_on = interrupts::are_enabled();
        interrupts::disable();
        if self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            self.irqs_were_on.store(were_on, Ordering::Relaxed);
            true
        } else {
            if were_on {
                interrupts::enable();
            }
            false
        }
    }

    unsafe fn unlock(&self) {
        let were_on = self.irqs_were_on.load(Ordering::Relaxed);
        self.locked.store(false, Ordering::Release);
        if were_on {
            interrupts::enable();
        }
    }
}

/// A mutex that keeps interrupts off while held.
pub type IrqMutex<T> = lock_api::Mutex<RawIrqSpinlock, T>;
