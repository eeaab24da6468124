//! The two-level model: host pCPUs and scheduler, vCPU threads, guest
//! schedulers and tasks, locks, interrupts, I/O paths, and the policies.
//!
//! One [`Sim`] is one host. Everything is indexed by `u32` into flat vectors;
//! the hot paths allocate nothing. Each pCPU keeps at most one live timer
//! event ([`Ev::Cpu`]) for the next thing due on it; changing anything on a
//! pCPU first accounts the time since its last change ([`Sim::account`]),
//! then mutates, then reprograms its timer.
//!
//! The state types live with the code that owns them, one module per seam:
//! `host` (pCPUs, host threads, the host scheduler), `vcpu` (vCPU threads:
//! guest execution, halt and halt-polling, interrupt delivery), `guest` (the
//! guest scheduler and its tasks), `locks` (guest spinlocks, pause-loop exits,
//! directed yield), `emulator` (emulated I/O and the global lock), `daemon`
//! (the simulated guest module and daemon around `VmController`), `invariants`
//! (checks for tests) and `build` (a host's simulation from a scenario). This
//! module holds the host-wide state and the main loop; every submodule works
//! on the same [`Sim`].

mod build;
mod daemon;
mod emulator;
mod guest;
mod hackbench;
mod haltpoll_ctl;
mod host;
mod invariants;
mod locks;
mod vcpu;

use daemon::*;
use emulator::*;
use guest::*;
use haltpoll_ctl::*;

use hackbench::*;
pub use haltpoll_ctl::HaltPollCtlStats;
use host::*;
use locks::*;
use vcpu::*;

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;

use pvsched_abi::raw::{
    PvschedHeaderGuest, PVSCHED_FEAT_BOOST, PVSCHED_FEAT_BOOST_REQUEST,
    PVSCHED_FEAT_CRITICAL_SECTION, PVSCHED_FEAT_IRQ, PVSCHED_FEAT_KNOWN,
    PVSCHED_FEAT_PREEMPT_COUNT_GPA, PVSCHED_FEAT_RT_PENDING, PVSCHED_FEAT_TASK_INFO,
    PVSCHED_GUEST_ATTACHED, PVSCHED_VERSION_MAJOR, PVSCHED_VERSION_MINOR,
};
use pvsched_abi::{
    encode_guest_line, new_host_header, preempt_disabled_bits, region_size_for, GuestVcpuState,
    Region, SchedPolicy, TaskInfo,
};
use pvsched_policy::haltpoll::{HaltPollBounds, KvmHaltPoll, PollDelta};
use pvsched_policy::{
    haltpoll, ApplyError, CpuClock, CpuSample, GuestMemory, HaltPollParams, HostBudget, HostInfo,
    RtClass, Sampled, StatSample, ThreadActuator, ThreadSched, ThreadStat, TickInput, VmController,
    VmEngine, VmThread,
};

use crate::config::{
    cpu_mask, Accel, CsSignal, DirectedYield, HaltPollSpec, IoPath, PolicySpec, PvschedSpec,
    Scenario, ScenarioError, TaskKind, VmConfig,
};
use crate::queue::{Ev, EventQueue, TraceHash};
use crate::rng::Rng;
use crate::stats::{Acct, Hist, VmStats, N_ACCT};
use crate::Nanos;

const NONE: u32 = u32::MAX;
/// No time recorded.
const NONE_AT: Nanos = Nanos::MAX;
const FULL: u64 = 1024;
const HOUSEKEEPING_NS: Nanos = 4_000_000;

struct Vm {
    name: String,
    first_vcpu: u32,
    nvcpus: u32,
    irq_ns: Nanos,
    slice: Nanos,
    spin_threshold: Nanos,
    ple: Nanos,
    io_path: IoPath,
    io_emu: Nanos,
    bql_interval: Nanos,
    bql_exit: Nanos,
    /// Guest timer tick period.
    guest_tick: Nanos,
    /// Under TCG: the main loop's timer and interrupt delivery.
    tcg: Option<TcgCosts>,
    locks: Vec<Lock>,
    mutexes: Vec<Lock>,
    emu_thread: u32,
    emu_queue: VecDeque<EmuItem>,
    emu_item: Option<EmuItem>,
    bql_holder: u32,
    bql_waiters: VecDeque<u32>,
    yield_rr: u32,
    /// hackbench instances (parent, processes, those still running this round).
    hackbench: Vec<Hackbench>,
    engine: Option<Box<EngineState>>,
    stats: VmStats,
    groups: Vec<GroupInfo>,
}

/// TCG's costs as the hot path uses them.
#[derive(Clone, Copy, Debug)]
struct TcgCosts {
    /// Mean main-loop CPU per delivered timer or interrupt.
    main_loop: Nanos,
    /// Relative spread of translated work.
    jitter: f64,
}

