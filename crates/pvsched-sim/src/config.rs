//! The scenario format: host, VMs, guest tasks and the policies to compare.
//!
//! Every struct reads from TOML with defaults for omitted keys and refuses
//! unknown keys. Durations carry their unit in the key (`_us`, `_ms`, `_ns`).

use pvsched_policy::PolicyConfig;
use serde::{Deserialize, Serialize};

use crate::Nanos;

/// A simulation scenario: one host (or a fleet of identical hosts), its VMs,
/// and the policies to run it under.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Name printed in tables and JSON.
    pub name: String,
    /// One line on what the scenario shows.
    pub description: String,
    /// Simulated time measured, after the warm-up.
    pub duration_ms: u64,
    /// Simulated time before statistics start.
    pub warmup_ms: u64,
    /// `together`: all VMs share the host in one run; `each`: every VM runs
    /// alone on the host (with the same background load), one run per VM.
    pub mode: RunMode,
    /// The host.
    pub host: HostConfig,
    /// The VMs.
    pub vms: Vec<VmConfig>,
    /// Policies to compare; one result row set per policy.
    pub policies: Vec<PolicySpec>,
    /// Identical hosts simulated in parallel (fleet mode), each with all of `vms`.
    pub hosts: u32,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "custom".into(),
            description: String::new(),
            duration_ms: 1000,
            warmup_ms: 100,
            mode: RunMode::Together,
            host: HostConfig::default(),
            vms: Vec::new(),
            policies: vec![PolicySpec::default()],
            hosts: 1,
        }
    }
}

/// How the VMs of a scenario share the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    /// All VMs at once.
    #[default]
    Together,
    /// Each VM alone.
    Each,
}

/// The host machine and its scheduler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Number of pCPUs (at most 64).
    pub pcpus: u32,
    /// pCPUs `2k` and `2k+1` are SMT siblings.
    pub smt: bool,
    /// Speed of a pCPU while its sibling is busy (1.0 = no slowdown).
    pub smt_factor: f64,
    /// Fair class: targeted latency (`sched_latency_ns`).
    pub sched_latency_us: u64,
    /// Fair class: minimum granularity.
    pub min_granularity_us: u64,
    /// Fair class: wakeup granularity.
    pub wakeup_granularity_us: u64,
    /// Fair class: how far behind the queue's minimum vruntime a waking thread
    /// is placed. 0 (default) is EEVDF-like placement without sleeper credit;
    /// CFS with `GENTLE_FAIR_SLEEPERS` used half of `sched_latency`.
    pub sleeper_credit_us: u64,
    /// RT throttling period (`sched_rt_period_us`).
    pub rt_period_us: u64,
    /// RT runtime per period (`sched_rt_runtime_us`; 0 or >= period: no throttling).
    pub rt_runtime_us: u64,
    /// SCHED_RR time slice.
    pub rr_slice_us: u64,
    /// Cost of waking a blocked vCPU thread until the guest runs again
    /// (host wakeup, context switch, VM entry, idle exit), in ns.
    pub vcpu_wake_cost_ns: u64,
    /// Cost of leaving a halt-poll that caught the wakeup, in ns.
    pub poll_exit_cost_ns: u64,
    /// A pCPU idle for longer than `idle_poll_us` takes this long to run the next
    /// thread (a deep C-state's exit, or on a host that is itself a VM the outer
    /// hypervisor waking its halted vCPU), in ns; 0: off.
    pub idle_exit_ns: u64,
    /// Idle up to this long, a pCPU wakes at once (the outer hypervisor's
    /// halt-polling, a shallow C-state), µs.
    pub idle_poll_us: u64,
    /// Host scheduler tick (1000 for HZ=1000, 4000 for HZ=250): a running thread's CPU time in
    /// `/proc/<pid>/task/<tid>/schedstat` is brought up to date at ticks and at
    /// scheduling events on its pCPU, so the daemon's samples lag by up to this.
    pub sched_tick_us: u64,
    /// Background host load (stress-ng, other tenants).
    pub load: Vec<LoadSpec>,
    /// Kernel noise sources on every pCPU (seed 001).
    pub noise: NoiseSpec,
    /// A host latency probe (cyclictest on the host).
    pub latency_probe: Option<ProbeSpec>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            pcpus: 4,
            smt: false,
            smt_factor: 0.65,
            sched_latency_us: 6000,
            min_granularity_us: 750,
            wakeup_granularity_us: 1000,
            sleeper_credit_us: 0,
            rt_period_us: 1_000_000,
            rt_runtime_us: 950_000,
            rr_slice_us: 100_000,
            vcpu_wake_cost_ns: 6_000,
            poll_exit_cost_ns: 400,
            idle_exit_ns: 0,
            idle_poll_us: 0,
            sched_tick_us: 1_000,
            load: Vec::new(),
            noise: NoiseSpec::default(),
            latency_probe: None,
        }
    }
}

