//! The disk benchmark: one thread reads random block-aligned blocks of a block device
//! with `O_DIRECT` (no guest page cache, so every read goes to the virtual disk and
//! through QEMU's block layer) for a fixed time. Reported: reads per second and every
//! read's latency at p50/p90/p99/max.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::probe::Summary;

/// Largest block size a read may use.
pub const MAX_BLOCK_SIZE: usize = 1 << 20;

/// Shape of one benchmark run.
#[derive(Clone, Debug)]
pub struct IoBenchSpec {
    /// The block device (or file) to read.
    pub disk: PathBuf,
    /// Bytes per read: a power of two of at least 512, the alignment of every offset and
    /// of the buffer (what `O_DIRECT` asks for).
    pub block_size: usize,
    /// How long to read.
    pub duration: Duration,
    /// Seed of the offsets' generator (same seed, same offsets).
    pub seed: u64,
}

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct IoBenchResult {
    /// The device read.
    pub disk: String,
    /// Its size in bytes.
    pub disk_bytes: u64,
    /// Bytes per read.
    pub block_size: usize,
    /// Seconds the reads ran.
    pub seconds: f64,
    /// Reads completed.
    pub reads: u64,
    /// Reads per second.
    pub iops: f64,
    /// Latency of every read, µs.
    pub latency: Summary,
}

/// xorshift64*: cheap, deterministic offsets; no statistical quality is needed beyond
/// not following a pattern the host could prefetch.
struct Offsets {
    state: u64,
    blocks: u64,
    block_size: u64,
}

impl Offsets {
    fn new(seed: u64, blocks: u64, block_size: u64) -> Self {
        Self {
            // xorshift never leaves zero.
            state: seed.max(1),
            blocks,
            block_size,
        }
    }

    fn next_offset(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let random = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (random % self.blocks) * self.block_size
    }
}

/// The `block_size`-aligned window of `buffer` (which is twice `block_size` long).
fn aligned(buffer: &mut [u8], block_size: usize) -> Result<&mut [u8]> {
    let (start, len) = (buffer.as_ptr().align_offset(block_size), buffer.len());
    match buffer.get_mut(start..start + block_size) {
        Some(window) => Ok(window),
        None => bail!("no {block_size}-aligned window in a buffer of {len}"),
    }
}

fn open_direct(disk: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(disk)
        .with_context(|| format!("opening {} with O_DIRECT", disk.display()))
}

/// Runs `spec`: random reads until the duration has passed.
pub fn run(spec: &IoBenchSpec) -> Result<IoBenchResult> {
    let block_size = spec.block_size;
    if !(512..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
        bail!("block size {block_size} must be a power of two in 512..={MAX_BLOCK_SIZE}");
    }
    let mut file = open_direct(&spec.disk)?;
    // A block device's metadata length is 0; its end is its size.
    let disk_bytes = file
        .seek(SeekFrom::End(0))
        .with_context(|| format!("sizing {}", spec.disk.display()))?;
    let blocks = disk_bytes / block_size as u64;
    if blocks == 0 {
        bail!(
            "{} has {disk_bytes} bytes, less than one block of {block_size}",
            spec.disk.display()
        );
    }
    let mut offsets = Offsets::new(spec.seed, blocks, block_size as u64);
    let mut buffer = vec![0u8; 2 * block_size];
    let window = aligned(&mut buffer, block_size)?;
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < spec.duration {
        let offset = offsets.next_offset();
        let before = Instant::now();
        let read = file
            .read_at(window, offset)
            .with_context(|| format!("reading {block_size} bytes at {offset}"))?;
        latencies.push(before.elapsed().as_nanos() as u64);
        if read != block_size {
            bail!("short read at {offset}: {read} of {block_size} bytes");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let reads = latencies.len() as u64;
    Ok(IoBenchResult {
        disk: spec.disk.display().to_string(),
        disk_bytes,
        block_size,
        seconds,
        reads,
        iops: reads as f64 / seconds,
        latency: Summary::of(latencies),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn offsets_are_block_aligned_inside_the_disk_and_repeat_with_the_seed() {
        let mut a = Offsets::new(7, 100, 4096);
        let mut b = Offsets::new(7, 100, 4096);
        let first: Vec<u64> = (0..1000).map(|_| a.next_offset()).collect();
        assert!(first.iter().all(|&o| o % 4096 == 0 && o < 100 * 4096));
        assert_eq!(
            first,
            (0..1000).map(|_| b.next_offset()).collect::<Vec<_>>()
        );
        let distinct: std::collections::BTreeSet<_> = first.iter().collect();
        assert!(
            distinct.len() > 50,
            "offsets cover the disk: {}",
            distinct.len()
        );
    }

    #[test]
    fn the_buffer_window_is_aligned() {
        let mut buffer = vec![0u8; 8192];
        let window = aligned(&mut buffer, 4096).expect("window");
        assert_eq!(window.len(), 4096);
        assert_eq!(window.as_ptr() as usize % 4096, 0);
    }

    #[test]
    fn a_run_reads_a_file_and_counts_every_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let mut file = File::create(&path).expect("create");
        file.write_all(&vec![0x5a; 64 * 4096]).expect("fill");
        drop(file);
        let spec = IoBenchSpec {
            disk: path,
            block_size: 4096,
            duration: Duration::from_millis(50),
            seed: 1,
        };
        match run(&spec) {
            Ok(r) => {
                assert_eq!(r.disk_bytes, 64 * 4096);
                assert!(r.reads > 0);
                assert_eq!(r.latency.count as u64, r.reads);
                assert!(r.latency.p50_us <= r.latency.p99_us);
                assert!(r.latency.p99_us <= r.latency.max_us);
            }
            // tmpfs before Linux 6.6 refuses O_DIRECT; that is the only failure allowed.
            Err(error) => assert!(
                format!("{error:#}").contains("Invalid argument"),
                "{error:#}"
            ),
        }
        let odd = IoBenchSpec {
            block_size: 1000,
            ..spec
        };
        assert!(
            run(&odd).is_err(),
            "a block size that is not a power of two"
        );
    }
}
