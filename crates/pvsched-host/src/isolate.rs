//! Reboot-free isolation of real-time CPUs: an isolated cpuset partition,
//! every movable task, IRQ and unbound workqueue steered to the
//! housekeeping CPUs, and optionally one VM's vCPU threads pinned one per
//! isolated CPU at `SCHED_FIFO`.
//!
//! The shape is plan, apply, undo: [`plan`] reads the current values and
//! lists every change (old value and new value) without changing anything;
//! [`apply`] writes a state file first, makes the changes in order, re-reading
//! each old value just before it changes it, and rolls back what it did if
//! a change fails; [`undo`] restores every recorded value from the state
//! file, in reverse order, and removes the child cpusets and the file.
//!
//! Two cgroup layouts are planned:
//! - cgroup v1 `cpuset` (the path tested on real hosts here): an exclusive
//!   child `pvsched-isolated` with the isolated CPUs and load balancing off,
//!   a child `pvsched-housekeeping` with the rest, and
//!   `cpuset.sched_load_balance = 0` on the root (while the root balances,
//!   its children's setting does nothing). Tasks are moved one by one
//!   (`tasks`), which resets their affinity to the cpuset's CPUs, so each
//!   task's affinity is recorded and put back with `sched_setaffinity`.
//! - cgroup v2 with the `cpuset` controller: a child with
//!   `cpuset.cpus.partition = isolated`; the kernel takes its CPUs away from
//!   every other cgroup, narrowing affinities, which are recorded likewise.
//!   Placing a VM's threads needs threaded cgroups there and is refused.
//!
//! What cannot move is reported, never hidden: per-CPU kernel threads
//! (`PF_NO_SETAFFINITY`: the kernel refuses to attach them, `EINVAL`) and
//! managed IRQs (their affinity write fails with `EIO`).
//!
//! `/proc` and `/sys` are the roots of a [`HostFs`], so the unit tests run on
//! fixture trees; scheduling calls go through [`ThreadScheduler`].

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::HostConfig;
use crate::procfs::{parse_cpu_list, HostFs};
use crate::sched::{Policy, SchedAttrs, SchedError, ThreadScheduler, Tid};

/// Name of the child cpuset holding the isolated CPUs.
pub const ISOLATED_CPUSET: &str = "pvsched-isolated";
/// Name of the child cpuset holding the housekeeping CPUs (cgroup v1).
pub const HOUSEKEEPING_CPUSET: &str = "pvsched-housekeeping";
/// Where `pvsched isolate` records what it changed, by default.
pub const DEFAULT_STATE_FILE: &str = "/run/pvsched/isolation.json";
/// Version of the state file format.
pub const STATE_VERSION: u32 = 1;
/// `SCHED_FIFO` priority of the isolated vCPU threads, by default.
pub const DEFAULT_RT_PRIORITY: u8 = 50;

/// `PF_NO_SETAFFINITY`: a thread whose affinity userspace may not change
/// (per-CPU kernel threads); the cpuset controller refuses to attach it.
const PF_NO_SETAFFINITY: u64 = 0x0400_0000;
/// Largest CPU number accepted in a list (the kernel's `NR_CPUS` ceiling).
const MAX_CPU: u32 = 8191;

/// Creates and removes cpuset directories. The kernel makes a cgroup's
/// control files with its directory and removes them with it; a fixture
/// tree does the same with plain files.
pub trait CgroupDirs {
    /// `mkdir`.
    fn create(&self, path: &Path) -> io::Result<()>;
    /// `rmdir` (the cgroup must hold no task).
    fn remove(&self, path: &Path) -> io::Result<()>;
}

/// The kernel's cgroup file systems.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelCgroups;

impl CgroupDirs for KernelCgroups {
    fn create(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
}

/// What isolation reads and acts on: the `/proc` and `/sys` roots, the
/// scheduling calls and the cgroup directories.
#[derive(Clone, Copy)]
pub struct Host<'a> {
    /// `/proc` and `/sys`.
    pub fs: &'a HostFs,
    /// `sched_{get,set}{attr,affinity}`.
    pub sched: &'a dyn ThreadScheduler,
    /// `mkdir`/`rmdir` of cpusets.
    pub cgroups: &'a dyn CgroupDirs,
}