/// Host threads that burn CPU in bursts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadSpec {
    /// Label.
    pub name: String,
    /// Number of threads.
    pub threads: u32,
    /// Fraction of time each thread wants the CPU (0..=1; 1 = never sleeps).
    pub duty: f64,
    /// Mean burst length (exponential).
    pub burst_us: u64,
    /// Nice value (fair class).
    pub nice: i8,
    /// SCHED_FIFO priority instead of the fair class.
    pub rt_prio: Option<u8>,
    /// Allowed pCPUs (`"0-3,6"`); all when omitted.
    pub cpus: Option<String>,
}

impl LoadSpec {
    /// `threads` fair-class threads, each wanting the CPU `duty` of the time in bursts of
    /// `burst_us` on average (a stress-ng stressor, as the scenarios model them).
    pub fn duty(name: &str, threads: u32, duty: f64, burst_us: u64) -> LoadSpec {
        LoadSpec {
            name: name.into(),
            threads,
            duty,
            burst_us,
            ..LoadSpec::default()
        }
    }
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            name: "load".into(),
            threads: 1,
            duty: 1.0,
            burst_us: 4000,
            nice: 0,
            rt_prio: None,
            cpus: None,
        }
    }
}

/// Kernel noise per pCPU: 0 disables a source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseSpec {
    /// Scheduler tick period (e.g. 4000 for HZ=250).
    pub tick_period_us: u64,
    /// Tick handler duration, ns.
    pub tick_ns: u64,
    /// Mean gap between device interrupts.
    pub irq_gap_us: u64,
    /// Device interrupt handler duration, ns.
    pub irq_ns: u64,
    /// Mean gap between softirq bursts (timer, net, block, RCU), run at interrupt exit.
    pub softirq_gap_us: u64,
    /// Mean softirq burst, ns.
    pub softirq_ns: u64,
    /// Mean gap between kworker bursts (fair class).
    pub kworker_gap_us: u64,
    /// Mean kworker burst, ns.
    pub kworker_ns: u64,
}

/// A periodic host thread that measures its own wakeup latency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeSpec {
    /// Period.
    pub interval_us: u64,
    /// SCHED_FIFO priority; fair class (nice 0) when omitted.
    pub rt_prio: Option<u8>,
    /// pCPUs with one probe thread each; all when omitted.
    pub cpus: Option<String>,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        ProbeSpec {
            interval_us: 1000,
            rt_prio: None,
            cpus: None,
        }
    }
}

/// One VM (or `count` identical VMs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// Name in tables (`-N` is appended for replicas).
    pub name: String,
    /// Number of identical VMs.
    pub count: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// vCPU `i` pinned to pCPU `pin[i % len]`; floating over all pCPUs when empty.
    pub pin: Vec<u32>,
    /// Guest tasks.
    pub tasks: Vec<TaskSpec>,
    /// Guest fair time slice.
    pub guest_slice_us: u64,
    /// Guest interrupt handler cost, ns.
    pub irq_ns: u64,
    /// PV spinlock: spin this long (guest time) before halting (`pv_wait`).
    pub spin_threshold_us: u64,
    /// Pause-loop exiting: exit after spinning this long (0: off).
    pub ple_us: u64,
    /// I/O path of the VM's `io` tasks.
    pub io_path: IoPath,
    /// Emulator CPU per request (submission and completion, each), ns.
    pub io_emu_ns: u64,
    /// pCPUs of the emulator main loop / I/O thread; all when omitted.
    pub emu_cpus: Option<String>,
    /// A vCPU exits to the emulator under the global lock after this much guest time (0: never).
    pub bql_exit_interval_us: u64,
    /// Emulator work per such exit, under the global lock, ns.
    pub bql_exit_ns: u64,
    /// Guest timer tick period on a busy vCPU (4000 for HZ=250); the guest module
    /// samples its critical-section signal at each tick (the tick's own cost is not
    /// modelled). Idle vCPUs have no tick (`NO_HZ_IDLE`).
    pub guest_tick_us: u64,
    /// How the guest is executed: hardware virtualization or emulation.
    pub accel: Accel,
}

