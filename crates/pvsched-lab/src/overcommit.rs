//! The overcommit experiment (seed 000, Kunpeng-V): on a host kept at about 80% CPU by
//! stress-ng, guests of different sizes (4, 2 and 1 vCPUs by default) run the same
//! kernel-lock-heavy benchmark at once, and a bigger VM can score below a smaller one
//! because its lock holders' vCPUs are preempted while the others spin or wait for them.
//!
//! The benchmark is hackbench ([`crate::hackbench`]): `groups_per_vcpu × vCPUs` groups per
//! round, rounds back to back for the window; a VM's score is messages delivered per second
//! of its window, reported per VM (as the seed does) and per vCPU.
//!
//! One configuration run: boot every guest on a quiet host (in parallel; init loads the
//! guest module and waits for the host's go line); start the daemon (`pvsched`,
//! `pvsched-introspect`) or format the shared pages so the module attaches the same way
//! (`vanilla`); start the host load, wait for the modules to attach and the load to warm
//! up; send go to every guest at once; sample the vCPU threads' policies until every guest
//! has reported (the load runs until the last round of the last guest ends, so every round
//! ran on the loaded host); read the daemon's counters and stop it; check every QEMU thread
//! for a real-time policy left behind; stop QEMU. `pvsched-introspect` is `pvsched` with
//! the guests' RAM on a shared memfd backend, so the daemon can read guest state (preempt
//! counts) from guest memory.

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
use crate::hackbench::{parse_output, HackbenchParams};
use crate::hostd::{Hostd, HostdExit, HostdSpec, HostdVm};
use crate::hostload::{HostLoad, LoadSpec, Throughput};
use crate::hostsched::{process_cpu_ns, thread_policy, RtThread};
use crate::initramfs::{Initramfs, InitramfsSpec};
use crate::page::{static_host_header, PageReader, SlotCounters, SlotTotals};
use crate::qemu::{AccelChoice, Accelerator, Guest, GuestConfig, GuestOutput};
use crate::report::bar_chart_svg;
use crate::results::{ApplyLatency, ExitCheck, PolicyShare};
use crate::workload::{InitControl, Workload, MARKER_READY};
use crate::{LabAssets, RESULT_SLACK};

/// `experiment` of an overcommit `results.json`.
pub const EXPERIMENT: &str = "overcommit";
/// Version of the overcommit `results.json` layout.
pub const RESULTS_VERSION: u32 = 1;
/// The guests' sizes when `--vm-vcpus` is not given: seed 000's 16/8/4 scaled to 2 pCPUs.
pub const DEFAULT_VM_VCPUS: [u32; 3] = [4, 2, 1];
/// The host's CPU load (% per stress-ng worker, one worker per host CPU): seed 000's 80%.
pub const DEFAULT_CPU_LOAD: u32 = 80;
/// Measured seconds per configuration with `--quick`.
pub const QUICK_DURATION_S: u32 = 15;
/// Measured seconds per configuration by default.
pub const DEFAULT_DURATION_S: u32 = 60;
/// Seconds of uncounted rounds after the window with `--quick` (a round of the 4-vCPU
/// guest took up to 10 s under TCG on the loaded 2-CPU development machine).
pub const QUICK_TAIL_S: u32 = 10;
/// Seconds of uncounted rounds after the window by default.
pub const DEFAULT_TAIL_S: u32 = 15;
/// What one operation of the score is.
pub const OPERATION: &str = "one hackbench message: a write of --datasize bytes by a sender \
     to a receiver of its group over a Unix socket, read by the receiver";

/// How long init may take from boot to READY (module load).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often vCPU thread policies are sampled while the guests run.
const POLICY_SAMPLE_PERIOD: Duration = Duration::from_millis(50);
/// How often a progress line is printed while the guests run.
const PROGRESS_PERIOD: Duration = Duration::from_secs(10);

/// A configuration of the overcommit experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OvercommitConfig {
    /// No daemon: vCPU threads are ordinary fair-class threads.
    Vanilla,
    /// The daemon with the guest module; guest RAM private to QEMU.
    Pvsched,
    /// The daemon with guest RAM on a shared backend: it can read the guests' preempt
    /// counts from their memory (introspection).
    PvschedIntrospect,
}

impl OvercommitConfig {
    /// Every configuration, in report order (the default set).
    pub const ALL: [OvercommitConfig; 3] = [
        OvercommitConfig::Vanilla,
        OvercommitConfig::Pvsched,
        OvercommitConfig::PvschedIntrospect,
    ];

    /// `vanilla`, `pvsched`, `pvsched-introspect`.
    pub fn name(self) -> &'static str {
        match self {
            OvercommitConfig::Vanilla => "vanilla",
            OvercommitConfig::Pvsched => "pvsched",
            OvercommitConfig::PvschedIntrospect => "pvsched-introspect",
        }
    }

    /// Parses a configuration name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|config| config.name() == name)
    }

    /// The daemon runs.
    pub fn runs_daemon(self) -> bool {
        self != OvercommitConfig::Vanilla
    }

    /// Guest RAM is on a shared backend.
    pub fn shared_ram(self) -> bool {
        self == OvercommitConfig::PvschedIntrospect
    }
}

/// The parameters of an overcommit run (recorded in `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OvercommitParams {
    /// `--quick`.
    pub quick: bool,
    /// vCPUs of each guest, in order; the guests run at once.
    pub vm_vcpus: Vec<u32>,
    /// Memory per guest (MiB).
    pub memory_mib: u32,
    /// Measurement window (s): every guest starts hackbench rounds for this long.
    pub duration_s: u32,
    /// Seconds of host load before the window opens.
    pub warmup_s: u32,
    /// The host load (`stress-ng --cpu N --cpu-load P`).
    pub load: LoadSpec,
    /// The benchmark.
    pub benchmark: HackbenchParams,
    /// What one operation of the score is.
    pub operation: String,
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

