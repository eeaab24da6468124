//! Introspection of guest RAM: the daemon maps a VM's shared RAM backend
//! read-only and reads each vCPU's preempt count where the guest module says
//! it lives (the CPU-info table of ABI 1.2), with no cost to the guest.
//!
//! 1. **Backends.** The QEMU command line names the backends of guest RAM
//!    ([`crate::discovery::QemuArgs::guest_ram_backends`]); only a
//!    `memory-backend-memfd` or `memory-backend-file` with `share=on` can be
//!    read by another process.
//! 2. **Layout** (refresher thread, over QMP). `info mtree -f` gives the flat
//!    view of the address space `memory`: the guest-physical ranges of each
//!    backend and their offset in it ([`parse_flat_view`]); `gpa2hva` of each
//!    range gives QEMU's host address of it ([`parse_gpa2hva`]).
//!    [`RamLayout::build`] validates the lot (sorted, no overlap, inside the
//!    backend, one base address per backend) into a sorted GPA → offset table.
//! 3. **Mapping** (loop thread, at attach). [`GuestRam::map`] finds each
//!    backend's base address in `/proc/<pid>/maps`, opens that very mapping
//!    through `/proc/<pid>/map_files/` (the file QEMU maps, never a path it
//!    names), checks it as discovery checks a shared file (a regular file
//!    owned by QEMU's effective user, mapped shared and writable by QEMU
//!    itself, same device and inode, large enough, on tmpfs or hugetlbfs)
//!    and maps it read-only
//!    ([`pvsched_abi::mmap::ReadOnlyMapping`], which survives truncation).
//! 4. **Sampling.** When the guest agreed on `PVSCHED_FEAT_PREEMPT_COUNT_GPA`,
//!    each CPU-info entry is copied, validated ([`decode_cpu_info`]) and
//!    translated once (the 4 bytes must lie in one RAM range); [`GuestRam`]
//!    then implements [`GuestMemory`] with one relaxed atomic load per read,
//!    masked by [`preempt_disabled_bits`].
//!
//! Everything QEMU says (command line, flat view, host addresses) and
//! everything the guest writes (the table) is input: a lie can only make the
//! daemon read another word of that VM's own RAM, never memory outside the
//! mappings it checked.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};

use pvsched_abi::mmap::ReadOnlyMapping;
use pvsched_abi::raw::PvschedCpuInfo;
use pvsched_abi::{decode_cpu_info, preempt_disabled_bits, CpuInfoTable, Region};
use pvsched_policy::controller::GuestMemory;
use serde::{Deserialize, Serialize};

use crate::discovery::{BackendKind, MemoryBackend};
use crate::procfs::HostFs;
use crate::trust::process_identity;

/// Most RAM ranges a layout may have (a booted q35 guest has about ten).
pub const MAX_RAM_RANGES: usize = 64;
/// Most backends of guest RAM a layout may map (one per NUMA node).
pub const MAX_RAM_BACKENDS: usize = 16;
/// Page size every mapping offset and host address is checked against.
const PAGE: u64 = 4096;

/// One RAM range of a backend in the flat view of the address space `memory`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlatRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// The memory region's name: the backend's id.
    pub name: String,
    /// Offset of `gpa` in the backend (`@offset` of the line, 0 without one).
    pub offset: u64,
}

/// A layout QEMU reported that cannot be used, with what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No flat view lists the address space `memory`.
    #[error("info mtree -f: no flat view of the address space \"memory\"")]
    NoMemoryView,
    /// Two flat views list the address space `memory`.
    #[error("info mtree -f: two flat views of the address space \"memory\"")]
    TwoMemoryViews,
    /// A line of the `memory` flat view that is not a range line.
    #[error("info mtree -f line {line}: {what}")]
    Malformed {
        /// Line number (1-based).
        line: usize,
        /// What was wrong.
        what: &'static str,
    },
    /// None of the backends has a RAM range in the flat view.
    #[error("no RAM range of backend {names} in the flat view of \"memory\"")]
    NoRange {
        /// The backends looked for.
        names: String,
    },
    /// More ranges than [`MAX_RAM_RANGES`], or backends than [`MAX_RAM_BACKENDS`].
    #[error("more than {max} {what}")]
    TooMany {
        /// Ranges or backends.
        what: &'static str,
        /// The bound.
        max: usize,
    },
    /// Two RAM ranges overlap.
    #[error("RAM ranges at {a:#x} and {b:#x} overlap")]
    Overlap {
        /// First range.
        a: u64,
        /// Second range.
        b: u64,
    },
    /// A range runs past the end of its backend.
    #[error("RAM range at {gpa:#x} ({len:#x} bytes at offset {offset:#x}) runs past the {size:#x} bytes of backend {id}")]
    OutsideBackend {
        /// Range start.
        gpa: u64,
        /// Range length.
        len: u64,
        /// Offset in the backend.
        offset: u64,
        /// Backend.
        id: String,
        /// Backend size.
        size: u64,
    },
    /// A backend's size is not on the command line.
    #[error("backend {id} has no size on the command line")]
    NoSize {
        /// Backend.
        id: String,
    },
    /// A `gpa2hva` reply that does not say where the range is.
    #[error("gpa2hva {gpa:#x}: {reply}")]
    Gpa2hva {
        /// The address asked.
        gpa: u64,
        /// The reply's first line (shortened).
        reply: String,
    },
    /// The host addresses of a backend's ranges put its start at two places,
    /// or at an address that is not page-aligned.
    #[error("backend {id}: its ranges put offset 0 at host addresses {a:#x} and {b:#x}")]
    Inconsistent {
        /// Backend.
        id: String,
        /// One base address.
        a: u64,
        /// The other (equal to `a` when it is misaligned).
        b: u64,
    },
}

