//! Discovery of QEMU processes from their command lines: a
//! `memory-backend-file` whose `mem-path` is under the shared-memory
//! directory, and a QMP Unix socket.

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

/// Parses a command line; `None` if it is not QEMU.
pub fn parse_qemu_cmdline(args: &[String]) -> Option<QemuArgs> {
    let argv0 = Path::new(args.first()?).file_name()?.to_str()?;
    if !argv0.starts_with("qemu-system") && argv0 != "qemu-kvm" {
        return None;
    }
    let mut out = QemuArgs::default();
    let mut chardevs: Vec<(String, PathBuf)> = Vec::new();
    let mut control_mons: Vec<String> = Vec::new();
    // (chardev id, vectors) of each ivshmem-doorbell device.
    let mut doorbells: Vec<(String, u32)> = Vec::new();
    let mut i = 1;
    while i < args.len() {
        // Only `-opt` and `--opt` are options; an argument without a dash is
        // positional (QEMU takes it for a disk image) and never consumes the next.
        let Some(flag) = args[i].strip_prefix('-') else {
            i += 1;
            continue;
        };
        let flag = flag.strip_prefix('-').unwrap_or(flag);
        let value = args.get(i + 1).map(String::as_str).unwrap_or("");
        match flag {
            "object" => {
                if value.starts_with('{') {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(value) {
                        if v.get("qom-type").and_then(|t| t.as_str()) == Some("memory-backend-file")
                        {
                            if let Some(p) = v.get("mem-path").and_then(|p| p.as_str()) {
                                out.mem_paths.push(PathBuf::from(p));
                            }
                        }
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
                }
                i += 2;
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
                i += 2;
            }
            "chardev" => {
                let o = split_opts(value);
                if o.first().map(|(_, v)| v.as_str()) == Some("socket") {
                    if let (Some(id), Some(path)) = (opt(&o, "id"), opt(&o, "path")) {
                        chardevs.push((id.to_owned(), PathBuf::from(path)));
                    }
                }
                i += 2;
            }
            "device" => {
                if let Some(d) = parse_doorbell_device(value) {
                    doorbells.push(d);
                }
                i += 2;
            }
            "mon" => {
                let o = split_opts(value);
                if opt(&o, "mode") == Some("control") {
                    if let Some(c) = opt(&o, "chardev") {
                        control_mons.push(c.to_owned());
                    }
                }
                i += 2;
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
                i += 2;
            }
            _ => i += 1,
        }
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
