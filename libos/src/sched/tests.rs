//! Host tests of the scheduler state machine: a harness plays the arch glue (it tracks whose
//! stack the CPU is on, checks every switch starts there, calls `finish_switch` after each and
//! retries a join when the joiner runs again), contexts record when they are dropped.
//!
//! The switch contract is checked as the guest relies on it: a test context holds a saved
//! "stack pointer" in a slot of its own, the switch carries a handle to the outgoing context's
//! slot (the guest's raw `save` pointer: here a `Weak`, so a slot whose task was dropped is
//! caught instead of written) and the incoming context's saved value; the harness checks the
//! handle is the outgoing task's own slot, inside the box the scheduler now keeps it in, writes
//! a fresh token through it as the assembly writes RSP, and checks that the task, when it runs
//! again, loads exactly that token.

use super::*;

/// The first token: the main task's saved value before its first switch.
const TOKEN0: u64 = 0x5700_0000;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::rc::{Rc, Weak};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use proptest::prelude::*;
use templates::sim::SimMem;
use templates::{AddressSpace, Mode, Perm};
use x86_64::VirtAddr;

/// A test context: its task's id, its saved "stack pointer" (written only through a switch's
/// `save`, as the assembly does), a shared log of drops, and optionally an address space.
struct Ctx {
    id: u64,
    saved: Rc<Cell<u64>>,
    /// The task stopped where it may not be ended (the guest: inside kernel context).
    held: Rc<Cell<bool>>,
    drops: Rc<RefCell<Vec<u64>>>,
    _space: Option<AddressSpace<SimMem>>,
}

/// The test switch: the guest's `Switch { save, rsp, cr3 }` with ids for the checks.
#[derive(Debug)]
struct Sw {
    from: u64,
    /// Where the outgoing context was when the switch was built: the box the scheduler keeps
    /// it in (compared by address only, never dereferenced).
    at: *const Ctx,
    /// The outgoing context's saved-value slot (the guest's `save: *mut u64`).
    save: Weak<Cell<u64>>,
    to: u64,
    /// The incoming context's saved value (the guest's `rsp`).
    load: u64,
}

impl PartialEq for Sw {
    fn eq(&self, o: &Sw) -> bool {
        self.from == o.from
            && core::ptr::eq(self.at, o.at)
            && Weak::ptr_eq(&self.save, &o.save)
            && self.to == o.to
            && self.load == o.load
    }
}

impl Eq for Sw {}

impl Context for Ctx {
    type Switch = Sw;
    fn switch_to(&mut self, next: &mut Self) -> Sw {
        Sw {
            from: self.id,
            at: self,
            save: Rc::downgrade(&self.saved),
            to: next.id,
            load: next.saved.get(),
        }
    }
    fn may_end_here(&self) -> bool {
        !self.held.get()
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.drops.borrow_mut().push(self.id);
    }
}

/// The arch glue, simulated.
struct Cpu {
    s: Sched<Ctx>,
    /// Whose stack the CPU is on (the running task, or the one it idles on).
    on: u64,
    idle: bool,
    now: u64,
    drops: Rc<RefCell<Vec<u64>>>,
    /// Joins a blocked task finishes when it runs again: joiner -> joined task.
    pending: BTreeMap<u64, u64>,
    /// Completed joins: (joiner, joined, result).
    joined: Vec<(u64, u64, TaskResult)>,
    space_mem: Option<SimMem>,
    /// Every task's slot, as made at spawn (identity checks).
    slots: BTreeMap<u64, Weak<Cell<u64>>>,
    /// The last token written into each task's slot (or its initial value).
    tokens: BTreeMap<u64, u64>,
    next_token: u64,
    /// Kill handles of every task (their join states hold tasks that joined themselves).
    all: Vec<KillHandle<Ctx>>,
    /// Every save: (task, token, where the scheduler kept the task when it was written).
    saves: Vec<(u64, u64, Place)>,
    /// Every switch into a task: (task, the token it loaded).
    loads: Vec<(u64, u64)>,
    /// Each spawned task's "may not be ended here" flag ([`Context::may_end_here`]).
    held: BTreeMap<u64, Rc<Cell<bool>>>,
}

impl Cpu {
    fn new(quantum: u32) -> Cpu {
        let drops = Rc::new(RefCell::new(Vec::new()));
        let mut s = Sched::new(quantum);
        let saved = Rc::new(Cell::new(TOKEN0));
        let slot = Rc::downgrade(&saved);
        let main = Ctx {
            id: 0,
            saved,
            held: Rc::new(Cell::new(false)),
            drops: drops.clone(),
            _space: None,
        };
        assert_eq!(s.start(main).ok(), Some(0));
        Cpu {
            slots: BTreeMap::from([(0, slot)]),
            tokens: BTreeMap::from([(0, TOKEN0)]),
            next_token: TOKEN0 + 1,
            all: Vec::new(),
            saves: Vec::new(),
            loads: Vec::new(),
            held: BTreeMap::new(),
            s,
            on: 0,
            idle: false,
            now: 0,
            drops,
            pending: BTreeMap::new(),
            joined: Vec::new(),
            space_mem: None,
        }
    }

    fn running(&self) -> Option<u64> {
        self.s.running().map(|t| t.id())
    }

