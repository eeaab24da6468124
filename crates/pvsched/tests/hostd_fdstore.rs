//! Doorbell VMs across a daemon restart, through systemd's file-descriptor store: this
//! test plays the service manager. `pvsched hostd` serves a real QEMU's
//! `ivshmem-doorbell` (TCG, `-S`) and hands the client's socket, memfd and eventfds to
//! `$NOTIFY_SOCKET` with `FDSTORE=1`; after `kill -9` a new daemon gets them back as
//! `LISTEN_FDS` (QEMU never reconnects), attaches the VM again, hears a ring on the
//! daemon eventfd QEMU holds, and when QEMU exits removes the client from the store.
//!
//! Needs root and QEMU; prints a SKIPPED line otherwise, or fails under `CI=true`.

mod common;

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{signal, HostdConfig, QEMU};

/// A child killed when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One notification: its text and descriptors.
fn receive(socket: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut buf = [0u8; 1024];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let r = recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut buf)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )
    .ok()?;
    let mut fds = Vec::new();
    for m in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    Some((String::from_utf8_lossy(&buf[..r.bytes]).into_owned(), fds))
}

/// The service manager's side: the store, by name, and every name removed.
#[derive(Default)]
struct Store {
    fds: BTreeMap<String, OwnedFd>,
    removed: Vec<String>,
}

impl Store {
    fn drain(&mut self, socket: &UnixDatagram) {
        while let Some((text, mut fds)) = receive(socket) {
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::to_owned)
            };
            let name = field("FDNAME=").unwrap_or_default();
            if field("FDSTORE=").as_deref() == Some("1") {
                assert_eq!(fds.len(), 1, "one descriptor per stored name: {text:?}");
                self.fds.insert(name, fds.remove(0));
            } else if field("FDSTOREREMOVE=").as_deref() == Some("1") {
                self.fds.remove(&name);
                self.removed.push(name);
            }
        }
    }
}

