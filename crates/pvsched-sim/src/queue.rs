//! The event queue, ordered by `(time, insertion sequence)`, and the trace hash.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::Nanos;

/// What happens at an event. Small and `Copy`: the queue never allocates per event
/// once its heap has grown to the working-set size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ev {
    /// The next thing due on a pCPU (completion, slice end, poll end, throttle).
    Cpu { cpu: u32, gen: u32 },
    /// A sleeping host thread's timer.
    ThreadTimer { thread: u32, gen: u32 },
    /// A guest task's timer (sleep end, period).
    TaskTimer { task: u32, gen: u32 },
    /// A device completes an I/O request of a guest task.
    IoDone { task: u32 },
    /// The simulated daemon's periodic step of one VM's engine.
    Daemon { vm: u32 },
    /// The engine asked to be stepped again (`wake_at`).
    EngineWake { vm: u32, gen: u32 },
    /// A decision reaches a vCPU thread after the apply delay.
    Apply { vm: u32, vcpu: u32, sched: u32 },
    /// Periodic host bookkeeping: pCPU load sample and load balancing.
    Housekeeping,
    /// A round of the daemon's halt-poll controller.
    HaltPollRound,
    /// A VM's guest timer tick (the guest module samples its critical-section signal).
    GuestTick { vm: u32 },
    /// End of warm-up: statistics restart.
    Warmup,
}

impl Ev {
    fn code(&self) -> (u64, u64) {
        match *self {
            Ev::Cpu { cpu, gen } => (1, u64::from(cpu) << 32 | u64::from(gen)),
            Ev::ThreadTimer { thread, gen } => (2, u64::from(thread) << 32 | u64::from(gen)),
            Ev::TaskTimer { task, gen } => (3, u64::from(task) << 32 | u64::from(gen)),
            Ev::IoDone { task } => (4, u64::from(task)),
            Ev::Daemon { vm } => (5, u64::from(vm)),
            Ev::EngineWake { vm, gen } => (6, u64::from(vm) << 32 | u64::from(gen)),
            Ev::Apply { vm, vcpu, sched } => (
                7,
                u64::from(vm) << 40 | u64::from(vcpu) << 20 | u64::from(sched),
            ),
            Ev::Housekeeping => (8, 0),
            Ev::Warmup => (9, 0),
            Ev::GuestTick { vm } => (10, u64::from(vm)),
            Ev::HaltPollRound => (11, 0),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    time: Nanos,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.time == other.time && self.seq == other.seq
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: the heap is a max-heap and the earliest event must come first.
        (other.time, other.seq).cmp(&(self.time, self.seq))
    }
}

/// A min-queue of events; ties are broken by insertion order.
///
/// Per-pCPU timers (at most one per pCPU, rescheduled all the time) live in a
/// tournament tree beside the heap, so rescheduling one costs `log2(pCPUs)`
/// compares and leaves no stale entry behind; both share one sequence counter,
/// so the `(time, sequence)` order is exact across them.
#[derive(Debug, Default)]
pub(crate) struct EventQueue {
    heap: BinaryHeap<Entry>,
    seq: u64,
    /// Leaves at `[n, 2n)`: `(time, seq, cpu)`; inner nodes hold the minimum of their children.
    tree: Vec<(Nanos, u64, u32)>,
    n: usize,
}

const IDLE: (Nanos, u64, u32) = (Nanos::MAX, u64::MAX, u32::MAX);

impl EventQueue {
    pub(crate) fn with_capacity(n: usize, cpus: usize) -> Self {
        let leaves = cpus.max(1).next_power_of_two();
        EventQueue {
            heap: BinaryHeap::with_capacity(n),
            seq: 0,
            tree: vec![IDLE; 2 * leaves],
            n: leaves,
        }
    }

