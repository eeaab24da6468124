//! Administrator limits and tunables of the boost policy.

use serde::{Deserialize, Serialize};

use crate::Nanos;

/// Host real-time class used for boosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtClass {
    /// `SCHED_FIFO`.
    Fifo,
    /// `SCHED_RR` (the default, as in Google's pvsched).
    #[default]
    Rr,
    /// `SCHED_DEADLINE`: each boosted thread gets a kernel reservation of
    /// [`PolicyConfig::deadline_reservation`], so the kernel throttles it
    /// even while the daemon stalls or after it dies. Runs above every RT
    /// priority; needs the thread's affinity to span its root domain.
    Deadline,
}

/// A `SCHED_DEADLINE` reservation: `runtime_ns` of CPU in every `period_ns`
/// (the relative deadline is the period).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeadlineReservation {
    /// CPU time per period.
    pub runtime_ns: Nanos,
    /// Replenishment period and relative deadline.
    pub period_ns: Nanos,
}

/// Shortest `SCHED_DEADLINE` runtime the kernel accepts (`1 << DL_SCALE`).
pub const DEADLINE_MIN_RUNTIME_NS: Nanos = 1 << 10;
/// Shortest period the kernel accepts by default (`sched_deadline_period_min_us`).
pub const DEADLINE_MIN_PERIOD_NS: Nanos = 100_000;
/// Longest period allowed here: one budget window is the natural ceiling, and
/// the kernel's default `sched_deadline_period_max_us` is 4 s.
pub const DEADLINE_MAX_PERIOD_NS: Nanos = 1_000_000_000;

