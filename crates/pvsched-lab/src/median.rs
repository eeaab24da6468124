//! Medians over repeated runs (`pvsched lab --repeat N`): runs here vary by ±20%, so a
//! figure is the median of several whole runs of the configuration set, shown with the
//! range it took. Each run keeps its own `results.json` under `run-K/`; this module writes
//! `results.json` (the [`MedianResults`] below, which lists those runs so `lab --check`
//! checks each of them) and `results.md` next to them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::qemu::Accelerator;
use crate::results::{well_behaved_latency, ConfigResult, Configuration, LabResults, RunParams};

/// Version of the median `results.json` layout.
pub const MEDIAN_VERSION: u32 = 1;

/// One figure over the runs that measured it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Median (the mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// The values, in run order (runs that did not measure the figure are left out).
    pub values: Vec<f64>,
}

impl Stat {
    /// The statistics of `values`; `None` when there are none.
    pub fn of(values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            values,
        })
    }
}

/// A goal over the runs: the median of its per-run ratios (each ratio compares two
/// configurations of the same run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MedianGoal {
    /// What the goal says.
    pub goal: String,
    /// The experiment it belongs to.
    pub experiment: String,
    /// The per-run ratios.
    pub ratio: Option<Stat>,
    /// The bound on the ratio.
    pub bound: f64,
    /// `true` when the ratio must be at most the bound.
    pub at_most: bool,
    /// The median ratio meets the bound (`None`: measured in no run).
    pub met: Option<bool>,
    /// Runs in which the goal was met.
    pub runs_met: usize,
    /// Runs in which it was measured.
    pub runs_measured: usize,
}

/// The median `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MedianResults {
    /// [`MEDIAN_VERSION`].
    pub version: u32,
    /// The command line of the run.
    pub command: String,
    /// Each run's `results.json`, relative to this file.
    pub runs: Vec<String>,
    /// Accelerator of the first run.
    pub accelerator: Option<Accelerator>,
    /// Parameters (the same for every run; `None` without runs).
    pub params: Option<RunParams>,
    /// Per configuration, per row key (see [`ROWS`]), the figure over the runs in which
    /// the configuration completed.
    pub configs: BTreeMap<String, BTreeMap<String, Stat>>,
    /// Per configuration, the runs in which it failed (left out of its figures).
    pub failed_runs: BTreeMap<String, usize>,
    /// The goals.
    pub goals: Vec<MedianGoal>,
    /// Wall-clock time of all runs (s).
    pub elapsed_s: f64,
}

/// A row of the median table: key in `results.json`, label, figure of one run.
pub type Row = (&'static str, &'static str, fn(&ConfigResult) -> Option<f64>);

fn latency(samples: u64, value: f64) -> Option<f64> {
    (samples > 0).then_some(value)
}

