//! `requests N`: a fork server's life, N requests long, with nothing left behind.
//!
//! A zygote warms a `HashMap<String, String>` of [`ENTRIES`] entries and a `Vec<String>`, and
//! builds a read-only template that every request task attaches. It then serves N requests, one
//! at a time, each in a task spawned from it. A request task:
//!
//! - allocates in its own heap: a `Vec<u8>` of [`BIG`] bytes (the heap grows by several pages),
//!   `String`s, a `Box`, a `Vec<String>`;
//! - uses the warm state in place (lookups, an update, an insert: its own copy-on-write copy) and
//!   writes statics (a counter, a `Mutex<Vec<String>>`, which it may die holding);
//! - holds libos objects: the two channel ends the zygote gave it (its reply sender and a command
//!   receiver), a channel of its own, a [`Template`] it built, a [`SharedHeap`] (every fourth
//!   request), and the [`JoinHandle`] of a grandchild it spawned (given the channel's receiver
//!   and a sender of the zygote's "done" channel, attached to its parent's template);
//! - replies (a checksum of its lookups), then ends as [`Way`] says: 90% return (half of them
//!   forgetting every object they hold), and 10%, evenly spread, panic, fault (a write to the
//!   read-only template, or a read near address 0) or are killed by the zygote (blocked in a
//!   `recv`, blocked in a sleep, blocked joining its grandchild, runnable in a yield loop, or
//!   preempted while spinning).
//!
//! The zygote checks every reply, every task's end (exit code, panic message, fault address and
//! cause), that the request task's channel ends are released (its command receiver is gone, its
//! reply sender too) and that its grandchild saw its parent's channel close, read its parent's
//! template and ended. A warm-up round of every way comes first (caches, registry and
//! scheduler structures settle); after all N: free frames (with what the kernel heap keeps),
//! kernel-heap bytes and allocations, registry objects, and the zygote's own heap are back at
//! the baseline, and the zygote's state and statics are unchanged.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{State, key, value, warm_sized};
use libos::channel::{self, Receiver, Sender};
use libos::handle;
use libos::println;
use libos::process::Zygote;
use libos::shared::SharedHeap;
use libos::space::{Kind, Template, TemplateBuilder};
use libos::sync::Mutex;
use libos::task::{self, JoinHandle, TaskError};

/// Entries of the warm map.
const ENTRIES: u32 = 4_000;
/// Items of the warm list.
const ITEMS: u32 = 500;
/// Bytes of a request's large allocation (the task's heap grows by at least this much).
const BIG: usize = 48 << 10;
/// Where the zygote's read-only template lives, and its size.
const RO_VA: u64 = 0x1_0000_0000;
const RO_PAGES: u64 = 4;
/// Where a request task's own template lives (one page).
const OWN_VA: u64 = 0x1_4000_0000;
/// Where a request task's shared heap lives (not attached: only held).
const HEAP_VA: u64 = 0x2_0000_0000;
/// The address the null-read fault reads (in the unmapped first page).
const NULL_ADDR: usize = 0x18;
/// Progress is printed every this many requests.
const PROGRESS: u32 = 10_000;

/// Bumped by every request task in its own copy; the zygote's stays 0.
static SEEN: AtomicU64 = AtomicU64::new(0);
/// Pushed to by every request task in its own copy (some die holding its lock); the zygote's
/// holds what it put there.
static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// How a request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Returns its checksum, dropping what it holds.
    Return,
    /// Returns its checksum, `forget`ting every object and heap value it holds.
    ReturnForgetting,
    /// Panics while holding its static's lock.
    Panic,
    /// Writes to the zygote's read-only template.
    FaultReadOnly,
    /// Reads near address 0.
    FaultNull,
    /// Killed while blocked in a `recv` on the zygote's command channel.
    KillInRecv,
    /// Killed while blocked in a sleep (forever).
    KillInSleep,
    /// Killed while runnable (a yield loop).
    KillRunnable,
    /// Killed while preempted in a loop that never yields.
    KillSpinning,
    /// Killed while blocked joining its grandchild (which waits for its parent's channel).
    KillInJoin,
}

const WAYS: [Way; 10] = [
    Way::Return,
    Way::ReturnForgetting,
    Way::Panic,
    Way::FaultReadOnly,
    Way::FaultNull,
    Way::KillInRecv,
    Way::KillInSleep,
    Way::KillRunnable,
    Way::KillSpinning,
    Way::KillInJoin,
];

