//! Parsing cyclictest's histogram output (`--histogram`, `--histfile`) into latency figures.
//!
//! The guest prints the histogram file with empty rows removed. Format, per rt-tests
//! `print_hist()`:
//!
//! ```text
//! # Histogram                  (columns are tab-separated)
//! 000042 000003 000001         bucket (µs), one count per thread[, all threads with -H]
//! # Total: 000004845 000004846  samples inside the histogram, per thread[, all]
//! # Min Latencies: 00042 00048  per thread
//! # Avg Latencies: 00157 00157  per thread, over all cycles, truncated to µs
//! # Max Latencies: 07915 06972  per thread[, all]
//! # Histogram Overflows: 00000 00000   samples above the histogram, per thread[, all]
//! ```
//!
//! Lines that are none of these (cyclictest's own notices, stray kernel messages) are
//! skipped, so the parser can be fed the whole result section of the console.

use serde::{Deserialize, Serialize};

/// Why cyclictest output could not be turned into a summary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A summary line (`# Total:` ...) is missing.
    #[error("no `{0}` line")]
    MissingLine(&'static str),
    /// A number could not be parsed.
    #[error("line {line}: bad number {token:?}")]
    BadNumber {
        /// 1-based line number in the input.
        line: usize,
        /// The token.
        token: String,
    },
    /// A line has the wrong number of per-thread columns.
    #[error("line {line}: {found} columns, expected {expected}")]
    ColumnCount {
        /// 1-based line number in the input.
        line: usize,
        /// Columns found.
        found: usize,
        /// Columns expected (threads, or threads + 1 with an all-threads column).
        expected: usize,
    },
    /// The output has no thread at all.
    #[error("no measuring thread in output")]
    NoThreads,
    /// The histogram does not add up to the reported totals.
    #[error("thread {thread}: histogram holds {histogram} samples but Total says {total}")]
    TotalMismatch {
        /// Thread index.
        thread: usize,
        /// Sum of the thread's histogram column.
        histogram: u64,
        /// The `# Total:` value.
        total: u64,
    },
}

/// Figures for one measuring thread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadLatency {
    /// Samples taken, including overflows.
    pub samples: u64,
    /// Samples above the histogram range.
    pub overflows: u64,
    /// Minimum latency (µs).
    pub min_us: u64,
    /// Average latency as cyclictest printed it (µs, truncated).
    pub avg_us: u64,
    /// Maximum latency (µs).
    pub max_us: u64,
}

/// Latency figures over all measuring threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples taken by all threads, including overflows.
    pub samples: u64,
    /// Samples above the histogram range.
    pub overflows: u64,
    /// Minimum latency (µs).
    pub min_us: u64,
    /// Average latency (µs). Exact from the histogram when nothing overflowed, otherwise
    /// the sample-weighted mean of cyclictest's per-thread averages.
    pub avg_us: f64,
    /// 99th percentile (µs): the smallest bucket at or below which 99% of samples lie.
    pub p99_us: u64,
    /// True when the 99th percentile falls among the overflows, so `p99_us` is only the
    /// histogram limit and the real value is larger.
    pub p99_is_lower_bound: bool,
    /// Maximum latency (µs).
    pub max_us: u64,
    /// Per-thread figures, in cyclictest's thread order.
    pub threads: Vec<ThreadLatency>,
}

