//! The daemon against real threads standing in for vCPUs and a real shared
//! file; the scheduler is the fake (all tests) or the real one (root only).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use pvsched_abi::raw::*;
use pvsched_abi::SeqRead;
use pvsched_host::actuator::read_state_file;
use pvsched_host::sched::FakeCall;
use pvsched_host::{
    Daemon, DaemonOptions, FakeClock, FakeScheduler, MonotonicClock, Policy, RealScheduler,
    SchedAttrs, ThreadScheduler, VmUpdate,
};

fn host_line(file: &pvsched_abi::mmap::SharedFile, slot: u32) -> PvschedHostLine {
    match file.region().read_host_line(slot).unwrap() {
        SeqRead::Consistent(l) => l,
        SeqRead::Torn(_) => panic!("host line torn"),
    }
}

#[test]
fn boosts_exactly_the_requesting_vcpu_then_unboosts_and_restores_on_shutdown() {
    let vcpus = FakeVcpus::spawn(4, &[]);
    let shm = ShmFile::new(64 * 1024);
    let state = tempfile::tempdir().unwrap();
    let original = SchedAttrs {
        nice: 2,
        ..Default::default()
    };
    let fake = fake_scheduler(&vcpus.tids, original);
    let clock = FakeClock::new(1_000 * MS);
    let mut d = fake_daemon(config(state.path()), &fake, &clock);
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    assert_eq!(d.attached(), vec!["vm".to_string()]);

    // The daemon initialised a new (all-zero) file with one slot per vCPU.
    let file = shm.map();
    let header = file.region().read_header().unwrap();
    assert_eq!(header.host.magic, PVSCHED_MAGIC);
    assert_eq!(header.host.nr_slots, 4);

    attach_guest(&file, PVSCHED_VERSION_MAJOR);
    for i in 0..4 {
        ask(&file, i, i == 2, 1);
    }
    // Every vCPU thread's original is on disk before any change (written at
    // attach, so the apply path never waits for the disk).
    let rec = read_state_file(&state.path().join("hostd.state"))
        .unwrap()
        .unwrap();
    let mut recorded: Vec<i32> = rec.threads.iter().map(|r| r.thread.tid).collect();
    recorded.sort_unstable();
    let mut expected = vcpus.tids.clone();
    expected.sort_unstable();
    assert_eq!(recorded, expected);
    assert!(rec.threads.iter().all(|r| r.original == original));
    assert!(fake.calls().is_empty());
    d.tick();
    assert_eq!(fake.rt_threads(), vec![vcpus.tids[2]]);
    let line = host_line(&file, 2);
    assert_eq!(line.boost_state, PVSCHED_BOOST_BOOSTED);
    assert_eq!(line.host_policy, PVSCHED_POLICY_RR);
    assert!(line.host_prio >= 1);
    assert_eq!(host_line(&file, 1).boost_state, PVSCHED_BOOST_NORMAL);

    // The request ends: back to the original attributes.
    clock.advance(MS);
    ask(&file, 2, false, 2);
    d.tick();
    assert!(fake.rt_threads().is_empty());
    assert_eq!(fake.attrs(vcpus.tids[2]), Some(original));
    assert_eq!(host_line(&file, 2).boost_state, PVSCHED_BOOST_NORMAL);

    let status = d.status();
    assert_eq!(status.vms[0].counters.boosts, 1);
    assert_eq!(status.apply_latency.count, 2);

    // Boost again, then shut down: every thread back, state file gone.
    clock.advance(MS);
    ask(&file, 0, true, 3);
    d.tick();
    assert_eq!(fake.rt_threads(), vec![vcpus.tids[0]]);
    d.shutdown().unwrap();
    assert!(fake.rt_threads().is_empty());
    assert_eq!(fake.attrs(vcpus.tids[0]), Some(original));
    assert!(!state.path().join("hostd.state").exists());
}

