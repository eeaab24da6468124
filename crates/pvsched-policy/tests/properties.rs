//! Property tests: whatever the guest writes and whenever events happen,
//! the engine stays inside the admin limits, never lets a vCPU's boosted
//! CPU time in any window exceed its budget, and ends every boost.

use proptest::prelude::*;
use pvsched_abi::raw::{PvschedGuestLine, PVSCHED_GUEST_FLAG_ONLINE};
use pvsched_abi::{decode_guest_line, BoostState};
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
        any::<bool>(),
    )
        .prop_map(
            |(prio_min, span, window_ms, budget_pct, quantum_100us, continuous_ms, cs_ms, fifo)| {
                let window = window_ms * 1_000_000;
                let budget = (window * budget_pct / 100).max(500_000);
                let quantum = quantum_100us * 100_000;
                PolicyConfig {
                    rt_class: if fifo { RtClass::Fifo } else { RtClass::Rr },
                    prio_min,
                    prio_max: prio_min + span,
                    budget_window_ns: window.max(budget),
                    budget_ns: budget,
                    max_continuous_ns: (continuous_ms * 1_000_000).max(quantum),
                    min_quantum_ns: quantum.min(budget),
                    throttle_ns: 5_000_000,
                    cs_extension_ns: cs_ms * 1_000_000,
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

/// A boosted interval of one vCPU as the engine's decisions imply it.
#[derive(Clone, Copy, Debug)]
struct Boosted {
    start: u64,
    end: u64,
    busy: bool,
}

fn boosted_cpu_in(intervals: &[Boosted], from: u64, to: u64) -> u64 {
    intervals
        .iter()
        .filter(|b| b.busy)
        .map(|b| b.end.min(to).saturating_sub(b.start.max(from)))
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn limits_and_budget_hold_for_any_guest_and_timing(
        cfg in config(),
        (nr_vcpus, script) in (1usize..=3).prop_flat_map(|n| (Just(n), stretches(n))),
    ) {
        let mut engine = VmEngine::new(cfg.clone(), nr_vcpus).unwrap();
        let mut now = 0u64;
        let mut run = vec![0u64; nr_vcpus];
        // One extra thread: the VM's interrupt path, burning its pCPU throughout.
        let mut intervals: Vec<Vec<Boosted>> = vec![vec![]; nr_vcpus + 1];
        let mut boosted_since: Vec<Option<(u64, u64)>> = vec![None; nr_vcpus + 1];
        let mut path_run = 0u64;

        for stretch in &script {
            let guests: Vec<_> = stretch.lines.iter()
                .map(|bytes| decode_guest_line(&PvschedGuestLine::from_bytes(bytes)).0)
                .collect();
            let end = now + stretch.len_ns;
            // Hold this stretch's guest state, stepping whenever the engine asks.
            while now < end {
                let observations: Vec<VcpuObservation> = guests.iter().zip(&run)
                    .map(|(guest, run_ns)| VcpuObservation { guest: Some(*guest), run_ns: Some(*run_ns) })
                    .collect();
                let mut decisions = engine.step(now, &observations).to_vec();
                let path = engine.step_interrupt_path(now, Some(path_run));
                prop_assert_eq!(path.state == BoostState::Boosted && decisions.iter().all(|d| d.state != BoostState::Boosted), false, "path boosted alone");
                decisions.push(path);
                for d in &decisions {
                    match d.sched {
                        ThreadSched::Rt { class, prio } => {
                            prop_assert_eq!(class, cfg.rt_class);
                            prop_assert!((cfg.prio_min..=cfg.prio_max).contains(&prio), "prio {} outside admin range", prio);
                            prop_assert_eq!(d.state, BoostState::Boosted);
                            prop_assert!(!d.reasons.is_empty());
                        }
                        ThreadSched::Baseline => prop_assert_ne!(d.state, BoostState::Boosted),
                    }
                }
                let next = engine.wake_at().map_or(end, |w| w.min(end)).max(now + 1);
                path_run += next - now;
                for i in 0..=nr_vcpus {
                    let busy = stretch.busy.get(i).copied().unwrap_or(true);
                    let boosted = decisions[i].state == BoostState::Boosted;
                    if boosted {
                        intervals[i].push(Boosted { start: now, end: next, busy });
                        // An idle interval is a yield: the continuous run restarts.
                        let (since, cpu) = boosted_since[i].filter(|_| busy).unwrap_or((now, 0));
                        let cpu = cpu + if busy { next - now } else { 0 };
                        prop_assert!(cpu <= cfg.max_continuous_ns, "continuous boost {} > {}", cpu, cfg.max_continuous_ns);
                        boosted_since[i] = Some((since, cpu));
                    } else {
                        boosted_since[i] = None;
                    }
                    if i < nr_vcpus && busy {
                        run[i] += next - now;
                    }
                }
                now = next;
            }
        }

        // Every boost ends: once the guest has no reasons left, one step unboosts all.
        let quiet = vec![VcpuObservation { guest: None, run_ns: None }; nr_vcpus];
        prop_assert!(engine.step(now, &quiet).iter().all(|d| d.sched == ThreadSched::Baseline));
        prop_assert_eq!(engine.step_interrupt_path(now, Some(path_run)).sched, ThreadSched::Baseline);

        // The budget holds in every window: the maximum is reached with a
        // window edge on an interval edge, so checking those is enough.
        let w = cfg.budget_window_ns;
        for list in &intervals {
            for b in list {
                for to in [b.end, b.start + w] {
                    let used = boosted_cpu_in(list, to.saturating_sub(w), to);
                    prop_assert!(used <= cfg.budget_ns, "window ending {}: {} ns boosted > budget {}", to, used, cfg.budget_ns);
                }
            }
        }
    }
}
