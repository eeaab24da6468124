//! Model-checks the seqlock protocol with loom: a reader that gets a
//! consistent copy never sees a mix of two versions.

use core::sync::atomic::Ordering;
use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::Arc;
use pvsched_abi::seqlock::{self, SeqCounter, SeqRead};

struct LoomCounter(AtomicU32);

impl SeqCounter for LoomCounter {
    fn load(&self, order: Ordering) -> u32 {
        self.0.load(order)
    }
    fn store(&self, value: u32, order: Ordering) {
        self.0.store(value, order)
    }
    fn fence(order: Ordering) {
        loom::sync::atomic::fence(order)
    }
}

struct Line {
    seq: LoomCounter,
    a: AtomicU64,
    b: AtomicU64,
}

fn publish(line: &Line, version: u64) {
    seqlock::write(&line.seq, || {
        line.a.store(version, Ordering::Relaxed);
        line.b.store(version, Ordering::Relaxed);
    });
}

#[test]
fn consistent_reads_never_mix_versions() {
    loom::model(|| {
        let line = Arc::new(Line {
            seq: LoomCounter(AtomicU32::new(0)),
            a: AtomicU64::new(0),
            b: AtomicU64::new(0),
        });
        let writer = {
            let line = line.clone();
            loom::thread::spawn(move || {
                publish(&line, 1);
                publish(&line, 2);
            })
        };
        let read = seqlock::read(&line.seq, 2, || {
            (
                line.a.load(Ordering::Relaxed),
                line.b.load(Ordering::Relaxed),
            )
        });
        if let SeqRead::Consistent((a, b)) = read {
            assert_eq!(a, b, "torn read accepted as consistent");
        }
        writer.join().unwrap();
        let after = seqlock::read(&line.seq, 1, || {
            (
                line.a.load(Ordering::Relaxed),
                line.b.load(Ordering::Relaxed),
            )
        });
        assert_eq!(after, SeqRead::Consistent((2, 2)));
    });
}

#[test]
fn a_stale_odd_counter_is_recovered_by_the_next_write() {
    loom::model(|| {
        let line = Arc::new(Line {
            seq: LoomCounter(AtomicU32::new(5)),
            a: AtomicU64::new(7),
            b: AtomicU64::new(8),
        });
        let writer = {
            let line = line.clone();
            loom::thread::spawn(move || publish(&line, 3))
        };
        let read = seqlock::read(&line.seq, 2, || {
            (
                line.a.load(Ordering::Relaxed),
                line.b.load(Ordering::Relaxed),
            )
        });
        if let SeqRead::Consistent((a, b)) = read {
            assert_eq!((a, b), (3, 3));
        }
        writer.join().unwrap();
        assert_eq!(line.seq.load(Ordering::Relaxed), 8);
    });
}
