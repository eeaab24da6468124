//! The loop's wait: until a deadline, or until a doorbell fires, whichever
//! comes first.
//!
//! A doorbell is an eventfd that QEMU's `ivshmem-doorbell` device signals
//! when the guest writes the daemon's peer id to its Doorbell register. The
//! waiter keeps a duplicate of each one in an epoll set with a timerfd armed
//! at the deadline (absolute `CLOCK_MONOTONIC`, the daemon's clock), so the
//! loop sleeps as long as nothing happens and wakes within a wakeup's latency
//! when a guest rings. Holding duplicates means a VM that closes its fds
//! never leaves a stale or reused descriptor in the set.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The timerfd's token in the epoll set (doorbell tokens are below it).
const TIMER_TOKEN: u64 = u64::MAX;
/// Events taken per `epoll_wait`; more are taken at the next wait.
const EVENTS: usize = 64;

/// What ended a wait.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wake {
    /// Tokens of the doorbells that fired, each with the rings it counted
    /// (an eventfd adds up writes until it is read).
    pub doorbells: Vec<(u64, u64)>,
    /// The deadline passed.
    pub deadline: bool,
}

impl Wake {
    /// Rings counted over every doorbell that fired.
    pub fn rings(&self) -> u64 {
        self.doorbells.iter().map(|&(_, n)| n).sum()
    }
}

