//! Discovery of libvirt-managed QEMU domains.
//!
//! libvirt hands QEMU its monitor as a file descriptor and keeps it, so the
//! daemon cannot open a QMP session of its own. It reads instead what
//! libvirt itself recorded of the domain: the per-domain status file
//! `/run/libvirt/qemu/NAME.xml` (the QEMU pid, each vCPU's thread id, the
//! domain definition with its `<shmem>` devices) or, when there is no status
//! file, the domain's per-thread cgroups (`vcpuN`, `emulator`, `iothreadN`).
//!
//! Those records are believed only when root wrote them (owner root,
//! writable by no one else, no symbolic link, bounded size), and only for
//! the process they name: the status file's pid must be the process found,
//! its name the process's `-name`, every thread id a thread of that process
//! ([`crate::trust::check_threads`]), and the shared file the one the
//! process maps itself (checked when the VM is attached,
//! [`crate::trust::open_shared_file`]). The process's users are checked by
//! the caller against `allowed_users` (libvirt runs QEMU as `libvirt-qemu`).

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::discovery::{is_under, parse_qemu_cmdline, QemuArgs};
use crate::procfs::HostFs;
use crate::qmp::{CpuInfo, IoThreadInfo};
use crate::trust::{check_threads, process_identity, ProcessIdentity, Refusal, RefusalReason};

/// Where libvirt keeps the status file of each running QEMU domain.
pub const STATUS_DIR: &str = "/run/libvirt/qemu";

/// The largest status file read (libvirt's are tens of KiB: the domain
/// definition and QEMU's capability flags).
pub const MAX_STATUS_BYTES: u64 = 4 << 20;

/// The largest `cgroup.threads` file read.
const MAX_THREADS_BYTES: u64 = 64 << 10;

/// The prefix of the `<shmem>` names the daemon serves: another shmem device
/// of a domain (a frame buffer, say) is never written.
pub const SHMEM_PREFIX: &str = "pvsched";

/// The ivshmem model of a `<shmem>` device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmemModel {
    /// `ivshmem-plain`: a file `/dev/shm/NAME` libvirt creates.
    Plain,
    /// `ivshmem-doorbell`: memory and interrupts from an ivshmem server.
    Doorbell,
}

/// A `<shmem>` device of the domain definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shmem {
    /// `name`, checked to be one file name.
    pub name: String,
    /// `<model type=...>`.
    pub model: ShmemModel,
    /// `<server path=...>` of a doorbell device.
    pub server: Option<PathBuf>,
}

/// What the daemon uses of a libvirt status file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainStatus {
    /// `<domstatus pid=...>`: the QEMU process.
    pub pid: i32,
    /// `<domain><name>`.
    pub name: String,
    /// `<vcpus><vcpu id=... pid=...>`: (vCPU id, thread id), by id.
    pub vcpus: Vec<(u32, i32)>,
    /// `<domain><vcpu>`: the most vCPUs the domain can have.
    pub max_vcpus: Option<u32>,
    /// The `<shmem>` devices whose name starts with [`SHMEM_PREFIX`].
    pub shmem: Vec<Shmem>,
}

/// Why a status file or a cgroup is not believed.
fn untrusted(detail: impl Into<String>) -> Refusal {
    Refusal::new(RefusalReason::LibvirtRecord, detail)
}

/// Whether `name` is one file name: not empty, no `/`, not `.` or `..`, no
/// NUL, at most 255 bytes.
fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

fn attr<T: std::str::FromStr>(node: roxmltree::Node<'_, '_>, name: &str) -> Result<T, Refusal> {
    let text = node.attribute(name).ok_or_else(|| {
        untrusted(format!(
            "<{}> has no {name} attribute",
            node.tag_name().name()
        ))
    })?;
    text.trim().parse().map_err(|_| {
        untrusted(format!(
            "<{} {name}={text:?}> is not a number",
            node.tag_name().name()
        ))
    })
}

fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children().find(|c| c.has_tag_name(name))
}

