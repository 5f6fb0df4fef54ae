//! The pure parts of `linux-httpd` (host-tested): its arguments, the module list `/init` loads,
//! the worker's report, and the `/stats` page.
//!
//! The program itself (`src/main.rs`) is the Linux peer of Stencil's `apps/httpd`: see its
//! module docs.

use std::fmt::Write as _;
use std::time::Duration;

use stencil_http::Limits;
use stencil_http::site::MAX_CONTENT_MIB;

/// Longest `--request-deadline-ms`: ten minutes (as httpd).
pub const MAX_DEADLINE_MS: u64 = 600_000;
/// Where `/init` finds the list of kernel modules to load, one initramfs path a line.
pub const MODULE_LIST: &str = "/modules.list";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Size of the warmed content set, in MiB (`--content-mib`, default 4 as httpd).
    pub content_mib: u64,
    /// Request-head limits (`--request-deadline-ms`, default 5000; 8 KiB and 32 headers).
    pub limits: Limits,
    /// TCP port to listen on (`--port`, default 80).
    pub port: u16,
    /// Page size of the warm state (`--pages 4k|thp`; default: as the system does).
    pub pages: Option<Pages>,
}

/// How the warm state is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// 4 KiB pages only: transparent huge pages off for the process and its children
    /// (`prctl(PR_SET_THP_DISABLE)`).
    Small,
    /// Transparent huge pages: glibc's heap is made to grow in one step as large as the
    /// content (`mallopt(M_TOP_PAD)`) and that part is marked `MADV_HUGEPAGE` before it is
    /// touched, so the kernel backs it with 2 MiB pages at first touch. (Grown 128 KiB at a
    /// time, as by default, the heap gets 4 KiB pages even under `transparent_hugepage=always`:
    /// a huge page needs its whole 2 MiB inside the mapping when it is first touched. glibc's
    /// `glibc.malloc.hugetlb=1` tunable acts only in the kernel's `madvise` mode, read from
    /// /sys.)
    Huge,
}

/// The heap's growth step for [`Pages::Huge`]: the content, 2 MiB per 64 MiB for its index,
/// and 8 MiB of slack.
pub fn thp_top_pad(content_mib: u64) -> u64 {
    (content_mib + content_mib.div_ceil(32) + 8) << 20
}

/// The usage line.
pub const USAGE: &str = "usage: linux-httpd [--content-mib N] [--request-deadline-ms N] [--port N]";

/// `AnonHugePages` of `/proc/meminfo`, in KiB (0 if absent).
pub fn anon_huge_kib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Parses `--content-mib N --request-deadline-ms N` (httpd's options), `--port N` and
/// `--pages 4k|thp`.
pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut out = Args {
        content_mib: 4,
        limits: Limits::default(),
        port: 80,
        pages: None,
    };
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
            "--content-mib" => out.content_mib = value("--content-mib", MAX_CONTENT_MIB)?,
            "--request-deadline-ms" => {
                let ms = value("--request-deadline-ms", MAX_DEADLINE_MS)?;
                if ms == 0 {
                    return Err(String::from("--request-deadline-ms must be at least 1"));
                }
                out.limits.deadline = Duration::from_millis(ms);
            }
            "--port" => {
                let p = value("--port", u64::from(u16::MAX))?;
                out.port = u16::try_from(p)
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| String::from("--port must be 1..65535"))?;
            }
            "--pages" => {
                out.pages = Some(match args.get(i + 1).map(String::as_str) {
                    Some("4k") => Pages::Small,
                    Some("thp") => Pages::Huge,
                    Some(v) => return Err(format!("--pages {v}: 4k or thp")),
                    None => return Err(String::from("--pages needs 4k or thp")),
                });
            }
            other => {
                return Err(format!(
                    "unknown argument '{other}' (known: --content-mib N, \
                     --request-deadline-ms N, --port N, --pages 4k|thp)"
                ));
            }
        }
        i += 2;
    }
    Ok(out)
}

/// Parses the module list: one path a line (relative to `/`, ending in `.ko`), in load order
/// (dependencies first); blank lines and `#` comments are skipped.
pub fn parse_module_list(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("{MODULE_LIST} line {}: '{line}' {why}", n + 1);
        if !line.ends_with(".ko") {
            return Err(bad("is not a .ko file"));
        }
        if line.starts_with('/') || line.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(bad("must be a relative path without '..'"));
        }
        out.push(line.to_owned());
    }
    Ok(out)
}

