//! Validated domain types decoded from local copies of the shared page.
//!
//! Guest-written bytes are hostile: every value is checked, out-of-range
//! values are clamped or dropped, and each bad field is reported so the host
//! can count invalid writes per guest. Decoding never fails and never panics.

use crate::raw::*;

/// Most interrupt nesting a guest can plausibly report.
pub const MAX_IRQ_DEPTH: u8 = 8;
/// Most critical-section nesting a guest can plausibly report.
pub const MAX_CS_DEPTH: u32 = 256;
/// Most RT tasks a guest can report as pending on one vCPU.
pub const MAX_RT_PENDING: u32 = 1 << 16;
/// Highest Linux RT priority.
pub const MAX_RT_PRIO: u8 = 99;

/// A guest task's scheduling policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SchedPolicy {
    /// `SCHED_NORMAL` (`SCHED_OTHER`).
    #[default]
    Normal,
    /// `SCHED_FIFO`.
    Fifo,
    /// `SCHED_RR`.
    Rr,
    /// `SCHED_BATCH`.
    Batch,
    /// `SCHED_IDLE`.
    Idle,
    /// `SCHED_DEADLINE`.
    Deadline,
}

impl SchedPolicy {
    /// Decodes a `SCHED_*` value.
    pub fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            PVSCHED_POLICY_NORMAL => SchedPolicy::Normal,
            PVSCHED_POLICY_FIFO => SchedPolicy::Fifo,
            PVSCHED_POLICY_RR => SchedPolicy::Rr,
            PVSCHED_POLICY_BATCH => SchedPolicy::Batch,
            PVSCHED_POLICY_IDLE => SchedPolicy::Idle,
            PVSCHED_POLICY_DEADLINE => SchedPolicy::Deadline,
            _ => return None,
        })
    }

    /// The `SCHED_*` value.
    pub fn to_raw(self) -> u8 {
        match self {
            SchedPolicy::Normal => PVSCHED_POLICY_NORMAL,
            SchedPolicy::Fifo => PVSCHED_POLICY_FIFO,
            SchedPolicy::Rr => PVSCHED_POLICY_RR,
            SchedPolicy::Batch => PVSCHED_POLICY_BATCH,
            SchedPolicy::Idle => PVSCHED_POLICY_IDLE,
            SchedPolicy::Deadline => PVSCHED_POLICY_DEADLINE,
        }
    }

    /// FIFO, RR or DEADLINE: classes above the fair class.
    pub fn is_realtime(self) -> bool {
        matches!(
            self,
            SchedPolicy::Fifo | SchedPolicy::Rr | SchedPolicy::Deadline
        )
    }
}

/// Reasons a guest gives with an explicit boost request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RequestReasons(pub u8);

impl RequestReasons {
    /// Latency-sensitive task.
    pub const LATENCY: Self = Self(PVSCHED_REASON_LATENCY);
    /// Critical section.
    pub const CRITICAL: Self = Self(PVSCHED_REASON_CRITICAL);
    /// Interrupt work.
    pub const IRQ: Self = Self(PVSCHED_REASON_IRQ);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// An explicit request from the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BoostRequest {
    /// No request.
    #[default]
    None,
    /// Boost, at the given guest RT priority, for the given reasons.
    Boost {
        /// Guest RT priority (1..=99) the request asks for.
        prio: u8,
        /// Why.
        reasons: RequestReasons,
    },
    /// Priority work is done; unboost.
    Unboost,
}

/// The running task as the guest reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TaskInfo {
    /// Scheduling policy.
    pub policy: SchedPolicy,
    /// RT priority (0 unless the policy is FIFO or RR).
    pub rt_prio: u8,
    /// Nice value (-20..=19).
    pub nice: i8,
}

/// A validated copy of one vCPU's guest line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuestVcpuState {
    /// Guest CPU id the guest says owns the slot.
    pub cpu_id: u32,
    /// Guest APIC id.
    pub apic_id: u32,
    /// The guest keeps this slot current.
    pub online: bool,
    /// The vCPU is idle (halting or halted).
    pub idle: bool,
    /// Per-vCPU heartbeat.
    pub updates: u64,
    /// Running task.
    pub task: TaskInfo,
    /// Hard-interrupt depth.
    pub irq_depth: u8,
    /// Softirq depth.
    pub softirq_depth: u8,
    /// Explicit request.
    pub request: BoostRequest,
    /// Highest priority among pending RT tasks (0 if unknown).
    pub pending_prio: u8,
    /// RT tasks runnable but not running here.
    pub rt_pending: u32,
    /// Critical-section depth.
    pub cs_depth: u32,
    /// Critical-section entries (monotonic counter, may wrap).
    pub cs_count: u64,
    /// Interrupts handled (monotonic counter, may wrap).
    pub irq_count: u64,
    /// Lock-spin episodes (monotonic counter, may wrap).
    pub spin_count: u32,
}