/// Parses a libvirt QEMU status file (`<domstatus>` around the live domain
/// definition). A malformed file, a vCPU id or thread id out of range or
/// given twice, or a pvsched `<shmem>` whose name is not one file name is
/// refused whole.
pub fn parse_status(text: &str) -> Result<DomainStatus, Refusal> {
    let options = roxmltree::ParsingOptions {
        // libvirt writes no DTD; a file with one is not libvirt's.
        allow_dtd: false,
        nodes_limit: 1 << 20,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options)
        .map_err(|e| untrusted(format!("not well-formed XML: {e}")))?;
    let root = doc.root_element();
    if !root.has_tag_name("domstatus") {
        return Err(untrusted(format!(
            "the root element is <{}>, not <domstatus>",
            root.tag_name().name()
        )));
    }
    let pid: i32 = attr(root, "pid")?;
    if pid <= 0 {
        return Err(untrusted(format!("<domstatus pid='{pid}'>")));
    }
    let mut vcpus: Vec<(u32, i32)> = Vec::new();
    if let Some(list) = child(root, "vcpus") {
        for v in list.children().filter(|c| c.has_tag_name("vcpu")) {
            let id: u32 = attr(v, "id")?;
            let tid: i32 = attr(v, "pid")?;
            if id >= pvsched_abi::raw::PVSCHED_MAX_SLOTS || tid <= 0 {
                return Err(untrusted(format!("<vcpu id='{id}' pid='{tid}'>")));
            }
            if vcpus.iter().any(|&(i, _)| i == id) {
                return Err(untrusted(format!("vCPU {id} is listed twice")));
            }
            vcpus.push((id, tid));
        }
    }
    vcpus.sort_unstable();
    let domain = child(root, "domain").ok_or_else(|| untrusted("no <domain> in <domstatus>"))?;
    let name = child(domain, "name")
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| untrusted("the domain has no <name>"))?
        .to_owned();
    let max_vcpus = match child(domain, "vcpu").and_then(|v| v.text()) {
        Some(t) => Some(
            t.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=pvsched_abi::raw::PVSCHED_MAX_SLOTS).contains(n))
                .ok_or_else(|| untrusted(format!("<vcpu>{t}</vcpu> is not a vCPU count")))?,
        ),
        None => None,
    };
    let mut shmem = Vec::new();
    if let Some(devices) = child(domain, "devices") {
        for dev in devices.children().filter(|c| c.has_tag_name("shmem")) {
            let Some(name) = dev.attribute("name") else {
                continue;
            };
            if !name.starts_with(SHMEM_PREFIX) {
                continue;
            }
            if !is_file_name(name) {
                return Err(untrusted(format!(
                    "<shmem name={name:?}> is not one file name"
                )));
            }
            let model = match child(dev, "model").and_then(|m| m.attribute("type")) {
                // libvirt's default model.
                None | Some("ivshmem-plain") => ShmemModel::Plain,
                Some("ivshmem-doorbell") => ShmemModel::Doorbell,
                Some(other) => {
                    return Err(untrusted(format!(
                        "<shmem name={name:?}> has model {other:?}"
                    )))
                }
            };
            let server = child(dev, "server")
                .and_then(|s| s.attribute("path"))
                .map(PathBuf::from);
            shmem.push(Shmem {
                name: name.to_owned(),
                model,
                server,
            });
        }
    }
    Ok(DomainStatus {
        pid,
        name,
        vcpus,
        max_vcpus,
        shmem,
    })
}

