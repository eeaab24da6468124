//! Applying decisions to threads, and putting every thread back.
//!
//! A thread's original attributes (and affinity, when the daemon changes
//! it) are read and recorded *before* the first change. The records are
//! made durable in the state file (temp file + fsync + rename) by a writer
//! thread, `pvsched-state`, in the fair class: the RT loop thread hands it
//! the current set of records through a wait-free triple buffer
//! ([`crate::handoff`]) and never touches the disk itself.
//!
//! Crash safety rests on one invariant: **at any instant, every thread that
//! is RT (or re-pinned) because of pvsched has a durable record of its
//! original attributes.** It holds because
//! - a change away from a thread's original (a boost, an affinity) is
//!   applied only once the writer has reported durable a version of the
//!   record set that holds the thread's current record; until then the
//!   change is deferred (the loop goes on and applies it on a later
//!   iteration, see [`Actuator::apply_deferred`]), never waited for;
//! - a restore to the original never waits: it is applied at once, and the
//!   record is dropped from the set only after the restore succeeded, so a
//!   crash in between leaves a record for a thread already restored, which
//!   the next start restores again harmlessly;
//! - the record stays while the VM runs, so later boosts and unboosts cost
//!   no file write.
//!
//! On exit every record is restored; after a crash the next start
//! reconciles the file. Both, and every apply, first compare the thread's
//! start time (`/proc/<pid>/task/<tid>/stat` field 22) with the recorded
//! one, so a thread id reused by another thread is never touched. On the
//! apply path the `stat` is read through a descriptor held since the record
//! was made, which stays bound to the recorded thread (reads fail once it
//! has exited, whatever the id names then). Thread
//! pidfds (`PIDFD_THREAD`, Linux 6.9) would close the remaining window
//! between that check and the syscall, but Debian 12 hosts run 6.1.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pvsched_policy::ThreadSched;
use serde::{Deserialize, Serialize};

use crate::handoff::{latest, LatestReader, LatestWriter};
use crate::procfs::HostFs;
use crate::sched::{
    set_attrs_leaving, Policy, RealScheduler, SchedAttrs, SchedError, ThreadScheduler, Tid,
};

/// A thread, identified against pid reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ThreadRef {
    /// Process (QEMU) id.
    pub pid: i32,
    /// Thread id.
    pub tid: Tid,
    /// The thread's start time (clock ticks since boot).
    pub starttime: u64,
}

/// One changed thread in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// VM the thread belongs to.
    pub vm: String,
    /// The thread.
    pub thread: ThreadRef,
    /// Attributes before the daemon first changed them.
    pub original: SchedAttrs,
    /// Affinity before the daemon first changed it (`None`: never changed).
    pub original_affinity: Option<Vec<u32>>,
}

/// Version of the state file this daemon writes. Version 1 recorded only
/// reset-on-fork of the sched flags; version 2 records every flag and
/// `SCHED_EXT` originals. Both are read.
pub const STATE_FILE_VERSION: u32 = 2;

/// The state file's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// Format version (1 or [`STATE_FILE_VERSION`]).
    pub version: u32,
    /// Pid of the daemon that wrote it.
    pub daemon_pid: u32,
    /// Changed threads.
    pub threads: Vec<StateRecord>,
}

