//! Building one host's simulation from a scenario: pCPUs, VMs, vCPU
//! threads, tasks, host load, noise, probes, emulator threads and daemons.

use super::*;

impl Sim {
    /// Builds one host from a scenario, the VMs to place on it and a policy.
    pub fn new(
        sc: &Scenario,
        vms: &[VmConfig],
        policy: &PolicySpec,
        seed: u64,
        stream: u64,
    ) -> Result<Sim, ScenarioError> {
        let h = &sc.host;
        let np = h.pcpus;
        let all = cpu_mask(None, np)?;
        let (kvm_hp, hp_ctl) = match &policy.halt_poll {
            HaltPollSpec::Fixed { .. } => (HaltPollParams::KVM_CURRENT, None),
            HaltPollSpec::Adaptive { preset, max_ns } => {
                let p = HaltPollParams::preset(preset).ok_or_else(|| {
                    ScenarioError::Invalid(format!("unknown halt-poll preset {preset:?}"))
                })?;
                (
                    HaltPollParams {
                        max_ns: *max_ns,
                        ..p
                    },
                    None,
                )
            }
            HaltPollSpec::Controller {
                interval_us,
                bounds,
            } => {
                let ctl = HaltPollCtl::new(*bounds, us(*interval_us), np);
                (ctl.current.window_params(), Some(Box::new(ctl)))
            }
        };
        let pol = Pol {
            static_rt: policy
                .static_rt_prio
                .map(|prio| Class::Rt { prio, rr: true }),
            cs_extra: us(policy.cs_extra_slice_us),
            directed: policy.directed_yield,
            load_aware: policy.load_aware_spin,
            smt_aware: policy.smt_aware,
            hp_fixed: match policy.halt_poll {
                HaltPollSpec::Fixed { ns } => Some(ns),
                _ => None,
            },
            preempt_aware: policy.guest_preempt_aware,
            hint_rt_timers: policy.pvsched.as_ref().is_some_and(|p| p.hint_rt_timers),
            hint_cs: policy
                .pvsched
                .as_ref()
                .is_some_and(|p| p.hint_critical_sections),
            cs_sampled: policy
                .pvsched
                .as_ref()
                .is_some_and(|p| p.hint_critical_sections && p.cs_signal == CsSignal::Sampled),
            introspection: policy.pvsched.as_ref().is_some_and(|p| p.introspection),
        };
        let rt_runtime = if h.rt_runtime_us == 0 || h.rt_runtime_us >= h.rt_period_us {
            0
        } else {
            us(h.rt_runtime_us)
        };
        let mut sim = Sim {
            now: 0,
            end: sc.total_ns(),
            warmup: us(sc.warmup_ms * 1000),
            q: EventQueue::with_capacity(1024, h.pcpus as usize),
            rng: Rng::new(seed, stream),
            hash: TraceHash::default(),
            events: 0,
            stale: 0,
            pol,
            lat_ns: us(h.sched_latency_us),
            sleeper_credit: us(h.sleeper_credit_us),
            min_gran: us(h.min_granularity_us).max(1),
            wake_gran: us(h.wakeup_granularity_us),
            rt_period: us(h.rt_period_us).max(1),
            rt_runtime,
            rr_slice: us(h.rr_slice_us).max(1),
            smt_rate: ((h.smt_factor * FULL as f64) as u64).clamp(1, FULL),
            wake_cost: h.vcpu_wake_cost_ns,
            poll_exit_cost: h.poll_exit_cost_ns,
            idle_exit: h.idle_exit_ns.min(100_000_000),
            idle_poll: us(h.idle_poll_us),
            stat_tick: us(h.sched_tick_us).max(1),
            // Per-pCPU load samples, for load-aware spinning and for the
            // engine's host view where the daemon samples `/proc/stat` for
            // its halt-poll controller.
            needs_load: policy.load_aware_spin
                || matches!(policy.halt_poll, HaltPollSpec::Controller { .. }),
            kvm_hp,
            kvm_stats: PollDelta::default(),
            hp_ctl,
            load_wait_snap: 0,
            cpus: Vec::new(),
            threads: Vec::new(),
            loads: Vec::new(),
            vcpus: Vec::new(),
            tasks: Vec::new(),
            vms: Vec::new(),
            host_lat: Hist::default(),
            host_acct_snap: Vec::new(),
            dirty: Vec::with_capacity(64),
            waiting: 0,
            idle_mask: 0,
            check: false,
            violations: Vec::new(),
            limits: LimitViolations::default(),
            budget_overshoot: 0,
            host_budget: None,
        };
        for c in 0..np {
            let sibling = if h.smt {
                let s = c ^ 1;
                if s < np {
                    s
                } else {
                    NONE
                }
            } else {
                NONE
            };
            sim.cpus.push(Cpu {
                curr: NONE,
                rt_rq: Vec::with_capacity(8),
                fair_rq: Vec::with_capacity(8),
                min_vr: 0,
                seg_start: 0,
                cat: Acct::Idle,
                rate: FULL,
                slice_end: Nanos::MAX,
                timer_at: Nanos::MAX,
                dirty: false,
                sibling,
                rt_period: 0,
                rt_period_end: 0,
                rt_used: 0,
                rt_throttled: false,
                acct: [0; N_ACCT],
                busy_snap: 0,
                load_pm: 0,
                isolated: false,
                update_at: 0,
                idle_since: 0,
            });
        }

        sim.idle_mask = all;
        // Isolation: the pinned vCPUs' pCPUs.
        let iso = policy.isolation.clone();
        let mut iso_mask = 0u64;
        if iso.is_some() {
            for vm in vms {
                for &p in &vm.pin {
                    iso_mask |= 1 << p;
                }
            }
        }
        let housekeeping = if iso_mask != 0 && iso_mask != all {
            all & !iso_mask
        } else {
            all
        };
        let cpuset = iso.as_ref().is_some_and(|i| i.cpuset);
        for c in 0..np {
            sim.cpus[c as usize].isolated = cpuset && iso_mask & (1 << c) != 0;
        }

        // VMs, vCPU threads, tasks.
        for vc in vms {
            sim.add_vm(
                vc,
                policy,
                h.pcpus,
                iso.as_ref().and_then(|i| i.vcpu_fifo_prio),
            )?;
        }

        // Host load.
        for l in &h.load {
            let mut mask = cpu_mask(l.cpus.as_deref(), np)?;
            if cpuset && mask & housekeeping != 0 {
                mask &= housekeeping;
            }
            let burst = us(l.burst_us);
            let sleep = if l.duty >= 1.0 {
                0
            } else if l.duty <= 0.0 {
                continue;
            } else {
                (burst as f64 * (1.0 - l.duty) / l.duty) as Nanos
            };
            let params = sim.loads.len() as u32;
            sim.loads.push(LoadParams {
                burst,
                sleep,
                periodic: false,
                cat: Acct::Host,
            });
            let class = match l.rt_prio {
                Some(p) => Class::Rt { prio: p, rr: false },
                None => Class::Fair {
                    weight: nice_weight(l.nice),
                },
            };
            for i in 0..l.threads {
                let t = sim.add_thread(Role::Load { params }, class, mask, i);
                sim.start_load(t);
            }
        }

        // Kernel noise per pCPU.
        let n = &h.noise;
        let sources: [(u64, u64, bool, bool, Class); 4] = [
            (
                us(n.tick_period_us),
                n.tick_ns,
                true,
                iso.as_ref().is_some_and(|i| i.nohz_full),
                Class::Irq,
            ),
            (
                us(n.irq_gap_us),
                n.irq_ns,
                false,
                iso.as_ref().is_some_and(|i| i.irq_affinity),
                Class::Irq,
            ),
            (
                us(n.softirq_gap_us),
                n.softirq_ns,
                false,
                iso.as_ref().is_some_and(|i| i.softirqs),
                Class::Irq,
            ),
            (
                us(n.kworker_gap_us),
                n.kworker_ns,
                false,
                iso.as_ref().is_some_and(|i| i.kworkers),
                Class::Fair { weight: 1024 },
            ),
        ];
        for (gap, dur, periodic, removed, class) in sources {
            if gap == 0 || dur == 0 {
                continue;
            }
            let params = sim.loads.len() as u32;
            sim.loads.push(LoadParams {
                burst: dur,
                sleep: gap,
                periodic,
                cat: Acct::Noise,
            });
            for c in 0..np {
                if removed && iso_mask & (1 << c) != 0 {
                    continue;
                }
                let t = sim.add_thread(Role::Load { params }, class, 1 << c, c);
                sim.start_load(t);
            }
        }

        // Host latency probe.
        if let Some(p) = &h.latency_probe {
            let mask = cpu_mask(p.cpus.as_deref(), np)?;
            let class = match p.rt_prio {
                Some(prio) => Class::Rt { prio, rr: false },
                None => Class::Fair { weight: 1024 },
            };
            let interval = us(p.interval_us);
            for c in 0..np {
                if mask & (1 << c) == 0 {
                    continue;
                }
                let t = sim.add_thread(Role::Probe { interval }, class, 1 << c, c);
                let first = interval + sim.rng.below(interval);
                sim.threads[t as usize].expected = first;
                sim.arm_thread(t, first);
            }
        }

        // Emulator threads.
        for (v, vc) in vms.iter().enumerate() {
            // QEMU's main loop exists in every VM; it is modelled when it
            // does work (emulated I/O, the BQL) or when the daemon manages
            // it as the VM's interrupt-delivery thread.
            let path_managed = policy
                .pvsched
                .as_ref()
                .is_some_and(|pv| pv.engine.boost_interrupt_path);
            if sim.vms[v].io_path == IoPath::Irq
                && sim.vms[v].bql_interval == 0
                && !path_managed
                && sim.vms[v].tcg.is_none()
                && policy.emulator_rt_prio.is_none()
            {
                continue;
            }
            let emu = policy.emu_cpus.as_deref().or(vc.emu_cpus.as_deref());
            let mut mask = cpu_mask(emu, np)?;
            if cpuset && emu.is_none() {
                mask = housekeeping;
            }
            let class = match policy.emulator_rt_prio {
                Some(prio) => Class::Rt { prio, rr: false },
                None => Class::Fair { weight: 1024 },
            };
            let t = sim.add_thread(Role::Emu { vm: v as u32 }, class, mask, v as u32);
            sim.threads[t as usize].state = TState::Blocked;
            sim.vms[v].emu_thread = t;
        }

        // Daemons: one controller per VM, one host cap over them all.
        if let Some(pv) = &policy.pvsched {
            sim.host_budget = Some(HostBudget::for_policy(&pv.engine, np).map_err(|source| {
                ScenarioError::Engine {
                    policy: policy.name.clone(),
                    source,
                }
            })?);
            for v in 0..sim.vms.len() {
                let n = sim.vms[v].nvcpus as usize;
                let engine = VmEngine::new(pv.engine.clone(), n).map_err(|source| {
                    ScenarioError::Engine {
                        policy: policy.name.clone(),
                        source,
                    }
                })?;
                let header = new_host_header(n as u32, PVSCHED_FEAT_KNOWN, 1);
                let region: Vec<AtomicU64> = (0..region_size_for(n as u32) / 8)
                    .map(|_| AtomicU64::new(0))
                    .collect();
                let _ = Region::from_words(&region).write_header_host(&header);
                let mut ctl = VmController::new(engine, header);
                let path_thread = if pv.engine.boost_interrupt_path {
                    sim.vms[v].emu_thread
                } else {
                    NONE
                };
                {
                    let mut clock = SimClock {
                        now: 0,
                        tick: sim.stat_tick,
                        live: pv.live_run_delay,
                        threads: &sim.threads,
                        cpus: &sim.cpus,
                        vcpus: &sim.vcpus[sim.vms[v].first_vcpu as usize..][..n],
                        path_thread,
                    };
                    for slot in 0..n as u32 {
                        ctl.attach_thread(slot, &mut clock);
                    }
                    if path_thread != NONE {
                        ctl.attach_interrupt_path(&mut clock);
                    }
                }
                sim.vms[v].engine = Some(Box::new(EngineState {
                    ctl,
                    region,
                    published: vec![None; n],
                    spec: pv.clone(),
                    decided: vec![ThreadSched::Baseline; n],
                    path_thread,
                    next_slow: 0,
                    gen: 0,
                    wake_sched: Nanos::MAX,
                    next_daemon: 0,
                    last_run: vec![(0, 0); n],
                    boosted_cum: vec![(0, 0); n],
                    continuous: vec![0; n],
                    history: vec![VecDeque::new(); n],
                    last_step: 0,
                    grants_seen: vec![0; n],
                }));
                let first = sim.rng.below(us(pv.period_us)).max(1);
                sim.vms[v].engine.as_mut().unwrap().next_daemon = first;
                sim.q.push(first, Ev::Daemon { vm: v as u32 });
            }
        }
        if sim.pol.cs_sampled {
            // Guest timer ticks, the sampled signal's regular sampling points.
            for v in 0..sim.vms.len() {
                let tick = sim.vms[v].guest_tick;
                sim.q.push(tick, Ev::GuestTick { vm: v as u32 });
            }
        }
        sim.q.push(HOUSEKEEPING_NS, Ev::Housekeeping);
        if sim.hp_ctl.is_some() {
            sim.q.push(FIRST_ROUND_NS, Ev::HaltPollRound);
        }
        if sim.warmup > 0 {
            sim.q.push(sim.warmup, Ev::Warmup);
        }
        sim.host_acct_snap = vec![[0; N_ACCT]; np as usize];
        // Start every vCPU: runnable threads with their guests about to schedule.
        for v in 0..sim.vcpus.len() as u32 {
            let t = sim.vcpus[v as usize].thread;
            sim.host_wake(t);
        }
        sim.flush_timers();
        Ok(sim)
    }

