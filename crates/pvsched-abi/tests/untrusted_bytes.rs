//! Property tests over arbitrary guest-written bytes: decoding the guest
//! line and the header never panics and never yields out-of-range values.
//! (These stand in for cargo-fuzz, which needs a nightly toolchain; the
//! `fuzz/` workspace has the same targets for libFuzzer.)

use std::sync::atomic::AtomicU64;

use proptest::prelude::*;
use pvsched_abi::decode::{MAX_CS_DEPTH, MAX_IRQ_DEPTH, MAX_RT_PENDING, MAX_RT_PRIO};
use pvsched_abi::raw::{PvschedGuestLine, PvschedHeaderHost, PVSCHED_MAGIC};
use pvsched_abi::{decode_guest_line, encode_guest_line, negotiate, validate_header, Region};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn any_guest_line_decodes_within_bounds(bytes in proptest::array::uniform32(any::<u8>()), more in proptest::array::uniform32(any::<u8>())) {
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(&bytes);
        raw[32..].copy_from_slice(&more);
        let (state, bad) = decode_guest_line(&PvschedGuestLine::from_bytes(&raw));
        prop_assert!(state.task.rt_prio <= MAX_RT_PRIO);
        prop_assert!((-20..=19).contains(&state.task.nice));
        prop_assert!(state.irq_depth <= MAX_IRQ_DEPTH && state.softirq_depth <= MAX_IRQ_DEPTH);
        prop_assert!(state.rt_pending <= MAX_RT_PENDING && state.cs_depth <= MAX_CS_DEPTH);
        prop_assert!(state.pending_prio <= MAX_RT_PRIO);
        if state.task.policy.is_realtime() && state.task.policy != pvsched_abi::SchedPolicy::Deadline {
            prop_assert!(state.task.rt_prio >= 1);
        } else {
            prop_assert_eq!(state.task.rt_prio, 0);
        }
        // Re-encoding a decoded state gives a line that decodes cleanly to itself.
        let (again, bad_again) = decode_guest_line(&encode_guest_line(&state));
        prop_assert!(bad_again.is_empty(), "re-encoded line invalid: {:?} (first pass {:?})", bad_again, bad);
        prop_assert_eq!(again, state);
    }

    #[test]
    fn any_header_validates_or_errors(bytes in proptest::collection::vec(any::<u8>(), 64), region_len in 0usize..(1 << 22), good_magic in any::<bool>()) {
        let mut raw = [0u8; 64];
        raw.copy_from_slice(&bytes);
        let mut host = PvschedHeaderHost::from_bytes(&raw);
        if good_magic {
            host.magic = PVSCHED_MAGIC;
            host.version_major = 1;
        }
        if let Ok(geometry) = validate_header(&host, region_len) {
            prop_assert!(u64::from(geometry.total_size) <= region_len as u64);
            prop_assert!(geometry.nr_slots <= pvsched_abi::raw::PVSCHED_MAX_SLOTS);
        }
    }

    #[test]
    fn any_region_contents_read_without_panic(words in proptest::collection::vec(any::<u64>(), 0..80)) {
        let mem: Vec<AtomicU64> = words.into_iter().map(AtomicU64::new).collect();
        let region = Region::from_words(&mem);
        if let Ok(header) = region.read_header() {
            let _ = negotiate(&header.host, &header.guest);
            if let Ok(geometry) = validate_header(&header.host, region.len()) {
                for slot in 0..geometry.nr_slots {
                    let line = region.read_guest_line(slot).unwrap();
                    let (SeqRead::Consistent(line) | SeqRead::Torn(line)) = line;
                    let _ = decode_guest_line(&line);
                    prop_assert!(region.read_host_line(slot).is_ok());
                }
            }
        }
    }
}

use pvsched_abi::SeqRead;
