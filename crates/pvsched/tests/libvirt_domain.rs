//! A libvirt-managed domain end to end: a real libvirtd runs a transient TCG
//! domain (direct kernel boot of the lab's Debian cloud kernel, an initramfs
//! with the guest module, `<shmem name='pvsched-test-PID'>` ivshmem-plain
//! 1 MiB, two vCPUs). `pvsched hostd` with `allowed_users = ["libvirt-qemu"]`
//! must find the domain from libvirt's records alone (libvirt keeps QEMU's
//! monitor), boost its vCPU threads while the guest runs RT tasks (seen in
//! /proc), put them back in the fair class when the tasks end, and forget
//! the domain after `virsh destroy`.
//!
//! Needs root, QEMU, make, the lab's assets and libvirt
//! (libvirt-daemon-system, libvirt-clients: `./run` installs them); starts
//! `virtlogd -d` and `libvirtd -d` when no libvirtd answers. Prints a
//! SKIPPED line otherwise, or fails under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{signal, spawn_hostd, tasks};
use pvsched_lab::workload::MARKER_DONE;
use pvsched_lab::{build_guest_module, InitControl, Initramfs, InitramfsSpec, Workload};

const URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .expect("virsh")
}

fn libvirtd_answers() -> bool {
    Command::new("virsh")
        .args(["-c", URI, "list", "--all"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What is missing for libvirt, or `None`.
fn libvirt_missing() -> Option<String> {
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

/// What the test added to the host for libvirt: the daemons it started and the
/// `machine` cgroups libvirt created for its domain. Put back on drop, so that later
/// tests (the isolation tests refuse a `machine` cpuset that spans the CPU they
/// isolate) find the host as it was.
struct LibvirtHost {
    started: bool,
    new_machine_cgroups: Vec<PathBuf>,
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        if self.started {
            for daemon in ["libvirtd", "virtlogd"] {
                let pid = std::fs::read_to_string(format!("/run/{daemon}.pid"))
                    .ok()
                    .and_then(|text| text.trim().parse::<u32>().ok());
                if let Some(pid) = pid {
                    common::signal(pid, "TERM");
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

/// A libvirtd that answers: the running one, or `virtlogd -d` and
/// `libvirtd -d` started here (hosts without systemd).
fn ensure_libvirtd(host: &mut LibvirtHost) -> Result<(), String> {
    if libvirtd_answers() {
        return Ok(());
    }
    host.started = true;
    // virtlogd first: libvirtd hands it the domain's log files. Either may
    // already run (a second one exits at once), so only the answer counts.
    for daemon in ["virtlogd", "libvirtd"] {
        let _ = Command::new(daemon).arg("-d").status();
    }
    let start = Instant::now();
    while !libvirtd_answers() {
        if start.elapsed() > Duration::from_secs(30) {
            return Err("libvirtd -d started but does not answer on qemu:///system".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Scheduling policy (field 41 of stat) of a thread.
fn policy(pid: u32, tid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(38)?.parse().ok()
}

/// The vCPU threads of a QEMU run with `debug-threads=on` (as libvirt does).
fn vcpu_threads(pid: u32) -> Vec<u32> {
    tasks(pid)
        .into_iter()
        .filter(|(_, comm)| comm.starts_with("CPU ") && comm.ends_with("/TCG"))
        .map(|(tid, _)| tid)
        .collect()
}

/// Gives the domain's cgroups of the v1 `cpu` controller an RT budget, when
/// the kernel has RT group scheduling: libvirt places each vCPU thread in a
/// `vcpuN` cgroup of that controller whose `cpu.rt_runtime_us` is 0, and
/// there no thread may be made SCHED_RR or SCHED_FIFO (EPERM). Returns what
/// was written and the budgets of the domain's ancestors before, to put back
/// once the domain is gone (docs/libvirt.md says how to set this up on a host).
fn grant_rt_budget(pid: u32) -> (Vec<String>, Vec<(PathBuf, String)>) {
    let none = (Vec::new(), Vec::new());
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return none;
    };
    let Some((mount, emulator)) = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers
            .split(',')
            .any(|c| c == "cpu")
            .then(|| (format!("/sys/fs/cgroup/{controllers}"), path.to_owned()))
    }) else {
        return none;
    };
    let Some(domain) = emulator.strip_suffix("/emulator") else {
        return none;
    };
    let domain_dir = PathBuf::from(format!("{mount}{domain}"));
    if !domain_dir.join("cpu.rt_runtime_us").exists() {
        return none;
    }
    let mut written = Vec::new();
    let mut write = |dir: &Path, us: u64| {
        let file = dir.join("cpu.rt_runtime_us");
        if std::fs::write(&file, us.to_string()).is_ok() {
            written.push(format!("{}={us}", file.display()));
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
        write(dir, 600_000);
    }
    write(&domain_dir, 500_000);
    if let Ok(entries) = std::fs::read_dir(&domain_dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                write(&e.path(), 100_000);
            }
        }
    }
    (written, before)
}

/// The daemon's view of the domain: (attached, QMP socket, vCPU tids).
fn daemon_view(addr: std::net::SocketAddr, name: &str) -> Option<(bool, bool, Vec<u32>)> {
    let body = pvsched_host::daemon::fetch_stats(addr, "/status").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    let vm = status
        .get("vms")?
        .as_array()?
        .iter()
        .find(|v| v.get("name").and_then(|n| n.as_str()) == Some(name))?
        .clone();
    let tids = vm
        .get("vcpus")?
        .as_array()?
        .iter()
        .filter_map(|v| v.get("tid")?.as_u64().map(|t| t as u32))
        .collect();
    Some((
        vm.get("attached")?.as_bool()?,
        !vm.get("qmp")?.as_str()?.is_empty(),
        tids,
    ))
}

fn vm_count(addr: std::net::SocketAddr) -> Option<usize> {
    let body = pvsched_host::daemon::fetch_stats(addr, "/status").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(status.get("vms")?.as_array()?.len())
}

fn domain_xml(name: &str, kernel: &Path, initrd: &Path, console: &Path) -> String {
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
    <shmem name='{name}'>
      <model type='ivshmem-plain'/>
      <size unit='M'>1</size>
    </shmem>
    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = kernel.display(),
        initrd = initrd.display(),
        console = console.display()
    )
}

/// Destroys the domain if the test ends early.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
    }
}

#[test]
fn hostd_boosts_a_libvirt_domain_found_from_libvirts_records() {
    common::require!();
    if let Some(why) = libvirt_missing() {
        pvsched_lab::testing::skip("libvirt_domain", &why);
        return;
    }
    let Some(assets) = pvsched_lab::testing::assets_or_skip("libvirt_domain", true) else {
        return;
    };
    let mut libvirt_host = LibvirtHost {
        started: false,
        new_machine_cgroups: missing_machine_cgroups(),
    };
    if let Err(why) = ensure_libvirtd(&mut libvirt_host) {
        pvsched_lab::testing::skip("libvirt_domain", &why);
        return;
    }
    let kmod_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/kmod");
    let module = build_guest_module(&kmod_dir, &assets.kernel_headers).expect("build module");
    let name = format!("pvsched-test-{}", std::process::id());
    // Under /tmp, which libvirt-qemu may traverse: libvirt hands the kernel
    // and initrd to QEMU as that user.
    let work = std::env::temp_dir().join(format!("pvsched-libvirt-{}", common::unique_tag()));
    std::fs::create_dir_all(work.join("state")).unwrap();
    let kernel = work.join("vmlinuz");
    std::fs::copy(&assets.kernel_image, &kernel).unwrap();

    let rt_loop = |n: u32| {
        format!(
            "chrt -f 50 sh -c 'i=0; while [ $i -lt 200 ]; do sleep 0.02; i=$((i+1)); done' && echo rt-loop-{n}-ok"
        )
    };
    let workload = Workload::Idle { duration_s: 1 };
    let initrd = work.join("initrd.cpio");
    Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone()],
            module: Some(module),
            kernel_modules: Vec::new(),
            module_params: "enable=1".into(),
            workload,
            diagnostics: vec![
                format!("{} & {}; wait", rt_loop(0), rt_loop(1)),
                "cat /sys/kernel/debug/pvsched/guest".into(),
                "dmesg | grep pvsched_guest".into(),
            ],
            // Idle after the workload: the test destroys the domain itself.
            control: InitControl {
                wait_for_go: false,
                hold_after_done: true,
            },
        },
        &initrd,
    )
    .expect("build initramfs");

    // The daemon first (the order docs/libvirt.md asks for).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let state_file = work.join("state/hostd.state");
    let config = work.join("hostd.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nperiod_us = 1000\nrefresh_ms = 100\nstate_file = \"{}\"\n\
             metrics_addr = \"{port}\"\ndiscover = true\nallowed_users = [\"libvirt-qemu\"]\n",
            state_file.display()
        ),
    )
    .unwrap();
    let log_path = work.join("hostd.log");
    let mut daemon = spawn_hostd(&config, &log_path);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    common::wait_for("the daemon's status endpoint", || vm_count(port).is_some());

    let console = work.join("console.log");
    let xml = work.join("domain.xml");
    std::fs::write(&xml, domain_xml(&name, &kernel, &initrd, &console)).unwrap();
    let created = virsh(&["create", xml.to_str().unwrap()]);
    assert!(
        created.status.success(),
        "virsh create failed: {}{}",
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr)
    );
    let domain = Domain(name.clone());
    let pid_file = format!("/run/libvirt/qemu/{name}.pid");
    let qemu: u32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{pid_file}: {e}"))
        .trim()
        .parse()
        .unwrap();
    let shm = PathBuf::from(format!("/dev/shm/{name}"));
    let (budgets, budgets_before) = grant_rt_budget(qemu);

    // While the guest runs its RT loops: the vCPU threads' policy in /proc.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let (mut rt_samples, mut samples) = (0u32, 0u32);
            while !done.load(Ordering::Relaxed) {
                for tid in vcpu_threads(qemu) {
                    samples += 1;
                    if matches!(policy(qemu, tid), Some(1 | 2)) {
                        rt_samples += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (rt_samples, samples)
        })
    };
    let finished = Instant::now();
    let mut view = None;
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains(MARKER_DONE)
    {
        if let Some(v) = daemon_view(port, &name) {
            view = Some(v);
        }
        assert!(
            finished.elapsed() < Duration::from_secs(300),
            "the guest did not finish; console:\n{}\n--- daemon log ---\n{}",
            std::fs::read_to_string(&console).unwrap_or_default(),
            log()
        );
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the daemon exited:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    done.store(true, Ordering::Relaxed);
    let (rt_samples, samples) = sampler.join().unwrap();
    let guest_output = std::fs::read_to_string(&console).unwrap_or_default();
    let vcpus = vcpu_threads(qemu);
    eprintln!(
        "libvirt domain {name}, QEMU pid {qemu}, vCPU threads {vcpus:?}; daemon view {view:?}; vCPU RT in {rt_samples} of {samples} samples; RT budgets {budgets:?}\n--- console ---\n{guest_output}\n--- daemon log ---\n{}",
        log()
    );
    assert!(
        guest_output.contains("BOOTED cpus=2"),
        "the guest did not see its two vCPUs:\n{guest_output}"
    );
    assert!(guest_output.contains("rt-loop-0-ok"), "{guest_output}");
    let (attached, has_qmp, tids) = view.expect("the daemon never listed the domain");
    assert!(attached, "the domain was never attached\n{}", log());
    assert!(
        !has_qmp,
        "a libvirt domain has no QMP socket of the daemon's"
    );
    let mut expected = vcpus.clone();
    expected.sort_unstable();
    let mut tids = tids;
    tids.sort_unstable();
    assert_eq!(tids, expected, "the daemon's vCPU threads are not QEMU's");
    assert!(
        rt_samples > 0,
        "no vCPU thread was seen RT in {samples} samples\n{}",
        log()
    );
    // The RT tasks are over: back in the fair class while the guest idles.
    common::wait_for("the vCPU threads back in the fair class", || {
        vcpus.iter().all(|&t| policy(qemu, t) == Some(0))
    });
    assert!(shm.exists());

    // virsh destroy: QEMU is gone and the daemon lets the domain go.
    let destroyed = virsh(&["destroy", &name]);
    assert!(
        destroyed.status.success(),
        "{}",
        String::from_utf8_lossy(&destroyed.stderr)
    );
    std::mem::forget(domain);
    common::wait_for("the daemon to forget the domain", || {
        vm_count(port) == Some(0)
    });
    signal(daemon.id(), "TERM");
    let status = daemon.wait().unwrap();
    let log = log();
    assert!(status.success(), "daemon exit {status}\n{log}");
    assert!(log.contains("attached"), "{log}");
    assert!(!state_file.exists(), "state file left behind");
    // libvirt leaves the <shmem> file behind; the ancestors' RT budgets go
    // back, deepest first, now that the domain's cgroups are gone.
    let _ = std::fs::remove_file(&shm);
    // libvirt removes the domain's cgroups shortly after the destroy; until
    // then a parent's budget cannot go below its children's (EBUSY).
    for (file, old) in budgets_before.iter().rev() {
        let start = Instant::now();
        while std::fs::write(file, old).is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                eprintln!("could not put back {} = {old}", file.display());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    common::remove_unless_panicking(&work);
}
