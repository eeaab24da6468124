//! `pvsched hostd` with its seccomp filters enforcing (the default), against
//! a real QEMU (TCG, the same spinning "BIOS" as tests/hostd_qemu.rs): the
//! daemon finds the VM by discovery, boosts and throttles, serves
//! `/metrics` and `/status`, restores on SIGTERM, and its filtered watchdog
//! restores after kill -9. Every daemon thread and the watchdog must show
//! exactly one seccomp filter in /proc, and a call outside a list would have
//! killed the daemon with SIGSYS. Needs root, qemu-system-x86_64 and
//! seccomp; without them it prints SKIPPED, and fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status.lines().any(|l| l.starts_with("Seccomp:")) {
        return Err("the kernel has no seccomp".into());
    }
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(format!("{QEMU} not found")),
    }
}

macro_rules! require {
    () => {
        if let Err(why) = prerequisites() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{}: prerequisites missing under CI: {why}",
                module_path!()
            );
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
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

/// A QEMU with its shared file in its own directory under /dev/shm (the
/// daemon's discovery directory), and the daemons started against it.
struct Vm {
    dir: PathBuf,
    shm: PathBuf,
    qemu: Child,
    daemons: Vec<Child>,
}

impl Vm {
    fn start() -> Vm {
        let tag = std::process::id();
        let dir = std::env::temp_dir().join(format!("pvsched-sc-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let shm_dir = PathBuf::from(format!("/dev/shm/pvsched-sc-{tag}"));
        std::fs::create_dir_all(&shm_dir).unwrap();
        let shm = shm_dir.join("pvsched-vm");
        let mut bios = vec![0u8; 65536];
        bios[0xfff0] = 0xeb; // jmp $
        bios[0xfff1] = 0xfe;
        std::fs::write(dir.join("spin.bin"), bios).unwrap();
        let qmp = dir.join("qmp.sock");
        let qemu = Command::new(QEMU)
            .args(["-name", &format!("sc{tag},debug-threads=on")])
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
            qemu,
            daemons: Vec::new(),
        };
        wait_for("QEMU's QMP socket and vCPU threads", || {
            qmp.exists() && vm.shm.exists() && vm.vcpu_tids().len() == 2
        });
        vm
    }

    fn pid(&self) -> i32 {
        self.qemu.id() as i32
    }

    /// vCPU thread ids by index, from the thread names (`CPU n/TCG`).
    fn vcpu_tids(&self) -> Vec<i32> {
        let mut found: Vec<(usize, i32)> = tasks(self.pid() as u32)
            .into_iter()
            .filter_map(|(tid, name)| {
                let idx = name
                    .strip_prefix("CPU ")?
                    .strip_suffix("/TCG")?
                    .parse()
                    .ok()?;
                Some((idx, tid as i32))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, t)| t).collect()
    }

    fn policy(&self, tid: i32) -> u32 {
        HostFs::default().task_stat(self.pid(), tid).unwrap().policy
    }

    fn rt_threads(&self) -> Vec<i32> {
        let mut v: Vec<i32> = tasks(self.pid() as u32)
            .into_iter()
            .map(|(t, _)| t as i32)
            .filter(|&t| matches!(self.policy(t), 1 | 2))
            .collect();
        v.sort();
        v
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("hostd.state")
    }

    /// Discovery only (no `[[vm]]`), metrics on an ephemeral loopback port,
    /// and no `seccomp` key: the default must be to enforce.
    fn config(&self) -> PathBuf {
        let path = self.dir.join("hostd.toml");
        std::fs::write(
            &path,
            format!(
                "[daemon]\nperiod_us = 1000\nrefresh_ms = 100\nstate_file = \"{}\"\n\
                 metrics_addr = \"127.0.0.1:0\"\ndiscover = true\nshm_dir = \"{}\"\n\
                 [policy]\nmax_continuous_ns = 20000000\nbudget_ns = 25000000\nthrottle_ns = 300000000\n",
                self.state_file().display(),
                self.shm.parent().unwrap().display()
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
                std::fs::File::create(self.dir.join(format!("hostd{n}.log"))).unwrap(),
            ))
            .spawn()
            .unwrap();
        self.daemons.push(child);
        n
    }

    fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("hostd{n}.log"))).unwrap_or_default()
    }

    /// The metrics address the daemon logged.
    fn metrics_addr(&self, n: usize) -> std::net::SocketAddr {
        let mut addr = None;
        wait_for("the metrics line", || {
            addr = self.log(n).lines().find_map(|l| {
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
}

impl Drop for Vm {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        if let Some(p) = self.shm.parent() {
            let _ = std::fs::remove_dir_all(p);
        }
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// (tid, name) of every thread of a process.
fn tasks(pid: u32) -> Vec<(u32, String)> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some((tid, comm.trim().to_owned()))
        })
        .collect()
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

/// The `pvsched hostd-watchdog` process of daemon `daemon_pid`.
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

/// The test's stand-in for the guest module.
struct Guest {
    file: SharedFile,
    updates: u64,
}

impl Guest {
    fn open(path: &Path) -> Guest {
        Guest {
            file: SharedFile::open(path, None).unwrap(),
            updates: 0,
        }
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

/// Every thread of the daemon and its watchdog runs under exactly one
/// filter (per thread, not stacked), in filter mode (2).
fn assert_every_thread_filtered(vm: &Vm, n: usize) {
    let daemon = vm.daemons[n].id();
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
    require!();
    let mut vm = Vm::start();
    let tids = vm.vcpu_tids();
    let main = vm.pid();
    assert!(vm.rt_threads().is_empty(), "threads RT before the test");
    let d0 = vm.start_daemon();
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
    let addr = vm.metrics_addr(d0);
    // The snapshot it serves is refreshed every 100 ms.
    wait_for("the VM in /status", || {
        let status = pvsched_host::daemon::fetch_stats(addr, "/status").unwrap();
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["vms"][0]["pid"] == main
    });
    let metrics = pvsched_host::daemon::fetch_stats(addr, "/metrics").unwrap();
    assert!(metrics.contains("pvsched_"), "{metrics}");
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
    let pid = vm.daemons[d0].id();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = vm.daemons[d0].wait().unwrap();
    assert!(
        status.success(),
        "hostd exited with {status}: {}",
        vm.log(d0)
    );
    assert!(vm.rt_threads().is_empty(), "left RT after SIGTERM");
    assert!(!vm.state_file().exists());

    // 5. A second daemon boosts; kill -9 of it: the filtered watchdog
    // reads the state file and restores every thread.
    let d1 = vm.start_daemon();
    wait_for("vCPU 1 boosted by the second daemon", || {
        vm.policy(tids[1]) == 2
    });
    assert_every_thread_filtered(&vm, d1);
    let watchdog = watchdog_of(vm.daemons[d1].id()).expect("no watchdog");
    assert!(vm.daemons[d1].kill().is_ok());
    let _ = vm.daemons[d1].wait();
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