/// Shortens a peer's text for an error message: its first line, at most 120
/// characters, control characters replaced.
fn shown(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    line.chars()
        .take(120)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn hex(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 16 {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// What follows a backend's name on a range line: ` @<offset>` first if
/// present, then accelerator names (` KVM`) and owner details (` owner:{..}`,
/// ` parent:{..}`). `None` when it is anything else (the line names another
/// region whose name merely starts with the backend's).
fn range_suffix(suffix: &str) -> Option<u64> {
    let mut offset = 0;
    let mut words = suffix.split(' ').peekable();
    if words.next() != Some("") {
        return None; // the name goes on
    }
    if let Some(at) = words.peek().and_then(|w| w.strip_prefix('@')) {
        offset = hex(at)?;
        words.next();
    }
    for w in words {
        if w.starts_with("owner:") || w.starts_with("parent:") {
            break;
        }
        if w.is_empty()
            || !w
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return None;
        }
    }
    Some(offset)
}

/// One range line: `  <start>-<end> (prio <n>, <type>): <name>[ @<offset>]...`.
/// Returns (start, end inclusive, type, rest after the colon).
fn range_line(line: &str) -> Option<(u64, u64, &str, &str)> {
    let (start, rest) = line.trim_start().split_once('-')?;
    let (end, rest) = rest.split_once(' ')?;
    let rest = rest.strip_prefix("(prio ")?;
    let (prio, rest) = rest.split_once(", ")?;
    prio.parse::<i64>().ok()?;
    let (ty, rest) = rest.split_once("): ")?;
    Some((hex(start)?, hex(end)?, ty, rest))
}

/// The RAM ranges of the regions named `names` (backend ids) in the flat
/// view of the address space `memory` that HMP `info mtree -f` prints
/// (accepting the ` KVM` marker and `-o` owner details). Ranges of type
/// `ram` or `rom` (RAM the guest cannot write, such as shadowed BIOS) count;
/// any other line of that view is an error, as is a view that is missing,
/// duplicated or holds more than [`MAX_RAM_RANGES`] of them.
pub fn parse_flat_view(text: &str, names: &[&str]) -> Result<Vec<FlatRange>, LayoutError> {
    #[derive(PartialEq)]
    enum State {
        Outside,
        Header { memory: bool },
        Ranges { memory: bool },
    }
    let mut state = State::Outside;
    let mut seen_memory = false;
    let mut out = Vec::new();
    for (n, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let malformed = |what| LayoutError::Malformed { line: n + 1, what };
        if line.starts_with("FlatView #") {
            state = State::Header { memory: false };
            continue;
        }
        if line.trim().is_empty() {
            state = State::Outside;
            continue;
        }
        match state {
            State::Outside => {}
            State::Header { memory } => {
                if let Some(rest) = line.strip_prefix(" AS \"") {
                    let (name, _) = rest
                        .split_once('"')
                        .ok_or(malformed("address space name not quoted"))?;
                    if name == "memory" {
                        if seen_memory {
                            return Err(LayoutError::TwoMemoryViews);
                        }
                        seen_memory = true;
                        state = State::Header { memory: true };
                    }
                } else if line.starts_with(" Root memory region:") {
                    state = State::Ranges { memory };
                } else if memory {
                    return Err(malformed("neither an address space nor the root region"));
                }
            }
            State::Ranges { memory: false } => {}
            State::Ranges { memory: true } => {
                if line.trim() == "No rendered FlatView" {
                    continue;
                }
                let (start, end, ty, rest) =
                    range_line(line).ok_or(malformed("not a range line"))?;
                if end < start {
                    return Err(malformed("range ends before it starts"));
                }
                let ram = matches!(ty, "ram" | "rom" | "nv-ram" | "nv-rom");
                let hit = names.iter().find_map(|name| {
                    let suffix = rest.strip_prefix(name)?;
                    Some((*name, range_suffix(suffix)?))
                });
                if let (true, Some((name, offset))) = (ram, hit) {
                    // Inclusive end: a range up to 2^64 - 1 has no end address.
                    let len = (end - start)
                        .checked_add(1)
                        .filter(|len| start.checked_add(*len).is_some())
                        .ok_or(malformed("RAM range reaches the end of the address space"))?;
                    if out.len() == MAX_RAM_RANGES {
                        return Err(LayoutError::TooMany {
                            what: "RAM ranges",
                            max: MAX_RAM_RANGES,
                        });
                    }
                    out.push(FlatRange {
                        gpa: start,
                        len,
                        name: name.to_owned(),
                        offset,
                    });
                }
            }
        }
    }
    if !seen_memory {
        return Err(LayoutError::NoMemoryView);
    }
    if out.is_empty() {
        return Err(LayoutError::NoRange {
            names: names.join(", "),
        });
    }
    Ok(out)
}

/// The reply of HMP `gpa2hva <gpa>`: `Host virtual address for <gpa> (<region>) is <hva>`.
/// Returns the region's name and the host address; anything else (QEMU's
/// "No memory is mapped at address ...") is an error quoting the reply.
pub fn parse_gpa2hva(text: &str, gpa: u64) -> Result<(String, u64), LayoutError> {
    let err = || LayoutError::Gpa2hva {
        gpa,
        reply: shown(text),
    };
    let line = text.lines().next().ok_or_else(err)?.trim_end();
    let rest = line
        .strip_prefix("Host virtual address for 0x")
        .ok_or_else(err)?;
    let (asked, rest) = rest.split_once(" (").ok_or_else(err)?;
    if hex(asked) != Some(gpa) {
        return Err(err());
    }
    let (name, hva) = rest.rsplit_once(") is 0x").ok_or_else(err)?;
    Ok((name.to_owned(), hex(hva).ok_or_else(err)?))
}

/// A backend of guest RAM in a layout: where QEMU maps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutBackend {
    /// The backend's id.
    pub id: String,
    /// What backs it.
    pub kind: BackendKind,
    /// Its size in bytes (from the command line).
    pub size: u64,
    /// QEMU's host address of its offset 0 (page-aligned).
    pub hva: u64,
}

/// A RAM range: `len` guest-physical bytes from `gpa` are bytes `offset..`
/// of backend `backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index into [`RamLayout::backends`].
    pub backend: u32,
    /// Offset of `gpa` in the backend.
    pub offset: u64,
}

/// The validated guest-physical layout of a VM's shared RAM: ranges sorted
/// by address and disjoint, each inside its backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamLayout {
    /// Backends with at least one range.
    pub backends: Vec<LayoutBackend>,
    /// Ranges, sorted by `gpa`.
    pub ranges: Vec<RamRange>,
}

