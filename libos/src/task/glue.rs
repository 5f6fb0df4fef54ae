//! The guest glue: the one [`Sched`] static, the guest task context, and the code that carries
//! out what the state machine decides (switch stacks, idle, drop dead tasks).
//!
//! The scheduler is reachable only through [`with_sched`], which asks for the interrupts-off
//! token ([`IrqOff`]) and a closure: no `&'static mut` is handed out, and the borrow ends when
//! the closure returns, before any switch (a [`Step::Switch`] carries only the switch's
//! arguments). Entering it again from inside the closure (a destructor that calls back into the
//! scheduler, say) is caught and reported instead of aliasing it.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use templates::AddressSpace;

use crate::arch::irq::{self, IrqOff};
use crate::arch::{context, cpu};
use crate::sched::policy::{self, Failure, Reason, Verdict};
use crate::sched::{
    Context, Join, JoinHandle, Kill, KillHandle, Sched, Step, TaskError, TaskResult,
};
use crate::space::KernelMem;
use crate::stack::KernelStack;

/// A spawned task's code: its closure, in a kernel-heap block of its own.
///
/// Not a `Box<dyn FnOnce>`: calling one of those frees the box only after the closure returns,
/// so a task that panics, faults or is killed would leave its block behind. [`Entry::call`]
/// moves the closure onto the task's stack and frees the block first. Dropped uncalled (a task
/// killed before it ran), the block is freed without dropping the closure: its captures belong
/// to the child's memory, which goes with it (`task::Builder::spawn`).
pub(super) struct Entry {
    block: core::ptr::NonNull<u8>,
    /// Reads the closure out of `block`, frees `block`, and runs the closure.
    run: unsafe fn(core::ptr::NonNull<u8>) -> i32,
    /// Frees `block` without dropping the closure.
    free: unsafe fn(core::ptr::NonNull<u8>),
}

// SAFETY: the closure is `Send` (`Entry::new`'s bound), and the block is owned by the entry alone.
unsafe impl Send for Entry {}

impl core::fmt::Debug for Entry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Entry").field("block", &self.block).finish()
    }
}

impl Entry {
    /// Moves `f` into a block of the heap that the current context allocates from (kernel context
    /// for a spawn).
    pub(super) fn new<F: FnOnce() -> i32 + Send + 'static>(f: F) -> Entry {
        /// # Safety
        /// `block` came from `Entry::new::<F>` and is used no more.
        unsafe fn run<F: FnOnce() -> i32>(block: core::ptr::NonNull<u8>) -> i32 {
            // SAFETY: `block` is the `Box<MaybeUninit<F>>` leaked by `new`, holding an `F`.
            let b = unsafe { Box::from_raw(block.as_ptr().cast::<core::mem::MaybeUninit<F>>()) };
            // SAFETY: the block holds an initialised `F`, read out once (the box then frees the
            // memory without dropping anything: it is a `MaybeUninit`).
            let f = unsafe { b.assume_init_read() };
            drop(b);
            // Only now (the block is gone: a task preempted and killed from here on leaves
            // nothing behind) may interrupts come on; the closure is app code. Its kernel
            // context and holds start at nothing (the values here are the task's that switched
            // to this one).
            crate::mm::ctx::set_depth(0);
            crate::mm::ctx::set_holds(0);
            irq::enable();
            f()
        }
        /// # Safety
        /// As for `run`.
        unsafe fn free<F>(block: core::ptr::NonNull<u8>) {
            // SAFETY: as for `run`; nothing is read, so the closure is not dropped.
            drop(unsafe { Box::from_raw(block.as_ptr().cast::<core::mem::MaybeUninit<F>>()) });
        }
        let b = Box::new(core::mem::MaybeUninit::new(f));
        Entry {
            block: core::ptr::NonNull::from(Box::leak(b)).cast(),
            run: run::<F>,
            free: free::<F>,
        }
    }

    /// Runs the closure. Call with interrupts off: the block is freed first, then interrupts go
    /// on and the closure runs in app context.
    fn call(self) -> i32 {
        let me = core::mem::ManuallyDrop::new(self);
        // SAFETY: `block` and `run` were made together by `new`; the entry is forgotten, so the
        // block is used once.
        unsafe { (me.run)(me.block) }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // SAFETY: `block` and `free` were made together by `new`, and the entry was not called.
        unsafe { (self.free)(self.block) }
    }
}

