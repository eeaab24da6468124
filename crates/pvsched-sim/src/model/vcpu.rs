//! vCPU threads: running guest code, halting, halt-polling, wakeups and
//! interrupt delivery.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Halt {
    None,
    Poll { start: Nanos, until: Nanos },
    Blocked { start: Nanos },
}

#[derive(Clone, Debug)]
pub(super) struct Vcpu {
    pub(super) vm: u32,
    pub(super) thread: u32,
    pub(super) curr: u32,
    pub(super) rt_rq: Vec<u32>,
    pub(super) fair_rq: VecDeque<u32>,
    pub(super) pending: Vec<u32>,
    pub(super) irq_rem: Nanos,
    pub(super) ovh_rem: Nanos,
    pub(super) exit_rem: Nanos,
    pub(super) next_exit: Nanos,
    pub(super) gslice: Nanos,
    pub(super) need_resched: bool,
    pub(super) halt: Halt,
    pub(super) hp_window: u32,
    pub(super) pv_wait: bool,
    pub(super) bql_wait: bool,
    pub(super) spin_rem: Nanos,
    pub(super) spun: Nanos,
    pub(super) since_ple: Nanos,
    pub(super) cs_count: u64,
    pub(super) spin_count: u32,
    pub(super) irq_count: u64,
    pub(super) extended: bool,
    pub(super) armed: u32,
    pub(super) armed_prio: u8,
    pub(super) useful: Nanos,
    /// When the thread last blocked in a halt (poll time excluded).
    pub(super) blocked_since: Nanos,
    /// The guest module's sampled critical-section signal: the last sample's depth
    /// (cleared at a guest context switch) and the non-zero samples so far.
    pub(super) cs_sample: u32,
    pub(super) cs_samples: u64,
    /// An interrupt or tick arrived while the vCPU was off a pCPU: its entry probe
    /// (and sample) runs when the vCPU next runs.
    pub(super) sample_due: bool,
    /// When an interrupt woke the blocked vCPU (`Nanos::MAX`: none pending):
    /// its wake-up latency ends when the thread gets its pCPU.
    pub(super) kicked_at: Nanos,
}

impl Sim {
    /// What the running vCPU does: accounting category, guest work until the
    /// next thing due (guest ns), or an absolute host time (poll end).
    pub(super) fn vcpu_activity(&self, v: u32) -> (Acct, Nanos, Nanos) {
        let vc = &self.vcpus[v as usize];
        if vc.ovh_rem > 0 {
            return (Acct::Overhead, vc.ovh_rem, Nanos::MAX);
        }
        if vc.exit_rem > 0 {
            return (Acct::Overhead, vc.exit_rem, Nanos::MAX);
        }
        if let Halt::Poll { until, .. } = vc.halt {
            return (Acct::Poll, Nanos::MAX, until);
        }
        if vc.irq_rem > 0 {
            return (Acct::Useful, vc.irq_rem.min(vc.next_exit), Nanos::MAX);
        }
        if vc.curr == NONE {
            return (Acct::Overhead, 0, Nanos::MAX);
        }
        let t = &self.tasks[vc.curr as usize];
        let (cat, due) = match t.phase {
            Phase::Work { rem } => {
                let mut d = rem;
                if t.rt_prio == 0 && (!vc.fair_rq.is_empty() || !vc.rt_rq.is_empty()) {
                    d = d.min(vc.gslice);
                }
                (Acct::Useful, d)
            }
            Phase::Cs { rem, .. } | Phase::MutexCs { rem, .. } => (Acct::Useful, rem),
            Phase::Spin { .. } => {
                if vc.pv_wait {
                    (Acct::Overhead, 0)
                } else {
                    (Acct::Spin, vc.spin_rem)
                }
            }
            Phase::Blocked => (Acct::Overhead, 0),
        };
        (cat, due.min(vc.next_exit), Nanos::MAX)
    }

    /// Guest progress of `work` guest ns on a running vCPU.
    #[inline]
    pub(super) fn progress(&mut self, v: u32, mut work: Nanos) {
        let vc = &mut self.vcpus[v as usize];
        if vc.ovh_rem > 0 {
            vc.ovh_rem = vc.ovh_rem.saturating_sub(work);
            return;
        }
        if vc.exit_rem > 0 {
            vc.exit_rem = vc.exit_rem.saturating_sub(work);
            return;
        }
        if matches!(vc.halt, Halt::Poll { .. }) {
            return;
        }
        if vc.next_exit != Nanos::MAX {
            vc.next_exit = vc.next_exit.saturating_sub(work);
        }
        if vc.irq_rem > 0 {
            let w = work.min(vc.irq_rem);
            vc.irq_rem -= w;
            return;
        }
        if vc.curr == NONE {
            return;
        }
        let t = &mut self.tasks[vc.curr as usize];
        match &mut t.phase {
            Phase::Work { rem } => {
                work = work.min(*rem);
                *rem -= work;
                vc.gslice = vc.gslice.saturating_sub(work);
            }
            Phase::Cs { rem, .. } | Phase::MutexCs { rem, .. } => *rem = rem.saturating_sub(work),
            Phase::Spin { .. } => {
                if !vc.pv_wait {
                    vc.spin_rem = vc.spin_rem.saturating_sub(work);
                    vc.spun += work;
                    vc.since_ple += work;
                }
            }
            Phase::Blocked => {}
        }
    }

