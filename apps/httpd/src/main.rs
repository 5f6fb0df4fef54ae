//! httpd: a fork-per-connection HTTP server.
//!
//! 1. Brings the network up (DHCP on QEMU's user networking).
//! 2. Warms its state: generates a content set (an index page, a few text pages and
//!    `--content-mib` MiB of binary files) into private memory of its own address space.
//! 3. Snapshots that memory into a template.
//! 4. Accepts connections on port 80; each one is served by a task spawned from the snapshot,
//!    which reads the content from its own (copy-on-write) address space.
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
//! network error; 7 warming or snapshotting the content failed.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;

use libos::net::{self, NetError, TcpListener, TcpStream};
use libos::println;
use libos::space::Template;
use libos::sync::Mutex;
use libos::time::Instant;
use stencil_http::{HeadError, Limits, Method, Request, RequestReader};

libos::main!(main);

/// Guest port the server listens on.
const PORT: u16 = 80;
/// Where the content set lives in every task's address space.
const CONTENT_VA: u64 = 0x4000_0000;
/// Size of each binary file of the content set.
const FILE_SIZE: u64 = 64 << 10;
/// Connections that may wait to be accepted.
const BACKLOG: usize = 64;
/// Largest `--content-mib`: the content set must fit guest memory anyway; this bound only keeps
/// the size arithmetic exact.
const MAX_CONTENT_MIB: u64 = 1 << 20;
/// Longest `--request-deadline-ms`: ten minutes.
const MAX_DEADLINE_MS: u64 = 600_000;
/// Spawn-latency samples kept for /stats.
const SAMPLES: usize = 4096;

static QUIT: AtomicBool = AtomicBool::new(false);
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static SPAWNED: AtomicU64 = AtomicU64::new(0);
static SPAWN_FAILED: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static FREE_AT_START: AtomicUsize = AtomicUsize::new(0);

/// Latency samples in nanoseconds: spawn call, and spawn call until the task's first instruction.
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

/// One file of the content set: name, offset in the content region, length, MIME type.
struct Entry {
    path: String,
    offset: u64,
    len: u64,
    mime: &'static str,
}

struct Content {
    entries: Vec<Entry>,
}

impl Content {
    fn find(&self, path: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }
}

fn exit_code(e: &NetError) -> i32 {
    match e {
        NetError::NoDevice => 3,
        NetError::LinkDown { .. } => 4,
        NetError::DhcpTimeout { .. } => 5,
        _ => 6,
    }
}

/// Byte `i` of binary file `n`: a pattern a client can check.
fn file_byte(n: u64, i: u64) -> u8 {
    (i.wrapping_mul(31) ^ n.wrapping_mul(7)) as u8
}