    fn spawn(&mut self) -> JoinHandle<Ctx> {
        let id = self.s.next_id;
        let space = self.space_mem.as_ref().map(|mem| {
            let mut a = AddressSpace::new(mem, &[], Mode::Share, None).expect("space");
            a.map(
                VirtAddr::new(0x4000_0000),
                4 * 4096,
                Perm {
                    write: true,
                    exec: false,
                },
                "data",
                true,
            )
            .expect("map")
            .ignore();
            a
        });
        // The initial value, as `initial_frame` makes the first stack pointer.
        let token = self.token();
        let saved = Rc::new(Cell::new(token));
        self.slots.insert(id, Rc::downgrade(&saved));
        self.tokens.insert(id, token);
        let held = Rc::new(Cell::new(false));
        self.held.insert(id, held.clone());
        let h = self.s.spawn(Ctx {
            id,
            saved,
            held,
            drops: self.drops.clone(),
            _space: space,
        });
        assert_eq!(h.id(), id);
        self.all.push(h.kill_handle().clone());
        h
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Where the scheduler keeps the context `at` of task `id` now, if it is the context of
    /// that task in one of its places.
    fn place_of(&self, id: u64, at: *const Ctx) -> Option<Place> {
        let also: Vec<&KillHandle<Ctx>> = self.all.iter().collect();
        let mut found = None;
        self.s.visit_tasks(&also, &mut |t, p| {
            if t.id() == id && core::ptr::eq(&t.ctx, at) {
                found = Some(p);
            }
        });
        found
    }

    /// What the assembly does with a switch: write the outgoing task's stack pointer through
    /// `save` (a fresh token), load the incoming one's. Checked: `save` is the outgoing task's
    /// own slot, still alive, in the box the scheduler keeps it in; what is loaded is what the
    /// incoming task's last switch saved.
    fn switch(&mut self, sw: Sw) {
        assert_eq!(sw.from, self.on, "a switch starts from the CPU's task");
        assert_eq!(
            self.running(),
            Some(sw.to),
            "a switch ends in the running task"
        );
        let place = self.place_of(sw.from, sw.at);
        let place = place.expect("the outgoing context is where the scheduler keeps its task");
        assert_ne!(
            place,
            Place::Running,
            "the outgoing task is parked, not running"
        );
        assert!(
            Weak::ptr_eq(&sw.save, &self.slots[&sw.from]),
            "save is the outgoing task's own slot"
        );
        let slot = sw
            .save
            .upgrade()
            .expect("the outgoing context is alive until the switch has saved into it");
        let token = self.token();
        slot.set(token);
        drop(slot);
        self.tokens.insert(sw.from, token);
        self.saves.push((sw.from, token, place));
        assert_eq!(
            sw.load, self.tokens[&sw.to],
            "task {} loads what its last switch saved",
            sw.to
        );
        self.loads.push((sw.to, sw.load));
        self.on = sw.to;
    }

    /// Carries out a step as the glue does.
    fn carry(&mut self, step: Step<Sw>) {
        match step {
            // Go on: with the task the CPU is on, or idling (a tick while idle).
            Step::Stay => match self.running() {
                Some(r) => {
                    assert_eq!(r, self.on, "stay: the CPU's task runs");
                    self.idle = false;
                }
                None => assert!(self.idle, "stay without a running task: only while idle"),
            },
            Step::Idle => {
                assert!(self.running().is_none(), "idle: nothing runs");
                self.idle = true;
            }
            Step::Switch(sw) => {
                self.switch(sw);
                self.idle = false;
                drop(self.s.finish_switch());
            }
        }
        if !self.idle {
            self.resume();
        }
    }

    /// The task that runs again goes on with what it blocked in (a join: finish it).
    fn resume(&mut self) {
        let saved = self.s.running().map(|t| t.ctx.saved.get());
        assert_eq!(
            saved,
            Some(self.tokens[&self.on]),
            "the running task's context holds its last saved value"
        );
        if let Some(target) = self.pending.remove(&self.on) {
            let j = self.s.rejoin(self.now);
            self.joined_or_wait(target, j);
        }
    }

    fn joined_or_wait(&mut self, target: u64, j: Join<Sw>) {
        match j {
            Join::Done(r) => self.joined.push((self.on, target, r)),
            Join::Wait(step) => {
                self.pending.insert(self.on, target);
                self.carry(step);
            }
        }
    }

    fn yield_now(&mut self) {
        let step = self.s.yield_now(self.now);
        self.carry(step);
    }

    fn tick(&mut self) {
        let step = self.s.tick(self.now);
        self.carry(step);
    }

    fn sleep_for(&mut self, d: u64) {
        let deadline = self.now.checked_add(d).unwrap_or(FOREVER);
        let step = self.s.sleep(deadline, self.now);
        self.carry(step);
    }

    fn join(&mut self, h: JoinHandle<Ctx>) {
        let target = h.id();
        let j = self.s.join(h, self.now);
        self.joined_or_wait(target, j);
    }

    fn exit(&mut self, code: i32) {
        let step = self.s.exit(Ok(code), self.now);
        self.carry(step);
    }

    fn kill(&mut self, h: &KillHandle<Ctx>) -> &'static str {
        match self.s.kill(h, self.now) {
            Kill::AlreadyEnded => "already ended",
            Kill::Ended(t) => {
                drop(t);
                "ended"
            }
            Kill::Current(step) => {
                self.carry(step);
                "current"
            }
            Kill::Deferred => "deferred",
        }
    }

    /// Marks task `id` as stopped where it may (not) be ended.
    fn hold(&self, id: u64, held: bool) {
        self.held[&id].set(held);
    }

    fn advance(&mut self, dt: u64) {
        self.now = self.now.saturating_add(dt);
        if self.idle {
            let step = self.s.poll_idle(self.now);
            self.carry(step);
        }
    }

    fn drops(&self) -> Vec<u64> {
        self.drops.borrow().clone()
    }
}

#[test]
fn round_robin_every_task_runs_once_per_round() {
    let mut c = Cpu::new(1);
    let hs: Vec<_> = (0..5).map(|_| c.spawn()).collect();
    let mut order = Vec::new();
    for _ in 0..3 * 6 {
        order.push(c.on);
        c.yield_now();
    }
    let round: Vec<u64> = (0..6).collect();
    assert_eq!(order, round.repeat(3));
    drop(hs);
}

