//! The checks CI runs on a `results.json`: what must hold whatever the timing (no latency or
//! throughput figure is asserted; those are goals, reported in the table).

use std::path::Path;

use serde::Serialize;

use crate::error::{LabError, Result};
use crate::results::{ConfigResult, Configuration, LabResults, Scheduling};

/// One check and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckOutcome {
    /// What must hold.
    pub check: String,
    /// Whether it held.
    pub passed: bool,
    /// The evidence, or what went wrong.
    pub detail: String,
}

fn outcome(check: impl Into<String>, passed: bool, detail: impl Into<String>) -> CheckOutcome {
    CheckOutcome {
        check: check.into(),
        passed,
        detail: detail.into(),
    }
}

/// Reads and checks a `results.json`.
pub fn check_file(path: &Path) -> Result<Vec<CheckOutcome>> {
    let text = std::fs::read_to_string(path).map_err(LabError::io("read", path))?;
    let results: LabResults = serde_json::from_str(&text).map_err(|error| {
        LabError::Run(format!(
            "{} is not a lab results file: {error}",
            path.display()
        ))
    })?;
    Ok(check(&results, &Configuration::ALL))
}

/// Checks `results`; every configuration in `required` must be present.
pub fn check(results: &LabResults, required: &[Configuration]) -> Vec<CheckOutcome> {
    let mut outcomes = Vec::new();
    outcomes.push(outcome(
        "the accelerator is recorded",
        results.accelerator.is_some(),
        results
            .accelerator
            .map_or("no guest booted".to_owned(), |accel| accel.to_string()),
    ));
    for config in required {
        let name = config.name();
        if !results.configs.contains_key(&name) {
            outcomes.push(outcome(
                format!("{name}: configuration ran"),
                false,
                "missing from results",
            ));
        }
    }
    for result in results.ordered() {
        outcomes.extend(check_config(result));
    }
    outcomes
}

fn check_config(result: &ConfigResult) -> Vec<CheckOutcome> {
    let name = &result.name;
    let mut outcomes = vec![
        outcome(
            format!("{name}: completed"),
            result.error.is_none(),
            result.error.as_deref().map_or("ok".to_owned(), |error| {
                error.lines().next().unwrap_or_default().to_owned()
            }),
        ),
        outcome(
            format!("{name}: guest cyclictest collected samples"),
            result.guest.latency.samples > 0,
            format!("{} samples", result.guest.latency.samples),
        ),
        outcome(
            format!("{name}: no QEMU thread left real-time"),
            result.leftover_rt_threads.is_empty() && !result.guests.is_empty(),
            if result.guests.is_empty() {
                "no guest ran, nothing was checked".to_owned()
            } else if result.leftover_rt_threads.is_empty() {
                "all QEMU threads back to normal before QEMU stopped".to_owned()
            } else {
                format!("{:?}", result.leftover_rt_threads)
            },
        ),
    ];
    if result.scheduling == Scheduling::Pvsched.name() {
        outcomes.push(outcome(
            format!("{name}: the daemon boosted vCPU threads"),
            result.boosts > 0,
            format!(
                "{} boosts; vCPU threads RT in {:.0}% of {} samples",
                result.boosts,
                result.rt_fraction * 100.0,
                result.policy_samples
            ),
        ));
        let heartbeats: Vec<String> = result
            .guests
            .iter()
            .map(|guest| format!("{} -> {}", guest.heartbeat_before, guest.heartbeat_after))
            .collect();
        outcomes.push(outcome(
            format!("{name}: the guest module's heartbeat advanced"),
            result.heartbeat_advanced,
            format!("heartbeat {}", heartbeats.join(", ")),
        ));
        outcomes.push(outcome(
            format!("{name}: the daemon exited cleanly on SIGTERM"),
            result.hostd.as_ref().is_some_and(|exit| exit.clean),
            result
                .hostd
                .as_ref()
                .map_or("the daemon did not run".to_owned(), |exit| {
                    exit.status.clone()
                }),
        ));
        if result.rogue {
            outcomes.push(outcome(
                format!("{name}: the rogue guest was throttled"),
                result.throttles > 0,
                format!("{} throttles", result.throttles),
            ));
        }
    }
    outcomes
}

