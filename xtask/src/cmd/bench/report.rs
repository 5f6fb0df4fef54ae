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

/// One table per system: a row per (mode, size), a column per kind (`p50 / p99`).
pub fn table(ms: &[Measurement], heading: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    for system in systems(ms) {
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
        let cols = grid[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| grid.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let _ = writeln!(out, "\n{}", heading(&system));
        for (i, row) in grid.iter().enumerate() {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if c < 2 {
                    let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
                } else {
                    let _ = write!(line, "{}{cell}  ", " ".repeat(pad));
                }
            }
            let _ = writeln!(out, "  {}", line.trim_end());
            if i == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * (cols - 1);
                let _ = writeln!(out, "  {}", "-".repeat(total));
            }
        }
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
        Measurement {
            system: system.to_owned(),
            mode: mode.to_owned(),
            kind: kind.to_owned(),
            size,
            p50,
            p99: p50 * 2.0,
            n: 10,
            unit: Unit::Ns,
        }
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
        ];
        assert_eq!(systems(&ms), ["stencil", "linux", "native"]);
        let t = table(&ms, |s| format!("== {s}"));
        let linux = &t[t.find("== linux").unwrap()..t.find("== native").unwrap()];
        assert!(linux.contains("26.9 ms / 53.8 ms"), "{t}");
        assert!(linux.contains("thp   1 GiB"), "{t}");
        assert!(linux.contains("-"), "missing cells are dashes: {t}");
        // A kind the table does not know still gets a column, named as is.
        assert!(t.contains("first_write"), "{t}");
        let c = csv(&ms, "tcg");
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(
            lines[0],
            "system,mode,kind,size_bytes,n,p50,p99,unit,setting"
        );
        assert_eq!(lines.len(), 7);
        assert!(lines[1].starts_with("stencil,share,first_write,1073741824,10,5000,10000,ns,tcg"));
        assert!(lines[3].starts_with("linux,4k,fork_child_first,1073741824,10,26900000,"));
    }
}