#[test]
fn preemption_comes_after_the_quantum_and_only_if_another_task_waits() {
    let mut c = Cpu::new(3);
    c.tick();
    c.tick();
    c.tick();
    assert_eq!(c.on, 0, "alone: never preempted");
    let _h = c.spawn();
    c.tick();
    assert_eq!(
        c.on, 1,
        "the used-up quantum preempts at once when a task waits"
    );
    c.tick();
    c.tick();
    assert_eq!(c.on, 1, "a fresh quantum");
    c.tick();
    assert_eq!(c.on, 0);
    assert_eq!(c.s.runnable().collect::<Vec<_>>(), vec![1]);
}

#[test]
fn sleepers_wake_by_deadline_then_arrival() {
    let mut c = Cpu::new(1);
    let hs: Vec<_> = (0..5).map(|_| c.spawn()).collect();
    c.yield_now(); // 1 runs
    for d in [30, 10, 30, 20, FOREVER] {
        c.sleep_for(d); // tasks 1..=5 sleep, in turn
    }
    assert_eq!(c.on, 0);
    assert_eq!(
        c.s.sleeping().collect::<Vec<_>>(),
        vec![(10, 2), (20, 4), (30, 1), (30, 3), (FOREVER, 5)]
    );
    c.now = FOREVER - 1;
    c.yield_now(); // wakes every sleeper whose deadline passed, behind main
    assert_eq!(c.on, 2);
    assert_eq!(c.s.runnable().collect::<Vec<_>>(), vec![4, 1, 3, 0]);
    c.now = FOREVER;
    c.yield_now();
    assert_eq!(c.s.sleeping().collect::<Vec<_>>(), vec![(FOREVER, 5)]);
    // The forever sleeper can be killed.
    assert_eq!(c.kill(hs[4].kill_handle()), "ended");
    assert!(c.s.is_finished(hs[4].kill_handle()));
    assert_eq!(c.drops(), vec![5]);
    assert_eq!(c.s.sleeping().count(), 0);
}

#[test]
fn sleeping_with_a_past_deadline_yields() {
    let mut c = Cpu::new(1);
    let _h = c.spawn();
    c.now = 50;
    let step = c.s.sleep(50, 50);
    c.carry(step);
    assert_eq!(c.on, 1);
    assert_eq!(c.s.runnable().collect::<Vec<_>>(), vec![0]);
    assert_eq!(c.s.sleeping().count(), 0);
}

#[test]
fn idle_until_a_sleeper_wakes_then_switch_or_stay() {
    let mut c = Cpu::new(1);
    let h = c.spawn();
    c.yield_now(); // 1 runs
    c.sleep_for(100); // 1 sleeps, main runs
    assert_eq!(c.on, 0);
    c.sleep_for(50); // main sleeps too: nothing runnable
    assert!(c.idle);
    assert_eq!(c.on, 0);
    c.tick(); // a tick while idle does nothing
    assert!(c.idle);
    c.advance(49);
    assert!(c.idle);
    c.advance(1); // main's own deadline: it goes on
    assert!(!c.idle);
    assert_eq!(c.on, 0);
    c.sleep_for(100); // main sleeps until 150, 1 until 100
    c.advance(50);
    assert_eq!(c.on, 1, "switch from the idle task to the woken one");
    c.exit(4);
    assert!(c.idle, "the zombie idles");
    assert_eq!(
        c.drops(),
        Vec::<u64>::new(),
        "not dropped while the CPU is on its stack"
    );
    c.advance(50);
    assert_eq!(c.on, 0);
    assert_eq!(c.drops(), vec![1], "dropped by the next switch");
    c.join(h);
    assert_eq!(c.joined, vec![(0, 1, Ok(4))]);
}

#[test]
fn join_after_exit_is_immediate() {
    let mut c = Cpu::new(1);
    let h = c.spawn();
    c.yield_now();
    c.exit(7);
    assert_eq!(c.on, 0);
    assert!(c.s.is_finished(h.kill_handle()));
    assert_eq!(c.s.join(h, 0), Join::Done(Ok(7)));
    assert_eq!(c.on, 0);
}

#[test]
fn join_a_runnable_task_blocks_until_it_ends() {
    let mut c = Cpu::new(1);
    let h = c.spawn();
    c.join(h);
    assert_eq!(c.on, 1, "the joiner blocked, the task runs");
    assert_eq!(
        c.s.runnable().count(),
        0,
        "the joiner is in the join state, not queued"
    );
    c.yield_now();
    assert_eq!(c.on, 1, "a blocked joiner is not runnable");
    c.exit(3);
    assert_eq!(c.on, 0);
    assert_eq!(c.joined, vec![(0, 1, Ok(3))]);
    assert_eq!(c.drops(), vec![1]);
}

#[test]
fn join_a_sleeping_task_idles_until_it_wakes() {
    let mut c = Cpu::new(1);
    let h = c.spawn();
    c.yield_now();
    c.sleep_for(10);
    c.join(h);
    assert!(c.idle);
    c.advance(10);
    assert_eq!(
        c.on, 1,
        "from the joiner (in the join state) to the woken task"
    );
    c.exit(9);
    assert_eq!(c.joined, vec![(0, 1, Ok(9))]);
}

