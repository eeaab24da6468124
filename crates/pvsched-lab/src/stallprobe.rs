//! The machine's own stalls told apart from scheduling delay on the host.
//!
//! A host whose CPUs are themselves virtual (a nested or cloud machine) stops now and then
//! for tens of milliseconds: no interrupt arrives on any CPU, and every thread, whatever its
//! priority, wakes late. Host cyclictest cannot tell such a stall from a boosted vCPU
//! keeping a host RT task off its CPU, so its maximum says little about what pvsched
//! costs the host. This probe runs, on every host CPU, a reference thread at
//! `SCHED_FIFO` 99 (above every boost, the daemon and the host task) beside a "host task"
//! thread at the host cyclictest's priority, both waking on a fixed grid and keeping every
//! sample with its time. A reference sample that woke late marks a stretch of that CPU
//! during which nothing below the stall could have run; the part of a host-task sample's
//! latency that no such stretch covers is delay from scheduling, which is what boosting can
//! cause. The reference wakes twice as often as the task, so a stall is missed by at most
//! half a task interval at its start.
//!
//! A second task thread per CPU can run just above every vCPU boost (the priority the
//! documentation asks operators to give host RT tasks that must not wait for a boosted
//! vCPU): the same figures for it say what a host task placed that way sees.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use pvsched_host::bench::percentile;
use pvsched_host::sched::SchedAttrs;
use pvsched_host::sys;
use pvsched_policy::RtClass;
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};

/// Priority of the reference threads: above everything pvsched or the host runs in RT.
pub const REFERENCE_PRIORITY: u8 = 99;
/// A reference sample at least this late marks a stall (its ordinary wake-up latency is
/// below this on the machines the lab runs on).
pub const STALL_THRESHOLD_NS: u64 = 100_000;

/// What to probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallProbeSpec {
    /// Host CPUs `0..cpus`, one reference and one task thread each.
    pub cpus: u32,
    /// The task threads' period (µs); the reference threads wake twice as often.
    pub interval_us: u32,
    /// The task threads' `SCHED_FIFO` priority (the host cyclictest's).
    pub task_priority: u8,
    /// A second task thread per CPU at this priority (above every boost), if any.
    pub above_boosts_priority: Option<u8>,
}

/// What a probe thread stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeThread {
    /// The FIFO 99 reference.
    Reference,
    /// A host task at the host cyclictest's priority.
    Task,
    /// A host task above every boost.
    AboveBoosts,
}

/// One wake-up: when it was due and how late it came (ns, `CLOCK_MONOTONIC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// Due time.
    pub due_ns: u64,
    /// Lateness.
    pub late_ns: u64,
}

/// The figures of one configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StallFigures {
    /// Task samples (all CPUs).
    pub samples: u64,
    /// Longest lateness of a reference thread (µs): the machine's longest stall.
    pub reference_max_us: u64,
    /// Reference samples at least [`STALL_THRESHOLD_NS`] late.
    pub stalls: u64,
    /// Longest lateness of a task thread (µs), stalls included (compare host cyclictest's
    /// maximum).
    pub task_max_us: u64,
    /// Longest task lateness that no reference stall on its CPU covers (µs): the delay
    /// from scheduling.
    pub beyond_stalls_max_us: u64,
    /// 99th percentile of that (µs).
    pub beyond_stalls_p99_us: u64,
    /// The priority of the task threads above the boosts (`None`: not run).
    #[serde(default)]
    pub above_boosts_priority: Option<u8>,
    /// Their longest lateness that no stall covers (µs).
    #[serde(default)]
    pub above_boosts_beyond_stalls_max_us: Option<u64>,
    /// 99th percentile of that (µs).
    #[serde(default)]
    pub above_boosts_beyond_stalls_p99_us: Option<u64>,
}

type ThreadSamples = io::Result<Vec<Wake>>;

/// A running probe.
#[derive(Debug)]
pub struct StallProbe {
    stop: Arc<AtomicBool>,
    threads: Vec<(u32, ProbeThread, JoinHandle<ThreadSamples>)>,
    above_boosts_priority: Option<u8>,
}