/// The accelerator that runs a VM's guest code.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Accel {
    /// KVM: guest timers are armed in the kernel and fire on the vCPU thread,
    /// a halt blocks in the kernel after halt-polling, pause loops exit (PLE).
    #[default]
    Kvm,
    /// TCG (multi-threaded, one host thread per vCPU): QEMU's main-loop thread
    /// fires the guest's timers and device interrupts and kicks the vCPU thread,
    /// guest code is translated (slower, and its cost varies); no halt-polling and
    /// no pause-loop exits.
    Tcg(TcgSpec),
}

/// Costs of TCG emulation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcgSpec {
    /// Mean main-loop CPU per guest timer or device interrupt it delivers, ns
    /// (exponentially distributed: the main loop's timer-list and event work).
    pub main_loop_ns: u64,
    /// Guest time of translated code against native: guest interrupt handling and
    /// the work of periodic tasks are multiplied by this.
    pub translation_factor: f64,
    /// Relative spread of translated work (0: constant; 1: exponential).
    pub translation_jitter: f64,
}

impl Default for TcgSpec {
    fn default() -> Self {
        TcgSpec {
            main_loop_ns: 30_000,
            translation_factor: 10.0,
            translation_jitter: 0.5,
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: "vm".into(),
            count: 1,
            vcpus: 4,
            pin: Vec::new(),
            tasks: Vec::new(),
            guest_slice_us: 3000,
            irq_ns: 1500,
            spin_threshold_us: 60,
            ple_us: 20,
            io_path: IoPath::Irq,
            io_emu_ns: 15_000,
            emu_cpus: None,
            bql_exit_interval_us: 0,
            bql_exit_ns: 5_000,
            guest_tick_us: 4_000,
            accel: Accel::Kvm,
        }
    }
}

/// How an I/O request reaches the device and its completion the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoPath {
    /// Directly (vhost, passthrough): completion is an interrupt after the device time.
    #[default]
    Irq,
    /// Through the emulator's main loop, under the global lock.
    MainLoop,
    /// Through a dedicated I/O thread, without the global lock.
    IoThread,
}

/// A group of identical guest tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskSpec {
    /// Label and score key.
    pub name: String,
    /// What the task does.
    pub kind: TaskKind,
    /// Number of tasks; `per_vcpu` multiplies by the vCPU count.
    pub count: u32,
    /// `count` tasks per vCPU, task `i` starting on vCPU `i % vcpus`.
    pub per_vcpu: bool,
    /// Guest RT priority (SCHED_FIFO); 0 = fair class.
    pub rt_prio: u8,
    /// Keep the task on its starting vCPU.
    pub pinned: bool,
    /// Start every task of the group on this vCPU (else spread).
    pub vcpu: Option<u32>,
    /// Record this task's latency samples in the VM's percentiles.
    pub measure: Option<bool>,
    /// Count this task's operations in the VM's score.
    pub score: bool,
}

impl Default for TaskSpec {
    fn default() -> Self {
        TaskSpec {
            name: "task".into(),
            kind: TaskKind::Cpu { chunk_us: 1000 },
            count: 1,
            per_vcpu: false,
            rt_prio: 0,
            pinned: false,
            vcpu: None,
            measure: None,
            score: true,
        }
    }
}