#[test]
fn join_a_blocked_task_and_a_chain_of_joins() {
    let mut c = Cpu::new(1);
    let h1 = c.spawn();
    let h2 = c.spawn();
    c.yield_now(); // 1 runs
    c.join(h2); // 1 waits for 2; 2 runs
    assert_eq!(c.on, 2);
    c.yield_now(); // main runs
    assert_eq!(c.on, 0);
    c.join(h1); // main waits for 1 (blocked); 2 runs
    assert_eq!(c.on, 2);
    c.exit(2);
    assert_eq!(c.on, 1);
    c.exit(1);
    assert_eq!(c.on, 0);
    assert_eq!(c.joined, vec![(1, 2, Ok(2)), (0, 1, Ok(1))]);
    assert_eq!(c.drops(), vec![2, 1]);
}

#[test]
fn a_self_join_blocks_but_can_be_killed() {
    let mut c = Cpu::new(1);
    let h = c.spawn();
    let h_again = JoinHandle {
        target: h.kill_handle().clone(),
    };
    c.yield_now();
    c.join(h_again); // 1 joins itself
    assert_eq!(c.on, 0);
    assert_eq!(c.kill(h.kill_handle()), "ended");
    assert_eq!(c.drops(), vec![1]);
    assert_eq!(c.s.join(h, 0), Join::Done(Err(TaskError::Killed)));
}

#[test]
fn kill_in_every_state() {
    let mut c = Cpu::new(1);
    let runnable = c.spawn();
    let sleeping = c.spawn();
    let blocked = c.spawn();
    let target = c.spawn();
    let selfish = c.spawn();
    c.yield_now(); // 1
    c.yield_now(); // 2
    c.sleep_for(FOREVER); // 2 sleeps; 3 runs
    assert_eq!(c.on, 3);
    let t = JoinHandle {
        target: target.kill_handle().clone(),
    };
    c.join(t); // 3 blocked in 4's join state; 4 runs
    assert_eq!(c.on, 4);
    c.yield_now(); // 5
    assert_eq!(c.on, 5);
    // Running itself: ends at once, the next task runs, the zombie goes with the switch.
    let sh = selfish.kill_handle().clone();
    assert_eq!(c.kill(&sh), "current");
    assert_eq!(c.on, 0);
    assert_eq!(c.drops(), vec![5]);
    assert_eq!(c.kill(runnable.kill_handle()), "ended");
    assert_eq!(c.kill(sleeping.kill_handle()), "ended");
    assert_eq!(
        c.kill(blocked.kill_handle()),
        "ended",
        "a task blocked in a join ends at once"
    );
    assert_eq!(c.drops(), vec![5, 1, 2, 3]);
    assert_eq!(c.s.runnable().collect::<Vec<_>>(), vec![4]);
    assert_eq!(c.s.sleeping().count(), 0);
    // Killed twice, or after it ended: nothing happens.
    assert_eq!(c.kill(blocked.kill_handle()), "already ended");
    c.yield_now(); // 4 runs and ends; nobody waits for it any more
    c.exit(0);
    assert_eq!(c.kill(target.kill_handle()), "already ended");
    assert_eq!(c.on, 0);
    assert_eq!(c.drops(), vec![5, 1, 2, 3, 4]);
    for (h, want) in [
        (runnable, Err(TaskError::Killed)),
        (sleeping, Err(TaskError::Killed)),
        (blocked, Err(TaskError::Killed)),
        (target, Ok(0)),
        (selfish, Err(TaskError::Killed)),
    ] {
        match c.s.join(h, 0) {
            Join::Done(r) => assert_eq!(r, want),
            Join::Wait(..) => panic!("an ended task's join blocked"),
        }
    }
    // Task 3 died blocked in its join: it never came back to retry it.
    assert_eq!(c.pending.keys().copied().collect::<Vec<_>>(), vec![3]);
}

#[test]
fn a_kill_where_the_task_may_not_end_waits_for_its_next_kill_point() {
    for point in ["yield", "sleep", "join"] {
        let mut c = Cpu::new(1);
        let victim = c.spawn();
        let other = c.spawn();
        c.yield_now(); // the victim runs
        assert_eq!(c.on, 1);
        c.hold(1, true); // preempted inside code whose end would leak
        c.tick(); // task 2 runs
        assert_eq!(c.on, 2);
        assert_eq!(c.kill(victim.kill_handle()), "deferred", "{point}");
        assert!(!c.s.is_finished(victim.kill_handle()), "{point}");
        assert_eq!(c.drops(), Vec::<u64>::new(), "{point}: nothing ended yet");
        c.yield_now(); // main
        c.yield_now(); // the victim again: it goes on where it was
        assert_eq!(c.on, 1, "{point}");
        assert!(c.s.running().is_some_and(|t| t.kill_pending()), "{point}");
        c.hold(1, false);
        match point {
            "yield" => c.yield_now(),
            "sleep" => c.sleep_for(FOREVER),
            _ => c.join(JoinHandle {
                target: other.kill_handle().clone(),
            }),
        }
        assert_eq!(c.drops(), vec![1], "{point}: the kill point ended it");
        assert!(c.s.is_finished(victim.kill_handle()), "{point}");
        assert_eq!(c.kill(victim.kill_handle()), "already ended", "{point}");
        match c.s.join(victim, 0) {
            Join::Done(r) => assert_eq!(r, Err(TaskError::Killed), "{point}"),
            Join::Wait(..) => panic!("{point}: an ended task's join blocked"),
        }
        // The task it would have joined goes on.
        assert!(!c.s.is_finished(other.kill_handle()), "{point}");
    }
}

#[test]
fn a_task_that_may_end_where_it_stopped_is_killed_at_once() {
    let mut c = Cpu::new(1);
    let victim = c.spawn();
    c.yield_now();
    c.tick(); // preempted where it may end (held is false): back to main
    assert_eq!(c.on, 0);
    assert_eq!(c.kill(victim.kill_handle()), "ended");
    assert_eq!(c.drops(), vec![1]);
}

