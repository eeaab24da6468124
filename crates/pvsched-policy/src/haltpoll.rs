//! KVM's adaptive halt-polling window as pure functions (seed 002).
//!
//! After each halt, KVM adjusts the vCPU's polling window from how long the
//! vCPU stayed blocked: a block shorter than the global maximum grows the
//! window (×`grow`, starting at `grow_start_ns`), a block longer than the
//! maximum or a wakeup for an invalid reason shrinks it (÷`shrink`, 0 =
//! reset), and the window never exceeds the global maximum.

use serde::{Deserialize, Serialize};

use crate::Nanos;

/// Parameters of the algorithm (KVM's module parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltPollParams {
    /// Global maximum window (`halt_poll_ns`); 0 disables polling.
    pub max_ns: u32,
    /// Growth factor (`halt_poll_ns_grow`); 0 disables growth.
    pub grow: u32,
    /// First non-zero window (`halt_poll_ns_grow_start`).
    pub grow_start_ns: u32,
    /// Shrink divisor (`halt_poll_ns_shrink`); 0 resets the window to 0.
    pub shrink: u32,
    /// A shrunk window below `grow_start_ns` drops to 0 (kernels since 5.0).
    pub reset_below_start: bool,
}

impl HaltPollParams {
    /// x86 KVM before 5.0: shrink resets the window.
    pub const KVM_LEGACY: Self = Self {
        max_ns: 200_000,
        grow: 2,
        grow_start_ns: 10_000,
        shrink: 0,
        reset_below_start: false,
    };
    /// x86 KVM today: shrink halves, below the start the window drops to 0.
    pub const KVM_CURRENT: Self = Self {
        max_ns: 200_000,
        grow: 2,
        grow_start_ns: 10_000,
        shrink: 2,
        reset_below_start: true,
    };
    /// The guest's `cpuidle-haltpoll` defaults.
    pub const GUEST_HALTPOLL: Self = Self {
        max_ns: 200_000,
        grow: 2,
        grow_start_ns: 50_000,
        shrink: 2,
        reset_below_start: true,
    };

    /// A preset by name (`kvm-legacy`, `kvm-current`, `guest-haltpoll`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "kvm-legacy" => Some(Self::KVM_LEGACY),
            "kvm-current" => Some(Self::KVM_CURRENT),
            "guest-haltpoll" => Some(Self::GUEST_HALTPOLL),
            _ => None,
        }
    }
}

/// The grown window.
pub fn grow(p: &HaltPollParams, window_ns: u32) -> u32 {
    if p.grow == 0 {
        return window_ns;
    }
    window_ns
        .saturating_mul(p.grow)
        .max(p.grow_start_ns)
        .min(p.max_ns)
}

/// The shrunk window.
pub fn shrink(p: &HaltPollParams, window_ns: u32) -> u32 {
    // A zero divisor means "reset", as in KVM.
    let value = window_ns.checked_div(p.shrink).unwrap_or(0);
    if p.reset_below_start && value < p.grow_start_ns {
        0
    } else {
        value
    }
}

/// The window after a halt that blocked for `block_ns`, KVM's
/// `kvm_vcpu_halt` update: `valid_wakeup` is false when the vCPU woke for a
/// reason that polling could not have caught.
pub fn after_block(p: &HaltPollParams, window_ns: u32, block_ns: Nanos, valid_wakeup: bool) -> u32 {
    if p.max_ns == 0 {
        return 0;
    }
    let window_ns = window_ns.min(p.max_ns);
    let max = Nanos::from(p.max_ns);
    if !valid_wakeup {
        shrink(p, window_ns)
    } else if block_ns <= Nanos::from(window_ns) {
        // The poll caught the wakeup: keep the window.
        window_ns
    } else if window_ns > 0 && block_ns > max {
        // A long block: polling only burned CPU.
        shrink(p, window_ns)
    } else if window_ns < p.max_ns && block_ns < max {
        // A short block the window was too small to catch.
        grow(p, window_ns)
    } else {
        window_ns
    }
}

