//! An owning, shared mapping of a file (the host side of the ivshmem memory
//! backend, usually under `/dev/shm`, read-write; a guest's `/dev/pvsched`,
//! read-only), safe against the file being truncated under it.
//!
//! Another process (QEMU, or anyone who can write the file) can shrink the
//! file while it is mapped; an access to a page past the new end then raises
//! `SIGBUS`, which by default kills the whole daemon. As Wayland compositors
//! do for client shared memory, a process-wide `SIGBUS` handler is installed
//! once, and every live [`SharedFile`] is listed in a fixed-size, lock-free
//! registry (base, length, faulted flag: all atomics). When the faulting
//! address lies in a registered mapping, the handler maps anonymous zero
//! pages over that whole mapping (`MAP_FIXED`), sets its faulted flag and
//! returns: the access restarts and reads zeros, and the owner sees
//! [`SharedFile::faulted`] and drops the mapping. Any other `SIGBUS` goes to
//! the handler that was installed before (Rust's runtime has one) or to the
//! default action, so real bugs still crash.
//!
//! [`ReadOnlyMapping`] is the same for memory the host only reads (a guest's
//! RAM backend, which its QEMU process maps): mapped `PROT_READ`, read with
//! bounds-checked relaxed atomic loads, registered with the same handler.

extern crate std;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

use crate::region::Region;

/// A file mapped `MAP_SHARED`, unmapped on drop, registered with the
/// `SIGBUS` handler while it lives.
#[derive(Debug)]
pub struct SharedFile {
    base: NonNull<u8>,
    len: usize,
    /// Index of this mapping in [`REGISTRY`].
    slot: usize,
    file: File,
}

// SAFETY: (for Send and Sync) the mapping is plain shared memory; all access goes through
// `Region`, which only performs atomic accesses.
unsafe impl Send for SharedFile {}
// SAFETY: see the Send impl above.
unsafe impl Sync for SharedFile {}

impl SharedFile {
    /// Opens (and creates, if `create_len` is given and the file is missing
    /// or shorter) and maps a file. The whole current file length is mapped.
    pub fn open(path: &Path, create_len: Option<u64>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create_len.is_some())
            .truncate(false)
            .open(path)?;
        if let Some(len) = create_len {
            if file.metadata()?.len() < len {
                file.set_len(len)?;
            }
        }
        Self::map_whole(file)
    }

    /// Maps a file the caller opened read-write (and checked: the host daemon
    /// maps the very descriptor it verified, never a path again). The whole
    /// current file length is mapped.
    pub fn from_file(file: File) -> io::Result<Self> {
        Self::map_whole(file)
    }

    /// Maps the first `len` bytes of an open file or device read-only (`PROT_READ`):
    /// a guest's view of the host lines through `/dev/pvsched`, whose length its
    /// metadata does not tell. Only loads may go through [`region`](Self::region): a
    /// store to a read-only mapping is refused by the kernel with `SIGSEGV`.
    pub fn from_file_read_only(file: File, len: usize) -> io::Result<Self> {
        Self::map(file, len, libc::PROT_READ)
    }

    /// Maps the whole current length of an open file read-write.
    fn map_whole(file: File) -> io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large to map"))?;
        Self::map(file, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Maps `len` bytes of an open file with `prot`. Every constructor goes through here.
    fn map(file: File, len: usize, prot: libc::c_int) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "empty shared file",
            ));
        }
        let (base, slot) = map_registered(&file, 0, len, prot)?;
        Ok(SharedFile {
            base,
            len,
            slot,
            file,
        })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true for an open mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The atomic-only view of the mapping.
    pub fn region(&self) -> Region<'_> {
        // SAFETY: mmap returns page-aligned memory valid for `len` bytes
        // until munmap in Drop, which cannot run while the borrow lives; no
        // plain references are created into it. After a fault the handler
        // replaces the pages by anonymous ones at the same addresses, which
        // are as valid.
        unsafe { Region::from_raw_parts(self.base, self.len) }
    }

    /// Whether an access hit a part of the file that no longer exists (the
    /// file was truncated): the mapping now reads zeros and is no longer
    /// shared with anyone. The owner should drop it.
    pub fn faulted(&self) -> bool {
        // Ordering: Acquire pairs with the handler's Release.
        REGISTRY[self.slot].faulted.load(Ordering::Acquire)
    }

    /// Current length of the mapped file (it may have shrunk below [`len`](Self::len)).
    pub fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Whether `path` still names the mapped file (same device and inode).
    pub fn is_file_at(&self, path: &Path) -> io::Result<bool> {
        let mapped = self.file.metadata()?;
        let named = std::fs::metadata(path)?;
        Ok(mapped.dev() == named.dev() && mapped.ino() == named.ino())
    }
}

