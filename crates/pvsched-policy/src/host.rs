//! The host-wide cap on boosted CPU time, shared by every VM's engine.
//!
//! Each VM's engine charges what its boosted threads used when it steps and
//! says how many threads it left boosted. The host cannot see a VM's use
//! between that VM's steps, so it assumes the worst: every boosted thread of
//! a member (at most one per host CPU) has been burning a CPU since the
//! member's last step. A share granted from what is left under that
//! assumption can never take the host past its cap, and [`HostBudget::wake_at`]
//! tells the caller when every VM with a boosted thread must be stepped
//! again so that the assumption is refreshed in time.

use std::collections::BTreeMap;

use crate::config::{ConfigError, PolicyConfig};
use crate::ledger::BudgetLedger;
use crate::Nanos;

/// A VM's membership of a [`HostBudget`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostMember(u64);

#[derive(Clone, Copy, Debug, Default)]
struct Member {
    /// Threads the member left boosted at its last step.
    boosted: u64,
    /// When the member last stepped (charged its use).
    last_step: Nanos,
}

/// Counters of the host budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostBudgetStats {
    /// Boosted CPU time charged by every member.
    pub boosted_cpu_ns: Nanos,
    /// Times a VM was refused boosts because the host cap was reached.
    pub throttles: u64,
}

/// Boosted CPU time of every VM on the host over a sliding window.
#[derive(Clone, Debug)]
pub struct HostBudget {
    budget_ns: Nanos,
    window_ns: Nanos,
    cpus: u64,
    ledger: BudgetLedger,
    /// The same charges over the short burst window, with its own cap.
    burst: Option<(BudgetLedger, Nanos)>,
    members: BTreeMap<HostMember, Member>,
    next_id: u64,
    wake_at: Option<Nanos>,
    stats: HostBudgetStats,
}

impl HostBudget {
    /// A cap of `budget_ns` boosted CPU time in any `window_ns`, on a host
    /// with `cpus` CPUs (no more than `cpus` threads consume at once).
    pub fn new(budget_ns: Nanos, window_ns: Nanos, cpus: u32) -> Result<Self, ConfigError> {
        if budget_ns == 0 {
            return Err(ConfigError::Zero("host budget"));
        }
        if window_ns == 0 {
            return Err(ConfigError::Zero("budget_window_ns"));
        }
        if cpus == 0 {
            return Err(ConfigError::Zero("host CPUs"));
        }
        Ok(HostBudget {
            budget_ns,
            window_ns,
            cpus: u64::from(cpus),
            ledger: BudgetLedger::new(window_ns),
            burst: None,
            members: BTreeMap::new(),
            next_id: 0,
            wake_at: None,
            stats: HostBudgetStats::default(),
        })
    }

