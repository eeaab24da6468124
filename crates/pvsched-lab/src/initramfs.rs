//! Building the guest's initramfs: a newc cpio archive written directly from Rust.
//!
//! Contents: static busybox with its applet links, cyclictest and chrt with the shared
//! libraries and loader `ldd` names, the optional guest module, a `/dev/console` node (so
//! init has a console before devtmpfs is mounted) and the generated `/init`.
//!
//! The archive is left uncompressed: the kernel unpacks it directly, which under TCG is
//! faster than inflating gzip in an emulated CPU, and it avoids a compression dependency.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::command::{progress, run_stdout};
use crate::error::{LabError, Result};
use crate::workload::{render_init, InitControl, ModuleLoad, Workload, GUEST_MODULE_PATH};

/// Where [`InitramfsSpec::kernel_modules`] are in the guest.
pub const KERNEL_MODULE_DIR: &str = "/lib/modules/kernel";

/// What to put in an initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// Statically linked busybox.
    pub busybox: PathBuf,
    /// Dynamically linked programs to copy with their libraries (cyclictest, chrt).
    pub programs: Vec<PathBuf>,
    /// The guest module; skipped with a notice when the file does not exist.
    pub module: Option<PathBuf>,
    /// Modules of the guest kernel, put in [`KERNEL_MODULE_DIR`] under their file names
    /// for the workload to load (init does not load them).
    pub kernel_modules: Vec<PathBuf>,
    /// Files put in the guest as they are: (host file, absolute guest path), parent
    /// directories created. For a module tree as a package or DKMS installs it.
    pub files: Vec<(PathBuf, String)>,
    /// Parameters for `insmod` of the module.
    pub module_params: String,
    /// What init runs.
    pub workload: Workload,
    /// Shell commands run after the workload, their output between diagnostics markers.
    pub diagnostics: Vec<String>,
    /// Whether init waits for the host before the workload and idles after it.
    pub control: InitControl,
}

/// A built initramfs.
#[derive(Debug, Clone, Serialize)]
pub struct Initramfs {
    /// The archive.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// Whether the guest module is inside.
    pub has_module: bool,
    /// The generated `/init`, for logs and debugging.
    pub init_script: String,
}

impl Initramfs {
    /// Writes the archive described by `spec` to `output` (through a temporary file, so a
    /// failed build never leaves a truncated archive at `output`).
    pub fn build(spec: &InitramfsSpec, output: &Path) -> Result<Self> {
        spec.workload.validate()?;
        let module = match &spec.module {
            Some(path) if path.is_file() => Some(path.as_path()),
            Some(path) => {
                progress(format_args!(
                    "guest module {} not found; building the initramfs without it",
                    path.display()
                ));
                None
            }
            None => None,
        };
        // Init reports "absent" when asked for a module that is not there, which keeps the
        // console honest about what ran.
        let module_load = spec.module.as_ref().map(|_| ModuleLoad {
            params: spec.module_params.clone(),
        });
        let init_script = render_init(
            &spec.workload,
            module_load.as_ref(),
            &spec.diagnostics,
            &spec.control,
        );

        let partial = output.with_extension("partial");
        let file = fs::File::create(&partial).map_err(LabError::io("create", &partial))?;
        let mut archive = CpioWriter::new(BufWriter::new(file));
        let written = fill_archive(&mut archive, spec, module, &init_script)
            .and_then(|()| archive.finish())
            .map_err(|error| match error {
                ArchiveError::Io(source) => LabError::Io {
                    op: "write",
                    path: partial.clone(),
                    source,
                },
                ArchiveError::Lab(error) => error,
            });
        let size_bytes = match written {
            Ok(size) => size,
            Err(error) => {
                // Best effort: the partial file is garbage and is replaced next time.
                let _ = fs::remove_file(&partial);
                return Err(error);
            }
        };
        fs::rename(&partial, output).map_err(LabError::io("rename to", output))?;
        progress(format_args!(
            "initramfs {} ({} KiB, workload {}{})",
            output.display(),
            size_bytes / 1024,
            spec.workload.name(),
            if module.is_some() {
                ", with module"
            } else {
                ""
            }
        ));
        Ok(Self {
            path: output.to_owned(),
            size_bytes,
            has_module: module.is_some(),
            init_script,
        })
    }
}

