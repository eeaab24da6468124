//! The guest: per-vCPU run queues, placement, wakeups and the tasks' phases.

use super::*;

/// Guest fair wakeup preemption: the current task must have run this long.
pub(super) const GUEST_WAKEUP_GRAN: Nanos = 50_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Cpu {
        chunk: Nanos,
    },
    Burst {
        run: Nanos,
        sleep: Nanos,
    },
    Spin {
        compute: Nanos,
        cs: Nanos,
        locks: u32,
        per_op: u32,
    },
    Mutex {
        compute: Nanos,
        cs: Nanos,
        locks: u32,
    },
    Pipe {
        work: Nanos,
    },
    Periodic {
        interval: Nanos,
        work: Nanos,
    },
    Io {
        submit: Nanos,
        device: Nanos,
        think: Nanos,
    },
    /// A hackbench parent: forks every process of a round (`fork` in all), then
    /// waits for them.
    HbParent {
        fork: Nanos,
        inst: u32,
    },
    /// A hackbench sender: `total` writes, round robin over the `fds` receivers of
    /// its group (tasks `first_recv..first_recv + fds`).
    HbSend {
        send: Nanos,
        cs: Nanos,
        fds: u32,
        total: u32,
        first_recv: u32,
        inst: u32,
    },
    /// A hackbench receiver: `total` reads from its socket (spinlock `lock`).
    HbRecv {
        recv: Nanos,
        cs: Nanos,
        lock: u32,
        total: u32,
        inst: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Work { rem: Nanos },
    Cs { lock: u32, rem: Nanos },
    Spin { lock: u32 },
    MutexCs { lock: u32, rem: Nanos },
    Blocked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GState {
    Running,
    Runnable,
    Sleeping,
}

#[derive(Clone, Debug)]
pub(super) struct Task {
    pub(super) vm: u32,
    pub(super) vcpu: u32,
    pub(super) kind: Kind,
    pub(super) rt_prio: u8,
    pub(super) pinned: bool,
    pub(super) measure: bool,
    pub(super) group: u32,
    pub(super) phase: Phase,
    pub(super) state: GState,
    pub(super) step: u32,
    pub(super) gen: u32,
    pub(super) t0: Nanos,
    pub(super) sample_on_run: bool,
    pub(super) peer: u32,
    pub(super) initiator: bool,
    pub(super) armed: bool,
    /// Messages queued in a hackbench receiver's socket.
    pub(super) backlog: u32,
}

impl Sim {
    pub(super) fn enqueue_task(&mut self, v: u32, task: u32) {
        let t = &mut self.tasks[task as usize];
        t.vcpu = v;
        t.state = GState::Runnable;
        let rt = t.rt_prio;
        let vc = &mut self.vcpus[v as usize];
        if rt > 0 {
            vc.rt_rq.push(task);
            if vc.curr != NONE && self.tasks[vc.curr as usize].rt_prio < rt {
                vc.need_resched = true;
            }
        } else {
            vc.fair_rq.push_back(task);
            // Fair wakeup preemption: a sleeper beats a task that has run a while.
            let slice = self.vms.get(vc.vm as usize).map_or(0, |m| m.slice);
            if vc.curr != NONE {
                let c = &self.tasks[vc.curr as usize];
                if c.rt_prio == 0
                    && matches!(c.phase, Phase::Work { .. })
                    && slice.saturating_sub(vc.gslice) >= GUEST_WAKEUP_GRAN
                {
                    vc.gslice = 0;
                    vc.need_resched = true;
                }
            }
        }
    }

    pub(super) fn guest_resched(&mut self, v: u32) {
        let now = self.now;
        let vc = &self.vcpus[v as usize];
        let cur = vc.curr;
        if cur != NONE {
            let t = &self.tasks[cur as usize];
            let nonpreempt = matches!(t.phase, Phase::Cs { .. } | Phase::Spin { .. });
            if nonpreempt || !vc.need_resched {
                return;
            }
            // Preempt only for a higher RT task or a waiting fair task at slice end.
            let best_rt = vc
                .rt_rq
                .iter()
                .map(|&x| self.tasks[x as usize].rt_prio)
                .max()
                .unwrap_or(0);
            let preempt =
                best_rt > t.rt_prio || (t.rt_prio == 0 && vc.gslice == 0 && !vc.fair_rq.is_empty());
            let vc = &mut self.vcpus[v as usize];
            vc.need_resched = false;
            if !preempt {
                if vc.gslice == 0 {
                    vc.gslice = self.vms[vc.vm as usize].slice;
                }
                return;
            }
            vc.curr = NONE;
            let rt = self.tasks[cur as usize].rt_prio;
            self.tasks[cur as usize].state = GState::Runnable;
            if rt > 0 {
                vc.rt_rq.insert(0, cur);
            } else {
                vc.fair_rq.push_back(cur);
            }
        }
        let vc = &mut self.vcpus[v as usize];
        vc.need_resched = false;
        let next = if !vc.rt_rq.is_empty() {
            let mut bi = 0;
            for i in 1..vc.rt_rq.len() {
                if self.tasks[vc.rt_rq[i] as usize].rt_prio
                    > self.tasks[vc.rt_rq[bi] as usize].rt_prio
                {
                    bi = i;
                }
            }
            vc.rt_rq.remove(bi)
        } else if let Some(x) = vc.fair_rq.pop_front() {
            x
        } else {
            return;
        };
        if next != cur {
            // sched_switch: the module clears its sampled depth.
            vc.cs_sample = 0;
        }
        vc.curr = next;
        vc.gslice = self.vms[vc.vm as usize].slice;
        let t = &mut self.tasks[next as usize];
        t.state = GState::Running;
        t.vcpu = v;
        if t.sample_on_run {
            t.sample_on_run = false;
            let lat = now.saturating_sub(t.t0);
            let vm = t.vm as usize;
            if t.measure && now >= self.warmup {
                self.vms[vm].stats.lat.record(lat);
            }
            if let Kind::Io { .. } = t.kind {
                if now >= self.warmup {
                    let g = t.group as usize;
                    self.vms[vm].stats.ops[g] += 1;
                }
            }
        }
    }

    /// An idle vCPU pulls a waiting task from the busiest sibling vCPU.
    pub(super) fn guest_newidle(&mut self, v: u32) -> bool {
        let vm = self.vcpus[v as usize].vm as usize;
        let first = self.vms[vm].first_vcpu;
        let n = self.vms[vm].nvcpus;
        let mut best: Option<(u32, usize)> = None;
        for i in 0..n {
            let u = first + i;
            if u == v {
                continue;
            }
            let q = self.vcpus[u as usize].fair_rq.len();
            if q > 0 && best.is_none_or(|(_, bq)| q > bq) {
                best = Some((u, q));
            }
        }
        let Some((u, _)) = best else {
            return false;
        };
        let pos = self.vcpus[u as usize]
            .fair_rq
            .iter()
            .position(|&x| !self.tasks[x as usize].pinned);
        let Some(pos) = pos else {
            return false;
        };
        self.sync_vcpu(u);
        let task = self.vcpus[u as usize].fair_rq.remove(pos).unwrap();
        self.enqueue_task(v, task);
        if self.vcpu_running(u) {
            let t = self.vcpus[u as usize].thread;
            let c = self.threads[t as usize].cpu;
            self.reprogram(c);
        }
        true
    }

    pub(super) fn vcpu_idle(&self, v: u32) -> bool {
        let vc = &self.vcpus[v as usize];
        vc.curr == NONE && vc.rt_rq.is_empty() && vc.fair_rq.is_empty() && vc.pending.is_empty()
    }

    /// Where a waking task goes.
    pub(super) fn select_vcpu(&self, task: u32) -> u32 {
        let t = &self.tasks[task as usize];
        let prev = t.vcpu;
        if t.pinned {
            return prev;
        }
        let vm = &self.vms[t.vm as usize];
        let ok = |v: u32| self.vcpu_idle(v) && !(self.pol.preempt_aware && self.vcpu_preempted(v));
        if ok(prev) {
            return prev;
        }
        let n = vm.nvcpus;
        let base = prev - vm.first_vcpu;
        for i in 1..n.min(8) {
            let v = vm.first_vcpu + (base + i) % n;
            if ok(v) {
                return v;
            }
        }
        prev
    }

    /// Wakes a sleeping task from guest context on vCPU `from` (IPI if remote).
    pub(super) fn guest_wake(&mut self, task: u32, from: u32) {
        let target = self.select_vcpu(task);
        self.tasks[task as usize].state = GState::Runnable;
        if target == from {
            self.enqueue_task(from, task);
            self.vcpus[from as usize].need_resched = true;
        } else {
            let cost = self.vms[self.tasks[task as usize].vm as usize].irq_ns;
            self.deliver(target, task, cost);
        }
    }

    pub(super) fn task_block(&mut self, task: u32) {
        let t = &mut self.tasks[task as usize];
        t.phase = Phase::Blocked;
        t.state = GState::Sleeping;
        let v = t.vcpu;
        if self.vcpus[v as usize].curr == task {
            let vc = &mut self.vcpus[v as usize];
            vc.curr = NONE;
            vc.cs_sample = 0;
        }
    }

    pub(super) fn task_timer(&mut self, task: u32) {
        let vm = self.tasks[task as usize].vm;
        if self.vms[vm as usize].tcg.is_some() {
            // TCG: the host timer wakes QEMU's main loop, which fires the guest
            // timer and kicks the vCPU thread.
            self.emu_push(vm, EmuItem::Timer(task));
            return;
        }
        self.fire_task_timer(task);
    }

    /// The guest timer of `task` fires on its vCPU.
    pub(super) fn fire_task_timer(&mut self, task: u32) {
        let jitter = self.vms[self.tasks[task as usize].vm as usize]
            .tcg
            .map_or(0.0, |t| t.jitter);
        let t = &mut self.tasks[task as usize];
        t.armed = false;
        let v = t.vcpu;
        if t.rt_prio > 0 {
            let vc = &mut self.vcpus[v as usize];
            vc.armed = vc.armed.saturating_sub(1);
            if vc.armed == 0 {
                vc.armed_prio = 0;
            }
        }
        match t.kind {
            Kind::Periodic { work, .. } => {
                let rem = if jitter > 0.0 {
                    // Translated code: a constant part and an exponential part.
                    let fixed = (work as f64 * (1.0 - jitter)) as u64;
                    fixed + self.rng.exp(work - fixed)
                } else {
                    work
                };
                let t = &mut self.tasks[task as usize];
                t.phase = Phase::Work { rem: rem.max(1) };
                t.sample_on_run = true;
            }
            Kind::Burst { run, .. } => {
                let r = self.rng.exp(run);
                self.tasks[task as usize].phase = Phase::Work { rem: r };
            }
            _ => return,
        }
        let cost = self.vms[self.tasks[task as usize].vm as usize].irq_ns;
        self.deliver(v, task, cost);
    }

    /// The current phase of a running task finished.
    pub(super) fn task_advance(&mut self, task: u32) {
        let now = self.now;
        let scoring = now >= self.warmup;
        let t = self.tasks[task as usize].clone();
        let v = t.vcpu;
        let vm = t.vm as usize;
        match t.kind {
            Kind::Cpu { chunk } => {
                if scoring {
                    self.vms[vm].stats.ops[t.group as usize] += 1;
                    if t.measure && t.t0 >= self.warmup {
                        self.vms[vm].stats.lat.record(now - t.t0);
                    }
                }
                let tk = &mut self.tasks[task as usize];
                tk.t0 = now;
                tk.phase = Phase::Work { rem: chunk };
            }
            Kind::Burst { sleep, .. } => {
                if scoring {
                    self.vms[vm].stats.ops[t.group as usize] += 1;
                }
                self.task_block(task);
                let s = self.rng.exp(sleep.max(1));
                self.arm_task(task, now + s);
            }
            Kind::Spin {
                compute,
                cs,
                locks,
                per_op,
            } => match t.phase {
                Phase::Work { .. } => {
                    let l = self.rng.below(u64::from(locks)) as u32;
                    self.spin_acquire(task, l, cs);
                }
                Phase::Cs { lock, .. } => {
                    self.spin_release(task, lock, cs);
                    let tk = &mut self.tasks[task as usize];
                    tk.step += 1;
                    if tk.step >= per_op {
                        tk.step = 0;
                        if scoring {
                            self.vms[vm].stats.ops[t.group as usize] += 1;
                        }
                    }
                    let c = self.rng.exp(compute).max(1);
                    self.tasks[task as usize].phase = Phase::Work { rem: c };
                }
                _ => {}
            },
            Kind::Mutex { compute, cs, locks } => match t.phase {
                Phase::Work { .. } => {
                    let l = self.rng.below(u64::from(locks)) as u32;
                    let m = &mut self.vms[vm].mutexes[l as usize];
                    if m.holder == NONE {
                        m.holder = task;
                        self.tasks[task as usize].phase = Phase::MutexCs { lock: l, rem: cs };
                        self.cs_enter(v);
                    } else {
                        m.waiters.push_back(task);
                        self.task_block(task);
                    }
                }
                Phase::MutexCs { lock, .. } => {
                    if scoring {
                        self.vms[vm].stats.ops[t.group as usize] += 1;
                    }
                    let m = &mut self.vms[vm].mutexes[lock as usize];
                    if let Some(w) = m.waiters.pop_front() {
                        m.holder = w;
                        self.tasks[w as usize].phase = Phase::MutexCs { lock, rem: cs };
                        let wv = self.tasks[w as usize].vcpu;
                        self.cs_enter(wv);
                        self.guest_wake(w, v);
                    } else {
                        m.holder = NONE;
                    }
                    let c = self.rng.exp(compute).max(1);
                    self.tasks[task as usize].phase = Phase::Work { rem: c };
                }
                _ => {}
            },
            Kind::Pipe { work } => {
                // Message sent: the partner wakes with work, this task waits.
                let peer = t.peer;
                if peer != NONE {
                    self.tasks[peer as usize].phase = Phase::Work { rem: work };
                    if self.tasks[peer as usize].initiator {
                        self.tasks[peer as usize].sample_on_run = true;
                        if scoring {
                            self.vms[vm].stats.ops[t.group as usize] += 1;
                        }
                    }
                    self.guest_wake(peer, v);
                }
                let tk = &mut self.tasks[task as usize];
                if tk.initiator {
                    tk.t0 = now;
                }
                if peer != NONE {
                    self.task_block(task);
                } else {
                    self.tasks[task as usize].phase = Phase::Work { rem: work };
                }
            }
            Kind::Periodic { interval, .. } => {
                let tk = &mut self.tasks[task as usize];
                let mut next = tk.t0 + interval;
                while next <= now {
                    next += interval;
                }
                tk.t0 = next;
                self.task_block(task);
                self.arm_task(task, next);
            }
            Kind::HbParent { .. } | Kind::HbSend { .. } | Kind::HbRecv { .. } => {
                self.hackbench_advance(task, &t, scoring);
            }
            Kind::Io { submit, device, .. } => {
                if t.step == 0 {
                    // Submitted: wait for the completion.
                    let tk = &mut self.tasks[task as usize];
                    tk.t0 = now;
                    tk.step = 1;
                    self.task_block(task);
                    match self.vms[vm].io_path {
                        IoPath::Irq => self.q.push(now + device, Ev::IoDone { task }),
                        _ => self.emu_push(vm as u32, EmuItem::Submit(task)),
                    }
                } else {
                    let tk = &mut self.tasks[task as usize];
                    tk.step = 0;
                    // The think time ran after the completion (see `io_wake`).
                    tk.phase = Phase::Work { rem: submit };
                }
            }
        }
    }
}
