//! The watchdog: a second process that puts every thread the daemon changed
//! back when the daemon dies by any means (`kill -9` included) or stalls.
//!
//! `pvsched hostd` starts it before its loop ([`Watchdog::start`]) by
//! re-executing its own binary as a hidden subcommand rather than forking:
//! the daemon may already hold threads and locks (stdio, allocator), and a
//! forked child of a multi-threaded process may only call async-signal-safe
//! functions until it execs; the re-executed watchdog is a clean
//! single-threaded process with its own name in `ps`.
//!
//! The watchdog holds a pidfd of the daemon and sleeps in `poll()` on it.
//! When the daemon's last thread has exited the pidfd turns readable and the
//! watchdog reconciles the state file ([`crate::actuator::reconcile`]: a
//! thread is touched only if its start time still matches), logs one line
//! and exits. It also reads the daemon loop's heartbeat, a word in a sealed
//! memfd the daemon passes as the watchdog's stdin: when the word stops
//! advancing for `watchdog_stall_ms`, the watchdog kills the daemon through
//! the pidfd (never a bare pid) and restores.
//!
//! It must outlive the daemon, so it is deliberately *not* tied to it:
//! no `PR_SET_PDEATHSIG` (that would kill it exactly when it is needed; the
//! child of a SIGKILLed parent is simply re-parented and keeps running), its
//! own process group (a terminal's Ctrl-C, Ctrl-\ or Ctrl-Z reach the daemon
//! only), and SIGINT, SIGTERM, SIGHUP and SIGQUIT ignored (a `systemctl stop`
//! signals the whole control group: the daemon restores and exits, and the
//! watchdog then exits on the pidfd). It never outlives the daemon by more
//! than one restore. It runs `SCHED_FIFO` above the loop thread and every
//! boost, so vCPU threads that hog every CPU cannot keep it off; asleep in
//! `poll()` it costs nothing.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pvsched_policy::RtClass;

use crate::actuator::{read_state_file, reconcile, ActError, ReconcileReport};
use crate::config::HostConfig;
use crate::procfs::HostFs;
use crate::sched::{SchedAttrs, ThreadScheduler};
use crate::sys::{self, SharedWords};

/// Word of the shared page the daemon's loop advances once per iteration
/// (0: the loop has not started, so nothing is boosted yet).
pub const HEARTBEAT_WORD: usize = 0;
/// Word the watchdog sets to its pid once it holds the daemon's pidfd.
pub const ARMED_WORD: usize = 1;
/// Word the daemon sets when it starts its own restore on the way out: from
/// then on a silent heartbeat is a shutdown (which may wait for a QMP
/// session of the refresher), not a stall; the watchdog only waits for the
/// exit and restores whatever is left.
pub const STOPPING_WORD: usize = 2;
/// Size of the shared page, in words.
pub const PAGE_WORDS: usize = 3;

/// How long [`Watchdog::start`] waits for the watchdog to arm.
const ARM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the watchdog waits for a killed daemon to exit before restoring anyway.
const KILL_WAIT_MS: i32 = 1000;

/// The daemon side's page, set once by [`Watchdog::start`].
static PAGE: OnceLock<SharedWords> = OnceLock::new();

