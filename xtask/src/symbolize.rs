//! Turns the raw addresses of libos's fault reports into `function (file:line)`.
//!
//! libos prints a CPU exception as `... at RIP 0x...`, a stack overflow as `(RIP 0x..., RSP ...)`
//! and, after either or after a panic, a frame-pointer backtrace: a `backtrace (...)` header and
//! one `  #N  0x...` line per return address (libos/src/arch/x86_64/traps.rs, libos/src/rt.rs).
//! xtask booted the ELF, so it reads the ELF's DWARF with the `addr2line` crate and prints each
//! address with its function, file and line (inlined frames too), instead of asking the user to
//! run `addr2line` by hand.

use std::fmt::Write as _;
use std::path::Path;

/// One address found in a fault report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    /// The faulting instruction (`RIP 0x...`).
    Rip(u64),
    /// A return address from the backtrace (`#N 0x...`): it points after the call, so the call
    /// itself is looked up at `addr - 1`.
    Return { depth: u32, addr: u64 },
}

impl Addr {
    fn probe(self) -> u64 {
        match self {
            Addr::Rip(a) => a,
            Addr::Return { addr, .. } => addr.saturating_sub(1),
        }
    }

    fn label(self) -> String {
        match self {
            Addr::Rip(a) => format!("RIP {a:#018x}"),
            Addr::Return { depth, addr } => format!("#{depth:<2} {addr:#018x}"),
        }
    }
}

/// Reads a `0x`-prefixed hex number at the start of `s` (digits up to the first non-hex char).
fn hex_prefix(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x")?;
    let end = digits
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(digits.len());
    u64::from_str_radix(&digits[..end], 16).ok()
}

/// Every report address in `serial`, in order: each `RIP 0x...` and each backtrace line
/// (`#N 0x...` after a `backtrace` header, up to the first line that is not a frame).
pub fn addresses(serial: &str) -> Vec<Addr> {
    let mut found = Vec::new();
    let mut in_backtrace = false;
    for line in serial.lines() {
        let t = line.trim();
        if in_backtrace {
            if let Some(rest) = t.strip_prefix('#') {
                let mut words = rest.split_whitespace();
                let depth = words.next().and_then(|d| d.parse::<u32>().ok());
                let addr = words.next().and_then(hex_prefix);
                if let (Some(depth), Some(addr)) = (depth, addr) {
                    found.push(Addr::Return { depth, addr });
                    continue;
                }
            }
            // "(the frame above repeats N more times)" belongs to the backtrace too.
            if t.starts_with("(the frame above repeats") {
                continue;
            }
            in_backtrace = false;
        }
        if t.starts_with("backtrace") {
            in_backtrace = true;
            continue;
        }
        // libos writes `at RIP 0x...` (exception, unexpected interrupt) and `(RIP 0x...`
        // (stack overflow).
        let mut rest = line;
        while let Some(at) = rest.find("RIP 0x") {
            let before = &rest[..at];
            let after = &rest[at + "RIP ".len()..];
            if (before.ends_with("at ") || before.ends_with('('))
                && let Some(a) = hex_prefix(after)
            {
                found.push(Addr::Rip(a));
            }
            rest = &after[2..];
        }
    }
    found
}

/// The standard library's sources are named `/rustc/<commit>/library/...`; the commit says
/// nothing to a reader, so it is dropped (`library/core/src/ptr/mod.rs`).
fn shorten_std_path(file: &str) -> &str {
    file.strip_prefix("/rustc/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(file, |(_, path)| path)
}

/// At most this many addresses are symbolized per run (libos cuts one backtrace at 256 frames; a
/// guest that prints report-like lines in a loop must not flood the terminal).
const MAX_ADDRS: usize = 300;

/// Frames (innermost first) for one address: `function (file:line)`.
pub trait Lookup {
    fn frames(&self, probe: u64) -> Vec<String>;
}

/// DWARF lookup in an ELF through `addr2line`.
pub struct Elf {
    loader: addr2line::Loader,
    /// Paths under this directory are printed relative to it.
    strip: Option<String>,
}

impl Elf {
    /// Opens `elf`'s debug info; file names under `strip` are shown relative to it.
    pub fn open(elf: &Path, strip: Option<&Path>) -> Result<Self, String> {
        let loader = addr2line::Loader::new(elf).map_err(|e| e.to_string())?;
        let strip = strip.map(|p| {
            let mut s = p.display().to_string();
            if !s.ends_with('/') {
                s.push('/');
            }
            s
        });
        Ok(Self { loader, strip })
    }

    fn file<'a>(&self, file: &'a str) -> &'a str {
        if let Some(prefix) = &self.strip
            && let Some(rel) = file.strip_prefix(prefix.as_str())
        {
            return rel;
        }
        shorten_std_path(file)
    }
}