/// Sleeps until a deadline or a doorbell.
#[derive(Debug)]
pub struct LoopWaker {
    epoll: OwnedFd,
    timer: OwnedFd,
    watched: BTreeMap<u64, OwnedFd>,
    /// The deadline the timer is armed for, to skip re-arming it.
    armed: Option<u64>,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by the kernel, is open and owned by
    // no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads the 8-byte counter of an eventfd or timerfd (non-blocking); 0 when
/// there was nothing to read.
fn read_counter(fd: RawFd) -> u64 {
    let mut value = 0u64;
    // SAFETY: reads at most 8 bytes into a live, properly aligned u64.
    let n = unsafe { libc::read(fd, (&raw mut value).cast(), 8) };
    if n == 8 {
        value
    } else {
        0
    }
}

impl LoopWaker {
    /// An empty set with its timer.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system calls without pointers.
        let epoll = owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: as above.
        let timer = owned(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        let waker = LoopWaker {
            epoll,
            timer,
            watched: BTreeMap::new(),
            armed: None,
        };
        waker.add(waker.timer.as_raw_fd(), TIMER_TOKEN)?;
        Ok(waker)
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `event` is a live epoll_event; both fds are open.
        cvt(unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd,
                &raw mut event,
            )
        })?;
        Ok(())
    }

    /// Wakes the loop when `fd` (an eventfd) becomes readable, reporting
    /// `token`. Watching a token again replaces its fd.
    pub fn watch(&mut self, token: u64, fd: BorrowedFd<'_>) -> io::Result<()> {
        if token == TIMER_TOKEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "doorbell token reserved for the timer",
            ));
        }
        self.unwatch(token);
        let dup = fd.try_clone_to_owned()?;
        self.add(dup.as_raw_fd(), token)?;
        self.watched.insert(token, dup);
        Ok(())
    }

    /// Stops watching `token` (closing the duplicate removes it from the set).
    pub fn unwatch(&mut self, token: u64) {
        self.watched.remove(&token);
    }

    /// Doorbells watched.
    pub fn watched(&self) -> usize {
        self.watched.len()
    }

    fn arm(&mut self, deadline_ns: u64) -> io::Result<()> {
        if self.armed == Some(deadline_ns) {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `spec` is a live itimerspec; the old value is not asked for.
        cvt(unsafe {
            libc::timerfd_settime(
                self.timer.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &raw const spec,
                std::ptr::null_mut(),
            )
        })?;
        self.armed = Some(deadline_ns);
        Ok(())
    }

    /// Waits until `deadline_ns` (monotonic) or a doorbell, and drains what
    /// fired. A deadline already past only collects doorbells already rung.
    /// A signal ends the wait early with nothing reported (the caller checks
    /// its stop flag).
    pub fn wait_until(&mut self, deadline_ns: u64, now_ns: u64) -> io::Result<Wake> {
        let timeout = if deadline_ns <= now_ns {
            0
        } else {
            // A deadline of 0 would disarm the timer; any real one is later.
            self.arm(deadline_ns.max(1))?;
            -1
        };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        // SAFETY: `events` holds EVENTS entries, the count passed.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS as libc::c_int,
                timeout,
            )
        };
        let mut wake = Wake {
            deadline: timeout == 0,
            ..Wake::default()
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(wake)
            } else {
                Err(e)
            };
        }
        for event in &events[..n as usize] {
            let token = event.u64;
            if token == TIMER_TOKEN {
                read_counter(self.timer.as_raw_fd());
                self.armed = None;
                wake.deadline = true;
            } else if let Some(fd) = self.watched.get(&token) {
                let rings = read_counter(fd.as_raw_fd());
                if rings > 0 {
                    wake.doorbells.push((token, rings));
                }
            }
        }
        Ok(wake)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::monotonic_ns;
    use std::os::fd::AsFd;

    fn eventfd() -> OwnedFd {
        // SAFETY: plain system call.
        owned(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }).unwrap()
    }

    fn ring(fd: &OwnedFd) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
        assert_eq!(n, 8);
    }

    #[test]
    fn a_doorbell_ends_the_wait_before_its_deadline_and_is_drained() {
        let mut waker = LoopWaker::new().unwrap();
        let bell = eventfd();
        waker.watch(7, bell.as_fd()).unwrap();
        let ringer = {
            let bell = bell.try_clone().unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                ring(&bell);
                ring(&bell);
            })
        };
        // An hour away: only the doorbell can end this wait.
        let now = monotonic_ns();
        let wake = loop {
            let wake = waker
                .wait_until(now + 3_600_000_000_000, monotonic_ns())
                .unwrap();
            if !wake.doorbells.is_empty() {
                break wake;
            }
        };
        ringer.join().unwrap();
        assert!(!wake.deadline);
        assert_eq!(wake.doorbells[0].0, 7);
        assert!(wake.rings() >= 1);
        // Drained: a past deadline now finds nothing rung.
        let t = monotonic_ns();
        let again = waker.wait_until(t, t).unwrap();
        assert!(again.deadline);
        let left = wake.rings() + again.rings();
        assert_eq!(left, 2, "each ring counted once");
    }

    #[test]
    fn the_deadline_ends_a_quiet_wait_no_earlier_than_asked() {
        let mut waker = LoopWaker::new().unwrap();
        let bell = eventfd();
        waker.watch(1, bell.as_fd()).unwrap();
        let deadline = monotonic_ns() + 5_000_000;
        let wake = loop {
            let wake = waker.wait_until(deadline, monotonic_ns()).unwrap();
            if wake.deadline {
                break wake;
            }
        };
        assert!(monotonic_ns() >= deadline);
        assert!(wake.doorbells.is_empty());
    }

    #[test]
    fn an_unwatched_or_closed_doorbell_no_longer_wakes_the_loop() {
        let mut waker = LoopWaker::new().unwrap();
        let bell = eventfd();
        waker.watch(3, bell.as_fd()).unwrap();
        assert_eq!(waker.watched(), 1);
        waker.unwatch(3);
        assert_eq!(waker.watched(), 0);
        ring(&bell);
        let t = monotonic_ns();
        let wake = waker.wait_until(t, t).unwrap();
        assert!(wake.doorbells.is_empty());
        // The duplicate kept the eventfd open after its owner closed it.
        let mut waker = LoopWaker::new().unwrap();
        let bell = eventfd();
        waker.watch(4, bell.as_fd()).unwrap();
        let writer = bell.try_clone().unwrap();
        drop(bell);
        ring(&writer);
        let t = monotonic_ns();
        let wake = waker.wait_until(t, t).unwrap();
        assert_eq!(wake.doorbells, vec![(4, 1)]);
        assert!(waker.watch(TIMER_TOKEN, writer.as_fd()).is_err());
    }
}