/// Parses histogram output (see the module documentation) into a [`LatencySummary`].
/// `histogram_size_us` is the `--histogram` value the output was produced with; it bounds
/// the 99th percentile from below when that percentile overflowed.
pub fn parse_histogram(text: &str, histogram_size_us: u64) -> Result<LatencySummary, ParseError> {
    let summary = SummaryLines::collect(text)?;
    let threads = summary.min.len();
    if threads == 0 {
        return Err(ParseError::NoThreads);
    }
    for (name, values) in [
        ("# Total:", &summary.total),
        ("# Avg Latencies:", &summary.avg),
        ("# Max Latencies:", &summary.max),
        ("# Histogram Overflows:", &summary.overflows),
    ] {
        // -H adds an all-threads column to some lines.
        if values.len() != threads && values.len() != threads + 1 {
            return Err(ParseError::ColumnCount {
                line: summary.line_of(name),
                found: values.len(),
                expected: threads,
            });
        }
    }

    // buckets[i] = (latency µs, samples over all threads)
    let mut buckets: Vec<(u64, u64)> = Vec::new();
    let mut per_thread_histogram = vec![0u64; threads];
    for (index, line) in text.lines().enumerate() {
        let mut tokens = line.split_whitespace();
        let Some(first) = tokens.next() else { continue };
        if !first.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let bucket = parse_number(first, index + 1)?;
        let counts = tokens
            .map(|token| parse_number(token, index + 1))
            .collect::<Result<Vec<u64>, _>>()?;
        if counts.len() != threads && counts.len() != threads + 1 {
            return Err(ParseError::ColumnCount {
                line: index + 1,
                found: counts.len(),
                expected: threads,
            });
        }
        let mut all = 0;
        for (thread, count) in counts.iter().take(threads).enumerate() {
            per_thread_histogram[thread] += count;
            all += count;
        }
        buckets.push((bucket, all));
    }
    for (thread, (&histogram, &total)) in
        per_thread_histogram.iter().zip(&summary.total).enumerate()
    {
        if histogram != total {
            return Err(ParseError::TotalMismatch {
                thread,
                histogram,
                total,
            });
        }
    }

    let per_thread: Vec<ThreadLatency> = (0..threads)
        .map(|t| ThreadLatency {
            samples: summary.total[t] + summary.overflows[t],
            overflows: summary.overflows[t],
            min_us: summary.min[t],
            avg_us: summary.avg[t],
            max_us: summary.max[t],
        })
        .collect();
    let in_histogram: u64 = summary.total.iter().take(threads).sum();
    let overflows: u64 = summary.overflows.iter().take(threads).sum();
    let samples = in_histogram + overflows;

    let avg_us = if samples == 0 {
        0.0
    } else if overflows == 0 {
        let weighted: u128 = buckets
            .iter()
            .map(|&(bucket, count)| u128::from(bucket) * u128::from(count))
            .sum();
        weighted as f64 / samples as f64
    } else {
        let weighted: u128 = per_thread
            .iter()
            .map(|t| u128::from(t.avg_us) * u128::from(t.samples))
            .sum();
        weighted as f64 / samples as f64
    };

    buckets.sort_unstable();
    let (p99_us, p99_is_lower_bound) = match percentile(&buckets, samples, 99) {
        // Every overflow is at least the histogram size.
        Some(bucket) => (bucket, false),
        None => (histogram_size_us, true),
    };

    Ok(LatencySummary {
        samples,
        overflows,
        min_us: per_thread.iter().map(|t| t.min_us).min().unwrap_or(0),
        avg_us,
        p99_us,
        p99_is_lower_bound,
        max_us: per_thread.iter().map(|t| t.max_us).max().unwrap_or(0),
        threads: per_thread,
    })
}

/// The `(latency µs, samples of all threads)` rows of histogram output, sorted by latency
/// (overflows are not in it). Empty when the output has no summary lines.
pub fn histogram_buckets(text: &str) -> Vec<(u64, u64)> {
    let Ok(summary) = SummaryLines::collect(text) else {
        return Vec::new();
    };
    let threads = summary.min.len();
    let mut buckets: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let mut tokens = line.split_whitespace();
        let Some(first) = tokens.next() else { continue };
        if !first.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(bucket) = first.parse::<u64>() else {
            continue;
        };
        let count: u64 = tokens
            .take(threads)
            .filter_map(|token| token.parse::<u64>().ok())
            .sum();
        if count > 0 {
            buckets.push((bucket, count));
        }
    }
    merge_buckets(&[buckets])
}

/// Adds histograms bucket by bucket; the result is sorted by latency.
pub fn merge_buckets(histograms: &[Vec<(u64, u64)>]) -> Vec<(u64, u64)> {
    let mut merged = std::collections::BTreeMap::new();
    for &(bucket, count) in histograms.iter().flatten() {
        *merged.entry(bucket).or_insert(0u64) += count;
    }
    merged.into_iter().collect()
}

/// One summary over several cyclictest runs (several guests): sample-weighted mean, 99th
/// percentile of the merged histogram `buckets` (with `histogram_size_us` as the lower bound
/// when it falls among the overflows), extreme min and max, all threads.
pub fn merge_summaries(
    parts: &[LatencySummary],
    buckets: &[(u64, u64)],
    histogram_size_us: u64,
) -> LatencySummary {
    let samples: u64 = parts.iter().map(|part| part.samples).sum();
    let overflows = parts.iter().map(|part| part.overflows).sum();
    let avg_us = if samples == 0 {
        0.0
    } else {
        parts
            .iter()
            .map(|part| part.avg_us * part.samples as f64)
            .sum::<f64>()
            / samples as f64
    };
    let (p99_us, p99_is_lower_bound) = match percentile(buckets, samples, 99) {
        Some(bucket) => (bucket, false),
        None => (histogram_size_us, true),
    };
    LatencySummary {
        samples,
        overflows,
        min_us: parts.iter().map(|part| part.min_us).min().unwrap_or(0),
        avg_us,
        p99_us,
        p99_is_lower_bound,
        max_us: parts.iter().map(|part| part.max_us).max().unwrap_or(0),
        threads: parts.iter().flat_map(|part| part.threads.clone()).collect(),
    }
}

