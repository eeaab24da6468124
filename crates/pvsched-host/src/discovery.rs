//! Discovery of QEMU processes from their command lines: a
//! `memory-backend-file` whose `mem-path` is under the shared-memory
//! directory, and a QMP Unix socket. The same parser names the memory
//! backends of the guest's RAM (`-machine memory-backend=`, `-numa
//! node,memdev=`), which introspection maps when they are shared (see
//! [`crate::guestram`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::procfs::HostFs;

/// A QEMU process found by discovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveredVm {
    /// Process id.
    pub pid: i32,
    /// `-name` (guest=) or the shared file's name.
    pub name: String,
    /// QMP socket.
    pub qmp: PathBuf,
    /// Shared file; for a doorbell VM, the name of the memfd the ivshmem
    /// server made for it (`memfd:pvsched-<pid>`, no file on disk).
    pub shm: PathBuf,
    /// The VM's channel is an `ivshmem-doorbell` device served by the
    /// daemon's ivshmem server (its memory comes from the server's connection).
    #[serde(default)]
    pub doorbell: bool,
}

/// Splits a QEMU option value `a=b,c=d` (`,,` escapes a comma).
fn split_opts(value: &str) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (String::new(), p),
        })
        .collect()
}

fn opt<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The pieces of a QEMU command line discovery needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QemuArgs {
    /// `mem-path`s of `memory-backend-file` objects.
    pub mem_paths: Vec<PathBuf>,
    /// QMP Unix sockets (`-qmp unix:`, or `-mon mode=control` on a socket chardev).
    pub qmp_sockets: Vec<PathBuf>,
    /// `-name`.
    pub name: Option<String>,
    /// `ivshmem-doorbell` devices on a chardev socket.
    pub doorbells: Vec<DoorbellDevice>,
    /// Every `-object memory-backend-{memfd,file,ram}`, in command-line order.
    pub memory_backends: Vec<MemoryBackend>,
    /// Ids of the backends that are the guest's RAM: `-machine
    /// memory-backend=` and each `-numa node,memdev=`, in order, each once.
    pub ram_memdevs: Vec<String>,
    /// A control monitor on a socket chardev passed as a file descriptor
    /// (`-chardev socket,id=charmonitor,fd=N` and `-mon
    /// chardev=charmonitor,mode=control`): how libvirt gives QEMU its
    /// monitor, which it keeps to itself.
    pub fd_monitor: bool,
    /// An argument names a file under libvirt's per-domain directory
    /// (`/var/lib/libvirt/qemu/domain-...`).
    pub libvirt_domain_dir: bool,
}

impl QemuArgs {
    /// The memory backends of the guest's RAM (named by `-machine
    /// memory-backend=` or `-numa node,memdev=` and defined by an `-object`).
    pub fn guest_ram_backends(&self) -> Vec<&MemoryBackend> {
        self.ram_memdevs
            .iter()
            .filter_map(|id| self.memory_backends.iter().find(|b| &b.id == id))
            .collect()
    }

    /// Whether the command line is one libvirt wrote: a `-name` and the
    /// monitor libvirt keeps (an fd) or its per-domain directory. Only a
    /// hint of where to look: [`crate::libvirt`] believes libvirt's own
    /// records, checked against the process.
    pub fn looks_like_libvirt(&self) -> bool {
        self.name.is_some() && (self.fd_monitor || self.libvirt_domain_dir)
    }
}

/// libvirt's per-domain directory, named in the arguments of its QEMU processes.
pub const LIBVIRT_DOMAIN_DIR: &str = "/var/lib/libvirt/qemu/domain-";

/// What backs a memory backend object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// `memory-backend-memfd`: an anonymous memory file (`/memfd:...` in the maps).
    Memfd,
    /// `memory-backend-file` at `mem-path`.
    File {
        /// `mem-path`.
        mem_path: PathBuf,
    },
    /// `memory-backend-ram`: anonymous memory, never shared with another process.
    Ram,
}

