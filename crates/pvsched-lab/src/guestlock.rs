//! The guest-lock experiment: user-level locks inside one guest on a loaded host, with and
//! without the host's per-vCPU lines.
//!
//! `pvsched-guest lock-bench` (crates/pvsched-guest) runs three locks in turn, each taken in
//! a loop by 2 × vCPUs threads, so that lock holders are preempted by the guest's scheduler
//! and, on the loaded host, their vCPUs by the host's:
//!
//! - `spin`: test-and-test-and-set, spins however long the holder takes;
//! - `futex`: a futex mutex that never spins;
//! - `pvsched`: spins only while the holder's vCPU line (read through the guest module's
//!   read-only `/dev/pvsched`) says the vCPU runs on a pCPU with room, for at most the spin
//!   limit; parks (futex) when the host shows it preempted, its pCPU overloaded, or the line
//!   has not changed for `--max-age-ms` of guest time.
//!
//! Then `pvsched-guest freshness` measures how often the host republishes vCPU 0's line, in
//! guest time (what decides how old a "preempted" flag can be when the lock reads it), and,
//! with the daemon, `pvsched-guest boost-probe` the RT wake-up to boosted latency.
//!
//! Configurations: `vanilla` (no daemon: the lab formats the page so the module attaches
//! and `/dev/pvsched` exists, but no host line is ever published, so the pvsched lock finds
//! every line stale and parks like the futex mutex), `pvsched` (the daemon, on the channel of
//! `--channel`) and `pvsched-doorbell` (the daemon on `ivshmem-doorbell`).
//!
//! One configuration run: boot the guest on a quiet host (init loads the module and waits for
//! the host's go line); start the daemon (before QEMU on the doorbell channel) or format the
//! page; start the host load, wait for the module to attach and the load to warm up; send go.
//! The guest runs its steps as the init script's diagnostics commands after an empty workload,
//! each step's JSON on one console line (`PVSCHED-LAB GUEST-LOCK <step> rc=N <json>`) and the
//! tool's own messages on `PVSCHED-LAB GUEST-LOCK note ...` lines, which the lab prints as
//! progress. While the guest runs, the vCPU threads' policies are sampled; the load runs until
//! the guest's last step ends. Then the daemon's counters are read and it is stopped, every
//! QEMU thread is checked for a real-time policy left behind, and QEMU is stopped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::configrun::{
    self, daemon_counts, ConfigDone, ConfigRecord, ExperimentResults, Progress, ATTACH_TIMEOUT,
};
use crate::error::{LabError, Result};
use crate::hostd::{Hostd, HostdExit, HostdSpec, HostdVm};
use crate::hostload::{HostLoad, LoadSpec, Throughput};
use crate::hostsched::{process_cpu_ns, thread_policy, RtThread};
use crate::initramfs::{Initramfs, InitramfsSpec};
use crate::page::{static_host_header, PageReader, SlotCounters, SlotTotals};
use crate::qemu::{AccelChoice, Accelerator, Guest, GuestConfig, GuestOutput};
use crate::report::bar_chart_svg;
use crate::results::{ApplyLatency, Channel, ExitCheck, PolicyShare};
use crate::workload::{InitControl, Workload, MARKER_READY};
use crate::{LabAssets, RESULT_SLACK};

/// `experiment` of a guest-lock `results.json`.
pub const EXPERIMENT: &str = "guest-lock";
/// Version of the guest-lock `results.json` layout.
pub const RESULTS_VERSION: u32 = 1;
/// Seconds per lock with `--quick`.
pub const QUICK_LOCK_S: u32 = 5;
/// Seconds per lock by default.
pub const DEFAULT_LOCK_S: u32 = 20;
/// The locks, in the order they run.
pub const LOCKS: [&str; 3] = ["spin", "futex", "pvsched"];
/// The pvsched lock's trust limit on a host line's age (ms), `lock-bench --max-age-ms`.
pub const DEFAULT_MAX_AGE_MS: u64 = 100;
/// The pvsched lock's longest spin (µs), `lock-bench --spin-limit-us` (the tool's default).
pub const SPIN_LIMIT_US: u64 = 50;
/// Busy-loop iterations with the lock held (the tool's default).
pub const INSIDE: u32 = 200;
/// Busy-loop iterations between two acquisitions (the tool's default).
pub const OUTSIDE: u32 = 400;
/// Seconds `pvsched-guest freshness` watches vCPU 0's line.
pub const FRESHNESS_S: u32 = 3;
/// Wake-ups of `pvsched-guest boost-probe`.
pub const PROBE_TRIALS: u32 = 20;
/// Sleep before each wake-up of the boost probe (ms; longer than the module's
/// `idle_boost_ms`, so each wake-up finds the vCPU unboosted).
pub const PROBE_GAP_MS: u32 = 300;

/// Prefix of the console lines the guest's steps print.
pub const STEP_MARKER: &str = "PVSCHED-LAB GUEST-LOCK";
/// How long init may take from boot to READY (module load).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the vCPU thread policies are sampled while the guest runs.
const POLICY_SAMPLE_PERIOD: Duration = Duration::from_millis(50);
/// How often a progress line is printed while the guest runs.
const PROGRESS_PERIOD: Duration = Duration::from_secs(10);

/// A configuration of the guest-lock experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestLockConfig {
    /// No daemon: the host lines are never published.
    Vanilla,
    /// The daemon, on the channel of `--channel`.
    Pvsched,
    /// The daemon on `ivshmem-doorbell`.
    PvschedDoorbell,
}

impl GuestLockConfig {
    /// Every configuration, in report order.
    pub const ALL: [GuestLockConfig; 3] = [
        GuestLockConfig::Vanilla,
        GuestLockConfig::Pvsched,
        GuestLockConfig::PvschedDoorbell,
    ];
    /// The configurations run when `--configs` names none.
    pub const DEFAULT: [GuestLockConfig; 2] = [GuestLockConfig::Vanilla, GuestLockConfig::Pvsched];

    /// `vanilla`, `pvsched`, `pvsched-doorbell`.
    pub fn name(self) -> &'static str {
        match self {
            GuestLockConfig::Vanilla => "vanilla",
            GuestLockConfig::Pvsched => "pvsched",
            GuestLockConfig::PvschedDoorbell => "pvsched-doorbell",
        }
    }

    /// Parses a configuration name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|config| config.name() == name)
    }

    /// The daemon runs.
    pub fn runs_daemon(self) -> bool {
        self != GuestLockConfig::Vanilla
    }

    /// The daemon's channel under `--channel requested`; `None` without a daemon.
    pub fn channel(self, requested: Channel) -> Option<Channel> {
        match self {
            GuestLockConfig::Vanilla => None,
            GuestLockConfig::Pvsched => Some(requested),
            GuestLockConfig::PvschedDoorbell => Some(Channel::Doorbell),
        }
    }
}

/// The parameters of a guest-lock run (recorded in `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestLockParams {
    /// `--quick`.
    pub quick: bool,
    /// vCPUs of the guest.
    pub vcpus: u32,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// Threads taking the lock (2 × vCPUs).
    pub threads: u32,
    /// Seconds per lock.
    pub lock_seconds: u32,
    /// The locks, in the order they run.
    pub locks: Vec<String>,
    /// Busy-loop iterations with the lock held.
    pub inside: u32,
    /// Busy-loop iterations between two acquisitions.
    pub outside: u32,
    /// The pvsched lock's longest spin (µs).
    pub spin_limit_us: u64,
    /// The pvsched lock's trust limit on a host line's age (ms of guest time).
    pub max_age_ms: u64,
    /// The vCPU whose line `freshness` watches (and the boost probe wakes on).
    pub freshness_cpu: u32,
    /// Seconds `freshness` watches.
    pub freshness_seconds: u32,
    /// Wake-ups of the boost probe (daemon configurations only).
    pub probe_trials: u32,
    /// Sleep before each wake-up of the boost probe (ms).
    pub probe_gap_ms: u32,
    /// Seconds of host load before the guest starts.
    pub warmup_s: u32,
    /// The host load.
    pub load: LoadSpec,
    /// Where the load comes from: `the lab's default load` or `--cpu-load P`.
    pub load_origin: String,
    /// `--channel` (the `pvsched` configuration's channel).
    pub channel: Channel,
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

