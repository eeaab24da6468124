//! `pvsched lab --experiment isolation`: what isolating a CPU does for a real-time VM.
//!
//! One guest with one vCPU runs the latency experiment's guest workload (cyclictest at
//! FIFO in the guest); its vCPU thread is at `SCHED_FIFO` on the host in every
//! configuration, so the configurations differ only in load and placement:
//!
//! - `idle`: no host load, no isolation (the floor on this host);
//! - `shared`: the host load on every CPU, no isolation;
//! - `isolated`: the last online CPU isolated by the real isolation code
//!   ([`pvsched_host::isolate`]: plan, apply, undo), the vCPU thread alone on it at FIFO,
//!   QEMU's main thread and every other movable task (the host load too) on the
//!   housekeeping CPUs;
//! - `isolated-main`: the same with QEMU's main thread also on the isolated CPU (under TCG
//!   the main loop fires the guest's timers, so where it runs matters).
//!
//! One configuration run: boot the guest on a quiet host and wait for READY; apply the
//! scheduling (FIFO by hand, or the isolation); start the host load; warm up; send go and
//! sample where the vCPU and main threads run while cyclictest measures; stop the load and
//! collect the guest's histogram; undo the scheduling. An isolation is undone by
//! [`Isolation::undo`] whatever happened (also on error and on a stop request), and as a
//! last resort by its `Drop`; every value isolation can touch (the cpuset root's files, its
//! children, IRQ affinities, the workqueue mask, every task's cpuset and affinity) is read
//! before and after, and a difference fails the configuration and stops the run.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use pvsched_host::isolate::{self, Change, Hierarchy, Host, Request, VmThreads};
use pvsched_host::HostFs;
use serde::{Deserialize, Serialize};

use crate::configrun::{self, ConfigDone, ConfigRecord, ExperimentResults, Progress};
use crate::cyclictest::{histogram_buckets, parse_histogram};
use crate::error::{LabError, Result};
use crate::experiment::figures;
use crate::hostload::{HostLoad, LoadSpec, Throughput};
use crate::hostsched::{RtThread, StaticRt, ThreadPolicy};
use crate::initramfs::{Initramfs, InitramfsSpec};
use crate::qemu::{AccelChoice, Accelerator, Guest, GuestConfig, GuestOutput};
use crate::report::{cdf_points, cdf_svg};
use crate::results::{ExitCheck, LatencyFigures, PolicyShare};
use crate::workload::{CyclictestParams, InitControl, RtPolicy, Workload, MARKER_READY};
use crate::{LabAssets, RESULT_SLACK};

/// The experiment's name in `results.json`.
pub const EXPERIMENT: &str = "isolation";
/// Version of this experiment's `results.json`.
pub const RESULTS_VERSION: u32 = 1;
/// Measured seconds per configuration with `--quick`.
pub const QUICK_DURATION_S: u32 = 15;
/// Measured seconds per configuration by default.
pub const DEFAULT_DURATION_S: u32 = 60;
/// Where the lab's isolation records what it changed while it is applied. A run killed
/// with SIGKILL leaves it; `pvsched isolate --undo --state` this file restores the host,
/// and the next run refuses to isolate until then.
pub const STATE_FILE: &str = "/run/pvsched/lab-isolation.json";
/// Guest cyclictest histogram size (µs), as in the latency experiment.
const GUEST_HISTOGRAM_US: u32 = 100_000;
/// How long init may take from boot to READY.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the vCPU and main threads are sampled while the guest measures.
const SAMPLE_PERIOD: Duration = Duration::from_millis(50);
/// How often a progress line is printed while the guest measures.
const PROGRESS_PERIOD: Duration = Duration::from_secs(10);
/// Undo attempts before the host is declared not restored. A cpuset cannot be removed
/// while a task is in it, and a task can land there as the undo empties it (a fork in a
/// moving process, a process still exiting); every step of the undo is idempotent.
const UNDO_ATTEMPTS: u32 = 5;
/// Pause between undo attempts.
const UNDO_RETRY_DELAY: Duration = Duration::from_millis(500);

/// The configurations of the isolation experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationConfig {
    /// No host load, no isolation.
    Idle,
    /// The host load on every CPU, no isolation.
    Shared,
    /// The vCPU thread alone on the isolated CPU; QEMU's main thread and the load on
    /// housekeeping.
    Isolated,
    /// As `Isolated`, with QEMU's main thread on the isolated CPU too.
    IsolatedMain,
}

impl IsolationConfig {
    /// Every configuration, in report order (also the default set).
    pub const ALL: [IsolationConfig; 4] = [
        IsolationConfig::Idle,
        IsolationConfig::Shared,
        IsolationConfig::Isolated,
        IsolationConfig::IsolatedMain,
    ];

    /// The name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            IsolationConfig::Idle => "idle",
            IsolationConfig::Shared => "shared",
            IsolationConfig::Isolated => "isolated",
            IsolationConfig::IsolatedMain => "isolated-main",
        }
    }

    /// The configuration called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|config| config.name() == name)
    }

    /// Whether a CPU is isolated.
    pub fn isolates(self) -> bool {
        matches!(
            self,
            IsolationConfig::Isolated | IsolationConfig::IsolatedMain
        )
    }

    /// Whether QEMU's main thread is placed on the isolated CPU.
    pub fn main_on_isolated(self) -> bool {
        self == IsolationConfig::IsolatedMain
    }

    /// Whether the host load runs.
    pub fn loaded(self) -> bool {
        self != IsolationConfig::Idle
    }
}

/// Parameters of an isolation run (recorded in `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IsolationParams {
    /// `--quick`.
    pub quick: bool,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// cyclictest interval (µs).
    pub interval_us: u32,
    /// Measured seconds per configuration.
    pub duration_s: u32,
    /// Seconds of host load before measuring.
    pub warmup_s: u32,
    /// FIFO priority of cyclictest in the guest.
    pub guest_rt_prio: u8,
    /// FIFO priority of the vCPU thread on the host, in every configuration.
    pub vcpu_rt_prio: u8,
    /// The host load of every configuration but `idle`.
    pub load: LoadSpec,
    /// Where the load spec came from.
    pub load_origin: String,
    /// The isolated CPUs (the last online CPU).
    pub isolated_cpus: Vec<u32>,
    /// The housekeeping CPUs (every other online CPU).
    pub housekeeping_cpus: Vec<u32>,
    /// Host CPUs.
    pub host_cpus: u32,
    /// Host kernel release.
    pub host_kernel: String,
    /// Guest kernel release.
    pub guest_kernel: String,
    /// The state file of the isolation while it is applied.
    pub state_file: PathBuf,
    /// Configurations asked for, in order.
    pub configs: Vec<String>,
}

