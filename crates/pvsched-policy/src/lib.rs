//! The pvsched policy engine: pure decisions from guest hints and host state.
//!
//! Observations go in (validated guest lines, host CPU time, the time
//! itself); decisions come out (scheduling class and priority per vCPU
//! thread, values to publish to the guest). No I/O, no clock, no
//! randomness, so the same engine runs in the host daemon and in the
//! simulator, and every limit can be checked by property tests.
//! [`controller::VmController`] wraps the engine with everything else a
//! daemon tick decides for one VM (shared header, guest lines, sampling,
//! applies, host lines) behind narrow traits, and is what both run.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod controller;
pub mod engine;
pub mod haltpoll;
pub mod host;
mod ledger;

/// Nanoseconds on the host's monotonic clock (or the simulator's).
pub type Nanos = u64;

pub use config::{
    ConfigError, DeadlineReservation, IoThreadMode, IoThreadPolicy, PolicyConfig, RtClass,
    DEADLINE_MIN_PERIOD_NS, DEADLINE_MIN_RUNTIME_NS, LOCK_HOLDER_BOOST_MAX_NS,
    LOCK_HOLDER_MAX_GRANTS,
};
pub use controller::{
    ApplyError, ControllerCounters, CpuClock, CpuSample, GuestMemory, HostInfo, Ignored,
    LineSource, Sampled, StatSample, ThreadActuator, ThreadStat, TickInput, TickOutcome,
    VmController, VmThread,
};
pub use engine::{
    mask_by_features, BoostEvent, OuterLimit, Reasons, StepInput, ThreadObservation, ThreadSched,
    VcpuDecision, VcpuObservation, VcpuStats, VmBudgetStats, VmEngine,
};
pub use haltpoll::{
    HaltPollBounds, HaltPollDecision, HaltPollInput, HaltPollParams, HaltPollReason, KvmHaltPoll,
    PollDelta,
};
pub use host::{HostBudget, HostBudgetStats, HostMember};
