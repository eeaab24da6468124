//! The raw `#[repr(C)]` layout of the shared page: the single source of truth
//! for both sides. `guest/kmod/pvsched_abi.h` is generated from this file.
//!
//! The region starts with a 128-byte header (a host-written line, then a
//! guest-written line), followed by `nr_slots` slots of 128 bytes, one per
//! vCPU: a guest-written line, then a host-written line. Every line is 64
//! bytes so the two writers never share a cache line. When the host offers
//! `PVSCHED_FEAT_PREEMPT_COUNT_GPA`, a guest-written CPU-info table of `nr_slots`
//! 16-byte entries follows the slots at `cpu_info_offset`.
//!
//! Rust code never creates references into shared memory with these types;
//! they describe the layout (offsets are asserted at compile time) and are
//! used for local copies.

/// "PVSCHED1" read as a little-endian u64.
pub const PVSCHED_MAGIC: u64 = 0x3144_4548_4353_5650;
/// Major version: a guest with another major version is refused.
pub const PVSCHED_VERSION_MAJOR: u16 = 1;
/// Minor version: additions that keep the layout of earlier minors.
///
/// 1: the doorbell (`PVSCHED_FEAT_DOORBELL`, the daemon's ivshmem peer id and vector
/// count in the host header, the guest's doorbell counters in the guest header).
/// 2: the CPU-info table (`PVSCHED_FEAT_PREEMPT_COUNT_GPA`, `cpu_info_offset` in the
/// host header): the guest publishes where each CPU's preempt count lives in guest RAM.
pub const PVSCHED_VERSION_MINOR: u16 = 2;
/// Size of the header in bytes.
pub const PVSCHED_HEADER_SIZE: u32 = 128;
/// Size of one vCPU slot in bytes.
pub const PVSCHED_SLOT_SIZE: u32 = 128;
/// Size of one line (the unit each side writes).
pub const PVSCHED_LINE_SIZE: u32 = 64;
/// Upper bound on slots, so a corrupt header cannot make a reader walk far.
pub const PVSCHED_MAX_SLOTS: u32 = 4096;

/// Feature: host boosts vCPU threads from guest hints.
pub const PVSCHED_FEAT_BOOST: u64 = 1 << 0;
/// Feature: guest publishes running-task class and priority.
pub const PVSCHED_FEAT_TASK_INFO: u64 = 1 << 1;
/// Feature: guest publishes RT-pending counts and priority.
pub const PVSCHED_FEAT_RT_PENDING: u64 = 1 << 2;
/// Feature: guest publishes interrupt and softirq depth and counts.
pub const PVSCHED_FEAT_IRQ: u64 = 1 << 3;
/// Feature: guest publishes critical-section depth and counts.
pub const PVSCHED_FEAT_CRITICAL_SECTION: u64 = 1 << 4;
/// Feature: guest may write explicit boost/unboost requests.
pub const PVSCHED_FEAT_BOOST_REQUEST: u64 = 1 << 5;
/// Feature: host publishes steal / run-delay time.
pub const PVSCHED_FEAT_STEAL: u64 = 1 << 6;
/// Feature: host publishes pCPU id, load and SMT-sibling state.
pub const PVSCHED_FEAT_PCPU_INFO: u64 = 1 << 7;
/// Feature: host publishes the vCPU-preempted flag.
pub const PVSCHED_FEAT_PREEMPTED: u64 = 1 << 8;
/// Feature: guest publishes lock-spin counts (directed boost of holders).
pub const PVSCHED_FEAT_SPIN: u64 = 1 << 9;
/// Feature: host publishes a guest halt-poll window hint.
pub const PVSCHED_FEAT_POLL_HINT: u64 = 1 << 10;
/// Feature: the daemon serves QEMU's `ivshmem-doorbell` device and listens for rings
/// from the guest on peer `doorbell_peer`, vectors `0..doorbell_vectors`; the guest rings
/// only when the host must act now. Host side: set together with those two fields.
pub const PVSCHED_FEAT_DOORBELL: u64 = 1 << 11;
/// Feature: the guest publishes, in the CPU-info table at `cpu_info_offset`, the
/// guest-physical address of each CPU's preempt count, so a host that maps the guest's
/// RAM (a shared memory backend) can read it without any guest cost. Host side: set
/// together with a non-zero `cpu_info_offset`.
pub const PVSCHED_FEAT_PREEMPT_COUNT_GPA: u64 = 1 << 12;
/// Every feature bit this version knows.
pub const PVSCHED_FEAT_KNOWN: u64 = (1 << 13) - 1;

/// Size of one CPU-info entry in bytes.
pub const PVSCHED_CPU_INFO_SIZE: u32 = 16;
/// Alignment of the CPU-info table's offset in the region.
pub const PVSCHED_CPU_INFO_ALIGN: u32 = 64;
/// Bits of an x86 preempt count that do not mean "preemption disabled": the folded,
/// inverted need-resched bit (`PREEMPT_NEED_RESCHED`). A reader masks them off.
pub const PVSCHED_PREEMPT_COUNT_IGNORED_BITS: u32 = 0x8000_0000;

