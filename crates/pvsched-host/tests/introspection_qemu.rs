//! Introspection and KVM's statistics against a real QEMU on this host (no
//! guest kernel: the vCPUs stop at reset with `-S`, or run the BIOS).
//!
//! - The daemon's GPA translation agrees with QEMU's own view on both sides
//!   of q35's 4 GiB hole (a 3 GiB guest: RAM below 2 GiB, the rest from
//!   4 GiB): values QEMU's loader device wrote at reset are read through the
//!   daemon's read-only mapping, and values this test writes at the offsets
//!   the daemon computes are what HMP `xp` shows at those GPAs.
//! - The daemon, named the VM in its configuration, learns the layout over
//!   QMP, maps the guest's RAM, advertises the CPU-info table, and once this
//!   test (as the guest module) publishes where each CPU's preempt count
//!   is, reports the counts in its status, and again after the guest
//!   re-attaches with another table.
//! - `query-stats`: on a KVM guest (`-accel kvm`) the refresher reads each
//!   vCPU's statistics, named by cpu-index, and sees the halted AP halt; a
//!   TCG guest is not asked, and what it answers when asked is handled.
//!
//! Needs root, qemu-system-x86_64 and (for the KVM test) /dev/kvm; with
//! `CI=true` a missing prerequisite fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_abi::{preempt_disabled_bits, CpuInfoTable};
use pvsched_host::config::VmConfig;
use pvsched_host::discovery::parse_qemu_cmdline;
use pvsched_host::guestram::{parse_vma, GuestRam, RamLayout, RamQuery};
use pvsched_host::qmp::{QmpClient, QmpError};
use pvsched_host::{
    Daemon, DaemonOptions, FakeClock, FakeScheduler, HostConfig, HostFs, Refresher, VmStatus,
    VmUpdate,
};

const QEMU: &str = "qemu-system-x86_64";
const MS: u64 = 1_000_000;
/// Values QEMU's loader device writes at reset, below 2 GiB and above 4 GiB.
const LOW: (u64, u32) = (0x7ff0_0000, 0x1122_3344);
const HIGH: (u64, u32) = (0x1_0000_1000, 0xa5a5_beef);

fn prerequisites(what: &str, kvm: bool) -> bool {
    if !common::root_or_skip(what) {
        return false;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let qemu = Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let kvm_ok = !kvm
        || std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    let missing = match (qemu, kvm_ok) {
        (false, _) => Some(QEMU),
        (_, false) => Some("/dev/kvm"),
        _ => None,
    };
    if let Some(m) = missing {
        assert!(!ci, "{what} needs {m} under CI=true");
        eprintln!("SKIPPED: {what} needs {m}");
        return false;
    }
    true
}

/// A QEMU process, killed on drop, with its QMP socket and (optionally) a
/// pvsched shared file in a directory of its own under /dev/shm.
struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
}

