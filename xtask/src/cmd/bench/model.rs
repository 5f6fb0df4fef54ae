//! The results model shared by every part of the benchmark, and the parser for the Linux peer's
//! `RESULT` lines.
//!
//! A [`Measurement`] is one figure: a system (`linux`, `native`, later `stencil`), a mode (the
//! page size for Linux: `4k` or `thp`; Stencil's share mode: `share` or `copy`), a kind (what was
//! timed, e.g. `fork_child_first`), a size (bytes of populated memory or template), p50 and p99
//! over `n` samples, and the unit (nanoseconds, or guest instructions under `-icount`).

use std::collections::HashMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Wall-clock nanoseconds (the guest's clock under TCG/KVM, or the host's).
    Ns,
    /// Guest instructions (`-icount shift=0,sleep=off`: one guest nanosecond per instruction).
    Instructions,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::Instructions => "instructions",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub system: String,
    pub mode: String,
    pub kind: String,
    pub size: u64,
    pub p50: f64,
    pub p99: f64,
    pub n: u32,
    pub unit: Unit,
}

#[cfg(test)]
impl Measurement {
    /// A measurement for unit tests.
    pub fn for_test(
        (system, mode, kind): (&str, &str, &str),
        size: u64,
        (p50, p99): (f64, f64),
        n: u32,
        unit: Unit,
    ) -> Measurement {
        Measurement {
            system: system.to_owned(),
            mode: mode.to_owned(),
            kind: kind.to_owned(),
            size,
            p50,
            p99,
            n,
            unit,
        }
    }
}

/// What each kind measures, in the order tables show them. The Stencil part adds its own kinds
/// (e.g. `spawn_first`); unknown kinds are shown after these, by name.
pub const KINDS: &[(&str, &str)] = &[
    ("spawn_first", "spawn → first instr."),
    ("fork_parent", "fork (parent ret.)"),
    ("fork_child_first", "fork → child 1st"),
    ("fork_roundtrip", "fork+exit+wait"),
    ("vfork_child_first", "vfork → child 1st"),
    ("vfork_roundtrip", "vfork+exit+wait"),
    ("thread_parent", "thread (parent ret.)"),
    ("thread_first", "thread → 1st instr."),
    ("thread_roundtrip", "thread create+join"),
    ("first_write", "first write"),
    ("fork_first_write", "fork: child 1st write"),
    ("fork_second_write", "fork: child 2nd write"),
];

/// The kinds in the terminal table (the CSV has all of them).
pub const TABLE_KINDS: &[&str] = &[
    "spawn_first",
    "fork_parent",
    "fork_child_first",
    "fork_roundtrip",
    "vfork_child_first",
    "thread_first",
    "first_write",
    "fork_first_write",
];

/// Stencil's warm-heap series (`apps/spawnbench`, `heap.rs`): `heap` is `share` mode, `heap-copy`
/// `copy` mode, spawning from a zygote whose heap holds `size` bytes of live objects. They have a
/// table of their own ([`super::report::heap_table`]).
pub const HEAP_MODES: &[(&str, &str)] = &[("heap", "share"), ("heap-copy", "copy")];

/// Is `m` one of the warm-heap series?
pub fn is_heap(m: &Measurement) -> bool {
    m.system == "stencil" && HEAP_MODES.iter().any(|(mode, _)| *mode == m.mode)
}

/// The request series' kinds (`request_wW`: a whole request with W page writes, from a warm
/// state of `size` bytes; issue #13). They have a table of their own
/// ([`super::report::request_table`]); the mode is `share`/`copy` (Stencil) or `4k`/`thp`
/// (Linux).
pub const REQUEST_KIND_PREFIX: &str = "request_w";

/// W of a request kind (`request_w16` → 16).
pub fn request_writes(kind: &str) -> Option<u32> {
    kind.strip_prefix(REQUEST_KIND_PREFIX)?.parse().ok()
}

/// Is `m` one of the request series?
pub fn is_request(m: &Measurement) -> bool {
    request_writes(&m.kind).is_some()
}

pub fn kind_label(kind: &str) -> &str {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(kind, |(_, label)| label)
}

/// `key=value` fields of one line; words without `=` are skipped, and a value in double quotes
/// may contain spaces.
pub fn fields(rest: &str) -> HashMap<&str, &str> {
    let mut map = HashMap::new();
    let mut s = rest.trim_start();
    while !s.is_empty() {
        let word_end = s.find(' ').unwrap_or(s.len());
        let Some(eq) = s[..word_end].find('=') else {
            s = s[word_end..].trim_start();
            continue;
        };
        let key = &s[..eq];
        let after = &s[eq + 1..];
        let (value, next) = match after.strip_prefix('"') {
            Some(q) => match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            },
            None => {
                let sp = after.find(' ').unwrap_or(after.len());
                (&after[..sp], &after[sp..])
            }
        };
        map.insert(key, value);
        s = next.trim_start();
    }
    map
}

