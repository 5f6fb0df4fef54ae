//! Tasks: each with its own address space built from templates, its own kernel stack, and a
//! saved context; a round-robin scheduler with cooperative [`yield_now`] and timer preemption.
//!
//! Everything runs in ring 0 (a library OS), so a task's stack is a kernel stack (in the shared
//! kernel half, with a guard) and its address space's upper half is the kernel template. A
//! context switch saves the callee-saved registers and RFLAGS on the old stack, loads the next
//! task's CR3 (only if it differs) and stack pointer, and returns into the next task.
//!
//! Failures stay inside the task: a page fault the engine cannot resolve, any other CPU exception,
//! a stack overflow or a panic ends only the running task, with a report (task id, address, RIP,
//! cause), and its [`JoinHandle::join`] returns the [`TaskError`]. The main task (the app's
//! `main`) is task 0; when it faults, the app ends as before.
//!
//! Inside: the scheduler is a host-tested state machine (`crate::sched`) that owns every task;
//! `glue` holds the one instance, reachable only with interrupts off, and carries out what it
//! decides (switch stacks with `arch::context`, idle, drop dead tasks); `memory` is the running
//! task's memory API; `error` the error types.

mod error;
mod glue;
mod memory;

use alloc::vec::Vec;
use core::mem::ManuallyDrop;

use templates::{AddressSpace, Mode};

use crate::space::{KernelMem, Template};

pub use error::{SpawnError, TaskError};
pub(crate) use glue::{
    enter_no_kill, fail_current, in_no_kill, in_spawned_task, init, leave_no_kill, timer_tick,
};
pub(crate) use memory::unmap_private;
pub use memory::{map_private, read, snapshot, space_stats, trim_caches, write};

/// Default stack size of a spawned task.
pub const DEFAULT_STACK: u64 = 32 << 10;
/// Largest stack of a spawned task: a kernel-stack slot less its guard page (4 MiB - 4 KiB).
pub const MAX_STACK: u64 = crate::stack::MAX_STACK;
/// Frames kept free for the kernel heap: [`spawn`] fails with [`SpawnError::OutOfMemory`]
/// rather than leave fewer free. The kernel heap maps single frames anywhere in RAM, so this many
/// free frames let it grow by 4 MiB: 1,024 pages plus the page tables that map them.
pub const SPAWN_RESERVE_FRAMES: usize = crate::mm::heap::RESERVE_FRAMES;
/// Scheduling quantum (the APIC timer period).
pub const QUANTUM_US: u64 = 10_000;

/// Id of the running task (0 = the app's `main`).
///
/// ```no_run
/// libos::println!("running in task {}", libos::task::current());
/// ```
pub fn current() -> u64 {
    glue::current()
}

/// Number of tasks spawned since boot.
///
/// ```no_run
/// libos::println!("{} tasks so far", libos::task::spawned_count());
/// ```
pub fn spawned_count() -> u64 {
    glue::spawned_count()
}