impl Drop for SharedFile {
    fn drop(&mut self) {
        // Unregistered before the unmap: once the range is unmapped another
        // mapping may take it, and the handler must not treat it as ours.
        unregister(self.slot);
        // SAFETY: base/len are exactly what mmap returned, and no Region
        // borrowing self can outlive this call.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Maps `len` bytes of `file` from `offset` shared with protection `prot`
/// and registers the mapping with the `SIGBUS` handler. Every mapping of
/// this module goes through here.
fn map_registered(
    file: &File,
    offset: u64,
    len: usize,
    prot: libc::c_int,
) -> io::Result<(NonNull<u8>, usize)> {
    install_sigbus_handler()?;
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large to map"))?;
    // SAFETY: a fresh shared mapping of a file the caller holds open; the
    // kernel picks the address, so no existing memory is affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let Some(base) = NonNull::new(ptr.cast::<u8>()) else {
        return Err(io::Error::other("mmap returned null"));
    };
    match register(base.as_ptr() as usize, len) {
        Ok(slot) => Ok((base, slot)),
        Err(e) => {
            // SAFETY: exactly the mapping made above, never handed out.
            unsafe { libc::munmap(ptr, len) };
            Err(e)
        }
    }
}

/// A read-only shared mapping of part of a file that another process writes
/// (a guest's RAM backend: its QEMU process and the guest write it, the host
/// only reads), unmapped on drop and registered with the `SIGBUS` handler
/// while it lives, like a [`SharedFile`].
///
/// No reference into the mapping is ever handed out: every access is a
/// bounds- and alignment-checked relaxed atomic load of a `u32`, the one
/// kind of atomic access that is defined on read-only memory (see "Atomic
/// accesses to read-only memory" in `core::sync::atomic`).
#[derive(Debug)]
pub struct ReadOnlyMapping {
    base: NonNull<u8>,
    len: usize,
    /// Index of this mapping in [`REGISTRY`].
    slot: usize,
    /// Held open for the life of the mapping (its identity stays pinned).
    _file: File,
}

// SAFETY: (for Send and Sync) the mapping is plain shared memory that this
// type only ever reads with atomic loads.
unsafe impl Send for ReadOnlyMapping {}
// SAFETY: see the Send impl above.
unsafe impl Sync for ReadOnlyMapping {}

impl ReadOnlyMapping {
    /// Maps `len` bytes of `file` (opened for reading) from byte `offset`,
    /// `PROT_READ` and `MAP_SHARED`. `offset` must be a multiple of the page
    /// size (of the file's huge pages, for hugetlbfs) and `len` non-zero.
    pub fn map(file: File, offset: u64, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let (base, slot) = map_registered(&file, offset, len, libc::PROT_READ)?;
        Ok(ReadOnlyMapping {
            base,
            len,
            slot,
            _file: file,
        })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true for an open mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address the mapping starts at (to tell mappings apart in logs and tests).
    pub fn addr(&self) -> usize {
        self.base.as_ptr() as usize
    }

    /// Loads the `u32` at byte `offset` (relaxed): `None` when it is not
    /// 4-aligned or not wholly inside the mapping.
    pub fn load_u32(&self, offset: usize) -> Option<u32> {
        let end = offset.checked_add(4)?;
        if end > self.len || offset % 4 != 0 {
            return None;
        }
        // SAFETY: offset + 4 <= len, so the pointer stays inside the mapping.
        let ptr = unsafe { self.base.as_ptr().add(offset) };
        // SAFETY: in bounds and 4-aligned (the mapping is page-aligned), and
        // valid for reads until munmap in Drop, which cannot run while `self`
        // is borrowed (after a fault the handler maps zero pages at the same
        // addresses). The memory is written by other processes only and read
        // here only by relaxed atomic loads of this width, which core
        // defines on read-only memory; no other access is ever made.
        let atomic = unsafe { AtomicU32::from_ptr(ptr.cast()) };
        Some(atomic.load(Ordering::Relaxed))
    }

    /// Whether an access hit a part of the file that no longer exists (the
    /// file was truncated): the mapping now reads zeros. The owner should drop it.
    pub fn faulted(&self) -> bool {
        // Ordering: Acquire pairs with the handler's Release.
        REGISTRY[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for ReadOnlyMapping {
    fn drop(&mut self) {
        // Unregistered before the unmap, as for SharedFile.
        unregister(self.slot);
        // SAFETY: base/len are exactly what mmap returned, and no borrow of
        // self can outlive this call.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Capacity of the registry: live mappings at once in one process.
const SLOTS: usize = 1024;

/// Slot states, in the low two bits of [`Slot::tag`]; the rest is a
/// generation bumped on every transition, so a reader can tell that a slot
/// changed while it read it.
const FREE: u64 = 0;
const BUSY: u64 = 1;
const LIVE: u64 = 2;
const STATE: u64 = 3;
const GENERATION: u64 = 4;

/// One registered mapping. A seqlock on `tag`: the owner writes `base` and
/// `len` only while the slot is `BUSY`; the handler trusts them only when
/// `tag` read `LIVE` before and unchanged after.
struct Slot {
    tag: AtomicU64,
    base: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    tag: AtomicU64::new(FREE),
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];

fn register(base: usize, len: usize) -> io::Result<usize> {
    for (i, slot) in REGISTRY.iter().enumerate() {
        let tag = slot.tag.load(Ordering::Relaxed);
        if tag & STATE != FREE {
            continue;
        }
        let generation = (tag & !STATE) + GENERATION;
        // Ordering: Relaxed CAS claims the slot; the fence orders the BUSY
        // tag before the field stores for a handler reading them.
        if slot
            .tag
            .compare_exchange(tag, generation | BUSY, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        fence(Ordering::Release);
        slot.base.store(base, Ordering::Relaxed);
        slot.len.store(len, Ordering::Relaxed);
        slot.faulted.store(false, Ordering::Relaxed);
        // Ordering: Release publishes the fields with the LIVE tag.
        slot.tag.store(generation | LIVE, Ordering::Release);
        return Ok(i);
    }
    Err(io::Error::other(std::format!(
        "more than {SLOTS} shared mappings at once"
    )))
}

fn unregister(i: usize) {
    let slot = &REGISTRY[i];
    let tag = slot.tag.load(Ordering::Relaxed);
    // Ordering: Release: a handler that sees FREE (or the new generation)
    // does not use the old fields.
    slot.tag
        .store(((tag & !STATE) + GENERATION) | FREE, Ordering::Release);
}

/// The slot whose mapping holds `addr`, read consistently (seqlock).
/// Async-signal-safe: only atomic loads and fences.
fn lookup(addr: usize) -> Option<(&'static Slot, usize, usize)> {
    for slot in &REGISTRY {
        // Ordering: Acquire pairs with the Release store of LIVE in `register`.
        let before = slot.tag.load(Ordering::Acquire);
        if before & STATE != LIVE {
            continue;
        }
        let base = slot.base.load(Ordering::Relaxed);
        let len = slot.len.load(Ordering::Relaxed);
        // Ordering: the field loads happen before the re-check of the tag.
        fence(Ordering::Acquire);
        if slot.tag.load(Ordering::Relaxed) != before {
            continue;
        }
        if addr >= base && addr - base < len {
            return Some((slot, base, len));
        }
    }
    None
}

/// The `SIGBUS` disposition before ours, to hand on faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();
static INSTALL_ERROR: OnceLock<i32> = OnceLock::new();

fn install_sigbus_handler() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain data; all-zero is a valid (empty) value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sa_mask is a valid sigset_t owned by `action`.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: as above, for the old disposition the kernel fills in.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid sigaction values; the handler
        // has the SA_SIGINFO signature.
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &action, &mut previous) };
        if rc != 0 {
            let _ = INSTALL_ERROR.set(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        } else {
            let _ = PREVIOUS.set(previous);
        }
    });
    match INSTALL_ERROR.get() {
        Some(&errno) => Err(io::Error::from_raw_os_error(errno)),
        None => Ok(()),
    }
}

/// The `SIGBUS` handler.
///
/// Async-signal-safety: it allocates nothing, takes no lock and calls only
/// async-signal-safe functions: atomic loads and stores on the static
/// registry, `mmap` (a plain system call on Linux; not in POSIX's list, but
/// glibc's wrapper only issues the syscall and sets `errno`, which is saved
/// and restored around it) and `sigaction`. `OnceLock::get` is one atomic
/// load. It may run on any thread, concurrently with registrations on
/// others, which the seqlock in [`lookup`] covers; the mapping it replaces
/// cannot be unmapped meanwhile, because the faulting thread is inside an
/// access through a borrow of its `SharedFile` or `ReadOnlyMapping`.
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let errno_at = errno_location();
    // SAFETY: the calling thread's errno, valid for the thread's life.
    let errno = unsafe { *errno_at };
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
    let info_ref = unsafe { &*info };
    // SAFETY: for SIGBUS the union member si_addr is the faulting address.
    let addr = unsafe { info_ref.si_addr() } as usize;
    if let Some((slot, base, len)) = lookup(addr) {
        // SAFETY: [base, base + len) is one of our live mappings (registered
        // LIVE and read consistently), so replacing its pages changes no
        // memory anyone else owns; the anonymous pages read as zeros.
        let mapped = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            // Ordering: Release pairs with the Acquire in `faulted`.
            slot.faulted.store(true, Ordering::Release);
            // SAFETY: as above; restores the interrupted code's errno.
            unsafe { *errno_at = errno };
            // The faulting access restarts on the zero pages.
            return;
        }
    }
    // SAFETY: as above.
    unsafe { *errno_at = errno };
    pass_on(signal, info, context);
}

/// The calling thread's `errno`.
fn errno_location() -> *mut libc::c_int {
    // SAFETY: __errno_location has no preconditions (async-signal-safe).
    unsafe { libc::__errno_location() }
}

/// Hands a fault that is not ours to the previous handler, or restores the
/// default action and returns, so that the fault re-raises and kills.
fn pass_on(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    if let Some(previous) = PREVIOUS.get() {
        let handler = previous.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                type Action = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);
                // SAFETY: with SA_SIGINFO the kernel's sa_sigaction is a
                // three-argument handler that was installed for this signal.
                let f: Action = unsafe { std::mem::transmute::<usize, Action>(handler) };
                f(signal, info, context);
            } else {
                type Handler = extern "C" fn(libc::c_int);
                // SAFETY: without SA_SIGINFO it is a one-argument handler.
                let f: Handler = unsafe { std::mem::transmute::<usize, Handler>(handler) };
                f(signal);
            }
            return;
        }
    }
    // SAFETY: all-zero sigaction with SIG_DFL (0) is the default action.
    let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
    default.sa_sigaction = libc::SIG_DFL;
    // SAFETY: a valid sigaction; the old value is not wanted.
    unsafe { libc::sigaction(signal, &default, std::ptr::null_mut()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn temp_file(len: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared");
        File::create(&path).unwrap().set_len(len).unwrap();
        (dir, path)
    }

    #[test]
    fn a_truncated_file_reads_zeros_and_is_reported_instead_of_killing() {
        let (_dir, path) = temp_file(16384);
        let map = SharedFile::open(&path, None).unwrap();
        let other = SharedFile::open(&path, None).unwrap();
        let region = map.region();
        region.store_u64(8192, 0xfeed, Ordering::Relaxed).unwrap();
        assert_eq!(region.load_u64(8192, Ordering::Relaxed).unwrap(), 0xfeed);
        assert!(!map.faulted());
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert_eq!(map.file_len().unwrap(), 4096);
        // Past the new end: SIGBUS, handled; the whole mapping reads zeros.
        assert_eq!(region.load_u64(8192, Ordering::Relaxed).unwrap(), 0);
        assert!(map.faulted());
        assert_eq!(region.load_u64(0, Ordering::Relaxed).unwrap(), 0);
        // Writes go to private zero pages, not to the file.
        region.store_u64(0, 7, Ordering::Relaxed).unwrap();
        assert!(
            !other.faulted(),
            "only the mapping that faulted is replaced"
        );
        assert_eq!(other.region().load_u64(0, Ordering::Relaxed).unwrap(), 0);
        drop(map);
        // The slot is free again and reused clean.
        let again = SharedFile::open(&path, None).unwrap();
        assert!(!again.faulted());
    }

    #[test]
    fn a_read_only_mapping_reads_what_another_mapping_writes_within_bounds() {
        let (_dir, path) = temp_file(3 * 4096);
        let writer = SharedFile::open(&path, None).unwrap();
        writer
            .region()
            .store_u32(4096 + 8, 0x1234_5678, Ordering::Relaxed)
            .unwrap();
        writer
            .region()
            .store_u32(2 * 4096 + 4092, 0xfeed_f00d, Ordering::Relaxed)
            .unwrap();
        // The second and third pages only: byte 0 of the mapping is file byte 4096.
        let file = File::open(&path).unwrap();
        let map = ReadOnlyMapping::map(file, 4096, 2 * 4096).unwrap();
        assert_eq!(map.len(), 2 * 4096);
        assert_eq!(map.load_u32(8), Some(0x1234_5678));
        assert_eq!(map.load_u32(4096 + 4092), Some(0xfeed_f00d));
        // Later writes are seen: the mapping is shared.
        writer
            .region()
            .store_u32(4096 + 8, 7, Ordering::Relaxed)
            .unwrap();
        assert_eq!(map.load_u32(8), Some(7));
        // Misaligned, past the end, straddling the end, overflowing: refused.
        assert_eq!(map.load_u32(2), None);
        assert_eq!(map.load_u32(2 * 4096), None);
        assert_eq!(map.load_u32(2 * 4096 - 2), None);
        assert_eq!(map.load_u32(usize::MAX - 1), None);
        assert!(!map.faulted());
        // A misaligned file offset or an empty length is refused by the kernel or here.
        assert!(ReadOnlyMapping::map(File::open(&path).unwrap(), 100, 4096).is_err());
        assert!(ReadOnlyMapping::map(File::open(&path).unwrap(), 0, 0).is_err());
    }

    #[test]
    fn a_truncated_file_under_a_read_only_mapping_reads_zeros_and_is_reported() {
        let (_dir, path) = temp_file(2 * 4096);
        let writer = SharedFile::open(&path, None).unwrap();
        writer
            .region()
            .store_u32(4096, 99, Ordering::Relaxed)
            .unwrap();
        let map = ReadOnlyMapping::map(File::open(&path).unwrap(), 0, 2 * 4096).unwrap();
        assert_eq!(map.load_u32(4096), Some(99));
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Past the new end: SIGBUS, handled; zeros, and the fault reported.
        assert_eq!(map.load_u32(4096), Some(0));
        assert!(map.faulted());
        drop(map);
        assert!(!ReadOnlyMapping::map(File::open(&path).unwrap(), 0, 4096)
            .unwrap()
            .faulted());
    }

    #[test]
    fn a_replaced_file_is_told_apart() {
        let (_dir, path) = temp_file(4096);
        let map = SharedFile::open(&path, None).unwrap();
        assert!(map.is_file_at(&path).unwrap());
        let replacement = path.with_extension("new");
        File::create(&replacement).unwrap().set_len(4096).unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        assert!(!map.is_file_at(&path).unwrap());
    }

    #[test]
    fn many_mappings_register_and_free_their_slots() {
        let (_dir, path) = temp_file(4096);
        for _ in 0..3 {
            let maps: Vec<SharedFile> = (0..100)
                .map(|_| SharedFile::open(&path, None).unwrap())
                .collect();
            let mut slots: Vec<usize> = maps.iter().map(|m| m.slot).collect();
            slots.sort_unstable();
            slots.dedup();
            assert_eq!(slots.len(), 100);
        }
    }

    const CHILD: &str = "PVSCHED_SIGBUS_CHILD";

    /// In a child process (see the test below): a fault outside every
    /// registered mapping must still kill.
    #[test]
    fn sigbus_child_faults_outside_registered_mappings() {
        let Some(dir) = std::env::var_os(CHILD) else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let registered = dir.join("registered");
        File::create(&registered).unwrap().set_len(4096).unwrap();
        let _map = SharedFile::open(&registered, None).unwrap();
        let path = dir.join("unregistered");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(8192).unwrap();
        // SAFETY: a fresh shared mapping of a file we hold; never unmapped,
        // the process dies on the access below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        file.set_len(0).unwrap();
        let second_page = ptr.cast::<u64>().wrapping_add(512);
        // SAFETY: inside the mapping; the page is past the file's end, so
        // the read raises SIGBUS, which must not be swallowed.
        let v = unsafe { std::ptr::read_volatile(second_page) };
        std::process::exit(if v == 0 { 3 } else { 4 });
    }

    #[test]
    fn a_fault_outside_registered_mappings_still_kills() {
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "mmap::tests::sigbus_child_faults_outside_registered_mappings",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    }
}
