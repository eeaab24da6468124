//! The daemon: VMs in, a periodic loop, restore on the way out.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use pvsched_policy::{HostBudget, ThreadSched};

use crate::actuator::{reconcile, ActError, Actuator, ReconcileReport};
use crate::clock::{Clock, MonotonicClock};
use crate::config::{HostConfig, HostConfigError};
use crate::discovery::discover;
use crate::procfs::{HostFs, HostSampler};
use crate::qmp::query_vm;
use crate::sched::{RealScheduler, ThreadScheduler};
use crate::status::{DaemonStatus, Histogram, VmStatus};
use crate::vm::{TickCtx, VmRuntime, VmSpec};

/// A change in the set of VMs, from the refresher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmUpdate {
    /// The VM runs with these threads.
    Up(VmSpec),
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
    /// Some threads could not be restored at exit.
    #[error("{0} thread(s) could not be restored; their records stay in the state file")]
    RestoreFailed(usize),
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
    reconcile: ReconcileReport,
    apply_latency: Histogram,
    loop_duration: Histogram,
    loops: u64,
    steps: u64,
    next_slow: u64,
    hook: Option<ApplyHook>,
    shut_down: bool,
}

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
            "pvsched: budgets per {} ms window: {} ms per thread, {} ms per VM, {} ms for the host ({}% of {cpus} CPU(s))",
            cfg.policy.budget_window_ns / 1_000_000,
            cfg.policy.budget_ns / 1_000_000,
            cfg.policy.vm_budget_ns / 1_000_000,
            host_budget.budget_ns() / 1_000_000,
            cfg.policy.host_budget_percent,
        );
        Ok(Daemon {
            host_budget,
            act: Actuator::new(sched, state_path, leftovers),
            host,
            fs,
            clock,
            opts,
            cfg,
            vms: BTreeMap::new(),
            pending: BTreeMap::new(),
            last_process: BTreeMap::new(),
            reconcile: report,
            apply_latency: Histogram::latency(),
            loop_duration: Histogram::latency(),
            loops: 0,
            steps: 0,
            next_slow: 0,
            hook: None,
            shut_down: false,
        })
    }

    /// Calls `hook` after every applied change (benchmarks measure latency with it).
    pub fn set_apply_hook(&mut self, hook: ApplyHook) {
        self.hook = Some(hook);
    }

    /// The host filesystem roots in use.
    pub fn fs(&self) -> &HostFs {
        &self.fs
    }

    /// Names of attached VMs.
    pub fn attached(&self) -> Vec<String> {
        self.vms.keys().cloned().collect()
    }

    fn drop_vm(&mut self, name: &str, why: &str) {
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
            VmUpdate::Up(spec) => {
                let name = spec.name.clone();
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
                match VmRuntime::attach(
                    spec.clone(),
                    &self.cfg.policy,
                    self.cfg.daemon.host_features,
                    fresh,
                    &self.fs,
                    self.opts.dry_run,
                ) {
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
                        self.vms.insert(name, vm);
                    }
                    Err(e) => {
                        let error = error_chain(&e);
                        eprintln!("pvsched: vm {name}: {error}");
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
            VmUpdate::Failed { name, error } => {
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.set_error(Some(error));
                } else {
                    self.pending.insert(name, Pending { spec: None, error });
                }
            }
            VmUpdate::Gone { name, reason } => {
                self.drop_vm(&name, &reason);
                self.pending.insert(
                    name,
                    Pending {
                        spec: None,
                        error: reason,
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
        if slow {
            self.host.sample();
            self.next_slow = start + self.cfg.daemon.host_info_ms * 1_000_000;
        }
        let clock = &self.clock;
        let now_fn = || clock.now_ns();
        let mut gone = Vec::new();
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
            if r.gone {
                gone.push(name.clone());
            }
        }
        self.hook = hook;
        for name in gone {
            self.drop_vm(&name, "its QEMU process exited");
        }
        self.loops += 1;
        let end = self.clock.now_ns();
        self.loop_duration.observe(end.saturating_sub(start));
        let mut next = start + period;
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
        DaemonStatus {
            time_ns: self.clock.now_ns(),
            period_us: self.cfg.daemon.period_us,
            loops: self.loops,
            steps: self.steps,
            dry_run: self.opts.dry_run,
            managed_threads: self.act.managed_count(),
            reconcile: self.reconcile.clone(),
            apply_latency: self.apply_latency.clone(),
            loop_duration: self.loop_duration.clone(),
            vms,
        }
    }

    /// Threads the daemon holds a restore record for.
    pub fn managed_tids(&self) -> Vec<i32> {
        self.act.managed_tids()
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

/// Finds VMs (configuration and discovery) and queries them over QMP.
pub struct Refresher {
    cfg: HostConfig,
    fs: HostFs,
    up: BTreeMap<String, PathBuf>,
}

impl Refresher {
    /// A refresher for a configuration.
    pub fn new(cfg: HostConfig) -> Self {
        let fs = HostFs::new(&cfg.daemon.proc_root, &cfg.daemon.sys_root);
        Refresher {
            cfg,
            fs,
            up: BTreeMap::new(),
        }
    }

    /// One pass: every configured and discovered VM, queried.
    pub fn poll(&mut self) -> Vec<VmUpdate> {
        struct Target {
            name: String,
            qmp: PathBuf,
            shm: PathBuf,
            boost_cpus: Option<Vec<u32>>,
            iothread_cpus: Option<Vec<u32>>,
            discovered: bool,
        }
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
                discovered: false,
            })
            .collect();
        if self.cfg.daemon.discover {
            for d in discover(&self.fs, &self.cfg.daemon.shm_dir) {
                if targets.iter().any(|t| t.shm == d.shm) {
                    continue;
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
                    discovered: true,
                });
            }
        }
        let timeout = Duration::from_millis(self.cfg.daemon.qmp_timeout_ms);
        let mut updates = Vec::new();
        let mut seen = BTreeMap::new();
        for t in targets {
            seen.insert(t.name.clone(), t.shm.clone());
            let update = match query_vm(&t.qmp, timeout) {
                Ok(q) if q.cpus.is_empty() => VmUpdate::Failed {
                    name: t.name.clone(),
                    error: "QMP reports no vCPU".into(),
                },
                Ok(q) => match self
                    .fs
                    .tgid_of(q.cpus[0].thread_id)
                    .and_then(|pid| self.fs.task_stat(pid, pid).map(|st| (pid, st.starttime)))
                {
                    Ok((pid, pid_starttime)) => VmUpdate::Up(VmSpec {
                        name: t.name.clone(),
                        qmp: Some(t.qmp.clone()),
                        shm: t.shm.clone(),
                        pid,
                        pid_starttime,
                        cpus: q.cpus,
                        possible_cpus: q.possible_cpus,
                        iothreads: q.iothreads,
                        boost_cpus: t.boost_cpus,
                        iothread_cpus: t.iothread_cpus,
                        discovered: t.discovered,
                    }),
                    Err(e) => VmUpdate::Failed {
                        name: t.name.clone(),
                        error: format!("finding the QEMU process: {}", error_chain(&e)),
                    },
                },
                Err(e) if e.is_absent() => VmUpdate::Gone {
                    name: t.name.clone(),
                    reason: format!("not running ({})", error_chain(&e)),
                },
                Err(e) => VmUpdate::Failed {
                    name: t.name.clone(),
                    error: format!("QMP: {}", error_chain(&e)),
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
        updates
    }
}

/// Serves `/metrics` (Prometheus text) and `/status` (JSON) on a loopback
/// address from the latest snapshot, on a thread named `pvsched-stats`.
pub fn serve_stats(
    addr: std::net::SocketAddr,
    snapshot: Arc<Mutex<DaemonStatus>>,
) -> std::io::Result<std::net::SocketAddr> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("pvsched-stats".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Role::Stats);
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 2048];
                let mut len = 0;
                while len < buf.len() {
                    match conn.read(&mut buf[len..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || buf[..len].contains(&b'\n') {
                        break;
                    }
                }
                let req = String::from_utf8_lossy(&buf[..len]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let status = snapshot.lock().map(|s| s.clone()).unwrap_or_default();
                let (code, ctype, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", status.prometheus()),
                    "/status" => (
                        "200 OK",
                        "application/json",
                        serde_json::to_string_pretty(&status).unwrap_or_default(),
                    ),
                    _ => ("404 Not Found", "text/plain", "try /metrics or /status\n".into()),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(bound)
}

/// Fetches a path from a running daemon's stats endpoint.
pub fn fetch_stats(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        Some((head, _)) => Err(std::io::Error::other(
            head.lines().next().unwrap_or("").to_owned(),
        )),
        None => Err(std::io::Error::other("malformed response")),
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
/// endpoint on `pvsched-stats`; the loop on the calling thread.
pub fn run(cfg: HostConfig, stop: Arc<AtomicBool>) -> Result<(), DaemonError> {
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
    let snapshot = Arc::new(Mutex::new(daemon.status()));
    if let Some(addr) = metrics_addr {
        let bound =
            serve_stats(addr, Arc::clone(&snapshot)).map_err(|source| DaemonError::Metrics {
                addr: addr.to_string(),
                source,
            })?;
        eprintln!("pvsched: metrics on http://{bound}/metrics, status on http://{bound}/status");
    }
    let (tx, rx) = mpsc::channel::<Vec<VmUpdate>>();
    let refresh_stop = Arc::clone(&stop);
    let refresh_ms = cfg.daemon.refresh_ms;
    let mut refresher = Refresher::new(cfg.clone());
    let refresh = std::thread::Builder::new()
        .name("pvsched-discover".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Role::Discover);
            while !refresh_stop.load(Ordering::Relaxed) {
                if tx.send(refresher.poll()).is_err() {
                    break;
                }
                let mut waited = 0;
                while waited < refresh_ms && !refresh_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10.min(refresh_ms)));
                    waited += 10;
                }
            }
        })
        .map_err(DaemonError::Signals)?;
    raise_loop_priority(&cfg);
    let clock = MonotonicClock;
    let mut next_snapshot = 0;
    eprintln!(
        "pvsched: hostd running, period {} µs, state file {}",
        cfg.daemon.period_us,
        cfg.daemon.state_file.display()
    );
    // Last: threads created after this inherit the loop's filter.
    crate::seccomp::enter(crate::seccomp::Role::Loop);
    while !stop.load(Ordering::Relaxed) {
        // Heartbeat for the watchdog process (one atomic store; see watchdog.rs).
        // First in the iteration, so a hang in the very first one is a stall too.
        crate::watchdog::beat();
        while let Ok(updates) = rx.try_recv() {
            for u in updates {
                daemon.handle(u);
            }
        }
        let next = daemon.tick();
        let now = clock.now_ns();
        if now >= next_snapshot {
            if let Ok(mut s) = snapshot.lock() {
                *s = daemon.status();
            }
            next_snapshot = now + 100_000_000;
        }
        let now = clock.now_ns();
        if next > now {
            std::thread::sleep(Duration::from_nanos(next - now));
        }
    }
    eprintln!("pvsched: stopping; restoring every changed thread");
    let result = daemon.shutdown();
    let _ = refresh.join();
    result
}
