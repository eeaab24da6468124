//! The one module with `unsafe` code: the scheduling syscalls
//! (`sched_getattr`/`sched_setattr`, which libc does not wrap, and
//! `sched_{get,set}affinity`), the monotonic clock, the timer slack of the
//! calling thread and the calling thread's id.
//!
//! Everything here is a thin, typed wrapper that returns `io::Result`; the
//! policy of what to set lives in [`crate::sched`].

use std::io;
use std::mem::size_of;

/// The kernel's `struct sched_attr` (include/uapi/linux/sched/types.h).
///
/// We pass `SCHED_ATTR_SIZE_VER0` (48 bytes, no utilisation clamps) as the
/// size, so the kernel neither reads nor writes the last two fields; they are
/// here so the buffer is as large as the current kernel definition.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedAttrRaw {
    /// Size of the structure as the caller knows it.
    pub size: u32,
    /// `SCHED_*` policy.
    pub sched_policy: u32,
    /// `SCHED_FLAG_*`.
    pub sched_flags: u64,
    /// Nice value for `SCHED_NORMAL`/`SCHED_BATCH`.
    pub sched_nice: i32,
    /// Priority for `SCHED_FIFO`/`SCHED_RR`.
    pub sched_priority: u32,
    /// `SCHED_DEADLINE` runtime (ns).
    pub sched_runtime: u64,
    /// `SCHED_DEADLINE` deadline (ns).
    pub sched_deadline: u64,
    /// `SCHED_DEADLINE` period (ns).
    pub sched_period: u64,
    /// Utilisation clamp minimum (unused: VER0 size).
    pub sched_util_min: u32,
    /// Utilisation clamp maximum (unused: VER0 size).
    pub sched_util_max: u32,
}

/// `SCHED_ATTR_SIZE_VER0`.
pub const SCHED_ATTR_SIZE_VER0: u32 = 48;
/// `SCHED_FLAG_RESET_ON_FORK`.
pub const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;
/// `SCHED_FLAG_RECLAIM` (`SCHED_DEADLINE` bandwidth reclaiming).
pub const SCHED_FLAG_RECLAIM: u64 = 0x02;
/// `SCHED_FLAG_DL_OVERRUN` (`SIGXCPU` on a `SCHED_DEADLINE` overrun).
pub const SCHED_FLAG_DL_OVERRUN: u64 = 0x04;

const _: () = assert!(size_of::<SchedAttrRaw>() == 56);
const _: () = assert!(std::mem::offset_of!(SchedAttrRaw, sched_period) == 40);

/// Reads a thread's scheduling attributes.
pub fn sched_getattr(tid: i32) -> io::Result<SchedAttrRaw> {
    let mut attr = SchedAttrRaw::default();
    // SAFETY: `attr` is a valid, writable buffer of 56 bytes and we tell the
    // kernel it may write at most SCHED_ATTR_SIZE_VER0 (48) of them; flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid as libc::c_long,
            &mut attr as *mut SchedAttrRaw,
            SCHED_ATTR_SIZE_VER0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Sets a thread's scheduling attributes (`attr.size` is forced to VER0).
pub fn sched_setattr(tid: i32, attr: &SchedAttrRaw) -> io::Result<()> {
    let attr = SchedAttrRaw {
        size: SCHED_ATTR_SIZE_VER0,
        ..*attr
    };
    // SAFETY: `attr` is a valid, initialised sched_attr whose size field says
    // 48 bytes, all inside the 56-byte value; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            tid as libc::c_long,
            &attr as *const SchedAttrRaw,
            0 as libc::c_long,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a thread's CPU affinity as a sorted list of CPU numbers.
pub fn sched_getaffinity(tid: i32) -> io::Result<Vec<u32>> {
    // SAFETY: cpu_set_t is plain data for which all-zero bytes is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size we pass.
    let rc = unsafe { libc::sched_getaffinity(tid, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET only reads `set`, and `cpu` is below the set's capacity.
    Ok((0..max)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .map(|cpu| cpu as u32)
        .collect())
}

/// Sets a thread's CPU affinity.
pub fn sched_setaffinity(tid: i32, cpus: &[u32]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data for which all-zero bytes is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * size_of::<libc::cpu_set_t>();
    for &cpu in cpus {
        if cpu as usize >= max {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `cpu` is below the set's capacity (checked above).
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    }
    // SAFETY: `set` is a valid, initialised cpu_set_t of the size we pass.
    let rc = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// CPU time consumed by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Sets the calling thread's timer slack, so its periodic sleeps are not
/// rounded up by the default 50 µs.
pub fn set_timer_slack_ns(ns: u64) -> io::Result<()> {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Takes an exclusive `flock` on `file` without waiting: `Ok(false)` when
/// another open file description holds it.
pub fn flock_exclusive_nonblocking(file: &std::fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock takes a descriptor we own (borrowed for the call) and
    // touches no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(err)
}

/// Whether the process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_thread_attributes_and_affinity_read_back() {
        let attr = sched_getattr(gettid()).unwrap();
        assert!(attr.sched_policy <= 6);
        let cpus = sched_getaffinity(gettid()).unwrap();
        assert!(!cpus.is_empty());
        // Setting the same affinity needs no privilege.
        sched_setaffinity(gettid(), &cpus).unwrap();
        // Lowering our own priority (raising nice) needs no privilege either.
        sched_setattr(gettid(), &attr).unwrap();
        assert!(monotonic_ns() > 0);
        assert!(thread_cpu_ns() > 0);
    }

    #[test]
    fn missing_thread_is_esrch() {
        let err = sched_getattr(i32::MAX).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }
}
