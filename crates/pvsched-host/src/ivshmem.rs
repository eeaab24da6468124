//! The daemon as the ivshmem server of QEMU's `ivshmem-doorbell` device.
//!
//! A VM started with
//! `-chardev socket,path=<server>,id=X -device ivshmem-doorbell,chardev=X,vectors=N`
//! connects to the server socket while QEMU creates the device and blocks
//! until it has the shared memory. On each connection the server learns the
//! peer from `SO_PEERCRED`, checks it before sending a byte (a QEMU process of
//! root or an allowed user, by [`crate::trust`], whose command line names this
//! very socket for an `ivshmem-doorbell` device), then sends, as QEMU's
//! `docs/specs/ivshmem-spec.rst` describes, each message one little-endian
//! `i64` with at most one descriptor (`SCM_RIGHTS`):
//!
//! 1. the protocol version, 0;
//! 2. the client's peer id;
//! 3. -1 with the shared memory: a fresh memfd `pvsched-<pid>` whose size is
//!    a power of two (a PCI BAR must be) large enough for the ABI's largest
//!    region, sealed against shrinking and growing, so nobody can truncate it
//!    under a mapping (no `SIGBUS`);
//! 4. the daemon's peer id ([`DAEMON_PEER`]) N times, each with one eventfd
//!    of the daemon: the guest rings vector `v` of the daemon by writing
//!    `(DAEMON_PEER << 16) | v` to its Doorbell register;
//! 5. the client's own id N times, each with one eventfd: the daemon writes
//!    to eventfd `v` ([`Doorbell::ring_guest`]) to raise MSI-X vector `v` in
//!    the guest.
//!
//! VMs are never announced to each other: each sees only itself and the
//! daemon. A refused client gets one message, [`REFUSED`] in place of the
//! version (no descriptor: nothing is made for it), and its socket is
//! closed; a client that fails mid-setup gets its socket closed and
//! everything made for it is closed with it. The connection's end (QEMU
//! exited) is the end of the [`Channel`]: the server drops its references
//! and reports [`ServerEvent::Closed`].
//!
//! Under systemd each served client's descriptors (its socket, the memfd and both
//! sides' eventfds) go to the service manager's file-descriptor store
//! ([`crate::fdstore`]) and come back at the daemon's next start, where
//! [`IvshmemServer::restore`] checks them against the live QEMU process before it
//! serves that VM again: QEMU itself never reconnects.
//!
//! No `unsafe` here: the calls go through `rustix`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pvsched_abi::raw::PVSCHED_MAX_SLOTS;
use pvsched_abi::region_size_for;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags,
};

use crate::discovery::parse_qemu_cmdline;
use crate::fdstore::Notifier;
use crate::procfs::HostFs;
use crate::trust::{process_identity, ProcessIdentity, Refusal, RefusalReason, UserPolicy};

/// The protocol version QEMU expects first.
pub const PROTOCOL_VERSION: i64 = 0;
/// The message value that carries the shared memory.
pub const SHARED_MEMORY: i64 = -1;
/// The daemon's own peer id: the guest rings the daemon with
/// `(DAEMON_PEER << 16) | vector` in its Doorbell register.
pub const DAEMON_PEER: u16 = 0;
/// What a refused client gets instead of the protocol version, and then
/// nothing: QEMU (7.2) fails the device on a version other than 0 and exits,
/// whereas on a connection closed before the version it retries its read
/// for ever, spinning in the device's creation.
pub const REFUSED: i64 = -1;
/// Most vectors served per client (more on the command line stay unconnected).
pub const MAX_VECTORS: u32 = 64;
/// Most clients at once.
pub const MAX_CLIENTS: usize = 1024;
/// Deadline for sending a client its whole setup.
pub const SEND_DEADLINE: Duration = Duration::from_millis(500);

/// Size of every shared region the server hands out: the ABI's largest
/// region (header and [`PVSCHED_MAX_SLOTS`] slots) rounded up to a power of
/// two, as QEMU maps it as a PCI BAR.
pub fn region_len() -> u64 {
    region_size_for(PVSCHED_MAX_SLOTS).next_power_of_two()
}

/// One protocol message as sent on the wire.
pub fn encode(value: i64) -> [u8; 8] {
    value.to_le_bytes()
}

/// The value of one message as received.
pub fn decode(bytes: [u8; 8]) -> i64 {
    i64::from_le_bytes(bytes)
}

/// The descriptor a setup message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carries {
    /// None.
    Nothing,
    /// The shared memory.
    SharedMemory,
    /// The daemon's eventfd for this vector.
    DaemonVector(u32),
    /// The client's own eventfd for this vector.
    GuestVector(u32),
}

/// The messages a new client gets, in order: (value, what it carries).
pub fn setup_messages(client: u16, vectors: u32) -> Vec<(i64, Carries)> {
    let mut m = vec![
        (PROTOCOL_VERSION, Carries::Nothing),
        (i64::from(client), Carries::Nothing),
        (SHARED_MEMORY, Carries::SharedMemory),
    ];
    m.extend((0..vectors).map(|v| (i64::from(DAEMON_PEER), Carries::DaemonVector(v))));
    m.extend((0..vectors).map(|v| (i64::from(client), Carries::GuestVector(v))));
    m
}

