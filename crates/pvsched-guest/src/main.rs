//! `pvsched-guest`: runs inside a guest with the pvsched module loaded; prints the
//! host's lines, benchmarks the pvsched lock against a spin lock and a futex mutex,
//! and measures the channel from the guest's side; `io-bench` measures the virtual disk
//! (it needs no module). Every command prints one JSON object on stdout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use pvsched_guest::bench::{self, BenchSpec};
use pvsched_guest::iobench::{self, IoBenchSpec};
use pvsched_guest::lock::{FutexMutex, PvLock, PvLockConfig, RawLock, SpinLock};
use pvsched_guest::probe;
use pvsched_guest::view::{DeviceLines, HostLines, DEVICE};
use serde_json::json;

#[derive(Parser)]
#[command(version, about = "pvsched in guest user space")]
struct Cli {
    /// The guest module's read-only view of the shared region.
    #[arg(long, default_value = DEVICE, global = true)]
    device: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints every vCPU's host line.
    Lines,
    /// Benchmarks the locks against each other.
    LockBench {
        /// Contending threads (default: twice the vCPUs).
        #[arg(long)]
        threads: Option<usize>,
        /// Seconds per lock.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Busy-loop iterations with the lock held.
        #[arg(long, default_value_t = 200)]
        inside: u32,
        /// Busy-loop iterations between acquisitions.
        #[arg(long, default_value_t = 400)]
        outside: u32,
        /// Locks to run, in order.
        #[arg(long, value_delimiter = ',', default_value = "spin,futex,pvsched")]
        locks: Vec<String>,
        /// The pvsched lock's longest spin, µs.
        #[arg(long, default_value_t = 50)]
        spin_limit_us: u64,
        /// The pvsched lock's trust limit on a host line's age, ms.
        #[arg(long, default_value_t = 100)]
        max_age_ms: u64,
    },
    /// Guest-measured latency from an RT wake-up to the host line showing it boosted.
    BoostProbe {
        /// The vCPU to wake on.
        #[arg(long, default_value_t = 0)]
        cpu: u32,
        /// Wake-ups.
        #[arg(long, default_value_t = 200)]
        trials: usize,
        /// Sleep before each wake-up, ms (longer than the module's `idle_boost_ms`).
        #[arg(long, default_value_t = 300)]
        gap_ms: u64,
        /// Longest wait for the boost, ms.
        #[arg(long, default_value_t = 50)]
        deadline_ms: u64,
        /// SCHED_FIFO priority of the probe.
        #[arg(long, default_value_t = 50)]
        prio: i32,
    },
    /// How often the host republishes one vCPU's line, in guest time.
    Freshness {
        /// The vCPU whose line to watch.
        #[arg(long, default_value_t = 0)]
        cpu: u32,
        /// Seconds to watch.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Read interval, µs.
        #[arg(long, default_value_t = 200)]
        every_us: u64,
    },
    /// Random O_DIRECT reads of a block device: reads per second and read latency.
    IoBench {
        /// The block device to read.
        #[arg(long, default_value = "/dev/vda")]
        disk: PathBuf,
        /// Seconds to read.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Bytes per read (a power of two, at least 512).
        #[arg(long, default_value_t = 4096)]
        block_size: usize,
        /// Pin the reading thread to this vCPU.
        #[arg(long)]
        cpu: Option<u32>,
        /// Seed of the random offsets.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn seconds(s: f64) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0 && s <= 3600.0) {
        bail!("a duration must be within (0, 3600] seconds, not {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Every command but the disk benchmark reads the module's device.
    let device = cli.device;
    let open_lines = || DeviceLines::open(&device);
    let out = match cli.command {
        Command::IoBench {
            disk,
            seconds: secs,
            block_size,
            cpu,
            seed,
        } => {
            if let Some(cpu) = cpu {
                probe::pin(cpu)?;
            }
            let result = iobench::run(&IoBenchSpec {
                disk,
                block_size,
                duration: seconds(secs)?,
                seed,
            })?;
            serde_json::to_value(result)?
        }
        Command::Lines => {
            let lines = open_lines()?;
            let all: Vec<_> = (0..lines.vcpus())
                .map(|cpu| {
                    lines.line(cpu).map(|l| {
                        json!({
                            "cpu": cpu,
                            "preempted": l.preempted,
                            "pcpu_load_permille": l.pcpu_load_permille,
                            "boost": format!("{:?}", l.boost),
                            "host_time_ns": l.host_time_ns,
                        })
                    })
                })
                .collect();
            json!({ "vcpus": all })
        }
        Command::LockBench {
            threads,
            seconds: secs,
            inside,
            outside,
            locks,
            spin_limit_us,
            max_age_ms,
        } => {
            let lines = open_lines()?;
            let spec = BenchSpec {
                threads: threads.unwrap_or(2 * lines.vcpus() as usize).clamp(1, 1024),
                duration: seconds(secs)?,
                inside,
                outside,
            };
            let config = PvLockConfig {
                spin_limit_ns: spin_limit_us.saturating_mul(1000),
                max_age_ns: max_age_ms.saturating_mul(1_000_000),
                ..PvLockConfig::default()
            };
            let mut results = Vec::new();
            for name in &locks {
                let entry = match name.as_str() {
                    "spin" => {
                        json!({ "lock": name, "result": bench::run(&SpinLock::default(), spec) })
                    }
                    "futex" => {
                        json!({ "lock": name, "result": bench::run(&FutexMutex::default(), spec) })
                    }
                    "pvsched" => {
                        let lock = PvLock::new(&lines, config);
                        let result = bench::run(&lock as &dyn RawLock, spec);
                        json!({ "lock": name, "result": result, "counters": lock.counters() })
                    }
                    other => bail!("unknown lock {other:?} (spin, futex, pvsched)"),
                };
                eprintln!("pvsched-guest: lock-bench {name} done");
                results.push(entry);
            }
            json!({
                "threads": spec.threads,
                "seconds": secs,
                "inside": inside,
                "outside": outside,
                "vcpus": lines.vcpus(),
                "locks": results,
            })
        }
        Command::BoostProbe {
            cpu,
            trials,
            gap_ms,
            deadline_ms,
            prio,
        } => {
            let lines = open_lines()?;
            if cpu >= lines.vcpus() {
                bail!("no vCPU {cpu}: the host publishes {} lines", lines.vcpus());
            }
            let r = probe::boost_latency(
                &lines,
                cpu,
                trials.clamp(1, 100_000),
                Duration::from_millis(gap_ms.min(10_000)),
                Duration::from_millis(deadline_ms.clamp(1, 10_000)),
                prio.clamp(1, 99),
            )?;
            serde_json::to_value(r)?
        }
        Command::Freshness {
            cpu,
            seconds: secs,
            every_us,
        } => {
            let lines = open_lines()?;
            if cpu >= lines.vcpus() {
                bail!("no vCPU {cpu}: the host publishes {} lines", lines.vcpus());
            }
            let s = probe::republish_intervals(
                &lines,
                cpu,
                seconds(secs)?,
                Duration::from_micros(every_us.clamp(10, 1_000_000)),
            );
            json!({ "cpu": cpu, "republish_interval": s })
        }
    };
    println!("{out}");
    Ok(())
}
