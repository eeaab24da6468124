//! End-to-end: builds `guest/kmod`, boots a 2-vCPU TCG guest whose shared page carries a
//! host header (standing in for the daemon), and checks from the host side of the page
//! that the module attached and keeps its heartbeat and slots moving; that the local
//! timer's interrupts are counted on a quiet guest; that `enable=0` clears every line and
//! detaches (and `enable=1` attaches again); and that a host without the doorbell feature
//! is never rung. A third guest checks the CPU-info table (preempt-count addresses on a
//! page-mapped per-CPU area), the sampled critical-section signal against a real spinlock
//! holder (the `hold_lock` hook), and the user-space interface (`/dev/pvsched` through
//! mmap, sysfs). Needs root, QEMU, /dev/shm, make, a C compiler and the cloud kernel
//! headers; skips with a message otherwise (fails under `CI=true`).
//! Set `PVSCHED_LAB_SKIP=1` to skip it on purpose.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use pvsched_abi::raw::{
    PvschedCpuInfo, PvschedGuestLine, PvschedHeaderGuest, PvschedHostLine, PVSCHED_BOOST_BOOSTED,
    PVSCHED_FEAT_CRITICAL_SECTION, PVSCHED_FEAT_DOORBELL, PVSCHED_FEAT_KNOWN,
    PVSCHED_FEAT_PREEMPT_COUNT_GPA, PVSCHED_GUEST_ATTACHED, PVSCHED_GUEST_DETACHED,
    PVSCHED_GUEST_FLAG_ONLINE, PVSCHED_VERSION_MAJOR, PVSCHED_VERSION_MINOR,
};
use pvsched_abi::{decode_cpu_info, CpuInfoTable, GuestDoorbellCounters};
use pvsched_lab::{
    build_guest_module, collect, AccelChoice, Guest, GuestConfig, InitControl, Initramfs,
    InitramfsSpec, LabAssets, Workload,
};

/// Builds `guest/kmod` once for every test in this binary: the tests run in parallel, and
/// kbuild runs in one directory at the same time trip over each other's object files.
fn guest_module(assets: &LabAssets) -> PathBuf {
    static MODULE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = MODULE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(module) = built.as_ref() {
        return module.clone();
    }
    let kmod_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/kmod");
    let module = build_guest_module(&kmod_dir, &assets.kernel_headers).expect("build module");
    *built = Some(module.clone());
    module
}

/// Reads the guest half of the header and slot 0's guest line from the host file.
fn host_view(path: &Path) -> Option<(PvschedHeaderGuest, PvschedGuestLine)> {
    let bytes = std::fs::read(path).ok()?;
    let header: [u8; 64] = bytes.get(64..128)?.try_into().ok()?;
    let slot0: [u8; 64] = bytes.get(128..192)?.try_into().ok()?;
    Some((
        PvschedHeaderGuest::from_bytes(&header),
        PvschedGuestLine::from_bytes(&slot0),
    ))
}

