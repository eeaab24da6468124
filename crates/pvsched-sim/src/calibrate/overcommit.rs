//! Calibration against the lab's overcommit experiment (`pvsched lab --experiment
//! overcommit`, seed 000): guests of several sizes run hackbench at once on a host
//! kept busy by `stress-ng --cpu N --cpu-load P`; a VM's score is messages per
//! second. The same shape is simulated (host CPUs, host load, VM sizes, hackbench
//! groups, window) under each configuration the lab ran, and the scores and the
//! inversion verdicts are put side by side.
//!
//! The simulated guest costs are assumptions (a KVM-like guest; under TCG every
//! guest-side cost is multiplied by [`TCG_SLOWDOWN`], as in the latency
//! calibration), not fitted to the lab: the relative error says how far they are.

use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

use super::{get, opt_num, rel, CalibrateError};
use crate::config::*;
use crate::run::{run_scenario, RunOptions, RunResult};

/// Guest CPU of one hackbench write outside the socket lock (KVM-like), ns.
pub const SEND_NS: u64 = 2_000;
/// Guest CPU of one read outside the socket lock, ns.
pub const RECV_NS: u64 = 1_500;
/// Socket spinlock section of a write or a read, ns.
pub const CS_NS: u64 = 500;
/// hackbench's parent CPU to fork and reap one process, µs.
pub const FORK_US: u64 = 50;
/// Guest-side costs under TCG (emulated guest) relative to KVM.
pub const TCG_SLOWDOWN: u64 = 10;
/// stress-ng's `--cpu-load` busy slice: random, up to 0.5 s of CPU (mean 0.25 s),
/// with a sleep in proportion (its default `--cpu-load-slice 0`).
pub const STRESS_SLICE_US: u64 = 250_000;

/// What the lab ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OvercommitParams {
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// Host CPUs.
    pub host_cpus: u32,
    /// stress-ng `--cpu` workers.
    pub load_workers: u32,
    /// stress-ng `--cpu-load`, percent per worker.
    pub cpu_load: u32,
    /// Measured window per configuration, s.
    pub duration_s: f64,
    /// hackbench groups per vCPU.
    pub groups_per_vcpu: u32,
    /// hackbench `--fds`.
    pub fds: u32,
    /// hackbench `--loops`.
    pub loops: u32,
    /// Daemon period, µs.
    pub hostd_period_us: u64,
    /// The VMs, in the lab's order: name and vCPUs.
    pub vms: Vec<(String, u32)>,
}

/// One VM of one configuration as the lab measured it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabVm {
    /// Name (`vm0`, ...).
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Messages per second (`None`: the VM did not score).
    pub score: Option<f64>,
}

/// One configuration the lab ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabOvercommitConfig {
    /// Configuration name.
    pub name: String,
    /// Its VMs.
    pub vms: Vec<LabVm>,
}

/// One VM's score, measured and simulated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScoreRow {
    /// Configuration.
    pub config: String,
    /// VM name.
    pub vm: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Measured messages per second.
    pub lab: Option<f64>,
    /// Simulated messages per second.
    pub simulated: Option<f64>,
    /// (simulated − lab) / lab.
    pub rel_error: Option<f64>,
}

/// A larger VM scoring below a smaller one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Inverted {
    /// The larger VM and its vCPUs.
    pub larger: (String, u32),
    /// The smaller VM and its vCPUs.
    pub smaller: (String, u32),
}

/// The inversion verdict over VMs with a score (the lab's rule): present when some
/// VM scores below one with fewer vCPUs; `None` without two scored VMs of different
/// sizes. `per_vcpu` compares score per vCPU instead.
pub fn inversion(vms: &[(String, u32, f64)], per_vcpu: bool) -> Option<Vec<Inverted>> {
    let figure = |v: &(String, u32, f64)| {
        if per_vcpu {
            v.2 / f64::from(v.1.max(1))
        } else {
            v.2
        }
    };
    let mut compared = false;
    let mut pairs = Vec::new();
    for larger in vms {
        for smaller in vms.iter().filter(|s| s.1 < larger.1) {
            compared = true;
            if figure(larger) < figure(smaller) {
                pairs.push(Inverted {
                    larger: (larger.0.clone(), larger.1),
                    smaller: (smaller.0.clone(), smaller.1),
                });
            }
        }
    }
    compared.then_some(pairs)
}

