//! The daemon's TOML configuration.
//!
//! ```toml
//! [daemon]
//! period_us = 1000
//! [policy]
//! prio_max = 10
//! [[vm]]
//! name = "vm1"
//! qmp = "/run/pvsched/vm1.qmp"
//! shm = "/dev/shm/pvsched-vm1"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pvsched_abi::raw::PVSCHED_FEAT_KNOWN;
use pvsched_policy::{ConfigError, IoThreadMode, IoThreadPolicy, PolicyConfig};
use serde::{Deserialize, Serialize};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or had unknown keys.
    #[error("parsing the configuration")]
    Parse(#[from] toml::de::Error),
    /// The policy limits are not enforceable.
    #[error("[policy]")]
    Policy(#[from] ConfigError),
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
}

/// `[daemon]`: how the daemon runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Loop period: how often guest lines are read (µs).
    pub period_us: u64,
    /// How often per-thread host information (steal, pCPU, preempted, load)
    /// is sampled and published for every vCPU (ms).
    pub host_info_ms: u64,
    /// How often QMP is re-queried and QEMU processes are discovered (ms).
    pub refresh_ms: u64,
    /// Deadline of one QMP session (ms).
    pub qmp_timeout_ms: u64,
    /// State file recording every changed thread's original attributes.
    pub state_file: PathBuf,
    /// Loopback address of the metrics/status endpoint ("" disables it).
    pub metrics_addr: String,
    /// Discover QEMU processes with a `memory-backend-file` under `shm_dir`.
    pub discover: bool,
    /// Directory of shared files for discovery.
    pub shm_dir: PathBuf,
    /// libvirt's status directory: with `discover`, the QEMU processes of
    /// libvirt domains with a `<shmem name='pvsched-...'>` device are found
    /// from libvirt's records here (see [`crate::libvirt`]), without a QMP
    /// session (libvirt owns the monitor).
    pub libvirt_status_dir: PathBuf,
    /// Users (names) whose QEMU processes the daemon manages, besides root.
    /// A process's real and effective uid must both be root or one of these.
    /// Names are resolved once, when the daemon starts; a name that does not
    /// resolve is one warning and allows nothing. Default: the QEMU user of
    /// Debian's libvirt.
    pub allowed_users: Vec<String>,
    /// Features the host offers to guests (`PVSCHED_FEAT_*` bits).
    pub host_features: u64,
    /// `SCHED_FIFO` priority of the loop thread, which must preempt boosted
    /// vCPU threads to unboost and throttle them in time. Unset: the policy's
    /// `prio_max + 1`; 0: stay in the fair class (not recommended).
    pub loop_rt_prio: Option<u8>,
    /// Heartbeat silence of the loop after which the watchdog process
    /// restores every recorded thread and kills the daemon (ms). Unset: 500,
    /// or 10 loop periods if that is longer; set: 100..=60000 and at least
    /// 10 loop periods.
    pub watchdog_stall_ms: Option<u64>,
    /// Seccomp filters per thread role: "enforce" (a call outside a
    /// thread's list kills the daemon), "log" (allowed, logged by the
    /// kernel) or "off". See [`crate::seccomp`].
    pub seccomp: crate::seccomp::SeccompMode,
    /// Serve QEMU's `ivshmem-doorbell` devices on this Unix socket (the
    /// daemon as the ivshmem server; see [`crate::ivshmem`]). Unset: off.
    /// A QEMU process connected to it is managed without a shared file,
    /// whether or not `discover` is on.
    pub ivshmem_server: Option<PathBuf>,
    /// Read each vCPU's preempt count from guest RAM (introspection, see
    /// [`crate::guestram`]): acts only for a VM whose RAM is a shared
    /// `memory-backend-memfd` or `memory-backend-file` (`share=on`) and whose
    /// guest publishes the CPU-info table. The daemon then maps that RAM
    /// read-only and advertises the table in the VM's header.
    pub introspection: bool,
    /// KVM's host halt-poll parameters (`/sys/module/kvm/parameters/
    /// halt_poll_ns*`, every VM on the host): "off" (default), "observe"
    /// (run the controller every `host_info_ms`, export its decision, write
    /// nothing) or "tune" (write it, restore the original values at exit).
    /// See [`crate::haltpoll`].
    pub halt_poll: crate::haltpoll::HaltPollMode,
    /// What the halt-poll controller may write and its thresholds
    /// (`[daemon.halt_poll_bounds]`: `halt_poll_ns = { min, max }`, `grow`,
    /// `grow_start_ns`, `shrink`, `stop_load_permille`,
    /// `grow_success_permille`, `shrink_success_permille`, `min_polls`).
    pub halt_poll_bounds: pvsched_policy::HaltPollBounds,
    /// Where the daemon keeps its isolation request while the `realtime`
    /// VM is attached (removed when it goes), for `pvsched isolate --sync`
    /// to apply (see [`crate::isolate_request`]). Unused without a
    /// `realtime` VM.
    pub isolate_request: PathBuf,
    /// `/proc` root (tests use fixture trees).
    pub proc_root: PathBuf,
    /// `/sys` root.
    pub sys_root: PathBuf,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            period_us: 1000,
            host_info_ms: 100,
            refresh_ms: 1000,
            qmp_timeout_ms: 500,
            state_file: PathBuf::from("/run/pvsched/hostd.state"),
            metrics_addr: "127.0.0.1:9464".into(),
            discover: true,
            shm_dir: PathBuf::from("/dev/shm"),
            libvirt_status_dir: PathBuf::from(crate::libvirt::STATUS_DIR),
            allowed_users: vec![DEFAULT_QEMU_USER.to_owned()],
            host_features: PVSCHED_FEAT_KNOWN,
            loop_rt_prio: None,
            watchdog_stall_ms: None,
            seccomp: crate::seccomp::SeccompMode::Enforce,
            ivshmem_server: None,
            introspection: true,
            halt_poll: crate::haltpoll::HaltPollMode::Off,
            halt_poll_bounds: pvsched_policy::HaltPollBounds::default(),
            isolate_request: PathBuf::from(crate::isolate_request::DEFAULT_REQUEST_FILE),
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
        }
    }
}