/// Guest task behaviours.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TaskKind {
    /// CPU-bound: chunks of work forever (latency sample: wall time per chunk).
    Cpu {
        /// Work per chunk (one operation).
        chunk_us: u64,
    },
    /// Bursts of work separated by sleeps (exponential).
    Burst {
        /// Mean burst.
        run_us: u64,
        /// Mean sleep.
        sleep_us: u64,
    },
    /// Compute, then take a kernel spinlock for a critical section, `cs_per_op`
    /// times per operation (fork/exec-like paths take several).
    Spin {
        /// Mean compute between critical sections.
        compute_us: u64,
        /// Critical-section length, ns.
        cs_ns: u64,
        /// Number of locks the task picks from (1 = one global lock).
        locks: u32,
        /// Critical sections per operation.
        cs_per_op: u32,
    },
    /// Compute, then take a sleeping mutex.
    Mutex {
        /// Mean compute between critical sections.
        compute_us: u64,
        /// Critical section, ns.
        cs_ns: u64,
        /// Number of mutexes.
        locks: u32,
    },
    /// Ping-pong through a pipe with a partner (tasks pair up in order).
    Pipe {
        /// Work per message, ns.
        work_ns: u64,
    },
    /// Periodic RT wakeups, like cyclictest (latency sample: wakeup latency).
    Periodic {
        /// Period.
        interval_us: u64,
        /// Work per wakeup, ns.
        work_ns: u64,
    },
    /// hackbench (rt-tests, processes over Unix sockets): `count` groups of `fds`
    /// senders and `fds` receivers; every sender writes `loops` messages to every
    /// receiver of its group, each write taking the receiver's socket spinlock and
    /// waking it when it sleeps in `read`; a receiver reads under the same lock and
    /// sleeps when its socket is empty. A round ends when every process is done;
    /// the parent then forks the next round's processes one after the other. One
    /// operation of the score is one message received.
    Hackbench {
        /// Senders (and receivers) per group (`--fds`).
        fds: u32,
        /// Messages each sender writes to each receiver of its group (`--loops`).
        loops: u32,
        /// Guest CPU of a write outside the socket lock, ns.
        send_ns: u64,
        /// Guest CPU of a read outside the socket lock, ns.
        recv_ns: u64,
        /// Socket spinlock section of a write or a read, ns.
        cs_ns: u64,
        /// The parent's CPU to fork (and later reap) one process, µs.
        fork_us: u64,
    },
    /// Synchronous I/O: submit, wait for the completion interrupt, think.
    Io {
        /// Guest CPU to submit, ns.
        submit_ns: u64,
        /// Device time.
        device_us: u64,
        /// Mean compute between requests.
        think_us: u64,
    },
}

/// A policy: orthogonal knobs, all off in `vanilla`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySpec {
    /// Name in tables.
    pub name: String,
    /// vCPU threads always SCHED_RR at this priority (static RT).
    pub static_rt_prio: Option<u8>,
    /// The pvsched engine, stepped by a simulated daemon.
    pub pvsched: Option<PvschedSpec>,
    /// Kunpeng-V: extra host slice for a vCPU in a critical section at slice end, µs (0: off).
    pub cs_extra_slice_us: u64,
    /// Whom a pause-loop exit yields to.
    pub directed_yield: DirectedYield,
    /// Guest spinners halt at once when the lock holder's vCPU is preempted and
    /// spin longer otherwise (host publishes preempted state and pCPU load).
    pub load_aware_spin: bool,
    /// Host places waking vCPU threads on idle cores before idle SMT siblings.
    pub smt_aware: bool,
    /// Halt-polling.
    pub halt_poll: HaltPollSpec,
    /// CPU isolation of pinned vCPUs (seed 001).
    pub isolation: Option<IsolationSpec>,
    /// Guest placement avoids preempted vCPUs (`vcpu_is_preempted`).
    pub guest_preempt_aware: bool,
    /// Overrides every VM's I/O path (seed 004).
    pub io_path: Option<IoPath>,
    /// Overrides every VM's emulator/I/O thread pCPUs.
    pub emu_cpus: Option<String>,
    /// The emulator's main-loop thread always SCHED_FIFO at this priority (with
    /// `static_rt_prio`: every QEMU thread RT).
    pub emulator_rt_prio: Option<u8>,
}