/// Options for [`Builder::spawn`].
///
/// ```no_run
/// use libos::space::Mode;
/// let h = libos::task::Builder::new()
///     .stack_size(64 << 10)
///     .mode(Mode::Copy) // deep-copy the tables, as fork() does
///     .spawn(&[], || 0)
///     .expect("spawn");
/// assert_eq!(h.join(), Ok(0));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Builder {
    stack_size: u64,
    mode: Option<Mode>,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// Default options: a 32 KiB stack, the boot's share mode.
    pub fn new() -> Self {
        Builder {
            stack_size: DEFAULT_STACK,
            mode: None,
        }
    }

    /// Stack size in bytes, rounded up to whole pages; 0 gets one page. More than
    /// [`MAX_STACK`] makes [`spawn`](Self::spawn) fail with [`SpawnError::StackTooLarge`].
    pub fn stack_size(mut self, bytes: u64) -> Self {
        self.stack_size = bytes;
        self
    }

    /// Attach templates by reference (`Mode::Share`) or deep-copy them (`Mode::Copy`),
    /// overriding the boot's `share=` option (benchmarks compare both in one boot).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Spawns a task whose address space attaches `templates`, running `f`. The task runs when
    /// the caller yields, blocks (e.g. in [`JoinHandle::join`]) or is preempted.
    ///
    /// The child is a fork of the caller's process memory (`docs/ARCHITECTURE.md`, "Tasks as
    /// processes"): it starts with a copy-on-write copy of the caller's heap and statics as of
    /// this call, so whatever `f` captured — `String`s, `Vec`s, a `HashMap` — is live in the
    /// child at the same address, and neither task ever sees the other's later writes. The
    /// caller's own copy of `f` is dropped here (its captures freed in the caller's heap); the
    /// child runs its copy.
    pub fn spawn<F>(self, templates: &[&Template], f: F) -> Result<JoinHandle, SpawnError>
    where
        F: FnOnce() -> i32 + Send + 'static,
    {
        // The caller's copy of `f`, dropped below once the child has its own (or the spawn failed).
        let f = ManuallyDrop::new(f);
        // Until the result is the app's (an error copied into its heap), a kill waits.
        let _h = crate::mm::ctx::hold();
        let r = {
            let _k = crate::mm::ctx::kernel();
            self.spawn_fork(templates, &f)
        };
        // Back in app context: the captures live in this task's heap.
        drop(ManuallyDrop::into_inner(f));
        r.map_err(SpawnError::rehome)
    }

    /// Spawns a task that runs `f(arg)`, giving it every libos object in `arg`
    /// ([`Give`](crate::handle::Give)) before it runs — the way to hand a
    /// [`TcpStream`](crate::net::TcpStream), a channel end or a shared heap to a child (a
    /// [`spawn`](Self::spawn) closure cannot capture them: they are not `Send`). Otherwise as
    /// [`spawn`](Self::spawn) (the child is a fork of the caller). On an error nothing was
    /// spawned and `arg` is dropped here (its objects stay the caller's until then, so they are
    /// released).
    ///
    /// ```no_run
    /// let (tx, rx) = libos::channel::bounded::<u64>(1);
    /// let h = libos::task::Builder::new()
    ///     .spawn_with(&[], tx, |tx| {
    ///         tx.send(7).expect("receiver alive");
    ///         0
    ///     })
    ///     .expect("spawn");
    /// assert_eq!(rx.recv(), Some(7));
    /// assert_eq!(h.join(), Ok(0));
    /// ```
    pub fn spawn_with<A, F>(
        self,
        templates: &[&Template],
        arg: A,
        f: F,
    ) -> Result<JoinHandle, SpawnError>
    where
        A: crate::handle::Give + 'static,
        F: FnOnce(A) -> i32 + Send + 'static,
    {
        /// The child's copy of `arg`, carried by the child's closure.
        struct Carry<A>(ManuallyDrop<A>);
        // SAFETY: `A: Give` (sealed) is made only of handles to registry objects (which are
        // `Send`) and containers of them; a handle is kept from crossing tasks only so that
        // ownership moves with a give, which happens below before the child can run.
        unsafe impl<A: crate::handle::Give> Send for Carry<A> {}

        let arg = ManuallyDrop::new(arg);
        // SAFETY: a bitwise copy of `arg` for the child, which gets it in its fork of this
        // task's memory (where whatever `arg` points to is live at the same address). Exactly
        // one copy is dropped in each task: the caller drops `arg` below, the child runs `f` on
        // its copy (the caller's copy of the closure drops only a `ManuallyDrop`).
        let carry = Carry(unsafe { core::ptr::read(&arg) });
        let r = crate::arch::irq::without(|_| {
            let h = self.spawn(templates, move || {
                let c = carry;
                f(ManuallyDrop::into_inner(c.0))
            })?;
            // Interrupts are off: the child has not run. Its objects are its own from now on.
            arg.give_to(h.id());
            Ok(h)
        });
        // The caller's copy: its handles are inert once given (and released with it on error).
        drop(ManuallyDrop::into_inner(arg));
        r
    }

    /// The kernel side of [`spawn`](Self::spawn): fork the caller's process memory, make the
    /// child's space, top table and stack, and queue the child with its own bitwise copy of `f`.
    fn spawn_fork<F>(
        self,
        templates: &[&Template],
        f: &ManuallyDrop<F>,
    ) -> Result<JoinHandle, SpawnError>
    where
        F: FnOnce() -> i32 + Send + 'static,
    {
        let mode = self.mode.unwrap_or_else(crate::space::mode);
        // Keep a reserve for the kernel heap (a failed heap allocation is a panic): fail early
        // when the reserve is already gone, and check again below once the stack and the
        // address space have taken their frames.
        let frames = crate::mm::kernel::frames();
        if frames.free_frames() < SPAWN_RESERVE_FRAMES {
            return Err(SpawnError::OutOfMemory);
        }
        // The stack first: if the address space then fails, dropping the stack touches no
        // shared page table.
        let stack = crate::stack::alloc(self.stack_size).map_err(|e| match e {
            crate::stack::StackError::NoSlot => SpawnError::TooManyTasks,
            crate::stack::StackError::OutOfMemory => SpawnError::OutOfMemory,
            crate::stack::StackError::TooLarge(e) => SpawnError::StackTooLarge {
                requested: e.requested,
                max: e.max,
            },
        })?;
        let layout = |e| match e {
            templates::Error::OutOfFrames => SpawnError::OutOfMemory,
            e => SpawnError::Layout(e),
        };
        // Interrupts off: the engine's reference counting assumes no other space is created or
        // dropped halfway through (dead tasks are dropped with interrupts off too).
        let made = crate::arch::irq::without(|_| {
            // The fork point: the caller's process memory as a template (its own pages become
            // copy-on-write, so flush its TLB).
            let (proc, flush) = crate::space::with_current(crate::procmem::fork_template)?;
            crate::space::apply(flush);
            let half = Some(crate::space::kernel_half());
            let space = match templates {
                [] => AddressSpace::new(&KernelMem, &[&proc], mode, half),
                [t] => AddressSpace::new(&KernelMem, &[&proc, &t.engine()], mode, half),
                _ => {
                    let ts = crate::space::engine_templates(templates);
                    let mut refs: Vec<&crate::space::EngineTemplate> =
                        Vec::with_capacity(ts.len() + 1);
                    refs.push(&proc);
                    refs.extend(ts.iter());
                    AddressSpace::new(&KernelMem, &refs, mode, half)
                }
            }?;
            let top = crate::procmem::Top::install(&space).ok_or(templates::Error::OutOfFrames)?;
            Ok((space, top))
        });
        let (space, top) = match made {
            Ok(m) => m,
            Err(e) => {
                crate::stack::release(stack);
                return Err(layout(e));
            }
        };
        // SAFETY: a bitwise copy of `f` for the child, which runs it in its own memory: a fork
        // of this task's as of the snapshot above, where every object `f` captured is live at
        // the same address and owned by nobody else. The caller's copy stays in its own memory
        // (dropped by `spawn`). Captures that point outside process memory cannot be duplicated
        // like this; libos's own objects are `!Send`, so `f` (`Send`) holds none.
        let child: ManuallyDrop<F> = unsafe { core::ptr::read(f) };
        // Dropped unrun (a task killed before it starts), the box frees only itself: the
        // captures are the child's, and its memory goes with it.
        let entry = glue::Entry::new(move || ManuallyDrop::into_inner(child)());
        // This spawn (its stack, tables or kernel-heap objects) must not eat into the reserve:
        // if it did, undo it, keeping none of its memory (not even in the stack cache).
        let h = match glue::spawn(space, top, stack, entry, || {
            frames.free_frames() >= SPAWN_RESERVE_FRAMES
        }) {
            Ok(h) => h,
            Err((space, top, stack, entry)) => {
                crate::procmem::release_unkept(space, top);
                crate::stack::release(stack);
                drop(entry);
                return Err(SpawnError::OutOfMemory);
            }
        };
        glue::count_spawn();
        Ok(JoinHandle::new(h))
    }
}

