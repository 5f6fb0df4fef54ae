//! The SVG plot: p50 latency against size, log-log, one line per series.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::model::{self, Measurement, Unit};

/// Kinds that are plotted: spawning until the new task's first instruction runs.
const PLOT_KINDS: &[&str] = &[
    "spawn_first",
    "fork_child_first",
    "vfork_child_first",
    "thread_first",
];

/// Kinds that do not depend on the size of the parent's memory: one line (the first mode) is
/// enough, the other would lie on top of it.
const ONE_MODE_KINDS: &[&str] = &["vfork_child_first", "thread_first"];

const COLORS: &[RGBColor] = &[
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

fn system_name(s: &str) -> &str {
    match s {
        "linux" => "Linux guest",
        "native" => "host, native",
        "stencil" => "Stencil",
        other => other,
    }
}

fn kind_name(k: &str) -> &str {
    match k {
        "spawn_first" => "spawn",
        "fork_child_first" => "fork",
        "vfork_child_first" => "vfork",
        "thread_first" => "thread",
        other => other,
    }
}

fn mode_name(m: &str) -> &str {
    match m {
        "4k" => "4 KiB pages",
        "thp" => "THP",
        "heap" => "warm heap, share",
        "heap-copy" => "warm heap, copy",
        other => other,
    }
}

/// An axis label: like the table's values, without trailing zeros (`1 ms`, not `1.00 ms`).
fn axis_label(v: f64, unit: Unit) -> String {
    let h = model::human(v, unit);
    let (num, suffix) = h.split_once(' ').unwrap_or((&h, ""));
    let num = if num.contains('.') {
        num.trim_end_matches('0').trim_end_matches('.')
    } else {
        num
    };
    if suffix.is_empty() {
        num.to_owned()
    } else {
        format!("{num} {suffix}")
    }
}

/// A plotted line: its label, whether it is context (dashed), and its points.
#[derive(Debug, PartialEq)]
pub struct Line {
    pub label: String,
    pub context: bool,
    pub points: Vec<(f64, f64)>,
}

/// Chooses the lines: the spawn kinds in `unit`, one line per (system, kind, mode), except that
/// size-independent kinds get one line per system, and native runs get only their fork lines.
pub fn lines(ms: &[Measurement], unit: Unit) -> Vec<Line> {
    // (system rank, system, kind rank, mode) -> points, so lines come out in display order.
    type Key = (usize, String, usize, String);
    let mut groups: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    let system_rank = |s: &str| match s {
        "stencil" => 0,
        "linux" => 1,
        "native" => 2,
        _ => 3,
    };
    for m in ms.iter().filter(|m| m.unit == unit) {
        let Some(kind_rank) = PLOT_KINDS.iter().position(|k| *k == m.kind) else {
            continue;
        };
        if m.system == "native" && m.kind != "fork_child_first" {
            continue;
        }
        if ONE_MODE_KINDS.contains(&m.kind.as_str()) {
            let first_mode = ms
                .iter()
                .filter(|o| o.system == m.system && o.kind == m.kind)
                .map(|o| o.mode.as_str())
                .min();
            if first_mode != Some(m.mode.as_str()) {
                continue;
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let point = (m.size as f64, m.p50);
        groups
            .entry((
                system_rank(&m.system),
                m.system.clone(),
                kind_rank,
                m.mode.clone(),
            ))
            .or_default()
            .push(point);
    }
    groups
        .into_iter()
        .map(|((_, system, kind, mode), mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let kind = PLOT_KINDS[kind];
            let label = if ONE_MODE_KINDS.contains(&kind) {
                format!("{} {}", system_name(&system), kind_name(kind))
            } else {
                format!(
                    "{} {} ({})",
                    system_name(&system),
                    kind_name(kind),
                    mode_name(&mode)
                )
            };
            Line {
                label,
                context: system == "native",
                points,
            }
        })
        .collect()
}

/// Renders the plot as an SVG document.
pub fn svg(ms: &[Measurement], unit: Unit, subtitle: &str) -> Result<String> {
    let lines = lines(ms, unit);
    let pts = || lines.iter().flat_map(|l| l.points.iter().copied());
    if lines.is_empty() {
        return Err(anyhow!("nothing to plot"));
    }
    let (xmin, xmax) = pts().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(x), b.max(x)));
    let (ymin, ymax) = pts().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(y), b.max(y)));
    let mut sizes: Vec<f64> = pts().map(|(x, _)| x).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let y_desc = match unit {
        Unit::Ns => "p50 latency (log)",
        Unit::Instructions => "p50 guest instructions (log)",
    };
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 680)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let (top, chart_area) = root.split_vertically(56);
        top.draw(&Text::new(
            "Spawn until the new task's first instruction, vs. memory size (p50, log-log)",
            (20, 10),
            ("sans-serif", 20).into_font().color(&BLACK),
        ))
        .map_err(|e| anyhow!("{e}"))?;
        top.draw(&Text::new(
            subtitle.to_owned(),
            (20, 34),
            ("sans-serif", 14)
                .into_font()
                .color(&RGBColor(0x55, 0x55, 0x55)),
        ))
        .map_err(|e| anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&chart_area)
            .margin(20)
            .margin_top(6)
            .x_label_area_size(50)
            .y_label_area_size(90)
            .build_cartesian_2d(
                (xmin / 1.4..xmax * 1.4)
                    .log_scale()
                    .with_key_points(sizes.clone()),
                (ymin / 2.0..ymax * 2.5).log_scale(),
            )
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("populated memory (Linux) / template or warm-heap size (Stencil), log")
            .y_desc(y_desc)
            .x_label_formatter(&|v| {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let bytes = v.round() as u64;
                model::size_name(bytes)
            })
            .y_label_formatter(&|v| axis_label(*v, unit))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, line) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let style = color.stroke_width(if line.context { 2 } else { 3 });
            let series = if line.context {
                chart.draw_series(DashedLineSeries::new(line.points.clone(), 8, 5, style))
            } else {
                chart.draw_series(LineSeries::new(line.points.clone(), style))
            }
            .map_err(|e| anyhow!("{e}"))?;
            series.label(line.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
            chart
                .draw_series(
                    line.points
                        .iter()
                        .map(|&p| Circle::new(p, 4, color.filled())),
                )
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(0xaa, 0xaa, 0xaa))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(out)
}

