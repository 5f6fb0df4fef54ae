//! Ownership of libos objects across a task's end: whatever a task still owns when it ends —
//! by returning (objects leaked with `forget`), panicking, overflowing its stack, faulting or
//! being killed — the kernel releases.
//!
//! `tasks N`: N tasks, each given one end of two channels by main and making a channel and a
//! shared heap of its own, end in turn in each of the five ways (return, panic, stack overflow,
//! page fault, kill). After each: the task owns nothing, main's sender finds the task's (given)
//! receiver gone and main's receiver sees every sender gone. After all: the registry, the kernel heap's allocation count and the free-frame
//! count are back at their baseline.
//!
//! `killed N [WHAT]`: N tasks spinning in libos calls (channel calls by default), each killed
//! while the timer has it preempted (mostly inside libos): the kernel heap, the registry and the
//! free frames are back at their baseline (see `killed_inside_libos` for which calls still leak).
//!
//! `net`: an HTTP server on port 80 whose workers (each given its `TcpStream`) write a whole
//! `Connection: close` response and then, by path, return, panic, overflow their stack, fault
//! (a read near address 0) or block until main kills them. The host client reads to end of stream, so it gets its response only
//! if the dead worker's stream was closed (FIN) by the kernel. `/stats` reports how many objects
//! the dead workers still own; `/quit` ends the app.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use libos::channel;
use libos::handle;
use libos::net::{self, TcpListener, TcpStream};
use libos::println;
use libos::shared::{SharedHeap, SharedVec};
use libos::task::{self, TaskError};

libos::main!(main);

/// Where the tasks' shared heaps go (one at a time).
const HEAP_VA: u64 = 0x2_0000_0000;

#[allow(
    unconditional_recursion,
    reason = "the task is meant to overflow its stack"
)]
fn recurse(depth: u64, buf: &mut [u8; 256]) -> u64 {
    let mut local = [0u8; 256];
    local[(depth % 256) as usize] = buf[0].wrapping_add(1);
    core::hint::black_box(&mut local);
    recurse(depth + 1, &mut local) + u64::from(local[0])
}

/// How a task ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Return,
    Panic,
    Overflow,
    /// A page fault: a read near address 0.
    Fault,
    Kill,
}

/// The address a faulting task reads (in the unmapped first page).
const NULL_ADDR: usize = 0x18;

/// Reads near address 0: the task ends with a page fault.
fn null_read() -> i32 {
    let at = core::hint::black_box(NULL_ADDR) as *const u64;
    // SAFETY: none needed: this is the fault under test (a read in the unmapped first page); the
    // task ends on it.
    #[allow(unsafe_code, reason = "the fault under test")]
    let v = unsafe { core::ptr::read_volatile(at) };
    i32::from(v == 0)
}

fn faulted_at_null(r: &Result<i32, TaskError>) -> bool {
    matches!(r, Err(TaskError::Fault { addr, .. }) if *addr == NULL_ADDR as u64)
}

impl End {
    fn name(self) -> &'static str {
        match self {
            End::Return => "Return",
            End::Panic => "Panic",
            End::Overflow => "Overflow",
            End::Fault => "Fault",
            End::Kill => "Kill",
        }
    }
}

const ENDS: [End; 5] = [
    End::Return,
    End::Panic,
    End::Overflow,
    End::Fault,
    End::Kill,
];

