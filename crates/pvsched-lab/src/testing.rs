//! Prerequisites shared by the end-to-end tests of every crate: they skip, with a line
//! that says why, where a guest cannot be booted; under `CI=true` they fail instead, since
//! a CI run that skipped them would pass without having tested anything
//! (`PVSCHED_LAB_SKIP` then fails too).

use crate::{qemu, AssetOptions, LabAssets};

/// True when running under CI (`CI=true`), where a missing prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value.eq_ignore_ascii_case("true") || value == "1")
}

/// Prints that `test` is skipped and why, or panics under `CI=true`.
pub fn skip(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: prerequisites missing under CI=true: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// The lab's assets, or `None` after printing why `test` is skipped (under `CI=true` it
/// panics instead). `needs_make` adds kbuild (the guest module) to the prerequisites.
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
        skip(test, &missing.join("; "));
        return None;
    }
    let mut options = AssetOptions::default();
    if let Some(dir) = std::env::var_os("PVSCHED_LAB_CACHE") {
        options.cache_dir = dir.into();
    }
    // Another guest kernel for the end-to-end tests: the newest cloud headers in this
    // directory pick it (scripts/kmod-check unpacks 6.1 and 6.12 into one).
    if let Some(dir) = std::env::var_os("PVSCHED_LAB_HEADERS") {
        options.headers_root = dir.into();
    }
    match LabAssets::prepare(&options) {
        Ok(assets) => Some(assets),
        Err(error) => {
            skip(test, &format!("lab assets unavailable: {error}"));
            None
        }
    }
}
