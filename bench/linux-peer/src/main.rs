//! The Linux peer of Stencil's spawn benchmark (issue #5).
//!
//! It measures what spawning costs on Linux when the parent holds a populated anonymous region
//! of a given size: `fork()` (the parent's return, the child's first instruction, and
//! fork + exit + wait), `vfork` (as `clone(CLONE_VM | CLONE_VFORK)`, the way glibc's
//! `posix_spawn` does it) and `pthread_create` (the new thread's first instruction, and
//! create + join). Each size is measured with 4 KiB pages (`MADV_NOHUGEPAGE`) and with
//! transparent huge pages (`MADV_HUGEPAGE`).
//!
//! It also measures the copy-on-write fault a forked child takes on its first write to a page
//! it inherited (`fork_first_write`, the peer of Stencil's `first_write`), and on a second write
//! to another 4 KiB page in the same 2 MiB (`fork_second_write`: with THP it shows whether the
//! first fault copied the whole huge page or split it and copied 4 KiB).
//!
//! And it runs the request benchmark's Linux side (issue #13): for each state size it builds the
//! warm state of the shared `reqcore` crate (a `hashbrown` index plus records) in a region of
//! its own (4 KiB pages or THP, as above), then serves requests the way a fork server does:
//! `fork()` from the warmed process, the child runs `reqcore::handle` (100 lookups, W page
//! writes) and stores its checksum in the shared page, the parent waits (`kind=request_wW`, from
//! before `fork()` until `waitpid` returned) and checks the checksum against
//! `reqcore::expected`.
//!
//! `cargo xtask bench` runs it twice: as `/init` (pid 1) of a Linux guest in QEMU, where it mounts
//! `/proc` and `/sys` (only to report the clock source and check that the huge pages are real)
//! and powers the machine off at the end, and natively on the host as context. The output is one
//! machine-readable line per figure (`RESULT key=value ...`), plus `INFO`, `WARN` (a region not
//! backed by the page size asked for), `SKIP`, `PROGRESS` and a final `DONE`; docs/bench.md
//! explains them.
//!
//! Times come from `CLOCK_MONOTONIC` in nanoseconds. Under QEMU's `-icount shift=0,sleep=off`
//! the guest clock advances one nanosecond per executed instruction, so the same figures are
//! guest instruction counts there.
//!
//! Build: a static binary for the host target, `-C target-feature=+crt-static` on
//! `x86_64-unknown-linux-gnu` (glibc's static libraries are part of Debian's libc6-dev), which
//! xtask passes itself. Run by hand:
//! `linux-peer [--quick] [--sizes 2M,16M] [--pages 4k,thp] [--req-sizes 16M,1G|none]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ffi::{CStr, c_int, c_void};
use std::fmt::Write as _;
use std::ptr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, compiler_fence};

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Default region sizes (the 2 MiB .. 1 GiB; larger ones only when asked).
const DEFAULT_SIZES: [u64; 4] = [2 * MIB, 16 * MIB, 128 * MIB, GIB];

/// A size is measured only if it is at most this fraction of RAM (the rest is the kernel's).
const MAX_RAM_FRACTION: f64 = 0.7;

/// 8-byte cells in the shared slot page.
const SLOT_CELLS: usize = PAGE / 8;

/// Stack the forked child touches before its timed writes (so that the copy-on-write faults on
/// its own stack pages happen outside the timed part).
const WARM_STACK: usize = 16 << 10;

/// Stack for the vfork child (it runs on its own stack, sharing the parent's memory).
const VFORK_STACK: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pages {
    /// 4 KiB pages: `MADV_NOHUGEPAGE`.
    Small,
    /// Transparent huge pages: `MADV_HUGEPAGE`.
    Thp,
}

impl Pages {
    fn name(self) -> &'static str {
        match self {
            Pages::Small => "4k",
            Pages::Thp => "thp",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Config {
    quick: bool,
    sizes: Vec<u64>,
    pages: Vec<Pages>,
    /// State sizes of the request series; `None`: `reqcore::SIZES` (`--quick`: `QUICK_SIZES`).
    req_sizes: Option<Vec<u64>>,
}

impl Config {
    fn req_sizes(&self) -> &[u64] {
        match (&self.req_sizes, self.quick) {
            (Some(v), _) => v,
            (None, false) => &reqcore::SIZES,
            (None, true) => &reqcore::QUICK_SIZES,
        }
    }
}

/// How many samples to take of each spawn kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    fork: usize,
    vfork: usize,
    thread: usize,
    /// Forks whose child times its first (and second) write to the inherited region.
    write: usize,
    warmup: usize,
}

/// Sample counts per size: the big sizes cost tens of milliseconds per fork under TCG, so they
/// get fewer samples; the whole guest run stays within a few minutes (`--quick`: ~30 s).
fn counts(size: u64, quick: bool) -> Counts {
    let fork = match (size, quick) {
        (s, false) if s <= 16 * MIB => 500,
        (s, false) if s <= 128 * MIB => 200,
        (s, false) if s <= GIB => 60,
        (_, false) => 20,
        (s, true) if s <= 16 * MIB => 40,
        (s, true) if s <= 128 * MIB => 20,
        (_, true) => 10,
    };
    let other = if quick { 50 } else { 500 };
    Counts {
        fork,
        vfork: other,
        thread: other,
        write: fork,
        warmup: if size >= GIB { 1 } else { 3 },
    }
}

/// Parses `2M`, `16MiB`, `1G`, `4096`, ... into bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: u64 = num.parse().ok()?;
    let mul = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        _ => return None,
    };
    num.checked_mul(mul)
}

/// `2 MiB`, `1 GiB`, `1536 KiB`: exact, for humans.
fn size_name(size: u64) -> String {
    for (unit, name) in [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if size >= unit && size.is_multiple_of(unit) {
            return format!("{} {name}", size / unit);
        }
    }
    format!("{size} B")
}

