//! Locks.
//!
//! [`Mutex`] is the lock for apps: waiting for it yields the CPU, and its holder may be preempted,
//! yield, block or print.
//!
//! Inside libos, a plain spin lock taken by code that an interrupt (or the preempting timer) can
//! stop would deadlock if the interrupt handler or the next task asked for it. `RawIrqSpinlock`
//! (crate-private, as `IrqMutex`) disables interrupts while held and restores the previous state
//! on release; the kernel heap, the frame bitmap, the console and the kernel page tables use it.
//! Code holding one must not yield, sleep or block (the scheduler panics with "yield while
//! holding a kernel lock" instead of freezing with interrupts off) and must not run app code;
//! that is why these locks are not part of the public API.

use ::x86_64::instructions::interrupts;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How many [`RawIrqSpinlock`]s are held right now (one CPU). A task that fails while this is
/// non-zero dies holding a kernel lock, and the system cannot go on safely.
static IRQ_LOCKS_HELD: AtomicUsize = AtomicUsize::new(0);

/// Number of interrupt-disabling kernel locks currently held.
pub(crate) fn irq_locks_held() -> usize {
    IRQ_LOCKS_HELD.load(Ordering::Relaxed)
}

/// A spin lock that keeps interrupts off while held (a `lock_api::RawMutex`).
#[derive(Debug)]
pub(crate) struct RawIrqSpinlock {
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
        IRQ_LOCKS_HELD.fetch_add(1, Ordering::Relaxed);
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
            IRQ_LOCKS_HELD.fetch_add(1, Ordering::Relaxed);
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
        IRQ_LOCKS_HELD.fetch_sub(1, Ordering::Relaxed);
        self.locked.store(false, Ordering::Release);
        if were_on {
            interrupts::enable();
        }
    }
}

/// A mutex that keeps interrupts off while held. Never hold one across a yield, a block, or a
/// call into app code.
pub(crate) type IrqMutex<T> = lock_api::Mutex<RawIrqSpinlock, T>;

/// A lock for tasks: waiting for it yields the CPU to other tasks (interrupts stay on, so the
/// holder gets to run and release it).
#[derive(Debug)]
pub struct RawTaskLock {
    locked: AtomicBool,
}

// SAFETY: `lock` returns only after this caller set `locked` from false to true (Acquire);
// `unlock` clears it (Release): mutual exclusion holds.
unsafe impl lock_api::RawMutex for RawTaskLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawTaskLock {
        locked: AtomicBool::new(false),
    };
    type GuardMarker = lock_api::GuardSend;

    fn lock(&self) {
        while !self.try_lock() {
            crate::task::yield_now();
        }
    }

    fn try_lock(&self) -> bool {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    unsafe fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }
}

/// The lock libos offers apps, e.g. for data in a [`crate::shared::SharedHeap`]. It lives in the
/// kernel heap or a static, which every task shares; a task waiting for it yields to the others.
/// A task that dies (fault, panic, kill) while holding it leaves it locked: tasks that then wait
/// for it wait forever, the rest of the system goes on.
///
/// ```no_run
/// use libos::sync::Mutex;
/// static COUNTER: Mutex<u64> = Mutex::new(0);
/// *COUNTER.lock() += 1;
/// ```
pub type Mutex<T> = lock_api::Mutex<RawTaskLock, T>;

/// Guard of a [`Mutex`].
pub type MutexGuard<'a, T> = lock_api::MutexGuard<'a, RawTaskLock, T>;
