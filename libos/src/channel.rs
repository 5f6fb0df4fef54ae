//! Bounded channels between tasks (multi-producer, multi-consumer).
//!
//! The queue lives in the kernel heap, which every task's address space shares, so values move
//! between tasks without copying through templates. A full [`Sender::send`] or an empty
//! [`Receiver::recv`] yields to other tasks until it can proceed (tasks are preempted by the
//! timer, so a producer always gets to run). When every sender is gone, `recv` drains what is
//! left and then returns `None`; when every receiver is gone, `send` gives the value back.
//!
//! **What may be sent**: plain data, valid in any address space — types with `zerocopy`'s
//! [`IntoBytes`] (integers, arrays, `#[derive(IntoBytes)]` structs: no pointers, no padding that
//! could carry one task's bytes to another). A pointer into the sender's memory would mean
//! nothing (or something else) in the receiver's, so `Box`, `Vec`, `String` and references do
//! not compile:
//!
//! ```compile_fail,E0277
//! extern crate alloc;
//! let (tx, rx) = libos::channel::bounded::<alloc::boxed::Box<u8>>(1); // refused
//! ```
//!
//! ```compile_fail,E0277
//! let (tx, rx) = libos::channel::bounded::<&'static str>(1); // refused
//! ```
//!
//! **Ownership**: each end is a handle ([`crate::handle::Owned`]) owned by the task that made it
//! (`bounded` or `clone`). Only the owner may use it: in any other task (a child holding a forked
//! copy) `send`, `recv` and the other calls panic, naming the end and its owner, which ends only
//! that task. The owner's drop releases the end (a forked copy's drop does nothing), and when the
//! owner ends, however it ends, the kernel releases every end it still owns, so the other side
//! sees the channel close. Ends are not `Send`: a child gets one by a give ([`Give`], e.g.
//! `libos::task::spawn_with`), not by capturing it.
//!
//! ```compile_fail,E0277
//! let (tx, rx) = libos::channel::bounded::<u64>(16);
//! libos::task::spawn(&[], move || tx.send(1).is_ok() as i32); // refused: not `Send`
//! ```
//!
//! ```no_run
//! let (tx, rx) = libos::channel::bounded::<u64>(16);
//! let worker = libos::task::spawn_with(&[], tx, |tx| {
//!     tx.send(42).expect("receiver alive");
//!     0
//! })
//! .expect("spawn");
//! assert_eq!(rx.recv(), Some(42));
//! worker.join().expect("worker");
//! ```

use alloc::collections::VecDeque;
use alloc::sync::Arc;

pub use zerocopy::IntoBytes;

use crate::arch::irq::IrqMutex;
use crate::handle::{Give, Owned};

#[derive(Debug)]
struct State<T> {
    queue: VecDeque<T>,
    cap: usize,
    senders: usize,
    receivers: usize,
}

/// One end, in the kernel: the queue, and which side it counts on. Dropping it uncounts it.
#[derive(Debug)]
struct End<T> {
    state: Arc<IrqMutex<State<T>>>,
    sender: bool,
}

impl<T> End<T> {
    fn new(state: Arc<IrqMutex<State<T>>>, sender: bool) -> End<T> {
        {
            let mut s = state.lock();
            if sender {
                s.senders += 1;
            } else {
                s.receivers += 1;
            }
        }
        End { state, sender }
    }
}

impl<T> Drop for End<T> {
    fn drop(&mut self) {
        let mut s = self.state.lock();
        if self.sender {
            s.senders -= 1;
        } else {
            s.receivers -= 1;
        }
    }
}

/// The sending half. Clone it for more producers. A handle owned by one task (see the
/// [module docs](self)).
#[derive(Debug)]
pub struct Sender<T: IntoBytes + Send + 'static> {
    end: Owned<End<T>>,
}

/// The receiving half. Clone it for more consumers. A handle owned by one task (see the
/// [module docs](self)).
#[derive(Debug)]
pub struct Receiver<T: IntoBytes + Send + 'static> {
    end: Owned<End<T>>,
}

/// `send` failed because every receiver is gone; the value comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnected<T>(pub T);

impl<T> core::fmt::Display for Disconnected<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("every receiver of the channel is gone")
    }
}

/// The channel is empty and every sender is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// Why `try_send` did not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The channel is full.
    Full(T),
    /// Every receiver is gone.
    Disconnected(T),
}

