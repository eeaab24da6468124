//! Wait-free hand-offs between the RT loop thread and fair-class threads.
//!
//! The loop thread runs `SCHED_FIFO` above every boosted vCPU. If it ever
//! waited on something a fair thread holds (a `Mutex`, a channel slot a
//! sender has claimed but not yet filled), a boosted vCPU preempting that
//! fair thread would stall the only thread that throttles. So the loop talks
//! to the other threads only through the two structures here, in which no
//! side ever waits for the other:
//!
//! - [`latest`]: a triple buffer (one writer, one reader). The writer always
//!   has a slot of its own to fill; publishing is one atomic swap. The reader
//!   always has a slot of its own to read; taking the newest is one atomic
//!   swap. Used for status snapshots (loop → stats thread) and for the set
//!   of state-file records (loop → state writer).
//! - [`queue`]: a bounded single-producer single-consumer ring. A value is
//!   made visible only after it is completely written, so the consumer never
//!   spins on a half-sent value (std's `mpsc` can: its `try_recv` waits for
//!   a sender that has claimed a slot). Used for VM updates (refresher →
//!   loop).
//!
//! Memory a value owns is freed on the side that drops it: a published
//! snapshot is dropped by the writer when its slot is refilled, so the
//! reader never frees the writer's allocations (a free into another
//! thread's malloc arena takes that arena's lock). Values sent through the
//! queue are freed by the consumer; the allocator's arena locks are the one
//! lock the loop may still share with a fair thread, held only inside a
//! `malloc`/`free` call.
//!
//! This is the one module of the crate besides [`crate::sys`] with `unsafe`
//! code: the slots are `UnsafeCell`s whose exclusive owner is decided by the
//! atomic indices.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

/// Bit of [`Triple::middle`] telling that the middle slot holds a value the
/// reader has not taken yet.
const FRESH: u8 = 0b100;
const INDEX: u8 = 0b011;

struct Triple<T> {
    slots: [UnsafeCell<T>; 3],
    /// Index of the slot that is neither the writer's nor the reader's, and [`FRESH`].
    middle: AtomicU8,
}

// SAFETY: a slot is accessed only by the side that owns its index (the
// writer's `back`, the reader's `front`); ownership passes through the atomic
// swap of `middle` with AcqRel ordering, so accesses of two sides to one slot
// are ordered. Values move between threads, hence `T: Send`.
unsafe impl<T: Send> Sync for Triple<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Triple<T> {}

/// The writing side of [`latest`]: publishes values, never waits.
pub struct LatestWriter<T> {
    shared: Arc<Triple<T>>,
    back: u8,
}

/// The reading side of [`latest`]: reads the newest value, never waits.
pub struct LatestReader<T> {
    shared: Arc<Triple<T>>,
    front: u8,
}

/// A triple buffer holding `initial` until the first publication.
pub fn latest<T: Clone + Send>(initial: T) -> (LatestWriter<T>, LatestReader<T>) {
    let shared = Arc::new(Triple {
        slots: [
            UnsafeCell::new(initial.clone()),
            UnsafeCell::new(initial.clone()),
            UnsafeCell::new(initial),
        ],
        middle: AtomicU8::new(1),
    });
    (
        LatestWriter {
            shared: Arc::clone(&shared),
            back: 0,
        },
        LatestReader { shared, front: 2 },
    )
}

impl<T: Send> LatestWriter<T> {
    /// Makes `value` the newest; the value it replaces in the writer's slot
    /// (published two calls ago) is dropped here, on the writer's thread.
    pub fn publish(&mut self, value: T) {
        let slot = &self.shared.slots[usize::from(self.back)];
        // SAFETY: `back` is the writer's own slot: the reader holds `front`
        // and `middle` names the third; neither side hands out `back`
        // until the swap below.
        unsafe { *slot.get() = value };
        // Ordering: Release publishes the slot's new content to the reader's
        // Acquire swap; Acquire takes the reader's last reads of the slot we
        // get back (its old front) as done before we overwrite it.
        let previous = self.shared.middle.swap(self.back | FRESH, Ordering::AcqRel);
        self.back = previous & INDEX;
    }
}