/// Checks what the command line cannot: priorities, durations, the CPU split.
pub fn validate(params: &IsolationParams) -> Result<()> {
    let invalid = |what: String| Err(LabError::InvalidConfig(what));
    if params.duration_s == 0 || params.duration_s > 3600 {
        return invalid(format!(
            "--duration-s {} is out of range 1..=3600",
            params.duration_s
        ));
    }
    if params.interval_us < 100 || params.interval_us > 1_000_000 {
        return invalid(format!(
            "--interval-us {} is out of range 100..=1000000",
            params.interval_us
        ));
    }
    for (flag, prio) in [
        ("--guest-rt-prio", params.guest_rt_prio),
        ("--static-rt-prio", params.vcpu_rt_prio),
    ] {
        if !(1..=99).contains(&prio) {
            return invalid(format!("{flag} {prio} is out of range 1..=99"));
        }
    }
    if params.isolated_cpus.is_empty() || params.housekeeping_cpus.is_empty() {
        return invalid(format!(
            "the isolation experiment needs two online CPUs, one isolated and one for housekeeping (isolated {:?}, housekeeping {:?})",
            params.isolated_cpus, params.housekeeping_cpus
        ));
    }
    if params
        .isolated_cpus
        .iter()
        .any(|cpu| params.housekeeping_cpus.contains(cpu))
    {
        return invalid("a CPU is both isolated and housekeeping".into());
    }
    if params.configs.is_empty() {
        return invalid("no isolation configuration asked for".into());
    }
    Ok(())
}

/// The last online CPU isolated, the others housekeeping, from `online` (a kernel CPU
/// list, `/sys/devices/system/cpu/online`). Fewer than two CPUs: nothing to isolate.
pub fn split_cpus(online: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut cpus = pvsched_host::procfs::parse_cpu_list(online.trim()).ok_or_else(|| {
        LabError::Run(format!("online CPUs {online:?} are not a kernel CPU list"))
    })?;
    cpus.sort_unstable();
    cpus.dedup();
    match cpus.split_last() {
        Some((&last, rest)) if !rest.is_empty() => Ok((vec![last], rest.to_vec())),
        _ => Ok((Vec::new(), cpus)),
    }
}

/// Where a host thread was seen while the guest measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadPlacement {
    /// Thread id.
    pub tid: u32,
    /// Samples by the CPU the thread last ran on (`/proc/.../stat` field 39).
    pub ran_on: BTreeMap<u32, u64>,
    /// How often it was found real-time.
    pub policy: PolicyShare,
    /// Its affinity (`Cpus_allowed_list`) half-way through the window.
    pub affinity: Option<String>,
}

impl ThreadPlacement {
    /// The CPUs it was seen on.
    pub fn cpus(&self) -> Vec<u32> {
        self.ran_on.keys().copied().collect()
    }

    /// Whether it was seen, and only on `cpus`.
    pub fn only_on(&self, cpus: &[u32]) -> bool {
        !self.ran_on.is_empty() && self.ran_on.keys().all(|cpu| cpus.contains(cpu))
    }
}

/// How the isolation was undone and whether the host came back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRestore {
    /// Changes the isolation applied.
    pub applied_changes: usize,
    /// What it could not move (per-CPU kernel threads, managed IRQs).
    pub unmovable: usize,
    /// Values the undo restored.
    pub restored_values: usize,
    /// Recorded threads that had exited.
    pub exited: usize,
    /// Threads started during the isolation, moved back out of its cpusets.
    pub adopted: usize,
    /// The undo's error, when it failed (after every attempt).
    pub undo_error: Option<String>,
    /// Undo attempts made (more than one: the earlier ones left a cpuset busy).
    #[serde(default)]
    pub undo_attempts: u32,
    /// Files compared before and after.
    pub files_compared: usize,
    /// Tasks (alive before and after) compared.
    pub tasks_compared: usize,
    /// Every value that differs after the undo (must be empty).
    pub differences: Vec<String>,
}

impl HostRestore {
    /// Undone without error, with every value as before.
    pub fn restored(&self) -> bool {
        self.undo_error.is_none() && self.differences.is_empty() && self.files_compared > 0
    }
}

/// Everything measured for one configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IsolationConfigResult {
    /// Configuration name.
    pub name: String,
    /// A CPU was isolated.
    pub isolated: bool,
    /// QEMU's main thread was placed on the isolated CPU.
    pub main_on_isolated: bool,
    /// The host load ran.
    pub loaded: bool,
    /// QEMU's `-name`.
    pub guest: String,
    /// QEMU process id (its main thread).
    pub qemu_pid: u32,
    /// vCPU thread ids.
    pub vcpu_tids: Vec<u32>,
    /// Boot time (ms).
    pub boot_ms: u64,
    /// cyclictest in the guest.
    pub latency: LatencyFigures,
    /// Its histogram `(µs, samples)`, for the plot.
    pub histogram: Vec<(u64, u64)>,
    /// Where the vCPU thread ran.
    pub vcpu: ThreadPlacement,
    /// Where QEMU's main thread ran.
    pub main_thread: ThreadPlacement,
    /// The threads of the isolated cpuset half-way through the window (`None` without
    /// isolation).
    pub isolated_cpuset_tasks: Option<Vec<u32>>,
    /// The isolation's undo and the host's values after it (`None` without isolation).
    pub host_restore: Option<HostRestore>,
    /// Host throughput: geometric mean over stressors of bogo-ops per second.
    pub host_bogo_ops_per_s: f64,
    /// Every thread of QEMU checked just before it was stopped (`None`: not checked).
    pub exit_check: Option<ExitCheck>,
    /// QEMU threads still real-time after the undo (must be empty).
    pub leftover_rt_threads: Vec<RtThread>,
    /// Wall-clock time of the configuration run (s).
    pub elapsed_s: f64,
    /// Why the run failed, when it did.
    pub error: Option<String>,
}

impl IsolationConfigResult {
    /// The threads the isolated cpuset should hold: the vCPU threads, and QEMU's main
    /// thread when it was placed there.
    pub fn expected_isolated_tasks(&self) -> Vec<u32> {
        let mut tids = self.vcpu_tids.clone();
        if self.main_on_isolated {
            tids.push(self.qemu_pid);
        }
        tids.sort_unstable();
        tids
    }
}

/// `results.json` of the isolation experiment.
pub type IsolationResults = ExperimentResults<IsolationParams, IsolationConfigResult>;

impl IsolationResults {
    /// Configurations in report order.
    pub fn ordered(&self) -> Vec<&IsolationConfigResult> {
        self.ordered_by(&IsolationConfig::ALL.map(IsolationConfig::name))
    }
}

/// Everything an isolation run needs besides the assets.
#[derive(Debug, Clone)]
pub struct IsolationSpec {
    /// Run parameters.
    pub params: IsolationParams,
    /// Configurations, in order.
    pub configs: Vec<IsolationConfig>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Results directory (logs go here too).
    pub out_dir: PathBuf,
    /// Scratch directory.
    pub run_dir: PathBuf,
}

/// Every value isolation can change, keyed by file, and every task's cpuset and affinity
/// keyed by (tid, start time), so a reused tid is not compared with another thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSnapshot {
    /// File (or `<cpuset root> children`) to value.
    pub files: BTreeMap<String, String>,
    /// (tid, start time) to (cpuset, `Cpus_allowed_list`).
    pub tasks: BTreeMap<(i32, u64), (String, String)>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// The value of `key` in a `/proc/.../status` text.
fn status_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .map(|value| value.trim().to_owned())
}

/// A thread's `Cpus_allowed_list`.
fn thread_affinity(proc_root: &Path, pid: u32, tid: u32) -> Option<String> {
    let status = fs::read_to_string(proc_root.join(format!("{pid}/task/{tid}/status"))).ok()?;
    status_field(&status, "Cpus_allowed_list:")
}

