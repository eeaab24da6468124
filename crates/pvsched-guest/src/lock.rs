//! Three locks over one 32-bit word: a plain test-and-test-and-set spin lock, a futex
//! mutex that never spins, and the pvsched lock, which spins only while the host says
//! the holder's vCPU is on a pCPU that has room, and parks (futex) otherwise.
//!
//! Spinning on a lock whose holder's vCPU the host has preempted burns the waiter's
//! vCPU for nothing (and, on an overcommitted host, can delay the holder further).
//! Parking at once costs two system calls and a wake-up where a short spin would have
//! won. The pvsched lock asks the host lines which case it is in, and treats a line it
//! cannot read, or one that has not changed for `max_age_ns` of guest time, as "do
//! not know": it parks, like a futex mutex.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::futex;
use crate::view::{Freshness, HostLines};

/// A lock without a guard: the benchmark's interface.
pub trait RawLock: Sync {
    /// Takes the lock.
    fn lock(&self);
    /// Releases the lock; only its holder calls this.
    fn unlock(&self);
}

/// Test-and-test-and-set spin lock: spins however long the holder takes.
#[derive(Default)]
pub struct SpinLock {
    word: AtomicU32,
}

impl RawLock for SpinLock {
    fn lock(&self) {
        loop {
            // Acquire: the holder's writes under the lock are visible to us.
            if self
                .word
                .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
            while self.word.load(Ordering::Relaxed) != 0 {
                std::hint::spin_loop();
            }
        }
    }

    fn unlock(&self) {
        // Release: pairs with the next holder's Acquire.
        self.word.store(0, Ordering::Release);
    }
}

/// Futex mutex that never spins (0 free, 1 held, 2 held with sleepers).
#[derive(Default)]
pub struct FutexMutex {
    word: AtomicU32,
}

impl RawLock for FutexMutex {
    fn lock(&self) {
        if self
            .word
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        // From now on take it as "held with sleepers": others may sleep behind us.
        while self.word.swap(2, Ordering::Acquire) != 0 {
            futex::wait(&self.word, 2);
        }
    }

    fn unlock(&self) {
        if self.word.swap(0, Ordering::Release) == 2 {
            futex::wake_one(&self.word);
        }
    }
}

/// Tuning of the pvsched lock.
#[derive(Clone, Copy, Debug)]
pub struct PvLockConfig {
    /// Longest spin before parking, even while the holder runs.
    pub spin_limit_ns: u64,
    /// A host line older than this (guest time since it last changed) is not trusted.
    pub max_age_ns: u64,
    /// A holder whose pCPU is at least this loaded (per mille) is not spun on.
    pub overload_permille: u32,
}

impl Default for PvLockConfig {
    fn default() -> Self {
        Self {
            spin_limit_ns: 50_000,
            max_age_ns: 100_000_000,
            overload_permille: 950,
        }
    }
}

/// Why a waiter spins or parks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The holder's vCPU runs on a pCPU with room: spin.
    Spin,
    /// The host preempted the holder's vCPU: park.
    Preempted,
    /// The holder's pCPU is overloaded: park.
    Overloaded,
    /// The host line has not changed for too long: park.
    Stale,
    /// No usable host line: park.
    Unknown,
}

/// What the pvsched lock did, for the benchmark's report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PvLockCounters {
    /// Waits that parked.
    pub parks: u64,
    /// Parks because the holder's vCPU was preempted.
    pub parked_preempted: u64,
    /// Parks because the holder's pCPU was overloaded.
    pub parked_overloaded: u64,
    /// Parks because the host line was stale or unreadable.
    pub parked_unknown: u64,
    /// Parks after spinning for the whole spin limit.
    pub parked_spin_limit: u64,
}

const HELD_WITH_SLEEPERS: u32 = 1 << 31;
/// Spin iterations between two looks at the host line and the clock.
const CHECK_EVERY: u32 = 64;

/// The pvsched spin-then-park lock. Its word holds the holder's CPU + 1 (0: free) and
/// the "held with sleepers" bit.
pub struct PvLock<'a> {
    word: AtomicU32,
    lines: &'a dyn HostLines,
    freshness: Freshness,
    config: PvLockConfig,
    counters: [AtomicU64; 5],
}

