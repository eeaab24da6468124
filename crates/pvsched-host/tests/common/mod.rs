//! Helpers: real threads standing in for vCPUs, a real shared file, a guest
//! writer, and the set-up of a daemon managing them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_abi::{encode_guest_line, GuestVcpuState};
use pvsched_host::qmp::CpuInfo;
use pvsched_host::{
    Daemon, DaemonOptions, FakeClock, FakeScheduler, HostConfig, HostFs, SchedAttrs, VmSpec,
    VmUpdate,
};

pub const MS: u64 = 1_000_000;

/// Threads that stand in for vCPU threads: they sleep (or spin) until dropped.
pub struct FakeVcpus {
    pub tids: Vec<i32>,
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl FakeVcpus {
    /// `n` threads; those whose index is in `spinning` burn CPU.
    pub fn spawn(n: usize, spinning: &[usize]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let mut handles = Vec::new();
        for i in 0..n {
            let tx = tx.clone();
            let stop = Arc::clone(&stop);
            let spin = spinning.contains(&i);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("CPU {i}/FAKE"))
                    .spawn(move || {
                        tx.send((i, pvsched_host::sys::gettid())).unwrap();
                        let mut x = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            if spin {
                                for k in 0..10_000u64 {
                                    x = x.wrapping_mul(6364136223846793005).wrapping_add(k);
                                }
                                std::hint::black_box(x);
                            } else {
                                std::thread::sleep(std::time::Duration::from_millis(2));
                            }
                        }
                    })
                    .unwrap(),
            );
        }
        let mut tids = vec![0; n];
        for _ in 0..n {
            let (i, tid) = rx.recv().unwrap();
            tids[i] = tid;
        }
        FakeVcpus {
            tids,
            stop,
            handles,
        }
    }
}

impl Drop for FakeVcpus {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A unique shared file (in /dev/shm when it exists), removed on drop.
/// This process (the stand-in QEMU) keeps it mapped, as QEMU maps its
/// memory backend: the daemon manages only a file its VM maps.
pub struct ShmFile {
    pub path: PathBuf,
    pub dir: tempfile::TempDir,
    _qemu_mapping: SharedFile,
}

impl ShmFile {
    pub fn new(len: u64) -> Self {
        let dir = if Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("pvsched-test-")
                .tempdir_in("/dev/shm")
                .unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let path = dir.path().join("pvsched-vm");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        let _qemu_mapping = SharedFile::open(&path, None).unwrap();
        ShmFile {
            path,
            dir,
            _qemu_mapping,
        }
    }

    pub fn map(&self) -> SharedFile {
        SharedFile::open(&self.path, None).unwrap()
    }

    /// A new mapping with an attached guest of this version in the header.
    pub fn attached_guest(&self) -> SharedFile {
        let file = self.map();
        attach_guest(&file, PVSCHED_VERSION_MAJOR);
        file
    }
}

pub fn own_spec(name: &str, shm: &Path, tids: &[i32]) -> VmSpec {
    let pid = std::process::id() as i32;
    let fs = HostFs::default();
    VmSpec {
        name: name.into(),
        qmp: None,
        shm: shm.to_owned(),
        pid,
        pid_starttime: fs.task_stat(pid, pid).unwrap().starttime,
        cpus: tids
            .iter()
            .enumerate()
            .map(|(i, &t)| CpuInfo {
                cpu_index: i as u32,
                thread_id: t,
                socket_id: Some(0),
                core_id: Some(i as i64),
                smt_id: Some(0),
            })
            .collect(),
        possible_cpus: None,
        iothreads: vec![],
        boost_cpus: None,
        iothread_cpus: None,
        iothread_policy: None,
        discovered: false,
        guest_ram: Default::default(),
        kvm: None,
    }
}

pub fn config(state_dir: &Path) -> HostConfig {
    let mut cfg = HostConfig::default();
    cfg.daemon.state_file = state_dir.join("hostd.state");
    cfg.daemon.metrics_addr = String::new();
    cfg.daemon.discover = false;
    // `run` in a test process would filter the harness's own threads.
    cfg.daemon.seccomp = pvsched_host::seccomp::SeccompMode::Off;
    // The stand-in VM is this test process, whose main thread is the test
    // harness: most tests watch vCPU threads only (one test turns it on).
    cfg.policy.boost_interrupt_path = false;
    cfg
}

/// Writes what an attached guest module writes in the header.
pub fn attach_guest(file: &SharedFile, major: u16) {
    file.region()
        .write_header_guest(&PvschedHeaderGuest {
            guest_version_major: major,
            guest_version_minor: 0,
            guest_nr_cpus: 4,
            guest_features: PVSCHED_FEAT_KNOWN,
            guest_heartbeat: 1,
            guest_generation: 1,
            guest_state: PVSCHED_GUEST_ATTACHED,
            ..Default::default()
        })
        .unwrap();
}

/// A guest line for `cpu` asking for a boost (or not).
pub fn request_line(cpu: u32, boost: bool, updates: u64) -> PvschedGuestLine {
    encode_guest_line(&GuestVcpuState::requesting(
        cpu,
        boost.then_some(50),
        updates,
    ))
}

/// vCPU `cpu` writes its line (slot `cpu`), asking for a boost or not.
pub fn ask(file: &SharedFile, cpu: u32, boost: bool, updates: u64) {
    file.region()
        .write_guest_line(cpu, &request_line(cpu, boost, updates))
        .unwrap();
}

/// Skips (false) when not root; under CI (`CI=true` or `CI=1`) fails
/// instead, since a skip would pass without testing anything.
pub fn root_or_skip(what: &str) -> bool {
    if pvsched_host::sys::is_root() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    assert!(!ci, "{what} needs root (real sched_setattr) and CI=true");
    eprintln!("SKIPPED: {what} needs root (real sched_setattr)");
    false
}

/// A fake scheduler that knows `tids`, each with attributes `original`.
pub fn fake_scheduler(tids: &[i32], original: SchedAttrs) -> FakeScheduler {
    let fake = FakeScheduler::new();
    for &t in tids {
        fake.add_thread(t, original);
    }
    fake
}

/// A daemon on the fake scheduler and clock.
pub fn fake_daemon(cfg: HostConfig, fake: &FakeScheduler, clock: &FakeClock) -> Daemon {
    Daemon::new(
        cfg,
        Box::new(fake.clone()),
        Box::new(clock.clone()),
        DaemonOptions::default(),
    )
    .unwrap()
}

/// A daemon on the real scheduler and clock.
pub fn real_daemon(cfg: HostConfig) -> Daemon {
    Daemon::new(
        cfg,
        Box::new(pvsched_host::RealScheduler),
        Box::new(pvsched_host::MonotonicClock),
        DaemonOptions::default(),
    )
    .unwrap()
}

/// Waits until the state-file records of attached threads are on disk, so
/// the next tick applies boosts at once instead of deferring them.
pub fn durable(d: &Daemon) {
    assert!(d.wait_state_durable(std::time::Duration::from_secs(10)));
}

/// The VM `name` (this process, vCPU threads `tids`, shared file `shm`)
/// comes up, and its threads' records are on disk.
pub fn vm_up(d: &mut Daemon, name: &str, shm: &Path, tids: &[i32]) {
    d.handle(VmUpdate::Up(own_spec(name, shm, tids)));
    durable(d);
}

/// A tiny deterministic RNG (xorshift64*), so failures reproduce from the printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
