//! One managed VM: its shared region, its vCPU threads and their `/proc`
//! files, its guest RAM when introspection maps it ([`crate::guestram`]),
//! and the [`VmController`] that makes every decision about them.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pvsched_abi::layout::HEADER_GUEST_LINE_OFFSET;
use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_abi::{new_host_header, region_size_for, validate_header, CpuInfoTable};
use pvsched_policy::controller::{reasons_names, GuestMemory};
use pvsched_policy::{
    ApplyError, ControllerCounters, CpuClock, CpuSample, HostBudget, HostInfo, Ignored,
    IoThreadPolicy, PolicyConfig, RtClass, Sampled, StatSample, ThreadActuator, ThreadSched,
    ThreadStat, TickInput, VmController, VmEngine, VmThread,
};
use serde::{Deserialize, Serialize};

use crate::actuator::{ActError, Actuator, ThreadRef};
use crate::guestram::{GuestRam, RamLayout, RamQuery};
use crate::ivshmem::{Channel, Doorbell};
use crate::procfs::{HostFs, HostSampler, ThreadFiles};
use crate::qmp::{error_text, CpuInfo, IoThreadInfo, KvmStats};
use crate::status::{
    DoorbellStatus, Histogram, IntrospectionStatus, KvmStatus, VcpuStatus, VmCounters, VmStatus,
    TRUST_METRICS,
};
use crate::trust::{
    check_region_fd, open_shared_file, InitReason, Refusal, RefusalReason, SharedFileError,
};

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
    /// How the IOThreads are boosted (`None`: never).
    #[serde(default)]
    pub iothread_policy: Option<IoThreadPolicy>,
    /// Found by discovery.
    pub discovered: bool,
    /// The guest's RAM, for introspection: its layout when it is on a
    /// shared backend, or why it is not read.
    #[serde(default)]
    pub guest_ram: RamQuery,
    /// Whether QEMU runs the guest with KVM (`query-kvm`; `None`: not known).
    #[serde(default)]
    pub kvm: Option<bool>,
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

/// A vCPU thread as QMP named it.
#[derive(Debug)]
struct VcpuThread {
    cpu: CpuInfo,
    thread: ThreadRef,
}

/// The VM's interrupt-delivery thread (QEMU's main thread, whose loop fires
/// guest timers under TCG and runs userspace devices), boosted by the
/// controller while a vCPU of the VM waits for an interrupt.
#[derive(Debug)]
struct PathThread {
    thread: ThreadRef,
    files: Option<ThreadFiles>,
}

/// A QEMU IOThread (`query-iothreads`), numbered for the controller by its
/// place in the VM's list.
#[derive(Debug)]
struct IoThread {
    id: String,
    thread: ThreadRef,
}

/// What a tick learned that the daemon must act on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TickResult {
    /// The engine ran.
    pub stepped: bool,
    /// The QEMU process is gone.
    pub gone: bool,
    /// A guest line or the negotiation changed.
    pub guest_changed: bool,
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
    /// Every decision: negotiation, guest lines, engine, what to apply and publish.
    ctl: VmController,
    /// Per slot: the vCPU thread, if any.
    threads: Vec<Option<VcpuThread>>,
    /// Per slot: its `/proc` files (when they could be opened).
    files: Vec<Option<ThreadFiles>>,
    path: Option<PathThread>,
    iothreads: Vec<IoThread>,
    /// Per IOThread: its `/proc` files (when they could be opened).
    iothread_files: Vec<Option<ThreadFiles>>,
    fs: HostFs,
    /// Scheduling calls that failed outside a tick (IOThread pinning).
    remap_apply_errors: u64,
    /// The ivshmem server's channel of a doorbell VM (its memory and
    /// eventfds); `None` for a VM on a shared file.
    channel: Option<Arc<Channel>>,
    /// Rings received and interrupts sent on the doorbell.
    rings_received: u64,
    interrupts_sent: u64,
    /// The guest's RAM, read for introspection.
    intro: Introspection,
    /// What the last log line about introspection said (each change is logged once).
    intro_logged: Option<String>,
    /// The CPU-info table advertised in the header (`None`: not advertised).
    cpu_info: Option<CpuInfoTable>,
    /// KVM's statistics as last read, or why they could not be.
    kvm_stats: Option<Result<KvmStats, String>>,
}

/// Introspection of a VM's guest RAM.
#[derive(Debug)]
enum Introspection {
    /// Off in the configuration.
    Off,
    /// The guest's RAM is not on a shared backend.
    NoSharedRam(String),
    /// Mapped.
    Mapped(GuestRam),
    /// Shared, but not mapped: why.
    Error(String),
}