#[test]
fn a_joiner_is_woken_by_the_kill_of_the_task_it_waits_for() {
    let mut c = Cpu::new(1);
    let spinner = c.spawn();
    let killer_h = c.spawn();
    let killer = spinner.kill_handle().clone();
    c.join(spinner); // main waits for 1; 1 runs
    assert_eq!(c.on, 1);
    c.yield_now(); // 2 runs
    assert_eq!(c.on, 2);
    assert_eq!(c.kill(&killer), "ended");
    assert_eq!(c.s.runnable().collect::<Vec<_>>(), vec![0]);
    c.exit(0);
    assert_eq!(c.on, 0);
    assert_eq!(c.joined, vec![(0, 1, Err(TaskError::Killed))]);
    drop(killer_h);
}

#[test]
fn a_killed_joiner_leaves_the_join_state_and_the_target_goes_on() {
    let mut c = Cpu::new(1);
    let joiner = c.spawn();
    let target = c.spawn();
    let t = JoinHandle {
        target: target.kill_handle().clone(),
    };
    c.yield_now(); // 1
    c.join(t); // 1 waits for 2; 2 runs
    c.yield_now(); // main
    assert_eq!(c.kill(joiner.kill_handle()), "ended");
    assert_eq!(c.drops(), vec![1]);
    assert!(target.target.state.lock().waiter.is_none());
    c.yield_now(); // 2
    c.exit(5); // nobody to wake
    assert_eq!(c.on, 0);
    assert_eq!(c.s.join(target, 0), Join::Done(Ok(5)));
}

#[test]
fn reaping_drops_each_dead_context_once_and_frees_every_frame() {
    let mem = SimMem::new(10_000);
    let mut c = Cpu::new(1);
    c.space_mem = Some(mem.clone());
    let base = mem.frames_in_use();
    let hs: Vec<_> = (0..8).map(|_| c.spawn()).collect();
    assert!(
        mem.frames_in_use() > base + 8 * 4,
        "each space holds its frames"
    );
    // Half are killed while queued, half exit (zombies reaped by the next switch).
    for h in &hs[4..] {
        assert_eq!(c.kill(h.kill_handle()), "ended");
    }
    c.yield_now();
    for _ in 0..4 {
        c.exit(0);
    }
    assert_eq!(c.on, 0);
    let mut d = c.drops();
    d.sort_unstable();
    assert_eq!(
        d,
        (1..=8).collect::<Vec<_>>(),
        "every context dropped exactly once"
    );
    assert_eq!(mem.frames_in_use(), base, "every frame is back");
}

/// The token task `id` saved when the scheduler kept it at `place` (its last such save).
fn saved_at(c: &Cpu, id: u64, place: Place) -> u64 {
    let s = c.saves.iter().rev().find(|s| s.0 == id && s.2 == place);
    match s {
        Some(&(_, token, _)) => token,
        None => panic!("task {id} was never saved at {place:?}: {:?}", c.saves),
    }
}

#[test]
fn each_switch_saves_into_the_parked_box_and_the_task_loads_exactly_that() {
    let mut c = Cpu::new(1);
    let h1 = c.spawn();
    let h2 = c.spawn();
    let h3 = c.spawn();
    let h4 = c.spawn();
    let initial = |c: &Cpu, id: u64| c.loads.iter().any(|&(t, v)| t == id && v == TOKEN0 + id);
    // yield: main is saved at the back of the run queue [2, 3, 4, 0]; 1 loads its first value.
    c.yield_now();
    let t_yield = saved_at(&c, 0, Place::Runnable(3));
    assert!(initial(&c, 1), "a new task loads its initial value");
    // tick: 1 is preempted, saved at the back [3, 4, 0, 1]; 2 runs.
    c.tick();
    let t_tick = saved_at(&c, 1, Place::Runnable(3));
    // sleep: 2 is saved among the sleepers; 3 runs.
    c.sleep_for(10);
    let t_sleep = saved_at(&c, 2, Place::Sleeping(10));
    // join: 3 blocks in 1's join state, saved there; 4 runs.
    c.join(h1);
    let t_join = saved_at(&c, 3, Place::Joining(1));
    // 4 blocks in 2's join state; main runs and loads what the yield saved.
    let k4 = h4.kill_handle().clone();
    c.join(h2);
    let t_killed = saved_at(&c, 4, Place::Joining(2));
    assert_eq!(c.on, 0);
    assert_eq!(c.loads.last(), Some(&(0, t_yield)), "yield -> load");
    // Kill of a blocked joiner: its box (and slot) goes, it is never loaded again.
    assert_eq!(c.kill(&k4), "ended");
    assert!(
        c.slots[&4].upgrade().is_none(),
        "the killed joiner's context is gone"
    );
    // 1 runs again and loads what the tick saved; it exits: saved in the zombie slot, then
    // dropped by the next switch; its joiner 3 loads what its join saved.
    c.yield_now();
    assert_eq!(c.on, 1);
    assert_eq!(c.loads.last(), Some(&(1, t_tick)), "tick -> load");
    c.exit(6);
    let _ = saved_at(&c, 1, Place::Zombie);
    assert!(
        c.slots[&1].upgrade().is_none(),
        "the zombie went with the switch"
    );
    assert_eq!(c.on, 0);
    c.yield_now();
    assert_eq!(c.on, 3);
    assert_eq!(c.loads.last(), Some(&(3, t_join)), "join -> load");
    assert_eq!(c.joined, vec![(3, 1, Ok(6))]);
    // The sleeper wakes and loads what its sleep saved.
    c.now = 10;
    c.yield_now(); // 2 wakes behind main, 3 goes behind it: [2, 3]; main runs
    c.yield_now(); // 2 runs
    assert_eq!(c.on, 2);
    assert_eq!(c.loads.last(), Some(&(2, t_sleep)), "sleep -> load");
    assert!(
        !c.loads.iter().any(|&(t, v)| t == 4 && v == t_killed),
        "a killed joiner is never loaded"
    );
    drop(h3);
}