impl Qemu {
    /// Starts QEMU with `extra` arguments, stopped at reset (`-S`) or
    /// running, with a pvsched channel (ivshmem-plain on a shared file in
    /// its directory) when `channel`.
    fn start(accel: &str, stopped: bool, extra: &[String], channel: bool) -> Qemu {
        let dir = tempfile::Builder::new()
            .prefix("pvsched-intro-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let shm = dir.path().join("pvsched-intro");
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", accel, "-nodefaults", "-display", "none"])
            .args(["-name", "intro,debug-threads=on"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("qemu.log")).unwrap(),
            ));
        if channel {
            cmd.args(pvsched_channel_args(&shm));
        }
        if stopped {
            cmd.arg("-S");
        }
        let child = cmd.spawn().unwrap();
        let q = Qemu { child, dir };
        let start = Instant::now();
        while !q.qmp().exists() || (channel && !q.shm().exists()) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "QEMU did not start: {}",
                std::fs::read_to_string(q.dir.path().join("qemu.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn qmp(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    fn shm(&self) -> PathBuf {
        self.dir.path().join("pvsched-intro")
    }

    fn client(&self) -> QmpClient {
        QmpClient::connect(&self.qmp(), Duration::from_secs(10)).unwrap()
    }

    fn starttime(&self) -> u64 {
        HostFs::default()
            .task_stat(self.pid(), self.pid())
            .unwrap()
            .starttime
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// q35 with 3 GiB of shared memfd RAM and the two loader values.
fn q35_3g_args() -> Vec<String> {
    let mut a: Vec<String> = [
        "-machine",
        "q35,memory-backend=ram",
        "-object",
        "memory-backend-memfd,id=ram,size=3G,share=on",
    ]
    .map(String::from)
    .to_vec();
    for (gpa, value) in [LOW, HIGH] {
        a.push("-device".into());
        a.push(format!("loader,addr={gpa:#x},data={value:#x},data-len=4"));
    }
    a
}

fn pvsched_channel_args(shm: &Path) -> Vec<String> {
    vec![
        "-object".into(),
        format!(
            "memory-backend-file,id=pvsched,mem-path={},size=1M,share=on",
            shm.display()
        ),
        "-device".into(),
        "ivshmem-plain,memdev=pvsched".into(),
    ]
}

/// What HMP `xp /1wx <gpa>` prints: `<gpa as 16 hex digits>: 0x<value>`.
fn xp(client: &mut QmpClient, gpa: u64) -> u32 {
    let out = client
        .human_monitor_command(&format!("xp /1wx {gpa:#x}"))
        .unwrap();
    let (addr, value) = out.trim().split_once(": 0x").unwrap();
    assert_eq!(u64::from_str_radix(addr, 16).unwrap(), gpa, "{out}");
    u32::from_str_radix(value.trim(), 16).unwrap()
}

#[test]
fn the_daemons_translation_matches_qemus_view_on_both_sides_of_the_4g_hole() {
    if !prerequisites("introspection against QEMU", false) {
        return;
    }
    let qemu = Qemu::start("tcg", true, &q35_3g_args(), false);
    let fs = HostFs::default();
    let parsed = parse_qemu_cmdline(&fs.cmdline(qemu.pid()).unwrap()).unwrap();
    let backends: Vec<_> = parsed.guest_ram_backends().into_iter().cloned().collect();
    assert_eq!(backends.len(), 1);
    assert_eq!(backends[0].size, Some(3 << 30));
    let mut client = qemu.client();
    let reply = client.query_ram(&["ram".into()]).unwrap().unwrap();
    let layout = RamLayout::build(&backends, &reply.ranges, &reply.hvas).unwrap();
    // RAM up to 2 GiB (without the legacy VGA/BIOS window) and from 4 GiB.
    let spans: Vec<(u64, u64, u64)> = layout
        .ranges
        .iter()
        .map(|r| (r.gpa, r.gpa + r.len, r.offset))
        .collect();
    assert_eq!(
        spans,
        vec![
            (0, 0xc0000, 0),
            (0x10_0000, 0x8000_0000, 0x10_0000),
            (0x1_0000_0000, 0x1_4000_0000, 0x8000_0000),
        ]
    );
    let ram = GuestRam::map(&fs, qemu.pid(), qemu.starttime(), layout.clone(), 1).unwrap();

    // QEMU wrote these (its loader device, at reset); the daemon reads them.
    for (gpa, value) in [LOW, HIGH] {
        assert_eq!(ram.read_u32(gpa), Some(value), "{gpa:#x}");
        assert_eq!(xp(&mut client, gpa), value, "{gpa:#x}");
    }

    // The other direction: this test writes through a writable mapping of
    // its own at the offsets the daemon's translation gives; QEMU reads
    // them at the guest-physical addresses.
    let base = layout.backends[0].hva;
    let vma = std::fs::read_to_string(format!("/proc/{}/maps", qemu.pid()))
        .unwrap()
        .lines()
        .filter_map(parse_vma)
        .find(|v| v.start == base)
        .unwrap();
    let writable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!(
            "/proc/{}/map_files/{:x}-{:x}",
            qemu.pid(),
            vma.start,
            vma.end
        ))
        .unwrap();
    let writer = SharedFile::from_file(writable).unwrap();
    for (gpa, value) in [
        (0x1000u64, 0x0bad_f00du32),
        (0x7fff_fffc, 0x1234_5678),
        (0x1_0000_0000, 0xcafe_0001),
        (0x1_3fff_fffc, 0x5eed_5eed),
    ] {
        let (backend, offset) = layout.translate(gpa, 4).unwrap();
        assert_eq!(backend, 0);
        writer
            .region()
            .store_u32(offset as usize, value, Ordering::Relaxed)
            .unwrap();
        assert_eq!(xp(&mut client, gpa), value, "QEMU's view of {gpa:#x}");
        assert_eq!(
            ram.read_u32(gpa),
            Some(value),
            "the daemon's view of {gpa:#x}"
        );
    }
    // In the hole there is no RAM of the backend, for QEMU as for the
    // daemon: nothing at all, or the BIOS's own ROM below 4 GiB.
    for (gpa, qemu_says) in [
        (0x8000_0000u64, "No memory is mapped"),
        (0xc000_0000, "No memory is mapped"),
        (0xffff_fff0, "(pc.bios)"),
        (0x1_4000_0000, "No memory is mapped"),
    ] {
        assert_eq!(layout.translate(gpa, 4), None, "{gpa:#x}");
        let hva = client
            .human_monitor_command(&format!("gpa2hva {gpa:#x}"))
            .unwrap();
        assert!(hva.contains(qemu_says), "{gpa:#x}: {hva}");
    }
}

/// A configuration naming the QEMU of `qemu` (no discovery).
fn config_for(qemu: &Qemu, state: &Path, name: &str) -> HostConfig {
    let mut cfg = common::config(state);
    cfg.vm.push(VmConfig {
        name: name.into(),
        qmp: qemu.qmp(),
        shm: qemu.shm(),
        boost_cpus: None,
        iothread_cpus: None,
        iothread_priority: None,
        iothread_boost: None,
        user: None,
        realtime: false,
        isolate_cpus: None,
    });
    cfg
}

fn daemon(cfg: HostConfig, clock: &FakeClock) -> Daemon {
    Daemon::new(
        cfg,
        Box::new(FakeScheduler::permissive()),
        Box::new(clock.clone()),
        DaemonOptions::default(),
    )
    .unwrap()
}

fn vm_status(d: &Daemon, name: &str) -> VmStatus {
    d.status().vms.into_iter().find(|v| v.name == name).unwrap()
}

/// What the guest module writes once attached: its header line and, per
/// CPU, the guest-physical address of its preempt count.
fn publish_cpu_info(file: &SharedFile, generation: u32, gpas: &[u64]) {
    let region = file.region();
    let header = region.read_header().unwrap();
    let table = CpuInfoTable::from_header(&header.host, region.len()).expect("table advertised");
    for (cpu, &gpa) in gpas.iter().enumerate() {
        let off = table.entry_offset(cpu as u32).unwrap();
        region.store_u64(off, gpa, Ordering::Relaxed).unwrap();
        region
            .store_u32(off + 8, cpu as u32, Ordering::Relaxed)
            .unwrap();
        region.store_u32(off + 12, 0, Ordering::Relaxed).unwrap();
    }
    region
        .write_header_guest(&PvschedHeaderGuest {
            guest_version_major: PVSCHED_VERSION_MAJOR,
            guest_version_minor: PVSCHED_VERSION_MINOR,
            guest_nr_cpus: gpas.len() as u32,
            guest_features: PVSCHED_FEAT_KNOWN,
            guest_heartbeat: 1,
            guest_generation: generation,
            guest_state: PVSCHED_GUEST_ATTACHED,
            ..Default::default()
        })
        .unwrap();
}

/// Ticks through two host-information periods.
fn ticks(d: &mut Daemon, clock: &FakeClock) {
    for _ in 0..3 {
        d.tick();
        clock.advance(150 * MS);
    }
}

#[test]
fn the_daemon_maps_a_named_vms_ram_and_reports_the_preempt_counts_its_guest_publishes() {
    if !prerequisites("introspection by the daemon", false) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let mut args = vec!["-smp".to_owned(), "2".to_owned()];
    args.extend(q35_3g_args());
    let qemu = Qemu::start("tcg", true, &args, true);
    let cfg = config_for(&qemu, state.path(), "intro");
    let mut refresher = Refresher::new(cfg.clone());
    let updates = refresher.poll();
    let spec = match &updates[..] {
        [VmUpdate::Up(spec)] => spec.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(spec.kvm, Some(false));
    let RamQuery::Layout(layout) = &spec.guest_ram else {
        panic!("{:?}", spec.guest_ram);
    };
    assert_eq!(layout.ranges.len(), 3);
    let clock = FakeClock::new(0);
    let mut d = daemon(cfg, &clock);
    for u in updates {
        d.handle(u);
    }
    assert_eq!(d.attached(), vec!["intro".to_owned()]);
    let file = SharedFile::open(&qemu.shm(), None).unwrap();
    let header = file.region().read_header().unwrap().host;
    assert_ne!(header.host_features & PVSCHED_FEAT_PREEMPT_COUNT_GPA, 0);
    assert!(CpuInfoTable::from_header(&header, file.len()).is_some());
    let st = vm_status(&d, "intro");
    assert_eq!(st.introspection.state, "mapped", "{:?}", st.introspection);
    assert!(st.introspection.table_advertised);
    assert_eq!(st.introspection.ranges, 3);
    assert_eq!(st.kvm.state, "not_kvm");

    // Before the guest publishes anything, nothing is read.
    ticks(&mut d, &clock);
    let st = vm_status(&d, "intro");
    assert!(st.vcpus.iter().all(|v| v.preempt_count.is_none()));
    assert_eq!(st.introspection.valid_entries, 0);

    // The guest attaches: CPU 0's count below 2 GiB, CPU 1's above 4 GiB.
    publish_cpu_info(&file, 1, &[LOW.0, HIGH.0]);
    ticks(&mut d, &clock);
    let st = vm_status(&d, "intro");
    assert!(st.guest.starts_with("agreed"), "{}", st.guest);
    assert_eq!(st.introspection.valid_entries, 2, "{:?}", st.vcpus);
    assert_eq!(st.vcpus[0].preempt_count_gpa, Some(LOW.0));
    assert_eq!(
        st.vcpus[0].preempt_count,
        Some(preempt_disabled_bits(LOW.1))
    );
    assert_eq!(
        st.vcpus[1].preempt_count,
        Some(preempt_disabled_bits(HIGH.1))
    );
    assert!(st.introspection.reads >= 2);
    let metrics = d.status().openmetrics();
    assert!(metrics.contains(&format!(
        "pvsched_guest_preempt_count{{vm=\"intro\",vcpu=\"1\"}} {}\n",
        preempt_disabled_bits(HIGH.1)
    )));

    // The guest re-attaches (a new generation) with CPU 1 in the hole and
    // CPU 0 elsewhere below 2 GiB: the table is read again.
    publish_cpu_info(&file, 2, &[0x10_0000, 0x8000_0000]);
    ticks(&mut d, &clock);
    let st = vm_status(&d, "intro");
    assert_eq!(st.vcpus[0].preempt_count_gpa, Some(0x10_0000));
    assert!(st.vcpus[0].preempt_count.is_some());
    assert_eq!(st.vcpus[1].preempt_count, None);
    assert!(st.vcpus[1]
        .cpu_info_ignored
        .as_deref()
        .unwrap()
        .contains("not inside one RAM range"));
    assert_eq!(st.introspection.valid_entries, 1);
    d.shutdown().unwrap();
}

#[test]
fn kvm_statistics_are_read_per_vcpu_on_kvm_and_not_asked_of_tcg() {
    if !prerequisites("KVM statistics", true) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    // Running (no -S): the BIOS runs on vCPU 0 while vCPU 1 halts.
    let args: Vec<String> = [
        "-machine",
        "q35,memory-backend=ram",
        "-object",
        "memory-backend-memfd,id=ram,size=1G,share=on",
        "-smp",
        "2",
    ]
    .map(String::from)
    .to_vec();
    let kvm = Qemu::start("kvm", false, &args, true);
    let tcg = Qemu::start("tcg", true, &args, true);
    let mut cfg = config_for(&kvm, state.path(), "kvm");
    cfg.vm.extend(config_for(&tcg, state.path(), "tcg").vm);
    let mut refresher = Refresher::new(cfg.clone());
    let clock = FakeClock::new(0);
    let mut d = daemon(cfg, &clock);
    for u in refresher.poll() {
        d.handle(u);
    }
    assert_eq!(d.attached(), vec!["kvm".to_owned(), "tcg".to_owned()]);
    assert_eq!(refresher.kvm_guests(), vec!["kvm".to_owned()]);
    assert_eq!(vm_status(&d, "kvm").kvm.state, "waiting");
    assert_eq!(vm_status(&d, "tcg").kvm.state, "not_kvm");
    // Guest RAM is mapped on both accelerators.
    assert_eq!(vm_status(&d, "kvm").introspection.state, "mapped");
    assert_eq!(vm_status(&d, "tcg").introspection.state, "mapped");

    let start = Instant::now();
    let st = loop {
        let updates = refresher.poll_kvm_stats();
        assert!(updates
            .iter()
            .all(|u| matches!(u, VmUpdate::KvmStats { name, .. } if name == "kvm")));
        for u in updates {
            d.handle(u);
        }
        let st = vm_status(&d, "kvm");
        let halted = st.vcpus[1]
            .kvm
            .as_ref()
            .and_then(|k| k.halt_exits)
            .is_some_and(|n| n > 0);
        if halted {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "vCPU 1 never halted: {:?}",
            st.kvm
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(st.kvm.state, "read", "{:?}", st.kvm);
    assert!(!st.kvm.vm.is_empty());
    for v in &st.vcpus {
        let k = v.kvm.as_ref().expect("statistics of every vCPU");
        assert!(
            k.values().iter().all(Option::is_some),
            "slot {}: {k:?}",
            v.slot
        );
    }
    let halt_wait = st.vcpus[1].kvm.as_ref().unwrap().halt_wait_ns;
    assert!(halt_wait.is_some_and(|ns| ns > 0), "{halt_wait:?}");
    assert!(d
        .status()
        .openmetrics()
        .contains("pvsched_kvm_halt_exits_total{vm=\"kvm\",vcpu=\"1\"}"));

    // The TCG guest was never asked; asked directly, it reports no
    // statistics (QEMU 7.2: an empty list; others: an error), handled.
    assert!(vm_status(&d, "tcg").vcpus.iter().all(|v| v.kvm.is_none()));
    match tcg.client().query_kvm_stats() {
        Ok(stats) => assert!(stats.vcpus.is_empty(), "{stats:?}"),
        Err(e) => assert!(matches!(e, QmpError::Command { .. }), "{e}"),
    }
    d.shutdown().unwrap();
}
