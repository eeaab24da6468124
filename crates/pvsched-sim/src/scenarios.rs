//! Built-in scenarios, one per seed, and the effect each must show.
//!
//! A built-in may have several parts (an idle and a busy host, say); each
//! part is a [`Scenario`] and its policies are reported as `part/policy`.

use crate::config::*;
use crate::run::RunResult;

/// Names and one-line descriptions of the built-in scenarios.
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "kunpeng-overcommit",
        "seed 000: 16/8/4-vCPU VMs on a host at 80% load, UnixBench-like mix; 16U < 8U under vanilla",
    ),
    (
        "pvsched-cyclictest",
        "seed 003: guest cyclictest on an idle and a busy host; vanilla / static RT / pvsched, host latency",
    ),
    (
        "halt-poll",
        "seed 002: wake-up latency against polling CPU: halt_poll_ns 0..cap, KVM adaptive, the daemon's controller; 3 host loads",
    ),
    (
        "rt-isolation",
        "seed 001: RT latency with and without isolation, and with each noise source back",
    ),
    (
        "iothread",
        "seed 004: vCPU time-slice jitter with I/O on the main loop against a dedicated I/O thread",
    ),
    (
        "fleet",
        "1,000 VMs of 8 vCPUs on 125 hosts for 10 s, in parallel (fleet mode)",
    ),
];

/// The parts of a built-in scenario; `small` gives short variants for tests.
pub fn builtin(name: &str, small: bool) -> Option<Vec<Scenario>> {
    let mut parts = match name {
        "kunpeng-overcommit" => vec![kunpeng()],
        "pvsched-cyclictest" => vec![cyclictest(false), cyclictest(true)],
        "halt-poll" => HALT_POLL_LOADS
            .iter()
            .map(|&(level, threads, duty)| halt_poll(level, threads, duty))
            .collect(),
        "rt-isolation" => vec![rt_isolation()],
        "iothread" => vec![iothread()],
        "fleet" => vec![fleet()],
        _ => return None,
    };
    if small {
        for p in &mut parts {
            p.duration_ms = (p.duration_ms / 10).clamp(200, 600);
            p.warmup_ms = p.warmup_ms.min(50);
            p.hosts = p.hosts.min(2);
        }
    }
    Some(parts)
}

fn policy(name: &str) -> PolicySpec {
    PolicySpec {
        name: name.into(),
        ..PolicySpec::default()
    }
}

fn pvsched_policy(name: &str) -> PolicySpec {
    PolicySpec {
        name: name.into(),
        pvsched: Some(PvschedSpec::default()),
        halt_poll: HaltPollSpec::controller(),
        ..PolicySpec::default()
    }
}

fn task(name: &str, kind: TaskKind, count: u32) -> TaskSpec {
    TaskSpec {
        name: name.into(),
        kind,
        count,
        ..TaskSpec::default()
    }
}