/// The rows of the median table, in order.
pub const ROWS: [Row; 19] = [
    ("guest.avg_us", "guest avg (µs)", |r| {
        latency(r.guest.latency.samples, r.guest.latency.avg_us)
    }),
    ("guest.p99_us", "guest p99 (µs)", |r| {
        latency(r.guest.latency.samples, r.guest.latency.p99_us as f64)
    }),
    ("guest.max_us", "guest max (µs)", |r| {
        latency(r.guest.latency.samples, r.guest.latency.max_us as f64)
    }),
    ("guest.samples", "guest samples", |r| {
        Some(r.guest.latency.samples as f64)
    }),
    (
        "well_behaved.avg_us",
        "well-behaved guests' avg (µs, --guests 2+)",
        |r| well_behaved_latency(r).map(|(avg, _)| avg),
    ),
    ("host.max_us", "host max (µs)", |r| {
        latency(r.host.latency.samples, r.host.latency.max_us as f64)
    }),
    ("host.p99_us", "host p99 (µs)", |r| {
        latency(r.host.latency.samples, r.host.latency.p99_us as f64)
    }),
    (
        "host.beyond_stalls_max_us",
        "host max beyond the machine's stalls (µs, stall probe)",
        |r| {
            let stalls = r.host.stalls?;
            latency(stalls.samples, stalls.beyond_stalls_max_us as f64)
        },
    ),
    (
        "host.above_boosts_beyond_stalls_max_us",
        "host task above the boosts: max beyond stalls (µs, FIFO static-rt + 1)",
        |r| {
            let stalls = r.host.stalls?;
            stalls.above_boosts_beyond_stalls_max_us.map(|us| us as f64)
        },
    ),
    (
        "host.stall_max_us",
        "machine stall max (µs, FIFO 99 reference)",
        |r| {
            let stalls = r.host.stalls?;
            latency(stalls.samples, stalls.reference_max_us as f64)
        },
    ),
    (
        "host.bogo_ops_per_s",
        "host throughput (bogo-ops/s, geo-mean)",
        |r| (r.host.bogo_ops_per_s > 0.0).then_some(r.host.bogo_ops_per_s),
    ),
    ("boosts", "boosts", |r| Some(r.boosts as f64)),
    ("throttles", "throttles", |r| Some(r.throttles as f64)),
    ("applies", "applied changes", |r| {
        r.applies.map(|n| n as f64)
    }),
    ("daemon_cpu_percent", "daemon CPU (% of one CPU)", |r| {
        r.daemon_cpu_percent
    }),
    (
        "apply_latency.p99_us",
        "apply latency p99 (µs, bucket bound, line read → applied)",
        |r| r.apply_latency.map(|a| a.p99_us).filter(|p| p.is_finite()),
    ),
    ("vcpu_rt_percent", "vCPU threads RT (% of samples)", |r| {
        (r.policy_samples > 0).then_some(r.rt_fraction * 100.0)
    }),
    (
        "rogue_vcpu.rt_percent",
        "rogue vCPU RT (% of samples)",
        |r| {
            let (guest, vcpu) = r.rogue_vcpu()?;
            guest.vcpu_policy.get(vcpu)?.fraction().map(|f| f * 100.0)
        },
    ),
    ("rogue_vcpu.throttles", "rogue vCPU throttles", |r| {
        let (guest, vcpu) = r.rogue_vcpu()?;
        guest.slots.get(vcpu).map(|slot| f64::from(slot.throttles))
    }),
];

/// The medians of `runs`; `files` are their `results.json` paths relative to the output
/// directory.
pub fn summarise(runs: &[LabResults], files: &[String]) -> MedianResults {
    let mut names: Vec<String> = Vec::new();
    for run in runs {
        for result in run.ordered() {
            if !names.contains(&result.name) {
                names.push(result.name.clone());
            }
        }
    }
    let mut configs = BTreeMap::new();
    let mut failed_runs = BTreeMap::new();
    for name in &names {
        let completed: Vec<&ConfigResult> = runs
            .iter()
            .filter_map(|run| run.configs.get(name))
            .filter(|result| result.error.is_none())
            .collect();
        let failed = runs
            .iter()
            .filter_map(|run| run.configs.get(name))
            .filter(|result| result.error.is_some())
            .count();
        if failed > 0 {
            failed_runs.insert(name.clone(), failed);
        }
        let rows: BTreeMap<String, Stat> = ROWS
            .iter()
            .filter_map(|&(key, _, figure)| {
                let values = completed
                    .iter()
                    .filter_map(|result| figure(result))
                    .collect();
                Some((key.to_owned(), Stat::of(values)?))
            })
            .collect();
        configs.insert(name.clone(), rows);
    }
    let goals = runs.first().map_or_else(Vec::new, |first| {
        first
            .goals
            .iter()
            .enumerate()
            .map(|(index, goal)| {
                let ratios: Vec<f64> = runs
                    .iter()
                    .filter_map(|run| run.goals.get(index))
                    .filter(|other| other.goal == goal.goal)
                    .filter_map(|other| other.ratio)
                    .collect();
                let runs_met = runs
                    .iter()
                    .filter_map(|run| run.goals.get(index))
                    .filter(|other| other.goal == goal.goal && other.met == Some(true))
                    .count();
                let runs_measured = ratios.len();
                let ratio = Stat::of(ratios);
                MedianGoal {
                    met: ratio.as_ref().map(|ratio| goal.meets(ratio.median)),
                    goal: goal.goal.clone(),
                    experiment: goal.experiment.clone(),
                    ratio,
                    bound: goal.bound,
                    at_most: goal.at_most,
                    runs_met,
                    runs_measured,
                }
            })
            .collect()
    });
    MedianResults {
        version: MEDIAN_VERSION,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        runs: files.to_vec(),
        accelerator: runs.iter().find_map(|run| run.accelerator),
        params: runs.first().map(|run| run.params.clone()),
        configs,
        failed_runs,
        goals,
        elapsed_s: runs.iter().map(|run| run.elapsed_s).sum(),
    }
}