/// The user libvirt runs QEMU as on Debian and its derivatives.
pub const DEFAULT_QEMU_USER: &str = "libvirt-qemu";

/// `[[vm]]`: a VM named in the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Name (metrics label, status key).
    pub name: String,
    /// QMP Unix socket.
    pub qmp: PathBuf,
    /// Shared file (the `mem-path` of the ivshmem memory backend).
    pub shm: PathBuf,
    /// CPUs a boosted vCPU thread is confined to (`sched_setaffinity`);
    /// the original affinity comes back on unboost. Unset: affinity untouched.
    #[serde(default)]
    pub boost_cpus: Option<Vec<u32>>,
    /// CPUs the VM's IOThreads are pinned to. Unset: untouched.
    #[serde(default)]
    pub iothread_cpus: Option<Vec<u32>>,
    /// `SCHED_FIFO` priority of the VM's IOThreads while they are boosted,
    /// 1..=`prio_max` (kept at or above `prio_min`). Unset: never boosted.
    #[serde(default)]
    pub iothread_priority: Option<u8>,
    /// When the IOThreads are boosted: "with-vm" (the default: while some
    /// vCPU of the VM may be boosted) or "static" (always). Either way their
    /// boosted time is charged to the VM's budget, and a VM its budget refuses
    /// has its IOThreads back at their own attributes. Needs `iothread_priority`.
    #[serde(default)]
    pub iothread_boost: Option<IoThreadMode>,
    /// A user (name) this VM's QEMU may run as besides root and
    /// `allowed_users`: trusts that user for this VM only.
    #[serde(default)]
    pub user: Option<String>,
    /// A real-time VM: while it runs, `isolate_cpus` are isolated for its
    /// vCPUs (one per CPU, `SCHED_FIFO`) and its other threads, every
    /// movable task, IRQ and unbound workqueue kept off them. The daemon
    /// asks for it while the VM is attached (`[daemon] isolate_request`);
    /// the separately confined `pvsched-isolate.service` applies and undoes
    /// it (see docs/isolation.md). At most one VM may be real-time.
    #[serde(default)]
    pub realtime: bool,
    /// The CPUs to isolate for this VM (a kernel CPU list, `"1"`, `"2-3"`);
    /// needed with `realtime`, and the default of `pvsched isolate --vm`.
    #[serde(default)]
    pub isolate_cpus: Option<String>,
}

