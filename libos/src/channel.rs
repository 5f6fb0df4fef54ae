//! Bounded channels between tasks (multi-producer, multi-consumer).
//!
//! The queue lives in the kernel heap, which every task's address space shares, so values move
//! between tasks without copying through templates. A full [`Sender::send`] or an empty
//! [`Receiver::recv`] yields to other tasks until it can proceed (tasks are preempted by the
//! timer, so a producer always gets to run). When every sender is gone, `recv` drains what is
//! left and then returns `None`; when every receiver is gone, `send` gives the value back.
//!
//! ```no_run
//! let (tx, rx) = libos::channel::bounded::<u64>(16);
//! let worker = libos::task::spawn(&[], move || {
//!     tx.send(42).expect("receiver alive");
//!     0
//! })
//! .expect("spawn");
//! assert_eq!(rx.recv(), Some(42));
//! worker.join().expect("worker");
//! ```

use alloc::collections::VecDeque;
use alloc::sync::Arc;

use crate::arch::irq::IrqMutex;

#[derive(Debug)]
struct State<T> {
    queue: VecDeque<T>,
    cap: usize,
    senders: usize,
    receivers: usize,
}

/// The sending half. Clone it for more producers.
#[derive(Debug)]
pub struct Sender<T> {
    inner: Arc<IrqMutex<State<T>>>,
}

/// The receiving half. Clone it for more consumers.
#[derive(Debug)]
pub struct Receiver<T> {
    inner: Arc<IrqMutex<State<T>>>,
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
/// let (tx, rx) = libos::channel::bounded::<&'static str>(4);
/// tx.send("job").expect("receiver alive");
/// drop(tx);
/// assert_eq!(rx.recv(), Some("job"));
/// assert_eq!(rx.recv(), None); // every sender is gone
/// ```
pub fn bounded<T: Send>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let cap = cap.max(1);
    let inner = Arc::new(IrqMutex::new(State {
        queue: VecDeque::with_capacity(crate::limits::channel_prealloc(cap)),
        cap,
        senders: 1,
        receivers: 1,
    }));
    (
        Sender {
            inner: inner.clone(),
        },
        Receiver { inner },
    )
}

impl<T: Send> Sender<T> {
    /// Sends without waiting.
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        let mut s = self.inner.lock();
        if s.receivers == 0 {
            return Err(TrySendError::Disconnected(value));
        }
        if s.queue.len() >= s.cap || s.queue.try_reserve(1).is_err() {
            return Err(TrySendError::Full(value));
        }
        s.queue.push_back(value);
        Ok(())
    }

    /// Sends, waiting (yielding) while the channel is full.
    pub fn send(&self, mut value: T) -> Result<(), Disconnected<T>> {
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

impl<T: Send> Receiver<T> {
    /// Receives without waiting: `Ok(None)` when empty, `Err(Closed)` when empty and every
    /// sender is gone.
    pub fn try_recv(&self) -> Result<Option<T>, Closed> {
        let mut s = self.inner.lock();
        match s.queue.pop_front() {
            Some(v) => Ok(Some(v)),
            None if s.senders == 0 => Err(Closed),
            None => Ok(None),
        }
    }

    /// Receives, waiting (yielding) while the channel is empty; `None` once it is empty and
    /// every sender is gone.
    pub fn recv(&self) -> Option<T> {
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
        self.inner.lock().queue.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.inner.lock().senders += 1;
        Sender {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.inner.lock().receivers += 1;
        Receiver {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.inner.lock().senders -= 1;
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.inner.lock().receivers -= 1;
    }
}
