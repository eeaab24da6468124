//! Thread scheduling attributes and the [`ThreadScheduler`] trait, with the
//! real implementation (syscalls) and a fake one for tests and benchmarks.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use pvsched_policy::{DeadlineReservation, RtClass, ThreadSched};
use serde::{Deserialize, Serialize};

use crate::sys;

/// A thread id (`gettid()`), which is also a pid for the kernel's scheduling calls.
pub type Tid = i32;

/// A host scheduling policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
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
    /// `SCHED_EXT` (a BPF scheduler, Linux 6.12+): recorded and restored, never set otherwise.
    Ext,
}

impl Policy {
    /// The kernel's `SCHED_*` number.
    pub fn to_raw(self) -> u32 {
        match self {
            Policy::Normal => 0,
            Policy::Fifo => 1,
            Policy::Rr => 2,
            Policy::Batch => 3,
            Policy::Idle => 5,
            Policy::Deadline => 6,
            Policy::Ext => 7,
        }
    }

    /// Decodes a kernel `SCHED_*` number.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Policy::Normal,
            1 => Policy::Fifo,
            2 => Policy::Rr,
            3 => Policy::Batch,
            5 => Policy::Idle,
            6 => Policy::Deadline,
            7 => Policy::Ext,
            _ => return None,
        })
    }

    /// FIFO or RR.
    pub fn is_rt(self) -> bool {
        matches!(self, Policy::Fifo | Policy::Rr)
    }

    /// FIFO, RR or DEADLINE: a class above every fair thread.
    pub fn is_realtime(self) -> bool {
        self.is_rt() || self == Policy::Deadline
    }
}

/// `SCHED_FLAG_*` bits that describe a thread and are given back as read:
/// reset-on-fork and the `SCHED_DEADLINE` flags (reclaim, overrun). The
/// others are requests about the call itself (`KEEP_*`) or need a larger
/// `sched_attr` (`UTIL_CLAMP_*`); `sched_getattr` does not report them.
pub const RESTORED_FLAGS: u64 =
    sys::SCHED_FLAG_RESET_ON_FORK | sys::SCHED_FLAG_RECLAIM | sys::SCHED_FLAG_DL_OVERRUN;

/// The scheduling attributes of a thread, as recorded and restored.
///
/// Recorded whole: the flags `sched_getattr` reports and the `SCHED_DEADLINE`
/// parameters are kept, and `SCHED_EXT` and `SCHED_DEADLINE` originals are
/// accepted, so a restore gives back exactly what was read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "SchedAttrsRecord", into = "SchedAttrsRecord")]
pub struct SchedAttrs {
    /// Policy.
    pub policy: Policy,
    /// RT priority (1..=99 for FIFO/RR, else 0).
    pub priority: u8,
    /// Nice value (fair classes).
    pub nice: i8,
    /// `SCHED_FLAG_*` bits (within [`RESTORED_FLAGS`]).
    pub flags: u64,
    /// `SCHED_DEADLINE` runtime, deadline and period (ns); zero otherwise.
    pub deadline: [u64; 3],
}

/// [`SchedAttrs`] as written in the state file. Version 1 files have
/// `reset_on_fork` and no `flags`; version 2 writes both (`reset_on_fork`
/// derived from `flags`), so either daemon reads the other's file.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct SchedAttrsRecord {
    policy: Policy,
    priority: u8,
    nice: i8,
    #[serde(default)]
    reset_on_fork: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    flags: Option<u64>,
    #[serde(default)]
    deadline: [u64; 3],
}

impl From<SchedAttrsRecord> for SchedAttrs {
    fn from(r: SchedAttrsRecord) -> Self {
        let flags = r.flags.unwrap_or(if r.reset_on_fork {
            sys::SCHED_FLAG_RESET_ON_FORK
        } else {
            0
        });
        SchedAttrs {
            policy: r.policy,
            priority: r.priority,
            nice: r.nice,
            flags: flags & RESTORED_FLAGS,
            deadline: r.deadline,
        }
    }
}

impl From<SchedAttrs> for SchedAttrsRecord {
    fn from(a: SchedAttrs) -> Self {
        SchedAttrsRecord {
            policy: a.policy,
            priority: a.priority,
            nice: a.nice,
            reset_on_fork: a.reset_on_fork(),
            flags: Some(a.flags),
            deadline: a.deadline,
        }
    }
}

