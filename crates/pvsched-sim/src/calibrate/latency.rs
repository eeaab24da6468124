//! The latency experiment: fit the model's free costs on the lab's baseline
//! configurations, then predict the others.
//!
//! The fit configurations are those the lab runs without any scheduling change and
//! without a rogue guest (`scheduling = "vanilla"`, `rogue = false`: the lab's
//! `idle` and `vanilla`). Every other configuration is held out: it is simulated
//! with the fitted parameters frozen and its error is reported separately.
//!
//! The fit is a coordinate search over fixed grids ([`FIT_GRID`]), parameter by
//! parameter in a fixed order, [`FIT_SWEEPS`] sweeps, from [`ModelParams::default`].
//! A candidate's cost is the mean over the fit configurations and their figures
//! (guest avg, guest p99, guest samples per second, host p99) of
//! |ln(simulated / measured)|, each candidate simulated over the same seeds for the
//! same duration; a change is kept only if it lowers the cost. `translation_factor`
//! is not on the grid: nothing in the baseline configurations measures the guest's
//! own CPU use, which it sets (docs/sim.md, "Calibration"). The procedure is
//! deterministic: the same results, seeds and
//! duration give the same parameters.

use std::fmt::Write;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{get, num, opt_num, rel, CalibrateError};
use crate::config::*;
use crate::run::{run_scenario, PolicyResult, RunOptions};
use pvsched_policy::PolicyConfig;

/// The run parameters the simulation reproduces.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabParams {
    /// vCPUs of the guest.
    pub vcpus: u32,
    /// cyclictest interval, µs.
    pub interval_us: u64,
    /// Measured duration, s.
    pub duration_s: f64,
    /// Host pCPUs.
    pub host_cpus: u32,
    /// stress-ng `--cpu`, `--iomix`, `--vm`, `--fork`.
    pub load: [u32; 4],
    /// Guest cyclictest priority.
    pub guest_rt_prio: u8,
    /// Static RT priority.
    pub static_rt_prio: u8,
    /// Host cyclictest priority (0: fair class).
    pub host_cyclictest_prio: u8,
    /// Daemon period, µs.
    pub hostd_period_us: u64,
    /// The boost policy the daemon ran with: the lab's `params.hostd_policy`, or,
    /// in results written before the lab recorded it, [`policy_before_recorded`].
    pub hostd_policy: PolicyConfig,
    /// `kvm` or `tcg`.
    pub accelerator: String,
}

/// One configuration's measured figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabConfig {
    /// Configuration name.
    pub name: String,
    /// What the host did to the VM's threads: `vanilla`, `static-rt`,
    /// `static-rt-all`, `pvsched` (from the configuration's `scheduling`, else
    /// its name without a `rogue-` prefix).
    pub scheduling: String,
    /// The guest ran an RT hog on its last vCPU.
    pub rogue: bool,
    /// The host ran no stress load.
    pub idle: bool,
    /// Guest latency, µs.
    pub guest_avg_us: f64,
    /// 99th percentile, µs.
    pub guest_p99_us: f64,
    /// Maximum, µs.
    pub guest_max_us: f64,
    /// Samples.
    pub guest_samples: u64,
    /// Host cyclictest 99th percentile, µs.
    pub host_p99_us: Option<f64>,
    /// Host cyclictest maximum, µs.
    pub host_max_us: Option<f64>,
    /// Host stress throughput.
    pub host_bogo_ops_per_s: Option<f64>,
    /// Boosts.
    pub boosts: Option<u64>,
    /// Throttles.
    pub throttles: Option<u64>,
}

impl LabConfig {
    /// A fit configuration: no scheduling change, no rogue guest.
    pub fn is_baseline(&self) -> bool {
        self.scheduling == "vanilla" && !self.rogue
    }
}

