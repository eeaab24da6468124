//! Host daemon library: VM discovery, QMP, shared-page mapping, actuators,
//! host information, metrics, and restore of every changed thread.
//!
//! Outside-world access goes through narrow seams so tests run against
//! fakes: [`sched::ThreadScheduler`] (scheduling syscalls),
//! [`clock::Clock`] (time) and [`procfs::HostFs`] (the `/proc` and `/sys`
//! roots). All `unsafe` code is in [`sys`] (syscalls), [`handoff`]
//! (the wait-free hand-offs of the RT loop thread) and [`wake`] (the loop's
//! epoll wait on doorbells and its deadline timer). What the daemon believes
//! about a QEMU process, and what it refuses, is decided in [`trust`]. The
//! [`watchdog`] process restores every changed thread when the daemon dies
//! or stalls. [`guestram`] maps a VM's shared RAM read-only (through
//! `pvsched_abi::mmap`) to read its vCPUs' preempt counts.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod actuator;
pub mod bench;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod fdstore;
pub mod guestram;
pub mod haltpoll;
#[allow(unsafe_code)]
pub mod handoff;
pub mod isolate;
pub mod isolate_request;
pub mod ivshmem;
pub mod libvirt;
pub mod metrics;
pub mod procfs;
pub mod qmp;
pub mod sched;
pub mod seccomp;
pub mod stats_endpoint;
pub mod status;
#[allow(unsafe_code)]
pub mod sys;
pub mod trust;
pub mod vm;
#[allow(unsafe_code)]
pub mod wake;
pub mod watchdog;

pub use actuator::{Actuator, ReconcileReport, StateFile, StateRecord, ThreadRef};
pub use clock::{Clock, FakeClock, MonotonicClock};
pub use config::{DaemonConfig, HostConfig, HostConfigError, VmConfig};
pub use daemon::{Daemon, DaemonError, DaemonOptions, Refresher, VmUpdate};
pub use procfs::HostFs;
pub use sched::{FakeScheduler, Policy, RealScheduler, SchedAttrs, SchedError, ThreadScheduler};
pub use status::{DaemonStatus, Histogram, VcpuStatus, VmCounters, VmStatus};
pub use vm::{VmRuntime, VmSpec};