/// The eventfds of one VM's doorbell: the daemon's (the guest rings them)
/// and the guest's (the daemon rings them to interrupt the guest).
#[derive(Debug)]
pub struct Doorbell {
    guest_peer: u16,
    daemon: Vec<OwnedFd>,
    guest: Vec<OwnedFd>,
}

impl Doorbell {
    /// `vectors` eventfds on each side (non-blocking, close-on-exec).
    pub fn new(guest_peer: u16, vectors: u32) -> io::Result<Self> {
        let make = || eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK);
        let daemon = (0..vectors).map(|_| make()).collect::<Result<_, _>>()?;
        let guest = (0..vectors).map(|_| make()).collect::<Result<_, _>>()?;
        Ok(Doorbell {
            guest_peer,
            daemon,
            guest,
        })
    }

    /// The daemon's peer id (what the guest writes in the high 16 bits).
    pub fn daemon_peer(&self) -> u16 {
        DAEMON_PEER
    }

    /// The guest's peer id (its IVPosition register).
    pub fn guest_peer(&self) -> u16 {
        self.guest_peer
    }

    /// Vectors on each side.
    pub fn vectors(&self) -> u32 {
        self.daemon.len() as u32
    }

    /// The daemon's eventfds, by vector: readable once the guest rang that
    /// vector of the daemon. Poll them, then [`Doorbell::take_rings`].
    pub fn daemon_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.daemon.iter().map(AsFd::as_fd).collect()
    }

    /// The guest's eventfds, by vector (what QEMU got).
    pub fn guest_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.guest.iter().map(AsFd::as_fd).collect()
    }

    /// How often the guest rang daemon vector `vector` since the last call
    /// (0: not at all). Never blocks.
    pub fn take_rings(&self, vector: u32) -> io::Result<u64> {
        let fd = self
            .daemon
            .get(vector as usize)
            .ok_or_else(|| no_vector(vector))?;
        let mut buf = [0u8; 8];
        match rustix::io::read(fd, &mut buf) {
            Ok(8) => Ok(u64::from_ne_bytes(buf)),
            Ok(_) => Err(io::Error::other("short eventfd read")),
            Err(rustix::io::Errno::AGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// A doorbell from descriptors kept across a restart (checked by the caller).
    fn from_fds(guest_peer: u16, daemon: Vec<OwnedFd>, guest: Vec<OwnedFd>) -> Self {
        Doorbell {
            guest_peer,
            daemon,
            guest,
        }
    }

    /// Raises MSI-X vector `vector` in the guest (QEMU delivers it when it
    /// sees its eventfd written). Never blocks: a counter already at its
    /// maximum is an interrupt already pending.
    pub fn ring_guest(&self, vector: u32) -> io::Result<()> {
        let fd = self
            .guest
            .get(vector as usize)
            .ok_or_else(|| no_vector(vector))?;
        match rustix::io::write(fd, &1u64.to_ne_bytes()) {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn no_vector(vector: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("vector {vector} is not served"),
    )
}

/// A QEMU process that passed the checks and got its setup: its identity,
/// its shared memory and its doorbell. Shared (`Arc`) between the server,
/// which holds it while the connection lives, and the VM attached from it;
/// the descriptors close when the last holder lets go.
#[derive(Debug)]
pub struct Channel {
    identity: ProcessIdentity,
    uid: u32,
    server: PathBuf,
    memfd: File,
    doorbell: Doorbell,
}

impl PartialEq for Channel {
    fn eq(&self, other: &Self) -> bool {
        let ino = |c: &Channel| c.memfd.metadata().map(|m| (m.dev(), m.ino())).ok();
        self.identity == other.identity
            && self.doorbell.guest_peer == other.doorbell.guest_peer
            && ino(self) == ino(other)
    }
}

impl Eq for Channel {}

impl Channel {
    /// The QEMU process.
    pub fn pid(&self) -> i32 {
        self.identity.pid
    }

    /// Its identity when it connected (start time against pid reuse).
    pub fn identity(&self) -> &ProcessIdentity {
        &self.identity
    }

    /// The uid `SO_PEERCRED` reported.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The server socket it connected to.
    pub fn server(&self) -> &Path {
        &self.server
    }

    /// The shared memory (a sealed memfd).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// A name for the shared region, as status and logs show it (the memfd's
    /// name as `/proc/<pid>/maps` shows it).
    pub fn shm_name(&self) -> String {
        format!("memfd:pvsched-{}", self.identity.pid)
    }

    /// The doorbell's eventfds.
    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }
}

/// A fresh, sealed shared region for process `pid`.
pub fn create_region(pid: i32) -> io::Result<File> {
    let fd = memfd_create(
        format!("pvsched-{pid}"),
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    ftruncate(&fd, region_len())?;
    fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(File::from(fd))
}

/// Sends a client its setup ([`setup_messages`]) before `deadline`.
pub fn send_setup(
    socket: &UnixStream,
    client: u16,
    memfd: &File,
    doorbell: &Doorbell,
    deadline: Instant,
) -> io::Result<()> {
    for (value, carries) in setup_messages(client, doorbell.vectors()) {
        let fd = match carries {
            Carries::Nothing => None,
            Carries::SharedMemory => Some(memfd.as_fd()),
            Carries::DaemonVector(v) => Some(doorbell.daemon[v as usize].as_fd()),
            Carries::GuestVector(v) => Some(doorbell.guest[v as usize].as_fd()),
        };
        send_message(socket, value, fd, deadline)?;
    }
    Ok(())
}

/// Sends one message (with its descriptor, if any) on a non-blocking
/// socket, waiting for room until `deadline`.
pub fn send_message(
    socket: &UnixStream,
    value: i64,
    fd: Option<BorrowedFd<'_>>,
    deadline: Instant,
) -> io::Result<()> {
    let bytes = encode(value);
    let mut sent = 0;
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    while sent < bytes.len() {
        let mut space = vec![MaybeUninit::uninit(); SendAncillaryMessage::ScmRights(&fds).size()];
        let mut control = SendAncillaryBuffer::new(&mut space);
        // The descriptor travels with the first byte only.
        if sent == 0 && !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("ancillary buffer too small"));
        }
        let iov = [IoSlice::new(&bytes[sent..])];
        match sendmsg(socket, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => wait_writable(socket, deadline)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn wait_writable(socket: &UnixStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client does not read its setup",
        ));
    }
    let mut fds = [PollFd::new(socket, PollFlags::OUT)];
    let ts = timespec(left);
    match poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn timespec(d: Duration) -> rustix::event::Timespec {
    rustix::event::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    }
}

/// Receives one message as QEMU does (the client side: tests and tools).
/// `Ok(None)`: the server closed the connection before a whole message.
pub fn recv_message(socket: &UnixStream) -> io::Result<Option<(i64, Option<OwnedFd>)>> {
    let mut bytes = [0u8; 8];
    let mut got = 0;
    let mut fd = None;
    while got < bytes.len() {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut bytes[got..])];
        let msg = match recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                for f in fds {
                    if fd.is_some() {
                        return Err(io::Error::other("two descriptors with one message"));
                    }
                    fd = Some(f);
                }
            }
        }
        if msg.bytes == 0 {
            return Ok(None);
        }
        got += msg.bytes;
    }
    Ok(Some((decode(bytes), fd)))
}

