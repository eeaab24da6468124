//! Guest locks: queued spinlocks (spinning, PV halt and kick, pause-loop
//! exits and directed yield), critical-section counts.

use super::*;

#[derive(Clone, Debug, Default)]
pub(super) struct Lock {
    pub(super) holder: u32,
    pub(super) waiters: VecDeque<u32>,
}

/// The preempt-disable depth of a vCPU's task context (see [`Sim::preempt_depth`]).
pub(super) fn task_preempt_depth(vc: &Vcpu, tasks: &[Task]) -> u32 {
    if vc.curr == NONE {
        return 0;
    }
    u32::from(matches!(
        tasks[vc.curr as usize].phase,
        Phase::Cs { .. } | Phase::Spin { .. }
    ))
}

/// `HARDIRQ_OFFSET` of a Linux preempt count.
const HARDIRQ_OFFSET: u32 = 1 << 16;

/// The preempt count a host reads from a vCPU's guest RAM (need-resched bit
/// masked): the task context's depth, 1 for the idle task (which runs its loop with
/// preemption disabled, as a real kernel does; its guest line shows it idle), and
/// `HARDIRQ_OFFSET` on top while an interrupt handler runs.
pub(super) fn preempt_count(vc: &Vcpu, tasks: &[Task]) -> u32 {
    let task = if vc.curr == NONE {
        1
    } else {
        task_preempt_depth(vc, tasks)
    };
    task + if vc.irq_rem > 0 { HARDIRQ_OFFSET } else { 0 }
}

impl Sim {
    /// Critical-section entries counted on vCPU `v`.
    pub(super) fn cs_enter(&mut self, v: u32) {
        let vc = &mut self.vcpus[v as usize];
        vc.cs_count = vc.cs_count.wrapping_add(1);
    }

    /// Critical-section depth of the vCPU: its current task's.
    pub(super) fn cs_depth(&self, v: u32) -> u32 {
        let c = self.vcpus[v as usize].curr;
        if c == NONE {
            return 0;
        }
        u32::from(matches!(
            self.tasks[c as usize].phase,
            Phase::Cs { .. } | Phase::MutexCs { .. }
        ))
    }

    /// The preempt-disable depth of vCPU `v`'s task context, as the guest module's
    /// interrupt-entry probe counts it: 1 while its task holds a spinlock or waits
    /// for one (spinning or halted in `pv_wait`, both with preemption disabled), 0
    /// otherwise. A mutex holder is preemptible; the idle task's own level is not
    /// counted.
    pub(super) fn preempt_depth(&self, v: u32) -> u32 {
        task_preempt_depth(&self.vcpus[v as usize], &self.tasks)
    }

    /// An interrupt arrives on vCPU `v`: with the sampled signal, its entry probe
    /// samples the interrupted context now if the vCPU runs, else when it next runs
    /// (its guest state is frozen meanwhile, and only the vCPU writes its line).
    pub(super) fn cs_sample_at_interrupt(&mut self, v: u32) {
        if !self.pol.cs_sampled {
            return;
        }
        if self.vcpu_running(v) {
            self.take_cs_sample(v);
        } else {
            self.vcpus[v as usize].sample_due = true;
        }
    }

    /// The entry probe's sample: the depth until the next sample or context switch,
    /// and one more in the count when it is non-zero.
    pub(super) fn take_cs_sample(&mut self, v: u32) {
        let depth = self.preempt_depth(v);
        let vc = &mut self.vcpus[v as usize];
        vc.sample_due = false;
        vc.cs_sample = depth;
        if depth > 0 {
            vc.cs_samples = vc.cs_samples.wrapping_add(1);
        }
    }

    /// The guest timer tick of VM `vm`: every vCPU with a task (idle vCPUs have no
    /// tick) takes a timer interrupt, whose entry samples the interrupted context;
    /// a preempted vCPU takes it when it runs again. The tick's cost is not modelled.
    pub(super) fn guest_tick(&mut self, vm: u32) {
        let tick = self.vms[vm as usize].guest_tick;
        self.q.push(self.now + tick, Ev::GuestTick { vm });
        let first = self.vms[vm as usize].first_vcpu;
        for v in first..first + self.vms[vm as usize].nvcpus {
            let vc = &self.vcpus[v as usize];
            if vc.curr == NONE || !matches!(vc.halt, Halt::None) {
                continue;
            }
            self.cs_sample_at_interrupt(v);
        }
    }