/// Request `n`'s way: one in ten ends badly (`n % 10 == 7`), and of those, in turn, one panics,
/// one faults, one is killed (the fault and kill kinds rotate).
fn way(n: u32) -> Way {
    if n % 10 != 7 {
        return if n.is_multiple_of(2) {
            Way::Return
        } else {
            Way::ReturnForgetting
        };
    }
    let k = n / 10;
    match k % 3 {
        0 => Way::Panic,
        1 => [Way::FaultReadOnly, Way::FaultNull][(k / 3 % 2) as usize],
        _ => [
            Way::KillInRecv,
            Way::KillInSleep,
            Way::KillRunnable,
            Way::KillSpinning,
            Way::KillInJoin,
        ][(k / 3 % 5) as usize],
    }
}

/// One request's ways repeat with this period (every way at least once).
const PERIOD: u32 = 10 * 3 * 10;

fn warm() -> State {
    warm_sized(ENTRIES, ITEMS)
}

/// The zygote's state as `warm` made it, and its statics as it left them.
fn unchanged(state: &State) -> bool {
    state.map.len() == ENTRIES as usize
        && (0..ENTRIES).all(|i| state.map.get(&key(i)) == Some(&value(i)))
        && state.list.len() == ITEMS as usize
        && state
            .list
            .iter()
            .enumerate()
            .all(|(i, s)| *s == format!("item {i}"))
        && SEEN.load(Ordering::Relaxed) == 0
        && LOG
            .try_lock()
            .is_some_and(|log| log.len() == 1 && log[0] == "zygote")
}

/// The lookups request `n` makes.
fn lookups(n: u32) -> impl Iterator<Item = u32> {
    (0..8u32).map(move |j| (n.wrapping_mul(7) + j * 499) % ENTRIES)
}

/// Request `n`'s checksum, as the zygote computes it from its own copy.
fn expected(state: &State, n: u32) -> u64 {
    lookups(n).fold(u64::from(n), |sum, i| {
        sum.wrapping_mul(31)
            .wrapping_add(state.map.get(&key(i)).map_or(0, |v| v.len() as u64))
    })
}

/// The byte at `off` of the zygote's read-only template.
fn ro_byte(off: u64) -> u8 {
    (off >> 12) as u8 ^ 0x5a
}

/// The byte a request task fills its own template with.
fn own_byte(n: u32) -> u8 {
    (n % 251) as u8
}

/// A request's reply: request number, checksum (or an error code), its task id, its way.
type Reply = [u64; 4];

/// Error codes a request task replies with instead of a checksum.
const BAD_LOOKUP: u64 = u64::MAX;
const BAD_COPY: u64 = u64::MAX - 1;
const BAD_STATIC: u64 = u64::MAX - 2;
const BAD_OBJECT: u64 = u64::MAX - 3;

/// The grandchild: waits for its parent's channel to close (it never sends), reads its parent's
/// template, reports to the zygote (request number, the byte it read, 1 if it saw the close, its
/// task id) and ends.
fn grandchild(n: u32, rx: Receiver<u8>, done: Sender<u64>) -> i32 {
    let closed = rx.recv().is_none();
    let mut b = [0u8; 1];
    let byte = match task::read(OWN_VA + 100, &mut b) {
        Ok(()) => u64::from(b[0]),
        Err(_) => 0xffff,
    };
    let _ = done.send(u64::from(n));
    let _ = done.send(byte);
    let _ = done.send(u64::from(closed));
    let _ = done.send(task::current());
    0
}

