//! Behaviour of the boost engine on hand-written scenarios.

use pvsched_abi::raw::PVSCHED_FEAT_KNOWN;
use pvsched_abi::{
    BoostRequest, BoostState, GuestVcpuState, RequestReasons, SchedPolicy, TaskInfo,
};
use pvsched_policy::*;

const MS: u64 = 1_000_000;

fn online() -> GuestVcpuState {
    GuestVcpuState {
        online: true,
        ..Default::default()
    }
}

fn rt_task(prio: u8) -> GuestVcpuState {
    GuestVcpuState {
        task: TaskInfo {
            policy: SchedPolicy::Fifo,
            rt_prio: prio,
            nice: 0,
        },
        ..online()
    }
}

fn obs(guest: GuestVcpuState, run_ns: u64) -> VcpuObservation {
    VcpuObservation {
        guest: Some(guest),
        run_ns: Some(run_ns),
        slices: None,
        wait_ns: None,
        preempt_count: None,
        pcpu_load_permille: None,
        runnable: None,
    }
}

fn engine(n: usize) -> VmEngine {
    VmEngine::new(PolicyConfig::default(), n).unwrap()
}

/// Steps the vCPUs and the interrupt-delivery thread together; returns the
/// latter's decision.
fn step_path(e: &mut VmEngine, now: u64, vcpus: &[VcpuObservation], path_run: u64) -> VcpuDecision {
    e.step_with(
        now,
        StepInput {
            vcpus,
            interrupt_path: Some(ThreadObservation {
                run_ns: Some(path_run),
            }),
            iothreads: &[],
        },
        None,
    );
    e.interrupt_path_decision().unwrap()
}

#[test]
fn rt_task_boosts_at_a_mapped_priority_and_unboosts_when_it_stops() {
    let mut e = engine(2);
    let d = e.step(0, &[obs(rt_task(99), 0), obs(online(), 0)]).to_vec();
    assert_eq!(
        d[0].sched,
        ThreadSched::Rt {
            class: RtClass::Rr,
            prio: 8
        }
    );
    assert_eq!(d[0].state, BoostState::Boosted);
    assert_eq!(d[0].event, Some(BoostEvent::Boosted));
    assert!(d[0].reasons.contains(Reasons::RT_RUNNING));
    assert_eq!(d[1].sched, ThreadSched::Baseline);
    assert!(e.wake_at().is_some());

    let d = e
        .step(MS, &[obs(rt_task(1), MS / 10), obs(online(), 0)])
        .to_vec();
    assert_eq!(
        d[0].sched,
        ThreadSched::Rt {
            class: RtClass::Rr,
            prio: 1
        }
    );
    assert_eq!(d[0].event, Some(BoostEvent::Reprioritised));

    let d = e
        .step(2 * MS, &[obs(online(), MS / 5), obs(online(), 0)])
        .to_vec();
    assert_eq!(d[0].sched, ThreadSched::Baseline);
    assert_eq!(d[0].event, Some(BoostEvent::Unboosted));
    assert_eq!(e.stats(0).unwrap().boosts, 1);
    assert_eq!(e.stats(0).unwrap().boosted_cpu_ns, MS / 5);
}

#[test]
fn a_guest_that_spins_boosted_is_throttled_then_released() {
    let cfg = PolicyConfig::default();
    let mut e = engine(1);
    let mut now = 0;
    let mut throttled_at = None;
    // The rogue vCPU burns its pCPU at full speed while asking for boost.
    while now < 100 * MS {
        let d = e.step(now, &[obs(rt_task(99), now)])[0];
        if d.event == Some(BoostEvent::Throttled) {
            throttled_at = Some(now);
            assert_eq!(d.throttle_until, now + cfg.throttle_ns);
            break;
        }
        now = e.wake_at().unwrap().min(now + MS);
    }
    let throttled_at = throttled_at.expect("rogue guest never throttled");
    assert_eq!(throttled_at, cfg.max_continuous_ns);
    // Throttled: baseline until the throttle ends, whatever the guest says.
    let d = e.step(throttled_at + MS, &[obs(rt_task(99), throttled_at)])[0];
    assert_eq!(
        (d.sched, d.state),
        (ThreadSched::Baseline, BoostState::Throttled)
    );
    assert_eq!(e.wake_at(), Some(throttled_at + cfg.throttle_ns));
    let end = throttled_at + cfg.throttle_ns;
    let d = e.step(end, &[obs(rt_task(99), throttled_at)])[0];
    assert_eq!(d.state, BoostState::Boosted);
    assert_eq!(e.stats(0).unwrap().throttles, 1);
    assert_eq!(e.stats(0).unwrap().boosts, 2);
}

#[test]
fn a_halted_vcpu_with_rt_work_pending_stays_boosted_without_burning_budget() {
    let mut e = engine(1);
    let halted = GuestVcpuState {
        idle: true,
        rt_pending: 1,
        pending_prio: 50,
        ..online()
    };
    for step in 0..1000u64 {
        // A halted vCPU thread sleeps: its CPU time does not advance.
        let d = e.step(step * MS, &[obs(halted, 0)])[0];
        assert_eq!(d.state, BoostState::Boosted, "step {step}");
        assert!(d.reasons.contains(Reasons::RT_PENDING));
    }
    assert_eq!(e.stats(0).unwrap().throttles, 0);
}

#[test]
fn interrupts_boost_at_the_admin_maximum() {
    let mut e = engine(1);
    let irq = GuestVcpuState {
        irq_depth: 1,
        ..online()
    };
    let d = e.step(0, &[obs(irq, 0)])[0];
    assert_eq!(
        d.sched,
        ThreadSched::Rt {
            class: RtClass::Rr,
            prio: 8
        }
    );
    assert!(d.reasons.contains(Reasons::IRQ));
}

#[test]
fn explicit_requests_boost_and_unboost_requests_win_over_task_state() {
    let mut e = engine(1);
    let ask = GuestVcpuState {
        request: BoostRequest::Boost {
            prio: 50,
            reasons: RequestReasons::LATENCY,
        },
        ..online()
    };
    let d = e.step(0, &[obs(ask, 0)])[0];
    assert!(d.reasons.contains(Reasons::REQUEST));
    let done = GuestVcpuState {
        request: BoostRequest::Unboost,
        ..rt_task(90)
    };
    let d = e.step(MS, &[obs(done, 0)])[0];
    assert_eq!(d.event, Some(BoostEvent::Unboosted));
}

#[test]
fn requests_are_ignored_when_the_admin_disables_them() {
    let cfg = PolicyConfig {
        honour_requests: false,
        ..Default::default()
    };
    let mut e = VmEngine::new(cfg, 1).unwrap();
    let ask = GuestVcpuState {
        request: BoostRequest::Boost {
            prio: 50,
            reasons: RequestReasons::LATENCY,
        },
        ..online()
    };
    assert_eq!(e.step(0, &[obs(ask, 0)])[0].sched, ThreadSched::Baseline);
}