/// Most doorbell vectors a daemon may advertise (the ivshmem server's own limit).
pub const PVSCHED_DOORBELL_MAX_VECTORS: u16 = 64;

/// Guest line flag: the vCPU is idle (about to halt or halted).
pub const PVSCHED_GUEST_FLAG_IDLE: u32 = 1 << 0;
/// Guest line flag: the guest has attached this slot and keeps it current.
pub const PVSCHED_GUEST_FLAG_ONLINE: u32 = 1 << 1;
/// Every guest flag bit this version knows.
pub const PVSCHED_GUEST_FLAGS_KNOWN: u32 = PVSCHED_GUEST_FLAG_IDLE | PVSCHED_GUEST_FLAG_ONLINE;

/// Linux scheduling policies as the guest reports them (`SCHED_*`).
pub const PVSCHED_POLICY_NORMAL: u8 = 0;
/// `SCHED_FIFO`.
pub const PVSCHED_POLICY_FIFO: u8 = 1;
/// `SCHED_RR`.
pub const PVSCHED_POLICY_RR: u8 = 2;
/// `SCHED_BATCH`.
pub const PVSCHED_POLICY_BATCH: u8 = 3;
/// `SCHED_IDLE`.
pub const PVSCHED_POLICY_IDLE: u8 = 5;
/// `SCHED_DEADLINE`.
pub const PVSCHED_POLICY_DEADLINE: u8 = 6;

/// Explicit request: none.
pub const PVSCHED_REQUEST_NONE: u8 = 0;
/// Explicit request: boost this vCPU.
pub const PVSCHED_REQUEST_BOOST: u8 = 1;
/// Explicit request: the priority work is done, unboost.
pub const PVSCHED_REQUEST_UNBOOST: u8 = 2;

/// Request reason: latency-sensitive task.
pub const PVSCHED_REASON_LATENCY: u8 = 1 << 0;
/// Request reason: critical section (lock held, preemption disabled).
pub const PVSCHED_REASON_CRITICAL: u8 = 1 << 1;
/// Request reason: interrupt work.
pub const PVSCHED_REASON_IRQ: u8 = 1 << 2;
/// Every request reason bit this version knows.
pub const PVSCHED_REASONS_KNOWN: u8 = (1 << 3) - 1;

/// Host line boost state: normal scheduling class.
pub const PVSCHED_BOOST_NORMAL: u8 = 0;
/// Host line boost state: boosted to a real-time class.
pub const PVSCHED_BOOST_BOOSTED: u8 = 1;
/// Host line boost state: throttled (boost refused until `throttle_until_ns`).
pub const PVSCHED_BOOST_THROTTLED: u8 = 2;

/// Header state written by the guest: not attached.
pub const PVSCHED_GUEST_DETACHED: u32 = 0;
/// Header state written by the guest: attached and publishing.
pub const PVSCHED_GUEST_ATTACHED: u32 = 1;

/// Host-written first line of the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvschedHeaderHost {
    /// `PVSCHED_MAGIC`.
    pub magic: u64,
    /// Host's major version.
    pub version_major: u16,
    /// Host's minor version.
    pub version_minor: u16,
    /// Header size in bytes (`PVSCHED_HEADER_SIZE` for this version).
    pub header_size: u16,
    /// Slot size in bytes (`PVSCHED_SLOT_SIZE` for this version).
    pub slot_size: u16,
    /// Bytes in use: header plus all slots.
    pub total_size: u32,
    /// Number of vCPU slots.
    pub nr_slots: u32,
    /// Features the host offers (`PVSCHED_FEAT_*`).
    pub host_features: u64,
    /// Incremented by the host daemon on every publish round.
    pub host_heartbeat: u64,
    /// Incremented each time a daemon (re)initialises or adopts the region.
    pub host_generation: u32,
    /// Reserved, zero.
    pub host_flags: u32,
    /// With `PVSCHED_FEAT_DOORBELL`: the daemon's ivshmem peer id, the one the guest
    /// writes into the Doorbell register (`peer << 16 | vector`). Zero otherwise.
    pub doorbell_peer: u16,
    /// With `PVSCHED_FEAT_DOORBELL`: vectors the daemon listens on
    /// (1..=`PVSCHED_DOORBELL_MAX_VECTORS`). Zero otherwise.
    pub doorbell_vectors: u16,
    /// Reserved, zero.
    pub reserved0: u32,
    /// With `PVSCHED_FEAT_PREEMPT_COUNT_GPA`: byte offset of the CPU-info table
    /// (`nr_slots` entries of `PvschedCpuInfo`), a multiple of `PVSCHED_CPU_INFO_ALIGN`
    /// at or after `total_size` and inside the region. Zero otherwise.
    pub cpu_info_offset: u32,
    /// Reserved, zero.
    pub reserved1: u32,
}