impl Default for PolicySpec {
    fn default() -> Self {
        PolicySpec {
            name: "vanilla".into(),
            static_rt_prio: None,
            pvsched: None,
            cs_extra_slice_us: 0,
            directed_yield: DirectedYield::Kvm,
            load_aware_spin: false,
            smt_aware: false,
            halt_poll: HaltPollSpec::default(),
            isolation: None,
            guest_preempt_aware: true,
            io_path: None,
            emu_cpus: None,
            emulator_rt_prio: None,
        }
    }
}

/// Target of KVM's directed yield on a pause-loop exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectedYield {
    /// No yield.
    None,
    /// KVM: the next preempted vCPU of the VM, round robin.
    #[default]
    Kvm,
    /// Kunpeng-V: the preempted vCPU with the largest critical-section count.
    MaxCount,
}

/// The simulated daemon around the engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PvschedSpec {
    /// Daemon period.
    pub period_us: u64,
    /// Delay between a decision and its effect on the thread, ns.
    pub apply_delay_ns: u64,
    /// Interval of the daemon's slow tick (every thread sampled, every host
    /// line republished), as the daemon's `host_info_ms`.
    pub host_info_us: u64,
    /// The guest publishes an armed RT timer as pending RT work while idle
    /// ("boost while halted with RT work pending").
    pub hint_rt_timers: bool,
    /// The guest publishes a critical-section signal (see `cs_signal`).
    pub hint_critical_sections: bool,
    /// What the guest's critical-section signal is: `sampled` (the guest module: the
    /// preempt-disable depth of the context its interrupts and timer ticks interrupt,
    /// cleared at the next context switch) or `exact` (a guest with lock hints: the
    /// depth at the moment the daemon reads it, every entry counted, spin counts).
    pub cs_signal: CsSignal,
    /// The host reads each vCPU's preempt count from guest RAM (`GuestMemory`: guest
    /// memory on a shared backend), as the lab's `pvsched-introspect` does.
    pub introspection: bool,
    /// What-if: the daemon's run-delay samples include a wait in progress. Linux's
    /// `schedstat` adds a wait only when it ends (the thread gets a CPU), so a
    /// daemon learns that a vCPU was preempted once it runs again; no kernel
    /// interface reports the live figure. Off by default.
    pub live_run_delay: bool,
    /// Engine configuration.
    pub engine: PolicyConfig,
}

impl Default for PvschedSpec {
    fn default() -> Self {
        PvschedSpec {
            period_us: 1000,
            apply_delay_ns: 10_000,
            host_info_us: 100_000,
            hint_rt_timers: true,
            hint_critical_sections: true,
            cs_signal: CsSignal::Sampled,
            introspection: false,
            live_run_delay: false,
            engine: PolicyConfig::default(),
        }
    }
}

/// The critical-section signal a guest publishes in its lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsSignal {
    /// The guest module: at each interrupt and timer tick, the preempt-disable
    /// depth of the interrupted context (a spinlock held or waited for), cleared at
    /// the next context switch; `cs_count` counts non-zero samples. No spin counts.
    #[default]
    Sampled,
    /// A guest with lock hints: the depth of the current task at the moment the
    /// line is read (spinlock and mutex sections), every entry counted, spin counts.
    Exact,
}

/// Halt-polling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum HaltPollSpec {
    /// Poll a fixed window after every halt (0: never).
    Fixed {
        /// Window, ns.
        ns: u32,
    },
    /// KVM's adaptive grow/shrink (`pvsched_policy::haltpoll::after_block`).
    Adaptive {
        /// `kvm-current`, `kvm-legacy` or `guest-haltpoll`.
        preset: String,
        /// Cap (`halt_poll_ns`).
        max_ns: u32,
    },
    /// KVM's adaptive window under host parameters that the daemon's
    /// controller (`pvsched_policy::haltpoll::decide`, what `pvsched hostd`
    /// runs with `halt_poll = "tune"`) sets every `interval_us` from the
    /// simulated host load and KVM polling statistics. Starts from KVM's
    /// defaults.
    Controller {
        /// Interval between rounds, as the daemon's `host_info_ms` (the
        /// cadence at which it reads `query-stats`).
        #[serde(default = "default_controller_interval_us")]
        interval_us: u64,
        /// The daemon's `[daemon.halt_poll_bounds]`.
        #[serde(default)]
        bounds: pvsched_policy::HaltPollBounds,
    },
}

