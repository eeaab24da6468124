//! Booting a guest under QEMU with the pvsched shared page, and talking to its console.
//!
//! Accelerator choice: KVM is tried first when `/dev/kvm` opens, with a short deadline for
//! init's first console line, because on some hosts (nested, or a KVM that lacks features
//! the default CPU model needs) a KVM guest hangs silently after the BIOS. On a miss the
//! guest is restarted under multi-threaded TCG, and later guests of the same process skip
//! KVM. The accelerator that ran is recorded in the [`Guest`].

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::command::{describe, progress};
use crate::error::{LabError, Result};
use crate::workload::{
    GO_LINE, MARKER, MARKER_BOOTED, MARKER_DIAG_BEGIN, MARKER_DIAG_END, MARKER_DONE, MARKER_MODULE,
    MARKER_RESULT_BEGIN, MARKER_RESULT_END,
};

/// Kernel command line every guest gets. `panic=-1` turns a dead init into a reboot, which
/// `-no-reboot` turns into a QEMU exit instead of a hang until the timeout.
const BASE_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// Extra command line by default. Under TCG the HPET is an emulated MMIO device and every
/// clock read traps into QEMU; the TSC is read without leaving translated code. Measured on
/// the lab host (2 vCPU, cyclictest 1 ms, 5 s): avg 157 µs / max 7.9 ms with hpet, avg
/// 85 µs / max 3.9 ms with `clocksource=tsc tsc=reliable`.
pub const DEFAULT_EXTRA_CMDLINE: &str = "clocksource=tsc tsc=reliable";

/// The QEMU object id of the guest RAM's backend with [`GuestConfig::shared_ram`].
pub const SHARED_RAM_ID: &str = "ram";

/// Console lines kept in error messages.
const CONSOLE_TAIL_LINES: usize = 30;

/// Set once a KVM boot missed its deadline, so later guests go straight to TCG.
static KVM_BOOT_FAILED: AtomicBool = AtomicBool::new(false);

/// The accelerator a guest ran under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's binary translator, one host thread per vCPU.
    Tcg,
}

impl Accelerator {
    /// The `-accel` argument.
    fn qemu_arg(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            // One host thread per vCPU, so host scheduling of vCPU threads is real.
            Accelerator::Tcg => "tcg,thread=multi",
        }
    }

    /// The suffix QEMU gives vCPU thread names (`CPU 0/TCG`).
    fn thread_suffix(self) -> &'static str {
        match self {
            Accelerator::Kvm => "KVM",
            Accelerator::Tcg => "TCG",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM with the boot deadline, then TCG.
    Auto,
    /// KVM only.
    Kvm,
    /// TCG only.
    Tcg,
}

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Guest name: QEMU `-name`, thread names, `/dev/shm/pvsched-<name>`. Letters, digits,
    /// `-`, `_` and `.` only.
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Appended to the base command line (`console=ttyS0 quiet panic=-1`).
    pub extra_cmdline: String,
    /// Accelerator selection.
    pub accel: AccelChoice,
    /// How long a KVM boot may take to reach init before falling back to TCG.
    pub kvm_boot_deadline: Duration,
    /// How long the chosen accelerator may take to reach init.
    pub boot_timeout: Duration,
    /// Size of the shared page file; a power of two (ivshmem BAR requirement).
    pub shm_size: u64,
    /// Bytes written at the start of the shared page file before QEMU starts. Normally
    /// `None`: the host daemon formats the page. Tests and demos that run the guest
    /// module without the daemon put a host header here.
    pub shm_initial_contents: Option<Vec<u8>>,
    /// Directory of the shared page file.
    pub shm_dir: PathBuf,
    /// The channel is QEMU's `ivshmem-doorbell` device served by the daemon at this
    /// socket (the daemon supplies the memory: no shared page file is created, and the
    /// daemon must be listening before the guest boots); `None`: `ivshmem-plain` on the
    /// shared page file.
    pub doorbell_server: Option<PathBuf>,
    /// Guest RAM on a shared memory backend (`-object memory-backend-memfd,id=ram,
    /// size=<memory>,share=on -machine memory-backend=ram`), so that a host process can map
    /// it and read guest state directly (the daemon's introspection of preempt counts);
    /// `false`: QEMU's private anonymous RAM.
    pub shared_ram: bool,
    /// Directory for the QMP socket.
    pub run_dir: PathBuf,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Further QEMU arguments, after the lab's own (disks, IOThreads).
    pub extra_args: Vec<String>,
}