impl SchedAttrs {
    /// The attributes of a boost: an RT class at `prio`, reset-on-fork so
    /// children of a boosted thread never inherit the class.
    /// (`RtClass::Deadline` needs a reservation: see [`SchedAttrs::deadline`].)
    pub fn rt(class: RtClass, prio: u8) -> Self {
        SchedAttrs {
            policy: match class {
                RtClass::Fifo => Policy::Fifo,
                RtClass::Rr | RtClass::Deadline => Policy::Rr,
            },
            priority: prio,
            nice: 0,
            flags: sys::SCHED_FLAG_RESET_ON_FORK,
            deadline: [0; 3],
        }
    }

    /// A `SCHED_DEADLINE` boost with reservation `r` (deadline = period),
    /// reset-on-fork: without it the kernel refuses `fork`/`clone` of a
    /// deadline thread, and QEMU threads create threads.
    pub fn deadline(r: DeadlineReservation) -> Self {
        SchedAttrs {
            policy: Policy::Deadline,
            priority: 0,
            nice: 0,
            flags: sys::SCHED_FLAG_RESET_ON_FORK,
            deadline: [r.runtime_ns, r.period_ns, r.period_ns],
        }
    }

    /// A `SCHED_DEADLINE` reservation the kernel counts as no bandwidth at all
    /// (1024 ns per 4 s is below its fixed-point unit): the step a thread takes
    /// on its way out of `SCHED_DEADLINE`, see [`set_attrs_leaving`].
    pub fn deadline_drain() -> Self {
        SchedAttrs::deadline(DeadlineReservation {
            runtime_ns: DEADLINE_DRAIN_RUNTIME_NS,
            period_ns: DEADLINE_DRAIN_PERIOD_NS,
        })
    }

    /// Whether `SCHED_FLAG_RESET_ON_FORK` is set.
    pub fn reset_on_fork(&self) -> bool {
        self.flags & sys::SCHED_FLAG_RESET_ON_FORK != 0
    }

    /// The attributes for an engine decision, given the thread's original ones.
    pub fn for_decision(sched: ThreadSched, original: &SchedAttrs) -> Self {
        match sched {
            ThreadSched::Baseline => *original,
            ThreadSched::Rt { class, prio } => SchedAttrs::rt(class, prio),
            ThreadSched::Deadline(r) => SchedAttrs::deadline(r),
        }
    }

    /// Decodes what `sched_getattr` returned.
    pub fn from_raw(raw: &sys::SchedAttrRaw) -> Result<Self, io::Error> {
        let policy = Policy::from_raw(raw.sched_policy).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown policy {}", raw.sched_policy),
            )
        })?;
        let deadline = if policy == Policy::Deadline {
            [raw.sched_runtime, raw.sched_deadline, raw.sched_period]
        } else {
            [0; 3]
        };
        Ok(SchedAttrs {
            policy,
            priority: raw.sched_priority.min(99) as u8,
            nice: raw.sched_nice.clamp(-20, 19) as i8,
            flags: raw.sched_flags & RESTORED_FLAGS,
            deadline,
        })
    }

    /// What to pass to `sched_setattr`.
    pub fn to_raw(self) -> sys::SchedAttrRaw {
        let (runtime, deadline, period) = if self.policy == Policy::Deadline {
            (self.deadline[0], self.deadline[1], self.deadline[2])
        } else {
            (0, 0, 0)
        };
        sys::SchedAttrRaw {
            size: sys::SCHED_ATTR_SIZE_VER0,
            sched_policy: self.policy.to_raw(),
            sched_flags: self.flags & RESTORED_FLAGS,
            // The kernel reads the nice value only for fair policies; it is
            // passed always, so what was read is what is given back.
            sched_nice: i32::from(self.nice),
            sched_priority: if self.policy.is_rt() {
                u32::from(self.priority)
            } else {
                0
            },
            sched_runtime: runtime,
            sched_deadline: deadline,
            sched_period: period,
            ..Default::default()
        }
    }
}

