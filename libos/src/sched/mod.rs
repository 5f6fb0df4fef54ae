//! The scheduler and the task lifecycle as a state machine: no arch, no `unsafe`, built and
//! tested on the host (`cargo test -p libos`).
//!
//! [`Sched<C>`] is generic over the per-task context `C` (on the guest: the saved stack pointer,
//! root table, address space, kernel stack and entry closure; in host tests whatever the test
//! wants). It never switches stacks itself: every operation returns a [`Step`] that says what
//! the arch glue must do — [`Step::Stay`] (go on running), [`Step::Switch`] (save this context,
//! resume that one; the [`Context`] builds the arguments) or [`Step::Idle`] (nothing runnable:
//! wait for an interrupt, then call [`Sched::poll_idle`]). After every switch the glue calls
//! [`Sched::finish_switch`] in the new context and drops the dead task it returns (the task that
//! exited before the switch could not free the stack it was running on).
//!
//! Ownership: every task is a `Box<Task<C>>` owned by exactly one place at a time —
//!
//! ```text
//!   running slot ──yield/tick──► run queue (FIFO) ──pick──► running slot
//!        │ sleep(deadline)             ▲ wake(now): deadline, then arrival order
//!        ├────────────────────► sleepers
//!        │ join(h), h not ended        ▲ the joined task ends (exit, fault, kill)
//!        ├────────────────────► h's JoinState.waiter
//!        │ exit / kill self
//!        └────────────────────► zombie slot ──next switch──► dropped (by the glue)
//! ```
//!
//! — and the [`JoinState`] is an `Arc` shared by the task and its [`JoinHandle`]: the result,
//! the one blocked joiner, and (while the task itself is blocked in a join) the join state it
//! waits in, so that [`Sched::kill`] can find it. There are no task pointers or integer handles;
//! a task is found by its id only inside the queues that own it.
//!
//! Ordering rules (what the host tests' model is written from):
//!
//! - the run queue is FIFO: a spawned task, a preempted or yielding task, a woken sleeper and a
//!   woken joiner each go to its back;
//! - every operation that picks a task first moves the sleepers whose deadline is `<= now` to
//!   the run queue, earliest deadline first and, among equal deadlines, in the order they went
//!   to sleep; a yielding or preempted task goes behind them;
//! - when a task ends (exit, kill), its joiner (if any) goes to the back of the run queue first,
//!   then (if the ended task was the running one) the sleepers are woken and the next task runs;
//! - a task that has ended or been unspawned never runs again.
//!
//! Kill semantics: [`Sched::kill`] ends a task at once in every state — running (itself),
//! runnable, sleeping (also forever, `u64::MAX`), or blocked in a join (it is taken out of the
//! join state it waits in) — and wakes its joiner; a task that has ended already is left alone.
//!
//! Concurrency: the guest reaches a `Sched` only through a cell that asks for the interrupts-off
//! token (`task::glue`), so operations never interleave on one CPU. The join state is shared
//! through an `Arc`, so its interior is a spin lock (never contended: every lock is taken under
//! the `&mut Sched` borrow; `join` holds the joined task's while it takes the joiner's, always in
//! that order, and a self-join locks only once) rather than cells that would be sound only on one
//! CPU. Since nothing else can hold it, a join state found locked is a bug in this module: it is
//! taken with `try_lock`, and a lock already held panics with a message (spinning would hang the
//! CPU with interrupts off, silently).

#![forbid(unsafe_code)]

pub mod policy;
#[cfg(test)]
mod tests;

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use core::fmt;

