//! KVM's host halt-poll parameters, tuned from host load (seed 002).
//!
//! [`KvmParams`] reads and writes `module/kvm/parameters/halt_poll_ns`,
//! `_grow`, `_grow_start` and `_shrink` under a `/sys` root, checking what
//! it reads. [`HaltPollTuner`] turns each round of KVM statistics
//! (`query-stats`) into per-interval deltas, runs the pure controller
//! ([`pvsched_policy::haltpoll::decide`]) on them and the host load, and in
//! `tune` mode writes the decision. Before its first write it records the
//! original values in an undo file beside the daemon's state file (made
//! durable first), so that [`HaltPollTuner::restore`] at exit, or
//! [`restore_from_undo_file`] at the next start or `--restore-only` after a
//! crash, puts back exactly what was there.
//!
//! These are host-wide parameters: KVM applies them to every VM on the host,
//! including ones the daemon does not manage. A per-VM window
//! (`KVM_CAP_HALT_POLL`) can only be set by the VMM (see docs/halt-polling.md).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use pvsched_policy::haltpoll::{
    decide, HaltPollBounds, HaltPollDecision, HaltPollInput, KvmHaltPoll, PollDelta,
};
use serde::{Deserialize, Serialize};

use crate::qmp::{KvmStats, KvmVcpuStats};

/// What the daemon does with halt-polling (`[daemon] halt_poll`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaltPollMode {
    /// Nothing: the parameters are not read.
    #[default]
    Off,
    /// Run the controller and export its decision; write nothing.
    Observe,
    /// Run the controller and write its decision to KVM's parameters.
    Tune,
}

impl std::fmt::Display for HaltPollMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HaltPollMode::Off => "off",
            HaltPollMode::Observe => "observe",
            HaltPollMode::Tune => "tune",
        })
    }
}

/// The parameter files, in the order they are written.
pub const PARAM_NAMES: [&str; 4] = [
    "halt_poll_ns",
    "halt_poll_ns_grow",
    "halt_poll_ns_grow_start",
    "halt_poll_ns_shrink",
];

/// Longest text accepted from a parameter file (a u32 and a newline).
const MAX_PARAM_LEN: u64 = 32;