/// The guest's per-task context.
pub(super) struct Guest {
    /// Saved stack pointer while the task is not running.
    rsp: u64,
    /// Physical address of the root table (CR3).
    cr3: u64,
    space: AddressSpace<KernelMem>,
    /// The task's own top table (its statics, `crate::process`); dropped with the task, whose
    /// space is then never loaded again.
    #[allow(dead_code, reason = "held for its Drop")]
    top: crate::procmem::Top,
    /// `None` for the main task (it runs on the boot's main stack). Held so that dropping the
    /// task frees its stack.
    #[allow(dead_code, reason = "held for its Drop")]
    stack: Option<KernelStack>,
    entry: Option<Entry>,
    /// Preempted inside libos's kernel context (the timer interrupted code at depth > 0): a kill
    /// then waits for the task's next kill point (`Sched::kill`'s `Deferred`), since that code
    /// may hold, on its stack only, what an end there would leak.
    stopped_in_kernel: bool,
}

/// The arguments of one [`context::switch`].
#[derive(Debug)]
pub(super) struct Switch {
    /// The outgoing task's saved-stack-pointer field, inside its box where the scheduler keeps it.
    save: *mut u64,
    /// The outgoing task's `stopped_in_kernel` field, in the same box.
    stopped: *mut bool,
    rsp: u64,
    cr3: u64,
}

impl Context for Guest {
    type Switch = Switch;
    fn may_end_here(&self) -> bool {
        !self.stopped_in_kernel
    }
    fn switch_to(&mut self, next: &mut Guest) -> Switch {
        Switch {
            save: &raw mut self.rsp,
            stopped: &raw mut self.stopped_in_kernel,
            rsp: next.rsp,
            cr3: next.cr3,
        }
    }
}

/// Timer ticks per quantum: the APIC timer's period is the quantum.
const QUANTUM_TICKS: u32 = 1;

static SCHED: spin::Mutex<Sched<Guest>> = spin::Mutex::new(Sched::new(QUANTUM_TICKS));
static PREEMPTION: AtomicBool = AtomicBool::new(false);
static SPAWNED: AtomicU64 = AtomicU64::new(0);

/// Runs `f` on the scheduler. Interrupts are off (the token says so), so on this one CPU the
/// lock is free unless `f` (or something it calls) asked for it again: that is reported.
fn with_sched<R>(_: &IrqOff, f: impl FnOnce(&mut Sched<Guest>) -> R) -> R {
    debug_assert!(!irq::are_enabled(), "an IrqOff token with interrupts on");
    let Some(mut s) = SCHED.try_lock() else {
        panic!("the scheduler was entered again from inside itself");
    };
    f(&mut s)
}

fn now() -> u64 {
    cpu::rdtsc()
}

/// Sets up the main task (the app's `main`) with an empty address space of its own and loads it;
/// with `preemption` (boot started the APIC timer), turns interrupts on so the timer preempts.
pub(crate) fn init(preemption: bool) {
    cpu::set_kill_hook(end_if_killed);
    let mut space = AddressSpace::new(
        &KernelMem,
        &[],
        crate::space::mode(),
        Some(crate::space::kernel_half()),
    )
    .expect("out of memory creating the main task's address space");
    crate::procmem::map_first(&mut space).expect("out of memory mapping the main task's heap");
    let top = crate::procmem::Top::install(&space)
        .expect("out of memory creating the main task's top table");
    let cr3 = space.root();
    let main = Guest {
        rsp: 0,
        cr3: cr3.start_address().as_u64(),
        space,
        top,
        stack: None,
        entry: None,
        stopped_in_kernel: false,
    };
    irq::without(|tok| {
        let started = with_sched(tok, |s| {
            let id = s.start(main).ok()?;
            enter_running(s);
            Some(id)
        });
        let id = started.expect("task::init ran twice");
        cpu::set_running_task(id);
        // SAFETY: the root was made with the kernel half attached, so code, stack and data stay
        // mapped once it is loaded.
        unsafe {
            crate::arch::mmu::load_root(cr3, ::x86_64::registers::control::Cr3Flags::empty())
        };
    });
    // App code allocates from its task's heap from now on.
    crate::mm::ctx::set_ready();
    if preemption {
        PREEMPTION.store(true, Ordering::Relaxed);
        irq::enable();
    } else {
        log::warn!("no local APIC: tasks are scheduled cooperatively only");
    }
}

