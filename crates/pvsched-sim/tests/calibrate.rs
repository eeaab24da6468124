//! `calibrate` against a fixture in the lab's `results.json` shape.

use pvsched_sim::calibrate::{calibrate, parse};

const FIXTURE: &str = include_str!("fixtures/lab_results.json");

#[test]
fn the_fixture_parses_and_is_simulated_side_by_side() {
    let (params, configs) = parse(FIXTURE).expect("fixture");
    assert_eq!(params.vcpus, 2);
    assert_eq!(params.load, [2, 1, 1, 1]);
    assert_eq!(configs.len(), 4);
    let cal = calibrate(FIXTURE, 1).unwrap_or_else(|e| panic!("seed 1: {e}"));
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
    let report = calibrate_lab(OVERCOMMIT, 1, 1.0).unwrap_or_else(|e| panic!("seed 1: {e}"));
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
    let report = calibrate_lab(FIXTURE, 1, 1.0).unwrap_or_else(|e| panic!("seed 1: {e}"));
    assert!(matches!(report, Report::Latency(_)));
}
