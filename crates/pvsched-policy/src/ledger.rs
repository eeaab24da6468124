//! Boosted CPU time over a sliding window, counted conservatively.
//!
//! The window is split into `BUCKETS` buckets; CPU time used between two
//! steps is charged to the bucket holding the later step. Summing every
//! bucket that overlaps `[now - window, now]` can only over-count the true
//! boosted time in that window (by at most one bucket), never under-count,
//! so a decision made from it never lets a vCPU exceed its budget.

use crate::Nanos;

const BUCKETS: usize = 16;
const SLOTS: usize = BUCKETS + 1;

/// Boosted CPU time charged to window buckets.
#[derive(Clone, Debug)]
pub(crate) struct BudgetLedger {
    bucket_ns: Nanos,
    window_ns: Nanos,
    /// `(bucket index, cpu ns)`; a slot whose index is stale counts as empty.
    slots: [(u64, Nanos); SLOTS],
}

impl BudgetLedger {
    pub(crate) fn new(window_ns: Nanos) -> Self {
        BudgetLedger {
            bucket_ns: (window_ns / BUCKETS as u64).max(1),
            window_ns,
            slots: [(u64::MAX, 0); SLOTS],
        }
    }

    /// The window length.
    pub(crate) fn window_ns(&self) -> Nanos {
        self.window_ns
    }

    /// Charges `cpu_ns` of boosted time used up to `at`.
    pub(crate) fn charge(&mut self, at: Nanos, cpu_ns: Nanos) {
        if cpu_ns == 0 {
            return;
        }
        let index = at / self.bucket_ns;
        let slot = &mut self.slots[(index % SLOTS as u64) as usize];
        if slot.0 != index {
            *slot = (index, 0);
        }
        slot.1 = slot.1.saturating_add(cpu_ns);
    }

    /// An upper bound on the boosted CPU time in `[now - window, now]`.
    pub(crate) fn used(&self, now: Nanos) -> Nanos {
        let first = now.saturating_sub(self.window_ns) / self.bucket_ns;
        let last = now / self.bucket_ns;
        self.slots
            .iter()
            .filter(|(index, _)| *index != u64::MAX && (first..=last).contains(index))
            .map(|(_, cpu)| *cpu)
            .fold(0, Nanos::saturating_add)
    }

    /// The earliest time at or after `now` at which, with no new charge,
    /// `budget - used(t)` reaches `need`: when enough old buckets have left
    /// the window. Never earlier than the true time (it uses `used`'s upper bound).
    pub(crate) fn available_at(&self, now: Nanos, budget: Nanos, need: Nanos) -> Nanos {
        let first = now.saturating_sub(self.window_ns) / self.bucket_ns;
        let last = now / self.bucket_ns;
        let mut live: Vec<(u64, Nanos)> = self
            .slots
            .iter()
            .copied()
            .filter(|(index, _)| *index != u64::MAX && (first..=last).contains(index))
            .collect();
        live.sort_unstable();
        let mut used = live
            .iter()
            .map(|(_, cpu)| *cpu)
            .fold(0, Nanos::saturating_add);
        if budget.saturating_sub(used) >= need {
            return now;
        }
        for (index, cpu) in live {
            used = used.saturating_sub(cpu);
            // Bucket `index` stops counting once `(t - window) / bucket > index`.
            let leaves = (index + 1)
                .saturating_mul(self.bucket_ns)
                .saturating_add(self.window_ns);
            if budget.saturating_sub(used) >= need {
                return leaves.max(now);
            }
        }
        now.saturating_add(self.window_ns)
            .saturating_add(self.bucket_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_leave_the_window_after_it_passes() {
        let mut ledger = BudgetLedger::new(16_000);
        ledger.charge(1_500, 700);
        ledger.charge(2_000, 300);
        assert_eq!(ledger.used(2_000), 1_000);
        assert_eq!(ledger.used(16_000), 1_000);
        // Bucket 1 (1000..2000) still overlaps [1500, 17500].
        assert_eq!(ledger.used(17_500), 1_000);
        // Bucket 2 holds the 300 charged at 2000; bucket 1 has left [2000, 18000].
        assert_eq!(ledger.used(18_000), 300);
        assert_eq!(ledger.used(19_000), 0);
        assert_eq!(ledger.used(40_000), 0);
    }

    #[test]
    fn available_at_is_when_enough_buckets_have_left() {
        let mut ledger = BudgetLedger::new(16_000);
        ledger.charge(1_500, 700); // bucket 1
        ledger.charge(5_500, 300); // bucket 5
        assert_eq!(ledger.available_at(6_000, 2_000, 500), 6_000);
        // Needs bucket 1 gone: at (1 + 1) * 1000 + 16000.
        let t = ledger.available_at(6_000, 1_000, 500);
        assert_eq!(t, 18_000);
        assert!(1_000 - ledger.used(t) >= 500);
        assert!(1_000 - ledger.used(t - 1) < 500);
        // Needs both gone.
        assert_eq!(ledger.available_at(6_000, 1_000, 1_000), 22_000);
        assert_eq!(ledger.used(22_000), 0);
    }

    #[test]
    fn a_reused_slot_forgets_its_old_bucket() {
        let mut ledger = BudgetLedger::new(16_000);
        ledger.charge(0, 5);
        ledger.charge(17_000, 7); // same slot as bucket 0
        assert_eq!(ledger.used(17_000), 7);
    }
}