/// Checks that a file or directory of libvirt's is `owner`'s (root, but for
/// tests), writable by no one else, and not a symbolic link.
fn check_owned(meta: &std::fs::Metadata, owner: u32, shown: &str) -> Result<(), Refusal> {
    if meta.file_type().is_symlink() {
        return Err(untrusted(format!("{shown} is a symbolic link")));
    }
    if meta.uid() != owner {
        return Err(untrusted(format!(
            "{shown} is owned by uid {}, not {owner}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "{shown} is writable by others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Reads the status file of domain `name` in `dir`, believed only when it
/// and `dir` are `owner`'s, writable by no one else, not symbolic links, and
/// the file is a regular file of at most [`MAX_STATUS_BYTES`]. `Ok(None)`:
/// there is no status file.
pub fn read_status_file(dir: &Path, name: &str, owner: u32) -> Result<Option<String>, Refusal> {
    if !is_file_name(name) || name.starts_with('.') {
        return Err(untrusted(format!(
            "the domain name {name:?} is not a status file's name"
        )));
    }
    let dir_meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(untrusted(format!("inspecting {}: {e}", dir.display()))),
    };
    check_owned(&dir_meta, owner, &dir.display().to_string())?;
    if !dir_meta.is_dir() {
        return Err(untrusted(format!("{} is not a directory", dir.display())));
    }
    let path = dir.join(format!("{name}.xml"));
    let shown = path.display().to_string();
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(untrusted(format!("{shown} is a symbolic link")))
        }
        Err(e) => return Err(untrusted(format!("opening {shown}: {e}"))),
    };
    let meta = file
        .metadata()
        .map_err(|e| untrusted(format!("inspecting {shown}: {e}")))?;
    if !meta.is_file() {
        return Err(untrusted(format!("{shown} is not a regular file")));
    }
    check_owned(&meta, owner, &shown)?;
    if meta.len() > MAX_STATUS_BYTES {
        return Err(untrusted(format!(
            "{shown} has {} bytes, more than {MAX_STATUS_BYTES}",
            meta.len()
        )));
    }
    let mut text = String::new();
    // The size may change under the daemon: never more than the bound.
    file.take(MAX_STATUS_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| untrusted(format!("reading {shown}: {e}")))?;
    if text.len() as u64 > MAX_STATUS_BYTES {
        return Err(untrusted(format!(
            "{shown} has more than {MAX_STATUS_BYTES} bytes"
        )));
    }
    Ok(Some(text))
}

/// The threads libvirt placed in a domain's per-thread cgroups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupThreads {
    /// `vcpuN`: (N, its one thread), by N.
    pub vcpus: Vec<(u32, i32)>,
    /// `iothreadN`: (N, its one thread), by N.
    pub iothreads: Vec<(u32, i32)>,
}

/// Reads the per-thread cgroups of the libvirt domain whose QEMU process is
/// `pid`: its main thread is in the cgroup v2 `.../emulator` (from
/// `/proc/<pid>/cgroup`, under `/sys/fs/cgroup` or, in the hybrid layout,
/// `/sys/fs/cgroup/unified`); the directory above it and each `vcpuN` and
/// `iothreadN` in it must be `owner`'s and writable by no one else (a
/// cgroup delegated to another user is not libvirt's record), each with one
/// thread in `cgroup.threads`.
pub fn read_cgroup_threads(fs: &HostFs, pid: i32, owner: u32) -> Result<CgroupThreads, Refusal> {
    let path = fs.proc_root.join(pid.to_string()).join("cgroup");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| untrusted(format!("reading {}: {e}", path.display())))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| untrusted(format!("process {pid} is in no cgroup v2")))?;
    let machine = rel.strip_suffix("/emulator").ok_or_else(|| {
        untrusted(format!(
            "process {pid} is in cgroup {rel}, not a libvirt domain's emulator cgroup"
        ))
    })?;
    let relative = Path::new(machine.trim_start_matches('/'));
    if relative
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(untrusted(format!("cgroup path {rel:?}")));
    }
    // Pure cgroup v2 has its root at /sys/fs/cgroup; a hybrid layout (v1
    // controllers beside it) mounts the v2 hierarchy at .../unified.
    let mount = fs.sys_root.join("fs/cgroup");
    let root = if mount.join("cgroup.controllers").exists() {
        mount
    } else {
        mount.join("unified")
    };
    let dir = root.join(relative);
    let shown = dir.display().to_string();
    let meta = std::fs::symlink_metadata(&dir)
        .map_err(|e| untrusted(format!("inspecting {shown}: {e}")))?;
    check_owned(&meta, owner, &shown)?;
    let mut out = CgroupThreads::default();
    let entries =
        std::fs::read_dir(&dir).map_err(|e| untrusted(format!("listing {shown}: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| untrusted(format!("listing {shown}: {e}")))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let (list, index) = if let Some(n) = name.strip_prefix("vcpu") {
            (&mut out.vcpus, n)
        } else if let Some(n) = name.strip_prefix("iothread") {
            (&mut out.iothreads, n)
        } else {
            continue;
        };
        let Ok(index) = index.parse::<u32>() else {
            continue;
        };
        if index >= pvsched_abi::raw::PVSCHED_MAX_SLOTS {
            return Err(untrusted(format!("{shown}/{name}: index out of range")));
        }
        let sub = entry.path();
        let sub_shown = sub.display().to_string();
        let meta = std::fs::symlink_metadata(&sub)
            .map_err(|e| untrusted(format!("inspecting {sub_shown}: {e}")))?;
        check_owned(&meta, owner, &sub_shown)?;
        if !meta.is_dir() {
            continue;
        }
        let threads = sub.join("cgroup.threads");
        let mut text = String::new();
        std::fs::File::open(&threads)
            .and_then(|f| f.take(MAX_THREADS_BYTES).read_to_string(&mut text))
            .map_err(|e| untrusted(format!("reading {}: {e}", threads.display())))?;
        let tids: Vec<i32> = text
            .split_ascii_whitespace()
            .map(|t| t.parse::<i32>().ok().filter(|&t| t > 0))
            .collect::<Option<_>>()
            .ok_or_else(|| untrusted(format!("{} holds a non-thread id", threads.display())))?;
        match tids.as_slice() {
            [tid] => list.push((index, *tid)),
            // An I/O thread not started yet, or a vCPU being hot-plugged.
            [] => {}
            _ => {
                return Err(untrusted(format!(
                    "{} holds {} threads, one expected",
                    threads.display(),
                    tids.len()
                )))
            }
        }
    }
    out.vcpus.sort_unstable();
    out.iothreads.sort_unstable();
    Ok(out)
}

/// Where a domain's thread ids came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRecord {
    /// libvirt's status file (vCPUs; I/O threads from the cgroups when they are root's).
    StatusFile,
    /// The per-thread cgroups (no status file).
    Cgroups,
}

/// A libvirt-managed QEMU domain found and cross-checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtDomain {
    /// The QEMU process, as it was before and after the checks.
    pub identity: ProcessIdentity,
    /// The domain's name.
    pub name: String,
    /// The shared file (`/dev/shm/NAME`), or for a doorbell device the name
    /// of the memfd the daemon's ivshmem server made for it.
    pub shm: PathBuf,
    /// The `<shmem>` is an `ivshmem-doorbell` on the daemon's ivshmem server.
    pub doorbell: bool,
    /// vCPUs: the vCPU id is the slot index.
    pub cpus: Vec<CpuInfo>,
    /// The most vCPUs the domain can have (sizes the region).
    pub possible_cpus: Option<u32>,
    /// I/O threads (`iothreadN`).
    pub iothreads: Vec<IoThreadInfo>,
    /// Where the thread ids came from.
    pub threads_from: ThreadRecord,
}

/// A libvirt domain whose records are not believed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedDomain {
    /// The QEMU process.
    pub pid: i32,
    /// Its `-name`.
    pub name: String,
    /// Why.
    pub refusal: Refusal,
}

/// Where libvirt's records are and whose they must be.
#[derive(Clone, Debug)]
pub struct LibvirtSource<'a> {
    /// The proc and sys roots.
    pub fs: &'a HostFs,
    /// The status directory ([`STATUS_DIR`]).
    pub status_dir: &'a Path,
    /// The directory libvirt creates ivshmem-plain files in (`/dev/shm`).
    pub shm_dir: &'a Path,
    /// The daemon's ivshmem server, for doorbell devices.
    pub ivshmem_server: Option<&'a Path>,
    /// The owner of libvirt's records (root; tests use their own uid).
    pub owner: u32,
}

