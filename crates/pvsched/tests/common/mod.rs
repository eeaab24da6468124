//! What the tests against a real QEMU share: the prerequisites and the skip
//! rule, a QEMU (TCG, two vCPUs, a shared file as `memory-backend-file` +
//! `ivshmem-plain`, a QMP socket) read back through /proc, a VM with the
//! `pvsched hostd` daemons started for it, the daemon's config file, and a
//! stand-in for the guest module writing into the shared file.
#![allow(dead_code)]

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_abi::{encode_guest_line, GuestVcpuState, SeqRead};
use pvsched_host::procfs::HostFs;
use pvsched_host::qmp::QmpClient;

pub mod libvirt;
pub mod tmux;

pub const QEMU: &str = "qemu-system-x86_64";

/// A prerequisite some tests have beyond root and QEMU.
#[derive(Clone, Copy, Debug)]
pub enum Needs {
    /// The kernel has seccomp (`Seccomp:` in /proc/self/status).
    Seccomp,
    /// /dev/shm is a directory.
    DevShm,
    /// tmux runs (`tmux -V`).
    Tmux,
}

/// Root (sched_setattr to SCHED_RR needs CAP_SYS_NICE), then `extra`, then QEMU.
pub fn prerequisites(extra: &[Needs]) -> Result<(), String> {
    if !pvsched_host::sys::is_root() {
        return Err("not root (sched_setattr to SCHED_RR needs CAP_SYS_NICE)".into());
    }
    for need in extra {
        match need {
            Needs::Seccomp => {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                if !status.lines().any(|l| l.starts_with("Seccomp:")) {
                    return Err("the kernel has no seccomp".into());
                }
            }
            Needs::DevShm => {
                if !Path::new("/dev/shm").is_dir() {
                    return Err("no /dev/shm".into());
                }
            }
            Needs::Tmux => {
                if !Command::new("tmux")
                    .arg("-V")
                    .output()
                    .is_ok_and(|o| o.status.success())
                {
                    return Err("tmux not found".into());
                }
            }
        }
    }
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(format!("{QEMU} not found")),
    }
}