/// The model's free costs: what the fit chooses. Everything else in the
/// simulated scenario follows from the lab's parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelParams {
    /// TCG: mean main-loop CPU per guest timer it fires, ns.
    pub main_loop_ns: u64,
    /// TCG: guest time of translated code against native.
    pub translation_factor: f64,
    /// Host: a blocked vCPU thread woken until guest code runs, ns.
    pub vcpu_wake_cost_ns: u64,
    /// Host kernel noise: mean gap between non-preemptible sections on each CPU, µs.
    pub noise_gap_us: u64,
    /// Host kernel noise: mean length of a non-preemptible section, ns.
    pub noise_ns: u64,
    /// stress-ng: share of time the non-CPU stressors (iomix, vm, fork) want a CPU.
    pub stress_duty: f64,
    /// Host: a pCPU idle longer than `idle_poll_us` takes this long to run a thread, ns.
    pub idle_exit_ns: u64,
    /// Host: idle up to this long, a pCPU wakes at once, µs.
    pub idle_poll_us: u64,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            main_loop_ns: 30_000,
            translation_factor: 10.0,
            vcpu_wake_cost_ns: 6_000,
            noise_gap_us: 20_000,
            noise_ns: 30_000,
            stress_duty: 0.7,
            idle_exit_ns: 0,
            idle_poll_us: 0,
        }
    }
}

impl ModelParams {
    /// Reads parameters written by `--fit-out` (TOML); unknown keys and values out
    /// of range are errors.
    pub fn from_toml(text: &str) -> Result<Self, CalibrateError> {
        let p: ModelParams =
            toml::from_str(text).map_err(|e| CalibrateError::Params(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// As TOML, with a comment naming where the values came from.
    pub fn to_toml(&self, origin: &str) -> String {
        let body = toml::to_string(self).expect("plain fields serialize");
        format!("# pvsched sim calibrate: model parameters fitted on {origin}\n{body}")
    }

    fn validate(&self) -> Result<(), CalibrateError> {
        let bad = |what: &str| Err(CalibrateError::Params(what.into()));
        if self.main_loop_ns > 10_000_000 {
            return bad("main_loop_ns must be <= 10000000");
        }
        if !(1.0..=1000.0).contains(&self.translation_factor) {
            return bad("translation_factor must be 1..=1000");
        }
        if self.vcpu_wake_cost_ns > 10_000_000 {
            return bad("vcpu_wake_cost_ns must be <= 10000000");
        }
        if self.noise_gap_us == 0 || self.noise_gap_us > 100_000_000 {
            return bad("noise_gap_us must be 1..=100000000");
        }
        if self.noise_ns > 100_000_000 {
            return bad("noise_ns must be <= 100000000");
        }
        if !(0.0..=1.0).contains(&self.stress_duty) {
            return bad("stress_duty must be 0..=1");
        }
        if self.idle_exit_ns > 10_000_000 {
            return bad("idle_exit_ns must be <= 10000000");
        }
        if self.idle_poll_us > 1_000_000 {
            return bad("idle_poll_us must be <= 1000000");
        }
        Ok(())
    }
}

/// The grids of the coordinate search, in the order the parameters are visited.
pub const FIT_GRID: [(&str, &[f64]); 7] = [
    (
        "noise_gap_us",
        &[500.0, 1e3, 2e3, 5e3, 10e3, 20e3, 50e3, 100e3],
    ),
    ("noise_ns", &[10e3, 20e3, 40e3, 70e3, 100e3, 150e3]),
    ("idle_exit_ns", &[0.0, 10e3, 20e3, 40e3, 60e3, 90e3]),
    ("idle_poll_us", &[0.0, 50.0, 100.0, 200.0, 400.0, 800.0]),
    (
        "main_loop_ns",
        &[5e3, 10e3, 20e3, 30e3, 45e3, 60e3, 80e3, 110e3, 150e3],
    ),
    ("vcpu_wake_cost_ns", &[1e3, 2e3, 6e3, 15e3, 30e3, 50e3]),
    ("stress_duty", &[0.3, 0.5, 0.7, 0.85, 1.0]),
];

/// Sweeps of the coordinate search.
pub const FIT_SWEEPS: usize = 3;

fn set_param(p: &mut ModelParams, name: &str, x: f64) {
    match name {
        "translation_factor" => p.translation_factor = x,
        "main_loop_ns" => p.main_loop_ns = x as u64,
        "vcpu_wake_cost_ns" => p.vcpu_wake_cost_ns = x as u64,
        "stress_duty" => p.stress_duty = x,
        "idle_exit_ns" => p.idle_exit_ns = x as u64,
        "idle_poll_us" => p.idle_poll_us = x as u64,
        "noise_gap_us" => p.noise_gap_us = x as u64,
        "noise_ns" => p.noise_ns = x as u64,
        _ => unreachable!("FIT_GRID names a field of ModelParams"),
    }
}

/// How to calibrate.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seed of the prediction runs.
    pub seed: u64,
    /// Simulated seconds per held-out configuration at most (the lab's when shorter).
    pub max_duration_s: f64,
    /// Use these parameters instead of fitting.
    pub params: Option<ModelParams>,
    /// Seeds every fit candidate is simulated over.
    pub fit_seeds: Vec<u64>,
    /// Simulated seconds per fit configuration and seed.
    pub fit_duration_s: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seed: 1,
            max_duration_s: 20.0,
            params: None,
            fit_seeds: vec![1, 2],
            fit_duration_s: 5.0,
        }
    }
}

