//! Seccomp filters, one allowlist per daemon thread role.
//!
//! Each thread of `pvsched hostd` does one job, and a filter per thread
//! keeps each to the system calls of that job: the stats thread, which
//! parses requests from any local user, cannot open a file or a socket, the
//! discovery thread, which talks to QEMU monitors, cannot change a thread's
//! scheduling, and none of them can `execve`, `ptrace` or map executable
//! memory. Filters are per thread (no `SECCOMP_FILTER_FLAG_TSYNC`): each
//! thread calls [`enter`] first thing in its body. A filter is inherited by
//! threads created after it and filters stack, so every thread is spawned
//! before the loop thread (the main thread) enters its own.
//!
//! [`arm`] compiles every role's filter once at start (so a broken list is an
//! error at start, not a dead thread later) and sets the mode for the
//! process: `enforce` (default) kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`) on a call outside the list, `log` allows it
//! and has the kernel log it (`SECCOMP_RET_LOG`: an audit record of type
//! 1326 with `syscall=N` in `dmesg` or `journalctl -k`), `off` installs
//! nothing. A process that never calls [`arm`] (library users, tests) gets
//! no filter from [`enter`].
//!
//! The lists were taken from `strace -f` of the daemon through its real
//! workloads (real QEMU, boost, throttle, SIGTERM restore, kill -9 with the
//! watchdog restoring, the metrics endpoint), then each call was kept only
//! with a reason; the groups below say which job needs which call. Calls that
//! the features being added beside this one need (the state-writer thread,
//! the SIGBUS handler for truncated mappings, the lock file, `SO_PEERCRED`)
//! are listed with them.

// What strace -f showed each thread make after the point where it now enters
// its filter (tests/hostd_qemu.rs, tests/hostd_watchdog.rs and
// tests/hostd_seccomp.rs of crates/pvsched, with /metrics and /status
// fetched; x86_64, glibc 2.36, kernel 6.18):
//   loop (21): clock_nanosleep close exit_group fcntl fsync futex getpid mkdir
//     mmap munmap openat pread64 read rename rt_sigreturn sched_getattr
//     sched_setattr sigaltstack statx unlink write
//   discover (24): clock_nanosleep close connect exit fcntl futex getdents64
//     gettid madvise mmap mprotect munmap newfstatat openat read recvfrom
//     rt_sigprocmask rt_sigreturn sched_getaffinity sendto setsockopt
//     sigaltstack socket statx
//   stats (12): accept4 close fcntl gettid mmap mprotect munmap recvfrom
//     sched_getaffinity sendto setsockopt sigaltstack
//   watchdog (18): close exit_group fcntl getpid getppid gettid munmap openat
//     pidfd_open pidfd_send_signal poll read sched_getattr sched_setattr
//     sigaltstack statx unlink write
// The lists allow more than that on purpose: the same jobs through other
// paths (a restore of affinity, readlink of a state file owner's exe, a
// panic's abort), legacy and *at variants of the same call, and what the
// features added beside this module make:
//   state-writer thread: openat(O_CREAT) write fsync rename unlink mkdir statx
//     (no trace yet: its own thread is added with the writer);
//   SIGBUS handler: mmap(MAP_FIXED|MAP_ANONYMOUS) over the mapping, and
//     rt_sigaction(SIGBUS) to pass a foreign fault on;
//   lock file: flock at start (before any filter), close at exit;
//   SO_PEERCRED: getsockopt(SOL_SOCKET, SO_PEERCRED) on the QMP socket;
//   getpwnam_r: runs in Refresher::new on the main thread before any
//     filter (with nss "files systemd" it would open /etc/passwd and
//     connect to systemd-userdb: not allowed on the discover thread).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

/// What a filter does with a call outside its role's list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Kill the whole process (`SECCOMP_RET_KILL_PROCESS`): the watchdog
    /// then restores every changed thread.
    #[default]
    Enforce,
    /// Allow the call and have the kernel log it (`SECCOMP_RET_LOG`), to
    /// find what a list lacks on a new kernel, libc or feature.
    Log,
    /// Install no filter (debugging, `strace`, profilers).
    Off,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Enforce => "enforce",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            other => Err(format!(
                "seccomp mode {other:?} is not one of enforce, log, off"
            )),
        }
    }
}