impl<'a> PvLock<'a> {
    /// A free lock that consults `lines`.
    pub fn new(lines: &'a dyn HostLines, config: PvLockConfig) -> Self {
        Self {
            word: AtomicU32::new(0),
            lines,
            freshness: Freshness::new(lines.vcpus()),
            config,
            counters: Default::default(),
        }
    }

    /// Whether a waiter should spin on a lock held on guest CPU `holder` now.
    pub fn verdict(&self, holder: u32) -> Verdict {
        let Some(line) = self.lines.line(holder) else {
            return Verdict::Unknown;
        };
        let age = self
            .freshness
            .observe(holder, line.host_time_ns, self.freshness.now_ns());
        if age > self.config.max_age_ns {
            Verdict::Stale
        } else if line.preempted {
            Verdict::Preempted
        } else if line.pcpu_load_permille >= self.config.overload_permille {
            Verdict::Overloaded
        } else {
            Verdict::Spin
        }
    }

    /// What the lock did so far.
    pub fn counters(&self) -> PvLockCounters {
        let c = |i: usize| self.counters[i].load(Ordering::Relaxed);
        PvLockCounters {
            parks: c(0),
            parked_preempted: c(1),
            parked_overloaded: c(2),
            parked_unknown: c(3),
            parked_spin_limit: c(4),
        }
    }

