//! `pvsched top` driven in a tmux pane against a running daemon.
//!
//! First a real QEMU (TCG, the spinning firmware of tests/hostd_qemu.rs)
//! with the test writing guest lines as the guest module would: the pane
//! must show the VM's vCPU rows with the guest's flags, a boost counter that
//! moves between two captures, the one-line unreachable state once the
//! daemon is gone, and `q` must leave the terminal as it found it. Then a
//! real Debian cloud kernel guest whose module rings the daemon on RT
//! wake-ups (as in tests/hostd_doorbell.rs): its vCPU rows, with guest data,
//! and its boost counters moving.
//!
//! Needs root, QEMU and tmux (and for the second, make and the lab's
//! assets); prints a SKIPPED line otherwise, or fails under `CI=true`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::tmux::{pane_row, PaneRow, Tmux};
use common::{require, signal, wait_within, HostdConfig, Needs, Vm, TIGHT_BUDGET};
use pvsched_lab::{
    collect, AccelChoice, GuestConfig, InitControl, Initramfs, InitramfsSpec, Workload,
};

#[test]
fn top_in_tmux_shows_a_live_vms_vcpus_and_moving_boost_counters() {
    require!(Needs::Tmux);
    let mut vm = Vm::builder("topvm").spinning().start();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = vm.write_config(&HostdConfig {
        policy: TIGHT_BUDGET,
        metrics_addr: port.to_string(),
        ..vm.hostd_config()
    });
    let tids = vm.vcpu_tids();
    let daemon = vm.start_daemon(&config);
    let mut guest = common::Guest::attach_when_ready(&vm.shm);
    // vCPU 0 idles; vCPU 1 has an RT task waiting and asks for a boost.
    guest.ask_with(0, false, |g| g.idle = true);
    let ask = |guest: &mut common::Guest, boost: bool| {
        guest.ask_with(1, boost, |g| g.rt_pending = u32::from(boost));
    };
    ask(&mut guest, true);

    let tmux = Tmux::new();
    let exit_file: PathBuf = vm.dir.join("top.exit");
    // After `top` exits the shell writes its status and whether the terminal
    // is back in canonical mode.
    tmux.start_top(
        &format!("--addr {port} --interval-ms 200"),
        &format!(
            "echo \"top exited $?\" > {0}; stty -a | tr ' ' '\\n' | grep -x -- '-*icanon' >> {0}",
            exit_file.display()
        ),
    );

    // 1. Both vCPU rows, vCPU 1 boosted with its RT task pending.
    let first = tmux.capture_until("vCPU 1 boosted in the pane", |pane| {
        pane_row(pane, vm.name, tids[1]).is_some_and(|r| r.state == "boosted" && r.boosts >= 1)
            && pane_row(pane, vm.name, tids[0]).is_some()
    });
    assert!(
        first.contains(&format!("pvsched daemon at {port}")),
        "{first}"
    );
    assert!(first.contains("VMs 1"), "{first}");
    assert!(
        first.contains("host budget: ") && !first.contains("host budget: -"),
        "{first}"
    );
    let row0 = pane_row(&first, vm.name, tids[0]).unwrap();
    let row1 = pane_row(&first, vm.name, tids[1]).unwrap();
    assert_eq!((row0.slot, row0.guest.as_str()), (0, "idle"), "{first}");
    assert_eq!((row1.slot, row1.guest.as_str()), (1, "rt:1"), "{first}");
    let vm_budget_ms = pvsched_policy::PolicyConfig::default().vm_budget_ns as f64 / 1e6;
    assert!(
        (0.0..=vm_budget_ms).contains(&row1.budget_left_ms),
        "{first}"
    );

    // 2. vCPU 1 stops asking and asks again, until the daemon counted a
    // second boost; a later capture shows the counter moved.
    let boosts_before = guest.host(1).boosts;
    let mut asking = true;
    wait_within("a new boost of vCPU 1", Duration::from_secs(20), || {
        asking = !asking;
        ask(&mut guest, asking);
        std::thread::sleep(Duration::from_millis(50));
        guest.host(1).boosts > boosts_before
    });
    let second = tmux.capture_until("vCPU 1's boosts to move in the pane", |pane| {
        pane_row(pane, vm.name, tids[1]).is_some_and(|r| r.boosts > row1.boosts)
    });
    let moved = pane_row(&second, vm.name, tids[1]).unwrap();
    eprintln!(
        "pane, first capture:\n{first}\npane, second capture:\n{second}\nvCPU 1 boosts {} -> {}",
        row1.boosts, moved.boosts
    );

    // 3. `s` moves to the next sort.
    tmux.run(&["send-keys", "-t", "top", "s"]);
    tmux.capture_until("the boosted sort", |pane| {
        pane.contains("sort: boosted (s)")
    });

    // 4. The daemon goes away: one line, and top keeps running.
    vm.stop_daemon(daemon);
    let gone = tmux.capture_until("the unreachable line", |pane| {
        pane.contains(&format!("daemon unreachable at {port}"))
    });
    assert!(pane_row(&gone, vm.name, tids[1]).is_none(), "{gone}");

    // 5. `q`: top exits 0 and the terminal is canonical again.
    tmux.run(&["send-keys", "-t", "top", "q"]);
    wait_within("top to exit", Duration::from_secs(20), || {
        std::fs::read_to_string(&exit_file).is_ok_and(|s| s.lines().count() == 2)
    });
    let exit = std::fs::read_to_string(&exit_file).unwrap();
    assert_eq!(exit, "top exited 0\nicanon\n", "raw mode left on");
    let after = tmux.capture();
    assert!(
        !after.contains("daemon unreachable"),
        "the alternate screen was not left:\n{after}"
    );
}