/// A connecting process that may be served: who it is and how many vectors
/// its device has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The process as `/proc` shows it.
    pub identity: ProcessIdentity,
    /// The uid `SO_PEERCRED` reported.
    pub uid: u32,
    /// Vectors to serve (the device's `vectors=`, at most [`MAX_VECTORS`]).
    pub vectors: u32,
}

/// Checks a connecting process before anything is sent to it: a pid in the
/// daemon's namespace, a socket uid and process users allowed by `users`,
/// a QEMU command line with an `ivshmem-doorbell` device on a chardev
/// socket at `server`, and the same process (start time) throughout.
pub fn check_peer(
    fs: &HostFs,
    users: &UserPolicy,
    server: &Path,
    pid: i32,
    uid: u32,
) -> Result<Peer, Refusal> {
    let mismatch = |detail: String| Refusal::new(RefusalReason::PeerMismatch, detail);
    if pid <= 0 {
        return Err(mismatch(format!(
            "a client of {} has no pid in the daemon's pid namespace",
            server.display()
        )));
    }
    if !users.allows(uid, None) {
        return Err(Refusal::new(
            RefusalReason::WrongUser,
            format!(
                "process {pid} connected to {} as uid {uid}, which is not root and not in allowed_users",
                server.display()
            ),
        ));
    }
    let vanished = |e| mismatch(format!("process {pid} vanished while it was checked ({e})"));
    let id = process_identity(fs, pid).map_err(vanished)?;
    users.check(&id, None)?;
    let cmdline = fs.cmdline(pid).map_err(vanished)?;
    let args = parse_qemu_cmdline(&cmdline)
        .ok_or_else(|| mismatch(format!("process {pid} is not a QEMU process")))?;
    let device = args
        .doorbells
        .iter()
        .find(|d| same_path(&d.socket, server))
        .ok_or_else(|| {
            mismatch(format!(
                "QEMU process {pid} has no ivshmem-doorbell device on a chardev socket at {}",
                server.display()
            ))
        })?;
    let vectors = device.vectors.min(MAX_VECTORS);
    let after = process_identity(fs, pid).map_err(vanished)?;
    if after != id {
        return Err(mismatch(format!(
            "process {pid} changed while it was checked"
        )));
    }
    Ok(Peer {
        identity: id,
        uid,
        vectors,
    })
}

/// Whether two socket paths are the same, lexically (`.` and `..` resolved).
pub(crate) fn same_path(a: &Path, b: &Path) -> bool {
    crate::discovery::lexical_normal(a) == crate::discovery::lexical_normal(b)
}

