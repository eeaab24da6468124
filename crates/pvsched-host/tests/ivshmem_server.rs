//! The ivshmem server against a real QEMU (`ivshmem-doorbell`, TCG, `-S`):
//! QEMU gets past the device's realize with the server's memfd as BAR2, maps
//! it shared with the daemon, holds both sides' eventfds and listens on its
//! own; its exit is a hang-up that releases everything; a process that is
//! not a trusted QEMU gets nothing. The server thread runs under its own
//! seccomp filter (enforce), so a call outside the ivshmem role's list kills
//! this test.
//!
//! Root and QEMU are needed; without them the tests skip, under `CI=true`
//! they fail.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pvsched_abi::mmap::SharedFile;
use pvsched_host::ivshmem::{
    recv_message, region_len, Channel, IvshmemServer, ServerEvent, REFUSED,
};
use pvsched_host::seccomp::{apply, Role, SeccompMode};
use pvsched_host::trust::{RefusalReason, UserPolicy};
use pvsched_host::{HostFs, Refresher};

const QEMU: &str = "qemu-system-x86_64";

/// Descriptor counts of this process are compared: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Root (the maps of QEMU, /proc/<pid>/mem) and QEMU, or skip (fail under CI).
fn prerequisites(what: &str) -> bool {
    if !common::root_or_skip(what) {
        return false;
    }
    let ok = Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    assert!(ok || !ci, "{what} needs {QEMU} and CI=true");
    if !ok {
        eprintln!("SKIPPED: {what} needs {QEMU}");
    }
    ok
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server on its own thread, filtered like the daemon's `pvsched-ivshmem`.
struct Served {
    events: Option<mpsc::Receiver<ServerEvent>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(path: &Path, users: UserPolicy) -> Served {
        let (tx, events) = mpsc::channel();
        let mut served = Served::start_to(path, users, tx);
        served.events = Some(events);
        served
    }

    /// The server reporting to `tx` (the daemon's refresher).
    fn start_to(path: &Path, users: UserPolicy, tx: mpsc::Sender<ServerEvent>) -> Served {
        let mut server = IvshmemServer::bind(path, HostFs::default(), users).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            apply(Role::Ivshmem, SeccompMode::Enforce).unwrap();
            while !flag.load(Ordering::Relaxed) {
                for e in server.poll(Duration::from_millis(20)).unwrap() {
                    let _ = tx.send(e);
                }
            }
        });
        Served {
            events: None,
            stop,
            thread: Some(thread),
        }
    }

    fn next(&self) -> ServerEvent {
        let events = self.events.as_ref().unwrap();
        events.recv_timeout(Duration::from_secs(30)).unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn qemu_command(sock: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(QEMU);
    c.args([
        "-S",
        "-display",
        "none",
        "-nodefaults",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-chardev",
        &format!("socket,path={},id=pvsched-iv", sock.display()),
        "-device",
        "ivshmem-doorbell,chardev=pvsched-iv,vectors=2",
    ])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal QMP session.
struct Qmp {
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let mut stream = None;
        wait_for("the QMP socket", || {
            stream = UnixStream::connect(path).ok();
            stream.is_some()
        });
        let stream = stream.unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream),
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.execute("qmp_capabilities");
        q
    }

    fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn execute(&mut self, command: &str) -> serde_json::Value {
        let req = serde_json::json!({ "execute": command });
        writeln!(self.reader.get_mut(), "{req}").unwrap();
        loop {
            let msg = self.read();
            if let Some(ret) = msg.get("return") {
                return ret.clone();
            }
            assert!(msg.get("error").is_none(), "{command}: {msg}");
        }
    }
}

/// (start address, device, inode) of the memfd mapping in QEMU's maps.
fn memfd_mapping(pid: u32) -> Option<(u64, (u32, u32), u64, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let name = format!("/memfd:pvsched-{pid} (deleted)");
    maps.lines().find(|l| l.ends_with(&name)).map(|l| {
        let f: Vec<&str> = l.split_ascii_whitespace().collect();
        let start = u64::from_str_radix(f[0].split('-').next().unwrap(), 16).unwrap();
        let (ma, mi) = f[3].split_once(':').unwrap();
        let dev = (
            u32::from_str_radix(ma, 16).unwrap(),
            u32::from_str_radix(mi, 16).unwrap(),
        );
        (start, dev, f[4].parse().unwrap(), f[1].to_owned())
    })
}

