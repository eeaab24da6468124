//! The side-by-side experiment: every configuration run the same way on real guests.
//!
//! One configuration run:
//!
//! 1. boot the guests on a quiet host (under load a TCG boot takes four times longer); their
//!    init loads the guest module, prints READY and waits for the host's go line;
//! 2. apply the scheduling: nothing (`vanilla`), every vCPU thread FIFO (`static-rt`),
//!    every QEMU thread FIFO (`static-rt-all`), or the daemon (`pvsched`); without the
//!    daemon the lab formats the shared page itself, so the module attaches and costs the
//!    guest the same everywhere;
//! 3. start the host load (stress-ng), wait for the module to attach and the load to warm
//!    up, note the guest heartbeat, start host cyclictest and send go: guest and host
//!    cyclictest now measure the same window, and stress-ng is stopped when it ends;
//! 4. sample the policies of every vCPU thread and of QEMU's main thread in `/proc` while
//!    the guests run, collect the guests' results (the guests then idle instead of
//!    powering off), read the daemon's counters and its applied changes;
//! 5. undo the scheduling (restore / SIGTERM the daemon), read every thread of every QEMU
//!    still running (also when the run failed part-way) and record any left real-time,
//!    and only then stop QEMU.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::configrun::{self, daemon_counts, ConfigDone, ConfigRecord, Progress, ATTACH_TIMEOUT};
use crate::cyclictest::{
    histogram_buckets, merge_buckets, merge_summaries, parse_histogram, LatencySummary,
};
use crate::error::{LabError, Result};
use crate::hostd::{Hostd, HostdSpec, HostdVm};
use crate::hostload::{HostCyclictest, HostCyclictestSpec, HostLoad, LoadSpec, Throughput};
use crate::hostsched::{process_cpu_ns, thread_policy, StaticRt};
use crate::initramfs::{Initramfs, InitramfsSpec};
use crate::page::{static_host_header, PageReader, SlotTotals};
use crate::qemu::{AccelChoice, Accelerator, Guest, GuestConfig, GuestOutput};
use crate::results::{
    evaluate_goals, ApplyLatency, Channel, ConfigResult, Configuration, GuestRun, GuestSide,
    LabResults, LatencyFigures, PolicyShare, RunParams, Scheduling, RESULTS_VERSION,
};
use crate::stallprobe::{self, StallProbe, StallProbeSpec};
use crate::workload::{CyclictestParams, InitControl, RtPolicy, Workload, MARKER_READY};
use crate::{LabAssets, RESULT_SLACK};

/// Guest cyclictest histogram size (µs).
const GUEST_HISTOGRAM_US: u32 = 100_000;
/// Host cyclictest histogram size (µs); the maximum is exact beyond it.
const HOST_HISTOGRAM_US: u32 = 200_000;
/// How long init may take from boot to READY (module load).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often vCPU thread policies are sampled while the guests run.
const POLICY_SAMPLE_PERIOD: Duration = Duration::from_millis(50);
/// How often a progress line is printed while the guests run.
const PROGRESS_PERIOD: Duration = Duration::from_secs(10);

/// Everything an experiment needs besides the assets.
#[derive(Debug, Clone)]
pub struct ExperimentSpec {
    /// Run parameters (recorded in `results.json`).
    pub params: RunParams,
    /// Configurations to run, in order.
    pub configs: Vec<Configuration>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// The guest module, if built.
    pub module: Option<PathBuf>,
    /// How to run the daemon; `Err` says why it cannot run.
    pub hostd: std::result::Result<HostdSpec, String>,
    /// Results directory (logs go here too).
    pub out_dir: PathBuf,
    /// Scratch directory (initramfs, QMP sockets, stress-ng files).
    pub run_dir: PathBuf,
}

