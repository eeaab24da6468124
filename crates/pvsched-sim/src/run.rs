//! Running a scenario under each of its policies, on one host or a fleet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{RunMode, Scenario, VmConfig};
use crate::model::{GroupInfo, HaltPollCtlStats, HostOutcome, LimitViolations, Sim};
use crate::stats::{jain, Acct, Hist, VmStats, N_ACCT};
use crate::{Nanos, ScenarioError};

/// How to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The seed.
    pub seed: u64,
    /// Check invariants after every event (slow; tests).
    pub check: bool,
    /// Print a progress bar on stderr.
    pub progress: bool,
    /// Run on one thread (bench: events/s per core).
    pub single_thread: bool,
}

/// One VM row (VMs of the same name merged over replicas and hosts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmResult {
    /// VM name.
    pub name: String,
    /// vCPUs per VM.
    pub vcpus: u32,
    /// VMs merged into this row.
    pub instances: u64,
    /// Throughput score: 100 × geometric mean over scored task groups of
    /// (ops/s ÷ ops/s of one copy on a dedicated pCPU). Model output.
    pub score: Option<f64>,
    /// Latency percentiles of the measured tasks, µs. Model output.
    pub lat_p50_us: Option<f64>,
    /// 99th percentile, µs.
    pub lat_p99_us: Option<f64>,
    /// Maximum, µs.
    pub lat_max_us: Option<f64>,
    /// Mean, µs.
    pub lat_avg_us: Option<f64>,
    /// Latency samples.
    pub lat_samples: u64,
    /// vCPU wake-up latency, mean, µs: from the interrupt that ends a halt
    /// to guest code running. Model output.
    #[serde(default)]
    pub wake_avg_us: Option<f64>,
    /// 99th percentile, µs.
    #[serde(default)]
    pub wake_p99_us: Option<f64>,
    /// Fraction of vCPU time spent spinning on locks.
    pub spin_frac: Option<f64>,
    /// Fraction of vCPU time runnable but not running.
    pub steal_frac: Option<f64>,
    /// Fraction of vCPU time doing guest work.
    pub useful_frac: f64,
    /// Fraction of vCPU time halt-polling.
    pub poll_frac: f64,
    /// Fraction of vCPU time in exits, wakeups and emulation.
    pub overhead_frac: f64,
    /// Fraction of vCPU time halted.
    pub idle_frac: f64,
    /// Jain's index of useful CPU over the VM's vCPUs.
    pub fairness: Option<f64>,
    /// Engine boosts (pvsched only).
    pub boosts: Option<u64>,
    /// Engine throttles (pvsched only).
    pub throttles: Option<u64>,
    /// Engine lock-holder grants (pvsched only; non-zero only where the daemon
    /// reads preempt counts from guest RAM).
    #[serde(default)]
    pub lock_grants: Option<u64>,
    /// Engine steps at which a vCPU with preemption disabled, kept off a CPU, got no
    /// grant because of `lock_holder_max_grants` (pvsched only).
    #[serde(default)]
    pub lock_grants_capped: Option<u64>,
    /// Of the grants, those granted while the vCPU held a guest spinlock (model's view).
    #[serde(default)]
    pub lock_grants_holding: Option<u64>,
    /// Of those, granted while the vCPU waited for a guest spinlock.
    #[serde(default)]
    pub lock_grants_waiting: Option<u64>,
    /// Operations per second per scored group.
    pub ops_per_s: Vec<(String, f64)>,
}

/// Host-wide figures of one policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostResult {
    /// Host latency probe percentiles, µs (null without a probe).
    pub lat_p50_us: Option<f64>,
    /// 99th percentile, µs.
    pub lat_p99_us: Option<f64>,
    /// Maximum, µs.
    pub lat_max_us: Option<f64>,
    /// pCPU time fractions by category: idle, useful, spin, poll, overhead, host, noise, emu.
    pub cpu: Vec<(String, f64)>,
    /// Host load threads' waits for a CPU (runnable, not running), ms per
    /// second, summed over the threads (null without host load).
    #[serde(default)]
    pub load_wait_ms_per_s: Option<f64>,
    /// What the halt-poll controller did (null unless the policy runs it).
    #[serde(default)]
    pub halt_poll: Option<HaltPollSummary>,
}