/// The loop's heartbeat: one relaxed load and one relaxed store of a word
/// only this thread writes (nothing when no watchdog runs).
#[inline]
pub fn beat() {
    if let Some(page) = PAGE.get() {
        let word = page.word(HEARTBEAT_WORD);
        // Ordering: the watchdog only compares successive values; a single
        // writer needs no read-modify-write.
        word.store(
            word.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }
}

/// Tells the watchdog the daemon is shutting down (restoring itself), so a
/// silent heartbeat is no longer a stall (nothing when no watchdog runs).
pub fn stopping() {
    if let Some(page) = PAGE.get() {
        // Ordering: Relaxed: the watchdog only needs to see it eventually;
        // until it does, the stall timeout applies as before.
        page.word(STOPPING_WORD).store(1, Ordering::Relaxed);
    }
}

/// A watchdog failure.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// The shared heartbeat page could not be created or mapped.
    #[error("heartbeat page")]
    Page(#[source] io::Error),
    /// The watchdog process could not be started.
    #[error("starting the watchdog process")]
    Spawn(#[source] io::Error),
    /// The watchdog process did not arm in time.
    #[error("the watchdog did not arm within {timeout_ms} ms: {detail}")]
    NotArmed {
        /// How long we waited.
        timeout_ms: u64,
        /// What was seen.
        detail: String,
    },
    /// A watchdog already runs for this process.
    #[error("a watchdog already runs for this process")]
    AlreadyStarted,
    /// The daemon's pidfd could not be opened or polled.
    #[error("pidfd of daemon pid {pid}")]
    Pidfd {
        /// The daemon.
        pid: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The state file could not be reconciled.
    #[error(transparent)]
    State(#[from] ActError),
}

/// What the watchdog is told on its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchdogOptions {
    /// The daemon to watch.
    pub daemon_pid: i32,
    /// The daemon's state file.
    pub state_file: PathBuf,
    /// `/proc` root (thread identity checks).
    pub proc_root: PathBuf,
    /// Heartbeat silence after which the daemon counts as stalled (ms).
    pub stall_ms: u64,
    /// The watchdog's own `SCHED_FIFO` priority (`None`: stay in the fair class).
    pub rt_prio: Option<u8>,
}

impl WatchdogOptions {
    /// The options for a daemon running with `cfg`.
    pub fn for_daemon(cfg: &HostConfig, daemon_pid: i32) -> Self {
        WatchdogOptions {
            daemon_pid,
            state_file: cfg.daemon.state_file.clone(),
            proc_root: cfg.daemon.proc_root.clone(),
            stall_ms: cfg.watchdog_stall_ms(),
            rt_prio: Some(watchdog_rt_prio(cfg)),
        }
    }

    /// The command-line arguments that carry these options (the binary's
    /// hidden subcommand parses them back).
    pub fn to_args(&self) -> Vec<OsString> {
        vec![
            "--daemon-pid".into(),
            self.daemon_pid.to_string().into(),
            "--state".into(),
            self.state_file.clone().into(),
            "--proc-root".into(),
            self.proc_root.clone().into(),
            "--stall-ms".into(),
            self.stall_ms.to_string().into(),
            "--rt-prio".into(),
            self.rt_prio.unwrap_or(0).to_string().into(),
        ]
    }

    /// Poll interval: a fifth of the stall timeout, within 10..=100 ms.
    fn poll_ms(&self) -> i32 {
        (self.stall_ms / 5).clamp(10, 100) as i32
    }
}

/// The watchdog's priority: one above the loop thread and every boost (at most 99).
pub fn watchdog_rt_prio(cfg: &HostConfig) -> u8 {
    let above = cfg
        .loop_rt_prio()
        .unwrap_or(cfg.policy.prio_max)
        .max(cfg.policy.prio_max);
    above.saturating_add(1).min(99)
}

/// Ignores SIGINT, SIGTERM, SIGHUP and SIGQUIT in the calling (watchdog)
/// process: signals meant for the daemon (a terminal, `systemctl stop` of
/// the whole control group) must not end the watchdog before the daemon; it
/// ends when the daemon has exited.
pub fn ignore_daemon_signals() -> io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        sys::ignore_signal(sig)?;
    }
    Ok(())
}

/// Tells a stall from a daemon at work, from successive heartbeat values.
#[derive(Clone, Debug)]
pub struct StallDetector {
    stall_ns: u64,
    last: u64,
    since_ns: u64,
}

impl StallDetector {
    /// A detector that calls `stall_ns` of an unchanged heartbeat a stall.
    pub fn new(stall_ns: u64, now_ns: u64) -> Self {
        StallDetector {
            stall_ns,
            last: 0,
            since_ns: now_ns,
        }
    }

    /// Takes one reading; returns whether the daemon is stalled. A heartbeat
    /// still at 0 means the loop has not started (nothing boosted yet): no stall.
    pub fn observe(&mut self, heartbeat: u64, now_ns: u64) -> bool {
        if heartbeat != self.last {
            self.last = heartbeat;
            self.since_ns = now_ns;
            return false;
        }
        heartbeat != 0 && now_ns.saturating_sub(self.since_ns) >= self.stall_ns
    }
}

/// What a restore of the state file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// No state file: nothing was changed, or the daemon restored itself.
    NothingRecorded,
    /// The file belongs to a daemon that is still running: left alone.
    OwnedByLiveDaemon(u32),
    /// Reconciled.
    Reconciled(ReconcileReport),
}

