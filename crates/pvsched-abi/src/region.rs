//! A bounds-checked accessor over the raw shared mapping.
//!
//! The region is memory that another party (the guest, or another host
//! process) writes at any time. No Rust reference to a plain type is ever
//! created into it: every access is an atomic load or store of an aligned
//! word, bounds- and alignment-checked. Each location is always accessed with
//! the same width (slot lines: two `u32` then seven `u64`; header lines: eight
//! `u64`), so accesses never mix sizes.

use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::layout::{HEADER_GUEST_LINE_OFFSET, SLOT_HOST_LINE_OFFSET};
use crate::raw::{
    PvschedGuestLine, PvschedHeader, PvschedHeaderGuest, PvschedHeaderHost, PvschedHostLine,
    PVSCHED_HEADER_SIZE, PVSCHED_LINE_SIZE, PVSCHED_SLOT_SIZE,
};
use crate::seqlock::{self, SeqCounter, SeqRead};

/// An access outside the region or misaligned for its width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfBounds {
    /// Requested offset.
    pub offset: usize,
    /// Requested width.
    pub size: usize,
    /// Region length.
    pub len: usize,
}

impl core::fmt::Display for OutOfBounds {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "access of {} bytes at offset {} outside or misaligned in a region of {} bytes",
            self.size, self.offset, self.len
        )
    }
}

/// Bounded number of seqlock read attempts on a line written by another party.
pub const SEQ_READ_ATTEMPTS: u32 = 8;

/// A view of shared memory that is only ever accessed atomically.
#[derive(Clone, Copy, Debug)]
pub struct Region<'a> {
    base: NonNull<u8>,
    len: usize,
    _memory: PhantomData<&'a [AtomicU64]>,
}

// SAFETY: (for Send and Sync) the region only performs atomic accesses on memory that
// stays valid for 'a; sharing or sending the view between threads is no
// different from sharing a `&[AtomicU64]`.
unsafe impl Send for Region<'_> {}
// SAFETY: see the Send impl above.
unsafe impl Sync for Region<'_> {}

impl<'a> Region<'a> {
    /// Builds a region over raw memory.
    ///
    /// # Safety
    /// `base` must be 8-byte aligned and valid for reads and writes of `len`
    /// bytes for the whole of `'a`, and no Rust reference to non-atomic data
    /// may point into it during `'a` (other processes or a guest may write it).
    pub unsafe fn from_raw_parts(base: NonNull<u8>, len: usize) -> Self {
        Region {
            base,
            len,
            _memory: PhantomData,
        }
    }

    /// Builds a region over memory owned by this process, for tests, the
    /// simulator and offline decoding.
    pub fn from_words(words: &'a [AtomicU64]) -> Self {
        let base = NonNull::from(words).cast::<u8>();
        // SAFETY: a slice of AtomicU64 is 8-aligned, valid for `8 * len`
        // bytes for 'a, and only ever accessed atomically through this view.
        unsafe { Region::from_raw_parts(base, core::mem::size_of_val(words)) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn checked(&self, offset: usize, size: usize) -> Result<NonNull<u8>, OutOfBounds> {
        let err = OutOfBounds {
            offset,
            size,
            len: self.len,
        };
        let end = offset.checked_add(size).ok_or(err)?;
        if end > self.len || offset % size != 0 {
            return Err(err);
        }
        // SAFETY: offset + size <= len, so the result stays inside the
        // allocation described by `base` and `len`.
        Ok(unsafe { self.base.add(offset) })
    }

    fn atomic_u32(&self, offset: usize) -> Result<&'a AtomicU32, OutOfBounds> {
        let ptr = self.checked(offset, 4)?;
        // SAFETY: in bounds and 4-aligned (checked above; base is 8-aligned),
        // valid for 'a per the constructor's contract, and only accessed
        // atomically with this width.
        Ok(unsafe { AtomicU32::from_ptr(ptr.as_ptr().cast()) })
    }

    fn atomic_u64(&self, offset: usize) -> Result<&'a AtomicU64, OutOfBounds> {
        let ptr = self.checked(offset, 8)?;
        // SAFETY: in bounds and 8-aligned (checked above), valid for 'a per
        // the constructor's contract, and only accessed atomically with this width.
        Ok(unsafe { AtomicU64::from_ptr(ptr.as_ptr().cast()) })
    }

    /// Atomically loads the `u32` at `offset`.
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Result<u32, OutOfBounds> {
        Ok(self.atomic_u32(offset)?.load(order))
    }

