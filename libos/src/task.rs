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
//! Concurrency: one CPU. The scheduler's state is touched only with interrupts disabled.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::arch::irq as interrupts;
use templates::{AddressSpace, Mode};

use crate::space::{KernelMem, Template};
use crate::stack::KernelStack;

/// Default stack size of a spawned task.
pub const DEFAULT_STACK: u64 = 32 << 10;
/// Largest stack of a spawned task: a kernel-stack slot less its guard page (4 MiB - 4 KiB).
pub const MAX_STACK: u64 = crate::stack::MAX_STACK;
/// Frames kept free for the kernel heap: [`spawn`] fails with [`SpawnError::OutOfMemory`]
/// rather than leave fewer free. The kernel heap maps single frames anywhere in RAM, so this many
/// free frames let it grow by 4 MiB: 1,024 pages plus the page tables that map them.
pub const SPAWN_RESERVE_FRAMES: usize = crate::mm::heap::frames_to_grow(1024);
/// Scheduling quantum (the APIC timer period).
pub const QUANTUM_US: u64 = 10_000;

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
    /// [`JoinHandle::kill`] ended it.
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

/// Why [`spawn`] failed. The caller keeps running; nothing leaked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnError {
    /// Not enough memory for the address space or the stack.
    OutOfMemory,
    /// The templates cannot be attached together (e.g. two claim the same 1 GiB slot).
    Layout(templates::Error),
    /// Every kernel-stack slot is in use.
    TooManyTasks,
    /// [`Builder::stack_size`] asked for more than a kernel-stack slot holds.
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

type Entry = Box<dyn FnOnce() -> i32 + Send + 'static>;

struct JoinState {
    result: UnsafeCell<Option<Result<i32, TaskError>>>,
    waiter: UnsafeCell<*mut Task>,
}

// SAFETY: the cells are only touched with interrupts disabled on the one CPU (see module docs).
unsafe impl Send for JoinState {}
// SAFETY: as above.
unsafe impl Sync for JoinState {}

struct Task {
    id: u64,
    /// Saved stack pointer while not running.
    rsp: u64,
    /// Physical address of the root table (CR3).
    cr3: u64,
    space: AddressSpace<KernelMem>,
    /// `None` for the main task (it runs on the boot's main stack). Held so that dropping the
    /// task frees its stack.
    #[allow(dead_code, reason = "held for its Drop")]
    stack: Option<KernelStack>,
    entry: Option<Entry>,
    join: Arc<JoinState>,
    killed: bool,
}

struct Sched {
    current: *mut Task,
    run_queue: VecDeque<*mut Task>,
    /// (deadline TSC, task)
    sleepers: Vec<(u64, *mut Task)>,
    /// A task that exited; freed by whoever runs next (it cannot free its own stack).
    zombie: *mut Task,
    /// TSC when the current task was switched in.
    slice_start: u64,
}

struct SchedCell(UnsafeCell<Sched>);
// SAFETY: only accessed with interrupts disabled on the one CPU.
unsafe impl Sync for SchedCell {}

static SCHED: SchedCell = SchedCell(UnsafeCell::new(Sched {
    current: core::ptr::null_mut(),
    run_queue: VecDeque::new(),
    sleepers: Vec::new(),
    zombie: core::ptr::null_mut(),
    slice_start: 0,
}));
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static PREEMPTION: AtomicBool = AtomicBool::new(false);
/// The CPU waits in `switch_away` with nothing runnable (the current task is blocked or exiting).
static IDLE: AtomicBool = AtomicBool::new(false);
static SPAWNED: AtomicU64 = AtomicU64::new(0);

/// The scheduler state. Callers hold interrupts off for as long as they use the reference.
fn sched() -> &'static mut Sched {
    debug_assert!(!interrupts::are_enabled());
    // SAFETY: interrupts are off and there is one CPU, so nothing else can reach SCHED while the
    // caller uses this reference (callers never keep it across a context switch).
    unsafe { &mut *SCHED.0.get() }
}

/// Runs `f` with interrupts off, restoring the previous state afterwards.
fn irq_off<R>(f: impl FnOnce() -> R) -> R {
    interrupts::without(|_| f())
}