impl GuestVcpuState {
    /// An online vCPU that asks for a latency boost at guest RT priority
    /// `prio`, or asks for nothing with `None`: what a guest writes, for
    /// tests, benchmarks and simulation.
    pub fn requesting(cpu_id: u32, prio: Option<u8>, updates: u64) -> Self {
        GuestVcpuState {
            cpu_id,
            online: true,
            updates,
            request: prio.map_or(BoostRequest::None, |prio| BoostRequest::Boost {
                prio,
                reasons: RequestReasons::LATENCY,
            }),
            ..Default::default()
        }
    }
}

macro_rules! field_bits {
    ($(#[$m:meta] $name:ident = $bit:expr,)*) => {
        impl InvalidFields {
            $(#[$m] pub const $name: Self = Self(1 << $bit);)*
            /// Names of the fields, by bit.
            pub const NAMES: &'static [(&'static str, InvalidFields)] = &[$((stringify!($name), Self::$name)),*];
        }
    };
}

/// Which fields of a guest line were invalid (clamped or dropped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InvalidFields(pub u32);

field_bits! {
    /// Unknown flag bits.
    FLAGS = 0,
    /// Unknown task policy.
    TASK_POLICY = 1,
    /// RT priority out of range or set for a non-RT policy.
    TASK_RT_PRIO = 2,
    /// Nice out of range.
    TASK_NICE = 3,
    /// Interrupt depth too deep.
    IRQ_DEPTH = 4,
    /// Softirq depth too deep.
    SOFTIRQ_DEPTH = 5,
    /// Unknown request.
    BOOST_REQUEST = 6,
    /// Request priority out of range.
    REQUEST_PRIO = 7,
    /// Unknown request reason bits.
    REQUEST_REASON = 8,
    /// Pending priority out of range.
    PENDING_PRIO = 9,
    /// Too many pending RT tasks.
    RT_PENDING = 10,
    /// Critical-section depth too deep.
    CS_DEPTH = 11,
    /// Reserved bytes not zero.
    RESERVED = 12,
    /// The line never settled (writer mid-update on every attempt).
    TORN = 13,
    /// The slot's CPU id is not the slot index.
    CPU_ID = 14,
}

impl InvalidFields {
    /// No invalid field.
    pub const NONE: Self = Self(0);

    /// Whether no field was invalid.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether `other`'s bits are all set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Adds `other`'s bits.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Names of the invalid fields.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .iter()
            .filter(move |(_, bit)| self.contains(*bit))
            .map(|(name, _)| *name)
    }
}

/// Running counts of invalid fields, per field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InvalidCounts {
    counts: [u64; 15],
}

impl InvalidCounts {
    /// Counts one decode's invalid fields.
    pub fn record(&mut self, invalid: InvalidFields) {
        for (i, count) in self.counts.iter_mut().enumerate() {
            if invalid.0 & (1 << i) != 0 {
                *count += 1;
            }
        }
    }

    /// Total invalid fields seen.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Count for one field.
    pub fn get(&self, field: InvalidFields) -> u64 {
        self.counts
            .iter()
            .enumerate()
            .filter(|(i, _)| field.0 & (1 << i) != 0)
            .map(|(_, c)| *c)
            .sum()
    }
}

fn clamp_prio(raw: u8, bad: &mut InvalidFields, bit: InvalidFields) -> u8 {
    if raw > MAX_RT_PRIO {
        bad.insert(bit);
        MAX_RT_PRIO
    } else {
        raw
    }
}