/// The request plot's series: Stencil `share` and `copy`, Linux 4 KiB and THP.
const REQUEST_SERIES: &[(&str, &str, &str)] = &[
    ("stencil", "share", "Stencil share"),
    ("stencil", "copy", "Stencil copy"),
    ("linux", "4k", "Linux fork, 4 KiB pages"),
    ("linux", "thp", "Linux fork, THP"),
];

/// W of the request plot's right panel (cost against state size).
const REQUEST_SIZE_PANEL_W: u32 = 16;

/// The request plot's lines: against W (x = the index of W in `reqcore::WRITES`) at the largest
/// state size that has a request figure, and against state size (x = bytes) at W = 16. Returns
/// (that size, the W lines, the size lines); lines without points are left out.
pub fn request_lines(ms: &[Measurement], unit: Unit) -> (u64, Vec<Line>, Vec<Line>) {
    let req: Vec<&Measurement> = ms
        .iter()
        .filter(|m| m.unit == unit && model::is_request(m) && m.system != "native")
        .collect();
    let big = req.iter().map(|m| m.size).max().unwrap_or(0);
    let mut by_w = Vec::new();
    let mut by_size = Vec::new();
    for &(system, mode, label) in REQUEST_SERIES {
        let mine: Vec<&&Measurement> = req
            .iter()
            .filter(|m| m.system == system && m.mode == mode)
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let w_points: Vec<(f64, f64)> = reqcore::WRITES
            .iter()
            .enumerate()
            .filter_map(|(i, &w)| {
                let m = mine
                    .iter()
                    .find(|m| m.size == big && model::request_writes(&m.kind) == Some(w))?;
                Some((i as f64, m.p50))
            })
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let mut size_points: Vec<(f64, f64)> = mine
            .iter()
            .filter(|m| model::request_writes(&m.kind) == Some(REQUEST_SIZE_PANEL_W))
            .map(|m| (m.size as f64, m.p50))
            .collect();
        size_points.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (points, out) in [(w_points, &mut by_w), (size_points, &mut by_size)] {
            if !points.is_empty() {
                out.push(Line {
                    label: label.to_owned(),
                    context: false,
                    points,
                });
            }
        }
    }
    (big, by_w, by_size)
}

