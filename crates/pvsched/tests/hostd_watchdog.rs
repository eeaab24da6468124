//! The watchdog of `pvsched hostd` against a real QEMU (TCG, started with
//! `-S`: the vCPU threads exist, nothing runs): the daemon boosts vCPU
//! threads a guest line asks for; after `kill -9` of the daemon no QEMU
//! thread may be RT within 1 s, with no restart; a stalled (SIGSTOPped)
//! daemon is killed and its threads restored; when both processes die at
//! once, `pvsched hostd --restore-only` (systemd's `ExecStopPost`) restores.
//!
//! Needs root and qemu-system-x86_64. Without them the tests print SKIPPED,
//! or fail when `CI=true`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{require, signal, wait_for, wait_within, watchdog_of, Guest, HostdConfig, Vm};
use pvsched_host::procfs::HostFs;

/// A paused QEMU (`-S`), listed as the `[[vm]]` "wd".
fn start_vm() -> Vm {
    Vm::builder("wd").start()
}

/// The daemon's config: a 500 ms stall timeout for the watchdog.
fn config(vm: &Vm) -> PathBuf {
    vm.write_config(&HostdConfig {
        watchdog_stall_ms: Some(500),
        ..vm.hostd_config()
    })
}

/// Whether a process is gone (a zombie counts as gone: it runs nothing).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Waits for `watchdog` (of daemon `n`) to exit; its line in the log
/// with `word` must say it restored `restored` threads.
fn watchdog_said(vm: &Vm, n: usize, watchdog: u32, word: &str, restored: usize) -> String {
    wait_within("the watchdog to exit", Duration::from_secs(5), || {
        process_gone(watchdog)
    });
    let log = vm.log(n);
    let line = log
        .lines()
        .find(|l| l.starts_with("pvsched-watchdog:") && l.contains(word))
        .unwrap_or_else(|| panic!("no watchdog line with {word:?}: {log}"))
        .to_owned();
    assert!(
        line.contains(&format!("restored {restored} thread(s)")),
        "{line}"
    );
    line
}

/// The guest attaches and asks for a boost on both vCPUs.
fn guest_asking_on_both(vm: &Vm) -> Guest {
    let mut guest = Guest::attach_when_ready(&vm.shm);
    guest.ask(0, true);
    guest.ask(1, true);
    guest
}

/// Waits until both vCPU threads are seen RT in /proc.
fn wait_boosted(vm: &Vm, n: usize) -> Vec<i32> {
    let vcpus = vm.vcpu_tids();
    wait_for(&format!("daemon {n} to boost both vCPU threads"), || {
        let rt = vm.rt_threads();
        vcpus.iter().all(|t| rt.contains(t))
    });
    vm.rt_threads()
}