    /// Atomically stores a `u32` at `offset`.
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) -> Result<(), OutOfBounds> {
        self.atomic_u32(offset)?.store(value, order);
        Ok(())
    }

    /// Atomically loads the `u64` at `offset`.
    pub fn load_u64(&self, offset: usize, order: Ordering) -> Result<u64, OutOfBounds> {
        Ok(self.atomic_u64(offset)?.load(order))
    }

    /// Atomically stores a `u64` at `offset`.
    pub fn store_u64(&self, offset: usize, value: u64, order: Ordering) -> Result<(), OutOfBounds> {
        self.atomic_u64(offset)?.store(value, order);
        Ok(())
    }

    /// Copies a 64-byte line made of eight `u64` words (header lines).
    fn load_words_line(&self, offset: usize) -> Result<[u8; 64], OutOfBounds> {
        let mut out = [0u8; 64];
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            let word = self.load_u64(offset + i * 8, Ordering::Relaxed)?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ok(out)
    }

    fn store_words_line(&self, offset: usize, bytes: &[u8; 64]) -> Result<(), OutOfBounds> {
        self.checked(offset, 64)?;
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let word = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
            self.store_u64(offset + i * 8, word, Ordering::Relaxed)?;
        }
        Ok(())
    }

    /// Copies the payload of a slot line: the `u32` at +4 and seven `u64`
    /// words from +8. Bytes 0..4 (the sequence counter) are left zero.
    fn load_slot_payload(&self, offset: usize) -> Result<[u8; 64], OutOfBounds> {
        let mut out = [0u8; 64];
        let second = self.load_u32(offset + 4, Ordering::Relaxed)?;
        out[4..8].copy_from_slice(&second.to_ne_bytes());
        for i in 1..8 {
            let word = self.load_u64(offset + i * 8, Ordering::Relaxed)?;
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_ne_bytes());
        }
        Ok(out)
    }

    fn store_slot_payload(&self, offset: usize, bytes: &[u8; 64]) -> Result<(), OutOfBounds> {
        let second = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        self.store_u32(offset + 4, second, Ordering::Relaxed)?;
        for i in 1..8 {
            let word = u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            self.store_u64(offset + i * 8, word, Ordering::Relaxed)?;
        }
        Ok(())
    }

    /// Copies the whole header (both lines) into a local value.
    pub fn read_header(&self) -> Result<PvschedHeader, OutOfBounds> {
        let host = self.load_words_line(0)?;
        let guest = self.load_words_line(HEADER_GUEST_LINE_OFFSET)?;
        Ok(PvschedHeader {
            host: PvschedHeaderHost::from_bytes(&host),
            guest: PvschedHeaderGuest::from_bytes(&guest),
        })
    }

    /// Writes the host line of the header.
    pub fn write_header_host(&self, host: &PvschedHeaderHost) -> Result<(), OutOfBounds> {
        self.store_words_line(0, &host.to_bytes())
    }

    /// Writes the guest line of the header (what a guest does; tests and simulation).
    pub fn write_header_guest(&self, guest: &PvschedHeaderGuest) -> Result<(), OutOfBounds> {
        self.store_words_line(HEADER_GUEST_LINE_OFFSET, &guest.to_bytes())
    }

    /// Stores the host heartbeat word of the header.
    pub fn store_host_heartbeat(&self, value: u64) -> Result<(), OutOfBounds> {
        let offset = core::mem::offset_of!(PvschedHeaderHost, host_heartbeat);
        self.store_u64(offset, value, Ordering::Relaxed)
    }

    /// Byte offset of slot `index`, checked against the region.
    pub fn slot_offset(&self, index: u32) -> Result<usize, OutOfBounds> {
        let offset = PVSCHED_HEADER_SIZE as usize + index as usize * PVSCHED_SLOT_SIZE as usize;
        self.checked(offset, PVSCHED_SLOT_SIZE as usize)?;
        Ok(offset)
    }

    /// Takes a copy of a slot's guest line under the guest's seqlock.
    pub fn read_guest_line(&self, index: u32) -> Result<SeqRead<PvschedGuestLine>, OutOfBounds> {
        let offset = self.slot_offset(index)?;
        self.read_seq_line(offset, |bytes, seq| {
            let mut line = PvschedGuestLine::from_bytes(bytes);
            line.seq = seq;
            line
        })
    }

    /// Publishes a slot's guest line (what the guest module does; tests and simulation).
    pub fn write_guest_line(&self, index: u32, line: &PvschedGuestLine) -> Result<(), OutOfBounds> {
        let offset = self.slot_offset(index)?;
        self.write_seq_line(offset, &line.to_bytes())
    }

    /// Takes a copy of a slot's host line under the host's seqlock.
    pub fn read_host_line(&self, index: u32) -> Result<SeqRead<PvschedHostLine>, OutOfBounds> {
        let offset = self.slot_offset(index)? + SLOT_HOST_LINE_OFFSET;
        self.read_seq_line(offset, |bytes, seq| {
            let mut line = PvschedHostLine::from_bytes(bytes);
            line.seq = seq;
            line
        })
    }

    /// Publishes a slot's host line; the `seq` field of `line` is ignored.
    pub fn write_host_line(&self, index: u32, line: &PvschedHostLine) -> Result<(), OutOfBounds> {
        let offset = self.slot_offset(index)? + SLOT_HOST_LINE_OFFSET;
        self.write_seq_line(offset, &line.to_bytes())
    }

    fn read_seq_line<T>(
        &self,
        offset: usize,
        decode: impl Fn(&[u8; 64], u32) -> T,
    ) -> Result<SeqRead<T>, OutOfBounds> {
        self.checked(offset, PVSCHED_LINE_SIZE as usize)?;
        let counter = RegionCounter {
            counter: self.atomic_u32(offset)?,
        };
        // The bounds were checked above, so the payload loads cannot fail.
        // The copy carries the counter value it was validated against, so
        // a caller that skips lines whose counter has not moved never
        // mistakes a newer write for the one it copied.
        let read = seqlock::read_versioned(&counter, SEQ_READ_ATTEMPTS, || {
            self.load_slot_payload(offset).unwrap_or([0; 64])
        });
        Ok(match read {
            SeqRead::Consistent((bytes, seq)) => SeqRead::Consistent(decode(&bytes, seq)),
            SeqRead::Torn((bytes, seq)) => SeqRead::Torn(decode(&bytes, seq)),
        })
    }

    fn write_seq_line(&self, offset: usize, bytes: &[u8; 64]) -> Result<(), OutOfBounds> {
        self.checked(offset, PVSCHED_LINE_SIZE as usize)?;
        let counter = RegionCounter {
            counter: self.atomic_u32(offset)?,
        };
        let mut result = Ok(());
        seqlock::write(&counter, || result = self.store_slot_payload(offset, bytes));
        result
    }
}