/// The halt-poll controller's rounds over the measured interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HaltPollSummary {
    /// Rounds, summed over hosts.
    pub rounds: u64,
    /// Rounds that changed the parameters.
    pub writes: u64,
    /// Mean `halt_poll_ns` in force.
    pub mean_halt_poll_ns: Option<f64>,
    /// Rounds per decision reason.
    pub reasons: Vec<(String, u64)>,
}

/// Results of one policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyResult {
    /// Policy name.
    pub policy: String,
    /// One row per VM name.
    pub vms: Vec<VmResult>,
    /// Host figures.
    pub host: HostResult,
    /// Events processed.
    pub events: u64,
    /// Policy limits exceeded (must be 0).
    pub limit_violations: u64,
    /// The same, by limit.
    pub limits: LimitViolations,
    /// Largest amount, ns, by which a vCPU's exact boosted CPU time in a budget
    /// window passed the engine's budget. The engine charges CPU time as `schedstat`
    /// shows it, which lags a running thread by up to a host tick, so a boost that
    /// ends while the thread runs can escape up to a tick of charge.
    #[serde(default)]
    pub budget_overshoot_ns: u64,
    /// Invariant violations (with `check`).
    pub invariant_violations: Vec<String>,
}

/// The result of `sim run`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Events processed over all runs.
    pub events: u64,
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// Simulated seconds per run (warm-up excluded).
    pub simulated_s: f64,
    /// Hosts per run.
    pub hosts: u32,
    /// Trace hash over all runs, hex.
    pub trace_hash: String,
    /// One entry per policy.
    pub results: Vec<PolicyResult>,
}

struct Job {
    policy: usize,
    host: u32,
    vms: Vec<VmConfig>,
}

/// Runs every policy of `sc` and returns the merged results.
pub fn run_scenario(sc: &Scenario, opt: &RunOptions) -> Result<RunResult, ScenarioError> {
    sc.validate()?;
    let start = Instant::now();
    let mut jobs = Vec::new();
    for p in 0..sc.policies.len() {
        for host in 0..sc.hosts {
            match sc.mode {
                RunMode::Together => jobs.push(Job {
                    policy: p,
                    host,
                    vms: expand(&sc.vms),
                }),
                RunMode::Each => {
                    for vm in &sc.vms {
                        jobs.push(Job {
                            policy: p,
                            host,
                            vms: expand(std::slice::from_ref(vm)),
                        })
                    }
                }
            }
        }
    }
    // Fail fast on configuration errors before spawning work.
    for j in jobs.iter().take(sc.policies.len()) {
        Sim::new(sc, &j.vms, &sc.policies[j.policy], opt.seed, 0)?;
    }
    let total = jobs.len() as u64 * sc.total_ns();
    let done = AtomicU64::new(0);
    let shown = AtomicU64::new(0);
    let run_job = |(i, j): (usize, &Job)| -> Result<HostOutcome, ScenarioError> {
        let stream = (j.host as u64) << 20 | i as u64;
        // Policies of one host share the RNG stream so they see the same workload draws.
        let stream = if sc.mode == RunMode::Each {
            stream
        } else {
            u64::from(j.host) << 20
        };
        let mut sim = Sim::new(sc, &j.vms, &sc.policies[j.policy], opt.seed, stream)?;
        sim.check = opt.check;
        let mut last = 0u64;
        let end = sc.total_ns();
        let mut cb = |f: f64| {
            if !opt.progress {
                return;
            }
            let now = (f * end as f64) as u64;
            let d = now.saturating_sub(last);
            last = now;
            let all = done.fetch_add(d, Ordering::Relaxed) + d;
            let pct = all * 100 / total.max(1);
            if pct > shown.load(Ordering::Relaxed) {
                shown.store(pct, Ordering::Relaxed);
                let bar = "#".repeat((pct / 4) as usize);
                eprint!("\r[{bar:<25}] {pct:3}%");
                if pct >= 100 {
                    eprintln!();
                }
            }
        };
        sim.run(&mut cb);
        Ok(sim.outcome())
    };
    let outcomes: Vec<Result<HostOutcome, ScenarioError>> = if opt.single_thread {
        jobs.iter().enumerate().map(run_job).collect()
    } else {
        jobs.par_iter().enumerate().map(run_job).collect()
    };
    let mut per_policy: Vec<Vec<HostOutcome>> =
        (0..sc.policies.len()).map(|_| Vec::new()).collect();
    let mut hash = crate::TraceHash::default();
    let mut events = 0;
    for (j, o) in jobs.iter().zip(outcomes) {
        let o = o?;
        hash.fold(o.hash);
        events += o.events;
        per_policy[j.policy].push(o);
    }
    let results = sc
        .policies
        .iter()
        .zip(per_policy)
        .map(|(p, outs)| summarize(&p.name, &outs, p.pvsched.is_some()))
        .collect();
    if opt.progress {
        eprint!("\r{:40}\r", "");
    }
    Ok(RunResult {
        scenario: sc.name.clone(),
        seed: opt.seed,
        events,
        wall_s: start.elapsed().as_secs_f64(),
        simulated_s: sc.duration_ms as f64 / 1000.0,
        hosts: sc.hosts,
        trace_hash: format!("{:016x}", hash.0),
        results,
    })
}

