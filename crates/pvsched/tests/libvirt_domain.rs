//! A libvirt-managed domain end to end: a real libvirtd runs a transient TCG
//! domain (direct kernel boot of the lab's Debian cloud kernel, an initramfs
//! with the guest module, `<shmem name='pvsched-test-PID'>` ivshmem-plain
//! 1 MiB, two vCPUs). `pvsched hostd` with `allowed_users = ["libvirt-qemu"]`
//! must find the domain from libvirt's records alone (libvirt keeps QEMU's
//! monitor), boost its vCPU threads while the guest runs RT tasks (seen in
//! /proc), put them back in the fair class when the tasks end, and forget
//! the domain after `virsh destroy`. Twice: with the shared file libvirt
//! creates (`ivshmem-plain`), and on the daemon's ivshmem server
//! (`ivshmem-doorbell`: the daemon supplies the memory, libvirt connects QEMU
//! to the server the daemon listens on, and no file is created).
//!
//! Needs root, QEMU, make, the lab's assets and libvirt
//! (libvirt-daemon-system, libvirt-clients: `./run` installs them); starts
//! `virtlogd -d` and `libvirtd -d` when no libvirtd answers. Prints a
//! SKIPPED line otherwise, or fails under `CI=true`.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::libvirt::{
    domain_xml, libvirt_missing, qemu_pid, vcpu_threads, virsh, Domain, LibvirtHost, RtBudget,
};
use common::{signal, spawn_hostd, thread_policy};
use pvsched_lab::workload::MARKER_DONE;
use pvsched_lab::{InitControl, Initramfs, InitramfsSpec, Workload};

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

/// One libvirtd for the tests of this file at a time: each starts and stops it.
static LIBVIRTD: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, PartialEq)]
enum Channel {
    /// `ivshmem-plain`: a file libvirt creates in /dev/shm.
    Plain,
    /// `ivshmem-doorbell` on the daemon's server socket.
    Doorbell,
}

#[test]
fn hostd_boosts_a_libvirt_domain_found_from_libvirts_records() {
    boosts_a_libvirt_domain(Channel::Plain);
}

#[test]
#[ignore = "hung once at the guest module's load in a CI run (passed 3 times here) \
            (docs/libvirt.md): run with --ignored"]
fn hostd_boosts_a_libvirt_domain_on_its_ivshmem_server() {
    boosts_a_libvirt_domain(Channel::Doorbell);
}

