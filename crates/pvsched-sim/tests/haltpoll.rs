//! The daemon's halt-poll controller on the simulated host: it stops polling
//! where the pCPUs are taken and polls where they are idle, and the run
//! repeats exactly under the same seed.

use pvsched_sim::scenarios::{halt_poll, host_cpu, HALT_POLL_LOADS};
use pvsched_sim::{run_scenario, RunOptions, RunResult};

/// One load level of the built-in with no polling and the controller only,
/// 300 ms of warm-up (three controller rounds in it) and 300 ms measured.
fn run(level: &str, seed: u64) -> RunResult {
    let &(name, tenants, duty) = HALT_POLL_LOADS
        .iter()
        .find(|l| l.0 == level)
        .expect("a built-in level");
    let mut sc = halt_poll(name, tenants, duty);
    sc.policies
        .retain(|p| matches!(p.name.as_str(), "fixed-0us" | "pvsched"));
    assert_eq!(sc.policies.len(), 2);
    sc.warmup_ms = 300;
    sc.duration_ms = 300;
    let r = run_scenario(
        &sc,
        &RunOptions {
            seed,
            ..Default::default()
        },
    )
    .expect("the built-in runs");
    for p in &r.results {
        assert_eq!(p.limit_violations, 0, "{}: {:?}", p.policy, p.limits);
    }
    r
}

fn policy<'a>(r: &'a RunResult, name: &str) -> &'a pvsched_sim::run::PolicyResult {
    r.results
        .iter()
        .find(|p| p.policy == name)
        .expect("policy ran")
}

fn rr_vm<'a>(r: &'a RunResult, name: &str) -> &'a pvsched_sim::run::VmResult {
    policy(r, name)
        .vms
        .iter()
        .find(|v| v.name == "tcp-rr")
        .expect("the request-response VM")
}

#[test]
fn on_a_loaded_host_the_controller_stops_polling() {
    let r = run("loaded", 1);
    let ctl = policy(&r, "pvsched")
        .host
        .halt_poll
        .clone()
        .expect("controller ran");
    // Measured rounds at 301, 401 and 501 ms (the first runs at 1 ms).
    assert_eq!(ctl.rounds, 3, "{ctl:?}");
    // Every measured round found the host loaded or the vCPUs' pCPUs contended.
    assert!(
        ctl.reasons
            .iter()
            .all(|(reason, _)| reason == "host-loaded" || reason == "contended"),
        "{ctl:?}"
    );
    assert_eq!(ctl.mean_halt_poll_ns, Some(0.0), "{ctl:?}");
    let poll = host_cpu(&r, "pvsched", "poll").unwrap();
    assert!(poll < 0.0005, "polling {:.3}% of host CPU", poll * 100.0);
    assert_eq!(rr_vm(&r, "pvsched").poll_frac, 0.0);
}

#[test]
fn on_an_idle_host_the_controller_polls_and_vcpus_wake_faster() {
    let r = run("idle", 1);
    let ctl = policy(&r, "pvsched")
        .host
        .halt_poll
        .clone()
        .expect("controller ran");
    assert!(ctl.mean_halt_poll_ns.unwrap() >= 25_000.0, "{ctl:?}");
    assert!(
        !ctl.reasons
            .iter()
            .any(|(reason, _)| reason == "host-loaded" || reason == "contended"),
        "{ctl:?}"
    );
    let (off, on) = (rr_vm(&r, "fixed-0us"), rr_vm(&r, "pvsched"));
    assert!(on.poll_frac > 0.1, "{on:?}");
    let wake = |v: &pvsched_sim::run::VmResult| v.wake_avg_us.expect("wake-ups measured");
    let rr = |v: &pvsched_sim::run::VmResult| v.lat_avg_us.expect("requests measured");
    assert!(wake(on) < wake(off) / 2.0, "{} vs {}", wake(on), wake(off));
    assert!(rr(on) < rr(off), "{} vs {}", rr(on), rr(off));
    // Same seed, same run: trace and every figure.
    let again = run("idle", 1);
    assert_eq!(again.trace_hash, r.trace_hash);
    assert_eq!(again.results, r.results);
}
