//! Calibration against the lab: run the lab's configuration in simulation
//! and put simulated and measured figures side by side.
//!
//! The lab's `results.json` is read tolerantly (unknown keys ignored); a
//! missing field that the comparison needs is a clear error naming it. Two
//! experiments are understood: the latency experiment (cyclictest, this
//! module) and the overcommit experiment (hackbench scores per VM,
//! [`overcommit`]); [`calibrate_lab`] tells them apart.

pub mod overcommit;

use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

use crate::config::*;
use crate::run::{run_scenario, RunOptions, RunResult};

/// Why the lab's results cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    /// Not JSON.
    #[error("lab results are not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field the comparison needs is missing or has the wrong type.
    #[error("lab results: missing or invalid field `{0}`")]
    Field(String),
    /// The simulation failed.
    #[error("simulation: {0}")]
    Sim(#[from] crate::ScenarioError),
}

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
    /// `kvm` or `tcg`.
    pub accelerator: String,
}

/// One configuration's measured figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabConfig {
    /// Configuration name.
    pub name: String,
    /// Guest latency, µs.
    pub guest_avg_us: f64,
    /// 99th percentile, µs.
    pub guest_p99_us: f64,
    /// Maximum, µs.
    pub guest_max_us: f64,
    /// Samples.
    pub guest_samples: u64,
    /// Host cyclictest maximum, µs.
    pub host_max_us: Option<f64>,
    /// Host stress throughput.
    pub host_bogo_ops_per_s: Option<f64>,
    /// Boosts.
    pub boosts: Option<u64>,
    /// Throttles.
    pub throttles: Option<u64>,
}

/// One compared figure.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Configuration.
    pub config: String,
    /// Figure.
    pub metric: String,
    /// Simulated value.
    pub simulated: Option<f64>,
    /// Measured value.
    pub measured: Option<f64>,
    /// (simulated − measured) / measured.
    pub rel_error: Option<f64>,
}

/// The comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    /// What the lab ran.
    pub params: LabParams,
    /// Side by side.
    pub rows: Vec<Row>,
    /// Median absolute relative error over the latency rows.
    pub median_abs_rel_error: Option<f64>,
    /// The simulation's own result.
    pub simulation: RunResult,
}

/// The comparison for either experiment.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "experiment", rename_all = "kebab-case")]
pub enum Report {
    /// The latency experiment (cyclictest in the guest and on the host).
    Latency(Calibration),
    /// The overcommit experiment (hackbench scores per VM).
    Overcommit(overcommit::OvercommitCalibration),
}

impl Report {
    /// Side-by-side tables.
    pub fn table(&self) -> String {
        match self {
            Report::Latency(c) => c.table(),
            Report::Overcommit(c) => c.table(),
        }
    }
}

/// Reads a lab `results.json` of either experiment (an overcommit one is told by
/// its `experiment` field or by per-configuration `vms` arrays), simulates it and
/// compares. `max_duration_s` caps the simulated window of an overcommit run.
pub fn calibrate_lab(text: &str, seed: u64, max_duration_s: f64) -> Result<Report, CalibrateError> {
    let v: Value = serde_json::from_str(text)?;
    if overcommit::is_overcommit(&v) {
        overcommit::calibrate_value(&v, seed, max_duration_s).map(Report::Overcommit)
    } else {
        calibrate(text, seed).map(Report::Latency)
    }
}

pub(crate) fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for key in path.split('.') {
        cur = cur.get(key)?;
    }
    Some(cur)
}

pub(crate) fn num(v: &Value, path: &str) -> Result<f64, CalibrateError> {
    get(v, path)
        .and_then(Value::as_f64)
        .ok_or_else(|| CalibrateError::Field(path.into()))
}

pub(crate) fn opt_num(v: &Value, path: &str) -> Option<f64> {
    get(v, path).and_then(Value::as_f64)
}