impl GuestConfig {
    /// A configuration with the lab defaults: 2 vCPUs, 256 MiB, 1 MiB shared page, auto
    /// accelerator with a 5 s KVM deadline.
    pub fn new(
        name: impl Into<String>,
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: kernel.into(),
            initrd: initrd.into(),
            extra_cmdline: DEFAULT_EXTRA_CMDLINE.to_owned(),
            accel: AccelChoice::Auto,
            kvm_boot_deadline: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(90),
            shm_size: 1 << 20,
            shm_initial_contents: None,
            shm_dir: PathBuf::from("/dev/shm"),
            doorbell_server: None,
            shared_ram: false,
            run_dir: std::env::temp_dir().join("pvsched-lab"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            extra_args: Vec::new(),
        }
    }

    /// The shared page file for this guest.
    pub fn shm_path(&self) -> PathBuf {
        self.shm_dir.join(format!("pvsched-{}", self.name))
    }

    /// The QMP socket for this guest.
    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.qmp", self.name))
    }

    /// The full kernel command line.
    pub fn cmdline(&self) -> String {
        if self.extra_cmdline.trim().is_empty() {
            BASE_CMDLINE.to_owned()
        } else {
            format!("{BASE_CMDLINE} {}", self.extra_cmdline.trim())
        }
    }

    fn validate(&self) -> Result<()> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(LabError::InvalidConfig(format!(
                "guest name {:?} must be 1-64 of [A-Za-z0-9._-]",
                self.name
            )));
        }
        if !(1..=64).contains(&self.vcpus) {
            return Err(LabError::InvalidConfig(format!(
                "vcpus = {} is outside 1..=64",
                self.vcpus
            )));
        }
        if self.memory_mib < 64 {
            return Err(LabError::InvalidConfig(format!(
                "memory_mib = {} is below 64",
                self.memory_mib
            )));
        }
        if !self.shm_size.is_power_of_two() || self.shm_size < 4096 {
            return Err(LabError::InvalidConfig(format!(
                "shm_size = {} must be a power of two of at least 4096",
                self.shm_size
            )));
        }
        if let Some(contents) = &self.shm_initial_contents {
            if contents.len() as u64 > self.shm_size {
                return Err(LabError::InvalidConfig(format!(
                    "{} initial bytes do not fit a shared page of {} bytes",
                    contents.len(),
                    self.shm_size
                )));
            }
        }
        Ok(())
    }

    /// The QEMU command line for one boot attempt.
    fn command(&self, accel: Accelerator) -> Command {
        let mut command = Command::new(&self.qemu);
        command
            .arg("-name")
            .arg(format!("{},debug-threads=on", self.name))
            // No NIC (and no iPXE option ROM to load), no VGA, no default monitor.
            .args(["-nodefaults", "-no-user-config"])
            .args(["-accel", accel.qemu_arg()])
            .args(["-smp", &self.vcpus.to_string()])
            .args(["-m", &self.memory_mib.to_string()])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &self.cmdline()])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .arg("-no-reboot")
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.qmp_path().display()
            ))
            // The serial console's input: the host's go line (InitControl::wait_for_go).
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.shared_ram {
            command
                .arg("-object")
                .arg(format!(
                    "memory-backend-memfd,id={SHARED_RAM_ID},size={}M,share=on",
                    self.memory_mib
                ))
                .args(["-machine", &format!("memory-backend={SHARED_RAM_ID}")]);
        }
        match &self.doorbell_server {
            // One vector: the daemon's interrupts (throttles) to the guest.
            Some(server) => command
                .arg("-chardev")
                .arg(format!("socket,path={},id=pvsched", server.display()))
                .args(["-device", "ivshmem-doorbell,chardev=pvsched,vectors=1"]),
            None => command
                .arg("-object")
                .arg(format!(
                    "memory-backend-file,id=pvsched,mem-path={},size={},share=on",
                    self.shm_path().display(),
                    self.shm_size
                ))
                .args(["-device", "ivshmem-plain,memdev=pvsched"]),
        };
        command.args(&self.extra_args);
        command
    }
}