/// A thread's job, which decides its allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The RT loop (the main thread): guest lines, `/proc` samples,
    /// `sched_setattr`, attach and drop of VMs, restore at exit.
    Loop,
    /// `pvsched-discover`: `/proc` scans, QMP sessions, shared-file checks.
    Discover,
    /// `pvsched-stats`: answers `/metrics` and `/status` on an already
    /// bound loopback listener.
    Stats,
    /// `pvsched-state`: makes the state file durable (write, fsync, rename);
    /// `pvsched-isolreq`: writes and removes the isolation request likewise.
    StateWriter,
    /// `pvsched-ivshmem`: the ivshmem server on a socket bound before the
    /// thread starts: accepts QEMU, checks it in `/proc`, makes its memfd and
    /// eventfds and sends them.
    Ivshmem,
    /// The `pvsched hostd-watchdog` process once it runs its body: waits on
    /// the daemon's pidfd, kills a stalled daemon, restores from the state file.
    Watchdog,
    /// `pvsched-haltpoll` (`halt_poll` = `observe` or `tune`): reads
    /// `/proc/stat` and KVM's halt-poll parameters, writes them and their
    /// undo file.
    HaltPoll,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 7] = [
        Role::Loop,
        Role::Discover,
        Role::Stats,
        Role::StateWriter,
        Role::Ivshmem,
        Role::Watchdog,
        Role::HaltPoll,
    ];

    /// The role's name (as in logs and the README).
    pub fn name(self) -> &'static str {
        match self {
            Role::Loop => "loop",
            Role::Discover => "discover",
            Role::Stats => "stats",
            Role::StateWriter => "state-writer",
            Role::Ivshmem => "ivshmem",
            Role::Watchdog => "watchdog",
            Role::HaltPoll => "haltpoll",
        }
    }

    /// The groups of calls this role may make.
    pub fn groups(self) -> Vec<Group> {
        let mut g = vec![thread_basics(), memory()];
        match self {
            Role::Loop => {
                g.extend([
                    procfs_read(),
                    scheduling(),
                    shared_mappings(),
                    loop_wait(),
                    // Until every state-file write has moved to the writer
                    // thread, attach/drop and restore write it from here.
                    state_file_write(),
                ]);
            }
            Role::Discover => g.extend([procfs_scan(), qmp_client()]),
            Role::Stats => g.push(stats_server()),
            Role::StateWriter => g.push(state_file_write()),
            Role::Ivshmem => g.extend([procfs_read(), ivshmem_server()]),
            // Its own thread, so that the threads that parse QMP replies and
            // guest lines keep their read-only opens.
            Role::HaltPoll => g.extend([procfs_read(), kvm_params_write()]),
            Role::Watchdog => g.extend([
                procfs_read(),
                scheduling(),
                state_file_remove(),
                watchdog_pidfd(),
            ]),
        }
        g
    }

    /// Names of the calls allowed (sorted, each once), for docs and tests.
    pub fn syscall_names(self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self
            .groups()
            .iter()
            .flat_map(|g| g.calls.iter().map(|c| c.name))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A filter that could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler does not know this architecture.
    #[error("seccomp filters are not supported on {arch}")]
    Arch {
        /// `std::env::consts::ARCH`.
        arch: &'static str,
    },
    /// A list did not compile (a bug in this module).
    #[error("building the {role} filter")]
    Build {
        /// Role.
        role: Role,
        /// What seccompiler said.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("installing the {role} filter")]
    Install {
        /// Role.
        role: Role,
        /// What seccompiler said.
        #[source]
        source: seccompiler::Error,
    },
    /// [`arm`] was called twice with different modes.
    #[error("seccomp already armed in mode {armed}, asked for {asked}")]
    Rearmed {
        /// Mode in force.
        armed: SeccompMode,
        /// Mode asked for.
        asked: SeccompMode,
    },
}

/// How a call's arguments are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgCheck {
    /// Any arguments.
    Any,
    /// Argument `index` has none of the bits of `mask` (e.g. no `PROT_EXEC`).
    Without {
        /// Argument (0-based).
        index: u8,
        /// Forbidden bits.
        mask: u64,
    },
    /// Argument `index` is one of `values`.
    OneOf {
        /// Argument (0-based).
        index: u8,
        /// Allowed values.
        values: Vec<u64>,
    },
    /// Argument `index` equals `value` and argument `then` is one of `values`
    /// (e.g. level `SOL_SOCKET` and option `SO_PEERCRED`).
    PairOf {
        /// First argument.
        index: u8,
        /// Its value.
        value: u64,
        /// Second argument.
        then: u8,
        /// Its allowed values.
        values: Vec<u64>,
    },
}