impl RamLayout {
    /// Validates what QEMU reported: `flat` (the backends' RAM ranges in the
    /// flat view) and `hvas` (`gpa2hva` of each range's start, in the same
    /// order) against the command line's `backends` (their sizes).
    pub fn build(
        backends: &[MemoryBackend],
        flat: &[FlatRange],
        hvas: &[u64],
    ) -> Result<RamLayout, LayoutError> {
        if flat.len() > MAX_RAM_RANGES {
            return Err(LayoutError::TooMany {
                what: "RAM ranges",
                max: MAX_RAM_RANGES,
            });
        }
        let mut layout = RamLayout {
            backends: Vec::new(),
            ranges: Vec::new(),
        };
        for (i, r) in flat.iter().enumerate() {
            let b =
                backends
                    .iter()
                    .find(|b| b.id == r.name)
                    .ok_or_else(|| LayoutError::NoRange {
                        names: r.name.clone(),
                    })?;
            let size = b
                .size
                .ok_or_else(|| LayoutError::NoSize { id: b.id.clone() })?;
            if r.len == 0 || r.offset.checked_add(r.len).is_none_or(|end| end > size) {
                return Err(LayoutError::OutsideBackend {
                    gpa: r.gpa,
                    len: r.len,
                    offset: r.offset,
                    id: b.id.clone(),
                    size,
                });
            }
            let hva = *hvas.get(i).ok_or(LayoutError::Gpa2hva {
                gpa: r.gpa,
                reply: "not asked".into(),
            })?;
            let base = hva.checked_sub(r.offset).unwrap_or(u64::MAX);
            let index = match layout.backends.iter().position(|l| l.id == b.id) {
                Some(index) => {
                    let known = layout.backends[index].hva;
                    if known != base {
                        return Err(LayoutError::Inconsistent {
                            id: b.id.clone(),
                            a: known,
                            b: base,
                        });
                    }
                    index
                }
                None => {
                    if base % PAGE != 0 || base.checked_add(size).is_none() {
                        return Err(LayoutError::Inconsistent {
                            id: b.id.clone(),
                            a: base,
                            b: base,
                        });
                    }
                    if layout.backends.len() == MAX_RAM_BACKENDS {
                        return Err(LayoutError::TooMany {
                            what: "RAM backends",
                            max: MAX_RAM_BACKENDS,
                        });
                    }
                    layout.backends.push(LayoutBackend {
                        id: b.id.clone(),
                        kind: b.kind.clone(),
                        size,
                        hva: base,
                    });
                    layout.backends.len() - 1
                }
            };
            layout.ranges.push(RamRange {
                gpa: r.gpa,
                len: r.len,
                backend: index as u32,
                offset: r.offset,
            });
        }
        layout.ranges.sort_by_key(|r| r.gpa);
        for w in layout.ranges.windows(2) {
            if w[0]
                .gpa
                .checked_add(w[0].len)
                .is_none_or(|end| end > w[1].gpa)
            {
                return Err(LayoutError::Overlap {
                    a: w[0].gpa,
                    b: w[1].gpa,
                });
            }
        }
        if layout.ranges.is_empty() {
            return Err(LayoutError::NoRange {
                names: backends
                    .iter()
                    .map(|b| b.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(layout)
    }

    /// Where the `len` bytes at `gpa` are: (backend index, offset in it),
    /// when they lie wholly inside one RAM range.
    pub fn translate(&self, gpa: u64, len: u64) -> Option<(usize, u64)> {
        let i = self
            .ranges
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        let r = &self.ranges[i];
        if len == 0 || gpa.checked_add(len)? > r.gpa.checked_add(r.len)? {
            return None;
        }
        Some((r.backend as usize, r.offset.checked_add(gpa - r.gpa)?))
    }

    /// Bytes of guest RAM the ranges cover.
    pub fn covered_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// What the refresher learned about a VM's RAM for introspection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RamQuery {
    /// Introspection is off (`[daemon] introspection = false`) or was not asked.
    #[default]
    Off,
    /// The guest's RAM is not on a backend another process can read; why.
    NoSharedRam(String),
    /// The layout of the shared RAM.
    Layout(RamLayout),
    /// The RAM is shared, but its layout could not be learned; why.
    Failed(String),
}

impl RamQuery {
    /// Whether the guest's RAM is on a shared backend (mapped or not yet).
    pub fn shared(&self) -> bool {
        matches!(self, RamQuery::Layout(_) | RamQuery::Failed(_))
    }

    /// Why the guest's RAM cannot be read, when a command line tells it
    /// before any query: `None` when `backends` (the guest's RAM backends)
    /// are all shared files or memfds with a size.
    pub fn unshared(backends: &[&MemoryBackend]) -> Option<String> {
        if backends.is_empty() {
            return Some(
                "no -machine memory-backend or -numa memdev: QEMU's own anonymous RAM".into(),
            );
        }
        let why: Vec<String> = backends
            .iter()
            .filter_map(|b| match (&b.kind, b.share, b.size) {
                (BackendKind::Ram, _, _) => Some(format!("{} is memory-backend-ram", b.id)),
                (_, false, _) => Some(format!("{} has share=off", b.id)),
                (_, _, None) => Some(format!("{} has no size", b.id)),
                _ => None,
            })
            .collect();
        (why.len() == backends.len()).then(|| why.join(", "))
    }
}

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `w`.
    pub writable: bool,
    /// `s`: shared (not copy-on-write).
    pub shared: bool,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// Device (major, minor).
    pub dev: (u32, u32),
    /// Inode (0: anonymous).
    pub inode: u64,
    /// The path the kernel shows (`/memfd:name (deleted)` for a memfd).
    pub path: String,
}

/// Parses one `maps` line: `start-end perms offset major:minor inode [path]`.
pub fn parse_vma(line: &str) -> Option<Vma> {
    let mut f = line.splitn(6, ' ');
    let (start, end) = f.next()?.split_once('-')?;
    let perms = f.next()?.as_bytes();
    let offset = hex(f.next()?)?;
    let (major, minor) = f.next()?.split_once(':')?;
    let inode = f.next()?.parse().ok()?;
    let path = f.next().unwrap_or("").trim_start().to_owned();
    if perms.len() != 4 {
        return None;
    }
    let (start, end) = (hex(start)?, hex(end)?);
    if end <= start {
        return None;
    }
    Some(Vma {
        start,
        end,
        writable: perms[1] == b'w',
        shared: perms[3] == b's',
        offset,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode,
        path,
    })
}

/// Why a VM's shared RAM could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The QEMU process is gone or was replaced.
    #[error("QEMU process {pid} is gone or was replaced")]
    ProcessChanged {
        /// Process id.
        pid: i32,
    },
    /// Reading or opening failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backend is not mapped where QEMU said, or not as it must be.
    #[error("backend {id}: {why}")]
    Refused {
        /// Backend.
        id: String,
        /// What was found.
        why: String,
    },
}

/// The host-address span `[hva, hva + size)` of a backend as one run of
/// mappings of one file at contiguous offsets; the first mapping of the run.
fn covering(vmas: &[Vma], hva: u64, size: u64) -> Result<&Vma, String> {
    let i = vmas
        .iter()
        .position(|v| v.start <= hva && hva < v.end)
        .ok_or_else(|| format!("QEMU maps nothing at {hva:#x}"))?;
    let first = &vmas[i];
    let end = hva
        .checked_add(size)
        .ok_or_else(|| "size overflows".to_owned())?;
    let mut cur = first;
    for next in &vmas[i + 1..] {
        if cur.end >= end {
            break;
        }
        let contiguous = next.start == cur.end
            && (next.dev, next.inode) == (first.dev, first.inode)
            && next.offset == cur.offset + (cur.end - cur.start);
        if !contiguous {
            break;
        }
        cur = next;
    }
    if cur.end < end {
        return Err(format!(
            "QEMU maps only {:#x} of its {size:#x} bytes at {hva:#x} from one file",
            cur.end - hva
        ));
    }
    for v in vmas[i..].iter().take_while(|v| v.start < end) {
        if !(v.shared && v.writable) {
            return Err(format!(
                "QEMU maps {:#x}-{:#x} {}",
                v.start,
                v.end,
                if v.shared {
                    "read-only"
                } else {
                    "privately (share=off?)"
                }
            ));
        }
    }
    if first.inode == 0 {
        return Err(format!("{hva:#x} is anonymous memory, not a file"));
    }
    Ok(first)
}

/// Opens the file behind `vma` of process `pid` through its `map_files`
/// link, first as `O_PATH` (opening a device or FIFO a hostile process
/// mapped must never happen), checks it, then reopens it read-only.
fn open_mapped(fs: &HostFs, pid: i32, euid: u32, vma: &Vma, id: &str) -> Result<File, MapError> {
    let refused = |why: String| MapError::Refused {
        id: id.to_owned(),
        why,
    };
    let link = fs
        .proc_root
        .join(pid.to_string())
        .join("map_files")
        .join(format!("{:x}-{:x}", vma.start, vma.end));
    let io_err = |what: String| move |source| MapError::Io { what, source };
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(&link)
        .map_err(io_err(format!("opening {}", link.display())))?;
    let meta = handle
        .metadata()
        .map_err(io_err(format!("inspecting {}", link.display())))?;
    let dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
    if !meta.file_type().is_file() {
        return Err(refused(format!("{} is not a regular file", vma.path)));
    }
    // Memory only: a page fault on it never waits for a disk, the network
    // or a FUSE server its owner runs (the loop thread reads it).
    let fs_type = rustix::fs::fstatfs(&handle)
        .map_err(|e| MapError::Io {
            what: format!("inspecting the filesystem of {}", vma.path),
            source: e.into(),
        })?
        .f_type as u64;
    if fs_type != libc::TMPFS_MAGIC as u64 && fs_type != libc::HUGETLBFS_MAGIC as u64 {
        return Err(refused(format!(
            "{} is on a filesystem of type {fs_type:#x}, not tmpfs or hugetlbfs: a read could wait for I/O",
            vma.path
        )));
    }
    if (dev, meta.ino()) != (vma.dev, vma.inode) {
        return Err(refused(format!(
            "{} changed between /proc/{pid}/maps and map_files",
            vma.path
        )));
    }
    if meta.uid() != euid {
        return Err(refused(format!(
            "{} is owned by uid {}, QEMU process {pid} runs as uid {euid}",
            vma.path,
            meta.uid()
        )));
    }
    // Our own descriptor's magic link: the real /proc, whatever root `fs` has.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(io_err(format!("reopening {} read-only", vma.path)))?;
    let again = file
        .metadata()
        .map_err(io_err(format!("inspecting {}", vma.path)))?;
    if (again.dev(), again.ino()) != (meta.dev(), meta.ino()) {
        return Err(refused(format!("{} reopened as another inode", vma.path)));
    }
    Ok(file)
}

/// A slot's entry of the CPU-info table, validated and translated.
#[derive(Debug, Default)]
struct Entry {
    /// The guest-physical address the guest published.
    gpa: Option<u64>,
    /// Where it is: (mapping, offset).
    at: Option<(usize, usize)>,
    /// Why the entry is not used.
    refused: Option<String>,
    /// The last value read: `1 << 32 | value`, 0 for none.
    last: AtomicU64,
}

/// A slot's view of introspection, for the status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotView {
    /// The guest-physical address of the preempt count the guest published.
    pub gpa: Option<u64>,
    /// The last preempt count read (ignored bits masked).
    pub last: Option<u32>,
    /// Why the entry is not used.
    pub refused: Option<String>,
}

/// A VM's guest RAM mapped read-only, and the CPU-info table it reads from.
#[derive(Debug)]
pub struct GuestRam {
    layout: RamLayout,
    /// One mapping per layout backend.
    maps: Vec<ReadOnlyMapping>,
    entries: Vec<Entry>,
    /// Guest generation of the table last read (`None`: not read).
    generation: Option<u32>,
    reads: AtomicU64,
}

impl GuestRam {
    /// Maps every backend of `layout` from QEMU process `pid` (start time
    /// `starttime`), checked as the module documentation says, for a region
    /// of `nr_slots` slots.
    pub fn map(
        fs: &HostFs,
        pid: i32,
        starttime: u64,
        layout: RamLayout,
        nr_slots: usize,
    ) -> Result<GuestRam, MapError> {
        let identity = || {
            process_identity(fs, pid)
                .ok()
                .filter(|id| id.starttime == starttime)
                .ok_or(MapError::ProcessChanged { pid })
        };
        let euid = identity()?.uids.effective;
        let maps_path = fs.proc_root.join(pid.to_string()).join("maps");
        let text = std::fs::read_to_string(&maps_path).map_err(|source| MapError::Io {
            what: format!("reading {}", maps_path.display()),
            source,
        })?;
        let vmas: Vec<Vma> = text.lines().filter_map(parse_vma).collect();
        let mut maps = Vec::with_capacity(layout.backends.len());
        for b in &layout.backends {
            let refused = |why: String| MapError::Refused {
                id: b.id.clone(),
                why,
            };
            let vma = covering(&vmas, b.hva, b.size).map_err(refused)?;
            let memfd = vma.path.starts_with("/memfd:");
            match (&b.kind, memfd) {
                (BackendKind::Memfd, false) => {
                    return Err(refused(format!(
                        "a memfd backend, but QEMU maps {} there",
                        vma.path
                    )))
                }
                (BackendKind::File { .. }, true) | (BackendKind::Ram, _) => {
                    return Err(refused(format!("QEMU maps {} there", vma.path)))
                }
                _ => {}
            }
            let offset = vma.offset + (b.hva - vma.start);
            if offset % PAGE != 0 {
                return Err(refused(format!("file offset {offset:#x} not page-aligned")));
            }
            let file = open_mapped(fs, pid, euid, vma, &b.id)?;
            let file_len = file
                .metadata()
                .map_err(|source| MapError::Io {
                    what: format!("inspecting {}", vma.path),
                    source,
                })?
                .len();
            if offset.checked_add(b.size).is_none_or(|end| end > file_len) {
                return Err(refused(format!(
                    "{} has {file_len:#x} bytes, {:#x} needed",
                    vma.path,
                    offset.saturating_add(b.size)
                )));
            }
            let len = usize::try_from(b.size).map_err(|_| refused("too large to map".into()))?;
            let map = ReadOnlyMapping::map(file, offset, len).map_err(|source| MapError::Io {
                what: format!("mapping {} read-only", vma.path),
                source,
            })?;
            maps.push(map);
        }
        identity()?;
        Ok(GuestRam {
            layout,
            maps,
            entries: (0..nr_slots).map(|_| Entry::default()).collect(),
            generation: None,
            reads: AtomicU64::new(0),
        })
    }