/// True when `/dev/kvm` can be opened for reading and writing.
pub fn kvm_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Why the lab cannot boot guests on this host, one reason per entry; empty when it can.
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if !running_as_root() {
        missing.push("not running as root".to_owned());
    }
    if crate::assets::find_in_path("qemu-system-x86_64").is_none() {
        missing.push("qemu-system-x86_64 not found (Debian package qemu-system-x86)".to_owned());
    }
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        missing.push("/dev/shm is not a directory".to_owned());
    }
    missing
}

/// Reads the effective uid from `/proc/self/status` (no unsafe `geteuid` needed).
fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A vCPU thread of a QEMU process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuThread {
    /// vCPU index.
    pub index: u32,
    /// Host thread id.
    pub tid: u32,
}

/// Finds the vCPU threads of QEMU process `pid` under `proc_root` by their names
/// (`CPU <n>/<TCG|KVM>`, set by `-name ...,debug-threads=on`), sorted by index.
pub fn find_vcpu_threads(
    proc_root: &Path,
    pid: u32,
    accel: Accelerator,
) -> Result<Vec<VcpuThread>> {
    let task_dir = proc_root.join(pid.to_string()).join("task");
    let entries = fs::read_dir(&task_dir).map_err(LabError::io("list", &task_dir))?;
    let mut threads = Vec::new();
    for entry in entries {
        let entry = entry.map_err(LabError::io("list", &task_dir))?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread can exit between the listing and the read; skip it.
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if let Some(index) = parse_vcpu_comm(comm.trim(), accel) {
            threads.push(VcpuThread { index, tid });
        }
    }
    threads.sort_by_key(|thread| thread.index);
    Ok(threads)
}

/// `CPU 3/TCG` -> 3.
fn parse_vcpu_comm(comm: &str, accel: Accelerator) -> Option<u32> {
    let (index, suffix) = comm.strip_prefix("CPU ")?.split_once('/')?;
    (suffix == accel.thread_suffix()).then_some(())?;
    index.parse().ok()
}

/// A line from QEMU.
enum Output {
    /// Serial console (guest).
    Console(String),
    /// QEMU's own stderr.
    Stderr(String),
}

/// A running QEMU process with reader threads for its stdout (the serial console) and
/// stderr. Killed on drop.
struct QemuProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Output>,
    console: Vec<String>,
    stderr: Vec<String>,
    started: Instant,
}

impl QemuProcess {
    fn spawn(mut command: Command) -> Result<Self> {
        let program = describe(&command);
        let mut child = command
            .spawn()
            .map_err(|source| LabError::Spawn { program, source })?;
        crate::hostload::track_child(child.id());
        let stdin = child.stdin.take();
        let (sender, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            let sender = sender.clone();
            thread::spawn(move || {
                forward_lines(stdout, |line| sender.send(Output::Console(line)).is_ok())
            });
        }
        if let Some(stderr) = child.stderr.take() {
            thread::spawn(move || {
                forward_lines(stderr, |line| sender.send(Output::Stderr(line)).is_ok())
            });
        }
        Ok(Self {
            child,
            stdin,
            lines,
            console: Vec::new(),
            stderr: Vec::new(),
            started: Instant::now(),
        })
    }