/// One compared figure.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Configuration.
    pub config: String,
    /// A baseline configuration: fitted on when the parameters were fitted on
    /// this result (else held out).
    pub fitted: bool,
    /// Figure.
    pub metric: String,
    /// Simulated value.
    pub simulated: Option<f64>,
    /// Measured value.
    pub measured: Option<f64>,
    /// (simulated − measured) / measured.
    pub rel_error: Option<f64>,
}

/// One ordering of two configurations the lab measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ordering {
    /// The configuration expected to be better or worse.
    pub a: String,
    /// The one it is compared with.
    pub b: String,
    /// Figure.
    pub metric: String,
    /// a < b in the lab.
    pub lab_a_lower: bool,
    /// a < b in the model.
    pub sim_a_lower: bool,
}

/// Error summary of the held-out configurations.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Median |relative error| of held-out guest avg and p99.
    pub guest_median: Option<f64>,
    /// Largest factor between simulated and measured over those rows (>= 1).
    pub guest_worst_factor: Option<f64>,
    /// Median |relative error| of held-out host p99.
    pub host_p99_median: Option<f64>,
    /// Orderings that agree, of those compared.
    pub orderings_matched: usize,
    /// Orderings compared.
    pub orderings: usize,
    /// Median |relative error| of the baseline configurations' guest avg and p99.
    pub fit_guest_median: Option<f64>,
}

/// The comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    /// What the lab ran.
    pub params: LabParams,
    /// The model parameters used (fitted here or given).
    pub model: ModelParams,
    /// The parameters were fitted on this result (else given).
    pub fitted_here: bool,
    /// Fit cost of the chosen parameters (when fitted here).
    pub fit_cost: Option<f64>,
    /// Simulated seconds per configuration.
    pub simulated_s: f64,
    /// Side by side.
    pub rows: Vec<Row>,
    /// Pairs the lab orders, both ways.
    pub orderings: Vec<Ordering>,
    /// Held-out errors.
    pub summary: Summary,
    /// Median absolute relative error over every latency row.
    pub median_abs_rel_error: Option<f64>,
    /// The simulation's result per configuration.
    pub simulation: Vec<PolicyResult>,
}

/// The daemon's defaults when the lab did not yet record its policy in the
/// results: budgets of 30 ms per VM per 100 ms, 5 ms per VM per 10 ms and 25% of
/// the host, and no repeat-offender cut.
pub fn policy_before_recorded() -> PolicyConfig {
    PolicyConfig {
        vm_budget_ns: 30_000_000,
        vm_burst_ns: 5_000_000,
        host_budget_percent: 25,
        offender_streak: 0,
        ..PolicyConfig::default()
    }
}

