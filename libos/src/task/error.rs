//! Why a spawn failed; how a task ended ([`TaskError`] is the scheduler's, re-exported).

use core::fmt;

pub use crate::sched::TaskError;

/// Why [`spawn`](super::spawn) failed. The caller keeps running; nothing leaked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnError {
    /// Not enough memory for the address space or the stack.
    OutOfMemory,
    /// The templates cannot be attached together (e.g. two claim the same 1 GiB slot).
    Layout(templates::Error),
    /// Every kernel-stack slot is in use.
    TooManyTasks,
    /// [`Builder::stack_size`](super::Builder::stack_size) asked for more than a kernel-stack slot holds.
    StackTooLarge {
        /// The size asked for, in bytes.
        requested: u64,
        /// The largest stack there is, in bytes.
        max: u64,
    },
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::OutOfMemory => write!(f, "out of memory"),
            SpawnError::Layout(e) => write!(f, "bad template layout: {e}"),
            SpawnError::TooManyTasks => {
                write!(f, "too many tasks (every kernel-stack slot is in use)")
            }
            SpawnError::StackTooLarge { requested, max } => write!(
                f,
                "stack of {requested} bytes asked for; the largest is {max} bytes"
            ),
        }
    }
}

impl SpawnError {
    /// The same error with everything it holds allocated anew in app context (see
    /// [`crate::space::rehome_error`]).
    pub(super) fn rehome(self) -> Self {
        match self {
            SpawnError::Layout(e) => SpawnError::Layout(crate::space::rehome_error(e)),
            e => e,
        }
    }
}

/// `e` with its text copied into the running task's heap (app context): a libos-made `String`
/// lives in the kernel heap, and an app-owned value pointing there would be duplicated, not
/// copied, when the app forks (`docs/ARCHITECTURE.md`, "Tasks as processes").
pub(super) fn rehome_task_error(e: TaskError) -> TaskError {
    use alloc::string::String;
    match e {
        TaskError::Panic(m) => TaskError::Panic(String::from(m.as_str())),
        TaskError::Fault { addr, rip, cause } => TaskError::Fault {
            addr,
            rip,
            cause: String::from(cause.as_str()),
        },
        e => e,
    }
}
