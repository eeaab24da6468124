//! The seqlock protocol that publishes a line of the shared page.
//!
//! One writer per line (the host for host lines, the owning guest CPU for
//! guest lines); any number of readers, in other address spaces too. The
//! protocol is written once, generic over the counter, so the same code runs
//! on the real mapping and under the loom model checker.
//!
//! Data accesses inside the closures must be relaxed atomic loads/stores of
//! the line's words; the fences here order them against the counter.

use core::sync::atomic::Ordering;

/// The sequence counter of one line, and the fence of the memory model in use.
pub trait SeqCounter {
    /// Atomically loads the counter.
    fn load(&self, order: Ordering) -> u32;
    /// Atomically stores the counter.
    fn store(&self, value: u32, order: Ordering);
    /// A memory fence of the same memory model as the counter.
    fn fence(order: Ordering);
}

/// Outcome of a bounded read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqRead<T> {
    /// The copy was taken while no write was in progress.
    Consistent(T),
    /// Every attempt overlapped a write (or the writer left the counter odd);
    /// the last copy is returned for diagnostics and must not be trusted.
    Torn(T),
}

impl<T> SeqRead<T> {
    /// The consistent copy, if there is one.
    pub fn consistent(self) -> Option<T> {
        match self {
            SeqRead::Consistent(v) => Some(v),
            SeqRead::Torn(_) => None,
        }
    }
}

/// Publishes a new version of the line: `write_data` stores the payload.
///
/// If the counter is odd (a writer died mid-write, or the page is new and
/// garbage), the write skips to the next odd value so readers that saw the
/// stale odd value keep retrying, and ends on an even value.
pub fn write<C: SeqCounter>(counter: &C, write_data: impl FnOnce()) {
    // Ordering: single writer per line, so a relaxed load sees our own last store.
    let current = counter.load(Ordering::Relaxed);
    let odd = if current & 1 == 1 {
        current.wrapping_add(2)
    } else {
        current.wrapping_add(1)
    };
    // Ordering: the odd value may be stored relaxed because the release
    // fence below keeps it ahead of every payload store: a reader whose
    // acquire fence follows a payload load that saw our data then also sees
    // this odd value (or later) in its second counter load.
    counter.store(odd, Ordering::Relaxed);
    C::fence(Ordering::Release);
    write_data();
    // Ordering: release publishes the payload to a reader that acquires this
    // even value in its first counter load.
    counter.store(odd.wrapping_add(1), Ordering::Release);
}

/// Takes a consistent copy of the line, trying at most `max_attempts` times.
pub fn read<C: SeqCounter, T>(
    counter: &C,
    max_attempts: u32,
    read_data: impl FnMut() -> T,
) -> SeqRead<T> {
    match read_versioned(counter, max_attempts, read_data) {
        SeqRead::Consistent((value, _)) => SeqRead::Consistent(value),
        SeqRead::Torn((value, _)) => SeqRead::Torn(value),
    }
}

/// Like [`read`], with the counter value the copy belongs to: the one
/// validated before and after it (for a torn read, the last one seen). A
/// reader that skips unchanged lines must compare against this value, not
/// a fresh load of the counter, which may already belong to a newer write
/// the copy does not hold.
pub fn read_versioned<C: SeqCounter, T>(
    counter: &C,
    max_attempts: u32,
    mut read_data: impl FnMut() -> T,
) -> SeqRead<(T, u32)> {
    for _ in 0..max_attempts {
        // Ordering: acquire pairs with the writer's final release store, so
        // the payload loads below see at least that version's data.
        let before = counter.load(Ordering::Acquire);
        if before & 1 == 1 {
            core::hint::spin_loop();
            continue;
        }
        let value = read_data();
        // Ordering: the acquire fence keeps the payload loads above ahead of
        // the second counter load, and pairs with the writer's release fence
        // when a payload load saw a concurrent write.
        C::fence(Ordering::Acquire);
        let after = counter.load(Ordering::Relaxed);
        if before == after {
            return SeqRead::Consistent((value, before));
        }
        core::hint::spin_loop();
    }
    let value = read_data();
    SeqRead::Torn((value, counter.load(Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    /// A counter that a "writer" bumps right after the reader's second
    /// load: the moment a fresh load would give the wrong version.
    struct RacingCounter {
        value: Cell<u32>,
        loads: Cell<u32>,
    }

    impl SeqCounter for RacingCounter {
        fn load(&self, _: Ordering) -> u32 {
            let v = self.value.get();
            self.loads.set(self.loads.get() + 1);
            if self.loads.get() == 2 {
                self.value.set(v + 2);
            }
            v
        }
        fn store(&self, value: u32, _: Ordering) {
            self.value.set(value);
        }
        fn fence(_: Ordering) {}
    }

    #[test]
    fn the_version_is_the_one_the_copy_was_validated_against() {
        let counter = RacingCounter {
            value: Cell::new(4),
            loads: Cell::new(0),
        };
        let read = read_versioned(&counter, 3, || "copy of version 4");
        assert_eq!(read, SeqRead::Consistent(("copy of version 4", 4)));
        // A fresh load now shows the newer write the copy does not hold.
        assert_eq!(counter.value.get(), 6);
    }
}
