//! The command line's errors: one line each, and `pvsched status` without a configuration.

use std::process::Command;

fn pvsched() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvsched"))
}

/// Runs `pvsched ARGS`, expects a failure and returns its stderr.
fn failing(args: &[&str]) -> String {
    let out = pvsched().args(args).output().expect("run pvsched");
    assert!(!out.status.success(), "pvsched {args:?} succeeded");
    assert_eq!(out.status.code(), Some(1), "pvsched {args:?}");
    String::from_utf8(out.stderr).expect("stderr is UTF-8")
}

fn assert_one_line(stderr: &str) {
    assert!(
        stderr.starts_with("pvsched: ") && stderr.trim_end().lines().count() == 1,
        "not one error line: {stderr:?}"
    );
}

#[test]
fn status_without_a_configuration_file_asks_the_default_address_in_one_line() {
    let missing = std::env::temp_dir().join(format!("pvsched-none-{}.toml", std::process::id()));
    let stderr = failing(&["status", "--config", missing.to_str().unwrap()]);
    assert_one_line(&stderr);
    assert!(stderr.contains("127.0.0.1:9464"), "{stderr}");
}

#[test]
fn a_configuration_that_does_not_load_is_one_line_naming_the_file() {
    let bad = std::env::temp_dir().join(format!("pvsched-bad-status-{}.toml", std::process::id()));
    std::fs::write(&bad, "[daemon]\nmetrics_addr = \"0.0.0.0:9464\"\n").unwrap();
    let stderr = failing(&["status", "--config", bad.to_str().unwrap()]);
    std::fs::remove_file(&bad).ok();
    assert_one_line(&stderr);
    assert!(
        stderr.contains(bad.to_str().unwrap()) && stderr.contains("loopback"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_scenario_is_one_line() {
    assert_one_line(&failing(&["sim", "run", "no-such-scenario"]));
}
