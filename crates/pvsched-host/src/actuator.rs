//! Applying decisions to threads, and putting every thread back.
//!
//! A thread's original attributes (and affinity, when the daemon changes
//! it) are read and written to the state file (temp file + fsync + rename)
//! *before* the first change. The record stays while the VM runs, so later
//! boosts and unboosts cost no file write. On exit every record is restored;
//! after a crash the next start reconciles the file, touching a thread only
//! if its start time (`/proc/<pid>/task/<tid>/stat` field 22) still matches.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use pvsched_policy::ThreadSched;
use serde::{Deserialize, Serialize};

use crate::procfs::HostFs;
use crate::sched::{SchedAttrs, SchedError, ThreadScheduler, Tid};

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

/// The state file's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// Format version (1).
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
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ActError::StateRead {
            path: path.to_owned(),
            detail: e.to_string(),
        })
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
        match fs.task_stat(t.pid, t.tid) {
            Ok(stat) if stat.starttime == t.starttime => {}
            _ => {
                report.gone.push(t.tid);
                continue;
            }
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
    if !check_first || sched.get_attrs(tid)? != rec.original {
        sched.set_attrs(tid, &rec.original)?;
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

#[derive(Debug)]
struct Managed {
    rec: StateRecord,
    sched: ThreadSched,
    /// Affinity currently set by us (`None`: the original).
    affinity: Option<Vec<u32>>,
    /// Restored at exit even when believed at baseline (leftover of a crash).
    dirty: bool,
}

/// Applies decisions and keeps the state file current.
pub struct Actuator {
    sched: Box<dyn ThreadScheduler>,
    state_path: Option<PathBuf>,
    managed: BTreeMap<Tid, Managed>,
}

impl Actuator {
    /// An actuator; `leftovers` are records a reconciliation could not restore.
    pub fn new(
        sched: Box<dyn ThreadScheduler>,
        state_path: Option<PathBuf>,
        leftovers: Vec<StateRecord>,
    ) -> Self {
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
                    },
                )
            })
            .collect();
        Actuator {
            sched,
            state_path,
            managed,
        }
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

    fn persist(&self) -> Result<(), ActError> {
        let Some(path) = &self.state_path else {
            return Ok(());
        };
        if self.managed.is_empty() {
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        let state = StateFile {
            version: 1,
            daemon_pid: std::process::id(),
            threads: self.managed.values().map(|m| m.rec.clone()).collect(),
        };
        write_state_file(path, &state)
    }

    /// Records the original attributes (and affinity, when `with_affinity`)
    /// of threads the daemon may change later, with one state-file write,
    /// so the apply path never waits for the disk. Threads already recorded
    /// or gone are skipped.
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
                },
            );
            added = true;
        }
        if added {
            self.persist()?;
        }
        Ok(())
    }

    /// Brings a thread to `sched` and `affinity` (`None`: its original
    /// affinity). Returns whether a syscall changed anything.
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
            self.managed.remove(&tid);
            self.persist()?;
        }
        let (cur_sched, cur_aff) = match self.managed.get(&tid) {
            Some(m) => (m.sched, m.affinity.clone()),
            None => (ThreadSched::Baseline, None),
        };
        let want_aff = affinity.map(<[u32]>::to_vec);
        if cur_sched == sched && cur_aff == want_aff {
            return Ok(false);
        }
        // Record originals before the first change of each kind.
        let mut record_changed = false;
        if let Some(m) = self.managed.get_mut(&tid) {
            if m.sched == ThreadSched::Baseline && m.affinity.is_none() && !m.dirty {
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
                },
            );
            record_changed = true;
        }
        if want_aff.is_some() && self.managed[&tid].rec.original_affinity.is_none() {
            let aff = match self.sched.get_affinity(tid) {
                Ok(a) => a,
                Err(e) => {
                    if record_changed {
                        self.managed.remove(&tid);
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
            if let Err(e) = self.persist() {
                self.managed.remove(&tid);
                return Err(e);
            }
        }
        let Some(m) = self.managed.get_mut(&tid) else {
            return Ok(false);
        };
        if m.sched != sched {
            let attrs = SchedAttrs::for_decision(sched, &m.rec.original);
            self.sched.set_attrs(tid, &attrs)?;
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

    /// Restores one thread and drops its record.
    pub fn restore_thread(&mut self, tid: Tid) -> Result<(), ActError> {
        let Some(m) = self.managed.remove(&tid) else {
            return Ok(());
        };
        let result = if m.dirty || m.sched != ThreadSched::Baseline || m.affinity.is_some() {
            restore_record(self.sched.as_ref(), &m.rec, false)
        } else {
            Ok(false)
        };
        match result {
            Ok(_) => {}
            Err(e) if e.is_gone() => {}
            Err(e) => {
                self.managed.insert(tid, m);
                return Err(e.into());
            }
        }
        self.persist()
    }

    /// Restores every thread of a VM. Returns the errors (records kept).
    pub fn restore_vm(&mut self, vm: &str) -> Vec<ActError> {
        let tids: Vec<Tid> = self
            .managed
            .iter()
            .filter(|(_, m)| m.rec.vm == vm)
            .map(|(t, _)| *t)
            .collect();
        tids.into_iter()
            .filter_map(|t| self.restore_thread(t).err())
            .collect()
    }

    /// Restores every thread; the state file is removed when all succeeded.
    pub fn restore_all(&mut self) -> Vec<ActError> {
        let tids = self.managed_tids();
        tids.into_iter()
            .filter_map(|t| self.restore_thread(t).err())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::{FakeCall, FakeScheduler, Policy};
    use pvsched_policy::RtClass;

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

    #[test]
    fn the_original_is_on_disk_before_the_first_change_and_restored_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        let fake = FakeScheduler::new();
        let (t, _) = me();
        let nice = SchedAttrs {
            policy: Policy::Normal,
            nice: 3,
            ..Default::default()
        };
        fake.add_thread(t.tid, nice);
        let mut act = Actuator::new(Box::new(fake.clone()), Some(path.clone()), vec![]);
        let boost = ThreadSched::Rt {
            class: RtClass::Rr,
            prio: 5,
        };
        // Refuse the change: the record must already be on disk.
        fake.deny_changes(true);
        assert!(act.apply("vm", t, boost, Some(&[1])).is_err());
        let on_disk = read_state_file(&path).unwrap().unwrap();
        assert_eq!(on_disk.threads[0].original, nice);
        assert_eq!(on_disk.threads[0].original_affinity, Some(vec![0, 1, 2, 3]));
        fake.deny_changes(false);
        assert!(act.apply("vm", t, boost, Some(&[1])).unwrap());
        assert!(!act.apply("vm", t, boost, Some(&[1])).unwrap());
        assert_eq!(fake.attrs(t.tid).unwrap(), SchedAttrs::rt(RtClass::Rr, 5));
        assert_eq!(fake.affinity(t.tid).unwrap(), vec![1]);
        assert!(act.apply("vm", t, ThreadSched::Baseline, None).unwrap());
        assert_eq!(fake.attrs(t.tid).unwrap(), nice);
        assert_eq!(fake.affinity(t.tid).unwrap(), vec![0, 1, 2, 3]);
        // The record stays while the VM runs; restore_all removes it and the file.
        assert_eq!(act.managed_count(), 1);
        act.apply("vm", t, boost, None).unwrap();
        assert!(act.restore_all().is_empty());
        assert_eq!(fake.attrs(t.tid).unwrap(), nice);
        assert!(!path.exists());
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