impl HostSnapshot {
    /// Reads the cpuset root `cpuset_root` (cgroup v1), IRQ affinities, the default IRQ
    /// affinity and the workqueue mask under `host`'s roots, and every task. A file that
    /// cannot be read is recorded as such, so a file that appears or vanishes differs.
    pub fn read(host: &HostFs, cpuset_root: &Path) -> HostSnapshot {
        let mut files = BTreeMap::new();
        let mut record = |path: PathBuf| {
            let value = read_trimmed(&path).unwrap_or_else(|| "<unreadable>".to_owned());
            files.insert(path.display().to_string(), value);
        };
        for name in [
            "cpuset.cpus",
            "cpuset.mems",
            "cpuset.cpu_exclusive",
            "cpuset.mem_exclusive",
            "cpuset.sched_load_balance",
            "cpuset.sched_relax_domain_level",
        ] {
            record(cpuset_root.join(name));
        }
        let irq_root = host.proc_root.join("irq");
        let mut irqs: Vec<PathBuf> = fs::read_dir(&irq_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().is_dir())
            .map(|entry| entry.path().join("smp_affinity_list"))
            .filter(|path| path.exists())
            .collect();
        irqs.sort();
        for path in irqs {
            record(path);
        }
        record(irq_root.join("default_smp_affinity"));
        record(host.sys_root.join("devices/virtual/workqueue/cpumask"));
        let mut children: Vec<String> = fs::read_dir(cpuset_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().is_dir())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        children.sort();
        files.insert(
            format!("{} children", cpuset_root.display()),
            children.join(","),
        );

        let mut tasks = BTreeMap::new();
        for pid in host.pids().unwrap_or_default() {
            let task_dir = host.proc_root.join(format!("{pid}/task"));
            for entry in fs::read_dir(&task_dir).into_iter().flatten().flatten() {
                let Some(tid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i32>().ok())
                else {
                    continue;
                };
                let (Ok(stat), Some(cpuset), Some(status)) = (
                    host.task_stat(pid, tid),
                    read_trimmed(&entry.path().join("cpuset")),
                    fs::read_to_string(entry.path().join("status")).ok(),
                ) else {
                    continue; // exited meanwhile
                };
                if let Some(affinity) = status_field(&status, "Cpus_allowed_list:") {
                    tasks.insert((tid, stat.starttime), (cpuset, affinity));
                }
            }
        }
        HostSnapshot { files, tasks }
    }

    /// Every value of `self` (before) that `after` does not have: files that differ, and
    /// tasks alive in both whose cpuset or affinity differs. Returns the differences and
    /// the number of tasks compared.
    pub fn differences(&self, after: &HostSnapshot) -> (Vec<String>, usize) {
        let mut differences = Vec::new();
        let names: BTreeSet<&String> = self.files.keys().chain(after.files.keys()).collect();
        for name in names {
            let (old, new) = (self.files.get(name), after.files.get(name));
            if old != new {
                differences.push(format!(
                    "{name}: {} before, {} after",
                    old.map_or("absent", String::as_str),
                    new.map_or("absent", String::as_str)
                ));
            }
        }
        let mut compared = 0;
        for (key, old) in &self.tasks {
            let Some(new) = after.tasks.get(key) else {
                continue; // exited: nothing to restore
            };
            compared += 1;
            if old != new {
                differences.push(format!(
                    "task {}: cpuset {} affinity {} before, cpuset {} affinity {} after",
                    key.0, old.0, old.1, new.0, new.1
                ));
            }
        }
        (differences, compared)
    }
}

/// An applied isolation. [`Isolation::undo`] restores the host and compares every value
/// with what it was; dropping it without that undoes it too (errors and panics).
pub struct Isolation {
    state_file: PathBuf,
    cpuset_root: PathBuf,
    isolated_dir: PathBuf,
    before: HostSnapshot,
    applied_changes: usize,
    unmovable: usize,
    undone: bool,
}

/// Puts QEMU's main thread `pid` on `cpu` in `plan`: its task move goes to the isolated
/// cpuset instead of housekeeping, and it is pinned to `cpu`; the undo takes it back with
/// the rest.
pub fn place_main_thread(
    plan: &mut isolate::Plan,
    pid: i32,
    isolated_dir: &Path,
    cpu: u32,
) -> Result<()> {
    let moved = plan.changes.iter_mut().find_map(|change| match change {
        Change::MoveTask {
            tid,
            starttime,
            to,
            old_affinity,
            ..
        } if *tid == pid => {
            *to = isolated_dir.to_owned();
            Some((*starttime, old_affinity.clone()))
        }
        _ => None,
    });
    let (starttime, old) = moved.ok_or_else(|| {
        LabError::Run(format!(
            "QEMU's main thread {pid} is not among the tasks the isolation moves (not in the root cpuset?)"
        ))
    })?;
    plan.changes.push(Change::Affinity {
        tid: pid,
        starttime,
        old,
        new: vec![cpu],
    });
    Ok(())
}

impl Isolation {
    /// Isolates `params.isolated_cpus` with `vm`'s vCPU threads on them at
    /// `params.vcpu_rt_prio` (and its main thread with `main_too`): reads the host, plans,
    /// applies with the state file [`IsolationParams::state_file`].
    pub fn apply(
        params: &IsolationParams,
        vm: VmThreads,
        main_too: bool,
        say: &dyn Fn(String),
    ) -> Result<Isolation> {
        let host_fs = HostFs::default();
        let host = Host::real(&host_fs);
        let failed = |what: &str, error: isolate::IsolateError| {
            LabError::Run(format!("isolation: {what}: {error}"))
        };
        if params.state_file.symlink_metadata().is_ok() {
            return Err(LabError::Run(format!(
                "isolation: {} exists (an isolation not undone): run `pvsched isolate --undo --state {}` first",
                params.state_file.display(),
                params.state_file.display()
            )));
        }
        let pid = vm.pid;
        let mut plan = isolate::plan(
            &host,
            &Request {
                isolated: params.isolated_cpus.clone(),
                vm: Some(vm),
                rt_priority: params.vcpu_rt_prio,
            },
        )
        .map_err(|error| failed("plan", error))?;
        let cpuset_root = match &plan.hierarchy {
            Hierarchy::V1(root) => root.clone(),
            Hierarchy::V2(root) => {
                return Err(LabError::Run(format!(
                    "isolation: {} is a cgroup v2 hierarchy; the experiment places the VM's threads, which needs cgroup v1 cpuset",
                    root.display()
                )))
            }
        };
        let isolated_dir = cpuset_root.join(isolate::ISOLATED_CPUSET);
        if main_too {
            place_main_thread(&mut plan, pid, &isolated_dir, params.isolated_cpus[0])?;
        }
        if let Some(dir) = params.state_file.parent() {
            fs::create_dir_all(dir).map_err(LabError::io("create", dir))?;
        }
        let before = HostSnapshot::read(&host_fs, &cpuset_root);
        let applied =
            isolate::apply(&host, &plan, &params.state_file).map_err(|e| failed("apply", e))?;
        say(format!(
            "isolated CPU {} ({} changes, {} not movable); housekeeping CPUs {}",
            isolate::format_cpu_list(&params.isolated_cpus),
            applied.changes.len(),
            applied.unmovable.len(),
            isolate::format_cpu_list(&params.housekeeping_cpus)
        ));
        Ok(Isolation {
            state_file: params.state_file.clone(),
            cpuset_root,
            isolated_dir,
            before,
            applied_changes: applied.changes.len(),
            unmovable: applied.unmovable.len(),
            undone: false,
        })
    }

