//! Faults the daemon loop must survive: a shared file truncated or replaced
//! under a running loop, and a second daemon on the same host. Real threads
//! and real shared files; the truncation test uses the real scheduler and
//! reads the boosted thread's policy back from /proc (root only).

mod common;

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pvsched_host::daemon::{run, HostLock};
use pvsched_host::{
    Daemon, DaemonError, DaemonOptions, FakeClock, HostFs, MonotonicClock, RealScheduler,
    SchedAttrs, ThreadScheduler, VmUpdate,
};

const MS: u64 = 1_000_000;
const SCHED_RR: u32 = 2;

/// Polls `f` until it holds, for at most 10 s.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn policy_in_proc(tid: i32) -> u32 {
    let fs = HostFs::default();
    fs.task_stat(std::process::id() as i32, tid).unwrap().policy
}

#[test]
fn a_truncated_shared_file_drops_the_vm_restores_its_thread_and_the_loop_lives_on() {
    if !root_or_skip("the truncation test") {
        return;
    }
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let tid = vcpus.tids[0];
    let before = RealScheduler.get_attrs(tid).unwrap();
    let before_policy = policy_in_proc(tid);
    let mut d = Daemon::new(
        config(state.path()),
        Box::new(RealScheduler),
        Box::new(MonotonicClock),
        DaemonOptions::default(),
    )
    .unwrap();
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    {
        let file = shm.attached_guest();
        ask(&file, 0, true, 1);
    }

    // The daemon loop, as `run` drives it, on its own thread.
    let stop = Arc::new(AtomicBool::new(false));
    let ticks = Arc::new(AtomicU64::new(0));
    let (s, t) = (Arc::clone(&stop), Arc::clone(&ticks));
    let daemon_loop = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            d.tick();
            t.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_micros(200));
        }
        d
    });
    assert!(
        eventually(|| policy_in_proc(tid) == SCHED_RR),
        "the vCPU was never boosted"
    );

    // Truncate the file under the running loop: its next access faults.
    File::options()
        .write(true)
        .open(&shm.path)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert!(
        eventually(|| policy_in_proc(tid) == before_policy),
        "the boosted thread stayed RT after its shared file was truncated"
    );
    let after_drop = ticks.load(Ordering::Relaxed);
    assert!(
        eventually(|| ticks.load(Ordering::Relaxed) > after_drop + 20),
        "the loop stopped"
    );
    stop.store(true, Ordering::Relaxed);
    let d = daemon_loop.join().expect("the loop thread panicked");

    assert!(d.attached().is_empty());
    assert_eq!(RealScheduler.get_attrs(tid).unwrap(), before);
    let status = d.status();
    assert_eq!(status.shared_file_drops, 1);
    let why = status.vms[0].last_error.as_deref().unwrap_or("");
    assert!(why.contains("truncated"), "{why}");
    // No record is left for the restored thread.
    assert!(d.wait_state_durable(Duration::from_secs(10)));
    assert!(!state.path().join("hostd.state").exists());
}

#[test]
fn a_replaced_or_shrunk_shared_file_is_detected_on_the_slow_tick() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let replaced = ShmFile::new(4096);
    let shrunk = ShmFile::new(8192);
    let state = tempfile::tempdir().unwrap();
    let original = SchedAttrs {
        nice: 1,
        ..Default::default()
    };
    let fake = fake_scheduler(&vcpus.tids, original);
    let clock = FakeClock::new(1_000 * MS);
    let cfg = config(state.path());
    let slow_ns = cfg.daemon.host_info_ms * MS + 1;
    let mut d = fake_daemon(cfg, &fake, &clock);
    d.handle(VmUpdate::Up(own_spec(
        "a",
        &replaced.path,
        &vcpus.tids[..1],
    )));
    vm_up(&mut d, "b", &shrunk.path, &vcpus.tids[1..]);
    for shm in [&replaced, &shrunk] {
        let file = shm.attached_guest();
        ask(&file, 0, true, 1);
    }
    d.tick();
    let mut rt = fake.rt_threads();
    rt.sort_unstable();
    let mut both = vcpus.tids.clone();
    both.sort_unstable();
    assert_eq!(rt, both);

    // "a": another file renamed over the path; "b": shrunk within its
    // first page (no access faults, the mapping is longer than the file).
    let other = replaced.path.with_extension("other");
    File::create(&other).unwrap().set_len(4096).unwrap();
    std::fs::rename(&other, &replaced.path).unwrap();
    File::options()
        .write(true)
        .open(&shrunk.path)
        .unwrap()
        .set_len(2048)
        .unwrap();
    // Between slow ticks nothing is checked but the fault flag.
    clock.advance(MS);
    d.tick();
    assert_eq!(d.attached().len(), 2);
    clock.advance(slow_ns);
    d.tick();
    assert!(d.attached().is_empty(), "{:?}", d.attached());
    assert!(fake.rt_threads().is_empty());
    for &t in &vcpus.tids {
        assert_eq!(fake.attrs(t), Some(original));
    }
    let status = d.status();
    assert_eq!(status.shared_file_drops, 2);
    let error = |name: &str| {
        status
            .vms
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.last_error.clone())
            .unwrap_or_default()
    };
    assert!(error("a").contains("replaced"), "{}", error("a"));
    assert!(
        error("b").contains("truncated to 2048 bytes"),
        "{}",
        error("b")
    );
    // The refresher reports the same QEMU process again: the file at the
    // path is not the one it maps, so the VM stays dropped.
    let spec_a = own_spec("a", &replaced.path, &vcpus.tids[..1]);
    d.handle(VmUpdate::Up(spec_a.clone()));
    assert!(d.attached().is_empty());
    assert!(d.status().vms[0]
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("replaced"));
    // A spec claiming another process behind the same pid (a start time
    // that is not the process's) is refused by the identity check, not
    // attached to the replaced file.
    d.handle(VmUpdate::Up(pvsched_host::VmSpec {
        pid_starttime: spec_a.pid_starttime + 1,
        ..spec_a
    }));
    assert!(d.attached().is_empty());
}