/// A scored task group of a VM: its name and the ops/s one copy makes on a dedicated CPU.
#[derive(Clone, Debug)]
pub struct GroupInfo {
    /// Task group name.
    pub name: String,
    /// Reference operations per second of one copy alone.
    pub ref_ops_per_s: f64,
    /// Copies.
    pub tasks: u32,
    /// Counts in the score.
    pub scored: bool,
}

/// The policy knobs in the hot path, resolved once.
#[derive(Clone, Debug)]
struct Pol {
    static_rt: Option<Class>,
    cs_extra: Nanos,
    directed: DirectedYield,
    load_aware: bool,
    smt_aware: bool,
    hp_fixed: Option<u32>,
    preempt_aware: bool,
    hint_rt_timers: bool,
    hint_cs: bool,
    /// The guest module samples its critical-section signal (ticks, interrupts).
    cs_sampled: bool,
    /// The daemon reads preempt counts from guest RAM.
    introspection: bool,
}

/// Limits the run checks as it goes; each counter must stay 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimitViolations {
    /// Boosted CPU time in a budget window above the engine's budget.
    pub budget: u64,
    /// A continuous boost longer than the engine's limit.
    pub continuous: u64,
    /// RT time in a throttling period above the runtime.
    pub rt_runtime: u64,
    /// A halt-poll longer than its window or the cap.
    pub poll: u64,
}

/// One host's simulation.
pub struct Sim {
    now: Nanos,
    end: Nanos,
    warmup: Nanos,
    q: EventQueue,
    rng: Rng,
    hash: TraceHash,
    events: u64,
    stale: u64,
    pol: Pol,
    lat_ns: Nanos,
    sleeper_credit: Nanos,
    min_gran: Nanos,
    wake_gran: Nanos,
    rt_period: Nanos,
    rt_runtime: Nanos,
    rr_slice: Nanos,
    smt_rate: u64,
    wake_cost: Nanos,
    poll_exit_cost: Nanos,
    /// A pCPU idle longer than `idle_poll` takes `idle_exit` to run a thread.
    idle_exit: Nanos,
    idle_poll: Nanos,
    /// Host scheduler tick (`schedstat` run times lag by up to this).
    stat_tick: Nanos,
    needs_load: bool,
    /// KVM's halt-poll window algorithm under the host parameters now in
    /// force (fixed unless the controller sets them).
    kvm_hp: HaltPollParams,
    /// KVM's polling statistics since the start, summed over every vCPU of the
    /// host (what the daemon sums from `query-stats`).
    kvm_stats: PollDelta,
    /// The daemon's halt-poll controller, when the policy runs it.
    hp_ctl: Option<Box<HaltPollCtl>>,
    /// Host load threads' waits at the end of the warm-up.
    load_wait_snap: Nanos,
    cpus: Vec<Cpu>,
    threads: Vec<Thread>,
    loads: Vec<LoadParams>,
    vcpus: Vec<Vcpu>,
    tasks: Vec<Task>,
    vms: Vec<Vm>,
    host_lat: Hist,
    host_acct_snap: Vec<[Nanos; N_ACCT]>,
    /// pCPUs whose timer changed during the current event.
    dirty: Vec<u32>,
    /// Threads waiting in all run queues.
    waiting: u32,
    /// pCPUs with nothing running or queued.
    idle_mask: u64,
    /// Check structural invariants after every event (tests).
    pub check: bool,
    /// Invariant violations found (first few).
    pub violations: Vec<String>,
    /// Policy limits exceeded.
    pub limits: LimitViolations,
    /// Largest excess, ns, of a vCPU's exact boosted CPU in a budget window over the
    /// budget (the engine charges what `schedstat` shows, which lags by up to a tick).
    pub budget_overshoot: Nanos,
    /// The host-wide boost cap shared by every VM's daemon controller.
    host_budget: Option<HostBudget>,
}

/// What one host run produced.
#[derive(Clone, Debug)]
pub struct HostOutcome {
    /// Events processed (stale timers excluded).
    pub events: u64,
    /// Stale timer events skipped.
    pub stale: u64,
    /// Trace hash.
    pub hash: u64,
    /// Simulated time measured (after warm-up), ns.
    pub measured_ns: Nanos,
    /// Per VM: name, vCPUs, groups, stats.
    pub vms: Vec<(String, u32, Vec<GroupInfo>, VmStats)>,
    /// Host latency probe samples.
    pub host_lat: Hist,
    /// Host CPU time per category over the measured interval, summed over pCPUs.
    pub host_acct: [Nanos; N_ACCT],
    /// pCPUs.
    pub pcpus: u32,
    /// Invariant violations.
    pub violations: Vec<String>,
    /// Policy limit violations.
    pub limits: LimitViolations,
    /// Largest exact boosted CPU over the budget in a window, ns.
    pub budget_overshoot_ns: Nanos,
    /// Host load threads' waits for a CPU over the measured interval
    /// (runnable, not running), summed, ns.
    pub load_wait_ns: Nanos,
    /// Host load threads.
    pub load_threads: u32,
    /// What the halt-poll controller did over the measured interval.
    pub halt_poll: Option<HaltPollCtlStats>,
}

