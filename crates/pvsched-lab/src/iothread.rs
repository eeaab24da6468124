//! The I/O-thread experiment: a guest's disk served by QEMU's main loop or by a dedicated
//! IOThread, on a loaded host.
//!
//! One guest of `--vcpus` (default 2) vCPUs with a virtio-blk disk backed by a raw file of
//! [`DISK_MIB`] MiB in the run directory (`cache=none,aio=native` when the file system takes
//! `O_DIRECT`, else `cache=writeback,aio=threads`). vCPU 0 is the I/O vCPU: it runs
//! `pvsched-guest io-bench` (random `O_DIRECT` reads of [`BLOCK_SIZE`] bytes of `/dev/vda`,
//! so every read reaches QEMU's block layer) and a cyclictest thread pinned on it at FIFO
//! `--guest-rt-prio`; every other vCPU runs a busy loop. The host runs the lab's load.
//!
//! Configurations: `main-loop` (the disk on QEMU's main loop, QEMU's default),
//! `iothread` (`-object iothread,id=io0` and `virtio-blk-pci,iothread=io0`: the disk's
//! virtqueue notifications and completions handled by that thread) and `iothread-rt` (the
//! same, with the IOThread set to `SCHED_FIFO` `--static-rt-prio` by the lab for the
//! window: what the daemon's `iothread_priority` gives it, without a budget).
//!
//! While the guest measures, the lab samples the I/O vCPU thread's
//! `/proc/<qemu>/task/<tid>/schedstat` every [`SCHEDSTAT_PERIOD`] from a thread at
//! `SCHED_FIFO` 1 (so the host load does not stretch the intervals): per interval, the time
//! the thread waited runnable on a host run queue (the second field's increase). The
//! kernel adds a wait to that field when the wait ends (the thread gets a CPU), so an
//! interval holds the waits that ended in it, whole: one 80 ms wait shows as 80 ms in one
//! interval and 0 in the seven before it. The mean, standard deviation, p99 and maximum of
//! the per-interval figure are the vCPU's time-slice jitter as the host sees it. The main loop's and the IOThread's CPU time over the window show which thread did
//! the disk's work.
//!
//! One configuration run: create the disk, boot the guest on a quiet host (init waits for
//! the go line), start the host load, warm up, send go. The guest loads the virtio modules
//! of its kernel, waits for `/dev/vda`, starts the hogs and prints `PVSCHED-LAB IOTHREAD
//! begin`, runs io-bench and cyclictest for `--duration-s`, prints `window-end`, then the
//! benchmark's JSON and cyclictest's histogram; the lab samples schedstat between `begin`
//! and `window-end`.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::configrun::{self, ConfigDone, ConfigRecord, ExperimentResults, Progress};
use crate::cyclictest::{parse_histogram, LatencySummary};
use crate::error::{LabError, Result};
use crate::guestlock::Summary;
use crate::hostload::{HostLoad, LoadSpec};
use crate::hostsched::StaticRt;
use crate::initramfs::{Initramfs, InitramfsSpec, KERNEL_MODULE_DIR};
use crate::qemu::{AccelChoice, Accelerator, Guest, GuestConfig, GuestOutput};
use crate::results::ExitCheck;
use crate::workload::{InitControl, Workload, MARKER_READY};
use crate::{LabAssets, RESULT_SLACK};

/// `experiment` of an iothread `results.json`.
pub const EXPERIMENT: &str = "iothread";
/// Version of the iothread `results.json` layout.
pub const RESULTS_VERSION: u32 = 1;
/// Measured seconds per configuration with `--quick`.
pub const QUICK_DURATION_S: u32 = 10;
/// Measured seconds per configuration by default.
pub const DEFAULT_DURATION_S: u32 = 30;
/// Size of the guest's disk (MiB).
pub const DISK_MIB: u32 = 64;
/// Bytes per read of `io-bench`.
pub const BLOCK_SIZE: u32 = 4096;
/// cyclictest's histogram range (µs): TCG latencies reach milliseconds.
pub const HISTOGRAM_MAX_US: u32 = 200_000;
/// How often the I/O vCPU thread's schedstat is sampled.
pub const SCHEDSTAT_PERIOD: Duration = Duration::from_millis(10);
/// FIFO priority of the schedstat sampler: above every SCHED_OTHER thread of the host load,
/// below any real-time vCPU or IOThread.
const SAMPLER_RT_PRIO: u8 = 1;
/// The vCPU that runs the I/O benchmark and cyclictest.
pub const IO_CPU: u32 = 0;
/// Prefix of the console lines the guest's steps print.
pub const STEP_MARKER: &str = "PVSCHED-LAB IOTHREAD";
/// QEMU's id of the IOThread object.
const IOTHREAD_ID: &str = "io0";
/// How long init may take from boot to READY.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds the guest may take to load its modules and find the disk before the window.
const SETUP_SLACK_S: u64 = 60;

/// A configuration of the iothread experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IothreadConfig {
    /// The disk on QEMU's main loop (QEMU's default).
    MainLoop,
    /// The disk on a dedicated IOThread.
    Iothread,
    /// The disk on a dedicated IOThread at `SCHED_FIFO`.
    IothreadRt,
}

impl IothreadConfig {
    /// Every configuration, in report order.
    pub const ALL: [IothreadConfig; 3] = [
        IothreadConfig::MainLoop,
        IothreadConfig::Iothread,
        IothreadConfig::IothreadRt,
    ];

    /// `main-loop`, `iothread`, `iothread-rt`.
    pub fn name(self) -> &'static str {
        match self {
            IothreadConfig::MainLoop => "main-loop",
            IothreadConfig::Iothread => "iothread",
            IothreadConfig::IothreadRt => "iothread-rt",
        }
    }

    /// Parses a configuration name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|config| config.name() == name)
    }

    /// Whether the disk has its own IOThread.
    pub fn has_iothread(self) -> bool {
        self != IothreadConfig::MainLoop
    }

    /// Whether the IOThread runs at `SCHED_FIFO`.
    pub fn iothread_rt(self) -> bool {
        self == IothreadConfig::IothreadRt
    }
}

/// How QEMU opens the disk's backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskCache {
    /// `cache=none,aio=native`: `O_DIRECT` and Linux AIO, no host page cache.
    Direct,
    /// `cache=writeback,aio=threads`: for file systems that refuse `O_DIRECT`.
    Buffered,
}

impl DiskCache {
    /// The `-drive` options.
    pub fn drive_options(self) -> &'static str {
        match self {
            DiskCache::Direct => "cache=none,aio=native",
            DiskCache::Buffered => "cache=writeback,aio=threads",
        }
    }
}

/// The parameters of an iothread run (recorded in `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IothreadParams {
    /// `--quick`.
    pub quick: bool,
    /// vCPUs of the guest (vCPU 0 does I/O, the others run hogs).
    pub vcpus: u32,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// Measured seconds per configuration.
    pub duration_s: u32,
    /// Seconds of host load before the guest starts.
    pub warmup_s: u32,
    /// Size of the disk (MiB).
    pub disk_mib: u32,
    /// Bytes per read.
    pub block_size: u32,
    /// cyclictest interval (µs).
    pub interval_us: u32,
    /// FIFO priority of cyclictest in the guest.
    pub guest_rt_prio: u8,
    /// FIFO priority of the IOThread under `iothread-rt`.
    pub iothread_rt_prio: u8,
    /// cyclictest histogram range (µs).
    pub histogram_max_us: u32,
    /// schedstat sampling period (ms).
    pub schedstat_period_ms: u64,
    /// The host load.
    pub load: LoadSpec,
    /// Host CPUs.
    pub host_cpus: u32,
    /// Host kernel release.
    pub host_kernel: String,
    /// Guest kernel release.
    pub guest_kernel: String,
    /// Configurations, in run order.
    pub configs: Vec<String>,
}

