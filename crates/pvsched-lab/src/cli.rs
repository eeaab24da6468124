//! `pvsched lab`: the command-line front of the experiment.

use std::path::{Path, PathBuf};

use crate::assets::{
    ensure_kernel_modules, AssetOptions, LabAssets, DEFAULT_CACHE_DIR, VIRTIO_BLK_MODULES,
};
use crate::check;
use crate::error::{LabError, Result};
use crate::experiment::{default_load, run_experiment, ExperimentSpec};
use crate::guestlock::{self, GuestLockConfig, GuestLockParams, GuestLockSpec};
use crate::hackbench::HackbenchParams;
use crate::hostd::{knows_daemon_key, probe, HostdSpec};
use crate::hostload::LoadSpec;
use crate::iothread::{self, IothreadConfig, IothreadParams, IothreadSpec};
use crate::isolation::{self, IsolationConfig, IsolationParams, IsolationSpec};
use crate::kmod::{build_guest_module, build_guest_tool};
use crate::median;
use crate::overcommit::{self, OvercommitConfig, OvercommitParams, OvercommitSpec};
use crate::qemu::{missing_prerequisites, AccelChoice};
use crate::report::{markdown, write_all};
use crate::results::{Channel, Configuration, LabResults, RunParams, Scheduling};

/// Measured seconds per configuration with `--quick` (all seven in about 3.5 minutes here).
pub const QUICK_DURATION_S: u32 = 15;
/// Measured seconds per configuration by default (all seven in about 9 minutes here).
pub const DEFAULT_DURATION_S: u32 = 70;
/// Most runs `--repeat` accepts.
pub const MAX_REPEAT: u32 = 20;
/// vCPUs per guest of the latency experiment when `--vcpus` is not given.
pub const DEFAULT_VCPUS: u32 = 2;

/// Accelerator selection on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    /// KVM when it boots a guest, TCG otherwise.
    Auto,
    /// KVM only.
    Kvm,
    /// TCG only.
    Tcg,
}

/// The experiments `pvsched lab` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Experiment {
    /// Guest and host latency (cyclictest) under every scheduling configuration.
    Latency,
    /// Seed 000: guests of different sizes run hackbench at once on a host at 80% CPU;
    /// does a bigger VM score below a smaller one?
    Overcommit,
    /// cyclictest in a 1-vCPU guest: idle host, loaded host, and the vCPU thread on a CPU
    /// isolated by `pvsched isolate`'s code (QEMU's main thread on housekeeping, or
    /// isolated too); the undo must restore every host value.
    Isolation,
    /// User-level locks in one guest on a loaded host (`pvsched-guest lock-bench`: spin,
    /// futex and the pvsched lock), with and without the daemon's host lines.
    GuestLock,
    /// Seed 004: a guest's virtio-blk disk on QEMU's main loop or on an IOThread, with
    /// random O_DIRECT reads and cyclictest on one vCPU and hogs on the others.
    Iothread,
}

/// Run the side-by-side experiment on real guests: vanilla, static-rt (vCPU threads FIFO by
/// hand), static-rt-all (every QEMU thread FIFO) and pvsched (the daemon), and vanilla,
/// static-rt and pvsched again with a rogue guest, on a busy host. Writes results.json,
/// results.md and latency CDF plots to --out and prints the table; with --repeat N, each
/// run under --out/run-K/ and the medians in --out. `--experiment overcommit` runs seed
/// 000's overcommitted host instead (hackbench scores of guests of --vm-vcpus sizes);
/// `--experiment guest-lock` the guest user-space locks (spin, futex, pvsched) on a busy host;
/// `--experiment iothread` a guest's disk on QEMU's main loop against an IOThread;
/// `--experiment isolation` cyclictest in a 1-vCPU guest with and without an isolated CPU.
#[derive(Debug, Clone, clap::Args)]
pub struct LabArgs {
    /// The experiment: `latency` (cyclictest under the configurations of --configs),
    /// `overcommit` (guests of --vm-vcpus sizes run hackbench at once on a host at
    /// --cpu-load; configurations vanilla, pvsched, pvsched-introspect), `guest-lock`
    /// (`pvsched-guest lock-bench`, freshness and boost-probe in one guest on a busy host;
    /// configurations vanilla, pvsched, pvsched-doorbell), `iothread` (random disk
    /// reads and cyclictest on vCPU 0 of one guest, hogs on the others; configurations
    /// main-loop, iothread, iothread-rt) or `isolation` (cyclictest in a 1-vCPU guest;
    /// configurations idle, shared, isolated, isolated-main).
    #[arg(long, value_enum, default_value_t = Experiment::Latency)]
    pub experiment: Experiment,
    /// Short run for CI: the default configurations in about 3.5 minutes (15 s measured
    /// each); with `--experiment overcommit`, a 15 s window and a 10 s tail per configuration;
    /// with `--experiment guest-lock`, 5 s per lock; with `--experiment iothread`, 10 s per
    /// configuration; with `--experiment isolation`, 15 s per configuration.
    #[arg(long)]
    pub quick: bool,
    /// Configurations to run, comma-separated: idle, vanilla, static-rt, static-rt-all,
    /// pvsched, pvsched-doorbell, pvsched-dl, rogue-vanilla, rogue-static-rt, rogue-pvsched,
    /// rogue-pvsched-dl [default: all but pvsched-dl and rogue-pvsched-dl]; with `--experiment overcommit`:
    /// vanilla, pvsched, pvsched-introspect [default: all three]; with `--experiment
    /// guest-lock`: vanilla, pvsched, pvsched-doorbell [default: vanilla, pvsched]; with
    /// `--experiment iothread`: main-loop, iothread, iothread-rt [default: all three]; with
    /// `--experiment isolation`: idle, shared, isolated, isolated-main [default: all four].
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
    /// Overcommit: vCPUs of each guest, comma-separated; the guests run at once
    /// [default: 4,2,1].
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    pub vm_vcpus: Vec<u32>,
    /// Overcommit, guest-lock and iothread: the load of each stress-ng CPU worker in % (`--cpu-load`;
    /// one worker per host CPU, or --load-cpus, and no other stressor) [overcommit default:
    /// 80; guest-lock default: the lab's default load].
    #[arg(long, value_name = "PERCENT")]
    pub cpu_load: Option<u32>,
    /// Overcommit: hackbench groups per vCPU in every guest (a round runs
    /// groups × 20 senders and 20 receivers).
    #[arg(long, default_value_t = HackbenchParams::default().groups_per_vcpu)]
    pub hackbench_groups_per_vcpu: u32,
    /// Overcommit: hackbench `--loops` (messages every sender writes to every receiver of
    /// its group in a round).
    #[arg(long, default_value_t = HackbenchParams::default().loops)]
    pub hackbench_loops: u32,
    /// Overcommit: seconds of uncounted rounds after the window, so that guests whose last
    /// counted round runs late still compete with all the others [default: 15, or 10 with
    /// --quick].
    #[arg(long, value_name = "S")]
    pub hackbench_tail_s: Option<u32>,
    /// Run the whole configuration set N times: each run's results go to --out/run-K/, the
    /// median of every figure and goal over the runs (with its min–max range) to
    /// --out/results.md and --out/results.json.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub repeat: u32,
    /// vCPUs per guest (at least 2 for the rogue configurations and iothread) [default: 2;
    /// guest-lock: the host's CPUs].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guests per configuration; with a rogue configuration only the first guest is rogue.
    #[arg(long, default_value_t = 1)]
    pub guests: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u32,
    /// cyclictest interval in microseconds (guest and host).
    #[arg(long, default_value_t = 1000)]
    pub interval_us: u32,
    /// Measured seconds per configuration [default: 70, or 15 with --quick; overcommit: 60,
    /// or 15 with --quick; guest-lock: seconds per lock, 20, or 5 with --quick; iothread: 30,
    /// or 10 with --quick; isolation: 60, or 15 with --quick].
    #[arg(long)]
    pub duration_s: Option<u32>,
    /// Seconds of host load before measuring starts.
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u32,
    /// stress-ng --cpu workers [default: host CPUs]; with 0 and --no-load-extras the host
    /// is idle.
    #[arg(long)]
    pub load_cpus: Option<u32>,
    /// Leave out the iomix, vm and fork stressors (only --load-cpus CPU workers).
    #[arg(long)]
    pub no_load_extras: bool,
    /// stress-ng --vm-bytes in MiB.
    #[arg(long, default_value_t = 128)]
    pub load_vm_mib: u32,
    /// FIFO priority of cyclictest in the guest.
    #[arg(long, default_value_t = 90)]
    pub guest_rt_prio: u8,
    /// FIFO priority of every vCPU thread under static-rt, of the IOThread under
    /// iothread's iothread-rt, and of the vCPU thread in every configuration of
    /// `--experiment isolation` (the daemon's default top boost priority is 8).
    #[arg(long, default_value_t = 8)]
    pub static_rt_prio: u8,
    /// Run the static-rt-all baseline (every QEMU thread FIFO at --static-rt-prio, since
    /// pvsched boosts QEMU's main thread too and under TCG the main loop fires the guest
    /// timers). It is in the default set; with --configs this adds it.
    #[arg(long)]
    pub static_rt_all_threads: bool,
    /// FIFO priority of the host cyclictest (low, so RT vCPU threads above it show).
    #[arg(long, default_value_t = 1)]
    pub host_rt_prio: u8,
    /// Parameters for insmod of the guest module.
    #[arg(long, default_value = "enable=1")]
    pub module_params: String,
    /// The daemon's loop period in microseconds.
    #[arg(long, default_value_t = 1000)]
    pub hostd_period_us: u64,
    /// FIFO priority the daemon runs at (0: normal). Above the boost range (default top
    /// boost priority 8), so it can always run to unboost and throttle.
    #[arg(long, default_value_t = 10)]
    pub hostd_rt_prio: u8,
    /// A TOML file appended to the generated daemon configuration (e.g. a [policy] table).
    #[arg(long)]
    pub hostd_extra: Option<PathBuf>,
    /// The guest-daemon channel of the daemon's configurations: `plain` (ivshmem-plain
    /// on a shared file, polled) or `doorbell` (ivshmem-doorbell served by the daemon,
    /// which runs event-driven).
    #[arg(long, value_enum, default_value_t = Channel::Plain)]
    pub channel: Channel,
    /// The pvsched binary that runs `hostd` [default: this executable].
    #[arg(long)]
    pub pvsched_bin: Option<PathBuf>,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Results directory.
    #[arg(long, default_value = "lab-results")]
    pub out: PathBuf,
    /// Cache of guest kernels.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// The guest module's source directory [default: guest/kmod of this source tree, or of
    /// the current directory].
    #[arg(long)]
    pub kmod_dir: Option<PathBuf>,
    /// Do not install missing Debian packages.
    #[arg(long)]
    pub no_install: bool,
    /// Do not run anything: check a results.json (or a results directory) and fail when a
    /// must-hold property does not hold.
    #[arg(long, value_name = "RESULTS")]
    pub check: Option<PathBuf>,
    /// Guest-lock: the pvsched lock's trust limit on a host line's age, in ms of guest time
    /// (`lock-bench --max-age-ms`).
    #[arg(long, default_value_t = guestlock::DEFAULT_MAX_AGE_MS, value_name = "MS")]
    pub lock_max_age_ms: u64,
    /// Guest-lock and iothread: the `pvsched-guest` binary to put in the guest [default: built from this
    /// source tree with `cargo build --release -p pvsched-guest` into target/guest-tool].
    #[arg(long, value_name = "PATH")]
    pub guest_tool: Option<PathBuf>,
}