/// How a task ended, when it did not return normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// A CPU exception the task caused (e.g. a write to a read-only template), with its report.
    Fault {
        /// Faulting address (CR2) for page faults, else 0.
        addr: u64,
        /// Instruction pointer at the fault.
        rip: u64,
        /// What happened, e.g. "write to read-only region 'libdata' at 0x40000000".
        cause: String,
    },
    /// The task overflowed its stack.
    StackOverflow {
        /// The address in the guard space that was hit.
        addr: u64,
    },
    /// The task panicked; the message and location.
    Panic(String),
    /// `JoinHandle::kill` ended it.
    Killed,
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Fault { addr, rip, cause } => {
                write!(f, "fault at RIP {rip:#x} (address {addr:#x}): {cause}")
            }
            TaskError::StackOverflow { addr } => {
                write!(f, "stack overflow (guard page hit at {addr:#x})")
            }
            TaskError::Panic(m) => write!(f, "panicked: {m}"),
            TaskError::Killed => write!(f, "killed"),
        }
    }
}

/// What a task's join returns: its exit code, or how it failed.
pub type TaskResult = Result<i32, TaskError>;

/// A deadline that never passes: a task sleeping until then wakes only if it is killed.
pub const FOREVER: u64 = u64::MAX;

/// The arch side of a task's context: how to switch from one to another.
pub trait Context {
    /// What the glue needs to switch (e.g. where to save the stack pointer, which one to load).
    type Switch;
    /// The switch from `self` (the outgoing context, already where the scheduler keeps it until
    /// it runs again) to `next` (now the running one).
    fn switch_to(&mut self, next: &mut Self) -> Self::Switch;
    /// True when the task (not running: preempted or yielded) may be ended where it stopped. A
    /// kill of a runnable task that may not ([`Kill::Deferred`]) is carried out at its next kill
    /// point: a yield, sleep or join, or wherever the glue checks [`Task::kill_pending`] (the
    /// guest: when the task leaves libos's kernel context, which may hold what an end there
    /// would leak).
    fn may_end_here(&self) -> bool {
        true
    }
}

/// What the arch glue must do after an operation.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "the glue must carry out the step"]
pub enum Step<S> {
    /// Go on running the current task.
    Stay,
    /// Switch contexts, then call [`Sched::finish_switch`] in the new one.
    Switch(S),
    /// Nothing is runnable and the current task cannot go on: wait (interrupts on) and call
    /// [`Sched::poll_idle`] until it says otherwise.
    Idle,
}

/// A task, owned by exactly one place in the scheduler at a time.
pub struct Task<C> {
    id: u64,
    join: Arc<JoinState<C>>,
    /// The task has been the running one (at least once): [`Sched::unspawn`] refuses it.
    ran: bool,
    /// The arch context (saved registers, address space, stack, ...).
    pub ctx: C,
}

impl<C> Task<C> {
    /// The task's id (0: the first task, the app's `main`).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A kill of this task is waiting for its next kill point ([`Kill::Deferred`]).
    pub fn kill_pending(&self) -> bool {
        self.join
            .kill_pending
            .load(core::sync::atomic::Ordering::Relaxed)
    }
}

impl<C> fmt::Debug for Task<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task").field("id", &self.id).finish()
    }
}

/// What a task and its [`JoinHandle`] share.
pub struct JoinState<C> {
    inner: spin::Mutex<JoinInner<C>>,
    /// A kill came while the task could not be ended where it was ([`Kill::Deferred`]): it ends
    /// at its next kill point.
    kill_pending: core::sync::atomic::AtomicBool,
}

struct JoinInner<C> {
    /// The task has ended (its result may have been taken since).
    ended: bool,
    /// Set once, when the task ends; taken by the join.
    result: Option<TaskResult>,
    /// The task blocked in this task's join.
    waiter: Option<Box<Task<C>>>,
    /// While this task is itself blocked in a join: the join state it waits in.
    blocked_on: Option<Arc<JoinState<C>>>,
}