/// One allowed call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// Syscall number on this architecture.
    pub nr: i64,
    /// Its name.
    pub name: &'static str,
    /// What its arguments may be.
    pub args: ArgCheck,
}

/// Calls that one job needs, with why.
#[derive(Clone, Debug)]
pub struct Group {
    /// Short name.
    pub name: &'static str,
    /// Why these calls.
    pub why: &'static str,
    /// The calls.
    pub calls: Vec<Call>,
}

macro_rules! call {
    ($name:ident) => {
        Call {
            nr: libc::$name,
            name: &stringify!($name)[4..],
            args: ArgCheck::Any,
        }
    };
    ($name:ident, $args:expr) => {
        Call {
            nr: libc::$name,
            name: &stringify!($name)[4..],
            args: $args,
        }
    };
}

fn one_of(index: u8, values: &[i32]) -> ArgCheck {
    ArgCheck::OneOf {
        index,
        values: values.iter().map(|&v| v as u64).collect(),
    }
}

/// Every thread: what std and glibc do under any code (locks, sleeps,
/// stderr, thread exit, signal delivery, panics).
fn thread_basics() -> Group {
    Group {
        name: "thread basics",
        why: "locks and parking (futex), sleeps, the clock when the vDSO falls back, \
              stderr (eprintln), closing descriptors, std's descriptor checks (fcntl F_GETFD), \
              HashMap seeds (getrandom), glibc's CPU count for a new malloc arena \
              (sched_getaffinity), signal delivery on any thread (SIGTERM's handler returns \
              with rt_sigreturn; an interrupted sleep restarts), thread and process exit \
              (sigaltstack off, stack unmapped, exit), and abort() of a panic in a drop \
              (tgkill of this process with SIGABRT only)",
        calls: vec![
            call!(SYS_futex),
            call!(SYS_sched_yield),
            call!(SYS_clock_gettime),
            call!(SYS_clock_nanosleep),
            call!(SYS_nanosleep),
            call!(SYS_gettimeofday),
            call!(SYS_write),
            call!(SYS_writev),
            call!(SYS_close),
            call!(
                SYS_fcntl,
                one_of(
                    1,
                    &[libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL]
                )
            ),
            call!(SYS_getrandom),
            call!(SYS_sched_getaffinity),
            call!(SYS_getpid),
            call!(SYS_gettid),
            call!(SYS_rt_sigreturn),
            call!(SYS_rt_sigprocmask),
            call!(SYS_restart_syscall),
            call!(SYS_sigaltstack),
            call!(SYS_exit),
            call!(SYS_exit_group),
            call!(
                SYS_tgkill,
                ArgCheck::PairOf {
                    index: 0,
                    value: u64::from(std::process::id()),
                    then: 2,
                    values: vec![libc::SIGABRT as u64],
                }
            ),
        ],
    }
}

/// Every thread: the allocator, never executable memory.
fn memory() -> Group {
    let no_exec = || ArgCheck::Without {
        index: 2,
        mask: libc::PROT_EXEC as u64,
    };
    Group {
        name: "memory",
        why: "malloc (brk, mmap of arenas, mprotect as an arena grows, madvise and munmap \
              as it shrinks, mremap for large reallocs); never PROT_EXEC, so no thread can \
              make code (MemoryDenyWriteExecute forbids only writable+executable)",
        calls: vec![
            call!(SYS_brk),
            call!(SYS_mmap, no_exec()),
            call!(SYS_mprotect, no_exec()),
            call!(SYS_munmap),
            call!(SYS_mremap),
            call!(SYS_madvise),
        ],
    }
}

