//! One managed VM: its shared region, its engine, its vCPU threads.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_abi::{
    decode_guest_line, negotiate, new_host_header, region_size_for, validate_header,
    GuestVcpuState, InvalidCounts, InvalidFields, Negotiation, SeqRead,
};
use pvsched_policy::haltpoll::{tuned_for_load, HaltPollParams};
use pvsched_policy::{
    mask_by_features, BoostEvent, HostBudget, PolicyConfig, Reasons, RtClass, StepInput,
    ThreadObservation, ThreadSched, VcpuDecision, VcpuObservation, VmEngine,
};
use serde::{Deserialize, Serialize};

use crate::actuator::{ActError, Actuator, ThreadRef};
use crate::procfs::{HostFs, HostSampler, ThreadFiles};
use crate::qmp::{CpuInfo, IoThreadInfo};
use crate::status::{Histogram, VcpuStatus, VmCounters, VmStatus, TRUST_METRICS};
use crate::trust::{open_shared_file, InitReason, Refusal, RefusalReason, SharedFileError};

/// Everything needed to manage a VM, from the configuration and QMP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name.
    pub name: String,
    /// QMP socket (informational here).
    pub qmp: Option<PathBuf>,
    /// Shared file.
    pub shm: PathBuf,
    /// QEMU process id.
    pub pid: i32,
    /// Start time of the QEMU process (identity against pid reuse).
    pub pid_starttime: u64,
    /// Present vCPUs.
    pub cpus: Vec<CpuInfo>,
    /// Possible vCPUs (sizes the region when it is created).
    pub possible_cpus: Option<u32>,
    /// IOThreads.
    pub iothreads: Vec<IoThreadInfo>,
    /// Affinity of boosted vCPU threads.
    pub boost_cpus: Option<Vec<u32>>,
    /// Affinity of IOThreads.
    pub iothread_cpus: Option<Vec<u32>>,
    /// Found by discovery.
    pub discovered: bool,
}

impl VmSpec {
    /// Whether `other` is the same QEMU process.
    pub fn same_process(&self, other: &VmSpec) -> bool {
        self.pid == other.pid && self.pid_starttime == other.pid_starttime && self.shm == other.shm
    }

    /// Slots the region needs.
    pub fn slots_needed(&self) -> u32 {
        let max_index = self.cpus.iter().map(|c| c.cpu_index + 1).max().unwrap_or(0);
        max_index.max(self.possible_cpus.unwrap_or(0)).max(1)
    }
}