impl<C> JoinState<C> {
    /// Locks the join state. It is never contended (see the module docs): a lock already held
    /// means this module took it twice, and spinning would hang the CPU with interrupts off.
    #[track_caller]
    fn lock(&self) -> spin::MutexGuard<'_, JoinInner<C>> {
        match self.inner.try_lock() {
            Some(g) => g,
            None => panic!(
                "sched: a join state's lock is already held (taken twice under one scheduler \
                 borrow: a bug in libos::sched)"
            ),
        }
    }

    fn new() -> Arc<Self> {
        Arc::new(JoinState {
            inner: spin::Mutex::new(JoinInner {
                ended: false,
                result: None,
                waiter: None,
                blocked_on: None,
            }),
            kill_pending: core::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl<C> fmt::Debug for JoinState<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinState")
    }
}

/// The owner's handle to a spawned task: its id and the shared join state. Not `Clone`, and
/// [`Sched::join`] consumes it, so a task is joined at most once.
pub struct JoinHandle<C> {
    target: KillHandle<C>,
}

impl<C> fmt::Debug for JoinHandle<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("id", &self.target.id)
            .finish()
    }
}

impl<C> JoinHandle<C> {
    /// The task's id.
    pub fn id(&self) -> u64 {
        self.target.id
    }

    /// The handle that kills the task (also after this one is given to a join).
    pub fn kill_handle(&self) -> &KillHandle<C> {
        &self.target
    }
}

/// A handle that can only kill a task and ask whether it has ended; `Clone`, so that one task
/// can kill a task another one joins.
pub struct KillHandle<C> {
    id: u64,
    state: Arc<JoinState<C>>,
}

impl<C> Clone for KillHandle<C> {
    fn clone(&self) -> Self {
        KillHandle {
            id: self.id,
            state: self.state.clone(),
        }
    }
}

impl<C> fmt::Debug for KillHandle<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KillHandle").field("id", &self.id).finish()
    }
}

impl<C> KillHandle<C> {
    /// The task's id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// What [`Sched::join`] and [`Sched::rejoin`] found.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a pending join must be carried out and retried"]
pub enum Join<S> {
    /// The task had ended: its result.
    Done(TaskResult),
    /// The task has not ended: the caller is now blocked in its join state. Carry out the step;
    /// when the caller runs again, it calls [`Sched::rejoin`].
    Wait(Step<S>),
}

/// What [`Sched::kill`] did.
#[derive(Debug)]
#[must_use = "a dead task must be dropped, a step carried out"]
pub enum Kill<C: Context> {
    /// The task had ended already; nothing changed.
    AlreadyEnded,
    /// The task (not running) is ended; the caller drops it (its context goes with it).
    Ended(Box<Task<C>>),
    /// The task is the running one: it is now the zombie; carry out the step.
    Current(Step<C::Switch>),
    /// The task is runnable where it may not be ended ([`Context::may_end_here`]): it will end,
    /// killed, at its next kill point; nothing else changed.
    Deferred,
}

/// Where the task whose stack the CPU is on rests while the CPU idles.
#[derive(Debug)]
enum Parked<C> {
    /// In the sleepers, or (woken since) in the run queue.
    Sleeping(u64),
    /// In this join state's waiter slot.
    Joining(Arc<JoinState<C>>),
    /// In the zombie slot.
    Zombie,
}

/// The scheduler state: who runs, who waits, who is dead.
pub struct Sched<C: Context> {
    running: Option<Box<Task<C>>>,
    run_queue: VecDeque<Box<Task<C>>>,
    /// Sorted by deadline; tasks with equal deadlines in arrival order.
    sleepers: VecDeque<(u64, Box<Task<C>>)>,
    /// The task that ended last, dropped by the next [`Sched::finish_switch`].
    zombie: Option<Box<Task<C>>>,
    /// While idle (`running` is `None`): where the task the CPU idles on rests.
    idle_on: Option<Parked<C>>,
    /// Timer ticks a task runs before it is preempted (if another task is runnable).
    quantum: u32,
    ticks_left: u32,
    next_id: u64,
}

impl<C: Context> fmt::Debug for Sched<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sched")
            .field("running", &self.running.as_ref().map(|t| t.id))
            .field("runnable", &self.run_queue.len())
            .field("sleeping", &self.sleepers.len())
            .field("zombie", &self.zombie.as_ref().map(|t| t.id))
            .finish_non_exhaustive()
    }
}