/// Tunables of the boost policy. Every bound here holds whatever the guest writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Host RT class for boosted vCPU threads.
    pub rt_class: RtClass,
    /// Period of the `SCHED_DEADLINE` reservation of a boosted thread (with
    /// `rt_class = "deadline"`); its runtime follows from the budgets.
    pub deadline_period_ns: Nanos,
    /// Lowest host RT priority a boost may use.
    pub prio_min: u8,
    /// Highest host RT priority a boost may use (the admin cap).
    pub prio_max: u8,
    /// Guest RT priority at or above which a guest task counts as latency-sensitive.
    pub guest_rt_threshold: u8,
    /// Boost while the guest runs an RT task.
    pub boost_on_rt_running: bool,
    /// Boost while RT tasks are pending on the vCPU (also while it is halted).
    pub boost_on_rt_pending: bool,
    /// Boost while the guest handles an interrupt or softirq.
    pub boost_on_irq: bool,
    /// Honour explicit boost/unboost requests.
    pub honour_requests: bool,
    /// Longest continuous boost, in boosted CPU time without yielding the pCPU,
    /// before the vCPU is throttled. A step interval in which the thread ran less
    /// than 90% of the time counts as a yield and restarts the count. The count
    /// survives a refusal by the VM's budget or the host cap (a spinner that the
    /// VM's burst bound unboosts keeps running, so it has not yielded): a thread
    /// cannot escape its own throttle by exhausting the VM's budget first.
    pub max_continuous_ns: Nanos,
    /// Length of the sliding budget window.
    pub budget_window_ns: Nanos,
    /// Most boosted CPU time a vCPU may use in any window of `budget_window_ns`
    /// (an inner bound per thread).
    pub budget_ns: Nanos,
    /// Most boosted CPU time a whole VM may use in any window of
    /// `budget_window_ns`, summed over all its boosted threads (vCPUs, the
    /// interrupt path): the bound a guest cannot escape by spreading demand
    /// across vCPUs.
    pub vm_budget_ns: Nanos,
    /// Length of the short sliding window of `vm_burst_ns` (and of the host
    /// cap's burst bound). At most `budget_window_ns`.
    pub burst_window_ns: Nanos,
    /// Most boosted CPU time a whole VM may use in any `burst_window_ns`,
    /// summed over its threads. The long budget bounds the average; this
    /// bounds how long the VM's boosted threads together can keep the host's
    /// lower-priority work off its CPUs, even when they take turns and each
    /// one yields (a per-thread continuous limit cannot see that).
    pub vm_burst_ns: Nanos,
    /// Most boosted CPU time all VMs together may use in any window, as a
    /// percentage of the host's CPU time in that window (all online CPUs).
    pub host_budget_percent: u8,
    /// How long a throttled vCPU is refused boosts.
    pub throttle_ns: Nanos,
    /// Longest throttle: a vCPU throttled again within one budget window of its
    /// last throttle's end is throttled twice as long, up to this.
    pub max_throttle_ns: Nanos,
    /// Smallest boost worth granting; a vCPU with less budget left is throttled.
    pub min_quantum_ns: Nanos,
    /// A vCPU throttled this many times in a row (each throttle starting within a
    /// budget window of the last one's end) makes its VM a repeat offender: a guest
    /// that keeps one vCPU at its limits is not trusted at full value on the others
    /// either. While it is one (until that vCPU has yielded its pCPU or stopped
    /// asking and a budget window has passed since its last throttle ended),
    /// the VM's budget and burst bound shrink to
    /// `offender_budget_percent`. 0: never. At most 20.
    pub offender_streak: u32,
    /// The share of `vm_budget_ns` and `vm_burst_ns` a repeat offender keeps, in
    /// percent (1..=100; 100 turns the penalty off).
    pub offender_budget_percent: u8,
    /// Bounded slice extension per critical-section episode, in CPU time (0: off).
    /// The episode is the guest line's `cs_depth` staying non-zero or, where the host
    /// reads the vCPU's preempt count from guest RAM, that count staying non-zero (the
    /// count then replaces `cs_depth`, and the extension applies only while the vCPU's
    /// pCPU is contended, see `cs_contended_load_permille`).
    pub cs_extension_ns: Nanos,
    /// A vCPU whose host-read preempt count is non-zero gets its slice extended only
    /// while its pCPU is contended: its run delay grew since the previous sample, or
    /// the pCPU it last ran on was busy at least this much (per mille) over the last
    /// interval. 0: always, as for the guest line's `cs_depth`; at most 1000.
    pub cs_contended_load_permille: u32,
    /// Wall-time grant of a directed boost of a preempted lock holder: a vCPU whose
    /// host-read preempt count is non-zero (and is not idle) and whose run delay grew
    /// by more than its run time between its last two samples. The grant ends early
    /// when the count returns to zero. 0: off; otherwise within
    /// `min_quantum_ns ..= min(10 ms, max_continuous_ns)`.
    pub lock_holder_boost_ns: Nanos,
    /// Most lock-holder grants one vCPU may start in any `budget_window_ns`, so a guest
    /// that keeps its preempt count non-zero cannot spend its whole budget on this
    /// reason. Within 1..=64.
    pub lock_holder_max_grants: u32,
    /// When vCPUs of a VM spin, boost the vCPU with the most critical-section activity.
    pub directed_boost: bool,
    /// Boost the VM's interrupt-delivery thread (QEMU's main loop) while any
    /// of its vCPUs is boosted, under its own budget.
    pub boost_interrupt_path: bool,
    /// A guest whose header heartbeat has not moved for this long is hung
    /// (or gone): nothing it wrote is believed until the heartbeat moves again.
    pub guest_stale_ns: Nanos,
    /// A boost request on an idle vCPU (the guest's boost-while-halted ahead
    /// of an RT wakeup) is believed for this long after the host first saw
    /// it. The guest lapses its own request only at its next context switch,
    /// which a tickless idle CPU may not have for seconds; the host expires
    /// it without waking the guest. A new write of the line starts it again.
    pub idle_request_ns: Nanos,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            rt_class: RtClass::Rr,
            deadline_period_ns: 10_000_000,
            prio_min: 1,
            prio_max: 8,
            guest_rt_threshold: 1,
            boost_on_rt_running: true,
            boost_on_rt_pending: true,
            boost_on_irq: true,
            honour_requests: true,
            max_continuous_ns: 4_000_000,
            budget_window_ns: 100_000_000,
            budget_ns: 25_000_000,
            vm_budget_ns: 45_000_000,
            burst_window_ns: 10_000_000,
            vm_burst_ns: 7_000_000,
            host_budget_percent: 35,
            throttle_ns: 50_000_000,
            max_throttle_ns: 400_000_000,
            min_quantum_ns: 100_000,
            offender_streak: 2,
            offender_budget_percent: 10,
            cs_extension_ns: 500_000,
            cs_contended_load_permille: 800,
            lock_holder_boost_ns: 1_000_000,
            lock_holder_max_grants: 8,
            directed_boost: true,
            boost_interrupt_path: true,
            guest_stale_ns: 1_000_000_000,
            idle_request_ns: 100_000_000,
        }
    }
}

