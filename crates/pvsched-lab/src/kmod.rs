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