/// Seed 000: the UnixBench-like mix on an overcommitted host.
fn kunpeng() -> Scenario {
    let vm = |vcpus: u32| {
        let n = vcpus / 4;
        VmConfig {
            name: format!("{vcpus}U"),
            vcpus,
            tasks: vec![
                task("dhry2reg", TaskKind::Cpu { chunk_us: 500 }, n),
                task(
                    "spawn",
                    TaskKind::Spin {
                        compute_us: 12,
                        cs_ns: 3_000,
                        locks: 1,
                        cs_per_op: 8,
                    },
                    2 * n,
                ),
                task(
                    "fstime",
                    TaskKind::Spin {
                        compute_us: 25,
                        cs_ns: 2_000,
                        locks: 2,
                        cs_per_op: 4,
                    },
                    n,
                ),
                task("context1", TaskKind::Pipe { work_ns: 4_000 }, 2 * n),
            ],
            ..VmConfig::default()
        }
    };
    // The lab's configurations: the guest module's sampled signal alone, and with
    // the daemon reading preempt counts from guest RAM.
    let mut pv = pvsched_policy("pvsched");
    pv.halt_poll = HaltPollSpec::default();
    let mut pv_introspect = pv.clone();
    pv_introspect.name = "pvsched-introspect".into();
    pv_introspect.pvsched.as_mut().unwrap().introspection = true;
    // A guest with lock hints: the exact critical-section depth and spin counts.
    let mut pv_hints = pv.clone();
    pv_hints.name = "pvsched-hints".into();
    pv_hints.pvsched.as_mut().unwrap().cs_signal = CsSignal::Exact;
    // The most favourable case for the lock-holder boost: a 100 us daemon, the
    // most grants the engine allows, and (a what-if) run delay seen while it lasts.
    let mut pv_ideal = pv_introspect.clone();
    pv_ideal.name = "pvsched-introspect-ideal".into();
    {
        let spec = pv_ideal.pvsched.as_mut().unwrap();
        spec.period_us = 100;
        spec.live_run_delay = true;
        spec.engine.lock_holder_max_grants = pvsched_policy::LOCK_HOLDER_MAX_GRANTS;
    }
    Scenario {
        name: "kunpeng-overcommit".into(),
        description: BUILTINS[0].1.into(),
        duration_ms: 4000,
        warmup_ms: 200,
        mode: RunMode::Each,
        host: HostConfig {
            pcpus: 8,
            smt: true,
            load: vec![LoadSpec {
                name: "other-tenants".into(),
                threads: 8,
                duty: 0.8,
                burst_us: 3000,
                ..LoadSpec::default()
            }],
            ..HostConfig::default()
        },
        vms: vec![vm(16), vm(8), vm(4)],
        policies: vec![
            policy("vanilla"),
            PolicySpec {
                name: "kunpeng-cs".into(),
                cs_extra_slice_us: 500,
                directed_yield: DirectedYield::MaxCount,
                ..PolicySpec::default()
            },
            PolicySpec {
                name: "load-aware-spin".into(),
                load_aware_spin: true,
                ..PolicySpec::default()
            },
            PolicySpec {
                name: "smt-aware".into(),
                smt_aware: true,
                ..PolicySpec::default()
            },
            PolicySpec {
                name: "kunpeng-v".into(),
                cs_extra_slice_us: 500,
                directed_yield: DirectedYield::MaxCount,
                load_aware_spin: true,
                smt_aware: true,
                ..PolicySpec::default()
            },
            pv,
            pv_introspect,
            pv_hints,
            pv_ideal,
        ],
        hosts: 1,
    }
}

/// Seed 003: cyclictest in the guest, idle or busy host.
fn cyclictest(busy: bool) -> Scenario {
    let mut load = Vec::new();
    if busy {
        // stress-ng --cpu 2 --iomix 1 --vm 1 --vm-bytes 128M --fork 1
        let l = LoadSpec::duty;
        load = vec![
            l("stress-cpu", 2, 1.0, 4000),
            l("stress-iomix", 1, 0.5, 300),
            l("stress-vm", 1, 0.95, 2000),
            l("stress-fork", 1, 0.7, 150),
        ];
    }
    let mut no_hint = pvsched_policy("pvsched-nohint");
    no_hint.pvsched.as_mut().unwrap().hint_rt_timers = false;
    Scenario {
        name: format!("pvsched-cyclictest/{}", if busy { "busy" } else { "idle" }),
        description: BUILTINS[1].1.into(),
        duration_ms: 10_000,
        warmup_ms: 200,
        mode: RunMode::Together,
        host: HostConfig {
            pcpus: 4,
            load,
            latency_probe: Some(ProbeSpec {
                interval_us: 1000,
                ..ProbeSpec::default()
            }),
            ..HostConfig::default()
        },
        vms: vec![VmConfig {
            name: "guest".into(),
            vcpus: 4,
            tasks: vec![
                TaskSpec {
                    name: "cyclictest".into(),
                    kind: TaskKind::Periodic {
                        interval_us: 500,
                        work_ns: 5_000,
                    },
                    count: 1,
                    per_vcpu: true,
                    rt_prio: 8,
                    pinned: true,
                    ..TaskSpec::default()
                },
                TaskSpec {
                    name: "housekeeping".into(),
                    kind: TaskKind::Burst {
                        run_us: 1500,
                        sleep_us: 10_000,
                    },
                    count: 1,
                    per_vcpu: true,
                    pinned: true,
                    ..TaskSpec::default()
                },
            ],
            ..VmConfig::default()
        }],
        policies: vec![
            policy("vanilla"),
            PolicySpec {
                name: "static-rt".into(),
                static_rt_prio: Some(8),
                ..PolicySpec::default()
            },
            pvsched_policy("pvsched"),
            no_hint,
        ],
        hosts: 1,
    }
}

