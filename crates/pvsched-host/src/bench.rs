//! `pvsched hostd-bench`: the daemon loop over N real (sleeping) threads
//! standing in for vCPUs and a real shared file, measuring
//!
//! - loop cost: CPU time of the loop thread (`CLOCK_THREAD_CPUTIME_ID`, so
//!   wakeups and syscalls are included) per iteration and per vCPU, and as a
//!   percentage of one core, with the guest quiet and with a guest writer
//!   toggling boost requests;
//! - apply latency: from the guest writer's store of a line (its
//!   `CLOCK_MONOTONIC` time) to the return of `sched_setattr` for it.
//!
//! With `doorbell`, the guest writer also rings a real eventfd after each
//! write, as QEMU's `ivshmem-doorbell` does when the guest writes the
//! daemon's peer id to its Doorbell register; the loop waits on it and
//! sleeps while nothing happens, as the daemon does for a doorbell VM.
//!
//! As root the real scheduler is used (threads really become `SCHED_RR`
//! and are restored); otherwise the fake one, and the report says so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_abi::{encode_guest_line, region_size_for, GuestVcpuState};
use serde::{Deserialize, Serialize};

use crate::clock::MonotonicClock;
use crate::config::HostConfig;
use crate::daemon::{Daemon, DaemonError, DaemonOptions, VmUpdate};
use crate::procfs::HostFs;
use crate::qmp::CpuInfo;
use crate::sched::{FakeScheduler, RealScheduler, ThreadScheduler};
use crate::sys;
use crate::vm::VmSpec;

/// What to measure.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchOptions {
    /// Threads standing in for vCPUs.
    pub vcpus: usize,
    /// Loop period (µs).
    pub period_us: u64,
    /// Length of each phase (quiet, then active) in seconds.
    pub phase_seconds: f64,
    /// Mean interval between guest writes in the active phase (µs).
    pub write_interval_us: u64,
    /// Host-information sampling interval (ms).
    pub host_info_ms: u64,
    /// Use the fake scheduler even as root.
    pub force_fake: bool,
    /// The guest rings a doorbell eventfd after each write (event-driven loop).
    pub doorbell: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            vcpus: 64,
            period_us: 1000,
            phase_seconds: 3.0,
            write_interval_us: 2000,
            host_info_ms: crate::config::DaemonConfig::default().host_info_ms,
            force_fake: false,
            doorbell: false,
        }
    }
}

/// One phase's loop cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseReport {
    /// Loop iterations.
    pub loops: u64,
    /// Wall time (s).
    pub wall_s: f64,
    /// CPU time of the loop thread (s).
    pub cpu_s: f64,
    /// CPU use as a percentage of one core.
    pub cpu_percent: f64,
    /// CPU per iteration (ns), wakeup included.
    pub ns_per_loop: f64,
    /// CPU per iteration per vCPU (ns).
    pub ns_per_loop_per_vcpu: f64,
    /// Mean duration of the loop body alone (ns), from the loop histogram.
    pub body_ns_mean: f64,
}

/// Apply-latency distribution (µs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Maximum.
    pub max_us: f64,
}

/// The whole report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// vCPU threads.
    pub vcpus: usize,
    /// Period (µs).
    pub period_us: u64,
    /// `real` (sched_setattr) or `fake`.
    pub scheduler: String,
    /// The same thread sleeping to the same period without doing anything:
    /// the kernel's wakeup cost, a floor no periodic loop goes below.
    pub floor: PhaseReport,
    /// Guest quiet.
    pub quiet: PhaseReport,
    /// Guest writing.
    pub active: PhaseReport,
    /// Guest write to `sched_setattr` done.
    pub latency: LatencyReport,
    /// The part of [`BenchReport::latency`] before the loop ran: from the guest's write
    /// to the loop awake (0 for a write the loop was already awake for).
    #[serde(default)]
    pub latency_wake: LatencyReport,
    /// The part after: from the loop awake (or the write, if later) to `sched_setattr`
    /// done: reading the lines, the engine, the change, publishing.
    #[serde(default)]
    pub latency_loop: LatencyReport,
    /// This machine's floor for the wake part, measured in the same run: the guest
    /// stand-in (fair class) writes an eventfd at the same random moments and the loop's
    /// thread, at the loop's priority, wakes from a blocking read of it.
    #[serde(default)]
    pub wake_floor: LatencyReport,
    /// Scheduling changes applied in the active phase.
    pub applies: u64,
    /// Throttles (should be 0: the stand-in threads sleep).
    pub throttles: u64,
    /// The guest rang a doorbell after each write.
    #[serde(default)]
    pub doorbell: bool,
    /// Rings the loop received (doorbell mode).
    #[serde(default)]
    pub rings: u64,
}