/// When a VM's QEMU IOThreads run in a real-time class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoThreadMode {
    /// Always, within the VM's budget: their boosted CPU time is charged to the
    /// VM's ledger like a vCPU's, so a busy IOThread uses up the VM's budget and
    /// a VM refused by it loses its IOThreads' boost with its vCPUs'.
    Static,
    /// Only while some vCPU of the VM may be boosted: the IOThread that
    /// completes a boosted vCPU's I/O does not wait behind host load.
    #[default]
    WithVm,
}

/// How a VM's IOThreads are boosted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IoThreadPolicy {
    /// `SCHED_FIFO` priority, kept inside `prio_min..=prio_max` by the engine.
    pub prio: u8,
    /// When.
    pub mode: IoThreadMode,
}

/// A configuration that cannot be enforced.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Priorities outside 1..=99 or min above max.
    #[error("boost priority range {min}..={max} is not within 1..=99 with min <= max")]
    PriorityRange {
        /// `prio_min`.
        min: u8,
        /// `prio_max`.
        max: u8,
    },
    /// Guest threshold outside 1..=99.
    #[error("guest RT threshold {0} is not within 1..=99")]
    Threshold(u8),
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// Budget larger than its window.
    #[error("budget {budget_ns} ns exceeds its window {window_ns} ns")]
    BudgetExceedsWindow {
        /// `budget_ns`.
        budget_ns: Nanos,
        /// `budget_window_ns`.
        window_ns: Nanos,
    },
    /// The longest throttle is shorter than the first.
    #[error("max_throttle_ns {max_throttle_ns} is below throttle_ns {throttle_ns}")]
    ThrottleRange {
        /// `throttle_ns`.
        throttle_ns: Nanos,
        /// `max_throttle_ns`.
        max_throttle_ns: Nanos,
    },
    /// The minimum quantum does not fit in the budget or continuous limit.
    #[error("minimum quantum {0} ns exceeds the budget or the continuous limit")]
    Quantum(Nanos),
    /// The host budget is not a percentage in 1..=100.
    #[error("host_budget_percent {0} is not within 1..=100")]
    HostPercent(u8),
    /// A duration beyond one hour, almost certainly a unit mistake.
    #[error("{0} exceeds one hour")]
    TooLong(&'static str),
    /// A lock-holder grant outside its range (0 is off).
    #[error(
        "lock_holder_boost_ns {value} is neither 0 (off) nor within {min}..={max} ns \
         (min_quantum_ns ..= min(10 ms, max_continuous_ns))"
    )]
    LockHolderBoost {
        /// `lock_holder_boost_ns`.
        value: Nanos,
        /// The shortest grant allowed (`min_quantum_ns`).
        min: Nanos,
        /// The longest grant allowed.
        max: Nanos,
    },
    /// A bound on lock-holder grants per window outside 1..=64.
    #[error("lock_holder_max_grants {0} is not within 1..={max}", max = LOCK_HOLDER_MAX_GRANTS)]
    LockHolderGrants(u32),
    /// A load threshold above 1000 per mille.
    #[error("cs_contended_load_permille {0} is not within 0..=1000")]
    ContendedLoad(u32),
    /// A repeat-offender streak above 20 or a kept share outside 1..=100.
    #[error(
        "offender_streak {streak} is not within 0..=20 or offender_budget_percent \
         {percent} is not within 1..=100"
    )]
    Offender {
        /// `offender_streak`.
        streak: u32,
        /// `offender_budget_percent`.
        percent: u8,
    },
    /// A `SCHED_DEADLINE` period the kernel would refuse or that exceeds the window.
    #[error("deadline_period_ns {0} is not within 100 us ..= min(1 s, budget_window_ns)")]
    DeadlinePeriod(Nanos),
}

const HOUR_NS: Nanos = 3_600_000_000_000;

/// Longest lock-holder grant: one scheduler tick at HZ=100. A guest that keeps
/// preemption disabled for longer has a bug the host cannot fix by running it.
pub const LOCK_HOLDER_BOOST_MAX_NS: Nanos = 10_000_000;
/// Most lock-holder grants per vCPU and budget window (each vCPU remembers this many
/// grant times).
pub const LOCK_HOLDER_MAX_GRANTS: u32 = 64;