/// A VM that could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The shared file could not be mapped.
    #[error("mapping {path}")]
    Map {
        /// File.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The shared file is too small for the vCPUs.
    #[error("{path} has {len} bytes, {needed} needed for {slots} slots")]
    TooSmall {
        /// File.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// Bytes needed.
        needed: u64,
        /// Slots needed.
        slots: u32,
    },
    /// The policy configuration was refused by the engine.
    #[error("policy")]
    Policy(#[from] pvsched_policy::ConfigError),
    /// The VM is refused (see [`crate::trust`]).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The shared file could not be opened or checked.
    #[error("{what}")]
    Open {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Why a slot's guest data is not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ignored {
    CpuId(u32),
    Invalid(InvalidFields),
    Torn,
}

#[derive(Debug)]
struct VcpuThread {
    cpu: CpuInfo,
    thread: ThreadRef,
    files: Option<ThreadFiles>,
}

#[derive(Debug)]
struct Vcpu {
    thread: Option<VcpuThread>,
    last_line: Option<PvschedGuestLine>,
    last_seq: Option<u32>,
    guest: Option<GuestVcpuState>,
    ignored: Option<Ignored>,
    applied: ThreadSched,
    decision: VcpuDecision,
    run_ns: u64,
    wait_ns: u64,
    pcpu: u32,
    preempted: bool,
    policy_raw: u32,
    prio_raw: u32,
    boosted_ns_seen: u64,
}

impl Vcpu {
    fn new() -> Self {
        Vcpu {
            thread: None,
            last_line: None,
            last_seq: None,
            guest: None,
            ignored: None,
            applied: ThreadSched::Baseline,
            decision: VcpuDecision::default(),
            run_ns: 0,
            wait_ns: 0,
            pcpu: 0,
            preempted: false,
            policy_raw: 0,
            prio_raw: 0,
            boosted_ns_seen: 0,
        }
    }

    /// Samples schedstat (and stat when `full`); false when the thread is gone.
    fn sample(&mut self, full: bool) -> bool {
        let Some(files) = self.thread.as_mut().and_then(|t| t.files.as_mut()) else {
            return true;
        };
        let Ok(ss) = files.schedstat() else {
            return false;
        };
        let waited = ss.wait_ns > self.wait_ns;
        self.run_ns = ss.run_ns;
        self.wait_ns = ss.wait_ns;
        // Approximate: a run delay that grew since the last sample means the
        // thread was runnable but kept off a CPU during the interval.
        self.preempted = waited;
        if full {
            let Ok(st) = files.stat() else {
                return false;
            };
            self.pcpu = st.processor;
            // With `stat`: and it is still runnable (R covers running too).
            self.preempted = st.state == 'R' && waited;
            self.policy_raw = st.policy;
            self.prio_raw = st.rt_priority;
        }
        true
    }
}

/// The VM's interrupt-delivery thread (QEMU's main thread, whose loop fires
/// guest timers under TCG and runs userspace devices), boosted by the engine
/// while any vCPU of the VM is boosted.
#[derive(Debug)]
struct PathThread {
    thread: ThreadRef,
    files: Option<ThreadFiles>,
    run_ns: Option<u64>,
    applied: ThreadSched,
}

impl PathThread {
    fn sample(&mut self) {
        self.run_ns = self
            .files
            .as_mut()
            .and_then(|f| f.schedstat().ok())
            .map(|ss| ss.run_ns);
    }
}

/// What a tick learned that the daemon must act on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TickResult {
    /// The engine ran.
    pub stepped: bool,
    /// The QEMU process is gone.
    pub gone: bool,
}

/// Times and sinks a tick needs from the daemon.
pub struct TickCtx<'a> {
    /// Host monotonic time of the tick's start (the guest lines' read time).
    pub now: u64,
    /// Sample host information for every vCPU and republish every line.
    pub slow: bool,
    /// Host load and topology.
    pub host: &'a HostSampler,
    /// The actuator (`None`: observe only).
    pub act: Option<&'a mut Actuator>,
    /// Reads the clock after an apply.
    pub clock: &'a dyn Fn() -> u64,
    /// Apply-latency histogram.
    pub apply_latency: &'a mut Histogram,
    /// Called after each applied change: (slot, tid, sched, done_ns).
    pub on_apply: Option<&'a mut (dyn FnMut(u32, i32, ThreadSched, u64) + Send)>,
    /// The host-wide cap shared by every VM (`None`: this VM's own budgets only).
    pub host_budget: Option<&'a mut HostBudget>,
    /// The host cap's wake time has come: a VM with boosted threads must step.
    pub host_due: bool,
}