impl RestoreOutcome {
    /// One line: what was restored.
    pub fn summary(&self) -> String {
        match self {
            RestoreOutcome::NothingRecorded => "nothing recorded in the state file".into(),
            RestoreOutcome::OwnedByLiveDaemon(pid) => {
                format!("the state file belongs to running daemon pid {pid}; left alone")
            }
            RestoreOutcome::Reconciled(r) => format!(
                "restored {} thread(s) {:?}, {} already at their original attributes, {} gone, {} failed{}",
                r.restored.len(),
                r.restored,
                r.unchanged.len(),
                r.gone.len(),
                r.failed.len(),
                if r.failed.is_empty() {
                    String::new()
                } else {
                    format!(" {:?} (records kept)", r.failed)
                }
            ),
        }
    }
}

/// Whether `pid` is a running pvsched process other than this one (its
/// executable's name starts with `pvsched`).
fn is_live_daemon(fs_proc_root: &Path, pid: u32) -> bool {
    if pid == std::process::id() || pid == 0 {
        return false;
    }
    std::fs::read_link(fs_proc_root.join(pid.to_string()).join("exe"))
        .ok()
        .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|name| name.starts_with("pvsched"))
}

/// Reconciles the state file unless it belongs to a daemon that still runs.
/// `dead_daemon` is a daemon known to be dead or killed (its pid may still
/// show in `/proc` for a moment).
pub fn restore_state_file(
    state_file: &Path,
    proc_root: &Path,
    dead_daemon: Option<i32>,
    sched: &dyn ThreadScheduler,
) -> Result<RestoreOutcome, ActError> {
    let Some(state) = read_state_file(state_file)? else {
        return Ok(RestoreOutcome::NothingRecorded);
    };
    let owner = state.daemon_pid;
    if dead_daemon.map(|p| p as u32) != Some(owner) && is_live_daemon(proc_root, owner) {
        return Ok(RestoreOutcome::OwnedByLiveDaemon(owner));
    }
    let fs = HostFs::new(proc_root, "/sys");
    let (report, _kept) = reconcile(state_file, sched, &fs)?;
    Ok(RestoreOutcome::Reconciled(report))
}

/// Why the watchdog ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchdogEnd {
    /// The daemon exited (by any means); then the state file was restored.
    DaemonExited(RestoreOutcome),
    /// The heartbeat stopped: the daemon was killed, then the state file restored.
    Stalled {
        /// How long the heartbeat had not moved when the watchdog acted (ms).
        silent_ms: u64,
        /// Whether the daemon had exited before the restore.
        exited: bool,
        /// The restore.
        outcome: RestoreOutcome,
    },
}

/// The watchdog's body: arms (stores its pid in [`ARMED_WORD`]), then waits
/// for the daemon to exit or stall. `must_be_parent`: the daemon started us,
/// so a parent other than `daemon_pid` after the pidfd is open means the
/// daemon died before that and the pid may name another process.
pub fn run_watchdog(
    opts: &WatchdogOptions,
    page: &SharedWords,
    sched: &dyn ThreadScheduler,
    must_be_parent: bool,
) -> Result<WatchdogEnd, WatchdogError> {
    crate::seccomp::enter(crate::seccomp::Role::Watchdog);
    let pid = opts.daemon_pid;
    let restore = |dead: bool| {
        restore_state_file(
            &opts.state_file,
            &opts.proc_root,
            dead.then_some(pid),
            sched,
        )
    };
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            return Ok(WatchdogEnd::DaemonExited(restore(true)?));
        }
        Err(source) => return Err(WatchdogError::Pidfd { pid, source }),
    };
    if must_be_parent && std::os::unix::process::parent_id() as i32 != pid {
        return Ok(WatchdogEnd::DaemonExited(restore(true)?));
    }
    if let Some(prio) = opts.rt_prio {
        if let Err(e) = sched.set_attrs(sys::gettid(), &SchedAttrs::rt(RtClass::Fifo, prio)) {
            eprintln!("pvsched-watchdog: stays in the fair class (SCHED_FIFO {prio}: {e})");
        }
    }
    // Ordering: Release pairs with the daemon's Acquire load in `start`.
    page.word(ARMED_WORD)
        .store(u64::from(std::process::id()), Ordering::Release);
    let stall_ns = opts.stall_ms.saturating_mul(1_000_000);
    let mut detector = StallDetector::new(stall_ns, sys::monotonic_ns());
    loop {
        let exited = poll_pidfd(&pidfd, opts.poll_ms(), pid)?;
        if exited {
            return Ok(WatchdogEnd::DaemonExited(restore(true)?));
        }
        let now = sys::monotonic_ns();
        // Ordering: Relaxed: only whether the value moves matters.
        let heartbeat = page.word(HEARTBEAT_WORD).load(Ordering::Relaxed);
        let stopping = page.word(STOPPING_WORD).load(Ordering::Relaxed) != 0;
        if detector.observe(heartbeat, now) && !stopping {
            let silent_ms = now.saturating_sub(detector.since_ns) / 1_000_000;
            // Kill first, so a daemon that spins without beating cannot boost
            // again after the restore.
            if let Err(e) = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL) {
                eprintln!("pvsched-watchdog: SIGKILL of stalled daemon pid {pid}: {e}");
            }
            let exited = poll_pidfd(&pidfd, KILL_WAIT_MS, pid)?;
            let outcome = restore(true)?;
            return Ok(WatchdogEnd::Stalled {
                silent_ms,
                exited,
                outcome,
            });
        }
    }
}

