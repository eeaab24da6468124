//! Guest locks: queued spinlocks (spinning, PV halt and kick, pause-loop
//! exits and directed yield), critical-section counts.

use super::*;

#[derive(Clone, Debug, Default)]
pub(super) struct Lock {
    pub(super) holder: u32,
    pub(super) waiters: VecDeque<u32>,
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
