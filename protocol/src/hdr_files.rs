//! The HdrHistogram file formats both the server and `xiaozhi-bench` write, kept in one place so
//! their outputs are comparable: the server's `/histograms/…` answers and dumps and a bench run
//! of the same scenario load into the same tools with the same layout. It lives in the protocol
//! crate because that is the one crate the two share; it depends on nothing but `hdrhistogram`.
//!
//! - `.hgrm`: the percentile distribution text of HdrHistogram's `outputPercentileDistribution`
//!   (what the online plotter and HistogramLogAnalyzer read).
//! - `.hlog`: an interval log, one V2 + deflate compressed histogram per interval, readable by
//!   HdrHistogram's `HistogramLogProcessor` and the crate's `IntervalLogIterator`.

use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

/// Writes `h` as a percentile distribution, every value divided by `scale` (1000 turns µs
/// into ms), five steps per halving of the tail.
pub fn write_hgrm(h: &Histogram<u64>, out: &mut impl Write, scale: f64) -> io::Result<()> {
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = v.value_iterated_to() as f64 / scale;
        if q < 1.0 {
            writeln!(
                out,
                "{value:>12.3} {q:>14.12} {total:>10} {:>14.2}",
                1.0 / (1.0 - q)
            )?;
        } else {
            writeln!(out, "{value:>12.3} {q:>14.12} {total:>10}")?;
        }
    }
    writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / scale,
        h.stdev() / scale
    )?;
    writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / scale,
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        h.distinct_values()
    )
}

/// One interval of an interval log: its start (since the log's start time), its length and
/// the values recorded in it.
pub struct Interval<'a> {
    /// Start, relative to the log's `StartTime`.
    pub start: Duration,
    /// Length.
    pub length: Duration,
    /// Values recorded during the interval.
    pub hist: &'a Histogram<u64>,
}

/// Writes an interval log (V2 + deflate histograms) whose `StartTime` and `BaseTime` are
/// `start_wall`; `max_value_divisor` scales only the max column (1000: µs values read as ms).
pub fn write_hlog<'a>(
    comment: &str,
    start_wall: SystemTime,
    max_value_divisor: f64,
    intervals: impl IntoIterator<Item = Interval<'a>>,
    out: &mut impl Write,
) -> io::Result<()> {
    let mut serializer = V2DeflateSerializer::new();
    let mut writer = IntervalLogWriterBuilder::new()
        .add_comment(comment)
        .with_start_time(start_wall)
        .with_base_time(start_wall)
        .with_max_value_divisor(max_value_divisor)
        .begin_log_with(out, &mut serializer)?;
    for i in intervals {
        writer
            .write_histogram(i.hist, i.start, i.length, None)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
    }
    Ok(())
}
