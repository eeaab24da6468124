//! The per-VM controller: everything the host daemon decides about one VM
//! at each loop iteration, behind narrow traits for what it reads and does.
//!
//! A tick reads the shared header (repairing the host copy, beating the
//! host heartbeat, negotiating, watching the guest's heartbeat and module
//! generation), takes each slot's guest line through the seqlock fast path,
//! decodes and validates it, masks it by the agreed features, samples the
//! CPU time of the threads that are boosted, steps the [`VmEngine`] (with
//! the host budget), applies the changed decisions through a
//! [`ThreadActuator`] and publishes host lines. The daemon runs it over the
//! shared mapping, real threads and `/proc`; the simulator runs the same
//! code over an in-memory region and simulated threads.
//!
//! No I/O, no clock: time is a parameter, messages for the operator are
//! returned as notices.

use pvsched_abi::raw::*;
use pvsched_abi::{
    decode_guest_line, negotiate, BoostRequest, BoostState, Doorbell, GuestVcpuState,
    InvalidCounts, InvalidFields, Negotiation, OutOfBounds, Region, SeqRead,
};

use crate::engine::{
    mask_by_features, preemption_disabled, BoostEvent, Reasons, StepInput, ThreadObservation,
    ThreadSched, VcpuDecision, VcpuObservation, VcpuStats,
};
use crate::haltpoll::{tuned_for_load, HaltPollParams};
use crate::host::{HostBudget, HostMember};
use crate::{IoThreadPolicy, Nanos, PolicyConfig, RtClass, VmEngine};

/// The shared region as the controller sees it: the header, each slot's
/// guest line under the guest's seqlock, and the host's lines.
pub trait LineSource {
    /// Copies both header lines (`Err`: the region is too small).
    fn read_header(&self) -> Result<PvschedHeader, OutOfBounds>;
    /// Loads slot `slot`'s guest sequence counter (acquire).
    fn load_guest_seq(&self, slot: u32) -> Result<u32, OutOfBounds>;
    /// Copies slot `slot`'s guest line under the seqlock; `seq` carries the
    /// version the copy was validated against.
    fn read_guest_line(&self, slot: u32) -> Result<SeqRead<PvschedGuestLine>, OutOfBounds>;
    /// Publishes slot `slot`'s host line.
    fn write_host_line(&self, slot: u32, line: &PvschedHostLine) -> Result<(), OutOfBounds>;
    /// Writes the host line of the header.
    fn write_header_host(&self, header: &PvschedHeaderHost) -> Result<(), OutOfBounds>;
    /// Stores the host heartbeat word of the header.
    fn store_host_heartbeat(&self, beat: u64) -> Result<(), OutOfBounds>;
}

impl LineSource for Region<'_> {
    fn read_header(&self) -> Result<PvschedHeader, OutOfBounds> {
        Region::read_header(self)
    }
    fn load_guest_seq(&self, slot: u32) -> Result<u32, OutOfBounds> {
        let offset = PVSCHED_HEADER_SIZE as usize + slot as usize * PVSCHED_SLOT_SIZE as usize;
        self.load_u32(offset, core::sync::atomic::Ordering::Acquire)
    }
    fn read_guest_line(&self, slot: u32) -> Result<SeqRead<PvschedGuestLine>, OutOfBounds> {
        Region::read_guest_line(self, slot)
    }
    fn write_host_line(&self, slot: u32, line: &PvschedHostLine) -> Result<(), OutOfBounds> {
        Region::write_host_line(self, slot, line)
    }
    fn write_header_host(&self, header: &PvschedHeaderHost) -> Result<(), OutOfBounds> {
        Region::write_header_host(self, header)
    }
    fn store_host_heartbeat(&self, beat: u64) -> Result<(), OutOfBounds> {
        Region::store_host_heartbeat(self, beat)
    }
}

/// A thread of the VM the controller manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmThread {
    /// The thread of the vCPU in this slot.
    Vcpu(u32),
    /// The VM's interrupt-delivery thread (QEMU's main loop).
    InterruptPath,
    /// The VM's QEMU IOThread at this index of the controller's list.
    IoThread(u32),
}

/// Why a scheduling change was not made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The thread no longer exists: the controller forgets it.
    #[error("{0}")]
    Gone(String),
    /// The call failed; the change is tried again at the next step.
    #[error("{0}")]
    Failed(String),
}

/// Changes the scheduling attributes of the VM's threads.
pub trait ThreadActuator {
    /// Gives `thread` the attributes `sched`; `Ok(true)` when something
    /// changed, `Ok(false)` when the thread already had them.
    fn apply(&mut self, thread: VmThread, sched: ThreadSched) -> Result<bool, ApplyError>;
}

/// What `/proc/<pid>/task/<tid>/stat` adds to a CPU-time sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadStat {
    /// The pCPU the thread last ran on.
    pub pcpu: u32,
    /// Running or runnable (state `R`).
    pub runnable: bool,
    /// Its scheduling policy, raw.
    pub policy: u32,
    /// Its RT priority, raw.
    pub rt_priority: u32,
}

/// The stat part of a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StatSample {
    /// Not asked for.
    #[default]
    NotAsked,
    /// Read.
    Read(ThreadStat),
    /// Asked for, could not be read (the thread is going).
    Failed,
}

/// One CPU-time sample of a thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSample {
    /// Cumulative time on a CPU.
    pub run_ns: Nanos,
    /// Cumulative time runnable but kept off a CPU (run delay).
    pub wait_ns: Nanos,
    /// Cumulative times the thread was put on a CPU (`None`: unknown).
    pub slices: Option<u64>,
    /// Position and attributes, when asked for.
    pub stat: StatSample,
}

/// The outcome of sampling a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampled {
    /// A fresh sample.
    Fresh(CpuSample),
    /// The thread has no source of samples (its files could not be opened).
    NoSource,
    /// The thread could not be read: it is gone.
    Gone,
}

/// Reads the CPU time of the VM's threads.
pub trait CpuClock {
    /// Samples `thread`'s run time and run delay, and its stat when `with_stat`.
    fn sample(&mut self, thread: VmThread, with_stat: bool) -> Sampled;
}

/// Guest state the host reads from the guest's RAM itself (introspection), without
/// the guest's help: the guest cannot fake what it does not write, only where it lives.
pub trait GuestMemory {
    /// The preempt count of the guest CPU of `slot`, ignored bits masked
    /// ([`pvsched_abi::preempt_disabled_bits`]), `None` when it cannot be read.
    fn preempt_count(&self, slot: u32) -> Option<u32>;
}

/// Host state per pCPU, sampled by the caller.
pub trait HostInfo {
    /// Load of `pcpu` over the last interval, per mille.
    fn load_permille(&self, pcpu: u32) -> u32;
    /// Whether an SMT sibling of `pcpu` was busy.
    fn sibling_busy(&self, pcpu: u32) -> bool;
}

/// Why a slot's guest data is not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// The line names another CPU than its slot.
    CpuId(u32),
    /// The line holds impossible values (ignored whole).
    Invalid(InvalidFields),
    /// The line never settled under the seqlock.
    Torn,
}

/// Counters of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerCounters {
    /// Boosts started.
    pub boosts: u64,
    /// Throttles.
    pub throttles: u64,
    /// Boosted CPU time of the vCPUs (ns).
    pub boosted_ns: u64,
    /// Guest line writes with at least one invalid field (ignored).
    pub invalid_writes: u64,
    /// Guest lines whose cpu_id was not their slot index (ignored).
    pub cpu_id_mismatches: u64,
    /// Guest lines that never settled under the seqlock.
    pub torn_reads: u64,
    /// Host header lines found overwritten and repaired.
    pub header_repairs: u64,
    /// Guests refused for another major version.
    pub version_mismatches: u64,
    /// Failed scheduling calls.
    pub apply_errors: u64,
    /// Scheduling changes applied to vCPU threads.
    pub applies: u64,
    /// Times the VM's own budget refused boosts.
    pub vm_throttles: u64,
    /// Times the host-wide cap refused this VM boosts.
    pub host_throttles: u64,
    /// Times the VM became a repeat offender and had its budgets cut.
    pub offender_periods: u64,
    /// Times the guest's heartbeat stopped and its requests were ignored.
    pub stale_guests: u64,
    /// Boost requests of idle vCPUs that the host expired after
    /// `idle_request_ns` (the guest had not rewritten them).
    pub expired_idle_requests: u64,
    /// CPU-time samples of vCPU threads taken at a fast tick only because their
    /// host-read preempt count was non-zero (otherwise they would not have been sampled).
    pub preempt_count_samples: u64,
    /// Lock-holder grants started (preempted vCPUs with preemption disabled).
    pub lock_holder_grants: u64,
    /// Steps at which a preempted lock holder was refused a grant by
    /// `lock_holder_max_grants`.
    pub lock_holder_capped: u64,
}

/// The first wait before a change the kernel refused is tried again.
pub const APPLY_RETRY_MIN_NS: Nanos = 10_000_000;
/// The longest wait between tries of a change the kernel keeps refusing.
pub const APPLY_RETRY_MAX_NS: Nanos = 1_000_000_000;

/// A change the kernel refused, and when it may be tried again: a refusal that
/// lasts (no bandwidth left for `SCHED_DEADLINE`, a thread pinned outside its
/// root domain) costs one system call per back-off, not one per tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ApplyRetry {
    sched: ThreadSched,
    not_before: Nanos,
    backoff: Nanos,
}

impl ApplyRetry {
    /// Whether applying `sched` at `now` must wait.
    fn holds(retry: Option<ApplyRetry>, sched: ThreadSched, now: Nanos) -> bool {
        retry.is_some_and(|r| r.sched == sched && now < r.not_before)
    }