    /// The threads in the isolated cpuset now.
    pub fn isolated_tasks(&self) -> Option<Vec<u32>> {
        let text = fs::read_to_string(self.isolated_dir.join("tasks")).ok()?;
        let mut tids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        tids.sort_unstable();
        Some(tids)
    }

    /// Undoes the isolation and compares every value with what it was before.
    pub fn undo(mut self) -> HostRestore {
        self.undone = true;
        let host_fs = HostFs::default();
        let mut restore = HostRestore {
            applied_changes: self.applied_changes,
            unmovable: self.unmovable,
            ..HostRestore::default()
        };
        let (undone, attempts) = undo_with_retries(&host_fs, &self.state_file);
        restore.undo_attempts = attempts;
        match undone {
            Ok(report) => {
                restore.restored_values = report.restored;
                restore.exited = report.exited;
                restore.adopted = report.adopted;
            }
            Err(error) => restore.undo_error = Some(error.to_string()),
        }
        let after = HostSnapshot::read(&host_fs, &self.cpuset_root);
        let (differences, tasks_compared) = self.before.differences(&after);
        restore.files_compared = self.before.files.len();
        restore.tasks_compared = tasks_compared;
        restore.differences = differences;
        restore
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        if self.undone || self.state_file.symlink_metadata().is_err() {
            return;
        }
        let host_fs = HostFs::default();
        match undo_with_retries(&host_fs, &self.state_file).0 {
            Ok(report) => eprintln!(
                "pvsched lab: isolation undone on the way out ({} values restored)",
                report.restored
            ),
            Err(error) => eprintln!(
                "pvsched lab: ISOLATION NOT UNDONE: {error}; run `pvsched isolate --undo --state {}`",
                self.state_file.display()
            ),
        }
    }
}

/// Undoes the isolation recorded in `state_file`, again after [`UNDO_RETRY_DELAY`] while
/// it fails and its state file is kept, at most [`UNDO_ATTEMPTS`] times; returns the last
/// outcome and the attempts made.
fn undo_with_retries(
    host_fs: &HostFs,
    state_file: &Path,
) -> (
    std::result::Result<isolate::UndoReport, isolate::IsolateError>,
    u32,
) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let outcome = isolate::undo(&Host::real(host_fs), state_file);
        if outcome.is_ok() || attempts >= UNDO_ATTEMPTS || state_file.symlink_metadata().is_err() {
            return (outcome, attempts);
        }
        thread::sleep(UNDO_RETRY_DELAY);
    }
}

