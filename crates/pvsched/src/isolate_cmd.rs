//! `pvsched isolate`: isolate CPUs for a real-time VM without a reboot,
//! `pvsched isolate --undo`, and `--sync`/`--follow`, which make the host
//! match the daemon's isolation request (see docs/isolation.md).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use pvsched_host::isolate::{self, Change, Host, Plan, Request, Unmovable, VmSelector};
use pvsched_host::isolate_request::{
    self, IsolationRequest, RequestWatch, SyncAction, SyncPaths, SyncReport,
};
use pvsched_host::{HostConfig, HostFs};

/// `pvsched isolate`.
#[derive(Args, Debug)]
pub struct IsolateArgs {
    /// CPUs to isolate (a kernel CPU list: `1`, `2-3,6`). Default with
    /// `--vm`: that VM's `isolate_cpus` in the configuration.
    #[arg(long, conflicts_with = "undo")]
    pub cpus: Option<String>,
    /// The VM whose vCPUs run on the isolated CPUs, by name: a `[[vm]]` of
    /// the configuration, a discovered VM or a QEMU `-name`.
    #[arg(long, conflicts_with_all = ["qmp", "undo"])]
    pub vm: Option<String>,
    /// The VM, by its QMP socket.
    #[arg(long, conflicts_with = "undo")]
    pub qmp: Option<PathBuf>,
    /// `SCHED_FIFO` priority of the vCPU threads (1..=99).
    #[arg(long, default_value_t = isolate::DEFAULT_RT_PRIORITY,
          value_parser = clap::value_parser!(u8).range(1..=99), conflicts_with = "undo")]
    pub rt_priority: u8,
    /// Print the plan and change nothing.
    #[arg(long, conflicts_with = "undo")]
    pub dry_run: bool,
    /// Restore every value recorded in the state file and remove it.
    #[arg(long)]
    pub undo: bool,
    /// Make the host match the daemon's isolation request once: apply it,
    /// undo an isolation no live request stands behind, or change nothing
    /// when the state file already records this request.
    #[arg(long, conflicts_with_all = ["cpus", "vm", "qmp", "undo", "dry_run", "follow"])]
    pub sync: bool,
    /// `--sync` at every change of the request file (and at least every
    /// second) until SIGTERM or SIGINT, then undo.
    #[arg(long, conflicts_with_all = ["cpus", "vm", "qmp", "undo", "dry_run"])]
    pub follow: bool,
    /// The daemon's isolation request (`[daemon] isolate_request`); must be
    /// a regular file owned by root that only root may write.
    #[arg(long, default_value = pvsched_host::isolate_request::DEFAULT_REQUEST_FILE)]
    pub request: PathBuf,
    /// State file recording every old value.
    #[arg(long, default_value = isolate::DEFAULT_STATE_FILE)]
    pub state: PathBuf,
    /// The daemon's configuration (VM names, allowed users). Missing: defaults.
    #[arg(long, default_value = "/etc/pvsched/hostd.toml")]
    pub config: PathBuf,
}

fn print_changes(changes: &[Change]) {
    let rows: Vec<(String, String, String)> = changes.iter().map(Change::row).collect();
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(3);
    println!("{:w0$}  {:w1$}  new", "change", "old");
    for (what, old, new) in rows {
        let old = if old.is_empty() { "-".into() } else { old };
        println!("{what:w0$}  {old:w1$}  {new}");
    }
}

fn print_unmovable(unmovable: &[Unmovable]) {
    if unmovable.is_empty() {
        return;
    }
    println!("\nnot moved ({}):", unmovable.len());
    for u in unmovable {
        println!("  {}: {}", u.what, u.reason);
    }
}

fn print_header(plan: &Plan) {
    println!(
        "isolated CPUs {}, housekeeping CPUs {}, {:?}",
        isolate::format_cpu_list(&plan.isolated),
        isolate::format_cpu_list(&plan.housekeeping),
        plan.hierarchy
    );
    if let Some(vm) = &plan.vm {
        println!(
            "VM {} (pid {}): vCPU threads {:?} on the isolated CPUs, IOThreads {:?} on housekeeping",
            vm.name, vm.pid, vm.vcpus, vm.iothreads
        );
    }
}

fn load_config(args: &IsolateArgs) -> anyhow::Result<HostConfig> {
    if args.config.exists() {
        HostConfig::load(&args.config)
            .with_context(|| format!("configuration {}", args.config.display()))
    } else {
        Ok(HostConfig::default())
    }
}

fn print_sync(report: &SyncReport) {
    if let Some(why) = &report.stale {
        println!("request set aside: {why}");
    }
    if let Some(undone) = &report.undone {
        println!(
            "undone: {} values restored, {} recorded threads had exited, {} threads started since moved back",
            undone.restored, undone.exited, undone.adopted
        );
    }
    if let Some(applied) = &report.applied {
        if let Some(r) = &report.request {
            println!("isolated CPUs {} for vm {} (pid {}):", r.cpus, r.vm, r.pid);
        }
        println!("applied ({} changes):", applied.changes.len());
        print_changes(&applied.changes);
        print_unmovable(&applied.unmovable);
    }
    if report.action == Some(SyncAction::Nothing) {
        match &report.request {
            Some(r) if report.stale.is_none() => println!(
                "in sync: CPUs {} isolated for vm {} (pid {})",
                r.cpus, r.vm, r.pid
            ),
            _ => println!("in sync: no isolation requested, none applied"),
        }
    }
}

