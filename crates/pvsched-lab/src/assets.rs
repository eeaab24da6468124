//! Host-side assets for the lab: the guest kernel image and the host tools.
//!
//! The guest runs the same Debian cloud kernel whose headers are installed on the host, so
//! the guest module built against those headers loads in the guest without a kernel build.
//! The image is fetched once with `apt-get download` and cached.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::command::{progress, run};
use crate::error::{LabError, Result};

/// Where downloaded kernels are kept unless the caller says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/pvsched/lab";

/// The meta-package that pulls in the headers of the current cloud kernel.
const CLOUD_HEADERS_PACKAGE: &str = "linux-headers-cloud-amd64";

/// A host tool the lab needs: the program to look for and the Debian package that ships it.
struct HostTool {
    program: &'static str,
    package: &'static str,
}

const HOST_TOOLS: [HostTool; 6] = [
    HostTool {
        program: "busybox",
        package: "busybox-static",
    },
    HostTool {
        program: "cyclictest",
        package: "rt-tests",
    },
    HostTool {
        program: "stress-ng",
        package: "stress-ng",
    },
    HostTool {
        program: "qemu-system-x86_64",
        package: "qemu-system-x86",
    },
    // busybox has no `chrt`; util-linux's is dynamically linked against libc only.
    HostTool {
        program: "chrt",
        package: "util-linux",
    },
    // The overcommit experiment's benchmark; rt-tests ships it beside cyclictest.
    HostTool {
        program: "hackbench",
        package: "rt-tests",
    },
];

/// Options for [`LabAssets::prepare`].
#[derive(Debug, Clone)]
pub struct AssetOptions {
    /// Cache directory for kernel images.
    pub cache_dir: PathBuf,
    /// Where `linux-headers-*` directories live (normally `/usr/src`).
    pub headers_root: PathBuf,
    /// Install missing Debian packages with `apt-get`. When false, missing packages are an error.
    pub install_missing: bool,
}

impl Default for AssetOptions {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            headers_root: PathBuf::from("/usr/src"),
            install_missing: true,
        }
    }
}

/// Everything on the host that the lab uses to build and boot guests.
#[derive(Debug, Clone, Serialize)]
pub struct LabAssets {
    /// The cache directory in use.
    pub cache_dir: PathBuf,
    /// Guest kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// The guest kernel image (`vmlinuz`).
    pub kernel_image: PathBuf,
    /// Kernel headers for building the guest module against `kernel_release`.
    pub kernel_headers: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// cyclictest (dynamically linked; the initramfs builder copies its libraries).
    pub cyclictest: PathBuf,
    /// stress-ng, for loading the host.
    pub stress_ng: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// util-linux `chrt`, copied into the guest to start the rogue RT task.
    pub chrt: PathBuf,
    /// rt-tests `hackbench` (dynamically linked), the overcommit experiment's benchmark.
    pub hackbench: PathBuf,
}

impl LabAssets {
    /// Checks and, where allowed, installs the host tools, then makes sure the cloud kernel
    /// image matching the installed cloud headers is in the cache. Progress goes to stderr.
    pub fn prepare(options: &AssetOptions) -> Result<Self> {
        let tools = ensure_host_tools(options.install_missing)?;
        let kernel_release = ensure_cloud_headers(&options.headers_root, options.install_missing)?;
        let kernel_headers = options
            .headers_root
            .join(format!("linux-headers-{kernel_release}"));
        let kernel_image = ensure_kernel_image(&options.cache_dir, &kernel_release)?;
        let [busybox, cyclictest, stress_ng, qemu, chrt, hackbench] = tools;
        Ok(Self {
            cache_dir: options.cache_dir.clone(),
            kernel_release,
            kernel_image,
            kernel_headers,
            busybox,
            cyclictest,
            stress_ng,
            qemu,
            chrt,
            hackbench,
        })
    }
}

/// Finds every host tool, installing the missing ones on Debian when allowed. Returns their
/// paths in the order of [`HOST_TOOLS`].
fn ensure_host_tools(install_missing: bool) -> Result<[PathBuf; 6]> {
    let mut missing: Vec<String> = Vec::new();
    for tool in HOST_TOOLS.iter().filter(|tool| !tool_usable(tool)) {
        // One package can ship two tools (rt-tests: cyclictest and hackbench).
        if !missing.iter().any(|package| package == tool.package) {
            missing.push(tool.package.to_owned());
        }
    }
    if !missing.is_empty() {
        if !is_debian() {
            return Err(LabError::NotDebian { missing });
        }
        if !install_missing {
            return Err(LabError::MissingPackages { missing });
        }
        apt_install(&missing)?;
    }
    let mut found = Vec::with_capacity(HOST_TOOLS.len());
    for tool in &HOST_TOOLS {
        match find_in_path(tool.program).filter(|_| tool_usable(tool)) {
            Some(path) => found.push(path),
            None => {
                return Err(LabError::MissingPackages {
                    missing: vec![tool.package.to_owned()],
                })
            }
        }
    }
    found
        .try_into()
        .map_err(|_| LabError::InvalidConfig("host tool table changed size".into()))
}

