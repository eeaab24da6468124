//! `pvsched hostd`, `pvsched status` and `pvsched hostd-bench`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use pvsched_host::bench::{run_bench, BenchOptions};
use pvsched_host::daemon::{fetch_stats, run};
use pvsched_host::{
    Daemon, DaemonOptions, DaemonStatus, HostConfig, MonotonicClock, RealScheduler, Refresher,
};

/// `pvsched hostd`: the host daemon.
#[derive(Args)]
pub struct HostdArgs {
    /// Configuration file (TOML; see packaging/pvsched-hostd.toml).
    #[arg(long, default_value = "/etc/pvsched/hostd.toml")]
    pub config: PathBuf,
    /// Override the loop period from the configuration (µs).
    #[arg(long)]
    pub period_us: Option<u64>,
    /// Observe once and exit: query every VM, read every slot, print the
    /// state. Changes nothing (no scheduling change, no shared-memory write).
    #[arg(long)]
    pub once: bool,
    /// With --once: print JSON instead of a table.
    #[arg(long, requires = "once")]
    pub json: bool,
}

/// `pvsched status`: the state of a running daemon.
#[derive(Args)]
pub struct StatusArgs {
    /// Configuration file, to find the daemon's metrics address.
    #[arg(long, default_value = "/etc/pvsched/hostd.toml")]
    pub config: PathBuf,
    /// The daemon's address (overrides the configuration).
    #[arg(long)]
    pub addr: Option<std::net::SocketAddr>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `pvsched hostd-bench`: loop cost and apply latency of the daemon.
#[derive(Args)]
pub struct BenchArgs {
    /// Threads standing in for vCPUs.
    #[arg(long, default_value_t = 64)]
    pub vcpus: usize,
    /// Loop period (µs).
    #[arg(long, default_value_t = 1000)]
    pub period_us: u64,
    /// Length of each phase (quiet guest, then writing guest), seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Mean interval between guest writes in the active phase (µs).
    #[arg(long, default_value_t = 2000)]
    pub write_interval_us: u64,
    /// Host-information sampling interval (ms), as `host_info_ms` in the configuration.
    #[arg(long, default_value_t = 100)]
    pub host_info_ms: u64,
    /// Use the fake scheduler even as root (no real sched_setattr).
    #[arg(long)]
    pub fake: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn load(path: &Path, period_us: Option<u64>) -> anyhow::Result<HostConfig> {
    let mut cfg = HostConfig::load(path).with_context(|| format!("loading {}", path.display()))?;
    if let Some(p) = period_us {
        cfg.daemon.period_us = p;
        cfg.validate().context("--period-us")?;
    }
    Ok(cfg)
}

/// Runs `pvsched hostd`.
pub fn run_hostd(args: HostdArgs) -> anyhow::Result<()> {
    let cfg = load(&args.config, args.period_us)?;
    if args.once {
        let mut daemon = Daemon::new(
            cfg.clone(),
            Box::new(RealScheduler),
            Box::new(MonotonicClock),
            DaemonOptions { dry_run: true },
        )?;
        for update in Refresher::new(cfg).poll() {
            daemon.handle(update);
        }
        daemon.tick();
        let status = daemon.status();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&status)?);
        } else {
            print!("{}", status.table());
        }
        return Ok(());
    }
    run(cfg, Arc::new(AtomicBool::new(false))).context("hostd")
}

/// Runs `pvsched status`.
pub fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let addr = match args.addr {
        Some(a) => a,
        None => {
            let cfg = load(&args.config, None)?;
            match cfg.metrics_addr()? {
                Some(a) => a,
                None => bail!(
                    "metrics_addr is disabled in {}; use `pvsched hostd --once --json`",
                    args.config.display()
                ),
            }
        }
    };
    let body = fetch_stats(addr, "/status").with_context(|| {
        format!("asking the daemon at {addr} (is `pvsched hostd` running? `pvsched hostd --once` works without it)")
    })?;
    if args.json {
        println!("{body}");
    } else {
        let status: DaemonStatus = serde_json::from_str(&body).context("decoding /status")?;
        print!("{}", status.table());
    }
    Ok(())
}

/// Runs `pvsched hostd-bench`.
pub fn run_hostd_bench(args: BenchArgs) -> anyhow::Result<()> {
    let report = run_bench(&BenchOptions {
        vcpus: args.vcpus,
        period_us: args.period_us,
        phase_seconds: args.seconds,
        write_interval_us: args.write_interval_us,
        host_info_ms: args.host_info_ms,
        force_fake: args.fake,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}