#[test]
fn critical_section_extension_is_bounded_per_episode_without_throttling() {
    let cfg = PolicyConfig::default();
    let mut e = engine(1);
    let in_cs = GuestVcpuState {
        cs_depth: 1,
        ..online()
    };
    let mut now = 0;
    let mut boosted_cpu = 0;
    loop {
        let d = e.step(now, &[obs(in_cs, now)])[0];
        if d.state != BoostState::Boosted {
            assert_eq!(d.state, BoostState::Normal);
            break;
        }
        assert_eq!(
            d.sched,
            ThreadSched::Rt {
                class: RtClass::Rr,
                prio: cfg.prio_min
            }
        );
        let next = e.wake_at().unwrap().min(now + 100_000);
        boosted_cpu += next - now;
        now = next;
        assert!(now < 10 * MS, "extension never ended");
    }
    assert!(boosted_cpu <= cfg.cs_extension_ns);
    assert_eq!(e.stats(0).unwrap().throttles, 0);
    // Still in the same episode: no new extension.
    assert_eq!(
        e.step(now + MS, &[obs(in_cs, now)])[0].state,
        BoostState::Normal
    );
    // The section ends, a new one starts: extended again.
    e.step(now + 2 * MS, &[obs(online(), now)]);
    assert_eq!(
        e.step(now + 3 * MS, &[obs(in_cs, now)])[0].state,
        BoostState::Boosted
    );
}

#[test]
fn spinning_vcpus_direct_a_boost_to_the_busiest_critical_section_vcpu() {
    let cfg = PolicyConfig {
        cs_extension_ns: 1_000_000,
        ..Default::default()
    };
    let mut e = VmEngine::new(cfg, 3).unwrap();
    let spinner = |n: u32| GuestVcpuState {
        spin_count: n,
        ..online()
    };
    let worker = |count: u64| GuestVcpuState {
        cs_count: count,
        ..online()
    };
    e.step(
        0,
        &[obs(spinner(0), 0), obs(worker(0), 0), obs(worker(0), 0)],
    );
    // vCPU 0 spins; vCPU 2 entered more critical sections than vCPU 1.
    let d = e
        .step(
            MS,
            &[obs(spinner(3), 0), obs(worker(5), 0), obs(worker(40), 0)],
        )
        .to_vec();
    assert_eq!(d[0].sched, ThreadSched::Baseline);
    assert_eq!(d[1].sched, ThreadSched::Baseline);
    assert!(d[2].reasons.contains(Reasons::DIRECTED));
    // Nobody spins any more: the directed boost ends.
    let d = e
        .step(
            2 * MS,
            &[obs(spinner(3), 0), obs(worker(5), 0), obs(worker(41), 0)],
        )
        .to_vec();
    assert_eq!(d[2].event, Some(BoostEvent::Unboosted));
}

#[test]
fn missing_guest_data_never_boosts() {
    let mut e = engine(2);
    let none = VcpuObservation::default();
    for i in 0..10 {
        assert!(e
            .step(i * MS, &[none, none])
            .iter()
            .all(|d| d.sched == ThreadSched::Baseline));
    }
    let offline = GuestVcpuState {
        online: false,
        ..rt_task(99)
    };
    assert_eq!(
        e.step(20 * MS, &[obs(offline, 0), none])[0].sched,
        ThreadSched::Baseline
    );
}

#[test]
fn hot_plug_resizes_and_reset_forgets_history() {
    let mut e = engine(1);
    e.step(0, &[obs(rt_task(10), 0)]);
    assert_eq!(
        e.step(MS, &[obs(rt_task(10), 0), obs(rt_task(10), 0)])
            .len(),
        2
    );
    assert_eq!(e.nr_vcpus(), 2);
    e.reset_vcpu(0);
    assert_eq!(e.stats(0).unwrap().boosts, 0);
    assert_eq!(e.decisions()[0].sched, ThreadSched::Baseline);
}

#[test]
fn features_not_negotiated_are_masked() {
    let full = GuestVcpuState {
        irq_depth: 1,
        rt_pending: 3,
        cs_depth: 2,
        request: BoostRequest::Unboost,
        ..rt_task(50)
    };
    assert_eq!(mask_by_features(full, PVSCHED_FEAT_KNOWN), full);
    let masked = mask_by_features(full, 0);
    assert_eq!(masked.task, TaskInfo::default());
    assert_eq!(
        (masked.irq_depth, masked.rt_pending, masked.cs_depth),
        (0, 0, 0)
    );
    assert_eq!(masked.request, BoostRequest::None);
    assert!(masked.online);
}

#[test]
fn the_interrupt_path_follows_boosted_vcpus_under_its_own_budget() {
    let cfg = PolicyConfig {
        vm_budget_ns: 100 * MS,
        ..PolicyConfig::default()
    };
    let mut e = VmEngine::new(cfg.clone(), 2).unwrap();
    let d = step_path(&mut e, 0, &[obs(online(), 0), obs(online(), 0)], 0);
    assert_eq!(d.sched, ThreadSched::Baseline);

    // A vCPU that only runs an RT task waits for nothing: the path stays put.
    let d = step_path(&mut e, MS / 2, &[obs(rt_task(99), 0), obs(online(), 0)], 0);
    assert_eq!(d.sched, ThreadSched::Baseline);

    // A halted vCPU asking for boost waits for its timer interrupt.
    let halted = GuestVcpuState {
        idle: true,
        request: BoostRequest::Boost {
            prio: 99,
            reasons: RequestReasons::LATENCY,
        },
        ..online()
    };
    let d = step_path(&mut e, MS, &[obs(rt_task(10), 0), obs(halted, 0)], 0);
    assert_eq!(
        d.sched,
        ThreadSched::Rt {
            class: RtClass::Rr,
            prio: cfg.prio_max
        }
    );
    assert!(d.reasons.contains(Reasons::INTERRUPT_PATH));

    // The path thread burns its pCPU while the vCPUs stay boosted but idle:
    // its own budget throttles it.
    let mut now = MS;
    let mut throttled = false;
    while now < 200 * MS && !throttled {
        now = e.wake_at().unwrap().min(now + MS);
        let d = step_path(
            &mut e,
            now,
            &[obs(rt_task(10), 0), obs(halted, 0)],
            now - MS,
        );
        throttled = d.state == BoostState::Throttled;
    }
    assert!(throttled, "interrupt path never throttled");
    assert!(e.interrupt_path_stats().boosted_cpu_ns <= cfg.budget_ns);
    assert_eq!(e.stats(0).unwrap().throttles, 0);

    // No boosted vCPU: the path thread returns to its own attributes.
    let d = step_path(
        &mut e,
        now + cfg.throttle_ns,
        &[obs(online(), 0), obs(online(), 0)],
        now,
    );
    assert_eq!(d.sched, ThreadSched::Baseline);
}

