//! Lab: boots real Linux guests under QEMU with the pvsched shared page and measures
//! real-time latency (cyclictest) in them.
//!
//! The pieces, in the order a run uses them:
//!
//! 1. [`LabAssets::prepare`] checks the host tools and caches the Debian cloud kernel that
//!    matches the installed cloud headers (so the guest module builds against them).
//! 2. [`Initramfs::build`] writes a newc archive with busybox, cyclictest, the optional guest
//!    module and an `/init` script that runs a [`Workload`] and reports on the console.
//! 3. [`Guest::boot`] starts QEMU (KVM when it boots, TCG otherwise) with an ivshmem device
//!    backed by `/dev/shm/pvsched-<name>` and a QMP socket; the host daemon finds the guest
//!    through those and [`Guest::vcpu_tids`].
//! 4. [`collect`] waits for the workload and parses its output into a [`WorkloadResult`].
//!
//! [`build_guest_module`] builds `guest/kmod/pvsched_guest.ko` for the initramfs.
//!
//! On top of these, `pvsched lab` ([`LabArgs`], [`run`]) runs the side-by-side experiment
//! ([`experiment`]): vanilla, static-RT (vCPU threads, or every QEMU thread) and pvsched
//! scheduling, with and without a rogue guest, on a host loaded by stress-ng
//! ([`hostload`]), and writes `results.json` ([`results`]), a Markdown table and SVG plots
//! ([`report`]), and with `--repeat` the medians over runs ([`median`]); [`check`] holds
//! what CI asserts on a results file.
//!
//! `pvsched lab --experiment overcommit` runs seed 000's experiment instead
//! ([`overcommit`]): guests of different sizes run hackbench ([`hackbench`]) at once on a
//! host at 80% CPU, and the table says whether a bigger VM scored below a smaller one.
//!
//! `pvsched lab --experiment guest-lock` ([`guestlock`]) runs the guest user-space locks of
//! `pvsched-guest lock-bench` (spin, futex, and the pvsched lock that reads the host's
//! per-vCPU lines) in one guest on a loaded host, with and without the daemon, with the
//! host lines' freshness and the boost latency as the guest measures them.
//!
//! `pvsched lab --experiment isolation` ([`isolation`]) runs cyclictest in a 1-vCPU guest
//! idle, on a loaded host, and with a CPU isolated for its vCPU thread by the isolation
//! code of `pvsched isolate` (QEMU's main thread on housekeeping or isolated too), and
//! checks that the undo restored every host value.
//!
//! `pvsched lab --experiment iothread` ([`iothread`]) runs seed 004's I/O-thread
//! experiment: a guest's virtio-blk disk on QEMU's main loop or on an IOThread, with
//! random O_DIRECT reads and cyclictest on one vCPU, hogs on the others, and the I/O
//! vCPU thread's run-queue wait sampled from the host.
#![forbid(unsafe_code)]

pub mod assets;
pub mod check;
mod cli;
mod command;
pub mod configrun;
pub mod cyclictest;
mod error;
pub mod experiment;
pub mod guestlock;
pub mod hackbench;
pub mod hostd;
pub mod hostload;
pub mod hostsched;
pub mod initramfs;
pub mod iothread;
pub mod isolation;
pub mod kmod;
pub mod median;
pub mod overcommit;
pub mod page;
pub mod qemu;
pub mod report;
pub mod results;
pub mod stallprobe;
pub mod testing;
pub mod workload;

use std::time::Duration;

use serde::Serialize;

pub use assets::{AssetOptions, LabAssets};
pub use cli::{run, AccelArg, Experiment, LabArgs, DEFAULT_DURATION_S, QUICK_DURATION_S};
pub use cyclictest::{parse_histogram, LatencySummary, ThreadLatency};
pub use error::{LabError, Result};
pub use initramfs::{Initramfs, InitramfsSpec};
pub use kmod::{build_guest_module, build_guest_tool, GUEST_TOOL_FILE};
pub use qemu::{AccelChoice, Accelerator, Guest, GuestConfig, GuestOutput, VcpuThread};
pub use results::{ConfigResult, Configuration, LabResults, Scheduling};
pub use workload::{CyclictestParams, InitControl, RtPolicy, Workload};

static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running lab to stop: no further configuration or run starts, and every child
/// the lab started and still runs (QEMU, stress-ng, cyclictest, the daemon, which restores
/// its threads on SIGTERM) is sent SIGTERM now, so the configuration that was running
/// fails at once and its guards reap what is left; the run then ends with
/// [`LabError::Interrupted`]. Returns how many child processes were sent SIGTERM.
pub fn request_stop() -> usize {
    STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
    hostload::stop_children()
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Slack on top of the workload's own duration before [`collect`] gives up: cyclictest
/// start-up and the histogram dump are slow under TCG.
pub const RESULT_SLACK: Duration = Duration::from_secs(60);

/// Everything one guest run produced, ready for JSON.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    /// Guest name.
    pub guest: String,
    /// Accelerator the guest ran under.
    pub accelerator: Accelerator,
    /// Why KVM was abandoned, when it was.
    pub kvm_fallback: Option<String>,
    /// Milliseconds from starting QEMU to init's first line.
    pub boot_ms: u64,
    /// Host thread ids of the vCPUs, in vCPU order, as seen while the guest ran.
    pub vcpu_tids: Vec<u32>,
    /// The workload that ran.
    pub workload: Workload,
    /// Guest module status (`loaded`, `failed rc=N`, `absent`), when one was asked for.
    pub module: Option<String>,
    /// Latency figures, for workloads that run cyclictest.
    pub latency: Option<LatencySummary>,
    /// Output of the diagnostics commands.
    pub diagnostics: String,
    /// Milliseconds from the end of boot to the end of the run.
    pub run_ms: u64,
}

/// Waits for `guest` to finish `workload` (the one its initramfs was built with) and turns
/// its output into a [`WorkloadResult`]. A non-zero workload exit code is an error.
pub fn collect(guest: &mut Guest, workload: &Workload) -> Result<WorkloadResult> {
    // Read the thread ids while QEMU is still alive.
    let vcpu_tids = guest.vcpu_tids()?;
    let output = guest.wait_result(workload.duration() + RESULT_SLACK)?;
    if output.exit_code != 0 {
        return Err(LabError::WorkloadFailed {
            name: guest.name().to_owned(),
            code: output.exit_code,
            output: output.result,
        });
    }
    let latency = match workload.cyclictest() {
        Some(params) => Some(parse_histogram(
            &output.result,
            params.histogram_max_us.into(),
        )?),
        None => None,
    };
    Ok(WorkloadResult {
        guest: guest.name().to_owned(),
        accelerator: guest.accelerator(),
        kvm_fallback: guest.kvm_fallback().map(str::to_owned),
        boot_ms: u64::try_from(guest.boot_time().as_millis()).unwrap_or(u64::MAX),
        vcpu_tids,
        workload: workload.clone(),
        module: output.module,
        latency,
        diagnostics: output.diagnostics,
        run_ms: output.run_ms,
    })
}