/// Reads the lab's parameters and configurations.
pub fn parse(text: &str) -> Result<(LabParams, Vec<LabConfig>), CalibrateError> {
    let v: Value = serde_json::from_str(text)?;
    let p = get(&v, "params").ok_or_else(|| CalibrateError::Field("params".into()))?;
    let load = get(p, "load").or_else(|| get(p, "host_load"));
    let load_n = |k: &str| {
        load.and_then(|l| l.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32
    };
    let params = LabParams {
        vcpus: num(p, "vcpus")? as u32,
        interval_us: num(p, "interval_us")? as u64,
        duration_s: num(p, "duration_s")?,
        host_cpus: opt_num(p, "host_cpus").unwrap_or(2.0) as u32,
        load: [load_n("cpu"), load_n("iomix"), load_n("vm"), load_n("fork")],
        guest_rt_prio: opt_num(p, "guest_rt_prio").unwrap_or(90.0) as u8,
        static_rt_prio: opt_num(p, "static_rt_prio").unwrap_or(8.0) as u8,
        host_cyclictest_prio: opt_num(p, "host_cyclictest_prio").unwrap_or(0.0) as u8,
        hostd_period_us: opt_num(p, "hostd_period_us").unwrap_or(1000.0) as u64,
        accelerator: get(&v, "accelerator")
            .or_else(|| get(p, "accelerator"))
            .and_then(Value::as_str)
            .unwrap_or("kvm")
            .to_string(),
    };
    if params.vcpus == 0 || params.interval_us == 0 || params.duration_s <= 0.0 {
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
        configs.push(LabConfig {
            guest_avg_us: f("guest.avg_us")?,
            guest_p99_us: f("guest.p99_us")?,
            guest_max_us: f("guest.max_us")?,
            guest_samples: f("guest.samples")? as u64,
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

/// The simulated counterpart of the lab's run: one policy per configuration.
pub fn scenario(p: &LabParams, configs: &[LabConfig]) -> Scenario {
    // Under TCG the guest is emulated: every guest-side cost is about ten times longer.
    let slow: u64 = if p.accelerator.eq_ignore_ascii_case("tcg") {
        10
    } else {
        1
    };
    let l = |name: &str, threads, duty, burst_us| LoadSpec {
        name: name.into(),
        threads,
        duty,
        burst_us,
        ..LoadSpec::default()
    };
    let mut load = Vec::new();
    let [cpu, iomix, vm, fork] = p.load;
    if cpu > 0 {
        load.push(l("stress-cpu", cpu, 1.0, 4000));
    }
    if iomix > 0 {
        load.push(l("stress-iomix", iomix, 0.5, 300));
    }
    if vm > 0 {
        load.push(l("stress-vm", vm, 0.95, 2000));
    }
    if fork > 0 {
        load.push(l("stress-fork", fork, 0.7, 150));
    }
    let mut policies = Vec::new();
    for c in configs {
        let base = c.name.strip_prefix("rogue-").unwrap_or(&c.name);
        let mut spec = PolicySpec {
            name: c.name.clone(),
            ..PolicySpec::default()
        };
        match base {
            "static-rt" => spec.static_rt_prio = Some(p.static_rt_prio.clamp(1, 99)),
            "pvsched" => {
                spec.pvsched = Some(PvschedSpec {
                    period_us: p.hostd_period_us.max(1),
                    ..PvschedSpec::default()
                });
                // As in the built-in scenario: the daemon's halt-poll controller.
                spec.halt_poll = HaltPollSpec::controller();
            }
            _ => {}
        }
        policies.push(spec);
    }
    let mut tasks = vec![TaskSpec {
        name: "cyclictest".into(),
        kind: TaskKind::Periodic {
            interval_us: p.interval_us,
            work_ns: 5_000 * slow,
        },
        per_vcpu: true,
        rt_prio: p.guest_rt_prio.clamp(1, 99),
        pinned: true,
        ..TaskSpec::default()
    }];
    // Rogue configurations run every configuration's guest with a rogue RT hog;
    // it is added per policy below by splitting into separate scenarios.
    tasks.shrink_to_fit();
    Scenario {
        name: "calibration".into(),
        description: "the lab's configuration, simulated".into(),
        duration_ms: ((p.duration_s * 1000.0) as u64).clamp(100, 20_000),
        warmup_ms: 100,
        mode: RunMode::Together,
        host: HostConfig {
            pcpus: p.host_cpus.clamp(1, 64),
            load,
            latency_probe: Some(ProbeSpec {
                interval_us: p.interval_us,
                rt_prio: (p.host_cyclictest_prio > 0).then_some(p.host_cyclictest_prio),
                cpus: None,
            }),
            vcpu_wake_cost_ns: 6_000 * slow,
            ..HostConfig::default()
        },
        vms: vec![VmConfig {
            name: "guest".into(),
            vcpus: p.vcpus,
            tasks,
            irq_ns: 1_500 * slow,
            ..VmConfig::default()
        }],
        policies,
        hosts: 1,
    }
}

pub(crate) fn rel(sim: Option<f64>, meas: Option<f64>) -> Option<f64> {
    match (sim, meas) {
        (Some(s), Some(m)) if m.abs() > 1e-9 => Some((s - m) / m),
        _ => None,
    }
}

/// Parses the lab's results, simulates them and compares.
pub fn calibrate(text: &str, seed: u64) -> Result<Calibration, CalibrateError> {
    let (params, configs) = parse(text)?;
    let base = scenario(&params, &configs);
    let opt = RunOptions {
        seed,
        ..RunOptions::default()
    };
    // Normal configurations in one run; rogue ones in a second with a rogue guest task.
    let (rogue, normal): (Vec<_>, Vec<_>) = base
        .policies
        .iter()
        .cloned()
        .partition(|p| p.name.starts_with("rogue-"));
    let mut results = Vec::new();
    let mut sim_all: Option<RunResult> = None;
    for (policies, is_rogue) in [(normal, false), (rogue, true)] {
        if policies.is_empty() {
            continue;
        }
        let mut sc = base.clone();
        sc.policies = policies;
        if is_rogue {
            // A rogue guest: an RT task that never sleeps on vCPU 0.
            sc.vms[0].tasks.push(TaskSpec {
                name: "rogue".into(),
                kind: TaskKind::Cpu { chunk_us: 1000 },
                rt_prio: 99,
                pinned: true,
                vcpu: Some(0),
                measure: Some(false),
                score: false,
                ..TaskSpec::default()
            });
        }
        let r = run_scenario(&sc, &opt)?;
        results.extend(r.results.clone());
        match &mut sim_all {
            None => sim_all = Some(r),
            Some(s) => {
                s.events += r.events;
                s.results.extend(r.results);
            }
        }
    }
    let simulation = sim_all.expect("at least one configuration");
    let mut rows = Vec::new();
    for c in &configs {
        let Some(p) = results.iter().find(|p| p.policy == c.name) else {
            continue;
        };
        let vm = p.vms.first();
        let mut push = |metric: &str, s: Option<f64>, m: Option<f64>| {
            rows.push(Row {
                config: c.name.clone(),
                metric: metric.into(),
                simulated: s,
                measured: m,
                rel_error: rel(s, m),
            })
        };
        push(
            "guest avg us",
            vm.and_then(|v| v.lat_avg_us),
            Some(c.guest_avg_us),
        );
        push(
            "guest p99 us",
            vm.and_then(|v| v.lat_p99_us),
            Some(c.guest_p99_us),
        );
        push(
            "guest max us",
            vm.and_then(|v| v.lat_max_us),
            Some(c.guest_max_us),
        );
        push("host max us", p.host.lat_max_us, c.host_max_us);
        push(
            "boosts",
            vm.and_then(|v| v.boosts).map(|b| b as f64),
            c.boosts.map(|b| b as f64),
        );
        push(
            "throttles",
            vm.and_then(|v| v.throttles).map(|b| b as f64),
            c.throttles.map(|b| b as f64),
        );
    }
    let mut errs: Vec<f64> = rows
        .iter()
        .filter(|r| r.metric.contains("us"))
        .filter_map(|r| r.rel_error.map(f64::abs))
        .collect();
    errs.sort_by(f64::total_cmp);
    let median_abs_rel_error = (!errs.is_empty()).then(|| errs[errs.len() / 2]);
    Ok(Calibration {
        params,
        rows,
        median_abs_rel_error,
        simulation,
    })
}

impl Calibration {
    /// Side-by-side table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = &self.params;
        let _ = writeln!(
            s,
            "lab: {} vCPUs, interval {} us, {} s, {} host CPUs, stress-ng cpu/iomix/vm/fork {:?}, accelerator {}",
            p.vcpus, p.interval_us, p.duration_s, p.host_cpus, p.load, p.accelerator
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "| config | metric | simulated | measured | rel. error |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                r.config,
                r.metric,
                f(r.simulated),
                f(r.measured),
                r.rel_error
                    .map_or("-".to_string(), |e| format!("{:+.0}%", e * 100.0))
            );
        }
        if let Some(m) = self.median_abs_rel_error {
            let _ = writeln!(
                s,
                "\nmedian |relative error| over latency rows: {:.0}%",
                m * 100.0
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_are_named() {
        let e =
            parse(r#"{"params": {"vcpus": 2, "interval_us": 1000}, "configs": {}}"#).unwrap_err();
        assert!(e.to_string().contains("duration_s"), "{e}");
        let e = parse(
            r#"{"params": {"vcpus": 2, "interval_us": 1000, "duration_s": 5},
                "configs": {"vanilla": {"guest": {"avg_us": 1, "p99_us": 2, "samples": 3}}}}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("configs.vanilla.guest.max_us"),
            "{e}"
        );
        assert!(matches!(parse("nope"), Err(CalibrateError::Json(_))));
    }

    #[test]
    fn list_and_map_forms_parse() {
        let text = r#"{"accelerator": "tcg", "params": {"vcpus": 2, "interval_us": 1000, "duration_s": 5,
            "load": {"cpu": 2, "iomix": 1, "vm": 1, "vm_mib": 128, "fork": 1}, "extra": true},
            "configs": [{"name": "pvsched", "guest": {"avg_us": 10, "p99_us": 20, "max_us": 30, "samples": 100},
                         "host": {"max_us": 5}, "boosts": 7, "throttles": 0}]}"#;
        let (p, c) = parse(text).unwrap();
        assert_eq!(p.load, [2, 1, 1, 1]);
        assert_eq!(p.accelerator, "tcg");
        assert_eq!(c[0].name, "pvsched");
        assert_eq!(c[0].boosts, Some(7));
        assert_eq!(c[0].host_bogo_ops_per_s, None);
    }
}