#[test]
fn threads_taking_turns_stay_inside_the_vm_burst() {
    // Two vCPUs take turns at 2 ms each, every one
    // yielding before its continuous limit and far inside its own budget:
    // only the VM's burst bound can stop them holding the host's CPUs, and in
    // any burst window their sum stays within it. A burst of 5 ms per 10 ms
    // leaves each of them 25 ms per 100 ms, its own budget.
    let cfg = PolicyConfig {
        vm_budget_ns: PolicyConfig::default().budget_window_ns,
        vm_burst_ns: 5 * MS,
        ..PolicyConfig::default()
    };
    let mut e = VmEngine::new(cfg.clone(), 2).unwrap();
    let mut run = [0u64; 2];
    let mut now = 0;
    // (start, end) of every interval in which the burning thread was boosted.
    let mut boosted: Vec<(u64, u64)> = vec![];
    let mut refused = false;
    while now < cfg.budget_window_ns {
        let hot = (now / (2 * MS)) as usize % 2;
        let o: Vec<_> = (0..2)
            .map(|i| obs(if i == hot { rt_task(50) } else { online() }, run[i]))
            .collect();
        let d = e.step(now, &o).to_vec();
        let next = e
            .wake_at()
            .map_or(now + MS / 4, |w| w.min(now + MS / 4))
            .max(now + 1);
        if d[hot].state == BoostState::Boosted {
            boosted.push((now, next));
        }
        refused |= e.vm_stats().refused_by == Some(OuterLimit::Vm);
        run[hot] += next - now;
        now = next;
    }
    assert!(refused, "the burst bound never refused a boost");
    let window = cfg.burst_window_ns;
    let worst = boosted
        .iter()
        .map(|&(start, _)| {
            boosted
                .iter()
                .map(|&(a, b)| b.min(start + window).saturating_sub(a.max(start)))
                .sum::<u64>()
        })
        .max()
        .unwrap();
    assert!(
        worst <= cfg.vm_burst_ns,
        "{worst} ns boosted in a {window} ns window, burst bound {}",
        cfg.vm_burst_ns
    );
    // Bounded, not starved: most of the burst is used in every window.
    assert!(
        worst + 2 * cfg.min_quantum_ns >= cfg.vm_burst_ns,
        "burst unused: {worst}"
    );
    assert_eq!(e.stats(0).unwrap().throttles, 0);
    assert_eq!(e.stats(1).unwrap().throttles, 0);
}

#[test]
fn demand_rotating_across_vcpus_stays_inside_the_vm_budget() {
    // Each vCPU in turn runs an RT task and burns its pCPU for a little
    // under its own continuous limit, then yields: no thread's own limits
    // ever bite, but the VM's budget does.
    let cfg = PolicyConfig::default();
    let n = 4;
    let mut e = VmEngine::new(cfg.clone(), n).unwrap();
    let mut run = vec![0u64; n];
    let mut now = 0;
    let mut vm_refused = false;
    let mut boosted_cpu = 0;
    while now < cfg.budget_window_ns {
        let hot = (now / (3 * MS)) as usize % n;
        let o: Vec<_> = (0..n)
            .map(|i| obs(if i == hot { rt_task(50) } else { online() }, run[i]))
            .collect();
        let d = e.step(now, &o).to_vec();
        let next = e
            .wake_at()
            .map_or(now + MS, |w| w.min(now + MS))
            .max(now + 1);
        if d[hot].state == BoostState::Boosted {
            boosted_cpu += next - now;
        }
        vm_refused |= e.vm_stats().refused_by == Some(OuterLimit::Vm);
        run[hot] += next - now;
        now = next;
    }
    assert!(vm_refused, "the VM budget never refused a boost");
    assert!(
        boosted_cpu <= cfg.vm_budget_ns,
        "{boosted_cpu} ns boosted in one window, VM budget {}",
        cfg.vm_budget_ns
    );
    assert!(boosted_cpu + 2 * cfg.min_quantum_ns * n as u64 >= cfg.vm_budget_ns);
    for i in 0..n {
        assert_eq!(
            e.stats(i).unwrap().throttles,
            0,
            "vCPU {i} throttled on its own"
        );
    }
    assert!(e.vm_stats().vm_throttles >= 1);
}

#[test]
fn the_host_cap_bounds_vms_together_and_forgets_a_vm_that_leaves() {
    let cfg = PolicyConfig {
        host_budget_percent: 10,
        ..PolicyConfig::default()
    };
    // 2 CPUs: 20 ms per 100 ms window for everyone, below one VM's 30 ms.
    let mut host = HostBudget::for_policy(&cfg, 2).unwrap();
    let mut vms: Vec<VmEngine> = (0..2)
        .map(|_| VmEngine::new(cfg.clone(), 1).unwrap())
        .collect();
    let mut run = [0u64; 2];
    let mut now = 0;
    let mut boosted_cpu = 0;
    while now < cfg.budget_window_ns {
        let mut next = now + MS;
        for (i, e) in vms.iter_mut().enumerate() {
            // Each VM's vCPU burns 5 ms, then yields for 1 ms.
            let o = [obs(rt_task(50), run[i])];
            e.step_with(
                now,
                StepInput {
                    vcpus: &o,
                    interrupt_path: None,
                    iothreads: &[],
                },
                Some(&mut host),
            );
            if let Some(w) = e.wake_at() {
                next = next.min(w);
            }
        }
        if let Some(w) = host.wake_at() {
            next = next.min(w);
        }
        let next = next.max(now + 1);
        let busy = (now / MS) % 6 != 5;
        for (i, e) in vms.iter().enumerate() {
            if busy {
                run[i] += next - now;
                if e.decisions()[0].state == BoostState::Boosted {
                    boosted_cpu += next - now;
                }
            }
        }
        now = next;
    }
    assert!(
        boosted_cpu <= host.budget_ns(),
        "{boosted_cpu} > {}",
        host.budget_ns()
    );
    assert!(vms.iter().any(|e| e.vm_stats().host_throttles > 0));
    assert!(host.stats().throttles > 0);
    // A VM that leaves no longer counts against the others.
    let gone = vms.pop().unwrap();
    host.leave(gone.host_member().unwrap());
    assert_eq!(host.boosted_threads(), vms[0].boosted_threads());
}

#[test]
fn a_spinner_whose_cpu_time_lags_by_a_tick_is_still_held_to_its_limits() {
    // Linux brings a running thread's CPU time up to date at ticks (here
    // every 4 ms): stepped every millisecond, a spinner's counter reads
    // 0, 0, 0, then +4 ms. It was never switched out (its slice count does
    // not move), so the quiet steps are not yields, and the catch-up is
    // charged in full.
    let cfg = PolicyConfig {
        vm_budget_ns: 100 * MS,
        ..PolicyConfig::default()
    };
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let tick = 4 * MS;
    let mut boosted_wall = 0;
    let mut first_throttle = None;
    let mut now = 0;
    while now < cfg.budget_window_ns {
        let lagging = now / tick * tick;
        let o = [VcpuObservation {
            guest: Some(rt_task(50)),
            run_ns: Some(lagging),
            slices: Some(7),
            wait_ns: Some(0),
            preempt_count: None,
            pcpu_load_permille: None,
            runnable: None,
        }];
        let d = e.step(now, &o)[0];
        if d.state == BoostState::Boosted {
            boosted_wall += MS;
        } else if d.state == BoostState::Throttled && first_throttle.is_none() {
            first_throttle = Some(now);
        }
        now += MS;
    }
    // The continuous limit (10 ms) bites within one tick of lag.
    let first = first_throttle.expect("the spinner was never throttled");
    assert!(
        first <= cfg.max_continuous_ns + tick,
        "first throttle at {first}"
    );
    // Within the window: its budget plus at most one tick of lag.
    assert!(
        boosted_wall <= cfg.budget_ns + tick,
        "boosted {boosted_wall} ns of wall time in one window"
    );

    // The same counter with the slice count moving (switched out and in:
    // a halting vCPU) is a yield, and the continuous run restarts.
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    for step in 0..20u64 {
        let o = [VcpuObservation {
            guest: Some(rt_task(50)),
            run_ns: Some(step * MS / 10),
            slices: Some(step),
            wait_ns: Some(0),
            preempt_count: None,
            pcpu_load_permille: None,
            runnable: None,
        }];
        assert_eq!(e.step(step * MS, &o)[0].state, BoostState::Boosted);
    }
}

