//! The two-level model: host pCPUs and scheduler, vCPU threads, guest
//! schedulers and tasks, locks, interrupts, I/O paths, and the policies.
//!
//! One [`Sim`] is one host. Everything is indexed by `u32` into flat vectors;
//! the hot paths allocate nothing. Each pCPU keeps at most one live timer
//! event ([`Ev::Cpu`]) for the next thing due on it; changing anything on a
//! pCPU first accounts the time since its last change ([`Sim::account`]),
//! then mutates, then reprograms its timer.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;

use pvsched_abi::raw::{
    PvschedHeaderGuest, PVSCHED_FEAT_KNOWN, PVSCHED_GUEST_ATTACHED, PVSCHED_VERSION_MAJOR,
    PVSCHED_VERSION_MINOR,
};
use pvsched_abi::{
    encode_guest_line, new_host_header, region_size_for, GuestVcpuState, Region, SchedPolicy,
    TaskInfo,
};
use pvsched_policy::{
    haltpoll, ApplyError, CpuClock, CpuSample, HaltPollParams, HostBudget, HostInfo, RtClass,
    Sampled, StatSample, ThreadActuator, ThreadSched, ThreadStat, TickInput, VmController,
    VmEngine, VmThread,
};

use crate::config::{
    cpu_mask, DirectedYield, HaltPollSpec, IoPath, PolicySpec, PvschedSpec, Scenario,
    ScenarioError, TaskKind, VmConfig,
};
use crate::queue::{Ev, EventQueue, TraceHash};
use crate::rng::Rng;
use crate::stats::{Acct, Hist, VmStats, N_ACCT};
use crate::Nanos;

const NONE: u32 = u32::MAX;
const FULL: u64 = 1024;
const HOUSEKEEPING_NS: Nanos = 4_000_000;
/// Guest fair wakeup preemption: the current task must have run this long.
const GUEST_WAKEUP_GRAN: Nanos = 50_000;

/// Weight of a nice level (the kernel's `sched_prio_to_weight`).
fn nice_weight(nice: i8) -> u32 {
    const W: [u32; 40] = [
        88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916, 9548, 7620, 6100,
        4904, 3906, 3121, 2501, 1991, 1586, 1277, 1024, 820, 655, 526, 423, 335, 272, 215, 172,
        137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15,
    ];
    W[(i32::from(nice.clamp(-20, 19)) + 20) as usize]
}