/// A managed VM.
pub struct VmRuntime {
    spec: VmSpec,
    file: SharedFile,
    header: PvschedHeaderHost,
    engine: VmEngine,
    vcpus: Vec<Vcpu>,
    obs: Vec<VcpuObservation>,
    features: Option<u64>,
    negotiation: String,
    heartbeat: u64,
    invalid: InvalidCounts,
    counters: VmCounters,
    last_error: Option<String>,
    poll: HaltPollParams,
    fs: HostFs,
    slow_ticks: u64,
    path: Option<PathThread>,
    /// Whether the guest's header heartbeat still moves.
    liveness: Liveness,
    /// The guest module's attach generation as last seen.
    guest_generation: Option<u32>,
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

fn reasons_names(r: Reasons) -> Vec<String> {
    [
        (Reasons::RT_RUNNING, "rt-running"),
        (Reasons::RT_PENDING, "rt-pending"),
        (Reasons::IRQ, "irq"),
        (Reasons::REQUEST, "request"),
        (Reasons::CRITICAL, "critical"),
        (Reasons::DIRECTED, "directed"),
    ]
    .into_iter()
    .filter(|(bit, _)| r.contains(*bit) && !bit.is_empty())
    .map(|(_, n)| n.to_owned())
    .collect()
}

impl VmRuntime {
    /// Maps the shared file and adopts or initialises the header.
    ///
    /// The file must be the QEMU process's own ([`open_shared_file`]: a
    /// regular file owned by its user that it maps shared and writable); the
    /// very descriptor checked is mapped. A valid header with enough slots
    /// is adopted (generation + 1) unless `fresh` (a new QEMU instance
    /// behind the same file), in which case the region is reset: a guest of
    /// the old instance must not be believed. Data that is not a pvsched
    /// region is overwritten only when the bytes the region covers are all
    /// zero or the VM is named in the configuration; otherwise the VM is
    /// refused. Every fresh header is one log line and one count in
    /// `pvsched_region_inits_total`.
    pub fn attach(
        spec: VmSpec,
        policy: &PolicyConfig,
        host_features: u64,
        fresh: bool,
        fs: &HostFs,
        dry_run: bool,
    ) -> Result<Self, VmError> {
        let checked =
            open_shared_file(fs, spec.pid, spec.pid_starttime, &spec.shm).map_err(|e| match e {
                SharedFileError::Refused(r) => VmError::Refused(r),
                SharedFileError::Io { what, source } => VmError::Open { what, source },
            })?;
        let file = SharedFile::from_file(checked).map_err(|source| VmError::Map {
            path: spec.shm.clone(),
            source,
        })?;
        let region = file.region();
        let needed = spec.slots_needed();
        let old = region.read_header().unwrap_or_default();
        let validation = validate_header(&old.host, region.len());
        let adopt = matches!(&validation, Ok(g) if !fresh && g.nr_slots >= needed);
        let mut init: Option<(InitReason, String)> = None;
        let header = if adopt || dry_run {
            PvschedHeaderHost {
                host_generation: old.host.host_generation.wrapping_add(1),
                host_features: host_features & PVSCHED_FEAT_KNOWN,
                host_heartbeat: old.host.host_heartbeat,
                ..old.host
            }
        } else {
            let bytes = region_size_for(needed);
            if bytes > region.len() as u64 || needed > PVSCHED_MAX_SLOTS {
                return Err(VmError::TooSmall {
                    path: spec.shm.clone(),
                    len: region.len(),
                    needed: bytes,
                    slots: needed,
                });
            }
            let first_bytes = || {
                let w = |o| region.load_u64(o, Ordering::Relaxed).unwrap_or(0);
                format!("{:016x} {:016x}", w(0).swap_bytes(), w(8).swap_bytes())
            };
            init = Some(match &validation {
                Ok(_) if fresh => (
                    InitReason::NewInstance,
                    "a pvsched region of an earlier QEMU process".to_owned(),
                ),
                Ok(g) => (
                    InitReason::TooFewSlots,
                    format!(
                        "a pvsched region with {} slots, {needed} needed",
                        g.nr_slots
                    ),
                ),
                Err(e) if old.host.magic == PVSCHED_MAGIC => (
                    InitReason::InvalidHeader,
                    format!("a pvsched header that does not validate ({e})"),
                ),
                Err(_) if all_zero(&region, bytes as usize) => {
                    (InitReason::Zeroed, "all zero".to_owned())
                }
                Err(_) if !spec.discovered => (
                    InitReason::ConfiguredForeign,
                    format!(
                        "data that is not a pvsched region (first bytes {}), overwritten because the VM is named in the configuration",
                        first_bytes()
                    ),
                ),
                Err(_) => {
                    return Err(VmError::Refused(Refusal::new(
                        RefusalReason::ForeignHeader,
                        format!(
                            "{} holds data that is not a pvsched region and not all zero (first bytes {}); name the VM in a [[vm]] entry to let the daemon initialise it",
                            spec.shm.display(),
                            first_bytes()
                        ),
                    )))
                }
            });
            let generation = if old.host.magic == PVSCHED_MAGIC {
                old.host.host_generation.wrapping_add(1)
            } else {
                1
            };
            new_host_header(needed, host_features, generation)
        };
        if !dry_run {
            if let Some((reason, what)) = &init {
                eprintln!(
                    "pvsched: vm {}: {} held {what}: writing a fresh header ({} slots)",
                    spec.name,
                    spec.shm.display(),
                    header.nr_slots
                );
                TRUST_METRICS.count_init(*reason);
            }
            if !adopt {
                // Reset everything the header covers, then publish the header last.
                let zero = PvschedHeaderHost::default();
                let _ = region.write_header_host(&zero);
                let _ = region.write_header_guest(&PvschedHeaderGuest::default());
                for i in 0..header.nr_slots {
                    let _ = region.write_guest_line(i, &PvschedGuestLine::default());
                    let _ = region.write_host_line(i, &PvschedHostLine::default());
                }
            }
            let _ = region.write_header_host(&header);
        }
        let header_valid = validate_header(&old.host, region.len()).is_ok();
        let nr = if dry_run && !header_valid {
            // Observe-only on an uninitialised region: show the vCPUs anyway.
            let fit = region.len().saturating_sub(PVSCHED_HEADER_SIZE as usize)
                / PVSCHED_SLOT_SIZE as usize;
            (needed as usize).min(fit)
        } else {
            header.nr_slots as usize
        };
        let engine = VmEngine::new(policy.clone(), nr)?;
        let mut vm = VmRuntime {
            heartbeat: header.host_heartbeat,
            spec: spec.clone(),
            file,
            header,
            engine,
            vcpus: (0..nr).map(|_| Vcpu::new()).collect(),
            obs: vec![VcpuObservation::default(); nr],
            features: None,
            negotiation: "absent".into(),
            invalid: InvalidCounts::default(),
            counters: VmCounters::default(),
            last_error: None,
            poll: HaltPollParams::GUEST_HALTPOLL,
            fs: fs.clone(),
            slow_ticks: 0,
            path: None,
            liveness: Liveness::default(),
            guest_generation: None,
        };
        if dry_run && !header_valid {
            vm.negotiation = format!(
                "no valid header: {}",
                validate_header(&old.host, region_len_of(&vm))
                    .err()
                    .map_or(String::new(), |e| e.to_string())
            );
        }
        vm.remap(&spec, fs, None);
        Ok(vm)
    }