impl GuestLockParams {
    /// Seconds the guest's steps take under `config` (lock-bench, freshness, boost probe).
    pub fn guest_seconds(&self, config: GuestLockConfig) -> u64 {
        let bench = u64::from(self.lock_seconds) * self.locks.len() as u64;
        let probe = if config.runs_daemon() {
            u64::from(self.probe_trials) * u64::from(self.probe_gap_ms) / 1000
        } else {
            0
        };
        bench + u64::from(self.freshness_seconds) + probe
    }
}

/// Checks the parameters of a guest-lock run.
pub fn validate(params: &GuestLockParams) -> Result<()> {
    let range = |name: &str, value: u64, min: u64, max: u64| {
        if (min..=max).contains(&value) {
            Ok(())
        } else {
            Err(LabError::InvalidConfig(format!(
                "{name} {value} is outside {min}..={max}"
            )))
        }
    };
    range("--vcpus", params.vcpus.into(), 1, 64)?;
    range("threads", params.threads.into(), 1, 1024)?;
    range(
        "--duration-s (per lock)",
        params.lock_seconds.into(),
        1,
        3600,
    )?;
    range("--lock-max-age-ms", params.max_age_ms, 1, 60_000)?;
    if let Some(percent) = params.load.cpu_load {
        range("--cpu-load", percent.into(), 1, 100)?;
    }
    if params.freshness_cpu >= params.vcpus {
        return Err(LabError::InvalidConfig(format!(
            "vCPU {} to watch, but the guest has {}",
            params.freshness_cpu, params.vcpus
        )));
    }
    if let Some(unknown) = params
        .locks
        .iter()
        .find(|lock| !LOCKS.contains(&lock.as_str()))
    {
        return Err(LabError::InvalidConfig(format!("unknown lock {unknown:?}")));
    }
    Ok(())
}

/// `{ COMMAND > /tmp/NAME.json; echo $? > /tmp/NAME.rc; } 2>&1 | ...`: runs one step, its
/// messages (stderr) as note lines while it runs, then its JSON and exit code on one line.
fn step(name: &str, command: &str) -> String {
    format!(
        "{{ {command} > /tmp/{name}.json; echo $? > /tmp/{name}.rc; }} 2>&1 | \
         while IFS= read -r line; do echo \"{STEP_MARKER} note $line\"; done\n\
         echo \"{STEP_MARKER} {name} rc=$(cat /tmp/{name}.rc) $(cat /tmp/{name}.json)\""
    )
}

/// The guest's steps under `config`: the init script's diagnostics commands.
pub fn guest_commands(params: &GuestLockParams, config: GuestLockConfig) -> Vec<String> {
    let mut commands = vec![
        "mkdir -p /tmp".to_owned(),
        step(
            "lock-bench",
            &format!(
                "pvsched-guest lock-bench --threads {} --seconds {} --inside {} --outside {} \
                 --locks {} --spin-limit-us {} --max-age-ms {}",
                params.threads,
                params.lock_seconds,
                params.inside,
                params.outside,
                params.locks.join(","),
                params.spin_limit_us,
                params.max_age_ms
            ),
        ),
        step(
            "freshness",
            &format!(
                "pvsched-guest freshness --cpu {} --seconds {}",
                params.freshness_cpu, params.freshness_seconds
            ),
        ),
    ];
    if config.runs_daemon() {
        commands.push(step(
            "boost-probe",
            &format!(
                "pvsched-guest boost-probe --cpu {} --trials {} --gap-ms {}",
                params.freshness_cpu, params.probe_trials, params.probe_gap_ms
            ),
        ));
    }
    commands.push(format!("echo \"{STEP_MARKER} end\""));
    commands.push("dmesg | grep pvsched_guest | tail -n 5".to_owned());
    commands
}

/// One console line of the guest's steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// A message of the tool (its stderr).
    Note(String),
    /// A step ended: its name, exit code and standard output (JSON when it succeeded).
    Step {
        /// `lock-bench`, `freshness`, `boost-probe`.
        name: String,
        /// Exit code (-1 when the line has none).
        rc: i32,
        /// What it printed on stdout.
        output: String,
    },
    /// Every step ran.
    End,
}

/// Parses a console line of the guest's steps; `None` for any other line.
pub fn parse_line(line: &str) -> Option<GuestLine> {
    let rest = line.strip_prefix(STEP_MARKER)?.strip_prefix(' ')?;
    if let Some(note) = rest.strip_prefix("note ") {
        return Some(GuestLine::Note(note.to_owned()));
    }
    if rest.trim() == "end" {
        return Some(GuestLine::End);
    }
    let (name, rest) = rest.split_once(' ')?;
    let (rc, output) = rest.split_once(' ').unwrap_or((rest, ""));
    let rc = rc
        .strip_prefix("rc=")
        .and_then(|rc| rc.parse().ok())
        .unwrap_or(-1);
    Some(GuestLine::Step {
        name: name.to_owned(),
        rc,
        output: output.trim().to_owned(),
    })
}

/// Percentiles of a set of samples (µs), as `pvsched-guest` prints them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median (µs).
    pub p50_us: f64,
    /// 90th percentile (µs).
    pub p90_us: f64,
    /// 99th percentile (µs).
    pub p99_us: f64,
    /// Largest (µs).
    pub max_us: f64,
}

/// What the pvsched lock did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvLockCounters {
    /// Waits that parked.
    pub parks: u64,
    /// Parks because the holder's vCPU was preempted.
    pub parked_preempted: u64,
    /// Parks because the holder's pCPU was overloaded.
    pub parked_overloaded: u64,
    /// Parks because the host line was stale or unreadable.
    pub parked_unknown: u64,
    /// Parks after spinning for the whole spin limit.
    pub parked_spin_limit: u64,
}

/// One lock's run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LockResult {
    /// Acquisitions by all threads.
    pub ops: u64,
    /// Acquisitions per second.
    pub ops_per_sec: f64,
    /// Fewest acquisitions of one thread.
    pub min_thread_ops: u64,
    /// Most acquisitions of one thread.
    pub max_thread_ops: u64,
    /// Sampled acquire latency (µs).
    pub acquire_p50_us: f64,
    /// Sampled acquire latency (µs).
    pub acquire_p99_us: f64,
    /// Sampled acquire latency (µs).
    pub acquire_max_us: f64,
}

/// One lock of `lock-bench`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockRun {
    /// `spin`, `futex`, `pvsched`.
    pub lock: String,
    /// What it measured.
    pub result: LockResult,
    /// The pvsched lock's counters (that lock only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<PvLockCounters>,
}

/// `pvsched-guest lock-bench`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockBench {
    /// Threads taking the lock.
    pub threads: u32,
    /// Seconds per lock.
    pub seconds: f64,
    /// Busy-loop iterations with the lock held.
    pub inside: u32,
    /// Busy-loop iterations between acquisitions.
    pub outside: u32,
    /// vCPU lines the host publishes (the guest's vCPUs).
    pub vcpus: u32,
    /// Per lock, in run order.
    pub locks: Vec<LockRun>,
}

impl LockBench {
    /// The run of `lock`.
    pub fn lock(&self, lock: &str) -> Option<&LockRun> {
        self.locks.iter().find(|run| run.lock == lock)
    }

    /// `lock`'s acquisitions per second over the futex mutex's in the same run.
    pub fn relative_to_futex(&self, lock: &str) -> Option<f64> {
        let futex = self.lock("futex")?.result.ops_per_sec;
        let this = self.lock(lock)?.result.ops_per_sec;
        (futex > 0.0).then(|| this / futex)
    }
}

/// `pvsched-guest freshness`'s output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Freshness {
    /// The vCPU watched.
    pub cpu: u32,
    /// Guest-time intervals between two changes of the line's publication time.
    pub republish_interval: Summary,
}

/// `pvsched-guest boost-probe`'s output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BoostProbe {
    /// Timer deadline to the line showing the vCPU boosted.
    pub boost_seen: Summary,
    /// Timer deadline to the task's first look at the line (the guest's own wake-up).
    pub woke: Summary,
    /// Trials whose first look already showed the vCPU boosted.
    pub boosted_at_first_look: u64,
    /// Trials not counted: the vCPU was still boosted just before the wake-up.
    pub not_unboosted: u64,
    /// Trials with no boost within the probe's deadline.
    pub timed_out: u64,
}

