//! docs/libvirt-host.md, "pvsched on a libvirt host", run as it is written: every `sh`
//! block of the guide in order, from installing the Debian package to reading the boosts
//! of a libvirt domain's vCPUs in `pvsched top`.
//!
//! The guide's blocks run as `bash -e` with `DOMAIN` set. Where the test machine is not
//! the operator's host, the test says so: the package is built from this test's binary;
//! with no systemd the `without-systemd` block starts the daemon; the domain is defined
//! first (TCG, direct kernel boot of the lab's cloud kernel, an initramfs, no `<shmem>`);
//! the guest has no compiler, so `guest-install` runs on the host against the guest
//! kernel's headers (`uname -r` answers the guest's release) and the module tree DKMS
//! installed goes into the guest's initramfs, where `guest-load` runs as written. On a
//! kernel with RT group scheduling the domain's `cpu` cgroups get the budget
//! docs/libvirt.md gives.
//!
//! Needs root, QEMU, tmux, make, dkms, dpkg-deb, the lab's assets and libvirt; the
//! package `pvsched` and DKMS's `pvsched-guest` must not be installed, and 127.0.0.1:9464
//! (the packaged daemon's address) must be free. Prints a SKIPPED line otherwise, or
//! fails under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::libvirt::{
    domain_xml, libvirt_missing, qemu_pid, vcpu_threads, virsh_ok, Domain, LibvirtHost, RtBudget,
};
use common::tmux::{pane_row, PaneRow, Tmux};
use common::{require, signal, thread_policy, unique_tag, Needs};
use pvsched_lab::workload::MARKER_DONE;
use pvsched_lab::{InitControl, Initramfs, InitramfsSpec, Workload};

const GUIDE: &str = include_str!("../../../docs/libvirt-host.md");
/// The packaged daemon's status and metrics address.
const DAEMON_ADDR: &str = "127.0.0.1:9464";
const STATE_FILE: &str = "/run/pvsched/hostd.state";

/// A fenced `sh` block of the guide: the words after `sh` on its opening line, its body.
#[derive(Debug)]
struct Block {
    tag: String,
    body: String,
}

fn sh_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    // Inside a fence: `Some(block)` for an `sh` block, `None` for another language's.
    let mut fence: Option<Option<Block>> = None;
    for line in markdown.lines() {
        match &mut fence {
            Some(_) if line.trim_end() == "```" => blocks.extend(fence.take().flatten()),
            Some(Some(block)) => {
                block.body.push_str(line);
                block.body.push('\n');
            }
            Some(None) => {}
            None => {
                if let Some(info) = line.strip_prefix("```") {
                    let mut words = info.split_whitespace();
                    fence = Some((words.next() == Some("sh")).then(|| Block {
                        tag: words.collect::<Vec<_>>().join(" "),
                        body: String::new(),
                    }));
                }
            }
        }
    }
    blocks
}

/// Runs a guide block as `bash -e` in `dir` with `env`; panics with its output if it fails.
fn run_block(block: &Block, dir: &Path, env: &[(&str, String)]) -> String {
    eprintln!(
        "libvirt_guide: running the guide's block:\n{}",
        block.body.trim_end()
    );
    let out = Command::new("bash")
        .arg("-ec")
        .arg(&block.body)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the guide's block failed ({}):\n{}\n--- output ---\n{text}",
        out.status,
        block.body
    );
    text
}

