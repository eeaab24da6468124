//! 100 VM start/stop cycles under one running `pvsched hostd`, with real
//! QEMU: the daemon must find each VM by discovery, boost it when asked,
//! drop it when QEMU dies (SIGKILL in some cycles, QMP `quit` in others, some
//! while a vCPU is boosted), and end with the threads, open files and
//! mappings it had before the first VM, leaving no file behind.
//!
//! Most VMs run `-S` (vCPU threads exist, nothing executes); every 25th
//! runs a 64 KiB firmware whose reset vector is `jmp $`, so its vCPU
//! executes guest code while the daemon manages it. No guest kernel boots:
//! the lab's guest boot takes tens of seconds under TCG, too long to repeat.
//!
//! Needs root and qemu-system-x86_64; under `CI=true` a missing
//! prerequisite fails the test, elsewhere it prints SKIPPED.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{
    poll_within, remove_unless_panicking, require, spawn_hostd, spin_firmware, unique_tag,
    wait_for, wait_within, Guest, HostdConfig, Needs, Qemu,
};

const CYCLES: usize = 100;

/// What the daemon holds, from /proc.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Held {
    threads: usize,
    fds: usize,
    shm_maps: usize,
}

fn held(pid: u32) -> Held {
    let count = |dir: String| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    Held {
        threads: count(format!("/proc/{pid}/task")),
        fds: count(format!("/proc/{pid}/fd")),
        shm_maps: maps.lines().filter(|l| l.contains("/dev/shm")).count(),
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The daemon under test and its directories; everything removed on drop.
struct Hostd {
    child: Child,
    work: PathBuf,
    shm_dir: PathBuf,
    addr: SocketAddr,
}

impl Hostd {
    fn start() -> Hostd {
        let tag = unique_tag();
        let work = std::env::temp_dir().join(format!("pvsched-cycles-{tag}"));
        let shm_dir = PathBuf::from(format!("/dev/shm/pvsched-cycles-{tag}"));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&shm_dir).unwrap();
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let config = HostdConfig {
            metrics_addr: addr.to_string(),
            discover: true,
            shm_dir: Some(shm_dir.clone()),
            qmp_timeout_ms: Some(500),
            ..HostdConfig::new(work.join("state").join("hostd.state"))
        }
        .write(work.join("hostd.toml"));
        std::fs::create_dir_all(work.join("state")).unwrap();
        let d = Hostd {
            child: spawn_hostd(&config, &work.join("hostd.log")),
            work,
            shm_dir,
            addr,
        };
        wait_for("the daemon's status endpoint", || d.status().is_some());
        d
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.join("hostd.log")).unwrap_or_default()
    }

    fn status(&self) -> Option<serde_json::Value> {
        let body = pvsched_host::daemon::fetch_stats(self.addr, "/status").ok()?;
        serde_json::from_str(&body).ok()
    }

    /// Pids of the VMs the daemon has attached (`None`: no answer). A VM
    /// the daemon only remembers (gone, or failed) is listed with pid 0.
    fn vm_pids(&self) -> Option<Vec<i64>> {
        self.status().and_then(|s| {
            s["vms"].as_array().map(|v| {
                v.iter()
                    .filter_map(|vm| vm["pid"].as_i64())
                    .filter(|&p| p != 0)
                    .collect()
            })
        })
    }

    /// Every VM the status lists, attached or remembered.
    fn listed(&self) -> Option<Vec<String>> {
        self.status().and_then(|s| {
            s["vms"].as_array().map(|v| {
                v.iter()
                    .map(|vm| vm["name"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
        })
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.shm_dir);
        remove_unless_panicking(&self.work);
    }
}

/// The QEMU of one cycle, with its shared file in the daemon's discovery
/// directory.
fn start_vm(d: &Hostd, cycle: usize, run_firmware: bool) -> Qemu {
    let mut qemu = Qemu::builder(
        &format!("c{cycle}"),
        d.shm_dir.join(format!("pvsched-c{cycle}")),
        d.work.join(format!("c{cycle}.qmp")),
    )
    .memory_mib(16);
    if run_firmware {
        qemu = qemu.firmware(spin_firmware(&d.work));
    }
    qemu.spawn()
}

/// Writes what an attached guest asking for a boost on vCPU 0 writes.
fn ask_boost(vm: &Qemu) {
    let mut guest = Guest::open(&vm.shm);
    wait_within("the daemon's header", Duration::from_secs(10), || {
        guest.header_ready()
    });
    guest.attach();
    guest.ask(0, true);
}

/// `quit` over QMP, then waits for QEMU to exit.
fn qmp_quit(mut vm: Qemu) {
    let stream = UnixStream::connect(&vm.qmp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // greeting
    let mut w = stream;
    for cmd in ["qmp_capabilities", "quit"] {
        writeln!(w, "{{\"execute\":\"{cmd}\"}}").unwrap();
        line.clear();
        let _ = reader.read_line(&mut line);
    }
    let status = vm.child.wait().unwrap();
    assert!(status.success(), "QEMU after quit: {status}");
}

/// SIGKILL, then waits for QEMU to exit.
fn sigkill(mut vm: Qemu) {
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
}

#[test]
fn a_hundred_vm_start_stop_cycles_leak_nothing() {
    require!(Needs::DevShm);
    let d = Hostd::start();
    let state_dir = d.work.join("state");
    // Let the daemon settle (first refresh done) before the baseline.
    std::thread::sleep(Duration::from_millis(300));
    let baseline = held(d.pid());
    let state_files = files_in(&state_dir);
    eprintln!(
        "baseline of hostd pid {}: {baseline:?}, state dir {state_files:?}",
        d.pid()
    );
    assert_eq!(baseline.shm_maps, 0, "mappings before any VM");

    let start = Instant::now();
    let c = run_cycles(&d, CYCLES, baseline.clone());
    // Back to the baseline (a status request may be in flight: poll).
    let mut end = held(d.pid());
    let settle = Instant::now();
    while end != baseline && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        end = held(d.pid());
    }
    eprintln!(
        "{CYCLES} cycles in {:.1} s ({} SIGKILL, {} QMP quit, {} with a vCPU seen RT, \
         {} executing firmware); hostd baseline {baseline:?}, peak {:?}, end {end:?}",
        start.elapsed().as_secs_f64(),
        c.killed,
        c.quit,
        c.boosted,
        c.firmware,
        c.peak
    );
    assert_eq!(
        end,
        baseline,
        "hostd leaked (threads, fds, /dev/shm maps)\n{}",
        d.log()
    );
    assert_eq!(d.vm_pids(), Some(vec![]), "VMs still attached");
    eprintln!(
        "the status still lists {} gone VM(s)",
        d.listed().map_or(0, |l| l.len())
    );
    assert_eq!(
        files_in(&d.shm_dir),
        Vec::<String>::new(),
        "files left in the shm dir"
    );
    assert_eq!(
        files_in(&state_dir),
        state_files,
        "files left in the state dir"
    );
    // The daemon is healthy at the end: it stops cleanly.
    let mut d = d;
    let ok = Command::new("kill")
        .arg("-15")
        .arg(d.pid().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let status = d.child.wait().unwrap();
    assert!(status.success(), "hostd exited with {status}\n{}", d.log());
    assert!(!state_dir.join("hostd.state").exists());
}

/// What a run of cycles did.
struct Cycles {
    boosted: usize,
    killed: usize,
    quit: usize,
    firmware: usize,
    peak: Held,
}

/// Starts and stops `n` VMs under `d`, one at a time.
fn run_cycles(d: &Hostd, n: usize, baseline: Held) -> Cycles {
    let start = Instant::now();
    let (mut boosted, mut killed, mut quit, mut firmware) = (0, 0, 0, 0);
    let mut peak = baseline;
    for cycle in 0..n {
        let run_firmware = cycle % 25 == 24 || (n < 25 && cycle == n - 1);
        let vm = start_vm(d, cycle, run_firmware);
        let pid = i64::from(vm.pid());
        wait_for(
            &format!("cycle {cycle}: the daemon to attach QEMU pid {pid}"),
            || d.vm_pids().is_some_and(|p| p.contains(&pid)),
        );
        let now = held(d.pid());
        assert_eq!(now.shm_maps, 1, "cycle {cycle}: one VM, mappings {now:?}");
        peak = Held {
            threads: peak.threads.max(now.threads),
            fds: peak.fds.max(now.fds),
            shm_maps: peak.shm_maps.max(now.shm_maps),
        };
        // A boost seen in /proc in two of every ten cycles and in firmware cycles;
        // the VM then dies with its vCPU still boosted.
        if cycle % 10 == 3 || cycle % 10 == 6 || run_firmware {
            let tid = vm.vcpu_tid(0).expect("vCPU 0 thread");
            ask_boost(&vm);
            // Polled every millisecond: a vCPU that spins in firmware is a repeat
            // offender after three throttles, and its VM's cut budget then boosts
            // it in slivers shorter than the usual 10 ms poll.
            poll_within(
                &format!("cycle {cycle}: vCPU 0 (tid {tid}) RT in /proc"),
                Duration::from_secs(10),
                Duration::from_millis(1),
                || matches!(vm.try_policy(tid), Some(1 | 2)),
            );
            boosted += 1;
        }
        firmware += usize::from(run_firmware);
        if cycle % 2 == 0 {
            sigkill(vm);
            killed += 1;
        } else {
            qmp_quit(vm);
            quit += 1;
        }
        wait_for(
            &format!("cycle {cycle}: the daemon to drop QEMU pid {pid}"),
            || d.vm_pids().is_some_and(|p| !p.contains(&pid)),
        );
        if cycle % 10 == 9 {
            eprintln!(
                "cycle {}/{n}: {:.1} s, hostd holds {:?}",
                cycle + 1,
                start.elapsed().as_secs_f64(),
                held(d.pid())
            );
        }
    }
    Cycles {
        boosted,
        killed,
        quit,
        firmware,
        peak,
    }
}

/// A discovered VM that is gone leaves the status (and the daemon's
/// memory), so neither grows with every VM a host ever ran.
#[test]
fn a_gone_vm_is_forgotten() {
    require!(Needs::DevShm);
    let d = Hostd::start();
    std::thread::sleep(Duration::from_millis(300));
    run_cycles(&d, 5, held(d.pid()));
    // Given a few refreshes to forget them.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.listed(), Some(vec![]), "gone VMs still listed");
}
