//! Guest user space for pvsched: what the host says about this VM's vCPUs (read-only,
//! through the guest module's `/dev/pvsched`), and a spin-then-park lock that stops
//! spinning when the lock holder's vCPU is preempted on the host or its pCPU is
//! overloaded (Kunpeng-V's lock-loop strategy for user-level locks).
//!
//! - [`view`]: the host lines, with their freshness measured in guest time.
//! - [`lock`]: the pvsched-aware lock and the two locks it is compared with.
//! - [`bench`]: the lock benchmark run inside a guest.
//! - [`iobench`]: the disk benchmark (random `O_DIRECT` reads) run inside a guest.
//! - [`probe`]: the boost probe, guest-measured latency from an RT wakeup to the host
//!   line showing the vCPU boosted.

pub mod bench;
mod futex;
pub mod iobench;
pub mod lock;
pub mod probe;
pub mod view;