    /// `sched` was refused at `now`: wait twice as long as last time for the
    /// same change (a different change starts from the minimum).
    fn refused(retry: &mut Option<ApplyRetry>, sched: ThreadSched, now: Nanos) {
        let backoff = match *retry {
            Some(r) if r.sched == sched => (r.backoff * 2).min(APPLY_RETRY_MAX_NS),
            _ => APPLY_RETRY_MIN_NS,
        };
        *retry = Some(ApplyRetry {
            sched,
            not_before: now.saturating_add(backoff),
            backoff,
        });
    }
}

/// What the controller knows about one slot.
#[derive(Clone, Debug)]
pub struct SlotState {
    /// A vCPU thread is attached to the slot.
    pub present: bool,
    last_line: Option<PvschedGuestLine>,
    last_seq: Option<u32>,
    /// The validated, feature-masked guest state in use.
    pub guest: Option<GuestVcpuState>,
    /// Why the guest data is not in use.
    pub ignored: Option<Ignored>,
    /// The attributes the thread has (as far as the controller made them).
    pub applied: ThreadSched,
    /// The engine's latest decision.
    pub decision: VcpuDecision,
    /// Latest cumulative run time.
    pub run_ns: Nanos,
    /// Latest cumulative run delay.
    pub wait_ns: Nanos,
    /// Latest count of times put on a CPU, when known.
    pub slices: Option<u64>,
    /// The preempt count read from guest RAM at this tick (`None`: not readable).
    pub preempt_count: Option<u32>,
    /// At this tick the vCPU holds preemption disabled by that count and its guest
    /// line does not show it idle.
    pub preemption_disabled: bool,
    /// Whether the thread was runnable (state `R`: running or waiting for a CPU), when
    /// this tick's sample read its stat.
    pub runnable_now: Option<bool>,
    /// The pCPU it last ran on.
    pub pcpu: u32,
    /// Kept off a CPU while runnable over the last interval.
    pub preempted: bool,
    /// Its own policy, raw (at baseline).
    pub policy_raw: u32,
    /// Its own RT priority, raw.
    pub prio_raw: u32,
    boosted_ns_seen: u64,
    lock_grants_seen: u64,
    lock_capped_seen: u64,
    /// Its guest state changed at this tick (a boost may start).
    reevaluated: bool,
    retry: Option<ApplyRetry>,
    /// When the host first saw the line's current boost request of an idle
    /// vCPU, and whether it has expired (see `idle_request_ns`).
    idle_request: Option<(Nanos, bool)>,
}

impl SlotState {
    fn new() -> Self {
        SlotState {
            present: false,
            last_line: None,
            last_seq: None,
            guest: None,
            ignored: None,
            applied: ThreadSched::Baseline,
            decision: VcpuDecision::default(),
            run_ns: 0,
            wait_ns: 0,
            slices: None,
            preempt_count: None,
            preemption_disabled: false,
            runnable_now: None,
            pcpu: 0,
            preempted: false,
            policy_raw: 0,
            prio_raw: 0,
            boosted_ns_seen: 0,
            lock_grants_seen: 0,
            lock_capped_seen: 0,
            reevaluated: false,
            retry: None,
            idle_request: None,
        }
    }

    /// Notes the guest state just decoded at `now`: a boost request of an
    /// idle vCPU keeps the time it was first seen while the line says the
    /// same; a new write (its update counter moves) starts it again.
    fn note_idle_request(&mut self, state: Option<&GuestVcpuState>, now: Nanos) {
        let idle_request =
            state.filter(|g| g.idle && matches!(g.request, BoostRequest::Boost { .. }));
        self.idle_request = match (idle_request, self.idle_request) {
            (None, _) => None,
            (Some(g), Some(seen)) if Some(g.updates) == self.guest.map(|p| p.updates) => Some(seen),
            (Some(_), _) => Some((now, false)),
        };
    }

    /// The guest state the engine sees: an idle vCPU's request past
    /// `limit_ns` is dropped. Returns whether it expired at this call.
    fn guest_for_engine(&mut self, now: Nanos, limit_ns: Nanos) -> (Option<GuestVcpuState>, bool) {
        let mut guest = self.guest;
        let mut expired_now = false;
        if let Some((since, expired)) = &mut self.idle_request {
            if now.saturating_sub(*since) >= limit_ns {
                expired_now = !*expired;
                *expired = true;
                if let Some(g) = guest.as_mut() {
                    g.request = BoostRequest::None;
                }
            }
        }
        (guest, expired_now)
    }

    /// When this slot's idle request expires, if it has not yet.
    fn idle_request_expiry(&self, limit_ns: Nanos) -> Option<Nanos> {
        match self.idle_request {
            Some((since, false)) => Some(since.saturating_add(limit_ns)),
            _ => None,
        }
    }

    /// Takes a sample; false when the thread is gone.
    fn sample(&mut self, clock: &mut dyn CpuClock, slot: u32, full: bool) -> bool {
        let s = match clock.sample(VmThread::Vcpu(slot), full) {
            Sampled::Fresh(s) => s,
            Sampled::NoSource => return true,
            Sampled::Gone => return false,
        };
        let waited = s.wait_ns > self.wait_ns;
        self.run_ns = s.run_ns;
        self.wait_ns = s.wait_ns;
        self.slices = s.slices;
        // Approximate: a run delay that grew since the last sample means the
        // thread was runnable but kept off a CPU during the interval.
        self.preempted = waited;
        match s.stat {
            StatSample::NotAsked => true,
            StatSample::Failed => false,
            StatSample::Read(st) => {
                self.runnable_now = Some(st.runnable);
                self.pcpu = st.pcpu;
                // With `stat`: and it is still runnable (R covers running too).
                self.preempted = st.runnable && waited;
                self.policy_raw = st.policy;
                self.prio_raw = st.rt_priority;
                true
            }
        }
    }
}

/// The interrupt-delivery thread or an IOThread as the controller knows it.
#[derive(Clone, Copy, Debug)]
pub struct PathState {
    /// Latest cumulative run time (`None`: unknown).
    pub run_ns: Option<Nanos>,
    /// The attributes the thread has.
    pub applied: ThreadSched,
    retry: Option<ApplyRetry>,
    thread: VmThread,
}

impl PathState {
    fn new(thread: VmThread) -> Self {
        PathState {
            run_ns: None,
            applied: ThreadSched::Baseline,
            retry: None,
            thread,
        }
    }

    fn sample(&mut self, clock: &mut dyn CpuClock) {
        self.run_ns = match clock.sample(self.thread, false) {
            Sampled::Fresh(s) => Some(s.run_ns),
            Sampled::NoSource | Sampled::Gone => None,
        };
    }
}

/// Whether a guest's header heartbeat still moves: a hung or dead guest
/// must not keep a stale boost request until it is throttled. Only a guest
/// whose heartbeat has been seen moving can be found stale (the module
/// beats every `heartbeat_ms`); one that never beats is bounded by its
/// budgets like any other guest.
#[derive(Debug, Default)]
struct Liveness {
    /// The heartbeat as last seen, and when it last moved.
    seen: Option<(u64, u64)>,
    moved: bool,
    stale: bool,
}

impl Liveness {
    /// Takes the heartbeat seen at `now`; returns whether the guest is stale
    /// (quiet for over `limit_ns` after beating), whether that just changed,
    /// and how long it has been quiet.
    fn observe(&mut self, beat: u64, now: u64, limit_ns: u64) -> (bool, bool, u64) {
        let since = match self.seen {
            Some((seen, at)) if seen == beat => at,
            previous => {
                self.moved |= previous.is_some();
                self.seen = Some((beat, now));
                now
            }
        };
        let quiet = now.saturating_sub(since);
        let stale = self.moved && quiet > limit_ns;
        let flipped = stale != self.stale;
        self.stale = stale;
        (stale, flipped, quiet)
    }
}

/// What one tick needs besides the traits.
pub struct TickInput<'a> {
    /// Time of the tick's start (the guest lines' read time).
    pub now: Nanos,
    /// Sample every thread and republish every host line.
    pub slow: bool,
    /// Host load and topology.
    pub host: &'a dyn HostInfo,
    /// The host-wide cap shared by every VM (`None`: this VM's budgets only).
    pub host_budget: Option<&'a mut HostBudget>,
    /// The host cap's wake time has come: a VM with boosted threads must step.
    pub host_due: bool,
    /// The VM's process is still the one managed (checked by the caller on
    /// slow ticks; `false` ends the tick before the engine runs).
    pub process_alive: bool,
    /// The guest's RAM, where the host can read it (`None`: no introspection).
    pub guest_memory: Option<&'a dyn GuestMemory>,
}

/// What a tick learned.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TickOutcome {
    /// The engine ran.
    pub stepped: bool,
    /// The VM's process is gone.
    pub gone: bool,
    /// Messages for the operator (one line each, without the VM's name).
    pub notices: Vec<String>,
    /// Some guest line or the negotiation changed at this tick.
    pub guest_changed: bool,
    /// A host line the guest acts on changed (a vCPU throttled or released):
    /// worth an interrupt where the channel has one.
    pub notify_guest: bool,
}

/// The decisions of one VM, from its shared region to its threads.
pub struct VmController {
    engine: VmEngine,
    header: PvschedHeaderHost,
    heartbeat: u64,
    slots: Vec<SlotState>,
    obs: Vec<VcpuObservation>,
    features: Option<u64>,
    negotiation: String,
    invalid: InvalidCounts,
    counters: ControllerCounters,
    last_error: Option<String>,
    poll: HaltPollParams,
    slow_ticks: u64,
    path: Option<PathState>,
    /// The VM's IOThreads, in the order the caller numbers them.
    iothreads: Vec<PathState>,
    io_obs: Vec<ThreadObservation>,
    liveness: Liveness,
    guest_generation: Option<u32>,
}