    /// Handles whatever is due on a running vCPU, then lets the guest schedule.
    pub(super) fn vcpu_logic(&mut self, v: u32) {
        let now = self.now;
        for _ in 0..8 {
            let vc = &self.vcpus[v as usize];
            if vc.ovh_rem > 0 {
                break;
            }
            if vc.bql_wait {
                return;
            }
            if vc.exit_rem == 0 && self.bql_held_by_vcpu(v) {
                self.bql_release(self.vcpus[v as usize].vm);
                let vm = self.vcpus[v as usize].vm as usize;
                let i = self.vms[vm].bql_interval;
                self.vcpus[v as usize].next_exit = self.rng.jitter(i).max(1);
                continue;
            }
            if vc.exit_rem > 0 {
                break;
            }
            if let Halt::Poll { until, .. } = vc.halt {
                if now >= until {
                    self.poll_stop(v);
                    return;
                }
                return;
            }
            if vc.next_exit == 0 {
                self.vcpu_exit_bql(v);
                if self.vcpus[v as usize].bql_wait {
                    return;
                }
                continue;
            }
            if vc.irq_rem == 0 && !vc.pending.is_empty() {
                self.irq_done(v);
                continue;
            }
            if vc.irq_rem > 0 {
                break;
            }
            let cur = vc.curr;
            if cur != NONE {
                match self.tasks[cur as usize].phase {
                    Phase::Work { rem: 0 }
                    | Phase::Cs { rem: 0, .. }
                    | Phase::MutexCs { rem: 0, .. } => {
                        self.task_advance(cur);
                        continue;
                    }
                    Phase::Spin { .. } if !vc.pv_wait && vc.spin_rem == 0 => {
                        self.spin_check(v, cur);
                        continue;
                    }
                    _ => {}
                }
                if self.vcpus[v as usize].gslice == 0 {
                    self.vcpus[v as usize].need_resched = true;
                }
            }
            break;
        }
        self.guest_resched(v);
        self.vcpu_settle(v);
    }

    /// After guest scheduling: halt if there is nothing to run, else continue.
    pub(super) fn vcpu_settle(&mut self, v: u32) {
        let t = self.vcpus[v as usize].thread;
        if self.threads[t as usize].state != TState::Running {
            return;
        }
        let vc = &self.vcpus[v as usize];
        if vc.ovh_rem > 0
            || vc.exit_rem > 0
            || vc.irq_rem > 0
            || !vc.pending.is_empty()
            || vc.bql_wait
        {
            let c = self.threads[t as usize].cpu;
            self.reprogram(c);
            return;
        }
        if matches!(vc.halt, Halt::Poll { .. }) {
            return;
        }
        let spinning_wait = vc.curr != NONE
            && matches!(self.tasks[vc.curr as usize].phase, Phase::Spin { .. })
            && vc.pv_wait;
        if vc.curr == NONE || spinning_wait {
            if vc.curr == NONE && self.guest_newidle(v) {
                self.guest_resched(v);
                let c = self.threads[t as usize].cpu;
                self.reprogram(c);
                return;
            }
            self.halt(v);
            return;
        }
        let c = self.threads[t as usize].cpu;
        self.reprogram(c);
    }

    pub(super) fn poll_window(&self, v: u32) -> u32 {
        if self.vms[self.vcpus[v as usize].vm as usize].tcg.is_some() {
            // TCG's halted vCPU thread waits on a condition variable at once.
            return 0;
        }
        if let Some(ns) = self.pol.hp_fixed {
            return ns;
        }
        self.vcpus[v as usize].hp_window.min(self.kvm_hp.max_ns)
    }

    pub(super) fn halt(&mut self, v: u32) {
        let now = self.now;
        let t = self.vcpus[v as usize].thread;
        let c = self.threads[t as usize].cpu;
        self.account(c);
        let window = self.poll_window(v);
        if window > 0 {
            // KVM counts a poll whenever the window is open, even one that
            // ends at once because another task is runnable.
            self.kvm_stats.attempted += 1;
        }
        if window > self.pol.hp_fixed.unwrap_or(self.kvm_hp.max_ns) {
            self.limits.poll += 1;
        }
        if window > 0 && !self.has_competitor(c) {
            self.vcpus[v as usize].halt = Halt::Poll {
                start: now,
                until: now + Nanos::from(window),
            };
            self.reprogram(c);
            return;
        }
        self.vcpus[v as usize].halt = Halt::Blocked { start: now };
        self.vcpus[v as usize].blocked_since = now;
        self.block_running(t);
    }