/// Records the running task as the one whose space is loaded and whose id reports show, and
/// whether a kill waits for it (carried out where it leaves libos: [`end_if_killed`]).
fn enter_running(s: &mut Sched<Guest>) {
    if let Some(t) = s.running_mut() {
        cpu::set_running_task(t.id());
        cpu::set_kill_pending(t.kill_pending());
        crate::space::set_current(&mut t.ctx.space);
    }
}

/// Called (through `arch::cpu`'s hook, from `mm::ctx`) where the running task, with a kill
/// waiting for it, leaves libos for its own code: it ends now, unless it cannot safely here
/// (interrupts off, a kernel lock held, a shared value's lock held: a later kill point, the
/// timer or the lock's release does it then).
fn end_if_killed() {
    if !in_spawned_task()
        || !irq::are_enabled()
        || irq::irq_locks_held() > 0
        || SCHED.is_locked()
        || NO_KILL.lock().contains_key(&current())
    {
        return;
    }
    end_current(Err(TaskError::Killed));
}

/// Set by the timer tick while it preempts code that was in kernel context; the switch records
/// it in the outgoing task (`Guest::stopped_in_kernel`). Interrupts are off meanwhile.
static PREEMPTING_KERNEL: AtomicBool = AtomicBool::new(false);

/// True while the running task is inside libos code that a kill must not cut short: kernel
/// context deeper than `base` (the caller's own level), or a hold (`mm::ctx::hold`, app code
/// libos called back).
fn in_kernel_code(base: usize) -> bool {
    crate::mm::ctx::depth() > base || crate::mm::ctx::holds() > 0
}

/// Whether the running task, about to switch voluntarily (yield, sleep, join: kill points), may
/// not be ended there: inside a hold (an app callback libos made, whose caller holds state), or
/// holding a shared value's lock. Ask before taking the scheduler (it locks the no-kill map).
fn held_at_kill_point() -> bool {
    crate::mm::ctx::holds() > 0 || in_no_kill(current())
}

/// Records [`held_at_kill_point`]'s answer in the running task, for the scheduler's kill point.
fn at_kill_point(s: &mut Sched<Guest>, held: bool) {
    if let Some(t) = s.running_mut() {
        t.ctx.stopped_in_kernel = held;
    }
}

/// Id of the running task (0 = the app's `main`).
pub(super) fn current() -> u64 {
    cpu::running_task()
}

/// True when the running task is a spawned one (not the app's `main`).
pub(crate) fn in_spawned_task() -> bool {
    current() != 0
}

pub(super) fn spawned_count() -> u64 {
    SPAWNED.load(Ordering::Relaxed)
}

/// What a spawn that was taken back returns to its caller to release: the space, the top
/// table, the stack and the (unrun) closure.
pub(super) type Unspawned = (
    AddressSpace<KernelMem>,
    crate::procmem::Top,
    KernelStack,
    Option<Entry>,
);

/// Queues a new task that runs `entry` on `stack` in `space`, if `keep` (asked once the task and
/// every kernel-heap object it needs exist, before anything can run it: interrupts stay off) says
/// so; else the task is taken back and its space and stack are returned for the caller to
/// release.
#[allow(
    clippy::result_large_err,
    reason = "the error hands the task's parts back on the rare out-of-memory path, once; boxing \
              them would allocate on that path"
)]
pub(super) fn spawn(
    space: AddressSpace<KernelMem>,
    top: crate::procmem::Top,
    stack: KernelStack,
    entry: Entry,
    keep: impl FnOnce() -> bool,
) -> Result<JoinHandle<Guest>, Unspawned> {
    // SAFETY: the stack was just allocated: mapped, writable, unused, page aligned, and much
    // larger than the frame.
    let rsp = unsafe { context::initial_frame(stack.top(), task_trampoline) };
    let ctx = Guest {
        rsp,
        cr3: space.root().start_address().as_u64(),
        space,
        top,
        stack: Some(stack),
        entry: Some(entry),
        stopped_in_kernel: false,
    };
    irq::without(|tok| {
        let h = with_sched(tok, |s| s.spawn(ctx));
        if keep() {
            return Ok(h);
        }
        // Not run yet (no preemption with interrupts off), so still in the run queue.
        match with_sched(tok, |s| s.unspawn(h)) {
            // The closure goes back to the caller too, to be dropped with interrupts on (its
            // captured values' destructors are app code).
            Ok(Guest {
                space,
                top,
                stack: Some(stack),
                entry,
                ..
            }) => Err((space, top, stack, entry)),
            _ => unreachable!("a task spawned with interrupts off ran before they came on"),
        }
    })
}

