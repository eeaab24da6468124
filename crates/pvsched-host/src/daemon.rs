//! The daemon: VMs in, a periodic loop, restore on the way out.
//!
//! Threads of a running daemon ([`run`]): the loop on the calling thread,
//! `SCHED_FIFO` above every boost; `pvsched-discover` (the [`Refresher`],
//! which also reads KVM's statistics of KVM guests at the host-information
//! cadence),
//! `pvsched-stats` ([`serve_stats`]: an acceptor and a few handlers), `pvsched-state` (the actuator's
//! state-file writer) and, with `ivshmem_server`, `pvsched-ivshmem` (the
//! [`crate::ivshmem`] server, which reports to the refresher) in the fair
//! class. The loop shares no lock with them:
//! VM updates come through a wait-free queue, status snapshots leave
//! through a triple buffer and state-file records through another (see
//! [`crate::handoff`]), so a boosted vCPU preempting a fair thread can
//! never stall the loop. The loop does no disk I/O: the writer thread makes
//! records durable and the first boost of a thread is deferred until its
//! record is (see [`crate::actuator`]). Log lines go to stderr, whose lock
//! only the loop takes (the other threads report through the hand-offs).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pvsched_policy::{HostBudget, ThreadSched};

use crate::actuator::{reconcile, ActError, Actuator, ReconcileReport};
use crate::clock::{Clock, MonotonicClock};
use crate::config::{HostConfig, HostConfigError};
use crate::discovery::{discover_with, parse_qemu_cmdline, MemoryBackend};
use crate::guestram::{RamLayout, RamQuery};
use crate::handoff::{latest, queue};
use crate::ivshmem::{Channel, IvshmemServer, ServerEvent};
use crate::procfs::{HostFs, HostSampler};
use crate::qmp::{KvmStats, QmpError, QueryPlan, RamReply};
use crate::sched::{RealScheduler, ThreadScheduler};
use crate::status::{DaemonStatus, Histogram, VmStatus, TRUST_METRICS};
use crate::trust::{
    connect_vetted, process_identity, vet_with, ProcessIdentity, RefusalLog, UserPolicy, VetError,
};
use crate::vm::{TickCtx, VmError, VmRuntime, VmSpec};
use crate::wake::LoopWaker;

pub use crate::stats_endpoint::{fetch_stats, serve_stats, stats_page, StatsPage};

/// A change in the set of VMs, from the refresher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmUpdate {
    /// The VM runs with these threads.
    Up(VmSpec),
    /// A doorbell VM runs with these threads; its memory and eventfds are
    /// the ivshmem server's channel with its QEMU process.
    Doorbell {
        /// The VM (`shm` names the channel's memfd).
        spec: VmSpec,
        /// The server's channel with the QEMU process.
        channel: Arc<Channel>,
    },
    /// The VM could not be queried; keep what is known while its process lives.
    Failed {
        /// VM.
        name: String,
        /// Why.
        error: String,
    },
    /// The VM is not running (any more).
    Gone {
        /// VM.
        name: String,
        /// Why.
        reason: String,
    },
    /// KVM's statistics of a KVM guest (or why they could not be read).
    KvmStats {
        /// VM.
        name: String,
        /// Its QEMU process.
        pid: i32,
        /// Start time of that process (a statistic of another is dropped).
        pid_starttime: u64,
        /// The statistics, or why not.
        stats: Result<KvmStats, String>,
    },
}