#[test]
fn a_second_daemon_exits_with_the_lock_file_and_the_holder_pid() {
    let vcpus = FakeVcpus::spawn(1, &[]);
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(state.path());
    // The loop must not raise the test thread to SCHED_FIFO.
    cfg.daemon.loop_rt_prio = Some(0);
    let lock_path = HostLock::path_for(&cfg.daemon.state_file);
    let first = HostLock::acquire(&cfg.daemon.state_file).unwrap();
    assert_eq!(first.path(), lock_path);
    assert_eq!(
        std::fs::read_to_string(&lock_path).unwrap().trim(),
        std::process::id().to_string()
    );

    // A state file the running daemon owns: the second must not touch it.
    let tid = vcpus.tids[0];
    let fs = HostFs::default();
    let pid = std::process::id() as i32;
    let current = RealScheduler.get_attrs(tid).unwrap();
    let recorded = SchedAttrs { nice: 5, ..current };
    pvsched_host::actuator::write_state_file(
        &cfg.daemon.state_file,
        &pvsched_host::StateFile {
            version: 2,
            daemon_pid: std::process::id(),
            threads: vec![pvsched_host::StateRecord {
                vm: "vm".into(),
                thread: pvsched_host::ThreadRef {
                    pid,
                    tid,
                    starttime: fs.task_stat(pid, tid).unwrap().starttime,
                },
                original: recorded,
                original_affinity: None,
            }],
        },
    )
    .unwrap();

    let stop = Arc::new(AtomicBool::new(true));
    let err = run(cfg.clone(), Arc::clone(&stop)).unwrap_err();
    match &err {
        DaemonError::AlreadyRunning { lock, holder } => {
            assert_eq!(lock, &lock_path);
            assert_eq!(*holder, Some(std::process::id()));
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&lock_path.display().to_string()), "{text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    assert_eq!(RealScheduler.get_attrs(tid).unwrap(), current);
    assert!(cfg.daemon.state_file.exists());
    assert!(matches!(
        HostLock::acquire(&cfg.daemon.state_file),
        Err(DaemonError::AlreadyRunning { .. })
    ));

    // Once the first is gone, a daemon starts, reconciles and stops.
    drop(first);
    run(cfg.clone(), stop).unwrap();
    assert_eq!(RealScheduler.get_attrs(tid).unwrap(), recorded);
    assert!(!cfg.daemon.state_file.exists());
    let _ = RealScheduler.set_attrs(tid, &current);
    // The lock was released on the way out.
    HostLock::acquire(&cfg.daemon.state_file).unwrap();
}

#[test]
fn a_first_boost_waits_for_its_record_on_disk_while_the_loop_runs_on() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path());
    // The writer's temp file cannot be created while a directory has its
    // name: every write fails (and is retried) until it is removed.
    let blocker = cfg
        .daemon
        .state_file
        .with_extension(format!("tmp.{}", std::process::id()));
    std::fs::create_dir(&blocker).unwrap();
    let original = SchedAttrs {
        nice: 2,
        ..Default::default()
    };
    let fake = fake_scheduler(&vcpus.tids, original);
    let clock = FakeClock::new(1_000 * MS);
    let mut d = fake_daemon(cfg.clone(), &fake, &clock);
    d.handle(VmUpdate::Up(own_spec("vm", &shm.path, &vcpus.tids)));
    let file = shm.attached_guest();
    ask(&file, 0, true, 1);
    // The clock stands still: the engine keeps its decision, the loop keeps
    // iterating, and the boost stays deferred while the record is not on disk.
    assert!(eventually(|| {
        d.tick();
        d.status().state_write_errors > 0
    }));
    for _ in 0..50 {
        d.tick();
    }
    assert!(
        fake.rt_threads().is_empty(),
        "boosted before the record was durable"
    );
    assert!(fake.calls().is_empty());
    let status = d.status();
    assert!(!status.state_durable);
    assert_eq!(status.deferred_applies, 1);
    assert_eq!(status.vms[0].counters.apply_errors, 0);
    assert!(!cfg.daemon.state_file.exists());

    std::fs::remove_dir(&blocker).unwrap();
    assert!(
        eventually(|| {
            d.tick();
            fake.rt_threads() == vec![vcpus.tids[0]]
        }),
        "the deferred boost was never applied"
    );
    let rec = pvsched_host::actuator::read_state_file(&cfg.daemon.state_file)
        .unwrap()
        .unwrap();
    assert!(rec
        .threads
        .iter()
        .any(|r| r.thread.tid == vcpus.tids[0] && r.original == original));
    d.shutdown().unwrap();
    assert_eq!(fake.attrs(vcpus.tids[0]), Some(original));
}