/// Reads the lab's parameters and configurations.
pub fn parse(text: &str) -> Result<(LabParams, Vec<LabConfig>), CalibrateError> {
    let v: Value = serde_json::from_str(text)?;
    let p = get(&v, "params").ok_or_else(|| CalibrateError::Field("params".into()))?;
    let load = get(p, "load").or_else(|| get(p, "host_load"));
    let load_n = |k: &str| {
        load.and_then(|l| l.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(64) as u32
    };
    let params = LabParams {
        vcpus: num(p, "vcpus")?.clamp(0.0, 64.0) as u32,
        interval_us: num(p, "interval_us")?.clamp(0.0, 1e6) as u64,
        duration_s: num(p, "duration_s")?,
        host_cpus: opt_num(p, "host_cpus").unwrap_or(2.0).clamp(1.0, 64.0) as u32,
        load: [load_n("cpu"), load_n("iomix"), load_n("vm"), load_n("fork")],
        guest_rt_prio: opt_num(p, "guest_rt_prio").unwrap_or(90.0).clamp(1.0, 99.0) as u8,
        static_rt_prio: opt_num(p, "static_rt_prio").unwrap_or(8.0).clamp(1.0, 99.0) as u8,
        host_cyclictest_prio: opt_num(p, "host_cyclictest_prio")
            .unwrap_or(0.0)
            .clamp(0.0, 99.0) as u8,
        hostd_period_us: opt_num(p, "hostd_period_us")
            .unwrap_or(1000.0)
            .clamp(1.0, 1e6) as u64,
        hostd_policy: match get(p, "hostd_policy") {
            Some(policy) => {
                let policy: PolicyConfig = serde_json::from_value(policy.clone())
                    .map_err(|e| CalibrateError::Field(format!("params.hostd_policy: {e}")))?;
                policy
                    .validate()
                    .map_err(|e| CalibrateError::Field(format!("params.hostd_policy: {e}")))?;
                policy
            }
            None => policy_before_recorded(),
        },
        accelerator: get(&v, "accelerator")
            .or_else(|| get(p, "accelerator"))
            .and_then(Value::as_str)
            .unwrap_or("kvm")
            .to_string(),
    };
    if params.vcpus == 0
        || params.interval_us == 0
        || !(params.duration_s > 0.0 && params.duration_s.is_finite())
    {
        return Err(CalibrateError::Field(
            "params.vcpus/interval_us/duration_s (zero)".into(),
        ));
    }
    let configs_v = get(&v, "configs").ok_or_else(|| CalibrateError::Field("configs".into()))?;
    let entries: Vec<(String, &Value)> = match configs_v {
        Value::Object(m) => m.iter().map(|(k, c)| (k.clone(), c)).collect(),
        Value::Array(a) => a
            .iter()
            .map(|c| {
                let name = c
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| CalibrateError::Field("configs[].name".into()))?;
                Ok((name.to_string(), c))
            })
            .collect::<Result<_, CalibrateError>>()?,
        _ => return Err(CalibrateError::Field("configs".into())),
    };
    let mut configs = Vec::new();
    for (name, c) in entries {
        let f =
            |k: &str| num(c, k).map_err(|_| CalibrateError::Field(format!("configs.{name}.{k}")));
        let rogue = get(c, "rogue")
            .and_then(Value::as_bool)
            .unwrap_or_else(|| name.starts_with("rogue-"));
        let scheduling = get(c, "scheduling")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                let base = name.strip_prefix("rogue-").unwrap_or(&name);
                match base {
                    "idle" => "vanilla".to_string(),
                    b if b.starts_with("pvsched") => "pvsched".to_string(),
                    b => b.to_string(),
                }
            });
        configs.push(LabConfig {
            scheduling,
            rogue,
            idle: get(c, "idle")
                .and_then(Value::as_bool)
                .unwrap_or(name == "idle"),
            guest_avg_us: f("guest.avg_us")?,
            guest_p99_us: f("guest.p99_us")?,
            guest_max_us: f("guest.max_us")?,
            guest_samples: f("guest.samples")? as u64,
            host_p99_us: opt_num(c, "host.p99_us"),
            host_max_us: opt_num(c, "host.max_us"),
            host_bogo_ops_per_s: opt_num(c, "host.bogo_ops_per_s"),
            boosts: opt_num(c, "boosts").map(|x| x as u64),
            throttles: opt_num(c, "throttles").map(|x| x as u64),
            name,
        });
    }
    if configs.is_empty() {
        return Err(CalibrateError::Field("configs (empty)".into()));
    }
    Ok((params, configs))
}