/// Reading files by name: `/proc/<pid>/task/<tid>/{stat,schedstat}`, the
/// state file.
fn procfs_read() -> Group {
    Group {
        name: "procfs read",
        why: "per-thread stat/schedstat, /proc/stat and the state file (openat without \
              O_CREAT/O_TRUNC/O_WRONLY/O_APPEND, read, pread64 of a kept \
              descriptor, statx/fstat for read_to_end's size hint, lseek), the \
              executable of a state file's owner (readlink /proc/<pid>/exe)",
        calls: vec![
            read_only_openat(),
            #[cfg(target_arch = "x86_64")]
            read_only_open(),
            call!(SYS_read),
            call!(SYS_pread64),
            call!(SYS_lseek),
            call!(SYS_statx),
            call!(SYS_fstat),
            call!(SYS_newfstatat),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_readlink),
            call!(SYS_readlinkat),
        ],
    }
}

/// Writing KVM's halt-poll parameters and their undo file.
fn kvm_params_write() -> Group {
    Group {
        name: "kvm parameters write",
        why: "open /sys/module/kvm/parameters/halt_poll_ns* for writing (openat with \
              O_WRONLY|O_TRUNC, as a shell's >), write the value; the undo file beside the \
              state file: temp file, write, fsync, rename, fsync of its directory, unlink \
              at restore (create_dir_all: mkdir; statx)",
        calls: vec![
            call!(SYS_openat),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_open),
            call!(SYS_fsync),
            call!(SYS_fdatasync),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_rename),
            call!(SYS_renameat),
            call!(SYS_renameat2),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_unlink),
            call!(SYS_unlinkat),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_mkdir),
            call!(SYS_mkdirat),
        ],
    }
}

/// Changing and reading other threads' scheduling.
fn scheduling() -> Group {
    Group {
        name: "scheduling",
        why: "the daemon's job: sched_setattr to boost, throttle and restore a vCPU thread \
              (sched_getattr for its original), sched_setaffinity for boost_cpus and \
              IOThread pinning and their restore",
        calls: vec![
            call!(SYS_sched_getattr),
            call!(SYS_sched_setattr),
            call!(SYS_sched_setaffinity),
            call!(SYS_sched_getparam),
            call!(SYS_sched_getscheduler),
        ],
    }
}

/// Mapping shared files and surviving their truncation.
fn loop_wait() -> Group {
    Group {
        name: "loop wait",
        why: "the loop sleeps in epoll on the doorbell eventfds and its deadline timerfd \
              (both made before the filter), re-arms the timer, adds a doorbell VM's \
              eventfds as it attaches (their duplicates: fcntl F_DUPFD_CLOEXEC) and removes \
              them as it drops, reads the counters it drains, and writes a guest's eventfd \
              to interrupt it",
        calls: vec![
            #[cfg(target_arch = "x86_64")]
            call!(SYS_epoll_wait),
            call!(SYS_epoll_pwait),
            call!(SYS_epoll_ctl),
            call!(SYS_timerfd_settime),
            call!(SYS_fcntl, one_of(1, &[libc::F_DUPFD_CLOEXEC])),
            call!(SYS_read),
            call!(SYS_write),
        ],
    }
}

fn shared_mappings() -> Group {
    Group {
        name: "shared mappings",
        why: "attach maps a VM's shared file MAP_SHARED read-write and drop unmaps it \
              (mmap/munmap are in the memory group, without PROT_EXEC); the SIGBUS handler \
              of a truncated file maps anonymous zero pages MAP_FIXED over it (mmap again) \
              and resets SIGBUS to its default for a fault it does not own (rt_sigaction of \
              SIGBUS only); ftruncate sizes an all-zero file the daemon initialises; a \
              doorbell VM's memfd is duplicated to be mapped (fcntl F_DUPFD_CLOEXEC); \
              the backend of a guest's RAM mapped read-only for introspection must be on \
              tmpfs or hugetlbfs (fstatfs of its O_PATH descriptor)",
        calls: vec![
            call!(SYS_rt_sigaction, one_of(0, &[libc::SIGBUS])),
            call!(SYS_fstatfs),
            call!(SYS_fcntl, one_of(1, &[libc::F_DUPFD_CLOEXEC])),
            call!(SYS_ftruncate),
            call!(SYS_fstat),
            call!(SYS_statx),
        ],
    }
}