/// A parameter that could not be read, written or restored.
#[derive(Debug, thiserror::Error)]
pub enum HaltPollError {
    /// The parameter file does not exist (KVM not loaded, or too old).
    #[error("{} does not exist (is the kvm module loaded?)", path.display())]
    Missing {
        /// File.
        path: PathBuf,
    },
    /// The file holds something other than a decimal u32.
    #[error("{} holds {text:?}, not a number", path.display())]
    NotANumber {
        /// File.
        path: PathBuf,
        /// What it holds (at most 32 bytes).
        text: String,
    },
    /// This kernel exposes the parameter read-only (declared 0444): it
    /// cannot be changed at run time.
    #[error("{} is read-only on this kernel (halt_poll = \"observe\" works, \"tune\" cannot)", path.display())]
    ReadOnly {
        /// File.
        path: PathBuf,
    },
    /// Reading or writing failed.
    #[error("{what} {}", path.display())]
    Io {
        /// `reading`, `writing`, ….
        what: &'static str,
        /// File.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A value read back after a write is not the one written.
    #[error("{} reads {found} after writing {wrote}", path.display())]
    NotApplied {
        /// File.
        path: PathBuf,
        /// Written.
        wrote: u32,
        /// Read back.
        found: u32,
    },
    /// The undo file is not one this daemon wrote.
    #[error("undo file {}: {why}", path.display())]
    BadUndoFile {
        /// File.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// The four parameters under one `/sys` root.
#[derive(Clone, Debug)]
pub struct KvmParams {
    dir: PathBuf,
}

impl KvmParams {
    /// The parameters under `sys_root` (`/sys` on a real host).
    pub fn under(sys_root: &Path) -> Self {
        KvmParams {
            dir: sys_root.join("module/kvm/parameters"),
        }
    }

    /// The path of parameter `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_one(&self, name: &str) -> Result<u32, HaltPollError> {
        use std::io::Read;
        let path = self.path(name);
        let file = std::fs::File::open(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                HaltPollError::Missing { path: path.clone() }
            } else {
                HaltPollError::Io {
                    what: "reading",
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let mut text = String::new();
        file.take(MAX_PARAM_LEN + 1)
            .read_to_string(&mut text)
            .map_err(|source| HaltPollError::Io {
                what: "reading",
                path: path.clone(),
                source,
            })?;
        let trimmed = text.strip_suffix('\n').unwrap_or(&text);
        if text.len() as u64 > MAX_PARAM_LEN
            || trimmed.is_empty()
            || !trimmed.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(HaltPollError::NotANumber {
                path,
                text: text.chars().take(MAX_PARAM_LEN as usize).collect(),
            });
        }
        trimmed
            .parse()
            .map_err(|_| HaltPollError::NotANumber { path, text })
    }

    /// The current values, each checked (present, a decimal u32).
    pub fn read(&self) -> Result<KvmHaltPoll, HaltPollError> {
        Ok(KvmHaltPoll {
            halt_poll_ns: self.read_one(PARAM_NAMES[0])?,
            grow: self.read_one(PARAM_NAMES[1])?,
            grow_start_ns: self.read_one(PARAM_NAMES[2])?,
            shrink: self.read_one(PARAM_NAMES[3])?,
        })
    }

    fn open_for_write(&self, name: &str, truncate: bool) -> Result<std::fs::File, HaltPollError> {
        let path = self.path(name);
        // No O_CREAT: a parameter that is not there is not made. O_TRUNC
        // as a shell's `>` when writing (sysfs ignores it; a fixture file
        // needs it), not when only checking.
        OpenOptions::new()
            .write(true)
            .truncate(truncate)
            .open(&path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => HaltPollError::Missing { path },
                // sysfs refuses to open a 0444 parameter for writing even
                // for root (the module declared it read-only).
                std::io::ErrorKind::PermissionDenied => HaltPollError::ReadOnly { path },
                _ => HaltPollError::Io {
                    what: "opening",
                    path,
                    source,
                },
            })
    }

    /// Checks that every parameter can be opened for writing, writing nothing.
    pub fn check_writable(&self) -> Result<(), HaltPollError> {
        for name in PARAM_NAMES {
            self.open_for_write(name, false)?;
        }
        Ok(())
    }

    /// Writes the parameters that differ from `from` (all when `from` is
    /// `None`), each read back to check it took.
    pub fn write(&self, p: &KvmHaltPoll, from: Option<&KvmHaltPoll>) -> Result<(), HaltPollError> {
        let values = |p: &KvmHaltPoll| [p.halt_poll_ns, p.grow, p.grow_start_ns, p.shrink];
        let new = values(p);
        let old = from.map(values);
        for (i, name) in PARAM_NAMES.iter().enumerate() {
            if old.is_some_and(|o| o[i] == new[i]) {
                continue;
            }
            let path = self.path(name);
            let mut file = self.open_for_write(name, true)?;
            file.write_all(format!("{}\n", new[i]).as_bytes())
                .map_err(|source| HaltPollError::Io {
                    what: "writing",
                    path: path.clone(),
                    source,
                })?;
            drop(file);
            let found = self.read_one(name)?;
            if found != new[i] {
                return Err(HaltPollError::NotApplied {
                    path,
                    wrote: new[i],
                    found,
                });
            }
        }
        Ok(())
    }
}

/// The undo file of a state file: `<state_file>.haltpoll`.
pub fn undo_path(state_file: &Path) -> PathBuf {
    let mut p = state_file.as_os_str().to_owned();
    p.push(".haltpoll");
    PathBuf::from(p)
}

/// The undo file's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UndoRecord {
    /// The values found before the first write.
    original: KvmHaltPoll,
}

fn write_undo(path: &Path, original: &KvmHaltPoll) -> Result<(), HaltPollError> {
    let io = |what, source| HaltPollError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_string(&UndoRecord {
        original: *original,
    })
    .expect("plain struct serialises");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    let tmp = path.with_extension("haltpoll.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
    f.write_all(text.as_bytes()).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming onto", e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn read_undo(path: &Path) -> Result<Option<KvmHaltPoll>, HaltPollError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(HaltPollError::Io {
                what: "reading",
                path: path.to_owned(),
                source,
            })
        }
    };
    let bad = |why: String| HaltPollError::BadUndoFile {
        path: path.to_owned(),
        why,
    };
    if text.len() > 4096 {
        return Err(bad(format!("{} bytes", text.len())));
    }
    let rec: UndoRecord = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    Ok(Some(rec.original))
}

