//! What an experiment produces: `results.json` (the types below), and the goals computed
//! from it. Rendering (Markdown table, SVG) is in [`crate::report`]; the CI checks are in
//! [`crate::check`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hostd::HostdExit;
use crate::hostload::LoadSpec;
use crate::hostsched::RtThread;
use crate::page::SlotCounters;
use crate::qemu::Accelerator;

/// Version of the `results.json` layout.
pub const RESULTS_VERSION: u32 = 1;

/// How the host schedules the vCPU threads in a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduling {
    /// Nothing: vCPU threads are normal CFS threads.
    Vanilla,
    /// Every vCPU thread FIFO at a fixed priority for the whole run.
    StaticRt,
    /// The pvsched daemon boosts and throttles vCPU threads from guest hints.
    Pvsched,
}

impl Scheduling {
    /// `vanilla`, `static-rt`, `pvsched`.
    pub fn name(self) -> &'static str {
        match self {
            Scheduling::Vanilla => "vanilla",
            Scheduling::StaticRt => "static-rt",
            Scheduling::Pvsched => "pvsched",
        }
    }
}

/// One configuration of the experiment: a scheduling, with or without a rogue guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    /// vCPU thread scheduling.
    pub scheduling: Scheduling,
    /// The first guest runs a FIFO-99 busy loop on its last vCPU.
    pub rogue: bool,
}

impl Configuration {
    /// Every configuration, in report order.
    pub const ALL: [Configuration; 6] = [
        Configuration::new(Scheduling::Vanilla, false),
        Configuration::new(Scheduling::StaticRt, false),
        Configuration::new(Scheduling::Pvsched, false),
        Configuration::new(Scheduling::Vanilla, true),
        Configuration::new(Scheduling::StaticRt, true),
        Configuration::new(Scheduling::Pvsched, true),
    ];

    const fn new(scheduling: Scheduling, rogue: bool) -> Self {
        Self { scheduling, rogue }
    }

    /// `vanilla`, ..., `rogue-pvsched`.
    pub fn name(self) -> String {
        if self.rogue {
            format!("rogue-{}", self.scheduling.name())
        } else {
            self.scheduling.name().to_owned()
        }
    }

    /// Parses a configuration name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|config| config.name() == name)
    }
}

/// Latency figures of one side (guest or host).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyFigures {
    /// Samples (all measuring threads).
    pub samples: u64,
    /// Mean (µs).
    pub avg_us: f64,
    /// 99th percentile (µs).
    pub p99_us: u64,
    /// The 99th percentile overflowed the histogram; `p99_us` is a lower bound.
    pub p99_is_lower_bound: bool,
    /// Maximum (µs).
    pub max_us: u64,
    /// Minimum (µs).
    pub min_us: u64,
    /// Samples above the histogram.
    pub overflows: u64,
}

/// Guest-side results of one configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestSide {
    /// cyclictest in the guests (merged over guests).
    #[serde(flatten)]
    pub latency: LatencyFigures,
    /// Merged histogram `(µs, samples)`, for plots.
    pub histogram: Vec<(u64, u64)>,
}

/// Host-side results of one configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostSide {
    /// Host cyclictest at a low RT priority.
    #[serde(flatten)]
    pub latency: LatencyFigures,
    /// Host throughput: the geometric mean over stressors of their bogo-ops per second
    /// (real time). Each stressor weighs the same, so the ratio between two configurations
    /// is the geometric mean of the per-stressor ratios, not the swing of the busiest one.
    pub bogo_ops_per_s: f64,
    /// Sum over stressors of bogo-ops per second.
    #[serde(default)]
    pub bogo_ops_per_s_total: f64,
    /// Per stressor.
    pub bogo_ops_per_s_by_stressor: BTreeMap<String, f64>,
    /// Host cyclictest histogram `(µs, samples)`, for plots.
    pub histogram: Vec<(u64, u64)>,
}