core::arch::global_asm!(
    ".text",
    ".global stencil_switch",
    // stencil_switch(old_rsp: *mut u64, new_rsp: u64, new_cr3: u64)
    "stencil_switch:",
    "pushfq",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi], rsp",
    "mov rax, cr3",
    "cmp rax, rdx",
    "je 2f",
    "mov cr3, rdx",
    "2:",
    "mov rsp, rsi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "popfq",
    "ret",
);

unsafe extern "C" {
    /// Saves the callee-saved registers and RFLAGS on the current stack, stores the stack pointer
    /// in `*old_rsp`, switches CR3 (if different) and resumes the context saved at `new_rsp`.
    fn stencil_switch(old_rsp: *mut u64, new_rsp: u64, new_cr3: u64);
}

/// Sets up the main task (the app's `main`) with an empty address space of its own and loads it;
/// with `preemption` (boot started the APIC timer), turns interrupts on so the timer preempts.
pub(crate) fn init(preemption: bool) {
    let space = AddressSpace::new(
        &KernelMem,
        &[],
        crate::space::mode(),
        Some(crate::space::kernel_half()),
    )
    .expect("out of memory creating the main task's address space");
    let cr3 = space.root().start_address().as_u64();
    let main = Box::into_raw(Box::new(Task {
        id: 0,
        rsp: 0,
        cr3,
        space,
        stack: None,
        entry: None,
        join: Arc::new(JoinState {
            result: UnsafeCell::new(None),
            waiter: UnsafeCell::new(core::ptr::null_mut()),
        }),
        killed: false,
    }));
    irq_off(|| {
        let s = sched();
        s.current = main;
        s.slice_start = crate::arch::cpu::rdtsc();
        // SAFETY: `main` was just created; its root has the kernel half.
        crate::space::set_current(unsafe { &mut (*main).space });
        // SAFETY: the root maps the kernel half, so execution continues unchanged.
        unsafe {
            crate::arch::mmu::load_root(
                ::x86_64::structures::paging::PhysFrame::containing_address(
                    ::x86_64::PhysAddr::new(cr3),
                ),
                ::x86_64::registers::control::Cr3Flags::empty(),
            )
        };
    });
    if preemption {
        PREEMPTION.store(true, Ordering::Relaxed);
        interrupts::enable();
    } else {
        log::warn!("no local APIC: tasks are scheduled cooperatively only");
    }
}

/// Id of the running task (0 = the app's `main`).
///
/// ```no_run
/// libos::println!("running in task {}", libos::task::current());
/// ```
pub fn current() -> u64 {
    irq_off(|| {
        let cur = sched().current;
        if cur.is_null() {
            0
        } else {
            // SAFETY: `current` is a live task while it runs.
            unsafe { (*cur).id }
        }
    })
}

/// True when the running task is a spawned one (not the app's `main`).
pub(crate) fn in_spawned_task() -> bool {
    current() != 0
}

