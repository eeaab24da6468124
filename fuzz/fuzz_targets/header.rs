//! Fuzzes the shared header as the host reads it: validation against the
//! region length, and version/feature negotiation with the guest's half.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvsched_abi::raw::*;
use pvsched_abi::{negotiate, new_host_header, region_size_for, validate_header, Negotiation};

fuzz_target!(|data: &[u8]| {
    // 64 bytes of host half, 64 of guest half, then 4 bytes of region length.
    let mut bytes = [0u8; 132];
    let n = data.len().min(bytes.len());
    bytes[..n].copy_from_slice(&data[..n]);
    let host = PvschedHeaderHost::from_bytes(bytes[..64].try_into().unwrap());
    let guest = PvschedHeaderGuest::from_bytes(bytes[64..128].try_into().unwrap());
    let region_len = u32::from_le_bytes(bytes[128..132].try_into().unwrap()) as usize;

    if let Ok(g) = validate_header(&host, region_len) {
        // A header that validates addresses only bytes the region has.
        assert!(g.nr_slots <= PVSCHED_MAX_SLOTS);
        assert_eq!(u64::from(g.total_size), region_size_for(g.nr_slots));
        assert!(u64::from(g.total_size) <= region_len as u64);
        assert_eq!(host.magic, PVSCHED_MAGIC);
        assert_eq!(host.version_major, PVSCHED_VERSION_MAJOR);
    }

    match negotiate(&host, &guest) {
        Ok(Negotiation::Agreed { minor, features }) => {
            assert_eq!(guest.guest_version_major, host.version_major);
            assert_eq!(guest.guest_state, PVSCHED_GUEST_ATTACHED);
            assert!(minor <= host.version_minor && minor <= guest.guest_version_minor);
            // Only features both sides offer and this code knows.
            assert_eq!(features & !(host.host_features & guest.guest_features), 0);
            assert_eq!(features & !PVSCHED_FEAT_KNOWN, 0);
        }
        Ok(Negotiation::GuestAbsent) => {
            assert!(guest.guest_version_major == 0 || guest.guest_state != PVSCHED_GUEST_ATTACHED);
        }
        Err(m) => {
            assert_ne!(m.guest, m.host);
            assert_ne!(guest.guest_version_major, 0);
        }
    }

    // The header the host writes for any slot count validates exactly when
    // the count is allowed and the region holds it, and offers known features only.
    let fresh = new_host_header(host.nr_slots, host.host_features, host.host_generation);
    assert_eq!(fresh.host_features & !PVSCHED_FEAT_KNOWN, 0);
    let fits =
        host.nr_slots <= PVSCHED_MAX_SLOTS && region_size_for(host.nr_slots) <= region_len as u64;
    assert_eq!(validate_header(&fresh, region_len).is_ok(), fits);
});
