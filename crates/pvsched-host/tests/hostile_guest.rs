//! A hostile guest against the daemon with the real scheduler: real threads
//! stand in for vCPUs (two of them spin, so a boost costs real CPU), a real
//! shared file, and a writer that for a few seconds sends flapping boost
//! requests, huge values, torn lines (sequence counter left odd, fields
//! changed mid-write), lines claiming another CPU and garbage headers.
//!
//! A sampler reads `/proc` every millisecond and checks what the kernel
//! actually did: no vCPU thread is RT for more CPU time without yielding than
//! the continuous cap allows, none uses more RT CPU in any budget window than
//! its budget, no other thread of the process is ever RT, and every vCPU
//! thread is back at its original policy and nice value at the end. Stops of
//! the machine itself (the FIFO 99 sampler sleeping through several of its
//! periods) are left out of the CPU-time bounds and printed.
//!
//! Needs root (real `sched_setattr`); under `CI=true` a missing prerequisite
//! fails the test, elsewhere it prints SKIPPED.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::*;
use pvsched_host::procfs::ThreadFiles;
use pvsched_host::{
    HostConfig, HostFs, Policy, RealScheduler, SchedAttrs, ThreadScheduler, VmUpdate,
};

const MS: u64 = 1_000_000;
/// How long the guest misbehaves.
const HOSTILE_FOR: Duration = Duration::from_secs(4);
/// `/proc` sampling interval.
const SAMPLE_EVERY: Duration = Duration::from_millis(1);
/// Slack on every CPU-time bound: the daemon decides at its ticks (about
/// 1 ms apart here) and applies a moment later, and may grant one
/// critical-section extension (0.5 ms); the sampler adds one interval.
/// (An interval counts as RT only when the thread was RT at both of its
/// ends, so flapping boosts are not over-counted once per stretch.)
const SLACK_NS: u64 = 3 * MS;
/// A sampler interval longer than this means the machine itself stopped:
/// the sampler runs at FIFO 99 above the daemon and every boost, so only the
/// machine (this host's own CPUs are virtual and stop now and then for
/// milliseconds) keeps it from waking on time. A thread's CPU clock runs on
/// through such a stop while the daemon cannot act, so the bounds count RT
/// CPU time outside these stops and the stops are printed.
const STALL_AFTER: Duration = Duration::from_millis(3);

fn hostile_config(state_dir: &std::path::Path) -> HostConfig {
    let mut cfg = config(state_dir);
    cfg.policy.max_continuous_ns = 4 * MS;
    cfg.policy.budget_window_ns = 100 * MS;
    cfg.policy.budget_ns = 12 * MS;
    cfg.policy.throttle_ns = 30 * MS;
    cfg.policy.max_throttle_ns = 120 * MS;
    cfg.validate().unwrap();
    cfg
}

fn prerequisites() -> Result<(), String> {
    if !pvsched_host::sys::is_root() {
        return Err("not root: real sched_setattr to an RT class needs CAP_SYS_NICE".into());
    }
    if !std::path::Path::new("/proc/self/task").is_dir() {
        return Err("no /proc".into());
    }
    Ok(())
}

/// What the sampler saw of one vCPU thread.
#[derive(Debug, Default)]
struct Seen {
    /// Samples in which the thread was RT.
    rt_samples: u64,
    /// Longest RT CPU time without a yield, as the policy defines one: an
    /// interval in which the thread was off-CPU for over a tenth (ns).
    worst_continuous_ns: u64,
    /// Longest RT CPU time without ever using under half an interval (ns):
    /// printed, not asserted (a preempted thread has not yielded, but the
    /// policy counts it as yielded; the budget bounds it).
    worst_unbroken_ns: u64,
    /// Most RT CPU time in any budget window (ns).
    worst_window_ns: u64,
    /// Completed RT stretches.
    stretches: u64,
    /// Machine stops the sampler saw while this thread was RT: their count,
    /// total and longest (ns), left out of the bounds above.
    stalls: u64,
    stalled_ns: u64,
    worst_stall_ns: u64,
}