/// Parses the arguments. As pid 1, unknown words are ignored with a note: the kernel hands init
/// every boot option it does not know itself.
fn parse_args(args: &[String], pid1: bool) -> Result<Config, String> {
    let mut cfg = Config {
        quick: false,
        sizes: DEFAULT_SIZES.to_vec(),
        pages: vec![Pages::Small, Pages::Thp],
        req_sizes: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => cfg.quick = true,
            "--sizes" => {
                let list = it.next().ok_or("--sizes needs a list, e.g. 2M,16M,1G")?;
                cfg.sizes = list
                    .split(',')
                    .map(|s| parse_size(s).ok_or_else(|| format!("bad size `{s}`")))
                    .collect::<Result<_, _>>()?;
            }
            "--pages" => {
                let list = it.next().ok_or("--pages needs a list: 4k,thp")?;
                cfg.pages = list
                    .split(',')
                    .map(|s| match s {
                        "4k" => Ok(Pages::Small),
                        "thp" => Ok(Pages::Thp),
                        _ => Err(format!("bad page kind `{s}` (4k or thp)")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--req-sizes" => {
                let list = it
                    .next()
                    .ok_or("--req-sizes needs a list, e.g. 16M,256M,1G, or none")?;
                cfg.req_sizes = Some(if list == "none" {
                    Vec::new()
                } else {
                    list.split(',')
                        .map(|s| parse_size(s).ok_or_else(|| format!("bad size `{s}`")))
                        .collect::<Result<_, _>>()?
                });
            }
            other if pid1 => println!("INFO ignored_argument={other}"),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(cfg)
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `p` percent of
/// the samples at or below it. `p50` of an even count is the lower middle sample.
fn percentile(sorted: &[u64], p: u32) -> u64 {
    assert!(!sorted.is_empty() && (1..=100).contains(&p));
    let n = sorted.len();
    let rank = (n * p as usize).div_ceil(100);
    sorted[rank.max(1) - 1]
}

/// Summary of one series of samples, as one `RESULT` line.
fn result_line(kind: &str, size: u64, pages: Pages, samples: &mut [u64], extra: &str) -> String {
    samples.sort_unstable();
    let n = samples.len();
    let mean = samples.iter().map(|&s| u128::from(s)).sum::<u128>() / n.max(1) as u128;
    let mut line = format!(
        "RESULT kind={kind} size={size} pages={} n={n} p50_ns={} p99_ns={} min_ns={} max_ns={} \
         mean_ns={mean}",
        pages.name(),
        percentile(samples, 50),
        percentile(samples, 99),
        samples[0],
        samples[n - 1],
    );
    line.push_str(extra);
    line
}

/// CLOCK_MONOTONIC in nanoseconds. Async-signal-safe (a vDSO call or a system call), so a forked
/// or vforked child may call it.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes (`shared`: MAP_SHARED, else MAP_PRIVATE) aligned to `align`.
    fn new(len: usize, align: usize, shared: bool) -> Result<Self, String> {
        let flags = libc::MAP_ANONYMOUS
            | if shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
        let total = len + align;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice; no existing
        // memory is affected.
        let raw = unsafe {
            libc::mmap(
                ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(os_error("mmap"));
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        let head = aligned - start;
        let tail = total - head - len;
        // SAFETY: both ranges lie inside the mapping just made and nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut c_void, tail);
            }
        }
        Ok(Self {
            ptr: aligned as *mut u8,
            len,
        })
    }

    fn advise(&self, advice: c_int) -> Result<(), String> {
        // SAFETY: the range is exactly this mapping; the advice values used here change only
        // how the kernel backs it, not its contents.
        let rc = unsafe { libc::madvise(self.ptr.cast(), self.len, advice) };
        if rc != 0 {
            return Err(os_error("madvise"));
        }
        Ok(())
    }

    /// Writes one byte to every 4 KiB page, so every page is present before measuring.
    fn populate(&self) {
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: `off < len`, so the byte lies inside this writable mapping.
            unsafe { ptr::write_volatile(self.ptr.add(off), 1) };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is this mapping and no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `AnonHugePages` (KiB) of the mapping that contains `addr`, from the text of
/// `/proc/self/smaps`. `None` if no mapping there holds the field.
fn smaps_huge_kib(smaps: &str, addr: usize) -> Option<u64> {
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((start, end)) = smaps_range(line) {
            inside = (start..end).contains(&addr);
        } else if inside && let Some(v) = line.strip_prefix("AnonHugePages:") {
            return v.trim().trim_end_matches("kB").trim().parse().ok();
        }
    }
    None
}

/// The address range of an smaps header line (`7f12a0000000-7f12a0200000 rw-p ...`); `None` for
/// the field lines under it.
fn smaps_range(line: &str) -> Option<(usize, usize)> {
    let first = line.split_whitespace().next()?;
    let (a, b) = first.split_once('-')?;
    let start = usize::from_str_radix(a, 16).ok()?;
    let end = usize::from_str_radix(b, 16).ok()?;
    (start < end).then_some((start, end))
}

/// Percent of `map` that huge pages back, from /proc/self/smaps (None without /proc).
fn huge_pct(map: &Mapping) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let kib = smaps_huge_kib(&text, map.ptr as usize)?;
    let len = u64::try_from(map.len).ok()?.max(1);
    Some((kib.saturating_mul(KIB).min(len)) * 100 / len)
}

/// The page where a child or thread stores the time of its first instruction; MAP_SHARED so a
/// forked child's store reaches the parent.
struct Slot {
    map: Mapping,
}

impl Slot {
    fn new() -> Result<Self, String> {
        let map = Mapping::new(PAGE, PAGE, true)?;
        Ok(Self { map })
    }

    fn cell(&self) -> &AtomicU64 {
        self.cell_at(0)
    }

    /// The `i`-th 8-byte cell of the page (`i < SLOT_CELLS`).
    fn cell_at(&self, i: usize) -> &AtomicU64 {
        assert!(i < SLOT_CELLS, "slot cell {i} out of range");
        // SAFETY: `i < SLOT_CELLS`, so the 8-aligned cell lies inside the mapped, writable page,
        // which lives as long as `self`; it is only ever accessed through this atomic (by the
        // parent, the children and the threads).
        unsafe { &*self.map.ptr.cast::<AtomicU64>().add(i) }
    }

    fn addr(&self) -> *mut c_void {
        self.map.ptr.cast()
    }
}

/// Waits for `pid` and checks that it exited with 0.
fn reap(pid: libc::pid_t) -> Result<(), String> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer; `pid` is our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if rc == pid {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(os_error("waitpid"));
        }
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("child {pid} ended with status {status:#x}"));
    }
    Ok(())
}

#[derive(Default)]
struct Series {
    parent: Vec<u64>,
    first: Vec<u64>,
    round: Vec<u64>,
}

/// fork(): the parent's return, the child's first instruction, and fork + exit + wait.
fn measure_fork(slot: &Slot, c: Counts) -> Result<Series, String> {
    let mut s = Series::default();
    for i in 0..c.warmup + c.fork {
        slot.cell().store(0, Ordering::SeqCst);
        let t0 = now_ns();
        // SAFETY: the child only reads the clock, stores to the shared page and calls _exit, all
        // async-signal-safe; it never returns into Rust code that could observe the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            slot.cell().store(now_ns(), Ordering::SeqCst);
            // SAFETY: ends the child at once, without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        let t1 = now_ns();
        if pid < 0 {
            return Err(os_error("fork"));
        }
        reap(pid)?;
        let t2 = now_ns();
        let tc = slot.cell().load(Ordering::SeqCst);
        if i >= c.warmup {
            s.parent.push(t1 - t0);
            s.first.push(tc.saturating_sub(t0));
            s.round.push(t2 - t0);
        }
    }
    Ok(s)
}

extern "C" fn vfork_child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the slot page, alive while the parent is suspended in clone (CLONE_VFORK).
    let cell = unsafe { &*arg.cast::<AtomicU64>() };
    cell.store(now_ns(), Ordering::SeqCst);
    // SAFETY: the child shares the parent's memory; _exit ends it without touching any of it.
    unsafe { libc::_exit(0) }
}

