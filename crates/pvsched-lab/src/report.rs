//! Rendering results: the Markdown table (shaped like the anchor's: one row per figure,
//! one column per configuration), the goals, and SVG latency CDFs with a log-x axis.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{LabError, Result};
use crate::results::{ConfigResult, LabResults, LatencyFigures};
use crate::stallprobe::StallFigures;

/// Line colours of the plots, one per configuration in report order.
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#7f7f7f",
];

fn latency_cell(figures: &LatencyFigures, value: f64, lower_bound: bool) -> String {
    if figures.samples == 0 {
        return "–".into();
    }
    let prefix = if lower_bound { "≥" } else { "" };
    if value < 10.0 {
        format!("{prefix}{value:.1}")
    } else {
        format!("{prefix}{value:.0}")
    }
}

/// A figure of the stall probe (µs), `–` without one.
fn stall_cell(result: &ConfigResult, figure: fn(&StallFigures) -> Option<u64>) -> String {
    match result.host.stalls {
        Some(stalls) if stalls.samples > 0 => {
            figure(&stalls).map_or_else(|| "–".into(), |us| us.to_string())
        }
        _ => "–".into(),
    }
}

/// A histogram bucket bound in µs (`∞` for the overflow bucket).
fn bound_cell(us: f64) -> String {
    if us.is_finite() {
        format!("{us:.0}")
    } else {
        "∞".to_owned()
    }
}

fn rate_cell(value: f64) -> String {
    if value == 0.0 {
        "–".into()
    } else {
        format!("{value:.0}")
    }
}

