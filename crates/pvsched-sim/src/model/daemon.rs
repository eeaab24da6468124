//! The simulated pvsched daemon: the guest module's writes to the shared
//! region, and each VM's `VmController` over the simulated threads.

use super::*;

/// The simulated daemon of one VM: the daemon's own controller over an
/// in-memory shared region that the simulated guest module writes.
pub(super) struct EngineState {
    pub(super) ctl: VmController,
    /// The VM's shared region (header and one slot per vCPU).
    pub(super) region: Vec<AtomicU64>,
    /// What the guest module last published per vCPU (it writes on change).
    pub(super) published: Vec<Option<GuestVcpuState>>,
    pub(super) spec: PvschedSpec,
    pub(super) decided: Vec<ThreadSched>,
    /// The interrupt-delivery thread (the VM's emulator main loop), or `NONE`.
    pub(super) path_thread: u32,
    pub(super) next_slow: Nanos,
    pub(super) gen: u32,
    pub(super) wake_sched: Nanos,
    pub(super) next_daemon: Nanos,
    // Limit checker: CPU used under boosted decisions, per vCPU, as the daemon's
    // `schedstat` samples show it and exactly.
    pub(super) last_run: Vec<(Nanos, Nanos)>,
    pub(super) boosted_cum: Vec<(Nanos, Nanos)>,
    pub(super) continuous: Vec<Nanos>,
    pub(super) history: Vec<VecDeque<(Nanos, Nanos, Nanos)>>,
    /// Time of the previous engine step (the interval the checker judges).
    pub(super) last_step: Nanos,
    /// Lock-holder grants of each slot seen so far (to tell whom new ones went to).
    pub(super) grants_seen: Vec<u64>,
}

pub(super) fn encode_sched(s: ThreadSched) -> u32 {
    match s {
        ThreadSched::Baseline => 0,
        ThreadSched::Rt { class, prio } => {
            1 << 16 | (if class == RtClass::Rr { 1 } else { 0 }) << 8 | u32::from(prio)
        }
        ThreadSched::Deadline(_) => unreachable!("the simulator has no deadline class"),
    }
}

pub(super) fn decode_sched(x: u32) -> ThreadSched {
    if x == 0 {
        ThreadSched::Baseline
    } else {
        ThreadSched::Rt {
            class: if (x >> 8) & 1 == 1 {
                RtClass::Rr
            } else {
                RtClass::Fifo
            },
            prio: (x & 0xff) as u8,
        }
    }
}

impl Sim {
    /// The guest line the simulated guest module would publish for vCPU `v`.
    pub(super) fn published(&self, v: u32) -> GuestVcpuState {
        let vc = &self.vcpus[v as usize];
        let mut s = GuestVcpuState {
            // The slot index within the VM, as the module writes it.
            cpu_id: v - self.vms[vc.vm as usize].first_vcpu,
            online: true,
            irq_count: vc.irq_count,
            ..Default::default()
        };
        s.idle = vc.curr == NONE;
        if vc.curr != NONE {
            let t = &self.tasks[vc.curr as usize];
            s.task = if t.rt_prio > 0 {
                TaskInfo {
                    policy: SchedPolicy::Fifo,
                    rt_prio: t.rt_prio,
                    nice: 0,
                }
            } else {
                TaskInfo::default()
            };
        }
        if vc.irq_rem > 0 {
            s.irq_depth = 1;
        }
        let mut pending = 0u32;
        let mut pprio = 0u8;
        for &x in &vc.rt_rq {
            pending += 1;
            pprio = pprio.max(self.tasks[x as usize].rt_prio);
        }
        for &x in &vc.pending {
            let p = self.tasks[x as usize].rt_prio;
            if p > 0 {
                pending += 1;
                pprio = pprio.max(p);
            }
        }
        if self.pol.hint_rt_timers && s.idle && vc.armed > 0 {
            pending += 1;
            pprio = pprio.max(vc.armed_prio);
        }
        s.rt_pending = pending;
        s.pending_prio = pprio;
        if self.pol.hint_cs {
            if self.pol.cs_sampled {
                // The guest module: the last sample taken at an interrupt entry.
                s.cs_depth = vc.cs_sample;
                s.cs_count = vc.cs_samples;
            } else {
                s.cs_depth = self.cs_depth(v);
                s.cs_count = vc.cs_count;
                s.spin_count = vc.spin_count;
            }
        }
        s
    }