impl<T: Send> LatestReader<T> {
    /// The newest published value (or the one read last, if nothing newer).
    /// The borrow is the reader's hold on it; the writer goes on publishing.
    pub fn latest(&mut self) -> &T {
        self.take_fresh();
        // SAFETY: `front` is the reader's own slot (see `publish`); the
        // returned borrow ends before the next swap, which needs `&mut self`.
        unsafe { &*self.shared.slots[usize::from(self.front)].get() }
    }

    /// The newest value if one was published since the last call, else `None`.
    pub fn fresh(&mut self) -> Option<&T> {
        if !self.take_fresh() {
            return None;
        }
        // SAFETY: as in `latest`.
        Some(unsafe { &*self.shared.slots[usize::from(self.front)].get() })
    }

    fn take_fresh(&mut self) -> bool {
        // Ordering: Relaxed is enough to look; a stale answer only delays
        // the reader to its next call.
        if self.shared.middle.load(Ordering::Relaxed) & FRESH == 0 {
            return false;
        }
        // Ordering: Acquire pairs with the writer's Release in `publish`;
        // Release hands our reads of the old front over before the writer
        // can refill it.
        let previous = self.shared.middle.swap(self.front, Ordering::AcqRel);
        self.front = previous & INDEX;
        true
    }
}

struct Ring<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    /// Next index to read (only the consumer writes it).
    head: AtomicUsize,
    /// Next index to write (only the producer writes it).
    tail: AtomicUsize,
}

// SAFETY: slot `i` is written by the producer only while `i - head < len`
// and `i >= tail` (not yet visible), and read by the consumer only while
// `head <= i < tail`; the Release/Acquire pairs on `tail` and `head` order
// the two. Values move between threads, hence `T: Send`.
unsafe impl<T: Send> Sync for Ring<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Ring<T> {}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        let (head, tail) = (*self.head.get_mut(), *self.tail.get_mut());
        for i in head..tail {
            let slot = &mut self.slots[i % self.slots.len()];
            // SAFETY: indices in head..tail hold values written and not yet
            // read; we are the last owner, so nobody else touches them.
            unsafe { slot.get_mut().assume_init_drop() };
        }
    }
}

/// The producing side of [`queue`].
pub struct QueueSender<T> {
    ring: Arc<Ring<T>>,
}

/// The consuming side of [`queue`].
pub struct QueueReceiver<T> {
    ring: Arc<Ring<T>>,
}

/// A bounded single-producer single-consumer queue of `capacity` values.
pub fn queue<T: Send>(capacity: usize) -> (QueueSender<T>, QueueReceiver<T>) {
    let capacity = capacity.max(1);
    let ring = Arc::new(Ring {
        slots: (0..capacity)
            .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
            .collect(),
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
    });
    (
        QueueSender {
            ring: Arc::clone(&ring),
        },
        QueueReceiver { ring },
    )
}