/// What happened on the server.
#[derive(Debug)]
pub enum ServerEvent {
    /// A QEMU process got its setup.
    Accepted(Arc<Channel>),
    /// A client was refused: nothing was sent, its socket is closed.
    Refused {
        /// `SO_PEERCRED` pid (0 when unknown).
        pid: i32,
        /// `SO_PEERCRED` uid.
        uid: u32,
        /// Why.
        refusal: Refusal,
    },
    /// A trusted client could not be served (descriptors, a client that
    /// does not read); everything made for it is closed.
    Failed {
        /// `SO_PEERCRED` pid.
        pid: i32,
        /// What failed.
        error: String,
        /// Part of the setup was sent already.
        sent: bool,
    },
    /// A served client's connection ended (QEMU exited): the server let go
    /// of its channel.
    Closed {
        /// The QEMU process.
        identity: ProcessIdentity,
        /// Its peer id.
        peer: u16,
    },
}

impl ServerEvent {
    /// The log line for this event.
    pub fn log_line(&self, server: &Path) -> String {
        let s = server.display();
        match self {
            ServerEvent::Accepted(c) => format!(
                "ivshmem server {s}: QEMU process {} (uid {}) is peer {}, {} vector(s), {} bytes shared",
                c.pid(),
                c.uid(),
                c.doorbell().guest_peer(),
                c.doorbell().vectors(),
                region_len()
            ),
            ServerEvent::Refused { pid, uid, refusal } => {
                format!("ivshmem server {s}: refused process {pid} (uid {uid}): {refusal}")
            }
            ServerEvent::Failed { pid, error, .. } => {
                format!("ivshmem server {s}: process {pid} not served: {error}")
            }
            ServerEvent::Closed { identity, peer } => format!(
                "ivshmem server {s}: QEMU process {} (peer {peer}) disconnected",
                identity.pid
            ),
        }
    }
}

struct Conn {
    socket: UnixStream,
    channel: Arc<Channel>,
}

/// The prefix of every stored descriptor's name.
const STORE_PREFIX: &str = "ivs";

/// The name under which one descriptor of a client is stored:
/// `ivs-<peer>-<pid>-<starttime>-<what>`, `what` one of `sock`, `mem`, `d<vector>` (the
/// daemon's eventfd) and `g<vector>` (the guest's).
fn store_name(peer: u16, identity: &ProcessIdentity, what: &str) -> String {
    format!(
        "{STORE_PREFIX}-{peer}-{}-{}-{what}",
        identity.pid, identity.starttime
    )
}

/// Every descriptor of a served client with its store name.
fn stored_fds<'a>(socket: &'a UnixStream, channel: &'a Channel) -> Vec<(String, BorrowedFd<'a>)> {
    let (peer, id) = (channel.doorbell.guest_peer, &channel.identity);
    let mut out = vec![
        (store_name(peer, id, "sock"), socket.as_fd()),
        (store_name(peer, id, "mem"), channel.memfd.as_fd()),
    ];
    for (v, fd) in channel.doorbell.daemon.iter().enumerate() {
        out.push((store_name(peer, id, &format!("d{v}")), fd.as_fd()));
    }
    for (v, fd) in channel.doorbell.guest.iter().enumerate() {
        out.push((store_name(peer, id, &format!("g{v}")), fd.as_fd()));
    }
    out
}

/// The descriptors of one client as they came back from the store.
#[derive(Default)]
struct StoredClient {
    socket: Option<OwnedFd>,
    memfd: Option<OwnedFd>,
    daemon: std::collections::BTreeMap<u32, OwnedFd>,
    guest: std::collections::BTreeMap<u32, OwnedFd>,
    names: Vec<String>,
}

/// Parses a store name into (peer, pid, starttime, what).
fn parse_store_name(name: &str) -> Option<(u16, i32, u64, &str)> {
    let mut parts = name.splitn(5, '-');
    if parts.next()? != STORE_PREFIX {
        return None;
    }
    let peer = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    let starttime = parts.next()?.parse().ok()?;
    Some((peer, pid, starttime, parts.next()?))
}

/// Whether `fd` is an eventfd (what `/proc/self/fd` says it is).
fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// The ivshmem server: a listening socket and its served clients.
pub struct IvshmemServer {
    path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file bound, to remove only ours.
    bound: (u64, u64),
    fs: HostFs,
    users: UserPolicy,
    conns: Vec<Conn>,
    store: Option<Notifier>,
}

impl std::fmt::Debug for IvshmemServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IvshmemServer")
            .field("path", &self.path)
            .field("clients", &self.conns.len())
            .finish()
    }
}

/// The mode of the server socket: only root may connect when only root's
/// QEMU processes are managed; otherwise any local user may connect (the
/// allowed users' QEMU must) and is checked by its credentials before
/// anything is sent.
pub fn socket_mode(users: &UserPolicy) -> u32 {
    if users.only_root() {
        0o600
    } else {
        0o666
    }
}

