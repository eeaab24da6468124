//! Latency histograms and per-VM counters.

use serde::{Deserialize, Serialize};

use crate::Nanos;

const SUB: u32 = 16;
const BUCKETS: usize = (61 * SUB) as usize;

/// A log-linear latency histogram (16 sub-buckets per power of two, about 6%
/// resolution) with exact count, sum and maximum. Merging is addition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hist {
    buckets: Vec<u64>,
    /// Samples.
    pub count: u64,
    /// Sum of samples, ns.
    pub sum: u128,
    /// Largest sample, ns.
    pub max: Nanos,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            max: 0,
        }
    }
}

fn index(v: Nanos) -> usize {
    if v < u64::from(SUB) {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let m = ((v >> (e - 4)) & 15) as u32;
    ((e - 3) * SUB + m) as usize
}

fn lower(i: usize) -> Nanos {
    let i = i as u32;
    if i < SUB {
        return u64::from(i);
    }
    let e = i / SUB + 3;
    let m = u64::from(i % SUB);
    (16 + m) << (e - 4)
}

impl Hist {
    /// Records one sample.
    #[inline]
    pub fn record(&mut self, v: Nanos) {
        self.buckets[index(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// The `q`-quantile (0..=1), ns; the midpoint of its bucket, never above the maximum.
    pub fn quantile(&self, q: f64) -> Option<Nanos> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let lo = lower(i);
                let hi = lower(i + 1);
                return Some((lo + (hi - lo) / 2).min(self.max));
            }
        }
        Some(self.max)
    }

    /// Mean, ns.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }
}

/// CPU time categories of the accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(usize)]
pub enum Acct {
    /// Nothing runs.
    Idle = 0,
    /// Guest code doing work (tasks, interrupt handlers).
    Useful = 1,
    /// Guest spinning on a lock.
    Spin = 2,
    /// Halt-polling.
    Poll = 3,
    /// vCPU exits, wakeups, emulation on the vCPU thread.
    Overhead = 4,
    /// Host load threads and the host latency probe.
    Host = 5,
    /// Kernel noise: tick, interrupts, softirqs, kworkers.
    Noise = 6,
    /// Emulator main loop and I/O threads.
    Emu = 7,
}

/// Number of accounting categories.
pub const N_ACCT: usize = 8;

/// Counters of one VM (or one VM name merged over a fleet).
#[derive(Clone, Debug, Default)]
pub struct VmStats {
    /// vCPU-thread CPU time per category, ns.
    pub acct: [Nanos; N_ACCT],
    /// Time vCPU threads were runnable but not running, ns.
    pub steal: Nanos,
    /// Time vCPU threads were blocked in a halt, ns.
    pub halted: Nanos,
    /// Operations per score group.
    pub ops: Vec<u64>,
    /// Useful CPU per vCPU, for fairness.
    pub vcpu_useful: Vec<Nanos>,
    /// Latency samples.
    pub lat: Hist,
    /// vCPU wake-up latency: from the interrupt that ends a halt to guest
    /// code running (the poll exit when a poll caught it).
    pub wake_lat: Hist,
    /// Engine boosts.
    pub boosts: u64,
    /// Engine throttles.
    pub throttles: u64,
    /// Engine lock-holder grants (preempted vCPUs with preemption disabled).
    pub lock_grants: u64,
    /// Engine steps at which a preempted lock holder got no grant (`lock_holder_max_grants`).
    pub lock_capped: u64,
    /// Of the grants, those granted while the vCPU's task held a spinlock.
    pub grants_to_holders: u64,
    /// Of those, granted while the vCPU's task waited for a spinlock.
    pub grants_to_waiters: u64,
    /// Instances merged in.
    pub instances: u64,
}

impl VmStats {
    /// Adds another VM's counters (same shape).
    pub fn merge(&mut self, o: &VmStats) {
        for i in 0..N_ACCT {
            self.acct[i] += o.acct[i];
        }
        self.steal += o.steal;
        self.halted += o.halted;
        if self.ops.len() < o.ops.len() {
            self.ops.resize(o.ops.len(), 0);
        }
        for (a, b) in self.ops.iter_mut().zip(&o.ops) {
            *a += b;
        }
        self.vcpu_useful.extend_from_slice(&o.vcpu_useful);
        self.lat.merge(&o.lat);
        self.wake_lat.merge(&o.wake_lat);
        self.boosts += o.boosts;
        self.throttles += o.throttles;
        self.lock_grants += o.lock_grants;
        self.lock_capped += o.lock_capped;
        self.grants_to_holders += o.grants_to_holders;
        self.grants_to_waiters += o.grants_to_waiters;
        self.instances += o.instances;
    }
}

/// Jain's fairness index of `xs` (1 = equal shares).
pub fn jain(xs: &[Nanos]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let s: f64 = xs.iter().map(|&x| x as f64).sum();
    let s2: f64 = xs.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if s2 == 0.0 {
        return None;
    }
    Some(s * s / (xs.len() as f64 * s2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut h = Hist::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        let p99 = h.quantile(0.99).unwrap() as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.07, "{p50}");
        assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.07, "{p99}");
        assert_eq!(h.max, 10_000_000);
        assert_eq!(h.quantile(1.0).unwrap(), 10_000_000);
        for v in [0u64, 1, 15, 16, 17, 1000, u64::MAX / 2] {
            assert!(lower(index(v)) <= v && v < lower(index(v) + 1).max(v + 1));
        }
    }

    #[test]
    fn jain_index() {
        assert_eq!(jain(&[5, 5, 5]), Some(1.0));
        assert!((jain(&[1, 0]).unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(jain(&[]), None);
    }
}