/// The results table in Markdown, with the run's parameters above it and the goals below.
pub fn markdown(results: &LabResults) -> String {
    let params = &results.params;
    let ordered = results.ordered();
    let accel = results
        .accelerator
        .map_or("unknown".to_owned(), |accel| accel.to_string());
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Busy host ({load}), {guests} guest(s) × {vcpus} vCPUs under {accel}, cyclictest every {interval} µs for {duration} s \
         (guest FIFO {gprio}, host FIFO {hprio}); static-rt = vCPU threads FIFO {sprio}, static-rt-all = every QEMU thread FIFO {sprio}; \
         {cpus} host CPUs, host {kernel}; the daemon's channel: {channel}.\n",
        load = params.load.describe(),
        guests = params.guests,
        vcpus = params.vcpus,
        interval = params.interval_us,
        duration = params.duration_s,
        gprio = params.guest_rt_prio,
        hprio = params.host_cyclictest_prio,
        sprio = params.static_rt_prio,
        cpus = params.host_cpus,
        kernel = params.host_kernel,
        channel = match params.channel {
            crate::results::Channel::Plain => "ivshmem-plain, polled",
            crate::results::Channel::Doorbell => "ivshmem-doorbell, event-driven",
        },
    );
    let _ = write!(text, "| busy host |");
    for result in &ordered {
        let _ = write!(text, " {} |", result.name);
    }
    let _ = write!(text, "\n|---|");
    for _ in &ordered {
        text.push_str("---:|");
    }
    text.push('\n');
    type Cell = fn(&ConfigResult) -> String;
    let rows: [(&str, Cell); 17] = [
        ("guest avg (µs)", |r| {
            latency_cell(&r.guest.latency, r.guest.latency.avg_us, false)
        }),
        ("guest p99 (µs)", |r| {
            latency_cell(
                &r.guest.latency,
                r.guest.latency.p99_us as f64,
                r.guest.latency.p99_is_lower_bound,
            )
        }),
        ("guest max (µs)", |r| {
            latency_cell(&r.guest.latency, r.guest.latency.max_us as f64, false)
        }),
        ("guest samples", |r| r.guest.latency.samples.to_string()),
        ("host max (µs)", |r| {
            latency_cell(&r.host.latency, r.host.latency.max_us as f64, false)
        }),
        ("host p99 (µs)", |r| {
            latency_cell(
                &r.host.latency,
                r.host.latency.p99_us as f64,
                r.host.latency.p99_is_lower_bound,
            )
        }),
        (
            "host max beyond the machine's stalls (µs, stall probe)",
            |r| stall_cell(r, |stalls| Some(stalls.beyond_stalls_max_us)),
        ),
        (
            "host task above the boosts: max beyond stalls (µs, FIFO static-rt + 1)",
            |r| stall_cell(r, |stalls| stalls.above_boosts_beyond_stalls_max_us),
        ),
        ("machine stall max (µs, FIFO 99 reference)", |r| {
            stall_cell(r, |stalls| Some(stalls.reference_max_us))
        }),
        ("host throughput (bogo-ops/s, geo-mean)", |r| {
            rate_cell(r.host.bogo_ops_per_s)
        }),
        ("boosts / throttles", |r| {
            format!("{} / {}", r.boosts, r.throttles)
        }),
        ("applied changes (daemon)", |r| {
            r.applies.map_or("–".to_owned(), |n| n.to_string())
        }),
        ("daemon CPU (% of one CPU)", |r| {
            r.daemon_cpu_percent
                .map_or("–".to_owned(), |p| format!("{p:.2}"))
        }),
        (
            "apply latency p50 / p99 (µs, line read → applied)",
            |r| {
                r.apply_latency.map_or("–".to_owned(), |a| {
                    format!("≤ {} / ≤ {}", bound_cell(a.p50_us), bound_cell(a.p99_us))
                })
            },
        ),
        ("vCPU threads RT (% of samples)", |r| {
            if r.policy_samples == 0 {
                "–".into()
            } else {
                format!("{:.0}", r.rt_fraction * 100.0)
            }
        }),
        ("rogue vCPU: throttles, RT (% of samples)", |r| {
            match r.rogue_vcpu() {
                None => "–".into(),
                Some((guest, vcpu)) => format!(
                    "{}, {}",
                    guest
                        .slots
                        .get(vcpu)
                        .map_or("–".to_owned(), |slot| slot.throttles.to_string()),
                    guest
                        .vcpu_policy
                        .get(vcpu)
                        .and_then(|share| share.fraction())
                        .map_or("–".to_owned(), |f| format!("{:.0}", f * 100.0))
                ),
            }
        }),
        ("status", |r| {
            match (&r.error, r.leftover_rt_threads.is_empty()) {
                (Some(_), _) => "failed".into(),
                (None, false) => "left RT threads".into(),
                (None, true) => "ok".into(),
            }
        }),
    ];
    for (label, cell) in rows {
        let _ = write!(text, "| {label} |");
        for result in &ordered {
            let _ = write!(text, " {} |", cell(result));
        }
        text.push('\n');
    }
    if !results.goals.is_empty() {
        text.push_str("\nGoals (measured, not asserted):\n\n");
        for goal in &results.goals {
            let verdict = match goal.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            let ratio = match (goal.ratio, goal.numerator, goal.denominator) {
                (Some(ratio), Some(a), Some(b)) => {
                    format!("{a:.0} / {b:.0} {} = {ratio:.2}", goal.unit)
                }
                (Some(ratio), _, _) => format!("{ratio:.2}"),
                _ => "–".to_owned(),
            };
            let experiment = if goal.experiment.is_empty() {
                String::new()
            } else {
                format!("{}: ", goal.experiment)
            };
            let _ = writeln!(text, "- {experiment}{}: {ratio} — {verdict}", goal.goal);
        }
    }
    let failures: Vec<&&ConfigResult> = ordered.iter().filter(|r| r.error.is_some()).collect();
    if !failures.is_empty() {
        text.push_str("\nFailed configurations:\n\n");
        for result in failures {
            let first_line = result
                .error
                .as_deref()
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default();
            let _ = writeln!(text, "- {}: {first_line}", result.name);
        }
    }
    text
}

/// Points of the CDF of a histogram: `(latency µs, fraction of samples at or below)`.
/// `total` includes overflows, so the curve stops below 1 when some overflowed.
pub fn cdf_points(histogram: &[(u64, u64)], total: u64) -> Vec<(f64, f64)> {
    if total == 0 {
        return Vec::new();
    }
    let mut seen = 0u64;
    histogram
        .iter()
        .map(|&(bucket, count)| {
            seen += count;
            (bucket as f64, seen as f64 / total as f64)
        })
        .collect()
}