/// Checks the parameters of an iothread run.
pub fn validate(params: &IothreadParams) -> Result<()> {
    let range = |name: &str, value: u64, min: u64, max: u64| {
        if (min..=max).contains(&value) {
            Ok(())
        } else {
            Err(LabError::InvalidConfig(format!(
                "{name} {value} is outside {min}..={max}"
            )))
        }
    };
    // One vCPU for I/O and at least one hog; the hogs are pinned with a 64-bit mask.
    range("--vcpus", params.vcpus.into(), 2, 64)?;
    range("--memory-mib", params.memory_mib.into(), 64, 65_536)?;
    range("--duration-s", params.duration_s.into(), 1, 3600)?;
    range("--warmup-s", params.warmup_s.into(), 0, 600)?;
    range("--interval-us", params.interval_us.into(), 50, 1_000_000)?;
    range("--guest-rt-prio", params.guest_rt_prio.into(), 1, 99)?;
    range("--static-rt-prio", params.iothread_rt_prio.into(), 1, 99)?;
    range("disk size (MiB)", params.disk_mib.into(), 1, 4096)?;
    if !params.block_size.is_power_of_two() || !(512..=1 << 20).contains(&params.block_size) {
        return Err(LabError::InvalidConfig(format!(
            "block size {} must be a power of two in 512..=1048576",
            params.block_size
        )));
    }
    if let Some(percent) = params.load.cpu_load {
        range("--cpu-load", percent.into(), 1, 100)?;
    }
    Ok(())
}

/// Creates the disk's backing file at `path` (`mib` MiB of a non-zero pattern, so reads
/// are of allocated blocks, not holes) and says how QEMU can open it.
pub fn create_disk(path: &Path, mib: u32) -> Result<DiskCache> {
    let mut file = fs::File::create(path).map_err(LabError::io("create", path))?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 + 1).collect();
    for _ in 0..mib {
        file.write_all(&chunk)
            .map_err(LabError::io("write", path))?;
    }
    file.sync_all().map_err(LabError::io("sync", path))?;
    drop(file);
    let direct = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    Ok(match direct {
        Ok(_) => DiskCache::Direct,
        Err(_) => DiskCache::Buffered,
    })
}

/// QEMU's arguments for the disk of `config`: a raw `-drive` on `disk` and a
/// virtio-blk-pci device, on an IOThread for `iothread`.
pub fn disk_args(config: IothreadConfig, disk: &Path, cache: DiskCache) -> Vec<String> {
    let mut args = Vec::new();
    if config.has_iothread() {
        args.extend(["-object".to_owned(), format!("iothread,id={IOTHREAD_ID}")]);
    }
    args.extend([
        "-drive".to_owned(),
        format!(
            "file={},if=none,id=disk0,format=raw,readonly=on,{}",
            disk.display(),
            cache.drive_options()
        ),
        "-device".to_owned(),
        if config.has_iothread() {
            format!("virtio-blk-pci,drive=disk0,iothread={IOTHREAD_ID}")
        } else {
            "virtio-blk-pci,drive=disk0".to_owned()
        },
    ]);
    args
}

/// The guest's steps: the init script's diagnostics commands (see the module
/// documentation).
pub fn guest_commands(params: &IothreadParams, modules: &[PathBuf]) -> Vec<String> {
    let names: Vec<String> = modules
        .iter()
        .filter_map(|path| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    let m = STEP_MARKER;
    vec![
        "mkdir -p /tmp".to_owned(),
        format!(
            "for m in {}; do insmod {KERNEL_MODULE_DIR}/$m || echo \"{m} note insmod $m failed\"; done",
            names.join(" ")
        ),
        "i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done"
            .to_owned(),
        format!("[ -b /dev/vda ] || echo \"{m} note no /dev/vda after 30 s\""),
        // The hogs: a busy loop pinned on every vCPU but the I/O vCPU.
        format!(
            "HOGS=\"\"; c=0; while [ $c -lt $NCPU ]; do \
             if [ $c -ne {IO_CPU} ]; then taskset $(printf '%x' $((1 << c))) sh -c 'while :; do :; done' & \
             HOGS=\"$HOGS $!\"; fi; c=$((c + 1)); done"
        ),
        format!("echo \"{m} begin\""),
        format!(
            "pvsched-guest io-bench --disk /dev/vda --seconds {s} --block-size {b} --cpu {IO_CPU} \
             > /tmp/io-bench.json 2> /tmp/io-bench.err &",
            s = params.duration_s,
            b = params.block_size
        ),
        "IO=$!".to_owned(),
        format!(
            "cyclictest --mlockall --quiet --priority={p} --policy=fifo --interval={i} \
             --duration={s} -t 1 -a {IO_CPU} --histogram={h} --histfile=/tmp/cyclictest.hist \
             > /tmp/cyclictest.out 2>&1",
            p = params.guest_rt_prio,
            i = params.interval_us,
            s = params.duration_s,
            h = params.histogram_max_us
        ),
        "CT=$?".to_owned(),
        "wait $IO; IORC=$?".to_owned(),
        format!("echo \"{m} window-end\""),
        "kill $HOGS".to_owned(),
        format!(
            "cat /tmp/io-bench.err /tmp/cyclictest.out | while IFS= read -r line; do echo \"{m} note $line\"; done"
        ),
        format!("echo \"{m} io-bench rc=$IORC $(cat /tmp/io-bench.json)\""),
        format!("echo \"{m} cyclictest-begin rc=$CT\""),
        // Only rows with a sample, as the latency experiment prints them.
        "awk '/^#/ { print; next } { for (i = 2; i <= NF; i++) if ($i + 0 != 0) { print; next } }' \
         /tmp/cyclictest.hist"
            .to_owned(),
        format!("echo \"{m} cyclictest-end\""),
        format!("echo \"{m} end\""),
    ]
}

/// One console line of the guest's steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// A message of a tool.
    Note(String),
    /// The measured window starts.
    Begin,
    /// The measured window ended.
    WindowEnd,
    /// io-bench ended: exit code and standard output (JSON when it succeeded).
    IoBench {
        /// Exit code (-1 when the line has none).
        rc: i32,
        /// What it printed.
        output: String,
    },
    /// cyclictest's histogram follows, up to [`GuestLine::CyclictestEnd`].
    CyclictestBegin {
        /// cyclictest's exit code (-1 when the line has none).
        rc: i32,
    },
    /// The histogram ended.
    CyclictestEnd,
    /// Every step ran.
    End,
}

fn parse_rc(text: &str) -> i32 {
    text.strip_prefix("rc=")
        .and_then(|rc| rc.parse().ok())
        .unwrap_or(-1)
}

