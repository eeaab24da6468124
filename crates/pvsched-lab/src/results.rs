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
use crate::stallprobe::StallFigures;

/// Version of the `results.json` layout.
pub const RESULTS_VERSION: u32 = 1;

/// The shared-memory channel between guest and daemon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Channel {
    /// `ivshmem-plain` on a shared file; the daemon polls every line at its period.
    #[default]
    Plain,
    /// `ivshmem-doorbell` served by the daemon: the guest rings when the host must act,
    /// and the daemon sleeps while nothing happens. Only the daemon's configurations use
    /// it (the others have no daemon to serve it).
    Doorbell,
}

/// How the host schedules the vCPU threads in a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduling {
    /// Nothing: vCPU threads are normal CFS threads.
    Vanilla,
    /// Every vCPU thread FIFO at a fixed priority for the whole run.
    StaticRt,
    /// Every thread of QEMU (vCPUs, main loop, I/O and the rest) FIFO at the static-rt
    /// priority for the whole run: pvsched boosts QEMU's main thread too (under TCG it
    /// fires the guest's timers), so this is the static baseline with the same reach.
    StaticRtAll,
    /// The pvsched daemon boosts and throttles vCPU threads from guest hints.
    Pvsched,
    /// As `pvsched`, with boosts as `SCHED_DEADLINE` reservations (`rt_class =
    /// "deadline"`): the kernel bounds a boosted thread even while the daemon stalls.
    PvschedDeadline,
}

impl Scheduling {
    /// Parses a scheduling name.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Scheduling::Vanilla,
            Scheduling::StaticRt,
            Scheduling::StaticRtAll,
            Scheduling::Pvsched,
            Scheduling::PvschedDeadline,
        ]
        .into_iter()
        .find(|scheduling| scheduling.name() == name)
    }

    /// `vanilla`, `static-rt`, `static-rt-all`, `pvsched`, `pvsched-dl`.
    pub fn name(self) -> &'static str {
        match self {
            Scheduling::Vanilla => "vanilla",
            Scheduling::StaticRt => "static-rt",
            Scheduling::StaticRtAll => "static-rt-all",
            Scheduling::Pvsched => "pvsched",
            Scheduling::PvschedDeadline => "pvsched-dl",
        }
    }

    /// The daemon runs in this configuration.
    pub fn runs_daemon(self) -> bool {
        matches!(self, Scheduling::Pvsched | Scheduling::PvschedDeadline)
    }

    /// The daemon's `[policy] rt_class` in this configuration (`None`: its default).
    pub fn daemon_rt_class(self) -> Option<&'static str> {
        (self == Scheduling::PvschedDeadline).then_some("deadline")
    }
}

/// One configuration of the experiment: a scheduling, with or without a rogue guest, on
/// the busy host or (the `idle` reference) on a host without load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    /// vCPU thread scheduling.
    pub scheduling: Scheduling,
    /// The first guest runs a FIFO-99 busy loop on its last vCPU.
    pub rogue: bool,
    /// No host load: what an uncontended guest gets on this machine, the floor every
    /// other configuration of the run is compared with.
    #[serde(default)]
    pub idle: bool,
    /// The daemon's channel is ivshmem-doorbell whatever `--channel` says (the
    /// `pvsched-doorbell` configuration, for doorbell against plain in one run).
    #[serde(default)]
    pub doorbell: bool,
}

impl Configuration {
    /// The set a run takes when `--configs` is not given: every configuration
    /// but the `SCHED_DEADLINE` pair, whose boosted TCG vCPUs crawl inside their
    /// reservations (see the README's "SCHED_DEADLINE against RR").
    pub fn default_set() -> Vec<Configuration> {
        Self::ALL
            .into_iter()
            .filter(|config| config.scheduling != Scheduling::PvschedDeadline)
            .collect()
    }

    /// Every configuration, in report order.
    pub const ALL: [Configuration; 11] = [
        Configuration::IDLE,
        Configuration::new(Scheduling::Vanilla, false),
        Configuration::new(Scheduling::StaticRt, false),
        Configuration::new(Scheduling::StaticRtAll, false),
        Configuration::new(Scheduling::Pvsched, false),
        Configuration::DOORBELL,
        Configuration::new(Scheduling::PvschedDeadline, false),
        Configuration::new(Scheduling::Vanilla, true),
        Configuration::new(Scheduling::StaticRt, true),
        Configuration::new(Scheduling::Pvsched, true),
        Configuration::new(Scheduling::PvschedDeadline, true),
    ];