impl IvshmemServer {
    /// Binds the server socket at `path`. A missing parent directory is
    /// created (mode 0755, the daemon's user); an existing one must be the
    /// daemon's user's and not writable by group or others. Something at
    /// `path` is replaced only if it is a socket of the daemon's user (a
    /// stale one); anything else is an error.
    pub fn bind(path: &Path, fs: HostFs, users: UserPolicy) -> io::Result<Self> {
        let euid = rustix::process::geteuid().as_raw();
        let err = |kind, what: String| io::Error::new(kind, what);
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| {
                err(
                    io::ErrorKind::InvalidInput,
                    format!("{} has no parent directory", path.display()),
                )
            })?;
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
        }
        let meta = std::fs::symlink_metadata(parent)?;
        if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
            return Err(err(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} must be a directory of uid {euid} that group and others cannot write (uid {}, mode {:o})",
                    parent.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ),
            ));
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() && m.uid() == euid => std::fs::remove_file(path)?,
            Ok(m) => {
                return Err(err(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket of uid {euid} (uid {}): not replaced",
                        path.display(),
                        m.uid()
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode(&users)))?;
        let m = std::fs::symlink_metadata(path)?;
        Ok(IvshmemServer {
            path: path.to_owned(),
            listener,
            bound: (m.dev(), m.ino()),
            fs,
            users,
            conns: Vec::new(),
            store: None,
        })
    }

    /// Keeps every served client's descriptors in the service manager's store (and
    /// drops them from it when the client goes).
    pub fn with_store(mut self, store: Option<Notifier>) -> Self {
        self.store = store;
        self
    }

    fn store(&self, socket: &UnixStream, channel: &Channel) {
        let Some(store) = &self.store else { return };
        for (name, fd) in stored_fds(socket, channel) {
            if let Err(e) = store.store(&name, fd) {
                eprintln!(
                    "pvsched: ivshmem server {}: cannot keep {name} in the service manager's descriptor store ({e}): QEMU process {} will not be served after a restart",
                    self.path.display(),
                    channel.pid()
                );
                return;
            }
        }
    }

    fn unstore(&self, names: impl IntoIterator<Item = String>) {
        let Some(store) = &self.store else { return };
        for name in names {
            // A name that is not stored is not an error for systemd either.
            let _ = store.remove(&name);
        }
    }

    /// Serves again the clients whose descriptors the service manager kept across a
    /// restart. Each group (one client: its socket, memfd and eventfds) is checked as
    /// a new connection is, against the live process: the socket's `SO_PEERCRED` is
    /// the process its name says, which is the same process (start time) and still
    /// passes [`check_peer`] with as many vectors as were kept; the memfd has the
    /// server's size and seals; every eventfd is one. A group that fails is closed and
    /// removed from the store, with one event saying why; names that are not the
    /// server's are removed too.
    pub fn restore(&mut self, inherited: Vec<(String, OwnedFd)>) -> Vec<ServerEvent> {
        let mut groups: std::collections::BTreeMap<(u16, i32, u64), StoredClient> =
            Default::default();
        let mut stray = Vec::new();
        for (name, fd) in inherited {
            let Some((peer, pid, starttime, what)) = parse_store_name(&name) else {
                stray.push(name);
                continue;
            };
            let g = groups.entry((peer, pid, starttime)).or_default();
            g.names.push(name.clone());
            let vector = |prefix: char| what.strip_prefix(prefix).and_then(|v| v.parse().ok());
            match what {
                "sock" => g.socket = Some(fd),
                "mem" => g.memfd = Some(fd),
                _ if what.starts_with('d') && vector('d').is_some() => {
                    g.daemon.insert(vector('d').unwrap_or_default(), fd);
                }
                _ if what.starts_with('g') && vector('g').is_some() => {
                    g.guest.insert(vector('g').unwrap_or_default(), fd);
                }
                _ => {}
            }
        }
        let mut events = Vec::new();
        if !stray.is_empty() {
            events.push(ServerEvent::Failed {
                pid: 0,
                error: format!(
                    "kept descriptors not of this server dropped: {}",
                    stray.join(", ")
                ),
                sent: true,
            });
            self.unstore(stray);
        }
        for ((peer, pid, starttime), g) in groups {
            let names = g.names.clone();
            match self.adopt(peer, pid, starttime, g) {
                Ok(event) => events.push(event),
                Err(error) => {
                    events.push(ServerEvent::Failed {
                        pid,
                        error: format!("not served again after the restart: {error}"),
                        sent: true,
                    });
                    self.unstore(names);
                }
            }
        }
        events
    }

    fn adopt(
        &mut self,
        peer_id: u16,
        pid: i32,
        starttime: u64,
        g: StoredClient,
    ) -> Result<ServerEvent, String> {
        let socket = UnixStream::from(g.socket.ok_or("its socket was not kept")?);
        let memfd = File::from(g.memfd.ok_or("its shared memory was not kept")?);
        let cred = rustix::net::sockopt::socket_peercred(&socket)
            .map_err(|e| format!("SO_PEERCRED on its socket: {e}"))?;
        let (cred_pid, uid) = (cred.pid.as_raw_nonzero().get(), cred.uid.as_raw());
        if cred_pid != pid {
            return Err(format!(
                "its socket's peer is process {cred_pid}, not {pid}"
            ));
        }
        let peer =
            check_peer(&self.fs, &self.users, &self.path, pid, uid).map_err(|r| r.to_string())?;
        if peer.identity.starttime != starttime {
            return Err(format!("process {pid} is not the one that was served"));
        }
        let n = peer.vectors;
        let contiguous = |m: &std::collections::BTreeMap<u32, OwnedFd>| {
            m.len() == n as usize && m.keys().copied().eq(0..n)
        };
        if !contiguous(&g.daemon) || !contiguous(&g.guest) {
            return Err(format!(
                "{} daemon and {} guest eventfds kept for {n} vector(s)",
                g.daemon.len(),
                g.guest.len()
            ));
        }
        if !g
            .daemon
            .values()
            .chain(g.guest.values())
            .all(|fd| is_eventfd(fd.as_fd()))
        {
            return Err("a kept vector descriptor is not an eventfd".into());
        }
        let len = memfd.metadata().map_err(|e| e.to_string())?.len();
        let seals = rustix::fs::fcntl_get_seals(&memfd).map_err(|e| e.to_string())?;
        if len != region_len() || !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(format!(
                "its shared memory is {len} bytes with seals {seals:?}, not a sealed region of {} bytes",
                region_len()
            ));
        }
        if peer_id == DAEMON_PEER
            || self
                .conns
                .iter()
                .any(|c| c.channel.doorbell.guest_peer == peer_id || c.channel.identity.pid == pid)
        {
            return Err(format!("peer {peer_id} or process {pid} is served already"));
        }
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        let doorbell = Doorbell::from_fds(
            peer_id,
            g.daemon.into_values().collect(),
            g.guest.into_values().collect(),
        );
        let channel = Arc::new(Channel {
            identity: peer.identity,
            uid,
            server: self.path.clone(),
            memfd,
            doorbell,
        });
        self.conns.push(Conn {
            socket,
            channel: Arc::clone(&channel),
        });
        Ok(ServerEvent::Accepted(channel))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The channels of the clients connected now.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.conns.iter().map(|c| Arc::clone(&c.channel)).collect()
    }

    /// Waits up to `timeout` for connections and hang-ups and handles them.
    pub fn poll(&mut self, timeout: Duration) -> io::Result<Vec<ServerEvent>> {
        let ready: Vec<PollFlags> = {
            let mut fds = Vec::with_capacity(self.conns.len() + 1);
            fds.push(PollFd::new(&self.listener, PollFlags::IN));
            for c in &self.conns {
                fds.push(PollFd::new(&c.socket, PollFlags::IN | PollFlags::RDHUP));
            }
            match poll(&mut fds, Some(&timespec(timeout))) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            }
            fds.iter().map(PollFd::revents).collect()
        };
        let mut events = Vec::new();
        // Hang-ups first (highest index first, so indices stay valid).
        for i in (0..self.conns.len()).rev() {
            let r = ready[i + 1];
            if r.is_empty() || !self.hung_up(i, r) {
                continue;
            }
            let conn = self.conns.swap_remove(i);
            self.unstore(
                stored_fds(&conn.socket, &conn.channel)
                    .into_iter()
                    .map(|(name, _)| name),
            );
            events.push(ServerEvent::Closed {
                identity: conn.channel.identity,
                peer: conn.channel.doorbell.guest_peer,
            });
        }
        if !ready[0].is_empty() {
            loop {
                match rustix::net::accept_with(
                    &self.listener,
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                ) {
                    Ok(fd) => events.push(self.serve(UnixStream::from(fd))),
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(events)
    }

    /// Whether connection `i` ended. QEMU never writes to the server;
    /// whatever a client writes is read and dropped.
    fn hung_up(&self, i: usize, r: PollFlags) -> bool {
        if r.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::RDHUP | PollFlags::NVAL) {
            return true;
        }
        let mut buf = [0u8; 64];
        match rustix::io::read(&self.conns[i].socket, &mut buf) {
            Ok(0) => true,
            Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => false,
            Err(_) => true,
        }
    }

    /// Checks and serves one accepted client. On any refusal or error the
    /// socket and everything made for it are dropped (closed) here; a client
    /// that got nothing yet gets [`REFUSED`] first, so QEMU exits.
    fn serve(&mut self, socket: UnixStream) -> ServerEvent {
        let event = self.check_and_send(&socket);
        if let ServerEvent::Refused { .. } | ServerEvent::Failed { sent: false, .. } = &event {
            let _ = send_message(
                &socket,
                REFUSED,
                None,
                Instant::now() + Duration::from_millis(50),
            );
        }
        if let ServerEvent::Accepted(channel) = &event {
            self.store(&socket, channel);
            self.conns.push(Conn {
                socket,
                channel: Arc::clone(channel),
            });
        }
        event
    }

    fn check_and_send(&mut self, socket: &UnixStream) -> ServerEvent {
        let cred = match rustix::net::sockopt::socket_peercred(socket) {
            Ok(c) => c,
            Err(e) => {
                return ServerEvent::Failed {
                    pid: 0,
                    error: format!("SO_PEERCRED: {e}"),
                    sent: false,
                }
            }
        };
        let (pid, uid) = (cred.pid.as_raw_nonzero().get(), cred.uid.as_raw());
        let refused = |refusal| ServerEvent::Refused { pid, uid, refusal };
        let peer = match check_peer(&self.fs, &self.users, &self.path, pid, uid) {
            Ok(p) => p,
            Err(r) => return refused(r),
        };
        if self.conns.iter().any(|c| c.channel.identity.pid == pid) {
            return refused(Refusal::new(
                RefusalReason::PeerMismatch,
                format!(
                    "QEMU process {pid} is already connected to {} (one ivshmem-doorbell device per VM)",
                    self.path.display()
                ),
            ));
        }
        if self.conns.len() >= MAX_CLIENTS {
            return ServerEvent::Failed {
                pid,
                error: format!("{MAX_CLIENTS} clients already connected"),
                sent: false,
            };
        }
        let used: BTreeSet<u16> = self
            .conns
            .iter()
            .map(|c| c.channel.doorbell.guest_peer)
            .collect();
        let Some(id) = (DAEMON_PEER + 1..=u16::MAX).find(|i| !used.contains(i)) else {
            return ServerEvent::Failed {
                pid,
                error: "no free peer id".into(),
                sent: false,
            };
        };
        let (memfd, doorbell) =
            match create_region(pid).and_then(|m| Ok((m, Doorbell::new(id, peer.vectors)?))) {
                Ok(made) => made,
                Err(e) => {
                    return ServerEvent::Failed {
                        pid,
                        error: format!("making its region and eventfds: {e}"),
                        sent: false,
                    }
                }
            };
        if let Err(e) = send_setup(
            socket,
            id,
            &memfd,
            &doorbell,
            Instant::now() + SEND_DEADLINE,
        ) {
            return ServerEvent::Failed {
                pid,
                error: format!("sending the setup: {e}"),
                sent: true,
            };
        }
        ServerEvent::Accepted(Arc::new(Channel {
            identity: peer.identity,
            uid,
            server: self.path.clone(),
            memfd,
            doorbell,
        }))
    }
}