/// Number of tasks spawned since boot.
///
/// ```no_run
/// libos::println!("{} tasks so far", libos::task::spawned_count());
/// ```
pub fn spawned_count() -> u64 {
    SPAWNED.load(Ordering::Relaxed)
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
    pub fn spawn<F>(self, templates: &[&Template], f: F) -> Result<JoinHandle, SpawnError>
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
        // Interrupts off: the engine's reference counting assumes no other space is created or
        // dropped halfway through (see `finish_switch`).
        let space = irq_off(|| {
            AddressSpace::new(
                &KernelMem,
                templates,
                mode,
                Some(crate::space::kernel_half()),
            )
        })
        .map_err(|e| match e {
            templates::Error::OutOfFrames => SpawnError::OutOfMemory,
            e => SpawnError::Layout(e),
        })?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let join = Arc::new(JoinState {
            result: UnsafeCell::new(None),
            waiter: UnsafeCell::new(core::ptr::null_mut()),
        });
        // Initial frame popped by `stencil_switch`: r15 r14 r13 r12 rbx rbp rflags, then the
        // return address (the trampoline) and a zero "return address" for the trampoline itself,
        // which leaves the stack aligned as at a function entry.
        let top = stack.top();
        let frame = [
            0u64,
            0,
            0,
            0,
            0,
            0,
            0x2,
            task_trampoline as *const () as u64,
            0,
        ];
        let rsp = top - 8 * frame.len() as u64;
        // SAFETY: the stack is mapped, writable and not in use; the frame fits at its top.
        unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), rsp as *mut u64, frame.len()) };
        let cr3 = space.root().start_address().as_u64();
        let task = Box::new(Task {
            id,
            rsp,
            cr3,
            space,
            stack: Some(stack),
            entry: Some(Box::new(f)),
            join: join.clone(),
            killed: false,
        });
        if frames.free_frames() < SPAWN_RESERVE_FRAMES {
            // This spawn (its stack, tables or kernel-heap objects) ate into the reserve: undo
            // it, keeping none of its memory (not even in the stack cache).
            let Task { space, stack, .. } = *task;
            irq_off(|| drop(space));
            if let Some(stack) = stack {
                crate::stack::release(stack);
            }
            return Err(SpawnError::OutOfMemory);
        }
        let task = Box::into_raw(task);
        irq_off(|| sched().run_queue.push_back(task));
        SPAWNED.fetch_add(1, Ordering::Relaxed);
        Ok(JoinHandle {
            id,
            task: task as usize,
            join,
        })
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
pub fn spawn<F>(templates: &[&Template], f: F) -> Result<JoinHandle, SpawnError>
where
    F: FnOnce() -> i32 + Send + 'static,
{
    Builder::new().spawn(templates, f)
}

/// First code of every spawned task (reached by `ret` from `stencil_switch`).
extern "C" fn task_trampoline() -> ! {
    finish_switch();
    let entry = irq_off(|| {
        // SAFETY: the current task is live; only it takes its own entry.
        unsafe { (*sched().current).entry.take() }
    });
    interrupts::enable();
    let code = entry.map_or(0, |f| f());
    end_current(Ok(code))
}

/// Work after every switch: free the task that exited before it.
fn finish_switch() {
    irq_off(|| {
        let zombie = core::mem::replace(&mut sched().zombie, core::ptr::null_mut());
        if !zombie.is_null() {
            // SAFETY: the zombie has switched away for good; nothing else references it. Dropped
            // with interrupts off so that no other space is created or dropped meanwhile.
            drop(unsafe { Box::from_raw(zombie) });
        }
    });
}

/// Picks the next task and switches to it. With `requeue`, the current task goes to the back of
/// the run queue (a yield); without, it is blocked or exiting and someone else will wake it (or
/// it is a zombie). Interrupts must be off.
fn switch_away(requeue: bool) {
    let held = crate::arch::irq::irq_locks_held();
    if held > 0 {
        // Switching now would leave the lock taken, with interrupts off, for whichever task asks
        // for it next: a silent freeze. Report it instead (this ends the app: see
        // `fail_current`).
        panic!(
            "yield while holding a kernel lock ({held} interrupt-disabling lock(s) held): \
             a task must not yield, sleep or block inside a kernel critical section"
        );
    }
    let cur = sched().current;
    let next = loop {
        let s = sched();
        wake_sleepers(s);
        if let Some(t) = s.run_queue.pop_front() {
            break t;
        }
        if requeue {
            return; // nothing else to run: keep going
        }
        // Nothing runnable, and `cur` is blocked or a zombie: wait with interrupts on. The timer
        // tick must not treat `cur` as a running task meanwhile (it would requeue it), hence
        // IDLE; without a timer, poll the sleepers instead of halting.
        IDLE.store(true, Ordering::Relaxed);
        if PREEMPTION.load(Ordering::Relaxed) {
            interrupts::enable_and_wait();
        } else {
            interrupts::enable();
            core::hint::spin_loop();
        }
        interrupts::disable();
        IDLE.store(false, Ordering::Relaxed);
    };
    let s = sched();
    if next == cur {
        // The idle loop woke the very task it was idling in (it had gone to sleep): just go on.
        s.slice_start = crate::arch::cpu::rdtsc();
        return;
    }
    if requeue {
        s.run_queue.push_back(cur);
    }
    s.current = next;
    s.slice_start = crate::arch::cpu::rdtsc();
    // SAFETY: `next` is a live task taken from the run queue; its space is live while it runs.
    unsafe {
        crate::space::set_current(&mut (*next).space);
        stencil_switch(&mut (*cur).rsp, (*next).rsp, (*next).cr3);
    }
    // Back in `cur`, possibly much later.
    finish_switch();
    // SAFETY: we are `cur` again, running.
    if unsafe { (*cur).killed } && unsafe { (*cur).id } != 0 {
        end_current(Err(TaskError::Killed));
    }
}

