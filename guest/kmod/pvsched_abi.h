/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0 OR MIT) */
/* The pvsched shared-page ABI. Fixed-width types come from <linux/types.h>
 * in the kernel and <stdint.h> in user space. */
#ifdef __KERNEL__
#include <linux/types.h>
#else
#include <stdint.h>
#endif

#ifndef PVSCHED_ABI_H
#define PVSCHED_ABI_H

/* Generated from crates/pvsched-abi/src/raw.rs; do not edit. Regenerate with:
 *   PVSCHED_BLESS=1 cargo test -p pvsched-abi --test c_header */

/**
 * "PVSCHED1" read as a little-endian u64.
 */
#define PVSCHED_MAGIC 3550038582944290384

/**
 * Major version: a guest with another major version is refused.
 */
#define PVSCHED_VERSION_MAJOR 1

/**
 * Minor version: additions that keep the layout of earlier minors.
 *
 * 1: the doorbell (`PVSCHED_FEAT_DOORBELL`, the daemon's ivshmem peer id and vector
 * count in the host header, the guest's doorbell counters in the guest header).
 * 2: the CPU-info table (`PVSCHED_FEAT_PREEMPT_COUNT_GPA`, `cpu_info_offset` in the
 * host header): the guest publishes where each CPU's preempt count lives in guest RAM.
 */
#define PVSCHED_VERSION_MINOR 2

/**
 * Size of the header in bytes.
 */
#define PVSCHED_HEADER_SIZE 128

/**
 * Size of one vCPU slot in bytes.
 */
#define PVSCHED_SLOT_SIZE 128

/**
 * Size of one line (the unit each side writes).
 */
#define PVSCHED_LINE_SIZE 64

/**
 * Upper bound on slots, so a corrupt header cannot make a reader walk far.
 */
#define PVSCHED_MAX_SLOTS 4096

/**
 * Feature: host boosts vCPU threads from guest hints.
 */
#define PVSCHED_FEAT_BOOST (1 << 0)

/**
 * Feature: guest publishes running-task class and priority.
 */
#define PVSCHED_FEAT_TASK_INFO (1 << 1)

/**
 * Feature: guest publishes RT-pending counts and priority.
 */
#define PVSCHED_FEAT_RT_PENDING (1 << 2)

/**
 * Feature: guest publishes interrupt and softirq depth and counts.
 */
#define PVSCHED_FEAT_IRQ (1 << 3)

/**
 * Feature: guest publishes critical-section depth and counts.
 */
#define PVSCHED_FEAT_CRITICAL_SECTION (1 << 4)

/**
 * Feature: guest may write explicit boost/unboost requests.
 */
#define PVSCHED_FEAT_BOOST_REQUEST (1 << 5)

/**
 * Feature: host publishes steal / run-delay time.
 */
#define PVSCHED_FEAT_STEAL (1 << 6)

/**
 * Feature: host publishes pCPU id, load and SMT-sibling state.
 */
#define PVSCHED_FEAT_PCPU_INFO (1 << 7)

/**
 * Feature: host publishes the vCPU-preempted flag.
 */
#define PVSCHED_FEAT_PREEMPTED (1 << 8)

/**
 * Feature: guest publishes lock-spin counts (directed boost of holders).
 */
#define PVSCHED_FEAT_SPIN (1 << 9)

/**
 * Feature: host publishes a guest halt-poll window hint.
 */
#define PVSCHED_FEAT_POLL_HINT (1 << 10)

/**
 * Feature: the daemon serves QEMU's `ivshmem-doorbell` device and listens for rings
 * from the guest on peer `doorbell_peer`, vectors `0..doorbell_vectors`; the guest rings
 * only when the host must act now. Host side: set together with those two fields.
 */
#define PVSCHED_FEAT_DOORBELL (1 << 11)

/**
 * Feature: the guest publishes, in the CPU-info table at `cpu_info_offset`, the
 * guest-physical address of each CPU's preempt count, so a host that maps the guest's
 * RAM (a shared memory backend) can read it without any guest cost. Host side: set
 * together with a non-zero `cpu_info_offset`.
 */