#[test]
fn a_spinner_switched_out_by_the_loop_and_runnable_at_every_sample_is_held_to_its_limit() {
    // The loop's own wake-ups on the spinner's CPU switch it out and in: its
    // slice count moves at every step, and its counter alternates between
    // no growth (brought up to date at the last switch, running since) and a
    // catch-up. It is runnable (state R) at every sample: no step is a yield.
    let cfg = PolicyConfig {
        vm_budget_ns: 100 * MS,
        ..PolicyConfig::default()
    };
    let sample = |step: u64, runnable| VcpuObservation {
        guest: Some(rt_task(50)),
        run_ns: Some(if step % 2 == 1 {
            step * MS
        } else {
            step.saturating_sub(1) * MS
        }),
        slices: Some(step),
        wait_ns: Some(0),
        preempt_count: None,
        pcpu_load_permille: None,
        runnable: Some(runnable),
    };
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let first_throttle = (0..50u64)
        .find(|&step| e.step(step * MS, &[sample(step, true)])[0].state == BoostState::Throttled)
        .expect("the spinner was never throttled");
    // Boosted from step 0: its continuous run reached the limit within a step.
    assert!(
        first_throttle * MS <= cfg.max_continuous_ns + MS,
        "first throttle at step {first_throttle}"
    );
}

#[test]
fn a_guest_flapping_its_request_does_not_restart_the_continuous_limit_of_a_spinner() {
    // The guest asks, stops asking, asks again at every other step; the
    // thread spins throughout (never switched out, always runnable).
    let cfg = PolicyConfig {
        vm_budget_ns: 100 * MS,
        ..PolicyConfig::default()
    };
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let mut boosted_cpu = 0;
    let mut throttled = false;
    let mut last = 0;
    for step in 0..100u64 {
        let guest = if step % 2 == 0 { rt_task(50) } else { online() };
        let o = [VcpuObservation {
            guest: Some(guest),
            run_ns: Some(step * MS),
            slices: Some(7),
            wait_ns: Some(0),
            preempt_count: None,
            pcpu_load_permille: None,
            runnable: Some(true),
        }];
        let d = e.step(step * MS, &o)[0];
        if d.state == BoostState::Throttled {
            throttled = true;
            break;
        }
        if last == 1 {
            boosted_cpu += MS;
        }
        last = u8::from(d.state == BoostState::Boosted);
    }
    assert!(throttled, "a flapping spinner was never throttled");
    assert!(
        boosted_cpu <= cfg.max_continuous_ns + MS,
        "{boosted_cpu} ns boosted before the first throttle"
    );
    // A thread that sleeps while unboosted starts over at its next boost
    // (it asks and spins 2 ms in every 10, inside its budget).
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let mut run = 0;
    for step in 0..100u64 {
        let asking = step % 10 < 2;
        let o = [VcpuObservation {
            guest: Some(if asking { rt_task(50) } else { online() }),
            run_ns: Some(run),
            slices: Some(step),
            wait_ns: Some(0),
            preempt_count: None,
            pcpu_load_permille: None,
            runnable: Some(asking),
        }];
        let d = e.step(step * MS, &o)[0];
        assert_ne!(d.state, BoostState::Throttled, "step {step}");
        if asking {
            run += MS;
        }
    }
}

#[test]
fn a_spinner_stepped_only_when_asked_stops_at_the_host_cap() {
    // One vCPU spinning at RT; the host cap (20 ms per window on 2 CPUs) is
    // below its own budget (25 ms) and its VM's (30 ms), and the engine is
    // stepped only when it asks: the cap alone must stop it in time.
    let cfg = PolicyConfig {
        host_budget_percent: 10,
        max_continuous_ns: 100 * MS,
        burst_window_ns: 100 * MS,
        vm_burst_ns: 100 * MS,
        ..PolicyConfig::default()
    };
    let mut host = HostBudget::for_policy(&cfg, 2).unwrap();
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let mut now = 0;
    let mut boosted_cpu = 0;
    while now < cfg.budget_window_ns {
        let o = [obs(rt_task(50), now)];
        let d = e.step_with(
            now,
            StepInput {
                vcpus: &o,
                interrupt_path: None,
                iothreads: &[],
            },
            Some(&mut host),
        )[0];
        let next = e
            .wake_at()
            .into_iter()
            .chain(host.wake_at())
            .min()
            .unwrap_or(now + MS)
            .max(now + 1);
        if d.state == BoostState::Boosted {
            boosted_cpu += next - now;
        }
        now = next;
    }
    assert!(
        boosted_cpu <= host.budget_ns(),
        "{boosted_cpu} > {}",
        host.budget_ns()
    );
    assert!(
        boosted_cpu + cfg.min_quantum_ns >= host.budget_ns(),
        "cap not used: {boosted_cpu}"
    );
    assert_eq!(e.vm_stats().refused_by, Some(OuterLimit::Host));
    assert_eq!(e.stats(0).unwrap().throttles, 0);
}

#[test]
fn a_vcpu_that_halts_between_rt_bursts_is_not_throttled_but_a_spinner_is() {
    // Per-thread limits alone: a VM budget as large as the window, and no
    // repeat-offender cut of it.
    let cfg = PolicyConfig {
        vm_budget_ns: PolicyConfig::default().budget_window_ns * 2,
        vm_burst_ns: PolicyConfig::default().burst_window_ns * 2,
        offender_streak: 0,
        ..PolicyConfig::default()
    };
    let mut e = VmEngine::new(cfg.clone(), 2).unwrap();
    let (mut run_periodic, mut run_spinner) = (0, 0);
    let mut now = 0;
    let mut spinner_throttled = false;
    // vCPU 0 runs its RT task 20% of each millisecond (inside the 25% window
    // budget) and halts (boosted, asking) in between; vCPU 1 spins at 100%.
    for _ in 0..200 {
        let d = e
            .step(
                now,
                &[
                    obs(rt_task(90), run_periodic),
                    obs(rt_task(90), run_spinner),
                ],
            )
            .to_vec();
        assert_ne!(
            d[0].state,
            BoostState::Throttled,
            "periodic vCPU throttled at {now}"
        );
        spinner_throttled |= d[1].state == BoostState::Throttled;
        now += MS;
        run_periodic += 200_000;
        run_spinner += MS;
    }
    assert!(spinner_throttled);
    assert_eq!(e.stats(0).unwrap().throttles, 0);
    assert!(e.stats(1).unwrap().boosted_cpu_ns <= 2 * cfg.budget_ns + cfg.max_continuous_ns);
}

