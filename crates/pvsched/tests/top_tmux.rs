//! `pvsched top` driven in a tmux pane against a running daemon and a real
//! QEMU (TCG, the spinning firmware of tests/hostd_qemu.rs), with the
//! test writing guest lines as the guest module would: the pane must show
//! the VM's vCPU rows with the guest's flags, a boost counter that moves
//! between two captures, the one-line unreachable state once the daemon is
//! gone, and `q` must leave the terminal as it found it.
//!
//! Needs root, QEMU and tmux; prints a SKIPPED line otherwise, or fails
//! under `CI=true`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::{require, unique_tag, wait_within, HostdConfig, Needs, Vm, TIGHT_BUDGET};

/// A tmux server of its own (`-L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        Tmux {
            socket: format!("pvsched-top-{}", unique_tag()),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// The visible text of the pane.
    fn capture(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        assert!(
            out.status.success(),
            "capture-pane: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Captures until `cond` holds for the text (20 s at most); returns it.
    fn capture_until(&self, what: &str, mut cond: impl FnMut(&str) -> bool) -> String {
        let mut pane = String::new();
        let mut seen = |pane: &mut String| {
            *pane = self.capture();
            cond(pane)
        };
        let start = std::time::Instant::now();
        while !seen(&mut pane) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}; the pane:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pane
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// One vCPU row of the pane.
#[derive(Debug, PartialEq)]
struct PaneRow {
    slot: u32,
    guest: String,
    state: String,
    boosts: u64,
    /// The VM's budget left (ms).
    budget_left_ms: f64,
}

/// The row of thread `tid` of VM `vm`, if the pane shows it. Columns:
/// VM vCPU TID pCPU GUEST(1+ words) NOW BOOSTS THROTTLES STEAL BOOSTED LEFT INVALID.
fn pane_row(pane: &str, vm: &str, tid: i32) -> Option<PaneRow> {
    pane.lines().find_map(|line| {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 12 || w[0] != vm || w[2] != tid.to_string() {
            return None;
        }
        let n = w.len();
        Some(PaneRow {
            slot: w[1].parse().ok()?,
            guest: w[4..n - 7].join(" "),
            state: w[n - 7].to_owned(),
            boosts: w[n - 6].parse().ok()?,
            budget_left_ms: w[n - 2].parse().ok()?,
        })
    })
}

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
    // After `top` exits the shell prints its status and whether the terminal
    // is back in canonical mode, then waits to be read.
    let command = format!(
        "{} top --addr {port} --interval-ms 200; echo \"top exited $?\" > {}; stty -a | tr ' ' '\\n' | grep -x -- '-*icanon' >> {}; sleep 60",
        env!("CARGO_BIN_EXE_pvsched"),
        exit_file.display(),
        exit_file.display(),
    );
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "200",
        "-y",
        "50",
        &command,
    ]);
    assert!(
        out.status.success(),
        "tmux new-session: {}",
        String::from_utf8_lossy(&out.stderr)
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