/// Decodes and validates a local copy of a guest line.
///
/// The result is always safe to act on; the second value names what was
/// wrong with the input.
pub fn decode_guest_line(raw: &PvschedGuestLine) -> (GuestVcpuState, InvalidFields) {
    let mut bad = InvalidFields::NONE;

    if raw.flags & !PVSCHED_GUEST_FLAGS_KNOWN != 0 {
        bad.insert(InvalidFields::FLAGS);
    }
    let policy = SchedPolicy::from_raw(raw.task_policy).unwrap_or_else(|| {
        bad.insert(InvalidFields::TASK_POLICY);
        SchedPolicy::Normal
    });
    let rt_prio = match policy {
        SchedPolicy::Fifo | SchedPolicy::Rr => {
            if raw.task_rt_prio == 0 || raw.task_rt_prio > MAX_RT_PRIO {
                bad.insert(InvalidFields::TASK_RT_PRIO);
            }
            raw.task_rt_prio.clamp(1, MAX_RT_PRIO)
        }
        _ => {
            if raw.task_rt_prio != 0 {
                bad.insert(InvalidFields::TASK_RT_PRIO);
            }
            0
        }
    };
    if !(-20..=19).contains(&raw.task_nice) {
        bad.insert(InvalidFields::TASK_NICE);
    }
    let nice = raw.task_nice.clamp(-20, 19);
    if raw.irq_depth > MAX_IRQ_DEPTH {
        bad.insert(InvalidFields::IRQ_DEPTH);
    }
    if raw.softirq_depth > MAX_IRQ_DEPTH {
        bad.insert(InvalidFields::SOFTIRQ_DEPTH);
    }
    if raw.request_reason & !PVSCHED_REASONS_KNOWN != 0 {
        bad.insert(InvalidFields::REQUEST_REASON);
    }
    let request = match raw.boost_request {
        PVSCHED_REQUEST_NONE => BoostRequest::None,
        PVSCHED_REQUEST_BOOST => {
            if raw.request_prio == 0 || raw.request_prio > MAX_RT_PRIO {
                bad.insert(InvalidFields::REQUEST_PRIO);
            }
            BoostRequest::Boost {
                prio: raw.request_prio.clamp(1, MAX_RT_PRIO),
                reasons: RequestReasons(raw.request_reason & PVSCHED_REASONS_KNOWN),
            }
        }
        PVSCHED_REQUEST_UNBOOST => BoostRequest::Unboost,
        _ => {
            bad.insert(InvalidFields::BOOST_REQUEST);
            BoostRequest::None
        }
    };
    if raw.rt_pending > MAX_RT_PENDING {
        bad.insert(InvalidFields::RT_PENDING);
    }
    if raw.cs_depth > MAX_CS_DEPTH {
        bad.insert(InvalidFields::CS_DEPTH);
    }
    if raw.reserved != [0; 3] {
        bad.insert(InvalidFields::RESERVED);
    }

    let state = GuestVcpuState {
        cpu_id: raw.cpu_id,
        apic_id: raw.apic_id,
        online: raw.flags & PVSCHED_GUEST_FLAG_ONLINE != 0,
        idle: raw.flags & PVSCHED_GUEST_FLAG_IDLE != 0,
        updates: raw.updates,
        task: TaskInfo {
            policy,
            rt_prio,
            nice,
        },
        irq_depth: raw.irq_depth.min(MAX_IRQ_DEPTH),
        softirq_depth: raw.softirq_depth.min(MAX_IRQ_DEPTH),
        request,
        pending_prio: clamp_prio(raw.pending_prio, &mut bad, InvalidFields::PENDING_PRIO),
        rt_pending: raw.rt_pending.min(MAX_RT_PENDING),
        cs_depth: raw.cs_depth.min(MAX_CS_DEPTH),
        cs_count: raw.cs_count,
        irq_count: raw.irq_count,
        spin_count: raw.spin_count,
    };
    (state, bad)
}

/// Encodes a guest state into a raw line (what a guest writes; tests and simulation).
pub fn encode_guest_line(state: &GuestVcpuState) -> PvschedGuestLine {
    let (boost_request, request_prio, request_reason) = match state.request {
        BoostRequest::None => (PVSCHED_REQUEST_NONE, 0, 0),
        BoostRequest::Boost { prio, reasons } => (PVSCHED_REQUEST_BOOST, prio, reasons.0),
        BoostRequest::Unboost => (PVSCHED_REQUEST_UNBOOST, 0, 0),
    };
    let mut flags = 0;
    if state.online {
        flags |= PVSCHED_GUEST_FLAG_ONLINE;
    }
    if state.idle {
        flags |= PVSCHED_GUEST_FLAG_IDLE;
    }
    PvschedGuestLine {
        seq: 0,
        cpu_id: state.cpu_id,
        apic_id: state.apic_id,
        flags,
        updates: state.updates,
        task_policy: state.task.policy.to_raw(),
        task_rt_prio: state.task.rt_prio,
        task_nice: state.task.nice,
        irq_depth: state.irq_depth,
        softirq_depth: state.softirq_depth,
        boost_request,
        request_prio,
        pending_prio: state.pending_prio,
        rt_pending: state.rt_pending,
        cs_depth: state.cs_depth,
        cs_count: state.cs_count,
        irq_count: state.irq_count,
        spin_count: state.spin_count,
        request_reason,
        reserved: [0; 3],
    }
}

/// The boost state the host publishes for a vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BoostState {
    /// Normal scheduling class.
    #[default]
    Normal,
    /// Boosted to a real-time class.
    Boosted,
    /// Throttled: boosts are refused until the throttle ends.
    Throttled,
}

impl BoostState {
    /// The `PVSCHED_BOOST_*` value.
    pub fn to_raw(self) -> u8 {
        match self {
            BoostState::Normal => PVSCHED_BOOST_NORMAL,
            BoostState::Boosted => PVSCHED_BOOST_BOOSTED,
            BoostState::Throttled => PVSCHED_BOOST_THROTTLED,
        }
    }

    /// Decodes a `PVSCHED_BOOST_*` value.
    pub fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            PVSCHED_BOOST_NORMAL => BoostState::Normal,
            PVSCHED_BOOST_BOOSTED => BoostState::Boosted,
            PVSCHED_BOOST_THROTTLED => BoostState::Throttled,
            _ => return None,
        })
    }
}

/// What a reader of a host line should reject (a guest tool or `abi dump`).
pub fn host_line_problems(raw: &PvschedHostLine) -> impl Iterator<Item = &'static str> {
    [
        (
            BoostState::from_raw(raw.boost_state).is_none(),
            "boost_state",
        ),
        (raw.preempted > 1, "preempted"),
        (raw.smt_sibling_busy > 1, "smt_sibling_busy"),
        (
            SchedPolicy::from_raw(raw.host_policy).is_none(),
            "host_policy",
        ),
        (raw.host_prio > MAX_RT_PRIO, "host_prio"),
        (raw.pcpu_load_permille > 1000, "pcpu_load_permille"),
        (raw.reserved0 != [0; 3], "reserved0"),
    ]
    .into_iter()
    .filter(|(bad, _)| *bad)
    .map(|(_, name)| name)
}