/// The daemon's attached VM: its name as the pane shows it (the VM column's
/// 16 characters) and its vCPU thread ids.
fn attached_vm(addr: std::net::SocketAddr) -> Option<(String, Vec<i32>)> {
    let body = pvsched_host::daemon::fetch_stats(addr, "/status").ok()?;
    let status: pvsched_host::DaemonStatus = serde_json::from_str(&body).ok()?;
    let vm = status.vms.iter().find(|v| v.attached)?;
    let tids: Vec<i32> = vm.vcpus.iter().filter_map(|c| c.tid).collect();
    (!tids.is_empty()).then(|| (vm.name.chars().take(16).collect(), tids))
}

#[test]
fn top_in_tmux_shows_a_real_guests_vcpus_boosted_by_its_module() {
    require!(Needs::Tmux);
    let Some(assets) = pvsched_lab::testing::assets_or_skip("top_tmux", true) else {
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
    } = common::DoorbellDaemon::start("pvsched-top-guest");
    let log = || std::fs::read_to_string(work.join("hostd.log")).unwrap_or_default();

    // RT wake-ups on both vCPUs for a while: each one the module reports.
    let workload = Workload::Idle { duration_s: 1 };
    let initrd = work.join("initrd.cpio");
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone(), tool],
            module: Some(module),
            module_params: "enable=1".into(),
            kernel_modules: Vec::new(),
            files: Vec::new(),
            workload: workload.clone(),
            diagnostics: vec![common::two_rt_loops(600)],
            control: InitControl::default(),
        },
        &initrd,
    )
    .expect("build initramfs");
    let mut guest_config = GuestConfig::new(
        format!("top{}", std::process::id()),
        &assets.kernel_image,
        &initramfs.path,
    );
    guest_config.accel = AccelChoice::Tcg;
    guest_config.run_dir = work.clone();
    guest_config.doorbell_server = Some(server.clone());
    let mut guest = pvsched_lab::Guest::boot(&guest_config).expect("boot with ivshmem-doorbell");

    let tmux = Tmux::new();
    tmux.start_top(&format!("--addr {port} --interval-ms 200"), "true");
    // The panes are read while the guest runs its loops.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let boosts = |pane: &str, vm: &str, tids: &[i32]| -> Option<(u64, bool)> {
                let rows: Vec<PaneRow> =
                    tids.iter().filter_map(|&t| pane_row(pane, vm, t)).collect();
                (rows.len() == tids.len()).then(|| {
                    (
                        rows.iter().map(|r| r.boosts).sum(),
                        rows.iter().any(|r| r.guest != "n/a"),
                    )
                })
            };
            let mut first: Option<(String, u64)> = None;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let Some((vm, tids)) = attached_vm(port) else {
                    continue;
                };
                let pane = tmux.capture();
                let Some((total, guest_data)) = boosts(&pane, &vm, &tids) else {
                    continue;
                };
                match &first {
                    None if total > 0 && guest_data => first = Some((pane, total)),
                    Some((first_pane, before)) if total > *before => {
                        tmux.run(&["send-keys", "-t", "top", "q"]);
                        return Some((first_pane.clone(), pane, *before, total));
                    }
                    _ => {}
                }
            }
            None
        })
    };
    let result = collect(&mut guest, &workload).expect("collect");
    done.store(true, Ordering::Relaxed);
    let panes = reader.join().unwrap();
    drop(guest);
    signal(daemon.id(), "TERM");
    let status = daemon.wait().unwrap();
    let log = log();
    assert!(status.success(), "daemon exit {status}\n{log}");
    assert!(
        result.diagnostics.contains("rt-loop-0-ok"),
        "{}",
        result.diagnostics
    );
    let (first, second, before, after) = panes.unwrap_or_else(|| {
        panic!(
            "the pane never showed the guest's vCPUs with guest data and boosts moving\n--- daemon log ---\n{log}"
        )
    });
    eprintln!(
        "pane, first capture:\n{first}\npane, second capture:\n{second}\nboosts of the guest's vCPUs {before} -> {after}"
    );
    common::remove_unless_panicking(&work);
}

/// A `pvsched top` whose terminal goes away (the tmux server is killed, the pty closes)
/// exits instead of spinning on a terminal that reads end of file.
#[test]
fn top_exits_when_its_terminal_goes_away() {
    require!(Needs::Tmux);
    let tmux = Tmux::new();
    tmux.start_top("--addr 127.0.0.1:1 --interval-ms 200", "true");
    tmux.capture_until("the unreachable line", |pane| {
        pane.contains("daemon unreachable at 127.0.0.1:1")
    });
    let out = tmux.run(&["list-panes", "-t", "top", "-F", "#{pane_pid}"]);
    let shell: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("pane pid");
    let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
        .expect("the pane shell's children");
    let top: u32 = children
        .split_whitespace()
        .next()
        .expect("pvsched top runs in the pane")
        .parse()
        .unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{top}/comm")).unwrap();
    assert_eq!(comm.trim(), "pvsched", "the pane's child is pvsched top");
    let _ = tmux.run(&["kill-server"]);
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'))
        })
    };
    let start = std::time::Instant::now();
    while !gone(top) {
        if start.elapsed() > Duration::from_secs(10) {
            let cpu = std::fs::read_to_string(format!("/proc/{top}/stat")).unwrap_or_default();
            let _ = Command::new("kill").arg("-9").arg(top.to_string()).status();
            panic!("pvsched top outlived its terminal by 10 s: {cpu}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
