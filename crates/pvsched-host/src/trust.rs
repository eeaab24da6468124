//! The trust boundary: which QEMU processes the daemon manages, and the
//! checks that the QMP socket, the threads and the shared file it acts on
//! belong to that process.
//!
//! Every local user can start a process named `qemu-system-x86_64`, serve
//! QMP on a socket and name any file on its command line. So the daemon
//! believes nothing a process says about itself: the user comes from
//! `/proc/<pid>/status`, the QMP listener from `SO_PEERCRED`, each thread
//! from `/proc/<pid>/task`, and the shared file is the inode the process
//! itself maps shared and writable, owned by the process's user (see the
//! "Trust boundary" section of the crate README for the order and the
//! remaining windows).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use crate::procfs::{HostFs, ProcError};
use crate::qmp::{
    connect_socket, query_vm_with, CpuInfo, IoThreadInfo, QmpClient, QmpError, QueryPlan, VmQuery,
};
use crate::status::TRUST_METRICS;

/// Why a VM is not managed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// The QEMU process (or its QMP listener) runs as a user that is not root,
    /// not in `allowed_users` and not the `[[vm]]` entry's `user`.
    WrongUser,
    /// The QMP socket is not served by the QEMU process (or the pid was reused).
    PeerMismatch,
    /// QMP reported a thread that is not a thread of the QEMU process.
    ForeignThread,
    /// QMP reported one thread for two vCPUs (TCG `thread=single`), or a vCPU
    /// thread that is the main thread or an IOThread.
    DuplicateThread,
    /// The shared file is a symbolic link or not a regular file.
    FileType,
    /// The shared file is not owned by the QEMU process's effective user.
    FileOwner,
    /// The QEMU process does not map the shared file shared and writable.
    FileNotMapped,
    /// The shared file holds data that is not a pvsched region and not all
    /// zero, and the VM was discovered (not named in the configuration).
    ForeignHeader,
    /// libvirt's record of a domain (its status file or its cgroups) is not
    /// root's, not well formed, or names another process or foreign threads.
    LibvirtRecord,
}

impl RefusalReason {
    /// Every reason, in metric order.
    pub const ALL: [RefusalReason; 9] = [
        RefusalReason::WrongUser,
        RefusalReason::PeerMismatch,
        RefusalReason::ForeignThread,
        RefusalReason::DuplicateThread,
        RefusalReason::FileType,
        RefusalReason::FileOwner,
        RefusalReason::FileNotMapped,
        RefusalReason::ForeignHeader,
        RefusalReason::LibvirtRecord,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::WrongUser => "wrong_user",
            RefusalReason::PeerMismatch => "peer_mismatch",
            RefusalReason::ForeignThread => "foreign_thread",
            RefusalReason::DuplicateThread => "duplicate_thread",
            RefusalReason::FileType => "file_type",
            RefusalReason::FileOwner => "file_owner",
            RefusalReason::FileNotMapped => "file_not_mapped",
            RefusalReason::ForeignHeader => "foreign_header",
            RefusalReason::LibvirtRecord => "libvirt_record",
        }
    }

    /// Index into [`RefusalReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A VM the daemon will not manage, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("refused ({}): {detail}", reason.label())]
pub struct Refusal {
    /// The reason (metric label).
    pub reason: RefusalReason,
    /// What was found, for the log line and the status.
    pub detail: String,
}

impl Refusal {
    /// A refusal for `reason`.
    pub fn new(reason: RefusalReason, detail: impl Into<String>) -> Self {
        Refusal {
            reason,
            detail: detail.into(),
        }
    }
}

/// Why the daemon wrote a fresh header over a shared file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InitReason {
    /// The bytes the region covers were all zero (a new file).
    Zeroed,
    /// A valid pvsched region of an earlier QEMU process behind the same file.
    NewInstance,
    /// A valid pvsched region with fewer slots than the VM has vCPUs.
    TooFewSlots,
    /// pvsched's magic with a header that does not validate.
    InvalidHeader,
    /// Foreign data in the file of a VM named in the configuration.
    ConfiguredForeign,
}

impl InitReason {
    /// Every reason, in metric order.
    pub const ALL: [InitReason; 5] = [
        InitReason::Zeroed,
        InitReason::NewInstance,
        InitReason::TooFewSlots,
        InitReason::InvalidHeader,
        InitReason::ConfiguredForeign,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            InitReason::Zeroed => "zeroed",
            InitReason::NewInstance => "new_instance",
            InitReason::TooFewSlots => "too_few_slots",
            InitReason::InvalidHeader => "invalid_header",
            InitReason::ConfiguredForeign => "configured_foreign",
        }
    }

    /// Index into [`InitReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Real and effective user ids of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uids {
    /// Real uid.
    pub real: u32,
    /// Effective uid.
    pub effective: u32,
}