impl VmController {
    /// A controller for the slots of `engine` whose host header is
    /// `header` (the copy it keeps as the truth and repairs the shared one from).
    pub fn new(engine: VmEngine, header: PvschedHeaderHost) -> Self {
        let nr_slots = engine.nr_vcpus();
        VmController {
            engine,
            heartbeat: header.host_heartbeat,
            header,
            slots: (0..nr_slots).map(|_| SlotState::new()).collect(),
            obs: vec![VcpuObservation::default(); nr_slots],
            features: None,
            negotiation: "absent".into(),
            invalid: InvalidCounts::default(),
            counters: ControllerCounters::default(),
            last_error: None,
            poll: HaltPollParams::GUEST_HALTPOLL,
            slow_ticks: 0,
            path: None,
            iothreads: Vec::new(),
            io_obs: Vec::new(),
            liveness: Liveness::default(),
            guest_generation: None,
        }
    }

    /// The policy in force.
    pub fn config(&self) -> &PolicyConfig {
        self.engine.config()
    }

    /// The host header the controller keeps.
    pub fn header(&self) -> &PvschedHeaderHost {
        &self.header
    }

    /// Every slot.
    pub fn slots(&self) -> &[SlotState] {
        &self.slots
    }

    /// The interrupt-delivery thread, once attached.
    pub fn interrupt_path(&self) -> Option<&PathState> {
        self.path.as_ref()
    }

    /// The negotiation as a sentence for the status.
    pub fn negotiation(&self) -> &str {
        &self.negotiation
    }

    /// Advertises the daemon's doorbell (or withdraws it) in the host
    /// header: the copy kept as the truth and the shared one.
    pub fn advertise_doorbell(&mut self, lines: &dyn LineSource, doorbell: Option<Doorbell>) {
        Doorbell::advertise(doorbell, &mut self.header);
        let _ = lines.write_header_host(&PvschedHeaderHost {
            host_heartbeat: self.heartbeat,
            ..self.header
        });
    }

    /// Sets the negotiation sentence (a region the caller found unusable).
    pub fn set_negotiation(&mut self, text: String) {
        self.negotiation = text;
    }

    /// The features agreed with a live guest (`None`: none in use).
    pub fn features(&self) -> Option<u64> {
        self.features
    }

    /// The VM budget's use and refusals at the last step.
    pub fn budget(&self) -> crate::engine::VmBudgetStats {
        self.engine.vm_stats()
    }

    /// Counters.
    pub fn counters(&self) -> &ControllerCounters {
        &self.counters
    }

    /// Invalid fields seen, per field.
    pub fn invalid_counts(&self) -> &InvalidCounts {
        &self.invalid
    }

    /// The latest error.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Records an error to show in the status.
    pub fn set_error(&mut self, error: Option<String>) {
        self.last_error = error;
    }

    /// Counters of one vCPU's engine state.
    pub fn stats(&self, slot: usize) -> VcpuStats {
        self.engine.stats(slot).unwrap_or_default()
    }

    /// Counters of the interrupt-delivery thread.
    pub fn interrupt_path_stats(&self) -> VcpuStats {
        self.engine.interrupt_path_stats()
    }

    /// Earliest time the engine must run again.
    pub fn wake_at(&self) -> Option<Nanos> {
        let limit = self.engine.config().idle_request_ns;
        self.slots
            .iter()
            .filter_map(|v| v.idle_request_expiry(limit))
            .chain(self.engine.wake_at())
            .min()
    }

    /// This VM's membership of the host budget, to leave it when the VM goes.
    pub fn host_member(&self) -> Option<HostMember> {
        self.engine.host_member()
    }

    /// Threads this VM has boosted after its last step.
    pub fn boosted_threads(&self) -> u64 {
        self.engine.boosted_threads()
    }

    /// Forgets a slot (its thread changed or went): it restarts unboosted,
    /// with no thread, and reads its guest line afresh.
    pub fn reset_slot(&mut self, slot: u32) {
        if let Some(v) = self.slots.get_mut(slot as usize) {
            self.engine.reset_vcpu(slot as usize);
            *v = SlotState::new();
        }
    }

    /// Attaches a (new) thread to a reset slot and takes its first sample.
    pub fn attach_thread(&mut self, slot: u32, clock: &mut dyn CpuClock) {
        if let Some(v) = self.slots.get_mut(slot as usize) {
            v.present = true;
            v.sample(clock, slot, true);
        }
    }

    /// Attaches the interrupt-delivery thread and takes its first sample.
    pub fn attach_interrupt_path(&mut self, clock: &mut dyn CpuClock) {
        let mut path = PathState::new(VmThread::InterruptPath);
        path.sample(clock);
        self.path = Some(path);
    }

    /// Sets how the VM's IOThreads are boosted (`None`: never).
    pub fn set_iothread_policy(&mut self, policy: Option<IoThreadPolicy>) {
        self.engine.set_iothread_policy(policy);
    }

    /// The VM's IOThreads as the controller knows them.
    pub fn iothreads(&self) -> &[PathState] {
        &self.iothreads
    }

    /// Counters of IOThread `index` (zero until it is observed).
    pub fn iothread_stats(&self, index: usize) -> VcpuStats {
        self.engine.iothread_stats(index).unwrap_or_default()
    }

    /// Attaches a (new) thread as IOThread `index`, growing the list to hold
    /// it: it starts unboosted with an empty ledger, and takes its first
    /// sample. The caller has restored the thread that held the index.
    pub fn attach_iothread(&mut self, index: u32, clock: &mut dyn CpuClock) {
        let i = index as usize;
        while self.iothreads.len() <= i {
            let next = VmThread::IoThread(self.iothreads.len() as u32);
            self.iothreads.push(PathState::new(next));
        }
        self.engine.reset_iothread(i);
        let mut state = PathState::new(VmThread::IoThread(index));
        state.sample(clock);
        self.iothreads[i] = state;
    }

    /// Keeps the first `count` IOThreads (the caller restored the others).
    pub fn truncate_iothreads(&mut self, count: usize) {
        self.iothreads.truncate(count);
    }

    /// A change the actuator had accepted as deferred (`Ok(false)`) failed
    /// when it was finally made: the thread is still at its baseline. It
    /// counts as an apply error, and the decision is applied again after the
    /// back-off of a refused change.
    pub fn deferred_apply_failed(&mut self, thread: VmThread, message: String, now: Nanos) {
        let state = match thread {
            VmThread::Vcpu(slot) => self
                .slots
                .get_mut(slot as usize)
                .map(|v| (&mut v.applied, &mut v.retry)),
            VmThread::InterruptPath => self.path.as_mut().map(|p| (&mut p.applied, &mut p.retry)),
            VmThread::IoThread(i) => self
                .iothreads
                .get_mut(i as usize)
                .map(|p| (&mut p.applied, &mut p.retry)),
        };
        if let Some((applied, retry)) = state {
            ApplyRetry::refused(retry, *applied, now);
            *applied = ThreadSched::Baseline;
            self.counters.apply_errors += 1;
            self.last_error = Some(message);
        }
    }

    /// Every thread is being restored by the caller: nothing is applied any more.
    pub fn released(&mut self) {
        for v in &mut self.slots {
            v.applied = ThreadSched::Baseline;
        }
        if let Some(path) = self.path.as_mut() {
            path.applied = ThreadSched::Baseline;
        }
        for io in &mut self.iothreads {
            io.applied = ThreadSched::Baseline;
        }
    }

