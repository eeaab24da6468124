//! The host side of an experiment: stress-ng as host load (its bogo-ops are the host
//! throughput) and cyclictest at a low RT priority for host latency, plus the process
//! handling they share (signal by pid, reap with a deadline, stop on drop).
//!
//! The children stay in the lab's process group on purpose: a Ctrl-C in the terminal then
//! reaches stress-ng, cyclictest, the daemon (which restores threads on SIGINT) and QEMU.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::command::describe;
use crate::cyclictest::{histogram_buckets, parse_histogram, LatencySummary};
use crate::error::{LabError, Result};

/// Sends `signal` (a name such as `TERM`) to `pid` with the `kill` program. Errors (the
/// process is already gone) are ignored.
pub(crate) fn signal(pid: u32, signal: &str) {
    if pid == 0 {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Every child process the lab started and has not yet dropped: what a stop request
/// (a signal to `pvsched lab`) sends SIGTERM to.
static CHILDREN: std::sync::Mutex<std::collections::BTreeSet<u32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Records a child process for [`stop_children`].
pub(crate) fn track_child(pid: u32) {
    if let Ok(mut children) = CHILDREN.lock() {
        children.insert(pid);
    }
}

/// Forgets a child process (it was reaped, or is about to be).
pub(crate) fn untrack_child(pid: u32) {
    if let Ok(mut children) = CHILDREN.lock() {
        children.remove(&pid);
    }
}

/// The parent pid in a `/proc/<pid>/stat` line (the field after the state, which follows
/// the command name's closing parenthesis).
fn stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Sends SIGTERM to every tracked child that is still this process's child (a pid that
/// was reaped and reused by some other process is left alone). Returns how many.
pub(crate) fn stop_children() -> usize {
    let pids: Vec<u32> = CHILDREN
        .lock()
        .map(|children| children.iter().copied().collect())
        .unwrap_or_default();
    stop_own(&pids)
}

/// Sends SIGTERM to each of `pids` that is this process's child; returns how many.
fn stop_own(pids: &[u32]) -> usize {
    let me = std::process::id();
    let mut stopped = 0;
    for &pid in pids {
        let ours = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat_ppid(&stat))
            == Some(me);
        if ours {
            signal(pid, "TERM");
            stopped += 1;
        }
    }
    stopped
}

/// A child process, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub(crate) struct ManagedChild {
    child: Option<Child>,
    what: String,
}

impl ManagedChild {
    /// Spawns `command`.
    pub(crate) fn spawn(mut command: Command) -> Result<Self> {
        let what = describe(&command);
        let child = command.spawn().map_err(|source| LabError::Spawn {
            program: what.clone(),
            source,
        })?;
        track_child(child.id());
        Ok(Self {
            child: Some(child),
            what,
        })
    }