/// Why a scheduling call failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// The thread does not exist (any more).
    #[error("{op} on thread {tid}: no such thread")]
    NoSuchThread {
        /// Operation.
        op: &'static str,
        /// Thread.
        tid: Tid,
    },
    /// Not permitted (CAP_SYS_NICE missing, or RT throttled by a cgroup).
    #[error("{op} on thread {tid}: permission denied (CAP_SYS_NICE, or RT runtime of the thread's cgroup)")]
    PermissionDenied {
        /// Operation.
        op: &'static str,
        /// Thread.
        tid: Tid,
    },
    /// Refused before any call: the thread recorded with start time
    /// `recorded` is gone (`found: None`) or its id now names another
    /// thread (`found`: that thread's start time).
    #[error("{op} on thread {tid} refused: {}", match found {
        Some(f) => format!("the id now names another thread (start time {f}, recorded {recorded})"),
        None => "the thread is gone".to_owned(),
    })]
    Replaced {
        /// Operation.
        op: &'static str,
        /// Thread.
        tid: Tid,
        /// Start time in the record.
        recorded: u64,
        /// Start time of the thread now behind the id, if any.
        found: Option<u64>,
    },
    /// Any other failure.
    #[error("{op} on thread {tid}: {source}")]
    Other {
        /// Operation.
        op: &'static str,
        /// Thread.
        tid: Tid,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl SchedError {
    fn from_io(op: &'static str, tid: Tid, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ESRCH) => SchedError::NoSuchThread { op, tid },
            Some(libc::EPERM) => SchedError::PermissionDenied { op, tid },
            _ => SchedError::Other {
                op,
                tid,
                source: err,
            },
        }
    }

    /// Whether the thread is gone (or its id names another thread now).
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            SchedError::NoSuchThread { .. } | SchedError::Replaced { .. }
        )
    }
}

/// Reads and changes the scheduling attributes and affinity of threads.
pub trait ThreadScheduler: Send {
    /// Current attributes.
    fn get_attrs(&self, tid: Tid) -> Result<SchedAttrs, SchedError>;
    /// Sets the attributes.
    fn set_attrs(&self, tid: Tid, attrs: &SchedAttrs) -> Result<(), SchedError>;
    /// Current affinity (sorted CPU numbers).
    fn get_affinity(&self, tid: Tid) -> Result<Vec<u32>, SchedError>;
    /// Sets the affinity.
    fn set_affinity(&self, tid: Tid, cpus: &[u32]) -> Result<(), SchedError>;
}

/// Runtime of [`SchedAttrs::deadline_drain`]: the kernel's minimum.
pub const DEADLINE_DRAIN_RUNTIME_NS: u64 = 1024;
/// Period of [`SchedAttrs::deadline_drain`]: long enough that the bandwidth
/// (runtime << 20 / period) is 0, within the default
/// `sched_deadline_period_max_us` (4.19 s).
pub const DEADLINE_DRAIN_PERIOD_NS: u64 = 4_000_000_000;

/// Sets `attrs` on a thread that is in `SCHED_DEADLINE` when `from_deadline`.
///
/// A thread that leaves `SCHED_DEADLINE` while it sleeps can keep its
/// bandwidth counted by admission control: on the project's host kernel
/// (6.18) every such switch leaked the whole reservation, until no deadline
/// task could be admitted on the host (`EBUSY` for everyone) and only a write
/// to `sched_rt_runtime_us` rebuilt the accounting. Shrinking the reservation
/// first to one the kernel counts as zero ([`SchedAttrs::deadline_drain`], a
/// deadline-to-deadline change that is accounted at once) leaves nothing to
/// leak; the thread holds it for the microseconds between the two calls. Should
/// the first step fail, the second is made all the same.
pub fn set_attrs_leaving(
    sched: &dyn ThreadScheduler,
    tid: Tid,
    attrs: &SchedAttrs,
    from_deadline: bool,
) -> Result<(), SchedError> {
    if from_deadline && attrs.policy != Policy::Deadline {
        let _ = sched.set_attrs(tid, &SchedAttrs::deadline_drain());
    }
    sched.set_attrs(tid, attrs)
}

/// The real thing: `sched_getattr`/`sched_setattr`/`sched_*affinity`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealScheduler;

impl ThreadScheduler for RealScheduler {
    fn get_attrs(&self, tid: Tid) -> Result<SchedAttrs, SchedError> {
        let raw =
            sys::sched_getattr(tid).map_err(|e| SchedError::from_io("sched_getattr", tid, e))?;
        SchedAttrs::from_raw(&raw).map_err(|e| SchedError::from_io("sched_getattr", tid, e))
    }

    fn set_attrs(&self, tid: Tid, attrs: &SchedAttrs) -> Result<(), SchedError> {
        let op = if attrs.policy == Policy::Deadline {
            // The two ways the kernel refuses a deadline thread that
            // other policies never meet: EPERM when the thread's affinity
            // does not span its root domain, EBUSY from admission control.
            "sched_setattr to SCHED_DEADLINE (EPERM: an affinity narrower than the root \
             domain; EBUSY: no bandwidth left under sched_rt_runtime_us)"
        } else {
            "sched_setattr"
        };
        sys::sched_setattr(tid, &attrs.to_raw()).map_err(|e| SchedError::from_io(op, tid, e))
    }