/// Byte offset of the 8-byte word holding the guest's `guest_generation`
/// (its first four bytes): the header's guest line is read as `u64` words.
const GUEST_GENERATION_WORD: usize =
    HEADER_GUEST_LINE_OFFSET + core::mem::offset_of!(PvschedHeaderGuest, guest_generation);
const _: () = assert!(GUEST_GENERATION_WORD % 8 == 0);

/// The guest's generation, one atomic load (0 when out of bounds).
fn guest_generation(region: &pvsched_abi::Region<'_>) -> u32 {
    let word = region
        .load_u64(GUEST_GENERATION_WORD, Ordering::Relaxed)
        .unwrap_or(0)
        .to_ne_bytes();
    u32::from_ne_bytes([word[0], word[1], word[2], word[3]])
}

/// Samples the VM's threads from their `/proc` files.
struct ProcClock<'a> {
    files: &'a mut [Option<ThreadFiles>],
    path: Option<&'a mut PathThread>,
    iothreads: &'a mut [Option<ThreadFiles>],
}

impl CpuClock for ProcClock<'_> {
    fn sample(&mut self, thread: VmThread, with_stat: bool) -> Sampled {
        let files = match thread {
            VmThread::Vcpu(slot) => self.files.get_mut(slot as usize).and_then(Option::as_mut),
            VmThread::InterruptPath => self.path.as_deref_mut().and_then(|p| p.files.as_mut()),
            VmThread::IoThread(i) => self.iothreads.get_mut(i as usize).and_then(Option::as_mut),
        };
        let Some(files) = files else {
            return Sampled::NoSource;
        };
        let Ok(ss) = files.schedstat() else {
            return Sampled::Gone;
        };
        let stat = if !with_stat {
            StatSample::NotAsked
        } else {
            match files.stat() {
                Ok(st) => StatSample::Read(ThreadStat {
                    pcpu: st.processor,
                    runnable: st.state == 'R',
                    policy: st.policy,
                    rt_priority: st.rt_priority,
                }),
                Err(_) => StatSample::Failed,
            }
        };
        Sampled::Fresh(CpuSample {
            run_ns: ss.run_ns,
            wait_ns: ss.wait_ns,
            slices: Some(ss.slices),
            stat,
        })
    }
}

/// Applies the controller's decisions with sched_setattr, and measures how
/// long each vCPU change took from the tick's start.
struct DaemonActuator<'a, 'c> {
    act: &'a mut Actuator,
    vm: &'a str,
    boost_cpus: Option<&'a [u32]>,
    threads: &'a [Option<VcpuThread>],
    path: Option<ThreadRef>,
    iothreads: &'a [IoThread],
    iothread_cpus: Option<&'a [u32]>,
    now: u64,
    clock: &'a dyn Fn() -> u64,
    apply_latency: &'a mut Histogram,
    on_apply: Option<&'a mut (dyn FnMut(u32, i32, ThreadSched, u64) + Send + 'c)>,
}

fn apply_error(e: ActError) -> ApplyError {
    if matches!(&e, ActError::Sched(s) if s.is_gone()) {
        ApplyError::Gone(e.to_string())
    } else {
        ApplyError::Failed(e.to_string())
    }
}

impl ThreadActuator for DaemonActuator<'_, '_> {
    fn apply(&mut self, thread: VmThread, sched: ThreadSched) -> Result<bool, ApplyError> {
        match thread {
            VmThread::Vcpu(slot) => {
                let Some(t) = self.threads.get(slot as usize).and_then(Option::as_ref) else {
                    return Err(ApplyError::Gone(format!("slot {slot} has no thread")));
                };
                let affinity = match sched {
                    ThreadSched::Rt { .. } => self.boost_cpus,
                    // Refused by the configuration: a deadline thread's
                    // affinity must span its root domain.
                    ThreadSched::Deadline(_) | ThreadSched::Baseline => None,
                };
                let did = self
                    .act
                    .apply(self.vm, t.thread, sched, affinity)
                    .map_err(apply_error)?;
                if did {
                    let done = (self.clock)();
                    self.apply_latency.observe(done.saturating_sub(self.now));
                    if let Some(hook) = self.on_apply.as_deref_mut() {
                        hook(slot, t.thread.tid, sched, done);
                    }
                }
                Ok(did)
            }
            VmThread::InterruptPath => {
                let Some(t) = self.path else {
                    return Err(ApplyError::Gone("no main thread".into()));
                };
                self.act.apply(self.vm, t, sched, None).map_err(apply_error)
            }
            VmThread::IoThread(i) => {
                let Some(io) = self.iothreads.get(i as usize) else {
                    return Err(ApplyError::Gone(format!("no iothread {i}")));
                };
                // Pinned whatever the class: the pin keeps IOThreads off the
                // CPUs of RT vCPUs boosted or not.
                self.act
                    .apply(self.vm, io.thread, sched, self.iothread_cpus)
                    .map_err(apply_error)
                    .map_err(|e| match e {
                        ApplyError::Gone(m) => ApplyError::Gone(format!("{}: {m}", io.id)),
                        ApplyError::Failed(m) => ApplyError::Failed(format!("{}: {m}", io.id)),
                    })
            }
        }
    }
}

