//! `pvsched hostd` against a real QEMU (TCG, no guest kernel, no guest
//! module): the test writes guest lines into the shared file as a guest
//! would and watches the vCPU threads' scheduling policy in /proc.
//!
//! The "BIOS" is 64 KiB whose reset vector is `jmp $`: vCPU 0 spins (burns
//! host CPU, so a boost it asks for forever hits the budget), vCPU 1 stays
//! halted waiting for a SIPI. Needs qemu-system-x86_64 and root; prints a
//! SKIPPED line otherwise, or fails under `CI=true`.

mod common;

use std::process::Command;

use common::{require, wait_for, watchdog_of, Guest, HostdConfig, Vm, TIGHT_BUDGET};
use pvsched_abi::raw::*;

/// The VM named "it", spinning in the firmware.
fn spinning_vm() -> common::VmBuilder {
    Vm::builder("it").spinning()
}

/// Listed as `[[vm]]`, or found by discovery when its shared file has a
/// directory of its own; the tight budget.
fn config(vm: &Vm) -> std::path::PathBuf {
    vm.write_config(&HostdConfig {
        policy: TIGHT_BUDGET,
        ..vm.hostd_config()
    })
}

#[test]
fn hostd_boosts_throttles_unboosts_and_restores_real_qemu_vcpu_threads() {
    require!();
    let mut vm = spinning_vm().start();
    let config = config(&vm);
    let tids = vm.vcpu_tids();
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon(&config);
    let mut guest = Guest::attach_when_ready(&vm.shm);
    guest.ask(0, false);

    // 1. vCPU 1 asks: exactly its thread becomes SCHED_RR, with QEMU's main
    // thread, which delivers its interrupts (timers under TCG).
    let main = vm.pid();
    let mut boosted = vec![tids[1], main];
    boosted.sort();
    guest.ask(1, true);
    wait_for("vCPU 1 boosted", || vm.policy(tids[1]) == 2);
    wait_for("main thread boosted", || vm.policy(main) == 2);
    assert_eq!(vm.rt_threads(), boosted, "{}", vm.log(d0));
    assert_eq!(guest.host(1).boost_state, PVSCHED_BOOST_BOOSTED);

    // 2. The spinning vCPU 0 asks forever: boosted, then throttled.
    guest.ask(0, true);
    wait_for("vCPU 0 throttled", || {
        guest.host(0).boost_state == PVSCHED_BOOST_THROTTLED
    });
    let line = guest.host(0);
    assert!(line.boosts >= 1 && line.throttles >= 1, "{line:?}");
    assert_eq!(vm.policy(tids[0]), 0, "throttled thread still RT");
    guest.ask(0, false);

    // 3. The request ends: unboosted.
    guest.ask(1, false);
    wait_for("vCPU 1 unboosted", || vm.policy(tids[1]) == 0);
    assert_eq!(guest.host(1).boost_state, PVSCHED_BOOST_NORMAL);

    // 4. Boosted again, then SIGTERM: every thread restored, state file gone.
    guest.ask(1, true);
    wait_for("vCPU 1 boosted again", || vm.policy(tids[1]) == 2);
    vm.stop_daemon_restoring(d0);

    // 5. A new daemon boosts again; kill -9 leaves the thread RT...
    let d1 = vm.start_daemon(&config);
    wait_for("vCPU 1 boosted by the second daemon", || {
        vm.policy(tids[1]) == 2
    });
    wait_for("main thread boosted by the second daemon", || {
        vm.policy(main) == 2
    });
    // Both processes die at once (as with a cgroup kill): first the watchdog,
    // which would otherwise restore (tests/hostd_watchdog.rs), then the daemon.
    let watchdog = watchdog_of(vm.daemon_pid(d1)).expect("no watchdog");
    common::signal(watchdog, "KILL");
    vm.kill_daemon(d1);
    assert_eq!(vm.rt_threads(), boosted);
    assert!(vm.state_file().exists());
    // ...the guest stops asking, and the next daemon reconciles at start.
    guest.ask(1, false);
    let d2 = vm.start_daemon(&config);
    wait_for("vCPU 1 restored by reconciliation", || {
        vm.policy(tids[1]) == 0
    });
    wait_for("the reconcile log line", || {
        vm.log(d2).contains("restored 2 thread")
    });
    assert!(vm.rt_threads().is_empty());
    vm.stop_daemon(d2);
    assert!(vm.rt_threads().is_empty());
    eprintln!(
        "QEMU pid {} vCPU threads {tids:?}: boost, throttle, unboost, SIGTERM restore, kill -9 + reconcile all checked",
        vm.pid()
    );
}

#[test]
fn hostd_once_discovers_a_qemu_vm_and_changes_nothing() {
    require!();
    let vm = spinning_vm().shm_in_own_dir().start();
    let tids = vm.vcpu_tids();
    let before = std::fs::read(&vm.shm).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pvsched"))
        .args(["hostd", "--once", "--json", "--config"])
        .arg(config(&vm))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = status["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{status}");
    assert_eq!(vms[0]["discovered"], true);
    assert_eq!(vms[0]["pid"], vm.pid());
    let found: Vec<i64> = vms[0]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["tid"].as_i64())
        .collect();
    assert_eq!(
        found,
        tids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read(&vm.shm).unwrap(),
        before,
        "--once wrote the page"
    );
    eprintln!(
        "discovered QEMU pid {} with vCPU threads {tids:?}",
        vm.pid()
    );
}