/// Counts a spawn that is kept.
pub(super) fn count_spawn() {
    SPAWNED.fetch_add(1, Ordering::Relaxed);
}

/// First code of every spawned task (reached by `ret` from the first switch to it, with
/// interrupts off).
extern "C" fn task_trampoline() -> ! {
    let entry = irq::without(|tok| {
        let (dead, entry) = with_sched(tok, |s| {
            let dead = s.finish_switch();
            enter_running(s);
            (dead, s.running_mut().and_then(|t| t.ctx.entry.take()))
        });
        drop_dead(dead);
        entry
    });
    // The task's own code: `call` turns interrupts on and enters app context (the switch here
    // came from inside libos) once the closure's block is freed.
    let code = match entry {
        Some(e) => e.call(),
        None => {
            irq::enable();
            0
        }
    };
    let _k = crate::mm::ctx::kernel();
    end_current(Ok(code))
}

/// Carries out `step`. Interrupts are off (the token).
fn carry(tok: &IrqOff, step: Step<Switch>) {
    match step {
        Step::Stay => {}
        Step::Switch(sw) => {
            // Every path that leaves the task checks this, preemption and exit included.
            check_no_kernel_lock();
            switch(tok, sw)
        }
        Step::Idle => {
            check_no_kernel_lock();
            idle(tok)
        }
    }
}

fn switch(tok: &IrqOff, sw: Switch) {
    // The kernel-context depth is this task's: kept on its stack across the switch.
    let depth = crate::mm::ctx::depth();
    let nest = crate::mm::ctx::holds();
    let stopped = PREEMPTING_KERNEL.swap(false, Ordering::Relaxed) || nest > 0;
    // SAFETY: `stopped` points into the outgoing task's box, as `save` does (see below), and
    // interrupts are off.
    unsafe { *sw.stopped = stopped };
    // SAFETY: interrupts are off (the token); `save` points at the outgoing task's saved-RSP
    // field inside the box the scheduler keeps it in (run queue, sleepers, a join state or the
    // zombie slot), which nothing touches until that task is picked again, or, for a zombie,
    // until the next task's `finish_switch` has dropped it — after this write; `rsp` and `cr3`
    // are the next task's, saved by its own last switch (or made by `initial_frame`), and its
    // root maps the kernel half.
    unsafe { context::switch(sw.save, sw.rsp, sw.cr3) };
    // Back in this task, possibly much later.
    crate::mm::ctx::set_depth(depth);
    crate::mm::ctx::set_holds(nest);
    finish_switch(tok);
}

/// Work after every switch, in the task switched to: drop the task that ended before it (with
/// interrupts off, so that no other space is created or dropped meanwhile).
fn finish_switch(tok: &IrqOff) {
    let dead = with_sched(tok, |s| {
        let dead = s.finish_switch();
        enter_running(s);
        dead
    });
    drop_dead(dead);
}

/// Drops a task that ended, after releasing every libos object it still owned
/// (`handle::release_all`: its sockets close, its channel ends and shared heaps go).
fn drop_dead<T: core::ops::Deref<Target = crate::sched::Task<Guest>>>(dead: Option<T>) {
    if let Some(t) = &dead {
        crate::handle::release_all(t.id());
        // It ended inside a no-kill section (a panic or fault holding a shared lock): the
        // lock's next taker sees its holder gone.
        NO_KILL.lock().remove(&t.id());
    }
    drop(dead);
}

