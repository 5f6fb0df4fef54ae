//! linux-httpd: the Linux peer of Stencil's `apps/httpd` for `cargo xtask httpbench --peer
//! linux`.
//!
//! The same server on Linux, as a fork server:
//!
//! 1. As `/init` (pid 1) of the Linux guest it loads the kernel modules named in
//!    `/modules.list` (virtio, virtio-net and its dependencies: Debian builds them as modules)
//!    with `finit_module`, brings up `lo` and `eth0` with QEMU's user-networking address
//!    (10.0.2.15/24, default route via 10.0.2.2) by ioctl, and mounts `/proc` (for
//!    `/proc/meminfo`). Run any other
//!    way (pid ≠ 1) it skips that and serves on the host's loopback.
//! 2. Warms the same content as httpd, built by the same code (`stencil_http::site::warm`: a
//!    `HashMap<String, Page>` of the index, `/hello.txt` and `--content-mib` MiB of files), in
//!    this process's heap; every byte is written before the first request. `--pages 4k` turns
//!    transparent huge pages off for the process (`PR_SET_THP_DISABLE`); `--pages thp` makes
//!    glibc's heap grow in one step as large as the content (`mallopt(M_TOP_PAD)`) and marks it
//!    `MADV_HUGEPAGE` before the content touches it, so the kernel backs it with 2 MiB pages.
//!    `/stats` and the start-up line show `AnonHugePages`.
//! 3. Accepts connections on `--port` (default 80, backlog 64 as httpd) and forks one child per
//!    connection from the warmed process. The child reads the request head with
//!    `stencil-http`'s [`RequestReader`] under httpd's limits (8 KiB, 32 headers,
//!    `--request-deadline-ms`, default 5000, counted from the accept), answers from its
//!    copy-on-write copy of the map, writes a report to the parent through a pipe, closes the
//!    connection and `_exit`s. The parent never blocks on a child: it `poll`s the listener and
//!    the report pipe and reaps children with `waitpid(WNOHANG)`.
//!
//! Routes as httpd: `/` and `/hello.txt` and `/file/N` (the content set), `/stats` (the
//! parent's counters as of the child's fork: children forked, requests, fork latency, fork to
//! the child's first instruction, free memory), `/quit` (answers, lets the children finish and
//! ends: as pid 1 it powers the machine off with `reboot(RB_POWER_OFF)`, else it exits 0).
//! httpd's `/udp-echo` (a test of libos's UDP) is not served: 404.
//!
//! Exit codes (pid ≠ 1; as pid 1 an error is printed and the machine powered off): 0 after
//! `/quit`, 2 bad arguments, 6 network or socket error, 7 warming the content failed.
//!
//! Build: a static binary (`-C target-feature=+crt-static`, glibc), which xtask passes itself.

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use linux_httpd::{
    Args, CLOSED, MODULE_LIST, Pages, QUIT, REFUSED_HEAD, Report, SERVED, Stats, USAGE,
    anon_huge_kib, parse_args, parse_module_list,
};
use stencil_http::site::{Site, response_head, warm};
use stencil_http::{HeadError, Limits, Method, Request, RequestReader};

/// Connections that may wait to be accepted (as httpd).
const BACKLOG: libc::c_int = 64;
/// QEMU user networking: the guest's address, mask and gateway.
const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GUEST_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The NIC's name (no udev renames it in the initramfs).
const NIC: &str = "eth0";

fn main() {
    let pid1 = std::process::id() == 1;
    let code = run(pid1);
    if pid1 {
        power_off(code);
    }
    std::process::exit(code);
}

/// Ends the guest: `reboot(RB_POWER_OFF)`, which QEMU (`-no-reboot`) turns into its exit.
fn power_off(code: i32) -> ! {
    println!("linux-httpd: powering off (exit {code})");
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot take no pointers; as pid 1 with CAP_SYS_BOOT, reboot powers the
    // machine off and does not return on success.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot failed: exiting /init makes the kernel panic, which panic=-1 turns into a reboot
    // and -no-reboot into QEMU's exit.
    std::process::exit(code);
}