    /// The process id (0 once reaped).
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// True while the process has not exited.
    pub(crate) fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Waits up to `timeout` for the process to exit by itself; then sends `then` (e.g.
    /// `TERM`, after which stress-ng and cyclictest still report what they have) and waits
    /// `grace` more, and finally kills it. Returns the exit status text and
    /// whether the process exited by itself within `timeout`.
    pub(crate) fn finish(
        &mut self,
        timeout: Duration,
        then: &str,
        grace: Duration,
    ) -> Result<(String, bool)> {
        let Some(child) = self.child.as_mut() else {
            return Ok(("already reaped".into(), false));
        };
        let pid = child.id();
        if let Some(status) = wait_until(child, Instant::now() + timeout)? {
            self.child = None;
            return Ok((status, true));
        }
        signal(pid, then);
        if let Some(status) = wait_until(child, Instant::now() + grace)? {
            self.child = None;
            return Ok((status, false));
        }
        signal(pid, "KILL");
        let status = child.wait().map_err(|source| LabError::Spawn {
            program: self.what.clone(),
            source,
        })?;
        self.child = None;
        Ok((format!("{status} (killed)"), false))
    }
}

fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<String>> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status.to_string())),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => return Ok(None),
            Err(source) => {
                return Err(LabError::Spawn {
                    program: "wait".into(),
                    source,
                })
            }
        }
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            untrack_child(child.id());
            if matches!(child.try_wait(), Ok(None)) {
                signal(child.id(), "TERM");
                if !matches!(
                    wait_until(&mut child, Instant::now() + Duration::from_secs(3)),
                    Ok(Some(_))
                ) {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

/// The host load: stress-ng stressors, scaled to the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSpec {
    /// `--cpu N` (0: no CPU stressor).
    pub cpu: u32,
    /// `--iomix N`.
    pub iomix: u32,
    /// `--vm N`.
    pub vm: u32,
    /// `--vm-bytes` in MiB.
    pub vm_mib: u32,
    /// `--fork N`.
    pub fork: u32,
    /// `--cpu-load P`: each CPU worker busy P% of the time (`None`: 100%, stress-ng's
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_load: Option<u32>,
}

impl LoadSpec {
    /// Seed 003's load: `--cpu N --iomix 1 --vm 1 --vm-bytes 128M --fork 1`.
    pub fn seed003(cpus: u32) -> Self {
        Self {
            cpu: cpus,
            iomix: 1,
            vm: 1,
            vm_mib: 128,
            fork: 1,
            cpu_load: None,
        }
    }

    /// Seed 000's load: only CPU workers, `--cpu N --cpu-load P` (the host at about P%).
    pub fn cpu_at(cpus: u32, percent: u32) -> Self {
        Self {
            cpu: cpus,
            iomix: 0,
            vm: 0,
            vm_mib: 128,
            fork: 0,
            cpu_load: Some(percent),
        }
    }

    /// True when no stressor would run.
    pub fn is_empty(&self) -> bool {
        self.cpu == 0 && self.iomix == 0 && self.vm == 0 && self.fork == 0
    }

    /// The stress-ng arguments (stressors only).
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (name, count) in [
            ("--cpu", self.cpu),
            ("--iomix", self.iomix),
            ("--vm", self.vm),
            ("--fork", self.fork),
        ] {
            if count > 0 {
                args.push(name.to_owned());
                args.push(count.to_string());
                if name == "--vm" {
                    args.push("--vm-bytes".into());
                    args.push(format!("{}M", self.vm_mib));
                }
                if let (Some(percent), "--cpu") = (self.cpu_load, name) {
                    args.push("--cpu-load".into());
                    args.push(percent.to_string());
                }
            }
        }
        args
    }

    /// `stress-ng --cpu 2 ...` for reports.
    pub fn describe(&self) -> String {
        if self.is_empty() {
            "none".into()
        } else {
            format!("stress-ng {}", self.args().join(" "))
        }
    }
}

/// A running stress-ng.
#[derive(Debug)]
pub struct HostLoad {
    process: ManagedChild,
    yaml: PathBuf,
    started: Instant,
}

/// Host throughput: stress-ng bogo-ops per second of wall-clock time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Sum over stressors of bogo-ops per second (real time).
    pub bogo_ops_per_s: f64,
    /// Per stressor, bogo-ops per second (real time).
    pub per_stressor: BTreeMap<String, f64>,
    /// Seconds stress-ng ran.
    pub wall_s: f64,
}

impl HostLoad {
    /// Starts stress-ng with `spec` for at most `timeout`; temporary files go to `work_dir`,
    /// metrics to `work_dir/stress-ng.yaml`.
    pub fn start(
        stress_ng: &Path,
        spec: &LoadSpec,
        timeout: Duration,
        work_dir: &Path,
    ) -> Result<Self> {
        fs::create_dir_all(work_dir).map_err(LabError::io("create", work_dir))?;
        let yaml = work_dir.join("stress-ng.yaml");
        let _ = fs::remove_file(&yaml);
        let log = work_dir.join("stress-ng.log");
        let log_file = fs::File::create(&log).map_err(LabError::io("create", &log))?;
        let log_err = log_file.try_clone().map_err(LabError::io("open", &log))?;
        let mut command = Command::new(stress_ng);
        command
            .args(spec.args())
            .args(["--timeout", &format!("{}s", timeout.as_secs().max(1))])
            .arg("--metrics-brief")
            .arg("--yaml")
            .arg(&yaml)
            .arg("--temp-path")
            .arg(work_dir)
            .current_dir(work_dir)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        Ok(Self {
            process: ManagedChild::spawn(command)?,
            yaml,
            started: Instant::now(),
        })
    }

    /// Asks stress-ng to stop now (SIGTERM: it stops its workers and still writes its
    /// metrics); [`HostLoad::finish`] then collects them.
    pub fn interrupt(&self) {
        signal(self.process.pid(), "TERM");
    }

