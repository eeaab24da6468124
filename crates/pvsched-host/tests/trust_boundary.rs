//! The trust boundary on the real host, as root, with discovery on: fake
//! QEMU processes of an unprivileged user (`nobody`) that do everything a
//! VM does (argv[0] `qemu-system-x86_64`, a memory-backend-file under the
//! shared-memory directory that they map, a QMP socket answering with their
//! own thread ids, a boost request in the shared file) get no RT and no
//! write; a fake of an allowed user that names a root-owned file gets
//! neither either. Controls in the same run: the same fake run by an
//! allowed user is boosted, and a real QEMU (TCG, `-S`) of that user is
//! found by discovery and its vCPU thread seen RT in /proc after a boost
//! request, while a real QEMU whose vCPUs share one thread (TCG
//! `thread=single`) is refused. Needs root, qemu-system-x86_64, python3 and useradd; with
//! `CI=true` a missing prerequisite fails the test.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_abi::{encode_guest_line, new_host_header, GuestVcpuState};
use pvsched_host::{
    Daemon, DaemonOptions, DaemonStatus, HostConfig, MonotonicClock, RealScheduler, Refresher,
};

const QEMU: &str = "qemu-system-x86_64";

fn command_works(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn prerequisites() -> Result<(), String> {
    if !pvsched_host::sys::is_root() {
        return Err("not root (needs useradd, setuid children and SCHED_RR)".into());
    }
    for (cmd, arg) in [(QEMU, "--version"), ("python3", "--version")] {
        if !command_works(cmd, arg) {
            return Err(format!("{cmd} not found"));
        }
    }
    if !Path::new("/usr/sbin/useradd").exists() && !command_works("useradd", "--help") {
        return Err("useradd not found".into());
    }
    if !Path::new("/dev/shm").is_dir() {
        return Err("no /dev/shm".into());
    }
    match pvsched_host::sys::uid_of_user("nobody") {
        Ok(Some(_)) => Ok(()),
        _ => Err("no user nobody".into()),
    }
}

macro_rules! require {
    () => {
        if let Err(why) = prerequisites() {
            if std::env::var("CI").as_deref() == Ok("true") {
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

/// A user's uid and primary gid.
#[derive(Clone, Copy, Debug)]
struct User {
    uid: u32,
    gid: u32,
}

fn id_of(name: &str, flag: &str) -> u32 {
    let out = Command::new("id").args([flag, name]).output().unwrap();
    assert!(out.status.success(), "id {flag} {name}");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn user(name: &str) -> User {
    User {
        uid: id_of(name, "-u"),
        gid: id_of(name, "-g"),
    }
}

/// A system user created for the test, deleted on drop.
struct TestUser {
    name: String,
    user: User,
}

impl TestUser {
    fn create() -> TestUser {
        let name = format!("pvsched-t{}", std::process::id());
        let status = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin", &name])
            .status()
            .unwrap();
        assert!(status.success(), "useradd {name}");
        let user = user(&name);
        TestUser { name, user }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn tids(&self) -> Vec<i32> {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Threads of this process whose policy is SCHED_FIFO or SCHED_RR now.
    fn rt_tids(&self) -> Vec<i32> {
        self.tids()
            .into_iter()
            .filter(|&t| is_rt(self.pid(), t))
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_rt(pid: i32, tid: i32) -> bool {
    pvsched_host::HostFs::default()
        .task_stat(pid, tid)
        .is_ok_and(|st| matches!(st.policy, 1 | 2))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the fake QEMU as `user`; returns it and its two "vCPU" thread ids.
fn fake_qemu(
    script: &Path,
    who: User,
    name: &str,
    mem_path: &Path,
    qmp: &Path,
    shm_mode: &str,
    log: &Path,
) -> (Proc, Vec<i32>) {
    let mut child = Command::new("python3")
        .arg0(QEMU)
        .arg(script)
        .args(["-name", name])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=pvsched,mem-path={},size=1M,share=on",
            mem_path.display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .env("FAKE_SHM", shm_mode)
        .uid(who.uid)
        .gid(who.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let proc = Proc(child);
    let tids: Vec<i32> = match line.strip_prefix("READY ") {
        Some(rest) => rest
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect(),
        None => panic!(
            "fake {name} did not start: {line:?}; log: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    };
    (proc, tids)
}

/// A real QEMU (TCG, stopped with -S: its vCPU threads exist and sleep) run
/// by `who`, with a pvsched shared file and a QMP socket. `tcg_threads`:
/// "multi" (one thread per vCPU) or "single" (one thread for all).
fn real_qemu(
    who: User,
    name: &str,
    (tcg_threads, vcpus): (&str, u32),
    mem_path: &Path,
    qmp: &Path,
    log: &Path,
) -> Proc {
    let child = Command::new(QEMU)
        .args(["-S", "-name", &format!("{name},debug-threads=on")])
        .args(["-accel", &format!("tcg,thread={tcg_threads}")])
        .args(["-smp", &vcpus.to_string(), "-m", "32"])
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=pvsched,mem-path={},size=1M,share=on",
            mem_path.display()
        ))
        .args(["-device", "ivshmem-plain,memdev=pvsched"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .uid(who.uid)
        .gid(who.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    Proc(child)
}

/// The vCPU thread of a QEMU started with debug-threads=on (`CPU 0/TCG`).
fn vcpu0_of(qemu: &Proc) -> Option<i32> {
    qemu.tids().into_iter().find(|&t| {
        std::fs::read_to_string(format!("/proc/{}/task/{t}/comm", qemu.pid()))
            .is_ok_and(|c| c.trim() == "CPU 0/TCG")
    })
}

/// What a guest module writes once attached: its header and, per vCPU, a
/// line asking for a latency boost.
fn write_guest_boost_request(file: &SharedFile, vcpus: u32) {
    let region = file.region();
    region
        .write_header_guest(&PvschedHeaderGuest {
            guest_version_major: PVSCHED_VERSION_MAJOR,
            guest_version_minor: 0,
            guest_nr_cpus: vcpus,
            guest_features: PVSCHED_FEAT_KNOWN,
            guest_heartbeat: 1,
            guest_generation: 1,
            guest_state: PVSCHED_GUEST_ATTACHED,
            ..Default::default()
        })
        .unwrap();
    for cpu in 0..vcpus {
        region
            .write_guest_line(
                cpu,
                &encode_guest_line(&GuestVcpuState::requesting(cpu, Some(50), 1)),
            )
            .unwrap();
    }
}

/// A whole region as a hostile user would prepare it: a valid host header,
/// an attached guest, boost requests on both vCPUs.
fn write_forged_region(path: &Path) {
    let file = SharedFile::open(path, None).unwrap();
    file.region()
        .write_header_host(&new_host_header(2, PVSCHED_FEAT_KNOWN, 1))
        .unwrap();
    write_guest_boost_request(&file, 2);
}

/// The daemon as `pvsched hostd` runs it: the refresher on its own thread,
/// the loop (real sched_setattr) on another, publishing status snapshots.
struct RunningDaemon {
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<DaemonStatus>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RunningDaemon {
    fn start(cfg: HostConfig) -> RunningDaemon {
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(DaemonStatus::default()));
        let (tx, rx) = mpsc::channel();
        let mut refresher = Refresher::new(cfg.clone());
        let refresh_stop = Arc::clone(&stop);
        let refresh = std::thread::spawn(move || {
            while !refresh_stop.load(Ordering::Relaxed) {
                if tx.send(refresher.poll()).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let loop_stop = Arc::clone(&stop);
        let loop_status = Arc::clone(&status);
        let main = std::thread::spawn(move || {
            let mut daemon = Daemon::new(
                cfg,
                Box::new(RealScheduler),
                Box::new(MonotonicClock),
                DaemonOptions::default(),
            )
            .unwrap();
            let mut last_snapshot = Instant::now();
            while !loop_stop.load(Ordering::Relaxed) {
                while let Ok(updates) = rx.try_recv() {
                    for u in updates {
                        daemon.handle(u);
                    }
                }
                daemon.tick();
                if last_snapshot.elapsed() > Duration::from_millis(50) {
                    *loop_status.lock().unwrap() = daemon.status();
                    last_snapshot = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            daemon.shutdown().unwrap();
            *loop_status.lock().unwrap() = daemon.status();
        });
        RunningDaemon {
            stop,
            status,
            threads: vec![refresh, main],
        }
    }

    fn status(&self) -> DaemonStatus {
        self.status.lock().unwrap().clone()
    }

    fn attached(&self) -> Vec<String> {
        self.status()
            .vms
            .iter()
            .filter(|v| v.attached)
            .map(|v| v.name.clone())
            .collect()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Removes a directory tree on drop.
struct TempTree(PathBuf);

impl TempTree {
    fn new(path: PathBuf, mode: u32) -> TempTree {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        TempTree(path)
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chown(path: &Path, who: User) {
    std::os::unix::fs::chown(path, Some(who.uid), Some(who.gid)).unwrap();
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

#[test]
fn an_unprivileged_users_fake_qemu_gets_no_rt_and_no_write_while_an_allowed_qemu_is_boosted() {
    require!();
    let tag = std::process::id();
    // A private shared-memory directory: discovery looks only under it, so
    // the daemon under test never touches another test's VMs.
    let shm = TempTree::new(
        PathBuf::from(format!("/dev/shm/pvsched-trust-{tag}")),
        0o1777,
    );
    let work = TempTree::new(
        std::env::temp_dir().join(format!("pvsched-trust-{tag}")),
        0o755,
    );
    let allowed = TestUser::create();
    let nobody = user("nobody");
    let script = work.0.join("fake_qemu.py");
    std::fs::write(&script, include_str!("fake_qemu.py")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sockets = |who: User, name: &str| {
        let d = work.0.join(name);
        std::fs::create_dir_all(&d).unwrap();
        chown(&d, who);
        d
    };

    // A root-owned file under the shared-memory directory, readable by all.
    let root_file = shm.0.join("root-owned");
    let root_bytes: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&root_file, &root_bytes).unwrap();
    std::fs::set_permissions(&root_file, std::fs::Permissions::from_mode(0o644)).unwrap();

    // The attack as measured: nobody's fake with its own file holding a forged region.
    let dir_a = sockets(nobody, "a");
    let file_a = shm.0.join("pvsched-fake-a");
    let (fake_a, tids_a) = fake_qemu(
        &script,
        nobody,
        "fake-a",
        &file_a,
        &dir_a.join("qmp.sock"),
        "create",
        &work.0.join("fake-a.log"),
    );
    write_forged_region(&file_a);
    let bytes_a = read_all(&file_a);
    // nobody's fake naming the root-owned file.
    let dir_d = sockets(nobody, "d");
    let (fake_d, _) = fake_qemu(
        &script,
        nobody,
        "fake-d",
        &root_file,
        &dir_d.join("qmp.sock"),
        "map-ro",
        &work.0.join("fake-d.log"),
    );
    // An allowed user's fake naming (and mapping) the root-owned file.
    let dir_b = sockets(allowed.user, "b");
    let (fake_b, _) = fake_qemu(
        &script,
        allowed.user,
        "fake-b",
        &root_file,
        &dir_b.join("qmp.sock"),
        "map-ro",
        &work.0.join("fake-b.log"),
    );
    // Control: the same fake as nobody's, run by the allowed user.
    let dir_c = sockets(allowed.user, "c");
    let file_c = shm.0.join("pvsched-fake-c");
    let (fake_c, tids_c) = fake_qemu(
        &script,
        allowed.user,
        "fake-c",
        &file_c,
        &dir_c.join("qmp.sock"),
        "create",
        &work.0.join("fake-c.log"),
    );
    write_forged_region(&file_c);
    // Control: a real QEMU of the allowed user.
    let dir_q = sockets(allowed.user, "qemu");
    let file_q = shm.0.join("pvsched-trust-ok");
    let qemu = real_qemu(
        allowed.user,
        "trust-ok",
        ("multi", 1),
        &file_q,
        &dir_q.join("qmp.sock"),
        &work.0.join("qemu.log"),
    );
    // A real QEMU of the allowed user whose two vCPUs share one thread.
    let dir_s = sockets(allowed.user, "single");
    let file_s = shm.0.join("pvsched-trust-single");
    let single = real_qemu(
        allowed.user,
        "trust-single",
        ("single", 2),
        &file_s,
        &dir_s.join("qmp.sock"),
        &work.0.join("qemu-single.log"),
    );
    wait_for("the real QEMU's QMP socket and vCPU thread", || {
        dir_q.join("qmp.sock").exists() && file_q.exists() && vcpu0_of(&qemu).is_some()
    });
    let vcpu_q = vcpu0_of(&qemu).unwrap();
    wait_for("the single-threaded QEMU's QMP socket", || {
        dir_s.join("qmp.sock").exists() && file_s.exists()
    });

    let state = tempfile::tempdir().unwrap();
    let mut cfg = HostConfig::default();
    cfg.daemon.discover = true;
    cfg.daemon.shm_dir = shm.0.clone();
    cfg.daemon.allowed_users = vec![allowed.name.clone()];
    cfg.daemon.state_file = state.path().join("hostd.state");
    cfg.daemon.metrics_addr = String::new();
    cfg.daemon.refresh_ms = 100;
    let mut daemon = RunningDaemon::start(cfg);

    // The real QEMU's file is all zero: the daemon initialises it; then the
    // "guest" asks for a boost.
    wait_for("the daemon to attach the real QEMU", || {
        daemon.attached().contains(&"trust-ok".to_string())
    });
    let shared_q = SharedFile::open(&file_q, None).unwrap();
    assert_eq!(
        shared_q.region().read_header().unwrap().host.magic,
        PVSCHED_MAGIC
    );
    write_guest_boost_request(&shared_q, 1);

    // Six seconds of samples, 10 ms apart, of every thread of every fake.
    let samples = 600;
    let mut rt = [0usize; 4];
    let (mut qemu_rt, mut fake_c_rt) = (0usize, 0usize);
    for _ in 0..samples {
        for (n, p) in rt.iter_mut().zip([&fake_a, &fake_b, &fake_d, &single]) {
            if !p.rt_tids().is_empty() {
                *n += 1;
            }
        }
        qemu_rt += usize::from(is_rt(qemu.pid(), vcpu_q));
        fake_c_rt += usize::from(tids_c.iter().all(|&t| is_rt(fake_c.pid(), t)));
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = daemon.status();
    eprintln!(
        "RT samples of {samples}: nobody's fake {}, allowed fake on a root file {}, nobody's fake on a root file {}, QEMU with shared vCPU thread {}; controls: real QEMU vCPU {qemu_rt}, allowed fake {fake_c_rt}",
        rt[0], rt[1], rt[2], rt[3]
    );
    eprintln!("refusals: {:?}", status.trust.refusals);

    // The controls: discovery, QMP and boosting work in this very run.
    assert!(
        qemu_rt > samples / 2,
        "real QEMU vCPU RT in {qemu_rt}/{samples}"
    );
    assert!(
        fake_c_rt > samples / 2,
        "allowed fake RT in {fake_c_rt}/{samples}"
    );
    // The hostile ones: never RT, never written.
    assert_eq!(rt, [0, 0, 0, 0], "RT samples of the refused processes");
    assert!(fake_a.tids().len() >= 3 && tids_a.iter().all(|&t| !is_rt(fake_a.pid(), t)));
    assert_eq!(
        read_all(&root_file),
        root_bytes,
        "the root-owned file changed"
    );
    assert_eq!(read_all(&file_a), bytes_a, "nobody's file was written");
    let attached = daemon.attached();
    assert!(
        read_all(&file_s).iter().all(|&b| b == 0),
        "the single-threaded QEMU's file was written"
    );
    for refused in ["fake-a", "fake-b", "fake-d", "trust-single"] {
        assert!(
            !attached.contains(&refused.to_string()),
            "{refused} attached"
        );
    }
    for (reason, at_least) in [
        ("wrong_user", 2),
        ("file_owner", 1),
        ("duplicate_thread", 1),
    ] {
        assert!(
            status.trust.refusals[reason] >= at_least,
            "{reason}: {:?}",
            status.trust
        );
    }
    let b = status.vms.iter().find(|v| v.name == "fake-b").unwrap();
    assert!(
        b.last_error.as_deref().unwrap_or("").contains("file_owner"),
        "{b:?}"
    );

    // Shut down: the boosted controls are back in the fair class.
    daemon.stop();
    assert!(!is_rt(qemu.pid(), vcpu_q));
    assert!(fake_c.rt_tids().is_empty());
    drop((fake_a, fake_b, fake_c, fake_d, qemu, single));
}