/// What request `n` does in its task, given its reply sender and command receiver.
fn request(
    state: &mut State,
    n: u32,
    reply: Sender<Reply>,
    cmd: Receiver<u8>,
    done: Sender<u64>,
) -> i32 {
    let how = way(n);
    let id = task::current();
    let answer = |v: u64| {
        let _ = reply.send([u64::from(n), v, id, how as u64]);
    };
    // Heap objects of its own: a large buffer (the heap grows by pages), strings, a box.
    let mut big = vec![0u8; BIG];
    for (i, b) in big.iter_mut().enumerate().step_by(4096) {
        *b = (i >> 12) as u8 ^ n as u8;
    }
    let words: Vec<String> = (0..16).map(|i| format!("request {n} word {i}")).collect();
    let boxed = Box::new([u64::from(n); 32]);
    // The warm state, in place.
    let mut sum = u64::from(n);
    for i in lookups(n) {
        match state.map.get(&key(i)) {
            Some(v) if *v == value(i) => sum = sum.wrapping_mul(31).wrapping_add(v.len() as u64),
            _ => {
                answer(BAD_LOOKUP);
                return 1;
            }
        }
    }
    let mine = n % ENTRIES;
    if let Some(v) = state.map.get_mut(&key(mine)) {
        v.push_str("-mine");
    }
    state.map.insert(format!("new-{n}"), words[0].clone());
    state.list[(n % ITEMS) as usize].push('!');
    if state.map.len() != ENTRIES as usize + 1
        || state.map.get(&key(mine)) != Some(&format!("{}-mine", value(mine)))
    {
        answer(BAD_COPY);
        return 1;
    }
    // Statics: the zygote's values as of the fork, then this task's own.
    if SEEN.fetch_add(u64::from(n) + 1, Ordering::Relaxed) != 0 {
        answer(BAD_STATIC);
        return 1;
    }
    let mut log = LOG.lock();
    if log.len() != 1 {
        answer(BAD_STATIC);
        return 1;
    }
    log.push(words[1].clone());
    // libos objects of its own: a channel, a template, a shared heap, a grandchild.
    let (g_tx, g_rx) = channel::bounded::<u8>(1);
    let Ok(own) = TemplateBuilder::new()
        .region("request", OWN_VA, 4096, Kind::ReadOnly, |_, p| {
            p.fill(own_byte(n))
        })
        .and_then(|b| b.seal())
    else {
        answer(BAD_OBJECT);
        return 1;
    };
    let heap = if n.is_multiple_of(4) {
        match SharedHeap::new("request-heap", HEAP_VA, 64 << 10) {
            Ok(h) => Some(h),
            Err(_) => {
                answer(BAD_OBJECT);
                return 1;
            }
        }
    } else {
        None
    };
    let Ok(gh) = task::spawn_with(&[&own], (g_rx, done), move |(rx, done)| {
        grandchild(n, rx, done)
    }) else {
        answer(BAD_OBJECT);
        return 1;
    };
    if handle::owned_by(id) < 5 {
        answer(BAD_OBJECT);
        return 1;
    }
    answer(sum);
    let live = (&big, &words, &boxed);
    match how {
        Way::Return => {
            drop(log);
            drop((g_tx, own, heap));
            i32::from(gh.join() != Ok(0))
        }
        Way::ReturnForgetting => {
            core::mem::forget((log, g_tx, own, heap, gh, reply, cmd));
            core::mem::forget((big, words, boxed));
            0
        }
        Way::Panic => panic!(
            "request {n}: planned panic holding {} bytes, {} words and the log's lock",
            live.0.len(),
            live.1.len()
        ),
        Way::FaultReadOnly => {
            let at = RO_VA + u64::from(n) % RO_PAGES * 4096 + 8;
            // SAFETY: none needed for memory safety here: this is the fault under test (a write
            // to a read-only template page); the task ends on it, nothing reads the write.
            unsafe { core::ptr::write_volatile(at as *mut u8, 1) };
            2
        }
        Way::FaultNull => {
            let at = core::hint::black_box(NULL_ADDR) as *const u64;
            // SAFETY: none needed: this is the fault under test (a read in the unmapped first
            // page); the task ends on it.
            let v = unsafe { core::ptr::read_volatile(at) };
            i32::from(v == 0) + 3
        }
        Way::KillInRecv => i32::from(cmd.recv().is_some()) + 4,
        Way::KillInSleep => {
            task::sleep(core::time::Duration::MAX);
            5
        }
        Way::KillRunnable => loop {
            task::yield_now();
            core::hint::black_box(live);
        },
        Way::KillSpinning => {
            let mut x = 0u64;
            loop {
                x = core::hint::black_box(x.wrapping_add(live.0.len() as u64));
            }
        }
        // The grandchild waits for `g_tx` to close, which only this task's end does.
        Way::KillInJoin => i32::from(gh.join().is_ok()) + 6 + i32::from(g_tx.send(0).is_ok()),
    }
}

/// Counts of how the requests ended.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    returned: u32,
    panicked: u32,
    faulted_read_only: u32,
    faulted_null: u32,
    killed_in_recv: u32,
    killed_in_sleep: u32,
    killed_runnable: u32,
    killed_spinning: u32,
    killed_in_join: u32,
}

impl Counts {
    fn add(&mut self, w: Way) {
        match w {
            Way::Return | Way::ReturnForgetting => self.returned += 1,
            Way::Panic => self.panicked += 1,
            Way::FaultReadOnly => self.faulted_read_only += 1,
            Way::FaultNull => self.faulted_null += 1,
            Way::KillInRecv => self.killed_in_recv += 1,
            Way::KillInSleep => self.killed_in_sleep += 1,
            Way::KillRunnable => self.killed_runnable += 1,
            Way::KillSpinning => self.killed_spinning += 1,
            Way::KillInJoin => self.killed_in_join += 1,
        }
    }