/// What stops the test: the first missing prerequisite or host state it would disturb.
fn host_not_ready() -> Option<String> {
    if let Some(why) = libvirt_missing() {
        return Some(why);
    }
    for (tool, package) in [("dkms", "dkms"), ("dpkg-deb", "dpkg"), ("apt", "apt")] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("{tool} not found ({package})"));
        }
    }
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "pvsched"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"));
    if installed {
        return Some("the package pvsched is installed; the test installs and purges it".into());
    }
    let dkms = Command::new("dkms")
        .args(["status", "-m", "pvsched-guest"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if !dkms.is_empty() {
        return Some(format!(
            "DKMS has pvsched-guest ({dkms}); the test installs and removes it"
        ));
    }
    if std::net::TcpListener::bind(DAEMON_ADDR).is_err() {
        return Some(format!("{DAEMON_ADDR} is in use (a daemon runs?)"));
    }
    None
}

/// The installed package: purged on drop (configuration included).
struct Package;

impl Drop for Package {
    fn drop(&mut self) {
        let out = Command::new("apt-get")
            .args(["purge", "-y", "-q", "pvsched"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("apt-get purge pvsched failed: {out:?}");
        }
    }
}

/// The daemon the guide started: stopped with SIGTERM on drop (SIGKILL 10 s later).
struct Daemon {
    pid: u32,
}

impl Daemon {
    /// The process running `/usr/bin/pvsched hostd`. (Only that one becomes a `Daemon`:
    /// dropping one stops its process.)
    fn find() -> Option<Daemon> {
        Self::find_pid().map(|pid| Daemon { pid })
    }

    fn find_pid() -> Option<u32> {
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let argv: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
                (exe == Path::new("/usr/bin/pvsched") && argv.get(1) == Some(&&b"hostd"[..]))
                    .then_some(pid)
            })
    }

    fn running(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'))
        })
    }

    /// SIGTERM, then waits for it to go; whether it went within 10 s.
    fn stop(&self) -> bool {
        signal(self.pid, "TERM");
        let start = Instant::now();
        while self.running() {
            if start.elapsed() > Duration::from_secs(10) {
                signal(self.pid, "KILL");
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.running() {
            self.stop();
        }
    }
}

/// The module DKMS installed for the guest's kernel: on drop `make dkms-remove`, then
/// what was not there before: the files depmod wrote in the host's `/lib/modules/RELEASE`
/// and the signing key DKMS makes at its first build.
struct DkmsInstall {
    source: PathBuf,
    env: Vec<(&'static str, String)>,
    modules: PathBuf,
    before: Vec<PathBuf>,
    had_signing_key: bool,
}

const DKMS_SIGNING_KEY: [&str; 2] = ["/var/lib/dkms/mok.key", "/var/lib/dkms/mok.pub"];

impl DkmsInstall {
    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        entries
    }
}

impl Drop for DkmsInstall {
    fn drop(&mut self) {
        let out = Command::new("make")
            .arg("-C")
            .arg(&self.source)
            .arg("dkms-remove")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("make dkms-remove failed: {out:?}");
        }
        for path in Self::entries(&self.modules) {
            if self.before.contains(&path) {
                continue;
            }
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with("modules.") {
                let _ = std::fs::remove_file(&path);
            } else if name == "updates" {
                // Empty once DKMS removed its module: rmdir leaves anything else.
                let _ = std::fs::remove_dir(path.join("dkms"));
                let _ = std::fs::remove_dir(&path);
            }
        }
        if !self.had_signing_key {
            for key in DKMS_SIGNING_KEY {
                let _ = std::fs::remove_file(key);
            }
        }
    }
}

/// The daemon's attached VM named `name`: its name as the pane shows it (16 characters)
/// and its vCPU thread ids.
fn attached_vm(addr: std::net::SocketAddr, name: &str) -> Option<(String, Vec<i32>)> {
    let body = pvsched_host::daemon::fetch_stats(addr, "/status").ok()?;
    let status: pvsched_host::DaemonStatus = serde_json::from_str(&body).ok()?;
    let vm = status.vms.iter().find(|v| v.attached && v.name == name)?;
    let tids: Vec<i32> = vm.vcpus.iter().filter_map(|c| c.tid).collect();
    (tids.len() == 2).then(|| (vm.name.chars().take(16).collect(), tids))
}

