//! The boost engine of one VM: observations in, per-vCPU decisions out.

use std::collections::VecDeque;

use pvsched_abi::decode::MAX_RT_PRIO;
use pvsched_abi::raw::*;
use pvsched_abi::{BoostRequest, BoostState, GuestVcpuState, SchedPolicy};

use crate::config::{
    ConfigError, DeadlineReservation, IoThreadMode, IoThreadPolicy, PolicyConfig, RtClass,
};
use crate::host::{HostBudget, HostMember};
use crate::ledger::BudgetLedger;
use crate::Nanos;

/// What the host knows about one vCPU at a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuObservation {
    /// The validated guest line, or `None` when the guest has not attached,
    /// the line was torn, or the slot is not mapped to this vCPU.
    pub guest: Option<GuestVcpuState>,
    /// Cumulative CPU time of the vCPU thread as the host measured it
    /// (`None`: unknown, wall time is charged instead, which over-counts).
    pub run_ns: Option<Nanos>,
    /// Cumulative times the thread was put on a CPU, sampled with `run_ns`
    /// (`None`: unknown). A thread that was never switched out between two
    /// steps did not yield, whatever its run time says: Linux brings a
    /// running thread's run time up to date only at scheduler ticks.
    pub slices: Option<u64>,
    /// Cumulative time the thread was runnable but kept off a CPU (its run
    /// delay), sampled with `run_ns` (`None`: unknown). Time off a CPU that
    /// was run delay is preemption, not a yield.
    pub wait_ns: Option<Nanos>,
    /// The vCPU's preempt count as the host read it from guest RAM, with the bits that
    /// do not mean "preemption disabled" masked off (`None`: the host cannot read it).
    /// Guest-controlled memory: it can only mislead decisions about this VM.
    pub preempt_count: Option<u32>,
    /// Whether the thread was runnable (running or waiting for a CPU) at this sample,
    /// when the sample read its state (`None`: not read).
    pub runnable: Option<bool>,
    /// Load of the pCPU the thread last ran on over the last interval, per mille
    /// (`None`: unknown). Read with `preempt_count`, to tell whether the pCPU is contended.
    pub pcpu_load_permille: Option<u32>,
}

/// Whether a vCPU holds preemption disabled by its host-read preempt count: the count
/// is non-zero and the guest line shows an online vCPU that is not idle (the guest's
/// idle task runs with preemption disabled, so an idle vCPU reads 1). Without a guest
/// line nothing says the vCPU is not idle, and the count is not used.
pub(crate) fn preemption_disabled(
    preempt_count: Option<u32>,
    guest: Option<&GuestVcpuState>,
) -> bool {
    preempt_count.is_some_and(|c| c != 0) && guest.is_some_and(|g| g.online && !g.idle)
}

/// How far a running thread's CPU-time counter may lag behind: Linux
/// updates it at scheduler ticks and context switches, and ticks are at
/// most 10 ms apart (HZ=100). A delta between two steps may exceed their
/// wall time by this much when the lag catches up; it is charged in full
/// (over-counting is safe; clipping it to wall time let a spinning thread
/// use several times its budget).
pub const CPU_TIME_LAG_NS: Nanos = 10_000_000;

/// Why a vCPU is boosted (a set of bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Reasons(pub u16);

impl Reasons {
    /// No reason.
    pub const NONE: Self = Self(0);
    /// The guest runs an RT task.
    pub const RT_RUNNING: Self = Self(1 << 0);
    /// RT tasks are pending on the vCPU (possibly halted).
    pub const RT_PENDING: Self = Self(1 << 1);
    /// The guest handles an interrupt or softirq.
    pub const IRQ: Self = Self(1 << 2);
    /// The guest asked explicitly.
    pub const REQUEST: Self = Self(1 << 3);
    /// The guest is in a critical section (bounded slice extension).
    pub const CRITICAL: Self = Self(1 << 4);
    /// Other vCPUs of the VM spin; this one has the most critical-section activity.
    pub const DIRECTED: Self = Self(1 << 5);
    /// A vCPU of the VM is boosted and this thread delivers its interrupts.
    pub const INTERRUPT_PATH: Self = Self(1 << 6);
    /// The host saw this vCPU preempted with preemption disabled (a preempted lock
    /// holder, by its host-read preempt count): a short bounded grant.
    pub const LOCK_HOLDER: Self = Self(1 << 7);
    /// A QEMU IOThread of the VM, boosted by its [`IoThreadPolicy`].
    pub const IOTHREAD: Self = Self(1 << 8);
    /// The reasons each bounded by their own grant (a critical-section episode, a
    /// lock-holder grant) rather than by the guest's state alone.
    const BOUNDED: Self = Self(Self::CRITICAL.0 | Self::DIRECTED.0 | Self::LOCK_HOLDER.0);
    /// The reasons bounded by the critical-section extension of an episode.
    const EPISODE: Self = Self(Self::CRITICAL.0 | Self::DIRECTED.0);

    /// Whether no bit is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether some bit of `other` is set.
    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
    /// Whether only bounded (critical-section, lock-holder) bits are set.
    fn bounded_only(self) -> bool {
        !self.is_empty() && self.0 & !Self::BOUNDED.0 == 0
    }
    fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }
    fn remove(&mut self, other: Self) {
        self.0 &= !other.0;
    }
}

/// The scheduling attributes a vCPU thread should have now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ThreadSched {
    /// The attributes the thread had before pvsched touched it.
    #[default]
    Baseline,
    /// A real-time class at a priority inside the admin range.
    Rt {
        /// FIFO or RR.
        class: RtClass,
        /// Host RT priority.
        prio: u8,
    },
    /// `SCHED_DEADLINE` with the VM's per-thread reservation
    /// ([`PolicyConfig::deadline_reservation`]).
    Deadline(DeadlineReservation),
}

impl ThreadSched {
    /// Whether this is a boost (anything but the thread's own attributes).
    pub fn is_boosted(self) -> bool {
        !matches!(self, ThreadSched::Baseline)
    }
}

/// A state change at this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BoostEvent {
    /// Boost started.
    Boosted,
    /// Still boosted, at another priority.
    Reprioritised,
    /// Boost ended because its reasons ended.
    Unboosted,
    /// Boost refused or ended because a limit was reached.
    Throttled,
    /// A throttle ended.
    Unthrottled,
}

/// The engine's decision for one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuDecision {
    /// Attributes to apply to the vCPU thread.
    pub sched: ThreadSched,
    /// State to publish to the guest.
    pub state: BoostState,
    /// When the current throttle ends (0 unless throttled).
    pub throttle_until: Nanos,
    /// Why the vCPU is boosted (empty unless boosted).
    pub reasons: Reasons,
    /// What changed at this step.
    pub event: Option<BoostEvent>,
}

