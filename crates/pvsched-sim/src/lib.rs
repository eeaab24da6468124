//! Deterministic discrete-event simulator of host and guest scheduling.
//!
//! Both levels are modelled: host pCPUs (optionally SMT) with a fair class,
//! FIFO/RR and RT throttling; vCPU threads that run guest code, halt,
//! halt-poll and get preempted; guest schedulers with tasks that compute,
//! take spinlocks and mutexes, ping-pong, run periodically at RT priority
//! and do I/O. The pvsched policy is [`pvsched_policy::VmEngine`] itself,
//! stepped by a simulated daemon. One seeded RNG, an event queue ordered by
//! `(time, insertion sequence)` and a trace hash make every run repeatable.
//!
//! Latency and score figures are outputs of this model, not measurements:
//! what matters is the direction and size of each effect.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod calibrate;
pub mod config;
pub mod fleet;
pub mod model;
mod queue;
pub mod report;
pub mod rng;
pub mod run;
pub mod scenarios;
pub mod stats;
pub mod svg;

/// Simulated nanoseconds.
pub type Nanos = u64;

pub use config::{Scenario, ScenarioError};
pub use queue::TraceHash;
pub use run::{run_parts, run_scenario, RunOptions, RunResult};
