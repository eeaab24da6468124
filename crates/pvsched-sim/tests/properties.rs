//! Property tests: invariants checked after every event on random scenarios.
//!
//! - accounted CPU time per pCPU equals simulated time;
//! - no thread runs on two pCPUs, no task on two vCPUs, at once;
//! - locks are held by tasks in critical sections, waited on by spinners;
//! - a policy never violates its own limits (engine budget and continuous
//!   boost on the CPU time it charges, which `schedstat` shows up to a host tick
//!   late; RT throttling runtime, halt-poll window).

use proptest::prelude::*;
use pvsched_policy::PolicyConfig;
use pvsched_sim::config::*;
use pvsched_sim::{run_scenario, RunOptions};

fn kind(k: u8, a: u64, b: u64) -> TaskKind {
    match k % 8 {
        0 => TaskKind::Cpu {
            chunk_us: 50 + a % 500,
        },
        1 => TaskKind::Burst {
            run_us: 20 + a % 300,
            sleep_us: 50 + b % 2000,
        },
        2 => TaskKind::Spin {
            compute_us: 5 + a % 50,
            cs_ns: 500 + b % 5000,
            locks: 1 + (a % 3) as u32,
            cs_per_op: 1 + (b % 4) as u32,
        },
        3 => TaskKind::Mutex {
            compute_us: 10 + a % 100,
            cs_ns: 1000 + b % 20_000,
            locks: 1 + (b % 2) as u32,
        },
        4 => TaskKind::Pipe {
            work_ns: 1000 + a % 20_000,
        },
        5 => TaskKind::Periodic {
            interval_us: 100 + a % 1000,
            work_ns: 1000 + b % 20_000,
        },
        6 => TaskKind::Hackbench {
            fds: 1 + (a % 4) as u32,
            loops: 1 + (b % 3) as u32,
            send_ns: 500 + a % 5000,
            recv_ns: 500 + b % 5000,
            cs_ns: 200 + a % 3000,
            fork_us: b % 100,
        },
        _ => TaskKind::Io {
            submit_ns: 1000 + a % 5000,
            device_us: 10 + b % 200,
            think_us: a % 100,
        },
    }
}

fn policy(p: u8) -> PolicySpec {
    let mut s = PolicySpec {
        name: format!("p{p}"),
        ..PolicySpec::default()
    };
    match p % 8 {
        0 => {}
        1 => s.static_rt_prio = Some(8),
        2 => {
            s.pvsched = Some(PvschedSpec {
                period_us: 200,
                // The signals: sampled or exact, with or without guest RAM.
                cs_signal: if p & 8 != 0 {
                    CsSignal::Exact
                } else {
                    CsSignal::Sampled
                },
                introspection: p & 16 != 0,
                live_run_delay: p & 32 != 0,
                engine: PolicyConfig {
                    budget_ns: 5_000_000,
                    budget_window_ns: 20_000_000,
                    max_continuous_ns: 2_000_000,
                    throttle_ns: 5_000_000,
                    ..PolicyConfig::default()
                },
                ..PvschedSpec::default()
            });
            s.halt_poll = HaltPollSpec::Controller {
                interval_us: 20_000,
                bounds: Default::default(),
            };
        }
        3 => {
            s.cs_extra_slice_us = 300;
            s.directed_yield = DirectedYield::MaxCount;
        }
        4 => s.load_aware_spin = true,
        5 => {
            s.smt_aware = true;
            s.halt_poll = HaltPollSpec::Fixed { ns: 50_000 };
        }
        6 => {
            s.isolation = Some(IsolationSpec::default());
            s.io_path = Some(IoPath::MainLoop);
        }
        _ => {
            s.io_path = Some(IoPath::IoThread);
            s.halt_poll = HaltPollSpec::Adaptive {
                preset: "kvm-legacy".into(),
                max_ns: 100_000,
            };
        }
    }
    s
}