#[test]
fn a_cpu_id_that_is_not_the_slot_index_is_reported_not_guessed() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let fake = FakeScheduler::permissive();
    let clock = FakeClock::new(MS);
    let mut d = fake_daemon(config(state.path()), &fake, &clock);
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    let file = shm.attached_guest();
    // Slot 1 claims to be CPU 0 and asks for a boost.
    file.region()
        .write_guest_line(1, &request_line(0, true, 1))
        .unwrap();
    for _ in 0..5 {
        d.tick();
        clock.advance(MS);
    }
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    let vm = &d.status().vms[0];
    assert_eq!(vm.counters.cpu_id_mismatches, 1);
    assert!(vm.vcpus[1]
        .guest_ignored
        .as_deref()
        .unwrap()
        .contains("cpu_id 0"));
}

#[test]
fn a_detached_guest_or_another_major_version_is_never_acted_on() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let fake = FakeScheduler::permissive();
    let clock = FakeClock::new(MS);
    let mut d = fake_daemon(config(state.path()), &fake, &clock);
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    let file = shm.map();
    ask(&file, 0, true, 1);
    d.tick();
    assert!(fake.calls().is_empty());
    attach_guest(&file, PVSCHED_VERSION_MAJOR + 1);
    clock.advance(MS);
    d.tick();
    assert!(fake.calls().is_empty());
    let vm = &d.status().vms[0];
    assert_eq!(vm.counters.version_mismatches, 1);
    assert!(vm.guest.starts_with("refused"), "{}", vm.guest);
    // Once the guest speaks our version, the same line counts.
    attach_guest(&file, PVSCHED_VERSION_MAJOR);
    clock.advance(MS);
    d.tick();
    assert_eq!(fake.rt_threads(), vec![vcpus.tids[0]]);
}