/// A tool is usable when it is on the PATH; busybox must also be static, since it runs in a
/// guest that has no shared libraries of its own.
fn tool_usable(tool: &HostTool) -> bool {
    match find_in_path(tool.program) {
        Some(path) if tool.program == "busybox" => is_static_binary(&path),
        Some(_) => true,
        None => false,
    }
}

/// True when `ldd` says the binary is not dynamically linked.
fn is_static_binary(path: &Path) -> bool {
    // ldd exits non-zero for static binaries, so look at the text rather than the status.
    match Command::new("ldd").arg(path).output() {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            text.contains("not a dynamic executable") || text.contains("statically linked")
        }
        Err(_) => false,
    }
}

/// Looks a program up on `$PATH`, plus the sbin directories root usually has.
pub(crate) fn find_in_path(program: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists() && find_in_path("apt-get").is_some()
}

/// `apt-get install -y PACKAGES`, refreshing the package lists first only when the install
/// fails (a fresh machine has stale or empty lists; a warm one does not need the round trip).
fn apt_install(packages: &[String]) -> Result<()> {
    progress(format_args!("installing {}", packages.join(" ")));
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_ok() {
        return Ok(());
    }
    apt_update()?;
    install().map(drop)
}

fn apt_update() -> Result<()> {
    progress("running apt-get update");
    run(Command::new("apt-get").arg("update")).map(drop)
}

/// Returns the release of the newest installed cloud kernel headers, installing the
/// headers meta-package when none are installed and installing is allowed.
fn ensure_cloud_headers(headers_root: &Path, install_missing: bool) -> Result<String> {
    if let Some(release) = newest_cloud_release(&list_dir_names(headers_root)) {
        return Ok(release);
    }
    if !is_debian() {
        return Err(LabError::NotDebian {
            missing: vec![CLOUD_HEADERS_PACKAGE.to_owned()],
        });
    }
    if !install_missing {
        return Err(LabError::MissingPackages {
            missing: vec![CLOUD_HEADERS_PACKAGE.to_owned()],
        });
    }
    apt_install(&[CLOUD_HEADERS_PACKAGE.to_owned()])?;
    newest_cloud_release(&list_dir_names(headers_root)).ok_or_else(|| LabError::NoCloudHeaders {
        dir: headers_root.to_owned(),
    })
}

/// Names of the entries of `dir`; an unreadable directory has none.
fn list_dir_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Picks the newest `X.Y.Z-N-cloud-amd64` release among `linux-headers-*` directory names.
fn newest_cloud_release(names: &[String]) -> Option<String> {
    names
        .iter()
        .filter_map(|name| name.strip_prefix("linux-headers-"))
        .filter(|release| release.ends_with("-cloud-amd64"))
        .max_by_key(|release| version_key(release))
        .map(str::to_owned)
}

/// Numeric components of a release string, so that `6.1.0-10` sorts before `6.1.0-56`.
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// Returns the cached `vmlinuz` for `release`, downloading and unpacking
/// `linux-image-<release>` when it is not cached yet.
fn ensure_kernel_image(cache_dir: &Path, release: &str) -> Result<PathBuf> {
    let kernel_dir = cache_dir.join("kernels").join(release);
    let image = kernel_dir.join("vmlinuz");
    if image.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(&kernel_dir).map_err(LabError::io("create", &kernel_dir))?;
    let scratch = ScratchDir::new(kernel_dir.join(format!(".download-{}", std::process::id())))?;

    let (deb, unpacked) = unpack_kernel_package(&scratch, release)?;
    let inner = format!("boot/vmlinuz-{release}");
    let unpacked_image = unpacked.join(&inner);
    if !unpacked_image.is_file() {
        return Err(LabError::KernelImageMissing { deb, image: inner });
    }
    // Copy then rename so a concurrent or interrupted run never sees a partial image.
    let partial = kernel_dir.join("vmlinuz.partial");
    fs::copy(&unpacked_image, &partial).map_err(LabError::io("copy to", &partial))?;
    let config = unpacked.join(format!("boot/config-{release}"));
    if config.is_file() {
        let target = kernel_dir.join("config");
        fs::copy(&config, &target).map_err(LabError::io("copy to", &target))?;
    }
    fs::rename(&partial, &image).map_err(LabError::io("rename to", &image))?;
    progress(format_args!("kernel image cached at {}", image.display()));
    Ok(image)
}

