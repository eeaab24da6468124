// SPDX-License-Identifier: GPL-2.0
/*
 * pvsched_guest - guest side of the pvsched shared page.
 *
 * Binds the ivshmem-plain device (PCI 1af4:1110) whose BAR2 is the shared page that the
 * host daemon formats (layout: pvsched_abi.h, generated from crates/pvsched-abi). After
 * validating the host header it publishes this guest's version and features, then keeps
 * each CPU's slot current from tracepoint probes: the running task's policy, priority and
 * nice value, the idle flag, RT tasks waiting, and interrupt/softirq depth and counts.
 * Hard interrupts are device IRQs (irq_handler_entry/exit) and, where the kernel has
 * them, the x86 system vectors (local timer, reschedule and call-function IPIs,
 * irq_work): those tracepoints are optional, the others are required.
 *
 * On ivshmem-doorbell (BAR0 registers, MSI-X in BAR1) whose host advertises
 * PVSCHED_FEAT_DOORBELL, the module also rings the daemon (Doorbell register, the
 * daemon's peer id from the header, vector 0) when the host must act now: an RT or
 * DEADLINE wakeup, or a new boost request, on a vCPU whose host line does not show it
 * boosted; rate-limited per CPU, never per context switch. The daemon's rings arrive on
 * MSI-X vector 0 and refresh the throttle state read from the host lines. Without the
 * feature, or on ivshmem-plain, the page is only polled by the host, as before.
 *
 * When the host offers PVSCHED_FEAT_PREEMPT_COUNT_GPA with a CPU-info table in the BAR,
 * the module writes there, once per attach, the guest-physical address of each CPU's
 * preempt count, for a host that maps guest RAM. Without shared guest RAM the host still
 * gets a sampled critical-section signal: each hard interrupt's entry probe publishes
 * the preempt-disable depth of the context it interrupted (cs_depth, cs_count).
 *
 * Guest user space reads the shared region through /dev/pvsched (read-only mmap of the
 * whole BAR) and a summary in sysfs (/sys/class/misc/pvsched/); debugfs has the full
 * dumps and a test hook that holds a spinlock on a chosen CPU (pvsched/hold_lock).
 *
 * Rules this file keeps:
 * - Each CPU writes only the guest line of its own slot, from its own probes, with local
 *   interrupts off so that an interrupt probe cannot nest inside another probe's write.
 *   The line is published under its seqlock (odd while written), in the access widths
 *   the host uses: two u32, then seven u64.
 * - Probes never sleep or allocate; cross-CPU wakeup hints go through kernel-memory
 *   atomics, never through another CPU's line.
 * - The host-written half is untrusted: the header is copied once and validated, host
 *   lines are only copied out (bounded seqlock retries) and printed in debugfs.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/cpu.h>
#include <linux/debugfs.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/minmax.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/percpu.h>
#include <linux/preempt.h>
#include <linux/sched.h>
#include <linux/sched/rt.h>
#include <linux/sched/task.h>
#include <linux/seq_file.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <linux/tracepoint.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/workqueue.h>
#include <asm/pgtable_types.h>
#include <asm/processor.h>
#include <trace/events/irq.h>
#include <trace/events/sched.h>
#ifdef CONFIG_X86_LOCAL_APIC
#include <asm/trace/irq_vectors.h>
#endif

#include "pvsched_abi.h"

/*
 * The oldest kernel whose probe prototypes this file follows: sched_switch gained its
 * prev_state argument in 5.18.
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 18, 0)
#error "pvsched_guest needs Linux 5.18 or later"
#endif

/* Kbuild passes the package version from dkms.conf, its one place. */
#ifndef PVSCHED_GUEST_VERSION
#error "PVSCHED_GUEST_VERSION is not defined: build through guest/kmod/Kbuild"
#endif

#define PVSCHED_IVSHMEM_VENDOR 0x1af4
#define PVSCHED_IVSHMEM_DEVICE 0x1110
#define PVSCHED_SHM_BAR 2

/* ivshmem-doorbell registers (QEMU docs/specs/ivshmem-spec.rst): BAR0, MSI-X in BAR1. */
#define PVSCHED_REG_BAR 0
#define PVSCHED_REG_IVPOSITION 8
#define PVSCHED_REG_DOORBELL 12
#define PVSCHED_REG_SIZE 16
/* The vector the daemon listens on and the one it rings this guest on. */
#define PVSCHED_DOORBELL_VECTOR 0

/* Longest throttle the module honours from one host line: a bound, not a policy. */
#define PVSCHED_THROTTLE_CAP_NS (10ULL * NSEC_PER_SEC)

/*
 * The host clamps these guest-written values and counts a larger one as an invalid write
 * (crates/pvsched-abi/src/decode.rs: MAX_IRQ_DEPTH, MAX_RT_PENDING); saturate at the same
 * bounds so that a busy guest is never reported as misbehaving.
 */
#define PVSCHED_IRQ_DEPTH_CAP 8
#define PVSCHED_RT_PENDING_CAP (1U << 16)
#define PVSCHED_CS_DEPTH_CAP 256

/* Bounded retries when copying a host line, so a stuck host cannot stall a reader. */
#define PVSCHED_SEQ_READ_ATTEMPTS 8

/* How often to look for a formatted header while the host has not written one yet. */
#define PVSCHED_ATTACH_POLL_MS 500

/* Features this module publishes. */
#define PVSCHED_GUEST_FEATURES \
	(PVSCHED_FEAT_BOOST | PVSCHED_FEAT_TASK_INFO | PVSCHED_FEAT_RT_PENDING | \
	 PVSCHED_FEAT_IRQ | PVSCHED_FEAT_CRITICAL_SECTION | PVSCHED_FEAT_BOOST_REQUEST)

/* The test hook's longest hold, and how often a preemptible hold yields. */
#define PVSCHED_HOLD_MAX_MS 10000
#define PVSCHED_HOLD_YIELD_NS (2 * NSEC_PER_MSEC)

/*
 * Where each CPU's preempt count lives (arch/x86/include/asm/preempt.h): the per-CPU
 * __preempt_count before 6.2 and again from 6.15, a field of the per-CPU pcpu_hot from
 * 6.2 to 6.14. Both are exported to modules.
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0) && LINUX_VERSION_CODE < KERNEL_VERSION(6, 15, 0)
#define pvsched_preempt_count_ptr(cpu) (&per_cpu(pcpu_hot.preempt_count, (cpu)))
#else
#define pvsched_preempt_count_ptr(cpu) (&per_cpu(__preempt_count, (cpu)))
#endif

/* A CPU's APIC ID: in cpuinfo_x86 itself before 6.7, in its topology part from 6.7. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 7, 0)
#define pvsched_cpu_apicid(cpu) (cpu_data(cpu).topo.apicid)
#else
#define pvsched_cpu_apicid(cpu) (cpu_data(cpu).apicid)
#endif

static bool enable = true;
static int pvsched_enable_set(const char *val, const struct kernel_param *kp);
static const struct kernel_param_ops pvsched_enable_ops = {
	.set = pvsched_enable_set,
	.get = param_get_bool,
};
module_param_cb(enable, &pvsched_enable_ops, &enable, 0644);
__MODULE_PARM_TYPE(enable, "bool");
MODULE_PARM_DESC(enable,
		 "Publish scheduler state to the host; 0 detaches (clears every line), 1 attaches again (default: 1)");

static unsigned int rt_prio_threshold = 1;
module_param(rt_prio_threshold, uint, 0644);
MODULE_PARM_DESC(rt_prio_threshold,
		 "Lowest FIFO/RR priority (1-99) counted as an RT task waiting (default: 1)");

static unsigned int idle_boost_ms = 100;
module_param(idle_boost_ms, uint, 0644);
MODULE_PARM_DESC(idle_boost_ms,
		 "Ask for boost while idle for this long after an RT task blocked here (0: never; default: 100)");

static unsigned int doorbell_min_us = 200;
module_param(doorbell_min_us, uint, 0644);
MODULE_PARM_DESC(doorbell_min_us,
		 "Least time between two doorbell rings from one CPU, in us; closer rings are suppressed (default: 200)");

static unsigned int heartbeat_ms = 100;
module_param(heartbeat_ms, uint, 0444);
MODULE_PARM_DESC(heartbeat_ms, "Header heartbeat period in ms (default: 100)");

/* The guest line as the host accesses it: seq and cpu_id as u32, the rest as u64 words. */
union pvsched_guest_words {
	struct PvschedGuestLine line;
	struct {
		u32 seq;
		u32 cpu_id;
		u64 words[7];
	} raw;
};

union pvsched_host_words {
	struct PvschedHostLine line;
	struct {
		u32 seq;
		u32 pcpu;
		u64 words[7];
	} raw;
};

/* Header lines are accessed as eight u64 words. */
union pvsched_header_host_words {
	struct PvschedHeaderHost line;
	u64 words[8];
};

union pvsched_header_guest_words {
	struct PvschedHeaderGuest line;
	u64 words[8];
};

static_assert(sizeof(struct PvschedHeader) == PVSCHED_HEADER_SIZE);
static_assert(sizeof(struct PvschedSlot) == PVSCHED_SLOT_SIZE);
static_assert(sizeof(union pvsched_guest_words) == PVSCHED_LINE_SIZE);
static_assert(sizeof(union pvsched_host_words) == PVSCHED_LINE_SIZE);
static_assert(sizeof(union pvsched_header_host_words) == PVSCHED_LINE_SIZE);
static_assert(sizeof(union pvsched_header_guest_words) == PVSCHED_LINE_SIZE);
static_assert(offsetof(struct PvschedGuestLine, seq) == 0);
static_assert(offsetof(struct PvschedGuestLine, cpu_id) == 4);
static_assert(offsetof(struct PvschedSlot, host) == PVSCHED_LINE_SIZE);
static_assert(offsetof(struct PvschedHeader, guest) == PVSCHED_LINE_SIZE);
static_assert(sizeof(struct PvschedCpuInfo) == PVSCHED_CPU_INFO_SIZE);
static_assert(offsetof(struct PvschedCpuInfo, cpu_id) == 8);
static_assert(offsetof(struct PvschedHeaderHost, cpu_info_offset) == 7 * 8);

/* Per-CPU state. Only the owning CPU touches `line` and `seq`, with interrupts off. */
struct pvsched_cpu {
	struct PvschedSlot *slot; /* NULL when the host gave this CPU no slot */
	union pvsched_guest_words line; /* local copy, published whole */
	u32 seq; /* last value this CPU stored in the shared seq */
	/* RT wakeups aimed at this CPU by other CPUs, folded in by the owner. */
	atomic_t remote_rt_wakeups;
	atomic_t remote_max_prio;
	/* A DEADLINE or counted RT wakeup aimed here by another CPU: ring once folded in. */
	atomic_t remote_ring;
	/* Last RT task that blocked on this CPU: its priority and when (jiffies). */
	u8 rt_sleeper_prio;
	unsigned long rt_block_jiffies;
	/* Doorbell: the owner rings after publishing something the host must act on now. */
	bool ring_pending;
	u64 last_ring_ns; /* ktime_get_mono_fast_ns() of this CPU's last ring */
	/* Guest time until which the host throttles this vCPU; written by the doorbell IRQ. */
	u64 throttle_until_ns;
	/* Counters summed into the guest header by the heartbeat work. */
	u64 doorbells_rung;
	u64 doorbells_suppressed;
	u64 host_interrupts; /* doorbell interrupts handled on this CPU */
};

