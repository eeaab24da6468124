//! Each built-in scenario shows its seed's effect in the direction the seed
//! reports (short variants; the README tables come from the full runs).

use pvsched_sim::{run_parts, scenarios, RunOptions};

fn check(name: &str) {
    for seed in [1, 2] {
        check_seed(name, seed);
    }
}

fn check_seed(name: &str, seed: u64) {
    let parts = scenarios::builtin(name, true).expect("built-in");
    let opt = RunOptions {
        seed,
        ..RunOptions::default()
    };
    let r = run_parts(name, &parts, &opt).unwrap_or_else(|e| panic!("{name}, seed {seed}: {e}"));
    let effects = scenarios::effects(name, &r);
    assert!(!effects.is_empty(), "{name}: no effect checks");
    let failed: Vec<_> = effects
        .iter()
        .filter(|e| !e.holds)
        .map(|e| e.what.clone())
        .collect();
    assert!(
        failed.is_empty(),
        "{name}, seed {seed}: effects not shown: {failed:?}\n{}",
        pvsched_sim::report::table(&r)
    );
    for p in &r.results {
        assert_eq!(
            p.limit_violations, 0,
            "{name}, seed {seed}, {}: {:?}",
            p.policy, p.limits
        );
    }
}

#[test]
fn kunpeng_overcommit() {
    check("kunpeng-overcommit");
}

#[test]
fn pvsched_cyclictest() {
    check("pvsched-cyclictest");
}

#[test]
fn halt_poll() {
    check("halt-poll");
}

#[test]
fn rt_isolation() {
    check("rt-isolation");
}

#[test]
fn iothread() {
    check("iothread");
}
