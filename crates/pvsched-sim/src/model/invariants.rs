//! Structural invariants checked after every event (tests, `--check`).

use super::*;

impl Sim {
    pub(super) fn check_invariants(&mut self) {
        if self.violations.len() > 8 {
            return;
        }
        let mut seen = vec![0u8; self.threads.len()];
        let mut errs = Vec::new();
        for (c, cpu) in self.cpus.iter().enumerate() {
            if cpu.curr != NONE {
                let th = &self.threads[cpu.curr as usize];
                seen[cpu.curr as usize] += 1;
                if th.state != TState::Running || th.cpu != c as u32 {
                    errs.push(format!(
                        "t={} pCPU {c}: current thread {} is {:?} on {}",
                        self.now, cpu.curr, th.state, th.cpu
                    ));
                }
                if th.affinity & (1 << c) == 0 {
                    errs.push(format!(
                        "t={} thread {} runs outside its affinity",
                        self.now, cpu.curr
                    ));
                }
            }
            let idle = cpu.curr == NONE && cpu.fair_rq.is_empty() && cpu.rt_rq.is_empty();
            if idle != (self.idle_mask & (1 << c) != 0) {
                errs.push(format!("t={} pCPU {c}: idle mask out of date", self.now));
            }
            for &t in cpu.fair_rq.iter().chain(&cpu.rt_rq) {
                seen[t as usize] += 1;
                let th = &self.threads[t as usize];
                if th.state != TState::Runnable || th.cpu != c as u32 {
                    errs.push(format!(
                        "t={} pCPU {c}: queued thread {t} is {:?} on {}",
                        self.now, th.state, th.cpu
                    ));
                }
            }
        }
        for (t, th) in self.threads.iter().enumerate() {
            // schedstat as /proc keeps it: a running thread's run time lags by less
            // than a tick, never leads; run time and run delay fit in the time so far,
            // the wait in progress outside them.
            let (run, wait, _) = schedstat(th, &self.cpus, self.now, self.stat_tick, false);
            let exact = run_ns(th, &self.cpus, self.now);
            let lag_ok = match th.state {
                TState::Running => run <= exact && exact - run < self.stat_tick,
                _ => run == exact,
            };
            let waiting = if th.state == TState::Runnable {
                self.now.saturating_sub(th.queued)
            } else {
                0
            };
            let queued_ok = th.state != TState::Runnable || th.queued >= th.since;
            if !lag_ok || !queued_ok || exact + wait + waiting > self.now {
                errs.push(format!(
                    "t={} thread {t} ({:?}): schedstat run {run} wait {wait}, exact run {exact}, waiting {waiting}",
                    self.now, th.state
                ));
            }
            let expect = u8::from(th.state != TState::Blocked);
            if seen[t] != expect {
                errs.push(format!(
                    "t={} thread {t} ({:?}) appears {} times on pCPUs",
                    self.now, th.state, seen[t]
                ));
            }
        }
        let mut tseen = vec![0u8; self.tasks.len()];
        for (v, vc) in self.vcpus.iter().enumerate() {
            if vc.curr != NONE {
                tseen[vc.curr as usize] += 1;
                let t = &self.tasks[vc.curr as usize];
                if t.state != GState::Running || t.vcpu != v as u32 {
                    errs.push(format!(
                        "t={} vCPU {v}: current task {} is {:?} on {}",
                        self.now, vc.curr, t.state, t.vcpu
                    ));
                }
            }
            for &x in vc
                .rt_rq
                .iter()
                .chain(vc.fair_rq.iter())
                .chain(vc.pending.iter())
            {
                tseen[x as usize] += 1;
            }
            let th = &self.threads[vc.thread as usize];
            if th.state == TState::Running && matches!(vc.halt, Halt::Blocked { .. }) {
                errs.push(format!(
                    "t={} vCPU {v} runs while blocked in halt",
                    self.now
                ));
            }
        }
        for (x, t) in self.tasks.iter().enumerate() {
            if tseen[x] > 1 {
                errs.push(format!(
                    "t={} task {x} is on {} vCPUs at once",
                    self.now, tseen[x]
                ));
            }
            if t.state == GState::Running && tseen[x] != 1 {
                errs.push(format!(
                    "t={} running task {x} is current nowhere",
                    self.now
                ));
            }
        }
        for vm in &self.vms {
            for l in &vm.locks {
                if l.holder != NONE
                    && !matches!(self.tasks[l.holder as usize].phase, Phase::Cs { .. })
                {
                    errs.push(format!(
                        "t={} lock holder {} not in a critical section",
                        self.now, l.holder
                    ));
                }
                for &w in &l.waiters {
                    if !matches!(self.tasks[w as usize].phase, Phase::Spin { .. }) {
                        errs.push(format!("t={} lock waiter {w} not spinning", self.now));
                    }
                }
            }
        }
        self.violations.extend(errs);
    }
}