prop_compose! {
    fn scenario()(
        pcpus in 1u32..6,
        smt in any::<bool>(),
        load_threads in 0u32..4,
        duty in 0.1f64..1.0,
        vms in prop::collection::vec((1u32..5, prop::collection::vec((any::<u8>(), any::<u64>(), any::<u64>(), 0u8..3, 0u8..2), 1..5)), 1..3),
        pol in any::<u8>(),
        noise in any::<bool>(),
        bql in any::<bool>(),
    ) -> Scenario {
        let vms = vms.into_iter().enumerate().map(|(i, (vcpus, tasks))| VmConfig {
            name: format!("vm{i}"),
            vcpus,
            pin: if i == 0 && pol % 8 == 6 { vec![pcpus - 1] } else { vec![] },
            bql_exit_interval_us: if bql { 150 } else { 0 },
            tasks: tasks.into_iter().enumerate().map(|(j, (k, a, b, count, rt))| TaskSpec {
                name: format!("t{j}"),
                kind: kind(k, a, b),
                count: u32::from(count) + 1,
                rt_prio: if rt == 1 { 10 } else { 0 },
                ..TaskSpec::default()
            }).collect(),
            ..VmConfig::default()
        }).collect();
        Scenario {
            name: "prop".into(),
            duration_ms: 60,
            warmup_ms: 5,
            host: HostConfig {
                pcpus,
                smt,
                rt_runtime_us: 950_000,
                load: if load_threads > 0 {
                    vec![LoadSpec { threads: load_threads, duty, burst_us: 500, ..LoadSpec::default() }]
                } else { vec![] },
                noise: if noise {
                    NoiseSpec { tick_period_us: 1000, tick_ns: 3000, irq_gap_us: 500, irq_ns: 5000,
                                softirq_gap_us: 2000, softirq_ns: 20_000, kworker_gap_us: 3000, kworker_ns: 100_000 }
                } else { NoiseSpec::default() },
                latency_probe: Some(ProbeSpec { interval_us: 500, ..ProbeSpec::default() }),
                ..HostConfig::default()
            },
            vms,
            policies: vec![policy(pol)],
            ..Scenario::default()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_on_random_scenarios(sc in scenario(), seed in any::<u64>()) {
        let opt = RunOptions { seed, check: true, ..RunOptions::default() };
        let r = run_scenario(&sc, &opt).map_err(|e| TestCaseError::fail(format!("seed {seed}: {e}")))?;
        prop_assert!(r.events > 100, "seed {seed}: only {} events", r.events);
        for p in &r.results {
            prop_assert!(p.invariant_violations.is_empty(), "seed {seed}, policy {}: {:?}", p.policy, p.invariant_violations);
            prop_assert_eq!(p.limit_violations, 0, "seed {}, policy {}: {:?}", seed, p.policy, p.limits);
            // Accounting: host fractions sum to 1.
            let total: f64 = p.host.cpu.iter().map(|c| c.1).sum();
            prop_assert!((total - 1.0).abs() < 1e-9, "seed {seed}: host CPU fractions sum to {total}");
            for v in &p.vms {
                let f = v.useful_frac + v.spin_frac.unwrap_or(0.0) + v.poll_frac + v.overhead_frac
                    + v.idle_frac + v.steal_frac.unwrap_or(0.0);
                prop_assert!(f <= 1.0 + 1e-6, "seed {seed}: vCPU time over-accounted ({f}) in {}", v.name);
            }
        }
    }
}

#[test]
fn a_rogue_guest_is_held_to_its_budget() {
    // An RT task that never sleeps: the engine boosts, then throttles; the
    // boosted CPU time in any budget window never exceeds the budget.
    let engine = PolicyConfig {
        budget_ns: 10_000_000,
        budget_window_ns: 50_000_000,
        max_continuous_ns: 5_000_000,
        throttle_ns: 20_000_000,
        ..PolicyConfig::default()
    };
    let sc = Scenario {
        name: "rogue".into(),
        duration_ms: 400,
        warmup_ms: 10,
        host: HostConfig {
            pcpus: 2,
            load: vec![LoadSpec {
                threads: 2,
                ..LoadSpec::default()
            }],
            ..HostConfig::default()
        },
        vms: vec![VmConfig {
            name: "rogue".into(),
            vcpus: 2,
            tasks: vec![TaskSpec {
                name: "hog".into(),
                kind: TaskKind::Cpu { chunk_us: 1000 },
                rt_prio: 99,
                per_vcpu: true,
                pinned: true,
                ..TaskSpec::default()
            }],
            ..VmConfig::default()
        }],
        policies: vec![PolicySpec {
            name: "pvsched".into(),
            pvsched: Some(PvschedSpec {
                engine,
                ..PvschedSpec::default()
            }),
            ..PolicySpec::default()
        }],
        ..Scenario::default()
    };
    for seed in [1u64, 2, 3] {
        let r = run_scenario(
            &sc,
            &RunOptions {
                seed,
                check: true,
                ..RunOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let p = &r.results[0];
        assert_eq!(p.limit_violations, 0, "seed {seed}: {:?}", p.limits);
        assert!(
            p.invariant_violations.is_empty(),
            "seed {seed}: {:?}",
            p.invariant_violations
        );
        let v = &p.vms[0];
        assert!(
            v.throttles.unwrap() > 0,
            "seed {seed}: the rogue guest was never throttled"
        );
        assert!(
            v.steal_frac.unwrap() > 0.2,
            "seed {seed}: throttled vCPUs must wait for the host load"
        );
    }
}