    /// The cap a policy asks for: `host_budget_percent` of `cpus` CPUs'
    /// time in each budget window.
    pub fn for_policy(cfg: &PolicyConfig, cpus: u32) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let capacity = cfg.budget_window_ns.saturating_mul(u64::from(cpus));
        let budget = capacity / 100 * u64::from(cfg.host_budget_percent);
        let burst_window = cfg.effective_burst_window_ns();
        let burst =
            burst_window.saturating_mul(u64::from(cpus)) / 100 * u64::from(cfg.host_budget_percent);
        Self::new(budget, cfg.budget_window_ns, cpus)?.with_burst(burst, burst_window)
    }

    /// Adds a second cap, `burst_ns` in any `burst_window_ns` (shorter than
    /// the main window): the same percentage over a short window keeps the
    /// host's boosted threads from holding its CPUs for long stretches.
    pub fn with_burst(
        mut self,
        burst_ns: Nanos,
        burst_window_ns: Nanos,
    ) -> Result<Self, ConfigError> {
        if burst_ns == 0 {
            return Err(ConfigError::Zero("host burst budget"));
        }
        if burst_window_ns == 0 {
            return Err(ConfigError::Zero("burst_window_ns"));
        }
        self.burst = Some((BudgetLedger::new(burst_window_ns), burst_ns));
        Ok(self)
    }

    /// The burst cap in force, `(ns, window ns)`, if any.
    pub fn burst(&self) -> Option<(Nanos, Nanos)> {
        self.burst
            .as_ref()
            .map(|(ledger, budget)| (*budget, ledger.window_ns()))
    }

    /// What is left under every cap at `now`, before others' unseen use.
    fn left(&self, now: Nanos) -> Nanos {
        let main = self.budget_ns.saturating_sub(self.ledger.used(now));
        match &self.burst {
            Some((ledger, budget)) => main.min(budget.saturating_sub(ledger.used(now))),
            None => main,
        }
    }

    /// The cap in force (ns per window).
    pub fn budget_ns(&self) -> Nanos {
        self.budget_ns
    }

    /// The window length.
    pub fn window_ns(&self) -> Nanos {
        self.window_ns
    }

    /// Host CPUs the cap was sized for.
    pub fn cpus(&self) -> u32 {
        u32::try_from(self.cpus).unwrap_or(u32::MAX)
    }

    /// An upper bound on the boosted CPU time charged in `[now - window, now]`.
    pub fn used(&self, now: Nanos) -> Nanos {
        self.ledger.used(now)
    }

    /// Threads the members left boosted at their last steps.
    pub fn boosted_threads(&self) -> u64 {
        self.members.values().map(|m| m.boosted).sum()
    }

    /// Counters.
    pub fn stats(&self) -> HostBudgetStats {
        self.stats
    }

    /// Latest time by which every member with a boosted thread must step
    /// again to keep the cap; `None` while nothing is boosted.
    pub fn wake_at(&self) -> Option<Nanos> {
        self.wake_at
    }

    /// Adds a VM.
    pub fn join(&mut self, now: Nanos) -> HostMember {
        let id = HostMember(self.next_id);
        self.next_id += 1;
        self.members.insert(
            id,
            Member {
                boosted: 0,
                last_step: now,
            },
        );
        id
    }

    /// Removes a VM (its threads have been restored). Its charges stay in
    /// the window: they were real.
    pub fn leave(&mut self, member: HostMember) {
        self.members.remove(&member);
    }

    /// Whether `member` belongs to this budget.
    pub fn is_member(&self, member: HostMember) -> bool {
        self.members.contains_key(&member)
    }

    pub(crate) fn charge(&mut self, now: Nanos, cpu_ns: Nanos) {
        self.ledger.charge(now, cpu_ns);
        if let Some((ledger, _)) = &mut self.burst {
            ledger.charge(now, cpu_ns);
        }
        self.stats.boosted_cpu_ns = self.stats.boosted_cpu_ns.saturating_add(cpu_ns);
    }

    pub(crate) fn count_throttle(&mut self) {
        self.stats.throttles += 1;
    }

    /// What the other members may have used since their last steps, at worst.
    fn unseen_use(&self, except: HostMember, now: Nanos) -> Nanos {
        self.members
            .iter()
            .filter(|(id, _)| **id != except)
            .map(|(_, m)| {
                m.boosted
                    .min(self.cpus)
                    .saturating_mul(now.saturating_sub(m.last_step))
            })
            .fold(0, Nanos::saturating_add)
    }

    fn others_boosted(&self, except: HostMember) -> u64 {
        self.members
            .iter()
            .filter(|(id, _)| **id != except)
            .map(|(_, m)| m.boosted)
            .sum()
    }

    /// The CPU time `member` may let each of its `granted` threads use
    /// before it must step again, given what everyone else may be using.
    pub(crate) fn share_for(&self, member: HostMember, now: Nanos, granted: u64) -> Nanos {
        let left = self.left(now).saturating_sub(self.unseen_use(member, now));
        let rate = self
            .others_boosted(member)
            .saturating_add(granted)
            .min(self.cpus)
            .max(1);
        left / rate
    }

    /// When the cap has room again for `need` of CPU time (an estimate for
    /// re-evaluation; the bound never relies on it).
    pub(crate) fn available_at(&self, now: Nanos, need: Nanos) -> Nanos {
        let main = self.ledger.available_at(now, self.budget_ns, need);
        match &self.burst {
            Some((ledger, budget)) => main.max(ledger.available_at(now, *budget, need)),
            None => main,
        }
    }

    /// Records `member`'s step at `now`, after which it keeps `boosted`
    /// threads boosted, and recomputes when everyone must step again.
    pub(crate) fn update(&mut self, member: HostMember, now: Nanos, boosted: u64) {
        let entry = self.members.entry(member).or_default();
        entry.boosted = boosted;
        entry.last_step = now;
        let total = self.boosted_threads();
        self.wake_at = (total > 0).then(|| {
            let left = self.left(now).saturating_sub(self.unseen_use(member, now));
            now.saturating_add(left / total.min(self.cpus).max(1))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_percent_sizes_the_cap_by_cpus() {
        let cfg = PolicyConfig {
            host_budget_percent: 25,
            ..PolicyConfig::default()
        };
        let host = HostBudget::for_policy(&cfg, 4).unwrap();
        assert_eq!(host.budget_ns(), cfg.budget_window_ns * 4 / 4);
        assert!(HostBudget::new(0, 1, 1).is_err());
        assert!(HostBudget::new(1, 1, 0).is_err());
    }

    #[test]
    fn unseen_use_of_other_members_shrinks_the_share() {
        let mut host = HostBudget::new(10_000, 100_000, 8).unwrap();
        let a = host.join(0);
        let b = host.join(0);
        host.update(a, 0, 2);
        // b sees a's two threads as possibly burning since 0.
        assert_eq!(host.share_for(b, 0, 1), 10_000 / 3);
        assert_eq!(host.share_for(b, 1_000, 1), (10_000 - 2_000) / 3);
        assert_eq!(host.wake_at(), Some(5_000));
        host.leave(a);
        assert_eq!(host.share_for(b, 1_000, 1), 10_000);
    }
}
