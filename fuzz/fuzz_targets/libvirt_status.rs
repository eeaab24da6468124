//! Fuzzes the reading of libvirt's status file (`/run/libvirt/qemu/NAME.xml`):
//! root writes it, but the domain definition inside carries names and
//! values a domain's owner chose. Any bytes never panic; whatever is
//! accepted has a positive pid, vCPU ids below the slot limit each once,
//! positive thread ids, and pvsched `<shmem>` names that are one file name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvsched_abi::raw::PVSCHED_MAX_SLOTS;
use pvsched_host::libvirt::{parse_status, SHMEM_PREFIX};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(status) = parse_status(text) else {
        return;
    };
    assert!(status.pid > 0);
    assert!(!status.name.is_empty());
    let mut ids: Vec<u32> = status.vcpus.iter().map(|&(id, _)| id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted, each once: {ids:?}");
    ids.dedup();
    assert!(ids.iter().all(|&id| id < PVSCHED_MAX_SLOTS));
    assert!(status.vcpus.iter().all(|&(_, tid)| tid > 0));
    if let Some(max) = status.max_vcpus {
        assert!((1..=PVSCHED_MAX_SLOTS).contains(&max));
    }
    for shmem in &status.shmem {
        let n = &shmem.name;
        assert!(n.starts_with(SHMEM_PREFIX));
        assert!(!n.contains('/') && !n.contains('\0') && n != ".." && n.len() <= 255);
    }
});