/// One panel of the request plot.
fn request_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    lines: &[Line],
    (ymin, ymax): (f64, f64),
    unit: Unit,
    by_size: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let pts = || lines.iter().flat_map(|l| l.points.iter().copied());
    let (xmin, xmax) = pts().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(x), b.max(x)));
    let y_desc = match unit {
        Unit::Ns => "p50 per request (log)",
        Unit::Instructions => "p50 guest instructions per request (log)",
    };
    let mut xs: Vec<f64> = pts().map(|(x, _)| x).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut builder = ChartBuilder::on(area);
    let chart = builder
        .caption(caption, ("sans-serif", 16))
        .margin(16)
        .x_label_area_size(46)
        .y_label_area_size(90);
    macro_rules! finish {
        ($chart:expr, $x_desc:expr, $x_fmt:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc($x_desc)
                .y_desc(y_desc)
                .x_label_formatter($x_fmt)
                .y_label_formatter(&|v| axis_label(*v, unit))
                .label_style(("sans-serif", 14))
                .axis_desc_style(("sans-serif", 15))
                .light_line_style(RGBColor(0xee, 0xee, 0xee))
                .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
            for (i, line) in lines.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(line.points.clone(), color.stroke_width(3)))
                    .map_err(|e| anyhow!("{e}"))?
                    .label(line.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                    });
                chart
                    .draw_series(
                        line.points
                            .iter()
                            .map(|&p| Circle::new(p, 4, color.filled())),
                    )
                    .map_err(|e| anyhow!("{e}"))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font(("sans-serif", 13))
                .background_style(WHITE.mix(0.9))
                .border_style(RGBColor(0xaa, 0xaa, 0xaa))
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
        }};
    }
    // Room below the lowest line for the legend (lower right).
    let y = (ymin / 12.0..ymax * 2.0).log_scale();
    if by_size {
        let x = (xmin / 1.6..xmax * 1.6).log_scale().with_key_points(xs);
        finish!(
            chart.build_cartesian_2d(x, y).map_err(|e| anyhow!("{e}"))?,
            "warm state size (log)",
            &|v: &f64| {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let bytes = v.round() as u64;
                model::size_name(bytes)
            }
        );
    } else {
        // x is W's position in reqcore::WRITES (0, 1, 16, 256 evenly apart); ticks between the
        // positions get no label.
        #[allow(clippy::cast_precision_loss)]
        let x = -0.3f64..(reqcore::WRITES.len() as f64 - 0.7);
        finish!(
            chart.build_cartesian_2d(x, y).map_err(|e| anyhow!("{e}"))?,
            "W: pages written per request",
            &|v: &f64| {
                if (v - v.round()).abs() > 1e-6 || *v < 0.0 {
                    return String::new();
                }
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let i = v.round() as usize;
                reqcore::WRITES
                    .get(i)
                    .map_or_else(String::new, |w| w.to_string())
            }
        );
    }
    Ok(())
}

