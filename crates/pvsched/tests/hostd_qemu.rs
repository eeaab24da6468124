//! `pvsched hostd` against a real QEMU (TCG, no guest kernel, no guest
//! module): the test writes guest lines into the shared file as a guest
//! would and watches the vCPU threads' scheduling policy in /proc.
//!
//! The "BIOS" is 64 KiB whose reset vector is `jmp $`: vCPU 0 spins (burns
//! host CPU, so a boost it asks for forever hits the budget), vCPU 1 stays
//! halted waiting for a SIPI. Needs qemu-system-x86_64 and root; prints a
//! SKIPPED line otherwise, or fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_abi::{encode_guest_line, GuestVcpuState, SeqRead};
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

/// Skips (returns) when a prerequisite is missing; under `CI=true` fails instead, since a
/// CI run that skipped would pass without testing anything.
macro_rules! require {
    () => {
        if let Err(why) = prerequisites() {
            if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1") {
                panic!(
                    "{}: prerequisites missing under CI=true: {why}",
                    module_path!()
                );
            }
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique work directory, a QEMU, its shared file; all removed on drop.
struct Vm {
    dir: PathBuf,
    shm: PathBuf,
    qmp: PathBuf,
    qemu: Child,
    daemons: Vec<Child>,
}

impl Vm {
    fn start(shm_in_own_dir: bool) -> Vm {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("pvsched-it-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let shm = if shm_in_own_dir {
            let d = PathBuf::from(format!("/dev/shm/pvsched-it-{tag}"));
            std::fs::create_dir_all(&d).unwrap();
            d.join("pvsched-vm")
        } else {
            PathBuf::from(format!("/dev/shm/pvsched-it-{tag}"))
        };
        let mut bios = vec![0u8; 65536];
        bios[0xfff0] = 0xeb; // jmp $
        bios[0xfff1] = 0xfe;
        std::fs::write(dir.join("spin.bin"), bios).unwrap();
        let qmp = dir.join("qmp.sock");
        let qemu = Command::new(QEMU)
            .args(["-name", &format!("it{tag},debug-threads=on")])
            .args(["-accel", "tcg,thread=multi", "-smp", "2", "-m", "32"])
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .arg("-bios")
            .arg(dir.join("spin.bin"))
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
        wait_for("QEMU's QMP socket and vCPU threads", || {
            vm.qmp.exists() && vm.shm.exists() && vm.vcpu_tids().len() == 2
        });
        vm
    }

    fn pid(&self) -> i32 {
        self.qemu.id() as i32
    }

    /// vCPU thread ids by index, from the thread names (`CPU n/TCG`).
    fn vcpu_tids(&self) -> Vec<i32> {
        let mut found: Vec<(usize, i32)> = Vec::new();
        let Ok(rd) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return Vec::new();
        };
        for e in rd.flatten() {
            let tid: i32 = e.file_name().to_str().unwrap().parse().unwrap();
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if let Some(rest) = comm.trim().strip_prefix("CPU ") {
                if let Some(idx) = rest
                    .strip_suffix("/TCG")
                    .and_then(|i| i.parse::<usize>().ok())
                {
                    found.push((idx, tid));
                }
            }
        }
        found.sort();
        found.into_iter().map(|(_, t)| t).collect()
    }

    fn all_tids(&self) -> Vec<i32> {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_str().unwrap().parse().unwrap())
            .collect()
    }

    /// Scheduling policy of a thread of this QEMU (field 41 of stat).
    fn policy(&self, tid: i32) -> u32 {
        HostFs::default().task_stat(self.pid(), tid).unwrap().policy
    }

    fn rt_threads(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .all_tids()
            .into_iter()
            .filter(|&t| matches!(self.policy(t), 1 | 2))
            .collect();
        v.sort();
        v
    }

    fn config(&self, discover: bool) -> PathBuf {
        let path = self.dir.join("hostd.toml");
        let vm = if discover {
            String::new()
        } else {
            format!(
                "[[vm]]\nname = \"it\"\nqmp = \"{}\"\nshm = \"{}\"\n",
                self.qmp.display(),
                self.shm.display()
            )
        };
        std::fs::write(
            &path,
            format!(
                "[daemon]\nperiod_us = 1000\nrefresh_ms = 100\nstate_file = \"{}\"\n\
                 metrics_addr = \"\"\ndiscover = {discover}\nshm_dir = \"{}\"\n\
                 [policy]\nmax_continuous_ns = 20000000\nbudget_ns = 25000000\nthrottle_ns = 300000000\n{vm}",
                self.state_file().display(),
                self.shm.parent().unwrap().display()
            ),
        )
        .unwrap();
        path
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("hostd.state")
    }

    fn start_daemon(&mut self) -> usize {
        let n = self.daemons.len();
        let child = Command::new(env!("CARGO_BIN_EXE_pvsched"))
            .args(["hostd", "--config"])
            .arg(self.config(false))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.join(format!("hostd{n}.log"))).unwrap(),
            ))
            .spawn()
            .unwrap();
        self.daemons.push(child);
        n
    }

    fn daemon_log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("hostd{n}.log"))).unwrap_or_default()
    }

    fn signal_daemon(&mut self, n: usize, sig: i32) {
        let pid = self.daemons[n].id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let status = self.daemons[n].wait().unwrap();
        if sig == 15 {
            assert!(
                status.success(),
                "hostd exited with {status}: {}",
                self.daemon_log(n)
            );
        }
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
        if let Some(p) = self
            .shm
            .parent()
            .filter(|p| p.to_string_lossy().starts_with("/dev/shm/pvsched-it-"))
        {
            let _ = std::fs::remove_dir_all(p);
        }
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `pvsched hostd-watchdog` process started by daemon `daemon_pid`.
fn watchdog_of(daemon_pid: u32) -> Option<u32> {
    let want = daemon_pid.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let ours = args.contains(&&b"hostd-watchdog"[..])
            && args
                .windows(2)
                .any(|w| w[0] == b"--daemon-pid" && w[1] == want.as_bytes());
        ours.then_some(pid)
    })
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The test's stand-in for the guest module.
struct Guest {
    file: SharedFile,
    updates: u64,
}