/// Writing the state file durably.
fn state_file_write() -> Group {
    Group {
        name: "state file write",
        why: "temp file, write, fsync, rename over the state file, fsync of its directory \
              (create_dir_all: mkdir; statx), unlink when nothing is recorded; the lock \
              file beside it (flock; the lock goes with the descriptor)",
        calls: vec![
            call!(SYS_openat),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_open),
            call!(SYS_read),
            call!(SYS_statx),
            call!(SYS_fstat),
            call!(SYS_newfstatat),
            call!(SYS_fsync),
            call!(SYS_fdatasync),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_rename),
            call!(SYS_renameat),
            call!(SYS_renameat2),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_unlink),
            call!(SYS_unlinkat),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_mkdir),
            call!(SYS_mkdirat),
            call!(SYS_flock),
        ],
    }
}

/// Flags of an open that cannot create, truncate or append to a file.
const CREATE_OR_WRITE: i32 = libc::O_CREAT | libc::O_TRUNC | libc::O_WRONLY | libc::O_APPEND;

/// `openat` that only reads, or reopens read-write (a checked shared file
/// through /proc/self/fd): never creates, truncates or appends.
fn read_only_openat() -> Call {
    call!(
        SYS_openat,
        ArgCheck::Without {
            index: 2,
            mask: CREATE_OR_WRITE as u64,
        }
    )
}

/// Legacy `open`, same check (its flags are argument 1).
#[cfg(target_arch = "x86_64")]
fn read_only_open() -> Call {
    call!(
        SYS_open,
        ArgCheck::Without {
            index: 1,
            mask: CREATE_OR_WRITE as u64,
        }
    )
}

/// Removing the state file once every recorded thread is restored.
fn state_file_remove() -> Group {
    Group {
        name: "state file remove",
        why: "the watchdog's reconcile removes the state file when every record is \
              restored (unlink); it never writes one",
        calls: vec![
            #[cfg(target_arch = "x86_64")]
            call!(SYS_unlink),
            call!(SYS_unlinkat),
        ],
    }
}

/// Scanning `/proc` for QEMU processes and checking their files.
fn procfs_scan() -> Group {
    Group {
        name: "procfs scan",
        why: "read_dir of /proc and /proc/<pid>/task (getdents64), cmdline, status, maps, \
              stat of every candidate (openat without O_CREAT/O_TRUNC/O_WRONLY, read, statx, \
              fstat), readlink of /proc/<pid>/exe and fd links, an O_PATH|O_NOFOLLOW open \
              of a shared file and its reopen through /proc/self/fd",
        calls: vec![
            read_only_openat(),
            #[cfg(target_arch = "x86_64")]
            read_only_open(),
            call!(SYS_read),
            call!(SYS_pread64),
            call!(SYS_lseek),
            call!(SYS_getdents64),
            call!(SYS_statx),
            call!(SYS_fstat),
            call!(SYS_newfstatat),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_readlink),
            call!(SYS_readlinkat),
        ],
    }
}

/// QMP sessions over Unix sockets.
fn qmp_client() -> Group {
    Group {
        name: "QMP client",
        why: "a Unix stream socket per session (socket AF_UNIX only), connect, send and \
              receive JSON (sendto/recvfrom, read/write), timeouts (setsockopt \
              SO_RCVTIMEO/SO_SNDTIMEO), the peer's pid and uid (getsockopt SO_PEERCRED) \
              and a pending error (SO_ERROR), shutdown; poll for a bounded wait",
        calls: vec![
            call!(SYS_socket, one_of(0, &[libc::AF_UNIX])),
            call!(SYS_connect),
            call!(SYS_sendto),
            call!(SYS_sendmsg),
            call!(SYS_recvfrom),
            call!(SYS_recvmsg),
            call!(SYS_write),
            call!(SYS_read),
            call!(SYS_shutdown),
            call!(
                SYS_setsockopt,
                ArgCheck::PairOf {
                    index: 1,
                    value: libc::SOL_SOCKET as u64,
                    then: 2,
                    values: vec![libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64],
                }
            ),
            call!(
                SYS_getsockopt,
                ArgCheck::PairOf {
                    index: 1,
                    value: libc::SOL_SOCKET as u64,
                    then: 2,
                    values: vec![libc::SO_PEERCRED as u64, libc::SO_ERROR as u64],
                }
            ),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_poll),
            call!(SYS_ppoll),
        ],
    }
}