impl BenchReport {
    /// Text summary with the goals.
    pub fn text(&self) -> String {
        let goal_cpu = self.quiet.cpu_percent < 1.0;
        let per_apply_ns = if self.applies > 0 {
            (self.active.cpu_s
                - self.quiet.cpu_s * self.active.wall_s / self.quiet.wall_s.max(1e-9))
                * 1e9
                / self.applies as f64
        } else {
            0.0
        };
        let goal_lat = self.latency.p99_us <= self.period_us as f64 + 50.0;
        let ok = |b: bool| if b { "met" } else { "NOT met" };
        let doorbell = if self.doorbell {
            let quiet_ratio = self.quiet.cpu_percent / self.floor.cpu_percent.max(1e-9);
            format!(
                "doorbell: {} rings; quiet CPU {:.3}x the sleep floor (goal <= 0.2x: {}); apply p99 {:.1} µs (goal <= 100 µs: {})\n",
                self.rings,
                quiet_ratio,
                ok(quiet_ratio <= 0.2),
                self.latency.p99_us,
                ok(self.latency.p99_us <= 100.0),
            )
        } else {
            String::new()
        };
        doorbell + &format!(
            "pvsched hostd-bench: {} vCPU threads, period {} µs, {} scheduler\n\
             sleep floor : {:>6} loops, {:.3}% of one core, {:.0} ns/loop (wakeup cost alone)\n\
             quiet guest : {:>6} loops, {:.3}% of one core, {:.0} ns/loop ({:.1} ns per vCPU), body {:.0} ns\n\
             active guest: {:>6} loops, {:.3}% of one core, {:.0} ns/loop ({:.1} ns per vCPU), body {:.0} ns, {} applies, {} throttles\n\
             apply latency (guest write -> sched_setattr done), {} samples: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs\n\
             of which the write to the loop awake: p50 {:.1} µs, p99 {:.1} µs; the loop's own part: p50 {:.1} µs, p99 {:.1} µs\n\
             this machine's eventfd wake floor at the loop's priority, {} samples: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs\n\
             extra CPU per applied change (read, engine, sched_setattr, publish): {:.0} ns\n\
             goal <1% of one core (quiet guest, 64 vCPUs): {}; goal p99 <= period + 50 µs ({} µs): {}\n",
            self.vcpus,
            self.period_us,
            self.scheduler,
            self.floor.loops,
            self.floor.cpu_percent,
            self.floor.ns_per_loop,
            self.quiet.loops,
            self.quiet.cpu_percent,
            self.quiet.ns_per_loop,
            self.quiet.ns_per_loop_per_vcpu,
            self.quiet.body_ns_mean,
            self.active.loops,
            self.active.cpu_percent,
            self.active.ns_per_loop,
            self.active.ns_per_loop_per_vcpu,
            self.active.body_ns_mean,
            self.applies,
            self.throttles,
            self.latency.count,
            self.latency.p50_us,
            self.latency.p90_us,
            self.latency.p99_us,
            self.latency.max_us,
            self.latency_wake.p50_us,
            self.latency_wake.p99_us,
            self.latency_loop.p50_us,
            self.latency_loop.p99_us,
            self.wake_floor.count,
            self.wake_floor.p50_us,
            self.wake_floor.p99_us,
            self.wake_floor.max_us,
            per_apply_ns,
            ok(goal_cpu),
            self.period_us + 50,
            ok(goal_lat),
        )
    }
}

/// A failed benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up the shared file or threads.
    #[error("setting up: {0}")]
    Setup(String),
    /// The daemon refused.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

struct Cleanup {
    shm: std::path::PathBuf,
    dir: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.shm);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Per vCPU: the last guest write not yet applied (wants boost, write time).
type Pending = Vec<Option<(bool, u64)>>;

/// The `q` quantile (0..=1, nearest rank) of `sorted` nanosecond samples, in µs; 0 for
/// no samples.
pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