/// One task that makes objects of its own, is given two channel ends, and ends as `how` says.
fn one_task(i: usize, how: End) -> Result<(), String> {
    let (to_child, child_rx) = channel::bounded::<u64>(4);
    let (child_tx, from_child) = channel::bounded::<u64>(4);
    let h = libos::task::spawn_with(&[], (child_rx, child_tx), move |(rx, tx)| {
        // Objects of its own, owned by this task, none of which it drops.
        let (own_tx, own_rx) = channel::bounded::<[u64; 4]>(64);
        for k in 0..8 {
            own_tx.send([k; 4]).expect("own receiver alive");
        }
        let heap = SharedHeap::new("task-heap", HEAP_VA, 64 << 10).expect("shared heap");
        // An allocation in it (the task does not attach the heap, so it does not touch it).
        core::mem::forget(SharedVec::<u64>::with_capacity_in(64, heap.allocator()));
        tx.send(task::current()).expect("main listens");
        match how {
            End::Return => {
                core::mem::forget((own_tx, own_rx, heap, rx, tx));
                0
            }
            End::Panic => panic!("deliberate panic holding channel ends and a shared heap"),
            End::Overflow => {
                let mut buf = [0u8; 256];
                recurse(0, &mut buf) as i32
            }
            End::Fault => null_read(),
            // Blocks (main sends nothing) until main kills it.
            End::Kill => rx.recv().map_or(1, |_| 2),
        }
    })
    .map_err(|e| format!("spawn: {e}"))?;
    let id = from_child
        .recv()
        .ok_or_else(|| format!("task {i} ({how:?}) never reported"))?;
    if id != h.id() {
        return Err(format!(
            "task {i} reported id {id}, its handle says {}",
            h.id()
        ));
    }
    if how == End::Kill {
        h.kill();
    }
    let r = h.join();
    let ok = match how {
        End::Return => r == Ok(0),
        End::Panic => matches!(r, Err(TaskError::Panic(_))),
        End::Overflow => matches!(r, Err(TaskError::StackOverflow { .. })),
        End::Fault => faulted_at_null(&r),
        End::Kill => r == Err(TaskError::Killed),
    };
    if !ok {
        return Err(format!("task {i} ({how:?}) ended with {r:?}"));
    }
    let left = handle::owned_by(id);
    if left != 0 {
        return Err(format!(
            "task {i} ({how:?}) still owns {left} object(s) after its end"
        ));
    }
    if to_child.send(7).is_ok() {
        return Err(format!(
            "task {i} ({how:?}): the receiver it was given outlived it"
        ));
    }
    if from_child.recv().is_some() {
        return Err(format!(
            "task {i} ({how:?}): the sender it was given outlived it"
        ));
    }
    Ok(())
}

/// A task that owns nothing, ending as `how` says: what the differential leak check compares
/// with (a task that does not return leaves the kernel whatever it does not own, e.g. its entry
/// closure's box: that is the task module's business, not the registry's).
fn bare_task(i: usize, how: End) -> Result<(), String> {
    let h = task::spawn(&[], move || match how {
        End::Return => 0,
        End::Panic => panic!("deliberate panic holding nothing"),
        End::Overflow => {
            let mut buf = [0u8; 256];
            recurse(0, &mut buf) as i32
        }
        End::Fault => null_read(),
        End::Kill => loop {
            task::yield_now();
        },
    })
    .map_err(|e| format!("spawn: {e}"))?;
    // Let it start (the run queue is FIFO: it runs until it yields or ends). A static flag
    // would not do: a child's statics are its own copy.
    task::yield_now();
    if how == End::Kill {
        h.kill();
    }
    let r = h.join();
    let ok = match how {
        End::Return => r == Ok(0),
        End::Panic => matches!(r, Err(TaskError::Panic(_))),
        End::Overflow => matches!(r, Err(TaskError::StackOverflow { .. })),
        End::Fault => faulted_at_null(&r),
        End::Kill => r == Err(TaskError::Killed),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("bare task {i} ({how:?}) ended with {r:?}"))
    }
}

/// Registry objects, kernel-heap allocations and free frames (plus what the heap keeps).
fn measure() -> (usize, usize, usize) {
    task::trim_caches();
    // The task holds its last snapshot (what the next spawn shares, with its kernel-side
    // bookkeeping): take it now, so every measurement includes the same one.
    libos::process::seal().expect("seal");
    let heap = libos::heap_stats();
    (
        handle::live_objects(),
        heap.allocation_count,
        libos::free_frames() + heap.reserved_bytes / 4096,
    )
}