/// Parses a console line of the guest's steps; `None` for any other line.
pub fn parse_line(line: &str) -> Option<GuestLine> {
    let rest = line.strip_prefix(STEP_MARKER)?.strip_prefix(' ')?;
    if let Some(note) = rest.strip_prefix("note ") {
        return Some(GuestLine::Note(note.to_owned()));
    }
    let (word, tail) = rest.split_once(' ').unwrap_or((rest.trim(), ""));
    Some(match word {
        "begin" => GuestLine::Begin,
        "window-end" => GuestLine::WindowEnd,
        "end" => GuestLine::End,
        "cyclictest-end" => GuestLine::CyclictestEnd,
        "cyclictest-begin" => GuestLine::CyclictestBegin {
            rc: parse_rc(tail.trim()),
        },
        "io-bench" => {
            let (rc, output) = tail.split_once(' ').unwrap_or((tail, ""));
            GuestLine::IoBench {
                rc: parse_rc(rc),
                output: output.trim().to_owned(),
            }
        }
        _ => return None,
    })
}

/// `pvsched-guest io-bench`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoBench {
    /// The device read.
    pub disk: String,
    /// Its size (bytes).
    pub disk_bytes: u64,
    /// Bytes per read.
    pub block_size: u32,
    /// Seconds the reads ran.
    pub seconds: f64,
    /// Reads completed.
    pub reads: u64,
    /// Reads per second.
    pub iops: f64,
    /// Latency of every read (µs).
    pub latency: Summary,
}

/// What the guest's steps produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestSteps {
    /// io-bench's result.
    pub io_bench: Option<IoBench>,
    /// cyclictest on the I/O vCPU.
    pub latency: Option<LatencySummary>,
    /// The tools' messages.
    pub notes: Vec<String>,
    /// Steps that failed or printed what could not be read.
    pub errors: Vec<String>,
    /// The window's start was seen.
    pub began: bool,
    /// The end line was seen.
    pub ended: bool,
}

/// Parses the guest's console (or its diagnostics section) into its steps' results;
/// `histogram_max_us` is the `--histogram` cyclictest ran with.
pub fn parse_steps(console: &str, histogram_max_us: u64) -> GuestSteps {
    let mut steps = GuestSteps::default();
    let mut histogram: Option<(i32, String)> = None;
    for line in console.lines().map(str::trim_end) {
        let parsed = parse_line(line);
        if let Some((_, text)) = histogram.as_mut() {
            if parsed != Some(GuestLine::CyclictestEnd) {
                text.push_str(line);
                text.push('\n');
                continue;
            }
        }
        match parsed {
            None => {}
            Some(GuestLine::Note(note)) => steps.notes.push(note),
            Some(GuestLine::Begin) => steps.began = true,
            Some(GuestLine::WindowEnd) => {}
            Some(GuestLine::End) => steps.ended = true,
            Some(GuestLine::IoBench { rc, output }) => {
                if rc != 0 {
                    let last_note = steps.notes.last().map(String::as_str).unwrap_or_default();
                    steps
                        .errors
                        .push(format!("io-bench exited with rc={rc}: {last_note}"));
                } else {
                    match serde_json::from_str(&output) {
                        Ok(bench) => steps.io_bench = Some(bench),
                        Err(error) => steps
                            .errors
                            .push(format!("io-bench: unreadable output ({error}): {output}")),
                    }
                }
            }
            Some(GuestLine::CyclictestBegin { rc }) => histogram = Some((rc, String::new())),
            Some(GuestLine::CyclictestEnd) => {
                if let Some((rc, text)) = histogram.take() {
                    if rc != 0 {
                        steps.errors.push(format!("cyclictest exited with rc={rc}"));
                    } else {
                        match parse_histogram(&text, histogram_max_us) {
                            Ok(summary) => steps.latency = Some(summary),
                            Err(error) => steps.errors.push(format!("cyclictest: {error}")),
                        }
                    }
                }
            }
        }
    }
    if histogram.is_some() {
        steps
            .errors
            .push("cyclictest's histogram has no end line".into());
    }
    steps
}

/// What is missing or inconsistent in `steps` for a run with `params`.
pub fn step_problems(steps: &GuestSteps, params: &IothreadParams) -> Vec<String> {
    let mut problems = steps.errors.clone();
    match &steps.io_bench {
        None => problems.push("no io-bench result".into()),
        Some(bench) => {
            if bench.reads == 0 {
                problems.push("io-bench read nothing".into());
            }
            if bench.block_size != params.block_size {
                problems.push(format!(
                    "io-bench read blocks of {} bytes, not {}",
                    bench.block_size, params.block_size
                ));
            }
            if bench.disk_bytes != u64::from(params.disk_mib) << 20 {
                problems.push(format!(
                    "the guest's disk has {} bytes, not {} MiB",
                    bench.disk_bytes, params.disk_mib
                ));
            }
        }
    }
    match &steps.latency {
        None => problems.push("no cyclictest result".into()),
        Some(latency) if latency.threads.len() != 1 => problems.push(format!(
            "cyclictest ran {} threads, not 1",
            latency.threads.len()
        )),
        Some(_) => {}
    }
    if !steps.began {
        problems.push("the guest's window never began".into());
    }
    if !steps.ended {
        problems.push("the guest's steps did not end".into());
    }
    problems
}

/// One reading of a thread's `schedstat`, at a time since some origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedSample {
    /// When it was read (ns since the origin).
    pub at_ns: u64,
    /// CPU time so far (ns).
    pub run_ns: u64,
    /// Time runnable but waiting on a run queue so far (ns).
    pub wait_ns: u64,
}

/// The run and wait times (ns) of a `schedstat` line: `<run ns> <wait ns> <slices>`.
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace();
    let run = fields.next()?.parse().ok()?;
    let wait = fields.next()?.parse().ok()?;
    Some((run, wait))
}

/// Reads `/proc/<pid>/task/<tid>/schedstat` under `proc_root`.
pub fn read_schedstat(proc_root: &Path, pid: u32, tid: u32) -> Option<(u64, u64)> {
    let path = proc_root.join(format!("{pid}/task/{tid}/schedstat"));
    fs::read_to_string(path)
        .ok()
        .and_then(|text| parse_schedstat(&text))
}

/// A vCPU thread's time slices over a window, from its schedstat sampled every period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SliceJitter {
    /// Intervals between two samples.
    pub intervals: u64,
    /// Mean interval length (ms).
    pub interval_mean_ms: f64,
    /// 99th percentile of the interval length (ms): how late the sampler ran.
    pub interval_p99_ms: f64,
    /// Run-queue wait per interval: mean (ms).
    pub wait_mean_ms: f64,
    /// Run-queue wait per interval: standard deviation (ms).
    pub wait_stddev_ms: f64,
    /// Run-queue wait per interval: 99th percentile (ms).
    pub wait_p99_ms: f64,
    /// Run-queue wait per interval: largest (ms).
    pub wait_max_ms: f64,
    /// CPU time over the window, in % of the window.
    pub run_percent: f64,
    /// Run-queue wait over the window, in % of the window.
    pub wait_percent: f64,
}

