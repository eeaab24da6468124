//! What isolation touches on a real host, read back for the root tests:
//! every cpuset, IRQ and mask value and every thread's cpuset and affinity,
//! so a test compares the host before isolation and after its undo.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use pvsched_host::HostFs;

/// The cgroup v1 cpuset hierarchy the root tests isolate in.
pub const CPUSET: &str = "/sys/fs/cgroup/cpuset";

/// Every value isolation touches, keyed by file (tasks: by tid and start
/// time, so a reused tid is not compared with another thread).
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub files: BTreeMap<String, String>,
    pub tasks: BTreeMap<(i32, u64), (String, String)>,
}

pub fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

pub fn status_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
}

pub fn snapshot() -> Snapshot {
    let mut files = BTreeMap::new();
    for f in [
        "cpuset.cpus",
        "cpuset.mems",
        "cpuset.cpu_exclusive",
        "cpuset.mem_exclusive",
        "cpuset.sched_load_balance",
        "cpuset.sched_relax_domain_level",
    ] {
        let p = Path::new(CPUSET).join(f);
        files.insert(p.display().to_string(), read(&p).unwrap());
    }
    let children: Vec<String> = std::fs::read_dir(CPUSET)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.insert("cpuset children".into(), children.join(","));
    for e in std::fs::read_dir("/proc/irq").unwrap().flatten() {
        let p = e.path().join("smp_affinity_list");
        if let Some(v) = read(&p) {
            files.insert(p.display().to_string(), v);
        }
    }
    for p in [
        "/proc/irq/default_smp_affinity",
        "/sys/devices/virtual/workqueue/cpumask",
    ] {
        files.insert(p.into(), read(p).unwrap());
    }
    let fs = HostFs::default();
    let mut tasks = BTreeMap::new();
    for pid in fs.pids().unwrap() {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let dir = e.path();
            let (Ok(stat), Some(cpuset), Some(status)) = (
                fs.task_stat(pid, tid),
                read(dir.join("cpuset")),
                read(dir.join("status")),
            ) else {
                continue;
            };
            let Some(affinity) = status_field(&status, "Cpus_allowed_list:") else {
                continue;
            };
            tasks.insert((tid, stat.starttime), (cpuset, affinity));
        }
    }
    Snapshot { files, tasks }
}

/// A thread's cpuset, affinity list, policy and RT priority.
pub fn task_view(pid: i32, tid: i32) -> (String, String, u32, u32) {
    let dir = format!("/proc/{pid}/task/{tid}");
    let status = read(format!("{dir}/status")).unwrap();
    let st = HostFs::default().task_stat(pid, tid).unwrap();
    (
        read(format!("{dir}/cpuset")).unwrap(),
        status_field(&status, "Cpus_allowed_list:").unwrap(),
        st.policy,
        st.rt_priority,
    )
}

impl Snapshot {
    /// How `after` differs from this snapshot: every file, and every thread
    /// still running (same tid and start time); empty when equal.
    pub fn differences(&self, after: &Snapshot) -> Vec<String> {
        let mut differ = Vec::new();
        for (key, was) in &self.files {
            let now = after.files.get(key);
            if now != Some(was) {
                differ.push(format!("{key}: {was:?} -> {now:?}"));
            }
        }
        for key in after.files.keys() {
            if !self.files.contains_key(key) {
                differ.push(format!("{key}: new"));
            }
        }
        for (key, was) in &self.tasks {
            if let Some(now) = after.tasks.get(key) {
                if now != was {
                    differ.push(format!("task {}: {was:?} -> {now:?}", key.0));
                }
            }
        }
        differ
    }
}