impl<'a> Host<'a> {
    /// The real host under `fs`'s roots.
    pub fn real(fs: &'a HostFs) -> Host<'a> {
        Host {
            fs,
            sched: &crate::sched::RealScheduler,
            cgroups: &KernelCgroups,
        }
    }
}

/// Why isolation could not be planned, applied or undone.
#[derive(Debug, thiserror::Error)]
pub enum IsolateError {
    /// The request itself is wrong (CPU list, priority, VM threads).
    #[error("{0}")]
    Invalid(String),
    /// The host cannot be isolated this way (no cpuset hierarchy, a
    /// cpuset of someone else on the isolated CPUs, leftovers).
    #[error("{0}")]
    Host(String),
    /// The target VM could not be found or checked.
    #[error("VM {name}: {detail}")]
    Vm {
        /// The VM as given.
        name: String,
        /// What went wrong.
        detail: String,
    },
    /// A state file is already there: isolation is applied (undo it first).
    #[error("state file {0} exists: isolation is already applied (run `pvsched isolate --undo`)")]
    AlreadyApplied(PathBuf),
    /// The state file is missing, unsafe or unreadable.
    #[error("state file {path}: {detail}")]
    State {
        /// File.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A read or write of a control file failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// File.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A scheduling call failed.
    #[error(transparent)]
    Sched(#[from] SchedError),
    /// A change failed; everything done before it was undone.
    #[error("{failed}; rolled back{}", rollback_note(.rollback_failures))]
    RolledBack {
        /// The change that failed.
        failed: Box<IsolateError>,
        /// Undo steps that failed during the rollback.
        rollback_failures: Vec<String>,
    },
    /// The daemon's isolation request is unsafe, malformed or does not
    /// match the configuration.
    #[error("isolation request {path}: {detail}")]
    Request {
        /// File.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Undo could not restore every value; the state file is kept.
    #[error("undo incomplete ({} failures, state file kept): {}", .0.len(), .0.join("; "))]
    UndoIncomplete(Vec<String>),
}

fn rollback_note(failures: &[String]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!(" with {} failures: {}", failures.len(), failures.join("; "))
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IsolateError + 'a {
    move |source| IsolateError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Parses and checks a CPU list such as `1`, `2-3,6`: well formed, each CPU
/// at most [`MAX_CPU`], sorted, no duplicates, not empty.
pub fn parse_cpus(text: &str) -> Result<Vec<u32>, IsolateError> {
    let bad = || IsolateError::Invalid(format!("CPU list {text:?} is not a list such as 1,2-3"));
    let t = text.trim();
    if t.is_empty()
        || !t
            .chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == '-')
    {
        return Err(bad());
    }
    let cpus = parse_cpu_list(t).ok_or_else(bad)?;
    if cpus.is_empty() {
        return Err(bad());
    }
    if let Some(&c) = cpus.iter().find(|&&c| c > MAX_CPU) {
        return Err(IsolateError::Invalid(format!(
            "CPU {c} in {text:?} is above {MAX_CPU}"
        )));
    }
    let set: BTreeSet<u32> = cpus.iter().copied().collect();
    if set.len() != cpus.len() {
        return Err(IsolateError::Invalid(format!(
            "CPU list {text:?} names a CPU twice"
        )));
    }
    Ok(set.into_iter().collect())
}

/// Formats CPUs as a kernel CPU list (`0-2,5`).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// Parses a kernel hex CPU mask (`3`, `ffffffff,00000001`).
pub fn parse_cpu_mask(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    let words: Vec<&str> = text.trim().split(',').collect();
    for (i, word) in words.iter().rev().enumerate() {
        if word.is_empty() || word.len() > 8 {
            return None;
        }
        let w = u32::from_str_radix(word, 16).ok()?;
        for bit in 0..32 {
            if w & (1 << bit) != 0 {
                cpus.push(u32::try_from(i).ok()?.checked_mul(32)? + bit);
            }
        }
    }
    cpus.sort_unstable();
    Some(cpus)
}

/// Formats CPUs as a kernel hex CPU mask (32-bit words, comma separated).
pub fn format_cpu_mask(cpus: &[u32]) -> String {
    let top = cpus.iter().max().copied().unwrap_or(0) / 32;
    let mut words = vec![0u32; top as usize + 1];
    for &c in cpus {
        words[(c / 32) as usize] |= 1 << (c % 32);
    }
    let mut out = format!("{:x}", words[top as usize]);
    for w in words[..top as usize].iter().rev() {
        out += &format!(",{w:08x}");
    }
    out
}

/// Which cpuset hierarchy isolation uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "root")]
pub enum Hierarchy {
    /// cgroup v1 `cpuset`, mounted at this directory.
    V1(PathBuf),
    /// cgroup v2 with the `cpuset` controller, mounted at this directory.
    V2(PathBuf),
}

impl Hierarchy {
    /// Finds the cpuset hierarchy under the sys root: a unified hierarchy
    /// (`fs/cgroup` or `fs/cgroup/unified`) offering `cpuset`, else v1.
    pub fn detect(fs: &HostFs) -> Result<Hierarchy, IsolateError> {
        let cg = fs.sys_root.join("fs/cgroup");
        for dir in [cg.clone(), cg.join("unified")] {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.controllers")) {
                if text.split_ascii_whitespace().any(|c| c == "cpuset") {
                    return Ok(Hierarchy::V2(dir));
                }
            }
        }
        let v1 = cg.join("cpuset");
        if v1.join("cpuset.cpus").is_file() {
            return Ok(Hierarchy::V1(v1));
        }
        Err(IsolateError::Host(format!(
            "no cpuset hierarchy: neither a cgroup v2 with the cpuset controller under {} nor a cgroup v1 cpuset at {}",
            cg.display(),
            v1.display()
        )))
    }

    fn root(&self) -> &Path {
        match self {
            Hierarchy::V1(p) | Hierarchy::V2(p) => p,
        }
    }
}

/// A VM's threads as QMP reported them and the trust checks accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmThreads {
    /// The VM's name (as given, or QEMU's `-name`).
    pub name: String,
    /// The QEMU process (its main thread is the emulator thread).
    pub pid: i32,
    /// vCPU thread ids, by cpu-index.
    pub vcpus: Vec<Tid>,
    /// IOThread thread ids.
    pub iothreads: Vec<Tid>,
}

/// How the target VM is named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmSelector {
    /// By name: a `[[vm]]` of the daemon's configuration, a discovered VM,
    /// or a QEMU process whose `-name` it is.
    Name(String),
    /// By QMP socket.
    Qmp(PathBuf),
}

/// Finds a VM the way the daemon does and checks it as the daemon does
/// ([`crate::trust::vet`]: the process's users, the QMP listener, every
/// thread reported). A VM that is gone is an error.
pub fn find_vm(
    fs: &HostFs,
    cfg: &HostConfig,
    selector: &VmSelector,
    timeout: Duration,
) -> Result<VmThreads, IsolateError> {
    let (users, _warnings) = crate::trust::UserPolicy::system(&cfg.daemon.allowed_users);
    let shown = match selector {
        VmSelector::Name(n) => n.clone(),
        VmSelector::Qmp(p) => p.display().to_string(),
    };
    let vm_err = |detail: String| IsolateError::Vm {
        name: shown.clone(),
        detail,
    };
    let (qmp, expected_pid, extra_user) = match selector {
        VmSelector::Qmp(p) => (p.clone(), None, None),
        VmSelector::Name(name) => {
            if let Some(vm) = cfg.vm.iter().find(|v| &v.name == name) {
                (vm.qmp.clone(), None, vm.user.clone())
            } else if let Some(d) = crate::discovery::discover_with(
                fs,
                &cfg.daemon.shm_dir,
                cfg.daemon.ivshmem_server.as_deref(),
            )
            .into_iter()
            .find(|d| &d.name == name)
            {
                (d.qmp, Some(d.pid), None)
            } else {
                let found = fs.pids().unwrap_or_default().into_iter().find_map(|pid| {
                    let args = crate::discovery::parse_qemu_cmdline(&fs.cmdline(pid).ok()?)?;
                    (args.name.as_deref() == Some(name.as_str()))
                        .then(|| args.qmp_sockets.first().map(|q| (q.clone(), pid)))?
                });
                let (q, pid) = found.ok_or_else(|| {
                    vm_err("no such VM in the configuration, in discovery or among QEMU processes with a QMP socket".into())
                })?;
                (q, Some(pid), None)
            }
        }
    };
    let extra_uid = match &extra_user {
        Some(u) => crate::sys::uid_of_user(u).ok().flatten(),
        None => None,
    };
    let vetted = crate::trust::vet(fs, &users, extra_uid, &qmp, expected_pid, timeout)
        .map_err(|e| vm_err(crate::qmp::error_text(&e)))?;
    let mut cpus = vetted.query.cpus.clone();
    cpus.sort_by_key(|c| c.cpu_index);
    if cpus.is_empty() {
        return Err(vm_err("QMP reports no vCPU".into()));
    }
    Ok(VmThreads {
        name: match selector {
            VmSelector::Name(n) => n.clone(),
            VmSelector::Qmp(_) => crate::discovery::parse_qemu_cmdline(
                &fs.cmdline(vetted.identity.pid).unwrap_or_default(),
            )
            .and_then(|a| a.name)
            .unwrap_or_else(|| format!("pid{}", vetted.identity.pid)),
        },
        pid: vetted.identity.pid,
        vcpus: cpus.iter().map(|c| c.thread_id).collect(),
        iothreads: vetted.query.iothreads.iter().map(|i| i.thread_id).collect(),
    })
}

/// What to isolate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// CPUs to isolate (from [`parse_cpus`]).
    pub isolated: Vec<u32>,
    /// The VM whose vCPUs run on them, if any.
    pub vm: Option<VmThreads>,
    /// `SCHED_FIFO` priority of the vCPU threads (1..=99).
    pub rt_priority: u8,
}

/// What a written file is, for the report and for undo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    /// A cpuset file that existed before (the root's).
    Cgroup,
    /// A file of a cpuset this plan creates (gone with it on undo).
    NewCgroup,
    /// `cgroup.subtree_control` (undo disables what was enabled).
    SubtreeControl,
    /// An IRQ's `smp_affinity_list` (managed IRQs refuse: reported).
    Irq,
    /// `/proc/irq/default_smp_affinity`.
    IrqDefault,
    /// The unbound workqueue cpumask.
    Workqueue,
}

/// One change, with the value it replaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "change")]
pub enum Change {
    /// Create a cpuset directory (undo: move what is left in it to its
    /// parent, remove it).
    CreateDir {
        /// The directory.
        path: PathBuf,
    },
    /// Write a control file.
    Write {
        /// What it is.
        kind: FileKind,
        /// The file.
        path: PathBuf,
        /// Value before (as read, trimmed).
        old: String,
        /// Value written.
        new: String,
    },
    /// Move a thread to another cpuset (v1 `tasks`), which resets its
    /// affinity: the old one is recorded.
    MoveTask {
        /// Thread id.
        tid: Tid,
        /// Start time (against tid reuse on undo).
        starttime: u64,
        /// `comm`.
        comm: String,
        /// Its cpuset directory before.
        from: PathBuf,
        /// Its cpuset directory after.
        to: PathBuf,
        /// Affinity before.
        old_affinity: Vec<u32>,
    },
    /// Record a thread's affinity that the kernel narrows on its own (v2
    /// partitions); undo puts it back.
    KeepAffinity {
        /// Thread id.
        tid: Tid,
        /// Start time.
        starttime: u64,
        /// Affinity before.
        old: Vec<u32>,
    },
    /// Pin a thread.
    Affinity {
        /// Thread id.
        tid: Tid,
        /// Start time.
        starttime: u64,
        /// Affinity before.
        old: Vec<u32>,
        /// Affinity after.
        new: Vec<u32>,
    },
    /// Set a thread's scheduling class.
    Sched {
        /// Thread id.
        tid: Tid,
        /// Start time.
        starttime: u64,
        /// Attributes before.
        old: SchedAttrs,
        /// Attributes after.
        new: SchedAttrs,
    },
}