/// The metrics endpoint on a listener bound before the thread starts.
fn stats_server() -> Group {
    Group {
        name: "stats server",
        why: "accept on the loopback listener bound before the thread starts (no socket, \
              no bind: the thread cannot open anything new), read the request and write the \
              answer (recvfrom/sendto as std's TcpStream does, read/write), per-connection \
              timeouts (setsockopt SO_RCVTIMEO/SO_SNDTIMEO), shutdown",
        calls: vec![
            call!(SYS_accept4),
            call!(SYS_accept),
            call!(SYS_recvfrom),
            call!(SYS_sendto),
            call!(SYS_read),
            call!(SYS_write),
            call!(SYS_shutdown),
            call!(
                SYS_setsockopt,
                ArgCheck::PairOf {
                    index: 1,
                    value: libc::SOL_SOCKET as u64,
                    then: 2,
                    values: vec![libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64],
                }
            ),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_poll),
            call!(SYS_ppoll),
        ],
    }
}

/// The watchdog's hold on the daemon.
fn ivshmem_server() -> Group {
    Group {
        name: "ivshmem server",
        why: "accept on the Unix listener bound before the thread starts (no socket, no bind), \
              the client's pid and uid (getsockopt SO_PEERCRED), a sealed memfd per client \
              (memfd_create, ftruncate, fcntl F_ADD_SEALS/F_GET_SEALS), its eventfds (eventfd2), \
              the setup sent with SCM_RIGHTS (sendmsg), a hang-up read (read/recvfrom/recvmsg), \
              waits bounded by poll, the socket's inode checked and removed at exit (statx, \
              unlink)",
        calls: vec![
            call!(SYS_accept4),
            call!(SYS_accept),
            call!(
                SYS_getsockopt,
                ArgCheck::PairOf {
                    index: 1,
                    value: libc::SOL_SOCKET as u64,
                    then: 2,
                    values: vec![libc::SO_PEERCRED as u64],
                }
            ),
            call!(SYS_memfd_create),
            call!(SYS_ftruncate),
            call!(
                SYS_fcntl,
                one_of(1, &[libc::F_ADD_SEALS, libc::F_GET_SEALS])
            ),
            call!(SYS_eventfd2),
            call!(SYS_sendmsg),
            call!(SYS_sendto),
            call!(SYS_recvmsg),
            call!(SYS_recvfrom),
            call!(SYS_read),
            call!(SYS_write),
            call!(SYS_shutdown),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_poll),
            call!(SYS_ppoll),
            call!(SYS_statx),
            call!(SYS_newfstatat),
            call!(SYS_fstat),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_unlink),
            call!(SYS_unlinkat),
        ],
    }
}

fn watchdog_pidfd() -> Group {
    Group {
        name: "watchdog pidfd",
        why: "pidfd_open of the daemon, poll on it (readable when the daemon has exited), \
              SIGKILL of a stalled daemon through the pidfd only (pidfd_send_signal with \
              SIGKILL), getppid to check the daemon is still its parent",
        calls: vec![
            call!(SYS_pidfd_open, one_of(1, &[0])),
            call!(SYS_pidfd_send_signal, one_of(1, &[libc::SIGKILL])),
            #[cfg(target_arch = "x86_64")]
            call!(SYS_poll),
            call!(SYS_ppoll),
            call!(SYS_getppid),
        ],
    }
}

