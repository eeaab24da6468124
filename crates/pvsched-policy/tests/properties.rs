//! Property tests: whatever the guests write and whenever events happen,
//! the engines stay inside the admin limits, never let boosted CPU time in
//! any window exceed a thread's budget, its VM's budget or the host's cap,
//! and end every boost.

use proptest::prelude::*;
use pvsched_abi::raw::{PvschedGuestLine, PVSCHED_GUEST_FLAG_ONLINE};
use pvsched_abi::{decode_guest_line, BoostState, GuestVcpuState};
use pvsched_policy::*;

/// One stretch of time: how long it lasts, each vCPU's guest line during it,
/// and whether each vCPU thread burns its pCPU or sleeps.
#[derive(Clone, Debug)]
struct Stretch {
    len_ns: u64,
    lines: Vec<[u8; 64]>,
    busy: Vec<bool>,
}

fn config() -> impl Strategy<Value = PolicyConfig> {
    (
        1u8..=50,
        0u8..=49,
        1u64..=40,
        1u64..=100,
        1u64..=5,
        1u64..=60,
        0u64..=3,
        0u8..3,
    )
        .prop_map(
            |(
                prio_min,
                span,
                window_ms,
                budget_pct,
                quantum_100us,
                continuous_ms,
                cs_ms,
                class,
            )| {
                let window = window_ms * 1_000_000;
                let budget = (window * budget_pct / 100).max(500_000);
                let quantum = quantum_100us * 100_000;
                PolicyConfig {
                    rt_class: match class {
                        0 => RtClass::Fifo,
                        1 => RtClass::Rr,
                        _ => RtClass::Deadline,
                    },
                    prio_min,
                    prio_max: prio_min + span,
                    budget_window_ns: window.max(budget),
                    budget_ns: budget,
                    max_continuous_ns: (continuous_ms * 1_000_000).max(quantum),
                    min_quantum_ns: quantum.min(budget),
                    throttle_ns: 5_000_000,
                    cs_extension_ns: cs_ms * 1_000_000,
                    deadline_period_ns: window.max(budget).min(10_000_000),
                    ..Default::default()
                }
            },
        )
}

fn stretches(nr_vcpus: usize) -> impl Strategy<Value = Vec<Stretch>> {
    let line = (
        proptest::array::uniform32(any::<u8>()),
        proptest::array::uniform32(any::<u8>()),
        any::<bool>(),
    )
        .prop_map(|(a, b, force_online)| {
            let mut bytes = [0u8; 64];
            bytes[..32].copy_from_slice(&a);
            bytes[32..].copy_from_slice(&b);
            if force_online {
                // Most lines claim to be online so that boosts actually happen.
                bytes[12] |= PVSCHED_GUEST_FLAG_ONLINE as u8;
            }
            bytes
        });
    let stretch = (
        1u64..=8_000_000,
        proptest::collection::vec(line, nr_vcpus),
        proptest::collection::vec(prop::bool::weighted(0.7), nr_vcpus),
    )
        .prop_map(|(len_ns, lines, busy)| Stretch {
            len_ns,
            lines,
            busy,
        });
    proptest::collection::vec(stretch, 1..60)
}

/// A boosted interval of one thread as the engine's decisions imply it.
#[derive(Clone, Copy, Debug)]
struct Boosted {
    start: u64,
    end: u64,
    busy: bool,
}

fn boosted_cpu_in<'a>(intervals: impl IntoIterator<Item = &'a Boosted>, from: u64, to: u64) -> u64 {
    intervals
        .into_iter()
        .filter(|b| b.busy)
        .map(|b| b.end.min(to).saturating_sub(b.start.max(from)))
        .sum()
}

/// Checks that no window of `w` holds more than `budget` of busy boosted
/// time: the maximum is reached with a window edge on an interval edge, so
/// checking those is enough.
fn max_window_use(intervals: &[&Boosted], w: u64) -> u64 {
    let mut worst = 0;
    for b in intervals {
        for to in [b.end, b.start + w] {
            worst = worst.max(boosted_cpu_in(
                intervals.iter().copied(),
                to.saturating_sub(w),
                to,
            ));
        }
    }
    worst
}