#[test]
fn repeat_offenders_are_throttled_longer_and_forgiven_after_a_clean_window() {
    // The thread's own backoff alone (the VM's cut is tested on its own).
    let cfg = PolicyConfig {
        offender_streak: 0,
        ..PolicyConfig::default()
    };
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let mut now = 0;
    let mut durations = vec![];
    // A spinner that asks forever: record each throttle's length.
    while durations.len() < 5 {
        let d = e.step(now, &[obs(rt_task(99), now)])[0];
        if d.event == Some(BoostEvent::Throttled) {
            durations.push(d.throttle_until - now);
        }
        now = e.wake_at().unwrap().min(now + MS);
    }
    let base = cfg.throttle_ns;
    assert_eq!(
        durations,
        [
            base,
            2 * base,
            4 * base,
            cfg.max_throttle_ns,
            cfg.max_throttle_ns
        ]
    );

    // It behaves for longer than a budget window: the next throttle is short again.
    let until = now + cfg.max_throttle_ns;
    let calm = until + cfg.budget_window_ns + MS;
    e.step(calm, &[obs(online(), now)]);
    let mut t = calm + MS;
    let run_base = now;
    loop {
        let d = e.step(t, &[obs(rt_task(99), run_base + (t - calm - MS))])[0];
        if d.event == Some(BoostEvent::Throttled) {
            assert_eq!(d.throttle_until - t, base);
            break;
        }
        t = e.wake_at().unwrap().min(t + MS);
        assert!(t < calm + 100 * MS, "never throttled again");
    }
}

/// An observation with a host-read preempt count, sampled run time and run delay.
fn held(
    guest: Option<GuestVcpuState>,
    run_ns: u64,
    wait_ns: u64,
    preempt_count: Option<u32>,
) -> VcpuObservation {
    VcpuObservation {
        guest,
        run_ns: Some(run_ns),
        slices: None,
        wait_ns: Some(wait_ns),
        preempt_count,
        pcpu_load_permille: None,
        runnable: None,
    }
}

fn idle_guest() -> GuestVcpuState {
    GuestVcpuState {
        idle: true,
        ..online()
    }
}

/// The lock-holder boost alone: no slice extension.
fn lock_holder_config() -> PolicyConfig {
    PolicyConfig {
        cs_extension_ns: 0,
        ..PolicyConfig::default()
    }
}

#[test]
fn a_preempted_lock_holder_is_boosted_for_its_grant_and_not_beyond() {
    let cfg = lock_holder_config();
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let g = Some(online());
    e.step(0, &[held(g, 0, 0, Some(1))]);
    // Preemption disabled, and over the last interval it waited 0.8 ms and ran 0.1 ms.
    let d = e.step(MS, &[held(g, MS / 10, 8 * MS / 10, Some(1))])[0];
    assert_eq!(
        d.sched,
        ThreadSched::Rt {
            class: RtClass::Rr,
            prio: cfg.prio_min
        }
    );
    assert_eq!(d.reasons, Reasons::LOCK_HOLDER);
    assert_eq!(d.event, Some(BoostEvent::Boosted));
    assert_eq!(e.stats(0).unwrap().lock_holder_grants, 1);
    // The engine asks to be stepped when the grant ends.
    assert_eq!(e.wake_at(), Some(MS + cfg.lock_holder_boost_ns));
    // Boosted, it runs (its run delay stops growing): the grant goes on...
    let d = e.step(MS + MS / 2, &[held(g, 6 * MS / 10, 8 * MS / 10, Some(1))])[0];
    assert_eq!(d.state, BoostState::Boosted);
    assert_eq!(d.event, None);
    // ...and ends when its time is over, although the count still says non-zero.
    let end = MS + cfg.lock_holder_boost_ns;
    let d = e.step(end, &[held(g, 11 * MS / 10, 8 * MS / 10, Some(1))])[0];
    assert_eq!(d.sched, ThreadSched::Baseline);
    assert_eq!(d.event, Some(BoostEvent::Unboosted));
    // Charged what it ran while boosted, to its own budget and its VM's.
    assert_eq!(e.stats(0).unwrap().boosted_cpu_ns, MS);
    assert_eq!(e.vm_stats().boosted_cpu_ns, MS);
    assert_eq!(e.stats(0).unwrap().lock_holder_grants, 1);
    assert_eq!(e.stats(0).unwrap().throttles, 0);
}

#[test]
fn no_lock_holder_boost_without_all_of_its_evidence() {
    let cfg = lock_holder_config();
    // Two steps 1 ms apart; the decision at the second.
    let second = |first: VcpuObservation, then: VcpuObservation| {
        let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
        e.step(0, &[first]);
        let d = e.step(MS, &[then])[0];
        (d, e.stats(0).unwrap().lock_holder_grants)
    };
    let g = Some(online());
    let start = held(g, 0, 0, Some(1));
    // The positive case, for reference.
    let (d, grants) = second(start, held(g, MS / 10, 8 * MS / 10, Some(1)));
    assert!(d.reasons.contains(Reasons::LOCK_HOLDER));
    assert_eq!(grants, 1);
    for (name, first, then) in [
        (
            "preempt count 0, same run delay",
            held(g, 0, 0, Some(0)),
            held(g, MS / 10, 8 * MS / 10, Some(0)),
        ),
        (
            "preempt count 1, running (ran, did not wait)",
            start,
            held(g, MS, 0, Some(1)),
        ),
        (
            "preempt count 1, waited as long as it ran",
            start,
            held(g, MS / 2, MS / 2, Some(1)),
        ),
        (
            "idle (the idle task reads 1)",
            held(Some(idle_guest()), 0, 0, Some(1)),
            held(Some(idle_guest()), MS / 10, 8 * MS / 10, Some(1)),
        ),
        (
            "preempt count unknown",
            held(g, 0, 0, None),
            held(g, MS / 10, 8 * MS / 10, None),
        ),
        (
            "no guest line",
            held(None, 0, 0, Some(1)),
            held(None, MS / 10, 8 * MS / 10, Some(1)),
        ),
        (
            "run delay unknown",
            start,
            VcpuObservation {
                wait_ns: None,
                ..held(g, MS / 10, 0, Some(1))
            },
        ),
    ] {
        let (d, grants) = second(first, then);
        assert_eq!(d.sched, ThreadSched::Baseline, "{name}");
        assert_eq!(grants, 0, "{name}");
    }
    // Off by configuration.
    let mut e = VmEngine::new(
        PolicyConfig {
            lock_holder_boost_ns: 0,
            ..cfg.clone()
        },
        1,
    )
    .unwrap();
    e.step(0, &[start]);
    assert_eq!(
        e.step(MS, &[held(g, MS / 10, 8 * MS / 10, Some(1))])[0].sched,
        ThreadSched::Baseline
    );
}