fn sync_once(fs: &HostFs, cfg: &HostConfig, args: &IsolateArgs) -> anyhow::Result<SyncReport> {
    let paths = SyncPaths {
        request: args.request.clone(),
        request_owner: 0,
        state: args.state.clone(),
    };
    let timeout = Duration::from_millis(cfg.daemon.qmp_timeout_ms.max(2000));
    let find = |r: &IsolationRequest| isolate_request::find_config_vm(fs, cfg, r, timeout);
    Ok(isolate_request::sync(&Host::real(fs), cfg, &paths, &find)?)
}

/// `--follow`: syncs at every change until SIGTERM/SIGINT, then undoes.
/// An error is printed when it first occurs (not at every retry).
fn follow(fs: &HostFs, cfg: &HostConfig, args: &IsolateArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("signal handlers")?;
    }
    let watch = RequestWatch::new(&args.request);
    println!(
        "following {} ({})",
        args.request.display(),
        if watch.watching() {
            "inotify"
        } else {
            "polled"
        }
    );
    let mut last_error = None;
    while !stop.load(Ordering::Relaxed) {
        match sync_once(fs, cfg, args) {
            Ok(report) => {
                if report.action != Some(SyncAction::Nothing) || last_error.is_some() {
                    print_sync(&report);
                }
                last_error = None;
            }
            Err(e) => {
                let text = format!("{e:#}");
                if last_error.as_ref() != Some(&text) {
                    eprintln!("pvsched isolate: {text}");
                }
                last_error = Some(text);
            }
        }
        watch.wait(isolate_request::FOLLOW_INTERVAL);
    }
    if args.state.symlink_metadata().is_ok() {
        let report = isolate::undo(&Host::real(fs), &args.state)?;
        println!(
            "stopped: undone, {} values restored, {} recorded threads had exited, {} threads started since moved back",
            report.restored, report.exited, report.adopted
        );
    } else {
        println!("stopped: nothing to undo");
    }
    Ok(())
}

/// Runs `pvsched isolate`.
pub fn run(args: IsolateArgs) -> anyhow::Result<()> {
    let fs = HostFs::default();
    let host = Host::real(&fs);
    if args.sync || args.follow {
        let cfg = load_config(&args)?;
        if args.follow {
            return follow(&fs, &cfg, &args);
        }
        print_sync(&sync_once(&fs, &cfg, &args)?);
        return Ok(());
    }
    if args.undo {
        let report = isolate::undo(&host, &args.state)?;
        println!(
            "undone: {} values restored, {} recorded threads had exited, {} threads started since moved back",
            report.restored, report.exited, report.adopted
        );
        return Ok(());
    }
    let cfg = load_config(&args)?;
    let cpus = match (&args.cpus, &args.vm) {
        (Some(c), _) => c.clone(),
        (None, Some(name)) => match cfg.vm.iter().find(|v| &v.name == name) {
            Some(vm) => vm.isolate_cpus.clone().with_context(|| {
                format!(
                    "VM {name} has no isolate_cpus in {}: pass --cpus",
                    args.config.display()
                )
            })?,
            None => bail!(
                "--cpus is needed (VM {name} is not in {})",
                args.config.display()
            ),
        },
        (None, None) => bail!("--cpus is needed"),
    };
    let isolated = isolate::parse_cpus(&cpus)?;
    let selector = match (&args.vm, &args.qmp) {
        (Some(n), _) => Some(VmSelector::Name(n.clone())),
        (None, Some(q)) => Some(VmSelector::Qmp(q.clone())),
        _ => None,
    };
    let vm = match &selector {
        Some(sel) => Some(isolate::find_vm(
            &fs,
            &cfg,
            sel,
            Duration::from_millis(cfg.daemon.qmp_timeout_ms.max(2000)),
        )?),
        None => None,
    };
    if !args.dry_run && args.state.symlink_metadata().is_ok() {
        return Err(isolate::IsolateError::AlreadyApplied(args.state.clone()).into());
    }
    let plan = isolate::plan(
        &host,
        &Request {
            isolated,
            vm,
            rt_priority: args.rt_priority,
        },
    )?;
    print_header(&plan);
    if args.dry_run {
        println!("plan ({} changes, nothing changed):", plan.changes.len());
        print_changes(&plan.changes);
        print_unmovable(&plan.unmovable);
        return Ok(());
    }
    let applied = isolate::apply(&host, &plan, &args.state)?;
    println!("applied ({} changes):", applied.changes.len());
    print_changes(&applied.changes);
    print_unmovable(&applied.unmovable);
    if applied.exited > 0 {
        println!("{} tasks exited before their move", applied.exited);
    }
    println!(
        "\nstate: {} (undo: pvsched isolate --undo --state {})",
        applied.state_path.display(),
        applied.state_path.display()
    );
    Ok(())
}