#define PVSCHED_FEAT_PREEMPT_COUNT_GPA (1 << 12)

/**
 * Every feature bit this version knows.
 */
#define PVSCHED_FEAT_KNOWN ((1 << 13) - 1)

/**
 * Size of one CPU-info entry in bytes.
 */
#define PVSCHED_CPU_INFO_SIZE 16

/**
 * Alignment of the CPU-info table's offset in the region.
 */
#define PVSCHED_CPU_INFO_ALIGN 64

/**
 * Bits of an x86 preempt count that do not mean "preemption disabled": the folded,
 * inverted need-resched bit (`PREEMPT_NEED_RESCHED`). A reader masks them off.
 */
#define PVSCHED_PREEMPT_COUNT_IGNORED_BITS 2147483648

/**
 * Most doorbell vectors a daemon may advertise (the ivshmem server's own limit).
 */
#define PVSCHED_DOORBELL_MAX_VECTORS 64

/**
 * Guest line flag: the vCPU is idle (about to halt or halted).
 */
#define PVSCHED_GUEST_FLAG_IDLE (1 << 0)

/**
 * Guest line flag: the guest has attached this slot and keeps it current.
 */
#define PVSCHED_GUEST_FLAG_ONLINE (1 << 1)

/**
 * Every guest flag bit this version knows.
 */
#define PVSCHED_GUEST_FLAGS_KNOWN (PVSCHED_GUEST_FLAG_IDLE | PVSCHED_GUEST_FLAG_ONLINE)

/**
 * Linux scheduling policies as the guest reports them (`SCHED_*`).
 */
#define PVSCHED_POLICY_NORMAL 0

/**
 * `SCHED_FIFO`.
 */
#define PVSCHED_POLICY_FIFO 1

/**
 * `SCHED_RR`.
 */
#define PVSCHED_POLICY_RR 2

/**
 * `SCHED_BATCH`.
 */
#define PVSCHED_POLICY_BATCH 3

/**
 * `SCHED_IDLE`.
 */
#define PVSCHED_POLICY_IDLE 5

/**
 * `SCHED_DEADLINE`.
 */
#define PVSCHED_POLICY_DEADLINE 6

/**
 * Explicit request: none.
 */
#define PVSCHED_REQUEST_NONE 0

/**
 * Explicit request: boost this vCPU.
 */
#define PVSCHED_REQUEST_BOOST 1

/**
 * Explicit request: the priority work is done, unboost.
 */
#define PVSCHED_REQUEST_UNBOOST 2

/**
 * Request reason: latency-sensitive task.
 */
#define PVSCHED_REASON_LATENCY (1 << 0)

/**
 * Request reason: critical section (lock held, preemption disabled).
 */
#define PVSCHED_REASON_CRITICAL (1 << 1)

/**
 * Request reason: interrupt work.
 */
#define PVSCHED_REASON_IRQ (1 << 2)

/**
 * Every request reason bit this version knows.
 */
#define PVSCHED_REASONS_KNOWN ((1 << 3) - 1)

/**
 * Host line boost state: normal scheduling class.
 */
#define PVSCHED_BOOST_NORMAL 0

/**
 * Host line boost state: boosted to a real-time class.
 */
#define PVSCHED_BOOST_BOOSTED 1

/**
 * Host line boost state: throttled (boost refused until `throttle_until_ns`).
 */
#define PVSCHED_BOOST_THROTTLED 2

/**
 * Header state written by the guest: not attached.
 */
#define PVSCHED_GUEST_DETACHED 0

/**
 * Header state written by the guest: attached and publishing.
 */
#define PVSCHED_GUEST_ATTACHED 1

/**
 * Host-written first line of the header.
 */
