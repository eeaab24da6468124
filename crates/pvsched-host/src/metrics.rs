//! The daemon's metrics: every family is built from one [`DaemonStatus`]
//! snapshot at scrape time by a `prometheus-client` collector and encoded
//! by its OpenMetrics text encoder. The RT loop never touches the library:
//! it publishes the snapshot, and the stats thread renders it.
//!
//! Names follow the Prometheus conventions: the `pvsched_` prefix, base
//! units (durations in seconds, sizes in bytes, fractions as `_ratio`),
//! `_total` only on counters (the encoder adds it), `_info` for the build,
//! and the labels `vm` and `vcpu`. Rendering is formatting into memory
//! only: the stats thread's seccomp filter needs no call for it.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::qmp::KvmVcpuStats;
use crate::status::{DaemonStatus, Histogram, IntrospectionStatus, VmStatus};

/// The `Content-Type` of `/metrics`: what Prometheus negotiates for the
/// OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The prefix of every family.
pub const PREFIX: &str = "pvsched";

const NS_PER_S: f64 = 1e9;

impl DaemonStatus {
    /// The metrics of this snapshot in the OpenMetrics text format (ends with `# EOF`).
    pub fn openmetrics(&self) -> String {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register(
            "build",
            // The registry ends the help of what it registers with a full stop.
            "The daemon's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        // A registry owns its collectors ('static): this scrape's copy of the
        // snapshot, dropped with the registry when the answer is written.
        registry.register_collector(Box::new(SnapshotCollector(self.clone())));
        let mut out = String::new();
        // Writing into a String cannot fail; a collector error would be a
        // bug in the encoding below, so it is reported in the body itself.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            out = format!("# metrics encoding failed: {e}\n# EOF\n");
        }
        out
    }
}

/// Encodes one snapshot.
#[derive(Debug)]
struct SnapshotCollector(DaemonStatus);

/// A series' labels, in order.
type Labels = Vec<(&'static str, String)>;

fn vm_labels(vm: &VmStatus) -> Labels {
    vec![("vm", vm.name.clone())]
}

fn vcpu_labels(vm: &VmStatus, slot: u32) -> Labels {
    vec![("vm", vm.name.clone()), ("vcpu", slot.to_string())]
}

/// The one unlabelled series of a family.
fn one<V>(v: V) -> [(Labels, V); 1] {
    [(Labels::new(), v)]
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / NS_PER_S
}

/// One counter family with a series per row (no labels: one unlabelled series).
fn counter<V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, V, u64>(&v, None)?;
    }
    Ok(())
}