impl SliceJitter {
    /// Summarises consecutive samples (in time order); `None` with fewer than two.
    pub fn of(samples: &[SchedSample]) -> Option<Self> {
        let first = samples.first()?;
        let last = samples.last()?;
        if samples.len() < 2 || last.at_ns <= first.at_ns {
            return None;
        }
        let mut waits: Vec<f64> = samples
            .windows(2)
            .map(|pair| pair[1].wait_ns.saturating_sub(pair[0].wait_ns) as f64 / 1e6)
            .collect();
        let mut intervals: Vec<f64> = samples
            .windows(2)
            .map(|pair| pair[1].at_ns.saturating_sub(pair[0].at_ns) as f64 / 1e6)
            .collect();
        intervals.sort_by(f64::total_cmp);
        let n = waits.len() as f64;
        let mean = waits.iter().sum::<f64>() / n;
        let variance = waits.iter().map(|w| (w - mean).powi(2)).sum::<f64>() / n;
        waits.sort_by(f64::total_cmp);
        let p99 = |sorted: &[f64]| sorted[((sorted.len() - 1) as f64 * 0.99).round() as usize];
        let span = (last.at_ns - first.at_ns) as f64;
        Some(Self {
            intervals: waits.len() as u64,
            interval_mean_ms: span / 1e6 / n,
            interval_p99_ms: p99(&intervals),
            wait_mean_ms: mean,
            wait_stddev_ms: variance.sqrt(),
            wait_p99_ms: p99(&waits),
            wait_max_ms: waits.last().copied().unwrap_or_default(),
            run_percent: last.run_ns.saturating_sub(first.run_ns) as f64 / span * 100.0,
            wait_percent: last.wait_ns.saturating_sub(first.wait_ns) as f64 / span * 100.0,
        })
    }
}

/// CPU time of a thread between two samples, in % of the time between them.
fn cpu_percent(first: Option<&SchedSample>, last: Option<&SchedSample>) -> Option<f64> {
    let (first, last) = (first?, last?);
    let span = last
        .at_ns
        .checked_sub(first.at_ns)
        .filter(|&span| span > 0)?;
    Some(last.run_ns.saturating_sub(first.run_ns) as f64 / span as f64 * 100.0)
}

/// The calling thread's id (from `/proc/thread-self`, a link to `<pid>/task/<tid>`).
fn own_tid() -> Result<u32> {
    let link =
        fs::read_link("/proc/thread-self").map_err(LabError::io("read", "/proc/thread-self"))?;
    link.file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.parse().ok())
        .ok_or_else(|| LabError::Run(format!("/proc/thread-self links to {}", link.display())))
}

/// The thread of `pid` whose name is `name`, from `/proc/<pid>/task/*/comm`.
fn thread_named(proc_root: &Path, pid: u32, name: &str) -> Option<u32> {
    let tasks = fs::read_dir(proc_root.join(format!("{pid}/task"))).ok()?;
    tasks.filter_map(|entry| entry.ok()).find_map(|entry| {
        let comm = fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == name)
            .then(|| entry.file_name().to_str()?.parse().ok())
            .flatten()
    })
}

/// Everything measured for one configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IothreadConfigResult {
    /// Configuration name.
    pub name: String,
    /// The disk had its own IOThread.
    pub iothread: bool,
    /// How QEMU opened the disk (`None`: no disk was created).
    pub disk_cache: Option<DiskCache>,
    /// QEMU's `-name`.
    pub guest: String,
    /// QEMU process id.
    pub qemu_pid: u32,
    /// vCPU thread ids.
    pub vcpu_tids: Vec<u32>,
    /// The IOThread's thread id, when there is one.
    pub iothread_tid: Option<u32>,
    /// The IOThread's FIFO priority for the window (`iothread-rt`).
    pub iothread_rt_prio: Option<u8>,
    /// Boot time (ms).
    pub boot_ms: u64,
    /// io-bench on the I/O vCPU.
    pub io_bench: Option<IoBench>,
    /// cyclictest on the I/O vCPU.
    pub latency: Option<LatencySummary>,
    /// The I/O vCPU thread's run-queue wait per schedstat interval.
    pub io_vcpu_slices: Option<SliceJitter>,
    /// QEMU's main thread's CPU time over the window (% of one CPU).
    pub main_loop_cpu_percent: Option<f64>,
    /// The IOThread's CPU time over the window (% of one CPU).
    pub iothread_cpu_percent: Option<f64>,
    /// The tools' messages.
    pub guest_notes: Vec<String>,
    /// Host throughput: geometric mean over stressors of bogo-ops per second.
    pub host_bogo_ops_per_s: f64,
    /// Every thread of QEMU checked just before it was stopped.
    pub exit_check: Option<ExitCheck>,
    /// Seconds of the measured window (host clock, begin to window-end).
    pub window_s: f64,
    /// Wall-clock time of the configuration run (s).
    pub elapsed_s: f64,
    /// Why the run failed, when it did.
    pub error: Option<String>,
}

/// `results.json` of the iothread experiment.
pub type IothreadResults = ExperimentResults<IothreadParams, IothreadConfigResult>;

impl IothreadResults {
    /// Configurations in report order.
    pub fn ordered(&self) -> Vec<&IothreadConfigResult> {
        self.ordered_by(&IothreadConfig::ALL.map(IothreadConfig::name))
    }
}

/// Everything an iothread run needs besides the assets.
#[derive(Debug, Clone)]
pub struct IothreadSpec {
    /// Run parameters.
    pub params: IothreadParams,
    /// Configurations, in order.
    pub configs: Vec<IothreadConfig>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// The `pvsched-guest` binary for the initramfs.
    pub guest_tool: PathBuf,
    /// The guest kernel's virtio-blk modules, in load order.
    pub kernel_modules: Vec<PathBuf>,
    /// Results directory (logs go here too).
    pub out_dir: PathBuf,
    /// Scratch directory (the disk image goes here).
    pub run_dir: PathBuf,
}

impl ConfigRecord for IothreadConfigResult {
    fn error_and_elapsed(&mut self) -> (&mut Option<String>, &mut f64) {
        (&mut self.error, &mut self.elapsed_s)
    }

    fn summary(&self) -> String {
        let io = self
            .io_bench
            .as_ref()
            .map_or("no io-bench result".to_owned(), |b| {
                format!(
                    "{:.0} IOPS, read p50 {:.0} µs, p99 {:.0} µs",
                    b.iops, b.latency.p50_us, b.latency.p99_us
                )
            });
        let rt = self
            .latency
            .as_ref()
            .map_or("no cyclictest result".to_owned(), |l| {
                format!("RT avg {:.0} µs, max {} µs", l.avg_us, l.max_us)
            });
        let wait = self.io_vcpu_slices.map_or("no schedstat".to_owned(), |s| {
            format!("vCPU wait/10 ms stddev {:.2} ms", s.wait_stddev_ms)
        });
        format!("{io}; {rt}; {wait}")
    }
}

/// Runs every configuration of `spec` and returns the results (also when some
/// configurations failed: their `error` says why).
pub fn run_iothread(assets: &LabAssets, spec: &IothreadSpec) -> Result<IothreadResults> {
    validate(&spec.params)?;
    let progress = Progress::start();
    fs::create_dir_all(&spec.run_dir).map_err(LabError::io("create", &spec.run_dir))?;
    fs::create_dir_all(&spec.out_dir).map_err(LabError::io("create", &spec.out_dir))?;
    let params = &spec.params;
    progress.line(format_args!(
        "iothread: one guest of {} vCPUs, a {} MiB virtio-blk disk, {} s of {} B random reads and cyclictest on vCPU {IO_CPU}, hogs on the others; host load {} on {} host CPUs",
        params.vcpus,
        params.disk_mib,
        params.duration_s,
        params.block_size,
        params.load.describe(),
        params.host_cpus
    ));
    let sequence = configrun::run_sequence(
        &progress,
        &spec.configs,
        |config| config.name().to_owned(),
        |config, label| {
            let mut result = IothreadConfigResult {
                name: config.name().to_owned(),
                iothread: config.has_iothread(),
                ..IothreadConfigResult::default()
            };
            let mut booted = BootedWith::default();
            let outcome = run_config(
                assets,
                spec,
                config,
                &progress,
                label,
                &mut result,
                &mut booted,
            );
            ConfigDone {
                result,
                outcome,
                accelerator: booted.accelerator,
                kvm_fallback: booted.kvm_fallback,
            }
        },
    )?;
    Ok(sequence.into_results(
        EXPERIMENT,
        RESULTS_VERSION,
        params.clone(),
        progress.elapsed().as_secs_f64(),
    ))
}