/// The rules of a role, merged by syscall: a call allowed with any
/// arguments by one group is allowed with any; otherwise the checks of all
/// groups are alternatives.
pub fn rules(role: Role) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let build = |source| SeccompError::Build { role, source };
    let mut any = std::collections::BTreeSet::new();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for group in role.groups() {
        for call in group.calls {
            if any.contains(&call.nr) {
                continue;
            }
            let conds = match &call.args {
                ArgCheck::Any => {
                    any.insert(call.nr);
                    rules.insert(call.nr, Vec::new());
                    continue;
                }
                ArgCheck::Without { index, mask } => vec![vec![SeccompCondition::new(
                    *index,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(*mask),
                    0,
                )
                .map_err(build)?]],
                ArgCheck::OneOf { index, values } => values
                    .iter()
                    .map(|&v| {
                        SeccompCondition::new(*index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                            .map(|c| vec![c])
                    })
                    .collect::<Result<_, _>>()
                    .map_err(build)?,
                ArgCheck::PairOf {
                    index,
                    value,
                    then,
                    values,
                } => values
                    .iter()
                    .map(|&v| {
                        Ok(vec![
                            SeccompCondition::new(
                                *index,
                                SeccompCmpArgLen::Dword,
                                SeccompCmpOp::Eq,
                                *value,
                            )?,
                            SeccompCondition::new(
                                *then,
                                SeccompCmpArgLen::Dword,
                                SeccompCmpOp::Eq,
                                v,
                            )?,
                        ])
                    })
                    .collect::<Result<_, seccompiler::BackendError>>()
                    .map_err(build)?,
            };
            let entry = rules.entry(call.nr).or_default();
            for c in conds {
                entry.push(SeccompRule::new(c).map_err(build)?);
            }
        }
    }
    Ok(rules)
}

/// The compiled filter of a role in `mode` (`None` for [`SeccompMode::Off`]).
pub fn program(role: Role, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let arch = std::env::consts::ARCH;
    let target = TargetArch::try_from(arch).map_err(|_| SeccompError::Arch { arch })?;
    let filter = SeccompFilter::new(rules(role)?, mismatch, SeccompAction::Allow, target)
        .map_err(|source| SeccompError::Build { role, source })?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|source| SeccompError::Build { role, source })?;
    Ok(Some(prog))
}

/// Installs `role`'s filter on the calling thread now, whatever [`arm`] said.
pub fn apply(role: Role, mode: SeccompMode) -> Result<(), SeccompError> {
    match program(role, mode)? {
        Some(prog) => seccompiler::apply_filter(&prog)
            .map_err(|source| SeccompError::Install { role, source }),
        None => Ok(()),
    }
}