/// Runs every configuration of `spec` and returns the results (also when some
/// configurations failed: their `error` says why). A host not restored after an isolation
/// fails its configuration and no further configuration runs.
pub fn run_isolation(assets: &LabAssets, spec: &IsolationSpec) -> Result<IsolationResults> {
    let params = &spec.params;
    validate(params)?;
    let progress = Progress::start();
    fs::create_dir_all(&spec.run_dir).map_err(LabError::io("create", &spec.run_dir))?;
    fs::create_dir_all(&spec.out_dir).map_err(LabError::io("create", &spec.out_dir))?;
    progress.line(format_args!(
        "isolation: one guest of 1 vCPU, cyclictest every {} µs for {} s; vCPU thread FIFO {}; isolated CPU {}, housekeeping {}; host load {} ({})",
        params.interval_us,
        params.duration_s,
        params.vcpu_rt_prio,
        isolate::format_cpu_list(&params.isolated_cpus),
        isolate::format_cpu_list(&params.housekeeping_cpus),
        params.load.describe(),
        params.load_origin
    ));
    let workload = Workload::Cyclictest(CyclictestParams {
        interval_us: params.interval_us,
        duration_s: params.duration_s,
        priority: params.guest_rt_prio,
        policy: RtPolicy::Fifo,
        histogram_max_us: GUEST_HISTOGRAM_US,
    });
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.cyclictest.clone(), assets.chrt.clone()],
            module: None,
            module_params: String::new(),
            kernel_modules: Vec::new(),
            files: Vec::new(),
            workload,
            diagnostics: Vec::new(),
            control: InitControl {
                wait_for_go: true,
                hold_after_done: true,
            },
        },
        &spec.run_dir.join("initramfs-isolation.cpio"),
    )?;
    let mut not_restored: Option<String> = None;
    let sequence = configrun::run_sequence(
        &progress,
        &spec.configs,
        |config| config.name().to_owned(),
        |config, label| {
            let mut result = IsolationConfigResult {
                name: config.name().to_owned(),
                isolated: config.isolates(),
                main_on_isolated: config.main_on_isolated(),
                loaded: config.loaded(),
                ..IsolationConfigResult::default()
            };
            if let Some(earlier) = &not_restored {
                return ConfigDone {
                    result,
                    outcome: Err(LabError::Run(format!(
                        "not run: the host was not restored after {earlier}"
                    ))),
                    accelerator: None,
                    kvm_fallback: None,
                };
            }
            let mut run = ConfigRun {
                assets,
                spec,
                config,
                progress: &progress,
                label,
                initramfs: &initramfs,
                accelerator: None,
                kvm_fallback: None,
            };
            let outcome = run.run(&mut result);
            if result.host_restore.as_ref().is_some_and(|r| !r.restored()) {
                not_restored = Some(config.name().to_owned());
            }
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

impl ConfigRecord for IsolationConfigResult {
    fn error_and_elapsed(&mut self) -> (&mut Option<String>, &mut f64) {
        (&mut self.error, &mut self.elapsed_s)
    }

    fn summary(&self) -> String {
        let mut text = format!(
            "guest avg {:.1} us, p99 {} us, max {} us ({} samples); vCPU thread on CPUs {:?}, main thread on CPUs {:?}",
            self.latency.avg_us,
            self.latency.p99_us,
            self.latency.max_us,
            self.latency.samples,
            self.vcpu.cpus(),
            self.main_thread.cpus()
        );
        if let Some(restore) = &self.host_restore {
            let _ = write!(
                text,
                "; host {}",
                if restore.restored() {
                    "restored"
                } else {
                    "NOT RESTORED"
                }
            );
        }
        text
    }
}

/// One configuration run (see the module documentation).
struct ConfigRun<'a> {
    assets: &'a LabAssets,
    spec: &'a IsolationSpec,
    config: IsolationConfig,
    progress: &'a Progress,
    label: &'a str,
    initramfs: &'a Initramfs,
    accelerator: Option<Accelerator>,
    kvm_fallback: Option<String>,
}

impl ConfigRun<'_> {
    fn say(&self, message: impl std::fmt::Display) {
        self.progress
            .line(format_args!("{}: {message}", self.label));
    }

    /// Runs the configuration; whatever happened, the isolation is undone and the host
    /// compared with what it was, then QEMU is checked for real-time threads and stopped.
    fn run(&mut self, result: &mut IsolationConfigResult) -> Result<()> {
        let mut guest = None;
        let mut isolation = None;
        let mut outcome = self.run_guest(result, &mut guest, &mut isolation);
        // A QEMU that died (a stop request kills it) stays a zombie until reaped, and its
        // main thread, in the housekeeping cpuset, keeps that cpuset from being removed.
        if let Some(guest) = guest.as_mut() {
            if !guest.is_running() {
                self.say("QEMU has exited (reaped before the undo)");
            }
        }
        if let Some(applied) = isolation.take() {
            self.say("undoing the isolation");
            let restore = applied.undo();
            if restore.restored() {
                self.say(format_args!(
                    "isolation undone{}: {} values restored ({} threads had exited, {} adopted); {} files and {} tasks as before",
                    if restore.undo_attempts > 1 {
                        format!(" at attempt {}", restore.undo_attempts)
                    } else {
                        String::new()
                    },
                    restore.restored_values,
                    restore.exited,
                    restore.adopted,
                    restore.files_compared,
                    restore.tasks_compared
                ));
            } else {
                if let Some(error) = &restore.undo_error {
                    self.say(format_args!("HOST NOT RESTORED: the undo failed: {error}"));
                }
                for difference in &restore.differences {
                    self.say(format_args!("HOST NOT RESTORED: {difference}"));
                }
                let why = format!(
                    "the host was not restored after the isolation ({} values differ{}); state file {}",
                    restore.differences.len(),
                    restore
                        .undo_error
                        .as_deref()
                        .map_or(String::new(), |e| format!(", undo failed: {e}")),
                    self.spec.params.state_file.display()
                );
                outcome = match outcome {
                    Ok(()) => Err(LabError::Run(why)),
                    Err(error) => Err(LabError::Run(format!("{error}; {why}"))),
                };
            }
            result.host_restore = Some(restore);
        }
        if let Some(guest) = guest.as_mut() {
            result.exit_check = configrun::exit_check(guest, "guest", &|m| self.say(m));
            result.leftover_rt_threads = configrun::leftover(result.exit_check.as_ref()).collect();
        }
        drop(guest);
        outcome
    }

    /// Boots the guest, applies the scheduling, loads the host, measures, collects and
    /// returns the vCPU thread to SCHED_OTHER; an isolation is left in `isolation` for
    /// `run` to undo.
    fn run_guest(
        &mut self,
        result: &mut IsolationConfigResult,
        slot: &mut Option<Guest>,
        isolation: &mut Option<Isolation>,
    ) -> Result<()> {
        let params = &self.spec.params;
        let config_dir = self.spec.run_dir.join(self.config.name());
        fs::create_dir_all(&config_dir).map_err(LabError::io("create", &config_dir))?;

        // 1. Boot on a quiet host.
        let name = format!("lab{}-iso-{}", std::process::id(), self.config.name());
        let mut config = GuestConfig::new(&name, &self.assets.kernel_image, &self.initramfs.path);
        config.vcpus = 1;
        config.memory_mib = params.memory_mib;
        config.accel = self.spec.accel;
        config.qemu = self.assets.qemu.clone();
        config.run_dir = self.spec.run_dir.clone();
        self.say(format_args!("booting guest {name} (1 vCPU)"));
        let guest = slot.insert(Guest::boot(&config)?);
        self.accelerator = Some(guest.accelerator());
        self.kvm_fallback = guest.kvm_fallback().map(str::to_owned);
        result.guest = name.clone();
        result.qemu_pid = guest.pid();
        result.boot_ms = u64::try_from(guest.boot_time().as_millis()).unwrap_or(u64::MAX);
        guest.wait_for_marker(MARKER_READY, READY_TIMEOUT)?;
        result.vcpu_tids = guest.vcpu_tids()?;
        let vcpu = match result.vcpu_tids.as_slice() {
            [tid] => *tid,
            tids => {
                return Err(LabError::Run(format!(
                    "{name}: expected one vCPU thread, QMP reported {tids:?}"
                )))
            }
        };
        let pid = result.qemu_pid;

        // 2. Scheduling: the vCPU thread at FIFO, alone on the isolated CPU or not.
        let mut static_rt = None;
        if self.config.isolates() {
            let to_i32 = |id: u32| {
                i32::try_from(id).map_err(|_| LabError::Run(format!("thread id {id} overflows")))
            };
            let vm = VmThreads {
                name: name.clone(),
                pid: to_i32(pid)?,
                vcpus: vec![to_i32(vcpu)?],
                iothreads: Vec::new(),
            };
            self.say(format_args!(
                "isolating CPU {}: vCPU thread {vcpu} there at SCHED_FIFO {}, QEMU's main thread {pid} on {}",
                isolate::format_cpu_list(&params.isolated_cpus),
                params.vcpu_rt_prio,
                if self.config.main_on_isolated() {
                    "the isolated CPU too"
                } else {
                    "housekeeping"
                }
            ));
            *isolation = Some(Isolation::apply(
                params,
                vm,
                self.config.main_on_isolated(),
                &|m| self.say(m),
            )?);
        } else {
            self.say(format_args!(
                "vCPU thread {vcpu} -> SCHED_FIFO {}",
                params.vcpu_rt_prio
            ));
            static_rt = Some(StaticRt::apply(&[vcpu], params.vcpu_rt_prio)?);
        }

        // 3. Load (confined to housekeeping by the isolation: the lab is in its cpuset,
        //    and stress-ng inherits it), warm-up, go.
        let duration = Duration::from_secs(params.duration_s.into());
        let load_started = Instant::now();
        let mut load = if self.config.loaded() && !params.load.is_empty() {
            self.say(format_args!("host load: {}", params.load.describe()));
            let backstop = Duration::from_secs(u64::from(params.warmup_s + params.duration_s))
                + RESULT_SLACK
                + Duration::from_secs(600);
            Some(HostLoad::start(
                &self.assets.stress_ng,
                &params.load,
                backstop,
                &config_dir.join("stress-ng"),
            )?)
        } else {
            None
        };
        let warmup = Duration::from_secs(params.warmup_s.into());
        if let Some(rest) = warmup.checked_sub(load_started.elapsed()) {
            thread::sleep(rest);
        }
        guest.send_go()?;
        let go = Instant::now();
        self.say(format_args!("guest measuring, {} s", params.duration_s));

        // 4. Sample where the threads run while the guest measures.
        let host_fs = HostFs::default();
        let mut vcpu_seen = ThreadPlacement {
            tid: vcpu,
            ..ThreadPlacement::default()
        };
        let mut main_seen = ThreadPlacement {
            tid: pid,
            ..ThreadPlacement::default()
        };
        let mut isolated_tasks = None;
        let mut throughput: Option<Throughput> = None;
        let wait_timeout = duration + RESULT_SLACK;
        let this = &*self;
        let output: Result<GuestOutput> = thread::scope(|scope| {
            let waiter = scope.spawn(|| guest.wait_done(wait_timeout));
            let mut next_progress = go + PROGRESS_PERIOD;
            let mut looked_half_way = false;
            while !waiter.is_finished() {
                if go.elapsed() < duration {
                    for seen in [&mut vcpu_seen, &mut main_seen] {
                        let tid = i32::try_from(seen.tid).unwrap_or(i32::MAX);
                        let owner = i32::try_from(pid).unwrap_or(i32::MAX);
                        if let Ok(stat) = host_fs.task_stat(owner, tid) {
                            *seen.ran_on.entry(stat.processor).or_default() += 1;
                            let policy = ThreadPolicy {
                                policy: stat.policy,
                                rt_priority: stat.rt_priority,
                            };
                            seen.policy.record(policy.is_realtime());
                        }
                    }
                    if !looked_half_way && go.elapsed() >= duration / 2 {
                        looked_half_way = true;
                        let proc = Path::new("/proc");
                        vcpu_seen.affinity = thread_affinity(proc, pid, vcpu);
                        main_seen.affinity = thread_affinity(proc, pid, pid);
                        isolated_tasks = isolation.as_ref().and_then(Isolation::isolated_tasks);
                    }
                } else if let Some(running) = load.take() {
                    // The window is over: the load stops with it.
                    running.interrupt();
                    throughput = running
                        .finish(Duration::from_secs(10))
                        .map_err(|error| this.say(format_args!("stress-ng: {error}")))
                        .ok();
                }
                if Instant::now() >= next_progress {
                    let left = duration.saturating_sub(go.elapsed()).as_secs();
                    if left > 0 {
                        this.say(format_args!("guest measuring, {left} s left"));
                    }
                    next_progress += PROGRESS_PERIOD;
                }
                thread::sleep(SAMPLE_PERIOD);
            }
            waiter
                .join()
                .unwrap_or_else(|_| Err(LabError::Run("guest waiter thread panicked".into())))
        });
        if let Some(running) = load.take() {
            running.interrupt();
            throughput = running.finish(Duration::from_secs(10)).ok();
        }
        result.vcpu = vcpu_seen;
        result.main_thread = main_seen;
        result.isolated_cpuset_tasks = isolated_tasks;
        result.host_bogo_ops_per_s = throughput.map_or(0.0, |t| t.geometric_mean());
        let log = self
            .spec
            .out_dir
            .join(format!("guest-{}.log", self.config.name()));
        let _ = fs::write(&log, guest.console().join("\n") + "\n");

        // 5. The guest's histogram; the vCPU thread back to SCHED_OTHER (an isolation is
        //    undone by `run`).
        let measured = output.and_then(|output| {
            if output.exit_code != 0 {
                return Err(LabError::WorkloadFailed {
                    name: name.clone(),
                    code: output.exit_code,
                    output: output.result,
                });
            }
            let summary = parse_histogram(&output.result, GUEST_HISTOGRAM_US.into())?;
            result.latency = figures(&summary);
            result.histogram = histogram_buckets(&output.result);
            Ok(())
        });
        if let Some(applied) = static_rt.take() {
            applied.restore()?;
        }
        measured
    }
}

