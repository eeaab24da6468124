//! A small SVG chart of a run, written by hand (no plotting crate).

use std::fmt::Write;

use crate::run::RunResult;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Horizontal bars per policy and VM: latency p50/p99 (log scale) on the
/// left, score on the right (when the scenario has one).
pub fn chart(r: &RunResult) -> String {
    type Row = (String, Option<f64>, Option<f64>, Option<f64>);
    let rows: Vec<Row> = r
        .results
        .iter()
        .flat_map(|p| {
            p.vms.iter().map(move |v| {
                (
                    format!("{} / {}", p.policy, v.name),
                    v.lat_p50_us,
                    v.lat_p99_us,
                    v.score,
                )
            })
        })
        .collect();
    let row_h = 22.0;
    let label_w = 260.0;
    let bar_w = 300.0;
    let width = label_w + 2.0 * bar_w + 60.0;
    let height = 60.0 + row_h * rows.len() as f64;
    let lat_max = rows
        .iter()
        .filter_map(|r| r.2.or(r.1))
        .fold(1.0f64, f64::max);
    let score_max = rows.iter().filter_map(|r| r.3).fold(0.0f64, f64::max);
    let log = |x: f64| (x.max(1.0).ln() / lat_max.max(10.0).ln()).clamp(0.0, 1.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="14">{} (seed {}) — model outputs</text>"#,
        esc(&r.scenario),
        r.seed
    );
    let _ = writeln!(
        s,
        r#"<text x="{label_w}" y="38">latency p50 (dark) / p99 (light), µs, log scale, max {lat_max:.0}</text>"#
    );
    if score_max > 0.0 {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="38">score (max {score_max:.0})</text>"#,
            label_w + bar_w + 30.0
        );
    }
    for (i, (label, p50, p99, score)) in rows.iter().enumerate() {
        let y = 50.0 + row_h * i as f64;
        let _ = writeln!(s, r#"<text x="10" y="{}">{}</text>"#, y + 14.0, esc(label));
        if let Some(p99) = p99 {
            let _ = writeln!(
                s,
                r##"<rect x="{label_w}" y="{}" width="{:.1}" height="16" fill="#9ecae1"/>"##,
                y + 2.0,
                bar_w * log(*p99)
            );
        }
        if let Some(p50) = p50 {
            let _ = writeln!(
                s,
                r##"<rect x="{label_w}" y="{}" width="{:.1}" height="16" fill="#3182bd"/><text x="{:.1}" y="{}">{p50:.1}</text>"##,
                y + 2.0,
                bar_w * log(*p50),
                label_w + 4.0 + bar_w * log(p99.unwrap_or(*p50)),
                y + 14.0
            );
        }
        if let (Some(sc), true) = (score, score_max > 0.0) {
            let x = label_w + bar_w + 30.0;
            let _ = writeln!(
                s,
                r##"<rect x="{x}" y="{}" width="{:.1}" height="16" fill="#31a354"/><text x="{:.1}" y="{}">{sc:.0}</text>"##,
                y + 2.0,
                bar_w * sc / score_max,
                x + 4.0 + bar_w * sc / score_max,
                y + 14.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