/// Version and size problems that make a header unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The magic number is wrong (not a pvsched region, or not initialised).
    BadMagic {
        /// What was found.
        found: u64,
    },
    /// The host wrote a major version this code does not speak.
    UnsupportedMajor {
        /// What was found.
        found: u16,
        /// What this code speaks.
        expected: u16,
    },
    /// Header or slot size is not one this version can address.
    BadGeometry {
        /// Header size found.
        header_size: u16,
        /// Slot size found.
        slot_size: u16,
    },
    /// Too many slots.
    TooManySlots {
        /// Slots found.
        found: u32,
        /// Maximum.
        max: u32,
    },
    /// The header claims more bytes than the region has, or a total that
    /// does not match its slots.
    BadSize {
        /// `total_size` found.
        total_size: u32,
        /// Size implied by the slots.
        expected: u64,
        /// Region length.
        region_len: u64,
    },
}

impl core::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HeaderError::BadMagic { found } => {
                write!(f, "bad magic {found:#018x} (expected {PVSCHED_MAGIC:#018x})")
            }
            HeaderError::UnsupportedMajor { found, expected } => {
                write!(f, "unsupported major version {found} (this side speaks {expected})")
            }
            HeaderError::BadGeometry {
                header_size,
                slot_size,
            } => write!(
                f,
                "unsupported geometry: header {header_size} bytes, slot {slot_size} bytes"
            ),
            HeaderError::TooManySlots { found, max } => {
                write!(f, "{found} slots exceed the maximum of {max}")
            }
            HeaderError::BadSize {
                total_size,
                expected,
                region_len,
            } => write!(
                f,
                "total size {total_size} does not match slots ({expected}) or region ({region_len} bytes)"
            ),
        }
    }
}

/// The geometry of a validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Host minor version.
    pub minor: u16,
    /// Number of slots.
    pub nr_slots: u32,
    /// Bytes in use.
    pub total_size: u32,
    /// Features the host offers. `PVSCHED_FEAT_DOORBELL` is dropped when the header
    /// does not describe a usable doorbell (see [`Doorbell::from_header`]).
    pub host_features: u64,
    /// The daemon's doorbell, when the host offers a usable one.
    pub doorbell: Option<Doorbell>,
    /// The CPU-info table, when the host offers a usable one.
    pub cpu_info: Option<CpuInfoTable>,
}

/// Where the CPU-info table lies in the region (`PVSCHED_FEAT_PREEMPT_COUNT_GPA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuInfoTable {
    /// Byte offset of entry 0.
    pub offset: u32,
    /// Entries: one per slot.
    pub entries: u32,
}

impl CpuInfoTable {
    /// The table a host places in a region of `region_len` bytes with `nr_slots` slots:
    /// right after the slots, aligned; `None` when it does not fit.
    pub fn place(nr_slots: u32, region_len: usize) -> Option<Self> {
        let align = u64::from(PVSCHED_CPU_INFO_ALIGN);
        let offset = region_size_for(nr_slots).div_ceil(align) * align;
        Self::checked(offset, nr_slots, region_len)
    }

    fn checked(offset: u64, nr_slots: u32, region_len: usize) -> Option<Self> {
        let end = offset + u64::from(nr_slots) * u64::from(PVSCHED_CPU_INFO_SIZE);
        let valid = nr_slots > 0
            && offset % u64::from(PVSCHED_CPU_INFO_ALIGN) == 0
            && offset >= region_size_for(nr_slots)
            && end <= region_len as u64
            && offset <= u64::from(u32::MAX);
        valid.then_some(Self {
            offset: offset as u32,
            entries: nr_slots,
        })
    }

    /// The table a host header advertises: `None` without the feature or with an offset
    /// that is misaligned, overlaps the slots or runs past the region.
    pub fn from_header(host: &PvschedHeaderHost, region_len: usize) -> Option<Self> {
        if host.host_features & PVSCHED_FEAT_PREEMPT_COUNT_GPA == 0 {
            return None;
        }
        Self::checked(u64::from(host.cpu_info_offset), host.nr_slots, region_len)
    }

    /// Advertises `table` in `host` (sets or clears the feature and the offset together).
    pub fn advertise(table: Option<Self>, host: &mut PvschedHeaderHost) {
        match table {
            Some(t) => {
                host.host_features |= PVSCHED_FEAT_PREEMPT_COUNT_GPA;
                host.cpu_info_offset = t.offset;
            }
            None => {
                host.host_features &= !PVSCHED_FEAT_PREEMPT_COUNT_GPA;
                host.cpu_info_offset = 0;
            }
        }
    }

    /// Byte offset of entry `index` in the region, `None` past the table.
    pub fn entry_offset(&self, index: u32) -> Option<usize> {
        (index < self.entries)
            .then(|| self.offset as usize + index as usize * PVSCHED_CPU_INFO_SIZE as usize)
    }
}

/// Why a guest-written CPU-info entry is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuInfoError {
    /// `cpu_id` is not the entry's index.
    WrongCpu,
    /// The preempt count's address is not 4-byte aligned.
    Misaligned,
    /// The reserved word is not zero.
    Reserved,
}

