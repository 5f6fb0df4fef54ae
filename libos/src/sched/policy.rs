//! The fault policy's decision, as a pure function: given how the running code failed, whether
//! it is a spawned task and how many kernel locks it holds, end only that task or end the app
//! with which reserved exit code. `fault.rs` (traps and panics) and `task::fail_current` act on
//! it.

use stencil_abi::ExitCode;

/// How the running code failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A CPU exception it caused (an unresolved page fault, any other exception).
    Fault,
    /// It hit its stack's guard page.
    StackOverflow,
    /// It panicked; `oom` when the panic is the kernel heap failing to grow.
    Panic {
        /// The panic reports a kernel-heap allocation that failed.
        oom: bool,
    },
}

/// Why the app must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The app's `main` failed.
    MainTask,
    /// A spawned task failed inside a kernel critical section (holding an interrupt-disabling
    /// lock): the lock would stay taken, with every other task waiting on it with interrupts
    /// off, so the system cannot go on safely.
    LockHeld,
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// End only the running task (its joiner gets the `TaskError`); the app goes on.
    EndTask,
    /// End the app with `code`.
    EndApp {
        /// The reserved exit code for the failure.
        code: ExitCode,
        /// Why the app cannot go on.
        reason: Reason,
    },
}

/// The decision: `spawned` is true when a spawned task (not the app's `main`) is running,
/// `locks_held` how many interrupt-disabling kernel locks are held.
pub fn decide(failure: Failure, spawned: bool, locks_held: usize) -> Verdict {
    let reason = match (spawned, locks_held) {
        (true, 0) => return Verdict::EndTask,
        (true, _) => Reason::LockHeld,
        (false, _) => Reason::MainTask,
    };
    let code = match failure {
        Failure::Fault => ExitCode::EXCEPTION,
        Failure::StackOverflow => ExitCode::STACK_OVERFLOW,
        // Out of memory is reported as such only for `main`: inside a lock the report is the
        // lock, and the heap may be what is locked.
        Failure::Panic { oom: true } if reason == Reason::MainTask => ExitCode::OUT_OF_MEMORY,
        Failure::Panic { .. } => ExitCode::PANIC,
    };
    Verdict::EndApp { code, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Failure; 4] = [
        Failure::Fault,
        Failure::StackOverflow,
        Failure::Panic { oom: false },
        Failure::Panic { oom: true },
    ];

    #[test]
    fn a_spawned_task_without_locks_ends_alone() {
        for f in ALL {
            assert_eq!(decide(f, true, 0), Verdict::EndTask, "{f:?}");
        }
    }

    #[test]
    fn a_spawned_task_inside_a_kernel_critical_section_ends_the_app() {
        let code = |f| match decide(f, true, 1) {
            Verdict::EndApp {
                code,
                reason: Reason::LockHeld,
            } => code,
            v => panic!("{f:?}: {v:?}"),
        };
        assert_eq!(code(Failure::Fault), ExitCode::EXCEPTION);
        assert_eq!(code(Failure::StackOverflow), ExitCode::STACK_OVERFLOW);
        assert_eq!(code(Failure::Panic { oom: false }), ExitCode::PANIC);
        assert_eq!(code(Failure::Panic { oom: true }), ExitCode::PANIC);
        for f in ALL {
            assert_eq!(decide(f, true, 3), decide(f, true, usize::MAX), "{f:?}");
        }
    }

    #[test]
    fn main_failing_ends_the_app_with_the_reserved_code() {
        for locks in [0, 2] {
            let code = |f| match decide(f, false, locks) {
                Verdict::EndApp {
                    code,
                    reason: Reason::MainTask,
                } => code,
                v => panic!("{f:?}: {v:?}"),
            };
            assert_eq!(code(Failure::Fault), ExitCode::EXCEPTION);
            assert_eq!(code(Failure::StackOverflow), ExitCode::STACK_OVERFLOW);
            assert_eq!(code(Failure::Panic { oom: false }), ExitCode::PANIC);
            assert_eq!(code(Failure::Panic { oom: true }), ExitCode::OUT_OF_MEMORY);
        }
    }
}