/// The simulated counterpart of one lab configuration: its host (stress-ng unless
/// idle, kernel noise, the host probe), its guest (cyclictest on every vCPU, a
/// rogue RT hog on the last one) under the lab's accelerator, and its policy.
pub fn scenario(p: &LabParams, c: &LabConfig, m: &ModelParams, duration_s: f64) -> Scenario {
    let tcg = p.accelerator.eq_ignore_ascii_case("tcg");
    let l = LoadSpec::duty;
    let mut load = Vec::new();
    let [cpu, iomix, vm, fork] = p.load;
    if !c.idle {
        // stress-ng's CPU stressors never sleep; the others block in the kernel
        // (I/O, page faults, wait for children) for a share of time.
        if cpu > 0 {
            load.push(l("stress-cpu", cpu, 1.0, 4000));
        }
        if iomix > 0 {
            load.push(l("stress-iomix", iomix, m.stress_duty, 300));
        }
        if vm > 0 {
            load.push(l("stress-vm", vm, m.stress_duty, 2000));
        }
        if fork > 0 {
            load.push(l("stress-fork", fork, m.stress_duty, 150));
        }
    }
    let mut spec = PolicySpec {
        name: c.name.clone(),
        ..PolicySpec::default()
    };
    match c.scheduling.as_str() {
        "static-rt" => spec.static_rt_prio = Some(p.static_rt_prio),
        "static-rt-all" => {
            spec.static_rt_prio = Some(p.static_rt_prio);
            spec.emulator_rt_prio = Some(p.static_rt_prio);
        }
        s if s.starts_with("pvsched") => {
            spec.pvsched = Some(PvschedSpec {
                period_us: p.hostd_period_us,
                engine: p.hostd_policy.clone(),
                ..PvschedSpec::default()
            });
            // As in the built-in scenario: the daemon's halt-poll controller.
            spec.halt_poll = HaltPollSpec::controller();
        }
        _ => {}
    }
    let mut tasks = vec![TaskSpec {
        name: "cyclictest".into(),
        kind: TaskKind::Periodic {
            interval_us: p.interval_us,
            work_ns: 5_000,
        },
        per_vcpu: true,
        rt_prio: p.guest_rt_prio,
        pinned: true,
        ..TaskSpec::default()
    }];
    if c.rogue {
        // The lab's rogue guest: an RT task that never sleeps on the last vCPU.
        tasks.push(TaskSpec {
            name: "rogue".into(),
            kind: TaskKind::Cpu { chunk_us: 1000 },
            rt_prio: 99,
            pinned: true,
            vcpu: Some(p.vcpus - 1),
            measure: Some(false),
            score: false,
            ..TaskSpec::default()
        });
    }
    let accel = if tcg {
        Accel::Tcg(TcgSpec {
            main_loop_ns: m.main_loop_ns,
            translation_factor: m.translation_factor,
            ..TcgSpec::default()
        })
    } else {
        Accel::Kvm
    };
    Scenario {
        name: format!("calibration-{}", c.name),
        description: "one lab configuration, simulated".into(),
        duration_ms: ((duration_s * 1000.0) as u64).clamp(100, 600_000),
        warmup_ms: 200,
        mode: RunMode::Together,
        host: HostConfig {
            pcpus: p.host_cpus,
            load,
            latency_probe: Some(ProbeSpec {
                interval_us: p.interval_us,
                rt_prio: (p.host_cyclictest_prio > 0).then_some(p.host_cyclictest_prio),
                cpus: None,
            }),
            vcpu_wake_cost_ns: m.vcpu_wake_cost_ns,
            idle_exit_ns: m.idle_exit_ns,
            idle_poll_us: m.idle_poll_us,
            noise: NoiseSpec {
                softirq_gap_us: m.noise_gap_us,
                softirq_ns: m.noise_ns,
                ..NoiseSpec::default()
            },
            ..HostConfig::default()
        },
        vms: vec![VmConfig {
            name: "guest".into(),
            vcpus: p.vcpus,
            tasks,
            irq_ns: 1_500,
            accel,
            ..VmConfig::default()
        }],
        policies: vec![spec],
        hosts: 1,
    }
}