impl VmConfig {
    /// How the VM's IOThreads are boosted (`None`: never), its priority
    /// clamped into the policy's range as a vCPU's is.
    pub fn iothread_policy(&self, policy: &PolicyConfig) -> Option<IoThreadPolicy> {
        self.iothread_priority.map(|prio| IoThreadPolicy {
            prio: prio.clamp(policy.prio_min, policy.prio_max),
            mode: self.iothread_boost.unwrap_or_default(),
        })
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[policy]`: the engine's limits.
    pub policy: PolicyConfig,
    /// `[[vm]]`.
    pub vm: Vec<VmConfig>,
}

impl HostConfig {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, HostConfigError> {
        let cfg: HostConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, HostConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| HostConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The loop thread's RT priority (`None`: fair class).
    pub fn loop_rt_prio(&self) -> Option<u8> {
        match self.daemon.loop_rt_prio {
            Some(0) => None,
            Some(p) => Some(p),
            None => Some((self.policy.prio_max + 1).min(99)),
        }
    }

    /// The watchdog's stall timeout (ms): `watchdog_stall_ms`, or by default
    /// 500 ms or 10 loop periods, whichever is longer.
    pub fn watchdog_stall_ms(&self) -> u64 {
        self.daemon
            .watchdog_stall_ms
            .unwrap_or_else(|| (self.daemon.period_us / 100).max(500))
    }

    /// The metrics address, if enabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, HostConfigError> {
        if self.daemon.metrics_addr.is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = self.daemon.metrics_addr.parse().map_err(|_| {
            HostConfigError::Invalid(format!(
                "metrics_addr {:?} is not an address:port",
                self.daemon.metrics_addr
            ))
        })?;
        if !addr.ip().is_loopback() {
            return Err(HostConfigError::Invalid(format!(
                "metrics_addr {addr} is not a loopback address"
            )));
        }
        Ok(Some(addr))
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), HostConfigError> {
        self.policy.validate()?;
        let d = &self.daemon;
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(HostConfigError::Invalid(format!(
                    "{name} = {v} is outside {lo}..={hi}"
                )))
            } else {
                Ok(())
            }
        };
        range("period_us", d.period_us, 50, 1_000_000)?;
        range("host_info_ms", d.host_info_ms, 1, 60_000)?;
        range("refresh_ms", d.refresh_ms, 10, 600_000)?;
        range("qmp_timeout_ms", d.qmp_timeout_ms, 10, 60_000)?;
        if let Some(stall) = d.watchdog_stall_ms {
            range("watchdog_stall_ms", stall, 100, 60_000)?;
            if stall.saturating_mul(1000) < d.period_us.saturating_mul(10) {
                return Err(HostConfigError::Invalid(format!(
                    "watchdog_stall_ms = {stall} must cover at least 10 loop periods (period_us {})",
                    d.period_us
                )));
            }
        }
        if d.host_features & !PVSCHED_FEAT_KNOWN != 0 {
            return Err(HostConfigError::Invalid(format!(
                "host_features {:#x} has unknown bits",
                d.host_features
            )));
        }
        if let Some(p) = d.loop_rt_prio.filter(|&p| p != 0) {
            if p <= self.policy.prio_max || p > 99 {
                return Err(HostConfigError::Invalid(format!(
                    "loop_rt_prio {p} must be above the boost range (prio_max {}) and at most 99",
                    self.policy.prio_max
                )));
            }
        }
        self.metrics_addr()?;
        d.halt_poll_bounds
            .validate()
            .map_err(|e| HostConfigError::Invalid(format!("[daemon.halt_poll_bounds]: {}", e.0)))?;
        if let Some(sock) = &d.ivshmem_server {
            // sun_path holds 108 bytes with the terminating NUL.
            let len = sock.as_os_str().len();
            if !sock.is_absolute() || sock.file_name().is_none() || len >= 108 {
                return Err(HostConfigError::Invalid(format!(
                    "ivshmem_server {} must be an absolute socket path shorter than 108 bytes",
                    sock.display()
                )));
            }
            if sock
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(HostConfigError::Invalid(format!(
                    "ivshmem_server {} must not contain ..",
                    sock.display()
                )));
            }
        }
        for user in &d.allowed_users {
            check_user_name(user)?;
        }
        let mut names = std::collections::BTreeSet::new();
        let mut shms = std::collections::BTreeSet::new();
        for vm in &self.vm {
            if vm.name.is_empty() || vm.name.len() > 64 || vm.name.contains(['"', '\\', '\n']) {
                return Err(HostConfigError::Invalid(format!(
                    "vm name {:?} must be 1..=64 characters without quotes, backslashes or newlines",
                    vm.name
                )));
            }
            if !names.insert(&vm.name) {
                return Err(HostConfigError::Invalid(format!(
                    "vm {} listed twice",
                    vm.name
                )));
            }
            if !shms.insert(&vm.shm) {
                return Err(HostConfigError::Invalid(format!(
                    "shared file {} used by two VMs",
                    vm.shm.display()
                )));
            }
            if let Some(user) = &vm.user {
                check_user_name(user)?;
            }
            if vm.boost_cpus.is_some() && self.policy.rt_class == pvsched_policy::RtClass::Deadline
            {
                return Err(HostConfigError::Invalid(format!(
                    "vm {}: boost_cpus cannot be used with rt_class = \"deadline\" \
                     (SCHED_DEADLINE needs a thread's affinity to span its root domain)",
                    vm.name
                )));
            }
            if let Some(p) = vm.iothread_priority {
                if p == 0 || p > self.policy.prio_max {
                    return Err(HostConfigError::Invalid(format!(
                        "vm {}: iothread_priority {p} is outside 1..={} (prio_max)",
                        vm.name, self.policy.prio_max
                    )));
                }
            }
            if vm.iothread_boost.is_some() && vm.iothread_priority.is_none() {
                return Err(HostConfigError::Invalid(format!(
                    "vm {}: iothread_boost needs iothread_priority",
                    vm.name
                )));
            }
            if let Some(list) = &vm.isolate_cpus {
                crate::isolate::parse_cpus(list).map_err(|e| {
                    HostConfigError::Invalid(format!("vm {}: isolate_cpus: {e}", vm.name))
                })?;
            }
            if vm.realtime && vm.isolate_cpus.is_none() {
                return Err(HostConfigError::Invalid(format!(
                    "vm {}: realtime = true needs isolate_cpus",
                    vm.name
                )));
            }
            for cpus in [&vm.boost_cpus, &vm.iothread_cpus].into_iter().flatten() {
                if cpus.is_empty() || cpus.iter().any(|&c| c >= 1024) {
                    return Err(HostConfigError::Invalid(format!(
                        "vm {}: a CPU list must be non-empty and below 1024",
                        vm.name
                    )));
                }
            }
        }
        let realtime: Vec<&str> = self
            .vm
            .iter()
            .filter(|v| v.realtime)
            .map(|v| v.name.as_str())
            .collect();
        if realtime.len() > 1 {
            return Err(HostConfigError::Invalid(format!(
                "vms {} are all realtime: one isolation (one state file) serves one VM",
                realtime.join(", ")
            )));
        }
        Ok(())
    }
}

/// A user name as `useradd` accepts it (no NUL, colon, slash or whitespace;
/// at most 256 bytes). Whether it exists is checked when the daemon starts.
fn check_user_name(name: &str) -> Result<(), HostConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && !name.starts_with('-')
        && !name
            .chars()
            .any(|c| c == ':' || c == '/' || c == '\0' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(HostConfigError::Invalid(format!(
            "user name {name:?} is not a valid user name"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../packaging/pvsched-hostd.toml");
        let cfg = HostConfig::from_toml(text).unwrap();
        assert_eq!(cfg.daemon.period_us, 1000);
        assert!(cfg.daemon.introspection);
        // The [policy] values it shows are the defaults the daemon runs without it.
        assert_eq!(cfg.policy, PolicyConfig::default());
        // As shipped, the daemon discovers VMs and names none.
        assert!(cfg.vm.is_empty());
        // The example entry, with each line's "# " removed, is valid.
        let entry_at = text.find("# [[vm]]").expect("an example [[vm]] entry");
        let entry: String = text[entry_at..]
            .lines()
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .collect::<Vec<_>>()
            .join("\n");
        let with_entry = format!("{}{entry}", &text[..entry_at]);
        let cfg = HostConfig::from_toml(&with_entry).unwrap();
        assert_eq!(cfg.vm.len(), 1);
        assert_eq!(cfg.vm[0].name, "vm1");
    }

    #[test]
    fn introspection_is_on_by_default_and_can_be_turned_off() {
        assert!(HostConfig::from_toml("").unwrap().daemon.introspection);
        let off = HostConfig::from_toml("[daemon]\nintrospection = false").unwrap();
        assert!(!off.daemon.introspection);
        assert!(HostConfig::from_toml("[daemon]\nintrospection = \"yes\"").is_err());
    }

    #[test]
    fn halt_poll_is_off_by_default_and_its_bounds_are_checked() {
        use crate::haltpoll::HaltPollMode;
        let cfg = HostConfig::from_toml("").unwrap();
        assert_eq!(cfg.daemon.halt_poll, HaltPollMode::Off);
        let cfg = HostConfig::from_toml(
            "[daemon]\nhalt_poll = \"tune\"\n[daemon.halt_poll_bounds]\nhalt_poll_ns = { min = 0, max = 50000 }\nstop_load_permille = 800",
        )
        .unwrap();
        assert_eq!(cfg.daemon.halt_poll, HaltPollMode::Tune);
        assert_eq!(cfg.daemon.halt_poll_bounds.halt_poll_ns.max, 50_000);
        assert_eq!(cfg.daemon.halt_poll_bounds.min_polls, 16);
        for bad in [
            "[daemon]\nhalt_poll = \"on\"",
            "[daemon.halt_poll_bounds]\nhalt_poll_ns = { min = 9, max = 1 }",
            "[daemon.halt_poll_bounds]\nhalt_poll_ns = { min = 0, max = 99999999 }",
            "[daemon.halt_poll_bounds]\nstop_load_permille = 1001",
            "[daemon.halt_poll_bounds]\nwindow = 3",
        ] {
            assert!(HostConfig::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_and_errors() {
        let cfg = HostConfig::from_toml("").unwrap();
        assert_eq!(cfg.daemon, DaemonConfig::default());
        assert_eq!(cfg.daemon.allowed_users, vec!["libvirt-qemu".to_string()]);
        assert!(cfg.vm.is_empty());
        let cfg = HostConfig::from_toml(
            "[daemon]\nallowed_users = []\n[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\nuser = \"alice\"",
        )
        .unwrap();
        assert!(cfg.daemon.allowed_users.is_empty());
        assert_eq!(cfg.vm[0].user.as_deref(), Some("alice"));
        for bad in [
            "[daemon]\nperiod_us = 0",
            "[daemon]\nmetrics_addr = \"0.0.0.0:9464\"",
            "[daemon]\nbogus = 1",
            "[daemon]\nloop_rt_prio = 5",
            "[daemon]\nwatchdog_stall_ms = 50",
            "[daemon]\nwatchdog_stall_ms = 100000",
            "[daemon]\nperiod_us = 100000\nwatchdog_stall_ms = 500",
            "[policy]\nprio_max = 100",
            "[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\n[[vm]]\nname = \"a\"\nqmp = \"/q2\"\nshm = \"/s2\"",
            "[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\nboost_cpus = []",
            "[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\nuser = \"a:b\"",
            "[daemon]\nallowed_users = [\"\"]",
            "[daemon]\nallowed_users = [\"two words\"]",
            "[daemon]\nivshmem_server = \"ivshmem.sock\"",
            "[daemon]\nivshmem_server = \"/\"",
            "[daemon]\nivshmem_server = \"/run/../tmp/ivshmem.sock\"",
            "[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\nrealtime = true",
            "[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\nisolate_cpus = \"1-\"",
            "[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\nisolate_cpus = \"\"",
            "[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\nrealtime = true\nisolate_cpus = \"1\"\n\
             [[vm]]\nname = \"b\"\nqmp = \"/q2\"\nshm = \"/s2\"\nrealtime = true\nisolate_cpus = \"2\"",
        ] {
            assert!(HostConfig::from_toml(bad).is_err(), "accepted: {bad}");
        }
        assert_eq!(cfg.watchdog_stall_ms(), 500);
        assert_eq!(cfg.daemon.ivshmem_server, None);
        let iv = HostConfig::from_toml("[daemon]\nivshmem_server = \"/run/pvsched/ivshmem.sock\"")
            .unwrap();
        assert_eq!(
            iv.daemon.ivshmem_server.as_deref(),
            Some(Path::new("/run/pvsched/ivshmem.sock"))
        );
        let rt = HostConfig::from_toml(
            "[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\nrealtime = true\nisolate_cpus = \"1\"",
        )
        .unwrap();
        assert!(rt.vm[0].realtime);
        assert_eq!(rt.vm[0].isolate_cpus.as_deref(), Some("1"));
        let slow = HostConfig::from_toml("[daemon]\nperiod_us = 100000").unwrap();
        assert_eq!(slow.watchdog_stall_ms(), 1000, "10 periods of 100 ms");
        let set = HostConfig::from_toml("[daemon]\nwatchdog_stall_ms = 250").unwrap();
        assert_eq!(set.watchdog_stall_ms(), 250);
    }

    #[test]
    fn iothread_boosting_is_validated_against_the_boost_range() {
        let vm = |extra: &str| {
            format!("[policy]\nprio_min = 2\nprio_max = 10\n[[vm]]\nname = \"a\"\nqmp = \"/q\"\nshm = \"/s\"\n{extra}")
        };
        let cfg = HostConfig::from_toml(&vm("iothread_cpus = [1]")).unwrap();
        assert_eq!(cfg.vm[0].iothread_policy(&cfg.policy), None);
        let cfg = HostConfig::from_toml(&vm("iothread_priority = 10")).unwrap();
        assert_eq!(
            cfg.vm[0].iothread_policy(&cfg.policy),
            Some(IoThreadPolicy {
                prio: 10,
                mode: IoThreadMode::WithVm
            })
        );
        // Below prio_min: clamped up, as a guest's priority is mapped into the range.
        let cfg = HostConfig::from_toml(&vm("iothread_priority = 1\niothread_boost = \"static\""))
            .unwrap();
        assert_eq!(
            cfg.vm[0].iothread_policy(&cfg.policy),
            Some(IoThreadPolicy {
                prio: 2,
                mode: IoThreadMode::Static
            })
        );
        for bad in [
            "iothread_priority = 0",
            "iothread_priority = 11",
            "iothread_priority = 300",
            "iothread_priority = -1",
            "iothread_boost = \"static\"",
            "iothread_priority = 5\niothread_boost = \"always\"",
            "iothread_cpus = []",
        ] {
            let err = HostConfig::from_toml(&vm(bad));
            assert!(err.is_err(), "accepted: {bad}");
        }
        let err = HostConfig::from_toml(&vm("iothread_priority = 11")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vm a: iothread_priority 11 is outside 1..=10 (prio_max)"
        );
    }
}
