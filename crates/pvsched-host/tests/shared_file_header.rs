//! What attach does with what it finds in a shared file: this process
//! stands in for QEMU (it maps the file, as QEMU maps its memory backend).

mod common;

use std::sync::atomic::Ordering;

use common::*;
use pvsched_abi::raw::*;
use pvsched_host::status::TRUST_METRICS;
use pvsched_host::trust::RefusalReason;
use pvsched_host::vm::VmError;
use pvsched_host::{HostFs, VmRuntime};
use pvsched_policy::PolicyConfig;

fn attach(shm: &ShmFile, tids: &[i32], discovered: bool) -> Result<VmRuntime, VmError> {
    let mut spec = own_spec("vm", &shm.path, tids);
    spec.discovered = discovered;
    VmRuntime::attach(
        spec,
        &PolicyConfig::default(),
        PVSCHED_FEAT_KNOWN,
        false,
        &HostFs::default(),
        false,
    )
}

fn fill(shm: &ShmFile, word: u64) {
    let file = shm.map();
    let region = file.region();
    for w in 0..region.len() / 8 {
        region.store_u64(w * 8, word, Ordering::Relaxed).unwrap();
    }
}

fn inits(label: &str) -> u64 {
    TRUST_METRICS.snapshot().region_inits[label]
}

#[test]
fn foreign_data_is_refused_for_a_discovered_vm_and_overwritten_only_for_a_configured_one() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(4096);
    fill(&shm, 0x0123_4567_89ab_cdef);
    let before = shm.map().region().load_u64(0, Ordering::Relaxed).unwrap();
    match attach(&shm, &vcpus.tids, true) {
        Err(VmError::Refused(r)) => {
            assert_eq!(r.reason, RefusalReason::ForeignHeader);
            assert!(r.detail.contains("not a pvsched region"), "{r}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("attached over foreign data"),
    }
    // Nothing was written.
    assert_eq!(
        shm.map().region().load_u64(0, Ordering::Relaxed).unwrap(),
        before
    );
    let n = inits("configured_foreign");
    attach(&shm, &vcpus.tids, false).unwrap();
    assert!(inits("configured_foreign") > n);
    assert_eq!(
        shm.map().region().read_header().unwrap().host.magic,
        PVSCHED_MAGIC
    );
}

#[test]
fn zero_and_invalid_pvsched_headers_are_initialised_and_counted() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(4096);
    let n = inits("zeroed");
    attach(&shm, &vcpus.tids, true).unwrap();
    assert!(inits("zeroed") > n);

    // Our magic, a major version nobody speaks: ours to repair.
    let file = shm.map();
    let mut host = file.region().read_header().unwrap().host;
    host.version_major = PVSCHED_VERSION_MAJOR + 7;
    file.region().write_header_host(&host).unwrap();
    let n = inits("invalid_header");
    let vm = attach(&shm, &vcpus.tids, true).unwrap();
    assert!(inits("invalid_header") > n);
    assert_eq!(vm.status().nr_slots, 2);
    let host = file.region().read_header().unwrap().host;
    assert_eq!(host.version_major, PVSCHED_VERSION_MAJOR);

    // A valid region is adopted, not re-initialised.
    let (z, i) = (inits("zeroed"), inits("invalid_header"));
    attach(&shm, &vcpus.tids, true).unwrap();
    assert_eq!((inits("zeroed"), inits("invalid_header")), (z, i));
}

#[test]
fn a_file_this_process_does_not_map_is_refused() {
    let vcpus = FakeVcpus::spawn(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-mapped");
    std::fs::write(&path, [0u8; 4096]).unwrap();
    let mut spec = own_spec("vm", &path, &vcpus.tids);
    spec.discovered = true;
    let r = VmRuntime::attach(
        spec,
        &PolicyConfig::default(),
        PVSCHED_FEAT_KNOWN,
        false,
        &HostFs::default(),
        false,
    );
    match r {
        Err(VmError::Refused(r)) => assert_eq!(r.reason, RefusalReason::FileNotMapped),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("attached a file nobody maps"),
    }
}