    /// A poll ends without a wakeup (timeout or competition): block.
    pub(super) fn poll_stop(&mut self, v: u32) {
        let Halt::Poll { start, until } = self.vcpus[v as usize].halt else {
            return;
        };
        let polled = self.now - start;
        // Against the window the poll started with: KVM fixes a poll's end
        // when it starts, and the controller may lower the cap meanwhile.
        if polled > until - start {
            self.limits.poll += 1;
        }
        self.kvm_stats.fail_ns += polled;
        self.vcpus[v as usize].halt = Halt::Blocked { start };
        self.vcpus[v as usize].blocked_since = self.now;
        let t = self.vcpus[v as usize].thread;
        self.block_running(t);
    }

    pub(super) fn halt_ended(&mut self, v: u32, start: Nanos) {
        let block = self.now - start;
        if self.pol.hp_fixed.is_none() {
            let w = self.vcpus[v as usize].hp_window;
            self.vcpus[v as usize].hp_window = haltpoll::after_block(&self.kvm_hp, w, block, true);
        }
    }

    /// Something for the vCPU to do arrived: end its halt.
    pub(super) fn vcpu_kick(&mut self, v: u32) {
        match self.vcpus[v as usize].halt {
            Halt::Poll { start, .. } => {
                let t = self.vcpus[v as usize].thread;
                let c = self.threads[t as usize].cpu;
                self.account(c);
                self.halt_ended(v, start);
                self.kvm_stats.success_ns += self.now - start;
                self.kvm_stats.successful += 1;
                if self.now >= self.warmup {
                    let vm = self.vcpus[v as usize].vm as usize;
                    self.vms[vm].stats.wake_lat.record(self.poll_exit_cost);
                }
                let vc = &mut self.vcpus[v as usize];
                vc.halt = Halt::None;
                vc.ovh_rem += self.poll_exit_cost;
                self.reprogram(c);
            }
            Halt::Blocked { start } => {
                self.halt_ended(v, start);
                let vm = self.vcpus[v as usize].vm as usize;
                let since = self.vcpus[v as usize].blocked_since;
                if self.now >= self.warmup {
                    self.vms[vm].stats.halted += self.now - since.max(self.warmup);
                }
                self.kvm_stats.wait_ns += self.now - since;
                let vc = &mut self.vcpus[v as usize];
                vc.halt = Halt::None;
                vc.ovh_rem += self.wake_cost;
                vc.kicked_at = self.now;
                let t = vc.thread;
                self.host_wake(t);
            }
            Halt::None => {
                let t = self.vcpus[v as usize].thread;
                if self.threads[t as usize].state == TState::Running {
                    let c = self.threads[t as usize].cpu;
                    self.reprogram(c);
                }
            }
        }
    }

    /// Accounts the vCPU's pCPU if it runs (before changing its guest state).
    #[inline]
    pub(super) fn sync_vcpu(&mut self, v: u32) {
        let t = self.vcpus[v as usize].thread;
        if self.threads[t as usize].state == TState::Running {
            let c = self.threads[t as usize].cpu;
            self.account(c);
        }
    }

    pub(super) fn vcpu_running(&self, v: u32) -> bool {
        let t = self.vcpus[v as usize].thread;
        self.threads[t as usize].state == TState::Running
    }

    /// Whether the host would report the vCPU as preempted (runnable, not running).
    pub(super) fn vcpu_preempted(&self, v: u32) -> bool {
        let t = self.vcpus[v as usize].thread;
        self.threads[t as usize].state == TState::Runnable
            && matches!(self.vcpus[v as usize].halt, Halt::None)
    }

    /// Raises an interrupt on vCPU `v` that wakes `task` (or none: a kick).
    pub(super) fn deliver(&mut self, v: u32, task: u32, cost: Nanos) {
        self.sync_vcpu(v);
        let vc = &mut self.vcpus[v as usize];
        vc.irq_rem += cost.max(1);
        vc.irq_count += 1;
        if task != NONE {
            vc.pending.push(task);
        }
        self.cs_sample_at_interrupt(v);
        self.vcpu_kick(v);
    }

    /// The interrupt handler finished: the woken tasks join the run queue.
    pub(super) fn irq_done(&mut self, v: u32) {
        let mut pending = std::mem::take(&mut self.vcpus[v as usize].pending);
        for &task in &pending {
            self.enqueue_task(v, task);
        }
        pending.clear();
        self.vcpus[v as usize].pending = pending;
    }
}