/// Spawns a task with default options; see [`Builder::spawn`].
///
/// ```no_run
/// use libos::space::{Kind, TemplateBuilder};
/// let t = TemplateBuilder::new()
///     .region("data", 0x4000_0000, 1 << 20, Kind::Private, |_, p| p.fill(1))
///     .and_then(|b| b.seal())
///     .expect("template");
/// let h = libos::task::spawn(&[&t], || {
///     let mut b = [0u8; 1];
///     libos::task::read(0x4000_0000, &mut b).expect("mapped");
///     i32::from(b[0])
/// })
/// .expect("spawn");
/// assert_eq!(h.join(), Ok(1));
/// ```
///
/// `f` is `'static`: a task cannot borrow the spawner's locals, it gets its own copy of what it
/// uses (`move`).
///
/// ```compile_fail,E0373
/// let n = 20;
/// let h = libos::task::spawn(&[], || n + 1); // borrows `n`: refused
/// ```
///
/// What comes back is the exit code, copied by value: a task cannot return a heap object (it
/// would point into the child's memory, which goes with it).
///
/// ```compile_fail
/// let h = libos::task::spawn(&[], || alloc::string::String::from("result")); // refused
/// ```
pub fn spawn<F>(templates: &[&Template], f: F) -> Result<JoinHandle, SpawnError>
where
    F: FnOnce() -> i32 + Send + 'static,
{
    Builder::new().spawn(templates, f)
}

