//! Host information from `/proc` and `/sys`, under configurable roots so
//! tests run on fixture trees.
//!
//! Per-thread files are kept open and re-read with `pread` at offset 0
//! (seq_file regenerates the content), which costs about a third of an
//! open/read/close.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::sched::Tid;

/// A `/proc` or `/sys` read that failed or did not parse.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The file could not be read.
    #[error("reading {path}")]
    Io {
        /// File.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The content did not parse.
    #[error("parsing {path}: {what}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What was wrong.
        what: &'static str,
    },
}

impl ProcError {
    /// Whether the file (and so usually the process or thread) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ProcError::Io { source, .. }
            if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH))
    }
}

/// The roots of `/proc` and `/sys`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFs {
    /// `/proc` or a fixture.
    pub proc_root: PathBuf,
    /// `/sys` or a fixture.
    pub sys_root: PathBuf,
}

impl Default for HostFs {
    fn default() -> Self {
        HostFs {
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
        }
    }
}

/// The fields of `/proc/<pid>/task/<tid>/stat` the daemon uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskStat {
    /// Field 3: `R`, `S`, `D`, ...
    pub state: char,
    /// Field 9: `PF_*` flags (`PF_KTHREAD`, `PF_NO_SETAFFINITY`, ...).
    pub flags: u64,
    /// Field 19: nice.
    pub nice: i32,
    /// Field 22: start time in clock ticks since boot (identity against pid reuse).
    pub starttime: u64,
    /// Field 39: CPU the thread last ran on.
    pub processor: u32,
    /// Field 40: RT priority.
    pub rt_priority: u32,
    /// Field 41: policy.
    pub policy: u32,
}

/// `/proc/<pid>/task/<tid>/schedstat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStat {
    /// Time spent on a CPU (ns).
    pub run_ns: u64,
    /// Time spent runnable, waiting for a CPU (ns): the run delay.
    pub wait_ns: u64,
    /// Timeslices run.
    pub slices: u64,
}

fn read_to_string(path: &Path) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Parses a `stat` line (the command name may hold spaces and parentheses).
pub fn parse_task_stat(text: &str) -> Option<TaskStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // f[0] is field 3.
    let field = |n: usize| f.get(n - 3).copied();
    Some(TaskStat {
        state: field(3)?.chars().next()?,
        flags: field(9)?.parse().ok()?,
        nice: field(19)?.parse().ok()?,
        starttime: field(22)?.parse().ok()?,
        processor: field(39)?.parse().ok()?,
        rt_priority: field(40)?.parse().ok()?,
        policy: field(41)?.parse().ok()?,
    })
}

/// Parses a `schedstat` line.
pub fn parse_schedstat(text: &str) -> Option<SchedStat> {
    let mut it = text.split_ascii_whitespace().map(|s| s.parse::<u64>());
    Some(SchedStat {
        run_ns: it.next()?.ok()?,
        wait_ns: it.next()?.ok()?,
        slices: it.next()?.ok()?,
    })
}

/// Busy and total jiffies of one CPU from `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Non-idle time.
    pub busy: u64,
    /// All time.
    pub total: u64,
}

/// Parses the per-CPU lines of `/proc/stat`, indexed by CPU number.
pub fn parse_proc_stat(text: &str) -> Vec<Option<CpuTimes>> {
    let mut out: Vec<Option<CpuTimes>> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line
            .strip_prefix("cpu")
            .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        else {
            continue; // other lines, and the aggregate "cpu " line
        };
        let mut f = rest.split_ascii_whitespace();
        let Some(Ok(cpu)) = f.next().map(|s| s.parse::<usize>()) else {
            continue;
        };
        let v: Vec<u64> = f.filter_map(|s| s.parse().ok()).collect();
        if v.len() < 4 || cpu > 65_535 {
            continue;
        }
        // user nice system idle iowait irq softirq steal (guest is inside user).
        let idle = v[3] + v.get(4).copied().unwrap_or(0);
        let total: u64 = v.iter().take(8).sum();
        if out.len() <= cpu {
            out.resize(cpu + 1, None);
        }
        out[cpu] = Some(CpuTimes {
            busy: total.saturating_sub(idle),
            total,
        });
    }
    out
}