/// The daemon's default `host_info_ms` (100 ms), in µs.
pub fn default_controller_interval_us() -> u64 {
    100_000
}

impl HaltPollSpec {
    /// The controller with the daemon's defaults.
    pub fn controller() -> Self {
        HaltPollSpec::Controller {
            interval_us: default_controller_interval_us(),
            bounds: pvsched_policy::HaltPollBounds::default(),
        }
    }
}

impl Default for HaltPollSpec {
    fn default() -> Self {
        HaltPollSpec::Adaptive {
            preset: "kvm-current".into(),
            max_ns: 200_000,
        }
    }
}

/// What isolating the pinned vCPUs' pCPUs removes from them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IsolationSpec {
    /// Host load and other threads leave (cpuset partition / isolcpus).
    pub cpuset: bool,
    /// No scheduler tick (`nohz_full`).
    pub nohz_full: bool,
    /// Device interrupts elsewhere (`irqaffinity`).
    pub irq_affinity: bool,
    /// Softirqs and RCU callbacks elsewhere (`rcu_nocbs`, threaded softirqs).
    pub softirqs: bool,
    /// Unbound kworkers elsewhere (workqueue cpumask).
    pub kworkers: bool,
    /// vCPU threads SCHED_FIFO at this priority.
    pub vcpu_fifo_prio: Option<u8>,
}

impl Default for IsolationSpec {
    fn default() -> Self {
        IsolationSpec {
            cpuset: true,
            nohz_full: true,
            irq_affinity: true,
            softirqs: true,
            kworkers: true,
            vcpu_fifo_prio: Some(50),
        }
    }
}

/// A scenario that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// TOML syntax or schema.
    #[error("scenario: {0}")]
    Toml(#[from] toml::de::Error),
    /// A CPU list that does not parse or names a missing pCPU.
    #[error("bad CPU list {list:?} for a host of {pcpus} pCPUs")]
    CpuList {
        /// The list.
        list: String,
        /// pCPUs of the host.
        pcpus: u32,
    },
    /// An inconsistent value.
    #[error("{0}")]
    Invalid(String),
    /// The engine refused its configuration.
    #[error("policy {policy}: {source}")]
    Engine {
        /// Policy name.
        policy: String,
        /// Why.
        source: pvsched_policy::ConfigError,
    },
}

