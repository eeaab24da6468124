//! hackbench (rt-tests) as the overcommit experiment's guest benchmark: its parameters, the
//! init-script loop that runs it for a window, and the parser of what that loop prints.
//!
//! One hackbench round starts `groups` groups of `fds` sender and `fds` receiver processes
//! joined by Unix sockets; every sender writes `loops` messages of `datasize` bytes to every
//! receiver of its group, so a round delivers `groups × fds² × loops` messages. Every message
//! is a socket write and a read that wakes a task, often on another vCPU: run-queue locks,
//! socket locks, wake-up IPIs, the kernel paths where a preempted lock holder stalls the rest
//! of the VM. The loop runs rounds back to back until the window (guest clock) has passed,
//! then prints the rounds completed and the window as it really was (the last round
//! finishes after the nominal end). It then keeps running rounds that are not counted for
//! a tail of `tail_s` more seconds, so that a guest whose last counted round runs late
//! still competes with every other guest: a score is measured against full contention as
//! long as every counted window ends within `duration_s + tail_s`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};

/// Printed before the first round: the parameters the guest used.
pub const MARKER_RUN: &str = "hackbench-run";
/// Printed after the last round: rounds completed and the window (guest uptime, s).
pub const MARKER_DONE: &str = "hackbench-done";
/// Printed after the tail: uncounted rounds run in it.
pub const MARKER_TAIL: &str = "hackbench-tail";

/// hackbench parameters of the overcommit experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HackbenchParams {
    /// Seconds the loop starts counted rounds for (the last one ends a little later).
    pub duration_s: u32,
    /// Seconds after the window in which uncounted rounds keep the guest as busy as it was.
    #[serde(default)]
    pub tail_s: u32,
    /// Groups per vCPU: every guest runs `groups_per_vcpu × vCPUs` groups, so the work
    /// offered scales with the VM the way UnixBench's copies do (one per CPU).
    pub groups_per_vcpu: u32,
    /// `--loops`: messages every sender writes to every receiver of its group.
    pub loops: u32,
    /// `--fds`: senders (and receivers) per group.
    pub fds: u32,
    /// `--datasize`: bytes per message.
    pub datasize: u32,
}

impl Default for HackbenchParams {
    fn default() -> Self {
        Self {
            duration_s: 60,
            tail_s: 15,
            groups_per_vcpu: 1,
            // A round of 4 groups takes 3-6 s under TCG on a loaded 2-CPU host.
            loops: 5,
            fds: 20,
            datasize: 100,
        }
    }
}

fn check_range(name: &str, value: u32, min: u32, max: u32) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LabError::InvalidConfig(format!(
            "hackbench {name} = {value} is outside {min}..={max}"
        )))
    }
}

impl HackbenchParams {
    /// Rejects parameters hackbench or the guest cannot honour.
    pub fn validate(&self) -> Result<()> {
        check_range("duration_s", self.duration_s, 1, 86_400)?;
        check_range("tail_s", self.tail_s, 0, 3_600)?;
        check_range("groups_per_vcpu", self.groups_per_vcpu, 1, 16)?;
        check_range("loops", self.loops, 1, 1_000_000)?;
        check_range("fds", self.fds, 1, 100)?;
        check_range("datasize", self.datasize, 1, 65_536)
    }

    /// Messages one round of `groups` groups delivers.
    pub fn messages_per_round(&self, groups: u32) -> u64 {
        u64::from(groups) * u64::from(self.fds) * u64::from(self.fds) * u64::from(self.loops)
    }

    /// Seconds the guest runs hackbench: the window and the tail.
    pub fn run_s(&self) -> u32 {
        self.duration_s + self.tail_s
    }