/// Simulates each configuration (in parallel, at most as many at once as CPUs).
fn simulate(
    p: &LabParams,
    configs: &[&LabConfig],
    m: &ModelParams,
    duration_s: f64,
    seed: u64,
) -> Result<Vec<PolicyResult>, CalibrateError> {
    let opt = RunOptions {
        seed,
        single_thread: true,
        ..RunOptions::default()
    };
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let mut out: Vec<Option<Result<PolicyResult, CalibrateError>>> = Vec::new();
    out.resize_with(configs.len(), || None);
    for chunk in (0..configs.len()).collect::<Vec<_>>().chunks(workers) {
        let results: Vec<(usize, Result<PolicyResult, CalibrateError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    let sc = scenario(p, configs[i], m, duration_s);
                    let opt = opt.clone();
                    s.spawn(move || {
                        let r = run_scenario(&sc, &opt)
                            .map_err(CalibrateError::Sim)
                            .map(|mut r| r.results.remove(0));
                        (i, r)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("simulation thread"))
                .collect()
        });
        for (i, r) in results {
            out[i] = Some(r);
        }
    }
    out.into_iter()
        .map(|r| r.expect("every configuration ran"))
        .collect()
}

/// The figures compared, simulated and measured.
fn figures(
    c: &LabConfig,
    r: &PolicyResult,
    sim_s: f64,
    lab_s: f64,
) -> Vec<(&'static str, Option<f64>, Option<f64>)> {
    let vm = r.vms.first();
    let count = |x: Option<u64>| x.map(|b| b as f64 * lab_s / sim_s);
    vec![
        (
            "guest samples/s",
            vm.map(|v| v.lat_samples as f64 / sim_s),
            Some(c.guest_samples as f64 / lab_s),
        ),
        (
            "guest avg us",
            vm.and_then(|v| v.lat_avg_us),
            Some(c.guest_avg_us),
        ),
        (
            "guest p99 us",
            vm.and_then(|v| v.lat_p99_us),
            Some(c.guest_p99_us),
        ),
        (
            "guest max us",
            vm.and_then(|v| v.lat_max_us),
            Some(c.guest_max_us),
        ),
        ("host p99 us", r.host.lat_p99_us, c.host_p99_us),
        ("host max us", r.host.lat_max_us, c.host_max_us),
        (
            "boosts",
            count(vm.and_then(|v| v.boosts)),
            c.boosts.map(|b| b as f64),
        ),
        (
            "throttles",
            count(vm.and_then(|v| v.throttles)),
            c.throttles.map(|b| b as f64),
        ),
    ]
}

/// Fit cost of one candidate: mean |ln(simulated / measured)| over the fit
/// configurations' guest avg, guest p99, guest samples per second and host p99, over the seeds.
fn fit_cost(
    p: &LabParams,
    fit: &[&LabConfig],
    m: &ModelParams,
    seeds: &[u64],
    duration_s: f64,
) -> Result<f64, CalibrateError> {
    let mut sum = 0.0;
    let mut n = 0usize;
    for &seed in seeds {
        let results = simulate(p, fit, m, duration_s, seed)?;
        for (c, r) in fit.iter().zip(&results) {
            for (metric, s, meas) in figures(c, r, duration_s, p.duration_s) {
                if !matches!(
                    metric,
                    "guest avg us" | "guest p99 us" | "guest samples/s" | "host p99 us"
                ) {
                    continue;
                }
                if let (Some(s), Some(meas)) = (s, meas) {
                    // A figure the model does not produce costs as much as a factor of 10.
                    sum += if s > 0.0 && meas > 0.0 {
                        (s / meas).ln().abs()
                    } else {
                        10f64.ln()
                    };
                    n += 1;
                }
            }
        }
    }
    Ok(if n == 0 {
        f64::INFINITY
    } else {
        sum / n as f64
    })
}

