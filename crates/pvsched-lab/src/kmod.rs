//! Building the guest module (`guest/kmod`) with kbuild against the guest kernel's headers.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::{progress, run};
use crate::error::{LabError, Result};

/// File name of the built guest module.
pub const GUEST_MODULE_FILE: &str = "pvsched_guest.ko";

/// Runs `make` in `source_dir` (the `guest/kmod` directory) against the kernel headers in
/// `headers_dir` (see [`crate::LabAssets::kernel_headers`]) and returns the module path.
pub fn build_guest_module(source_dir: &Path, headers_dir: &Path) -> Result<PathBuf> {
    if !headers_dir.is_dir() {
        return Err(LabError::InvalidConfig(format!(
            "kernel headers {} are missing",
            headers_dir.display()
        )));
    }
    progress(format_args!(
        "building {GUEST_MODULE_FILE} in {} against {}",
        source_dir.display(),
        headers_dir.display()
    ));
    run(Command::new("make")
        .arg("-C")
        .arg(source_dir)
        .arg(format!("KDIR={}", headers_dir.display())))?;
    let module = source_dir.join(GUEST_MODULE_FILE);
    if module.is_file() {
        Ok(module)
    } else {
        Err(LabError::InvalidConfig(format!(
            "make succeeded but {} is missing",
            module.display()
        )))
    }
}

/// File name of the guest user-space tool (`crates/pvsched-guest`).
pub const GUEST_TOOL_FILE: &str = "pvsched-guest";

/// Builds the guest user-space tool (`cargo build --release -p pvsched-guest`) from the
/// workspace at `workspace_dir` into `target_dir` and returns the binary's path. Its own
/// target directory keeps the build from waiting on the lock of a cargo already running
/// in the workspace (a test run); the guest gets the binary with the libraries `ldd`
/// names, like every program in the initramfs.
pub fn build_guest_tool(workspace_dir: &Path, target_dir: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    progress(format_args!(
        "building {GUEST_TOOL_FILE} from {} into {}",
        workspace_dir.display(),
        target_dir.display()
    ));
    run(Command::new(cargo)
        .current_dir(workspace_dir)
        .args(["build", "--release", "--quiet", "-p", "pvsched-guest"])
        .arg("--target-dir")
        .arg(target_dir))?;
    let tool = target_dir.join("release").join(GUEST_TOOL_FILE);
    if tool.is_file() {
        Ok(tool)
    } else {
        Err(LabError::InvalidConfig(format!(
            "cargo succeeded but {} is missing",
            tool.display()
        )))
    }
}
