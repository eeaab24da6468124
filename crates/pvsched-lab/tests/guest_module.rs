//! End-to-end: builds `guest/kmod`, boots a 2-vCPU TCG guest whose shared page carries a
//! host header (standing in for the daemon), and checks from the host side of the page
//! that the module attached and keeps its heartbeat and slots moving; that the local
//! timer's interrupts are counted on a quiet guest; that `enable=0` clears every line and
//! detaches (and `enable=1` attaches again); and that a host without the doorbell feature
//! is never rung. Needs root, QEMU,
//! /dev/shm, make and the cloud kernel headers; skips with a message otherwise
//! (fails under `CI=true`).
//! Set `PVSCHED_LAB_SKIP=1` to skip it on purpose.

mod common;

use std::path::Path;
use std::time::Duration;

use pvsched_abi::raw::{
    PvschedGuestLine, PvschedHeaderGuest, PVSCHED_FEAT_DOORBELL, PVSCHED_FEAT_KNOWN,
    PVSCHED_GUEST_ATTACHED, PVSCHED_GUEST_DETACHED, PVSCHED_GUEST_FLAG_ONLINE,
    PVSCHED_VERSION_MAJOR, PVSCHED_VERSION_MINOR,
};
use pvsched_abi::GuestDoorbellCounters;
use pvsched_lab::{
    build_guest_module, collect, AccelChoice, Guest, GuestConfig, InitControl, Initramfs,
    InitramfsSpec, Workload,
};

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
    let kmod_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/kmod");
    let module = build_guest_module(&kmod_dir, &assets.kernel_headers).expect("build module");

    let name = format!("labmod-{}", std::process::id());
    let workload = Workload::Idle { duration_s: 4 };
    let initrd = std::env::temp_dir().join(format!("{name}.cpio"));
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone()],
            module: Some(module),
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
    let kmod_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/kmod");
    let module = build_guest_module(&kmod_dir, &assets.kernel_headers).expect("build module");

    let name = format!("labmodoff-{}", std::process::id());
    // A quiet guest: init sleeps; no NIC, no disk, a silent console.
    let workload = Workload::Idle { duration_s: 4 };
    let initrd = std::env::temp_dir().join(format!("{name}.cpio"));
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone()],
            module: Some(module),
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