fn wake_sleepers(s: &mut Sched) {
    if s.sleepers.is_empty() {
        return;
    }
    let now = crate::arch::cpu::rdtsc();
    let mut i = 0;
    while i < s.sleepers.len() {
        if s.sleepers[i].0 <= now {
            let (_, t) = s.sleepers.swap_remove(i);
            s.run_queue.push_back(t);
        } else {
            i += 1;
        }
    }
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
    irq_off(|| switch_away(true));
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
    let deadline = crate::limits::deadline(now, d, crate::time::tsc_hz()).unwrap_or(u64::MAX);
    irq_off(|| {
        let s = sched();
        s.sleepers.push((deadline, s.current));
        switch_away(false);
    });
}

/// Called from the timer interrupt (interrupts off): preempts the running task when its quantum
/// is used up and another task is runnable.
pub(crate) fn timer_tick() {
    if !PREEMPTION.load(Ordering::Relaxed) || IDLE.load(Ordering::Relaxed) {
        // Idle: the halted loop in `switch_away` wakes sleepers itself.
        return;
    }
    let s = sched();
    if s.current.is_null() {
        return;
    }
    wake_sleepers(s);
    if !s.run_queue.is_empty() {
        switch_away(true);
    }
}

/// Ends the running spawned task with `result`; never returns.
fn end_current(result: Result<i32, TaskError>) -> ! {
    interrupts::disable();
    let s = sched();
    let cur = s.current;
    // SAFETY: `cur` is the live running task; JoinState cells are only touched with interrupts
    // off. (No clone of the Arc here: nothing on this stack is ever dropped after the switch.)
    unsafe {
        let join = &(*cur).join;
        *join.result.get() = Some(result);
        let waiter = core::mem::replace(&mut *join.waiter.get(), core::ptr::null_mut());
        if !waiter.is_null() {
            s.run_queue.push_back(waiter);
        }
    }
    s.zombie = cur;
    switch_away(false);
    unreachable!("a zombie task was scheduled again");
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
    end_current(Ok(code))
}

/// Called by fault and panic handlers: if a spawned task is running, ends it with `err` (never
/// returns); in the main task, returns so the caller ends the app.
pub(crate) fn fail_current(err: TaskError) {
    if in_spawned_task() {
        if crate::arch::irq::irq_locks_held() > 0 {
            // The task died inside a kernel critical section (e.g. formatting under the console
            // lock, or in the heap): the lock would stay taken with every other task waiting on
            // it with interrupts off. Ending the app with a report beats hanging.
            crate::console::emergency_write(format_args!(
                "stencil: task {} failed while holding a kernel lock ({err}); the system cannot go on safely\n",
                current()
            ));
            crate::shutdown::fatal_exit(match err {
                TaskError::Panic(_) => crate::shutdown::EXIT_PANIC,
                TaskError::StackOverflow { .. } => crate::shutdown::EXIT_STACK_OVERFLOW,
                _ => crate::shutdown::EXIT_EXCEPTION,
            });
        }
        end_current(Err(err));
    }
}

/// Owner's handle to a spawned task.
#[derive(Debug)]
#[must_use = "dropping a JoinHandle detaches the task"]
pub struct JoinHandle {
    id: u64,
    /// The task, as an address: valid while the join state holds no result (a task is freed
    /// only after its result is stored).
    task: usize,
    join: Arc<JoinState>,
}

impl fmt::Debug for JoinState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinState")
    }
}