/// vfork: `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)` on a separate stack (what glibc's
/// posix_spawn does; calling `vfork()` itself from Rust would return twice on one stack).
fn measure_vfork(slot: &Slot, c: Counts) -> Result<Series, String> {
    let mut stack = vec![0u8; VFORK_STACK];
    let top = (stack.as_mut_ptr() as usize + VFORK_STACK) & !15;
    let mut s = Series::default();
    for i in 0..c.warmup + c.vfork {
        slot.cell().store(0, Ordering::SeqCst);
        let t0 = now_ns();
        // SAFETY: the child runs `vfork_child` on `stack` (alive until after the wait below) and
        // only stores to the slot and calls _exit; CLONE_VFORK suspends us until it has exited.
        let pid = unsafe {
            libc::clone(
                vfork_child,
                top as *mut c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                slot.addr(),
            )
        };
        if pid < 0 {
            return Err(os_error("clone(CLONE_VM|CLONE_VFORK)"));
        }
        let t1 = now_ns();
        reap(pid)?;
        let t2 = now_ns();
        let tc = slot.cell().load(Ordering::SeqCst);
        if i >= c.warmup {
            s.parent.push(t1 - t0);
            s.first.push(tc.saturating_sub(t0));
            s.round.push(t2 - t0);
        }
    }
    drop(stack);
    Ok(s)
}

extern "C" fn thread_start(arg: *mut c_void) -> *mut c_void {
    // SAFETY: `arg` is the slot page, alive until the creating thread has joined this one.
    let cell = unsafe { &*arg.cast::<AtomicU64>() };
    cell.store(now_ns(), Ordering::SeqCst);
    ptr::null_mut()
}