/// One configuration's verdicts, measured and simulated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerdictRow {
    /// Configuration.
    pub config: String,
    /// Inverted pairs per VM in the lab (`None`: not measured).
    pub lab: Option<Vec<Inverted>>,
    /// Inverted pairs per VM in simulation.
    pub simulated: Option<Vec<Inverted>>,
    /// The same per vCPU, lab.
    pub lab_per_vcpu: Option<Vec<Inverted>>,
    /// The same per vCPU, simulated.
    pub simulated_per_vcpu: Option<Vec<Inverted>>,
}

/// The overcommit comparison.
#[derive(Clone, Debug, Serialize)]
pub struct OvercommitCalibration {
    /// What the lab ran.
    pub params: OvercommitParams,
    /// Simulated window, s (the lab's, capped).
    pub simulated_s: f64,
    /// Scores side by side.
    pub rows: Vec<ScoreRow>,
    /// Inversion verdicts side by side.
    pub verdicts: Vec<VerdictRow>,
    /// Lab configurations the model has no counterpart for.
    pub skipped: Vec<String>,
    /// Median absolute relative error over the score rows.
    pub median_abs_rel_error: Option<f64>,
    /// The simulation's own result.
    pub simulation: RunResult,
}

/// Whether a lab `results.json` comes from the overcommit experiment: its
/// `experiment` field says so, or its configurations carry `vms` arrays.
pub fn is_overcommit(v: &Value) -> bool {
    if let Some(e) = v.get("experiment").and_then(Value::as_str) {
        return e == "overcommit";
    }
    match v.get("configs") {
        Some(Value::Object(m)) => m
            .values()
            .any(|c| c.get("vms").is_some_and(Value::is_array)),
        Some(Value::Array(a)) => a.iter().any(|c| c.get("vms").is_some_and(Value::is_array)),
        _ => false,
    }
}

fn field(path: &str) -> CalibrateError {
    CalibrateError::Field(path.into())
}

/// Reads the lab's parameters and configurations.
pub fn parse(text: &str) -> Result<(OvercommitParams, Vec<LabOvercommitConfig>), CalibrateError> {
    let v: Value = serde_json::from_str(text)?;
    parse_value(&v)
}