/// Host time to do `work` at `rate` (1024 = full speed), rounded up.
#[inline]
fn scale(work: Nanos, rate: u64) -> Nanos {
    if rate == FULL || work == Nanos::MAX {
        work
    } else {
        (work.saturating_mul(FULL)).div_ceil(rate)
    }
}

fn us(x: u64) -> Nanos {
    x.saturating_mul(1000)
}

impl Sim {
    /// Runs to the end; `progress` is called with the fraction done now and then.
    pub fn run(&mut self, progress: &mut dyn FnMut(f64)) {
        let step = (self.end / 64).max(1);
        let mut next_report = step;
        let mut same = 0u32;
        while let Some((t, ev)) = self.q.pop() {
            if t > self.end {
                break;
            }
            if t == self.now {
                same += 1;
                if same > 100_000 {
                    self.violations
                        .push(format!("livelock: more than 100000 events at t={t} ns"));
                    break;
                }
            } else {
                same = 0;
            }
            self.now = t;
            let fresh = self.handle(ev);
            self.flush_timers();
            if !fresh {
                self.stale += 1;
                continue;
            }
            self.events += 1;
            self.hash.record(t, &ev);
            if self.check {
                self.check_invariants();
            }
            if t >= next_report {
                progress(t as f64 / self.end as f64);
                next_report = t + step;
            }
        }
        self.now = self.end;
        for c in 0..self.cpus.len() as u32 {
            self.account(c);
        }
        for t in 0..self.threads.len() {
            if self.threads[t].state == TState::Runnable {
                if let Role::Vcpu { vcpu } = self.threads[t].role {
                    let vm = self.vcpus[vcpu as usize].vm as usize;
                    let since = self.threads[t].since.max(self.warmup);
                    self.vms[vm].stats.steal += self.end.saturating_sub(since);
                }
            }
        }
        for v in 0..self.vcpus.len() {
            if let Halt::Blocked { .. } = self.vcpus[v].halt {
                let vm = self.vcpus[v].vm as usize;
                let since = self.vcpus[v].blocked_since;
                self.vms[vm].stats.halted += self.end.saturating_sub(since.max(self.warmup));
            }
        }
        if self.check {
            for (i, c) in self.cpus.iter().enumerate() {
                let sum: Nanos = c.acct.iter().sum();
                if sum != self.end {
                    self.violations
                        .push(format!("pCPU {i}: accounted {sum} ns of {} ns", self.end));
                }
            }
        }
        progress(1.0);
    }

    /// The result of the run.
    pub fn outcome(mut self) -> HostOutcome {
        let load_wait_ns = self.load_wait_total() - self.load_wait_snap;
        let load_threads = self
            .threads
            .iter()
            .filter(|t| matches!(t.role, Role::Load { .. }))
            .count() as u32;
        let mut host_acct = [0; N_ACCT];
        for (c, snap) in self.cpus.iter().zip(&self.host_acct_snap) {
            for i in 0..N_ACCT {
                host_acct[i] += c.acct[i] - snap[i];
            }
        }
        let mut vms = Vec::new();
        for v in 0..self.vms.len() {
            let first = self.vms[v].first_vcpu as usize;
            let n = self.vms[v].nvcpus as usize;
            let mut stats = std::mem::take(&mut self.vms[v].stats);
            for (i, vc) in self.vcpus[first..first + n].iter().enumerate() {
                stats.vcpu_useful[i] = vc.useful;
            }
            if let Some(e) = &self.vms[v].engine {
                for i in 0..n {
                    let s = e.ctl.stats(i);
                    stats.boosts = stats.boosts.wrapping_add(s.boosts);
                    stats.throttles = stats.throttles.wrapping_add(s.throttles);
                    stats.lock_grants = stats.lock_grants.wrapping_add(s.lock_holder_grants);
                    stats.lock_capped = stats.lock_capped.wrapping_add(s.lock_holder_capped);
                }
            }
            vms.push((
                self.vms[v].name.clone(),
                self.vms[v].nvcpus,
                self.vms[v].groups.clone(),
                stats,
            ));
        }
        HostOutcome {
            events: self.events,
            stale: self.stale,
            hash: self.hash.0,
            measured_ns: self.end - self.warmup,
            vms,
            host_lat: self.host_lat,
            host_acct,
            pcpus: self.cpus.len() as u32,
            violations: self.violations,
            limits: self.limits,
            budget_overshoot_ns: self.budget_overshoot,
            load_wait_ns,
            load_threads,
            halt_poll: self.hp_ctl.map(|c| c.stats),
        }
    }

