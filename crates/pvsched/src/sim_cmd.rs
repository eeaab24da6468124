//! `pvsched sim`: run the discrete-event simulator.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use pvsched_sim::scenarios::{self, BUILTINS};
use pvsched_sim::{report, run_parts, svg, RunOptions, Scenario};

/// `pvsched sim` subcommands.
#[derive(Subcommand)]
pub enum SimCommand {
    /// List the built-in scenarios.
    List,
    /// Run a built-in scenario or a TOML scenario file and print its tables.
    Run(RunArgs),
    /// Measure simulator speed: events/s on one core, and the fleet run's wall time.
    Bench {
        /// Skip the fleet run (only the single-core measurement).
        #[arg(long)]
        no_fleet: bool,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Run the lab's configuration in simulation and compare with its measurements
    /// (the latency experiment, or the overcommit experiment's scores per VM).
    Calibrate {
        /// The lab's results.json.
        lab_results: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the comparison as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Simulate at most this many seconds per configuration (the lab's
        /// duration when it is shorter).
        #[arg(long, default_value_t = 20.0)]
        max_duration_s: f64,
        /// Latency experiment: use these fitted model parameters (a `--fit-out`
        /// file) instead of fitting on this result's baseline configurations.
        #[arg(long, conflicts_with = "fit_out")]
        params: Option<PathBuf>,
        /// Latency experiment: write the parameters fitted here (TOML).
        #[arg(long)]
        fit_out: Option<PathBuf>,
        /// Latency experiment: simulated seconds per baseline configuration and
        /// seed while fitting.
        #[arg(long, default_value_t = 5.0)]
        fit_duration_s: f64,
    },
}

/// Arguments of `pvsched sim run`.
#[derive(Args)]
pub struct RunArgs {
    /// Built-in name (see `pvsched sim list`) or a path to a TOML scenario.
    scenario: String,
    /// Seed of the run; the same seed gives the same results.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the rows as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write an SVG chart of latency and score per policy.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Override the simulated duration, ms (built-ins are short by default).
    #[arg(long)]
    duration_ms: Option<u64>,
    /// Override the number of hosts (fleet mode).
    #[arg(long)]
    hosts: Option<u32>,
    /// Short variant of a built-in (what the tests run).
    #[arg(long)]
    small: bool,
    /// Check invariants after every event (slow).
    #[arg(long)]
    check: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Runs a `sim` subcommand.
pub fn run(cmd: SimCommand) -> anyhow::Result<()> {
    match cmd {
        SimCommand::List => {
            for (name, desc) in BUILTINS {
                println!("{name:20} {desc}");
            }
            Ok(())
        }
        SimCommand::Run(args) => run_cmd(args),
        SimCommand::Bench { no_fleet, seed } => {
            let b = pvsched_sim::fleet::bench(seed, !no_fleet)
                .map_err(|e| anyhow::anyhow!("seed {seed}: {e}"))?;
            print!("{}", b.text());
            Ok(())
        }
        SimCommand::Calibrate {
            lab_results,
            seed,
            json,
            max_duration_s,
            params,
            fit_out,
            fit_duration_s,
        } => {
            if max_duration_s.is_nan() || max_duration_s <= 0.0 {
                bail!("--max-duration-s must be above 0, got {max_duration_s}");
            }
            if !(fit_duration_s > 0.0 && fit_duration_s <= 600.0) {
                bail!("--fit-duration-s must be in (0, 600], got {fit_duration_s}");
            }
            let text = std::fs::read_to_string(&lab_results)
                .with_context(|| format!("reading {}", lab_results.display()))?;
            let model = match &params {
                Some(path) => {
                    let t = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    Some(
                        pvsched_sim::calibrate::ModelParams::from_toml(&t)
                            .with_context(|| format!("parsing {}", path.display()))?,
                    )
                }
                None => None,
            };
            let opt = pvsched_sim::calibrate::Options {
                seed,
                max_duration_s,
                params: model,
                fit_duration_s,
                ..Default::default()
            };
            let cal = pvsched_sim::calibrate::calibrate_lab(&text, &opt).with_context(|| {
                format!(
                    "calibrating against {} (seed {seed})",
                    lab_results.display()
                )
            })?;
            print!("{}", cal.table());
            if let Some(path) = fit_out {
                let pvsched_sim::calibrate::Report::Latency(c) = &cal else {
                    bail!("--fit-out: only a latency result is fitted");
                };
                write(&path, &c.model.to_toml(&lab_results.display().to_string()))?;
            }
            if let Some(path) = json {
                write(&path, &serde_json::to_string_pretty(&cal)?)?;
            }
            Ok(())
        }
    }
}

fn load(args: &RunArgs) -> anyhow::Result<(String, Vec<Scenario>)> {
    if let Some(parts) = scenarios::builtin(&args.scenario, args.small) {
        return Ok((args.scenario.clone(), parts));
    }
    let path = Path::new(&args.scenario);
    if !path.exists() {
        bail!(
            "{:?} is neither a built-in scenario ({}) nor a file",
            args.scenario,
            BUILTINS.iter().map(|b| b.0).collect::<Vec<_>>().join(", ")
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let sc = Scenario::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok((sc.name.clone(), vec![sc]))
}

fn run_cmd(args: RunArgs) -> anyhow::Result<()> {
    let (name, mut parts) = load(&args)?;
    for p in &mut parts {
        if let Some(d) = args.duration_ms {
            p.duration_ms = d;
        }
        if let Some(h) = args.hosts {
            p.hosts = h;
        }
    }
    let opt = RunOptions {
        seed: args.seed,
        check: args.check,
        progress: !args.quiet,
        single_thread: false,
    };
    let r = run_parts(&name, &parts, &opt)
        .with_context(|| format!("scenario {name}, seed {}", args.seed))?;
    println!("{}", report::table(&r));
    if name == "halt-poll" {
        println!("Halt-polling: wake-up latency against host CPU (model outputs):");
        println!();
        println!("{}", report::halt_poll_table(&r, "tcp-rr"));
    }
    let effects = scenarios::effects(&name, &r);
    if !effects.is_empty() {
        println!("Seed effects (model outputs; directions, not absolute figures):");
        for e in &effects {
            println!("  [{}] {}", if e.holds { "yes" } else { "NO " }, e.what);
        }
    }
    let bad: u64 = r
        .results
        .iter()
        .map(|p| p.limit_violations + p.invariant_violations.len() as u64)
        .sum();
    if let Some(path) = &args.json {
        write(path, &serde_json::to_string_pretty(&r)?)?;
    }
    if let Some(path) = &args.csv {
        write(path, &report::csv(&r))?;
    }
    if let Some(path) = &args.svg {
        write(path, &svg::chart(&r))?;
    }
    if bad > 0 {
        bail!("seed {}: {bad} limit or invariant violations", args.seed);
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