static DEFINE_PER_CPU(struct pvsched_cpu, pvsched_cpus);

struct pvsched_dev {
	struct pci_dev *pdev;
	void *base; /* BAR2, mapped write-back: it is shared RAM */
	resource_size_t phys; /* BAR2's physical address, for /dev/pvsched */
	size_t len;
	struct PvschedHeader *header;
	u32 nr_slots;
	/* The CPU-info table this attach wrote, validated against the BAR; 0: none. */
	u32 cpu_info_offset;
	u32 cpu_info_entries;
	bool misc_registered;
	bool attached;
	bool probes_registered;
	bool removing; /* remove() has started: enable=1 must not attach again */
	u64 heartbeat;
	unsigned int attach_polls;
	struct delayed_work work;
	struct dentry *debugfs;
	/* ivshmem-doorbell: set up at the first attach whose host offers a doorbell. */
	void __iomem *regs; /* BAR0 */
	int irq; /* Linux IRQ of MSI-X vector 0, or -1 */
	u32 ivposition; /* this guest's peer id */
	u16 doorbell_peer; /* the daemon's, from the validated header */
	bool ringing; /* this attach rings the daemon */
};

/* One device at a time: the probes are global. */
static struct pvsched_dev *pvsched_device;

/*
 * Serialises attach and detach (device probe and remove, the attach/heartbeat work, writes
 * to the enable parameter, debugfs readers) and guards pvsched_device. Never taken by the
 * tracepoint probes.
 */
static DEFINE_MUTEX(pvsched_lock);

/* Probes act only while true; cleared before the probes are unregistered. */
static bool pvsched_active;

/*
 * The Doorbell register and the value to write there ((daemon peer << 16) | vector).
 * Set before the probes are registered with pvsched_ringing true; pvsched_ringing is
 * cleared before they are unregistered, and the mapping outlives every attach.
 */
static void __iomem *pvsched_doorbell_reg;
static u32 pvsched_doorbell_value;
static bool pvsched_ringing;

static void pvsched_ring(struct pvsched_cpu *pc);
static void pvsched_detach(struct pvsched_dev *pd);
static bool pvsched_read_host_line(const struct PvschedSlot *slot, union pvsched_host_words *out);

static inline bool pvsched_publishing(void)
{
	return READ_ONCE(pvsched_active) && READ_ONCE(enable);
}

static inline u8 pvsched_threshold(void)
{
	return clamp_t(unsigned int, READ_ONCE(rt_prio_threshold), 1, 99);
}

static inline bool pvsched_is_rt_policy(unsigned int policy)
{
	return policy == SCHED_FIFO || policy == SCHED_RR;
}

/* A task that counts as "RT work" for the waiting count. */
static inline bool pvsched_counts_as_rt(const struct task_struct *p)
{
	return pvsched_is_rt_policy(p->policy) && p->rt_priority >= pvsched_threshold();
}

/* Stores the local copy of this CPU's line under its seqlock. Interrupts are off. */
static void pvsched_store_line(struct pvsched_cpu *pc)
{
	struct PvschedGuestLine *dst = &pc->slot->guest;
	u64 *dst_words = (u64 *)((u8 *)dst + 8);
	u32 odd = (pc->seq & 1) ? pc->seq + 2 : pc->seq + 1;
	int i;

	WRITE_ONCE(dst->seq, odd);
	/* The odd counter must be visible before any payload store. */
	smp_wmb();
	WRITE_ONCE(dst->cpu_id, pc->line.raw.cpu_id);
	for (i = 0; i < ARRAY_SIZE(pc->line.raw.words); i++)
		WRITE_ONCE(dst_words[i], pc->line.raw.words[i]);
	/* The payload must be visible before the even counter that publishes it. */
	smp_wmb();
	WRITE_ONCE(dst->seq, odd + 1);
	pc->seq = odd + 1;
}

/*
 * Publishes an update of this CPU's line: the heartbeat moves, then the line is stored.
 * A ring asked for by this update goes out only after the line is visible, so the host
 * woken by it reads the reason.
 */
static void pvsched_publish(struct pvsched_cpu *pc)
{
	pc->line.line.updates++;
	pvsched_store_line(pc);
	if (unlikely(pc->ring_pending)) {
		pc->ring_pending = false;
		pvsched_ring(pc);
	}
}

static void pvsched_note_rt_waiting(struct PvschedGuestLine *line, u8 prio)
{
	if (line->rt_pending < PVSCHED_RT_PENDING_CAP)
		line->rt_pending++;
	line->pending_prio = max(line->pending_prio, prio);
}

/* Adds the RT wakeups other CPUs aimed at this one. */
static void pvsched_fold_remote(struct pvsched_cpu *pc)
{
	int wakeups;
	int prio;

	if (unlikely(atomic_read(&pc->remote_ring)) && atomic_xchg(&pc->remote_ring, 0))
		pc->ring_pending = true;
	wakeups = atomic_xchg(&pc->remote_rt_wakeups, 0);
	if (!wakeups)
		return;
	prio = atomic_xchg(&pc->remote_max_prio, 0);
	pc->line.line.rt_pending = min_t(u32, pc->line.line.rt_pending + wakeups,
					 PVSCHED_RT_PENDING_CAP);
	pc->line.line.pending_prio = max_t(u8, pc->line.line.pending_prio, prio);
}

static void pvsched_set_task(struct PvschedGuestLine *line, const struct task_struct *p)
{
	if (is_idle_task(p)) {
		line->flags |= PVSCHED_GUEST_FLAG_IDLE;
		line->task_policy = PVSCHED_POLICY_NORMAL;
		line->task_rt_prio = 0;
		line->task_nice = 0;
		return;
	}
	line->flags &= ~PVSCHED_GUEST_FLAG_IDLE;
	switch (p->policy) {
	case SCHED_FIFO:
	case SCHED_RR:
		line->task_policy = p->policy;
		line->task_rt_prio = clamp_t(unsigned int, p->rt_priority, 1, 99);
		break;
	case SCHED_BATCH:
	case SCHED_IDLE:
	case SCHED_DEADLINE:
		line->task_policy = p->policy;
		line->task_rt_prio = 0;
		break;
	default:
		line->task_policy = PVSCHED_POLICY_NORMAL;
		line->task_rt_prio = 0;
		break;
	}
	line->task_nice = task_nice(p);
}

/*
 * A periodic RT task (cyclictest, a control loop) blocks and is woken again on the same
 * CPU by its timer. While that CPU idles in between, it asks the host to keep the halted
 * vCPU boosted, so the wakeup is not queued behind host load: a halted vCPU only wakes
 * for such events and uses no host CPU while halted (seed 003's boost on halt). The
 * request is dropped as soon as a non-RT task runs here, and it lapses idle_boost_ms
 * after the last RT block; the host bounds the boost by its budget in any case.
 */
static void pvsched_note_idle_boost(struct pvsched_cpu *pc, bool preempt,
				    struct task_struct *prev, struct task_struct *next,
				    unsigned int prev_state)
{
	struct PvschedGuestLine *line = &pc->line.line;
	unsigned int window = READ_ONCE(idle_boost_ms);

	if (!preempt && prev_state != TASK_RUNNING && !is_idle_task(prev) &&
	    pvsched_counts_as_rt(prev)) {
		pc->rt_sleeper_prio = clamp_t(unsigned int, prev->rt_priority, 1, 99);
		pc->rt_block_jiffies = jiffies;
	}
	if (is_idle_task(next) && window && pc->rt_sleeper_prio &&
	    time_before(jiffies, pc->rt_block_jiffies + msecs_to_jiffies(window))) {
		/* A new request is something the host must act on before the vCPU halts. */
		if (line->boost_request != PVSCHED_REQUEST_BOOST)
			pc->ring_pending = true;
		line->boost_request = PVSCHED_REQUEST_BOOST;
		line->request_prio = pc->rt_sleeper_prio;
		line->request_reason = PVSCHED_REASON_LATENCY;
		return;
	}
	if (is_idle_task(next))
		pc->rt_sleeper_prio = 0;
	line->boost_request = PVSCHED_REQUEST_NONE;
	line->request_prio = 0;
	line->request_reason = 0;
}

static void probe_sched_switch(void *data, bool preempt, struct task_struct *prev,
			       struct task_struct *next, unsigned int prev_state)
{
	struct pvsched_cpu *pc;
	struct PvschedGuestLine *line;
	unsigned long flags;

	if (!pvsched_publishing())
		return;
	local_irq_save(flags);
	pc = this_cpu_ptr(&pvsched_cpus);
	if (!pc->slot)
		goto out;
	line = &pc->line.line;
	pvsched_fold_remote(pc);

	/* An RT task switched out while still runnable now waits on this CPU. */
	if ((preempt || prev_state == TASK_RUNNING) && !is_idle_task(prev) &&
	    pvsched_counts_as_rt(prev))
		pvsched_note_rt_waiting(line, prev->rt_priority);

	if (pvsched_counts_as_rt(next)) {
		if (line->rt_pending)
			line->rt_pending--;
	} else if (next->policy != SCHED_DEADLINE) {
		/*
		 * The RT class runs before fair and idle, and picks higher priorities first:
		 * when anything below the threshold runs, no counted RT task waits here. This
		 * also clears counts left by tasks that migrated away before running.
		 */
		line->rt_pending = 0;
	}
	if (!line->rt_pending)
		line->pending_prio = 0;

	/*
	 * No context switch happens inside a hard interrupt: whatever depth is left here
	 * was an interrupt whose exit went unseen (a probe attached or detached meanwhile).
	 */
	line->irq_depth = 0;
	/* A sampled depth describes the task that was interrupted, which stops running here. */
	line->cs_depth = 0;

	pvsched_note_idle_boost(pc, preempt, prev, next, prev_state);
	pvsched_set_task(line, next);
	pvsched_publish(pc);
out:
	local_irq_restore(flags);
}

/*
 * Wakeups that make the host act now: a counted RT task, or a DEADLINE task (no RT
 * priority to compare, always latency-bound). The ring goes out from the CPU whose line
 * shows the wakeup: at once for a local wakeup; for a remote one when the target folds
 * the note in, which the reschedule or call-function IPI that delivers the wakeup does
 * on entry (see probe_vector_entry). A halted target that ran RT work recently already
 * asks to stay boosted (pvsched_note_idle_boost), so its IPI is not queued behind load.
 */
