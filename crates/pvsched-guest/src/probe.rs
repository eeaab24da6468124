//! Guest-side measurements of the channel: how long from an RT task's wake-up until
//! the host line shows its vCPU boosted (the whole path: the module's guest line and
//! doorbell, QEMU's ivshmem device, the daemon, `sched_setattr`, the host line), and
//! how often the host republishes a vCPU's line as seen from the guest.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pvsched_abi::BoostState;
use serde::Serialize;

use crate::futex::current_cpu;
use crate::view::HostLines;

/// Percentiles of a set of samples, µs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
}

impl Summary {
    /// Summarises samples in ns.
    pub fn of(mut ns: Vec<u64>) -> Self {
        ns.sort_unstable();
        let pct = |p: f64| {
            if ns.is_empty() {
                0.0
            } else {
                ns[((ns.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
            }
        };
        Self {
            count: ns.len(),
            p50_us: pct(0.5),
            p90_us: pct(0.9),
            p99_us: pct(0.99),
            max_us: pct(1.0),
        }
    }
}

/// What the boost probe measured.
#[derive(Clone, Debug, Serialize)]
pub struct BoostProbe {
    /// Wake-up to "boosted" in the host line.
    pub latency: Summary,
    /// Trials where the line already showed the vCPU boosted at the wake-up (the host
    /// had not yet unboosted it after the previous trial): not counted.
    pub already_boosted: usize,
    /// Trials where no boost showed within the deadline.
    pub timed_out: usize,
}

/// Makes the calling thread `SCHED_FIFO` at `prio`.
fn become_fifo(prio: i32) -> Result<()> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: sched_setscheduler reads `param`, which lives across the call; pid 0 is
    // the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        bail!(
            "sched_setscheduler(SCHED_FIFO, {prio}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `trials` wake-ups of an RT task, `gap` apart, each waiting up to `deadline`
/// for the host line of the CPU it woke on to show "boosted".
pub fn boost_latency(
    lines: &dyn HostLines,
    trials: usize,
    gap: Duration,
    deadline: Duration,
    prio: i32,
) -> Result<BoostProbe> {
    become_fifo(prio)?;
    let (mut samples, mut already_boosted, mut timed_out) = (Vec::new(), 0, 0);
    for _ in 0..trials {
        // Sleeping idles the vCPU, so the host unboosts it; the timer then wakes an
        // RT task, which the module publishes (and rings for).
        std::thread::sleep(gap);
        let woke = Instant::now();
        let cpu = current_cpu();
        if lines
            .line(cpu)
            .is_some_and(|l| l.boost == BoostState::Boosted)
        {
            already_boosted += 1;
            continue;
        }
        loop {
            if lines
                .line(cpu)
                .is_some_and(|l| l.boost == BoostState::Boosted)
            {
                samples.push(woke.elapsed().as_nanos() as u64);
                break;
            }
            if woke.elapsed() > deadline {
                timed_out += 1;
                break;
            }
            std::hint::spin_loop();
        }
    }
    Ok(BoostProbe {
        latency: Summary::of(samples),
        already_boosted,
        timed_out,
    })
}

/// Watches `cpu`'s host line for `duration`, reading it every `every`, and returns the
/// guest-time intervals between two changes of its publication time.
pub fn republish_intervals(
    lines: &dyn HostLines,
    cpu: u32,
    duration: Duration,
    every: Duration,
) -> Summary {
    let start = Instant::now();
    let (mut last, mut changed_at, mut intervals) = (None, None::<Instant>, Vec::new());
    while start.elapsed() < duration {
        if let Some(line) = lines.line(cpu) {
            if last != Some(line.host_time_ns) {
                let now = Instant::now();
                if let (Some(_), Some(at)) = (last, changed_at) {
                    intervals.push(now.duration_since(at).as_nanos() as u64);
                }
                last = Some(line.host_time_ns);
                changed_at = Some(now);
            }
        }
        std::thread::sleep(every);
    }
    Summary::of(intervals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_sorted_samples() {
        let s = Summary::of(vec![5_000, 1_000, 3_000, 2_000, 4_000]);
        assert_eq!(s.count, 5);
        assert_eq!(s.p50_us, 3.0);
        assert_eq!(s.max_us, 5.0);
        assert_eq!(Summary::of(Vec::new()).count, 0);
    }
}
