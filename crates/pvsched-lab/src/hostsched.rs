//! Host thread scheduling for the experiment: reading a thread's policy from `/proc` and
//! setting it with util-linux `chrt` (the lab crate has no `unsafe`, so no syscalls here).

use std::fs;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::command::run;
use crate::error::{LabError, Result};

/// `SCHED_FIFO`.
const SCHED_FIFO: u32 = 1;
/// `SCHED_RR`.
const SCHED_RR: u32 = 2;
/// `SCHED_DEADLINE`.
const SCHED_DEADLINE: u32 = 6;

/// A thread's scheduling policy and RT priority as `/proc/<pid>/task/<tid>/stat` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadPolicy {
    /// Kernel `SCHED_*` number (0 normal, 1 FIFO, 2 RR, 3 batch, 5 idle, 6 deadline).
    pub policy: u32,
    /// RT priority (0 for non-RT policies).
    pub rt_priority: u32,
}

impl ThreadPolicy {
    /// True for FIFO, RR and DEADLINE: the policies that preempt normal host work.
    pub fn is_realtime(self) -> bool {
        matches!(self.policy, SCHED_FIFO | SCHED_RR | SCHED_DEADLINE)
    }

    /// Short text: `normal`, `fifo/8`, `rr/3`, ...
    pub fn describe(self) -> String {
        let name = match self.policy {
            0 => "normal",
            SCHED_FIFO => "fifo",
            SCHED_RR => "rr",
            3 => "batch",
            5 => "idle",
            SCHED_DEADLINE => "deadline",
            _ => "unknown",
        };
        if self.is_realtime() {
            format!("{name}/{}", self.rt_priority)
        } else {
            name.to_owned()
        }
    }
}

/// Parses the `stat` line of a task: `rt_priority` and `policy` are fields 40 and 41,
/// counted after the command name, which may itself contain spaces and parentheses.
pub fn parse_stat_policy(stat: &str) -> Option<ThreadPolicy> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // After the comm field, index 0 is field 3 (state); field N is at N - 3.
    let rt_priority = fields.get(40 - 3)?.parse().ok()?;
    let policy = fields.get(41 - 3)?.parse().ok()?;
    Some(ThreadPolicy {
        policy,
        rt_priority,
    })
}

/// The policy of thread `tid` of process `pid`, or `None` when it has exited.
pub fn thread_policy(proc_root: &Path, pid: u32, tid: u32) -> Option<ThreadPolicy> {
    let path = proc_root
        .join(pid.to_string())
        .join("task")
        .join(tid.to_string())
        .join("stat");
    parse_stat_policy(&fs::read_to_string(path).ok()?)
}

/// CPU time (ns) used so far by the live threads of process `pid`: the sum of the first
/// field of every `/proc/<pid>/task/*/schedstat`; `None` when the process is gone.
pub fn process_cpu_ns(proc_root: &Path, pid: u32) -> Option<u64> {
    let tasks = fs::read_dir(proc_root.join(pid.to_string()).join("task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        if let Some(ns) = fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|text| parse_schedstat_cpu_ns(&text))
        {
            total = total.saturating_add(ns);
        }
    }
    Some(total)
}

/// The CPU time (ns) in a `schedstat` line: `<run ns> <wait ns> <slices>`.
pub fn parse_schedstat_cpu_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// A thread of a process that has a real-time policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtThread {
    /// Thread id.
    pub tid: u32,
    /// Thread name (`comm`).
    pub name: String,
    /// Its policy, e.g. `fifo/8`.
    pub policy: String,
}

/// Every thread of process `pid` that has a real-time policy.
pub fn realtime_threads(proc_root: &Path, pid: u32) -> Result<Vec<RtThread>> {
    Ok(scan_threads(proc_root, pid)?.1)
}

/// Reads the policy of every thread of process `pid`: how many threads were read, and the
/// ones with a real-time policy, by tid. A thread that exits while the directory is read
/// is not counted.
pub fn scan_threads(proc_root: &Path, pid: u32) -> Result<(u32, Vec<RtThread>)> {
    let task_dir = proc_root.join(pid.to_string()).join("task");
    let entries = fs::read_dir(&task_dir).map_err(LabError::io("list", &task_dir))?;
    let mut read = 0u32;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Some(policy) = thread_policy(proc_root, pid, tid) else {
            continue;
        };
        read += 1;
        if policy.is_realtime() {
            let name = fs::read_to_string(entry.path().join("comm"))
                .map(|comm| comm.trim().to_owned())
                .unwrap_or_default();
            found.push(RtThread {
                tid,
                name,
                policy: policy.describe(),
            });
        }
    }
    found.sort_by_key(|thread| thread.tid);
    Ok((read, found))
}

/// Sets thread `tid` to `SCHED_FIFO` at `priority` (`chrt -f -p PRIO TID`).
pub fn set_fifo(tid: u32, priority: u8) -> Result<()> {
    run(Command::new("chrt")
        .args(["-f", "-p", &priority.to_string(), &tid.to_string()])
        .env("LC_ALL", "C"))?;
    Ok(())
}

/// Returns thread `tid` to `SCHED_OTHER` (`chrt -o -p 0 TID`).
pub fn set_normal(tid: u32) -> Result<()> {
    run(Command::new("chrt")
        .args(["-o", "-p", "0", &tid.to_string()])
        .env("LC_ALL", "C"))?;
    Ok(())
}