/// A channel holding at most `cap` values. A `cap` of 0 is taken as 1; any larger `cap` is
/// accepted as given (`usize::MAX`: in effect unbounded). Room for at most
/// [`CHANNEL_PREALLOC`](crate::limits::CHANNEL_PREALLOC) values is allocated up front and the
/// queue grows as values arrive; when the kernel heap cannot grow it, the channel counts as full
/// (`try_send` gives [`TrySendError::Full`], `send` waits for a receiver to make room).
///
/// ```no_run
/// let (tx, rx) = libos::channel::bounded::<[u8; 3]>(4);
/// tx.send(*b"job").expect("receiver alive");
/// drop(tx);
/// assert_eq!(rx.recv(), Some(*b"job"));
/// assert_eq!(rx.recv(), None); // every sender is gone
/// ```
pub fn bounded<T: IntoBytes + Send + 'static>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let _k = crate::mm::ctx::kernel();
    let cap = cap.max(1);
    // Interrupts off until both ends are in the registry: a task preempted (and then killed)
    // with the queue on its stack only would leak it (see `Sender::try_send`).
    crate::arch::irq::without(|_| {
        let state = Arc::new(IrqMutex::new(State {
            queue: VecDeque::with_capacity(crate::limits::channel_prealloc(cap)),
            cap,
            senders: 0,
            receivers: 0,
        }));
        (
            Sender {
                end: Owned::new(End::new(state.clone(), true)),
            },
            Receiver {
                end: Owned::new(End::new(state, false)),
            },
        )
    })
}

/// Runs `f` on the queue of `end`, if the running task owns it; else a panic naming the end and
/// its owner.
///
/// Nothing of the queue is held on the stack outside the registry's `with` (no `Arc` clone): a
/// task preempted here and then killed never runs again, so whatever its stack holds is never
/// dropped, while the registry releases the object it was using (the use ends with the task).
fn with_queue<T, R>(end: &Owned<End<T>>, f: impl FnOnce(&mut State<T>) -> R) -> R
where
    T: Send + 'static,
{
    end.with(|e| f(&mut e.state.lock()))
}

/// Another end on the queue of `end` (a sender if `sender`), owned by the running task.
fn another_end<T: Send + 'static>(end: &Owned<End<T>>, sender: bool) -> Owned<End<T>> {
    let _k = crate::mm::ctx::kernel();
    // Interrupts off from the `Arc` clone until the new end is in the registry (as in `bounded`).
    crate::arch::irq::without(|_| {
        let state = end.with(|e| e.state.clone());
        Owned::new(End::new(state, sender))
    })
}

impl<T: IntoBytes + Send + 'static> Sender<T> {
    /// Sends without waiting.
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        let _k = crate::mm::ctx::kernel();
        with_queue(&self.end, |s| {
            if s.receivers == 0 {
                return Err(TrySendError::Disconnected(value));
            }
            if s.queue.len() >= s.cap || s.queue.try_reserve(1).is_err() {
                return Err(TrySendError::Full(value));
            }
            s.queue.push_back(value);
            Ok(())
        })
    }

    /// Sends, waiting (yielding) while the channel is full.
    pub fn send(&self, mut value: T) -> Result<(), Disconnected<T>> {
        let _k = crate::mm::ctx::kernel();
        loop {
            match self.try_send(value) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(v)) => return Err(Disconnected(v)),
                Err(TrySendError::Full(v)) => {
                    value = v;
                    crate::task::yield_now();
                }
            }
        }
    }
}

impl<T: IntoBytes + Send + 'static> Receiver<T> {
    /// Receives without waiting: `Ok(None)` when empty, `Err(Closed)` when empty and every
    /// sender is gone.
    pub fn try_recv(&self) -> Result<Option<T>, Closed> {
        let _k = crate::mm::ctx::kernel();
        with_queue(&self.end, |s| match s.queue.pop_front() {
            Some(v) => Ok(Some(v)),
            None if s.senders == 0 => Err(Closed),
            None => Ok(None),
        })
    }

    /// Receives, waiting (yielding) while the channel is empty; `None` once it is empty and
    /// every sender is gone.
    pub fn recv(&self) -> Option<T> {
        let _k = crate::mm::ctx::kernel();
        loop {
            match self.try_recv() {
                Ok(Some(v)) => return Some(v),
                Err(Closed) => return None,
                Ok(None) => crate::task::yield_now(),
            }
        }
    }

    /// Values currently queued.
    pub fn len(&self) -> usize {
        let _k = crate::mm::ctx::kernel();
        with_queue(&self.end, |s| s.queue.len())
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: IntoBytes + Send + 'static> Clone for Sender<T> {
    /// Another sender, owned by the running task (which must own `self`).
    fn clone(&self) -> Self {
        Sender {
            end: another_end(&self.end, true),
        }
    }
}

impl<T: IntoBytes + Send + 'static> Clone for Receiver<T> {
    /// Another receiver, owned by the running task (which must own `self`).
    fn clone(&self) -> Self {
        Receiver {
            end: another_end(&self.end, false),
        }
    }
}

impl<T: IntoBytes + Send + 'static> crate::handle::sealed::Sealed for Sender<T> {}

impl<T: IntoBytes + Send + 'static> Give for Sender<T> {
    fn give_to(&self, task: u64) {
        self.end.give_to(task);
    }
}

impl<T: IntoBytes + Send + 'static> crate::handle::sealed::Sealed for Receiver<T> {}

impl<T: IntoBytes + Send + 'static> Give for Receiver<T> {
    fn give_to(&self, task: u64) {
        self.end.give_to(task);
    }
}