impl Drop for IvshmemServer {
    fn drop(&mut self) {
        // Remove the socket only if the path still names the one bound here.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.bound {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv_all(client: &UnixStream) -> Vec<(i64, Option<OwnedFd>)> {
        let mut out = Vec::new();
        while let Some(m) = recv_message(client).unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn messages_are_little_endian_i64() {
        assert_eq!(encode(-1), [0xff; 8]);
        assert_eq!(encode(0x0102), [2, 1, 0, 0, 0, 0, 0, 0]);
        for v in [0, 1, -1, 65535, i64::MIN, i64::MAX] {
            assert_eq!(decode(encode(v)), v);
        }
    }

    #[test]
    fn the_setup_is_version_id_memory_daemon_vectors_then_own_vectors() {
        assert_eq!(
            setup_messages(7, 2),
            vec![
                (0, Carries::Nothing),
                (7, Carries::Nothing),
                (-1, Carries::SharedMemory),
                (0, Carries::DaemonVector(0)),
                (0, Carries::DaemonVector(1)),
                (7, Carries::GuestVector(0)),
                (7, Carries::GuestVector(1)),
            ]
        );
        assert_eq!(setup_messages(1, 0).len(), 3);
    }

    #[test]
    fn the_region_is_a_power_of_two_large_enough_for_every_slot() {
        let len = region_len();
        assert!(len.is_power_of_two());
        assert!(len >= region_size_for(PVSCHED_MAX_SLOTS));
        assert!(len / 2 < region_size_for(PVSCHED_MAX_SLOTS));
    }

    #[test]
    fn a_client_receives_the_setup_with_working_descriptors() {
        let (server, client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let memfd = create_region(1234).unwrap();
        let bell = Doorbell::new(3, 2).unwrap();
        send_setup(&server, 3, &memfd, &bell, Instant::now() + SEND_DEADLINE).unwrap();
        drop(server);
        let got = recv_all(&client);
        let values: Vec<i64> = got.iter().map(|(v, _)| *v).collect();
        assert_eq!(values, vec![0, 3, -1, 0, 0, 3, 3]);
        let has_fd: Vec<bool> = got.iter().map(|(_, f)| f.is_some()).collect();
        assert_eq!(has_fd, vec![false, false, true, true, true, true, true]);

        // The memory is the memfd: same inode, its size, sealed.
        let shm = File::from(got[2].1.as_ref().unwrap().try_clone().unwrap());
        let (a, b) = (shm.metadata().unwrap(), memfd.metadata().unwrap());
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
        assert_eq!(a.len(), region_len());
        assert!(shm.set_len(4096).is_err(), "a sealed region shrank");
        assert!(
            shm.set_len(region_len() * 2).is_err(),
            "a sealed region grew"
        );
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&shm)
        ))
        .unwrap();
        assert_eq!(link.to_str().unwrap(), "/memfd:pvsched-1234 (deleted)");

