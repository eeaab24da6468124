//! An owning, shared, read-write mapping of a file (the host side of the
//! ivshmem memory backend, usually under `/dev/shm`).

extern crate std;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use crate::region::Region;

/// A file mapped `MAP_SHARED`, unmapped on drop.
#[derive(Debug)]
pub struct SharedFile {
    base: NonNull<u8>,
    len: usize,
    _file: File,
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
        Self::from_file(file)
    }

    /// Maps a file the caller opened read-write (and checked: the host daemon
    /// maps the very descriptor it verified, never a path again). The whole
    /// current file length is mapped.
    pub fn from_file(file: File) -> io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large to map"))?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "empty shared file",
            ));
        }
        // SAFETY: a fresh shared mapping of a file we hold open; the kernel
        // picks the address, so no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedFile {
            base,
            len,
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

    /// The atomic-only view of the mapping.
    pub fn region(&self) -> Region<'_> {
        // SAFETY: mmap returns page-aligned memory valid for `len` bytes
        // until munmap in Drop, which cannot run while the borrow lives; no
        // plain references are created into it.
        unsafe { Region::from_raw_parts(self.base, self.len) }
    }
}

impl Drop for SharedFile {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly what mmap returned, and no Region
        // borrowing self can outlive this call.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}