/// What the guest's steps produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestSteps {
    /// `lock-bench`.
    pub lock_bench: Option<LockBench>,
    /// `freshness`.
    pub freshness: Option<Freshness>,
    /// `boost-probe`.
    pub boost_probe: Option<BoostProbe>,
    /// The tool's messages.
    pub notes: Vec<String>,
    /// Steps that failed or printed what could not be read.
    pub errors: Vec<String>,
    /// The end line was seen.
    pub ended: bool,
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Parses the guest's console (or its diagnostics section) into its steps' results.
pub fn parse_steps(console: &str) -> GuestSteps {
    let mut steps = GuestSteps::default();
    for line in console.lines() {
        let Some(parsed) = parse_line(line.trim_end()) else {
            continue;
        };
        let (name, rc, output) = match parsed {
            GuestLine::Note(note) => {
                steps.notes.push(note);
                continue;
            }
            GuestLine::End => {
                steps.ended = true;
                continue;
            }
            GuestLine::Step { name, rc, output } => (name, rc, output),
        };
        if rc != 0 {
            let last_note = steps.notes.last().map(String::as_str).unwrap_or_default();
            steps
                .errors
                .push(format!("{name} exited with rc={rc}: {last_note}"));
            continue;
        }
        let unreadable =
            |error: serde_json::Error| format!("{name}: unreadable output ({error}): {output}");
        match name.as_str() {
            "lock-bench" => match serde_json::from_str(&output) {
                Ok(bench) => steps.lock_bench = Some(bench),
                Err(error) => steps.errors.push(unreadable(error)),
            },
            "freshness" => match serde_json::from_str(&output) {
                Ok(freshness) => steps.freshness = Some(freshness),
                Err(error) => steps.errors.push(unreadable(error)),
            },
            "boost-probe" => match serde_json::from_str(&output) {
                Ok(probe) => steps.boost_probe = Some(probe),
                Err(error) => steps.errors.push(unreadable(error)),
            },
            other => steps.errors.push(format!("unknown step {other:?}")),
        }
    }
    steps
}

/// What is missing or inconsistent in `steps` for a run of `config` with `params`.
pub fn step_problems(
    steps: &GuestSteps,
    params: &GuestLockParams,
    config: GuestLockConfig,
) -> Vec<String> {
    let mut problems = steps.errors.clone();
    match &steps.lock_bench {
        None => problems.push("no lock-bench result".into()),
        Some(bench) => {
            let ran: Vec<&str> = bench.locks.iter().map(|run| run.lock.as_str()).collect();
            if ran != params.locks {
                problems.push(format!("lock-bench ran {ran:?}, not {:?}", params.locks));
            }
            if bench.threads != params.threads {
                problems.push(format!(
                    "lock-bench ran {} threads, not {}",
                    bench.threads, params.threads
                ));
            }
            if bench.vcpus != params.vcpus {
                problems.push(format!(
                    "the guest sees {} vCPU lines, not {}",
                    bench.vcpus, params.vcpus
                ));
            }
            if let Some(run) = bench.locks.iter().find(|run| run.result.ops == 0) {
                problems.push(format!("the {} lock was never taken", run.lock));
            }
        }
    }
    if steps.freshness.is_none() {
        problems.push("no freshness result".into());
    }
    if config.runs_daemon() && steps.boost_probe.is_none() {
        problems.push("no boost-probe result".into());
    }
    if !steps.ended {
        problems.push("the guest's steps did not end".into());
    }
    problems
}

/// Everything measured for one configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestLockConfigResult {
    /// Configuration name.
    pub name: String,
    /// The daemon ran.
    pub daemon: bool,
    /// The daemon's channel (`None` without a daemon).
    pub channel: Option<Channel>,
    /// QEMU's `-name`.
    pub guest: String,
    /// QEMU process id.
    pub qemu_pid: u32,
    /// vCPU thread ids.
    pub vcpu_tids: Vec<u32>,
    /// Boot time (ms).
    pub boot_ms: u64,
    /// Guest module status from init (`loaded`, ...).
    pub module: Option<String>,
    /// The module had attached when the guest was sent go.
    pub module_attached: bool,
    /// Guest module heartbeat at go.
    pub heartbeat_before: u64,
    /// Guest module heartbeat after the guest's steps.
    pub heartbeat_after: u64,
    /// `lock-bench`: per lock ops/s, acquire latency, thread spread, the pvsched lock's
    /// counters.
    pub lock_bench: Option<LockBench>,
    /// `freshness` of vCPU 0's host line, in guest time.
    pub freshness: Option<Freshness>,
    /// The host republished the watched line while `freshness` looked (`None`: not
    /// measured).
    pub host_lines_republished: Option<bool>,
    /// `boost-probe` (daemon configurations).
    pub boost_probe: Option<BoostProbe>,
    /// The tool's messages.
    pub guest_notes: Vec<String>,
    /// Host throughput: geometric mean over stressors of bogo-ops per second.
    pub host_bogo_ops_per_s: f64,
    /// The same summed over stressors.
    pub host_bogo_ops_per_s_total: f64,
    /// Per stressor.
    pub host_bogo_ops_per_s_by_stressor: BTreeMap<String, f64>,
    /// The daemon's counters per vCPU slot at the end.
    pub slots: Vec<SlotCounters>,
    /// Boosts by the daemon, all vCPUs.
    pub boosts: u64,
    /// Throttles by the daemon, all vCPUs.
    pub throttles: u64,
    /// Boosted CPU time (ms).
    pub boosted_ms: f64,
    /// Scheduling changes the daemon applied, from its status just before SIGTERM.
    pub applies: Option<u64>,
    /// The daemon's apply latency.
    pub apply_latency: Option<ApplyLatency>,
    /// CPU time the daemon's process used while the guest ran, in % of one CPU.
    pub daemon_cpu_percent: Option<f64>,
    /// How the daemon ended.
    pub hostd: Option<HostdExit>,
    /// How often the vCPU threads were found real-time while the guest ran.
    pub vcpu_policy: PolicyShare,
    /// Every thread of QEMU checked just before it was stopped (`None`: not checked).
    pub exit_check: Option<ExitCheck>,
    /// QEMU threads still real-time after the daemon stopped (must be empty).
    pub leftover_rt_threads: Vec<RtThread>,
    /// Seconds from go to the guest's last step (host clock).
    pub guest_run_s: f64,
    /// Wall-clock time of the configuration run (s).
    pub elapsed_s: f64,
    /// Why the run failed, when it did.
    pub error: Option<String>,
}

/// `results.json` of the guest-lock experiment.
pub type GuestLockResults = ExperimentResults<GuestLockParams, GuestLockConfigResult>;

impl GuestLockResults {
    /// Configurations in report order.
    pub fn ordered(&self) -> Vec<&GuestLockConfigResult> {
        self.ordered_by(&GuestLockConfig::ALL.map(GuestLockConfig::name))
    }
}

/// Everything a guest-lock run needs besides the assets.
#[derive(Debug, Clone)]
pub struct GuestLockSpec {
    /// Run parameters.
    pub params: GuestLockParams,
    /// Configurations, in order.
    pub configs: Vec<GuestLockConfig>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// The guest module.
    pub module: Option<PathBuf>,
    /// The `pvsched-guest` binary for the initramfs.
    pub guest_tool: PathBuf,
    /// How to run the daemon; `Err` says why it cannot.
    pub hostd: std::result::Result<HostdSpec, String>,
    /// Results directory (logs go here too).
    pub out_dir: PathBuf,
    /// Scratch directory.
    pub run_dir: PathBuf,
}