/// Threads the lab itself made real-time; returned to `SCHED_OTHER` by
/// [`StaticRt::restore`] or, failing that, on drop.
#[derive(Debug, Default)]
pub struct StaticRt {
    tids: Vec<u32>,
    /// Processes all of whose threads were raised: a thread they create meanwhile inherits
    /// FIFO, so the restore scans them again and returns every RT thread it finds.
    whole_processes: Vec<u32>,
}

impl StaticRt {
    /// Sets every thread in `tids` to FIFO `priority`. On a failure the threads already set
    /// are restored (by drop) and the error is returned.
    pub fn apply(tids: &[u32], priority: u8) -> Result<Self> {
        let mut applied = StaticRt::default();
        for &tid in tids {
            set_fifo(tid, priority)?;
            applied.tids.push(tid);
        }
        Ok(applied)
    }

    /// Sets every thread of every process in `pids` to FIFO `priority` (as
    /// [`StaticRt::apply`]); [`StaticRt::restore`] then also returns threads the processes
    /// created after this call (they inherit FIFO).
    pub fn apply_processes(pids: &[u32], priority: u8) -> Result<Self> {
        let mut applied = StaticRt::default();
        for &pid in pids {
            applied.whole_processes.push(pid);
            let dir = Path::new("/proc").join(pid.to_string()).join("task");
            let entries = fs::read_dir(&dir).map_err(LabError::io("list", &dir))?;
            let mut tids: Vec<u32> = entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect();
            tids.sort_unstable();
            for tid in tids {
                set_fifo(tid, priority)?;
                applied.tids.push(tid);
            }
        }
        Ok(applied)
    }

    /// Threads raised by the apply call.
    pub fn threads(&self) -> &[u32] {
        &self.tids
    }

    /// Returns every thread to `SCHED_OTHER`; the first error is returned after trying all.
    /// `Ok(n)`: `n` threads created after the apply call had inherited FIFO and were
    /// returned too.
    pub fn restore(mut self) -> Result<usize> {
        self.restore_all()
    }

    fn restore_all(&mut self) -> Result<usize> {
        let mut first_error = None;
        for tid in self.tids.drain(..) {
            if let Err(error) = set_normal(tid) {
                // A thread that exited needs no restore; anything else is reported.
                if Path::new(&format!("/proc/{tid}")).exists() {
                    first_error.get_or_insert(error);
                }
            }
        }
        let mut inherited = 0;
        for pid in self.whole_processes.drain(..) {
            let Ok(threads) = realtime_threads(Path::new("/proc"), pid) else {
                continue; // the process exited
            };
            for thread in threads {
                match set_normal(thread.tid) {
                    Ok(()) => inherited += 1,
                    Err(error) => {
                        if Path::new(&format!("/proc/{}", thread.tid)).exists() {
                            first_error.get_or_insert(error);
                        }
                    }
                }
            }
        }
        first_error.map_or(Ok(inherited), Err)
    }
}

impl Drop for StaticRt {
    fn drop(&mut self) {
        // Best effort on error paths; the normal path calls restore() and checks.
        let _ = self.restore_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_time_sums_its_threads() {
        assert_eq!(parse_schedstat_cpu_ns("123456 789 10\n"), Some(123_456));
        assert_eq!(parse_schedstat_cpu_ns(""), None);
        assert_eq!(parse_schedstat_cpu_ns("x 1 2"), None);
        // This process has used CPU, and a spinning thread adds to it.
        let proc_root = Path::new("/proc");
        let me = std::process::id();
        let before = process_cpu_ns(proc_root, me).expect("own schedstat");
        // The spinner stays alive (its task entry with it) until it has been counted.
        let (spun_tx, spun_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let spin = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut x = 0u64;
            while start.elapsed() < std::time::Duration::from_millis(30) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            spun_tx.send(()).unwrap();
            let _ = done_rx.recv();
        });
        spun_rx.recv().unwrap();
        let after = process_cpu_ns(proc_root, me).expect("own schedstat");
        drop(done_tx);
        spin.join().unwrap();
        assert!(after > before, "{before} -> {after}");
        assert_eq!(process_cpu_ns(proc_root, u32::MAX), None);
    }

    /// A real stat line of a FIFO-8 thread whose name has a space and parentheses.
    const STAT: &str = "4249 (CPU 0/TCG (x)) S 1 4242 4242 0 -1 4194368 1234 0 0 0 \
        500 100 0 0 -9 0 5 0 123456 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 4096 \
        0 0 0 0 17 1 8 1 0 0 0 0 0 0 0 0 0 0 0";

    #[test]
    fn stat_policy_fields() {
        let policy = parse_stat_policy(STAT).expect("parse");
        assert_eq!(
            policy,
            ThreadPolicy {
                policy: 1,
                rt_priority: 8
            }
        );
        assert!(policy.is_realtime());
        assert_eq!(policy.describe(), "fifo/8");
        assert!(parse_stat_policy("1 (init) S 0").is_none());
    }

    #[test]
    fn scan_reads_every_thread_of_this_process() {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let helper = std::thread::spawn(move || {
            let _ = stop_rx.recv();
        });
        let (read, realtime) =
            scan_threads(Path::new("/proc"), std::process::id()).expect("scan own threads");
        drop(stop_tx);
        helper.join().expect("helper");
        // The test's own thread and the helper at least, none of them RT.
        assert!(read >= 2, "{read} threads read");
        assert!(realtime.is_empty(), "{realtime:?}");
    }

    #[test]
    fn own_thread_is_normal() {
        let pid = std::process::id();
        let policy = thread_policy(Path::new("/proc"), pid, pid).expect("own stat");
        assert!(!policy.is_realtime(), "{policy:?}");
        assert_eq!(policy.describe(), "normal");
    }
}