/// Counters per vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Boosts started.
    pub boosts: u64,
    /// Throttles.
    pub throttles: u64,
    /// CPU time used while boosted.
    pub boosted_cpu_ns: Nanos,
    /// Lock-holder grants started (a preempted vCPU with preemption disabled).
    pub lock_holder_grants: u64,
    /// Steps at which a preempted lock holder got no grant because it had started
    /// `lock_holder_max_grants` in the last budget window.
    pub lock_holder_capped: u64,
}

/// What the host knows about a VM thread that is not a vCPU (the
/// interrupt-delivery thread) at a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadObservation {
    /// Cumulative CPU time of the thread (`None`: unknown; wall time is charged).
    pub run_ns: Option<Nanos>,
}

/// Everything a VM's engine observes at one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepInput<'a> {
    /// One observation per vCPU (a change in length resizes the VM).
    pub vcpus: &'a [VcpuObservation],
    /// The VM's interrupt-delivery thread, when it has one (QEMU's main
    /// loop); it is boosted only if the policy's `boost_interrupt_path` is set.
    pub interrupt_path: Option<ThreadObservation>,
    /// The VM's QEMU IOThreads, in a stable order (a change in length
    /// resizes them); boosted only under the engine's [`IoThreadPolicy`].
    pub iothreads: &'a [ThreadObservation],
}

/// Which outer limit refused a VM its boosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OuterLimit {
    /// The VM's own budget (all its threads together).
    Vm,
    /// The host-wide cap.
    Host,
}

/// Counters of a VM's budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmBudgetStats {
    /// Boosted CPU time of all the VM's threads.
    pub boosted_cpu_ns: Nanos,
    /// Times the VM's budget refused it boosts.
    pub vm_throttles: u64,
    /// Times the host cap refused it boosts.
    pub host_throttles: u64,
    /// Upper bound on the VM's boosted CPU time in the window ending at the last step.
    pub window_used_ns: Nanos,
    /// The outer limit refusing boosts now, if any.
    pub refused_by: Option<OuterLimit>,
    /// Whether the VM is a repeat offender now (see
    /// [`PolicyConfig::offender_streak`]): its budgets are cut.
    pub offender: bool,
    /// Times the VM became a repeat offender.
    pub offender_periods: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Normal,
    Boosted { prio: u8 },
    Throttled { until: Nanos },
}

#[derive(Clone, Debug)]
struct VcpuPolicy {
    mode: Mode,
    ledger: BudgetLedger,
    last_now: Option<Nanos>,
    last_run: Option<Nanos>,
    last_slices: Option<u64>,
    last_wait: Option<Nanos>,
    /// CPU used by critical-section-only boosts in the current episode.
    cs_episode_cpu: Nanos,
    last_cs_count: Option<u64>,
    last_spin_count: Option<u32>,
    /// Consecutive throttles (each within a budget window of the last one's end).
    throttle_streak: u32,
    /// Boosted CPU time since the thread last yielded its pCPU (the continuous
    /// limit's count). Kept while a refusal by the VM's budget or the host cap
    /// unboosts it: a thread that keeps running has not yielded.
    continuous_cpu: Nanos,
    /// Unboosted for want of a reason while its continuous count stands: the
    /// count carries over to the next boost unless the thread is switched out
    /// first (a guest flapping its request must not restart the limit of a
    /// vCPU that never let go of its pCPU).
    released_unyielded: bool,
    /// Throttled, and has not yielded its pCPU or stopped asking since: its
    /// next throttle repeats the last one however long a refusal by the VM's
    /// budget kept it unboosted in between.
    unyielding_since_throttle: bool,
    /// When the last throttle ended (or ends).
    last_throttle_end: Option<Nanos>,
    /// When the current lock-holder grant ends, while one runs.
    lock_grant_until: Option<Nanos>,
    /// Since when the thread has been runnable with a run time that did not move.
    run_still_since: Option<Nanos>,
    /// When each lock-holder grant of the last budget window started, oldest first.
    lock_grants: VecDeque<Nanos>,
    stats: VcpuStats,
}

impl VcpuPolicy {
    /// Run time a boosted thread may have had since its CPU-time counter
    /// last moved: while it stays runnable with a still counter, up to the
    /// counter's lag (beyond that it is waiting, not running). A thread kept
    /// waiting that long behind higher-priority work looks the same from
    /// `/proc` and is treated as if it ran: its boost may end early, the
    /// bound never late.
    fn uncounted_run(&self, now: Nanos) -> Nanos {
        match (self.mode, self.run_still_since) {
            (Mode::Boosted { .. }, Some(since)) => {
                let still = now.saturating_sub(since);
                if still > CPU_TIME_LAG_NS {
                    0
                } else {
                    still
                }
            }
            _ => 0,
        }
    }

    fn new(cfg: &PolicyConfig) -> Self {
        VcpuPolicy {
            mode: Mode::Normal,
            ledger: BudgetLedger::new(cfg.budget_window_ns),
            last_now: None,
            last_run: None,
            last_slices: None,
            last_wait: None,
            cs_episode_cpu: 0,
            last_cs_count: None,
            last_spin_count: None,
            throttle_streak: 0,
            continuous_cpu: 0,
            released_unyielded: false,
            unyielding_since_throttle: false,
            last_throttle_end: None,
            lock_grant_until: None,
            run_still_since: None,
            lock_grants: VecDeque::new(),
            stats: VcpuStats::default(),
        }
    }
}

/// Per-vCPU activity measured between two steps.
#[derive(Clone, Copy, Default)]
struct Activity {
    cs_entries: u64,
    spun: bool,
    /// Boosted CPU time charged for the interval.
    boosted_cpu: Nanos,
    /// Growth of the thread's run time between its last two samples (`None`: one unknown).
    ran: Option<Nanos>,
    /// Growth of its run delay between its last two samples (`None`: one unknown).
    waited: Option<Nanos>,
    /// Runnable, with a run time that has not moved for longer than the counter's
    /// tick lag: kept off a CPU (Linux adds to the run delay only when the thread
    /// runs again, so a thread starved for long shows no run-delay growth at all).
    stalled: bool,
}

impl Activity {
    /// The thread was kept off a CPU while runnable since its previous sample.
    fn wait_grew(&self) -> bool {
        self.waited.is_some_and(|w| w > 0)
    }

    /// Its run delay grew by more than its run time: it waited more than it ran.
    fn preempted(&self) -> bool {
        self.stalled || matches!((self.waited, self.ran), (Some(w), Some(r)) if w > 0 && r < w)
    }
}