#[test]
fn the_libvirt_host_guide_runs_as_written() {
    require!(Needs::Tmux);
    if let Some(why) = host_not_ready() {
        pvsched_lab::testing::skip("libvirt_guide", &why);
        return;
    }
    let Some(assets) = pvsched_lab::testing::assets_or_skip("libvirt_guide", true) else {
        return;
    };
    let release = assets.kernel_release.clone();
    if !Path::new(&format!("/lib/modules/{release}/build")).exists() {
        pvsched_lab::testing::skip(
            "libvirt_guide",
            &format!("no /lib/modules/{release}/build (linux-headers-{release})"),
        );
        return;
    }

    // The guide's blocks, and its promise of six steps.
    let blocks = sh_blocks(GUIDE);
    let tags: Vec<&str> = blocks.iter().map(|b| b.tag.as_str()).collect();
    assert_eq!(
        tags,
        [
            "",
            "systemd",
            "without-systemd",
            "",
            "",
            "guest-install",
            "guest-load",
            "top"
        ],
        "the guide's sh blocks changed: update this test with it"
    );
    let steps = GUIDE
        .lines()
        .filter(|l| {
            l.strip_prefix("## ")
                .and_then(|h| h.split_once('.'))
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
        })
        .count();
    assert_eq!(steps, 6, "the guide promises six numbered steps");
    let block = |tag: &str, nth: usize| {
        blocks
            .iter()
            .filter(|b| b.tag == tag)
            .nth(nth)
            .unwrap_or_else(|| panic!("no block {tag:?} #{nth}"))
    };

    let _libvirt_host = match LibvirtHost::ensure() {
        Ok(host) => host,
        Err(why) => {
            pvsched_lab::testing::skip("libvirt_guide", &why);
            return;
        }
    };
    // Under /tmp, which libvirt-qemu may traverse: libvirt hands the kernel and initrd
    // to QEMU as that user.
    let work = std::env::temp_dir().join(format!("pvsched-guide-{}", unique_tag()));
    std::fs::create_dir_all(&work).unwrap();
    let domain_name = format!("pvguide-{}", std::process::id());
    let env = vec![("DOMAIN", domain_name.clone())];
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");

    // 1. The package, built from this test's binary, installed by the guide's block.
    let deb_dir = work.join("deb");
    let built = Command::new(workspace.join("scripts/build-deb"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_pvsched"))
        .arg("--out")
        .arg(&deb_dir)
        .output()
        .expect("scripts/build-deb");
    assert!(
        built.status.success(),
        "scripts/build-deb: {}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let apt_config = work.join("apt.conf");
    std::fs::write(&apt_config, "APT::Get::Assume-Yes \"true\";\n").unwrap();
    let mut apt_env = env.clone();
    apt_env.push(("APT_CONFIG", apt_config.display().to_string()));
    apt_env.push(("DEBIAN_FRONTEND", "noninteractive".into()));
    // The purge guard first: a failed install may have left the package half there.
    let _package = Package;
    run_block(block("", 0), &deb_dir, &apt_env);
    assert!(
        Path::new("/usr/bin/pvsched").exists(),
        "no /usr/bin/pvsched"
    );

    // 2. The daemon.
    let systemd = Path::new("/run/systemd/system").is_dir();
    run_block(
        block(
            if systemd {
                "systemd"
            } else {
                "without-systemd"
            },
            0,
        ),
        &work,
        &env,
    );
    let addr: std::net::SocketAddr = DAEMON_ADDR.parse().unwrap();
    let daemon_log = || std::fs::read_to_string("/var/log/pvsched-hostd.log").unwrap_or_default();
    let mut daemon = None;
    common::wait_for("the installed daemon's status endpoint", || {
        daemon = daemon.take().or_else(Daemon::find);
        daemon.is_some() && pvsched_host::daemon::fetch_stats(addr, "/status").is_ok()
    });
    let daemon = daemon.unwrap();

    // 5, first half: DKMS builds and installs the module for the guest's kernel.
    let guest_home = work.join("guest-root");
    let kmod_copy = guest_home.join("pvsched-kmod");
    std::fs::create_dir_all(&kmod_copy).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(workspace.join("guest/kmod/."))
        .arg(&kmod_copy)
        .status()
        .unwrap();
    assert!(copied.success(), "cp guest/kmod");
    let shim = work.join("shim");
    std::fs::create_dir_all(&shim).unwrap();
    let uname = shim.join("uname");
    std::fs::write(
        &uname,
        format!(
            "#!/bin/sh\n# The guest's kernel, for the guest's commands run on the host.\n\
             if [ \"$1\" = -r ]; then echo {release}; else exec /bin/uname \"$@\"; fi\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&uname, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut guest_env = apt_env.clone();
    guest_env.push((
        "PATH",
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            shim.display()
        ),
    ));
    let modules = PathBuf::from(format!("/lib/modules/{release}"));
    let dkms = DkmsInstall {
        source: kmod_copy.clone(),
        env: guest_env.clone(),
        before: DkmsInstall::entries(&modules),
        modules: modules.clone(),
        had_signing_key: Path::new(DKMS_SIGNING_KEY[0]).exists(),
    };
    run_block(block("guest-install", 0), &guest_home, &guest_env);
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for dir in [modules.clone(), modules.join("updates/dkms")] {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_file()
                && (name.starts_with("modules.") || name.starts_with("pvsched_guest.ko"))
            {
                files.push((entry.path(), entry.path().display().to_string()));
            }
        }
    }
    assert!(
        files
            .iter()
            .any(|(p, _)| p.starts_with(modules.join("updates/dkms"))),
        "DKMS installed no module in {}/updates/dkms",
        modules.display()
    );

    // The guest: the guide's guest-load, then RT tasks waking on both vCPUs.
    let initrd = work.join("initrd.cpio");
    Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.chrt.clone()],
            module: None,
            kernel_modules: Vec::new(),
            files,
            module_params: String::new(),
            workload: Workload::Idle { duration_s: 1 },
            diagnostics: vec![
                // What a Debian guest has.
                "mkdir -p /etc/modules-load.d".into(),
                format!(
                    "if (set -e\n{}); then echo guide-guest-load-ok; else echo guide-guest-load-failed; fi",
                    block("guest-load", 0).body
                ),
                "dmesg | grep pvsched_guest".into(),
                common::two_rt_loops(1000),
            ],
            control: InitControl {
                wait_for_go: false,
                hold_after_done: true,
            },
        },
        &initrd,
    )
    .expect("build initramfs");
    let kernel = work.join("vmlinuz");
    std::fs::copy(&assets.kernel_image, &kernel).unwrap();
    let console = work.join("console.log");
    let xml = work.join("domain.xml");
    std::fs::write(
        &xml,
        domain_xml(&domain_name, &kernel, &initrd, &console, ""),
    )
    .unwrap();
    let mut domain = Domain::new(&domain_name, true);
    virsh_ok(&["define", xml.to_str().unwrap()]);

    // 3 and 4: the shared page, and the start.
    run_block(block("", 1), &work, &env);
    run_block(block("", 2), &work, &env);
    let qemu = qemu_pid(&domain_name);
    let budget = domain
        .rt_budget
        .insert(RtBudget::grant(qemu))
        .written
        .clone();

    // 6. The installed `pvsched top` in a tmux pane, read while the guest's RT tasks run.
    let tmux = Arc::new(Tmux::new());
    tmux.start(&format!("{}; sleep 60", block("top", 0).body.trim()));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = Arc::clone(&done);
        let tmux = Arc::clone(&tmux);
        let name = domain_name.clone();
        std::thread::spawn(move || {
            let mut first: Option<(String, u64)> = None;
            let (mut rt_samples, mut samples) = (0u32, 0u32);
            let mut panes = None;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                for tid in vcpu_threads(qemu) {
                    samples += 1;
                    if matches!(thread_policy(qemu, tid), Some(1 | 2)) {
                        rt_samples += 1;
                    }
                }
                if panes.is_some() {
                    continue;
                }
                let Some((vm, tids)) = attached_vm(addr, &name) else {
                    continue;
                };
                let pane = tmux.capture();
                let rows: Vec<PaneRow> = tids
                    .iter()
                    .filter_map(|&t| pane_row(&pane, &vm, t))
                    .collect();
                if rows.len() != tids.len() || rows.iter().all(|r| r.guest == "n/a") {
                    continue;
                }
                let total: u64 = rows.iter().map(|r| r.boosts).sum();
                match &first {
                    None if total > 0 => first = Some((pane, total)),
                    Some((first_pane, before)) if total > *before => {
                        tmux.run(&["send-keys", "-t", "top", "q"]);
                        panes = Some((first_pane.clone(), pane, *before, total));
                    }
                    _ => {}
                }
            }
            (panes, rt_samples, samples)
        })
    };
    let started = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains(MARKER_DONE)
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the guest did not finish; console:\n{}\n--- daemon log ---\n{}",
            std::fs::read_to_string(&console).unwrap_or_default(),
            daemon_log()
        );
        assert!(daemon.running(), "the daemon exited:\n{}", daemon_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    done.store(true, Ordering::Relaxed);
    let (panes, rt_samples, samples) = reader.join().unwrap();
    let guest_output = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!(
        "domain {domain_name}, QEMU pid {qemu}; vCPU threads RT in {rt_samples} of {samples} samples; RT budgets {budget:?}\n--- console ---\n{guest_output}\n--- daemon log ---\n{}",
        daemon_log()
    );
    assert!(
        guest_output.contains("guide-guest-load-ok"),
        "the guide's guest-load failed in the guest:\n{guest_output}"
    );
    assert!(
        guest_output.contains("rt-loop-0-ok") && guest_output.contains("rt-loop-1-ok"),
        "{guest_output}"
    );
    let (first, second, before, after) = panes.unwrap_or_else(|| {
        panic!(
            "pvsched top never showed the domain's vCPUs with guest data and boosts moving; the pane:\n{}\n--- daemon log ---\n{}",
            tmux.capture(),
            daemon_log()
        )
    });
    eprintln!(
        "pane, first read:\n{first}\npane, second read:\n{second}\nboosts of the domain's vCPUs {before} -> {after}"
    );
    assert!(
        rt_samples > 0,
        "no vCPU thread was seen RT in /proc in {samples} samples"
    );

    // Undone: the domain goes, the daemon stops and restores (its state file goes),
    // DKMS's module goes from the host.
    drop(domain);
    assert!(daemon.stop(), "the daemon did not stop on SIGTERM");
    assert!(
        !Path::new(STATE_FILE).exists(),
        "{STATE_FILE} left behind:\n{}",
        daemon_log()
    );
    let _ = std::fs::remove_file("/var/log/pvsched-hostd.log");
    drop(dkms);
    common::remove_unless_panicking(&work);
}
