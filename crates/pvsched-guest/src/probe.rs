//! Guest-side measurements of the channel: how long from an RT task's wake-up until
//! the host line shows its vCPU boosted (the whole path: the module's guest line and
//! doorbell, QEMU's ivshmem device, the daemon, `sched_setattr`, the host line), and
//! how often the host republishes a vCPU's line as seen from the guest.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pvsched_abi::BoostState;
use serde::Serialize;

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
    /// The RT task's timer deadline to the first moment it saw its vCPU boosted.
    pub boost_seen: Summary,
    /// The deadline to the task's first look at the line: the guest's own wake-up
    /// latency. When the line already shows "boosted" at the first look, the host was
    /// faster than the guest's wake-up and `boost_seen` equals this.
    pub woke: Summary,
    /// Trials whose first look already showed the vCPU boosted.
    pub boosted_at_first_look: usize,
    /// Trials not counted: the line showed the vCPU boosted shortly before the deadline
    /// (the host had not unboosted it since the last trial).
    pub not_unboosted: usize,
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

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until CLOCK_MONOTONIC reads `deadline_ns` (a timer wake-up, as cyclictest's).
fn sleep_until(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_nanosleep reads `ts`, which outlives the call; no remainder is
    // asked for (TIMER_ABSTIME), and an interrupted sleep only ends early.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: u32) -> Result<()> {
    if cpu as usize >= libc::CPU_SETSIZE as usize {
        bail!("CPU {cpu} out of range");
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set` (cpu is below CPU_SETSIZE, checked).
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: sched_setaffinity reads `set` of the given size; pid 0 is this thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!(
            "sched_setaffinity({cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `trials` timer wake-ups of an RT task on `cpu`, `gap` apart, each waiting up
/// to `deadline` for the host line of that vCPU to show "boosted". A fair-class thread
/// on the same vCPU looks at the line `check_before` ahead of each wake-up (its own
/// wake-up is not an RT one, so it does not cause a boost) and the trial counts only if
/// the vCPU was unboosted then: the gap must outlast the guest module's boost-on-idle
/// request (`idle_boost_ms`) and the host's expiry of it.
pub fn boost_latency(
    lines: &dyn HostLines,
    cpu: u32,
    trials: usize,
    gap: Duration,
    deadline: Duration,
    prio: i32,
) -> Result<BoostProbe> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let check_before = Duration::from_millis(3).min(gap / 2);
    let next_deadline = AtomicU64::new(0);
    let unboosted = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<BoostProbe> {
        let checker = s.spawn(|| -> Result<()> {
            pin(cpu)?;
            let mut seen = 0;
            // Relaxed: the flag and the deadline are handed over once per trial, with
            // a gap of milliseconds between the writes and the reads.
            while !stop.load(Ordering::Relaxed) {
                let d = next_deadline.load(Ordering::Relaxed);
                if d == seen {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                seen = d;
                sleep_until(d.saturating_sub(check_before.as_nanos() as u64));
                let normal = lines
                    .line(cpu)
                    .is_some_and(|l| l.boost != BoostState::Boosted);
                unboosted.store(normal, Ordering::Relaxed);
            }
            Ok(())
        });
        let run = || -> Result<BoostProbe> {
            pin(cpu)?;
            become_fifo(prio)?;
            let (mut seen, mut woke) = (Vec::new(), Vec::new());
            let (mut first_look, mut not_unboosted, mut timed_out) = (0, 0, 0);
            for _ in 0..trials {
                let due = monotonic_ns() + gap.as_nanos() as u64;
                unboosted.store(false, Ordering::Relaxed);
                next_deadline.store(due, Ordering::Relaxed);
                sleep_until(due);
                let look = monotonic_ns();
                let boosted_now = lines
                    .line(cpu)
                    .is_some_and(|l| l.boost == BoostState::Boosted);
                if !unboosted.load(Ordering::Relaxed) {
                    not_unboosted += 1;
                    continue;
                }
                woke.push(look.saturating_sub(due));
                if boosted_now {
                    first_look += 1;
                    seen.push(look.saturating_sub(due));
                    continue;
                }
                loop {
                    let now = monotonic_ns();
                    if lines
                        .line(cpu)
                        .is_some_and(|l| l.boost == BoostState::Boosted)
                    {
                        seen.push(now.saturating_sub(due));
                        break;
                    }
                    if now.saturating_sub(due) > deadline.as_nanos() as u64 {
                        timed_out += 1;
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
            Ok(BoostProbe {
                boost_seen: Summary::of(seen),
                woke: Summary::of(woke),
                boosted_at_first_look: first_look,
                not_unboosted,
                timed_out,
            })
        };
        let result = run();
        stop.store(true, Ordering::Relaxed);
        checker
            .join()
            .map_err(|_| anyhow::anyhow!("the checker thread panicked"))??;
        result
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