/// A `-object memory-backend-*` of a QEMU command line, as the command line
/// says (the process's own description: checked against its mappings before use).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    /// `id`.
    pub id: String,
    /// The object type.
    pub kind: BackendKind,
    /// `size` in bytes (`None`: missing or not a size).
    pub size: Option<u64>,
    /// `share` (QEMU's default: on for memfd, off otherwise): whether QEMU
    /// maps it `MAP_SHARED`, so that another process mapping the same file
    /// sees the guest's writes.
    pub share: bool,
}

impl MemoryBackend {
    /// A backend from an `-object` type and its properties (`None` when the
    /// type is not a memory backend or it has no id).
    fn from_props(ty: &str, prop: &dyn Fn(&str) -> Option<String>) -> Option<Self> {
        let kind = match ty {
            "memory-backend-memfd" => BackendKind::Memfd,
            "memory-backend-file" => BackendKind::File {
                mem_path: PathBuf::from(prop("mem-path")?),
            },
            "memory-backend-ram" => BackendKind::Ram,
            _ => return None,
        };
        let share = match prop("share") {
            Some(v) => parse_bool(&v)?,
            None => kind == BackendKind::Memfd,
        };
        Some(MemoryBackend {
            id: prop("id")?,
            size: prop("size").and_then(|s| parse_size(&s)),
            kind,
            share,
        })
    }
}

/// A QEMU boolean property value (`on`/`off`, `yes`/`no`, `true`/`false`).
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// A QEMU size (`1073741824`, `0x40000000`, `1G`, `1.5G`, `512M`, `4096K`,
/// `100B`; suffixes K M G T P E in either case, powers of 1024); `None` when
/// it is not one or does not fit in 64 bits.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (number, None),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let mut bytes = whole.checked_mul(1u64 << shift)?;
    if let Some(f) = fraction {
        // As QEMU: a fraction only with a unit, at most a few digits.
        if shift == 0 || f.is_empty() || f.len() > 6 || !f.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: u64 = f.parse().ok()?;
        let scale = 10u64.pow(f.len() as u32);
        let extra = u128::from(digits) * (1u128 << shift) / u128::from(scale);
        bytes = bytes.checked_add(u64::try_from(extra).ok()?)?;
    }
    Some(bytes)
}

fn push_once(list: &mut Vec<String>, id: &str) {
    if !id.is_empty() && !list.iter().any(|x| x == id) {
        list.push(id.to_owned());
    }
}

/// An `ivshmem-doorbell` device and the socket of its chardev (the ivshmem
/// server it connects to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoorbellDevice {
    /// The chardev's socket path.
    pub socket: PathBuf,
    /// `vectors=` (QEMU's default: 1).
    pub vectors: u32,
}

/// QEMU's options that take no argument (`qemu-system-x86_64 -help`, 7.2
/// and later, with some removed since); every other option consumes the next
/// word.
const NO_ARGUMENT_OPTIONS: &[&str] = &[
    "S",
    "alt-grab",
    "audio-help",
    "ctrl-grab",
    "curses",
    "daemonize",
    "enable-kvm",
    "enable-sync-profile",
    "full-screen",
    "h",
    "help",
    "mem-prealloc",
    "no-acpi",
    "no-fd-bootchk",
    "no-frame",
    "no-hpet",
    "no-kvm",
    "no-quit",
    "no-reboot",
    "no-shutdown",
    "no-user-config",
    "nodefaults",
    "nographic",
    "only-migratable",
    "portrait",
    "preconfig",
    "s",
    "sdl",
    "singlestep",
    "snapshot",
    "usb",
    "version",
    "win2k-hack",
    "xen-attach",
    "xen-domid-restrict",
];

/// The option an argument names, without its one or two leading dashes;
/// `None` for a positional argument (QEMU takes it for a disk image).
pub fn option_name(arg: &str) -> Option<&str> {
    let flag = arg.strip_prefix('-')?;
    Some(flag.strip_prefix('-').unwrap_or(flag))
}

/// Whether QEMU reads the word after this option as its argument.
pub fn takes_argument(option: &str) -> bool {
    !NO_ARGUMENT_OPTIONS.contains(&option)
}