/// Runs `pvsched lab` (or `--check`).
pub fn run(args: LabArgs) -> Result<()> {
    if let Some(path) = &args.check {
        return run_check(path);
    }
    if args.experiment == Experiment::Overcommit {
        return run_overcommit(&args);
    }
    if args.experiment == Experiment::GuestLock {
        return run_guest_lock(&args);
    }
    if args.experiment == Experiment::Iothread {
        return run_iothread(&args);
    }
    if args.experiment == Experiment::Isolation {
        return run_isolation(&args);
    }
    if !args.vm_vcpus.is_empty() {
        return Err(LabError::InvalidConfig(
            "--vm-vcpus belongs to --experiment overcommit".into(),
        ));
    }
    let mut configs = parse_configs(&args.configs)?;
    if args.static_rt_all_threads {
        add_static_rt_all(&mut configs);
    }
    if args.repeat == 0 || args.repeat > MAX_REPEAT {
        return Err(LabError::InvalidConfig(format!(
            "--repeat {} is out of range 1..={MAX_REPEAT}",
            args.repeat
        )));
    }
    let vcpus = args.vcpus.unwrap_or(DEFAULT_VCPUS);
    if vcpus < 2 && configs.iter().any(|config| config.rogue) {
        return Err(LabError::InvalidConfig(format!(
            "--vcpus {vcpus}: the rogue configurations need at least 2 vCPUs (one busy, one measuring)"
        )));
    }
    let host_cpus = host_cpus();
    let duration_s = args.duration_s.unwrap_or(if args.quick {
        QUICK_DURATION_S
    } else {
        DEFAULT_DURATION_S
    });
    let mut load = default_load(args.load_cpus.unwrap_or(host_cpus));
    load.vm_mib = args.load_vm_mib;
    if args.no_load_extras {
        load = LoadSpec {
            iomix: 0,
            vm: 0,
            fork: 0,
            ..load
        };
    }

    let assets = prepare_lab(&args)?;
    let kmod_dir = args.kmod_dir.clone().unwrap_or_else(default_kmod_dir);
    let module = build_guest_module(&kmod_dir, &assets.kernel_headers)?;

    let hostd = if configs.iter().any(|config| config.scheduling.runs_daemon()) {
        hostd_spec(&args)
    } else {
        Err("no pvsched configuration requested".into())
    };
    if let Err(reason) = &hostd {
        if configs.iter().any(|config| config.scheduling.runs_daemon()) {
            eprintln!("pvsched lab: WARNING: the pvsched configurations will fail: {reason}");
        }
    }

    let params = RunParams {
        quick: args.quick,
        vcpus,
        guests: args.guests.max(1),
        memory_mib: args.memory_mib,
        interval_us: args.interval_us,
        duration_s,
        warmup_s: args.warmup_s,
        guest_rt_prio: args.guest_rt_prio,
        static_rt_prio: args.static_rt_prio,
        static_rt_all_threads: args.static_rt_all_threads,
        channel: args.channel,
        host_cyclictest_prio: args.host_rt_prio,
        load,
        module_params: args.module_params.clone(),
        hostd_period_us: args.hostd_period_us,
        hostd_rt_prio: args.hostd_rt_prio,
        hostd_policy: hostd
            .as_ref()
            .ok()
            .and_then(|spec| pvsched_host::HostConfig::from_toml(&spec.extra_toml).ok())
            .map(|cfg| cfg.policy),
        host_cpus,
        host_kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        guest_kernel: assets.kernel_release.clone(),
        configs: configs.iter().map(|config| config.name()).collect(),
    };
    let mut spec = ExperimentSpec {
        params,
        configs,
        accel: args.accel.into(),
        module: Some(module),
        hostd,
        out_dir: args.out.clone(),
        run_dir: lab_run_dir(),
    };
    if args.repeat == 1 {
        let results = run_once(&assets, &spec)?;
        print_results(&results);
        return Ok(());
    }

    let started = std::time::Instant::now();
    let mut runs = Vec::new();
    let mut files = Vec::new();
    let scratch = spec.run_dir.clone();
    for index in 1..=args.repeat {
        let dir = format!("run-{index}");
        spec.out_dir = args.out.join(&dir);
        spec.run_dir = scratch.join(&dir);
        let elapsed = started.elapsed().as_secs();
        let left = if index > 1 {
            format!(
                ", about {} min left",
                (elapsed / u64::from(index - 1) * u64::from(args.repeat - index + 1)).div_ceil(60)
            )
        } else {
            String::new()
        };
        eprintln!(
            "== pvsched lab: run {index}/{} into {} ({:02}:{:02} elapsed{left})",
            args.repeat,
            spec.out_dir.display(),
            elapsed / 60,
            elapsed % 60
        );
        let results = run_once(&assets, &spec)?;
        let failed = check::check(&results)
            .iter()
            .filter(|item| !item.passed)
            .count();
        eprintln!(
            "== pvsched lab: run {index}/{} done; {failed} checks failed",
            args.repeat
        );
        runs.push(results);
        files.push(format!("{dir}/results.json"));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let summary = median::summarise(&runs, &files);
    let written = median::write(&summary, &args.out)?;
    println!("\n{}", median::markdown(&summary));
    println!("Checks of every run (asserted in CI by scripts/lab-check):");
    let mut failed = 0;
    for (results, file) in runs.iter().zip(&files) {
        for mut item in check::check(results) {
            item.check = format!("{file}: {}", item.check);
            failed += usize::from(!item.passed);
            if !item.passed {
                check::print(std::slice::from_ref(&item));
            }
        }
    }
    println!("{failed} checks failed over {} runs", runs.len());
    println!(
        "\nwrote {} and {} (medians of {})",
        written.json.display(),
        written.markdown.display(),
        files.join(", ")
    );
    Ok(())
}

/// The parameters of `--experiment overcommit` from the command line.
fn overcommit_params(args: &LabArgs, configs: &[OvercommitConfig]) -> Result<OvercommitParams> {
    let refuse = |what: &str| {
        Err(LabError::InvalidConfig(format!(
            "{what} does not apply to --experiment overcommit"
        )))
    };
    if args.repeat != 1 {
        return refuse("--repeat");
    }
    if args.channel != Channel::Plain {
        return refuse("--channel doorbell");
    }
    if args.static_rt_all_threads {
        return refuse("--static-rt-all-threads");
    }
    let host_cpus = host_cpus();
    let params = OvercommitParams {
        quick: args.quick,
        vm_vcpus: if args.vm_vcpus.is_empty() {
            overcommit::DEFAULT_VM_VCPUS.to_vec()
        } else {
            args.vm_vcpus.clone()
        },
        memory_mib: args.memory_mib,
        duration_s: args.duration_s.unwrap_or(if args.quick {
            overcommit::QUICK_DURATION_S
        } else {
            overcommit::DEFAULT_DURATION_S
        }),
        warmup_s: args.warmup_s,
        load: LoadSpec::cpu_at(
            args.load_cpus.unwrap_or(host_cpus),
            args.cpu_load.unwrap_or(overcommit::DEFAULT_CPU_LOAD),
        ),
        benchmark: HackbenchParams {
            duration_s: 0,
            tail_s: args.hackbench_tail_s.unwrap_or(if args.quick {
                overcommit::QUICK_TAIL_S
            } else {
                overcommit::DEFAULT_TAIL_S
            }),
            groups_per_vcpu: args.hackbench_groups_per_vcpu,
            loops: args.hackbench_loops,
            ..HackbenchParams::default()
        },
        operation: overcommit::OPERATION.to_owned(),
        module_params: args.module_params.clone(),
        hostd_period_us: args.hostd_period_us,
        hostd_rt_prio: args.hostd_rt_prio,
        host_cpus,
        host_kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        guest_kernel: String::new(),
        configs: configs
            .iter()
            .map(|config| config.name().to_owned())
            .collect(),
    };
    let params = OvercommitParams {
        benchmark: HackbenchParams {
            duration_s: params.duration_s,
            ..params.benchmark
        },
        ..params
    };
    overcommit::validate(&params)?;
    Ok(params)
}

/// Parses `--configs` of an experiment whose configurations are `all`
/// (empty: `default`), in the order given, each once.
fn parse_experiment_configs<C: Copy + PartialEq>(
    names: &[String],
    experiment: &str,
    all: &[C],
    default: &[C],
    name_of: fn(C) -> &'static str,
) -> Result<Vec<C>> {
    if names.is_empty() {
        return Ok(default.to_vec());
    }
    let mut configs = Vec::new();
    for name in names
        .iter()
        .map(|name| name.trim())
        .filter(|n| !n.is_empty())
    {
        let config = all
            .iter()
            .copied()
            .find(|&config| name_of(config) == name)
            .ok_or_else(|| {
                LabError::InvalidConfig(format!(
                    "unknown {experiment} configuration {name:?}; known: {}",
                    all.iter()
                        .map(|&c| name_of(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        if !configs.contains(&config) {
            configs.push(config);
        }
    }
    Ok(configs)
}

/// Parses `--configs` of the overcommit experiment (empty: all).
fn parse_overcommit_configs(names: &[String]) -> Result<Vec<OvercommitConfig>> {
    parse_experiment_configs(
        names,
        "overcommit",
        &OvercommitConfig::ALL,
        &OvercommitConfig::ALL,
        OvercommitConfig::name,
    )
}

/// `pvsched lab --experiment overcommit`.
fn run_overcommit(args: &LabArgs) -> Result<()> {
    let configs = parse_overcommit_configs(&args.configs)?;
    let mut params = overcommit_params(args, &configs)?;
    let assets = prepare_lab(args)?;
    params.guest_kernel = assets.kernel_release.clone();
    let kmod_dir = args.kmod_dir.clone().unwrap_or_else(default_kmod_dir);
    let module = build_guest_module(&kmod_dir, &assets.kernel_headers)?;
    let run_dir = lab_run_dir();
    let wants_daemon = configs.iter().any(|config| config.runs_daemon());
    let hostd = if wants_daemon {
        hostd_spec(args)
    } else {
        Err("no pvsched configuration requested".into())
    };
    let daemon_knows_introspection = match &hostd {
        Ok(spec) => {
            match knows_daemon_key(&spec.program, "introspection", "true", &run_dir) {
                Ok(known) => Some(known),
                Err(error) => {
                    eprintln!("pvsched lab: WARNING: could not ask the daemon about introspection: {error}");
                    None
                }
            }
        }
        Err(reason) => {
            if wants_daemon {
                eprintln!("pvsched lab: WARNING: the pvsched configurations will fail: {reason}");
            }
            None
        }
    };
    if daemon_knows_introspection == Some(false)
        && configs.contains(&OvercommitConfig::PvschedIntrospect)
    {
        eprintln!(
            "pvsched lab: this daemon has no [daemon] introspection key: pvsched-introspect shares the guests' RAM, but the daemon will not read it"
        );
    }
    let spec = OvercommitSpec {
        params,
        configs,
        accel: args.accel.into(),
        module: Some(module),
        hostd,
        daemon_knows_introspection,
        out_dir: args.out.clone(),
        run_dir,
    };
    finish(
        overcommit::run_overcommit(&assets, &spec),
        &spec.run_dir,
        &spec.out_dir,
    )
}

/// Parses `--configs` of the guest-lock experiment (empty: vanilla and pvsched).
fn parse_guest_lock_configs(names: &[String]) -> Result<Vec<GuestLockConfig>> {
    parse_experiment_configs(
        names,
        "guest-lock",
        &GuestLockConfig::ALL,
        &GuestLockConfig::DEFAULT,
        GuestLockConfig::name,
    )
}

/// The parameters of `--experiment guest-lock` from the command line.
fn guest_lock_params(args: &LabArgs, configs: &[GuestLockConfig]) -> Result<GuestLockParams> {
    let refuse = |what: &str| {
        Err(LabError::InvalidConfig(format!(
            "{what} does not apply to --experiment guest-lock"
        )))
    };
    if args.repeat != 1 {
        return refuse("--repeat");
    }
    if !args.vm_vcpus.is_empty() {
        return refuse("--vm-vcpus");
    }
    if args.static_rt_all_threads {
        return refuse("--static-rt-all-threads");
    }
    if args.guests != 1 {
        return refuse("--guests");
    }
    let host_cpus = host_cpus();
    let (load, load_origin) = load_from_args(args, args.load_cpus.unwrap_or(host_cpus));
    let vcpus = args.vcpus.unwrap_or(host_cpus);
    let params = GuestLockParams {
        quick: args.quick,
        vcpus,
        memory_mib: args.memory_mib,
        threads: vcpus.saturating_mul(2),
        lock_seconds: args.duration_s.unwrap_or(if args.quick {
            guestlock::QUICK_LOCK_S
        } else {
            guestlock::DEFAULT_LOCK_S
        }),
        locks: guestlock::LOCKS.map(str::to_owned).to_vec(),
        inside: guestlock::INSIDE,
        outside: guestlock::OUTSIDE,
        spin_limit_us: guestlock::SPIN_LIMIT_US,
        max_age_ms: args.lock_max_age_ms,
        freshness_cpu: 0,
        freshness_seconds: guestlock::FRESHNESS_S,
        probe_trials: guestlock::PROBE_TRIALS,
        probe_gap_ms: guestlock::PROBE_GAP_MS,
        warmup_s: args.warmup_s,
        load,
        load_origin,
        channel: args.channel,
        module_params: args.module_params.clone(),
        hostd_period_us: args.hostd_period_us,
        hostd_rt_prio: args.hostd_rt_prio,
        host_cpus,
        host_kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        guest_kernel: String::new(),
        configs: configs
            .iter()
            .map(|config| config.name().to_owned())
            .collect(),
    };
    guestlock::validate(&params)?;
    Ok(params)
}

/// The workspace this crate was built from (for building the guest tool), else the current
/// directory.
fn default_workspace_dir() -> PathBuf {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if built_from.join("Cargo.toml").is_file() {
        built_from
    } else {
        PathBuf::from(".")
    }
}

/// `--guest-tool`, or `pvsched-guest` built from this source tree.
fn guest_tool(args: &LabArgs) -> Result<PathBuf> {
    match &args.guest_tool {
        Some(path) if path.is_file() => Ok(path.clone()),
        Some(path) => Err(LabError::InvalidConfig(format!(
            "--guest-tool {} is not a file",
            path.display()
        ))),
        None => {
            let workspace = default_workspace_dir();
            build_guest_tool(&workspace, &workspace.join("target/guest-tool"))
        }
    }
}

/// The parameters of `--experiment iothread` from the command line.
fn iothread_params(args: &LabArgs, configs: &[IothreadConfig]) -> Result<IothreadParams> {
    let refuse = |what: &str| {
        Err(LabError::InvalidConfig(format!(
            "{what} does not apply to --experiment iothread"
        )))
    };
    if args.repeat != 1 {
        return refuse("--repeat");
    }
    if !args.vm_vcpus.is_empty() {
        return refuse("--vm-vcpus");
    }
    if args.static_rt_all_threads {
        return refuse("--static-rt-all-threads");
    }
    if args.guests != 1 {
        return refuse("--guests");
    }
    if args.channel != Channel::Plain {
        return refuse("--channel doorbell");
    }
    let host_cpus = host_cpus();
    let load_cpus = args.load_cpus.unwrap_or(host_cpus);
    let load = match args.cpu_load {
        Some(percent) => LoadSpec::cpu_at(load_cpus, percent),
        None => {
            let mut load = default_load(load_cpus);
            load.vm_mib = args.load_vm_mib;
            if args.no_load_extras {
                load = LoadSpec {
                    iomix: 0,
                    vm: 0,
                    fork: 0,
                    ..load
                };
            }
            load
        }
    };
    let params = IothreadParams {
        quick: args.quick,
        vcpus: args.vcpus.unwrap_or(DEFAULT_VCPUS),
        memory_mib: args.memory_mib,
        duration_s: args.duration_s.unwrap_or(if args.quick {
            iothread::QUICK_DURATION_S
        } else {
            iothread::DEFAULT_DURATION_S
        }),
        warmup_s: args.warmup_s,
        disk_mib: iothread::DISK_MIB,
        block_size: iothread::BLOCK_SIZE,
        interval_us: args.interval_us,
        guest_rt_prio: args.guest_rt_prio,
        iothread_rt_prio: args.static_rt_prio,
        histogram_max_us: iothread::HISTOGRAM_MAX_US,
        schedstat_period_ms: u64::try_from(iothread::SCHEDSTAT_PERIOD.as_millis())
            .unwrap_or(u64::MAX),
        load,
        host_cpus,
        host_kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        guest_kernel: String::new(),
        configs: configs
            .iter()
            .map(|config| config.name().to_owned())
            .collect(),
    };
    iothread::validate(&params)?;
    Ok(params)
}

/// `pvsched lab --experiment iothread`.
fn run_iothread(args: &LabArgs) -> Result<()> {
    let configs = parse_experiment_configs(
        &args.configs,
        "iothread",
        &IothreadConfig::ALL,
        &IothreadConfig::ALL,
        IothreadConfig::name,
    )?;
    let mut params = iothread_params(args, &configs)?;
    let assets = prepare_lab(args)?;
    params.guest_kernel = assets.kernel_release.clone();
    let kernel_modules = ensure_kernel_modules(
        &assets.cache_dir,
        &assets.kernel_release,
        &VIRTIO_BLK_MODULES,
    )?;
    let spec = IothreadSpec {
        params,
        configs,
        accel: args.accel.into(),
        guest_tool: guest_tool(args)?,
        kernel_modules,
        out_dir: args.out.clone(),
        run_dir: lab_run_dir(),
    };
    finish(
        iothread::run_iothread(&assets, &spec),
        &spec.run_dir,
        &spec.out_dir,
    )
}

/// `pvsched lab --experiment guest-lock`.
fn run_guest_lock(args: &LabArgs) -> Result<()> {
    let configs = parse_guest_lock_configs(&args.configs)?;
    let mut params = guest_lock_params(args, &configs)?;
    let assets = prepare_lab(args)?;
    params.guest_kernel = assets.kernel_release.clone();
    let kmod_dir = args.kmod_dir.clone().unwrap_or_else(default_kmod_dir);
    let module = build_guest_module(&kmod_dir, &assets.kernel_headers)?;
    let guest_tool = guest_tool(args)?;
    let wants_daemon = configs.iter().any(|config| config.runs_daemon());
    let hostd = if wants_daemon {
        hostd_spec(args)
    } else {
        Err("no pvsched configuration requested".into())
    };
    if let (Err(reason), true) = (&hostd, wants_daemon) {
        eprintln!("pvsched lab: WARNING: the pvsched configurations will fail: {reason}");
    }
    let spec = GuestLockSpec {
        params,
        configs,
        accel: args.accel.into(),
        module: Some(module),
        guest_tool,
        hostd,
        out_dir: args.out.clone(),
        run_dir: lab_run_dir(),
    };
    finish(
        guestlock::run_guest_lock(&assets, &spec),
        &spec.run_dir,
        &spec.out_dir,
    )
}

/// The host load of `--cpu-load` (CPU workers at that load and nothing else) or else the
/// lab's default load with `--load-vm-mib` and `--no-load-extras`, with where it came from.
fn load_from_args(args: &LabArgs, load_cpus: u32) -> (LoadSpec, String) {
    match args.cpu_load {
        Some(percent) => (
            LoadSpec::cpu_at(load_cpus, percent),
            format!("--cpu-load {percent}"),
        ),
        None => {
            let mut load = default_load(load_cpus);
            load.vm_mib = args.load_vm_mib;
            if args.no_load_extras {
                load = LoadSpec {
                    iomix: 0,
                    vm: 0,
                    fork: 0,
                    ..load
                };
                (load, "the lab's default load, --no-load-extras".to_owned())
            } else {
                (load, "the lab's default load".to_owned())
            }
        }
    }
}

/// Parses `--configs` of the isolation experiment (empty: all four).
fn parse_isolation_configs(names: &[String]) -> Result<Vec<IsolationConfig>> {
    parse_experiment_configs(
        names,
        "isolation",
        &IsolationConfig::ALL,
        &IsolationConfig::ALL,
        IsolationConfig::name,
    )
}

/// The parameters of `--experiment isolation` from the command line; `online` is the
/// host's online CPU list (the last one is isolated).
fn isolation_params(
    args: &LabArgs,
    configs: &[IsolationConfig],
    online: &str,
) -> Result<IsolationParams> {
    let refuse = |what: &str| {
        Err(LabError::InvalidConfig(format!(
            "{what} does not apply to --experiment isolation"
        )))
    };
    if args.repeat != 1 {
        return refuse("--repeat");
    }
    if !args.vm_vcpus.is_empty() {
        return refuse("--vm-vcpus");
    }
    if args.vcpus.is_some_and(|vcpus| vcpus != 1) {
        return refuse("--vcpus other than 1 (one vCPU per isolated CPU)");
    }
    if args.guests != 1 {
        return refuse("--guests");
    }
    if args.static_rt_all_threads {
        return refuse("--static-rt-all-threads");
    }
    if args.channel != Channel::Plain {
        return refuse("--channel doorbell");
    }
    let (isolated_cpus, housekeeping_cpus) = isolation::split_cpus(online)?;
    let host_cpus = host_cpus();
    let (load, load_origin) = load_from_args(args, args.load_cpus.unwrap_or(host_cpus));
    let params = IsolationParams {
        quick: args.quick,
        memory_mib: args.memory_mib,
        interval_us: args.interval_us,
        duration_s: args.duration_s.unwrap_or(if args.quick {
            isolation::QUICK_DURATION_S
        } else {
            isolation::DEFAULT_DURATION_S
        }),
        warmup_s: args.warmup_s,
        guest_rt_prio: args.guest_rt_prio,
        vcpu_rt_prio: args.static_rt_prio,
        load,
        load_origin,
        isolated_cpus,
        housekeeping_cpus,
        host_cpus,
        host_kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        guest_kernel: String::new(),
        state_file: PathBuf::from(isolation::STATE_FILE),
        configs: configs
            .iter()
            .map(|config| config.name().to_owned())
            .collect(),
    };
    isolation::validate(&params)?;
    Ok(params)
}

/// `pvsched lab --experiment isolation`.
fn run_isolation(args: &LabArgs) -> Result<()> {
    let configs = parse_isolation_configs(&args.configs)?;
    let mut params = isolation_params(
        args,
        &configs,
        &read_trimmed("/sys/devices/system/cpu/online"),
    )?;
    let assets = prepare_lab(args)?;
    params.guest_kernel = assets.kernel_release.clone();
    let spec = IsolationSpec {
        params,
        configs,
        accel: args.accel.into(),
        out_dir: args.out.clone(),
        run_dir: lab_run_dir(),
    };
    finish(
        isolation::run_isolation(&assets, &spec),
        &spec.run_dir,
        &spec.out_dir,
    )
}

impl From<AccelArg> for AccelChoice {
    fn from(arg: AccelArg) -> AccelChoice {
        match arg {
            AccelArg::Auto => AccelChoice::Auto,
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
        }
    }
}

/// Refuses to start on a machine that lacks what the lab needs (root, QEMU, ...), then
/// fetches and caches the guest kernel, its headers and the guest programs.
fn prepare_lab(args: &LabArgs) -> Result<LabAssets> {
    let missing = missing_prerequisites();
    if !missing.is_empty() {
        return Err(LabError::Run(format!(
            "the lab cannot run here: {}",
            missing.join("; ")
        )));
    }
    LabAssets::prepare(&AssetOptions {
        cache_dir: args.cache_dir.clone(),
        install_missing: !args.no_install,
        ..AssetOptions::default()
    })
}

/// Where one lab run keeps its transient files (initramfs, disks, sockets); removed at
/// its end.
fn lab_run_dir() -> PathBuf {
    std::env::temp_dir().join(format!("pvsched-lab-{}", std::process::id()))
}

/// The files an experiment wrote into its results directory.
struct WrittenFiles {
    /// `results.json`.
    json: PathBuf,
    /// `results.md`.
    markdown: PathBuf,
    /// The SVG plots, if the experiment draws any.
    plots: Vec<PathBuf>,
}

impl WrittenFiles {
    /// The line that tells where the results went.
    fn wrote(&self) -> String {
        let (json, markdown) = (self.json.display(), self.markdown.display());
        if self.plots.is_empty() {
            return format!("wrote {json} and {markdown}");
        }
        let plots: Vec<String> = self
            .plots
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        format!("wrote {json}, {markdown} and {}", plots.join(", "))
    }
}

/// The heading above the checks of the experiments whose checks `pvsched lab --check`
/// runs on the results.
const CHECKS_ON_RESULTS: &str = "Checks (`pvsched lab --check` on the results):";

/// The heading above the checks that `scripts/lab-check` asserts in CI.
const CHECKS_IN_CI: &str = "Checks (asserted in CI by scripts/lab-check):";

/// What an experiment's results give the end of its run ([`finish`]): their files,
/// table and checks, and whether the run failed.
trait ExperimentOutcome {
    /// The experiment, as `--experiment` names it.
    const EXPERIMENT: &'static str;
    /// The heading printed above the checks.
    const CHECKS_HEADING: &'static str = CHECKS_ON_RESULTS;
    /// One configuration's results.
    type Config: ConfigOutcome;

    /// Writes `results.json`, `results.md` and the plots into `dir`.
    fn write_files(&self, dir: &Path) -> Result<WrittenFiles>;
    /// The results table (`results.md`).
    fn markdown(&self) -> String;
    /// The must-hold properties, checked.
    fn checks(&self) -> Vec<check::CheckOutcome>;
    /// Every configuration's results, in report order.
    fn in_report_order(&self) -> Vec<&Self::Config>;

    /// The run's error, once its results are written and printed.
    fn verdict(&self) -> Result<()>
    where
        Self: Sized,
    {
        fail_on_failed(self)
    }
}

/// What the end of a run needs of one configuration's results.
trait ConfigOutcome {
    /// The configuration's name.
    fn name(&self) -> &str;
    /// The configuration did not run to its end.
    fn failed(&self) -> bool;
}

/// [`ConfigOutcome`] of results types with a `name` and an `error: Option<String>`.
macro_rules! config_outcome {
    ($($results:ty),+) => {
        $(impl ConfigOutcome for $results {
            fn name(&self) -> &str {
                &self.name
            }
            fn failed(&self) -> bool {
                self.error.is_some()
            }
        })+
    };
}

config_outcome!(
    overcommit::OvercommitConfigResult,
    iothread::IothreadConfigResult,
    guestlock::GuestLockConfigResult,
    isolation::IsolationConfigResult
);

/// The run's error when some configurations failed (their names), after the results
/// were written.
fn fail_on_failed<R: ExperimentOutcome>(results: &R) -> Result<()> {
    let failed: Vec<&str> = results
        .in_report_order()
        .into_iter()
        .filter(|config| config.failed())
        .map(ConfigOutcome::name)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(LabError::Run(format!(
            "{}: configurations failed: {}",
            R::EXPERIMENT,
            failed.join(", ")
        )))
    }
}

/// The end of every experiment's run: its scratch directory removed, then (when it ran)
/// its results written to `out_dir`, their table and checks printed and its verdict.
fn finish<R: ExperimentOutcome>(results: Result<R>, run_dir: &Path, out_dir: &Path) -> Result<()> {
    // Scratch files (initramfs, disks, sockets) are not results.
    let _ = std::fs::remove_dir_all(run_dir);
    let results = results?;
    let files = results.write_files(out_dir)?;
    eprintln!("{}", files.wrote());
    println!("\n{}", results.markdown());
    println!("{}", R::CHECKS_HEADING);
    check::print(&results.checks());
    results.verdict()
}

impl ExperimentOutcome for overcommit::OvercommitResults {
    const EXPERIMENT: &'static str = "overcommit";
    const CHECKS_HEADING: &'static str = CHECKS_IN_CI;
    type Config = overcommit::OvercommitConfigResult;

    fn write_files(&self, dir: &Path) -> Result<WrittenFiles> {
        let files = overcommit::write_all(self, dir)?;
        Ok(WrittenFiles {
            json: files.json,
            markdown: files.markdown,
            plots: files.plots,
        })
    }
    fn markdown(&self) -> String {
        overcommit::markdown(self)
    }
    fn checks(&self) -> Vec<check::CheckOutcome> {
        check::check_overcommit(self)
    }
    fn in_report_order(&self) -> Vec<&Self::Config> {
        self.ordered()
    }
    /// A failed configuration shows in the checks (`completed`); the run itself succeeds.
    fn verdict(&self) -> Result<()> {
        Ok(())
    }
}

impl ExperimentOutcome for iothread::IothreadResults {
    const EXPERIMENT: &'static str = "iothread";
    type Config = iothread::IothreadConfigResult;

    fn write_files(&self, dir: &Path) -> Result<WrittenFiles> {
        let files = iothread::write_all(self, dir)?;
        Ok(WrittenFiles {
            json: files.json,
            markdown: files.markdown,
            plots: Vec::new(),
        })
    }
    fn markdown(&self) -> String {
        iothread::markdown(self)
    }
    fn checks(&self) -> Vec<check::CheckOutcome> {
        check::check_iothread(self)
    }
    fn in_report_order(&self) -> Vec<&Self::Config> {
        self.ordered()
    }
}

impl ExperimentOutcome for guestlock::GuestLockResults {
    const EXPERIMENT: &'static str = "guest-lock";
    type Config = guestlock::GuestLockConfigResult;

    fn write_files(&self, dir: &Path) -> Result<WrittenFiles> {
        let files = guestlock::write_all(self, dir)?;
        Ok(WrittenFiles {
            json: files.json,
            markdown: files.markdown,
            plots: vec![files.plot],
        })
    }
    fn markdown(&self) -> String {
        guestlock::markdown(self)
    }
    fn checks(&self) -> Vec<check::CheckOutcome> {
        check::check_guest_lock(self)
    }
    fn in_report_order(&self) -> Vec<&Self::Config> {
        self.ordered()
    }
}

impl ExperimentOutcome for isolation::IsolationResults {
    const EXPERIMENT: &'static str = "isolation";
    type Config = isolation::IsolationConfigResult;

    fn write_files(&self, dir: &Path) -> Result<WrittenFiles> {
        let files = isolation::write_all(self, dir)?;
        Ok(WrittenFiles {
            json: files.json,
            markdown: files.markdown,
            plots: vec![files.plot],
        })
    }
    fn markdown(&self) -> String {
        isolation::markdown(self)
    }
    fn checks(&self) -> Vec<check::CheckOutcome> {
        check::check_isolation(self)
    }
    fn in_report_order(&self) -> Vec<&Self::Config> {
        self.ordered()
    }
    /// A host left changed fails the run before any failed configuration does: it is
    /// what an operator must act on.
    fn verdict(&self) -> Result<()> {
        let not_restored: Vec<&str> = self
            .ordered()
            .into_iter()
            .filter(|result| result.host_restore.as_ref().is_some_and(|r| !r.restored()))
            .map(|result| result.name.as_str())
            .collect();
        if !not_restored.is_empty() {
            return Err(LabError::Run(format!(
                "isolation: THE HOST WAS NOT RESTORED after {} (see the differences above; state file {})",
                not_restored.join(", "),
                isolation::STATE_FILE
            )));
        }
        fail_on_failed(self)
    }
}

/// One run of every configuration of `spec`: results, table and plots in `spec.out_dir`.
fn run_once(assets: &LabAssets, spec: &ExperimentSpec) -> Result<LabResults> {
    let results = run_experiment(assets, spec);
    // Scratch files (initramfs, stress-ng temp files) are not results.
    let _ = std::fs::remove_dir_all(&spec.run_dir);
    let results = results?;
    let files = write_all(&results, &spec.out_dir)?;
    let files = WrittenFiles {
        json: files.json,
        markdown: files.markdown,
        plots: files.plots,
    };
    eprintln!("{}", files.wrote());
    Ok(results)
}

fn print_results(results: &LabResults) {
    println!("\n{}", markdown(results));
    println!("{CHECKS_IN_CI}");
    check::print(&check::check(results));
}

fn run_check(path: &Path) -> Result<()> {
    let file = if path.is_dir() {
        path.join("results.json")
    } else {
        path.to_owned()
    };
    let outcomes = check::check_file(&file)?;
    let failed = check::print(&outcomes);
    if failed == 0 {
        println!("{}: all {} checks passed", file.display(), outcomes.len());
        Ok(())
    } else {
        Err(LabError::Run(format!(
            "{}: {failed} of {} checks failed",
            file.display(),
            outcomes.len()
        )))
    }
}

/// Adds `static-rt-all` to `configs` (after `static-rt` when it is there) unless present.
fn add_static_rt_all(configs: &mut Vec<Configuration>) {
    let all = Configuration::new(Scheduling::StaticRtAll, false);
    if configs.contains(&all) {
        return;
    }
    let after = Configuration::new(Scheduling::StaticRt, false);
    match configs.iter().position(|&config| config == after) {
        Some(index) => configs.insert(index + 1, all),
        None => configs.push(all),
    }
}

/// Parses `--configs` (empty: all).
fn parse_configs(names: &[String]) -> Result<Vec<Configuration>> {
    if names.is_empty() {
        return Ok(Configuration::default_set());
    }
    let mut configs = Vec::new();
    for name in names
        .iter()
        .map(|name| name.trim())
        .filter(|n| !n.is_empty())
    {
        let config = Configuration::parse(name).ok_or_else(|| {
            LabError::InvalidConfig(format!(
                "unknown configuration {name:?}; known: {}",
                Configuration::ALL
                    .iter()
                    .map(|config| config.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if !configs.contains(&config) {
            configs.push(config);
        }
    }
    Ok(configs)
}

fn hostd_spec(args: &LabArgs) -> std::result::Result<HostdSpec, String> {
    let program = match &args.pvsched_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe().map_err(|error| format!("current executable: {error}"))?,
    };
    probe(&program).map_err(|error| error.to_string())?;
    let extra_toml = match &args.hostd_extra {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|error| format!("reading {}: {error}", path.display()))?,
        None => String::new(),
    };
    Ok(HostdSpec {
        program,
        period_us: args.hostd_period_us,
        extra_toml,
        rt_prio: args.hostd_rt_prio,
        rt_class: None,
        ivshmem_server: None,
        introspection: None,
    })
}

/// `guest/kmod` of the source tree this crate was built from, else of the current directory.
fn default_kmod_dir() -> PathBuf {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/kmod");
    if built_from.is_dir() {
        built_from
    } else {
        PathBuf::from("guest/kmod")
    }
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_in_given_order_without_duplicates() {
        let names: Vec<String> = ["pvsched", "vanilla", "pvsched"].map(String::from).to_vec();
        let configs = parse_configs(&names).expect("parse");
        assert_eq!(
            configs.iter().map(|c| c.name()).collect::<Vec<_>>(),
            ["pvsched", "vanilla"]
        );
        assert_eq!(parse_configs(&[]).expect("default set").len(), 9);
        assert!(parse_configs(&["fast".into()]).is_err());
        let rogue =
            parse_configs(&["rogue-vanilla".into(), "rogue-pvsched".into()]).expect("rogue pair");
        assert_eq!(
            rogue.iter().map(|c| c.name()).collect::<Vec<_>>(),
            ["rogue-vanilla", "rogue-pvsched"]
        );
    }

    /// The ways the `--configs` help may say which of `all` are the default.
    fn default_phrases(all: &[&str], default: &[&str]) -> Vec<String> {
        let mut phrases = vec![default.join(", ")];
        let left_out: Vec<&str> = all
            .iter()
            .copied()
            .filter(|name| !default.contains(name))
            .collect();
        match left_out.as_slice() {
            [] => {
                let count = ["one", "two", "three", "four", "five", "six"];
                phrases.push(format!("all {}", count[all.len() - 1]));
            }
            [only] => phrases.push(format!("all but {only}")),
            [most @ .., last] => phrases.push(format!("all but {} and {last}", most.join(", "))),
        }
        phrases
    }

    #[test]
    fn the_configs_help_lists_every_configuration_and_the_default_set_of_every_experiment() {
        use clap::CommandFactory as _;
        let command = Command::command();
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_id() == "configs")
            .expect("--configs");
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .expect("help")
            .to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let latency_all: Vec<String> = Configuration::ALL.map(Configuration::name).to_vec();
        let latency_default: Vec<String> = Configuration::default_set()
            .into_iter()
            .map(Configuration::name)
            .collect();
        let experiments: [(&str, Vec<&str>, Vec<&str>); 5] = [
            (
                "comma-separated: ",
                latency_all.iter().map(String::as_str).collect(),
                latency_default.iter().map(String::as_str).collect(),
            ),
            (
                "with `--experiment overcommit`: ",
                OvercommitConfig::ALL.map(OvercommitConfig::name).to_vec(),
                parse_overcommit_configs(&[])
                    .expect("default")
                    .into_iter()
                    .map(OvercommitConfig::name)
                    .collect(),
            ),
            (
                "with `--experiment guest-lock`: ",
                GuestLockConfig::ALL.map(GuestLockConfig::name).to_vec(),
                parse_guest_lock_configs(&[])
                    .expect("default")
                    .into_iter()
                    .map(GuestLockConfig::name)
                    .collect(),
            ),
            (
                "with `--experiment iothread`: ",
                IothreadConfig::ALL.map(IothreadConfig::name).to_vec(),
                IothreadConfig::ALL.map(IothreadConfig::name).to_vec(),
            ),
            (
                "with `--experiment isolation`: ",
                IsolationConfig::ALL.map(IsolationConfig::name).to_vec(),
                parse_isolation_configs(&[])
                    .expect("default")
                    .into_iter()
                    .map(IsolationConfig::name)
                    .collect(),
            ),
        ];
        for (lead, all, default) in experiments {
            let said: Vec<String> = default_phrases(&all, &default)
                .into_iter()
                .map(|phrase| format!("{lead}{} [default: {phrase}]", all.join(", ")))
                .collect();
            assert!(
                said.iter().any(|text| help.contains(text.as_str())),
                "--configs help does not say any of {said:#?}:\n{help}"
            );
        }
    }

    #[test]
    fn the_written_files_line_names_every_file() {
        let files = |plots: &[&str]| WrittenFiles {
            json: "out/results.json".into(),
            markdown: "out/results.md".into(),
            plots: plots.iter().map(PathBuf::from).collect(),
        };
        assert_eq!(
            files(&[]).wrote(),
            "wrote out/results.json and out/results.md"
        );
        assert_eq!(
            files(&["out/a.svg"]).wrote(),
            "wrote out/results.json, out/results.md and out/a.svg"
        );
        assert_eq!(
            files(&["out/a.svg", "out/b.svg"]).wrote(),
            "wrote out/results.json, out/results.md and out/a.svg, out/b.svg"
        );
    }

    /// Results of a made-up experiment: configuration names, and whether each failed.
    struct Outcomes(Vec<(&'static str, bool)>);

    impl ConfigOutcome for (&'static str, bool) {
        fn name(&self) -> &str {
            self.0
        }
        fn failed(&self) -> bool {
            self.1
        }
    }

    impl ExperimentOutcome for Outcomes {
        const EXPERIMENT: &'static str = "made-up";
        type Config = (&'static str, bool);
        fn write_files(&self, dir: &Path) -> Result<WrittenFiles> {
            Ok(WrittenFiles {
                json: dir.join("results.json"),
                markdown: dir.join("results.md"),
                plots: Vec::new(),
            })
        }
        fn markdown(&self) -> String {
            String::new()
        }
        fn checks(&self) -> Vec<check::CheckOutcome> {
            Vec::new()
        }
        fn in_report_order(&self) -> Vec<&Self::Config> {
            self.0.iter().collect()
        }
    }

    #[test]
    fn a_run_fails_naming_its_failed_configurations_in_report_order() {
        assert!(Outcomes(vec![("a", false), ("b", false)]).verdict().is_ok());
        let error = Outcomes(vec![("c", true), ("a", false), ("b", true)])
            .verdict()
            .expect_err("failed configurations");
        assert_eq!(error.to_string(), "made-up: configurations failed: c, b");
        let scratch =
            std::env::temp_dir().join(format!("pvsched-lab-finish-{}", std::process::id()));
        std::fs::create_dir_all(scratch.join("initramfs")).expect("scratch");
        let error = finish(
            Ok(Outcomes(vec![("a", true)])),
            &scratch,
            &scratch.join("out"),
        )
        .expect_err("failed configuration");
        assert_eq!(error.to_string(), "made-up: configurations failed: a");
        assert!(!scratch.exists(), "the scratch directory is removed");
    }

    #[derive(clap::Parser)]
    struct Command {
        #[command(flatten)]
        lab: LabArgs,
    }

    fn lab_args(args: &[&str]) -> LabArgs {
        use clap::Parser as _;
        Command::try_parse_from(std::iter::once("lab").chain(args.iter().copied()))
            .expect("arguments parse")
            .lab
    }

    #[test]
    fn out_of_range_arguments_are_refused_before_anything_runs() {
        for args in [
            &["--repeat", "0"][..],
            &["--repeat", "21"],
            &["--vcpus", "1", "--configs", "rogue-pvsched"],
            &["--configs", "rogue-turbo"],
        ] {
            let error = run(lab_args(args)).expect_err("refused");
            assert!(
                matches!(error, LabError::InvalidConfig(_)),
                "{args:?}: {error}"
            );
        }
        for args in [
            &["--experiment", "overcommit", "--configs", "static-rt"][..],
            &["--experiment", "overcommit", "--repeat", "2"],
            &["--experiment", "overcommit", "--channel", "doorbell"],
            &["--experiment", "overcommit", "--vm-vcpus", "4,0"],
            &["--experiment", "overcommit", "--cpu-load", "101"],
            &["--experiment", "overcommit", "--hackbench-loops", "0"],
            &["--vm-vcpus", "4,2"],
            &["--experiment", "guest-lock", "--configs", "static-rt"],
            &["--experiment", "guest-lock", "--repeat", "2"],
            &["--experiment", "guest-lock", "--guests", "2"],
            &["--experiment", "guest-lock", "--vm-vcpus", "4"],
            &["--experiment", "guest-lock", "--cpu-load", "0"],
            &["--experiment", "guest-lock", "--vcpus", "0"],
            &["--experiment", "guest-lock", "--lock-max-age-ms", "0"],
            &["--experiment", "iothread", "--configs", "vanilla"],
            &["--experiment", "iothread", "--vcpus", "1"],
            &["--experiment", "iothread", "--repeat", "2"],
            &["--experiment", "iothread", "--guests", "2"],
            &["--experiment", "iothread", "--cpu-load", "0"],
            &["--experiment", "iothread", "--guest-rt-prio", "0"],
        ] {
            let error = run(lab_args(args)).expect_err("refused");
            assert!(
                matches!(error, LabError::InvalidConfig(_)),
                "{args:?}: {error}"
            );
        }
        let parsed = lab_args(&["--repeat", "3", "--vcpus", "4", "--static-rt-all-threads"]);
        assert_eq!((parsed.repeat, parsed.vcpus), (3, Some(4)));
        assert!(parsed.static_rt_all_threads);
    }

    #[test]
    fn overcommit_arguments_become_the_run_parameters() {
        let args = lab_args(&["--experiment", "overcommit", "--quick", "--load-cpus", "3"]);
        let configs = parse_overcommit_configs(&args.configs).expect("default set");
        let params = overcommit_params(&args, &configs).expect("params");
        assert_eq!(params.vm_vcpus, [4, 2, 1]);
        assert_eq!(params.duration_s, overcommit::QUICK_DURATION_S);
        assert_eq!(params.benchmark.duration_s, params.duration_s);
        assert_eq!(params.benchmark.tail_s, overcommit::QUICK_TAIL_S);
        assert_eq!(params.load.describe(), "stress-ng --cpu 3 --cpu-load 80");
        assert_eq!(params.configs, ["vanilla", "pvsched", "pvsched-introspect"]);
        let args = lab_args(&[
            "--experiment",
            "overcommit",
            "--vm-vcpus",
            "8,4",
            "--cpu-load",
            "60",
            "--configs",
            "pvsched-introspect,vanilla",
            "--hackbench-loops",
            "7",
        ]);
        let configs = parse_overcommit_configs(&args.configs).expect("parse");
        let params = overcommit_params(&args, &configs).expect("params");
        assert_eq!(params.vm_vcpus, [8, 4]);
        assert_eq!(params.duration_s, overcommit::DEFAULT_DURATION_S);
        assert_eq!(params.load.cpu_load, Some(60));
        assert_eq!(params.benchmark.loops, 7);
        assert_eq!(params.benchmark.tail_s, overcommit::DEFAULT_TAIL_S);
        assert_eq!(params.configs, ["pvsched-introspect", "vanilla"]);
    }

    #[test]
    fn guest_lock_arguments_become_the_run_parameters() {
        let args = lab_args(&["--experiment", "guest-lock", "--quick"]);
        let configs = parse_guest_lock_configs(&args.configs).expect("default set");
        assert_eq!(configs, GuestLockConfig::DEFAULT);
        let params = guest_lock_params(&args, &configs).expect("params");
        assert_eq!(
            params.vcpus,
            host_cpus(),
            "one vCPU per host CPU by default"
        );
        assert_eq!(params.threads, 2 * params.vcpus);
        assert_eq!(params.lock_seconds, guestlock::QUICK_LOCK_S);
        assert_eq!(params.locks, ["spin", "futex", "pvsched"]);
        assert_eq!(params.load, default_load(host_cpus()));
        assert_eq!(params.load_origin, "the lab's default load");
        assert_eq!(params.max_age_ms, guestlock::DEFAULT_MAX_AGE_MS);
        assert_eq!(params.configs, ["vanilla", "pvsched"]);
        let args = lab_args(&[
            "--experiment",
            "guest-lock",
            "--vcpus",
            "3",
            "--cpu-load",
            "70",
            "--load-cpus",
            "1",
            "--configs",
            "pvsched-doorbell,vanilla",
            "--lock-max-age-ms",
            "250",
            "--channel",
            "doorbell",
        ]);
        let configs = parse_guest_lock_configs(&args.configs).expect("parse");
        let params = guest_lock_params(&args, &configs).expect("params");
        assert_eq!((params.vcpus, params.threads), (3, 6));
        assert_eq!(params.lock_seconds, guestlock::DEFAULT_LOCK_S);
        assert_eq!(params.load.describe(), "stress-ng --cpu 1 --cpu-load 70");
        assert_eq!(params.load_origin, "--cpu-load 70");
        assert_eq!(params.max_age_ms, 250);
        assert_eq!(params.channel, Channel::Doorbell);
        assert_eq!(params.configs, ["pvsched-doorbell", "vanilla"]);
    }

    #[test]
    fn iothread_arguments_become_the_run_parameters() {
        let args = lab_args(&["--experiment", "iothread", "--quick"]);
        let configs = parse_experiment_configs(
            &args.configs,
            "iothread",
            &IothreadConfig::ALL,
            &IothreadConfig::ALL,
            IothreadConfig::name,
        )
        .expect("default set");
        let params = iothread_params(&args, &configs).expect("params");
        assert_eq!(params.vcpus, DEFAULT_VCPUS);
        assert_eq!(params.duration_s, iothread::QUICK_DURATION_S);
        assert_eq!((params.disk_mib, params.block_size), (64, 4096));
        assert_eq!(params.schedstat_period_ms, 10);
        assert_eq!(params.load, default_load(host_cpus()));
        assert_eq!(params.configs, ["main-loop", "iothread", "iothread-rt"]);
        assert_eq!(params.iothread_rt_prio, 8);
        let args = lab_args(&[
            "--experiment",
            "iothread",
            "--vcpus",
            "3",
            "--duration-s",
            "12",
            "--cpu-load",
            "70",
            "--load-cpus",
            "1",
            "--configs",
            "iothread",
        ]);
        let configs = parse_experiment_configs(
            &args.configs,
            "iothread",
            &IothreadConfig::ALL,
            &IothreadConfig::ALL,
            IothreadConfig::name,
        )
        .expect("parse");
        let params = iothread_params(&args, &configs).expect("params");
        assert_eq!((params.vcpus, params.duration_s), (3, 12));
        assert_eq!(params.load.describe(), "stress-ng --cpu 1 --cpu-load 70");
        assert_eq!(params.configs, ["iothread"]);
    }

    #[test]
    fn isolation_arguments_become_the_run_parameters() {
        let args = lab_args(&["--experiment", "isolation", "--quick"]);
        let configs = parse_isolation_configs(&args.configs).expect("default set");
        assert_eq!(configs, IsolationConfig::ALL);
        let params = isolation_params(&args, &configs, "0-1").expect("params");
        assert_eq!(
            (params.isolated_cpus, params.housekeeping_cpus),
            (vec![1], vec![0])
        );
        assert_eq!(params.duration_s, isolation::QUICK_DURATION_S);
        assert_eq!(params.vcpu_rt_prio, 8, "the static-rt priority");
        assert_eq!(params.load, default_load(host_cpus()));
        assert_eq!(params.state_file, Path::new(isolation::STATE_FILE));
        assert_eq!(
            params.configs,
            ["idle", "shared", "isolated", "isolated-main"]
        );
        let args = lab_args(&[
            "--experiment",
            "isolation",
            "--configs",
            "isolated,shared",
            "--duration-s",
            "10",
            "--static-rt-prio",
            "20",
            "--cpu-load",
            "70",
            "--load-cpus",
            "1",
        ]);
        let configs = parse_isolation_configs(&args.configs).expect("parse");
        let params = isolation_params(&args, &configs, "0-3").expect("params");
        assert_eq!(
            (params.isolated_cpus, params.housekeeping_cpus),
            (vec![3], vec![0, 1, 2])
        );
        assert_eq!((params.duration_s, params.vcpu_rt_prio), (10, 20));
        assert_eq!(params.load.describe(), "stress-ng --cpu 1 --cpu-load 70");
        assert_eq!(params.configs, ["isolated", "shared"]);
        assert!(matches!(
            isolation_params(&args, &configs, "0"),
            Err(LabError::InvalidConfig(_))
        ));
    }

    #[test]
    fn isolation_refuses_what_does_not_apply_before_anything_runs() {
        for args in [
            &["--experiment", "isolation", "--configs", "static-rt"][..],
            &["--experiment", "isolation", "--repeat", "2"],
            &["--experiment", "isolation", "--vcpus", "2"],
            &["--experiment", "isolation", "--guests", "2"],
            &["--experiment", "isolation", "--vm-vcpus", "4"],
            &["--experiment", "isolation", "--static-rt-all-threads"],
            &["--experiment", "isolation", "--channel", "doorbell"],
            &["--experiment", "isolation", "--static-rt-prio", "0"],
            &["--experiment", "isolation", "--duration-s", "0"],
        ] {
            let error = run(lab_args(args)).expect_err("refused");
            assert!(
                matches!(error, LabError::InvalidConfig(_)),
                "{args:?}: {error}"
            );
        }
    }

    #[test]
    fn static_rt_all_is_added_once_after_static_rt() {
        let mut configs = parse_configs(&["vanilla".into(), "static-rt".into(), "pvsched".into()])
            .expect("parse");
        add_static_rt_all(&mut configs);
        add_static_rt_all(&mut configs);
        assert_eq!(
            configs.iter().map(|c| c.name()).collect::<Vec<_>>(),
            ["vanilla", "static-rt", "static-rt-all", "pvsched"]
        );
        let mut rogue = parse_configs(&["rogue-pvsched".into()]).expect("parse");
        add_static_rt_all(&mut rogue);
        assert_eq!(
            rogue.iter().map(|c| c.name()).collect::<Vec<_>>(),
            ["rogue-pvsched", "static-rt-all"]
        );
    }
}
