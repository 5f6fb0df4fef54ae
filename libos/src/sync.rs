//! Locks.
//!
//! [`Mutex`] is the lock for apps: waiting for it yields the CPU, and its holder may be preempted,
//! yield, block or print.
//!
//! libos's own locks are not here: the kernel heap, the frame bitmap, the console and the kernel
//! page tables use `arch::irq::IrqMutex`, which keeps interrupts off while held (crate-private:
//! code holding one must not yield, block or run app code).

use core::sync::atomic::{AtomicBool, Ordering};

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