impl Lookup for Elf {
    fn frames(&self, probe: u64) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(mut frames) = self.loader.find_frames(probe) {
            while let Ok(Some(frame)) = frames.next() {
                let name = frame
                    .function
                    .as_ref()
                    .and_then(|f| f.demangle().ok())
                    .map(|n| n.into_owned())
                    .unwrap_or_else(|| "??".to_owned());
                let place = match &frame.location {
                    Some(addr2line::Location {
                        file: Some(file),
                        line: Some(line),
                        ..
                    }) => format!(" ({}:{line})", self.file(file)),
                    Some(addr2line::Location {
                        file: Some(file), ..
                    }) => format!(" ({})", self.file(file)),
                    _ => String::new(),
                };
                out.push(format!("{name}{place}"));
            }
        }
        if out.is_empty()
            && let Some(sym) = self.loader.find_symbol(probe)
        {
            out.push(addr2line::demangle_auto(sym.into(), None).into_owned());
        }
        out
    }
}

/// The symbolized report for `serial`'s addresses (None if it has none), e.g.
///
/// ```text
/// stencil: fault report, symbolized from target/x86_64-unknown-none/debug/test-pagefault:
///   RIP 0x0000000000201a3c  test_pagefault::main (tests/apps/pagefault/src/main.rs:16)
///   #0  0x0000000000203f11  libos::rt::run_main (libos/src/rt.rs:60)
/// ```
pub fn report(serial: &str, elf_name: &str, lookup: &dyn Lookup) -> Option<String> {
    let addrs = addresses(serial);
    if addrs.is_empty() {
        return None;
    }
    let mut out = format!("stencil: fault report, symbolized from {elf_name}:\n");
    for &a in addrs.iter().take(MAX_ADDRS) {
        let frames = lookup.frames(a.probe());
        let label = a.label();
        match frames.split_first() {
            None => {
                let _ = writeln!(out, "  {label}  ?? (no debug info for this address)");
            }
            Some((first, inlined)) => {
                let _ = writeln!(out, "  {label}  {first}");
                for f in inlined {
                    let _ = writeln!(
                        out,
                        "  {:width$}  inlined into {f}",
                        "",
                        width = label.len()
                    );
                }
            }
        }
    }
    if addrs.len() > MAX_ADDRS {
        let _ = writeln!(
            out,
            "  ... and {} more addresses (not symbolized)",
            addrs.len() - MAX_ADDRS
        );
    }
    Some(out)
}

