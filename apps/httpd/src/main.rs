//! httpd: a fork-per-connection HTTP server.
//!
//! 1. Brings the network up (DHCP on QEMU's user networking).
//! 2. Warms its state as ordinary Rust data: a `hashbrown::HashMap<String, Page>` of the served
//!    files — an index page, a text page and `--content-mib` MiB of binary files — each `Page`
//!    holding its response head (status line and headers with the content type and length,
//!    rendered once) and its body. The content is built by `stencil_http::site`, which the
//!    Linux peer (`bench/linux-httpd`) shares: both serve the same bytes.
//! 3. Seals that state in a [`libos::process::Zygote`] (the snapshot).
//! 4. Accepts connections on port 80; each one is served by a task spawned from the zygote and
//!    given its `TcpStream` ([`Zygote::spawn_with`]), which looks the path up in its own
//!    copy-on-write copy of the map and writes the page from it in place.
//!
//! Tasks are processes: a worker's writes stay in its own memory. A worker reports back to the
//! accept loop through a channel (plain data: its task id, its start latency, what it served)
//! before it closes its connection; the accept loop keeps the counters (`/stats`) and the quit
//! flag from those reports, and reaps a worker that ended without one. A worker's `/stats` page
//! shows the counters as of its spawn (its copy of the accept loop's statics).
//!
//! Pages: `/` (index), `/hello.txt`, `/file/N` (N-th file of the content set), `/stats`
//! (tasks spawned, spawn latency, frames in use), `/quit` (ends the server, exit 0).
//!
//! Requests are read by `stencil-http`'s [`RequestReader`]: the head must be complete within
//! 8 KiB, 32 headers and `--request-deadline-ms` (default 5000) of the accept, or the worker
//! answers 431 / 400 / 505 / 408 and ends.
//!
//! Options: `--content-mib N` (default 4), `--request-deadline-ms N` (default 5000).
//!
//! Exit codes: 0 after `/quit`; 2 bad arguments; 3 no NIC; 4 link down; 5 no DHCP lease; 6 other
//! network error; 7 warming the content failed.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;

use libos::channel::{self, Receiver, Sender};
use libos::net::{self, NetError, TcpListener, TcpStream};
use libos::println;
use libos::process::Zygote;
use libos::sync::Mutex;
use libos::task::JoinHandle;
use libos::time::Instant;
use stencil_http::site::{MAX_CONTENT_MIB, Site, response_head, warm};
use stencil_http::{HeadError, Limits, Method, Request, RequestReader};

libos::main!(main);

/// Guest port the server listens on.
const PORT: u16 = 80;
/// Connections that may wait to be accepted.
const BACKLOG: usize = 64;
/// Longest `--request-deadline-ms`: ten minutes.
const MAX_DEADLINE_MS: u64 = 600_000;
/// Spawn-latency samples kept for /stats.
const SAMPLES: usize = 4096;
/// Reports that may wait in the channel (a worker whose report does not fit waits for the
/// accept loop to take some).
const REPORTS: usize = 256;

// The counters of /stats: written by the accept loop (the main task) only; a worker reads its
// own copy, as of its spawn.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static SPAWNED: AtomicU64 = AtomicU64::new(0);
static SPAWN_FAILED: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static FREE_AT_START: AtomicUsize = AtomicUsize::new(0);

/// Latency samples in nanoseconds: spawn call, and spawn call until the task's first instruction
/// (from its report). Written by the accept loop only, like the counters.
struct Samples {
    spawn: Vec<u64>,
    start: Vec<u64>,
    next: usize,
}

static SAMPLES_LOCK: Mutex<Samples> = Mutex::new(Samples {
    spawn: Vec::new(),
    start: Vec::new(),
    next: 0,
});

fn record(spawn_ns: u64, start_ns: u64) {
    let mut s = SAMPLES_LOCK.lock();
    if s.spawn.len() < SAMPLES {
        s.spawn.push(spawn_ns);
        s.start.push(start_ns);
    } else {
        let i = s.next;
        s.spawn[i] = spawn_ns;
        s.start[i] = start_ns;
        s.next = (i + 1) % SAMPLES;
    }
}