/// The `percent` percentile over sorted `(bucket, count)` pairs holding `samples` samples
/// in all (overflows included), or `None` when the rank lies beyond the histogram.
fn percentile(buckets: &[(u64, u64)], samples: u64, percent: u64) -> Option<u64> {
    if samples == 0 {
        return Some(0);
    }
    // Nearest-rank: the smallest value with at least ceil(p% * n) samples at or below it.
    let rank = (samples * percent).div_ceil(100);
    let mut seen = 0;
    for &(bucket, count) in buckets {
        seen += count;
        if seen >= rank {
            return Some(bucket);
        }
    }
    None
}

fn parse_number(token: &str, line: usize) -> Result<u64, ParseError> {
    token.parse().map_err(|_| ParseError::BadNumber {
        line,
        token: token.to_owned(),
    })
}

/// The `# Name: v v v` summary lines, with where each was found.
#[derive(Default)]
struct SummaryLines {
    total: Vec<u64>,
    min: Vec<u64>,
    avg: Vec<u64>,
    max: Vec<u64>,
    overflows: Vec<u64>,
    lines: Vec<(&'static str, usize)>,
}

impl SummaryLines {
    const NAMES: [&'static str; 5] = [
        "# Total:",
        "# Min Latencies:",
        "# Avg Latencies:",
        "# Max Latencies:",
        "# Histogram Overflows:",
    ];

    fn collect(text: &str) -> Result<Self, ParseError> {
        let mut found = Self::default();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            for (slot, name) in Self::NAMES.into_iter().enumerate() {
                let Some(rest) = line.strip_prefix(name) else {
                    continue;
                };
                let values = rest
                    .split_whitespace()
                    .map(|token| parse_number(token, index + 1))
                    .collect::<Result<Vec<u64>, _>>()?;
                *found.slot(slot) = values;
                found.lines.push((name, index + 1));
            }
        }
        for name in Self::NAMES {
            if !found.lines.iter().any(|&(seen, _)| seen == name) {
                return Err(ParseError::MissingLine(name));
            }
        }
        Ok(found)
    }

    fn slot(&mut self, index: usize) -> &mut Vec<u64> {
        match index {
            0 => &mut self.total,
            1 => &mut self.min,
            2 => &mut self.avg,
            3 => &mut self.max,
            _ => &mut self.overflows,
        }
    }

