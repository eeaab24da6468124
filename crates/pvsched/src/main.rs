//! `pvsched`: paravirtual two-level scheduling for KVM/QEMU guests.

mod abi_cmd;

use clap::{Parser, Subcommand};

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
    // [subcommands: sim]
    // [subcommands: lab]
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Abi(cmd) => abi_cmd::run(cmd),
        // [dispatch: hostd]
        // [dispatch: sim]
        // [dispatch: lab]
    }
}
