//! The terminal table and the CSV file.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::model::{self, Measurement, TABLE_KINDS};

/// Systems in the order they are shown; others follow by name.
const SYSTEM_ORDER: &[&str] = &["stencil", "linux", "native"];

fn system_rank(s: &str) -> usize {
    SYSTEM_ORDER
        .iter()
        .position(|x| *x == s)
        .unwrap_or(SYSTEM_ORDER.len())
}

/// The distinct systems of `ms`, in display order.
pub fn systems(ms: &[Measurement]) -> Vec<String> {
    let mut v: Vec<String> = ms
        .iter()
        .map(|m| m.system.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    v.sort_by_key(|s| (system_rank(s), s.clone()));
    v
}

/// One table per system: a row per (mode, size), a column per kind (`p50 / p99`). The warm-heap
/// and request series are left out (they have [`heap_table`] and [`request_table`]).
pub fn table(ms: &[Measurement], heading: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    let ms: Vec<Measurement> = ms
        .iter()
        .filter(|m| !model::is_heap(m) && !model::is_request(m))
        .cloned()
        .collect();
    for system in systems(&ms) {
        let mine: Vec<&Measurement> = ms.iter().filter(|m| m.system == system).collect();
        // Known table kinds first, in their order, then kinds this table does not know.
        let present: BTreeSet<&str> = mine.iter().map(|m| m.kind.as_str()).collect();
        let mut kinds: Vec<&str> = TABLE_KINDS
            .iter()
            .copied()
            .filter(|k| present.contains(k))
            .collect();
        kinds.extend(
            present
                .iter()
                .copied()
                .filter(|k| !model::KINDS.iter().any(|(known, _)| known == k)),
        );
        let mut rows: Vec<(String, u64)> = mine
            .iter()
            .map(|m| (m.mode.clone(), m.size))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        rows.sort();
        let mut grid: Vec<Vec<String>> = vec![
            ["mode", "size"]
                .iter()
                .map(|s| (*s).to_owned())
                .chain(kinds.iter().map(|k| model::kind_label(k).to_owned()))
                .collect(),
        ];
        for (mode, size) in &rows {
            let mut row = vec![mode.clone(), model::size_name(*size)];
            for k in &kinds {
                let cell = mine
                    .iter()
                    .find(|m| &m.mode == mode && m.size == *size && m.kind == *k)
                    .map_or_else(
                        || "-".to_owned(),
                        |m| {
                            format!(
                                "{} / {}",
                                model::human(m.p50, m.unit),
                                model::human(m.p99, m.unit)
                            )
                        },
                    );
                row.push(cell);
            }
            grid.push(row);
        }
        render(&mut out, &heading(&system), &grid, 2);
    }
    out
}

/// Appends `grid` (a header row, then data rows) as an aligned table under `heading`: the first
/// `left` columns left-aligned, the others right-aligned.
fn render(out: &mut String, heading: &str, grid: &[Vec<String>], left: usize) {
    let Some(head) = grid.first() else {
        return;
    };
    let cols = head.len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            grid.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let _ = writeln!(out, "\n{heading}");
    for (i, row) in grid.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            if c < left {
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(line, "{}{cell}  ", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "  {}", line.trim_end());
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (cols.saturating_sub(1));
            let _ = writeln!(out, "  {}", "-".repeat(total));
        }
    }
}

/// Which Stencil mode is compared with which Linux page size in the first-write table: 4 KiB
/// templates with 4 KiB pages, 2 MiB templates with THP.
pub const FIRST_WRITE_PAIRS: &[(&str, &str)] = &[
    ("share", "4k"),
    ("copy", "4k"),
    ("share-2m", "thp"),
    ("copy-2m", "thp"),
];

/// Stencil's `first_write` over Linux's `fork_first_write` (p50s), for one pair and size of one
/// run; `None` unless both were measured, in the same unit, and Linux's is above zero.
pub fn first_write_ratio(
    ms: &[Measurement],
    stencil_mode: &str,
    linux_mode: &str,
    size: u64,
) -> Option<(f64, f64, f64)> {
    let s = find(ms, "stencil", stencil_mode, "first_write", size)?;
    let l = find(ms, "linux", linux_mode, "fork_first_write", size)?;
    (s.unit == l.unit && l.p50 > 0.0).then(|| (s.p50, l.p50, s.p50 / l.p50))
}

fn find<'a>(
    ms: &'a [Measurement],
    system: &str,
    mode: &str,
    kind: &str,
    size: u64,
) -> Option<&'a Measurement> {
    ms.iter()
        .find(|m| m.system == system && m.mode == mode && m.kind == kind && m.size == size)
}