impl Change {
    /// One line for the plan table: what, old value, new value.
    pub fn row(&self) -> (String, String, String) {
        let list = |c: &[u32]| format_cpu_list(c);
        let attrs = |a: &SchedAttrs| match a.policy {
            Policy::Fifo | Policy::Rr => format!("{:?}/{}", a.policy, a.priority).to_lowercase(),
            p => format!("{p:?} nice {}", a.nice).to_lowercase(),
        };
        match self {
            Change::CreateDir { path } => (
                format!("mkdir {}", path.display()),
                "-".into(),
                "created".into(),
            ),
            Change::Write { path, old, new, .. } => {
                (path.display().to_string(), old.clone(), new.clone())
            }
            Change::MoveTask {
                tid,
                comm,
                from,
                to,
                old_affinity,
                ..
            } => (
                format!("task {tid} ({comm})"),
                format!("{} cpus {}", dir_name(from), list(old_affinity)),
                dir_name(to),
            ),
            Change::KeepAffinity { tid, old, .. } => (
                format!("task {tid} affinity"),
                list(old),
                "narrowed by the kernel".into(),
            ),
            Change::Affinity { tid, old, new, .. } => {
                (format!("thread {tid} affinity"), list(old), list(new))
            }
            Change::Sched { tid, old, new, .. } => {
                (format!("thread {tid} policy"), attrs(old), attrs(new))
            }
        }
    }
}

fn dir_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into())
}

/// Something isolation cannot move, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmovable {
    /// A task (`task 12 (ksoftirqd/1)`) or an IRQ (`irq 24`).
    pub what: String,
    /// Why.
    pub reason: String,
}

/// Every change isolation would make, in order, and what it cannot move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The cpuset hierarchy used.
    pub hierarchy: Hierarchy,
    /// Isolated CPUs.
    pub isolated: Vec<u32>,
    /// Housekeeping CPUs (every other online CPU).
    pub housekeeping: Vec<u32>,
    /// The VM placed on the isolated CPUs.
    pub vm: Option<VmThreads>,
    /// The changes, in the order they are made.
    pub changes: Vec<Change>,
    /// Tasks known in advance not to move (per-CPU kernel threads).
    pub unmovable: Vec<Unmovable>,
}

fn read_trim(path: &Path) -> Result<String, IsolateError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(io_err("reading", path))
}

/// Writes a control file. A missing file is an error, except in a cpuset
/// this plan creates (`create`), whose files the kernel makes with it.
fn write_file(path: &Path, value: &str, create: bool) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(create)
        .open(path)?;
    f.write_all(value.as_bytes())
}

fn online_cpus(fs: &HostFs) -> Result<Vec<u32>, IsolateError> {
    let path = fs.sys_root.join("devices/system/cpu/online");
    let text = read_trim(&path)?;
    parse_cpu_list(&text).ok_or_else(|| IsolateError::Host(format!("{}: {text:?}", path.display())))
}

/// A thread as read from `/proc`.
struct TaskInfo {
    starttime: u64,
    comm: String,
    flags: u64,
}

fn task_info(fs: &HostFs, tid: Tid) -> Option<TaskInfo> {
    let st = fs.task_stat(tid, tid).ok()?;
    let comm = fs.task_comm(tid, tid).unwrap_or_default();
    Some(TaskInfo {
        starttime: st.starttime,
        comm,
        flags: st.flags,
    })
}

fn read_tids(path: &Path) -> Result<Vec<Tid>, IsolateError> {
    let text = read_trim(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim().parse::<Tid>().map_err(|_| {
                IsolateError::Host(format!("{}: {l:?} is not a thread id", path.display()))
            })
        })
        .collect()
}