/// Host load and SMT as the last sample saw them.
struct SampledHost<'a>(&'a HostSampler);

impl HostInfo for SampledHost<'_> {
    fn load_permille(&self, pcpu: u32) -> u32 {
        self.0.load_permille(pcpu)
    }
    fn sibling_busy(&self, pcpu: u32) -> bool {
        self.0.sibling_busy(pcpu)
    }
}

fn vm_counters(c: &ControllerCounters, remap_apply_errors: u64) -> VmCounters {
    VmCounters {
        boosts: c.boosts,
        throttles: c.throttles,
        boosted_ns: c.boosted_ns,
        invalid_writes: c.invalid_writes,
        cpu_id_mismatches: c.cpu_id_mismatches,
        torn_reads: c.torn_reads,
        header_repairs: c.header_repairs,
        version_mismatches: c.version_mismatches,
        apply_errors: c.apply_errors + remap_apply_errors,
        applies: c.applies,
        vm_throttles: c.vm_throttles,
        host_throttles: c.host_throttles,
        offender_periods: c.offender_periods,
        stale_guests: c.stale_guests,
        expired_idle_requests: c.expired_idle_requests,
        preempt_count_samples: c.preempt_count_samples,
        lock_holder_grants: c.lock_holder_grants,
        lock_holder_capped: c.lock_holder_capped,
    }
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
        let checked = open_shared_file(fs, spec.pid, spec.pid_starttime, &spec.shm)
            .map_err(shared_file_error)?;
        let file = SharedFile::from_file(checked).map_err(|source| VmError::Map {
            path: spec.shm.clone(),
            source,
        })?;
        Self::attach_mapped(spec, file, None, policy, host_features, fresh, fs, dry_run)
    }

    /// [`VmRuntime::attach`] for a doorbell VM: the region is the memfd the
    /// ivshmem server made for the QEMU process and sent it, checked to be
    /// mapped shared and writable by that process ([`check_region_fd`]);
    /// the channel's eventfds stay reachable through [`VmRuntime::doorbell`].
    /// The region is always new (fresh from the server).
    pub fn attach_doorbell(
        spec: VmSpec,
        channel: Arc<Channel>,
        policy: &PolicyConfig,
        host_features: u64,
        fs: &HostFs,
        dry_run: bool,
    ) -> Result<Self, VmError> {
        let shown = spec.shm.display().to_string();
        let checked = check_region_fd(fs, spec.pid, spec.pid_starttime, channel.memfd(), &shown)
            .map_err(shared_file_error)?;
        let file = SharedFile::from_file(checked).map_err(|source| VmError::Map {
            path: spec.shm.clone(),
            source,
        })?;
        Self::attach_mapped(
            spec,
            file,
            Some(channel),
            policy,
            host_features,
            false,
            fs,
            dry_run,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn attach_mapped(
        spec: VmSpec,
        file: SharedFile,
        channel: Option<Arc<Channel>>,
        policy: &PolicyConfig,
        host_features: u64,
        fresh: bool,
        fs: &HostFs,
        dry_run: bool,
    ) -> Result<Self, VmError> {
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
        // The guest rings the daemon's peer on a doorbell VM; no other VM
        // has a doorbell to advertise.
        let mut header = header;
        let doorbell = channel.as_ref().and_then(|c| {
            let d = c.doorbell();
            pvsched_abi::Doorbell::new(d.daemon_peer(), u16::try_from(d.vectors()).ok()?)
        });
        pvsched_abi::Doorbell::advertise(doorbell, &mut header);
        // The CPU-info table, where the guest tells where its preempt counts
        // are: offered when the guest's RAM is on a shared backend (mapped
        // now or on a later refresh) and the region has room after the
        // slots. Observe-only keeps what the header says.
        let cpu_info = if dry_run {
            CpuInfoTable::from_header(&header, region.len())
        } else {
            let wanted =
                spec.guest_ram.shared() && host_features & PVSCHED_FEAT_PREEMPT_COUNT_GPA != 0;
            let table = wanted
                .then(|| CpuInfoTable::place(header.nr_slots, region.len()))
                .flatten();
            CpuInfoTable::advertise(table, &mut header);
            table
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
                    // An earlier guest's addresses must not be read as this one's.
                    if let Some(off) = cpu_info.and_then(|t| t.entry_offset(i)) {
                        let _ = region.store_u64(off, 0, Ordering::Relaxed);
                        let _ = region.store_u32(off + 8, 0, Ordering::Relaxed);
                        let _ = region.store_u32(off + 12, 0, Ordering::Relaxed);
                    }
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
            spec: spec.clone(),
            file,
            ctl: VmController::new(engine, header),
            threads: (0..nr).map(|_| None).collect(),
            files: (0..nr).map(|_| None).collect(),
            path: None,
            iothreads: Vec::new(),
            iothread_files: Vec::new(),
            fs: fs.clone(),
            remap_apply_errors: 0,
            channel,
            rings_received: 0,
            interrupts_sent: 0,
            intro: Introspection::Off,
            intro_logged: None,
            cpu_info,
            kvm_stats: None,
        };
        if dry_run && !header_valid {
            vm.ctl.set_negotiation(format!(
                "no valid header: {}",
                validate_header(&old.host, region_len_of(&vm))
                    .err()
                    .map_or(String::new(), |e| e.to_string())
            ));
        }
        vm.remap(&spec, fs, None);
        Ok(vm)
    }

    /// The spec in force.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// A doorbell VM's eventfds: the daemon's to poll (the guest rang it)
    /// and the guest's to ring. `None` for a VM on a shared file.
    pub fn doorbell(&self) -> Option<&Doorbell> {
        self.channel.as_deref().map(Channel::doorbell)
    }

    /// The daemon's peer id on the doorbell (what the guest writes in the
    /// high 16 bits of its Doorbell register to ring the daemon).
    pub fn doorbell_peer(&self) -> Option<u16> {
        self.doorbell().map(Doorbell::daemon_peer)
    }

    fn doorbell_status(&self) -> Option<DoorbellStatus> {
        let peer = match self.doorbell_peer() {
            Some(peer) => peer,
            None => pvsched_abi::Doorbell::from_header(self.ctl.header())?.peer,
        };
        let guest = self
            .file
            .region()
            .read_header()
            .map(|h| pvsched_abi::GuestDoorbellCounters::from_header(&h.guest))
            .unwrap_or_default();
        Some(DoorbellStatus {
            daemon_peer: peer,
            event_driven: self.rings_doorbell(),
            rings_received: self.rings_received,
            interrupts_sent: self.interrupts_sent,
            guest_rung: guest.rung,
            guest_suppressed: guest.suppressed,
            guest_interrupts: guest.host_interrupts,
        })
    }

    /// Whether the guest agreed on the doorbell (it rings when the host must
    /// act): the loop need not poll this VM's lines.
    pub fn rings_doorbell(&self) -> bool {
        self.ctl
            .features()
            .is_some_and(|f| f & PVSCHED_FEAT_DOORBELL != 0)
    }

    /// Advertises a doorbell the caller watches for this VM (one not served
    /// by the ivshmem server, such as the bench's eventfds).
    pub fn advertise_doorbell(&mut self, doorbell: pvsched_abi::Doorbell) {
        let region = self.file.region();
        self.ctl.advertise_doorbell(&region, Some(doorbell));
    }

    /// Counts rings the loop received for this VM.
    pub fn count_rings(&mut self, rings: u64) {
        self.rings_received = self.rings_received.saturating_add(rings);
    }

    /// A doorbell VM's channel from the ivshmem server.
    pub fn channel(&self) -> Option<&Arc<Channel>> {
        self.channel.as_ref()
    }

    /// Records an error to show in the status.
    pub fn set_error(&mut self, error: Option<String>) {
        self.ctl.set_error(error);
    }

    /// A deferred change of thread `tid` failed ([`Actuator::apply_deferred`]):
    /// the controller counts it and applies again after a back-off from `now`. Returns whether `tid` is
    /// one of this VM's threads.
    pub fn deferred_apply_failed(
        &mut self,
        tid: crate::sched::Tid,
        message: String,
        now: u64,
    ) -> bool {
        let slot = self
            .threads
            .iter()
            .position(|t| t.as_ref().is_some_and(|t| t.thread.tid == tid));
        let thread = match slot {
            Some(slot) => VmThread::Vcpu(slot as u32),
            None if self.path.as_ref().is_some_and(|p| p.thread.tid == tid) => {
                VmThread::InterruptPath
            }
            None => match self.iothreads.iter().position(|io| io.thread.tid == tid) {
                Some(i) => VmThread::IoThread(i as u32),
                None => return false,
            },
        };
        self.ctl.deferred_apply_failed(thread, message, now);
        true
    }

    /// Takes a new spec of the same process (vCPU hot-plug, IOThreads):
    /// threads that changed are restored and their engine state reset.
    pub fn remap(&mut self, spec: &VmSpec, fs: &HostFs, mut act: Option<&mut Actuator>) {
        let nr = self.threads.len() as u32;
        for cpu in &spec.cpus {
            if cpu.cpu_index >= nr {
                self.ctl.set_error(Some(format!(
                    "vCPU {} (thread {}) has no slot: the region has {nr}",
                    cpu.cpu_index, cpu.thread_id
                )));
            }
        }
        for slot in 0..nr {
            let want = spec.cpus.iter().find(|c| c.cpu_index == slot);
            let same = match (&self.threads[slot as usize], want) {
                (Some(t), Some(c)) => t.thread.tid == c.thread_id,
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            if let Some(old) = self.threads[slot as usize].take() {
                if let Some(a) = act.as_deref_mut() {
                    if let Err(e) = a.restore_thread(old.thread.tid) {
                        self.ctl.set_error(Some(e.to_string()));
                    }
                }
            }
            self.files[slot as usize] = None;
            self.ctl.reset_slot(slot);
            if let Some(c) = want {
                match thread_ref(fs, spec.pid, c.thread_id) {
                    Ok(thread) => {
                        self.threads[slot as usize] = Some(VcpuThread {
                            cpu: c.clone(),
                            thread,
                        });
                        self.files[slot as usize] =
                            ThreadFiles::open(fs, spec.pid, c.thread_id).ok();
                        let mut clock = ProcClock {
                            files: &mut self.files,
                            path: None,
                            iothreads: &mut [],
                        };
                        self.ctl.attach_thread(slot, &mut clock);
                    }
                    Err(e) => self.ctl.set_error(Some(format!("vCPU {slot}: {e}"))),
                }
            }
        }
        if self.path.is_none() && self.ctl.config().boost_interrupt_path {
            match thread_ref(fs, spec.pid, spec.pid) {
                Ok(thread) => {
                    let path = self.path.insert(PathThread {
                        thread,
                        files: ThreadFiles::open(fs, spec.pid, spec.pid).ok(),
                    });
                    let mut clock = ProcClock {
                        files: &mut [],
                        path: Some(path),
                        iothreads: &mut [],
                    };
                    self.ctl.attach_interrupt_path(&mut clock);
                }
                Err(e) => self.ctl.set_error(Some(format!("main thread: {e}"))),
            }
        }
        self.remap_iothreads(spec, fs, act.as_deref_mut());
        if let Some(a) = act.as_deref_mut() {
            // Originals on disk now, so that applying never waits for a file write.
            let current: Vec<ThreadRef> = self
                .threads
                .iter()
                .filter_map(|t| t.as_ref().map(|t| t.thread))
                .chain(self.path.as_ref().map(|p| p.thread))
                .collect();
            if let Err(e) = a.adopt(&spec.name, &current, spec.boost_cpus.is_some()) {
                self.ctl.set_error(Some(e.to_string()));
            }
            let iothreads: Vec<ThreadRef> = self.iothreads.iter().map(|io| io.thread).collect();
            if let Err(e) = a.adopt(&spec.name, &iothreads, spec.iothread_cpus.is_some()) {
                self.ctl.set_error(Some(e.to_string()));
            }
        }
        // A new IOThread is pinned at once; the controller keeps the pin
        // through every later change of its class.
        if let (Some(cpus), Some(a)) = (&spec.iothread_cpus, act) {
            for (i, io) in self.iothreads.iter().enumerate() {
                let boosted = self
                    .ctl
                    .iothreads()
                    .get(i)
                    .is_some_and(|s| s.applied != ThreadSched::Baseline);
                if boosted {
                    continue;
                }
                if let Err(e) = a.apply(&spec.name, io.thread, ThreadSched::Baseline, Some(cpus)) {
                    self.remap_apply_errors += 1;
                    self.ctl.set_error(Some(format!("iothread {}: {e}", io.id)));
                }
            }
        }
        self.update_guest_ram(&spec.guest_ram);
        if spec.kvm != self.spec.kvm {
            self.kvm_stats = None;
        }
        self.spec = spec.clone();
    }

    /// Takes the IOThreads of a new spec: a thread that changed or went is
    /// restored and its controller state reset, a new one attached (QMP
    /// `object-add iothread` shows at the next refresh).
    fn remap_iothreads(&mut self, spec: &VmSpec, fs: &HostFs, mut act: Option<&mut Actuator>) {
        self.ctl.set_iothread_policy(spec.iothread_policy);
        let same_prefix = self
            .iothreads
            .iter()
            .zip(&spec.iothreads)
            .take_while(|(old, new)| old.id == new.id && old.thread.tid == new.thread_id)
            .count();
        // What follows the first difference is renumbered: restore it all.
        for old in self.iothreads.drain(same_prefix..) {
            if let Some(a) = act.as_deref_mut() {
                if let Err(e) = a.restore_thread(old.thread.tid) {
                    self.ctl
                        .set_error(Some(format!("iothread {}: {e}", old.id)));
                }
            }
        }
        self.iothread_files.truncate(same_prefix);
        self.ctl.truncate_iothreads(same_prefix);
        for info in &spec.iothreads[same_prefix..] {
            let thread = match thread_ref(fs, spec.pid, info.thread_id) {
                Ok(thread) => thread,
                Err(e) => {
                    // Numbering stops here; the rest is tried at the next refresh.
                    self.ctl
                        .set_error(Some(format!("iothread {}: {e}", info.id)));
                    break;
                }
            };
            let index = self.iothreads.len() as u32;
            self.iothreads.push(IoThread {
                id: info.id.clone(),
                thread,
            });
            self.iothread_files
                .push(ThreadFiles::open(fs, spec.pid, info.thread_id).ok());
            let mut clock = ProcClock {
                files: &mut [],
                path: None,
                iothreads: &mut self.iothread_files,
            };
            self.ctl.attach_iothread(index, &mut clock);
        }
    }

    /// Takes what the refresher learned about the guest's RAM: maps a new
    /// layout (keeping the mappings when only the ranges moved), keeps a
    /// mapping while a query fails, unmaps when the RAM is no longer shared.
    fn update_guest_ram(&mut self, query: &RamQuery) {
        let current = std::mem::replace(&mut self.intro, Introspection::Off);
        self.intro = match (query, current) {
            (RamQuery::Layout(layout), Introspection::Mapped(mut ram)) => {
                if ram.layout() == layout || ram.relayout(layout.clone()) {
                    Introspection::Mapped(ram)
                } else {
                    drop(ram);
                    self.map_guest_ram(layout)
                }
            }
            (RamQuery::Layout(layout), _) => self.map_guest_ram(layout),
            (RamQuery::Failed(_), mapped @ Introspection::Mapped(_)) => mapped,
            (RamQuery::Failed(why), _) => Introspection::Error(why.clone()),
            (RamQuery::NoSharedRam(why), _) => Introspection::NoSharedRam(why.clone()),
            (RamQuery::Off, _) => Introspection::Off,
        };
        self.log_introspection();
    }

    fn map_guest_ram(&self, layout: &RamLayout) -> Introspection {
        match GuestRam::map(
            &self.fs,
            self.spec.pid,
            self.spec.pid_starttime,
            layout.clone(),
            self.threads.len(),
        ) {
            Ok(ram) => Introspection::Mapped(ram),
            Err(e) => Introspection::Error(error_text(&e)),
        }
    }

    /// One log line per change of what introspection does (mapped, or why not).
    fn log_introspection(&mut self) {
        let line = match &self.intro {
            Introspection::Mapped(ram) => Some(format!(
                "guest RAM mapped read-only: {}",
                layout_summary(ram.layout())
            )),
            Introspection::Error(why) => Some(format!("guest RAM not mapped: {why}")),
            Introspection::Off | Introspection::NoSharedRam(_) => None,
        };
        if line != self.intro_logged {
            if let Some(l) = &line {
                eprintln!("pvsched: vm {}: {l}", self.spec.name);
            }
            self.intro_logged = line;
        }
    }

    /// Takes KVM's statistics as the refresher last read them (or why not).
    pub fn set_kvm_stats(&mut self, stats: Result<KvmStats, String>) {
        self.kvm_stats = Some(stats);
    }

    /// Whether the guest's RAM is mapped for introspection.
    pub fn guest_ram(&self) -> Option<&GuestRam> {
        match &self.intro {
            Introspection::Mapped(ram) => Some(ram),
            _ => None,
        }
    }

    /// Copies the CPU-info table again when the guest agreed on it and its
    /// instance changed (or on a host-information tick); forgets it when
    /// the guest has not agreed. A mapping that faulted is dropped.
    fn refresh_guest_ram(&mut self, slow: bool) {
        if matches!(&self.intro, Introspection::Mapped(ram) if ram.faulted()) {
            self.intro = Introspection::Error(
                "a backend file of the guest's RAM was truncated: an access past its end faulted"
                    .into(),
            );
            self.log_introspection();
            return;
        }
        let agreed = self
            .ctl
            .features()
            .is_some_and(|f| f & PVSCHED_FEAT_PREEMPT_COUNT_GPA != 0);
        let Introspection::Mapped(ram) = &mut self.intro else {
            return;
        };
        let region = self.file.region();
        match (agreed, self.cpu_info) {
            (true, Some(table)) => {
                let generation = guest_generation(&region);
                if slow || ram.table_generation() != Some(generation) {
                    ram.read_table(&region, table, generation);
                }
            }
            _ => {
                if ram.table_generation().is_some() {
                    ram.clear_table();
                }
            }
        }
    }

    /// One loop iteration for this VM: the controller decides, this applies
    /// through the actuator and reads `/proc`.
    pub fn tick(&mut self, ctx: &mut TickCtx<'_>) -> TickResult {
        // Whether the QEMU process is still the one attached (slow ticks).
        let process_alive = !ctx.slow
            || matches!(self.fs.task_stat(self.spec.pid, self.spec.pid),
                Ok(st) if st.starttime == self.spec.pid_starttime);
        self.refresh_guest_ram(ctx.slow);
        let region = self.file.region();
        let mut clock = ProcClock {
            files: &mut self.files,
            path: self.path.as_mut(),
            iothreads: &mut self.iothread_files,
        };
        let path_thread = clock.path.as_ref().map(|p| p.thread);
        let mut actuator = ctx.act.as_deref_mut().map(|act| DaemonActuator {
            act,
            vm: &self.spec.name,
            boost_cpus: self.spec.boost_cpus.as_deref(),
            threads: &self.threads,
            path: path_thread,
            iothreads: &self.iothreads,
            iothread_cpus: self.spec.iothread_cpus.as_deref(),
            now: ctx.now,
            clock: ctx.clock,
            apply_latency: &mut *ctx.apply_latency,
            on_apply: ctx.on_apply.as_deref_mut(),
        });
        let out = self.ctl.tick(
            &region,
            actuator.as_mut().map(|a| a as &mut dyn ThreadActuator),
            &mut clock,
            TickInput {
                now: ctx.now,
                slow: ctx.slow,
                host: &SampledHost(ctx.host),
                host_budget: ctx.host_budget.as_deref_mut(),
                host_due: ctx.host_due,
                process_alive,
                guest_memory: match &self.intro {
                    Introspection::Mapped(ram) => Some(ram as &dyn GuestMemory),
                    _ => None,
                },
            },
        );
        if ctx.slow {
            if let Introspection::Mapped(ram) = &self.intro {
                // The status's sample of every vCPU, whatever the policy read.
                ram.sample_all();
            }
        }
        for notice in &out.notices {
            eprintln!("pvsched: vm {}: {notice}", self.spec.name);
        }
        // A thread the actuator found gone is forgotten until QMP names it again.
        for (slot, s) in self.ctl.slots().iter().enumerate() {
            if !s.present {
                self.threads[slot] = None;
                self.files[slot] = None;
            }
        }
        if out.notify_guest {
            if let Some(doorbell) = self.doorbell() {
                if doorbell.ring_guest(0).is_ok() {
                    self.interrupts_sent += 1;
                }
            }
        }
        TickResult {
            stepped: out.stepped,
            gone: out.gone,
            guest_changed: out.guest_changed,
        }
    }

    /// Restores every thread of this VM (it is being dropped).
    pub fn release(&mut self, act: &mut Actuator) -> Vec<ActError> {
        self.ctl.released();
        act.restore_vm(&self.spec.name)
    }

    /// Earliest time the engine must run again.
    pub fn wake_at(&self) -> Option<u64> {
        self.ctl.wake_at()
    }

    /// Status snapshot.
    pub fn status(&self) -> VmStatus {
        let ram_view = |slot: usize| {
            self.guest_ram()
                .map(|r| r.slot_view(slot))
                .unwrap_or_default()
        };
        let kvm = match &self.kvm_stats {
            Some(Ok(k)) => Some(k),
            _ => None,
        };
        let vcpus = self
            .ctl
            .slots()
            .iter()
            .zip(&self.threads)
            .enumerate()
            .map(|(slot, (v, thread))| {
                let stats = self.ctl.stats(slot);
                let ram = ram_view(slot);
                VcpuStatus {
                    slot: slot as u32,
                    tid: thread.as_ref().map(|t| t.thread.tid),
                    topology: thread.as_ref().map_or(String::new(), |t| {
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
                        ThreadSched::Deadline(r) => {
                            format!("deadline:{}/{}us", r.runtime_ns / 1000, r.period_ns / 1000)
                        }
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
                    preempt_count_gpa: ram.gpa,
                    preempt_count: ram.last,
                    cpu_info_ignored: ram.refused,
                    kvm: kvm.and_then(|k| k.vcpus.get(&(slot as u32))).cloned(),
                    guest_rt_pending: v.guest.map_or(0, |g| g.rt_pending),
                    guest_in_irq: v
                        .guest
                        .is_some_and(|g| g.irq_depth > 0 || g.softirq_depth > 0),
                    guest_idle: v.guest.is_some_and(|g| g.idle),
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
            guest: self.ctl.negotiation().to_owned(),
            features: self.ctl.features().unwrap_or(0),
            nr_slots: self.threads.len() as u32,
            generation: self.ctl.header().host_generation,
            last_error: self.ctl.last_error().map(str::to_owned),
            counters: vm_counters(self.ctl.counters(), self.remap_apply_errors),
            doorbell: self.doorbell_status(),
            introspection: self.introspection_status(),
            kvm: self.kvm_status(),
            budget_ns: self.ctl.config().vm_budget_ns,
            budget_used_ns: self.ctl.budget().window_used_ns,
            vcpus,
            iothreads: self
                .spec
                .iothreads
                .iter()
                .map(|i| (i.id.clone(), i.thread_id))
                .collect(),
        }
    }

    fn introspection_status(&self) -> IntrospectionStatus {
        let mut st = IntrospectionStatus {
            table_advertised: self.cpu_info.is_some(),
            ..Default::default()
        };
        (st.state, st.detail) = match &self.intro {
            Introspection::Off => ("off".into(), "introspection = false".into()),
            Introspection::NoSharedRam(why) => ("no_shared_ram".into(), why.clone()),
            Introspection::Error(why) => ("error".into(), why.clone()),
            Introspection::Mapped(ram) => {
                let layout = ram.layout();
                st.ranges = layout.ranges.len() as u32;
                st.backends = layout.backends.iter().map(|b| b.id.clone()).collect();
                st.ram_bytes = layout.covered_bytes();
                st.valid_entries = ram.valid_entries() as u32;
                st.reads = ram.reads();
                ("mapped".into(), layout_summary(layout))
            }
        };
        st
    }

    fn kvm_status(&self) -> KvmStatus {
        let (state, error, vm) = match (self.spec.kvm, &self.kvm_stats) {
            (None, _) => ("unknown", None, Default::default()),
            (Some(false), _) => ("not_kvm", None, Default::default()),
            (Some(true), None) => ("waiting", None, Default::default()),
            (Some(true), Some(Ok(k))) => ("read", None, k.vm.clone()),
            (Some(true), Some(Err(e))) => ("error", Some(e.clone()), Default::default()),
        };
        KvmStatus {
            state: state.into(),
            error,
            vm,
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
        self.ctl.host_member()
    }

    /// Threads this VM has boosted after its last step.
    pub fn boosted_threads(&self) -> u64 {
        self.ctl.boosted_threads()
    }
}

/// `3 RAM range(s) of ram (3071 MiB)`: what a layout maps, for logs and the status.
fn layout_summary(layout: &RamLayout) -> String {
    let ids: Vec<&str> = layout.backends.iter().map(|b| b.id.as_str()).collect();
    format!(
        "{} RAM range(s) of {} ({} MiB)",
        layout.ranges.len(),
        ids.join(", "),
        layout.covered_bytes() >> 20
    )
}

fn shared_file_error(e: SharedFileError) -> VmError {
    match e {
        SharedFileError::Refused(r) => VmError::Refused(r),
        SharedFileError::Io { what, source } => VmError::Open { what, source },
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
        if !check_path || self.channel.is_some() {
            // A doorbell VM's memfd is sealed and has no path.
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