/// pthread_create: the parent's return, the thread's first instruction, create + join.
fn measure_thread(slot: &Slot, c: Counts) -> Result<Series, String> {
    let mut s = Series::default();
    for i in 0..c.warmup + c.thread {
        slot.cell().store(0, Ordering::SeqCst);
        let mut th: libc::pthread_t = 0;
        let t0 = now_ns();
        // SAFETY: `th` is a valid out-pointer, default attributes; the thread only stores to the
        // slot, which outlives the join below.
        let rc = unsafe { libc::pthread_create(&mut th, ptr::null(), thread_start, slot.addr()) };
        let t1 = now_ns();
        if rc != 0 {
            return Err(format!(
                "pthread_create: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        // SAFETY: `th` was created above and is joined exactly once.
        let rc = unsafe { libc::pthread_join(th, ptr::null_mut()) };
        let t2 = now_ns();
        if rc != 0 {
            return Err(format!(
                "pthread_join: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        let tc = slot.cell().load(Ordering::SeqCst);
        if i >= c.warmup {
            s.parent.push(t1 - t0);
            s.first.push(tc.saturating_sub(t0));
            s.round.push(t2 - t0);
        }
    }
    Ok(s)
}

/// The pages a write sample touches: `first` (sample `i` walks the region in steps of 513
/// pages, so successive samples hit different pages and different PTE tables), and `second`,
/// the neighbouring 4 KiB page, which lies in the same 2 MiB (the region is 2 MiB-aligned);
/// `None` for a one-page region.
fn write_offsets(len: usize, i: usize) -> (usize, Option<usize>) {
    let pages = (len / PAGE).max(1);
    let first = i.wrapping_mul(513) % pages;
    let second = (pages >= 2).then(|| {
        let n = first ^ 1;
        if n < pages { n } else { first - 1 }
    });
    (first * PAGE, second.map(|p| p * PAGE))
}

/// Writes to every page of the stack the timed part can reach, so that it is copied (the
/// stack's own copy-on-write faults) before the timing starts.
#[inline(never)]
fn warm_stack() {
    let mut buf = [0u8; WARM_STACK];
    for b in buf.iter_mut().step_by(PAGE / 2) {
        // SAFETY: `b` is a valid, exclusive reference into `buf`.
        unsafe { ptr::write_volatile(b, 1) };
    }
    std::hint::black_box(&buf);
}

/// The forked child's timed part: one write to `first`, then one to `second`; each figure is
/// the time of one store (which takes the copy-on-write fault) plus one clock read.
///
/// # Safety
///
/// `first` and `second` (if not null) must point into a writable mapping of this process.
#[inline(never)]
unsafe fn timed_writes(first: *mut u8, second: *mut u8) -> (u64, u64) {
    let t0 = now_ns();
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the caller guarantees `first` points into a writable mapping.
    unsafe { ptr::write_volatile(first, 2) };
    compiler_fence(Ordering::SeqCst);
    let t1 = now_ns();
    if second.is_null() {
        return (t1 - t0, 0);
    }
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the caller guarantees `second` points into a writable mapping.
    unsafe { ptr::write_volatile(second, 2) };
    compiler_fence(Ordering::SeqCst);
    let t2 = now_ns();
    (t1 - t0, t2 - t1)
}

#[derive(Default)]
struct Writes {
    first: Vec<u64>,
    second: Vec<u64>,
}

/// fork(), then the child's first write to a page of the populated `region` it inherited (the
/// copy-on-write fault: with THP, the huge page's split first) and a second write to the next
/// page in the same 2 MiB. The child times both, stores them in the shared slot and exits; the
/// parent waits. Nothing is printed while a child runs.
fn measure_fork_writes(slot: &Slot, region: &Mapping, c: Counts) -> Result<Writes, String> {
    let mut w = Writes::default();
    for i in 0..c.warmup + c.write {
        let (first, second) = write_offsets(region.len, i);
        // SAFETY: both offsets are below `region.len` (write_offsets), so the pointers stay
        // inside the region.
        let (p1, p2) = unsafe {
            (
                region.ptr.add(first),
                second.map_or(ptr::null_mut(), |o| region.ptr.add(o)),
            )
        };
        for cell in 0..3 {
            slot.cell_at(cell).store(0, Ordering::SeqCst);
        }
        // SAFETY: the child only writes to its own stack and its copy of the region, reads the
        // clock, stores to the shared page and calls _exit, all async-signal-safe; it never
        // returns into Rust code that could observe the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // The vDSO and the clock's data page are not copied at fork: fault them in, and
            // copy the stack pages the timed part uses, before timing.
            let _ = now_ns();
            warm_stack();
            // SAFETY: p1 and p2 (or null) point into the region, which the child inherited
            // mapped and writable.
            let (a, b) = unsafe { timed_writes(p1, p2) };
            slot.cell_at(0).store(a, Ordering::SeqCst);
            slot.cell_at(1).store(b, Ordering::SeqCst);
            slot.cell_at(2).store(1, Ordering::SeqCst);
            // SAFETY: ends the child at once, without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 {
            return Err(os_error("fork"));
        }
        reap(pid)?;
        let a = slot.cell_at(0).load(Ordering::SeqCst);
        let b = slot.cell_at(1).load(Ordering::SeqCst);
        if slot.cell_at(2).load(Ordering::SeqCst) != 1 {
            return Err("a forked child exited without reporting its write times".to_owned());
        }
        if i >= c.warmup {
            w.first.push(a);
            if second.is_some() {
                w.second.push(b);
            }
        }
    }
    Ok(w)
}

fn total_ram() -> u64 {
    // SAFETY: an all-zero sysinfo is a valid value to be overwritten.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `si` is a valid out-pointer.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return 0;
    }
    si.totalram * u64::from(si.mem_unit)
}

/// Median cost of one clock read (it is included once in every figure).
fn clock_overhead() -> u64 {
    let mut v: Vec<u64> = (0..1001)
        .map(|_| {
            let a = now_ns();
            let b = now_ns();
            b - a
        })
        .collect();
    v.sort_unstable();
    percentile(&v, 50)
}

/// Populates one region and measures every spawn kind with it in place.
fn measure_size(slot: &Slot, cfg: &Config, size: u64, pages: Pages) -> Result<(), String> {
    let len = usize::try_from(size).map_err(|_| "size too large")?;
    println!("PROGRESS populate size={size} pages={}", pages.name());
    let t = now_ns();
    let region = Mapping::new(len, HUGE, false)?;
    region.advise(match pages {
        Pages::Small => libc::MADV_NOHUGEPAGE,
        Pages::Thp => libc::MADV_HUGEPAGE,
    })?;
    region.populate();
    let populate_ms = (now_ns() - t) / 1_000_000;
    // How much of the region huge pages back (its own mapping in /proc/self/smaps).
    let pct = huge_pct(&region);
    let huge = pct.map_or_else(String::new, |p| format!(" huge_pct={p}"));
    println!(
        "INFO populated size={size} pages={} ms={populate_ms}{huge}",
        pages.name()
    );
    if let Some(w) = huge_warning(size, pages, pct) {
        println!("{w}");
    }
    let c = counts(size, cfg.quick);
    let p = pages.name();
    let name = size_name(size);

    println!("PROGRESS fork size={size} pages={p} n={} ({name})", c.fork);
    let mut f = measure_fork(slot, c)?;
    println!(
        "{}",
        result_line("fork_parent", size, pages, &mut f.parent, &huge)
    );
    println!(
        "{}",
        result_line("fork_child_first", size, pages, &mut f.first, &huge)
    );
    println!(
        "{}",
        result_line("fork_roundtrip", size, pages, &mut f.round, &huge)
    );

    println!(
        "PROGRESS vfork size={size} pages={p} n={} ({name})",
        c.vfork
    );
    let mut v = measure_vfork(slot, c)?;
    println!(
        "{}",
        result_line("vfork_child_first", size, pages, &mut v.first, &huge)
    );
    println!(
        "{}",
        result_line("vfork_roundtrip", size, pages, &mut v.round, &huge)
    );

    println!(
        "PROGRESS thread size={size} pages={p} n={} ({name})",
        c.thread
    );
    let mut th = measure_thread(slot, c)?;
    println!(
        "{}",
        result_line("thread_parent", size, pages, &mut th.parent, &huge)
    );
    println!(
        "{}",
        result_line("thread_first", size, pages, &mut th.first, &huge)
    );
    println!(
        "{}",
        result_line("thread_roundtrip", size, pages, &mut th.round, &huge)
    );

    println!(
        "PROGRESS write size={size} pages={p} n={} ({name})",
        c.write
    );
    let mut w = measure_fork_writes(slot, &region, c)?;
    // Whether the children's copy-on-write faults left the parent's huge pages in place.
    let pct_after = huge_pct(&region);
    let after = pct_after.map_or_else(String::new, |p| format!(" huge_pct_after={p}"));
    if let Some(w) = split_warning(size, pages, pct, pct_after) {
        println!("{w}");
    }
    let extra = format!("{huge}{after}");
    println!(
        "{}",
        result_line("fork_first_write", size, pages, &mut w.first, &extra)
    );
    if !w.second.is_empty() {
        println!(
            "{}",
            result_line("fork_second_write", size, pages, &mut w.second, &extra)
        );
    }
    drop(region);
    Ok(())
}

/// A `WARN` line when the parent's region lost huge pages while its children wrote to their
/// copies (Linux split the parent's huge pages, not only the children's mappings).
fn split_warning(
    size: u64,
    pages: Pages,
    before: Option<u64>,
    after: Option<u64>,
) -> Option<String> {
    let (before, after) = (before?, after?);
    (pages == Pages::Thp && after < before).then(|| {
        format!(
            "WARN size={size} pages={} reason=\"huge pages backed {before}% of the {} region \
             before the first-write samples, {after}% after\"",
            pages.name(),
            size_name(size)
        )
    })
}

/// A `WARN` line when the region is not backed as asked: THP mode without huge pages on all of
/// it (THP off, memory fragmented, a region under 2 MiB), or 4 KiB mode with some. `None` when
/// it is as asked or /proc could not tell.
fn huge_warning(size: u64, pages: Pages, pct: Option<u64>) -> Option<String> {
    let pct = pct?;
    let wrong = match pages {
        Pages::Thp => pct < 100,
        Pages::Small => pct > 0,
    };
    wrong.then(|| {
        format!(
            "WARN size={size} pages={} reason=\"huge pages back {pct}% of the {} region \
             (AnonHugePages in /proc/self/smaps)\"",
            pages.name(),
            size_name(size)
        )
    })
}

/// The peer's allocator: the system's, except that while an [`ArenaState`] is being built every
/// allocation comes from that state's own mapping (a bump arena, advised for 4 KiB pages or
/// THP like the spawn series' regions), so the page size of the request state is known. Freeing
/// inside the arena does nothing: the mapping goes away whole, after the state.
struct PeerAlloc;

#[global_allocator]
static ALLOC: PeerAlloc = PeerAlloc;

/// The arena's range (`start..end`, both 0 when there is none) and its next free byte.
static ARENA_START: AtomicUsize = AtomicUsize::new(0);
static ARENA_END: AtomicUsize = AtomicUsize::new(0);
static ARENA_NEXT: AtomicUsize = AtomicUsize::new(0);

std::thread_local! {
    /// This thread's allocations go to the arena now (only the thread that builds the state:
    /// the host tests run other threads meanwhile). Const-initialised, no destructor: reading
    /// it never allocates.
    static BUILDING: Cell<bool> = const { Cell::new(false) };
}

fn building() -> bool {
    BUILDING.try_with(Cell::get).unwrap_or(false)
}

fn arena_alloc(layout: Layout) -> *mut u8 {
    let end = ARENA_END.load(Ordering::SeqCst);
    let got = ARENA_NEXT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |next| {
        next.checked_next_multiple_of(layout.align())?
            .checked_add(layout.size())
            .filter(|&e| e <= end)
    });
    match got {
        // `prev` passed the checks above, so its aligned value is in range.
        Ok(prev) => prev.next_multiple_of(layout.align()) as *mut u8,
        // Full: the allocation fails (State::build reports it as out of memory).
        Err(_) => ptr::null_mut(),
    }
}

fn in_arena(p: *mut u8) -> bool {
    let p = p as usize;
    (ARENA_START.load(Ordering::SeqCst)..ARENA_END.load(Ordering::SeqCst)).contains(&p)
}

// SAFETY: outside an arena every call goes to `System` unchanged. Inside, `arena_alloc` hands
// out disjoint, aligned ranges of a mapping that stays mapped until every object in it is gone
// (`ArenaState` drops its state before its arena), and a free there is a no-op; `realloc`'s
// default (allocate, copy, free) is right for both.
unsafe impl GlobalAlloc for PeerAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if building() {
            return arena_alloc(layout);
        }
        // SAFETY: the caller's guarantees (a non-zero-size layout) are passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_arena(ptr) {
            return;
        }
        // SAFETY: `ptr` did not come from the arena, so `System` allocated it with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// This thread allocates from the arena while one of these lives (its drop switches back, even
/// if the build should unwind).
struct Building;

impl Building {
    fn start() -> Self {
        BUILDING.set(true);
        Building
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        BUILDING.set(false);
    }
}

/// The mapping an arena serves from, registered as the arena while it lives.
struct Arena {
    map: Mapping,
}

impl Arena {
    fn new(len: usize, pages: Pages) -> Result<Self, String> {
        let map = Mapping::new(len, HUGE, false)?;
        map.advise(match pages {
            Pages::Small => libc::MADV_NOHUGEPAGE,
            Pages::Thp => libc::MADV_HUGEPAGE,
        })?;
        let start = map.ptr as usize;
        if ARENA_START
            .compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err("an arena is already in use".to_owned());
        }
        ARENA_NEXT.store(start, Ordering::SeqCst);
        ARENA_END.store(start + len, Ordering::SeqCst);
        Ok(Self { map })
    }

    fn used(&self) -> usize {
        ARENA_NEXT.load(Ordering::SeqCst) - self.map.ptr as usize
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        ARENA_END.store(0, Ordering::SeqCst);
        ARENA_START.store(0, Ordering::SeqCst);
        ARENA_NEXT.store(0, Ordering::SeqCst);
        // `map` is unmapped after this.
    }
}

/// A request state built in an arena of its own. Fields drop in order: the state (its frees are
/// no-ops) before the arena that holds it.
struct ArenaState {
    state: reqcore::State,
    arena: Arena,
}

impl ArenaState {
    fn build(size: u64, pages: Pages) -> Result<Self, String> {
        let len = size
            .checked_add(size / 8 + 8 * MIB)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or("size too large")?;
        let arena = Arena::new(len, pages)?;
        let built = {
            let _on = Building::start();
            reqcore::State::build(size)
        };
        let state = built.map_err(|e| format!("building the {} state: {e}", size_name(size)))?;
        Ok(Self { state, arena })
    }

    /// Percent of the used part of the arena that huge pages back (None without /proc).
    fn huge_pct(&self) -> Option<u64> {
        let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let kib = smaps_huge_kib(&text, self.arena.map.ptr as usize)?;
        let used = u64::try_from(self.arena.used()).ok()?.max(1);
        Some((kib.saturating_mul(KIB).min(used)) * 100 / used)
    }
}

/// The request series at one state size: build the state (every page written), then for each W
/// fork a child per request that runs the shared handler on its copy; the parent checks every
/// checksum. A wrong one is an error: the run stops rather than report a number.
fn measure_requests(slot: &Slot, size: u64, pages: Pages, quick: bool) -> Result<(), String> {
    let p = pages.name();
    println!("PROGRESS reqstate size={size} pages={p}");
    let t = now_ns();
    let mut warm = ArenaState::build(size, pages)?;
    let build_ms = (now_ns() - t) / 1_000_000;
    let pct = warm.huge_pct();
    let huge = pct.map_or_else(String::new, |p| format!(" huge_pct={p}"));
    println!(
        "INFO reqstate size={size} pages={p} records={} heap_bytes={} build_ms={build_ms}{huge}",
        warm.state.records(),
        warm.state.heap_bytes()
    );
    if let Some(w) = huge_warning(size, pages, pct) {
        println!("{w}");
    }
    let n = reqcore::samples(size, quick);
    for (&writes, &kind) in reqcore::WRITES.iter().zip(reqcore::KINDS.iter()) {
        println!("PROGRESS request size={size} pages={p} n={n} writes={writes}");
        let mut costs = Vec::with_capacity(n);
        for i in 0..reqcore::WARMUP + n {
            let req =
                reqcore::Request::new(reqcore::request_seed(i as u64, writes), writes, &warm.state)
                    .map_err(|e| e.to_string())?;
            let want = reqcore::expected(&warm.state, &req);
            slot.cell_at(0).store(0, Ordering::SeqCst);
            slot.cell_at(1).store(0, Ordering::SeqCst);
            let t0 = now_ns();
            // SAFETY: the child runs the handler on its own copy of the state (no allocation,
            // no lock), stores to the shared page and calls _exit; it never returns into code
            // that could observe the fork.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let c = reqcore::handle(&mut warm.state, &req);
                slot.cell_at(0).store(c, Ordering::SeqCst);
                slot.cell_at(1).store(1, Ordering::SeqCst);
                // SAFETY: ends the child at once, without running the parent's exit handlers.
                unsafe { libc::_exit(0) };
            }
            if pid < 0 {
                return Err(os_error("fork"));
            }
            reap(pid)?;
            let t1 = now_ns();
            if slot.cell_at(1).load(Ordering::SeqCst) != 1 {
                return Err("a request's child exited without its checksum".to_owned());
            }
            let got = slot.cell_at(0).load(Ordering::SeqCst);
            if got != want {
                return Err(format!(
                    "request {i} (W={writes}) at {}, {p}: the child answered {got:#x}, the \
                     direct computation {want:#x}",
                    size_name(size)
                ));
            }
            if i >= reqcore::WARMUP {
                costs.push(t1 - t0);
            }
        }
        println!("{}", result_line(kind, size, pages, &mut costs, &huge));
    }
    drop(warm);
    Ok(())
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn uname_release() -> String {
    // SAFETY: an all-zero utsname is a valid value to be overwritten.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "?".to_owned();
    }
    // SAFETY: uname NUL-terminates `release` inside the array.
    unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Mounts a pseudo file system (pid 1 only); a failure is reported and the run goes on.
fn mount(fstype: &str, target: &str) {
    let _ = std::fs::create_dir_all(target);
    let src = std::ffi::CString::new(fstype).expect("no NUL");
    let dst = std::ffi::CString::new(target).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no mount data.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), src.as_ptr(), 0, ptr::null()) };
    if rc != 0 {
        println!("INFO mount_failed={target} error={}", os_error("mount"));
    }
}

