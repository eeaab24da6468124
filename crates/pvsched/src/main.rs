//! `pvsched`: paravirtual two-level scheduling for KVM/QEMU guests.

mod abi_cmd;
mod generate_cmd;
mod hostd_cmd;
mod isolate_cmd;
mod lab_cmd;
mod sim_cmd;
mod top_cmd;

use clap::{CommandFactory, Parser, Subcommand};

/// Paravirtual two-level scheduling for KVM/QEMU guests on stock kernels.
#[derive(Parser)]
#[command(name = "pvsched", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect the shared-page ABI: field layout, or decode a shared file.
    #[command(subcommand)]
    Abi(abi_cmd::AbiCommand),
    // [subcommands: hostd]
    /// Run the host daemon: discover VMs, read guest hints, boost and restore vCPU threads.
    Hostd(hostd_cmd::HostdArgs),
    /// Internal: the watchdog process `pvsched hostd` starts (restores every
    /// thread the daemon changed when it dies or stalls).
    #[command(hide = true)]
    HostdWatchdog(hostd_cmd::WatchdogArgs),
    /// Show the state of every VM and vCPU of a running daemon.
    Status(hostd_cmd::StatusArgs),
    /// A live terminal view of a running daemon's VMs and vCPUs (q quits, s sorts).
    Top(top_cmd::TopArgs),
    /// Isolate CPUs for a real-time VM without a reboot (cpusets, IRQs,
    /// workqueues, vCPU threads at SCHED_FIFO), or undo it.
    Isolate(isolate_cmd::IsolateArgs),
    /// Measure the daemon's loop cost and apply latency on threads standing in for vCPUs.
    HostdBench(hostd_cmd::BenchArgs),
    /// Simulate both scheduling levels: built-in seed scenarios, TOML scenarios, fleets.
    #[command(subcommand)]
    Sim(sim_cmd::SimCommand),
    // [subcommands: sim]
    // [subcommands: lab]
    /// Run the side-by-side experiment on real guests (vanilla / static RT / pvsched).
    Lab(Box<pvsched_lab::LabArgs>),
    /// Internal: write the man pages and shell completions generated from these
    /// definitions (the package build runs it).
    #[command(hide = true)]
    Generate(generate_cmd::GenerateArgs),
}

/// Every error is one line on stderr, its causes joined by `: `, and exit status 1.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pvsched: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Abi(cmd) => abi_cmd::run(cmd),
        // [dispatch: hostd]
        Command::Hostd(args) => hostd_cmd::run_hostd(args),
        Command::HostdWatchdog(args) => hostd_cmd::run_hostd_watchdog(args),
        Command::Status(args) => hostd_cmd::run_status(args),
        Command::Top(args) => top_cmd::run(args),
        Command::HostdBench(args) => hostd_cmd::run_hostd_bench(args),
        Command::Isolate(args) => isolate_cmd::run(args),
        Command::Sim(cmd) => sim_cmd::run(cmd),
        // [dispatch: sim]
        // [dispatch: lab]
        Command::Lab(args) => lab_cmd::run(*args),
        Command::Generate(args) => generate_cmd::run(args, Cli::command()),
    }
}
