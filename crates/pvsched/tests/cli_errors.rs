//! The command line's errors: one line each, and `pvsched status` without a configuration.
//! `pvsched top` refuses the same configuration errors, and a stdout that is not a terminal.

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

#[test]
fn top_refuses_a_configuration_that_does_not_load_before_touching_the_terminal() {
    let bad = std::env::temp_dir().join(format!("pvsched-bad-top-{}.toml", std::process::id()));
    std::fs::write(&bad, "[daemon]\nmetrics_addr = \"0.0.0.0:9464\"\n").unwrap();
    let stderr = failing(&["top", "--config", bad.to_str().unwrap()]);
    std::fs::remove_file(&bad).ok();
    assert_one_line(&stderr);
    assert!(stderr.contains(bad.to_str().unwrap()), "{stderr}");
}

#[test]
fn top_without_a_terminal_is_one_line_pointing_to_status() {
    // The output is a pipe here.
    let stderr = failing(&["top", "--addr", "127.0.0.1:9"]);
    assert_one_line(&stderr);
    assert!(
        stderr.contains("terminal") && stderr.contains("pvsched status"),
        "{stderr}"
    );
}

#[test]
fn top_refuses_an_interval_out_of_range() {
    for interval in ["0", "99", "60001", "-5"] {
        let out = pvsched()
            .args(["top", "--addr", "127.0.0.1:9"])
            .arg(format!("--interval-ms={interval}"))
            .output()
            .expect("run pvsched");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // clap's usage errors exit with 2.
        assert_eq!(out.status.code(), Some(2), "{interval}: {stderr}");
        assert!(stderr.contains("--interval-ms"), "{stderr}");
    }
}