/// Parameters scaled to the load of the pCPU: polling a pCPU that others
/// want takes time from them, so the maximum shrinks as load rises and
/// polling stops above 90% load.
pub fn tuned_for_load(p: &HaltPollParams, load_permille: u32) -> HaltPollParams {
    let load = load_permille.min(1000);
    let max_ns = if load >= 900 {
        0
    } else {
        (u64::from(p.max_ns) * u64::from(1000 - load) / 1000) as u32
    };
    HaltPollParams {
        max_ns: if max_ns < p.grow_start_ns { 0 } else { max_ns },
        ..*p
    }
}

/// The host's four halt-poll parameters as KVM's module exposes them
/// (`/sys/module/kvm/parameters/halt_poll_ns{,_grow,_grow_start,_shrink}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmHaltPoll {
    /// `halt_poll_ns`: the longest window any vCPU may poll (0: no polling).
    pub halt_poll_ns: u32,
    /// `halt_poll_ns_grow`: growth factor of a vCPU's window.
    pub grow: u32,
    /// `halt_poll_ns_grow_start`: a vCPU's first non-zero window.
    pub grow_start_ns: u32,
    /// `halt_poll_ns_shrink`: shrink divisor (0: reset to 0).
    pub shrink: u32,
}

impl KvmHaltPoll {
    /// x86 KVM's defaults (`halt_poll_ns` 200 µs, grow 2 from 10 µs, shrink 2).
    pub const KVM_DEFAULT: Self = KvmHaltPoll {
        halt_poll_ns: 200_000,
        grow: 2,
        grow_start_ns: 10_000,
        shrink: 2,
    };

    /// The per-vCPU window algorithm these parameters give on a kernel since
    /// 5.0 (a shrunk window below `grow_start` drops to 0), for
    /// [`after_block`].
    pub fn window_params(&self) -> HaltPollParams {
        HaltPollParams {
            max_ns: self.halt_poll_ns,
            grow: self.grow,
            grow_start_ns: self.grow_start_ns,
            shrink: self.shrink,
            reset_below_start: true,
        }
    }
}

/// An inclusive range of one parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// Lowest value the controller writes.
    pub min: u32,
    /// Highest value the controller writes.
    pub max: u32,
}

impl Range {
    const fn new(min: u32, max: u32) -> Self {
        Range { min, max }
    }

    /// `v` moved into the range.
    pub fn clamp(&self, v: u32) -> u32 {
        v.clamp(self.min, self.max)
    }
}

/// What the controller may write and when it stops polling: the
/// administrator's limits, applied to every output whatever the statistics say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaltPollBounds {
    /// `halt_poll_ns` range (ns).
    pub halt_poll_ns: Range,
    /// `halt_poll_ns_grow` range.
    pub grow: Range,
    /// `halt_poll_ns_grow_start` range (ns).
    pub grow_start_ns: Range,
    /// `halt_poll_ns_shrink` range.
    pub shrink: Range,
    /// Host-wide pCPU load (‰) from which polling stops (the window drops
    /// to its minimum): a poll then takes time that runnable threads want.
    pub stop_load_permille: u32,
    /// Fraction (‰) of polling time that must end in a caught wake-up for
    /// the window to grow.
    pub grow_success_permille: u32,
    /// Below this fraction (‰) of polling time ending in a caught wake-up,
    /// polls mostly fail: the window shrinks.
    pub shrink_success_permille: u32,
    /// Polls per interval below which the success fraction says nothing
    /// (the window holds).
    pub min_polls: u64,
}

impl Default for HaltPollBounds {
    fn default() -> Self {
        HaltPollBounds {
            halt_poll_ns: Range::new(0, 200_000),
            grow: Range::new(2, 2),
            grow_start_ns: Range::new(10_000, 10_000),
            shrink: Range::new(0, 2),
            stop_load_permille: 900,
            grow_success_permille: 500,
            shrink_success_permille: 250,
            min_polls: 16,
        }
    }
}

/// Bounds that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("halt-poll bounds: {0}")]
pub struct HaltPollBoundsError(pub String);

/// Largest `halt_poll_ns` the bounds accept (10 ms: polling longer than a
/// scheduler tick only burns CPU).
pub const MAX_HALT_POLL_NS: u32 = 10_000_000;