static void probe_sched_wakeup(void *data, struct task_struct *p)
{
	struct pvsched_cpu *pc;
	unsigned long flags;
	unsigned int target;
	bool counted;
	int old;

	if (!pvsched_publishing())
		return;
	counted = pvsched_counts_as_rt(p);
	if (!counted && p->policy != SCHED_DEADLINE)
		return;
	target = task_cpu(p);
	if (target >= nr_cpu_ids)
		return;
	local_irq_save(flags);
	if (target == smp_processor_id()) {
		pc = this_cpu_ptr(&pvsched_cpus);
		if (pc->slot) {
			pvsched_fold_remote(pc);
			if (counted)
				pvsched_note_rt_waiting(&pc->line.line, p->rt_priority);
			pc->ring_pending = true;
			pvsched_publish(pc);
		}
	} else {
		/* Not our line to write: leave a note the target folds in on its next probe. */
		pc = per_cpu_ptr(&pvsched_cpus, target);
		if (counted) {
			atomic_inc(&pc->remote_rt_wakeups);
			old = atomic_read(&pc->remote_max_prio);
			while (old < p->rt_priority &&
			       !atomic_try_cmpxchg(&pc->remote_max_prio, &old, p->rt_priority))
				;
		}
		atomic_set(&pc->remote_ring, 1);
	}
	local_irq_restore(flags);
}

/* Runs `update` on this CPU's local line and publishes it. */
#define PVSCHED_UPDATE_LOCAL(update)                                   \
	do {                                                           \
		struct pvsched_cpu *pc;                                \
		struct PvschedGuestLine *line;                         \
		unsigned long flags;                                   \
		if (!pvsched_publishing())                             \
			break;                                         \
		local_irq_save(flags);                                 \
		pc = this_cpu_ptr(&pvsched_cpus);                      \
		if (pc->slot) {                                        \
			line = &pc->line.line;                         \
			pvsched_fold_remote(pc);                       \
			update;                                        \
			pvsched_publish(pc);                           \
		}                                                      \
		local_irq_restore(flags);                              \
	} while (0)

/*
 * The critical-section signal for a host that cannot read guest RAM: the preempt-disable
 * depth of the context a hard interrupt interrupted, sampled at the interrupt's entry
 * probe. preempt_count() (which leaves out x86's folded need-resched bit) holds, on top
 * of that context's own count, what the entry path itself added: HARDIRQ_OFFSET from
 * irq_enter, and the one level of preempt_disable_notrace() that every tracepoint wraps
 * its probes in (__DO_TRACE; PREEMPT_DISABLE_OFFSET is 0 without CONFIG_PREEMPT_COUNT).
 * What is left is counted level by level: preempt_disable() nesting (spin_lock() alone is
 * 1), softirq service and each bottom-half disable, and a hard interrupt or NMI below. The
 * idle task runs its loop with one level held since boot: that level is no critical
 * section, so an idle CPU samples 0.
 */
static u32 pvsched_sample_cs_depth(void)
{
	unsigned int pc = preempt_count();
	unsigned int softirq, depth;

	if (pc & HARDIRQ_MASK)
		pc -= HARDIRQ_OFFSET;
	if ((pc & PREEMPT_MASK) >= PREEMPT_DISABLE_OFFSET)
		pc -= PREEMPT_DISABLE_OFFSET;
	if (is_idle_task(current) && (pc & PREEMPT_MASK) >= PREEMPT_DISABLE_OFFSET)
		pc -= PREEMPT_DISABLE_OFFSET;
	softirq = (pc & SOFTIRQ_MASK) >> SOFTIRQ_SHIFT;
	depth = ((pc & PREEMPT_MASK) >> PREEMPT_SHIFT) + (softirq >> 1) + (softirq & 1) +
		((pc & HARDIRQ_MASK) >> HARDIRQ_SHIFT) + ((pc & NMI_MASK) >> NMI_SHIFT);
	return min_t(u32, depth, PVSCHED_CS_DEPTH_CAP);
}

/* Publishes a sample: the depth until the next sample or context switch, and a count. */
static inline void pvsched_note_cs_sample(struct PvschedGuestLine *line, u32 depth)
{
	line->cs_depth = depth;
	if (depth)
		line->cs_count++;
}

static void probe_irq_entry(void *data, int irq, struct irqaction *action)
{
	u32 depth = pvsched_sample_cs_depth();

	PVSCHED_UPDATE_LOCAL({
		if (line->irq_depth < PVSCHED_IRQ_DEPTH_CAP)
			line->irq_depth++;
		line->irq_count++;
		pvsched_note_cs_sample(line, depth);
	});
}

static void probe_irq_exit(void *data, int irq, struct irqaction *action, int ret)
{
	PVSCHED_UPDATE_LOCAL({
		if (line->irq_depth)
			line->irq_depth--;
	});
}

static void probe_softirq_entry(void *data, unsigned int vec_nr)
{
	PVSCHED_UPDATE_LOCAL({
		if (line->softirq_depth < PVSCHED_IRQ_DEPTH_CAP)
			line->softirq_depth++;
	});
}

static void probe_softirq_exit(void *data, unsigned int vec_nr)
{
	PVSCHED_UPDATE_LOCAL({
		if (line->softirq_depth)
			line->softirq_depth--;
	});
}

/*
 * x86 system vectors (local APIC timer, reschedule, call-function IPIs, irq_work) do not
 * pass through irq_handler_entry/exit, yet they are how most wakeups reach an idle vCPU:
 * an RT task's timer fires on the local timer, and a wakeup from another CPU arrives as
 * a reschedule IPI. They count as hard interrupts in the same depth and count fields,
 * their entry samples the interrupted context's critical-section depth like a device
 * IRQ's, and folds in (and publishes) RT wakeups that other CPUs left for this one.
 */
static void probe_vector_entry(void *data, int vector)
{
	u32 depth = pvsched_sample_cs_depth();

	PVSCHED_UPDATE_LOCAL({
		if (line->irq_depth < PVSCHED_IRQ_DEPTH_CAP)
			line->irq_depth++;
		line->irq_count++;
		pvsched_note_cs_sample(line, depth);
	});
}

static void probe_vector_exit(void *data, int vector)
{
	PVSCHED_UPDATE_LOCAL({
		if (line->irq_depth)
			line->irq_depth--;
	});
}

/*
 * These tracepoints are not exported to modules as symbols, so they are found by name
 * with for_each_kernel_tracepoint() and attached with tracepoint_probe_register().
 */
struct pvsched_probe {
	const char *name;
	void *func;
	bool optional; /* absent on some kernels: attach without it */
	const char *exit; /* for an optional entry: attach only after this exit */
	struct tracepoint *tp;
	bool registered;
};

#define PVSCHED_VECTOR_EXIT(vec) \
	{ .name = vec "_exit", .func = probe_vector_exit, .optional = true }
#define PVSCHED_VECTOR_ENTRY(vec) \
	{ .name = vec "_entry", .func = probe_vector_entry, .optional = true, .exit = vec "_exit" }

/*
 * Registered in this order and unregistered in reverse: every exit before any entry.
 * Registering patches kernel text, which sends IPIs to every CPU; an entry attached
 * before its exit would count interrupts that leave without being seen and leave the
 * depth stuck above zero. An exit seen without its entry only saturates at zero.
 */
static struct pvsched_probe pvsched_probes[] = {
	{ .name = "sched_switch", .func = probe_sched_switch },
	{ .name = "sched_wakeup", .func = probe_sched_wakeup },
	{ .name = "sched_wakeup_new", .func = probe_sched_wakeup },
	{ .name = "irq_handler_exit", .func = probe_irq_exit },
	{ .name = "softirq_exit", .func = probe_softirq_exit },
	/* arch/x86/include/asm/trace/irq_vectors.h */
	PVSCHED_VECTOR_EXIT("local_timer"),
	PVSCHED_VECTOR_EXIT("reschedule"),
	PVSCHED_VECTOR_EXIT("call_function"),
	PVSCHED_VECTOR_EXIT("call_function_single"),
	PVSCHED_VECTOR_EXIT("irq_work"),
	{ .name = "irq_handler_entry", .func = probe_irq_entry },
	{ .name = "softirq_entry", .func = probe_softirq_entry },
	PVSCHED_VECTOR_ENTRY("local_timer"),
	PVSCHED_VECTOR_ENTRY("reschedule"),
	PVSCHED_VECTOR_ENTRY("call_function"),
	PVSCHED_VECTOR_ENTRY("call_function_single"),
	PVSCHED_VECTOR_ENTRY("irq_work"),
};

/*
 * The table holds its probes as void *, so nothing above checks them against the
 * tracepoints' prototypes, which are the kernel's and may change with it. These
 * assertions do, in the kernel being built against: <trace/events/...> declares
 * register_trace_NAME() taking exactly the probe type of NAME's prototype, so passing
 * a probe of another type fails the build (-Werror). sizeof does not evaluate the call,
 * which would need the tracepoint's symbol, not exported to modules.
 */
#define PVSCHED_PROBE_FITS(tracepoint, probe) \
	static_assert(sizeof(register_trace_##tracepoint(probe, NULL)) == sizeof(int))

PVSCHED_PROBE_FITS(sched_switch, probe_sched_switch);
PVSCHED_PROBE_FITS(sched_wakeup, probe_sched_wakeup);
PVSCHED_PROBE_FITS(sched_wakeup_new, probe_sched_wakeup);
PVSCHED_PROBE_FITS(irq_handler_entry, probe_irq_entry);
PVSCHED_PROBE_FITS(irq_handler_exit, probe_irq_exit);
PVSCHED_PROBE_FITS(softirq_entry, probe_softirq_entry);
PVSCHED_PROBE_FITS(softirq_exit, probe_softirq_exit);
#ifdef CONFIG_X86_LOCAL_APIC
PVSCHED_PROBE_FITS(local_timer_entry, probe_vector_entry);
PVSCHED_PROBE_FITS(local_timer_exit, probe_vector_exit);
PVSCHED_PROBE_FITS(reschedule_entry, probe_vector_entry);
PVSCHED_PROBE_FITS(reschedule_exit, probe_vector_exit);
PVSCHED_PROBE_FITS(call_function_entry, probe_vector_entry);
PVSCHED_PROBE_FITS(call_function_exit, probe_vector_exit);
PVSCHED_PROBE_FITS(call_function_single_entry, probe_vector_entry);
PVSCHED_PROBE_FITS(call_function_single_exit, probe_vector_exit);
PVSCHED_PROBE_FITS(irq_work_entry, probe_vector_entry);
PVSCHED_PROBE_FITS(irq_work_exit, probe_vector_exit);
#endif

static void pvsched_find_tracepoint(struct tracepoint *tp, void *priv)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(pvsched_probes); i++)
		if (!strcmp(tp->name, pvsched_probes[i].name))
			pvsched_probes[i].tp = tp;
}

