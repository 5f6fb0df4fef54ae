//! A small HTTP/1.1 client (std::net, loopback only) for test cases that talk to a guest server
//! through a forwarded port, and the load generator of `cargo xtask httpbench`.
//!
//! Every request opens a connection, sends `GET`, and reads the response to the end (the server
//! closes the connection); the body is checked against `Content-Length`. Requests are bounded in
//! count and time.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Time limit of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A connection to 127.0.0.1:port.
pub fn connect(port: u16) -> Result<TcpStream> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `GET path` on `s` and reads the response to the end.
pub fn request(mut s: TcpStream, port: u16, path: &str) -> Result<Response> {
    // One write: the request goes out as one segment.
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: stencil-xtask\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .with_context(|| format!("send GET {path}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("read the response to GET {path}"))?;
    parse_response(&raw).with_context(|| format!("GET {path}"))
}

/// `GET path` on 127.0.0.1:port.
pub fn get(port: u16, path: &str) -> Result<Response> {
    request(connect(port)?, port, path)
}

/// Parses a whole `Connection: close` response.
pub fn parse_response(raw: &[u8]) -> Result<Response> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!(
            "incomplete response ({} bytes, no end of header)",
            raw.len()
        );
    };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line '{status_line}'"))?;
    let body = raw[head_end + 4..].to_vec();
    for l in lines {
        if let Some((k, v)) = l.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            let n: usize = v.trim().parse().context("bad Content-Length")?;
            if n != body.len() {
                bail!("body is {} bytes, Content-Length says {n}", body.len());
            }
        }
    }
    Ok(Response { status, body })
}

/// GETs `path` until it answers 200 (the guest is up and listening), `limit` passes or `stop`
/// is set (the guest has ended).
pub fn wait_ready(port: u16, path: &str, limit: Duration, stop: &AtomicBool) -> Result<Response> {
    let start = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            bail!("the guest ended before it answered GET {path}");
        }
        // A short limit per try: a connection QEMU accepted before the guest listened waits
        // for slirp's SYN retransmit (seconds); a fresh one is answered at once.
        let attempt = connect(port).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(1500)))?;
            request(s, port, path)
        });
        match attempt {
            Ok(r) if r.status == 200 => return Ok(r),
            Ok(r) if start.elapsed() > limit => bail!("GET {path}: status {}", r.status),
            Err(e) if start.elapsed() > limit => {
                return Err(e).context(format!("the guest did not answer within {limit:?}"));
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Reads a `key: value` line of a `/stats` page.
pub fn stat(page: &str, key: &str) -> Option<u64> {
    page.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().split('.').next()?.parse().ok())?
    })
}

/// A test case's host-side HTTP script (`http = { ... }` in a case).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// Guest TCP port the server listens on (a free host port is forwarded to it).
    #[serde(default = "default_guest_port")]
    pub guest_port: u16,
    /// `[path, substring]` pairs: each GET must answer 200 with the substring in its body.
    #[serde(default)]
    pub get: Vec<(String, String)>,
    /// Sequential GETs of `load_path` after the checks.
    #[serde(default)]
    pub sequential: u32,
    /// Concurrent connections (one GET each) after the sequential ones.
    #[serde(default)]
    pub concurrent: u32,
    /// Path the load requests fetch.
    #[serde(default = "default_load_path")]
    pub load_path: String,
    /// Read `frames_in_use` from `/stats` after a warm-up round and after the load: they must
    /// be equal (nothing leaked).
    #[serde(default)]
    pub frames_return: bool,
    /// Check UDP both ways: the host binds a UDP port on 127.0.0.1, `GET /udp-echo?port=P` makes
    /// the guest send "ping" there (10.0.2.2 is the host's loopback), the host answers "pong",
    /// and the response must report it.
    #[serde(default)]
    pub udp_echo: bool,
    /// A slowloris: a client that sends `GET /` (39 bytes) one byte every `slow_client_ms`
    /// milliseconds. The server must answer 408 before the client has sent it all, a normal GET
    /// sent meanwhile must be served, and the worker must end (`active_connections` back to 1,
    /// the `/stats` request itself).
    #[serde(default)]
    pub slow_client_ms: Option<u64>,
    /// Bad request heads, each on its own connection: one longer than 8 KiB must get 431, a
    /// target not starting with `/` 400, `HTTP/2.0` 505, `POST` 405; then `GET /` must still
    /// answer 200.
    #[serde(default)]
    pub bad_heads: bool,
    /// Path that makes the guest exit once the script is done.
    #[serde(default = "default_quit")]
    pub quit: String,
}

fn default_guest_port() -> u16 {
    80
}
fn default_load_path() -> String {
    "/".to_owned()
}
fn default_quit() -> String {
    "/quit".to_owned()
}

