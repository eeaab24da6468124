//! `pvsched lab` on its own, for working on the lab without building the whole binary.
//! The pvsched configurations need a `pvsched` binary with `hostd`:
//!
//! ```text
//! cargo run -p pvsched-lab --example lab -- --quick --pvsched-bin target/debug/pvsched
//! ```

use clap::Parser;

/// Run the lab experiment (same flags as `pvsched lab`).
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: pvsched_lab::LabArgs,
}

fn main() -> anyhow::Result<()> {
    pvsched_lab::run(Cli::parse().args)?;
    Ok(())
}