impl<C: Context> Sched<C> {
    /// An empty scheduler: no task yet (see [`Sched::start`]). A running task is preempted after
    /// `quantum` timer ticks (at least 1) when another is runnable.
    pub const fn new(quantum: u32) -> Self {
        let quantum = if quantum == 0 { 1 } else { quantum };
        Sched {
            running: None,
            run_queue: VecDeque::new(),
            sleepers: VecDeque::new(),
            zombie: None,
            idle_on: None,
            quantum,
            ticks_left: quantum,
            next_id: 0,
        }
    }

    /// Makes the code that runs now a task (the first is task 0, the app's `main`) with context
    /// `ctx`. Refused (`ctx` given back) when a task is already running.
    pub fn start(&mut self, ctx: C) -> Result<u64, C> {
        if self.running.is_some() || self.idle_on.is_some() {
            return Err(ctx);
        }
        let id = self.take_id();
        self.running = Some(Box::new(Task {
            id,
            join: JoinState::new(),
            ran: true,
            ctx,
        }));
        self.ticks_left = self.quantum;
        Ok(id)
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        // 2^64 spawns would take centuries; saturate rather than reuse an id.
        self.next_id = self.next_id.saturating_add(1);
        id
    }

    /// A new task with context `ctx`, at the back of the run queue.
    pub fn spawn(&mut self, ctx: C) -> JoinHandle<C> {
        let id = self.take_id();
        let state = JoinState::new();
        self.run_queue.push_back(Box::new(Task {
            id,
            join: state.clone(),
            ran: false,
            ctx,
        }));
        JoinHandle {
            target: KillHandle { id, state },
        }
    }

    /// The running task, if any (none before [`Sched::start`] and while idle).
    pub fn running(&self) -> Option<&Task<C>> {
        self.running.as_deref()
    }

    /// The running task, mutably.
    pub fn running_mut(&mut self) -> Option<&mut Task<C>> {
        self.running.as_deref_mut()
    }

