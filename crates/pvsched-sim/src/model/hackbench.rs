//! hackbench in the guest: groups of sender and receiver processes over Unix
//! sockets, rounds forked by a parent (the overcommit experiment's benchmark).

use super::*;

/// The parameters of one hackbench instance, resolved.
#[derive(Clone, Copy, Debug)]
pub(super) struct HackbenchSpec {
    pub(super) groups: u32,
    pub(super) fds: u32,
    pub(super) loops: u32,
    pub(super) send: Nanos,
    pub(super) recv: Nanos,
    pub(super) cs: Nanos,
    /// Parent CPU per forked process.
    pub(super) fork: Nanos,
}

/// One hackbench instance of a VM.
#[derive(Clone, Debug)]
pub(super) struct Hackbench {
    pub(super) parent: u32,
    pub(super) children: Vec<u32>,
    /// Processes of the current round that have not finished.
    pub(super) running: u32,
}

impl Sim {
    /// Creates the parent and every process of a hackbench instance (each
    /// receiver with its own socket lock, taken from `nlocks`); the parent
    /// starts forking the first round.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_hackbench(
        &mut self,
        vm: u32,
        first_vcpu: u32,
        vcpus: u32,
        group: u32,
        inst: u32,
        spec: HackbenchSpec,
        nlocks: &mut u32,
        placed: &mut u32,
    ) -> Hackbench {
        let total = spec.fds * spec.loops;
        let children_n = 2 * spec.fds * spec.groups;
        let mut new_task = |sim: &mut Sim, kind: Kind| {
            let id = sim.tasks.len() as u32;
            let vcpu = first_vcpu + *placed % vcpus;
            *placed += 1;
            sim.tasks.push(Task {
                vm,
                vcpu,
                kind,
                rt_prio: 0,
                pinned: false,
                measure: false,
                group,
                phase: Phase::Blocked,
                state: GState::Sleeping,
                step: 0,
                gen: 0,
                t0: 0,
                sample_on_run: false,
                peer: NONE,
                initiator: false,
                armed: false,
                backlog: 0,
            });
            id
        };
        let parent = new_task(
            self,
            Kind::HbParent {
                fork: spec.fork * Nanos::from(children_n),
                inst,
            },
        );
        let mut children = Vec::with_capacity(children_n as usize);
        for _ in 0..spec.groups {
            let first_recv = self.tasks.len() as u32;
            for _ in 0..spec.fds {
                let lock = *nlocks;
                *nlocks += 1;
                let kind = Kind::HbRecv {
                    recv: spec.recv,
                    cs: spec.cs,
                    lock,
                    total,
                    inst,
                };
                children.push(new_task(self, kind));
            }
            for _ in 0..spec.fds {
                let kind = Kind::HbSend {
                    send: spec.send,
                    cs: spec.cs,
                    fds: spec.fds,
                    total,
                    first_recv,
                    inst,
                };
                children.push(new_task(self, kind));
            }
        }
        self.start_task(parent);
        Hackbench {
            parent,
            children,
            running: 0,
        }
    }

    /// The current phase of a hackbench task (parent, sender or receiver) ended.
    pub(super) fn hackbench_advance(&mut self, task: u32, t: &Task, scoring: bool) {
        let v = t.vcpu;
        let vm = t.vm as usize;
        match (t.kind, t.phase) {
            (Kind::HbParent { inst, .. }, Phase::Work { .. }) => {
                // Every process forked: senders start writing, receivers block in read.
                let children = std::mem::take(&mut self.vms[vm].hackbench[inst as usize].children);
                for &c in &children {
                    let ct = &mut self.tasks[c as usize];
                    ct.step = 0;
                    ct.backlog = 0;
                    if let Kind::HbSend { send, .. } = ct.kind {
                        ct.phase = Phase::Work { rem: send };
                        self.guest_wake(c, v);
                    }
                }
                let h = &mut self.vms[vm].hackbench[inst as usize];
                h.running = children.len() as u32;
                h.children = children;
                self.task_block(task);
            }
            (Kind::HbSend { cs, .. }, Phase::Work { .. }) => {
                let lock = self.hackbench_target_lock(t);
                self.spin_acquire(task, lock, cs);
            }
            (
                Kind::HbSend {
                    send,
                    cs,
                    fds,
                    total,
                    first_recv,
                    inst,
                },
                Phase::Cs { lock, .. },
            ) => {
                self.spin_release(task, lock, cs);
                // The message is in the receiver's socket; a receiver asleep in read wakes.
                let r = first_recv + t.step % fds;
                let rt = &mut self.tasks[r as usize];
                rt.backlog += 1;
                if rt.state == GState::Sleeping
                    && rt.phase == Phase::Blocked
                    && rt.step < total_of(rt)
                {
                    let Kind::HbRecv { recv, .. } = rt.kind else {
                        return;
                    };
                    rt.phase = Phase::Work { rem: recv };
                    self.guest_wake(r, v);
                }
                let st = &mut self.tasks[task as usize];
                st.step += 1;
                if st.step >= total {
                    self.hackbench_done(vm, inst, task, v);
                } else {
                    st.phase = Phase::Work { rem: send };
                }
            }
            (Kind::HbRecv { lock, cs, .. }, Phase::Work { .. }) => {
                self.spin_acquire(task, lock, cs);
            }
            (
                Kind::HbRecv {
                    recv,
                    cs,
                    total,
                    inst,
                    ..
                },
                Phase::Cs { lock, .. },
            ) => {
                self.spin_release(task, lock, cs);
                if scoring {
                    self.vms[vm].stats.ops[t.group as usize] += 1;
                }
                let rt = &mut self.tasks[task as usize];
                rt.backlog -= 1;
                rt.step += 1;
                if rt.step >= total {
                    self.hackbench_done(vm, inst, task, v);
                } else if rt.backlog > 0 {
                    rt.phase = Phase::Work { rem: recv };
                } else {
                    self.task_block(task);
                }
            }
            _ => {}
        }
    }

    /// The socket lock of the receiver a sender writes to next.
    fn hackbench_target_lock(&self, t: &Task) -> u32 {
        let Kind::HbSend {
            fds, first_recv, ..
        } = t.kind
        else {
            return 0;
        };
        match self.tasks[(first_recv + t.step % fds) as usize].kind {
            Kind::HbRecv { lock, .. } => lock,
            _ => 0,
        }
    }

    /// A process finished its round: it exits; the last one wakes the parent,
    /// which reaps them and forks the next round.
    fn hackbench_done(&mut self, vm: usize, inst: u32, task: u32, v: u32) {
        self.task_block(task);
        let h = &mut self.vms[vm].hackbench[inst as usize];
        h.running -= 1;
        if h.running == 0 {
            let parent = h.parent;
            let Kind::HbParent { fork, .. } = self.tasks[parent as usize].kind else {
                return;
            };
            self.tasks[parent as usize].phase = Phase::Work { rem: fork.max(1) };
            self.guest_wake(parent, v);
        }
    }
}

/// A receiver's reads per round.
fn total_of(t: &Task) -> u32 {
    match t.kind {
        Kind::HbRecv { total, .. } => total,
        _ => 0,
    }
}
