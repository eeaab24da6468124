//! The one module with `unsafe` code: the scheduling syscalls
//! (`sched_getattr`/`sched_setattr`, which libc does not wrap, and
//! `sched_{get,set}affinity`), the monotonic clock, the timer slack of the
//! calling thread, the calling thread's id, the credentials of a Unix
//! socket's peer (`SO_PEERCRED`) and user-name lookup (`getpwnam_r`); for
//! the watchdog, process file descriptors (`pidfd_open`,
//! `pidfd_send_signal`, `poll`), a sealed memfd mapped as shared words, and
//! ignoring a signal; taking the descriptors a service manager passed.
//!
//! Everything here is a thin, typed wrapper that returns `io::Result`; the
//! policy of what to set lives in [`crate::sched`].

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

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

/// Opens a pidfd of a process (`pidfd_open(2)`, Linux 5.3+). Unlike the pid,
/// it names that one process for its whole life: it becomes readable when
/// the process has exited and signals sent through it cannot hit a process
/// that reused the pid.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: pidfd_open takes a pid and flags (0) and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel returned a new file descriptor that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// Sends a signal to the process of a pidfd (`pidfd_send_signal(2)`, Linux 5.1+).
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: a valid fd, a signal number, a null siginfo (the kernel fills
    // in a SI_USER one) and flags 0; the kernel reads no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd() as libc::c_long,
            sig as libc::c_long,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_long,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout_ms` (negative: forever) for `fd` to become readable.
/// Returns whether it is; an interrupted wait returns `false`.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, writable pollfd and we pass a count of 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Ignores a signal in the calling process (`SIG_IGN`, kept across `exec`).
pub fn ignore_signal(sig: i32) -> io::Result<()> {
    // SAFETY: installing SIG_IGN runs no code of ours in signal context.
    let prev = unsafe { libc::signal(sig, libc::SIG_IGN) };
    if prev == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A few `u64` words in a `MAP_SHARED` mapping of a memfd, read and written
/// only as atomics: one process maps it from the memfd it created, another
/// from the descriptor it inherited. The memfd is sealed against shrinking
/// and growing, so no party can truncate it under a mapping (no `SIGBUS`).
///
/// Any bit pattern is a valid `u64`, so whatever another process stores is a
/// value, never undefined behaviour; the words are never handed out as
/// anything but `&AtomicU64`.
#[derive(Debug)]
pub struct SharedWords {
    ptr: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is owned by the value and only accessed through atomics.
unsafe impl Send for SharedWords {}
// SAFETY: as above: `&SharedWords` only gives out `&AtomicU64`.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Creates a zero-filled, sealed memfd of `words` words (close-on-exec;
    /// pass it to a child explicitly) and maps it.
    pub fn create(name: &CStr, words: usize) -> io::Result<(SharedWords, OwnedFd)> {
        let len = Self::byte_len(words)?;
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
        let rc = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: on success memfd_create returned a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(rc) };
        // SAFETY: ftruncate on a valid fd with a length that fits off_t.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS takes an integer argument and touches no memory.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let map = Self::map(fd.as_fd(), words)?;
        Ok((map, fd))
    }

    /// Maps `words` words of a shared file (a memfd from [`SharedWords::create`]).
    /// The file must be at least that large.
    pub fn map(fd: BorrowedFd<'_>, words: usize) -> io::Result<SharedWords> {
        let len = Self::byte_len(words)?;
        // SAFETY: libc::stat is plain data for which all-zero bytes is valid.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable stat buffer; `fd` is open.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || (st.st_size as u64) < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a shared file of at least {len} bytes"),
            ));
        }
        // SAFETY: a new shared mapping of `len` bytes of an open regular file
        // at least that large; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(SharedWords { ptr, words })
    }

    fn byte_len(words: usize) -> io::Result<usize> {
        match words.checked_mul(size_of::<u64>()) {
            Some(len) if words > 0 && len <= 4096 => Ok(len),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Word `i` (panics when `i` is out of range, a programming error).
    pub fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words, "word {i} of {}", self.words);
        // SAFETY: `i` is in range, so the offset stays inside the mapping.
        let word = unsafe { self.ptr.as_ptr().add(i) };
        // SAFETY: `word` points into a live mapping that is page-aligned (so
        // every word is 8-byte aligned) and is only ever accessed atomically.
        unsafe { &*word }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: we own this mapping of exactly this length; no reference
        // from `word` outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.words * size_of::<u64>()) };
    }
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

/// Takes ownership of descriptor `fd`, which the service manager passed to this process
/// (`LISTEN_FDS`), if it is open; marks it close-on-exec.
///
/// Each number must be taken at most once: the caller takes `3..3 + LISTEN_FDS` once, at
/// start-up, and removes the variables so nothing takes them again.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFD with an integer argument only changes the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (F_GETFD succeeded), was handed to this process by
    // its service manager, and by the contract above nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
    #[test]
    fn a_pidfd_turns_readable_when_its_process_exits_and_signals_through_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id() as i32).unwrap();
        assert!(
            !poll_readable(fd.as_fd(), 50).unwrap(),
            "readable while alive"
        );
        pidfd_send_signal(fd.as_fd(), libc::SIGKILL).unwrap();
        assert!(
            poll_readable(fd.as_fd(), 5_000).unwrap(),
            "not readable after exit"
        );
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(pidfd_open(0).is_err());
        assert!(pidfd_open(i32::MAX).is_err());
    }

    #[test]
    fn shared_words_are_seen_through_a_second_mapping_and_cannot_be_truncated() {
        let (a, fd) = SharedWords::create(c"pvsched-test", 2).unwrap();
        let b = SharedWords::map(fd.as_fd(), 2).unwrap();
        a.word(1).store(42, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(b.word(1).load(std::sync::atomic::Ordering::Relaxed), 42);
        assert_eq!(b.word(0).load(std::sync::atomic::Ordering::Relaxed), 0);
        // SAFETY: ftruncate on a valid fd; it must be refused by the seal.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), 0) };
        assert_ne!(rc, 0, "a sealed memfd was truncated");
        assert!(
            SharedWords::map(fd.as_fd(), 3).is_err(),
            "mapped past the end"
        );
        assert!(SharedWords::create(c"pvsched-test", 0).is_err());
        let stdin_like = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(SharedWords::map(stdin_like.as_fd(), 1).is_err());
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
}