    /// The layout mapped.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// Takes a new layout of the same backends at the same addresses (the
    /// guest's firmware reprogrammed what shadows low memory, say): the
    /// mappings stay and the table is translated again at its next read.
    /// Returns `false`, changing nothing, when the backends differ.
    pub fn relayout(&mut self, layout: RamLayout) -> bool {
        if layout.backends != self.layout.backends {
            return false;
        }
        self.layout = layout;
        self.generation = None;
        true
    }

    /// Whether an access hit a truncated part of a backend file: the
    /// mappings read zeros and must be dropped.
    pub fn faulted(&self) -> bool {
        self.maps.iter().any(ReadOnlyMapping::faulted)
    }

    /// Guest generation of the table last read.
    pub fn table_generation(&self) -> Option<u32> {
        self.generation
    }

    /// Copies, validates and translates every entry of the CPU-info `table`
    /// of `region` (the host's own copy of where it is, never the shared
    /// header's), written by the guest instance `generation`.
    pub fn read_table(&mut self, region: &Region<'_>, table: CpuInfoTable, generation: u32) {
        for (slot, e) in self.entries.iter_mut().enumerate() {
            let raw = table.entry_offset(slot as u32).and_then(|off| {
                Some(PvschedCpuInfo {
                    preempt_count_gpa: region.load_u64(off, Ordering::Relaxed).ok()?,
                    cpu_id: region.load_u32(off + 8, Ordering::Relaxed).ok()?,
                    reserved: region.load_u32(off + 12, Ordering::Relaxed).ok()?,
                })
            });
            let (gpa, at, refused) = match raw.map(|raw| decode_cpu_info(&raw, slot as u32)) {
                None | Some(Ok(None)) => (None, None, None),
                Some(Err(e)) => (None, None, Some(e.to_string())),
                Some(Ok(Some(gpa))) => match self.layout.translate(gpa, 4) {
                    Some((map, offset)) => match usize::try_from(offset) {
                        Ok(offset) => (Some(gpa), Some((map, offset)), None),
                        Err(_) => (Some(gpa), None, Some("offset too large".into())),
                    },
                    None => (
                        Some(gpa),
                        None,
                        Some(format!(
                            "preempt_count_gpa {gpa:#x} is not inside one RAM range"
                        )),
                    ),
                },
            };
            if e.at != at {
                e.last.store(0, Ordering::Relaxed);
            }
            (e.gpa, e.at, e.refused) = (gpa, at, refused);
        }
        self.generation = Some(generation);
    }

