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
    fn a_reused_slot_forgets_its_old_bucket() {
        let mut ledger = BudgetLedger::new(16_000);
        ledger.charge(0, 5);
        ledger.charge(17_000, 7); // same slot as bucket 0
        assert_eq!(ledger.used(17_000), 7);
    }
}
