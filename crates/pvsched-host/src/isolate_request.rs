//! The daemon's request for isolation, and the sync that makes the host
//! match it.
//!
//! The daemon's unit keeps control groups, `/proc/irq` and the workqueue
//! mask read-only, so the daemon never isolates. While a VM marked
//! `realtime = true` is attached it keeps a small request file (the VM, its
//! QEMU process, the CPUs of its `isolate_cpus`) under `/run/pvsched`,
//! written atomically by a thread of its own, and removes it when the VM
//! goes. [`sync`], run as `pvsched isolate --sync` or `--follow` by a
//! separately confined unit, reads the request and applies or undoes
//! isolation ([`crate::isolate`]) until the state file matches it.
//!
//! The request is input like any other: a symlink, a file of another owner
//! or writable by others, an oversized or malformed file, a VM that is not
//! the configuration's real-time VM or CPUs other than its `isolate_cpus`
//! are each one error, and nothing changes.

use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::HostConfig;
use crate::isolate::{self, Applied, Host, IsolateError, StateFile, UndoReport, VmThreads};
use crate::procfs::HostFs;

/// Where the daemon keeps its isolation request, by default.
pub const DEFAULT_REQUEST_FILE: &str = "/run/pvsched/isolate.json";
/// Version of the request format.
pub const REQUEST_VERSION: u32 = 1;
/// Largest request file read (a real one is about 150 bytes).
const MAX_REQUEST_BYTES: u64 = 4096;

/// Isolation the daemon wants: `cpus` for the vCPUs of `vm`, whose QEMU
/// process is (`pid`, `pid_starttime`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsolationRequest {
    /// Format version ([`REQUEST_VERSION`]).
    pub version: u32,
    /// The `[[vm]]` name.
    pub vm: String,
    /// The QEMU process.
    pub pid: i32,
    /// Its start time (clock ticks since boot): tells a reused pid apart.
    pub pid_starttime: u64,
    /// The CPUs to isolate, the VM's `isolate_cpus` (a kernel CPU list).
    pub cpus: String,
    /// `SCHED_FIFO` priority of the vCPU threads (1..=99).
    pub rt_priority: u8,
}

impl IsolationRequest {
    /// The request for VM `vm` of `cfg` with QEMU process (`pid`,
    /// `pid_starttime`), if it is the configuration's real-time VM.
    pub fn for_vm(cfg: &HostConfig, vm: &str, pid: i32, pid_starttime: u64) -> Option<Self> {
        let entry = cfg.vm.iter().find(|v| v.name == vm && v.realtime)?;
        Some(IsolationRequest {
            version: REQUEST_VERSION,
            vm: vm.to_owned(),
            pid,
            pid_starttime,
            cpus: entry.isolate_cpus.clone()?,
            rt_priority: isolate::DEFAULT_RT_PRIORITY,
        })
    }

    /// Checks every field; returns the CPUs to isolate.
    pub fn validate(&self) -> Result<Vec<u32>, String> {
        if self.version != REQUEST_VERSION {
            return Err(format!(
                "format version {} (this build reads {REQUEST_VERSION})",
                self.version
            ));
        }
        if self.vm.is_empty()
            || self.vm.len() > 64
            || self
                .vm
                .chars()
                .any(|c| c.is_control() || c == '"' || c == '\\')
        {
            return Err(format!(
                "vm {:?} is not a VM name (1..=64 characters, no quotes, backslashes or control characters)",
                self.vm
            ));
        }
        if self.pid < 2 {
            return Err(format!("pid {} is not a QEMU process", self.pid));
        }
        if !(1..=99).contains(&self.rt_priority) {
            return Err(format!(
                "rt_priority {} is outside 1..=99",
                self.rt_priority
            ));
        }
        isolate::parse_cpus(&self.cpus).map_err(|e| format!("cpus: {e}"))
    }
}

