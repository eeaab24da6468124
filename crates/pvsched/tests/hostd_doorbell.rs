//! The doorbell channel end to end: `pvsched hostd` serves QEMU's
//! `ivshmem-doorbell` device, a real Debian cloud kernel guest (TCG) loads the
//! guest module, agrees on the doorbell, and rings the daemon when an RT task
//! wakes on a vCPU the host shows unboosted. The daemon must count the rings,
//! run event-driven for that VM, and the vCPU threads must be seen RT in /proc;
//! after SIGTERM nothing of QEMU is RT.
//!
//! Needs root, QEMU, make and the lab's assets (the cloud kernel and its
//! headers); prints a SKIPPED line otherwise, or fails under `CI=true`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{signal, tasks};
use pvsched_lab::{
    collect, AccelChoice, Guest, GuestConfig, InitControl, Initramfs, InitramfsSpec, Workload,
};

/// The daemon's view of the VM: (attached, event-driven, rings received,
/// guest's rings sent), from its status endpoint.
fn doorbell_view(addr: std::net::SocketAddr) -> Option<(bool, bool, u64, u64)> {
    let body = pvsched_host::daemon::fetch_stats(addr, "/status").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    let vm = status.get("vms")?.as_array()?.first()?.clone();
    let attached = vm.get("attached")?.as_bool()?;
    let door = vm.get("doorbell")?;
    Some((
        attached,
        door.get("event_driven")?.as_bool()?,
        door.get("rings_received")?.as_u64()?,
        door.get("guest_rung")?.as_u64()?,
    ))
}

/// The guest's boost probe on vCPU 1 (its JSON goes on one `boost-probe:` line). The gap
/// outlasts the module's boost-on-idle request (`idle_boost_ms`, 100 ms) and the host's
/// expiry of it, so each timer wake-up finds the vCPU unboosted.
const PROBE: &str = "pvsched-guest boost-probe --cpu 1 --trials 20 --gap-ms 300 --deadline-ms 100";

/// From the probe's line: (trials counted, boost seen p50 and p99 µs, the guest's own
/// wake-up p50 µs, boosted at the first look, timed out).
fn probe_figures(diagnostics: &str) -> Option<(u64, f64, f64, f64, u64, u64)> {
    let line = diagnostics
        .lines()
        .find_map(|l| l.split_once("boost-probe: ").map(|(_, j)| j))?;
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let seen = v.get("boost_seen")?;
    Some((
        seen.get("count")?.as_u64()?,
        seen.get("p50_us")?.as_f64()?,
        seen.get("p99_us")?.as_f64()?,
        v.get("woke")?.get("p50_us")?.as_f64()?,
        v.get("boosted_at_first_look")?.as_u64()?,
        v.get("timed_out")?.as_u64()?,
    ))
}

#[test]
fn a_guest_rings_the_daemon_through_ivshmem_doorbell_and_is_boosted() {
    common::require!();
    let Some(assets) = pvsched_lab::testing::assets_or_skip("hostd_doorbell", true) else {
        return;
    };
    let module = common::guest_module(&assets);
    let tool = common::guest_tool();
    // The daemon first: QEMU will not start without its ivshmem server.
    let common::DoorbellDaemon {
        work,
        server,
        port,
        mut daemon,
    } = common::DoorbellDaemon::start("pvsched-doorbell");
    let log = || std::fs::read_to_string(work.join("hostd.log")).unwrap_or_default();

    // RT wakeups for a few seconds (two loops, so both vCPUs see some): reasons to ring.
    let workload = Workload::Idle { duration_s: 1 };
    let initrd = work.join("initrd.cpio");
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone(), tool],
            module: Some(module),
            kernel_modules: Vec::new(),
            files: Vec::new(),
            module_params: "enable=1".into(),
            workload: workload.clone(),
            diagnostics: vec![
                common::two_rt_loops(150),
                // Guest-measured: RT wake-up to the host line showing the vCPU boosted,
                // through the module's guest line and ring, QEMU and the daemon.
                format!("echo boost-probe: $({PROBE})"),
                "cat /sys/kernel/debug/pvsched/guest".into(),
                "dmesg | grep pvsched_guest".into(),
            ],
            control: InitControl::default(),
        },
        &initrd,
    )
    .expect("build initramfs");
    let mut guest_config = GuestConfig::new(
        format!("door{}", std::process::id()),
        &assets.kernel_image,
        &initramfs.path,
    );
    guest_config.accel = AccelChoice::Tcg;
    guest_config.run_dir = work.clone();
    guest_config.doorbell_server = Some(server.clone());
    let mut guest = Guest::boot(&guest_config).expect("boot with ivshmem-doorbell");
    let qemu = guest.pid();

    // While the guest runs its RT loops: the daemon's view, and the vCPU
    // threads' policy in /proc.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let (mut best, mut rt_samples, mut samples) = (None, 0u32, 0u32);
            while !done.load(Ordering::Relaxed) {
                if let Some(view) = doorbell_view(port) {
                    best = Some(view);
                }
                for (tid, comm) in tasks(qemu) {
                    if comm.starts_with("CPU ") && comm.ends_with("/TCG") {
                        samples += 1;
                        if matches!(common::thread_policy(qemu, tid), Some(1 | 2)) {
                            rt_samples += 1;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (best, rt_samples, samples)
        })
    };
    let result = collect(&mut guest, &workload).expect("collect");
    done.store(true, Ordering::Relaxed);
    let (view, rt_samples, samples) = sampler.join().unwrap();
    let final_view = doorbell_view(port);
    drop(guest);

    signal(daemon.id(), "TERM");
    let status = daemon.wait().unwrap();
    let log = log();
    eprintln!(
        "view {view:?} final {final_view:?}; vCPU RT in {rt_samples} of {samples} samples\n{}\n--- daemon log ---\n{log}",
        result.diagnostics
    );
    assert!(status.success(), "daemon exit {status}\n{log}");
    assert!(
        result.diagnostics.contains("rt-loop-0-ok"),
        "{}",
        result.diagnostics
    );
    assert!(
        result.diagnostics.contains("doorbell: ringing peer 0"),
        "the module did not ring the daemon's peer:\n{}",
        result.diagnostics
    );
    let (attached, event_driven, rings, guest_rung) = final_view.or(view).expect("daemon status");
    let (boosts_seen, p50, p99, woke, first_look, timed_out) = probe_figures(&result.diagnostics)
        .unwrap_or_else(|| panic!("no boost-probe result:\n{}", result.diagnostics));
    eprintln!(
        "guest-measured apply latency over ivshmem-doorbell (timer deadline to boosted in the host line): {boosts_seen} wake-ups, p50 {p50:.0} µs, p99 {p99:.0} µs; the guest's own wake-up p50 {woke:.0} µs; boosted before user space looked: {first_look}; timed out: {timed_out}"
    );
    assert!(
        boosts_seen > 0 && timed_out == 0,
        "RT wake-ups on an unboosted vCPU did not all end boosted:\n{}",
        result.diagnostics
    );
    assert!(attached, "the doorbell VM was never attached\n{log}");
    assert!(event_driven, "the guest did not agree on the doorbell");
    assert!(guest_rung > 0, "the guest never rang");
    assert!(rings > 0, "the daemon received no ring");
    assert!(
        rt_samples > 0,
        "no vCPU thread was seen RT in {samples} samples"
    );
    assert!(log.contains("attached"), "{log}");
    // Dropped with QEMU, threads restored; the socket removed at exit.
    assert!(!server.exists(), "server socket left behind");
    common::remove_unless_panicking(&work);
}