fn tasks(n: usize, only: Option<End>) -> Result<(), String> {
    let how = |i: usize| only.unwrap_or(ENDS[i % ENDS.len()]);
    // Warm up with a whole round of each (stack cache, registry and scheduler structures):
    // how big the registry's maps grow meanwhile depends on timing (how many objects are alive
    // at once when a task is preempted), and the nodes they keep are no leak. A leak per task
    // would show as `n` allocations or more below.
    for (i, &e) in ENDS.iter().enumerate() {
        one_task(i, e)?;
        bare_task(i, e)?;
    }
    for i in 0..n {
        one_task(i, how(i))?;
        bare_task(i, how(i))?;
    }
    println!("owned: warm-up done");
    let (live0, allocs0, frames0) = measure();
    for i in 0..n {
        one_task(i, how(i))?;
    }
    println!(
        "owned: {n} tasks ({}) released every object",
        only.map_or("return, panic, overflow, fault, kill", End::name)
    );
    let (live1, allocs1, frames1) = measure();
    for i in 0..n {
        bare_task(i, how(i))?;
    }
    let (live2, allocs2, frames2) = measure();
    let owning = allocs1 as i64 - allocs0 as i64;
    let bare = allocs2 as i64 - allocs1 as i64;
    println!(
        "owned: registry {live0} -> {live1} objects; free frames (with the heap's) {frames0} -> \
         {frames1}; kernel-heap allocations left by {n} tasks holding objects: {owning}, by {n} \
         tasks holding none: {bare}"
    );
    if live1 != live0 || live2 != live0 {
        return Err(String::from(
            "registry objects of dead tasks were not released",
        ));
    }
    if frames1 != frames0 || frames2 != frames0 {
        return Err(String::from(
            "frames of dead tasks' objects were not released",
        ));
    }
    if owning != bare {
        return Err(String::from(
            "tasks that died holding objects left more kernel heap than tasks holding none",
        ));
    }
    if only == Some(End::Return) && owning != 0 {
        return Err(String::from(
            "tasks that returned left kernel-heap allocations",
        ));
    }
    println!("owned: registry, kernel heap and free frames back at baseline");
    Ok(())
}

/// What a task killed inside libos spins in (`killed N WHAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spin {
    /// `try_recv` on an empty channel, `try_send` on a full one, `len`.
    Channel,
    /// `Template::stats` on a template of its own.
    TemplateStats,
    /// Building (not sealing) a 16-page template: `TemplateBuilder::region` with its fill.
    /// Leaks today: see `killed_inside_libos`.
    TemplateBuild,
    /// `JoinHandle::is_finished` on a grandchild that waits for the task's channel to close.
    /// Leaks today.
    IsFinished,
    /// Spawning a task that returns at once and joining it. Leaks today.
    SpawnJoin,
}

const SPINS: [(Spin, &str); 5] = [
    (Spin::Channel, "channel"),
    (Spin::TemplateStats, "template-stats"),
    (Spin::TemplateBuild, "template-build"),
    (Spin::IsFinished, "is-finished"),
    (Spin::SpawnJoin, "spawn-join"),
];

/// One round of what a spinning task does; its result only keeps the work from being optimised
/// away.
fn spin_once(
    what: Spin,
    k: u64,
    rx: &channel::Receiver<u64>,
    full: &channel::Sender<u64>,
    t: Option<&libos::space::Template>,
    grandchild: Option<&task::JoinHandle>,
) -> u64 {
    use libos::space::{Kind, TemplateBuilder};
    match what {
        Spin::Channel => match k % 3 {
            0 => u64::from(rx.try_recv().is_ok()),
            1 => u64::from(full.try_send(k).is_err()),
            _ => rx.len() as u64 + 1,
        },
        Spin::TemplateStats => t.map_or(0, |t| t.stats().leaves as u64),
        Spin::TemplateBuild => u64::from(
            TemplateBuilder::new()
                .region("spin", 0x4000_0000, 16 * 4096, Kind::Private, |off, p| {
                    p[0] = off as u8
                })
                .is_ok(),
        ),
        Spin::IsFinished => u64::from(grandchild.is_some_and(|g| g.is_finished())),
        Spin::SpawnJoin => u64::from(
            task::spawn(&[], || 0)
                .ok()
                .is_some_and(|g| g.join() == Ok(0)),
        ),
    }
}