    /// Moves the pCPU timers changed by the last event into the queue, once each.
    #[inline]
    fn flush_timers(&mut self) {
        let mut i = 0;
        while i < self.dirty.len() {
            let c = self.dirty[i];
            self.cpus[c as usize].dirty = false;
            self.program(c);
            i += 1;
        }
        self.dirty.clear();
    }

    /// Processes every event up to `until` and stops there (tests: looking at the
    /// model between events).
    #[cfg(test)]
    pub(super) fn advance_to(&mut self, until: Nanos) {
        while self.q.peek_time().is_some_and(|t| t <= until) {
            let (t, ev) = self.q.pop().expect("peeked");
            self.now = t;
            self.handle(ev);
            self.flush_timers();
        }
        self.now = until;
    }

    /// Trace hash so far.
    pub fn trace_hash(&self) -> u64 {
        self.hash.0
    }

    /// Events processed so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    fn handle(&mut self, ev: Ev) -> bool {
        match ev {
            Ev::Cpu { cpu, .. } => {
                self.cpus[cpu as usize].timer_at = Nanos::MAX;
                self.cpu_due(cpu);
            }
            Ev::ThreadTimer { thread, gen } => {
                let th = &self.threads[thread as usize];
                if th.gen != gen || th.state != TState::Blocked {
                    return false;
                }
                self.thread_timer(thread);
            }
            Ev::TaskTimer { task, gen } => {
                if self.tasks[task as usize].gen != gen {
                    return false;
                }
                self.task_timer(task);
            }
            Ev::IoDone { task } => self.io_done(task),
            Ev::Daemon { vm } => {
                let e = self.vms[vm as usize].engine.as_mut().unwrap();
                let period = us(e.spec.period_us);
                e.next_daemon = self.now + period;
                self.q.push(self.now + period, Ev::Daemon { vm });
                self.engine_step(vm);
            }
            Ev::EngineWake { vm, gen } => {
                let e = self.vms[vm as usize].engine.as_mut().unwrap();
                if e.gen != gen {
                    return false;
                }
                e.wake_sched = Nanos::MAX;
                self.engine_step(vm);
            }
            Ev::Apply { vm, vcpu, sched } => {
                let t = if vcpu == PATH_SLOT {
                    self.vms[vm as usize].emu_thread
                } else {
                    let v = self.vms[vm as usize].first_vcpu + vcpu;
                    self.vcpus[v as usize].thread
                };
                let class = Class::from_sched(decode_sched(sched), self.threads[t as usize].base);
                self.set_class(t, class);
            }
            Ev::Housekeeping => self.housekeeping(),
            Ev::HaltPollRound => self.halt_poll_round(),
            Ev::GuestTick { vm } => self.guest_tick(vm),
            Ev::Warmup => self.reset_stats(),
        }
        true
    }

    fn reset_stats(&mut self) {
        for c in 0..self.cpus.len() as u32 {
            self.account(c);
        }
        for (snap, c) in self.host_acct_snap.iter_mut().zip(&self.cpus) {
            *snap = c.acct;
        }
        for vm in &mut self.vms {
            let groups = vm.stats.ops.len();
            let n = vm.stats.vcpu_useful.len();
            vm.stats = VmStats {
                ops: vec![0; groups],
                vcpu_useful: vec![0; n],
                instances: 1,
                ..Default::default()
            };
            if let Some(e) = &vm.engine {
                // Engine counters are cumulative; subtract the warm-up's at the end.
                let mut b = 0;
                let mut th = 0;
                let mut lg = 0;
                let mut lc = 0;
                for i in 0..e.ctl.slots().len() {
                    let s = e.ctl.stats(i);
                    b += s.boosts;
                    th += s.throttles;
                    lg += s.lock_holder_grants;
                    lc += s.lock_holder_capped;
                }
                vm.stats.boosts = 0u64.wrapping_sub(b);
                vm.stats.throttles = 0u64.wrapping_sub(th);
                vm.stats.lock_grants = 0u64.wrapping_sub(lg);
                vm.stats.lock_capped = 0u64.wrapping_sub(lc);
            }
        }
        for v in &mut self.vcpus {
            v.useful = 0;
        }
        // Steal and halt intervals in progress are clipped at the warm-up when they end.
        self.host_lat = Hist::default();
        self.load_wait_snap = self.load_wait_total();
    }
}