/// Renders the request plot (`requests.svg`): cost per request against W at the largest state
/// size (left) and against the state size at W = 16 (right), p50, y logarithmic.
pub fn request_svg(ms: &[Measurement], unit: Unit, subtitle: &str) -> Result<String> {
    let (big, by_w, by_size) = request_lines(ms, unit);
    if by_w.is_empty() {
        return Err(anyhow!("no request figures to plot"));
    }
    let ys = || {
        by_w.iter()
            .chain(&by_size)
            .flat_map(|l| l.points.iter().map(|p| p.1))
    };
    let yrange = ys().fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1200, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let (top, body) = root.split_vertically(56);
        top.draw(&Text::new(
            format!(
                "Whole request from a warm state: spawn/fork + {} lookups + W page writes + \
                 exit + join/wait (p50)",
                reqcore::LOOKUPS
            ),
            (20, 10),
            ("sans-serif", 20).into_font().color(&BLACK),
        ))
        .map_err(|e| anyhow!("{e}"))?;
        top.draw(&Text::new(
            subtitle.to_owned(),
            (20, 34),
            ("sans-serif", 14)
                .into_font()
                .color(&RGBColor(0x55, 0x55, 0x55)),
        ))
        .map_err(|e| anyhow!("{e}"))?;
        let (left, right) = body.split_horizontally(600);
        request_panel(
            &left,
            &format!("against W, {} state", model::size_name(big)),
            &by_w,
            yrange,
            unit,
            false,
        )?;
        if !by_size.is_empty() {
            request_panel(
                &right,
                &format!("against state size, W = {REQUEST_SIZE_PANEL_W}"),
                &by_size,
                yrange,
                unit,
                true,
            )?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(system: &str, mode: &str, kind: &str, size: u64, p50: f64, unit: Unit) -> Measurement {
        Measurement::for_test((system, mode, kind), size, (p50, p50), 1, unit)
    }

    #[test]
    fn axis_labels() {
        assert_eq!(axis_label(1e6, Unit::Ns), "1 ms");
        assert_eq!(axis_label(1e7, Unit::Instructions), "10 M");
        assert_eq!(axis_label(2.5e5, Unit::Ns), "250 µs");
        assert_eq!(axis_label(1500.0, Unit::Ns), "1.5 µs");
    }

    #[test]
    fn choosing_lines() {
        let ns = Unit::Ns;
        let ms = vec![
            m("linux", "4k", "fork_child_first", 16 << 20, 2.0, ns),
            m("linux", "4k", "fork_child_first", 2 << 20, 1.0, ns),
            m("linux", "thp", "fork_child_first", 2 << 20, 1.0, ns),
            m("linux", "4k", "thread_first", 2 << 20, 1.0, ns),
            m("linux", "thp", "thread_first", 2 << 20, 1.0, ns),
            m("linux", "4k", "fork_parent", 2 << 20, 1.0, ns),
            m("native", "4k", "fork_child_first", 2 << 20, 1.0, ns),
            m("native", "4k", "thread_first", 2 << 20, 1.0, ns),
            m(
                "stencil",
                "share",
                "spawn_first",
                2 << 20,
                1.0,
                Unit::Instructions,
            ),
            m("stencil", "heap", "spawn_first", 1 << 20, 1.0, ns),
            m("stencil", "heap", "spawn_first", 1 << 30, 1.1, ns),
            m("stencil", "heap", "seal", 1 << 30, 9.0, ns),
            m("stencil", "heap-copy", "spawn_first", 1 << 30, 5.0, ns),
        ];
        let l = lines(&ms, ns);
        let labels: Vec<&str> = l.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "Stencil spawn (warm heap, share)",
                "Stencil spawn (warm heap, copy)",
                "Linux guest fork (4 KiB pages)",
                "Linux guest fork (THP)",
                "Linux guest thread",
                "host, native fork (4 KiB pages)"
            ]
        );
        // The warm-heap line has its spawns, not the seal.
        assert_eq!(l[0].points, [(1048576.0, 1.0), (1073741824.0, 1.1)]);
        assert_eq!(l[2].points, [(2097152.0, 1.0), (16777216.0, 2.0)]);
        assert!(l[5].context && !l[2].context);
        let svg = svg(&ms, ns, "test").unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("Linux guest fork (THP)"));
    }

    #[test]
    fn request_plot_lines() {
        let i = Unit::Instructions;
        let (mib16, gib) = (16 << 20, 1 << 30);
        let ms = vec![
            m("stencil", "share", "request_w0", gib, 10.0, i),
            m("stencil", "share", "request_w256", gib, 900.0, i),
            m("stencil", "share", "request_w16", gib, 90.0, i),
            m("stencil", "share", "request_w16", mib16, 80.0, i),
            m("linux", "thp", "request_w16", mib16, 800.0, i),
            m("native", "4k", "request_w16", gib, 1.0, i),
            m("stencil", "share", "spawn_first", gib, 1.0, i),
            m("stencil", "copy", "request_w0", gib, 5.0, Unit::Ns),
        ];
        let (big, by_w, by_size) = request_lines(&ms, i);
        assert_eq!(big, gib);
        assert_eq!(
            by_w.len(),
            1,
            "Linux has no 1 GiB figure, copy another unit"
        );
        assert_eq!(by_w[0].label, "Stencil share");
        assert_eq!(by_w[0].points, [(0.0, 10.0), (2.0, 90.0), (3.0, 900.0)]);
        let labels: Vec<&str> = by_size.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(labels, ["Stencil share", "Linux fork, THP"]);
        assert_eq!(
            by_size[0].points,
            [(16777216.0, 80.0), (1073741824.0, 90.0)]
        );
        let svg = request_svg(&ms, i, "test").unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("Linux fork, THP"));
        assert!(svg.contains("against W, 1 GiB state"));
        assert!(request_svg(&ms[6..7], i, "test").is_err());
    }
}
