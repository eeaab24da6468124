//! Time, injected: the daemon reads it only through [`Clock`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::sys;

/// A monotonic clock in nanoseconds.
pub trait Clock: Send {
    /// Current time.
    fn now_ns(&self) -> u64;
}

/// `CLOCK_MONOTONIC`, the clock the host line's times are published in.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        sys::monotonic_ns()
    }
}

/// A clock that moves only when told to. Clones share the time.
#[derive(Clone, Debug, Default)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    /// A clock at `start_ns`.
    pub fn new(start_ns: u64) -> Self {
        FakeClock(Arc::new(AtomicU64::new(start_ns)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::SeqCst);
    }

    /// Sets the time.
    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
