//! The daemon's halt-poll controller on the simulated host.
//!
//! As the daemon: a first round as it starts, at [`FIRST_ROUND_NS`] (the
//! host load since the start, no statistics deltas yet: only a baseline),
//! then one every `interval` (the daemon's `host_info_ms`), each as
//! `HaltPollTuner::round` does on a real host: the host's mean pCPU load over the interval (busy
//! time as `/proc/stat` counts it, polling included), the deltas of KVM's
//! polling statistics summed over every vCPU, the input the daemon builds
//! from them ([`HaltPollInput::of_interval`]) and its decision
//! ([`haltpoll::decide`]). A decision that differs from the parameters in
//! force is written: KVM's per-vCPU windows follow the new parameters from
//! their next halt.

use super::*;

use pvsched_policy::haltpoll::{HaltPollInput, HaltPollReason};

/// When the daemon's first round runs: its first `query-stats` round trip
/// after the start.
pub(super) const FIRST_ROUND_NS: Nanos = 1_000_000;

/// The controller's state on one simulated host.
#[derive(Clone, Debug)]
pub(super) struct HaltPollCtl {
    pub(super) bounds: HaltPollBounds,
    pub(super) interval: Nanos,
    /// The host parameters in force (KVM's defaults at the start).
    pub(super) current: KvmHaltPoll,
    /// KVM's statistics at the last round.
    pub(super) prev: PollDelta,
    /// Busy time of each pCPU at the last round.
    pub(super) busy_snap: Vec<Nanos>,
    /// When the last round ran (`None` before the first).
    pub(super) last_round: Option<Nanos>,
    pub(super) stats: HaltPollCtlStats,
}

impl HaltPollCtl {
    pub(super) fn new(bounds: HaltPollBounds, interval: Nanos, pcpus: u32) -> Self {
        HaltPollCtl {
            bounds,
            interval: interval.max(1),
            current: KvmHaltPoll::KVM_DEFAULT,
            prev: PollDelta::default(),
            busy_snap: vec![0; pcpus as usize],
            last_round: None,
            stats: HaltPollCtlStats::default(),
        }
    }
}

/// What the controller did over the measured interval of one host.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HaltPollCtlStats {
    /// Rounds run.
    pub rounds: u64,
    /// Rounds whose decision changed the parameters.
    pub writes: u64,
    /// Rounds per reason, in [`HaltPollReason::ALL`] order.
    pub reasons: [u64; 6],
    /// `halt_poll_ns` in force, summed over rounds (mean = this / rounds).
    pub halt_poll_ns_sum: u64,
}

impl HaltPollCtlStats {
    /// Adds another host's counts.
    pub fn merge(&mut self, o: &HaltPollCtlStats) {
        self.rounds += o.rounds;
        self.writes += o.writes;
        for (a, b) in self.reasons.iter_mut().zip(o.reasons) {
            *a += b;
        }
        self.halt_poll_ns_sum += o.halt_poll_ns_sum;
    }

    /// Rounds per reason name, the reasons that occurred.
    pub fn reasons_by_name(&self) -> Vec<(String, u64)> {
        HaltPollReason::ALL
            .iter()
            .zip(self.reasons)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.name().to_string(), n))
            .collect()
    }

    /// Mean `halt_poll_ns` over the rounds.
    pub fn mean_halt_poll_ns(&self) -> Option<f64> {
        (self.rounds > 0).then(|| self.halt_poll_ns_sum as f64 / self.rounds as f64)
    }
}

impl Sim {
    /// One round of the daemon's halt-poll thread.
    pub(super) fn halt_poll_round(&mut self) {
        let Some((interval, last_round)) = self.hp_ctl.as_ref().map(|c| (c.interval, c.last_round))
        else {
            return;
        };
        self.q.push(self.now + interval, Ev::HaltPollRound);
        let since = self.now - last_round.unwrap_or(0);
        for c in 0..self.cpus.len() as u32 {
            self.account(c);
        }
        let ctl = self.hp_ctl.as_mut().expect("checked above");
        // `/proc/stat` per pCPU: everything but idle is busy (a halt-poll
        // runs in the vCPU thread's kernel context: system time).
        let mut load_sum = 0u64;
        for (cpu, snap) in self.cpus.iter().zip(ctl.busy_snap.iter_mut()) {
            let busy = cpu.acct.iter().sum::<Nanos>() - cpu.acct[Acct::Idle as usize];
            load_sum += ((busy - *snap) * 1000 / since.max(1)).min(1000);
            *snap = busy;
        }
        let load = (load_sum / self.cpus.len().max(1) as u64) as u32;
        let s = self.kvm_stats;
        let p = ctl.prev;
        let polls = PollDelta {
            success_ns: s.success_ns - p.success_ns,
            fail_ns: s.fail_ns - p.fail_ns,
            wait_ns: s.wait_ns - p.wait_ns,
            successful: s.successful - p.successful,
            attempted: s.attempted - p.attempted,
            invalid: s.invalid - p.invalid,
            preemptions: s.preemptions - p.preemptions,
        };
        ctl.prev = s;
        // The first round only sets the baseline of every VM's counters: no
        // deltas, no vCPUs counted (`HaltPollTuner::round`).
        let (polls, vcpus, interval_ns) = match ctl.last_round {
            Some(_) => (polls, self.vcpus.len() as u32, since),
            None => (PollDelta::default(), 0, 0),
        };
        ctl.last_round = Some(self.now);
        let input = HaltPollInput::of_interval(load, polls, vcpus, interval_ns);
        let decision = haltpoll::decide(&ctl.current, &input, &ctl.bounds);
        let changed = decision.params != ctl.current;
        if changed {
            ctl.current = decision.params;
            self.kvm_hp = decision.params.window_params();
        }
        if self.now >= self.warmup {
            let st = &mut ctl.stats;
            st.rounds += 1;
            st.writes += u64::from(changed);
            let r = HaltPollReason::ALL
                .iter()
                .position(|&r| r == decision.reason)
                .expect("every reason is listed");
            st.reasons[r] += 1;
            st.halt_poll_ns_sum += u64::from(ctl.current.halt_poll_ns);
        }
        self.hash.fold(u64::from(ctl.current.halt_poll_ns));
    }

    /// Host load threads' waits so far: `schedstat` run delay and the waits
    /// in progress.
    pub(super) fn load_wait_total(&self) -> Nanos {
        self.threads
            .iter()
            .filter(|t| matches!(t.role, Role::Load { .. }))
            .map(|t| {
                let open = if t.state == TState::Runnable {
                    self.now.saturating_sub(t.queued)
                } else {
                    0
                };
                t.run_delay + open
            })
            .sum()
    }
}
