//! `pvsched hostd` with its seccomp filters enforcing (the default), against
//! a real QEMU (TCG, the same spinning "BIOS" as tests/hostd_qemu.rs): the
//! daemon finds the VM by discovery, boosts and throttles, serves
//! `/metrics` and `/status`, restores on SIGTERM, and its filtered watchdog
//! restores after kill -9. Every daemon thread and the watchdog must show
//! exactly one seccomp filter in /proc, and a call outside a list would have
//! killed the daemon with SIGSYS. Needs root, qemu-system-x86_64 and
//! seccomp; without them it prints SKIPPED, and fails under `CI=true`.

mod common;

use std::path::{Path, PathBuf};

use common::{require, tasks, wait_for, watchdog_of, Guest, HostdConfig, Needs, Vm, TIGHT_BUDGET};
use pvsched_abi::raw::*;

/// A QEMU spinning in the firmware, its shared file in its own directory
/// under /dev/shm (the daemon's discovery directory).
fn start_vm() -> Vm {
    Vm::builder("sc").spinning().shm_in_own_dir().start()
}

/// Discovery only (no `[[vm]]`), metrics on an ephemeral loopback port,
/// and no `seccomp` key: the default must be to enforce.
fn config(vm: &Vm) -> PathBuf {
    vm.write_config(&HostdConfig {
        metrics_addr: "127.0.0.1:0".into(),
        policy: TIGHT_BUDGET,
        ..vm.hostd_config()
    })
}

/// The metrics address daemon `n` logged.
fn metrics_addr(vm: &Vm, n: usize) -> std::net::SocketAddr {
    let mut addr = None;
    wait_for("the metrics line", || {
        addr = vm.log(n).lines().find_map(|l| {
            l.strip_prefix("pvsched: metrics on http://")?
                .strip_suffix("/status")?
                .split('/')
                .next()?
                .parse()
                .ok()
        });
        addr.is_some()
    });
    addr.unwrap()
}

/// `Seccomp` and `Seccomp_filters` of a thread.
fn seccomp_of(pid: u32, tid: u32) -> (String, String) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("?")
            .trim()
            .to_owned()
    };
    (field("Seccomp:"), field("Seccomp_filters:"))
}

/// Every thread of the daemon and its watchdog runs under exactly one
/// filter (per thread, not stacked), in filter mode (2).
fn assert_every_thread_filtered(vm: &Vm, n: usize) {
    let daemon = vm.daemon_pid(n);
    let threads = tasks(daemon);
    let names: Vec<&str> = threads.iter().map(|(_, name)| name.as_str()).collect();
    for want in ["pvsched", "pvsched-discove", "pvsched-stats"] {
        assert!(names.contains(&want), "no {want} thread in {names:?}");
    }
    for (tid, name) in &threads {
        assert_eq!(
            seccomp_of(daemon, *tid),
            ("2".to_owned(), "1".to_owned()),
            "daemon thread {tid} ({name}): {}",
            vm.log(n)
        );
    }
    let watchdog = watchdog_of(daemon).expect("no watchdog");
    assert_eq!(
        seccomp_of(watchdog, watchdog),
        ("2".to_owned(), "1".to_owned()),
        "watchdog {watchdog}"
    );
}

#[test]
fn hostd_with_enforcing_seccomp_boosts_serves_metrics_and_restores_real_qemu_threads() {
    require!(Needs::Seccomp);
    let mut vm = start_vm();
    let config = config(&vm);
    let tids = vm.vcpu_tids();
    let main = vm.pid();
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon(&config);
    let mut guest = Guest::open(&vm.shm);
    wait_for(
        "the daemon to discover the VM and initialise the header",
        || guest.header_ready(),
    );
    assert!(
        vm.log(d0)
            .contains("seccomp filter per thread role: enforce"),
        "{}",
        vm.log(d0)
    );
    guest.attach();
    guest.ask(0, false);

    // 1. vCPU 1 asks: its thread and QEMU's main thread become SCHED_RR.
    guest.ask(1, true);
    wait_for("vCPU 1 boosted", || vm.policy(tids[1]) == 2);
    wait_for("main thread boosted", || vm.policy(main) == 2);
    let mut boosted = vec![tids[1], main];
    boosted.sort();
    assert_eq!(vm.rt_threads(), boosted, "{}", vm.log(d0));
    assert_every_thread_filtered(&vm, d0);

    // 2. The stats thread answers, filtered, on the listener bound before it started.
    let addr = metrics_addr(&vm, d0);
    // The snapshot it serves is refreshed every 100 ms.
    wait_for("the VM in /status", || {
        let status = pvsched_host::daemon::fetch_stats(addr, "/status").unwrap();
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["vms"][0]["pid"] == main
    });
    let metrics = pvsched_host::daemon::fetch_stats(addr, "/metrics").unwrap();
    // Rendered by the library under the stats thread's filter.
    assert!(metrics.contains("pvsched_loops_total "), "{metrics}");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    assert!(pvsched_host::daemon::fetch_stats(addr, "/nope").is_err());

    // 3. The spinning vCPU 0 asks forever: boosted, then throttled.
    guest.ask(0, true);
    wait_for("vCPU 0 throttled", || {
        guest.host(0).boost_state == PVSCHED_BOOST_THROTTLED
    });
    assert_eq!(vm.policy(tids[0]), 0, "throttled thread still RT");
    guest.ask(0, false);

    // 4. SIGTERM while vCPU 1 is boosted: a clean exit (not SIGSYS), nothing RT.
    assert_eq!(vm.policy(tids[1]), 2);
    vm.stop_daemon_restoring(d0);

    // 5. A second daemon boosts; kill -9 of it: the filtered watchdog
    // reads the state file and restores every thread.
    let d1 = vm.start_daemon(&config);
    wait_for("vCPU 1 boosted by the second daemon", || {
        vm.policy(tids[1]) == 2
    });
    assert_every_thread_filtered(&vm, d1);
    let watchdog = watchdog_of(vm.daemon_pid(d1)).expect("no watchdog");
    vm.kill_daemon(d1);
    wait_for("the watchdog to restore every thread", || {
        vm.rt_threads().is_empty()
    });
    wait_for("the watchdog's restore line", || {
        vm.log(d1).contains("pvsched-watchdog: daemon pid")
    });
    assert!(vm.log(d1).contains("restored"), "{}", vm.log(d1));
    wait_for("the watchdog to exit", || {
        !Path::new(&format!("/proc/{watchdog}")).exists()
    });
    assert!(!vm.state_file().exists());
    eprintln!(
        "QEMU pid {} vCPU threads {tids:?}: discovered, boosted, throttled, metrics served, \
         SIGTERM and watchdog restores, all under enforcing seccomp filters",
        vm.pid()
    );
}