    /// The feature bits the simulated guest module advertises: the real module's set
    /// with the sampled signal (no spin counts; the CPU-info table with
    /// introspection), every feature for a guest with lock hints.
    fn guest_features(&self) -> u64 {
        if self.pol.hint_cs && !self.pol.cs_sampled {
            return PVSCHED_FEAT_KNOWN;
        }
        let mut f = GUEST_MODULE_FEATURES;
        if self.pol.introspection {
            f |= PVSCHED_FEAT_PREEMPT_COUNT_GPA;
        }
        f
    }

    /// One tick of the VM's daemon: the guest module publishes what changed,
    /// the limit checker takes its sample, and the daemon's controller runs
    /// over the region, the simulated threads and the host budget.
    pub(super) fn engine_step(&mut self, vm: u32) {
        let now = self.now;
        let first = self.vms[vm as usize].first_vcpu;
        let n = self.vms[vm as usize].nvcpus;
        let mut boxed = self.vms[vm as usize].engine.take().unwrap();
        let e = &mut *boxed;
        {
            // The guest module: a line is written (seqlock, counter bumped)
            // only when what it publishes changed; the heartbeat moves with
            // the guest's tick.
            let region = Region::from_words(&e.region);
            let _ = region.write_header_guest(&PvschedHeaderGuest {
                guest_version_major: PVSCHED_VERSION_MAJOR,
                guest_version_minor: PVSCHED_VERSION_MINOR,
                guest_nr_cpus: n,
                guest_features: self.guest_features(),
                guest_heartbeat: now / GUEST_HEARTBEAT_NS + 1,
                guest_generation: 1,
                guest_state: PVSCHED_GUEST_ATTACHED,
                ..Default::default()
            });
            for i in 0..n {
                let state = self.published(first + i);
                if e.published[i as usize] != Some(state) {
                    e.published[i as usize] = Some(state);
                    let _ = region.write_guest_line(i, &encode_guest_line(&state));
                }
            }
        }
        // The engine sees CPU time through `schedstat`, which lags a running thread by
        // up to a host tick. Its limits are judged on that CPU time, the one it charges
        // (a tick's catch-up can land in one step, so it may pass a limit by up to a
        // tick); the exact boosted CPU's excess over the budget is measured beside.
        let lag = self.stat_tick;
        for i in 0..n {
            let v = first + i;
            let th = &self.threads[self.vcpus[v as usize].thread as usize];
            let exact = run_ns(th, &self.cpus, now);
            let (seen, _, _) = schedstat(th, &self.cpus, now, self.stat_tick, false);
            // Limit check: CPU used since the last step under a boosted decision.
            let (last_seen, last_exact) = e.last_run[i as usize];
            let used = seen.saturating_sub(last_seen);
            let used_exact = exact - last_exact;
            e.last_run[i as usize] = (seen.max(last_seen), exact);
            let i = i as usize;
            if e.decided[i] != ThreadSched::Baseline {
                e.boosted_cum[i].0 += used;
                e.boosted_cum[i].1 += used_exact;
                // As the engine: a thread off-CPU for over a tenth of the
                // interval yielded, and its continuous run restarts.
                let wall = now - e.last_step;
                if wall > 0 && used * 10 < wall * 9 {
                    e.continuous[i] = used;
                } else {
                    e.continuous[i] += used;
                }
                if e.continuous[i] > e.spec.engine.max_continuous_ns + lag {
                    self.limits.continuous += 1;
                }
            } else {
                e.continuous[i] = 0;
            }
            let w = e.spec.engine.budget_window_ns;
            let h = &mut e.history[i];
            let (cum, cum_exact) = e.boosted_cum[i];
            h.push_back((now, cum, cum_exact));
            while h.len() > 1 && h[0].0 < now.saturating_sub(w) {
                h.pop_front();
            }
            if cum - h[0].1 > e.spec.engine.budget_ns + lag {
                self.limits.budget += 1;
            }
            let over = (cum_exact - h[0].2).saturating_sub(e.spec.engine.budget_ns);
            self.budget_overshoot = self.budget_overshoot.max(over);
        }
        e.last_step = now;

        let slow = now >= e.next_slow;
        if slow {
            e.next_slow = now + us(e.spec.host_info_us);
        }
        let host_due = self
            .host_budget
            .as_ref()
            .and_then(HostBudget::wake_at)
            .is_some_and(|w| w <= now);
        let region = Region::from_words(&e.region);
        let mut clock = SimClock {
            now,
            tick: self.stat_tick,
            live: e.spec.live_run_delay,
            threads: &self.threads,
            cpus: &self.cpus,
            vcpus: &self.vcpus[first as usize..][..n as usize],
            path_thread: e.path_thread,
        };
        let memory = SimGuestMemory {
            vcpus: &self.vcpus[first as usize..][..n as usize],
            tasks: &self.tasks,
        };
        let mut act = SimActuator {
            vm,
            now,
            delay: e.spec.apply_delay_ns,
            decided: &mut e.decided,
            continuous: &mut e.continuous,
            q: &mut self.q,
            hash: &mut self.hash,
        };
        e.ctl.tick(
            &region,
            Some(&mut act),
            &mut clock,
            TickInput {
                now,
                slow,
                host: &SimHost(&self.cpus),
                host_budget: self.host_budget.as_mut(),
                host_due,
                process_alive: true,
                guest_memory: self
                    .pol
                    .introspection
                    .then_some(&memory as &dyn GuestMemory),
            },
        );
        // Whom the new lock-holder grants went to, by the guest's state at the tick.
        for i in 0..n {
            let grants = e.ctl.stats(i as usize).lock_holder_grants;
            let new = grants.saturating_sub(e.grants_seen[i as usize]);
            e.grants_seen[i as usize] = grants;
            if new == 0 || now < self.warmup {
                continue;
            }
            let vc = &self.vcpus[(first + i) as usize];
            let stats = &mut self.vms[vm as usize].stats;
            match (vc.curr != NONE).then(|| self.tasks[vc.curr as usize].phase) {
                Some(Phase::Cs { .. }) => stats.grants_to_holders += new,
                Some(Phase::Spin { .. }) => stats.grants_to_waiters += new,
                _ => {}
            }
        }
        let host_wake = self
            .host_budget
            .as_ref()
            .and_then(HostBudget::wake_at)
            .filter(|_| e.ctl.boosted_threads() > 0);
        let wake = match (e.ctl.wake_at(), host_wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(w) = wake {
            if w < e.next_daemon && w != e.wake_sched {
                e.gen = e.gen.wrapping_add(1);
                e.wake_sched = w;
                self.q
                    .push(w.max(now + 1), Ev::EngineWake { vm, gen: e.gen });
            }
        }
        self.vms[vm as usize].engine = Some(boxed);
    }
}

/// How often the simulated guest module moves its header heartbeat.
pub(super) const GUEST_HEARTBEAT_NS: Nanos = 4_000_000;

/// The `vcpu` value of an [`Ev::Apply`] aimed at the interrupt-delivery thread.
pub(super) const PATH_SLOT: u32 = (1 << 20) - 1;

/// Cumulative CPU time of a simulated thread at `now`.
pub(super) fn run_ns(th: &Thread, cpus: &[Cpu], now: Nanos) -> Nanos {
    let mut run = th.exec;
    if th.state == TState::Running {
        run += now - cpus[th.cpu as usize].seg_start;
    }
    run
}

/// The guest module's features (`PVSCHED_GUEST_FEATURES` in `guest/kmod/pvsched_guest.c`).
const GUEST_MODULE_FEATURES: u64 = PVSCHED_FEAT_BOOST
    | PVSCHED_FEAT_TASK_INFO
    | PVSCHED_FEAT_RT_PENDING
    | PVSCHED_FEAT_IRQ
    | PVSCHED_FEAT_CRITICAL_SECTION
    | PVSCHED_FEAT_BOOST_REQUEST;

/// The guest RAM a host with a shared memory backend reads: each vCPU's preempt count.
pub(super) struct SimGuestMemory<'a> {
    /// The VM's vCPUs, by slot.
    pub(super) vcpus: &'a [Vcpu],
    pub(super) tasks: &'a [Task],
}

