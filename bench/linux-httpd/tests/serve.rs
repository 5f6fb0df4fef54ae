//! Runs linux-httpd natively (not pid 1: no modules, no network setup, loopback only) and checks
//! what it serves: the shared content, httpd's error answers, /stats and /quit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stencil_http::site::{FILE_SIZE, file_byte};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    // A port nobody holds right now (the server binds it right after).
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_linux-httpd"))
        .args(["--port", &port.to_string(), "--content-mib", "1"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert_ne!(out.read_line(&mut line).unwrap(), 0, "exited before ready");
        if line.contains("linux-httpd: ready: listening on 127.0.0.1:") {
            break;
        }
    }
    // Keep draining its output so that it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Server { child, port }
}

/// Sends `raw` and reads the whole answer: (status, head, body).
fn exchange(port: u16, raw: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8(all[..end + 4].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    let body = all[end + 4..].to_vec();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    if !raw.starts_with(b"HEAD ") {
        assert_eq!(body.len(), len, "body length matches Content-Length");
    }
    (status, head, body)
}

fn get(port: u16, path: &str) -> (u16, String, Vec<u8>) {
    exchange(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
}

#[test]
fn serves_the_shared_content_and_quits() {
    let mut server = start(&[]);
    let port = server.port;
    let (status, head, body) = get(port, "/hello.txt");
    assert_eq!(status, 200);
    assert!(head.contains("Server: stencil-httpd\r\n"));
    assert_eq!(body, b"Hello from a Stencil task!\n");
    let (status, _, body) = get(port, "/");
    assert_eq!(status, 200);
    assert!(
        String::from_utf8(body)
            .unwrap()
            .contains("Hello from Stencil httpd")
    );
    let (status, _, body) = get(port, "/file/3");
    assert_eq!(status, 200);
    assert_eq!(body.len() as u64, FILE_SIZE);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, &b)| b == file_byte(3, i as u64))
    );
    let (status, head, body) = exchange(port, b"HEAD /file/0 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("Content-Length: 65536\r\n"));
    assert!(body.is_empty(), "HEAD has no body");
    assert_eq!(get(port, "/file/16").0, 404, "1 MiB is files 0..15");
    assert_eq!(get(port, "/udp-echo").0, 404);
    assert_eq!(exchange(port, b"POST / HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(exchange(port, b"GET nope HTTP/1.1\r\n\r\n").0, 400);
    assert_eq!(exchange(port, b"GET / HTTP/2.0\r\n\r\n").0, 505);
    let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(exchange(port, long.as_bytes()).0, 431);

    // Twenty connections at once, each served by its own child.
    let threads: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || get(port, "/hello.txt").0))
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    let (_, _, stats) = get(port, "/stats");
    let stats = String::from_utf8(stats).unwrap();
    let field = |k: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or_else(|| panic!("{k} in {stats}"))
            .parse()
            .unwrap()
    };
    // 30 children before this one (the parent counts a child after its fork returns); a request
    // counts once its child's report is read, so this child's copy may miss the last few.
    assert_eq!(field("tasks_spawned"), 30, "{stats}");
    assert!(
        field("requests") + field("requests_refused") <= 30,
        "{stats}"
    );
    assert!(field("requests_refused") <= 3, "{stats}");
    // The parent counts this child as active while it serves.
    assert!(field("active_connections") >= 1, "{stats}");
    assert!(stats.contains("spawn_us_p50: "));
    assert!(stats.contains("spawn: fork\n"));

    assert_eq!(get(port, "/quit").2, b"bye\n");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit 0 after /quit: {status}");
}

#[test]
fn a_slow_head_gets_408() {
    let server = start(&["--request-deadline-ms", "300"]);
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("not complete within 300 ms"), "{text}");
}

#[test]
fn bad_arguments_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_linux-httpd"))
        .args(["--content-mib", "lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--content-mib needs a number, not 'lots'"),
        "{text}"
    );
    assert!(text.contains("usage: linux-httpd"));
}

#[test]
fn both_page_sizes_serve() {
    for pages in ["4k", "thp"] {
        let mut server = start(&["--pages", pages]);
        let body = get(server.port, "/file/15").2;
        assert!(
            body.iter()
                .enumerate()
                .all(|(i, &b)| b == file_byte(15, i as u64))
        );
        let _ = get(server.port, "/quit");
        assert!(server.child.wait().unwrap().success(), "--pages {pages}");
    }
}