struct PvschedHeaderHost {
  /**
   * `PVSCHED_MAGIC`.
   */
  uint64_t magic;
  /**
   * Host's major version.
   */
  uint16_t version_major;
  /**
   * Host's minor version.
   */
  uint16_t version_minor;
  /**
   * Header size in bytes (`PVSCHED_HEADER_SIZE` for this version).
   */
  uint16_t header_size;
  /**
   * Slot size in bytes (`PVSCHED_SLOT_SIZE` for this version).
   */
  uint16_t slot_size;
  /**
   * Bytes in use: header plus all slots.
   */
  uint32_t total_size;
  /**
   * Number of vCPU slots.
   */
  uint32_t nr_slots;
  /**
   * Features the host offers (`PVSCHED_FEAT_*`).
   */
  uint64_t host_features;
  /**
   * Incremented by the host daemon on every publish round.
   */
  uint64_t host_heartbeat;
  /**
   * Incremented each time a daemon (re)initialises or adopts the region.
   */
  uint32_t host_generation;
  /**
   * Reserved, zero.
   */
  uint32_t host_flags;
  /**
   * With `PVSCHED_FEAT_DOORBELL`: the daemon's ivshmem peer id, the one the guest
   * writes into the Doorbell register (`peer << 16 | vector`). Zero otherwise.
   */
  uint16_t doorbell_peer;
  /**
   * With `PVSCHED_FEAT_DOORBELL`: vectors the daemon listens on
   * (1..=`PVSCHED_DOORBELL_MAX_VECTORS`). Zero otherwise.
   */
  uint16_t doorbell_vectors;
  /**
   * Reserved, zero.
   */
  uint32_t reserved0;
  /**
   * With `PVSCHED_FEAT_PREEMPT_COUNT_GPA`: byte offset of the CPU-info table
   * (`nr_slots` entries of `PvschedCpuInfo`), a multiple of `PVSCHED_CPU_INFO_ALIGN`
   * at or after `total_size` and inside the region. Zero otherwise.
   */
  uint32_t cpu_info_offset;
  /**
   * Reserved, zero.
   */
  uint32_t reserved1;
};

/**
 * Guest-written second line of the header.
 */
struct PvschedHeaderGuest {
  /**
   * Guest's major version (0 until the guest attaches).
   */
  uint16_t guest_version_major;
  /**
   * Guest's minor version.
   */
  uint16_t guest_version_minor;
  /**
   * Number of possible CPUs in the guest.
   */
  uint32_t guest_nr_cpus;
  /**
   * Features the guest supports (`PVSCHED_FEAT_*`).
   */
  uint64_t guest_features;
  /**
   * Incremented by the guest periodically (its timer tick or probes).
   */
  uint64_t guest_heartbeat;
  /**
   * Incremented each time the guest module attaches.
   */
  uint32_t guest_generation;
  /**
   * `PVSCHED_GUEST_ATTACHED` or `PVSCHED_GUEST_DETACHED`.
   */
  uint32_t guest_state;
  /**
   * Doorbell rings sent to the daemon since the guest attached.
   */
  uint64_t doorbells_rung;
  /**
   * Rings not sent since the guest attached: rate-limited, or not needed (the host
   * line already showed the vCPU boosted, or throttled).
   */
  uint64_t doorbells_suppressed;
  /**
   * Doorbell interrupts (MSI-X) the guest received from the daemon since it attached.
   */
  uint64_t host_interrupts;
  /**
   * Reserved, zero.
   */
  uint64_t reserved[1];
};

/**
 * The header at offset 0 of the region.
 */
struct PvschedHeader {
  /**
   * Host-written line.
   */
  struct PvschedHeaderHost host;
  /**
   * Guest-written line.
   */
  struct PvschedHeaderGuest guest;
};

/**
 * Guest-written line of a vCPU slot, published under its own seqlock.
 */
