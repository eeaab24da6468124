//! Text tables of a run.

use std::fmt::Write;

use crate::run::RunResult;

fn num(x: Option<f64>, prec: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        _ => "-".into(),
    }
}

fn pct(x: Option<f64>) -> String {
    match x {
        Some(v) => format!("{:.1}", v * 100.0),
        None => "-".into(),
    }
}

/// The result as a Markdown table: one row per policy and VM.
pub fn table(r: &RunResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {} | seed {} | {:.1} s simulated x {} host(s) | {} events in {:.2} s wall | trace {}",
        r.scenario, r.seed, r.simulated_s, r.hosts, r.events, r.wall_s, r.trace_hash
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| policy | vm | vCPUs | score | lat p50 us | lat p99 us | lat max us | lat avg us | useful % | spin % | poll % | steal % | fair | boosts/thr | host p99 us | host max us |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &r.results {
        for v in &p.vms {
            let bt = match (v.boosts, v.throttles) {
                (Some(b), Some(t)) => format!("{b}/{t}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.policy,
                v.name,
                v.vcpus,
                num(v.score, 0),
                num(v.lat_p50_us, 1),
                num(v.lat_p99_us, 1),
                num(v.lat_max_us, 0),
                num(v.lat_avg_us, 1),
                pct(Some(v.useful_frac)),
                pct(v.spin_frac),
                pct(Some(v.poll_frac)),
                pct(v.steal_frac),
                num(v.fairness, 2),
                bt,
                num(p.host.lat_p99_us, 0),
                num(p.host.lat_max_us, 0),
            );
        }
        if p.limit_violations > 0 || !p.invariant_violations.is_empty() {
            let _ = writeln!(
                out,
                "| {} | LIMIT VIOLATIONS {:?} | invariants: {:?} |",
                p.policy, p.limits, p.invariant_violations
            );
        }
    }
    out
}

/// CSV of the same rows.
pub fn csv(r: &RunResult) -> String {
    let mut out = String::from(
        "policy,vm,vcpus,score,lat_p50_us,lat_p99_us,lat_max_us,lat_avg_us,useful_frac,spin_frac,poll_frac,steal_frac,fairness,host_lat_p99_us,host_lat_max_us\n",
    );
    let o = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_default();
    for p in &r.results {
        for v in &p.vms {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{:.4},{},{:.4},{},{},{},{}",
                p.policy,
                v.name,
                v.vcpus,
                o(v.score),
                o(v.lat_p50_us),
                o(v.lat_p99_us),
                o(v.lat_max_us),
                o(v.lat_avg_us),
                v.useful_frac,
                o(v.spin_frac),
                v.poll_frac,
                o(v.steal_frac),
                o(v.fairness),
                o(p.host.lat_p99_us),
                o(p.host.lat_max_us),
            );
        }
    }
    out
}
