//! Stress test: a real writer thread and a real reader thread over two
//! separate mappings of the same shared file, as host and guest have.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::PvschedHostLine;
use pvsched_abi::{region_size_for, SeqRead};

fn line_for(version: u64) -> PvschedHostLine {
    PvschedHostLine {
        pcpu: version as u32,
        pcpu_load_permille: version as u32,
        steal_ns: version,
        throttle_until_ns: version,
        host_time_ns: version,
        boosts: version as u32,
        throttles: version as u32,
        boosted_ns: version,
        ..Default::default()
    }
}

fn is_one_version(line: &PvschedHostLine) -> bool {
    let v = line.steal_ns;
    line.pcpu == v as u32
        && line.pcpu_load_permille == v as u32
        && line.throttle_until_ns == v
        && line.host_time_ns == v
        && line.boosts == v as u32
        && line.throttles == v as u32
        && line.boosted_ns == v
}

#[test]
fn reader_never_accepts_a_torn_line_from_a_concurrent_writer() {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let path = dir.path().join("pvsched-stress");
    let len = region_size_for(2);
    let writer_map = SharedFile::open(&path, Some(len)).unwrap();
    let reader_map = SharedFile::open(&path, None).unwrap();
    const WRITES: u64 = 200_000;

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        thread::spawn(move || {
            let region = reader_map.region();
            let (mut consistent, mut torn, mut last) = (0u64, 0u64, 0u64);
            while !done.load(Ordering::Acquire) {
                match region.read_host_line(1).unwrap() {
                    SeqRead::Consistent(line) => {
                        assert!(is_one_version(&line), "torn line accepted: {line:?}");
                        assert!(line.steal_ns >= last, "went backwards");
                        last = line.steal_ns;
                        consistent += 1;
                    }
                    SeqRead::Torn(_) => torn += 1,
                }
            }
            (consistent, torn, last)
        })
    };
    let region = writer_map.region();
    for version in 1..=WRITES {
        region.write_host_line(1, &line_for(version)).unwrap();
    }
    done.store(true, Ordering::Release);
    let (consistent, torn, _) = reader.join().unwrap();
    assert!(
        consistent > 0,
        "reader never completed a read (torn {torn})"
    );
    let last = region.read_host_line(1).unwrap().consistent().unwrap();
    assert_eq!(last.steal_ns, WRITES);
    assert_eq!(last.seq, (WRITES * 2) as u32);
}

#[test]
fn a_read_only_mapping_sees_the_writers_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pvsched-read-only");
    let len = region_size_for(2);
    let writer_map = SharedFile::open(&path, Some(len)).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let reader_map = SharedFile::from_file_read_only(file, len as usize).unwrap();
    assert_eq!(reader_map.len(), len as usize);
    writer_map
        .region()
        .write_host_line(1, &line_for(7))
        .unwrap();
    match reader_map.region().read_host_line(1).unwrap() {
        SeqRead::Consistent(line) => assert_eq!(PvschedHostLine { seq: 0, ..line }, line_for(7)),
        SeqRead::Torn(_) => panic!("a quiet line read torn"),
    }
    // A read-only descriptor cannot be mapped for zero bytes either.
    let file = std::fs::File::open(&path).unwrap();
    assert!(SharedFile::from_file_read_only(file, 0).is_err());
}