#[test]
fn guest_module_attaches_and_publishes() {
    let Some(assets) = common::assets_or_skip("guest_module_attaches_and_publishes", true) else {
        return;
    };
    let module = guest_module(&assets);

    let name = format!("labmod-{}", std::process::id());
    let workload = Workload::Idle { duration_s: 4 };
    let initrd = std::env::temp_dir().join(format!("{name}.cpio"));
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone()],
            module: Some(module),
            kernel_modules: Vec::new(),
            files: Vec::new(),
            module_params: "enable=1".into(),
            workload: workload.clone(),
            diagnostics: vec![
                "dmesg | grep pvsched_guest".into(),
                "cat /sys/kernel/debug/pvsched/host".into(),
                "rmmod pvsched_guest && echo rmmod-ok".into(),
            ],
            control: InitControl::default(),
        },
        &initrd,
    )
    .expect("build initramfs");

    let mut config = GuestConfig::new(&name, &assets.kernel_image, &initramfs.path);
    config.accel = AccelChoice::Tcg;
    // The host offers a doorbell, but the device is ivshmem-plain (no MSI-X): the module
    // must attach as without one and never ring.
    let mut header = pvsched_abi::decode::new_host_header(config.vcpus, PVSCHED_FEAT_KNOWN, 1);
    pvsched_abi::Doorbell::advertise(pvsched_abi::Doorbell::new(1, 1), &mut header);
    config.shm_initial_contents = Some(header.to_bytes().to_vec());

    let mut guest = Guest::boot(&config).expect("boot");
    // Sample the page while the 4 s idle workload runs: once after attach, then
    // again a second later. An idle vCPU 0 may see no switch or interrupt for
    // that second, so keep looking (while the workload still runs) until both
    // the heartbeat and slot 0 have moved, or the workload is nearly over.
    std::thread::sleep(Duration::from_millis(1500));
    let first = host_view(guest.shm_path()).expect("read shared page");
    std::thread::sleep(Duration::from_millis(1000));
    let mut second = host_view(guest.shm_path()).expect("read shared page");
    for _ in 0..14 {
        if second.0.guest_heartbeat > first.0.guest_heartbeat && second.1.updates > first.1.updates
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        second = host_view(guest.shm_path()).expect("read shared page");
    }
    let result = collect(&mut guest, &workload).expect("collect");
    drop(guest);
    let _ = std::fs::remove_file(&initrd);

    eprintln!("module {:?}\n{}", result.module, result.diagnostics);
    assert_eq!(result.module.as_deref(), Some("loaded"));
    assert!(
        result.diagnostics.contains(&format!(
            "attached: host ABI {PVSCHED_VERSION_MAJOR}.{PVSCHED_VERSION_MINOR}"
        )),
        "{}",
        result.diagnostics
    );
    assert!(
        result.diagnostics.contains("rmmod-ok"),
        "{}",
        result.diagnostics
    );
    let (header1, slot1) = first;
    let (header2, slot2) = second;
    assert_eq!(header1.guest_state, PVSCHED_GUEST_ATTACHED);
    assert_eq!(header1.guest_version_major, 1);
    assert!(
        header2.guest_heartbeat > header1.guest_heartbeat,
        "heartbeat advances"
    );
    assert!(slot2.updates > slot1.updates, "slot 0 updates advance");
    assert_eq!(slot2.cpu_id, 0);
    assert_ne!(slot2.flags & PVSCHED_GUEST_FLAG_ONLINE, 0);
    assert_eq!(slot2.seq % 2, 0, "published line is not mid-write");
    assert!(
        result
            .diagnostics
            .contains("host offers a doorbell but the device has no MSI-X doorbell"),
        "{}",
        result.diagnostics
    );
    assert_eq!(header2.guest_features & PVSCHED_FEAT_DOORBELL, 0);
    assert_eq!(
        GuestDoorbellCounters::from_header(&header2),
        GuestDoorbellCounters::default()
    );
}