static void pvsched_unregister_probes(void)
{
	int i;

	for (i = ARRAY_SIZE(pvsched_probes) - 1; i >= 0; i--) {
		if (!pvsched_probes[i].registered)
			continue;
		tracepoint_probe_unregister(pvsched_probes[i].tp, pvsched_probes[i].func, NULL);
		pvsched_probes[i].registered = false;
	}
	/* No probe may still be running once the module text can go away. */
	tracepoint_synchronize_unregister();
}

static bool pvsched_probe_registered(const char *name)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(pvsched_probes); i++)
		if (!strcmp(pvsched_probes[i].name, name))
			return pvsched_probes[i].registered;
	return false;
}

static int pvsched_register_probes(void)
{
	char missing[128] = "";
	size_t used = 0;
	int i, ret;

	for (i = 0; i < ARRAY_SIZE(pvsched_probes); i++)
		pvsched_probes[i].tp = NULL;
	for_each_kernel_tracepoint(pvsched_find_tracepoint, NULL);
	for (i = 0; i < ARRAY_SIZE(pvsched_probes); i++) {
		struct pvsched_probe *probe = &pvsched_probes[i];

		if (probe->exit && !pvsched_probe_registered(probe->exit))
			ret = -ENOENT; /* an entry without its exit would leave the depth stuck */
		else if (probe->tp)
			ret = tracepoint_probe_register(probe->tp, probe->func, NULL);
		else
			ret = -ENOENT;
		if (!ret) {
			probe->registered = true;
			continue;
		}
		if (!probe->optional) {
			pr_err("cannot attach to tracepoint %s: %d\n", probe->name, ret);
			goto fail;
		}
		used += scnprintf(missing + used, sizeof(missing) - used, " %s", probe->name);
	}
	if (used)
		pr_info("optional tracepoints not attached (interrupts through them are not counted):%s\n",
			missing);
	return 0;
fail:
	pvsched_unregister_probes();
	return ret;
}

/* Copies the host header line once; everything after works on the copy. */
static void pvsched_read_header_host(struct pvsched_dev *pd, union pvsched_header_host_words *out)
{
	const u64 *src = (const u64 *)&pd->header->host;
	int i;

	for (i = 0; i < ARRAY_SIZE(out->words); i++)
		out->words[i] = READ_ONCE(src[i]);
}

static void pvsched_write_header_guest(struct pvsched_dev *pd,
				       const union pvsched_header_guest_words *in)
{
	u64 *dst = (u64 *)&pd->header->guest;
	int i;

	/* Word 3 holds guest_state: write it last so the host sees a complete line. */
	for (i = 0; i < ARRAY_SIZE(in->words); i++)
		if (i != 3)
			WRITE_ONCE(dst[i], in->words[i]);
	smp_wmb();
	WRITE_ONCE(dst[3], in->words[3]);
}

static_assert(offsetof(struct PvschedHeaderGuest, guest_generation) == 3 * 8);
static_assert(offsetof(struct PvschedHeaderGuest, guest_state) == 3 * 8 + 4);
static_assert(offsetof(struct PvschedHeaderGuest, guest_heartbeat) == 2 * 8);
static_assert(offsetof(struct PvschedHeaderGuest, guest_features) == 1 * 8);

/*
 * Validates the host header. Returns 0 when it describes a region this module can use,
 * -EAGAIN when the host has not formatted the page yet (all zero), or -EPROTO.
 */
static int pvsched_validate_header(struct pvsched_dev *pd, const struct PvschedHeaderHost *h)
{
	struct device *dev = &pd->pdev->dev;
	u64 expected;

	if (h->magic == 0 && h->version_major == 0 && h->total_size == 0)
		return -EAGAIN;
	if (h->magic != PVSCHED_MAGIC) {
		dev_err(dev, "bad magic %#llx (expected %#llx); refusing\n",
			(unsigned long long)h->magic, (unsigned long long)PVSCHED_MAGIC);
		return -EPROTO;
	}
	if (h->version_major != PVSCHED_VERSION_MAJOR) {
		dev_err(dev, "host speaks ABI major %u, this module %u; refusing\n",
			h->version_major, PVSCHED_VERSION_MAJOR);
		return -EPROTO;
	}
	if (h->header_size != PVSCHED_HEADER_SIZE || h->slot_size != PVSCHED_SLOT_SIZE) {
		dev_err(dev, "header/slot size %u/%u, expected %u/%u; refusing\n",
			h->header_size, h->slot_size, PVSCHED_HEADER_SIZE, PVSCHED_SLOT_SIZE);
		return -EPROTO;
	}
	if (h->nr_slots > PVSCHED_MAX_SLOTS) {
		dev_err(dev, "%u slots exceed the limit %u; refusing\n", h->nr_slots,
			PVSCHED_MAX_SLOTS);
		return -EPROTO;
	}
	expected = PVSCHED_HEADER_SIZE + (u64)h->nr_slots * PVSCHED_SLOT_SIZE;
	if (h->total_size != expected || expected > pd->len) {
		dev_err(dev, "total size %u, expected %llu within a %zu-byte BAR; refusing\n",
			h->total_size, (unsigned long long)expected, pd->len);
		return -EPROTO;
	}
	return 0;
}

static inline struct PvschedSlot *pvsched_slot(struct pvsched_dev *pd, unsigned int index)
{
	return (struct PvschedSlot *)((u8 *)pd->base + PVSCHED_HEADER_SIZE +
				      (size_t)index * PVSCHED_SLOT_SIZE);
}

/* Entry `index` of the CPU-info table this attach validated (pd->cpu_info_offset != 0). */
static inline struct PvschedCpuInfo *pvsched_cpu_info(struct pvsched_dev *pd, u32 index)
{
	return (struct PvschedCpuInfo *)((u8 *)pd->base + pd->cpu_info_offset +
					 (size_t)index * PVSCHED_CPU_INFO_SIZE);
}

/*
 * Whether the host offers a CPU-info table this module can write: the feature bit with an
 * offset that is a non-zero multiple of PVSCHED_CPU_INFO_ALIGN, at or after the slots,
 * with one entry per slot inside the BAR (what crates/pvsched-abi's CpuInfoTable
 * accepts). A bad offer is refused with one line, and the attach goes on without it.
 */
static bool pvsched_cpu_info_usable(struct pvsched_dev *pd, const struct PvschedHeaderHost *h)
{
	u64 end = (u64)h->cpu_info_offset + (u64)h->nr_slots * PVSCHED_CPU_INFO_SIZE;

	if (!(h->host_features & PVSCHED_FEAT_PREEMPT_COUNT_GPA))
		return false;
	if (h->nr_slots == 0 || h->cpu_info_offset == 0 ||
	    h->cpu_info_offset % PVSCHED_CPU_INFO_ALIGN != 0 ||
	    h->cpu_info_offset < h->total_size || end > pd->len) {
		dev_warn(&pd->pdev->dev, "host offers a CPU-info table at offset %u for %u slots, not a non-zero multiple of %u from %u up with its %llu-byte end within the %zu-byte BAR; not publishing preempt-count addresses\n",
			 h->cpu_info_offset, h->nr_slots, PVSCHED_CPU_INFO_ALIGN, h->total_size,
			 (unsigned long long)end, pd->len);
		return false;
	}
	return true;
}

/*
 * Guest-physical address of a CPU's preempt count, 0 when it cannot be had. The first
 * per-CPU chunk may be page-mapped (percpu_alloc=page, or NUMA layouts), where __pa()
 * would be wrong. per_cpu_ptr_to_phys() is not exported to modules; slow_virt_to_phys()
 * walks the kernel page tables, so it is right for either layout. It is what
 * arch/x86/kernel/kvm.c uses to hand KVM the addresses of its per-CPU areas.
 */
static u64 pvsched_preempt_count_gpa(unsigned int cpu)
{
	void *count = pvsched_preempt_count_ptr(cpu);
	unsigned int level;

	if (!lookup_address((unsigned long)count, &level))
		return 0;
	return slow_virt_to_phys(count);
}

/*
 * Writes the CPU-info table: for each slot that is a possible CPU, its preempt count's
 * address, its id and a zero reserved word; other entries zero. Called at attach before
 * the header says attached, and with no probe running. Each entry is two words, stored
 * so that a reader overlapping the write only sees "not published": the address goes to
 * 0 first, then the id is stored, then the new address.
 */
static unsigned int pvsched_write_cpu_info(struct pvsched_dev *pd)
{
	unsigned int published = 0;
	u32 i;

	for (i = 0; i < pd->cpu_info_entries; i++) {
		struct PvschedCpuInfo *e = pvsched_cpu_info(pd, i);
		u64 gpa = (i < nr_cpu_ids && cpu_possible(i)) ? pvsched_preempt_count_gpa(i) : 0;

		WRITE_ONCE(e->preempt_count_gpa, 0);
		smp_wmb();
		WRITE_ONCE(e->cpu_id, gpa ? i : 0);
		WRITE_ONCE(e->reserved, 0);
		smp_wmb();
		WRITE_ONCE(e->preempt_count_gpa, gpa);
		if (gpa)
			published++;
	}
	return published;
}

/* Zeroes the CPU-info table (detach): the address first, so no reader sees a stale one. */
static void pvsched_clear_cpu_info(struct pvsched_dev *pd)
{
	u32 i;

	for (i = 0; i < pd->cpu_info_entries; i++) {
		struct PvschedCpuInfo *e = pvsched_cpu_info(pd, i);

		WRITE_ONCE(e->preempt_count_gpa, 0);
		smp_wmb();
		WRITE_ONCE(e->cpu_id, 0);
		WRITE_ONCE(e->reserved, 0);
	}
	pd->cpu_info_offset = 0;
	pd->cpu_info_entries = 0;
}

/*
 * Guest time until which a host line throttles its vCPU, or 0. The host's clock is not
 * ours: the remaining time is what the host line says at its own publish, bounded.
 */
static u64 pvsched_throttle_deadline(const struct PvschedHostLine *h, u64 now)
{
	if (h->boost_state != PVSCHED_BOOST_THROTTLED || h->throttle_until_ns <= h->host_time_ns)
		return 0;
	return now + min_t(u64, h->throttle_until_ns - h->host_time_ns, PVSCHED_THROTTLE_CAP_NS);
}

/*
 * Rings the daemon for this CPU's vCPU, after its line was published, unless the host
 * line shows the vCPU boosted or throttled already, or this CPU rang less than
 * doorbell_min_us ago. Runs in probe context with interrupts off, possibly under the
 * runqueue lock (sched_wakeup): it takes no lock and does not sleep.
 *
 * The ring is one 32-bit MMIO write, done here rather than deferred to irq_work: QEMU
 * registers an ioeventfd for each (peer, vector) Doorbell value it knows, so under KVM
 * the write is a short exit handled in the host kernel (an eventfd signal), like a PV
 * kick issued from the same context, and under TCG it is emulated inline by the vCPU
 * thread. Deferring would cost a self-IPI (itself an exit) and delay the ring until the
 * runqueue lock is dropped, for no gain. The rate limit bounds how often it happens.
 */
