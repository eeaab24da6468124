//! What every lab experiment does around one configuration, whatever it
//! measures: progress lines, waiting for the guest modules to attach, stopping
//! the daemon with its status saved, and checking that no QEMU thread is left
//! real-time before QEMU is stopped.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::experiment::{applied_changes, apply_latency, daemon_view};
use crate::hostd::{Hostd, HostdExit};
use crate::hostsched::{scan_threads, RtThread};
use crate::page::PageReader;
use crate::qemu::{Accelerator, Guest};
use crate::results::{ApplyLatency, ExitCheck};

/// How long a guest module may take to attach once its page is formatted (it
/// polls every 500 ms; the daemon needs a QMP round first).
pub(crate) const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the daemon gets to restore every thread and exit after SIGTERM.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A progress line printer: every line starts with the run's elapsed time.
pub(crate) struct Progress {
    started: Instant,
}

impl Progress {
    /// Starts the clock.
    pub(crate) fn start() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    /// Time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Prints one line with the elapsed time.
    pub(crate) fn line(&self, message: impl fmt::Display) {
        let elapsed = self.started.elapsed().as_secs();
        eprintln!("[{:02}:{:02}] {message}", elapsed / 60, elapsed % 60);
    }
}

/// Where a configuration's helpers say what they do.
pub(crate) type Say<'a> = &'a dyn Fn(fmt::Arguments<'_>);

/// The `results.json` of an experiment: the same envelope around each
/// experiment's parameters and per-configuration results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentResults<P, C> {
    /// The experiment's name.
    pub experiment: String,
    /// The experiment's results version.
    pub version: u32,
    /// Accelerator the guests ran under.
    pub accelerator: Option<Accelerator>,
    /// Why KVM was not used, when it was tried and failed.
    pub kvm_fallback: Option<String>,
    /// Parameters.
    pub params: P,
    /// Per configuration name.
    pub configs: BTreeMap<String, C>,
    /// Wall-clock time of the whole run (s).
    pub elapsed_s: f64,
}

impl<P, C> ExperimentResults<P, C> {
    /// Configurations in the order of `known` (the experiment's own list), then
    /// any other the file holds, by name.
    pub fn ordered_by(&self, known: &[&str]) -> Vec<&C> {
        let mut ordered: Vec<&C> = known
            .iter()
            .filter_map(|name| self.configs.get(*name))
            .collect();
        ordered.extend(
            self.configs
                .iter()
                .filter(|(name, _)| !known.contains(&name.as_str()))
                .map(|(_, result)| result),
        );
        ordered
    }
}

/// Checks a QEMU for real-time threads (after the daemon stopped, before QEMU
/// is stopped) and says what it found; `None` when it could not look.
pub(crate) fn exit_check(guest: &mut Guest, who: &str, say: Say<'_>) -> Option<ExitCheck> {
    let scanned = if guest.is_running() {
        scan_threads(Path::new("/proc"), guest.pid()).map_err(|error| error.to_string())
    } else {
        Err("QEMU had exited".to_owned())
    };
    match scanned {
        Ok((threads_checked, rt_threads)) => {
            for thread in &rt_threads {
                say(format_args!(
                    "LEFT REAL-TIME: {who} tid {} {:?} ({})",
                    thread.tid, thread.name, thread.policy
                ));
            }
            say(format_args!(
                "{who}: {threads_checked} QEMU threads checked before stopping QEMU, {} real-time",
                rt_threads.len()
            ));
            Some(ExitCheck {
                threads_checked,
                rt_threads,
            })
        }
        Err(why) => {
            say(format_args!("{who}: QEMU threads not checked ({why})"));
            None
        }
    }
}

/// The real-time threads an exit check found, for the configuration's list.
pub(crate) fn leftover(check: Option<&ExitCheck>) -> impl Iterator<Item = RtThread> + '_ {
    check
        .into_iter()
        .flat_map(|check| check.rt_threads.iter().cloned())
}