/// Fits the model's free costs on the baseline configurations (see the module).
pub fn fit(
    p: &LabParams,
    configs: &[LabConfig],
    seeds: &[u64],
    duration_s: f64,
) -> Result<(ModelParams, f64), CalibrateError> {
    let fit: Vec<&LabConfig> = configs.iter().filter(|c| c.is_baseline()).collect();
    if fit.is_empty() {
        return Err(CalibrateError::Field(
            "configs: no baseline configuration (scheduling vanilla, no rogue) to fit on".into(),
        ));
    }
    let tcg = p.accelerator.eq_ignore_ascii_case("tcg");
    let mut best = ModelParams::default();
    if !tcg {
        best.translation_factor = 1.0;
    }
    let mut best_cost = fit_cost(p, &fit, &best, seeds, duration_s)?;
    for _sweep in 0..FIT_SWEEPS {
        for (name, grid) in FIT_GRID {
            if !tcg && matches!(name, "translation_factor" | "main_loop_ns") {
                continue;
            }
            for &x in grid {
                let mut cand = best.clone();
                set_param(&mut cand, name, x);
                if cand == best {
                    continue;
                }
                let cost = fit_cost(p, &fit, &cand, seeds, duration_s)?;
                if cost < best_cost {
                    best_cost = cost;
                    best = cand;
                }
            }
        }
    }
    Ok((best, best_cost))
}

/// Fits on the baseline configurations (or takes the given parameters), predicts
/// every configuration and compares.
pub fn calibrate(text: &str, opt: &Options) -> Result<Calibration, CalibrateError> {
    let (params, configs) = parse(text)?;
    if !(opt.max_duration_s > 0.0 && opt.max_duration_s.is_finite()) {
        return Err(CalibrateError::Params(
            "max duration must be above 0".into(),
        ));
    }
    let (model, fit_cost, fitted_here) = match &opt.params {
        Some(m) => {
            m.validate()?;
            (m.clone(), None, false)
        }
        None => {
            let (m, c) = fit(&params, &configs, &opt.fit_seeds, opt.fit_duration_s)?;
            (m, Some(c), true)
        }
    };
    let duration_s = params.duration_s.min(opt.max_duration_s);
    let all: Vec<&LabConfig> = configs.iter().collect();
    let simulation = simulate(&params, &all, &model, duration_s, opt.seed)?;
    let mut rows = Vec::new();
    for (c, r) in configs.iter().zip(&simulation) {
        for (metric, s, m) in figures(c, r, duration_s, params.duration_s) {
            rows.push(Row {
                config: c.name.clone(),
                fitted: c.is_baseline(),
                metric: metric.into(),
                simulated: s,
                measured: m,
                rel_error: rel(s, m),
            });
        }
    }
    let orderings = orderings(&configs, &rows);
    let summary = summarize(&rows, &orderings);
    let mut errs: Vec<f64> = rows
        .iter()
        .filter(|r| r.metric.ends_with(" us"))
        .filter_map(|r| r.rel_error.map(f64::abs))
        .collect();
    let median_abs_rel_error = median(&mut errs);
    Ok(Calibration {
        params,
        model,
        fitted_here,
        fit_cost,
        simulated_s: duration_s,
        rows,
        orderings,
        summary,
        median_abs_rel_error,
        simulation,
    })
}

fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| {
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    })
}

/// The pairs the lab orders: pvsched and static RT each against vanilla, and
/// pvsched against static RT with a rogue guest, on guest avg and p99.
fn orderings(configs: &[LabConfig], rows: &[Row]) -> Vec<Ordering> {
    let find = |sched: &str, rogue: bool| {
        configs
            .iter()
            .find(|c| c.scheduling == sched && c.rogue == rogue && !c.idle)
    };
    let pairs = [
        (("pvsched", false), ("vanilla", false)),
        (("static-rt", false), ("vanilla", false)),
        (("pvsched", true), ("static-rt", true)),
    ];
    let mut out = Vec::new();
    for ((sa, ra), (sb, rb)) in pairs {
        let (Some(a), Some(b)) = (find(sa, ra), find(sb, rb)) else {
            continue;
        };
        for metric in ["guest avg us", "guest p99 us"] {
            let get = |c: &str| {
                rows.iter()
                    .find(|r| r.config == c && r.metric == metric)
                    .and_then(|r| r.simulated.zip(r.measured))
            };
            let (Some((sa, ma)), Some((sb, mb))) = (get(&a.name), get(&b.name)) else {
                continue;
            };
            out.push(Ordering {
                a: a.name.clone(),
                b: b.name.clone(),
                metric: metric.into(),
                lab_a_lower: ma < mb,
                sim_a_lower: sa < sb,
            });
        }
    }
    out
}

