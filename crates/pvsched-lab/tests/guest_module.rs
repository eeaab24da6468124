//! End-to-end: builds `guest/kmod`, boots a 2-vCPU TCG guest whose shared page carries a
//! host header (standing in for the daemon), and checks from the host side of the page
//! that the module attached and keeps its heartbeat and slots moving. Needs root, QEMU,
//! /dev/shm, make and the cloud kernel headers; skips with a message otherwise
//! (fails under `CI=true`).
//! Set `PVSCHED_LAB_SKIP=1` to skip it on purpose.

mod common;

use std::path::Path;
use std::time::Duration;

use pvsched_abi::raw::{
    PvschedGuestLine, PvschedHeaderGuest, PVSCHED_FEAT_KNOWN, PVSCHED_GUEST_ATTACHED,
    PVSCHED_GUEST_FLAG_ONLINE,
};
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
    let header = pvsched_abi::decode::new_host_header(config.vcpus, PVSCHED_FEAT_KNOWN, 1);
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
        result.diagnostics.contains("attached: host ABI 1.0"),
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
}
