//! Fuzzes a whole shared region: header validation, negotiation and every
//! slot read over arbitrary bytes.
#![no_main]

use std::sync::atomic::AtomicU64;

use libfuzzer_sys::fuzz_target;
use pvsched_abi::{decode_guest_line, negotiate, validate_header, Region, SeqRead};

fuzz_target!(|data: &[u8]| {
    let words: Vec<AtomicU64> = data
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            AtomicU64::new(u64::from_ne_bytes(w))
        })
        .collect();
    let region = Region::from_words(&words);
    let Ok(header) = region.read_header() else {
        return;
    };
    let _ = negotiate(&header.host, &header.guest);
    let Ok(geometry) = validate_header(&header.host, region.len()) else {
        return;
    };
    for slot in 0..geometry.nr_slots {
        let (SeqRead::Consistent(line) | SeqRead::Torn(line)) =
            region.read_guest_line(slot).unwrap();
        let _ = decode_guest_line(&line);
        region.read_host_line(slot).unwrap();
    }
});
