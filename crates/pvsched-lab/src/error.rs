//! The lab's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::cyclictest::ParseError;
use crate::qemu::Accelerator;

/// Everything that can go wrong while preparing assets, building an initramfs or running a
/// guest. Variants carry the context needed to act on them (path, command, console tail).
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A file-system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done (`"create"`, `"read"`, ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An external program could not be started.
    #[error("cannot run `{program}`")]
    Spawn {
        /// The program name.
        program: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An external program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line, for the log.
        command: String,
        /// Exit status as printed by the OS.
        status: String,
        /// The last lines of its standard error.
        stderr: String,
    },

    /// Host packages are missing and this is not a Debian system where the lab could install them.
    #[error("missing host packages {missing:?}; install them (the lab installs them itself only on Debian)")]
    NotDebian {
        /// Debian package names that are missing.
        missing: Vec<String>,
    },

    /// Host packages are missing and installing them was not allowed.
    #[error("missing host packages {missing:?}; run `apt-get install -y {}`", missing.join(" "))]
    MissingPackages {
        /// Debian package names that are missing.
        missing: Vec<String>,
    },

    /// No `linux-headers-*-cloud-amd64` directory was found, even after installing.
    #[error("no linux-headers-*-cloud-amd64 directory under {}", dir.display())]
    NoCloudHeaders {
        /// Directory that was searched.
        dir: PathBuf,
    },

    /// The downloaded kernel package did not contain the expected image.
    #[error("kernel package {} has no {image}", deb.display())]
    KernelImageMissing {
        /// The `.deb` that was unpacked.
        deb: PathBuf,
        /// The path that was expected inside it.
        image: String,
    },

    /// `ldd` printed something the lab does not understand.
    #[error("cannot parse ldd output for {}: {line:?}", binary.display())]
    Ldd {
        /// The binary being resolved.
        binary: PathBuf,
        /// The offending line.
        line: String,
    },

    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The shared-memory file already exists, probably another guest with the same name.
    #[error("{} already exists: another guest uses this name, or a crashed run left it behind", path.display())]
    ShmExists {
        /// The file.
        path: PathBuf,
    },

    /// The guest did not reach its init script before the deadline.
    #[error("guest {name} did not boot under {accel} within {deadline:?}; console tail:\n{console_tail}")]
    BootTimeout {
        /// Guest name.
        name: String,
        /// Accelerator that was tried.
        accel: Accelerator,
        /// The deadline that expired.
        deadline: Duration,
        /// Last console lines.
        console_tail: String,
    },

    /// QEMU exited before the guest produced what was waited for.
    #[error("QEMU for guest {name} exited ({status}); console tail:\n{console_tail}")]
    QemuExited {
        /// Guest name.
        name: String,
        /// Exit status as printed by the OS.
        status: String,
        /// Last console lines.
        console_tail: String,
    },

    /// The workload did not finish before the deadline.
    #[error("guest {name} produced no result within {timeout:?}; console tail:\n{console_tail}")]
    ResultTimeout {
        /// Guest name.
        name: String,
        /// The deadline that expired.
        timeout: Duration,
        /// Last console lines.
        console_tail: String,
    },

    /// The workload finished but its exit code was not zero.
    #[error("workload in guest {name} exited with {code}; output:\n{output}")]
    WorkloadFailed {
        /// Guest name.
        name: String,
        /// Exit code reported by the init script.
        code: i32,
        /// The workload output.
        output: String,
    },

    /// A step of an experiment failed (host tool, daemon, teardown check).
    #[error("{0}")]
    Run(String),

    /// The run was stopped by a signal before it finished.
    #[error("stopped by a signal; every QEMU, load and daemon of the run was stopped")]
    Interrupted,

    /// The cyclictest output could not be parsed.
    #[error("cyclictest output")]
    Cyclictest(#[from] ParseError),
}

impl LabError {
    /// Builds an [`LabError::Io`] from an operation name and a path.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| LabError::Io { op, path, source }
    }
}

/// Result alias for the lab.
pub type Result<T, E = LabError> = std::result::Result<T, E>;