#[test]
fn garbage_in_the_shared_page_never_crashes_and_never_boosts() {
    let seed = 0x5eed_0000_0000_0001u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    eprintln!("garbage test seed {seed:#x}");
    let mut rng = Rng(seed | 1);
    let vcpus = FakeVcpus::spawn(4, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let fake = FakeScheduler::permissive();
    let clock = FakeClock::new(MS);
    let mut d = fake_daemon(config(state.path()), &fake, &clock);
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    let file = shm.map();
    let region = file.region();
    let words = region.len() / 8;
    for round in 0..300 {
        match round % 3 {
            // Random bytes over everything, header included.
            0 => {
                for w in 0..words {
                    region
                        .store_u64(w * 8, rng.next(), Ordering::Relaxed)
                        .unwrap();
                }
            }
            // A valid attached guest header, random slot lines.
            1 => {
                attach_guest(&file, PVSCHED_VERSION_MAJOR);
                for w in 16..words {
                    region
                        .store_u64(w * 8, rng.next(), Ordering::Relaxed)
                        .unwrap();
                }
            }
            // Valid header, impossible values in otherwise sane boost requests.
            _ => {
                attach_guest(&file, PVSCHED_VERSION_MAJOR);
                for slot in 0..4u32 {
                    let mut line = request_line(slot, true, round);
                    match rng.next() % 6 {
                        0 => line.request_prio = 100 + (rng.next() % 150) as u8,
                        1 => line.task_policy = 7 + (rng.next() % 200) as u8,
                        2 => line.boost_request = 3 + (rng.next() % 200) as u8,
                        3 => line.flags |= 1 << (2 + rng.next() % 30),
                        4 => line.reserved = [1, 2, 3],
                        _ => line.irq_depth = 9 + (rng.next() % 200) as u8,
                    }
                    region.write_guest_line(slot, &line).unwrap();
                }
            }
        }
        d.tick();
        clock.advance(MS);
        assert!(
            fake.rt_threads().is_empty(),
            "round {round}: boosted {:?} (seed {seed:#x})",
            fake.rt_threads()
        );
    }
    let vm = &d.status().vms[0];
    assert!(vm.counters.invalid_writes > 0);
    assert!(vm.counters.header_repairs > 0);
    // The daemon repaired its header: the region is still usable.
    attach_guest(&file, PVSCHED_VERSION_MAJOR);
    for slot in 0..4 {
        region
            .write_guest_line(slot, &request_line(slot, slot == 3, 1_000_000))
            .unwrap();
    }
    d.tick();
    assert_eq!(fake.rt_threads(), vec![vcpus.tids[3]], "seed {seed:#x}");
}

#[test]
fn a_vcpu_that_asks_for_boost_forever_is_throttled() {
    // Real CPU time: the vCPU thread spins, so its boosted CPU time grows.
    let vcpus = FakeVcpus::spawn(2, &[0]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let fake = FakeScheduler::permissive();
    let mut cfg = config(state.path());
    cfg.policy.max_continuous_ns = 3 * MS;
    cfg.policy.min_quantum_ns = 100_000;
    cfg.policy.throttle_ns = 10_000 * MS;
    cfg.policy.max_throttle_ns = 10_000 * MS;
    let mut d = Daemon::new(
        cfg,
        Box::new(fake.clone()),
        Box::new(MonotonicClock),
        DaemonOptions::default(),
    )
    .unwrap();
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    let file = shm.attached_guest();
    ask(&file, 0, true, 1);
    let mut throttled = false;
    for _ in 0..20_000 {
        d.tick();
        if host_line(&file, 0).boost_state == PVSCHED_BOOST_THROTTLED {
            throttled = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
    assert!(
        throttled,
        "never throttled: {:?}",
        d.status().vms[0].vcpus[0]
    );
    let tid = vcpus.tids[0];
    assert!(fake.rt_threads().is_empty());
    assert!(fake
        .calls()
        .iter()
        .any(|c| matches!(c, FakeCall::SetAttrs(t, a) if *t == tid && a.policy == Policy::Rr)));
    assert_eq!(fake.attrs(tid).unwrap().policy, Policy::Normal);
    let vm = &d.status().vms[0];
    assert_eq!(vm.counters.throttles, 1);
    assert_eq!(vm.vcpus[0].state, "throttled");
    assert!(host_line(&file, 0).throttle_until_ns > 0);
}

#[test]
fn a_crashed_daemon_is_reconciled_by_the_next_one() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let fake = fake_scheduler(&vcpus.tids, SchedAttrs::default());
    let clock = FakeClock::new(MS);
    let mut d = fake_daemon(config(state.path()), &fake, &clock);
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    let file = shm.attached_guest();
    ask(&file, 1, true, 1);
    d.tick();
    assert_eq!(fake.rt_threads(), vec![vcpus.tids[1]]);
    // kill -9: no destructor runs.
    std::mem::forget(d);
    assert_eq!(fake.rt_threads(), vec![vcpus.tids[1]]);
    // The guest stops asking; the new daemon must still put the thread back.
    ask(&file, 1, false, 2);
    let d2 = fake_daemon(config(state.path()), &fake, &clock);
    assert!(fake.rt_threads().is_empty());
    assert_eq!(d2.status().reconcile.restored, vec![vcpus.tids[1]]);
}

#[test]
fn a_replaced_vcpu_thread_is_restored_and_forgotten() {
    let vcpus = FakeVcpus::spawn(3, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let fake = FakeScheduler::permissive();
    let clock = FakeClock::new(MS);
    let mut d = fake_daemon(config(state.path()), &fake, &clock);
    // Slot 1 is first the thread tids[1], then (hot-unplug + plug) tids[2].
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids[..2]);
    let file = shm.attached_guest();
    ask(&file, 1, true, 1);
    d.tick();
    assert_eq!(fake.rt_threads(), vec![vcpus.tids[1]]);
    vm_up(&mut d, "vm", &shm.path, &[vcpus.tids[0], vcpus.tids[2]]);
    assert!(fake.rt_threads().is_empty());
    clock.advance(MS);
    d.tick();
    assert_eq!(fake.rt_threads(), vec![vcpus.tids[2]]);
    // The VM goes away: its threads are restored.
    d.handle(VmUpdate::Gone {
        name: "vm".into(),
        reason: "test".into(),
    });
    assert!(fake.rt_threads().is_empty());
    assert!(d.attached().is_empty());
}

#[test]
fn a_panicking_loop_still_restores_threads() {
    let vcpus = FakeVcpus::spawn(1, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let fake = FakeScheduler::permissive();
    let clock = FakeClock::new(MS);
    let path = shm.path.clone();
    let tids = vcpus.tids.clone();
    let (f2, c2, dir) = (fake.clone(), clock.clone(), state.path().to_owned());
    let r = std::panic::catch_unwind(move || {
        let mut d = fake_daemon(config(&dir), &f2, &c2);
        vm_up(&mut d, "vm", &path, &tids);
        let file = SharedFileHolder(pvsched_abi::mmap::SharedFile::open(&path, None).unwrap());
        attach_guest(&file.0, PVSCHED_VERSION_MAJOR);
        ask(&file.0, 0, true, 1);
        d.tick();
        assert_eq!(f2.rt_threads().len(), 1);
        panic!("simulated bug in the loop");
    });
    assert!(r.is_err());
    assert!(fake.rt_threads().is_empty());
}

struct SharedFileHolder(pvsched_abi::mmap::SharedFile);

#[test]
fn real_sched_setattr_boosts_and_restores_when_root() {
    if !root_or_skip("the real scheduler test") {
        return;
    }
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(MS);
    let real = RealScheduler;
    let before: Vec<SchedAttrs> = vcpus
        .tids
        .iter()
        .map(|&t| real.get_attrs(t).unwrap())
        .collect();
    let mut d = Daemon::new(
        config(state.path()),
        Box::new(RealScheduler),
        Box::new(clock.clone()),
        DaemonOptions::default(),
    )
    .unwrap();
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    let file = shm.attached_guest();
    ask(&file, 1, true, 1);
    d.tick();
    let boosted = real.get_attrs(vcpus.tids[1]).unwrap();
    assert_eq!(boosted.policy, Policy::Rr);
    assert!(boosted.priority >= 1);
    assert_eq!(real.get_attrs(vcpus.tids[0]).unwrap(), before[0]);
    // Crash, then a new daemon reconciles with the real scheduler.
    std::mem::forget(d);
    ask(&file, 1, false, 2);
    let mut d2 = Daemon::new(
        config(state.path()),
        Box::new(RealScheduler),
        Box::new(clock.clone()),
        DaemonOptions::default(),
    )
    .unwrap();
    assert_eq!(real.get_attrs(vcpus.tids[1]).unwrap(), before[1]);
    // And a clean shutdown restores too.
    vm_up(&mut d2, "vm", &shm.path, &vcpus.tids);
    ask(&file, 0, true, 3);
    clock.advance(MS);
    d2.tick();
    assert_eq!(real.get_attrs(vcpus.tids[0]).unwrap().policy, Policy::Rr);
    d2.shutdown().unwrap();
    assert_eq!(real.get_attrs(vcpus.tids[0]).unwrap(), before[0]);
}

#[test]
fn observe_only_mode_changes_nothing() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(4096);
    let state = tempfile::tempdir().unwrap();
    let fake = FakeScheduler::permissive();
    // A daemon initialises the file first.
    let clock = FakeClock::new(MS);
    {
        let mut d = fake_daemon(config(state.path()), &fake, &clock);
        vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
        d.shutdown().unwrap();
    }
    let file = shm.attached_guest();
    ask(&file, 0, true, 1);
    let before = std::fs::read(&shm.path).unwrap();
    let mut d = Daemon::new(
        config(state.path()),
        Box::new(fake.clone()),
        Box::new(clock.clone()),
        DaemonOptions { dry_run: true },
    )
    .unwrap();
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    d.tick();
    let status = d.status();
    assert_eq!(status.vms[0].vcpus[0].state, "boosted");
    assert!(fake.calls().is_empty());
    assert_eq!(std::fs::read(&shm.path).unwrap(), before);
    assert!(!state.path().join("hostd.state").exists());
    let _ = AtomicU64::new(0);
}

#[test]
fn the_main_thread_follows_a_boosted_vcpu_and_is_restored() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let shm = ShmFile::new(64 * 1024);
    let state = tempfile::tempdir().unwrap();
    let original = SchedAttrs::default();
    let main_tid = std::process::id() as i32;
    let fake = fake_scheduler(&[vcpus.tids[0], vcpus.tids[1], main_tid], original);
    let clock = FakeClock::new(1_000 * MS);
    let mut cfg = config(state.path());
    cfg.policy.boost_interrupt_path = true;
    let mut d = fake_daemon(cfg, &fake, &clock);
    vm_up(&mut d, "vm", &shm.path, &vcpus.tids);
    let file = shm.attached_guest();
    // The main thread's original is on disk with the vCPUs'.
    let rec = read_state_file(&state.path().join("hostd.state"))
        .unwrap()
        .unwrap();
    assert!(rec.threads.iter().any(|r| r.thread.tid == main_tid));

    for i in 0..2 {
        ask(&file, i, i == 1, 1);
    }
    d.tick();
    let mut rt = fake.rt_threads();
    rt.sort_unstable();
    let mut expected = vec![vcpus.tids[1], main_tid];
    expected.sort_unstable();
    assert_eq!(rt, expected);

    clock.advance(MS);
    ask(&file, 1, false, 2);
    d.tick();
    assert!(fake.rt_threads().is_empty());
    assert_eq!(fake.attrs(main_tid), Some(original));

    clock.advance(MS);
    ask(&file, 0, true, 3);
    d.tick();
    assert!(fake.rt_threads().contains(&main_tid));
    d.shutdown().unwrap();
    assert!(fake.rt_threads().is_empty());
    assert_eq!(fake.attrs(main_tid), Some(original));
}

#[test]
fn the_realtime_vm_attached_is_the_isolation_wanted_and_none_once_it_goes() {
    let vcpus = FakeVcpus::spawn(2, &[]);
    let rt_shm = ShmFile::new(64 * 1024);
    let other_shm = ShmFile::new(64 * 1024);
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(state.path());
    for (name, shm, realtime) in [("rt", &rt_shm, true), ("other", &other_shm, false)] {
        cfg.vm.push(pvsched_host::config::VmConfig {
            name: name.into(),
            qmp: state.path().join(format!("{name}.qmp")),
            shm: shm.path.clone(),
            boost_cpus: None,
            iothread_cpus: None,
            iothread_priority: None,
            iothread_boost: None,
            user: None,
            realtime,
            isolate_cpus: realtime.then(|| "1".to_string()),
        });
    }
    let fake = fake_scheduler(&vcpus.tids, SchedAttrs::default());
    let clock = FakeClock::new(1_000 * MS);
    let mut d = fake_daemon(cfg, &fake, &clock);
    assert_eq!(d.isolation_wanted(), None);
    vm_up(&mut d, "other", &other_shm.path, &vcpus.tids[..1]);
    assert_eq!(d.isolation_wanted(), None, "a VM that is not realtime");
    vm_up(&mut d, "rt", &rt_shm.path, &vcpus.tids[1..]);
    let pid = std::process::id() as i32;
    let wanted = d.isolation_wanted().expect("the realtime VM is attached");
    assert_eq!(
        (wanted.vm.as_str(), wanted.pid, wanted.cpus.as_str()),
        ("rt", pid, "1")
    );
    assert_eq!(
        wanted.pid_starttime,
        pvsched_host::HostFs::default()
            .task_stat(pid, pid)
            .unwrap()
            .starttime
    );
    assert_eq!(wanted.validate(), Ok(vec![1]));
    d.handle(VmUpdate::Gone {
        name: "rt".into(),
        reason: "QEMU exited".into(),
    });
    assert_eq!(d.isolation_wanted(), None);
    assert_eq!(d.attached(), vec!["other".to_string()]);
}