    /// One loop iteration; `act` is `None` to observe only (nothing is
    /// applied or written, the decisions are taken as applied).
    pub fn tick(
        &mut self,
        lines: &dyn LineSource,
        mut act: Option<&mut dyn ThreadActuator>,
        clock: &mut dyn CpuClock,
        mut input: TickInput<'_>,
    ) -> TickOutcome {
        let mut out = TickOutcome::default();
        let observe_only = act.is_none();
        let now = input.now;

        // Header: our copy is the truth; the guest can scribble on the shared one.
        let shared = lines.read_header().unwrap_or_default();
        if !observe_only {
            self.heartbeat = self.heartbeat.wrapping_add(1);
            let expected = PvschedHeaderHost {
                host_heartbeat: shared.host.host_heartbeat,
                ..self.header
            };
            if shared.host != expected {
                self.counters.header_repairs += 1;
                let _ = lines.write_header_host(&PvschedHeaderHost {
                    host_heartbeat: self.heartbeat,
                    ..self.header
                });
            }
            let _ = lines.store_host_heartbeat(self.heartbeat);
        }
        let features = match negotiate(&self.header, &shared.guest) {
            Ok(Negotiation::Agreed { minor, features }) => {
                let f = (features & PVSCHED_FEAT_BOOST != 0).then_some(features);
                if f != self.features && !self.liveness.stale {
                    self.negotiation =
                        format!("agreed {PVSCHED_VERSION_MAJOR}.{minor} features {features:#x}");
                }
                f
            }
            Ok(Negotiation::GuestAbsent) => {
                if self.features.is_some() || self.negotiation.starts_with("refused") {
                    self.negotiation = "absent".into();
                }
                None
            }
            Err(m) => {
                if !self.negotiation.starts_with("refused") {
                    self.counters.version_mismatches += 1;
                    self.negotiation = format!("refused: {m}");
                }
                None
            }
        };
        let features = features.filter(|_| {
            let limit = self.engine.config().guest_stale_ns;
            let beat = shared.guest.guest_heartbeat;
            let (stale, flipped, quiet) = self.liveness.observe(beat, now, limit);
            if flipped && stale {
                self.counters.stale_guests += 1;
                self.negotiation = format!(
                    "stale: heartbeat stuck at {beat} for {} ms",
                    quiet / 1_000_000
                );
                out.notices.push(format!(
                    "guest heartbeat stopped for over {} ms; its requests are ignored until it moves",
                    limit / 1_000_000
                ));
            } else if flipped {
                self.negotiation = "absent".into();
            }
            !stale
        });
        let mut changed = features != self.features;
        self.features = features;
        if features.is_some() && self.guest_generation != Some(shared.guest.guest_generation) {
            if self.guest_generation.is_some() {
                // The guest module attached again (a guest reboot or a module
                // reload): what the old instance wrote must be read afresh.
                out.notices.push(format!(
                    "guest module re-attached (generation {})",
                    shared.guest.guest_generation
                ));
                for v in &mut self.slots {
                    v.last_seq = None;
                    v.last_line = None;
                    v.guest = None;
                }
                changed = true;
            }
            self.guest_generation = Some(shared.guest.guest_generation);
        }

        // Every line is read afresh when the negotiation or the guest
        // instance changed; otherwise only lines whose counter moved (one
        // changed line must not make every later slot re-read and sample).
        let renegotiated = changed;
        for (slot, v) in self.slots.iter_mut().enumerate() {
            v.reevaluated = false;
            let mut reevaluate = renegotiated;
            // Fast path: the guest bumps the line's sequence counter on every
            // write, so an unchanged counter means nothing new to read. (A
            // guest that writes without bumping it is simply not heard.) The
            // copy below carries the version it was validated against, so a
            // write between this load and the copy is seen at the next tick.
            let seq = lines.load_guest_seq(slot as u32).ok();
            if !reevaluate && seq.is_some() && seq == v.last_seq {
                continue;
            }
            match lines.read_guest_line(slot as u32) {
                Ok(SeqRead::Consistent(line)) => {
                    v.last_seq = Some(line.seq);
                    let content = PvschedGuestLine { seq: 0, ..line };
                    if v.last_line != Some(content) {
                        v.last_line = Some(content);
                        reevaluate = true;
                    }
                }
                Ok(SeqRead::Torn(_)) | Err(_) => {
                    v.last_seq = None;
                    if v.ignored != Some(Ignored::Torn) {
                        self.counters.torn_reads += 1;
                        v.ignored = Some(Ignored::Torn);
                        v.guest = None;
                        v.last_line = None;
                        changed = true;
                    }
                    continue;
                }
            }
            if !reevaluate {
                continue;
            }
            changed = true;
            v.reevaluated = true;
            let Some(features) = features else {
                v.guest = None;
                v.ignored = None;
                continue;
            };
            let Some(line) = v.last_line else { continue };
            let (state, invalid) = decode_guest_line(&line);
            if !invalid.is_empty() {
                // A guest that writes impossible values is buggy or hostile:
                // the whole line is ignored, never clamped into a boost.
                self.counters.invalid_writes += 1;
                self.invalid.record(invalid);
                v.guest = None;
                v.ignored = Some(Ignored::Invalid(invalid));
            } else if state.cpu_id != slot as u32 {
                if v.ignored != Some(Ignored::CpuId(state.cpu_id)) {
                    self.counters.cpu_id_mismatches += 1;
                    out.notices.push(format!(
                        "slot {slot} carries cpu_id {}; its guest data is ignored",
                        state.cpu_id
                    ));
                }
                v.guest = None;
                v.ignored = Some(Ignored::CpuId(state.cpu_id));
            } else {
                let state = mask_by_features(state, features);
                v.note_idle_request(Some(&state), now);
                v.guest = Some(state);
                v.ignored = None;
            }
        }

        // The preempt count of every present vCPU, read from guest RAM (a memory
        // read). A vCPU holding preemption disabled is stepped and sampled at every
        // tick, so the engine sees whether it was kept off a CPU; one whose count
        // just returned to zero is stepped once more, to end its grant. (Neither
        // when the policy uses the count for nothing.)
        let cfg = self.engine.config();
        let uses_count = cfg.lock_holder_boost_ns > 0 || cfg.cs_extension_ns > 0;
        let mut preemption = false;
        for (slot, v) in self.slots.iter_mut().enumerate() {
            v.preempt_count = input
                .guest_memory
                .filter(|_| v.present)
                .and_then(|m| m.preempt_count(slot as u32));
            let disabled = uses_count && preemption_disabled(v.preempt_count, v.guest.as_ref());
            preemption |= disabled || disabled != v.preemption_disabled;
            v.preemption_disabled = disabled;
        }

        let due = self.wake_at().is_some_and(|w| w <= now)
            || (input.host_due && self.engine.boosted_threads() > 0);
        if input.slow && !input.process_alive {
            out.gone = true;
            return out;
        }
        out.guest_changed = changed;
        if !(changed || input.slow || due || preemption) {
            return out;
        }
        out.stepped = true;

        // CPU time: fresh for boosted vCPUs (the budget is charged from it),
        // for those whose guest state just changed (a boost may start
        // now, and the sample is its reference point: taken before the
        // apply, so its first interval is over-, never under-counted) and for
        // those holding preemption disabled (the engine compares their run
        // delay and run time between two samples). The others pass their last
        // sample (slow ticks); should one of them be boosted anyway (a directed
        // boost), its first interval is charged at most the CPU time since that
        // sample, capped by the engine at the wall time between steps.
        let idle_limit = self.engine.config().idle_request_ns;
        for v in &mut self.slots {
            v.runnable_now = None;
        }
        for (slot, (o, v)) in self.obs.iter_mut().zip(&mut self.slots).enumerate() {
            let (guest, expired_now) = v.guest_for_engine(now, idle_limit);
            if expired_now {
                self.counters.expired_idle_requests += 1;
            }
            let fresh = v.applied != ThreadSched::Baseline || v.reevaluated;
            let run_ns = if !v.present {
                None
            } else if fresh || v.preemption_disabled {
                // A vCPU holding preemption disabled is sampled with its state: a
                // thread kept off a CPU has a run delay that Linux updates only when it
                // runs again, so "runnable and not running" shows as state R with a run
                // time that does not move.
                // A boosted vCPU is sampled with its state too: a thread runnable
                // at the sample did not yield, whatever its lagging run time says.
                if !fresh {
                    self.counters.preempt_count_samples += 1;
                }
                let with_state = !fresh || v.applied != ThreadSched::Baseline;
                v.sample(clock, slot as u32, with_state).then_some(v.run_ns)
            } else {
                Some(v.run_ns)
            };
            *o = VcpuObservation {
                guest: if v.present { guest } else { None },
                run_ns,
                slices: run_ns.and(v.slices),
                wait_ns: run_ns.and(Some(v.wait_ns)),
                runnable: run_ns.and(v.runnable_now),
                preempt_count: v.preempt_count,
                pcpu_load_permille: v.preempt_count.map(|_| input.host.load_permille(v.pcpu)),
            };
        }
        let path_obs = self.path.as_mut().map(|path| {
            if path.applied != ThreadSched::Baseline || input.slow {
                path.sample(clock);
            }
            ThreadObservation {
                run_ns: path.run_ns,
            }
        });
        // A boosted IOThread is charged what it ran, sampled at every tick.
        self.io_obs.clear();
        for io in &mut self.iothreads {
            if io.applied != ThreadSched::Baseline || input.slow {
                io.sample(clock);
            }
            self.io_obs.push(ThreadObservation { run_ns: io.run_ns });
        }
        self.engine.step_with(
            now,
            StepInput {
                vcpus: &self.obs,
                interrupt_path: path_obs,
                iothreads: &self.io_obs,
            },
            input.host_budget.as_deref_mut(),
        );
        let budget = self.engine.vm_stats();
        self.counters.vm_throttles = budget.vm_throttles;
        self.counters.host_throttles = budget.host_throttles;
        self.counters.offender_periods = budget.offender_periods;

        for (slot, v) in self.slots.iter_mut().enumerate() {
            let d = self.engine.decisions()[slot];
            match d.event {
                Some(BoostEvent::Boosted) => self.counters.boosts += 1,
                Some(BoostEvent::Throttled) => self.counters.throttles += 1,
                _ => {}
            }
            let stats = self.engine.stats(slot).unwrap_or_default();
            self.counters.boosted_ns += stats.boosted_cpu_ns.saturating_sub(v.boosted_ns_seen);
            v.boosted_ns_seen = stats.boosted_cpu_ns;
            self.counters.lock_holder_grants +=
                stats.lock_holder_grants.saturating_sub(v.lock_grants_seen);
            v.lock_grants_seen = stats.lock_holder_grants;
            self.counters.lock_holder_capped +=
                stats.lock_holder_capped.saturating_sub(v.lock_capped_seen);
            v.lock_capped_seen = stats.lock_holder_capped;

            match act.as_deref_mut() {
                Some(act) if v.present => {
                    if d.sched != v.applied && !ApplyRetry::holds(v.retry, d.sched, now) {
                        match act.apply(VmThread::Vcpu(slot as u32), d.sched) {
                            Ok(did) => {
                                v.applied = d.sched;
                                v.retry = None;
                                if did {
                                    self.counters.applies += 1;
                                }
                            }
                            Err(e) => {
                                self.counters.apply_errors += 1;
                                let message = match e {
                                    ApplyError::Gone(m) => {
                                        v.present = false;
                                        m
                                    }
                                    ApplyError::Failed(m) => {
                                        ApplyRetry::refused(&mut v.retry, d.sched, now);
                                        m
                                    }
                                };
                                self.last_error = Some(message);
                            }
                        }
                    }
                }
                Some(_) => {}
                None => v.applied = d.sched,
            }

            let publish = d.state != v.decision.state
                || d.throttle_until != v.decision.throttle_until
                || d.sched != v.decision.sched;
            // The guest stops asking while throttled and asks again after.
            let throttle_flipped =
                (d.state == BoostState::Throttled) != (v.decision.state == BoostState::Throttled);
            v.decision = d;
            if publish && !observe_only && !input.slow && v.present {
                let line = host_line(v, now, input.host, &self.poll, &stats);
                let _ = lines.write_host_line(slot as u32, &line);
                out.notify_guest |= throttle_flipped;
            }
        }

        if let (Some(path), Some(d)) = (self.path.as_mut(), self.engine.interrupt_path_decision()) {
            match d.event {
                Some(BoostEvent::Boosted) => self.counters.boosts += 1,
                Some(BoostEvent::Throttled) => self.counters.throttles += 1,
                _ => {}
            }
            if let Some(act) = act.as_deref_mut() {
                if d.sched != path.applied && !ApplyRetry::holds(path.retry, d.sched, now) {
                    match act.apply(VmThread::InterruptPath, d.sched) {
                        Ok(_) => {
                            path.applied = d.sched;
                            path.retry = None;
                        }
                        Err(ApplyError::Gone(e) | ApplyError::Failed(e)) => {
                            ApplyRetry::refused(&mut path.retry, d.sched, now);
                            self.counters.apply_errors += 1;
                            self.last_error = Some(format!("main thread: {e}"));
                        }
                    }
                }
            } else {
                path.applied = d.sched;
            }
        }

        for (i, io) in self.iothreads.iter_mut().enumerate() {
            let d = self.engine.iothread_decisions()[i];
            match d.event {
                Some(BoostEvent::Boosted) => self.counters.boosts += 1,
                Some(BoostEvent::Throttled) => self.counters.throttles += 1,
                _ => {}
            }
            match act.as_deref_mut() {
                Some(act) => {
                    if d.sched != io.applied && !ApplyRetry::holds(io.retry, d.sched, now) {
                        match act.apply(io.thread, d.sched) {
                            Ok(did) => {
                                io.applied = d.sched;
                                io.retry = None;
                                if did {
                                    self.counters.applies += 1;
                                }
                            }
                            Err(ApplyError::Gone(e) | ApplyError::Failed(e)) => {
                                // A gone IOThread is dropped at the next QMP refresh.
                                ApplyRetry::refused(&mut io.retry, d.sched, now);
                                self.counters.apply_errors += 1;
                                self.last_error = Some(format!("iothread {i}: {e}"));
                            }
                        }
                    }
                }
                None => io.applied = d.sched,
            }
        }

        if input.slow {
            // Host information for every vCPU, after the applies so they do
            // not wait for it; `stat` (pCPU, policy) every fourth time.
            self.slow_ticks = self.slow_ticks.wrapping_add(1);
            let full = self.slow_ticks % 4 == 1;
            for (slot, v) in self.slots.iter_mut().enumerate() {
                if !v.present {
                    continue;
                }
                if !v.sample(clock, slot as u32, full) {
                    self.last_error = Some("a vCPU thread vanished; waiting for QMP".into());
                    continue;
                }
                if !observe_only {
                    let stats = self.engine.stats(slot).unwrap_or_default();
                    let line = host_line(v, now, input.host, &self.poll, &stats);
                    let _ = lines.write_host_line(slot as u32, &line);
                }
            }
        }
        out
    }
}

