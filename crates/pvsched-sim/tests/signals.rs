//! The engine's critical-section signals in the model: the guest module's sampled
//! depth, and the preempt count a host reads from guest RAM (introspection).

use pvsched_sim::config::*;
use pvsched_sim::{run_scenario, RunOptions};

/// A guest whose tasks hold one spinlock for 2 ms at a time, on a host whose
/// pCPUs are 80% busy with other tenants.
fn long_sections(policies: Vec<PolicySpec>) -> Scenario {
    Scenario {
        name: "long-sections".into(),
        duration_ms: 600,
        warmup_ms: 50,
        host: HostConfig {
            pcpus: 2,
            load: vec![LoadSpec {
                threads: 2,
                duty: 0.8,
                burst_us: 3000,
                ..LoadSpec::default()
            }],
            ..HostConfig::default()
        },
        vms: vec![VmConfig {
            name: "guest".into(),
            vcpus: 4,
            tasks: vec![TaskSpec {
                name: "kernel".into(),
                kind: TaskKind::Spin {
                    compute_us: 1000,
                    cs_ns: 2_000_000,
                    locks: 1,
                    cs_per_op: 1,
                },
                count: 4,
                ..TaskSpec::default()
            }],
            ..VmConfig::default()
        }],
        policies,
        ..Scenario::default()
    }
}

fn pvsched(name: &str, introspection: bool) -> PolicySpec {
    PolicySpec {
        name: name.into(),
        pvsched: Some(PvschedSpec {
            introspection,
            ..PvschedSpec::default()
        }),
        ..PolicySpec::default()
    }
}

#[test]
fn only_a_host_that_reads_preempt_counts_grants_lock_holder_boosts() {
    let sc = long_sections(vec![
        pvsched("pvsched", false),
        pvsched("pvsched-introspect", true),
    ]);
    for seed in [1u64, 2] {
        let opt = RunOptions {
            seed,
            check: true,
            ..RunOptions::default()
        };
        let r = run_scenario(&sc, &opt).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        for p in &r.results {
            assert_eq!(
                p.limit_violations, 0,
                "seed {seed}, {}: {:?}",
                p.policy, p.limits
            );
            assert!(
                p.invariant_violations.is_empty(),
                "seed {seed}, {}: {:?}",
                p.policy,
                p.invariant_violations
            );
        }
        let vm = |p: usize| &r.results[p].vms[0];
        // The sampled signal alone: no preempt count, no grant.
        assert_eq!(vm(0).lock_grants, Some(0), "seed {seed}");
        // Read from guest RAM: preempted holders of 2 ms sections are granted boosts.
        let (grants, holding) = (
            vm(1).lock_grants.unwrap(),
            vm(1).lock_grants_holding.unwrap(),
        );
        assert!(
            grants > 0 && holding > 0,
            "seed {seed}: {grants} grants, {holding} to holders"
        );
        assert!(
            grants >= holding + vm(1).lock_grants_waiting.unwrap(),
            "seed {seed}"
        );
    }
}

#[test]
fn the_sampled_and_the_exact_signal_both_reach_the_engine() {
    // The same guest with the module's sampled signal and with exact lock hints:
    // both publish critical sections, which the engine boosts.
    let mut hints = pvsched("pvsched-hints", false);
    hints.pvsched.as_mut().unwrap().cs_signal = CsSignal::Exact;
    let sc = long_sections(vec![pvsched("pvsched", false), hints]);
    let r = run_scenario(
        &sc,
        &RunOptions {
            seed: 3,
            ..RunOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("seed 3: {e}"));
    let boosts = |p: usize| r.results[p].vms[0].boosts.unwrap();
    assert!(boosts(0) > 0, "seed 3: the sampled signal never boosted");
    assert!(boosts(1) > 0, "seed 3: the exact signal never boosted");
}