impl GuestMemory for SimGuestMemory<'_> {
    fn preempt_count(&self, slot: u32) -> Option<u32> {
        self.vcpus
            .get(slot as usize)
            .map(|vc| preempt_disabled_bits(preempt_count(vc, self.tasks)))
    }
}

/// The daemon's view of simulated threads' CPU time (its `/proc`): `schedstat`'s
/// run time, run delay and times put on a CPU as the kernel keeps them, and `stat`'s
/// state and pCPU.
pub(super) struct SimClock<'a> {
    pub(super) now: Nanos,
    /// The host scheduler tick.
    pub(super) tick: Nanos,
    /// Run delay includes a wait in progress (what-if).
    pub(super) live: bool,
    pub(super) threads: &'a [Thread],
    pub(super) cpus: &'a [Cpu],
    /// The VM's vCPUs, by slot.
    pub(super) vcpus: &'a [Vcpu],
    pub(super) path_thread: u32,
}

impl CpuClock for SimClock<'_> {
    fn sample(&mut self, thread: VmThread, with_stat: bool) -> Sampled {
        let t = match thread {
            VmThread::Vcpu(slot) => match self.vcpus.get(slot as usize) {
                Some(v) => v.thread,
                None => return Sampled::Gone,
            },
            VmThread::InterruptPath if self.path_thread != NONE => self.path_thread,
            // The model attaches no IOThread to the controller.
            VmThread::InterruptPath | VmThread::IoThread(_) => return Sampled::NoSource,
        };
        let th = &self.threads[t as usize];
        let (run_ns, wait_ns, slices) = schedstat(th, self.cpus, self.now, self.tick, self.live);
        Sampled::Fresh(CpuSample {
            run_ns,
            wait_ns,
            slices: Some(slices),
            stat: if with_stat {
                StatSample::Read(ThreadStat {
                    pcpu: th.cpu,
                    runnable: th.state != TState::Blocked,
                    policy: 0,
                    rt_priority: 0,
                })
            } else {
                StatSample::NotAsked
            },
        })
    }
}

