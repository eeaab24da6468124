//! `calibrate` against a fixture in the lab's `results.json` shape.

use pvsched_sim::calibrate::{calibrate, parse, ModelParams, Options};

const FIXTURE: &str = include_str!("fixtures/lab_results.json");

/// A real lab run (TCG, 2 vCPUs, 1 ms, 70 s per configuration) and the parameters
/// `pvsched sim calibrate docs/lab-f80f0d2/results.json --fit-out docs/lab-f80f0d2/sim-params.toml`
/// fitted on its baseline configurations.
const LAB: &str = include_str!("../../../docs/lab-f80f0d2/results.json");
const LAB_PARAMS: &str = include_str!("../../../docs/lab-f80f0d2/sim-params.toml");

/// Short simulated runs for the tests: the held-out figures at 3 s are within a
/// few points of those at 20 s (38% against 36% median guest error; docs/sim.md,
/// "Calibration").
fn short(params: Option<ModelParams>) -> Options {
    Options {
        seed: 1,
        max_duration_s: 3.0,
        params,
        fit_seeds: vec![1],
        fit_duration_s: 0.5,
    }
}

#[test]
fn the_fixture_parses_and_is_simulated_side_by_side() {
    let (params, configs) = parse(FIXTURE).expect("fixture");
    assert_eq!(params.vcpus, 2);
    assert_eq!(params.load, [2, 1, 1, 1]);
    assert_eq!(configs.len(), 4);
    let cal = calibrate(FIXTURE, &short(None)).unwrap_or_else(|e| panic!("seed 1: {e}"));
    assert!(cal.fitted_here);
    let table = cal.table();
    for config in ["vanilla", "static-rt", "pvsched", "rogue-pvsched"] {
        assert!(table.contains(config), "{config} missing:\n{table}");
    }
    let row = |c: &str, m: &str| {
        cal.rows
            .iter()
            .find(|r| r.config == c && r.metric == m)
            .unwrap_or_else(|| panic!("row {c} {m}"))
    };
    let r = row("vanilla", "guest avg us");
    assert!(r.simulated.is_some() && r.measured == Some(812.0) && r.rel_error.is_some());
    // Only vanilla is a baseline configuration: it is fitted on, the rest held out.
    assert!(r.fitted);
    assert!(!row("pvsched", "guest avg us").fitted);
    // The rogue guest is throttled in simulation as in the lab.
    assert!(
        row("rogue-pvsched", "throttles").simulated.unwrap() > 0.0,
        "{table}"
    );
    // Directions agree with the lab: pvsched and static RT beat vanilla on guest latency.
    let avg = |c: &str| row(c, "guest avg us").simulated.unwrap();
    assert!(
        avg("pvsched") < avg("vanilla") && avg("static-rt") < avg("vanilla"),
        "{table}"
    );
    assert!(cal.median_abs_rel_error.is_some());
}

/// The documented bound of the held-out prediction of the committed lab run
/// (docs/sim.md): the same parameters, simulated for 3 s per configuration.
#[test]
fn the_committed_lab_run_is_predicted_within_the_documented_bound() {
    let params = ModelParams::from_toml(LAB_PARAMS).expect("committed parameters");
    let cal = calibrate(LAB, &short(Some(params))).unwrap_or_else(|e| panic!("seed 1: {e}"));
    let table = cal.table();
    let s = &cal.summary;
    assert!(s.guest_median.unwrap() <= 0.45, "{table}");
    assert!(s.host_p99_median.unwrap() <= 0.50, "{table}");
    assert!(s.guest_worst_factor.unwrap() <= 15.0, "{table}");
    assert_eq!(s.orderings, 6, "{table}");
    assert!(s.orderings_matched >= 4, "{table}");
    // The baseline configurations stay close to what they were fitted to.
    assert!(s.fit_guest_median.unwrap() <= 0.45, "{table}");
    // Held-out rows are the non-baseline configurations only.
    let held: Vec<&str> = cal
        .rows
        .iter()
        .filter(|r| !r.fitted)
        .map(|r| r.config.as_str())
        .collect();
    assert!(held.contains(&"static-rt") && held.contains(&"rogue-pvsched"));
    assert!(!held.contains(&"idle") && !held.contains(&"vanilla"));
}

/// The fit is deterministic; it keeps a change only when it lowers the cost, so
/// leaving the defaults means it found a better fit.
#[test]
fn fitting_the_committed_lab_run_is_deterministic_and_leaves_its_start() {
    use pvsched_sim::calibrate::fit;
    let (params, configs) = parse(LAB).unwrap();
    let (a, cost_a) = fit(&params, &configs, &[1], 0.5).unwrap();
    let (b, cost_b) = fit(&params, &configs, &[1], 0.5).unwrap();
    assert_eq!(a, b);
    assert_eq!(cost_a, cost_b);
    assert_ne!(a, ModelParams::default());
    // Written out and read back, the parameters are the same.
    let back = ModelParams::from_toml(&a.to_toml("the test")).unwrap();
    assert_eq!(back, a);
    // A value out of range is refused with its name.
    let e = ModelParams::from_toml("translation_factor = 0.5").unwrap_err();
    assert!(e.to_string().contains("translation_factor"), "{e}");
    let e = ModelParams::from_toml("bogus = 1").unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
}

