//! The host: pCPUs, host threads and the host scheduler (fair class, FIFO/RR,
//! RT throttling, placement, idle pulling, balancing, SMT rates).

use super::*;

/// Weight of a nice level (the kernel's `sched_prio_to_weight`).
pub(super) fn nice_weight(nice: i8) -> u32 {
    const W: [u32; 40] = [
        88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916, 9548, 7620, 6100,
        4904, 3906, 3121, 2501, 1991, 1586, 1277, 1024, 820, 655, 526, 423, 335, 272, 215, 172,
        137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15,
    ];
    W[(i32::from(nice.clamp(-20, 19)) + 20) as usize]
}

/// Host scheduling class of a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    Fair {
        weight: u32,
    },
    Rt {
        prio: u8,
        rr: bool,
    },
    /// Interrupt context: above every thread, never throttled.
    Irq,
}

impl Class {
    #[inline]
    pub(super) fn rank(self) -> u32 {
        match self {
            Class::Fair { .. } => 0,
            Class::Rt { prio, .. } => 1 + u32::from(prio),
            Class::Irq => 1000,
        }
    }
    #[inline]
    pub(super) fn is_rt(self) -> bool {
        matches!(self, Class::Rt { .. })
    }
    pub(super) fn from_sched(s: ThreadSched, base: Class) -> Class {
        match s {
            ThreadSched::Baseline => base,
            ThreadSched::Rt { class, prio } => Class::Rt {
                prio,
                rr: class == RtClass::Rr,
            },
            // Refused when the scenario is validated.
            ThreadSched::Deadline(_) => unreachable!("the simulator has no deadline class"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TState {
    Running,
    Runnable,
    Blocked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Vcpu { vcpu: u32 },
    Load { params: u32 },
    Probe { interval: Nanos },
    Emu { vm: u32 },
}

#[derive(Clone, Copy, Debug)]
pub(super) struct LoadParams {
    pub(super) burst: Nanos,
    pub(super) sleep: Nanos,
    pub(super) periodic: bool,
    pub(super) cat: Acct,
}

#[derive(Clone, Debug)]
pub(super) struct Thread {
    pub(super) role: Role,
    pub(super) class: Class,
    pub(super) base: Class,
    pub(super) state: TState,
    pub(super) cpu: u32,
    pub(super) affinity: u64,
    pub(super) vruntime: u64,
    pub(super) exec: Nanos,
    pub(super) rem: Nanos,
    pub(super) since: Nanos,
    pub(super) gen: u32,
    pub(super) expected: Nanos,
    /// `schedstat`'s run delay: time runnable but off a CPU, added when the thread
    /// is put on a CPU, leaves a run queue without running or moves to another
    /// pCPU's, as the kernel's `sched_info_arrive`/`sched_info_dequeue` do; a wait in
    /// progress is not in it.
    pub(super) run_delay: Nanos,
    /// Start of the wait not yet in `run_delay` (the kernel's `last_queued`).
    pub(super) queued: Nanos,
    /// `schedstat`'s count of times put on a CPU.
    pub(super) pcount: u64,
    /// When the thread was last put on a CPU, and its CPU time then.
    pub(super) run_start: Nanos,
    pub(super) exec_at_start: Nanos,
}

#[derive(Clone, Debug)]
pub(super) struct Cpu {
    pub(super) curr: u32,
    pub(super) rt_rq: Vec<u32>,
    pub(super) fair_rq: Vec<u32>,
    pub(super) min_vr: u64,
    pub(super) seg_start: Nanos,
    pub(super) cat: Acct,
    pub(super) rate: u64,
    pub(super) slice_end: Nanos,
    pub(super) timer_at: Nanos,
    pub(super) dirty: bool,
    pub(super) sibling: u32,
    pub(super) rt_period: u64,
    pub(super) rt_period_end: Nanos,
    pub(super) rt_used: Nanos,
    pub(super) rt_throttled: bool,
    pub(super) acct: [Nanos; N_ACCT],
    pub(super) busy_snap: Nanos,
    pub(super) load_pm: u32,
    pub(super) isolated: bool,
    /// Last scheduling event on this pCPU (the kernel's `update_curr`): the
    /// current thread's `schedstat` run time is up to date as of then.
    pub(super) update_at: Nanos,
    /// Since when the pCPU runs nothing (`NONE_AT`: it runs a thread).
    pub(super) idle_since: Nanos,
}

/// A thread's `schedstat` as `/proc` shows it at `now`: run time, run delay and times
/// put on a CPU. A running thread's run time is the one the kernel last brought up to
/// date, at the later of the pCPU's last scheduling event and the last tick
/// (multiples of `tick`); a thread off a CPU shows its exact run time.
///
/// With `live`, the run delay also holds a wait in progress (a what-if: no kernel
/// interface reports it).
pub(super) fn schedstat(
    th: &Thread,
    cpus: &[Cpu],
    now: Nanos,
    tick: Nanos,
    live: bool,
) -> (Nanos, Nanos, u64) {
    let run = if th.state == TState::Running {
        let last_tick = now - now % tick.max(1);
        let upto = last_tick
            .max(cpus[th.cpu as usize].update_at)
            .max(th.run_start)
            .min(now);
        th.exec_at_start + (upto - th.run_start)
    } else {
        th.exec
    };
    let waiting = if live && th.state == TState::Runnable {
        now - th.queued
    } else {
        0
    };
    (run, th.run_delay + waiting, th.pcount)
}

impl Sim {
    /// Charges the time since the last change on pCPU `c`.
    #[inline]
    pub(super) fn account(&mut self, c: u32) {
        let now = self.now;
        let cpu = &mut self.cpus[c as usize];
        let delta = now - cpu.seg_start;
        if delta == 0 {
            return;
        }
        cpu.seg_start = now;
        cpu.acct[cpu.cat as usize] += delta;
        let t = cpu.curr;
        if t == NONE {
            return;
        }
        let rate = cpu.rate;
        let cat = cpu.cat;
        let th = &mut self.threads[t as usize];
        th.exec += delta;
        match th.class {
            Class::Fair { weight } => {
                th.vruntime += if weight == 1024 {
                    delta
                } else {
                    delta * 1024 / u64::from(weight)
                };
            }
            Class::Rt { .. } if self.rt_runtime > 0 => {
                let idx = now / self.rt_period;
                let cpu = &mut self.cpus[c as usize];
                if idx != cpu.rt_period {
                    cpu.rt_period = idx;
                    cpu.rt_used = 0;
                    cpu.rt_throttled = false;
                }
                let in_period = (now - idx * self.rt_period).min(delta);
                cpu.rt_used += in_period;
                if cpu.rt_used > self.rt_runtime {
                    self.limits.rt_runtime += 1;
                }
            }
            _ => {}
        }
        let work = if rate == FULL {
            delta
        } else {
            delta * rate / FULL
        };
        match th.role {
            Role::Vcpu { vcpu } => {
                let vm = self.vcpus[vcpu as usize].vm as usize;
                self.vms[vm].stats.acct[cat as usize] += delta;
                if cat == Acct::Useful {
                    self.vcpus[vcpu as usize].useful += delta;
                }
                self.progress(vcpu, work);
            }
            _ => th.rem = th.rem.saturating_sub(work),
        }
    }

    #[inline]
    pub(super) fn check_rt_period(&mut self, c: u32) {
        if self.rt_runtime == 0 {
            return;
        }
        if self.now < self.cpus[c as usize].rt_period_end {
            return;
        }
        let idx = self.now / self.rt_period;
        let cpu = &mut self.cpus[c as usize];
        cpu.rt_period_end = (idx + 1) * self.rt_period;
        if idx != cpu.rt_period {
            cpu.rt_period = idx;
            cpu.rt_used = 0;
            cpu.rt_throttled = false;
        }
    }

    pub(super) fn best_in_rq(&self, c: u32) -> Option<(bool, usize, u32)> {
        let cpu = &self.cpus[c as usize];
        let mut best: Option<(usize, u32)> = None;
        for (i, &t) in cpu.rt_rq.iter().enumerate() {
            let cl = self.threads[t as usize].class;
            if cpu.rt_throttled && cl.is_rt() {
                continue;
            }
            let r = cl.rank();
            if best.is_none_or(|(_, br)| r > br) {
                best = Some((i, r));
            }
        }
        if let Some((i, _)) = best {
            return Some((true, i, cpu.rt_rq[i]));
        }
        let mut bf: Option<(usize, u64)> = None;
        for (i, &t) in cpu.fair_rq.iter().enumerate() {
            let vr = self.threads[t as usize].vruntime;
            if bf.is_none_or(|(_, b)| vr < b) {
                bf = Some((i, vr));
            }
        }
        bf.map(|(i, _)| (false, i, cpu.fair_rq[i]))
    }

    pub(super) fn fair_slice(&self, c: u32, t: u32) -> Nanos {
        let cpu = &self.cpus[c as usize];
        let Class::Fair { weight } = self.threads[t as usize].class else {
            return Nanos::MAX;
        };
        let mut total = u64::from(weight);
        for &o in &cpu.fair_rq {
            if let Class::Fair { weight } = self.threads[o as usize].class {
                total += u64::from(weight);
            }
        }
        let nr = cpu.fair_rq.len() as u64 + 1;
        let period = self.lat_ns.max(nr * self.min_gran);
        (period * u64::from(weight) / total).max(self.min_gran)
    }

    pub(super) fn has_competitor(&self, c: u32) -> bool {
        let cpu = &self.cpus[c as usize];
        !cpu.fair_rq.is_empty() || !cpu.rt_rq.is_empty()
    }

    /// Keeps bit `c` of the idle mask current.
    #[inline]
    pub(super) fn update_idle(&mut self, c: u32) {
        let cpu = &self.cpus[c as usize];
        if cpu.curr == NONE && cpu.fair_rq.is_empty() && cpu.rt_rq.is_empty() {
            self.idle_mask |= 1 << c;
        } else {
            self.idle_mask &= !(1 << c);
        }
    }

    pub(super) fn enqueue(&mut self, c: u32, t: u32) {
        self.idle_mask &= !(1u64 << c);
        let th = &mut self.threads[t as usize];
        th.cpu = c;
        th.state = TState::Runnable;
        let cpu = &mut self.cpus[c as usize];
        match th.class {
            Class::Fair { .. } => cpu.fair_rq.push(t),
            _ => cpu.rt_rq.push(t),
        }
        self.waiting += 1;
    }

    pub(super) fn dequeue(&mut self, c: u32, t: u32) {
        let cpu = &mut self.cpus[c as usize];
        if let Some(i) = cpu.fair_rq.iter().position(|&x| x == t) {
            cpu.fair_rq.swap_remove(i);
            self.waiting -= 1;
        } else if let Some(i) = cpu.rt_rq.iter().position(|&x| x == t) {
            cpu.rt_rq.remove(i);
            self.waiting -= 1;
        }
        self.update_idle(c);
    }

    pub(super) fn update_min_vr(&mut self, c: u32) {
        let cpu = &self.cpus[c as usize];
        let mut m = u64::MAX;
        if cpu.curr != NONE {
            if let Class::Fair { .. } = self.threads[cpu.curr as usize].class {
                m = self.threads[cpu.curr as usize].vruntime;
            }
        }
        for &t in &cpu.fair_rq {
            m = m.min(self.threads[t as usize].vruntime);
        }
        if m != u64::MAX {
            let cpu = &mut self.cpus[c as usize];
            cpu.min_vr = cpu.min_vr.max(m);
        }
    }

    /// Decides who runs on `c` now. `woken` may preempt by wakeup granularity.
    pub(super) fn resched(&mut self, c: u32, woken: Option<u32>) {
        self.account(c);
        self.check_rt_period(c);
        let now = self.now;
        self.cpus[c as usize].update_at = now;
        let curr = self.cpus[c as usize].curr;
        let best = self.best_in_rq(c);
        let mut switch = false;
        if curr == NONE {
            switch = best.is_some();
        } else {
            let cc = self.threads[curr as usize].class;
            let throttled = self.cpus[c as usize].rt_throttled && cc.is_rt();
            if throttled {
                switch = true;
            } else if let Some((_, _, b)) = best {
                let bc = self.threads[b as usize].class;
                if bc.rank() > cc.rank() {
                    switch = true;
                } else if bc.rank() == cc.rank() {
                    let expired = now >= self.cpus[c as usize].slice_end;
                    match cc {
                        Class::Fair { .. } => {
                            if expired {
                                switch = !self.extend_slice(c, curr);
                            } else if woken == Some(b) {
                                let vc = self.threads[curr as usize].vruntime;
                                let vb = self.threads[b as usize].vruntime;
                                switch = vc > vb.saturating_add(self.wake_gran);
                            }
                        }
                        Class::Rt { rr: true, .. } => switch = expired,
                        _ => {}
                    }
                }
            }
        }
        let was_busy = curr != NONE;
        if !switch && curr != NONE && now >= self.cpus[c as usize].slice_end {
            // Nothing of equal rank waits: the slice is renewed.
            let s = match self.threads[curr as usize].class {
                Class::Fair { .. } => self.fair_slice(c, curr),
                Class::Rt { rr: true, .. } => self.rr_slice,
                _ => Nanos::MAX,
            };
            self.cpus[c as usize].slice_end = now.saturating_add(s);
        }
        if switch {
            let polling = match self.threads[curr.min(self.threads.len() as u32 - 1) as usize].role
            {
                Role::Vcpu { vcpu } if curr != NONE => match self.vcpus[vcpu as usize].halt {
                    Halt::Poll { start, .. } => Some((vcpu, start)),
                    _ => None,
                },
                _ => None,
            };
            if let Some((vcpu, start)) = polling {
                // KVM's poll loop sees need_resched: the vCPU blocks in its halt.
                self.kvm_stats.fail_ns += now - start;
                self.vcpus[vcpu as usize].halt = Halt::Blocked { start };
                self.vcpus[vcpu as usize].blocked_since = now;
                self.threads[curr as usize].state = TState::Blocked;
                self.cpus[c as usize].curr = NONE;
            } else if curr != NONE {
                // Put the current thread back (it stays runnable; RR goes to the tail).
                if let Role::Vcpu { .. } = self.threads[curr as usize].role {
                    // KVM's `preemption_reported`: scheduled out while runnable.
                    self.kvm_stats.preemptions += 1;
                }
                let th = &mut self.threads[curr as usize];
                th.state = TState::Runnable;
                th.since = now;
                th.queued = now;
                self.cpus[c as usize].curr = NONE;
                self.enqueue(c, curr);
            }
            self.update_min_vr(c);
            if let Some((is_rt, i, t)) = self.best_in_rq(c) {
                let cpu = &mut self.cpus[c as usize];
                if is_rt {
                    cpu.rt_rq.remove(i);
                } else {
                    cpu.fair_rq.swap_remove(i);
                }
                self.waiting -= 1;
                self.run_thread(c, t);
            }
        }
        if self.cpus[c as usize].curr == NONE {
            self.idle_pull(c);
        }
        if self.cpus[c as usize].curr == NONE && self.cpus[c as usize].idle_since == NONE_AT {
            self.cpus[c as usize].idle_since = now;
        } else if switch && !self.cpus[c as usize].rt_rq.is_empty() {
            self.rt_push(c);
        }
        let busy = self.cpus[c as usize].curr != NONE;
        if busy != was_busy {
            self.smt_changed(c);
        }
        self.update_idle(c);
        // A competitor appeared while the current thread had an unbounded slice.
        let curr = self.cpus[c as usize].curr;
        if curr != NONE && self.cpus[c as usize].slice_end == Nanos::MAX && self.has_competitor(c) {
            let s = match self.threads[curr as usize].class {
                Class::Fair { .. } => self.fair_slice(c, curr),
                Class::Rt { rr: true, .. } => self.rr_slice,
                _ => Nanos::MAX,
            };
            self.cpus[c as usize].slice_end = now.saturating_add(s);
        }
        self.reprogram(c);
    }

    /// Kunpeng-V: a vCPU in a critical section gets one extra slice per episode.
    pub(super) fn extend_slice(&mut self, c: u32, t: u32) -> bool {
        if self.pol.cs_extra == 0 {
            return false;
        }
        let Role::Vcpu { vcpu } = self.threads[t as usize].role else {
            return false;
        };
        if self.cs_depth(vcpu) == 0 || self.vcpus[vcpu as usize].extended {
            return false;
        }
        self.vcpus[vcpu as usize].extended = true;
        self.cpus[c as usize].slice_end = self.now + self.pol.cs_extra;
        true
    }

    pub(super) fn run_thread(&mut self, c: u32, t: u32) {
        let now = self.now;
        let slice = if self.has_competitor(c) {
            match self.threads[t as usize].class {
                Class::Fair { .. } => now.saturating_add(self.fair_slice(c, t)),
                Class::Rt { rr: true, .. } => now + self.rr_slice,
                _ => Nanos::MAX,
            }
        } else {
            Nanos::MAX
        };
        // Leaving a long idle costs time before the thread runs.
        let idle_since = std::mem::replace(&mut self.cpus[c as usize].idle_since, NONE_AT);
        let idle_exit = if self.idle_exit > 0
            && idle_since != NONE_AT
            && now.saturating_sub(idle_since) > self.idle_poll
        {
            self.idle_exit
        } else {
            0
        };
        let th = &mut self.threads[t as usize];
        if idle_exit > 0 && !matches!(th.role, Role::Vcpu { .. }) {
            th.rem = th.rem.saturating_add(idle_exit);
        }
        th.state = TState::Running;
        th.cpu = c;
        // schedstat: the wait ends here (sched_info_arrive).
        th.run_delay += now - th.queued;
        th.pcount += 1;
        th.run_start = now;
        th.exec_at_start = th.exec;
        let role = th.role;
        let cpu = &mut self.cpus[c as usize];
        cpu.curr = t;
        cpu.slice_end = slice;
        self.idle_mask &= !(1u64 << c);
        match role {
            Role::Vcpu { vcpu } => {
                self.vcpus[vcpu as usize].ovh_rem += idle_exit;
                let vm = self.vcpus[vcpu as usize].vm as usize;
                if now >= self.warmup {
                    let since = self.threads[t as usize].since.max(self.warmup);
                    self.vms[vm].stats.steal += now - since;
                }
                self.vcpus[vcpu as usize].extended = false;
                let kicked = std::mem::replace(&mut self.vcpus[vcpu as usize].kicked_at, NONE_AT);
                if kicked != NONE_AT && kicked >= self.warmup {
                    // Host wake-up and the wait for the pCPU, then the
                    // wake-up cost (VM entry, idle exit) before guest code.
                    self.vms[vm]
                        .stats
                        .wake_lat
                        .record(now - kicked + self.wake_cost);
                }
                if self.vcpus[vcpu as usize].sample_due {
                    self.take_cs_sample(vcpu);
                }
            }
            Role::Probe { .. } => {
                let exp = self.threads[t as usize].expected;
                if exp >= self.warmup {
                    self.host_lat.record(now.saturating_sub(exp) + idle_exit);
                }
            }
            _ => {}
        }
    }

    pub(super) fn smt_changed(&mut self, c: u32) {
        let s = self.cpus[c as usize].sibling;
        if s == NONE {
            return;
        }
        let busy = self.cpus[c as usize].curr != NONE;
        let rate = if busy { self.smt_rate } else { FULL };
        if self.cpus[s as usize].rate != rate {
            self.account(s);
            self.cpus[s as usize].rate = rate;
            self.reprogram(s);
        }
        // Our own rate depends on the sibling.
        let sb = self.cpus[s as usize].curr != NONE;
        let own = if sb { self.smt_rate } else { FULL };
        if self.cpus[c as usize].rate != own {
            self.account(c);
            self.cpus[c as usize].rate = own;
        }
    }

    /// An idle pCPU pulls a waiting thread from the busiest pCPU that allows it.
    pub(super) fn idle_pull(&mut self, c: u32) {
        if self.waiting == 0 || self.cpus[c as usize].isolated {
            return;
        }
        let bit = 1u64 << c;
        let mut best: Option<(u32, usize, u32, bool)> = None;
        for (o, cpu) in self.cpus.iter().enumerate() {
            if o as u32 == c {
                continue;
            }
            let n = cpu.fair_rq.len() + cpu.rt_rq.len();
            if n == 0 || best.is_some_and(|(_, bn, _, _)| n <= bn) {
                continue;
            }
            if let Some(&t) = cpu
                .rt_rq
                .iter()
                .find(|&&t| self.threads[t as usize].affinity & bit != 0)
            {
                best = Some((o as u32, n, t, true));
                continue;
            }
            if let Some(&t) = cpu
                .fair_rq
                .iter()
                .find(|&&t| self.threads[t as usize].affinity & bit != 0)
            {
                best = Some((o as u32, n, t, false));
            }
        }
        let Some((o, _, t, _)) = best else {
            return;
        };
        self.migrate_waiting(o, c, t);
        self.run_thread_from_rq(c, t);
    }

    /// Pushes one waiting RT thread to a pCPU running something of lower rank.
    pub(super) fn rt_push(&mut self, c: u32) {
        let n = self.cpus.len() as u32;
        let cand = self.cpus[c as usize]
            .rt_rq
            .iter()
            .copied()
            .filter(|&t| {
                let th = &self.threads[t as usize];
                th.class.is_rt() && th.affinity.count_ones() > 1
            })
            .max_by_key(|&t| self.threads[t as usize].class.rank());
        let Some(t) = cand else {
            return;
        };
        let rank = self.threads[t as usize].class.rank();
        let mask = self.threads[t as usize].affinity;
        let mut best: Option<(u32, u32)> = None;
        for o in 0..n {
            if o == c || mask & (1 << o) == 0 {
                continue;
            }
            let cpu = &self.cpus[o as usize];
            if cpu.rt_throttled {
                continue;
            }
            let cr = if cpu.curr == NONE {
                0
            } else {
                self.threads[cpu.curr as usize].class.rank()
            };
            let queued = cpu
                .rt_rq
                .iter()
                .any(|&x| self.threads[x as usize].class.rank() >= rank);
            if cr < rank && !queued && best.is_none_or(|(br, _)| cr < br) {
                best = Some((cr, o));
            }
        }
        if let Some((_, o)) = best {
            self.migrate_waiting(c, o, t);
            self.resched(o, Some(t));
        }
    }

    pub(super) fn migrate_waiting(&mut self, from: u32, to: u32, t: u32) {
        self.dequeue(from, t);
        // schedstat: leaving a run queue ends a wait, joining another starts one.
        let th = &mut self.threads[t as usize];
        th.run_delay += self.now - th.queued;
        th.queued = self.now;
        if let Class::Fair { .. } = self.threads[t as usize].class {
            let f = self.cpus[from as usize].min_vr;
            let d = self.cpus[to as usize].min_vr;
            let th = &mut self.threads[t as usize];
            th.vruntime = th.vruntime.saturating_sub(f).saturating_add(d);
        }
        self.enqueue(to, t);
        // The source may now have an unneeded slice end; harmless.
    }

    pub(super) fn run_thread_from_rq(&mut self, c: u32, t: u32) {
        self.dequeue(c, t);
        self.run_thread(c, t);
    }

    /// Marks pCPU `c` for [`Sim::program`] at the end of the current event:
    /// its accounting category and timer depend only on the final state, and
    /// no simulated time passes before the event ends.
    #[inline]
    pub(super) fn reprogram(&mut self, c: u32) {
        let cpu = &mut self.cpus[c as usize];
        if !cpu.dirty {
            cpu.dirty = true;
            self.dirty.push(c);
        }
    }

    /// Sets pCPU `c`'s accounting category and its next timer.
    pub(super) fn program(&mut self, c: u32) {
        let now = self.now;
        let cpu = &self.cpus[c as usize];
        let mut at = Nanos::MAX;
        let curr = cpu.curr;
        let mut cat = Acct::Idle;
        if curr != NONE {
            if cpu.slice_end != Nanos::MAX && self.has_competitor(c) {
                at = cpu.slice_end.max(now);
            }
            let rate = cpu.rate;
            let th = &self.threads[curr as usize];
            match th.role {
                Role::Vcpu { vcpu } => {
                    let (k, due, until) = self.vcpu_activity(vcpu);
                    cat = k;
                    if until != Nanos::MAX {
                        at = at.min(until.max(now));
                    } else if due != Nanos::MAX {
                        at = at.min(now + scale(due, rate));
                    }
                }
                Role::Load { params } => {
                    cat = self.loads[params as usize].cat;
                    at = at.min(now + scale(th.rem, rate));
                }
                Role::Probe { .. } => {
                    cat = Acct::Host;
                    at = at.min(now + scale(th.rem, rate));
                }
                Role::Emu { .. } => {
                    cat = Acct::Emu;
                    at = at.min(now + scale(th.rem, rate));
                }
            }
            if th.class.is_rt() && self.rt_runtime > 0 {
                let left = self.rt_runtime.saturating_sub(cpu.rt_used);
                let period_end = (now / self.rt_period + 1) * self.rt_period;
                at = at.min((now + left).min(period_end));
            }
        }
        if cpu.rt_throttled {
            at = at.min((now / self.rt_period + 1) * self.rt_period);
        }
        let cpu = &mut self.cpus[c as usize];
        cpu.cat = cat;
        if at != cpu.timer_at {
            cpu.timer_at = at;
            self.q.set_cpu_timer(c, at);
        }
    }

    pub(super) fn cpu_due(&mut self, c: u32) {
        self.account(c);
        self.check_rt_period(c);
        let curr = self.cpus[c as usize].curr;
        if curr != NONE {
            let th = &self.threads[curr as usize];
            if th.class.is_rt()
                && self.rt_runtime > 0
                && self.cpus[c as usize].rt_used >= self.rt_runtime
            {
                self.cpus[c as usize].rt_throttled = true;
            }
            match th.role {
                Role::Vcpu { vcpu } => self.vcpu_logic(vcpu),
                _ => {
                    if th.rem == 0 {
                        self.burst_done(curr);
                    }
                }
            }
            // Fast path: the same thread keeps the pCPU, its slice and RT
            // budget have not run out; anything that could preempt it
            // (a wakeup, a class change) reschedules on its own.
            let cpu = &self.cpus[c as usize];
            if cpu.curr == curr && self.now < cpu.slice_end && !cpu.rt_throttled {
                self.reprogram(c);
                return;
            }
        }
        self.resched(c, None);
    }

    /// Host thread `t` becomes runnable.
    pub(super) fn host_wake(&mut self, t: u32) {
        if self.threads[t as usize].state != TState::Blocked {
            return;
        }
        let now = self.now;
        let c = self.select_cpu(t);
        let prev = self.threads[t as usize].cpu;
        if let Class::Fair { .. } = self.threads[t as usize].class {
            let pmin = self.cpus[prev as usize].min_vr;
            let cmin = self.cpus[c as usize].min_vr;
            let th = &mut self.threads[t as usize];
            if prev != c {
                th.vruntime = th.vruntime.saturating_sub(pmin).saturating_add(cmin);
            }
            th.vruntime = th.vruntime.max(cmin.saturating_sub(self.sleeper_credit));
        }
        self.threads[t as usize].since = now;
        self.threads[t as usize].queued = now;
        self.enqueue(c, t);
        // KVM stops halt-polling when another task becomes runnable.
        let curr = self.cpus[c as usize].curr;
        if curr != NONE {
            if let Role::Vcpu { vcpu } = self.threads[curr as usize].role {
                if matches!(self.vcpus[vcpu as usize].halt, Halt::Poll { .. }) {
                    self.account(c);
                    self.poll_stop(vcpu);
                }
            }
        }
        self.resched(c, Some(t));
    }

    pub(super) fn select_cpu(&self, t: u32) -> u32 {
        let th = &self.threads[t as usize];
        let mask = th.affinity;
        let prev = th.cpu;
        if mask.count_ones() == 1 {
            return mask.trailing_zeros();
        }
        let idle = |c: u32| {
            let cpu = &self.cpus[c as usize];
            cpu.curr == NONE && cpu.fair_rq.is_empty() && cpu.rt_rq.is_empty()
        };
        let n = self.cpus.len() as u32;
        if self.pol.smt_aware {
            for i in 0..n {
                let c = (prev + i) % n;
                let s = self.cpus[c as usize].sibling;
                if mask & (1 << c) != 0 && idle(c) && (s == NONE || idle(s)) {
                    return c;
                }
            }
        }
        let idle_ok = mask & self.idle_mask;
        if idle_ok & (1 << prev) != 0 {
            return prev;
        }
        if idle_ok != 0 {
            // The first idle pCPU at or after `prev`, wrapping.
            let rot = idle_ok.rotate_right(prev);
            return (prev + rot.trailing_zeros()) % 64;
        }
        if th.class.is_rt() {
            // cpupri: an idle pCPU, else the one running the lowest class.
            let rank = th.class.rank();
            let mut best: Option<(u32, u32)> = None;
            for i in 0..n {
                let c = (prev + i) % n;
                if mask & (1 << c) == 0 {
                    continue;
                }
                if idle(c) {
                    return c;
                }
                let cpu = &self.cpus[c as usize];
                let queued_rt = cpu
                    .rt_rq
                    .iter()
                    .any(|&o| self.threads[o as usize].class.rank() >= rank);
                let cr = if cpu.curr == NONE {
                    0
                } else {
                    self.threads[cpu.curr as usize].class.rank()
                };
                if cr < rank && !queued_rt && best.is_none_or(|(br, _)| cr < br) {
                    best = Some((cr, c));
                }
            }
            if let Some((_, c)) = best {
                return c;
            }
        }
        // No idle pCPU: stay on the previous one (wake-affine); the periodic
        // balancer moves waiting threads between busy pCPUs.
        if mask & (1 << prev) != 0 {
            return prev;
        }
        mask.trailing_zeros()
    }

    /// Thread `t` blocks (it runs, or it was preempted a moment ago).
    pub(super) fn block_running(&mut self, t: u32) {
        let c = self.threads[t as usize].cpu;
        if self.cpus[c as usize].curr != t {
            if self.threads[t as usize].state == TState::Runnable {
                self.dequeue(c, t);
                // schedstat: a wait that ends off a CPU counts too (sched_info_dequeue).
                let th = &mut self.threads[t as usize];
                th.run_delay += self.now - th.queued;
                th.state = TState::Blocked;
            }
            return;
        }
        self.account(c);
        self.threads[t as usize].state = TState::Blocked;
        self.cpus[c as usize].curr = NONE;
        self.resched(c, None);
    }

    pub(super) fn set_class(&mut self, t: u32, class: Class) {
        let th = &self.threads[t as usize];
        if th.class == class {
            return;
        }
        let c = th.cpu;
        match th.state {
            TState::Running => {
                self.account(c);
                let min_vr = self.cpus[c as usize].min_vr;
                let th = &mut self.threads[t as usize];
                th.class = class;
                if let Class::Fair { .. } = class {
                    th.vruntime = th.vruntime.max(min_vr);
                }
                self.cpus[c as usize].slice_end = Nanos::MAX;
                self.resched(c, None);
            }
            TState::Runnable => {
                self.dequeue(c, t);
                let min_vr = self.cpus[c as usize].min_vr;
                let th = &mut self.threads[t as usize];
                th.class = class;
                if let Class::Fair { .. } = class {
                    th.vruntime = th.vruntime.max(min_vr.saturating_sub(self.sleeper_credit));
                }
                self.enqueue(c, t);
                self.resched(c, Some(t));
            }
            TState::Blocked => self.threads[t as usize].class = class,
        }
    }

    pub(super) fn thread_timer(&mut self, t: u32) {
        match self.threads[t as usize].role {
            Role::Load { params } => {
                let p = self.loads[params as usize];
                self.threads[t as usize].rem = if p.periodic {
                    p.burst
                } else {
                    self.rng.exp(p.burst)
                };
                self.host_wake(t);
            }
            Role::Probe { .. } => {
                self.threads[t as usize].rem = 2_000;
                self.host_wake(t);
            }
            _ => {}
        }
    }

    pub(super) fn burst_done(&mut self, t: u32) {
        match self.threads[t as usize].role {
            Role::Load { params } => {
                let p = self.loads[params as usize];
                if p.sleep == 0 {
                    self.threads[t as usize].rem = self.rng.exp(p.burst);
                    return;
                }
                let gap = if p.periodic {
                    p.sleep.saturating_sub(p.burst).max(1)
                } else {
                    self.rng.exp(p.sleep)
                };
                self.block_running(t);
                self.arm_thread(t, self.now + gap);
            }
            Role::Probe { interval } => {
                let th = &mut self.threads[t as usize];
                let mut next = th.expected + interval;
                while next <= self.now {
                    next += interval;
                }
                th.expected = next;
                self.block_running(t);
                self.arm_thread(t, next);
            }
            Role::Emu { vm } => self.emu_item_done(vm, t),
            Role::Vcpu { .. } => {}
        }
    }

    pub(super) fn housekeeping(&mut self) {
        self.q.push(self.now + HOUSEKEEPING_NS, Ev::Housekeeping);
        if self.needs_load {
            for c in 0..self.cpus.len() as u32 {
                self.account(c);
                let cpu = &mut self.cpus[c as usize];
                let busy: Nanos = cpu.acct.iter().sum::<Nanos>()
                    - cpu.acct[Acct::Idle as usize]
                    - cpu.acct[Acct::Poll as usize];
                let d = busy - cpu.busy_snap;
                cpu.busy_snap = busy;
                cpu.load_pm = (d * 1000 / HOUSEKEEPING_NS).min(1000) as u32;
            }
        }
        // Periodic balancing of waiting fair threads.
        let n = self.cpus.len();
        for _ in 0..n.div_ceil(4) {
            let load =
                |cpu: &Cpu| cpu.fair_rq.len() + cpu.rt_rq.len() + usize::from(cpu.curr != NONE);
            let mut hi = (0usize, 0u32);
            let mut lo = (usize::MAX, 0u32);
            for (i, cpu) in self.cpus.iter().enumerate() {
                let l = load(cpu);
                if l > hi.0 && !cpu.fair_rq.is_empty() {
                    hi = (l, i as u32);
                }
                if l < lo.0 && !cpu.isolated {
                    lo = (l, i as u32);
                }
            }
            if lo.0 == usize::MAX || hi.0 < lo.0 + 2 {
                break;
            }
            let bit = 1u64 << lo.1;
            let Some(&t) = self.cpus[hi.1 as usize]
                .fair_rq
                .iter()
                .find(|&&t| self.threads[t as usize].affinity & bit != 0)
            else {
                break;
            };
            self.migrate_waiting(hi.1, lo.1, t);
            self.resched(lo.1, Some(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostConfig, NoiseSpec, TaskSpec};

    /// One pCPU, one vCPU running a CPU-bound task forever, and a periodic
    /// interrupt-context source that takes the pCPU for 300 us of every 1000 us.
    fn preempted_every_ms() -> Sim {
        let sc = Scenario {
            duration_ms: 40,
            warmup_ms: 0,
            host: HostConfig {
                pcpus: 1,
                sched_tick_us: 1000,
                noise: NoiseSpec {
                    tick_period_us: 1000,
                    tick_ns: 300_000,
                    ..NoiseSpec::default()
                },
                ..HostConfig::default()
            },
            ..Scenario::default()
        };
        let vm = VmConfig {
            vcpus: 1,
            tasks: vec![TaskSpec {
                kind: TaskKind::Cpu { chunk_us: 1000 },
                ..TaskSpec::default()
            }],
            ..VmConfig::default()
        };
        Sim::new(&sc, &[vm], &PolicySpec::default(), 1, 0).expect("scenario")
    }

    #[test]
    fn schedstat_run_delay_counts_a_wait_when_it_ends_and_run_time_lags_by_a_tick() {
        let mut sim = preempted_every_ms();
        let t = sim.vcpus[0].thread as usize;
        let (mut waits, mut arrivals, mut was_running) = (0u32, 0u64, None);
        let (mut delay_seen, mut max_lag) = (0, 0);
        for step in 1..=4000u64 {
            sim.advance_to(step * 10_000);
            let th = &sim.threads[t];
            let (run, wait, pcount) = schedstat(th, &sim.cpus, sim.now, sim.stat_tick, false);
            let exact = run_ns(th, &sim.cpus, sim.now);
            let running = th.state == TState::Running;
            match th.state {
                TState::Running => {
                    // Every wait so far is in the run delay: run time and run delay
                    // make up the whole time (the thread never blocks).
                    assert_eq!(exact + th.run_delay, sim.now, "t={}", sim.now);
                    assert!(run <= exact && exact - run < sim.stat_tick, "t={}", sim.now);
                    max_lag = max_lag.max(exact - run);
                }
                TState::Runnable => {
                    // The wait in progress is not in it yet, and the run time is exact.
                    assert_eq!(
                        wait, delay_seen,
                        "t={}: run delay moved during a wait",
                        sim.now
                    );
                    assert_eq!(exact + wait + (sim.now - th.queued), sim.now);
                    assert_eq!(run, exact);
                }
                TState::Blocked => panic!("a CPU-bound vCPU never blocks"),
            }
            if was_running == Some(false) && running {
                waits += 1;
                assert!(
                    wait > delay_seen,
                    "t={}: the wait that ended is counted",
                    sim.now
                );
            }
            if was_running != Some(running) && running {
                arrivals += 1;
            }
            assert_eq!(pcount, arrivals, "t={}: times put on a CPU", sim.now);
            delay_seen = wait;
            was_running = Some(running);
        }
        // 40 ms preempted 300 us of every 1000 us: about 40 waits of 300 us.
        assert!(waits >= 30, "{waits} waits seen");
        let delay = sim.threads[t].run_delay as f64;
        assert!((delay / 40e6 - 0.3).abs() < 0.03, "run delay {delay} ns");
        assert!(max_lag > 0, "a running thread's run time never lagged");
    }
}
