//! The one module with `unsafe` code: the scheduling syscalls
//! (`sched_getattr`/`sched_setattr`, which libc does not wrap, and
//! `sched_{get,set}affinity`), the monotonic clock, the timer slack of the
//! calling thread, the calling thread's id, the credentials of a Unix
//! socket's peer (`SO_PEERCRED`) and user-name lookup (`getpwnam_r`).
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

/// Whether the process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The credentials of a Unix socket's peer, as the kernel recorded them
/// (for a connection to a listening socket: the process that called `listen`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id in the daemon's pid namespace (0: the peer is in a
    /// namespace where it has no number, or is gone).
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// `getsockopt(SO_PEERCRED)` on a connected Unix stream socket.
pub fn peer_cred(socket: &impl std::os::fd::AsFd) -> io::Result<PeerCred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is borrowed for the call; `cred` is a valid, writable
    // ucred and `len` says its exact size, so the kernel writes inside it.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<libc::ucred>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_PEERCRED returned a short ucred",
        ));
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The user id of a user name (`getpwnam_r`: the system's user database,
/// NSS included). `Ok(None)` when no such user exists.
pub fn uid_of_user(name: &str) -> io::Result<Option<u32>> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: passwd is plain data for which all-zero bytes is a valid value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `cname` is NUL-terminated and outlives the call; `pwd` and
        // `result` are valid, writable; `buf` is writable for the length we
        // pass, and the strings `pwd` points to afterwards live in `buf`,
        // which we do not read through `pwd` (only the integer `pw_uid`).
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(pwd.pw_uid)),
            libc::ERANGE if buf.len() < (1 << 20) => {
                let len = buf.len() * 4;
                buf.resize(len, 0);
            }
            // Some implementations report "not found" as an error.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
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
    fn root_resolves_and_a_made_up_user_does_not() {
        assert_eq!(uid_of_user("root").unwrap(), Some(0));
        assert_eq!(uid_of_user("pvsched-no-such-user-x9").unwrap(), None);
        assert!(uid_of_user("a\0b").is_err());
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        assert_eq!(cred.pid, std::process::id() as i32);
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(cred.uid, unsafe { libc::geteuid() });
    }

    #[test]
    fn missing_thread_is_esrch() {
        let err = sched_getattr(i32::MAX).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }
}