    pub(super) fn add_thread(&mut self, role: Role, class: Class, affinity: u64, hint: u32) -> u32 {
        let id = self.threads.len() as u32;
        // Spread initial placement over the allowed pCPUs.
        let n = affinity.count_ones().max(1);
        let k = hint % n;
        let mut cpu = 0;
        let mut seen = 0;
        for c in 0..64u32 {
            if affinity & (1 << c) != 0 {
                if seen == k {
                    cpu = c;
                    break;
                }
                seen += 1;
            }
        }
        self.threads.push(Thread {
            role,
            class,
            base: class,
            state: TState::Blocked,
            cpu,
            affinity,
            vruntime: 0,
            exec: 0,
            rem: 0,
            since: 0,
            gen: 0,
            expected: 0,
            run_delay: 0,
            queued: 0,
            pcount: 0,
            run_start: 0,
            exec_at_start: 0,
        });
        id
    }

    pub(super) fn start_load(&mut self, t: u32) {
        let Role::Load { params } = self.threads[t as usize].role else {
            return;
        };
        let p = self.loads[params as usize];
        if p.sleep == 0 {
            self.threads[t as usize].rem = self.rng.exp(p.burst);
            self.host_wake(t);
        } else {
            let first = self.rng.below(p.sleep.max(1)) + 1;
            self.arm_thread(t, first);
        }
    }