impl<T: Send> QueueSender<T> {
    /// Appends `value`, or gives it back when the queue is full.
    pub fn try_send(&mut self, value: T) -> Result<(), T> {
        let ring = &*self.ring;
        // Ordering: only this side writes `tail`.
        let tail = ring.tail.load(Ordering::Relaxed);
        // Ordering: Acquire pairs with the consumer's Release of `head`, so
        // its read of a slot is done before we reuse the slot.
        let head = ring.head.load(Ordering::Acquire);
        if tail.wrapping_sub(head) >= ring.slots.len() {
            return Err(value);
        }
        let slot = &ring.slots[tail % ring.slots.len()];
        // SAFETY: `tail` is not yet visible to the consumer and the slot was
        // read (or never used) since `tail - head < len`; we are the only producer.
        unsafe { (*slot.get()).write(value) };
        // Ordering: Release makes the written value visible with the index.
        ring.tail.store(tail.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Whether the receiver is gone.
    pub fn is_disconnected(&self) -> bool {
        Arc::strong_count(&self.ring) < 2
    }
}

impl<T: Send> QueueReceiver<T> {
    /// Takes the oldest value, if any; never waits.
    pub fn try_recv(&mut self) -> Option<T> {
        let ring = &*self.ring;
        // Ordering: only this side writes `head`.
        let head = ring.head.load(Ordering::Relaxed);
        // Ordering: Acquire pairs with the producer's Release of `tail`.
        let tail = ring.tail.load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        let slot = &ring.slots[head % ring.slots.len()];
        // SAFETY: `head < tail`: the producer finished writing this slot
        // (Release/Acquire on `tail`) and will not touch it until `head`
        // moves past it; we are the only consumer and move it out once.
        let cell = unsafe { slot.get().read() };
        // SAFETY: as above, the slot holds a written value.
        let value = unsafe { cell.assume_init() };
        // Ordering: Release: our read is done before the producer reuses the slot.
        ring.head.store(head.wrapping_add(1), Ordering::Release);
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_reader_holding_a_snapshot_does_not_block_the_writer() {
        let (mut writer, mut reader) = latest(0u64);
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let reader_thread = std::thread::spawn(move || {
            let held = *reader.latest();
            let guard = reader.latest();
            held_tx.send(*guard).unwrap();
            // Hold the snapshot until the writer has published many times;
            // a writer that waited for the reader would never finish.
            let finished = done_rx.recv_timeout(Duration::from_secs(60)).is_ok();
            let still = *guard;
            (held, still, finished, *reader.latest())
        });
        assert_eq!(held_rx.recv().unwrap(), 0);
        for v in 1..=100_000u64 {
            writer.publish(v);
        }
        done_tx.send(()).unwrap();
        let (held, still, finished, newest) = reader_thread.join().unwrap();
        assert!(
            finished,
            "the writer did not finish while a snapshot was held"
        );
        assert_eq!(
            (held, still),
            (0, 0),
            "the held snapshot changed under the reader"
        );
        assert_eq!(newest, 100_000);
    }

    #[test]
    fn the_reader_sees_every_value_in_order_or_skips_to_a_newer_one() {
        let (mut writer, mut reader) = latest(0u64);
        let t = std::thread::spawn(move || {
            let mut last = 0;
            while last < 200_000 {
                let v = *reader.latest();
                assert!(v >= last, "went back from {last} to {v}");
                last = v;
            }
        });
        for v in 1..=200_000u64 {
            writer.publish(v);
        }
        t.join().unwrap();
    }

    #[test]
    fn fresh_reports_only_new_values() {
        let (mut writer, mut reader) = latest(String::new());
        assert!(reader.fresh().is_none());
        writer.publish("a".into());
        writer.publish("b".into());
        assert_eq!(reader.fresh().map(String::as_str), Some("b"));
        assert!(reader.fresh().is_none());
        assert_eq!(reader.latest(), "b");
    }

    #[test]
    fn the_queue_keeps_order_refuses_when_full_and_drops_what_is_left() {
        let (mut tx, mut rx) = queue::<Vec<u32>>(2);
        tx.try_send(vec![1]).unwrap();
        tx.try_send(vec![2]).unwrap();
        assert_eq!(tx.try_send(vec![3]), Err(vec![3]));
        assert_eq!(rx.try_recv(), Some(vec![1]));
        tx.try_send(vec![3]).unwrap();
        assert_eq!(rx.try_recv(), Some(vec![2]));
        assert_eq!(rx.try_recv(), Some(vec![3]));
        assert_eq!(rx.try_recv(), None);
        tx.try_send(vec![4]).unwrap();
        assert!(!tx.is_disconnected());
        drop(rx);
        assert!(tx.is_disconnected());
    }

    #[test]
    fn the_queue_carries_every_value_across_threads() {
        let (mut tx, mut rx) = queue::<u64>(8);
        let producer = std::thread::spawn(move || {
            for v in 0..100_000u64 {
                let mut v = v;
                while let Err(back) = tx.try_send(v) {
                    v = back;
                    std::thread::yield_now();
                }
            }
        });
        let mut next = 0;
        while next < 100_000 {
            if let Some(v) = rx.try_recv() {
                assert_eq!(v, next);
                next += 1;
            } else {
                std::thread::yield_now();
            }
        }
        producer.join().unwrap();
    }
}