struct PvschedGuestLine {
  /**
   * Sequence counter: odd while the guest writes the line.
   */
  uint32_t seq;
  /**
   * Guest CPU id that owns this slot (must equal the slot index).
   */
  uint32_t cpu_id;
  /**
   * Guest APIC id of that CPU.
   */
  uint32_t apic_id;
  /**
   * `PVSCHED_GUEST_FLAG_*`.
   */
  uint32_t flags;
  /**
   * Incremented on every update: a per-vCPU heartbeat.
   */
  uint64_t updates;
  /**
   * Running task's policy (`PVSCHED_POLICY_*`).
   */
  uint8_t task_policy;
  /**
   * Running task's RT priority (1..=99 for FIFO/RR, else 0).
   */
  uint8_t task_rt_prio;
  /**
   * Running task's nice value (-20..=19).
   */
  int8_t task_nice;
  /**
   * Hard-interrupt nesting depth.
   */
  uint8_t irq_depth;
  /**
   * Softirq nesting depth.
   */
  uint8_t softirq_depth;
  /**
   * Explicit request (`PVSCHED_REQUEST_*`).
   */
  uint8_t boost_request;
  /**
   * RT priority the explicit request asks for (1..=99).
   */
  uint8_t request_prio;
  /**
   * Highest RT priority among runnable-but-waiting tasks.
   */
  uint8_t pending_prio;
  /**
   * RT tasks runnable on this CPU but not running.
   */
  uint32_t rt_pending;
  /**
   * Current critical-section nesting depth.
   */
  uint32_t cs_depth;
  /**
   * Critical-section entries since the guest attached.
   */
  uint64_t cs_count;
  /**
   * Hard interrupts handled since the guest attached.
   */
  uint64_t irq_count;
  /**
   * Lock-spin episodes (waiting for a lock holder) since attach.
   */
  uint32_t spin_count;
  /**
   * `PVSCHED_REASON_*` bits of the explicit request.
   */
  uint8_t request_reason;
  /**
   * Reserved, zero.
   */
  uint8_t reserved[3];
};

/**
 * Host-written line of a vCPU slot, published under a seqlock.
 */
struct PvschedHostLine {
  /**
   * Sequence counter: odd while the host writes the line.
   */
  uint32_t seq;
  /**
   * Host pCPU this vCPU thread last ran on.
   */
  uint32_t pcpu;
  /**
   * `PVSCHED_BOOST_*`.
   */
  uint8_t boost_state;
  /**
   * 1 when the vCPU thread is runnable but not running on the host.
   */
  uint8_t preempted;
  /**
   * 1 when the SMT sibling of `pcpu` is busy.
   */
  uint8_t smt_sibling_busy;
  /**
   * Host policy applied to the vCPU thread (`PVSCHED_POLICY_*`).
   */
  uint8_t host_policy;
  /**
   * Host RT priority applied (0 when not boosted).
   */
  uint8_t host_prio;
  /**
   * Reserved, zero.
   */
  uint8_t reserved0[3];
  /**
   * Load of `pcpu` in permille over the last host interval.
   */
  uint32_t pcpu_load_permille;
  /**
   * Suggested guest halt-poll window in ns (0: do not poll).
   */
  uint32_t poll_hint_ns;
  /**
   * Cumulative time the vCPU thread waited to run on the host (ns).
   */
  uint64_t steal_ns;
  /**
   * Host monotonic time (ns) until which boosts are refused.
   */
  uint64_t throttle_until_ns;
  /**
   * Host monotonic time (ns) of this publish, to compare with the above.
   */
  uint64_t host_time_ns;
  /**
   * Boosts of this vCPU since the daemon adopted the region.
   */
  uint32_t boosts;
  /**
   * Throttles of this vCPU since the daemon adopted the region.
   */
  uint32_t throttles;
  /**
   * Cumulative boosted CPU time (ns).
   */
  uint64_t boosted_ns;
};

/**
 * One vCPU slot: the guest line, then the host line.
 */
struct PvschedSlot {
  /**
   * Guest-written line.
   */
  struct PvschedGuestLine guest;
  /**
   * Host-written line.
   */
  struct PvschedHostLine host;
};

/**
 * One guest-written entry of the CPU-info table, written once when the guest attaches.
 */
struct PvschedCpuInfo {
  /**
   * Guest-physical address of this CPU's preempt count (a 4-byte, 4-aligned value;
   * `__preempt_count` or `pcpu_hot.preempt_count` on x86). Zero: not published.
   */
  uint64_t preempt_count_gpa;
  /**
   * Guest CPU id that owns this entry (must equal the entry index).
   */
  uint32_t cpu_id;
  /**
   * Reserved, zero.
   */
  uint32_t reserved;
};

#endif  /* PVSCHED_ABI_H */