/// Parses a sysfs CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 65_536 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

impl HostFs {
    /// Roots other than `/proc` and `/sys`.
    pub fn new(proc_root: impl Into<PathBuf>, sys_root: impl Into<PathBuf>) -> Self {
        HostFs {
            proc_root: proc_root.into(),
            sys_root: sys_root.into(),
        }
    }

    /// `/proc/<pid>/task/<tid>`.
    pub fn task_dir(&self, pid: i32, tid: Tid) -> PathBuf {
        self.proc_root
            .join(pid.to_string())
            .join("task")
            .join(tid.to_string())
    }

    /// Reads a thread's `stat`.
    pub fn task_stat(&self, pid: i32, tid: Tid) -> Result<TaskStat, ProcError> {
        let path = self.task_dir(pid, tid).join("stat");
        let text = read_to_string(&path)?;
        parse_task_stat(&text).ok_or(ProcError::Parse {
            path,
            what: "stat fields",
        })
    }

    /// Reads a thread's `schedstat`.
    pub fn task_schedstat(&self, pid: i32, tid: Tid) -> Result<SchedStat, ProcError> {
        let path = self.task_dir(pid, tid).join("schedstat");
        let text = read_to_string(&path)?;
        parse_schedstat(&text).ok_or(ProcError::Parse {
            path,
            what: "schedstat fields",
        })
    }

    /// A thread's `comm`.
    pub fn task_comm(&self, pid: i32, tid: Tid) -> Result<String, ProcError> {
        Ok(read_to_string(&self.task_dir(pid, tid).join("comm"))?
            .trim_end()
            .to_owned())
    }

    /// The process (thread-group) id of any thread id, from `/proc/<tid>/status`.
    pub fn tgid_of(&self, tid: Tid) -> Result<i32, ProcError> {
        let path = self.proc_root.join(tid.to_string()).join("status");
        let text = read_to_string(&path)?;
        text.lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or(ProcError::Parse {
                path,
                what: "Tgid line",
            })
    }

    /// Process ids, from the numeric entries of the proc root.
    pub fn pids(&self) -> Result<Vec<i32>, ProcError> {
        let rd = std::fs::read_dir(&self.proc_root).map_err(|source| ProcError::Io {
            path: self.proc_root.clone(),
            source,
        })?;
        let mut pids: Vec<i32> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// A process's command line, split at NUL bytes.
    pub fn cmdline(&self, pid: i32) -> Result<Vec<String>, ProcError> {
        let path = self.proc_root.join(pid.to_string()).join("cmdline");
        let bytes = std::fs::read(&path).map_err(|source| ProcError::Io { path, source })?;
        Ok(split_cmdline(&bytes))
    }

    /// Online CPUs (sysfs `devices/system/cpu/online`; this process's
    /// available parallelism when that cannot be read), at least 1.
    pub fn online_cpus(&self) -> u32 {
        std::fs::read_to_string(self.sys_root.join("devices/system/cpu/online"))
            .ok()
            .and_then(|t| parse_cpu_list(t.trim()))
            .map(|cpus| cpus.len() as u32)
            .filter(|&n| n > 0)
            .or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .map(|n| n.get() as u32)
            })
            .unwrap_or(1)
    }

    /// SMT siblings of each CPU (index: CPU number; empty if unknown).
    pub fn smt_siblings(&self) -> Vec<Vec<u32>> {
        let base = self.sys_root.join("devices/system/cpu");
        let mut out: Vec<Vec<u32>> = Vec::new();
        let Ok(rd) = std::fs::read_dir(&base) else {
            return out;
        };
        for entry in rd.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            let Some(cpu) = name
                .to_str()
                .and_then(|n| n.strip_prefix("cpu"))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            if cpu > 65_535 {
                continue;
            }
            let list = std::fs::read_to_string(entry.path().join("topology/thread_siblings_list"))
                .ok()
                .and_then(|t| parse_cpu_list(&t))
                .unwrap_or_default();
            if out.len() <= cpu {
                out.resize(cpu + 1, Vec::new());
            }
            out[cpu] = list.into_iter().filter(|&s| s as usize != cpu).collect();
        }
        out
    }
}