/// Host load levels of the `halt-poll` parts: name, tenant threads on every
/// pCPU and their duty cycle (besides one 30% background thread on pCPU 0).
pub const HALT_POLL_LOADS: [(&str, u32, f64); 3] =
    [("idle", 0, 0.0), ("busy", 2, 0.5), ("loaded", 4, 0.95)];

/// Seed 002: request-response latency against halt-polling CPU, at one host
/// load level: no polling, fixed windows up to KVM's cap, KVM's default
/// adaptive window, and the window under the daemon's controller.
pub fn halt_poll(level: &str, tenants: u32, duty: f64) -> Scenario {
    let mut policies = Vec::new();
    for ns in [0u32, 10_000, 25_000, 50_000, 100_000, 200_000] {
        policies.push(PolicySpec {
            name: format!("fixed-{}us", ns / 1000),
            halt_poll: HaltPollSpec::Fixed { ns },
            ..PolicySpec::default()
        });
    }
    policies.push(PolicySpec {
        name: "adaptive".into(),
        halt_poll: HaltPollSpec::Adaptive {
            preset: "kvm-current".into(),
            max_ns: 200_000,
        },
        ..PolicySpec::default()
    });
    policies.push(PolicySpec {
        name: "pvsched".into(),
        halt_poll: HaltPollSpec::controller(),
        ..PolicySpec::default()
    });
    let mut load = vec![LoadSpec {
        name: "host-background".into(),
        threads: 1,
        duty: 0.3,
        burst_us: 2000,
        cpus: Some("0".into()),
        ..LoadSpec::default()
    }];
    if tenants > 0 {
        load.push(LoadSpec {
            name: "tenants".into(),
            threads: tenants,
            duty,
            burst_us: 2000,
            ..LoadSpec::default()
        });
    }
    Scenario {
        name: format!("halt-poll/{level}"),
        description: BUILTINS[2].1.into(),
        duration_ms: 3000,
        warmup_ms: 300,
        mode: RunMode::Together,
        host: HostConfig {
            pcpus: 4,
            load,
            ..HostConfig::default()
        },
        vms: vec![
            VmConfig {
                name: "tcp-rr".into(),
                vcpus: 1,
                pin: vec![1],
                tasks: vec![TaskSpec {
                    name: "rr".into(),
                    kind: TaskKind::Io {
                        submit_ns: 2_000,
                        device_us: 25,
                        think_us: 3,
                    },
                    ..TaskSpec::default()
                }],
                ..VmConfig::default()
            },
            VmConfig {
                name: "idle-vm".into(),
                vcpus: 2,
                pin: vec![2, 3],
                tasks: vec![TaskSpec {
                    name: "timers".into(),
                    kind: TaskKind::Burst {
                        run_us: 20,
                        sleep_us: 3_000,
                    },
                    per_vcpu: true,
                    pinned: true,
                    ..TaskSpec::default()
                }],
                ..VmConfig::default()
            },
        ],
        policies,
        hosts: 1,
    }
}

/// Seed 001: RT latency, isolation and noise sources.
fn rt_isolation() -> Scenario {
    let iso = |name: &str, f: fn(&mut IsolationSpec)| {
        let mut spec = IsolationSpec::default();
        f(&mut spec);
        PolicySpec {
            name: name.into(),
            isolation: Some(spec),
            halt_poll: HaltPollSpec::Fixed { ns: 0 },
            ..PolicySpec::default()
        }
    };
    Scenario {
        name: "rt-isolation".into(),
        description: BUILTINS[3].1.into(),
        duration_ms: 10_000,
        warmup_ms: 100,
        mode: RunMode::Together,
        host: HostConfig {
            pcpus: 4,
            load: vec![LoadSpec {
                name: "host-load".into(),
                threads: 4,
                duty: 0.9,
                burst_us: 3000,
                ..LoadSpec::default()
            }],
            noise: NoiseSpec {
                tick_period_us: 1000,
                tick_ns: 6_000,
                irq_gap_us: 2_000,
                irq_ns: 8_000,
                softirq_gap_us: 5_000,
                softirq_ns: 60_000,
                kworker_gap_us: 10_000,
                kworker_ns: 300_000,
            },
            ..HostConfig::default()
        },
        vms: vec![VmConfig {
            name: "rt-guest".into(),
            vcpus: 2,
            pin: vec![2, 3],
            tasks: vec![TaskSpec {
                name: "cyclictest".into(),
                kind: TaskKind::Periodic {
                    interval_us: 230,
                    work_ns: 3_000,
                },
                per_vcpu: true,
                rt_prio: 95,
                pinned: true,
                ..TaskSpec::default()
            }],
            ..VmConfig::default()
        }],
        policies: vec![
            PolicySpec {
                name: "pinned-fair".into(),
                halt_poll: HaltPollSpec::Fixed { ns: 0 },
                ..PolicySpec::default()
            },
            iso("pinned-fifo", |s| {
                s.cpuset = false;
                s.nohz_full = false;
                s.irq_affinity = false;
                s.softirqs = false;
                s.kworkers = false;
            }),
            iso("isolated", |_| {}),
            iso("isolated+tick", |s| s.nohz_full = false),
            iso("isolated+irqs", |s| s.irq_affinity = false),
            iso("isolated+softirqs", |s| s.softirqs = false),
            iso("isolated+kworkers", |s| s.kworkers = false),
            iso("isolated-fair+kworkers", |s| {
                s.kworkers = false;
                s.vcpu_fifo_prio = None;
            }),
        ],
        hosts: 1,
    }
}