/// Parses the `Uid:` line of `/proc/<pid>/status` (real, effective, saved, fs).
pub fn parse_status_uids(text: &str) -> Option<Uids> {
    let line = text.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut f = line.split_ascii_whitespace().map(|v| v.parse::<u32>());
    Some(Uids {
        real: f.next()?.ok()?,
        effective: f.next()?.ok()?,
    })
}

/// Who a process is: its pid, start time (against pid reuse) and users.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot.
    pub starttime: u64,
    /// Real and effective uid.
    pub uids: Uids,
}

/// Reads a process's identity. The start time is read before and after the
/// users, so the users are those of the process with that start time.
pub fn process_identity(fs: &HostFs, pid: i32) -> Result<ProcessIdentity, ProcError> {
    let before = fs.task_stat(pid, pid)?.starttime;
    let path = fs.proc_root.join(pid.to_string()).join("status");
    let text = std::fs::read_to_string(&path).map_err(|source| ProcError::Io {
        path: path.clone(),
        source,
    })?;
    let uids = parse_status_uids(&text).ok_or(ProcError::Parse {
        path: path.clone(),
        what: "no Uid: line",
    })?;
    let after = fs.task_stat(pid, pid)?.starttime;
    if before != after {
        return Err(ProcError::Io {
            path,
            source: io::Error::from_raw_os_error(libc::ESRCH),
        });
    }
    Ok(ProcessIdentity {
        pid,
        starttime: after,
        uids,
    })
}

/// The users whose QEMU processes the daemon manages: root, always, and the
/// resolved `allowed_users`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserPolicy {
    allowed: BTreeMap<u32, String>,
}

impl UserPolicy {
    /// Resolves user names with `lookup`; returns the policy and one warning
    /// per name that does not resolve (such a name allows nothing).
    pub fn new(
        names: &[String],
        lookup: &dyn Fn(&str) -> io::Result<Option<u32>>,
    ) -> (Self, Vec<String>) {
        let mut allowed = BTreeMap::new();
        let mut warnings = Vec::new();
        allowed.insert(0, "root".to_owned());
        for name in names {
            match lookup(name) {
                Ok(Some(uid)) => {
                    allowed.insert(uid, name.clone());
                }
                Ok(None) => warnings.push(format!(
                    "allowed user {name:?} does not exist; it allows nothing"
                )),
                Err(e) => warnings.push(format!(
                    "allowed user {name:?} could not be looked up ({e}); it allows nothing"
                )),
            }
        }
        (UserPolicy { allowed }, warnings)
    }

    /// [`UserPolicy::new`] against the system's user database.
    pub fn system(names: &[String]) -> (Self, Vec<String>) {
        Self::new(names, &crate::sys::uid_of_user)
    }

    /// Whether only root's processes are managed (no `allowed_users`).
    pub fn only_root(&self) -> bool {
        self.allowed.keys().all(|&uid| uid == 0)
    }

    /// Whether processes of `uid` may be managed (`extra`: a uid trusted for
    /// this VM only).
    pub fn allows(&self, uid: u32, extra: Option<u32>) -> bool {
        self.allowed.contains_key(&uid) || extra == Some(uid)
    }

