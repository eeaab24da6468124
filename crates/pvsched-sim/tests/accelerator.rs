//! The accelerator in the model: under TCG the emulator's main loop fires the
//! guest's timers, so RT priority for the vCPU threads alone leaves guest timer
//! latency at the mercy of host load; under KVM it does not.

use pvsched_sim::{run_scenario, RunOptions, Scenario};

const TCG: &str = r#"{ type = "tcg", main_loop_ns = 30000, translation_factor = 10.0 }"#;
const KVM: &str = r#"{ type = "kvm" }"#;

fn scenario(accel: &str, load_threads: u32) -> Scenario {
    let text = format!(
        r#"
name = "accelerator"
duration_ms = 2000
[host]
pcpus = 2
[[host.load]]
name = "stress"
threads = {load_threads}
duty = 1.0
burst_us = 4000
[[vms]]
name = "guest"
vcpus = 2
accel = {accel}
[[vms.tasks]]
name = "cyclictest"
kind = {{ type = "periodic", interval_us = 1000, work_ns = 5000 }}
per_vcpu = true
rt_prio = 90
pinned = true
[[policies]]
name = "vanilla"
[[policies]]
name = "static-rt"
static_rt_prio = 8
halt_poll = {{ mode = "fixed", ns = 50000 }}
[[policies]]
name = "static-rt-all"
static_rt_prio = 8
emulator_rt_prio = 8
"#
    );
    Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{accel}: {e}"))
}

/// Guest latency average and polling share per policy.
fn run(accel: &str, load_threads: u32) -> Vec<(String, f64, f64)> {
    let r = run_scenario(&scenario(accel, load_threads), &RunOptions::default())
        .unwrap_or_else(|e| panic!("{accel}: {e}"));
    r.results
        .iter()
        .map(|p| {
            let vm = &p.vms[0];
            (
                p.policy.clone(),
                vm.lat_avg_us.expect("latency samples"),
                vm.poll_frac,
            )
        })
        .collect()
}

fn avg(rows: &[(String, f64, f64)], policy: &str) -> f64 {
    rows.iter().find(|r| r.0 == policy).expect(policy).1
}

#[test]
fn under_tcg_static_rt_needs_the_main_loop_too() {
    let tcg = run(TCG, 4);
    let (v, rt, all) = (
        avg(&tcg, "vanilla"),
        avg(&tcg, "static-rt"),
        avg(&tcg, "static-rt-all"),
    );
    // The timers wait for the main loop behind the host load unless it is RT too.
    assert!(rt > 2.0 * all, "tcg: {tcg:?}");
    assert!(all < v, "tcg: {tcg:?}");
}

#[test]
fn under_kvm_static_rt_of_the_vcpus_is_enough() {
    let kvm = run(KVM, 4);
    let (v, rt, all) = (
        avg(&kvm, "vanilla"),
        avg(&kvm, "static-rt"),
        avg(&kvm, "static-rt-all"),
    );
    // The vCPU thread takes its own timer: the main loop's class does not matter.
    assert!(rt < v / 2.0, "kvm: {kvm:?}");
    assert!((rt - all).abs() <= 0.2 * all.max(1.0), "kvm: {kvm:?}");
}

#[test]
fn only_kvm_halt_polls() {
    // On an idle host a fixed window is used under KVM; TCG's halted vCPU thread
    // waits on a condition variable at once.
    let polled = |rows: &[(String, f64, f64)]| rows.iter().find(|r| r.0 == "static-rt").unwrap().2;
    let kvm = run(KVM, 0);
    let tcg = run(TCG, 0);
    assert!(polled(&kvm) > 0.0, "kvm: {kvm:?}");
    assert_eq!(polled(&tcg), 0.0, "tcg: {tcg:?}");
}

#[test]
fn tcg_costs_out_of_range_are_refused_by_name() {
    let text = "[[vms]]\naccel = { type = \"tcg\", translation_factor = 0.5 }\n";
    let e = Scenario::from_toml(text).unwrap_err();
    assert!(e.to_string().contains("translation_factor"), "{e}");
    let e = Scenario::from_toml("[[vms]]\naccel = { type = \"hvf\" }\n").unwrap_err();
    assert!(e.to_string().contains("hvf"), "{e}");
}