/// Builds the content set in private memory of the main task and returns its index.
fn warm(content_mib: u64) -> Result<(Content, u64), String> {
    // `main` bounds content_mib by MAX_CONTENT_MIB, so this does not overflow.
    let files = (content_mib << 20) / FILE_SIZE;
    let mut index = String::from(
        "<!doctype html>\n<html><head><title>Stencil httpd</title></head><body>\n\
         <h1>Hello from Stencil httpd</h1>\n\
         <p>Every connection is served by a task spawned from a warmed snapshot.</p>\n<ul>\n\
         <li><a href=\"/hello.txt\">/hello.txt</a></li>\n<li><a href=\"/stats\">/stats</a></li>\n",
    );
    for n in 0..files.min(8) {
        index.push_str(&format!(
            "<li><a href=\"/file/{n}\">/file/{n}</a> ({FILE_SIZE} bytes)</li>\n"
        ));
    }
    index.push_str(&format!(
        "</ul>\n<p>{files} files of {FILE_SIZE} bytes in the snapshot.</p>\n</body></html>\n"
    ));
    let hello = "Hello from a Stencil task!\n";
    let mut entries = Vec::new();
    let mut offset = 0u64;
    let mut add = |path: String, len: u64, mime| {
        entries.push(Entry {
            path,
            offset,
            len,
            mime,
        });
        offset = (offset + len).next_multiple_of(4096);
    };
    add(String::from("/"), index.len() as u64, "text/html");
    add(String::from("/hello.txt"), hello.len() as u64, "text/plain");
    for n in 0..files {
        add(format!("/file/{n}"), FILE_SIZE, "application/octet-stream");
    }
    let total = offset.max(4096);
    libos::task::map_private("content", CONTENT_VA, total)
        .map_err(|e| format!("mapping the content region: {e}"))?;
    let put = |at: u64, data: &[u8]| {
        libos::task::write(CONTENT_VA + at, data).map_err(|e| format!("writing content: {e}"))
    };
    put(entries[0].offset, index.as_bytes())?;
    put(entries[1].offset, hello.as_bytes())?;
    let mut page = [0u8; 4096];
    for (n, e) in entries[2..].iter().enumerate() {
        for p in 0..FILE_SIZE / 4096 {
            for (i, b) in page.iter_mut().enumerate() {
                *b = file_byte(n as u64, p * 4096 + i as u64);
            }
            put(e.offset + p * 4096, &page)?;
        }
    }
    Ok((Content { entries }, total))
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
    let (mut spawn, mut start) = {
        let s = SAMPLES_LOCK.lock();
        (s.spawn.clone(), s.start.clone())
    };
    spawn.sort_unstable();
    start.sort_unstable();
    let free = libos::free_frames();
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
    let head = format!(
        "HTTP/1.1 {status}\r\nServer: stencil-httpd\r\nContent-Type: {mime}\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes())
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

/// A worker: serves one connection, in a task spawned from the snapshot.
fn serve(
    s: &mut TcpStream,
    content: &Content,
    limits: Limits,
    accepted: Instant,
) -> Result<(), NetError> {
    let req = match read_request(s, limits, accepted)? {
        Ok(req) => req,
        Err(e) => {
            let Some((code, reason)) = e.status() else {
                return Ok(()); // closed without a byte: nothing to answer
            };
            REFUSED.fetch_add(1, Ordering::Relaxed);
            println!("httpd: refused a request: {e} ({code})");
            return respond_text(s, &format!("{code} {reason}"), &format!("{e}\n"));
        }
    };
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    if let Method::Other(_) = req.method {
        return respond_text(s, "405 Method Not Allowed", "only GET and HEAD\n");
    }
    let query = req.query.as_deref().unwrap_or("");
    match req.path.as_str() {
        "/stats" => respond_text(s, "200 OK", &stats_page()),
        "/udp-echo" => {
            // /udp-echo?port=P: a UDP round trip with a host program on 127.0.0.1:P (QEMU's user
            // networking maps 10.0.2.2 to the host's loopback).
            let port = query.strip_prefix("port=").and_then(|p| p.parse().ok());
            let body = match port {
                Some(p) => udp_echo(p),
                None => String::from("usage: /udp-echo?port=P\n"),
            };
            respond_text(s, "200 OK", &body)
        }
        "/quit" => {
            QUIT.store(true, Ordering::Relaxed);
            respond_text(s, "200 OK", "bye\n")
        }
        _ => {
            let Some(e) = content.find(&req.path) else {
                return respond_text(s, "404 Not Found", "not found\n");
            };
            respond(s, "200 OK", e.mime, e.len)?;
            if req.method == Method::Head {
                return Ok(());
            }
            // The body comes from this task's own address space: the snapshot's pages.
            let mut page = [0u8; 4096];
            let mut at = 0;
            while at < e.len {
                let n = (e.len - at).min(4096) as usize;
                libos::task::read(CONTENT_VA + e.offset + at, &mut page[..n])
                    .map_err(|_| NetError::InvalidInput("content not mapped"))?;
                s.write_all(&page[..n])?;
                at += n as u64;
            }
            Ok(())
        }
    }
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

fn spawn_worker(template: &Template, content: &Arc<Content>, stream: TcpStream, limits: Limits) {
    let content = content.clone();
    // The request deadline counts from here, right after the accept.
    let t0 = Instant::now();
    ACTIVE.fetch_add(1, Ordering::Relaxed);
    // The stream is given to the worker (it is not `Send`: a closure cannot capture it).
    let r = libos::task::spawn_with(&[template], stream, move |mut stream| {
        let started = t0.elapsed().as_nanos() as u64;
        let r = serve(&mut stream, &content, limits, t0);
        // Counted down before the stream closes: a client that sees the close and asks /stats
        // must not find this connection still active.
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
        drop(stream);
        if let Err(e) = r {
            println!("httpd: connection: {e}");
        }
        // A task's "start" sample: from the accept loop's spawn call to here.
        record_start(started);
        0
    });
    let spawn_ns = t0.elapsed().as_nanos() as u64;
    match r {
        Ok(handle) => {
            SPAWNED.fetch_add(1, Ordering::Relaxed);
            record(spawn_ns, 0);
            drop(handle); // detached: the worker ends on its own
        }
        Err(e) => {
            ACTIVE.fetch_sub(1, Ordering::Relaxed);
            SPAWN_FAILED.fetch_add(1, Ordering::Relaxed);
            println!("httpd: cannot spawn a worker: {e}");
        }
    }
}

/// Fills in the start latency of the most recent sample that has none.
fn record_start(ns: u64) {
    let mut s = SAMPLES_LOCK.lock();
    if let Some(i) = s.start.iter().rposition(|&v| v == 0) {
        s.start[i] = ns;
    }
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
    let (content, total) = match warm(content_mib) {
        Ok(c) => c,
        Err(e) => {
            println!("httpd: warming: {e}");
            return 7;
        }
    };
    let template = match libos::task::snapshot(&[(CONTENT_VA, total)]) {
        Ok(t) => t,
        Err(e) => {
            println!("httpd: snapshot: {e}");
            return 7;
        }
    };
    println!(
        "httpd: warmed {} files ({} KiB) and snapshotted them in {} ms",
        content.entries.len(),
        total >> 10,
        t.elapsed().as_millis()
    );
    let content = Arc::new(content);

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

    while !QUIT.load(Ordering::Relaxed) {
        match listener.try_accept() {
            Ok(Some(stream)) => {
                spawn_worker(&template, &content, stream, limits);
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
    while (ACTIVE.load(Ordering::Relaxed) > 0 || net::stats().sockets > 0)
        && t.elapsed() < Duration::from_secs(5)
    {
        libos::task::yield_now();
    }
    println!(
        "httpd: quit after {} requests, {} tasks spawned",
        REQUESTS.load(Ordering::Relaxed),
        SPAWNED.load(Ordering::Relaxed)
    );
    0
}
