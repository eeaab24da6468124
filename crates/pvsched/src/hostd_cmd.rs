//! `pvsched hostd` (and its hidden watchdog), `pvsched status` and `pvsched hostd-bench`.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use pvsched_host::bench::{run_bench, BenchOptions};
use pvsched_host::daemon::{fetch_stats, run};
use pvsched_host::sys::SharedWords;
use pvsched_host::watchdog::{
    ignore_daemon_signals, restore_state_file, run_watchdog, RestoreOutcome, Watchdog, WatchdogEnd,
    WatchdogOptions, PAGE_WORDS,
};
use pvsched_host::{
    Daemon, DaemonOptions, DaemonStatus, HostConfig, MonotonicClock, RealScheduler, Refresher,
};

/// `pvsched hostd`: the host daemon.
#[derive(Args)]
pub struct HostdArgs {
    /// Configuration file (TOML; the package installs one with every key, its default and
    /// what it means; in the source tree: packaging/pvsched-hostd.toml).
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
    /// Put back every thread recorded in the state file and exit (systemd's
    /// `ExecStopPost`). Refuses a file that belongs to a running daemon.
    #[arg(long, conflicts_with = "once")]
    pub restore_only: bool,
}

/// `pvsched hostd-watchdog` (hidden): started by `pvsched hostd`, with the
/// shared heartbeat page as its stdin.
#[derive(Args, Debug)]
pub struct WatchdogArgs {
    /// The daemon to watch.
    #[arg(long)]
    pub daemon_pid: i32,
    /// The daemon's state file.
    #[arg(long)]
    pub state: PathBuf,
    /// `/proc` root.
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Heartbeat silence that counts as a stall (ms).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub stall_ms: u64,
    /// The watchdog's SCHED_FIFO priority (0: fair class).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub rt_prio: u8,
    /// Seccomp mode of the watchdog's filter (the daemon passes its own).
    #[arg(long, default_value = "off")]
    pub seccomp: pvsched_host::seccomp::SeccompMode,
}

impl WatchdogArgs {
    fn options(&self) -> WatchdogOptions {
        WatchdogOptions {
            daemon_pid: self.daemon_pid,
            state_file: self.state.clone(),
            proc_root: self.proc_root.clone(),
            stall_ms: self.stall_ms,
            rt_prio: (self.rt_prio != 0).then_some(self.rt_prio),
        }
    }
}

/// `pvsched status`: the state of a running daemon.
#[derive(Args)]
pub struct StatusArgs {
    /// Configuration file, to find the daemon's metrics address (when it does not
    /// exist: the default address, 127.0.0.1:9464).
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
    /// The guest stand-in rings a doorbell eventfd after each write, and the loop
    /// waits on it (the event-driven loop of an ivshmem-doorbell VM).
    #[arg(long)]
    pub doorbell: bool,
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
    if args.restore_only {
        let outcome = restore_state_file(
            &cfg.daemon.state_file,
            &cfg.daemon.proc_root,
            None,
            &RealScheduler,
        )
        .with_context(|| format!("restoring from {}", cfg.daemon.state_file.display()))?;
        eprintln!("pvsched: restore-only: {}", outcome.summary());
        if !matches!(outcome, RestoreOutcome::OwnedByLiveDaemon(_)) {
            // KVM's halt-poll parameters a daemon that died had changed.
            let undo = pvsched_host::haltpoll::undo_path(&cfg.daemon.state_file);
            let params = pvsched_host::haltpoll::KvmParams::under(&cfg.daemon.sys_root);
            if let Some(p) = pvsched_host::haltpoll::restore_from_undo_file(&undo, &params)
                .with_context(|| {
                    format!("restoring halt-poll parameters from {}", undo.display())
                })?
            {
                eprintln!(
                    "pvsched: restore-only: halt-poll parameters restored (halt_poll_ns {}, grow {}, grow_start {}, shrink {})",
                    p.halt_poll_ns, p.grow, p.grow_start_ns, p.shrink
                );
            }
        }
        return match outcome {
            RestoreOutcome::Reconciled(r) if !r.failed.is_empty() => {
                bail!("{} thread(s) could not be restored", r.failed.len())
            }
            RestoreOutcome::OwnedByLiveDaemon(pid) => {
                bail!("daemon pid {pid} is still running; stop it first")
            }
            _ => Ok(()),
        };
    }
    // The watchdog is this same executable, re-executed (see watchdog.rs for why).
    let mut command = std::process::Command::new(
        std::env::current_exe().context("finding the pvsched executable")?,
    );
    command.arg("hostd-watchdog");
    command.args(["--seccomp", &cfg.daemon.seccomp.to_string()]);
    let watchdog = Watchdog::start(command, &cfg).context("starting the watchdog")?;
    eprintln!(
        "pvsched: watchdog pid {} restores every changed thread if this daemon dies or its loop stalls for {} ms",
        watchdog.pid(),
        cfg.watchdog_stall_ms()
    );
    run(cfg, Arc::new(AtomicBool::new(false))).context("hostd")
}