/// Child directories of a cgroup directory.
fn child_dirs(dir: &Path) -> Result<Vec<PathBuf>, IsolateError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let e = e.map_err(io_err("listing", dir))?;
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The plan for `request`, read from the host (nothing is changed).
pub fn plan(host: &Host<'_>, request: &Request) -> Result<Plan, IsolateError> {
    let (fs, sched) = (host.fs, host.sched);
    let online = online_cpus(fs)?;
    let isolated = request.isolated.clone();
    if isolated.is_empty() {
        return Err(IsolateError::Invalid("no CPU to isolate".into()));
    }
    if let Some(c) = isolated.iter().find(|c| !online.contains(c)) {
        return Err(IsolateError::Invalid(format!(
            "CPU {c} is not online (online: {})",
            format_cpu_list(&online)
        )));
    }
    let housekeeping: Vec<u32> = online
        .iter()
        .copied()
        .filter(|c| !isolated.contains(c))
        .collect();
    if housekeeping.is_empty() {
        return Err(IsolateError::Invalid(format!(
            "isolating {} leaves no housekeeping CPU: at least one online CPU must remain",
            format_cpu_list(&isolated)
        )));
    }
    if !(1..=99).contains(&request.rt_priority) {
        return Err(IsolateError::Invalid(format!(
            "RT priority {} is outside 1..=99",
            request.rt_priority
        )));
    }
    let hierarchy = Hierarchy::detect(fs)?;
    let root = hierarchy.root().to_owned();
    let iso_dir = root.join(ISOLATED_CPUSET);
    let hk_dir = root.join(HOUSEKEEPING_CPUSET);
    for d in [&iso_dir, &hk_dir] {
        if d.exists() {
            return Err(IsolateError::Host(format!(
                "{} already exists (left by an isolation without its state file?): remove it first",
                d.display()
            )));
        }
    }
    let vm_tids: BTreeSet<Tid> = request
        .vm
        .iter()
        .flat_map(|v| v.vcpus.iter().copied())
        .collect();
    if let Some(vm) = &request.vm {
        if vm.vcpus.len() > isolated.len() {
            return Err(IsolateError::Invalid(format!(
                "VM {} has {} vCPUs but only {} CPUs are isolated: each vCPU needs a CPU of its own",
                vm.name,
                vm.vcpus.len(),
                isolated.len()
            )));
        }
        if vm_tids.len() != vm.vcpus.len() {
            return Err(IsolateError::Invalid(format!(
                "VM {}: two vCPUs share a thread",
                vm.name
            )));
        }
        for &t in &vm.vcpus {
            if task_info(fs, t).is_none() {
                return Err(IsolateError::Vm {
                    name: vm.name.clone(),
                    detail: format!("vCPU thread {t} is gone"),
                });
            }
        }
    }
    let mut changes = Vec::new();
    let mut unmovable = Vec::new();
    let iso_list = format_cpu_list(&isolated);
    let hk_list = format_cpu_list(&housekeeping);
    let new_file = |dir: &Path, name: &str, new: &str| Change::Write {
        kind: FileKind::NewCgroup,
        path: dir.join(name),
        old: String::new(),
        new: new.to_owned(),
    };
    match &hierarchy {
        Hierarchy::V1(_) => {
            // Every other cpuset that may run on an isolated CPU would
            // defeat the partition (and an exclusive child cannot overlap a
            // sibling). On v2 the partition takes its CPUs from siblings.
            for child in child_dirs(&root)? {
                let cpus = read_trim(&child.join("cpuset.cpus"))?;
                let cpus = parse_cpu_list(&cpus).unwrap_or_default();
                if cpus.iter().any(|c| isolated.contains(c)) {
                    return Err(IsolateError::Host(format!(
                        "cpuset {} includes isolated CPUs ({}): shrink or remove it first",
                        child.display(),
                        format_cpu_list(&cpus)
                    )));
                }
            }
            let mems = read_trim(&root.join("cpuset.mems"))?;
            changes.push(Change::CreateDir {
                path: hk_dir.clone(),
            });
            changes.push(new_file(&hk_dir, "cpuset.cpus", &hk_list));
            changes.push(new_file(&hk_dir, "cpuset.mems", &mems));
            changes.push(Change::CreateDir {
                path: iso_dir.clone(),
            });
            changes.push(new_file(&iso_dir, "cpuset.cpus", &iso_list));
            changes.push(new_file(&iso_dir, "cpuset.mems", &mems));
            changes.push(new_file(&iso_dir, "cpuset.cpu_exclusive", "1"));
            changes.push(new_file(&iso_dir, "cpuset.sched_load_balance", "0"));
            let lb = root.join("cpuset.sched_load_balance");
            let old = read_trim(&lb)?;
            if old != "0" {
                changes.push(Change::Write {
                    kind: FileKind::Cgroup,
                    path: lb,
                    old,
                    new: "0".into(),
                });
            }
            for tid in read_tids(&root.join("tasks"))? {
                let Some(info) = task_info(fs, tid) else {
                    continue;
                };
                if info.flags & PF_NO_SETAFFINITY != 0 {
                    unmovable.push(Unmovable {
                        what: format!("task {tid} ({})", info.comm),
                        reason: "kernel thread whose CPUs the kernel manages (PF_NO_SETAFFINITY: per-CPU threads, workqueue workers, which follow the workqueue cpumask)".into(),
                    });
                    continue;
                }
                let Ok(old_affinity) = sched.get_affinity(tid) else {
                    continue;
                };
                let to = if vm_tids.contains(&tid) {
                    iso_dir.clone()
                } else {
                    hk_dir.clone()
                };
                changes.push(Change::MoveTask {
                    tid,
                    starttime: info.starttime,
                    comm: info.comm,
                    from: root.clone(),
                    to,
                    old_affinity,
                });
            }
            if let Some(vm) = &request.vm {
                let moved: BTreeSet<Tid> = changes
                    .iter()
                    .filter_map(|c| match c {
                        Change::MoveTask { tid, .. } => Some(*tid),
                        _ => None,
                    })
                    .collect();
                if let Some(t) = vm.vcpus.iter().find(|t| !moved.contains(t)) {
                    return Err(IsolateError::Vm {
                        name: vm.name.clone(),
                        detail: format!(
                            "vCPU thread {t} is not in the root cpuset (another cpuset holds it)"
                        ),
                    });
                }
            }
        }
        Hierarchy::V2(_) => {
            if request.vm.is_some() {
                return Err(IsolateError::Invalid(
                    "placing a VM's threads in a cgroup v2 partition needs threaded cgroups, \
                     which are not supported: isolate the CPUs without --vm"
                        .into(),
                ));
            }
            let sc = root.join("cgroup.subtree_control");
            let old = read_trim(&sc)?;
            if !old.split_ascii_whitespace().any(|c| c == "cpuset") {
                changes.push(Change::Write {
                    kind: FileKind::SubtreeControl,
                    path: sc,
                    old,
                    new: "+cpuset".into(),
                });
            }
            changes.push(Change::CreateDir {
                path: iso_dir.clone(),
            });
            changes.push(new_file(&iso_dir, "cpuset.cpus", &iso_list));
            changes.push(new_file(&iso_dir, "cpuset.cpus.partition", "isolated"));
            for pid in fs.pids().unwrap_or_default() {
                let Ok(rd) = std::fs::read_dir(fs.proc_root.join(pid.to_string()).join("task"))
                else {
                    continue;
                };
                for e in rd.flatten() {
                    let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<Tid>().ok())
                    else {
                        continue;
                    };
                    let Some(info) = task_info(fs, tid) else {
                        continue;
                    };
                    if info.flags & PF_NO_SETAFFINITY != 0 {
                        continue;
                    }
                    if let Ok(old) = sched.get_affinity(tid) {
                        if old.iter().any(|c| isolated.contains(c)) {
                            changes.push(Change::KeepAffinity {
                                tid,
                                starttime: info.starttime,
                                old,
                            });
                        }
                    }
                }
            }
        }
    }
    // IRQs and the unbound workqueues: off the isolated CPUs, keeping any
    // narrower choice an administrator made among the housekeeping ones.
    let steer = |cpus: &[u32]| -> Option<Vec<u32>> {
        if !cpus.iter().any(|c| isolated.contains(c)) {
            return None;
        }
        let kept: Vec<u32> = cpus
            .iter()
            .copied()
            .filter(|c| housekeeping.contains(c))
            .collect();
        Some(if kept.is_empty() {
            housekeeping.clone()
        } else {
            kept
        })
    };
    let irq_root = fs.proc_root.join("irq");
    let mut irqs: Vec<(u32, PathBuf)> = std::fs::read_dir(&irq_root)
        .map_err(io_err("listing", &irq_root))?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((n, e.path().join("smp_affinity_list")))
        })
        .collect();
    irqs.sort();
    for (_, path) in irqs {
        let Ok(old) = read_trim(&path) else { continue };
        let cpus = parse_cpu_list(&old)
            .ok_or_else(|| IsolateError::Host(format!("{}: {old:?}", path.display())))?;
        if let Some(new) = steer(&cpus) {
            changes.push(Change::Write {
                kind: FileKind::Irq,
                path,
                old,
                new: format_cpu_list(&new),
            });
        }
    }
    for (kind, path) in [
        (FileKind::IrqDefault, irq_root.join("default_smp_affinity")),
        (
            FileKind::Workqueue,
            fs.sys_root.join("devices/virtual/workqueue/cpumask"),
        ),
    ] {
        if !path.exists() {
            continue;
        }
        let old = read_trim(&path)?;
        let cpus = parse_cpu_mask(&old)
            .ok_or_else(|| IsolateError::Host(format!("{}: {old:?}", path.display())))?;
        if let Some(new) = steer(&cpus) {
            changes.push(Change::Write {
                kind,
                path,
                old,
                new: format_cpu_mask(&new),
            });
        }
    }
    if let Some(vm) = &request.vm {
        for (i, &tid) in vm.vcpus.iter().enumerate() {
            let starttime = task_info(fs, tid).map(|t| t.starttime).unwrap_or(0);
            let old = sched.get_affinity(tid)?;
            changes.push(Change::Affinity {
                tid,
                starttime,
                old,
                new: vec![isolated[i]],
            });
            let old = sched.get_attrs(tid)?;
            changes.push(Change::Sched {
                tid,
                starttime,
                old,
                new: SchedAttrs {
                    policy: Policy::Fifo,
                    priority: request.rt_priority,
                    nice: 0,
                    flags: crate::sys::SCHED_FLAG_RESET_ON_FORK,
                    deadline: [0; 3],
                },
            });
        }
    }
    Ok(Plan {
        hierarchy,
        isolated,
        housekeeping,
        vm: request.vm.clone(),
        changes,
        unmovable,
    })
}

/// The state file: what was changed, with the values to put back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Whether apply finished (`false`: every planned change is listed, and
    /// undo restores each, harmlessly for those never made).
    pub complete: bool,
    /// The cpuset hierarchy.
    pub hierarchy: Hierarchy,
    /// Isolated CPUs.
    pub isolated: Vec<u32>,
    /// Housekeeping CPUs.
    pub housekeeping: Vec<u32>,
    /// The changes made, in order.
    pub changes: Vec<Change>,
    /// What could not move.
    pub unmovable: Vec<Unmovable>,
    /// The daemon's request this isolation was applied for by `pvsched
    /// isolate --sync` (absent: applied by hand), which tells a sync whether
    /// the host already matches the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<crate::isolate_request::IsolationRequest>,
}

/// Creates the state file: it must not exist (a second apply is refused),
/// and it is created 0600 without following a symlink.
fn create_state(path: &Path, state: &StateFile) -> Result<(), IsolateError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(IsolateError::AlreadyApplied(path.to_owned()));
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    }
    let json = serde_json::to_vec_pretty(state).expect("state serialises");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                IsolateError::AlreadyApplied(path.to_owned())
            } else {
                io_err("creating", path)(e)
            }
        })?;
    f.write_all(&json).map_err(io_err("writing", path))?;
    f.sync_all().map_err(io_err("writing", path))
}