/// Errors while filling the archive: output I/O, or a lab error about an input.
enum ArchiveError {
    Io(std::io::Error),
    Lab(LabError),
}

impl From<std::io::Error> for ArchiveError {
    fn from(error: std::io::Error) -> Self {
        ArchiveError::Io(error)
    }
}

impl From<LabError> for ArchiveError {
    fn from(error: LabError) -> Self {
        ArchiveError::Lab(error)
    }
}

fn fill_archive<W: Write>(
    archive: &mut CpioWriter<W>,
    spec: &InitramfsSpec,
    module: Option<&Path>,
    init_script: &str,
) -> Result<(), ArchiveError> {
    for dir in ["dev", "proc", "sys", "tmp", "root", "etc", "run", "mnt"] {
        archive.dir(dir, 0o755)?;
    }
    archive.char_device("dev/console", 0o600, 5, 1)?;

    archive.file("bin/busybox", 0o755, &read(&spec.busybox)?)?;
    for applet in busybox_applets(&spec.busybox)? {
        if applet != "busybox" {
            archive.symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }

    let mut libraries = BTreeSet::new();
    for program in &spec.programs {
        let name = program
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or_else(|| {
                LabError::InvalidConfig(format!("{} has no file name", program.display()))
            })?;
        // Programs go to /usr/bin so that they win over busybox applets of the same name.
        archive.file(&format!("usr/bin/{name}"), 0o755, &read(program)?)?;
        libraries.extend(shared_libraries(program)?);
    }
    for library in &libraries {
        // Copy the content under the path the loader will look for, even when the host
        // path is a symlink (e.g. /lib64/ld-linux-x86-64.so.2).
        let guest_path = library.to_string_lossy();
        archive.file(guest_path.trim_start_matches('/'), 0o755, &read(library)?)?;
    }

    add_kernel_modules(archive, &spec.kernel_modules)?;
    for (source, guest_path) in &spec.files {
        let Some(relative) = guest_path.strip_prefix('/').filter(|p| !p.is_empty()) else {
            return Err(LabError::InvalidConfig(format!(
                "guest path {guest_path} of {} is not absolute",
                source.display()
            ))
            .into());
        };
        archive.file(relative, 0o644, &read(source)?)?;
    }
    if let Some(module) = module {
        archive.file(
            GUEST_MODULE_PATH.trim_start_matches('/'),
            0o644,
            &read(module)?,
        )?;
    }
    archive.file("init", 0o755, init_script.as_bytes())?;
    Ok(())
}

/// Puts `modules` in [`KERNEL_MODULE_DIR`] under their file names.
fn add_kernel_modules<W: Write>(
    archive: &mut CpioWriter<W>,
    modules: &[PathBuf],
) -> Result<(), ArchiveError> {
    for module in modules {
        let name = module
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or_else(|| {
                LabError::InvalidConfig(format!("{} has no file name", module.display()))
            })?;
        archive.file(
            &format!("{}/{name}", KERNEL_MODULE_DIR.trim_start_matches('/')),
            0o644,
            &read(module)?,
        )?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(LabError::io("read", path))
}

/// Applet names of a busybox binary (`busybox --list`).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let list = run_stdout(Command::new(busybox).arg("--list"))?;
    Ok(list
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .map(str::to_owned)
        .collect())
}

/// Shared libraries and loader of `binary`, as host paths.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    // ldd exits non-zero for static binaries; treat its text as the answer either way.
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| LabError::Spawn {
            program: "ldd".into(),
            source,
        })?;
    parse_ldd(binary, &String::from_utf8_lossy(&output.stdout))
}