/// Runs every configuration of `spec` and returns the results (also when some
/// configurations failed: their `error` says why).
pub fn run_guest_lock(assets: &LabAssets, spec: &GuestLockSpec) -> Result<GuestLockResults> {
    validate(&spec.params)?;
    let progress = Progress::start();
    fs::create_dir_all(&spec.run_dir).map_err(LabError::io("create", &spec.run_dir))?;
    fs::create_dir_all(&spec.out_dir).map_err(LabError::io("create", &spec.out_dir))?;
    let params = &spec.params;
    progress.line(format_args!(
        "guest-lock: one guest of {} vCPUs, {} threads per lock ({}), {} s per lock; host load {} ({}) on {} host CPUs",
        params.vcpus,
        params.threads,
        params.locks.join(", "),
        params.lock_seconds,
        params.load.describe(),
        params.load_origin,
        params.host_cpus
    ));
    let sequence = configrun::run_sequence(
        &progress,
        &spec.configs,
        |config| config.name().to_owned(),
        |config, label| {
            let mut result = GuestLockConfigResult {
                name: config.name().to_owned(),
                daemon: config.runs_daemon(),
                channel: config.channel(params.channel),
                ..GuestLockConfigResult::default()
            };
            let mut run = ConfigRun {
                assets,
                spec,
                config,
                progress: &progress,
                label,
                accelerator: None,
                kvm_fallback: None,
            };
            let outcome = run.run(&mut result);
            ConfigDone {
                result,
                outcome,
                accelerator: run.accelerator,
                kvm_fallback: run.kvm_fallback,
            }
        },
    )?;
    Ok(sequence.into_results(
        EXPERIMENT,
        RESULTS_VERSION,
        params.clone(),
        progress.elapsed().as_secs_f64(),
    ))
}

impl ConfigRecord for GuestLockConfigResult {
    fn error_and_elapsed(&mut self) -> (&mut Option<String>, &mut f64) {
        (&mut self.error, &mut self.elapsed_s)
    }

    fn summary(&self) -> String {
        format!(
            "{}; {}",
            self.lock_bench
                .as_ref()
                .map_or("no lock-bench result".to_owned(), bench_summary),
            daemon_counts(self.boosts, self.throttles, self.applies)
        )
    }
}