/// Parses a command line; `None` if it is not QEMU.
pub fn parse_qemu_cmdline(args: &[String]) -> Option<QemuArgs> {
    let argv0 = Path::new(args.first()?).file_name()?.to_str()?;
    if !argv0.starts_with("qemu-system") && argv0 != "qemu-kvm" {
        return None;
    }
    let mut out = QemuArgs::default();
    let mut chardevs: Vec<(String, PathBuf)> = Vec::new();
    // Ids of socket chardevs given as a descriptor (`fd=`).
    let mut fd_chardevs: Vec<String> = Vec::new();
    let mut control_mons: Vec<String> = Vec::new();
    // (chardev id, vectors) of each ivshmem-doorbell device.
    let mut doorbells: Vec<(String, u32)> = Vec::new();
    let mut i = 1;
    out.libvirt_domain_dir = args[1..].iter().any(|a| a.contains(LIBVIRT_DOMAIN_DIR));
    while i < args.len() {
        // Only `-opt` and `--opt` are options; an argument without a dash is
        // positional (QEMU takes it for a disk image) and never consumes the next.
        let Some(flag) = option_name(&args[i]) else {
            i += 1;
            continue;
        };
        let value = args.get(i + 1).map(String::as_str).unwrap_or("");
        match flag {
            "object" => {
                if value.starts_with('{') {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(value) {
                        let ty = v.get("qom-type").and_then(|t| t.as_str()).unwrap_or("");
                        if ty == "memory-backend-file" {
                            if let Some(p) = v.get("mem-path").and_then(|p| p.as_str()) {
                                out.mem_paths.push(PathBuf::from(p));
                            }
                        }
                        let prop = |k: &str| match v.get(k)? {
                            serde_json::Value::String(s) => Some(s.clone()),
                            serde_json::Value::Bool(b) => {
                                Some(if *b { "on" } else { "off" }.into())
                            }
                            serde_json::Value::Number(n) => Some(n.to_string()),
                            _ => None,
                        };
                        out.memory_backends
                            .extend(MemoryBackend::from_props(ty, &prop));
                    }
                } else {
                    let o = split_opts(value);
                    let ty = o.first().map(|(k, v)| {
                        if k.is_empty() || k == "qom-type" {
                            v.as_str()
                        } else {
                            ""
                        }
                    });
                    if ty == Some("memory-backend-file") {
                        if let Some(p) = opt(&o, "mem-path") {
                            out.mem_paths.push(PathBuf::from(p));
                        }
                    }
                    let prop = |k: &str| opt(&o, k).map(str::to_owned);
                    out.memory_backends
                        .extend(MemoryBackend::from_props(ty.unwrap_or(""), &prop));
                }
            }
            "machine" | "M" => {
                if let Some(id) = opt(&split_opts(value), "memory-backend") {
                    push_once(&mut out.ram_memdevs, id);
                }
            }
            "numa" => {
                let o = split_opts(value);
                let node = o
                    .first()
                    .is_some_and(|(k, v)| (k.is_empty() || k == "type") && v == "node");
                if node {
                    if let Some(id) = opt(&o, "memdev") {
                        push_once(&mut out.ram_memdevs, id);
                    }
                }
            }
            "qmp" => {
                // The first element is `unix:<path>`, not a key: a `=` in
                // the path belongs to the path.
                let first = match split_opts(value).into_iter().next() {
                    Some((k, v)) if !k.is_empty() => format!("{k}={v}"),
                    Some((_, v)) => v,
                    None => String::new(),
                };
                if let Some(path) = first.strip_prefix("unix:") {
                    out.qmp_sockets.push(PathBuf::from(path));
                }
            }
            "chardev" => {
                let o = split_opts(value);
                if o.first().map(|(_, v)| v.as_str()) == Some("socket") {
                    if let (Some(id), Some(path)) = (opt(&o, "id"), opt(&o, "path")) {
                        chardevs.push((id.to_owned(), PathBuf::from(path)));
                    }
                    if let (Some(id), Some(_)) = (opt(&o, "id"), opt(&o, "fd")) {
                        fd_chardevs.push(id.to_owned());
                    }
                }
            }
            "device" => {
                if let Some(d) = parse_doorbell_device(value) {
                    doorbells.push(d);
                }
            }
            "mon" => {
                let o = split_opts(value);
                if opt(&o, "mode") == Some("control") {
                    if let Some(c) = opt(&o, "chardev") {
                        control_mons.push(c.to_owned());
                    }
                }
            }
            "name" => {
                let o = split_opts(value);
                out.name = opt(&o, "guest")
                    .or_else(|| {
                        o.first()
                            .filter(|(k, _)| k.is_empty())
                            .map(|(_, v)| v.as_str())
                    })
                    .map(str::to_owned);
            }
            _ => {}
        }
        // As QEMU: an option that takes an argument consumes the next word
        // whatever it looks like (`-device -qmp` is a device named `-qmp`).
        i += if takes_argument(flag) { 2 } else { 1 };
    }
    for (chardev, vectors) in doorbells {
        if let Some((_, path)) = chardevs.iter().find(|(id, _)| *id == chardev) {
            out.doorbells.push(DoorbellDevice {
                socket: path.clone(),
                vectors,
            });
        }
    }
    for mon in control_mons {
        if fd_chardevs.contains(&mon) {
            out.fd_monitor = true;
        }
        if let Some((_, path)) = chardevs.iter().find(|(id, _)| *id == mon) {
            out.qmp_sockets.push(path.clone());
        }
    }
    Some(out)
}