impl JoinHandle {
    /// The task's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True once the task has ended.
    pub fn is_finished(&self) -> bool {
        // SAFETY: read with interrupts off.
        irq_off(|| unsafe { (*self.join.result.get()).is_some() })
    }

    /// Waits for the task to end; its exit code, or how it failed.
    ///
    /// ```no_run
    /// use libos::task::TaskError;
    /// let h = libos::task::spawn(&[], || panic!("boom")).expect("spawn");
    /// assert!(matches!(h.join(), Err(TaskError::Panic(_))));
    /// ```
    pub fn join(self) -> Result<i32, TaskError> {
        loop {
            let done = irq_off(|| {
                // SAFETY: JoinState cells are only touched with interrupts off.
                unsafe {
                    if let Some(r) = (*self.join.result.get()).take() {
                        return Some(r);
                    }
                    *self.join.waiter.get() = sched().current;
                }
                switch_away(false);
                None
            });
            if let Some(r) = done {
                return r;
            }
        }
    }

    /// Ends the task (if it has not ended yet); its `join` returns [`TaskError::Killed`].
    ///
    /// A runnable, preempted or sleeping task ends at once. A task blocked in
    /// [`JoinHandle::join`] ends as soon as it is woken. The task runs no destructors (objects it
    /// owned in the kernel heap leak) and a [`crate::sync::Mutex`] it holds stays locked.
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
        irq_off(|| {
            // SAFETY: JoinState cells are only touched with interrupts off.
            if unsafe { (*self.join.result.get()).is_some() } {
                return; // already ended
            }
            // Not ended, so not freed: the pointer is live.
            let task = self.task as *mut Task;
            let s = sched();
            if task == s.current {
                end_current(Err(TaskError::Killed));
            }
            // SAFETY: live (see above); we are not running it.
            unsafe { (*task).killed = true };
            let victim = if let Some(i) = s.run_queue.iter().position(|&t| t == task) {
                s.run_queue.remove(i)
            } else if let Some(i) = s.sleepers.iter().position(|&(_, t)| t == task) {
                Some(s.sleepers.swap_remove(i).1)
            } else {
                None // blocked in join: it ends when woken (see `switch_away`)
            };
            if let Some(t) = victim {
                // SAFETY: JoinState cells are only touched with interrupts off; the victim was
                // queued, not running, so nothing uses its stack and it can be freed here.
                unsafe {
                    *self.join.result.get() = Some(Err(TaskError::Killed));
                    let waiter =
                        core::mem::replace(&mut *self.join.waiter.get(), core::ptr::null_mut());
                    if !waiter.is_null() {
                        s.run_queue.push_back(waiter);
                    }
                    drop(Box::from_raw(t));
                }
            }
        });
    }
}

/// Reads `buf.len()` bytes at `va` in the running task's address space. The range is checked
/// first: an address no region maps is `Err(Fault::Unmapped)`, one outside the lower half (a
/// non-canonical or kernel-half `va`, or `va + len` past it or wrapping) `Err(Fault::NotLowerHalf)`,
/// not a crash. An empty `buf` reads nothing and succeeds at any lower-half `va`.
///
/// ```no_run
/// let mut b = [0u8; 8];
/// match libos::task::read(0x4000_0000, &mut b) {
///     Ok(()) => libos::println!("read {b:?}"),
///     Err(e) => libos::println!("not mapped here: {e}"),
/// }
/// ```
pub fn read(va: u64, buf: &mut [u8]) -> Result<(), templates::Fault> {
    crate::space::with_current(|space| crate::space::check_access(space, va, buf.len(), false))?;
    if buf.is_empty() {
        return Ok(());
    }
    // SAFETY: every byte lies in a region of the running task's space (checked), which is the
    // loaded one; demand-zero faults are resolved by the page-fault handler.
    unsafe { core::ptr::copy_nonoverlapping(va as *const u8, buf.as_mut_ptr(), buf.len()) };
    Ok(())
}