    /// The spec in force.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Records an error to show in the status.
    pub fn set_error(&mut self, error: Option<String>) {
        self.last_error = error;
    }

    /// Takes a new spec of the same process (vCPU hot-plug, IOThreads):
    /// threads that changed are restored and their engine state reset.
    pub fn remap(&mut self, spec: &VmSpec, fs: &HostFs, mut act: Option<&mut Actuator>) {
        let nr = self.vcpus.len() as u32;
        for cpu in &spec.cpus {
            if cpu.cpu_index >= nr {
                self.last_error = Some(format!(
                    "vCPU {} (thread {}) has no slot: the region has {nr}",
                    cpu.cpu_index, cpu.thread_id
                ));
            }
        }
        for slot in 0..nr {
            let want = spec.cpus.iter().find(|c| c.cpu_index == slot);
            let v = &mut self.vcpus[slot as usize];
            let same = match (&v.thread, want) {
                (Some(t), Some(c)) => t.thread.tid == c.thread_id,
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            if let Some(old) = v.thread.take() {
                if let Some(a) = act.as_deref_mut() {
                    if let Err(e) = a.restore_thread(old.thread.tid) {
                        self.last_error = Some(e.to_string());
                    }
                }
            }
            self.engine.reset_vcpu(slot as usize);
            *v = Vcpu::new();
            if let Some(c) = want {
                match thread_ref(fs, spec.pid, c.thread_id) {
                    Ok(thread) => {
                        v.thread = Some(VcpuThread {
                            cpu: c.clone(),
                            thread,
                            files: ThreadFiles::open(fs, spec.pid, c.thread_id).ok(),
                        });
                        v.sample(true);
                    }
                    Err(e) => self.last_error = Some(format!("vCPU {slot}: {e}")),
                }
            }
        }
        if self.path.is_none() && self.engine.config().boost_interrupt_path {
            match thread_ref(fs, spec.pid, spec.pid) {
                Ok(thread) => {
                    let mut path = PathThread {
                        thread,
                        files: ThreadFiles::open(fs, spec.pid, spec.pid).ok(),
                        run_ns: None,
                        applied: ThreadSched::Baseline,
                    };
                    path.sample();
                    self.path = Some(path);
                }
                Err(e) => self.last_error = Some(format!("main thread: {e}")),
            }
        }
        if let Some(a) = act.as_deref_mut() {
            // Originals on disk now, so that applying never waits for a file write.
            let current: Vec<ThreadRef> = self
                .vcpus
                .iter()
                .filter_map(|v| v.thread.as_ref().map(|t| t.thread))
                .chain(self.path.as_ref().map(|p| p.thread))
                .collect();
            if let Err(e) = a.adopt(&spec.name, &current, spec.boost_cpus.is_some()) {
                self.last_error = Some(e.to_string());
            }
        }
        // IOThreads: pin when asked.
        if let (Some(cpus), Some(a)) = (&spec.iothread_cpus, act) {
            for io in &spec.iothreads {
                match thread_ref(fs, spec.pid, io.thread_id) {
                    Ok(t) => {
                        if let Err(e) = a.apply(&spec.name, t, ThreadSched::Baseline, Some(cpus)) {
                            self.counters.apply_errors += 1;
                            self.last_error = Some(format!("iothread {}: {e}", io.id));
                        }
                    }
                    Err(e) => self.last_error = Some(format!("iothread {}: {e}", io.id)),
                }
            }
        }
        self.spec = spec.clone();
    }

    /// One loop iteration for this VM.
    pub fn tick(&mut self, ctx: &mut TickCtx<'_>) -> TickResult {
        let mut result = TickResult::default();
        let region = self.file.region();
        let observe_only = ctx.act.is_none();

        // Header: our copy is the truth; the guest can scribble on the shared one.
        let shared = region.read_header().unwrap_or_default();
        if !observe_only {
            self.heartbeat = self.heartbeat.wrapping_add(1);
            let expected = PvschedHeaderHost {
                host_heartbeat: shared.host.host_heartbeat,
                ..self.header
            };
            if shared.host != expected {
                self.counters.header_repairs += 1;
                let _ = region.write_header_host(&PvschedHeaderHost {
                    host_heartbeat: self.heartbeat,
                    ..self.header
                });
            }
            let _ = region.store_host_heartbeat(self.heartbeat);
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
            let (stale, flipped, quiet) = self.liveness.observe(beat, ctx.now, limit);
            if flipped && stale {
                self.counters.stale_guests += 1;
                self.negotiation = format!(
                    "stale: heartbeat stuck at {beat} for {} ms",
                    quiet / 1_000_000
                );
                eprintln!(
                    "pvsched: vm {}: guest heartbeat stopped for over {} ms; its requests are ignored until it moves",
                    self.spec.name,
                    limit / 1_000_000
                );
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
                eprintln!(
                    "pvsched: vm {}: guest module re-attached (generation {})",
                    self.spec.name, shared.guest.guest_generation
                );
                for v in &mut self.vcpus {
                    v.last_seq = None;
                    v.last_line = None;
                    v.guest = None;
                }
                changed = true;
            }
            self.guest_generation = Some(shared.guest.guest_generation);
        }

        for (slot, v) in self.vcpus.iter_mut().enumerate() {
            let mut reevaluate = changed;
            // Fast path: the guest bumps the line's sequence counter on every
            // write, so an unchanged counter means nothing new to read. (A
            // guest that writes without bumping it is simply not heard.)
            let seq_offset = PVSCHED_HEADER_SIZE as usize + slot * PVSCHED_SLOT_SIZE as usize;
            let seq = region.load_u32(seq_offset, Ordering::Acquire).ok();
            if !reevaluate && seq.is_some() && seq == v.last_seq {
                continue;
            }
            match region.read_guest_line(slot as u32) {
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
                    eprintln!(
                        "pvsched: vm {}: slot {slot} carries cpu_id {}; its guest data is ignored",
                        self.spec.name, state.cpu_id
                    );
                }
                v.guest = None;
                v.ignored = Some(Ignored::CpuId(state.cpu_id));
            } else {
                v.guest = Some(mask_by_features(state, features));
                v.ignored = None;
            }
        }

        let due = self.engine.wake_at().is_some_and(|w| w <= ctx.now)
            || (ctx.host_due && self.engine.boosted_threads() > 0);
        if ctx.slow {
            match self.fs.task_stat(self.spec.pid, self.spec.pid) {
                Ok(st) if st.starttime == self.spec.pid_starttime => {}
                _ => {
                    result.gone = true;
                    return result;
                }
            }
        }
        if !(changed || ctx.slow || due) {
            return result;
        }
        result.stepped = true;

        // CPU time: fresh for boosted vCPUs (the budget is charged from it);
        // the others pass their last sample (slow ticks), which only sets
        // the engine's reference point. A boost's first interval is thus
        // charged at most the CPU time since that sample, capped by the
        // engine at the wall time between steps: over-, never under-counted.
        for (o, v) in self.obs.iter_mut().zip(&mut self.vcpus) {
            let boosted = v.applied != ThreadSched::Baseline;
            let run_ns = if v.thread.is_none() {
                None
            } else if boosted {
                v.sample(false).then_some(v.run_ns)
            } else {
                Some(v.run_ns)
            };
            *o = VcpuObservation {
                guest: if v.thread.is_some() { v.guest } else { None },
                run_ns,
            };
        }
        let path_obs = self.path.as_mut().map(|path| {
            if path.applied != ThreadSched::Baseline || ctx.slow {
                path.sample();
            }
            ThreadObservation {
                run_ns: path.run_ns,
            }
        });
        self.engine.step_with(
            ctx.now,
            StepInput {
                vcpus: &self.obs,
                interrupt_path: path_obs,
            },
            ctx.host_budget.as_deref_mut(),
        );
        let budget = self.engine.vm_stats();
        self.counters.vm_throttles = budget.vm_throttles;
        self.counters.host_throttles = budget.host_throttles;

        let region = self.file.region();
        for (slot, v) in self.vcpus.iter_mut().enumerate() {
            let d = self.engine.decisions()[slot];
            match d.event {
                Some(BoostEvent::Boosted) => self.counters.boosts += 1,
                Some(BoostEvent::Throttled) => self.counters.throttles += 1,
                _ => {}
            }
            let stats = self.engine.stats(slot).unwrap_or_default();
            self.counters.boosted_ns += stats.boosted_cpu_ns.saturating_sub(v.boosted_ns_seen);
            v.boosted_ns_seen = stats.boosted_cpu_ns;

            if let (Some(t), Some(act)) = (&v.thread, ctx.act.as_deref_mut()) {
                if d.sched != v.applied {
                    let affinity = match d.sched {
                        ThreadSched::Rt { .. } => self.spec.boost_cpus.as_deref(),
                        ThreadSched::Baseline => None,
                    };
                    match act.apply(&self.spec.name, t.thread, d.sched, affinity) {
                        Ok(did) => {
                            v.applied = d.sched;
                            if did {
                                let done = (ctx.clock)();
                                self.counters.applies += 1;
                                ctx.apply_latency.observe(done.saturating_sub(ctx.now));
                                if let Some(hook) = ctx.on_apply.as_deref_mut() {
                                    hook(slot as u32, t.thread.tid, d.sched, done);
                                }
                            }
                        }
                        Err(e) => {
                            self.counters.apply_errors += 1;
                            if matches!(&e, ActError::Sched(s) if s.is_gone()) {
                                v.thread = None;
                            }
                            self.last_error = Some(e.to_string());
                        }
                    }
                }
            } else if observe_only {
                v.applied = d.sched;
            }

            let publish = d.state != v.decision.state
                || d.throttle_until != v.decision.throttle_until
                || d.sched != v.decision.sched;
            v.decision = d;
            if publish && !observe_only && !ctx.slow && v.thread.is_some() {
                let line = host_line(v, ctx, &self.poll, &stats);
                let _ = region.write_host_line(slot as u32, &line);
            }
        }

        if let (Some(path), Some(d)) = (self.path.as_mut(), self.engine.interrupt_path_decision()) {
            match d.event {
                Some(BoostEvent::Boosted) => self.counters.boosts += 1,
                Some(BoostEvent::Throttled) => self.counters.throttles += 1,
                _ => {}
            }
            if let Some(act) = ctx.act.as_deref_mut() {
                if d.sched != path.applied {
                    match act.apply(&self.spec.name, path.thread, d.sched, None) {
                        Ok(_) => path.applied = d.sched,
                        Err(e) => {
                            self.counters.apply_errors += 1;
                            self.last_error = Some(format!("main thread: {e}"));
                        }
                    }
                }
            } else {
                path.applied = d.sched;
            }
        }

        if ctx.slow {
            // Host information for every vCPU, after the applies so they do
            // not wait for it; `stat` (pCPU, policy) every fourth time.
            self.slow_ticks = self.slow_ticks.wrapping_add(1);
            let full = self.slow_ticks % 4 == 1;
            for (slot, v) in self.vcpus.iter_mut().enumerate() {
                if v.thread.is_none() {
                    continue;
                }
                if !v.sample(full) {
                    self.last_error = Some("a vCPU thread vanished; waiting for QMP".into());
                    continue;
                }
                if !observe_only {
                    let stats = self.engine.stats(slot).unwrap_or_default();
                    let line = host_line(v, ctx, &self.poll, &stats);
                    let _ = region.write_host_line(slot as u32, &line);
                }
            }
        }
        result
    }