/// What a worker did, sent to the accept loop before it closes its connection: plain data, as
/// a channel requires.
#[derive(Debug, Clone, Copy, zerocopy::IntoBytes, zerocopy::Immutable)]
#[repr(C)]
struct Report {
    /// The worker's task id.
    task: u64,
    /// From the accept loop's spawn call to the worker's first instruction.
    start_ns: u64,
    outcome: u32,
    _reserved: u32,
}

/// [`Report::outcome`]: the client closed before sending a byte.
const CLOSED: u32 = 0;
/// A request was read and answered.
const SERVED: u32 = 1;
/// A request head was refused (4xx / 505).
const REFUSED_HEAD: u32 = 2;
/// `/quit` was answered.
const QUIT: u32 = 3;

fn exit_code(e: &NetError) -> i32 {
    match e {
        NetError::NoDevice => 3,
        NetError::LinkDown { .. } => 4,
        NetError::DhcpTimeout { .. } => 5,
        _ => 6,
    }
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() - 1) * p / 100]
}

fn stats_page() -> String {
    // Cached task stacks are memory in use only until the next spawn; count like with like.
    libos::task::trim_caches();
    // Measured before this task copies the samples (its heap pages count too, and they grow with
    // the number of samples).
    let free = libos::free_frames();
    let (mut spawn, mut start) = {
        let s = SAMPLES_LOCK.lock();
        (s.spawn.clone(), s.start.clone())
    };
    spawn.sort_unstable();
    start.sort_unstable();
    let heap = libos::heap_stats();
    let n = net::stats();
    let us = |ns: u64| format!("{}.{:03}", ns / 1000, ns % 1000);
    format!(
        "tasks_spawned: {}\nspawn_failed: {}\nrequests: {}\nrequests_refused: {}\n\
         active_connections: {}\n\
         spawn_us_p50: {}\nspawn_us_p99: {}\nspawn_to_start_us_p50: {}\nspawn_to_start_us_p99: {}\n\
         frames_in_use: {}\nframes_free: {}\nheap_reserved_frames: {}\nheap_allocated_bytes: {}\n\
         net_rx_frames: {}\nnet_tx_frames: {}\nnet_sockets: {}\nshare: {}\n",
        SPAWNED.load(Ordering::Relaxed),
        SPAWN_FAILED.load(Ordering::Relaxed),
        REQUESTS.load(Ordering::Relaxed),
        REFUSED.load(Ordering::Relaxed),
        ACTIVE.load(Ordering::Relaxed),
        us(percentile(&spawn, 50)),
        us(percentile(&spawn, 99)),
        us(percentile(&start, 50)),
        us(percentile(&start, 99)),
        FREE_AT_START.load(Ordering::Relaxed).saturating_sub(free),
        free,
        heap.reserved_bytes / 4096,
        heap.allocated_bytes,
        n.rx_frames,
        n.tx_frames,
        n.sockets,
        if libos::share_mode() { "on" } else { "off" },
    )
}

fn respond(s: &mut TcpStream, status: &str, mime: &str, len: u64) -> Result<(), NetError> {
    s.write_all(response_head(status, mime, len).as_bytes())
}

fn respond_text(s: &mut TcpStream, status: &str, body: &str) -> Result<(), NetError> {
    respond(s, status, "text/plain", body.len() as u64)?;
    s.write_all(body.as_bytes())
}

