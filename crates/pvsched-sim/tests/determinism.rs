//! Same seed, same results: two runs compare trace hashes and every figure.

use pvsched_sim::{run_parts, scenarios, RunOptions, RunResult};

fn run(name: &str, seed: u64, shorten_ms: u64) -> RunResult {
    let mut parts = scenarios::builtin(name, true).expect("built-in");
    for p in &mut parts {
        p.duration_ms = shorten_ms;
        p.warmup_ms = 20;
        p.hosts = p.hosts.min(2);
    }
    let opt = RunOptions {
        seed,
        ..RunOptions::default()
    };
    run_parts(name, &parts, &opt).unwrap_or_else(|e| panic!("seed {seed}: {e}"))
}

#[test]
fn same_seed_same_trace_and_results() {
    for (name, ms) in [
        ("pvsched-cyclictest", 150),
        ("kunpeng-overcommit", 60),
        ("halt-poll", 60),
        ("rt-isolation", 60),
        ("iothread", 60),
        ("fleet", 40),
    ] {
        for seed in [1u64, 0xdead_beef] {
            let a = run(name, seed, ms);
            let b = run(name, seed, ms);
            assert_eq!(
                a.trace_hash, b.trace_hash,
                "{name}, seed {seed}: trace hashes differ"
            );
            assert_eq!(a.events, b.events, "{name}, seed {seed}");
            assert_eq!(a.results, b.results, "{name}, seed {seed}: results differ");
        }
    }
}

#[test]
fn another_seed_gives_another_trace() {
    let a = run("pvsched-cyclictest", 1, 100);
    let b = run("pvsched-cyclictest", 2, 100);
    assert_ne!(
        a.trace_hash, b.trace_hash,
        "seeds 1 and 2 gave the same trace"
    );
}

#[test]
fn fleet_hosts_run_in_parallel_and_deterministically() {
    // Rayon schedules hosts in any order; the merged result must not depend on it.
    let a = run("fleet", 7, 30);
    let b = run("fleet", 7, 30);
    assert_eq!(a.trace_hash, b.trace_hash, "seed 7");
    assert_eq!(a.hosts, 2);
    let vms: u64 = a.results[0].vms.iter().map(|v| v.instances).sum();
    assert_eq!(vms, 16, "seed 7: 2 hosts x 8 VMs");
}

#[test]
fn the_simulated_overcommit_experiment_repeats() {
    // hackbench guests under the lab's three configurations, as `calibrate` runs them.
    use pvsched_sim::calibrate::overcommit::{parse, scenario};
    let (params, configs) =
        parse(include_str!("fixtures/overcommit_results.json")).expect("fixture");
    let sc = scenario(&params, &configs, 0.3);
    let opt = RunOptions {
        seed: 5,
        ..RunOptions::default()
    };
    let a = pvsched_sim::run_scenario(&sc, &opt).expect("seed 5");
    let b = pvsched_sim::run_scenario(&sc, &opt).expect("seed 5");
    assert_eq!(a.trace_hash, b.trace_hash, "seed 5: trace hashes differ");
    assert_eq!(a.results, b.results, "seed 5: results differ");
    assert_eq!(a.results.len(), 3);
}
