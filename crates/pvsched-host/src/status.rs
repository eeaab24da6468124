//! The daemon's state as one serde structure: printed by `pvsched status`
//! and `hostd --once --json`, and exported as metrics (see `metrics`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::actuator::ReconcileReport;
use crate::haltpoll::HaltPollStatus;
use crate::qmp::KvmVcpuStats;
use crate::trust::{InitReason, RefusalReason};

/// Process-wide counters of the trust boundary, bumped by the refresher
/// thread (refusals before attach) and the loop thread (refusals at
/// attach, re-initialised regions): plain atomics, no lock between them.
/// Labelled by reason only: VM names come from command lines anyone can
/// write, so they stay out of these label sets.
#[derive(Debug)]
pub struct TrustMetrics {
    refusals: [AtomicU64; RefusalReason::ALL.len()],
    inits: [AtomicU64; InitReason::ALL.len()],
}

/// The counters of the running daemon.
pub static TRUST_METRICS: TrustMetrics = TrustMetrics {
    refusals: [const { AtomicU64::new(0) }; RefusalReason::ALL.len()],
    inits: [const { AtomicU64::new(0) }; InitReason::ALL.len()],
};

impl TrustMetrics {
    /// Counts a VM refused (once per VM and reason).
    pub fn count_refusal(&self, reason: RefusalReason) {
        self.refusals[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a fresh header written over a shared file.
    pub fn count_init(&self, reason: InitReason) {
        self.inits[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The current values, every reason present.
    pub fn snapshot(&self) -> TrustCounters {
        TrustCounters {
            refusals: RefusalReason::ALL
                .iter()
                .map(|r| {
                    (
                        r.label().to_owned(),
                        self.refusals[r.index()].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            region_inits: InitReason::ALL
                .iter()
                .map(|r| {
                    (
                        r.label().to_owned(),
                        self.inits[r.index()].load(Ordering::Relaxed),
                    )
                })
                .collect(),
        }
    }
}

/// Refusals and re-initialisations by reason (metric label).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustCounters {
    /// VMs not managed, once per VM and reason.
    pub refusals: BTreeMap<String, u64>,
    /// Fresh headers written over shared files.
    pub region_inits: BTreeMap<String, u64>,
}

/// A fixed-bucket histogram of durations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// Upper bounds of the buckets (ns), ascending; a last `+Inf` bucket is implied.
    pub bounds_ns: Vec<u64>,
    /// Count per bucket (one more than bounds: the `+Inf` bucket), not cumulative.
    pub counts: Vec<u64>,
    /// Sum of observations (ns).
    pub sum_ns: u64,
    /// Number of observations.
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::latency()
    }
}

impl Histogram {
    /// Buckets from 1 µs to 100 ms, roughly ×2.5 apart.
    pub fn latency() -> Self {
        let bounds_ns = [
            1_000,
            2_500,
            5_000,
            10_000,
            25_000,
            50_000,
            100_000,
            250_000,
            500_000,
            1_000_000,
            1_050_000,
            1_500_000,
            2_500_000,
            5_000_000,
            10_000_000,
            100_000_000,
        ]
        .to_vec();
        let counts = vec![0; bounds_ns.len() + 1];
        Histogram {
            bounds_ns,
            counts,
            sum_ns: 0,
            count: 0,
        }
    }

    /// Records one duration.
    pub fn observe(&mut self, ns: u64) {
        let i = self.bounds_ns.partition_point(|&b| b < ns);
        self.counts[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.count += 1;
    }

    /// Upper bound (ns) of the bucket holding quantile `q` (`u64::MAX` for `+Inf`).
    pub fn quantile_bound(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let target = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Some(self.bounds_ns.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

/// One vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStatus {
    /// Slot index = QMP cpu-index.
    pub slot: u32,
    /// vCPU thread id (`None`: no vCPU with this index is present).
    pub tid: Option<i32>,
    /// QMP topology properties of the vCPU.
    pub topology: String,
    /// `normal`, `boosted` or `throttled`.
    pub state: String,
    /// Why boosted (engine reason names).
    pub reasons: Vec<String>,
    /// Host policy and priority applied by the daemon (`baseline`, `rr:5`, ...).
    pub applied: String,
    /// End of the current throttle (host monotonic ns; 0 if none).
    pub throttle_until_ns: u64,
    /// Why the guest line is ignored, if it is (`cpu_id mismatch`, `invalid`, `torn`).
    pub guest_ignored: Option<String>,
    /// Guest data accepted this period.
    pub guest_valid: bool,
    /// pCPU the thread last ran on.
    pub pcpu: u32,
    /// Load of that pCPU (permille).
    pub pcpu_load_permille: u32,
    /// An SMT sibling of that pCPU is busy.
    pub smt_sibling_busy: bool,
    /// Runnable but not running at the last sample (approximate).
    pub preempted: bool,
    /// Cumulative run delay (ns), published as steal.
    pub steal_ns: u64,
    /// Cumulative CPU time (ns).
    pub run_ns: u64,
    /// Boosts since the thread was adopted.
    pub boosts: u64,
    /// Throttles since the thread was adopted.
    pub throttles: u64,
    /// Boosted CPU time (ns).
    pub boosted_ns: u64,
    /// The guest-physical address of this vCPU's preempt count, as the
    /// guest published it in the CPU-info table (introspection).
    #[serde(default)]
    pub preempt_count_gpa: Option<u64>,
    /// The last preempt count read from guest RAM (ignored bits masked).
    #[serde(default)]
    pub preempt_count: Option<u32>,
    /// Why this vCPU's CPU-info entry is not used, if it is not.
    #[serde(default)]
    pub cpu_info_ignored: Option<String>,
    /// KVM's own statistics of this vCPU (`query-stats`), on a KVM guest.
    #[serde(default)]
    pub kvm: Option<KvmVcpuStats>,
    /// RT tasks the guest says are runnable but not running on this vCPU
    /// (0 without accepted guest data).
    #[serde(default)]
    pub guest_rt_pending: u32,
    /// The guest says this vCPU is inside a hard or soft interrupt.
    #[serde(default)]
    pub guest_in_irq: bool,
    /// The guest says this vCPU is idle (halting or halted).
    #[serde(default)]
    pub guest_idle: bool,
}

/// Introspection of a VM's guest RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntrospectionStatus {
    /// `off` (configuration), `no_shared_ram`, `mapped` or `error`.
    pub state: String,
    /// What is mapped, or why nothing is.
    pub detail: String,
    /// RAM ranges mapped (the GPA → offset table).
    pub ranges: u32,
    /// Backends mapped (their ids).
    pub backends: Vec<String>,
    /// Bytes of guest RAM the ranges cover.
    pub ram_bytes: u64,
    /// The CPU-info table is advertised in the VM's header.
    pub table_advertised: bool,
    /// CPU-info entries in use (published, valid, inside guest RAM).
    pub valid_entries: u32,
    /// Preempt counts read from guest RAM.
    pub reads: u64,
}

/// KVM's statistics of a VM (`query-stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmStatus {
    /// `unknown` (not asked yet), `not_kvm` (TCG or another accelerator),
    /// `waiting` (KVM, no statistics read yet), `read` or `error`.
    pub state: String,
    /// The last error, if the last read failed.
    pub error: Option<String>,
    /// The VM's own statistics (target `vm`), by name.
    pub vm: BTreeMap<String, u64>,
}

/// Per-VM counters (monotonic while the VM is managed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCounters {
    /// Boosts started.
    pub boosts: u64,
    /// Throttles.
    pub throttles: u64,
    /// Boosted CPU time (ns).
    pub boosted_ns: u64,
    /// Guest line writes with at least one invalid field (ignored).
    pub invalid_writes: u64,
    /// Guest lines whose cpu_id was not their slot index (ignored).
    pub cpu_id_mismatches: u64,
    /// Guest lines that never settled under the seqlock.
    pub torn_reads: u64,
    /// Host header lines found overwritten and repaired.
    pub header_repairs: u64,
    /// Guests refused for another major version.
    pub version_mismatches: u64,
    /// Failed scheduling calls.
    pub apply_errors: u64,
    /// Scheduling changes applied.
    pub applies: u64,
    /// Times the VM's own budget (all its threads together) refused boosts.
    pub vm_throttles: u64,
    /// Times the host-wide cap refused this VM boosts.
    pub host_throttles: u64,
    /// Times the VM became a repeat offender and had its budgets cut.
    #[serde(default)]
    pub offender_periods: u64,
    /// Times the guest's heartbeat stopped and its requests were ignored.
    pub stale_guests: u64,
    /// Boost requests of idle vCPUs expired by the host (`idle_request_ns`).
    #[serde(default)]
    pub expired_idle_requests: u64,
    /// vCPU CPU-time samples taken at a fast tick only because the vCPU's
    /// preempt count, read from guest RAM, was non-zero.
    #[serde(default)]
    pub preempt_count_samples: u64,
    /// Lock-holder grants: short directed boosts of a vCPU preempted on the
    /// host while its preempt count was non-zero.
    #[serde(default)]
    pub lock_holder_grants: u64,
    /// Times a preempted lock holder was refused a grant by
    /// `lock_holder_max_grants`.
    #[serde(default)]
    pub lock_holder_capped: u64,
}

/// One VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Name.
    pub name: String,
    /// QEMU pid (0 when not attached).
    pub pid: i32,
    /// Shared file.
    pub shm: String,
    /// QMP socket.
    pub qmp: String,
    /// Found by discovery rather than named in the configuration.
    pub discovered: bool,
    /// Attached (mapped and managed).
    pub attached: bool,
    /// `absent`, `agreed 1.N features 0x...`, or the refusal.
    pub guest: String,
    /// Negotiated features (0 unless agreed).
    pub features: u64,
    /// Slots in the region.
    pub nr_slots: u32,
    /// Host generation written to the header.
    pub generation: u32,
    /// Last error (QMP, mapping, apply), if any.
    pub last_error: Option<String>,
    /// Counters.
    pub counters: VmCounters,
    /// The doorbell channel, for a VM the daemon serves as its ivshmem server.
    #[serde(default)]
    pub doorbell: Option<DoorbellStatus>,
    /// Introspection of the guest's RAM.
    #[serde(default)]
    pub introspection: IntrospectionStatus,
    /// KVM's statistics.
    #[serde(default)]
    pub kvm: KvmStatus,
    /// The VM's budget: boosted CPU time of all its threads per budget window (ns).
    #[serde(default)]
    pub budget_ns: u64,
    /// Boosted CPU time charged to the VM in the window ending at its last
    /// step (an upper bound, ns).
    #[serde(default)]
    pub budget_used_ns: u64,
    /// vCPUs, by slot.
    pub vcpus: Vec<VcpuStatus>,
    /// IOThread ids and thread ids.
    pub iothreads: Vec<(String, i32)>,
}

/// A VM's doorbell channel: what the daemon saw and did, and what the guest
/// says it did (its own counters, statistics only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorbellStatus {
    /// The daemon's peer id, advertised in the host header.
    pub daemon_peer: u16,
    /// The guest agreed on the doorbell and rings it: the loop may sleep for
    /// this VM instead of polling its lines.
    pub event_driven: bool,
    /// Rings the daemon received from this guest.
    pub rings_received: u64,
    /// Interrupts the daemon sent the guest (a vCPU throttled or released).
    pub interrupts_sent: u64,
    /// The guest's count of rings it sent.
    pub guest_rung: u64,
    /// The guest's count of rings it held back (rate limit, already boosted).
    pub guest_suppressed: u64,
    /// The guest's count of interrupts it received.
    pub guest_interrupts: u64,
}

/// The whole daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Host monotonic time of the snapshot (ns).
    pub time_ns: u64,
    /// Loop period (µs).
    pub period_us: u64,
    /// Loop iterations.
    pub loops: u64,
    /// Iterations that ran the engine (something changed or was due).
    pub steps: u64,
    /// Doorbell rings received, all VMs.
    #[serde(default)]
    pub doorbell_rings: u64,
    /// The loop waits on doorbells (it sleeps while every guest rings and
    /// nothing happens); otherwise it polls at its period.
    #[serde(default)]
    pub event_wait: bool,
    /// Observe-only mode (`--once`): nothing is changed or published.
    pub dry_run: bool,
    /// Threads with a record in the state file.
    pub managed_threads: usize,
    /// The budget window (ns) of the VM and host budgets.
    #[serde(default)]
    pub budget_window_ns: u64,
    /// The host-wide cap: boosted CPU time of all VMs per window (ns).
    #[serde(default)]
    pub host_budget_ns: u64,
    /// Boosted CPU time charged to the host cap in the window ending now
    /// (an upper bound, ns).
    #[serde(default)]
    pub host_budget_used_ns: u64,
    /// Whether every record is durable in the state file (a boost of a
    /// thread whose record is not yet waits for it).
    #[serde(default)]
    pub state_durable: bool,
    /// Changes deferred until the thread's record was durable.
    #[serde(default)]
    pub deferred_applies: u64,
    /// Applies and restores refused because the thread id no longer named
    /// the recorded thread (start time differs, or the thread is gone).
    #[serde(default)]
    pub identity_refusals: u64,
    /// Failed state-file writes (retried by the writer thread).
    #[serde(default)]
    pub state_write_errors: u64,
    /// VMs dropped because their shared file was truncated or replaced.
    #[serde(default)]
    pub shared_file_drops: u64,
    /// What the start-up reconciliation did.
    pub reconcile: ReconcileReport,
    /// Guest-line read to `sched_setattr` done.
    pub apply_latency: Histogram,
    /// One loop iteration's duration.
    pub loop_duration: Histogram,
    /// VMs.
    pub vms: Vec<VmStatus>,
    /// Trust-boundary refusals and shared-file re-initialisations.
    #[serde(default)]
    pub trust: TrustCounters,
    /// The halt-poll controller (`halt_poll` = `observe` or `tune`).
    #[serde(default)]
    pub halt_poll: Option<HaltPollStatus>,
}

impl DaemonStatus {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "pvsched hostd: period {} µs, {} loops ({} engine steps), {} managed threads{}\n",
            self.period_us,
            self.loops,
            self.steps,
            self.managed_threads,
            if self.dry_run { ", observe-only" } else { "" }
        );
        if let (Some(p50), Some(p99)) = (
            self.apply_latency.quantile_bound(0.5),
            self.apply_latency.quantile_bound(0.99),
        ) {
            out += &format!(
                "apply latency (read to applied): p50 <= {} µs, p99 <= {} µs\n",
                p50 / 1000,
                p99 / 1000
            );
        }
        let refused: u64 = self.trust.refusals.values().sum();
        if refused > 0 {
            let by: Vec<String> = self
                .trust
                .refusals
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            out += &format!("refused VMs: {}\n", by.join(", "));
        }
        for vm in &self.vms {
            let c = &vm.counters;
            out += &format!(
                "\nvm {} pid {} shm {}{}\n  guest: {}; slots {}; boosts {} throttles {} boosted {:.3} s; invalid {} mismatched {} torn {} apply errors {}\n",
                vm.name,
                vm.pid,
                vm.shm,
                if vm.attached { "" } else { " (not attached)" },
                vm.guest,
                vm.nr_slots,
                c.boosts,
                c.throttles,
                c.boosted_ns as f64 / 1e9,
                c.invalid_writes,
                c.cpu_id_mismatches,
                c.torn_reads,
                c.apply_errors
            );
            if let Some(e) = &vm.last_error {
                out += &format!("  last error: {e}\n");
            }
            let i = &vm.introspection;
            if !i.state.is_empty() && i.state != "off" {
                out += &format!("  guest RAM: {} ({})", i.state, i.detail);
                if i.state == "mapped" {
                    out += &format!(
                        "; {} CPU-info entries in use, {} reads",
                        i.valid_entries, i.reads
                    );
                }
                out += "\n";
            }
            if !vm.vcpus.is_empty() {
                out += &format!(
                    "  {:>4} {:>8} {:<9} {:<8} {:>4} {:>5} {:>3} {:>3} {:>10} {:>10}  {}\n",
                    "slot",
                    "tid",
                    "state",
                    "applied",
                    "pcpu",
                    "load",
                    "smt",
                    "pre",
                    "steal_ms",
                    "run_ms",
                    "reasons / notes"
                );
            }
            for v in &vm.vcpus {
                let mut notes = v.reasons.join(",");
                if let Some(why) = &v.guest_ignored {
                    notes += &format!(" guest ignored: {why}");
                }
                if let Some(p) = v.preempt_count {
                    notes += &format!(" preempt_count {p:#x}");
                }
                if let Some(why) = &v.cpu_info_ignored {
                    notes += &format!(" cpu-info ignored: {why}");
                }
                out += &format!(
                    "  {:>4} {:>8} {:<9} {:<8} {:>4} {:>5} {:>3} {:>3} {:>10.3} {:>10.3}  {}\n",
                    v.slot,
                    v.tid.map_or("-".into(), |t| t.to_string()),
                    v.state,
                    v.applied,
                    v.pcpu,
                    v.pcpu_load_permille,
                    u8::from(v.smt_sibling_busy),
                    u8::from(v.preempted),
                    v.steal_ns as f64 / 1e6,
                    v.run_ns as f64 / 1e6,
                    notes.trim()
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let mut h = Histogram::latency();
        for ns in [500, 3_000, 3_000, 2_000_000, u64::MAX / 2] {
            h.observe(ns);
        }
        assert_eq!(h.count, 5);
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[2], 2);
        assert_eq!(h.quantile_bound(0.5), Some(5_000));
        assert_eq!(h.quantile_bound(1.0), Some(u64::MAX));
    }

    #[test]
    fn table_names_each_vm_and_its_guest_ram() {
        let mut s = DaemonStatus::default();
        s.vms.push(VmStatus {
            name: "a\"b".into(),
            introspection: IntrospectionStatus {
                state: "mapped".into(),
                detail: "ram".into(),
                ..Default::default()
            },
            ..Default::default()
        });
        let table = s.table();
        assert!(table.contains("vm a\"b"), "{table}");
        assert!(table.contains("guest RAM: mapped (ram)"), "{table}");
    }

    #[test]
    fn a_status_from_a_daemon_without_the_budget_and_guest_flag_fields_decodes() {
        let mut s = DaemonStatus {
            host_budget_ns: 50,
            vms: vec![VmStatus {
                budget_ns: 30,
                vcpus: vec![VcpuStatus {
                    guest_idle: true,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut json = serde_json::to_value(&s).unwrap();
        for key in ["budget_window_ns", "host_budget_ns", "host_budget_used_ns"] {
            json.as_object_mut().unwrap().remove(key).unwrap();
        }
        let vm = &mut json["vms"][0];
        for key in ["budget_ns", "budget_used_ns"] {
            vm.as_object_mut().unwrap().remove(key).unwrap();
        }
        for key in ["guest_rt_pending", "guest_in_irq", "guest_idle"] {
            vm["vcpus"][0].as_object_mut().unwrap().remove(key).unwrap();
        }
        let old: DaemonStatus = serde_json::from_value(json).unwrap();
        s.host_budget_ns = 0;
        s.vms[0].budget_ns = 0;
        s.vms[0].vcpus[0].guest_idle = false;
        assert_eq!(old, s);
    }
}