#[test]
fn an_idle_zombie_and_an_idle_joiner_are_saved_where_they_rest() {
    let mut c = Cpu::new(1);
    let h = c.spawn();
    c.yield_now(); // 1
    c.sleep_for(5); // main runs
    c.join(h); // main blocks in 1's join state: nothing runnable, idle on main
    assert!(c.idle);
    c.advance(5); // 1 wakes: the switch saves main in 1's join state
    let t = saved_at(&c, 0, Place::Joining(1));
    assert_eq!(c.on, 1);
    c.exit(2); // main is woken: 1 is saved in the zombie slot
    let _ = saved_at(&c, 1, Place::Zombie);
    assert_eq!(c.on, 0);
    assert_eq!(c.loads.last(), Some(&(0, t)));
    assert_eq!(c.joined, vec![(0, 1, Ok(2))]);
    // Exit while nothing is runnable: the CPU idles on the zombie, saved there when a sleeper
    // wakes.
    let h2 = c.spawn();
    c.yield_now(); // 2
    c.sleep_for(1); // 2 sleeps until 6; main runs
    c.sleep_for(10); // main sleeps until 15: idle on main
    c.advance(1); // 2 wakes: switch from main (a sleeper) to 2
    assert_eq!(c.on, 2);
    c.exit(0);
    assert!(c.idle, "the zombie idles");
    c.advance(20);
    let _ = saved_at(&c, 2, Place::Zombie);
    assert_eq!(c.on, 0);
    assert_eq!(c.s.join(h2, c.now), Join::Done(Ok(0)));
}

#[test]
fn unspawn_takes_back_a_task_that_never_ran_and_leaves_no_trace() {
    let mut c = Cpu::new(1);
    let a = c.spawn();
    let b = c.spawn();
    let before = c.s.owned_tasks(&[]);
    let h = c.spawn();
    let k = h.kill_handle().clone();
    let ctx = c.s.unspawn(h).expect("a task that never ran is taken back");
    assert_eq!(ctx.id, 3);
    assert!(c.drops().is_empty(), "the caller releases the context");
    drop(ctx);
    assert_eq!(c.drops(), vec![3]);
    assert_eq!(c.s.owned_tasks(&[&k]), before, "queue and places as before");
    assert_eq!(c.s.runnable().collect::<Vec<_>>(), vec![1, 2]);
    assert!(
        c.s.is_finished(&k),
        "the unspawned task's handle says it has ended"
    );
    assert_eq!(c.kill(&k), "already ended");
    let j = JoinHandle { target: k.clone() };
    assert_eq!(c.s.join(j, 0), Join::Done(Err(TaskError::Killed)));
    assert_eq!(c.spawn().id(), 4, "its id is not reused");
    // The others go on as if it had never been spawned.
    c.yield_now();
    c.exit(1);
    c.exit(2);
    assert_eq!(c.on, 4);
    assert_eq!(c.s.join(a, 0), Join::Done(Ok(1)));
    assert_eq!(c.s.join(b, 0), Join::Done(Ok(2)));
}

#[test]
fn unspawn_is_refused_for_a_task_that_ran_and_gives_the_handle_back() {
    let mut c = Cpu::new(1);
    let h = c.spawn();
    c.yield_now(); // 1 runs
    // Running: refused.
    let h = match c.s.unspawn(h) {
        Err(h) => h,
        Ok(_) => panic!("the running task was unspawned"),
    };
    c.yield_now(); // back in the run queue, but it ran
    assert_eq!(c.s.runnable().collect::<Vec<_>>(), vec![1]);
    let before = c.s.owned_tasks(&[]);
    let h = match c.s.unspawn(h) {
        Err(h) => h,
        Ok(_) => panic!("a task that ran was unspawned"),
    };
    assert_eq!(c.s.owned_tasks(&[]), before, "nothing changed");
    assert!(c.drops().is_empty());
    assert!(!c.s.is_finished(h.kill_handle()));
    c.yield_now();
    c.exit(8);
    // Ended: refused too; the handle still joins.
    let h = match c.s.unspawn(h) {
        Err(h) => h,
        Ok(_) => panic!("an ended task was unspawned"),
    };
    assert_eq!(c.s.join(h, 0), Join::Done(Ok(8)));
}

#[test]
#[should_panic(expected = "a join state's lock is already held")]
fn a_join_state_locked_twice_panics_instead_of_spinning() {
    let mut c = Cpu::new(1);
    let h = c.spawn();
    let st = h.kill_handle().state.lock();
    // Taking it again under the same borrow (a bug in sched) would spin forever.
    let _ = c.s.is_finished(h.kill_handle());
    drop(st);
}

// ---- A proptest of random task programs against a simple model ----

#[derive(Debug, Clone)]
enum Op {
    Spawn,
    Yield,
    Tick,
    Sleep(u64),
    SleepForever,
    Join(usize),
    Exit(i32),
    Kill(usize),
    Unspawn(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Spawn),
        3 => Just(Op::Yield),
        2 => Just(Op::Tick),
        2 => (0u64..40).prop_map(Op::Sleep),
        1 => Just(Op::SleepForever),
        3 => (0usize..8).prop_map(Op::Join),
        2 => (0i32..100).prop_map(Op::Exit),
        2 => (0usize..8).prop_map(Op::Kill),
        1 => (0usize..8).prop_map(Op::Unspawn),
        3 => (0u64..30).prop_map(Op::Advance),
    ]
}