/// Seed 004: I/O on the main loop against a dedicated I/O thread.
fn iothread() -> Scenario {
    let hog = |v: u32| TaskSpec {
        name: "hog".into(),
        kind: TaskKind::Cpu { chunk_us: 1000 },
        pinned: true,
        vcpu: Some(v),
        measure: Some(true),
        score: false,
        ..TaskSpec::default()
    };
    Scenario {
        name: "iothread".into(),
        description: BUILTINS[4].1.into(),
        duration_ms: 5000,
        warmup_ms: 100,
        mode: RunMode::Together,
        host: HostConfig {
            pcpus: 6,
            ..HostConfig::default()
        },
        vms: vec![VmConfig {
            name: "io-guest".into(),
            vcpus: 4,
            pin: vec![0, 1, 2, 3],
            emu_cpus: Some("0-3".into()),
            io_path: IoPath::MainLoop,
            io_emu_ns: 8_000,
            bql_exit_interval_us: 200,
            bql_exit_ns: 5_000,
            tasks: vec![
                TaskSpec {
                    name: "4k-read".into(),
                    kind: TaskKind::Io {
                        submit_ns: 3_000,
                        device_us: 100,
                        think_us: 5,
                    },
                    count: 4,
                    pinned: true,
                    vcpu: Some(0),
                    measure: Some(false),
                    ..TaskSpec::default()
                },
                hog(1),
                hog(2),
                hog(3),
            ],
            ..VmConfig::default()
        }],
        policies: vec![
            PolicySpec {
                name: "main-loop".into(),
                io_path: Some(IoPath::MainLoop),
                ..PolicySpec::default()
            },
            PolicySpec {
                name: "iothread".into(),
                io_path: Some(IoPath::IoThread),
                emu_cpus: Some("4".into()),
                ..PolicySpec::default()
            },
        ],
        hosts: 1,
    }
}

/// 125 hosts × 8 VMs × 8 vCPUs.
fn fleet() -> Scenario {
    let vm = |name: &str, tasks: Vec<TaskSpec>| VmConfig {
        name: name.into(),
        vcpus: 8,
        count: 2,
        tasks,
        ..VmConfig::default()
    };
    let web = vec![
        task("pipe", TaskKind::Pipe { work_ns: 50_000 }, 4),
        task(
            "req",
            TaskKind::Io {
                submit_ns: 5_000,
                device_us: 200,
                think_us: 300,
            },
            4,
        ),
    ];
    let batch = vec![
        task("cpu", TaskKind::Cpu { chunk_us: 2000 }, 4),
        task(
            "kernel",
            TaskKind::Spin {
                compute_us: 100,
                cs_ns: 2_000,
                locks: 4,
                cs_per_op: 2,
            },
            2,
        ),
    ];
    let db = vec![
        task(
            "txn",
            TaskKind::Mutex {
                compute_us: 200,
                cs_ns: 20_000,
                locks: 4,
            },
            6,
        ),
        task(
            "log",
            TaskKind::Io {
                submit_ns: 5_000,
                device_us: 500,
                think_us: 1000,
            },
            2,
        ),
    ];
    let rt = vec![
        TaskSpec {
            name: "cyclic".into(),
            kind: TaskKind::Periodic {
                interval_us: 1000,
                work_ns: 20_000,
            },
            count: 1,
            per_vcpu: true,
            rt_prio: 10,
            pinned: true,
            ..TaskSpec::default()
        },
        task(
            "bg",
            TaskKind::Burst {
                run_us: 3000,
                sleep_us: 6000,
            },
            4,
        ),
    ];
    Scenario {
        name: "fleet".into(),
        description: BUILTINS[5].1.into(),
        duration_ms: 10_000,
        warmup_ms: 100,
        mode: RunMode::Together,
        host: HostConfig {
            pcpus: 32,
            smt: true,
            ..HostConfig::default()
        },
        vms: vec![
            vm("web", web),
            vm("batch", batch),
            vm("db", db),
            vm("rt", rt),
        ],
        policies: vec![pvsched_policy("pvsched")],
        hosts: 125,
    }
}