fn info(pid1: bool) {
    let mut line = format!(
        "INFO kernel={} pid1={pid1} ram={} cpus={}",
        uname_release(),
        total_ram(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    if let Some(cs) =
        read_trimmed("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    {
        let _ = write!(line, " clocksource={cs}");
    }
    if let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") {
        // 5-level paging (la57) makes every page walk longer; worth knowing under emulation.
        let la57 = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "la57"));
        let _ = write!(line, " cpu_la57={la57}");
    }
    if let Some(thp) = read_trimmed("/sys/kernel/mm/transparent_hugepage/enabled") {
        let mode = thp
            .split_whitespace()
            .find(|w| w.starts_with('['))
            .unwrap_or(&thp)
            .trim_matches(|c| c == '[' || c == ']');
        let _ = write!(line, " thp={mode}");
    }
    let _ = write!(line, " clock_overhead_ns={}", clock_overhead());
    println!("{line}");
}

fn run(cfg: &Config, pid1: bool) -> Result<(), String> {
    info(pid1);
    let slot = Slot::new()?;
    let ram = total_ram();
    for &pages in &cfg.pages {
        for &size in &cfg.sizes {
            #[allow(clippy::cast_precision_loss)]
            let fits = ram == 0 || (size as f64) <= ram as f64 * MAX_RAM_FRACTION;
            if !fits {
                println!(
                    "SKIP size={size} pages={} reason=\"{} does not fit in {} of RAM\"",
                    pages.name(),
                    size_name(size),
                    size_name(ram / MIB * MIB)
                );
                continue;
            }
            measure_size(&slot, cfg, size, pages)?;
        }
    }
    for &pages in &cfg.pages {
        for &size in cfg.req_sizes() {
            // The state, a little more for its arena, and the children's copies.
            #[allow(clippy::cast_precision_loss)]
            let fits = ram == 0 || (size as f64) * 1.2 <= ram as f64 * MAX_RAM_FRACTION;
            if !fits {
                println!(
                    "SKIP size={size} pages={} reason=\"a {} request state does not fit in {} of \
                     RAM\"",
                    pages.name(),
                    size_name(size),
                    size_name(ram / MIB * MIB)
                );
                continue;
            }
            measure_requests(&slot, size, pages, cfg.quick)?;
        }
    }
    Ok(())
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; as pid 1 we may power the machine off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot() failed: pid 1 must not return, so wait for QEMU's timeout.
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

fn main() {
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    if pid1 {
        mount("proc", "/proc");
        mount("sysfs", "/sys");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match parse_args(&args, pid1).and_then(|cfg| run(&cfg, pid1)) {
        Ok(()) => {
            println!("DONE");
            0
        }
        Err(e) => {
            println!("ERROR {e}");
            1
        }
    };
    if pid1 {
        power_off();
    }
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&v, 100), 100);
        assert_eq!(percentile(&[7], 50), 7);
        assert_eq!(percentile(&[7], 99), 7);
        let v = [1, 2, 3, 4];
        assert_eq!(percentile(&v, 50), 2);
        assert_eq!(percentile(&v, 99), 4);
        let v: Vec<u64> = (1..=40).collect();
        assert_eq!(percentile(&v, 99), 40);
        let v: Vec<u64> = (1..=200).collect();
        assert_eq!(percentile(&v, 99), 198);
    }

    #[test]
    fn result_line_sorts_and_summarises() {
        let mut s = vec![30, 10, 20];
        let line = result_line("fork_parent", 2 * MIB, Pages::Thp, &mut s, " huge_pct=100");
        assert_eq!(
            line,
            "RESULT kind=fork_parent size=2097152 pages=thp n=3 p50_ns=20 p99_ns=30 min_ns=10 \
             max_ns=30 mean_ns=20 huge_pct=100"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2M"), Some(2 * MIB));
        assert_eq!(parse_size("16MiB"), Some(16 * MIB));
        assert_eq!(parse_size("1G"), Some(GIB));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("3X"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(size_name(GIB), "1 GiB");
        assert_eq!(size_name(1536 * KIB), "1536 KiB");
        assert_eq!(size_name(100), "100 B");
    }

    #[test]
    fn arguments() {
        let a = |s: &[&str]| {
            parse_args(
                &s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
                false,
            )
        };
        let d = a(&[]).unwrap();
        assert!(!d.quick);
        assert_eq!(d.sizes, DEFAULT_SIZES);
        let c = a(&["--quick", "--sizes", "2M,1G", "--pages", "thp"]).unwrap();
        assert!(c.quick);
        assert_eq!(c.sizes, [2 * MIB, GIB]);
        assert_eq!(c.pages, [Pages::Thp]);
        assert!(a(&["--bogus"]).is_err());
        let as_init = parse_args(&["no5lvl".to_owned(), "--quick".to_owned()], true).unwrap();
        assert!(as_init.quick, "pid 1 skips boot options it does not know");
        assert!(a(&["--sizes"]).is_err());
        assert!(a(&["--pages", "1g"]).is_err());
        assert_eq!(d.req_sizes(), reqcore::SIZES);
        assert_eq!(c.req_sizes(), reqcore::QUICK_SIZES);
        assert_eq!(
            a(&["--req-sizes", "2M,1G"]).unwrap().req_sizes(),
            [2 * MIB, GIB]
        );
        assert!(a(&["--req-sizes", "none"]).unwrap().req_sizes().is_empty());
        assert!(a(&["--req-sizes", "2Q"]).is_err());
        assert!(a(&["--req-sizes"]).is_err());
    }

    #[test]
    fn fewer_samples_for_big_sizes() {
        assert!(counts(GIB, false).fork < counts(2 * MIB, false).fork);
        assert!(counts(GIB, true).fork <= counts(GIB, false).fork);
        assert_eq!(counts(GIB, false).warmup, 1);
    }

    #[test]
    fn spawns_work_natively() {
        // A functional check only (no timing assertions): every kind produces samples.
        let slot = Slot::new().unwrap();
        let c = Counts {
            fork: 2,
            vfork: 2,
            thread: 2,
            write: 2,
            warmup: 1,
        };
        let f = measure_fork(&slot, c).unwrap();
        assert_eq!(f.first.len(), 2);
        assert!(f.first.iter().all(|&t| t > 0));
        assert_eq!(measure_vfork(&slot, c).unwrap().round.len(), 2);
        assert_eq!(measure_thread(&slot, c).unwrap().first.len(), 2);
    }

    const SMAPS: &str = "\
55d4c6a00000-55d4c6c00000 rw-p 00000000 00:00 0                          [heap]
Size:               2048 kB
AnonHugePages:      2048 kB
7f0000000000-7f0040000000 rw-p 00000000 00:00 0 
Size:            1048576 kB
Rss:             1048576 kB
AnonHugePages:    522240 kB
THPeligible:    1
7f0040000000-7f0040001000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
Size:                  4 kB
AnonHugePages:         0 kB
";

    #[test]
    fn smaps_of_one_mapping() {
        assert_eq!(smaps_huge_kib(SMAPS, 0x7f00_0000_0000), Some(522_240));
        assert_eq!(smaps_huge_kib(SMAPS, 0x7f00_3fff_ffff), Some(522_240));
        assert_eq!(smaps_huge_kib(SMAPS, 0x7f00_4000_0000), Some(0));
        assert_eq!(smaps_huge_kib(SMAPS, 0x55d4_c6a0_1000), Some(2048));
        assert_eq!(smaps_huge_kib(SMAPS, 0x1000), None, "no mapping there");
        assert_eq!(smaps_huge_kib("", 0x1000), None);
        // Field lines are not headers, even the ones with a dash.
        assert_eq!(smaps_range("VmFlags: rd wr mr mw me ac sd"), None);
        assert_eq!(smaps_range("Size:               2048 kB"), None);
        assert_eq!(
            smaps_range("ffff-1000 rw-p"),
            None,
            "an empty or reversed range"
        );
    }

    #[test]
    fn huge_pages_of_a_real_mapping() {
        // Needs /proc (every Linux host has it); 4 KiB pages were asked for, so none are huge.
        let m = Mapping::new(HUGE, HUGE, false).unwrap();
        m.advise(libc::MADV_NOHUGEPAGE).unwrap();
        m.populate();
        assert_eq!(huge_pct(&m), Some(0));
        assert_eq!(huge_warning(2 * MIB, Pages::Small, huge_pct(&m)), None);
    }

    #[test]
    fn warnings_for_pages_not_as_asked() {
        assert_eq!(huge_warning(GIB, Pages::Thp, Some(100)), None);
        assert_eq!(huge_warning(GIB, Pages::Small, Some(0)), None);
        assert_eq!(huge_warning(GIB, Pages::Thp, None), None);
        let w = huge_warning(16 * MIB, Pages::Thp, Some(62)).unwrap();
        assert_eq!(
            w,
            "WARN size=16777216 pages=thp reason=\"huge pages back 62% of the 16 MiB region \
             (AnonHugePages in /proc/self/smaps)\""
        );
        assert!(huge_warning(2 * MIB, Pages::Small, Some(100)).is_some());
        assert_eq!(split_warning(GIB, Pages::Thp, Some(100), Some(100)), None);
        assert_eq!(split_warning(GIB, Pages::Thp, Some(100), None), None);
        assert_eq!(split_warning(GIB, Pages::Small, Some(0), Some(0)), None);
        assert_eq!(
            split_warning(GIB, Pages::Thp, Some(100), Some(99)).unwrap(),
            "WARN size=1073741824 pages=thp reason=\"huge pages backed 100% of the 1 GiB region \
             before the first-write samples, 99% after\""
        );
    }

    #[test]
    fn write_offsets_stay_inside_and_pair_up() {
        let len = 2 * HUGE;
        for i in 0..2000 {
            let (a, b) = write_offsets(len, i);
            let b = b.unwrap();
            assert!(a < len && b < len, "{i}: {a} {b}");
            assert_ne!(a, b);
            assert_eq!(a / HUGE, b / HUGE, "same 2 MiB");
            assert_eq!(a % PAGE, 0);
        }
        assert_ne!(write_offsets(len, 0).0, write_offsets(len, 1).0);
        // Odd page counts: the last page's neighbour is the one before it.
        assert_eq!(write_offsets(5 * PAGE, 3), (4 * PAGE, Some(3 * PAGE)));
        assert_eq!(write_offsets(PAGE, 5), (0, None));
    }

    #[test]
    fn requests_work_natively() {
        // A functional check (no timing assertions): every request's checksum matched the
        // direct computation (a mismatch is an error), with both page kinds, and the arena is
        // gone afterwards.
        let slot = Slot::new().unwrap();
        for pages in [Pages::Small, Pages::Thp] {
            measure_requests(&slot, reqcore::MIN_BYTES, pages, true).unwrap();
            assert_eq!(ARENA_START.load(Ordering::SeqCst), 0);
        }
        // The arena serves only while building, and frees there are no-ops.
        let warm = ArenaState::build(reqcore::MIN_BYTES, Pages::Small).unwrap();
        assert!(warm.arena.used() as u64 >= warm.state.heap_bytes());
        let outside = std::hint::black_box(vec![1u8; 100]);
        assert!(!in_arena(outside.as_ptr().cast_mut()));
        assert!(matches!(
            ArenaState::build(reqcore::MIN_BYTES, Pages::Small),
            Err(e) if e.contains("already in use")
        ));
        drop(warm);
        assert!(
            ArenaState::build(reqcore::MIN_BYTES - 1, Pages::Small)
                .is_err_and(|e| e.contains("below the smallest"))
        );
    }

    #[test]
    fn fork_writes_work_natively() {
        // A functional check only (no timing assertions): every sample is reported, the child's
        // writes stay in the child.
        let slot = Slot::new().unwrap();
        let c = Counts {
            fork: 3,
            vfork: 0,
            thread: 0,
            write: 3,
            warmup: 1,
        };
        for advice in [libc::MADV_NOHUGEPAGE, libc::MADV_HUGEPAGE] {
            let region = Mapping::new(2 * HUGE, HUGE, false).unwrap();
            region.advise(advice).unwrap();
            region.populate();
            let w = measure_fork_writes(&slot, &region, c).unwrap();
            assert_eq!(w.first.len(), 3);
            assert_eq!(w.second.len(), 3);
            assert!(w.first.iter().all(|&t| t > 0));
            for off in (0..region.len).step_by(PAGE) {
                // SAFETY: `off < len`, inside the mapping.
                let v = unsafe { ptr::read_volatile(region.ptr.add(off)) };
                assert_eq!(
                    v, 1,
                    "advice {advice}: the parent's page at {off} is unchanged"
                );
            }
        }
    }
}