/// The model: plain lists, written from the rules rather than from the code.
#[derive(Default)]
struct Model {
    running: Option<u64>,
    on: u64,
    queue: VecDeque<u64>,
    /// (deadline, id), in the order they went to sleep.
    sleepers: Vec<(u64, u64)>,
    /// Tasks that have been switched to (or started running) at least once.
    ran: BTreeSet<u64>,
    /// joiner -> joined task
    blocked: BTreeMap<u64, u64>,
    /// Joiners woken by the end of the task they joined, which take its result when they run.
    woken: BTreeMap<u64, u64>,
    /// Results not yet taken by a join.
    results: BTreeMap<u64, TaskResult>,
    ended: BTreeSet<u64>,
    joined: Vec<(u64, u64, TaskResult)>,
    next: u64,
    quantum: u32,
    left: u32,
}

impl Model {
    /// The sleepers in wake order: by deadline, then in the order they went to sleep.
    fn wake_order(&self) -> Vec<(u64, u64)> {
        let mut v = self.sleepers.clone();
        v.sort_by_key(|&(d, _)| d); // stable: arrival order among equal deadlines
        v
    }

    /// Sleepers whose deadline passed (`FOREVER` never does) go to the back of the run queue,
    /// in wake order.
    fn wake(&mut self, now: u64) {
        let due = |d: u64| d <= now && d != FOREVER;
        for (d, id) in self.wake_order() {
            if due(d) {
                self.queue.push_back(id);
            }
        }
        self.sleepers.retain(|&(d, _)| !due(d));
    }

    /// Every live task's place, as the scheduler's [`Sched::owned_tasks`] names it.
    fn places(&self) -> Vec<(u64, Place)> {
        let mut v = Vec::new();
        v.extend(self.running.map(|r| (r, Place::Running)));
        v.extend(
            self.queue
                .iter()
                .enumerate()
                .map(|(i, &t)| (t, Place::Runnable(i))),
        );
        v.extend(self.sleepers.iter().map(|&(d, t)| (t, Place::Sleeping(d))));
        v.extend(self.blocked.iter().map(|(&j, &t)| (j, Place::Joining(t))));
        if self.running.is_none() && self.ended.contains(&self.on) {
            v.push((self.on, Place::Zombie));
        }
        v.sort_unstable();
        v
    }

    /// The CPU leaves the task it runs: the next runnable one runs, or it idles.
    fn pick(&mut self) {
        self.running = self.queue.pop_front();
        if let Some(n) = self.running {
            self.switch_in(n);
        }
    }

    fn switch_in(&mut self, n: u64) {
        self.ran.insert(n);
        self.on = n;
        self.left = self.quantum;
        self.running = Some(n);
        // A woken joiner's join returns the result now.
        if let Some(t) = self.woken.remove(&n) {
            let r = self.results.remove(&t).expect("the joined task's result");
            self.joined.push((n, t, r));
        }
    }

    fn rotate(&mut self) {
        if let (Some(r), Some(n)) = (self.running, self.queue.pop_front()) {
            self.queue.push_back(r);
            self.switch_in(n);
        }
    }

    fn end(&mut self, id: u64, r: TaskResult) {
        self.ended.insert(id);
        self.results.insert(id, r);
        self.sleepers.retain(|&(_, t)| t != id);
        self.queue.retain(|&t| t != id);
        self.blocked.remove(&id);
        self.woken.remove(&id);
        let waiters: Vec<u64> = self
            .blocked
            .iter()
            .filter(|&(_, &t)| t == id)
            .map(|(&j, _)| j)
            .collect();
        for w in waiters {
            self.blocked.remove(&w);
            self.woken.insert(w, id);
            self.queue.push_back(w);
        }
    }

    fn dropped(&self) -> BTreeSet<u64> {
        let mut d = self.ended.clone();
        if self.running.is_none() {
            d.remove(&self.on); // a zombie the CPU idles on
        }
        d
    }
}