/// Replaces the state file atomically (temp file, rename).
fn replace_state(path: &Path, state: &StateFile) -> Result<(), IsolateError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let json = serde_json::to_vec_pretty(state).expect("state serialises");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    f.write_all(&json).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("renaming to", path))
}

/// Reads the state file, refusing a symlink, a file of another user or
/// one others may write.
pub fn read_state(path: &Path) -> Result<StateFile, IsolateError> {
    let bad = |detail: String| IsolateError::State {
        path: path.to_owned(),
        detail,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => bad("is a symlink: refused".into()),
            Some(libc::ENOENT) => bad("does not exist: nothing to undo".into()),
            _ => bad(e.to_string()),
        })?;
    let meta = f.metadata().map_err(|e| bad(e.to_string()))?;
    let euid = if crate::sys::is_root() {
        0
    } else {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(u32::MAX)
    };
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.uid() != euid {
        return Err(bad(format!(
            "owned by uid {}, not by this user ({euid}): refused",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "mode {:o} lets others write it: refused",
            meta.mode() & 0o777
        )));
    }
    let state: StateFile = serde_json::from_reader(io::BufReader::new(f))
        .map_err(|e| bad(format!("malformed: {e}")))?;
    if state.version != STATE_VERSION {
        return Err(bad(format!(
            "format version {} (this build reads {STATE_VERSION})",
            state.version
        )));
    }
    Ok(state)
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The state file written.
    pub state_path: PathBuf,
    /// The changes made (old values as read just before each).
    pub changes: Vec<Change>,
    /// What could not move: the plan's, and what the kernel refused.
    pub unmovable: Vec<Unmovable>,
    /// Tasks that exited between the plan and their move.
    pub exited: usize,
}

/// What one step of apply came to.
enum Outcome {
    Done(Change),
    Refused(Unmovable),
    Exited,
}

fn thread_alive(fs: &HostFs, tid: Tid, starttime: u64) -> bool {
    fs.task_stat(tid, tid)
        .is_ok_and(|st| st.starttime == starttime)
}

fn apply_one(host: &Host<'_>, change: &Change) -> Result<Outcome, IsolateError> {
    let (fs, sched) = (host.fs, host.sched);
    Ok(match change {
        Change::CreateDir { path } => {
            host.cgroups
                .create(path)
                .map_err(io_err("creating", path))?;
            Outcome::Done(change.clone())
        }
        Change::Write {
            kind,
            path,
            old: _,
            new,
        } => {
            let old = if *kind == FileKind::NewCgroup {
                String::new()
            } else {
                read_trim(path)?
            };
            match write_file(path, new, *kind == FileKind::NewCgroup) {
                Ok(()) => {}
                Err(e)
                    if *kind == FileKind::Irq
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::EPERM)
                        ) =>
                {
                    let irq = path
                        .parent()
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    // Root opened the file: these come from the IRQ itself.
                    let reason = match e.raw_os_error() {
                        Some(libc::EIO) => "the kernel sets its affinity (EIO: managed IRQ)",
                        Some(libc::EPERM) => {
                            "its affinity cannot be set from user space (EPERM: managed or per-CPU IRQ)"
                        }
                        _ => "the kernel refuses the CPUs (EINVAL)",
                    };
                    return Ok(Outcome::Refused(Unmovable {
                        what: format!("irq {irq} ({old})"),
                        reason: reason.into(),
                    }));
                }
                Err(e) => return Err(io_err("writing", path)(e)),
            }
            Outcome::Done(Change::Write {
                kind: *kind,
                path: path.clone(),
                old,
                new: new.clone(),
            })
        }
        Change::MoveTask {
            tid,
            starttime,
            comm,
            from,
            to,
            ..
        } => {
            if !thread_alive(fs, *tid, *starttime) {
                return Ok(Outcome::Exited);
            }
            let old_affinity = match sched.get_affinity(*tid) {
                Ok(a) => a,
                Err(e) if e.is_gone() => return Ok(Outcome::Exited),
                Err(e) => return Err(e.into()),
            };
            let tasks = to.join("tasks");
            match write_file(&tasks, &tid.to_string(), true) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(Outcome::Exited),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok(Outcome::Refused(Unmovable {
                        what: format!("task {tid} ({comm})"),
                        reason: "the kernel refuses to move it (EINVAL)".into(),
                    }))
                }
                Err(e) => return Err(io_err("writing", &tasks)(e)),
            }
            Outcome::Done(Change::MoveTask {
                tid: *tid,
                starttime: *starttime,
                comm: comm.clone(),
                from: from.clone(),
                to: to.clone(),
                old_affinity,
            })
        }
        Change::KeepAffinity { tid, starttime, .. } => {
            if !thread_alive(fs, *tid, *starttime) {
                return Ok(Outcome::Exited);
            }
            match sched.get_affinity(*tid) {
                Ok(old) => Outcome::Done(Change::KeepAffinity {
                    tid: *tid,
                    starttime: *starttime,
                    old,
                }),
                Err(e) if e.is_gone() => Outcome::Exited,
                Err(e) => return Err(e.into()),
            }
        }
        Change::Affinity {
            tid,
            starttime,
            new,
            ..
        } => {
            let old = sched.get_affinity(*tid)?;
            sched.set_affinity(*tid, new)?;
            Outcome::Done(Change::Affinity {
                tid: *tid,
                starttime: *starttime,
                old,
                new: new.clone(),
            })
        }
        Change::Sched {
            tid,
            starttime,
            new,
            ..
        } => {
            let old = sched.get_attrs(*tid)?;
            sched.set_attrs(*tid, new)?;
            Outcome::Done(Change::Sched {
                tid: *tid,
                starttime: *starttime,
                old,
                new: *new,
            })
        }
    })
}

/// What undoing a list of changes came to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoReport {
    /// Values restored.
    pub restored: usize,
    /// Recorded threads that exited meanwhile (nothing to restore).
    pub exited: usize,
    /// Threads found in a created cpuset (started after apply), moved to
    /// its parent before it was removed.
    pub adopted: usize,
    /// Steps that failed.
    pub failures: Vec<String>,
}

fn undo_one(host: &Host<'_>, change: &Change, report: &mut UndoReport) {
    let (fs, sched) = (host.fs, host.sched);
    let mut fail = |what: String| report.failures.push(what);
    match change {
        Change::CreateDir { path } => {
            if !path.exists() {
                return;
            }
            // Threads started since apply inherited the cpuset: give them
            // to the parent, or the directory cannot be removed.
            let parent = path.parent().unwrap_or(Path::new("/"));
            let (list, into) = if path.join("tasks").exists() {
                ("tasks", parent.join("tasks"))
            } else {
                ("cgroup.procs", parent.join("cgroup.procs"))
            };
            for tid in read_tids(&path.join(list)).unwrap_or_default() {
                match write_file(&into, &tid.to_string(), false) {
                    Ok(()) => report.adopted += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => fail(format!("moving {tid} to {}: {e}", into.display())),
                }
            }
            match host.cgroups.remove(path) {
                Ok(()) => report.restored += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => fail(format!("removing {}: {e}", path.display())),
            }
        }
        Change::Write {
            kind: FileKind::NewCgroup,
            ..
        } => {}
        Change::Write {
            kind: FileKind::SubtreeControl,
            path,
            ..
        } => match write_file(path, "-cpuset", false) {
            Ok(()) => report.restored += 1,
            Err(e) => fail(format!("writing -cpuset to {}: {e}", path.display())),
        },
        Change::Write { path, old, .. } => match write_file(path, old, false) {
            Ok(()) => report.restored += 1,
            Err(e) => fail(format!("writing {old:?} to {}: {e}", path.display())),
        },
        Change::MoveTask {
            tid,
            starttime,
            from,
            old_affinity,
            ..
        } => {
            if !thread_alive(fs, *tid, *starttime) {
                report.exited += 1;
                return;
            }
            let tasks = from.join("tasks");
            match write_file(&tasks, &tid.to_string(), false) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    report.exited += 1;
                    return;
                }
                Err(e) => return fail(format!("moving {tid} to {}: {e}", tasks.display())),
            }
            restore_affinity(sched, *tid, old_affinity, report);
        }
        Change::KeepAffinity {
            tid,
            starttime,
            old,
        } => {
            if !thread_alive(fs, *tid, *starttime) {
                report.exited += 1;
                return;
            }
            restore_affinity(sched, *tid, old, report);
        }
        Change::Affinity {
            tid,
            starttime,
            old,
            ..
        } => {
            if !thread_alive(fs, *tid, *starttime) {
                report.exited += 1;
                return;
            }
            restore_affinity(sched, *tid, old, report);
        }
        Change::Sched {
            tid,
            starttime,
            old,
            ..
        } => {
            if !thread_alive(fs, *tid, *starttime) {
                report.exited += 1;
                return;
            }
            match sched.set_attrs(*tid, old) {
                Ok(()) => report.restored += 1,
                Err(e) if e.is_gone() => report.exited += 1,
                Err(e) => fail(e.to_string()),
            }
        }
    }
}

