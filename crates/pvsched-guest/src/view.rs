//! The host's lines for this VM's vCPUs, read-only, and how old they are.
//!
//! The host writes each vCPU's line under a seqlock (even `seq`: stable). The guest
//! cannot compare the host's clock with its own, so freshness is measured in guest
//! time: the moment this reader last saw a line's `host_time_ns` change. A line that
//! has not changed for longer than the caller's limit is stale and is not acted on.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pvsched_abi::decode::host_line_problems;
use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::PvschedHostLine;
use pvsched_abi::{validate_header, BoostState, SeqRead};

/// The guest module's read-only view of the shared region.
pub const DEVICE: &str = "/dev/pvsched";

/// Consistent reads tried before a line counts as unreadable this time.
const READ_ATTEMPTS: u32 = 8;

/// What the host says about one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuHostState {
    /// The vCPU thread was runnable but kept off a pCPU at the host's last sample.
    pub preempted: bool,
    /// Load of the vCPU's pCPU, per mille.
    pub pcpu_load_permille: u32,
    /// Boost state.
    pub boost: BoostState,
    /// Host time of the line's last publication (host clock, ns).
    pub host_time_ns: u64,
}

/// Where a reader gets host lines from: `/dev/pvsched`, or a test's own lines.
pub trait HostLines: Sync {
    /// The host's current line for guest CPU `cpu`; `None` when there is none or it
    /// cannot be read consistently or holds impossible values.
    fn line(&self, cpu: u32) -> Option<VcpuHostState>;
    /// Number of vCPUs with a line.
    fn vcpus(&self) -> u32;
}

/// Host lines through the guest module's read-only mapping.
pub struct DeviceLines {
    map: SharedFile,
    nr_slots: u32,
}

impl DeviceLines {
    /// Maps `path` (normally [`DEVICE`]) read-only and checks the host header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        // The header says how large the region is: map one page to read it first.
        let page = SharedFile::from_file_read_only(file.try_clone()?, 4096)
            .with_context(|| format!("map {}", path.display()))?;
        let header = page
            .region()
            .read_header()
            .map_err(|e| anyhow::anyhow!("{}: read header: {e}", path.display()))?;
        let total = header.host.total_size as usize;
        drop(page);
        let map = SharedFile::from_file_read_only(file, total.max(4096))
            .with_context(|| format!("map {} ({total} bytes)", path.display()))?;
        let geometry = validate_header(&header.host, map.len())
            .map_err(|e| anyhow::anyhow!("{}: invalid host header: {e:?}", path.display()))?;
        if geometry.nr_slots == 0 {
            bail!("{}: the host published no vCPU slots", path.display());
        }
        Ok(Self {
            map,
            nr_slots: geometry.nr_slots,
        })
    }
}

impl HostLines for DeviceLines {
    fn line(&self, cpu: u32) -> Option<VcpuHostState> {
        if cpu >= self.nr_slots {
            return None;
        }
        let region = self.map.region();
        for _ in 0..READ_ATTEMPTS {
            match region.read_host_line(cpu).ok()? {
                SeqRead::Consistent(raw) => return decode(&raw),
                SeqRead::Torn(_) => std::hint::spin_loop(),
            }
        }
        None
    }

    fn vcpus(&self) -> u32 {
        self.nr_slots
    }
}

/// A host line as the lock uses it, `None` when it holds impossible values.
pub fn decode(raw: &PvschedHostLine) -> Option<VcpuHostState> {
    if host_line_problems(raw).next().is_some() {
        return None;
    }
    Some(VcpuHostState {
        preempted: raw.preempted == 1,
        pcpu_load_permille: raw.pcpu_load_permille,
        boost: BoostState::from_raw(raw.boost_state)?,
        host_time_ns: raw.host_time_ns,
    })
}

/// Per-vCPU freshness of the host's lines, in guest time.
pub struct Freshness {
    epoch: Instant,
    /// Per vCPU: the `host_time_ns` last seen and the guest time (ns since `epoch`)
    /// it was first seen at.
    seen: Vec<(AtomicU64, AtomicU64)>,
}

impl Freshness {
    /// Tracks `vcpus` lines.
    pub fn new(vcpus: u32) -> Self {
        Self {
            epoch: Instant::now(),
            seen: (0..vcpus)
                .map(|_| (AtomicU64::new(u64::MAX), AtomicU64::new(0)))
                .collect(),
        }
    }

    /// Guest time now, in ns since this tracker started.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    /// Records a read of `cpu`'s line at guest time `now_ns` and returns its age: how
    /// long ago, in guest time, its publication time last changed. A line seen for the
    /// first time has age 0.
    pub fn observe(&self, cpu: u32, host_time_ns: u64, now_ns: u64) -> u64 {
        let Some((last, since)) = self.seen.get(cpu as usize) else {
            return u64::MAX;
        };
        // Relaxed: each pair is a cache of the reader's own observations; a race
        // between two readers can only make a line look younger by one read.
        if last.swap(host_time_ns, Ordering::Relaxed) != host_time_ns {
            since.store(now_ns, Ordering::Relaxed);
            return 0;
        }
        now_ns.saturating_sub(since.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_restarts_when_the_host_republishes() {
        let f = Freshness::new(2);
        assert_eq!(f.observe(0, 10, 1_000), 0);
        assert_eq!(f.observe(0, 10, 5_000), 4_000);
        assert_eq!(f.observe(0, 11, 6_000), 0);
        assert_eq!(f.observe(1, 11, 9_000), 0, "each vCPU on its own");
        assert_eq!(f.observe(2, 11, 9_000), u64::MAX, "no such vCPU");
    }

    #[test]
    fn impossible_lines_are_not_used() {
        let good = PvschedHostLine {
            preempted: 1,
            pcpu_load_permille: 700,
            boost_state: 1,
            host_time_ns: 5,
            ..Default::default()
        };
        let state = decode(&good).expect("valid");
        assert!(state.preempted);
        assert_eq!(state.boost, BoostState::Boosted);
        for bad in [
            PvschedHostLine {
                preempted: 2,
                ..good
            },
            PvschedHostLine {
                pcpu_load_permille: 1001,
                ..good
            },
            PvschedHostLine {
                boost_state: 9,
                ..good
            },
        ] {
            assert_eq!(decode(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lines_are_read_through_a_read_only_mapping_of_the_region() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let host = SharedFile::open(&path, Some(1 << 16)).unwrap();
        let region = host.region();
        region
            .write_header_host(&pvsched_abi::new_host_header(2, 0, 1))
            .unwrap();
        let line = PvschedHostLine {
            preempted: 1,
            pcpu_load_permille: 950,
            host_time_ns: 77,
            ..Default::default()
        };
        region.write_host_line(1, &line).unwrap();
        let lines = DeviceLines::open(&path).unwrap();
        assert_eq!(lines.vcpus(), 2);
        let seen = lines.line(1).expect("line 1");
        assert!(seen.preempted);
        assert_eq!(seen.pcpu_load_permille, 950);
        assert_eq!(seen.host_time_ns, 77);
        assert_eq!(lines.line(2), None, "past the slots");
    }
}