    /// Forgets the table (the guest has not agreed on it, or detached).
    pub fn clear_table(&mut self) {
        for e in &mut self.entries {
            *e = Entry::default();
        }
        self.generation = None;
    }

    /// Entries the guest published that are in use.
    pub fn valid_entries(&self) -> usize {
        self.entries.iter().filter(|e| e.at.is_some()).count()
    }

    /// Preempt counts read so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The raw `u32` at guest-physical `gpa` (4-aligned, in one RAM range),
    /// `None` when it is not in the mapped RAM or the mapping faulted.
    pub fn read_u32(&self, gpa: u64) -> Option<u32> {
        if gpa % 4 != 0 {
            return None;
        }
        let (map, offset) = self.layout.translate(gpa, 4)?;
        self.load(map, usize::try_from(offset).ok()?)
    }

    fn load(&self, map: usize, offset: usize) -> Option<u32> {
        let m = self.maps.get(map)?;
        let v = m.load_u32(offset)?;
        (!m.faulted()).then_some(v)
    }

    /// Reads every slot's preempt count once (the status's sample).
    pub fn sample_all(&self) {
        for slot in 0..self.entries.len() {
            let _ = self.preempt_count(slot as u32);
        }
    }

    /// What slot `slot` shows in the status.
    pub fn slot_view(&self, slot: usize) -> SlotView {
        let Some(e) = self.entries.get(slot) else {
            return SlotView::default();
        };
        let last = e.last.load(Ordering::Relaxed);
        SlotView {
            gpa: e.gpa,
            last: (last >> 32 == 1).then_some(last as u32),
            refused: e.refused.clone(),
        }
    }
}

impl GuestMemory for GuestRam {
    fn preempt_count(&self, slot: u32) -> Option<u32> {
        let e = self.entries.get(slot as usize)?;
        let (map, offset) = e.at?;
        let value = preempt_disabled_bits(self.load(map, offset)?);
        e.last.store(1 << 32 | u64::from(value), Ordering::Relaxed);
        self.reads.fetch_add(1, Ordering::Relaxed);
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of an `info mtree -f` reply recorded from QEMU 7.2 (see
    /// tests/fixtures/qemu-7.2/capture.py).
    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/qemu-7.2/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let line = std::fs::read(&path).unwrap();
        let v = crate::qmp::parse_message(&line, "fixture")
            .unwrap()
            .unwrap();
        v["return"].as_str().unwrap().to_owned()
    }

    fn memfd(id: &str, size: u64) -> MemoryBackend {
        MemoryBackend {
            id: id.into(),
            kind: BackendKind::Memfd,
            size: Some(size),
            share: true,
        }
    }

    const G: u64 = 1 << 30;

    fn ranges(v: &[FlatRange]) -> Vec<(u64, u64, &str, u64)> {
        v.iter()
            .map(|r| (r.gpa, r.len, r.name.as_str(), r.offset))
            .collect()
    }

    #[test]
    fn q35_with_3g_splits_ram_at_2g_and_resumes_at_4g() {
        let text = fixture("q35-memfd-3g.info-mtree-f");
        assert!(text.contains("\r\n"), "QEMU ends HMP lines with CRLF");
        let flat = parse_flat_view(&text, &["ram"]).unwrap();
        assert_eq!(
            ranges(&flat),
            vec![
                (0, 0xc0000, "ram", 0),
                (0x100000, 0x7ff00000, "ram", 0x100000),
                (0x1_0000_0000, G, "ram", 0x8000_0000),
            ]
        );
        // The same text with LF only parses the same.
        assert_eq!(
            parse_flat_view(&text.replace("\r\n", "\n"), &["ram"]).unwrap(),
            flat
        );
    }

    #[test]
    fn every_recorded_machine_parses() {
        // (fixture, backend names, ranges (gpa, len, name, offset))
        type Case<'a> = (&'a str, &'a [&'a str], &'a [(u64, u64, &'a str, u64)]);
        let cases: &[Case] = &[
            (
                "q35-memfd-3g-booted",
                &["ram"],
                &[
                    // The BIOS has shadowed itself: read-only RAM of the backend.
                    (0, 0xa0000, "ram", 0),
                    (0xc0000, 0xa000, "ram", 0xc0000),
                    (0xca000, 0x3000, "ram", 0xca000),
                    (0xcd000, 0x1b000, "ram", 0xcd000),
                    (0xe8000, 0x8000, "ram", 0xe8000),
                    (0xf0000, 0x10000, "ram", 0xf0000),
                    (0x100000, 0x7ff00000, "ram", 0x100000),
                    (0x1_0000_0000, G, "ram", 0x8000_0000),
                ],
            ),
            (
                "q35-m3g",
                &["pc.ram"],
                &[
                    (0, 0xc0000, "pc.ram", 0),
                    (0x100000, 0x7ff00000, "pc.ram", 0x100000),
                    (0x1_0000_0000, G, "pc.ram", 0x8000_0000),
                ],
            ),
            (
                "q35-numa",
                &["m0", "m1"],
                &[
                    (0, 0xc0000, "m0", 0),
                    (0x100000, 0x3ff00000, "m0", 0x100000),
                    (0x4000_0000, G, "m1", 0),
                    (0x1_0000_0000, G, "m1", G),
                ],
            ),
            (
                "pc-file-1g",
                &["mem"],
                &[
                    (0, 0xc0000, "mem", 0),
                    (0x100000, 0x3ff00000, "mem", 0x100000),
                ],
            ),
            (
                "pc-memfd-4g",
                &["ram"],
                &[
                    (0, 0xc0000, "ram", 0),
                    (0x100000, 0xbff00000, "ram", 0x100000),
                    (0x1_0000_0000, G, "ram", 0xc000_0000),
                ],
            ),
            (
                "pc-m1g",
                &["pc.ram"],
                &[
                    (0, 0xc0000, "pc.ram", 0),
                    (0x100000, 0x3ff00000, "pc.ram", 0x100000),
                ],
            ),
            (
                "q35-kvm-memfd-1g",
                &["ram"],
                &[
                    (0, 0xc0000, "ram", 0),
                    (0x100000, 0x3ff00000, "ram", 0x100000),
                ],
            ),
        ];
        for (name, names, want) in cases {
            let text = fixture(&format!("{name}.info-mtree-f"));
            let got = parse_flat_view(&text, names).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(ranges(&got), want.to_vec(), "{name}");
        }
        // A backend that is not there: one clear error.
        let text = fixture("pc-m1g.info-mtree-f");
        assert_eq!(
            parse_flat_view(&text, &["ram"]),
            Err(LayoutError::NoRange {
                names: "ram".into()
            })
        );
    }

    #[test]
    fn owner_details_and_accelerator_markers_follow_the_name() {
        let view = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n";
        let text = format!(
            "{view}  0000000000000000-00000000000bffff (prio 0, ram): ram KVM owner:{{obj path=/objects/ram}}\n\
             \x20 0000000000100000-000000007fffffff (prio 0, ram): ram @0000000000100000 owner:{{obj path=/objects/ram}}\n\
             \x20 0000000080000000-0000000080000fff (prio 0, ram): ram2 @0000000000000000\n\
             \x20 0000000090000000-0000000090000fff (prio 0, ram): ram disguised\n\
             \x20 00000000a0000000-00000000a0000fff (prio 0, i/o): ram\n\
             \x20 00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram\n"
        );
        let flat = parse_flat_view(&text, &["ram"]).unwrap();
        assert_eq!(
            ranges(&flat),
            vec![
                (0, 0xc0000, "ram", 0),
                (0x100000, 0x7ff00000, "ram", 0x100000)
            ]
        );
    }

    #[test]
    fn hostile_flat_views_get_one_clear_error() {
        let head = "FlatView #3\n AS \"memory\", root: system\n Root memory region: system\n";
        let good = "  0000000000000000-000000000009ffff (prio 0, ram): ram\n";
        for (text, want) in [
            ("".to_owned(), LayoutError::NoMemoryView),
            (
                format!("{head}{good}\nFlatView #4\n AS \"memory\", root: x\n"),
                LayoutError::TwoMemoryViews,
            ),
            (
                format!("{head}  garbage\n"),
                LayoutError::Malformed {
                    line: 4,
                    what: "not a range line",
                },
            ),
            (
                format!("{head}  0000000000001000-0000000000000fff (prio 0, ram): ram\n"),
                LayoutError::Malformed {
                    line: 4,
                    what: "range ends before it starts",
                },
            ),
            (
                format!("{head}  0000000000000000-ffffffffffffffff (prio 0, ram): ram\n"),
                LayoutError::Malformed {
                    line: 4,
                    what: "RAM range reaches the end of the address space",
                },
            ),
            (
                format!("{head}  fffffffffffff000-ffffffffffffffff (prio 0, ram): ram\n"),
                LayoutError::Malformed {
                    line: 4,
                    what: "RAM range reaches the end of the address space",
                },
            ),
            (
                format!("{head}  00000000000000000-0000000000000fff (prio 0, ram): ram\n"),
                LayoutError::Malformed {
                    line: 4,
                    what: "not a range line",
                },
            ),
            (
                "FlatView #0\n AS \"memory, root: system\n".to_owned(),
                LayoutError::Malformed {
                    line: 2,
                    what: "address space name not quoted",
                },
            ),
            (
                format!("{head}{}", good.repeat(MAX_RAM_RANGES + 1)),
                LayoutError::TooMany {
                    what: "RAM ranges",
                    max: MAX_RAM_RANGES,
                },
            ),
        ] {
            assert_eq!(parse_flat_view(&text, &["ram"]), Err(want), "{text:?}");
        }
    }

    /// A small deterministic generator (xorshift) for the mutation test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn mutated_replies_parse_or_fail_with_one_line_but_never_panic() {
        let texts: Vec<String> = [
            "q35-memfd-3g-booted.info-mtree-f",
            "q35-numa.info-mtree-f",
            "q35-kvm-memfd-1g.info-mtree-f",
        ]
        .iter()
        .map(|f| fixture(f))
        .collect();
        let alphabet = b"0123456789abcdef-@():, \n\r\"#ramoKVMFlatView";
        let seed = 0x9e37_79b9_7f4a_7c15;
        let mut rng = Rng(seed);
        for round in 0..3000 {
            let mut bytes = texts[round % texts.len()].clone().into_bytes();
            for _ in 0..1 + rng.next() % 8 {
                let at = (rng.next() as usize) % bytes.len();
                match rng.next() % 3 {
                    0 => bytes[at] = alphabet[(rng.next() as usize) % alphabet.len()],
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, alphabet[(rng.next() as usize) % alphabet.len()]),
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            match parse_flat_view(&text, &["ram", "m0", "m1"]) {
                Ok(flat) => {
                    assert!(!flat.is_empty() && flat.len() <= MAX_RAM_RANGES);
                    // Whatever parsed builds into a layout or fails cleanly.
                    let backends = [memfd("ram", 4 * G), memfd("m0", G), memfd("m1", 2 * G)];
                    let hvas: Vec<u64> = flat.iter().map(|r| (1 << 40) + r.offset).collect();
                    if let Ok(layout) = RamLayout::build(&backends, &flat, &hvas) {
                        assert!(layout
                            .ranges
                            .windows(2)
                            .all(|w| w[0].gpa + w[0].len <= w[1].gpa));
                    }
                }
                Err(e) => assert!(
                    !e.to_string().contains('\n'),
                    "seed {seed:#x} round {round}: {e}"
                ),
            }
        }
    }

    #[test]
    fn gpa2hva_replies_name_the_region_and_its_host_address() {
        let ok = fixture("q35-memfd-3g.gpa2hva-100000000");
        let (name, hva) = parse_gpa2hva(&ok, 0x1_0000_0000).unwrap();
        assert_eq!(name, "ram");
        assert_eq!(hva % PAGE, 0);
        // Asked for another address than the reply is about.
        assert!(parse_gpa2hva(&ok, 0x100000).is_err());
        let none = fixture("pc-m1g.gpa2hva-100000000");
        assert_eq!(
            parse_gpa2hva(&none, 0x1_0000_0000),
            Err(LayoutError::Gpa2hva {
                gpa: 0x1_0000_0000,
                reply: "No memory is mapped at address 0x100000000".into()
            })
        );
        assert!(parse_gpa2hva("Host virtual address for 0x0 (ram) is 0xzz", 0).is_err());
        assert!(parse_gpa2hva("", 0).is_err());
    }

    fn q35_3g() -> (Vec<MemoryBackend>, Vec<FlatRange>) {
        let flat = parse_flat_view(&fixture("q35-memfd-3g.info-mtree-f"), &["ram"]).unwrap();
        (vec![memfd("ram", 3 * G)], flat)
    }

    #[test]
    fn a_layout_translates_both_sides_of_the_hole_and_nothing_in_it() {
        let (backends, flat) = q35_3g();
        let base = 0x7f00_0000_0000;
        let hvas: Vec<u64> = flat.iter().map(|r| base + r.offset).collect();
        let layout = RamLayout::build(&backends, &flat, &hvas).unwrap();
        assert_eq!(layout.backends[0].hva, base);
        assert_eq!(layout.covered_bytes(), 3 * G - 0x40000);
        assert_eq!(layout.translate(0x1000, 4), Some((0, 0x1000)));
        assert_eq!(layout.translate(0x7fff_fffc, 4), Some((0, 0x7fff_fffc)));
        assert_eq!(layout.translate(0x1_0000_0000, 4), Some((0, 0x8000_0000)));
        assert_eq!(layout.translate(0x1_3fff_fffc, 4), Some((0, 0xbfff_fffc)));
        // The PCI hole, the BIOS, past the end, straddling a range's end.
        assert_eq!(layout.translate(0x8000_0000, 4), None);
        assert_eq!(layout.translate(0xfff0_0000, 4), None);
        assert_eq!(layout.translate(0xc0000, 4), None);
        assert_eq!(layout.translate(0x1_4000_0000, 4), None);
        assert_eq!(layout.translate(0x7fff_fffe, 4), None);
        assert_eq!(layout.translate(u64::MAX - 1, 4), None);
        assert_eq!(layout.translate(0x1000, 0), None);
    }

    #[test]
    fn layouts_that_do_not_add_up_are_refused() {
        let (backends, flat) = q35_3g();
        let base = 0x7f00_0000_0000u64;
        let hvas: Vec<u64> = flat.iter().map(|r| base + r.offset).collect();
        // Smaller backend than the ranges need.
        let small = [memfd("ram", 2 * G)];
        assert!(matches!(
            RamLayout::build(&small, &flat, &hvas),
            Err(LayoutError::OutsideBackend {
                gpa: 0x1_0000_0000,
                ..
            })
        ));
        // A host address that disagrees with the offsets.
        let mut bad = hvas.clone();
        bad[2] += PAGE;
        assert!(matches!(
            RamLayout::build(&backends, &flat, &bad),
            Err(LayoutError::Inconsistent { .. })
        ));
        // Not page-aligned.
        let odd: Vec<u64> = hvas.iter().map(|h| h + 8).collect();
        assert!(matches!(
            RamLayout::build(&backends, &flat, &odd),
            Err(LayoutError::Inconsistent { .. })
        ));
        // Overlapping ranges.
        let mut overlap = flat.clone();
        overlap[1].gpa = 0x8000;
        assert_eq!(
            RamLayout::build(&backends, &overlap, &hvas),
            Err(LayoutError::Overlap { a: 0, b: 0x8000 })
        );
        // Missing host addresses, missing sizes, unknown backends.
        assert!(RamLayout::build(&backends, &flat, &hvas[..2]).is_err());
        let sizeless = [MemoryBackend {
            size: None,
            ..memfd("ram", 0)
        }];
        assert_eq!(
            RamLayout::build(&sizeless, &flat, &hvas),
            Err(LayoutError::NoSize { id: "ram".into() })
        );
        assert!(RamLayout::build(&[memfd("other", 3 * G)], &flat, &hvas).is_err());
        assert!(RamLayout::build(&backends, &[], &[]).is_err());
    }

    #[test]
    fn maps_lines_parse_with_their_paths() {
        let v = parse_vma(
            "7fa5c7fff000-7fa687fff000 rw-s 00000000 00:01 2908015                    /memfd:memory-backend-memfd (deleted)",
        )
        .unwrap();
        assert_eq!(
            (v.start, v.end, v.writable, v.shared, v.offset, v.dev, v.inode),
            (
                0x7fa5c7fff000,
                0x7fa687fff000,
                true,
                true,
                0,
                (0, 1),
                2908015
            )
        );
        assert_eq!(v.path, "/memfd:memory-backend-memfd (deleted)");
        let anon = parse_vma("7fa5c77ff000-7fa5c7fff000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(
            (anon.shared, anon.inode, anon.path.as_str()),
            (false, 0, "")
        );
        assert!(parse_vma("1000-1000 rw-s 0 00:01 1").is_none());
        assert!(parse_vma("garbage").is_none());
    }

    fn vma(start: u64, end: u64, offset: u64, inode: u64, perms: &str) -> Vma {
        Vma {
            start,
            end,
            writable: perms.as_bytes()[1] == b'w',
            shared: perms.as_bytes()[3] == b's',
            offset,
            dev: (0, 1),
            inode,
            path: "/memfd:memory-backend-memfd (deleted)".into(),
        }
    }

    #[test]
    fn a_backend_must_be_one_shared_writable_run_of_one_file() {
        let one = [vma(0x10000, 0x30000, 0, 7, "rw-s")];
        assert_eq!(covering(&one, 0x10000, 0x20000).unwrap().start, 0x10000);
        assert!(covering(&one, 0x10000, 0x21000).is_err(), "too short");
        assert!(covering(&one, 0x40000, 0x1000).is_err(), "nothing there");
        // Split in two by an madvise: still one file at contiguous offsets.
        let split = [
            vma(0x10000, 0x20000, 0, 7, "rw-s"),
            vma(0x20000, 0x30000, 0x10000, 7, "rw-s"),
        ];
        assert!(covering(&split, 0x10000, 0x20000).is_ok());
        let other_file = [
            vma(0x10000, 0x20000, 0, 7, "rw-s"),
            vma(0x20000, 0x30000, 0x10000, 8, "rw-s"),
        ];
        assert!(covering(&other_file, 0x10000, 0x20000).is_err());
        let private = [vma(0x10000, 0x30000, 0, 7, "rw-p")];
        assert!(covering(&private, 0x10000, 0x20000).is_err());
        let read_only = [vma(0x10000, 0x30000, 0, 7, "r--s")];
        assert!(covering(&read_only, 0x10000, 0x20000).is_err());
        let anonymous = [vma(0x10000, 0x30000, 0, 0, "rw-s")];
        assert!(covering(&anonymous, 0x10000, 0x20000).is_err());
    }

    #[test]
    fn the_command_line_tells_when_ram_cannot_be_shared() {
        let shared = memfd("ram", G);
        assert_eq!(RamQuery::unshared(&[&shared]), None);
        assert!(RamQuery::unshared(&[]).unwrap().contains("anonymous"));
        let private = MemoryBackend {
            share: false,
            ..memfd("m0", G)
        };
        assert_eq!(
            RamQuery::unshared(&[&private]).as_deref(),
            Some("m0 has share=off")
        );
        // One NUMA node on shared RAM is enough to read that node's CPUs.
        assert_eq!(RamQuery::unshared(&[&private, &shared]), None);
        let anon = MemoryBackend {
            kind: BackendKind::Ram,
            ..memfd("r", G)
        };
        assert!(RamQuery::unshared(&[&anon])
            .unwrap()
            .contains("memory-backend-ram"));
    }
}