/// A free port on 127.0.0.1 (bound and released; QEMU binds it right after).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Gap between the connects of [`concurrent`]: QEMU's user networking listens on the host port
/// with a backlog of 1, so a burst of SYNs mostly overflows the host's accept queue and waits for
/// SYN retransmits (1 s, 3 s, 7 s, ...); a short gap lets it accept each one in turn.
const CONNECT_GAP: Duration = Duration::from_millis(20);

/// `n` connections open at once, then one GET of `path` on each, all sent together. Returns the
/// failures.
pub fn concurrent(port: u16, path: &str, n: u32) -> Vec<String> {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let all_open = Arc::new(std::sync::Barrier::new(n as usize));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let errors = errors.clone();
            let all_open = all_open.clone();
            let path = path.to_owned();
            std::thread::spawn(move || {
                std::thread::sleep(CONNECT_GAP * i);
                let conn = connect(port);
                all_open.wait();
                let r = conn.and_then(|s| request(s, port, &path));
                let fail = match r {
                    Ok(r) if r.status == 200 => return,
                    Ok(r) => format!("concurrent GET #{i} {path}: status {}", r.status),
                    Err(e) => format!("concurrent GET #{i} {path}: {e:#}"),
                };
                errors.lock().unwrap().push(fail);
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Arc::try_unwrap(errors)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default()
}

/// Sends `raw` on a fresh connection and reads the response to the end.
pub fn raw_request(port: u16, raw: &[u8]) -> Result<Response> {
    let mut s = connect(port)?;
    s.write_all(raw).context("send the request")?;
    // Nothing more will be sent: a server that answers before reading everything (e.g. 431 for
    // an oversized head) may then reset the connection for the unread rest. A reset after the
    // answer arrived is the server's right, so what was read counts; with nothing read, the
    // read error is the answer.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(_) if !buf.is_empty() => {}
        Err(e) => return Err(e).context("read the response"),
    }
    parse_response(&buf)
}

/// How a slow client's connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SlowEnd {
    /// The server answered (status) after the client had sent `sent` of `total` bytes.
    Answered { status: u16, sent: usize },
    /// The server closed or reset the connection without an answer after `sent` bytes.
    Closed { sent: usize },
}

/// Sends `raw` one byte every `gap`, watching for the server to answer or close in between.
/// `meanwhile` runs once, after the first byte. Returns how the connection ended; an error if
/// the server waited for the whole request.
pub fn slow_request(
    port: u16,
    raw: &[u8],
    gap: Duration,
    meanwhile: impl FnOnce() -> Result<()>,
) -> Result<SlowEnd> {
    let mut s = connect(port)?;
    s.set_read_timeout(Some(gap))?;
    let mut meanwhile = Some(meanwhile);
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    for (sent, b) in raw.iter().enumerate() {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            return Ok(SlowEnd::Closed { sent });
        }
        if let Some(f) = meanwhile.take() {
            f()?;
        }
        if sent + 1 == raw.len() {
            break; // the whole request is out: its answer is read below
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(SlowEnd::Closed { sent: sent + 1 }),
            Ok(n) => {
                // An answer before the request was complete: read it to the end.
                got.extend_from_slice(&buf[..n]);
                s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
                // A reset after the answer still leaves the answer.
                let _ = s.read_to_end(&mut got);
                let status = parse_response(&got)?.status;
                return Ok(SlowEnd::Answered {
                    status,
                    sent: sent + 1,
                });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok(SlowEnd::Closed { sent: sent + 1 }),
        }
    }
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let _ = s.read_to_end(&mut got);
    let answer = parse_response(&got)
        .map(|r| format!("status {}", r.status))
        .unwrap_or_else(|e| format!("{e:#}"));
    bail!(
        "the server waited for the whole request, {} bytes over {:.0?}, and answered: {answer}",
        raw.len(),
        gap * raw.len() as u32
    )
}