/// Spawns a task with default options that runs `f(arg)`, giving it the libos objects in `arg`;
/// see [`Builder::spawn_with`].
///
/// ```no_run
/// let (tx, rx) = libos::channel::bounded::<u64>(1);
/// let h = libos::task::spawn_with(&[], tx, |tx| i32::from(tx.send(1).is_ok())).expect("spawn");
/// assert_eq!(rx.recv(), Some(1));
/// assert_eq!(h.join(), Ok(1));
/// ```
pub fn spawn_with<A, F>(templates: &[&Template], arg: A, f: F) -> Result<JoinHandle, SpawnError>
where
    A: crate::handle::Give + 'static,
    F: FnOnce(A) -> i32 + Send + 'static,
{
    Builder::new().spawn_with(templates, arg, f)
}

/// Gives the CPU to the next runnable task, if any.
///
/// ```no_run
/// let h = libos::task::spawn(&[], || 0).expect("spawn");
/// while !h.is_finished() {
///     libos::task::yield_now(); // let the task run
/// }
/// ```
pub fn yield_now() {
    glue::yield_now();
}

/// Sleeps for at least `d` (other tasks run meanwhile). `Duration::ZERO` just yields. A `d`
/// whose deadline would pass the TSC's range (e.g. `Duration::MAX`) sleeps forever, without
/// overflow: the task wakes only if it is killed ([`JoinHandle::kill`]).
///
/// ```no_run
/// libos::task::sleep(core::time::Duration::from_millis(10));
/// ```
pub fn sleep(d: core::time::Duration) {
    let now = crate::arch::cpu::rdtsc();
    let deadline =
        crate::limits::deadline(now, d, crate::time::tsc_hz()).unwrap_or(crate::sched::FOREVER);
    glue::sleep_until(deadline);
}

/// Ends the running spawned task with exit code `code` (as if its closure returned it). In the
/// main task it ends the app, like [`crate::exit`].
///
/// ```no_run
/// let h = libos::task::spawn(&[], || libos::task::exit(3)).expect("spawn");
/// assert_eq!(h.join(), Ok(3));
/// ```
pub fn exit(code: i32) -> ! {
    if !in_spawned_task() {
        crate::shutdown::exit_app(code)
    }
    glue::end_current(Ok(code))
}

/// Owner's handle to a spawned task.
///
/// A libos object (`docs/ARCHITECTURE.md`, "Ownership of libos objects"): it belongs to the task
/// that spawned the child, is not `Send` (a closure cannot capture it), a copy in another task's
/// memory (a fork's) is inert, and when its owner ends without joining, the child is detached.
///
/// ```compile_fail,E0277
/// let h = libos::task::spawn(&[], || 0).expect("spawn");
/// let _ = libos::task::spawn(&[], move || h.join().unwrap_or(1)); // refused: not `Send`
/// ```
#[derive(Debug)]
#[must_use = "dropping a JoinHandle detaches the task"]
pub struct JoinHandle {
    id: u64,
    inner: crate::handle::Owned<crate::sched::JoinHandle<glue::Guest>>,
}

impl JoinHandle {
    fn new(h: crate::sched::JoinHandle<glue::Guest>) -> JoinHandle {
        JoinHandle {
            id: h.id(),
            inner: crate::handle::Owned::new(h),
        }
    }

    /// The scheduler's kill handle (a new reference), for use outside the registry.
    fn killer(&self) -> crate::sched::KillHandle<glue::Guest> {
        let _k = crate::mm::ctx::kernel();
        self.inner.with(|h| h.kill_handle().clone())
    }

    /// The task's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True once the task has ended.
    pub fn is_finished(&self) -> bool {
        // The handle's clone lives inside kernel context (a kill waits until it is dropped).
        let _k = crate::mm::ctx::kernel();
        let k = self.killer();
        glue::is_finished(&k)
    }

    /// A handle that can kill this task, also once this one is given to [`JoinHandle::join`]
    /// (e.g. a watchdog task kills a worker that another task joins; the joiner is woken with
    /// `Err(TaskError::Killed)`). Give it to the watchdog with [`spawn_with`].
    ///
    /// ```no_run
    /// use libos::task::TaskError;
    /// let worker = libos::task::spawn(&[], || loop {
    ///     libos::task::yield_now();
    /// })
    /// .expect("spawn");
    /// let _watchdog = libos::task::spawn_with(&[], worker.kill_handle(), |k| {
    ///     k.kill();
    ///     0
    /// })
    /// .expect("spawn");
    /// assert_eq!(worker.join(), Err(TaskError::Killed));
    /// ```
    pub fn kill_handle(&self) -> KillHandle {
        let _k = crate::mm::ctx::kernel();
        let k = self.killer();
        KillHandle {
            id: self.id,
            inner: crate::handle::Owned::new(k),
        }
    }