/// The guest half of the header and every slot's guest line, from the host file.
fn host_view_all(path: &Path, slots: u32) -> Option<(PvschedHeaderGuest, Vec<PvschedGuestLine>)> {
    let bytes = std::fs::read(path).ok()?;
    let header: [u8; 64] = bytes.get(64..128)?.try_into().ok()?;
    let lines = (0..slots as usize)
        .map(|slot| {
            let start = 128 + slot * 128;
            let line: [u8; 64] = bytes.get(start..start + 64)?.try_into().ok()?;
            Some(PvschedGuestLine::from_bytes(&line))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((PvschedHeaderGuest::from_bytes(&header), lines))
}

fn irq_count_sum(lines: &[PvschedGuestLine]) -> u64 {
    lines.iter().map(|line| line.irq_count).sum()
}

const ENABLE_PARAM: &str = "/sys/module/pvsched_guest/parameters/enable";

#[test]
fn guest_module_counts_timer_interrupts_detaches_on_enable_0_and_never_rings_without_doorbell() {
    let test = "guest_module_counts_timer_interrupts_detaches_on_enable_0_and_never_rings_without_doorbell";
    let Some(assets) = common::assets_or_skip(test, true) else {
        return;
    };
    let module = guest_module(&assets);

    let name = format!("labmodoff-{}", std::process::id());
    // A quiet guest: init sleeps; no NIC, no disk, a silent console.
    let workload = Workload::Idle { duration_s: 4 };
    let initrd = std::env::temp_dir().join(format!("{name}.cpio"));
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone()],
            module: Some(module),
            kernel_modules: Vec::new(),
            files: Vec::new(),
            module_params: "enable=1".into(),
            workload: workload.clone(),
            diagnostics: vec![
                // RT wakeups: reasons to ring, had the host offered a doorbell.
                "chrt -f 50 sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.02; done' \
                 && echo rt-wakeups-ok"
                    .into(),
                "cat /sys/kernel/debug/pvsched/guest".into(),
                format!("echo 0 > {ENABLE_PARAM} && echo disable-ok"),
                format!("cat {ENABLE_PARAM}"),
                format!("echo 1 > {ENABLE_PARAM} && echo enable-ok"),
                "sleep 1".into(),
                "cat /sys/kernel/debug/pvsched/guest".into(),
                format!("echo 0 > {ENABLE_PARAM} && echo disable-again-ok"),
                "dmesg | grep pvsched_guest".into(),
            ],
            control: InitControl::default(),
        },
        &initrd,
    )
    .expect("build initramfs");

    let mut config = GuestConfig::new(&name, &assets.kernel_image, &initramfs.path);
    config.accel = AccelChoice::Tcg;
    let header = pvsched_abi::decode::new_host_header(config.vcpus, PVSCHED_FEAT_KNOWN, 1);
    assert_eq!(
        header.host_features & PVSCHED_FEAT_DOORBELL,
        0,
        "this host offers no doorbell"
    );
    config.shm_initial_contents = Some(header.to_bytes().to_vec());
    let vcpus = config.vcpus;

    let mut guest = Guest::boot(&config).expect("boot");
    // While init sleeps, the interrupt count of the attached lines must move: on this
    // guest only the local APIC timer (and IPIs) fire, which reach the line through the
    // irq_vectors tracepoints. Keep looking until it moves or the workload is nearly over.
    std::thread::sleep(Duration::from_millis(1500));
    let (attached, first) = host_view_all(guest.shm_path(), vcpus).expect("read shared page");
    let mut later = first.clone();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        later = host_view_all(guest.shm_path(), vcpus)
            .expect("read shared page")
            .1;
        if irq_count_sum(&later) > irq_count_sum(&first) {
            break;
        }
    }
    let result = collect(&mut guest, &workload).expect("collect");
    // QEMU has exited; the file keeps what the guest wrote last (until `guest` drops).
    let (detached, lines) = host_view_all(guest.shm_path(), vcpus).expect("read shared page");
    drop(guest);
    let _ = std::fs::remove_file(&initrd);

    let diag = &result.diagnostics;
    eprintln!("module {:?}\n{diag}", result.module);
    assert_eq!(result.module.as_deref(), Some("loaded"));
    assert_eq!(attached.guest_state, PVSCHED_GUEST_ATTACHED);
    assert_eq!(attached.guest_generation, 1);
    assert!(
        irq_count_sum(&later) > irq_count_sum(&first),
        "irq_count does not move on a quiet guest: {} then {}\n{diag}",
        irq_count_sum(&first),
        irq_count_sum(&later)
    );
    assert!(
        !diag.contains("optional tracepoints not attached"),
        "a vector tracepoint is missing on the lab kernel\n{diag}"
    );

    for marker in [
        "rt-wakeups-ok",
        "disable-ok",
        "enable-ok",
        "disable-again-ok",
        "doorbell=off",
    ] {
        assert!(diag.contains(marker), "{marker} missing\n{diag}");
    }
    // The parameter reads back as off after the first write of 0.
    let after_disable = diag.split("disable-ok").nth(1).unwrap_or_default();
    assert_eq!(
        after_disable.lines().map(str::trim).find(|l| !l.is_empty()),
        Some("N"),
        "{diag}"
    );
    assert_eq!(diag.matches("detached").count(), 2, "{diag}");
    // Hard interrupts do not nest on x86, and the CPU that runs `cat` is in process
    // context: a published depth above 1, or none at 0, is an exit that went unseen.
    for dump in diag.split("version=").skip(1) {
        let depths: Vec<u32> = dump
            .lines()
            .filter(|l| l.starts_with("cpu"))
            .filter_map(|l| {
                l.split("irq_depth=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        assert_eq!(depths.len(), vcpus as usize, "{dump}");
        assert!(depths.iter().all(|&d| d <= 1), "irq_depth leaked: {dump}");
        assert!(depths.contains(&0), "irq_depth leaked: {dump}");
    }

    // After the last enable=0: detached, re-attached once in between (generation 2).
    assert_eq!(detached.guest_state, PVSCHED_GUEST_DETACHED);
    assert_eq!(detached.guest_generation, 2, "enable=1 attached again");
    // Without the doorbell feature the module never rang, nor tried to.
    assert_eq!(
        GuestDoorbellCounters::from_header(&detached),
        GuestDoorbellCounters::default()
    );
    assert_eq!(detached.guest_features & PVSCHED_FEAT_DOORBELL, 0);
    for (slot, line) in lines.iter().enumerate() {
        assert_eq!(
            line.flags & PVSCHED_GUEST_FLAG_ONLINE,
            0,
            "slot {slot} online"
        );
        assert_eq!(line.seq % 2, 0, "slot {slot} mid-write");
        assert!(line.seq > 0, "slot {slot} was published");
        assert_eq!(
            *line,
            PvschedGuestLine {
                seq: line.seq,
                cpu_id: slot as u32,
                ..Default::default()
            },
            "slot {slot} is cleared"
        );
    }
}

/// Builds `guest/tools/pvsched-peek.c` (the user-space reader of `/dev/pvsched`) for the
/// guest: a dynamically linked program, copied with its libraries like `chrt`.
fn build_peek_tool(out_dir: &Path) -> PathBuf {
    let guest_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest");
    let tool = out_dir.join("pvsched-peek");
    let status = std::process::Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(guest_dir.join("kmod"))
        .arg("-o")
        .arg(&tool)
        .arg(guest_dir.join("tools/pvsched-peek.c"))
        .status()
        .expect("run cc");
    assert!(status.success(), "cc pvsched-peek.c: {status}");
    tool
}

/// The lines after the line `marker` up to the next line `--`.
fn section<'a>(diag: &'a str, marker: &str) -> &'a str {
    let mut offset = 0;
    for line in diag.split_inclusive('\n') {
        offset += line.len();
        if line.trim_end() == marker {
            let rest = &diag[offset..];
            return &rest[..rest.find("\n--").map_or(rest.len(), |end| end + 1)];
        }
    }
    panic!("{marker} missing\n{diag}");
}