/// Every libvirt-managed QEMU process with a pvsched `<shmem>` device:
/// found, or refused with the reason. Processes that vanish mid-scan and
/// domains without a pvsched `<shmem>` (or whose doorbell is served by
/// another server) are left out.
pub fn discover(src: &LibvirtSource<'_>) -> Vec<Result<LibvirtDomain, RefusedDomain>> {
    let mut out = Vec::new();
    let Ok(pids) = src.fs.pids() else {
        return out;
    };
    for pid in pids {
        let Ok(cmdline) = src.fs.cmdline(pid) else {
            continue;
        };
        let Some(args) = parse_qemu_cmdline(&cmdline) else {
            continue;
        };
        if !args.looks_like_libvirt() {
            continue;
        }
        let name = args.name.clone().unwrap_or_default();
        match domain_of(src, pid, &args) {
            Ok(Some(d)) => out.push(Ok(d)),
            Ok(None) => {}
            Err(refusal) => out.push(Err(RefusedDomain { pid, name, refusal })),
        }
    }
    out
}

/// The domain of QEMU process `pid` (command line `args`), cross-checked;
/// `Ok(None)` when it is not one the daemon serves or the process is gone.
fn domain_of(
    src: &LibvirtSource<'_>,
    pid: i32,
    args: &QemuArgs,
) -> Result<Option<LibvirtDomain>, Refusal> {
    let Ok(before) = process_identity(src.fs, pid) else {
        return Ok(None);
    };
    let name = args.name.as_deref().unwrap_or_default();
    let Some(text) = read_status_file(src.status_dir, name, src.owner)? else {
        return cgroup_domain(src, before, name, args);
    };
    let status = parse_status(&text)?;
    if status.pid != pid {
        return Err(untrusted(format!(
            "{}/{name}.xml is the status of process {}, not of QEMU process {pid}",
            src.status_dir.display(),
            status.pid
        )));
    }
    if status.name != name {
        return Err(untrusted(format!(
            "{}/{name}.xml is the status of domain {:?}",
            src.status_dir.display(),
            status.name
        )));
    }
    let Some((shm, doorbell)) = shared_channel(src, pid, &status.shmem, args)? else {
        return Ok(None);
    };
    // libvirt's status file has no I/O thread ids: they come from the
    // cgroups when those are libvirt's (root's); otherwise none are boosted.
    let iothreads = read_cgroup_threads(src.fs, pid, src.owner)
        .map(|c| c.iothreads)
        .unwrap_or_default();
    finish(
        src,
        before,
        name,
        shm,
        doorbell,
        &status.vcpus,
        status.max_vcpus,
        &iothreads,
        ThreadRecord::StatusFile,
    )
}

/// Without a status file: the threads from the domain's cgroups. The
/// shared channel is then the process's own `memory-backend-file` under
/// the shared-memory directory (its mapping is checked on attach).
fn cgroup_domain(
    src: &LibvirtSource<'_>,
    before: ProcessIdentity,
    name: &str,
    args: &QemuArgs,
) -> Result<Option<LibvirtDomain>, Refusal> {
    let pid = before.pid;
    let shmem: Vec<Shmem> = args
        .mem_paths
        .iter()
        .filter(|p| is_under(p, src.shm_dir) && p.parent() == Some(src.shm_dir))
        .filter_map(|p| p.file_name()?.to_str())
        .filter(|n| n.starts_with(SHMEM_PREFIX))
        .map(|n| Shmem {
            name: n.to_owned(),
            model: ShmemModel::Plain,
            server: None,
        })
        .collect();
    let Some((shm, doorbell)) = shared_channel(src, pid, &shmem, args)? else {
        return Ok(None);
    };
    let threads = read_cgroup_threads(src.fs, pid, src.owner)?;
    finish(
        src,
        before,
        name,
        shm,
        doorbell,
        &threads.vcpus,
        None,
        &threads.iothreads,
        ThreadRecord::Cgroups,
    )
}

/// The shared channel of the domain: the first pvsched `<shmem>` that is
/// an ivshmem-plain file the command line maps, or a doorbell on the
/// daemon's server. `None`: no such device.
fn shared_channel(
    src: &LibvirtSource<'_>,
    pid: i32,
    shmem: &[Shmem],
    args: &QemuArgs,
) -> Result<Option<(PathBuf, bool)>, Refusal> {
    for dev in shmem {
        match dev.model {
            ShmemModel::Plain => {
                let path = src.shm_dir.join(&dev.name);
                if !args.mem_paths.iter().any(|p| p == &path) {
                    return Err(untrusted(format!(
                        "<shmem name={:?}>: QEMU process {pid} has no memory-backend-file at {}",
                        dev.name,
                        path.display()
                    )));
                }
                return Ok(Some((path, false)));
            }
            ShmemModel::Doorbell => {
                let ours = match (src.ivshmem_server, &dev.server) {
                    (Some(server), Some(path)) => crate::ivshmem::same_path(path, server),
                    _ => false,
                };
                let connected = ours
                    && args.doorbells.iter().any(|d| {
                        src.ivshmem_server
                            .is_some_and(|s| crate::ivshmem::same_path(&d.socket, s))
                    });
                if connected {
                    return Ok(Some((PathBuf::from(format!("memfd:pvsched-{pid}")), true)));
                }
            }
        }
    }
    Ok(None)
}

