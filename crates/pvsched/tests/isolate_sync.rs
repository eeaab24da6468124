//! `pvsched hostd` with a `realtime` VM (a real QEMU, TCG, one vCPU) asks
//! for isolation in its request file; `pvsched isolate --sync` applies it
//! (the vCPU alone on the last CPU at `SCHED_FIFO`, everything else on the
//! others) in place of one applied by hand, changes nothing when run
//! again, and once the VM is gone and the
//! daemon has withdrawn the request, undoes it: every cpuset, IRQ and mask
//! value and every thread's cpuset and affinity is back. `--follow` does the
//! same on its own and undoes at SIGTERM.
//!
//! Needs root, QEMU, two online CPUs and a cgroup v1 cpuset hierarchy;
//! prints a SKIPPED line otherwise, or fails under `CI=true`.

mod common;

#[path = "../../pvsched-host/tests/isolation_snapshot/mod.rs"]
mod isolation_snapshot;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{require, under_ci, wait_for, HostdConfig, Vm};
use isolation_snapshot::{read, snapshot, task_view, CPUSET};
use pvsched_host::isolate::{self, Host};
use pvsched_host::isolate_request::{read_request, IsolationRequest};
use pvsched_host::HostFs;

/// Fixed, so that a state file a killed run left is found and undone.
const STATE: &str = "/run/pvsched/isolation-sync-test.json";

/// The host's cpusets, IRQs and masks are one: the tests of this file take turns (the
/// harness runs them on parallel threads), each holding this from the undo of what a
/// killed run left, through its first snapshot, to its last check.
static HOST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn host_to_myself() -> std::sync::MutexGuard<'static, ()> {
    HOST.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The last online CPU, or why this host cannot isolate one.
fn isolatable_cpu() -> Result<u32, String> {
    let online = read("/sys/devices/system/cpu/online")
        .and_then(|t| pvsched_host::procfs::parse_cpu_list(&t))
        .unwrap_or_default();
    if online.len() < 2 {
        return Err("two online CPUs".into());
    }
    if !Path::new(CPUSET).join("cpuset.cpus").exists() {
        return Err(format!("a cgroup v1 cpuset at {CPUSET}"));
    }
    Ok(*online.last().unwrap())
}

/// Undoes the isolation when dropped, whatever happened.
struct UndoGuard;

impl Drop for UndoGuard {
    fn drop(&mut self) {
        if Path::new(STATE).exists() {
            let fs = HostFs::default();
            if let Err(e) = isolate::undo(&Host::real(&fs), Path::new(STATE)) {
                eprintln!("undo failed: {e}; run `pvsched isolate --undo --state {STATE}`");
            }
        }
    }
}

/// The realtime VM's config: isolate `cpu`, request file in the VM's
/// work directory. Returns (config, request file).
fn realtime_config(vm: &Vm, cpu: u32) -> (PathBuf, PathBuf) {
    let request = vm.dir.join("isolate.json");
    let config = vm.write_config(&HostdConfig {
        isolate_request: Some(request.clone()),
        vm_extra: format!("realtime = true\nisolate_cpus = \"{cpu}\"\n"),
        ..vm.hostd_config()
    });
    (config, request)
}

fn isolate(config: &Path, request: &Path, mode: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pvsched"));
    cmd.args(["isolate", mode, "--config"])
        .arg(config)
        .arg("--request")
        .arg(request)
        .args(["--state", STATE]);
    cmd
}

fn sync(config: &Path, request: &Path) -> String {
    let out: Output = isolate(config, request, "--sync").output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pvsched isolate --sync: {text}");
    text
}

/// The request the daemon wrote, once it is there.
fn wait_for_request(request: &Path) -> IsolationRequest {
    wait_for("the daemon's isolation request", || request.exists());
    read_request(request, 0).unwrap().unwrap()
}

/// Checks the isolation of `cpu` for `vm`: the vCPU in the isolated cpuset,
/// pinned, `SCHED_FIFO` 50; QEMU's main thread and init on housekeeping.
fn assert_isolated(vm: &Vm, cpu: u32) {
    let vcpu = vm.vcpu_tids()[0];
    let iso = format!("/{}", isolate::ISOLATED_CPUSET);
    let hk = format!("/{}", isolate::HOUSEKEEPING_CPUSET);
    assert_eq!(
        task_view(vm.pid(), vcpu),
        (iso, cpu.to_string(), 1, isolate::DEFAULT_RT_PRIORITY as u32)
    );
    let housekeeping = read(Path::new(CPUSET).join(&hk[1..]).join("cpuset.cpus")).unwrap();
    for (pid, tid) in [(vm.pid(), vm.pid()), (1, 1)] {
        let (cpuset, affinity, ..) = task_view(pid, tid);
        assert_eq!((cpuset, affinity), (hk.clone(), housekeeping.clone()));
    }
    assert_eq!(
        read(Path::new(CPUSET).join("cpuset.sched_load_balance")).unwrap(),
        "0"
    );
    let cpus = pvsched_host::procfs::parse_cpu_list(&housekeeping).unwrap();
    assert_eq!(
        read("/sys/devices/virtual/workqueue/cpumask").unwrap(),
        isolate::format_cpu_mask(&cpus)
    );
}

/// Root and QEMU, then the CPU to isolate; skips (returns) or fails under
/// CI when something is missing. Undoes what a killed run left first.
macro_rules! require_isolation {
    () => {{
        require!();
        let cpu = match isolatable_cpu() {
            Ok(c) => c,
            Err(why) => {
                assert!(!under_ci(), "needs {why} under CI=true");
                eprintln!("SKIPPED: needs {why}");
                return;
            }
        };
        drop(UndoGuard);
        cpu
    }};
}