struct Armed {
    mode: SeccompMode,
    programs: BTreeMap<Role, BpfProgram>,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

/// Sets the process's mode and compiles every role's filter; from now on
/// [`enter`] installs them. Called once at the start of `pvsched hostd`
/// and of its watchdog.
pub fn arm(mode: SeccompMode) -> Result<(), SeccompError> {
    if let Some(a) = ARMED.get() {
        return if a.mode == mode {
            Ok(())
        } else {
            Err(SeccompError::Rearmed {
                armed: a.mode,
                asked: mode,
            })
        };
    }
    let mut programs = BTreeMap::new();
    for role in Role::ALL {
        if let Some(p) = program(role, mode)? {
            programs.insert(role, p);
        }
    }
    let _ = ARMED.set(Armed { mode, programs });
    arm(mode)
}

/// The mode [`arm`] set (`None`: not armed, [`enter`] does nothing).
pub fn armed_mode() -> Option<SeccompMode> {
    ARMED.get().map(|a| a.mode)
}

/// First call in a thread's body: installs the role's filter on this
/// thread if the process is armed. A filter that cannot be installed in
/// `enforce` mode aborts the process (at thread start nothing is boosted
/// yet, and a daemon must not run unconfined when told to be confined);
/// in `log` mode it is one line and the thread runs unfiltered.
pub fn enter(role: Role) {
    let Some(armed) = ARMED.get() else { return };
    let Some(prog) = armed.programs.get(&role) else {
        return;
    };
    if let Err(source) = seccompiler::apply_filter(prog) {
        let e = SeccompError::Install { role, source };
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        eprintln!(
            "pvsched: {e}: {}; seccomp = \"{}\"",
            source.unwrap_or_default(),
            armed.mode
        );
        if armed.mode == SeccompMode::Enforce {
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_in_every_mode() {
        for role in Role::ALL {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let prog = program(role, mode).unwrap().unwrap();
                // A classic BPF program has at most 4096 instructions.
                assert!(prog.len() < 4096, "{role}: {} instructions", prog.len());
            }
            assert!(program(role, SeccompMode::Off).unwrap().is_none());
        }
    }

    #[test]
    fn roles_get_only_what_their_job_needs() {
        let has = |role: Role, name: &str| role.syscall_names().contains(&name);
        for role in Role::ALL {
            for never in [
                "execve", "execveat", "ptrace", "clone", "clone3", "fork", "bpf",
            ] {
                assert!(!has(role, never), "{role} may {never}");
            }
        }
        for name in [
            "openat",
            "socket",
            "bind",
            "listen",
            "connect",
            "sched_setattr",
        ] {
            assert!(!has(Role::Stats, name), "stats may {name}");
        }
        for name in [
            "sched_setattr",
            "sched_setaffinity",
            "unlink",
            "rename",
            "accept4",
        ] {
            assert!(!has(Role::Discover, name), "discover may {name}");
        }
        for name in ["socket", "connect", "sched_setattr", "accept4"] {
            assert!(!has(Role::StateWriter, name), "state writer may {name}");
        }
        for name in ["socket", "connect", "accept4"] {
            assert!(!has(Role::Loop, name), "loop may {name}");
            assert!(!has(Role::Watchdog, name), "watchdog may {name}");
        }
        for name in ["rename", "mkdir", "fsync", "ftruncate"] {
            assert!(!has(Role::Watchdog, name), "watchdog may {name}");
        }
        for name in [
            "socket",
            "bind",
            "connect",
            "sched_setattr",
            "rename",
            "mkdir",
        ] {
            assert!(!has(Role::Ivshmem, name), "ivshmem may {name}");
        }
        assert!(has(Role::Ivshmem, "memfd_create") && has(Role::Ivshmem, "sendmsg"));
        assert!(has(Role::Loop, "sched_setattr") && has(Role::Watchdog, "sched_setattr"));
        assert!(has(Role::Discover, "getsockopt") && has(Role::Watchdog, "pidfd_send_signal"));
    }

    #[test]
    fn argument_checks_survive_the_merge() {
        let nr = |name: &str| {
            Role::Discover
                .groups()
                .into_iter()
                .flat_map(|g| g.calls)
                .find(|c| c.name == name)
                .unwrap()
                .nr
        };
        let discover = rules(Role::Discover).unwrap();
        // Checked calls keep their rules; unchecked ones have none (any arguments).
        for name in [
            "socket",
            "getsockopt",
            "setsockopt",
            "openat",
            "mmap",
            "tgkill",
        ] {
            assert!(!discover[&nr(name)].is_empty(), "{name} unchecked");
        }
        assert!(discover[&nr("read")].is_empty());
        // The loop opens files to write (state file): openat unchecked there.
        let lp = rules(Role::Loop).unwrap();
        assert!(lp[&nr("openat")].is_empty());
        // The watchdog opens only to read.
        assert!(!rules(Role::Watchdog).unwrap()[&nr("openat")].is_empty());
    }

    #[test]
    fn modes_parse_from_the_configuration() {
        #[derive(Deserialize)]
        struct T {
            seccomp: SeccompMode,
        }
        for (text, mode) in [
            ("enforce", SeccompMode::Enforce),
            ("log", SeccompMode::Log),
            ("off", SeccompMode::Off),
        ] {
            let t: T = toml::from_str(&format!("seccomp = \"{text}\"")).unwrap();
            assert_eq!(t.seccomp, mode);
            assert_eq!(text.parse::<SeccompMode>().unwrap(), mode);
            assert_eq!(mode.to_string(), text);
        }
        assert!(toml::from_str::<T>("seccomp = \"kill\"").is_err());
        assert_eq!(SeccompMode::default(), SeccompMode::Enforce);
    }
}
