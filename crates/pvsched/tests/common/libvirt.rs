//! What the tests against a real libvirtd share: a libvirtd that answers (started here on
//! a host without systemd, stopped again), the host's `machine` cgroups put back, a TCG
//! domain's XML, the RT budget libvirt's `cpu` cgroups need on a kernel with RT group
//! scheduling, and the domain removed when a test ends early.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::tasks;

pub const URI: &str = "qemu:///system";

pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .expect("virsh")
}

/// `virsh ARGS`, which must succeed.
pub fn virsh_ok(args: &[&str]) {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn libvirtd_answers() -> bool {
    Command::new("virsh")
        .args(["-c", URI, "list", "--all"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What is missing for libvirt, or `None`.
pub fn libvirt_missing() -> Option<String> {
    for tool in ["virsh", "libvirtd", "virtlogd"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!(
                "{tool} not found (libvirt-daemon-system, libvirt-clients)"
            ));
        }
    }
    match pvsched_host::sys::uid_of_user("libvirt-qemu") {
        Ok(Some(_)) => None,
        _ => Some("no user libvirt-qemu".into()),
    }
}

/// The `machine` cgroup of every v1 controller that libvirt had not created yet.
fn missing_machine_cgroups() -> Vec<PathBuf> {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    controllers
        .flatten()
        .map(|c| c.path().join("machine"))
        .filter(|machine| !machine.exists())
        .collect()
}

/// Removes a cgroup directory and the ones below it, deepest first (a cgroup directory
/// goes with `rmdir` once it has no tasks and no children).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&child.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// What a test added to the host for libvirt: the daemons it started and the `machine`
/// cgroups libvirt created for its domain. Put back on drop, so that later tests (the
/// isolation tests refuse a `machine` cpuset that spans the CPU they isolate) find the
/// host as it was.
pub struct LibvirtHost {
    started: bool,
    new_machine_cgroups: Vec<PathBuf>,
}

impl LibvirtHost {
    /// A libvirtd that answers: the running one, or `virtlogd -d` and `libvirtd -d`
    /// started here (hosts without systemd).
    pub fn ensure() -> Result<LibvirtHost, String> {
        let mut host = LibvirtHost {
            started: false,
            new_machine_cgroups: missing_machine_cgroups(),
        };
        if libvirtd_answers() {
            return Ok(host);
        }
        host.started = true;
        // virtlogd first: libvirtd hands it the domain's log files. Either may
        // already run (a second one exits at once), so only the answer counts.
        // Each starts with no descriptor but 0-2: they outlive the test, and one it
        // inherited (the lock `flock` holds around a run of the tests) would stay held.
        for daemon in ["virtlogd", "libvirtd"] {
            let _ = Command::new("bash")
                .arg("-c")
                .arg(
                    "for fd in /proc/$$/fd/*; do n=${fd##*/}; \
                     if [ \"$n\" -gt 2 ]; then eval \"exec $n>&-\"; fi; done; exec \"$0\" -d",
                )
                .arg(daemon)
                .status();
        }
        let start = Instant::now();
        while !libvirtd_answers() {
            if start.elapsed() > Duration::from_secs(30) {
                return Err("libvirtd -d started but does not answer on qemu:///system".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(host)
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        if self.started {
            for daemon in ["libvirtd", "virtlogd"] {
                let pid = std::fs::read_to_string(format!("/run/{daemon}.pid"))
                    .ok()
                    .and_then(|text| text.trim().parse::<u32>().ok());
                if let Some(pid) = pid {
                    super::signal(pid, "TERM");
                    let start = Instant::now();
                    while Path::new(&format!("/proc/{pid}")).exists()
                        && start.elapsed() < Duration::from_secs(10)
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        for machine in &self.new_machine_cgroups {
            remove_cgroup_tree(machine);
        }
    }
}

/// The vCPU threads of a QEMU run with `debug-threads=on` (as libvirt does).
pub fn vcpu_threads(pid: u32) -> Vec<u32> {
    tasks(pid)
        .into_iter()
        .filter(|(_, comm)| comm.starts_with("CPU ") && comm.ends_with("/TCG"))
        .map(|(tid, _)| tid)
        .collect()
}

/// The QEMU process libvirt runs for domain `name`.
pub fn qemu_pid(name: &str) -> u32 {
    let pid_file = format!("/run/libvirt/qemu/{name}.pid");
    std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{pid_file}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// An RT budget given to a domain's cgroups of the v1 `cpu` controller, when the kernel
/// has RT group scheduling: libvirt places each vCPU thread in a `vcpuN` cgroup of that
/// controller whose `cpu.rt_runtime_us` is 0, and there no thread may be made SCHED_RR
/// or SCHED_FIFO (EPERM). The budgets of the domain's ancestors go back on drop, once
/// libvirt has removed the domain's cgroups (docs/libvirt.md says how to set this up on
/// a host).
pub struct RtBudget {
    /// What was written, `FILE=US`.
    pub written: Vec<String>,
    before: Vec<(PathBuf, String)>,
}

impl RtBudget {
    /// Grants the budget to the cgroups of QEMU process `pid` (nothing when the kernel
    /// has no RT group scheduling).
    pub fn grant(pid: u32) -> RtBudget {
        let mut budget = RtBudget {
            written: Vec::new(),
            before: Vec::new(),
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return budget;
        };
        let Some((mount, emulator)) = text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers
                .split(',')
                .any(|c| c == "cpu")
                .then(|| (format!("/sys/fs/cgroup/{controllers}"), path.to_owned()))
        }) else {
            return budget;
        };
        let Some(domain) = emulator.strip_suffix("/emulator") else {
            return budget;
        };
        let domain_dir = PathBuf::from(format!("{mount}{domain}"));
        if !domain_dir.join("cpu.rt_runtime_us").exists() {
            return budget;
        }
        // The first value the kernel admits: one large enough that the kernel's RT
        // throttling of the group never binds before the daemon's own budgets (a
        // vCPU may be boosted 25 ms per 100 ms, and an RT thread of a throttled
        // group does not run at all until the next second), else the smaller one
        // of docs/libvirt.md.
        let mut write = |dir: &Path, choices: &[u64]| {
            let file = dir.join("cpu.rt_runtime_us");
            for &us in choices {
                if std::fs::write(&file, us.to_string()).is_ok() {
                    budget.written.push(format!("{}={us}", file.display()));
                    return;
                }
            }
        };
        // Top down: a parent's budget bounds the sum of its children's.
        let mut ancestors: Vec<PathBuf> = domain_dir
            .ancestors()
            .skip(1)
            .take_while(|a| a.starts_with(&mount) && a != &Path::new(&mount))
            .map(Path::to_path_buf)
            .collect();
        ancestors.reverse();
        let before: Vec<(PathBuf, String)> = ancestors
            .iter()
            .filter_map(|dir| {
                let file = dir.join("cpu.rt_runtime_us");
                let old = std::fs::read_to_string(&file).ok()?;
                Some((file, old.trim().to_owned()))
            })
            .collect();
        for dir in &ancestors {
            write(dir, &[950_000, 600_000]);
        }
        write(&domain_dir, &[950_000, 500_000]);
        if let Ok(entries) = std::fs::read_dir(&domain_dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    write(&e.path(), &[230_000, 100_000]);
                }
            }
        }
        budget.before = before;
        budget
    }
}

impl Drop for RtBudget {
    fn drop(&mut self) {
        // Deepest first. libvirt removes the domain's cgroups shortly after the domain
        // stops; until then a parent's budget cannot go below its children's (EBUSY).
        for (file, old) in self.before.iter().rev() {
            let start = Instant::now();
            while std::fs::write(file, old).is_err() {
                if start.elapsed() > Duration::from_secs(20) {
                    eprintln!("could not put back {} = {old}", file.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A `type='qemu'` (TCG) domain: direct kernel boot, two vCPUs (ACPI, so the guest sees
/// both), the serial console to a file, and `shmem` inside `<devices>`.
pub fn domain_xml(name: &str, kernel: &Path, initrd: &Path, console: &Path, shmem: &str) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
{shmem}    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = kernel.display(),
        initrd = initrd.display(),
        console = console.display()
    )
}

/// A domain of the test's: on drop, destroyed if it still runs, undefined if it was
/// defined, the `<shmem>` file libvirt leaves behind in /dev/shm removed, then the RT
/// budget given to its cgroups taken back (which waits for the cgroups to go).
pub struct Domain {
    pub name: String,
    pub persistent: bool,
    pub rt_budget: Option<RtBudget>,
}

impl Domain {
    pub fn new(name: &str, persistent: bool) -> Domain {
        Domain {
            name: name.to_owned(),
            persistent,
            rt_budget: None,
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        if self.persistent {
            let _ = virsh(&["undefine", &self.name]);
        }
        let _ = std::fs::remove_file(format!("/dev/shm/pvsched-{}", self.name));
        let _ = std::fs::remove_file(format!("/dev/shm/{}", self.name));
        self.rt_budget.take();
    }
}
