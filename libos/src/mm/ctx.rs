//! Which heap an allocation goes to: the running task's own heap (app code) or the kernel heap
//! (libos's own state).
//!
//! App code allocates from its task's heap (`mm::pheap`, process memory: copied with the task
//! at spawn, thrown away with it). Everything libos keeps — the scheduler's tasks, page-table
//! bookkeeping, sockets, channel queues — must outlive any one task and be reachable from all,
//! so libos code that allocates runs *in kernel context*: inside a [`Kernel`] guard, in a trap
//! or interrupt handler, in the scheduler, or before the first task's process memory exists.
//! A free goes to whichever heap holds the block (by address), so a block may be freed in any
//! context.
//!
//! The depth is per task: a switch saves it on the outgoing task's stack and restores it when
//! that task runs again (`task::glue`), so a task preempted inside libos does not make the next
//! task's app code allocate from the kernel heap.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Nesting depth of kernel context on this CPU (for the running task).
#[cfg(not(test))]
static DEPTH: AtomicUsize = AtomicUsize::new(0);
/// Set once the first task's process memory (and so its heap) exists.
#[cfg(not(test))]
static READY: AtomicBool = AtomicBool::new(false);
/// The running task's holds ([`hold`]; [`app`] callbacks count as one).
#[cfg(not(test))]
static HOLD: AtomicUsize = AtomicUsize::new(0);

// Host tests run on several threads at once: each gets its own "CPU".
#[cfg(test)]
std::thread_local! {
    static DEPTH_T: AtomicUsize = const { AtomicUsize::new(0) };
    static READY_T: AtomicBool = const { AtomicBool::new(false) };
    static HOLD_T: AtomicUsize = const { AtomicUsize::new(0) };
}
#[cfg(test)]
struct Tl<T: 'static>(&'static std::thread::LocalKey<T>);
#[cfg(test)]
impl Tl<AtomicUsize> {
    fn load(&self, o: Ordering) -> usize {
        self.0.with(|a| a.load(o))
    }
    fn store(&self, v: usize, o: Ordering) {
        self.0.with(|a| a.store(v, o))
    }
    fn swap(&self, v: usize, o: Ordering) -> usize {
        self.0.with(|a| a.swap(v, o))
    }
    fn fetch_add(&self, v: usize, o: Ordering) -> usize {
        self.0.with(|a| a.fetch_add(v, o))
    }
    fn fetch_sub(&self, v: usize, o: Ordering) -> usize {
        self.0.with(|a| a.fetch_sub(v, o))
    }
}
#[cfg(test)]
impl Tl<AtomicBool> {
    fn load(&self, o: Ordering) -> bool {
        self.0.with(|a| a.load(o))
    }
    fn store(&self, v: bool, o: Ordering) {
        self.0.with(|a| a.store(v, o))
    }
}
#[cfg(test)]
static DEPTH: Tl<AtomicUsize> = Tl(&DEPTH_T);
#[cfg(test)]
static READY: Tl<AtomicBool> = Tl(&READY_T);
#[cfg(test)]
static HOLD: Tl<AtomicUsize> = Tl(&HOLD_T);

/// Kernel context while it lives: allocations go to the kernel heap.
#[must_use = "kernel context ends when the guard is dropped"]
#[derive(Debug)]
pub(crate) struct Kernel(());

/// Enters kernel context until the guard is dropped (nests).
pub(crate) fn kernel() -> Kernel {
    DEPTH.fetch_add(1, Ordering::Relaxed);
    Kernel(())
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // Back in the task's own code (no hold either): a kill point.
        if DEPTH.fetch_sub(1, Ordering::Relaxed) == 1 && HOLD.load(Ordering::Relaxed) == 0 {
            kill_point();
        }
    }
}

/// A kill that waited for the running task (it was preempted inside libos) is carried out now,
/// if it can be (`task::glue::end_if_killed`): called where the task leaves libos for its own
/// code. May not return.
fn kill_point() {
    #[cfg(target_os = "none")]
    crate::arch::cpu::kill_hook();
}

/// While it lives, a kill of the running task waits (see [`hold`]).
#[must_use = "the hold ends when the guard is dropped"]
#[derive(Debug)]
pub(crate) struct Hold(());

/// Holds off kills of the running task until the guard is dropped (nests): for libos code that
/// keeps, in app context or on its stack only, something an end would leak — a builder's state
/// while the app's fill runs, an error on its way to being copied into the task's heap. A kill
/// that came meanwhile is carried out when the last hold ends outside kernel context. A hold is
/// saved across a switch with the depth.
pub(crate) fn hold() -> Hold {
    HOLD.fetch_add(1, Ordering::Relaxed);
    Hold(())
}

impl Drop for Hold {
    fn drop(&mut self) {
        if HOLD.fetch_sub(1, Ordering::Relaxed) == 1 && DEPTH.load(Ordering::Relaxed) == 0 {
            kill_point();
        }
    }
}

/// True when an allocation now goes to the running task's heap.
pub(crate) fn in_app() -> bool {
    DEPTH.load(Ordering::Relaxed) == 0 && READY.load(Ordering::Relaxed)
}

/// The running task's depth (saved across a switch).
pub(crate) fn depth() -> usize {
    DEPTH.load(Ordering::Relaxed)
}

/// Restores a depth saved by [`depth`] (after a switch back into the task that saved it).
pub(crate) fn set_depth(d: usize) {
    DEPTH.store(d, Ordering::Relaxed);
}

/// Runs app code `f` (a callback an app gave libos) in app context, whatever the depth now: what
/// it allocates and keeps belongs to the task.
///
/// While `f` runs the task is still inside libos code that holds state of its own (the
/// callback's caller), so kills wait ([`hold`]).
pub(crate) fn app<R>(f: impl FnOnce() -> R) -> R {
    let d = DEPTH.swap(0, Ordering::Relaxed);
    HOLD.fetch_add(1, Ordering::Relaxed);
    let r = f();
    HOLD.fetch_sub(1, Ordering::Relaxed);
    DEPTH.store(d, Ordering::Relaxed);
    r
}

/// The running task's holds ([`hold`], and [`app`] callbacks), saved across a switch like the
/// depth.
pub(crate) fn holds() -> usize {
    HOLD.load(Ordering::Relaxed)
}

/// Restores holds saved by [`holds`] (after a switch back into the task that saved them).
pub(crate) fn set_holds(n: usize) {
    HOLD.store(n, Ordering::Relaxed);
}

/// True once the first task's process memory exists.
pub(crate) fn ready() -> bool {
    READY.load(Ordering::Relaxed)
}

/// From now on app code allocates from its task's heap (boot calls this once the first task's
/// process memory is mapped).
pub(crate) fn set_ready() {
    READY.store(true, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_nest_and_app_callbacks_leave_kernel_context() {
        set_ready();
        assert!(in_app());
        {
            let _k = kernel();
            assert!(!in_app());
            let inner = app(|| {
                assert!(in_app());
                let _k2 = kernel();
                in_app()
            });
            assert!(!inner);
            assert!(!in_app(), "app() restores the depth it found");
        }
        assert!(in_app());
    }
}