/// The accelerator a configuration's guest booted under.
#[derive(Default)]
struct BootedWith {
    accelerator: Option<Accelerator>,
    kvm_fallback: Option<String>,
}

/// One configuration run (see the module documentation).
fn run_config(
    assets: &LabAssets,
    spec: &IothreadSpec,
    config: IothreadConfig,
    progress: &Progress,
    label: &str,
    result: &mut IothreadConfigResult,
    booted: &mut BootedWith,
) -> Result<()> {
    let say = &|message: std::fmt::Arguments<'_>| progress.line(format_args!("{label}: {message}"));
    let params = &spec.params;
    let config_dir = spec.run_dir.join(config.name());
    fs::create_dir_all(&config_dir).map_err(LabError::io("create", &config_dir))?;
    let disk = config_dir.join("disk.raw");
    let cache = create_disk(&disk, params.disk_mib)?;
    result.disk_cache = Some(cache);
    say(format_args!(
        "disk {} ({} MiB, {})",
        disk.display(),
        params.disk_mib,
        cache.drive_options()
    ));
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![spec.guest_tool.clone(), assets.cyclictest.clone()],
            module: None,
            kernel_modules: spec.kernel_modules.clone(),
            files: Vec::new(),
            module_params: String::new(),
            workload: Workload::Idle { duration_s: 0 },
            diagnostics: guest_commands(params, &spec.kernel_modules),
            control: InitControl {
                wait_for_go: true,
                hold_after_done: true,
            },
        },
        &spec
            .run_dir
            .join(format!("initramfs-iothread-{}.cpio", config.name())),
    )?;

    // 1. Boot on a quiet host.
    let name = format!("lab{}-io-{}", std::process::id(), config.name());
    let mut guest_config = GuestConfig::new(&name, &assets.kernel_image, &initramfs.path);
    guest_config.vcpus = params.vcpus;
    guest_config.memory_mib = params.memory_mib;
    guest_config.accel = spec.accel;
    guest_config.qemu = assets.qemu.clone();
    guest_config.run_dir = spec.run_dir.clone();
    guest_config.extra_args = disk_args(config, &disk, cache);
    say(format_args!(
        "booting guest {name} ({} vCPUs, disk on {})",
        params.vcpus,
        if config.has_iothread() {
            "an IOThread"
        } else {
            "the main loop"
        }
    ));
    let mut guest = Guest::boot(&guest_config)?;
    booted.accelerator = Some(guest.accelerator());
    booted.kvm_fallback = guest.kvm_fallback().map(str::to_owned);
    result.guest = name.clone();
    result.qemu_pid = guest.pid();
    result.boot_ms = u64::try_from(guest.boot_time().as_millis()).unwrap_or(u64::MAX);
    let outcome = measure(assets, spec, config, progress, label, result, &mut guest);
    result.exit_check = configrun::exit_check(&mut guest, "guest", say);
    let log = spec.out_dir.join(format!("guest-{}.log", config.name()));
    let _ = fs::write(&log, guest.console().join("\n") + "\n");
    drop(guest);
    let _ = fs::remove_file(&disk);
    outcome
}