fn boosts_a_libvirt_domain(channel: Channel) {
    common::require!();
    let _one_at_a_time = LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = libvirt_missing() {
        pvsched_lab::testing::skip("libvirt_domain", &why);
        return;
    }
    let Some(assets) = pvsched_lab::testing::assets_or_skip("libvirt_domain", true) else {
        return;
    };
    let _libvirt_host = match LibvirtHost::ensure() {
        Ok(host) => host,
        Err(why) => {
            pvsched_lab::testing::skip("libvirt_domain", &why);
            return;
        }
    };
    let module = common::guest_module(&assets);
    let name = format!(
        "pvsched-test-{}-{}",
        std::process::id(),
        match channel {
            Channel::Plain => "plain",
            Channel::Doorbell => "door",
        }
    );
    // Under /tmp, which libvirt-qemu may traverse: libvirt hands the kernel
    // and initrd to QEMU as that user.
    let work = std::env::temp_dir().join(format!("pvsched-libvirt-{}", common::unique_tag()));
    std::fs::create_dir_all(work.join("state")).unwrap();
    let kernel = work.join("vmlinuz");
    std::fs::copy(&assets.kernel_image, &kernel).unwrap();

    let workload = Workload::Idle { duration_s: 1 };
    let initrd = work.join("initrd.cpio");
    Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone()],
            module: Some(module),
            kernel_modules: Vec::new(),
            files: Vec::new(),
            module_params: "enable=1".into(),
            workload,
            diagnostics: vec![
                common::two_rt_loops(200),
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
    // QEMU connects to the server as libvirt-qemu: `work` is 0755 under /tmp.
    let server = work.join("ivshmem.sock");
    let server_line = match channel {
        Channel::Plain => String::new(),
        Channel::Doorbell => format!("ivshmem_server = \"{}\"\n", server.display()),
    };
    std::fs::write(
        &config,
        format!(
            "[daemon]\nperiod_us = 1000\nrefresh_ms = 100\nstate_file = \"{}\"\n\
             metrics_addr = \"{port}\"\ndiscover = true\nallowed_users = [\"libvirt-qemu\"]\n{server_line}",
            state_file.display()
        ),
    )
    .unwrap();
    let log_path = work.join("hostd.log");
    let mut daemon = common::KillOnDrop(spawn_hostd(&config, &log_path));
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    common::wait_for("the daemon's status endpoint", || vm_count(port).is_some());
    if channel == Channel::Doorbell {
        common::wait_for("the ivshmem server socket", || server.exists());
    }

    let console = work.join("console.log");
    let xml = work.join("domain.xml");
    let shmem = match channel {
        Channel::Plain => format!(
            "    <shmem name='{name}'>\n      <model type='ivshmem-plain'/>\n      <size unit='M'>1</size>\n    </shmem>\n"
        ),
        Channel::Doorbell => format!(
            "    <shmem name='{name}'>\n      <model type='ivshmem-doorbell'/>\n      <server path='{}'/>\n      <msi vectors='2'/>\n    </shmem>\n",
            server.display()
        ),
    };
    std::fs::write(&xml, domain_xml(&name, &kernel, &initrd, &console, &shmem)).unwrap();
    let created = virsh(&["create", xml.to_str().unwrap()]);
    assert!(
        created.status.success(),
        "virsh create failed: {}{}",
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr)
    );
    let mut domain = Domain::new(&name, false);
    let qemu = qemu_pid(&name);
    let shm = PathBuf::from(format!("/dev/shm/{name}"));
    let budget = domain
        .rt_budget
        .insert(RtBudget::grant(qemu))
        .written
        .clone();

    // While the guest runs its RT loops: the vCPU threads' policy in /proc.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let (mut rt_samples, mut samples) = (0u32, 0u32);
            while !done.load(Ordering::Relaxed) {
                for tid in vcpu_threads(qemu) {
                    samples += 1;
                    if matches!(thread_policy(qemu, tid), Some(1 | 2)) {
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
            daemon.0.try_wait().unwrap().is_none(),
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
        "libvirt domain {name}, QEMU pid {qemu}, vCPU threads {vcpus:?}; daemon view {view:?}; vCPU RT in {rt_samples} of {samples} samples; RT budgets {:?}\n--- console ---\n{guest_output}\n--- daemon log ---\n{}",
        budget,
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
        vcpus.iter().all(|&t| thread_policy(qemu, t) == Some(0))
    });
    // The shared file is libvirt's for a plain device; on the server the daemon's memory.
    assert_eq!(shm.exists(), channel == Channel::Plain);
    if channel == Channel::Doorbell {
        assert!(
            log().contains("memfd:pvsched"),
            "the daemon did not attach its own memory:\n{}",
            log()
        );
    }

    // virsh destroy: QEMU is gone and the daemon lets the domain go.
    let destroyed = virsh(&["destroy", &name]);
    assert!(
        destroyed.status.success(),
        "{}",
        String::from_utf8_lossy(&destroyed.stderr)
    );
    common::wait_for("the daemon to forget the domain", || {
        vm_count(port) == Some(0)
    });
    signal(daemon.0.id(), "TERM");
    let status = daemon.0.wait().unwrap();
    let log = log();
    assert!(status.success(), "daemon exit {status}\n{log}");
    assert!(log.contains("attached"), "{log}");
    assert!(!state_file.exists(), "state file left behind");
    // libvirt leaves the <shmem> file behind (the domain guard removes it); the
    // ancestors' RT budgets go back once the domain's cgroups are gone.
    drop(domain);
    common::remove_unless_panicking(&work);
}