/// [`report`] with `elf`'s debug info; a note instead if the ELF cannot be read.
pub fn report_for_elf(serial: &str, elf: &Path, root: &Path) -> Option<String> {
    if addresses(serial).is_empty() {
        return None;
    }
    let shown = elf.strip_prefix(root).unwrap_or(elf).display().to_string();
    match Elf::open(elf, Some(root)) {
        Ok(e) => report(serial, &shown, &e),
        Err(why) => Some(format!(
            "stencil: cannot symbolize the fault report: cannot read debug info of {shown}: \
             {why}\n"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exactly what libos prints (traps.rs / rt.rs), with a page fault and a panic.
    const FAULT: &str = "reading 0x123456789000

EXCEPTION: page fault (#PF, vector 14), error code 0x4
  at RIP 0x0000000000203a1c, RSP 0xffff800000107f00, RFLAGS 0x10046
  page fault address (CR2) 0x0000123456789000: read of an unmapped page
  rax 0x0000000000000000 rbx 0x0000000000000000 rcx 0x0000000000000000 rdx 0x0
backtrace (return addresses; cargo xtask names each function):
  #0  0x0000000000203b00
  #1  0x0000000000204c10
      (the frame above repeats 3 more times)
  #5  0x0000000000205000
stencil: exit
";

    #[test]
    fn finds_rip_and_backtrace() {
        assert_eq!(
            addresses(FAULT),
            [
                Addr::Rip(0x203a1c),
                Addr::Return {
                    depth: 0,
                    addr: 0x203b00
                },
                Addr::Return {
                    depth: 1,
                    addr: 0x204c10
                },
                Addr::Return {
                    depth: 5,
                    addr: 0x205000
                },
            ]
        );
        let overflow = "[task 3] STACK OVERFLOW: task stack hit its guard page at 0x7000 (RIP 0x2010, RSP 0x7008)\nbacktrace (x):\n";
        assert_eq!(addresses(overflow), [Addr::Rip(0x2010)]);
        assert!(addresses("Hello from Stencil\n#1 0x10 not after a header\n").is_empty());
        assert!(addresses("RIP 0xzz\nbacktrace\n  #x 0x10\n").is_empty());
        // Only libos's own forms count, not any mention of a RIP.
        assert!(addresses("my RIP 0x1234 is fine\n").is_empty());
        assert_eq!(
            addresses("unexpected interrupt vector 3 at RIP 0x42\n"),
            [Addr::Rip(0x42)]
        );
    }

    #[test]
    fn std_paths_lose_the_commit() {
        assert_eq!(
            shorten_std_path("/rustc/5980761/library/core/src/ptr/mod.rs"),
            "library/core/src/ptr/mod.rs"
        );
        assert_eq!(shorten_std_path("/home/a/b.rs"), "/home/a/b.rs");
        assert_eq!(shorten_std_path("/rustc/x"), "/rustc/x");
    }

    struct Fake;

    impl Lookup for Fake {
        fn frames(&self, probe: u64) -> Vec<String> {
            match probe {
                0x203a1c => vec![
                    "core::ptr::read_volatile (core/src/ptr/mod.rs:1)".to_owned(),
                    "test_pagefault::main (tests/apps/pagefault/src/main.rs:16)".to_owned(),
                ],
                0x203aff => vec!["libos::rt::run (libos/src/rt.rs:60)".to_owned()],
                _ => vec![],
            }
        }
    }

    #[test]
    fn report_lines() {
        let r = report(FAULT, "app", &Fake).unwrap();
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "stencil: fault report, symbolized from app:");
        assert_eq!(
            lines[1],
            "  RIP 0x0000000000203a1c  core::ptr::read_volatile (core/src/ptr/mod.rs:1)"
        );
        assert!(lines[2].ends_with(
            "  inlined into test_pagefault::main (tests/apps/pagefault/src/main.rs:16)"
        ));
        // A return address is looked up one byte earlier (inside the call instruction).
        assert_eq!(
            lines[3],
            "  #0  0x0000000000203b00  libos::rt::run (libos/src/rt.rs:60)"
        );
        assert!(lines[4].ends_with("?? (no debug info for this address)"));
        assert_eq!(lines.len(), 6);
        assert_eq!(report("no fault here\n", "app", &Fake), None);
        let flood = "  at RIP 0x1\n".repeat(MAX_ADDRS + 5);
        let r = report(&flood, "app", &Fake).unwrap();
        assert_eq!(r.lines().count(), 1 + MAX_ADDRS + 1);
        assert!(
            r.trim_end()
                .ends_with("... and 5 more addresses (not symbolized)")
        );
    }

    /// xtask's own binary has DWARF (host test builds are dev builds): a function of this file
    /// must symbolize to its own name and this file.
    #[test]
    fn symbolizes_a_real_elf() {
        let exe = std::env::current_exe().unwrap();
        let elf = Elf::open(&exe, None).unwrap();
        // The address of a function in this crate; the loader's base makes it file-relative.
        let addr = hex_prefix as fn(&str) -> Option<u64> as usize as u64;
        let base = elf.loader.relative_address_base();
        let frames = elf.frames(addr.wrapping_sub(aslr_slide(&exe)).wrapping_add(base));
        let joined = frames.join(" | ");
        assert!(
            joined.contains("hex_prefix") && joined.contains("symbolize.rs"),
            "{joined}"
        );
    }

    /// How far the loaded executable is from its link address (PIE + ASLR): from
    /// /proc/self/maps, the first mapping of the executable at file offset 0.
    fn aslr_slide(exe: &Path) -> u64 {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let name = exe.display().to_string();
        let line = maps
            .lines()
            .find(|l| l.ends_with(&name) && l.split_whitespace().nth(2) == Some("00000000"))
            .unwrap();
        let start = line.split('-').next().unwrap();
        u64::from_str_radix(start, 16).unwrap()
    }
}