/// An SVG chart of latency CDFs, one line per series, log-x axis.
pub fn cdf_svg(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (width, height) = (760.0, 440.0);
    let (left, right, top, bottom) = (64.0, 170.0, 40.0, 52.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    // Buckets are whole µs; 0 µs is drawn at 1 µs on the log axis.
    let max_x = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(x, _)| x))
        .fold(10.0f64, f64::max);
    let decades_hi = max_x.max(1.0).log10().ceil().max(1.0);
    let x_of = |x: f64| left + x.max(1.0).log10() / decades_hi * plot_w;
    let y_of = |y: f64| top + (1.0 - y) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        svg,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        left + plot_w / 2.0,
        xml_escape(title)
    );
    // Grid and axes.
    for decade in 0..=decades_hi as u32 {
        let x = x_of(10f64.powi(decade as i32));
        let label = match decade {
            0 => "1 µs".to_owned(),
            1 => "10 µs".to_owned(),
            2 => "100 µs".to_owned(),
            3 => "1 ms".to_owned(),
            4 => "10 ms".to_owned(),
            5 => "100 ms".to_owned(),
            6 => "1 s".to_owned(),
            d => format!("1e{d} µs"),
        };
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#ddd\"/>\n<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            top + plot_h,
            top + plot_h + 18.0
        );
    }
    for tenth in 0..=10 {
        let fraction = f64::from(tenth) / 10.0;
        let y = y_of(fraction);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>",
            left + plot_w
        );
        if tenth % 2 == 0 {
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{fraction:.1}</text>",
                left - 6.0,
                y + 4.0
            );
        }
    }
    let _ = writeln!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">latency (log scale)</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">fraction of samples ≤ latency</text>",
        left + plot_w / 2.0,
        height - 12.0,
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    // Series as step lines.
    for (index, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        if !points.is_empty() {
            let mut path = String::new();
            let mut previous_y = 0.0;
            for (i, &(x, y)) in points.iter().enumerate() {
                let (px, py) = (x_of(x), y_of(y));
                if i == 0 {
                    let _ = write!(path, "M{px:.1},{:.1}", y_of(0.0));
                } else {
                    let _ = write!(path, " L{px:.1},{:.1}", y_of(previous_y));
                }
                let _ = write!(path, " L{px:.1},{py:.1}");
                previous_y = y;
            }
            let _ = writeln!(
                svg,
                "<path d=\"{path}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>"
            );
        }
        let ly = top + 16.0 + index as f64 * 20.0;
        let lx = left + plot_w + 14.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"3\"/>\n<text x=\"{}\" y=\"{}\">{}</text>",
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            xml_escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// An axis label: whole numbers from 10 up, else at most two decimals.
fn tick_label(value: f64) -> String {
    if value >= 10.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.2}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `value` (1 for nothing to show).
fn nice_ceiling(value: f64) -> f64 {
    if !value.is_finite() || value <= 0.0 {
        return 1.0;
    }
    let decade = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|step| step * decade)
        .find(|&bound| bound >= value * (1.0 - 1e-12))
        .unwrap_or(10.0 * decade)
}

/// An SVG grouped bar chart: one group of bars per `(group label, bars)` (e.g. per
/// configuration), one bar per `(series label, value)` (e.g. per VM), each series in the
/// same colour in every group, with the value above its bar; linear y axis from 0.
pub fn bar_chart_svg(
    title: &str,
    y_label: &str,
    groups: &[(String, Vec<(String, f64)>)],
) -> String {
    let (width, height) = (760.0, 440.0);
    let (left, right, top, bottom) = (72.0, 170.0, 40.0, 52.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let mut series: Vec<&str> = Vec::new();
    for (_, bars) in groups {
        for (name, _) in bars {
            if !series.contains(&name.as_str()) {
                series.push(name);
            }
        }
    }
    let max_y = nice_ceiling(
        groups
            .iter()
            .flat_map(|(_, bars)| bars.iter().map(|&(_, value)| value))
            .filter(|value| value.is_finite())
            .fold(0.0, f64::max),
    );
    let y_of = |y: f64| top + (1.0 - (y / max_y).clamp(0.0, 1.0)) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        svg,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        left + plot_w / 2.0,
        xml_escape(title)
    );
    for tick in 0..=5 {
        let value = max_y * f64::from(tick) / 5.0;
        let y = y_of(value);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + plot_w,
            left - 6.0,
            y + 4.0,
            tick_label(value)
        );
    }
    let slot_w = plot_w / groups.len().max(1) as f64;
    let bar_w = slot_w * 0.8 / series.len().max(1) as f64;
    for (index, (label, bars)) in groups.iter().enumerate() {
        let slot_left = left + slot_w * index as f64 + slot_w * 0.1;
        for (name, value) in bars {
            let position = series.iter().position(|s| s == name).unwrap_or(0);
            let colour = COLOURS[position % COLOURS.len()];
            let x = slot_left + bar_w * position as f64;
            let y = if value.is_finite() {
                y_of(*value)
            } else {
                y_of(0.0)
            };
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"><title>{}: {}</title></rect>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
                bar_w * 0.9,
                top + plot_h - y,
                xml_escape(label),
                xml_escape(name),
                x + bar_w * 0.45,
                y - 3.0,
                rate_cell(*value)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            left + slot_w * (index as f64 + 0.5),
            top + plot_h + 18.0,
            xml_escape(label)
        );
    }
    let _ = writeln!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>",
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        xml_escape(y_label)
    );
    for (index, name) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let ly = top + 16.0 + index as f64 * 20.0;
        let lx = left + plot_w + 14.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{lx}\" y=\"{}\" width=\"14\" height=\"10\" fill=\"{colour}\"/>\n<text x=\"{}\" y=\"{}\">{}</text>",
            ly - 5.0,
            lx + 20.0,
            ly + 4.0,
            xml_escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Files written by [`write_all`].