fn expand(vms: &[VmConfig]) -> Vec<VmConfig> {
    let mut out = Vec::new();
    for vm in vms {
        for _ in 0..vm.count {
            out.push(vm.clone());
        }
    }
    out
}

fn opt_us(v: Option<Nanos>) -> Option<f64> {
    v.map(|x| x as f64 / 1000.0)
}

/// Merges host outcomes of one policy into result rows.
pub fn summarize(policy: &str, outs: &[HostOutcome], pvsched: bool) -> PolicyResult {
    let mut names: Vec<String> = Vec::new();
    let mut merged: Vec<(u32, Vec<GroupInfo>, VmStats, Nanos)> = Vec::new();
    let mut host_lat = Hist::default();
    let mut host_acct = [0u64; N_ACCT];
    let mut host_total = 0u64;
    let mut events = 0;
    let mut limits = LimitViolations::default();
    let mut budget_overshoot_ns = 0;
    let mut violations = Vec::new();
    let mut load_wait_ns = 0u64;
    let mut load_ns = 0u64;
    let mut halt_poll: Option<HaltPollCtlStats> = None;
    for o in outs {
        events += o.events;
        load_wait_ns += o.load_wait_ns;
        load_ns += o.measured_ns * u64::from(o.load_threads.min(1));
        if let Some(h) = &o.halt_poll {
            halt_poll.get_or_insert_with(Default::default).merge(h);
        }
        host_lat.merge(&o.host_lat);
        for (sum, x) in host_acct.iter_mut().zip(o.host_acct) {
            *sum += x;
        }
        host_total += o.measured_ns * u64::from(o.pcpus);
        limits.budget += o.limits.budget;
        limits.continuous += o.limits.continuous;
        limits.rt_runtime += o.limits.rt_runtime;
        limits.poll += o.limits.poll;
        budget_overshoot_ns = budget_overshoot_ns.max(o.budget_overshoot_ns);
        violations.extend(o.violations.iter().take(4).cloned());
        for (name, vcpus, groups, stats) in &o.vms {
            match names.iter().position(|n| n == name) {
                Some(i) => {
                    merged[i].2.merge(stats);
                    merged[i].3 += o.measured_ns * stats.instances;
                }
                None => {
                    names.push(name.clone());
                    merged.push((
                        *vcpus,
                        groups.clone(),
                        stats.clone(),
                        o.measured_ns * stats.instances,
                    ));
                }
            }
        }
    }
    let vms = names
        .into_iter()
        .zip(merged)
        .map(|(name, (vcpus, groups, s, vm_ns))| vm_row(name, vcpus, &groups, &s, vm_ns, pvsched))
        .collect();
    let frac = |x: u64| {
        if host_total == 0 {
            0.0
        } else {
            x as f64 / host_total as f64
        }
    };
    let cats = [
        "idle", "useful", "spin", "poll", "overhead", "host", "noise", "emu",
    ];
    PolicyResult {
        policy: policy.to_string(),
        vms,
        host: HostResult {
            lat_p50_us: opt_us(host_lat.quantile(0.5)),
            lat_p99_us: opt_us(host_lat.quantile(0.99)),
            lat_max_us: (host_lat.count > 0).then(|| host_lat.max as f64 / 1000.0),
            cpu: cats
                .iter()
                .zip(host_acct)
                .map(|(c, x)| (c.to_string(), frac(x)))
                .collect(),
            load_wait_ms_per_s: (load_ns > 0)
                .then(|| load_wait_ns as f64 * 1000.0 / load_ns as f64),
            halt_poll: halt_poll.map(|h| HaltPollSummary {
                rounds: h.rounds,
                writes: h.writes,
                mean_halt_poll_ns: h.mean_halt_poll_ns(),
                reasons: h.reasons_by_name(),
            }),
        },
        events,
        limit_violations: limits.budget + limits.continuous + limits.rt_runtime + limits.poll,
        limits,
        budget_overshoot_ns,
        invariant_violations: violations,
    }
}