/// The domain from its checked pieces: every thread a thread of the
/// process, no thread listed twice, and the process the same (pid not
/// reused) after the checks as before.
#[allow(clippy::too_many_arguments)]
fn finish(
    src: &LibvirtSource<'_>,
    before: ProcessIdentity,
    name: &str,
    shm: PathBuf,
    doorbell: bool,
    vcpus: &[(u32, i32)],
    max_vcpus: Option<u32>,
    iothreads: &[(u32, i32)],
    threads_from: ThreadRecord,
) -> Result<Option<LibvirtDomain>, Refusal> {
    let pid = before.pid;
    if vcpus.is_empty() {
        // libvirt writes the status file before it has asked QEMU for its
        // vCPU threads (the domain starts paused): found on a later refresh.
        return Ok(None);
    }
    let cpus: Vec<CpuInfo> = vcpus
        .iter()
        .map(|&(id, tid)| CpuInfo {
            cpu_index: id,
            thread_id: tid,
            socket_id: None,
            core_id: None,
            smt_id: None,
        })
        .collect();
    let iothreads: Vec<IoThreadInfo> = iothreads
        .iter()
        .map(|&(n, tid)| IoThreadInfo {
            id: format!("iothread{n}"),
            thread_id: tid,
        })
        .collect();
    match check_threads(src.fs, pid, &cpus, &iothreads) {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Ok(None), // a thread exited: next refresh
        Err(r) => return Err(untrusted(format!("libvirt's record: {}", r.detail))),
    }
    match process_identity(src.fs, pid) {
        Ok(after) if after == before => {}
        _ => return Ok(None),
    }
    let most = vcpus.iter().map(|&(id, _)| id + 1).max().unwrap_or(0);
    Ok(Some(LibvirtDomain {
        identity: before,
        name: name.to_owned(),
        shm,
        doorbell,
        cpus,
        possible_cpus: max_vcpus.map(|m| m.max(most)),
        iothreads,
        threads_from,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status file of the fixtures (`tests/fixtures/libvirt/`).
    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/libvirt")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The real status file libvirtd wrote for a running TCG domain with
    /// two vCPUs, an I/O thread and `<shmem name='pvsched-fixture'>`.
    const RUNNING: &str = "running.xml";

    /// A host tree: libvirt's status directory, a proc root with QEMU
    /// processes (command line, users, threads), and cgroups.
    struct Host {
        dir: tempfile::TempDir,
    }

    impl Host {
        fn new() -> Self {
            let host = Host {
                dir: tempfile::tempdir().unwrap(),
            };
            std::fs::create_dir_all(host.status_dir()).unwrap();
            host
        }

        fn fs(&self) -> HostFs {
            HostFs::new(self.dir.path().join("proc"), self.dir.path().join("sys"))
        }

        fn status_dir(&self) -> PathBuf {
            self.dir.path().join("run/libvirt/qemu")
        }

        /// Whose files the test writes: the owner libvirt's records must have here.
        fn owner(&self) -> u32 {
            std::fs::metadata(self.dir.path()).unwrap().uid()
        }

        fn write_status(&self, name: &str, text: &str) {
            std::fs::write(self.status_dir().join(format!("{name}.xml")), text).unwrap();
        }

        fn stat_line(tid: i32, starttime: u64) -> String {
            let mut f: Vec<String> = (3..=52).map(|_| "0".to_string()).collect();
            f[0] = "S".into();
            f[22 - 3] = starttime.to_string();
            format!("{tid} (qemu) {}\n", f.join(" "))
        }

        /// A process `pid` of uid 64055 (libvirt-qemu) with threads `tids`
        /// and command line `args`.
        fn process(&self, pid: i32, tids: &[i32], args: &[String]) {
            let root = self.dir.path().join("proc");
            let pdir = root.join(pid.to_string());
            std::fs::create_dir_all(&pdir).unwrap();
            std::fs::write(pdir.join("cmdline"), args.join("\0") + "\0").unwrap();
            std::fs::write(
                pdir.join("status"),
                format!(
                    "Name:\tqemu\nTgid:\t{pid}\nPid:\t{pid}\nUid:\t64055\t64055\t64055\t64055\n"
                ),
            )
            .unwrap();
            for &t in std::iter::once(&pid).chain(tids) {
                let tdir = pdir.join("task").join(t.to_string());
                std::fs::create_dir_all(&tdir).unwrap();
                std::fs::write(tdir.join("stat"), Self::stat_line(t, 5000)).unwrap();
                if t != pid {
                    let alias = root.join(t.to_string());
                    std::fs::create_dir_all(&alias).unwrap();
                    std::fs::write(alias.join("status"), format!("Tgid:\t{pid}\nPid:\t{t}\n"))
                        .unwrap();
                }
            }
        }

        /// The domain's cgroups (v2): `emulator` holds the process, one
        /// `vcpuN`/`iothreadN` per thread given.
        fn cgroups(&self, pid: i32, machine: &str, dirs: &[(&str, i32)]) {
            std::fs::write(
                self.dir.path().join(format!("proc/{pid}/cgroup")),
                format!("0::/{machine}/emulator\n"),
            )
            .unwrap();
            let mount = self.dir.path().join("sys/fs/cgroup");
            std::fs::create_dir_all(&mount).unwrap();
            std::fs::write(
                mount.join("cgroup.controllers"),
                "cpuset cpu io memory pids\n",
            )
            .unwrap();
            let base = mount.join(machine);
            std::fs::create_dir_all(base.join("emulator")).unwrap();
            for (name, tid) in dirs {
                std::fs::create_dir_all(base.join(name)).unwrap();
                std::fs::write(base.join(name).join("cgroup.threads"), format!("{tid}\n")).unwrap();
            }
        }

        fn discover(&self, owner: u32) -> Vec<Result<LibvirtDomain, RefusedDomain>> {
            let fs = self.fs();
            let status_dir = self.status_dir();
            discover(&LibvirtSource {
                fs: &fs,
                status_dir: &status_dir,
                shm_dir: Path::new("/dev/shm"),
                ivshmem_server: None,
                owner,
            })
        }
    }

    /// The command line libvirt gave QEMU for the fixture's domain (its
    /// monitor an fd, `-object` and `-device` as JSON).
    fn libvirt_cmdline(name: &str, shmem: &str) -> Vec<String> {
        [
            "/usr/bin/qemu-system-x86_64".to_owned(),
            "-name".into(),
            format!("guest={name},debug-threads=on"),
            "-object".into(),
            format!(r#"{{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-{name}/master-key.aes"}}"#),
            "-chardev".into(),
            "socket,id=charmonitor,fd=31,server=on,wait=off".into(),
            "-mon".into(),
            "chardev=charmonitor,id=monitor,mode=control".into(),
            "-object".into(),
            format!(r#"{{"qom-type":"memory-backend-file","id":"shmmem-shmem0","mem-path":"/dev/shm/{shmem}","size":1048576,"share":true}}"#),
            "-device".into(),
            r#"{"driver":"ivshmem-plain","id":"shmem0","memdev":"shmmem-shmem0","bus":"pci.0","addr":"0x3"}"#.into(),
        ]
        .into()
    }

    /// The real fixture's domain on a fixture host: its pid, its vCPU
    /// threads, its command line; returns (pid, vCPU tids).
    fn running_domain(host: &Host) -> (i32, Vec<i32>) {
        let status = parse_status(&fixture(RUNNING)).unwrap();
        let tids: Vec<i32> = status.vcpus.iter().map(|&(_, t)| t).collect();
        host.process(
            status.pid,
            &tids,
            &libvirt_cmdline(&status.name, &status.shmem[0].name),
        );
        host.write_status(&status.name, &fixture(RUNNING));
        (status.pid, tids)
    }

    #[test]
    fn the_real_status_file_gives_the_pid_the_vcpu_threads_and_the_shmem() {
        let status = parse_status(&fixture(RUNNING)).unwrap();
        assert_eq!(status.name, "pvsched-fixture");
        assert!(status.pid > 0);
        assert_eq!(status.vcpus.len(), 2);
        assert_eq!(
            status.vcpus.iter().map(|v| v.0).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(status.max_vcpus, Some(2));
        assert_eq!(
            status.shmem,
            vec![Shmem {
                name: "pvsched-fixture".into(),
                model: ShmemModel::Plain,
                server: None,
            }]
        );
    }

    #[test]
    fn libvirts_command_line_is_recognised_and_its_json_objects_parsed() {
        let args = parse_qemu_cmdline(&libvirt_cmdline("web", "pvsched-web")).unwrap();
        assert!(args.looks_like_libvirt());
        assert!(args.fd_monitor && args.libvirt_domain_dir);
        assert!(
            args.qmp_sockets.is_empty(),
            "libvirt's monitor is no socket of ours"
        );
        assert_eq!(args.mem_paths, vec![PathBuf::from("/dev/shm/pvsched-web")]);
        let plain = parse_qemu_cmdline(
            &[
                "qemu-system-x86_64",
                "-name",
                "guest=a",
                "-qmp",
                "unix:/run/a.qmp",
            ]
            .map(String::from),
        )
        .unwrap();
        assert!(!plain.looks_like_libvirt());
    }

    #[test]
    fn a_running_domain_is_found_with_libvirts_threads() {
        let host = Host::new();
        let (pid, tids) = running_domain(&host);
        let found = host.discover(host.owner());
        assert_eq!(found.len(), 1, "{found:?}");
        let d = found[0].as_ref().unwrap();
        assert_eq!(d.identity.pid, pid);
        assert_eq!(d.name, "pvsched-fixture");
        assert_eq!(d.shm, PathBuf::from("/dev/shm/pvsched-fixture"));
        assert!(!d.doorbell);
        assert_eq!(
            d.cpus
                .iter()
                .map(|c| (c.cpu_index, c.thread_id))
                .collect::<Vec<_>>(),
            vec![(0, tids[0]), (1, tids[1])]
        );
        assert_eq!(d.possible_cpus, Some(2));
        assert_eq!(d.threads_from, ThreadRecord::StatusFile);
    }

    fn refusal(found: &[Result<LibvirtDomain, RefusedDomain>]) -> &Refusal {
        assert_eq!(found.len(), 1, "{found:?}");
        let r = &found[0].as_ref().expect_err("refused").refusal;
        assert_eq!(r.reason, RefusalReason::LibvirtRecord);
        r
    }

    #[test]
    fn a_status_file_of_another_owner_or_writable_by_others_is_not_believed() {
        let host = Host::new();
        running_domain(&host);
        let other = host.owner() + 1;
        assert!(refusal(&host.discover(other))
            .detail
            .contains("owned by uid"));

        let file = host.status_dir().join("pvsched-fixture.xml");
        let mut perm = std::fs::metadata(&file).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o666);
        std::fs::set_permissions(&file, perm).unwrap();
        let owner = host.owner();
        assert!(refusal(&host.discover(owner))
            .detail
            .contains("writable by others"));
    }

    #[test]
    fn a_symlinked_or_huge_status_file_is_not_read() {
        let host = Host::new();
        running_domain(&host);
        let file = host.status_dir().join("pvsched-fixture.xml");
        let real = host.dir.path().join("elsewhere.xml");
        std::fs::rename(&file, &real).unwrap();
        std::os::unix::fs::symlink(&real, &file).unwrap();
        assert!(refusal(&host.discover(host.owner()))
            .detail
            .contains("symbolic link"));

        std::fs::remove_file(&file).unwrap();
        let mut huge = fixture(RUNNING);
        let pad = format!("<!-- {} -->\n", "x".repeat(MAX_STATUS_BYTES as usize));
        huge.insert_str(0, &pad);
        std::fs::write(&file, huge).unwrap();
        assert!(refusal(&host.discover(host.owner()))
            .detail
            .contains("bytes"));
    }

    #[test]
    fn a_vcpu_thread_of_another_process_is_refused() {
        let host = Host::new();
        let (pid, tids) = running_domain(&host);
        // The second vCPU's thread id now belongs to another process.
        let proc_root = host.dir.path().join("proc");
        std::fs::remove_dir_all(proc_root.join(format!("{pid}/task/{}", tids[1]))).unwrap();
        std::fs::write(
            proc_root.join(format!("{}/status", tids[1])),
            format!("Tgid:\t1\nPid:\t{}\n", tids[1]),
        )
        .unwrap();
        let found = host.discover(host.owner());
        let r = refusal(&found);
        assert!(r.detail.contains("a thread of process 1"), "{r}");
    }

    #[test]
    fn a_status_file_of_another_process_or_domain_is_refused() {
        let host = Host::new();
        let (pid, tids) = running_domain(&host);
        // A second QEMU claims the same domain name: the file names `pid`.
        let impostor = pid + 100;
        host.process(
            impostor,
            &tids.iter().map(|t| t + 100).collect::<Vec<_>>(),
            &libvirt_cmdline("pvsched-fixture", "pvsched-fixture"),
        );
        let found = host.discover(host.owner());
        let refused: Vec<_> = found.iter().filter_map(|f| f.as_ref().err()).collect();
        assert_eq!(refused.len(), 1, "{found:?}");
        assert_eq!(refused[0].pid, impostor);
        assert!(refused[0]
            .refusal
            .detail
            .contains(&format!("not of QEMU process {impostor}")));
        assert_eq!(found.iter().filter(|f| f.is_ok()).count(), 1);

        // A file whose <name> is not the process's.
        let renamed =
            fixture(RUNNING).replace("<name>pvsched-fixture</name>", "<name>other</name>");
        let host = Host::new();
        running_domain(&host);
        host.write_status("pvsched-fixture", &renamed);
        assert!(refusal(&host.discover(host.owner()))
            .detail
            .contains("\"other\""));
    }

    #[test]
    fn hostile_status_files_are_refused_whole() {
        for (file, expect) in [
            ("shmem-dotdot.xml", "not one file name"),
            ("vcpu-twice.xml", "listed twice"),
            ("doctype.xml", "not well-formed"),
            ("vcpu-pid-zero.xml", "pid='0'"),
        ] {
            let err = parse_status(&fixture(file)).expect_err(file);
            assert_eq!(err.reason, RefusalReason::LibvirtRecord);
            assert!(err.detail.contains(expect), "{file}: {err}");
        }
    }

    #[test]
    fn a_name_from_the_command_line_never_leaves_the_status_directory() {
        let host = Host::new();
        for name in ["../etc/passwd", ".hidden", "", "a/b"] {
            assert!(
                read_status_file(&host.status_dir(), name, host.owner()).is_err(),
                "{name:?}"
            );
        }
        assert_eq!(
            read_status_file(&host.status_dir(), "absent", host.owner()).unwrap(),
            None
        );
    }

    #[test]
    fn a_domain_without_a_pvsched_shmem_is_left_alone() {
        let host = Host::new();
        let text = fixture(RUNNING).replace("pvsched-fixture'", "framebuffer'");
        let status = parse_status(&text).unwrap();
        assert!(status.shmem.is_empty());
        running_domain(&host);
        host.write_status("pvsched-fixture", &text);
        assert!(host.discover(host.owner()).is_empty());
    }

    #[test]
    fn without_a_status_file_the_threads_come_from_root_owned_cgroups() {
        let host = Host::new();
        let pid = 4000;
        let args = libvirt_cmdline("db", "pvsched-db");
        host.process(pid, &[4001, 4002, 4003], &args);
        let machine = "machine/qemu-1-db.libvirt-qemu";
        host.cgroups(
            pid,
            machine,
            &[("vcpu0", 4001), ("vcpu1", 4002), ("iothread1", 4003)],
        );
        let found = host.discover(host.owner());
        let d = found[0].as_ref().unwrap();
        assert_eq!(d.threads_from, ThreadRecord::Cgroups);
        assert_eq!(d.shm, PathBuf::from("/dev/shm/pvsched-db"));
        assert_eq!(
            d.cpus
                .iter()
                .map(|c| (c.cpu_index, c.thread_id))
                .collect::<Vec<_>>(),
            vec![(0, 4001), (1, 4002)]
        );
        assert_eq!(
            d.iothreads,
            vec![IoThreadInfo {
                id: "iothread1".into(),
                thread_id: 4003
            }]
        );
        // Delegated to someone else: not libvirt's record.
        assert!(refusal(&host.discover(host.owner() + 1))
            .detail
            .contains("owned by uid"));
        // A cgroup path that climbs out of the hierarchy.
        std::fs::write(
            host.dir.path().join(format!("proc/{pid}/cgroup")),
            "0::/../../etc/emulator\n",
        )
        .unwrap();
        assert!(refusal(&host.discover(host.owner()))
            .detail
            .contains("cgroup path"));
    }

    #[test]
    fn the_hybrid_cgroup_layout_is_read_under_unified() {
        // /proc/<pid>/cgroup of libvirt's QEMU on a host with cgroup v1
        // controllers and the v2 hierarchy at /sys/fs/cgroup/unified.
        let host = Host::new();
        let pid = 5336;
        host.process(
            pid,
            &[5343, 5344, 5341],
            &libvirt_cmdline("pvsched-fixture", "pvsched-fixture"),
        );
        let text = fixture("proc-cgroup-hybrid.txt");
        std::fs::write(host.dir.path().join(format!("proc/{pid}/cgroup")), &text).unwrap();
        let machine = host
            .dir
            .path()
            .join("sys/fs/cgroup/unified/machine/qemu-1-pvsched-fixture.libvirt-qemu");
        for (name, tid) in [
            ("vcpu0", 5343),
            ("vcpu1", 5344),
            ("iothread1", 5341),
            ("emulator", 5336),
        ] {
            std::fs::create_dir_all(machine.join(name)).unwrap();
            std::fs::write(
                machine.join(name).join("cgroup.threads"),
                format!("{tid}\n"),
            )
            .unwrap();
        }
        let threads = read_cgroup_threads(&host.fs(), pid, host.owner()).unwrap();
        assert_eq!(threads.vcpus, vec![(0, 5343), (1, 5344)]);
        assert_eq!(threads.iothreads, vec![(1, 5341)]);
        // Two threads in one vCPU's cgroup: not a record of one vCPU thread.
        std::fs::write(machine.join("vcpu1/cgroup.threads"), "5344\n5343\n").unwrap();
        let err = read_cgroup_threads(&host.fs(), pid, host.owner()).unwrap_err();
        assert!(err.detail.contains("one expected"), "{err}");
    }

    #[test]
    fn a_domain_whose_vcpus_libvirt_has_not_recorded_yet_is_found_later() {
        // libvirt writes the status file of a domain it has just started
        // (paused) before it has asked QEMU for the vCPU threads.
        let host = Host::new();
        running_domain(&host);
        let starting: String = fixture(RUNNING)
            .lines()
            .filter(|l| !l.trim_start().starts_with("<vcpu id="))
            .collect::<Vec<_>>()
            .join("\n");
        host.write_status("pvsched-fixture", &starting);
        assert!(host.discover(host.owner()).is_empty());
        host.write_status("pvsched-fixture", &fixture(RUNNING));
        assert!(host.discover(host.owner())[0].is_ok());
    }

    #[test]
    fn a_doorbell_shmem_is_served_only_on_the_daemons_own_server() {
        let doorbell = fixture(RUNNING).replace(
            "<model type='ivshmem-plain'/>",
            "<model type='ivshmem-doorbell'/><server path='/run/pvsched/ivshmem.sock'/><msi vectors='2'/>",
        );
        let status = parse_status(&doorbell).unwrap();
        assert_eq!(status.shmem[0].model, ShmemModel::Doorbell);
        let host = Host::new();
        let tids: Vec<i32> = status.vcpus.iter().map(|&(_, t)| t).collect();
        let mut args = libvirt_cmdline(&status.name, "unused");
        // libvirt's command line for the doorbell device: no memory backend.
        args.truncate(args.len() - 4);
        args.extend([
            "-chardev".into(),
            "socket,id=charshmem0,path=/run/pvsched/ivshmem.sock".into(),
            "-device".into(),
            r#"{"driver":"ivshmem-doorbell","id":"shmem0","chardev":"charshmem0","vectors":2}"#
                .into(),
        ]);
        host.process(status.pid, &tids, &args);
        host.write_status(&status.name, &doorbell);
        let fs = host.fs();
        let status_dir = host.status_dir();
        let with_server = |server: Option<&Path>| {
            discover(&LibvirtSource {
                fs: &fs,
                status_dir: &status_dir,
                shm_dir: Path::new("/dev/shm"),
                ivshmem_server: server,
                owner: host.owner(),
            })
        };
        let found = with_server(Some(Path::new("/run/pvsched/ivshmem.sock")));
        let d = found[0].as_ref().unwrap();
        assert!(d.doorbell);
        assert_eq!(
            d.shm,
            PathBuf::from(format!("memfd:pvsched-{}", status.pid))
        );
        assert!(with_server(Some(Path::new("/run/other.sock"))).is_empty());
        assert!(with_server(None).is_empty());
    }
}