/// One VM under test: its engine, what its guest says now, and what its
/// threads did (the last thread is the interrupt path).
struct TestVm {
    engine: VmEngine,
    guests: Vec<GuestVcpuState>,
    busy: Vec<bool>,
    run: Vec<u64>,
    path_run: u64,
    intervals: Vec<Vec<Boosted>>,
    boosted_since: Vec<Option<(u64, u64)>>,
    changed: bool,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_budget_holds_for_any_guest_and_timing(
        cfg in config(),
        sizes in proptest::collection::vec(1usize..=3, 1..=3),
        script in stretches(3),
        owners in proptest::collection::vec(0usize..3, 60),
        host_percent in prop_oneof![1u8..=10, 1u8..=100],
        vm_budget_pct in 1u64..=200,
        burst_window_pct in 5u64..=100,
        vm_burst_pct in 1u64..=200,
    ) {
        let burst_window = (cfg.budget_window_ns * burst_window_pct / 100).max(1);
        let cfg = PolicyConfig {
            host_budget_percent: host_percent,
            vm_budget_ns: (cfg.budget_window_ns * vm_budget_pct / 100).max(cfg.min_quantum_ns),
            burst_window_ns: burst_window,
            vm_burst_ns: (burst_window * vm_burst_pct / 100).max(cfg.min_quantum_ns),
            ..cfg
        };
        let threads: usize = sizes.iter().map(|n| n + 1).sum();
        let mut host = HostBudget::for_policy(&cfg, threads as u32).unwrap();
        let mut vms: Vec<TestVm> = sizes.iter().map(|&n| TestVm {
            engine: VmEngine::new(cfg.clone(), n).unwrap(),
            guests: vec![GuestVcpuState::default(); n],
            busy: vec![true; n + 1],
            run: vec![0; n],
            path_run: 0,
            intervals: vec![vec![]; n + 1],
            boosted_since: vec![None; n + 1],
            changed: true,
        }).collect();
        let mut now = 0u64;

        for (stretch, owner) in script.iter().zip(&owners) {
            // A stretch changes one VM's guest; the others go on as they were.
            let vm = &mut vms[owner % sizes.len()];
            let n = vm.guests.len();
            for (i, bytes) in stretch.lines.iter().take(n).enumerate() {
                vm.guests[i] = decode_guest_line(&PvschedGuestLine::from_bytes(bytes)).0;
            }
            for i in 0..=n {
                vm.busy[i] = stretch.busy.get(i).copied().unwrap_or(true);
            }
            vm.changed = true;
            let end = now + stretch.len_ns;
            while now < end {
                let host_due = host.wake_at().is_some_and(|w| w <= now);
                for vm in &mut vms {
                    let due = vm.engine.wake_at().is_some_and(|w| w <= now);
                    let boosted = vm.engine.boosted_threads() > 0;
                    // The caller's contract: step on a change, when the VM's
                    // own wake is due, or when the host's is and it has boosts.
                    if !(vm.changed || due || (host_due && boosted)) {
                        continue;
                    }
                    vm.changed = false;
                    let observations: Vec<VcpuObservation> = vm.guests.iter().zip(&vm.run)
                        .map(|(guest, run_ns)| VcpuObservation { guest: Some(*guest), run_ns: Some(*run_ns), slices: None, wait_ns: None, preempt_count: None })
                        .collect();
                    let input = StepInput {
                        vcpus: &observations,
                        interrupt_path: Some(ThreadObservation { run_ns: Some(vm.path_run) }),
                    };
                    vm.engine.step_with(now, input, Some(&mut host));
                }
                let mut next = end;
                for vm in &vms {
                    if let Some(w) = vm.engine.wake_at() {
                        next = next.min(w);
                    }
                }
                if let Some(w) = host.wake_at() {
                    next = next.min(w);
                }
                let next = next.max(now + 1);
                for vm in &mut vms {
                    let mut decisions = vm.engine.decisions().to_vec();
                    let path = vm.engine.interrupt_path_decision().unwrap_or_default();
                    prop_assert!(!(path.state == BoostState::Boosted && decisions.iter().all(|d| d.state != BoostState::Boosted)), "path boosted alone");
                    decisions.push(path);
                    for (i, d) in decisions.iter().enumerate() {
                        match d.sched {
                            ThreadSched::Rt { class, prio } => {
                                prop_assert_eq!(class, cfg.rt_class);
                                prop_assert!((cfg.prio_min..=cfg.prio_max).contains(&prio), "prio {} outside admin range", prio);
                                prop_assert_eq!(d.state, BoostState::Boosted);
                                prop_assert!(!d.reasons.is_empty());
                            }
                            ThreadSched::Deadline(r) => {
                                prop_assert_eq!(cfg.rt_class, RtClass::Deadline);
                                prop_assert_eq!(d.state, BoostState::Boosted);
                                prop_assert!(!d.reasons.is_empty());
                                // The kernel's share may never exceed what the budget allows.
                                prop_assert!(r.runtime_ns <= r.period_ns);
                                prop_assert!(r.runtime_ns <= cfg.max_continuous_ns.max(DEADLINE_MIN_RUNTIME_NS));
                                prop_assert!(
                                    u128::from(r.runtime_ns) * u128::from(cfg.budget_window_ns)
                                        <= u128::from(cfg.budget_ns.max(DEADLINE_MIN_RUNTIME_NS)) * u128::from(r.period_ns),
                                    "reservation {}/{} above budget {}/{}", r.runtime_ns, r.period_ns, cfg.budget_ns, cfg.budget_window_ns
                                );
                            }
                            ThreadSched::Baseline => prop_assert_ne!(d.state, BoostState::Boosted),
                        }
                        let busy = vm.busy[i];
                        if d.state == BoostState::Boosted {
                            vm.intervals[i].push(Boosted { start: now, end: next, busy });
                            // An idle interval is a yield: the continuous run restarts.
                            let (since, cpu) = vm.boosted_since[i].filter(|_| busy).unwrap_or((now, 0));
                            let cpu = cpu + if busy { next - now } else { 0 };
                            prop_assert!(cpu <= cfg.max_continuous_ns, "continuous boost {} > {}", cpu, cfg.max_continuous_ns);
                            vm.boosted_since[i] = Some((since, cpu));
                        } else {
                            vm.boosted_since[i] = None;
                        }
                        if busy {
                            if i < vm.run.len() {
                                vm.run[i] += next - now;
                            } else {
                                vm.path_run += next - now;
                            }
                        }
                    }
                }
                now = next;
            }
        }

        // Every boost ends: once the guest has no reasons left, one step unboosts all.
        for vm in &mut vms {
            let quiet = vec![VcpuObservation { guest: None, run_ns: None, slices: None, wait_ns: None, preempt_count: None }; vm.guests.len()];
            let input = StepInput { vcpus: &quiet, interrupt_path: Some(ThreadObservation { run_ns: Some(vm.path_run) }) };
            prop_assert!(vm.engine.step_with(now, input, Some(&mut host)).iter().all(|d| d.sched == ThreadSched::Baseline));
            prop_assert_eq!(vm.engine.interrupt_path_decision().unwrap().sched, ThreadSched::Baseline);
        }
        prop_assert_eq!(host.boosted_threads(), 0);
        prop_assert_eq!(host.wake_at(), None);

        let w = cfg.budget_window_ns;
        let mut everything = vec![];
        for vm in &vms {
            for list in &vm.intervals {
                let one: Vec<&Boosted> = list.iter().collect();
                let used = max_window_use(&one, w);
                prop_assert!(used <= cfg.budget_ns, "a thread used {} ns boosted in a window > budget {}", used, cfg.budget_ns);
            }
            let all: Vec<&Boosted> = vm.intervals.iter().flatten().collect();
            let used = max_window_use(&all, w);
            prop_assert!(used <= cfg.vm_budget_ns, "a VM used {} ns boosted in a window > VM budget {}", used, cfg.vm_budget_ns);
            everything.extend(all);
        }
        let used = max_window_use(&everything, w);
        prop_assert!(used <= host.budget_ns(), "the host used {} ns boosted in a window > host cap {}", used, host.budget_ns());

        // The same over the short burst window, for each VM and the host.
        let bw = cfg.effective_burst_window_ns();
        for vm in &vms {
            let all: Vec<&Boosted> = vm.intervals.iter().flatten().collect();
            let used = max_window_use(&all, bw);
            prop_assert!(used <= cfg.vm_burst_ns, "a VM used {} ns boosted in a burst window of {} > {}", used, bw, cfg.vm_burst_ns);
        }
        let (host_burst, host_burst_window) = host.burst().unwrap();
        prop_assert_eq!(host_burst_window, bw);
        let used = max_window_use(&everything, bw);
        prop_assert!(used <= host_burst, "the host used {} ns boosted in a burst window of {} > {}", used, bw, host_burst);
    }
}