    pub(super) fn spin_check_interval(&self, vm: usize) -> Nanos {
        let m = &self.vms[vm];
        let mut i = m.spin_threshold;
        if m.ple > 0 {
            i = i.min(m.ple);
        }
        if self.pol.load_aware {
            i = i.min(10_000);
        }
        i.max(500)
    }

    pub(super) fn spin_acquire(&mut self, task: u32, l: u32, cs: Nanos) {
        let v = self.tasks[task as usize].vcpu;
        let vm = self.tasks[task as usize].vm as usize;
        let lock = &mut self.vms[vm].locks[l as usize];
        if lock.holder == NONE {
            lock.holder = task;
            self.tasks[task as usize].phase = Phase::Cs { lock: l, rem: cs };
            self.cs_enter(v);
            return;
        }
        lock.waiters.push_back(task);
        let holder = lock.holder;
        self.tasks[task as usize].phase = Phase::Spin { lock: l };
        let interval = self.spin_check_interval(vm);
        let vc = &mut self.vcpus[v as usize];
        vc.spin_count = vc.spin_count.wrapping_add(1);
        vc.spun = 0;
        vc.since_ple = 0;
        vc.pv_wait = false;
        vc.spin_rem = interval;
        if self.pol.load_aware {
            let hv = self.tasks[holder as usize].vcpu;
            if self.vcpu_preempted(hv) {
                self.yield_to_holder(v, hv);
            }
        }
    }

    /// Load-aware spinning: the holder's vCPU is preempted, so spinning is
    /// useless; yield this pCPU's turn to the holder (PV sched yield).
    pub(super) fn yield_to_holder(&mut self, v: u32, hv: u32) {
        let ct = self.vcpus[hv as usize].thread;
        let cc = self.threads[ct as usize].cpu;
        let me = self.vcpus[v as usize].thread;
        let mc = self.threads[me as usize].cpu;
        if let Class::Fair { .. } = self.threads[ct as usize].class {
            let m = self.cpus[cc as usize].min_vr;
            let th = &mut self.threads[ct as usize];
            th.vruntime = th.vruntime.min(m.saturating_sub(self.wake_gran + 1));
        }
        if cc != mc {
            if self.cpus[cc as usize].curr != NONE {
                self.account(cc);
                self.cpus[cc as usize].slice_end = self.now;
            }
            self.resched(cc, Some(ct));
        } else {
            self.cpus[mc as usize].slice_end = self.now;
        }
    }

    pub(super) fn spin_release(&mut self, task: u32, l: u32, cs: Nanos) {
        let vm = self.tasks[task as usize].vm as usize;
        let lock = &mut self.vms[vm].locks[l as usize];
        debug_assert_eq!(lock.holder, task);
        let Some(w) = lock.waiters.pop_front() else {
            lock.holder = NONE;
            return;
        };
        lock.holder = w;
        let wv = self.tasks[w as usize].vcpu;
        self.sync_vcpu(wv);
        self.tasks[w as usize].phase = Phase::Cs { lock: l, rem: cs };
        self.cs_enter(wv);
        let was_waiting = self.vcpus[wv as usize].pv_wait;
        self.vcpus[wv as usize].pv_wait = false;
        if was_waiting && !matches!(self.vcpus[wv as usize].halt, Halt::None) {
            // pv_kick: the halted waiter's vCPU is woken.
            self.deliver(wv, NONE, 500);
        } else if self.vcpu_running(wv) {
            let t = self.vcpus[wv as usize].thread;
            let c = self.threads[t as usize].cpu;
            self.reprogram(c);
        }
    }