    fn killed(&self) -> u32 {
        self.killed_in_recv
            + self.killed_in_sleep
            + self.killed_runnable
            + self.killed_spinning
            + self.killed_in_join
    }
}

impl core::fmt::Display for Counts {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} returned, {} panicked, {} faulted ({} read-only write, {} null read), {} killed \
             ({} in recv, {} in sleep, {} runnable, {} spinning, {} in join)",
            self.returned,
            self.panicked,
            self.faulted_read_only + self.faulted_null,
            self.faulted_read_only,
            self.faulted_null,
            self.killed(),
            self.killed_in_recv,
            self.killed_in_sleep,
            self.killed_runnable,
            self.killed_spinning,
            self.killed_in_join
        )
    }
}

/// Serves request `n` in a task spawned from the zygote and checks everything about its end.
fn serve(zygote: &mut Zygote<State>, ro: &Template, n: u32) -> Result<Way, String> {
    let how = way(n);
    let (reply_tx, reply_rx) = channel::bounded::<Reply>(1);
    let (cmd_tx, cmd_rx) = channel::bounded::<u8>(1);
    let (done_tx, done_rx) = channel::bounded::<u64>(4);
    let h: JoinHandle = zygote
        .spawn_with(
            &[ro],
            (reply_tx, cmd_rx, done_tx),
            move |state, (r, c, d)| request(state, n, r, c, d),
        )
        .map_err(|e| format!("request {n}: spawn: {e}"))?;
    let id = h.id();
    let want = expected(zygote.state(), n);
    let got = reply_rx.recv();
    if got != Some([u64::from(n), want, id, how as u64]) {
        return Err(format!(
            "request {n} ({how:?}) replied {got:?}, expected [{n}, {want}, {id}, {}]",
            how as u64
        ));
    }
    if matches!(
        how,
        Way::KillInRecv
            | Way::KillInSleep
            | Way::KillRunnable
            | Way::KillSpinning
            | Way::KillInJoin
    ) {
        h.kill();
    }
    let r = h.join();
    let ok = match how {
        Way::Return | Way::ReturnForgetting => r == Ok(0),
        Way::Panic => matches!(&r, Err(TaskError::Panic(m))
            if m.contains(&format!("request {n}: planned panic holding {BIG} bytes, 16 words"))),
        Way::FaultReadOnly => matches!(&r, Err(TaskError::Fault { addr, cause, .. })
            if *addr == RO_VA + u64::from(n) % RO_PAGES * 4096 + 8 && cause.contains("read-only")),
        Way::FaultNull => matches!(&r, Err(TaskError::Fault { addr, cause, .. })
            if *addr == NULL_ADDR as u64 && cause.contains("unmapped")),
        _ => r == Err(TaskError::Killed),
    };
    if !ok {
        return Err(format!("request {n} ({how:?}) ended with {r:?}"));
    }
    // Its channel ends went with it.
    let left = handle::owned_by(id);
    if left != 0 {
        return Err(format!("request {n} ({how:?}) still owns {left} object(s)"));
    }
    if cmd_tx.send(1).is_ok() {
        return Err(format!(
            "request {n} ({how:?}): its command receiver outlived it"
        ));
    }
    if let Some(extra) = reply_rx.recv() {
        return Err(format!(
            "request {n} ({how:?}): a second reply {extra:?}, or its sender outlived it"
        ));
    }
    // Its grandchild saw the close, read its template, reported, and ended.
    let report: Vec<Option<u64>> = (0..4).map(|_| done_rx.recv()).collect();
    let want_done = [Some(u64::from(n)), Some(u64::from(own_byte(n))), Some(1)];
    if report[..3] != want_done || report[3].is_none() {
        return Err(format!(
            "request {n} ({how:?}): its grandchild reported {report:?}, expected {want_done:?} and its id"
        ));
    }
    if let Some(extra) = done_rx.recv() {
        return Err(format!(
            "request {n} ({how:?}): the grandchild sent {extra} more, or its sender outlived it"
        ));
    }
    Ok(how)
}

/// What the leak check compares: free frames (with the kernel heap's own), kernel-heap bytes and
/// allocations, registry objects, the zygote's own heap bytes and allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Measure {
    frames: usize,
    kheap_bytes: usize,
    kheap_allocs: usize,
    objects: usize,
    own_bytes: usize,
    own_allocs: usize,
}