static void pvsched_ring(struct pvsched_cpu *pc)
{
	union pvsched_host_words host;
	u64 now, min_ns;

	if (!READ_ONCE(pvsched_ringing) || !pc->slot)
		return;
	now = ktime_get_mono_fast_ns();
	/* A torn read (host mid-publish on every attempt) rings: the rate limit still holds. */
	if (pvsched_read_host_line(pc->slot, &host) &&
	    (host.line.boost_state == PVSCHED_BOOST_BOOSTED ||
	     host.line.boost_state == PVSCHED_BOOST_THROTTLED))
		goto suppress;
	if (now < READ_ONCE(pc->throttle_until_ns))
		goto suppress;
	min_ns = (u64)READ_ONCE(doorbell_min_us) * NSEC_PER_USEC;
	if (pc->last_ring_ns && now - pc->last_ring_ns < min_ns)
		goto suppress;
	pc->last_ring_ns = now;
	writel(pvsched_doorbell_value, pvsched_doorbell_reg);
	pc->doorbells_rung++;
	return;
suppress:
	pc->doorbells_suppressed++;
}

/*
 * MSI-X vector 0: the daemon rings this guest after it changed host lines the guest acts
 * on. Counts the interrupt and refreshes each vCPU's throttle deadline from its line.
 */
static irqreturn_t pvsched_doorbell_irq(int irq, void *data)
{
	struct pvsched_dev *pd = data;
	union pvsched_host_words host;
	unsigned int cpu, nr_slots;
	u64 now;

	this_cpu_inc(pvsched_cpus.host_interrupts);
	if (!READ_ONCE(pvsched_active))
		return IRQ_HANDLED;
	/* Every value nr_slots takes was validated against the BAR at attach. */
	nr_slots = READ_ONCE(pd->nr_slots);
	now = ktime_get_mono_fast_ns();
	for_each_possible_cpu(cpu) {
		if (cpu >= nr_slots)
			break;
		if (!pvsched_read_host_line(pvsched_slot(pd, cpu), &host))
			continue;
		WRITE_ONCE(per_cpu_ptr(&pvsched_cpus, cpu)->throttle_until_ns,
			   pvsched_throttle_deadline(&host.line, now));
	}
	return IRQ_HANDLED;
}

/*
 * Decides whether this attach rings the daemon: the host offers a doorbell with a vector
 * count in range, and the device is ivshmem-doorbell (registers in BAR0, MSI-X). BAR0 is
 * mapped and vector 0 requested at the first such attach and kept until the device goes.
 * Anything missing leaves ringing off, and the module works as on ivshmem-plain.
 * Process context, pvsched_lock held; no probe runs.
 */
static void pvsched_doorbell_setup(struct pvsched_dev *pd, const struct PvschedHeaderHost *h)
{
	struct pci_dev *pdev = pd->pdev;
	struct device *dev = &pdev->dev;
	int ret, irq;

	pd->ringing = false;
	if (!(h->host_features & PVSCHED_FEAT_DOORBELL))
		return;
	if (h->doorbell_vectors < 1 || h->doorbell_vectors > PVSCHED_DOORBELL_MAX_VECTORS) {
		dev_warn(dev, "host offers a doorbell with %u vectors (1-%u); not ringing\n",
			 h->doorbell_vectors, PVSCHED_DOORBELL_MAX_VECTORS);
		return;
	}
	if (!pdev->msix_cap || pci_resource_len(pdev, PVSCHED_REG_BAR) < PVSCHED_REG_SIZE ||
	    !(pci_resource_flags(pdev, PVSCHED_REG_BAR) & IORESOURCE_MEM)) {
		dev_info(dev, "host offers a doorbell but the device has no MSI-X doorbell (ivshmem-plain?); not ringing\n");
		return;
	}
	if (!pd->regs) {
		/* Managed after pcim_enable_device(), like the BAR2 region. */
		ret = pci_request_region(pdev, PVSCHED_REG_BAR, KBUILD_MODNAME);
		if (ret) {
			dev_warn(dev, "cannot claim BAR%d (%d); not ringing\n",
				 PVSCHED_REG_BAR, ret);
			return;
		}
		pd->regs = pci_iomap(pdev, PVSCHED_REG_BAR, PVSCHED_REG_SIZE);
		if (!pd->regs) {
			dev_warn(dev, "cannot map BAR%d; not ringing\n", PVSCHED_REG_BAR);
			return;
		}
	}
	if (pd->irq < 0) {
		/* The daemon rings this guest on vector 0 only. */
		ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX);
		if (ret < 0) {
			dev_warn(dev, "no MSI-X vector (%d); not ringing\n", ret);
			return;
		}
		irq = pci_irq_vector(pdev, PVSCHED_DOORBELL_VECTOR);
		ret = irq < 0 ? irq : request_irq(irq, pvsched_doorbell_irq, 0, KBUILD_MODNAME, pd);
		if (ret) {
			dev_warn(dev, "cannot request the doorbell interrupt (%d); not ringing\n",
				 ret);
			pci_free_irq_vectors(pdev);
			return;
		}
		pd->irq = irq;
	}
	/* -1 until QEMU's ivshmem server connection gave this guest a peer id. */
	pd->ivposition = ioread32(pd->regs + PVSCHED_REG_IVPOSITION);
	if (pd->ivposition == h->doorbell_peer) {
		dev_warn(dev, "the daemon's peer id %u is this guest's own; not ringing\n",
			 h->doorbell_peer);
		return;
	}
	pd->doorbell_peer = h->doorbell_peer;
	pvsched_doorbell_value = ((u32)h->doorbell_peer << 16) | PVSCHED_DOORBELL_VECTOR;
	pvsched_doorbell_reg = pd->regs + PVSCHED_REG_DOORBELL;
	pd->ringing = true;
}

static void pvsched_doorbell_teardown(struct pvsched_dev *pd)
{
	if (pd->irq >= 0) {
		free_irq(pd->irq, pd);
		pci_free_irq_vectors(pd->pdev);
		pd->irq = -1;
	}
	if (pd->regs) {
		pci_iounmap(pd->pdev, pd->regs);
		pd->regs = NULL;
	}
	pvsched_doorbell_reg = NULL;
}

static u64 pvsched_guest_features(const struct pvsched_dev *pd)
{
	return PVSCHED_GUEST_FEATURES | (pd->ringing ? PVSCHED_FEAT_DOORBELL : 0) |
	       (pd->cpu_info_offset ? PVSCHED_FEAT_PREEMPT_COUNT_GPA : 0);
}

/* Sums the per-CPU doorbell counters into the guest header (words 4-6). */
static void pvsched_publish_counters(struct pvsched_dev *pd)
{
	u64 *guest_words = (u64 *)&pd->header->guest;
	u64 rung = 0, suppressed = 0, interrupts = 0;
	unsigned int cpu;

	for_each_possible_cpu(cpu) {
		const struct pvsched_cpu *pc = per_cpu_ptr(&pvsched_cpus, cpu);

		rung += READ_ONCE(pc->doorbells_rung);
		suppressed += READ_ONCE(pc->doorbells_suppressed);
		interrupts += READ_ONCE(pc->host_interrupts);
	}
	WRITE_ONCE(guest_words[4], rung);
	WRITE_ONCE(guest_words[5], suppressed);
	WRITE_ONCE(guest_words[6], interrupts);
}

static_assert(offsetof(struct PvschedHeaderGuest, doorbells_rung) == 4 * 8);
static_assert(offsetof(struct PvschedHeaderGuest, doorbells_suppressed) == 5 * 8);
static_assert(offsetof(struct PvschedHeaderGuest, host_interrupts) == 6 * 8);

static int pvsched_attach(struct pvsched_dev *pd)
{
	union pvsched_header_host_words host;
	union pvsched_header_guest_words guest;
	const u64 *old_guest = (const u64 *)&pd->header->guest;
	unsigned int cpu, published = 0;
	int ret;

	pvsched_read_header_host(pd, &host);
	ret = pvsched_validate_header(pd, &host.line);
	if (ret)
		return ret;
	WRITE_ONCE(pd->nr_slots, host.line.nr_slots);
	if (num_possible_cpus() > pd->nr_slots)
		dev_warn(&pd->pdev->dev, "%u possible CPUs but %u slots: CPUs above %u publish nothing\n",
			 num_possible_cpus(), pd->nr_slots, pd->nr_slots - 1);
	pvsched_doorbell_setup(pd, &host.line);

	/* No probe runs yet, so this CPU may initialise every slot. */
	for_each_possible_cpu(cpu) {
		struct pvsched_cpu *pc = per_cpu_ptr(&pvsched_cpus, cpu);
		unsigned long flags;

		memset(&pc->line, 0, sizeof(pc->line));
		atomic_set(&pc->remote_rt_wakeups, 0);
		atomic_set(&pc->remote_max_prio, 0);
		atomic_set(&pc->remote_ring, 0);
		pc->ring_pending = false;
		pc->last_ring_ns = 0;
		WRITE_ONCE(pc->throttle_until_ns, 0);
		pc->doorbells_rung = 0;
		pc->doorbells_suppressed = 0;
		WRITE_ONCE(pc->host_interrupts, 0);
		if (cpu >= pd->nr_slots) {
			pc->slot = NULL;
			continue;
		}
		pc->slot = (struct PvschedSlot *)((u8 *)pd->base + PVSCHED_HEADER_SIZE +
						  (size_t)cpu * PVSCHED_SLOT_SIZE);
		/* Continue the sequence a previous attach left, so readers never go back. */
		pc->seq = READ_ONCE(pc->slot->guest.seq);
		pc->line.raw.cpu_id = cpu;
		pc->line.line.apic_id = pvsched_cpu_apicid(cpu);
		pc->line.line.flags = cpu_online(cpu) ? PVSCHED_GUEST_FLAG_ONLINE : 0;
		local_irq_save(flags);
		pvsched_publish(pc);
		local_irq_restore(flags);
	}

	/* The table is written before the header that advertises it. */
	pd->cpu_info_offset = 0;
	pd->cpu_info_entries = 0;
	if (pvsched_cpu_info_usable(pd, &host.line)) {
		pd->cpu_info_offset = host.line.cpu_info_offset;
		pd->cpu_info_entries = host.line.nr_slots;
		published = pvsched_write_cpu_info(pd);
		if (!published)
			pvsched_clear_cpu_info(pd);
	}

	memset(&guest, 0, sizeof(guest));
	guest.line.guest_version_major = PVSCHED_VERSION_MAJOR;
	guest.line.guest_version_minor = PVSCHED_VERSION_MINOR;
	guest.line.guest_nr_cpus = num_possible_cpus();
	guest.line.guest_features = pvsched_guest_features(pd);
	pd->heartbeat = READ_ONCE(old_guest[2]);
	guest.line.guest_heartbeat = pd->heartbeat;
	guest.line.guest_generation = (u32)READ_ONCE(old_guest[3]) + 1;
	guest.line.guest_state = PVSCHED_GUEST_ATTACHED;
	pvsched_write_header_guest(pd, &guest);

	/* Slots and the doorbell are set up before any probe may look at them. */
	WRITE_ONCE(pvsched_ringing, pd->ringing);
	smp_wmb();
	WRITE_ONCE(pvsched_active, true);
	ret = pvsched_register_probes();
	if (ret) {
		/* Undo what the header and lines already say: detached, nothing published. */
		pd->attached = true;
		pvsched_detach(pd);
		return ret;
	}
	pd->probes_registered = true;
	pd->attached = true;
	dev_info(&pd->pdev->dev,
		 "attached: host ABI %u.%u, %u slots, host features %#llx, guest features %#llx, generation %u\n",
		 host.line.version_major, host.line.version_minor, pd->nr_slots,
		 (unsigned long long)host.line.host_features,
		 (unsigned long long)guest.line.guest_features, guest.line.guest_generation);
	if (pd->cpu_info_offset)
		dev_info(&pd->pdev->dev, "CPU-info table at offset %u: preempt-count addresses of %u CPUs published\n",
			 pd->cpu_info_offset, published);
	if (pd->ringing)
		dev_info(&pd->pdev->dev, "doorbell: ringing peer %u vector %u (this guest is peer %u), at most every %u us per CPU\n",
			 pd->doorbell_peer, PVSCHED_DOORBELL_VECTOR, pd->ivposition,
			 READ_ONCE(doorbell_min_us));
	return 0;
}