#[test]
fn hostd_requests_isolation_for_a_realtime_vm_and_sync_applies_then_restores_every_value() {
    let _host = host_to_myself();
    let cpu = require_isolation!();
    let before = snapshot();
    let mut vm = Vm::builder("rtsync").vcpus(1).start();
    let (config, request) = realtime_config(&vm, cpu);
    let d = vm.start_daemon(&config);
    let guard = UndoGuard;

    let wanted = wait_for_request(&request);
    assert_eq!(
        (wanted.vm.as_str(), wanted.pid, wanted.cpus.clone()),
        ("rtsync", vm.pid(), cpu.to_string()),
        "{}",
        vm.log(d)
    );
    // An isolation applied by hand (another priority) is replaced by the
    // request's.
    let by_hand = Command::new(env!("CARGO_BIN_EXE_pvsched"))
        .args(["isolate", "--cpus", &cpu.to_string(), "--vm", "rtsync"])
        .args(["--rt-priority", "7", "--state", STATE, "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        by_hand.status.success(),
        "{}",
        String::from_utf8_lossy(&by_hand.stderr)
    );
    assert_eq!(task_view(vm.pid(), vm.vcpu_tids()[0]).3, 7);
    let applied = sync(&config, &request);
    assert!(
        applied.contains("undone:") && applied.contains("applied ("),
        "{applied}"
    );
    assert_isolated(&vm, cpu);
    let state = isolate::read_state(Path::new(STATE)).unwrap();
    assert_eq!(state.request, Some(wanted));

    // Already in sync: nothing changes.
    let during = snapshot();
    let again = sync(&config, &request);
    assert!(again.contains("in sync: CPUs"), "{again}");
    assert_eq!(snapshot().differences(&during), Vec::<String>::new());

    // The VM goes: the daemon withdraws its request, the sync undoes.
    vm.qemu.stop();
    wait_for("the request withdrawn", || !request.exists());
    assert!(
        vm.log(d).contains("isolation request withdrawn"),
        "{}",
        vm.log(d)
    );
    let undone = sync(&config, &request);
    assert!(undone.contains("undone:"), "{undone}");
    assert!(!Path::new(STATE).exists());
    drop(guard);
    vm.stop_daemon(d);
    let differ = before.differences(&snapshot());
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    let quiet = sync(&config, &request);
    assert!(quiet.contains("in sync: no isolation"), "{quiet}");
    let line = |text: &str, start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_default()
            .to_owned()
    };
    eprintln!(
        "CPU {cpu} isolated for the VM's vCPU in place of a hand-made isolation ({}; {}), then {}",
        line(&applied, "undone:"),
        line(&applied, "applied ("),
        line(&undone, "undone:")
    );
}

/// A running `pvsched isolate --follow`. A test that fails before it stops the follower
/// kills it on drop, so that no follower outlives its test and goes on isolating (or
/// undoing) under the next one.
struct Follower(Option<std::process::Child>);

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            common::signal(child.id(), "TERM");
            let _ = child.wait();
        }
    }
}

fn follow(config: &Path, request: &Path, log: &Path) -> Follower {
    Follower(Some(
        isolate(config, request, "--follow")
            .stdout(Stdio::from(std::fs::File::create(log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(log.with_extension("err")).unwrap(),
            ))
            .spawn()
            .unwrap(),
    ))
}

/// SIGTERM to a `--follow`, which must exit successfully; its output.
fn stop_follow(mut follower: Follower, log: &Path) -> String {
    let mut child = follower.0.take().expect("a running follower");
    common::signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    let out = std::fs::read_to_string(log).unwrap()
        + &std::fs::read_to_string(log.with_extension("err")).unwrap();
    assert!(status.success(), "{status}: {out}");
    out
}

#[test]
fn follow_isolates_while_the_realtime_vm_runs_and_undoes_at_sigterm_or_when_it_goes() {
    let _host = host_to_myself();
    let cpu = require_isolation!();
    let before = snapshot();
    let mut vm = Vm::builder("rtfollow").vcpus(1).start();
    let (config, request) = realtime_config(&vm, cpu);
    let guard = UndoGuard;
    let log = vm.dir.join("follow1.log");
    let follower = follow(&config, &request, &log);
    let d = vm.start_daemon(&config);
    let vcpu = vm.vcpu_tids()[0];
    wait_for("the vCPU isolated by --follow", || {
        task_view(vm.pid(), vcpu).2 == 1
    });
    assert_isolated(&vm, cpu);

    // SIGTERM: undone, though the request stands.
    let out = stop_follow(follower, &log);
    assert!(out.contains("stopped: undone"), "{out}");
    assert!(!Path::new(STATE).exists());
    assert!(request.exists());
    assert_eq!(task_view(vm.pid(), vcpu).2, 0, "vCPU still SCHED_FIFO");

    // A new --follow isolates again; then the daemon stops (its request
    // stays) and the VM goes: the request's process is gone, undone.
    let log = vm.dir.join("follow2.log");
    let follower = follow(&config, &request, &log);
    wait_for("the vCPU isolated again", || {
        task_view(vm.pid(), vcpu).2 == 1
    });
    vm.stop_daemon(d);
    assert!(request.exists());
    vm.qemu.stop();
    wait_for("isolation undone for the gone VM", || {
        !Path::new(STATE).exists()
    });
    let out = stop_follow(follower, &log);
    assert!(out.contains("request set aside: QEMU process"), "{out}");
    assert!(out.contains("stopped: nothing to undo"), "{out}");
    drop(guard);
    let differ = before.differences(&snapshot());
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    eprintln!("--follow: isolated, undone at SIGTERM, isolated again, undone when the VM went");
}