/// `(chardev, vectors)` of an `ivshmem-doorbell` `-device` value, in the
/// key=value or the JSON form.
fn parse_doorbell_device(value: &str) -> Option<(String, u32)> {
    const DRIVER: &str = "ivshmem-doorbell";
    if value.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(value).ok()?;
        if v.get("driver")?.as_str()? != DRIVER {
            return None;
        }
        let chardev = v.get("chardev")?.as_str()?.to_owned();
        let vectors = match v.get("vectors") {
            None => 1,
            Some(n) => u32::try_from(n.as_u64()?).ok()?,
        };
        return Some((chardev, vectors));
    }
    let o = split_opts(value);
    let driver = o.first().map(|(k, v)| {
        if k.is_empty() || k == "driver" {
            v.as_str()
        } else {
            ""
        }
    });
    if driver != Some(DRIVER) {
        return None;
    }
    let chardev = opt(&o, "chardev")?.to_owned();
    let vectors = match opt(&o, "vectors") {
        None => 1,
        Some(n) => n.parse().ok()?,
    };
    Some((chardev, vectors))
}

/// `p` with `.` and `..` resolved lexically (no file-system access).
pub(crate) fn lexical_normal(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Whether `path` is inside `dir` (lexically, after normalising `.`/`..`).
pub fn is_under(path: &Path, dir: &Path) -> bool {
    let (p, d) = (lexical_normal(path), lexical_normal(dir));
    p != d && p.starts_with(&d)
}

/// Scans the proc root for QEMU processes that share a file under `shm_dir`
/// and have a QMP socket. Processes that vanish mid-scan are skipped.
pub fn discover(fs: &HostFs, shm_dir: &Path) -> Vec<DiscoveredVm> {
    discover_with(fs, shm_dir, None)
}

/// [`discover`], and with `ivshmem_server` also the QEMU processes without a
/// shared file under `shm_dir` whose `ivshmem-doorbell` device connects to
/// that server socket (their memory is the server's memfd).
pub fn discover_with(
    fs: &HostFs,
    shm_dir: &Path,
    ivshmem_server: Option<&Path>,
) -> Vec<DiscoveredVm> {
    let mut out = Vec::new();
    let Ok(pids) = fs.pids() else {
        return out;
    };
    for pid in pids {
        let Ok(cmdline) = fs.cmdline(pid) else {
            continue;
        };
        let Some(args) = parse_qemu_cmdline(&cmdline) else {
            continue;
        };
        let mut shms: Vec<&PathBuf> = args
            .mem_paths
            .iter()
            .filter(|p| is_under(p, shm_dir))
            .collect();
        // Prefer a file named like ours when the VM shares several.
        shms.sort_by_key(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pvsched"))
        });
        let Some(qmp) = args.qmp_sockets.first() else {
            continue;
        };
        let (shm, doorbell) = match shms.first() {
            Some(shm) => ((*shm).clone(), false),
            None => {
                let served = ivshmem_server.is_some_and(|server| {
                    args.doorbells
                        .iter()
                        .any(|d| crate::ivshmem::same_path(&d.socket, server))
                });
                if !served {
                    continue;
                }
                (PathBuf::from(format!("memfd:pvsched-{pid}")), true)
            }
        };
        let name = args.name.clone().unwrap_or_else(|| {
            if doorbell {
                return format!("pid{pid}");
            }
            shm.file_name()
                .and_then(|n| n.to_str())
                .map(|n| n.trim_start_matches("pvsched-").to_owned())
                .unwrap_or_else(|| format!("pid{pid}"))
        });
        out.push(DiscoveredVm {
            pid,
            name,
            qmp: qmp.clone(),
            shm,
            doorbell,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn an_argument_without_a_dash_is_positional_and_consumes_nothing() {
        // Found by fuzzing: a bare `device` (a disk image named so) was taken for
        // `-device` and swallowed the `-name` after it.
        let a = parse_qemu_cmdline(&args(&[
            "qemu-kvm",
            "device",
            "-name",
            "guest=vm1,debug-threads=on",
            "qmp",
            "--qmp",
            "unix:/run/vm1.qmp,server=on,wait=off",
        ]))
        .unwrap();
        assert_eq!(a.name.as_deref(), Some("vm1"));
        assert_eq!(a.qmp_sockets, vec![PathBuf::from("/run/vm1.qmp")]);
    }

    #[test]
    fn an_option_with_an_argument_takes_the_next_word_whatever_it_is() {
        // Found by fuzzing: QEMU reads `-device -qmp` as a device named
        // `-qmp`, so the socket after it is not a monitor; options without an
        // argument consume nothing.
        let a = parse_qemu_cmdline(&args(&[
            "qemu-system-x86_64",
            "-device",
            "-qmp",
            "unix:/tmp/not-a-monitor,server=on,wait=off",
            "-nographic",
            "-qmp",
            "unix:/run/vm1.qmp,server=on,wait=off",
            "-display",
            "-name",
            "guest=other",
            "--snapshot",
            "-name",
            "guest=vm1",
        ]))
        .unwrap();
        assert_eq!(a.qmp_sockets, vec![PathBuf::from("/run/vm1.qmp")]);
        assert_eq!(a.name.as_deref(), Some("vm1"));
        assert!(takes_argument("device") && !takes_argument("nographic"));
        assert_eq!(option_name("--snapshot"), Some("snapshot"));
        assert_eq!(option_name("snapshot"), None);
    }

    #[test]
    fn key_value_and_json_forms_are_understood() {
        let a = parse_qemu_cmdline(&args(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=db1,debug-threads=on",
            "-object",
            "memory-backend-file,id=ram,mem-path=/dev/hugepages/x,size=1G",
            "-object",
            "memory-backend-file,id=pvsched,mem-path=/dev/shm/pvsched-db1,size=1M,share=on",
            "-qmp",
            "unix:/run/db1.qmp,server=on,wait=off",
        ]))
        .unwrap();
        assert_eq!(a.name.as_deref(), Some("db1"));
        assert_eq!(a.mem_paths.len(), 2);
        assert_eq!(a.qmp_sockets, vec![PathBuf::from("/run/db1.qmp")]);

        let b = parse_qemu_cmdline(&args(&[
            "qemu-system-x86_64",
            "-name",
            "web",
            "-object",
            r#"{"qom-type":"memory-backend-file","id":"p","mem-path":"/dev/shm/p.shm","size":1048576,"share":true}"#,
            "-chardev",
            "socket,id=mon0,path=/run/web.qmp,server=on,wait=off",
            "-mon",
            "chardev=mon0,mode=control",
        ]))
        .unwrap();
        assert_eq!(b.name.as_deref(), Some("web"));
        assert_eq!(b.mem_paths, vec![PathBuf::from("/dev/shm/p.shm")]);
        assert_eq!(b.qmp_sockets, vec![PathBuf::from("/run/web.qmp")]);

        assert!(parse_qemu_cmdline(&args(&["/bin/bash", "-c", "qemu"])).is_none());
    }

    #[test]
    fn the_guest_ram_backends_are_those_the_machine_and_numa_nodes_name() {
        let a = parse_qemu_cmdline(&args(&[
            "qemu-system-x86_64",
            "-machine",
            "q35,accel=kvm,memory-backend=ram",
            "-object",
            "memory-backend-memfd,id=ram,size=3G",
            "-object",
            "memory-backend-file,id=pvsched,mem-path=/dev/shm/pvsched-a,size=1M,share=on",
            "-device",
            "ivshmem-plain,memdev=pvsched",
        ]))
        .unwrap();
        assert_eq!(a.ram_memdevs, vec!["ram".to_owned()]);
        assert_eq!(
            a.guest_ram_backends(),
            vec![&MemoryBackend {
                id: "ram".into(),
                kind: BackendKind::Memfd,
                size: Some(3 << 30),
                // QEMU's default for memfd.
                share: true,
            }]
        );
        // The ivshmem channel is a memory backend too, but not guest RAM.
        assert_eq!(a.memory_backends.len(), 2);
        assert_eq!(a.mem_paths, vec![PathBuf::from("/dev/shm/pvsched-a")]);

        let numa = parse_qemu_cmdline(&args(&[
            "qemu-system-x86_64",
            "-M",
            "pc",
            "-object",
            r#"{"qom-type":"memory-backend-file","id":"m0","mem-path":"/dev/hugepages/vm","size":1073741824,"share":true}"#,
            "-object",
            "memory-backend-memfd,id=m1,size=2048M,share=off",
            "-object",
            "memory-backend-ram,id=m2,size=1G",
            "-numa",
            "node,memdev=m0,cpus=0",
            "-numa",
            "node,nodeid=1,memdev=m1",
            "-numa",
            "node,memdev=m2",
            "-numa",
            "dist,src=0,dst=1,val=20",
            "-numa",
            "node,memdev=undefined",
        ]))
        .unwrap();
        assert_eq!(numa.ram_memdevs, vec!["m0", "m1", "m2", "undefined"]);
        let ram = numa.guest_ram_backends();
        assert_eq!(ram.len(), 3, "an undefined memdev names nothing");
        assert_eq!(
            ram[0].kind,
            BackendKind::File {
                mem_path: "/dev/hugepages/vm".into()
            }
        );
        assert_eq!((ram[0].size, ram[0].share), (Some(1 << 30), true));
        assert_eq!((ram[1].size, ram[1].share), (Some(2 << 30), false));
        assert_eq!((&ram[2].kind, ram[2].share), (&BackendKind::Ram, false));

        // Legacy -m: QEMU's own anonymous pc.ram, no backend named.
        let legacy = parse_qemu_cmdline(&args(&["qemu-system-x86_64", "-m", "3G"])).unwrap();
        assert!(legacy.guest_ram_backends().is_empty());
    }

    #[test]
    fn qemu_sizes_parse_as_qemu_reads_them() {
        for (text, bytes) in [
            ("1073741824", Some(1u64 << 30)),
            ("0x40000000", Some(1 << 30)),
            ("1G", Some(1 << 30)),
            ("3g", Some(3 << 30)),
            ("512M", Some(512 << 20)),
            ("4096k", Some(4096 << 10)),
            ("1.5G", Some(3 << 29)),
            ("100B", Some(100)),
            ("16E", None),
            ("1.5", None),
            ("G", None),
            ("-1G", None),
            ("1GB", None),
            ("", None),
            ("0x", None),
        ] {
            assert_eq!(parse_size(text), bytes, "{text:?}");
        }
    }

    #[test]
    fn discovery_on_a_fixture_proc_tree_keeps_only_vms_with_shm_and_qmp() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        let write = |pid: i32, a: &[&str]| {
            let d = proc_root.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cmdline"), a.join("\0") + "\0").unwrap();
        };
        write(
            100,
            &[
                "qemu-system-x86_64",
                "-object",
                "memory-backend-file,id=p,mem-path=/dev/shm/pvsched-a,size=1M,share=on",
                "-qmp",
                "unix:/tmp/a.qmp,server=on",
            ],
        );
        // No QMP socket.
        write(
            101,
            &[
                "qemu-system-x86_64",
                "-object",
                "memory-backend-file,id=p,mem-path=/dev/shm/pvsched-b,size=1M",
            ],
        );
        // Shared file elsewhere, and an escape attempt.
        write(
            102,
            &[
                "qemu-system-x86_64",
                "-object",
                "memory-backend-file,id=p,mem-path=/dev/shm/../etc/x,size=1M",
                "-qmp",
                "unix:/tmp/c.qmp",
            ],
        );
        write(103, &["sleep", "100"]);
        std::fs::create_dir_all(proc_root.join("self")).unwrap();
        let fs = HostFs::new(&proc_root, dir.path().join("sys"));
        let found = discover(&fs, Path::new("/dev/shm"));
        assert_eq!(
            found,
            vec![DiscoveredVm {
                pid: 100,
                name: "a".into(),
                qmp: "/tmp/a.qmp".into(),
                shm: "/dev/shm/pvsched-a".into(),
                doorbell: false,
            }]
        );
    }

    #[test]
    fn doorbell_devices_are_paired_with_their_chardev_socket() {
        let a = parse_qemu_cmdline(&args(&[
            "qemu-system-x86_64",
            "-chardev",
            "socket,path=/run/pvsched/ivshmem.sock,id=iv",
            "-device",
            "ivshmem-doorbell,chardev=iv,vectors=2",
            "-chardev",
            "socket,id=other,path=/run/other.sock",
            "-device",
            r#"{"driver":"ivshmem-doorbell","id":"shmem0","chardev":"other"}"#,
            "-device",
            "ivshmem-doorbell,chardev=missing",
            "-device",
            "virtio-net-pci,chardev=iv",
        ]))
        .unwrap();
        assert_eq!(
            a.doorbells,
            vec![
                DoorbellDevice {
                    socket: "/run/pvsched/ivshmem.sock".into(),
                    vectors: 2
                },
                DoorbellDevice {
                    socket: "/run/other.sock".into(),
                    vectors: 1
                },
            ]
        );
        assert_eq!(
            parse_doorbell_device(r#"{"driver":"ivshmem-doorbell","chardev":"c","vectors":4}"#),
            Some(("c".into(), 4))
        );
        assert_eq!(
            parse_doorbell_device("driver=ivshmem-doorbell,chardev=c"),
            Some(("c".into(), 1))
        );
        assert_eq!(
            parse_doorbell_device("ivshmem-doorbell,chardev=c,vectors=x"),
            None
        );
        assert_eq!(parse_doorbell_device("ivshmem-plain,memdev=m"), None);
    }

    #[test]
    fn discovery_finds_doorbell_vms_of_the_server_only() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        let write = |pid: i32, a: &[&str]| {
            let d = proc_root.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cmdline"), a.join("\0") + "\0").unwrap();
        };
        let doorbell = |sock: &'static str, qmp: &'static str| {
            vec![
                "qemu-system-x86_64",
                "-chardev",
                sock,
                "-device",
                "ivshmem-doorbell,chardev=iv,vectors=2",
                "-qmp",
                qmp,
            ]
        };
        write(
            200,
            &doorbell(
                "socket,path=/run/pvsched/ivshmem.sock,id=iv",
                "unix:/tmp/d.qmp",
            ),
        );
        write(
            201,
            &doorbell("socket,path=/run/elsewhere.sock,id=iv", "unix:/tmp/e.qmp"),
        );
        std::fs::create_dir_all(proc_root.join("self")).unwrap();
        let fs = HostFs::new(&proc_root, dir.path().join("sys"));
        assert!(discover(&fs, Path::new("/dev/shm")).is_empty());
        let found = discover_with(
            &fs,
            Path::new("/dev/shm"),
            Some(Path::new("/run/pvsched/ivshmem.sock")),
        );
        assert_eq!(
            found,
            vec![DiscoveredVm {
                pid: 200,
                name: "pid200".into(),
                qmp: "/tmp/d.qmp".into(),
                shm: "memfd:pvsched-200".into(),
                doorbell: true,
            }]
        );
    }
}
