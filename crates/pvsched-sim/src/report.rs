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

/// The halt-poll comparison: per host load level and configuration, the
/// vCPU wake-up latency and request-response latency of VM `vm` against the
/// host CPU spent polling and the wait of host tasks (background load
/// threads) for a CPU; the last column is the extra wait against
/// `fixed-0us` at the same load, the CPU polling denied them. Policies are
/// named `level/config` (a built-in's parts) or `config`.
pub fn halt_poll_table(r: &RunResult, vm: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| host load | config | pCPU busy % | {vm} wake avg us | wake p99 us | RR avg us | RR p99 us | host CPU polling % | host tasks wait ms/s | denied vs fixed-0us ms/s | halt_poll_ns (mean) | controller rounds |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let split = |name: &str| match name.rsplit_once('/') {
        Some((level, config)) => (level.to_string(), config.to_string()),
        None => ("-".to_string(), name.to_string()),
    };
    let host_cpu = |p: &crate::run::PolicyResult, cat: &str| {
        p.host.cpu.iter().find(|(c, _)| c == cat).map(|(_, x)| *x)
    };
    for p in &r.results {
        let (level, config) = split(&p.policy);
        let base = r.results.iter().find(|b| {
            let (l, c) = split(&b.policy);
            l == level && c == "fixed-0us"
        });
        let denied = base
            .and_then(|b| b.host.load_wait_ms_per_s)
            .zip(p.host.load_wait_ms_per_s)
            .map(|(b, w)| w - b);
        let row = p.vms.iter().find(|v| v.name == vm);
        let f = |g: fn(&crate::run::VmResult) -> Option<f64>| row.and_then(g);
        let (mean_ns, rounds) = match &p.host.halt_poll {
            Some(h) => (
                num(h.mean_halt_poll_ns, 0),
                h.reasons
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {level} | {config} | {} | {} | {} | {} | {} | {} | {} | {} | {mean_ns} | {rounds} |",
            pct(host_cpu(p, "idle").map(|i| 1.0 - i)),
            num(f(|v| v.wake_avg_us), 1),
            num(f(|v| v.wake_p99_us), 1),
            num(f(|v| v.lat_avg_us), 1),
            num(f(|v| v.lat_p99_us), 1),
            num(host_cpu(p, "poll").map(|x| x * 100.0), 2),
            num(p.host.load_wait_ms_per_s, 1),
            num(denied, 1),
        );
    }
    out
}