#[test]
fn a_lock_holder_grant_ends_when_the_preempt_count_returns_to_zero() {
    let cfg = lock_holder_config();
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let g = Some(online());
    e.step(0, &[held(g, 0, 0, Some(1))]);
    let d = e.step(MS, &[held(g, MS / 10, 8 * MS / 10, Some(1))])[0];
    assert_eq!(d.state, BoostState::Boosted);
    // 0.2 ms later the lock is released: preemption enabled again.
    let d = e.step(MS + MS / 5, &[held(g, 3 * MS / 10, 8 * MS / 10, Some(0))])[0];
    assert_eq!(d.sched, ThreadSched::Baseline);
    assert_eq!(d.event, Some(BoostEvent::Unboosted));
    assert_eq!(e.wake_at(), None);
    // Non-zero again but running: that grant is gone, and no new one starts.
    let d = e.step(MS + MS / 2, &[held(g, 6 * MS / 10, 8 * MS / 10, Some(1))])[0];
    assert_eq!(d.sched, ThreadSched::Baseline);
    // The same when the vCPU goes idle instead (the idle task reads 1).
    let mut e = VmEngine::new(cfg, 1).unwrap();
    e.step(0, &[held(g, 0, 0, Some(1))]);
    assert_eq!(
        e.step(MS, &[held(g, MS / 10, 8 * MS / 10, Some(1))])[0].state,
        BoostState::Boosted
    );
    let d = e.step(
        MS + MS / 5,
        &[held(Some(idle_guest()), MS / 5, 8 * MS / 10, Some(1))],
    )[0];
    assert_eq!(d.event, Some(BoostEvent::Unboosted));
}

#[test]
fn a_guest_holding_preemption_disabled_forever_gets_at_most_its_grants_per_window() {
    // A guest that keeps its preempt count at 1 and whose vCPU waits 80% of the
    // time whatever happens: it looks like a preempted lock holder at every step.
    let cfg = lock_holder_config();
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let g = Some(online());
    let (mut now, mut run, mut wait) = (0u64, 0u64, 0u64);
    let mut starts = vec![];
    let mut boosted: Vec<(u64, u64)> = vec![];
    let windows = 10;
    while now < windows * cfg.budget_window_ns {
        let grants = e.stats(0).unwrap().lock_holder_grants;
        let d = e.step(now, &[held(g, run, wait, Some(1))])[0];
        if e.stats(0).unwrap().lock_holder_grants > grants {
            starts.push(now);
        }
        let next = e
            .wake_at()
            .map_or(now + MS, |w| w.min(now + MS))
            .max(now + 1);
        if d.state == BoostState::Boosted {
            assert_eq!(d.reasons, Reasons::LOCK_HOLDER);
            boosted.push((now, next));
        }
        run += (next - now) / 5;
        wait += (next - now) * 4 / 5;
        now = next;
    }
    let w = cfg.budget_window_ns;
    let max = u64::from(cfg.lock_holder_max_grants);
    // Never more than the bound in any window (ending at a grant's start)...
    for &t in &starts {
        let in_window = starts.iter().filter(|&&s| s <= t && t - s < w).count() as u64;
        assert!(
            in_window <= max,
            "{in_window} grants in the window ending at {t}"
        );
    }
    // ...and the bound is reached in every window: it is the limit that holds it.
    assert_eq!(starts.len() as u64, windows * max);
    assert!(e.stats(0).unwrap().lock_holder_capped > 0);
    // Boosted wall time: each grant its length, no more.
    let total: u64 = boosted.iter().map(|(a, b)| b - a).sum();
    assert_eq!(total, windows * max * cfg.lock_holder_boost_ns);
    for &(start, _) in &boosted {
        let in_window: u64 = boosted
            .iter()
            .map(|&(a, b)| b.min(start + w).saturating_sub(a.max(start)))
            .sum();
        assert!(in_window <= max * cfg.lock_holder_boost_ns);
    }
    // Far inside its budget: never throttled, its VM never refused.
    assert_eq!(e.stats(0).unwrap().throttles, 0);
    assert_eq!(e.vm_stats().vm_throttles, 0);
}

#[test]
fn the_host_read_preempt_count_extends_a_slice_only_while_the_pcpu_is_contended() {
    let cfg = PolicyConfig {
        lock_holder_boost_ns: 0,
        ..PolicyConfig::default()
    };
    // The first step sees a quiet pCPU (no boost yet); the decision at the second.
    let two_steps = |first: VcpuObservation, then: VcpuObservation| {
        let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
        let quiet = VcpuObservation {
            pcpu_load_permille: Some(0),
            runnable: None,
            ..first
        };
        assert_eq!(e.step(0, &[quiet])[0].sched, ThreadSched::Baseline);
        e.step(MS / 5, &[then])[0]
    };
    let g = Some(online());
    let loaded = |o: VcpuObservation, load| VcpuObservation {
        pcpu_load_permille: Some(load),
        runnable: None,
        ..o
    };
    // Running in a section (it ran, never waited) on a pCPU busy 90% of the time.
    let d = two_steps(
        loaded(held(g, 0, 0, Some(1)), 900),
        loaded(held(g, MS / 5, 0, Some(1)), 900),
    );
    assert_eq!(d.reasons, Reasons::CRITICAL);
    assert_eq!(
        d.sched,
        ThreadSched::Rt {
            class: RtClass::Rr,
            prio: cfg.prio_min
        }
    );
    // Its run delay grew: contended whatever the load says.
    let d = two_steps(
        loaded(held(g, 0, 0, Some(1)), 100),
        loaded(held(g, MS / 10, MS / 10, Some(1)), 100),
    );
    assert_eq!(d.reasons, Reasons::CRITICAL);
    // A quiet pCPU and no run delay: nothing to extend the slice against.
    let d = two_steps(
        loaded(held(g, 0, 0, Some(1)), 100),
        loaded(held(g, MS / 5, 0, Some(1)), 100),
    );
    assert_eq!(d.sched, ThreadSched::Baseline);
    // The count, where the host reads it, overrules the guest line: a guest that
    // writes cs_depth while its real count is 0 gets nothing.
    let claims = Some(GuestVcpuState {
        cs_depth: 2,
        ..online()
    });
    let d = two_steps(
        loaded(held(claims, 0, 0, Some(0)), 900),
        loaded(held(claims, MS / 5, 0, Some(0)), 900),
    );
    assert_eq!(d.sched, ThreadSched::Baseline);
    // Idle reads 1: no extension.
    let idle = Some(idle_guest());
    let d = two_steps(
        loaded(held(idle, 0, 0, Some(1)), 900),
        loaded(held(idle, MS / 5, 0, Some(1)), 900),
    );
    assert_eq!(d.sched, ThreadSched::Baseline);
}