        // The client's "interrupt the daemon" descriptors ring the daemon's side.
        assert_eq!(bell.take_rings(1).unwrap(), 0);
        rustix::io::write(got[4].1.as_ref().unwrap(), &1u64.to_ne_bytes()).unwrap();
        rustix::io::write(got[4].1.as_ref().unwrap(), &1u64.to_ne_bytes()).unwrap();
        assert_eq!(bell.take_rings(1).unwrap(), 2);
        assert_eq!(bell.take_rings(0).unwrap(), 0);
        // The daemon rings the guest's vector 1: the client's own fd 1 counts it.
        bell.ring_guest(1).unwrap();
        let mut buf = [0u8; 8];
        rustix::io::read(got[6].1.as_ref().unwrap(), &mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1);
        assert!(bell.ring_guest(2).is_err());
        assert!(bell.take_rings(2).is_err());
        assert_eq!(bell.daemon_peer(), DAEMON_PEER);
        assert_eq!(bell.guest_peer(), 3);
    }

    #[test]
    fn a_client_that_does_not_read_fails_by_the_deadline() {
        let (server, _client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        let mut err = None;
        // Fill the socket buffer: the client never reads.
        for _ in 0..1_000_000 {
            if let Err(e) = send_message(&server, 1, None, deadline) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err.unwrap().kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_connection_from_a_process_that_is_not_qemu_is_refused_and_gets_no_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/ivshmem.sock");
        let (users, _) = UserPolicy::new(&[], &|_| Ok(None));
        let me = rustix::process::geteuid().as_raw();
        // This test process's user is trusted; it is still not QEMU.
        let users = if me == 0 {
            users
        } else {
            let (u, _) = UserPolicy::new(&["me".into()], &|_| Ok(Some(me)));
            u
        };
        let mut server = IvshmemServer::bind(&path, HostFs::default(), users).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert!(mode == 0o600 || mode == 0o666, "{mode:o}");
        let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777;
        assert_eq!(dir_mode & 0o022, 0);
        let client = UnixStream::connect(&path).unwrap();
        let mut events = Vec::new();
        for _ in 0..100 {
            events.extend(server.poll(Duration::from_millis(20)).unwrap());
            if !events.is_empty() {
                break;
            }
        }
        match events.as_slice() {
            [ServerEvent::Refused { pid, refusal, .. }] => {
                assert_eq!(*pid, std::process::id() as i32);
                assert_eq!(refusal.reason, RefusalReason::PeerMismatch, "{refusal}");
                assert!(refusal.detail.contains("not a QEMU process"), "{refusal}");
            }
            other => panic!("{other:?}"),
        }
        assert!(server.channels().is_empty());
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (value, fd) = recv_message(&client).unwrap().unwrap();
        assert_eq!((value, fd.is_none()), (REFUSED, true));
        assert!(recv_message(&client).unwrap().is_none(), "more was sent");
        let line = events[0].log_line(&path);
        assert!(line.contains("refused process"), "{line}");
        // The socket goes with the server; a stale one is replaced.
        drop(server);
        assert!(!path.exists());
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let server = IvshmemServer::bind(&path, HostFs::default(), UserPolicy::default()).unwrap();
        drop(server);
        // Something else at the path is never replaced.
        std::fs::write(&path, b"x").unwrap();
        let e = IvshmemServer::bind(&path, HostFs::default(), UserPolicy::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(path.exists());
    }

    #[test]
    fn socket_paths_compare_lexically() {
        assert!(same_path(
            Path::new("/run/p/s.sock"),
            Path::new("/run/p/s.sock")
        ));
        assert!(same_path(
            Path::new("/run/./p/s.sock"),
            Path::new("/run/p/x/../s.sock")
        ));
        assert!(!same_path(
            Path::new("/run/p/s.sock"),
            Path::new("/run/q/s.sock")
        ));
        assert!(!same_path(
            Path::new("/run/p/s.sock"),
            Path::new("/run/p/t.sock")
        ));
    }

    #[test]
    fn kept_descriptors_that_are_not_a_served_qemu_are_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/ivshmem.sock");
        let (users, _) = UserPolicy::new(&[], &|_| Ok(None));
        let mut server = IvshmemServer::bind(&path, HostFs::default(), users).unwrap();
        let (mine, _theirs) = UnixStream::pair().unwrap();
        let pid = std::process::id();
        let memfd = create_region(pid as i32).unwrap();
        let bell = Doorbell::new(1, 1).unwrap();
        let name = |what: &str| format!("ivs-1-{pid}-1-{what}");
        let kept: Vec<(String, OwnedFd)> = vec![
            (name("sock"), OwnedFd::from(mine)),
            (name("mem"), OwnedFd::from(memfd)),
            (name("d0"), bell.daemon[0].try_clone().unwrap()),
            (name("g0"), bell.guest[0].try_clone().unwrap()),
            ("not-ours".into(), bell.guest[0].try_clone().unwrap()),
        ];
        let events = server.restore(kept);
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(
            matches!(&events[0], ServerEvent::Failed { error, .. } if error.contains("not-ours")),
            "{events:?}"
        );
        // This test process is its own socket's peer, and it is not QEMU.
        assert!(
            matches!(&events[1], ServerEvent::Failed { pid: p, error, .. }
                if *p == pid as i32 && error.contains("not a QEMU process")),
            "{events:?}"
        );
        assert!(server.channels().is_empty());
        assert_eq!(
            parse_store_name(&name("d0")),
            Some((1, pid as i32, 1, "d0"))
        );
        assert_eq!(parse_store_name("ivs-x-1-1-sock"), None);
    }
}