    /// A spinning vCPU reached a check point: PV threshold, PLE, load-aware test.
    pub(super) fn spin_check(&mut self, v: u32, task: u32) {
        let vm = self.vcpus[v as usize].vm as usize;
        let Phase::Spin { lock } = self.tasks[task as usize].phase else {
            return;
        };
        let holder = self.vms[vm].locks[lock as usize].holder;
        let interval = self.spin_check_interval(vm);
        let threshold = if self.pol.load_aware {
            let t = self.vcpus[v as usize].thread;
            let c = self.threads[t as usize].cpu;
            // Spin longer while pCPUs have room.
            if self.cpus[c as usize].load_pm < 800 {
                self.vms[vm].spin_threshold * 4
            } else {
                self.vms[vm].spin_threshold
            }
        } else {
            self.vms[vm].spin_threshold
        };
        self.vcpus[v as usize].spin_rem = interval;
        if holder != NONE && self.pol.load_aware {
            let hv = self.tasks[holder as usize].vcpu;
            if self.vcpu_preempted(hv) {
                self.yield_to_holder(v, hv);
                return;
            }
        }
        if self.vcpus[v as usize].spun >= threshold {
            self.vcpus[v as usize].pv_wait = true;
            return;
        }
        let ple = self.vms[vm].ple;
        if ple > 0 && self.vcpus[v as usize].since_ple >= ple {
            self.vcpus[v as usize].since_ple = 0;
            self.pause_loop_exit(v, holder);
        }
    }