    /// Ids of the runnable tasks, in the order they will run.
    pub fn runnable(&self) -> impl Iterator<Item = u64> + '_ {
        self.run_queue.iter().map(|t| t.id)
    }

    /// `(deadline, id)` of the sleeping tasks, in the order they will wake.
    pub fn sleeping(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.sleepers.iter().map(|(d, t)| (*d, t.id))
    }

    /// True once the task of `h` has ended.
    pub fn is_finished(&self, h: &KillHandle<C>) -> bool {
        h.state.lock().ended
    }

    /// Moves every sleeper whose deadline is `<= now` to the run queue (earliest deadline first,
    /// arrival order among equal ones). A [`FOREVER`] deadline never passes.
    pub fn wake_sleepers(&mut self, now: u64) {
        while let Some((deadline, _)) = self.sleepers.front() {
            if *deadline > now || *deadline == FOREVER {
                break;
            }
            if let Some((_, t)) = self.sleepers.pop_front() {
                self.run_queue.push_back(t);
            }
        }
    }

    /// The running task gives the CPU to the next runnable one, if any, and goes to the back of
    /// the run queue.
    pub fn yield_now(&mut self, now: u64) -> Step<C::Switch> {
        if self.running_killed() {
            return self.exit(Err(TaskError::Killed), now);
        }
        self.wake_sleepers(now);
        self.rotate()
    }

    /// The running task has a kill waiting ([`Kill::Deferred`]) and may end here (the glue says
    /// so through [`Context::may_end_here`] before each kill point): a kill point ends it.
    fn running_killed(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|t| t.kill_pending() && t.ctx.may_end_here())
    }

    fn rotate(&mut self) -> Step<C::Switch> {
        let Some(cur) = self.running.take() else {
            return Step::Stay;
        };
        let Some(mut next) = self.run_queue.pop_front() else {
            self.running = Some(cur);
            return Step::Stay;
        };
        self.run_queue.push_back(cur);
        let sw = match self.run_queue.back_mut() {
            Some(parked) => parked.ctx.switch_to(&mut next.ctx),
            None => unreachable!("a task was just queued"),
        };
        self.run(next);
        Step::Switch(sw)
    }

    fn run(&mut self, mut next: Box<Task<C>>) {
        next.ran = true;
        self.running = Some(next);
        self.ticks_left = self.quantum;
    }

    /// A timer tick: after `quantum` ticks of the running task, it is preempted if another task
    /// is runnable (sleepers whose deadline passed count). While idle, nothing happens.
    pub fn tick(&mut self, now: u64) -> Step<C::Switch> {
        if self.running.is_none() {
            return Step::Stay;
        }
        self.wake_sleepers(now);
        self.ticks_left = self.ticks_left.saturating_sub(1);
        if self.ticks_left > 0 {
            return Step::Stay;
        }
        self.rotate()
    }

    /// The running task sleeps until `deadline` (a deadline `<= now` just yields; [`FOREVER`]
    /// sleeps until killed).
    pub fn sleep(&mut self, deadline: u64, now: u64) -> Step<C::Switch> {
        if self.running_killed() {
            return self.exit(Err(TaskError::Killed), now);
        }
        if deadline <= now {
            return self.yield_now(now);
        }
        self.wake_sleepers(now);
        let Some(cur) = self.running.take() else {
            return Step::Stay;
        };
        let id = cur.id;
        let i = self.sleepers.partition_point(|(d, _)| *d <= deadline);
        self.sleepers.insert(i, (deadline, cur));
        let Some(mut next) = self.run_queue.pop_front() else {
            self.idle_on = Some(Parked::Sleeping(id));
            return Step::Idle;
        };
        let sw = match self.sleepers.get_mut(i) {
            Some((_, t)) => t.ctx.switch_to(&mut next.ctx),
            None => unreachable!("the sleeper was inserted at {i}"),
        };
        self.run(next);
        Step::Switch(sw)
    }

    /// The running task joins the task of `h`: its result if it has ended; else the running
    /// task blocks in `h`'s join state (keeping `h`) until that task ends or the joiner is
    /// killed, and calls [`Sched::rejoin`] when it runs again.
    pub fn join(&mut self, h: JoinHandle<C>, now: u64) -> Join<C::Switch> {
        if self.running_killed() {
            return Join::Wait(self.exit(Err(TaskError::Killed), now));
        }
        let target = h.target.state;
        let mut st = target.lock();
        if let Some(r) = st.result.take() {
            return Join::Done(r);
        }
        let Some(cur) = self.running.take() else {
            // Nobody to block (not reachable from the glue, which always has a running task).
            return Join::Done(Err(TaskError::Killed));
        };
        if Arc::ptr_eq(&cur.join, &target) {
            // A task joining itself waits (until killed) in its own join state: lock it once.
            drop(st);
            return self.park_in_join(cur, target, now);
        }
        // Two different join states: the joined task's, then the joiner's (never the other way).
        cur.join.lock().blocked_on = Some(target.clone());
        self.park_locked(cur, st, &target, now)
    }

    /// The running task, back from a wait in [`Sched::join`]: the result of the task it joined
    /// (or, if that task has not ended, it waits again).
    pub fn rejoin(&mut self, now: u64) -> Join<C::Switch> {
        if self.running_killed() {
            // Its `blocked_on` goes with it (the task it joined goes on).
            if let Some(t) = &self.running {
                t.join.lock().blocked_on = None;
            }
            return Join::Wait(self.exit(Err(TaskError::Killed), now));
        }
        let Some(cur) = self.running.take() else {
            return Join::Done(Err(TaskError::Killed));
        };
        let Some(target) = cur.join.lock().blocked_on.take() else {
            // Not joining anything: a misuse of the glue; say so rather than block forever.
            self.running = Some(cur);
            return Join::Done(Err(TaskError::Killed));
        };
        let done = target.lock().result.take();
        match done {
            Some(r) => {
                self.running = Some(cur);
                Join::Done(r)
            }
            None => self.park_in_join(cur, target, now),
        }
    }

    fn park_in_join(
        &mut self,
        cur: Box<Task<C>>,
        target: Arc<JoinState<C>>,
        now: u64,
    ) -> Join<C::Switch> {
        cur.join.lock().blocked_on = Some(target.clone());
        let st = target.lock();
        self.park_locked(cur, st, &target, now)
    }

    /// Parks `cur` as the waiter of `target` (whose lock `st` is) and picks the next task.
    fn park_locked(
        &mut self,
        cur: Box<Task<C>>,
        mut st: spin::MutexGuard<'_, JoinInner<C>>,
        target: &Arc<JoinState<C>>,
        now: u64,
    ) -> Join<C::Switch> {
        self.wake_sleepers(now);
        let next = self.run_queue.pop_front();
        let parked = st.waiter.insert(cur);
        let Some(mut next) = next else {
            drop(st);
            self.idle_on = Some(Parked::Joining(target.clone()));
            return Join::Wait(Step::Idle);
        };
        let sw = parked.ctx.switch_to(&mut next.ctx);
        drop(st);
        self.run(next);
        Join::Wait(Step::Switch(sw))
    }

    /// Undoes [`Sched::spawn`]: takes the task of `h` out of the run queue and gives back its
    /// context, for the caller to release — only if the task has never run. It leaves no
    /// trace: the run queue is as before the spawn, and the task's join state is marked ended
    /// as if it had been killed before it ran (result [`TaskError::Killed`], no joiner to
    /// wake), so a [`KillHandle`] made from `h` says it has finished and killing it does nothing
    /// ([`Kill::AlreadyEnded`]). Its id is not reused.
    ///
    /// Refused, with `h` given back and nothing changed, when the task has run (it may hold
    /// state its context alone does not free; end it with [`Sched::kill`] instead) or is not
    /// in the run queue (it has ended, or it is running).
    pub fn unspawn(&mut self, h: JoinHandle<C>) -> Result<C, JoinHandle<C>> {
        let Some(i) = self
            .run_queue
            .iter()
            .rposition(|t| Arc::ptr_eq(&t.join, &h.target.state))
        else {
            return Err(h);
        };
        if self.run_queue.get(i).is_some_and(|t| t.ran) {
            return Err(h);
        }
        match self.run_queue.remove(i) {
            Some(t) => {
                let mut st = t.join.lock();
                // Never run: it is in no join (`blocked_on` is empty) and, since `h` is the
                // one handle that joins it, nobody waits in its join state.
                st.ended = true;
                st.result = Some(Err(TaskError::Killed));
                drop(st);
                Ok(t.ctx)
            }
            None => unreachable!("index {i} was just found in the run queue"),
        }
    }

    /// The running task ends with `result`: its joiner (if any) becomes runnable, the task
    /// becomes the zombie (dropped by the next [`Sched::finish_switch`]).
    pub fn exit(&mut self, result: TaskResult, now: u64) -> Step<C::Switch> {
        let Some(cur) = self.running.take() else {
            return Step::Stay;
        };
        self.end(&cur, result);
        debug_assert!(self.zombie.is_none(), "finish_switch was not called");
        self.wake_sleepers(now);
        let parked = self.zombie.insert(cur);
        let Some(mut next) = self.run_queue.pop_front() else {
            self.idle_on = Some(Parked::Zombie);
            return Step::Idle;
        };
        let sw = parked.ctx.switch_to(&mut next.ctx);
        self.run(next);
        Step::Switch(sw)
    }

    /// Stores `result` for `task`'s joiner and makes the joiner runnable.
    fn end(&mut self, task: &Task<C>, result: TaskResult) {
        let waiter = {
            let mut st = task.join.lock();
            st.ended = true;
            st.result = Some(result);
            st.blocked_on = None;
            st.waiter.take()
        };
        if let Some(w) = waiter {
            // Its `blocked_on` stays: `rejoin` takes it, with the result, when it runs.
            self.run_queue.push_back(w);
        }
    }

    /// Ends the task of `h` with [`TaskError::Killed`], at once — running, runnable, asleep or
    /// blocked in a join — unless it is runnable where it may not end
    /// ([`Context::may_end_here`]): then [`Kill::Deferred`], and it ends at its next kill point
    /// (a yield, sleep or join, or when the glue sees [`Task::kill_pending`]). See [`Kill`] for
    /// what the caller must do. Its joiner (if any) becomes runnable.
    pub fn kill(&mut self, h: &KillHandle<C>, now: u64) -> Kill<C> {
        let blocked_on = {
            let mut st = h.state.lock();
            if st.ended {
                return Kill::AlreadyEnded;
            }
            // Runnable where it may not end (preempted inside code whose end would leak, or a
            // joiner woken there): it ends at its next kill point.
            if self
                .run_queue
                .iter()
                .any(|t| t.id == h.id && !t.ctx.may_end_here())
            {
                h.state
                    .kill_pending
                    .store(true, core::sync::atomic::Ordering::Relaxed);
                return Kill::Deferred;
            }
            st.blocked_on.take()
        };
        if self.running.as_ref().is_some_and(|t| t.id == h.id) {
            return Kill::Current(self.exit(Err(TaskError::Killed), now));
        }
        let victim = if let Some(js) = blocked_on {
            let mut st = js.lock();
            if st.waiter.as_ref().is_some_and(|w| w.id == h.id) {
                st.waiter.take()
            } else {
                None
            }
        } else {
            None
        };
        let victim = victim
            .or_else(|| {
                let i = self.run_queue.iter().position(|t| t.id == h.id)?;
                self.run_queue.remove(i)
            })
            .or_else(|| {
                let i = self.sleepers.iter().position(|(_, t)| t.id == h.id)?;
                self.sleepers.remove(i).map(|(_, t)| t)
            });
        match victim {
            Some(t) => {
                self.end(&t, Err(TaskError::Killed));
                Kill::Ended(t)
            }
            // Every task that has not ended is in one of the places searched above.
            None => Kill::AlreadyEnded,
        }
    }

    /// While idle: wakes the sleepers whose deadline passed and, if one is runnable now, says
    /// how to go on ([`Step::Stay`] if it is the task the CPU idles on).
    pub fn poll_idle(&mut self, now: u64) -> Step<C::Switch> {
        if self.running.is_some() {
            return Step::Stay;
        }
        self.wake_sleepers(now);
        let Some(mut next) = self.run_queue.pop_front() else {
            return Step::Idle;
        };
        let sw = match self.idle_on.take() {
            Some(Parked::Sleeping(id)) if id == next.id => {
                // It ran before it slept: `run` only restarts its quantum.
                self.run(next);
                return Step::Stay;
            }
            Some(Parked::Sleeping(id)) => {
                let parked = self.run_queue.iter_mut().find(|t| t.id == id).or_else(|| {
                    self.sleepers
                        .iter_mut()
                        .map(|(_, t)| t)
                        .find(|t| t.id == id)
                });
                match parked {
                    Some(t) => t.ctx.switch_to(&mut next.ctx),
                    None => unreachable!("the idle task {id} is neither runnable nor asleep"),
                }
            }
            Some(Parked::Joining(js)) => {
                let mut st = js.lock();
                match st.waiter.as_mut() {
                    Some(t) => t.ctx.switch_to(&mut next.ctx),
                    None => unreachable!("the idle task left the join state it waits in"),
                }
            }
            Some(Parked::Zombie) => match self.zombie.as_mut() {
                Some(t) => t.ctx.switch_to(&mut next.ctx),
                None => unreachable!("the idle zombie is gone"),
            },
            None => unreachable!("idle without a parked task"),
        };
        self.run(next);
        Step::Switch(sw)
    }

    /// Called in the new context after every switch: the task that ended before it, if any, for
    /// the caller to drop (its context — stack, address space — goes with it).
    pub fn finish_switch(&mut self) -> Option<Box<Task<C>>> {
        self.zombie.take()
    }
}