impl HaltPollBounds {
    /// Checks every range and threshold.
    pub fn validate(&self) -> Result<(), HaltPollBoundsError> {
        let bad = |s: String| Err(HaltPollBoundsError(s));
        for (name, r, hi) in [
            ("halt_poll_ns", self.halt_poll_ns, MAX_HALT_POLL_NS),
            ("grow", self.grow, 16),
            ("grow_start_ns", self.grow_start_ns, MAX_HALT_POLL_NS),
            ("shrink", self.shrink, 16),
        ] {
            if r.min > r.max || r.max > hi {
                return bad(format!(
                    "{name} = {{ min = {}, max = {} }} must have min <= max <= {hi}",
                    r.min, r.max
                ));
            }
        }
        if self.grow_start_ns.min > self.halt_poll_ns.max && self.halt_poll_ns.max > 0 {
            return bad(format!(
                "grow_start_ns.min {} is above halt_poll_ns.max {}: no window could start",
                self.grow_start_ns.min, self.halt_poll_ns.max
            ));
        }
        if self.stop_load_permille == 0 || self.stop_load_permille > 1000 {
            return bad(format!(
                "stop_load_permille = {} must be 1..=1000",
                self.stop_load_permille
            ));
        }
        if self.shrink_success_permille >= self.grow_success_permille
            || self.grow_success_permille > 1000
        {
            return bad(format!(
                "shrink_success_permille {} must be below grow_success_permille {} (at most 1000)",
                self.shrink_success_permille, self.grow_success_permille
            ));
        }
        if self.min_polls == 0 || self.min_polls > 1_000_000 {
            return bad(format!(
                "min_polls = {} must be 1..=1000000",
                self.min_polls
            ));
        }
        Ok(())
    }

    /// `p` with every parameter moved into its range.
    pub fn clamp(&self, p: KvmHaltPoll) -> KvmHaltPoll {
        KvmHaltPoll {
            halt_poll_ns: self.halt_poll_ns.clamp(p.halt_poll_ns),
            grow: self.grow.clamp(p.grow),
            grow_start_ns: self.grow_start_ns.clamp(p.grow_start_ns),
            shrink: self.shrink.clamp(p.shrink),
        }
    }
}

/// KVM's polling statistics over one interval, summed over the vCPUs of
/// the VMs (deltas of `query-stats` counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollDelta {
    /// `halt_poll_success_ns`: time in polls that caught a wake-up.
    pub success_ns: u64,
    /// `halt_poll_fail_ns`: time in polls that did not.
    pub fail_ns: u64,
    /// `halt_wait_ns`: time halted after polling.
    pub wait_ns: u64,
    /// `halt_successful_poll`.
    pub successful: u64,
    /// `halt_attempted_poll`.
    pub attempted: u64,
    /// `halt_poll_invalid`: polls ended by a wake-up that polling cannot catch.
    pub invalid: u64,
    /// vCPU preemptions (`preemption_reported` + `preemption_other`).
    pub preemptions: u64,
}

impl PollDelta {
    /// Sum of two deltas (saturating).
    pub fn add(&self, o: &PollDelta) -> PollDelta {
        PollDelta {
            success_ns: self.success_ns.saturating_add(o.success_ns),
            fail_ns: self.fail_ns.saturating_add(o.fail_ns),
            wait_ns: self.wait_ns.saturating_add(o.wait_ns),
            successful: self.successful.saturating_add(o.successful),
            attempted: self.attempted.saturating_add(o.attempted),
            invalid: self.invalid.saturating_add(o.invalid),
            preemptions: self.preemptions.saturating_add(o.preemptions),
        }
    }

    /// Fraction (‰) of polling time that ended in a caught wake-up, `None`
    /// without polling time.
    pub fn success_permille(&self) -> Option<u32> {
        let total = u128::from(self.success_ns) + u128::from(self.fail_ns);
        (total > 0).then(|| (u128::from(self.success_ns) * 1000 / total) as u32)
    }
}