/// The names of a set of boost reasons, for the status.
pub fn reasons_names(r: Reasons) -> Vec<String> {
    [
        (Reasons::RT_RUNNING, "rt-running"),
        (Reasons::RT_PENDING, "rt-pending"),
        (Reasons::IRQ, "irq"),
        (Reasons::REQUEST, "request"),
        (Reasons::CRITICAL, "critical"),
        (Reasons::DIRECTED, "directed"),
        (Reasons::LOCK_HOLDER, "lock-holder"),
        (Reasons::IOTHREAD, "iothread"),
    ]
    .into_iter()
    .filter(|(bit, _)| r.contains(*bit) && !bit.is_empty())
    .map(|(_, n)| n.to_owned())
    .collect()
}

/// The host line of one vCPU.
fn host_line(
    v: &SlotState,
    now: Nanos,
    host: &dyn HostInfo,
    poll: &HaltPollParams,
    stats: &VcpuStats,
) -> PvschedHostLine {
    let load = host.load_permille(v.pcpu);
    let (host_policy, host_prio) = match v.applied {
        ThreadSched::Rt { class, prio } => (
            match class {
                RtClass::Fifo => PVSCHED_POLICY_FIFO,
                RtClass::Rr => PVSCHED_POLICY_RR,
                RtClass::Deadline => PVSCHED_POLICY_DEADLINE,
            },
            prio,
        ),
        ThreadSched::Deadline(_) => (PVSCHED_POLICY_DEADLINE, 0),
        // At baseline the thread has its own policy (an RT one set by
        // someone else is reported as such, without its priority).
        ThreadSched::Baseline => (u8::try_from(v.policy_raw).unwrap_or(0).min(6), 0),
    };
    PvschedHostLine {
        seq: 0,
        pcpu: v.pcpu,
        boost_state: v.decision.state.to_raw(),
        preempted: u8::from(v.preempted),
        smt_sibling_busy: u8::from(host.sibling_busy(v.pcpu)),
        host_policy,
        host_prio,
        reserved0: [0; 3],
        pcpu_load_permille: load,
        poll_hint_ns: tuned_for_load(poll, load).max_ns,
        steal_ns: v.wait_ns,
        throttle_until_ns: v.decision.throttle_until,
        host_time_ns: now,
        boosts: stats.boosts.min(u64::from(u32::MAX)) as u32,
        throttles: stats.throttles.min(u64::from(u32::MAX)) as u32,
        boosted_ns: stats.boosted_cpu_ns,
    }
}

#[cfg(test)]
mod tests {
    use core::cell::{Cell, RefCell};
    use core::sync::atomic::AtomicU64;
    use std::collections::VecDeque;

    use pvsched_abi::{encode_guest_line, new_host_header, region_size_for, SchedPolicy, TaskInfo};

    use super::*;

    const SLOTS: u32 = 2;
    const MS: Nanos = 1_000_000;

    /// A region in memory with a guest writing into it, and a hook that
    /// lets a guest write land between the fast-path load and the copy.
    struct FakeLines {
        words: Vec<AtomicU64>,
        /// Written by the "guest" right after the next counter load of its slot.
        racing_write: RefCell<Option<(u32, GuestVcpuState)>>,
        /// Copies of guest lines taken.
        copies: Cell<u32>,
    }