    /// KVM's `kvm_vcpu_on_spin`: yield to a preempted vCPU of the same VM.
    pub(super) fn pause_loop_exit(&mut self, v: u32, holder: u32) {
        let vm = self.vcpus[v as usize].vm as usize;
        let first = self.vms[vm].first_vcpu;
        let n = self.vms[vm].nvcpus;
        let cand = match self.pol.directed {
            DirectedYield::None => NONE,
            DirectedYield::Kvm => {
                let mut found = NONE;
                let start = self.vms[vm].yield_rr;
                for i in 1..=n {
                    let u = first + (start + i) % n;
                    if u != v && self.vcpu_preempted(u) {
                        found = u;
                        self.vms[vm].yield_rr = (start + i) % n;
                        break;
                    }
                }
                found
            }
            DirectedYield::MaxCount => {
                let hv = if holder != NONE {
                    self.tasks[holder as usize].vcpu
                } else {
                    NONE
                };
                if hv != NONE && hv != v && self.vcpu_preempted(hv) {
                    hv
                } else {
                    let mut best = (NONE, (0u32, 0u64));
                    for i in 0..n {
                        let u = first + i;
                        if u == v || !self.vcpu_preempted(u) {
                            continue;
                        }
                        let key = (self.cs_depth(u), self.vcpus[u as usize].cs_count);
                        if best.0 == NONE || key > best.1 {
                            best = (u, key);
                        }
                    }
                    best.0
                }
            }
        };
        let me = self.vcpus[v as usize].thread;
        let mc = self.threads[me as usize].cpu;
        if cand != NONE {
            let ct = self.vcpus[cand as usize].thread;
            let cc = self.threads[ct as usize].cpu;
            // yield_to: the candidate runs next on its pCPU.
            if let Class::Fair { .. } = self.threads[ct as usize].class {
                let m = self.cpus[cc as usize].min_vr;
                let th = &mut self.threads[ct as usize];
                th.vruntime = th.vruntime.min(m.saturating_sub(self.wake_gran + 1));
            }
            if cc != mc {
                let curr = self.cpus[cc as usize].curr;
                if curr != NONE {
                    self.account(cc);
                    self.cpus[cc as usize].slice_end = self.now;
                }
                self.resched(cc, Some(ct));
            }
        }
        // The spinner yields its own pCPU if anyone waits there.
        if self.has_competitor(mc) {
            if let Class::Fair { .. } = self.threads[me as usize].class {
                let maxvr = self.cpus[mc as usize]
                    .fair_rq
                    .iter()
                    .map(|&t| self.threads[t as usize].vruntime)
                    .max()
                    .unwrap_or(0);
                let th = &mut self.threads[me as usize];
                th.vruntime = th.vruntime.max(maxvr + 1);
            }
            self.cpus[mc as usize].slice_end = self.now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostConfig, TaskSpec};

    /// One pCPU shared by the two vCPUs of a pvsched VM whose tasks hold a spinlock
    /// half of the time, in 400 us sections.
    fn two_vcpus_one_pcpu(policy: PolicySpec) -> Sim {
        let sc = Scenario {
            duration_ms: 100,
            warmup_ms: 0,
            host: HostConfig {
                pcpus: 1,
                ..HostConfig::default()
            },
            ..Scenario::default()
        };
        let vm = VmConfig {
            vcpus: 2,
            tasks: vec![TaskSpec {
                kind: TaskKind::Spin {
                    compute_us: 400,
                    cs_ns: 400_000,
                    locks: 2,
                    cs_per_op: 1,
                },
                per_vcpu: true,
                pinned: true,
                ..TaskSpec::default()
            }],
            ..VmConfig::default()
        };
        Sim::new(&sc, &[vm], &policy, 1, 0).expect("scenario")
    }

    fn pvsched() -> PolicySpec {
        PolicySpec {
            name: "pvsched".into(),
            pvsched: Some(PvschedSpec::default()),
            ..PolicySpec::default()
        }
    }

    #[test]
    fn the_host_read_preempt_count_is_one_in_spinlock_sections_and_in_the_idle_task() {
        let mut sim = two_vcpus_one_pcpu(pvsched());
        let task = sim.vcpus[0]
            .rt_rq
            .first()
            .or(sim.vcpus[0].fair_rq.front())
            .copied();
        let task = task.expect("a task on vCPU 0");
        let count = |sim: &Sim| {
            SimGuestMemory {
                vcpus: &sim.vcpus[..2],
                tasks: &sim.tasks,
            }
            .preempt_count(0)
        };
        // Idle: the idle task's level, and the line says idle.
        sim.vcpus[0].curr = NONE;
        assert_eq!(count(&sim), Some(1));
        assert!(sim.published(0).idle);
        sim.vcpus[0].curr = task;
        for (phase, expect) in [
            (Phase::Work { rem: 1 }, 0),
            (Phase::Cs { lock: 0, rem: 1 }, 1),
            (Phase::Spin { lock: 0 }, 1),
            (Phase::MutexCs { lock: 0, rem: 1 }, 0),
        ] {
            sim.tasks[task as usize].phase = phase;
            assert_eq!(count(&sim), Some(expect), "{phase:?}");
            assert!(!sim.published(0).idle);
        }
        // In an interrupt handler: HARDIRQ_OFFSET on top.
        sim.vcpus[0].irq_rem = 1_000;
        assert_eq!(count(&sim), Some(HARDIRQ_OFFSET));
        // A slot the VM does not have cannot be read.
        let memory = SimGuestMemory {
            vcpus: &sim.vcpus[..2],
            tasks: &sim.tasks,
        };
        assert_eq!(memory.preempt_count(2), None);
    }

    #[test]
    fn the_sampled_signal_changes_only_while_its_vcpu_runs_and_clears_at_a_switch() {
        let mut sim = two_vcpus_one_pcpu(pvsched());
        let mut last: Vec<(u32, u64)> = vec![(0, 0); 2];
        let mut off_cpu_checks = 0;
        for step in 1..=10_000u64 {
            sim.advance_to(step * 10_000);
            for v in 0..2u32 {
                let line = sim.published(v);
                let (depth, count) = (line.cs_depth, line.cs_count);
                assert!(depth <= 1, "t={}", sim.now);
                assert!(
                    count >= last[v as usize].1,
                    "t={}: cs_count went back",
                    sim.now
                );
                if !sim.vcpu_running(v) {
                    // Only the vCPU writes its line: nothing moves while it is off a pCPU.
                    assert_eq!((depth, count), last[v as usize], "t={} vCPU {v}", sim.now);
                    off_cpu_checks += 1;
                }
                if depth == 1 {
                    // A non-zero sample describes the task still running there.
                    assert_ne!(sim.vcpus[v as usize].curr, NONE, "t={}", sim.now);
                }
                last[v as usize] = (depth, count);
            }
        }
        assert!(off_cpu_checks > 1000, "the vCPUs never waited for the pCPU");
        for (v, (_, count)) in last.iter().enumerate() {
            assert!(*count > 10, "vCPU {v}: {count} non-zero samples");
        }
        // Without the guest module's signal nothing is published.
        let mut quiet = two_vcpus_one_pcpu(PolicySpec {
            pvsched: Some(PvschedSpec {
                hint_critical_sections: false,
                ..PvschedSpec::default()
            }),
            ..pvsched()
        });
        quiet.advance_to(50_000_000);
        assert_eq!(quiet.published(0).cs_count, 0);
    }
}