fn request_err(path: &Path, detail: impl Into<String>) -> IsolateError {
    IsolateError::Request {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

/// Reads and checks the request file: `None` when there is none. Refused: a
/// symlink, anything but a regular file, a file not owned by `owner_uid`
/// (root for the real file) or writable by others, more than 4 KiB, unknown
/// keys, bad values.
pub fn read_request(path: &Path, owner_uid: u32) -> Result<Option<IsolationRequest>, IsolateError> {
    let bad = |detail: String| request_err(path, detail);
    // O_NONBLOCK: a FIFO put in its place must not hang the sync.
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(bad("is a symlink: refused".into()))
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    let meta = f.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file: refused".into()));
    }
    if meta.uid() != owner_uid {
        return Err(bad(format!(
            "owned by uid {}, not {owner_uid}: refused",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "mode {:o} lets others write it: refused",
            meta.mode() & 0o777
        )));
    }
    let mut text = Vec::new();
    f.take(MAX_REQUEST_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_REQUEST_BYTES {
        return Err(bad(format!(
            "larger than {MAX_REQUEST_BYTES} bytes: refused"
        )));
    }
    let request: IsolationRequest =
        serde_json::from_slice(&text).map_err(|e| bad(format!("malformed: {e}")))?;
    request.validate().map_err(bad)?;
    Ok(Some(request))
}

/// Writes the request file atomically (a 0600 temporary file beside it,
/// fsync, rename), so a reader sees the old request or the new one.
pub fn write_request(path: &Path, request: &IsolationRequest) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let json = serde_json::to_vec_pretty(request).expect("request serialises");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Removes the request file (none there is fine).
pub fn remove_request(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What a sync does to make the host match the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncAction {
    /// The host matches already.
    Nothing,
    /// Isolate for the request (none is applied).
    Apply,
    /// Undo the isolation in place (no request, or its VM is gone).
    Undo,
    /// Undo the isolation in place, then isolate for the request (it was
    /// applied by hand, for another VM or process, other CPUs, or did not
    /// finish).
    Replace,
}

/// The sync's decision from the live request (`None`: no request, or its
/// QEMU process is gone) and the state file (`None`: nothing applied).
pub fn decide(wanted: Option<&IsolationRequest>, applied: Option<&StateFile>) -> SyncAction {
    match (wanted, applied) {
        (None, None) => SyncAction::Nothing,
        (None, Some(_)) => SyncAction::Undo,
        (Some(_), None) => SyncAction::Apply,
        (Some(w), Some(s)) if s.complete && s.request.as_ref() == Some(w) => SyncAction::Nothing,
        (Some(_), Some(_)) => SyncAction::Replace,
    }
}

/// Whether the request's QEMU process still runs (same pid, same start).
pub fn process_alive(fs: &HostFs, request: &IsolationRequest) -> bool {
    fs.task_stat(request.pid, request.pid)
        .is_ok_and(|s| s.starttime == request.pid_starttime)
}

/// What [`sync`] found and did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// The request read, if any (also when its VM is gone).
    pub request: Option<IsolationRequest>,
    /// Why a request was set aside (its QEMU process is gone).
    pub stale: Option<String>,
    /// The decision.
    pub action: Option<SyncAction>,
    /// The undo made (`Undo`, `Replace`).
    pub undone: Option<UndoReport>,
    /// The isolation applied (`Apply`, `Replace`).
    pub applied: Option<Applied>,
}

/// Where a sync reads and writes.
#[derive(Clone, Debug)]
pub struct SyncPaths {
    /// The daemon's request file.
    pub request: PathBuf,
    /// Who must own it (root for the daemon's).
    pub request_owner: u32,
    /// The isolation state file.
    pub state: PathBuf,
}

/// Checks a live request against the configuration (the real-time VM, its
/// `isolate_cpus`) and finds its VM with `find_vm`, which must report the
/// request's QEMU process. Returns the CPUs and the VM's threads.
fn check_request(
    cfg: &HostConfig,
    path: &Path,
    request: &IsolationRequest,
    find_vm: &dyn Fn(&IsolationRequest) -> Result<VmThreads, IsolateError>,
) -> Result<(Vec<u32>, VmThreads), IsolateError> {
    let cpus = request.validate().map_err(|e| request_err(path, e))?;
    let entry = cfg
        .vm
        .iter()
        .find(|v| v.name == request.vm && v.realtime)
        .ok_or_else(|| {
            request_err(
                path,
                format!(
                    "vm {} is not a [[vm]] with realtime = true in the configuration: refused",
                    request.vm
                ),
            )
        })?;
    let configured = entry
        .isolate_cpus
        .as_deref()
        .map(isolate::parse_cpus)
        .transpose()?;
    if configured.as_ref() != Some(&cpus) {
        return Err(request_err(
            path,
            format!(
                "cpus {} differ from vm {}'s isolate_cpus {}: refused",
                request.cpus,
                request.vm,
                entry.isolate_cpus.as_deref().unwrap_or("(unset)")
            ),
        ));
    }
    let vm = find_vm(request)?;
    if vm.pid != request.pid {
        return Err(request_err(
            path,
            format!(
                "vm {} runs as pid {}, the request names pid {}: refused",
                request.vm, vm.pid, request.pid
            ),
        ));
    }
    Ok((cpus, vm))
}

/// Makes the host match the daemon's request: applies isolation for it,
/// undoes an isolation no request (or a gone VM's) stands behind, replaces
/// one applied for something else, and changes nothing when the state file
/// records this very request. A request that fails its checks is an error
/// before anything changes. `find_vm` finds the request's VM (QMP and the
/// daemon's trust checks: [`find_config_vm`]).
pub fn sync(
    host: &Host<'_>,
    cfg: &HostConfig,
    paths: &SyncPaths,
    find_vm: &dyn Fn(&IsolationRequest) -> Result<VmThreads, IsolateError>,
) -> Result<SyncReport, IsolateError> {
    let mut report = SyncReport {
        request: read_request(&paths.request, paths.request_owner)?,
        ..SyncReport::default()
    };
    let wanted = match &report.request {
        Some(r) if process_alive(host.fs, r) => Some(r),
        Some(r) => {
            report.stale = Some(format!(
                "QEMU process {} of vm {} (start time {}) is gone",
                r.pid, r.vm, r.pid_starttime
            ));
            None
        }
        None => None,
    };
    let state = match paths.state.symlink_metadata() {
        Ok(_) => Some(isolate::read_state(&paths.state)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(IsolateError::State {
                path: paths.state.clone(),
                detail: e.to_string(),
            })
        }
    };
    let action = decide(wanted, state.as_ref());
    report.action = Some(action);
    // Checked before anything is undone: a bad request changes nothing.
    let target = match (action, wanted) {
        (SyncAction::Apply | SyncAction::Replace, Some(w)) => {
            Some((w, check_request(cfg, &paths.request, w, find_vm)?))
        }
        _ => None,
    };
    if matches!(action, SyncAction::Undo | SyncAction::Replace) {
        report.undone = Some(isolate::undo(host, &paths.state)?);
    }
    if let Some((request, (isolated, vm))) = target {
        let plan = isolate::plan(
            host,
            &isolate::Request {
                isolated,
                vm: Some(vm),
                rt_priority: request.rt_priority,
            },
        )?;
        report.applied = Some(isolate::apply_for(
            host,
            &plan,
            &paths.state,
            Some(request),
        )?);
    }
    Ok(report)
}

/// Finds a request's VM as `pvsched isolate --vm` does: its `[[vm]]` QMP
/// socket, through the daemon's trust checks.
pub fn find_config_vm(
    fs: &HostFs,
    cfg: &HostConfig,
    request: &IsolationRequest,
    timeout: Duration,
) -> Result<VmThreads, IsolateError> {
    isolate::find_vm(
        fs,
        cfg,
        &isolate::VmSelector::Name(request.vm.clone()),
        timeout,
    )
}

/// Waits for changes of the request file: inotify on its directory (a
/// rename over it, a removal, a write), and at most `timeout` in any case,
/// so that a request whose QEMU process died is noticed without a change.
/// Without inotify (or the directory), it is a plain wait of `timeout`.
pub struct RequestWatch {
    inotify: Option<std::os::fd::OwnedFd>,
}

impl RequestWatch {
    /// Watches the directory of `path`; a failure leaves a timed wait.
    pub fn new(path: &Path) -> Self {
        use rustix::fs::inotify;
        let dir = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(d) => d,
            None => Path::new("."),
        };
        let inotify = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .and_then(|fd| {
                inotify::add_watch(
                    &fd,
                    dir,
                    inotify::WatchFlags::CLOSE_WRITE
                        | inotify::WatchFlags::MOVED_TO
                        | inotify::WatchFlags::MOVED_FROM
                        | inotify::WatchFlags::DELETE
                        | inotify::WatchFlags::CREATE
                        | inotify::WatchFlags::ONLYDIR,
                )?;
                Ok(fd)
            })
            .map_err(|e| {
                eprintln!(
                    "pvsched: {} not watched ({e}): checking every {} s",
                    dir.display(),
                    FOLLOW_INTERVAL.as_secs()
                )
            })
            .ok();
        RequestWatch { inotify }
    }

    /// Whether changes are watched (else only timed).
    pub fn watching(&self) -> bool {
        self.inotify.is_some()
    }

    /// Returns after a change in the directory or `timeout`.
    pub fn wait(&self, timeout: Duration) {
        let Some(fd) = &self.inotify else {
            std::thread::sleep(timeout);
            return;
        };
        let ts = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        if rustix::event::poll(&mut fds, Some(&ts)).is_err() {
            std::thread::sleep(timeout);
        }
        // Drain: one sync covers every event so far.
        let mut buf = [0u8; 4096];
        while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
    }
}

/// Longest time between two syncs of `pvsched isolate --follow`.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolate::tests::Fixture;

    fn euid() -> u32 {
        rustix::process::geteuid().as_raw()
    }

    fn request() -> IsolationRequest {
        IsolationRequest {
            version: REQUEST_VERSION,
            vm: "rt1".into(),
            pid: 100,
            pid_starttime: 1100,
            cpus: "2-3".into(),
            rt_priority: 50,
        }
    }

    fn rt_config() -> HostConfig {
        let cfg: HostConfig = toml::from_str(
            "[[vm]]\nname = \"rt1\"\nqmp = \"/q\"\nshm = \"/s\"\nrealtime = true\nisolate_cpus = \"2-3\"",
        )
        .unwrap();
        cfg.validate().unwrap();
        cfg
    }

    fn write_raw(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }

    #[test]
    fn a_written_request_reads_back_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/isolate.json");
        assert_eq!(read_request(&path, euid()).unwrap(), None);
        write_request(&path, &request()).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(read_request(&path, euid()).unwrap(), Some(request()));
        remove_request(&path).unwrap();
        remove_request(&path).unwrap();
        assert_eq!(read_request(&path, euid()).unwrap(), None);
    }

    #[test]
    fn hostile_request_files_are_refused_with_one_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("isolate.json");
        let good = serde_json::to_value(request()).unwrap();
        let with = |key: &str, value: serde_json::Value| {
            let mut v = good.clone();
            v[key] = value;
            v.to_string()
        };
        let cases = [
            ("not json".to_string(), "malformed"),
            ("{}".to_string(), "malformed"),
            (with("extra", 1.into()), "malformed"),
            (with("version", 2.into()), "format version 2"),
            (with("vm", "".into()), "not a VM name"),
            (with("vm", "a\nb".into()), "not a VM name"),
            (with("vm", "x".repeat(65).into()), "not a VM name"),
            (with("pid", 1.into()), "not a QEMU process"),
            (with("pid", (-5).into()), "not a QEMU process"),
            (with("pid", 1u64.wrapping_shl(40).into()), "malformed"),
            (with("rt_priority", 0.into()), "outside 1..=99"),
            (with("rt_priority", 100.into()), "outside 1..=99"),
            (with("rt_priority", 300.into()), "malformed"),
            (with("cpus", "".into()), "cpus"),
            (with("cpus", "3-1".into()), "cpus"),
            (with("cpus", "99999".into()), "cpus"),
            (format!("{} {}", good, " ".repeat(5000)), "larger than 4096"),
        ];
        for (text, expected) in cases {
            write_raw(&path, &text);
            let err = read_request(&path, euid()).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:.80}: {err}");
            assert!(err.starts_with("isolation request"), "{err}");
        }
    }

    #[test]
    fn a_symlink_a_foreign_owner_a_writable_file_or_a_fifo_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.json");
        write_request(&real, &request()).unwrap();
        let link = dir.path().join("isolate.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = read_request(&link, euid()).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        // The real file, expected to belong to another user.
        let err = read_request(&real, euid() + 1).unwrap_err().to_string();
        assert!(err.contains(&format!("owned by uid {}", euid())), "{err}");
        std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o622))
            .unwrap();
        let err = read_request(&real, euid()).unwrap_err().to_string();
        assert!(err.contains("lets others write"), "{err}");
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let err = read_request(&fifo, euid()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let sub = dir.path().join("dir");
        std::fs::create_dir(&sub).unwrap();
        let err = read_request(&sub, euid()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    fn state(request: Option<IsolationRequest>, complete: bool) -> StateFile {
        StateFile {
            version: isolate::STATE_VERSION,
            complete,
            hierarchy: isolate::Hierarchy::V1("/sys/fs/cgroup/cpuset".into()),
            isolated: vec![2, 3],
            housekeeping: vec![0, 1],
            changes: Vec::new(),
            unmovable: Vec::new(),
            request,
        }
    }

    #[test]
    fn the_decision_applies_undoes_replaces_or_does_nothing() {
        let want = request();
        let other_pid = IsolationRequest {
            pid: 200,
            pid_starttime: 9,
            ..want.clone()
        };
        let other_cpus = IsolationRequest {
            cpus: "3".into(),
            ..want.clone()
        };
        use SyncAction::*;
        assert_eq!(decide(None, None), Nothing);
        assert_eq!(decide(Some(&want), None), Apply);
        assert_eq!(decide(None, Some(&state(Some(want.clone()), true))), Undo);
        assert_eq!(decide(None, Some(&state(None, true))), Undo);
        assert_eq!(
            decide(Some(&want), Some(&state(Some(want.clone()), true))),
            Nothing
        );
        for applied in [
            state(Some(other_pid), true),
            state(Some(other_cpus), true),
            state(None, true),
            state(Some(want.clone()), false),
        ] {
            assert_eq!(decide(Some(&want), Some(&applied)), Replace, "{applied:?}");
        }
    }

    /// The fixture's VM (pid 100, vCPUs 101 and 102, start time 1100).
    fn fixture_vm(_: &IsolationRequest) -> Result<VmThreads, IsolateError> {
        Ok(VmThreads {
            name: "rt1".into(),
            pid: 100,
            vcpus: vec![101, 102],
            iothreads: vec![103],
        })
    }

    /// The fixture host's files (but the run directory, where the request
    /// and state files are) and threads.
    fn host_values(h: &Fixture) -> impl PartialEq + std::fmt::Debug {
        let mut files = h.snapshot();
        files.retain(|p, _| !p.starts_with(h.path("run")));
        (files, h.threads())
    }

    fn paths(h: &Fixture) -> SyncPaths {
        SyncPaths {
            request: h.path("run/isolate.json"),
            request_owner: euid(),
            state: h.state(),
        }
    }

    #[test]
    fn sync_applies_for_a_request_does_nothing_again_and_undoes_when_it_goes() {
        let h = Fixture::new();
        let fs = h.fs();
        let host = h.host(&fs);
        let cfg = rt_config();
        let p = paths(&h);
        let before = host_values(&h);
        let first = sync(&host, &cfg, &p, &fixture_vm).unwrap();
        assert_eq!(first.action, Some(SyncAction::Nothing));
        assert_eq!(host_values(&h), before);

        write_request(&p.request, &request()).unwrap();
        let applied = sync(&host, &cfg, &p, &fixture_vm).unwrap();
        assert_eq!(applied.action, Some(SyncAction::Apply));
        assert!(applied.applied.is_some());
        assert_eq!(
            isolate::read_state(&p.state).unwrap().request,
            Some(request())
        );
        assert_eq!(h.sched.affinity(101).unwrap(), vec![2]);
        let during = host_values(&h);

        let again = sync(&host, &cfg, &p, &fixture_vm).unwrap();
        assert_eq!(again.action, Some(SyncAction::Nothing));
        assert_eq!(host_values(&h), during);

        remove_request(&p.request).unwrap();
        let undone = sync(&host, &cfg, &p, &fixture_vm).unwrap();
        assert_eq!(undone.action, Some(SyncAction::Undo));
        assert!(!p.state.exists());
        assert_eq!(host_values(&h), before);
    }

    #[test]
    fn sync_refuses_other_cpus_and_undoes_for_a_gone_process() {
        let h = Fixture::new();
        let fs = h.fs();
        let host = h.host(&fs);
        let cfg = rt_config();
        let p = paths(&h);
        let before = host_values(&h);
        write_request(&p.request, &request()).unwrap();
        sync(&host, &cfg, &p, &fixture_vm).unwrap();

        // The same VM with CPUs other than the configured ones: refused,
        // nothing changes.
        let during = host_values(&h);
        let moved = IsolationRequest {
            cpus: "3".into(),
            ..request()
        };
        write_request(&p.request, &moved).unwrap();
        let err = sync(&host, &cfg, &p, &fixture_vm).unwrap_err().to_string();
        assert!(err.contains("differ from vm rt1's isolate_cpus"), "{err}");
        assert_eq!(host_values(&h), during);

        // The request's process (start time) no longer runs: undone, though
        // the request file is still there.
        let gone = IsolationRequest {
            pid_starttime: 7,
            ..request()
        };
        write_request(&p.request, &gone).unwrap();
        let undone = sync(&host, &cfg, &p, &fixture_vm).unwrap();
        assert_eq!(undone.action, Some(SyncAction::Undo));
        assert!(undone.stale.unwrap().contains("is gone"));
        assert_eq!(host_values(&h), before);
    }

    #[test]
    fn a_request_for_a_vm_that_is_not_realtime_or_another_process_changes_nothing() {
        let h = Fixture::new();
        let fs = h.fs();
        let host = h.host(&fs);
        let p = paths(&h);
        let before = host_values(&h);
        write_request(&p.request, &request()).unwrap();
        let not_rt: HostConfig = toml::from_str(
            "[[vm]]\nname = \"rt1\"\nqmp = \"/q\"\nshm = \"/s\"\nisolate_cpus = \"2-3\"",
        )
        .unwrap();
        let err = sync(&host, &not_rt, &p, &fixture_vm)
            .unwrap_err()
            .to_string();
        assert!(err.contains("realtime = true"), "{err}");
        let other_process = |_: &IsolationRequest| {
            Ok(VmThreads {
                pid: 1,
                ..fixture_vm(&request()).unwrap()
            })
        };
        let err = sync(&host, &rt_config(), &p, &other_process)
            .unwrap_err()
            .to_string();
        assert!(err.contains("runs as pid 1"), "{err}");
        assert_eq!(host_values(&h), before);
        assert!(!p.state.exists());
    }

    #[test]
    fn for_vm_names_only_the_realtime_vm() {
        let cfg = rt_config();
        assert_eq!(
            IsolationRequest::for_vm(&cfg, "rt1", 100, 1100),
            Some(request())
        );
        assert_eq!(IsolationRequest::for_vm(&cfg, "other", 100, 1100), None);
    }
}