    /// Checks both the real and the effective uid of a process.
    pub fn check(&self, id: &ProcessIdentity, extra: Option<u32>) -> Result<(), Refusal> {
        for (which, uid) in [("real", id.uids.real), ("effective", id.uids.effective)] {
            if !self.allows(uid, extra) {
                return Err(Refusal::new(
                    RefusalReason::WrongUser,
                    format!(
                        "process {} runs with {which} uid {uid}, which is not root, not in allowed_users ({}) and not the VM's user",
                        id.pid,
                        self.names()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn names(&self) -> String {
        self.allowed
            .iter()
            .filter(|(&uid, _)| uid != 0)
            .map(|(uid, name)| format!("{name}={uid}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Checks QMP's thread ids: no thread serves two vCPUs (or a vCPU and the
/// main thread or an IOThread), and each is a thread of process `pid`.
///
/// `Ok(Err(..))` is a thread that no longer exists anywhere (a race with
/// its exit, not a lie): the caller retries on the next refresh.
pub fn check_threads(
    fs: &HostFs,
    pid: i32,
    cpus: &[CpuInfo],
    iothreads: &[IoThreadInfo],
) -> Result<Result<(), String>, Refusal> {
    let mut owner: BTreeMap<i32, String> = BTreeMap::new();
    owner.insert(pid, "the main thread".into());
    let named = cpus
        .iter()
        .map(|c| (c.thread_id, format!("vCPU {}", c.cpu_index)))
        .chain(
            iothreads
                .iter()
                .map(|i| (i.thread_id, format!("IOThread {:?}", i.id))),
        );
    for (tid, what) in named {
        if let Some(first) = owner.get(&tid) {
            return Err(Refusal::new(
                RefusalReason::DuplicateThread,
                format!(
                    "QMP reports thread {tid} for both {first} and {what} (TCG thread=single?): a VM whose vCPUs share a thread cannot be boosted per vCPU"
                ),
            ));
        }
        owner.insert(tid, what);
    }
    for (&tid, what) in &owner {
        if tid == pid {
            continue;
        }
        match fs.task_stat(pid, tid) {
            Ok(_) => {}
            Err(e) if e.is_not_found() => match fs.tgid_of(tid) {
                Ok(other) => {
                    return Err(Refusal::new(
                        RefusalReason::ForeignThread,
                        format!(
                            "QMP reports thread {tid} for {what}, a thread of process {other}, not of QEMU process {pid}"
                        ),
                    ))
                }
                Err(_) => return Ok(Err(format!("thread {tid} ({what}) no longer exists"))),
            },
            Err(e) => return Ok(Err(format!("thread {tid} ({what}): {e}"))),
        }
    }
    Ok(Ok(()))
}

/// One line of `/proc/<pid>/maps`: the device and inode of what is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Inode (0 for anonymous memory).
    pub inode: u64,
    /// `w` in the permissions.
    pub writable: bool,
    /// `s` (shared) rather than `p` (private, copy-on-write).
    pub shared: bool,
}

/// Parses one `maps` line: `start-end perms offset major:minor inode [path]`.
pub fn parse_maps_line(line: &str) -> Option<MapEntry> {
    let mut f = line.split_ascii_whitespace();
    let _range = f.next()?;
    let perms = f.next()?.as_bytes();
    let _offset = f.next()?;
    let (major, minor) = f.next()?.split_once(':')?;
    let inode = f.next()?.parse().ok()?;
    if perms.len() < 4 {
        return None;
    }
    Some(MapEntry {
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode,
        writable: perms[1] == b'w',
        shared: perms[3] == b's',
    })
}

/// How process `pid` maps the inode `(major, minor, inode)`: `None` when it
/// does not, else whether some mapping of it is shared and writable.
pub fn maps_inode(
    fs: &HostFs,
    pid: i32,
    dev: (u32, u32),
    inode: u64,
) -> Result<Option<bool>, ProcError> {
    let path = fs.proc_root.join(pid.to_string()).join("maps");
    let text = std::fs::read_to_string(&path).map_err(|source| ProcError::Io { path, source })?;
    let mut found = None;
    for e in text.lines().filter_map(parse_maps_line) {
        if (e.dev_major, e.dev_minor) == dev && e.inode == inode {
            let usable = e.shared && e.writable;
            found = Some(found.unwrap_or(false) || usable);
        }
    }
    Ok(found)
}

/// A shared file that could not be opened for a VM.
#[derive(Debug, thiserror::Error)]
pub enum SharedFileError {
    /// The file is not one the daemon may write.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Opening or inspecting it failed (missing, QEMU gone, ...).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Opens the shared file of the QEMU process `pid` (start time `starttime`)
/// for reading and writing, never creating it, after checking that it is a
/// regular file (the last component no symbolic link), owned by the
/// process's effective uid, and mapped shared and writable by the process
/// itself (device and inode compared with `/proc/<pid>/maps`).
///
/// The path is resolved once, to an `O_PATH` descriptor that every check
/// inspects; the read-write descriptor returned is reopened from it through
/// `/proc/self/fd`, so it is the same inode, and opening a device node or a
/// FIFO named by a hostile command line never happens.
pub fn open_shared_file(
    fs: &HostFs,
    pid: i32,
    starttime: u64,
    path: &Path,
) -> Result<File, SharedFileError> {
    let io_err = |what: String| move |source: io::Error| SharedFileError::Io { what, source };
    let shown = path.display();
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                Refusal::new(
                    RefusalReason::FileType,
                    format!("{shown} is a symbolic link"),
                )
                .into()
            } else {
                SharedFileError::Io {
                    what: format!("opening {shown}"),
                    source,
                }
            }
        })?;
    let meta = handle
        .metadata()
        .map_err(io_err(format!("inspecting {shown}")))?;
    // With O_PATH, O_NOFOLLOW opens a symbolic link itself rather than failing.
    if !meta.file_type().is_file() {
        let what = if meta.file_type().is_symlink() {
            "a symbolic link"
        } else {
            "not a regular file"
        };
        return Err(Refusal::new(RefusalReason::FileType, format!("{shown} is {what}")).into());
    }
    let id = process_identity(fs, pid)
        .ok()
        .filter(|id| id.starttime == starttime)
        .ok_or_else(|| SharedFileError::Io {
            what: format!("QEMU process {pid}"),
            source: io::Error::from_raw_os_error(libc::ESRCH),
        })?;
    if meta.uid() != id.uids.effective {
        return Err(Refusal::new(
            RefusalReason::FileOwner,
            format!(
                "{shown} is owned by uid {}, QEMU process {pid} runs as uid {}",
                meta.uid(),
                id.uids.effective
            ),
        )
        .into());
    }
    check_mapped_by(fs, pid, &meta, &shown.to_string())?;
    // The magic link of our own descriptor: the real /proc, not the fixture
    // root (the descriptor is the daemon's, whatever host it watches).
    let reopen = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&reopen)
        .map_err(io_err(format!("reopening {shown} read-write")))?;
    let again = file
        .metadata()
        .map_err(io_err(format!("inspecting {shown}")))?;
    if (again.dev(), again.ino()) != (meta.dev(), meta.ino()) {
        return Err(SharedFileError::Io {
            what: format!("reopening {shown}: another inode"),
            source: io::Error::from_raw_os_error(libc::ESTALE),
        });
    }
    Ok(file)
}

/// Checks that QEMU process `pid` maps the inode of `meta` shared and
/// writable itself (device and inode compared with `/proc/<pid>/maps`).
fn check_mapped_by(
    fs: &HostFs,
    pid: i32,
    meta: &std::fs::Metadata,
    shown: &str,
) -> Result<(), SharedFileError> {
    let dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
    match maps_inode(fs, pid, dev, meta.ino()) {
        Ok(Some(true)) => Ok(()),
        Ok(found) => Err(Refusal::new(
            RefusalReason::FileNotMapped,
            format!(
                "QEMU process {pid} {} {shown} (device {:x}:{:x} inode {})",
                if found.is_some() {
                    "maps only privately or read-only"
                } else {
                    "does not map"
                },
                dev.0,
                dev.1,
                meta.ino()
            ),
        )
        .into()),
        Err(e) => Err(SharedFileError::Io {
            what: format!("reading the mappings of QEMU process {pid}: {e}"),
            source: io::Error::from_raw_os_error(libc::ESRCH),
        }),
    }
}

/// Checks a shared region the daemon made itself and handed to QEMU process
/// `pid` (start time `starttime`) over the ivshmem server (a memfd): the
/// process is still the one served, and it maps that very inode shared and
/// writable, as `/proc/<pid>/maps` shows it. Returns a descriptor of the
/// same open file to map.
pub fn check_region_fd(
    fs: &HostFs,
    pid: i32,
    starttime: u64,
    region: &File,
    shown: &str,
) -> Result<File, SharedFileError> {
    let io_err = |what: String| move |source: io::Error| SharedFileError::Io { what, source };
    let meta = region
        .metadata()
        .map_err(io_err(format!("inspecting {shown}")))?;
    if !meta.file_type().is_file() {
        return Err(Refusal::new(
            RefusalReason::FileType,
            format!("{shown} is not a regular file"),
        )
        .into());
    }
    process_identity(fs, pid)
        .ok()
        .filter(|id| id.starttime == starttime)
        .ok_or_else(|| SharedFileError::Io {
            what: format!("QEMU process {pid}"),
            source: io::Error::from_raw_os_error(libc::ESRCH),
        })?;
    check_mapped_by(fs, pid, &meta, shown)?;
    region
        .try_clone()
        .map_err(io_err(format!("duplicating {shown}")))
}

/// A VM whose QMP peer, user and threads passed the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VettedVm {
    /// The QEMU process.
    pub identity: ProcessIdentity,
    /// What QMP reported (threads checked).
    pub query: VmQuery,
}

/// Why a VM could not be vetted.
#[derive(Debug, thiserror::Error)]
pub enum VetError {
    /// The VM is refused.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// QMP failed (absent, hung, malformed).
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The process or a thread vanished mid-check; retried on the next refresh.
    #[error("{0}")]
    Vanished(String),
}

/// Connects to a VM's QMP socket and checks everything before and after
/// believing it: the process's users (before connecting, for a discovered
/// process `expected_pid`), the socket's listener (`SO_PEERCRED`: the
/// discovered process, or for a `[[vm]]` entry the process whose users are
/// then checked), the pid not reused meanwhile, and every thread reported.
pub fn vet(
    fs: &HostFs,
    users: &UserPolicy,
    extra_uid: Option<u32>,
    qmp: &Path,
    expected_pid: Option<i32>,
    timeout: Duration,
) -> Result<VettedVm, VetError> {
    vet_with(
        fs,
        users,
        extra_uid,
        qmp,
        expected_pid,
        timeout,
        &mut |_| QueryPlan::default(),
    )
}

/// [`vet`], and in the same session the queries `plan` asks for the process
/// once its identity and users are checked (it may read the process's
/// command line to decide).
pub fn vet_with(
    fs: &HostFs,
    users: &UserPolicy,
    extra_uid: Option<u32>,
    qmp: &Path,
    expected_pid: Option<i32>,
    timeout: Duration,
    plan: &mut dyn FnMut(&ProcessIdentity) -> QueryPlan,
) -> Result<VettedVm, VetError> {
    let vanished = |e: ProcError| VetError::Vanished(e.to_string());
    let before = match expected_pid {
        Some(pid) => {
            let id = process_identity(fs, pid).map_err(vanished)?;
            users.check(&id, extra_uid)?;
            Some(id)
        }
        None => None,
    };
    let stream = connect_socket(qmp)?;
    let peer = crate::sys::peer_cred(&stream).map_err(|source| QmpError::Io {
        what: "SO_PEERCRED".into(),
        source,
    })?;
    if peer.pid <= 0 {
        return Err(Refusal::new(
            RefusalReason::PeerMismatch,
            format!(
                "the listener of {} has no pid in the daemon's pid namespace",
                qmp.display()
            ),
        )
        .into());
    }
    if let Some(id) = &before {
        if peer.pid != id.pid {
            return Err(Refusal::new(
                RefusalReason::PeerMismatch,
                format!(
                    "{} is served by process {}, not by QEMU process {}",
                    qmp.display(),
                    peer.pid,
                    id.pid
                ),
            )
            .into());
        }
    }
    if !users.allows(peer.uid, extra_uid) {
        return Err(Refusal::new(
            RefusalReason::WrongUser,
            format!(
                "{} was bound by uid {}, which is not root, not in allowed_users and not the VM's user",
                qmp.display(),
                peer.uid
            ),
        )
        .into());
    }
    let id = process_identity(fs, peer.pid).map_err(vanished)?;
    if let Some(b) = &before {
        if b.starttime != id.starttime {
            return Err(Refusal::new(
                RefusalReason::PeerMismatch,
                format!(
                    "process {} was replaced (pid reused) between discovery and QMP",
                    id.pid
                ),
            )
            .into());
        }
    }
    users.check(&id, extra_uid)?;
    let query = query_vm_with(stream, timeout, &plan(&id))?;
    if let Err(why) = check_threads(fs, id.pid, &query.cpus, &query.iothreads)? {
        return Err(VetError::Vanished(why));
    }
    // The threads were the process's while it still had this start time.
    let after = process_identity(fs, id.pid).map_err(vanished)?;
    if after != id {
        return Err(VetError::Vanished(format!(
            "process {} changed while it was checked",
            id.pid
        )));
    }
    Ok(VettedVm {
        identity: id,
        query,
    })
}

/// A new QMP session with a QEMU process vetted before (`identity`, from
/// [`vet`]): the socket's listener must still be that very process (pid and
/// start time) run by a user the policy allows. For the queries made
/// between refreshes (KVM's statistics).
pub fn connect_vetted(
    fs: &HostFs,
    users: &UserPolicy,
    extra_uid: Option<u32>,
    qmp: &Path,
    identity: &ProcessIdentity,
    timeout: Duration,
) -> Result<QmpClient, VetError> {
    let stream = connect_socket(qmp)?;
    let peer = crate::sys::peer_cred(&stream).map_err(|source| QmpError::Io {
        what: "SO_PEERCRED".into(),
        source,
    })?;
    if peer.pid != identity.pid {
        return Err(Refusal::new(
            RefusalReason::PeerMismatch,
            format!(
                "{} is served by process {}, not by QEMU process {}",
                qmp.display(),
                peer.pid,
                identity.pid
            ),
        )
        .into());
    }
    let now = process_identity(fs, peer.pid).map_err(|e| VetError::Vanished(e.to_string()))?;
    if now.starttime != identity.starttime {
        return Err(VetError::Vanished(format!(
            "process {} was replaced (pid reused)",
            identity.pid
        )));
    }
    users.check(&now, extra_uid)?;
    if !users.allows(peer.uid, extra_uid) {
        return Err(Refusal::new(
            RefusalReason::WrongUser,
            format!("{} was bound by uid {}", qmp.display(), peer.uid),
        )
        .into());
    }
    Ok(QmpClient::negotiate(stream, timeout)?)
}

/// Logs each refusal once per VM and reason, and counts it in the metrics.
/// A VM refused on every refresh is logged once; a VM no longer refused
/// for that reason (fixed, or gone) is logged again if refused later.
#[derive(Debug, Default)]
pub struct RefusalLog {
    current: BTreeSet<(String, RefusalReason)>,
    this_pass: BTreeSet<(String, RefusalReason)>,
}

impl RefusalLog {
    /// Records a refusal of the VM identified by `key` (shown as `name`);
    /// returns whether it was new (logged and counted).
    pub fn refuse(&mut self, key: &str, name: &str, refusal: &Refusal) -> bool {
        let k = (key.to_owned(), refusal.reason);
        self.this_pass.insert(k.clone());
        if self.current.contains(&k) {
            return false;
        }
        self.current.insert(k);
        // A discovered name comes from a command line anyone can write.
        let name: String = name
            .chars()
            .take(64)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        eprintln!("pvsched: vm {name}: not managed: {refusal}");
        TRUST_METRICS.count_refusal(refusal.reason);
        true
    }

    /// Ends a refresh: refusals not repeated in it are forgotten.
    pub fn end_pass(&mut self) {
        self.current = std::mem::take(&mut self.this_pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture proc root with processes given as (pid, uids, threads, maps).
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn fs(&self) -> HostFs {
            HostFs::new(self.dir.path().join("proc"), self.dir.path().join("sys"))
        }

        fn stat_line(tid: i32, starttime: u64) -> String {
            // Fields 3.. of stat; 22 is the start time, 39..41 cpu, prio, policy.
            let mut f: Vec<String> = (3..=52).map(|_| "0".to_string()).collect();
            f[0] = "S".into();
            f[22 - 3] = starttime.to_string();
            format!("{tid} (qemu x) {}\n", f.join(" "))
        }

        fn process(&self, pid: i32, uid: (u32, u32), tids: &[i32], maps: &str) {
            let root = self.dir.path().join("proc");
            let pdir = root.join(pid.to_string());
            std::fs::create_dir_all(&pdir).unwrap();
            std::fs::write(
                pdir.join("status"),
                format!(
                    "Name:\tqemu\nPid:\t{pid}\nUid:\t{}\t{}\t{}\t{}\nGid:\t0\t0\t0\t0\n",
                    uid.0, uid.1, uid.1, uid.1
                ),
            )
            .unwrap();
            std::fs::write(pdir.join("maps"), maps).unwrap();
            for &t in std::iter::once(&pid).chain(tids) {
                let tdir = pdir.join("task").join(t.to_string());
                std::fs::create_dir_all(&tdir).unwrap();
                std::fs::write(tdir.join("stat"), Self::stat_line(t, 1000 + pid as u64)).unwrap();
                // /proc/<tid>/status, as the kernel serves hidden tids too.
                let alias = root.join(t.to_string());
                if t != pid {
                    std::fs::create_dir_all(&alias).unwrap();
                    std::fs::write(alias.join("status"), format!("Tgid:\t{pid}\nPid:\t{t}\n"))
                        .unwrap();
                }
            }
        }
    }

    fn cpu(index: u32, tid: i32) -> CpuInfo {
        CpuInfo {
            cpu_index: index,
            thread_id: tid,
            socket_id: None,
            core_id: None,
            smt_id: None,
        }
    }

    fn lookup(name: &str) -> io::Result<Option<u32>> {
        Ok(match name {
            "libvirt-qemu" => Some(64055),
            "alice" => Some(1000),
            "broken" => return Err(io::Error::other("NSS down")),
            _ => None,
        })
    }

    #[test]
    fn users_root_and_allowed_only_real_and_effective_both() {
        let fx = Fixture::new();
        fx.process(10, (0, 0), &[], "");
        fx.process(11, (64055, 64055), &[], "");
        fx.process(12, (1000, 1000), &[], "");
        fx.process(13, (64055, 1000), &[], ""); // effective is someone else
        fx.process(14, (1000, 0), &[], ""); // setuid-root binary run by a user
        let (users, warnings) = UserPolicy::new(
            &["libvirt-qemu".into(), "nosuch".into(), "broken".into()],
            &lookup,
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("\"nosuch\" does not exist"));
        assert!(warnings[1].contains("NSS down"));
        let fs = fx.fs();
        let check = |pid, extra| users.check(&process_identity(&fs, pid).unwrap(), extra);
        assert!(check(10, None).is_ok());
        assert!(check(11, None).is_ok());
        let r = check(12, None).unwrap_err();
        assert_eq!(r.reason, RefusalReason::WrongUser);
        assert!(r.detail.contains("real uid 1000"), "{r}");
        assert!(r.detail.contains("libvirt-qemu=64055"), "{r}");
        assert!(check(12, Some(1000)).is_ok(), "a [[vm]] user is trusted");
        assert!(check(13, None)
            .unwrap_err()
            .detail
            .contains("effective uid 1000"));
        assert!(check(14, None).is_err());
        assert!(process_identity(&fs, 99).unwrap_err().is_not_found());
    }

    #[test]
    fn status_uid_line_parses() {
        let u = parse_status_uids("Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n").unwrap();
        assert_eq!(
            u,
            Uids {
                real: 1000,
                effective: 0
            }
        );
        assert!(parse_status_uids("Name:\tx\n").is_none());
        assert!(parse_status_uids("Uid:\tx\t0\n").is_none());
    }

    #[test]
    fn threads_must_be_distinct_and_the_process_own() {
        let fx = Fixture::new();
        fx.process(100, (0, 0), &[101, 102, 103], "");
        fx.process(200, (1000, 1000), &[201], "");
        let fs = fx.fs();
        let io = |tid| IoThreadInfo {
            id: "io0".into(),
            thread_id: tid,
        };
        assert_eq!(
            check_threads(&fs, 100, &[cpu(0, 101), cpu(1, 102)], &[io(103)]),
            Ok(Ok(()))
        );
        // TCG thread=single: one thread for every vCPU.
        let r = check_threads(&fs, 100, &[cpu(0, 101), cpu(1, 101)], &[]).unwrap_err();
        assert_eq!(r.reason, RefusalReason::DuplicateThread);
        assert!(r.detail.contains("vCPU 0 and vCPU 1"), "{r}");
        // A vCPU that is the main thread, an IOThread that is a vCPU.
        for (cpus, ios) in [
            (vec![cpu(0, 100)], vec![]),
            (vec![cpu(0, 101)], vec![io(101)]),
        ] {
            let r = check_threads(&fs, 100, &cpus, &ios).unwrap_err();
            assert_eq!(r.reason, RefusalReason::DuplicateThread, "{r}");
        }
        // Another process's thread.
        let r = check_threads(&fs, 100, &[cpu(0, 101), cpu(1, 201)], &[]).unwrap_err();
        assert_eq!(r.reason, RefusalReason::ForeignThread);
        assert!(r.detail.contains("process 200"), "{r}");
        let r = check_threads(&fs, 100, &[cpu(0, 101)], &[io(201)]).unwrap_err();
        assert_eq!(r.reason, RefusalReason::ForeignThread);
        // A thread that exists nowhere: a race, not a refusal.
        assert!(matches!(
            check_threads(&fs, 100, &[cpu(0, 999)], &[]),
            Ok(Err(_))
        ));
    }

    #[test]
    fn maps_lines_parse_and_match_exactly() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 fe:01 1311        /usr/bin/qemu-system-x86_64
7f0000000000-7f0000100000 rw-s 00000000 00:1a 4242        /dev/shm/pvsched-a
7f0000200000-7f0000201000 r--s 00000000 00:1a 4343        /dev/shm/ro
7f0000300000-7f0000301000 rw-p 00000000 00:1a 4444        /dev/shm/private (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0           [stack]
";
        let e = parse_maps_line(maps.lines().nth(1).unwrap()).unwrap();
        assert_eq!(
            e,
            MapEntry {
                dev_major: 0,
                dev_minor: 0x1a,
                inode: 4242,
                writable: true,
                shared: true
            }
        );
        assert!(parse_maps_line("garbage").is_none());
        assert!(parse_maps_line("a-b rw-s 0 zz:1 5").is_none());
        let fx = Fixture::new();
        fx.process(100, (0, 0), &[], maps);
        let fs = fx.fs();
        assert_eq!(maps_inode(&fs, 100, (0, 0x1a), 4242).unwrap(), Some(true));
        assert_eq!(maps_inode(&fs, 100, (0, 0x1a), 4343).unwrap(), Some(false));
        assert_eq!(maps_inode(&fs, 100, (0, 0x1a), 4444).unwrap(), Some(false));
        // Same inode number on another device, another inode on the device.
        assert_eq!(maps_inode(&fs, 100, (0, 0x1b), 4242).unwrap(), None);
        assert_eq!(maps_inode(&fs, 100, (0, 0x1a), 424).unwrap(), None);
        assert!(maps_inode(&fs, 101, (0, 0x1a), 4242).is_err());
    }

    /// A real file and a fixture process whose maps name it (or not).
    fn file_case(
        owner_matches: bool,
        maps_perms: Option<&str>,
    ) -> (Fixture, std::path::PathBuf, Result<File, SharedFileError>) {
        let fx = Fixture::new();
        let path = fx.dir.path().join("shm");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let euid = if owner_matches {
            meta.uid()
        } else {
            meta.uid() + 1
        };
        let maps = maps_perms.map_or(String::new(), |perms| {
            format!(
                "7f0000000000-7f0000001000 {perms} 00000000 {:02x}:{:02x} {}    {}\n",
                libc::major(meta.dev()),
                libc::minor(meta.dev()),
                meta.ino(),
                path.display()
            )
        });
        fx.process(300, (euid, euid), &[], &maps);
        let r = open_shared_file(&fx.fs(), 300, 1300, &path);
        (fx, path, r)
    }

    #[test]
    fn the_shared_file_must_be_the_process_own_and_mapped_by_it() {
        let (_fx, _p, r) = file_case(true, Some("rw-s"));
        let f = r.unwrap();
        assert_eq!(f.metadata().unwrap().len(), 4096);

        let refused = |r: Result<File, SharedFileError>| match r {
            Err(SharedFileError::Refused(r)) => r,
            other => panic!("{other:?}"),
        };
        let r = refused(file_case(false, Some("rw-s")).2);
        assert_eq!(r.reason, RefusalReason::FileOwner);
        let r = refused(file_case(true, None).2);
        assert_eq!(r.reason, RefusalReason::FileNotMapped);
        assert!(r.detail.contains("does not map"), "{r}");
        for perms in ["r--s", "rw-p"] {
            let r = refused(file_case(true, Some(perms)).2);
            assert_eq!(r.reason, RefusalReason::FileNotMapped);
            assert!(r.detail.contains("privately or read-only"), "{r}");
        }
        // Wrong start time: the process is not the one discovered.
        let (fx, path, _) = file_case(true, Some("rw-s"));
        assert!(matches!(
            open_shared_file(&fx.fs(), 300, 7, &path),
            Err(SharedFileError::Io { .. })
        ));
        // A symbolic link, a directory, a socket: never opened for writing.
        let link = fx.dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let r = refused(open_shared_file(&fx.fs(), 300, 1300, &link));
        assert_eq!(r.reason, RefusalReason::FileType);
        assert!(r.detail.contains("symbolic link"));
        let r = refused(open_shared_file(&fx.fs(), 300, 1300, fx.dir.path()));
        assert_eq!(r.reason, RefusalReason::FileType);
        let sock = fx.dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let r = refused(open_shared_file(&fx.fs(), 300, 1300, &sock));
        assert_eq!(r.reason, RefusalReason::FileType);
        // Missing: an ordinary error (the VM may not have created it yet).
        assert!(matches!(
            open_shared_file(&fx.fs(), 300, 1300, &fx.dir.path().join("none")),
            Err(SharedFileError::Io { .. })
        ));
    }

    /// A QMP server on this process's thread, answering with `tids` as vCPUs.
    fn serve_qmp(dir: &Path, tids: Vec<i32>) -> std::path::PathBuf {
        use std::io::{BufRead, BufReader, Write};
        let path = dir.join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let mut w = conn.try_clone().unwrap();
                let _ = writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#);
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let ret = match req["execute"].as_str().unwrap() {
                        "query-cpus-fast" => serde_json::json!(tids
                            .iter()
                            .enumerate()
                            .map(|(i, t)| serde_json::json!({"cpu-index": i, "thread-id": t}))
                            .collect::<Vec<_>>()),
                        "query-iothreads" | "query-hotpluggable-cpus" => serde_json::json!([]),
                        _ => serde_json::json!({}),
                    };
                    let reply = serde_json::json!({"return": ret, "id": req["id"]});
                    if writeln!(w, "{reply}").is_err() {
                        break;
                    }
                }
            }
        });
        path
    }

    #[test]
    fn vetting_checks_the_listener_and_every_thread_before_believing_qmp() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let my_thread = crate::sys::gettid();
        let real = HostFs::default();
        let (users, _) = UserPolicy::new(&[], &lookup);
        let me_euid = process_identity(&real, me).unwrap().uids.effective;
        let extra = Some(me_euid);
        let t = Duration::from_secs(2);

        // A [[vm]] entry served by this process with one of its own threads.
        let good = serve_qmp(dir.path(), vec![my_thread]);
        let v = vet(&real, &users, extra, &good, None, t).unwrap();
        assert_eq!(v.identity.pid, me);
        assert_eq!(v.query.cpus[0].thread_id, my_thread);

        // Discovered as process 1 (init), but this process listens.
        let r = match vet(&real, &users, extra, &good, Some(1), t) {
            Err(VetError::Refused(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.reason, RefusalReason::PeerMismatch, "{r}");
        assert!(r.detail.contains(&format!("served by process {me}")), "{r}");

        // QMP names a thread of another process (init's).
        let sub = dir.path().join("foreign");
        std::fs::create_dir(&sub).unwrap();
        let foreign = serve_qmp(&sub, vec![my_thread, 1]);
        let r = match vet(&real, &users, extra, &foreign, None, t) {
            Err(VetError::Refused(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.reason, RefusalReason::ForeignThread, "{r}");

        // The listener's user is not trusted (unless this runs as root).
        if me_euid != 0 {
            let r = match vet(&real, &users, None, &good, None, t) {
                Err(VetError::Refused(r)) => r,
                other => panic!("{other:?}"),
            };
            assert_eq!(r.reason, RefusalReason::WrongUser, "{r}");
        }
    }

    #[test]
    fn a_refusal_is_logged_once_per_vm_and_reason_until_it_stops() {
        let mut log = RefusalLog::default();
        let before = TRUST_METRICS.snapshot();
        let user = Refusal::new(RefusalReason::WrongUser, "uid 1000");
        let dup = Refusal::new(RefusalReason::DuplicateThread, "thread 5");
        assert!(log.refuse("pid 1", "a", &user));
        assert!(!log.refuse("pid 1", "a", &user));
        assert!(log.refuse("pid 1", "a", &dup));
        assert!(log.refuse("pid 2", "b", &user));
        log.end_pass();
        assert!(!log.refuse("pid 1", "a", &user));
        log.end_pass();
        // pid 2 was not refused in the last pass: a new refusal is news.
        assert!(log.refuse("pid 2", "b", &user));
        let after = TRUST_METRICS.snapshot();
        // Other tests count too: at least ours.
        assert!(after.refusals["wrong_user"] >= before.refusals["wrong_user"] + 3);
        assert!(after.refusals["duplicate_thread"] > before.refusals["duplicate_thread"]);
    }
}