/// What the controller sees of the host over one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltPollInput {
    /// Host-wide pCPU load (‰, mean over online CPUs; clamped to 1000).
    pub load_permille: u32,
    /// The pCPUs the vCPUs ran on are contended: their vCPU threads were
    /// preempted by other runnable work during the interval.
    pub contended: bool,
    /// Polling statistics of the interval.
    pub polls: PollDelta,
}

/// Involuntary preemptions per vCPU and second from which the vCPUs' pCPUs
/// count as contended: a vCPU thread that is preempted this often shares
/// its pCPU with runnable work that a poll would delay.
pub const CONTENDED_PREEMPTIONS_PER_S: u64 = 100;

/// Whether `preemptions` over `interval_ns` on `vcpus` vCPUs mean contention.
pub fn contended(preemptions: u64, vcpus: u32, interval_ns: u64) -> bool {
    if vcpus == 0 || interval_ns == 0 {
        return false;
    }
    u128::from(preemptions) * 1_000_000_000
        >= u128::from(CONTENDED_PREEMPTIONS_PER_S) * u128::from(vcpus) * u128::from(interval_ns)
}

impl HaltPollInput {
    /// The controller's input for one interval of `interval_ns`: the host's
    /// mean pCPU load (clamped), the polling statistics summed over `vcpus`
    /// vCPUs, and contention judged from their preemptions.
    pub fn of_interval(load_permille: u32, polls: PollDelta, vcpus: u32, interval_ns: u64) -> Self {
        HaltPollInput {
            load_permille: load_permille.min(1000),
            contended: contended(polls.preemptions, vcpus, interval_ns),
            polls,
        }
    }
}

/// Why the controller chose its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HaltPollReason {
    /// The vCPUs' pCPUs are contended: a poll would take their time.
    Contended,
    /// Host load at or above `stop_load_permille`.
    HostLoaded,
    /// Polls mostly fail: CPU burnt for nothing.
    PollsFail,
    /// Polls succeed and the pCPUs have room: a longer window saves wake-ups.
    PollsSucceed,
    /// Polling was stopped and the host has room again.
    Resume,
    /// Too few polls, or a success fraction between the thresholds.
    Hold,
}

impl HaltPollReason {
    /// Every reason, in metric order.
    pub const ALL: [HaltPollReason; 6] = [
        HaltPollReason::Contended,
        HaltPollReason::HostLoaded,
        HaltPollReason::PollsFail,
        HaltPollReason::PollsSucceed,
        HaltPollReason::Resume,
        HaltPollReason::Hold,
    ];

    /// Short name (metrics, status).
    pub fn name(self) -> &'static str {
        match self {
            HaltPollReason::Contended => "contended",
            HaltPollReason::HostLoaded => "host-loaded",
            HaltPollReason::PollsFail => "polls-fail",
            HaltPollReason::PollsSucceed => "polls-succeed",
            HaltPollReason::Resume => "resume",
            HaltPollReason::Hold => "hold",
        }
    }
}

/// The controller's decision: parameters to set and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltPollDecision {
    /// The parameters (each within its bounds).
    pub params: KvmHaltPoll,
    /// Why.
    pub reason: HaltPollReason,
    /// The load cap on `halt_poll_ns` this interval (ns).
    pub load_cap_ns: u32,
}

/// Steps of the load cap between 0 and `halt_poll_ns.max`: the cap moves
/// only when the load crosses a step, so load noise does not rewrite the
/// parameter every interval.
const CAP_STEPS: u64 = 8;

/// The longest window the host load leaves room for: `halt_poll_ns.max`
/// scaled down linearly to 0 at `stop_load_permille`, rounded down to one
/// of [`CAP_STEPS`] steps. Non-increasing in `load_permille`.
pub fn load_cap_ns(bounds: &HaltPollBounds, load_permille: u32) -> u32 {
    let stop = u64::from(bounds.stop_load_permille.clamp(1, 1000));
    let load = u64::from(load_permille.min(1000));
    if load >= stop {
        return 0;
    }
    let room = (stop - load) * CAP_STEPS / stop; // 0..=CAP_STEPS, floor
    (u64::from(bounds.halt_poll_ns.max) * room / CAP_STEPS) as u32
}