/// Host scheduling class of a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
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
    fn rank(self) -> u32 {
        match self {
            Class::Fair { .. } => 0,
            Class::Rt { prio, .. } => 1 + u32::from(prio),
            Class::Irq => 1000,
        }
    }
    #[inline]
    fn is_rt(self) -> bool {
        matches!(self, Class::Rt { .. })
    }
    fn from_sched(s: ThreadSched, base: Class) -> Class {
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

fn encode_sched(s: ThreadSched) -> u32 {
    match s {
        ThreadSched::Baseline => 0,
        ThreadSched::Rt { class, prio } => {
            1 << 16 | (if class == RtClass::Rr { 1 } else { 0 }) << 8 | u32::from(prio)
        }
        ThreadSched::Deadline(_) => unreachable!("the simulator has no deadline class"),
    }
}

fn decode_sched(x: u32) -> ThreadSched {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TState {
    Running,
    Runnable,
    Blocked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Vcpu { vcpu: u32 },
    Load { params: u32 },
    Probe { interval: Nanos },
    Emu { vm: u32 },
}

#[derive(Clone, Copy, Debug)]
struct LoadParams {
    burst: Nanos,
    sleep: Nanos,
    periodic: bool,
    cat: Acct,
}

#[derive(Clone, Debug)]
struct Thread {
    role: Role,
    class: Class,
    base: Class,
    state: TState,
    cpu: u32,
    affinity: u64,
    vruntime: u64,
    exec: Nanos,
    rem: Nanos,
    since: Nanos,
    gen: u32,
    expected: Nanos,
}

#[derive(Clone, Debug)]
struct Cpu {
    curr: u32,
    rt_rq: Vec<u32>,
    fair_rq: Vec<u32>,
    min_vr: u64,
    seg_start: Nanos,
    cat: Acct,
    rate: u64,
    slice_end: Nanos,
    timer_at: Nanos,
    dirty: bool,
    sibling: u32,
    rt_period: u64,
    rt_period_end: Nanos,
    rt_used: Nanos,
    rt_throttled: bool,
    acct: [Nanos; N_ACCT],
    busy_snap: Nanos,
    load_pm: u32,
    isolated: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Work { rem: Nanos },
    Cs { lock: u32, rem: Nanos },
    Spin { lock: u32 },
    MutexCs { lock: u32, rem: Nanos },
    Blocked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GState {
    Running,
    Runnable,
    Sleeping,
}

#[derive(Clone, Debug)]
struct Task {
    vm: u32,
    vcpu: u32,
    kind: Kind,
    rt_prio: u8,
    pinned: bool,
    measure: bool,
    group: u32,
    phase: Phase,
    state: GState,
    step: u32,
    gen: u32,
    t0: Nanos,
    sample_on_run: bool,
    peer: u32,
    initiator: bool,
    armed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Halt {
    None,
    Poll { start: Nanos, until: Nanos },
    Blocked { start: Nanos },
}

#[derive(Clone, Debug)]
struct Vcpu {
    vm: u32,
    thread: u32,
    curr: u32,
    rt_rq: Vec<u32>,
    fair_rq: VecDeque<u32>,
    pending: Vec<u32>,
    irq_rem: Nanos,
    ovh_rem: Nanos,
    exit_rem: Nanos,
    next_exit: Nanos,
    gslice: Nanos,
    need_resched: bool,
    halt: Halt,
    hp_window: u32,
    pv_wait: bool,
    bql_wait: bool,
    spin_rem: Nanos,
    spun: Nanos,
    since_ple: Nanos,
    cs_count: u64,
    spin_count: u32,
    irq_count: u64,
    extended: bool,
    armed: u32,
    armed_prio: u8,
    useful: Nanos,
    /// When the thread last blocked in a halt (poll time excluded).
    blocked_since: Nanos,
}

#[derive(Clone, Debug, Default)]
struct Lock {
    holder: u32,
    waiters: VecDeque<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EmuItem {
    Submit(u32),
    Complete(u32),
}

/// The simulated daemon of one VM: the daemon's own controller over an
/// in-memory shared region that the simulated guest module writes.
struct EngineState {
    ctl: VmController,
    /// The VM's shared region (header and one slot per vCPU).
    region: Vec<AtomicU64>,
    /// What the guest module last published per vCPU (it writes on change).
    published: Vec<Option<GuestVcpuState>>,
    spec: PvschedSpec,
    decided: Vec<ThreadSched>,
    /// The interrupt-delivery thread (the VM's emulator main loop), or `NONE`.
    path_thread: u32,
    next_slow: Nanos,
    gen: u32,
    wake_sched: Nanos,
    next_daemon: Nanos,
    // Limit checker: CPU used under boosted decisions, per vCPU.
    last_run: Vec<Nanos>,
    boosted_cum: Vec<Nanos>,
    continuous: Vec<Nanos>,
    history: Vec<VecDeque<(Nanos, Nanos)>>,
    /// Time of the previous engine step (the interval the checker judges).
    last_step: Nanos,
}

struct Vm {
    name: String,
    first_vcpu: u32,
    nvcpus: u32,
    irq_ns: Nanos,
    slice: Nanos,
    spin_threshold: Nanos,
    ple: Nanos,
    io_path: IoPath,
    io_emu: Nanos,
    bql_interval: Nanos,
    bql_exit: Nanos,
    locks: Vec<Lock>,
    mutexes: Vec<Lock>,
    emu_thread: u32,
    emu_queue: VecDeque<EmuItem>,
    emu_item: Option<EmuItem>,
    bql_holder: u32,
    bql_waiters: VecDeque<u32>,
    yield_rr: u32,
    engine: Option<Box<EngineState>>,
    stats: VmStats,
    groups: Vec<GroupInfo>,
}

/// A scored task group of a VM: its name and the ops/s one copy makes on a dedicated CPU.
#[derive(Clone, Debug)]
pub struct GroupInfo {
    /// Task group name.
    pub name: String,
    /// Reference operations per second of one copy alone.
    pub ref_ops_per_s: f64,
    /// Copies.
    pub tasks: u32,
    /// Counts in the score.
    pub scored: bool,
}

/// The policy knobs in the hot path, resolved once.
#[derive(Clone, Debug)]
struct Pol {
    static_rt: Option<Class>,
    cs_extra: Nanos,
    directed: DirectedYield,
    load_aware: bool,
    smt_aware: bool,
    hp_fixed: Option<u32>,
    hp_params: HaltPollParams,
    hp_load_tuned: bool,
    preempt_aware: bool,
    hint_rt_timers: bool,
    hint_cs: bool,
}

/// Limits the run checks as it goes; each counter must stay 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimitViolations {
    /// Boosted CPU time in a budget window above the engine's budget.
    pub budget: u64,
    /// A continuous boost longer than the engine's limit.
    pub continuous: u64,
    /// RT time in a throttling period above the runtime.
    pub rt_runtime: u64,
    /// A halt-poll longer than its window or the cap.
    pub poll: u64,
}

/// One host's simulation.
pub struct Sim {
    now: Nanos,
    end: Nanos,
    warmup: Nanos,
    q: EventQueue,
    rng: Rng,
    hash: TraceHash,
    events: u64,
    stale: u64,
    pol: Pol,
    lat_ns: Nanos,
    sleeper_credit: Nanos,
    min_gran: Nanos,
    wake_gran: Nanos,
    rt_period: Nanos,
    rt_runtime: Nanos,
    rr_slice: Nanos,
    smt_rate: u64,
    wake_cost: Nanos,
    poll_exit_cost: Nanos,
    needs_load: bool,
    cpus: Vec<Cpu>,
    threads: Vec<Thread>,
    loads: Vec<LoadParams>,
    vcpus: Vec<Vcpu>,
    tasks: Vec<Task>,
    vms: Vec<Vm>,
    host_lat: Hist,
    host_acct_snap: Vec<[Nanos; N_ACCT]>,
    /// pCPUs whose timer changed during the current event.
    dirty: Vec<u32>,
    /// Threads waiting in all run queues.
    waiting: u32,
    /// pCPUs with nothing running or queued.
    idle_mask: u64,
    /// Check structural invariants after every event (tests).
    pub check: bool,
    /// Invariant violations found (first few).
    pub violations: Vec<String>,
    /// Policy limits exceeded.
    pub limits: LimitViolations,
    /// The host-wide boost cap shared by every VM's daemon controller.
    host_budget: Option<HostBudget>,
}

/// What one host run produced.
#[derive(Clone, Debug)]
pub struct HostOutcome {
    /// Events processed (stale timers excluded).
    pub events: u64,
    /// Stale timer events skipped.
    pub stale: u64,
    /// Trace hash.
    pub hash: u64,
    /// Simulated time measured (after warm-up), ns.
    pub measured_ns: Nanos,
    /// Per VM: name, vCPUs, groups, stats.
    pub vms: Vec<(String, u32, Vec<GroupInfo>, VmStats)>,
    /// Host latency probe samples.
    pub host_lat: Hist,
    /// Host CPU time per category over the measured interval, summed over pCPUs.
    pub host_acct: [Nanos; N_ACCT],
    /// pCPUs.
    pub pcpus: u32,
    /// Invariant violations.
    pub violations: Vec<String>,
    /// Policy limit violations.
    pub limits: LimitViolations,
}

/// Host time to do `work` at `rate` (1024 = full speed), rounded up.
#[inline]
fn scale(work: Nanos, rate: u64) -> Nanos {
    if rate == FULL || work == Nanos::MAX {
        work
    } else {
        (work.saturating_mul(FULL)).div_ceil(rate)
    }
}

fn us(x: u64) -> Nanos {
    x.saturating_mul(1000)
}

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
        let hp_params = match &policy.halt_poll {
            HaltPollSpec::Fixed { .. } => HaltPollParams::KVM_CURRENT,
            HaltPollSpec::Adaptive { preset, max_ns }
            | HaltPollSpec::LoadTuned { preset, max_ns } => {
                let p = HaltPollParams::preset(preset).ok_or_else(|| {
                    ScenarioError::Invalid(format!("unknown halt-poll preset {preset:?}"))
                })?;
                HaltPollParams {
                    max_ns: *max_ns,
                    ..p
                }
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
            hp_params,
            hp_load_tuned: matches!(policy.halt_poll, HaltPollSpec::LoadTuned { .. }),
            preempt_aware: policy.guest_preempt_aware,
            hint_rt_timers: policy.pvsched.as_ref().is_some_and(|p| p.hint_rt_timers),
            hint_cs: policy
                .pvsched
                .as_ref()
                .is_some_and(|p| p.hint_critical_sections),
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
            needs_load: policy.load_aware_spin
                || matches!(policy.halt_poll, HaltPollSpec::LoadTuned { .. }),
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
            if sim.vms[v].io_path == IoPath::Irq && sim.vms[v].bql_interval == 0 && !path_managed {
                continue;
            }
            let emu = policy.emu_cpus.as_deref().or(vc.emu_cpus.as_deref());
            let mut mask = cpu_mask(emu, np)?;
            if cpuset && emu.is_none() {
                mask = housekeeping;
            }
            let t = sim.add_thread(
                Role::Emu { vm: v as u32 },
                Class::Fair { weight: 1024 },
                mask,
                v as u32,
            );
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
                    last_run: vec![0; n],
                    boosted_cum: vec![0; n],
                    continuous: vec![0; n],
                    history: vec![VecDeque::new(); n],
                    last_step: 0,
                }));
                let first = sim.rng.below(us(pv.period_us)).max(1);
                sim.vms[v].engine.as_mut().unwrap().next_daemon = first;
                sim.q.push(first, Ev::Daemon { vm: v as u32 });
            }
        }
        sim.q.push(HOUSEKEEPING_NS, Ev::Housekeeping);
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

    fn add_thread(&mut self, role: Role, class: Class, affinity: u64, hint: u32) -> u32 {
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
        });
        id
    }

    fn start_load(&mut self, t: u32) {
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

    fn arm_thread(&mut self, t: u32, at: Nanos) {
        let th = &mut self.threads[t as usize];
        th.gen = th.gen.wrapping_add(1);
        let gen = th.gen;
        self.q.push(at, Ev::ThreadTimer { thread: t, gen });
    }

    fn add_vm(
        &mut self,
        vc: &VmConfig,
        policy: &PolicySpec,
        pcpus: u32,
        iso_fifo: Option<u8>,
    ) -> Result<(), ScenarioError> {
        let vm = self.vms.len() as u32;
        let first_vcpu = self.vcpus.len() as u32;
        let all = cpu_mask(None, pcpus)?;
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
        for ts in &vc.tasks {
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
                    work: work_ns.max(1),
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
        self.vms.push(Vm {
            name: vc.name.clone(),
            first_vcpu,
            nvcpus: vc.vcpus,
            irq_ns: vc.irq_ns,
            slice: us(vc.guest_slice_us).max(1),
            spin_threshold: us(vc.spin_threshold_us).max(1),
            ple: us(vc.ple_us),
            io_path: policy.io_path.unwrap_or(vc.io_path),
            io_emu: vc.io_emu_ns.max(1),
            bql_interval: us(vc.bql_exit_interval_us),
            bql_exit: vc.bql_exit_ns.max(1),
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
    fn start_task(&mut self, id: u32) {
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
        }
        let t = &mut self.tasks[id as usize];
        t.state = GState::Runnable;
        t.t0 = 0;
        let v = t.vcpu;
        self.enqueue_task(v, id);
    }

    fn arm_task(&mut self, id: u32, at: Nanos) {
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

    // ------------------------------------------------------------------
    // Main loop
    // ------------------------------------------------------------------

    /// Runs to the end; `progress` is called with the fraction done now and then.
    pub fn run(&mut self, progress: &mut dyn FnMut(f64)) {
        let step = (self.end / 64).max(1);
        let mut next_report = step;
        let mut same = 0u32;
        while let Some((t, ev)) = self.q.pop() {
            if t > self.end {
                break;
            }
            if t == self.now {
                same += 1;
                if same > 100_000 {
                    self.violations
                        .push(format!("livelock: more than 100000 events at t={t} ns"));
                    break;
                }
            } else {
                same = 0;
            }
            self.now = t;
            let fresh = self.handle(ev);
            self.flush_timers();
            if !fresh {
                self.stale += 1;
                continue;
            }
            self.events += 1;
            self.hash.record(t, &ev);
            if self.check {
                self.check_invariants();
            }
            if t >= next_report {
                progress(t as f64 / self.end as f64);
                next_report = t + step;
            }
        }
        self.now = self.end;
        for c in 0..self.cpus.len() as u32 {
            self.account(c);
        }
        for t in 0..self.threads.len() {
            if self.threads[t].state == TState::Runnable {
                if let Role::Vcpu { vcpu } = self.threads[t].role {
                    let vm = self.vcpus[vcpu as usize].vm as usize;
                    let since = self.threads[t].since.max(self.warmup);
                    self.vms[vm].stats.steal += self.end.saturating_sub(since);
                }
            }
        }
        for v in 0..self.vcpus.len() {
            if let Halt::Blocked { .. } = self.vcpus[v].halt {
                let vm = self.vcpus[v].vm as usize;
                let since = self.vcpus[v].blocked_since;
                self.vms[vm].stats.halted += self.end.saturating_sub(since.max(self.warmup));
            }
        }
        if self.check {
            for (i, c) in self.cpus.iter().enumerate() {
                let sum: Nanos = c.acct.iter().sum();
                if sum != self.end {
                    self.violations
                        .push(format!("pCPU {i}: accounted {sum} ns of {} ns", self.end));
                }
            }
        }
        progress(1.0);
    }

    /// The result of the run.
    pub fn outcome(mut self) -> HostOutcome {
        let mut host_acct = [0; N_ACCT];
        for (c, snap) in self.cpus.iter().zip(&self.host_acct_snap) {
            for i in 0..N_ACCT {
                host_acct[i] += c.acct[i] - snap[i];
            }
        }
        let mut vms = Vec::new();
        for v in 0..self.vms.len() {
            let first = self.vms[v].first_vcpu as usize;
            let n = self.vms[v].nvcpus as usize;
            let mut stats = std::mem::take(&mut self.vms[v].stats);
            for (i, vc) in self.vcpus[first..first + n].iter().enumerate() {
                stats.vcpu_useful[i] = vc.useful;
            }
            if let Some(e) = &self.vms[v].engine {
                for i in 0..n {
                    let s = e.ctl.stats(i);
                    stats.boosts = stats.boosts.wrapping_add(s.boosts);
                    stats.throttles = stats.throttles.wrapping_add(s.throttles);
                }
            }
            vms.push((
                self.vms[v].name.clone(),
                self.vms[v].nvcpus,
                self.vms[v].groups.clone(),
                stats,
            ));
        }
        HostOutcome {
            events: self.events,
            stale: self.stale,
            hash: self.hash.0,
            measured_ns: self.end - self.warmup,
            vms,
            host_lat: self.host_lat,
            host_acct,
            pcpus: self.cpus.len() as u32,
            violations: self.violations,
            limits: self.limits,
        }
    }

    /// Moves the pCPU timers changed by the last event into the queue, once each.
    #[inline]
    fn flush_timers(&mut self) {
        let mut i = 0;
        while i < self.dirty.len() {
            let c = self.dirty[i];
            self.cpus[c as usize].dirty = false;
            self.program(c);
            i += 1;
        }
        self.dirty.clear();
    }

    /// Trace hash so far.
    pub fn trace_hash(&self) -> u64 {
        self.hash.0
    }

    /// Events processed so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    fn handle(&mut self, ev: Ev) -> bool {
        match ev {
            Ev::Cpu { cpu, .. } => {
                self.cpus[cpu as usize].timer_at = Nanos::MAX;
                self.cpu_due(cpu);
            }
            Ev::ThreadTimer { thread, gen } => {
                let th = &self.threads[thread as usize];
                if th.gen != gen || th.state != TState::Blocked {
                    return false;
                }
                self.thread_timer(thread);
            }
            Ev::TaskTimer { task, gen } => {
                if self.tasks[task as usize].gen != gen {
                    return false;
                }
                self.task_timer(task);
            }
            Ev::IoDone { task } => self.io_done(task),
            Ev::Daemon { vm } => {
                let e = self.vms[vm as usize].engine.as_mut().unwrap();
                let period = us(e.spec.period_us);
                e.next_daemon = self.now + period;
                self.q.push(self.now + period, Ev::Daemon { vm });
                self.engine_step(vm);
            }
            Ev::EngineWake { vm, gen } => {
                let e = self.vms[vm as usize].engine.as_mut().unwrap();
                if e.gen != gen {
                    return false;
                }
                e.wake_sched = Nanos::MAX;
                self.engine_step(vm);
            }
            Ev::Apply { vm, vcpu, sched } => {
                let t = if vcpu == PATH_SLOT {
                    self.vms[vm as usize].emu_thread
                } else {
                    let v = self.vms[vm as usize].first_vcpu + vcpu;
                    self.vcpus[v as usize].thread
                };
                let class = Class::from_sched(decode_sched(sched), self.threads[t as usize].base);
                self.set_class(t, class);
            }
            Ev::Housekeeping => self.housekeeping(),
            Ev::Warmup => self.reset_stats(),
        }
        true
    }

    fn reset_stats(&mut self) {
        for c in 0..self.cpus.len() as u32 {
            self.account(c);
        }
        for (snap, c) in self.host_acct_snap.iter_mut().zip(&self.cpus) {
            *snap = c.acct;
        }
        for vm in &mut self.vms {
            let groups = vm.stats.ops.len();
            let n = vm.stats.vcpu_useful.len();
            vm.stats = VmStats {
                ops: vec![0; groups],
                vcpu_useful: vec![0; n],
                instances: 1,
                ..Default::default()
            };
            if let Some(e) = &vm.engine {
                // Engine counters are cumulative; subtract the warm-up's at the end.
                let mut b = 0;
                let mut th = 0;
                for i in 0..e.ctl.slots().len() {
                    let s = e.ctl.stats(i);
                    b += s.boosts;
                    th += s.throttles;
                }
                vm.stats.boosts = 0u64.wrapping_sub(b);
                vm.stats.throttles = 0u64.wrapping_sub(th);
            }
        }
        for v in &mut self.vcpus {
            v.useful = 0;
        }
        // Steal and halt intervals in progress are clipped at the warm-up when they end.
        self.host_lat = Hist::default();
    }

    // ------------------------------------------------------------------
    // Host scheduler
    // ------------------------------------------------------------------

    /// Charges the time since the last change on pCPU `c`.
    #[inline]
    fn account(&mut self, c: u32) {
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
    fn check_rt_period(&mut self, c: u32) {
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

    fn best_in_rq(&self, c: u32) -> Option<(bool, usize, u32)> {
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

    fn fair_slice(&self, c: u32, t: u32) -> Nanos {
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

    fn has_competitor(&self, c: u32) -> bool {
        let cpu = &self.cpus[c as usize];
        !cpu.fair_rq.is_empty() || !cpu.rt_rq.is_empty()
    }

    /// Keeps bit `c` of the idle mask current.
    #[inline]
    fn update_idle(&mut self, c: u32) {
        let cpu = &self.cpus[c as usize];
        if cpu.curr == NONE && cpu.fair_rq.is_empty() && cpu.rt_rq.is_empty() {
            self.idle_mask |= 1 << c;
        } else {
            self.idle_mask &= !(1 << c);
        }
    }

    fn enqueue(&mut self, c: u32, t: u32) {
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

    fn dequeue(&mut self, c: u32, t: u32) {
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

    fn update_min_vr(&mut self, c: u32) {
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
    fn resched(&mut self, c: u32, woken: Option<u32>) {
        self.account(c);
        self.check_rt_period(c);
        let now = self.now;
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
                self.vcpus[vcpu as usize].halt = Halt::Blocked { start };
                self.vcpus[vcpu as usize].blocked_since = now;
                self.threads[curr as usize].state = TState::Blocked;
                self.cpus[c as usize].curr = NONE;
            } else if curr != NONE {
                // Put the current thread back (it stays runnable; RR goes to the tail).
                let th = &mut self.threads[curr as usize];
                th.state = TState::Runnable;
                th.since = now;
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
    fn extend_slice(&mut self, c: u32, t: u32) -> bool {
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

    fn run_thread(&mut self, c: u32, t: u32) {
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
        let th = &mut self.threads[t as usize];
        th.state = TState::Running;
        th.cpu = c;
        let role = th.role;
        let cpu = &mut self.cpus[c as usize];
        cpu.curr = t;
        cpu.slice_end = slice;
        self.idle_mask &= !(1u64 << c);
        match role {
            Role::Vcpu { vcpu } => {
                let vm = self.vcpus[vcpu as usize].vm as usize;
                if now >= self.warmup {
                    let since = self.threads[t as usize].since.max(self.warmup);
                    self.vms[vm].stats.steal += now - since;
                }
                self.vcpus[vcpu as usize].extended = false;
            }
            Role::Probe { .. } => {
                let exp = self.threads[t as usize].expected;
                if exp >= self.warmup {
                    self.host_lat.record(now.saturating_sub(exp));
                }
            }
            _ => {}
        }
    }

    fn smt_changed(&mut self, c: u32) {
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
    fn idle_pull(&mut self, c: u32) {
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
    fn rt_push(&mut self, c: u32) {
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

    fn migrate_waiting(&mut self, from: u32, to: u32, t: u32) {
        self.dequeue(from, t);
        if let Class::Fair { .. } = self.threads[t as usize].class {
            let f = self.cpus[from as usize].min_vr;
            let d = self.cpus[to as usize].min_vr;
            let th = &mut self.threads[t as usize];
            th.vruntime = th.vruntime.saturating_sub(f).saturating_add(d);
        }
        self.enqueue(to, t);
        // The source may now have an unneeded slice end; harmless.
    }

    fn run_thread_from_rq(&mut self, c: u32, t: u32) {
        self.dequeue(c, t);
        self.run_thread(c, t);
    }

    /// Marks pCPU `c` for [`Sim::program`] at the end of the current event:
    /// its accounting category and timer depend only on the final state, and
    /// no simulated time passes before the event ends.
    #[inline]
    fn reprogram(&mut self, c: u32) {
        let cpu = &mut self.cpus[c as usize];
        if !cpu.dirty {
            cpu.dirty = true;
            self.dirty.push(c);
        }
    }

    /// Sets pCPU `c`'s accounting category and its next timer.
    fn program(&mut self, c: u32) {
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

    fn cpu_due(&mut self, c: u32) {
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
    fn host_wake(&mut self, t: u32) {
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

    fn select_cpu(&self, t: u32) -> u32 {
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
    fn block_running(&mut self, t: u32) {
        let c = self.threads[t as usize].cpu;
        if self.cpus[c as usize].curr != t {
            if self.threads[t as usize].state == TState::Runnable {
                self.dequeue(c, t);
                self.threads[t as usize].state = TState::Blocked;
            }
            return;
        }
        self.account(c);
        self.threads[t as usize].state = TState::Blocked;
        self.cpus[c as usize].curr = NONE;
        self.resched(c, None);
    }

    fn set_class(&mut self, t: u32, class: Class) {
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

    fn thread_timer(&mut self, t: u32) {
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

    fn burst_done(&mut self, t: u32) {
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

    fn housekeeping(&mut self) {
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

    // ------------------------------------------------------------------
    // vCPU execution
    // ------------------------------------------------------------------

    /// What the running vCPU does: accounting category, guest work until the
    /// next thing due (guest ns), or an absolute host time (poll end).
    fn vcpu_activity(&self, v: u32) -> (Acct, Nanos, Nanos) {
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
    fn progress(&mut self, v: u32, mut work: Nanos) {
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
    fn vcpu_logic(&mut self, v: u32) {
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
    fn vcpu_settle(&mut self, v: u32) {
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

    fn poll_window(&self, v: u32) -> u32 {
        if let Some(ns) = self.pol.hp_fixed {
            return ns;
        }
        let t = self.vcpus[v as usize].thread;
        let cap = if self.pol.hp_load_tuned {
            let c = self.threads[t as usize].cpu;
            haltpoll::tuned_for_load(&self.pol.hp_params, self.cpus[c as usize].load_pm).max_ns
        } else {
            self.pol.hp_params.max_ns
        };
        self.vcpus[v as usize].hp_window.min(cap)
    }

    fn halt(&mut self, v: u32) {
        let now = self.now;
        let t = self.vcpus[v as usize].thread;
        let c = self.threads[t as usize].cpu;
        self.account(c);
        let window = self.poll_window(v);
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
    fn poll_stop(&mut self, v: u32) {
        let Halt::Poll { start, until } = self.vcpus[v as usize].halt else {
            return;
        };
        let polled = self.now - start;
        if polled > until - start
            || polled > Nanos::from(self.pol.hp_fixed.unwrap_or(self.pol.hp_params.max_ns))
        {
            self.limits.poll += 1;
        }
        self.vcpus[v as usize].halt = Halt::Blocked { start };
        self.vcpus[v as usize].blocked_since = self.now;
        let t = self.vcpus[v as usize].thread;
        self.block_running(t);
    }

    fn halt_ended(&mut self, v: u32, start: Nanos) {
        let block = self.now - start;
        if self.pol.hp_fixed.is_none() {
            let p = if self.pol.hp_load_tuned {
                let t = self.vcpus[v as usize].thread;
                let c = self.threads[t as usize].cpu;
                haltpoll::tuned_for_load(&self.pol.hp_params, self.cpus[c as usize].load_pm)
            } else {
                self.pol.hp_params
            };
            let w = self.vcpus[v as usize].hp_window;
            self.vcpus[v as usize].hp_window = haltpoll::after_block(&p, w, block, true);
        }
    }

    /// Something for the vCPU to do arrived: end its halt.
    fn vcpu_kick(&mut self, v: u32) {
        match self.vcpus[v as usize].halt {
            Halt::Poll { start, .. } => {
                let t = self.vcpus[v as usize].thread;
                let c = self.threads[t as usize].cpu;
                self.account(c);
                self.halt_ended(v, start);
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
                let vc = &mut self.vcpus[v as usize];
                vc.halt = Halt::None;
                vc.ovh_rem += self.wake_cost;
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
    fn sync_vcpu(&mut self, v: u32) {
        let t = self.vcpus[v as usize].thread;
        if self.threads[t as usize].state == TState::Running {
            let c = self.threads[t as usize].cpu;
            self.account(c);
        }
    }

    fn vcpu_running(&self, v: u32) -> bool {
        let t = self.vcpus[v as usize].thread;
        self.threads[t as usize].state == TState::Running
    }

    /// Whether the host would report the vCPU as preempted (runnable, not running).
    fn vcpu_preempted(&self, v: u32) -> bool {
        let t = self.vcpus[v as usize].thread;
        self.threads[t as usize].state == TState::Runnable
            && matches!(self.vcpus[v as usize].halt, Halt::None)
    }

    /// Raises an interrupt on vCPU `v` that wakes `task` (or none: a kick).
    fn deliver(&mut self, v: u32, task: u32, cost: Nanos) {
        self.sync_vcpu(v);
        let vc = &mut self.vcpus[v as usize];
        vc.irq_rem += cost.max(1);
        vc.irq_count += 1;
        if task != NONE {
            vc.pending.push(task);
        }
        self.vcpu_kick(v);
    }

    /// The interrupt handler finished: the woken tasks join the run queue.
    fn irq_done(&mut self, v: u32) {
        let mut pending = std::mem::take(&mut self.vcpus[v as usize].pending);
        for &task in &pending {
            self.enqueue_task(v, task);
        }
        pending.clear();
        self.vcpus[v as usize].pending = pending;
    }

    // ------------------------------------------------------------------
    // Guest scheduler
    // ------------------------------------------------------------------

    fn enqueue_task(&mut self, v: u32, task: u32) {
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

    fn guest_resched(&mut self, v: u32) {
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
    fn guest_newidle(&mut self, v: u32) -> bool {
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

    fn vcpu_idle(&self, v: u32) -> bool {
        let vc = &self.vcpus[v as usize];
        vc.curr == NONE && vc.rt_rq.is_empty() && vc.fair_rq.is_empty() && vc.pending.is_empty()
    }

    /// Where a waking task goes.
    fn select_vcpu(&self, task: u32) -> u32 {
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
    fn guest_wake(&mut self, task: u32, from: u32) {
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

    fn task_block(&mut self, task: u32) {
        let t = &mut self.tasks[task as usize];
        t.phase = Phase::Blocked;
        t.state = GState::Sleeping;
        let v = t.vcpu;
        if self.vcpus[v as usize].curr == task {
            self.vcpus[v as usize].curr = NONE;
        }
    }

    fn task_timer(&mut self, task: u32) {
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
                t.phase = Phase::Work { rem: work };
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
    fn task_advance(&mut self, task: u32) {
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

    /// Critical-section entries counted on vCPU `v`.
    fn cs_enter(&mut self, v: u32) {
        let vc = &mut self.vcpus[v as usize];
        vc.cs_count = vc.cs_count.wrapping_add(1);
    }

    /// Critical-section depth of the vCPU: its current task's.
    fn cs_depth(&self, v: u32) -> u32 {
        let c = self.vcpus[v as usize].curr;
        if c == NONE {
            return 0;
        }
        u32::from(matches!(
            self.tasks[c as usize].phase,
            Phase::Cs { .. } | Phase::MutexCs { .. }
        ))
    }

    fn spin_check_interval(&self, vm: usize) -> Nanos {
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

    fn spin_acquire(&mut self, task: u32, l: u32, cs: Nanos) {
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
    fn yield_to_holder(&mut self, v: u32, hv: u32) {
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

    fn spin_release(&mut self, task: u32, l: u32, cs: Nanos) {
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
    fn spin_check(&mut self, v: u32, task: u32) {
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
    fn pause_loop_exit(&mut self, v: u32, holder: u32) {
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

    // ------------------------------------------------------------------
    // Emulator: I/O paths and the global lock
    // ------------------------------------------------------------------

    fn bql_held_by_vcpu(&self, v: u32) -> bool {
        let vm = self.vcpus[v as usize].vm as usize;
        self.vms[vm].bql_holder == self.vcpus[v as usize].thread
    }

    fn vcpu_exit_bql(&mut self, v: u32) {
        let vm = self.vcpus[v as usize].vm as usize;
        let t = self.vcpus[v as usize].thread;
        self.vcpus[v as usize].next_exit = Nanos::MAX;
        if self.vms[vm].bql_holder == NONE {
            self.vms[vm].bql_holder = t;
            self.vcpus[v as usize].exit_rem = self.vms[vm].bql_exit;
        } else {
            self.vms[vm].bql_waiters.push_back(t);
            self.vcpus[v as usize].bql_wait = true;
            self.block_running(t);
        }
    }

    fn bql_release(&mut self, vm: u32) {
        let m = &mut self.vms[vm as usize];
        let Some(w) = m.bql_waiters.pop_front() else {
            m.bql_holder = NONE;
            return;
        };
        m.bql_holder = w;
        let exit = m.bql_exit;
        match self.threads[w as usize].role {
            Role::Vcpu { vcpu } => {
                let vc = &mut self.vcpus[vcpu as usize];
                vc.bql_wait = false;
                vc.exit_rem = exit;
                self.host_wake(w);
            }
            Role::Emu { .. } => {
                let io = self.vms[vm as usize].io_emu;
                self.threads[w as usize].rem = io;
                self.host_wake(w);
            }
            _ => {}
        }
    }

    fn emu_push(&mut self, vm: u32, item: EmuItem) {
        let m = &mut self.vms[vm as usize];
        m.emu_queue.push_back(item);
        let t = m.emu_thread;
        if t != NONE && self.threads[t as usize].state == TState::Blocked && m.emu_item.is_none() {
            self.emu_next(vm, t, false);
        }
    }

    /// Starts the next queued item on the emulator thread (which is blocked or running).
    fn emu_next(&mut self, vm: u32, t: u32, running: bool) {
        let m = &mut self.vms[vm as usize];
        let Some(item) = m.emu_queue.pop_front() else {
            m.emu_item = None;
            if running {
                self.block_running(t);
            }
            return;
        };
        m.emu_item = Some(item);
        let io = m.io_emu;
        if m.io_path == IoPath::MainLoop {
            if m.bql_holder == NONE {
                m.bql_holder = t;
            } else if m.bql_holder != t {
                m.bql_waiters.push_back(t);
                if running {
                    self.block_running(t);
                }
                return;
            }
        }
        self.threads[t as usize].rem = io;
        if !running {
            self.host_wake(t);
        }
    }

    fn emu_item_done(&mut self, vm: u32, t: u32) {
        let m = &mut self.vms[vm as usize];
        let Some(item) = m.emu_item.take() else {
            self.block_running(t);
            return;
        };
        if m.io_path == IoPath::MainLoop && m.bql_holder == t {
            self.bql_release(vm);
        }
        match item {
            EmuItem::Submit(task) => {
                let Kind::Io { device, .. } = self.tasks[task as usize].kind else {
                    return;
                };
                self.q.push(self.now + device, Ev::IoDone { task });
            }
            EmuItem::Complete(task) => {
                let v = self.tasks[task as usize].vcpu;
                let cost = self.vms[vm as usize].irq_ns;
                self.io_wake(task, v, cost);
            }
        }
        self.emu_next(vm, t, true);
    }

    fn io_done(&mut self, task: u32) {
        let vm = self.tasks[task as usize].vm;
        if self.vms[vm as usize].io_path == IoPath::Irq {
            let v = self.tasks[task as usize].vcpu;
            let cost = self.vms[vm as usize].irq_ns;
            self.io_wake(task, v, cost);
        } else {
            self.emu_push(vm, EmuItem::Complete(task));
        }
    }

    fn io_wake(&mut self, task: u32, v: u32, cost: Nanos) {
        let t = &mut self.tasks[task as usize];
        let Kind::Io { think, .. } = t.kind else {
            return;
        };
        t.phase = Phase::Work {
            rem: self.rng.exp(think).max(1),
        };
        let t = &mut self.tasks[task as usize];
        t.sample_on_run = true;
        t.state = GState::Runnable;
        self.deliver(v, task, cost);
    }

    // ------------------------------------------------------------------
    // The pvsched daemon
    // ------------------------------------------------------------------

    /// The guest line the simulated guest module would publish for vCPU `v`.
    fn published(&self, v: u32) -> GuestVcpuState {
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
            s.cs_depth = self.cs_depth(v);
            s.cs_count = vc.cs_count;
            s.spin_count = vc.spin_count;
        }
        s
    }

    /// One tick of the VM's daemon: the guest module publishes what changed,
    /// the limit checker takes its sample, and the daemon's controller runs
    /// over the region, the simulated threads and the host budget.
    fn engine_step(&mut self, vm: u32) {
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
                guest_features: PVSCHED_FEAT_KNOWN,
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
        for i in 0..n {
            let v = first + i;
            let t = self.vcpus[v as usize].thread;
            let run = run_ns(&self.threads[t as usize], &self.cpus, now);
            // Limit check: CPU used since the last step under a boosted decision.
            let used = run - e.last_run[i as usize];
            e.last_run[i as usize] = run;
            let i = i as usize;
            if e.decided[i] != ThreadSched::Baseline {
                e.boosted_cum[i] += used;
                // As the engine: a thread off-CPU for over a tenth of the
                // interval yielded, and its continuous run restarts.
                let wall = now - e.last_step;
                if wall > 0 && used * 10 < wall * 9 {
                    e.continuous[i] = used;
                } else {
                    e.continuous[i] += used;
                }
                if e.continuous[i] > e.spec.engine.max_continuous_ns {
                    self.limits.continuous += 1;
                }
            } else {
                e.continuous[i] = 0;
            }
            let w = e.spec.engine.budget_window_ns;
            let h = &mut e.history[i];
            h.push_back((now, e.boosted_cum[i]));
            while h.len() > 1 && h[0].0 < now.saturating_sub(w) {
                h.pop_front();
            }
            if e.boosted_cum[i] - h[0].1 > e.spec.engine.budget_ns {
                self.limits.budget += 1;
            }
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
            threads: &self.threads,
            cpus: &self.cpus,
            vcpus: &self.vcpus[first as usize..][..n as usize],
            path_thread: e.path_thread,
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
                guest_memory: None,
            },
        );
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

    // ------------------------------------------------------------------
    // Invariants (tests)
    // ------------------------------------------------------------------

    fn check_invariants(&mut self) {
        if self.violations.len() > 8 {
            return;
        }
        let mut seen = vec![0u8; self.threads.len()];
        let mut errs = Vec::new();
        for (c, cpu) in self.cpus.iter().enumerate() {
            if cpu.curr != NONE {
                let th = &self.threads[cpu.curr as usize];
                seen[cpu.curr as usize] += 1;
                if th.state != TState::Running || th.cpu != c as u32 {
                    errs.push(format!(
                        "t={} pCPU {c}: current thread {} is {:?} on {}",
                        self.now, cpu.curr, th.state, th.cpu
                    ));
                }
                if th.affinity & (1 << c) == 0 {
                    errs.push(format!(
                        "t={} thread {} runs outside its affinity",
                        self.now, cpu.curr
                    ));
                }
            }
            let idle = cpu.curr == NONE && cpu.fair_rq.is_empty() && cpu.rt_rq.is_empty();
            if idle != (self.idle_mask & (1 << c) != 0) {
                errs.push(format!("t={} pCPU {c}: idle mask out of date", self.now));
            }
            for &t in cpu.fair_rq.iter().chain(&cpu.rt_rq) {
                seen[t as usize] += 1;
                let th = &self.threads[t as usize];
                if th.state != TState::Runnable || th.cpu != c as u32 {
                    errs.push(format!(
                        "t={} pCPU {c}: queued thread {t} is {:?} on {}",
                        self.now, th.state, th.cpu
                    ));
                }
            }
        }
        for (t, th) in self.threads.iter().enumerate() {
            let expect = u8::from(th.state != TState::Blocked);
            if seen[t] != expect {
                errs.push(format!(
                    "t={} thread {t} ({:?}) appears {} times on pCPUs",
                    self.now, th.state, seen[t]
                ));
            }
        }
        let mut tseen = vec![0u8; self.tasks.len()];
        for (v, vc) in self.vcpus.iter().enumerate() {
            if vc.curr != NONE {
                tseen[vc.curr as usize] += 1;
                let t = &self.tasks[vc.curr as usize];
                if t.state != GState::Running || t.vcpu != v as u32 {
                    errs.push(format!(
                        "t={} vCPU {v}: current task {} is {:?} on {}",
                        self.now, vc.curr, t.state, t.vcpu
                    ));
                }
            }
            for &x in vc
                .rt_rq
                .iter()
                .chain(vc.fair_rq.iter())
                .chain(vc.pending.iter())
            {
                tseen[x as usize] += 1;
            }
            let th = &self.threads[vc.thread as usize];
            if th.state == TState::Running && matches!(vc.halt, Halt::Blocked { .. }) {
                errs.push(format!(
                    "t={} vCPU {v} runs while blocked in halt",
                    self.now
                ));
            }
        }
        for (x, t) in self.tasks.iter().enumerate() {
            if tseen[x] > 1 {
                errs.push(format!(
                    "t={} task {x} is on {} vCPUs at once",
                    self.now, tseen[x]
                ));
            }
            if t.state == GState::Running && tseen[x] != 1 {
                errs.push(format!(
                    "t={} running task {x} is current nowhere",
                    self.now
                ));
            }
        }
        for vm in &self.vms {
            for l in &vm.locks {
                if l.holder != NONE
                    && !matches!(self.tasks[l.holder as usize].phase, Phase::Cs { .. })
                {
                    errs.push(format!(
                        "t={} lock holder {} not in a critical section",
                        self.now, l.holder
                    ));
                }
                for &w in &l.waiters {
                    if !matches!(self.tasks[w as usize].phase, Phase::Spin { .. }) {
                        errs.push(format!("t={} lock waiter {w} not spinning", self.now));
                    }
                }
            }
        }
        self.violations.extend(errs);
    }
}

/// How often the simulated guest module moves its header heartbeat.
const GUEST_HEARTBEAT_NS: Nanos = 4_000_000;

/// The `vcpu` value of an [`Ev::Apply`] aimed at the interrupt-delivery thread.
const PATH_SLOT: u32 = (1 << 20) - 1;

/// Cumulative CPU time of a simulated thread at `now`.
fn run_ns(th: &Thread, cpus: &[Cpu], now: Nanos) -> Nanos {
    let mut run = th.exec;
    if th.state == TState::Running {
        run += now - cpus[th.cpu as usize].seg_start;
    }
    run
}

/// The daemon's view of simulated threads' CPU time (its `/proc`).
struct SimClock<'a> {
    now: Nanos,
    threads: &'a [Thread],
    cpus: &'a [Cpu],
    /// The VM's vCPUs, by slot.
    vcpus: &'a [Vcpu],
    path_thread: u32,
}

impl CpuClock for SimClock<'_> {
    fn sample(&mut self, thread: VmThread, with_stat: bool) -> Sampled {
        let t = match thread {
            VmThread::Vcpu(slot) => match self.vcpus.get(slot as usize) {
                Some(v) => v.thread,
                None => return Sampled::Gone,
            },
            VmThread::InterruptPath if self.path_thread != NONE => self.path_thread,
            VmThread::InterruptPath => return Sampled::NoSource,
        };
        let th = &self.threads[t as usize];
        Sampled::Fresh(CpuSample {
            run_ns: run_ns(th, self.cpus, self.now),
            // Run delay is not modelled: no vCPU is reported preempted.
            wait_ns: 0,
            // The model's run time is exact: no tick lag to tell from a yield.
            slices: None,
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
struct SimActuator<'a> {
    vm: u32,
    now: Nanos,
    delay: Nanos,
    decided: &'a mut [ThreadSched],
    continuous: &'a mut [Nanos],
    q: &'a mut EventQueue,
    hash: &'a mut TraceHash,
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
struct SimHost<'a>(&'a [Cpu]);

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