fn number(value: f64) -> String {
    if value.abs() < 10.0 && value.fract() != 0.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

fn stat_cell(stat: Option<&Stat>) -> String {
    match stat {
        None => "–".into(),
        Some(stat) if stat.values.len() == 1 => number(stat.median),
        Some(stat) => format!(
            "{} ({}–{})",
            number(stat.median),
            number(stat.min),
            number(stat.max)
        ),
    }
}

/// The median table in Markdown: one row per figure, one column per configuration, each
/// cell `median (min–max)`, then the goals.
pub fn markdown(summary: &MedianResults) -> String {
    let mut names: Vec<&String> = Configuration::ALL
        .iter()
        .filter_map(|config| {
            summary
                .configs
                .get_key_value(&config.name())
                .map(|(k, _)| k)
        })
        .collect();
    names.extend(
        summary
            .configs
            .keys()
            .filter(|name| Configuration::parse(name).is_none()),
    );
    let accel = summary
        .accelerator
        .map_or("unknown".to_owned(), |accel| accel.to_string());
    let mut text = String::new();
    let _ = write!(
        text,
        "Median (min–max) of {} runs: `{}`",
        summary.runs.len(),
        summary.command
    );
    if let Some(params) = &summary.params {
        let _ = write!(
            text,
            "; busy host ({load}), {guests} guest(s) × {vcpus} vCPUs under {accel}, \
             cyclictest every {interval} µs for {duration} s per configuration; {cpus} host CPUs, host {kernel}",
            load = params.load.describe(),
            guests = params.guests,
            vcpus = params.vcpus,
            interval = params.interval_us,
            duration = params.duration_s,
            cpus = params.host_cpus,
            kernel = params.host_kernel,
        );
    }
    let _ = writeln!(text, ". Runs: {}.\n", summary.runs.join(", "));
    let _ = write!(text, "| busy host |");
    for name in &names {
        let _ = write!(text, " {name} |");
    }
    let _ = write!(text, "\n|---|");
    for _ in &names {
        text.push_str("---:|");
    }
    text.push('\n');
    for (key, label, _) in ROWS {
        if !names
            .iter()
            .any(|name| summary.configs[*name].contains_key(key))
        {
            continue;
        }
        let _ = write!(text, "| {label} |");
        for name in &names {
            let _ = write!(text, " {} |", stat_cell(summary.configs[*name].get(key)));
        }
        text.push('\n');
    }
    let _ = write!(text, "| runs completed |");
    for name in &names {
        let failed = summary.failed_runs.get(*name).copied().unwrap_or(0);
        let completed = summary.runs.len().saturating_sub(failed);
        let _ = write!(text, " {completed} of {} |", summary.runs.len());
    }
    text.push('\n');
    if !summary.goals.is_empty() {
        text.push_str(
            "\nGoals (median of the per-run ratios, min–max; measured, not asserted):\n\n",
        );
        for goal in &summary.goals {
            let verdict = match goal.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            let ratio = goal.ratio.as_ref().map_or("–".to_owned(), |ratio| {
                format!("{:.2} ({:.2}–{:.2})", ratio.median, ratio.min, ratio.max)
            });
            let runs = if goal.runs_measured == 0 {
                String::new()
            } else {
                format!("; met in {} of {} runs", goal.runs_met, goal.runs_measured)
            };
            let _ = writeln!(
                text,
                "- {}: {}: {ratio} — {verdict}{runs}",
                goal.experiment, goal.goal
            );
        }
    }
    text
}

/// Files written by [`write`].
#[derive(Debug, Clone)]
pub struct MedianFiles {
    /// `results.json`.
    pub json: PathBuf,
    /// `results.md`.
    pub markdown: PathBuf,
}

/// Writes `results.json` and `results.md` of `summary` into `dir`.
pub fn write(summary: &MedianResults, dir: &Path) -> Result<MedianFiles> {
    fs::create_dir_all(dir).map_err(LabError::io("create", dir))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(summary)
        .map_err(|error| LabError::Run(format!("serializing medians: {error}")))?;
    fs::write(&json, text + "\n").map_err(LabError::io("write", &json))?;
    let markdown_path = dir.join("results.md");
    fs::write(&markdown_path, markdown(summary)).map_err(LabError::io("write", &markdown_path))?;
    Ok(MedianFiles {
        json,
        markdown: markdown_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Goal, GuestSide, LatencyFigures};

    #[test]
    fn median_of_odd_and_even_counts() {
        let odd = Stat::of(vec![3.0, 1.0, 2.0]).expect("stat");
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        assert_eq!(odd.values, [3.0, 1.0, 2.0]);
        let even = Stat::of(vec![4.0, 1.0, 2.0, 10.0]).expect("stat");
        assert_eq!(even.median, 3.0);
        assert!(Stat::of(vec![]).is_none());
    }

    fn run(avg: f64, ratio: f64, failed: bool) -> LabResults {
        let result = ConfigResult {
            name: "pvsched".into(),
            guest: GuestSide {
                latency: LatencyFigures {
                    samples: 10,
                    avg_us: avg,
                    ..LatencyFigures::default()
                },
                histogram: vec![],
            },
            error: failed.then(|| "boom".to_owned()),
            ..ConfigResult::default()
        };
        LabResults {
            version: 1,
            accelerator: None,
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
                channel: Default::default(),
                host_cyclictest_prio: 1,
                load: crate::hostload::LoadSpec::seed003(2),
                module_params: String::new(),
                hostd_period_us: 1000,
                hostd_rt_prio: 10,
                hostd_policy: None,
                host_cpus: 2,
                host_kernel: "6.1".into(),
                guest_kernel: "6.1".into(),
                configs: vec!["pvsched".into()],
            },
            configs: [("pvsched".to_owned(), result)].into_iter().collect(),
            goals: vec![Goal {
                goal: "g".into(),
                experiment: "busy host".into(),
                ratio: Some(ratio),
                numerator: None,
                denominator: None,
                unit: String::new(),
                bound: 1.0,
                at_most: true,
                met: Some(ratio <= 1.0),
            }],
            elapsed_s: 60.0,
        }
    }

    #[test]
    fn medians_rows_goals_and_failed_runs() {
        let runs = [
            run(100.0, 0.8, false),
            run(300.0, 1.2, false),
            run(200.0, 0.9, false),
            run(9999.0, 5.0, true),
        ];
        let files: Vec<String> = (1..=4).map(|k| format!("run-{k}/results.json")).collect();
        let summary = summarise(&runs, &files);
        let avg = &summary.configs["pvsched"]["guest.avg_us"];
        // The failed run's figures are left out; its goal ratio is still one run's ratio.
        assert_eq!((avg.median, avg.min, avg.max), (200.0, 100.0, 300.0));
        assert_eq!(summary.failed_runs["pvsched"], 1);
        let goal = &summary.goals[0];
        let ratio = goal.ratio.as_ref().expect("ratio");
        assert_eq!((ratio.min, ratio.max), (0.8, 5.0));
        assert!((ratio.median - 1.05).abs() < 1e-9);
        assert_eq!(goal.met, Some(false));
        assert_eq!((goal.runs_met, goal.runs_measured), (2, 4));
        assert_eq!(summary.elapsed_s, 240.0);
        let text = markdown(&summary);
        assert!(
            text.contains("| guest avg (µs) | 200 (100–300) |"),
            "{text}"
        );
        assert!(text.contains("| runs completed | 3 of 4 |"), "{text}");
        assert!(
            text.contains("1.05 (0.80–5.00) — MISSED; met in 2 of 4 runs"),
            "{text}"
        );
        assert!(text.contains("run-1/results.json"), "{text}");
    }
}
