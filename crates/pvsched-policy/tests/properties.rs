//! Property tests: whatever the guests write (in their lines and in the preempt
//! counts the host reads from their RAM) and whenever events happen, the engines
//! stay inside the admin limits, never let boosted CPU time in any window exceed
//! a thread's budget, its VM's budget or the host's cap, never start more
//! lock-holder grants than their bound, and end every boost.

use proptest::prelude::*;
use pvsched_abi::raw::{PvschedGuestLine, PVSCHED_GUEST_FLAG_ONLINE};
use pvsched_abi::{decode_guest_line, BoostState, GuestVcpuState};
use pvsched_policy::*;

/// One stretch of time: how long it lasts, each vCPU's guest line during it,
/// whether each vCPU thread burns its pCPU or sleeps (or, off its pCPU, waits
/// runnable), the preempt count the host reads for it, and its pCPU's load.
#[derive(Clone, Debug)]
struct Stretch {
    len_ns: u64,
    lines: Vec<[u8; 64]>,
    busy: Vec<bool>,
    waiting: Vec<bool>,
    preempt: Vec<Option<u32>>,
    load: Option<u32>,
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
        (0u64..=100, 1u32..=64, 0u32..=1000),
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
                (grant_100us, max_grants, contended_load),
            )| {
                let window = window_ms * 1_000_000;
                let budget = (window * budget_pct / 100).max(500_000);
                let quantum = quantum_100us * 100_000;
                let min_quantum = quantum.min(budget);
                let continuous = (continuous_ms * 1_000_000).max(quantum);
                // 0: off; otherwise inside the range the configuration allows.
                let grant = match grant_100us {
                    0 => 0,
                    g => (g * 100_000).clamp(min_quantum, continuous.min(LOCK_HOLDER_BOOST_MAX_NS)),
                };
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
                    max_continuous_ns: continuous,
                    min_quantum_ns: min_quantum,
                    throttle_ns: 5_000_000,
                    cs_extension_ns: cs_ms * 1_000_000,
                    deadline_period_ns: window.max(budget).min(10_000_000),
                    lock_holder_boost_ns: grant,
                    lock_holder_max_grants: max_grants,
                    cs_contended_load_permille: contended_load,
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
    // Mostly 0 or 1 (the values a real count takes), sometimes unknown or anything.
    let preempt = prop_oneof![
        Just(None),
        Just(Some(0u32)),
        Just(Some(1u32)),
        any::<u32>().prop_map(Some),
    ];
    let stretch = (
        1u64..=8_000_000,
        proptest::collection::vec(line, nr_vcpus),
        proptest::collection::vec(prop::bool::weighted(0.7), nr_vcpus),
        proptest::collection::vec(any::<bool>(), nr_vcpus),
        proptest::collection::vec(preempt, nr_vcpus),
        proptest::option::of(0u32..=1000),
    )
        .prop_map(|(len_ns, lines, busy, waiting, preempt, load)| Stretch {
            len_ns,
            lines,
            busy,
            waiting,
            preempt,
            load,
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

/// The most grant starts in any window `(t - w, t]`, the window the engine counts over.
fn grants_in_any_window(starts: &[u64], w: u64) -> usize {
    starts
        .iter()
        .map(|&t| starts.iter().filter(|&&s| s <= t && t - s < w).count())
        .max()
        .unwrap_or(0)
}

/// One VM under test: its engine, what its guest says now, and what its
/// threads did (the last thread is the interrupt path).
struct TestVm {
    engine: VmEngine,
    guests: Vec<GuestVcpuState>,
    busy: Vec<bool>,
    waiting: Vec<bool>,
    preempt: Vec<Option<u32>>,
    load: Option<u32>,
    run: Vec<u64>,
    wait: Vec<u64>,
    /// When each vCPU's lock-holder grants started.
    grants: Vec<Vec<u64>>,
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
            waiting: vec![false; n],
            preempt: vec![None; n],
            load: None,
            run: vec![0; n],
            wait: vec![0; n],
            grants: vec![vec![]; n],
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
            for i in 0..n {
                vm.waiting[i] = stretch.waiting[i];
                vm.preempt[i] = stretch.preempt[i];
            }
            vm.load = stretch.load;
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
                    let observations: Vec<VcpuObservation> = (0..vm.guests.len())
                        .map(|i| VcpuObservation {
                            guest: Some(vm.guests[i]),
                            run_ns: Some(vm.run[i]),
                            slices: None,
                            wait_ns: Some(vm.wait[i]),
                            preempt_count: vm.preempt[i],
                            pcpu_load_permille: vm.load,
                            runnable: None,
                        })
                        .collect();
                    let input = StepInput {
                        vcpus: &observations,
                        interrupt_path: Some(ThreadObservation { run_ns: Some(vm.path_run) }),
                        iothreads: &[],
                    };
                    let before: Vec<u64> = (0..vm.guests.len()).map(|i| vm.engine.stats(i).unwrap().lock_holder_grants).collect();
                    vm.engine.step_with(now, input, Some(&mut host));
                    for (i, b) in before.iter().enumerate() {
                        let after = vm.engine.stats(i).unwrap().lock_holder_grants;
                        prop_assert!(after - b <= 1);
                        if after > *b {
                            vm.grants[i].push(now);
                        }
                    }
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
                        } else if i < vm.wait.len() && vm.waiting[i] {
                            // Runnable, kept off its pCPU: run delay.
                            vm.wait[i] += next - now;
                        }
                    }
                }
                now = next;
            }
        }

        // Every boost ends: once the guest has no reasons left, one step unboosts all.
        for vm in &mut vms {
            let quiet = vec![VcpuObservation { guest: None, run_ns: None, slices: None, wait_ns: None, preempt_count: None, pcpu_load_permille: None, runnable: None }; vm.guests.len()];
            let input = StepInput { vcpus: &quiet, interrupt_path: Some(ThreadObservation { run_ns: Some(vm.path_run) }), iothreads: &[] };
            prop_assert!(vm.engine.step_with(now, input, Some(&mut host)).iter().all(|d| d.sched == ThreadSched::Baseline));
            prop_assert_eq!(vm.engine.interrupt_path_decision().unwrap().sched, ThreadSched::Baseline);
        }
        prop_assert_eq!(host.boosted_threads(), 0);
        prop_assert_eq!(host.wake_at(), None);

        let w = cfg.budget_window_ns;
        for vm in &vms {
            for starts in &vm.grants {
                prop_assert!(cfg.lock_holder_boost_ns > 0 || starts.is_empty());
                prop_assert!(grants_in_any_window(starts, w) <= cfg.lock_holder_max_grants as usize);
            }
        }
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

    #[test]
    fn a_guest_holding_preemption_disabled_forever_stays_inside_its_grant_bound_and_budgets(
        n in 1usize..=4,
        grant_100us in 1u64..=40,
        max_grants in 1u32..=64,
        runs_when_boosted in proptest::collection::vec(any::<bool>(), 4),
        step_us in 100u64..=2_000,
        windows in 2u64..=6,
        vm_budget_pct in 10u64..=100,
    ) {
        // Every vCPU reads preempt count 1 at every step and is kept off its pCPU
        // whenever it is not boosted (a constant run delay): a preempted lock holder
        // at every sample. Some run when boosted, some never get to run at all.
        let base = PolicyConfig::default();
        let cfg = PolicyConfig {
            cs_extension_ns: 0,
            lock_holder_boost_ns: (grant_100us * 100_000).min(base.max_continuous_ns),
            lock_holder_max_grants: max_grants,
            vm_budget_ns: base.budget_window_ns * vm_budget_pct / 100,
            ..base
        };
        let mut e = VmEngine::new(cfg.clone(), n).unwrap();
        let guest = GuestVcpuState { online: true, ..Default::default() };
        let (mut run, mut wait) = (vec![0u64; n], vec![0u64; n]);
        let mut intervals: Vec<Vec<Boosted>> = vec![vec![]; n];
        let mut grants: Vec<Vec<u64>> = vec![vec![]; n];
        let w = cfg.budget_window_ns;
        let mut now = 0;
        while now < windows * w {
            let observations: Vec<VcpuObservation> = (0..n)
                .map(|i| VcpuObservation {
                    guest: Some(guest),
                    run_ns: Some(run[i]),
                    slices: None,
                    wait_ns: Some(wait[i]),
                    preempt_count: Some(1),
                    pcpu_load_permille: None,
                    runnable: None,
                })
                .collect();
            let before: Vec<u64> = (0..n).map(|i| e.stats(i).unwrap().lock_holder_grants).collect();
            let decisions = e.step(now, &observations).to_vec();
            let next = e.wake_at().map_or(now + step_us * 1_000, |t| t.min(now + step_us * 1_000)).max(now + 1);
            for i in 0..n {
                if e.stats(i).unwrap().lock_holder_grants > before[i] {
                    grants[i].push(now);
                }
                let boosted = decisions[i].state == BoostState::Boosted;
                if boosted {
                    prop_assert_eq!(decisions[i].reasons, Reasons::LOCK_HOLDER);
                }
                let busy = boosted && runs_when_boosted[i];
                if boosted {
                    intervals[i].push(Boosted { start: now, end: next, busy });
                }
                if busy {
                    run[i] += next - now;
                } else {
                    wait[i] += next - now;
                }
            }
            now = next;
        }
        let g = cfg.lock_holder_boost_ns;
        let max = cfg.lock_holder_max_grants as usize;
        for i in 0..n {
            prop_assert!(!grants[i].is_empty(), "vCPU {} never granted", i);
            prop_assert!(grants_in_any_window(&grants[i], w) <= max);
            // Boosted wall time: the grants of one window and the tail of one before it.
            let wall: Vec<Boosted> = intervals[i].iter().map(|b| Boosted { busy: true, ..*b }).collect();
            let wall: Vec<&Boosted> = wall.iter().collect();
            let used = max_window_use(&wall, w);
            prop_assert!(used <= (max as u64 + 1) * g, "vCPU {} boosted {} ns of wall time in a window", i, used);
            let cpu: Vec<&Boosted> = intervals[i].iter().collect();
            prop_assert!(max_window_use(&cpu, w) <= cfg.budget_ns);
        }
        let all: Vec<&Boosted> = intervals.iter().flatten().collect();
        prop_assert!(max_window_use(&all, w) <= cfg.vm_budget_ns);
        prop_assert!(max_window_use(&all, cfg.effective_burst_window_ns()) <= cfg.vm_burst_ns);
        // A vCPU that never runs uses no budget: only the grant bound stops it, and
        // it gets that many grants in every window. A grant ends at the first step
        // with less than a quantum of it left and the next starts at the step after,
        // so one takes at most two steps more than its length; each window starts
        // its grants at most a step late.
        let step = step_us * 1_000;
        let slack = (windows + 1) * step;
        if runs_when_boosted.iter().take(n).all(|r| !r) && (max as u64) * (g + 2 * step) + slack <= w {
            for (i, starts) in grants.iter().enumerate() {
                prop_assert!(e.stats(i).unwrap().lock_holder_capped > 0);
                prop_assert_eq!(starts.len(), max * windows as usize);
            }
        }
    }
}