impl Scenario {
    /// Reads a scenario from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// Checks what the model cannot run.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let h = &self.host;
        if h.pcpus == 0 || h.pcpus > 64 {
            return Err(ScenarioError::Invalid(format!(
                "host.pcpus must be 1..=64, got {}",
                h.pcpus
            )));
        }
        if !(0.05..=1.0).contains(&h.smt_factor) {
            return Err(ScenarioError::Invalid(
                "host.smt_factor must be in 0.05..=1".into(),
            ));
        }
        if h.sched_tick_us == 0 {
            return Err(ScenarioError::Invalid(
                "host.sched_tick_us must be > 0".into(),
            ));
        }
        if self.duration_ms == 0 {
            return Err(ScenarioError::Invalid("duration_ms must be > 0".into()));
        }
        if self.hosts == 0 || self.hosts > 100_000 {
            return Err(ScenarioError::Invalid("hosts must be 1..=100000".into()));
        }
        if self.policies.is_empty() {
            return Err(ScenarioError::Invalid("no policies".into()));
        }
        for l in &h.load {
            if !(0.0..=1.0).contains(&l.duty) || l.burst_us == 0 {
                return Err(ScenarioError::Invalid(format!(
                    "load {:?}: duty must be in 0..=1 and burst_us > 0",
                    l.name
                )));
            }
            cpu_mask(l.cpus.as_deref(), h.pcpus)?;
        }
        if let Some(p) = &h.latency_probe {
            cpu_mask(p.cpus.as_deref(), h.pcpus)?;
            if p.interval_us == 0 {
                return Err(ScenarioError::Invalid(
                    "latency_probe.interval_us must be > 0".into(),
                ));
            }
        }
        for vm in &self.vms {
            if vm.vcpus == 0 || vm.vcpus > 4096 {
                return Err(ScenarioError::Invalid(format!(
                    "vm {:?}: vcpus must be 1..=4096",
                    vm.name
                )));
            }
            if vm.pin.iter().any(|&c| c >= h.pcpus) {
                return Err(ScenarioError::Invalid(format!(
                    "vm {:?}: pin names a missing pCPU",
                    vm.name
                )));
            }
            cpu_mask(vm.emu_cpus.as_deref(), h.pcpus)?;
            if let Accel::Tcg(t) = &vm.accel {
                if !(1.0..=1000.0).contains(&t.translation_factor)
                    || !(0.0..=1.0).contains(&t.translation_jitter)
                    || t.main_loop_ns > 100_000_000
                {
                    return Err(ScenarioError::Invalid(format!(
                        "vm {:?}: accel.translation_factor must be 1..=1000, translation_jitter 0..=1, main_loop_ns <= 1e8",
                        vm.name
                    )));
                }
            }
            if vm.guest_tick_us == 0 {
                return Err(ScenarioError::Invalid(format!(
                    "vm {:?}: guest_tick_us must be > 0",
                    vm.name
                )));
            }
            for t in &vm.tasks {
                let zero = match t.kind {
                    TaskKind::Cpu { chunk_us } => chunk_us == 0,
                    TaskKind::Burst { run_us, .. } => run_us == 0,
                    TaskKind::Periodic { interval_us, .. } => interval_us == 0,
                    TaskKind::Spin {
                        locks, cs_per_op, ..
                    } => locks == 0 || cs_per_op == 0,
                    TaskKind::Mutex { locks, .. } => locks == 0,
                    TaskKind::Hackbench { fds, loops, .. } => fds == 0 || loops == 0,
                    _ => false,
                };
                if zero {
                    return Err(ScenarioError::Invalid(format!(
                        "vm {:?} task {:?}: a period, chunk or lock count is zero",
                        vm.name, t.name
                    )));
                }
                if t.vcpu.is_some_and(|v| v >= vm.vcpus) {
                    return Err(ScenarioError::Invalid(format!(
                        "task {:?}: vcpu out of range",
                        t.name
                    )));
                }
                if t.rt_prio > 99 {
                    return Err(ScenarioError::Invalid(format!(
                        "task {:?}: rt_prio > 99",
                        t.name
                    )));
                }
            }
        }
        for p in &self.policies {
            if let Some(pv) = &p.pvsched {
                pv.engine
                    .validate()
                    .map_err(|source| ScenarioError::Engine {
                        policy: p.name.clone(),
                        source,
                    })?;
                if pv.engine.rt_class == pvsched_policy::RtClass::Deadline {
                    // The model's scheduler has no deadline class (no CBS
                    // replenishment or throttling): refused, not approximated.
                    return Err(ScenarioError::Invalid(format!(
                        "policy {}: rt_class = \"deadline\" is not modelled by the simulator; \
                         measure it with `pvsched lab --configs pvsched-dl`",
                        p.name
                    )));
                }
                if pv.period_us == 0 {
                    return Err(ScenarioError::Invalid(format!(
                        "policy {}: period_us must be > 0",
                        p.name
                    )));
                }
                if pv.host_info_us == 0 {
                    return Err(ScenarioError::Invalid(format!(
                        "policy {}: host_info_us must be > 0",
                        p.name
                    )));
                }
            }
            match &p.halt_poll {
                HaltPollSpec::Adaptive { preset, .. } => {
                    if pvsched_policy::HaltPollParams::preset(preset).is_none() {
                        return Err(ScenarioError::Invalid(format!(
                            "policy {}: unknown halt-poll preset {preset:?}",
                            p.name
                        )));
                    }
                }
                HaltPollSpec::Controller {
                    interval_us,
                    bounds,
                } => {
                    // The daemon's own range for `host_info_ms` (1 ms to 60 s).
                    if !(1_000..=60_000_000).contains(interval_us) {
                        return Err(ScenarioError::Invalid(format!(
                            "policy {}: halt-poll interval_us = {interval_us} must be 1000..=60000000",
                            p.name
                        )));
                    }
                    bounds
                        .validate()
                        .map_err(|e| ScenarioError::Invalid(format!("policy {}: {e}", p.name)))?;
                }
                HaltPollSpec::Fixed { .. } => {}
            }
            cpu_mask(p.emu_cpus.as_deref(), h.pcpus)?;
            if matches!(p.static_rt_prio, Some(0) | Some(100..)) {
                return Err(ScenarioError::Invalid(format!(
                    "policy {}: static_rt_prio must be 1..=99",
                    p.name
                )));
            }
            if matches!(p.emulator_rt_prio, Some(0) | Some(100..)) {
                return Err(ScenarioError::Invalid(format!(
                    "policy {}: emulator_rt_prio must be 1..=99",
                    p.name
                )));
            }
        }
        Ok(())
    }

    /// Simulated time of one run (warm-up included).
    pub fn total_ns(&self) -> Nanos {
        (self.warmup_ms + self.duration_ms) * 1_000_000
    }
}

