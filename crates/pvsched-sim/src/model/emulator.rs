//! The emulator: the main loop and I/O threads, emulated I/O paths and the
//! global lock.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EmuItem {
    Submit(u32),
    Complete(u32),
    /// TCG: a guest timer of this task expired; the main loop fires it.
    Timer(u32),
}

impl Sim {
    pub(super) fn bql_held_by_vcpu(&self, v: u32) -> bool {
        let vm = self.vcpus[v as usize].vm as usize;
        self.vms[vm].bql_holder == self.vcpus[v as usize].thread
    }

    pub(super) fn vcpu_exit_bql(&mut self, v: u32) {
        let vm = self.vcpus[v as usize].vm as usize;
        let t = self.vcpus[v as usize].thread;
        self.vcpus[v as usize].next_exit = Nanos::MAX;
        if self.vms[vm].bql_holder == NONE {
            self.vms[vm].bql_holder = t;
            self.vcpus[v as usize].exit_rem = self.vms[vm].bql_exit;
        } else {
            self.vms[vm].bql_waiters.push_back(t);
            self.vcpus[v as usize].bql_wait = true;
            self.block_running(t);
        }
    }

    pub(super) fn bql_release(&mut self, vm: u32) {
        let m = &mut self.vms[vm as usize];
        let Some(w) = m.bql_waiters.pop_front() else {
            m.bql_holder = NONE;
            return;
        };
        m.bql_holder = w;
        let exit = m.bql_exit;
        match self.threads[w as usize].role {
            Role::Vcpu { vcpu } => {
                let vc = &mut self.vcpus[vcpu as usize];
                vc.bql_wait = false;
                vc.exit_rem = exit;
                self.host_wake(w);
            }
            Role::Emu { .. } => {
                let io = self.vms[vm as usize].io_emu;
                self.threads[w as usize].rem = io;
                self.host_wake(w);
            }
            _ => {}
        }
    }

    pub(super) fn emu_push(&mut self, vm: u32, item: EmuItem) {
        let m = &mut self.vms[vm as usize];
        m.emu_queue.push_back(item);
        let t = m.emu_thread;
        if t != NONE && self.threads[t as usize].state == TState::Blocked && m.emu_item.is_none() {
            self.emu_next(vm, t, false);
        }
    }

    /// Starts the next queued item on the emulator thread (which is blocked or running).
    pub(super) fn emu_next(&mut self, vm: u32, t: u32, running: bool) {
        let m = &mut self.vms[vm as usize];
        let Some(item) = m.emu_queue.pop_front() else {
            m.emu_item = None;
            if running {
                self.block_running(t);
            }
            return;
        };
        m.emu_item = Some(item);
        if let (EmuItem::Timer(_), Some(tcg)) = (item, m.tcg) {
            // The main loop's timer work does not wait for the global lock: the
            // model's lock holders are I/O on the main loop itself.
            let cost = self.rng.exp(tcg.main_loop).max(1);
            self.threads[t as usize].rem = cost;
            if !running {
                self.host_wake(t);
            }
            return;
        }
        let m = &mut self.vms[vm as usize];
        let io = m.io_emu;
        if m.io_path == IoPath::MainLoop {
            if m.bql_holder == NONE {
                m.bql_holder = t;
            } else if m.bql_holder != t {
                m.bql_waiters.push_back(t);
                if running {
                    self.block_running(t);
                }
                return;
            }
        }
        self.threads[t as usize].rem = io;
        if !running {
            self.host_wake(t);
        }
    }

    pub(super) fn emu_item_done(&mut self, vm: u32, t: u32) {
        let m = &mut self.vms[vm as usize];
        let Some(item) = m.emu_item.take() else {
            self.block_running(t);
            return;
        };
        if m.io_path == IoPath::MainLoop && m.bql_holder == t && !matches!(item, EmuItem::Timer(_))
        {
            self.bql_release(vm);
        }
        match item {
            EmuItem::Submit(task) => {
                let Kind::Io { device, .. } = self.tasks[task as usize].kind else {
                    return;
                };
                self.q.push(self.now + device, Ev::IoDone { task });
            }
            EmuItem::Complete(task) => {
                let v = self.tasks[task as usize].vcpu;
                let cost = self.vms[vm as usize].irq_ns;
                self.io_wake(task, v, cost);
            }
            EmuItem::Timer(task) => self.fire_task_timer(task),
        }
        self.emu_next(vm, t, true);
    }

    pub(super) fn io_done(&mut self, task: u32) {
        let vm = self.tasks[task as usize].vm;
        // Under TCG the main loop raises device interrupts too.
        if self.vms[vm as usize].io_path == IoPath::Irq && self.vms[vm as usize].tcg.is_none() {
            let v = self.tasks[task as usize].vcpu;
            let cost = self.vms[vm as usize].irq_ns;
            self.io_wake(task, v, cost);
        } else {
            self.emu_push(vm, EmuItem::Complete(task));
        }
    }

    pub(super) fn io_wake(&mut self, task: u32, v: u32, cost: Nanos) {
        let t = &mut self.tasks[task as usize];
        let Kind::Io { think, .. } = t.kind else {
            return;
        };
        t.phase = Phase::Work {
            rem: self.rng.exp(think).max(1),
        };
        let t = &mut self.tasks[task as usize];
        t.sample_on_run = true;
        t.state = GState::Runnable;
        self.deliver(v, task, cost);
    }
}