/// `0.93x`, `12.4x`, `250x`.
pub fn ratio_text(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 10.0 {
        format!("{r:.1}x")
    } else {
        format!("{r:.2}x")
    }
}

/// The first write to an inherited page, side by side: Stencil's `first_write` (a task's first
/// write to a `Private` template page) beside the Linux guest's `fork_first_write` (a forked
/// child's copy-on-write fault) and `fork_second_write`, for every size both measured, with the
/// ratio Stencil / Linux of the p50s. Empty when no size has both.
pub fn first_write_table(ms: &[Measurement], heading: &str) -> String {
    let mut grid: Vec<Vec<String>> = vec![
        [
            "Stencil",
            "Linux",
            "size",
            "Stencil first write",
            "Linux fork: 1st write",
            "Linux 2nd write",
            "Stencil / Linux",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
    ];
    let cell = |m: Option<&Measurement>| {
        m.map_or_else(
            || "-".to_owned(),
            |m| {
                format!(
                    "{} / {}",
                    model::human(m.p50, m.unit),
                    model::human(m.p99, m.unit)
                )
            },
        )
    };
    for &(smode, lmode) in FIRST_WRITE_PAIRS {
        let sizes: BTreeSet<u64> = ms
            .iter()
            .filter(|m| m.system == "stencil" && m.mode == smode && m.kind == "first_write")
            .map(|m| m.size)
            .collect();
        for size in sizes {
            let Some((_, _, ratio)) = first_write_ratio(ms, smode, lmode, size) else {
                continue;
            };
            grid.push(vec![
                smode.to_owned(),
                lmode.to_owned(),
                model::size_name(size),
                cell(find(ms, "stencil", smode, "first_write", size)),
                cell(find(ms, "linux", lmode, "fork_first_write", size)),
                cell(find(ms, "linux", lmode, "fork_second_write", size)),
                ratio_text(ratio),
            ]);
        }
    }
    let mut out = String::new();
    if grid.len() > 1 {
        render(&mut out, heading, &grid, 3);
    }
    out
}

/// The warm-heap series' kinds, in the order of [`heap_table`]'s columns.
const HEAP_KINDS: &[(&str, &str)] = &[
    ("spawn_parent", "spawn (parent ret.)"),
    ("spawn_first", "spawn → 1st instr."),
    ("spawn_roundtrip", "spawn+exit+join"),
    ("first_write", "1st write (object)"),
    ("spawn_dirty1", "spawn, 1 page dirty"),
];

fn p50_p99(m: Option<&Measurement>) -> String {
    m.map_or_else(
        || "-".to_owned(),
        |m| {
            format!(
                "{} / {}",
                model::human(m.p50, m.unit),
                model::human(m.p99, m.unit)
            )
        },
    )
}

/// Spawning from a warm heap: a row per (heap size, mode), the seal (`Zygote::new`, once per
/// size: in the `share` row), the spawn kinds (`p50 / p99`), and in the `copy` row copy / share
/// of the `spawn → 1st instr.` p50s. Empty without warm-heap measurements.
pub fn heap_table(ms: &[Measurement], heading: &str) -> String {
    let heap: Vec<&Measurement> = ms.iter().filter(|m| model::is_heap(m)).collect();
    let sizes: BTreeSet<u64> = heap.iter().map(|m| m.size).collect();
    let mut grid: Vec<Vec<String>> = vec![
        ["heap", "mode", "seal (snapshot)"]
            .into_iter()
            .chain(HEAP_KINDS.iter().map(|(_, label)| *label))
            .chain(["copy / share"])
            .map(str::to_owned)
            .collect(),
    ];
    for size in sizes {
        let find = |mode: &str, kind: &str| {
            heap.iter()
                .copied()
                .find(|m| m.mode == mode && m.kind == kind && m.size == size)
        };
        for (i, &(mode, label)) in model::HEAP_MODES.iter().enumerate() {
            let mine: Vec<&Measurement> = heap
                .iter()
                .copied()
                .filter(|m| m.mode == mode && m.size == size)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut row = vec![
                model::size_name(size),
                label.to_owned(),
                if i == 0 {
                    p50_p99(find(mode, "seal"))
                } else {
                    String::new()
                },
            ];
            row.extend(HEAP_KINDS.iter().map(|(k, _)| p50_p99(find(mode, k))));
            let base = model::HEAP_MODES[0].0;
            row.push(
                match (i, find(base, "spawn_first"), find(mode, "spawn_first")) {
                    (1.., Some(s), Some(c)) if s.p50 > 0.0 => ratio_text(c.p50 / s.p50),
                    _ => String::new(),
                },
            );
            grid.push(row);
        }
    }
    let mut out = String::new();
    if grid.len() > 1 {
        render(&mut out, heading, &grid, 2);
    }
    out
}

/// The request table's systems and modes, in column order: Stencil `share` and `copy` (4 KiB
/// pages), the Linux guest with 4 KiB pages and with THP.
pub const REQUEST_COLUMNS: &[(&str, &str, &str)] = &[
    ("stencil", "share", "Stencil share"),
    ("stencil", "copy", "Stencil copy"),
    ("linux", "4k", "Linux fork, 4 KiB"),
    ("linux", "thp", "Linux fork, THP"),
];

/// One request measurement: system, mode, W, state size.
pub fn find_request<'a>(
    ms: &'a [Measurement],
    system: &str,
    mode: &str,
    writes: u32,
    size: u64,
) -> Option<&'a Measurement> {
    ms.iter().find(|m| {
        m.system == system
            && m.mode == mode
            && m.size == size
            && model::request_writes(&m.kind) == Some(writes)
    })
}