fn poll_pidfd(pidfd: &OwnedFd, timeout_ms: i32, pid: i32) -> Result<bool, WatchdogError> {
    sys::poll_readable(pidfd.as_fd(), timeout_ms)
        .map_err(|source| WatchdogError::Pidfd { pid, source })
}

/// The running watchdog, from the daemon's side.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
}

impl Watchdog {
    /// Starts the watchdog for this process: `command` is the executable and
    /// the hidden subcommand; the options of `cfg` are appended. The shared
    /// page goes to the child as its stdin (no name in any filesystem).
    /// Returns once the watchdog holds our pidfd; from then on [`beat`]
    /// feeds it. A watchdog that cannot start is an error: the daemon must
    /// not boost without one.
    pub fn start(mut command: Command, cfg: &HostConfig) -> Result<Watchdog, WatchdogError> {
        if PAGE.get().is_some() {
            return Err(WatchdogError::AlreadyStarted);
        }
        let (page, fd) =
            SharedWords::create(c"pvsched-heartbeat", PAGE_WORDS).map_err(WatchdogError::Page)?;
        if PAGE.set(page).is_err() {
            return Err(WatchdogError::AlreadyStarted);
        }
        let page = PAGE.get().ok_or(WatchdogError::AlreadyStarted)?;
        let opts = WatchdogOptions::for_daemon(cfg, std::process::id() as i32);
        let mut child = command
            .args(opts.to_args())
            .stdin(Stdio::from(fd))
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(WatchdogError::Spawn)?;
        let start = Instant::now();
        loop {
            // Ordering: Acquire pairs with the watchdog's Release store.
            if page.word(ARMED_WORD).load(Ordering::Acquire) == u64::from(child.id()) {
                return Ok(Watchdog { child });
            }
            let detail = match child.try_wait() {
                Ok(Some(status)) => Some(format!("it exited with {status}")),
                Err(e) => Some(e.to_string()),
                Ok(None) if start.elapsed() >= ARM_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Some("no sign of it".into())
                }
                Ok(None) => None,
            };
            if let Some(detail) = detail {
                return Err(WatchdogError::NotArmed {
                    timeout_ms: ARM_TIMEOUT.as_millis() as u64,
                    detail,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The watchdog's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuator::{write_state_file, StateFile, StateRecord, ThreadRef};
    use crate::sched::{FakeScheduler, Policy};
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_stall_is_an_unchanged_nonzero_heartbeat_for_the_whole_timeout() {
        let mut d = StallDetector::new(500, 0);
        // Not started: never a stall.
        assert!(!d.observe(0, 10_000));
        assert!(!d.observe(1, 10_000));
        assert!(!d.observe(1, 10_499));
        assert!(d.observe(1, 10_500));
        // Moving again: fine; any change counts, even a wrap.
        assert!(!d.observe(2, 10_600));
        assert!(!d.observe(2, 11_099));
        assert!(!d.observe(u64::MAX, 11_100));
        assert!(d.observe(u64::MAX, 11_600));
    }

    #[test]
    fn options_follow_the_configuration_and_stay_above_the_loop() {
        let mut cfg = HostConfig::from_toml("[policy]\nprio_max = 10").unwrap();
        let o = WatchdogOptions::for_daemon(&cfg, 42);
        assert_eq!(o.rt_prio, Some(12), "loop at 11, watchdog above it");
        assert_eq!(o.stall_ms, 500);
        assert_eq!(o.poll_ms(), 100);
        cfg.daemon.loop_rt_prio = Some(0);
        assert_eq!(
            watchdog_rt_prio(&cfg),
            11,
            "fair loop: still above every boost"
        );
        cfg.daemon.loop_rt_prio = Some(99);
        assert_eq!(watchdog_rt_prio(&cfg), 99);
        let args: Vec<String> = o
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(args.windows(2).any(|w| w == ["--daemon-pid", "42"]));
        assert!(args.windows(2).any(|w| w == ["--stall-ms", "500"]));
    }

    /// This test thread as a recorded thread, and a state file naming it.
    fn recorded_self(dir: &Path, owner: u32) -> (PathBuf, ThreadRef, FakeScheduler) {
        let fs = HostFs::default();
        let pid = std::process::id() as i32;
        let tid = sys::gettid();
        let t = ThreadRef {
            pid,
            tid,
            starttime: fs.task_stat(pid, tid).unwrap().starttime,
        };
        let fake = FakeScheduler::new();
        fake.add_thread(tid, SchedAttrs::rt(RtClass::Rr, 5));
        let path = dir.join("state.json");
        let state = StateFile {
            version: 1,
            daemon_pid: owner,
            threads: vec![StateRecord {
                vm: "vm".into(),
                thread: t,
                original: SchedAttrs::default(),
                original_affinity: None,
            }],
        };
        write_state_file(&path, &state).unwrap();
        (path, t, fake)
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("60").spawn().unwrap()
    }

    #[test]
    fn a_state_file_of_a_running_daemon_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        // An owner that does not run: restored.
        let (path, t, fake) = recorded_self(dir.path(), u32::MAX / 2);
        let out = restore_state_file(&path, Path::new("/proc"), None, &fake).unwrap();
        assert!(matches!(out, RestoreOutcome::Reconciled(ref r) if r.restored == vec![t.tid]));
        assert_eq!(fake.attrs(t.tid).unwrap().policy, Policy::Normal);
        assert!(!path.exists());
        assert_eq!(
            restore_state_file(&path, Path::new("/proc"), None, &fake).unwrap(),
            RestoreOutcome::NothingRecorded
        );
        // A fixture /proc where the owner's exe is a pvsched binary.
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(proc_root.join("777")).unwrap();
        let me = std::process::id().to_string();
        std::os::unix::fs::symlink(Path::new("/proc").join(&me), proc_root.join(&me)).unwrap();
        std::os::unix::fs::symlink("/usr/local/bin/pvsched", proc_root.join("777/exe")).unwrap();
        let (path, t, fake) = recorded_self(dir.path(), 777);
        let out = restore_state_file(&path, &proc_root, None, &fake).unwrap();
        assert_eq!(out, RestoreOutcome::OwnedByLiveDaemon(777));
        assert!(path.exists());
        assert!(fake.attrs(t.tid).unwrap().policy.is_rt());
        // Known dead (the watchdog's own daemon): restored although /proc still shows it.
        assert!(matches!(
            restore_state_file(&path, &proc_root, Some(777), &fake).unwrap(),
            RestoreOutcome::Reconciled(_)
        ));
        assert!(!fake.attrs(t.tid).unwrap().policy.is_rt());
    }

    #[test]
    fn the_watchdog_restores_when_its_daemon_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = sleeper();
        let (path, t, fake) = recorded_self(dir.path(), daemon.id());
        let (page, _fd) = SharedWords::create(c"test", PAGE_WORDS).unwrap();
        let opts = WatchdogOptions {
            daemon_pid: daemon.id() as i32,
            state_file: path.clone(),
            proc_root: "/proc".into(),
            stall_ms: 60_000,
            rt_prio: None,
        };
        let killer = std::thread::spawn({
            let pid = daemon.id();
            move || {
                std::thread::sleep(Duration::from_millis(200));
                Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .unwrap();
            }
        });
        // The fake scheduler records this thread; the watchdog runs here too.
        let end = run_watchdog(&opts, &page, &fake, false).unwrap();
        killer.join().unwrap();
        assert_eq!(daemon.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(
            page.word(ARMED_WORD).load(Ordering::Relaxed),
            u64::from(std::process::id())
        );
        match end {
            WatchdogEnd::DaemonExited(RestoreOutcome::Reconciled(r)) => {
                assert_eq!(r.restored, vec![t.tid]);
            }
            other => panic!("{other:?}"),
        }
        assert!(!fake.attrs(t.tid).unwrap().policy.is_rt());
        assert!(!path.exists());
    }

    #[test]
    fn the_watchdog_kills_a_daemon_whose_heartbeat_stops_then_restores() {
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = sleeper();
        let (path, t, fake) = recorded_self(dir.path(), daemon.id());
        let (page, fd) = SharedWords::create(c"test", PAGE_WORDS).unwrap();
        let beating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let beater = std::thread::spawn({
            let page = SharedWords::map(fd.as_fd(), PAGE_WORDS).unwrap();
            let beating = beating.clone();
            move || {
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(400) {
                    page.word(HEARTBEAT_WORD).fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
                beating.store(false, Ordering::SeqCst);
            }
        });
        let opts = WatchdogOptions {
            daemon_pid: daemon.id() as i32,
            state_file: path.clone(),
            proc_root: "/proc".into(),
            stall_ms: 150,
            rt_prio: None,
        };
        let end = run_watchdog(&opts, &page, &fake, false).unwrap();
        assert!(
            !beating.load(Ordering::SeqCst),
            "called a stall while beating"
        );
        beater.join().unwrap();
        assert_eq!(daemon.wait().unwrap().signal(), Some(libc::SIGKILL));
        match end {
            WatchdogEnd::Stalled {
                silent_ms,
                exited,
                outcome: RestoreOutcome::Reconciled(r),
            } => {
                assert!(silent_ms >= 150, "{silent_ms}");
                assert!(exited);
                assert_eq!(r.restored, vec![t.tid]);
            }
            other => panic!("{other:?}"),
        }
        assert!(!fake.attrs(t.tid).unwrap().policy.is_rt());
    }

    #[test]
    fn a_daemon_shutting_down_is_not_called_stalled() {
        let mut daemon = sleeper();
        let (page, _fd) = SharedWords::create(c"test", PAGE_WORDS).unwrap();
        page.word(HEARTBEAT_WORD).store(7, Ordering::Relaxed);
        page.word(STOPPING_WORD).store(1, Ordering::Relaxed);
        let opts = WatchdogOptions {
            daemon_pid: daemon.id() as i32,
            state_file: "/nonexistent/state".into(),
            proc_root: "/proc".into(),
            stall_ms: 20,
            rt_prio: None,
        };
        let pid = daemon.id();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap();
        });
        let end = run_watchdog(&opts, &page, &FakeScheduler::new(), false).unwrap();
        killer.join().unwrap();
        assert_eq!(
            end,
            WatchdogEnd::DaemonExited(RestoreOutcome::NothingRecorded)
        );
        assert_eq!(daemon.wait().unwrap().signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn a_daemon_that_never_beats_is_not_killed() {
        let mut daemon = sleeper();
        let (page, _fd) = SharedWords::create(c"test", PAGE_WORDS).unwrap();
        let opts = WatchdogOptions {
            daemon_pid: daemon.id() as i32,
            state_file: "/nonexistent/state".into(),
            proc_root: "/proc".into(),
            stall_ms: 20,
            rt_prio: None,
        };
        let pid = daemon.id();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap();
        });
        let end = run_watchdog(&opts, &page, &FakeScheduler::new(), false).unwrap();
        killer.join().unwrap();
        assert_eq!(
            end,
            WatchdogEnd::DaemonExited(RestoreOutcome::NothingRecorded)
        );
        assert_eq!(daemon.wait().unwrap().signal(), Some(libc::SIGTERM));
    }
}
