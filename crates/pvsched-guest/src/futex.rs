//! The two futex operations the parking lock needs, and the calling thread's CPU.

use std::sync::atomic::AtomicU32;

/// Sleeps while `word` holds `expected` (returns at once otherwise, or on a wake-up,
/// a signal or a spurious wake: callers re-check the word).
pub fn wait(word: &AtomicU32, expected: u32) {
    // SAFETY: FUTEX_WAIT_PRIVATE reads the 4-byte atomic `word`, which lives as long as
    // the borrow; no timeout pointer is passed.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

/// Wakes one thread sleeping on `word`.
pub fn wake_one(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE_PRIVATE only uses the address of `word` as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
    }
}

/// The CPU the calling thread runs on (it may move right after).
pub fn current_cpu() -> u32 {
    // SAFETY: sched_getcpu has no arguments and no memory effects.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).unwrap_or(0)
}