/// One guest of a configuration run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestRun {
    /// Guest name.
    pub name: String,
    /// What it ran (`cyclictest` or `rogue`).
    pub workload: String,
    /// QEMU process id.
    pub qemu_pid: u32,
    /// vCPU thread ids.
    pub vcpu_tids: Vec<u32>,
    /// Boot time (ms).
    pub boot_ms: u64,
    /// Guest module status from init (`loaded`, ...).
    pub module: Option<String>,
    /// The module had attached to the shared page when the workload started.
    pub module_attached: bool,
    /// Guest module heartbeat when the workload started.
    pub heartbeat_before: u64,
    /// Guest module heartbeat after the workload.
    pub heartbeat_after: u64,
    /// The daemon's counters per vCPU slot at the end.
    pub slots: Vec<SlotCounters>,
    /// Guest latency (this guest alone).
    pub latency: LatencyFigures,
}

/// Everything measured for one configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigResult {
    /// Configuration name.
    pub name: String,
    /// Scheduling (`vanilla`, `static-rt`, `pvsched`).
    pub scheduling: String,
    /// With the rogue guest.
    pub rogue: bool,
    /// Guest latency.
    pub guest: GuestSide,
    /// Host latency and throughput.
    pub host: HostSide,
    /// Boosts by the daemon, all vCPUs of all guests.
    pub boosts: u64,
    /// Throttles by the daemon, all vCPUs of all guests.
    pub throttles: u64,
    /// Boosted CPU time by the daemon (ms).
    pub boosted_ms: f64,
    /// Every guest module's heartbeat advanced during the workload.
    pub heartbeat_advanced: bool,
    /// Samples of vCPU thread policies taken during the workload.
    pub policy_samples: u64,
    /// Fraction of vCPU-thread samples that found an RT policy.
    pub rt_fraction: f64,
    /// QEMU threads still real-time after the configuration was torn down (must be empty).
    pub leftover_rt_threads: Vec<RtThread>,
    /// How the daemon ended (pvsched configurations).
    pub hostd: Option<HostdExit>,
    /// The guests.
    pub guests: Vec<GuestRun>,
    /// Wall-clock time of the whole configuration run (s).
    pub elapsed_s: f64,
    /// Why the run failed, when it did (the other fields hold what was measured).
    pub error: Option<String>,
}

/// The parameters of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunParams {
    /// `--quick`.
    pub quick: bool,
    /// vCPUs per guest.
    pub vcpus: u32,
    /// Guests per configuration.
    pub guests: u32,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// cyclictest interval (µs), guest and host.
    pub interval_us: u32,
    /// Measured duration (s).
    pub duration_s: u32,
    /// Seconds of host load before measuring starts.
    pub warmup_s: u32,
    /// Guest cyclictest FIFO priority.
    pub guest_rt_prio: u8,
    /// FIFO priority of vCPU threads under `static-rt`.
    pub static_rt_prio: u8,
    /// `static-rt` also makes QEMU's other threads FIFO (main loop, I/O): under TCG the
    /// main loop fires the guest's timers, so vCPU threads alone are not the whole path.
    #[serde(default)]
    pub static_rt_all_threads: bool,
    /// Host cyclictest FIFO priority.
    pub host_cyclictest_prio: u8,
    /// Host load.
    pub load: LoadSpec,
    /// Guest module parameters.
    pub module_params: String,
    /// Daemon loop period (µs).
    pub hostd_period_us: u64,
    /// FIFO priority of the daemon (0: normal).
    pub hostd_rt_prio: u8,
    /// Host CPUs.
    pub host_cpus: u32,
    /// Host kernel release.
    pub host_kernel: String,
    /// Guest kernel release.
    pub guest_kernel: String,
    /// Configurations, in run order.
    pub configs: Vec<String>,
}

/// A goal of the issue, evaluated on the measured figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    /// What the goal says.
    pub goal: String,
    /// The measured ratio.
    pub ratio: Option<f64>,
    /// The bound on the ratio.
    pub bound: f64,
    /// `true` when the ratio must be at most the bound, `false` for at least.
    pub at_most: bool,
    /// Met, missed, or not measurable (a configuration is missing or a figure is zero).
    pub met: Option<bool>,
}

/// `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabResults {
    /// [`RESULTS_VERSION`].
    pub version: u32,
    /// Accelerator the guests ran under (`kvm` or `tcg`).
    pub accelerator: Option<Accelerator>,
    /// Why KVM was not used, when it was tried and failed.
    pub kvm_fallback: Option<String>,
    /// Parameters.
    pub params: RunParams,
    /// Per configuration name.
    pub configs: BTreeMap<String, ConfigResult>,
    /// The goals, measured.
    pub goals: Vec<Goal>,
    /// Wall-clock time of the whole run (s).
    pub elapsed_s: f64,
}