fn restore_affinity(sched: &dyn ThreadScheduler, tid: Tid, old: &[u32], report: &mut UndoReport) {
    match sched.set_affinity(tid, old) {
        Ok(()) => report.restored += 1,
        Err(e) if e.is_gone() => report.exited += 1,
        Err(e) => report.failures.push(e.to_string()),
    }
}

fn undo_changes(host: &Host<'_>, changes: &[Change]) -> UndoReport {
    let mut report = UndoReport::default();
    for change in changes.iter().rev() {
        undo_one(host, change, &mut report);
    }
    report
}

/// Applies a plan: writes the state file first (refused when one exists),
/// then each change; a change that fails undoes every change made before it
/// and removes the state file, so a failed apply leaves nothing behind.
pub fn apply(host: &Host<'_>, plan: &Plan, state_path: &Path) -> Result<Applied, IsolateError> {
    apply_for(host, plan, state_path, None)
}

/// [`apply`], recording in the state file the daemon's `request` it was
/// applied for (see [`crate::isolate_request::sync`]).
pub fn apply_for(
    host: &Host<'_>,
    plan: &Plan,
    state_path: &Path,
    request: Option<&crate::isolate_request::IsolationRequest>,
) -> Result<Applied, IsolateError> {
    let mut state = StateFile {
        version: STATE_VERSION,
        complete: false,
        hierarchy: plan.hierarchy.clone(),
        isolated: plan.isolated.clone(),
        housekeeping: plan.housekeeping.clone(),
        changes: plan.changes.clone(),
        unmovable: plan.unmovable.clone(),
        request: request.cloned(),
    };
    create_state(state_path, &state)?;
    let mut done = Vec::new();
    let mut unmovable = plan.unmovable.clone();
    let mut exited = 0;
    let mut failure = None;
    for change in &plan.changes {
        match apply_one(host, change) {
            Ok(Outcome::Done(c)) => done.push(c),
            Ok(Outcome::Refused(u)) => unmovable.push(u),
            Ok(Outcome::Exited) => exited += 1,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        state.complete = true;
        state.changes = done.clone();
        state.unmovable = unmovable.clone();
        if let Err(e) = replace_state(state_path, &state) {
            failure = Some(e);
        }
    }
    if let Some(failed) = failure {
        let report = undo_changes(host, &done);
        if report.failures.is_empty() {
            let _ = std::fs::remove_file(state_path);
        } else {
            // Keep what is needed to finish by hand with `--undo`.
            state.changes = done;
            let _ = replace_state(state_path, &state);
        }
        return Err(IsolateError::RolledBack {
            failed: Box::new(failed),
            rollback_failures: report.failures,
        });
    }
    Ok(Applied {
        state_path: state_path.to_owned(),
        changes: done,
        unmovable,
        exited,
    })
}

/// Undoes an isolation from its state file: every recorded value back, in
/// reverse order, the created cpusets removed, then the state file. On any
/// failure the state file is kept (undo can run again).
pub fn undo(host: &Host<'_>, state_path: &Path) -> Result<UndoReport, IsolateError> {
    let state = read_state(state_path)?;
    let report = undo_changes(host, &state.changes);
    if !report.failures.is_empty() {
        return Err(IsolateError::UndoIncomplete(report.failures));
    }
    std::fs::remove_file(state_path).map_err(io_err("removing", state_path))?;
    Ok(report)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sched::FakeScheduler;
    use std::collections::BTreeMap;

    /// A fixture host: 4 online CPUs, a cgroup v1 cpuset root, IRQs, the
    /// workqueue mask, and threads in `/proc`.
    pub(crate) struct Fixture {
        dir: tempfile::TempDir,
        pub(crate) sched: FakeScheduler,
    }

    /// A fixture's cgroup directory goes with its control files, as the
    /// kernel's does.
    struct FixtureCgroups;

    impl CgroupDirs for FixtureCgroups {
        fn create(&self, path: &Path) -> io::Result<()> {
            std::fs::create_dir(path)
        }

        fn remove(&self, path: &Path) -> io::Result<()> {
            std::fs::remove_dir_all(path)
        }
    }

    const KTHREAD_PERCPU: u64 = 0x0020_0000 | PF_NO_SETAFFINITY;

    impl Fixture {
        pub(crate) fn new() -> Fixture {
            let h = Fixture {
                dir: tempfile::tempdir().unwrap(),
                sched: FakeScheduler::new(),
            };
            std::fs::create_dir_all(h.path("run")).unwrap();
            h.put("sys/devices/system/cpu/online", "0-3\n");
            h.put("sys/fs/cgroup/cpuset/cpuset.cpus", "0-3\n");
            h.put("sys/fs/cgroup/cpuset/cpuset.mems", "0\n");
            h.put("sys/fs/cgroup/cpuset/cpuset.cpu_exclusive", "1\n");
            h.put("sys/fs/cgroup/cpuset/cpuset.sched_load_balance", "1\n");
            h.put("sys/fs/cgroup/unified/cgroup.controllers", "memory pids\n");
            h.put("sys/devices/virtual/workqueue/cpumask", "f\n");
            h.put("proc/irq/default_smp_affinity", "f\n");
            for (irq, list) in [(1, "0-3"), (9, "0"), (24, "3"), (25, "2-3")] {
                h.put(&format!("proc/irq/{irq}/smp_affinity_list"), list);
            }
            for (tid, comm, flags) in [
                (1, "systemd", 0),
                (2, "kthreadd", 0x0020_0000),
                (20, "ksoftirqd/2", KTHREAD_PERCPU),
                (100, "qemu-system-x86", 0),
                (101, "CPU 0/KVM", 0),
                (102, "CPU 1/KVM", 0),
                (103, "IO iot0", 0),
            ] {
                h.thread(tid, comm, flags);
            }
            h.put(
                "sys/fs/cgroup/cpuset/tasks",
                "1\n2\n20\n100\n101\n102\n103\n",
            );
            // An administrator's pinning, which a cpuset move resets.
            h.sched.set_affinity(1, &[2]).unwrap();
            h
        }

        pub(crate) fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn put(&self, rel: &str, text: &str) {
            let p = self.path(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            // The kernel prints a value with a newline whatever was
            // written; a fixture keeps what was written, so it holds none.
            std::fs::write(p, text.trim_end()).unwrap();
        }

        fn get(&self, rel: &str) -> String {
            std::fs::read_to_string(self.path(rel)).unwrap()
        }

        fn thread(&self, tid: Tid, comm: &str, flags: u64) {
            let mut f = vec!["0".to_string(); 39];
            f[0] = "S".into();
            f[9 - 3] = flags.to_string();
            f[22 - 3] = (1000 + tid).to_string();
            let stat = format!("{tid} ({comm}) {}\n", f.join(" "));
            self.put(&format!("proc/{tid}/task/{tid}/stat"), &stat);
            self.put(&format!("proc/{tid}/task/{tid}/comm"), &format!("{comm}\n"));
            self.sched.add_thread(tid, SchedAttrs::default());
        }

        pub(crate) fn host<'a>(&'a self, fs: &'a HostFs) -> Host<'a> {
            Host {
                fs,
                sched: &self.sched,
                cgroups: &FixtureCgroups,
            }
        }

        pub(crate) fn fs(&self) -> HostFs {
            HostFs::new(self.path("proc"), self.path("sys"))
        }

        pub(crate) fn state(&self) -> PathBuf {
            self.path("run/isolation.json")
        }

        /// Every file's content except the `tasks` lists (in a fixture
        /// they are plain files, not the kernel's membership lists).
        pub(crate) fn snapshot(&self) -> BTreeMap<PathBuf, String> {
            fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
                for e in std::fs::read_dir(dir).unwrap().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        out.insert(p.clone(), "<dir>".into());
                        walk(&p, out);
                    } else if p.file_name().unwrap() != "tasks" {
                        out.insert(p.clone(), std::fs::read_to_string(&p).unwrap());
                    }
                }
            }
            let mut out = BTreeMap::new();
            walk(self.dir.path(), &mut out);
            out
        }

        pub(crate) fn threads(&self) -> Vec<(Tid, SchedAttrs, Vec<u32>)> {
            [1, 2, 20, 100, 101, 102, 103]
                .into_iter()
                .filter_map(|t| Some((t, self.sched.attrs(t)?, self.sched.affinity(t)?)))
                .collect()
        }

        fn request(&self, cpus: &str, vm: bool) -> Request {
            Request {
                isolated: parse_cpus(cpus).unwrap(),
                vm: vm.then(|| VmThreads {
                    name: "rt".into(),
                    pid: 100,
                    vcpus: vec![101, 102],
                    iothreads: vec![103],
                }),
                rt_priority: 60,
            }
        }
    }

    fn cpuset(h: &Fixture, rel: &str) -> PathBuf {
        h.path("sys/fs/cgroup/cpuset").join(rel)
    }

    #[test]
    fn the_plan_lists_every_change_and_a_dry_run_changes_nothing() {
        let h = Fixture::new();
        let before = (h.snapshot(), h.threads(), h.sched.calls().len());
        let plan = plan(&h.host(&h.fs()), &h.request("2-3", true)).unwrap();
        assert_eq!((h.snapshot(), h.threads(), h.sched.calls().len()), before);
        assert_eq!(plan.hierarchy, Hierarchy::V1(cpuset(&h, "")));
        assert_eq!(
            (plan.isolated.clone(), plan.housekeeping.clone()),
            (vec![2, 3], vec![0, 1])
        );
        let write = |rel: &str| {
            plan.changes.iter().find_map(|c| match c {
                Change::Write { path, old, new, .. } if path.ends_with(rel) => {
                    Some((old.clone(), new.clone()))
                }
                _ => None,
            })
        };
        assert_eq!(
            write("pvsched-isolated/cpuset.cpus"),
            Some((String::new(), "2-3".into()))
        );
        assert_eq!(
            write("pvsched-isolated/cpuset.cpu_exclusive"),
            Some((String::new(), "1".into()))
        );
        assert_eq!(
            write("pvsched-housekeeping/cpuset.cpus"),
            Some((String::new(), "0-1".into()))
        );
        assert_eq!(
            write("pvsched-housekeeping/cpuset.mems"),
            Some((String::new(), "0".into()))
        );
        assert_eq!(
            write("cpuset/cpuset.sched_load_balance"),
            Some(("1".into(), "0".into()))
        );
        assert_eq!(
            write("irq/1/smp_affinity_list"),
            Some(("0-3".into(), "0-1".into()))
        );
        assert_eq!(
            write("irq/9/smp_affinity_list"),
            None,
            "already off the isolated CPUs"
        );
        assert_eq!(
            write("irq/24/smp_affinity_list"),
            Some(("3".into(), "0-1".into()))
        );
        assert_eq!(
            write("default_smp_affinity"),
            Some(("f".into(), "3".into()))
        );
        assert_eq!(write("workqueue/cpumask"), Some(("f".into(), "3".into())));
        let moves: BTreeMap<Tid, (String, Vec<u32>)> = plan
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::MoveTask {
                    tid,
                    to,
                    old_affinity,
                    ..
                } => Some((*tid, (dir_name(to), old_affinity.clone()))),
                _ => None,
            })
            .collect();
        let hk = HOUSEKEEPING_CPUSET.to_string();
        let iso = ISOLATED_CPUSET.to_string();
        assert_eq!(moves[&1], (hk.clone(), vec![2]));
        assert_eq!(moves[&2].0, hk, "kthreadd moves");
        assert_eq!(moves[&100].0, hk, "the emulator thread on housekeeping");
        assert_eq!(moves[&103].0, hk, "the IOThread on housekeeping");
        assert_eq!(
            (moves[&101].0.clone(), moves[&102].0.clone()),
            (iso.clone(), iso)
        );
        assert!(!moves.contains_key(&20));
        assert_eq!(plan.unmovable.len(), 1);
        assert!(
            plan.unmovable[0].what.contains("ksoftirqd/2"),
            "{:?}",
            plan.unmovable
        );
        let pins: Vec<(Tid, Vec<u32>)> = plan
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Affinity { tid, new, .. } => Some((*tid, new.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            pins,
            vec![(101, vec![2]), (102, vec![3])],
            "one vCPU per isolated CPU"
        );
        assert!(plan.changes.iter().any(|c| matches!(c,
            Change::Sched { tid: 101, new, .. } if new.policy == Policy::Fifo && new.priority == 60)));
        // Every change has a table row.
        assert!(plan.changes.iter().all(|c| !c.row().0.is_empty()));
    }

    #[test]
    fn apply_then_undo_restores_every_value_exactly() {
        let h = Fixture::new();
        let (files, threads) = (h.snapshot(), h.threads());
        let plan = plan(&h.host(&h.fs()), &h.request("2-3", true)).unwrap();
        let applied = apply(&h.host(&h.fs()), &plan, &h.state()).unwrap();
        assert_eq!(h.get("sys/fs/cgroup/cpuset/cpuset.sched_load_balance"), "0");
        assert_eq!(
            h.get("sys/fs/cgroup/cpuset/pvsched-isolated/cpuset.cpus"),
            "2-3"
        );
        assert_eq!(h.get("sys/fs/cgroup/cpuset/pvsched-isolated/tasks"), "102");
        assert_eq!(h.get("proc/irq/25/smp_affinity_list"), "0-1");
        assert_eq!(h.get("sys/devices/virtual/workqueue/cpumask"), "3");
        assert_eq!(h.sched.affinity(102), Some(vec![3]));
        assert_eq!(h.sched.attrs(101).unwrap().policy, Policy::Fifo);
        assert_eq!(applied.unmovable.len(), 1);
        let state = read_state(&h.state()).unwrap();
        assert!(state.complete);
        assert_eq!(state.changes, applied.changes);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(h.state()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second apply is refused and changes nothing.
        let during = h.snapshot();
        let again = plan_and_apply(&h);
        assert!(
            matches!(
                again,
                Err(IsolateError::Host(_)) | Err(IsolateError::AlreadyApplied(_))
            ),
            "{again:?}"
        );
        assert_eq!(h.snapshot(), during);
        // A moved task exits before the undo: counted, not an error.
        std::fs::remove_dir_all(h.path("proc/2")).unwrap();
        h.sched.remove_thread(2);
        let report = undo(&h.host(&h.fs()), &h.state()).unwrap();
        assert_eq!(report.exited, 1);
        assert!(report.failures.is_empty());
        let mut files = files;
        files.retain(|p, _| !p.starts_with(h.path("proc/2")));
        assert_eq!(h.snapshot(), files);
        let threads: Vec<_> = threads.into_iter().filter(|t| t.0 != 2).collect();
        assert_eq!(h.threads(), threads);
        assert!(!h.state().exists());
        assert!(matches!(
            undo(&h.host(&h.fs()), &h.state()),
            Err(IsolateError::State { .. })
        ));
    }

    fn plan_and_apply(h: &Fixture) -> Result<Applied, IsolateError> {
        let p = plan(&h.host(&h.fs()), &h.request("2-3", false))?;
        apply(&h.host(&h.fs()), &p, &h.state())
    }

    #[test]
    fn a_second_apply_is_refused_by_the_state_file_alone() {
        let h = Fixture::new();
        h.put("run/isolation.json", "{}");
        let before = h.snapshot();
        let err = plan_and_apply(&h).unwrap_err();
        assert!(matches!(err, IsolateError::AlreadyApplied(_)), "{err}");
        assert_eq!(h.snapshot(), before);
    }

    #[test]
    fn a_failure_in_the_middle_of_apply_rolls_back_everything() {
        let h = Fixture::new();
        let (files, threads) = (h.snapshot(), h.threads());
        let plan = plan(&h.host(&h.fs()), &h.request("2-3", true)).unwrap();
        // The workqueue mask turns unwritable (a directory in its place)
        // after the plan: cpusets, tasks and IRQs are done by then.
        let wq = h.path("sys/devices/virtual/workqueue/cpumask");
        std::fs::remove_file(&wq).unwrap();
        std::fs::create_dir(&wq).unwrap();
        let err = apply(&h.host(&h.fs()), &plan, &h.state()).unwrap_err();
        assert!(
            matches!(&err, IsolateError::RolledBack { rollback_failures, .. } if rollback_failures.is_empty()),
            "{err}"
        );
        assert!(err.to_string().contains("workqueue"), "{err}");
        std::fs::remove_dir(&wq).unwrap();
        h.put("sys/devices/virtual/workqueue/cpumask", "f\n");
        assert_eq!(h.snapshot(), files);
        assert_eq!(h.threads(), threads);
        assert!(!h.state().exists());
        // A vCPU thread that exits before it is pinned fails last: the
        // same. (The fixture's membership list holds the last tid written.)
        h.put(
            "sys/fs/cgroup/cpuset/tasks",
            "1\n2\n20\n100\n101\n102\n103\n",
        );
        let plan = super::plan(&h.host(&h.fs()), &h.request("2-3", true)).unwrap();
        h.sched.remove_thread(102);
        let err = apply(&h.host(&h.fs()), &plan, &h.state()).unwrap_err();
        assert!(
            matches!(&err, IsolateError::RolledBack { failed, rollback_failures }
            if rollback_failures.is_empty() && failed.to_string().contains("102")),
            "{err}"
        );
        assert_eq!(h.snapshot(), files);
        let threads: Vec<_> = threads.into_iter().filter(|t| t.0 != 102).collect();
        assert_eq!(h.threads(), threads);
        assert!(!h.state().exists());
    }

    #[test]
    fn bad_input_is_one_clear_error_and_changes_nothing() {
        let h = Fixture::new();
        let before = h.snapshot();
        for bad in ["", " ", "a", "3-1", "1-", "-1", "1;2", "1,1", "9000", "0x1"] {
            assert!(parse_cpus(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(parse_cpus(" 1,3-4\n").unwrap(), vec![1, 3, 4]);
        let try_plan = |req: Request| plan(&h.host(&h.fs()), &req).unwrap_err().to_string();
        assert!(try_plan(h.request("4", false)).contains("not online"));
        assert!(try_plan(h.request("0-3", false)).contains("no housekeeping CPU"));
        let mut req = h.request("2-3", false);
        req.rt_priority = 0;
        assert!(try_plan(req).contains("1..=99"));
        let mut req = h.request("3", true);
        assert!(try_plan(req.clone()).contains("each vCPU needs a CPU"));
        req.isolated = vec![2, 3];
        req.vm.as_mut().unwrap().vcpus = vec![101, 999];
        assert!(try_plan(req).contains("gone"));
        // CPU 0 may be isolated while another CPU keeps house.
        let p = plan(&h.host(&h.fs()), &h.request("0", false)).unwrap();
        assert_eq!(p.housekeeping, vec![1, 2, 3]);
        // A foreign cpuset on an isolated CPU, or a leftover of ours.
        h.put("sys/fs/cgroup/cpuset/docker/cpuset.cpus", "0-3");
        assert!(try_plan(h.request("2", false)).contains("docker"));
        std::fs::remove_dir_all(h.path("sys/fs/cgroup/cpuset/docker")).unwrap();
        h.put("sys/fs/cgroup/cpuset/pvsched-isolated/cpuset.cpus", "");
        assert!(try_plan(h.request("2", false)).contains("already exists"));
        std::fs::remove_dir_all(h.path("sys/fs/cgroup/cpuset/pvsched-isolated")).unwrap();
        assert_eq!(h.snapshot(), before);
        assert!(!h.state().exists());
    }

    #[test]
    fn an_unsafe_state_file_is_refused() {
        let h = Fixture::new();
        std::fs::create_dir_all(h.path("run")).unwrap();
        h.put("real.json", "{}");
        std::os::unix::fs::symlink(h.path("real.json"), h.state()).unwrap();
        let err = undo(&h.host(&h.fs()), &h.state()).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        // Applying over a symlink is refused as well.
        assert!(matches!(
            plan_and_apply(&h),
            Err(IsolateError::AlreadyApplied(_))
        ));
        std::fs::remove_file(h.state()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        h.put("run/isolation.json", "{}");
        std::fs::set_permissions(h.state(), std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = undo(&h.host(&h.fs()), &h.state()).unwrap_err();
        assert!(err.to_string().contains("others write"), "{err}");
        if crate::sys::is_root() {
            std::fs::set_permissions(h.state(), std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(h.state(), Some(65534), None).unwrap();
            let err = undo(&h.host(&h.fs()), &h.state()).unwrap_err();
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        }
    }

    #[test]
    fn a_cgroup_v2_partition_is_planned_without_moving_tasks() {
        let h = Fixture::new();
        h.put(
            "sys/fs/cgroup/unified/cgroup.controllers",
            "cpuset memory\n",
        );
        h.put("sys/fs/cgroup/unified/cgroup.subtree_control", "memory\n");
        let p = plan(&h.host(&h.fs()), &h.request("2-3", false)).unwrap();
        let root = h.path("sys/fs/cgroup/unified");
        assert_eq!(p.hierarchy, Hierarchy::V2(root.clone()));
        assert!(
            matches!(&p.changes[0], Change::Write { kind: FileKind::SubtreeControl, new, .. } if new == "+cpuset")
        );
        assert!(p
            .changes
            .iter()
            .any(|c| matches!(c, Change::Write { path, new, .. }
            if path == &root.join("pvsched-isolated/cpuset.cpus.partition") && new == "isolated")));
        assert!(!p
            .changes
            .iter()
            .any(|c| matches!(c, Change::MoveTask { .. })));
        // systemd was pinned to CPU 2: its affinity is kept for the undo.
        assert!(p
            .changes
            .iter()
            .any(|c| matches!(c, Change::KeepAffinity { tid: 1, old, .. } if old == &vec![2])));
        let err = plan(&h.host(&h.fs()), &h.request("2-3", true)).unwrap_err();
        assert!(err.to_string().contains("threaded cgroups"), "{err}");
        let before = (h.snapshot(), h.threads());
        apply(&h.host(&h.fs()), &p, &h.state()).unwrap();
        assert_eq!(
            h.get("sys/fs/cgroup/unified/pvsched-isolated/cpuset.cpus.partition"),
            "isolated"
        );
        undo(&h.host(&h.fs()), &h.state()).unwrap();
        let mut after = h.snapshot();
        // Undo disables the controller it enabled (the kernel then lists
        // the rest; a fixture keeps the last write).
        assert_eq!(
            after
                .insert(root.join("cgroup.subtree_control"), "memory".into())
                .as_deref(),
            Some("-cpuset")
        );
        assert_eq!((after, h.threads()), before);
    }

    #[test]
    fn cpu_lists_and_masks_round_trip() {
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpu_mask(&[0, 1]), "3");
        assert_eq!(format_cpu_mask(&[0, 33]), "2,00000001");
        assert_eq!(parse_cpu_mask("2,00000001"), Some(vec![0, 33]));
        assert_eq!(parse_cpu_mask("ffffffff,00000001").unwrap().len(), 33);
        assert_eq!(parse_cpu_mask("xyz"), None);
        assert_eq!(parse_cpu_mask(""), None);
    }
}
