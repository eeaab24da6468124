//! `pvsched isolate`: isolate CPUs for a real-time VM without a reboot, and
//! `pvsched isolate --undo` (see docs/isolation.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use pvsched_host::isolate::{self, Change, Host, Plan, Request, Unmovable, VmSelector};
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

/// Runs `pvsched isolate`.
pub fn run(args: IsolateArgs) -> anyhow::Result<()> {
    let fs = HostFs::default();
    let host = Host::real(&fs);
    if args.undo {
        let report = isolate::undo(&host, &args.state)?;
        println!(
            "undone: {} values restored, {} recorded threads had exited, {} threads started since moved back",
            report.restored, report.exited, report.adopted
        );
        return Ok(());
    }
    let cfg = if args.config.exists() {
        HostConfig::load(&args.config)
            .with_context(|| format!("configuration {}", args.config.display()))?
    } else {
        HostConfig::default()
    };
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