/// Puts back the values an undo file recorded (a daemon that died after
/// writing), then removes the file. `Ok(None)`: there was none.
pub fn restore_from_undo_file(
    undo: &Path,
    params: &KvmParams,
) -> Result<Option<KvmHaltPoll>, HaltPollError> {
    let Some(original) = read_undo(undo)? else {
        return Ok(None);
    };
    let now = params.read()?;
    params.write(&original, Some(&now))?;
    std::fs::remove_file(undo).map_err(|source| HaltPollError::Io {
        what: "removing",
        path: undo.to_owned(),
        source,
    })?;
    Ok(Some(original))
}

/// Cumulative polling counters of one VM (sums over its vCPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollTotals {
    /// The counters, summed.
    pub sum: PollDelta,
    /// vCPUs that reported.
    pub vcpus: u32,
}

impl PollTotals {
    /// Sums of a VM's per-vCPU statistics (a counter this kernel does not
    /// report counts 0).
    pub fn of(stats: &KvmStats) -> Self {
        let mut t = PollTotals::default();
        for v in stats.vcpus.values() {
            t.sum = t.sum.add(&vcpu_totals(v));
            t.vcpus += 1;
        }
        t
    }

    /// What happened since `before`; `None` when a counter went backwards
    /// (a new process, or vCPUs that went away): a new baseline.
    pub fn since(&self, before: &PollTotals) -> Option<PollDelta> {
        let (a, b) = (&self.sum, &before.sum);
        let d = |x: u64, y: u64| x.checked_sub(y);
        Some(PollDelta {
            success_ns: d(a.success_ns, b.success_ns)?,
            fail_ns: d(a.fail_ns, b.fail_ns)?,
            wait_ns: d(a.wait_ns, b.wait_ns)?,
            successful: d(a.successful, b.successful)?,
            attempted: d(a.attempted, b.attempted)?,
            invalid: d(a.invalid, b.invalid)?,
            preemptions: d(a.preemptions, b.preemptions)?,
        })
    }
}

fn vcpu_totals(v: &KvmVcpuStats) -> PollDelta {
    let z = |x: Option<u64>| x.unwrap_or(0);
    PollDelta {
        success_ns: z(v.halt_poll_success_ns),
        fail_ns: z(v.halt_poll_fail_ns),
        wait_ns: z(v.halt_wait_ns),
        successful: z(v.halt_successful_poll),
        attempted: z(v.halt_attempted_poll),
        invalid: z(v.halt_poll_invalid),
        preemptions: z(v.preemption_reported).saturating_add(z(v.preemption_other)),
    }
}

/// Contention as the controller judges it (shared with the simulator).
pub use pvsched_policy::haltpoll::{contended, CONTENDED_PREEMPTIONS_PER_S};

/// One VM's statistics for a round: name, QEMU pid, its start time, the reply.
pub type VmKvmStats = (String, i32, u64, KvmStats);

/// What the tuner did last (status and metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltPollStatus {
    /// Mode.
    pub mode: HaltPollMode,
    /// Rounds run.
    pub rounds: u64,
    /// Writes of new parameters.
    pub writes: u64,
    /// Parameters read at the last round.
    pub current: Option<KvmHaltPoll>,
    /// Values recorded before the first write (restored at exit).
    pub original: Option<KvmHaltPoll>,
    /// The last decision.
    pub decision: Option<HaltPollDecision>,
    /// The input of the last decision.
    pub input: Option<HaltPollInput>,
    /// Whether the last decision was written.
    pub applied: bool,
    /// Rounds per decision reason, by reason name.
    pub reasons: BTreeMap<String, u64>,
    /// The last error, if the last round failed.
    pub last_error: Option<String>,
}

/// The halt-poll controller's host side: statistics in, parameters out.
pub struct HaltPollTuner {
    params: KvmParams,
    mode: HaltPollMode,
    bounds: HaltPollBounds,
    undo: PathBuf,
    prev: BTreeMap<(String, i32, u64), PollTotals>,
    last_round_ns: Option<u64>,
    status: HaltPollStatus,
}