    /// Restores every thread of this VM (it is being dropped).
    pub fn release(&mut self, act: &mut Actuator) -> Vec<ActError> {
        for v in &mut self.vcpus {
            v.applied = ThreadSched::Baseline;
        }
        if let Some(path) = self.path.as_mut() {
            path.applied = ThreadSched::Baseline;
        }
        act.restore_vm(&self.spec.name)
    }

    /// Earliest time the engine must run again.
    pub fn wake_at(&self) -> Option<u64> {
        self.engine.wake_at()
    }

    /// Status snapshot.
    pub fn status(&self) -> VmStatus {
        let vcpus = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(slot, v)| {
                let stats = self.engine.stats(slot).unwrap_or_default();
                VcpuStatus {
                    slot: slot as u32,
                    tid: v.thread.as_ref().map(|t| t.thread.tid),
                    topology: v.thread.as_ref().map_or(String::new(), |t| {
                        let f = |x: Option<i64>| x.map_or("-".into(), |v| v.to_string());
                        format!(
                            "socket {} core {} thread {}",
                            f(t.cpu.socket_id),
                            f(t.cpu.core_id),
                            f(t.cpu.smt_id)
                        )
                    }),
                    state: match v.decision.state {
                        pvsched_abi::BoostState::Normal => "normal",
                        pvsched_abi::BoostState::Boosted => "boosted",
                        pvsched_abi::BoostState::Throttled => "throttled",
                    }
                    .into(),
                    reasons: reasons_names(v.decision.reasons),
                    applied: match v.applied {
                        ThreadSched::Baseline => "baseline".into(),
                        ThreadSched::Rt { class, prio } => format!(
                            "{}:{prio}",
                            if class == RtClass::Fifo { "fifo" } else { "rr" }
                        ),
                    },
                    throttle_until_ns: v.decision.throttle_until,
                    guest_ignored: v.ignored.map(|i| match i {
                        Ignored::CpuId(c) => format!("cpu_id {c} is not the slot index"),
                        Ignored::Invalid(f) => {
                            format!(
                                "invalid fields: {}",
                                f.names().collect::<Vec<_>>().join(",")
                            )
                        }
                        Ignored::Torn => "torn".into(),
                    }),
                    guest_valid: v.guest.is_some(),
                    pcpu: v.pcpu,
                    pcpu_load_permille: 0,
                    smt_sibling_busy: false,
                    preempted: v.preempted,
                    steal_ns: v.wait_ns,
                    run_ns: v.run_ns,
                    boosts: stats.boosts,
                    throttles: stats.throttles,
                    boosted_ns: stats.boosted_cpu_ns,
                }
            })
            .collect();
        VmStatus {
            name: self.spec.name.clone(),
            pid: self.spec.pid,
            shm: self.spec.shm.display().to_string(),
            qmp: self
                .spec
                .qmp
                .as_ref()
                .map(|q| q.display().to_string())
                .unwrap_or_default(),
            discovered: self.spec.discovered,
            attached: true,
            guest: self.negotiation.clone(),
            features: self.features.unwrap_or(0),
            nr_slots: self.vcpus.len() as u32,
            generation: self.header.host_generation,
            last_error: self.last_error.clone(),
            counters: self.counters.clone(),
            vcpus,
            iothreads: self
                .spec
                .iothreads
                .iter()
                .map(|i| (i.id.clone(), i.thread_id))
                .collect(),
        }
    }