/// Downloads `linux-image-<release>` into `scratch` and unpacks it there; returns the
/// package and the unpacked tree.
fn unpack_kernel_package(scratch: &ScratchDir, release: &str) -> Result<(PathBuf, PathBuf)> {
    let package = format!("linux-image-{release}");
    progress(format_args!("downloading {package}"));
    let download = || {
        run(Command::new("apt-get")
            .args(["download", &package])
            .current_dir(scratch.path()))
    };
    if download().is_err() {
        // The lists may predate the installed headers; refresh once and retry.
        apt_update()?;
        download()?;
    }
    let deb = list_dir_names(scratch.path())
        .into_iter()
        .find(|name| name.ends_with(".deb"))
        .map(|name| scratch.path().join(name))
        .ok_or_else(|| LabError::KernelImageMissing {
            deb: scratch.path().join(format!("{package}_*.deb")),
            image: "(no .deb downloaded)".into(),
        })?;

    let unpacked = scratch.path().join("root");
    progress(format_args!("unpacking {}", deb.display()));
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    Ok((deb, unpacked))
}

/// The guest kernel's modules a virtio-blk disk needs (paths under
/// `/lib/modules/<release>/`), in load order: each after the modules it depends on.
pub const VIRTIO_BLK_MODULES: [&str; 6] = [
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
];

/// Makes sure `modules` (paths under `/lib/modules/<release>/` of the kernel package) are
/// in the cache beside the kernel image, downloading the package again when one is
/// missing; returns their cached paths in the order given.
pub fn ensure_kernel_modules(
    cache_dir: &Path,
    release: &str,
    modules: &[&str],
) -> Result<Vec<PathBuf>> {
    let module_dir = cache_dir.join("kernels").join(release).join("modules");
    let cached: Vec<PathBuf> = modules
        .iter()
        .map(|module| {
            let name = Path::new(module).file_name().unwrap_or_default();
            module_dir.join(name)
        })
        .collect();
    if cached.iter().all(|path| path.is_file()) {
        return Ok(cached);
    }
    fs::create_dir_all(&module_dir).map_err(LabError::io("create", &module_dir))?;
    let scratch = ScratchDir::new(module_dir.join(format!(".download-{}", std::process::id())))?;
    let (deb, unpacked) = unpack_kernel_package(&scratch, release)?;
    let tree = unpacked.join("lib/modules").join(release);
    for (module, target) in modules.iter().zip(&cached) {
        let source = tree.join(module);
        if !source.is_file() {
            return Err(LabError::KernelImageMissing {
                deb,
                image: format!("lib/modules/{release}/{module}"),
            });
        }
        // Copy then rename so a concurrent or interrupted run never sees a partial module.
        let partial = target.with_extension("partial");
        fs::copy(&source, &partial).map_err(LabError::io("copy to", &partial))?;
        fs::rename(&partial, target).map_err(LabError::io("rename to", target))?;
    }
    progress(format_args!(
        "{} kernel modules cached in {}",
        modules.len(),
        module_dir.display()
    ));
    Ok(cached)
}

/// A directory removed with its contents when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(path: PathBuf) -> Result<Self> {
        if path.exists() {
            fs::remove_dir_all(&path).map_err(LabError::io("remove", &path))?;
        }
        fs::create_dir_all(&path).map_err(LabError::io("create", &path))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover scratch directory is replaced by the next run.
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_newest_cloud_release() {
        let dirs = names(&[
            "linux-headers-6.1.0-10-cloud-amd64",
            "linux-headers-6.1.0-56-common",
            "linux-headers-6.1.0-56-cloud-amd64",
            "linux-headers-6.1.0-9-cloud-amd64",
            "linux-headers-6.1.0-60-amd64",
            "linux-kbuild-6.1",
        ]);
        assert_eq!(
            newest_cloud_release(&dirs).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
    }

    #[test]
    fn no_cloud_headers() {
        let dirs = names(&["linux-headers-6.1.0-56-common", "python3.11"]);
        assert_eq!(newest_cloud_release(&dirs), None);
    }

    #[test]
    fn version_key_orders_numerically() {
        assert!(version_key("6.1.0-9-cloud-amd64") < version_key("6.1.0-10-cloud-amd64"));
        assert!(version_key("6.1.0-56-cloud-amd64") < version_key("6.10.0-1-cloud-amd64"));
    }
}