fn summarize(rows: &[Row], orderings: &[Ordering]) -> Summary {
    let guest = |fitted: bool| {
        rows.iter()
            .filter(|r| {
                r.fitted == fitted && matches!(r.metric.as_str(), "guest avg us" | "guest p99 us")
            })
            .filter_map(|r| r.simulated.zip(r.measured))
            .collect::<Vec<_>>()
    };
    let held = guest(false);
    let mut e: Vec<f64> = held.iter().map(|(s, m)| ((s - m) / m).abs()).collect();
    let worst = held
        .iter()
        .map(|&(s, m)| {
            if s <= 0.0 {
                f64::INFINITY
            } else {
                (s / m).max(m / s)
            }
        })
        .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))));
    let mut host: Vec<f64> = rows
        .iter()
        .filter(|r| !r.fitted && r.metric == "host p99 us")
        .filter_map(|r| r.rel_error.map(f64::abs))
        .collect();
    let mut fit_e: Vec<f64> = guest(true)
        .iter()
        .map(|(s, m)| ((s - m) / m).abs())
        .collect();
    Summary {
        guest_median: median(&mut e),
        guest_worst_factor: worst,
        host_p99_median: median(&mut host),
        orderings_matched: orderings
            .iter()
            .filter(|o| o.lab_a_lower == o.sim_a_lower)
            .count(),
        orderings: orderings.len(),
        fit_guest_median: median(&mut fit_e),
    }
}

impl Calibration {
    /// Side-by-side table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = &self.params;
        let _ = writeln!(
            s,
            "lab: {} vCPUs, interval {} us, {} s, {} host CPUs, stress-ng cpu/iomix/vm/fork {:?}, accelerator {} (simulated {} s per configuration)",
            p.vcpus, p.interval_us, p.duration_s, p.host_cpus, p.load, p.accelerator, self.simulated_s
        );
        let m = &self.model;
        let _ = writeln!(
            s,
            "model ({}): main_loop_ns {}, translation_factor {}, vcpu_wake_cost_ns {}, noise_gap_us {}, noise_ns {}, stress_duty {}, idle_exit_ns {}, idle_poll_us {}{}",
            if self.fitted_here { "fitted on the baseline configurations" } else { "given" },
            m.main_loop_ns,
            m.translation_factor,
            m.vcpu_wake_cost_ns,
            m.noise_gap_us,
            m.noise_ns,
            m.stress_duty,
            m.idle_exit_ns,
            m.idle_poll_us,
            self.fit_cost.map_or(String::new(), |c| format!(", fit cost {c:.3}"))
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| config | role | metric | simulated | measured | rel. error |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                r.config,
                match (r.fitted, self.fitted_here) {
                    (true, true) => "fit",
                    (true, false) => "baseline",
                    (false, _) => "held out",
                },
                r.metric,
                f(r.simulated),
                f(r.measured),
                r.rel_error
                    .map_or("-".to_string(), |e| format!("{:+.0}%", e * 100.0))
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "| ordering | metric | lab | model | agree |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        let lt = |b: bool| if b { "<" } else { ">=" };
        for o in &self.orderings {
            let _ = writeln!(
                s,
                "| {} vs {} | {} | {} | {} | {} |",
                o.a,
                o.b,
                o.metric,
                lt(o.lab_a_lower),
                lt(o.sim_a_lower),
                if o.lab_a_lower == o.sim_a_lower {
                    "yes"
                } else {
                    "NO"
                }
            );
        }
        let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.0}%", v * 100.0));
        let sm = &self.summary;
        let _ = writeln!(
            s,
            "\nheld out: guest avg/p99 median |relative error| {}, worst factor {}, host p99 median |relative error| {}; orderings matched {}/{}; baseline configurations ({}): guest avg/p99 median |relative error| {}",
            pct(sm.guest_median),
            sm.guest_worst_factor.map_or("-".to_string(), |w| format!("{w:.2}x")),
            pct(sm.host_p99_median),
            sm.orderings_matched,
            sm.orderings,
            if self.fitted_here { "fitted" } else { "predicted" },
            pct(sm.fit_guest_median),
        );
        s
    }
}