    /// The reference: vanilla scheduling, no host load.
    pub const IDLE: Configuration = Configuration {
        scheduling: Scheduling::Vanilla,
        rogue: false,
        idle: true,
        doorbell: false,
    };

    /// `pvsched` on the ivshmem-doorbell channel (event-driven daemon).
    pub const DOORBELL: Configuration = Configuration {
        scheduling: Scheduling::Pvsched,
        rogue: false,
        idle: false,
        doorbell: true,
    };

    /// The configuration of `scheduling` on the busy host, with or without the rogue guest.
    pub const fn new(scheduling: Scheduling, rogue: bool) -> Self {
        Self {
            scheduling,
            rogue,
            idle: false,
            doorbell: false,
        }
    }

    /// `idle`, `vanilla`, ..., `rogue-pvsched`.
    pub fn name(self) -> String {
        if self.idle {
            "idle".to_owned()
        } else if self.doorbell {
            format!("{}-doorbell", self.scheduling.name())
        } else if self.rogue {
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
    /// The machine's own stalls and the host delay beyond them (the stall probe beside
    /// host cyclictest); `None` in results from before the probe.
    #[serde(default)]
    pub stalls: Option<StallFigures>,
}

/// How often a thread was found real-time when its policy was sampled in `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyShare {
    /// Samples taken (the thread existed and its `stat` parsed).
    pub samples: u64,
    /// Samples that found FIFO, RR or DEADLINE.
    pub rt_samples: u64,
}

impl PolicyShare {
    /// Counts one sample.
    pub fn record(&mut self, realtime: bool) {
        self.samples += 1;
        self.rt_samples += u64::from(realtime);
    }

    /// The RT fraction, `None` without samples (a share of nothing is not 0 %).
    pub fn fraction(self) -> Option<f64> {
        (self.samples > 0).then(|| self.rt_samples as f64 / self.samples as f64)
    }

    /// Sum of two shares.
    pub fn plus(self, other: Self) -> Self {
        Self {
            samples: self.samples + other.samples,
            rt_samples: self.rt_samples + other.rt_samples,
        }
    }

    /// `37% of 300 samples`, or `no samples`.
    pub fn describe(self) -> String {
        match self.fraction() {
            Some(fraction) => format!("{:.0}% of {} samples", fraction * 100.0, self.samples),
            None => "no samples".to_owned(),
        }
    }
}

/// What the lab found on every thread of one QEMU process just before stopping it (after
/// the scheduling was undone and the daemon had exited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCheck {
    /// Threads read from `/proc/<pid>/task/*/stat`.
    pub threads_checked: u32,
    /// The ones with a real-time policy (must be none).
    pub rt_threads: Vec<RtThread>,
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
    /// The vCPU the rogue busy loop runs on, for the rogue guest.
    #[serde(default)]
    pub rogue_vcpu: Option<u32>,
    /// Per vCPU (in vCPU order), how often its thread was RT while the guests ran.
    #[serde(default)]
    pub vcpu_policy: Vec<PolicyShare>,
    /// How often QEMU's main thread (tid = pid) was RT while the guests ran.
    #[serde(default)]
    pub main_thread_policy: PolicyShare,
    /// Every thread of this QEMU checked just before it was stopped; `None` when QEMU had
    /// already exited (or the run failed before the check), so nothing was checked.
    #[serde(default)]
    pub exit_check: Option<ExitCheck>,
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
    /// Without host load (the `idle` reference).
    #[serde(default)]
    pub idle: bool,
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
    /// Scheduling changes the daemon applied to vCPU threads (`sched_setattr` calls that
    /// changed a thread), from its status endpoint just before SIGTERM; `None` when it did
    /// not report them.
    #[serde(default)]
    pub applies: Option<u64>,
    /// The daemon's apply latency (from reading a guest line to the change applied), from
    /// its status endpoint just before SIGTERM; `None` without a daemon or figures.
    #[serde(default)]
    pub apply_latency: Option<ApplyLatency>,
    /// CPU time the daemon's process used while the guests ran, in % of one CPU.
    #[serde(default)]
    pub daemon_cpu_percent: Option<f64>,
    /// Every guest module's heartbeat advanced during the workload.
    pub heartbeat_advanced: bool,
    /// Samples of vCPU thread policies taken during the workload.
    pub policy_samples: u64,
    /// Fraction of vCPU-thread samples that found an RT policy.
    pub rt_fraction: f64,
    /// QEMU threads still real-time after the configuration was torn down (must be empty;
    /// the per-guest [`GuestRun::exit_check`] says how many were checked).
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

impl ConfigResult {
    /// The rogue vCPU: the guest that ran the busy loop and the vCPU index it ran on.
    pub fn rogue_vcpu(&self) -> Option<(&GuestRun, usize)> {
        self.guests.iter().find_map(|guest| {
            let vcpu = usize::try_from(guest.rogue_vcpu?).ok()?;
            Some((guest, vcpu))
        })
    }
}

/// The daemon's apply latency histogram, summarised (bucket upper bounds, so a quantile
/// is at most the figure given).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ApplyLatency {
    /// Changes measured.
    pub count: u64,
    /// Mean (µs).
    pub mean_us: f64,
    /// Upper bound of the bucket holding the median (µs).
    pub p50_us: f64,
    /// Upper bound of the bucket holding the 99th percentile (µs); infinite when it is in
    /// the overflow bucket.
    pub p99_us: f64,
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
    /// `--static-rt-all-threads`: the `static-rt-all` baseline (every QEMU thread FIFO) was
    /// asked for on top of `--configs`. In results written before `static-rt-all` existed
    /// it meant that `static-rt` itself raised every QEMU thread.
    #[serde(default)]
    pub static_rt_all_threads: bool,
    /// The channel of the daemon's configurations: `plain` (ivshmem-plain on a shared
    /// file, polled) or `doorbell` (ivshmem-doorbell served by the daemon, event-driven).
    #[serde(default)]
    pub channel: Channel,
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
    /// The boost policy the daemon ran with (its defaults with `--hostd-extra`'s
    /// `[policy]` applied). Absent in results written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostd_policy: Option<pvsched_policy::PolicyConfig>,
    /// Host CPUs.
    pub host_cpus: u32,
    /// Host kernel release.
    pub host_kernel: String,
    /// Guest kernel release.
    pub guest_kernel: String,
    /// Configurations, in run order.
    pub configs: Vec<String>,
}