/// Where a vCPU stands with its lock-holder grant at a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LockGrant {
    /// No grant.
    No,
    /// A grant runs until then.
    Runs(Nanos),
    /// A grant until then starts if the boost is committed.
    Starts(Nanos),
}

/// What a thread's own limits allow at a step (before the VM's and the host's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// No reason to boost.
    Nothing,
    /// In its own throttle until then.
    Throttled(Nanos),
    /// Reasons to boost, but its own budget or continuous limit is spent.
    Exhausted,
    /// May be boosted for up to this much CPU time by its own limits.
    Grant(Nanos),
}

/// What the VM's budget and the host cap allow each granted thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outer {
    /// Up to this much CPU time each before the next step.
    Share(Nanos),
    /// No boost until about then.
    Refused { until: Nanos, by: OuterLimit },
}

/// One thread's wish at a step, before it is committed.
#[derive(Clone, Copy, Debug)]
struct Wish {
    reasons: Reasons,
    prio: u8,
    want: Want,
    /// A lock-holder grant that starts with the boost.
    lock_start: Option<Nanos>,
}

/// The policy engine of one VM. Pure: no I/O, no clock; time is a parameter.
///
/// Three budgets bound boosted CPU time in any sliding window: each
/// thread's own (`budget_ns`, plus the continuous limit), the VM's summed
/// over all its boosted threads (`vm_budget_ns`, and `vm_burst_ns` over the
/// short burst window), and, when stepped with a [`HostBudget`], the host's
/// across VMs (over both windows).
///
/// Contract: call [`VmEngine::step_with`] again no later than
/// [`VmEngine::wake_at`] whenever it is `Some` (and, with a host budget,
/// no later than [`HostBudget::wake_at`] while this VM has boosted
/// threads); every bound holds exactly under that contract, and a late step
/// can overshoot by at most its lateness.
#[derive(Clone, Debug)]
pub struct VmEngine {
    cfg: PolicyConfig,
    vcpus: Vec<VcpuPolicy>,
    decisions: Vec<VcpuDecision>,
    wake_at: Option<Nanos>,
    /// The VM's interrupt-delivery thread, once a step observes it.
    interrupt_path: Option<(VcpuPolicy, VcpuDecision)>,
    /// How the IOThreads are boosted (`None`: never).
    iothread_policy: Option<IoThreadPolicy>,
    /// One per IOThread observed at the last step.
    iothreads: Vec<VcpuPolicy>,
    iothread_decisions: Vec<VcpuDecision>,
    vm_ledger: BudgetLedger,
    /// The same charges over the short burst window (`vm_burst_ns`).
    vm_burst_ledger: BudgetLedger,
    vm_stats: VmBudgetStats,
    host_member: Option<HostMember>,
}

