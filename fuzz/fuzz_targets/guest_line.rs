//! Fuzzes decoding of a guest-written slot line: never panics, always in range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvsched_abi::raw::PvschedGuestLine;
use pvsched_abi::{decode_guest_line, encode_guest_line};

fuzz_target!(|data: &[u8]| {
    let mut bytes = [0u8; 64];
    let n = data.len().min(64);
    bytes[..n].copy_from_slice(&data[..n]);
    let (state, _) = decode_guest_line(&PvschedGuestLine::from_bytes(&bytes));
    assert!(state.task.rt_prio <= 99);
    let (again, bad) = decode_guest_line(&encode_guest_line(&state));
    assert!(bad.is_empty());
    assert_eq!(again, state);
});