#[derive(Debug, Clone)]
pub struct ReportFiles {
    /// `results.json`.
    pub json: PathBuf,
    /// `results.md`.
    pub markdown: PathBuf,
    /// The SVG plots.
    pub plots: Vec<PathBuf>,
}

/// Writes `results.json`, `results.md`, `guest-latency-cdf.svg` and
/// `host-latency-cdf.svg` into `dir`.
pub fn write_all(results: &LabResults, dir: &Path) -> Result<ReportFiles> {
    fs::create_dir_all(dir).map_err(LabError::io("create", dir))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(results)
        .map_err(|error| LabError::Run(format!("serializing results: {error}")))?;
    fs::write(&json, text + "\n").map_err(LabError::io("write", &json))?;
    let markdown_path = dir.join("results.md");
    fs::write(&markdown_path, markdown(results)).map_err(LabError::io("write", &markdown_path))?;
    let ordered = results.ordered();
    let accel = results
        .accelerator
        .map_or("unknown".to_owned(), |accel| accel.to_string());
    let mut plots = Vec::new();
    for (side, file) in [
        ("guest", "guest-latency-cdf.svg"),
        ("host", "host-latency-cdf.svg"),
    ] {
        let series: Vec<(String, Vec<(f64, f64)>)> = ordered
            .iter()
            .map(|result| {
                let (histogram, samples) = if side == "guest" {
                    (&result.guest.histogram, result.guest.latency.samples)
                } else {
                    (&result.host.histogram, result.host.latency.samples)
                };
                (result.name.clone(), cdf_points(histogram, samples))
            })
            .collect();
        let title = format!(
            "{side} cyclictest latency CDF ({accel}, {} µs interval, busy host)",
            results.params.interval_us
        );
        let path = dir.join(file);
        fs::write(&path, cdf_svg(&title, &series)).map_err(LabError::io("write", &path))?;
        plots.push(path);
    }
    Ok(ReportFiles {
        json,
        markdown: markdown_path,
        plots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_chart_has_one_bar_per_value_and_one_legend_entry_per_series() {
        let svg = bar_chart_svg(
            "score <per VM>",
            "messages/s",
            &[
                (
                    "vanilla".into(),
                    vec![
                        ("vm0 (4 vCPUs)".into(), 900.0),
                        ("vm1 (2 vCPUs)".into(), 1200.0),
                    ],
                ),
                (
                    "pvsched".into(),
                    vec![
                        ("vm0 (4 vCPUs)".into(), 1900.0),
                        ("vm1 (2 vCPUs)".into(), 1000.0),
                    ],
                ),
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Four bars, two legend swatches, the background and the frame.
        assert_eq!(svg.matches("<rect").count(), 4 + 2 + 2);
        assert_eq!(svg.matches("vm0 (4 vCPUs)</text>").count(), 1);
        assert!(svg.contains(">1900<"), "{svg}");
        assert!(svg.contains("score &lt;per VM&gt;"));
        // The axis ends at the next round number above the tallest bar.
        assert!(svg.contains(">2000<"), "{svg}");
        assert_eq!(nice_ceiling(1900.0), 2000.0);
        assert_eq!(nice_ceiling(2100.0), 2500.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }

    #[test]
    fn cdf_counts_overflows_in_the_total() {
        let points = cdf_points(&[(10, 50), (20, 40)], 100);
        assert_eq!(points, [(10.0, 0.5), (20.0, 0.9)]);
        assert!(cdf_points(&[], 0).is_empty());
    }

    #[test]
    fn svg_has_one_path_per_non_empty_series() {
        let svg = cdf_svg(
            "t <x>",
            &[
                ("a".into(), vec![(5.0, 0.5), (2000.0, 1.0)]),
                ("b".into(), vec![]),
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<path").count(), 1);
        assert!(svg.contains("t &lt;x&gt;"));
        assert!(svg.contains(">1 ms<"));
    }
}