fn run_program(ops: &[Op], quantum: u32) -> Result<(), TestCaseError> {
    let mut c = Cpu::new(quantum);
    let mut m = Model {
        running: Some(0),
        ran: BTreeSet::from([0]),
        next: 1,
        quantum: c.s.quantum,
        left: c.s.quantum,
        ..Model::default()
    };
    let mut handles: BTreeMap<u64, JoinHandle<Ctx>> = BTreeMap::new();
    // Kill handles of the tasks given to a join, so that they can still be killed.
    let mut joined_handles: BTreeMap<u64, KillHandle<Ctx>> = BTreeMap::new();
    for op in ops {
        let now = c.now;
        let r = m.running;
        match (op, r) {
            (Op::Advance(dt), _) => {
                c.advance(*dt);
                let now = c.now;
                if m.running.is_none() {
                    m.wake(now);
                    if let Some(n) = m.queue.pop_front() {
                        m.switch_in(n);
                    }
                }
            }
            (_, None) => continue, // idle: only time passes
            (Op::Spawn, Some(_)) => {
                let h = c.spawn();
                prop_assert_eq!(h.id(), m.next);
                m.queue.push_back(m.next);
                handles.insert(m.next, h);
                m.next += 1;
            }
            (Op::Yield, Some(_)) => {
                c.yield_now();
                m.wake(now);
                m.rotate();
            }
            (Op::Tick, Some(_)) => {
                c.tick();
                m.wake(now);
                m.left = m.left.saturating_sub(1);
                if m.left == 0 {
                    m.rotate();
                }
            }
            (Op::Sleep(d), Some(me)) => {
                c.sleep_for(*d);
                let deadline = now + d;
                if *d == 0 {
                    m.wake(now);
                    m.rotate();
                } else {
                    m.wake(now);
                    m.sleepers.push((deadline, me));
                    m.pick();
                }
            }
            (Op::SleepForever, Some(me)) => {
                let step = c.s.sleep(FOREVER, now);
                c.carry(step);
                m.wake(now);
                m.sleepers.push((FOREVER, me));
                m.pick();
            }
            (Op::Join(k), Some(me)) => {
                let Some(h) = handles.remove(&(*k as u64)) else {
                    continue; // no such handle (never spawned, or joined already)
                };
                let t = h.id();
                joined_handles.insert(t, h.kill_handle().clone());
                c.join(h);
                if let Some(res) = m.results.remove(&t) {
                    m.joined.push((me, t, res));
                } else {
                    m.blocked.insert(me, t);
                    m.wake(now);
                    m.pick();
                }
            }
            (Op::Exit(code), Some(me)) => {
                if me == 0 {
                    continue; // `main` exiting ends the app
                }
                c.exit(*code);
                m.end(me, Ok(*code));
                m.wake(now);
                m.pick();
            }
            (Op::Unspawn(k), Some(_)) => {
                let id = *k as u64;
                let Some(h) = handles.remove(&id) else {
                    continue;
                };
                let kh = h.kill_handle().clone();
                match c.s.unspawn(h) {
                    Ok(ctx) => {
                        prop_assert!(
                            !m.ran.contains(&id) && m.queue.contains(&id),
                            "task {} unspawned after it ran or outside the run queue",
                            id
                        );
                        prop_assert_eq!(ctx.id, id);
                        drop(ctx);
                        m.queue.retain(|&t| t != id);
                        m.ended.insert(id);
                        joined_handles.insert(id, kh);
                    }
                    Err(h) => {
                        prop_assert!(
                            m.ran.contains(&id) || !m.queue.contains(&id),
                            "unspawn of task {} that never ran was refused",
                            id
                        );
                        handles.insert(id, h);
                    }
                }
            }
            (Op::Kill(k), Some(me)) => {
                let id = *k as u64;
                let Some(h) = handles
                    .get(&id)
                    .map(|h| h.kill_handle())
                    .or_else(|| joined_handles.get(&id))
                else {
                    continue;
                };
                let h = h.clone();
                let what = c.kill(&h);
                if m.ended.contains(&id) {
                    prop_assert_eq!(what, "already ended");
                } else if id == me {
                    prop_assert_eq!(what, "current");
                    m.end(me, Err(TaskError::Killed));
                    m.wake(now);
                    m.pick();
                } else {
                    prop_assert_eq!(what, "ended");
                    m.end(id, Err(TaskError::Killed));
                }
            }
        }
        // The state machine agrees with the model.
        prop_assert_eq!(c.running(), m.running, "running after {:?}", op);
        prop_assert_eq!(c.on, m.on, "CPU's task after {:?}", op);
        prop_assert_eq!(c.idle, m.running.is_none());
        prop_assert_eq!(
            c.s.runnable().collect::<Vec<_>>(),
            Vec::from(m.queue.clone())
        );
        prop_assert_eq!(c.s.sleeping().collect::<Vec<_>>(), m.wake_order());
        prop_assert_eq!(&c.joined, &m.joined);
        let drops = c.drops();
        let dropped: BTreeSet<u64> = drops.iter().copied().collect();
        prop_assert_eq!(
            drops.len(),
            dropped.len(),
            "a context dropped twice: {:?}",
            drops
        );
        prop_assert_eq!(&dropped, &m.dropped(), "dropped after {:?}", op);
        for (id, h) in &handles {
            prop_assert_eq!(c.s.is_finished(h.kill_handle()), m.ended.contains(id));
        }
        for (id, h) in &joined_handles {
            prop_assert_eq!(c.s.is_finished(h), m.ended.contains(id));
        }
        // Nothing lost or duplicated: every task the scheduler owns (read from the scheduler)
        // is in exactly the place the model says, and these are the live tasks (and a zombie
        // the CPU idles on).
        let also: Vec<&KillHandle<Ctx>> = c.all.iter().collect();
        let mut places = c.s.owned_tasks(&also);
        places.sort_unstable();
        prop_assert_eq!(&places, &m.places(), "places after {:?}", op);
        let mut ids: Vec<u64> = places.iter().map(|&(id, _)| id).collect();
        ids.dedup();
        prop_assert_eq!(
            ids.len(),
            places.len(),
            "a task in two places: {:?}",
            places
        );
        let live = (0..m.next).filter(|id| !m.ended.contains(id));
        let mut want: Vec<u64> = live
            .chain(
                m.places()
                    .iter()
                    .filter(|p| p.1 == Place::Zombie)
                    .map(|p| p.0),
            )
            .collect();
        want.sort_unstable();
        prop_assert_eq!(ids, want);
    }
    // The end: kill every task left, drop the scheduler: every context dropped exactly once.
    let left: Vec<KillHandle<Ctx>> = handles
        .values()
        .map(|h| h.kill_handle().clone())
        .chain(joined_handles.into_values())
        .collect();
    for h in &left {
        if c.s.running().is_some_and(|t| t.id() == h.id()) {
            let _ = c.s.kill(h, c.now);
            drop(c.s.finish_switch());
        } else if let Kill::Ended(t) = c.s.kill(h, c.now) {
            drop(t);
        }
    }
    let n = m.next;
    drop(left);
    drop(handles);
    let drops = c.drops.clone();
    drop(c);
    let mut d = drops.borrow().clone();
    d.sort_unstable();
    prop_assert_eq!(d, (0..n).collect::<Vec<_>>());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn random_task_programs_match_the_model(
        ops in proptest::collection::vec(op(), 1..80),
        quantum in 1u32..4,
    ) {
        run_program(&ops, quantum)?;
    }
}