    impl FakeLines {
        fn new() -> Self {
            let words = (0..region_size_for(SLOTS) / 8)
                .map(|_| AtomicU64::new(0))
                .collect();
            let lines = FakeLines {
                words,
                racing_write: RefCell::new(None),
                copies: Cell::new(0),
            };
            let r = lines.region();
            r.write_header_host(&new_host_header(SLOTS, PVSCHED_FEAT_KNOWN, 1))
                .unwrap();
            lines
        }
        fn region(&self) -> Region<'_> {
            Region::from_words(&self.words)
        }
        fn guest_attach(&self, features: u64, heartbeat: u64) {
            self.region()
                .write_header_guest(&PvschedHeaderGuest {
                    guest_version_major: PVSCHED_VERSION_MAJOR,
                    guest_version_minor: PVSCHED_VERSION_MINOR,
                    guest_nr_cpus: SLOTS,
                    guest_features: features,
                    guest_heartbeat: heartbeat,
                    guest_generation: 1,
                    guest_state: PVSCHED_GUEST_ATTACHED,
                    ..Default::default()
                })
                .unwrap();
        }
        fn guest_write(&self, slot: u32, state: &GuestVcpuState) {
            self.region()
                .write_guest_line(slot, &encode_guest_line(state))
                .unwrap();
        }
        fn host_line(&self, slot: u32) -> PvschedHostLine {
            self.region()
                .read_host_line(slot)
                .unwrap()
                .consistent()
                .unwrap()
        }
    }

    impl LineSource for FakeLines {
        fn read_header(&self) -> Result<PvschedHeader, OutOfBounds> {
            self.region().read_header()
        }
        fn load_guest_seq(&self, slot: u32) -> Result<u32, OutOfBounds> {
            let seq = self.region().load_guest_seq(slot);
            let race = self.racing_write.borrow_mut().take_if(|(s, _)| *s == slot);
            if let Some((s, state)) = race {
                self.guest_write(s, &state);
            }
            seq
        }
        fn read_guest_line(&self, slot: u32) -> Result<SeqRead<PvschedGuestLine>, OutOfBounds> {
            self.copies.set(self.copies.get() + 1);
            self.region().read_guest_line(slot)
        }
        fn write_host_line(&self, slot: u32, line: &PvschedHostLine) -> Result<(), OutOfBounds> {
            self.region().write_host_line(slot, line)
        }
        fn write_header_host(&self, header: &PvschedHeaderHost) -> Result<(), OutOfBounds> {
            self.region().write_header_host(header)
        }
        fn store_host_heartbeat(&self, beat: u64) -> Result<(), OutOfBounds> {
            self.region().store_host_heartbeat(beat)
        }
    }

    /// Records every call; answers from a queue (then `Ok(true)`).
    #[derive(Default)]
    struct FakeActuator {
        calls: Vec<(VmThread, ThreadSched)>,
        answers: VecDeque<Result<bool, ApplyError>>,
    }

    impl ThreadActuator for FakeActuator {
        fn apply(&mut self, thread: VmThread, sched: ThreadSched) -> Result<bool, ApplyError> {
            self.calls.push((thread, sched));
            self.answers.pop_front().unwrap_or(Ok(true))
        }
    }

    /// Threads that run a fixed fraction of wall time (a tenth) and are kept
    /// off a CPU while runnable for `wait_tenths` tenths of it.
    #[derive(Default)]
    struct FakeClock {
        now: Nanos,
        wait_tenths: u64,
        sampled: Vec<VmThread>,
    }

    impl CpuClock for FakeClock {
        fn sample(&mut self, thread: VmThread, with_stat: bool) -> Sampled {
            self.sampled.push(thread);
            Sampled::Fresh(CpuSample {
                run_ns: self.now / 10,
                wait_ns: self.now * self.wait_tenths / 10,
                slices: None,
                stat: if with_stat {
                    StatSample::Read(ThreadStat {
                        pcpu: 1,
                        // Asleep between its slices, unless kept waiting.
                        runnable: self.wait_tenths > 0,
                        policy: 0,
                        rt_priority: 0,
                    })
                } else {
                    StatSample::NotAsked
                },
            })
        }
    }

    struct NoHost;
    impl HostInfo for NoHost {
        fn load_permille(&self, _: u32) -> u32 {
            0
        }
        fn sibling_busy(&self, _: u32) -> bool {
            false
        }
    }

    /// Every pCPU at the same load.
    struct LoadedHost(u32);
    impl HostInfo for LoadedHost {
        fn load_permille(&self, _: u32) -> u32 {
            self.0
        }
        fn sibling_busy(&self, _: u32) -> bool {
            false
        }
    }

    /// Guest RAM with one preempt count per slot (`None`: not readable).
    struct FakeMemory(RefCell<Vec<Option<u32>>>);
    impl FakeMemory {
        fn new() -> Self {
            FakeMemory(RefCell::new(vec![Some(0); SLOTS as usize]))
        }
        fn set(&self, slot: u32, count: Option<u32>) {
            self.0.borrow_mut()[slot as usize] = count;
        }
    }
    impl GuestMemory for FakeMemory {
        fn preempt_count(&self, slot: u32) -> Option<u32> {
            self.0.borrow().get(slot as usize).copied().flatten()
        }
    }

    /// An online vCPU running an ordinary task.
    fn running(slot: u32) -> GuestVcpuState {
        GuestVcpuState {
            cpu_id: slot,
            online: true,
            ..Default::default()
        }
    }

    fn rt_task(slot: u32) -> GuestVcpuState {
        GuestVcpuState {
            cpu_id: slot,
            online: true,
            task: TaskInfo {
                policy: SchedPolicy::Fifo,
                rt_prio: 50,
                nice: 0,
            },
            ..Default::default()
        }
    }

    fn idle(slot: u32) -> GuestVcpuState {
        GuestVcpuState {
            cpu_id: slot,
            online: true,
            idle: true,
            ..Default::default()
        }
    }

    struct Rig {
        lines: FakeLines,
        act: FakeActuator,
        clock: FakeClock,
        ctl: VmController,
        memory: Option<FakeMemory>,
        load: u32,
    }

    impl Rig {
        fn new() -> Self {
            Self::with_policy(PolicyConfig::default())
        }
        fn with_policy(policy: PolicyConfig) -> Self {
            let lines = FakeLines::new();
            let header = lines.region().read_header().unwrap().host;
            let engine = VmEngine::new(policy, SLOTS as usize).unwrap();
            let mut ctl = VmController::new(engine, header);
            let mut clock = FakeClock::default();
            for slot in 0..SLOTS {
                ctl.attach_thread(slot, &mut clock);
            }
            lines.guest_attach(PVSCHED_FEAT_KNOWN, 1);
            for slot in 0..SLOTS {
                lines.guest_write(slot, &idle(slot));
            }
            Rig {
                lines,
                act: FakeActuator::default(),
                clock,
                ctl,
                memory: None,
                load: 0,
            }
        }
        fn tick(&mut self, now: Nanos, slow: bool) -> TickOutcome {
            self.clock.now = now;
            self.ctl.tick(
                &self.lines,
                Some(&mut self.act),
                &mut self.clock,
                TickInput {
                    now,
                    slow,
                    host: &LoadedHost(self.load),
                    host_budget: None,
                    host_due: false,
                    process_alive: true,
                    guest_memory: self.memory.as_ref().map(|m| m as &dyn GuestMemory),
                },
            )
        }
        fn applied(&self, slot: usize) -> ThreadSched {
            self.ctl.slots()[slot].applied
        }
        fn memory(&self) -> &FakeMemory {
            self.memory.as_ref().unwrap()
        }
    }

    #[test]
    fn a_guest_is_stale_only_after_its_heartbeat_moved_and_then_stopped() {
        let mut l = Liveness::default();
        let limit = 1_000;
        // Never beating: never stale (its budgets bound it).
        assert_eq!(l.observe(7, 0, limit), (false, false, 0));
        assert!(!l.observe(7, 5_000, limit).0);
        // It beats, then stops.
        assert_eq!(l.observe(8, 5_100, limit), (false, false, 0));
        assert_eq!(l.observe(8, 6_000, limit), (false, false, 900));
        assert_eq!(l.observe(8, 6_200, limit), (true, true, 1_100));
        assert_eq!(l.observe(8, 9_000, limit), (true, false, 3_900));
        // It beats again: believed again.
        assert_eq!(l.observe(9, 9_100, limit), (false, true, 0));
    }

    #[test]
    fn an_unchanged_sequence_counter_skips_the_copy() {
        let mut rig = Rig::new();
        rig.tick(MS, false);
        let copies = rig.lines.copies.get();
        assert_eq!(copies, SLOTS);
        let out = rig.tick(2 * MS, false);
        assert_eq!(rig.lines.copies.get(), copies, "no write, no copy");
        assert!(!out.stepped);
        rig.lines.guest_write(1, &rt_task(1));
        rig.tick(3 * MS, false);
        assert_eq!(
            rig.lines.copies.get(),
            copies + 1,
            "only the written slot is copied"
        );
        assert!(matches!(rig.applied(1), ThreadSched::Rt { .. }));
    }

    #[test]
    fn a_write_between_the_counter_load_and_the_copy_is_not_missed() {
        let mut rig = Rig::new();
        rig.tick(MS, false);
        // The guest starts an RT task (seq moves), and right after the host
        // loaded the counter it goes idle again, then back to the RT task.
        rig.lines.guest_write(0, &rt_task(0));
        *rig.lines.racing_write.borrow_mut() = Some((0, idle(0)));
        rig.tick(2 * MS, false);
        // The copy saw the newest line (idle): nothing boosted.
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        // Its version is what the fast path compares against next.
        rig.lines.guest_write(0, &rt_task(0));
        rig.tick(3 * MS, false);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));

        // The other order: idle is loaded, the RT line lands before the copy.
        rig.lines.guest_write(0, &idle(0));
        rig.tick(4 * MS, false);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        rig.lines.guest_write(0, &idle(0));
        *rig.lines.racing_write.borrow_mut() = Some((0, rt_task(0)));
        rig.tick(5 * MS, false);
        assert!(
            matches!(rig.applied(0), ThreadSched::Rt { .. }),
            "the write that landed after the counter load is acted on"
        );
        // And never read again once taken.
        let copies = rig.lines.copies.get();
        rig.tick(6 * MS, false);
        assert_eq!(rig.lines.copies.get(), copies);
    }

    #[test]
    fn an_invalid_line_is_ignored_whole_and_counted_once() {
        let mut rig = Rig::new();
        rig.tick(MS, false);
        // An RT task at an impossible priority: nothing of the line is used.
        let mut line = encode_guest_line(&rt_task(0));
        line.task_rt_prio = 200;
        line.irq_depth = 3;
        rig.lines.region().write_guest_line(0, &line).unwrap();
        for t in 2..6 {
            rig.tick(t * MS, t == 4);
        }
        let s = &rig.ctl.slots()[0];
        assert!(matches!(s.ignored, Some(Ignored::Invalid(_))));
        assert_eq!(s.guest, None);
        assert_eq!(rig.ctl.counters().invalid_writes, 1);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        assert!(
            rig.act.calls.is_empty(),
            "nothing applied: {:?}",
            rig.act.calls
        );
        // A valid write is believed again.
        rig.lines.guest_write(0, &rt_task(0));
        rig.tick(7 * MS, false);
        assert_eq!(rig.ctl.slots()[0].ignored, None);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        assert_eq!(rig.ctl.counters().invalid_writes, 1);
    }

    #[test]
    fn a_line_naming_another_cpu_is_ignored() {
        let mut rig = Rig::new();
        rig.lines.guest_write(0, &rt_task(1));
        rig.tick(MS, false);
        rig.tick(2 * MS, true);
        assert_eq!(rig.ctl.slots()[0].ignored, Some(Ignored::CpuId(1)));
        assert_eq!(rig.ctl.counters().cpu_id_mismatches, 1);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
    }

    #[test]
    fn a_boost_is_charged_from_a_sample_taken_when_it_starts() {
        let mut rig = Rig::new();
        rig.tick(MS, true);
        // The vCPU ran 10% of the time, unboosted, with no slow tick since.
        rig.lines.guest_write(0, &rt_task(0));
        rig.tick(50 * MS, false);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        rig.tick(51 * MS, true);
        // Charged what it used while boosted (0.1 ms), not the 4.9 ms it
        // used before (nor the 1 ms of wall time that caps it).
        assert_eq!(rig.ctl.stats(0).boosted_cpu_ns, MS / 10);
    }

    #[test]
    fn a_failed_apply_leaves_applied_unchanged_and_is_retried() {
        let mut rig = Rig::new();
        rig.act
            .answers
            .push_back(Err(ApplyError::Failed("EPERM".into())));
        rig.lines.guest_write(0, &rt_task(0));
        rig.tick(MS, false);
        assert_eq!(rig.act.calls.len(), 1);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        assert_eq!(rig.ctl.counters().apply_errors, 1);
        assert_eq!(rig.ctl.last_error(), Some("EPERM"));
        // Not tried again before the back-off...
        rig.tick(2 * MS, true);
        assert_eq!(rig.act.calls.len(), 1, "retried within the back-off");
        // ...then tried again, and applied.
        rig.tick(MS + APPLY_RETRY_MIN_NS, true);
        assert_eq!(rig.act.calls.len(), 2, "tried again");
        assert_eq!(rig.act.calls[1], rig.act.calls[0]);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        assert_eq!(rig.ctl.counters().applies, 1);
    }

    #[test]
    fn a_refusal_that_lasts_is_retried_less_and_less_often() {
        let mut rig = Rig::new();
        for _ in 0..64 {
            rig.act
                .answers
                .push_back(Err(ApplyError::Failed("EBUSY".into())));
        }
        rig.lines.guest_write(0, &rt_task(0));
        // One second of ticks at 1 ms, the guest asking all along.
        for t in 1..=1000 {
            rig.tick(t * MS, t % 10 == 0);
        }
        let tries = rig.act.calls.len();
        // 10, 20, 40, ... ms apart: 7 tries in a second, against 1000 without a back-off.
        assert!((5..=8).contains(&tries), "{tries} tries in a second");
        assert_eq!(rig.ctl.counters().apply_errors, tries as u64);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
    }

    #[test]
    fn a_gone_thread_is_dropped() {
        let mut rig = Rig::new();
        rig.act
            .answers
            .push_back(Err(ApplyError::Gone("no such thread".into())));
        rig.lines.guest_write(0, &rt_task(0));
        rig.tick(MS, false);
        assert!(!rig.ctl.slots()[0].present);
        let calls = rig.act.calls.len();
        rig.clock.sampled.clear();
        for t in 2..5 {
            rig.tick(t * MS, true);
        }
        assert!(
            !rig.act.calls[calls..]
                .iter()
                .any(|(t, _)| *t == VmThread::Vcpu(0)),
            "never applied again: {:?}",
            rig.act.calls
        );
        assert!(!rig.clock.sampled.contains(&VmThread::Vcpu(0)));
        // Reattached (QMP named a new thread): managed again.
        rig.ctl.reset_slot(0);
        rig.ctl.attach_thread(0, &mut rig.clock);
        rig.tick(6 * MS, true);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
    }

    #[test]
    fn what_was_not_negotiated_is_masked_and_no_boost_feature_means_no_guest() {
        let mut rig = Rig::new();
        // Task information not negotiated: an RT task is not seen.
        rig.lines
            .guest_attach(PVSCHED_FEAT_KNOWN & !PVSCHED_FEAT_TASK_INFO, 1);
        rig.lines.guest_write(0, &rt_task(0));
        rig.tick(MS, false);
        let g = rig.ctl.slots()[0].guest.unwrap();
        assert_eq!(g.task, TaskInfo::default());
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        assert!(rig.ctl.negotiation().starts_with("agreed"));
        // Now negotiated: boosted.
        rig.lines.guest_attach(PVSCHED_FEAT_KNOWN, 1);
        rig.tick(2 * MS, false);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        // Without the boost feature the guest's data is not used at all.
        rig.lines
            .guest_attach(PVSCHED_FEAT_KNOWN & !PVSCHED_FEAT_BOOST, 1);
        rig.tick(3 * MS, false);
        assert_eq!(rig.ctl.features(), None);
        assert_eq!(rig.ctl.slots()[0].guest, None);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
    }

    #[test]
    fn an_idle_vcpus_request_expires_without_a_guest_write_and_a_new_write_renews_it() {
        let mut rig = Rig::new();
        let limit = rig.ctl.config().idle_request_ns;
        rig.lines.guest_attach(PVSCHED_FEAT_KNOWN, 1);
        // Halted, asking for a boost ahead of an RT wakeup (boost-while-halted).
        let asking = |updates| GuestVcpuState {
            idle: true,
            ..GuestVcpuState::requesting(0, Some(50), updates)
        };
        rig.lines.guest_write(0, &asking(1));
        rig.tick(MS, true);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        // The controller asks to be stepped by the time the request lapses.
        assert!(rig.ctl.wake_at().is_some_and(|w| w <= MS + limit));
        // The guest CPU is tickless: the line never changes again. (The fake
        // thread uses 10% of a CPU; the loop steps every 10 ms.)
        let mut t = MS;
        while t + 10 * MS < MS + limit {
            t += 10 * MS;
            rig.tick(t, false);
            assert!(
                matches!(rig.applied(0), ThreadSched::Rt { .. }),
                "unboosted at {t}, before the limit"
            );
        }
        assert_eq!(rig.ctl.counters().expired_idle_requests, 0);
        rig.tick(MS + limit, false);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        assert_eq!(rig.ctl.counters().expired_idle_requests, 1);
        rig.tick(MS + limit + 50 * MS, false);
        assert_eq!(rig.applied(0), ThreadSched::Baseline, "stays expired");
        assert_eq!(rig.ctl.counters().expired_idle_requests, 1);
        // The guest writes the line again (its own window restarted).
        let t = MS + 2 * limit;
        rig.lines.guest_write(0, &asking(2));
        rig.tick(t, false);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        // A running vCPU's request does not lapse: the guest lapses it itself.
        let mut busy = asking(3);
        busy.idle = false;
        rig.lines.guest_write(0, &busy);
        let mut u = t;
        while u < t + 2 * limit {
            u += 10 * MS;
            rig.tick(u, false);
        }
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        assert_eq!(rig.ctl.counters().expired_idle_requests, 1);
    }

    #[test]
    fn a_throttle_and_its_end_ask_to_interrupt_the_guest_and_nothing_else_does() {
        // A thread budget the fake thread (10% of a CPU) uses up in 20 ms.
        let mut rig = Rig::with_policy(PolicyConfig {
            budget_ns: 2 * MS,
            min_quantum_ns: MS / 10,
            throttle_ns: 50 * MS,
            ..PolicyConfig::default()
        });
        rig.lines.guest_write(0, &rt_task(0));
        let (mut notified, mut throttled_at, mut released_at) = (vec![], None, None);
        let mut t = MS;
        while t < 200 * MS && released_at.is_none() {
            let out = rig.tick(t, false);
            let state = rig.ctl.slots()[0].decision.state;
            if out.notify_guest {
                notified.push(t);
            }
            if state == BoostState::Throttled && throttled_at.is_none() {
                throttled_at = Some(t);
            }
            if throttled_at.is_some() && state != BoostState::Throttled {
                released_at = Some(t);
            }
            t += MS;
        }
        let (throttled_at, released_at) = (
            throttled_at.expect("throttled"),
            released_at.expect("released"),
        );
        assert_eq!(
            notified,
            [throttled_at, released_at],
            "one interrupt at each flip"
        );
    }

    #[test]
    fn a_stale_guest_is_unboosted_and_believed_again_when_it_beats() {
        let mut rig = Rig::new();
        let stale = rig.ctl.config().guest_stale_ns;
        rig.lines.guest_write(0, &rt_task(0));
        rig.tick(MS, false);
        rig.lines.guest_attach(PVSCHED_FEAT_KNOWN, 2);
        rig.tick(2 * MS, true);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        // The heartbeat stops; ticks go on (budgets would throttle later,
        // the liveness check ends the boost first).
        let mut t = 2 * MS;
        let mut out = TickOutcome::default();
        while t < 2 * MS + stale + 10 * MS {
            t += 5 * MS;
            out = rig.tick(t, true);
            if rig.ctl.counters().stale_guests > 0 {
                break;
            }
        }
        assert_eq!(rig.ctl.counters().stale_guests, 1);
        assert!(out.notices.iter().any(|n| n.contains("heartbeat stopped")));
        assert!(t > 2 * MS + stale, "not before the limit");
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        assert!(rig.ctl.negotiation().starts_with("stale"));
        assert_eq!(
            rig.act.calls.last(),
            Some(&(VmThread::Vcpu(0), ThreadSched::Baseline))
        );
        // It beats again.
        rig.lines.guest_attach(PVSCHED_FEAT_KNOWN, 3);
        rig.tick(t + MS, true);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
    }

    #[test]
    fn a_scribbled_host_header_is_repaired_and_host_lines_follow_decisions() {
        let mut rig = Rig::new();
        rig.tick(MS, false);
        assert_eq!(
            rig.ctl.counters().header_repairs,
            0,
            "{:?}",
            rig.lines.region().read_header()
        );
        let mut bad = rig.lines.region().read_header().unwrap().host;
        bad.nr_slots = 99;
        rig.lines.region().write_header_host(&bad).unwrap();
        rig.lines.guest_write(1, &rt_task(1));
        rig.tick(2 * MS, false);
        assert_eq!(rig.ctl.counters().header_repairs, 1);
        let now = rig.lines.region().read_header().unwrap().host;
        assert_eq!(now.nr_slots, SLOTS);
        assert_eq!(now.host_heartbeat, 2);
        let line = rig.lines.host_line(1);
        assert_eq!(line.boost_state, PVSCHED_BOOST_BOOSTED);
        assert_eq!(
            line.host_policy, PVSCHED_POLICY_RR,
            "the default boost class"
        );
        assert!(line.host_prio > 0);
        assert_eq!(line.host_time_ns, 2 * MS);
    }

    #[test]
    fn observe_only_applies_and_writes_nothing() {
        let mut rig = Rig::new();
        rig.lines.guest_write(0, &rt_task(0));
        let before = rig.lines.region().read_header().unwrap();
        let out = rig.ctl.tick(
            &rig.lines,
            None,
            &mut rig.clock,
            TickInput {
                now: MS,
                slow: true,
                host: &NoHost,
                host_budget: None,
                host_due: false,
                process_alive: true,
                guest_memory: None,
            },
        );
        assert!(out.stepped);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        assert_eq!(rig.lines.region().read_header().unwrap(), before);
        assert_eq!(rig.lines.host_line(0), PvschedHostLine::default());
    }

    #[test]
    fn a_gone_process_ends_the_tick_before_the_engine_runs() {
        let mut rig = Rig::new();
        rig.lines.guest_write(0, &rt_task(0));
        rig.clock.now = MS;
        let out = rig.ctl.tick(
            &rig.lines,
            Some(&mut rig.act),
            &mut rig.clock,
            TickInput {
                now: MS,
                slow: true,
                host: &NoHost,
                host_budget: None,
                host_due: false,
                process_alive: false,
                guest_memory: None,
            },
        );
        assert!(out.gone && !out.stepped);
        assert!(rig.act.calls.is_empty());
    }

    #[test]
    fn the_interrupt_path_is_boosted_with_the_vcpus_and_charged() {
        let mut rig = Rig::new();
        rig.ctl.attach_interrupt_path(&mut rig.clock);
        // A vCPU waiting for an interrupt (an RT task pending on a timer).
        let waiting = GuestVcpuState {
            rt_pending: 1,
            pending_prio: 40,
            ..idle(0)
        };
        rig.lines.guest_write(0, &waiting);
        rig.tick(MS, false);
        assert!(rig
            .act
            .calls
            .iter()
            .any(|(t, s)| *t == VmThread::InterruptPath && matches!(s, ThreadSched::Rt { .. })));
        assert!(matches!(
            rig.ctl.interrupt_path().unwrap().applied,
            ThreadSched::Rt { .. }
        ));
        rig.clock.sampled.clear();
        rig.tick(2 * MS, true);
        assert!(rig.clock.sampled.contains(&VmThread::InterruptPath));
        rig.lines.guest_write(0, &idle(0));
        rig.tick(3 * MS, false);
        assert_eq!(
            rig.ctl.interrupt_path().unwrap().applied,
            ThreadSched::Baseline
        );
        assert!(rig.ctl.interrupt_path_stats().boosted_cpu_ns > 0);
    }

    #[test]
    fn iothreads_are_applied_sampled_while_boosted_and_released() {
        let mut rig = Rig::new();
        rig.ctl.set_iothread_policy(Some(IoThreadPolicy {
            prio: 3,
            mode: crate::IoThreadMode::Static,
        }));
        rig.ctl.attach_iothread(1, &mut rig.clock);
        assert_eq!(rig.ctl.iothreads().len(), 2, "index 1 grows the list");
        rig.tick(MS, false);
        let fifo = ThreadSched::Rt {
            class: RtClass::Fifo,
            prio: 3,
        };
        for i in 0..2 {
            assert!(rig.act.calls.contains(&(VmThread::IoThread(i), fifo)));
            assert_eq!(rig.ctl.iothreads()[i as usize].applied, fifo);
        }
        // Boosted: the engine asks to step again while their grant lasts,
        // and they are sampled at that fast tick, so their CPU time is charged.
        rig.clock.sampled.clear();
        let due = rig.ctl.wake_at().expect("boosted threads set a wake time");
        rig.tick(due, false);
        assert!(rig.clock.sampled.contains(&VmThread::IoThread(0)));
        assert!(rig.ctl.iothread_stats(0).boosted_cpu_ns > 0);
        // A deferred change that failed leaves the thread at its baseline, retried later.
        rig.ctl
            .deferred_apply_failed(VmThread::IoThread(1), "refused".into(), due);
        assert_eq!(rig.ctl.iothreads()[1].applied, ThreadSched::Baseline);
        rig.ctl.truncate_iothreads(1);
        rig.ctl.set_iothread_policy(None);
        rig.tick(due + MS, true);
        assert_eq!(rig.ctl.iothreads().len(), 1);
        assert_eq!(rig.ctl.iothreads()[0].applied, ThreadSched::Baseline);
        assert_eq!(rig.ctl.boosted_threads(), 0);
    }

    #[test]
    fn a_vcpu_holding_preemption_disabled_is_sampled_at_fast_ticks_unless_idle() {
        let mut rig = Rig::new();
        rig.memory = Some(FakeMemory::new());
        rig.lines.guest_write(0, &running(0));
        rig.tick(MS, true);
        rig.clock.sampled.clear();
        // Preemption enabled everywhere, nothing changed: no step, no sample.
        let out = rig.tick(2 * MS, false);
        assert!(!out.stepped);
        assert!(rig.clock.sampled.is_empty());
        // Both counts read 1; vCPU 1 is idle (its idle task runs with preemption
        // disabled), vCPU 0 is not and is not boosted.
        rig.memory().set(0, Some(1));
        rig.memory().set(1, Some(1));
        let out = rig.tick(3 * MS, false);
        assert!(out.stepped);
        assert_eq!(rig.clock.sampled, [VmThread::Vcpu(0)]);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        let s = &rig.ctl.slots()[0];
        assert_eq!((s.preempt_count, s.preemption_disabled), (Some(1), true));
        assert!(!rig.ctl.slots()[1].preemption_disabled);
        // At every fast tick while it lasts.
        rig.tick(4 * MS, false);
        assert_eq!(rig.clock.sampled, [VmThread::Vcpu(0); 2]);
        assert_eq!(rig.ctl.counters().preempt_count_samples, 2);
        // Back to zero: stepped once more (a grant would end), not sampled.
        rig.memory().set(0, Some(0));
        rig.clock.sampled.clear();
        assert!(rig.tick(5 * MS, false).stepped);
        assert!(rig.clock.sampled.is_empty());
        assert!(!rig.tick(6 * MS, false).stepped);
        // Unreadable counts, or a policy that uses them for nothing: no sampling.
        rig.memory().set(0, None);
        assert!(!rig.tick(7 * MS, false).stepped);
        let mut off = Rig::with_policy(PolicyConfig {
            lock_holder_boost_ns: 0,
            cs_extension_ns: 0,
            ..PolicyConfig::default()
        });
        off.memory = Some(FakeMemory::new());
        off.lines.guest_write(0, &running(0));
        off.tick(MS, true);
        off.clock.sampled.clear();
        off.memory().set(0, Some(1));
        assert!(!off.tick(2 * MS, false).stepped);
        assert!(off.clock.sampled.is_empty());
        assert_eq!(off.ctl.slots()[0].preempt_count, Some(1));
    }

    #[test]
    fn a_preempted_lock_holder_is_boosted_until_its_preempt_count_returns_to_zero() {
        let mut rig = Rig::with_policy(PolicyConfig {
            cs_extension_ns: 0,
            ..PolicyConfig::default()
        });
        let prio_min = rig.ctl.config().prio_min;
        rig.memory = Some(FakeMemory::new());
        // Runnable 90% of the time, on a CPU a ninth of that.
        rig.clock.wait_tenths = 8;
        rig.lines.guest_write(0, &running(0));
        rig.tick(MS, true);
        assert_eq!(rig.applied(0), ThreadSched::Baseline, "preemption enabled");
        rig.memory().set(0, Some(1));
        rig.tick(MS + MS / 2, false);
        assert_eq!(
            rig.applied(0),
            ThreadSched::Rt {
                class: RtClass::Rr,
                prio: prio_min
            }
        );
        assert_eq!(
            reasons_names(rig.ctl.slots()[0].decision.reasons),
            ["lock-holder"]
        );
        assert_eq!(rig.ctl.counters().lock_holder_grants, 1);
        assert_eq!(rig.applied(1), ThreadSched::Baseline);
        rig.memory().set(0, Some(0));
        rig.tick(MS + 7 * MS / 10, false);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        assert_eq!(rig.ctl.counters().boosts, 1);
        assert!(rig.ctl.stats(0).boosted_cpu_ns > 0, "charged");
    }

    #[test]
    fn the_host_read_preempt_count_extends_a_slice_on_a_loaded_pcpu_only() {
        let mut rig = Rig::with_policy(PolicyConfig {
            lock_holder_boost_ns: 0,
            ..PolicyConfig::default()
        });
        rig.memory = Some(FakeMemory::new());
        rig.lines.guest_write(0, &running(0));
        rig.tick(MS, true);
        rig.memory().set(0, Some(1));
        // Never kept off its CPU, on a quiet pCPU: no extension.
        rig.tick(2 * MS, false);
        assert_eq!(rig.applied(0), ThreadSched::Baseline);
        // The pCPU gets busy.
        rig.load = 950;
        rig.tick(3 * MS, false);
        assert!(matches!(rig.applied(0), ThreadSched::Rt { .. }));
        assert_eq!(
            reasons_names(rig.ctl.slots()[0].decision.reasons),
            ["critical"]
        );
    }
}