impl LatencyReport {
    /// The distribution of `samples` (ns).
    fn of(samples: &Mutex<Vec<u64>>) -> LatencyReport {
        let mut l = samples.lock().map(|l| l.clone()).unwrap_or_default();
        l.sort_unstable();
        LatencyReport {
            count: l.len(),
            p50_us: percentile(&l, 0.50),
            p90_us: percentile(&l, 0.90),
            p99_us: percentile(&l, 0.99),
            max_us: l.last().map_or(0.0, |&m| m as f64 / 1000.0),
        }
    }
}

/// Sleeps a random time below twice `interval_us`, as the guest stand-in does between
/// writes (xorshift from `state`).
fn random_pause(state: &mut u64, interval_us: u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    std::thread::sleep(Duration::from_micros(*state % (2 * interval_us.max(1))));
    *state
}

/// The wake floor: `samples` wakes of the calling thread (at its current policy) from a
/// blocking read of an eventfd that another, fair-class thread writes at random moments
/// (`interval_us` apart on average); each from the write to the read returned (ns).
fn eventfd_wake_floor(samples: usize, interval_us: u64) -> Result<Vec<u64>, BenchError> {
    let bell = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
        .map_err(|e| BenchError::Setup(format!("eventfd: {e}")))?;
    let writer_bell = bell
        .try_clone()
        .map_err(|e| BenchError::Setup(format!("eventfd: {e}")))?;
    let written_at = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Wakes taken so far: the writer writes again only after the last one was taken, so
    // that two writes never fold into one read.
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (written_at, taken) = (Arc::clone(&written_at), Arc::clone(&taken));
        std::thread::Builder::new()
            .name("pvsched-bench-ring".into())
            .spawn(move || {
                let mut rng = 0x2545_f491_4f6c_dd1du64;
                for i in 0..samples {
                    random_pause(&mut rng, interval_us);
                    while taken.load(Ordering::Acquire) < i {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    written_at.store(sys::monotonic_ns(), Ordering::Release);
                    if rustix::io::write(&writer_bell, &1u64.to_ne_bytes()).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| BenchError::Setup(e.to_string()))?
    };
    let mut wakes = Vec::with_capacity(samples);
    let mut value = [0u8; 8];
    for _ in 0..samples {
        if rustix::io::read(&bell, &mut value).is_err() {
            break;
        }
        let now = sys::monotonic_ns();
        wakes.push(now.saturating_sub(written_at.load(Ordering::Acquire)));
        taken.fetch_add(1, Ordering::Release);
    }
    let _ = writer.join();
    Ok(wakes)
}

/// Runs the benchmark.
pub fn run_bench(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let n = opts.vcpus.clamp(1, PVSCHED_MAX_SLOTS as usize);
    let me = std::process::id();
    let stop = Arc::new(AtomicBool::new(false));
    let shm = std::path::PathBuf::from(format!("/dev/shm/pvsched-bench-{me}"));
    let dir = std::env::temp_dir().join(format!("pvsched-bench-{me}"));
    let mut cleanup = Cleanup {
        shm: shm.clone(),
        dir: dir.clone(),
        stop: Arc::clone(&stop),
        threads: Vec::new(),
    };

    // Threads standing in for vCPUs: they sleep, as halted vCPUs do.
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..n {
        let (tx, stop) = (tx.clone(), Arc::clone(&stop));
        cleanup.threads.push(
            std::thread::Builder::new()
                .name(format!("CPU {i}/BENCH"))
                .spawn(move || {
                    let _ = tx.send((i, sys::gettid()));
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
                .map_err(|e| BenchError::Setup(e.to_string()))?,
        );
    }
    // The doorbell the guest writer rings (QEMU signals the same kind of
    // eventfd for a guest's Doorbell write).
    let bell = if opts.doorbell {
        Some(
            rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
            )
            .map_err(|e| BenchError::Setup(format!("eventfd: {e}")))?,
        )
    } else {
        None
    };
    let mut tids = vec![0; n];
    for _ in 0..n {
        let (i, t) = rx.recv().map_err(|e| BenchError::Setup(e.to_string()))?;
        tids[i] = t;
    }

    let len = region_size_for(n as u32).div_ceil(4096) * 4096;
    std::fs::File::create(&shm)
        .and_then(|f| f.set_len(len))
        .map_err(|e| BenchError::Setup(format!("{}: {e}", shm.display())))?;

    let mut cfg = HostConfig::default();
    cfg.daemon.period_us = opts.period_us;
    cfg.daemon.host_info_ms = opts.host_info_ms;
    cfg.daemon.state_file = dir.join("hostd.state");
    cfg.daemon.metrics_addr = String::new();
    cfg.daemon.discover = false;
    let real = sys::is_root() && !opts.force_fake;
    let sched: Box<dyn ThreadScheduler> = if real {
        Box::new(RealScheduler)
    } else {
        Box::new(FakeScheduler::permissive())
    };
    let mut daemon = Daemon::new(
        cfg,
        sched,
        Box::new(MonotonicClock),
        DaemonOptions::default(),
    )?;
    let fs = HostFs::default();
    let pid = me as i32;
    let pid_starttime = fs
        .task_stat(pid, pid)
        .map_err(|e| BenchError::Setup(e.to_string()))?
        .starttime;
    // This process stands in for QEMU, which maps its shared file.
    let file = SharedFile::open(&shm, None).map_err(|e| BenchError::Setup(e.to_string()))?;
    daemon.handle(VmUpdate::Up(VmSpec {
        name: "bench".into(),
        qmp: None,
        shm: shm.clone(),
        pid,
        pid_starttime,
        cpus: tids
            .iter()
            .enumerate()
            .map(|(i, &t)| CpuInfo {
                cpu_index: i as u32,
                thread_id: t,
                socket_id: None,
                core_id: None,
                smt_id: None,
            })
            .collect(),
        possible_cpus: None,
        iothreads: vec![],
        boost_cpus: None,
        iothread_cpus: None,
        iothread_policy: None,
        discovered: false,
        guest_ram: Default::default(),
        kvm: None,
    }));
    if daemon.attached().is_empty() {
        return Err(BenchError::Setup(format!("{:?}", daemon.status().vms)));
    }
    if let Some(bell) = &bell {
        use std::os::fd::AsFd;
        daemon
            .watch_doorbell("bench", bell.as_fd(), true)
            .map_err(|e| BenchError::Setup(format!("doorbell: {e}")))?;
    }
    // Records on disk first, so no measured boost is deferred for them.
    if !daemon.wait_state_durable(Duration::from_secs(10)) {
        return Err(BenchError::Setup(
            "state file not written within 10 s".into(),
        ));
    }
    let region = file.region();
    let _ = region.write_header_guest(&PvschedHeaderGuest {
        guest_version_major: PVSCHED_VERSION_MAJOR,
        guest_nr_cpus: n as u32,
        guest_features: PVSCHED_FEAT_KNOWN,
        guest_state: PVSCHED_GUEST_ATTACHED,
        ..Default::default()
    });
    let line = |cpu: u32, boost: bool, updates: u64| {
        encode_guest_line(&GuestVcpuState::requesting(
            cpu,
            boost.then_some(10),
            updates,
        ))
    };
    for i in 0..n as u32 {
        let _ = region.write_guest_line(i, &line(i, false, 0));
    }

    // Pending guest writes: (wants boost, write time); the hook matches applies to them.
    let pending: Arc<Mutex<Pending>> = Arc::new(Mutex::new(vec![None; n]));
    // Whole latencies, and their parts before and after the loop woke.
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let wake_parts: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let loop_parts: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    // When the loop last returned from its wait (the phase loop sets it).
    let woke_at = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (pending, latencies) = (Arc::clone(&pending), Arc::clone(&latencies));
        let (wake_parts, loop_parts) = (Arc::clone(&wake_parts), Arc::clone(&loop_parts));
        let woke_at = Arc::clone(&woke_at);
        daemon.set_apply_hook(Box::new(move |_vm, slot, _tid, sched, done| {
            if let Ok(mut p) = pending.lock() {
                if let Some(Some((want, at))) = p.get(slot as usize).copied() {
                    if want == sched.is_boosted() {
                        p[slot as usize] = None;
                        let woke = woke_at.load(Ordering::Relaxed).max(at);
                        for (samples, ns) in [
                            (&latencies, done.saturating_sub(at)),
                            (&wake_parts, woke - at),
                            (&loop_parts, done.saturating_sub(woke)),
                        ] {
                            if let Ok(mut l) = samples.lock() {
                                l.push(ns);
                            }
                        }
                    }
                }
            }
        }));
    }

    // The loop thread as the daemon runs it (FIFO above the boosts, as root).
    let loop_cfg = HostConfig {
        daemon: crate::config::DaemonConfig {
            loop_rt_prio: if real { None } else { Some(0) },
            ..Default::default()
        },
        ..Default::default()
    };
    let before_loop = RealScheduler.get_attrs(sys::gettid()).ok();
    crate::daemon::raise_loop_priority(&loop_cfg);
    let phase = |daemon: &mut Daemon, seconds: f64| -> PhaseReport {
        let before = daemon.status();
        let (w0, c0) = (sys::monotonic_ns(), sys::thread_cpu_ns());
        let end = w0 + (seconds * 1e9) as u64;
        loop {
            let next = daemon.tick();
            let now = sys::monotonic_ns();
            if now >= end {
                break;
            }
            // The phase ends on time even while the loop sleeps long.
            daemon.wait(next.min(end));
            woke_at.store(sys::monotonic_ns(), Ordering::Relaxed);
        }
        let (w1, c1) = (sys::monotonic_ns(), sys::thread_cpu_ns());
        let after = daemon.status();
        let loops = after.loops - before.loops;
        let cpu = (c1 - c0) as f64;
        let body = after.loop_duration.sum_ns - before.loop_duration.sum_ns;
        PhaseReport {
            loops,
            wall_s: (w1 - w0) as f64 / 1e9,
            cpu_s: cpu / 1e9,
            cpu_percent: 100.0 * cpu / (w1 - w0) as f64,
            ns_per_loop: cpu / loops.max(1) as f64,
            ns_per_loop_per_vcpu: cpu / loops.max(1) as f64 / n as f64,
            body_ns_mean: body as f64 / loops.max(1) as f64,
        }
    };

    let floor = {
        let period = opts.period_us * 1000;
        let (w0, c0) = (sys::monotonic_ns(), sys::thread_cpu_ns());
        let end = w0 + (opts.phase_seconds * 1e9) as u64;
        let mut next = w0;
        let mut loops = 0u64;
        loop {
            next += period;
            loops += 1;
            let now = sys::monotonic_ns();
            if now >= end {
                break;
            }
            if next > now {
                std::thread::sleep(Duration::from_nanos(next - now));
            }
        }
        let (w1, c1) = (sys::monotonic_ns(), sys::thread_cpu_ns());
        let cpu = (c1 - c0) as f64;
        PhaseReport {
            loops,
            wall_s: (w1 - w0) as f64 / 1e9,
            cpu_s: cpu / 1e9,
            cpu_percent: 100.0 * cpu / (w1 - w0) as f64,
            ns_per_loop: cpu / loops as f64,
            ns_per_loop_per_vcpu: 0.0,
            body_ns_mean: 0.0,
        }
    };
    // Let the first slow tick and any warm-up pass.
    let _ = phase(&mut daemon, 0.1);
    let quiet = phase(&mut daemon, opts.phase_seconds);

    // The guest writer: toggles one vCPU's request at a time, at random moments.
    let writer_stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pending, writer_stop) = (Arc::clone(&pending), Arc::clone(&writer_stop));
        let shm = shm.clone();
        let interval = opts.write_interval_us.max(1);
        let bell = bell
            .as_ref()
            .map(|b| b.try_clone())
            .transpose()
            .map_err(|e| BenchError::Setup(format!("doorbell: {e}")))?;
        std::thread::Builder::new()
            .name("pvsched-bench-guest".into())
            .spawn(move || {
                let Ok(file) = SharedFile::open(&shm, None) else {
                    return;
                };
                let region = file.region();
                // Bursts, as a guest with latency-sensitive work makes them:
                // a vCPU asks for a boost, holds it 0.5..4.5 ms, then ends it.
                let mut hold_until: Vec<Option<u64>> = vec![None; n];
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(me);
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut updates = 1u64;
                while !writer_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(next() % (2 * interval)));
                    let Ok(mut p) = pending.lock() else { return };
                    let now = sys::monotonic_ns();
                    let mut wrote = false;
                    let mut write = |cpu: usize, boost: bool, p: &mut Pending| {
                        updates += 1;
                        let at = sys::monotonic_ns();
                        let _ =
                            region.write_guest_line(cpu as u32, &line(cpu as u32, boost, updates));
                        p[cpu] = Some((boost, at));
                        wrote = true;
                    };
                    for cpu in 0..n {
                        if hold_until[cpu].is_some_and(|u| u <= now) && p[cpu].is_none() {
                            hold_until[cpu] = None;
                            write(cpu, false, &mut p);
                        }
                    }
                    let cpu = (next() >> 32) as usize % n;
                    if hold_until[cpu].is_none() && p[cpu].is_none() {
                        hold_until[cpu] = Some(now + 500_000 + next() % 4_000_000);
                        write(cpu, true, &mut p);
                    }
                    // Ring once the lock is released: the loop's apply hook takes
                    // it, and a woken loop must not wait for this thread.
                    drop(p);
                    if let (true, Some(bell)) = (wrote, &bell) {
                        let _ = rustix::io::write(bell, &1u64.to_ne_bytes());
                    }
                }
            })
            .map_err(|e| BenchError::Setup(e.to_string()))?
    };
    let applies_before: u64 = daemon.status().vms.iter().map(|v| v.counters.applies).sum();
    let active = phase(&mut daemon, opts.phase_seconds);
    writer_stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let applies = daemon
        .status()
        .vms
        .iter()
        .map(|v| v.counters.applies)
        .sum::<u64>()
        - applies_before;
    // The machine's own wake cost, at the loop's priority, as many wakes as the active
    // phase had writes on average (at least 200).
    let floor_samples = ((opts.phase_seconds * 1e6) / opts.write_interval_us.max(1) as f64)
        .clamp(200.0, 20_000.0) as usize;
    let wake_floor = Mutex::new(eventfd_wake_floor(floor_samples, opts.write_interval_us)?);
    let wake_floor = LatencyReport::of(&wake_floor);
    if let Some(a) = before_loop {
        let _ = RealScheduler.set_attrs(sys::gettid(), &a);
    }
    let throttles = daemon
        .status()
        .vms
        .iter()
        .map(|v| v.counters.throttles)
        .sum::<u64>();
    let rings = daemon.status().doorbell_rings;
    daemon.shutdown()?;

    let latency = LatencyReport::of(&latencies);
    drop(cleanup);
    Ok(BenchReport {
        vcpus: n,
        period_us: opts.period_us,
        scheduler: if real { "real" } else { "fake" }.into(),
        floor,
        quiet,
        active,
        latency,
        latency_wake: LatencyReport::of(&wake_parts),
        latency_loop: LatencyReport::of(&loop_parts),
        wake_floor,
        applies,
        throttles,
        doorbell: opts.doorbell,
        rings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_nearest_rank_in_microseconds() {
        let values: Vec<u64> = (1..=200).map(|us| us * 1_000).collect();
        assert_eq!(percentile(&values, 0.99), 198.0);
        assert_eq!(percentile(&[7_000], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }

    #[test]
    fn a_short_run_reports_every_figure() {
        let r = run_bench(&BenchOptions {
            vcpus: 4,
            phase_seconds: 0.2,
            write_interval_us: 1000,
            force_fake: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.scheduler, "fake");
        assert!(r.quiet.loops > 0 && r.active.loops > 0);
        assert!(r.latency.count > 0);
        // Every latency is split in two parts that add up to it, and the wake floor ran.
        assert_eq!(r.latency_wake.count, r.latency.count);
        assert_eq!(r.latency_loop.count, r.latency.count);
        assert!(
            r.latency_wake.p50_us <= r.latency.max_us && r.latency_loop.p50_us <= r.latency.max_us
        );
        assert!(r.wake_floor.count >= 200);
        assert!(r.text().contains("apply latency") && r.text().contains("wake floor"));
    }

    #[test]
    fn with_a_doorbell_the_quiet_loop_sleeps_and_rings_are_applied() {
        let opts = BenchOptions {
            vcpus: 4,
            phase_seconds: 0.4,
            write_interval_us: 1000,
            force_fake: true,
            ..Default::default()
        };
        let polled = run_bench(&opts).unwrap();
        let rung = run_bench(&BenchOptions {
            doorbell: true,
            ..opts
        })
        .unwrap();
        assert_eq!(polled.rings, 0);
        assert!(rung.doorbell && rung.rings > 0, "{rung:?}");
        assert!(rung.latency.count > 0, "no ring was applied: {rung:?}");
        // Quiet, the event-driven loop waits for the host-information tick
        // instead of polling every period.
        assert!(
            rung.quiet.loops * 2 < polled.quiet.loops,
            "quiet loops: {} with a doorbell, {} polled",
            rung.quiet.loops,
            polled.quiet.loops
        );
        assert!(rung.text().contains("doorbell:"));
    }
}