/// `killed N WHAT`: N tasks that never yield, spinning in libos calls (`WHAT`, see [`Spin`]),
/// each killed by main once the timer has preempted it — so mostly somewhere inside libos,
/// holding a reference to a libos object on its stack. Afterwards the kernel heap, the registry
/// and the free frames must be back at their baseline: a kill leaves nothing behind.
///
/// Every `WHAT` is a case of the suite. `template-build`, `is-finished` and `spawn-join` leaked
/// before kills of a task preempted inside libos waited for its next kill point (`sched`'s
/// `Kill::Deferred`): what libos code held on its stack (a `Template` builder's state taken out
/// of the registry while the app's fill runs, an `Arc` clone of a task's kill handle, a spawn's
/// or a join's half-made state) was never dropped.
fn killed_inside_libos(n: usize, what: Spin, name: &str) -> Result<(), String> {
    let one = |i: usize| -> Result<(), String> {
        let (tx, rx) = channel::bounded::<u64>(1);
        let (full_tx, full_rx) = channel::bounded::<u64>(1);
        full_tx
            .send(0)
            .map_err(|_| "the full channel's receiver is gone")?;
        let (ready_tx, ready_rx) = channel::bounded::<u8>(1);
        let h = libos::task::spawn_with(&[], (rx, full_tx, ready_tx), move |(rx, full, ready)| {
            // What the spin needs, made before main may kill the task: a template, and a
            // grandchild that ends when this task's sender goes (with the task).
            let t = (what == Spin::TemplateStats).then(|| {
                libos::space::TemplateBuilder::new()
                    .region(
                        "own",
                        0x4000_0000,
                        4096,
                        libos::space::Kind::ReadOnly,
                        |_, _| {},
                    )
                    .and_then(|b| b.seal())
                    .expect("a one-page template")
            });
            let (g_tx, g_rx) = channel::bounded::<u8>(1);
            let g = (what == Spin::IsFinished).then(|| {
                task::spawn_with(&[], g_rx, |rx| i32::from(rx.recv().is_some()))
                    .expect("spawn the grandchild")
            });
            ready.send(1).expect("main waits for it");
            let mut k: u64 = 0;
            loop {
                k = k.wrapping_add(spin_once(what, k, &rx, &full, t.as_ref(), g.as_ref()) + 1);
                core::hint::black_box(&g_tx);
            }
        })
        .map_err(|e| format!("spawn: {e}"))?;
        if ready_rx.recv() != Some(1) {
            return Err(format!("spinning task {i} never got ready"));
        }
        // The task never yields: main has run again (and runs now) only because the timer
        // preempted it.
        h.kill();
        let r = h.join();
        if r != Err(TaskError::Killed) {
            return Err(format!("spinning task {i} ended with {r:?}"));
        }
        if tx.send(1).is_ok() || full_rx.recv() != Some(0) || full_rx.recv().is_some() {
            return Err(format!(
                "spinning task {i}: the channel ends it was given outlived it"
            ));
        }
        // Let its grandchild see the close and end.
        for _ in 0..4 {
            task::yield_now();
        }
        Ok(())
    };
    for i in 0..4 {
        one(i)?;
    }
    let (live0, allocs0, frames0) = measure();
    let bytes0 = libos::heap_stats().allocated_bytes;
    for i in 0..n {
        one(i)?;
    }
    let (live1, allocs1, frames1) = measure();
    let bytes1 = libos::heap_stats().allocated_bytes;
    println!(
        "owned: {n} tasks killed while spinning in {name}: registry {live0} -> {live1} objects, \
         kernel heap {bytes0} -> {bytes1} bytes in {allocs0} -> {allocs1} allocations, free \
         frames (with the heap's) {frames0} -> {frames1}"
    );
    if (live1, allocs1, bytes1, frames1) != (live0, allocs0, bytes0, frames0) {
        return Err(format!(
            "tasks killed inside libos ({name}) left kernel heap, registry objects or frames"
        ));
    }
    println!("owned: tasks killed inside libos ({name}) left nothing behind");
    Ok(())
}