    /// Waits up to `timeout` for stress-ng to exit (its own timeout, or after
    /// [`HostLoad::interrupt`]), sends SIGTERM after that, and reads its metrics.
    pub fn finish(mut self, timeout: Duration) -> Result<Throughput> {
        self.process
            .finish(timeout, "TERM", Duration::from_secs(10))?;
        let text = fs::read_to_string(&self.yaml).map_err(LabError::io("read", &self.yaml))?;
        let mut throughput = parse_stress_ng_yaml(&text);
        if throughput.wall_s == 0.0 {
            throughput.wall_s = self.started.elapsed().as_secs_f64();
        }
        Ok(throughput)
    }
}

/// Reads the `metrics:` list of stress-ng's `--yaml` output.
pub fn parse_stress_ng_yaml(text: &str) -> Throughput {
    let mut throughput = Throughput::default();
    let mut stressor: Option<String> = None;
    for line in text.lines() {
        let line = line.trim().trim_start_matches("- ");
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "stressor" => stressor = Some(value.to_owned()),
            "bogo-ops-per-second-real-time" => {
                if let (Some(name), Ok(rate)) = (stressor.as_ref(), value.parse::<f64>()) {
                    *throughput.per_stressor.entry(name.clone()).or_default() += rate;
                    throughput.bogo_ops_per_s += rate;
                }
            }
            "wall-clock-time" => {
                if let Ok(seconds) = value.parse::<f64>() {
                    throughput.wall_s = throughput.wall_s.max(seconds);
                }
            }
            _ => {}
        }
    }
    throughput
}

impl Throughput {
    /// Geometric mean over stressors of their rates (0 when a stressor did nothing).
    pub fn geometric_mean(&self) -> f64 {
        let rates: Vec<f64> = self.per_stressor.values().copied().collect();
        if rates.is_empty() || rates.iter().any(|&rate| rate <= 0.0) {
            return 0.0;
        }
        (rates.iter().map(|rate| rate.ln()).sum::<f64>() / rates.len() as f64).exp()
    }
}

/// Host cyclictest parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCyclictestSpec {
    /// `--interval` (µs).
    pub interval_us: u32,
    /// `--priority` (SCHED_FIFO); low, so that RT vCPU threads above it show.
    pub priority: u8,
    /// `--histogram` size (µs).
    pub histogram_max_us: u32,
    /// Measuring threads, one per host CPU, pinned.
    pub threads: u32,
}

/// A running host cyclictest.
#[derive(Debug)]
pub struct HostCyclictest {
    process: ManagedChild,
    histfile: PathBuf,
    spec: HostCyclictestSpec,
}

/// Host latency: the summary and the all-threads histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostLatency {
    /// Figures over all measuring threads.
    pub summary: LatencySummary,
    /// `(latency µs, samples)` of all threads, sorted.
    pub histogram: Vec<(u64, u64)>,
}

impl HostCyclictest {
    /// Starts cyclictest for `duration` with one pinned thread per host CPU.
    pub fn start(
        cyclictest: &Path,
        spec: HostCyclictestSpec,
        duration: Duration,
        work_dir: &Path,
    ) -> Result<Self> {
        fs::create_dir_all(work_dir).map_err(LabError::io("create", work_dir))?;
        let histfile = work_dir.join("host-cyclictest.hist");
        let _ = fs::remove_file(&histfile);
        let log = work_dir.join("host-cyclictest.log");
        let log_file = fs::File::create(&log).map_err(LabError::io("create", &log))?;
        let mut command = Command::new(cyclictest);
        command
            .args(["--mlockall", "--quiet", "--policy=fifo"])
            .arg(format!("--priority={}", spec.priority))
            .arg(format!("--interval={}", spec.interval_us))
            .arg(format!("--duration={}", duration.as_secs().max(1)))
            .arg(format!("--threads={}", spec.threads))
            .arg("--affinity")
            .arg(format!("--histogram={}", spec.histogram_max_us))
            .arg(format!("--histfile={}", histfile.display()))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(Stdio::piped());
        let mut process = ManagedChild::spawn(command)?;
        // stderr is piped only so cyclictest's notices do not clutter the terminal; drain it.
        if let Some(stderr) = process.child.as_mut().and_then(|child| child.stderr.take()) {
            thread::spawn(move || {
                let _ = std::io::copy(&mut { stderr }, &mut std::io::sink());
            });
        }
        Ok(Self {
            process,
            histfile,
            spec,
        })
    }