/// The sequence counter of a line in the mapped region.
struct RegionCounter<'a> {
    counter: &'a AtomicU32,
}

impl SeqCounter for RegionCounter<'_> {
    fn load(&self, order: Ordering) -> u32 {
        self.counter.load(order)
    }
    fn store(&self, value: u32, order: Ordering) {
        self.counter.store(value, order)
    }
    fn fence(order: Ordering) {
        core::sync::atomic::fence(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn out_of_bounds_and_misaligned_accesses_are_refused() {
        let mem = words(4);
        let region = Region::from_words(&mem);
        assert!(region.load_u64(24, Ordering::Relaxed).is_ok());
        assert!(region.load_u64(32, Ordering::Relaxed).is_err());
        assert!(region.load_u64(4, Ordering::Relaxed).is_err());
        assert!(region.load_u32(30, Ordering::Relaxed).is_err());
        assert!(region.load_u64(usize::MAX - 3, Ordering::Relaxed).is_err());
        assert!(region.read_guest_line(0).is_err());
    }

    #[test]
    fn slot_lines_round_trip_and_advance_the_counter() {
        let mem = words((128 + 2 * 128) / 8);
        let region = Region::from_words(&mem);
        let line = PvschedHostLine {
            pcpu: 3,
            boost_state: 1,
            steal_ns: 1234,
            boosted_ns: 99,
            ..Default::default()
        };
        region.write_host_line(1, &line).unwrap();
        let read = region.read_host_line(1).unwrap().consistent().unwrap();
        assert_eq!(read.seq, 2);
        assert_eq!(PvschedHostLine { seq: 0, ..read }, line);
        // Slot 0 untouched, slot 2 does not exist.
        assert_eq!(
            region.read_host_line(0).unwrap().consistent().unwrap(),
            PvschedHostLine::default()
        );
        assert!(region.read_host_line(2).is_err());
    }

    #[test]
    fn an_odd_counter_reads_as_torn_and_the_next_write_recovers() {
        let mem = words((128 + 128) / 8);
        let region = Region::from_words(&mem);
        let offset = region.slot_offset(0).unwrap();
        region.store_u32(offset, 7, Ordering::Relaxed).unwrap();
        assert!(matches!(
            region.read_guest_line(0).unwrap(),
            SeqRead::Torn(_)
        ));
        region
            .write_guest_line(
                0,
                &PvschedGuestLine {
                    cpu_id: 0,
                    updates: 5,
                    ..Default::default()
                },
            )
            .unwrap();
        let read = region.read_guest_line(0).unwrap().consistent().unwrap();
        assert_eq!(read.seq, 10);
        assert_eq!(read.updates, 5);
    }
}