/// The daemon's actuator on simulated threads: a change reaches the thread
/// after the apply delay ([`Ev::Apply`]).
pub(super) struct SimActuator<'a> {
    pub(super) vm: u32,
    pub(super) now: Nanos,
    pub(super) delay: Nanos,
    pub(super) decided: &'a mut [ThreadSched],
    pub(super) continuous: &'a mut [Nanos],
    pub(super) q: &'a mut EventQueue,
    pub(super) hash: &'a mut TraceHash,
}

impl ThreadActuator for SimActuator<'_> {
    fn apply(&mut self, thread: VmThread, sched: ThreadSched) -> Result<bool, ApplyError> {
        let slot = match thread {
            VmThread::Vcpu(slot) => {
                let i = slot as usize;
                let Some(was) = self.decided.get(i).copied() else {
                    return Err(ApplyError::Gone(format!("no vCPU in slot {slot}")));
                };
                if was == sched {
                    return Ok(false);
                }
                if sched == ThreadSched::Baseline || was == ThreadSched::Baseline {
                    self.continuous[i] = 0;
                }
                self.decided[i] = sched;
                slot
            }
            VmThread::InterruptPath => PATH_SLOT,
            VmThread::IoThread(i) => {
                return Err(ApplyError::Gone(format!("the model has no IOThread {i}")))
            }
        };
        self.q.push(
            self.now + self.delay,
            Ev::Apply {
                vm: self.vm,
                vcpu: slot,
                sched: encode_sched(sched),
            },
        );
        self.hash
            .fold(encode_sched(sched) as u64 ^ (slot as u64) << 32);
        Ok(true)
    }
}

/// Host load and SMT as the simulated host's last sample saw them.
pub(super) struct SimHost<'a>(&'a [Cpu]);

impl HostInfo for SimHost<'_> {
    fn load_permille(&self, pcpu: u32) -> u32 {
        self.0.get(pcpu as usize).map_or(0, |c| c.load_pm)
    }
    fn sibling_busy(&self, pcpu: u32) -> bool {
        self.0
            .get(pcpu as usize)
            .and_then(|c| self.0.get(c.sibling as usize))
            .is_some_and(|s| s.load_pm >= 500)
    }
}