/// Open `stat` and `schedstat` files of one thread, re-read with `pread`.
#[derive(Debug)]
pub struct ThreadFiles {
    stat: File,
    schedstat: File,
    buf: Vec<u8>,
}

fn pread_all(file: &File, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.resize(buf.capacity().max(1024), 0);
    let mut len = 0;
    loop {
        let n = file.read_at(&mut buf[len..], len as u64)?;
        if n == 0 {
            return Ok(len);
        }
        len += n;
        if len == buf.len() {
            if buf.len() >= 64 * 1024 {
                return Ok(len);
            }
            buf.resize(buf.len() * 2, 0);
        }
    }
}

impl ThreadFiles {
    /// Opens the files of `/proc/<pid>/task/<tid>`.
    pub fn open(fs: &HostFs, pid: i32, tid: Tid) -> Result<Self, ProcError> {
        let dir = fs.task_dir(pid, tid);
        let open = |name: &str| {
            let path = dir.join(name);
            File::open(&path).map_err(|source| ProcError::Io { path, source })
        };
        Ok(ThreadFiles {
            stat: open("stat")?,
            schedstat: open("schedstat")?,
            buf: Vec::with_capacity(1024),
        })
    }

    /// Re-reads `schedstat`.
    pub fn schedstat(&mut self) -> io::Result<SchedStat> {
        let n = pread_all(&self.schedstat, &mut self.buf)?;
        std::str::from_utf8(&self.buf[..n])
            .ok()
            .and_then(parse_schedstat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "schedstat"))
    }

    /// Re-reads `stat`.
    pub fn stat(&mut self) -> io::Result<TaskStat> {
        let n = pread_all(&self.stat, &mut self.buf)?;
        std::str::from_utf8(&self.buf[..n])
            .ok()
            .and_then(parse_task_stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "stat"))
    }
}

/// Per-pCPU load over the last sampling interval, and SMT topology.
#[derive(Debug)]
pub struct HostSampler {
    stat: Option<File>,
    buf: Vec<u8>,
    last: Vec<Option<CpuTimes>>,
    load: Vec<u32>,
    siblings: Vec<Vec<u32>>,
}

impl HostSampler {
    /// Opens `/proc/stat` and reads the SMT topology once.
    pub fn new(fs: &HostFs) -> Self {
        HostSampler {
            stat: File::open(fs.proc_root.join("stat")).ok(),
            buf: Vec::with_capacity(16 * 1024),
            last: Vec::new(),
            load: Vec::new(),
            siblings: fs.smt_siblings(),
        }
    }

    /// Takes a new `/proc/stat` sample; loads are relative to the previous one.
    pub fn sample(&mut self) {
        let Some(file) = &self.stat else {
            return;
        };
        let Ok(n) = pread_all(file, &mut self.buf) else {
            return;
        };
        let now = parse_proc_stat(&String::from_utf8_lossy(&self.buf[..n]));
        self.load = now
            .iter()
            .enumerate()
            .map(
                |(cpu, t)| match (t, self.last.get(cpu).copied().flatten()) {
                    (Some(t), Some(l)) if t.total > l.total => {
                        let busy = t.busy.saturating_sub(l.busy);
                        (busy.saturating_mul(1000) / (t.total - l.total)).min(1000) as u32
                    }
                    _ => 0,
                },
            )
            .collect();
        self.last = now;
    }

    /// Load of `cpu` in permille (0 when unknown).
    pub fn load_permille(&self, cpu: u32) -> u32 {
        self.load.get(cpu as usize).copied().unwrap_or(0)
    }

    /// Whether an SMT sibling of `cpu` was busy (at least half loaded) over the last interval.
    pub fn sibling_busy(&self, cpu: u32) -> bool {
        self.siblings
            .get(cpu as usize)
            .is_some_and(|s| s.iter().any(|&c| self.load_permille(c) >= 500))
    }