impl StallProbe {
    /// Starts the threads; they stop after `duration` or at [`StallProbe::finish`].
    pub fn start(spec: StallProbeSpec, duration: Duration) -> Result<Self> {
        if spec.cpus == 0 || spec.interval_us < 2 {
            return Err(LabError::Run(format!("stall probe: bad spec {spec:?}")));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut kinds = vec![ProbeThread::Reference, ProbeThread::Task];
        if spec.above_boosts_priority.is_some() {
            kinds.push(ProbeThread::AboveBoosts);
        }
        for cpu in 0..spec.cpus {
            for &kind in &kinds {
                let task_period_ns = u64::from(spec.interval_us) * 1_000;
                let (priority, period_ns, label) = match kind {
                    ProbeThread::Reference => (REFERENCE_PRIORITY, task_period_ns / 2, "ref"),
                    ProbeThread::Task => (spec.task_priority, task_period_ns, "task"),
                    ProbeThread::AboveBoosts => (
                        spec.above_boosts_priority.unwrap_or(spec.task_priority),
                        task_period_ns,
                        "above",
                    ),
                };
                let stop = Arc::clone(&stop);
                let handle = thread::Builder::new()
                    .name(format!("stall-{label}{cpu}"))
                    .spawn(move || sample(cpu, priority, period_ns, duration, &stop))
                    .map_err(|error| LabError::Run(format!("stall probe thread: {error}")))?;
                threads.push((cpu, kind, handle));
            }
        }
        Ok(Self {
            stop,
            threads,
            above_boosts_priority: spec.above_boosts_priority,
        })
    }

    /// Stops the threads and works out the figures.
    pub fn finish(self) -> Result<StallFigures> {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        for (cpu, kind, handle) in self.threads {
            let wakes = handle
                .join()
                .map_err(|_| LabError::Run("stall probe thread panicked".into()))?
                .map_err(|error| LabError::Run(format!("stall probe on CPU {cpu}: {error}")))?;
            samples.push((cpu, kind, wakes));
        }
        Ok(figures(&samples, self.above_boosts_priority))
    }
}

/// The figures from every thread's samples, `(cpu, kind, wake-ups)`.
pub fn figures(samples: &[(u32, ProbeThread, Vec<Wake>)], above: Option<u8>) -> StallFigures {
    let of_kind = |of: ProbeThread| samples.iter().filter(move |(_, kind, _)| *kind == of);
    // Each CPU's stall spans, once.
    let spans: Vec<(u32, Vec<(u64, u64)>)> = of_kind(ProbeThread::Reference)
        .map(|(cpu, _, wakes)| (*cpu, stall_spans(wakes)))
        .collect();
    let beyond = |of: ProbeThread| {
        let mut beyond = Vec::new();
        for (cpu, _, wakes) in of_kind(of) {
            let stalls = spans
                .iter()
                .find(|(c, _)| c == cpu)
                .map_or(&[][..], |(_, s)| s.as_slice());
            beyond.extend(wakes.iter().map(|wake| uncovered_ns(*wake, stalls)));
        }
        beyond.sort_unstable();
        beyond
    };
    let tasks = || of_kind(ProbeThread::Task);
    let references = || of_kind(ProbeThread::Reference);
    let task_beyond = beyond(ProbeThread::Task);
    let mut figures = StallFigures {
        samples: tasks().map(|(_, _, wakes)| wakes.len() as u64).sum(),
        reference_max_us: references()
            .map(|(_, _, wakes)| max_late_us(wakes))
            .max()
            .unwrap_or(0),
        stalls: references()
            .map(|(_, _, wakes)| {
                wakes
                    .iter()
                    .filter(|w| w.late_ns >= STALL_THRESHOLD_NS)
                    .count() as u64
            })
            .sum(),
        task_max_us: tasks()
            .map(|(_, _, wakes)| max_late_us(wakes))
            .max()
            .unwrap_or(0),
        beyond_stalls_max_us: task_beyond.last().map_or(0, |ns| ns / 1_000),
        beyond_stalls_p99_us: percentile(&task_beyond, 0.99) as u64,
        ..StallFigures::default()
    };
    let above_beyond = beyond(ProbeThread::AboveBoosts);
    if above.is_some() && !above_beyond.is_empty() {
        figures.above_boosts_priority = above;
        figures.above_boosts_beyond_stalls_max_us = above_beyond.last().map(|ns| ns / 1_000);
        figures.above_boosts_beyond_stalls_p99_us = Some(percentile(&above_beyond, 0.99) as u64);
    }
    figures
}

fn max_late_us(wakes: &[Wake]) -> u64 {
    wakes.iter().map(|w| w.late_ns).max().unwrap_or(0) / 1_000
}

/// The stretches, merged and sorted, during which the reference thread was due but had not
/// run: `[due, due + late)` of every sample at least [`STALL_THRESHOLD_NS`] late.
pub fn stall_spans(reference: &[Wake]) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = reference
        .iter()
        .filter(|w| w.late_ns >= STALL_THRESHOLD_NS)
        .map(|w| (w.due_ns, w.due_ns.saturating_add(w.late_ns)))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// The part of `wake`'s lateness, `[due, due + late)`, that no span of `stalls` covers.
pub fn uncovered_ns(wake: Wake, stalls: &[(u64, u64)]) -> u64 {
    let (start, end) = (wake.due_ns, wake.due_ns.saturating_add(wake.late_ns));
    let first = stalls.partition_point(|&(_, span_end)| span_end <= start);
    let covered: u64 = stalls[first..]
        .iter()
        .take_while(|&&(span_start, _)| span_start < end)
        .map(|&(span_start, span_end)| span_end.min(end) - span_start.max(start))
        .sum();
    wake.late_ns - covered.min(wake.late_ns)
}

/// One probe thread: pinned to `cpu`, `SCHED_FIFO` at `priority`, waking every `period_ns`
/// until `duration` has passed or `stop` is set. The sample buffer is written through
/// before the first wake-up, so no page fault lands in a measurement.
fn sample(
    cpu: u32,
    priority: u8,
    period_ns: u64,
    duration: Duration,
    stop: &AtomicBool,
) -> ThreadSamples {
    let tid = sys::gettid();
    sys::sched_setaffinity(tid, &[cpu])?;
    sys::sched_setattr(tid, &SchedAttrs::rt(RtClass::Fifo, priority).to_raw())?;
    // RT threads get no timer slack on recent kernels; older ones need it set.
    sys::set_timer_slack_ns(1)?;
    let capacity = usize::try_from(duration.as_nanos() / u128::from(period_ns))
        .unwrap_or(usize::MAX / 2)
        .saturating_add(16);
    let mut wakes = vec![
        Wake {
            due_ns: 0,
            late_ns: 0,
        };
        capacity
    ];
    let mut taken = 0;
    let start = sys::monotonic_ns();
    let end = start.saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
    let mut due = start;
    while taken < capacity && !stop.load(Ordering::Relaxed) {
        due += period_ns;
        let now = sys::monotonic_ns();
        if due > now {
            thread::sleep(Duration::from_nanos(due - now));
        }
        let woke = sys::monotonic_ns();
        if woke >= end {
            break;
        }
        wakes[taken] = Wake {
            due_ns: due,
            late_ns: woke.saturating_sub(due),
        };
        taken += 1;
        // After a stall, go on from now rather than replaying every missed period.
        if woke >= due + period_ns {
            due = woke - (woke - start) % period_ns;
        }
    }
    wakes.truncate(taken);
    Ok(wakes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wake(due_ns: u64, late_ns: u64) -> Wake {
        Wake { due_ns, late_ns }
    }

    #[test]
    fn a_stall_the_reference_saw_explains_the_task_lateness_it_covers() {
        // Reference every 500 µs; the machine stops from 10.2 ms to 25.0 ms.
        let reference = [
            wake(10_000_000, 60_000),
            wake(10_500_000, 14_500_000),
            wake(25_500_000, 8_000),
        ];
        let stalls = stall_spans(&reference);
        assert_eq!(stalls, vec![(10_500_000, 25_000_000)]);
        // The task was due at 11 ms and woke at 25.1 ms: all but 0.1 ms is the stall.
        assert_eq!(uncovered_ns(wake(11_000_000, 14_100_000), &stalls), 100_000);
        // Due at 10.2 ms, before the reference saw the stall begin: 0.3 ms uncovered.
        assert_eq!(uncovered_ns(wake(10_200_000, 14_800_000), &stalls), 300_000);
        // A late wake-up outside any stall is scheduling delay in full.
        assert_eq!(
            uncovered_ns(wake(40_000_000, 3_000_000), &stalls),
            3_000_000
        );
    }

    #[test]
    fn each_task_kind_is_read_against_the_stalls_of_its_own_cpu() {
        let grid = |late: &[u64]| -> Vec<Wake> {
            late.iter()
                .enumerate()
                .map(|(i, &l)| wake(i as u64 * 1_000_000, l))
                .collect()
        };
        // CPU 0 stops from 2 ms to 5 ms; CPU 1 never does.
        let samples = vec![
            (0, ProbeThread::Reference, vec![wake(2_000_000, 3_000_000)]),
            (1, ProbeThread::Reference, vec![wake(2_000_000, 10_000)]),
            // Due at 2 ms, woke at 5.2 ms: 0.2 ms beyond the stall.
            (0, ProbeThread::Task, grid(&[0, 0, 3_200_000])),
            // The same lateness on CPU 1 is all scheduling delay.
            (1, ProbeThread::Task, grid(&[0, 0, 3_200_000])),
            (0, ProbeThread::AboveBoosts, grid(&[0, 0, 3_050_000])),
            (1, ProbeThread::AboveBoosts, grid(&[40_000, 0, 0])),
        ];
        let f = figures(&samples, Some(9));
        assert_eq!(f.samples, 6);
        assert_eq!(f.reference_max_us, 3_000);
        assert_eq!(f.stalls, 1);
        assert_eq!(f.task_max_us, 3_200);
        assert_eq!(f.beyond_stalls_max_us, 3_200);
        assert_eq!(f.above_boosts_priority, Some(9));
        assert_eq!(f.above_boosts_beyond_stalls_max_us, Some(50));
        // Without the threads above the boosts, no figures for them.
        let f = figures(&samples[..4], None);
        assert_eq!(f.above_boosts_beyond_stalls_max_us, None);
        assert_eq!(f.above_boosts_priority, None);
    }

    #[test]
    fn overlapping_and_small_reference_samples_merge_into_spans() {
        let reference = [
            wake(1_000, 90_000), // below the threshold: not a stall
            wake(100_000, 200_000),
            wake(250_000, 100_000),
            wake(1_000_000, 160_000),
        ];
        assert_eq!(
            stall_spans(&reference),
            vec![(100_000, 350_000), (1_000_000, 1_160_000)]
        );
        let stalls = stall_spans(&reference);
        // Spanning both stalls: the stretches before, between and after them count.
        assert_eq!(
            uncovered_ns(wake(50_000, 1_250_000), &stalls),
            50_000 + 650_000 + 140_000
        );
    }
}