/// Reads the request head, within `limits` (the deadline counts from `accepted`).
fn read_request(
    s: &mut TcpStream,
    limits: Limits,
    accepted: Instant,
) -> Result<Result<Request, HeadError>, NetError> {
    let mut reader = RequestReader::new(limits);
    let mut buf = [0u8; 1024];
    loop {
        // Each read waits at most until the deadline: a client that trickles its request one
        // byte at a time cannot keep the worker longer than that.
        let Some(left) = reader.time_left(accepted.elapsed()) else {
            return Ok(Err(reader.timed_out()));
        };
        match s.read_timeout(&mut buf, Some(left)) {
            Ok(0) => return Ok(reader.end_of_stream()),
            Ok(n) => {
                if let Some(answer) = reader.feed(&buf[..n], accepted.elapsed()).transpose() {
                    return Ok(answer);
                }
            }
            // The deadline has passed; the next round answers.
            Err(NetError::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A worker: serves one connection, in a task spawned from the zygote, from its copy of the
/// site. Returns the report's outcome.
fn serve(
    s: &mut TcpStream,
    site: &Site,
    limits: Limits,
    accepted: Instant,
) -> Result<u32, NetError> {
    let req = match read_request(s, limits, accepted)? {
        Ok(req) => req,
        Err(e) => {
            let Some((code, reason)) = e.status() else {
                return Ok(CLOSED); // closed without a byte: nothing to answer
            };
            println!("httpd: refused a request: {e} ({code})");
            respond_text(s, &format!("{code} {reason}"), &format!("{e}\n"))?;
            return Ok(REFUSED_HEAD);
        }
    };
    if let Method::Other(_) = req.method {
        respond_text(s, "405 Method Not Allowed", "only GET and HEAD\n")?;
        return Ok(SERVED);
    }
    let query = req.query.as_deref().unwrap_or("");
    match req.path.as_str() {
        "/stats" => respond_text(s, "200 OK", &stats_page())?,
        "/udp-echo" => {
            // /udp-echo?port=P: a UDP round trip with a host program on 127.0.0.1:P (QEMU's user
            // networking maps 10.0.2.2 to the host's loopback).
            let port = query.strip_prefix("port=").and_then(|p| p.parse().ok());
            let body = match port {
                Some(p) => udp_echo(p),
                None => String::from("usage: /udp-echo?port=P\n"),
            };
            respond_text(s, "200 OK", &body)?;
        }
        "/quit" => {
            respond_text(s, "200 OK", "bye\n")?;
            return Ok(QUIT);
        }
        path => {
            let Some(page) = site.pages.get(path) else {
                respond_text(s, "404 Not Found", "not found\n")?;
                return Ok(SERVED);
            };
            // Head and body straight from this task's copy of the zygote's heap.
            s.write_all(page.head.as_bytes())?;
            if req.method != Method::Head {
                s.write_all(&page.body)?;
            }
        }
    }
    Ok(SERVED)
}

/// Sends "ping" from UDP port 5353+task to 10.0.2.2:`port` and waits for the answer.
fn udp_echo(port: u16) -> String {
    let local = 40000 + (libos::task::current() % 20000) as u16;
    let sock = match net::UdpSocket::bind(local) {
        Ok(s) => s,
        Err(e) => return format!("udp: bind {local}: {e}\n"),
    };
    let gw = net::Ipv4Addr::new(10, 0, 2, 2);
    if let Err(e) = sock.send_to(b"ping", gw, port) {
        return format!("udp: send: {e}\n");
    }
    // A buffer too small for the answer is refused with the datagram's length, which stays
    // queued (never truncated) for the full-size read below.
    let mut small = [0u8; 2];
    let refused = match sock.recv_from_timeout(&mut small, Some(Duration::from_secs(5))) {
        Err(net::NetError::MessageTooLarge { len }) => len,
        Ok((n, ..)) => return format!("udp: a {n}-byte datagram fit a 2-byte buffer?\n"),
        Err(e) => return format!("udp: receive: {e}\n"),
    };
    let mut buf = [0u8; 64];
    match sock.recv_from_timeout(&mut buf, Some(Duration::from_secs(5))) {
        Ok((n, from, from_port)) if n == refused => format!(
            "udp: got '{}' from {from}:{from_port} (a 2-byte buffer was refused first)\n",
            String::from_utf8_lossy(&buf[..n])
        ),
        Ok((n, ..)) => format!("udp: got {n} bytes after {refused} were announced\n"),
        Err(e) => format!("udp: receive: {e}\n"),
    }
}

/// A worker the accept loop has spawned and not yet heard from.
struct Live {
    task: u64,
    handle: JoinHandle,
    spawn_ns: u64,
}

fn spawn_worker(
    zygote: &mut Zygote<Site>,
    stream: TcpStream,
    reports: &Sender<Report>,
    limits: Limits,
    live: &mut Vec<Live>,
) {
    // The request deadline counts from here, right after the accept.
    let t0 = Instant::now();
    // The worker's /stats counts itself.
    ACTIVE.store(live.len() + 1, Ordering::Relaxed);
    // The stream and a sender are given to the worker (they are not `Send`: a closure cannot
    // capture them).
    let r = zygote.spawn_with(
        &[],
        (stream, reports.clone()),
        move |site, (mut stream, tx)| {
            let start_ns = t0.elapsed().as_nanos() as u64;
            let r = serve(&mut stream, site, limits, t0);
            let outcome = *r.as_ref().unwrap_or(&CLOSED);
            // Reported before the stream closes: a client that sees the close and asks /stats
            // must not find this connection still active.
            let report = Report {
                task: libos::task::current(),
                start_ns,
                outcome,
                _reserved: 0,
            };
            let sent = tx.send(report).is_ok();
            drop(stream);
            if let Err(e) = r {
                println!("httpd: connection: {e}");
            }
            i32::from(!sent)
        },
    );
    let spawn_ns = t0.elapsed().as_nanos() as u64;
    match r {
        Ok(handle) => {
            SPAWNED.fetch_add(1, Ordering::Relaxed);
            live.push(Live {
                task: handle.id(),
                handle,
                spawn_ns,
            });
        }
        Err(e) => {
            SPAWN_FAILED.fetch_add(1, Ordering::Relaxed);
            println!("httpd: cannot spawn a worker: {e}");
        }
    }
    ACTIVE.store(live.len(), Ordering::Relaxed);
}

/// Takes the workers' reports: counters, samples, the quit flag. A reported worker is
/// detached (its handle dropped): it ends on its own.
fn take_reports(rx: &Receiver<Report>, live: &mut Vec<Live>, quit: &mut bool) {
    while let Ok(Some(r)) = rx.try_recv() {
        match r.outcome {
            SERVED => {
                REQUESTS.fetch_add(1, Ordering::Relaxed);
            }
            QUIT => {
                REQUESTS.fetch_add(1, Ordering::Relaxed);
                *quit = true;
            }
            REFUSED_HEAD => {
                REFUSED.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if let Some(i) = live.iter().position(|l| l.task == r.task) {
            let l = live.swap_remove(i);
            record(l.spawn_ns, r.start_ns);
        }
    }
    ACTIVE.store(live.len(), Ordering::Relaxed);
}

/// Takes the reports, then reaps the workers that ended without one (a fault, a panic, a
/// kill): each is reported on the console and no longer counted active.
fn reap(rx: &Receiver<Report>, live: &mut Vec<Live>, quit: &mut bool) {
    let ended: Vec<u64> = live
        .iter()
        .filter(|l| l.handle.is_finished())
        .map(|l| l.task)
        .collect();
    // A worker reports before it ends: whatever those sent is in the channel by now.
    take_reports(rx, live, quit);
    for task in ended {
        if let Some(i) = live.iter().position(|l| l.task == task) {
            let l = live.swap_remove(i);
            match l.handle.join() {
                Ok(code) => println!("httpd: worker {task} ended with {code} and no report"),
                Err(e) => println!("httpd: worker {task}: {e}"),
            }
        }
    }
    ACTIVE.store(live.len(), Ordering::Relaxed);
}

/// `--content-mib N --request-deadline-ms N`: the content size and the request limits.
fn parse_args(args: &[String]) -> Result<(u64, Limits), String> {
    let mut content_mib = 4u64;
    let mut limits = Limits::default();
    let mut i = 0;
    while i < args.len() {
        let value = |name: &str, max: u64| -> Result<u64, String> {
            let v = args
                .get(i + 1)
                .ok_or_else(|| format!("{name} needs a number"))?;
            match v.parse::<u64>() {
                Ok(n) if n <= max => Ok(n),
                Ok(_) => Err(format!("{name} {v}: at most {max}")),
                Err(_) => Err(format!("{name} needs a number, not '{v}'")),
            }
        };
        match args[i].as_str() {
            "--content-mib" => content_mib = value("--content-mib", MAX_CONTENT_MIB)?,
            "--request-deadline-ms" => {
                let ms = value("--request-deadline-ms", MAX_DEADLINE_MS)?;
                if ms == 0 {
                    return Err(String::from("--request-deadline-ms must be at least 1"));
                }
                limits.deadline = Duration::from_millis(ms);
            }
            other => {
                return Err(format!(
                    "unknown argument '{other}' (known: --content-mib N, --request-deadline-ms N)"
                ));
            }
        }
        i += 2;
    }
    // The content's own frames, its page tables and index, and room to serve (task stacks,
    // socket buffers, kernel heap).
    let need_mib = content_mib + content_mib.div_ceil(64) + 32;
    let free_mib = ((libos::free_frames() as u64) * 4096) >> 20;
    if need_mib > free_mib {
        return Err(format!(
            "--content-mib {content_mib} needs about {need_mib} MiB of free memory and \
             {free_mib} MiB are free: pass a smaller --content-mib or boot with more --mem"
        ));
    }
    Ok((content_mib, limits))
}

fn main() -> i32 {
    FREE_AT_START.store(libos::free_frames(), Ordering::Relaxed);
    {
        // The samples' room, taken now: they live in this task's heap, which keeps the pages it
        // commits, so growing them under load would read as frames in use. (Without the room
        // they grow as needed.)
        let mut s = SAMPLES_LOCK.lock();
        let _ = s.spawn.try_reserve_exact(SAMPLES);
        let _ = s.start.try_reserve_exact(SAMPLES);
    }
    let (content_mib, limits) = match parse_args(libos::args()) {
        Ok(a) => a,
        Err(e) => {
            println!("httpd: {e}");
            println!("usage: httpd [--content-mib N] [--request-deadline-ms N]");
            return 2;
        }
    };

    let info = match net::init() {
        Ok(i) => i,
        Err(e) => {
            println!("httpd: network: {e}");
            return exit_code(&e);
        }
    };
    println!("httpd: network up: {info}");

    let t = Instant::now();
    let site = match warm(content_mib) {
        Ok(c) => c,
        Err(e) => {
            println!("httpd: warming: {e}");
            return 7;
        }
    };
    let (pages, bytes) = (site.pages.len(), site.bytes);
    let mut zygote = Zygote::new(site);
    println!(
        "httpd: warmed {pages} pages ({} KiB) as a HashMap in a zygote in {} ms",
        bytes >> 10,
        t.elapsed().as_millis()
    );

    let mut listener = match TcpListener::bind_with_backlog(PORT, BACKLOG) {
        Ok(l) => l,
        Err(e) => {
            println!("httpd: listen on port {PORT}: {e}");
            return exit_code(&e);
        }
    };
    println!(
        "httpd: ready: listening on {}:{PORT} (share={}, request deadline {} ms)",
        info.address,
        if libos::share_mode() { "on" } else { "off" },
        limits.deadline.as_millis()
    );

    let (tx, rx) = channel::bounded::<Report>(REPORTS);
    let mut live: Vec<Live> = Vec::new();
    let mut quit = false;
    while !quit {
        reap(&rx, &mut live, &mut quit);
        if quit {
            break;
        }
        match listener.try_accept() {
            Ok(Some(stream)) => {
                spawn_worker(&mut zygote, stream, &tx, limits, &mut live);
                // Let the worker start at once (its first instruction is the start sample).
                libos::task::yield_now();
            }
            Ok(None) => libos::task::yield_now(),
            Err(e) => {
                println!("httpd: accept: {e}");
                return 6;
            }
        }
    }
    // /quit: stop accepting, let the workers finish and the last bytes leave.
    drop(listener);
    let t = Instant::now();
    while (!live.is_empty() || net::stats().sockets > 0) && t.elapsed() < Duration::from_secs(5) {
        reap(&rx, &mut live, &mut quit);
        libos::task::yield_now();
    }
    println!(
        "httpd: quit after {} requests, {} tasks spawned",
        REQUESTS.load(Ordering::Relaxed),
        SPAWNED.load(Ordering::Relaxed)
    );
    0
}