    fn line_of(&self, name: &str) -> usize {
        self.lines
            .iter()
            .find(|&&(seen, _)| seen == name)
            .map_or(0, |&(_, line)| line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads, nothing overflowed: 10 samples at 10 µs, 89 at 20 µs, 1 at 900 µs.
    const SMALL: &str = "\
# /dev/cpu_dma_latency set to 0us
# Histogram
000010 000005\t000005
000020 000045\t000044
000900 000000\t000001
# Total: 000000050 000000050
# Min Latencies: 00010 00010
# Avg Latencies: 00019 00036
# Max Latencies: 00020 00900
# Histogram Overflows: 00000 00000
# Histogram Overflow at cycle number:
# Thread 0:
# Thread 1:
";

    #[test]
    fn small_histogram() {
        let summary = parse_histogram(SMALL, 1000).expect("parse");
        assert_eq!(summary.samples, 100);
        assert_eq!(summary.overflows, 0);
        assert_eq!(summary.min_us, 10);
        assert_eq!(summary.max_us, 900);
        // (10*10 + 89*20 + 900) / 100
        assert!((summary.avg_us - 27.8).abs() < 1e-9, "{}", summary.avg_us);
        // rank 99 lands on the 20 µs bucket (10 + 89 = 99 samples).
        assert_eq!(summary.p99_us, 20);
        assert!(!summary.p99_is_lower_bound);
        assert_eq!(summary.threads.len(), 2);
        assert_eq!(summary.threads[1].max_us, 900);
    }

    #[test]
    fn buckets_and_merge() {
        let buckets = histogram_buckets(SMALL);
        assert_eq!(buckets, [(10, 10), (20, 89), (900, 1)]);
        let summary = parse_histogram(SMALL, 1000).expect("parse");
        let merged_buckets = merge_buckets(&[buckets.clone(), buckets]);
        assert_eq!(merged_buckets, [(10, 20), (20, 178), (900, 2)]);
        let merged = merge_summaries(&[summary.clone(), summary.clone()], &merged_buckets, 1000);
        assert_eq!(merged.samples, 200);
        assert!((merged.avg_us - summary.avg_us).abs() < 1e-9);
        assert_eq!(merged.p99_us, 20);
        assert_eq!(merged.max_us, 900);
        assert_eq!(merged.threads.len(), 4);
        assert!(histogram_buckets("no summary").is_empty());
    }

    #[test]
    fn overflowing_p99_is_a_lower_bound() {
        let text = "\
000005 000090
# Total: 000000090
# Min Latencies: 00005
# Avg Latencies: 00105
# Max Latencies: 02500
# Histogram Overflows: 00010
";
        let summary = parse_histogram(text, 100).expect("parse");
        assert_eq!(summary.samples, 100);
        assert_eq!(summary.overflows, 10);
        assert!(summary.p99_is_lower_bound);
        assert_eq!(summary.p99_us, 100);
        assert!((summary.avg_us - 105.0).abs() < 1e-9);
    }

    #[test]
    fn all_threads_column_is_ignored() {
        let text = "\
000003 000001\t000002\t000003
# Total: 000000001 000000002 000000003
# Min Latencies: 00003 00003
# Avg Latencies: 00003 00003
# Max Latencies: 00003 00003 00003
# Histogram Overflows: 00000 00000 00000
";
        let summary = parse_histogram(text, 100).expect("parse");
        assert_eq!(summary.samples, 3);
        assert_eq!(summary.p99_us, 3);
    }

    #[test]
    fn stray_kernel_lines_are_skipped() {
        let text = format!("[    3.14] random: crng init done\n{SMALL}");
        assert_eq!(parse_histogram(&text, 1000).expect("parse").samples, 100);
    }

    #[test]
    fn missing_summary_is_an_error() {
        let err = parse_histogram("000001 000001\n", 10).expect_err("must fail");
        assert_eq!(err, ParseError::MissingLine("# Total:"));
    }

    #[test]
    fn mismatched_total_is_an_error() {
        let text = SMALL.replace("# Total: 000000050", "# Total: 000000051");
        assert!(matches!(
            parse_histogram(&text, 1000),
            Err(ParseError::TotalMismatch { thread: 0, .. })
        ));
    }

    #[test]
    fn wrong_column_count_is_an_error() {
        let text = SMALL.replace("000020 000045\t000044", "000020 000045");
        assert!(matches!(
            parse_histogram(&text, 1000),
            Err(ParseError::ColumnCount {
                found: 1,
                expected: 2,
                ..
            })
        ));
    }

    /// Whole serial console of a real 2-vCPU TCG guest (idle host), captured with
    /// `lab_run --save-console`; the parser skips the marker lines around the result.
    const CAPTURE_IDLE: &str = include_str!("../tests/fixtures/console-cyclictest-tcg-idle.txt");
    /// Same, with the host loaded by stress-ng.
    const CAPTURE_LOADED: &str =
        include_str!("../tests/fixtures/console-cyclictest-tcg-loaded.txt");

    #[test]
    fn real_capture_idle_host() {
        let summary = parse_histogram(CAPTURE_IDLE, 100_000).expect("parse");
        assert_eq!(summary.samples, 4992 + 4995);
        assert_eq!(summary.overflows, 0);
        assert_eq!(summary.min_us, 47);
        assert_eq!(summary.max_us, 3325);
        assert_eq!(summary.p99_us, 293);
        assert!(!summary.p99_is_lower_bound);
        // Histogram mean lies between cyclictest's truncated per-thread averages (133, 117).
        assert!(
            (125.0..126.0).contains(&summary.avg_us),
            "{}",
            summary.avg_us
        );
        assert_eq!(summary.threads[0].avg_us, 133);
    }

    #[test]
    fn real_capture_loaded_host() {
        let summary = parse_histogram(CAPTURE_LOADED, 100_000).expect("parse");
        assert_eq!(summary.samples, 3328 + 3277);
        assert_eq!(summary.max_us, 35844);
        assert_eq!(summary.p99_us, 8428);
        assert!(summary.avg_us > 600.0, "{}", summary.avg_us);
    }

    #[test]
    fn percentile_nearest_rank() {
        let buckets = [(1, 50), (2, 49), (3, 1)];
        assert_eq!(percentile(&buckets, 100, 99), Some(2));
        assert_eq!(percentile(&buckets, 100, 100), Some(3));
        assert_eq!(percentile(&buckets, 100, 50), Some(1));
        assert_eq!(percentile(&buckets, 101, 100), None);
        assert_eq!(percentile(&[], 0, 99), Some(0));
    }
}