fn parse_value(v: &Value) -> Result<(OvercommitParams, Vec<LabOvercommitConfig>), CalibrateError> {
    let p = get(v, "params").ok_or_else(|| field("params"))?;
    let entries: Vec<(String, &Value)> = match get(v, "configs") {
        Some(Value::Object(m)) => m.iter().map(|(k, c)| (k.clone(), c)).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|c| {
                let name = c
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| field("configs[].name"))?;
                Ok((name.to_string(), c))
            })
            .collect::<Result<_, CalibrateError>>()?,
        _ => return Err(field("configs")),
    };
    let mut configs = Vec::new();
    for (name, c) in entries {
        let vms_v = c
            .get("vms")
            .and_then(Value::as_array)
            .ok_or_else(|| field(&format!("configs.{name}.vms")))?;
        let mut vms = Vec::new();
        for (i, vm) in vms_v.iter().enumerate() {
            let at = |k: &str| format!("configs.{name}.vms[{i}].{k}");
            let vm_name = vm
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| field(&at("name")))?;
            let vcpus = vm
                .get("vcpus")
                .and_then(Value::as_u64)
                .filter(|&n| n > 0)
                .ok_or_else(|| field(&at("vcpus")))?;
            let score = vm
                .get("score")
                .and_then(Value::as_f64)
                .ok_or_else(|| field(&at("score")))?;
            // A VM that failed or completed no round has no score.
            let failed = vm.get("error").is_some_and(|e| !e.is_null())
                || vm.get("rounds").and_then(Value::as_u64) == Some(0);
            vms.push(LabVm {
                name: vm_name.to_string(),
                vcpus: vcpus as u32,
                score: (!failed && score > 0.0).then_some(score),
            });
        }
        configs.push(LabOvercommitConfig { name, vms });
    }
    if configs.is_empty() {
        return Err(field("configs (empty)"));
    }
    // In the lab's run order where it records one (a JSON object has none).
    if let Some(order) = get(p, "configs").and_then(Value::as_array) {
        let rank = |name: &str| {
            order
                .iter()
                .position(|o| o.as_str() == Some(name))
                .unwrap_or(order.len())
        };
        configs.sort_by_key(|c| rank(&c.name));
    }
    // The VMs: the lab's `vm_vcpus` (named vm0, vm1, ... as the lab names them),
    // else the first configuration's.
    let vms: Vec<(String, u32)> = match get(p, "vm_vcpus").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, n)| {
                n.as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| (format!("vm{i}"), n as u32))
                    .ok_or_else(|| field("params.vm_vcpus"))
            })
            .collect::<Result<_, _>>()?,
        None => configs[0]
            .vms
            .iter()
            .map(|v| (v.name.clone(), v.vcpus))
            .collect(),
    };
    if vms.is_empty() {
        return Err(field("params.vm_vcpus (empty)"));
    }
    let duration_s = opt_num(p, "duration_s")
        .or_else(|| opt_num(p, "benchmark.duration_s"))
        .filter(|d| *d > 0.0)
        .ok_or_else(|| field("params.duration_s"))?;
    let host_cpus = opt_num(p, "host_cpus").unwrap_or(2.0).max(1.0) as u32;
    let params = OvercommitParams {
        accelerator: get(v, "accelerator")
            .or_else(|| get(p, "accelerator"))
            .and_then(Value::as_str)
            .unwrap_or("kvm")
            .to_string(),
        host_cpus,
        load_workers: opt_num(p, "load.cpu").unwrap_or(f64::from(host_cpus)) as u32,
        cpu_load: opt_num(p, "load.cpu_load")
            .unwrap_or(100.0)
            .clamp(0.0, 100.0) as u32,
        duration_s,
        groups_per_vcpu: opt_num(p, "benchmark.groups_per_vcpu")
            .unwrap_or(1.0)
            .max(1.0) as u32,
        fds: opt_num(p, "benchmark.fds").unwrap_or(20.0).max(1.0) as u32,
        loops: opt_num(p, "benchmark.loops").unwrap_or(5.0).max(1.0) as u32,
        hostd_period_us: opt_num(p, "hostd_period_us").unwrap_or(1000.0).max(1.0) as u64,
        vms,
    };
    Ok((params, configs))
}

/// The model's counterpart of a lab configuration (`None`: not modelled).
fn policy(name: &str, p: &OvercommitParams) -> Option<PolicySpec> {
    let pvsched = |introspection| PvschedSpec {
        period_us: p.hostd_period_us,
        introspection,
        ..PvschedSpec::default()
    };
    let spec = match name {
        "vanilla" => None,
        "pvsched" => Some(pvsched(false)),
        "pvsched-introspect" => Some(pvsched(true)),
        _ => return None,
    };
    Some(PolicySpec {
        name: name.into(),
        pvsched: spec,
        ..PolicySpec::default()
    })
}

/// The simulated overcommit experiment in the lab's shape: every lab configuration
/// the model has a counterpart for, the window capped at `max_duration_s`.
pub fn scenario(
    p: &OvercommitParams,
    configs: &[LabOvercommitConfig],
    max_duration_s: f64,
) -> Scenario {
    let slow = if p.accelerator.eq_ignore_ascii_case("tcg") {
        TCG_SLOWDOWN
    } else {
        1
    };
    let window_ms = (p.duration_s.min(max_duration_s.max(0.1)) * 1000.0) as u64;
    let mut load = Vec::new();
    if p.load_workers > 0 && p.cpu_load > 0 {
        load.push(LoadSpec {
            name: "stress-ng-cpu".into(),
            threads: p.load_workers,
            duty: f64::from(p.cpu_load) / 100.0,
            burst_us: STRESS_SLICE_US,
            ..LoadSpec::default()
        });
    }
    let vms = p
        .vms
        .iter()
        .map(|(name, vcpus)| VmConfig {
            name: name.clone(),
            vcpus: *vcpus,
            irq_ns: 1_500 * slow,
            tasks: vec![TaskSpec {
                name: "hackbench".into(),
                kind: TaskKind::Hackbench {
                    fds: p.fds,
                    loops: p.loops,
                    send_ns: SEND_NS * slow,
                    recv_ns: RECV_NS * slow,
                    cs_ns: CS_NS * slow,
                    fork_us: FORK_US * slow,
                },
                count: p.groups_per_vcpu,
                per_vcpu: true,
                ..TaskSpec::default()
            }],
            ..VmConfig::default()
        })
        .collect();
    Scenario {
        name: "calibration-overcommit".into(),
        description: "the lab's overcommit experiment, simulated".into(),
        duration_ms: window_ms.max(100),
        warmup_ms: 200,
        mode: RunMode::Together,
        host: HostConfig {
            pcpus: p.host_cpus.clamp(1, 64),
            load,
            vcpu_wake_cost_ns: 6_000 * slow,
            ..HostConfig::default()
        },
        vms,
        policies: configs.iter().filter_map(|c| policy(&c.name, p)).collect(),
        hosts: 1,
    }
}