    /// Reads output until a console line starting with `marker`, QEMU exits, or `deadline`
    /// passes.
    fn wait_for(&mut self, marker: &str, deadline: Instant) -> WaitOutcome {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return WaitOutcome::TimedOut;
            }
            match self.lines.recv_timeout(deadline - now) {
                Ok(Output::Console(line)) => {
                    let found = line.starts_with(marker);
                    self.console.push(line);
                    if found {
                        return WaitOutcome::Found;
                    }
                }
                Ok(Output::Stderr(line)) => self.stderr.push(line),
                Err(RecvTimeoutError::Timeout) => return WaitOutcome::TimedOut,
                Err(RecvTimeoutError::Disconnected) => return WaitOutcome::Exited,
            }
        }
    }

    /// Waits up to `grace` for QEMU to exit by itself, then kills it. Returns the status text.
    fn reap(&mut self, grace: Duration) -> String {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    self.kill();
                    return "killed".to_owned();
                }
            }
        }
    }

    fn kill(&mut self) {
        // Best effort: the process may already have exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Recent console and stderr lines for error messages.
    fn tail(&self) -> String {
        let console = tail_lines(&self.console, CONSOLE_TAIL_LINES);
        if self.stderr.is_empty() {
            console
        } else {
            format!(
                "{console}\n--- qemu stderr ---\n{}",
                tail_lines(&self.stderr, CONSOLE_TAIL_LINES)
            )
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        crate::hostload::untrack_child(self.child.id());
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

enum WaitOutcome {
    Found,
    TimedOut,
    Exited,
}

/// Sends each line of `reader` (without `\r\n`) to `send` until EOF or `send` refuses.
/// Everything before the first marker on a line is dropped: the BIOS leaves terminal escape
/// sequences without a newline in front of init's first line.
fn forward_lines(reader: impl Read, mut send: impl FnMut(String) -> bool) {
    let mut reader = BufReader::new(reader);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        match reader.read_until(b'\n', &mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buffer);
                let text = text.trim_end_matches(['\n', '\r']);
                let text = match text.find(MARKER) {
                    Some(at) => &text[at..],
                    None => text,
                };
                if !send(text.to_owned()) {
                    return;
                }
            }
        }
    }
}

fn tail_lines(lines: &[String], count: usize) -> String {
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// A file removed on drop (the shared page, the QMP socket).
struct OwnedFile(PathBuf);

impl Drop for OwnedFile {
    fn drop(&mut self) {
        // Best effort: nothing useful to do if it is already gone.
        let _ = fs::remove_file(&self.0);
    }
}

/// Creates the shared page file, sized and zero-filled except for `initial` (normally
/// empty: the host daemon writes the header).
fn create_shm_file(path: &Path, size: u64, initial: &[u8]) -> Result<OwnedFile> {
    let mut file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(LabError::ShmExists {
                path: path.to_owned(),
            })
        }
        Err(error) => return Err(LabError::io("create", path)(error)),
    };
    let owned = OwnedFile(path.to_owned());
    file.set_len(size).map_err(LabError::io("resize", path))?;
    file.write_all(initial)
        .map_err(LabError::io("write", path))?;
    Ok(owned)
}

/// What the guest printed for one run, split by the init script's markers.
#[derive(Debug, Clone, Serialize)]
pub struct GuestOutput {
    /// Workload name from the result marker.
    pub workload: String,
    /// The workload's exit code (`rc=` of the end marker).
    pub exit_code: i32,
    /// Lines between the result markers.
    pub result: String,
    /// Lines between the diagnostics markers.
    pub diagnostics: String,
    /// The module status (`loaded`, `failed rc=N`, `absent`), when a module was asked for.
    pub module: Option<String>,
    /// Milliseconds from the end of boot to the done marker.
    pub run_ms: u64,
}