/// Whether this is a CI run (`CI=true` or `CI=1`), where a skip would pass
/// without testing anything.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Skips (returns) when a prerequisite is missing; under CI fails instead.
/// `require!()` needs root and QEMU; `require!(Needs::Seccomp)` more.
macro_rules! require {
    ($($need:expr),* $(,)?) => {
        if let Err(why) = $crate::common::prerequisites(&[$($need),*]) {
            if $crate::common::under_ci() {
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
pub(crate) use require;

/// Polls `cond` every 10 ms; fails after 20 s.
pub fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    wait_within(what, Duration::from_secs(20), cond);
}

/// Polls `cond` every 10 ms; fails after `limit`.
pub fn wait_within(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    poll_within(what, limit, Duration::from_millis(10), cond);
}

/// Polls `cond` every `every`; fails after `limit`.
pub fn poll_within(what: &str, limit: Duration, every: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(every);
    }
}

/// (tid, name) of every thread of a process; empty once it is gone.
pub fn tasks(pid: u32) -> Vec<(u32, String)> {
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

/// Scheduling policy (field 41 of stat) of thread `tid` of process `pid`, `None` once
/// it is gone: 0 the fair class, 1 SCHED_FIFO, 2 SCHED_RR, 6 SCHED_DEADLINE.
pub fn thread_policy(pid: u32, tid: u32) -> Option<u32> {
    let stat = HostFs::default().task_stat(pid as i32, tid as i32).ok()?;
    Some(stat.policy)
}

/// `<pid>-<n>`, unique to this call in this run.
pub fn unique_tag() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// Removes a work directory, unless the test failed: then it is kept for inspection.
pub fn remove_unless_panicking(dir: &Path) {
    if std::thread::panicking() {
        eprintln!("kept {} for inspection", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `kill -SIG pid`, which must succeed.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// The `pvsched hostd-watchdog` process started by daemon `daemon_pid`:
/// the one whose `--daemon-pid` names it.
pub fn watchdog_of(daemon_pid: u32) -> Option<u32> {
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

/// Writes (once) 64 KiB of firmware whose reset vector is `jmp $` into
/// `dir`: vCPU 0 spins, burning host CPU; vCPU 1 stays halted waiting for a SIPI.
pub fn spin_firmware(dir: &Path) -> PathBuf {
    let path = dir.join("spin.bin");
    if !path.exists() {
        let mut bios = vec![0u8; 65536];
        bios[0xfff0] = 0xeb; // jmp $
        bios[0xfff1] = 0xfe;
        std::fs::write(&path, bios).unwrap();
    }
    path
}

/// How to start a QEMU: see [`Qemu::builder`].
pub struct QemuBuilder {
    name: String,
    shm: PathBuf,
    qmp: PathBuf,
    mem_mib: u32,
    firmware: Option<PathBuf>,
    log: Option<PathBuf>,
    iothreads: Vec<String>,
    vcpus: usize,
}

impl QemuBuilder {
    /// `-smp N` (2 unless set).
    pub fn vcpus(mut self, n: usize) -> Self {
        self.vcpus = n;
        self
    }

    /// One `-object iothread,id=ID` per id.
    pub fn iothreads(mut self, ids: &[&str]) -> Self {
        self.iothreads = ids.iter().map(|&id| id.to_owned()).collect();
        self
    }

    /// Guest memory (32 MiB unless set).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    /// Runs `firmware` (see [`spin_firmware`]) instead of starting paused
    /// (`-S`: the vCPU threads exist, nothing executes).
    pub fn firmware(mut self, firmware: PathBuf) -> Self {
        self.firmware = Some(firmware);
        self
    }

    /// QEMU's stderr goes to `path` (else nowhere).
    pub fn log(mut self, path: PathBuf) -> Self {
        self.log = Some(path);
        self
    }

    /// Starts QEMU and waits for its QMP socket, its shared file and every
    /// vCPU thread.
    pub fn spawn(self) -> Qemu {
        let mut cmd = Command::new(QEMU);
        cmd.args(["-name", &format!("{},debug-threads=on", self.name)])
            .args([
                "-accel",
                "tcg,thread=multi",
                "-smp",
                &self.vcpus.to_string(),
            ])
            .args(["-m", &self.mem_mib.to_string()])
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=pvsched,mem-path={},size=1M,share=on",
                self.shm.display()
            ))
            .args(["-device", "ivshmem-plain,memdev=pvsched"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(match &self.log {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::null(),
            });
        match &self.firmware {
            Some(bios) => cmd.arg("-bios").arg(bios),
            None => cmd.arg("-S"),
        };
        for id in &self.iothreads {
            cmd.arg("-object").arg(format!("iothread,id={id}"));
        }
        let vcpus = self.vcpus;
        let qemu = Qemu {
            child: cmd.spawn().unwrap(),
            shm: self.shm,
            qmp: self.qmp,
        };
        wait_for("QEMU's QMP socket and vCPU threads", || {
            qemu.qmp.exists() && qemu.shm.exists() && qemu.vcpu_tids().len() == vcpus
        });
        qemu
    }
}

/// A running QEMU with two vCPUs; killed, and its shared file and QMP
/// socket removed, on drop.
pub struct Qemu {
    pub child: Child,
    pub shm: PathBuf,
    pub qmp: PathBuf,
}

impl Qemu {
    /// A QEMU named `name` (`-name`) with its shared file at `shm` and its
    /// QMP socket at `qmp`.
    pub fn builder(name: &str, shm: PathBuf, qmp: PathBuf) -> QemuBuilder {
        QemuBuilder {
            name: name.to_owned(),
            shm,
            qmp,
            mem_mib: 32,
            firmware: None,
            log: None,
            iothreads: Vec::new(),
            vcpus: 2,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// (index, tid) of the vCPU threads, from the thread names (`CPU n/TCG`).
    fn vcpus(&self) -> Vec<(usize, i32)> {
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
        found
    }

    /// vCPU thread ids by index.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.vcpus().into_iter().map(|(_, t)| t).collect()
    }

    /// The thread of vCPU `index`.
    pub fn vcpu_tid(&self, index: usize) -> Option<i32> {
        self.vcpus()
            .into_iter()
            .find_map(|(i, t)| (i == index).then_some(t))
    }

    /// Scheduling policy (stat field 41) of a thread of this QEMU.
    pub fn policy(&self, tid: i32) -> u32 {
        HostFs::default().task_stat(self.pid(), tid).unwrap().policy
    }

    /// [`Qemu::policy`], or `None` once the thread is gone.
    pub fn try_policy(&self, tid: i32) -> Option<u32> {
        HostFs::default()
            .task_stat(self.pid(), tid)
            .ok()
            .map(|s| s.policy)
    }

    /// This QEMU's threads that are SCHED_FIFO or SCHED_RR, sorted; QEMU
    /// must still run.
    pub fn rt_threads(&self) -> Vec<i32> {
        let task_dir = format!("/proc/{}/task", self.pid());
        let mut v: Vec<i32> = std::fs::read_dir(&task_dir)
            .unwrap_or_else(|e| panic!("{task_dir}: {e}"))
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&t| matches!(self.try_policy(t), Some(1 | 2)))
            .collect();
        v.sort();
        v
    }

    /// `Cpus_allowed_list` of a thread of this QEMU (/proc/PID/task/TID/status).
    pub fn affinity(&self, tid: i32) -> String {
        let path = format!("/proc/{}/task/{tid}/status", self.pid());
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or_else(|| panic!("{path} has no Cpus_allowed_list"))
            .trim()
            .to_owned()
    }

    /// (id, tid) of QEMU's IOThreads, from QMP `query-iothreads` (the
    /// socket serves one client at a time: this waits for a daemon's session to end).
    pub fn iothread_tids(&self) -> Vec<(String, i32)> {
        let mut qmp = QmpClient::connect(&self.qmp, Duration::from_secs(10)).unwrap();
        qmp.query_iothreads()
            .unwrap()
            .into_iter()
            .map(|io| (io.id, io.thread_id))
            .collect()
    }

    /// QMP `object-add` of one more IOThread.
    pub fn add_iothread(&self, id: &str) {
        let mut qmp = QmpClient::connect(&self.qmp, Duration::from_secs(10)).unwrap();
        qmp.execute_with(
            "object-add",
            Some(serde_json::json!({"qom-type": "iothread", "id": id})),
        )
        .unwrap();
    }

    /// Kills QEMU and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.stop();
        // QEMU leaves a named mem-path file; the VM's manager removes it.
        let _ = std::fs::remove_file(&self.shm);
        let _ = std::fs::remove_file(&self.qmp);
    }
}

/// The `[policy]` limits under which vCPU 0 spinning in the firmware
/// exceeds its budget within a fraction of a second.
/// A spinning vCPU is throttled by its own limits (continuous 20 ms, 25 ms per
/// 100 ms); the VM's burst bound is set to its whole budget over the whole
/// window, so that it does not refuse the spinner first (the default 5 ms per
/// 10 ms would, and a refusal by the VM's bound is not a throttle of the vCPU).
pub const TIGHT_BUDGET: &str =
    "max_continuous_ns = 20000000\nbudget_ns = 25000000\nthrottle_ns = 300000000\n\
     burst_window_ns = 100000000\nvm_burst_ns = 30000000\n";

/// A `[[vm]]` entry.
pub struct VmEntry {
    pub name: String,
    pub qmp: PathBuf,
    pub shm: PathBuf,
}

/// A `hostd.toml` for a test daemon: a 1 ms period, a 100 ms refresh.
pub struct HostdConfig {
    pub state_file: PathBuf,
    /// Empty: no metrics listener.
    pub metrics_addr: String,
    pub discover: bool,
    pub shm_dir: Option<PathBuf>,
    pub qmp_timeout_ms: Option<u64>,
    pub watchdog_stall_ms: Option<u64>,
    /// Lines of the `[policy]` table (none if empty).
    pub policy: &'static str,
    pub vm: Option<VmEntry>,
    /// `[daemon] ivshmem_server`: serve ivshmem-doorbell VMs at this socket.
    pub ivshmem_server: Option<PathBuf>,
    /// `[daemon] isolate_request`: the isolation request file.
    pub isolate_request: Option<PathBuf>,
    /// Lines added to the `[[vm]]` table.
    pub vm_extra: String,
}

impl HostdConfig {
    /// No metrics, no discovery, no VM, the default policy.
    pub fn new(state_file: PathBuf) -> Self {
        HostdConfig {
            state_file,
            metrics_addr: String::new(),
            discover: false,
            shm_dir: None,
            qmp_timeout_ms: None,
            watchdog_stall_ms: None,
            policy: "",
            vm: None,
            ivshmem_server: None,
            isolate_request: None,
            vm_extra: String::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "[daemon]\nperiod_us = 1000\nrefresh_ms = 100\nstate_file = \"{}\"\n\
             metrics_addr = \"{}\"\ndiscover = {}\n",
            self.state_file.display(),
            self.metrics_addr,
            self.discover
        );
        if let Some(dir) = &self.shm_dir {
            s += &format!("shm_dir = \"{}\"\n", dir.display());
        }
        if let Some(ms) = self.qmp_timeout_ms {
            s += &format!("qmp_timeout_ms = {ms}\n");
        }
        if let Some(ms) = self.watchdog_stall_ms {
            s += &format!("watchdog_stall_ms = {ms}\n");
        }
        if let Some(server) = &self.ivshmem_server {
            s += &format!("ivshmem_server = \"{}\"\n", server.display());
        }
        if let Some(path) = &self.isolate_request {
            s += &format!("isolate_request = \"{}\"\n", path.display());
        }
        if !self.policy.is_empty() {
            s += "[policy]\n";
            s += self.policy;
        }
        if let Some(vm) = &self.vm {
            s += &format!(
                "[[vm]]\nname = \"{}\"\nqmp = \"{}\"\nshm = \"{}\"\n",
                vm.name,
                vm.qmp.display(),
                vm.shm.display()
            );
            s += &self.vm_extra;
        }
        s
    }

    /// Writes the file at `path`; returns `path`.
    pub fn write(&self, path: PathBuf) -> PathBuf {
        std::fs::write(&path, self.to_toml()).unwrap();
        path
    }
}

/// `pvsched hostd --config <config>`, its stderr to `log`.
pub fn spawn_hostd(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pvsched"))
        .args(["hostd", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap()
}

/// How to start a [`Vm`]: see [`Vm::builder`].
pub struct VmBuilder {
    prefix: &'static str,
    shm_in_own_dir: bool,
    spinning: bool,
    iothreads: Vec<&'static str>,
    vcpus: usize,
}

impl VmBuilder {
    /// QEMU gets `n` vCPUs (2 unless set; [`Guest`] writes for two).
    pub fn vcpus(mut self, n: usize) -> Self {
        self.vcpus = n;
        self
    }

    /// The shared file in a directory of its own under /dev/shm, where the
    /// daemon finds the VM by discovery (else /dev/shm itself, and the VM
    /// is listed as `[[vm]]`).
    pub fn shm_in_own_dir(mut self) -> Self {
        self.shm_in_own_dir = true;
        self
    }

    /// Runs [`spin_firmware`] instead of starting paused (`-S`).
    pub fn spinning(mut self) -> Self {
        self.spinning = true;
        self
    }

    /// QEMU gets these IOThreads ([`QemuBuilder::iothreads`]).
    pub fn iothreads(mut self, ids: &[&'static str]) -> Self {
        self.iothreads = ids.to_vec();
        self
    }

    pub fn start(self) -> Vm {
        let prefix = self.prefix;
        let tag = unique_tag();
        let dir = std::env::temp_dir().join(format!("pvsched-{prefix}-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (shm_dir, shm) = if self.shm_in_own_dir {
            let d = PathBuf::from(format!("/dev/shm/pvsched-{prefix}-{tag}"));
            std::fs::create_dir_all(&d).unwrap();
            let shm = d.join("pvsched-vm");
            (Some(d), shm)
        } else {
            (
                None,
                PathBuf::from(format!("/dev/shm/pvsched-{prefix}-{tag}")),
            )
        };
        let mut qemu = Qemu::builder(&format!("{prefix}{tag}"), shm, dir.join("qmp.sock"))
            .log(dir.join("qemu.log"));
        if self.spinning {
            qemu = qemu.firmware(spin_firmware(&dir));
        }
        qemu = qemu.iothreads(&self.iothreads).vcpus(self.vcpus);
        Vm {
            name: prefix,
            qemu: qemu.spawn(),
            dir,
            shm_dir,
            daemons: Vec::new(),
        }
    }
}

/// A unique work directory, a QEMU with its shared file and QMP socket, and
/// the daemons started for it; everything killed and removed on drop (the
/// work directory is kept if the test fails).
pub struct Vm {
    pub name: &'static str,
    pub dir: PathBuf,
    shm_dir: Option<PathBuf>,
    pub qemu: Qemu,
    pub daemons: Vec<Child>,
}

impl Deref for Vm {
    type Target = Qemu;

    fn deref(&self) -> &Qemu {
        &self.qemu
    }
}

impl Vm {
    /// A VM named after `prefix`, which also names its work directory
    /// and shared file; paused (`-S`) with its file in /dev/shm unless set.
    pub fn builder(prefix: &'static str) -> VmBuilder {
        VmBuilder {
            prefix,
            shm_in_own_dir: false,
            spinning: false,
            iothreads: Vec::new(),
            vcpus: 2,
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("hostd.state")
    }

    /// The config that finds this VM: by discovery in the shared file's own
    /// directory, else as the `[[vm]]` named after the VM.
    pub fn hostd_config(&self) -> HostdConfig {
        let mut cfg = HostdConfig::new(self.state_file());
        match &self.shm_dir {
            Some(dir) => {
                cfg.discover = true;
                cfg.shm_dir = Some(dir.clone());
            }
            None => {
                cfg.vm = Some(VmEntry {
                    name: self.name.to_owned(),
                    qmp: self.qmp.clone(),
                    shm: self.shm.clone(),
                });
            }
        }
        cfg
    }

    /// Writes `cfg` as the work directory's `hostd.toml`; returns its path.
    pub fn write_config(&self, cfg: &HostdConfig) -> PathBuf {
        cfg.write(self.dir.join("hostd.toml"))
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.join(format!("hostd{n}.log"))
    }

    /// Starts daemon number `n` (returned) with `config`.
    pub fn start_daemon(&mut self, config: &Path) -> usize {
        let n = self.daemons.len();
        let child = spawn_hostd(config, &self.log_path(n));
        self.daemons.push(child);
        n
    }

    /// Daemon `n`'s log; its watchdog writes to the same stderr.
    pub fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.log_path(n)).unwrap_or_default()
    }

    pub fn daemon_pid(&self, n: usize) -> u32 {
        self.daemons[n].id()
    }

    /// SIGTERM to daemon `n`, which must exit successfully.
    pub fn stop_daemon(&mut self, n: usize) {
        signal(self.daemon_pid(n), "TERM");
        let status = self.daemons[n].wait().unwrap();
        assert!(
            status.success(),
            "hostd exited with {status}: {}",
            self.log(n)
        );
    }

    /// [`Vm::stop_daemon`]: nothing of QEMU is left RT, the state file is gone.
    pub fn stop_daemon_restoring(&mut self, n: usize) {
        self.stop_daemon(n);
        assert!(self.rt_threads().is_empty(), "left RT after SIGTERM");
        assert!(!self.state_file().exists());
    }

    /// SIGKILL to daemon `n`, reaped.
    pub fn kill_daemon(&mut self, n: usize) {
        self.daemons[n].kill().unwrap();
        self.daemons[n].wait().unwrap();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        self.qemu.stop();
        let _ = std::fs::remove_file(&self.qemu.shm);
        if let Some(d) = &self.shm_dir {
            let _ = std::fs::remove_dir_all(d);
        }
        remove_unless_panicking(&self.dir);
    }
}

/// The test's stand-in for the guest module (a guest of two vCPUs).
pub struct Guest {
    file: SharedFile,
    updates: u64,
}

impl Guest {
    pub fn open(path: &Path) -> Guest {
        Guest {
            file: SharedFile::open(path, None).unwrap(),
            updates: 0,
        }
    }

    /// Opens the file, waits for the daemon's header and attaches.
    pub fn attach_when_ready(path: &Path) -> Guest {
        let guest = Guest::open(path);
        wait_for("the daemon to initialise the header", || {
            guest.header_ready()
        });
        guest.attach();
        guest
    }

    /// The daemon initialised the header, with a slot for each vCPU.
    pub fn header_ready(&self) -> bool {
        let h = self.file.region().read_header().unwrap();
        h.host.magic == PVSCHED_MAGIC && h.host.nr_slots >= 2
    }

    /// Writes what an attached guest module writes in the header.
    pub fn attach(&self) {
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

    /// vCPU `cpu` asks for a boost (or stops asking).
    pub fn ask(&mut self, cpu: u32, boost: bool) {
        self.ask_with(cpu, boost, |_| {});
    }

    /// [`Guest::ask`], with more of the guest's state set by `edit`.
    pub fn ask_with(&mut self, cpu: u32, boost: bool, edit: impl FnOnce(&mut GuestVcpuState)) {
        self.updates += 1;
        let mut state = GuestVcpuState::requesting(cpu, boost.then_some(50), self.updates);
        edit(&mut state);
        let line = encode_guest_line(&state);
        self.file.region().write_guest_line(cpu, &line).unwrap();
    }

    /// The host line of `slot`, read until consistent.
    pub fn host(&self, slot: u32) -> PvschedHostLine {
        loop {
            if let SeqRead::Consistent(l) = self.file.region().read_host_line(slot).unwrap() {
                return l;
            }
        }
    }
}

/// The guest shell command that runs two `chrt -f 50` tasks at once (one per vCPU of a
/// two-vCPU guest, as the scheduler spreads them), each waking every 20 ms `wakes`
/// times, then printing `rt-loop-N-ok`.
pub fn two_rt_loops(wakes: u32) -> String {
    let rt_loop = |n: u32| {
        format!(
            "chrt -f 50 sh -c 'i=0; while [ $i -lt {wakes} ]; do sleep 0.02; i=$((i+1)); done' && echo rt-loop-{n}-ok"
        )
    };
    format!("{} & {}; wait", rt_loop(0), rt_loop(1))
}

/// The guest module built against the lab's guest kernel headers.
pub fn guest_module(assets: &pvsched_lab::LabAssets) -> PathBuf {
    let kmod_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/kmod");
    pvsched_lab::build_guest_module(&kmod_dir, &assets.kernel_headers).expect("build module")
}

/// `pvsched-guest`, the guest-side tool, built for the guest.
pub fn guest_tool() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    pvsched_lab::build_guest_tool(&workspace, &workspace.join("target/guest-tool"))
        .expect("build the guest tool")
}

/// A daemon serving ivshmem-doorbell VMs, started before any QEMU (QEMU will not start
/// without its ivshmem server): its files in `work`, its status on `port`.
pub struct DoorbellDaemon {
    pub work: PathBuf,
    pub server: PathBuf,
    pub port: std::net::SocketAddr,
    pub daemon: Child,
}

impl DoorbellDaemon {
    /// Starts it in a new directory under the temporary directory named from `prefix`,
    /// and waits for its server socket.
    pub fn start(prefix: &str) -> DoorbellDaemon {
        let work = std::env::temp_dir().join(format!("{prefix}-{}", unique_tag()));
        std::fs::create_dir_all(work.join("state")).unwrap();
        let server = work.join("ivshmem.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = HostdConfig {
            metrics_addr: port.to_string(),
            ivshmem_server: Some(server.clone()),
            ..HostdConfig::new(work.join("state").join("hostd.state"))
        }
        .write(work.join("hostd.toml"));
        let log = work.join("hostd.log");
        let mut daemon = spawn_hostd(&config, &log);
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let start = Instant::now();
        while !server.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no ivshmem server socket; log:\n{}",
                read_log()
            );
            assert!(
                daemon.try_wait().unwrap().is_none(),
                "the daemon exited:\n{}",
                read_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        DoorbellDaemon {
            work,
            server,
            port,
            daemon,
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.work.join("hostd.log")).unwrap_or_default()
    }
}

/// A daemon child that a failing test must not leave running (a discovering daemon left
/// behind would manage the next test's VMs too): killed on drop unless it was reaped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            signal(self.0.id(), "TERM");
            let start = Instant::now();
            while self.0.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = self.0.kill();
                    let _ = self.0.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