impl HaltPollTuner {
    /// A tuner for the parameters under `sys_root`, its undo file at
    /// `undo`. Reads the parameters once (a missing or garbled one is an
    /// error); in `tune` mode, first puts back what a previous daemon's
    /// undo file recorded, then checks every parameter can be written.
    pub fn new(
        sys_root: &Path,
        mode: HaltPollMode,
        bounds: HaltPollBounds,
        undo: PathBuf,
    ) -> Result<Self, HaltPollError> {
        let params = KvmParams::under(sys_root);
        if mode == HaltPollMode::Tune {
            restore_from_undo_file(&undo, &params)?;
        }
        let current = params.read()?;
        if mode == HaltPollMode::Tune {
            params.check_writable()?;
        }
        Ok(HaltPollTuner {
            params,
            mode,
            bounds,
            undo,
            prev: BTreeMap::new(),
            last_round_ns: None,
            status: HaltPollStatus {
                mode,
                current: Some(current),
                ..Default::default()
            },
        })
    }

    /// The last status.
    pub fn status(&self) -> &HaltPollStatus {
        &self.status
    }

    /// One round at `now_ns` with the host's mean pCPU load and the KVM
    /// statistics just read: deltas since the last round (a VM seen for the
    /// first time, or restarted, only sets a baseline), the controller's
    /// decision, and in `tune` mode its write.
    pub fn round(
        &mut self,
        now_ns: u64,
        load_permille: u32,
        stats: &[VmKvmStats],
    ) -> &HaltPollStatus {
        let interval = self
            .last_round_ns
            .map_or(0, |last| now_ns.saturating_sub(last));
        self.last_round_ns = Some(now_ns);
        let mut polls = PollDelta::default();
        let mut vcpus = 0;
        let mut next = BTreeMap::new();
        for (name, pid, start, s) in stats {
            let key = (name.clone(), *pid, *start);
            let totals = PollTotals::of(s);
            if let Some(d) = self.prev.get(&key).and_then(|p| totals.since(p)) {
                polls = polls.add(&d);
                vcpus += totals.vcpus;
            }
            next.insert(key, totals);
        }
        self.prev = next;
        self.status.rounds += 1;
        let current = match self.params.read() {
            Ok(c) => c,
            Err(e) => {
                self.status.last_error = Some(e.to_string());
                self.status.applied = false;
                return &self.status;
            }
        };
        let input = HaltPollInput::of_interval(load_permille, polls, vcpus, interval);
        let decision = decide(&current, &input, &self.bounds);
        *self
            .status
            .reasons
            .entry(decision.reason.name().to_owned())
            .or_default() += 1;
        self.status.current = Some(current);
        self.status.input = Some(input);
        self.status.decision = Some(decision);
        self.status.applied = false;
        self.status.last_error = None;
        if self.mode == HaltPollMode::Tune && decision.params != current {
            match self.apply(&decision.params, &current) {
                Ok(()) => {
                    self.status.applied = true;
                    self.status.writes += 1;
                    self.status.current = Some(decision.params);
                }
                Err(e) => self.status.last_error = Some(e.to_string()),
            }
        }
        &self.status
    }

    fn apply(&mut self, p: &KvmHaltPoll, current: &KvmHaltPoll) -> Result<(), HaltPollError> {
        if self.status.original.is_none() {
            // Durable before the first write: a crash after it leaves a
            // record the next start (or --restore-only) restores from.
            write_undo(&self.undo, current)?;
            self.status.original = Some(*current);
        }
        self.params.write(p, Some(current))
    }

    /// Puts back the values found before the first write and removes the
    /// undo file. `Ok(None)`: nothing was written.
    pub fn restore(&mut self) -> Result<Option<KvmHaltPoll>, HaltPollError> {
        let Some(original) = self.status.original else {
            return Ok(None);
        };
        let now = self.params.read()?;
        self.params.write(&original, Some(&now))?;
        match std::fs::remove_file(&self.undo) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(HaltPollError::Io {
                    what: "removing",
                    path: self.undo.clone(),
                    source,
                })
            }
        }
        self.status.original = None;
        self.status.current = Some(original);
        Ok(Some(original))
    }
}