impl core::fmt::Display for CpuInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::WrongCpu => "cpu_id is not the entry index",
            Self::Misaligned => "preempt_count_gpa is not 4-byte aligned",
            Self::Reserved => "reserved is not zero",
        })
    }
}

/// Decodes a local copy of CPU-info entry `index`: the guest-physical address of that
/// CPU's preempt count, `None` when the guest has not published one. The address is
/// guest-written: the reader still checks it against the guest's RAM before use.
pub fn decode_cpu_info(raw: &PvschedCpuInfo, index: u32) -> Result<Option<u64>, CpuInfoError> {
    if raw.preempt_count_gpa == 0 && raw.cpu_id == 0 && raw.reserved == 0 {
        return Ok(None);
    }
    if raw.cpu_id != index {
        return Err(CpuInfoError::WrongCpu);
    }
    if raw.reserved != 0 {
        return Err(CpuInfoError::Reserved);
    }
    if raw.preempt_count_gpa % 4 != 0 {
        return Err(CpuInfoError::Misaligned);
    }
    Ok((raw.preempt_count_gpa != 0).then_some(raw.preempt_count_gpa))
}

/// The part of a preempt count that means "preemption disabled" (preempt, softirq,
/// hardirq and NMI counts), with the bits that do not mean it masked off.
pub fn preempt_disabled_bits(raw_preempt_count: u32) -> u32 {
    raw_preempt_count & !PVSCHED_PREEMPT_COUNT_IGNORED_BITS
}

/// The daemon's end of the `ivshmem-doorbell` channel, as the host header advertises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Doorbell {
    /// The daemon's ivshmem peer id: the guest rings `peer << 16 | vector`.
    pub peer: u16,
    /// Vectors the daemon listens on, 1..=[`PVSCHED_DOORBELL_MAX_VECTORS`].
    pub vectors: u16,
}

impl Doorbell {
    /// A doorbell on `peer` with `vectors` vectors; `None` when the vector count is out of
    /// range (zero, or above [`PVSCHED_DOORBELL_MAX_VECTORS`]).
    pub fn new(peer: u16, vectors: u16) -> Option<Self> {
        (1..=PVSCHED_DOORBELL_MAX_VECTORS)
            .contains(&vectors)
            .then_some(Self { peer, vectors })
    }

    /// The doorbell a host header advertises: `None` without `PVSCHED_FEAT_DOORBELL` or
    /// with an out-of-range vector count (the feature is then unusable and is refused,
    /// the rest of the header stays valid).
    pub fn from_header(host: &PvschedHeaderHost) -> Option<Self> {
        if host.host_features & PVSCHED_FEAT_DOORBELL == 0 {
            return None;
        }
        Self::new(host.doorbell_peer, host.doorbell_vectors)
    }

    /// Advertises `doorbell` in `host` (sets or clears `PVSCHED_FEAT_DOORBELL` and the
    /// peer and vector fields together).
    pub fn advertise(doorbell: Option<Self>, host: &mut PvschedHeaderHost) {
        match doorbell {
            Some(d) => {
                host.host_features |= PVSCHED_FEAT_DOORBELL;
                host.doorbell_peer = d.peer;
                host.doorbell_vectors = d.vectors;
            }
            None => {
                host.host_features &= !PVSCHED_FEAT_DOORBELL;
                host.doorbell_peer = 0;
                host.doorbell_vectors = 0;
            }
        }
    }
}

/// The guest's doorbell counters from the guest half of the header. Monotonic while one
/// guest attach lasts, reset when the guest attaches again; they may wrap. The guest
/// writes them, so they are statistics only, never a reason to act.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuestDoorbellCounters {
    /// Rings sent to the daemon.
    pub rung: u64,
    /// Rings not sent: rate-limited, or not needed.
    pub suppressed: u64,
    /// Doorbell interrupts received from the daemon.
    pub host_interrupts: u64,
}

impl GuestDoorbellCounters {
    /// Reads the counters of a local copy of the guest header line.
    pub fn from_header(guest: &PvschedHeaderGuest) -> Self {
        Self {
            rung: guest.doorbells_rung,
            suppressed: guest.doorbells_suppressed,
            host_interrupts: guest.host_interrupts,
        }
    }
}