/// Nothing is runnable and the task the CPU is on cannot go on (blocked, asleep or ended): wait
/// with interrupts on until the scheduler says how to go on. The timer tick finds no running
/// task meanwhile and does nothing; without a timer, poll instead of halting.
fn idle(tok: &IrqOff) {
    loop {
        // Interrupts go on only here, between two uses of the scheduler, never inside one.
        if PREEMPTION.load(Ordering::Relaxed) {
            irq::enable_and_wait();
        } else {
            irq::enable();
            core::hint::spin_loop();
        }
        irq::disable();
        match with_sched(tok, |s| {
            let step = s.poll_idle(now());
            if matches!(step, Step::Stay) {
                enter_running(s);
            }
            step
        }) {
            Step::Idle => {}
            step => return carry(tok, step),
        }
    }
}

/// Switching now would leave a kernel lock taken, with interrupts off, for whichever task asks
/// for it next: a silent freeze. Report it instead (a panic: it ends the app, see the policy).
fn check_no_kernel_lock() {
    let held = irq::irq_locks_held();
    if held > 0 {
        panic!(
            "yield while holding a kernel lock ({held} interrupt-disabling lock(s) held): \
             a task must not yield, sleep or block inside a kernel critical section"
        );
    }
}

pub(super) fn yield_now() {
    let _k = crate::mm::ctx::kernel();
    check_no_kernel_lock();
    let held = held_at_kill_point();
    irq::without(|tok| {
        let step = with_sched(tok, |s| {
            at_kill_point(s, held);
            s.yield_now(now())
        });
        carry(tok, step);
    });
}

pub(super) fn sleep_until(deadline: u64) {
    let _k = crate::mm::ctx::kernel();
    check_no_kernel_lock();
    let held = held_at_kill_point();
    irq::without(|tok| {
        let step = with_sched(tok, |s| {
            at_kill_point(s, held);
            s.sleep(deadline, now())
        });
        carry(tok, step);
    });
}

pub(super) fn join(h: JoinHandle<Guest>) -> TaskResult {
    let _k = crate::mm::ctx::kernel();
    check_no_kernel_lock();
    let held = held_at_kill_point();
    irq::without(|tok| {
        let mut j = with_sched(tok, |s| {
            at_kill_point(s, held);
            s.join(h, now())
        });
        loop {
            match j {
                Join::Done(r) => return r,
                Join::Wait(step) => {
                    carry(tok, step);
                    j = with_sched(tok, |s| {
                        at_kill_point(s, held);
                        s.rejoin(now())
                    });
                }
            }
        }
    })
}

pub(super) fn is_finished(h: &KillHandle<Guest>) -> bool {
    let _k = crate::mm::ctx::kernel();
    irq::without(|tok| with_sched(tok, |s| s.is_finished(h)))
}

/// Tasks inside a *no-kill section* (holding a shared heap's lock, `crate::shared`): how many
/// sections each is in, and whether a kill is waiting for the last one to end. A task's entry
/// exists exactly while it is in at least one section (or until it is dropped dead), so it also
/// tells whether the holder of such a lock is still alive.
static NO_KILL: crate::arch::irq::IrqMutex<alloc::collections::BTreeMap<u64, NoKill>> =
    crate::arch::irq::IrqMutex::new(alloc::collections::BTreeMap::new());

#[derive(Debug, Clone, Copy)]
struct NoKill {
    depth: u32,
    kill_pending: bool,
}

/// The running task enters a no-kill section: a kill of it waits until it leaves its last one
/// ([`leave_no_kill`]). Used where being ended half-way would leave memory other tasks use
/// inconsistent (a shared heap's lock). Call it with interrupts off, together with what the
/// section protects, so the two change at once.
pub(crate) fn enter_no_kill(_: &IrqOff) {
    let _k = crate::mm::ctx::kernel();
    NO_KILL
        .lock()
        .entry(current())
        .and_modify(|e| e.depth += 1)
        .or_insert(NoKill {
            depth: 1,
            kill_pending: false,
        });
}