impl Drop for HaltPollTuner {
    fn drop(&mut self) {
        // A panic or an early return must not leave the host's polling changed.
        if let Err(e) = self.restore() {
            eprintln!("pvsched: halt-poll parameters not restored: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvsched_policy::haltpoll::HaltPollReason;

    fn tree(values: [&str; 4]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("module/kvm/parameters");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, v) in PARAM_NAMES.iter().zip(values) {
            std::fs::write(dir.join(name), v).unwrap();
        }
        root
    }

    const DEFAULTS: [&str; 4] = ["200000\n", "2\n", "10000\n", "2\n"];

    fn read_all(root: &Path) -> Vec<String> {
        PARAM_NAMES
            .iter()
            .map(|n| std::fs::read_to_string(KvmParams::under(root).path(n)).unwrap())
            .collect()
    }

    fn fixture_stats() -> KvmStats {
        let load = |name: &str| {
            let path = format!(
                "{}/tests/fixtures/qemu-7.2/{name}.json",
                env!("CARGO_MANIFEST_DIR")
            );
            let line = std::fs::read(&path).unwrap();
            let msg = crate::qmp::parse_message(&line, "fixture")
                .unwrap()
                .unwrap();
            msg["return"].clone()
        };
        let paths = crate::qmp::parse_qom_paths(&load("q35-kvm-memfd-1g.query-cpus-fast")).unwrap();
        crate::qmp::parse_kvm_stats(
            &load("q35-kvm-memfd-1g.query-stats-vcpu"),
            &load("q35-kvm-memfd-1g.query-stats-vm"),
            &paths,
        )
        .unwrap()
    }

    /// The recorded reply with every vCPU's counters advanced as a guest
    /// that polls with `success` of `attempted` polls would.
    fn advanced(base: &KvmStats, attempted: u64, success: u64, preempted: u64) -> KvmStats {
        let mut s = base.clone();
        for v in s.vcpus.values_mut() {
            let add = |x: &mut Option<u64>, n: u64| *x = Some(x.unwrap_or(0) + n);
            add(&mut v.halt_attempted_poll, attempted);
            add(&mut v.halt_successful_poll, success);
            add(&mut v.halt_poll_success_ns, success * 5_000);
            add(&mut v.halt_poll_fail_ns, (attempted - success) * 5_000);
            add(&mut v.halt_wait_ns, attempted * 100_000);
            add(&mut v.preemption_reported, preempted);
        }
        s
    }

    #[test]
    fn parameters_are_read_and_garbage_or_absence_is_a_clear_error() {
        let root = tree(DEFAULTS);
        let p = KvmParams::under(root.path());
        assert_eq!(
            p.read().unwrap(),
            KvmHaltPoll {
                halt_poll_ns: 200_000,
                grow: 2,
                grow_start_ns: 10_000,
                shrink: 2
            }
        );
        for bad in ["-1\n", "abc\n", "\n", "99999999999\n", "1 2\n", "0x10\n"] {
            let root = tree([bad, "2\n", "10000\n", "2\n"]);
            let e = KvmParams::under(root.path()).read().unwrap_err();
            assert!(
                matches!(e, HaltPollError::NotANumber { .. }),
                "{bad:?}: {e}"
            );
        }
        let root = tree(DEFAULTS);
        std::fs::remove_file(KvmParams::under(root.path()).path("halt_poll_ns_shrink")).unwrap();
        let e = KvmParams::under(root.path()).read().unwrap_err();
        assert!(
            e.to_string().contains("halt_poll_ns_shrink does not exist"),
            "{e}"
        );
        // A tuner on a tree without the parameter does not start.
        assert!(HaltPollTuner::new(
            root.path(),
            HaltPollMode::Observe,
            HaltPollBounds::default(),
            root.path().join("undo")
        )
        .is_err());
    }

    #[test]
    fn tune_writes_within_bounds_and_restore_puts_back_the_exact_text() {
        let root = tree(["200000\n", "2\n", "10000\n", "2\n"]);
        let undo = root.path().join("state/hostd.state.haltpoll");
        let before = read_all(root.path());
        let base = fixture_stats();
        let bounds = HaltPollBounds::default();
        let mut t =
            HaltPollTuner::new(root.path(), HaltPollMode::Tune, bounds, undo.clone()).unwrap();
        let vm = |s: KvmStats| vec![("vm".to_owned(), 10, 20, s)];
        // The first round sets the baseline; nothing polled yet, an idle
        // host: hold.
        let s = t.round(0, 0, &vm(base.clone()));
        assert_eq!(s.decision.unwrap().reason, HaltPollReason::Hold);
        assert!(!s.applied && !undo.exists());
        // Polls fail on a quiet host: the maximum halves, and is written.
        let s = t.round(100_000_000, 100, &vm(advanced(&base, 100, 10, 0)));
        let d = s.decision.unwrap_or_else(|| panic!("{s:?}"));
        assert_eq!(d.reason, HaltPollReason::PollsFail);
        assert!(s.applied, "{s:?}");
        assert_eq!(read_all(root.path())[0], "100000\n");
        assert_eq!(read_all(root.path())[3], "0\n");
        assert!(undo.exists());
        // Contended vCPUs (1000 preemptions per vCPU in 100 ms): polling stops.
        let s = t.round(
            200_000_000,
            100,
            &vm(advanced(&advanced(&base, 100, 10, 0), 0, 0, 1000)),
        );
        assert_eq!(s.decision.unwrap().reason, HaltPollReason::Contended);
        assert_eq!(read_all(root.path())[0], "0\n");
        assert_eq!(t.status().writes, 2);
        // Exact undo: the original text, the undo file gone.
        assert!(t.restore().unwrap().is_some());
        assert_eq!(read_all(root.path()), before);
        assert!(!undo.exists());
        assert!(t.restore().unwrap().is_none());
    }

    #[test]
    fn observe_writes_nothing_and_a_restarted_vm_is_a_new_baseline() {
        let root = tree(DEFAULTS);
        let before = read_all(root.path());
        let base = fixture_stats();
        let mut t = HaltPollTuner::new(
            root.path(),
            HaltPollMode::Observe,
            HaltPollBounds::default(),
            root.path().join("undo"),
        )
        .unwrap();
        t.round(0, 0, &[("vm".into(), 10, 20, advanced(&base, 500, 10, 0))]);
        // Same name, new process with counters from zero: no negative delta.
        let s = t.round(1_000_000, 0, &[("vm".into(), 11, 30, base.clone())]);
        assert_eq!(s.input.unwrap().polls, PollDelta::default());
        let s = t.round(
            2_000_000,
            0,
            &[("vm".into(), 11, 30, advanced(&base, 100, 5, 0))],
        );
        assert_eq!(s.decision.unwrap().reason, HaltPollReason::PollsFail);
        assert!(!s.applied);
        assert_eq!(s.decision.unwrap().params.halt_poll_ns, 100_000);
        drop(t);
        assert_eq!(read_all(root.path()), before);
        assert!(!root.path().join("undo").exists());
    }

    #[test]
    fn a_crash_leaves_an_undo_file_the_next_start_restores() {
        let root = tree(DEFAULTS);
        let before = read_all(root.path());
        let undo = root.path().join("hostd.state.haltpoll");
        let base = fixture_stats();
        let mut t = HaltPollTuner::new(
            root.path(),
            HaltPollMode::Tune,
            HaltPollBounds::default(),
            undo.clone(),
        )
        .unwrap();
        t.round(0, 0, &[("vm".into(), 1, 1, base.clone())]);
        t.round(
            1_000_000,
            0,
            &[("vm".into(), 1, 1, advanced(&base, 100, 1, 0))],
        );
        assert_ne!(read_all(root.path()), before);
        // Dying without the Drop (kill -9).
        std::mem::forget(t);
        let params = KvmParams::under(root.path());
        assert!(restore_from_undo_file(&undo, &params).unwrap().is_some());
        assert_eq!(read_all(root.path()), before);
        assert!(restore_from_undo_file(&undo, &params).unwrap().is_none());
        // A garbled undo file is an error and changes nothing.
        std::fs::write(&undo, "{\"original\": 5}").unwrap();
        assert!(matches!(
            restore_from_undo_file(&undo, &params),
            Err(HaltPollError::BadUndoFile { .. })
        ));
        assert_eq!(read_all(root.path()), before);
    }

    #[test]
    fn contention_is_preemptions_per_vcpu_and_second() {
        assert!(!contended(0, 2, 100_000_000));
        assert!(!contended(19, 2, 100_000_000));
        assert!(contended(20, 2, 100_000_000));
        assert!(!contended(u64::MAX, 0, 1));
        assert!(!contended(5, 1, 0));
    }
}