/// `spin 1234 ops/s, futex 567 ops/s, pvsched 890 ops/s (parks 12: ...)`.
fn bench_summary(bench: &LockBench) -> String {
    bench
        .locks
        .iter()
        .map(|run| {
            let mut text = format!("{} {:.0} ops/s", run.lock, run.result.ops_per_sec);
            if let Some(c) = run.counters {
                let _ = write!(text, " ({})", parks_cell(&c));
            }
            text
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A progress line for a step the guest finished.
fn step_summary(name: &str, rc: i32, output: &str) -> String {
    if rc != 0 {
        return format!("guest: {name} failed (rc={rc})");
    }
    let steps = parse_steps(&format!("{STEP_MARKER} {name} rc=0 {output}"));
    if let Some(bench) = &steps.lock_bench {
        format!("guest: lock-bench: {}", bench_summary(bench))
    } else if let Some(f) = &steps.freshness {
        format!(
            "guest: freshness of vCPU {}'s line: {} changes, interval p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            f.cpu,
            f.republish_interval.count,
            f.republish_interval.p50_us / 1000.0,
            f.republish_interval.p99_us / 1000.0,
            f.republish_interval.max_us / 1000.0
        )
    } else if let Some(p) = &steps.boost_probe {
        format!(
            "guest: boost-probe: {} boosted (p50 {:.0} µs, p99 {:.0} µs), {} timed out, {} not counted",
            p.boost_seen.count, p.boost_seen.p50_us, p.boost_seen.p99_us, p.timed_out, p.not_unboosted
        )
    } else {
        format!("guest: {name}: {}", steps.errors.join("; "))
    }
}

/// The booted guest of a configuration run.
struct RunningGuest {
    guest: Guest,
    page: Option<PageReader>,
}

/// One configuration run (see the module documentation).
struct ConfigRun<'a> {
    assets: &'a LabAssets,
    spec: &'a GuestLockSpec,
    config: GuestLockConfig,
    progress: &'a Progress,
    label: &'a str,
    accelerator: Option<Accelerator>,
    kvm_fallback: Option<String>,
}

impl ConfigRun<'_> {
    fn say(&self, message: impl std::fmt::Display) {
        self.progress
            .line(format_args!("{}: {message}", self.label));
    }

    /// Runs the configuration; whatever happened, a QEMU still running is then checked for
    /// real-time threads (after the daemon stopped) and only then stopped.
    fn run(&mut self, result: &mut GuestLockConfigResult) -> Result<()> {
        let mut running = None;
        let outcome = self.run_guest(result, &mut running);
        if let Some(running) = running.as_mut() {
            result.exit_check =
                configrun::exit_check(&mut running.guest, "guest", &|m| self.say(m));
            result.leftover_rt_threads = configrun::leftover(result.exit_check.as_ref()).collect();
        }
        let totals = SlotTotals::of(&result.slots);
        (result.boosts, result.throttles, result.boosted_ms) =
            (totals.boosts, totals.throttles, totals.boosted_ms);
        drop(running);
        outcome
    }

    /// The initramfs of this configuration (its steps differ with the daemon).
    fn initramfs(&self) -> Result<Initramfs> {
        let params = &self.spec.params;
        Initramfs::build(
            &InitramfsSpec {
                busybox: self.assets.busybox.clone(),
                programs: vec![self.spec.guest_tool.clone()],
                module: self.spec.module.clone(),
                kernel_modules: Vec::new(),
                files: Vec::new(),
                module_params: params.module_params.clone(),
                workload: Workload::Idle { duration_s: 0 },
                diagnostics: guest_commands(params, self.config),
                control: InitControl {
                    wait_for_go: true,
                    hold_after_done: true,
                },
            },
            &self
                .spec
                .run_dir
                .join(format!("initramfs-guest-lock-{}.cpio", self.config.name())),
        )
    }

    /// Starts the daemon on the doorbell channel (it serves QEMU's ivshmem-doorbell device,
    /// so it comes first); returns it with its server socket.
    fn start_doorbell_daemon(
        &self,
        spec: &HostdSpec,
        config_dir: &Path,
    ) -> Result<(Hostd, PathBuf)> {
        let server = config_dir.join("ivshmem.sock");
        let _ = fs::remove_file(&server);
        let spec = HostdSpec {
            ivshmem_server: Some(server.clone()),
            ..spec.clone()
        };
        let name = self.config.name();
        self.say("starting the daemon (ivshmem-doorbell server)");
        let mut daemon = Hostd::start(
            &spec,
            &[],
            config_dir,
            &self.spec.out_dir.join(format!("hostd-{name}.toml")),
            &self.spec.out_dir.join(format!("hostd-{name}.log")),
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.exists() {
            if !daemon.is_running() || Instant::now() >= deadline {
                let exit = daemon.stop(Duration::from_secs(1), None)?;
                return Err(LabError::Run(format!(
                    "the daemon did not serve {}: {}; log tail:\n{}",
                    server.display(),
                    exit.status,
                    exit.log_tail
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok((daemon, server))
    }

    /// Boots the guest, runs the daemon or formats the page, loads the host, runs the
    /// guest's steps, collects and stops the daemon (see the module documentation).
    fn run_guest(
        &mut self,
        result: &mut GuestLockConfigResult,
        slot: &mut Option<RunningGuest>,
    ) -> Result<()> {
        let params = &self.spec.params;
        let hostd_spec = match (&self.spec.hostd, self.config.runs_daemon()) {
            (Err(reason), true) => {
                return Err(LabError::Run(format!("the daemon cannot run: {reason}")))
            }
            (Ok(spec), true) => Some(spec.clone()),
            (_, false) => None,
        };
        let config_dir = self.spec.run_dir.join(self.config.name());
        fs::create_dir_all(&config_dir).map_err(LabError::io("create", &config_dir))?;
        let initramfs = self.initramfs()?;

        // 0. On the doorbell channel the daemon comes first.
        let mut hostd = None;
        let doorbell = match (&hostd_spec, result.channel) {
            (Some(spec), Some(Channel::Doorbell)) => {
                let (daemon, server) = self.start_doorbell_daemon(spec, &config_dir)?;
                hostd = Some(daemon);
                Some(server)
            }
            _ => None,
        };

        // 1. Boot on a quiet host.
        let name = format!("lab{}-lock-{}", std::process::id(), self.config.name());
        let mut config = GuestConfig::new(&name, &self.assets.kernel_image, &initramfs.path);
        config.vcpus = params.vcpus;
        config.memory_mib = params.memory_mib;
        config.accel = self.spec.accel;
        config.qemu = self.assets.qemu.clone();
        config.run_dir = self.spec.run_dir.clone();
        config.doorbell_server = doorbell.clone();
        if !self.config.runs_daemon() {
            config.shm_initial_contents = Some(static_host_header(params.vcpus));
        }
        self.say(format_args!(
            "booting guest {name} ({} vCPUs{})",
            params.vcpus,
            if doorbell.is_some() {
                ", ivshmem-doorbell"
            } else {
                ""
            }
        ));
        let guest = Guest::boot(&config)?;
        self.accelerator = Some(guest.accelerator());
        self.kvm_fallback = guest.kvm_fallback().map(str::to_owned);
        result.guest = name.clone();
        result.qemu_pid = guest.pid();
        result.boot_ms = u64::try_from(guest.boot_time().as_millis()).unwrap_or(u64::MAX);
        let running = slot.insert(RunningGuest { guest, page: None });
        running.guest.wait_for_marker(MARKER_READY, READY_TIMEOUT)?;
        result.vcpu_tids = running.guest.vcpu_tids()?;
        let page = match doorbell {
            Some(_) => running.guest.doorbell_page().ok_or_else(|| {
                LabError::Run(format!("{name}: no pvsched memfd in QEMU's mappings"))
            })?,
            None => running.guest.shm_path().to_owned(),
        };
        running.page = Some(PageReader::open(&page, params.vcpus)?);

        // 2. The daemon on the plain channel.
        if let (Some(spec), None) = (&hostd_spec, &hostd) {
            let vms = [HostdVm {
                name: name.clone(),
                qmp: running.guest.qmp_path().to_owned(),
                shm: running.guest.shm_path().to_owned(),
            }];
            let config_name = self.config.name();
            self.say("starting the daemon");
            hostd = Some(Hostd::start(
                spec,
                &vms,
                &config_dir,
                &self.spec.out_dir.join(format!("hostd-{config_name}.toml")),
                &self.spec.out_dir.join(format!("hostd-{config_name}.log")),
            )?);
        }

        // 3. Load, attach, warm-up, go.
        let guest_seconds = params.guest_seconds(self.config);
        let load_started = Instant::now();
        let mut load = if params.load.is_empty() {
            None
        } else {
            self.say(format_args!(
                "host load: {} ({})",
                params.load.describe(),
                params.load_origin
            ));
            let backstop = Duration::from_secs(
                u64::from(params.warmup_s) + guest_seconds + ATTACH_TIMEOUT.as_secs() + 600,
            );
            Some(HostLoad::start(
                &self.assets.stress_ng,
                &params.load,
                backstop,
                &config_dir.join("stress-ng"),
            )?)
        };
        self.wait_attached(running, &mut hostd)?;
        let warmup = Duration::from_secs(params.warmup_s.into());
        if let Some(rest) = warmup.checked_sub(load_started.elapsed()) {
            thread::sleep(rest);
        }
        if let Some(page) = &running.page {
            let snapshot = page.snapshot();
            result.module_attached = snapshot.guest_attached;
            result.heartbeat_before = snapshot.guest_heartbeat;
        }
        running.guest.send_go()?;
        let go = Instant::now();
        let daemon_pid = hostd.as_ref().map(Hostd::pid);
        let daemon_cpu_at_go = daemon_pid.and_then(|pid| process_cpu_ns(Path::new("/proc"), pid));
        self.say(format_args!(
            "guest running its steps, about {guest_seconds} s"
        ));

        // 4. Follow the guest's steps; sample the vCPU threads meanwhile.
        let deadline = go + Duration::from_secs(guest_seconds) + RESULT_SLACK;
        let qemu_pid = result.qemu_pid;
        let tids = result.vcpu_tids.clone();
        let mut share = PolicyShare::default();
        let this = &*self;
        let guest = &mut running.guest;
        let output: Result<GuestOutput> = thread::scope(|scope| {
            let follower = scope.spawn(move || follow(guest, deadline, &|line| this.say(line)));
            let mut next_progress = go + PROGRESS_PERIOD;
            while !follower.is_finished() {
                for &tid in &tids {
                    if let Some(policy) = thread_policy(Path::new("/proc"), qemu_pid, tid) {
                        share.record(policy.is_realtime());
                    }
                }
                if Instant::now() >= next_progress {
                    let left = Duration::from_secs(guest_seconds)
                        .saturating_sub(go.elapsed())
                        .as_secs();
                    if left > 0 {
                        this.say(format_args!("guest running, about {left} s left"));
                    }
                    next_progress += PROGRESS_PERIOD;
                }
                thread::sleep(POLICY_SAMPLE_PERIOD);
            }
            follower
                .join()
                .unwrap_or_else(|_| Err(LabError::Run("guest follower thread panicked".into())))
        });
        result.guest_run_s = go.elapsed().as_secs_f64();
        result.vcpu_policy = share;
        result.daemon_cpu_percent = daemon_pid
            .and_then(|pid| process_cpu_ns(Path::new("/proc"), pid))
            .zip(daemon_cpu_at_go)
            .map(|(now, then)| {
                now.saturating_sub(then) as f64 / go.elapsed().as_nanos() as f64 * 100.0
            });
        let throughput: Option<Throughput> = match load.take() {
            Some(running) => {
                running.interrupt();
                match running.finish(Duration::from_secs(10)) {
                    Ok(throughput) => Some(throughput),
                    Err(error) => {
                        self.say(format_args!("stress-ng: {error}"));
                        None
                    }
                }
            }
            None => None,
        };
        if let Some(throughput) = throughput {
            result.host_bogo_ops_per_s = throughput.geometric_mean();
            result.host_bogo_ops_per_s_total = throughput.bogo_ops_per_s;
            result.host_bogo_ops_per_s_by_stressor = throughput.per_stressor;
        }
        let log = self
            .spec
            .out_dir
            .join(format!("guest-{}.log", self.config.name()));
        let _ = fs::write(&log, running.guest.console().join("\n") + "\n");

        // The guest's results and the page, before the daemon stops.
        let mut guest_error = None;
        match output {
            Ok(output) => {
                result.module = output.module.clone();
                let steps = parse_steps(&output.diagnostics);
                let problems = step_problems(&steps, params, self.config);
                result.freshness = steps.freshness;
                result.host_lines_republished =
                    steps.freshness.map(|f| f.republish_interval.count > 0);
                result.lock_bench = steps.lock_bench;
                result.boost_probe = steps.boost_probe;
                result.guest_notes = steps.notes;
                if !problems.is_empty() {
                    guest_error = Some(LabError::Run(format!("{name}: {}", problems.join("; "))));
                }
            }
            Err(error) => guest_error = Some(error),
        }
        if let Some(page) = &running.page {
            let snapshot = page.snapshot();
            result.heartbeat_after = snapshot.guest_heartbeat;
            result.slots = snapshot.slots;
        }

        // 5. Stop the daemon; `run` then checks the threads and stops QEMU.
        if let Some(daemon) = hostd.take() {
            let status_path = self
                .spec
                .out_dir
                .join(format!("hostd-{}.status.json", self.config.name()));
            let stopped = configrun::stop_daemon(daemon, &status_path, &|m| self.say(m))?;
            result.applies = stopped.applies;
            result.apply_latency = stopped.apply_latency;
            result.hostd = Some(stopped.exit);
            if let Some(page) = &running.page {
                let snapshot = page.snapshot();
                for (kept, last) in result.slots.iter_mut().zip(snapshot.slots) {
                    *kept = kept.max(last);
                }
            }
        }
        guest_error.map_or(Ok(()), Err)
    }

    /// Waits until the guest module has attached (see [`configrun::wait_attached`]).
    fn wait_attached(&self, running: &RunningGuest, hostd: &mut Option<Hostd>) -> Result<()> {
        configrun::wait_attached(
            &[running.page.as_ref()],
            self.spec.module.is_some(),
            hostd,
            &|m| self.say(m),
        )
    }
}

/// Reads the guest's step lines as they come (printing each as progress) until the end
/// line, then waits for init's done marker.
fn follow(guest: &mut Guest, deadline: Instant, say: &dyn Fn(String)) -> Result<GuestOutput> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        guest.wait_for_marker(STEP_MARKER, left)?;
        let line = guest.console().last().cloned().unwrap_or_default();
        match parse_line(&line) {
            Some(GuestLine::End) => break,
            Some(GuestLine::Note(note)) => say(format!("guest: {note}")),
            Some(GuestLine::Step { name, rc, output }) => say(step_summary(&name, rc, &output)),
            None => {}
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    guest.wait_done(left.max(Duration::from_secs(10)))
}

fn cell(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(value) if value.is_finite() => format!("{value:.digits$}"),
        _ => "–".to_owned(),
    }
}

/// `12 (preempted 0 / overloaded 3 / stale 9 / spin limit 0)`.
fn parks_cell(c: &PvLockCounters) -> String {
    format!(
        "parks {}: preempted {} / overloaded {} / stale {} / spin limit {}",
        c.parks, c.parked_preempted, c.parked_overloaded, c.parked_unknown, c.parked_spin_limit
    )
}

/// The results in Markdown: the run's parameters, one row per configuration and lock, a
/// table of what the host's lines and the daemon did per configuration, and notes.
pub fn markdown(results: &GuestLockResults) -> String {
    let params = &results.params;
    let ordered = results.ordered();
    let accel = results
        .accelerator
        .map_or("unknown".to_owned(), |accel| accel.to_string());
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Guest locks: one guest of {vcpus} vCPUs ({memory} MiB) under {accel}, guest kernel {guest}, \
         on {cpus} host CPUs (host {kernel}) loaded by `{load}` ({origin}). In the guest, \
         `pvsched-guest lock-bench` runs each lock for {seconds} s with {threads} threads \
         (2 × vCPUs), {inside} busy-loop iterations inside the lock and {outside} outside; \
         the pvsched lock spins at most {spin} µs and trusts a host line for {age} ms of guest time.\n",
        vcpus = params.vcpus,
        memory = params.memory_mib,
        guest = params.guest_kernel,
        cpus = params.host_cpus,
        kernel = params.host_kernel,
        load = params.load.describe(),
        origin = params.load_origin,
        seconds = params.lock_seconds,
        threads = params.threads,
        inside = params.inside,
        outside = params.outside,
        spin = params.spin_limit_us,
        age = params.max_age_ms,
    );
    text.push_str(
        "| config | lock | ops/s | vs futex | acquire p99 (µs) | acquire max (ms) | parks by reason |\n\
         |---|---|---:|---:|---:|---:|---|\n",
    );
    for result in &ordered {
        let Some(bench) = &result.lock_bench else {
            let _ = writeln!(text, "| {} | – | – | – | – | – | – |", result.name);
            continue;
        };
        for run in &bench.locks {
            let _ = writeln!(
                text,
                "| {} | {} | {} | {} | {} | {} | {} |",
                result.name,
                run.lock,
                cell(Some(run.result.ops_per_sec), 0),
                cell(bench.relative_to_futex(&run.lock), 2),
                cell(Some(run.result.acquire_p99_us), 1),
                cell(Some(run.result.acquire_max_us / 1000.0), 1),
                run.counters.as_ref().map_or("–".to_owned(), parks_cell)
            );
        }
    }
    let _ = write!(text, "\n| per configuration |");
    for result in &ordered {
        let _ = write!(text, " {} |", result.name);
    }
    text.push_str("\n|---|");
    for _ in &ordered {
        text.push_str("---:|");
    }
    text.push('\n');
    let mut row = |label: String, value: &dyn Fn(&GuestLockConfigResult) -> String| {
        let _ = write!(text, "| {label} |");
        for result in &ordered {
            let _ = write!(text, " {} |", value(result));
        }
        text.push('\n');
    };
    row(
        format!(
            "host line of vCPU {}: changes seen in {} s",
            params.freshness_cpu, params.freshness_seconds
        ),
        &|r| {
            r.freshness
                .map_or("–".to_owned(), |f| f.republish_interval.count.to_string())
        },
    );
    row(
        "republish interval p50 / p99 / max (ms, guest time)".into(),
        &|r| match r.freshness {
            Some(f) if f.republish_interval.count > 0 => {
                let s = f.republish_interval;
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    s.p50_us / 1000.0,
                    s.p99_us / 1000.0,
                    s.max_us / 1000.0
                )
            }
            _ => "–".to_owned(),
        },
    );
    row(
        format!(
            "boost probe: boosted / timed out / not counted (of {})",
            params.probe_trials
        ),
        &|r| {
            r.boost_probe.map_or("–".to_owned(), |p| {
                format!(
                    "{} / {} / {}",
                    p.boost_seen.count, p.timed_out, p.not_unboosted
                )
            })
        },
    );
    row(
        "boost seen p50 / p99 (µs after the timer deadline)".into(),
        &|r| match r.boost_probe {
            Some(p) if p.boost_seen.count > 0 => {
                format!("{:.0} / {:.0}", p.boost_seen.p50_us, p.boost_seen.p99_us)
            }
            _ => "–".to_owned(),
        },
    );
    row(
        "guest's own wake-up p50 (µs)".into(),
        &|r| match r.boost_probe {
            Some(p) if p.woke.count > 0 => format!("{:.0}", p.woke.p50_us),
            _ => "–".to_owned(),
        },
    );
    row("host stress-ng (bogo-ops/s, geo-mean)".into(), &|r| {
        cell(
            (r.host_bogo_ops_per_s > 0.0).then_some(r.host_bogo_ops_per_s),
            0,
        )
    });
    row("boosts / throttles".into(), &|r| {
        if r.daemon {
            format!("{} / {}", r.boosts, r.throttles)
        } else {
            "–".to_owned()
        }
    });
    row("vCPU threads RT (% of samples)".into(), &|r| {
        cell(r.vcpu_policy.fraction().map(|f| f * 100.0), 0)
    });
    row("daemon CPU (% of one CPU)".into(), &|r| {
        cell(r.daemon_cpu_percent, 2)
    });
    row("channel".into(), &|r| match r.channel {
        None => "–".to_owned(),
        Some(Channel::Plain) => "plain".to_owned(),
        Some(Channel::Doorbell) => "doorbell".to_owned(),
    });
    row(
        "status".into(),
        &|r| match (&r.error, r.leftover_rt_threads.is_empty()) {
            (Some(_), _) => "failed".into(),
            (None, false) => "left RT threads".into(),
            (None, true) => "ok".into(),
        },
    );
    let mut notes = String::new();
    for result in &ordered {
        let pvsched = result
            .lock_bench
            .as_ref()
            .and_then(|bench| bench.lock("pvsched"))
            .and_then(|run| run.counters);
        if result.host_lines_republished == Some(false) {
            let _ = writeln!(
                notes,
                "- {}: the host never republished its lines ({} changes in {} s){}: the pvsched \
                 lock finds them stale after {} ms and parks at once, as the futex mutex does{}.",
                result.name,
                result.freshness.map_or(0, |f| f.republish_interval.count),
                params.freshness_seconds,
                if result.daemon { "" } else { " (no daemon)" },
                params.max_age_ms,
                pvsched.map_or(String::new(), |c| format!(
                    " ({} of its {} parks for a stale line)",
                    c.parked_unknown, c.parks
                ))
            );
        }
    }
    for result in ordered.iter().filter(|r| r.error.is_some()) {
        let _ = writeln!(
            notes,
            "- {} failed: {}",
            result.name,
            first_line(result.error.as_deref().unwrap_or_default())
        );
    }
    if !notes.is_empty() {
        text.push('\n');
        text.push_str(&notes);
    }
    text
}

/// Files written by [`write_all`].
#[derive(Debug, Clone)]
pub struct GuestLockFiles {
    /// `results.json`.
    pub json: PathBuf,
    /// `results.md`.
    pub markdown: PathBuf,
    /// `guest-lock-ops.svg`.
    pub plot: PathBuf,
}

/// Writes `results.json`, `results.md` and `guest-lock-ops.svg` (acquisitions per second,
/// per configuration and lock) into `dir`.
pub fn write_all(results: &GuestLockResults, dir: &Path) -> Result<GuestLockFiles> {
    fs::create_dir_all(dir).map_err(LabError::io("create", dir))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(results)
        .map_err(|error| LabError::Run(format!("serializing results: {error}")))?;
    fs::write(&json, text + "\n").map_err(LabError::io("write", &json))?;
    let markdown_path = dir.join("results.md");
    fs::write(&markdown_path, markdown(results)).map_err(LabError::io("write", &markdown_path))?;
    let groups: Vec<(String, Vec<(String, f64)>)> = results
        .ordered()
        .iter()
        .map(|result| {
            let bars = result
                .lock_bench
                .as_ref()
                .map(|bench| {
                    bench
                        .locks
                        .iter()
                        .map(|run| (run.lock.clone(), run.result.ops_per_sec))
                        .collect()
                })
                .unwrap_or_default();
            (result.name.clone(), bars)
        })
        .collect();
    let params = &results.params;
    let title = format!(
        "lock acquisitions/s, {} threads on {} vCPUs, {}, host {}",
        params.threads,
        params.vcpus,
        results
            .accelerator
            .map_or("unknown".to_owned(), |accel| accel.to_string()),
        params.load.describe()
    );
    let plot = dir.join("guest-lock-ops.svg");
    fs::write(
        &plot,
        bar_chart_svg(&title, "acquisitions per second", &groups),
    )
    .map_err(LabError::io("write", &plot))?;
    Ok(GuestLockFiles {
        json,
        markdown: markdown_path,
        plot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The console of the guest as the lab host received it, from a quick run under TCG on
    /// the 2-CPU development machine with the lab's default load: without the daemon, and
    /// with it (plain channel).
    const CONSOLE_VANILLA: &str =
        include_str!("../tests/fixtures/console-guest-lock-tcg-vanilla.txt");
    const CONSOLE_PVSCHED: &str =
        include_str!("../tests/fixtures/console-guest-lock-tcg-pvsched.txt");

    fn params() -> GuestLockParams {
        GuestLockParams {
            quick: true,
            vcpus: 2,
            memory_mib: 256,
            threads: 4,
            lock_seconds: 5,
            locks: LOCKS.map(str::to_owned).to_vec(),
            inside: INSIDE,
            outside: OUTSIDE,
            spin_limit_us: SPIN_LIMIT_US,
            max_age_ms: DEFAULT_MAX_AGE_MS,
            freshness_cpu: 0,
            freshness_seconds: FRESHNESS_S,
            probe_trials: PROBE_TRIALS,
            probe_gap_ms: PROBE_GAP_MS,
            warmup_s: 2,
            load: LoadSpec::seed003(2),
            load_origin: "the lab's default load".into(),
            channel: Channel::Plain,
            module_params: "enable=1".into(),
            hostd_period_us: 1000,
            hostd_rt_prio: 10,
            host_cpus: 2,
            host_kernel: "6.18".into(),
            guest_kernel: "6.1.0-57-cloud-amd64".into(),
            configs: vec!["vanilla".into(), "pvsched".into()],
        }
    }

    fn check_bench(bench: &LockBench) {
        assert_eq!((bench.threads, bench.vcpus), (4, 2));
        assert_eq!(
            bench
                .locks
                .iter()
                .map(|r| r.lock.as_str())
                .collect::<Vec<_>>(),
            LOCKS
        );
        for run in &bench.locks {
            let r = run.result;
            assert!(r.ops > 0, "{run:?}");
            assert!(r.min_thread_ops <= r.max_thread_ops, "{run:?}");
            assert!(
                r.min_thread_ops * u64::from(bench.threads) <= r.ops,
                "{run:?}"
            );
            assert!(
                r.max_thread_ops * u64::from(bench.threads) >= r.ops,
                "{run:?}"
            );
            assert!(r.acquire_p50_us <= r.acquire_p99_us, "{run:?}");
            assert!(r.acquire_p99_us <= r.acquire_max_us, "{run:?}");
            // The rate is over at least the seconds asked for.
            assert!(r.ops as f64 / r.ops_per_sec >= bench.seconds, "{run:?}");
            assert_eq!(run.counters.is_some(), run.lock == "pvsched", "{run:?}");
        }
        let c = bench
            .lock("pvsched")
            .and_then(|run| run.counters)
            .expect("counters");
        assert_eq!(
            c.parks,
            c.parked_preempted + c.parked_overloaded + c.parked_unknown + c.parked_spin_limit,
            "every park has one reason: {c:?}"
        );
        assert_eq!(bench.relative_to_futex("futex"), Some(1.0));
    }

    #[test]
    fn a_recorded_guest_with_the_daemon_reports_every_step() {
        let steps = parse_steps(CONSOLE_PVSCHED);
        assert!(steps.ended);
        assert!(steps.errors.is_empty(), "{:?}", steps.errors);
        assert_eq!(
            steps.notes,
            ["spin", "futex", "pvsched"].map(|l| format!("pvsched-guest: lock-bench {l} done"))
        );
        let bench = steps.lock_bench.as_ref().expect("lock-bench");
        check_bench(bench);
        let fresh = steps.freshness.expect("freshness");
        assert_eq!(fresh.cpu, 0);
        let s = fresh.republish_interval;
        assert!(s.count > 0, "the daemon republishes the line: {s:?}");
        assert!(s.p50_us <= s.p90_us && s.p90_us <= s.p99_us && s.p99_us <= s.max_us);
        let probe = steps.boost_probe.expect("boost-probe");
        assert_eq!(
            probe.boost_seen.count + probe.timed_out + probe.not_unboosted,
            u64::from(PROBE_TRIALS),
            "every wake-up is counted once: {probe:?}"
        );
        assert!(probe.boosted_at_first_look <= probe.boost_seen.count);
        assert_eq!(probe.woke.count, probe.boost_seen.count + probe.timed_out);
        assert!(step_problems(&steps, &params(), GuestLockConfig::Pvsched).is_empty());
        // The same output from a guest of another size, or with fewer threads, is refused.
        let mut other = params();
        other.vcpus = 4;
        other.threads = 8;
        let problems = step_problems(&steps, &other, GuestLockConfig::Pvsched);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn without_the_daemon_the_host_lines_never_change_and_the_lock_only_parks_as_stale() {
        let steps = parse_steps(CONSOLE_VANILLA);
        assert!(steps.ended && steps.errors.is_empty(), "{steps:?}");
        let bench = steps.lock_bench.as_ref().expect("lock-bench");
        check_bench(bench);
        assert_eq!(
            steps.freshness.expect("freshness").republish_interval.count,
            0
        );
        // An all-zero line never says preempted or overloaded: every park is for a stale
        // line, or a spin limit while the lock had not yet seen the line age.
        let c = bench
            .lock("pvsched")
            .and_then(|run| run.counters)
            .expect("counters");
        assert_eq!((c.parked_preempted, c.parked_overloaded), (0, 0), "{c:?}");
        assert!(c.parked_unknown > c.parked_spin_limit, "{c:?}");
        assert!(steps.boost_probe.is_none());
        assert!(step_problems(&steps, &params(), GuestLockConfig::Vanilla).is_empty());
        assert_eq!(
            step_problems(&steps, &params(), GuestLockConfig::Pvsched),
            ["no boost-probe result"]
        );
    }

    #[test]
    fn step_lines_are_told_apart_from_the_rest_of_the_console() {
        assert_eq!(
            parse_line("PVSCHED-LAB GUEST-LOCK note pvsched-guest: lock-bench spin done"),
            Some(GuestLine::Note(
                "pvsched-guest: lock-bench spin done".into()
            ))
        );
        assert_eq!(
            parse_line("PVSCHED-LAB GUEST-LOCK freshness rc=0 {\"cpu\":0}"),
            Some(GuestLine::Step {
                name: "freshness".into(),
                rc: 0,
                output: "{\"cpu\":0}".into()
            })
        );
        assert_eq!(
            parse_line("PVSCHED-LAB GUEST-LOCK end"),
            Some(GuestLine::End)
        );
        assert_eq!(parse_line("PVSCHED-LAB DIAG END"), None);
        assert_eq!(parse_line("[ 3.7] pvsched_guest: bound"), None);
        let console = "PVSCHED-LAB GUEST-LOCK note Error: open /dev/pvsched: No such file\n\
                       PVSCHED-LAB GUEST-LOCK lock-bench rc=1 \n\
                       PVSCHED-LAB GUEST-LOCK freshness rc=0 {\"cpu\": 0}\n\
                       PVSCHED-LAB GUEST-LOCK spin-bench rc=0 {}\n";
        let steps = parse_steps(console);
        assert!(!steps.ended);
        assert_eq!(steps.errors.len(), 3, "{:?}", steps.errors);
        assert!(
            steps.errors[0].contains("rc=1: Error: open /dev/pvsched"),
            "{:?}",
            steps.errors
        );
        assert!(steps.errors[1].starts_with("freshness: unreadable output"));
        assert!(steps.errors[2].contains("unknown step"));
        let problems = step_problems(&steps, &params(), GuestLockConfig::Vanilla);
        assert!(
            problems.contains(&"no lock-bench result".to_owned()),
            "{problems:?}"
        );
        assert!(problems.contains(&"the guest's steps did not end".to_owned()));
    }

    #[test]
    fn a_step_reports_its_messages_then_its_output_and_exit_code() {
        // The shell plumbing of one step, run by the host's sh with a stand-in command.
        let name = format!("guest-lock-selftest-{}", std::process::id());
        let script = step(
            &name,
            "sh -c 'echo working >&2; echo \"{\\\"x\\\": 1}\"; exit 3'",
        );
        let output = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("run sh");
        let _ = fs::remove_file(format!("/tmp/{name}.json"));
        let _ = fs::remove_file(format!("/tmp/{name}.rc"));
        let text = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<GuestLine> = text.lines().filter_map(parse_line).collect();
        assert_eq!(
            lines,
            [
                GuestLine::Note("working".into()),
                GuestLine::Step {
                    name,
                    rc: 3,
                    output: "{\"x\": 1}".into()
                }
            ],
            "{text}"
        );
    }

    #[test]
    fn the_guest_runs_the_probe_only_with_the_daemon() {
        let p = params();
        let vanilla = guest_commands(&p, GuestLockConfig::Vanilla).join("\n");
        let pvsched = guest_commands(&p, GuestLockConfig::Pvsched).join("\n");
        let bench = "pvsched-guest lock-bench --threads 4 --seconds 5 --inside 200 --outside 400 \
                     --locks spin,futex,pvsched --spin-limit-us 50 --max-age-ms 100";
        for script in [&vanilla, &pvsched] {
            assert!(script.contains(bench), "{script}");
            assert!(script.contains("pvsched-guest freshness --cpu 0 --seconds 3"));
            let end = script.find("GUEST-LOCK end").expect("end line");
            assert!(script.find("freshness rc=").expect("freshness") < end);
        }
        assert!(!vanilla.contains("boost-probe"), "{vanilla}");
        assert!(pvsched.contains("pvsched-guest boost-probe --cpu 0 --trials 20 --gap-ms 300"));
        assert_eq!(p.guest_seconds(GuestLockConfig::Vanilla), 18);
        assert_eq!(p.guest_seconds(GuestLockConfig::Pvsched), 24);
    }

    fn config_result(name: &str, console: &str) -> GuestLockConfigResult {
        let steps = parse_steps(console);
        GuestLockConfigResult {
            name: name.into(),
            daemon: name != "vanilla",
            channel: GuestLockConfig::parse(name).and_then(|c| c.channel(Channel::Plain)),
            host_lines_republished: steps.freshness.map(|f| f.republish_interval.count > 0),
            lock_bench: steps.lock_bench,
            freshness: steps.freshness,
            boost_probe: steps.boost_probe,
            ..GuestLockConfigResult::default()
        }
    }

    fn results() -> GuestLockResults {
        let configs = [
            config_result("pvsched", CONSOLE_PVSCHED),
            config_result("vanilla", CONSOLE_VANILLA),
        ];
        GuestLockResults {
            experiment: EXPERIMENT.into(),
            version: RESULTS_VERSION,
            accelerator: Some(Accelerator::Tcg),
            kvm_fallback: None,
            params: params(),
            configs: configs.into_iter().map(|c| (c.name.clone(), c)).collect(),
            elapsed_s: 79.0,
        }
    }

    #[test]
    fn the_table_has_a_row_per_configuration_and_lock() {
        let results = results();
        let text = markdown(&results);
        let vanilla = text.find("| vanilla | spin |").expect("vanilla rows");
        let pvsched = text.find("| pvsched | spin |").expect("pvsched rows");
        assert!(vanilla < pvsched, "report order, not name order:\n{text}");
        for row in [
            "| vanilla | futex | 71693 | 1.00 | 3.9 | 103.6 | – |",
            "| vanilla | pvsched | 81978 | 1.14 | 3.5 | 70.4 | parks 617: preempted 0 / overloaded 0 / stale 612 / spin limit 5 |",
            "| pvsched | spin | 47249 | 0.44 | 3.4 | 210.3 | – |",
            "| pvsched | pvsched | 85111 | 0.78 | 2.9 | 129.6 | parks 492: preempted 270 / overloaded 222 / stale 0 / spin limit 0 |",
            "| host line of vCPU 0: changes seen in 3 s | 0 | 190 |",
            "| republish interval p50 / p99 / max (ms, guest time) | – | 5.5 / 100.4 / 101.5 |",
            "| boost probe: boosted / timed out / not counted (of 20) | – | 9 / 0 / 11 |",
            "| channel | – | plain |",
        ] {
            assert!(text.contains(row), "{row}\n{text}");
        }
        assert!(
            text.contains(
                "- vanilla: the host never republished its lines (0 changes in 3 s) (no daemon)"
            ),
            "{text}"
        );
        assert!(
            text.contains("(612 of its 617 parks for a stale line)"),
            "{text}"
        );
        assert!(!text.contains("- pvsched:"), "{text}");
        assert!(text.contains("`stress-ng --cpu 2 --iomix 1 --vm 1 --vm-bytes 128M --fork 1` (the lab's default load)"));

        let dir = std::env::temp_dir().join(format!("pvsched-guest-lock-{}", std::process::id()));
        let files = write_all(&results, &dir).expect("write");
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&files.json).expect("json")).expect("parse");
        assert_eq!(json["experiment"], "guest-lock");
        assert_eq!(json["accelerator"], "tcg");
        assert_eq!(json["params"]["load"]["cpu"], 2);
        let locks = &json["configs"]["pvsched"]["lock_bench"]["locks"];
        assert_eq!(locks[2]["counters"]["parked_preempted"], 270);
        assert!(locks[0].get("counters").is_none(), "{locks}");
        let back: GuestLockResults = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, results);
        let svg = fs::read_to_string(&files.plot).expect("plot");
        assert_eq!(
            svg.matches("<title>").count(),
            6,
            "two configurations × three locks"
        );
        assert!(svg.contains(">85111<"), "{svg}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn configurations_and_parameters() {
        assert_eq!(
            GuestLockConfig::ALL.map(GuestLockConfig::name),
            ["vanilla", "pvsched", "pvsched-doorbell"]
        );
        for config in GuestLockConfig::ALL {
            assert_eq!(GuestLockConfig::parse(config.name()), Some(config));
        }
        assert_eq!(GuestLockConfig::parse("static-rt"), None);
        assert_eq!(GuestLockConfig::Vanilla.channel(Channel::Doorbell), None);
        assert_eq!(
            GuestLockConfig::Pvsched.channel(Channel::Doorbell),
            Some(Channel::Doorbell)
        );
        assert_eq!(
            GuestLockConfig::PvschedDoorbell.channel(Channel::Plain),
            Some(Channel::Doorbell)
        );
        let mut p = params();
        assert!(validate(&p).is_ok());
        p.freshness_cpu = 2;
        assert!(validate(&p).is_err(), "vCPU 2 of 2");
        p = params();
        p.locks.push("ticket".into());
        assert!(validate(&p).is_err());
        p = params();
        p.load.cpu_load = Some(101);
        assert!(validate(&p).is_err());
    }
}