impl LabResults {
    /// Configurations in report order (the order of [`Configuration::ALL`]).
    pub fn ordered(&self) -> Vec<&ConfigResult> {
        let mut ordered: Vec<&ConfigResult> = Configuration::ALL
            .iter()
            .filter_map(|config| self.configs.get(&config.name()))
            .collect();
        ordered.extend(
            self.configs
                .values()
                .filter(|result| Configuration::parse(&result.name).is_none()),
        );
        ordered
    }
}

/// The goals on `configs`.
pub fn evaluate_goals(configs: &BTreeMap<String, ConfigResult>) -> Vec<Goal> {
    let usable = |name: &str| {
        configs
            .get(name)
            .filter(|result| result.error.is_none() && result.guest.latency.samples > 0)
    };
    let ratio = |a: &str, b: &str, figure: fn(&ConfigResult) -> f64| -> Option<f64> {
        let (a, b) = (usable(a)?, usable(b)?);
        let denominator = figure(b);
        (denominator > 0.0).then(|| figure(a) / denominator)
    };
    let goal = |text: &str, ratio: Option<f64>, bound: f64, at_most: bool| Goal {
        goal: text.to_owned(),
        ratio,
        bound,
        at_most,
        met: ratio.map(|r| if at_most { r <= bound } else { r >= bound }),
    };
    let guest_avg = |r: &ConfigResult| r.guest.latency.avg_us;
    let host_max = |r: &ConfigResult| r.host.latency.max_us as f64;
    let throughput = |r: &ConfigResult| r.host.bogo_ops_per_s;
    vec![
        goal(
            "guest avg latency: pvsched / static-rt <= 1.3",
            ratio("pvsched", "static-rt", guest_avg),
            1.3,
            true,
        ),
        goal(
            "guest avg latency: pvsched / vanilla <= 0.3",
            ratio("pvsched", "vanilla", guest_avg),
            0.3,
            true,
        ),
        goal(
            "host max latency: pvsched / vanilla <= 1.2",
            ratio("pvsched", "vanilla", host_max),
            1.2,
            true,
        ),
        goal(
            "host throughput with a rogue guest: rogue-pvsched / rogue-vanilla >= 0.9",
            ratio("rogue-pvsched", "rogue-vanilla", throughput),
            0.9,
            false,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_names_round_trip() {
        let names: Vec<String> = Configuration::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "vanilla",
                "static-rt",
                "pvsched",
                "rogue-vanilla",
                "rogue-static-rt",
                "rogue-pvsched"
            ]
        );
        for name in &names {
            assert_eq!(
                Configuration::parse(name).map(|c| c.name()).as_ref(),
                Some(name)
            );
        }
        assert!(Configuration::parse("turbo").is_none());
    }

    fn result(name: &str, avg: f64, host_max: u64, ops: f64) -> ConfigResult {
        ConfigResult {
            name: name.into(),
            guest: GuestSide {
                latency: LatencyFigures {
                    samples: 100,
                    avg_us: avg,
                    ..LatencyFigures::default()
                },
                histogram: vec![],
            },
            host: HostSide {
                latency: LatencyFigures {
                    max_us: host_max,
                    ..LatencyFigures::default()
                },
                bogo_ops_per_s: ops,
                ..HostSide::default()
            },
            ..ConfigResult::default()
        }
    }

    #[test]
    fn goals_from_ratios() {
        let configs: BTreeMap<String, ConfigResult> = [
            result("vanilla", 1000.0, 100, 0.0),
            result("static-rt", 100.0, 5000, 0.0),
            result("pvsched", 120.0, 110, 0.0),
            result("rogue-vanilla", 0.0, 0, 1000.0),
            result("rogue-pvsched", 0.0, 0, 850.0),
        ]
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
        let goals = evaluate_goals(&configs);
        let met: Vec<Option<bool>> = goals.iter().map(|g| g.met).collect();
        assert_eq!(met, [Some(true), Some(true), Some(true), Some(false)]);
        assert!((goals[0].ratio.expect("ratio") - 1.2).abs() < 1e-9);
        let empty = evaluate_goals(&BTreeMap::new());
        assert!(empty.iter().all(|g| g.met.is_none()));
    }
}