/// Prints the outcomes, one line each, and returns how many failed.
pub fn print(outcomes: &[CheckOutcome]) -> usize {
    let mut failed = 0;
    for item in outcomes {
        let mark = if item.passed { "ok  " } else { "FAIL" };
        failed += usize::from(!item.passed);
        println!("{mark} {} ({})", item.check, item.detail);
    }
    failed
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::hostd::HostdExit;
    use crate::hostload::LoadSpec;
    use crate::hostsched::RtThread;
    use crate::results::{GuestRun, GuestSide, LatencyFigures, RunParams};

    fn passing(config: Configuration) -> ConfigResult {
        let pvsched = config.scheduling == Scheduling::Pvsched;
        ConfigResult {
            name: config.name(),
            scheduling: config.scheduling.name().into(),
            rogue: config.rogue,
            guest: GuestSide {
                latency: LatencyFigures {
                    samples: 1000,
                    ..LatencyFigures::default()
                },
                histogram: vec![],
            },
            boosts: if pvsched { 10 } else { 0 },
            throttles: if pvsched && config.rogue { 3 } else { 0 },
            heartbeat_advanced: true,
            guests: vec![GuestRun {
                heartbeat_before: 1,
                heartbeat_after: 9,
                ..GuestRun::default()
            }],
            hostd: pvsched.then(|| HostdExit {
                status: "exit status: 0".into(),
                clean: true,
                died_early: false,
                log_tail: String::new(),
                log: "hostd.log".into(),
                status_file: None,
            }),
            ..ConfigResult::default()
        }
    }

    fn results(configs: BTreeMap<String, ConfigResult>) -> LabResults {
        LabResults {
            version: 1,
            accelerator: Some(crate::Accelerator::Tcg),
            kvm_fallback: None,
            params: RunParams {
                quick: true,
                vcpus: 2,
                guests: 1,
                memory_mib: 256,
                interval_us: 1000,
                duration_s: 15,
                warmup_s: 2,
                guest_rt_prio: 90,
                static_rt_prio: 8,
                static_rt_all_threads: false,
                host_cyclictest_prio: 1,
                load: LoadSpec::seed003(2),
                module_params: "enable=1".into(),
                hostd_period_us: 1000,
                hostd_rt_prio: 10,
                host_cpus: 2,
                host_kernel: "6.1".into(),
                guest_kernel: "6.1".into(),
                configs: vec![],
            },
            configs,
            goals: vec![],
            elapsed_s: 1.0,
        }
    }

    fn all_passing() -> BTreeMap<String, ConfigResult> {
        Configuration::ALL
            .iter()
            .map(|&config| (config.name(), passing(config)))
            .collect()
    }

    #[test]
    fn all_good_passes() {
        let outcomes = check(&results(all_passing()), &Configuration::ALL);
        assert!(outcomes.iter().all(|o| o.passed), "{outcomes:#?}");
        // accelerator + 6 × 3 + 2 pvsched × 3 + 1 rogue throttle
        assert_eq!(outcomes.len(), 1 + 18 + 6 + 1);
    }

    #[test]
    fn each_failure_is_named() {
        let mut configs = all_passing();
        configs.remove("static-rt");
        configs
            .get_mut("vanilla")
            .expect("vanilla")
            .guest
            .latency
            .samples = 0;
        let pvsched = configs.get_mut("pvsched").expect("pvsched");
        pvsched.boosts = 0;
        pvsched.heartbeat_advanced = false;
        configs.get_mut("rogue-pvsched").expect("rogue").throttles = 0;
        configs
            .get_mut("rogue-static-rt")
            .expect("rogue static")
            .leftover_rt_threads
            .push(RtThread {
                tid: 42,
                name: "CPU 1/TCG".into(),
                policy: "fifo/8".into(),
            });
        let failed: Vec<String> = check(&results(configs), &Configuration::ALL)
            .into_iter()
            .filter(|o| !o.passed)
            .map(|o| o.check)
            .collect();
        assert_eq!(
            failed,
            [
                "static-rt: configuration ran",
                "vanilla: guest cyclictest collected samples",
                "pvsched: the daemon boosted vCPU threads",
                "pvsched: the guest module's heartbeat advanced",
                "rogue-static-rt: no QEMU thread left real-time",
                "rogue-pvsched: the rogue guest was throttled",
            ]
        );
    }

    #[test]
    fn results_round_trip_through_json() {
        let original = results(all_passing());
        let text = serde_json::to_string(&original).expect("serialize");
        let value: serde_json::Value = serde_json::from_str(&text).expect("parse");
        // The keys the issue names.
        let pvsched = &value["configs"]["pvsched"];
        for key in ["avg_us", "p99_us", "max_us", "samples"] {
            assert!(pvsched["guest"][key].is_number(), "guest.{key}");
        }
        for key in ["max_us", "bogo_ops_per_s"] {
            assert!(pvsched["host"][key].is_number(), "host.{key}");
        }
        assert!(pvsched["boosts"].is_number() && pvsched["throttles"].is_number());
        assert_eq!(value["accelerator"], "tcg");
        assert!(value["params"]["interval_us"].is_number());
        let back: LabResults = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, original);
    }
}