/// Parses `ldd` output into the paths of the libraries and loader it names.
fn parse_ldd(binary: &Path, text: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if line.contains("not a dynamic executable") || line.contains("statically linked") {
            continue;
        }
        let target = match line.split_once("=>") {
            Some((_, right)) => right.trim(),
            None => line,
        };
        if target.starts_with("not found") {
            return Err(LabError::Ldd {
                binary: binary.to_owned(),
                line: line.to_owned(),
            });
        }
        let path = target.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        } else if !path.starts_with("linux-vdso") && !path.starts_with("linux-gate") {
            // The vDSO lives in the kernel; anything else without a path is unexpected.
            return Err(LabError::Ldd {
                binary: binary.to_owned(),
                line: line.to_owned(),
            });
        }
    }
    Ok(paths)
}

/// `S_IFMT` file type bits used in newc headers.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// A writer of SVR4 "newc" cpio archives (the format the kernel's initramfs unpacker
/// reads). Parent directories are created automatically; timestamps are zero so the same
/// inputs give the same bytes.
struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
    dirs: BTreeSet<String>,
    entries: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_inode: 1,
            dirs: BTreeSet::new(),
            entries: BTreeSet::new(),
        }
    }

    fn dir(&mut self, path: &str, permissions: u32) -> std::io::Result<()> {
        self.parents(path)?;
        if self.dirs.insert(path.to_owned()) {
            self.entry(path, S_IFDIR | permissions, 2, (0, 0), &[])?;
        }
        Ok(())
    }

    fn file(&mut self, path: &str, permissions: u32, data: &[u8]) -> std::io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFREG | permissions, 1, (0, 0), data)
    }

    fn symlink(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    fn char_device(
        &mut self,
        path: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> std::io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFCHR | permissions, 1, (major, minor), &[])
    }

    /// Writes the trailer and flushes; returns the archive size.
    fn finish(mut self) -> Result<u64, ArchiveError> {
        self.next_inode = 0;
        self.entry_raw("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.written)
    }

    fn parents(&mut self, path: &str) -> std::io::Result<()> {
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            if self.dirs.insert(prefix.clone()) {
                self.entry_raw(&prefix.clone(), S_IFDIR | 0o755, 2, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        links: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        // A duplicate (a library listed twice, an applet shadowing a file) keeps the first.
        if !self.entries.insert(path.to_owned()) {
            return Ok(());
        }
        self.entry_raw(path, mode, links, rdev, data)
    }

    fn entry_raw(
        &mut self,
        path: &str,
        mode: u32,
        links: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        let name_size = path.len() + 1; // including the NUL
        let data_size = u32::try_from(data.len()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "file over 4 GiB in initramfs",
            )
        })?;
        let inode = self.next_inode;
        self.next_inode += 1;
        let header = format!(
            "070701{inode:08x}{mode:08x}{uid:08x}{gid:08x}{links:08x}{mtime:08x}{data_size:08x}\
             {dev_major:08x}{dev_minor:08x}{rdev_major:08x}{rdev_minor:08x}{name_size:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dev_major = 0,
            dev_minor = 0,
            rdev_major = rdev.0,
            rdev_minor = rdev.1,
            check = 0,
        );
        self.write(header.as_bytes())?;
        self.write(path.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// newc aligns both the name and the data to 4 bytes.
    fn pad(&mut self) -> std::io::Result<()> {
        let padding = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LDD_CYCLICTEST: &str = "\tlinux-vdso.so.1 (0x00007fd888169000)
\tlibrt.so.1 => /lib/x86_64-linux-gnu/librt.so.1 (0x00007fd88813f000)
\tlibpthread.so.0 => /lib/x86_64-linux-gnu/libpthread.so.0 (0x00007fd88813a000)
\tlibnuma.so.1 => /lib/x86_64-linux-gnu/libnuma.so.1 (0x00007fd88812d000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fd887f4b000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007fd88816b000)
";

    #[test]
    fn ldd_output_yields_libraries_and_loader() {
        let paths = parse_ldd(Path::new("/usr/bin/cyclictest"), LDD_CYCLICTEST).expect("parse");
        let paths: Vec<&str> = paths.iter().filter_map(|p| p.to_str()).collect();
        assert_eq!(
            paths,
            [
                "/lib/x86_64-linux-gnu/librt.so.1",
                "/lib/x86_64-linux-gnu/libpthread.so.0",
                "/lib/x86_64-linux-gnu/libnuma.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
        );
    }

    #[test]
    fn ldd_static_and_missing() {
        let none =
            parse_ldd(Path::new("/bin/busybox"), "\tnot a dynamic executable\n").expect("parse");
        assert!(none.is_empty());
        assert!(parse_ldd(Path::new("/x"), "\tlibfoo.so.1 => not found\n").is_err());
    }

    /// One archive entry read back: name, mode, (rdev major, minor), data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Parses the archive back.
    fn entries(bytes: &[u8]) -> Vec<Entry> {
        let field = |at: usize, index: usize| {
            let start = at + 6 + index * 8;
            let text = std::str::from_utf8(&bytes[start..start + 8]).expect("ascii");
            u32::from_str_radix(text, 16).expect("hex") as usize
        };
        let align = |n: usize| (n + 3) & !3;
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701");
            let mode = field(at, 1) as u32;
            let size = field(at, 6);
            let rdev = (field(at, 9) as u32, field(at, 10) as u32);
            let name_size = field(at, 11);
            let name_start = at + 110;
            let name = String::from_utf8(bytes[name_start..name_start + name_size - 1].to_vec())
                .expect("name");
            let data_start = align(name_start + name_size);
            let data = bytes[data_start..data_start + size].to_vec();
            at = align(data_start + size);
            if name == "TRAILER!!!" {
                assert_eq!(at, bytes.len());
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn cpio_entries_parse_back() {
        let mut bytes = Vec::new();
        {
            let mut writer = CpioWriter::new(&mut bytes);
            writer.file("usr/bin/tool", 0o755, b"hello").expect("file");
            writer.symlink("bin/sh", "busybox").expect("symlink");
            writer
                .char_device("dev/console", 0o600, 5, 1)
                .expect("node");
            writer
                .file("usr/bin/tool", 0o755, b"second copy ignored")
                .expect("dup");
            assert!(writer.finish().is_ok());
        }
        let parsed = entries(&bytes);
        let names: Vec<&str> = parsed.iter().map(|(name, ..)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "usr",
                "usr/bin",
                "usr/bin/tool",
                "bin",
                "bin/sh",
                "dev",
                "dev/console"
            ]
        );
        assert_eq!(parsed[2].1, S_IFREG | 0o755);
        assert_eq!(parsed[2].3, b"hello");
        assert_eq!(parsed[4].1, S_IFLNK | 0o777);
        assert_eq!(parsed[4].3, b"busybox");
        assert_eq!(parsed[6].1, S_IFCHR | 0o600);
        assert_eq!(parsed[6].2, (5, 1));
    }

    #[test]
    fn kernel_modules_go_to_their_directory_under_their_names() {
        let dir =
            std::env::temp_dir().join(format!("pvsched-initramfs-kmod-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let module = dir.join("virtio_blk.ko");
        fs::write(&module, b"\x7fELF module").expect("module");
        let mut bytes = Vec::new();
        {
            let mut writer = CpioWriter::new(&mut bytes);
            assert!(add_kernel_modules(&mut writer, std::slice::from_ref(&module)).is_ok());
            let missing = [dir.join("absent.ko")];
            assert!(matches!(
                add_kernel_modules(&mut writer, &missing),
                Err(ArchiveError::Lab(LabError::Io { .. }))
            ));
            assert!(writer.finish().is_ok());
        }
        fs::remove_dir_all(&dir).expect("clean up");
        let parsed = entries(&bytes);
        let file = parsed
            .iter()
            .find(|(name, ..)| name == "lib/modules/kernel/virtio_blk.ko")
            .expect("the module in the archive");
        assert_eq!(file.1, S_IFREG | 0o644);
        assert_eq!(file.3, b"\x7fELF module");
    }
}