/// Validates the host line of a header against the region it came from.
pub fn validate_header(
    host: &PvschedHeaderHost,
    region_len: usize,
) -> Result<Geometry, HeaderError> {
    if host.magic != PVSCHED_MAGIC {
        return Err(HeaderError::BadMagic { found: host.magic });
    }
    if host.version_major != PVSCHED_VERSION_MAJOR {
        return Err(HeaderError::UnsupportedMajor {
            found: host.version_major,
            expected: PVSCHED_VERSION_MAJOR,
        });
    }
    // Later minors may only grow the header or slots; this code addresses
    // exactly this minor's layout, so the sizes must match it.
    if u32::from(host.header_size) != PVSCHED_HEADER_SIZE
        || u32::from(host.slot_size) != PVSCHED_SLOT_SIZE
    {
        return Err(HeaderError::BadGeometry {
            header_size: host.header_size,
            slot_size: host.slot_size,
        });
    }
    if host.nr_slots > PVSCHED_MAX_SLOTS {
        return Err(HeaderError::TooManySlots {
            found: host.nr_slots,
            max: PVSCHED_MAX_SLOTS,
        });
    }
    let expected = region_size_for(host.nr_slots);
    if u64::from(host.total_size) != expected || expected > region_len as u64 {
        return Err(HeaderError::BadSize {
            total_size: host.total_size,
            expected,
            region_len: region_len as u64,
        });
    }
    let doorbell = Doorbell::from_header(host);
    let cpu_info = CpuInfoTable::from_header(host, region_len);
    let mut host_features = host.host_features;
    if doorbell.is_none() {
        host_features &= !PVSCHED_FEAT_DOORBELL;
    }
    if cpu_info.is_none() {
        host_features &= !PVSCHED_FEAT_PREEMPT_COUNT_GPA;
    }
    Ok(Geometry {
        minor: host.version_minor,
        nr_slots: host.nr_slots,
        total_size: host.total_size,
        host_features,
        doorbell,
        cpu_info,
    })
}

/// Bytes a region with `nr_slots` slots uses.
pub fn region_size_for(nr_slots: u32) -> u64 {
    u64::from(PVSCHED_HEADER_SIZE) + u64::from(nr_slots) * u64::from(PVSCHED_SLOT_SIZE)
}

/// A fresh host header for `nr_slots` vCPUs. It advertises no doorbell and no CPU-info
/// table, whatever `host_features` says: [`Doorbell::advertise`] and
/// [`CpuInfoTable::advertise`] add them with their fields.
pub fn new_host_header(nr_slots: u32, host_features: u64, generation: u32) -> PvschedHeaderHost {
    PvschedHeaderHost {
        magic: PVSCHED_MAGIC,
        version_major: PVSCHED_VERSION_MAJOR,
        version_minor: PVSCHED_VERSION_MINOR,
        header_size: PVSCHED_HEADER_SIZE as u16,
        slot_size: PVSCHED_SLOT_SIZE as u16,
        total_size: region_size_for(nr_slots) as u32,
        nr_slots,
        host_features: host_features
            & PVSCHED_FEAT_KNOWN
            & !PVSCHED_FEAT_DOORBELL
            & !PVSCHED_FEAT_PREEMPT_COUNT_GPA,
        host_heartbeat: 0,
        host_generation: generation,
        host_flags: 0,
        doorbell_peer: 0,
        doorbell_vectors: 0,
        reserved0: 0,
        cpu_info_offset: 0,
        reserved1: 0,
    }
}

/// Outcome of version negotiation between host and guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Negotiation {
    /// The guest has not attached (its version is zero or its state detached).
    GuestAbsent,
    /// Both sides speak the same major version.
    Agreed {
        /// The lower of the two minor versions.
        minor: u16,
        /// Features both sides offer and this code knows.
        features: u64,
    },
}

/// The guest speaks another major version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MajorMismatch {
    /// Guest major version.
    pub guest: u16,
    /// Host major version.
    pub host: u16,
}

impl core::fmt::Display for MajorMismatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "guest speaks major version {} but the host speaks {}; refusing the guest",
            self.guest, self.host
        )
    }
}