/// One guest of a configuration run, and its score.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmScore {
    /// Short name (`vm0`, `vm1`, ... in `--vm-vcpus` order).
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Messages per second over the VM's window (0 when it did not report).
    pub score: f64,
    /// `score / vcpus`.
    pub score_per_vcpu: f64,
    /// hackbench groups per round.
    pub groups: u32,
    /// Rounds completed.
    pub rounds: u64,
    /// Messages delivered.
    pub messages: u64,
    /// The VM's window (s, guest clock: first round start to last round end).
    pub elapsed_s: f64,
    /// Sum of hackbench's own round times (s).
    pub hackbench_s: f64,
    /// Uncounted rounds the VM ran in the tail after its window.
    #[serde(default)]
    pub tail_rounds: Option<u64>,
    /// QEMU's `-name` (also the shared page's and the daemon's name of the VM).
    pub guest: String,
    /// QEMU process id.
    pub qemu_pid: u32,
    /// vCPU thread ids.
    pub vcpu_tids: Vec<u32>,
    /// Boot time (ms).
    pub boot_ms: u64,
    /// Guest module status from init (`loaded`, ...).
    pub module: Option<String>,
    /// The module had attached to the shared page when the window opened.
    pub module_attached: bool,
    /// Guest module heartbeat when the window opened.
    pub heartbeat_before: u64,
    /// Guest module heartbeat after the guest reported.
    pub heartbeat_after: u64,
    /// The daemon's counters per vCPU slot at the end.
    pub slots: Vec<SlotCounters>,
    /// How often this VM's vCPU threads were found real-time while the guests ran.
    pub vcpu_policy: PolicyShare,
    /// Every thread of this QEMU checked just before it was stopped (`None`: not checked).
    pub exit_check: Option<ExitCheck>,
    /// Why this VM has no score, when it has none.
    pub error: Option<String>,
}

/// A larger VM that scored below a smaller one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvertedPair {
    /// The larger VM.
    pub larger: String,
    /// Its vCPUs.
    pub larger_vcpus: u32,
    /// Its figure (per VM or per vCPU, as the verdict says).
    pub larger_score: f64,
    /// The smaller VM.
    pub smaller: String,
    /// Its vCPUs.
    pub smaller_vcpus: u32,
    /// Its figure.
    pub smaller_score: f64,
}

/// Whether a VM with more vCPUs scored below one with fewer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inversion {
    /// Some larger VM scored below some smaller one.
    pub present: bool,
    /// Every such pair.
    pub pairs: Vec<InvertedPair>,
}

/// The inversion verdict over the VMs that scored, on their per-VM score (`per_vcpu` false,
/// the seed's comparison) or their per-vCPU score; `None` without two scored VMs of
/// different sizes.
pub fn inversion(vms: &[VmScore], per_vcpu: bool) -> Option<Inversion> {
    let scored: Vec<&VmScore> = vms
        .iter()
        .filter(|vm| vm.error.is_none() && vm.rounds > 0)
        .collect();
    let figure = |vm: &VmScore| {
        if per_vcpu {
            vm.score_per_vcpu
        } else {
            vm.score
        }
    };
    let mut compared = false;
    let mut pairs = Vec::new();
    for larger in &scored {
        for smaller in scored.iter().filter(|vm| vm.vcpus < larger.vcpus) {
            compared = true;
            if figure(larger) < figure(smaller) {
                pairs.push(InvertedPair {
                    larger: larger.name.clone(),
                    larger_vcpus: larger.vcpus,
                    larger_score: figure(larger),
                    smaller: smaller.name.clone(),
                    smaller_vcpus: smaller.vcpus,
                    smaller_score: figure(smaller),
                });
            }
        }
    }
    compared.then_some(Inversion {
        present: !pairs.is_empty(),
        pairs,
    })
}

/// Everything measured for one configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OvercommitConfigResult {
    /// Configuration name.
    pub name: String,
    /// The daemon ran.
    pub daemon: bool,
    /// Guest RAM was on a shared backend.
    pub shared_ram: bool,
    /// The VMs, in `--vm-vcpus` order.
    pub vms: Vec<VmScore>,
    /// A larger VM scored below a smaller one (per VM).
    pub inversion: Option<Inversion>,
    /// The same per vCPU.
    pub per_vcpu_inversion: Option<Inversion>,
    /// Every VM scored and every counted window ended within the window and the tail, so
    /// every counted round ran while every guest was still running hackbench; `None`
    /// without scores.
    pub all_rounds_contended: Option<bool>,
    /// Host throughput: stress-ng bogo-ops per second (all stressors, real time).
    pub host_bogo_ops_per_s: f64,
    /// Per stressor.
    pub host_bogo_ops_per_s_by_stressor: BTreeMap<String, f64>,
    /// CPU time the daemon's process used over the window, in % of one CPU.
    pub daemon_cpu_percent: Option<f64>,
    /// Boosts by the daemon, all vCPUs of all guests.
    pub boosts: u64,
    /// Throttles by the daemon, all vCPUs of all guests.
    pub throttles: u64,
    /// Boosted CPU time (ms).
    pub boosted_ms: f64,
    /// Scheduling changes the daemon applied, from its status just before SIGTERM.
    pub applies: Option<u64>,
    /// The daemon's apply latency.
    pub apply_latency: Option<ApplyLatency>,
    /// Whether the daemon knows `[daemon] introspection` (asked of it once per run; `None`
    /// without a daemon or when it could not be asked). When it does not, the key is not
    /// written and the guests' RAM is shared all the same.
    pub daemon_knows_introspection: Option<bool>,
    /// How the daemon ended.
    pub hostd: Option<HostdExit>,
    /// Fraction of vCPU-thread policy samples that found a real-time policy (all VMs).
    pub rt_fraction: Option<f64>,
    /// QEMU threads still real-time after the configuration was torn down (must be empty).
    pub leftover_rt_threads: Vec<RtThread>,
    /// Wall-clock time of the configuration run (s).
    pub elapsed_s: f64,
    /// Why the run failed, when it did.
    pub error: Option<String>,
}

/// `results.json` of the overcommit experiment.
pub type OvercommitResults = ExperimentResults<OvercommitParams, OvercommitConfigResult>;

impl OvercommitResults {
    /// Configurations in report order.
    pub fn ordered(&self) -> Vec<&OvercommitConfigResult> {
        self.ordered_by(&OvercommitConfig::ALL.map(OvercommitConfig::name))
    }
}

/// Everything an overcommit run needs besides the assets.
#[derive(Debug, Clone)]
pub struct OvercommitSpec {
    /// Run parameters.
    pub params: OvercommitParams,
    /// Configurations, in order.
    pub configs: Vec<OvercommitConfig>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// The guest module, if built.
    pub module: Option<PathBuf>,
    /// How to run the daemon; `Err` says why it cannot.
    pub hostd: std::result::Result<HostdSpec, String>,
    /// Whether the daemon knows `[daemon] introspection` (see [`crate::hostd::knows_daemon_key`]).
    pub daemon_knows_introspection: Option<bool>,
    /// Results directory (logs go here too).
    pub out_dir: PathBuf,
    /// Scratch directory.
    pub run_dir: PathBuf,
}

