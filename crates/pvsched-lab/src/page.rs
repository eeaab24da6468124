//! Reading a guest's shared page from the host side during an experiment: whether the
//! guest module attached, its heartbeat, and the daemon's per-vCPU boost and throttle
//! counters. Also formats a page for runs without the daemon.

use std::path::Path;

use pvsched_abi::decode::{new_host_header, GuestDoorbellCounters};
use pvsched_abi::mmap::SharedFile;
use pvsched_abi::raw::{PVSCHED_FEAT_KNOWN, PVSCHED_GUEST_ATTACHED, PVSCHED_MAGIC};
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};

/// Bytes of a host header for `vcpus` slots, for [`crate::GuestConfig::shm_initial_contents`]
/// in configurations without the daemon: the guest module then attaches and runs its probes
/// exactly as under the daemon, so every configuration pays the same guest-side cost.
pub fn static_host_header(vcpus: u32) -> Vec<u8> {
    new_host_header(vcpus, PVSCHED_FEAT_KNOWN, 1)
        .to_bytes()
        .to_vec()
}

/// The daemon's counters for one vCPU slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotCounters {
    /// Boosts since the daemon adopted the page.
    pub boosts: u32,
    /// Throttles since the daemon adopted the page.
    pub throttles: u32,
    /// Boosted CPU time (ns).
    pub boosted_ns: u64,
}

/// The daemon's counters summed over vCPU slots (and guests).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SlotTotals {
    /// Boosts.
    pub boosts: u64,
    /// Throttles.
    pub throttles: u64,
    /// Boosted CPU time (ms).
    pub boosted_ms: f64,
}

impl SlotTotals {
    /// The sum over `slots`.
    pub fn of<'a>(slots: impl IntoIterator<Item = &'a SlotCounters>) -> Self {
        slots.into_iter().fold(Self::default(), |sum, slot| Self {
            boosts: sum.boosts + u64::from(slot.boosts),
            throttles: sum.throttles + u64::from(slot.throttles),
            boosted_ms: sum.boosted_ms + slot.boosted_ns as f64 / 1e6,
        })
    }
}

impl SlotCounters {
    /// Field-wise maximum (the counters only grow while one daemon runs).
    pub fn max(self, other: Self) -> Self {
        Self {
            boosts: self.boosts.max(other.boosts),
            throttles: self.throttles.max(other.throttles),
            boosted_ns: self.boosted_ns.max(other.boosted_ns),
        }
    }
}

/// The guest's doorbell counters ([`GuestDoorbellCounters`], serialisable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorbellCounts {
    /// Rings sent to the daemon.
    pub rung: u64,
    /// Rings not sent: rate-limited, or not needed.
    pub suppressed: u64,
    /// Doorbell interrupts received from the daemon.
    pub host_interrupts: u64,
}

impl From<GuestDoorbellCounters> for DoorbellCounts {
    fn from(c: GuestDoorbellCounters) -> Self {
        Self {
            rung: c.rung,
            suppressed: c.suppressed,
            host_interrupts: c.host_interrupts,
        }
    }
}

/// One look at a shared page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageSnapshot {
    /// A host header with the pvsched magic is present.
    pub host_formatted: bool,
    /// The host's heartbeat (daemon publish rounds).
    pub host_heartbeat: u64,
    /// The guest module says it is attached.
    pub guest_attached: bool,
    /// The guest module's heartbeat.
    pub guest_heartbeat: u64,
    /// The guest module's doorbell counters (rings sent, rings suppressed, doorbell
    /// interrupts received), as it last published them.
    #[serde(default)]
    pub guest_doorbells: DoorbellCounts,
    /// Per slot, the daemon's counters (consistent reads only; torn ones count as zero).
    pub slots: Vec<SlotCounters>,
}

/// An open shared page.
#[derive(Debug)]
pub struct PageReader {
    file: SharedFile,
    vcpus: u32,
}

impl PageReader {
    /// Maps the shared file at `path` (it must exist; the guest's QEMU created it).
    pub fn open(path: &Path, vcpus: u32) -> Result<Self> {
        let file = SharedFile::open(path, None).map_err(LabError::io("map", path))?;
        Ok(Self { file, vcpus })
    }

    /// Reads the header and the host line of every slot.
    pub fn snapshot(&self) -> PageSnapshot {
        let region = self.file.region();
        let header = region.read_header().unwrap_or_default();
        let slots = (0..self.vcpus)
            .map(|index| {
                region
                    .read_host_line(index)
                    .ok()
                    .and_then(|read| read.consistent())
                    .map(|line| SlotCounters {
                        boosts: line.boosts,
                        throttles: line.throttles,
                        boosted_ns: line.boosted_ns,
                    })
                    .unwrap_or_default()
            })
            .collect();
        PageSnapshot {
            host_formatted: header.host.magic == PVSCHED_MAGIC,
            host_heartbeat: header.host.host_heartbeat,
            guest_attached: header.guest.guest_state == PVSCHED_GUEST_ATTACHED,
            guest_heartbeat: header.guest.guest_heartbeat,
            guest_doorbells: GuestDoorbellCounters::from_header(&header.guest).into(),
            slots,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_totals_sum_every_slot_without_overflowing_a_slot_counter() {
        let slots = [
            SlotCounters {
                boosts: u32::MAX,
                throttles: 2,
                boosted_ns: 1_500_000,
            },
            SlotCounters {
                boosts: 1,
                throttles: 0,
                boosted_ns: 500_000,
            },
        ];
        let totals = SlotTotals::of(&slots);
        assert_eq!(totals.boosts, u64::from(u32::MAX) + 1);
        assert_eq!(totals.throttles, 2);
        assert!((totals.boosted_ms - 2.0).abs() < 1e-9);
        assert_eq!(SlotTotals::of(&[]), SlotTotals::default());
    }

    #[test]
    fn reads_a_formatted_page() {
        let path = std::env::temp_dir().join(format!("pvsched-lab-page-{}", std::process::id()));
        std::fs::write(&path, static_host_header(2)).expect("write header");
        let file = SharedFile::open(&path, Some(1 << 16)).expect("map");
        let mut line = pvsched_abi::raw::PvschedHostLine {
            boosts: 7,
            throttles: 2,
            boosted_ns: 1234,
            ..Default::default()
        };
        file.region().write_host_line(1, &line).expect("host line");
        line.boosts = 3;
        file.region().write_host_line(0, &line).expect("host line");
        file.region()
            .write_header_guest(&pvsched_abi::raw::PvschedHeaderGuest {
                doorbells_rung: 4,
                doorbells_suppressed: 9,
                host_interrupts: 1,
                ..Default::default()
            })
            .expect("guest header");
        drop(file);

        let reader = PageReader::open(&path, 2).expect("open");
        let snapshot = reader.snapshot();
        std::fs::remove_file(&path).expect("cleanup");
        assert!(snapshot.host_formatted);
        assert!(!snapshot.guest_attached);
        assert_eq!(snapshot.slots.len(), 2);
        assert_eq!(snapshot.slots[1].boosts, 7);
        assert_eq!(snapshot.slots[1].throttles, 2);
        assert_eq!(snapshot.slots[0].boosts, 3);
        assert_eq!(
            snapshot.guest_doorbells,
            DoorbellCounts {
                rung: 4,
                suppressed: 9,
                host_interrupts: 1
            }
        );
        let merged = snapshot.slots[0].max(snapshot.slots[1]);
        assert_eq!(merged.boosts, 7);
    }
}