/// A state-file or actuation failure.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    /// A scheduling call failed.
    #[error(transparent)]
    Sched(#[from] SchedError),
    /// The state file could not be written (nothing was changed).
    #[error("writing state file {path}")]
    StateWrite {
        /// File.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state file could not be read or parsed.
    #[error("reading state file {path}: {detail}")]
    StateRead {
        /// File.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// Writes the state file atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_state_file(path: &Path, state: &StateFile) -> Result<(), ActError> {
    let err = |source| ActError::StateWrite {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let json = serde_json::to_vec_pretty(state).map_err(|e| err(e.into()))?;
    {
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&json).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the state file (`None` if there is none).
pub fn read_state_file(path: &Path) -> Result<Option<StateFile>, ActError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ActError::StateRead {
                path: path.to_owned(),
                detail: e.to_string(),
            })
        }
    };
    let state: StateFile = serde_json::from_str(&text).map_err(|e| ActError::StateRead {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    if !(1..=STATE_FILE_VERSION).contains(&state.version) {
        return Err(ActError::StateRead {
            path: path.to_owned(),
            detail: format!(
                "format version {} (this daemon reads 1 to {STATE_FILE_VERSION}); left untouched",
                state.version
            ),
        });
    }
    Ok(Some(state))
}

/// A held `/proc/<pid>/task/<tid>/stat` of a recorded thread. The open file
/// refers to that thread, not to its id: once the thread is gone a read
/// fails (`ESRCH`) even if the id names another thread by then, so a read
/// that succeeds and shows the recorded start time proves the identity. A
/// `pread` of it costs about a third of opening the path again (measured
/// 4 µs against 15 µs on a loaded host), which matters on the apply path.
#[derive(Debug)]
struct IdentityFile(std::fs::File);

impl IdentityFile {
    /// Opens the thread's `stat` and checks the start time through it.
    fn open(fs: &HostFs, op: &'static str, t: &ThreadRef) -> Result<Self, SchedError> {
        let gone = SchedError::Replaced {
            op,
            tid: t.tid,
            recorded: t.starttime,
            found: None,
        };
        let file = std::fs::File::open(fs.task_dir(t.pid, t.tid).join("stat")).map_err(|_| gone)?;
        let held = IdentityFile(file);
        held.verify(op, t)?;
        Ok(held)
    }

    /// Re-reads the held `stat`: `Ok` only while it is the recorded thread.
    fn verify(&self, op: &'static str, t: &ThreadRef) -> Result<(), SchedError> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 2048];
        let found = self
            .0
            .read_at(&mut buf, 0)
            .ok()
            .and_then(|n| std::str::from_utf8(&buf[..n]).ok())
            .and_then(crate::procfs::parse_task_stat)
            .map(|st| st.starttime);
        match found {
            Some(start) if start == t.starttime => Ok(()),
            found => Err(SchedError::Replaced {
                op,
                tid: t.tid,
                recorded: t.starttime,
                found,
            }),
        }
    }
}

/// Compares a thread's current start time with the recorded one: `Ok` only
/// when the id still names the recorded thread.
pub fn check_identity(fs: &HostFs, op: &'static str, t: &ThreadRef) -> Result<(), SchedError> {
    match fs.task_stat(t.pid, t.tid) {
        Ok(stat) if stat.starttime == t.starttime => Ok(()),
        found => Err(SchedError::Replaced {
            op,
            tid: t.tid,
            recorded: t.starttime,
            found: found.ok().map(|s| s.starttime),
        }),
    }
}

/// What reconciliation at start did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Threads put back to their original attributes.
    pub restored: Vec<Tid>,
    /// Threads already at their original attributes.
    pub unchanged: Vec<Tid>,
    /// Threads that no longer exist or whose id was reused (left alone).
    pub gone: Vec<Tid>,
    /// Threads that could not be restored (kept for a retry at exit).
    pub failed: Vec<(Tid, String)>,
}

/// Puts every thread of a leftover state file back. Records that could not
/// be restored are returned for the new daemon to keep.
pub fn reconcile(
    path: &Path,
    sched: &dyn ThreadScheduler,
    fs: &HostFs,
) -> Result<(ReconcileReport, Vec<StateRecord>), ActError> {
    let mut report = ReconcileReport::default();
    let mut keep = Vec::new();
    let Some(state) = read_state_file(path)? else {
        return Ok((report, keep));
    };
    for rec in state.threads {
        let t = rec.thread;
        if check_identity(fs, "restore", &t).is_err() {
            report.gone.push(t.tid);
            continue;
        }
        match restore_record(sched, &rec, true) {
            Ok(true) => report.restored.push(t.tid),
            Ok(false) => report.unchanged.push(t.tid),
            Err(e) if e.is_gone() => report.gone.push(t.tid),
            Err(e) => {
                report.failed.push((t.tid, e.to_string()));
                keep.push(rec);
            }
        }
    }
    if keep.is_empty() {
        let _ = std::fs::remove_file(path);
    }
    Ok((report, keep))
}

/// Restores one record; returns whether anything had to change.
fn restore_record(
    sched: &dyn ThreadScheduler,
    rec: &StateRecord,
    check_first: bool,
) -> Result<bool, SchedError> {
    let tid = rec.thread.tid;
    let mut changed = false;
    // Read first either way: a thread in SCHED_DEADLINE leaves it in two steps.
    let current = match sched.get_attrs(tid) {
        Ok(attrs) => Some(attrs),
        Err(e) if check_first => return Err(e),
        Err(_) => None,
    };
    if current != Some(rec.original) {
        let from_deadline = current.is_some_and(|a| a.policy == Policy::Deadline);
        set_attrs_leaving(sched, tid, &rec.original, from_deadline)?;
        changed = true;
    }
    if let Some(aff) = &rec.original_affinity {
        if !check_first || &sched.get_affinity(tid)? != aff {
            sched.set_affinity(tid, aff)?;
            changed = true;
        }
    }
    Ok(changed)
}

/// The set of records as handed to the writer: (version, records).
type RecordSet = (u64, Vec<StateRecord>);

/// The `pvsched-state` thread and the loop's ends of its hand-offs.
struct StateWriter {
    records: LatestWriter<RecordSet>,
    /// Highest version of the record set on disk.
    durable: Arc<AtomicU64>,
    /// Failed writes so far.
    errors: Arc<AtomicU64>,
    /// The writer's last error, for the loop to log (the writer thread
    /// never prints: stderr's lock would be shared with the loop thread).
    last_error: LatestReader<Option<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StateWriter {
    fn spawn(path: PathBuf) -> std::io::Result<Self> {
        let (records, mut pending) = latest::<RecordSet>((0, Vec::new()));
        let (mut error_out, last_error) = latest::<Option<String>>(None);
        let durable = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, e, st) = (Arc::clone(&durable), Arc::clone(&errors), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("pvsched-state".into())
            .spawn(move || {
                stay_fair();
                // After lowering itself: the state writer's filter has no
                // sched_setattr.
                crate::seccomp::enter(crate::seccomp::Role::StateWriter);
                let mut unwritten: Option<RecordSet> = None;
                // Told to the loop once per distinct error, not per retry.
                let mut told: Option<String> = None;
                loop {
                    // Ordering: Acquire pairs with the Release store in
                    // `Drop`, so a set published before stopping is seen below.
                    let stopping = st.load(Ordering::Acquire);
                    if let Some(set) = pending.fresh() {
                        unwritten = Some(set.clone());
                    }
                    if let Some((version, threads)) = &unwritten {
                        match write_records(&path, threads) {
                            Ok(()) => {
                                // Ordering: Release: the file is on disk
                                // before the loop reads this version.
                                d.store(*version, Ordering::Release);
                                unwritten = None;
                                told = None;
                            }
                            Err(err) => {
                                e.fetch_add(1, Ordering::Relaxed);
                                let message = error_chain(&err);
                                if told.as_ref() != Some(&message) {
                                    error_out.publish(Some(message.clone()));
                                    told = Some(message);
                                }
                            }
                        }
                    }
                    if stopping {
                        break;
                    }
                    // Retry a failed write soon; otherwise sleep until unparked.
                    let nap = if unwritten.is_some() { 100 } else { 1_000 };
                    std::thread::park_timeout(Duration::from_millis(nap));
                }
            })?;
        Ok(StateWriter {
            records,
            durable,
            errors,
            last_error,
            stop,
            thread: Some(thread),
        })
    }

    /// Hands over a new record set; never waits (a triple-buffer swap and
    /// an unpark, which is one atomic swap and at most a futex wake).
    fn publish(&mut self, set: RecordSet) {
        self.records.publish(set);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    fn durable(&self) -> u64 {
        // Ordering: Acquire pairs with the writer's Release after the write.
        self.durable.load(Ordering::Acquire)
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        // Ordering: Release: every set published before is seen by the
        // writer's last pass.
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The writer thread runs in the fair class even when spawned from an RT
/// thread (lowering one's own class needs no privilege).
fn stay_fair() {
    let me = crate::sys::gettid();
    if let Ok(attrs) = RealScheduler.get_attrs(me) {
        if attrs.policy.is_realtime() {
            let _ = RealScheduler.set_attrs(me, &SchedAttrs::default());
        }
    }
}

/// Makes a record set durable: the file, or no file when the set is empty.
fn write_records(path: &Path, threads: &[StateRecord]) -> Result<(), ActError> {
    if threads.is_empty() {
        return match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ActError::StateWrite {
                path: path.to_owned(),
                source,
            }),
        };
    }
    write_state_file(
        path,
        &StateFile {
            version: STATE_FILE_VERSION,
            daemon_pid: std::process::id(),
            threads: threads.to_vec(),
        },
    )
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// A change away from a thread's original, waiting for its record to be durable.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Wanted {
    sched: ThreadSched,
    affinity: Option<Vec<u32>>,
}

#[derive(Debug)]
struct Managed {
    rec: StateRecord,
    sched: ThreadSched,
    /// Affinity currently set by us (`None`: the original).
    affinity: Option<Vec<u32>>,
    /// Restored at exit even when believed at baseline (leftover of a crash).
    dirty: bool,
    /// Version of the record set that first held this record as it is now.
    recorded_at: u64,
    /// A change deferred until the record is durable.
    wanted: Option<Wanted>,
    /// The thread's `stat`, held open once its identity was checked.
    identity: Option<IdentityFile>,
}

/// Counters of the actuator, for the status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActCounters {
    /// Changes deferred because the thread's record was not durable yet.
    pub deferred: u64,
    /// Applies and restores refused because the thread id named another
    /// thread (or none) than the one recorded.
    pub identity_refusals: u64,
    /// Failed state-file writes (retried).
    pub state_write_errors: u64,
}

/// Applies decisions and keeps the state file current.
pub struct Actuator {
    sched: Box<dyn ThreadScheduler>,
    fs: HostFs,
    writer: Option<StateWriter>,
    managed: BTreeMap<Tid, Managed>,
    /// Version of the record set, bumped on every change of it.
    version: u64,
    any_wanted: bool,
    counters: ActCounters,
}

impl Actuator {
    /// An actuator; `leftovers` are records a reconciliation could not
    /// restore (they are on disk already). With a `state_path` the
    /// `pvsched-state` writer thread is started.
    pub fn new(
        sched: Box<dyn ThreadScheduler>,
        fs: HostFs,
        state_path: Option<PathBuf>,
        leftovers: Vec<StateRecord>,
    ) -> Result<Self, ActError> {
        let managed = leftovers
            .into_iter()
            .map(|rec| {
                (
                    rec.thread.tid,
                    Managed {
                        rec,
                        sched: ThreadSched::Baseline,
                        affinity: None,
                        dirty: true,
                        recorded_at: 0,
                        wanted: None,
                        identity: None,
                    },
                )
            })
            .collect();
        let writer = match state_path {
            Some(path) => Some(
                StateWriter::spawn(path.clone())
                    .map_err(|source| ActError::StateWrite { path, source })?,
            ),
            None => None,
        };
        Ok(Actuator {
            sched,
            fs,
            writer,
            managed,
            version: 0,
            any_wanted: false,
            counters: ActCounters::default(),
        })
    }

    /// The scheduler in use.
    pub fn scheduler(&self) -> &dyn ThreadScheduler {
        self.sched.as_ref()
    }

    /// Number of threads with a record.
    pub fn managed_count(&self) -> usize {
        self.managed.len()
    }

    /// Thread ids with a record.
    pub fn managed_tids(&self) -> Vec<Tid> {
        self.managed.keys().copied().collect()
    }

    /// Counters so far.
    pub fn counters(&self) -> ActCounters {
        ActCounters {
            state_write_errors: self
                .writer
                .as_ref()
                .map_or(0, |w| w.errors.load(Ordering::Relaxed)),
            ..self.counters
        }
    }

    /// Hands the current record set to the writer (never waits).
    fn publish(&mut self) {
        self.version += 1;
        let version = self.version;
        if let Some(w) = self.writer.as_mut() {
            let set = self.managed.values().map(|m| m.rec.clone()).collect();
            w.publish((version, set));
        }
    }

    /// Drops a record (the thread was restored, or is gone).
    fn forget(&mut self, tid: Tid) -> Option<Managed> {
        let m = self.managed.remove(&tid)?;
        self.publish();
        Some(m)
    }

    fn is_durable(&self, m: &Managed) -> bool {
        self.writer
            .as_ref()
            .is_none_or(|w| w.durable() >= m.recorded_at)
    }

    /// Whether every record handed to the writer is on disk.
    pub fn all_durable(&self) -> bool {
        self.writer
            .as_ref()
            .is_none_or(|w| w.durable() >= self.version)
    }

    /// Waits (off the loop thread: tests, shutdown) until every record is on
    /// disk, or `timeout`; returns whether it is.
    pub fn wait_durable(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while !self.all_durable() {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Per loop iteration: applies the deferred changes whose records have
    /// become durable. Returns the results (thread, error) of those that
    /// failed, and the writer's newest error, for the caller to report.
    /// (Changes applied here happen outside a VM's tick, so they are not in
    /// its apply counters or apply-latency histogram; the status counts
    /// them as deferred.)
    pub fn apply_deferred(&mut self) -> (Vec<(Tid, ActError)>, Option<String>) {
        let writer_error = self
            .writer
            .as_mut()
            .and_then(|w| w.last_error.fresh().cloned().flatten());
        let mut failed = Vec::new();
        if !self.any_wanted {
            return (failed, writer_error);
        }
        let due: Vec<(String, ThreadRef, Wanted)> = self
            .managed
            .values()
            .filter(|m| m.wanted.is_some() && self.is_durable(m))
            .filter_map(|m| Some((m.rec.vm.clone(), m.rec.thread, m.wanted.clone()?)))
            .collect();
        for (vm, thread, w) in due {
            if let Err(e) = self.apply(&vm, thread, w.sched, w.affinity.as_deref()) {
                failed.push((thread.tid, e));
            }
        }
        self.any_wanted = self.managed.values().any(|m| m.wanted.is_some());
        (failed, writer_error)
    }

    /// Checks that `thread` is still the thread its id named when recorded;
    /// a mismatch drops the record and is refused. For a thread without a
    /// record, returns its opened identity file to keep with a new record.
    fn checked(
        &mut self,
        op: &'static str,
        thread: &ThreadRef,
    ) -> Result<Option<IdentityFile>, ActError> {
        let recorded = self
            .managed
            .get_mut(&thread.tid)
            .filter(|m| m.rec.thread == *thread);
        let result = match recorded {
            Some(Managed {
                identity: Some(held),
                ..
            }) => held.verify(op, thread).map(|()| None),
            Some(m) => IdentityFile::open(&self.fs, op, thread).map(|held| {
                m.identity = Some(held);
                None
            }),
            None => IdentityFile::open(&self.fs, op, thread).map(Some),
        };
        result.map_err(|e| {
            self.counters.identity_refusals += 1;
            if self
                .managed
                .get(&thread.tid)
                .is_some_and(|m| m.rec.thread == *thread)
            {
                self.forget(thread.tid);
            }
            e.into()
        })
    }

    /// Records the original attributes (and affinity, when `with_affinity`)
    /// of threads the daemon may change later, in one hand-off to the
    /// writer, so that by the time the guest asks the record is usually on
    /// disk. Threads already recorded, gone or replaced are skipped.
    pub fn adopt(
        &mut self,
        vm: &str,
        threads: &[ThreadRef],
        with_affinity: bool,
    ) -> Result<(), ActError> {
        let mut added = false;
        for &thread in threads {
            if self
                .managed
                .get(&thread.tid)
                .is_some_and(|m| m.rec.thread == thread)
            {
                continue;
            }
            let Ok(identity) = IdentityFile::open(&self.fs, "sched_getattr", &thread) else {
                continue;
            };
            let Ok(original) = self.sched.get_attrs(thread.tid) else {
                continue;
            };
            let original_affinity = if with_affinity {
                match self.sched.get_affinity(thread.tid) {
                    Ok(a) => Some(a),
                    Err(_) => continue,
                }
            } else {
                None
            };
            self.managed.insert(
                thread.tid,
                Managed {
                    rec: StateRecord {
                        vm: vm.to_owned(),
                        thread,
                        original,
                        original_affinity,
                    },
                    sched: ThreadSched::Baseline,
                    affinity: None,
                    dirty: false,
                    recorded_at: self.version + 1,
                    wanted: None,
                    identity: Some(identity),
                },
            );
            added = true;
        }
        if added {
            self.publish();
        }
        Ok(())
    }

    /// Brings a thread to `sched` and `affinity` (`None`: its original
    /// affinity). Returns whether a syscall changed anything.
    ///
    /// A change away from the original whose record is not durable yet is
    /// deferred: it returns `Ok(false)` and is applied by
    /// [`Actuator::apply_deferred`] once the record is on disk, unless a
    /// later call asks for something else first. A return to the original
    /// is applied at once.
    pub fn apply(
        &mut self,
        vm: &str,
        thread: ThreadRef,
        sched: ThreadSched,
        affinity: Option<&[u32]>,
    ) -> Result<bool, ActError> {
        let tid = thread.tid;
        if self
            .managed
            .get(&tid)
            .is_some_and(|m| m.rec.thread != thread)
        {
            // The id now names another thread: the old one is gone.
            self.forget(tid);
        }
        let want_aff = affinity.map(<[u32]>::to_vec);
        let away = sched != ThreadSched::Baseline || want_aff.is_some();
        match self.managed.get_mut(&tid) {
            Some(m) if m.sched == sched && m.affinity == want_aff => {
                m.wanted = None;
                return Ok(false);
            }
            None if !away => return Ok(false),
            _ => {}
        }
        let identity = self.checked("sched_setattr", &thread)?;
        // Record originals before the first change of each kind.
        let mut record_changed = false;
        if let Some(m) = self.managed.get_mut(&tid) {
            if away && m.sched == ThreadSched::Baseline && m.affinity.is_none() && !m.dirty {
                // At baseline: someone may have changed the thread since it
                // was adopted; what it has now is what to restore.
                if let Ok(now) = self.sched.get_attrs(tid) {
                    if now != m.rec.original {
                        m.rec.original = now;
                        record_changed = true;
                    }
                }
            }
        }
        if !self.managed.contains_key(&tid) {
            let original = self.sched.get_attrs(tid)?;
            self.managed.insert(
                tid,
                Managed {
                    rec: StateRecord {
                        vm: vm.to_owned(),
                        thread,
                        original,
                        original_affinity: None,
                    },
                    sched: ThreadSched::Baseline,
                    affinity: None,
                    dirty: false,
                    recorded_at: 0,
                    wanted: None,
                    identity,
                },
            );
            record_changed = true;
        }
        if want_aff.is_some() && self.managed[&tid].rec.original_affinity.is_none() {
            let aff = match self.sched.get_affinity(tid) {
                Ok(a) => a,
                Err(e) => {
                    if self.managed[&tid].sched == ThreadSched::Baseline
                        && self.managed[&tid].affinity.is_none()
                    {
                        self.forget(tid);
                    }
                    return Err(e.into());
                }
            };
            if let Some(m) = self.managed.get_mut(&tid) {
                m.rec.original_affinity = Some(aff);
            }
            record_changed = true;
        }
        if record_changed {
            let version = self.version + 1;
            if let Some(m) = self.managed.get_mut(&tid) {
                m.recorded_at = version;
            }
            self.publish();
        }
        let durable = self.managed.get(&tid).is_some_and(|m| self.is_durable(m));
        let Some(m) = self.managed.get_mut(&tid) else {
            return Ok(false);
        };
        if away && !durable {
            // The invariant of this module: nothing moves away from its
            // original before the original is on disk.
            let wanted = Wanted {
                sched,
                affinity: want_aff,
            };
            if m.wanted.as_ref() != Some(&wanted) {
                self.counters.deferred += 1;
                m.wanted = Some(wanted);
            }
            self.any_wanted = true;
            return Ok(false);
        }
        m.wanted = None;
        if m.sched != sched {
            let attrs = SchedAttrs::for_decision(sched, &m.rec.original);
            let from_deadline = matches!(m.sched, ThreadSched::Deadline(_));
            set_attrs_leaving(self.sched.as_ref(), tid, &attrs, from_deadline)?;
            m.sched = sched;
        }
        if m.affinity != want_aff {
            let target = want_aff
                .as_deref()
                .or(m.rec.original_affinity.as_deref())
                .unwrap_or(&[]);
            if !target.is_empty() {
                self.sched.set_affinity(tid, target)?;
            }
            m.affinity = want_aff;
        }
        Ok(true)
    }

    /// Restores one thread and drops its record. A thread whose id now
    /// names another thread (or none) is not touched: the record is dropped
    /// and the refusal returned.
    pub fn restore_thread(&mut self, tid: Tid) -> Result<(), ActError> {
        let Some(m) = self.managed.get(&tid) else {
            return Ok(());
        };
        let needs = m.dirty || m.sched != ThreadSched::Baseline || m.affinity.is_some();
        if !needs {
            self.forget(tid);
            return Ok(());
        }
        let thread = m.rec.thread;
        self.checked("restore", &thread)?;
        let Some(m) = self.managed.get(&tid) else {
            return Ok(());
        };
        match restore_record(self.sched.as_ref(), &m.rec, false) {
            Ok(_) => {}
            Err(e) if e.is_gone() => {}
            Err(e) => return Err(e.into()),
        }
        // Dropped only after the restore: a crash before the writer catches
        // up leaves a record of a restored thread, which is harmless.
        self.forget(tid);
        Ok(())
    }

    /// Restores every thread of a VM. Returns the errors: failures (records
    /// kept) and refusals of threads whose id was reused (records dropped).
    /// Threads that are simply gone are not errors.
    pub fn restore_vm(&mut self, vm: &str) -> Vec<ActError> {
        let tids: Vec<Tid> = self
            .managed
            .iter()
            .filter(|(_, m)| m.rec.vm == vm)
            .map(|(t, _)| *t)
            .collect();
        tids.into_iter()
            .filter_map(|t| self.restore_thread(t).err())
            .filter(|e| !is_absent(e))
            .collect()
    }

    /// Restores every thread. Returns the failures (records kept); the state
    /// file is removed once every record is gone.
    pub fn restore_all(&mut self) -> Vec<ActError> {
        let tids = self.managed_tids();
        tids.into_iter()
            .filter_map(|t| self.restore_thread(t).err())
            .filter(|e| !matches!(e, ActError::Sched(s) if s.is_gone()))
            .collect()
    }
}

/// A refusal because the thread no longer exists at all.
fn is_absent(e: &ActError) -> bool {
    matches!(e, ActError::Sched(SchedError::Replaced { found: None, .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::{FakeCall, FakeScheduler, Policy};
    use crate::sys::{SCHED_FLAG_DL_OVERRUN, SCHED_FLAG_RESET_ON_FORK};
    use pvsched_policy::RtClass;

    const BOOST: ThreadSched = ThreadSched::Rt {
        class: RtClass::Rr,
        prio: 5,
    };

    fn me() -> (ThreadRef, HostFs) {
        let fs = HostFs::default();
        let pid = std::process::id() as i32;
        let tid = crate::sys::gettid();
        let starttime = fs.task_stat(pid, tid).unwrap().starttime;
        (
            ThreadRef {
                pid,
                tid,
                starttime,
            },
            fs,
        )
    }

    /// Polls `f` (a loop iteration) until it holds, for at most 10 s.
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// A fixture `/proc` holding one `stat` per thread, with its start time.
    struct FixtureProc {
        dir: tempfile::TempDir,
    }

    impl FixtureProc {
        fn new() -> Self {
            FixtureProc {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn fs(&self) -> HostFs {
            HostFs::new(self.dir.path(), self.dir.path().join("sys"))
        }

        fn set(&self, pid: i32, tid: Tid, starttime: u64) {
            let dir = self.fs().task_dir(pid, tid);
            std::fs::create_dir_all(&dir).unwrap();
            // Fields 3.. of a stat line; 19 nice, 22 start time, 39-41.
            let mut f: Vec<String> = (3..=52).map(|_| "0".to_owned()).collect();
            f[0] = "S".into();
            f[22 - 3] = starttime.to_string();
            std::fs::write(
                dir.join("stat"),
                format!("{tid} (CPU 0/KVM) {}\n", f.join(" ")),
            )
            .unwrap();
        }

        /// The thread exits: its `stat` reads nothing through a held
        /// descriptor (the kernel answers ESRCH) and its directory goes.
        fn remove(&self, pid: i32, tid: Tid) {
            let dir = self.fs().task_dir(pid, tid);
            std::fs::write(dir.join("stat"), "").unwrap();
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_thread_leaves_deadline_through_a_reservation_counted_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeScheduler::new();
        let (t, fs) = me();
        fake.add_thread(t.tid, SchedAttrs::default());
        let path = dir.path().join("state.json");
        let mut act = Actuator::new(Box::new(fake.clone()), fs, Some(path), vec![]).unwrap();
        let reservation = pvsched_policy::DeadlineReservation {
            runtime_ns: 1_000_000,
            period_ns: 10_000_000,
        };
        let boost = ThreadSched::Deadline(reservation);
        let _ = act.apply("vm", t, boost, None).unwrap();
        assert!(eventually(|| {
            act.apply_deferred();
            fake.attrs(t.tid) == Some(SchedAttrs::deadline(reservation))
        }));
        let drain_then_original = [
            FakeCall::SetAttrs(t.tid, SchedAttrs::deadline_drain()),
            FakeCall::SetAttrs(t.tid, SchedAttrs::default()),
        ];
        // Unboosted by a decision...
        let before = fake.calls().len();
        assert!(act.apply("vm", t, ThreadSched::Baseline, None).unwrap());
        assert_eq!(fake.calls()[before..], drain_then_original);
        // ...and restored at exit.
        assert!(act.apply("vm", t, boost, None).unwrap());
        let before = fake.calls().len();
        assert!(act.restore_all().is_empty());
        assert_eq!(fake.calls()[before..], drain_then_original);
        assert_eq!(fake.attrs(t.tid), Some(SchedAttrs::default()));
        // The drain reservation is one the kernel counts as no bandwidth.
        let [runtime, _, period] = SchedAttrs::deadline_drain().deadline;
        assert_eq!((runtime << 20) / period, 0);
        // Any other change is one call.
        let _ = act.apply("vm", t, BOOST, None).unwrap();
        assert!(eventually(|| {
            act.apply_deferred();
            fake.attrs(t.tid) == Some(SchedAttrs::rt(RtClass::Rr, 5))
        }));
        let before = fake.calls().len();
        assert!(act.apply("vm", t, ThreadSched::Baseline, None).unwrap());
        assert_eq!(fake.calls().len(), before + 1);
    }

    #[test]
    fn a_boost_waits_for_its_record_on_disk_and_a_restore_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        // The state file's directory cannot be created while `blocker` is a
        // regular file: the writer fails and retries.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let path = blocker.join("state.json");
        let fake = FakeScheduler::new();
        let (t, fs) = me();
        let nice = SchedAttrs {
            policy: Policy::Normal,
            nice: 3,
            ..Default::default()
        };
        fake.add_thread(t.tid, nice);
        let mut act =
            Actuator::new(Box::new(fake.clone()), fs, Some(path.clone()), vec![]).unwrap();
        // Deferred, not refused and not waited for: nothing changes yet.
        assert!(!act.apply("vm", t, BOOST, Some(&[1])).unwrap());
        assert_eq!(act.counters().deferred, 1);
        let mut writer_error = None;
        assert!(eventually(|| {
            let (failed, e) = act.apply_deferred();
            assert!(failed.is_empty());
            writer_error = writer_error.take().or(e);
            writer_error.is_some()
        }));
        assert!(writer_error.unwrap().contains("writing state file"));
        assert!(
            fake.calls().is_empty(),
            "changed before the record was on disk"
        );
        assert!(act.counters().state_write_errors > 0);
        assert!(!act.all_durable());

        // The disk recovers: the writer retries, and a later iteration applies.
        std::fs::remove_file(&blocker).unwrap();
        assert!(eventually(|| {
            act.apply_deferred();
            fake.attrs(t.tid) == Some(SchedAttrs::rt(RtClass::Rr, 5))
        }));
        let on_disk = read_state_file(&path).unwrap().unwrap();
        assert_eq!(on_disk.version, STATE_FILE_VERSION);
        assert_eq!(on_disk.threads[0].original, nice);
        assert_eq!(on_disk.threads[0].original_affinity, Some(vec![0, 1, 2, 3]));
        assert_eq!(fake.affinity(t.tid).unwrap(), vec![1]);
        assert!(!act.apply("vm", t, BOOST, Some(&[1])).unwrap());

        // The disk fails again: restores and later boosts (record already
        // on disk) never wait for it.
        let state_dir = path.parent().unwrap().to_owned();
        std::fs::rename(&state_dir, dir.path().join("moved")).unwrap();
        std::fs::write(&state_dir, "").unwrap();
        assert!(act.apply("vm", t, ThreadSched::Baseline, None).unwrap());
        assert_eq!(fake.attrs(t.tid).unwrap(), nice);
        assert_eq!(fake.affinity(t.tid).unwrap(), vec![0, 1, 2, 3]);
        assert!(act.apply("vm", t, BOOST, None).unwrap());
        assert_eq!(fake.attrs(t.tid).unwrap(), SchedAttrs::rt(RtClass::Rr, 5));
        assert!(act.restore_all().is_empty());
        assert_eq!(fake.attrs(t.tid).unwrap(), nice);
        assert_eq!(act.managed_count(), 0);
        // (Whether the empty set removes the file once the directory is put
        // back depends on where the writer's retry lands while it is moved:
        // a race of this test's own making, not asserted here.)
    }

    #[test]
    fn a_thread_whose_id_now_names_another_thread_is_never_touched() {
        let proc = FixtureProc::new();
        let state = tempfile::tempdir().unwrap();
        let (pid, reused, gone) = (4000, 4242, 4243);
        proc.set(pid, reused, 100);
        proc.set(pid, gone, 101);
        let fake = FakeScheduler::new();
        let original = SchedAttrs {
            nice: 1,
            ..Default::default()
        };
        fake.add_thread(reused, original);
        fake.add_thread(gone, original);
        let path = state.path().join("state.json");
        let mut act = Actuator::new(Box::new(fake.clone()), proc.fs(), Some(path), vec![]).unwrap();
        let t_reused = ThreadRef {
            pid,
            tid: reused,
            starttime: 100,
        };
        let t_gone = ThreadRef {
            pid,
            tid: gone,
            starttime: 101,
        };
        act.adopt("vm", &[t_reused, t_gone], false).unwrap();
        assert!(act.wait_durable(Duration::from_secs(10)));
        assert!(act.apply("vm", t_reused, BOOST, None).unwrap());
        assert!(act.apply("vm", t_gone, BOOST, None).unwrap());
        assert_eq!(fake.rt_threads(), vec![reused, gone]);

        // Both exit; the id `reused` is taken by a new thread with its own attributes.
        proc.set(pid, reused, 200);
        proc.remove(pid, gone);
        fake.remove_thread(gone);
        let newcomer = SchedAttrs {
            nice: 7,
            ..Default::default()
        };
        fake.add_thread(reused, newcomer);
        let calls = fake.calls().len();
        let err = act
            .apply("vm", t_reused, ThreadSched::Baseline, None)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ActError::Sched(SchedError::Replaced {
                    tid: 4242,
                    recorded: 100,
                    found: Some(200),
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("another thread"), "{err}");
        assert_eq!(fake.attrs(reused), Some(newcomer));
        assert_eq!(
            fake.calls().len(),
            calls,
            "a syscall reached the new thread"
        );
        // Its record is dropped; the gone thread is refused at restore.
        assert_eq!(act.managed_tids(), vec![gone]);
        assert!(act.restore_vm("vm").is_empty(), "a gone thread is no error");
        assert_eq!(fake.calls().len(), calls);
        assert_eq!(act.managed_count(), 0);
        assert_eq!(act.counters().identity_refusals, 2);
        // The new thread behind the id is a thread like any other.
        let t_new = ThreadRef {
            starttime: 200,
            ..t_reused
        };
        assert!(!act.apply("vm", t_new, BOOST, None).unwrap(), "deferred");
        assert!(eventually(|| {
            act.apply_deferred();
            fake.rt_threads() == vec![reused]
        }));
        assert!(act.restore_all().is_empty());
        assert_eq!(fake.attrs(reused), Some(newcomer));
    }

    #[test]
    fn a_real_thread_that_exited_is_refused_through_its_held_stat() {
        let fs = HostFs::default();
        let pid = std::process::id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            tx.send(crate::sys::gettid()).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let t = ThreadRef {
            pid,
            tid,
            starttime: fs.task_stat(pid, tid).unwrap().starttime,
        };
        let fake = FakeScheduler::new();
        fake.add_thread(tid, SchedAttrs::default());
        let mut act = Actuator::new(Box::new(fake.clone()), fs, None, vec![]).unwrap();
        act.adopt("vm", &[t], false).unwrap();
        assert!(act.apply("vm", t, BOOST, None).unwrap());
        done_tx.send(()).unwrap();
        worker.join().unwrap();
        // `join` returns when the thread clears its id, a moment before the
        // kernel has released it: wait until its /proc entry is gone.
        let task = std::path::PathBuf::from(format!("/proc/{pid}/task/{tid}"));
        for _ in 0..1000 {
            if !task.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The kernel keeps the id's number free for a while, but whatever
        // it names later, the held `stat` belongs to the exited thread.
        let calls = fake.calls().len();
        let err = act.apply("vm", t, ThreadSched::Baseline, None).unwrap_err();
        assert!(
            matches!(
                err,
                ActError::Sched(SchedError::Replaced { found: None, .. })
            ),
            "{err:?}"
        );
        assert_eq!(fake.calls().len(), calls);
        assert_eq!(act.managed_count(), 0);
    }

    #[test]
    fn originals_with_flags_and_sched_ext_round_trip_through_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (t, fs) = me();
        let ext = SchedAttrs {
            policy: Policy::Ext,
            nice: 2,
            flags: SCHED_FLAG_RESET_ON_FORK,
            ..Default::default()
        };
        let fake = FakeScheduler::new();
        fake.add_thread(t.tid, ext);
        let mut act = Actuator::new(
            Box::new(fake.clone()),
            fs.clone(),
            Some(path.clone()),
            vec![],
        )
        .unwrap();
        act.adopt("vm", &[t], false).unwrap();
        assert!(act.wait_durable(Duration::from_secs(10)));
        assert_eq!(
            read_state_file(&path).unwrap().unwrap().threads[0].original,
            ext
        );
        assert!(act.apply("vm", t, BOOST, None).unwrap());
        // A crash: the next daemon gives back exactly what was read.
        std::mem::forget(act);
        let (report, keep) = reconcile(&path, &fake, &fs).unwrap();
        assert_eq!(report.restored, vec![t.tid]);
        assert!(keep.is_empty());
        assert_eq!(fake.attrs(t.tid), Some(ext));

        // A SCHED_DEADLINE original with its flags, in a version 2 file.
        let dl = SchedAttrs {
            policy: Policy::Deadline,
            flags: SCHED_FLAG_RESET_ON_FORK | SCHED_FLAG_DL_OVERRUN,
            deadline: [200_000, 1_000_000, 1_000_000],
            ..Default::default()
        };
        let state = StateFile {
            version: STATE_FILE_VERSION,
            daemon_pid: 1,
            threads: vec![StateRecord {
                vm: "a".into(),
                thread: t,
                original: dl,
                original_affinity: None,
            }],
        };
        write_state_file(&path, &state).unwrap();
        assert_eq!(read_state_file(&path).unwrap().unwrap(), state);
        fake.add_thread(t.tid, SchedAttrs::rt(RtClass::Fifo, 9));
        reconcile(&path, &fake, &fs).unwrap();
        assert_eq!(fake.attrs(t.tid), Some(dl));

        // A version 1 file (no `flags`, `reset_on_fork` only) still reads.
        let v1 = format!(
            r#"{{"version":1,"daemon_pid":1,"threads":[{{"vm":"a","thread":{{"pid":{},"tid":{},"starttime":{}}},
            "original":{{"policy":"batch","priority":0,"nice":5,"reset_on_fork":true,"deadline":[0,0,0]}},
            "original_affinity":null}}]}}"#,
            t.pid, t.tid, t.starttime
        );
        std::fs::write(&path, v1).unwrap();
        fake.add_thread(t.tid, SchedAttrs::rt(RtClass::Fifo, 9));
        reconcile(&path, &fake, &fs).unwrap();
        assert_eq!(
            fake.attrs(t.tid),
            Some(SchedAttrs {
                policy: Policy::Batch,
                nice: 5,
                flags: SCHED_FLAG_RESET_ON_FORK,
                ..Default::default()
            })
        );
        // A newer format is left alone with a clear error.
        std::fs::write(&path, r#"{"version":3,"daemon_pid":1,"threads":[]}"#).unwrap();
        let err = reconcile(&path, &fake, &fs).unwrap_err().to_string();
        assert!(err.contains("format version 3"), "{err}");
        assert!(path.exists());
    }

    #[test]
    fn reconcile_restores_live_threads_and_skips_reused_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (t, fs) = me();
        let fake = FakeScheduler::new();
        fake.add_thread(t.tid, SchedAttrs::rt(RtClass::Fifo, 9));
        fake.add_thread(t.tid + 100_000, SchedAttrs::rt(RtClass::Fifo, 9));
        let stale = ThreadRef {
            starttime: t.starttime + 1,
            ..t
        };
        let state = StateFile {
            version: 1,
            daemon_pid: 1,
            threads: vec![
                StateRecord {
                    vm: "a".into(),
                    thread: t,
                    original: SchedAttrs::default(),
                    original_affinity: None,
                },
                StateRecord {
                    vm: "a".into(),
                    thread: ThreadRef {
                        tid: t.tid + 100_000,
                        ..stale
                    },
                    original: SchedAttrs::default(),
                    original_affinity: None,
                },
            ],
        };
        write_state_file(&path, &state).unwrap();
        let (report, keep) = reconcile(&path, &fake, &fs).unwrap();
        assert_eq!(report.restored, vec![t.tid]);
        assert_eq!(report.gone, vec![t.tid + 100_000]);
        assert!(keep.is_empty());
        assert_eq!(
            fake.calls(),
            vec![FakeCall::SetAttrs(t.tid, SchedAttrs::default())]
        );
        assert!(!path.exists());
        // A corrupt state file is an error, not a panic.
        std::fs::write(&path, "{not json").unwrap();
        assert!(reconcile(&path, &fake, &fs).is_err());
    }
}