/// What a child did with its connection, sent to the parent through a pipe before the child
/// closes the connection (as httpd's workers report through a channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// The child's pid.
    pub pid: i32,
    /// One of [`CLOSED`], [`SERVED`], [`REFUSED_HEAD`], [`QUIT`].
    pub outcome: u32,
    /// From the parent's `fork()` call to the child's first instruction, in nanoseconds.
    pub start_ns: u64,
}

/// [`Report::outcome`]: the client closed before sending a byte.
pub const CLOSED: u32 = 0;
/// A request was read and answered.
pub const SERVED: u32 = 1;
/// A request head was refused (4xx / 505).
pub const REFUSED_HEAD: u32 = 2;
/// `/quit` was answered.
pub const QUIT: u32 = 3;

impl Report {
    /// Bytes on the pipe: one write of this size is atomic (below `PIPE_BUF`).
    pub const SIZE: usize = 16;

    /// The report as it goes on the pipe.
    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.pid.to_ne_bytes());
        b[4..8].copy_from_slice(&self.outcome.to_ne_bytes());
        b[8..16].copy_from_slice(&self.start_ns.to_ne_bytes());
        b
    }

    /// A report read from the pipe.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Report {
        let [p0, p1, p2, p3, o0, o1, o2, o3, s @ ..] = *b;
        Report {
            pid: i32::from_ne_bytes([p0, p1, p2, p3]),
            outcome: u32::from_ne_bytes([o0, o1, o2, o3]),
            start_ns: u64::from_ne_bytes(s),
        }
    }
}

/// The `p`-th percentile of `sorted` (nearest rank below, as httpd's /stats), 0 if empty.
pub fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() - 1) * p.min(100) / 100]
}

/// Spawn-latency samples kept for /stats (httpd keeps as many).
pub const SAMPLES: usize = 4096;

/// The parent's counters and samples, shown by `/stats` (a child shows its copy as of its fork).
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Children forked.
    pub spawned: u64,
    /// `fork()` calls that failed.
    pub spawn_failed: u64,
    /// Requests answered (the `/quit` one included).
    pub requests: u64,
    /// Request heads refused.
    pub refused: u64,
    /// Children forked and not yet heard from.
    pub active: usize,
    /// `fork()` call latency, ns.
    pub spawn: Vec<u64>,
    /// `fork()` call until the child's first instruction, ns.
    pub start: Vec<u64>,
    next: usize,
}

impl Stats {
    /// Keeps one sample pair (the last [`SAMPLES`] are kept).
    pub fn record(&mut self, spawn_ns: u64, start_ns: u64) {
        if self.spawn.len() < SAMPLES {
            self.spawn.push(spawn_ns);
            self.start.push(start_ns);
        } else {
            self.spawn[self.next] = spawn_ns;
            self.start[self.next] = start_ns;
            self.next = (self.next + 1) % SAMPLES;
        }
    }