    /// Fills the host-dependent fields of a status (load, SMT).
    pub fn status_with_host(&self, host: &HostSampler) -> VmStatus {
        let mut s = self.status();
        for v in &mut s.vcpus {
            v.pcpu_load_permille = host.load_permille(v.pcpu);
            v.smt_sibling_busy = host.sibling_busy(v.pcpu);
        }
        s
    }
}

impl VmRuntime {
    /// This VM's membership of the host budget, to leave it when the VM goes.
    pub fn host_member(&self) -> Option<pvsched_policy::HostMember> {
        self.engine.host_member()
    }

    /// Threads this VM has boosted after its last step.
    pub fn boosted_threads(&self) -> u64 {
        self.engine.boosted_threads()
    }
}

/// The host line of one vCPU.
fn host_line(
    v: &Vcpu,
    ctx: &TickCtx<'_>,
    poll: &HaltPollParams,
    stats: &pvsched_policy::VcpuStats,
) -> PvschedHostLine {
    let load = ctx.host.load_permille(v.pcpu);
    let (host_policy, host_prio) = match v.applied {
        ThreadSched::Rt { class, prio } => (
            match class {
                RtClass::Fifo => PVSCHED_POLICY_FIFO,
                RtClass::Rr => PVSCHED_POLICY_RR,
            },
            prio,
        ),
        // At baseline the thread has its own policy (an RT one set by
        // someone else is reported as such, without its priority).
        ThreadSched::Baseline => (u8::try_from(v.policy_raw).unwrap_or(0).min(6), 0),
    };
    PvschedHostLine {
        seq: 0,
        pcpu: v.pcpu,
        boost_state: v.decision.state.to_raw(),
        preempted: u8::from(v.preempted),
        smt_sibling_busy: u8::from(ctx.host.sibling_busy(v.pcpu)),
        host_policy,
        host_prio,
        reserved0: [0; 3],
        pcpu_load_permille: load,
        poll_hint_ns: tuned_for_load(poll, load).max_ns,
        steal_ns: v.wait_ns,
        throttle_until_ns: v.decision.throttle_until,
        host_time_ns: ctx.now,
        boosts: stats.boosts.min(u64::from(u32::MAX)) as u32,
        throttles: stats.throttles.min(u64::from(u32::MAX)) as u32,
        boosted_ns: stats.boosted_cpu_ns,
    }
}

