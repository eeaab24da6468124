//! `pvsched sim`: list, run a TOML scenario with JSON output, calibrate.

use std::path::PathBuf;
use std::process::Command;

fn pvsched() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvsched"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn sim_list_names_every_builtin() {
    let out = pvsched()
        .args(["sim", "list"])
        .output()
        .expect("run pvsched");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "kunpeng-overcommit",
        "pvsched-cyclictest",
        "halt-poll",
        "rt-isolation",
        "iothread",
        "fleet",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

#[test]
fn sim_run_writes_the_json_the_issue_names() {
    let dir = std::env::temp_dir().join(format!("pvsched-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let svg = dir.join("out.svg");
    let scenario = repo().join("examples/sim/rt-guest-busy-host.toml");
    let out = pvsched()
        .args([
            "sim",
            "run",
            scenario.to_str().unwrap(),
            "--seed",
            "3",
            "--quiet",
            "--duration-ms",
            "200",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()
        .expect("run pvsched");
    assert!(
        out.status.success(),
        "seed 3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["scenario"], "rt-guest-busy-host");
    assert_eq!(v["seed"], 3);
    assert!(v["events"].as_u64().unwrap() > 0);
    assert!(v["wall_s"].is_number());
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        assert!(r["policy"].is_string());
        for vm in r["vms"].as_array().unwrap() {
            for key in [
                "name",
                "vcpus",
                "score",
                "lat_p50_us",
                "lat_p99_us",
                "lat_max_us",
                "spin_frac",
                "steal_frac",
            ] {
                assert!(vm.get(key).is_some(), "seed 3: {key} missing");
            }
            assert!(
                vm["lat_p99_us"].is_number(),
                "seed 3: the RT guest has latency samples"
            );
        }
    }
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sim_run_halt_poll_prints_latency_against_polling_cpu_per_load_and_config() {
    let out = pvsched()
        .args(["sim", "run", "halt-poll", "--small", "--quiet"])
        .output()
        .expect("run pvsched");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table: Vec<Vec<&str>> = text
        .lines()
        .skip_while(|l| !l.starts_with("| host load | config |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    let configs = [
        "fixed-0us",
        "fixed-10us",
        "fixed-25us",
        "fixed-50us",
        "fixed-100us",
        "fixed-200us",
        "adaptive",
        "pvsched",
    ];
    assert_eq!(table.len(), 3 * configs.len(), "{text}");
    let row = |level: &str, config: &str| {
        table
            .iter()
            .find(|r| r[1] == level && r[2] == config)
            .unwrap_or_else(|| panic!("no row {level}/{config} in:\n{text}"))
    };
    for level in ["idle", "busy", "loaded"] {
        for config in configs {
            let r = row(level, config);
            // Every latency and CPU cell is a number.
            for cell in &r[3..10] {
                assert!(cell.parse::<f64>().is_ok(), "{level}/{config}: {r:?}");
            }
        }
        assert_eq!(
            row(level, "fixed-0us")[8],
            "0.00",
            "no polling, no polling CPU"
        );
    }
    // The controller's rows carry its mean window and reasons; on the loaded
    // host it polls nothing and says why.
    let loaded = row("loaded", "pvsched");
    assert_eq!((loaded[8], loaded[11]), ("0.00", "0"), "{loaded:?}");
    assert!(loaded[12].starts_with("host-loaded"), "{loaded:?}");
    assert_eq!(row("idle", "adaptive")[12], "-");
}

#[test]
fn sim_run_rejects_unknown_scenarios_and_bad_toml() {
    let out = pvsched()
        .args(["sim", "run", "no-such-scenario"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither a built-in"));
    let bad = std::env::temp_dir().join(format!("pvsched-bad-{}.toml", std::process::id()));
    std::fs::write(&bad, "name = \"x\"\nbogus_key = 1\n").unwrap();
    let out = pvsched()
        .args(["sim", "run", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_key"));
    std::fs::remove_file(&bad).ok();
}

#[test]
fn sim_calibrate_fits_writes_and_reuses_its_parameters() {
    let fixture = repo().join("crates/pvsched-sim/tests/fixtures/lab_results.json");
    let params = std::env::temp_dir().join(format!("pvsched-fit-{}.toml", std::process::id()));
    let run = |extra: &[&str]| {
        let out = pvsched()
            .args(["sim", "calibrate", fixture.to_str().unwrap()])
            .args(["--max-duration-s", "1", "--fit-duration-s", "0.5"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fitted = run(&["--fit-out", params.to_str().unwrap()]);
    assert!(
        fitted.contains("| config | role | metric | simulated | measured | rel. error |"),
        "{fitted}"
    );
    assert!(
        fitted.contains("| vanilla | fit | guest avg us |"),
        "{fitted}"
    );
    assert!(fitted.contains("| rogue-pvsched | held out |"), "{fitted}");
    assert!(fitted.contains("orderings matched"), "{fitted}");
    let written = std::fs::read_to_string(&params).unwrap();
    assert!(written.contains("main_loop_ns = "), "{written}");
    // Reused: nothing is fitted, the same parameters give the same table rows.
    let reused = run(&["--params", params.to_str().unwrap()]);
    assert!(reused.contains("model (given)"), "{reused}");
    assert!(
        reused.contains("| vanilla | baseline | guest avg us |"),
        "{reused}"
    );
    let rows = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("| rogue-pvsched"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(rows(&fitted), rows(&reused));
    // A broken parameter file is one clear error.
    std::fs::write(&params, "noise_gap_us = 0\n").unwrap();
    let out = pvsched()
        .args(["sim", "calibrate", fixture.to_str().unwrap()])
        .args(["--params", params.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("noise_gap_us"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&params).ok();
}

#[test]
fn sim_calibrate_compares_an_overcommit_result_per_vm() {
    let fixture = repo().join("crates/pvsched-sim/tests/fixtures/overcommit_results.json");
    let out = pvsched()
        .args(["sim", "calibrate", fixture.to_str().unwrap()])
        .args(["--max-duration-s", "0.5"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("| config | vm | vCPUs | lab msgs/s | simulated msgs/s | rel. error |"),
        "{text}"
    );
    assert!(
        text.contains("| pvsched-introspect | vm2 | 1 | 32900 |"),
        "{text}"
    );
    assert!(text.contains("inversion, simulated"), "{text}");
}

#[test]
fn every_example_scenario_parses() {
    let dir = repo().join("examples/sim");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            pvsched_sim_parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 3);
}

fn pvsched_sim_parse(text: &str) -> Result<(), String> {
    // Parse through the binary so this test needs no library dependency.
    let path = std::env::temp_dir().join(format!(
        "pvsched-ex-{}-{}.toml",
        std::process::id(),
        text.len()
    ));
    std::fs::write(&path, text).unwrap();
    let out = pvsched()
        .args([
            "sim",
            "run",
            path.to_str().unwrap(),
            "--quiet",
            "--duration-ms",
            "5",
        ])
        .output()
        .unwrap();
    std::fs::remove_file(&path).ok();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