/// The `slow_client_ms` check; returns the failures.
fn slow_client_check(port: u16, gap: Duration) -> Result<Vec<String>> {
    let mut fails = Vec::new();
    // Short enough that a server that waits for all of it is reported within a case's timeout
    // (39 bytes: 39 s at one byte a second), long enough to outlast a short deadline.
    let raw = b"GET / HTTP/1.1\r\nUser-Agent: slowloris\r\n\r\n";
    let mut served = None;
    // Connects a little apart: QEMU's user networking accepts with a backlog of 1 (see
    // CONNECT_GAP), and a connect that overflows it waits for SYN retransmits.
    std::thread::sleep(CONNECT_GAP);
    let end = slow_request(port, raw, gap, || {
        std::thread::sleep(CONNECT_GAP);
        served = Some(get(port, "/")?.status);
        Ok(())
    })?;
    if served != Some(200) {
        fails.push(format!(
            "slow client: a normal GET / sent meanwhile answered {served:?}, expected 200"
        ));
    }
    match end {
        SlowEnd::Answered { status: 408, .. } => {}
        SlowEnd::Answered { status, sent } => fails.push(format!(
            "slow client: answered {status} after {sent} of {} bytes, expected 408",
            raw.len()
        )),
        SlowEnd::Closed { sent } => fails.push(format!(
            "slow client: closed without an answer after {sent} of {} bytes, expected 408",
            raw.len()
        )),
    }
    // The worker ends: only the /stats request's own connection stays active. Another worker
    // may be alive for a moment: a connection of `wait_ready`'s that QEMU handed to the guest
    // late waits out the deadline too; so look for up to 5 s.
    let mut active = None;
    for _ in 0..50 {
        active = stat(&get(port, "/stats")?.text(), "active_connections");
        if active == Some(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if active != Some(1) {
        fails.push(format!(
            "slow client: active_connections is {active:?} after it was cut off, expected 1"
        ));
    }
    Ok(fails)
}

/// The `bad_heads` check; returns the failures.
fn bad_heads_check(port: u16) -> Result<Vec<String>> {
    let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(9000, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    let cases: [(&str, &[u8], u16); 4] = [
        ("a 9000-byte head", &big, 431),
        ("target 'nope'", b"GET nope HTTP/1.1\r\n\r\n", 400),
        ("HTTP/2.0", b"GET / HTTP/2.0\r\n\r\n", 505),
        ("POST", b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    ];
    let mut fails = Vec::new();
    for (what, raw, want) in cases {
        match raw_request(port, raw) {
            Ok(r) if r.status == want => {}
            Ok(r) => fails.push(format!("{what}: status {} (expected {want})", r.status)),
            Err(e) => fails.push(format!("{what}: {e:#} (expected {want})")),
        }
    }
    let r = get(port, "/")?;
    if r.status != 200 {
        fails.push(format!("GET / after the bad heads: status {}", r.status));
    }
    Ok(fails)
}

/// Runs a case's script against the guest on host port `port`; returns why it failed (empty:
/// passed). Always ends with GET `quit` so the guest exits.
pub fn run_check(
    check: &HttpCheck,
    port: u16,
    ready_within: Duration,
    stop: &AtomicBool,
) -> Vec<String> {
    let mut fails = Vec::new();
    let script = |fails: &mut Vec<String>| -> Result<()> {
        wait_ready(port, "/", ready_within, stop)?;
        for (path, needle) in &check.get {
            let r = get(port, path)?;
            if r.status != 200 {
                fails.push(format!("GET {path}: status {} (expected 200)", r.status));
            } else if !r.text().contains(needle.as_str()) {
                fails.push(format!("GET {path}: body lacks '{needle}'"));
            }
        }
        if check.udp_echo {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a UDP port")?;
            sock.set_read_timeout(Some(Duration::from_secs(10)))?;
            let udp_port = sock.local_addr()?.port();
            let echo = std::thread::spawn(move || -> Result<()> {
                let mut buf = [0u8; 64];
                let (n, from) = sock
                    .recv_from(&mut buf)
                    .context("no UDP datagram from the guest")?;
                if &buf[..n] != b"ping" {
                    bail!("the guest sent {:?}, expected \"ping\"", &buf[..n]);
                }
                sock.send_to(b"pong", from)?;
                Ok(())
            });
            let r = get(port, &format!("/udp-echo?port={udp_port}"))?;
            if let Err(e) = echo.join().unwrap_or_else(|_| bail!("UDP thread panicked")) {
                fails.push(format!("udp: {e:#}"));
            }
            if !r.text().contains("udp: got 'pong' from 10.0.2.2") {
                fails.push(format!("udp: the guest answered: {}", r.text().trim()));
            }
        }
        if check.bad_heads {
            fails.extend(bad_heads_check(port)?);
        }
        if let Some(ms) = check.slow_client_ms {
            fails.extend(slow_client_check(port, Duration::from_millis(ms))?);
        }
        let frames = |what: &str| -> Result<u64> {
            let page = get(port, "/stats")?.text();
            stat(&page, "frames_in_use")
                .with_context(|| format!("/stats ({what}) has no frames_in_use:\n{page}"))
        };
        let mut baseline = None;
        if check.frames_return {
            // Warm-up round: grows the heap and the caches to their working size.
            fails.extend(concurrent(port, &check.load_path, check.concurrent.max(1)));
            for _ in 0..check.sequential.min(20) {
                get(port, &check.load_path)?;
            }
            baseline = Some(frames("baseline")?);
        }
        let start = Instant::now();
        let mut seq_fail = 0;
        for i in 0..check.sequential {
            match get(port, &check.load_path) {
                Ok(r) if r.status == 200 => {}
                Ok(r) => {
                    seq_fail += 1;
                    if seq_fail <= 5 {
                        fails.push(format!("sequential GET #{i}: status {}", r.status));
                    }
                }
                Err(e) => {
                    seq_fail += 1;
                    if seq_fail <= 5 {
                        fails.push(format!("sequential GET #{i}: {e:#}"));
                    }
                }
            }
            if start.elapsed() > Duration::from_secs(120) {
                fails.push(format!("sequential GETs: only {i} done in 120 s"));
                break;
            }
        }
        if seq_fail > 5 {
            fails.push(format!("... {seq_fail} sequential GETs failed in all"));
        }
        if check.concurrent > 0 {
            fails.extend(concurrent(port, &check.load_path, check.concurrent));
        }
        if let Some(before) = baseline {
            // The last workers may still be ending; give them a moment.
            let mut after = frames("after the load")?;
            for _ in 0..20 {
                if after == before {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
                after = frames("after the load")?;
            }
            if after != before {
                fails.push(format!(
                    "frames in use did not return to baseline: {before} before the load, \
                     {after} after"
                ));
            }
        }
        Ok(())
    };
    if let Err(e) = script(&mut fails) {
        fails.push(format!("http: {e:#}"));
    }
    if stop.load(Ordering::Relaxed) {
        return fails;
    }
    if let Err(e) = get(port, &check.quit) {
        fails.push(format!("GET {} (to end the guest): {e:#}", check.quit));
    }
    fails
}

/// Result of a load run.
#[derive(Debug, Clone)]
pub struct Load {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Per-request latencies, sorted.
    pub latencies: Vec<Duration>,
}

impl Load {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p / 100.0).round() as usize;
        self.latencies[i]
    }
}

/// `connections` client threads, each doing GETs of `path` back to back (one connection per
/// request) until `duration` passes.
pub fn load(port: u16, path: &str, connections: u32, duration: Duration) -> Load {
    let start = Instant::now();
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let path = path.to_owned();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while start.elapsed() < duration {
                    let t = Instant::now();
                    match get(port, &path) {
                        Ok(r) if r.status == 200 => lat.push(t.elapsed()),
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in threads {
        if let Ok((l, e)) = t.join() {
            latencies.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Load {
        requests: latencies.len() as u64,
        errors,
        elapsed,
        latencies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn reads_stats() {
        let page = "tasks_spawned: 12\nspawn_us_p50: 3.250\nframes_in_use: 99\n";
        assert_eq!(stat(page, "frames_in_use"), Some(99));
        assert_eq!(stat(page, "spawn_us_p50"), Some(3));
        assert_eq!(stat(page, "nope"), None);
    }

    #[test]
    fn client_against_a_local_server() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for _ in 0..3 {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                assert!(buf[..n].starts_with(b"GET /"));
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .unwrap();
            }
        });
        assert_eq!(get(port, "/").unwrap().text(), "ok");
        assert!(concurrent(port, "/x", 2).is_empty());
        server.join().unwrap();
    }

    /// A server that gives a whole request 300 ms, like httpd with a short deadline.
    fn impatient_server(l: std::net::TcpListener) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let deadline = Instant::now() + Duration::from_millis(300);
            let mut buf = [0u8; 64];
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .unwrap();
                if let Ok(n) = s.read(&mut buf) {
                    assert!(n > 0, "the client does not close early");
                }
            }
            s.write_all(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        })
    }

    #[test]
    fn slow_request_sees_the_server_cut_it_off() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = impatient_server(l);
        let raw = b"GET / HTTP/1.1\r\n\r\n";
        let mut ran = false;
        let end = slow_request(port, raw, Duration::from_millis(200), || {
            ran = true;
            Ok(())
        })
        .unwrap();
        assert!(ran);
        match end {
            SlowEnd::Answered { status: 408, sent } => assert!(sent < raw.len()),
            other => panic!("expected a 408 before the end, got {other:?}"),
        }
        server.join().unwrap();
    }

    #[test]
    fn slow_request_reports_a_server_that_waits() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 64];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        });
        let err =
            slow_request(port, b"GET /\r\n\r\n", Duration::from_millis(5), || Ok(())).unwrap_err();
        assert!(
            format!("{err:#}").contains("waited for the whole request, 9 bytes"),
            "{err:#}"
        );
        assert!(format!("{err:#}").contains("status 200"), "{err:#}");
        server.join().unwrap();
    }
}
