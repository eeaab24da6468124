//! Fuzzes what QEMU tells introspection about guest RAM and what KVM's
//! statistics say, through the daemon's own parsers: the text of HMP `info
//! mtree -f` and `gpa2hva` (human-monitor-command replies) and the JSON of
//! `query-stats`. A QEMU is untrusted: whatever it prints must parse into a
//! layout whose translation stays inside the ranges it validated, or fail
//! with one error line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvsched_host::discovery::{BackendKind, MemoryBackend};
use pvsched_host::guestram::{parse_flat_view, parse_gpa2hva, RamLayout, MAX_RAM_RANGES};
use pvsched_host::qmp::{parse_kvm_stats, parse_message, MAX_VM_STATS};

const NAMES: [&str; 3] = ["ram", "m0", "m1"];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse_flat_view(&text, &NAMES) {
        Ok(flat) => {
            assert!(!flat.is_empty() && flat.len() <= MAX_RAM_RANGES);
            for r in &flat {
                assert!(r.len >= 1 && r.gpa.checked_add(r.len).is_some());
                assert!(NAMES.contains(&r.name.as_str()));
            }
            let backends: Vec<MemoryBackend> = NAMES
                .iter()
                .map(|id| MemoryBackend {
                    id: (*id).into(),
                    kind: BackendKind::Memfd,
                    size: Some(1 << 40),
                    share: true,
                })
                .collect();
            let hvas: Vec<u64> = flat.iter().map(|r| (1 << 44) + r.offset).collect();
            if let Ok(layout) = RamLayout::build(&backends, &flat, &hvas) {
                for w in layout.ranges.windows(2) {
                    assert!(w[0].gpa + w[0].len <= w[1].gpa, "sorted and disjoint");
                }
                for r in &layout.ranges {
                    let b = &layout.backends[r.backend as usize];
                    assert!(r.offset + r.len <= b.size);
                    if r.len >= 4 {
                        assert_eq!(
                            layout.translate(r.gpa, 4),
                            Some((r.backend as usize, r.offset))
                        );
                        let last = r.gpa + r.len - 4;
                        assert_eq!(
                            layout.translate(last, 4),
                            Some((r.backend as usize, r.offset + r.len - 4))
                        );
                    }
                    // Four bytes that run past the range's end are refused
                    // (they would be in another range, or in none).
                    if r.len >= 2 {
                        assert_eq!(layout.translate(r.gpa + r.len - 2, 4), None);
                    }
                }
            }
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
    }
    for gpa in [0, 0x1_0000_0000] {
        if let Err(e) = parse_gpa2hva(&text, gpa) {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
    if let Ok(Some(v)) = parse_message(data, "query-stats") {
        let ret = v.get("return").unwrap_or(&v);
        let paths = vec![
            (0, "/machine/unattached/device[0]".to_owned()),
            (3, "/cpu3".to_owned()),
        ];
        if let Ok(stats) = parse_kvm_stats(ret, ret, &paths) {
            assert!(stats.vcpus.keys().all(|k| *k == 0 || *k == 3));
            assert!(stats.vm.len() <= MAX_VM_STATS);
        }
    }
});
