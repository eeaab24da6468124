//! The watchdog of `pvsched hostd` against a real QEMU (TCG, started with
//! `-S`: the vCPU threads exist, nothing runs): the daemon boosts vCPU
//! threads a guest line asks for; after `kill -9` of the daemon no QEMU
//! thread may be RT within 1 s, with no restart; a stalled (SIGSTOPped)
//! daemon is killed and its threads restored; when both processes die at
//! once, `pvsched hostd --restore-only` (systemd's `ExecStopPost`) restores.
//!
//! Needs root and qemu-system-x86_64. Without them the tests print SKIPPED,
//! or fail when `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_abi::{encode_guest_line, GuestVcpuState};
use pvsched_host::procfs::HostFs;

const QEMU: &str = "qemu-system-x86_64";

fn prerequisites() -> Result<(), String> {
    if !pvsched_host::sys::is_root() {
        return Err("not root (sched_setattr to SCHED_RR needs CAP_SYS_NICE)".into());
    }
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(format!("{QEMU} not found")),
    }
}

macro_rules! require {
    () => {
        if let Err(why) = prerequisites() {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "{}: prerequisite missing under CI=true: {why}",
                    module_path!()
                );
            }
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A QEMU (`-S`) with its shared file and QMP socket, and the daemons
/// started for it; everything is killed and removed on drop.
struct Vm {
    dir: PathBuf,
    shm: PathBuf,
    qmp: PathBuf,
    qemu: Child,
    daemons: Vec<Child>,
}

impl Vm {
    fn start() -> Vm {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("pvsched-wd-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let shm = PathBuf::from(format!("/dev/shm/pvsched-wd-{tag}"));
        let qmp = dir.join("qmp.sock");
        let qemu = Command::new(QEMU)
            .args(["-name", &format!("wd{tag},debug-threads=on")])
            .args(["-accel", "tcg,thread=multi", "-smp", "2", "-m", "32", "-S"])
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=pvsched,mem-path={},size=1M,share=on",
                shm.display()
            ))
            .args(["-device", "ivshmem-plain,memdev=pvsched"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("qemu.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let vm = Vm {
            dir,
            shm,
            qmp,
            qemu,
            daemons: Vec::new(),
        };
        wait_for(
            "QEMU's QMP socket and vCPU threads",
            Duration::from_secs(20),
            || vm.qmp.exists() && vm.shm.exists() && vm.vcpu_tids().len() == 2,
        );
        vm
    }

    fn pid(&self) -> i32 {
        self.qemu.id() as i32
    }

    /// vCPU thread ids by index, from the thread names (`CPU n/TCG`).
    fn vcpu_tids(&self) -> Vec<i32> {
        let mut found: Vec<(usize, i32)> = Vec::new();
        for tid in self.all_tids() {
            let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid()))
                .unwrap_or_default();
            if let Some(idx) = comm
                .trim()
                .strip_prefix("CPU ")
                .and_then(|r| r.strip_suffix("/TCG"))
                .and_then(|i| i.parse::<usize>().ok())
            {
                found.push((idx, tid));
            }
        }
        found.sort();
        found.into_iter().map(|(_, t)| t).collect()
    }

    fn all_tids(&self) -> Vec<i32> {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// QEMU's threads whose policy (stat field 41) is SCHED_FIFO or SCHED_RR.
    fn rt_threads(&self) -> Vec<i32> {
        let fs = HostFs::default();
        let mut v: Vec<i32> = self
            .all_tids()
            .into_iter()
            .filter(|&t| {
                fs.task_stat(self.pid(), t)
                    .is_ok_and(|st| matches!(st.policy, 1 | 2))
            })
            .collect();
        v.sort();
        v
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("hostd.state")
    }

    fn config(&self) -> PathBuf {
        let path = self.dir.join("hostd.toml");
        std::fs::write(
            &path,
            format!(
                "[daemon]\nperiod_us = 1000\nrefresh_ms = 100\nstate_file = \"{}\"\n\
                 metrics_addr = \"\"\ndiscover = false\nwatchdog_stall_ms = 500\n\
                 [[vm]]\nname = \"wd\"\nqmp = \"{}\"\nshm = \"{}\"\n",
                self.state_file().display(),
                self.qmp.display(),
                self.shm.display()
            ),
        )
        .unwrap();
        path
    }

    fn start_daemon(&mut self) -> usize {
        let n = self.daemons.len();
        let child = Command::new(env!("CARGO_BIN_EXE_pvsched"))
            .args(["hostd", "--config"])
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.log_path(n)).unwrap(),
            ))
            .spawn()
            .unwrap();
        self.daemons.push(child);
        n
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.join(format!("hostd{n}.log"))
    }

    /// The daemon's log; its watchdog writes to the same stderr.
    fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.log_path(n)).unwrap_or_default()
    }

    fn daemon_pid(&self, n: usize) -> u32 {
        self.daemons[n].id()
    }

    fn signal(pid: u32, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} {pid}");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = std::fs::remove_file(&self.shm);
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The watchdog started by daemon `daemon_pid`: the `hostd-watchdog`
/// process whose `--daemon-pid` names it.
fn watchdog_of(daemon_pid: u32) -> Option<u32> {
    let want = daemon_pid.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_ours = args.iter().any(|a| *a == b"hostd-watchdog")
            && args
                .windows(2)
                .any(|w| w[0] == b"--daemon-pid" && w[1] == want.as_bytes());
        is_ours.then_some(pid)
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

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The test's stand-in for the guest module.
struct Guest {
    file: SharedFile,
    updates: u64,
}

impl Guest {
    /// Waits for the daemon's header, attaches and asks for a boost on both vCPUs.
    fn attach_and_ask(path: &Path) -> Guest {
        let file = SharedFile::open(path, None).unwrap();
        wait_for(
            "the daemon to initialise the header",
            Duration::from_secs(20),
            || {
                let h = file.region().read_header().unwrap();
                h.host.magic == PVSCHED_MAGIC && h.host.nr_slots >= 2
            },
        );
        file.region()
            .write_header_guest(&PvschedHeaderGuest {
                guest_version_major: PVSCHED_VERSION_MAJOR,
                guest_nr_cpus: 2,
                guest_features: PVSCHED_FEAT_KNOWN,
                guest_generation: 1,
                guest_state: PVSCHED_GUEST_ATTACHED,
                ..Default::default()
            })
            .unwrap();
        let mut guest = Guest { file, updates: 0 };
        guest.ask(0);
        guest.ask(1);
        guest
    }

    fn ask(&mut self, cpu: u32) {
        self.updates += 1;
        let line = encode_guest_line(&GuestVcpuState::requesting(cpu, Some(50), self.updates));
        self.file.region().write_guest_line(cpu, &line).unwrap();
    }
}

/// Waits until both vCPU threads are seen RT in /proc.
fn wait_boosted(vm: &Vm, n: usize) -> Vec<i32> {
    let vcpus = vm.vcpu_tids();
    wait_for(
        &format!("daemon {n} to boost both vCPU threads"),
        Duration::from_secs(20),
        || {
            let rt = vm.rt_threads();
            vcpus.iter().all(|t| rt.contains(t))
        },
    );
    vm.rt_threads()
}

#[test]
fn after_kill_9_of_the_daemon_nothing_stays_rt_within_one_second() {
    require!();
    let mut vm = Vm::start();
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon();
    let _guest = Guest::attach_and_ask(&vm.shm);
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
    wait_for("the watchdog to exit", Duration::from_secs(5), || {
        process_gone(watchdog)
    });
    let log = vm.log(d0);
    let line = log
        .lines()
        .find(|l| l.starts_with("pvsched-watchdog:") && l.contains("restored"))
        .unwrap_or_else(|| panic!("no watchdog line: {log}"));
    assert!(
        line.contains(&format!("restored {} thread(s)", boosted.len())),
        "{line}"
    );
    assert!(!vm.state_file().exists());

    // No restart was needed; a new daemon boosts again (the guest still asks).
    let d1 = vm.start_daemon();
    let again = wait_boosted(&vm, d1);
    assert_eq!(again, boosted);
    // A clean stop: the daemon restores itself, its watchdog exits quietly.
    let watchdog = watchdog_of(vm.daemon_pid(d1)).expect("no watchdog for the second daemon");
    Vm::signal(vm.daemon_pid(d1), "TERM");
    let status = vm.daemons[d1].wait().unwrap();
    assert!(
        status.success(),
        "hostd exited with {status}: {}",
        vm.log(d1)
    );
    assert!(vm.rt_threads().is_empty(), "left RT after SIGTERM");
    wait_for(
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
    let mut vm = Vm::start();
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon();
    let _guest = Guest::attach_and_ask(&vm.shm);
    let boosted = wait_boosted(&vm, d0);
    let daemon = vm.daemon_pid(d0);
    let watchdog = watchdog_of(daemon).unwrap_or_else(|| panic!("no watchdog: {}", vm.log(d0)));

    // SIGSTOP: the loop stops beating; the process lives on.
    let stopped = Instant::now();
    Vm::signal(daemon, "STOP");
    wait_for(
        "the stalled daemon's threads restored",
        Duration::from_secs(5),
        || vm.rt_threads().is_empty(),
    );
    let cleared = stopped.elapsed();
    let mut status = None;
    wait_for(
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
    wait_for("the watchdog to exit", Duration::from_secs(5), || {
        process_gone(watchdog)
    });
    let log = vm.log(d0);
    let line = log
        .lines()
        .find(|l| l.starts_with("pvsched-watchdog:") && l.contains("STALLED"))
        .unwrap_or_else(|| panic!("no stall line: {log}"));
    assert!(
        line.contains(&format!("restored {} thread(s)", boosted.len())),
        "{line}"
    );
    eprintln!(
        "threads {boosted:?}: restored {:.0} ms after SIGSTOP (stall timeout 500 ms); {line}",
        cleared.as_secs_f64() * 1000.0
    );
}

#[test]
fn restore_only_restores_after_both_processes_die_and_refuses_a_running_daemon() {
    require!();
    let mut vm = Vm::start();
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon();
    let _guest = Guest::attach_and_ask(&vm.shm);
    let boosted = wait_boosted(&vm, d0);
    let restore_only = |vm: &Vm| {
        Command::new(env!("CARGO_BIN_EXE_pvsched"))
            .args(["hostd", "--restore-only", "--config"])
            .arg(vm.config())
            .output()
            .unwrap()
    };
    // While the daemon runs, its state file is not touched.
    let out = restore_only(&vm);
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
    Vm::signal(watchdog, "KILL");
    wait_for("the watchdog to die", Duration::from_secs(5), || {
        process_gone(watchdog)
    });
    vm.daemons[d0].kill().unwrap();
    let _ = vm.daemons[d0].wait();
    assert_eq!(
        vm.rt_threads(),
        boosted,
        "restored with no process left to do it"
    );
    let out = restore_only(&vm);
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
    assert!(restore_only(&vm).status.success());
}