/// `key=value` of the line starting with `prefix ` in `text`, parsed.
fn field<T: std::str::FromStr>(text: &str, prefix: &str, key: &str) -> T {
    let line = text
        .lines()
        .find(|line| line.starts_with(&format!("{prefix} ")))
        .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"));
    line.split(' ')
        .find_map(|word| word.strip_prefix(&format!("{key}=")))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn cpu_info_entries(path: &Path, offset: usize, entries: usize) -> Vec<PvschedCpuInfo> {
    let bytes = std::fs::read(path).expect("read shared page");
    (0..entries)
        .map(|i| {
            let at = offset + i * PvschedCpuInfo::SIZE;
            PvschedCpuInfo::from_bytes(bytes[at..at + PvschedCpuInfo::SIZE].try_into().unwrap())
        })
        .collect()
}

const DEBUGFS: &str = "/sys/kernel/debug/pvsched";
const SYSFS: &str = "/sys/class/misc/pvsched";

/// The CPU-info table, the sampled critical-section signal with a real lock holder, and
/// the user-space interface. The guest boots with `percpu_alloc=page`, so its per-CPU
/// areas are page-mapped and an address taken with `__pa()` would be wrong: the module's
/// self-check reads each published address back and compares it with the live count.
/// The host offers three slots to a 2-CPU guest (entry 2 belongs to no CPU) and writes a
/// recognisable host line for vCPU 1, which sysfs and the mmap of `/dev/pvsched` show.
#[test]
fn guest_module_publishes_preempt_count_addresses_samples_lock_holds_and_maps_the_region() {
    let test =
        "guest_module_publishes_preempt_count_addresses_samples_lock_holds_and_maps_the_region";
    let Some(assets) = common::assets_or_skip(test, true) else {
        return;
    };
    let module = guest_module(&assets);
    let name = format!("labmodcs-{}", std::process::id());
    let tool_dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&tool_dir).expect("tool dir");
    let peek = build_peek_tool(&tool_dir);

    let hold = format!("{DEBUGFS}/hold_lock");
    let guest_dump = |marker: &str| format!("echo {marker}; cat {DEBUGFS}/guest; echo --");
    let workload = Workload::Idle { duration_s: 3 };
    let initrd = std::env::temp_dir().join(format!("{name}.cpio"));
    let diagnostics = vec![
        // Keep the shell off CPU 1, where the holds run.
        "taskset -p 1 $$ > /dev/null".into(),
        format!("echo cpu-info; cat {DEBUGFS}/cpu_info; echo --"),
        format!(
            "echo sysfs; for f in attached region_size host_generation nr_slots features \
             host_features guest_features; do echo \"$f $(cat {SYSFS}/$f)\"; done; echo --"
        ),
        format!("echo host-lines; cat {SYSFS}/host_lines; echo --"),
        "ls -l /dev/pvsched".into(),
        "echo peek; pvsched-peek --check-refusals && echo peek-ok; echo --".into(),
        guest_dump("before-holds"),
        format!("echo '1 1500 lock' > {hold} && echo lock-hold-started"),
        format!("echo '0 100 lock' > {hold} || echo busy-refused"),
        "sleep 0.5".into(),
        format!("echo hold-during-lock; cat {hold}; echo --"),
        guest_dump("guest-during-lock"),
        "sleep 1.5".into(),
        format!("echo hold-after-lock; cat {hold}; echo --"),
        guest_dump("guest-after-lock"),
        format!("echo '1 1500 nolock' > {hold} && echo nolock-hold-started"),
        "sleep 2".into(),
        format!("echo hold-after-nolock; cat {hold}; echo --"),
        guest_dump("guest-after-nolock"),
        format!("echo '1 0 lock' > {hold} || echo refused-zero-ms"),
        format!("echo '1 10001 lock' > {hold} || echo refused-over-cap"),
        format!("echo '2 100 lock' > {hold} || echo refused-offline-cpu"),
        format!("echo '1 100 spin' > {hold} || echo refused-bad-mode"),
        format!("echo 0 > {ENABLE_PARAM} && echo disable-ok"),
        format!("echo cpu-info-detached; cat {DEBUGFS}/cpu_info; echo --"),
        format!("echo \"attached-after-disable $(cat {SYSFS}/attached)\""),
        "rmmod pvsched_guest && echo rmmod-ok".into(),
        "dmesg | grep pvsched_guest".into(),
        "dmesg | grep 'percpu:'".into(),
    ];
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone(), peek],
            module: Some(module),
            kernel_modules: Vec::new(),
            files: Vec::new(),
            module_params: "enable=1".into(),
            workload: workload.clone(),
            diagnostics,
            control: InitControl::default(),
        },
        &initrd,
    )
    .expect("build initramfs");

    let mut config = GuestConfig::new(&name, &assets.kernel_image, &initramfs.path);
    config.accel = AccelChoice::Tcg;
    config.extra_cmdline = format!("{} percpu_alloc=page", config.extra_cmdline);
    let slots = config.vcpus + 1;
    let mut header = pvsched_abi::decode::new_host_header(slots, PVSCHED_FEAT_KNOWN, 7);
    let table = CpuInfoTable::place(slots, config.shm_size as usize).expect("table fits");
    CpuInfoTable::advertise(Some(table), &mut header);
    let mut page = vec![0u8; table.offset as usize + slots as usize * PvschedCpuInfo::SIZE];
    page[..64].copy_from_slice(&header.to_bytes());
    // vCPU 1's host line, as a daemon would publish it (even seq: not mid-write).
    let host_line = PvschedHostLine {
        seq: 4,
        pcpu: 3,
        boost_state: PVSCHED_BOOST_BOOSTED,
        preempted: 1,
        pcpu_load_permille: 777,
        steal_ns: 4242,
        host_time_ns: 123_456_789,
        ..Default::default()
    };
    page[128 + 128 + 64..128 + 2 * 128].copy_from_slice(&host_line.to_bytes());
    // A stale table entry for the slot without a CPU: the module must clear it.
    page[table.offset as usize + 2 * PvschedCpuInfo::SIZE..].copy_from_slice(
        &PvschedCpuInfo {
            preempt_count_gpa: 0x1000,
            cpu_id: 2,
            reserved: 0,
        }
        .to_bytes(),
    );
    config.shm_initial_contents = Some(page);

    let mut guest = Guest::boot(&config).expect("boot");
    let mut attached = None;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        let view = host_view_all(guest.shm_path(), slots).expect("read shared page");
        if view.0.guest_state == PVSCHED_GUEST_ATTACHED {
            attached = Some(view.0);
            break;
        }
    }
    let entries = cpu_info_entries(guest.shm_path(), table.offset as usize, slots as usize);
    let result = collect(&mut guest, &workload).expect("collect");
    let (detached, _) = host_view_all(guest.shm_path(), slots).expect("read shared page");
    let entries_after = cpu_info_entries(guest.shm_path(), table.offset as usize, slots as usize);
    drop(guest);
    let _ = std::fs::remove_file(&initrd);
    let _ = std::fs::remove_dir_all(&tool_dir);

    let diag = &result.diagnostics;
    eprintln!("module {:?}\n{diag}", result.module);
    assert_eq!(result.module.as_deref(), Some("loaded"));
    let attached = attached.unwrap_or_else(|| panic!("never attached\n{diag}"));

    // 1. The CPU-info table: one checked address per CPU, entry 2 (no CPU) cleared,
    // advertised while written, zero again after enable=0.
    assert_ne!(
        attached.guest_features & PVSCHED_FEAT_PREEMPT_COUNT_GPA,
        0,
        "{diag}"
    );
    assert_ne!(
        attached.guest_features & PVSCHED_FEAT_CRITICAL_SECTION,
        0,
        "{diag}"
    );
    let cpu_info = section(diag, "cpu-info");
    assert!(
        cpu_info.starts_with(&format!("offset={} entries={slots}\n", table.offset)),
        "{cpu_info}"
    );
    assert!(
        diag.contains(" 4K pages/cpu "),
        "the per-CPU first chunk is not page-mapped\n{diag}"
    );
    for (index, entry) in entries.iter().enumerate() {
        let decoded = decode_cpu_info(entry, index as u32);
        if index < config.vcpus as usize {
            let gpa = decoded
                .unwrap_or_else(|e| panic!("entry {index}: {e}"))
                .unwrap_or_else(|| panic!("entry {index} not published\n{diag}"));
            let shown: String = field(cpu_info, &format!("cpu{index}"), "preempt_count_gpa");
            assert_eq!(
                shown,
                format!("{gpa:#x}"),
                "debugfs shows the published address"
            );
        } else {
            assert_eq!(
                *entry,
                PvschedCpuInfo::default(),
                "entry {index} has no CPU"
            );
        }
    }
    assert_ne!(entries[0].preempt_count_gpa, entries[1].preempt_count_gpa);
    assert!(
        cpu_info
            .lines()
            .any(|l| l.starts_with("selfcheck ") && l.ends_with(" ok")),
        "the published address is not the live preempt count\n{cpu_info}"
    );
    assert!(
        diag.contains("preempt-count addresses of 2 CPUs published"),
        "{diag}"
    );
    assert_eq!(detached.guest_state, PVSCHED_GUEST_DETACHED);
    assert_eq!(detached.guest_features & PVSCHED_FEAT_PREEMPT_COUNT_GPA, 0);
    assert!(
        entries_after
            .iter()
            .all(|e| *e == PvschedCpuInfo::default()),
        "detach zeroes the table: {entries_after:?}"
    );
    assert!(
        section(diag, "cpu-info-detached").starts_with("offset=0 entries=0\n"),
        "{diag}"
    );

    // 2. The sampled signal: a real spinlock holder on CPU 1 shows a depth while it holds
    // and a count per timer tick; the same busy wait with preemption enabled does not.
    for marker in [
        "lock-hold-started",
        "busy-refused",
        "nolock-hold-started",
        "refused-zero-ms",
        "refused-over-cap",
        "refused-offline-cpu",
        "refused-bad-mode",
        "disable-ok",
        "attached-after-disable 0",
        "rmmod-ok",
    ] {
        assert!(diag.contains(marker), "{marker} missing\n{diag}");
    }
    let during = section(diag, "hold-during-lock");
    assert!(
        during.starts_with("running=1 cpu=1 ms=1500 mode=lock completed=0"),
        "{during}"
    );
    let after_lock = section(diag, "hold-after-lock");
    assert!(
        after_lock.starts_with("running=0 cpu=1 ms=1500 mode=lock completed=1"),
        "{after_lock}"
    );
    let after_nolock = section(diag, "hold-after-nolock");
    assert!(
        after_nolock.starts_with("running=0 cpu=1 ms=1500 mode=nolock completed=2"),
        "{after_nolock}"
    );
    let cs = |marker: &str, key: &str| -> u64 { field(section(diag, marker), "cpu1", key) };
    assert!(cs("guest-during-lock", "cs_depth") >= 1, "{diag}");
    let lock_samples = cs("guest-after-lock", "cs_count") - cs("before-holds", "cs_count");
    let nolock_samples = cs("guest-after-nolock", "cs_count") - cs("guest-after-lock", "cs_count");
    let nolock_irqs = cs("guest-after-nolock", "irq_count") - cs("guest-after-lock", "irq_count");
    eprintln!(
        "sampled critical-section signal on CPU 1: {lock_samples} non-zero samples in a 1.5 s lock hold, \
         {nolock_samples} in a 1.5 s preemptible busy wait ({nolock_irqs} interrupts)"
    );
    assert!(
        lock_samples >= 25,
        "a 1.5 s lock hold sampled {lock_samples} times\n{diag}"
    );
    assert!(
        nolock_irqs >= 25,
        "the preemptible hold saw {nolock_irqs} interrupts\n{diag}"
    );
    assert!(
        nolock_samples * 4 < lock_samples,
        "preemptible busy wait: {nolock_samples} critical-section samples, lock hold {lock_samples}\n{diag}"
    );

    // 3. User space: sysfs summary, the device node, and the mmap reader.
    let sysfs = section(diag, "sysfs");
    let sys = |key: &str| -> String {
        sysfs
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("{key} missing\n{sysfs}"))
            .to_owned()
    };
    assert_eq!(sys("attached"), "1");
    assert_eq!(sys("region_size"), config.shm_size.to_string());
    assert_eq!(sys("host_generation"), "7");
    assert_eq!(sys("nr_slots"), slots.to_string());
    assert_eq!(sys("host_features"), format!("{:#x}", header.host_features));
    assert_eq!(
        sys("guest_features"),
        format!("{:#x}", attached.guest_features)
    );
    assert_eq!(
        sys("features"),
        format!("{:#x}", header.host_features & attached.guest_features)
    );
    let host_lines = section(diag, "host-lines");
    assert!(
        host_lines.contains(
            "cpu1 boost_state=1 preempted=1 pcpu_load_permille=777 host_time_ns=123456789\n"
        ),
        "{host_lines}"
    );
    assert_eq!(host_lines.lines().count(), slots as usize, "{host_lines}");
    assert!(diag.contains("cr--r--r--"), "/dev/pvsched is 0444\n{diag}");
    let peek = section(diag, "peek");
    assert!(peek.contains("peek-ok"), "{peek}");
    assert!(peek.starts_with("magic=ok version=1."), "{peek}");
    assert!(
        peek.contains("cpu1 seq=4 pcpu=3 boost_state=1 preempted=1 pcpu_load_permille=777 steal_ns=4242 host_time_ns=123456789\n"),
        "{peek}"
    );
    for refused in [
        "open O_RDWR",
        "private writable mmap",
        "mprotect PROT_WRITE",
        "mmap past the end",
        "mmap at an offset past the end",
    ] {
        assert!(
            peek.contains(&format!("refused: {refused}")),
            "{refused}\n{peek}"
        );
    }
}