fn wait_for(what: &str, log: &dyn Fn() -> String, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; daemon log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first VM of the daemon's status: (attached, rings received).
fn vm_view(addr: &str) -> Option<(bool, u64)> {
    let body = pvsched_host::daemon::fetch_stats(addr.parse().ok()?, "/status").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    let vm = status.get("vms")?.as_array()?.first()?.clone();
    Some((
        vm.get("attached")?.as_bool()?,
        vm.get("doorbell")?.get("rings_received")?.as_u64()?,
    ))
}

/// `pvsched hostd` started as systemd starts a service with a store: `NOTIFY_SOCKET`,
/// and the kept descriptors as 3, 4, … with `LISTEN_FDS`, `LISTEN_FDNAMES` and a
/// `LISTEN_PID` that is the daemon's own (the shell's `$$`, kept by `exec`).
fn start_daemon(config: &Path, log: &Path, notify: &Path, kept: &[(String, OwnedFd)]) -> Child {
    let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
    // Above every target number, so placing one cannot overwrite another's source.
    let sources: Vec<OwnedFd> = kept
        .iter()
        .map(|(_, fd)| {
            rustix::io::fcntl_dupfd_cloexec(fd, 1000).expect("duplicate a kept descriptor")
        })
        .collect();
    let raw: Vec<i32> = sources.iter().map(AsRawFd::as_raw_fd).collect();
    let script = if kept.is_empty() {
        r#"exec "$0" hostd --config "$1""#.to_owned()
    } else {
        format!(
            r#"LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={} exec "$0" hostd --config "$1""#,
            kept.len(),
            names.join(":")
        )
    };
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_pvsched"))
        .arg(config)
        .env("NOTIFY_SOCKET", notify)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()));
    let place = move || {
        for (i, fd) in raw.iter().enumerate() {
            // SAFETY: dup2 only changes the child's descriptor table; `fd` is open in the
            // parent until `spawn` returns (`sources` lives across it), so in the child.
            if unsafe { libc::dup2(*fd, 3 + i as i32) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec and only calls dup2,
    // which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe { command.pre_exec(place) };
    let child = command.spawn().expect("start the daemon");
    drop(sources);
    child
}

#[test]
fn a_doorbell_vm_survives_a_daemon_kill_through_the_descriptor_store() {
    common::require!();
    let tag = common::unique_tag();
    let work = std::env::temp_dir().join(format!("pvsched-fdstore-{tag}"));
    std::fs::create_dir_all(work.join("state")).unwrap();
    let notify_path = work.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let server = work.join("ivshmem.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let config = HostdConfig {
        metrics_addr: port.clone(),
        ivshmem_server: Some(server.clone()),
        ..HostdConfig::new(work.join("state").join("hostd.state"))
    }
    .write(work.join("hostd.toml"));
    let first_log = work.join("hostd-1.log");
    let mut first = KillOnDrop(start_daemon(&config, &first_log, &notify_path, &[]));
    let log1 = || std::fs::read_to_string(&first_log).unwrap_or_default();
    wait_for("the ivshmem server socket", &log1, || server.exists());

    let qmp = work.join("qmp.sock");
    let mut qemu = KillOnDrop(
        Command::new(QEMU)
            .args(["-S", "-display", "none", "-nodefaults", "-machine", "q35"])
            .args(["-accel", "tcg", "-smp", "2", "-name", "guest=fdstore"])
            .arg("-chardev")
            .arg(format!("socket,path={},id=pvsched-iv", server.display()))
            .args(["-device", "ivshmem-doorbell,chardev=pvsched-iv,vectors=2"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the first daemon to attach the VM", &log1, || {
        vm_view(&port).is_some_and(|(attached, _)| attached)
    });

    // The client's descriptors reached the store: socket, memfd, 2 + 2 eventfds.
    let mut store = Store::default();
    wait_for("six stored descriptors", &log1, || {
        store.drain(&notify);
        store.fds.len() == 6
    });
    let kinds: Vec<String> = store
        .fds
        .keys()
        .map(|n| n.rsplit('-').next().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["d0", "d1", "g0", "g1", "mem", "sock"]);

    signal(first.0.id(), "KILL");
    first.0.wait().unwrap();
    // The listener is bound again by the next daemon; a killed one leaves its socket.
    let kept: Vec<(String, OwnedFd)> = std::mem::take(&mut store.fds).into_iter().collect();
    let ring_copy = kept
        .iter()
        .find(|(n, _)| n.ends_with("-d0"))
        .map(|(_, fd)| fd.try_clone().unwrap())
        .unwrap();
    let second_log = work.join("hostd-2.log");
    let mut second = KillOnDrop(start_daemon(&config, &second_log, &notify_path, &kept));
    drop(kept);
    let log2 = || std::fs::read_to_string(&second_log).unwrap_or_default();
    wait_for("the second daemon to attach the VM again", &log2, || {
        vm_view(&port).is_some_and(|(attached, _)| attached)
    });
    assert!(
        qemu.0.try_wait().unwrap().is_none(),
        "QEMU exited across the restart"
    );
    let (_, rings_before) = vm_view(&port).unwrap();
    // A ring on the daemon's vector 0, the eventfd QEMU writes when the guest rings.
    rustix::io::write(&ring_copy, &1u64.to_ne_bytes()).unwrap();
    wait_for("the restored daemon to hear the ring", &log2, || {
        vm_view(&port).is_some_and(|(_, rings)| rings > rings_before)
    });

    // QEMU exits: the restored client's descriptors leave the store.
    qemu.0.kill().unwrap();
    qemu.0.wait().unwrap();
    wait_for("the store to be emptied of the client", &log2, || {
        store.drain(&notify);
        store.removed.len() >= 6
    });
    assert!(store.removed.iter().any(|n| n.ends_with("-sock")));
    signal(second.0.id(), "TERM");
    second.0.wait().unwrap();
    let _ = std::fs::remove_dir_all(&work);
}