    fn get_affinity(&self, tid: Tid) -> Result<Vec<u32>, SchedError> {
        sys::sched_getaffinity(tid).map_err(|e| SchedError::from_io("sched_getaffinity", tid, e))
    }

    fn set_affinity(&self, tid: Tid, cpus: &[u32]) -> Result<(), SchedError> {
        sys::sched_setaffinity(tid, cpus)
            .map_err(|e| SchedError::from_io("sched_setaffinity", tid, e))
    }
}

/// One recorded call of the fake scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeCall {
    /// `set_attrs`.
    SetAttrs(Tid, SchedAttrs),
    /// `set_affinity`.
    SetAffinity(Tid, Vec<u32>),
}

#[derive(Debug, Default)]
struct FakeState {
    threads: BTreeMap<Tid, (SchedAttrs, Vec<u32>)>,
    calls: Vec<FakeCall>,
    deny_set: bool,
}

/// An in-memory scheduler: threads it was told about (or any thread, with
/// default attributes, when `permissive`) and a log of every change.
/// Clones share state, so a test keeps one clone to inspect.
#[derive(Clone, Debug, Default)]
pub struct FakeScheduler {
    state: Arc<Mutex<FakeState>>,
    permissive: bool,
}

impl FakeScheduler {
    /// A fake that knows only the threads added with [`FakeScheduler::add_thread`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A fake that treats every thread id as an existing `SCHED_NORMAL` thread.
    pub fn permissive() -> Self {
        FakeScheduler {
            permissive: true,
            ..Self::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a thread with given attributes, on CPUs 0..4.
    pub fn add_thread(&self, tid: Tid, attrs: SchedAttrs) {
        self.lock().threads.insert(tid, (attrs, vec![0, 1, 2, 3]));
    }

    /// Removes a thread (it exited).
    pub fn remove_thread(&self, tid: Tid) {
        self.lock().threads.remove(&tid);
    }

    /// Makes every later `set_*` fail with EPERM (or succeed again).
    pub fn deny_changes(&self, deny: bool) {
        self.lock().deny_set = deny;
    }

    /// Current attributes of a thread, if known.
    pub fn attrs(&self, tid: Tid) -> Option<SchedAttrs> {
        self.lock().threads.get(&tid).map(|t| t.0)
    }

    /// Current affinity of a thread, if known.
    pub fn affinity(&self, tid: Tid) -> Option<Vec<u32>> {
        self.lock().threads.get(&tid).map(|t| t.1.clone())
    }

    /// Every change made so far.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// Threads currently in an RT class.
    pub fn rt_threads(&self) -> Vec<Tid> {
        self.lock()
            .threads
            .iter()
            .filter(|(_, (a, _))| a.policy.is_realtime())
            .map(|(t, _)| *t)
            .collect()
    }

    fn with_thread<T>(
        &self,
        op: &'static str,
        tid: Tid,
        f: impl FnOnce(&mut (SchedAttrs, Vec<u32>)) -> T,
    ) -> Result<T, SchedError> {
        let mut state = self.lock();
        if self.permissive {
            state
                .threads
                .entry(tid)
                .or_insert_with(|| (SchedAttrs::default(), vec![0, 1, 2, 3]));
        }
        match state.threads.get_mut(&tid) {
            Some(t) => Ok(f(t)),
            None => Err(SchedError::NoSuchThread { op, tid }),
        }
    }

    fn check_allowed(&self, op: &'static str, tid: Tid) -> Result<(), SchedError> {
        if self.lock().deny_set {
            return Err(SchedError::PermissionDenied { op, tid });
        }
        Ok(())
    }
}

impl ThreadScheduler for FakeScheduler {
    fn get_attrs(&self, tid: Tid) -> Result<SchedAttrs, SchedError> {
        self.with_thread("sched_getattr", tid, |t| t.0)
    }

    fn set_attrs(&self, tid: Tid, attrs: &SchedAttrs) -> Result<(), SchedError> {
        self.check_allowed("sched_setattr", tid)?;
        self.with_thread("sched_setattr", tid, |t| t.0 = *attrs)?;
        self.lock().calls.push(FakeCall::SetAttrs(tid, *attrs));
        Ok(())
    }

    fn get_affinity(&self, tid: Tid) -> Result<Vec<u32>, SchedError> {
        self.with_thread("sched_getaffinity", tid, |t| t.1.clone())
    }

    fn set_affinity(&self, tid: Tid, cpus: &[u32]) -> Result<(), SchedError> {
        self.check_allowed("sched_setaffinity", tid)?;
        self.with_thread("sched_setaffinity", tid, |t| t.1 = cpus.to_vec())?;
        self.lock()
            .calls
            .push(FakeCall::SetAffinity(tid, cpus.to_vec()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trip_keeps_fields_that_matter() {
        for attrs in [
            SchedAttrs {
                policy: Policy::Normal,
                nice: -5,
                ..Default::default()
            },
            SchedAttrs::rt(RtClass::Rr, 7),
            SchedAttrs::rt(RtClass::Fifo, 99),
            SchedAttrs {
                policy: Policy::Deadline,
                deadline: [1, 2, 3],
                flags: sys::SCHED_FLAG_RESET_ON_FORK | sys::SCHED_FLAG_DL_OVERRUN,
                ..Default::default()
            },
            SchedAttrs {
                policy: Policy::Ext,
                nice: 4,
                flags: sys::SCHED_FLAG_RESET_ON_FORK,
                ..Default::default()
            },
            SchedAttrs {
                policy: Policy::Fifo,
                priority: 3,
                nice: -2,
                ..Default::default()
            },
        ] {
            assert_eq!(SchedAttrs::from_raw(&attrs.to_raw()).unwrap(), attrs);
        }
    }

    #[test]
    fn flags_and_sched_ext_are_read_whole_and_unknown_policies_refused() {
        let raw = sys::SchedAttrRaw {
            sched_policy: 7,
            // Reset-on-fork, and a bit sched_getattr never reports (KEEP_POLICY).
            sched_flags: sys::SCHED_FLAG_RESET_ON_FORK | 0x08,
            sched_nice: 3,
            ..Default::default()
        };
        let attrs = SchedAttrs::from_raw(&raw).unwrap();
        assert_eq!(attrs.policy, Policy::Ext);
        assert!(attrs.reset_on_fork());
        assert_eq!(attrs.flags, sys::SCHED_FLAG_RESET_ON_FORK);
        assert_eq!(attrs.to_raw().sched_flags, sys::SCHED_FLAG_RESET_ON_FORK);
        assert_eq!(attrs.to_raw().sched_policy, 7);
        let unknown = sys::SchedAttrRaw {
            sched_policy: 9,
            ..Default::default()
        };
        let err = SchedAttrs::from_raw(&unknown).unwrap_err();
        assert!(err.to_string().contains("unknown policy 9"), "{err}");
    }

    #[test]
    fn the_state_file_form_reads_version_1_and_keeps_every_flag() {
        // Version 1 wrote `reset_on_fork` and no `flags`.
        let v1: SchedAttrs = serde_json::from_str(
            r#"{"policy":"normal","priority":0,"nice":2,"reset_on_fork":true,"deadline":[0,0,0]}"#,
        )
        .unwrap();
        assert_eq!(v1.flags, sys::SCHED_FLAG_RESET_ON_FORK);
        assert_eq!(v1.nice, 2);
        let v1_plain: SchedAttrs =
            serde_json::from_str(r#"{"policy":"fifo","priority":5,"nice":0}"#).unwrap();
        assert_eq!(
            v1_plain,
            SchedAttrs {
                policy: Policy::Fifo,
                priority: 5,
                ..Default::default()
            }
        );
        let dl = SchedAttrs {
            policy: Policy::Deadline,
            flags: sys::SCHED_FLAG_RECLAIM | sys::SCHED_FLAG_DL_OVERRUN,
            deadline: [100_000, 500_000, 1_000_000],
            ..Default::default()
        };
        let text = serde_json::to_string(&dl).unwrap();
        assert!(text.contains("\"flags\":6"), "{text}");
        assert_eq!(serde_json::from_str::<SchedAttrs>(&text).unwrap(), dl);
    }

    #[test]
    fn the_same_scenario_runs_on_the_fake_and_on_the_real_scheduler_for_the_own_thread() {
        // Only unprivileged operations: read, then write back what was read.
        fn scenario(s: &dyn ThreadScheduler, tid: Tid) {
            let attrs = s.get_attrs(tid).unwrap();
            s.set_attrs(tid, &attrs).unwrap();
            assert_eq!(s.get_attrs(tid).unwrap(), attrs);
            let cpus = s.get_affinity(tid).unwrap();
            s.set_affinity(tid, &cpus).unwrap();
            assert_eq!(s.get_affinity(tid).unwrap(), cpus);
            assert!(s.get_attrs(i32::MAX).unwrap_err().is_gone());
        }
        let fake = FakeScheduler::new();
        fake.add_thread(42, SchedAttrs::default());
        scenario(&fake, 42);
        scenario(&RealScheduler, sys::gettid());
    }
}