/// One thread's sampling state.
struct Track {
    files: ThreadFiles,
    last_run_ns: u64,
    last_at: Instant,
    continuous_ns: u64,
    unbroken_ns: u64,
    was_rt: bool,
    /// `(time, cumulative RT CPU ns)`, pruned to the budget window.
    rt_cpu: std::collections::VecDeque<(Instant, u64)>,
    rt_total_ns: u64,
    seen: Seen,
}

/// What one run of the harness saw.
struct Outcome {
    seed: u64,
    policy: pvsched_policy::PolicyConfig,
    seen: Vec<Seen>,
}

/// One harness run checks both bounds: two runs in one process would see
/// each other's threads (the sampler checks that no other thread is RT).
#[test]
fn a_hostile_guest_stays_within_its_budget_and_continuous_cap_and_every_thread_is_restored() {
    let Some(Outcome { seed, policy, seen }) = run_hostile_guest() else {
        return;
    };
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.worst_window_ns <= policy.budget_ns + SLACK_NS,
            "vCPU {i} used {:.2} ms RT in one {} ms window; the budget is {:.2} ms (seed {seed:#x})",
            s.worst_window_ns as f64 / 1e6,
            policy.budget_window_ns / MS,
            policy.budget_ns as f64 / 1e6
        );
        assert!(
            s.worst_continuous_ns <= policy.max_continuous_ns + SLACK_NS,
            "vCPU {i} ran RT {:.2} ms without yielding; the cap is {:.2} ms (seed {seed:#x})",
            s.worst_continuous_ns as f64 / 1e6,
            policy.max_continuous_ns as f64 / 1e6
        );
    }
}