    /// Shell lines for the init script: the counted loop, then the uncounted tail, setting
    /// `RC` (hackbench's exit code of a failed round, else 0). Needs `NCPU`, `awk`, `grep`
    /// and `hackbench` on the PATH.
    pub fn commands(&self) -> String {
        let mut script = String::new();
        let _ = writeln!(
            script,
            "HB_GROUPS=$((NCPU * {gpv}))\n\
             read HB_T0 HB_REST < /proc/uptime\n\
             HB_END=$(awk -v t=\"$HB_T0\" 'BEGIN {{ printf \"%.2f\", t + {duration} }}')\n\
             HB_ROUNDS=0\n\
             RC=0\n\
             echo \"{MARKER_RUN} groups=$HB_GROUPS fds={fds} loops={loops} datasize={datasize} vcpus=$NCPU duration_s={duration}\"\n\
             while awk -v e=\"$HB_END\" '{{ exit !($1 < e) }}' /proc/uptime; do\n  \
               hackbench -g $HB_GROUPS -f {fds} -l {loops} -s {datasize} > /tmp/hackbench.out 2>&1\n  \
               RC=$?\n  \
               if [ $RC -ne 0 ]; then\n    \
                 echo \"hackbench failed rc=$RC\"; cat /tmp/hackbench.out; break\n  \
               fi\n  \
               HB_ROUNDS=$((HB_ROUNDS + 1))\n  \
               # The first round in full (what hackbench says it ran), then its times.\n  \
               if [ $HB_ROUNDS -eq 1 ]; then cat /tmp/hackbench.out; else grep '^Time:' /tmp/hackbench.out; fi\n\
             done\n\
             read HB_T1 HB_REST < /proc/uptime\n\
             echo \"{MARKER_DONE} rounds=$HB_ROUNDS start=$HB_T0 end=$HB_T1\"\n\
             # Uncounted rounds: as busy as before while the other guests finish theirs.\n\
             HB_TAIL_END=$(awk -v t=\"$HB_T0\" 'BEGIN {{ printf \"%.2f\", t + {run} }}')\n\
             HB_TAIL=0\n\
             while [ $RC -eq 0 ] && awk -v e=\"$HB_TAIL_END\" '{{ exit !($1 < e) }}' /proc/uptime; do\n  \
               hackbench -g $HB_GROUPS -f {fds} -l {loops} -s {datasize} > /dev/null 2>&1 || break\n  \
               HB_TAIL=$((HB_TAIL + 1))\n\
             done\n\
             echo \"{MARKER_TAIL} rounds=$HB_TAIL\"",
            gpv = self.groups_per_vcpu,
            duration = self.duration_s,
            run = self.run_s(),
            fds = self.fds,
            loops = self.loops,
            datasize = self.datasize,
        );
        script
    }
}

/// What one guest's hackbench loop did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HackbenchRun {
    /// vCPUs the guest saw (`nproc`).
    pub vcpus: u32,
    /// Groups per round.
    pub groups: u32,
    /// Senders (and receivers) per group.
    pub fds: u32,
    /// Messages per sender and receiver.
    pub loops: u32,
    /// Bytes per message.
    pub datasize: u32,
    /// Rounds completed.
    pub rounds: u64,
    /// Messages delivered: `rounds × groups × fds² × loops`.
    pub messages: u64,
    /// The loop's window (s of guest uptime, first round start to last round end).
    pub elapsed_s: f64,
    /// Sum of the rounds' own `Time:` (s): message passing, without process start and exit.
    pub hackbench_s: f64,
    /// Messages per second over the window.
    pub messages_per_s: f64,
    /// Uncounted rounds run in the tail (`None`: the output has no tail line).
    pub tail_rounds: Option<u64>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

fn number<T: std::str::FromStr>(line: &str, key: &str) -> Result<T> {
    field(line, key)
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| LabError::Run(format!("hackbench output: no {key}= in {line:?}")))
}

