//! Mapping a VM's shared RAM for introspection, with this process standing
//! in for QEMU: it maps a memfd (named as QEMU names its memfd backends) or
//! a file shared and writable, the daemon's [`GuestRam`] finds that mapping
//! in `/proc/self/maps`, opens it through `map_files` and reads what this
//! process writes, at the guest-physical addresses of a layout with a hole.
//! Files of another user or on a disk filesystem, addresses where nothing
//! (or something else) is mapped and truncated files are refused or reported. Needs root (opening
//! `/proc/<pid>/map_files` needs `CAP_SYS_ADMIN`).

mod common;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::preempt_disabled_bits;
use pvsched_abi::CpuInfoTable;
use pvsched_host::discovery::{BackendKind, MemoryBackend};
use pvsched_host::guestram::{parse_vma, FlatRange, GuestRam, MapError, RamLayout, Vma};
use pvsched_host::HostFs;
use pvsched_policy::controller::GuestMemory;

const MIB: u64 = 1 << 20;
/// Where the second RAM range starts: above a hole, as on q35 past 4 GiB.
const HIGH: u64 = 0x1_0000_0000;

/// This process's own mapping of the file `meta` describes.
fn own_vma(meta: &std::fs::Metadata) -> Vma {
    let dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(parse_vma)
        .find(|v| (v.dev, v.inode) == (dev, meta.ino()))
        .expect("the stand-in's own mapping")
}

fn own_starttime() -> u64 {
    let pid = std::process::id() as i32;
    HostFs::default().task_stat(pid, pid).unwrap().starttime
}