/// Parses one `RESULT kind=.. size=.. pages=.. n=.. p50_ns=.. p99_ns=..` line of the Linux peer.
/// Other lines give `None`; so does a RESULT line with a missing or malformed field (the caller
/// reports those).
pub fn parse_result(line: &str, system: &str, unit: Unit) -> Option<Measurement> {
    let rest = line.trim().strip_prefix("RESULT ")?;
    let f = fields(rest);
    Some(Measurement {
        system: system.to_owned(),
        mode: (*f.get("pages")?).to_owned(),
        kind: (*f.get("kind")?).to_owned(),
        size: f.get("size")?.parse().ok()?,
        p50: f.get("p50_ns")?.parse().ok()?,
        p99: f.get("p99_ns")?.parse().ok()?,
        n: f.get("n")?.parse().ok()?,
        unit,
    })
}

/// A value for humans: `438 µs`, `26.9 ms`, `187 k`, `33.4 M` (three significant digits).
pub fn human(v: f64, unit: Unit) -> String {
    let scales: &[(f64, &str)] = match unit {
        Unit::Ns => &[(1e9, "s"), (1e6, "ms"), (1e3, "µs"), (1.0, "ns")],
        Unit::Instructions => &[(1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")],
    };
    let (div, suffix) = scales
        .iter()
        .copied()
        .find(|(d, _)| v >= *d)
        .unwrap_or((1.0, scales[scales.len() - 1].1));
    let x = v / div;
    let digits = if x >= 100.0 {
        0
    } else if x >= 10.0 {
        1
    } else {
        2
    };
    let num = format!("{x:.digits$}");
    if suffix.is_empty() {
        num
    } else {
        format!("{num} {suffix}")
    }
}

/// `2 MiB`, `1 GiB`, ... (exact binary sizes), else bytes.
pub fn size_name(size: u64) -> String {
    for (shift, name) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        let unit = 1u64 << shift;
        if size >= unit && size.is_multiple_of(unit) {
            return format!("{} {name}", size / unit);
        }
    }
    format!("{size} B")
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}: p50 {} p99 {} (n={})",
            self.system,
            self.mode,
            self.kind,
            size_name(self.size),
            human(self.p50, self.unit),
            human(self.p99, self.unit),
            self.n
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "RESULT kind=fork_child_first size=1073741824 pages=4k n=40 \
                        p50_ns=26900000 p99_ns=30100000 min_ns=1 max_ns=2 mean_ns=3 huge_pct=0";

    #[test]
    fn parses_result_lines() {
        let m = parse_result(LINE, "linux", Unit::Ns).unwrap();
        assert_eq!(
            m,
            Measurement {
                system: "linux".to_owned(),
                mode: "4k".to_owned(),
                kind: "fork_child_first".to_owned(),
                size: 1 << 30,
                p50: 26.9e6,
                p99: 30.1e6,
                n: 40,
                unit: Unit::Ns,
            }
        );
        // Serial noise around the line (a carriage return) is fine.
        let with_cr = format!("{LINE}\r");
        assert!(parse_result(&with_cr, "linux", Unit::Ns).is_some());
        assert_eq!(
            parse_result(LINE, "linux", Unit::Instructions)
                .unwrap()
                .unit,
            Unit::Instructions
        );
    }

    #[test]
    fn rejects_other_and_broken_lines() {
        assert!(parse_result("INFO kernel=6.1", "linux", Unit::Ns).is_none());
        assert!(parse_result("[    1.0] RESULT kind=x", "linux", Unit::Ns).is_none());
        let missing = LINE.replace(" p99_ns=30100000", "");
        assert!(parse_result(&missing, "linux", Unit::Ns).is_none());
        let bad = LINE.replace("n=40", "n=forty");
        assert!(parse_result(&bad, "linux", Unit::Ns).is_none());
    }

    #[test]
    fn quoted_fields() {
        let f = fields("fork size=1 reason=\"does not fit\" x pages=4k");
        assert_eq!(f["reason"], "does not fit");
        assert_eq!(f.len(), 3);
        assert_eq!(f["pages"], "4k");
        assert_eq!(f["size"], "1");
    }

    #[test]
    fn request_kinds() {
        assert_eq!(request_writes("request_w256"), Some(256));
        assert_eq!(request_writes("request_w0"), Some(0));
        assert_eq!(request_writes("request_wx"), None);
        assert_eq!(request_writes("spawn_first"), None);
        let m = parse_result(
            "RESULT kind=request_w16 size=16777216 pages=thp n=200 p50_ns=5 p99_ns=6",
            "linux",
            Unit::Ns,
        )
        .unwrap();
        assert!(is_request(&m));
    }

    #[test]
    fn human_values() {
        assert_eq!(human(438_000.0, Unit::Ns), "438 µs");
        assert_eq!(human(26_900_000.0, Unit::Ns), "26.9 ms");
        assert_eq!(human(3_800_000.0, Unit::Ns), "3.80 ms");
        assert_eq!(human(55.0, Unit::Ns), "55.0 ns");
        assert_eq!(human(187_000.0, Unit::Instructions), "187 k");
        assert_eq!(human(33_400_000.0, Unit::Instructions), "33.4 M");
        assert_eq!(human(900.0, Unit::Instructions), "900");
        assert_eq!(size_name(2 << 20), "2 MiB");
        assert_eq!(size_name(64 << 30), "64 GiB");
        assert_eq!(size_name(1000), "1000 B");
    }
}
