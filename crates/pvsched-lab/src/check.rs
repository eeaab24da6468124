//! The checks CI runs on a `results.json`: what must hold whatever the timing (no latency or
//! throughput figure is asserted; those are goals, reported in the table).

use std::path::Path;

use serde::Serialize;

use crate::configrun::ExperimentResults;
use crate::error::{LabError, Result};
use crate::guestlock::{self, GuestLockConfig, GuestLockConfigResult, GuestLockResults};
use crate::hostd::HostdExit;
use crate::iothread::{self, IothreadConfig, IothreadConfigResult, IothreadResults};
use crate::isolation::{self, IsolationConfig, IsolationConfigResult, IsolationResults};
use crate::overcommit::{self, OvercommitConfig, OvercommitConfigResult, OvercommitResults};
use crate::results::{ConfigResult, Configuration, GuestRun, LabResults, PolicyShare, Scheduling};

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

/// Reads and checks a `results.json`; for the median file of a `--repeat` run (it lists
/// its runs), checks every run's `results.json`, each check prefixed with its run.
pub fn check_file(path: &Path) -> Result<Vec<CheckOutcome>> {
    let text = std::fs::read_to_string(path).map_err(LabError::io("read", path))?;
    let not_results = |error: serde_json::Error| {
        LabError::Run(format!(
            "{} is not a lab results file: {error}",
            path.display()
        ))
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(not_results)?;
    if let Some(runs) = value.get("runs") {
        let runs: Vec<String> = serde_json::from_value(runs.clone()).map_err(not_results)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut outcomes = vec![outcome(
            "the repeated run recorded its runs",
            !runs.is_empty(),
            format!("{} runs: {}", runs.len(), runs.join(", ")),
        )];
        for run in &runs {
            let label = Path::new(run)
                .parent()
                .and_then(|parent| parent.to_str())
                .filter(|parent| !parent.is_empty())
                .unwrap_or(run);
            for mut item in check_file(&dir.join(run))? {
                item.check = format!("{label}: {}", item.check);
                outcomes.push(item);
            }
        }
        return Ok(outcomes);
    }
    match value.get("experiment").and_then(|e| e.as_str()) {
        Some(overcommit::EXPERIMENT) => {
            let results: OvercommitResults = serde_json::from_value(value).map_err(not_results)?;
            return Ok(check_overcommit(&results));
        }
        Some(guestlock::EXPERIMENT) => {
            let results: GuestLockResults = serde_json::from_value(value).map_err(not_results)?;
            return Ok(check_guest_lock(&results));
        }
        Some(iothread::EXPERIMENT) => {
            let results: IothreadResults = serde_json::from_value(value).map_err(not_results)?;
            return Ok(check_iothread(&results));
        }
        Some(isolation::EXPERIMENT) => {
            let results: IsolationResults = serde_json::from_value(value).map_err(not_results)?;
            return Ok(check_isolation(&results));
        }
        _ => {}
    }
    let results: LabResults = serde_json::from_value(value).map_err(not_results)?;
    Ok(check(&results))
}

/// Checks an overcommit run: every configuration asked for ran without error; every VM
/// completed hackbench rounds on the vCPUs it was given, with the guest module attached
/// and its heartbeat advancing; guest RAM was shared exactly where the configuration
/// shares it; vCPU threads were sampled, and never real-time without the daemon; the
/// daemon exited cleanly; every QEMU thread was read before QEMU stopped and none was
/// real-time; the inversion verdict is there wherever VMs of different sizes ran. No
/// score is asserted: whether the inversion shows is what the run measures.
pub fn check_overcommit(results: &OvercommitResults) -> Vec<CheckOutcome> {
    let mut outcomes = check_envelope(results, &results.params.configs, "overcommit", |name| {
        OvercommitConfig::parse(name).is_some()
    });
    for result in results.ordered() {
        outcomes.extend(check_overcommit_config(result, results));
    }
    outcomes
}

fn check_overcommit_config(
    result: &OvercommitConfigResult,
    results: &OvercommitResults,
) -> Vec<CheckOutcome> {
    let name = &result.name;
    let vms = &result.vms;
    let asked = &results.params.vm_vcpus;
    let config = OvercommitConfig::parse(name);
    let mut outcomes = vec![outcome(
        format!("{name}: completed"),
        result.error.is_none(),
        result.error.as_deref().map_or("ok".to_owned(), |error| {
            error.lines().next().unwrap_or_default().to_owned()
        }),
    )];
    let sizes: Vec<u32> = vms.iter().map(|vm| vm.vcpus).collect();
    outcomes.push(outcome(
        format!("{name}: every guest asked for ran, with its vCPUs"),
        !vms.is_empty() && &sizes == asked,
        format!("asked {asked:?}, ran {sizes:?}"),
    ));
    let scores: Vec<String> = vms
        .iter()
        .map(|vm| {
            format!(
                "{} {} rounds, {:.0} messages/s{}",
                vm.name,
                vm.rounds,
                vm.score,
                vm.error.as_deref().map_or(String::new(), |error| format!(
                    " ({})",
                    error.lines().next().unwrap_or_default()
                ))
            )
        })
        .collect();
    outcomes.push(outcome(
        format!("{name}: every VM completed hackbench rounds"),
        !vms.is_empty()
            && vms
                .iter()
                .all(|vm| vm.error.is_none() && vm.rounds > 0 && vm.messages > 0 && vm.score > 0.0),
        if scores.is_empty() {
            "no VM".to_owned()
        } else {
            scores.join("; ")
        },
    ));
    let heartbeats: Vec<String> = vms
        .iter()
        .map(|vm| {
            format!(
                "{} {}, heartbeat {} -> {}",
                vm.name,
                if vm.module_attached {
                    "attached"
                } else {
                    "NOT attached"
                },
                vm.heartbeat_before,
                vm.heartbeat_after
            )
        })
        .collect();
    outcomes.push(outcome(
        format!("{name}: the guest module attached and its heartbeat advanced in every VM"),
        !vms.is_empty()
            && vms
                .iter()
                .all(|vm| vm.module_attached && vm.heartbeat_after > vm.heartbeat_before),
        if heartbeats.is_empty() {
            "no VM".to_owned()
        } else {
            heartbeats.join("; ")
        },
    ));
    let wants_shared = config.is_some_and(OvercommitConfig::shared_ram);
    outcomes.push(outcome(
        format!("{name}: guest RAM shared exactly where the configuration shares it"),
        config.is_some() && result.shared_ram == wants_shared,
        format!("shared_ram {} (wanted {wants_shared})", result.shared_ram),
    ));
    let share = vms
        .iter()
        .fold(PolicyShare::default(), |sum, vm| sum.plus(vm.vcpu_policy));
    let daemon = config.is_some_and(OvercommitConfig::runs_daemon);
    outcomes.push(outcome(
        format!(
            "{name}: every vCPU thread sampled in /proc{}",
            if daemon {
                ""
            } else {
                ", never real-time without the daemon"
            }
        ),
        !vms.is_empty()
            && vms.iter().all(|vm| vm.vcpu_policy.samples > 0)
            && (daemon || share.rt_samples == 0),
        format!("vCPU threads RT in {}", share.describe()),
    ));
    if daemon {
        outcomes.push(daemon_exited_cleanly(name, result.hostd.as_ref()));
    }
    let checked: Vec<String> = vms
        .iter()
        .map(|vm| match &vm.exit_check {
            Some(check) => format!(
                "{} {} threads, {} RT",
                vm.name,
                check.threads_checked,
                check.rt_threads.len()
            ),
            None => format!("{} not checked", vm.name),
        })
        .collect();
    outcomes.push(outcome(
        format!("{name}: every QEMU thread read back non-RT before QEMU stopped"),
        !vms.is_empty()
            && vms.iter().all(|vm| {
                vm.exit_check
                    .as_ref()
                    .is_some_and(|check| check.threads_checked > 0 && check.rt_threads.is_empty())
            })
            && result.leftover_rt_threads.is_empty(),
        if checked.is_empty() {
            "no VM".to_owned()
        } else {
            checked.join("; ")
        },
    ));
    let mut distinct = asked.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() > 1 {
        outcomes.push(outcome(
            format!("{name}: the inversion verdict is recorded"),
            result.inversion.is_some(),
            overcommit::verdict(result.inversion.as_ref()),
        ));
    }
    outcomes
}

/// What every experiment's results must show whatever they measured: the accelerator is
/// recorded, the run asked for configurations the experiment knows (`kind` names it), and
/// each of them is in the results.
fn check_envelope<P, C>(
    results: &ExperimentResults<P, C>,
    asked: &[String],
    kind: &str,
    known: impl Fn(&str) -> bool,
) -> Vec<CheckOutcome> {
    let mut outcomes = vec![outcome(
        "the accelerator is recorded",
        results.accelerator.is_some(),
        results
            .accelerator
            .map_or("no guest booted".to_owned(), |accel| accel.to_string()),
    )];
    let unknown: Vec<&String> = asked.iter().filter(|name| !known(name)).collect();
    outcomes.push(outcome(
        format!("the run asked for known {kind} configurations"),
        !asked.is_empty() && unknown.is_empty(),
        if asked.is_empty() {
            "no configuration in params.configs".to_owned()
        } else if unknown.is_empty() {
            asked.join(", ")
        } else {
            format!("unknown: {unknown:?}")
        },
    ));
    for name in asked {
        if !results.configs.contains_key(name) {
            outcomes.push(outcome(
                format!("{name}: configuration ran"),
                false,
                "missing from results",
            ));
        }
    }
    outcomes
}

/// The daemon of configuration `name` exited with status 0 on SIGTERM (it restores every
/// thread on that path).
fn daemon_exited_cleanly(name: &str, hostd: Option<&HostdExit>) -> CheckOutcome {
    outcome(
        format!("{name}: the daemon exited cleanly on SIGTERM"),
        hostd.is_some_and(|exit| exit.clean),
        hostd.map_or("the daemon did not run".to_owned(), |exit| {
            format!(
                "{}{}",
                exit.status,
                if exit.died_early { ", died early" } else { "" }
            )
        }),
    )
}

/// Checks a guest-lock run: every configuration asked for ran without error, with the
/// guest module attached and its heartbeat advancing; every lock completed acquisitions
/// on every thread; the host republished the watched line exactly when a daemon ran; with
/// the daemon the boost probe ran, without it no vCPU thread was ever real-time; the daemon
/// exited cleanly; every QEMU thread was read back non-RT before QEMU stopped. No rate or
/// latency is asserted: which lock wins is what the run measures.
pub fn check_guest_lock(results: &GuestLockResults) -> Vec<CheckOutcome> {
    let mut outcomes = check_envelope(results, &results.params.configs, "guest-lock", |name| {
        GuestLockConfig::parse(name).is_some()
    });
    for result in results.ordered() {
        outcomes.extend(check_guest_lock_config(result, &results.params.locks));
    }
    outcomes
}

fn check_guest_lock_config(result: &GuestLockConfigResult, locks: &[String]) -> Vec<CheckOutcome> {
    let name = &result.name;
    let daemon = GuestLockConfig::parse(name).is_some_and(GuestLockConfig::runs_daemon);
    let mut outcomes = vec![
        outcome(
            format!("{name}: completed"),
            result.error.is_none(),
            result.error.as_deref().map_or("ok".to_owned(), |error| {
                error.lines().next().unwrap_or_default().to_owned()
            }),
        ),
        outcome(
            format!("{name}: the guest module attached and its heartbeat advanced"),
            result.module_attached && result.heartbeat_after > result.heartbeat_before,
            format!(
                "attached {}, heartbeat {} -> {}",
                result.module_attached, result.heartbeat_before, result.heartbeat_after
            ),
        ),
    ];
    let ran: Vec<String> = result
        .lock_bench
        .iter()
        .flat_map(|bench| &bench.locks)
        .map(|run| {
            format!(
                "{} {} ops (fewest on a thread {})",
                run.lock, run.result.ops, run.result.min_thread_ops
            )
        })
        .collect();
    outcomes.push(outcome(
        format!("{name}: every lock ran, every thread acquired it"),
        result.lock_bench.as_ref().is_some_and(|bench| {
            let names: Vec<&str> = bench.locks.iter().map(|run| run.lock.as_str()).collect();
            names == locks.iter().map(String::as_str).collect::<Vec<_>>()
                && bench.locks.iter().all(|run| run.result.min_thread_ops > 0)
        }),
        if ran.is_empty() {
            "no lock-bench output".to_owned()
        } else {
            ran.join("; ")
        },
    ));
    outcomes.push(outcome(
        format!(
            "{name}: the host {} the watched line",
            if daemon {
                "republished"
            } else {
                "never published"
            }
        ),
        result.freshness.is_some() && result.host_lines_republished == Some(daemon),
        format!(
            "republished {:?}, freshness {}",
            result.host_lines_republished,
            if result.freshness.is_some() {
                "measured"
            } else {
                "missing"
            }
        ),
    ));
    if daemon {
        outcomes.push(outcome(
            format!("{name}: the boost probe saw boosts"),
            result
                .boost_probe
                .is_some_and(|probe| probe.boost_seen.count > 0),
            result
                .boost_probe
                .map_or("no boost-probe output".to_owned(), |probe| {
                    format!(
                        "{} boosts seen, {} timed out",
                        probe.boost_seen.count, probe.timed_out
                    )
                }),
        ));
        outcomes.push(daemon_exited_cleanly(name, result.hostd.as_ref()));
    } else {
        outcomes.push(outcome(
            format!("{name}: vCPU threads sampled, never real-time without the daemon"),
            result.vcpu_policy.samples > 0 && result.vcpu_policy.rt_samples == 0,
            format!("vCPU threads RT in {}", result.vcpu_policy.describe()),
        ));
    }
    outcomes.push(outcome(
        format!("{name}: every QEMU thread read back non-RT before QEMU stopped"),
        result
            .exit_check
            .as_ref()
            .is_some_and(|check| check.threads_checked > 0 && check.rt_threads.is_empty())
            && result.leftover_rt_threads.is_empty(),
        result
            .exit_check
            .as_ref()
            .map_or("not checked".to_owned(), |check| {
                format!(
                    "{} threads, {} RT, {} left RT after the daemon",
                    check.threads_checked,
                    check.rt_threads.len(),
                    result.leftover_rt_threads.len()
                )
            }),
    ));
    outcomes
}

/// Checks an iothread run: every configuration asked for ran without error; io-bench read
/// and cyclictest measured on the I/O vCPU; the I/O vCPU thread's schedstat was sampled;
/// the disk had an IOThread exactly where the configuration gives it one, real-time only
/// under `iothread-rt`; every QEMU thread was read back non-RT before QEMU stopped. No rate
/// or latency is asserted: which placement wins is what the run measures.
pub fn check_iothread(results: &IothreadResults) -> Vec<CheckOutcome> {
    let mut outcomes = check_envelope(results, &results.params.configs, "iothread", |name| {
        IothreadConfig::parse(name).is_some()
    });
    for result in results.ordered() {
        outcomes.extend(check_iothread_config(result));
    }
    outcomes
}

fn check_iothread_config(result: &IothreadConfigResult) -> Vec<CheckOutcome> {
    let name = &result.name;
    let config = IothreadConfig::parse(name);
    let wants_iothread = config.is_some_and(IothreadConfig::has_iothread);
    let wants_rt = config.is_some_and(IothreadConfig::iothread_rt);
    vec![
        outcome(
            format!("{name}: completed"),
            result.error.is_none(),
            result.error.as_deref().map_or("ok".to_owned(), |error| {
                error.lines().next().unwrap_or_default().to_owned()
            }),
        ),
        outcome(
            format!("{name}: io-bench read the disk and cyclictest measured the I/O vCPU"),
            result.io_bench.as_ref().is_some_and(|b| b.reads > 0)
                && result.latency.as_ref().is_some_and(|l| l.samples > 0),
            format!(
                "{} reads, {} cyclictest samples",
                result.io_bench.as_ref().map_or(0, |b| b.reads),
                result.latency.as_ref().map_or(0, |l| l.samples)
            ),
        ),
        outcome(
            format!("{name}: the I/O vCPU thread's schedstat was sampled"),
            result.io_vcpu_slices.is_some_and(|s| s.intervals > 0),
            result
                .io_vcpu_slices
                .map_or("no samples".to_owned(), |s| format!("{} intervals", s.intervals)),
        ),
        outcome(
            format!("{name}: an IOThread exactly where the configuration puts one, RT only under iothread-rt"),
            result.iothread == wants_iothread
                && (!wants_iothread || result.iothread_tid.is_some())
                && result.iothread_rt_prio.is_some() == wants_rt,
            format!(
                "iothread {}, tid {:?}, FIFO {:?}",
                result.iothread, result.iothread_tid, result.iothread_rt_prio
            ),
        ),
        outcome(
            format!("{name}: every QEMU thread read back non-RT before QEMU stopped"),
            result
                .exit_check
                .as_ref()
                .is_some_and(|check| check.threads_checked > 0 && check.rt_threads.is_empty()),
            result
                .exit_check
                .as_ref()
                .map_or("not checked".to_owned(), |check| {
                    format!("{} threads, {} RT", check.threads_checked, check.rt_threads.len())
                }),
        ),
    ]
}

/// Checks an isolation run: every configuration asked for ran without error and the guest
/// measured; the vCPU thread was FIFO throughout; with isolation the vCPU thread ran only
/// on the isolated CPUs, QEMU's main thread only where the configuration put it, the
/// isolated cpuset held exactly those threads, and the undo restored every value read
/// before; every QEMU thread was read back non-RT before QEMU stopped; and where both ran,
/// the isolated p99 is at most the shared p99 (the one latency figure asserted: what
/// isolation is for).
pub fn check_isolation(results: &IsolationResults) -> Vec<CheckOutcome> {
    let mut outcomes = check_envelope(results, &results.params.configs, "isolation", |name| {
        IsolationConfig::parse(name).is_some()
    });
    let params = &results.params;
    for result in results.ordered() {
        outcomes.extend(check_isolation_config(
            result,
            &params.isolated_cpus,
            &params.housekeeping_cpus,
        ));
    }
    let measured = |name: &str| {
        results
            .configs
            .get(name)
            .filter(|result| result.error.is_none() && result.latency.samples > 0)
    };
    if let Some(shared) = measured(IsolationConfig::Shared.name()) {
        for config in [IsolationConfig::Isolated, IsolationConfig::IsolatedMain] {
            if let Some(isolated) = measured(config.name()) {
                outcomes.push(outcome(
                    format!("{}: p99 at most the shared p99", config.name()),
                    isolated.latency.p99_us <= shared.latency.p99_us,
                    format!(
                        "{} us against {} us",
                        isolated.latency.p99_us, shared.latency.p99_us
                    ),
                ));
            }
        }
    }
    outcomes
}

fn check_isolation_config(
    result: &IsolationConfigResult,
    isolated: &[u32],
    housekeeping: &[u32],
) -> Vec<CheckOutcome> {
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
            format!("{name}: the guest booted and cyclictest measured"),
            result.boot_ms > 0 && result.latency.samples > 0,
            format!(
                "booted in {} ms, {} samples",
                result.boot_ms, result.latency.samples
            ),
        ),
        outcome(
            format!("{name}: the vCPU thread was SCHED_FIFO throughout"),
            result.vcpu.policy.samples > 0
                && result.vcpu.policy.rt_samples == result.vcpu.policy.samples,
            format!("RT in {}", result.vcpu.policy.describe()),
        ),
    ];
    if result.isolated {
        let (main_where, main_cpus) = if result.main_on_isolated {
            ("isolated", isolated)
        } else {
            ("housekeeping", housekeeping)
        };
        outcomes.push(outcome(
            format!("{name}: the vCPU thread ran only on the isolated CPUs"),
            result.vcpu.only_on(isolated),
            format!(
                "seen on CPUs {:?} (isolated {isolated:?})",
                result.vcpu.cpus()
            ),
        ));
        outcomes.push(outcome(
            format!("{name}: QEMU's main thread ran only on the {main_where} CPUs"),
            result.main_thread.only_on(main_cpus),
            format!(
                "seen on CPUs {:?} ({main_where} {main_cpus:?})",
                result.main_thread.cpus()
            ),
        ));
        let expected = result.expected_isolated_tasks();
        outcomes.push(outcome(
            format!("{name}: the isolated cpuset held exactly the placed threads"),
            result.isolated_cpuset_tasks.as_ref() == Some(&expected),
            format!(
                "held {}, placed {expected:?}",
                result
                    .isolated_cpuset_tasks
                    .as_ref()
                    .map_or("(not read)".to_owned(), |tids| format!("{tids:?}"))
            ),
        ));
        outcomes.push(outcome(
            format!("{name}: the undo restored every value read before the isolation"),
            result.host_restore.as_ref().is_some_and(|r| r.restored()),
            result
                .host_restore
                .as_ref()
                .map_or("no undo recorded".to_owned(), |r| {
                    if r.restored() {
                        format!(
                            "{} values restored; {} files and {} tasks as before",
                            r.restored_values, r.files_compared, r.tasks_compared
                        )
                    } else {
                        r.undo_error
                            .iter()
                            .chain(&r.differences)
                            .take(3)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("; ")
                    }
                }),
        ));
    } else {
        outcomes.push(outcome(
            format!("{name}: nothing was isolated"),
            result.host_restore.is_none() && result.isolated_cpuset_tasks.is_none(),
            "no isolation recorded",
        ));
    }
    outcomes.push(outcome(
        format!("{name}: every QEMU thread read back non-RT before QEMU stopped"),
        result
            .exit_check
            .as_ref()
            .is_some_and(|check| check.threads_checked > 0 && check.rt_threads.is_empty())
            && result.leftover_rt_threads.is_empty(),
        result
            .exit_check
            .as_ref()
            .map_or("not checked".to_owned(), |check| {
                format!(
                    "{} threads, {} RT",
                    check.threads_checked,
                    check.rt_threads.len()
                )
            }),
    ));
    outcomes
}