    /// Waits for the task to end; its exit code, or how it failed.
    ///
    /// ```no_run
    /// use libos::task::TaskError;
    /// let h = libos::task::spawn(&[], || panic!("boom")).expect("spawn");
    /// assert!(matches!(h.join(), Err(TaskError::Panic(_))));
    /// ```
    pub fn join(self) -> Result<i32, TaskError> {
        // The scheduler's handle goes from the registry to the scheduler inside kernel context
        // (a join is a kill point: a kill waiting for this task ends it there, or while it is
        // blocked), and the result's error is the kernel's until copied into the task's heap: a
        // kill waits for that (`hold`, taken before kernel context ends).
        let (r, _h) = {
            let _k = crate::mm::ctx::kernel();
            let h = self.inner.take();
            let r = glue::join(h);
            (r, crate::mm::ctx::hold())
        };
        r.map_err(error::rehome_task_error)
    }

    /// Ends the task (if it has not ended yet); its `join` returns [`TaskError::Killed`].
    ///
    /// The task ends at once whatever it is doing: runnable, preempted, sleeping (even
    /// forever), blocked in [`JoinHandle::join`] (it leaves the join it waits in; the task it
    /// joined goes on), or running (a task that kills itself). A task blocked in a join of this
    /// task is woken and gets `Err(TaskError::Killed)`. Its memory goes with it and libos
    /// releases the objects it owned; a [`crate::sync::Mutex`] in its memory is its own copy.
    /// A task preempted inside libos code ends where it leaves it (or at its next yield, sleep
    /// or join), so a kill never leaks what libos held for it. A task inside
    /// [`crate::shared::Shared::with`] (holding a lock on memory other tasks use) ends when the
    /// closure returns, so shared data is never left half-changed.
    ///
    /// ```no_run
    /// use libos::task::TaskError;
    /// let h = libos::task::spawn(&[], || loop {
    ///     libos::task::yield_now();
    /// })
    /// .expect("spawn");
    /// h.kill();
    /// assert_eq!(h.join(), Err(TaskError::Killed));
    /// ```
    pub fn kill(&self) {
        let _k = crate::mm::ctx::kernel();
        let k = self.killer();
        glue::kill(&k);
    }
}

impl crate::handle::sealed::Sealed for JoinHandle {}

impl crate::handle::Give for JoinHandle {
    fn give_to(&self, task: u64) {
        self.inner.give_to(task);
    }
}

/// A handle that can only kill a task (see [`JoinHandle::kill`]) and ask whether it has ended;
/// made by [`JoinHandle::kill_handle`]. A libos object like [`JoinHandle`]: `Clone` (another
/// handle, owned by the running task), given to another task with [`spawn_with`].
#[derive(Debug)]
pub struct KillHandle {
    id: u64,
    inner: crate::handle::Owned<crate::sched::KillHandle<glue::Guest>>,
}

impl Clone for KillHandle {
    fn clone(&self) -> KillHandle {
        let _k = crate::mm::ctx::kernel();
        let k = self.killer();
        KillHandle {
            id: self.id,
            inner: crate::handle::Owned::new(k),
        }
    }
}

impl KillHandle {
    fn killer(&self) -> crate::sched::KillHandle<glue::Guest> {
        let _k = crate::mm::ctx::kernel();
        self.inner.with(|k| k.clone())
    }

    /// The task's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True once the task has ended.
    pub fn is_finished(&self) -> bool {
        // The handle's clone lives inside kernel context (a kill waits until it is dropped).
        let _k = crate::mm::ctx::kernel();
        let k = self.killer();
        glue::is_finished(&k)
    }

    /// Ends the task if it has not ended yet, as [`JoinHandle::kill`] does.
    pub fn kill(&self) {
        let _k = crate::mm::ctx::kernel();
        let k = self.killer();
        glue::kill(&k);
    }
}

impl crate::handle::sealed::Sealed for KillHandle {}

impl crate::handle::Give for KillHandle {
    fn give_to(&self, task: u64) {
        self.inner.give_to(task);
    }
}