fn cell(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

/// `CPU 1`, `CPUs 0-1`, or `–` when the thread was never seen.
fn cpus_cell(placement: &ThreadPlacement) -> String {
    match placement.cpus().as_slice() {
        [] => "–".to_owned(),
        [cpu] => format!("CPU {cpu}"),
        cpus => format!("CPUs {}", isolate::format_cpu_list(cpus)),
    }
}

/// The results table in Markdown: the run's parameters, one row per configuration (load,
/// where the vCPU and main threads ran, guest latency), the isolation's undo, failures.
pub fn markdown(results: &IsolationResults) -> String {
    let params = &results.params;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "## Isolation: cyclictest in a 1-vCPU guest ({}, {} µs interval, {} s per configuration)\n",
        results
            .accelerator
            .map_or("no guest booted".to_owned(), |accel| accel.to_string()),
        params.interval_us,
        params.duration_s
    );
    let _ = writeln!(
        text,
        "Host: {} CPUs, kernel {}; isolated CPU {}, housekeeping CPUs {}; guest kernel {}. vCPU thread at SCHED_FIFO {} in every configuration; host load {} ({}), none under `idle`.\n",
        params.host_cpus,
        params.host_kernel,
        isolate::format_cpu_list(&params.isolated_cpus),
        isolate::format_cpu_list(&params.housekeeping_cpus),
        params.guest_kernel,
        params.vcpu_rt_prio,
        params.load.describe(),
        params.load_origin
    );
    text.push_str(
        "| configuration | host load | isolated | vCPU thread ran on | main thread ran on | samples | avg (µs) | p99 (µs) | max (µs) |\n",
    );
    text.push_str("|---|---|---|---|---|--:|--:|--:|--:|\n");
    for result in results.ordered() {
        let latency = &result.latency;
        let (avg, p99, max) = if latency.samples == 0 {
            ("–".to_owned(), "–".to_owned(), "–".to_owned())
        } else {
            (
                cell(latency.avg_us),
                format!(
                    "{}{}",
                    if latency.p99_is_lower_bound {
                        "≥"
                    } else {
                        ""
                    },
                    latency.p99_us
                ),
                latency.max_us.to_string(),
            )
        };
        let _ = writeln!(
            text,
            "| {}{} | {} | {} | {} | {} | {} | {avg} | {p99} | {max} |",
            result.name,
            if result.error.is_some() {
                " (failed)"
            } else {
                ""
            },
            if result.loaded { "yes" } else { "no" },
            match (result.isolated, result.main_on_isolated) {
                (false, _) => "no",
                (true, false) => "vCPU",
                (true, true) => "vCPU + main",
            },
            cpus_cell(&result.vcpu),
            cpus_cell(&result.main_thread),
            latency.samples
        );
    }
    let restores: Vec<&IsolationConfigResult> = results
        .ordered()
        .into_iter()
        .filter(|result| result.host_restore.is_some())
        .collect();
    if !restores.is_empty() {
        text.push_str("\nIsolation and undo:\n\n");
        for result in restores {
            let Some(restore) = &result.host_restore else {
                continue;
            };
            let _ = writeln!(
                text,
                "- {}: {} changes applied ({} not movable), isolated cpuset held {}; undo restored {} values ({} threads had exited, {} adopted); {}",
                result.name,
                restore.applied_changes,
                restore.unmovable,
                result
                    .isolated_cpuset_tasks
                    .as_ref()
                    .map_or("(not read)".to_owned(), |tids| format!("{tids:?}")),
                restore.restored_values,
                restore.exited,
                restore.adopted,
                if restore.restored() {
                    format!(
                        "{} files and {} tasks as before",
                        restore.files_compared, restore.tasks_compared
                    )
                } else {
                    format!(
                        "HOST NOT RESTORED: {}",
                        restore
                            .undo_error
                            .iter()
                            .chain(&restore.differences)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                }
            );
        }
    }
    let failed: Vec<&IsolationConfigResult> = results
        .ordered()
        .into_iter()
        .filter(|result| result.error.is_some())
        .collect();
    if !failed.is_empty() {
        text.push_str("\nFailed:\n\n");
        for result in failed {
            let first_line = result
                .error
                .as_deref()
                .and_then(|error| error.lines().next())
                .unwrap_or_default();
            let _ = writeln!(text, "- {}: {first_line}", result.name);
        }
    }
    text
}

/// Files written by [`write_all`].
#[derive(Debug, Clone)]
pub struct IsolationFiles {
    /// `results.json`.
    pub json: PathBuf,
    /// `results.md`.
    pub markdown: PathBuf,
    /// `isolation-latency-cdf.svg`.
    pub plot: PathBuf,
}

/// Writes `results.json`, `results.md` and `isolation-latency-cdf.svg` (the guest latency
/// CDF of every configuration) into `dir`.
pub fn write_all(results: &IsolationResults, dir: &Path) -> Result<IsolationFiles> {
    fs::create_dir_all(dir).map_err(LabError::io("create", dir))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(results)
        .map_err(|error| LabError::Run(format!("serializing results: {error}")))?;
    fs::write(&json, text + "\n").map_err(LabError::io("write", &json))?;
    let markdown_path = dir.join("results.md");
    fs::write(&markdown_path, markdown(results)).map_err(LabError::io("write", &markdown_path))?;
    let series: Vec<(String, Vec<(f64, f64)>)> = results
        .ordered()
        .iter()
        .map(|result| {
            (
                result.name.clone(),
                cdf_points(&result.histogram, result.latency.samples),
            )
        })
        .collect();
    let title = format!(
        "guest cyclictest latency CDF, 1 vCPU ({}, {} µs interval)",
        results
            .accelerator
            .map_or("unknown".to_owned(), |accel| accel.to_string()),
        results.params.interval_us
    );
    let plot = dir.join("isolation-latency-cdf.svg");
    fs::write(&plot, cdf_svg(&title, &series)).map_err(LabError::io("write", &plot))?;
    Ok(IsolationFiles {
        json,
        markdown: markdown_path,
        plot,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn params() -> IsolationParams {
        IsolationParams {
            quick: true,
            memory_mib: 256,
            interval_us: 1000,
            duration_s: 10,
            warmup_s: 2,
            guest_rt_prio: 90,
            vcpu_rt_prio: 8,
            load: LoadSpec::seed003(2),
            load_origin: "the lab's default load".into(),
            isolated_cpus: vec![1],
            housekeeping_cpus: vec![0],
            host_cpus: 2,
            host_kernel: "6.1.0".into(),
            guest_kernel: "6.1.0-cloud-amd64".into(),
            state_file: PathBuf::from(STATE_FILE),
            configs: IsolationConfig::ALL.map(|c| c.name().to_owned()).to_vec(),
        }
    }

    fn placement(tid: u32, cpus: &[(u32, u64)]) -> ThreadPlacement {
        let samples: u64 = cpus.iter().map(|&(_, n)| n).sum();
        ThreadPlacement {
            tid,
            ran_on: cpus.iter().copied().collect(),
            policy: PolicyShare {
                samples,
                rt_samples: 0,
            },
            affinity: None,
        }
    }

    /// A result shaped like a real run's where everything that must hold holds.
    pub(crate) fn passing(config: IsolationConfig, p99_us: u64) -> IsolationConfigResult {
        let mut vcpu = placement(101, &[(1, 150), (0, 50)]);
        let mut main = placement(100, &[(0, 120), (1, 80)]);
        if config.isolates() {
            vcpu = placement(101, &[(1, 200)]);
            main = placement(100, &[(0, 200)]);
        }
        if config.main_on_isolated() {
            main = placement(100, &[(1, 200)]);
        }
        vcpu.policy.rt_samples = vcpu.policy.samples;
        IsolationConfigResult {
            name: config.name().to_owned(),
            isolated: config.isolates(),
            main_on_isolated: config.main_on_isolated(),
            loaded: config.loaded(),
            guest: format!("lab1-iso-{}", config.name()),
            qemu_pid: 100,
            vcpu_tids: vec![101],
            boot_ms: 9000,
            latency: LatencyFigures {
                samples: 10_000,
                avg_us: 80.0,
                p99_us,
                p99_is_lower_bound: false,
                max_us: p99_us * 3,
                min_us: 5,
                overflows: 0,
            },
            histogram: vec![(50, 5_000), (p99_us, 5_000)],
            vcpu,
            main_thread: main,
            isolated_cpuset_tasks: config.isolates().then(|| {
                if config.main_on_isolated() {
                    vec![100, 101]
                } else {
                    vec![101]
                }
            }),
            host_restore: config.isolates().then(|| HostRestore {
                applied_changes: 240,
                unmovable: 30,
                restored_values: 400,
                exited: 3,
                adopted: 1,
                undo_error: None,
                undo_attempts: 1,
                files_compared: 40,
                tasks_compared: 300,
                differences: Vec::new(),
            }),
            host_bogo_ops_per_s: if config.loaded() { 900.0 } else { 0.0 },
            exit_check: Some(ExitCheck {
                threads_checked: 4,
                rt_threads: Vec::new(),
            }),
            leftover_rt_threads: Vec::new(),
            elapsed_s: 40.0,
            error: None,
        }
    }

    pub(crate) fn results(configs: &[(IsolationConfig, u64)]) -> IsolationResults {
        IsolationResults {
            experiment: EXPERIMENT.into(),
            version: RESULTS_VERSION,
            accelerator: Some(Accelerator::Tcg),
            kvm_fallback: None,
            params: params(),
            configs: configs
                .iter()
                .map(|&(config, p99)| (config.name().to_owned(), passing(config, p99)))
                .collect(),
            elapsed_s: 160.0,
        }
    }

    #[test]
    fn configuration_names_round_trip_and_say_what_they_change() {
        for config in IsolationConfig::ALL {
            assert_eq!(IsolationConfig::parse(config.name()), Some(config));
        }
        assert_eq!(IsolationConfig::parse("isolated-all"), None);
        let isolating: Vec<&str> = IsolationConfig::ALL
            .into_iter()
            .filter(|c| c.isolates())
            .map(IsolationConfig::name)
            .collect();
        assert_eq!(isolating, ["isolated", "isolated-main"]);
        assert!(!IsolationConfig::Idle.loaded());
        assert!(IsolationConfig::Shared.loaded() && !IsolationConfig::Shared.isolates());
        assert!(IsolationConfig::IsolatedMain.main_on_isolated());
        assert!(!IsolationConfig::Isolated.main_on_isolated());
    }

    #[test]
    fn the_last_online_cpu_is_isolated() {
        assert_eq!(split_cpus("0-1\n").expect("split"), (vec![1], vec![0]));
        assert_eq!(
            split_cpus("0-3,6").expect("split"),
            (vec![6], vec![0, 1, 2, 3])
        );
        assert_eq!(split_cpus("0").expect("split"), (Vec::new(), vec![0]));
        assert!(split_cpus("zero").is_err());
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(validate(&params()).is_ok());
        let cases: [fn(&mut IsolationParams); 6] = [
            |p| p.duration_s = 0,
            |p| p.interval_us = 10,
            |p| p.vcpu_rt_prio = 0,
            |p| p.guest_rt_prio = 100,
            |p| p.isolated_cpus.clear(),
            |p| p.housekeeping_cpus = vec![1],
        ];
        for change in cases {
            let mut bad = params();
            change(&mut bad);
            assert!(
                matches!(validate(&bad), Err(LabError::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }

    /// A task of a fixture snapshot: (tid, start time), (cpuset, affinity).
    type TaskRow<'a> = ((i32, u64), (&'a str, &'a str));

    fn snapshot(files: &[(&str, &str)], tasks: &[TaskRow<'_>]) -> HostSnapshot {
        HostSnapshot {
            files: files
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            tasks: tasks
                .iter()
                .map(|&(key, (cpuset, affinity))| (key, (cpuset.to_owned(), affinity.to_owned())))
                .collect(),
        }
    }

    #[test]
    fn differences_name_every_value_not_restored_and_ignore_exited_tasks() {
        let before = snapshot(
            &[
                ("cpuset.sched_load_balance", "1"),
                ("/proc/irq/24/smp_affinity_list", "0-1"),
                ("cpuset children", ""),
            ],
            &[
                ((10, 5), ("/", "0-1")),
                ((11, 6), ("/", "0-1")),
                ((12, 7), ("/", "0")),
            ],
        );
        assert_eq!(before.differences(&before.clone()), (Vec::new(), 3));
        let after = snapshot(
            &[
                ("cpuset.sched_load_balance", "0"),
                ("/proc/irq/24/smp_affinity_list", "0-1"),
                ("cpuset children", "pvsched-isolated"),
            ],
            &[
                ((10, 5), ("/pvsched-housekeeping", "0")),
                // 11 exited; 12's tid was reused by another thread (start time 99).
                ((12, 99), ("/", "0-1")),
                ((13, 8), ("/", "0-1")),
            ],
        );
        let (differences, compared) = before.differences(&after);
        assert_eq!(compared, 1);
        assert_eq!(
            differences,
            [
                "cpuset children:  before, pvsched-isolated after",
                "cpuset.sched_load_balance: 1 before, 0 after",
                "task 10: cpuset / affinity 0-1 before, cpuset /pvsched-housekeeping affinity 0 after",
            ]
        );
    }

    #[test]
    fn a_snapshot_reads_cpuset_irq_and_task_values_from_its_roots() {
        let root =
            std::env::temp_dir().join(format!("pvsched-lab-iso-snap-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let proc_root = root.join("proc");
        let sys_root = root.join("sys");
        let cpuset = sys_root.join("fs/cgroup/cpuset");
        let write = |path: PathBuf, text: &str| {
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, text).expect("write");
        };
        write(cpuset.join("cpuset.cpus"), "0-1\n");
        write(cpuset.join("cpuset.sched_load_balance"), "1\n");
        fs::create_dir_all(cpuset.join("machine")).expect("mkdir");
        write(proc_root.join("irq/24/smp_affinity_list"), "1\n");
        write(proc_root.join("irq/default_smp_affinity"), "3\n");
        write(sys_root.join("devices/virtual/workqueue/cpumask"), "3\n");
        let task = proc_root.join("42/task/42");
        write(
            task.join("stat"),
            "42 (qemu) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 3 0 777 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n",
        );
        write(task.join("cpuset"), "/\n");
        write(
            task.join("status"),
            "Name:\tqemu\nCpus_allowed_list:\t0-1\n",
        );
        let host = HostFs {
            proc_root: proc_root.clone(),
            sys_root: sys_root.clone(),
        };
        let snap = HostSnapshot::read(&host, &cpuset);
        let _ = fs::remove_dir_all(&root);
        let file = |path: PathBuf| snap.files.get(&path.display().to_string()).cloned();
        assert_eq!(file(cpuset.join("cpuset.cpus")).as_deref(), Some("0-1"));
        assert_eq!(
            file(cpuset.join("cpuset.sched_load_balance")).as_deref(),
            Some("1")
        );
        assert_eq!(
            file(cpuset.join("cpuset.mems")).as_deref(),
            Some("<unreadable>")
        );
        assert_eq!(
            file(proc_root.join("irq/24/smp_affinity_list")).as_deref(),
            Some("1")
        );
        assert_eq!(
            snap.files
                .get(&format!("{} children", cpuset.display()))
                .map(String::as_str),
            Some("machine")
        );
        assert_eq!(
            snap.tasks.get(&(42, 777)),
            Some(&("/".to_owned(), "0-1".to_owned()))
        );
    }

    #[test]
    fn the_main_thread_is_moved_to_the_isolated_cpuset_and_pinned() {
        let root = PathBuf::from("/sys/fs/cgroup/cpuset");
        let mut plan = isolate::Plan {
            hierarchy: Hierarchy::V1(root.clone()),
            isolated: vec![1],
            housekeeping: vec![0],
            vm: None,
            changes: vec![
                Change::MoveTask {
                    tid: 100,
                    starttime: 55,
                    comm: "qemu-system-x86".into(),
                    from: root.clone(),
                    to: root.join(isolate::HOUSEKEEPING_CPUSET),
                    old_affinity: vec![0, 1],
                },
                Change::MoveTask {
                    tid: 7,
                    starttime: 3,
                    comm: "sshd".into(),
                    from: root.clone(),
                    to: root.join(isolate::HOUSEKEEPING_CPUSET),
                    old_affinity: vec![0, 1],
                },
            ],
            unmovable: Vec::new(),
        };
        let isolated_dir = root.join(isolate::ISOLATED_CPUSET);
        place_main_thread(&mut plan, 100, &isolated_dir, 1).expect("placed");
        assert!(matches!(&plan.changes[0], Change::MoveTask { to, .. } if *to == isolated_dir));
        assert!(matches!(&plan.changes[1], Change::MoveTask { to, .. } if *to != isolated_dir));
        assert_eq!(
            plan.changes.last(),
            Some(&Change::Affinity {
                tid: 100,
                starttime: 55,
                old: vec![0, 1],
                new: vec![1],
            })
        );
        assert!(place_main_thread(&mut plan, 999, &isolated_dir, 1).is_err());
    }

    #[test]
    fn the_table_has_a_row_per_configuration_with_where_the_threads_ran() {
        let mut results = results(&[
            (IsolationConfig::Idle, 60),
            (IsolationConfig::Shared, 9000),
            (IsolationConfig::Isolated, 700),
            (IsolationConfig::IsolatedMain, 400),
        ]);
        if let Some(failed) = results.configs.get_mut("isolated-main") {
            failed.error = Some("guest did not boot\nmore".into());
        }
        let table = markdown(&results);
        assert!(
            table.contains("| idle | no | no | CPUs 0-1 | CPUs 0-1 | 10000 | 80 | 60 | 180 |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| shared | yes | no | CPUs 0-1 | CPUs 0-1 | 10000 | 80 | 9000 | 27000 |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| isolated | yes | vCPU | CPU 1 | CPU 0 | 10000 | 80 | 700 | 2100 |"),
            "{table}"
        );
        assert!(
            table.contains("| isolated-main (failed) | yes | vCPU + main | CPU 1 | CPU 1 |"),
            "{table}"
        );
        assert!(table.contains("- isolated: 240 changes applied (30 not movable), isolated cpuset held [101]; undo restored 400 values (3 threads had exited, 1 adopted); 40 files and 300 tasks as before"), "{table}");
        assert!(
            table.contains("- isolated-main: guest did not boot\n"),
            "{table}"
        );
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 5, "header and four rows: {table}");
    }

    #[test]
    fn results_round_trip_through_json_and_write_the_plot() {
        let results = results(&[
            (IsolationConfig::Shared, 900),
            (IsolationConfig::Isolated, 300),
        ]);
        let text = serde_json::to_string(&results).expect("serialize");
        let back: IsolationResults = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, results);
        let dir = std::env::temp_dir().join(format!("pvsched-lab-iso-out-{}", std::process::id()));
        let files = write_all(&results, &dir).expect("write");
        let svg = fs::read_to_string(&files.plot).expect("plot");
        let md = fs::read_to_string(&files.markdown).expect("markdown");
        let json = fs::read_to_string(&files.json).expect("json");
        let _ = fs::remove_dir_all(&dir);
        assert!(svg.contains("shared") && svg.contains("isolated"), "{svg}");
        assert_eq!(md, markdown(&results));
        assert!(json.contains("\"experiment\": \"isolation\""));
    }
}