/// Runs the harness and checks what holds in every run: boosts were applied,
/// no other thread was RT, every vCPU thread is back at its original.
/// `None` when it cannot run here (outside CI).
fn run_hostile_guest() -> Option<Outcome> {
    if let Err(why) = prerequisites() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("hostile-guest test cannot run under CI: {why}");
        }
        eprintln!("SKIPPED hostile_guest: {why}");
        return None;
    }
    let seed = std::env::var("PVSCHED_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("hostile guest seed {seed:#x} (rerun with PVSCHED_SEED={seed:x})");

    // vCPUs 0 and 2 spin; 1 and 3 sleep. Distinct originals, to see each
    // restored exactly.
    let vcpus = FakeVcpus::spawn(4, &[0, 2]);
    let real = RealScheduler;
    let originals = [
        SchedAttrs::default(),
        SchedAttrs {
            nice: 3,
            ..Default::default()
        },
        SchedAttrs {
            policy: Policy::Batch,
            nice: 1,
            ..Default::default()
        },
        SchedAttrs {
            nice: -2,
            ..Default::default()
        },
    ];
    for (&tid, attrs) in vcpus.tids.iter().zip(&originals) {
        real.set_attrs(tid, attrs).unwrap();
    }
    let before: Vec<SchedAttrs> = vcpus
        .tids
        .iter()
        .map(|&t| real.get_attrs(t).unwrap())
        .collect();

    let shm = ShmFile::new(64 * 1024);
    let state = tempfile::tempdir().unwrap();
    let cfg = hostile_config(state.path());
    let policy = cfg.policy.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let loop_tid = Arc::new(Mutex::new(0));

    // The daemon's loop, on its own thread at its real RT priority (above
    // every boost, as `pvsched hostd` runs it).
    let daemon = {
        let (stop, loop_tid) = (Arc::clone(&stop), Arc::clone(&loop_tid));
        let (cfg, shm_path, tids) = (cfg.clone(), shm.path.clone(), vcpus.tids.clone());
        std::thread::Builder::new()
            .name("pvsched-loop".into())
            .spawn(move || {
                *loop_tid.lock().unwrap() = pvsched_host::sys::gettid();
                pvsched_host::daemon::raise_loop_priority(&cfg);
                let mut d = real_daemon(cfg);
                d.handle(VmUpdate::Up(own_spec("hostile", &shm_path, &tids)));
                while !stop.load(Ordering::Relaxed) {
                    d.tick();
                    std::thread::sleep(Duration::from_micros(500));
                }
                let status = d.status();
                d.shutdown().unwrap();
                status
            })
            .unwrap()
    };
    let file = SharedFile::open(&shm.path, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while file.region().read_header().unwrap().host.magic != PVSCHED_MAGIC {
        assert!(
            Instant::now() < deadline,
            "the daemon never initialised the file"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // The sampler: RT above the boosts too, so it sees every change.
    let sampler = {
        let stop = Arc::clone(&stop);
        let tids = vcpus.tids.clone();
        let loop_tid = Arc::clone(&loop_tid);
        let window = Duration::from_nanos(policy.budget_window_ns);
        std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || sample(&stop, &tids, *loop_tid.lock().unwrap(), window))
            .unwrap()
    };

    let writes = hostile_writer(&file, seed, &vcpus.tids);
    // The guest goes quiet and asks for nothing; then the daemon stops.
    attach_guest(&file, PVSCHED_VERSION_MAJOR);
    for slot in 0..4 {
        file.region()
            .write_guest_line(
                slot,
                &request_line(slot, false, u64::MAX / 2 + u64::from(slot)),
            )
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let status = daemon.join().unwrap();
    let (seen, others) = sampler.join().unwrap();

    eprintln!("guest writes: {writes:?}");
    let vm = &status.vms[0];
    eprintln!(
        "daemon counters: boosts {} throttles {} invalid writes {} cpu_id mismatches {} header repairs {}",
        vm.counters.boosts,
        vm.counters.throttles,
        vm.counters.invalid_writes,
        vm.counters.cpu_id_mismatches,
        vm.counters.header_repairs
    );
    for (i, s) in seen.iter().enumerate() {
        eprintln!(
            "vCPU {i} (tid {}): RT in {} samples, {} stretches, worst continuous {:.2} ms \
             (never under half an interval: {:.2} ms), worst window {:.2} ms; \
             machine stops left out: {} ({:.2} ms, longest {:.2} ms)",
            vcpus.tids[i],
            s.rt_samples,
            s.stretches,
            s.worst_continuous_ns as f64 / 1e6,
            s.worst_unbroken_ns as f64 / 1e6,
            s.worst_window_ns as f64 / 1e6,
            s.stalls,
            s.stalled_ns as f64 / 1e6,
            s.worst_stall_ns as f64 / 1e6
        );
    }

    // Not vacuous: the guest did get boosts the kernel applied.
    assert!(
        seen.iter().filter(|s| s.rt_samples > 0).count() >= 2,
        "too few vCPU threads were ever seen RT: {seen:?} (seed {seed:#x})"
    );
    assert!(
        seen[0].rt_samples > 0 && seen[2].rt_samples > 0,
        "a spinning vCPU was never boosted: {seen:?} (seed {seed:#x})"
    );
    assert!(
        others.is_empty(),
        "threads that are not vCPUs were RT: {others:?} (seed {seed:#x})"
    );
    let fs = HostFs::default();
    let pid = std::process::id() as i32;
    for (i, &tid) in vcpus.tids.iter().enumerate() {
        let now = real.get_attrs(tid).unwrap();
        assert_eq!(now, before[i], "vCPU {i} not restored (seed {seed:#x})");
        let stat = fs.task_stat(pid, tid).unwrap();
        assert_eq!(
            (stat.policy, stat.nice),
            (before[i].policy.to_raw(), i32::from(before[i].nice)),
            "vCPU {i} in /proc (seed {seed:#x})"
        );
    }
    Some(Outcome { seed, policy, seen })
}

/// Samples every thread of this process until `stop`; returns what it saw of
/// each vCPU and every other thread seen RT (the loop and the sampler excepted).
fn sample(
    stop: &AtomicBool,
    tids: &[i32],
    loop_tid: i32,
    window: Duration,
) -> (Vec<Seen>, Vec<(i32, String)>) {
    let fs = HostFs::default();
    let pid = std::process::id() as i32;
    let me = pvsched_host::sys::gettid();
    let _ = RealScheduler.set_attrs(me, &SchedAttrs::rt(pvsched_policy::RtClass::Fifo, 99));
    let mut tracks: Vec<Track> = tids
        .iter()
        .map(|&tid| {
            let mut files = ThreadFiles::open(&fs, pid, tid).unwrap();
            let run = files.schedstat().unwrap().run_ns;
            Track {
                files,
                last_run_ns: run,
                last_at: Instant::now(),
                continuous_ns: 0,
                unbroken_ns: 0,
                was_rt: false,
                rt_cpu: Default::default(),
                rt_total_ns: 0,
                seen: Seen::default(),
            }
        })
        .collect();
    let mut others = Vec::new();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(SAMPLE_EVERY);
        for t in &mut tracks {
            let stat = t.files.stat().unwrap();
            let run = t.files.schedstat().unwrap().run_ns;
            let now = Instant::now();
            let used = run.saturating_sub(t.last_run_ns);
            let wall = now.duration_since(t.last_at).as_nanos() as u64;
            let rt = matches!(stat.policy, 1 | 2);
            // CPU time of an interval counts as RT when the thread was RT at
            // both its ends. The policy's yield: off-CPU for over a tenth of
            // the interval (the engine's own rule, applied at other instants).
            if rt {
                t.seen.rt_samples += 1;
            }
            if rt && t.was_rt {
                // The part of the interval beyond a sampler period that the
                // sampler slept through is the machine's stop, not the
                // daemon's delay: its CPU time is not counted.
                let stall_ns = if wall > STALL_AFTER.as_nanos() as u64 {
                    wall - SAMPLE_EVERY.as_nanos() as u64
                } else {
                    0
                };
                if stall_ns > 0 {
                    t.seen.stalls += 1;
                    t.seen.stalled_ns += stall_ns;
                    t.seen.worst_stall_ns = t.seen.worst_stall_ns.max(stall_ns);
                }
                let counted = used.saturating_sub(stall_ns);
                t.rt_total_ns += counted;
                t.continuous_ns = if used * 10 < wall * 9 {
                    0
                } else {
                    t.continuous_ns + counted
                };
                t.unbroken_ns = if used * 2 < wall {
                    0
                } else {
                    t.unbroken_ns + counted
                };
                t.seen.worst_continuous_ns = t.seen.worst_continuous_ns.max(t.continuous_ns);
                t.seen.worst_unbroken_ns = t.seen.worst_unbroken_ns.max(t.unbroken_ns);
            } else {
                if t.was_rt && !rt {
                    t.seen.stretches += 1;
                }
                t.continuous_ns = 0;
                t.unbroken_ns = 0;
            }
            t.was_rt = rt;
            t.rt_cpu.push_back((now, t.rt_total_ns));
            while t
                .rt_cpu
                .front()
                .is_some_and(|&(at, _)| now.duration_since(at) > window)
            {
                t.rt_cpu.pop_front();
            }
            let in_window = t.rt_total_ns - t.rt_cpu.front().map_or(0, |&(_, c)| c);
            t.seen.worst_window_ns = t.seen.worst_window_ns.max(in_window);
            t.last_run_ns = run;
            t.last_at = now;
        }
        // Every 20 ms: no other thread of this process is RT.
        round += 1;
        if round % 20 == 0 {
            for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
                let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if tid == me || tid == loop_tid || tids.contains(&tid) {
                    continue;
                }
                if let Ok(s) = fs.task_stat(pid, tid) {
                    if matches!(s.policy, 1 | 2 | 6) {
                        let comm = fs.task_comm(pid, tid).unwrap_or_default();
                        others.push((tid, comm));
                    }
                }
            }
        }
    }
    let _ = RealScheduler.set_attrs(me, &SchedAttrs::default());
    (tracks.into_iter().map(|t| t.seen).collect(), others)
}

/// Counts of each kind of hostile write.
#[derive(Debug, Default)]
struct Writes {
    flapping: u64,
    huge: u64,
    torn_odd: u64,
    torn_mid_write: u64,
    wrong_cpu: u64,
    garbage_header: u64,
    forever: u64,
}

/// Writes hostile lines for `HOSTILE_FOR`.
fn hostile_writer(file: &SharedFile, seed: u64, tids: &[i32]) -> Writes {
    let region = file.region();
    let mut rng = Rng(seed);
    let mut w = Writes::default();
    let mut updates = 1u64;
    let start = Instant::now();
    attach_guest(file, PVSCHED_VERSION_MAJOR);
    while start.elapsed() < HOSTILE_FOR {
        let slot = (rng.next() % tids.len() as u64) as u32;
        updates += 1;
        match rng.next() % 16 {
            // Flapping: boost, unboost, boost within a few hundred µs.
            0..=4 => {
                for k in 0..(2 + rng.next() % 6) {
                    region
                        .write_guest_line(slot, &request_line(slot, k % 2 == 0, updates + k))
                        .unwrap();
                    std::thread::sleep(Duration::from_micros(50 + rng.next() % 400));
                }
                updates += 8;
                w.flapping += 1;
            }
            // Asks for a boost and keeps asking (the spinning vCPUs must be
            // throttled by their budget).
            5..=7 => {
                region
                    .write_guest_line(slot, &request_line(slot, true, updates))
                    .unwrap();
                w.forever += 1;
            }
            // Huge values in every field of a boost request.
            8 | 9 => {
                let mut line = request_line(slot, true, updates);
                line.request_prio = 255;
                line.task_rt_prio = 255;
                line.task_nice = i8::MIN;
                line.updates = u64::MAX - rng.next() % 4;
                line.rt_pending = u32::MAX;
                line.cs_depth = u32::MAX;
                line.cs_count = u64::MAX;
                line.irq_depth = u8::MAX;
                line.spin_count = u32::MAX;
                line.pending_prio = 255;
                line.flags = u32::MAX;
                line.request_reason = u8::MAX;
                region.write_guest_line(slot, &line).unwrap();
                w.huge += 1;
            }
            // Torn: a boost request written with the sequence counter left
            // odd, as a guest that died mid-write would leave it.
            10 => {
                let line = request_line(slot, true, updates);
                let off = region.slot_offset(slot).unwrap();
                let seq = region.load_u32(off, Ordering::Acquire).unwrap();
                region.store_u32(off, seq | 1, Ordering::Release).unwrap();
                let bytes = line.to_bytes();
                for (i, c) in bytes.chunks(8).enumerate().skip(1) {
                    let word = u64::from_ne_bytes(c.try_into().unwrap());
                    region
                        .store_u64(off + i * 8, word, Ordering::Relaxed)
                        .unwrap();
                }
                std::thread::sleep(Duration::from_micros(rng.next() % 3000));
                w.torn_odd += 1;
            }
            // Torn: fields changed while the reader may be between its two
            // sequence loads (the counter is bumped around half the write).
            11 => {
                let off = region.slot_offset(slot).unwrap();
                let bytes = request_line(slot, rng.next() % 2 == 0, updates).to_bytes();
                let seq = region.load_u32(off, Ordering::Acquire).unwrap() & !1;
                for (i, c) in bytes.chunks(8).enumerate().skip(1) {
                    if i == 3 {
                        region.store_u32(off, seq + 2, Ordering::Release).unwrap();
                    }
                    let word = u64::from_ne_bytes(c.try_into().unwrap());
                    region
                        .store_u64(off + i * 8, word ^ rng.next(), Ordering::Relaxed)
                        .unwrap();
                }
                w.torn_mid_write += 1;
            }
            // A line that claims to be another CPU.
            12 | 13 => {
                let other = (slot + 1 + (rng.next() % 7) as u32) % 8;
                region
                    .write_guest_line(slot, &request_line(other, true, updates))
                    .unwrap();
                w.wrong_cpu += 1;
            }
            // Garbage in the header (host half or guest half), then a
            // well-formed guest half again a little later.
            _ => {
                let half = if rng.next() % 2 == 0 { 0 } else { 64 };
                for i in 0..8 {
                    region
                        .store_u64(half + i * 8, rng.next(), Ordering::Relaxed)
                        .unwrap();
                }
                std::thread::sleep(Duration::from_micros(rng.next() % 3000));
                attach_guest(file, PVSCHED_VERSION_MAJOR);
                w.garbage_header += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(100 + rng.next() % 900));
    }
    w
}