    /// True while cyclictest runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Waits up to `timeout` for cyclictest to finish its duration (stopping it with
    /// SIGTERM after that; it still writes its histogram) and parses the histogram.
    pub fn finish(mut self, timeout: Duration) -> Result<HostLatency> {
        let (status, _) = self
            .process
            .finish(timeout, "TERM", Duration::from_secs(10))?;
        let text = fs::read_to_string(&self.histfile).map_err(|error| {
            LabError::Run(format!(
                "host cyclictest ({status}) left no histogram {}: {error}",
                self.histfile.display()
            ))
        })?;
        let summary = parse_histogram(&text, self.spec.histogram_max_us.into())?;
        Ok(HostLatency {
            summary,
            histogram: histogram_buckets(&text),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_terminates_the_tracked_children_that_are_still_ours() {
        assert_eq!(stat_ppid("4249 (CPU 0/TCG (x)) S 77 4242 4242 0"), Some(77));
        assert_eq!(stat_ppid("garbage"), None);
        // A real child, tracked by ManagedChild, is stopped; an untracked one is not.
        let mut tracked = ManagedChild::spawn({
            let mut sleep = Command::new("sleep");
            sleep.arg("600");
            sleep
        })
        .expect("spawn sleep");
        let mut untracked = Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let tracked_now: Vec<u32> = CHILDREN.lock().unwrap().iter().copied().collect();
        assert!(tracked_now.contains(&tracked.pid()));
        assert!(!tracked_now.contains(&untracked.id()));
        // Only the tracked child (other tests' children are left alone here); a pid that
        // is not our child (pid 1) is never signalled.
        assert_eq!(stop_own(&[tracked.pid(), 1]), 1);
        let (status, by_itself) = tracked
            .finish(Duration::from_secs(10), "KILL", Duration::from_secs(5))
            .expect("reap");
        assert!(by_itself, "not stopped by the request: {status}");
        assert!(status.contains("signal: 15"), "{status}");
        assert!(
            matches!(untracked.try_wait(), Ok(None)),
            "untracked child stopped"
        );
        let _ = untracked.kill();
        let _ = untracked.wait();
    }

    #[test]
    fn seed003_load_args() {
        let spec = LoadSpec::seed003(2);
        assert_eq!(
            spec.describe(),
            "stress-ng --cpu 2 --iomix 1 --vm 1 --vm-bytes 128M --fork 1"
        );
        let none = LoadSpec {
            cpu: 0,
            iomix: 0,
            vm: 0,
            vm_mib: 128,
            fork: 0,
            cpu_load: None,
        };
        assert!(none.is_empty());
        assert_eq!(none.describe(), "none");
        assert_eq!(
            LoadSpec::cpu_at(2, 80).describe(),
            "stress-ng --cpu 2 --cpu-load 80"
        );
        // A load at 100% is stress-ng's default and is not written out.
        let json = serde_json::to_string(&spec).expect("serialize");
        assert!(!json.contains("cpu_load"), "{json}");
        let back: LoadSpec = serde_json::from_str(&json).expect("older results parse");
        assert_eq!(back, spec);
    }

    #[test]
    fn stress_ng_yaml_metrics() {
        let yaml = "\
---
system-info:
      stress-ng-version: 0.15.06
      cpus: 2

metrics:
    - stressor: cpu
      bogo-ops: 1624
      bogo-ops-per-second-usr-sys-time: 1413.538285
      bogo-ops-per-second-real-time: 539.663337
      wall-clock-time: 3.009284

    - stressor: iomix
      bogo-ops: 32742
      bogo-ops-per-second-real-time: 10710.772252
      wall-clock-time: 3.056922
...
";
        let throughput = parse_stress_ng_yaml(yaml);
        assert!((throughput.bogo_ops_per_s - 11250.435589).abs() < 1e-6);
        assert_eq!(throughput.per_stressor.len(), 2);
        assert!((throughput.per_stressor["cpu"] - 539.663337).abs() < 1e-9);
        assert!((throughput.wall_s - 3.056922).abs() < 1e-9);
        let expected = (539.663337f64 * 10710.772252).sqrt();
        assert!((throughput.geometric_mean() - expected).abs() < 1e-6);
        assert_eq!(Throughput::default().geometric_mean(), 0.0);
    }
}
