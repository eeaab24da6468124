//! QEMU IOThreads under `pvsched hostd`, against a real QEMU (TCG, `-S`)
//! started with `-object iothread` twice: the daemon pins them to
//! `iothread_cpus` and, with `iothread_priority`, runs them `SCHED_FIFO`
//! (always with `iothread_boost = "static"`, or while a vCPU of the VM is
//! boosted with "with-vm"), picks up an IOThread added later by QMP
//! `object-add`, and puts every one back (class and affinity) when it
//! exits or, after `kill -9`, through its watchdog.
//!
//! Needs root and qemu-system-x86_64. Without them the tests print SKIPPED,
//! or fail when `CI=true`.

mod common;

use std::time::Duration;

use common::{require, wait_for, wait_within, Guest, HostdConfig, Vm};
use pvsched_host::procfs::HostFs;

/// SCHED_OTHER and SCHED_FIFO as /proc/PID/task/TID/stat (field 41) shows them.
const SCHED_OTHER: u32 = 0;
const SCHED_FIFO: u32 = 1;

/// A paused QEMU with IOThreads io0 and io1, and the daemon's config with
/// `iothread` lines for its `[[vm]]`.
fn start(prefix: &'static str, iothread: &str) -> (Vm, std::path::PathBuf) {
    let vm = Vm::builder(prefix).iothreads(&["io0", "io1"]).start();
    let config = vm.write_config(&HostdConfig {
        watchdog_stall_ms: Some(500),
        vm_extra: format!("iothread_cpus = [0]\n{iothread}"),
        ..vm.hostd_config()
    });
    (vm, config)
}

/// (policy, rt_priority, Cpus_allowed_list) of a thread of the VM's QEMU.
fn sched_of(vm: &Vm, tid: i32) -> (u32, u32, String) {
    let st = HostFs::default().task_stat(vm.pid(), tid).unwrap();
    (st.policy, st.rt_priority, vm.affinity(tid))
}

fn tids(vm: &Vm) -> Vec<i32> {
    vm.iothread_tids().into_iter().map(|(_, t)| t).collect()
}

#[test]
fn static_iothreads_are_fifo_and_pinned_and_back_after_kill_9_of_the_daemon() {
    require!();
    let (mut vm, config) = start(
        "iost",
        "iothread_priority = 3\niothread_boost = \"static\"\n",
    );
    let io = tids(&vm);
    assert_eq!(io.len(), 2, "QEMU reports {io:?}");
    let original: Vec<_> = io.iter().map(|&t| sched_of(&vm, t)).collect();
    assert!(original.iter().all(|(p, _, _)| *p == SCHED_OTHER));
    assert!(
        original.iter().all(|(_, _, aff)| aff != "0"),
        "an IOThread is already pinned to CPU 0: {original:?}"
    );

    let d0 = vm.start_daemon(&config);
    let pinned_fifo = (SCHED_FIFO, 3, "0".to_owned());
    wait_for("both IOThreads at FIFO 3 on CPU 0", || {
        io.iter().all(|&t| sched_of(&vm, t) == pinned_fifo)
    });
    // Static: no vCPU is boosted (no guest), the IOThreads are all the same.
    assert!(vm.vcpu_tids().iter().all(|&t| vm.policy(t) == SCHED_OTHER));

    // An IOThread added while the daemon runs is picked up at a QMP refresh.
    vm.add_iothread("io2");
    let all = tids(&vm);
    assert_eq!(all.len(), 3, "QEMU reports {all:?}");
    let added = *all.iter().find(|t| !io.contains(t)).unwrap();
    let added_original = sched_of(&vm, added);
    wait_for("the added IOThread at FIFO 3 on CPU 0", || {
        sched_of(&vm, added) == pinned_fifo
    });

    // SIGKILL: the daemon restores nothing itself; its watchdog does, class and affinity.
    vm.kill_daemon(d0);
    wait_within(
        "the watchdog to put the IOThreads back",
        Duration::from_secs(2),
        || {
            io.iter()
                .zip(&original)
                .all(|(&t, orig)| sched_of(&vm, t) == *orig)
                && sched_of(&vm, added) == added_original
        },
    );
    assert!(vm.rt_threads().is_empty(), "left RT: {:?}", vm.rt_threads());
    wait_for("the state file to go", || !vm.state_file().exists());
}

#[test]
fn iothreads_boosted_with_the_vm_follow_its_vcpus_and_are_restored_on_exit() {
    require!();
    let (mut vm, config) = start("iovm", "iothread_priority = 4\n");
    let io = tids(&vm);
    assert_eq!(io.len(), 2, "QEMU reports {io:?}");
    let original: Vec<_> = io.iter().map(|&t| sched_of(&vm, t)).collect();
    let d0 = vm.start_daemon(&config);
    // Pinned at once, in their own class while no vCPU is boosted.
    wait_for("both IOThreads pinned to CPU 0", || {
        io.iter().all(|&t| vm.affinity(t) == "0")
    });
    assert!(io.iter().all(|&t| vm.policy(t) == SCHED_OTHER));

    let mut guest = Guest::attach_when_ready(&vm.shm);
    guest.ask(0, true);
    let vcpu0 = vm.vcpu_tid(0).unwrap();
    wait_for("vCPU 0 and both IOThreads RT", || {
        vm.policy(vcpu0) != SCHED_OTHER
            && io
                .iter()
                .all(|&t| sched_of(&vm, t) == (SCHED_FIFO, 4, "0".to_owned()))
    });
    guest.ask(0, false);
    wait_for("the IOThreads back in their class, still pinned", || {
        vm.policy(vcpu0) == SCHED_OTHER
            && io
                .iter()
                .all(|&t| sched_of(&vm, t) == (SCHED_OTHER, 0, "0".to_owned()))
    });

    guest.ask(0, true);
    wait_for("both IOThreads RT again", || {
        io.iter().all(|&t| vm.policy(t) == SCHED_FIFO)
    });
    // SIGTERM: the daemon restores class and affinity itself.
    vm.stop_daemon_restoring(d0);
    for (&t, orig) in io.iter().zip(&original) {
        assert_eq!(sched_of(&vm, t), *orig, "IOThread {t} not restored");
    }
}