/*
 * Unregisters the probes and waits for running ones, then clears every line this guest
 * published (identity kept, everything else zero, the online flag clear) and marks the
 * header detached. Called with pvsched_lock held.
 */
static void pvsched_detach(struct pvsched_dev *pd)
{
	u64 *guest_words = (u64 *)&pd->header->guest;
	unsigned int cpu;
	u64 word3;

	WRITE_ONCE(pvsched_ringing, false);
	WRITE_ONCE(pvsched_active, false);
	if (pd->probes_registered) {
		/* Includes tracepoint_synchronize_unregister(): no probe runs after this. */
		pvsched_unregister_probes();
		pd->probes_registered = false;
	}
	if (!pd->attached)
		return;
	/* Probes are gone: this CPU may write every slot one last time. */
	for_each_possible_cpu(cpu) {
		struct pvsched_cpu *pc = per_cpu_ptr(&pvsched_cpus, cpu);
		unsigned long flags;

		if (!pc->slot)
			continue;
		memset(&pc->line, 0, sizeof(pc->line));
		pc->line.raw.cpu_id = cpu;
		atomic_set(&pc->remote_rt_wakeups, 0);
		atomic_set(&pc->remote_max_prio, 0);
		pc->rt_sleeper_prio = 0;
		local_irq_save(flags);
		pvsched_store_line(pc);
		local_irq_restore(flags);
		pc->slot = NULL;
	}
	if (pd->cpu_info_offset) {
		pvsched_clear_cpu_info(pd);
		/* guest_features (word 1) no longer claims the table. */
		WRITE_ONCE(guest_words[1], READ_ONCE(guest_words[1]) &
			   ~(u64)PVSCHED_FEAT_PREEMPT_COUNT_GPA);
	}
	pvsched_publish_counters(pd);
	/* The cleared lines and table are visible before the header says detached. */
	smp_wmb();
	/* guest_state lives in the upper half of word 3; keep the generation. */
	word3 = (u64)(u32)READ_ONCE(guest_words[3]) |
		((u64)PVSCHED_GUEST_DETACHED << 32);
	WRITE_ONCE(guest_words[3], word3);
	pd->attached = false;
	dev_info(&pd->pdev->dev, "detached\n");
}

/*
 * The heartbeat runs on the unbound workqueue: a per-CPU kworker would starve behind an
 * RT hog on its CPU, and a stalled heartbeat would tell the host the guest is dead.
 */
static void pvsched_schedule(struct pvsched_dev *pd, unsigned int delay_ms)
{
	queue_delayed_work(system_unbound_wq, &pd->work, msecs_to_jiffies(max(delay_ms, 1U)));
}

/* Attaches, or keeps polling while the page is not formatted yet. pvsched_lock is held. */
static int pvsched_try_attach(struct pvsched_dev *pd)
{
	int ret = pvsched_attach(pd);

	if (ret == -EAGAIN) {
		/* Say it every 30 s so a missing daemon is visible in dmesg. */
		if (pd->attach_polls++ == 0)
			dev_info(&pd->pdev->dev, "shared page (%zu bytes) not formatted yet; waiting for the host\n",
				 pd->len);
		else if (pd->attach_polls % (30000 / PVSCHED_ATTACH_POLL_MS) == 0)
			dev_info(&pd->pdev->dev, "still waiting for the host to format the page\n");
		pvsched_schedule(pd, PVSCHED_ATTACH_POLL_MS);
	} else if (ret) {
		dev_err(&pd->pdev->dev, "attach failed (%d); not retrying\n", ret);
	} else {
		pvsched_schedule(pd, heartbeat_ms);
	}
	return ret;
}

static void pvsched_work(struct work_struct *work)
{
	struct pvsched_dev *pd = container_of(to_delayed_work(work), struct pvsched_dev, work);
	u64 *guest_words = (u64 *)&pd->header->guest;

	mutex_lock(&pvsched_lock);
	/* Detached on purpose (enable=0) or going away: enable=1 queues the work again. */
	if (pd->removing || !READ_ONCE(enable))
		goto out;
	if (!pd->attached) {
		pvsched_try_attach(pd);
		goto out;
	}
	pd->heartbeat++;
	WRITE_ONCE(guest_words[2], pd->heartbeat);
	pvsched_publish_counters(pd);
	pvsched_schedule(pd, heartbeat_ms);
out:
	mutex_unlock(&pvsched_lock);
}

/*
 * enable=0 detaches: the probes are unregistered (and waited for), every line is cleared
 * and the header says detached, so the host stops acting on this guest at once. enable=1
 * attaches again, continuing each line's sequence. Before the device is bound (insmod
 * arguments) only the value is stored.
 */
static int pvsched_enable_set(const char *val, const struct kernel_param *kp)
{
	struct pvsched_dev *pd;
	bool on;
	int ret;

	ret = kstrtobool(val, &on);
	if (ret)
		return ret;
	mutex_lock(&pvsched_lock);
	WRITE_ONCE(enable, on);
	pd = pvsched_device;
	if (pd && !pd->removing) {
		if (!on)
			pvsched_detach(pd);
		else if (!pd->attached)
			pvsched_try_attach(pd);
	}
	mutex_unlock(&pvsched_lock);
	return 0;
}

/* Copies a host line under its seqlock; false when every attempt overlapped a write. */
static bool pvsched_read_host_line(const struct PvschedSlot *slot, union pvsched_host_words *out)
{
	const struct PvschedHostLine *src = &slot->host;
	const u64 *src_words = (const u64 *)((const u8 *)src + 8);
	int attempt, i;
	u32 before;

	for (attempt = 0; attempt < PVSCHED_SEQ_READ_ATTEMPTS; attempt++) {
		before = smp_load_acquire(&src->seq);
		if (before & 1) {
			cpu_relax();
			continue;
		}
		out->raw.pcpu = READ_ONCE(src->pcpu);
		for (i = 0; i < ARRAY_SIZE(out->raw.words); i++)
			out->raw.words[i] = READ_ONCE(src_words[i]);
		/* The payload loads complete before the counter is checked again. */
		smp_rmb();
		if (READ_ONCE(src->seq) == before) {
			out->raw.seq = before;
			return true;
		}
	}
	return false;
}