impl VmEngine {
    /// An engine for a VM with `nr_vcpus` vCPUs.
    pub fn new(cfg: PolicyConfig, nr_vcpus: usize) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let vcpus = (0..nr_vcpus).map(|_| VcpuPolicy::new(&cfg)).collect();
        Ok(VmEngine {
            vm_ledger: BudgetLedger::new(cfg.budget_window_ns),
            vm_burst_ledger: BudgetLedger::new(cfg.effective_burst_window_ns()),
            cfg,
            vcpus,
            decisions: vec![VcpuDecision::default(); nr_vcpus],
            wake_at: None,
            interrupt_path: None,
            iothread_policy: None,
            iothreads: Vec::new(),
            iothread_decisions: Vec::new(),
            vm_stats: VmBudgetStats::default(),
            host_member: None,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Number of vCPUs.
    pub fn nr_vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// Counters of one vCPU.
    pub fn stats(&self, vcpu: usize) -> Option<VcpuStats> {
        self.vcpus.get(vcpu).map(|v| v.stats)
    }

    /// Counters of the VM's budget.
    pub fn vm_stats(&self) -> VmBudgetStats {
        self.vm_stats
    }

    /// The latest decisions, one per vCPU.
    pub fn decisions(&self) -> &[VcpuDecision] {
        &self.decisions
    }

    /// The latest decision for the interrupt-delivery thread, once observed.
    pub fn interrupt_path_decision(&self) -> Option<VcpuDecision> {
        self.interrupt_path.as_ref().map(|(_, d)| *d)
    }

    /// Counters of the interrupt-delivery thread (zero until it is observed).
    pub fn interrupt_path_stats(&self) -> VcpuStats {
        self.interrupt_path
            .as_ref()
            .map(|(p, _)| p.stats)
            .unwrap_or_default()
    }

    /// Sets how the VM's IOThreads are boosted (`None`: never); a thread
    /// boosted now is unboosted at the next step if the new policy says so.
    pub fn set_iothread_policy(&mut self, policy: Option<IoThreadPolicy>) {
        self.iothread_policy = policy;
    }

    /// How the VM's IOThreads are boosted.
    pub fn iothread_policy(&self) -> Option<IoThreadPolicy> {
        self.iothread_policy
    }

    /// The latest decisions, one per IOThread of the last step.
    pub fn iothread_decisions(&self) -> &[VcpuDecision] {
        &self.iothread_decisions
    }

    /// Counters of one IOThread.
    pub fn iothread_stats(&self, index: usize) -> Option<VcpuStats> {
        self.iothreads.get(index).map(|p| p.stats)
    }

    /// Forgets an IOThread's history (its thread changed): it restarts
    /// unboosted with an empty budget ledger. The VM's ledger keeps what it used.
    pub fn reset_iothread(&mut self, index: usize) {
        if let Some(p) = self.iothreads.get_mut(index) {
            *p = VcpuPolicy::new(&self.cfg);
            self.iothread_decisions[index] = VcpuDecision::default();
        }
    }

    /// Threads (vCPUs, the interrupt path and IOThreads) the latest step left boosted.
    pub fn boosted_threads(&self) -> u64 {
        let path = self.interrupt_path_decision();
        self.decisions
            .iter()
            .chain(path.as_ref())
            .chain(&self.iothread_decisions)
            .filter(|d| d.state == BoostState::Boosted)
            .count() as u64
    }

    /// This VM's membership of the host budget it was stepped with, so the
    /// caller can [`HostBudget::leave`] when the VM goes.
    pub fn host_member(&self) -> Option<HostMember> {
        self.host_member
    }

    /// Latest time by which `step` must run again to keep the budget bounds.
    pub fn wake_at(&self) -> Option<Nanos> {
        self.wake_at
    }

    /// Forgets a vCPU's history (its thread changed): it restarts unboosted
    /// with an empty budget ledger. The VM's ledger keeps what it used.
    pub fn reset_vcpu(&mut self, vcpu: usize) {
        if let Some(v) = self.vcpus.get_mut(vcpu) {
            *v = VcpuPolicy::new(&self.cfg);
            self.decisions[vcpu] = VcpuDecision::default();
        }
    }

    /// Runs one step at time `now` for the vCPUs alone: no interrupt-path
    /// thread, no host cap (the VM's own budget still holds).
    pub fn step(&mut self, now: Nanos, observations: &[VcpuObservation]) -> &[VcpuDecision] {
        self.step_with(
            now,
            StepInput {
                vcpus: observations,
                interrupt_path: None,
                iothreads: &[],
            },
            None,
        )
    }

    /// Runs one step at time `now`: charges what every boosted thread used
    /// since the last step to its own, the VM's and the host's ledgers, then
    /// decides for every vCPU, the interrupt path and the IOThreads together,
    /// so that their sum stays inside the VM's budget and the host's cap.
    pub fn step_with(
        &mut self,
        now: Nanos,
        input: StepInput<'_>,
        mut host: Option<&mut HostBudget>,
    ) -> &[VcpuDecision] {
        let observations = input.vcpus;
        if observations.len() != self.vcpus.len() {
            let cfg = self.cfg.clone();
            self.vcpus
                .resize_with(observations.len(), || VcpuPolicy::new(&cfg));
            self.decisions
                .resize(observations.len(), VcpuDecision::default());
        }
        let member = host.as_deref_mut().map(|h| match self.host_member {
            Some(m) if h.is_member(m) => m,
            _ => {
                let m = h.join(now);
                self.host_member = Some(m);
                m
            }
        });

        // 1. Charge the interval that just ended.
        let mut activity = Vec::with_capacity(observations.len());
        let mut charged: Nanos = 0;
        for (vcpu, obs) in self.vcpus.iter_mut().zip(observations) {
            let a = account(vcpu, now, obs);
            charged = charged.saturating_add(a.boosted_cpu);
            activity.push(a);
        }
        let path_obs = input
            .interrupt_path
            .filter(|_| self.cfg.boost_interrupt_path);
        if let Some(p) = path_obs {
            let cfg = &self.cfg;
            let (policy, _) = self
                .interrupt_path
                .get_or_insert_with(|| (VcpuPolicy::new(cfg), VcpuDecision::default()));
            let obs = VcpuObservation {
                guest: None,
                run_ns: p.run_ns,
                slices: None,
                wait_ns: None,
                preempt_count: None,
                pcpu_load_permille: None,
                runnable: None,
            };
            charged = charged.saturating_add(account(policy, now, &obs).boosted_cpu);
        }
        // IOThreads are charged like the interrupt path: their boosted CPU
        // time is the VM's, whichever mode boosted them.
        if input.iothreads.len() != self.iothreads.len() {
            let cfg = self.cfg.clone();
            self.iothreads
                .resize_with(input.iothreads.len(), || VcpuPolicy::new(&cfg));
            self.iothread_decisions
                .resize(input.iothreads.len(), VcpuDecision::default());
        }
        for (policy, io) in self.iothreads.iter_mut().zip(input.iothreads) {
            let obs = VcpuObservation {
                run_ns: io.run_ns,
                ..VcpuObservation::default()
            };
            charged = charged.saturating_add(account(policy, now, &obs).boosted_cpu);
        }
        self.vm_ledger.charge(now, charged);
        self.vm_burst_ledger.charge(now, charged);
        self.vm_stats.boosted_cpu_ns = self.vm_stats.boosted_cpu_ns.saturating_add(charged);
        if let Some(h) = host.as_deref_mut() {
            h.charge(now, charged);
        }

        // 2. What each thread wants, within its own limits.
        let directed = self.directed_target(observations, &activity);
        let mut wishes = Vec::with_capacity(observations.len());
        for (i, ((vcpu, obs), act)) in self
            .vcpus
            .iter_mut()
            .zip(observations)
            .zip(&activity)
            .enumerate()
        {
            let (in_section, critical) = critical_section(&self.cfg, obs, act);
            let grant = lock_grant(&self.cfg, vcpu, now, obs, act);
            let hints = Hints {
                critical,
                directed: directed == Some(i),
                lock_holder: grant != LockGrant::No,
            };
            let (reasons, prio) = wanted(&self.cfg, obs.guest.as_ref(), hints);
            if !in_section && !hints.directed {
                vcpu.cs_episode_cpu = 0;
            }
            let lock_until = match grant {
                LockGrant::Runs(until) | LockGrant::Starts(until) => Some(until),
                LockGrant::No => None,
            };
            let (reasons, want) = assess(&self.cfg, vcpu, now, reasons, lock_until);
            let lock_start = match grant {
                LockGrant::Starts(until) if reasons.contains(Reasons::LOCK_HOLDER) => Some(until),
                _ => None,
            };
            wishes.push(Wish {
                reasons,
                prio,
                want,
                lock_start,
            });
        }
        // The interrupt path follows the vCPUs that may be boosted and wait
        // for or handle an interrupt (see `interrupt_path_wish`).
        let path_wish = match (path_obs, self.interrupt_path.as_ref()) {
            (Some(_), Some((policy, _))) => {
                let (reasons, prio) = interrupt_path_wish(&self.cfg, &wishes);
                let (reasons, want) = assess(&self.cfg, policy, now, reasons, None);
                Some(Wish {
                    reasons,
                    prio,
                    want,
                    lock_start: None,
                })
            }
            _ => None,
        };
        let io_wishes: Vec<Wish> = self
            .iothreads
            .iter()
            .map(|policy| {
                let (reasons, prio) = iothread_wish(&self.cfg, self.iothread_policy, &wishes);
                let (reasons, want) = assess(&self.cfg, policy, now, reasons, None);
                Wish {
                    reasons,
                    prio,
                    want,
                    lock_start: None,
                }
            })
            .collect();

        // 3. What the VM's budget and the host cap allow the granted threads.
        let granted = wishes
            .iter()
            .chain(path_wish.as_ref())
            .chain(&io_wishes)
            .filter(|w| matches!(w.want, Want::Grant(_)))
            .count() as u64;
        let offender = self.offending(now);
        if offender && !self.vm_stats.offender {
            self.vm_stats.offender_periods += 1;
        }
        self.vm_stats.offender = offender;
        let outer = self.outer(now, granted, host.as_deref().zip(member));
        self.vm_stats.window_used_ns = self.vm_ledger.used(now);
        let refused_now = match outer {
            Outer::Refused { by, .. } => Some(by),
            Outer::Share(_) => None,
        };
        if refused_now.is_some() && refused_now != self.vm_stats.refused_by {
            match refused_now {
                Some(OuterLimit::Vm) => self.vm_stats.vm_throttles += 1,
                Some(OuterLimit::Host) => {
                    self.vm_stats.host_throttles += 1;
                    if let Some(h) = host.as_deref_mut() {
                        h.count_throttle();
                    }
                }
                None => {}
            }
        }
        self.vm_stats.refused_by = refused_now;

        // 4. Commit.
        let boostable = self.vcpus.len()
            + usize::from(self.cfg.boost_interrupt_path)
            + if self.iothread_policy.is_some() {
                self.iothreads.len()
            } else {
                0
            };
        let (vm_budget, vm_burst) = self.vm_budgets();
        let deadline = self.cfg.deadline_reservation_within(
            u32::try_from(boostable).unwrap_or(u32::MAX),
            vm_budget,
            vm_burst,
        );
        let mut wake_at: Option<Nanos> = None;
        let mut wake = |w: Option<Nanos>| {
            if let Some(w) = w {
                wake_at = Some(wake_at.map_or(w, |cur: Nanos| cur.min(w)));
            }
        };
        for (i, (vcpu, wish)) in self.vcpus.iter_mut().zip(&wishes).enumerate() {
            let (decision, w) = commit(&self.cfg, vcpu, now, *wish, outer, deadline);
            self.decisions[i] = decision;
            wake(w);
        }
        if let (Some(wish), Some((policy, last))) = (path_wish, self.interrupt_path.as_mut()) {
            let (decision, w) = commit(&self.cfg, policy, now, wish, outer, deadline);
            *last = decision;
            wake(w);
        } else if let Some((_, last)) = self.interrupt_path.as_mut() {
            // Not observed at this step (no such thread, or the policy does
            // not boost it): it is not boosted.
            *last = VcpuDecision::default();
        }
        for ((policy, wish), last) in self
            .iothreads
            .iter_mut()
            .zip(&io_wishes)
            .zip(&mut self.iothread_decisions)
        {
            let (mut decision, w) = commit(&self.cfg, policy, now, *wish, outer, deadline);
            if decision.sched.is_boosted() {
                // IOThreads are SCHED_FIFO at their own priority whatever the
                // vCPUs' class: a reservation sized for vCPUs would not fit them.
                decision.sched = ThreadSched::Rt {
                    class: RtClass::Fifo,
                    prio: wish.prio,
                };
            }
            *last = decision;
            wake(w);
        }
        self.wake_at = wake_at;
        if let (Some(h), Some(m)) = (host, member) {
            h.update(m, now, self.boosted_threads());
        }
        &self.decisions
    }

    /// The share of the VM's budget (and the host's) each of `granted`
    /// threads may use before the next step: what is left, divided by how
    /// many threads may be burning it at once.
    fn outer(&self, now: Nanos, granted: u64, host: Option<(&HostBudget, HostMember)>) -> Outer {
        if granted == 0 {
            return Outer::Share(Nanos::MAX);
        }
        let cpus = host.map_or(granted, |(h, _)| u64::from(h.cpus()));
        let rate = granted.min(cpus).max(1);
        let (vm_budget, vm_burst) = self.vm_budgets();
        let budget_left = vm_budget.saturating_sub(self.vm_ledger.used(now));
        let burst_left = vm_burst.saturating_sub(self.vm_burst_ledger.used(now));
        let mut share = budget_left.min(burst_left) / rate;
        let mut by = OuterLimit::Vm;
        if let Some((h, m)) = host {
            let host_share = h.share_for(m, now, granted);
            if host_share < share {
                share = host_share;
                by = OuterLimit::Host;
            }
        }
        let quantum = self.cfg.min_quantum_ns;
        if share >= quantum {
            return Outer::Share(share);
        }
        let need = quantum.saturating_mul(rate);
        let until = match (by, host) {
            (OuterLimit::Host, Some((h, _))) => h.available_at(now, need),
            // Room again once both the long and the burst window have it.
            _ => self
                .vm_ledger
                .available_at(now, vm_budget, need)
                .max(self.vm_burst_ledger.available_at(now, vm_burst, need)),
        };
        // Re-evaluate no sooner than a quantum and no later than a window.
        let until = until.clamp(
            now.saturating_add(quantum),
            now.saturating_add(self.cfg.budget_window_ns),
        );
        Outer::Refused { until, by }
    }

    /// Whether some vCPU is on a throttle streak of at least
    /// `offender_streak` that is still live: its last throttle ended less
    /// than a budget window ago (or has not ended), or it has not yielded or
    /// stopped asking since. Only vCPUs count: they
    /// act on what the guest writes, while the interrupt path and the
    /// IOThreads are boosted on the host's own inference.
    fn offending(&self, now: Nanos) -> bool {
        let streak = self.cfg.offender_streak;
        streak > 0
            && self.cfg.offender_budget_percent < 100
            && self.vcpus.iter().any(|v| {
                v.throttle_streak >= streak
                    && (v.unyielding_since_throttle
                        || v.last_throttle_end
                            .is_some_and(|end| now < end.saturating_add(self.cfg.budget_window_ns)))
            })
    }

    /// The VM's long and burst budgets in force: cut while it is a repeat offender.
    fn vm_budgets(&self) -> (Nanos, Nanos) {
        if self.vm_stats.offender {
            (
                self.cfg.offender_share(self.cfg.vm_budget_ns),
                self.cfg.offender_share(self.cfg.vm_burst_ns),
            )
        } else {
            (self.cfg.vm_budget_ns, self.cfg.vm_burst_ns)
        }
    }

    /// When some vCPU of the VM spins, the other vCPU with the most
    /// critical-section activity (Kunpeng-V "max count first", eCS).
    fn directed_target(
        &self,
        observations: &[VcpuObservation],
        activity: &[Activity],
    ) -> Option<usize> {
        if !self.cfg.directed_boost || self.cfg.cs_extension_ns == 0 {
            return None;
        }
        if !activity.iter().any(|a| a.spun) {
            return None;
        }
        let mut best: Option<(usize, (bool, u64, u32))> = None;
        for (i, (obs, act)) in observations.iter().zip(activity).enumerate() {
            let Some(guest) = obs.guest.as_ref() else {
                continue;
            };
            if act.spun || guest.idle || !guest.online {
                continue;
            }
            // In a section now: by the host-read preempt count where there is one.
            let in_section = match obs.preempt_count {
                Some(_) => preemption_disabled(obs.preempt_count, obs.guest.as_ref()),
                None => guest.cs_depth > 0,
            };
            let key = (in_section, act.cs_entries, guest.cs_depth);
            if key == (false, 0, 0) {
                continue;
            }
            if best.is_none_or(|(_, k)| key > k) {
                best = Some((i, key));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// The interrupt-delivery thread's reasons and priority: QEMU's main loop
/// under TCG (guest timers fire there) or a userspace device model under
/// KVM. A boosted vCPU waiting for an interrupt gains little if the thread
/// that raises it waits behind host load, so this thread follows the vCPUs
/// that may be boosted at this step and wait for or handle an interrupt (RT
/// work pending, an explicit request, interrupt work), at the highest of
/// their priorities. A vCPU boosted only because it runs an RT task or a
/// critical section waits for nothing, so it does not pull the thread up.
fn interrupt_path_wish(cfg: &PolicyConfig, vcpus: &[Wish]) -> (Reasons, u8) {
    let waiting = Reasons(Reasons::RT_PENDING.0 | Reasons::REQUEST.0 | Reasons::IRQ.0);
    let (mut reasons, mut prio) = (Reasons::NONE, 0);
    for w in vcpus {
        if matches!(w.want, Want::Grant(_)) && w.reasons.0 & waiting.0 != 0 {
            reasons = Reasons::INTERRUPT_PATH;
            prio = prio.max(w.prio);
        }
    }
    (reasons, prio.clamp(cfg.prio_min, cfg.prio_max))
}

/// An IOThread's reasons and priority under `policy`: always with
/// [`IoThreadMode::Static`]; with [`IoThreadMode::WithVm`] while some vCPU
/// of the VM may be boosted at this step (its own limits grant it).
fn iothread_wish(
    cfg: &PolicyConfig,
    policy: Option<IoThreadPolicy>,
    vcpus: &[Wish],
) -> (Reasons, u8) {
    let Some(policy) = policy else {
        return (Reasons::NONE, 0);
    };
    let on = match policy.mode {
        IoThreadMode::Static => true,
        IoThreadMode::WithVm => vcpus.iter().any(|w| matches!(w.want, Want::Grant(_))),
    };
    let reasons = if on { Reasons::IOTHREAD } else { Reasons::NONE };
    (reasons, policy.prio.clamp(cfg.prio_min, cfg.prio_max))
}

/// Charges the time since the last step and measures guest activity.
fn account(vcpu: &mut VcpuPolicy, now: Nanos, obs: &VcpuObservation) -> Activity {
    let consumed = match (obs.run_ns, vcpu.last_run) {
        (Some(run), Some(last)) => run.saturating_sub(last),
        _ => vcpu.last_now.map_or(0, |last| now.saturating_sub(last)),
    };
    // Host CPU time cannot run faster than wall time, but its counter lags
    // by up to a scheduler tick and catches up at once: a delta up to that
    // lag past the wall time is real use, charged in full. Beyond it the
    // reference point was stale (a sample from before the boost), and only
    // the lag is added to the wall time.
    let wall = vcpu.last_now.map_or(0, |last| now.saturating_sub(last));
    let consumed = consumed.min(wall.saturating_add(CPU_TIME_LAG_NS));
    // Switched out at least once since the last step (unknown: assume so).
    let switched = match (obs.slices, vcpu.last_slices) {
        (Some(s), Some(last)) => s != last,
        _ => true,
    };
    // Growth of each counter between the last two samples, as sampled.
    let ran = obs
        .run_ns
        .zip(vcpu.last_run)
        .map(|(run, last)| run.saturating_sub(last));
    let wait_grew = obs
        .wait_ns
        .zip(vcpu.last_wait)
        .map(|(w, last)| w.saturating_sub(last));
    // Of the time off a CPU, what was run delay (preempted, still runnable).
    let waited = wait_grew.map_or(0, |w| w.min(wall));
    vcpu.run_still_since = match (ran, obs.runnable) {
        (Some(0), Some(true)) => vcpu.run_still_since.or(vcpu.last_now),
        _ => None,
    };
    let stalled = vcpu
        .run_still_since
        .is_some_and(|since| now.saturating_sub(since) > CPU_TIME_LAG_NS);
    let mut activity = Activity {
        ran,
        waited: wait_grew,
        stalled,
        ..Activity::default()
    };
    // The continuous limit catches a vCPU that never yields its pCPU (a
    // spinning guest). A thread the host saw off-CPU for over a tenth of
    // the interval did yield (halted or blocked). Without host CPU times the
    // charge is wall time, which never looks like a yield.
    // A thread never switched out did not yield: its low run time is
    // the counter's tick lag, not a halt.
    // A preempted thread (its time off a CPU was run delay) did not
    // yield either: only time asleep counts.
    // A thread runnable at this sample did not yield either: its counter
    // moves only when it is switched out or at a tick, so a thread that was
    // switched out (by this loop's own wake-up on its CPU, say) and has run
    // since shows little or no run time until its next switch.
    let off_cpu_now = obs.runnable != Some(true);
    // Switched out, off its CPU now, and `used` under nine tenths of the interval.
    let off_for_a_tenth = |used: Nanos| {
        switched && off_cpu_now && wall > 0 && used.saturating_mul(10) < wall.saturating_mul(9)
    };
    let yielded = off_for_a_tenth(consumed.saturating_add(waited));
    // Only a boosted interval moves the count. An unboosted one keeps it: a
    // fair-class thread that was preempted shows a run delay only once it runs
    // again, so a spinner waiting behind host load can look as if it had
    // halted, and would escape its limit at every refusal of the VM's budget.
    // A thread that really halts shows it at its next boosted interval.
    if let Mode::Boosted { .. } = vcpu.mode {
        vcpu.released_unyielded = false;
        // A yield restarts the continuous run within this interval: at most
        // `consumed` long. The sliding budget bounds everything else.
        if yielded {
            vcpu.unyielding_since_throttle = false;
            vcpu.continuous_cpu = consumed;
        } else {
            vcpu.continuous_cpu = vcpu.continuous_cpu.saturating_add(consumed);
        }
        vcpu.ledger.charge(now, consumed);
        vcpu.stats.boosted_cpu_ns = vcpu.stats.boosted_cpu_ns.saturating_add(consumed);
        vcpu.cs_episode_cpu = vcpu.cs_episode_cpu.saturating_add(consumed);
        activity.boosted_cpu = consumed;
    } else if vcpu.released_unyielded && off_for_a_tenth(consumed) {
        // Let go for want of a reason, then off its pCPU for over a tenth of
        // the interval (asleep, or preempted: unboosted, the host had it):
        // the next boost starts a new continuous run. Being let go and
        // boosted again while it spins does not restart the count.
        vcpu.released_unyielded = false;
        vcpu.continuous_cpu = 0;
    }
    vcpu.last_now = Some(now.max(vcpu.last_now.unwrap_or(0)));
    vcpu.last_run = obs.run_ns.or(vcpu.last_run);
    vcpu.last_slices = obs.slices.or(vcpu.last_slices);
    vcpu.last_wait = obs.wait_ns.or(vcpu.last_wait);

    if let Some(guest) = obs.guest.as_ref() {
        if let Some(last) = vcpu.last_cs_count {
            activity.cs_entries = guest.cs_count.wrapping_sub(last).min(u64::from(u32::MAX));
        }
        if let Some(last) = vcpu.last_spin_count {
            activity.spun = guest.spin_count != last;
        }
        vcpu.last_cs_count = Some(guest.cs_count);
        vcpu.last_spin_count = Some(guest.spin_count);
    }
    activity
}

/// What the host itself found about a vCPU at a step, besides its guest line.
#[derive(Clone, Copy, Debug, Default)]
struct Hints {
    /// In a critical section that the slice extension covers (see `critical_section`).
    critical: bool,
    /// The target of the VM's directed boost.
    directed: bool,
    /// A preempted lock holder with a grant (see `lock_grant`).
    lock_holder: bool,
}

/// Whether a vCPU is in a critical-section episode, and whether its slice extension
/// applies now. The host-read preempt count, where there is one, replaces the guest
/// line's `cs_depth`: the guest can make it read non-zero but not zero while it holds
/// a spinlock. A count read at every tick is non-zero often in a busy kernel, so it
/// extends a slice only while the pCPU is contended: run delay grew since the previous
/// sample, or the pCPU's load reached `cs_contended_load_permille`.
fn critical_section(cfg: &PolicyConfig, obs: &VcpuObservation, act: &Activity) -> (bool, bool) {
    if cfg.cs_extension_ns == 0 {
        return (false, false);
    }
    match obs.preempt_count {
        Some(_) => {
            let in_section = preemption_disabled(obs.preempt_count, obs.guest.as_ref());
            let contended = cfg.cs_contended_load_permille == 0
                || act.wait_grew()
                || obs
                    .pcpu_load_permille
                    .is_some_and(|l| l >= cfg.cs_contended_load_permille);
            (in_section, in_section && contended)
        }
        None => {
            let in_section = obs.guest.is_some_and(|g| g.online && g.cs_depth > 0);
            (in_section, in_section)
        }
    }
}

/// The lock-holder grant of a vCPU at a step. A grant runs for `lock_holder_boost_ns`
/// of wall time while the vCPU keeps preemption disabled (it ends at the first step
/// that reads the count back at zero, or the vCPU idle). A new one starts for a vCPU
/// with preemption disabled whose run delay grew by more than its run time between its
/// last two samples, unless it started `lock_holder_max_grants` in the last budget
/// window. Forgets what has ended; the start itself is recorded by `commit`.
fn lock_grant(
    cfg: &PolicyConfig,
    vcpu: &mut VcpuPolicy,
    now: Nanos,
    obs: &VcpuObservation,
    act: &Activity,
) -> LockGrant {
    let window = cfg.budget_window_ns;
    while vcpu
        .lock_grants
        .front()
        .is_some_and(|&t| now.saturating_sub(t) >= window)
    {
        vcpu.lock_grants.pop_front();
    }
    if cfg.lock_holder_boost_ns == 0 || !preemption_disabled(obs.preempt_count, obs.guest.as_ref())
    {
        vcpu.lock_grant_until = None;
        return LockGrant::No;
    }
    match vcpu.lock_grant_until {
        Some(until) if now < until => return LockGrant::Runs(until),
        _ => vcpu.lock_grant_until = None,
    }
    if !act.preempted() {
        return LockGrant::No;
    }
    if vcpu.lock_grants.len() >= cfg.lock_holder_max_grants as usize {
        vcpu.stats.lock_holder_capped += 1;
        return LockGrant::No;
    }
    LockGrant::Starts(now.saturating_add(cfg.lock_holder_boost_ns))
}

/// The reasons to boost and the host priority they ask for.
fn wanted(cfg: &PolicyConfig, guest: Option<&GuestVcpuState>, hints: Hints) -> (Reasons, u8) {
    let mut reasons = Reasons::NONE;
    let mut prio = 0u8;
    let mut want = |reason: Reasons, p: u8| {
        reasons.insert(reason);
        prio = prio.max(p);
    };
    if let Some(g) = guest.filter(|g| g.online) {
        let done = cfg.honour_requests && g.request == BoostRequest::Unboost;
        if !done {
            let task_rt = matches!(g.task.policy, SchedPolicy::Fifo | SchedPolicy::Rr)
                && g.task.rt_prio >= cfg.guest_rt_threshold;
            if cfg.boost_on_rt_running && task_rt {
                want(Reasons::RT_RUNNING, cfg.map_guest_prio(g.task.rt_prio));
            }
            if cfg.boost_on_rt_running && g.task.policy == SchedPolicy::Deadline {
                want(Reasons::RT_RUNNING, cfg.prio_max);
            }
            if cfg.boost_on_rt_pending
                && g.rt_pending > 0
                && (g.pending_prio == 0 || g.pending_prio >= cfg.guest_rt_threshold)
            {
                let p = g.pending_prio.max(cfg.guest_rt_threshold).min(MAX_RT_PRIO);
                want(Reasons::RT_PENDING, cfg.map_guest_prio(p));
            }
            if cfg.honour_requests {
                if let BoostRequest::Boost { prio: p, .. } = g.request {
                    if p >= cfg.guest_rt_threshold {
                        want(Reasons::REQUEST, cfg.map_guest_prio(p));
                    }
                }
            }
        }
        if cfg.boost_on_irq && (g.irq_depth > 0 || g.softirq_depth > 0) {
            want(Reasons::IRQ, cfg.prio_max);
        }
    }
    if hints.critical {
        want(Reasons::CRITICAL, cfg.prio_min);
    }
    if hints.directed {
        want(Reasons::DIRECTED, cfg.prio_min);
    }
    if hints.lock_holder {
        want(Reasons::LOCK_HOLDER, cfg.prio_min);
    }
    (reasons, prio.clamp(cfg.prio_min, cfg.prio_max))
}

/// What a thread's own limits allow (pure: the state changes in `commit`).
/// Returns the reasons that still count: when only bounded reasons are set, a
/// spent critical-section extension or lock-holder grant (ending at
/// `lock_until`) drops its reasons.
fn assess(
    cfg: &PolicyConfig,
    vcpu: &VcpuPolicy,
    now: Nanos,
    mut reasons: Reasons,
    lock_until: Option<Nanos>,
) -> (Reasons, Want) {
    if let Mode::Throttled { until } = vcpu.mode {
        if now < until {
            return (Reasons::NONE, Want::Throttled(until));
        }
    }
    let mut bound = None;
    if reasons.bounded_only() {
        let cs_left = cfg.cs_extension_ns.saturating_sub(vcpu.cs_episode_cpu);
        let lock_left = lock_until.map_or(0, |until| until.saturating_sub(now));
        if cs_left < cfg.min_quantum_ns {
            reasons.remove(Reasons::EPISODE);
        }
        if lock_left < cfg.min_quantum_ns {
            reasons.remove(Reasons::LOCK_HOLDER);
        }
        if reasons.is_empty() {
            // The slice extension of this episode (or the grant) is used up:
            // no boost until the section ends, but no throttle either.
            return (Reasons::NONE, Want::Nothing);
        }
        // Each reason left holds the boost for what is left of its own bound.
        let mut left = 0;
        if reasons.intersects(Reasons::EPISODE) {
            left = cs_left;
        }
        if reasons.contains(Reasons::LOCK_HOLDER) {
            left = left.max(lock_left);
        }
        bound = Some(left);
    }
    if reasons.is_empty() {
        return (reasons, Want::Nothing);
    }
    // A boosted thread whose counter has stood still while it stayed
    // runnable may have run all that time (the counter moves at the next
    // tick): that time is not charged yet but counts against what is left,
    // so the limits hold to within a step rather than a tick.
    let uncounted = vcpu.uncounted_run(now);
    let continuous_used = vcpu.continuous_cpu.saturating_add(uncounted);
    let mut allowance = cfg
        .budget_ns
        .saturating_sub(vcpu.ledger.used(now).saturating_add(uncounted))
        .min(cfg.max_continuous_ns.saturating_sub(continuous_used));
    if let Some(left) = bound {
        allowance = allowance.min(left);
    }
    if allowance < cfg.min_quantum_ns {
        (reasons, Want::Exhausted)
    } else {
        (reasons, Want::Grant(allowance))
    }
}

/// The state machine of one thread: normal, boosted, throttled.
fn commit(
    cfg: &PolicyConfig,
    vcpu: &mut VcpuPolicy,
    now: Nanos,
    wish: Wish,
    outer: Outer,
    deadline: DeadlineReservation,
) -> (VcpuDecision, Option<Nanos>) {
    let mut event = None;
    if let Mode::Throttled { until } = vcpu.mode {
        if now >= until {
            vcpu.mode = Mode::Normal;
            event = Some(BoostEvent::Unthrottled);
        }
    }
    let throttled = |until: Nanos, event| VcpuDecision {
        sched: ThreadSched::Baseline,
        state: BoostState::Throttled,
        throttle_until: until,
        reasons: Reasons::NONE,
        event,
    };
    match wish.want {
        Want::Throttled(until) => (throttled(until, None), Some(until)),
        Want::Nothing => {
            // No reason to boost. The next request starts a new continuous
            // run once the thread has been switched out (see `account`).
            vcpu.released_unyielded = vcpu.continuous_cpu > 0;
            vcpu.unyielding_since_throttle = false;
            if matches!(vcpu.mode, Mode::Boosted { .. }) {
                vcpu.mode = Mode::Normal;
                event = Some(BoostEvent::Unboosted);
            }
            (
                VcpuDecision {
                    event,
                    ..VcpuDecision::default()
                },
                None,
            )
        }
        Want::Exhausted => {
            // A thread throttled again soon after its last throttle, or
            // without having yielded or stopped asking since, is a repeat
            // offender (a rogue guest): each such throttle lasts twice as
            // long, up to the maximum. A budget window without a throttle, in
            // which the thread yielded, starts over.
            let repeat = vcpu.unyielding_since_throttle
                || vcpu
                    .last_throttle_end
                    .is_some_and(|end| now.saturating_sub(end) < cfg.budget_window_ns);
            vcpu.throttle_streak = if repeat {
                vcpu.throttle_streak.saturating_add(1)
            } else {
                0
            };
            let duration = cfg
                .throttle_ns
                .saturating_mul(1u64 << vcpu.throttle_streak.min(20))
                .min(cfg.max_throttle_ns);
            let until = now.saturating_add(duration);
            vcpu.last_throttle_end = Some(until);
            vcpu.continuous_cpu = 0;
            vcpu.unyielding_since_throttle = true;
            vcpu.mode = Mode::Throttled { until };
            vcpu.stats.throttles += 1;
            (throttled(until, Some(BoostEvent::Throttled)), Some(until))
        }
        Want::Grant(own) => match outer {
            Outer::Refused { until, .. } => {
                // The VM's budget or the host cap, not this thread, is spent:
                // no boost and no throttle streak, re-evaluated at `until`.
                let was_boosted = matches!(vcpu.mode, Mode::Boosted { .. });
                vcpu.mode = Mode::Normal;
                let event = if was_boosted {
                    Some(BoostEvent::Throttled)
                } else {
                    event
                };
                (throttled(until, event), Some(until))
            }
            Outer::Share(share) => {
                if let Some(until) = wish.lock_start {
                    vcpu.lock_grant_until = Some(until);
                    vcpu.lock_grants.push_back(now);
                    vcpu.stats.lock_holder_grants += 1;
                }
                let prio = wish.prio;
                match &mut vcpu.mode {
                    Mode::Boosted { prio: current, .. } => {
                        if *current != prio {
                            *current = prio;
                            event = Some(BoostEvent::Reprioritised);
                        }
                    }
                    _ => {
                        vcpu.mode = Mode::Boosted { prio };
                        vcpu.stats.boosts += 1;
                        event = Some(BoostEvent::Boosted);
                    }
                }
                let decision = VcpuDecision {
                    sched: match cfg.rt_class {
                        RtClass::Deadline => ThreadSched::Deadline(deadline),
                        class => ThreadSched::Rt { class, prio },
                    },
                    state: BoostState::Boosted,
                    throttle_until: 0,
                    reasons: wish.reasons,
                    event,
                };
                (decision, Some(now.saturating_add(own.min(share))))
            }
        },
    }
}

/// Clears what the guest publishes but did not negotiate, so the engine
/// never acts on information outside the agreed feature set.
pub fn mask_by_features(mut state: GuestVcpuState, features: u64) -> GuestVcpuState {
    let has = |bit: u64| features & bit != 0;
    if !has(PVSCHED_FEAT_TASK_INFO) {
        state.task = Default::default();
    }
    if !has(PVSCHED_FEAT_RT_PENDING) {
        state.rt_pending = 0;
        state.pending_prio = 0;
    }
    if !has(PVSCHED_FEAT_IRQ) {
        state.irq_depth = 0;
        state.softirq_depth = 0;
    }
    if !has(PVSCHED_FEAT_CRITICAL_SECTION) {
        state.cs_depth = 0;
        state.cs_count = 0;
    }
    if !has(PVSCHED_FEAT_BOOST_REQUEST) {
        state.request = BoostRequest::None;
    }
    if !has(PVSCHED_FEAT_SPIN) {
        state.spin_count = 0;
    }
    state
}