fn run(pid1: bool) -> i32 {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            println!("linux-httpd: {e}");
            println!("{USAGE}");
            return 2;
        }
    };
    if pid1 {
        // /proc only for /proc/meminfo (the huge pages of the warm state).
        let proc_ = c"/proc";
        // SAFETY: all four strings are NUL-terminated literals; no mount data.
        let r = unsafe {
            libc::mount(
                c"proc".as_ptr(),
                proc_.as_ptr(),
                c"proc".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            println!(
                "linux-httpd: mount /proc: {}",
                std::io::Error::last_os_error()
            );
        }
        if let Err(e) = load_modules().and_then(|()| configure_network()) {
            println!("linux-httpd: network: {e}");
            return 6;
        }
        println!("linux-httpd: network up: {GUEST_ADDR}/24 via gateway {GATEWAY} on {NIC}, lo up");
    }
    if let Err(e) = set_pages(args.pages, args.content_mib) {
        println!("linux-httpd: {e}");
        return 6;
    }
    let t = Instant::now();
    let site = match warm(args.content_mib) {
        Ok(s) => s,
        Err(e) => {
            println!("linux-httpd: warming: {e}");
            return 7;
        }
    };
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    println!(
        "linux-httpd: warmed {} pages ({} KiB) as a HashMap in {} ms; {} KiB of anonymous memory \
         in huge pages (THP: {})",
        site.pages.len(),
        site.bytes >> 10,
        t.elapsed().as_millis(),
        huge_kib(),
        thp.trim()
    );
    // The guest listens on every address (the forwarded port arrives on eth0); run natively it
    // serves loopback only.
    let ip = if pid1 {
        Ipv4Addr::UNSPECIFIED
    } else {
        Ipv4Addr::LOCALHOST
    };
    match serve_forever(SocketAddr::from((ip, args.port)), &args, &site) {
        Ok(()) => 0,
        Err(e) => {
            println!("linux-httpd: {e}");
            6
        }
    }
}

/// Loads the modules of [`MODULE_LIST`] in order with `finit_module`.
fn load_modules() -> Result<(), String> {
    let text = std::fs::read_to_string(MODULE_LIST)
        .map_err(|e| format!("cannot read {MODULE_LIST}: {e}"))?;
    let list = parse_module_list(&text)?;
    let empty = CString::default();
    for path in list {
        let file = std::fs::File::open(format!("/{path}"))
            .map_err(|e| format!("cannot open /{path}: {e}"))?;
        // SAFETY: finit_module reads the module from the open descriptor; the parameter string
        // is a valid NUL-terminated (empty) C string that outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                empty.as_ptr(),
                0 as libc::c_int,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // Already loaded (or built in): fine.
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("finit_module /{path}: {e}"));
            }
        }
    }
    Ok(())
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs; the kernel reads an
    // AF_INET sockaddr as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct (a name and a union of integers, sockaddrs and a
    // pointer) for which all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req
}