/// The halt-poll controller (seed 002): the next host parameters from the
/// current ones, the host load and the interval's polling statistics.
///
/// Poll while the pCPUs have room and polls succeed (each caught wake-up
/// saves a halt and a wake-up IPI), shrink when polls mostly fail, stop when
/// the vCPUs' pCPUs are contended or the host is loaded (a poll then takes
/// CPU other threads want). Hysteresis: the window moves by the growth
/// factor or the shrink divisor at most once per interval, holds between
/// the two success thresholds and when too few polls were made, and ignores
/// changes smaller than an eighth of itself. Every output is within
/// `bounds`, and more load never gives a longer window.
pub fn decide(
    current: &KvmHaltPoll,
    input: &HaltPollInput,
    bounds: &HaltPollBounds,
) -> HaltPollDecision {
    let cur = bounds.clamp(*current);
    let cap = load_cap_ns(bounds, input.load_permille);
    let min = bounds.halt_poll_ns.min;
    let grow_factor = bounds.grow.max.max(2);
    let mut params = cur;
    let (target, reason) = if input.contended {
        (0, HaltPollReason::Contended)
    } else if input.load_permille.min(1000) >= bounds.stop_load_permille {
        (0, HaltPollReason::HostLoaded)
    } else {
        match input.polls.success_permille() {
            Some(s)
                if input.polls.attempted >= bounds.min_polls
                    && s < bounds.shrink_success_permille =>
            {
                // KVM already drops each failing vCPU's own window to 0;
                // the host-wide maximum only comes down to the first window,
                // so that polling resumes by itself where it pays again.
                let floor = cur.halt_poll_ns.min(bounds.grow_start_ns.max);
                let divided = match cur.shrink {
                    0 | 1 => floor,
                    d => (cur.halt_poll_ns / d).max(floor),
                };
                params.shrink = bounds.shrink.min;
                params.grow = bounds.grow.min;
                (divided, HaltPollReason::PollsFail)
            }
            Some(s)
                if input.polls.attempted >= bounds.min_polls
                    && s >= bounds.grow_success_permille =>
            {
                let grown = cur
                    .halt_poll_ns
                    .saturating_mul(grow_factor)
                    .max(bounds.grow_start_ns.max);
                params.shrink = bounds.shrink.max;
                params.grow = bounds.grow.max;
                (grown, HaltPollReason::PollsSucceed)
            }
            // Stopped for load or contention that has gone: start again
            // from the first window (growing from there only as polls pay).
            _ if cur.halt_poll_ns == 0 => (bounds.grow_start_ns.max, HaltPollReason::Resume),
            _ => (cur.halt_poll_ns, HaltPollReason::Hold),
        }
    };
    // A small move is not worth a write (and would flap on noise).
    let band = cur.halt_poll_ns / 8;
    let target = if target != 0 && target.abs_diff(cur.halt_poll_ns) <= band {
        cur.halt_poll_ns
    } else {
        target
    };
    params.halt_poll_ns = target.min(cap).clamp(min, bounds.halt_poll_ns.max);
    HaltPollDecision {
        params: bounds.clamp(params),
        reason,
        load_cap_ns: cap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CUR: HaltPollParams = HaltPollParams::KVM_CURRENT;
    const OLD: HaltPollParams = HaltPollParams::KVM_LEGACY;

    #[test]
    fn short_blocks_grow_from_the_base_by_the_factor_up_to_the_cap() {
        let mut window = 0;
        let mut seen = vec![];
        for _ in 0..8 {
            window = after_block(&CUR, window, 199_000, true);
            seen.push(window);
        }
        assert_eq!(
            seen,
            [10_000, 20_000, 40_000, 80_000, 160_000, 200_000, 200_000, 200_000]
        );
    }

    #[test]
    fn a_block_caught_by_the_poll_keeps_the_window() {
        assert_eq!(after_block(&CUR, 40_000, 30_000, true), 40_000);
        assert_eq!(after_block(&CUR, 40_000, 40_000, true), 40_000);
    }

    #[test]
    fn long_blocks_shrink_and_legacy_resets() {
        assert_eq!(after_block(&CUR, 200_000, 5_000_000, true), 100_000);
        assert_eq!(after_block(&CUR, 100_000, 5_000_000, true), 50_000);
        // Below the start the current kernel drops to zero.
        assert_eq!(after_block(&CUR, 15_000, 5_000_000, true), 0);
        assert_eq!(after_block(&OLD, 200_000, 5_000_000, true), 0);
        // A zero window stays zero on a long block.
        assert_eq!(after_block(&CUR, 0, 5_000_000, true), 0);
    }

    #[test]
    fn invalid_wakeups_shrink() {
        assert_eq!(after_block(&CUR, 160_000, 1_000, false), 80_000);
        assert_eq!(after_block(&OLD, 160_000, 1_000, false), 0);
    }

    #[test]
    fn a_block_between_window_and_max_grows_and_at_max_holds() {
        assert_eq!(after_block(&CUR, 20_000, 199_999, true), 40_000);
        assert_eq!(after_block(&CUR, 200_000, 200_000, true), 200_000);
        // A window above a lowered maximum is clamped first.
        let lowered = HaltPollParams {
            max_ns: 50_000,
            ..CUR
        };
        assert_eq!(after_block(&lowered, 200_000, 40_000, true), 50_000);
    }

    #[test]
    fn disabled_polling_and_growth() {
        let off = HaltPollParams { max_ns: 0, ..CUR };
        assert_eq!(after_block(&off, 80_000, 1_000, true), 0);
        let no_grow = HaltPollParams { grow: 0, ..CUR };
        assert_eq!(after_block(&no_grow, 0, 1_000, true), 0);
    }

    #[test]
    fn presets_and_load_tuning() {
        assert_eq!(
            HaltPollParams::preset("guest-haltpoll")
                .unwrap()
                .grow_start_ns,
            50_000
        );
        assert!(HaltPollParams::preset("nope").is_none());
        assert_eq!(tuned_for_load(&CUR, 0).max_ns, 200_000);
        assert_eq!(tuned_for_load(&CUR, 500).max_ns, 100_000);
        assert_eq!(tuned_for_load(&CUR, 950).max_ns, 0);
        assert_eq!(tuned_for_load(&CUR, 5000).max_ns, 0);
        assert_eq!(tuned_for_load(&CUR, 899).max_ns, 20_200);
    }

    fn polls(success_ns: u64, fail_ns: u64, attempted: u64) -> PollDelta {
        PollDelta {
            success_ns,
            fail_ns,
            attempted,
            successful: attempted / 2,
            ..Default::default()
        }
    }

    fn input(load_permille: u32, contended: bool, polls: PollDelta) -> HaltPollInput {
        HaltPollInput {
            load_permille,
            contended,
            polls,
        }
    }

    const KVM_DEFAULT: KvmHaltPoll = KvmHaltPoll::KVM_DEFAULT;

    #[test]
    fn the_default_parameters_give_the_current_kernels_window() {
        assert_eq!(KVM_DEFAULT.window_params(), CUR);
    }

    #[test]
    fn contention_is_judged_per_vcpu_and_second() {
        // 100 per vCPU and second: 2 vCPUs over 100 ms need 20.
        assert!(contended(20, 2, 100_000_000));
        assert!(!contended(19, 2, 100_000_000));
        assert!(!contended(1_000, 0, 100_000_000));
        assert!(!contended(1_000, 2, 0));
        let polls = PollDelta {
            preemptions: 20,
            ..Default::default()
        };
        let i = HaltPollInput::of_interval(5_000, polls, 2, 100_000_000);
        assert_eq!((i.load_permille, i.contended), (1000, true));
    }

    #[test]
    fn contention_and_load_stop_polling_and_room_resumes_it() {
        let b = HaltPollBounds::default();
        let good = polls(900, 100, 100);
        let d = decide(&KVM_DEFAULT, &input(100, true, good), &b);
        assert_eq!(
            (d.params.halt_poll_ns, d.reason),
            (0, HaltPollReason::Contended)
        );
        let d = decide(&KVM_DEFAULT, &input(950, false, good), &b);
        assert_eq!(
            (d.params.halt_poll_ns, d.reason),
            (0, HaltPollReason::HostLoaded)
        );
        // Stopped, no polls (KVM does not poll with a zero maximum), room again.
        let stopped = KvmHaltPoll {
            halt_poll_ns: 0,
            ..KVM_DEFAULT
        };
        let d = decide(&stopped, &input(100, false, PollDelta::default()), &b);
        assert_eq!(
            (d.params.halt_poll_ns, d.reason),
            (10_000, HaltPollReason::Resume)
        );
    }

    #[test]
    fn successful_polls_grow_failing_ones_shrink_to_the_first_window() {
        let b = HaltPollBounds::default();
        let start = KvmHaltPoll {
            halt_poll_ns: 20_000,
            ..KVM_DEFAULT
        };
        let d = decide(&start, &input(0, false, polls(900, 100, 100)), &b);
        assert_eq!(
            (d.params.halt_poll_ns, d.reason),
            (40_000, HaltPollReason::PollsSucceed)
        );
        let d = decide(&KVM_DEFAULT, &input(0, false, polls(100, 900, 100)), &b);
        assert_eq!(
            (d.params.halt_poll_ns, d.reason),
            (100_000, HaltPollReason::PollsFail)
        );
        // The shrink parameter goes to its minimum (0: KVM resets a failing window).
        assert_eq!(d.params.shrink, 0);
        let low = KvmHaltPoll {
            halt_poll_ns: 12_000,
            ..KVM_DEFAULT
        };
        let d = decide(&low, &input(0, false, polls(100, 900, 100)), &b);
        assert_eq!(d.params.halt_poll_ns, 10_000);
    }

    #[test]
    fn hysteresis_holds_between_thresholds_with_few_polls_and_on_small_moves() {
        let b = HaltPollBounds::default();
        // 40% success: between 25% and 50%.
        let d = decide(&KVM_DEFAULT, &input(0, false, polls(400, 600, 100)), &b);
        assert_eq!((d.params, d.reason), (KVM_DEFAULT, HaltPollReason::Hold));
        // Too few polls to judge.
        let d = decide(&KVM_DEFAULT, &input(0, false, polls(0, 1000, 3)), &b);
        assert_eq!((d.params, d.reason), (KVM_DEFAULT, HaltPollReason::Hold));
        // The same input twice gives the same output: no flapping.
        let once = decide(&KVM_DEFAULT, &input(300, false, polls(400, 600, 100)), &b);
        let twice = decide(&once.params, &input(300, false, polls(400, 600, 100)), &b);
        assert_eq!(once.params, twice.params);
        // Load noise inside one cap step does not move the cap.
        assert_eq!(load_cap_ns(&b, 300), load_cap_ns(&b, 320));
    }

    #[test]
    fn the_load_cap_steps_down_to_zero_at_the_stop_load() {
        let b = HaltPollBounds::default();
        assert_eq!(load_cap_ns(&b, 0), 200_000);
        assert_eq!(load_cap_ns(&b, 450), 100_000);
        assert_eq!(load_cap_ns(&b, 800), 0);
        assert_eq!(load_cap_ns(&b, 900), 0);
        assert_eq!(load_cap_ns(&b, u32::MAX), 0);
        let d = decide(&KVM_DEFAULT, &input(450, false, polls(400, 600, 100)), &b);
        assert_eq!(d.params.halt_poll_ns, 100_000);
    }

    #[test]
    fn bounds_are_validated() {
        assert!(HaltPollBounds::default().validate().is_ok());
        let b = HaltPollBounds {
            halt_poll_ns: Range::new(10, 5),
            ..Default::default()
        };
        assert!(b.validate().is_err());
        let mut b = HaltPollBounds::default();
        b.halt_poll_ns.max = MAX_HALT_POLL_NS + 1;
        assert!(b.validate().is_err());
        let b = HaltPollBounds {
            shrink_success_permille: 600,
            ..Default::default()
        };
        assert!(b
            .validate()
            .unwrap_err()
            .to_string()
            .contains("shrink_success_permille"));
        let b = HaltPollBounds {
            stop_load_permille: 0,
            ..Default::default()
        };
        assert!(b.validate().is_err());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn arb_range(hi: u32) -> impl Strategy<Value = Range> {
            (0..=hi, 0..=hi).prop_map(|(a, b)| Range {
                min: a.min(b),
                max: a.max(b),
            })
        }

        fn arb_bounds() -> impl Strategy<Value = HaltPollBounds> {
            (
                arb_range(MAX_HALT_POLL_NS),
                arb_range(16),
                arb_range(MAX_HALT_POLL_NS),
                arb_range(16),
                1..=1000u32,
                (0..1000u32, 1..=1000u32),
                1..=1000u64,
            )
                .prop_map(|(hp, g, gs, sh, stop, (a, b), min_polls)| HaltPollBounds {
                    halt_poll_ns: hp,
                    grow: g,
                    grow_start_ns: gs,
                    shrink: sh,
                    stop_load_permille: stop,
                    shrink_success_permille: a.min(b.saturating_sub(1)),
                    grow_success_permille: b,
                    min_polls,
                })
        }

        fn arb_params() -> impl Strategy<Value = KvmHaltPoll> {
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
                |(halt_poll_ns, grow, grow_start_ns, shrink)| KvmHaltPoll {
                    halt_poll_ns,
                    grow,
                    grow_start_ns,
                    shrink,
                },
            )
        }

        fn arb_polls() -> impl Strategy<Value = PollDelta> {
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            )
                .prop_map(|(a, b, c, d, e, f, g)| PollDelta {
                    success_ns: a,
                    fail_ns: b,
                    wait_ns: c,
                    successful: d,
                    attempted: e % 4096,
                    invalid: f,
                    preemptions: g,
                })
        }

        fn within(b: &HaltPollBounds, p: &KvmHaltPoll) -> bool {
            let r = |r: Range, v: u32| r.min <= v && v <= r.max;
            r(b.halt_poll_ns, p.halt_poll_ns)
                && r(b.grow, p.grow)
                && r(b.grow_start_ns, p.grow_start_ns)
                && r(b.shrink, p.shrink)
        }

        proptest! {
            #[test]
            fn every_output_is_within_bounds(
                b in arb_bounds(), cur in arb_params(), polls in arb_polls(),
                load in any::<u32>(), contended in any::<bool>(),
            ) {
                let d = decide(&cur, &HaltPollInput { load_permille: load, contended, polls }, &b);
                prop_assert!(within(&b, &d.params), "{d:?} outside {b:?}");
                prop_assert!(d.params.halt_poll_ns <= d.load_cap_ns.max(b.halt_poll_ns.min));
            }

            #[test]
            fn more_load_or_contention_never_gives_a_longer_window(
                b in arb_bounds(), cur in arb_params(), polls in arb_polls(),
                l1 in 0..1200u32, l2 in 0..1200u32, contended in any::<bool>(),
            ) {
                let (lo, hi) = (l1.min(l2), l1.max(l2));
                let at = |load, contended| {
                    decide(&cur, &HaltPollInput { load_permille: load, contended, polls }, &b)
                        .params
                        .halt_poll_ns
                };
                prop_assert!(at(hi, contended) <= at(lo, contended));
                prop_assert!(at(lo, true) <= at(lo, false));
            }

            #[test]
            fn a_repeated_input_settles(
                b in arb_bounds(), cur in arb_params(), polls in arb_polls(), load in 0..1000u32,
            ) {
                // Under a steady input the window moves one way only: it
                // never oscillates.
                let input = HaltPollInput { load_permille: load, contended: false, polls };
                let mut p = cur;
                let mut seen = vec![];
                for _ in 0..64 {
                    p = decide(&p, &input, &b).params;
                    seen.push(p.halt_poll_ns);
                }
                let tail = &seen[1..];
                let up = tail.windows(2).all(|w| w[0] <= w[1]);
                let down = tail.windows(2).all(|w| w[0] >= w[1]);
                prop_assert!(up || down, "{seen:?}");
            }
        }
    }
}