/// Checks the parameters of an overcommit run.
pub fn validate(params: &OvercommitParams) -> Result<()> {
    if params.vm_vcpus.is_empty() {
        return Err(LabError::InvalidConfig("--vm-vcpus lists no guest".into()));
    }
    if let Some(bad) = params.vm_vcpus.iter().find(|&&n| !(1..=64).contains(&n)) {
        return Err(LabError::InvalidConfig(format!(
            "--vm-vcpus: {bad} is outside 1..=64"
        )));
    }
    if params.vm_vcpus.len() > 8 {
        return Err(LabError::InvalidConfig(format!(
            "--vm-vcpus: {} guests; at most 8 run at once",
            params.vm_vcpus.len()
        )));
    }
    if let Some(percent) = params.load.cpu_load {
        if !(1..=100).contains(&percent) {
            return Err(LabError::InvalidConfig(format!(
                "--cpu-load {percent} is outside 1..=100"
            )));
        }
    }
    params.benchmark.validate()
}

/// Runs every configuration of `spec` and returns the results (also when some
/// configurations failed: their `error` says why).
pub fn run_overcommit(assets: &LabAssets, spec: &OvercommitSpec) -> Result<OvercommitResults> {
    validate(&spec.params)?;
    let progress = Progress::start();
    fs::create_dir_all(&spec.run_dir).map_err(LabError::io("create", &spec.run_dir))?;
    fs::create_dir_all(&spec.out_dir).map_err(LabError::io("create", &spec.out_dir))?;
    let params = &spec.params;
    let workload = Workload::Hackbench(params.benchmark);
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.hackbench.clone()],
            module: spec.module.clone(),
            kernel_modules: Vec::new(),
            files: Vec::new(),
            module_params: params.module_params.clone(),
            workload: workload.clone(),
            diagnostics: vec!["dmesg | grep pvsched_guest | tail -n 5".into()],
            control: InitControl {
                wait_for_go: true,
                hold_after_done: true,
            },
        },
        &spec.run_dir.join("initramfs-hackbench.cpio"),
    )?;
    progress.line(format_args!(
        "overcommit: guests of {} vCPUs at once, host load {} on {} host CPUs, hackbench for {} s per configuration",
        params
            .vm_vcpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        params.load.describe(),
        params.host_cpus,
        params.duration_s
    ));

    let sequence = configrun::run_sequence(
        &progress,
        &spec.configs,
        |config| config.name().to_owned(),
        |config, label| {
            let mut result = OvercommitConfigResult {
                name: config.name().to_owned(),
                daemon: config.runs_daemon(),
                shared_ram: config.shared_ram(),
                daemon_knows_introspection: if config.runs_daemon() {
                    spec.daemon_knows_introspection
                } else {
                    None
                },
                ..OvercommitConfigResult::default()
            };
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
            result.inversion = inversion(&result.vms, false);
            result.per_vcpu_inversion = inversion(&result.vms, true);
            result.all_rounds_contended = all_rounds_contended(&result.vms, &params.benchmark);
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

impl ConfigRecord for OvercommitConfigResult {
    fn error_and_elapsed(&mut self) -> (&mut Option<String>, &mut f64) {
        (&mut self.error, &mut self.elapsed_s)
    }

    fn summary(&self) -> String {
        format!(
            "{}; {}; {}",
            self.vms
                .iter()
                .map(|vm| format!(
                    "{} ({}) {:.0} msg/s in {} rounds",
                    vm.name,
                    vcpus_label(vm.vcpus),
                    vm.score,
                    vm.rounds
                ))
                .collect::<Vec<_>>()
                .join(", "),
            verdict(self.inversion.as_ref()),
            daemon_counts(self.boosts, self.throttles, self.applies)
        )
    }
}

/// Whether every VM's counted window ended before any guest could have stopped running
/// hackbench (`window + tail` after go; every guest starts at go); `None` when no VM
/// scored.
pub fn all_rounds_contended(vms: &[VmScore], benchmark: &HackbenchParams) -> Option<bool> {
    if vms.iter().all(|vm| vm.rounds == 0) {
        return None;
    }
    let limit = f64::from(benchmark.run_s());
    Some(
        vms.iter()
            .all(|vm| vm.error.is_none() && vm.rounds > 0 && vm.elapsed_s <= limit),
    )
}

/// `inversion present` / `inversion absent` / `inversion not measured`.
pub fn verdict(inversion: Option<&Inversion>) -> &'static str {
    match inversion {
        Some(Inversion { present: true, .. }) => "inversion present",
        Some(Inversion { present: false, .. }) => "inversion absent",
        None => "inversion not measured",
    }
}

/// A booted guest of a configuration run.
struct RunningVm {
    guest: Guest,
    page: Option<PageReader>,
    record: VmScore,
}

/// One configuration run (see the module documentation).
struct ConfigRun<'a> {
    assets: &'a LabAssets,
    spec: &'a OvercommitSpec,
    config: OvercommitConfig,
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

    /// Runs the configuration; whatever happened, every QEMU still running is then checked
    /// for real-time threads (after the daemon stopped) and only then stopped.
    fn run(&mut self, result: &mut OvercommitConfigResult) -> Result<()> {
        let mut vms = Vec::new();
        let outcome = self.run_vms(result, &mut vms);
        for running in &mut vms {
            let who = running.record.name.clone();
            running.record.exit_check =
                configrun::exit_check(&mut running.guest, &who, &|m| self.say(m));
            result
                .leftover_rt_threads
                .extend(configrun::leftover(running.record.exit_check.as_ref()));
        }
        let mut all = PolicyShare::default();
        for running in &vms {
            all = all.plus(running.record.vcpu_policy);
        }
        let totals = SlotTotals::of(vms.iter().flat_map(|running| &running.record.slots));
        (result.boosts, result.throttles, result.boosted_ms) =
            (totals.boosts, totals.throttles, totals.boosted_ms);
        result.rt_fraction = all.fraction();
        result.vms = vms.iter().map(|running| running.record.clone()).collect();
        drop(vms);
        outcome
    }

    /// Boots every guest in parallel into `vms` (in `--vm-vcpus` order).
    fn boot_all(&mut self, vms: &mut Vec<RunningVm>) -> Result<()> {
        let params = &self.spec.params;
        let configs: Vec<(String, GuestConfig)> = params
            .vm_vcpus
            .iter()
            .enumerate()
            .map(|(index, &vcpus)| {
                let guest_name =
                    format!("lab{}-{}-vm{index}", std::process::id(), self.config.name());
                let mut config =
                    GuestConfig::new(&guest_name, &self.assets.kernel_image, &self.initramfs.path);
                config.vcpus = vcpus;
                config.memory_mib = params.memory_mib;
                config.accel = self.spec.accel;
                config.qemu = self.assets.qemu.clone();
                config.run_dir = self.spec.run_dir.clone();
                config.shared_ram = self.config.shared_ram();
                if !self.config.runs_daemon() {
                    config.shm_initial_contents = Some(static_host_header(vcpus));
                }
                (format!("vm{index}"), config)
            })
            .collect();
        self.say(format_args!(
            "booting {} guests at once ({}{})",
            configs.len(),
            configs
                .iter()
                .map(|(name, config)| format!("{name}: {}", vcpus_label(config.vcpus)))
                .collect::<Vec<_>>()
                .join(", "),
            if self.config.shared_ram() {
                ", guest RAM on a shared memfd"
            } else {
                ""
            }
        ));
        let booted: Vec<Result<Guest>> = thread::scope(|scope| {
            let handles: Vec<_> = configs
                .iter()
                .map(|(_, config)| scope.spawn(move || Guest::boot(config)))
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|_| Err(LabError::Run("guest boot thread panicked".into())))
                })
                .collect()
        });
        let mut first_error = None;
        for ((name, config), guest) in configs.into_iter().zip(booted) {
            match guest {
                Ok(guest) => {
                    self.accelerator = self.accelerator.or(Some(guest.accelerator()));
                    if let Some(reason) = guest.kvm_fallback() {
                        self.kvm_fallback = Some(reason.to_owned());
                    }
                    let boot_ms = u64::try_from(guest.boot_time().as_millis()).unwrap_or(u64::MAX);
                    vms.push(RunningVm {
                        page: None,
                        record: VmScore {
                            name,
                            vcpus: config.vcpus,
                            guest: config.name.clone(),
                            qemu_pid: guest.pid(),
                            boot_ms,
                            ..VmScore::default()
                        },
                        guest,
                    });
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Boots the guests, runs the daemon or formats the pages, loads the host, measures,
    /// collects and stops the daemon (see the module documentation).
    fn run_vms(
        &mut self,
        result: &mut OvercommitConfigResult,
        vms: &mut Vec<RunningVm>,
    ) -> Result<()> {
        let params = &self.spec.params;
        let hostd_spec = match (&self.spec.hostd, self.config.runs_daemon()) {
            (Err(reason), true) => {
                return Err(LabError::Run(format!("the daemon cannot run: {reason}")))
            }
            (Ok(spec), true) => Some(HostdSpec {
                // Written only when the daemon knows the key; its default is on.
                introspection: (self.config.shared_ram()
                    && self.spec.daemon_knows_introspection == Some(true))
                .then_some(true),
                ..spec.clone()
            }),
            (_, false) => None,
        };
        let config_dir = self.spec.run_dir.join(self.config.name());
        fs::create_dir_all(&config_dir).map_err(LabError::io("create", &config_dir))?;

        // 1. Boot on a quiet host.
        self.boot_all(vms)?;
        for running in vms.iter_mut() {
            running.guest.wait_for_marker(MARKER_READY, READY_TIMEOUT)?;
            running.record.vcpu_tids = running.guest.vcpu_tids()?;
            running.page = Some(PageReader::open(
                running.guest.shm_path(),
                running.record.vcpus,
            )?);
        }
        let sampled: Vec<(usize, u32, u32)> = vms
            .iter()
            .enumerate()
            .flat_map(|(index, running)| {
                let pid = running.record.qemu_pid;
                running
                    .record
                    .vcpu_tids
                    .iter()
                    .map(move |&tid| (index, pid, tid))
            })
            .collect();

        // 2. The daemon.
        let mut hostd = match &hostd_spec {
            Some(spec) => {
                let list: Vec<HostdVm> = vms
                    .iter()
                    .map(|running| HostdVm {
                        name: running.record.guest.clone(),
                        qmp: running.guest.qmp_path().to_owned(),
                        shm: running.guest.shm_path().to_owned(),
                    })
                    .collect();
                let name = self.config.name();
                self.say("starting the daemon");
                Some(Hostd::start(
                    spec,
                    &list,
                    &config_dir,
                    &self.spec.out_dir.join(format!("hostd-{name}.toml")),
                    &self.spec.out_dir.join(format!("hostd-{name}.log")),
                )?)
            }
            None => None,
        };

        // 3. Load, attach, warm-up, go.
        let load_started = Instant::now();
        let mut load = if params.load.is_empty() {
            None
        } else {
            self.say(format_args!("host load: {}", params.load.describe()));
            let backstop = Duration::from_secs(
                u64::from(params.warmup_s + params.duration_s) + ATTACH_TIMEOUT.as_secs() + 600,
            );
            Some(HostLoad::start(
                &self.assets.stress_ng,
                &params.load,
                backstop,
                &config_dir.join("stress-ng"),
            )?)
        };
        self.wait_attached(vms, &mut hostd)?;
        let warmup = Duration::from_secs(params.warmup_s.into());
        if let Some(rest) = warmup.checked_sub(load_started.elapsed()) {
            thread::sleep(rest);
        }
        for running in vms.iter_mut() {
            if let Some(page) = &running.page {
                let snapshot = page.snapshot();
                running.record.module_attached = snapshot.guest_attached;
                running.record.heartbeat_before = snapshot.guest_heartbeat;
            }
        }
        for running in vms.iter_mut() {
            running.guest.send_go()?;
        }
        let go = Instant::now();
        let duration = Duration::from_secs(params.duration_s.into());
        let daemon_pid = hostd.as_ref().map(Hostd::pid);
        let daemon_cpu_at_go = daemon_pid.and_then(|pid| process_cpu_ns(Path::new("/proc"), pid));
        let mut daemon_cpu_percent = None;
        self.say(format_args!(
            "guests running hackbench, {} s left",
            params.duration_s
        ));

        // 4. Sample until every guest reported; the load runs to the end of the last round.
        let wait_timeout = duration + RESULT_SLACK + Duration::from_secs(60);
        let mut shares = vec![PolicyShare::default(); vms.len()];
        let outputs: Vec<Result<GuestOutput>> = thread::scope(|scope| {
            let handles: Vec<_> = vms
                .iter_mut()
                .map(|running| scope.spawn(move || running.guest.wait_done(wait_timeout)))
                .collect();
            let mut next_progress = go + PROGRESS_PERIOD;
            let mut window_over = false;
            while !handles.iter().all(|handle| handle.is_finished()) {
                for &(index, pid, tid) in &sampled {
                    if let Some(policy) = thread_policy(Path::new("/proc"), pid, tid) {
                        shares[index].record(policy.is_realtime());
                    }
                }
                if !window_over && go.elapsed() >= duration {
                    window_over = true;
                    daemon_cpu_percent = daemon_pid
                        .and_then(|pid| process_cpu_ns(Path::new("/proc"), pid))
                        .zip(daemon_cpu_at_go)
                        .map(|(now, then)| {
                            now.saturating_sub(then) as f64 / go.elapsed().as_nanos() as f64 * 100.0
                        });
                    self.say("window over; waiting for the guests' last rounds");
                }
                if Instant::now() >= next_progress {
                    let left = duration.saturating_sub(go.elapsed()).as_secs();
                    if left > 0 {
                        self.say(format_args!("guests running hackbench, {left} s left"));
                    }
                    next_progress += PROGRESS_PERIOD;
                }
                thread::sleep(POLICY_SAMPLE_PERIOD);
            }
            handles
                .into_iter()
                .map(|handle| {
                    handle.join().unwrap_or_else(|_| {
                        Err(LabError::Run("guest waiter thread panicked".into()))
                    })
                })
                .collect()
        });
        self.say(format_args!(
            "every guest reported {:.0} s after go",
            go.elapsed().as_secs_f64()
        ));
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
            result.host_bogo_ops_per_s = throughput.bogo_ops_per_s;
            result.host_bogo_ops_per_s_by_stressor = throughput.per_stressor;
        }

        // Scores and the pages, before the daemon stops.
        let mut guest_error = None;
        for ((running, output), share) in vms.iter_mut().zip(outputs).zip(shares) {
            running.record.vcpu_policy = share;
            let log = self.spec.out_dir.join(format!(
                "guest-{}-{}.log",
                self.config.name(),
                running.record.name
            ));
            let _ = fs::write(&log, running.guest.console().join("\n"));
            match output.and_then(|output| score(&running.record, &output)) {
                Ok(scored) => {
                    running.record.module = scored.module;
                    running.record.groups = scored.groups;
                    running.record.rounds = scored.rounds;
                    running.record.messages = scored.messages;
                    running.record.elapsed_s = scored.elapsed_s;
                    running.record.hackbench_s = scored.hackbench_s;
                    running.record.tail_rounds = scored.tail_rounds;
                    running.record.score = scored.score;
                    running.record.score_per_vcpu =
                        scored.score / f64::from(running.record.vcpus.max(1));
                }
                Err(error) => {
                    running.record.error = Some(error.to_string());
                    guest_error.get_or_insert(error);
                }
            }
            if let Some(page) = &running.page {
                let snapshot = page.snapshot();
                running.record.heartbeat_after = snapshot.guest_heartbeat;
                running.record.slots = snapshot.slots;
            }
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
            result.daemon_cpu_percent = daemon_cpu_percent;
            for running in vms.iter_mut() {
                if let Some(page) = &running.page {
                    let snapshot = page.snapshot();
                    for (kept, last) in running.record.slots.iter_mut().zip(snapshot.slots) {
                        *kept = kept.max(last);
                    }
                }
            }
        }
        match guest_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Waits until every guest module has attached (see [`configrun::wait_attached`]).
    fn wait_attached(&self, vms: &[RunningVm], hostd: &mut Option<Hostd>) -> Result<()> {
        let pages: Vec<Option<&PageReader>> =
            vms.iter().map(|running| running.page.as_ref()).collect();
        configrun::wait_attached(&pages, self.spec.module.is_some(), hostd, &|m| self.say(m))
    }
}

/// A guest's score, from its output.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Module status from init.
    pub module: Option<String>,
    /// Groups per round.
    pub groups: u32,
    /// Rounds completed.
    pub rounds: u64,
    /// Messages delivered.
    pub messages: u64,
    /// The window (s).
    pub elapsed_s: f64,
    /// hackbench's own time (s).
    pub hackbench_s: f64,
    /// Uncounted rounds in the tail.
    pub tail_rounds: Option<u64>,
    /// Messages per second.
    pub score: f64,
}

/// Checks the workload's exit code, parses its output and checks it ran on the VM's vCPUs.
pub fn score(vm: &VmScore, output: &GuestOutput) -> Result<Scored> {
    if output.exit_code != 0 {
        return Err(LabError::WorkloadFailed {
            name: vm.guest.clone(),
            code: output.exit_code,
            output: output.result.clone(),
        });
    }
    let run = parse_output(&output.result)?;
    if run.vcpus != vm.vcpus {
        return Err(LabError::Run(format!(
            "{}: the guest saw {} vCPUs, not the {} it was given",
            vm.name, run.vcpus, vm.vcpus
        )));
    }
    if run.rounds == 0 {
        return Err(LabError::Run(format!(
            "{}: no hackbench round completed in the window",
            vm.name
        )));
    }
    Ok(Scored {
        module: output.module.clone(),
        groups: run.groups,
        rounds: run.rounds,
        messages: run.messages,
        elapsed_s: run.elapsed_s,
        hackbench_s: run.hackbench_s,
        tail_rounds: run.tail_rounds,
        score: run.messages_per_s,
    })
}

/// `1 vCPU`, `4 vCPUs`.
pub fn vcpus_label(vcpus: u32) -> String {
    if vcpus == 1 {
        "1 vCPU".to_owned()
    } else {
        format!("{vcpus} vCPUs")
    }
}

fn number_cell(value: f64) -> String {
    if value > 0.0 && value.is_finite() {
        format!("{value:.0}")
    } else {
        "–".to_owned()
    }
}

/// The results table in Markdown: the run's parameters above, one row per VM figure and
/// one column per configuration, the inversion verdict per configuration below.
pub fn markdown(results: &OvercommitResults) -> String {
    let params = &results.params;
    let ordered = results.ordered();
    let accel = results
        .accelerator
        .map_or("unknown".to_owned(), |accel| accel.to_string());
    let bench = &params.benchmark;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Overcommit (seed 000): host load {load} on {cpus} host CPUs (host {kernel}); guests of {sizes} vCPUs \
         ({memory} MiB each) at once under {accel}, guest kernel {guest}; each runs \
         `hackbench -g <{gpv} × vCPUs> -f {fds} -l {loops} -s {datasize}` back to back for {duration} s \
         after {warmup} s of load, then uncounted rounds for {tail} s more. Score: messages per second over \
         the VM's window; one message is {operation}.\n",
        load = params.load.describe(),
        cpus = params.host_cpus,
        kernel = params.host_kernel,
        sizes = params
            .vm_vcpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        memory = params.memory_mib,
        guest = params.guest_kernel,
        gpv = bench.groups_per_vcpu,
        fds = bench.fds,
        loops = bench.loops,
        datasize = bench.datasize,
        duration = params.duration_s,
        warmup = params.warmup_s,
        tail = bench.tail_s,
        operation = params.operation,
    );
    let _ = write!(text, "| overcommit |");
    for result in &ordered {
        let _ = write!(text, " {} |", result.name);
    }
    let _ = write!(text, "\n|---|");
    for _ in &ordered {
        text.push_str("---:|");
    }
    text.push('\n');
    let mut row = |label: String, cell: &dyn Fn(&OvercommitConfigResult) -> String| {
        let _ = write!(text, "| {label} |");
        for result in &ordered {
            let _ = write!(text, " {} |", cell(result));
        }
        text.push('\n');
    };
    for (index, &vcpus) in params.vm_vcpus.iter().enumerate() {
        let vm = move |result: &OvercommitConfigResult| result.vms.get(index).cloned();
        let label = format!("vm{index} ({})", vcpus_label(vcpus));
        row(format!("{label}: messages/s"), &|r| {
            vm(r).map_or("–".to_owned(), |vm| number_cell(vm.score))
        });
        row(format!("{label}: per vCPU"), &|r| {
            vm(r).map_or("–".to_owned(), |vm| number_cell(vm.score_per_vcpu))
        });
        row(format!("{label}: rounds"), &|r| {
            vm(r).map_or("–".to_owned(), |vm| vm.rounds.to_string())
        });
    }
    row("larger VM below a smaller one (per VM)".into(), &|r| {
        verdict(r.inversion.as_ref()).to_owned()
    });
    row("the same per vCPU".into(), &|r| {
        verdict(r.per_vcpu_inversion.as_ref()).to_owned()
    });
    row(
        format!(
            "every counted round under full contention (windows ≤ {} s)",
            bench.run_s()
        ),
        &|r| match r.all_rounds_contended {
            Some(true) => "yes".to_owned(),
            Some(false) => "no".to_owned(),
            None => "–".to_owned(),
        },
    );
    row("host stress-ng (bogo-ops/s)".into(), &|r| {
        number_cell(r.host_bogo_ops_per_s)
    });
    row("boosts / throttles".into(), &|r| {
        if r.daemon {
            format!("{} / {}", r.boosts, r.throttles)
        } else {
            "–".to_owned()
        }
    });
    row("applied changes (daemon)".into(), &|r| {
        r.applies.map_or("–".to_owned(), |n| n.to_string())
    });
    row("daemon CPU (% of one CPU)".into(), &|r| {
        r.daemon_cpu_percent
            .map_or("–".to_owned(), |p| format!("{p:.2}"))
    });
    row("vCPU threads RT (% of samples)".into(), &|r| {
        r.rt_fraction
            .map_or("–".to_owned(), |f| format!("{:.0}", f * 100.0))
    });
    row(
        "guest RAM shared (introspection key known)".into(),
        &|r| match (r.shared_ram, r.daemon_knows_introspection) {
            (false, _) => "no".to_owned(),
            (true, Some(true)) => "yes (yes)".to_owned(),
            (true, Some(false)) => "yes (no)".to_owned(),
            (true, None) => "yes (?)".to_owned(),
        },
    );
    row(
        "status".into(),
        &|r| match (&r.error, r.leftover_rt_threads.is_empty()) {
            (Some(_), _) => "failed".into(),
            (None, false) => "left RT threads".into(),
            (None, true) => "ok".into(),
        },
    );
    text.push_str("\nInversion (a VM with more vCPUs scoring below one with fewer, per VM as in seed 000):\n\n");
    for result in &ordered {
        let pairs = result
            .inversion
            .as_ref()
            .map(|inversion| {
                inversion
                    .pairs
                    .iter()
                    .map(|pair| {
                        format!(
                            "{} ({}) {:.0} < {} ({}) {:.0} messages/s",
                            pair.larger,
                            vcpus_label(pair.larger_vcpus),
                            pair.larger_score,
                            pair.smaller,
                            vcpus_label(pair.smaller_vcpus),
                            pair.smaller_score
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            text,
            "- {}: {}{}",
            result.name,
            verdict(result.inversion.as_ref()),
            if pairs.is_empty() {
                String::new()
            } else {
                format!(": {pairs}")
            }
        );
    }
    let failures: Vec<&&OvercommitConfigResult> =
        ordered.iter().filter(|r| r.error.is_some()).collect();
    if !failures.is_empty() {
        text.push_str("\nFailed configurations:\n\n");
        for result in failures {
            let first_line = result
                .error
                .as_deref()
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default();
            let _ = writeln!(text, "- {}: {first_line}", result.name);
        }
    }
    text
}

/// Files written by [`write_all`].
#[derive(Debug, Clone)]
pub struct OvercommitFiles {
    /// `results.json`.
    pub json: PathBuf,
    /// `results.md`.
    pub markdown: PathBuf,
    /// The SVG plots (score per VM, score per vCPU).
    pub plots: Vec<PathBuf>,
}

/// Writes `results.json`, `results.md`, `overcommit-score.svg` and
/// `overcommit-score-per-vcpu.svg` into `dir`.
pub fn write_all(results: &OvercommitResults, dir: &Path) -> Result<OvercommitFiles> {
    fs::create_dir_all(dir).map_err(LabError::io("create", dir))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(results)
        .map_err(|error| LabError::Run(format!("serializing results: {error}")))?;
    fs::write(&json, text + "\n").map_err(LabError::io("write", &json))?;
    let markdown_path = dir.join("results.md");
    fs::write(&markdown_path, markdown(results)).map_err(LabError::io("write", &markdown_path))?;
    let accel = results
        .accelerator
        .map_or("unknown".to_owned(), |accel| accel.to_string());
    let mut plots = Vec::new();
    for (per_vcpu, file, what) in [
        (false, "overcommit-score.svg", "per VM"),
        (true, "overcommit-score-per-vcpu.svg", "per vCPU"),
    ] {
        let groups: Vec<(String, Vec<(String, f64)>)> = results
            .ordered()
            .iter()
            .map(|result| {
                (
                    result.name.clone(),
                    result
                        .vms
                        .iter()
                        .map(|vm| {
                            (
                                format!("{} ({})", vm.name, vcpus_label(vm.vcpus)),
                                if per_vcpu {
                                    vm.score_per_vcpu
                                } else {
                                    vm.score
                                },
                            )
                        })
                        .collect(),
                )
            })
            .collect();
        let load = &results.params.load;
        let title = format!(
            "hackbench score {what}, {accel}, host load {} CPU workers at {}%",
            load.cpu,
            load.cpu_load.unwrap_or(100)
        );
        let path = dir.join(file);
        fs::write(
            &path,
            bar_chart_svg(&title, &format!("messages/s {what}"), &groups),
        )
        .map_err(LabError::io("write", &path))?;
        plots.push(path);
    }
    Ok(OvercommitFiles {
        json,
        markdown: markdown_path,
        plots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest's result section as the lab host received it: the 4-vCPU guest of a quick
    /// vanilla run under TCG on the 2-CPU development machine at 80% host load.
    const OUTPUT_4VCPU: &str = include_str!("../tests/fixtures/console-hackbench-tcg-4vcpu.txt");

    fn result_section(console: &str) -> GuestOutput {
        let lines: Vec<&str> = console.lines().collect();
        let begin = lines
            .iter()
            .position(|line| line.starts_with("PVSCHED-LAB RESULT BEGIN"))
            .expect("result begin");
        let end = lines
            .iter()
            .position(|line| line.starts_with("PVSCHED-LAB RESULT END"))
            .expect("result end");
        GuestOutput {
            workload: "hackbench".into(),
            exit_code: 0,
            result: lines[begin + 1..end].join("\n"),
            diagnostics: String::new(),
            module: Some("loaded".into()),
            run_ms: 0,
        }
    }

    fn vm(name: &str, vcpus: u32, score: f64) -> VmScore {
        VmScore {
            name: name.into(),
            vcpus,
            score,
            score_per_vcpu: score / f64::from(vcpus),
            rounds: 3,
            ..VmScore::default()
        }
    }

    #[test]
    fn a_recorded_guest_output_scores_messages_per_second_of_its_window() {
        let output = result_section(OUTPUT_4VCPU);
        let run = parse_output(&output.result).expect("parse");
        assert_eq!(run.vcpus, 4);
        assert_eq!(run.groups, 4);
        assert_eq!((run.fds, run.datasize), (20, 100));
        assert!(run.rounds > 0);
        assert_eq!(
            run.messages,
            run.rounds * u64::from(run.groups) * 20 * 20 * u64::from(run.loops)
        );
        assert!(run.elapsed_s > 0.0 && run.hackbench_s > 0.0);
        assert!(run.hackbench_s <= run.elapsed_s, "{run:?}");
        assert!((run.messages_per_s - run.messages as f64 / run.elapsed_s).abs() < 1e-9);

        assert!(run.tail_rounds.is_some(), "{run:?}");
        let scored = score(&vm("vm0", 4, 0.0), &output).expect("score");
        assert_eq!(scored.rounds, run.rounds);
        assert_eq!(scored.tail_rounds, run.tail_rounds);
        assert_eq!(scored.score, run.messages_per_s);
        assert_eq!(scored.module.as_deref(), Some("loaded"));
        // The guest saw 4 vCPUs: given 2, the run is refused.
        assert!(score(&vm("vm1", 2, 0.0), &output).is_err());
        // A failed workload is an error, whatever it printed.
        let failed = GuestOutput {
            exit_code: 1,
            ..output
        };
        assert!(score(&vm("vm0", 4, 0.0), &failed).is_err());
    }

    #[test]
    fn the_inversion_compares_every_larger_vm_with_every_smaller_one() {
        let vms = [
            vm("vm0", 4, 900.0),
            vm("vm1", 2, 1000.0),
            vm("vm2", 1, 600.0),
        ];
        let per_vm = inversion(&vms, false).expect("measured");
        assert!(per_vm.present);
        assert_eq!(per_vm.pairs.len(), 1);
        assert_eq!(
            (
                per_vm.pairs[0].larger.as_str(),
                per_vm.pairs[0].smaller.as_str()
            ),
            ("vm0", "vm1")
        );
        // Per vCPU: 225 < 500 < 600.
        let per_vcpu = inversion(&vms, true).expect("measured");
        assert_eq!(per_vcpu.pairs.len(), 3);
        let scaling = [
            vm("vm0", 4, 2000.0),
            vm("vm1", 2, 1000.0),
            vm("vm2", 1, 600.0),
        ];
        assert!(!inversion(&scaling, false).expect("measured").present);
        // A VM that did not score is left out; one size alone is no comparison.
        let mut failed = vms.clone();
        failed[1].error = Some("boot timeout".into());
        assert!(!inversion(&failed, false).expect("measured").present);
        assert_eq!(inversion(&[vm("a", 2, 1.0), vm("b", 2, 5.0)], false), None);
        assert_eq!(inversion(&[], false), None);
        assert_eq!(verdict(Some(&per_vm)), "inversion present");
        assert_eq!(
            verdict(inversion(&scaling, false).as_ref()),
            "inversion absent"
        );
        assert_eq!(verdict(None), "inversion not measured");
    }

    #[test]
    fn rounds_count_as_contended_while_every_guest_can_still_be_running() {
        let benchmark = HackbenchParams {
            duration_s: 15,
            tail_s: 10,
            ..HackbenchParams::default()
        };
        let window = |elapsed_s: f64| VmScore {
            elapsed_s,
            ..vm("vm", 2, 100.0)
        };
        assert_eq!(
            all_rounds_contended(&[window(16.0), window(25.0)], &benchmark),
            Some(true)
        );
        // A window that ran past the others' tail had the host partly to itself.
        assert_eq!(
            all_rounds_contended(&[window(16.0), window(25.5)], &benchmark),
            Some(false)
        );
        let mut failed = window(16.0);
        failed.error = Some("no round".into());
        failed.rounds = 0;
        assert_eq!(
            all_rounds_contended(&[window(16.0), failed.clone()], &benchmark),
            Some(false)
        );
        assert_eq!(all_rounds_contended(&[failed], &benchmark), None);
    }

    fn results() -> OvercommitResults {
        let vms = vec![vm("vm0", 4, 900.0), vm("vm1", 2, 1000.0)];
        let config = |name: &str, vms: Vec<VmScore>| OvercommitConfigResult {
            name: name.into(),
            daemon: name != "vanilla",
            shared_ram: name == "pvsched-introspect",
            inversion: inversion(&vms, false),
            per_vcpu_inversion: inversion(&vms, true),
            daemon_knows_introspection: (name != "vanilla").then_some(false),
            vms,
            ..OvercommitConfigResult::default()
        };
        let configs = [
            config("vanilla", vms.clone()),
            config("pvsched", vec![vm("vm0", 4, 1900.0), vm("vm1", 2, 1000.0)]),
            config("pvsched-introspect", vms),
        ];
        OvercommitResults {
            experiment: EXPERIMENT.into(),
            version: RESULTS_VERSION,
            accelerator: Some(Accelerator::Tcg),
            kvm_fallback: None,
            params: OvercommitParams {
                quick: true,
                vm_vcpus: vec![4, 2],
                memory_mib: 256,
                duration_s: 15,
                warmup_s: 2,
                load: LoadSpec::cpu_at(2, 80),
                benchmark: HackbenchParams::default(),
                operation: OPERATION.into(),
                module_params: "enable=1".into(),
                hostd_period_us: 1000,
                hostd_rt_prio: 10,
                host_cpus: 2,
                host_kernel: "6.1".into(),
                guest_kernel: "6.1.0-57-cloud-amd64".into(),
                configs: configs.iter().map(|c| c.name.clone()).collect(),
            },
            configs: configs.into_iter().map(|c| (c.name.clone(), c)).collect(),
            elapsed_s: 100.0,
        }
    }

    #[test]
    fn the_results_schema_has_scores_per_vm_and_the_run_parameters() {
        let results = results();
        let json: serde_json::Value = serde_json::to_value(&results).expect("serialize");
        assert_eq!(json["experiment"], "overcommit");
        assert_eq!(json["accelerator"], "tcg");
        assert_eq!(json["params"]["host_cpus"], 2);
        assert_eq!(json["params"]["load"]["cpu"], 2);
        assert_eq!(json["params"]["load"]["cpu_load"], 80);
        assert_eq!(json["params"]["guest_kernel"], "6.1.0-57-cloud-amd64");
        assert_eq!(json["params"]["vm_vcpus"], serde_json::json!([4, 2]));
        let vms = json["configs"]["vanilla"]["vms"]
            .as_array()
            .expect("vms list");
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0]["name"], "vm0");
        assert_eq!(vms[0]["vcpus"], 4);
        assert_eq!(vms[0]["score"], 900.0);
        assert_eq!(vms[0]["score_per_vcpu"], 225.0);
        assert_eq!(json["configs"]["vanilla"]["inversion"]["present"], true);
        assert_eq!(json["configs"]["pvsched"]["inversion"]["present"], false);
        assert_eq!(json["configs"]["pvsched-introspect"]["shared_ram"], true);
        let back: OvercommitResults = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, results);
    }

    #[test]
    fn the_table_says_per_configuration_whether_the_inversion_is_there() {
        let results = results();
        let text = markdown(&results);
        assert!(
            text.contains("| overcommit | vanilla | pvsched | pvsched-introspect |"),
            "{text}"
        );
        assert!(
            text.contains("| vm0 (4 vCPUs): messages/s | 900 | 1900 | 900 |"),
            "{text}"
        );
        assert!(
            text.contains("| vm0 (4 vCPUs): per vCPU | 225 | 475 | 225 |"),
            "{text}"
        );
        assert!(
            text.contains("| larger VM below a smaller one (per VM) | inversion present | inversion absent | inversion present |"),
            "{text}"
        );
        assert!(
            text.contains(
                "- vanilla: inversion present: vm0 (4 vCPUs) 900 < vm1 (2 vCPUs) 1000 messages/s"
            ),
            "{text}"
        );
        assert!(text.contains("- pvsched: inversion absent\n"), "{text}");
        assert!(
            text.contains("stress-ng --cpu 2 --cpu-load 80 on 2 host CPUs"),
            "{text}"
        );
        assert!(text.contains("yes (no)"), "{text}");

        let dir = std::env::temp_dir().join(format!("pvsched-overcommit-{}", std::process::id()));
        let files = write_all(&results, &dir).expect("write");
        let svg = fs::read_to_string(&files.plots[0]).expect("plot");
        // Three configurations × two VMs.
        assert!(svg.contains(">1900<"), "{svg}");
        assert_eq!(svg.matches("<title>").count(), 6);
        let back: OvercommitResults =
            serde_json::from_str(&fs::read_to_string(&files.json).expect("json")).expect("parse");
        assert_eq!(back, results);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn configurations_and_parameters() {
        assert_eq!(
            OvercommitConfig::ALL.map(OvercommitConfig::name),
            ["vanilla", "pvsched", "pvsched-introspect"]
        );
        for config in OvercommitConfig::ALL {
            assert_eq!(OvercommitConfig::parse(config.name()), Some(config));
        }
        assert_eq!(OvercommitConfig::parse("static-rt"), None);
        assert!(!OvercommitConfig::Vanilla.runs_daemon());
        assert!(OvercommitConfig::Pvsched.runs_daemon() && !OvercommitConfig::Pvsched.shared_ram());
        assert!(OvercommitConfig::PvschedIntrospect.shared_ram());
        let mut params = results().params;
        assert!(validate(&params).is_ok());
        params.vm_vcpus = vec![];
        assert!(validate(&params).is_err());
        params.vm_vcpus = vec![4, 0];
        assert!(validate(&params).is_err());
        params.vm_vcpus = vec![4];
        params.load.cpu_load = Some(0);
        assert!(validate(&params).is_err());
    }
}
