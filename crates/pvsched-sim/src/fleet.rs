//! Fleet mode and the speed benchmark.
//!
//! Fleet mode is [`crate::run::run_scenario`] with `hosts > 1`: every host is
//! an independent [`crate::model::Sim`] with its own RNG stream, run in
//! parallel with rayon; rows merge VMs of the same name over all hosts.

use std::fmt::Write;
use std::time::Instant;

use crate::run::{run_scenario, RunOptions};
use crate::scenarios::builtin;
use crate::ScenarioError;

/// Figures of `pvsched sim bench`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Bench {
    /// Events of the single-core run.
    pub single_events: u64,
    /// Its wall time, s.
    pub single_wall_s: f64,
    /// Events per second of wall time on one thread.
    pub events_per_s_one_core: f64,
    /// The same per second of the thread's CPU time (from the kernel's
    /// schedstat; robust against other load on the machine), when available.
    pub events_per_cpu_s: Option<f64>,
    /// Fleet: hosts, VMs, vCPUs, simulated seconds, events, wall seconds.
    pub fleet: Option<FleetFigures>,
}

/// Figures of the fleet run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FleetFigures {
    /// Hosts.
    pub hosts: u32,
    /// VMs over all hosts.
    pub vms: u64,
    /// vCPUs over all hosts.
    pub vcpus: u64,
    /// Simulated seconds.
    pub simulated_s: f64,
    /// Events.
    pub events: u64,
    /// Wall seconds.
    pub wall_s: f64,
    /// Worker threads.
    pub threads: usize,
    /// CPU seconds the process used (all threads), when available.
    pub cpu_s: Option<f64>,
}

/// CPU time of the calling thread, ns (`/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// CPU time of the process, s (`/proc/self/stat`, user + system ticks at 100 Hz).
fn process_cpu_s() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

impl Bench {
    /// The figures as text.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "one core: {} events in {:.2} s wall = {:.2} M events/s",
            self.single_events,
            self.single_wall_s,
            self.events_per_s_one_core / 1e6
        );
        match self.events_per_cpu_s {
            Some(r) => {
                let _ = writeln!(s, " ({:.2} M events per CPU-second)", r / 1e6);
            }
            None => {
                let _ = writeln!(s);
            }
        }
        if let Some(f) = &self.fleet {
            let _ = writeln!(
                s,
                "fleet: {} hosts, {} VMs, {} vCPUs, {:.0} s simulated: {} events in {:.1} s wall on {} threads ({:.2} M events/s)",
                f.hosts,
                f.vms,
                f.vcpus,
                f.simulated_s,
                f.events,
                f.wall_s,
                f.threads,
                f.events as f64 / f.wall_s / 1e6
            );
            if let Some(cpu) = f.cpu_s {
                let _ = writeln!(
                    s,
                    "fleet CPU time: {cpu:.1} s ({:.2} M events per CPU-second)",
                    f.events as f64 / cpu / 1e6
                );
            }
        }
        s
    }
}

/// Runs the benchmark: 4 hosts of the fleet scenario for 2 s on one thread,
/// then (with `fleet`) the whole fleet scenario on all cores.
pub fn bench(seed: u64, fleet: bool) -> Result<Bench, ScenarioError> {
    let mut sc = builtin("fleet", false)
        .expect("fleet is built in")
        .remove(0);
    sc.hosts = 4;
    sc.duration_ms = 2000;
    let opt = RunOptions {
        seed,
        single_thread: true,
        ..RunOptions::default()
    };
    let t = Instant::now();
    let cpu0 = thread_cpu_ns();
    let r = run_scenario(&sc, &opt)?;
    let cpu = thread_cpu_ns().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    let wall = t.elapsed().as_secs_f64();
    let mut b = Bench {
        single_events: r.events,
        single_wall_s: wall,
        events_per_s_one_core: r.events as f64 / wall,
        events_per_cpu_s: cpu
            .filter(|&c| c > 0)
            .map(|c| r.events as f64 / (c as f64 / 1e9)),
        fleet: None,
    };
    if fleet {
        let sc = builtin("fleet", false)
            .expect("fleet is built in")
            .remove(0);
        let opt = RunOptions {
            seed,
            progress: true,
            ..RunOptions::default()
        };
        let t = Instant::now();
        let cpu0 = process_cpu_s();
        let r = run_scenario(&sc, &opt)?;
        let cpu_s = process_cpu_s().zip(cpu0).map(|(b, a)| b - a);
        let wall = t.elapsed().as_secs_f64();
        let vms: u64 = sc.vms.iter().map(|v| u64::from(v.count)).sum::<u64>() * u64::from(sc.hosts);
        let vcpus: u64 = sc
            .vms
            .iter()
            .map(|v| u64::from(v.count * v.vcpus))
            .sum::<u64>()
            * u64::from(sc.hosts);
        b.fleet = Some(FleetFigures {
            hosts: sc.hosts,
            vms,
            vcpus,
            simulated_s: sc.duration_ms as f64 / 1000.0,
            events: r.events,
            wall_s: wall,
            threads: rayon::current_num_threads(),
            cpu_s,
        });
    }
    Ok(b)
}