/// Checks `results`: every configuration the run asked for (`params.configs`) must be
/// present, and each must show what must hold whatever the timing. Every check says what
/// it measured, and one that found nothing to measure fails.
pub fn check(results: &LabResults) -> Vec<CheckOutcome> {
    let mut outcomes = Vec::new();
    outcomes.push(outcome(
        "the accelerator is recorded",
        results.accelerator.is_some(),
        results
            .accelerator
            .map_or("no guest booted".to_owned(), |accel| accel.to_string()),
    ));
    let asked = &results.params.configs;
    let unknown: Vec<&String> = asked
        .iter()
        .filter(|name| Configuration::parse(name).is_none())
        .collect();
    outcomes.push(outcome(
        "the run asked for known configurations",
        !asked.is_empty() && unknown.is_empty(),
        if asked.is_empty() {
            "no configuration in params.configs".to_owned()
        } else if unknown.is_empty() {
            asked.join(", ")
        } else {
            format!("unknown: {unknown:?}")
        },
    ));
    for name in asked {
        if !results.configs.contains_key(name) {
            outcomes.push(outcome(
                format!("{name}: configuration ran"),
                false,
                "missing from results",
            ));
        }
    }
    for result in results.ordered() {
        outcomes.extend(check_config(result, results));
    }
    outcomes
}