/// A booted guest. Dropping it kills QEMU and removes its shared page file and QMP socket.
pub struct Guest {
    name: String,
    accelerator: Accelerator,
    kvm_fallback: Option<String>,
    boot_time: Duration,
    qmp_path: PathBuf,
    shm_path: PathBuf,
    // Field order matters: QEMU dies before its files are removed.
    process: QemuProcess,
    _qmp_file: OwnedFile,
    _shm_file: OwnedFile,
}

impl Guest {
    /// Creates the shared page file and boots the guest, returning once init has printed
    /// its first line. See the module documentation for accelerator selection.
    pub fn boot(config: &GuestConfig) -> Result<Guest> {
        config.validate()?;
        fs::create_dir_all(&config.run_dir).map_err(LabError::io("create", &config.run_dir))?;
        let shm_file = match config.doorbell_server {
            Some(_) => OwnedFile(PathBuf::new()),
            None => create_shm_file(
                &config.shm_path(),
                config.shm_size,
                config.shm_initial_contents.as_deref().unwrap_or_default(),
            )?,
        };
        let qmp_file = OwnedFile(config.qmp_path());

        let try_kvm_first = config.accel == AccelChoice::Auto
            && kvm_available()
            && !KVM_BOOT_FAILED.load(Ordering::Relaxed);
        let attempts: &[Accelerator] = match config.accel {
            AccelChoice::Auto if try_kvm_first => &[Accelerator::Kvm, Accelerator::Tcg],
            AccelChoice::Auto | AccelChoice::Tcg => &[Accelerator::Tcg],
            AccelChoice::Kvm => &[Accelerator::Kvm],
        };

        let mut kvm_fallback = None;
        for (attempt, &accel) in attempts.iter().enumerate() {
            let is_last = attempt + 1 == attempts.len();
            let deadline = if is_last {
                config.boot_timeout
            } else {
                config.kvm_boot_deadline
            };
            progress(format_args!(
                "booting {} under {accel} (deadline {deadline:?})",
                config.name
            ));
            // A previous attempt's socket would make QEMU fail to bind.
            let _ = fs::remove_file(config.qmp_path());
            let mut process = QemuProcess::spawn(config.command(accel))?;
            let error = match process.wait_for(MARKER_BOOTED, process.started + deadline) {
                WaitOutcome::Found => {
                    let boot_time = process.started.elapsed();
                    progress(format_args!(
                        "{} booted under {accel} in {boot_time:.2?}",
                        config.name
                    ));
                    return Ok(Guest {
                        name: config.name.clone(),
                        accelerator: accel,
                        kvm_fallback,
                        boot_time,
                        qmp_path: config.qmp_path(),
                        shm_path: config.shm_path(),
                        process,
                        _qmp_file: qmp_file,
                        _shm_file: shm_file,
                    });
                }
                WaitOutcome::TimedOut => {
                    process.kill();
                    LabError::BootTimeout {
                        name: config.name.clone(),
                        accel,
                        deadline,
                        console_tail: process.tail(),
                    }
                }
                WaitOutcome::Exited => {
                    let status = process.reap(Duration::from_secs(1));
                    LabError::QemuExited {
                        name: config.name.clone(),
                        status,
                        console_tail: process.tail(),
                    }
                }
            };
            if is_last {
                return Err(error);
            }
            if accel == Accelerator::Kvm {
                KVM_BOOT_FAILED.store(true, Ordering::Relaxed);
            }
            let reason = match &error {
                LabError::BootTimeout { deadline, .. } => {
                    format!("no init output within {deadline:?}")
                }
                other => other
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            };
            progress(format_args!("{accel} boot failed ({reason}); falling back"));
            kvm_fallback = Some(reason);
        }
        Err(LabError::InvalidConfig("no accelerator to try".into()))
    }

    /// Guest name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The accelerator the guest runs under.
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    /// Why KVM was abandoned, when the guest fell back to TCG in this boot.
    pub fn kvm_fallback(&self) -> Option<&str> {
        self.kvm_fallback.as_deref()
    }