impl Guest {
    fn open(path: &Path) -> Guest {
        let file = SharedFile::open(path, None).unwrap();
        Guest { file, updates: 0 }
    }

    fn header_ready(&self) -> bool {
        let h = self.file.region().read_header().unwrap();
        h.host.magic == PVSCHED_MAGIC && h.host.nr_slots >= 2
    }

    fn attach(&self) {
        self.file
            .region()
            .write_header_guest(&PvschedHeaderGuest {
                guest_version_major: PVSCHED_VERSION_MAJOR,
                guest_nr_cpus: 2,
                guest_features: PVSCHED_FEAT_KNOWN,
                guest_generation: 1,
                guest_state: PVSCHED_GUEST_ATTACHED,
                ..Default::default()
            })
            .unwrap();
    }

    fn ask(&mut self, cpu: u32, boost: bool) {
        self.updates += 1;
        let line = encode_guest_line(&GuestVcpuState::requesting(
            cpu,
            boost.then_some(50),
            self.updates,
        ));
        self.file.region().write_guest_line(cpu, &line).unwrap();
    }

    fn host(&self, slot: u32) -> PvschedHostLine {
        loop {
            if let SeqRead::Consistent(l) = self.file.region().read_host_line(slot).unwrap() {
                return l;
            }
        }
    }
}

#[test]
fn hostd_boosts_throttles_unboosts_and_restores_real_qemu_vcpu_threads() {
    require!();
    let mut vm = Vm::start(false);
    let tids = vm.vcpu_tids();
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon();
    let mut guest = Guest::open(&vm.shm);
    wait_for("the daemon to initialise the header", || {
        guest.header_ready()
    });
    guest.attach();
    guest.ask(0, false);

    // 1. vCPU 1 asks: exactly its thread becomes SCHED_RR, with QEMU's main
    // thread, which delivers its interrupts (timers under TCG).
    let main = vm.pid();
    let mut boosted = vec![tids[1], main];
    boosted.sort();
    guest.ask(1, true);
    wait_for("vCPU 1 boosted", || vm.policy(tids[1]) == 2);
    wait_for("main thread boosted", || vm.policy(main) == 2);
    assert_eq!(vm.rt_threads(), boosted, "{}", vm.daemon_log(d0));
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
    vm.signal_daemon(d0, 15);
    assert!(vm.rt_threads().is_empty(), "left RT after SIGTERM");
    assert!(!vm.state_file().exists());

    // 5. A new daemon boosts again; kill -9 leaves the thread RT...
    let d1 = vm.start_daemon();
    wait_for("vCPU 1 boosted by the second daemon", || {
        vm.policy(tids[1]) == 2
    });
    wait_for("main thread boosted by the second daemon", || {
        vm.policy(main) == 2
    });
    // Both processes die at once (as with a cgroup kill): first the watchdog,
    // which would otherwise restore (tests/hostd_watchdog.rs), then the daemon.
    let watchdog = watchdog_of(vm.daemons[d1].id()).expect("no watchdog");
    assert!(Command::new("kill")
        .args(["-9", &watchdog.to_string()])
        .status()
        .unwrap()
        .success());
    vm.signal_daemon(d1, 9);
    assert_eq!(vm.rt_threads(), boosted);
    assert!(vm.state_file().exists());
    // ...the guest stops asking, and the next daemon reconciles at start.
    guest.ask(1, false);
    let d2 = vm.start_daemon();
    wait_for("vCPU 1 restored by reconciliation", || {
        vm.policy(tids[1]) == 0
    });
    wait_for("the reconcile log line", || {
        vm.daemon_log(d2).contains("restored 2 thread")
    });
    assert!(vm.rt_threads().is_empty());
    vm.signal_daemon(d2, 15);
    assert!(vm.rt_threads().is_empty());
    eprintln!(
        "QEMU pid {} vCPU threads {tids:?}: boost, throttle, unboost, SIGTERM restore, kill -9 + reconcile all checked",
        vm.pid()
    );
}

#[test]
fn hostd_once_discovers_a_qemu_vm_and_changes_nothing() {
    require!();
    let vm = Vm::start(true);
    let tids = vm.vcpu_tids();
    let before = std::fs::read(&vm.shm).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pvsched"))
        .args(["hostd", "--once", "--json", "--config"])
        .arg(vm.config(true))
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