/// Parses the output of [`HackbenchParams::commands`] (the guest's result section).
pub fn parse_output(text: &str) -> Result<HackbenchRun> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let run = lines
        .iter()
        .find(|line| line.starts_with(MARKER_RUN))
        .ok_or_else(|| LabError::Run(format!("hackbench output: no {MARKER_RUN} line")))?;
    if let Some(failed) = lines
        .iter()
        .find(|line| line.starts_with("hackbench failed"))
    {
        return Err(LabError::Run(format!("hackbench output: {failed}")));
    }
    let done = lines
        .iter()
        .find(|line| line.starts_with(MARKER_DONE))
        .ok_or_else(|| {
            LabError::Run(format!(
                "hackbench output: no {MARKER_DONE} line (the loop did not finish)"
            ))
        })?;
    let (vcpus, groups, fds, loops, datasize) = (
        number(run, "vcpus")?,
        number(run, "groups")?,
        number(run, "fds")?,
        number(run, "loops")?,
        number(run, "datasize")?,
    );
    let rounds: u64 = number(done, "rounds")?;
    let start: f64 = number(done, "start")?;
    let end: f64 = number(done, "end")?;
    let times: Vec<f64> = lines
        .iter()
        .filter_map(|line| line.strip_prefix("Time:"))
        .map(|value| {
            value.trim().parse::<f64>().map_err(|_| {
                LabError::Run(format!("hackbench output: bad time {:?}", value.trim()))
            })
        })
        .collect::<Result<_>>()?;
    if times.len() as u64 != rounds {
        return Err(LabError::Run(format!(
            "hackbench output: {rounds} rounds reported but {} Time: lines",
            times.len()
        )));
    }
    let elapsed_s = end - start;
    if elapsed_s.is_nan() || elapsed_s <= 0.0 {
        return Err(LabError::Run(format!(
            "hackbench output: window from {start} to {end} s"
        )));
    }
    let messages = rounds * u64::from(groups) * u64::from(fds) * u64::from(fds) * u64::from(loops);
    Ok(HackbenchRun {
        vcpus,
        groups,
        fds,
        loops,
        datasize,
        rounds,
        messages,
        elapsed_s,
        hackbench_s: times.iter().sum(),
        messages_per_s: messages as f64 / elapsed_s,
        tail_rounds: lines
            .iter()
            .find(|line| line.starts_with(MARKER_TAIL))
            .map(|line| number(line, "rounds"))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_that_does_not_add_up_is_refused() {
        let ok = "hackbench-run groups=2 fds=20 loops=10 datasize=100 vcpus=2 duration_s=15\n\
                  Running in process mode with 2 groups using 40 file descriptors each (== 80 tasks)\n\
                  Each sender will pass 10 messages of 100 bytes\n\
                  Time: 1.500\n\
                  Time: 2.500\n\
                  hackbench-done rounds=2 start=10.00 end=15.00\n\
                  hackbench-tail rounds=1";
        let run = parse_output(ok).expect("parse");
        assert_eq!(run.messages, 2 * 2 * 400 * 10);
        assert_eq!(run.elapsed_s, 5.0);
        assert_eq!(run.hackbench_s, 4.0);
        assert_eq!(run.messages_per_s, 3200.0);
        assert_eq!(run.tail_rounds, Some(1));
        let without_tail = ok.replace("\nhackbench-tail rounds=1", "");
        assert_eq!(
            parse_output(&without_tail).expect("parse").tail_rounds,
            None
        );
        // A round the summary does not count, a loop that never finished, a failed round,
        // a window that does not move forward.
        for bad in [
            ok.replace("rounds=2", "rounds=3"),
            ok.lines().take(5).collect::<Vec<_>>().join("\n"),
            ok.replace("Time: 2.500", "hackbench failed rc=1"),
            ok.replace("end=15.00", "end=10.00"),
            ok.replace("hackbench-run", "something else"),
        ] {
            assert!(parse_output(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_round_delivers_groups_times_fds_squared_times_loops_messages() {
        let params = HackbenchParams::default();
        assert!(params.validate().is_ok());
        assert_eq!(params.messages_per_round(4), 4 * 20 * 20 * 5);
        for bad in [
            HackbenchParams { loops: 0, ..params },
            HackbenchParams { fds: 101, ..params },
            HackbenchParams {
                duration_s: 0,
                ..params
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