    /// The SMT siblings of `cpu`.
    pub fn siblings(&self, cpu: u32) -> &[u32] {
        self.siblings.get(cpu as usize).map_or(&[], |s| s)
    }
}

/// Splits the bytes of `/proc/<pid>/cmdline` (NUL-terminated arguments,
/// written by the process itself) into arguments; empty ones are dropped.
pub fn split_cmdline(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str =
        "4242 (CPU 0/TCG (x) y) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 20 -5 6 0 987654 \
        1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 3 7 2 0 0 0\n";

    #[test]
    fn stat_with_spaces_and_parentheses_in_comm_parses() {
        let s = parse_task_stat(STAT).unwrap();
        assert_eq!(s.state, 'R');
        assert_eq!(s.nice, -5);
        assert_eq!(s.starttime, 987654);
        assert_eq!(s.processor, 3);
        assert_eq!(s.rt_priority, 7);
        assert_eq!(s.policy, 2);
        assert!(parse_task_stat("1 (x) R 1 2").is_none());
    }

    #[test]
    fn own_thread_parses_from_the_real_proc() {
        let fs = HostFs::default();
        let pid = std::process::id() as i32;
        let tid = crate::sys::gettid();
        let s = fs.task_stat(pid, tid).unwrap();
        assert_eq!(s.state, 'R');
        assert!(s.starttime > 0);
        assert_eq!(fs.tgid_of(tid).unwrap(), pid);
        let mut files = ThreadFiles::open(&fs, pid, tid).unwrap();
        let a = files.schedstat().unwrap();
        let mut x = 0u64;
        for i in 0..200_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let b = files.schedstat().unwrap();
        assert!(b.run_ns >= a.run_ns);
        assert_eq!(files.stat().unwrap().starttime, s.starttime);
        let mut sampler = HostSampler::new(&fs);
        sampler.sample();
        sampler.sample();
        assert!(sampler.load_permille(0) <= 1000);
    }

    #[test]
    fn proc_stat_and_cpu_lists_parse() {
        let text =
            "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 0 0 0\ncpu2 1 1 1 1 1\nintr 5\n";
        let v = parse_proc_stat(text);
        assert_eq!(v.len(), 3);
        assert_eq!(
            v[0],
            Some(CpuTimes {
                busy: 10,
                total: 50
            })
        );
        assert_eq!(v[1], None);
        assert_eq!(v[2], Some(CpuTimes { busy: 3, total: 5 }));
        assert_eq!(parse_cpu_list("0-2,5\n"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), Some(vec![]));
    }

    #[test]
    fn fixture_tree_gives_load_and_sibling_state() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        let sys_root = dir.path().join("sys");
        std::fs::create_dir_all(&proc_root).unwrap();
        for cpu in 0..4 {
            let topo = sys_root.join(format!("devices/system/cpu/cpu{cpu}/topology"));
            std::fs::create_dir_all(&topo).unwrap();
            let sib = if cpu < 2 { "0-1" } else { "2-3" };
            std::fs::write(topo.join("thread_siblings_list"), sib).unwrap();
        }
        let stat = proc_root.join("stat");
        std::fs::write(
            &stat,
            "cpu0 0 0 0 0\ncpu1 0 0 0 0\ncpu2 0 0 0 0\ncpu3 0 0 0 0\n",
        )
        .unwrap();
        let fs = HostFs::new(&proc_root, &sys_root);
        let mut sampler = HostSampler::new(&fs);
        sampler.sample();
        // cpu1 fully busy, cpu3 10% busy.
        std::fs::write(
            &stat,
            "cpu0 0 0 0 100\ncpu1 100 0 0 0\ncpu2 0 0 0 100\ncpu3 10 0 0 90\n",
        )
        .unwrap();
        sampler.sample();
        assert_eq!(sampler.load_permille(1), 1000);
        assert_eq!(sampler.load_permille(3), 100);
        assert!(sampler.sibling_busy(0));
        assert!(!sampler.sibling_busy(1));
        assert!(!sampler.sibling_busy(2));
        assert_eq!(sampler.siblings(2), &[3]);
    }
}