/* /sys/kernel/debug/pvsched/host: the host-written half, read-only. */
static int pvsched_host_show(struct seq_file *m, void *unused)
{
	struct pvsched_dev *pd = m->private;
	union pvsched_header_host_words host;
	union pvsched_host_words line;
	u32 slot;

	mutex_lock(&pvsched_lock);
	pvsched_read_header_host(pd, &host);
	seq_printf(m, "magic=%#llx version=%u.%u nr_slots=%u total_size=%u host_features=%#llx host_heartbeat=%llu host_generation=%u doorbell_peer=%u doorbell_vectors=%u attached=%d\n",
		   (unsigned long long)host.line.magic, host.line.version_major,
		   host.line.version_minor, host.line.nr_slots, host.line.total_size,
		   (unsigned long long)host.line.host_features,
		   (unsigned long long)host.line.host_heartbeat, host.line.host_generation,
		   host.line.doorbell_peer, host.line.doorbell_vectors, pd->attached);
	if (!pd->attached)
		goto out;
	/* The slot count validated at attach bounds the walk, not the live header. */
	for (slot = 0; slot < pd->nr_slots; slot++) {
		const struct PvschedSlot *s = (const struct PvschedSlot *)
			((const u8 *)pd->base + PVSCHED_HEADER_SIZE + (size_t)slot * PVSCHED_SLOT_SIZE);
		bool ok = pvsched_read_host_line(s, &line);

		seq_printf(m, "cpu%u%s seq=%u pcpu=%u boost_state=%u preempted=%u smt_sibling_busy=%u host_policy=%u host_prio=%u pcpu_load_permille=%u poll_hint_ns=%u steal_ns=%llu throttle_until_ns=%llu host_time_ns=%llu boosts=%u throttles=%u boosted_ns=%llu\n",
			   slot, ok ? "" : " (torn)", line.line.seq, line.line.pcpu,
			   line.line.boost_state, line.line.preempted, line.line.smt_sibling_busy,
			   line.line.host_policy, line.line.host_prio,
			   line.line.pcpu_load_permille, line.line.poll_hint_ns,
			   (unsigned long long)line.line.steal_ns,
			   (unsigned long long)line.line.throttle_until_ns,
			   (unsigned long long)line.line.host_time_ns, line.line.boosts,
			   line.line.throttles, (unsigned long long)line.line.boosted_ns);
	}
out:
	mutex_unlock(&pvsched_lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pvsched_host);

/* /sys/kernel/debug/pvsched/guest: what this guest publishes (header and lines). */
static int pvsched_guest_show(struct seq_file *m, void *unused)
{
	struct pvsched_dev *pd = m->private;
	const u64 *hg = (const u64 *)&pd->header->guest;
	union pvsched_header_guest_words guest;
	unsigned int cpu;
	int i;

	mutex_lock(&pvsched_lock);
	for (i = 0; i < ARRAY_SIZE(guest.words); i++)
		guest.words[i] = READ_ONCE(hg[i]);
	seq_printf(m, "version=%u.%u nr_cpus=%u features=%#llx heartbeat=%llu generation=%u state=%u\n",
		   guest.line.guest_version_major, guest.line.guest_version_minor,
		   guest.line.guest_nr_cpus, (unsigned long long)guest.line.guest_features,
		   (unsigned long long)guest.line.guest_heartbeat, guest.line.guest_generation,
		   guest.line.guest_state);
	seq_printf(m, "doorbell=%s peer=%u ivposition=%d doorbell_min_us=%u doorbells_rung=%llu doorbells_suppressed=%llu host_interrupts=%llu\n",
		   pd->ringing ? "on" : "off", pd->doorbell_peer, (int)pd->ivposition,
		   READ_ONCE(doorbell_min_us), (unsigned long long)guest.line.doorbells_rung,
		   (unsigned long long)guest.line.doorbells_suppressed,
		   (unsigned long long)guest.line.host_interrupts);
	for_each_possible_cpu(cpu) {
		struct pvsched_cpu *pc = per_cpu_ptr(&pvsched_cpus, cpu);
		const struct PvschedGuestLine *l;

		if (!pc->slot)
			continue;
		/* Read the published line: unlocked, a torn read is only a display glitch. */
		l = &pc->slot->guest;
		seq_printf(m, "cpu%u seq=%u apic_id=%u flags=%#x updates=%llu policy=%u rt_prio=%u nice=%d irq_depth=%u softirq_depth=%u rt_pending=%u pending_prio=%u irq_count=%llu cs_depth=%u cs_count=%llu\n",
			   READ_ONCE(l->cpu_id), READ_ONCE(l->seq), READ_ONCE(l->apic_id),
			   READ_ONCE(l->flags), (unsigned long long)READ_ONCE(l->updates),
			   READ_ONCE(l->task_policy), READ_ONCE(l->task_rt_prio),
			   READ_ONCE(l->task_nice), READ_ONCE(l->irq_depth),
			   READ_ONCE(l->softirq_depth), READ_ONCE(l->rt_pending),
			   READ_ONCE(l->pending_prio), (unsigned long long)READ_ONCE(l->irq_count),
			   READ_ONCE(l->cs_depth), (unsigned long long)READ_ONCE(l->cs_count));
	}
	mutex_unlock(&pvsched_lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pvsched_guest);

/*
 * Checks, on the calling CPU, that the published address is where its preempt count
 * lives: the count read through the address's direct-map alias equals the count read
 * through the per-CPU pointer, before and after one more preempt_disable(), so the two
 * move together. With local interrupts off nothing else changes this CPU's count.
 */
static const char *pvsched_gpa_selfcheck(struct pvsched_dev *pd, unsigned int *cpu_out)
{
	const int *count, *alias;
	int c0, a0, c1, a1;
	unsigned long flags;
	unsigned int cpu;
	u64 gpa;

	local_irq_save(flags);
	cpu = smp_processor_id();
	*cpu_out = cpu;
	gpa = cpu < pd->cpu_info_entries ?
		READ_ONCE(pvsched_cpu_info(pd, cpu)->preempt_count_gpa) : 0;
	/* Only RAM is in the direct map; anything else is a wrong address, not read. */
	if (!gpa || !pfn_valid(PHYS_PFN(gpa)) || !page_is_ram(PHYS_PFN(gpa))) {
		local_irq_restore(flags);
		return gpa ? "not-ram" : "unpublished";
	}
	count = pvsched_preempt_count_ptr(cpu);
	alias = phys_to_virt(gpa);
	c0 = READ_ONCE(*count);
	a0 = READ_ONCE(*alias);
	preempt_disable();
	c1 = READ_ONCE(*count);
	a1 = READ_ONCE(*alias);
	/* Interrupts are off: this never reschedules. */
	preempt_enable();
	local_irq_restore(flags);
	return (c0 == a0 && c1 == a1 && c0 != c1) ? "ok" : "mismatch";
}

/* /sys/kernel/debug/pvsched/cpu_info: the CPU-info table as published. */
static int pvsched_cpu_info_show(struct seq_file *m, void *unused)
{
	struct pvsched_dev *pd = m->private;
	const char *check;
	unsigned int cpu;
	u32 i;

	mutex_lock(&pvsched_lock);
	seq_printf(m, "offset=%u entries=%u\n", pd->cpu_info_offset, pd->cpu_info_entries);
	for (i = 0; i < pd->cpu_info_entries; i++) {
		const struct PvschedCpuInfo *e = pvsched_cpu_info(pd, i);

		seq_printf(m, "cpu%u preempt_count_gpa=%#llx cpu_id=%u reserved=%u\n", i,
			   (unsigned long long)READ_ONCE(e->preempt_count_gpa),
			   READ_ONCE(e->cpu_id), READ_ONCE(e->reserved));
	}
	if (pd->cpu_info_entries) {
		check = pvsched_gpa_selfcheck(pd, &cpu);
		seq_printf(m, "selfcheck cpu=%u %s\n", cpu, check);
	}
	mutex_unlock(&pvsched_lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pvsched_cpu_info);

/*
 * /sys/kernel/debug/pvsched/hold_lock: a test hook that makes a real lock holder. Writing
 * "CPU MS lock" starts a kernel thread bound to CPU that takes pvsched_hold_spinlock
 * (preemption disabled) and busy-waits MS milliseconds with it held; "CPU MS nolock" busy
 * waits as long with preemption enabled (yielding every 2 ms) and no lock. One hold at a
 * time; reading says whether one runs, where, how, and how many completed.
 */
static DEFINE_SPINLOCK(pvsched_hold_spinlock);
/* Serialises starting, reaping and describing holds (process context only). */
static DEFINE_MUTEX(pvsched_hold_mutex);

static struct {
	struct task_struct *task; /* referenced until reaped; NULL when none */
	bool running; /* set by the writer, cleared by the thread when done */
	int cpu; /* of the current or last hold, -1 before the first */
	unsigned int ms;
	bool locked;
	u64 completed; /* holds that ran to their end; written by the thread */
} pvsched_hold = { .cpu = -1 };

static int pvsched_hold_fn(void *unused)
{
	u64 end = ktime_get_ns() + (u64)pvsched_hold.ms * NSEC_PER_MSEC;
	u64 now, next_yield;

	if (pvsched_hold.locked) {
		spin_lock(&pvsched_hold_spinlock);
		while (ktime_get_ns() < end && !kthread_should_stop())
			cpu_relax();
		spin_unlock(&pvsched_hold_spinlock);
	} else {
		next_yield = ktime_get_ns() + PVSCHED_HOLD_YIELD_NS;
		while ((now = ktime_get_ns()) < end && !kthread_should_stop()) {
			if (now >= next_yield) {
				cond_resched();
				next_yield = now + PVSCHED_HOLD_YIELD_NS;
			}
			cpu_relax();
		}
	}
	if (!kthread_should_stop())
		WRITE_ONCE(pvsched_hold.completed, pvsched_hold.completed + 1);
	/* Publishes the count above before a reader sees the hold over. */
	smp_store_release(&pvsched_hold.running, false);
	return 0;
}

/* Stops (or, when it is over, just collects) the last hold's thread. Mutex held. */
static void pvsched_hold_reap(void)
{
	if (!pvsched_hold.task)
		return;
	/* The reference taken at start keeps the task valid even after it has exited. */
	kthread_stop(pvsched_hold.task);
	put_task_struct(pvsched_hold.task);
	pvsched_hold.task = NULL;
	WRITE_ONCE(pvsched_hold.running, false);
}

static ssize_t pvsched_hold_write(struct file *file, const char __user *ubuf, size_t count,
				  loff_t *ppos)
{
	char buf[48], cpu_arg[12], ms_arg[12], mode[8], extra;
	struct task_struct *task;
	unsigned int cpu, ms;
	bool locked;
	ssize_t ret;

	if (count == 0 || count >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, count))
		return -EFAULT;
	buf[count] = '\0';
	if (sscanf(buf, "%11s %11s %7s %c", cpu_arg, ms_arg, mode, &extra) != 3 ||
	    kstrtouint(cpu_arg, 10, &cpu) || kstrtouint(ms_arg, 10, &ms))
		return -EINVAL;
	if (!strcmp(mode, "lock"))
		locked = true;
	else if (!strcmp(mode, "nolock"))
		locked = false;
	else
		return -EINVAL;
	if (ms == 0 || ms > PVSCHED_HOLD_MAX_MS || cpu >= nr_cpu_ids)
		return -EINVAL;

	mutex_lock(&pvsched_hold_mutex);
	if (smp_load_acquire(&pvsched_hold.running)) {
		ret = -EBUSY;
		goto out;
	}
	pvsched_hold_reap();
	cpus_read_lock();
	if (!cpu_online(cpu)) {
		ret = -EINVAL;
		goto out_cpus;
	}
	pvsched_hold.cpu = cpu;
	pvsched_hold.ms = ms;
	pvsched_hold.locked = locked;
	task = kthread_create_on_cpu(pvsched_hold_fn, NULL, cpu, "pvsched_hold/%u");
	if (IS_ERR(task)) {
		ret = PTR_ERR(task);
		goto out_cpus;
	}
	get_task_struct(task);
	pvsched_hold.task = task;
	WRITE_ONCE(pvsched_hold.running, true);
	/* A full barrier: the thread sees the parameters written above. */
	wake_up_process(task);
	ret = count;
out_cpus:
	cpus_read_unlock();
out:
	mutex_unlock(&pvsched_hold_mutex);
	return ret;
}

static ssize_t pvsched_hold_read(struct file *file, char __user *ubuf, size_t count,
				 loff_t *ppos)
{
	char buf[96];
	bool running;
	int len;

	mutex_lock(&pvsched_hold_mutex);
	running = smp_load_acquire(&pvsched_hold.running);
	len = scnprintf(buf, sizeof(buf), "running=%d cpu=%d ms=%u mode=%s completed=%llu\n",
			running, pvsched_hold.cpu, pvsched_hold.ms,
			pvsched_hold.cpu < 0 ? "none" : pvsched_hold.locked ? "lock" : "nolock",
			(unsigned long long)READ_ONCE(pvsched_hold.completed));
	mutex_unlock(&pvsched_hold_mutex);
	return simple_read_from_buffer(ubuf, count, ppos, buf, len);
}

static const struct file_operations pvsched_hold_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.read = pvsched_hold_read,
	.write = pvsched_hold_write,
	.llseek = default_llseek,
};

/*
 * /dev/pvsched: a read-only view of the whole shared region for guest user space. mmap
 * maps BAR2 (offset 0 is the header); writable opens and mappings are refused, and the
 * mapping can never be made writable. The mapping is cacheable, like the module's own:
 * the BAR is RAM shared with the host. Host lines are read under their seqlocks.
 */
static int pvsched_misc_open(struct inode *inode, struct file *file)
{
	return (file->f_mode & FMODE_WRITE) ? -EPERM : 0;
}

static int pvsched_misc_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct pvsched_dev *pd;
	int ret;

	if (vma->vm_flags & VM_WRITE)
		return -EPERM;
	mutex_lock(&pvsched_lock);
	pd = pvsched_device;
	if (!pd || pd->removing) {
		ret = -ENODEV;
		goto out;
	}
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_clear(vma, VM_MAYWRITE);
#else
	vma->vm_flags &= ~VM_MAYWRITE;
#endif
	/* Refuses an offset or a length past the BAR. */
	ret = vm_iomap_memory(vma, pd->phys, pd->len);
out:
	mutex_unlock(&pvsched_lock);
	return ret;
}