/// Writes `data` at `va` in the running task's address space (copy-on-write on the first write
/// to a `Private` template page). A read-only, unmapped or out-of-range range is an `Err` (as
/// for [`read`]), not a crash.
///
/// ```no_run
/// libos::task::map_private("scratch", 0x4000_0000, 4096).expect("map");
/// libos::task::write(0x4000_0000, b"hello").expect("writable");
/// ```
pub fn write(va: u64, data: &[u8]) -> Result<(), templates::Fault> {
    crate::space::with_current(|space| crate::space::check_access(space, va, data.len(), true))?;
    if data.is_empty() {
        return Ok(());
    }
    // SAFETY: as in `read`, and every byte is in a writable region.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), va as *mut u8, data.len()) };
    Ok(())
}

/// Maps `len` bytes of demand-zero private memory named `name` at `va` in the running task's
/// space (page aligned; must not overlap anything mapped). A non-canonical `va` is
/// `Err(Error::NonCanonical)`, one in (or a range reaching into) the kernel half — `va + len`
/// wrapping included — `Err(Error::NotLowerHalf)`, `len == 0` `Err(Error::Empty)`, an unaligned
/// `va` or `len` `Err(Error::Misaligned)`; nothing is mapped then.
///
/// ```no_run
/// libos::task::map_private("state", 0x4000_0000, 1 << 20).expect("map");
/// let mut b = [1u8; 4];
/// libos::task::read(0x4000_0000, &mut b).expect("mapped");
/// assert_eq!(b, [0; 4]); // demand-zero
/// ```
pub fn map_private(name: &str, va: u64, len: u64) -> Result<(), templates::Error> {
    // Copy the name first: it may live in this task's own memory, which must not fault while the
    // space is being changed.
    let name = String::from(name);
    let name = name.as_str();
    let va = crate::space::lower_va(va)?;
    crate::space::with_current(|space| {
        let flush = space.map(
            va,
            len,
            templates::Perm {
                write: true,
                exec: false,
            },
            name,
            false,
        )?;
        crate::space::apply(flush);
        Ok(())
    })
}

/// Turns ranges of the running task's memory into a template: the fork-server primitive.
/// Afterwards this task and every task spawned from the template share that memory
/// copy-on-write. Each range `(start, len)` must be page aligned and mapped; a non-canonical
/// start is `Err(Error::NonCanonical)`, one outside the lower half `Err(Error::NotLowerHalf)`.
///
/// ```no_run
/// use libos::task;
/// task::map_private("state", 0x4000_0000, 4096).expect("map");
/// task::write(0x4000_0000, b"warm").expect("write");
/// let snap = task::snapshot(&[(0x4000_0000, 4096)]).expect("snapshot");
/// let h = task::spawn(&[&snap], || {
///     let mut b = [0u8; 4];
///     task::read(0x4000_0000, &mut b).expect("read");
///     task::write(0x4000_0000, b"mine").expect("private copy");
///     i32::from(&b == b"warm")
/// })
/// .expect("spawn");
/// assert_eq!(h.join(), Ok(1));
/// ```
pub fn snapshot(ranges: &[(u64, u64)]) -> Result<Template, templates::Error> {
    // Copy the ranges first: they may live in this task's own memory, which must not fault while
    // the space is being changed.
    let r = crate::space::lower_ranges(ranges)?;
    crate::space::with_current(|space| {
        let (t, flush) = space.snapshot(&r)?;
        crate::space::apply(flush);
        Ok(t)
    })
}

/// Returns the frames of cached (freed but still mapped) task stacks to the frame allocator, so
/// that a leak check compares like with like.
///
/// ```no_run
/// libos::task::trim_caches();
/// let before = libos::free_frames();
/// libos::task::spawn(&[], || 0).expect("spawn").join().expect("task");
/// libos::task::trim_caches();
/// libos::println!("frames not returned: {}", before as i64 - libos::free_frames() as i64);
/// ```
pub fn trim_caches() {
    crate::stack::trim_cache();
}

/// Page-table accounting of the running task's space.
///
/// ```no_run
/// libos::println!("{:?}", libos::task::space_stats());
/// ```
pub fn space_stats() -> templates::SpaceStats {
    crate::space::with_current(|space| space.stats())
}