/// `eventfd-id`s (or, on kernels without them, nothing) in a process's fdinfo.
fn eventfd_ids(pid: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("eventfd-id:"))
                .map(|v| v.trim().to_owned())
        })
        .collect()
}

fn fdinfo_field(fd: i32, field: &str) -> Option<String> {
    let t = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    t.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_owned())
}

/// This process's open sockets, memfds and eventfds (what the server makes;
/// the harness's pipes come and go on their own).
fn open_fds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .map(|e| {
            let link = std::fs::read_link(e.path()).unwrap_or_default();
            format!("{} -> {}", e.file_name().to_string_lossy(), link.display())
        })
        .filter(|l| l.contains("socket:") || l.contains("memfd:") || l.contains("eventfd"))
        .collect();
    v.sort();
    v
}

fn test_dir(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("pvsched-iv-{tag}-"))
        .tempdir()
        .unwrap();
    // Traversable by an unprivileged QEMU; writable by root only.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("run").join("ivshmem.sock");
    (dir, sock)
}

#[test]
fn a_real_qemu_gets_the_sealed_region_and_both_sides_eventfds_and_its_exit_releases_them() {
    if !prerequisites("ivshmem server with a real QEMU") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, sock) = test_dir("qemu");
    let (root_only, _) = UserPolicy::new(&[], &|_| Ok(None));
    let served = Served::start(&sock, root_only);
    let mode = std::fs::metadata(&sock).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "root-only policy: a root-only socket");
    let before = open_fds();

    let qmp_path = dir.path().join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let qemu = Qemu(
        qemu_command(&sock, &["-name", "guest=ivtest", "-qmp", &qmp_arg])
            .spawn()
            .unwrap(),
    );
    let pid = qemu.0.id();
    let channel: Arc<Channel> = match served.next() {
        ServerEvent::Accepted(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(channel.pid(), pid as i32);
    assert_eq!(channel.uid(), 0);
    assert_eq!(channel.doorbell().vectors(), 2);
    assert_eq!(channel.doorbell().daemon_peer(), 0);
    assert_ne!(channel.doorbell().guest_peer(), 0);

    // QEMU got past realize: QMP answers and the device is there, BAR2 the memfd.
    let mut qmp = Qmp::connect(&qmp_path);
    let pci = qmp.execute("query-pci");
    let dev = pci[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"]["vendor"] == 0x1af4 && d["id"]["device"] == 0x1110)
        .unwrap_or_else(|| panic!("no ivshmem device in {pci}"))
        .clone();
    let bar2 = dev["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["bar"] == 2)
        .unwrap_or_else(|| panic!("no BAR2 in {dev}"));
    assert_eq!(bar2["size"].as_u64(), Some(region_len()), "{bar2}");

    // QEMU maps the very memfd, shared and writable.
    let meta = channel.memfd().metadata().unwrap();
    let (start, dev_no, inode, perms) = memfd_mapping(pid).expect("QEMU does not map the memfd");
    assert_eq!(
        (dev_no, inode),
        (
            (libc::major(meta.dev()), libc::minor(meta.dev())),
            meta.ino()
        )
    );
    assert!(perms.starts_with("rw") && perms.ends_with('s'), "{perms}");
    assert_eq!(meta.len(), region_len());
    assert!(channel.memfd().set_len(4096).is_err(), "the region shrank");

    // Bytes cross both ways between the daemon's mapping and QEMU's.
    let ours = SharedFile::from_file(channel.memfd().try_clone().unwrap()).unwrap();
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    let stamp = 0x7076_7363_6865_6421u64 ^ u64::from(pid);
    ours.region()
        .store_u64(0x100, stamp, Ordering::SeqCst)
        .unwrap();
    let mut buf = [0u8; 8];
    mem.read_exact_at(&mut buf, start + 0x100).unwrap();
    assert_eq!(
        u64::from_ne_bytes(buf),
        stamp,
        "QEMU does not see the daemon's write"
    );
    mem.write_all_at(&(!stamp).to_ne_bytes(), start + 0x200)
        .unwrap();
    assert_eq!(
        ours.region().load_u64(0x200, Ordering::SeqCst).unwrap(),
        !stamp,
        "the daemon does not see QEMU's write"
    );
    drop(ours);

    // Four distinct eventfds, all held by QEMU; it listens on its own vectors.
    let bell = channel.doorbell();
    let mut raw: Vec<i32> = bell
        .daemon_fds()
        .iter()
        .chain(bell.guest_fds().iter())
        .map(|f| f.as_raw_fd())
        .collect();
    raw.sort_unstable();
    raw.dedup();
    assert_eq!(raw.len(), 4);
    let ids: Vec<Option<String>> = raw
        .iter()
        .map(|&fd| fdinfo_field(fd, "eventfd-id:"))
        .collect();
    if ids.iter().all(Option::is_some) {
        let mut unique: Vec<&String> = ids.iter().flatten().collect();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 4, "eventfds are not distinct: {ids:?}");
        let held = eventfd_ids(&pid.to_string());
        for id in ids.iter().flatten() {
            assert!(
                held.contains(id),
                "QEMU does not hold eventfd {id}: {held:?}"
            );
        }
    }
    let guest0 = bell.guest_fds()[0].as_raw_fd();
    bell.ring_guest(0).unwrap();
    bell.ring_guest(1).unwrap();
    // QEMU's main loop consumes the counter of each vector it serves.
    wait_for("QEMU to take the interrupt of vector 0", || {
        fdinfo_field(guest0, "eventfd-count:").is_some_and(|c| c.trim_start_matches('0').is_empty())
    });
    // Ringing the guest does not ring the daemon.
    assert_eq!(bell.take_rings(0).unwrap(), 0);
    assert_eq!(bell.take_rings(1).unwrap(), 0);
    assert!(bell.ring_guest(2).is_err(), "vector 2 is not served");

    // QEMU goes away: the server sees the hang-up and lets go of everything.
    drop(qmp);
    drop(mem);
    drop(qemu);
    match served.next() {
        ServerEvent::Closed { identity, peer } => {
            assert_eq!(identity.pid, pid as i32);
            assert_eq!(peer, channel.doorbell().guest_peer());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        Arc::strong_count(&channel),
        1,
        "the server still holds the channel"
    );
    drop(channel);
    assert_eq!(open_fds(), before, "descriptors left open");
    drop(served);
    assert!(!sock.exists(), "the socket outlived the server");
}

#[test]
fn a_process_that_is_not_a_trusted_qemu_gets_no_descriptor_and_leaves_nothing() {
    if !prerequisites("ivshmem server refusals") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, sock) = test_dir("refuse");
    // "daemon" (uid 1) is allowed: the socket is open to every user, who is
    // then checked by credentials.
    let (users, warnings) = UserPolicy::new(&["daemon".into()], &|_| Ok(Some(1)));
    assert!(warnings.is_empty());
    let served = Served::start(&sock, users);
    assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o666);
    let before = open_fds();

    // A plain client of a trusted user (this root test process), not QEMU.
    let client = UnixStream::connect(&sock).unwrap();
    match served.next() {
        ServerEvent::Refused { pid, refusal, .. } => {
            assert_eq!(pid, std::process::id() as i32);
            assert_eq!(refusal.reason, RefusalReason::PeerMismatch, "{refusal}");
        }
        other => panic!("{other:?}"),
    }
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // One message: not the protocol version, no descriptor; then the end.
    let (value, fd) = recv_message(&client).unwrap().unwrap();
    assert_eq!(value, REFUSED);
    assert!(fd.is_none(), "a refused client got a descriptor");
    assert!(
        recv_message(&client).unwrap().is_none(),
        "a refused client got more"
    );
    drop(client);
    assert_eq!(open_fds(), before, "a refusal left descriptors open");

    // A real QEMU run as an unprivileged user (nobody): refused by its uid,
    // and QEMU, which gets no shared memory, refuses to start.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", QEMU]);
    let qemu = qemu_command(&sock, &[]);
    cmd.args(qemu.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let qemu_pid = child.id();
    let guard = Qemu(child);
    match served.next() {
        ServerEvent::Refused { pid, uid, refusal } => {
            assert_eq!(pid, qemu_pid as i32, "{refusal}");
            assert_eq!(uid, 65534);
            assert_eq!(refusal.reason, RefusalReason::WrongUser, "{refusal}");
        }
        other => panic!("{other:?}"),
    }
    // QEMU fails the device on the refusal and exits.
    let mut qemu = guard;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = qemu.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a refused QEMU did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success(), "QEMU started without its shared memory");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut qemu.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("ivshmem"), "{stderr}");
    assert_eq!(open_fds(), before, "a refusal left descriptors open");
    assert!(served.events.as_ref().unwrap().try_recv().is_err());
}