    fn count(&self, verdict: Option<Verdict>) {
        let index = match verdict {
            Some(Verdict::Preempted) => 1,
            Some(Verdict::Overloaded) => 2,
            Some(Verdict::Stale | Verdict::Unknown) => 3,
            Some(Verdict::Spin) | None => 4,
        };
        // Relaxed: statistics.
        self.counters[0].fetch_add(1, Ordering::Relaxed);
        self.counters[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Spins while the holder is worth waiting for; returns the verdict that stopped
    /// the spin (`None`: the spin limit), or `Some(Spin)` when the lock came free.
    fn spin(&self) -> Option<Verdict> {
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            let word = self.word.load(Ordering::Relaxed);
            if word == 0 {
                return Some(Verdict::Spin);
            }
            if n % CHECK_EVERY == 0 {
                let holder = (word & !HELD_WITH_SLEEPERS).wrapping_sub(1);
                let verdict = self.verdict(holder);
                if verdict != Verdict::Spin {
                    return Some(verdict);
                }
                if start.elapsed().as_nanos() >= u128::from(self.config.spin_limit_ns) {
                    return None;
                }
            }
            n = n.wrapping_add(1);
            std::hint::spin_loop();
        }
    }
}

impl RawLock for PvLock<'_> {
    fn lock(&self) {
        let me = futex::current_cpu().wrapping_add(1) & !HELD_WITH_SLEEPERS;
        let mut mine = me;
        loop {
            // Acquire: the holder's writes under the lock are visible to us.
            if self
                .word
                .compare_exchange(0, mine, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
            let stopped = self.spin();
            if stopped == Some(Verdict::Spin) {
                continue;
            }
            let word = self.word.load(Ordering::Relaxed);
            if word == 0 {
                continue;
            }
            let sleeping = word | HELD_WITH_SLEEPERS;
            if word != sleeping
                && self
                    .word
                    .compare_exchange(word, sleeping, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            self.count(stopped);
            futex::wait(&self.word, sleeping);
            // Others may sleep behind us: whoever holds it next must wake one.
            mine = me | HELD_WITH_SLEEPERS;
        }
    }

    fn unlock(&self) {
        if self.word.swap(0, Ordering::Release) & HELD_WITH_SLEEPERS != 0 {
            futex::wake_one(&self.word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::VcpuHostState;
    use pvsched_abi::BoostState;
    use std::sync::Mutex;

    /// Host lines a test sets directly.
    struct FixedLines(Mutex<Vec<Option<VcpuHostState>>>);

    impl FixedLines {
        fn new(n: usize, state: Option<VcpuHostState>) -> Self {
            Self(Mutex::new(vec![state; n]))
        }
        fn set(&self, cpu: usize, state: Option<VcpuHostState>) {
            self.0.lock().unwrap()[cpu] = state;
        }
    }

    impl HostLines for FixedLines {
        fn line(&self, cpu: u32) -> Option<VcpuHostState> {
            self.0.lock().unwrap().get(cpu as usize).copied().flatten()
        }
        fn vcpus(&self) -> u32 {
            self.0.lock().unwrap().len() as u32
        }
    }

    fn running(host_time_ns: u64) -> VcpuHostState {
        VcpuHostState {
            preempted: false,
            pcpu_load_permille: 300,
            boost: BoostState::Normal,
            host_time_ns,
        }
    }

    #[test]
    fn waiters_spin_only_on_a_running_holder_with_room() {
        let lines = FixedLines::new(2, Some(running(1)));
        let lock = PvLock::new(&lines, PvLockConfig::default());
        assert_eq!(lock.verdict(0), Verdict::Spin);
        lines.set(
            0,
            Some(VcpuHostState {
                preempted: true,
                ..running(2)
            }),
        );
        assert_eq!(lock.verdict(0), Verdict::Preempted);
        lines.set(
            0,
            Some(VcpuHostState {
                pcpu_load_permille: 990,
                ..running(3)
            }),
        );
        assert_eq!(lock.verdict(0), Verdict::Overloaded);
        lines.set(0, None);
        assert_eq!(lock.verdict(0), Verdict::Unknown);
        assert_eq!(lock.verdict(7), Verdict::Unknown, "no line for that CPU");
    }

    #[test]
    fn a_line_that_stops_changing_makes_the_lock_a_futex() {
        let lines = FixedLines::new(1, Some(running(5)));
        let lock = PvLock::new(
            &lines,
            PvLockConfig {
                max_age_ns: 1_000_000,
                ..PvLockConfig::default()
            },
        );
        assert_eq!(lock.verdict(0), Verdict::Spin);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(lock.verdict(0), Verdict::Stale, "unchanged for 5 ms");
        lines.set(0, Some(running(6)));
        assert_eq!(lock.verdict(0), Verdict::Spin, "republished");
    }

    fn hammer(lock: &dyn RawLock, threads: usize, rounds: u64) -> u64 {
        // Plain read-modify-write split in two: only mutual exclusion keeps it exact.
        let counter = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..rounds {
                        lock.lock();
                        let v = counter.load(Ordering::Relaxed);
                        std::hint::spin_loop();
                        counter.store(v + 1, Ordering::Relaxed);
                        lock.unlock();
                    }
                });
            }
        });
        counter.load(Ordering::Relaxed)
    }

    #[test]
    fn every_lock_excludes() {
        assert_eq!(hammer(&SpinLock::default(), 4, 20_000), 80_000);
        assert_eq!(hammer(&FutexMutex::default(), 4, 20_000), 80_000);
        let lines = FixedLines::new(64, Some(running(1)));
        let lock = PvLock::new(&lines, PvLockConfig::default());
        assert_eq!(hammer(&lock, 4, 20_000), 80_000);
    }

    #[test]
    fn a_preempted_holder_makes_waiters_park_not_spin() {
        // Every line says "preempted": a waiter never spins on the holder, it parks.
        let preempted = VcpuHostState {
            preempted: true,
            ..running(1)
        };
        let lines = FixedLines::new(64, Some(preempted));
        let lock = PvLock::new(&lines, PvLockConfig::default());
        lock.lock();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                lock.lock();
                lock.unlock();
            });
            // The waiter parks (the word gains the sleepers bit) while we hold it.
            while lock.word.load(Ordering::Relaxed) & HELD_WITH_SLEEPERS == 0 {
                std::thread::yield_now();
            }
            lock.unlock();
            waiter.join().unwrap();
        });
        let c = lock.counters();
        assert!(c.parked_preempted >= 1, "{c:?}");
        assert_eq!(c.parked_spin_limit, 0, "{c:?}");
    }
}