    /// The `/stats` page: httpd's counter and latency fields (spawn = `fork()`), then the
    /// guest's free memory and its anonymous memory in huge pages, in KiB.
    pub fn page(&self, mem_free_kib: u64, anon_huge_kib: u64) -> String {
        let mut spawn = self.spawn.clone();
        let mut start = self.start.clone();
        spawn.sort_unstable();
        start.sort_unstable();
        let us = |ns: u64| format!("{}.{:03}", ns / 1000, ns % 1000);
        let mut s = String::new();
        let _ = write!(
            s,
            "tasks_spawned: {}\nspawn_failed: {}\nrequests: {}\nrequests_refused: {}\n\
             active_connections: {}\n\
             spawn_us_p50: {}\nspawn_us_p99: {}\nspawn_to_start_us_p50: {}\n\
             spawn_to_start_us_p99: {}\nmem_free_kib: {mem_free_kib}\n\
             anon_huge_kib: {anon_huge_kib}\nspawn: fork\n",
            self.spawned,
            self.spawn_failed,
            self.requests,
            self.refused,
            self.active,
            us(percentile(&spawn, 50)),
            us(percentile(&spawn, 99)),
            us(percentile(&start, 50)),
            us(percentile(&start, 99)),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Args, String> {
        parse_args(&a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn arguments() {
        let d = args(&[]).unwrap();
        assert_eq!((d.content_mib, d.port), (4, 80));
        assert_eq!(d.limits, Limits::default());
        let a = args(&[
            "--content-mib",
            "64",
            "--port",
            "8080",
            "--request-deadline-ms",
            "2000",
        ])
        .unwrap();
        assert_eq!((a.content_mib, a.port), (64, 8080));
        assert_eq!(a.limits.deadline, Duration::from_millis(2000));
        assert_eq!(
            args(&["--request-deadline-ms", "soon"]).unwrap_err(),
            "--request-deadline-ms needs a number, not 'soon'"
        );
        assert_eq!(
            args(&["--content-mib"]).unwrap_err(),
            "--content-mib needs a number"
        );
        assert!(
            args(&["--content-mib", "1048577"])
                .unwrap_err()
                .contains("at most 1048576")
        );
        assert!(args(&["--port", "0"]).unwrap_err().contains("1..65535"));
        assert!(args(&["--port", "65536"]).unwrap_err().contains("at most"));
        assert!(
            args(&["--request-deadline-ms", "0"])
                .unwrap_err()
                .contains("at least 1")
        );
        assert!(args(&["--sizes", "1"]).unwrap_err().contains("unknown"));
        assert_eq!(args(&["--pages", "4k"]).unwrap().pages, Some(Pages::Small));
        assert_eq!(args(&["--pages", "thp"]).unwrap().pages, Some(Pages::Huge));
        assert_eq!(
            args(&["--pages", "2m"]).unwrap_err(),
            "--pages 2m: 4k or thp"
        );
        assert!(args(&["--pages"]).is_err());
    }

    #[test]
    fn heap_step_covers_the_content() {
        assert_eq!(thp_top_pad(0), 8 << 20);
        assert_eq!(thp_top_pad(64), 74 << 20);
        assert!(thp_top_pad(stencil_http::site::MAX_CONTENT_MIB) > 1 << 40);
    }

    #[test]
    fn huge_pages_of_meminfo() {
        let m = "MemTotal:  382000 kB\nAnonHugePages:     65536 kB\nShmemHugePages: 0 kB\n";
        assert_eq!(anon_huge_kib(m), 65536);
        assert_eq!(anon_huge_kib("MemTotal: 1 kB\n"), 0);
    }

    #[test]
    fn module_list() {
        let text = "# load order\nlib/modules/virtio_ring.ko\n\n  lib/modules/virtio.ko  \n";
        assert_eq!(
            parse_module_list(text).unwrap(),
            ["lib/modules/virtio_ring.ko", "lib/modules/virtio.ko"]
        );
        assert!(parse_module_list("").unwrap().is_empty());
        let e = parse_module_list("a.ko\nlib/x.txt\n").unwrap_err();
        assert!(e.contains("line 2: 'lib/x.txt' is not a .ko file"), "{e}");
        assert!(
            parse_module_list("/lib/a.ko")
                .unwrap_err()
                .contains("relative")
        );
        assert!(parse_module_list("lib/../a.ko").is_err());
        assert!(parse_module_list("lib//a.ko").is_err());
    }

    #[test]
    fn report_round_trip() {
        let r = Report {
            pid: 4242,
            outcome: QUIT,
            start_ns: 123_456_789_012,
        };
        assert_eq!(Report::from_bytes(&r.to_bytes()), r);
    }

    #[test]
    fn stats_page_fields() {
        let mut s = Stats::default();
        assert!(s.page(0, 0).contains("spawn_us_p50: 0.000\n"));
        for i in 1..=100u64 {
            s.record(i * 1000, i * 2000 + 5);
        }
        s.spawned = 100;
        s.requests = 99;
        let page = s.page(1234, 2048);
        assert!(page.contains("tasks_spawned: 100\n"), "{page}");
        assert!(page.contains("requests: 99\n"));
        // Nearest rank below: the 50th of 1..=100 is 50, the 99th is 99.
        assert!(page.contains("spawn_us_p50: 50.000\n"), "{page}");
        assert!(page.contains("spawn_us_p99: 99.000\n"));
        assert!(page.contains("spawn_to_start_us_p50: 100.005\n"));
        assert!(page.contains("mem_free_kib: 1234\n"));
        assert!(page.contains("anon_huge_kib: 2048\n"));
        // The ring keeps the last SAMPLES pairs.
        for _ in 0..SAMPLES {
            s.record(7, 7);
        }
        assert_eq!(s.spawn.len(), SAMPLES);
        assert!(s.spawn.iter().all(|&v| v == 7));
    }
}