/// Guest-written second line of the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvschedHeaderGuest {
    /// Guest's major version (0 until the guest attaches).
    pub guest_version_major: u16,
    /// Guest's minor version.
    pub guest_version_minor: u16,
    /// Number of possible CPUs in the guest.
    pub guest_nr_cpus: u32,
    /// Features the guest supports (`PVSCHED_FEAT_*`).
    pub guest_features: u64,
    /// Incremented by the guest periodically (its timer tick or probes).
    pub guest_heartbeat: u64,
    /// Incremented each time the guest module attaches.
    pub guest_generation: u32,
    /// `PVSCHED_GUEST_ATTACHED` or `PVSCHED_GUEST_DETACHED`.
    pub guest_state: u32,
    /// Doorbell rings sent to the daemon since the guest attached.
    pub doorbells_rung: u64,
    /// Rings not sent since the guest attached: rate-limited, or not needed (the host
    /// line already showed the vCPU boosted, or throttled).
    pub doorbells_suppressed: u64,
    /// Doorbell interrupts (MSI-X) the guest received from the daemon since it attached.
    pub host_interrupts: u64,
    /// Reserved, zero.
    pub reserved: [u64; 1],
}

/// The header at offset 0 of the region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvschedHeader {
    /// Host-written line.
    pub host: PvschedHeaderHost,
    /// Guest-written line.
    pub guest: PvschedHeaderGuest,
}

/// Guest-written line of a vCPU slot, published under its own seqlock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvschedGuestLine {
    /// Sequence counter: odd while the guest writes the line.
    pub seq: u32,
    /// Guest CPU id that owns this slot (must equal the slot index).
    pub cpu_id: u32,
    /// Guest APIC id of that CPU.
    pub apic_id: u32,
    /// `PVSCHED_GUEST_FLAG_*`.
    pub flags: u32,
    /// Incremented on every update: a per-vCPU heartbeat.
    pub updates: u64,
    /// Running task's policy (`PVSCHED_POLICY_*`).
    pub task_policy: u8,
    /// Running task's RT priority (1..=99 for FIFO/RR, else 0).
    pub task_rt_prio: u8,
    /// Running task's nice value (-20..=19).
    pub task_nice: i8,
    /// Hard-interrupt nesting depth.
    pub irq_depth: u8,
    /// Softirq nesting depth.
    pub softirq_depth: u8,
    /// Explicit request (`PVSCHED_REQUEST_*`).
    pub boost_request: u8,
    /// RT priority the explicit request asks for (1..=99).
    pub request_prio: u8,
    /// Highest RT priority among runnable-but-waiting tasks.
    pub pending_prio: u8,
    /// RT tasks runnable on this CPU but not running.
    pub rt_pending: u32,
    /// Current critical-section nesting depth.
    pub cs_depth: u32,
    /// Critical-section entries since the guest attached.
    pub cs_count: u64,
    /// Hard interrupts handled since the guest attached.
    pub irq_count: u64,
    /// Lock-spin episodes (waiting for a lock holder) since attach.
    pub spin_count: u32,
    /// `PVSCHED_REASON_*` bits of the explicit request.
    pub request_reason: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
}

/// Host-written line of a vCPU slot, published under a seqlock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvschedHostLine {
    /// Sequence counter: odd while the host writes the line.
    pub seq: u32,
    /// Host pCPU this vCPU thread last ran on.
    pub pcpu: u32,
    /// `PVSCHED_BOOST_*`.
    pub boost_state: u8,
    /// 1 when the vCPU thread is runnable but not running on the host.
    pub preempted: u8,
    /// 1 when the SMT sibling of `pcpu` is busy.
    pub smt_sibling_busy: u8,
    /// Host policy applied to the vCPU thread (`PVSCHED_POLICY_*`).
    pub host_policy: u8,
    /// Host RT priority applied (0 when not boosted).
    pub host_prio: u8,
    /// Reserved, zero.
    pub reserved0: [u8; 3],
    /// Load of `pcpu` in permille over the last host interval.
    pub pcpu_load_permille: u32,
    /// Suggested guest halt-poll window in ns (0: do not poll).
    pub poll_hint_ns: u32,
    /// Cumulative time the vCPU thread waited to run on the host (ns).
    pub steal_ns: u64,
    /// Host monotonic time (ns) until which boosts are refused.
    pub throttle_until_ns: u64,
    /// Host monotonic time (ns) of this publish, to compare with the above.
    pub host_time_ns: u64,
    /// Boosts of this vCPU since the daemon adopted the region.
    pub boosts: u32,
    /// Throttles of this vCPU since the daemon adopted the region.
    pub throttles: u32,
    /// Cumulative boosted CPU time (ns).
    pub boosted_ns: u64,
}

/// One guest-written entry of the CPU-info table, written once when the guest attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvschedCpuInfo {
    /// Guest-physical address of this CPU's preempt count (a 4-byte, 4-aligned value;
    /// `__preempt_count` or `pcpu_hot.preempt_count` on x86). Zero: not published.
    pub preempt_count_gpa: u64,
    /// Guest CPU id that owns this entry (must equal the entry index).
    pub cpu_id: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// One vCPU slot: the guest line, then the host line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvschedSlot {
    /// Guest-written line.
    pub guest: PvschedGuestLine,
    /// Host-written line.
    pub host: PvschedHostLine,
}