/// A daemon that could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] HostConfigError),
    /// The state file could not be reconciled.
    #[error(transparent)]
    State(#[from] ActError),
    /// The metrics endpoint could not be opened.
    #[error("metrics endpoint {addr}")]
    Metrics {
        /// Address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    /// The seccomp filters could not be built.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// KVM's halt-poll parameters cannot be read (or, in `tune` mode,
    /// written or restored from a previous daemon's undo file).
    #[error("halt_poll = \"{mode}\"")]
    HaltPoll {
        /// The configured mode.
        mode: crate::haltpoll::HaltPollMode,
        /// Why.
        #[source]
        source: crate::haltpoll::HaltPollError,
    },
    /// Some threads could not be restored at exit.
    #[error("{0} thread(s) could not be restored; their records stay in the state file")]
    RestoreFailed(usize),
    /// The ivshmem server socket could not be bound.
    #[error("ivshmem server {path}")]
    Ivshmem {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon runs on this host.
    #[error("another pvsched daemon{} holds {}; only one runs per host", match holder {
        Some(pid) => format!(" (pid {pid})"),
        None => String::new(),
    }, lock.display())]
    AlreadyRunning {
        /// The lock file.
        lock: PathBuf,
        /// Pid recorded in the lock file by its holder.
        holder: Option<u32>,
    },
    /// The lock file could not be opened or locked.
    #[error("lock file {lock}")]
    Lock {
        /// The lock file.
        lock: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The one-daemon-per-host lock: an exclusive `flock` on a file beside the
/// state file, holding the holder's pid. Released when dropped or when the
/// process dies (the kernel drops the lock with the last descriptor), so a
/// killed daemon never blocks the next one. The file itself stays: removing
/// it would let two daemons lock two different files of the same name.
#[derive(Debug)]
pub struct HostLock {
    path: PathBuf,
    _file: File,
}

impl HostLock {
    /// The lock file used for a state file: `<state_file>.lock`.
    pub fn path_for(state_file: &Path) -> PathBuf {
        let mut p = state_file.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }

    /// Takes the lock without waiting; a held lock is
    /// [`DaemonError::AlreadyRunning`] with the holder's pid.
    pub fn acquire(state_file: &Path) -> Result<Self, DaemonError> {
        let path = Self::path_for(state_file);
        let err = |source| DaemonError::Lock {
            lock: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        if !crate::sys::flock_exclusive_nonblocking(&file).map_err(err)? {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(DaemonError::AlreadyRunning {
                holder: text.trim().parse().ok(),
                lock: path,
            });
        }
        file.set_len(0).map_err(err)?;
        file.rewind().map_err(err)?;
        writeln!(file, "{}", std::process::id()).map_err(err)?;
        Ok(HostLock { path, _file: file })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// How the daemon runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DaemonOptions {
    /// Observe only: no scheduling change, no write to shared memory, no state file.
    pub dry_run: bool,
}

/// A VM known by name but not attached, with why.
#[derive(Clone, Debug)]
struct Pending {
    spec: Option<VmSpec>,
    error: String,
}

/// Apply hook: (vm, slot, tid, sched, done_ns).
pub type ApplyHook = Box<dyn FnMut(&str, u32, i32, ThreadSched, u64) + Send>;

/// The daemon's state and loop body, independent of threads and signals.
pub struct Daemon {
    cfg: HostConfig,
    opts: DaemonOptions,
    fs: HostFs,
    clock: Box<dyn Clock>,
    act: Actuator,
    host: HostSampler,
    /// The host-wide cap on boosted CPU time, shared by every VM.
    host_budget: HostBudget,
    vms: BTreeMap<String, VmRuntime>,
    pending: BTreeMap<String, Pending>,
    /// Last QEMU process seen behind each shared file, to tell a restart from a daemon start.
    last_process: BTreeMap<PathBuf, (i32, u64)>,
    /// VMs dropped for a truncated or replaced shared file, with the QEMU
    /// process (pid, start time) they were dropped under: not attached again
    /// while that process runs, since the file at the path is no longer the
    /// one it maps.
    broken_files: BTreeMap<String, (i32, u64)>,
    reconcile: ReconcileReport,
    apply_latency: Histogram,
    loop_duration: Histogram,
    loops: u64,
    steps: u64,
    shared_file_drops: u64,
    next_slow: u64,
    hook: Option<ApplyHook>,
    shut_down: bool,
    /// The loop's wait on doorbells and its deadline (`None`: it could not
    /// be set up, and the loop sleeps and polls).
    waker: Option<LoopWaker>,
    /// Doorbell tokens: the VM whose eventfd a token stands for.
    doorbell_vms: BTreeMap<u64, String>,
    next_doorbell_id: u64,
    /// A doorbell rang since the last tick.
    rung: bool,
    /// When the loop last saw nothing to do (no guest change, nothing
    /// boosted, no ring), for the event-driven back-off.
    quiet_since: Option<u64>,
    /// Rings received, all VMs.
    rings: u64,
    /// Time between host-information ticks now (see `SLOW_BACKOFF`).
    slow_interval: u64,
    /// The halt-poll thread's last status.
    halt_poll: Option<crate::haltpoll::HaltPollStatus>,
}

/// Longest host-information interval of a sleeping event-driven loop, in
/// multiples of `host_info_ms`.
const SLOW_BACKOFF: u64 = 10;

/// Doorbell tokens per VM: one per vector (at most this many).
const TOKENS_PER_VM: u64 = 256;
/// Loop periods an event-driven loop keeps polling after the last activity
/// before it sleeps until the next host-information tick.
const LINGER_PERIODS: u64 = 20;

impl Daemon {
    /// A daemon; reconciles a leftover state file first (unless `dry_run`).
    pub fn new(
        cfg: HostConfig,
        sched: Box<dyn ThreadScheduler>,
        clock: Box<dyn Clock>,
        opts: DaemonOptions,
    ) -> Result<Self, DaemonError> {
        cfg.validate()?;
        let fs = HostFs::new(&cfg.daemon.proc_root, &cfg.daemon.sys_root);
        let (report, leftovers) = if opts.dry_run {
            (ReconcileReport::default(), Vec::new())
        } else {
            reconcile(&cfg.daemon.state_file, sched.as_ref(), &fs)?
        };
        if !report.restored.is_empty() || !report.failed.is_empty() {
            eprintln!(
                "pvsched: state file {}: restored {} thread(s) left changed by a previous daemon, {} gone, {} failed",
                cfg.daemon.state_file.display(),
                report.restored.len(),
                report.gone.len(),
                report.failed.len()
            );
        }
        let state_path = (!opts.dry_run).then(|| cfg.daemon.state_file.clone());
        let mut host = HostSampler::new(&fs);
        host.sample();
        let cpus = fs.online_cpus();
        let host_budget = HostBudget::for_policy(&cfg.policy, cpus)
            .map_err(|e| DaemonError::Config(HostConfigError::Policy(e)))?;
        eprintln!(
            "pvsched: budgets per {} ms window: {} ms per thread, {} ms per VM, {} ms for the host ({}% of {cpus} CPU(s)); per {} µs burst window: {} µs per VM, {} µs for the host",
            cfg.policy.budget_window_ns / 1_000_000,
            cfg.policy.budget_ns / 1_000_000,
            cfg.policy.vm_budget_ns / 1_000_000,
            host_budget.budget_ns() / 1_000_000,
            cfg.policy.host_budget_percent,
            cfg.policy.effective_burst_window_ns() / 1_000,
            cfg.policy.vm_burst_ns / 1_000,
            host_budget.burst().map_or(0, |(ns, _)| ns / 1_000),
        );
        let act = Actuator::new(sched, fs.clone(), state_path, leftovers)?;
        Ok(Daemon {
            host_budget,
            act,
            host,
            fs,
            clock,
            opts,
            cfg,
            vms: BTreeMap::new(),
            pending: BTreeMap::new(),
            last_process: BTreeMap::new(),
            broken_files: BTreeMap::new(),
            reconcile: report,
            apply_latency: Histogram::latency(),
            loop_duration: Histogram::latency(),
            loops: 0,
            steps: 0,
            shared_file_drops: 0,
            next_slow: 0,
            hook: None,
            shut_down: false,
            waker: match LoopWaker::new() {
                Ok(w) => Some(w),
                Err(e) => {
                    eprintln!("pvsched: no event wait ({e}): the loop polls at its period");
                    None
                }
            },
            doorbell_vms: BTreeMap::new(),
            next_doorbell_id: 0,
            rung: false,
            quiet_since: None,
            rings: 0,
            slow_interval: 0,
            halt_poll: None,
        })
    }

    /// Wakes the loop when `fd` (an eventfd the guest of `vm` rings) is
    /// signalled. A doorbell VM's own eventfds are watched at attach; this
    /// is for others (the bench's stand-ins). Advertises a doorbell with the
    /// daemon's peer id 0 and one vector in the VM's header when
    /// `advertise` is set, so the guest can agree on it.
    pub fn watch_doorbell(
        &mut self,
        vm: &str,
        fd: std::os::fd::BorrowedFd<'_>,
        advertise: bool,
    ) -> std::io::Result<()> {
        let Some(runtime) = self.vms.get_mut(vm) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no VM {vm} attached"),
            ));
        };
        if advertise {
            if let Some(d) = pvsched_abi::Doorbell::new(0, 1) {
                runtime.advertise_doorbell(d);
            }
        }
        let Some(waker) = self.waker.as_mut() else {
            return Err(std::io::Error::other("the loop has no event wait"));
        };
        let id = self.next_doorbell_id;
        self.next_doorbell_id += 1;
        waker.watch(id * TOKENS_PER_VM, fd)?;
        self.doorbell_vms.insert(id, vm.to_owned());
        Ok(())
    }

    /// Watches every daemon-side eventfd of doorbell VM `name`.
    fn watch_channel(&mut self, name: &str) {
        let Some(waker) = self.waker.as_mut() else {
            return;
        };
        let Some(doorbell) = self.vms.get(name).and_then(VmRuntime::doorbell) else {
            return;
        };
        let id = self.next_doorbell_id;
        self.next_doorbell_id += 1;
        for (vector, fd) in doorbell.daemon_fds().into_iter().enumerate() {
            let vector = vector as u64;
            if vector >= TOKENS_PER_VM {
                break;
            }
            if let Err(e) = waker.watch(id * TOKENS_PER_VM + vector, fd) {
                eprintln!("pvsched: vm {name}: doorbell vector {vector} not watched: {e}");
            }
        }
        self.doorbell_vms.insert(id, name.to_owned());
    }

    fn unwatch_vm(&mut self, name: &str) {
        let ids: Vec<u64> = self
            .doorbell_vms
            .iter()
            .filter(|(_, vm)| vm.as_str() == name)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.doorbell_vms.remove(&id);
            if let Some(waker) = self.waker.as_mut() {
                for vector in 0..TOKENS_PER_VM {
                    waker.unwatch(id * TOKENS_PER_VM + vector);
                }
            }
        }
    }

    /// Waits until `next` (what [`Daemon::tick`] returned) or until a guest
    /// rings a watched doorbell; returns the rings received. Times are the
    /// daemon's clock, taken to be `CLOCK_MONOTONIC` (the real daemon's).
    pub fn wait(&mut self, next: u64) -> u64 {
        let now = self.clock.now_ns();
        let Some(waker) = self.waker.as_mut() else {
            if next > now {
                std::thread::sleep(Duration::from_nanos(next - now));
            }
            return 0;
        };
        let wake = match waker.wait_until(next, now) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("pvsched: event wait failed ({e}); polling from now on");
                self.waker = None;
                return 0;
            }
        };
        let mut rings = 0;
        for (token, n) in wake.doorbells {
            rings += n;
            if let Some(vm) = self
                .doorbell_vms
                .get(&(token / TOKENS_PER_VM))
                .and_then(|name| self.vms.get_mut(name))
            {
                vm.count_rings(n);
            }
        }
        if rings > 0 {
            self.rung = true;
            self.rings += rings;
        }
        rings
    }

    /// Calls `hook` after every applied change (benchmarks measure latency with it).
    pub fn set_apply_hook(&mut self, hook: ApplyHook) {
        self.hook = Some(hook);
    }

    /// The host filesystem roots in use.
    pub fn fs(&self) -> &HostFs {
        &self.fs
    }

    /// Waits (never on the loop thread) until every state-file record handed
    /// to the writer thread is on disk, or `timeout`; returns whether it is.
    pub fn wait_state_durable(&self, timeout: Duration) -> bool {
        self.act.wait_durable(timeout)
    }

    /// Names of attached VMs.
    pub fn attached(&self) -> Vec<String> {
        self.vms.keys().cloned().collect()
    }

    /// An attached VM.
    pub fn vm(&self, name: &str) -> Option<&VmRuntime> {
        self.vms.get(name)
    }

    fn drop_vm(&mut self, name: &str, why: &str) {
        self.unwatch_vm(name);
        if let Some(mut vm) = self.vms.remove(name) {
            let errors = vm.release(&mut self.act);
            if let Some(member) = vm.host_member() {
                self.host_budget.leave(member);
            }
            eprintln!("pvsched: vm {name} dropped: {why}");
            for e in errors {
                eprintln!("pvsched: vm {name}: restore failed: {e}");
            }
        }
    }

    /// Takes one update from the refresher.
    pub fn handle(&mut self, update: VmUpdate) {
        match update {
            VmUpdate::Up(spec) => self.vm_up(spec, None),
            VmUpdate::Doorbell { spec, channel } => self.vm_up(spec, Some(channel)),
            VmUpdate::Failed { name, error } => {
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.set_error(Some(error));
                } else {
                    self.pending.insert(name, Pending { spec: None, error });
                }
            }
            VmUpdate::KvmStats {
                name,
                pid,
                pid_starttime,
                stats,
            } => {
                if let Some(vm) = self.vms.get_mut(&name) {
                    let spec = vm.spec();
                    if (spec.pid, spec.pid_starttime) == (pid, pid_starttime) {
                        vm.set_kvm_stats(stats);
                    }
                }
            }
            VmUpdate::Gone { name, reason } => {
                self.drop_vm(&name, &reason);
                if self.cfg.vm.iter().any(|v| v.name == name) {
                    // A configured VM stays listed: the operator named it.
                    self.pending.insert(
                        name,
                        Pending {
                            spec: None,
                            error: reason,
                        },
                    );
                } else {
                    // A discovered VM that is gone is forgotten, or the
                    // daemon would remember every VM the host ever ran.
                    self.pending.remove(&name);
                }
                // The last process behind a shared file tells a QEMU restart
                // from a daemon start; once the file is gone, a new one at
                // that path is a new region anyway.
                self.last_process.retain(|path, _| path.exists());
            }
        }
    }

    /// A VM is up: remapped if attached to the same process, else attached
    /// (from its shared file, or from the ivshmem server's `channel`).
    fn vm_up(&mut self, spec: VmSpec, channel: Option<Arc<Channel>>) {
        let name = spec.name.clone();
        if let Some(&process) = self.broken_files.get(&name) {
            if process == (spec.pid, spec.pid_starttime) {
                // Still the process whose file broke: stays pending
                // with the error already logged.
                return;
            }
            self.broken_files.remove(&name);
        }
        if let Some(vm) = self.vms.get_mut(&name) {
            if vm.spec().same_process(&spec) {
                let act = (!self.opts.dry_run).then_some(&mut self.act);
                vm.remap(&spec, &self.fs, act);
                vm.set_error(None);
                return;
            }
            self.drop_vm(&name, "its QEMU process changed");
        }
        let fresh = self
            .last_process
            .get(&spec.shm)
            .is_some_and(|&p| p != (spec.pid, spec.pid_starttime));
        let attached = match channel {
            Some(channel) => VmRuntime::attach_doorbell(
                spec.clone(),
                channel,
                &self.cfg.policy,
                self.cfg.daemon.host_features,
                &self.fs,
                self.opts.dry_run,
            ),
            None => VmRuntime::attach(
                spec.clone(),
                &self.cfg.policy,
                self.cfg.daemon.host_features,
                fresh,
                &self.fs,
                self.opts.dry_run,
            ),
        };
        match attached {
            Ok(mut vm) => {
                self.last_process
                    .insert(spec.shm.clone(), (spec.pid, spec.pid_starttime));
                if !self.opts.dry_run {
                    // IOThread pinning needs the actuator.
                    vm.remap(&spec, &self.fs, Some(&mut self.act));
                }
                eprintln!(
                    "pvsched: vm {name} attached: pid {}, {} vCPU(s), {}",
                    spec.pid,
                    spec.cpus.len(),
                    spec.shm.display()
                );
                self.pending.remove(&name);
                self.vms.insert(name.clone(), vm);
                self.watch_channel(&name);
            }
            Err(e) => {
                let error = error_chain(&e);
                // Once per VM and error, not on every refresh.
                let repeated = self.pending.get(&name).is_some_and(|p| p.error == error);
                if !repeated {
                    if let VmError::Refused(r) = &e {
                        TRUST_METRICS.count_refusal(r.reason);
                        eprintln!("pvsched: vm {name}: not managed: {r}");
                    } else {
                        eprintln!("pvsched: vm {name}: {error}");
                    }
                }
                self.pending.insert(
                    name,
                    Pending {
                        spec: Some(spec),
                        error,
                    },
                );
            }
        }
    }

    /// One loop iteration. Returns the time by which the next must start.
    pub fn tick(&mut self) -> u64 {
        let start = self.clock.now_ns();
        let period = self.cfg.daemon.period_us * 1000;
        let slow = start >= self.next_slow;
        let host_info_ns = self.cfg.daemon.host_info_ms * 1_000_000;
        if slow {
            self.host.sample();
            self.next_slow = start + self.slow_interval.max(host_info_ns);
        }
        if !self.opts.dry_run {
            // Boosts deferred until their thread's record was durable.
            let (failed, writer_error) = self.act.apply_deferred();
            for (tid, e) in failed {
                eprintln!("pvsched: deferred change of thread {tid}: {e}");
                let message = e.to_string();
                for vm in self.vms.values_mut() {
                    if vm.deferred_apply_failed(tid, message.clone(), start) {
                        break;
                    }
                }
            }
            if let Some(e) = writer_error {
                eprintln!("pvsched: state file: {e} (boosts of new threads wait for it)");
            }
        }
        let clock = &self.clock;
        let now_fn = || clock.now_ns();
        let mut gone = Vec::new();
        let mut guest_changed = false;
        let mut hook = self.hook.take();
        let host_due = self.host_budget.wake_at().is_some_and(|w| w <= start);
        for (name, vm) in &mut self.vms {
            let mut on_apply = |slot: u32, tid: i32, sched: ThreadSched, done: u64| {
                if let Some(h) = hook.as_mut() {
                    h(name, slot, tid, sched, done);
                }
            };
            let mut ctx = TickCtx {
                now: start,
                slow,
                host: &self.host,
                act: (!self.opts.dry_run).then_some(&mut self.act),
                clock: &now_fn,
                apply_latency: &mut self.apply_latency,
                on_apply: Some(&mut on_apply),
                host_budget: Some(&mut self.host_budget),
                host_due,
            };
            let r = vm.tick(&mut ctx);
            if r.stepped {
                self.steps += 1;
            }
            guest_changed |= r.guest_changed;
            if r.gone {
                gone.push(name.clone());
            }
        }
        self.hook = hook;
        for name in gone {
            self.drop_vm(&name, "its QEMU process exited");
        }
        // A truncated shared file faults (the SIGBUS handler of
        // `pvsched_abi::mmap` maps zeros over it), a replaced or shrunk one
        // is seen on the slow tick: either way the VM is dropped.
        let broken: Vec<(String, String)> = self
            .vms
            .iter()
            .filter_map(|(name, vm)| Some((name.clone(), vm.shared_file_broken(slow)?)))
            .collect();
        for (name, why) in broken {
            let spec = self.vms.get(&name).map(|v| v.spec().clone());
            if let Some(s) = &spec {
                self.broken_files
                    .insert(name.clone(), (s.pid, s.pid_starttime));
            }
            self.drop_vm(&name, &why);
            self.shared_file_drops += 1;
            self.pending.insert(name, Pending { spec, error: why });
        }
        self.loops += 1;
        let end = self.clock.now_ns();
        self.loop_duration.observe(end.saturating_sub(start));
        // Event-driven while every VM's guest rings its doorbell: at the
        // period while something changes, rings or is boosted, then asleep
        // until the next host-information tick (or an earlier wake of an
        // engine or the host cap, or a ring). A VM that does not ring is
        // polled at the period, as is every VM without an event wait.
        let busy = guest_changed
            || std::mem::take(&mut self.rung)
            || self.vms.values().any(|vm| vm.boosted_threads() > 0);
        if busy {
            self.quiet_since = None;
        } else if self.quiet_since.is_none() {
            self.quiet_since = Some(start);
        }
        let event_driven = self.waker.is_some() && self.vms.values().all(VmRuntime::rings_doorbell);
        let lingering = self
            .quiet_since
            .is_none_or(|quiet| start < quiet + LINGER_PERIODS * period);
        // Host information is itself sampled less often while everything
        // sleeps (each slow tick reads every vCPU's /proc files): twice as
        // long after each quiet one, up to SLOW_BACKOFF times host_info_ms,
        // and at host_info_ms again as soon as anything happens.
        if event_driven && !lingering {
            if slow {
                self.slow_interval =
                    (self.slow_interval.max(host_info_ns) * 2).min(host_info_ns * SLOW_BACKOFF);
            }
        } else {
            self.slow_interval = host_info_ns;
            self.next_slow = self.next_slow.min(start + host_info_ns);
        }
        // Asleep, the loop still beats the watchdog's heartbeat well within
        // its stall timeout (a silent loop is a stalled one to the watchdog).
        let heartbeat_ns = self.cfg.watchdog_stall_ms() * 1_000_000 / 4;
        let mut next = if event_driven && !lingering {
            self.next_slow.min(start + heartbeat_ns).max(start + period)
        } else {
            start + period
        };
        for vm in self.vms.values() {
            if let Some(w) = vm.wake_at() {
                next = next.min(w.max(end));
            }
        }
        if let Some(w) = self.host_budget.wake_at() {
            next = next.min(w.max(end));
        }
        next
    }

    /// The halt-poll thread's latest status, for [`Daemon::status`].
    pub fn set_halt_poll(&mut self, status: crate::haltpoll::HaltPollStatus) {
        self.halt_poll = Some(status);
    }

    /// Current state of everything.
    pub fn status(&self) -> DaemonStatus {
        let mut vms: Vec<VmStatus> = self
            .vms
            .values()
            .map(|v| v.status_with_host(&self.host))
            .collect();
        for (name, p) in &self.pending {
            if self.vms.contains_key(name) {
                continue;
            }
            vms.push(VmStatus {
                name: name.clone(),
                pid: p.spec.as_ref().map_or(0, |s| s.pid),
                shm: p
                    .spec
                    .as_ref()
                    .map(|s| s.shm.display().to_string())
                    .unwrap_or_default(),
                guest: "not attached".into(),
                last_error: Some(p.error.clone()),
                ..Default::default()
            });
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        let now = self.clock.now_ns();
        DaemonStatus {
            time_ns: now,
            period_us: self.cfg.daemon.period_us,
            loops: self.loops,
            steps: self.steps,
            doorbell_rings: self.rings,
            event_wait: self.waker.is_some(),
            dry_run: self.opts.dry_run,
            managed_threads: self.act.managed_count(),
            budget_window_ns: self.host_budget.window_ns(),
            host_budget_ns: self.host_budget.budget_ns(),
            host_budget_used_ns: self.host_budget.used(now),
            state_durable: self.act.all_durable(),
            deferred_applies: self.act.counters().deferred,
            identity_refusals: self.act.counters().identity_refusals,
            state_write_errors: self.act.counters().state_write_errors,
            shared_file_drops: self.shared_file_drops,
            reconcile: self.reconcile.clone(),
            apply_latency: self.apply_latency.clone(),
            loop_duration: self.loop_duration.clone(),
            vms,
            trust: TRUST_METRICS.snapshot(),
            halt_poll: self.halt_poll.clone(),
        }
    }

    /// Threads the daemon holds a restore record for.
    pub fn managed_tids(&self) -> Vec<i32> {
        self.act.managed_tids()
    }

    /// The isolation this daemon asks for: the `realtime` VM's
    /// `isolate_cpus`, while that VM is attached (`None` otherwise, and
    /// always in a dry run).
    pub fn isolation_wanted(&self) -> Option<crate::isolate_request::IsolationRequest> {
        if self.opts.dry_run {
            return None;
        }
        let entry = self.cfg.vm.iter().find(|v| v.realtime)?;
        let spec = self.vms.get(&entry.name)?.spec();
        crate::isolate_request::IsolationRequest::for_vm(
            &self.cfg,
            &entry.name,
            spec.pid,
            spec.pid_starttime,
        )
    }

    /// Restores every changed thread. Idempotent.
    pub fn shutdown(&mut self) -> Result<(), DaemonError> {
        // From here a silent loop is a shutdown, not a stall (see watchdog.rs).
        crate::watchdog::stopping();
        self.shut_down = true;
        let errors = self.act.restore_all();
        for e in &errors {
            eprintln!("pvsched: restore failed: {e}");
        }
        self.vms.clear();
        if !self.act.wait_durable(Duration::from_secs(5)) {
            eprintln!("pvsched: the state file was not updated within 5 s of the restore");
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DaemonError::RestoreFailed(errors.len()))
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A panic or an early return must not leave a thread boosted.
        if !self.shut_down {
            let _ = self.shutdown();
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// Finds VMs (configuration and discovery) and queries them over QMP,
/// through the checks of [`crate::trust`].
pub struct Refresher {
    cfg: HostConfig,
    fs: HostFs,
    up: BTreeMap<String, PathBuf>,
    users: UserPolicy,
    /// The resolved `user` of each `[[vm]]` entry that has one.
    vm_users: BTreeMap<String, u32>,
    refusals: RefusalLog,
    /// What the ivshmem server thread reports.
    ivshmem: Option<std::sync::mpsc::Receiver<ServerEvent>>,
    /// The server's open channels, by QEMU pid.
    channels: BTreeMap<i32, Arc<Channel>>,
    /// QEMU processes (pid, start time) whose connection closed.
    closed: std::collections::BTreeSet<(i32, u64)>,
    /// VMs whose QEMU runs KVM, whose statistics [`Refresher::poll_kvm_stats`] reads.
    kvm: BTreeMap<String, KvmTarget>,
}

/// A KVM guest whose statistics are read between refreshes.
#[derive(Clone, Debug)]
struct KvmTarget {
    qmp: PathBuf,
    identity: ProcessIdentity,
    user: Option<u32>,
    /// QEMU refused `query-stats` (too old, or no KVM statistics): not asked again.
    unsupported: bool,
    /// The error last sent to the loop (the same one is not sent again).
    last_error: Option<String>,
}

/// The query plan for a QEMU process: `query-kvm`, and the RAM layout of
/// its shared guest-RAM backends (from its command line) when introspection
/// is on. Returns the plan and the guest's RAM backends.
fn plan_for(fs: &HostFs, introspection: bool, pid: i32) -> (QueryPlan, Vec<MemoryBackend>) {
    let mut plan = QueryPlan {
        kvm: true,
        ram_backends: Vec::new(),
    };
    if !introspection {
        return (plan, Vec::new());
    }
    let backends: Vec<MemoryBackend> = fs
        .cmdline(pid)
        .ok()
        .and_then(|args| parse_qemu_cmdline(&args))
        .map(|a| a.guest_ram_backends().into_iter().cloned().collect())
        .unwrap_or_default();
    plan.ram_backends = readable(&backends).map(|b| b.id.clone()).collect();
    (plan, backends)
}

/// The backends another process can read the guest's writes from.
fn readable(backends: &[MemoryBackend]) -> impl Iterator<Item = &MemoryBackend> {
    backends
        .iter()
        .filter(|b| b.share && b.size.is_some() && b.kind != crate::discovery::BackendKind::Ram)
}

/// What introspection can do with a VM, from its command line's RAM
/// backends and the session's reply.
fn ram_query(
    introspection: bool,
    backends: &[MemoryBackend],
    reply: Option<Result<RamReply, String>>,
) -> RamQuery {
    if !introspection {
        return RamQuery::Off;
    }
    let refs: Vec<&MemoryBackend> = backends.iter().collect();
    if let Some(why) = RamQuery::unshared(&refs) {
        return RamQuery::NoSharedRam(why);
    }
    let shared: Vec<MemoryBackend> = readable(backends).cloned().collect();
    match reply {
        Some(Ok(r)) => match RamLayout::build(&shared, &r.ranges, &r.hvas) {
            Ok(layout) => RamQuery::Layout(layout),
            Err(e) => RamQuery::Failed(e.to_string()),
        },
        Some(Err(e)) => RamQuery::Failed(e),
        None => RamQuery::Failed("the RAM layout was not queried".into()),
    }
}

impl Refresher {
    /// A refresher for a configuration. User names are resolved here, once;
    /// a name that does not resolve is one warning and allows nothing.
    pub fn new(cfg: HostConfig) -> Self {
        let fs = HostFs::new(&cfg.daemon.proc_root, &cfg.daemon.sys_root);
        let (users, warnings) = UserPolicy::system(&cfg.daemon.allowed_users);
        for w in warnings {
            eprintln!("pvsched: warning: {w}");
        }
        let mut vm_users = BTreeMap::new();
        for vm in &cfg.vm {
            let Some(user) = &vm.user else { continue };
            match crate::sys::uid_of_user(user) {
                Ok(Some(uid)) => {
                    vm_users.insert(vm.name.clone(), uid);
                }
                Ok(None) => eprintln!(
                    "pvsched: warning: vm {}: user {user:?} does not exist; only root and allowed_users are trusted for it",
                    vm.name
                ),
                Err(e) => eprintln!(
                    "pvsched: warning: vm {}: user {user:?} could not be looked up ({e}); only root and allowed_users are trusted for it",
                    vm.name
                ),
            }
        }
        Refresher {
            cfg,
            fs,
            up: BTreeMap::new(),
            users,
            vm_users,
            refusals: RefusalLog::default(),
            ivshmem: None,
            channels: BTreeMap::new(),
            closed: std::collections::BTreeSet::new(),
            kvm: BTreeMap::new(),
        }
    }

    /// Takes the ivshmem server's reports (accepted QEMU processes, their
    /// hang-ups, refusals): a discovered doorbell VM is attached from the
    /// channel of its process.
    pub fn with_ivshmem(mut self, events: std::sync::mpsc::Receiver<ServerEvent>) -> Self {
        self.ivshmem = Some(events);
        self
    }

    /// Logs and applies what the server thread reported since the last call.
    fn take_ivshmem_events(&mut self) {
        let Some(rx) = &self.ivshmem else { return };
        let server = self.cfg.daemon.ivshmem_server.clone().unwrap_or_default();
        while let Ok(event) = rx.try_recv() {
            eprintln!("pvsched: {}", event.log_line(&server));
            match event {
                ServerEvent::Accepted(channel) => {
                    self.closed
                        .remove(&(channel.pid(), channel.identity().starttime));
                    self.channels.insert(channel.pid(), channel);
                }
                ServerEvent::Closed { identity, .. } => {
                    if self
                        .channels
                        .get(&identity.pid)
                        .is_some_and(|c| c.identity().starttime == identity.starttime)
                    {
                        self.channels.remove(&identity.pid);
                    }
                    self.closed.insert((identity.pid, identity.starttime));
                }
                ServerEvent::Refused { refusal, .. } => {
                    TRUST_METRICS.count_refusal(refusal.reason);
                }
                ServerEvent::Failed { .. } => {}
            }
        }
    }

    /// The open channel of the QEMU process `identity`, if it has one.
    fn channel_of(&mut self, identity: &crate::trust::ProcessIdentity) -> Option<Arc<Channel>> {
        // The process may have connected after this pass began.
        self.take_ivshmem_events();
        self.channels
            .get(&identity.pid)
            .filter(|c| c.identity().starttime == identity.starttime)
            .cloned()
    }

    /// One pass: every configured and discovered VM, queried.
    pub fn poll(&mut self) -> Vec<VmUpdate> {
        struct Target {
            name: String,
            qmp: PathBuf,
            shm: PathBuf,
            boost_cpus: Option<Vec<u32>>,
            iothread_cpus: Option<Vec<u32>>,
            iothread_policy: Option<pvsched_policy::IoThreadPolicy>,
            /// The discovered process (`None`: a `[[vm]]` entry, whose
            /// process is the QMP socket's listener).
            pid: Option<i32>,
            user: Option<u32>,
            /// Served by the ivshmem server (its memory is the server's memfd).
            doorbell: bool,
            /// A libvirt domain: its threads from libvirt's records, no QMP.
            libvirt: Option<crate::libvirt::LibvirtDomain>,
        }
        self.take_ivshmem_events();
        let mut targets: Vec<Target> = self
            .cfg
            .vm
            .iter()
            .map(|v| Target {
                name: v.name.clone(),
                qmp: v.qmp.clone(),
                shm: v.shm.clone(),
                boost_cpus: v.boost_cpus.clone(),
                iothread_cpus: v.iothread_cpus.clone(),
                iothread_policy: v.iothread_policy(&self.cfg.policy),
                pid: None,
                user: self.vm_users.get(&v.name).copied(),
                doorbell: false,
                libvirt: None,
            })
            .collect();
        let server = self.cfg.daemon.ivshmem_server.clone();
        if self.cfg.daemon.discover || server.is_some() {
            for d in discover_with(&self.fs, &self.cfg.daemon.shm_dir, server.as_deref()) {
                // Without discovery, only QEMU processes that connected to the server.
                if !self.cfg.daemon.discover && !d.doorbell {
                    continue;
                }
                if targets.iter().any(|t| t.shm == d.shm) {
                    continue;
                }
                // Users first, before the process may claim a name or
                // the daemon reads a byte from its socket.
                match process_identity(&self.fs, d.pid) {
                    Ok(id) => {
                        if let Err(r) = self.users.check(&id, None) {
                            let key = format!("pid {} start {}", d.pid, id.starttime);
                            self.refusals.refuse(&key, &d.name, &r);
                            continue;
                        }
                    }
                    Err(_) => continue, // gone meanwhile
                }
                let mut name = d.name.clone();
                if targets.iter().any(|t| t.name == name) {
                    name = format!("{name}-{}", d.pid);
                }
                targets.push(Target {
                    name,
                    qmp: d.qmp,
                    shm: d.shm,
                    boost_cpus: None,
                    iothread_cpus: None,
                    iothread_policy: None,
                    pid: Some(d.pid),
                    user: None,
                    doorbell: d.doorbell,
                    libvirt: None,
                });
            }
        }
        if self.cfg.daemon.discover || server.is_some() {
            let source = crate::libvirt::LibvirtSource {
                fs: &self.fs,
                status_dir: &self.cfg.daemon.libvirt_status_dir,
                shm_dir: &self.cfg.daemon.shm_dir,
                ivshmem_server: server.as_deref(),
                owner: 0,
            };
            for found in crate::libvirt::discover(&source) {
                let d = match found {
                    Ok(d) => d,
                    Err(refused) => {
                        let key = format!("pid {}", refused.pid);
                        self.refusals.refuse(&key, &refused.name, &refused.refusal);
                        continue;
                    }
                };
                // Without discovery, only domains served by the ivshmem server.
                if (!self.cfg.daemon.discover && !d.doorbell)
                    || targets.iter().any(|t| t.shm == d.shm)
                {
                    continue;
                }
                if let Err(r) = self.users.check(&d.identity, None) {
                    let key = format!("pid {} start {}", d.identity.pid, d.identity.starttime);
                    self.refusals.refuse(&key, &d.name, &r);
                    continue;
                }
                let mut name = d.name.clone();
                if targets.iter().any(|t| t.name == name) {
                    name = format!("{name}-{}", d.identity.pid);
                }
                targets.push(Target {
                    name,
                    qmp: PathBuf::new(),
                    shm: d.shm.clone(),
                    boost_cpus: None,
                    iothread_cpus: None,
                    iothread_policy: None,
                    pid: Some(d.identity.pid),
                    user: None,
                    doorbell: d.doorbell,
                    libvirt: Some(d),
                });
            }
        }
        let timeout = Duration::from_millis(self.cfg.daemon.qmp_timeout_ms);
        let introspection = self.cfg.daemon.introspection;
        let mut updates = Vec::new();
        let mut seen = BTreeMap::new();
        let mut kvm_seen = BTreeMap::new();
        for t in targets {
            seen.insert(t.name.clone(), t.shm.clone());
            let mut backends = Vec::new();
            let fs = &self.fs;
            let vetted = match &t.libvirt {
                // libvirt's records, checked in discovery: no QMP session
                // (libvirt owns the monitor), so no KVM statistics and no
                // RAM layout for introspection.
                Some(d) => Ok(crate::trust::VettedVm {
                    identity: d.identity,
                    query: crate::qmp::VmQuery {
                        cpus: d.cpus.clone(),
                        possible_cpus: d.possible_cpus,
                        iothreads: d.iothreads.clone(),
                        kvm: None,
                        ram: None,
                    },
                }),
                None => vet_with(fs, &self.users, t.user, &t.qmp, t.pid, timeout, &mut |id| {
                    let (plan, b) = plan_for(fs, introspection, id.pid);
                    backends = b;
                    plan
                }),
            };
            let update = match vetted {
                Ok(v) if v.query.cpus.is_empty() => VmUpdate::Failed {
                    name: t.name.clone(),
                    error: "QMP reports no vCPU".into(),
                },
                Ok(v) => {
                    if v.query.kvm == Some(true) {
                        kvm_seen.insert(t.name.clone(), (t.qmp.clone(), v.identity, t.user));
                    }
                    let guest_ram = if t.libvirt.is_some() {
                        RamQuery::Off
                    } else {
                        ram_query(introspection, &backends, v.query.ram.clone())
                    };
                    let spec = VmSpec {
                        name: t.name.clone(),
                        qmp: t.libvirt.is_none().then(|| t.qmp.clone()),
                        shm: t.shm.clone(),
                        pid: v.identity.pid,
                        pid_starttime: v.identity.starttime,
                        cpus: v.query.cpus,
                        possible_cpus: v.query.possible_cpus,
                        iothreads: v.query.iothreads,
                        boost_cpus: t.boost_cpus,
                        iothread_cpus: t.iothread_cpus,
                        iothread_policy: t.iothread_policy,
                        discovered: t.pid.is_some(),
                        guest_ram,
                        kvm: v.query.kvm,
                    };
                    if !t.doorbell {
                        VmUpdate::Up(spec)
                    } else if let Some(channel) = self.channel_of(&v.identity) {
                        VmUpdate::Doorbell { spec, channel }
                    } else if self
                        .closed
                        .contains(&(v.identity.pid, v.identity.starttime))
                    {
                        VmUpdate::Gone {
                            name: t.name.clone(),
                            reason: "its ivshmem-doorbell connection closed".into(),
                        }
                    } else {
                        VmUpdate::Failed {
                            name: t.name.clone(),
                            error: format!(
                                "QEMU process {} has no connection on the ivshmem server {}: QEMU connects only when it starts, so a VM started before this daemon (or while it was stopped) cannot be served",
                                v.identity.pid,
                                server.as_deref().unwrap_or(Path::new("")).display()
                            ),
                        }
                    }
                }
                Err(VetError::Refused(r)) => {
                    let key = match t.pid {
                        Some(pid) => format!("pid {pid}"),
                        None => format!("vm {}", t.name),
                    };
                    self.refusals.refuse(&key, &t.name, &r);
                    VmUpdate::Gone {
                        name: t.name.clone(),
                        reason: r.to_string(),
                    }
                }
                Err(VetError::Qmp(e)) if e.is_absent() => VmUpdate::Gone {
                    name: t.name.clone(),
                    reason: format!("not running ({})", error_chain(&e)),
                },
                Err(VetError::Qmp(e)) => VmUpdate::Failed {
                    name: t.name.clone(),
                    error: format!("QMP: {}", error_chain(&e)),
                },
                Err(VetError::Vanished(why)) => VmUpdate::Failed {
                    name: t.name.clone(),
                    error: format!("checking the QEMU process: {why}"),
                },
            };
            updates.push(update);
        }
        for (name, _) in std::mem::take(&mut self.up) {
            if !seen.contains_key(&name) {
                updates.push(VmUpdate::Gone {
                    name,
                    reason: "its QEMU process is no longer found".into(),
                });
            }
        }
        self.up = seen;
        // KVM guests: a process seen again keeps what is known of it.
        let old = std::mem::take(&mut self.kvm);
        for (name, (qmp, identity, user)) in kvm_seen {
            let known = old.get(&name).filter(|k| k.identity == identity).cloned();
            self.kvm.insert(
                name,
                known.unwrap_or(KvmTarget {
                    qmp,
                    identity,
                    user,
                    unsupported: false,
                    last_error: None,
                }),
            );
        }
        // Hang-ups of processes that are gone need no remembering.
        let fs = &self.fs;
        self.closed
            .retain(|&(pid, start)| fs.task_stat(pid, pid).is_ok_and(|st| st.starttime == start));
        self.refusals.end_pass();
        updates
    }
}

impl Refresher {
    /// Reads KVM's statistics (`query-stats`) of every KVM guest the last
    /// [`Refresher::poll`] found, each over a new session with the vetted
    /// process ([`connect_vetted`]). A QEMU that refuses the command (too
    /// old) or reports no statistics is told once and not asked again; any
    /// other failure is told once until it changes.
    pub fn poll_kvm_stats(&mut self) -> Vec<VmUpdate> {
        let timeout = Duration::from_millis(self.cfg.daemon.qmp_timeout_ms);
        let mut updates = Vec::new();
        for (name, t) in &mut self.kvm {
            if t.unsupported {
                continue;
            }
            let read = connect_vetted(&self.fs, &self.users, t.user, &t.qmp, &t.identity, timeout)
                .map_err(|e| error_chain(&e))
                .and_then(|mut client| match client.query_kvm_stats() {
                    Ok(stats) if stats.vcpus.is_empty() => {
                        t.unsupported = true;
                        Err("QEMU reports no KVM statistics of its vCPUs".to_owned())
                    }
                    Ok(stats) => Ok(stats),
                    Err(e @ QmpError::Command { .. }) => {
                        t.unsupported = true;
                        Err(error_chain(&e))
                    }
                    Err(e) => Err(error_chain(&e)),
                });
            if let Err(e) = &read {
                if t.last_error.as_ref() == Some(e) {
                    continue;
                }
                t.last_error = Some(e.clone());
            } else {
                t.last_error = None;
            }
            updates.push(VmUpdate::KvmStats {
                name: name.clone(),
                pid: t.identity.pid,
                pid_starttime: t.identity.starttime,
                stats: read,
            });
        }
        updates
    }

    /// KVM guests whose statistics are read.
    pub fn kvm_guests(&self) -> Vec<String> {
        self.kvm
            .iter()
            .filter(|(_, t)| !t.unsupported)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// The body of `pvsched-ivshmem`: serves until `stop`, reporting every
/// event to the refresher.
fn serve_ivshmem(
    mut server: IvshmemServer,
    events: std::sync::mpsc::Sender<ServerEvent>,
    stop: Arc<AtomicBool>,
) {
    crate::seccomp::enter(crate::seccomp::Role::Ivshmem);
    while !stop.load(Ordering::Relaxed) {
        match server.poll(Duration::from_millis(100)) {
            Ok(batch) => {
                for e in batch {
                    if events.send(e).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let failed = ServerEvent::Failed {
                    pid: 0,
                    error: format!("waiting for clients: {e}"),
                    sent: false,
                };
                if events.send(failed).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The body of `pvsched-haltpoll`: one controller round per round of KVM
/// statistics from the refresher, with the host's mean pCPU load since the
/// last one; the original parameters restored when `stop` is set (or the
/// refresher is gone).
fn serve_halt_poll(
    mut tuner: crate::haltpoll::HaltPollTuner,
    fs: HostFs,
    rounds: std::sync::mpsc::Receiver<Vec<crate::haltpoll::VmKvmStats>>,
    mut status: crate::handoff::LatestWriter<crate::haltpoll::HaltPollStatus>,
    stop: Arc<AtomicBool>,
) {
    crate::seccomp::enter(crate::seccomp::Role::HaltPoll);
    let mut host = HostSampler::new(&fs);
    host.sample();
    let cpus = fs.online_cpus().max(1);
    let clock = MonotonicClock;
    let mut last_error = None;
    while !stop.load(Ordering::Relaxed) {
        let round = match rounds.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        host.sample();
        let load = (0..cpus).map(|c| host.load_permille(c)).sum::<u32>() / cpus;
        let s = tuner.round(clock.now_ns(), load, &round);
        if s.last_error != last_error {
            if let Some(e) = &s.last_error {
                eprintln!("pvsched: halt-poll: {e}");
            }
            last_error = s.last_error.clone();
        }
        status.publish(s.clone());
    }
    match tuner.restore() {
        Ok(Some(p)) => eprintln!(
            "pvsched: halt-poll parameters restored: halt_poll_ns {} grow {} grow_start {} shrink {}",
            p.halt_poll_ns, p.grow, p.grow_start_ns, p.shrink
        ),
        Ok(None) => {}
        Err(e) => eprintln!("pvsched: halt-poll parameters not restored: {e}"),
    }
    status.publish(tuner.status().clone());
}

/// The body of `pvsched-isolreq`: keeps the isolation request file as the
/// loop last asked (written atomically, or removed), so the loop never
/// touches the disk. At exit the file stays: isolation outlives a daemon
/// restart, and `pvsched isolate --sync` undoes it once the request's QEMU
/// process is gone.
fn serve_isolation_requests(
    path: PathBuf,
    wanted: std::sync::mpsc::Receiver<Option<crate::isolate_request::IsolationRequest>>,
    stop: Arc<AtomicBool>,
) {
    crate::seccomp::enter(crate::seccomp::Role::StateWriter);
    while !stop.load(Ordering::Relaxed) {
        let request = match wanted.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let (done, result) = match &request {
            Some(r) => (
                format!("isolation of CPUs {} for vm {} requested", r.cpus, r.vm),
                crate::isolate_request::write_request(&path, r),
            ),
            None => (
                "isolation request withdrawn".to_owned(),
                crate::isolate_request::remove_request(&path),
            ),
        };
        match result {
            Ok(()) => eprintln!("pvsched: {done} ({})", path.display()),
            Err(e) => eprintln!("pvsched: isolation request {}: {e}", path.display()),
        }
    }
}

/// Makes the calling (loop) thread `SCHED_FIFO` at the configured priority,
/// above every boost, with a 1 µs timer slack. Threads spawned before keep
/// the fair class. Failure is logged, not fatal.
pub fn raise_loop_priority(cfg: &HostConfig) {
    let _ = crate::sys::set_timer_slack_ns(1_000);
    if let Some(prio) = cfg.loop_rt_prio() {
        let attrs = crate::sched::SchedAttrs::rt(pvsched_policy::RtClass::Fifo, prio);
        if let Err(e) = RealScheduler.set_attrs(crate::sys::gettid(), &attrs) {
            eprintln!("pvsched: loop thread stays in the fair class: {e}");
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM (or `stop`), then restores every
/// changed thread. The refresher runs on `pvsched-discover`, the stats
/// endpoint on `pvsched-stats`, the state writer on `pvsched-state`; the
/// loop on the calling thread. Only one daemon runs per host: a second one
/// returns [`DaemonError::AlreadyRunning`] before touching anything.
pub fn run(cfg: HostConfig, stop: Arc<AtomicBool>) -> Result<(), DaemonError> {
    cfg.validate()?;
    // Before the reconciliation: two daemons must never restore or boost
    // the same threads from one state file.
    let lock = HostLock::acquire(&cfg.daemon.state_file)?;
    crate::seccomp::arm(cfg.daemon.seccomp)?;
    eprintln!(
        "pvsched: seccomp filter per thread role: {}",
        cfg.daemon.seccomp
    );
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(DaemonError::Signals)?;
    }
    let metrics_addr = cfg.metrics_addr()?;
    let mut daemon = Daemon::new(
        cfg.clone(),
        Box::new(RealScheduler),
        Box::new(MonotonicClock),
        DaemonOptions::default(),
    )?;
    // Before any thread: a previous daemon's halt-poll changes are put
    // back, and a mode this host cannot serve stops the start here.
    let halt_poll = match cfg.daemon.halt_poll {
        crate::haltpoll::HaltPollMode::Off => None,
        mode => Some(
            crate::haltpoll::HaltPollTuner::new(
                &cfg.daemon.sys_root,
                mode,
                cfg.daemon.halt_poll_bounds,
                crate::haltpoll::undo_path(&cfg.daemon.state_file),
            )
            .map_err(|source| DaemonError::HaltPoll { mode, source })?,
        ),
    };
    let (mut snapshot, snapshot_reader) = latest(daemon.status());
    if let Some(addr) = metrics_addr {
        let bound = serve_stats(addr, snapshot_reader).map_err(|source| DaemonError::Metrics {
            addr: addr.to_string(),
            source,
        })?;
        eprintln!("pvsched: metrics on http://{bound}/metrics, status on http://{bound}/status");
    }
    // Refresher → loop: a wait-free queue; when it is full the refresher
    // (fair class) waits, never the loop.
    let (mut tx, mut rx) = queue::<Vec<VmUpdate>>(16);
    let refresh_stop = Arc::clone(&stop);
    let refresh_ms = cfg.daemon.refresh_ms;
    let kvm_stats_ms = cfg.daemon.host_info_ms;
    let mut refresher = Refresher::new(cfg.clone());
    // The ivshmem server answers QEMU at once (QEMU waits for it while it
    // creates the device) on its own thread; what it serves goes to the
    // refresher, which pairs it with the discovered QEMU process.
    // Descriptors a service manager passed (its store) are taken once, here, whether
    // or not a server wants them: unused ones are closed.
    let mut inherited = crate::fdstore::take_from_env().unwrap_or_else(|e| {
        eprintln!("pvsched: descriptors from the service manager not taken: {e}");
        crate::fdstore::Inherited::default()
    });
    let ivshmem = match &cfg.daemon.ivshmem_server {
        Some(path) => {
            let (users, _) = UserPolicy::system(&cfg.daemon.allowed_users);
            let fs = HostFs::new(&cfg.daemon.proc_root, &cfg.daemon.sys_root);
            let mode = crate::ivshmem::socket_mode(&users);
            let mut server =
                IvshmemServer::bind(path, fs, users).map_err(|source| DaemonError::Ivshmem {
                    path: path.clone(),
                    source,
                })?;
            let store = crate::fdstore::Notifier::from_env().unwrap_or_else(|e| {
                eprintln!("pvsched: NOTIFY_SOCKET: {e}: doorbell VMs will not survive a restart");
                None
            });
            eprintln!(
                "pvsched: ivshmem server on {} (mode {mode:o}{})",
                path.display(),
                if store.is_some() {
                    ", clients kept in the service manager's descriptor store"
                } else {
                    ""
                }
            );
            server = server.with_store(store);
            let (tx, rx) = std::sync::mpsc::channel();
            // VMs served before a restart come back from the descriptor store.
            for event in server.restore(std::mem::take(&mut inherited.fds)) {
                let _ = tx.send(event);
            }
            refresher = refresher.with_ivshmem(rx);
            let stop = Arc::clone(&stop);
            Some(
                std::thread::Builder::new()
                    .name("pvsched-ivshmem".into())
                    .spawn(move || serve_ivshmem(server, tx, stop))
                    .map_err(DaemonError::Signals)?,
            )
        }
        None => None,
    };
    // Refresher → halt-poll thread: each round of KVM statistics (a full
    // channel drops the round: the next one carries the same counters).
    let (halt_tx, halt_poll_thread, mut halt_status) = match halt_poll {
        Some(tuner) => {
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let (writer, reader) = latest(tuner.status().clone());
            let fs = HostFs::new(&cfg.daemon.proc_root, &cfg.daemon.sys_root);
            let stop = Arc::clone(&stop);
            let handle = std::thread::Builder::new()
                .name("pvsched-haltpoll".into())
                .spawn(move || serve_halt_poll(tuner, fs, rx, writer, stop))
                .map_err(DaemonError::Signals)?;
            (Some(tx), Some(handle), Some(reader))
        }
        None => (None, None, None),
    };
    // Loop → pvsched-isolreq: the isolation the loop wants, when it
    // changes (try_send: the loop never waits; a full channel is retried).
    let (isolate_tx, isolate_thread) = if cfg.vm.iter().any(|v| v.realtime) {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let path = cfg.daemon.isolate_request.clone();
        let stop = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("pvsched-isolreq".into())
            .spawn(move || serve_isolation_requests(path, rx, stop))
            .map_err(DaemonError::Signals)?;
        (Some(tx), Some(handle))
    } else {
        (None, None)
    };
    // What pvsched-isolreq was last sent (at start: nothing asked, so a
    // request file a previous daemon left stays until the VM is seen).
    let mut isolation_sent = None;
    let mut isolation_due = false;
    let refresh = std::thread::Builder::new()
        .name("pvsched-discover".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Role::Discover);
            // Refreshes every refresh_ms; KVM's statistics of KVM guests
            // every host_info_ms in between.
            let mut next_refresh = std::time::Instant::now();
            let mut next_stats = next_refresh;
            while !refresh_stop.load(Ordering::Relaxed) {
                let now = std::time::Instant::now();
                let mut batch = Vec::new();
                if now >= next_refresh {
                    batch = refresher.poll();
                    next_refresh = now + Duration::from_millis(refresh_ms);
                }
                if now >= next_stats {
                    let stats = refresher.poll_kvm_stats();
                    if let Some(tx) = &halt_tx {
                        let round = stats
                            .iter()
                            .filter_map(|u| match u {
                                VmUpdate::KvmStats {
                                    name,
                                    pid,
                                    pid_starttime,
                                    stats: Ok(s),
                                } => Some((name.clone(), *pid, *pid_starttime, s.clone())),
                                _ => None,
                            })
                            .collect();
                        let _ = tx.try_send(round);
                    }
                    batch.extend(stats);
                    next_stats = now + Duration::from_millis(kvm_stats_ms);
                }
                if !batch.is_empty() {
                    while let Err(back) = tx.try_send(batch) {
                        if tx.is_disconnected() || refresh_stop.load(Ordering::Relaxed) {
                            return;
                        }
                        batch = back;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                let until = next_refresh.min(next_stats);
                let left = until.saturating_duration_since(std::time::Instant::now());
                std::thread::sleep(left.min(Duration::from_millis(10)));
            }
        })
        .map_err(DaemonError::Signals)?;
    raise_loop_priority(&cfg);
    let clock = MonotonicClock;
    let mut next_snapshot = 0;
    eprintln!(
        "pvsched: hostd running, period {} µs, state file {}, lock {}",
        cfg.daemon.period_us,
        cfg.daemon.state_file.display(),
        lock.path().display()
    );
    // Last: threads created after this inherit the loop's filter.
    crate::seccomp::enter(crate::seccomp::Role::Loop);
    while !stop.load(Ordering::Relaxed) {
        // Heartbeat for the watchdog process (one atomic store; see watchdog.rs).
        // First in the iteration, so a hang in the very first one is a stall too.
        crate::watchdog::beat();
        while let Some(updates) = rx.try_recv() {
            for u in updates {
                daemon.handle(u);
            }
            isolation_due = true;
        }
        if let (true, Some(tx)) = (isolation_due, &isolate_tx) {
            let wanted = daemon.isolation_wanted();
            isolation_due = false;
            if wanted != isolation_sent {
                match tx.try_send(wanted.clone()) {
                    Ok(()) => isolation_sent = wanted,
                    Err(std::sync::mpsc::TrySendError::Full(_)) => isolation_due = true,
                    Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {}
                }
            }
        }
        let next = daemon.tick();
        let now = clock.now_ns();
        if now >= next_snapshot {
            if let Some(s) = halt_status.as_mut().and_then(|r| r.fresh()) {
                daemon.set_halt_poll(s.clone());
            }
            // Histograms and counters included; the snapshot this replaces
            // in the loop's slot is freed here, on the loop thread.
            snapshot.publish(daemon.status());
            next_snapshot = now + 100_000_000;
        }
        daemon.wait(next);
    }
    eprintln!("pvsched: stopping; restoring every changed thread");
    let result = daemon.shutdown();
    drop(rx);
    let _ = refresh.join();
    if let Some(t) = halt_poll_thread {
        let _ = t.join();
    }
    drop(isolate_tx);
    if let Some(t) = isolate_thread {
        let _ = t.join();
    }
    if let Some(t) = ivshmem {
        let _ = t.join();
    }
    drop(daemon);
    drop(lock);
    result
}