/// Least RT share of a thread that static RT raised for the whole window (the policy is set
/// before the window opens and restored after it closes, so anything below 100 % is a
/// sample that raced the restore).
const STATIC_RT_MIN_SHARE: f64 = 0.99;

fn percent(share: Option<f64>) -> String {
    share.map_or("–".to_owned(), |share| format!("{:.0}%", share * 100.0))
}

fn check_config(result: &ConfigResult, results: &LabResults) -> Vec<CheckOutcome> {
    let name = &result.name;
    let guests = &result.guests;
    let mut outcomes = vec![outcome(
        format!("{name}: completed"),
        result.error.is_none(),
        result.error.as_deref().map_or("ok".to_owned(), |error| {
            error.lines().next().unwrap_or_default().to_owned()
        }),
    )];

    // Guest and host measurements.
    let per_guest: Vec<String> = guests
        .iter()
        .map(|guest| format!("{} {}", guest.name, guest.latency.samples))
        .collect();
    outcomes.push(outcome(
        format!("{name}: guest cyclictest collected samples in every guest"),
        result.guest.latency.samples > 0
            && !guests.is_empty()
            && guests.iter().all(|guest| guest.latency.samples > 0),
        format!(
            "{} samples; per guest: {}",
            result.guest.latency.samples,
            if per_guest.is_empty() {
                "no guest".to_owned()
            } else {
                per_guest.join(", ")
            }
        ),
    ));
    let load_ran = !results.params.load.is_empty() && !result.idle;
    outcomes.push(outcome(
        format!("{name}: host cyclictest and host load measured"),
        result.host.latency.samples > 0 && (!load_ran || result.host.bogo_ops_per_s > 0.0),
        format!(
            "{} host cyclictest samples; {:.0} bogo-ops/s{}",
            result.host.latency.samples,
            result.host.bogo_ops_per_s,
            if load_ran {
                ""
            } else {
                " (no load in this configuration)"
            }
        ),
    ));
    let stall_samples = result.host.stalls.map_or(0, |stalls| stalls.samples);
    outcomes.push(outcome(
        format!("{name}: the stall probe measured beside host cyclictest"),
        stall_samples > 0,
        match result.host.stalls {
            Some(stalls) => format!(
                "{stall_samples} host-task samples; machine stall max {} µs, host max beyond \
                 stalls {} µs",
                stalls.reference_max_us, stalls.beyond_stalls_max_us
            ),
            None => "no stall probe figures".to_owned(),
        },
    ));
    let heartbeats: Vec<String> = guests
        .iter()
        .map(|guest| {
            format!(
                "{} {}, heartbeat {} -> {}",
                guest.name,
                if guest.module_attached {
                    "attached"
                } else {
                    "NOT attached"
                },
                guest.heartbeat_before,
                guest.heartbeat_after
            )
        })
        .collect();
    outcomes.push(outcome(
        format!("{name}: the guest module attached and its heartbeat advanced"),
        !guests.is_empty()
            && guests.iter().all(|guest| {
                guest.module_attached && guest.heartbeat_after > guest.heartbeat_before
            }),
        if heartbeats.is_empty() {
            "no guest".to_owned()
        } else {
            heartbeats.join("; ")
        },
    ));

    // Thread policies sampled in /proc while the guests ran.
    let vcpu_share = |guest: &GuestRun| {
        guest
            .vcpu_policy
            .iter()
            .fold(PolicyShare::default(), |sum, &share| sum.plus(share))
    };
    let all_vcpus = guests.iter().fold(PolicyShare::default(), |sum, guest| {
        sum.plus(vcpu_share(guest))
    });
    let all_main = guests.iter().fold(PolicyShare::default(), |sum, guest| {
        sum.plus(guest.main_thread_policy)
    });
    let per_vcpu: Vec<String> = guests
        .iter()
        .flat_map(|guest| {
            guest
                .vcpu_policy
                .iter()
                .map(|share| percent(share.fraction()))
                .chain(std::iter::once(format!(
                    "main {}",
                    percent(guest.main_thread_policy.fraction())
                )))
        })
        .collect();
    let sampled_detail = format!(
        "vCPU threads RT in {}; main threads RT in {}; per thread: {}",
        all_vcpus.describe(),
        all_main.describe(),
        per_vcpu.join(", ")
    );
    outcomes.push(outcome(
        format!("{name}: every vCPU thread and QEMU's main thread were sampled in /proc"),
        !guests.is_empty()
            && guests.iter().all(|guest| {
                !guest.vcpu_tids.is_empty()
                    && guest.vcpu_policy.len() == guest.vcpu_tids.len()
                    && guest.vcpu_policy.iter().all(|share| share.samples > 0)
                    && guest.main_thread_policy.samples > 0
            }),
        sampled_detail.clone(),
    ));
    let every_vcpu = |pred: &dyn Fn(f64) -> bool| {
        !guests.is_empty()
            && guests.iter().all(|guest| {
                !guest.vcpu_policy.is_empty()
                    && guest
                        .vcpu_policy
                        .iter()
                        .all(|share| share.fraction().is_some_and(pred))
            })
    };
    let every_main = |pred: &dyn Fn(f64) -> bool| {
        !guests.is_empty()
            && guests
                .iter()
                .all(|guest| guest.main_thread_policy.fraction().is_some_and(pred))
    };
    match Scheduling::parse(&result.scheduling) {
        Some(Scheduling::Vanilla) => outcomes.push(outcome(
            format!("{name}: no vCPU or main thread was RT"),
            every_vcpu(&|share| share == 0.0) && every_main(&|share| share == 0.0),
            sampled_detail,
        )),
        Some(Scheduling::StaticRt) => outcomes.push(outcome(
            format!("{name}: every vCPU thread was RT, the main thread was not"),
            every_vcpu(&|share| share >= STATIC_RT_MIN_SHARE) && every_main(&|share| share == 0.0),
            sampled_detail,
        )),
        Some(Scheduling::StaticRtAll) => outcomes.push(outcome(
            format!("{name}: every vCPU thread and the main thread were RT"),
            every_vcpu(&|share| share >= STATIC_RT_MIN_SHARE)
                && every_main(&|share| share >= STATIC_RT_MIN_SHARE),
            sampled_detail,
        )),
        Some(scheduling @ (Scheduling::Pvsched | Scheduling::PvschedDeadline)) => {
            outcomes.push(outcome(
                format!("{name}: the daemon boosted vCPU threads (RT in /proc, changes applied)"),
                all_vcpus.rt_samples > 0 && result.applies.is_some_and(|n| n > 0),
                format!(
                    "{sampled_detail}; the daemon applied {} changes to vCPU threads ({} boosts decided)",
                    result
                        .applies
                        .map_or("no reported".to_owned(), |n| n.to_string()),
                    result.boosts
                ),
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
            if result.rogue && scheduling == Scheduling::PvschedDeadline {
                outcomes.push(rogue_held_by_its_reservation(result, results));
            } else if result.rogue {
                outcomes.push(rogue_throttled(result, results));
            }
        }
        None => outcomes.push(outcome(
            format!("{name}: known scheduling"),
            false,
            format!("scheduling {:?}", result.scheduling),
        )),
    }

    // Nothing left RT: every thread of every QEMU, just before it was stopped.
    let mut problems = Vec::new();
    let mut threads = 0u32;
    for guest in guests {
        match &guest.exit_check {
            None => problems.push(format!("{}: not checked", guest.name)),
            Some(exit) => {
                threads += exit.threads_checked;
                // At least the vCPU threads and the main thread must have been read.
                if (exit.threads_checked as usize) <= guest.vcpu_tids.len() {
                    problems.push(format!(
                        "{}: only {} threads read for {} vCPUs",
                        guest.name,
                        exit.threads_checked,
                        guest.vcpu_tids.len()
                    ));
                }
                for thread in &exit.rt_threads {
                    problems.push(format!(
                        "{}: tid {} {:?} {}",
                        guest.name, thread.tid, thread.name, thread.policy
                    ));
                }
            }
        }
    }
    for thread in &result.leftover_rt_threads {
        let listed = guests.iter().any(|guest| {
            guest
                .exit_check
                .as_ref()
                .is_some_and(|exit| exit.rt_threads.contains(thread))
        });
        if !listed {
            problems.push(format!(
                "tid {} {:?} {}",
                thread.tid, thread.name, thread.policy
            ));
        }
    }
    let when = if result.hostd.is_some() {
        "after the daemon exited, before QEMU stopped"
    } else {
        "after the scheduling was undone, before QEMU stopped"
    };
    outcomes.push(outcome(
        format!("{name}: no QEMU thread left real-time"),
        !guests.is_empty() && problems.is_empty(),
        if guests.is_empty() {
            "no guest ran, nothing was checked".to_owned()
        } else if problems.is_empty() {
            format!(
                "{threads} threads of {} QEMU processes read {when}: none RT",
                guests.len()
            )
        } else {
            format!("{threads} threads read {when}: {}", problems.join("; "))
        },
    ));
    outcomes
}

/// Under rogue-pvsched the rogue vCPU's own slot was throttled, and its thread was RT less
/// often than under static RT in the same run (which holds it RT all the time; without
/// rogue-static-rt in the run, less than always).
fn rogue_throttled(result: &ConfigResult, results: &LabResults) -> CheckOutcome {
    let check = format!("{}: the rogue vCPU was throttled", result.name);
    let Some((guest, vcpu)) = result.rogue_vcpu() else {
        return outcome(check, false, "no guest recorded a rogue vCPU");
    };
    let throttles = guest.slots.get(vcpu).map(|slot| slot.throttles);
    let share = guest.vcpu_policy.get(vcpu).copied().unwrap_or_default();
    let baseline_name = Configuration::new(Scheduling::StaticRt, true).name();
    let baseline = results
        .configs
        .get(&baseline_name)
        .filter(|baseline| baseline.error.is_none())
        .and_then(ConfigResult::rogue_vcpu)
        .and_then(|(guest, vcpu)| guest.vcpu_policy.get(vcpu).copied())
        .filter(|share| share.samples > 0);
    let (bound, against) = match baseline {
        Some(baseline) => (
            baseline.fraction().unwrap_or(1.0),
            format!("{baseline_name}'s {}", baseline.describe()),
        ),
        None => (1.0, format!("100% ({baseline_name} not in this run)")),
    };
    let lower = share.fraction().is_some_and(|fraction| fraction < bound);
    outcome(
        check,
        throttles.is_some_and(|n| n > 0) && lower,
        format!(
            "{} vCPU {vcpu} (tid {}): {} throttles of its slot; RT in {} against {against}",
            guest.name,
            guest
                .vcpu_tids
                .get(vcpu)
                .map_or("?".to_owned(), ToString::to_string),
            throttles.map_or("no slot counters".to_owned(), |n| n.to_string()),
            share.describe()
        ),
    )
}

/// Under rogue-pvsched-dl the rogue vCPU's thread was seen in `SCHED_DEADLINE` and, boosted
/// or not, the CPU time it ran boosted stayed below half a CPU over the run: the kernel's
/// reservation held a FIFO-99 busy loop that static RT lets run a whole CPU.
fn rogue_held_by_its_reservation(result: &ConfigResult, results: &LabResults) -> CheckOutcome {
    let check = format!(
        "{}: the rogue vCPU was held by its reservation",
        result.name
    );
    let Some((guest, vcpu)) = result.rogue_vcpu() else {
        return outcome(check, false, "no guest recorded a rogue vCPU");
    };
    let share = guest.vcpu_policy.get(vcpu).copied().unwrap_or_default();
    let boosted_ns = guest.slots.get(vcpu).map(|slot| slot.boosted_ns);
    // The daemon ran through warm-up and measurement; allow its start and stop on top.
    let run_s = f64::from(results.params.warmup_s + results.params.duration_s) + 10.0;
    let cpu = boosted_ns.map(|ns| ns as f64 / 1e9 / run_s);
    let seen = share.rt_samples > 0;
    outcome(
        check,
        seen && cpu.is_some_and(|cpu| cpu > 0.0 && cpu < 0.5),
        format!(
            "{} vCPU {vcpu}: RT in {}; boosted CPU {} over at most {run_s:.0} s",
            guest.name,
            share.describe(),
            cpu.map_or("not reported".to_owned(), |cpu| format!(
                "{cpu:.3} of a CPU"
            ))
        ),
    )
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
    use crate::page::SlotCounters;
    use crate::results::{ExitCheck, GuestSide, HostSide, LatencyFigures, RunParams};
    use crate::stallprobe::StallFigures;

    const VCPUS: usize = 2;
    const SAMPLES: u64 = 300;

    fn share(rt_fraction: f64) -> PolicyShare {
        PolicyShare {
            samples: SAMPLES,
            rt_samples: (SAMPLES as f64 * rt_fraction) as u64,
        }
    }

    /// A result where everything that must hold holds, shaped like a real run's.
    fn passing(config: Configuration) -> ConfigResult {
        let scheduling = config.scheduling;
        let pvsched = scheduling.runs_daemon();
        let (vcpu_rt, main_rt) = match scheduling {
            Scheduling::Vanilla => (0.0, 0.0),
            Scheduling::StaticRt => (1.0, 0.0),
            Scheduling::StaticRtAll => (1.0, 1.0),
            Scheduling::Pvsched | Scheduling::PvschedDeadline => (0.5, 0.3),
        };
        let mut vcpu_policy = vec![share(vcpu_rt); VCPUS];
        let mut slots = vec![SlotCounters::default(); VCPUS];
        if pvsched {
            slots[0].boosts = 10;
        }
        if config.rogue && pvsched {
            vcpu_policy[VCPUS - 1] = share(0.25);
            slots[VCPUS - 1] = SlotCounters {
                boosts: 40,
                throttles: 30,
                boosted_ns: 1_000_000,
            };
        }
        let guest = GuestRun {
            name: format!("lab1-{}-0", config.name()),
            workload: if config.rogue { "rogue" } else { "cyclictest" }.into(),
            qemu_pid: 100,
            vcpu_tids: vec![101, 102],
            module: Some("loaded".into()),
            module_attached: true,
            heartbeat_before: 1,
            heartbeat_after: 9,
            slots,
            latency: LatencyFigures {
                samples: 1000,
                ..LatencyFigures::default()
            },
            rogue_vcpu: config.rogue.then_some(VCPUS as u32 - 1),
            vcpu_policy,
            main_thread_policy: share(main_rt),
            exit_check: Some(ExitCheck {
                threads_checked: 9,
                rt_threads: vec![],
            }),
            ..GuestRun::default()
        };
        ConfigResult {
            name: config.name(),
            scheduling: scheduling.name().into(),
            rogue: config.rogue,
            idle: config.idle,
            guest: GuestSide {
                latency: LatencyFigures {
                    samples: 1000,
                    ..LatencyFigures::default()
                },
                histogram: vec![],
            },
            host: HostSide {
                latency: LatencyFigures {
                    samples: 2000,
                    ..LatencyFigures::default()
                },
                bogo_ops_per_s: if config.idle { 0.0 } else { 2500.0 },
                stalls: Some(StallFigures {
                    samples: 2000,
                    ..StallFigures::default()
                }),
                ..HostSide::default()
            },
            boosts: if pvsched { 50 } else { 0 },
            throttles: if pvsched && config.rogue { 30 } else { 0 },
            applies: pvsched.then_some(120),
            heartbeat_advanced: true,
            policy_samples: SAMPLES * VCPUS as u64,
            rt_fraction: vcpu_rt,
            guests: vec![guest],
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
                vcpus: VCPUS as u32,
                guests: 1,
                memory_mib: 256,
                interval_us: 1000,
                duration_s: 15,
                warmup_s: 2,
                guest_rt_prio: 90,
                static_rt_prio: 8,
                static_rt_all_threads: false,
                channel: Default::default(),
                host_cyclictest_prio: 1,
                load: LoadSpec::seed003(2),
                module_params: "enable=1".into(),
                hostd_period_us: 1000,
                hostd_rt_prio: 10,
                hostd_policy: None,
                host_cpus: 2,
                host_kernel: "6.1".into(),
                guest_kernel: "6.1".into(),
                configs: Configuration::ALL.iter().map(|c| c.name()).collect(),
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

    /// The names of the failed checks.
    fn failed(results: &LabResults) -> Vec<String> {
        check(results)
            .into_iter()
            .filter(|o| !o.passed)
            .map(|o| o.check)
            .collect()
    }

    /// `all_passing` with `change` applied to configuration `name`.
    fn with(name: &str, change: impl FnOnce(&mut ConfigResult)) -> LabResults {
        let mut configs = all_passing();
        change(configs.get_mut(name).expect(name));
        results(configs)
    }

    #[test]
    fn a_rogue_vcpu_not_held_by_its_deadline_reservation_fails() {
        let name = "rogue-pvsched-dl: the rogue vCPU was held by its reservation";
        let failed = |lab: &LabResults| -> Vec<String> {
            check(lab)
                .into_iter()
                .filter(|o| !o.passed)
                .map(|o| o.check)
                .collect()
        };
        assert!(failed(&results(all_passing())).is_empty());
        let never_rt = with("rogue-pvsched-dl", |r| {
            r.guests[0].vcpu_policy[VCPUS - 1] = share(0.0)
        });
        assert!(failed(&never_rt).contains(&name.to_owned()));
        let whole_cpu = with("rogue-pvsched-dl", |r| {
            r.guests[0].slots[VCPUS - 1].boosted_ns = 3_600_000_000_000;
        });
        assert_eq!(failed(&whole_cpu), [name]);
        let unreported = with("rogue-pvsched-dl", |r| r.guests[0].slots.clear());
        assert!(failed(&unreported).contains(&name.to_owned()));
    }

    #[test]
    fn a_configuration_without_stall_probe_figures_fails() {
        let lab = with("pvsched", |r| r.host.stalls = None);
        let failed: Vec<String> = check(&lab)
            .into_iter()
            .filter(|o| !o.passed)
            .map(|o| o.check)
            .collect();
        assert_eq!(
            failed,
            ["pvsched: the stall probe measured beside host cyclictest"]
        );
    }

    #[test]
    fn all_good_passes_and_every_check_says_what_it_measured() {
        let outcomes = check(&results(all_passing()));
        assert!(outcomes.iter().all(|o| o.passed), "{outcomes:#?}");
        // accelerator, configurations asked for; per configuration 8 (completed, guest
        // samples, host measured, stall probe, heartbeat, sampled, policy, nothing left
        // RT); the five daemon ones 1 more (clean exit), the two rogue daemon ones 1 more
        // (throttled, or held by the reservation).
        assert_eq!(
            outcomes.len(),
            2 + 8 * Configuration::ALL.len() + 5 + 2,
            "{outcomes:#?}"
        );
        // The idle reference ran without load: no throughput, and that is no failure.
        let idle_host = outcomes
            .iter()
            .find(|o| o.check == "idle: host cyclictest and host load measured")
            .expect("idle host check");
        assert!(idle_host.detail.contains("no load"), "{}", idle_host.detail);
        assert!(outcomes.iter().all(|o| !o.detail.is_empty()));
        let throttled = outcomes
            .iter()
            .find(|o| o.check == "rogue-pvsched: the rogue vCPU was throttled")
            .expect("throttle check");
        assert!(
            throttled.detail.contains("30 throttles")
                && throttled.detail.contains("25% of 300 samples")
                && throttled
                    .detail
                    .contains("rogue-static-rt's 100% of 300 samples"),
            "{}",
            throttled.detail
        );
        let boosted = outcomes
            .iter()
            .find(|o| o.check.starts_with("pvsched: the daemon boosted"))
            .expect("boost check");
        assert!(
            boosted.detail.contains("applied 120 changes"),
            "{}",
            boosted.detail
        );
    }

    #[test]
    fn rogue_slot_not_throttled_fails() {
        // Throttles elsewhere in the VM do not count: only the rogue vCPU's own slot.
        let results = with("rogue-pvsched", |r| {
            r.guests[0].slots[1].throttles = 0;
            r.guests[0].slots[0].throttles = 25;
            r.throttles = 25;
        });
        assert_eq!(
            failed(&results),
            ["rogue-pvsched: the rogue vCPU was throttled"]
        );
    }

    #[test]
    fn rogue_as_rt_as_under_static_rt_fails() {
        let results = with("rogue-pvsched", |r| r.guests[0].vcpu_policy[1] = share(1.0));
        assert_eq!(
            failed(&results),
            ["rogue-pvsched: the rogue vCPU was throttled"]
        );
        // Without rogue-static-rt in the run the bound is "less than always".
        let mut configs = all_passing();
        configs.remove("rogue-static-rt");
        configs.get_mut("rogue-pvsched").expect("rogue").guests[0].vcpu_policy[1] = share(1.0);
        let mut lab = results_without("rogue-static-rt", configs);
        assert_eq!(
            failed(&lab),
            ["rogue-pvsched: the rogue vCPU was throttled"]
        );
        lab.configs.get_mut("rogue-pvsched").expect("rogue").guests[0].vcpu_policy[1] = share(0.2);
        assert!(failed(&lab).is_empty());
    }

    fn results_without(name: &str, configs: BTreeMap<String, ConfigResult>) -> LabResults {
        let mut lab = results(configs);
        lab.params.configs.retain(|config| config != name);
        lab
    }

    #[test]
    fn rogue_without_samples_or_record_fails() {
        let results_a = with("rogue-pvsched", |r| {
            r.guests[0].vcpu_policy[1] = PolicyShare::default();
        });
        assert_eq!(
            failed(&results_a),
            [
                "rogue-pvsched: every vCPU thread and QEMU's main thread were sampled in /proc",
                "rogue-pvsched: the rogue vCPU was throttled",
            ]
        );
        let results_b = with("rogue-pvsched", |r| r.guests[0].rogue_vcpu = None);
        assert_eq!(
            failed(&results_b),
            ["rogue-pvsched: the rogue vCPU was throttled"]
        );
    }

    #[test]
    fn zero_samples_fail() {
        let results_a = with("vanilla", |r| {
            r.guest.latency.samples = 0;
            r.guests[0].latency.samples = 0;
        });
        assert_eq!(
            failed(&results_a),
            ["vanilla: guest cyclictest collected samples in every guest"]
        );
        let results_b = with("static-rt", |r| r.host.latency.samples = 0);
        assert_eq!(
            failed(&results_b),
            ["static-rt: host cyclictest and host load measured"]
        );
        // No policy samples: nothing says vanilla had no RT thread, nor that static-rt had.
        for name in ["vanilla", "static-rt", "static-rt-all"] {
            let lab = with(name, |r| {
                for guest in &mut r.guests {
                    guest.vcpu_policy = vec![PolicyShare::default(); VCPUS];
                    guest.main_thread_policy = PolicyShare::default();
                }
            });
            assert_eq!(failed(&lab).len(), 2, "{name}: {:?}", failed(&lab));
        }
        // No guest at all.
        let lab = with("pvsched", |r| r.guests.clear());
        let failures = failed(&lab);
        assert!(
            failures.contains(&"pvsched: no QEMU thread left real-time".to_owned())
                && failures.contains(
                    &"pvsched: the daemon boosted vCPU threads (RT in /proc, changes applied)"
                        .to_owned()
                ),
            "{failures:?}"
        );
    }

    #[test]
    fn boosted_needs_rt_in_proc_and_applied_changes() {
        // Decided boosts alone are not boosts.
        let decided_only = with("pvsched", |r| r.applies = Some(0));
        assert_eq!(
            failed(&decided_only),
            ["pvsched: the daemon boosted vCPU threads (RT in /proc, changes applied)"]
        );
        let not_reported = with("pvsched", |r| r.applies = None);
        assert_eq!(failed(&not_reported).len(), 1);
        let never_rt = with("pvsched", |r| {
            for share in &mut r.guests[0].vcpu_policy {
                share.rt_samples = 0;
            }
        });
        assert_eq!(
            failed(&never_rt),
            ["pvsched: the daemon boosted vCPU threads (RT in /proc, changes applied)"]
        );
    }

    #[test]
    fn rt_thread_left_fails() {
        let leftover = RtThread {
            tid: 105,
            name: "worker".into(),
            policy: "fifo/8".into(),
        };
        for name in ["vanilla", "static-rt-all", "pvsched", "rogue-pvsched"] {
            let lab = with(name, |r| {
                r.guests[0]
                    .exit_check
                    .as_mut()
                    .expect("checked")
                    .rt_threads
                    .push(leftover.clone());
                r.leftover_rt_threads.push(leftover.clone());
            });
            let outcome = check(&lab)
                .into_iter()
                .find(|o| !o.passed)
                .expect("a failure");
            assert_eq!(
                outcome.check,
                format!("{name}: no QEMU thread left real-time")
            );
            assert!(outcome.detail.contains("tid 105"), "{}", outcome.detail);
        }
        // Not checked, or too few threads read, is not "nothing left".
        let unchecked = with("static-rt", |r| r.guests[0].exit_check = None);
        assert_eq!(
            failed(&unchecked),
            ["static-rt: no QEMU thread left real-time"]
        );
        let too_few = with("static-rt", |r| {
            r.guests[0].exit_check = Some(ExitCheck {
                threads_checked: 2,
                rt_threads: vec![],
            });
        });
        assert_eq!(
            failed(&too_few),
            ["static-rt: no QEMU thread left real-time"]
        );
    }

    #[test]
    fn static_baselines_must_have_raised_their_threads() {
        let partial = with("static-rt", |r| r.guests[0].vcpu_policy[0] = share(0.5));
        assert_eq!(
            failed(&partial),
            ["static-rt: every vCPU thread was RT, the main thread was not"]
        );
        let main_not_raised = with("static-rt-all", |r| {
            r.guests[0].main_thread_policy = share(0.0);
        });
        assert_eq!(
            failed(&main_not_raised),
            ["static-rt-all: every vCPU thread and the main thread were RT"]
        );
        let vanilla_rt = with("vanilla", |r| r.guests[0].main_thread_policy = share(0.1));
        assert_eq!(
            failed(&vanilla_rt),
            ["vanilla: no vCPU or main thread was RT"]
        );
    }

    #[test]
    fn each_failure_is_named() {
        let mut configs = all_passing();
        configs.remove("static-rt");
        let pvsched = configs.get_mut("pvsched").expect("pvsched");
        pvsched.guests[0].heartbeat_after = pvsched.guests[0].heartbeat_before;
        pvsched.hostd.as_mut().expect("daemon").clean = false;
        configs.get_mut("rogue-vanilla").expect("rogue").error = Some("boom\nmore".into());
        assert_eq!(
            failed(&results(configs)),
            [
                "static-rt: configuration ran",
                "pvsched: the guest module attached and its heartbeat advanced",
                "pvsched: the daemon exited cleanly on SIGTERM",
                "rogue-vanilla: completed",
            ]
        );
        let mut nothing_asked = results(all_passing());
        nothing_asked.params.configs.clear();
        assert_eq!(
            failed(&nothing_asked),
            ["the run asked for known configurations"]
        );
    }

    #[test]
    fn a_subset_run_checks_what_it_asked_for() {
        let configs: BTreeMap<String, ConfigResult> = ["rogue-vanilla", "rogue-pvsched"]
            .into_iter()
            .map(|name| {
                let config = Configuration::parse(name).expect(name);
                (name.to_owned(), passing(config))
            })
            .collect();
        let mut lab = results(configs);
        lab.params.configs = vec!["rogue-vanilla".into(), "rogue-pvsched".into()];
        assert!(failed(&lab).is_empty(), "{:?}", failed(&lab));
    }

    #[test]
    fn check_file_follows_the_runs_of_a_median_file() {
        let dir = std::env::temp_dir().join(format!("pvsched-lab-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let good = results(all_passing());
        let bad = with("rogue-pvsched", |r| r.guests[0].slots[1].throttles = 0);
        let mut files = Vec::new();
        for (index, run) in [&good, &bad].into_iter().enumerate() {
            let file = format!("run-{}/results.json", index + 1);
            crate::report::write_all(run, &dir.join(format!("run-{}", index + 1)))
                .expect("write run");
            files.push(file);
        }
        let summary = crate::median::summarise(&[good, bad], &files);
        crate::median::write(&summary, &dir).expect("write medians");
        let outcomes = check_file(&dir.join("results.json")).expect("check");
        let failures: Vec<&str> = outcomes
            .iter()
            .filter(|o| !o.passed)
            .map(|o| o.check.as_str())
            .collect();
        assert_eq!(
            failures,
            ["run-2: rogue-pvsched: the rogue vCPU was throttled"]
        );
        assert!(outcomes.iter().any(|o| o.check.starts_with("run-1: ")));
        let _ = std::fs::remove_dir_all(&dir);
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
        for key in ["max_us", "p99_us", "bogo_ops_per_s"] {
            assert!(pvsched["host"][key].is_number(), "host.{key}");
        }
        assert!(pvsched["boosts"].is_number() && pvsched["throttles"].is_number());
        assert!(pvsched["applies"].is_number());
        assert!(pvsched["guests"][0]["vcpu_policy"][0]["rt_samples"].is_number());
        assert_eq!(value["accelerator"], "tcg");
        assert!(value["params"]["interval_us"].is_number());
        let back: LabResults = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, original);
    }

    /// `results.json` of a quick overcommit run under TCG on the 2-CPU development machine.
    const OVERCOMMIT_QUICK: &str =
        include_str!("../tests/fixtures/overcommit-results-tcg-quick.json");

    fn failed_overcommit(results: &OvercommitResults) -> Vec<String> {
        check_overcommit(results)
            .into_iter()
            .filter(|item| !item.passed)
            .map(|item| item.check)
            .collect()
    }

    #[test]
    fn a_recorded_overcommit_run_passes_and_what_it_must_show_is_checked() {
        let recorded: OvercommitResults =
            serde_json::from_str(OVERCOMMIT_QUICK).expect("a recorded run parses");
        assert_eq!(failed_overcommit(&recorded), Vec::<String>::new());
        // check_file tells the experiments apart by the `experiment` field.
        let path = std::env::temp_dir().join(format!(
            "pvsched-check-overcommit-{}.json",
            std::process::id()
        ));
        std::fs::write(&path, OVERCOMMIT_QUICK).expect("write");
        let outcomes = check_file(&path).expect("check file");
        std::fs::remove_file(&path).expect("cleanup");
        assert_eq!(outcomes, check_overcommit(&recorded));

        let broken = |change: &dyn Fn(&mut OvercommitResults)| {
            let mut results = recorded.clone();
            change(&mut results);
            failed_overcommit(&results)
        };
        assert_eq!(
            broken(&|r| r.configs.get_mut("pvsched").unwrap().vms[1].rounds = 0),
            ["pvsched: every VM completed hackbench rounds"]
        );
        assert_eq!(
            broken(&|r| r.configs.get_mut("vanilla").unwrap().vms[0]
                .vcpu_policy
                .rt_samples = 1),
            ["vanilla: every vCPU thread sampled in /proc, never real-time without the daemon"]
        );
        assert_eq!(
            broken(&|r| r.configs.get_mut("pvsched-introspect").unwrap().shared_ram = false),
            ["pvsched-introspect: guest RAM shared exactly where the configuration shares it"]
        );
        assert_eq!(
            broken(&|r| r.configs.get_mut("pvsched").unwrap().vms[2].heartbeat_after = 0),
            ["pvsched: the guest module attached and its heartbeat advanced in every VM"]
        );
        assert_eq!(
            broken(&|r| {
                let config = r.configs.get_mut("pvsched").unwrap();
                config.hostd.as_mut().unwrap().clean = false;
            }),
            ["pvsched: the daemon exited cleanly on SIGTERM"]
        );
        assert_eq!(
            broken(&|r| {
                let config = r.configs.get_mut("vanilla").unwrap();
                config.vms[0].exit_check = None;
            }),
            ["vanilla: every QEMU thread read back non-RT before QEMU stopped"]
        );
        assert_eq!(
            broken(&|r| r.configs.get_mut("vanilla").unwrap().vms.truncate(2)),
            ["vanilla: every guest asked for ran, with its vCPUs"]
        );
        assert_eq!(
            broken(&|r| {
                r.configs.remove("pvsched");
            }),
            ["pvsched: configuration ran"]
        );
        assert_eq!(
            broken(&|r| r.configs.get_mut("vanilla").unwrap().inversion = None),
            ["vanilla: the inversion verdict is recorded"]
        );
    }

    /// `results.json` of a guest-lock run under TCG on the 2-CPU development machine.
    const GUEST_LOCK: &str = include_str!("../tests/fixtures/guest-lock-results-tcg.json");

    #[test]
    fn a_recorded_guest_lock_run_passes_and_what_it_must_show_is_checked() {
        let recorded: GuestLockResults =
            serde_json::from_str(GUEST_LOCK).expect("a recorded run parses");
        let failed = |results: &GuestLockResults| -> Vec<String> {
            check_guest_lock(results)
                .into_iter()
                .filter(|item| !item.passed)
                .map(|item| item.check)
                .collect()
        };
        assert_eq!(failed(&recorded), Vec::<String>::new());
        let path = std::env::temp_dir().join(format!(
            "pvsched-check-guest-lock-{}.json",
            std::process::id()
        ));
        std::fs::write(&path, GUEST_LOCK).expect("write");
        let outcomes = check_file(&path).expect("check file");
        std::fs::remove_file(&path).expect("cleanup");
        assert_eq!(outcomes, check_guest_lock(&recorded));

        let broken = |change: &dyn Fn(&mut GuestLockResults)| {
            let mut results = recorded.clone();
            change(&mut results);
            failed(&results)
        };
        assert_eq!(
            broken(&|r| r.configs.get_mut("vanilla").unwrap().vcpu_policy.rt_samples = 3),
            ["vanilla: vCPU threads sampled, never real-time without the daemon"]
        );
        assert_eq!(
            broken(&|r| r.configs.get_mut("pvsched").unwrap().boost_probe = None),
            ["pvsched: the boost probe saw boosts"]
        );
        assert_eq!(
            broken(&|r| {
                let bench = r.configs.get_mut("pvsched").unwrap().lock_bench.as_mut();
                bench.unwrap().locks[1].result.min_thread_ops = 0;
            }),
            ["pvsched: every lock ran, every thread acquired it"]
        );
        assert_eq!(
            broken(&|r| r.configs.get_mut("vanilla").unwrap().host_lines_republished = Some(true)),
            ["vanilla: the host never published the watched line"]
        );
        assert_eq!(
            broken(&|r| {
                let config = r.configs.get_mut("pvsched").unwrap();
                config.heartbeat_after = config.heartbeat_before;
            }),
            ["pvsched: the guest module attached and its heartbeat advanced"]
        );
        assert_eq!(
            broken(&|r| {
                r.configs.remove("vanilla");
            }),
            ["vanilla: configuration ran"]
        );
    }

    /// `results.json` of an iothread run under TCG on the 2-CPU development machine.
    const IOTHREAD: &str = include_str!("../tests/fixtures/iothread-results-tcg.json");

    #[test]
    fn a_recorded_iothread_run_passes_and_what_it_must_show_is_checked() {
        let recorded: IothreadResults =
            serde_json::from_str(IOTHREAD).expect("a recorded run parses");
        let failed = |results: &IothreadResults| -> Vec<String> {
            check_iothread(results)
                .into_iter()
                .filter(|item| !item.passed)
                .map(|item| item.check)
                .collect()
        };
        assert_eq!(failed(&recorded), Vec::<String>::new());
        let path = std::env::temp_dir().join(format!(
            "pvsched-check-iothread-{}.json",
            std::process::id()
        ));
        std::fs::write(&path, IOTHREAD).expect("write");
        let outcomes = check_file(&path).expect("check file");
        std::fs::remove_file(&path).expect("cleanup");
        assert_eq!(outcomes, check_iothread(&recorded));

        let broken = |change: &dyn Fn(&mut IothreadResults)| {
            let mut results = recorded.clone();
            change(&mut results);
            failed(&results)
        };
        assert_eq!(
            broken(&|r| r.configs.get_mut("iothread").unwrap().iothread_rt_prio = Some(8)),
            ["iothread: an IOThread exactly where the configuration puts one, RT only under iothread-rt"]
        );
        assert_eq!(
            broken(&|r| r.configs.get_mut("main-loop").unwrap().io_bench = None),
            ["main-loop: io-bench read the disk and cyclictest measured the I/O vCPU"]
        );
        assert_eq!(
            broken(&|r| r.configs.get_mut("iothread-rt").unwrap().io_vcpu_slices = None),
            ["iothread-rt: the I/O vCPU thread's schedstat was sampled"]
        );
        assert_eq!(
            broken(&|r| {
                let check = r
                    .configs
                    .get_mut("iothread-rt")
                    .unwrap()
                    .exit_check
                    .as_mut();
                check.unwrap().rt_threads.push(crate::hostsched::RtThread {
                    tid: 1,
                    name: "IO io0".into(),
                    policy: "fifo/8".into(),
                });
            }),
            ["iothread-rt: every QEMU thread read back non-RT before QEMU stopped"]
        );
        assert_eq!(
            broken(&|r| {
                r.configs.remove("iothread");
            }),
            ["iothread: configuration ran"]
        );
    }

    #[test]
    fn isolation_checks_pass_on_a_good_run_and_name_what_broke() {
        use crate::isolation::tests::results;
        use crate::isolation::IsolationConfig::{Idle, Isolated, IsolatedMain, Shared};
        let good = results(&[
            (Idle, 60),
            (Shared, 9000),
            (Isolated, 700),
            (IsolatedMain, 400),
        ]);
        let outcomes = check_isolation(&good);
        let failed: Vec<&CheckOutcome> = outcomes.iter().filter(|o| !o.passed).collect();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(outcomes
            .iter()
            .any(|o| o.check == "isolated-main: p99 at most the shared p99"));
        let broken = |change: &dyn Fn(&mut IsolationResults)| -> Vec<String> {
            let mut results = good.clone();
            change(&mut results);
            check_isolation(&results)
                .into_iter()
                .filter(|o| !o.passed)
                .map(|o| o.check)
                .collect()
        };
        assert_eq!(
            broken(&|r| r.configs.get_mut("isolated").unwrap().latency.p99_us = 9001),
            ["isolated: p99 at most the shared p99"]
        );
        assert_eq!(
            broken(&|r| {
                let restore = r.configs.get_mut("isolated").unwrap().host_restore.as_mut();
                restore.unwrap().differences = vec!["cpuset.cpus: 0-1 before, 0 after".into()];
            }),
            ["isolated: the undo restored every value read before the isolation"]
        );
        assert_eq!(
            broken(&|r| {
                let config = r.configs.get_mut("isolated").unwrap();
                config.vcpu.ran_on.insert(0, 3);
            }),
            ["isolated: the vCPU thread ran only on the isolated CPUs"]
        );
        assert_eq!(
            broken(&|r| {
                let config = r.configs.get_mut("isolated-main").unwrap();
                config.main_thread.ran_on = [(0, 10)].into_iter().collect();
            }),
            ["isolated-main: QEMU's main thread ran only on the isolated CPUs"]
        );
        assert_eq!(
            broken(&|r| {
                let config = r.configs.get_mut("isolated").unwrap();
                config.isolated_cpuset_tasks = Some(vec![101, 555]);
            }),
            ["isolated: the isolated cpuset held exactly the placed threads"]
        );
        assert_eq!(
            broken(&|r| {
                let config = r.configs.get_mut("shared").unwrap();
                config.vcpu.policy.rt_samples -= 1;
            }),
            ["shared: the vCPU thread was SCHED_FIFO throughout"]
        );
        assert_eq!(
            broken(&|r| {
                let config = r.configs.get_mut("idle").unwrap();
                config.exit_check = None;
            }),
            ["idle: every QEMU thread read back non-RT before QEMU stopped"]
        );
        assert_eq!(
            broken(&|r| {
                r.configs.remove("shared");
            }),
            ["shared: configuration ran"]
        );
        // A failed shared run asserts no comparison; the failure itself is the finding.
        let failed = broken(&|r| r.configs.get_mut("shared").unwrap().error = Some("x".into()));
        assert_eq!(failed, ["shared: completed"]);
    }
}