/// Negotiates version and features from both header lines.
pub fn negotiate(
    host: &PvschedHeaderHost,
    guest: &PvschedHeaderGuest,
) -> Result<Negotiation, MajorMismatch> {
    if guest.guest_version_major == 0 || guest.guest_state != PVSCHED_GUEST_ATTACHED {
        return Ok(Negotiation::GuestAbsent);
    }
    if guest.guest_version_major != host.version_major {
        return Err(MajorMismatch {
            guest: guest.guest_version_major,
            host: host.version_major,
        });
    }
    let mut host_features = host.host_features;
    if Doorbell::from_header(host).is_none() {
        host_features &= !PVSCHED_FEAT_DOORBELL;
    }
    Ok(Negotiation::Agreed {
        minor: guest.guest_version_minor.min(host.version_minor),
        features: guest.guest_features & host_features & PVSCHED_FEAT_KNOWN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_line_decodes_without_complaint() {
        let state = GuestVcpuState {
            cpu_id: 1,
            online: true,
            task: TaskInfo {
                policy: SchedPolicy::Rr,
                rt_prio: 8,
                nice: 0,
            },
            request: BoostRequest::Boost {
                prio: 10,
                reasons: RequestReasons::LATENCY,
            },
            rt_pending: 1,
            pending_prio: 9,
            ..Default::default()
        };
        let (decoded, bad) = decode_guest_line(&encode_guest_line(&state));
        assert_eq!(bad, InvalidFields::NONE);
        assert_eq!(decoded, state);
    }

    #[test]
    fn out_of_range_values_are_clamped_and_reported() {
        let raw = PvschedGuestLine {
            flags: 0xff,
            task_policy: 1,
            task_rt_prio: 200,
            task_nice: 100,
            irq_depth: 250,
            boost_request: 9,
            rt_pending: u32::MAX,
            cs_depth: u32::MAX,
            reserved: [1, 0, 0],
            ..Default::default()
        };
        let (s, bad) = decode_guest_line(&raw);
        assert_eq!(s.task.rt_prio, 99);
        assert_eq!(s.task.nice, 19);
        assert_eq!(s.irq_depth, MAX_IRQ_DEPTH);
        assert_eq!(s.request, BoostRequest::None);
        assert_eq!(s.rt_pending, MAX_RT_PENDING);
        assert_eq!(s.cs_depth, MAX_CS_DEPTH);
        for bit in [
            InvalidFields::FLAGS,
            InvalidFields::TASK_RT_PRIO,
            InvalidFields::TASK_NICE,
            InvalidFields::IRQ_DEPTH,
            InvalidFields::BOOST_REQUEST,
            InvalidFields::RT_PENDING,
            InvalidFields::CS_DEPTH,
            InvalidFields::RESERVED,
        ] {
            assert!(bad.contains(bit), "{bit:?} not reported");
        }
        let mut counts = InvalidCounts::default();
        counts.record(bad);
        counts.record(InvalidFields::FLAGS);
        assert_eq!(counts.get(InvalidFields::FLAGS), 2);
        assert_eq!(counts.total(), 9);
    }

    #[test]
    fn rt_priority_on_a_fair_task_is_dropped() {
        let raw = PvschedGuestLine {
            task_policy: PVSCHED_POLICY_NORMAL,
            task_rt_prio: 50,
            ..Default::default()
        };
        let (s, bad) = decode_guest_line(&raw);
        assert_eq!(s.task.rt_prio, 0);
        assert!(bad.contains(InvalidFields::TASK_RT_PRIO));
    }

    #[test]
    fn header_validation_checks_magic_version_and_size() {
        let good = new_host_header(4, PVSCHED_FEAT_KNOWN, 1);
        let len = region_size_for(4) as usize;
        assert_eq!(validate_header(&good, len).unwrap().nr_slots, 4);
        assert!(matches!(
            validate_header(&PvschedHeaderHost { magic: 1, ..good }, len),
            Err(HeaderError::BadMagic { found: 1 })
        ));
        assert!(matches!(
            validate_header(
                &PvschedHeaderHost {
                    version_major: 2,
                    ..good
                },
                len
            ),
            Err(HeaderError::UnsupportedMajor {
                found: 2,
                expected: 1
            })
        ));
        assert!(matches!(
            validate_header(&good, len - 1),
            Err(HeaderError::BadSize { .. })
        ));
        assert!(matches!(
            validate_header(
                &PvschedHeaderHost {
                    nr_slots: 5,
                    ..good
                },
                1 << 20
            ),
            Err(HeaderError::BadSize { .. })
        ));
        assert!(matches!(
            validate_header(
                &PvschedHeaderHost {
                    nr_slots: u32::MAX,
                    ..good
                },
                1 << 20
            ),
            Err(HeaderError::TooManySlots { .. })
        ));
    }

    #[test]
    fn doorbell_is_advertised_with_its_peer_and_a_bounded_vector_count() {
        let len = region_size_for(2) as usize;
        let mut host = new_host_header(2, PVSCHED_FEAT_KNOWN, 1);
        assert_eq!(host.host_features & PVSCHED_FEAT_DOORBELL, 0);
        assert_eq!(validate_header(&host, len).unwrap().doorbell, None);

        let doorbell = Doorbell::new(3, 1).expect("one vector is valid");
        Doorbell::advertise(Some(doorbell), &mut host);
        let geometry = validate_header(&host, len).unwrap();
        assert_eq!(geometry.doorbell, Some(doorbell));
        assert_ne!(geometry.host_features & PVSCHED_FEAT_DOORBELL, 0);
        let bytes = host.to_bytes();
        assert_eq!(&bytes[48..52], &[3, 0, 1, 0]);

        // Out-of-range vector counts are refused: the feature is dropped, the header stays.
        for vectors in [0, PVSCHED_DOORBELL_MAX_VECTORS + 1, u16::MAX] {
            assert_eq!(Doorbell::new(3, vectors), None);
            let bad = PvschedHeaderHost {
                doorbell_vectors: vectors,
                ..host
            };
            let geometry = validate_header(&bad, len).expect("header still valid");
            assert_eq!(geometry.doorbell, None);
            assert_eq!(geometry.host_features & PVSCHED_FEAT_DOORBELL, 0);
            assert_eq!(
                geometry.host_features,
                host.host_features & !PVSCHED_FEAT_DOORBELL
            );
        }
        // Peer and vectors without the feature bit describe no doorbell.
        let no_feature = PvschedHeaderHost {
            host_features: host.host_features & !PVSCHED_FEAT_DOORBELL,
            ..host
        };
        assert_eq!(Doorbell::from_header(&no_feature), None);

        Doorbell::advertise(None, &mut host);
        assert_eq!(
            (
                host.doorbell_peer,
                host.doorbell_vectors,
                host.host_features & PVSCHED_FEAT_DOORBELL
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn guest_doorbell_counters_come_from_the_guest_header() {
        let guest = PvschedHeaderGuest {
            doorbells_rung: 5,
            doorbells_suppressed: 7,
            host_interrupts: 2,
            ..Default::default()
        };
        let bytes = guest.to_bytes();
        assert_eq!(bytes[32], 5);
        assert_eq!(bytes[40], 7);
        assert_eq!(bytes[48], 2);
        assert_eq!(
            GuestDoorbellCounters::from_header(&PvschedHeaderGuest::from_bytes(&bytes)),
            GuestDoorbellCounters {
                rung: 5,
                suppressed: 7,
                host_interrupts: 2
            }
        );
    }

    #[test]
    fn negotiation_intersects_features_and_refuses_other_majors() {
        let host = new_host_header(2, PVSCHED_FEAT_BOOST | PVSCHED_FEAT_STEAL, 1);
        let mut guest = PvschedHeaderGuest::default();
        assert_eq!(negotiate(&host, &guest), Ok(Negotiation::GuestAbsent));
        guest.guest_version_major = 1;
        guest.guest_version_minor = 3;
        guest.guest_state = PVSCHED_GUEST_ATTACHED;
        guest.guest_features = PVSCHED_FEAT_BOOST | PVSCHED_FEAT_IRQ | (1 << 60);
        assert_eq!(
            negotiate(&host, &guest),
            Ok(Negotiation::Agreed {
                minor: PVSCHED_VERSION_MINOR,
                features: PVSCHED_FEAT_BOOST
            })
        );
        // A doorbell both sides offer is agreed only when the host's is usable.
        let mut host = host;
        guest.guest_features |= PVSCHED_FEAT_DOORBELL;
        Doorbell::advertise(Doorbell::new(0, 1), &mut host);
        assert_eq!(
            negotiate(&host, &guest),
            Ok(Negotiation::Agreed {
                minor: PVSCHED_VERSION_MINOR,
                features: PVSCHED_FEAT_BOOST | PVSCHED_FEAT_DOORBELL
            })
        );
        host.doorbell_vectors = 0;
        assert_eq!(
            negotiate(&host, &guest),
            Ok(Negotiation::Agreed {
                minor: PVSCHED_VERSION_MINOR,
                features: PVSCHED_FEAT_BOOST
            })
        );
        guest.guest_version_major = 2;
        assert_eq!(
            negotiate(&host, &guest),
            Err(MajorMismatch { guest: 2, host: 1 })
        );
    }

    #[test]
    fn cpu_info_table_is_placed_after_the_slots_and_only_when_it_fits() {
        let table = CpuInfoTable::place(3, 1 << 20).expect("fits");
        assert_eq!(table.offset, 512);
        assert_eq!(table.entry_offset(2), Some(512 + 32));
        assert_eq!(table.entry_offset(3), None);
        assert_eq!(CpuInfoTable::place(3, 512 + 47), None);
        assert_eq!(CpuInfoTable::place(0, 1 << 20), None);

        let mut host = new_host_header(3, PVSCHED_FEAT_KNOWN, 1);
        assert_eq!(host.host_features & PVSCHED_FEAT_PREEMPT_COUNT_GPA, 0);
        CpuInfoTable::advertise(Some(table), &mut host);
        let geometry = validate_header(&host, 1 << 20).expect("valid");
        assert_eq!(geometry.cpu_info, Some(table));
        assert_ne!(geometry.host_features & PVSCHED_FEAT_PREEMPT_COUNT_GPA, 0);

        // An offset inside the slots, misaligned, or past the region drops the feature.
        for bad in [256, 513, 1 << 20] {
            host.cpu_info_offset = bad;
            let geometry = validate_header(&host, 1 << 20).expect("rest stays valid");
            assert_eq!(geometry.cpu_info, None, "offset {bad}");
            assert_eq!(geometry.host_features & PVSCHED_FEAT_PREEMPT_COUNT_GPA, 0);
        }
        CpuInfoTable::advertise(None, &mut host);
        assert_eq!(host.cpu_info_offset, 0);
    }

    #[test]
    fn cpu_info_entries_are_checked_before_use() {
        let entry = |gpa, cpu_id, reserved| PvschedCpuInfo {
            preempt_count_gpa: gpa,
            cpu_id,
            reserved,
        };
        assert_eq!(decode_cpu_info(&entry(0, 0, 0), 5), Ok(None));
        assert_eq!(
            decode_cpu_info(&entry(0x1_0000, 5, 0), 5),
            Ok(Some(0x1_0000))
        );
        assert_eq!(
            decode_cpu_info(&entry(0x1_0000, 4, 0), 5),
            Err(CpuInfoError::WrongCpu)
        );
        assert_eq!(
            decode_cpu_info(&entry(0x1_0002, 5, 0), 5),
            Err(CpuInfoError::Misaligned)
        );
        assert_eq!(
            decode_cpu_info(&entry(0x1_0000, 5, 9), 5),
            Err(CpuInfoError::Reserved)
        );
        assert_eq!(preempt_disabled_bits(0x8000_0000), 0);
        assert_eq!(preempt_disabled_bits(0x0000_0001), 1);
        assert_eq!(preempt_disabled_bits(0x0001_0000), 0x1_0000);
    }
}