impl PolicyConfig {
    /// Checks that every limit is enforceable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.prio_min == 0 || self.prio_max > 99 || self.prio_min > self.prio_max {
            return Err(ConfigError::PriorityRange {
                min: self.prio_min,
                max: self.prio_max,
            });
        }
        if self.guest_rt_threshold == 0 || self.guest_rt_threshold > 99 {
            return Err(ConfigError::Threshold(self.guest_rt_threshold));
        }
        for (name, value) in [
            ("max_continuous_ns", self.max_continuous_ns),
            ("budget_window_ns", self.budget_window_ns),
            ("budget_ns", self.budget_ns),
            ("vm_budget_ns", self.vm_budget_ns),
            ("burst_window_ns", self.burst_window_ns),
            ("vm_burst_ns", self.vm_burst_ns),
            ("throttle_ns", self.throttle_ns),
            ("min_quantum_ns", self.min_quantum_ns),
            ("guest_stale_ns", self.guest_stale_ns),
            ("idle_request_ns", self.idle_request_ns),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
            if value > HOUR_NS {
                return Err(ConfigError::TooLong(name));
            }
        }
        if self.max_throttle_ns < self.throttle_ns {
            return Err(ConfigError::ThrottleRange {
                throttle_ns: self.throttle_ns,
                max_throttle_ns: self.max_throttle_ns,
            });
        }
        if self.max_throttle_ns > HOUR_NS {
            return Err(ConfigError::TooLong("max_throttle_ns"));
        }
        if self.cs_extension_ns > HOUR_NS {
            return Err(ConfigError::TooLong("cs_extension_ns"));
        }
        if self.budget_ns > self.budget_window_ns {
            return Err(ConfigError::BudgetExceedsWindow {
                budget_ns: self.budget_ns,
                window_ns: self.budget_window_ns,
            });
        }
        if self.host_budget_percent == 0 || self.host_budget_percent > 100 {
            return Err(ConfigError::HostPercent(self.host_budget_percent));
        }
        if self.min_quantum_ns > self.budget_ns
            || self.min_quantum_ns > self.max_continuous_ns
            || self.min_quantum_ns > self.vm_budget_ns
            || self.min_quantum_ns > self.vm_burst_ns
        {
            return Err(ConfigError::Quantum(self.min_quantum_ns));
        }
        if self.lock_holder_boost_ns != 0 {
            let max = LOCK_HOLDER_BOOST_MAX_NS.min(self.max_continuous_ns);
            if self.lock_holder_boost_ns < self.min_quantum_ns || self.lock_holder_boost_ns > max {
                return Err(ConfigError::LockHolderBoost {
                    value: self.lock_holder_boost_ns,
                    min: self.min_quantum_ns,
                    max,
                });
            }
        }
        if self.lock_holder_max_grants == 0 || self.lock_holder_max_grants > LOCK_HOLDER_MAX_GRANTS
        {
            return Err(ConfigError::LockHolderGrants(self.lock_holder_max_grants));
        }
        if self.offender_streak > 20
            || self.offender_budget_percent == 0
            || self.offender_budget_percent > 100
        {
            return Err(ConfigError::Offender {
                streak: self.offender_streak,
                percent: self.offender_budget_percent,
            });
        }
        if self.cs_contended_load_permille > 1000 {
            return Err(ConfigError::ContendedLoad(self.cs_contended_load_permille));
        }
        // Only a deadline class uses the period; an RR/FIFO config with a short
        // window stays valid.
        if self.rt_class == RtClass::Deadline
            && (self.deadline_period_ns < DEADLINE_MIN_PERIOD_NS
                || self.deadline_period_ns > DEADLINE_MAX_PERIOD_NS.min(self.budget_window_ns))
        {
            return Err(ConfigError::DeadlinePeriod(self.deadline_period_ns));
        }
        Ok(())
    }

    /// The `SCHED_DEADLINE` reservation of each boosted thread of a VM with
    /// `threads` boostable threads (vCPUs and the interrupt path).
    ///
    /// Without RT group scheduling the kernel bounds threads, not VMs, so
    /// the VM's budget is split evenly across every thread that could be
    /// boosted at once: all of them at full reservation use at most
    /// `vm_budget_ns` per window (and `vm_burst_ns` per burst window), each
    /// at most `budget_ns` and no more than `max_continuous_ns` in one period. The kernel enforces this even
    /// when the daemon is stopped or dead; the daemon's own ledgers stay as
    /// the finer bound while it runs.
    pub fn deadline_reservation(&self, threads: u32) -> DeadlineReservation {
        self.deadline_reservation_within(threads, self.vm_budget_ns, self.vm_burst_ns)
    }

    /// [`PolicyConfig::deadline_reservation`] for a VM whose budgets in force are
    /// `vm_budget_ns` and `vm_burst_ns` (a repeat offender's cut ones): the kernel's
    /// bound shrinks with the daemon's, so the cut holds after the daemon dies too.
    pub fn deadline_reservation_within(
        &self,
        threads: u32,
        vm_budget_ns: Nanos,
        vm_burst_ns: Nanos,
    ) -> DeadlineReservation {
        let threads = Nanos::from(threads.max(1));
        let period = u128::from(self.deadline_period_ns);
        let per_thread = (vm_budget_ns / threads).min(self.budget_ns);
        let runtime =
            (u128::from(per_thread) * period / u128::from(self.budget_window_ns.max(1))) as Nanos;
        // The burst bound at the same rate: all threads at full reservation
        // use at most `vm_burst_ns` per burst window.
        let burst = (u128::from(vm_burst_ns / threads) * period
            / u128::from(self.effective_burst_window_ns().max(1))) as Nanos;
        let runtime = runtime.min(burst);
        DeadlineReservation {
            runtime_ns: runtime
                .min(self.max_continuous_ns)
                .min(self.deadline_period_ns)
                .max(DEADLINE_MIN_RUNTIME_NS),
            period_ns: self.deadline_period_ns,
        }
    }

    /// `budget` (the VM's long or burst budget) as a repeat offender keeps it,
    /// never below one minimum quantum.
    pub fn offender_share(&self, budget: Nanos) -> Nanos {
        let kept = u128::from(budget) * u128::from(self.offender_budget_percent) / 100;
        (kept as Nanos).max(self.min_quantum_ns)
    }

    /// The burst window in force: `burst_window_ns`, never longer than the
    /// budget window (a configuration that shortens the budget window
    /// shortens the burst window with it).
    pub fn effective_burst_window_ns(&self) -> Nanos {
        self.burst_window_ns.min(self.budget_window_ns)
    }

    /// Maps a guest RT priority (1..=99) onto the admin range.
    pub fn map_guest_prio(&self, guest_prio: u8) -> u8 {
        let g = u32::from(guest_prio.clamp(1, 99));
        let span = u32::from(self.prio_max - self.prio_min);
        self.prio_min + ((g - 1) * span / 98) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_maps_into_range() {
        let cfg = PolicyConfig::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.map_guest_prio(1), cfg.prio_min);
        assert_eq!(cfg.map_guest_prio(99), cfg.prio_max);
        assert_eq!(cfg.map_guest_prio(0), cfg.prio_min);
        assert_eq!(cfg.map_guest_prio(255), cfg.prio_max);
        assert!((cfg.prio_min..=cfg.prio_max).contains(&cfg.map_guest_prio(50)));
    }

    #[test]
    fn a_repeat_offenders_deadline_reservation_shrinks_with_its_budgets() {
        let cfg = PolicyConfig::default();
        let threads = 5;
        let full = cfg.deadline_reservation(threads);
        let cut = cfg.deadline_reservation_within(
            threads,
            cfg.offender_share(cfg.vm_budget_ns),
            cfg.offender_share(cfg.vm_burst_ns),
        );
        assert_eq!(full.period_ns, cut.period_ns);
        assert!(cut.runtime_ns < full.runtime_ns, "{cut:?} vs {full:?}");
        // Every thread at its full cut reservation stays within the cut budgets.
        let windows = cfg.budget_window_ns / cut.period_ns;
        assert!(
            u64::from(threads) * cut.runtime_ns * windows <= cfg.offender_share(cfg.vm_budget_ns)
        );
        let bursts = cfg.effective_burst_window_ns() / cut.period_ns;
        assert!(
            u64::from(threads) * cut.runtime_ns * bursts.max(1)
                <= cfg.offender_share(cfg.vm_burst_ns)
        );
    }

    #[test]
    fn bad_limits_are_refused() {
        let bad = |f: fn(&mut PolicyConfig)| {
            let mut cfg = PolicyConfig::default();
            f(&mut cfg);
            cfg.validate().unwrap_err()
        };
        assert!(matches!(
            bad(|c| c.prio_max = 100),
            ConfigError::PriorityRange { .. }
        ));
        assert!(matches!(
            bad(|c| c.prio_min = 9),
            ConfigError::PriorityRange { .. }
        ));
        assert!(matches!(
            bad(|c| c.budget_ns = c.budget_window_ns + 1),
            ConfigError::BudgetExceedsWindow { .. }
        ));
        assert!(matches!(
            bad(|c| c.vm_budget_ns = 0),
            ConfigError::Zero("vm_budget_ns")
        ));
        assert!(matches!(
            bad(|c| c.host_budget_percent = 101),
            ConfigError::HostPercent(101)
        ));
        assert!(matches!(
            bad(|c| c.throttle_ns = 0),
            ConfigError::Zero("throttle_ns")
        ));
        assert!(matches!(
            bad(|c| c.min_quantum_ns = c.max_continuous_ns + 1),
            ConfigError::Quantum(_)
        ));
        assert!(matches!(
            bad(|c| c.budget_window_ns = HOUR_NS + 1),
            ConfigError::TooLong(_)
        ));
    }

    #[test]
    fn critical_section_keys_are_checked_against_their_ranges() {
        let check = |f: fn(&mut PolicyConfig)| {
            let mut cfg = PolicyConfig::default();
            f(&mut cfg);
            cfg.validate()
        };
        // Off is always valid, whatever the other limits.
        assert_eq!(
            check(|c| {
                c.lock_holder_boost_ns = 0;
                c.min_quantum_ns = 2_000_000;
            }),
            Ok(())
        );
        // A grant below the smallest boost would never be made.
        assert_eq!(
            check(|c| c.lock_holder_boost_ns = c.min_quantum_ns - 1),
            Err(ConfigError::LockHolderBoost {
                value: 99_999,
                min: 100_000,
                max: 4_000_000
            })
        );
        // Above the continuous limit (4 ms by default) or above 10 ms.
        assert!(matches!(
            check(|c| c.lock_holder_boost_ns = c.max_continuous_ns + 1),
            Err(ConfigError::LockHolderBoost { max: 4_000_000, .. })
        ));
        assert!(matches!(
            check(|c| {
                c.max_continuous_ns = 50_000_000;
                c.lock_holder_boost_ns = LOCK_HOLDER_BOOST_MAX_NS + 1;
            }),
            Err(ConfigError::LockHolderBoost {
                max: 10_000_000,
                ..
            })
        ));
        assert_eq!(
            check(|c| c.lock_holder_boost_ns = c.max_continuous_ns),
            Ok(())
        );
        assert_eq!(
            check(|c| c.lock_holder_max_grants = 0),
            Err(ConfigError::LockHolderGrants(0))
        );
        assert_eq!(
            check(|c| c.lock_holder_max_grants = LOCK_HOLDER_MAX_GRANTS + 1),
            Err(ConfigError::LockHolderGrants(65))
        );
        assert_eq!(check(|c| c.lock_holder_max_grants = 64), Ok(()));
        assert_eq!(
            check(|c| c.cs_contended_load_permille = 1001),
            Err(ConfigError::ContendedLoad(1001))
        );
        assert_eq!(check(|c| c.cs_contended_load_permille = 0), Ok(()));
        let message = check(|c| c.lock_holder_boost_ns = 1)
            .unwrap_err()
            .to_string();
        assert!(message.contains("lock_holder_boost_ns 1 "), "{message}");
        let cfg: PolicyConfig = toml::from_str(
            "lock_holder_boost_ns = 500000\nlock_holder_max_grants = 4\ncs_contended_load_permille = 0\n",
        )
        .unwrap();
        assert_eq!(
            (
                cfg.lock_holder_boost_ns,
                cfg.lock_holder_max_grants,
                cfg.cs_contended_load_permille
            ),
            (500_000, 4, 0)
        );
    }

    #[test]
    fn config_reads_from_toml_and_rejects_unknown_keys() {
        let cfg: PolicyConfig = toml::from_str("rt_class = \"fifo\"\nprio_max = 20\n").unwrap();
        assert_eq!(cfg.rt_class, RtClass::Fifo);
        assert_eq!(cfg.prio_max, 20);
        assert_eq!(cfg.prio_min, 1);
        assert!(toml::from_str::<PolicyConfig>("prio_maxx = 3").is_err());
    }
}
