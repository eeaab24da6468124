//! Boots one lab guest, runs a workload in it and prints the result as JSON.
//!
//! ```text
//! cargo run -p pvsched-lab --example lab_run -- --workload cyclictest --duration-s 5
//! ```

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use pvsched_lab::{
    collect, AccelChoice, AssetOptions, CyclictestParams, Guest, GuestConfig, InitControl,
    Initramfs, InitramfsSpec, LabAssets, RtPolicy, Workload,
};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WorkloadKind {
    Idle,
    Cyclictest,
    Rogue,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Accel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Policy {
    Fifo,
    Rr,
}

/// Boot a lab guest, run a workload, print the result as JSON.
#[derive(Debug, Parser)]
struct Args {
    /// Guest name (also names /dev/shm/pvsched-NAME).
    #[arg(long, default_value_t = format!("lab-{}", std::process::id()))]
    name: String,
    /// Workload to run in the guest.
    #[arg(long, value_enum, default_value_t = WorkloadKind::Cyclictest)]
    workload: WorkloadKind,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Workload duration in seconds.
    #[arg(long, default_value_t = 5)]
    duration_s: u32,
    /// cyclictest interval in microseconds.
    #[arg(long, default_value_t = 1000)]
    interval_us: u32,
    /// cyclictest RT priority.
    #[arg(long, default_value_t = 90)]
    priority: u8,
    /// cyclictest RT policy.
    #[arg(long, value_enum, default_value_t = Policy::Fifo)]
    policy: Policy,
    /// vCPU that runs the rogue busy loop.
    #[arg(long, default_value_t = 0)]
    rogue_cpu: u32,
    /// Accelerator selection.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Guest module to load (pvsched_guest.ko).
    #[arg(long)]
    module: Option<PathBuf>,
    /// Module parameters.
    #[arg(long, default_value = "")]
    module_params: String,
    /// Shell command to run in the guest after the workload (repeatable).
    #[arg(long = "diag")]
    diagnostics: Vec<String>,
    /// Kernel command line appended to the base one.
    #[arg(long, default_value = pvsched_lab::qemu::DEFAULT_EXTRA_CMDLINE)]
    extra_cmdline: String,
    /// Asset cache directory.
    #[arg(long, default_value = pvsched_lab::assets::DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// Do not install missing packages.
    #[arg(long)]
    no_install: bool,
    /// Write a pvsched host header into the shared page before boot (stands in for the
    /// host daemon, so the guest module can attach).
    #[arg(long)]
    format_shm: bool,
    /// Print the shared page's first bytes (header and slots) every N ms while the guest
    /// runs (needs --format-shm to be interesting).
    #[arg(long)]
    dump_shm_ms: Option<u64>,
    /// Write the guest console to this file (e.g. to capture a test fixture).
    #[arg(long)]
    save_console: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let assets = LabAssets::prepare(&AssetOptions {
        cache_dir: args.cache_dir.clone(),
        install_missing: !args.no_install,
        ..AssetOptions::default()
    })
    .context("preparing lab assets")?;

    let cyclictest = CyclictestParams {
        interval_us: args.interval_us,
        duration_s: args.duration_s,
        priority: args.priority,
        policy: match args.policy {
            Policy::Fifo => RtPolicy::Fifo,
            Policy::Rr => RtPolicy::Rr,
        },
        ..CyclictestParams::default()
    };
    let workload = match args.workload {
        WorkloadKind::Idle => Workload::Idle {
            duration_s: args.duration_s,
        },
        WorkloadKind::Cyclictest => Workload::Cyclictest(cyclictest),
        WorkloadKind::Rogue => Workload::Rogue {
            cyclictest,
            rogue_cpu: args.rogue_cpu,
        },
    };

    let initrd_path = std::env::temp_dir().join(format!("{}.cpio", args.name));
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.cyclictest.clone(), assets.chrt.clone()],
            module: args.module.clone(),
            kernel_modules: Vec::new(),
            files: Vec::new(),
            module_params: args.module_params.clone(),
            workload: workload.clone(),
            diagnostics: args.diagnostics.clone(),
            control: InitControl::default(),
        },
        &initrd_path,
    )
    .context("building initramfs")?;

    let mut config = GuestConfig::new(&args.name, &assets.kernel_image, &initramfs.path);
    config.vcpus = args.vcpus;
    config.extra_cmdline = args.extra_cmdline.clone();
    if args.format_shm {
        let header = pvsched_abi::decode::new_host_header(
            args.vcpus,
            pvsched_abi::raw::PVSCHED_FEAT_KNOWN,
            1,
        );
        config.shm_initial_contents = Some(header.to_bytes().to_vec());
    }
    config.accel = match args.accel {
        Accel::Auto => AccelChoice::Auto,
        Accel::Kvm => AccelChoice::Kvm,
        Accel::Tcg => AccelChoice::Tcg,
    };
    let outcome = Guest::boot(&config)
        .context("booting guest")
        .and_then(|mut guest| {
            eprintln!(
                "guest {} pid {} accel {} vcpu threads {:?} shm {} qmp {}",
                guest.name(),
                guest.pid(),
                guest.accelerator(),
                guest.vcpu_threads()?,
                guest.shm_path().display(),
                guest.qmp_path().display()
            );
            let dumper = args
                .dump_shm_ms
                .map(|period_ms| spawn_shm_dumper(guest.shm_path().to_owned(), period_ms));
            let result = collect(&mut guest, &workload).context("running workload");
            if let Some((stop, handle)) = dumper {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = handle.join();
            }
            if let Some(path) = &args.save_console {
                std::fs::write(path, guest.console().join("\n") + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            result
        });
    // Best effort: the archive is rebuilt on every run.
    let _ = std::fs::remove_file(&initramfs.path);
    let result = outcome?;

    if let Some(latency) = &result.latency {
        eprintln!(
            "boot {} ms ({}), {} samples: avg {:.1} us, p99 {}{} us, max {} us",
            result.boot_ms,
            result.accelerator,
            latency.samples,
            latency.avg_us,
            if latency.p99_is_lower_bound { ">=" } else { "" },
            latency.p99_us,
            latency.max_us
        );
    }
    if !result.diagnostics.is_empty() {
        eprintln!("--- guest diagnostics ---\n{}", result.diagnostics);
    }
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// Prints the guest header heartbeat and each slot's update counter from the host side of
/// the shared page every `period_ms`, until told to stop.
fn spawn_shm_dumper(
    path: PathBuf,
    period_ms: u64,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    use pvsched_abi::raw::{PvschedGuestLine, PvschedHeaderGuest};
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_flag = stop.clone();
    let handle = std::thread::spawn(move || {
        while !stop_flag.load(std::sync::atomic::Ordering::Relaxed) {
            // A demo reader: plain file reads may tear, which only garbles one print.
            if let Ok(bytes) = std::fs::read(&path) {
                let line = |offset: usize| -> Option<[u8; 64]> {
                    bytes.get(offset..offset + 64)?.try_into().ok()
                };
                if let (Some(guest), Some(slot0), Some(slot1)) = (line(64), line(128), line(256)) {
                    let guest = PvschedHeaderGuest::from_bytes(&guest);
                    let slots = [
                        PvschedGuestLine::from_bytes(&slot0),
                        PvschedGuestLine::from_bytes(&slot1),
                    ];
                    eprintln!(
                        "host view: guest state={} heartbeat={} features={:#x} | {}",
                        guest.guest_state,
                        guest.guest_heartbeat,
                        guest.guest_features,
                        slots
                            .iter()
                            .map(|s| format!(
                                "cpu{} updates={} policy={} prio={} idle={} rt_pending={} irqs={}",
                                s.cpu_id,
                                s.updates,
                                s.task_policy,
                                s.task_rt_prio,
                                s.flags & 1,
                                s.rt_pending,
                                s.irq_count
                            ))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    );
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(period_ms));
        }
    });
    (stop, handle)
}