#[test]
fn after_kill_9_of_the_daemon_nothing_stays_rt_within_one_second() {
    require!();
    let mut vm = start_vm();
    let config = config(&vm);
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon(&config);
    let _guest = guest_asking_on_both(&vm);
    let boosted = wait_boosted(&vm, d0);
    let daemon = vm.daemon_pid(d0);
    let watchdog = watchdog_of(daemon).unwrap_or_else(|| panic!("no watchdog: {}", vm.log(d0)));
    // The watchdog runs SCHED_FIFO above every boosted thread and the daemon's own threads.
    let fs = HostFs::default();
    let wd = fs.task_stat(watchdog as i32, watchdog as i32).unwrap();
    assert_eq!(wd.policy, 1, "watchdog not SCHED_FIFO");
    let highest = boosted
        .iter()
        .map(|&t| fs.task_stat(vm.pid(), t).unwrap().rt_priority)
        .chain(
            std::fs::read_dir(format!("/proc/{daemon}/task"))
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|t| fs.task_stat(daemon as i32, t).ok())
                .map(|st| st.rt_priority),
        )
        .max()
        .unwrap();
    assert!(
        wd.rt_priority > highest,
        "watchdog at {} not above {highest}",
        wd.rt_priority
    );

    // SIGKILL: the daemon restores nothing itself.
    let killed = Instant::now();
    vm.daemons[d0].kill().unwrap();
    let mut cleared = None;
    while killed.elapsed() < Duration::from_secs(5) {
        if vm.rt_threads().is_empty() {
            cleared = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = vm.daemons[d0].wait();
    let cleared = cleared.unwrap_or_else(|| {
        panic!(
            "threads {:?} still RT 5 s after SIGKILL: {}",
            vm.rt_threads(),
            vm.log(d0)
        )
    });
    assert!(
        cleared <= Duration::from_secs(1),
        "QEMU threads stayed RT {cleared:?} after SIGKILL of the daemon (bound: 1 s)"
    );
    // The watchdog said what it did and exited; the state file is gone.
    let line = watchdog_said(&vm, d0, watchdog, "restored", boosted.len());
    assert!(!vm.state_file().exists());

    // No restart was needed; a new daemon boosts again (the guest still asks).
    let d1 = vm.start_daemon(&config);
    let again = wait_boosted(&vm, d1);
    assert_eq!(again, boosted);
    // A clean stop: the daemon restores itself, its watchdog exits quietly.
    let watchdog = watchdog_of(vm.daemon_pid(d1)).expect("no watchdog for the second daemon");
    vm.stop_daemon(d1);
    assert!(vm.rt_threads().is_empty(), "left RT after SIGTERM");
    wait_within(
        "the second watchdog to exit",
        Duration::from_secs(5),
        || process_gone(watchdog),
    );
    assert!(
        !vm.log(d1).contains("pvsched-watchdog:"),
        "the watchdog spoke after a clean exit: {}",
        vm.log(d1)
    );
    eprintln!(
        "QEMU pid {}: threads {boosted:?} RT; after SIGKILL of the daemon nothing RT after {:.1} ms (10 ms polling); watchdog: {line}",
        vm.pid(),
        cleared.as_secs_f64() * 1000.0
    );
}

#[test]
fn a_stopped_daemon_is_killed_by_its_watchdog_and_nothing_stays_rt() {
    require!();
    let mut vm = start_vm();
    let config = config(&vm);
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon(&config);
    let _guest = guest_asking_on_both(&vm);
    let boosted = wait_boosted(&vm, d0);
    let daemon = vm.daemon_pid(d0);
    let watchdog = watchdog_of(daemon).unwrap_or_else(|| panic!("no watchdog: {}", vm.log(d0)));

    // SIGSTOP: the loop stops beating; the process lives on.
    let stopped = Instant::now();
    signal(daemon, "STOP");
    wait_within(
        "the stalled daemon's threads restored",
        Duration::from_secs(5),
        || vm.rt_threads().is_empty(),
    );
    let cleared = stopped.elapsed();
    let mut status = None;
    wait_within(
        "the stalled daemon to be killed",
        Duration::from_secs(5),
        || {
            status = vm.daemons[d0].try_wait().unwrap();
            status.is_some()
        },
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.unwrap().signal(),
        Some(9),
        "the daemon was not SIGKILLed"
    );
    let line = watchdog_said(&vm, d0, watchdog, "STALLED", boosted.len());
    eprintln!(
        "threads {boosted:?}: restored {:.0} ms after SIGSTOP (stall timeout 500 ms); {line}",
        cleared.as_secs_f64() * 1000.0
    );
}

#[test]
fn restore_only_restores_after_both_processes_die_and_refuses_a_running_daemon() {
    require!();
    let mut vm = start_vm();
    let config = config(&vm);
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon(&config);
    let _guest = guest_asking_on_both(&vm);
    let boosted = wait_boosted(&vm, d0);
    let restore_only = || {
        Command::new(env!("CARGO_BIN_EXE_pvsched"))
            .args(["hostd", "--restore-only", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    // While the daemon runs, its state file is not touched.
    let out = restore_only();
    assert!(
        !out.status.success(),
        "restore-only ran beside a live daemon"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(vm.rt_threads(), boosted);
    // Both die at once, as with `systemctl kill` of the control group.
    let watchdog = watchdog_of(vm.daemon_pid(d0)).expect("no watchdog");
    signal(watchdog, "KILL");
    wait_within("the watchdog to die", Duration::from_secs(5), || {
        process_gone(watchdog)
    });
    vm.kill_daemon(d0);
    assert_eq!(
        vm.rt_threads(),
        boosted,
        "restored with no process left to do it"
    );
    let out = restore_only();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        vm.rt_threads().is_empty(),
        "RT after restore-only: {stderr}"
    );
    assert!(
        stderr.contains(&format!("restored {} thread(s)", boosted.len())),
        "{stderr}"
    );
    assert!(!vm.state_file().exists());
    // Nothing left: a second run is a quiet success.
    assert!(restore_only().status.success());
}