    /// Time from starting QEMU to init's first line, for the attempt that succeeded.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// The QMP socket.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp_path
    }

    /// The shared page file (`/dev/shm/pvsched-<name>`).
    pub fn shm_path(&self) -> &Path {
        &self.shm_path
    }

    /// On the doorbell channel, the shared page as QEMU maps it: the daemon's memfd,
    /// opened through `/proc/<pid>/map_files` (root only). `None` until QEMU maps it.
    pub fn doorbell_page(&self) -> Option<PathBuf> {
        let pid = self.process.child.id();
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let range = maps
            .lines()
            .find(|line| line.contains("/memfd:pvsched-"))?
            .split_whitespace()
            .next()?
            .to_owned();
        Some(PathBuf::from(format!("/proc/{pid}/map_files/{range}")))
    }

    /// The vCPU threads, sorted by vCPU index.
    pub fn vcpu_threads(&self) -> Result<Vec<VcpuThread>> {
        find_vcpu_threads(Path::new("/proc"), self.pid(), self.accelerator)
    }

    /// Host thread ids of the vCPUs, in vCPU order.
    pub fn vcpu_tids(&self) -> Result<Vec<u32>> {
        Ok(self
            .vcpu_threads()?
            .into_iter()
            .map(|thread| thread.tid)
            .collect())
    }

    /// Console lines received so far (escape sequences before markers removed).
    pub fn console(&self) -> &[String] {
        &self.process.console
    }

    /// Writes the go line on the serial console, starting a workload that waits for it
    /// ([`crate::InitControl::wait_for_go`]).
    pub fn send_go(&mut self) -> Result<()> {
        let stdin = self
            .process
            .stdin
            .as_mut()
            .ok_or_else(|| LabError::QemuExited {
                name: self.name.clone(),
                status: "console input closed".into(),
                console_tail: String::new(),
            })?;
        let path = PathBuf::from(format!("<console of {}>", self.name));
        stdin
            .write_all(format!("{GO_LINE}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(LabError::io("write", path))
    }

    /// Waits for a console line starting with `marker` (e.g. [`crate::workload::MARKER_READY`]).
    /// Fails when QEMU exits first or `timeout` passes.
    pub fn wait_for_marker(&mut self, marker: &str, timeout: Duration) -> Result<()> {
        match self.process.wait_for(marker, Instant::now() + timeout) {
            WaitOutcome::Found => Ok(()),
            WaitOutcome::TimedOut => Err(LabError::ResultTimeout {
                name: self.name.clone(),
                timeout,
                console_tail: self.process.tail(),
            }),
            WaitOutcome::Exited => {
                let status = self.process.reap(Duration::from_secs(1));
                Err(LabError::QemuExited {
                    name: self.name.clone(),
                    status,
                    console_tail: self.process.tail(),
                })
            }
        }
    }

    /// Waits for the init script to finish (its done marker) and QEMU to exit, then splits
    /// the console by markers. Fails when QEMU dies first or `timeout` passes.
    pub fn wait_result(&mut self, timeout: Duration) -> Result<GuestOutput> {
        self.wait_output(timeout, true)
    }

    /// Like [`Guest::wait_result`] but leaves QEMU running: for guests whose init idles
    /// after the done marker ([`crate::InitControl::hold_after_done`]), so that the host can
    /// inspect the QEMU threads before it drops the guest.
    pub fn wait_done(&mut self, timeout: Duration) -> Result<GuestOutput> {
        self.wait_output(timeout, false)
    }

    /// True while the QEMU process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.process.child.try_wait(), Ok(None))
    }

    fn wait_output(&mut self, timeout: Duration, reap: bool) -> Result<GuestOutput> {
        let started = Instant::now();
        let outcome = self.process.wait_for(MARKER_DONE, started + timeout);
        let run_time = started.elapsed();
        match outcome {
            WaitOutcome::Found => {
                // init powers off right after the done marker, unless it holds.
                if reap {
                    self.process.reap(Duration::from_secs(10));
                }
            }
            WaitOutcome::TimedOut => {
                self.process.kill();
                return Err(LabError::ResultTimeout {
                    name: self.name.clone(),
                    timeout,
                    console_tail: self.process.tail(),
                });
            }
            WaitOutcome::Exited => {
                let status = self.process.reap(Duration::from_secs(1));
                return Err(LabError::QemuExited {
                    name: self.name.clone(),
                    status,
                    console_tail: self.process.tail(),
                });
            }
        }
        split_console(&self.process.console, run_time).ok_or_else(|| LabError::QemuExited {
            name: self.name.clone(),
            status: "done without a result section".into(),
            console_tail: self.process.tail(),
        })
    }
}