fn measure() -> Result<Measure, String> {
    // Let every detached grandchild finish ending (each has reported by now).
    for _ in 0..4 {
        task::yield_now();
    }
    task::trim_caches();
    // The zygote holds the snapshot its last spawn took: take one now, at every measurement.
    libos::process::seal().map_err(|e| format!("seal: {e}"))?;
    let k = libos::heap_stats();
    let own = libos::process::heap_stats();
    Ok(Measure {
        frames: libos::free_frames() + k.reserved_bytes / 4096,
        kheap_bytes: k.allocated_bytes,
        kheap_allocs: k.allocation_count,
        objects: handle::live_objects(),
        own_bytes: own.allocated_bytes,
        own_allocs: own.allocation_count,
    })
}

/// The whole check: `n` requests after a warm-up round.
pub fn run(n: u32) -> Result<(), String> {
    LOG.lock().push(String::from("zygote"));
    let ro = TemplateBuilder::new()
        .region(
            "zygote-consts",
            RO_VA,
            RO_PAGES * 4096,
            Kind::ReadOnly,
            |off, p| p.fill(ro_byte(off)),
        )
        .and_then(|b| b.seal())
        .map_err(|e| format!("read-only template: {e}"))?;
    let mut zygote = Zygote::new(warm());
    if !unchanged(zygote.state()) {
        return Err(String::from("the warm state is not what warm() made"));
    }
    let mut counts = Counts::default();
    for i in 0..2 * PERIOD {
        counts.add(serve(&mut zygote, &ro, i)?);
    }
    if WAYS.iter().any(|&w| !(0..PERIOD).any(|i| way(i) == w)) {
        return Err(String::from("a way of ending is not in the warm-up round"));
    }
    println!("requests: warm-up done ({counts})");
    let base = measure()?;
    println!("requests: baseline {base:?}");
    let start = libos::time::Instant::now();
    let mut counts = Counts::default();
    for i in 0..n {
        counts.add(serve(&mut zygote, &ro, i)?);
        let done = i + 1;
        if done % PROGRESS == 0 && done < n {
            let k = libos::heap_stats();
            println!(
                "requests: {done} of {n} done in {:?} ({counts}); free frames {}, kernel heap {} \
                 bytes in {} allocations, {} registry objects",
                start.elapsed(),
                libos::free_frames(),
                k.allocated_bytes,
                k.allocation_count,
                handle::live_objects()
            );
        }
    }
    let took = start.elapsed();
    let end = measure()?;
    println!(
        "requests: {n} served in {took:?} ({counts}); free frames (with the kernel heap's) {} -> \
         {}, kernel heap {} -> {} bytes in {} -> {} allocations, registry {} -> {} objects, \
         zygote's heap {} -> {} bytes in {} -> {} allocations",
        base.frames,
        end.frames,
        base.kheap_bytes,
        end.kheap_bytes,
        base.kheap_allocs,
        end.kheap_allocs,
        base.objects,
        end.objects,
        base.own_bytes,
        end.own_bytes,
        base.own_allocs,
        end.own_allocs
    );
    let bad = counts.panicked + counts.faulted_read_only + counts.faulted_null + counts.killed();
    // Request i ends badly when i % 10 == 7: (n + 2) / 10 of the first n.
    if bad != (n + 2) / 10 {
        return Err(format!("{bad} of {n} requests ended badly, not one in ten"));
    }
    if end.frames != base.frames {
        return Err(format!(
            "free frames {} -> {}: {} frame(s) leaked",
            base.frames,
            end.frames,
            base.frames as i64 - end.frames as i64
        ));
    }
    if end.kheap_bytes != base.kheap_bytes || end.kheap_allocs != base.kheap_allocs {
        return Err(String::from("kernel heap not back at its baseline"));
    }
    if end.objects != base.objects {
        return Err(String::from("registry objects not back at their baseline"));
    }
    if end.own_bytes != base.own_bytes || end.own_allocs != base.own_allocs {
        return Err(String::from(
            "the zygote's own heap not back at its baseline",
        ));
    }
    println!("requests: frames, kernel heap, registry and the zygote's heap back at baseline");
    if !unchanged(zygote.state()) {
        return Err(String::from("the zygote's state or statics changed"));
    }
    let h = zygote
        .spawn(&[&ro], |state| i32::from(!unchanged(state)))
        .map_err(|e| format!("spawn: {e}"))?;
    if h.join() != Ok(0) {
        return Err(String::from(
            "a fresh child does not see the original state",
        ));
    }
    println!("requests: zygote unchanged ok");
    Ok(())
}