#[test]
fn the_daemon_attaches_a_doorbell_vm_from_the_server_without_a_shared_file_and_drops_it_on_exit() {
    if !prerequisites("daemon with an ivshmem-doorbell QEMU") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, sock) = test_dir("daemon");
    let shm_dir = dir.path().join("shm");
    std::fs::create_dir(&shm_dir).unwrap();
    let mut cfg = common::config(dir.path());
    cfg.daemon.allowed_users = Vec::new();
    cfg.daemon.ivshmem_server = Some(sock.clone());
    cfg.daemon.shm_dir = shm_dir.clone();
    // Discovery of shared files off: doorbell VMs come from the server.
    cfg.daemon.discover = false;
    let (tx, rx) = mpsc::channel();
    let (root_only, _) = UserPolicy::new(&[], &|_| Ok(None));
    let served = Served::start_to(&sock, root_only, tx);
    let mut refresher = Refresher::new(cfg.clone()).with_ivshmem(rx);
    let mut daemon = common::real_daemon(cfg);
    let before = open_fds();

    let qmp_path = dir.path().join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let mut qemu = Qemu(
        qemu_command(&sock, &["-name", "guest=ivdaemon", "-qmp", &qmp_arg])
            .spawn()
            .unwrap(),
    );
    let pid = qemu.0.id();
    wait_for("the daemon to attach the doorbell VM", || {
        for u in refresher.poll() {
            daemon.handle(u);
        }
        daemon.tick();
        !daemon.attached().is_empty()
    });
    assert_eq!(daemon.attached(), vec!["ivdaemon".to_string()]);
    let status = daemon.status();
    let vm = status.vms.iter().find(|v| v.name == "ivdaemon").unwrap();
    assert_eq!(vm.pid, pid as i32);
    assert_eq!(vm.shm, format!("memfd:pvsched-{pid}"));
    assert!(vm.attached);
    assert!(!vm.vcpus.is_empty());
    // The doorbell is reachable from the VM, with the daemon's peer id.
    let runtime = daemon.vm("ivdaemon").unwrap();
    let bell = runtime.doorbell().expect("no doorbell");
    assert_eq!(runtime.doorbell_peer(), Some(0));
    assert_eq!(bell.daemon_fds().len(), 2);
    bell.ring_guest(0).unwrap();
    assert_eq!(bell.take_rings(0).unwrap(), 0);
    // No file anywhere: the header the daemon wrote is in QEMU's mapping of the memfd.
    assert_eq!(std::fs::read_dir(&shm_dir).unwrap().count(), 0);
    let (start, ..) = memfd_mapping(pid).expect("QEMU does not map the memfd");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut magic = [0u8; 8];
    mem.read_exact_at(&mut magic, start).unwrap();
    assert_eq!(u64::from_ne_bytes(magic), pvsched_abi::raw::PVSCHED_MAGIC);
    drop(mem);

    // QEMU exits: the VM is dropped and every descriptor of it closed.
    qemu.0.kill().unwrap();
    qemu.0.wait().unwrap();
    wait_for("the daemon to drop the VM", || {
        for u in refresher.poll() {
            daemon.handle(u);
        }
        daemon.tick();
        daemon.attached().is_empty()
    });
    wait_for("the refresher to hear of the hang-up", || {
        for u in refresher.poll() {
            daemon.handle(u);
        }
        open_fds() == before
    });
    drop(served);
}