/// Parses the lab's overcommit results, simulates them and compares.
pub fn calibrate(
    text: &str,
    seed: u64,
    max_duration_s: f64,
) -> Result<OvercommitCalibration, CalibrateError> {
    let v: Value = serde_json::from_str(text)?;
    calibrate_value(&v, seed, max_duration_s)
}

pub(super) fn calibrate_value(
    v: &Value,
    seed: u64,
    max_duration_s: f64,
) -> Result<OvercommitCalibration, CalibrateError> {
    let (params, configs) = parse_value(v)?;
    let sc = scenario(&params, &configs, max_duration_s);
    let skipped: Vec<String> = configs
        .iter()
        .filter(|c| policy(&c.name, &params).is_none())
        .map(|c| c.name.clone())
        .collect();
    if sc.policies.is_empty() {
        return Err(CalibrateError::Field(format!(
            "configs: none the model has a counterpart for (vanilla, pvsched, pvsched-introspect); got {skipped:?}"
        )));
    }
    let opt = RunOptions {
        seed,
        ..RunOptions::default()
    };
    let simulation = run_scenario(&sc, &opt)?;
    let mut rows = Vec::new();
    let mut verdicts = Vec::new();
    for c in configs.iter().filter(|c| !skipped.contains(&c.name)) {
        let sim = simulation.results.iter().find(|r| r.policy == c.name);
        let sim_score = |vm: &str| {
            sim.and_then(|r| r.vms.iter().find(|v| v.name == vm))
                .and_then(|v| v.ops_per_s.first().map(|(_, rate)| *rate))
        };
        for vm in &c.vms {
            let s = sim_score(&vm.name);
            rows.push(ScoreRow {
                config: c.name.clone(),
                vm: vm.name.clone(),
                vcpus: vm.vcpus,
                lab: vm.score,
                simulated: s,
                rel_error: rel(s, vm.score),
            });
        }
        let lab: Vec<(String, u32, f64)> = c
            .vms
            .iter()
            .filter_map(|v| v.score.map(|s| (v.name.clone(), v.vcpus, s)))
            .collect();
        let simulated: Vec<(String, u32, f64)> = params
            .vms
            .iter()
            .filter_map(|(n, vcpus)| sim_score(n).map(|s| (n.clone(), *vcpus, s)))
            .collect();
        verdicts.push(VerdictRow {
            config: c.name.clone(),
            lab: inversion(&lab, false),
            simulated: inversion(&simulated, false),
            lab_per_vcpu: inversion(&lab, true),
            simulated_per_vcpu: inversion(&simulated, true),
        });
    }
    let mut errs: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.rel_error.map(f64::abs))
        .collect();
    errs.sort_by(f64::total_cmp);
    let median_abs_rel_error = (!errs.is_empty()).then(|| errs[errs.len() / 2]);
    Ok(OvercommitCalibration {
        simulated_s: sc.duration_ms as f64 / 1000.0,
        params,
        rows,
        verdicts,
        skipped,
        median_abs_rel_error,
        simulation,
    })
}

/// `present: vm0 (4) < vm1 (2), ...`, `absent` or `-`.
fn verdict(v: &Option<Vec<Inverted>>) -> String {
    match v {
        None => "-".into(),
        Some(p) if p.is_empty() => "absent".into(),
        Some(p) => {
            let pairs: Vec<String> = p
                .iter()
                .map(|i| {
                    format!(
                        "{} ({}) < {} ({})",
                        i.larger.0, i.larger.1, i.smaller.0, i.smaller.1
                    )
                })
                .collect();
            format!("present: {}", pairs.join(", "))
        }
    }
}

