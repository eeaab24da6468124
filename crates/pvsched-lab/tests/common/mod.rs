//! Prerequisites shared by the end-to-end tests: they skip, with a line that
//! says why, where a guest cannot be booted.

use pvsched_lab::{qemu, AssetOptions, LabAssets};

/// The lab's assets, or `None` after printing why `test` is skipped.
/// `needs_make` adds kbuild (the guest module) to the prerequisites.
pub fn assets_or_skip(test: &str, needs_make: bool) -> Option<LabAssets> {
    let mut missing = Vec::new();
    if std::env::var_os("PVSCHED_LAB_SKIP").is_some() {
        missing.push("PVSCHED_LAB_SKIP is set".to_owned());
    } else {
        missing.extend(qemu::missing_prerequisites());
        if needs_make
            && std::process::Command::new("make")
                .arg("--version")
                .output()
                .is_err()
        {
            missing.push("make not found".into());
        }
    }
    if !missing.is_empty() {
        eprintln!("SKIPPED {test}: {}", missing.join("; "));
        return None;
    }
    let mut options = AssetOptions::default();
    if let Some(dir) = std::env::var_os("PVSCHED_LAB_CACHE") {
        options.cache_dir = dir.into();
    }
    match LabAssets::prepare(&options) {
        Ok(assets) => Some(assets),
        Err(error) => {
            eprintln!("SKIPPED {test}: lab assets unavailable: {error}");
            None
        }
    }
}