/// Runs every configuration of `spec` and returns the results (also when some
/// configurations failed: their `error` says why).
pub fn run_experiment(assets: &LabAssets, spec: &ExperimentSpec) -> Result<LabResults> {
    let progress = Progress::start();
    fs::create_dir_all(&spec.run_dir).map_err(LabError::io("create", &spec.run_dir))?;
    fs::create_dir_all(&spec.out_dir).map_err(LabError::io("create", &spec.out_dir))?;
    let params = &spec.params;
    if params.vcpus < 2 && spec.configs.iter().any(|config| config.rogue) {
        return Err(LabError::InvalidConfig(
            "the rogue configurations need at least 2 vCPUs (one busy, one measuring)".into(),
        ));
    }

    let cyclictest = CyclictestParams {
        interval_us: params.interval_us,
        duration_s: params.duration_s,
        priority: params.guest_rt_prio,
        policy: RtPolicy::Fifo,
        histogram_max_us: GUEST_HISTOGRAM_US,
    };
    let plain = Workload::Cyclictest(cyclictest);
    let rogue = Workload::Rogue {
        cyclictest,
        rogue_cpu: params.vcpus - 1,
    };
    let mut initrds = BTreeMap::new();
    for (kind, workload) in [("cyclictest", &plain), ("rogue", &rogue)] {
        if kind == "rogue" && !spec.configs.iter().any(|config| config.rogue) {
            continue;
        }
        let initramfs = Initramfs::build(
            &InitramfsSpec {
                busybox: assets.busybox.clone(),
                programs: vec![assets.cyclictest.clone(), assets.chrt.clone()],
                module: spec.module.clone(),
                kernel_modules: Vec::new(),
                files: Vec::new(),
                module_params: params.module_params.clone(),
                workload: workload.clone(),
                diagnostics: vec![
                    "dmesg | grep pvsched_guest | tail -n 5".into(),
                    "cat /sys/kernel/debug/pvsched/host 2>/dev/null".into(),
                ],
                control: InitControl {
                    wait_for_go: true,
                    hold_after_done: true,
                },
            },
            &spec.run_dir.join(format!("initramfs-{kind}.cpio")),
        )?;
        initrds.insert(kind, (initramfs, workload.clone()));
    }

    let sequence = configrun::run_sequence(
        &progress,
        &spec.configs,
        |config: Configuration| config.name(),
        |config, label| {
            let mut result = ConfigResult {
                name: config.name(),
                scheduling: config.scheduling.name().to_owned(),
                rogue: config.rogue,
                idle: config.idle,
                ..ConfigResult::default()
            };
            let mut run = ConfigRun {
                assets,
                spec,
                config,
                progress: &progress,
                label,
                initrds: &initrds,
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
    let configs = sequence.configs;
    let goals = evaluate_goals(&configs);
    Ok(LabResults {
        version: RESULTS_VERSION,
        accelerator: sequence.accelerator,
        kvm_fallback: sequence.kvm_fallback,
        params: params.clone(),
        configs,
        goals,
        elapsed_s: progress.elapsed().as_secs_f64(),
    })
}

impl ConfigRecord for ConfigResult {
    fn error_and_elapsed(&mut self) -> (&mut Option<String>, &mut f64) {
        (&mut self.error, &mut self.elapsed_s)
    }

    fn summary(&self) -> String {
        format!(
            "guest avg {:.1} us, p99 {} us, max {} us ({} samples); host p99 {} us, max {} us, {:.0} bogo-ops/s; vCPU threads RT in {:.0}% of {} samples; {}",
            self.guest.latency.avg_us,
            self.guest.latency.p99_us,
            self.guest.latency.max_us,
            self.guest.latency.samples,
            self.host.latency.p99_us,
            self.host.latency.max_us,
            self.host.bogo_ops_per_s,
            self.rt_fraction * 100.0,
            self.policy_samples,
            daemon_counts(self.boosts, self.throttles, self.applies)
        )
    }
}

/// A booted guest of a configuration run.
struct RunningGuest {
    guest: Guest,
    workload: Workload,
    page: Option<PageReader>,
    record: GuestRun,
}

/// One configuration run (see the module documentation).
struct ConfigRun<'a> {
    assets: &'a LabAssets,
    spec: &'a ExperimentSpec,
    config: Configuration,
    progress: &'a Progress,
    label: &'a str,
    initrds: &'a BTreeMap<&'static str, (Initramfs, Workload)>,
    accelerator: Option<Accelerator>,
    kvm_fallback: Option<String>,
}

impl ConfigRun<'_> {
    fn say(&self, message: impl std::fmt::Display) {
        self.progress
            .line(format_args!("{}: {message}", self.label));
    }

    /// Runs the configuration; whatever happened, every QEMU still running is then checked
    /// for real-time threads (after the scheduling was undone and the daemon stopped) and
    /// only then stopped.
    fn run(&mut self, result: &mut ConfigResult) -> Result<()> {
        let mut guests = Vec::new();
        let outcome = self.run_guests(result, &mut guests);
        // Whatever run_guests left (a daemon, static RT) was undone when it returned.
        for running in &mut guests {
            let who = running.record.name.clone();
            running.record.exit_check =
                configrun::exit_check(&mut running.guest, &who, &|m| self.say(m));
            result
                .leftover_rt_threads
                .extend(configrun::leftover(running.record.exit_check.as_ref()));
        }
        result.heartbeat_advanced = !guests.is_empty()
            && guests
                .iter()
                .all(|running| running.record.heartbeat_after > running.record.heartbeat_before);
        let totals = SlotTotals::of(guests.iter().flat_map(|running| &running.record.slots));
        (result.boosts, result.throttles, result.boosted_ms) =
            (totals.boosts, totals.throttles, totals.boosted_ms);
        result.guests = guests
            .iter()
            .map(|running| {
                let mut record = running.record.clone();
                record.workload = running.workload.name().to_owned();
                record
            })
            .collect();
        drop(guests);
        outcome
    }

    /// Boots the guests into `guests`, applies the scheduling, measures, collects and undoes
    /// the scheduling (see the module documentation).
    fn run_guests(
        &mut self,
        result: &mut ConfigResult,
        guests: &mut Vec<RunningGuest>,
    ) -> Result<()> {
        let params = &self.spec.params;
        let scheduling = self.config.scheduling;
        let hostd_spec = match (&self.spec.hostd, scheduling.runs_daemon()) {
            (Err(reason), true) => {
                return Err(LabError::Run(format!("the daemon cannot run: {reason}")))
            }
            (Ok(spec), true) => Some(HostdSpec {
                rt_class: scheduling.daemon_rt_class().map(str::to_owned),
                ..spec.clone()
            }),
            (_, false) => None,
        };
        let config_dir = self.spec.run_dir.join(self.config.name());
        fs::create_dir_all(&config_dir).map_err(LabError::io("create", &config_dir))?;

        // 0. On the doorbell channel the daemon comes first: QEMU does not start without
        //    its ivshmem server, and finds it through its connection.
        let mut hostd = None;
        let doorbell = match &hostd_spec {
            Some(spec) if params.channel == Channel::Doorbell || self.config.doorbell => {
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
                    &config_dir,
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
                hostd = Some(daemon);
                Some(server)
            }
            _ => None,
        };

        // 1. Boot on a quiet host.
        for index in 0..params.guests {
            guests.push(self.boot(index, doorbell.as_deref())?);
        }
        for running in guests.iter_mut() {
            running.guest.wait_for_marker(MARKER_READY, READY_TIMEOUT)?;
            running.record.vcpu_tids = running.guest.vcpu_tids()?;
            running.record.qemu_pid = running.guest.pid();
            let page = match doorbell {
                // The daemon's memfd, as QEMU maps it.
                Some(_) => running.guest.doorbell_page().ok_or_else(|| {
                    LabError::Run(format!(
                        "{}: no pvsched memfd in QEMU's mappings",
                        running.record.name
                    ))
                })?,
                None => running.guest.shm_path().to_owned(),
            };
            running.page = Some(PageReader::open(&page, params.vcpus)?);
        }
        let vcpu_threads: Vec<(u32, u32)> = guests
            .iter()
            .flat_map(|running| {
                let pid = running.record.qemu_pid;
                running.record.vcpu_tids.iter().map(move |&tid| (pid, tid))
            })
            .collect();
        // What is sampled while the guests run: (guest, vCPU index or None for QEMU's main
        // thread, pid, tid).
        let sampled_threads: Vec<(usize, Option<usize>, u32, u32)> = guests
            .iter()
            .enumerate()
            .flat_map(|(guest, running)| {
                let pid = running.record.qemu_pid;
                running
                    .record
                    .vcpu_tids
                    .iter()
                    .enumerate()
                    .map(move |(vcpu, &tid)| (guest, Some(vcpu), pid, tid))
                    .chain(std::iter::once((guest, None, pid, pid)))
            })
            .collect();

        // 2. Scheduling.
        let mut static_rt = None;
        match scheduling {
            Scheduling::Vanilla => {}
            Scheduling::StaticRt => {
                let tids: Vec<u32> = vcpu_threads.iter().map(|&(_, tid)| tid).collect();
                self.say(format_args!(
                    "vCPU threads {tids:?} -> SCHED_FIFO {}",
                    params.static_rt_prio
                ));
                static_rt = Some(StaticRt::apply(&tids, params.static_rt_prio)?);
            }
            Scheduling::StaticRtAll => {
                let pids: Vec<u32> = guests
                    .iter()
                    .map(|running| running.record.qemu_pid)
                    .collect();
                let applied = StaticRt::apply_processes(&pids, params.static_rt_prio)?;
                self.say(format_args!(
                    "every QEMU thread {:?} -> SCHED_FIFO {}",
                    applied.threads(),
                    params.static_rt_prio
                ));
                static_rt = Some(applied);
            }
            Scheduling::Pvsched | Scheduling::PvschedDeadline if hostd.is_some() => {}
            Scheduling::Pvsched | Scheduling::PvschedDeadline => {
                let vms: Vec<HostdVm> = guests
                    .iter()
                    .map(|running| HostdVm {
                        name: running.record.name.clone(),
                        qmp: running.guest.qmp_path().to_owned(),
                        shm: running.guest.shm_path().to_owned(),
                    })
                    .collect();
                let name = self.config.name();
                let hostd_spec = hostd_spec.as_ref().ok_or_else(|| {
                    LabError::Run("no daemon specification for a pvsched run".into())
                })?;
                self.say("starting the daemon");
                hostd = Some(Hostd::start(
                    hostd_spec,
                    &vms,
                    &config_dir,
                    &self.spec.out_dir.join(format!("hostd-{name}.toml")),
                    &self.spec.out_dir.join(format!("hostd-{name}.log")),
                )?);
            }
        }

        // 3. Load, attach, warm-up, go.
        let load_started = Instant::now();
        let mut load = if params.load.is_empty() || self.config.idle {
            None
        } else {
            self.say(format_args!("host load: {}", params.load.describe()));
            // Stopped when host cyclictest ends; the timeout is only a backstop.
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
        self.wait_attached(guests, &mut hostd)?;
        let warmup = Duration::from_secs(params.warmup_s.into());
        if let Some(rest) = warmup.checked_sub(load_started.elapsed()) {
            thread::sleep(rest);
        }
        for running in guests.iter_mut() {
            if let Some(page) = &running.page {
                let snapshot = page.snapshot();
                running.record.module_attached = snapshot.guest_attached;
                running.record.heartbeat_before = snapshot.guest_heartbeat;
            }
        }
        let duration = Duration::from_secs(params.duration_s.into());
        let mut host_cyclictest = Some(HostCyclictest::start(
            &self.assets.cyclictest,
            HostCyclictestSpec {
                interval_us: params.interval_us,
                priority: params.host_cyclictest_prio,
                histogram_max_us: HOST_HISTOGRAM_US,
                threads: params.host_cpus,
            },
            duration,
            &config_dir,
        )?);
        // The machine's own stalls, beside host cyclictest, so its maximum can be read
        // against them.
        let mut stall_probe = Some(StallProbe::start(
            StallProbeSpec {
                cpus: params.host_cpus,
                interval_us: params.interval_us,
                task_priority: params.host_cyclictest_prio,
                // Just above every vCPU thread's RT priority (static RT's, which is
                // the daemon's highest boost unless the run says otherwise).
                above_boosts_priority: Some(params.static_rt_prio.saturating_add(1)).filter(|&p| {
                    p > params.host_cyclictest_prio && p < stallprobe::REFERENCE_PRIORITY
                }),
            },
            duration,
        )?);
        for running in guests.iter_mut() {
            running.guest.send_go()?;
        }
        let go = Instant::now();
        let daemon_pid = hostd.as_ref().map(Hostd::pid);
        let daemon_cpu_at_go = daemon_pid.and_then(|pid| process_cpu_ns(Path::new("/proc"), pid));
        let mut daemon_cpu_percent = None;
        self.say(format_args!("guests running, {} s left", params.duration_s));

        // 4. Sample while the guests run; stop the load when host cyclictest ends.
        let wait_timeout = duration + RESULT_SLACK + Duration::from_secs(60);
        let mut vcpu_shares: Vec<Vec<PolicyShare>> = guests
            .iter()
            .map(|running| vec![PolicyShare::default(); running.record.vcpu_tids.len()])
            .collect();
        let mut main_shares = vec![PolicyShare::default(); guests.len()];
        let mut throughput: Option<Throughput> = None;
        let mut host_latency = None;
        let mut host_stalls = None;
        let outputs: Vec<Result<GuestOutput>> = thread::scope(|scope| {
            let handles: Vec<_> = guests
                .iter_mut()
                .map(|running| scope.spawn(move || running.guest.wait_done(wait_timeout)))
                .collect();
            let mut next_progress = go + PROGRESS_PERIOD;
            while !handles.iter().all(|handle| handle.is_finished()) {
                // Only the measurement window: the histogram dump afterwards is not the
                // workload.
                if go.elapsed() < duration {
                    for &(guest, vcpu, pid, tid) in &sampled_threads {
                        if let Some(policy) = thread_policy(Path::new("/proc"), pid, tid) {
                            let share = match vcpu {
                                Some(vcpu) => &mut vcpu_shares[guest][vcpu],
                                None => &mut main_shares[guest],
                            };
                            share.record(policy.is_realtime());
                        }
                    }
                }
                let window_over = host_cyclictest
                    .as_mut()
                    .is_some_and(|running| !running.is_running() || go.elapsed() >= duration);
                if window_over {
                    daemon_cpu_percent = daemon_pid
                        .and_then(|pid| process_cpu_ns(Path::new("/proc"), pid))
                        .zip(daemon_cpu_at_go)
                        .map(|(now, then)| {
                            now.saturating_sub(then) as f64 / go.elapsed().as_nanos() as f64 * 100.0
                        });
                    // Stop the load with the measurement; cyclictest ends by itself.
                    if let Some(running) = &load {
                        running.interrupt();
                    }
                    host_latency = host_cyclictest
                        .take()
                        .map(|running| running.finish(Duration::from_secs(30)));
                    host_stalls = stall_probe.take().map(StallProbe::finish);
                    throughput = load
                        .take()
                        .map(|running| running.finish(Duration::from_secs(10)))
                        .transpose()
                        .unwrap_or_else(|error| {
                            self.say(format_args!("stress-ng: {error}"));
                            None
                        });
                    self.say("measurement window over; waiting for the guests' results");
                }
                if Instant::now() >= next_progress {
                    let left = duration.saturating_sub(go.elapsed()).as_secs();
                    if left > 0 {
                        self.say(format_args!("guests running, {left} s left"));
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
        // Guests that finished before the window closed (errors) leave these running.
        if let Some(running) = host_cyclictest.take() {
            host_latency = Some(running.finish(Duration::from_secs(30)));
        }
        if let Some(running) = stall_probe.take() {
            host_stalls = Some(running.finish());
        }
        if let Some(running) = load.take() {
            throughput = Some(running.finish(Duration::ZERO)?);
        }
        let all_vcpus = vcpu_shares
            .iter()
            .flatten()
            .fold(PolicyShare::default(), |sum, &share| sum.plus(share));
        result.policy_samples = all_vcpus.samples;
        result.rt_fraction = all_vcpus.fraction().unwrap_or(0.0);
        for ((running, shares), main) in guests.iter_mut().zip(vcpu_shares).zip(main_shares) {
            running.record.vcpu_policy = shares;
            running.record.main_thread_policy = main;
        }
        if let Some(throughput) = throughput {
            result.host.bogo_ops_per_s = throughput.geometric_mean();
            result.host.bogo_ops_per_s_total = throughput.bogo_ops_per_s;
            result.host.bogo_ops_per_s_by_stressor = throughput.per_stressor;
        }
        let stall_error = match host_stalls {
            Some(Ok(stalls)) => {
                result.host.stalls = Some(stalls);
                None
            }
            Some(Err(error)) => Some(error),
            None => None,
        };
        let host_error = match host_latency {
            Some(Ok(latency)) => {
                result.host.latency = figures(&latency.summary);
                result.host.histogram = latency.histogram;
                None
            }
            Some(Err(error)) => Some(error),
            None => Some(LabError::Run("host cyclictest did not run".into())),
        };

        // Guest results and the page, before the scheduling is undone.
        let mut guest_error = None;
        let mut summaries = Vec::new();
        let mut histograms = Vec::new();
        for (running, output) in guests.iter_mut().zip(outputs) {
            let log = self
                .spec
                .out_dir
                .join(format!("guest-{}.log", running.record.name));
            let _ = fs::write(&log, running.guest.console().join("\n"));
            match output.and_then(|output| parse_guest_output(&running.record.name, &output)) {
                Ok(parsed) => {
                    running.record.latency = figures(&parsed.summary);
                    running.record.module = parsed.module;
                    summaries.push(parsed.summary);
                    histograms.push(parsed.histogram);
                }
                Err(error) => {
                    guest_error.get_or_insert(error);
                }
            }
            if let Some(page) = &running.page {
                let snapshot = page.snapshot();
                running.record.heartbeat_after = snapshot.guest_heartbeat;
                running.record.slots = snapshot.slots;
            }
        }
        let buckets = merge_buckets(&histograms);
        result.guest = GuestSide {
            latency: figures(&merge_summaries(
                &summaries,
                &buckets,
                GUEST_HISTOGRAM_US.into(),
            )),
            histogram: buckets,
        };

        // 5. Undo the scheduling; `run` then checks the threads and stops QEMU.
        let mut teardown_error = None;
        if let Some(applied) = static_rt.take() {
            match applied.restore() {
                Ok(0) => {}
                Ok(inherited) => self.say(format_args!(
                    "{inherited} QEMU threads created during the run had inherited FIFO; returned them too"
                )),
                Err(error) => teardown_error = Some(error),
            }
        }
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
            // The counters as the daemon left them.
            for running in guests.iter_mut() {
                if let Some(page) = &running.page {
                    let snapshot = page.snapshot();
                    for (kept, last) in running.record.slots.iter_mut().zip(snapshot.slots) {
                        *kept = kept.max(last);
                    }
                }
            }
        }
        if let Some(error) = guest_error
            .or(host_error)
            .or(stall_error)
            .or(teardown_error)
        {
            return Err(error);
        }
        Ok(())
    }

    /// Boots guest `index` of this configuration.
    fn boot(&mut self, index: u32, doorbell: Option<&Path>) -> Result<RunningGuest> {
        let params = &self.spec.params;
        let rogue = self.config.rogue && index == 0;
        let (initramfs, workload) = self
            .initrds
            .get(if rogue { "rogue" } else { "cyclictest" })
            .ok_or_else(|| LabError::Run("initramfs missing".into()))?;
        let name = format!("lab{}-{}-{index}", std::process::id(), self.config.name());
        let mut config = GuestConfig::new(&name, &self.assets.kernel_image, &initramfs.path);
        config.vcpus = params.vcpus;
        config.memory_mib = params.memory_mib;
        config.accel = self.spec.accel;
        config.qemu = self.assets.qemu.clone();
        config.run_dir = self.spec.run_dir.clone();
        config.doorbell_server = doorbell.map(Path::to_path_buf);
        if !self.config.scheduling.runs_daemon() {
            config.shm_initial_contents = Some(static_host_header(params.vcpus));
        }
        self.say(format_args!(
            "booting guest {name} ({} vCPUs, {})",
            params.vcpus,
            workload.name()
        ));
        let guest = Guest::boot(&config)?;
        self.accelerator = self.accelerator.or(Some(guest.accelerator()));
        if let Some(reason) = guest.kvm_fallback() {
            self.kvm_fallback = Some(reason.to_owned());
        }
        let boot_ms = u64::try_from(guest.boot_time().as_millis()).unwrap_or(u64::MAX);
        Ok(RunningGuest {
            guest,
            workload: workload.clone(),
            page: None,
            record: GuestRun {
                name,
                boot_ms,
                rogue_vcpu: match workload {
                    Workload::Rogue { rogue_cpu, .. } => Some(*rogue_cpu),
                    _ => None,
                },
                ..GuestRun::default()
            },
        })
    }

    /// Waits until every guest module has attached to its page (the daemon formats the page
    /// under `pvsched`; see [`configrun::wait_attached`]).
    fn wait_attached(&self, guests: &[RunningGuest], hostd: &mut Option<Hostd>) -> Result<()> {
        let pages: Vec<Option<&PageReader>> =
            guests.iter().map(|running| running.page.as_ref()).collect();
        configrun::wait_attached(&pages, self.spec.module.is_some(), hostd, &|m| self.say(m))
    }
}

/// The parsed result of one guest.
struct ParsedGuest {
    summary: LatencySummary,
    histogram: Vec<(u64, u64)>,
    module: Option<String>,
}

/// Checks the workload's exit code and parses its cyclictest output.
fn parse_guest_output(name: &str, output: &GuestOutput) -> Result<ParsedGuest> {
    if output.exit_code != 0 {
        return Err(LabError::WorkloadFailed {
            name: name.to_owned(),
            code: output.exit_code,
            output: output.result.clone(),
        });
    }
    Ok(ParsedGuest {
        summary: parse_histogram(&output.result, GUEST_HISTOGRAM_US.into())?,
        histogram: histogram_buckets(&output.result),
        module: output.module.clone(),
    })
}

/// One line per VM of a saved `pvsched status --json`: how the daemon sees the guest
/// (attached, negotiated features, counters, last error), for the log.
pub(crate) fn daemon_view(path: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(status) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    let Some(vms) = status.get("vms").and_then(|vms| vms.as_array()) else {
        return Vec::new();
    };
    vms.iter()
        .map(|vm| {
            let field = |key: &str| vm.get(key).map_or("?".to_owned(), ToString::to_string);
            let counters = vm.get("counters");
            let counter = |key: &str| {
                counters
                    .and_then(|c| c.get(key))
                    .map_or("?".to_owned(), ToString::to_string)
            };
            format!(
                "vm {} guest {} features {} boosts {} throttles {} apply_errors {} last_error {}",
                field("name"),
                field("guest"),
                field("features"),
                counter("boosts"),
                counter("throttles"),
                counter("apply_errors"),
                field("last_error")
            )
        })
        .collect()
}

/// Scheduling changes the daemon applied to vCPU threads, summed over its VMs, from a
/// `pvsched status --json` document; `None` when it does not report them (an older daemon,
/// or not the daemon's status at all).
pub fn applied_changes(status_json: &str) -> Option<u64> {
    let status: serde_json::Value = serde_json::from_str(status_json).ok()?;
    let vms = status.get("vms")?.as_array()?;
    vms.iter()
        .map(|vm| vm.get("counters")?.get("applies")?.as_u64())
        .sum()
}

/// The daemon's apply latency from a `pvsched status --json` document (its histogram of
/// guest-line read to change applied); `None` without one or without changes.
pub fn apply_latency(status_json: &str) -> Option<ApplyLatency> {
    let status: serde_json::Value = serde_json::from_str(status_json).ok()?;
    let histogram = status.get("apply_latency")?;
    let numbers = |key: &str| -> Option<Vec<u64>> {
        histogram
            .get(key)?
            .as_array()?
            .iter()
            .map(serde_json::Value::as_u64)
            .collect()
    };
    let (bounds, counts) = (numbers("bounds_ns")?, numbers("counts")?);
    let count = histogram.get("count")?.as_u64()?;
    let sum_ns = histogram.get("sum_ns")?.as_u64()?;
    if count == 0 || counts.len() != bounds.len() + 1 {
        return None;
    }
    let quantile = |q: f64| {
        let target = (q * count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return bounds
                    .get(i)
                    .map_or(f64::INFINITY, |&ns| ns as f64 / 1000.0);
            }
        }
        f64::INFINITY
    };
    Some(ApplyLatency {
        count,
        mean_us: sum_ns as f64 / count as f64 / 1000.0,
        p50_us: quantile(0.5),
        p99_us: quantile(0.99),
    })
}

/// The report figures of a cyclictest summary.
pub(crate) fn figures(summary: &LatencySummary) -> LatencyFigures {
    LatencyFigures {
        samples: summary.samples,
        avg_us: summary.avg_us,
        p99_us: summary.p99_us,
        p99_is_lower_bound: summary.p99_is_lower_bound,
        max_us: summary.max_us,
        min_us: summary.min_us,
        overflows: summary.overflows,
    }
}

/// The default host load for this machine: seed 003's stressors, `--cpu` scaled to the
/// host's CPUs.
pub fn default_load(host_cpus: u32) -> LoadSpec {
    LoadSpec::seed003(host_cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_latency_summarises_the_daemons_histogram() {
        // 10 changes: 5 at <= 10 µs, 4 at <= 25 µs, 1 in the overflow bucket.
        let status = r#"{"apply_latency": {"bounds_ns": [10000, 25000], "counts": [5, 4, 1],
            "sum_ns": 300000, "count": 10}, "vms": []}"#;
        let a = apply_latency(status).expect("summary");
        assert_eq!(a.count, 10);
        assert_eq!(a.mean_us, 30.0);
        assert_eq!(a.p50_us, 10.0);
        assert!(a.p99_us.is_infinite());
        let nine = r#"{"apply_latency": {"bounds_ns": [10000, 25000], "counts": [5, 4, 0],
            "sum_ns": 90000, "count": 9}}"#;
        assert_eq!(apply_latency(nine).expect("summary").p99_us, 25.0);
        // No changes, a malformed histogram, or no histogram: no figure.
        let empty =
            r#"{"apply_latency": {"bounds_ns": [10], "counts": [0, 0], "sum_ns": 0, "count": 0}}"#;
        assert_eq!(apply_latency(empty), None);
        let short =
            r#"{"apply_latency": {"bounds_ns": [10], "counts": [3], "sum_ns": 5, "count": 3}}"#;
        assert_eq!(apply_latency(short), None);
        assert_eq!(apply_latency(r#"{"vms": []}"#), None);
    }

    #[test]
    fn applied_changes_sum_over_vms() {
        let status = r#"{"vms": [
            {"name": "a", "counters": {"boosts": 9, "applies": 12}},
            {"name": "b", "counters": {"boosts": 1, "applies": 3}}
        ]}"#;
        assert_eq!(applied_changes(status), Some(15));
        assert_eq!(applied_changes(r#"{"vms": []}"#), Some(0));
        // A daemon that does not report applied changes is not "zero applied".
        assert_eq!(
            applied_changes(r#"{"vms": [{"counters": {"boosts": 4}}]}"#),
            None
        );
        assert_eq!(applied_changes("not json"), None);
        assert_eq!(applied_changes(r#"{"loops": 3}"#), None);
    }
}