#[test]
fn a_host_read_critical_section_is_extended_once_per_episode_and_charged() {
    let cfg = PolicyConfig {
        lock_holder_boost_ns: 0,
        ..PolicyConfig::default()
    };
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let g = Some(online());
    let at = |pc: u32, now: u64| VcpuObservation {
        pcpu_load_permille: Some(1000),
        runnable: None,
        ..held(g, now, 0, Some(pc))
    };
    let mut now = 0;
    let mut boosted_cpu = 0;
    // The count stays non-zero on a busy pCPU: the extension runs out and the
    // boost ends without a throttle.
    loop {
        let d = e.step(now, &[at(1, now)])[0];
        if d.state != BoostState::Boosted {
            assert_eq!(d.state, BoostState::Normal);
            break;
        }
        let next = e.wake_at().unwrap().min(now + 100_000);
        boosted_cpu += next - now;
        now = next;
        assert!(now < 10 * MS, "extension never ended");
    }
    assert!(boosted_cpu <= cfg.cs_extension_ns);
    assert!(boosted_cpu + cfg.min_quantum_ns >= cfg.cs_extension_ns);
    assert_eq!(e.stats(0).unwrap().boosted_cpu_ns, boosted_cpu);
    assert_eq!(e.stats(0).unwrap().throttles, 0);
    // Still the same episode.
    assert_eq!(e.step(now + MS, &[at(1, now)])[0].state, BoostState::Normal);
    // The count returns to zero, a new section starts: extended again.
    e.step(now + 2 * MS, &[at(0, now)]);
    assert_eq!(
        e.step(now + 3 * MS, &[at(1, now)])[0].state,
        BoostState::Boosted
    );
}

#[test]
fn a_starved_lock_holder_whose_run_delay_never_updates_is_boosted_once_its_run_time_stalls() {
    // Linux adds to a thread's run delay only when it runs again: a vCPU kept off its
    // pCPU for seconds shows neither run time nor run delay moving, only state R.
    let cfg = lock_holder_config();
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let g = Some(online());
    let starved = |runnable| VcpuObservation {
        runnable: Some(runnable),
        ..held(g, 5 * MS, 0, Some(1))
    };
    let mut t = 0;
    let mut boosted_at = None;
    while t <= 20 * MS {
        let d = e.step(t, &[starved(true)])[0];
        if d.reasons == Reasons::LOCK_HOLDER && boosted_at.is_none() {
            boosted_at = Some(t);
        }
        t += MS;
    }
    let at = boosted_at.expect("a runnable vCPU whose run time stalled was never boosted");
    assert!(
        at > pvsched_policy::engine::CPU_TIME_LAG_NS,
        "boosted at {at} ns, before the run-time counter's tick lag had passed"
    );
    // The same stall while not runnable (halted or blocked) is no preemption.
    let mut e = VmEngine::new(cfg, 1).unwrap();
    for step in 0..=20 {
        let d = e.step(step * MS, &[starved(false)])[0];
        assert_eq!(d.sched, ThreadSched::Baseline, "boosted a blocked vCPU");
    }
}

/// Steps the vCPUs and IOThreads whose cumulative run times are `io_runs`.
fn step_io(e: &mut VmEngine, now: u64, vcpus: &[VcpuObservation], io_runs: &[u64]) {
    let io: Vec<ThreadObservation> = io_runs
        .iter()
        .map(|&r| ThreadObservation { run_ns: Some(r) })
        .collect();
    e.step_with(
        now,
        StepInput {
            vcpus,
            interrupt_path: None,
            iothreads: &io,
        },
        None,
    );
}

const FIFO_5: ThreadSched = ThreadSched::Rt {
    class: RtClass::Fifo,
    prio: 5,
};

#[test]
fn iothreads_boosted_with_the_vm_follow_its_vcpus_and_are_fifo_at_their_priority() {
    let mut e = VmEngine::new(PolicyConfig::default(), 2).unwrap();
    e.set_iothread_policy(Some(IoThreadPolicy {
        prio: 5,
        mode: IoThreadMode::WithVm,
    }));
    let quiet = [obs(online(), 0), obs(online(), 0)];
    step_io(&mut e, 0, &quiet, &[0, 0]);
    assert!(e
        .iothread_decisions()
        .iter()
        .all(|d| d.sched == ThreadSched::Baseline));

    // The vCPUs are RR (the policy's class); the IOThreads FIFO at their own priority.
    step_io(
        &mut e,
        MS,
        &[obs(rt_task(50), 0), obs(online(), 0)],
        &[0, 0],
    );
    assert!(e.decisions()[0].sched.is_boosted());
    for d in e.iothread_decisions() {
        assert_eq!(d.sched, FIFO_5);
        assert!(d.reasons.contains(Reasons::IOTHREAD));
    }
    assert_eq!(e.boosted_threads(), 3);

    step_io(&mut e, 2 * MS, &quiet, &[MS, MS]);
    assert!(e
        .iothread_decisions()
        .iter()
        .all(|d| d.sched == ThreadSched::Baseline));
    // What they ran while boosted is the VM's boosted time.
    let io: u64 = (0..2)
        .map(|i| e.iothread_stats(i).unwrap().boosted_cpu_ns)
        .sum();
    assert_eq!(io, 2 * MS);
    assert!(e.vm_stats().boosted_cpu_ns >= io);

    // A priority outside the admin range is kept inside it.
    e.set_iothread_policy(Some(IoThreadPolicy {
        prio: 99,
        mode: IoThreadMode::Static,
    }));
    step_io(&mut e, 3 * MS, &quiet, &[MS, MS]);
    let max = PolicyConfig::default().prio_max;
    assert_eq!(
        e.iothread_decisions()[0].sched,
        ThreadSched::Rt {
            class: RtClass::Fifo,
            prio: max
        }
    );
    e.set_iothread_policy(None);
    step_io(&mut e, 4 * MS, &quiet, &[MS, MS]);
    assert_eq!(e.boosted_threads(), 0);
}