/// The whole request, side by side: a row per (state size, W), a column per system and mode
/// ([`REQUEST_COLUMNS`], `p50 / p99`), then the ratios of the p50s against Stencil `share`:
/// `copy`, Linux 4 KiB and Linux THP over `share` (above 1: `share` is cheaper). Native runs
/// are left out (context only, other units). Empty without request measurements.
pub fn request_table(ms: &[Measurement], heading: &str) -> String {
    let req: Vec<&Measurement> = ms
        .iter()
        .filter(|m| model::is_request(m) && m.system != "native")
        .collect();
    let rows: BTreeSet<(u64, u32)> = req
        .iter()
        .filter_map(|m| Some((m.size, model::request_writes(&m.kind)?)))
        .collect();
    let mut grid: Vec<Vec<String>> = vec![
        ["state", "W"]
            .into_iter()
            .chain(REQUEST_COLUMNS.iter().map(|c| c.2))
            .chain(["copy / share", "4 KiB / share", "THP / share"])
            .map(str::to_owned)
            .collect(),
    ];
    for (size, w) in rows {
        let get = |system: &str, mode: &str| find_request(ms, system, mode, w, size);
        let mut row = vec![model::size_name(size), w.to_string()];
        row.extend(REQUEST_COLUMNS.iter().map(|c| p50_p99(get(c.0, c.1))));
        let share = get("stencil", "share").filter(|s| s.p50 > 0.0);
        for (system, mode) in [("stencil", "copy"), ("linux", "4k"), ("linux", "thp")] {
            row.push(match (share, get(system, mode)) {
                (Some(s), Some(o)) if s.unit == o.unit => ratio_text(o.p50 / s.p50),
                _ => "-".to_owned(),
            });
        }
        grid.push(row);
    }
    let mut out = String::new();
    if grid.len() > 1 {
        render(&mut out, heading, &grid, 2);
    }
    out
}