impl fmt::Debug for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guest")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .field("accelerator", &self.accelerator)
            .field("shm_path", &self.shm_path)
            .finish_non_exhaustive()
    }
}

/// Splits console lines by the init script's markers; `None` without a complete result
/// section.
fn split_console(console: &[String], run_time: Duration) -> Option<GuestOutput> {
    let begin = console
        .iter()
        .position(|line| line.starts_with(MARKER_RESULT_BEGIN))?;
    let end = begin
        + console[begin..]
            .iter()
            .position(|line| line.starts_with(MARKER_RESULT_END))?;
    let workload = console[begin]
        .split_whitespace()
        .find_map(|field| field.strip_prefix("workload="))
        .unwrap_or_default()
        .to_owned();
    let exit_code = console[end]
        .split_whitespace()
        .find_map(|field| field.strip_prefix("rc="))
        .and_then(|code| code.parse().ok())
        .unwrap_or(-1);
    let module = console
        .iter()
        .find_map(|line| line.strip_prefix(MARKER_MODULE))
        .map(|status| status.trim().to_owned());
    let diagnostics = match console
        .iter()
        .position(|line| line.starts_with(MARKER_DIAG_BEGIN))
    {
        Some(diag_begin) => console[diag_begin + 1..]
            .iter()
            .take_while(|line| !line.starts_with(MARKER_DIAG_END))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        None => String::new(),
    };
    Some(GuestOutput {
        workload,
        exit_code,
        result: console[begin + 1..end].join("\n"),
        diagnostics,
        module,
        run_ms: u64::try_from(run_time.as_millis()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_comm_names() {
        assert_eq!(parse_vcpu_comm("CPU 0/TCG", Accelerator::Tcg), Some(0));
        assert_eq!(parse_vcpu_comm("CPU 12/KVM", Accelerator::Kvm), Some(12));
        assert_eq!(parse_vcpu_comm("CPU 1/KVM", Accelerator::Tcg), None);
        assert_eq!(parse_vcpu_comm("qemu-system-x86", Accelerator::Tcg), None);
        assert_eq!(parse_vcpu_comm("IO mon_iothread", Accelerator::Tcg), None);
    }

    #[test]
    fn vcpu_threads_from_proc_fixture() {
        let root = std::env::temp_dir().join(format!("pvsched-lab-proc-{}", std::process::id()));
        let task = root.join("4242").join("task");
        for (tid, comm) in [
            (4242, "qemu-system-x86"),
            (4250, "CPU 1/TCG"),
            (4249, "CPU 0/TCG"),
            (4251, "worker"),
        ] {
            let dir = task.join(tid.to_string());
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join("comm"), format!("{comm}\n")).expect("write");
        }
        let threads = find_vcpu_threads(&root, 4242, Accelerator::Tcg).expect("scan");
        fs::remove_dir_all(&root).expect("cleanup");
        assert_eq!(
            threads,
            [
                VcpuThread {
                    index: 0,
                    tid: 4249
                },
                VcpuThread {
                    index: 1,
                    tid: 4250
                }
            ]
        );
    }

    #[test]
    fn console_split_by_markers() {
        let console: Vec<String> = [
            "SeaBIOS",
            "PVSCHED-LAB BOOTED cpus=2 kernel=6.1.0",
            "PVSCHED-LAB MODULE loaded",
            "PVSCHED-LAB RESULT BEGIN workload=cyclictest",
            "# Total: 1",
            "PVSCHED-LAB RESULT END rc=0",
            "PVSCHED-LAB DIAG BEGIN",
            "pvsched: bound",
            "PVSCHED-LAB DIAG END",
            "PVSCHED-LAB DONE",
        ]
        .map(String::from)
        .to_vec();
        let output = split_console(&console, Duration::from_secs(1)).expect("split");
        assert_eq!(output.workload, "cyclictest");
        assert_eq!(output.exit_code, 0);
        assert_eq!(output.result, "# Total: 1");
        assert_eq!(output.diagnostics, "pvsched: bound");
        assert_eq!(output.module.as_deref(), Some("loaded"));
        assert!(split_console(&console[..4], Duration::ZERO).is_none());
    }

    #[test]
    fn forward_lines_strips_bios_escapes() {
        let input: &[u8] =
            b"Booting from ROM..\r\n\x1bc\x1b[?7l\x1b[2JPVSCHED-LAB BOOTED cpus=2\r\nplain\n";
        let mut lines = Vec::new();
        forward_lines(input, |line| {
            lines.push(line);
            true
        });
        assert_eq!(
            lines,
            ["Booting from ROM..", "PVSCHED-LAB BOOTED cpus=2", "plain"]
        );
    }

    #[test]
    fn config_validation() {
        let mut config = GuestConfig::new("ok-name_1", "/k", "/i");
        assert!(config.validate().is_ok());
        config.shm_size = 3 << 20;
        assert!(config.validate().is_err());
        config.shm_size = 1 << 20;
        config.name = "bad,name".into();
        assert!(config.validate().is_err());
        assert_eq!(
            GuestConfig::new("g", "/k", "/i").cmdline(),
            "console=ttyS0 quiet panic=-1 clocksource=tsc tsc=reliable"
        );
    }

    #[test]
    fn qemu_command_line() {
        let config = GuestConfig::new("vm1", "/k", "/i");
        let text = describe(&config.command(Accelerator::Tcg));
        assert!(text.contains("-name vm1,debug-threads=on"), "{text}");
        assert!(text.contains("-accel tcg,thread=multi"), "{text}");
        assert!(text.contains("-qmp unix:"), "{text}");
        assert!(
            text.contains("mem-path=/dev/shm/pvsched-vm1,size=1048576,share=on"),
            "{text}"
        );
        assert!(
            text.contains("-device ivshmem-plain,memdev=pvsched"),
            "{text}"
        );
        assert!(text.contains("-no-reboot"), "{text}");
        assert!(!text.contains("memory-backend-memfd"), "{text}");
        assert!(!text.contains("-machine"), "{text}");

        // Guest RAM on a shared backend of the guest's size.
        let mut shared = config.clone();
        shared.shared_ram = true;
        shared.memory_mib = 384;
        let text = describe(&shared.command(Accelerator::Tcg));
        assert!(
            text.contains("-object memory-backend-memfd,id=ram,size=384M,share=on"),
            "{text}"
        );
        assert!(text.contains("-machine memory-backend=ram"), "{text}");
        assert!(text.contains("-m 384"), "{text}");

        // The doorbell channel: the daemon's socket, no shared page file.
        let mut config = config;
        config.doorbell_server = Some("/run/pvsched/ivshmem.sock".into());
        let text = describe(&config.command(Accelerator::Tcg));
        assert!(
            text.contains("-chardev socket,path=/run/pvsched/ivshmem.sock,id=pvsched"),
            "{text}"
        );
        assert!(
            text.contains("-device ivshmem-doorbell,chardev=pvsched,vectors=1"),
            "{text}"
        );
        assert!(!text.contains("memory-backend-file"), "{text}");
        assert!(!text.contains("ivshmem-plain"), "{text}");
    }
}