#[test]
fn static_iothreads_are_charged_to_the_vm_and_its_budget_bounds_them_with_the_vcpus() {
    let cfg = PolicyConfig {
        // Each thread could use more than the VM: the VM's bound must act.
        budget_ns: 25 * MS,
        max_continuous_ns: 25 * MS,
        vm_budget_ns: 30 * MS,
        vm_burst_ns: 10 * MS,
        ..PolicyConfig::default()
    };
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    e.set_iothread_policy(Some(IoThreadPolicy {
        prio: 5,
        mode: IoThreadMode::Static,
    }));
    // Every thread runs all the time; only boosted time counts against the budget.
    let (mut now, mut vcpu_run, mut io_run) = (0u64, 0u64, [0u64; 2]);
    step_io(&mut e, now, &[obs(online(), vcpu_run)], &io_run);
    // Static: boosted with no vCPU boosted.
    assert!(!e.decisions()[0].sched.is_boosted());
    assert!(e.iothread_decisions().iter().all(|d| d.sched == FIFO_5));

    // (interval end, boosted CPU of the whole VM in the interval)
    let mut boosted: Vec<(u64, u64)> = Vec::new();
    let mut refused_while_static = false;
    while now < 3 * cfg.budget_window_ns {
        let next = e
            .wake_at()
            .map_or(now + MS, |w| w.min(now + MS))
            .max(now + 1);
        let dt = next - now;
        let threads = usize::from(e.decisions()[0].sched.is_boosted())
            + e.iothread_decisions()
                .iter()
                .filter(|d| d.sched.is_boosted())
                .count();
        boosted.push((next, dt * threads as u64));
        now = next;
        vcpu_run += dt;
        for r in &mut io_run {
            *r += dt;
        }
        // The vCPU wants a boost for half of each window.
        let guest = if (now / (cfg.budget_window_ns / 2)) % 2 == 0 {
            rt_task(50)
        } else {
            online()
        };
        step_io(&mut e, now, &[obs(guest, vcpu_run)], &io_run);
        if e.vm_stats().refused_by == Some(OuterLimit::Vm) {
            // The VM refused: its IOThreads are back at their own attributes.
            assert!(e
                .iothread_decisions()
                .iter()
                .all(|d| d.sched == ThreadSched::Baseline && d.state == BoostState::Throttled));
            refused_while_static = true;
        }
    }
    assert!(
        refused_while_static,
        "the VM's budget never refused its IOThreads"
    );
    // In every window the VM's boosted CPU time, IOThreads included, is within its budget.
    for (i, &(end, _)) in boosted.iter().enumerate() {
        let start = end.saturating_sub(cfg.budget_window_ns);
        let in_window: u64 = boosted[..=i]
            .iter()
            .filter(|(t, _)| *t > start)
            .map(|(_, c)| c)
            .sum();
        assert!(
            in_window <= cfg.vm_budget_ns,
            "{in_window} ns boosted in the window ending at {end}"
        );
    }
    let io: u64 = (0..2)
        .map(|i| e.iothread_stats(i).unwrap().boosted_cpu_ns)
        .sum();
    let vcpu = e.stats(0).unwrap().boosted_cpu_ns;
    assert!(io > 0 && vcpu > 0);
    assert_eq!(e.vm_stats().boosted_cpu_ns, io + vcpu);
}

/// Steps `e` over `steps` ms: vCPU 0 spins (RT task, runs the whole time) and
/// the other vCPUs run an RT task for `duty` of each millisecond and halt in
/// between. Returns, per vCPU, the boosted CPU time seen over the last `tail` steps.
fn spinner_beside_periodic(
    e: &mut VmEngine,
    runs: &mut [u64],
    now: &mut u64,
    steps: u64,
    duty_ns: u64,
    tail: u64,
) -> Vec<u64> {
    let mut boosted = vec![0; runs.len()];
    for i in 0..steps {
        let o: Vec<_> = runs.iter().map(|&r| obs(rt_task(90), r)).collect();
        let d = e.step(*now, &o).to_vec();
        for (v, d) in d.iter().enumerate() {
            let ran = if v == 0 { MS } else { duty_ns };
            if i + tail >= steps && d.state == BoostState::Boosted {
                boosted[v] += ran;
            }
            runs[v] += ran;
        }
        *now += MS;
    }
    boosted
}

#[test]
fn a_spinner_refused_by_the_vm_budget_keeps_its_continuous_count_and_backs_off() {
    // The VM's burst bound (2 ms per 10 ms) refuses the spinner before its own
    // continuous limit (4 ms) is reached. It keeps running unboosted, so it has
    // not yielded: its boosted time adds up over the refusals until it is
    // throttled, and its throttles grow.
    let cfg = PolicyConfig {
        vm_burst_ns: 2 * MS,
        offender_streak: 0,
        ..PolicyConfig::default()
    };
    let mut e = VmEngine::new(cfg.clone(), 1).unwrap();
    let mut runs = [0];
    let mut now = 0;
    spinner_beside_periodic(&mut e, &mut runs, &mut now, 2_000, 0, 0);
    let stats = e.stats(0).unwrap();
    assert!(
        stats.throttles >= 3,
        "the spinner escaped its own throttle: {stats:?}"
    );
    // Backed off to the longest throttle: over 2 s, at most a continuous run per
    // throttle (and the first few shorter ones).
    assert!(
        stats.boosted_cpu_ns <= (stats.throttles + 1) * cfg.max_continuous_ns,
        "{stats:?}"
    );
}

#[test]
fn a_repeat_offender_vcpu_cuts_its_vms_budget_until_it_behaves() {
    let cfg = PolicyConfig::default();
    let mut e = VmEngine::new(cfg.clone(), 2).unwrap();
    let mut runs = [0, 0];
    let mut now = 0;
    // vCPU 0 spins, vCPU 1 is an RT task at 20% duty (inside its own budget) that yields every
    // millisecond: over 3 s the spinner backs off and the VM is an offender.
    let tail = 1_000;
    let boosted = spinner_beside_periodic(&mut e, &mut runs, &mut now, 3_000, 200_000, tail);
    let stats = e.vm_stats();
    assert!(stats.offender, "{stats:?}");
    assert_eq!(stats.offender_periods, 1, "{stats:?}");
    // Over the last second the VM's boosted time stays within the cut budget
    // (its long window, 10 of them, plus one window of slack for the edges).
    let windows = tail * MS / cfg.budget_window_ns;
    let cut = cfg.offender_share(cfg.vm_budget_ns);
    let used: u64 = boosted.iter().sum();
    assert!(
        used <= (windows + 1) * cut,
        "{used} > {} windows of {cut}",
        windows + 1
    );
    // The periodic vCPU, which never hit its own limits, got some of it.
    assert!(boosted[1] > 0, "{boosted:?}");
    assert_eq!(e.stats(1).unwrap().throttles, 0);

    // The spinner stops asking: a budget window after its last throttle ends,
    // the VM has its full budget back.
    let last_end = now + cfg.max_throttle_ns;
    while now <= last_end + cfg.budget_window_ns {
        let o = [obs(online(), runs[0]), obs(rt_task(90), runs[1])];
        e.step(now, &o);
        runs[1] += 200_000;
        now += MS;
    }
    assert!(!e.vm_stats().offender, "{:?}", e.vm_stats());
    let mut after = [runs[0], runs[1]];
    let mut boosted = 0;
    for _ in 0..cfg.budget_window_ns / MS {
        let o = [obs(online(), after[0]), obs(rt_task(90), after[1])];
        if e.step(now, &o)[1].state == BoostState::Boosted {
            boosted += 200_000;
        }
        after[1] += 200_000;
        now += MS;
    }
    // 20 ms of demand in the window: more than the cut budget allows.
    assert!(boosted > cut, "{boosted} <= {cut}");
}

#[test]
fn a_vm_whose_vcpus_only_halt_between_rt_bursts_is_never_an_offender() {
    let cfg = PolicyConfig::default();
    let mut e = VmEngine::new(cfg.clone(), 4).unwrap();
    let mut runs = [0u64; 4];
    let mut now = 0;
    // Four periodic RT vCPUs at 30% each: the VM's budget refuses them often,
    // which is not their fault.
    for _ in 0..3_000 {
        let o: Vec<_> = runs.iter().map(|&r| obs(rt_task(90), r)).collect();
        e.step(now, &o);
        for r in &mut runs {
            *r += 300_000;
        }
        now += MS;
    }
    let stats = e.vm_stats();
    assert!(stats.vm_throttles > 0, "{stats:?}");
    assert_eq!(stats.offender_periods, 0, "{stats:?}");
    for v in 0..4 {
        assert_eq!(e.stats(v).unwrap().throttles, 0);
    }
}