/// A memfd of `len` bytes, as QEMU's memory-backend-memfd makes it.
fn memfd(len: u64) -> File {
    let fd =
        rustix::fs::memfd_create("memory-backend-memfd", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let file = File::from(fd);
    file.set_len(len).unwrap();
    file
}

/// 1 MiB at GPA 0 (backend offset 0), 3 MiB at [`HIGH`] (offset 1 MiB).
fn two_ranges(id: &str, kind: BackendKind, hva: u64) -> RamLayout {
    let backend = MemoryBackend {
        id: id.into(),
        kind,
        size: Some(4 * MIB),
        share: true,
    };
    let flat = [
        FlatRange {
            gpa: 0,
            len: MIB,
            name: id.into(),
            offset: 0,
        },
        FlatRange {
            gpa: HIGH,
            len: 3 * MIB,
            name: id.into(),
            offset: MIB,
        },
    ];
    RamLayout::build(&[backend], &flat, &[hva, hva + MIB]).unwrap()
}

fn map(layout: RamLayout, slots: usize) -> Result<GuestRam, MapError> {
    GuestRam::map(
        &HostFs::default(),
        std::process::id() as i32,
        own_starttime(),
        layout,
        slots,
    )
}

#[test]
fn a_memfd_backend_is_read_at_the_guest_physical_addresses_of_its_layout() {
    if !common::root_or_skip("mapping guest RAM through map_files") {
        return;
    }
    let file = memfd(4 * MIB);
    let meta = file.metadata().unwrap();
    // The stand-in QEMU's own mapping, shared and writable.
    let qemu = SharedFile::from_file(file).unwrap();
    let vma = own_vma(&meta);
    assert!(vma.path.starts_with("/memfd:memory-backend-memfd"));
    let ram = map(two_ranges("ram", BackendKind::Memfd, vma.start), 3).unwrap();
    let guest = qemu.region();
    guest
        .store_u32(0x2000, 0xdead_0001, Ordering::Relaxed)
        .unwrap();
    guest
        .store_u32((MIB + 0x10) as usize, 0x0000_0102, Ordering::Relaxed)
        .unwrap();
    assert_eq!(ram.read_u32(0x2000), Some(0xdead_0001));
    assert_eq!(ram.read_u32(HIGH + 0x10), Some(0x102));
    // The same backend offset is not at its own GPA above the hole.
    assert_eq!(ram.read_u32(MIB + 0x10), None);
    assert_eq!(ram.read_u32(HIGH + 3 * MIB), None);
    assert_eq!(ram.read_u32(0x2002), None);

    // The guest's CPU-info table in a pvsched region: slot 0 below the hole,
    // slot 1 above it, slot 2 pointing where no RAM is.
    let region_file = common::ShmFile::new(4096);
    let region_map = region_file.map();
    let region = region_map.region();
    let table = CpuInfoTable::place(3, region.len()).unwrap();
    for (slot, gpa) in [(0u32, 0x2000u64), (1, HIGH + 0x10), (2, 2 * MIB)] {
        let off = table.entry_offset(slot).unwrap();
        region.store_u64(off, gpa, Ordering::Relaxed).unwrap();
        region.store_u32(off + 8, slot, Ordering::Relaxed).unwrap();
    }
    let mut ram = ram;
    ram.read_table(&region, table, 1);
    assert_eq!(ram.valid_entries(), 2);
    assert_eq!(
        ram.preempt_count(0),
        Some(preempt_disabled_bits(0xdead_0001))
    );
    assert_eq!(ram.preempt_count(1), Some(0x102));
    assert_eq!(ram.preempt_count(2), None);
    assert!(ram
        .slot_view(2)
        .refused
        .unwrap()
        .contains("not inside one RAM range"));
    // Reads follow what the guest writes next.
    guest
        .store_u32((MIB + 0x10) as usize, 0, Ordering::Relaxed)
        .unwrap();
    assert_eq!(ram.preempt_count(1), Some(0));
    assert_eq!(ram.slot_view(1).last, Some(0));
    assert_eq!(ram.slot_view(1).gpa, Some(HIGH + 0x10));
    assert_eq!(ram.reads(), 3);
    // A wrong cpu_id is refused at the next read of the table.
    let off = table.entry_offset(0).unwrap();
    region.store_u32(off + 8, 7, Ordering::Relaxed).unwrap();
    ram.read_table(&region, table, 1);
    assert_eq!(ram.preempt_count(0), None);
    assert_eq!(
        ram.slot_view(0).refused.as_deref(),
        Some("cpu_id is not the entry index")
    );
    drop(qemu);
}

#[test]
fn files_of_another_user_and_addresses_that_do_not_hold_the_backend_are_refused() {
    if !common::root_or_skip("mapping guest RAM through map_files") {
        return;
    }
    let nobody = match pvsched_host::sys::uid_of_user("nobody") {
        Ok(Some(uid)) => uid,
        _ => {
            eprintln!("SKIPPED: no user nobody");
            return;
        }
    };
    // A file of another user that this (root) process maps shared: the
    // daemon must not read it on this process's word.
    let foreign = common::ShmFile::new(4 * MIB);
    std::os::unix::fs::chown(&foreign.path, Some(nobody), None).unwrap();
    let vma = own_vma(&std::fs::metadata(&foreign.path).unwrap());
    let kind = BackendKind::File {
        mem_path: foreign.path.clone(),
    };
    let err = map(two_ranges("mem", kind.clone(), vma.start), 1).unwrap_err();
    assert!(
        matches!(&err, MapError::Refused { id, why } if id == "mem" && why.contains(&format!("owned by uid {nobody}"))),
        "{err}"
    );
    // Root's own file is fine at the same place.
    std::os::unix::fs::chown(&foreign.path, Some(0), None).unwrap();
    assert!(map(two_ranges("mem", kind.clone(), vma.start), 1).is_ok());
    // A memfd backend the maps show as a file there: not what QEMU said.
    let err = map(two_ranges("ram", BackendKind::Memfd, vma.start), 1).unwrap_err();
    assert!(err.to_string().contains("a memfd backend"), "{err}");
    // A file on a disk filesystem (the build directory's), root's, mapped
    // shared: refused, a page fault there could wait for the disk.
    let disk_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let on_disk = disk_dir.path().join("ram");
    File::create(&on_disk).unwrap().set_len(4 * MIB).unwrap();
    let disk_map = SharedFile::open(&on_disk, None).unwrap();
    let disk_vma = own_vma(&std::fs::metadata(&on_disk).unwrap());
    let on_tmpfs = rustix::fs::statfs(&on_disk).unwrap().f_type as u64 == libc::TMPFS_MAGIC as u64;
    if !on_tmpfs {
        let disk_kind = BackendKind::File { mem_path: on_disk };
        let err = map(two_ranges("mem", disk_kind, disk_vma.start), 1).unwrap_err();
        assert!(err.to_string().contains("not tmpfs or hugetlbfs"), "{err}");
    }
    drop(disk_map);
    // Nothing mapped at the address QEMU gave.
    let err = map(two_ranges("mem", kind.clone(), 0x1000), 1).unwrap_err();
    assert!(err.to_string().contains("maps nothing"), "{err}");
    // Mapped, but shorter than the backend: the 4 MiB do not fit past the start.
    let err = map(two_ranges("mem", kind, vma.start + 2 * MIB), 1).unwrap_err();
    assert!(err.to_string().contains("maps only"), "{err}");
}

#[test]
fn a_truncated_backend_file_reads_nothing_and_reports_the_fault() {
    if !common::root_or_skip("mapping guest RAM through map_files") {
        return;
    }
    let backend = common::ShmFile::new(4 * MIB);
    let vma = own_vma(&std::fs::metadata(&backend.path).unwrap());
    let kind = BackendKind::File {
        mem_path: backend.path.clone(),
    };
    let ram = map(two_ranges("mem", kind, vma.start), 1).unwrap();
    assert_eq!(ram.read_u32(HIGH + 0x1000), Some(0));
    assert!(!ram.faulted());
    File::options()
        .write(true)
        .open(&backend.path)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    // Past the new end: the fault is caught, the read yields nothing.
    assert_eq!(ram.read_u32(HIGH + 0x1000), None);
    assert!(ram.faulted());
}