/// Where [`Sched::owned_tasks`] found a task.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Place {
    /// The running slot.
    Running,
    /// The run queue, at this position (0: runs next).
    Runnable(usize),
    /// The sleepers, with this deadline (their order is [`Sched::sleeping`]'s).
    Sleeping(u64),
    /// The waiter slot of this task's join state (its own, for a task that joined itself).
    Joining(u64),
    /// The waiter slot of a join state whose task the scheduler does not own: a lost task.
    JoiningUnowned,
    /// The zombie slot.
    Zombie,
}

#[cfg(test)]
impl<C: Context> Sched<C> {
    /// Calls `f` with every task the scheduler owns and where it is, read from the scheduler's
    /// own containers: the running slot, the run queue, the sleepers, the zombie slot and, from
    /// each of those tasks' join states (and the one the CPU idles in), the chain of blocked
    /// joiners. A task blocked in its own join, or in a cycle of joins, is owned only by those
    /// join states: the join states of `also` (and their chains) are searched too. A task in two
    /// places is visited twice.
    pub(crate) fn visit_tasks(&self, also: &[&KillHandle<C>], f: &mut dyn FnMut(&Task<C>, Place)) {
        use alloc::vec::Vec;

        fn walk<C>(
            js: &JoinState<C>,
            owner: u64,
            f: &mut dyn FnMut(&Task<C>, Place),
            seen: &mut Vec<*const JoinState<C>>,
        ) {
            seen.push(js);
            let st = js.lock();
            if let Some(w) = st.waiter.as_deref() {
                f(w, Place::Joining(owner));
                // Not into a state walked (and locked) already: a self-join, a join cycle.
                if !seen.iter().any(|&p| core::ptr::eq(p, &*w.join)) {
                    walk(&w.join, w.id, f, seen);
                }
            }
        }

        let mut seen = Vec::new();
        let mut roots: Vec<(&Task<C>, Place)> = Vec::new();
        roots.extend(self.running.as_deref().map(|t| (t, Place::Running)));
        roots.extend(
            self.run_queue
                .iter()
                .enumerate()
                .map(|(i, t)| (&**t, Place::Runnable(i))),
        );
        roots.extend(
            self.sleepers
                .iter()
                .map(|(d, t)| (&**t, Place::Sleeping(*d))),
        );
        roots.extend(self.zombie.as_deref().map(|t| (t, Place::Zombie)));
        for (t, place) in roots {
            f(t, place);
            walk(&t.join, t.id, f, &mut seen);
        }
        for h in also {
            if !seen.iter().any(|&p| core::ptr::eq(p, &*h.state)) {
                walk(&h.state, h.id, f, &mut seen);
            }
        }
        if let Some(Parked::Joining(js)) = &self.idle_on {
            let js: &JoinState<C> = js;
            if seen.iter().any(|&p| core::ptr::eq(p, js)) {
                return;
            }
            let st = js.lock();
            if let Some(w) = st.waiter.as_deref() {
                let place = if core::ptr::eq(&*w.join, js) {
                    Place::Joining(w.id)
                } else {
                    Place::JoiningUnowned
                };
                f(w, place);
            }
        }
    }

    /// `(id, place)` of every task [`Sched::visit_tasks`] finds, in its order.
    pub(crate) fn owned_tasks(&self, also: &[&KillHandle<C>]) -> alloc::vec::Vec<(u64, Place)> {
        let mut out = alloc::vec::Vec::new();
        self.visit_tasks(also, &mut |t, p| out.push((t.id, p)));
        out
    }
}