/// A goal of the issues, evaluated on the measured figures: a ratio between two
/// configurations of the same run. Goals are reported, not asserted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    /// What the goal says.
    pub goal: String,
    /// The experiment it belongs to (`busy host` or `rogue guest`).
    #[serde(default)]
    pub experiment: String,
    /// The measured ratio.
    pub ratio: Option<f64>,
    /// The figure above the ratio's line (of the configuration under test).
    #[serde(default)]
    pub numerator: Option<f64>,
    /// The figure below it (of the baseline).
    #[serde(default)]
    pub denominator: Option<f64>,
    /// Unit of numerator and denominator (`µs`, `bogo-ops/s`).
    #[serde(default)]
    pub unit: String,
    /// The bound on the ratio.
    pub bound: f64,
    /// `true` when the ratio must be at most the bound, `false` for at least.
    pub at_most: bool,
    /// Met, missed, or not measurable (a configuration is missing or a figure is zero).
    pub met: Option<bool>,
}

impl Goal {
    /// Whether `ratio` meets this goal's bound.
    pub fn meets(&self, ratio: f64) -> bool {
        if self.at_most {
            ratio <= self.bound
        } else {
            ratio >= self.bound
        }
    }
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

/// Latency of the well-behaved guests of a configuration: every guest but the rogue one,
/// merged (sample-weighted mean); `None` when the rogue guest is the only guest.
pub fn well_behaved_latency(result: &ConfigResult) -> Option<(f64, u64)> {
    let (weighted, samples) = result
        .guests
        .iter()
        .filter(|guest| guest.rogue_vcpu.is_none() && guest.workload != "rogue")
        .fold((0.0, 0u64), |(weighted, samples), guest| {
            (
                weighted + guest.latency.avg_us * guest.latency.samples as f64,
                samples + guest.latency.samples,
            )
        });
    (samples > 0).then(|| (weighted / samples as f64, samples))
}

/// One goal: `numerator(config) / denominator(baseline)` against `bound`.
struct GoalSpec {
    experiment: &'static str,
    text: &'static str,
    config: &'static str,
    baseline: &'static str,
    /// Another configuration that must have run for the goal to be measured (the rogue
    /// configuration for a goal that must hold "in the same run").
    also_needs: Option<&'static str>,
    unit: &'static str,
    figure: fn(&ConfigResult) -> Option<f64>,
    bound: f64,
    at_most: bool,
}

/// The goals of the issues on `configs` (one run's configurations).
pub fn evaluate_goals(configs: &BTreeMap<String, ConfigResult>) -> Vec<Goal> {
    let usable = |name: &str| {
        configs
            .get(name)
            .filter(|result| result.error.is_none() && result.guest.latency.samples > 0)
    };
    let guest_avg = |r: &ConfigResult| Some(r.guest.latency.avg_us);
    let guest_p99 = |r: &ConfigResult| Some(r.guest.latency.p99_us as f64);
    let host_max =
        |r: &ConfigResult| (r.host.latency.samples > 0).then_some(r.host.latency.max_us as f64);
    let host_p99 =
        |r: &ConfigResult| (r.host.latency.samples > 0).then_some(r.host.latency.p99_us as f64);
    let host_max_beyond_stalls = |r: &ConfigResult| {
        r.host
            .stalls
            .filter(|stalls| stalls.samples > 0)
            .map(|stalls| stalls.beyond_stalls_max_us as f64)
    };
    let above_boosts_beyond_stalls = |r: &ConfigResult| {
        r.host
            .stalls
            .and_then(|stalls| stalls.above_boosts_beyond_stalls_max_us)
            .map(|us| us as f64)
    };
    let throughput = |r: &ConfigResult| Some(r.host.bogo_ops_per_s);
    let well_behaved_avg = |r: &ConfigResult| well_behaved_latency(r).map(|(avg, _)| avg);
    let busy = "busy host";
    let rogue = "rogue guest";
    let specs = [
        GoalSpec {
            experiment: busy,
            text: "guest avg latency: pvsched / static-rt <= 1.3",
            config: "pvsched",
            baseline: "static-rt",
            also_needs: None,
            unit: "µs",
            figure: guest_avg,
            bound: 1.3,
            at_most: true,
        },
        GoalSpec {
            experiment: busy,
            text: "guest avg latency: pvsched / static-rt-all <= 1.0",
            config: "pvsched",
            baseline: "static-rt-all",
            also_needs: None,
            unit: "µs",
            figure: guest_avg,
            bound: 1.0,
            at_most: true,
        },
        GoalSpec {
            experiment: busy,
            text: "guest avg latency: pvsched / vanilla <= 0.3",
            config: "pvsched",
            baseline: "vanilla",
            also_needs: None,
            unit: "µs",
            figure: guest_avg,
            bound: 0.3,
            at_most: true,
        },
        GoalSpec {
            experiment: busy,
            text: "guest avg latency: pvsched / idle <= 1.2",
            config: "pvsched",
            baseline: "idle",
            also_needs: None,
            unit: "µs",
            figure: guest_avg,
            bound: 1.2,
            at_most: true,
        },
        GoalSpec {
            experiment: busy,
            text: "guest p99 latency: pvsched / idle <= 1.2",
            config: "pvsched",
            baseline: "idle",
            also_needs: None,
            unit: "µs",
            figure: guest_p99,
            bound: 1.2,
            at_most: true,
        },
        GoalSpec {
            experiment: busy,
            text: "host max latency: pvsched / vanilla <= 1.2",
            config: "pvsched",
            baseline: "vanilla",
            also_needs: None,
            unit: "µs",
            figure: host_max,
            bound: 1.2,
            at_most: true,
        },
        GoalSpec {
            experiment: busy,
            text: "host p99 latency: pvsched / vanilla <= 1.2",
            config: "pvsched",
            baseline: "vanilla",
            also_needs: None,
            unit: "µs",
            figure: host_p99,
            bound: 1.2,
            at_most: true,
        },
        GoalSpec {
            experiment: busy,
            text: "host p99 latency: pvsched / static-rt-all <= 1.0",
            config: "pvsched",
            baseline: "static-rt-all",
            also_needs: None,
            unit: "µs",
            figure: host_p99,
            bound: 1.0,
            at_most: true,
        },
        GoalSpec {
            experiment: rogue,
            text: "host throughput with a rogue guest: rogue-pvsched / rogue-vanilla >= 0.9",
            config: "rogue-pvsched",
            baseline: "rogue-vanilla",
            also_needs: None,
            unit: "bogo-ops/s",
            figure: throughput,
            bound: 0.9,
            at_most: false,
        },
        GoalSpec {
            experiment: rogue,
            text: "host max latency with a rogue guest: rogue-pvsched / rogue-vanilla <= 1.5",
            config: "rogue-pvsched",
            baseline: "rogue-vanilla",
            also_needs: None,
            unit: "µs",
            figure: host_max,
            bound: 1.5,
            at_most: true,
        },
        GoalSpec {
            experiment: rogue,
            text: "host max beyond the machine's stalls with a rogue guest: rogue-pvsched / rogue-vanilla <= 1.5",
            config: "rogue-pvsched",
            baseline: "rogue-vanilla",
            also_needs: None,
            unit: "µs",
            figure: host_max_beyond_stalls,
            bound: 1.5,
            at_most: true,
        },
        GoalSpec {
            experiment: rogue,
            text: "host max beyond the machine's stalls, host task above the boosts, with a rogue guest: rogue-pvsched / rogue-vanilla <= 1.5",
            config: "rogue-pvsched",
            baseline: "rogue-vanilla",
            also_needs: None,
            unit: "µs",
            figure: above_boosts_beyond_stalls,
            bound: 1.5,
            at_most: true,
        },
        GoalSpec {
            experiment: rogue,
            text: "well-behaved guest avg latency in the same run: pvsched / static-rt <= 1.0",
            config: "pvsched",
            baseline: "static-rt",
            also_needs: Some("rogue-pvsched"),
            unit: "µs",
            figure: guest_avg,
            bound: 1.0,
            at_most: true,
        },
        GoalSpec {
            experiment: rogue,
            text: "well-behaved guest avg latency in the same run: pvsched / static-rt-all <= 1.0",
            config: "pvsched",
            baseline: "static-rt-all",
            also_needs: Some("rogue-pvsched"),
            unit: "µs",
            figure: guest_avg,
            bound: 1.0,
            at_most: true,
        },
        GoalSpec {
            experiment: rogue,
            text: "well-behaved guests beside the rogue (--guests 2+): rogue-pvsched / rogue-static-rt <= 1.0",
            config: "rogue-pvsched",
            baseline: "rogue-static-rt",
            also_needs: None,
            unit: "µs",
            figure: well_behaved_avg,
            bound: 1.0,
            at_most: true,
        },
    ];
    // Every goal of `pvsched` holds for `pvsched-dl` too; those are evaluated when a
    // deadline configuration ran.
    let deadline_ran = ["pvsched-dl", "rogue-pvsched-dl"]
        .iter()
        .any(|name| configs.contains_key(*name));
    let mut variants: Vec<Option<&str>> = vec![None];
    if deadline_ran {
        variants.push(Some("pvsched-dl"));
    }
    // The doorbell channel's goals (those without a rogue configuration of their own).
    if configs.contains_key("pvsched-doorbell") {
        variants.push(Some("pvsched-doorbell"));
    }
    variants
        .iter()
        .flat_map(|variant| specs.iter().map(move |spec| (*variant, spec)))
        .map(|(variant, spec)| {
            let rename = |name: &str| match (variant, name) {
                (Some(to), "pvsched") => to.to_owned(),
                (Some(to), "rogue-pvsched") => format!("rogue-{to}"),
                _ => name.to_owned(),
            };
            let (config, also_needs) = (rename(spec.config), spec.also_needs.map(rename));
            let text = match variant {
                Some(to) => spec.text.replace("pvsched /", &format!("{to} /")),
                None => spec.text.to_owned(),
            };
            let needed = also_needs
                .as_deref()
                .is_none_or(|name| usable(name).is_some());
            let numerator = usable(&config).and_then(spec.figure).filter(|_| needed);
            let denominator = usable(spec.baseline)
                .and_then(spec.figure)
                .filter(|_| needed);
            let ratio = match (numerator, denominator) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let mut goal = Goal {
                goal: text,
                experiment: spec.experiment.to_owned(),
                ratio,
                numerator,
                denominator,
                unit: spec.unit.to_owned(),
                bound: spec.bound,
                at_most: spec.at_most,
                met: None,
            };
            goal.met = ratio.map(|ratio| goal.meets(ratio));
            goal
        })
        .collect()
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
                "idle",
                "vanilla",
                "static-rt",
                "static-rt-all",
                "pvsched",
                "pvsched-doorbell",
                "pvsched-dl",
                "rogue-vanilla",
                "rogue-static-rt",
                "rogue-pvsched",
                "rogue-pvsched-dl"
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

    fn result(name: &str, avg: f64, host_max: u64, host_p99: u64, ops: f64) -> ConfigResult {
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
                    samples: 100,
                    max_us: host_max,
                    p99_us: host_p99,
                    ..LatencyFigures::default()
                },
                bogo_ops_per_s: ops,
                ..HostSide::default()
            },
            ..ConfigResult::default()
        }
    }

    fn by_name(results: Vec<ConfigResult>) -> BTreeMap<String, ConfigResult> {
        results.into_iter().map(|r| (r.name.clone(), r)).collect()
    }

    #[test]
    fn goals_from_ratios() {
        let configs = by_name(vec![
            result("vanilla", 1000.0, 100, 50, 0.0),
            result("static-rt", 100.0, 5000, 400, 0.0),
            result("static-rt-all", 150.0, 6000, 600, 0.0),
            result("pvsched", 120.0, 110, 300, 0.0),
            result("rogue-vanilla", 0.0, 10_000, 0, 1000.0),
            result("rogue-static-rt", 0.0, 0, 0, 0.0),
            result("rogue-pvsched", 0.0, 20_000, 0, 850.0),
        ]);
        let goals = evaluate_goals(&configs);
        let by_goal = |text: &str| {
            goals
                .iter()
                .find(|g| g.goal.starts_with(text))
                .unwrap_or_else(|| panic!("no goal {text}"))
        };
        let vs_static = by_goal("guest avg latency: pvsched / static-rt <=");
        assert!((vs_static.ratio.expect("ratio") - 1.2).abs() < 1e-9);
        assert_eq!(vs_static.met, Some(true));
        assert_eq!(
            (vs_static.numerator, vs_static.denominator),
            (Some(120.0), Some(100.0))
        );
        assert_eq!(
            by_goal("guest avg latency: pvsched / static-rt-all").met,
            Some(true)
        );
        assert_eq!(
            by_goal("guest avg latency: pvsched / vanilla").met,
            Some(true)
        );
        assert_eq!(
            by_goal("host max latency: pvsched / vanilla").met,
            Some(true)
        );
        let p99 = by_goal("host p99 latency: pvsched / vanilla");
        assert_eq!((p99.ratio, p99.met), (Some(6.0), Some(false)));
        assert_eq!(
            by_goal("host p99 latency: pvsched / static-rt-all").met,
            Some(true)
        );
        let throughput = by_goal("host throughput with a rogue guest");
        assert_eq!(throughput.met, Some(false));
        assert_eq!(throughput.experiment, "rogue guest");
        let rogue_max = by_goal("host max latency with a rogue guest");
        assert_eq!((rogue_max.ratio, rogue_max.met), (Some(2.0), Some(false)));
        // In the same run as the rogue: pvsched 120 µs against static-rt's 100 µs.
        assert_eq!(
            by_goal("well-behaved guest avg latency in the same run: pvsched / static-rt <=").met,
            Some(false)
        );
        assert_eq!(
            by_goal("well-behaved guest avg latency in the same run: pvsched / static-rt-all").met,
            Some(true)
        );
        // One guest per configuration: the rogue guest is the only one.
        assert_eq!(by_goal("well-behaved guests beside the rogue").met, None);

        // Without the rogue configurations, the same-run goals are not measured.
        let mut busy_only = configs.clone();
        busy_only.retain(|name, _| !name.starts_with("rogue-"));
        let goals = evaluate_goals(&busy_only);
        assert!(goals
            .iter()
            .filter(|g| g.experiment == "rogue guest")
            .all(|g| g.met.is_none()));
        let empty = evaluate_goals(&BTreeMap::new());
        assert!(empty.iter().all(|g| g.met.is_none()));
    }

    #[test]
    fn well_behaved_guests_leave_the_rogue_out() {
        let mut rogue = result("rogue-pvsched", 500.0, 0, 0, 0.0);
        let guest = |avg: f64, samples: u64, rogue_vcpu: Option<u32>| GuestRun {
            latency: LatencyFigures {
                samples,
                avg_us: avg,
                ..LatencyFigures::default()
            },
            rogue_vcpu,
            workload: if rogue_vcpu.is_some() {
                "rogue"
            } else {
                "cyclictest"
            }
            .into(),
            ..GuestRun::default()
        };
        rogue.guests = vec![guest(900.0, 100, Some(1))];
        assert_eq!(well_behaved_latency(&rogue), None);
        rogue
            .guests
            .extend([guest(100.0, 300, None), guest(200.0, 100, None)]);
        assert_eq!(well_behaved_latency(&rogue), Some((125.0, 400)));
    }

    #[test]
    fn policy_share_of_nothing_is_no_fraction() {
        let mut share = PolicyShare::default();
        assert_eq!(share.fraction(), None);
        assert_eq!(share.describe(), "no samples");
        share.record(true);
        share.record(false);
        assert_eq!(share.fraction(), Some(0.5));
        assert_eq!(share.describe(), "50% of 2 samples");
    }
}