    /// Sets (or clears, with `Nanos::MAX`) the timer of pCPU `cpu`.
    #[inline]
    pub(crate) fn set_cpu_timer(&mut self, cpu: u32, time: Nanos) {
        let mut i = self.n + cpu as usize;
        self.tree[i] = if time == Nanos::MAX {
            IDLE
        } else {
            self.seq += 1;
            (time, self.seq, cpu)
        };
        while i > 1 {
            i /= 2;
            let (l, r) = (self.tree[2 * i], self.tree[2 * i + 1]);
            let m = if (r.0, r.1) < (l.0, l.1) { r } else { l };
            if self.tree[i] == m {
                break;
            }
            self.tree[i] = m;
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, time: Nanos, ev: Ev) {
        self.seq += 1;
        self.heap.push(Entry {
            time,
            seq: self.seq,
            ev,
        });
    }

    /// Time of the next event, if any.
    #[cfg(test)]
    pub(crate) fn peek_time(&self) -> Option<Nanos> {
        let t = self.tree[1];
        let cpu = (t.2 != u32::MAX).then_some(t.0);
        match (cpu, self.heap.peek().map(|e| e.time)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    #[inline]
    pub(crate) fn pop(&mut self) -> Option<(Nanos, Ev)> {
        let t = self.tree[1];
        let cpu_first = match self.heap.peek() {
            None => t.2 != u32::MAX,
            Some(e) => t.2 != u32::MAX && (t.0, t.1) < (e.time, e.seq),
        };
        if cpu_first {
            self.set_cpu_timer(t.2, Nanos::MAX);
            return Some((t.0, Ev::Cpu { cpu: t.2, gen: 0 }));
        }
        self.heap.pop().map(|e| (e.time, e.ev))
    }
}

/// A hash over every processed event: equal seeds must give equal hashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceHash(pub u64);

impl TraceHash {
    #[inline]
    fn mix(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    pub(crate) fn record(&mut self, time: Nanos, ev: &Ev) {
        let (kind, arg) = ev.code();
        self.mix(time);
        self.mix(arg.rotate_left(4) ^ kind);
    }

    /// Folds in a value outside the event stream (a statistic, a decision).
    #[inline]
    pub fn fold(&mut self, x: u64) {
        self.mix(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_timers_interleave_by_time_and_sequence() {
        let mut q = EventQueue::with_capacity(4, 3);
        q.push(10, Ev::Daemon { vm: 1 });
        q.set_cpu_timer(2, 10);
        q.set_cpu_timer(0, 5);
        q.set_cpu_timer(1, 7);
        q.set_cpu_timer(1, 12); // rescheduled: the old time is gone
        q.push(10, Ev::Daemon { vm: 2 });
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![
                (5, Ev::Cpu { cpu: 0, gen: 0 }),
                (10, Ev::Daemon { vm: 1 }),
                (10, Ev::Cpu { cpu: 2, gen: 0 }),
                (10, Ev::Daemon { vm: 2 }),
                (12, Ev::Cpu { cpu: 1, gen: 0 }),
            ]
        );
    }

    #[test]
    fn ties_pop_in_insertion_order() {
        let mut q = EventQueue::with_capacity(4, 1);
        q.push(10, Ev::Daemon { vm: 1 });
        q.push(5, Ev::Daemon { vm: 2 });
        q.push(10, Ev::Daemon { vm: 3 });
        q.push(10, Ev::Daemon { vm: 4 });
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![
                (5, Ev::Daemon { vm: 2 }),
                (10, Ev::Daemon { vm: 1 }),
                (10, Ev::Daemon { vm: 3 }),
                (10, Ev::Daemon { vm: 4 }),
            ]
        );
    }

    #[test]
    fn the_hash_sees_order() {
        let mut a = TraceHash::default();
        let mut b = TraceHash::default();
        a.record(1, &Ev::Daemon { vm: 1 });
        a.record(1, &Ev::Daemon { vm: 2 });
        b.record(1, &Ev::Daemon { vm: 2 });
        b.record(1, &Ev::Daemon { vm: 1 });
        assert_ne!(a, b);
    }
}
