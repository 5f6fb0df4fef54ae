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

/// A lock for a task's own data (a `static` with interior mutability, say): a task waiting for it
/// yields. Like every value in a task's memory (its heap, its statics), it is the task's own: a
/// spawned child gets its own copy (locked, if the parent held it at the spawn, as with fork()),
/// so it never orders two tasks; between tasks, use a channel or a [`crate::shared::Shared`]
/// value (a lock kept by libos, on data in a shared heap).
/// A task that dies while holding it takes its copy with it.
///
/// ```no_run
/// use libos::sync::Mutex;
/// static COUNTER: Mutex<u64> = Mutex::new(0);
/// *COUNTER.lock() += 1;
/// ```
pub type Mutex<T> = lock_api::Mutex<RawTaskLock, T>;

/// Guard of a [`Mutex`].
pub type MutexGuard<'a, T> = lock_api::MutexGuard<'a, RawTaskLock, T>;