fn vm_row(
    name: String,
    vcpus: u32,
    groups: &[GroupInfo],
    s: &VmStats,
    vm_ns: Nanos,
    pvsched: bool,
) -> VmResult {
    let vcpu_ns = (vm_ns as f64 * f64::from(vcpus)).max(1.0);
    let secs = vm_ns as f64 / 1e9 / s.instances.max(1) as f64;
    let f = |a: Acct| s.acct[a as usize] as f64 / vcpu_ns;
    let mut logsum = 0.0;
    let mut n = 0;
    let mut ops_per_s = Vec::new();
    for (g, info) in groups.iter().enumerate() {
        let ops = s.ops.get(g).copied().unwrap_or(0) as f64 / s.instances.max(1) as f64;
        let rate = ops / secs.max(1e-12);
        if info.scored {
            ops_per_s.push((info.name.clone(), rate));
            let rel = rate / info.ref_ops_per_s;
            logsum += rel.max(1e-6).ln();
            n += 1;
        }
    }
    let spin = f(Acct::Spin);
    VmResult {
        name,
        vcpus,
        instances: s.instances,
        score: (n > 0).then(|| 100.0 * (logsum / n as f64).exp()),
        lat_p50_us: opt_us(s.lat.quantile(0.5)),
        lat_p99_us: opt_us(s.lat.quantile(0.99)),
        lat_max_us: (s.lat.count > 0).then(|| s.lat.max as f64 / 1000.0),
        lat_avg_us: s.lat.mean().map(|m| m / 1000.0),
        lat_samples: s.lat.count,
        wake_avg_us: s.wake_lat.mean().map(|m| m / 1000.0),
        wake_p99_us: opt_us(s.wake_lat.quantile(0.99)),
        spin_frac: Some(spin),
        steal_frac: Some(s.steal as f64 / vcpu_ns),
        useful_frac: f(Acct::Useful),
        poll_frac: f(Acct::Poll),
        overhead_frac: f(Acct::Overhead),
        idle_frac: s.halted as f64 / vcpu_ns,
        fairness: jain(&s.vcpu_useful),
        boosts: pvsched.then_some(s.boosts),
        throttles: pvsched.then_some(s.throttles),
        lock_grants: pvsched.then_some(s.lock_grants),
        lock_grants_capped: pvsched.then_some(s.lock_capped),
        lock_grants_holding: pvsched.then_some(s.grants_to_holders),
        lock_grants_waiting: pvsched.then_some(s.grants_to_waiters),
        ops_per_s,
    }
}

/// Runs the parts of a built-in one after the other and merges them into one
/// result, naming each policy `part/policy` when there are several parts.
pub fn run_parts(
    name: &str,
    parts: &[Scenario],
    opt: &RunOptions,
) -> Result<RunResult, ScenarioError> {
    let start = Instant::now();
    let mut merged: Option<RunResult> = None;
    let mut hash = crate::TraceHash::default();
    for part in parts {
        let mut r = run_scenario(part, opt)?;
        if parts.len() > 1 {
            let suffix = part
                .name
                .rsplit('/')
                .next()
                .unwrap_or(&part.name)
                .to_string();
            for p in &mut r.results {
                p.policy = format!("{suffix}/{}", p.policy);
            }
        }
        hash.fold(u64::from_str_radix(&r.trace_hash, 16).unwrap_or(0));
        match &mut merged {
            None => merged = Some(r),
            Some(m) => {
                m.events += r.events;
                m.results.extend(r.results);
            }
        }
    }
    let mut m = merged.ok_or_else(|| ScenarioError::Invalid("no parts".into()))?;
    m.scenario = name.to_string();
    m.wall_s = start.elapsed().as_secs_f64();
    m.trace_hash = format!("{:016x}", hash.0);
    Ok(m)
}