/// One `ioctl(fd, op, arg)` on a socket, with the error named.
///
/// # Safety
///
/// `arg` must point to the structure `op` reads and writes (an `ifreq` or an `rtentry`).
unsafe fn ioctl<T>(fd: RawFd, op: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: the caller passes the structure `op` expects; it lives across the call.
    if unsafe { libc::ioctl(fd, op, arg as *mut T) } != 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn set_address(fd: RawFd, name: &str, addr: Ipv4Addr, mask: Ipv4Addr) -> Result<(), String> {
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: SIOCSIFADDR reads an ifreq.
    unsafe {
        ioctl(
            fd,
            libc::SIOCSIFADDR,
            &mut req,
            &format!("{name}: set {addr}"),
        )?
    };
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    // SAFETY: SIOCSIFNETMASK reads an ifreq.
    unsafe {
        ioctl(
            fd,
            libc::SIOCSIFNETMASK,
            &mut req,
            &format!("{name}: set mask"),
        )?
    };
    Ok(())
}

fn bring_up(fd: RawFd, name: &str) -> Result<(), String> {
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of an ifreq.
    unsafe {
        ioctl(
            fd,
            libc::SIOCGIFFLAGS,
            &mut req,
            &format!("{name}: get flags"),
        )?
    };
    // SAFETY: SIOCGIFFLAGS just wrote the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads an ifreq.
    unsafe { ioctl(fd, libc::SIOCSIFFLAGS, &mut req, &format!("{name}: up"))? };
    Ok(())
}

/// `lo` up with 127.0.0.1/8, `eth0` up with 10.0.2.15/24, default route via 10.0.2.2.
fn configure_network() -> Result<(), String> {
    // SAFETY: socket takes no pointers; the descriptor is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: raw is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = sock.as_raw_fd();
    set_address(fd, "lo", Ipv4Addr::LOCALHOST, Ipv4Addr::new(255, 0, 0, 0))?;
    bring_up(fd, "lo")?;
    // virtio_net registers the NIC while its module loads; wait a little in case it has not.
    let t = Instant::now();
    loop {
        let mut req = ifreq(NIC);
        // SAFETY: SIOCGIFINDEX reads the name and writes the index of an ifreq.
        match unsafe { ioctl(fd, libc::SIOCGIFINDEX, &mut req, NIC) } {
            Ok(()) => break,
            Err(e) if t.elapsed() > Duration::from_secs(5) => {
                return Err(format!("no {NIC} 5 s after loading virtio_net ({e})"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    set_address(fd, NIC, GUEST_ADDR, GUEST_MASK)?;
    bring_up(fd, NIC)?;
    // SAFETY: rtentry is a plain C struct (sockaddrs, integers, pointers) for which all zeroes
    // is a valid value (a null rt_dev: the kernel picks the device from the gateway).
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_in(GATEWAY);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads an rtentry.
    unsafe { ioctl(fd, libc::SIOCADDRT, &mut route, "default route")? };
    Ok(())
}

/// A child the parent has forked and not yet heard from.
struct Live {
    pid: i32,
    spawn_ns: u64,
}

/// The parent's loop: accept, fork, take reports, reap; until `/quit`.
fn serve_forever(addr: SocketAddr, args: &Args, site: &Site) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    // std listens with a backlog of 128; httpd's is 64. A second listen() sets it.
    // SAFETY: listen takes no pointers; the descriptor is the listener's.
    if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        return Err(format!("listen: {}", std::io::Error::last_os_error()));
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let (reports_rx, reports_tx) = report_pipe()?;
    println!(
        "linux-httpd: ready: listening on {addr} (fork per connection, request deadline {} ms)",
        args.limits.deadline.as_millis()
    );
    let _ = std::io::stdout().flush();

    let mut stats = Stats::default();
    let mut live: Vec<Live> = Vec::new();
    let mut quit = false;
    while !quit {
        reap(&reports_rx, &mut live, &mut stats, &mut quit);
        if quit {
            break;
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: reports_rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Wakes for a connection or a report; the timeout bounds how long an ended child that
        // sent no report waits to be reaped.
        // SAFETY: fds is a valid array of 2 pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(format!("accept: {e}")),
        };
        // The request deadline counts from here, right after the accept.
        let t0 = Instant::now();
        stats.active = live.len() + 1;
        // SAFETY: this process is single-threaded, so the child may allocate and use std;
        // the child never returns from its branch (it `_exit`s).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let start_ns = t0.elapsed().as_nanos() as u64;
            child(
                stream,
                &listener,
                &reports_tx,
                site,
                &stats,
                args.limits,
                t0,
                start_ns,
            );
        }
        let spawn_ns = t0.elapsed().as_nanos() as u64;
        // The parent's copy of the connection closes; the child's stays open.
        drop(stream);
        if pid < 0 {
            stats.spawn_failed += 1;
            println!(
                "linux-httpd: cannot fork a child: {}",
                std::io::Error::last_os_error()
            );
        } else {
            stats.spawned += 1;
            live.push(Live { pid, spawn_ns });
        }
        stats.active = live.len();
    }
    // /quit: stop accepting, let the children finish.
    drop(listener);
    let t = Instant::now();
    while !live.is_empty() && t.elapsed() < Duration::from_secs(5) {
        reap(&reports_rx, &mut live, &mut stats, &mut quit);
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "linux-httpd: quit after {} requests, {} children forked",
        stats.requests, stats.spawned
    );
    Ok(())
}

/// The report pipe: a non-blocking read end for the parent, a blocking write end for the
/// children (both close-on-exec).
fn report_pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these two new descriptors; nothing else owns them.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own, no pointers.
    let ok = unsafe {
        let fl = libc::fcntl(rx.as_raw_fd(), libc::F_GETFL);
        fl >= 0 && libc::fcntl(rx.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(format!(
            "pipe: O_NONBLOCK: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok((rx, tx))
}

/// Takes the reports, then reaps the children that ended; one that ended without a report is
/// named on the console.
fn reap(rx: &OwnedFd, live: &mut Vec<Live>, stats: &mut Stats, quit: &mut bool) {
    let mut ended = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
        ended.push((pid, status));
    }
    // A child reports before it ends: whatever the ended ones sent is in the pipe by now.
    take_reports(rx, live, stats, quit);
    for (pid, status) in ended {
        if let Some(i) = live.iter().position(|l| l.pid == pid) {
            live.swap_remove(i);
            if libc::WIFSIGNALED(status) {
                println!(
                    "linux-httpd: child {pid} killed by signal {} and no report",
                    libc::WTERMSIG(status)
                );
            } else {
                println!(
                    "linux-httpd: child {pid} ended with {} and no report",
                    libc::WEXITSTATUS(status)
                );
            }
        }
    }
    stats.active = live.len();
}

fn take_reports(rx: &OwnedFd, live: &mut Vec<Live>, stats: &mut Stats, quit: &mut bool) {
    let mut buf = [0u8; Report::SIZE];
    loop {
        // SAFETY: read writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        // Writes of Report::SIZE (< PIPE_BUF) bytes are atomic: a read gets whole reports.
        if n != Report::SIZE as isize {
            break;
        }
        let r = Report::from_bytes(&buf);
        match r.outcome {
            SERVED => stats.requests += 1,
            QUIT => {
                stats.requests += 1;
                *quit = true;
            }
            REFUSED_HEAD => stats.refused += 1,
            _ => {}
        }
        if let Some(i) = live.iter().position(|l| l.pid == r.pid) {
            let l = live.swap_remove(i);
            stats.record(l.spawn_ns, r.start_ns);
        }
    }
    stats.active = live.len();
}

/// The forked child: serves `stream`, reports, closes and `_exit`s.
#[allow(clippy::too_many_arguments)]
fn child(
    mut stream: TcpStream,
    listener: &TcpListener,
    reports: &OwnedFd,
    site: &Site,
    stats: &Stats,
    limits: Limits,
    accepted: Instant,
    start_ns: u64,
) -> ! {
    // The child does not accept; closing its copy of the listener is only hygiene.
    // SAFETY: the child's copy of the descriptor; the listener object is never used again in
    // this process (the child `_exit`s below without returning).
    unsafe { libc::close(listener.as_raw_fd()) };
    let r = serve(&mut stream, site, stats, limits, accepted);
    let outcome = *r.as_ref().unwrap_or(&CLOSED);
    let report = Report {
        pid: std::process::id() as i32,
        outcome,
        start_ns,
    }
    .to_bytes();
    // Reported before the stream closes: a client that sees the close and asks /stats must not
    // find this connection still active.
    // SAFETY: write reads report.len() bytes from report.
    let sent = unsafe { libc::write(reports.as_raw_fd(), report.as_ptr().cast(), report.len()) };
    if outcome == REFUSED_HEAD {
        linger(&mut stream);
    }
    drop(stream);
    if let Err(e) = r {
        println!("linux-httpd: connection: {e}");
    }
    let _ = std::io::stdout().flush();
    // SAFETY: _exit ends this child at once, without running the parent's atexit handlers or
    // destructors (they belong to the parent).
    unsafe { libc::_exit(i32::from(sent != Report::SIZE as isize)) }
}

/// After a refused head the client may still be sending (the rest of a head too long): closing
/// with unread bytes would reset the connection and the client could lose the answer. So the
/// answer's end is sent (FIN) and the rest read and dropped, for at most a second.
fn linger(s: &mut TcpStream) {
    let _ = s.shutdown(std::net::Shutdown::Write);
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    while let Some(left) = Duration::from_secs(1).checked_sub(t.elapsed()) {
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn respond_text(s: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    s.write_all(response_head(status, "text/plain", body.len() as u64).as_bytes())?;
    s.write_all(body.as_bytes())
}

/// Reads the request head within `limits` (the deadline counts from `accepted`).
fn read_request(
    s: &mut TcpStream,
    limits: Limits,
    accepted: Instant,
) -> std::io::Result<Result<Request, HeadError>> {
    let mut reader = RequestReader::new(limits);
    let mut buf = [0u8; 1024];
    loop {
        // Each read waits at most until the deadline, as httpd's.
        let left = match reader.time_left(accepted.elapsed()) {
            Some(left) if !left.is_zero() => left,
            _ => return Ok(Err(reader.timed_out())),
        };
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(reader.end_of_stream()),
            Ok(n) => {
                if let Some(answer) = reader.feed(&buf[..n], accepted.elapsed()).transpose() {
                    return Ok(answer);
                }
            }
            // The deadline has passed; the next round answers.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn mem_free_kib() -> u64 {
    // SAFETY: sysinfo writes into the zeroed struct it is given.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) != 0 {
            return 0;
        }
        (info.freeram as u64).saturating_mul(u64::from(info.mem_unit)) >> 10
    }
}

/// Applies `--pages`: THP off for 4 KiB pages, a huge-page heap for THP.
fn set_pages(pages: Option<Pages>, content_mib: u64) -> Result<(), String> {
    match pages {
        Some(Pages::Small) => {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
                return Err(format!(
                    "PR_SET_THP_DISABLE: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(())
        }
        Some(Pages::Huge) => huge_heap(content_mib).map_err(|e| format!("--pages thp: {e}")),
        None => Ok(()),
    }
}

/// Makes the heap the content will be warmed in huge-page backed: glibc is told to grow it in
/// one step as large as the content (`M_TOP_PAD`) and never to give it back (`M_TRIM_THRESHOLD`),
/// one growth is forced, and the grown part is marked `MADV_HUGEPAGE` before anything touches
/// it, so its first touch faults in 2 MiB pages.
fn huge_heap(content_mib: u64) -> Result<(), String> {
    let pad = libc::c_int::try_from(linux_httpd::thp_top_pad(content_mib))
        .map_err(|_| format!("{content_mib} MiB is more than M_TOP_PAD can say"))?;
    // SAFETY: mallopt with integer arguments only.
    let ok = unsafe {
        libc::mallopt(libc::M_TOP_PAD, pad) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
    };
    if !ok {
        return Err(String::from("mallopt(M_TOP_PAD / M_TRIM_THRESHOLD) failed"));
    }
    // SAFETY: sbrk(0) only reads the current break.
    let before = unsafe { libc::sbrk(0) } as usize;
    // Small blocks (below the mmap threshold) until the heap grows; freed again below, into
    // the heap's free space the content then reuses.
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let grown = loop {
        // SAFETY: as above.
        let now = unsafe { libc::sbrk(0) } as usize;
        if now != before {
            break now;
        }
        if blocks.len() > 4096 {
            return Err(String::from("the heap did not grow"));
        }
        blocks.push(Vec::with_capacity(64 << 10));
    };
    drop(blocks);
    let start = before & !4095;
    // SAFETY: [start, grown) is this process's heap mapping (up to the break just read),
    // page-aligned; MADV_HUGEPAGE changes how it is backed, not its contents.
    if unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            grown - start,
            libc::MADV_HUGEPAGE,
        )
    } != 0
    {
        return Err(format!("madvise: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn huge_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .map(|m| anon_huge_kib(&m))
        .unwrap_or(0)
}

/// Serves one connection from this child's copy of the site; returns the report's outcome.
fn serve(
    s: &mut TcpStream,
    site: &Site,
    stats: &Stats,
    limits: Limits,
    accepted: Instant,
) -> std::io::Result<u32> {
    let req = match read_request(s, limits, accepted)? {
        Ok(req) => req,
        Err(e) => {
            let Some((code, reason)) = e.status() else {
                return Ok(CLOSED); // closed without a byte: nothing to answer
            };
            println!("linux-httpd: refused a request: {e} ({code})");
            respond_text(s, &format!("{code} {reason}"), &format!("{e}\n"))?;
            return Ok(REFUSED_HEAD);
        }
    };
    if let Method::Other(_) = req.method {
        respond_text(s, "405 Method Not Allowed", "only GET and HEAD\n")?;
        return Ok(SERVED);
    }
    match req.path.as_str() {
        "/stats" => respond_text(s, "200 OK", &stats.page(mem_free_kib(), huge_kib()))?,
        "/quit" => {
            respond_text(s, "200 OK", "bye\n")?;
            return Ok(QUIT);
        }
        path => {
            let Some(page) = site.pages.get(path) else {
                respond_text(s, "404 Not Found", "not found\n")?;
                return Ok(SERVED);
            };
            // Head and body straight from this child's copy of the warmed map.
            s.write_all(page.head.as_bytes())?;
            if req.method != Method::Head {
                s.write_all(&page.body)?;
            }
        }
    }
    Ok(SERVED)
}