/// The running task leaves a no-kill section. If it was its last one and a kill came
/// meanwhile, the task ends now, killed (never returning).
pub(crate) fn leave_no_kill() {
    let killed = {
        let _k = crate::mm::ctx::kernel();
        let mut map = NO_KILL.lock();
        let id = current();
        match map.get_mut(&id) {
            Some(e) if e.depth > 1 => {
                e.depth -= 1;
                false
            }
            Some(e) => {
                let pending = e.kill_pending;
                map.remove(&id);
                pending
            }
            None => false,
        }
    };
    if killed && in_spawned_task() {
        end_current(Err(TaskError::Killed));
    }
}

/// True while task `id` is inside a no-kill section (so: alive).
pub(crate) fn in_no_kill(id: u64) -> bool {
    NO_KILL.lock().contains_key(&id)
}

pub(super) fn kill(h: &KillHandle<Guest>) {
    let _k = crate::mm::ctx::kernel();
    // A task in a no-kill section is killed when it leaves it.
    if let Some(e) = NO_KILL.lock().get_mut(&h.id()) {
        e.kill_pending = true;
        return;
    }
    irq::without(|tok| match with_sched(tok, |s| s.kill(h, now())) {
        // Ended already, or preempted inside libos: it ends at its next kill point.
        Kill::AlreadyEnded | Kill::Deferred => {}
        // Dropped with interrupts off: its space goes, and no other is made meanwhile.
        Kill::Ended(task) => drop_dead(Some(task)),
        Kill::Current(step) => {
            carry(tok, step);
            unreachable!("a killed task was scheduled again");
        }
    });
}

/// Called from the timer interrupt (interrupts off): preempts the running task when its quantum
/// is used up and another task is runnable.
pub(crate) fn timer_tick() {
    if !PREEMPTION.load(Ordering::Relaxed) {
        return;
    }
    irq::without(|tok| {
        // The trap handler's own kernel context is one level: more means the timer interrupted
        // libos code.
        let in_kernel = in_kernel_code(1);
        // A kill that waited (the task was preempted inside libos) is carried out once the
        // timer finds the task in its own code, outside a shared value's lock.
        if !in_kernel
            && in_spawned_task()
            && with_sched(tok, |s| s.running().is_some_and(|t| t.kill_pending()))
            && !NO_KILL.lock().contains_key(&current())
        {
            end_current(Err(TaskError::Killed));
        }
        let step = with_sched(tok, |s| s.tick(now()));
        PREEMPTING_KERNEL.store(in_kernel, Ordering::Relaxed);
        carry(tok, step);
        PREEMPTING_KERNEL.store(false, Ordering::Relaxed);
    });
}

/// Ends the running spawned task with `result`; never returns.
pub(super) fn end_current(result: TaskResult) -> ! {
    let _k = crate::mm::ctx::kernel();
    irq::without(|tok| {
        let step = with_sched(tok, |s| s.exit(result, now()));
        carry(tok, step);
    });
    unreachable!("a zombie task was scheduled again")
}

/// Called by the fault and panic handlers: decides with the fault policy ([`policy::decide`])
/// and either ends only the running spawned task with the error `err` builds (never called
/// otherwise: it may allocate), or ends the app with the reserved exit code.
pub(crate) fn fail_current(failure: Failure, err: impl FnOnce() -> TaskError) -> ! {
    // Failing inside the scheduler (e.g. a stack overflow in a yield) is failing inside a kernel
    // critical section too: its lock cannot be given back.
    let locks = irq::irq_locks_held() + usize::from(SCHED.is_locked());
    // A spawned task is running — not merely the one the CPU idles on (a fault in interrupt
    // context while idle, e.g. an NMI, has no task to end: the app ends). The scheduler is free
    // to ask when no lock is held.
    let spawned = in_spawned_task()
        && (locks > 0 || irq::without(|tok| with_sched(tok, |s| s.running().is_some())));
    match policy::decide(failure, spawned, locks) {
        Verdict::EndTask => end_current(Err(err())),
        Verdict::EndApp { code, reason } => {
            if reason == Reason::LockHeld {
                let what = match failure {
                    Failure::Fault => "a CPU exception",
                    Failure::StackOverflow => "a stack overflow",
                    Failure::Panic { .. } => "a panic",
                };
                crate::console::emergency_write(format_args!(
                    "stencil: task {} failed ({what}) while holding a kernel lock; the system \
                     cannot go on safely\n",
                    current()
                ));
            }
            crate::shutdown::fatal_exit(u32::from(code.code()))
        }
    }
}
