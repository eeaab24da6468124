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
