//! The lock benchmark: threads take one lock in a loop, do a fixed amount of work
//! inside and outside it, for a fixed time. Reported: acquisitions per second, the
//! spread between threads, and the acquire latency (sampled) at p50/p99/max.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lock::RawLock;

/// Shape of one benchmark run.
#[derive(Clone, Copy, Debug)]
pub struct BenchSpec {
    /// Contending threads.
    pub threads: usize,
    /// How long they run.
    pub duration: Duration,
    /// Busy-loop iterations with the lock held.
    pub inside: u32,
    /// Busy-loop iterations between two acquisitions.
    pub outside: u32,
}

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Acquisitions by all threads.
    pub ops: u64,
    /// Acquisitions per second.
    pub ops_per_sec: f64,
    /// Fewest acquisitions of one thread.
    pub min_thread_ops: u64,
    /// Most acquisitions of one thread.
    pub max_thread_ops: u64,
    /// Sampled acquire latency, µs.
    pub acquire_p50_us: f64,
    /// Sampled acquire latency, µs.
    pub acquire_p99_us: f64,
    /// Sampled acquire latency, µs.
    pub acquire_max_us: f64,
}

/// Every this many acquisitions one is timed (timing each would change the result).
const SAMPLE_EVERY: u64 = 16;

fn work(iterations: u32) {
    for i in 0..iterations {
        std::hint::black_box(i);
    }
}

/// Runs `spec` on `lock`. Panics if the lock let two holders in (the shared count
/// under the lock must equal the acquisitions).
pub fn run(lock: &dyn RawLock, spec: BenchSpec) -> BenchResult {
    let stop = AtomicBool::new(false);
    let under_lock = AtomicU64::new(0);
    let start = Instant::now();
    let per_thread: Vec<(u64, Vec<u64>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..spec.threads)
            .map(|_| {
                s.spawn(|| {
                    let (mut ops, mut samples) = (0u64, Vec::new());
                    // Relaxed: a stop flag; a few extra rounds do not matter.
                    while !stop.load(Ordering::Relaxed) {
                        let timed = ops % SAMPLE_EVERY == 0;
                        let t0 = timed.then(Instant::now);
                        lock.lock();
                        if let Some(t0) = t0 {
                            samples.push(t0.elapsed().as_nanos() as u64);
                        }
                        let v = under_lock.load(Ordering::Relaxed);
                        work(spec.inside);
                        under_lock.store(v + 1, Ordering::Relaxed);
                        lock.unlock();
                        ops += 1;
                        work(spec.outside);
                    }
                    (ops, samples)
                })
            })
            .collect();
        std::thread::sleep(spec.duration);
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let ops: u64 = per_thread.iter().map(|(n, _)| n).sum();
    assert_eq!(
        under_lock.load(Ordering::Relaxed),
        ops,
        "the lock let two holders in"
    );
    let mut samples: Vec<u64> = per_thread.iter().flat_map(|(_, s)| s).copied().collect();
    samples.sort_unstable();
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() - 1) as f64 * p).round() as usize;
        samples[i] as f64 / 1000.0
    };
    BenchResult {
        ops,
        ops_per_sec: ops as f64 / elapsed,
        min_thread_ops: per_thread.iter().map(|(n, _)| *n).min().unwrap_or(0),
        max_thread_ops: per_thread.iter().map(|(n, _)| *n).max().unwrap_or(0),
        acquire_p50_us: pct(0.5),
        acquire_p99_us: pct(0.99),
        acquire_max_us: pct(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::FutexMutex;

    #[test]
    fn a_run_counts_what_the_threads_did() {
        let r = run(
            &FutexMutex::default(),
            BenchSpec {
                threads: 3,
                duration: Duration::from_millis(50),
                inside: 50,
                outside: 50,
            },
        );
        assert!(r.ops > 0);
        assert!(r.min_thread_ops <= r.max_thread_ops);
        assert!(r.acquire_p50_us <= r.acquire_p99_us && r.acquire_p99_us <= r.acquire_max_us);
    }
}