/// Runs the hidden `pvsched hostd-watchdog`.
pub fn run_hostd_watchdog(args: WatchdogArgs) -> anyhow::Result<()> {
    ignore_daemon_signals().context("ignoring the daemon's signals")?;
    pvsched_host::seccomp::arm(args.seccomp).context("seccomp")?;
    let opts = args.options();
    let page = SharedWords::map(std::io::stdin().as_fd(), PAGE_WORDS).context(
        "mapping the heartbeat page from stdin (this command is started by `pvsched hostd`)",
    )?;
    let pid = opts.daemon_pid;
    match run_watchdog(&opts, &page, &RealScheduler, true).context("watchdog")? {
        WatchdogEnd::DaemonExited(RestoreOutcome::NothingRecorded) => {}
        WatchdogEnd::DaemonExited(outcome) => {
            eprintln!(
                "pvsched-watchdog: daemon pid {pid} exited: {}",
                outcome.summary()
            );
        }
        WatchdogEnd::Stalled {
            silent_ms,
            exited,
            outcome,
        } => {
            eprintln!(
                "pvsched-watchdog: daemon pid {pid} STALLED (loop heartbeat silent for {silent_ms} ms): killed it{}; {}",
                if exited { "" } else { " (not yet exited)" },
                outcome.summary()
            );
        }
    }
    Ok(())
}

/// The daemon's metrics address: `addr` if given, else the configuration's,
/// else (no configuration file) the default the daemon listens on.
pub fn status_addr(
    config: &Path,
    addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<std::net::SocketAddr> {
    if let Some(a) = addr {
        return Ok(a);
    }
    // Without a configuration file the daemon runs on its defaults, so the
    // default address is where it listens; a file that exists but does not
    // load is an error, not a reason to guess.
    let cfg = if config.exists() {
        load(config, None)?
    } else {
        HostConfig::default()
    };
    match cfg.metrics_addr()? {
        Some(a) => Ok(a),
        None => bail!(
            "metrics_addr is disabled in {}; use `pvsched hostd --once --json`",
            config.display()
        ),
    }
}

/// Runs `pvsched status`.
pub fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let addr = status_addr(&args.config, args.addr)?;
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
        doorbell: args.doorbell,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: WatchdogArgs,
    }

    #[test]
    fn the_watchdog_parses_the_arguments_the_daemon_gives_it() {
        let cfg = HostConfig::from_toml(
            "[daemon]\nstate_file = \"/run/x/state\"\nwatchdog_stall_ms = 750\n[policy]\nprio_max = 20",
        )
        .unwrap();
        let opts = WatchdogOptions::for_daemon(&cfg, 1234);
        let mut argv = vec![std::ffi::OsString::from("pvsched-hostd-watchdog")];
        argv.extend(opts.to_args());
        let parsed = Wrapper::try_parse_from(argv).unwrap().args.options();
        assert_eq!(parsed, opts);
        assert_eq!(parsed.rt_prio, Some(22));
    }
}