/// Whether the first `len` bytes of the region (a multiple of 8: header and
/// slots are) are all zero: the bytes a fresh header and its slots cover.
fn all_zero(region: &pvsched_abi::Region<'_>, len: usize) -> bool {
    let len = len.min(region.len());
    (0..len / 8).all(|w| matches!(region.load_u64(w * 8, Ordering::Relaxed), Ok(0)))
}

fn region_len_of(vm: &VmRuntime) -> usize {
    vm.file.len()
}

/// Identifies a thread of process `pid` (checks it belongs to it).
pub fn thread_ref(fs: &HostFs, pid: i32, tid: i32) -> Result<ThreadRef, String> {
    let st = fs
        .task_stat(pid, tid)
        .map_err(|e| format!("thread {tid} is not a thread of process {pid}: {e}"))?;
    Ok(ThreadRef {
        pid,
        tid,
        starttime: st.starttime,
    })
}

impl VmRuntime {
    /// Why the shared file can no longer be used, if so: an access faulted
    /// because the file was truncated (always checked, one atomic load), or,
    /// with `check_path` (the slow tick), the file shrank below the mapping
    /// or its path now names another file than the one mapped.
    pub fn shared_file_broken(&self, check_path: bool) -> Option<String> {
        let path = self.spec.shm.display();
        if self.file.faulted() {
            return Some(format!(
                "shared file {path} truncated: an access past its end faulted"
            ));
        }
        if !check_path {
            return None;
        }
        if let Ok(len) = self.file.file_len() {
            if len < self.file.len() as u64 {
                return Some(format!(
                    "shared file {path} truncated to {len} bytes ({} mapped)",
                    self.file.len()
                ));
            }
        }
        match self.file.is_file_at(&self.spec.shm) {
            Ok(false) => Some(format!(
                "shared file {path} replaced: the path names another file than the one mapped"
            )),
            // Missing: QEMU and the daemon still share the mapped file.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Liveness;

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
}