const OVERCOMMIT: &str = include_str!("fixtures/overcommit_results.json");

#[test]
fn the_overcommit_fixture_parses_into_the_labs_shape() {
    use pvsched_sim::calibrate::overcommit::parse;
    let (p, configs) = parse(OVERCOMMIT).expect("fixture");
    assert_eq!(p.accelerator, "kvm");
    assert_eq!((p.host_cpus, p.load_workers, p.cpu_load), (2, 2, 80));
    assert_eq!((p.groups_per_vcpu, p.fds, p.loops), (1, 20, 5));
    assert_eq!(p.duration_s, 20.0);
    let sizes: Vec<u32> = p.vms.iter().map(|v| v.1).collect();
    assert_eq!(sizes, [4, 2, 1]);
    let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["vanilla", "pvsched", "pvsched-introspect"]);
    assert_eq!(configs[0].vms[0].score, Some(41000.0));
    assert_eq!(configs[2].vms[2].vcpus, 1);
}

#[test]
fn the_overcommit_fixture_is_simulated_side_by_side() {
    use pvsched_sim::calibrate::{calibrate_lab, Report};
    // A one-second window keeps the test short; the command simulates the lab's.
    let report = calibrate_lab(
        OVERCOMMIT,
        &Options {
            max_duration_s: 1.0,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("seed 1: {e}"));
    let Report::Overcommit(cal) = &report else {
        panic!("seed 1: not read as an overcommit result");
    };
    let table = report.table();
    assert!(
        table.contains("| config | vm | vCPUs | lab msgs/s | simulated msgs/s | rel. error |"),
        "{table}"
    );
    assert_eq!(cal.simulated_s, 1.0);
    // One row per configuration and VM, each with both scores and the error.
    assert_eq!(cal.rows.len(), 9, "{table}");
    for r in &cal.rows {
        let (lab, sim) = (r.lab.unwrap(), r.simulated.unwrap());
        assert!(
            sim > 0.0,
            "{} {}: no simulated messages\n{table}",
            r.config,
            r.vm
        );
        let e = r.rel_error.unwrap();
        assert!((e - (sim - lab) / lab).abs() < 1e-12);
    }
    assert!(table.contains("| vanilla | vm0 | 4 | 41000 |"), "{table}");
    // The lab's verdicts as the fixture records them, next to the model's.
    let verdict = |c: &str| cal.verdicts.iter().find(|v| v.config == c).unwrap();
    assert!(!verdict("vanilla").lab.as_ref().unwrap().is_empty());
    assert!(verdict("pvsched-introspect")
        .lab
        .as_ref()
        .unwrap()
        .is_empty());
    assert!(verdict("vanilla").simulated.is_some(), "{table}");
    assert!(
        table.contains("| vanilla | present: vm0 (4) < vm1 (2) |"),
        "{table}"
    );
    assert!(cal.median_abs_rel_error.is_some());
    // The configurations ran as the lab's: the daemon, and guest RAM read only in
    // pvsched-introspect.
    let sim = |c: &str| {
        cal.simulation
            .results
            .iter()
            .find(|p| p.policy == c)
            .unwrap()
    };
    assert_eq!(sim("vanilla").vms[0].boosts, None);
    assert_eq!(sim("pvsched").vms[0].lock_grants, Some(0));
    assert!(sim("pvsched-introspect")
        .vms
        .iter()
        .any(|v| v.lock_grants.unwrap() > 0));
}

#[test]
fn a_latency_result_is_still_read_as_one() {
    use pvsched_sim::calibrate::{calibrate_lab, Report};
    let report = calibrate_lab(FIXTURE, &short(None)).unwrap_or_else(|e| panic!("seed 1: {e}"));
    assert!(matches!(report, Report::Latency(_)));
}

/// The daemon's policy recorded by the lab is what the simulation replays; a
/// results file without one is replayed with the budgets of its time, and a
/// recorded policy the daemon would refuse is refused here too.
#[test]
fn the_recorded_daemon_policy_is_replayed_and_validated() {
    let (before, _) = parse(LAB).unwrap();
    assert_eq!(before.hostd_policy.vm_budget_ns, 30_000_000);
    assert_eq!(before.hostd_policy.offender_streak, 0);

    let mut v: serde_json::Value = serde_json::from_str(LAB).unwrap();
    let recorded = pvsched_policy::PolicyConfig {
        vm_budget_ns: 12_000_000,
        ..pvsched_policy::PolicyConfig::default()
    };
    v["params"]["hostd_policy"] = serde_json::to_value(&recorded).unwrap();
    let (params, _) = parse(&v.to_string()).unwrap();
    assert_eq!(params.hostd_policy, recorded);

    v["params"]["hostd_policy"]["offender_budget_percent"] = 0.into();
    let err = parse(&v.to_string()).unwrap_err().to_string();
    assert!(err.contains("hostd_policy"), "{err}");
}