static const struct file_operations pvsched_misc_fops = {
	.owner = THIS_MODULE,
	.open = pvsched_misc_open,
	.mmap = pvsched_misc_mmap,
	.llseek = noop_llseek,
};

/*
 * /sys/class/misc/pvsched/: a summary for guest user space. Values come from the
 * module's validated state or from single reads of the header; host lines are copied
 * under their seqlocks, like the module's own reads.
 */
static ssize_t attached_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	bool attached;

	mutex_lock(&pvsched_lock);
	attached = pvsched_device && pvsched_device->attached;
	mutex_unlock(&pvsched_lock);
	return sysfs_emit(buf, "%d\n", attached);
}
static DEVICE_ATTR_RO(attached);

static ssize_t region_size_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	size_t len;

	mutex_lock(&pvsched_lock);
	len = pvsched_device ? pvsched_device->len : 0;
	mutex_unlock(&pvsched_lock);
	return sysfs_emit(buf, "%zu\n", len);
}
static DEVICE_ATTR_RO(region_size);

/* Which header value an attribute shows. */
enum pvsched_summary {
	PVSCHED_SUM_HOST_GENERATION,
	PVSCHED_SUM_NR_SLOTS,
	PVSCHED_SUM_FEATURES,
	PVSCHED_SUM_HOST_FEATURES,
	PVSCHED_SUM_GUEST_FEATURES,
};

static ssize_t pvsched_summary_show(char *buf, enum pvsched_summary what)
{
	union pvsched_header_host_words host = {};
	struct pvsched_dev *pd;
	u64 guest_features = 0;
	bool attached = false;
	u32 nr_slots = 0;

	mutex_lock(&pvsched_lock);
	pd = pvsched_device;
	if (pd) {
		pvsched_read_header_host(pd, &host);
		attached = pd->attached;
		nr_slots = attached ? pd->nr_slots : 0;
		guest_features = READ_ONCE(pd->header->guest.guest_features);
	}
	mutex_unlock(&pvsched_lock);
	switch (what) {
	case PVSCHED_SUM_HOST_GENERATION:
		return sysfs_emit(buf, "%u\n", host.line.host_generation);
	case PVSCHED_SUM_NR_SLOTS:
		return sysfs_emit(buf, "%u\n", nr_slots);
	case PVSCHED_SUM_FEATURES:
		return sysfs_emit(buf, "%#llx\n", attached ? (unsigned long long)
				  (host.line.host_features & guest_features) : 0ULL);
	case PVSCHED_SUM_HOST_FEATURES:
		return sysfs_emit(buf, "%#llx\n", (unsigned long long)host.line.host_features);
	case PVSCHED_SUM_GUEST_FEATURES:
		return sysfs_emit(buf, "%#llx\n",
				  attached ? (unsigned long long)guest_features : 0ULL);
	}
	return -EINVAL;
}

#define PVSCHED_SUMMARY_ATTR(name, what)                                                 \
	static ssize_t name##_show(struct device *dev, struct device_attribute *attr,      \
				   char *buf)                                              \
	{                                                                                  \
		return pvsched_summary_show(buf, what);                                    \
	}                                                                                  \
	static DEVICE_ATTR_RO(name)

PVSCHED_SUMMARY_ATTR(host_generation, PVSCHED_SUM_HOST_GENERATION);
PVSCHED_SUMMARY_ATTR(nr_slots, PVSCHED_SUM_NR_SLOTS);
PVSCHED_SUMMARY_ATTR(features, PVSCHED_SUM_FEATURES);
PVSCHED_SUMMARY_ATTR(host_features, PVSCHED_SUM_HOST_FEATURES);
PVSCHED_SUMMARY_ATTR(guest_features, PVSCHED_SUM_GUEST_FEATURES);

/* One line per slot while attached; lines that would not fit the page are left out. */
static ssize_t host_lines_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	union pvsched_host_words line;
	struct pvsched_dev *pd;
	char one[128];
	int len = 0, n;
	u32 slot;
	bool ok;

	mutex_lock(&pvsched_lock);
	pd = pvsched_device;
	for (slot = 0; pd && pd->attached && slot < pd->nr_slots; slot++) {
		ok = pvsched_read_host_line(pvsched_slot(pd, slot), &line);
		n = scnprintf(one, sizeof(one), "cpu%u%s boost_state=%u preempted=%u pcpu_load_permille=%u host_time_ns=%llu\n",
			      slot, ok ? "" : " (torn)", line.line.boost_state,
			      line.line.preempted, line.line.pcpu_load_permille,
			      (unsigned long long)line.line.host_time_ns);
		if (len + n >= PAGE_SIZE)
			break;
		len += sysfs_emit_at(buf, len, "%s", one);
	}
	mutex_unlock(&pvsched_lock);
	return len;
}
static DEVICE_ATTR_RO(host_lines);

static struct attribute *pvsched_misc_attrs[] = {
	&dev_attr_attached.attr,
	&dev_attr_region_size.attr,
	&dev_attr_host_generation.attr,
	&dev_attr_nr_slots.attr,
	&dev_attr_features.attr,
	&dev_attr_host_features.attr,
	&dev_attr_guest_features.attr,
	&dev_attr_host_lines.attr,
	NULL,
};
ATTRIBUTE_GROUPS(pvsched_misc);

static struct miscdevice pvsched_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "pvsched",
	.fops = &pvsched_misc_fops,
	.mode = 0444,
	.groups = pvsched_misc_groups,
};

static int pvsched_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct pvsched_dev *pd;
	resource_size_t start;
	int ret;

	if (pvsched_device) {
		dev_info(&pdev->dev, "another ivshmem device is already bound; ignoring this one\n");
		return -EBUSY;
	}
	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	/* Managed after pcim_enable_device(): released when the device goes away. */
	ret = pci_request_region(pdev, PVSCHED_SHM_BAR, KBUILD_MODNAME);
	if (ret)
		return ret;
	pd = devm_kzalloc(&pdev->dev, sizeof(*pd), GFP_KERNEL);
	if (!pd)
		return -ENOMEM;
	pd->pdev = pdev;
	pd->irq = -1;
	start = pci_resource_start(pdev, PVSCHED_SHM_BAR);
	pd->phys = start;
	pd->len = pci_resource_len(pdev, PVSCHED_SHM_BAR);
	if (pd->len < PVSCHED_HEADER_SIZE) {
		dev_err(&pdev->dev, "BAR%d is %zu bytes, smaller than the header\n",
			PVSCHED_SHM_BAR, pd->len);
		return -ENODEV;
	}
	/*
	 * BAR2 of ivshmem-plain is host RAM shared with the daemon: map it write-back so
	 * that ordinary (cache-coherent) loads, stores and barriers order against the host.
	 */
	pd->base = devm_memremap(&pdev->dev, start, pd->len, MEMREMAP_WB);
	if (IS_ERR(pd->base))
		return PTR_ERR(pd->base);
	pd->header = pd->base;
	INIT_DELAYED_WORK(&pd->work, pvsched_work);
	pci_set_drvdata(pdev, pd);

	mutex_lock(&pvsched_lock);
	pvsched_device = pd;
	ret = READ_ONCE(enable) ? pvsched_try_attach(pd) : 0;
	if (ret && ret != -EAGAIN) {
		pvsched_doorbell_teardown(pd);
		pvsched_device = NULL;
		mutex_unlock(&pvsched_lock);
		return ret;
	}
	mutex_unlock(&pvsched_lock);

	pd->debugfs = debugfs_create_dir("pvsched", NULL);
	debugfs_create_file("host", 0444, pd->debugfs, pd, &pvsched_host_fops);
	debugfs_create_file("guest", 0444, pd->debugfs, pd, &pvsched_guest_fops);
	debugfs_create_file("cpu_info", 0444, pd->debugfs, pd, &pvsched_cpu_info_fops);
	debugfs_create_file("hold_lock", 0200, pd->debugfs, pd, &pvsched_hold_fops);

	/* User space's view; the module works without it. */
	pvsched_misc.minor = MISC_DYNAMIC_MINOR;
	pvsched_misc.parent = &pdev->dev;
	ret = misc_register(&pvsched_misc);
	if (ret)
		dev_warn(&pdev->dev, "cannot register /dev/%s (%d); no user-space view\n",
			 pvsched_misc.name, ret);
	else
		pd->misc_registered = true;
	dev_info(&pdev->dev, "bound: BAR%d %pa, %zu bytes\n", PVSCHED_SHM_BAR, &start, pd->len);
	return 0;
}

static void pvsched_remove(struct pci_dev *pdev)
{
	struct pvsched_dev *pd = pci_get_drvdata(pdev);

	/* Without pvsched_lock: the sysfs and debugfs readers take it, and these wait for them. */
	if (pd->misc_registered)
		misc_deregister(&pvsched_misc);
	debugfs_remove_recursive(pd->debugfs);
	mutex_lock(&pvsched_hold_mutex);
	pvsched_hold_reap();
	mutex_unlock(&pvsched_hold_mutex);
	mutex_lock(&pvsched_lock);
	/* An open /dev/pvsched can still call mmap: it sees this and refuses. */
	pd->removing = true;
	mutex_unlock(&pvsched_lock);
	/* The work sees `removing` and does not queue itself again. */
	cancel_delayed_work_sync(&pd->work);
	mutex_lock(&pvsched_lock);
	pvsched_detach(pd);
	pvsched_doorbell_teardown(pd);
	pvsched_device = NULL;
	mutex_unlock(&pvsched_lock);
}

static const struct pci_device_id pvsched_ids[] = {
	{ PCI_DEVICE(PVSCHED_IVSHMEM_VENDOR, PVSCHED_IVSHMEM_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, pvsched_ids);

static struct pci_driver pvsched_driver = {
	.name = KBUILD_MODNAME,
	.id_table = pvsched_ids,
	.probe = pvsched_probe,
	.remove = pvsched_remove,
};
module_pci_driver(pvsched_driver);

MODULE_DESCRIPTION("pvsched guest: publishes scheduler state to the host through ivshmem");
MODULE_LICENSE("GPL");
MODULE_VERSION(PVSCHED_GUEST_VERSION);