/// One gauge family with a series per row.
fn gauge<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in rows {
        family.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// A duration histogram in seconds, from its per-bucket counts.
fn histogram(enc: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> fmt::Result {
    let mut buckets: Vec<(f64, u64)> = h
        .bounds_ns
        .iter()
        .zip(&h.counts)
        .map(|(&b, &c)| (seconds(b), c))
        .collect();
    // The last count is the `+Inf` bucket; a snapshot with fewer counts than
    // bounds still gets one, so `+Inf` always equals the count.
    let below: u64 = buckets.iter().map(|(_, c)| c).sum();
    buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
    let mut family =
        enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    family.encode_histogram::<NoLabelSet>(seconds(h.sum_ns), h.count, &buckets, None)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        self.daemon_families(&mut enc)?;
        per_vm_families(&mut enc, &s.vms)?;
        introspection_families(&mut enc, &s.vms)?;
        kvm_families(&mut enc, &s.vms)?;
        self.halt_poll_families(&mut enc)?;
        Ok(())
    }
}

impl SnapshotCollector {
    /// The loop, the state file, the trust boundary and the budgets.
    fn daemon_families(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        counter(enc, "loops", "Loop iterations.", None, one(s.loops))?;
        counter(
            enc,
            "engine_steps",
            "Loop iterations that ran the policy engine.",
            None,
            one(s.steps),
        )?;
        gauge(
            enc,
            "loop_period",
            "The loop's configured period.",
            Some(&Unit::Seconds),
            one(s.period_us as f64 / 1e6),
        )?;
        histogram(
            enc,
            "apply_latency",
            "Guest-line read to sched_setattr done.",
            &s.apply_latency,
        )?;
        histogram(
            enc,
            "loop_duration",
            "Duration of one loop iteration.",
            &s.loop_duration,
        )?;
        gauge(
            enc,
            "managed_threads",
            "Threads with a restore record.",
            None,
            one(s.managed_threads as u64),
        )?;
        gauge(
            enc,
            "state_durable",
            "1 when every restore record is durable in the state file.",
            None,
            one(u64::from(s.state_durable)),
        )?;
        for (name, help, v) in [
            (
                "deferred_applies",
                "Changes deferred until the thread's restore record was durable.",
                s.deferred_applies,
            ),
            (
                "identity_refusals",
                "Applies and restores refused because the thread id no longer named the recorded thread.",
                s.identity_refusals,
            ),
            (
                "state_write_errors",
                "Failed state-file writes (retried).",
                s.state_write_errors,
            ),
            (
                "shared_file_drops",
                "VMs dropped because their shared file was truncated or replaced.",
                s.shared_file_drops,
            ),
        ] {
            counter(enc, name, help, None, one(v))?;
        }
        for (name, help, values) in [
            (
                "vm_refusals",
                "VMs not managed (wrong user, QMP peer, threads, shared file, foreign header), once per VM and reason.",
                &s.trust.refusals,
            ),
            (
                "region_inits",
                "Fresh headers written over a shared file, by what was there before.",
                &s.trust.region_inits,
            ),
        ] {
            counter(
                enc,
                name,
                help,
                None,
                values
                    .iter()
                    .map(|(reason, &n)| (vec![("reason", reason.clone())], n)),
            )?;
        }
        for (name, help, ns) in [
            (
                "budget_window",
                "Length of the sliding window the VM and host budgets are measured over.",
                s.budget_window_ns,
            ),
            (
                "host_budget",
                "Most boosted CPU time of all VMs together in a budget window (the host cap).",
                s.host_budget_ns,
            ),
            (
                "host_budget_used",
                "Boosted CPU time charged to the host cap in the window ending now (an upper bound).",
                s.host_budget_used_ns,
            ),
        ] {
            gauge(enc, name, help, Some(&Unit::Seconds), one(seconds(ns)))?;
        }
        Ok(())
    }

    /// KVM's host halt-poll parameters, the controller's decision, its
    /// reason and input (only with `halt_poll` = `observe` or `tune`).
    fn halt_poll_families(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let Some(h) = &self.0.halt_poll else {
            return Ok(());
        };
        // `host`: as last read or written; `decision`: the controller's output.
        let sources: Vec<(Labels, pvsched_policy::KvmHaltPoll)> = [
            ("host", h.current),
            ("decision", h.decision.map(|d| d.params)),
        ]
        .into_iter()
        .filter_map(|(source, p)| p.map(|p| (vec![("source", source.to_owned())], p)))
        .collect();
        type Param = fn(&pvsched_policy::KvmHaltPoll) -> f64;
        let params: [(&str, &str, Option<&Unit>, Param); 4] = [
            (
                "halt_poll_window",
                "KVM's halt_poll_ns: the longest window a vCPU may poll.",
                Some(&Unit::Seconds),
                |p| f64::from(p.halt_poll_ns) / NS_PER_S,
            ),
            (
                "halt_poll_grow_start",
                "KVM's halt_poll_ns_grow_start: a vCPU's first non-zero window.",
                Some(&Unit::Seconds),
                |p| f64::from(p.grow_start_ns) / NS_PER_S,
            ),
            (
                "halt_poll_grow_multiplier",
                "KVM's halt_poll_ns_grow: growth factor of a vCPU's window.",
                None,
                |p| f64::from(p.grow),
            ),
            (
                "halt_poll_shrink_divisor",
                "KVM's halt_poll_ns_shrink: shrink divisor of a vCPU's window (0: reset).",
                None,
                |p| f64::from(p.shrink),
            ),
        ];
        for (name, help, unit, f) in params {
            gauge(
                enc,
                name,
                help,
                unit,
                sources.iter().map(|(l, p)| (l.clone(), f(p))),
            )?;
        }
        if let Some(d) = &h.decision {
            gauge(
                enc,
                "halt_poll_load_cap",
                "The longest window the host load left room for.",
                Some(&Unit::Seconds),
                one(f64::from(d.load_cap_ns) / NS_PER_S),
            )?;
            gauge(
                enc,
                "halt_poll_reason",
                "1 for the reason of the last decision.",
                None,
                pvsched_policy::HaltPollReason::ALL.iter().map(|r| {
                    (
                        vec![("reason", r.name().to_owned())],
                        u64::from(*r == d.reason),
                    )
                }),
            )?;
        }
        if let Some(i) = &h.input {
            gauge(
                enc,
                "halt_poll_load_ratio",
                "Host pCPU load the last decision saw.",
                None,
                one(f64::from(i.load_permille.min(1000)) / 1000.0),
            )?;
            gauge(
                enc,
                "halt_poll_contended",
                "1 when the vCPUs' pCPUs were contended.",
                None,
                one(u64::from(i.contended)),
            )?;
            // No series when nothing polled over the interval: there is no ratio.
            gauge(
                enc,
                "halt_poll_success_ratio",
                "Fraction of polling time that caught a wake-up over the last interval.",
                None,
                i.polls
                    .success_permille()
                    .map(|p| (Labels::new(), f64::from(p) / 1000.0)),
            )?;
        }
        counter(
            enc,
            "halt_poll_decisions",
            "Controller rounds by reason.",
            None,
            pvsched_policy::HaltPollReason::ALL.iter().map(|r| {
                (
                    vec![("reason", r.name().to_owned())],
                    h.reasons.get(r.name()).copied().unwrap_or(0),
                )
            }),
        )?;
        counter(
            enc,
            "halt_poll_writes",
            "Writes of new halt-poll parameters.",
            None,
            one(h.writes),
        )?;
        gauge(
            enc,
            "halt_poll_error",
            "1 when the last round failed.",
            None,
            one(u64::from(h.last_error.is_some())),
        )
    }
}

/// The per-VM counters and gauges, one series per VM.
fn per_vm_families(enc: &mut DescriptorEncoder, vms: &[VmStatus]) -> fmt::Result {
    type Count = fn(&VmStatus) -> u64;
    let counts: [(&str, &str, Count); 21] = [
        ("boosts", "Boosts started.", |v| v.counters.boosts),
        ("throttles", "Throttles.", |v| v.counters.throttles),
        (
            "invalid_guest_writes",
            "Guest line writes with invalid fields (ignored).",
            |v| v.counters.invalid_writes,
        ),
        (
            "cpu_id_mismatches",
            "Guest lines whose cpu_id is not the slot index (ignored).",
            |v| v.counters.cpu_id_mismatches,
        ),
        ("torn_reads", "Guest lines that never settled.", |v| {
            v.counters.torn_reads
        }),
        (
            "header_repairs",
            "Overwritten host header lines repaired.",
            |v| v.counters.header_repairs,
        ),
        (
            "guest_version_mismatches",
            "Guests refused for another major version.",
            |v| v.counters.version_mismatches,
        ),
        ("apply_errors", "Failed scheduling calls.", |v| {
            v.counters.apply_errors
        }),
        ("applies", "Scheduling changes applied.", |v| {
            v.counters.applies
        }),
        (
            "vm_throttles",
            "Times the VM's own budget refused it boosts.",
            |v| v.counters.vm_throttles,
        ),
        (
            "host_throttles",
            "Times the host-wide cap refused the VM boosts.",
            |v| v.counters.host_throttles,
        ),
        (
            "offender_periods",
            "Times the VM became a repeat offender and had its budgets cut.",
            |v| v.counters.offender_periods,
        ),
        (
            "stale_guests",
            "Times the guest's heartbeat stopped and its requests were ignored.",
            |v| v.counters.stale_guests,
        ),
        (
            "expired_idle_requests",
            "Boost requests of idle vCPUs expired by the host.",
            |v| v.counters.expired_idle_requests,
        ),
        (
            "preempt_count_samples",
            "vCPU samples taken only because the guest's preempt count was non-zero.",
            |v| v.counters.preempt_count_samples,
        ),
        (
            "lock_holder_grants",
            "Directed boosts of vCPUs preempted on the host inside a critical section.",
            |v| v.counters.lock_holder_grants,
        ),
        (
            "lock_holder_capped",
            "Times a preempted lock holder was refused a grant by lock_holder_max_grants.",
            |v| v.counters.lock_holder_capped,
        ),
        (
            "doorbell_rings",
            "Doorbell rings the daemon received from the guest (0 off the doorbell channel).",
            |v| v.doorbell.as_ref().map_or(0, |d| d.rings_received),
        ),
        (
            "doorbell_interrupts",
            "Interrupts the daemon sent the guest on its doorbell.",
            |v| v.doorbell.as_ref().map_or(0, |d| d.interrupts_sent),
        ),
        (
            "guest_doorbell_rung",
            "Rings the guest says it sent (guest-written, statistics only).",
            |v| v.doorbell.as_ref().map_or(0, |d| d.guest_rung),
        ),
        (
            "guest_doorbell_suppressed",
            "Rings the guest says it held back (guest-written, statistics only).",
            |v| v.doorbell.as_ref().map_or(0, |d| d.guest_suppressed),
        ),
    ];
    for (name, help, f) in counts {
        counter(
            enc,
            name,
            help,
            None,
            vms.iter().map(|v| (vm_labels(v), f(v))),
        )?;
    }
    counter(
        enc,
        "boosted",
        "CPU time of boosted vCPU threads.",
        Some(&Unit::Seconds),
        vms.iter()
            .map(|v| (vm_labels(v), seconds(v.counters.boosted_ns))),
    )?;
    for (name, help, ns) in [
        (
            "vm_budget",
            "Most boosted CPU time of the VM (all its threads) in a budget window.",
            (|v| v.budget_ns) as fn(&VmStatus) -> u64,
        ),
        (
            "vm_budget_used",
            "Boosted CPU time charged to the VM in the window ending at its last step (an upper bound).",
            |v| v.budget_used_ns,
        ),
    ] {
        gauge(
            enc,
            name,
            help,
            Some(&Unit::Seconds),
            vms.iter().map(|v| (vm_labels(v), seconds(ns(v)))),
        )?;
    }
    type Level = fn(&VmStatus) -> u64;
    let levels: [(&str, &str, Level); 3] = [
        ("vcpus", "vCPU threads managed.", |v| {
            v.vcpus.iter().filter(|c| c.tid.is_some()).count() as u64
        }),
        ("vcpus_boosted", "vCPUs boosted now.", |v| {
            v.vcpus.iter().filter(|c| c.state == "boosted").count() as u64
        }),
        ("guest_attached", "1 when the guest negotiated.", |v| {
            u64::from(v.features != 0)
        }),
    ];
    for (name, help, f) in levels {
        gauge(
            enc,
            name,
            help,
            None,
            vms.iter().map(|v| (vm_labels(v), f(v))),
        )?;
    }
    Ok(())
}

/// Introspection of guest RAM: per VM, and the preempt count per vCPU.
fn introspection_families(enc: &mut DescriptorEncoder, vms: &[VmStatus]) -> fmt::Result {
    type Level = fn(&IntrospectionStatus) -> u64;
    let levels: [(&str, &str, Option<&Unit>, Level); 4] = [
        (
            "guest_ram_mapped",
            "1 when the guest's RAM is mapped for introspection.",
            None,
            |i| u64::from(i.state == "mapped"),
        ),
        (
            "guest_ram_ranges",
            "RAM ranges of the guest-physical to backend-offset table.",
            None,
            |i| u64::from(i.ranges),
        ),
        (
            "guest_ram",
            "Guest RAM the mapped ranges cover.",
            Some(&Unit::Bytes),
            |i| i.ram_bytes,
        ),
        (
            "cpu_info_entries",
            "CPU-info entries in use (published by the guest, valid, inside its RAM).",
            None,
            |i| u64::from(i.valid_entries),
        ),
    ];
    for (name, help, unit, f) in levels {
        gauge(
            enc,
            name,
            help,
            unit,
            vms.iter().map(|v| (vm_labels(v), f(&v.introspection))),
        )?;
    }
    counter(
        enc,
        "preempt_count_reads",
        "Preempt counts read from guest RAM.",
        None,
        vms.iter().map(|v| (vm_labels(v), v.introspection.reads)),
    )?;
    gauge(
        enc,
        "guest_preempt_count",
        "Last preempt count read from guest RAM (ignored bits masked).",
        None,
        vms.iter().flat_map(|v| {
            v.vcpus.iter().filter_map(move |c| {
                c.preempt_count
                    .map(|p| (vcpu_labels(v, c.slot), u64::from(p)))
            })
        }),
    )
}

/// KVM's per-vCPU statistics (`query-stats`), one counter family each;
/// times in seconds.
fn kvm_families(enc: &mut DescriptorEncoder, vms: &[VmStatus]) -> fmt::Result {
    for (i, stat) in KvmVcpuStats::NAMES.iter().enumerate() {
        let value = |raw: u64| match stat.strip_suffix("_ns") {
            Some(_) => seconds(raw),
            None => raw as f64,
        };
        let (name, unit) = match stat.strip_suffix("_ns") {
            Some(base) => (format!("kvm_{base}"), Some(&Unit::Seconds)),
            None => (format!("kvm_{stat}"), None),
        };
        let rows = vms.iter().flat_map(|v| {
            v.vcpus.iter().filter_map(move |c| {
                c.kvm
                    .as_ref()
                    .and_then(|k| k.values()[i])
                    .map(|raw| (vcpu_labels(v, c.slot), value(raw)))
            })
        });
        // Counts stay integers; times are fractional seconds.
        if unit.is_some() {
            counter(
                enc,
                &name,
                &format!("KVM's {stat} of the vCPU (query-stats)."),
                unit,
                rows,
            )?;
        } else {
            counter(
                enc,
                &name,
                &format!("KVM's {stat} of the vCPU (query-stats)."),
                unit,
                rows.map(|(l, v)| (l, v as u64)),
            )?;
        }
    }
    Ok(())
}

/// Every family name (with its unit suffix) the daemon can export, and its
/// type: for checking what dashboards and documents refer to.
pub fn family_names() -> Vec<(String, String)> {
    let mut everything = DaemonStatus {
        halt_poll: Some(crate::haltpoll::HaltPollStatus {
            current: Some(Default::default()),
            decision: Some(pvsched_policy::haltpoll::HaltPollDecision {
                params: Default::default(),
                reason: pvsched_policy::HaltPollReason::ALL[0],
                load_cap_ns: 0,
            }),
            input: Some(pvsched_policy::haltpoll::HaltPollInput {
                polls: pvsched_policy::haltpoll::PollDelta {
                    success_ns: 1,
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    everything.vms.push(VmStatus::default());
    everything
        .openmetrics()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use pvsched_policy::haltpoll::{HaltPollDecision, HaltPollInput, HaltPollReason, KvmHaltPoll};

    use super::*;
    use crate::haltpoll::HaltPollStatus;
    use crate::status::{DoorbellStatus, TrustCounters, VcpuStatus, VmCounters};
    use crate::trust::{InitReason, RefusalReason};

    /// A snapshot with something in every family: two VMs (one with a
    /// name that needs escaping), vCPUs with KVM statistics and preempt
    /// counts, the halt-poll controller, every trust reason, observations.
    fn busy_snapshot() -> DaemonStatus {
        let p = KvmHaltPoll {
            halt_poll_ns: 50_000,
            grow: 2,
            grow_start_ns: 10_000,
            shrink: 0,
        };
        let mut s = DaemonStatus {
            period_us: 1_000,
            loops: 1234,
            steps: 99,
            managed_threads: 3,
            state_durable: true,
            budget_window_ns: 100_000_000,
            host_budget_ns: 50_000_000,
            host_budget_used_ns: 12_500_000,
            trust: TrustCounters {
                refusals: RefusalReason::ALL
                    .iter()
                    .map(|r| (r.label().to_owned(), 0))
                    .collect(),
                region_inits: InitReason::ALL
                    .iter()
                    .map(|r| (r.label().to_owned(), 0))
                    .collect(),
            },
            halt_poll: Some(HaltPollStatus {
                current: Some(p),
                decision: Some(HaltPollDecision {
                    params: p,
                    reason: HaltPollReason::PollsFail,
                    load_cap_ns: 175_000,
                }),
                input: Some(HaltPollInput {
                    load_permille: 250,
                    contended: true,
                    polls: pvsched_policy::haltpoll::PollDelta {
                        success_ns: 3,
                        fail_ns: 1,
                        ..Default::default()
                    },
                }),
                writes: 3,
                reasons: [("polls-fail".to_owned(), 2)].into_iter().collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        *s.trust.refusals.get_mut("wrong_user").unwrap() = 2;
        for ns in [500, 7_000, 7_000, 2_000_000, u64::MAX / 2] {
            s.apply_latency.observe(ns);
        }
        s.loop_duration.observe(40_000);
        s.vms.push(VmStatus {
            name: "a\"b".into(),
            features: 1,
            budget_ns: 30_000_000,
            budget_used_ns: 7_000_000,
            counters: VmCounters {
                boosts: 3,
                throttles: 1,
                boosted_ns: 1_500_000_000,
                invalid_writes: 4,
                ..Default::default()
            },
            doorbell: Some(DoorbellStatus {
                rings_received: 5,
                guest_rung: 6,
                ..Default::default()
            }),
            vcpus: vec![VcpuStatus {
                slot: 0,
                tid: Some(10),
                state: "boosted".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        s.vms.push(VmStatus {
            name: "vm".into(),
            introspection: IntrospectionStatus {
                state: "mapped".into(),
                detail: "ram".into(),
                ranges: 3,
                ram_bytes: 1 << 30,
                valid_entries: 1,
                reads: 42,
                ..Default::default()
            },
            vcpus: vec![
                VcpuStatus {
                    slot: 0,
                    tid: Some(20),
                    preempt_count: Some(2),
                    kvm: Some(KvmVcpuStats {
                        halt_exits: Some(7),
                        halt_wait_ns: Some(1_500_000_000),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VcpuStatus {
                    slot: 1,
                    tid: Some(21),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        s
    }

    /// The samples of an exposition by name: each one's labels and value.
    type Series = BTreeMap<String, Vec<(Vec<(String, String)>, f64)>>;

    /// One sample line: its name, labels (in order) and value.
    fn parse_sample(line: &str) -> (String, Vec<(String, String)>, f64) {
        let name_end = line.find(['{', ' ']).expect("a sample has a value");
        let name = line[..name_end].to_owned();
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut pos = 0;
            loop {
                let eq = inner[pos..].find("=\"").expect("label=\"value\"") + pos;
                let key = inner[pos..eq].to_owned();
                let mut value = String::new();
                let mut it = inner[eq + 2..].char_indices();
                let close = loop {
                    match it.next().expect("a label value ends with a quote") {
                        (i, '"') => break eq + 2 + i,
                        (_, '\\') => match it.next().expect("an escape has a character").1 {
                            'n' => value.push('\n'),
                            c @ ('\\' | '"') => value.push(c),
                            c => panic!("bad escape \\{c} in {line}"),
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key, value));
                match inner.get(close + 1..close + 2) {
                    Some(",") => pos = close + 2,
                    Some("}") => {
                        rest = &inner[close + 2..];
                        break;
                    }
                    other => panic!("unexpected {other:?} after a label in {line}"),
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("one space before the value in {line}"));
        let value = value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("the value of {line} is a number"));
        (name, labels, value)
    }

    fn is_snake_case(s: &str) -> bool {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !s.starts_with(|c: char| c.is_ascii_digit())
    }

    /// Checks the whole exposition strictly and returns its series by name.
    fn check_strictly(text: &str) -> Series {
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last(), Some(&"# EOF"), "# EOF ends the exposition");
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(lines.iter().filter(|l| **l == "# EOF").count(), 1);
        let mut families = BTreeSet::new();
        let mut series = BTreeSet::new();
        let mut by_name: BTreeMap<String, Vec<_>> = BTreeMap::new();
        let mut family: Option<(String, String)> = None;
        let mut i = 0;
        while i < lines.len() - 1 {
            let line = lines[i];
            assert!(!line.is_empty(), "no empty line");
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, help) = help.split_once(' ').expect("HELP has a text");
                assert!(!help.trim().is_empty(), "{name} has a help text");
                assert!(
                    name.starts_with("pvsched_") && is_snake_case(name),
                    "{name}"
                );
                for word in name.split('_') {
                    assert!(
                        !["ns", "us", "ms", "permille", "percent", "micros", "millis"]
                            .contains(&word),
                        "{name}: not a base unit"
                    );
                }
                assert!(
                    !name.ends_with("_total"),
                    "{name}: the family name has no _total"
                );
                assert!(families.insert(name.to_owned()), "family {name} twice");
                let ty = lines[i + 1]
                    .strip_prefix(&format!("# TYPE {name} "))
                    .unwrap_or_else(|| panic!("TYPE follows HELP of {name}"));
                assert!(
                    ["counter", "gauge", "histogram", "info"].contains(&ty),
                    "{name} {ty}"
                );
                i += 2;
                if let Some(unit) = lines[i].strip_prefix(&format!("# UNIT {name} ")) {
                    assert!(
                        name.ends_with(&format!("_{unit}")),
                        "{name} ends with its unit"
                    );
                    assert!(["seconds", "bytes"].contains(&unit), "{name}: base unit");
                    i += 1;
                }
                family = Some((name.to_owned(), ty.to_owned()));
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line}");
            let (fam, ty) = family.as_ref().expect("a sample follows its family");
            let (name, labels, value) = parse_sample(line);
            let suffixes: &[&str] = match ty.as_str() {
                "counter" => &["_total"],
                "gauge" => &[""],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => unreachable!(),
            };
            assert!(
                suffixes.iter().any(|s| name == format!("{fam}{s}")),
                "{name} is a sample of {fam} ({ty})"
            );
            assert_eq!(
                ty == "counter",
                name.ends_with("_total"),
                "{name}: _total only on counters"
            );
            if ty == "counter" {
                assert!(value >= 0.0, "{line}: counters are not negative");
            }
            for (k, _) in &labels {
                assert!(
                    ["vm", "vcpu", "reason", "source", "le", "version"].contains(&k.as_str()),
                    "{name}: label {k}"
                );
            }
            let key = format!("{name}{labels:?}");
            assert!(series.insert(key), "duplicate series {line}");
            by_name.entry(name).or_default().push((labels, value));
            i += 1;
        }
        by_name
    }

    fn value(series: &Series, name: &str, labels: &[(&str, &str)]) -> f64 {
        series
            .get(name)
            .and_then(|rows| {
                rows.iter().find(|(l, _)| {
                    l.len() == labels.len()
                        && l.iter()
                            .zip(labels)
                            .all(|((k, v), (k2, v2))| k == k2 && v == v2)
                })
            })
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"))
            .1
    }

    #[test]
    fn exposition_is_strict_openmetrics() {
        for s in [busy_snapshot(), DaemonStatus::default()] {
            let series = check_strictly(&s.openmetrics());
            assert!(series.contains_key("pvsched_build_info"));
        }
        // Histograms: ascending bounds, cumulative counts, +Inf equal to the count.
        let series = check_strictly(&busy_snapshot().openmetrics());
        for h in [
            "pvsched_apply_latency_seconds",
            "pvsched_loop_duration_seconds",
        ] {
            let buckets = &series[&format!("{h}_bucket")];
            let bounds: Vec<f64> = buckets
                .iter()
                .map(|(l, _)| {
                    let le = &l[0].1;
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    }
                })
                .collect();
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{h} bounds ascend");
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{h} is cumulative"
            );
            assert_eq!(bounds.last(), Some(&f64::INFINITY));
            assert_eq!(
                buckets.last().unwrap().1,
                value(&series, &format!("{h}_count"), &[])
            );
        }
    }

    #[test]
    fn known_snapshot_has_its_values() {
        let s = busy_snapshot();
        let text = s.openmetrics();
        let series = check_strictly(&text);
        let ab = [("vm", "a\"b")];
        assert_eq!(value(&series, "pvsched_boosts_total", &ab), 3.0);
        assert_eq!(value(&series, "pvsched_throttles_total", &ab), 1.0);
        assert_eq!(value(&series, "pvsched_boosted_seconds_total", &ab), 1.5);
        assert_eq!(
            value(&series, "pvsched_invalid_guest_writes_total", &ab),
            4.0
        );
        assert_eq!(value(&series, "pvsched_doorbell_rings_total", &ab), 5.0);
        assert_eq!(
            value(&series, "pvsched_guest_doorbell_rung_total", &ab),
            6.0
        );
        assert_eq!(
            value(&series, "pvsched_doorbell_interrupts_total", &ab),
            0.0
        );
        assert_eq!(value(&series, "pvsched_vcpus", &ab), 1.0);
        assert_eq!(value(&series, "pvsched_vcpus_boosted", &ab), 1.0);
        assert_eq!(value(&series, "pvsched_guest_attached", &ab), 1.0);
        assert_eq!(
            value(&series, "pvsched_guest_attached", &[("vm", "vm")]),
            0.0
        );
        // The escaping is the encoder's.
        assert!(
            text.contains("pvsched_boosts_total{vm=\"a\\\"b\"} 3\n"),
            "{text}"
        );

        assert_eq!(value(&series, "pvsched_loops_total", &[]), 1234.0);
        assert_eq!(value(&series, "pvsched_engine_steps_total", &[]), 99.0);
        assert_eq!(value(&series, "pvsched_loop_period_seconds", &[]), 0.001);
        assert_eq!(value(&series, "pvsched_managed_threads", &[]), 3.0);
        assert_eq!(value(&series, "pvsched_state_durable", &[]), 1.0);
        assert_eq!(value(&series, "pvsched_budget_window_seconds", &[]), 0.1);
        assert_eq!(value(&series, "pvsched_host_budget_seconds", &[]), 0.05);
        assert_eq!(
            value(&series, "pvsched_host_budget_used_seconds", &[]),
            0.0125
        );
        assert_eq!(value(&series, "pvsched_vm_budget_seconds", &ab), 0.03);
        assert_eq!(value(&series, "pvsched_vm_budget_used_seconds", &ab), 0.007);
        assert_eq!(
            value(&series, "pvsched_vm_budget_seconds", &[("vm", "vm")]),
            0.0
        );
        assert_eq!(
            value(
                &series,
                "pvsched_vm_refusals_total",
                &[("reason", "wrong_user")]
            ),
            2.0
        );
        assert_eq!(
            value(
                &series,
                "pvsched_vm_refusals_total",
                &[("reason", "foreign_header")]
            ),
            0.0
        );
        assert_eq!(
            value(
                &series,
                "pvsched_region_inits_total",
                &[("reason", "zeroed")]
            ),
            0.0
        );

        // Latency in seconds: 0.5 µs, 7 µs twice, 2 ms and one past every bound.
        let le = |b: &str| {
            value(
                &series,
                "pvsched_apply_latency_seconds_bucket",
                &[("le", b)],
            )
        };
        assert_eq!(le("0.000001"), 1.0);
        assert_eq!(le("0.00001"), 3.0);
        assert_eq!(le("0.0025"), 4.0);
        assert_eq!(le("0.1"), 4.0);
        assert_eq!(le("+Inf"), 5.0);
        assert_eq!(
            value(&series, "pvsched_apply_latency_seconds_count", &[]),
            5.0
        );
        let sum = value(&series, "pvsched_apply_latency_seconds_sum", &[]);
        let expected = (500 + 14_000 + 2_000_000 + u64::MAX / 2) as f64 / 1e9;
        assert!((sum - expected).abs() / expected < 1e-12, "{sum}");
        assert_eq!(
            value(&series, "pvsched_loop_duration_seconds_count", &[]),
            1.0
        );

        let vm = [("vm", "vm")];
        let vcpu0 = [("vm", "vm"), ("vcpu", "0")];
        assert_eq!(value(&series, "pvsched_guest_ram_mapped", &vm), 1.0);
        assert_eq!(value(&series, "pvsched_guest_ram_ranges", &vm), 3.0);
        assert_eq!(
            value(&series, "pvsched_guest_ram_bytes", &vm),
            f64::from(1u32 << 30)
        );
        assert_eq!(value(&series, "pvsched_cpu_info_entries", &vm), 1.0);
        assert_eq!(
            value(&series, "pvsched_preempt_count_reads_total", &vm),
            42.0
        );
        assert_eq!(value(&series, "pvsched_guest_preempt_count", &vcpu0), 2.0);
        assert_eq!(
            series["pvsched_guest_preempt_count"].len(),
            1,
            "only vCPUs with a count"
        );
        assert_eq!(value(&series, "pvsched_kvm_halt_exits_total", &vcpu0), 7.0);
        assert_eq!(
            value(&series, "pvsched_kvm_halt_wait_seconds_total", &vcpu0),
            1.5
        );
        assert!(!series.contains_key("pvsched_kvm_directed_yield_attempted_total"));
        assert!(text.contains("# TYPE pvsched_kvm_directed_yield_attempted counter\n"));

        let host = [("source", "host")];
        let decision = [("source", "decision")];
        assert_eq!(
            value(&series, "pvsched_halt_poll_window_seconds", &host),
            0.00005
        );
        assert_eq!(
            value(&series, "pvsched_halt_poll_window_seconds", &decision),
            0.00005
        );
        assert_eq!(
            value(&series, "pvsched_halt_poll_grow_start_seconds", &host),
            0.00001
        );
        assert_eq!(
            value(&series, "pvsched_halt_poll_grow_multiplier", &host),
            2.0
        );
        assert_eq!(
            value(&series, "pvsched_halt_poll_shrink_divisor", &decision),
            0.0
        );
        assert_eq!(
            value(&series, "pvsched_halt_poll_load_cap_seconds", &[]),
            0.000175
        );
        assert_eq!(
            value(
                &series,
                "pvsched_halt_poll_reason",
                &[("reason", "polls-fail")]
            ),
            1.0
        );
        assert_eq!(
            value(&series, "pvsched_halt_poll_reason", &[("reason", "hold")]),
            0.0
        );
        assert_eq!(
            value(
                &series,
                "pvsched_halt_poll_decisions_total",
                &[("reason", "polls-fail")]
            ),
            2.0
        );
        assert_eq!(
            value(
                &series,
                "pvsched_halt_poll_decisions_total",
                &[("reason", "hold")]
            ),
            0.0
        );
        assert_eq!(value(&series, "pvsched_halt_poll_writes_total", &[]), 3.0);
        assert_eq!(value(&series, "pvsched_halt_poll_load_ratio", &[]), 0.25);
        assert_eq!(value(&series, "pvsched_halt_poll_contended", &[]), 1.0);
        assert_eq!(value(&series, "pvsched_halt_poll_success_ratio", &[]), 0.75);
        assert_eq!(value(&series, "pvsched_halt_poll_error", &[]), 0.0);
        assert!(!DaemonStatus::default()
            .openmetrics()
            .contains("pvsched_halt_poll"));
    }

    #[test]
    fn strict_check_refuses_what_breaks_the_conventions() {
        let good =
            "# HELP pvsched_x X.\n# TYPE pvsched_x counter\npvsched_x_total{vm=\"a\"} 1\n# EOF\n";
        check_strictly(good);
        for bad in [
            // No `# EOF`.
            "# HELP pvsched_x X.\n# TYPE pvsched_x counter\npvsched_x_total 1\n",
            // A counter sample without `_total`.
            "# HELP pvsched_x X.\n# TYPE pvsched_x counter\npvsched_x 1\n# EOF\n",
            // `_total` on a gauge.
            "# HELP pvsched_x_total X.\n# TYPE pvsched_x_total gauge\npvsched_x_total 1\n# EOF\n",
            // No HELP.
            "# TYPE pvsched_x gauge\npvsched_x 1\n# EOF\n",
            // A duplicate series.
            "# HELP pvsched_x X.\n# TYPE pvsched_x gauge\npvsched_x{vm=\"a\"} 1\npvsched_x{vm=\"a\"} 2\n# EOF\n",
            // A unit that is not a base unit.
            "# HELP pvsched_x_ns X.\n# TYPE pvsched_x_ns gauge\npvsched_x_ns 1\n# EOF\n",
            // A label outside the conventions.
            "# HELP pvsched_x X.\n# TYPE pvsched_x gauge\npvsched_x{param=\"halt_poll_ns\"} 1\n# EOF\n",
        ] {
            let refused = std::panic::catch_unwind(|| check_strictly(bad)).is_err();
            assert!(refused, "accepted {bad:?}");
        }
    }

    /// Every name a dashboard query can use: the samples of each family.
    fn exported_sample_names() -> BTreeSet<String> {
        family_names()
            .into_iter()
            .flat_map(|(name, ty)| {
                let suffixes: &[&str] = match ty.as_str() {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    "info" => &["_info"],
                    _ => &[""],
                };
                suffixes
                    .iter()
                    .map(move |s| format!("{name}{s}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn family_names_cover_every_family() {
        let names = exported_sample_names();
        for n in [
            "pvsched_build_info",
            "pvsched_boosts_total",
            "pvsched_apply_latency_seconds_bucket",
            "pvsched_halt_poll_decisions_total",
            "pvsched_halt_poll_success_ratio",
            "pvsched_kvm_halt_wait_seconds_total",
        ] {
            assert!(names.contains(n), "{n} in {names:?}");
        }
    }

    /// The metric names a PromQL expression refers to.
    fn metric_names_in(expr: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = expr;
        while let Some(at) = rest.find("pvsched_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
        names
    }

    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics() {
        let text = include_str!("../../../packaging/grafana-pvsched.json");
        let dash: serde_json::Value = serde_json::from_str(text).expect("the dashboard is JSON");
        let exported = exported_sample_names();
        let vars = dash["templating"]["list"].as_array().expect("variables");
        let var = |name: &str| {
            vars.iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("variable {name}"))
        };
        assert_eq!(var("datasource")["type"], "datasource");
        assert_eq!(var("datasource")["query"], "prometheus");
        let vm_query = var("vm")["query"]["query"].as_str().expect("vm query");
        assert!(vm_query.starts_with("label_values(") && vm_query.ends_with(", vm)"));
        for name in metric_names_in(vm_query) {
            assert!(exported.contains(&name), "vm variable: {name}");
        }

        let panels = dash["panels"].as_array().expect("panels");
        let mut ids = BTreeSet::new();
        let mut used = BTreeSet::new();
        let mut exprs = Vec::new();
        for p in panels {
            let title = p["title"].as_str().expect("a panel has a title");
            assert!(
                ids.insert(p["id"].as_u64().expect("id")),
                "{title}: id twice"
            );
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{title} has a query");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
                let expr = t["expr"].as_str().expect("expr");
                let names = metric_names_in(expr);
                assert!(!names.is_empty(), "{title}: {expr} queries pvsched");
                for name in names {
                    assert!(exported.contains(&name), "{title}: {name} is not exported");
                    used.insert(name);
                }
                exprs.push(expr.to_owned());
            }
        }
        for name in [
            "pvsched_boosts_total",
            "pvsched_throttles_total",
            "pvsched_boosted_seconds_total",
            "pvsched_vm_budget_seconds",
            "pvsched_budget_window_seconds",
            "pvsched_apply_latency_seconds_bucket",
            "pvsched_loops_total",
            "pvsched_invalid_guest_writes_total",
            "pvsched_halt_poll_decisions_total",
        ] {
            assert!(used.contains(name), "no panel shows {name}");
        }
        for q in ["0.5", "0.99"] {
            let p = format!(
                "histogram_quantile({q}, sum by (le) (rate(pvsched_apply_latency_seconds_bucket"
            );
            assert!(
                exprs.iter().any(|e| e.starts_with(&p)),
                "apply latency p{q}"
            );
        }
        // Per-VM series follow the vm variable.
        for e in exprs.iter().filter(|e| e.contains("by (vm)")) {
            assert!(e.contains("{vm=~\"$vm\"}"), "{e}");
        }
    }

    #[test]
    fn the_readme_lists_every_family() {
        let readme = include_str!("../README.md");
        for (name, ty) in family_names() {
            if let Some(stat) = name.strip_prefix("pvsched_kvm_") {
                assert!(readme.contains(stat), "README: KVM statistic {stat}");
                continue;
            }
            let listed = match ty.as_str() {
                "counter" => format!("`{name}_total`"),
                "info" => format!("`{name}_info`"),
                "histogram" => format!("`{name}_bucket`"),
                _ => format!("`{name}`"),
            };
            assert!(readme.contains(&listed), "README lists {listed}");
        }
    }
}