/// CSV with a header; `setting` (accelerator, icount) is the same for every row of one run.
pub fn csv(ms: &[Measurement], setting: &str) -> String {
    let mut out = String::from("system,mode,kind,size_bytes,n,p50,p99,unit,setting\n");
    let mut sorted: Vec<&Measurement> = ms.iter().collect();
    sorted.sort_by(|a, b| {
        (system_rank(&a.system), &a.system, &a.mode, &a.kind, a.size).cmp(&(
            system_rank(&b.system),
            &b.system,
            &b.mode,
            &b.kind,
            b.size,
        ))
    });
    for m in sorted {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{setting}",
            m.system,
            m.mode,
            m.kind,
            m.size,
            m.n,
            m.p50,
            m.p99,
            m.unit.name()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::bench::model::Unit;

    fn m(system: &str, mode: &str, kind: &str, size: u64, p50: f64) -> Measurement {
        Measurement::for_test((system, mode, kind), size, (p50, p50 * 2.0), 10, Unit::Ns)
    }

    #[test]
    fn tables_and_csv() {
        let ms = vec![
            m("native", "4k", "fork_child_first", 2 << 20, 40_000.0),
            m("linux", "thp", "fork_child_first", 1 << 30, 3.8e6),
            m("linux", "4k", "fork_child_first", 1 << 30, 26.9e6),
            m("linux", "4k", "thread_first", 1 << 30, 80_000.0),
            m("stencil", "share", "spawn_first", 1 << 30, 900.0),
            m("stencil", "share", "first_write", 1 << 30, 5000.0),
            m("stencil", "share", "spawn_roundtrip", 1 << 30, 3000.0),
        ];
        assert_eq!(systems(&ms), ["stencil", "linux", "native"]);
        let t = table(&ms, |s| format!("== {s}"));
        let linux = &t[t.find("== linux").unwrap()..t.find("== native").unwrap()];
        assert!(linux.contains("26.9 ms / 53.8 ms"), "{t}");
        assert!(linux.contains("thp   1 GiB"), "{t}");
        assert!(linux.contains("-"), "missing cells are dashes: {t}");
        // A kind the table does not know still gets a column, named as is; known ones their label.
        assert!(t.contains("spawn_roundtrip"), "{t}");
        assert!(t.contains("first write"), "{t}");
        let c = csv(&ms, "tcg");
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(
            lines[0],
            "system,mode,kind,size_bytes,n,p50,p99,unit,setting"
        );
        assert_eq!(lines.len(), 8);
        assert!(lines[1].starts_with("stencil,share,first_write,1073741824,10,5000,10000,ns,tcg"));
        assert!(lines[4].starts_with("linux,4k,fork_child_first,1073741824,10,26900000,"));
    }

    #[test]
    fn first_write_side_by_side() {
        let gib = 1 << 30;
        let mib2 = 2 << 20;
        let ms = vec![
            m("stencil", "share", "first_write", gib, 27_000.0),
            m("stencil", "share", "first_write", mib2, 26_000.0),
            m("stencil", "share", "first_write", 64 * gib, 28_000.0),
            m("stencil", "share-2m", "first_write", gib, 320_000.0),
            m("linux", "4k", "fork_first_write", gib, 30_000.0),
            m("linux", "4k", "fork_second_write", gib, 29_000.0),
            m("linux", "thp", "fork_first_write", gib, 40_000.0),
            m("linux", "thp", "fork_second_write", gib, 10_000.0),
            m("linux", "4k", "fork_child_first", mib2, 1.0),
        ];
        assert_eq!(
            first_write_ratio(&ms, "share", "4k", gib),
            Some((27_000.0, 30_000.0, 0.9))
        );
        assert_eq!(
            first_write_ratio(&ms, "share-2m", "thp", gib).unwrap().2,
            8.0
        );
        // Not both measured: no ratio (Linux has no 2 MiB first write, no 64 GiB at all).
        assert_eq!(first_write_ratio(&ms, "share", "4k", mib2), None);
        assert_eq!(first_write_ratio(&ms, "share", "4k", 64 * gib), None);
        assert_eq!(first_write_ratio(&ms, "copy", "4k", gib), None);
        let t = first_write_table(&ms, "== first write");
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("  ")).collect();
        assert!(t.starts_with("\n== first write\n"), "{t}");
        assert_eq!(rows.len(), 4, "header, rule, two rows: {t}");
        assert!(rows[0].contains("Stencil first write") && rows[0].contains("Stencil / Linux"));
        assert!(
            rows[2].starts_with("  share     4k     1 GiB")
                && rows[2].contains("27.0 µs / 54.0 µs")
                && rows[2].contains("30.0 µs / 60.0 µs")
                && rows[2].contains("29.0 µs / 58.0 µs")
                && rows[2].ends_with("0.90x"),
            "{t}"
        );
        assert!(
            rows[3].starts_with("  share-2m  thp") && rows[3].ends_with("8.00x"),
            "{t}"
        );
        // Units differ (never in one run, but never compared either), or nothing to compare.
        let mut mixed = ms.clone();
        mixed[0].unit = Unit::Instructions;
        assert_eq!(first_write_ratio(&mixed, "share", "4k", gib), None);
        assert_eq!(first_write_table(&ms[4..], "== first write"), "");
    }

    #[test]
    fn warm_heap_table() {
        let mib = 1 << 20;
        let gib = 1 << 30;
        let ms = vec![
            m("stencil", "share", "spawn_first", gib, 15_000.0),
            m("stencil", "heap", "seal", mib, 57_000.0),
            m("stencil", "heap", "spawn_first", mib, 3_700.0),
            m("stencil", "heap", "spawn_dirty1", mib, 97_000.0),
            m("stencil", "heap-copy", "spawn_first", mib, 27_750.0),
            m("stencil", "heap", "seal", gib, 9.0e6),
            m("stencil", "heap", "spawn_first", gib, 3_800.0),
            m("stencil", "heap", "first_write", gib, 3_000.0),
            m("linux", "4k", "fork_child_first", gib, 26.9e6),
        ];
        let t = heap_table(&ms, "== heap");
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("  ")).collect();
        assert!(t.starts_with("\n== heap\n"), "{t}");
        assert_eq!(
            rows.len(),
            5,
            "header, rule, 1 MiB share + copy, 1 GiB share: {t}"
        );
        assert!(
            rows[0].contains("seal (snapshot)")
                && rows[0].contains("spawn, 1 page dirty")
                && rows[0].ends_with("copy / share"),
            "{t}"
        );
        // The seal in the share row, the ratio in the copy row, dashes where nothing was measured.
        assert!(
            rows[2].starts_with("  1 MiB  share")
                && rows[2].contains("57.0 µs / 114 µs")
                && rows[2].contains("3.70 µs / 7.40 µs")
                && rows[2].contains("97.0 µs / 194 µs"),
            "{t}"
        );
        assert!(
            rows[3].starts_with("  1 MiB  copy")
                && rows[3].contains("27.8 µs / 55.5 µs")
                && rows[3].ends_with("7.50x")
                && !rows[3].contains("57.0 µs"),
            "{t}"
        );
        assert!(
            rows[4].starts_with("  1 GiB  share")
                && rows[4].contains("9.00 ms / 18.0 ms")
                && rows[4].contains("3.00 µs / 6.00 µs")
                && rows[4].contains(" - "),
            "{t}"
        );
        // The per-system table leaves the warm-heap rows to this one.
        let main = table(&ms, |s| format!("== {s}"));
        assert!(!main.contains("heap"), "{main}");
        assert!(main.contains("share  1 GiB"), "{main}");
        assert_eq!(heap_table(&ms[..1], "== heap"), "");
    }

    #[test]
    fn request_side_by_side() {
        let mib16 = 16 << 20;
        let gib = 1 << 30;
        let ms = vec![
            m("stencil", "share", "request_w0", mib16, 10_000.0),
            m("stencil", "copy", "request_w0", mib16, 100_000.0),
            m("linux", "4k", "request_w0", mib16, 1_000_000.0),
            m("linux", "thp", "request_w0", mib16, 500_000.0),
            m("stencil", "share", "request_w256", mib16, 800_000.0),
            m("linux", "thp", "request_w256", mib16, 400_000.0),
            m("stencil", "share", "request_w16", gib, 60_000.0),
            m("native", "4k", "request_w16", gib, 1.0),
            m("stencil", "share", "spawn_first", mib16, 1.0),
        ];
        let t = request_table(&ms, "== requests");
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("  ")).collect();
        assert!(t.starts_with("\n== requests\n"), "{t}");
        assert_eq!(rows.len(), 5, "header, rule, three rows: {t}");
        assert!(
            rows[0].contains("Stencil share")
                && rows[0].contains("Linux fork, THP")
                && rows[0].ends_with("THP / share"),
            "{t}"
        );
        // Cells are at least two spaces apart.
        let cells = |row: &str| -> Vec<String> {
            row.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            cells(rows[2]),
            [
                "16 MiB",
                "0",
                "10.0 µs / 20.0 µs",
                "100 µs / 200 µs",
                "1.00 ms / 2.00 ms",
                "500 µs / 1.00 ms",
                "10.0x",
                "100x",
                "50.0x"
            ],
            "{t}"
        );
        // Linux wins here: the ratio is below 1; unmeasured cells are dashes.
        assert_eq!(
            cells(rows[3]),
            [
                "16 MiB",
                "256",
                "800 µs / 1.60 ms",
                "-",
                "-",
                "400 µs / 800 µs",
                "-",
                "-",
                "0.50x"
            ],
            "{t}"
        );
        assert_eq!(
            cells(rows[4])[..3],
            ["1 GiB", "16", "60.0 µs / 120 µs"],
            "{t}"
        );
        assert!(!t.contains("1.00 ns"), "native is left out: {t}");
        // The other tables leave the request rows to this one.
        let main = table(&ms, |s| format!("== {s}"));
        assert!(!main.contains("request"), "{main}");
        assert_eq!(request_table(&ms[8..], "== requests"), "");
    }

    #[test]
    fn ratios_for_humans() {
        assert_eq!(ratio_text(0.904), "0.90x");
        assert_eq!(ratio_text(12.44), "12.4x");
        assert_eq!(ratio_text(1400.4), "1400x");
    }
}