/// Loads the host, sends go, samples schedstat over the guest's window and collects the
/// guest's results.
fn measure(
    assets: &LabAssets,
    spec: &IothreadSpec,
    config: IothreadConfig,
    progress: &Progress,
    label: &str,
    result: &mut IothreadConfigResult,
    guest: &mut Guest,
) -> Result<()> {
    let say = &|message: std::fmt::Arguments<'_>| progress.line(format_args!("{label}: {message}"));
    let params = &spec.params;
    guest.wait_for_marker(MARKER_READY, READY_TIMEOUT)?;
    result.vcpu_tids = guest.vcpu_tids()?;
    let proc_root = Path::new("/proc");
    let qemu_pid = result.qemu_pid;
    if config.has_iothread() {
        result.iothread_tid = thread_named(proc_root, qemu_pid, &format!("IO {IOTHREAD_ID}"));
        if result.iothread_tid.is_none() {
            say(format_args!(
                "no thread named \"IO {IOTHREAD_ID}\" in QEMU: its CPU time is not measured"
            ));
        }
    }
    // Raised before go, returned before the exit check.
    let iothread_rt = match (config.iothread_rt(), result.iothread_tid) {
        (false, _) => None,
        (true, None) => {
            return Err(LabError::Run(format!(
                "{}: no IOThread to set real-time",
                result.guest
            )))
        }
        (true, Some(tid)) => {
            let raised = StaticRt::apply(&[tid], params.iothread_rt_prio)?;
            result.iothread_rt_prio = Some(params.iothread_rt_prio);
            say(format_args!(
                "IOThread {tid} at SCHED_FIFO {}",
                params.iothread_rt_prio
            ));
            Some(raised)
        }
    };
    let io_vcpu = *result
        .vcpu_tids
        .get(IO_CPU as usize)
        .ok_or_else(|| LabError::Run(format!("{}: no vCPU {IO_CPU} thread", result.guest)))?;

    let guest_seconds = u64::from(params.duration_s) + SETUP_SLACK_S;
    let load_started = Instant::now();
    let mut load = if params.load.is_empty() {
        None
    } else {
        say(format_args!("host load: {}", params.load.describe()));
        let backstop = Duration::from_secs(u64::from(params.warmup_s) + guest_seconds + 600);
        Some(HostLoad::start(
            &assets.stress_ng,
            &params.load,
            backstop,
            &spec.run_dir.join(config.name()).join("stress-ng"),
        )?)
    };
    let warmup = Duration::from_secs(params.warmup_s.into());
    if let Some(rest) = warmup.checked_sub(load_started.elapsed()) {
        thread::sleep(rest);
    }
    guest.send_go()?;
    let go = Instant::now();
    say(format_args!(
        "guest running: modules, disk, then {} s measured",
        params.duration_s
    ));

    let deadline = go + Duration::from_secs(guest_seconds) + RESULT_SLACK;
    let measuring = AtomicBool::new(false);
    let mut vcpu_samples = Vec::new();
    let mut main_samples = Vec::new();
    let mut iothread_samples = Vec::new();
    let iothread_tid = result.iothread_tid;
    let mut window: (Option<Instant>, Option<Instant>) = (None, None);
    let output: Result<GuestOutput> = thread::scope(|scope| {
        let measuring = &measuring;
        let follower = scope.spawn(move || follow(guest, deadline, measuring, progress, label));
        // After the spawn: a thread inherits its creator's policy.
        let sampler_rt = own_tid().and_then(|tid| StaticRt::apply(&[tid], SAMPLER_RT_PRIO));
        if let Err(error) = &sampler_rt {
            say(format_args!(
                "the schedstat sampler runs at SCHED_OTHER ({error}): late samples stretch its intervals"
            ));
        }
        let mut next = Instant::now();
        while !follower.is_finished() {
            let now = Instant::now();
            if measuring.load(Ordering::SeqCst) {
                let started = *window.0.get_or_insert(now);
                let at_ns =
                    u64::try_from(now.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
                let sample = |tid: u32| {
                    read_schedstat(proc_root, qemu_pid, tid).map(|(run_ns, wait_ns)| SchedSample {
                        at_ns,
                        run_ns,
                        wait_ns,
                    })
                };
                vcpu_samples.extend(sample(io_vcpu));
                main_samples.extend(sample(qemu_pid));
                if let Some(tid) = iothread_tid {
                    iothread_samples.extend(sample(tid));
                }
            } else if window.0.is_some() && window.1.is_none() {
                window.1 = Some(now);
            }
            next += SCHEDSTAT_PERIOD;
            // Sample on a fixed grid; after a late wake-up, start the grid again.
            match next.checked_duration_since(Instant::now()) {
                Some(rest) => thread::sleep(rest),
                None => next = Instant::now(),
            }
        }
        if let Ok(raised) = sampler_rt {
            if let Err(error) = raised.restore() {
                say(format_args!(
                    "returning the sampler to SCHED_OTHER: {error}"
                ));
            }
        }
        follower
            .join()
            .unwrap_or_else(|_| Err(LabError::Run("guest follower thread panicked".into())))
    });
    if let Some(raised) = iothread_rt {
        raised.restore()?;
    }
    result.window_s = match window {
        (Some(start), Some(end)) => end.duration_since(start).as_secs_f64(),
        _ => 0.0,
    };
    result.io_vcpu_slices = SliceJitter::of(&vcpu_samples);
    result.main_loop_cpu_percent = cpu_percent(main_samples.first(), main_samples.last());
    result.iothread_cpu_percent = cpu_percent(iothread_samples.first(), iothread_samples.last());
    if let Some(running) = load.take() {
        running.interrupt();
        match running.finish(Duration::from_secs(10)) {
            Ok(throughput) => result.host_bogo_ops_per_s = throughput.geometric_mean(),
            Err(error) => say(format_args!("stress-ng: {error}")),
        }
    }
    let output = output?;
    let steps = parse_steps(&output.diagnostics, params.histogram_max_us.into());
    let problems = step_problems(&steps, params);
    result.io_bench = steps.io_bench;
    result.latency = steps.latency;
    result.guest_notes = steps.notes;
    if result.io_vcpu_slices.is_none() {
        say(format_args!("the I/O vCPU's schedstat was not sampled"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LabError::Run(format!(
            "{}: {}",
            result.guest,
            problems.join("; ")
        )))
    }
}

/// Reads the guest's step lines as they come, setting `measuring` between `begin` and
/// `window-end`, until the end line; then waits for init's done marker.
fn follow(
    guest: &mut Guest,
    deadline: Instant,
    measuring: &AtomicBool,
    progress: &Progress,
    label: &str,
) -> Result<GuestOutput> {
    let say = |message: std::fmt::Arguments<'_>| progress.line(format_args!("{label}: {message}"));
    let outcome = (|| {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            guest.wait_for_marker(STEP_MARKER, left)?;
            let line = guest.console().last().cloned().unwrap_or_default();
            match parse_line(&line) {
                Some(GuestLine::End) => break,
                Some(GuestLine::Begin) => {
                    measuring.store(true, Ordering::SeqCst);
                    say(format_args!("guest: window begins"));
                }
                Some(GuestLine::WindowEnd) => {
                    measuring.store(false, Ordering::SeqCst);
                    say(format_args!("guest: window ended"));
                }
                Some(GuestLine::Note(note)) => say(format_args!("guest: {note}")),
                Some(GuestLine::IoBench { rc, .. }) => say(format_args!("guest: io-bench rc={rc}")),
                _ => {}
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        guest.wait_done(left.max(Duration::from_secs(10)))
    })();
    measuring.store(false, Ordering::SeqCst);
    outcome
}

fn cell(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(value) if value.is_finite() => format!("{value:.digits$}"),
        _ => "–".to_owned(),
    }
}

/// The results in Markdown: the run's parameters, one column per configuration, notes.
pub fn markdown(results: &IothreadResults) -> String {
    let params = &results.params;
    let ordered = results.ordered();
    let accel = results
        .accelerator
        .map_or("unknown".to_owned(), |accel| accel.to_string());
    let cache = ordered
        .iter()
        .find_map(|r| r.disk_cache)
        .map_or("–", DiskCache::drive_options);
    let mut text = String::new();
    let _ = writeln!(
        text,
        "I/O thread: one guest of {vcpus} vCPUs ({memory} MiB) under {accel}, guest kernel \
         {guest}, on {cpus} host CPUs (host {kernel}) loaded by `{load}`. Disk: virtio-blk on a \
         {disk} MiB raw file (`{cache}`). vCPU {IO_CPU} runs `pvsched-guest io-bench` ({block} B \
         random O_DIRECT reads) and cyclictest (FIFO {prio}, {interval} µs) for {seconds} s; the \
         other vCPUs run busy loops. vCPU wait per interval: the host run-queue waits of the \
         I/O vCPU thread that ended in each {period} ms interval (schedstat's second field).\n",
        vcpus = params.vcpus,
        memory = params.memory_mib,
        guest = params.guest_kernel,
        cpus = params.host_cpus,
        kernel = params.host_kernel,
        load = params.load.describe(),
        disk = params.disk_mib,
        block = params.block_size,
        prio = params.guest_rt_prio,
        interval = params.interval_us,
        seconds = params.duration_s,
        period = params.schedstat_period_ms,
    );
    let _ = write!(text, "| |");
    for result in &ordered {
        let _ = write!(text, " {} |", result.name);
    }
    text.push_str("\n|---|");
    for _ in &ordered {
        text.push_str("---:|");
    }
    text.push('\n');
    let mut row = |label: &str, value: &dyn Fn(&IothreadConfigResult) -> String| {
        let _ = write!(text, "| {label} |");
        for result in &ordered {
            let _ = write!(text, " {} |", value(result));
        }
        text.push('\n');
    };
    let bench = |r: &IothreadConfigResult, f: &dyn Fn(&IoBench) -> f64, digits| {
        cell(r.io_bench.as_ref().map(f), digits)
    };
    row("IOPS (4 KiB random reads)", &|r| bench(r, &|b| b.iops, 0));
    row("read latency p50 (µs)", &|r| {
        bench(r, &|b| b.latency.p50_us, 0)
    });
    row("read latency p99 (µs)", &|r| {
        bench(r, &|b| b.latency.p99_us, 0)
    });
    row("read latency max (µs)", &|r| {
        bench(r, &|b| b.latency.max_us, 0)
    });
    row("I/O vCPU RT latency avg (µs)", &|r| {
        cell(r.latency.as_ref().map(|l| l.avg_us), 0)
    });
    row("I/O vCPU RT latency p99 (µs)", &|r| match &r.latency {
        Some(l) if l.p99_is_lower_bound => format!("> {}", l.p99_us),
        Some(l) => l.p99_us.to_string(),
        None => "–".to_owned(),
    });
    row("I/O vCPU RT latency max (µs)", &|r| {
        cell(r.latency.as_ref().map(|l| l.max_us as f64), 0)
    });
    let slices = |r: &IothreadConfigResult, f: &dyn Fn(&SliceJitter) -> f64, digits| {
        cell(r.io_vcpu_slices.as_ref().map(f), digits)
    };
    row("I/O vCPU wait per interval mean (ms)", &|r| {
        slices(r, &|s| s.wait_mean_ms, 2)
    });
    row("I/O vCPU wait per interval stddev (ms)", &|r| {
        slices(r, &|s| s.wait_stddev_ms, 2)
    });
    row("I/O vCPU wait per interval p99 (ms)", &|r| {
        slices(r, &|s| s.wait_p99_ms, 2)
    });
    row("I/O vCPU on CPU / waiting (% of window)", &|r| {
        r.io_vcpu_slices.map_or("–".to_owned(), |s| {
            format!("{:.0} / {:.0}", s.run_percent, s.wait_percent)
        })
    });
    row("QEMU main loop CPU (%)", &|r| {
        cell(r.main_loop_cpu_percent, 0)
    });
    row("IOThread CPU (%)", &|r| cell(r.iothread_cpu_percent, 0));
    row(
        "IOThread policy",
        &|r| match (r.iothread, r.iothread_rt_prio) {
            (false, _) => "–".to_owned(),
            (true, None) => "normal".to_owned(),
            (true, Some(prio)) => format!("FIFO {prio}"),
        },
    );
    row("sampling interval mean / p99 (ms)", &|r| {
        r.io_vcpu_slices.map_or("–".to_owned(), |s| {
            format!("{:.1} / {:.1}", s.interval_mean_ms, s.interval_p99_ms)
        })
    });
    row("host stress-ng (bogo-ops/s, geo-mean)", &|r| {
        cell(
            (r.host_bogo_ops_per_s > 0.0).then_some(r.host_bogo_ops_per_s),
            0,
        )
    });
    row("status", &|r| {
        if r.error.is_some() {
            "failed".to_owned()
        } else {
            "ok".to_owned()
        }
    });
    let mut notes = String::new();
    for result in ordered.iter() {
        if let Some(error) = &result.error {
            let _ = writeln!(
                notes,
                "- {} failed: {}",
                result.name,
                error.lines().next().unwrap_or_default()
            );
        }
    }
    if !notes.is_empty() {
        text.push('\n');
        text.push_str(&notes);
    }
    text
}

/// Files written by [`write_all`].
#[derive(Debug, Clone)]
pub struct IothreadFiles {
    /// `results.json`.
    pub json: PathBuf,
    /// `results.md`.
    pub markdown: PathBuf,
}

/// Writes `results.json` and `results.md` into `dir`.
pub fn write_all(results: &IothreadResults, dir: &Path) -> Result<IothreadFiles> {
    fs::create_dir_all(dir).map_err(LabError::io("create", dir))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(results)
        .map_err(|error| LabError::Run(format!("serializing results: {error}")))?;
    fs::write(&json, text + "\n").map_err(LabError::io("write", &json))?;
    let markdown_path = dir.join("results.md");
    fs::write(&markdown_path, markdown(results)).map_err(LabError::io("write", &markdown_path))?;
    Ok(IothreadFiles {
        json,
        markdown: markdown_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The console of the guest as the lab host received it, from a quick run under TCG
    /// on the 2-CPU development machine with the lab's default load: the disk on the
    /// main loop, and on an IOThread.
    const CONSOLE_MAIN_LOOP: &str =
        include_str!("../tests/fixtures/console-iothread-tcg-main-loop.txt");
    const CONSOLE_IOTHREAD: &str =
        include_str!("../tests/fixtures/console-iothread-tcg-iothread.txt");

    fn params() -> IothreadParams {
        IothreadParams {
            quick: true,
            vcpus: 2,
            memory_mib: 256,
            duration_s: 10,
            warmup_s: 2,
            disk_mib: DISK_MIB,
            block_size: BLOCK_SIZE,
            interval_us: 1000,
            guest_rt_prio: 90,
            iothread_rt_prio: 8,
            histogram_max_us: HISTOGRAM_MAX_US,
            schedstat_period_ms: 10,
            load: LoadSpec::seed003(2),
            host_cpus: 2,
            host_kernel: "6.18".into(),
            guest_kernel: "6.1.0-57-cloud-amd64".into(),
            configs: vec!["main-loop".into(), "iothread".into()],
        }
    }

    fn check_recorded(console: &str) -> GuestSteps {
        let steps = parse_steps(console, HISTOGRAM_MAX_US.into());
        assert!(steps.began && steps.ended, "{steps:?}");
        assert!(steps.errors.is_empty(), "{:?}", steps.errors);
        assert!(step_problems(&steps, &params()).is_empty());
        let bench = steps.io_bench.as_ref().expect("io-bench");
        assert_eq!(bench.disk, "/dev/vda");
        assert_eq!(bench.disk_bytes, u64::from(DISK_MIB) << 20);
        assert!(bench.reads > 0);
        assert_eq!(bench.latency.count, bench.reads, "every read is timed");
        // The rate is over the seconds the reads ran.
        assert!((bench.iops * bench.seconds - bench.reads as f64).abs() < 1.0);
        let l = bench.latency;
        assert!(l.p50_us <= l.p90_us && l.p90_us <= l.p99_us && l.p99_us <= l.max_us);
        let latency = steps.latency.as_ref().expect("cyclictest");
        assert_eq!(
            latency.threads.len(),
            1,
            "one cyclictest thread, on the I/O vCPU"
        );
        assert!(latency.samples > 0);
        assert!(latency.min_us as f64 <= latency.avg_us && latency.p99_us <= latency.max_us);
        steps
    }

    #[test]
    fn recorded_guests_report_the_disk_benchmark_and_the_io_vcpus_latency() {
        check_recorded(CONSOLE_MAIN_LOOP);
        check_recorded(CONSOLE_IOTHREAD);
        // The same output from a guest with another disk is refused.
        let steps = parse_steps(CONSOLE_IOTHREAD, HISTOGRAM_MAX_US.into());
        let mut other = params();
        other.disk_mib = 128;
        let problems = step_problems(&steps, &other);
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn a_failed_or_cut_short_guest_is_a_problem_not_a_result() {
        let failed = format!(
            "{STEP_MARKER} begin\n{STEP_MARKER} note opening /dev/vda with O_DIRECT: No such file\n\
             {STEP_MARKER} window-end\n{STEP_MARKER} io-bench rc=1 \n\
             {STEP_MARKER} cyclictest-begin rc=0\n# Histogram\n"
        );
        let steps = parse_steps(&failed, HISTOGRAM_MAX_US.into());
        assert!(steps.io_bench.is_none() && steps.latency.is_none());
        assert_eq!(
            steps.errors,
            [
                "io-bench exited with rc=1: opening /dev/vda with O_DIRECT: No such file",
                "cyclictest's histogram has no end line"
            ]
        );
        let problems = step_problems(&steps, &params());
        assert!(
            problems.iter().any(|p| p == "no io-bench result"),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p == "the guest's steps did not end"),
            "{problems:?}"
        );
        assert_eq!(parse_line("PVSCHED-LAB IOTHREADX begin"), None);
        assert_eq!(parse_line(&format!("{STEP_MARKER} whatever")), None);
        assert_eq!(
            parse_line(&format!("{STEP_MARKER} cyclictest-begin rc=2")),
            Some(GuestLine::CyclictestBegin { rc: 2 })
        );
    }

    #[test]
    fn schedstat_waits_per_interval_become_the_slice_jitter() {
        assert_eq!(parse_schedstat("1000 2000 3\n"), Some((1000, 2000)));
        assert_eq!(parse_schedstat("1000"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
        // Five samples 10 ms apart; the thread waits 0, 2, 0 and 2 ms per interval and
        // runs 5 ms in each.
        let ms = 1_000_000;
        let waits = [0, 0, 2, 2, 4];
        let samples: Vec<SchedSample> = waits
            .iter()
            .enumerate()
            .map(|(i, &wait)| SchedSample {
                at_ns: i as u64 * 10 * ms,
                run_ns: i as u64 * 5 * ms,
                wait_ns: wait * ms,
            })
            .collect();
        let jitter = SliceJitter::of(&samples).expect("four intervals");
        assert_eq!(jitter.intervals, 4);
        assert!((jitter.interval_mean_ms - 10.0).abs() < 1e-9);
        assert!((jitter.interval_p99_ms - 10.0).abs() < 1e-9);
        assert!((jitter.wait_mean_ms - 1.0).abs() < 1e-9);
        assert!((jitter.wait_stddev_ms - 1.0).abs() < 1e-9);
        assert!((jitter.wait_p99_ms - 2.0).abs() < 1e-9);
        assert!((jitter.wait_max_ms - 2.0).abs() < 1e-9);
        assert!((jitter.run_percent - 50.0).abs() < 1e-9);
        assert!((jitter.wait_percent - 10.0).abs() < 1e-9);
        assert_eq!(SliceJitter::of(&samples[..1]), None);
        assert_eq!(
            cpu_percent(samples.first(), samples.last()),
            Some(jitter.run_percent)
        );
    }

    #[test]
    fn the_thread_of_this_process_is_found_by_name_and_its_schedstat_read() {
        let proc_root = Path::new("/proc");
        let pid = std::process::id();
        let name = "iothread-probe";
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        // std names the thread before its closure runs.
        let handle = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                started_tx.send(()).expect("started");
                let _ = stop_rx.recv();
            })
            .expect("spawn");
        started_rx.recv().expect("the thread started");
        let tid = thread_named(proc_root, pid, name).expect("the named thread");
        assert!(read_schedstat(proc_root, pid, tid).is_some());
        assert_eq!(thread_named(proc_root, pid, "no-such-thread"), None);
        stop_tx.send(()).expect("stop");
        handle.join().expect("join");
    }

    #[test]
    fn the_disk_is_a_filled_file_on_the_main_loop_or_an_iothread() {
        let dir =
            std::env::temp_dir().join(format!("pvsched-lab-disk-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let disk = dir.join("disk.raw");
        let cache = create_disk(&disk, 2).expect("disk");
        let bytes = fs::read(&disk).expect("read");
        assert_eq!(bytes.len(), 2 << 20);
        assert!(bytes.iter().all(|&b| b != 0), "no hole reads as zeros");
        let main_loop = disk_args(IothreadConfig::MainLoop, &disk, cache);
        assert!(
            !main_loop
                .iter()
                .any(|arg| arg.starts_with("iothread") || arg.contains(",iothread=")),
            "{main_loop:?}"
        );
        assert_eq!(main_loop[3], "virtio-blk-pci,drive=disk0");
        let iothread = disk_args(IothreadConfig::Iothread, &disk, DiskCache::Direct);
        assert_eq!(iothread[..2], ["-object", "iothread,id=io0"]);
        assert!(
            iothread[3].ends_with("cache=none,aio=native"),
            "{iothread:?}"
        );
        assert_eq!(iothread[5], "virtio-blk-pci,drive=disk0,iothread=io0");
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn the_guest_loads_the_modules_in_order_and_pins_the_benchmark_on_the_io_vcpu() {
        let modules: Vec<PathBuf> = ["/c/virtio_ring.ko", "/c/virtio.ko", "/c/virtio_blk.ko"]
            .map(PathBuf::from)
            .to_vec();
        let commands = guest_commands(&params(), &modules).join("\n");
        assert!(commands.contains("for m in virtio_ring.ko virtio.ko virtio_blk.ko;"));
        assert!(
            commands.contains("io-bench --disk /dev/vda --seconds 10 --block-size 4096 --cpu 0")
        );
        assert!(commands.contains("-t 1 -a 0 --histogram=200000"));
        assert!(commands.contains("--priority=90 --policy=fifo --interval=1000 --duration=10"));
        let begin = commands
            .find(&format!("{STEP_MARKER} begin"))
            .expect("begin");
        let end = commands
            .find(&format!("{STEP_MARKER} window-end"))
            .expect("end");
        let bench = commands.find("pvsched-guest io-bench").expect("bench");
        assert!(begin < bench && bench < end);
    }

    fn results() -> IothreadResults {
        let mut configs = std::collections::BTreeMap::new();
        for (config, console) in [
            (IothreadConfig::MainLoop, CONSOLE_MAIN_LOOP),
            (IothreadConfig::Iothread, CONSOLE_IOTHREAD),
        ] {
            let steps = parse_steps(console, HISTOGRAM_MAX_US.into());
            configs.insert(
                config.name().to_owned(),
                IothreadConfigResult {
                    name: config.name().to_owned(),
                    iothread: config.has_iothread(),
                    disk_cache: Some(DiskCache::Direct),
                    io_bench: steps.io_bench,
                    latency: steps.latency,
                    io_vcpu_slices: Some(SliceJitter {
                        intervals: 1000,
                        interval_mean_ms: 10.0,
                        interval_p99_ms: 10.5,
                        wait_mean_ms: 1.5,
                        wait_stddev_ms: 2.25,
                        wait_p99_ms: 9.5,
                        wait_max_ms: 12.0,
                        run_percent: 60.0,
                        wait_percent: 15.0,
                    }),
                    main_loop_cpu_percent: Some(40.0),
                    iothread_cpu_percent: config.has_iothread().then_some(12.0),
                    ..IothreadConfigResult::default()
                },
            );
        }
        IothreadResults {
            experiment: EXPERIMENT.into(),
            version: RESULTS_VERSION,
            accelerator: Some(Accelerator::Tcg),
            kvm_fallback: None,
            params: params(),
            configs,
            elapsed_s: 100.0,
        }
    }

    #[test]
    fn the_table_has_a_column_per_configuration_and_a_row_per_figure() {
        let mut results = results();
        let text = markdown(&results);
        assert!(text.contains("| | main-loop | iothread |"), "{text}");
        let iops = results.configs["iothread"]
            .io_bench
            .as_ref()
            .map(|b| b.iops);
        let row = text
            .lines()
            .find(|line| line.starts_with("| IOPS"))
            .expect("IOPS row");
        assert!(
            row.contains(&format!("{:.0}", iops.expect("iops"))),
            "{row}"
        );
        let row = text
            .lines()
            .find(|line| line.starts_with("| I/O vCPU wait per interval stddev"))
            .expect("jitter row");
        assert_eq!(
            row,
            "| I/O vCPU wait per interval stddev (ms) | 2.25 | 2.25 |"
        );
        let row = text
            .lines()
            .find(|line| line.starts_with("| IOThread CPU"))
            .expect("IOThread row");
        assert_eq!(row, "| IOThread CPU (%) | – | 12 |");
        assert!(text.contains("cache=none,aio=native"));
        // A failed configuration is marked and explained.
        let failed = results.configs.get_mut("main-loop").expect("main-loop");
        failed.error = Some("lab1-io-main-loop: no io-bench result\nmore".into());
        failed.io_bench = None;
        let text = markdown(&results);
        assert!(text.contains("| status | failed | ok |"), "{text}");
        assert!(text.contains("- main-loop failed: lab1-io-main-loop: no io-bench result\n"));
        // The results survive a round trip through JSON.
        let json = serde_json::to_string(&results).expect("json");
        let back: IothreadResults = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, results);
    }
}