    pub(super) fn arm_thread(&mut self, t: u32, at: Nanos) {
        let th = &mut self.threads[t as usize];
        th.gen = th.gen.wrapping_add(1);
        let gen = th.gen;
        self.q.push(at, Ev::ThreadTimer { thread: t, gen });
    }

    pub(super) fn add_vm(
        &mut self,
        vc: &VmConfig,
        policy: &PolicySpec,
        pcpus: u32,
        iso_fifo: Option<u8>,
    ) -> Result<(), ScenarioError> {
        let vm = self.vms.len() as u32;
        let first_vcpu = self.vcpus.len() as u32;
        let all = cpu_mask(None, pcpus)?;
        let factor = match &vc.accel {
            Accel::Kvm => 1.0,
            Accel::Tcg(t) => t.translation_factor,
        };
        let base = match (iso_fifo, self.pol.static_rt) {
            (Some(prio), _) if !vc.pin.is_empty() => Class::Rt { prio, rr: false },
            (_, Some(c)) => c,
            _ => Class::Fair { weight: 1024 },
        };
        for i in 0..vc.vcpus {
            let mask = if vc.pin.is_empty() {
                all
            } else {
                1u64 << vc.pin[(i as usize) % vc.pin.len()]
            };
            let thread = self.add_thread(
                Role::Vcpu {
                    vcpu: first_vcpu + i,
                },
                base,
                mask,
                vm * 7 + i,
            );
            self.vcpus.push(Vcpu {
                vm,
                thread,
                curr: NONE,
                rt_rq: Vec::with_capacity(4),
                fair_rq: VecDeque::with_capacity(8),
                pending: Vec::with_capacity(4),
                irq_rem: 0,
                ovh_rem: 0,
                exit_rem: 0,
                next_exit: if vc.bql_exit_interval_us > 0 {
                    us(vc.bql_exit_interval_us)
                } else {
                    Nanos::MAX
                },
                gslice: us(vc.guest_slice_us),
                need_resched: false,
                halt: Halt::None,
                hp_window: 0,
                pv_wait: false,
                bql_wait: false,
                spin_rem: 0,
                spun: 0,
                since_ple: 0,
                cs_count: 0,
                spin_count: 0,
                irq_count: 0,
                extended: false,
                armed: 0,
                armed_prio: 0,
                useful: 0,
                blocked_since: 0,
                cs_sample: 0,
                cs_samples: 0,
                sample_due: false,
                kicked_at: NONE_AT,
            });
        }
        let mut groups = Vec::new();
        let mut nlocks = 1u32;
        let mut nmutex = 1u32;
        for ts in &vc.tasks {
            if let TaskKind::Spin { locks, .. } = ts.kind {
                nlocks = nlocks.max(locks);
            }
            if let TaskKind::Mutex { locks, .. } = ts.kind {
                nmutex = nmutex.max(locks);
            }
        }
        let mut pipe_open: Option<u32> = None;
        let mut placed = 0u32;
        let mut hackbench = Vec::new();
        for ts in &vc.tasks {
            if let TaskKind::Hackbench {
                fds,
                loops,
                send_ns,
                recv_ns,
                cs_ns,
                fork_us,
            } = ts.kind
            {
                let n = if ts.per_vcpu {
                    ts.count * vc.vcpus
                } else {
                    ts.count
                };
                let spec = HackbenchSpec {
                    groups: n,
                    fds: fds.max(1),
                    loops: loops.max(1),
                    send: send_ns.max(1),
                    recv: recv_ns.max(1),
                    cs: cs_ns.max(1),
                    fork: us(fork_us),
                };
                let group = groups.len() as u32;
                groups.push(GroupInfo {
                    name: ts.name.clone(),
                    // One group alone: its messages one after the other.
                    ref_ops_per_s: 1e9 / (spec.send + spec.recv + 2 * spec.cs) as f64,
                    tasks: n,
                    scored: ts.score,
                });
                let inst = hackbench.len() as u32;
                hackbench.push(self.add_hackbench(
                    vm,
                    first_vcpu,
                    vc.vcpus,
                    group,
                    inst,
                    spec,
                    &mut nlocks,
                    &mut placed,
                ));
                continue;
            }
            let kind = match ts.kind {
                TaskKind::Cpu { chunk_us } => Kind::Cpu {
                    chunk: us(chunk_us),
                },
                TaskKind::Burst { run_us, sleep_us } => Kind::Burst {
                    run: us(run_us),
                    sleep: us(sleep_us),
                },
                TaskKind::Spin {
                    compute_us,
                    cs_ns,
                    locks,
                    cs_per_op,
                } => Kind::Spin {
                    compute: us(compute_us),
                    cs: cs_ns.max(1),
                    locks,
                    per_op: cs_per_op,
                },
                TaskKind::Mutex {
                    compute_us,
                    cs_ns,
                    locks,
                } => Kind::Mutex {
                    compute: us(compute_us),
                    cs: cs_ns.max(1),
                    locks,
                },
                TaskKind::Pipe { work_ns } => Kind::Pipe {
                    work: work_ns.max(1),
                },
                TaskKind::Periodic {
                    interval_us,
                    work_ns,
                } => Kind::Periodic {
                    interval: us(interval_us),
                    work: scale_guest(work_ns, factor).max(1),
                },
                TaskKind::Io {
                    submit_ns,
                    device_us,
                    think_us,
                } => Kind::Io {
                    submit: submit_ns.max(1),
                    device: us(device_us),
                    think: us(think_us),
                },
                TaskKind::Hackbench { .. } => unreachable!("expanded above"),
            };
            let count = if ts.per_vcpu {
                ts.count * vc.vcpus
            } else {
                ts.count
            };
            let cycle = match kind {
                Kind::Cpu { chunk } => chunk,
                Kind::Burst { run, sleep } => run + sleep,
                Kind::Spin {
                    compute,
                    cs,
                    per_op,
                    ..
                } => u64::from(per_op) * (compute + cs),
                Kind::Mutex { compute, cs, .. } => compute + cs,
                Kind::Pipe { work } => 2 * (work + vc.irq_ns),
                Kind::Periodic { interval, .. } => interval,
                Kind::Io {
                    submit,
                    device,
                    think,
                } => submit + device + think + vc.irq_ns,
                Kind::HbParent { .. } | Kind::HbSend { .. } | Kind::HbRecv { .. } => {
                    unreachable!("expanded above")
                }
            };
            let measure = ts.measure.unwrap_or(matches!(
                kind,
                Kind::Periodic { .. } | Kind::Pipe { .. } | Kind::Io { .. }
            ));
            let group = groups.len() as u32;
            groups.push(GroupInfo {
                name: ts.name.clone(),
                ref_ops_per_s: 1e9 / cycle.max(1) as f64,
                tasks: if matches!(kind, Kind::Pipe { .. }) {
                    count / 2
                } else {
                    count
                },
                scored: ts.score && !matches!(kind, Kind::Periodic { .. } | Kind::Burst { .. }),
            });
            for i in 0..count {
                let id = self.tasks.len() as u32;
                let vcpu = if let Some(v) = ts.vcpu {
                    first_vcpu + v
                } else if ts.per_vcpu || ts.pinned {
                    first_vcpu + i % vc.vcpus
                } else {
                    first_vcpu + placed % vc.vcpus
                };
                placed += 1;
                let mut task = Task {
                    vm,
                    vcpu,
                    kind,
                    rt_prio: ts.rt_prio,
                    pinned: ts.pinned,
                    measure,
                    group,
                    phase: Phase::Blocked,
                    state: GState::Sleeping,
                    step: 0,
                    gen: 0,
                    t0: 0,
                    sample_on_run: false,
                    peer: NONE,
                    initiator: false,
                    armed: false,
                    backlog: 0,
                };
                if let Kind::Pipe { .. } = kind {
                    match pipe_open.take() {
                        None => {
                            pipe_open = Some(id);
                            task.initiator = true;
                        }
                        Some(p) => {
                            task.peer = p;
                            self.tasks[p as usize].peer = id;
                        }
                    }
                }
                self.tasks.push(task);
                self.start_task(id);
            }
        }
        let tcg = match &vc.accel {
            Accel::Kvm => None,
            Accel::Tcg(t) => Some(TcgCosts {
                main_loop: t.main_loop_ns,
                jitter: t.translation_jitter,
            }),
        };
        self.vms.push(Vm {
            name: vc.name.clone(),
            first_vcpu,
            nvcpus: vc.vcpus,
            irq_ns: scale_guest(vc.irq_ns, factor),
            slice: us(vc.guest_slice_us).max(1),
            spin_threshold: us(vc.spin_threshold_us).max(1),
            // TCG has no pause-loop exiting.
            ple: if tcg.is_some() { 0 } else { us(vc.ple_us) },
            io_path: policy.io_path.unwrap_or(vc.io_path),
            io_emu: vc.io_emu_ns.max(1),
            bql_interval: us(vc.bql_exit_interval_us),
            bql_exit: vc.bql_exit_ns.max(1),
            guest_tick: us(vc.guest_tick_us).max(1),
            tcg,
            locks: vec![
                Lock {
                    holder: NONE,
                    waiters: VecDeque::new()
                };
                nlocks as usize
            ],
            mutexes: vec![
                Lock {
                    holder: NONE,
                    waiters: VecDeque::new()
                };
                nmutex as usize
            ],
            emu_thread: NONE,
            emu_queue: VecDeque::new(),
            emu_item: None,
            bql_holder: NONE,
            bql_waiters: VecDeque::new(),
            yield_rr: 0,
            hackbench,
            engine: None,
            stats: VmStats {
                ops: vec![0; groups.len()],
                vcpu_useful: vec![0; vc.vcpus as usize],
                instances: 1,
                ..Default::default()
            },
            groups,
        });
        Ok(())
    }