impl OvercommitCalibration {
    /// The score table per configuration and VM, then the inversion verdicts.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = &self.params;
        let sizes: Vec<String> = p.vms.iter().map(|v| v.1.to_string()).collect();
        let _ = writeln!(
            s,
            "lab: overcommit, accelerator {}, {} host CPUs, stress-ng --cpu {} --cpu-load {}, \
             VMs of {} vCPUs, hackbench {} group(s) per vCPU x {} fds x {} loops, \
             {} s window (simulated {} s)",
            p.accelerator,
            p.host_cpus,
            p.load_workers,
            p.cpu_load,
            sizes.join("/"),
            p.groups_per_vcpu,
            p.fds,
            p.loops,
            p.duration_s,
            self.simulated_s
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| config | vm | vCPUs | lab msgs/s | simulated msgs/s | rel. error |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                r.config,
                r.vm,
                r.vcpus,
                f(r.lab),
                f(r.simulated),
                r.rel_error
                    .map_or("-".to_string(), |e| format!("{:+.0}%", e * 100.0))
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| config | inversion, lab | inversion, simulated | per vCPU, lab | per vCPU, simulated |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for v in &self.verdicts {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                v.config,
                verdict(&v.lab),
                verdict(&v.simulated),
                verdict(&v.lab_per_vcpu),
                verdict(&v.simulated_per_vcpu)
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "\nnot modelled, skipped: {}", self.skipped.join(", "));
        }
        if let Some(m) = self.median_abs_rel_error {
            let _ = writeln!(
                s,
                "\nmedian |relative error| over scores: {:.0}%",
                m * 100.0
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, vcpus: u32, score: f64) -> (String, u32, f64) {
        (name.into(), vcpus, score)
    }

    #[test]
    fn the_inversion_compares_every_larger_vm_with_every_smaller_one() {
        let vms = [
            vm("vm0", 4, 900.0),
            vm("vm1", 2, 1000.0),
            vm("vm2", 1, 500.0),
        ];
        let per_vm = inversion(&vms, false).unwrap();
        assert_eq!(per_vm.len(), 1);
        assert_eq!(per_vm[0].larger, ("vm0".to_string(), 4));
        assert_eq!(per_vm[0].smaller, ("vm1".to_string(), 2));
        // Per vCPU: 225 < 500 and 225 < 500, 500 = 500 is no inversion.
        assert_eq!(inversion(&vms, true).unwrap().len(), 2);
        assert_eq!(inversion(&vms[..1], false), None);
        assert_eq!(
            inversion(&[vm("a", 2, 1.0), vm("b", 2, 5.0)], false),
            None,
            "same sizes compare nothing"
        );
    }

    #[test]
    fn overcommit_results_are_told_from_latency_results() {
        let oc: Value = serde_json::json!({"experiment": "overcommit", "configs": {}});
        let by_vms: Value = serde_json::json!({"configs": {"vanilla": {"vms": []}}});
        let latency: Value = serde_json::json!({"configs": {"vanilla": {"guest": {"avg_us": 1}}}});
        let other: Value =
            serde_json::json!({"experiment": "latency", "configs": {"x": {"vms": []}}});
        assert!(is_overcommit(&oc) && is_overcommit(&by_vms));
        assert!(!is_overcommit(&latency) && !is_overcommit(&other));
    }

    #[test]
    fn missing_fields_are_named() {
        let e = parse(
            r#"{"experiment": "overcommit", "params": {"duration_s": 5},
            "configs": {"vanilla": {"vms": [{"name": "vm0", "vcpus": 4}]}}}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("configs.vanilla.vms[0].score"),
            "{e}"
        );
        let e = parse(
            r#"{"experiment": "overcommit", "params": {},
            "configs": {"vanilla": {"vms": [{"name": "vm0", "vcpus": 4, "score": 1}]}}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("params.duration_s"), "{e}");
        let e = parse(
            r#"{"experiment": "overcommit", "params": {"duration_s": 5},
            "configs": {"vanilla": {}}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("configs.vanilla.vms"), "{e}");
    }
}