/// A bitwise copy of a stream, as a fork leaves one in the child's copy of memory.
fn forked_copy(s: &TcpStream) -> TcpStream {
    // SAFETY: a `TcpStream` is plain data (a registry handle and the peer's address), made to be
    // copied bitwise by a fork: a copy in a task that does not own the socket is refused and
    // its drop does nothing, so two values may exist and both be dropped.
    #[allow(unsafe_code, reason = "the test plays a fork")]
    unsafe {
        core::ptr::read(s)
    }
}

/// The request's path, from the first line.
fn read_path(s: &mut TcpStream) -> Result<String, String> {
    let mut buf = [0u8; 1024];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        if got == buf.len() {
            return Err(String::from("request head too long"));
        }
        let n = s.read(&mut buf[got..]).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(String::from("closed before the end of the head"));
        }
        got += n;
    }
    let line = buf[..got].split(|&b| b == b'\r').next().unwrap_or(&[]);
    let path = line.split(|&b| b == b' ').nth(1).unwrap_or(b"/");
    Ok(String::from_utf8_lossy(path).into_owned())
}

fn respond(s: &mut TcpStream, body: &str) -> Result<(), libos::net::NetError> {
    let head = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

/// A task that binds a TCP listener and a UDP socket and panics holding them: afterwards both
/// ports are free again and the stack holds no more sockets than before.
fn ports_of_a_dead_task() -> Result<(), String> {
    const TCP_PORT: u16 = 81;
    const UDP_PORT: u16 = 5353;
    let sockets0 = net::stats().sockets;
    let (tx, rx) = channel::bounded::<u8>(1);
    let (go_tx, go_rx) = channel::bounded::<u8>(1);
    let h = libos::task::spawn_with(&[], (tx, go_rx), |(tx, go)| {
        let l = TcpListener::bind_with_backlog(TCP_PORT, 4).expect("bind TCP");
        let u = net::UdpSocket::bind(UDP_PORT).expect("bind UDP");
        tx.send(1).expect("main listens");
        let _ = go.recv(); // until main has seen the ports taken
        panic!("deliberate panic holding {l:?} and {u:?}");
    })
    .map_err(|e| format!("spawn: {e}"))?;
    rx.recv().ok_or("the binding task never reported")?;
    // While it lives, the ports are taken.
    let taken = |r: Result<(), net::NetError>| matches!(r, Err(net::NetError::AddrInUse { .. }));
    if !taken(TcpListener::bind(TCP_PORT).map(drop))
        || !taken(net::UdpSocket::bind(UDP_PORT).map(drop))
    {
        return Err(String::from("a second socket got a port in use"));
    }
    go_tx
        .send(1)
        .map_err(|_| "the binding task is gone early")?;
    let r = h.join();
    if !matches!(r, Err(TaskError::Panic(_))) {
        return Err(format!("the binding task ended with {r:?}"));
    }
    net::poll(); // retire the aborted listening sockets
    let l = TcpListener::bind(TCP_PORT).map_err(|e| format!("TCP port of a dead task: {e}"))?;
    let u = net::UdpSocket::bind(UDP_PORT).map_err(|e| format!("UDP port of a dead task: {e}"))?;
    drop((l, u));
    net::poll();
    let sockets = net::stats().sockets;
    if sockets != sockets0 {
        return Err(format!("{sockets0} sockets before, {sockets} after"));
    }
    println!("owned: a dead task's listener and UDP socket freed their ports ({sockets} sockets)");
    Ok(())
}

fn serve() -> Result<(), String> {
    net::init().map_err(|e| format!("network: {e}"))?;
    ports_of_a_dead_task()?;
    let mut listener = TcpListener::bind(80).map_err(|e| format!("bind: {e}"))?;
    println!("owned: listening");
    let mut dead: Vec<u64> = Vec::new();
    loop {
        let mut s = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let path = read_path(&mut s)?;
        let how = match path.as_str() {
            "/panic" => End::Panic,
            "/kill" => End::Kill,
            "/overflow" => End::Overflow,
            "/fault" => End::Fault,
            "/quit" => {
                respond(&mut s, "bye\n").map_err(|e| format!("write: {e}"))?;
                s.close();
                return Ok(());
            }
            "/stats" => {
                let owning: usize = dead.iter().map(|&t| handle::owned_by(t)).sum();
                let body = format!(
                    "dead workers: {}\ndead workers owning objects: {owning}\nsockets: {}\n",
                    dead.len(),
                    net::stats().sockets
                );
                respond(&mut s, &body).map_err(|e| format!("write: {e}"))?;
                continue; // dropped: closed by its owner
            }
            _ => End::Return,
        };
        let (tx, rx) = channel::bounded::<u8>(1);
        // For `/`, main keeps what a fork of its memory would leave in a child: a bitwise copy
        // of the stream it gives away.
        let copy = (how == End::Return).then(|| forked_copy(&s));
        let (go_tx, go_rx) = channel::bounded::<u8>(1);
        let h = libos::task::spawn_with(&[], (s, tx, go_rx), move |(mut s, tx, go)| {
            if how == End::Return {
                let _ = go.recv(); // until main has tried its copy
            }
            let body = match how {
                End::Panic => "sent by a task that then panicked\n",
                End::Kill => "sent by a task that was then killed\n",
                End::Overflow => "sent by a task that then overflowed its stack\n",
                End::Fault => "sent by a task that then faulted\n",
                End::Return => "owned ready\n",
            };
            if respond(&mut s, body).is_err() {
                return 1;
            }
            let _ = tx.send(1);
            match how {
                // Neither closes nor drops the stream: the kernel must, when the task ends.
                End::Panic => panic!("deliberate panic holding a TcpStream"),
                End::Overflow => {
                    let mut buf = [0u8; 256];
                    recurse(0, &mut buf) as i32
                }
                End::Fault => null_read(),
                End::Kill => loop {
                    task::yield_now();
                },
                End::Return => 0,
            }
        })
        .map_err(|e| format!("spawn: {e}"))?;
        if let Some(mut copy) = copy {
            let r = copy.write_all(b"not mine");
            let refused = matches!(
                r,
                Err(net::NetError::Handle(handle::HandleError::NotOwner { owner, caller, .. }))
                    if owner == h.id() && caller == task::current()
            );
            if !refused {
                return Err(format!("a copy of a stream given away wrote: {r:?}"));
            }
            drop(copy); // inert: the worker's stream must still work
            println!(
                "owned: a copy of a given stream is refused ({}) and its drop is inert",
                r.unwrap_err()
            );
            go_tx.send(1).map_err(|_| "the worker is gone early")?;
        }
        // The worker has written its response (or failed) when it sends.
        let _ = rx.recv();
        if how == End::Kill {
            h.kill();
        }
        let id = h.id();
        let r = h.join();
        if how != End::Return {
            println!("owned: worker for {path} ended: {r:?}");
            dead.push(id);
        }
    }
}

fn main() -> Result<(), String> {
    let args = libos::args();
    match args.first().map(String::as_str) {
        Some("tasks") => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100);
            let only = args
                .get(2)
                .and_then(|w| ENDS.iter().copied().find(|e| e.name() == w.as_str()));
            tasks(n, only)
        }
        Some("killed") => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100);
            let name = args.get(2).map_or("channel", String::as_str);
            match SPINS.iter().find(|(_, w)| *w == name) {
                Some(&(what, name)) => killed_inside_libos(n, what, name),
                None => Err(format!(
                    "killed: unknown WHAT '{name}' (one of: {})",
                    SPINS.map(|(_, w)| w).join(", ")
                )),
            }
        }
        Some("net") => serve(),
        _ => Err(String::from(
            "usage: test-owned tasks N | killed N [WHAT] | net",
        )),
    }
    .map_err(|e| format!("FAIL: {e}"))?;
    println!("owned: ALL OK");
    Ok(())
}