/// Parses a CPU list (`"0-3,6"`) into a bit mask; `None` is every pCPU.
pub fn cpu_mask(list: Option<&str>, pcpus: u32) -> Result<u64, ScenarioError> {
    let all = if pcpus >= 64 {
        u64::MAX
    } else {
        (1u64 << pcpus) - 1
    };
    let Some(list) = list else {
        return Ok(all);
    };
    let bad = || ScenarioError::CpuList {
        list: list.to_string(),
        pcpus,
    };
    let mut mask = 0u64;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: u32 = a.parse().map_err(|_| bad())?;
        let b: u32 = b.parse().map_err(|_| bad())?;
        if a > b || b >= pcpus {
            return Err(bad());
        }
        for c in a..=b {
            mask |= 1 << c;
        }
    }
    if mask == 0 {
        return Err(bad());
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_mask(Some("0-3,6"), 8).unwrap(), 0b0100_1111);
        assert_eq!(cpu_mask(None, 4).unwrap(), 0b1111);
        assert_eq!(cpu_mask(None, 64).unwrap(), u64::MAX);
        assert!(cpu_mask(Some("7"), 4).is_err());
        assert!(cpu_mask(Some("x"), 4).is_err());
        assert!(cpu_mask(Some("3-1"), 4).is_err());
    }

    #[test]
    fn the_halt_poll_controller_reads_with_the_daemons_defaults_and_is_checked() {
        let base = "[[vms]]\nname = \"a\"\n[[policies]]\nname = \"p\"\n";
        let s =
            Scenario::from_toml(&format!("{base}halt_poll = {{ mode = \"controller\" }}")).unwrap();
        assert_eq!(s.policies[0].halt_poll, HaltPollSpec::controller());
        s.validate().unwrap();
        // Reading validates: an interval or bounds the daemon refuses are refused.
        let err = |extra: &str| {
            Scenario::from_toml(&format!(
                "{base}halt_poll = {{ mode = \"controller\", {extra} }}"
            ))
            .unwrap_err()
            .to_string()
        };
        assert!(err("interval_us = 500").contains("interval_us"));
        assert!(err("bounds = { stop_load_permille = 0 }").contains("stop_load_permille"));
        assert!(err("period = 1").contains("period"));
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let text = r#"
            name = "t"
            duration_ms = 10
            [host]
            pcpus = 2
            [[host.load]]
            threads = 2
            duty = 0.5
            [[vms]]
            name = "a"
            vcpus = 2
            [[vms.tasks]]
            kind = { type = "periodic", interval_us = 500, work_ns = 5000 }
            rt_prio = 90
            per_vcpu = true
            [[policies]]
            name = "vanilla"
            [[policies]]
            name = "pv"
            pvsched = { period_us = 1000 }
            halt_poll = { mode = "fixed", ns = 0 }
        "#;
        let s = Scenario::from_toml(text).unwrap();
        assert_eq!(s.vms[0].tasks[0].rt_prio, 90);
        assert!(s.policies[1].pvsched.is_some());
        let back = toml::to_string(&s).unwrap();
        assert_eq!(Scenario::from_toml(&back).unwrap(), s);
        assert!(Scenario::from_toml("nme = 1").is_err());
        assert!(Scenario::from_toml("[host]\npcpus = 0").is_err());
    }
}