/// One check of a seed's effect: what, and whether the run shows it.
#[derive(Clone, Debug)]
pub struct EffectCheck {
    /// What is compared.
    pub what: String,
    /// Whether the run shows it.
    pub holds: bool,
}

fn find<'a>(r: &'a RunResult, policy: &str, vm: &str) -> Option<&'a crate::run::VmResult> {
    r.results
        .iter()
        .find(|p| p.policy == policy)?
        .vms
        .iter()
        .find(|v| v.name == vm)
}

fn host_max(r: &RunResult, policy: &str) -> Option<f64> {
    r.results
        .iter()
        .find(|p| p.policy == policy)?
        .host
        .lat_max_us
}

/// Share of the host's pCPU time in accounting category `cat` under `policy`.
pub fn host_cpu(r: &RunResult, policy: &str, cat: &str) -> Option<f64> {
    r.results
        .iter()
        .find(|p| p.policy == policy)?
        .host
        .cpu
        .iter()
        .find(|(c, _)| c == cat)
        .map(|(_, x)| *x)
}

/// The direction each seed reports, checked on a run of the built-in.
pub fn effects(name: &str, r: &RunResult) -> Vec<EffectCheck> {
    let mut out = Vec::new();
    let mut check = |what: String, holds: Option<bool>| {
        out.push(EffectCheck {
            what,
            holds: holds.unwrap_or(false),
        })
    };
    let score = |p: &str, vm: &str| find(r, p, vm).and_then(|v| v.score);
    let lat =
        |p: &str, vm: &str, f: fn(&crate::run::VmResult) -> Option<f64>| find(r, p, vm).and_then(f);
    match name {
        "kunpeng-overcommit" => {
            check(
                "vanilla: 16U scores below 8U (inversion, by more than 10%)".into(),
                score("vanilla", "16U")
                    .zip(score("vanilla", "8U"))
                    .map(|(a, b)| a < 0.9 * b),
            );
            for p in [
                "kunpeng-cs",
                "load-aware-spin",
                "kunpeng-v",
                "pvsched",
                "pvsched-introspect",
                "pvsched-hints",
                "pvsched-introspect-ideal",
            ] {
                if matches!(p, "load-aware-spin" | "kunpeng-v") {
                    check(
                        format!("{p}: inversion removed (16U scores at least 90% of 8U)"),
                        score(p, "16U")
                            .zip(score(p, "8U"))
                            .map(|(a, b)| a >= 0.9 * b),
                    );
                }
                check(
                    format!("{p}: 16U scores above vanilla 16U"),
                    score(p, "16U")
                        .zip(score("vanilla", "16U"))
                        .map(|(a, b)| a > b),
                );
            }
            // What the model finds about the host-read preempt count (docs/sim.md).
            check(
                "pvsched-introspect: the inversion remains (16U below 90% of 8U)".into(),
                score("pvsched-introspect", "16U")
                    .zip(score("pvsched-introspect", "8U"))
                    .map(|(a, b)| a < 0.9 * b),
            );
            check(
                "pvsched-introspect: most 16U lock-holder grants go to vCPUs waiting for the lock"
                    .into(),
                find(r, "pvsched-introspect", "16U").and_then(|v| {
                    let waiting = v.lock_grants_waiting?;
                    let holding = v.lock_grants_holding?;
                    Some(waiting > holding && waiting > 0)
                }),
            );
        }
        "pvsched-cyclictest" => {
            let avg = |p: &str| lat(&format!("busy/{p}"), "guest", |v| v.lat_avg_us);
            let max = |p: &str| lat(&format!("busy/{p}"), "guest", |v| v.lat_max_us);
            check(
                "busy host: pvsched guest avg latency far below vanilla".into(),
                avg("pvsched").zip(avg("vanilla")).map(|(a, b)| a * 5.0 < b),
            );
            check(
                "busy host: static RT guest avg latency far below vanilla".into(),
                avg("static-rt")
                    .zip(avg("vanilla"))
                    .map(|(a, b)| a * 5.0 < b),
            );
            check(
                "busy host: static RT guest max latency below pvsched".into(),
                max("static-rt").zip(max("pvsched")).map(|(a, b)| a <= b),
            );
            check(
                "busy host: static RT ruins host latency (max above vanilla and pvsched)".into(),
                host_max(r, "busy/static-rt")
                    .zip(host_max(r, "busy/vanilla").zip(host_max(r, "busy/pvsched")))
                    .map(|(s, (v, p))| s > v && s > p),
            );
            check(
                "idle host: all policies keep guest avg latency low (< 50 us)".into(),
                Some(["vanilla", "static-rt", "pvsched"].iter().all(|p| {
                    lat(&format!("idle/{p}"), "guest", |v| v.lat_avg_us).is_some_and(|a| a < 50.0)
                })),
            );
        }
        "halt-poll" => {
            let rr = |p: &str| lat(p, "tcp-rr", |v| v.lat_avg_us);
            let wake = |p: &str| lat(p, "tcp-rr", |v| v.wake_avg_us);
            let poll = |p: &str| host_cpu(r, p, "poll");
            check(
                "idle host: polling at the cap cuts request-response latency against no polling"
                    .into(),
                rr("idle/fixed-200us")
                    .zip(rr("idle/fixed-0us"))
                    .map(|(a, b)| a < b),
            );
            check(
                "idle host: fixed polling costs host CPU that grows with the window".into(),
                poll("idle/fixed-200us")
                    .zip(poll("idle/fixed-25us"))
                    .map(|(a, b)| a > b),
            );
            check(
                "idle host: adaptive latency close to the cap's (within 20%) at less CPU".into(),
                rr("idle/adaptive")
                    .zip(rr("idle/fixed-200us"))
                    .zip(poll("idle/adaptive").zip(poll("idle/fixed-200us")))
                    .map(|((la, lf), (ca, cf))| la <= lf * 1.2 && ca < cf),
            );
            check(
                "idle host: under the controller vCPUs wake faster than without polling".into(),
                wake("idle/pvsched")
                    .zip(wake("idle/fixed-0us"))
                    .map(|(a, b)| a < b),
            );
            check(
                "loaded host: the controller stops polling (under 0.5% of host CPU)".into(),
                poll("loaded/pvsched").map(|a| a < 0.005),
            );
        }
        "rt-isolation" => {
            let max = |p: &str| lat(p, "rt-guest", |v| v.lat_max_us);
            check(
                "isolation cuts max latency against pinned FIFO without isolation".into(),
                max("isolated").zip(max("pinned-fifo")).map(|(a, b)| a < b),
            );
            check(
                "FIFO vCPUs beat fair vCPUs without isolation".into(),
                max("pinned-fifo")
                    .zip(max("pinned-fair"))
                    .map(|(a, b)| a < b),
            );
            for p in ["isolated+tick", "isolated+irqs", "isolated+softirqs"] {
                check(
                    format!("{p}: bringing the noise back raises max latency"),
                    max(p).zip(max("isolated")).map(|(a, b)| a > b),
                );
            }
        }
        "iothread" => {
            let p99 = |p: &str| lat(p, "io-guest", |v| v.lat_p99_us);
            let max = |p: &str| lat(p, "io-guest", |v| v.lat_max_us);
            check(
                "dedicated I/O thread: less time-slice jitter (p99) than the main loop".into(),
                p99("iothread").zip(p99("main-loop")).map(|(a, b)| a < b),
            );
            check(
                "dedicated I/O thread: lower worst time slice".into(),
                max("iothread").zip(max("main-loop")).map(|(a, b)| a < b),
            );
        }
        _ => {}
    }
    out
}