    /// Puts a new task on its vCPU's run queue (or arms its first timer).
    pub(super) fn start_task(&mut self, id: u32) {
        let t = &mut self.tasks[id as usize];
        match t.kind {
            Kind::Pipe { work } => {
                if t.initiator {
                    t.phase = Phase::Work { rem: work };
                } else {
                    return; // waits for its partner's first message
                }
            }
            Kind::Periodic { interval, .. } => {
                let first = interval + self.rng.below(interval);
                t.t0 = first;
                self.arm_task(id, first);
                return;
            }
            Kind::Burst { sleep, .. } => {
                let first = self.rng.exp(sleep.max(1));
                self.arm_task(id, first);
                return;
            }
            Kind::Cpu { chunk } => t.phase = Phase::Work { rem: chunk },
            Kind::Spin { compute, .. } | Kind::Mutex { compute, .. } => {
                let c = self.rng.exp(compute);
                t.phase = Phase::Work { rem: c.max(1) };
            }
            Kind::Io { submit, .. } => t.phase = Phase::Work { rem: submit },
            Kind::HbParent { fork, .. } => t.phase = Phase::Work { rem: fork.max(1) },
            // Forked by the parent when its round starts.
            Kind::HbSend { .. } | Kind::HbRecv { .. } => return,
        }
        let t = &mut self.tasks[id as usize];
        t.state = GState::Runnable;
        t.t0 = 0;
        let v = t.vcpu;
        self.enqueue_task(v, id);
    }

    pub(super) fn arm_task(&mut self, id: u32, at: Nanos) {
        let t = &mut self.tasks[id as usize];
        t.gen = t.gen.wrapping_add(1);
        t.armed = true;
        t.state = GState::Sleeping;
        t.phase = Phase::Blocked;
        let gen = t.gen;
        if t.rt_prio > 0 {
            let v = &mut self.vcpus[t.vcpu as usize];
            v.armed += 1;
            v.armed_prio = v.armed_prio.max(t.rt_prio);
        }
        self.q.push(at, Ev::TaskTimer { task: id, gen });
    }
}

/// Guest work under a translation factor (1 under KVM).
fn scale_guest(ns: u64, factor: f64) -> u64 {
    (ns as f64 * factor).round().min(u64::MAX as f64 / 2.0) as u64
}