/// Waits until every guest module has attached to its page (a guest without a
/// page yet counts as not attached), the daemon dies, or [`ATTACH_TIMEOUT`]
/// passes. Not attaching is not an error: the results record it and the checks
/// catch it. Without a guest module there is nothing to wait for.
pub(crate) fn wait_attached(
    pages: &[Option<&PageReader>],
    module_built: bool,
    hostd: &mut Option<Hostd>,
    say: Say<'_>,
) -> Result<()> {
    if !module_built {
        return Ok(());
    }
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    loop {
        let attached = pages
            .iter()
            .all(|page| page.is_some_and(|page| page.snapshot().guest_attached));
        if attached {
            return Ok(());
        }
        if let Some(daemon) = hostd.as_mut() {
            if !daemon.is_running() {
                let exit = hostd
                    .take()
                    .map(|daemon| daemon.stop(Duration::from_secs(1), None))
                    .transpose()?;
                return Err(LabError::Run(format!(
                    "the daemon exited during start-up: {}",
                    exit.map(|exit| format!("{}; log tail:\n{}", exit.status, exit.log_tail))
                        .unwrap_or_default()
                )));
            }
        }
        if Instant::now() >= deadline {
            say(format_args!(
                "guest module not attached after {ATTACH_TIMEOUT:?}; running anyway"
            ));
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// What the daemon said and how it exited.
pub(crate) struct StoppedDaemon {
    /// Its exit.
    pub exit: HostdExit,
    /// Scheduling changes it applied (from its saved status).
    pub applies: Option<u64>,
    /// Its apply latency (from its saved status).
    pub apply_latency: Option<ApplyLatency>,
}

/// Saves the daemon's status to `status_path`, says its view of the VMs, then
/// stops it with SIGTERM (it restores every thread it changed).
pub(crate) fn stop_daemon(
    daemon: Hostd,
    status_path: &Path,
    say: Say<'_>,
) -> Result<StoppedDaemon> {
    let status = daemon.save_status(status_path);
    let mut applies = None;
    let mut latency = None;
    if let Some(path) = &status {
        for line in daemon_view(path) {
            say(format_args!("daemon's view: {line}"));
        }
        let text = fs::read_to_string(path).ok();
        applies = text.as_deref().and_then(applied_changes);
        latency = text.as_deref().and_then(apply_latency);
    }
    say(format_args!("stopping the daemon (SIGTERM)"));
    let exit = daemon.stop(DAEMON_STOP_TIMEOUT, status)?;
    if !exit.clean {
        say(format_args!(
            "daemon did not exit cleanly ({}); log tail:\n{}",
            exit.status, exit.log_tail
        ));
    }
    Ok(StoppedDaemon {
        exit,
        applies,
        apply_latency: latency,
    })
}

/// A configuration's result as the sequence of runs handles it.
pub(crate) trait ConfigRecord {
    /// Records why the configuration failed.
    fn record_error(&mut self, error: String);
    /// Records the configuration's wall-clock time (s).
    fn record_elapsed(&mut self, seconds: f64);
    /// The configuration's main figures, for its "done" line.
    fn summary(&self) -> String;
}

/// What one configuration's run gives back to the sequence.
pub(crate) struct ConfigDone<R> {
    /// The configuration's result.
    pub result: R,
    /// How the run ended.
    pub outcome: Result<()>,
    /// The accelerator its guests ran under.
    pub accelerator: Option<Accelerator>,
    /// Why KVM was not used, when it was tried and failed.
    pub kvm_fallback: Option<String>,
}

/// The results of a sequence of configurations.
pub(crate) struct Sequence<R> {
    /// Per configuration name.
    pub configs: BTreeMap<String, R>,
    /// The first accelerator a guest ran under.
    pub accelerator: Option<Accelerator>,
    /// The first reason KVM was not used.
    pub kvm_fallback: Option<String>,
}

/// Runs `configs` in order with `run_one(config, label)`, with a progress line at
/// each start, failure and end; a stop request ends the sequence (a
/// configuration cut short by it is no result).
pub(crate) fn run_sequence<K: Copy, R: ConfigRecord>(
    progress: &Progress,
    configs: &[K],
    name_of: impl Fn(K) -> String,
    mut run_one: impl FnMut(K, &str) -> ConfigDone<R>,
) -> Result<Sequence<R>> {
    let mut sequence = Sequence {
        configs: BTreeMap::new(),
        accelerator: None,
        kvm_fallback: None,
    };
    let total = configs.len();
    for (index, &config) in configs.iter().enumerate() {
        if crate::stop_requested() {
            return Err(LabError::Interrupted);
        }
        let name = name_of(config);
        let label = format!("[{}/{total}] {name}", index + 1);
        let started = Instant::now();
        progress.line(format_args!("{label}: starting"));
        let mut done = run_one(config, &label);
        if let Err(error) = done.outcome {
            progress.line(format_args!("{label}: FAILED: {error}"));
            done.result.record_error(error.to_string());
        }
        sequence.accelerator = sequence.accelerator.or(done.accelerator);
        sequence.kvm_fallback = sequence.kvm_fallback.or(done.kvm_fallback);
        let elapsed_s = started.elapsed().as_secs_f64();
        done.result.record_elapsed(elapsed_s);
        progress.line(format_args!(
            "{label}: done in {elapsed_s:.0} s: {}",
            done.result.summary()
        ));
        sequence.configs.insert(name, done.result);
    }
    if crate::stop_requested() {
        return Err(LabError::Interrupted);
    }
    Ok(sequence)
}
