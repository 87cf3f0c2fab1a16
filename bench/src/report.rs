//! Collecting device reports into HdrHistograms and writing them out: `.hgrm` percentile
//! distributions, `.hlog` interval logs (HdrHistogram log format, V2 + deflate), `summary.json`
//! and a compact table.
//!
//! Values are recorded in microseconds; `.hgrm` files, `summary.json` and the table show
//! milliseconds (the `.hlog` files keep microseconds, with a `MaxValueDivisor` of 1000 so their
//! per-interval max column reads in ms). Each measurement lands in the interval in which it
//! completed, counted from the start of the run.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use xiaozhi_protocol::hdr_files;

use crate::device::Report;
use crate::outcome::ErrorKind;

pub use xiaozhi_protocol::hdr_files::write_hgrm;

/// Largest recordable value: one hour in µs (larger values saturate).
const MAX_US: u64 = 3_600_000_000;

/// A measured quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// Intended last speech frame → `stt`.
    Stt,
    /// Intended last speech frame → first reply audio frame.
    FirstAudio,
    /// Intended last speech frame → `tts stop`.
    TtsStop,
    /// WebSocket connect → server hello.
    ConnectHello,
    /// OTA request → answer.
    Ota,
    /// |inter-arrival gap − frame duration| of reply audio frames.
    FrameJitter,
    /// Per interaction, the most delayed uplink frame against its schedule: the bench's own
    /// timeliness. If this grows, the bench is overloaded and its numbers are not trustworthy.
    SendLag,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 7] = [
        Metric::Stt,
        Metric::FirstAudio,
        Metric::TtsStop,
        Metric::ConnectHello,
        Metric::Ota,
        Metric::FrameJitter,
        Metric::SendLag,
    ];

    /// File stem and JSON key.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Stt => "stt",
            Metric::FirstAudio => "first_audio",
            Metric::TtsStop => "tts_stop",
            Metric::ConnectHello => "connect_hello",
            Metric::Ota => "ota",
            Metric::FrameJitter => "frame_jitter",
            Metric::SendLag => "send_lag",
        }
    }

    /// What it measures, for file headers.
    pub fn describe(self) -> &'static str {
        match self {
            Metric::Stt => "intended last speech frame -> stt",
            Metric::FirstAudio => "intended last speech frame -> first reply audio frame",
            Metric::TtsStop => "intended last speech frame -> tts stop",
            Metric::ConnectHello => "websocket connect -> server hello",
            Metric::Ota => "OTA request -> answer",
            Metric::FrameJitter => "reply audio |inter-arrival gap - frame duration|",
            Metric::SendLag => "bench self-check: max uplink frame delay per interaction",
        }
    }
}

/// A new histogram for µs values up to an hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; this cannot fail.
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|_| unreachable!())
}

/// One metric over the whole run and per interval.
#[derive(Debug, Clone)]
pub struct Series {
    /// Everything.
    pub total: Histogram<u64>,
    /// By interval index (completion time ÷ interval length).
    pub intervals: BTreeMap<u64, Histogram<u64>>,
}

impl Series {
    fn new() -> Series {
        Series {
            total: new_histogram(),
            intervals: BTreeMap::new(),
        }
    }
}

/// Aggregates what the devices report.
pub struct Recorder {
    start: Instant,
    interval: Duration,
    series: BTreeMap<Metric, Series>,
    /// Interactions by error kind (an interaction with two kinds counts in both).
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Interactions reported.
    pub interactions: u64,
    /// Interactions without any error.
    pub ok: u64,
    /// Connect attempts.
    pub connects: u64,
    /// Connects that reached the server's hello.
    pub connects_ok: u64,
    /// Reply audio frames received.
    pub frames: u64,
}

impl Recorder {
    /// A recorder whose intervals count from `start`.
    pub fn new(start: Instant, interval: Duration) -> Recorder {
        Recorder {
            start,
            interval: interval.max(Duration::from_millis(1)),
            series: Metric::ALL.iter().map(|m| (*m, Series::new())).collect(),
            errors: ErrorKind::ALL.iter().map(|k| (*k, 0)).collect(),
            interactions: 0,
            ok: 0,
            connects: 0,
            connects_ok: 0,
            frames: 0,
        }
    }

    /// Records `us` microseconds of `metric`, completed at `at`.
    pub fn record_us(&mut self, metric: Metric, at: Instant, us: u64) {
        let index =
            (at.saturating_duration_since(self.start).as_nanos() / self.interval.as_nanos()) as u64;
        if let Some(s) = self.series.get_mut(&metric) {
            s.total.saturating_record(us);
            s.intervals
                .entry(index)
                .or_insert_with(new_histogram)
                .saturating_record(us);
        }
    }

    /// Records a duration.
    pub fn record(&mut self, metric: Metric, at: Instant, d: Duration) {
        self.record_us(metric, at, u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Adds one device report.
    pub fn add(&mut self, report: &Report) {
        match report {
            Report::Connect { at, ota, result } => {
                self.connects += 1;
                if let Some(d) = ota {
                    self.record(Metric::Ota, *at, *d);
                }
                if let Ok(d) = result {
                    self.connects_ok += 1;
                    self.record(Metric::ConnectHello, *at, *d);
                }
            }
            Report::Interaction {
                at,
                verdict,
                frames,
                jitter_us,
                send_lag,
            } => {
                self.interactions += 1;
                if verdict.errors.is_empty() {
                    self.ok += 1;
                }
                for kind in &verdict.errors {
                    *self.errors.entry(*kind).or_insert(0) += 1;
                }
                self.frames += u64::from(*frames);
                for (metric, d) in [
                    (Metric::Stt, verdict.stt),
                    (Metric::FirstAudio, verdict.first_audio),
                    (Metric::TtsStop, verdict.tts_stop),
                ] {
                    if let Some(d) = d {
                        self.record(metric, *at, d);
                    }
                }
                if let Some(d) = send_lag {
                    self.record(Metric::SendLag, *at, *d);
                }
                for us in jitter_us {
                    self.record_us(Metric::FrameJitter, *at, *us);
                }
            }
        }
    }

    /// A metric's series.
    pub fn series(&self, metric: Metric) -> &Series {
        // Every metric has a series from `new`.
        &self.series[&metric]
    }

    /// Interval length.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// Percentiles of a histogram of µs values, in ms.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest value.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// Percentiles in ms (rounded to µs) of a µs histogram.
pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p95: ms(h.value_at_quantile(0.95)),
        p99: ms(h.value_at_quantile(0.99)),
        p99_9: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        mean: h.mean().round() / 1000.0,
    }
}

/// The interval log of `metric` (values in µs, max column in ms).
pub fn write_hlog(
    series: &Series,
    metric: Metric,
    start_wall: SystemTime,
    interval: Duration,
    out: &mut impl Write,
) -> io::Result<()> {
    let comment = format!(
        "xiaozhi-bench {}: {} (values in microseconds)",
        metric.name(),
        metric.describe()
    );
    let intervals = series
        .intervals
        .iter()
        .map(|(index, h)| hdr_files::Interval {
            start: interval * u32::try_from(*index).unwrap_or(u32::MAX),
            length: interval,
            hist: h,
        });
    hdr_files::write_hlog(&comment, start_wall, 1000.0, intervals, out)
}

/// The `errors` object: every kind, zero or not.
pub fn errors_json(errors: &BTreeMap<ErrorKind, u64>) -> Value {
    let map: serde_json::Map<String, Value> = ErrorKind::ALL
        .iter()
        .map(|k| {
            (
                k.name().to_owned(),
                json!(errors.get(k).copied().unwrap_or(0)),
            )
        })
        .collect();
    Value::Object(map)
}

/// The `metrics_ms` object: percentiles of every metric that has samples.
pub fn metrics_json(rec: &Recorder) -> Value {
    let map: serde_json::Map<String, Value> = Metric::ALL
        .iter()
        .filter(|m| !rec.series(**m).total.is_empty())
        .map(|m| {
            let p = percentiles(&rec.series(*m).total);
            (m.name().to_owned(), json!(p))
        })
        .collect();
    Value::Object(map)
}

/// The compact table printed at the end of a run.
pub fn table(rec: &Recorder) -> String {
    let mut s = format!(
        "{:<14} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}   (ms)\n",
        "metric", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for m in Metric::ALL {
        let h = &rec.series(m).total;
        if h.is_empty() {
            continue;
        }
        let p = percentiles(h);
        s.push_str(&format!(
            "{:<14} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
            m.name(),
            p.count,
            p.p50,
            p.p90,
            p.p99,
            p.p99_9,
            p.max
        ));
    }
    let errors: Vec<String> = rec
        .errors
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{} {n}", k.name()))
        .collect();
    s.push_str(&format!(
        "errors: {}\n",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(", ")
        }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Verdict;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut h = new_histogram();
        for ms in 1..=1000u64 {
            h.record(ms * 1000).unwrap();
        }
        let p = percentiles(&h);
        assert_eq!(p.count, 1000);
        // 3 significant digits: values are exact to within 0.1 %.
        for (got, want) in [
            (p.p50, 500.0),
            (p.p90, 900.0),
            (p.p99, 990.0),
            (p.p99_9, 999.0),
        ] {
            assert!((got - want).abs() <= want * 0.001, "{got} vs {want}");
        }
        assert!((p.max - 1000.0).abs() <= 1.0);
        assert!((p.mean - 500.5).abs() <= 0.5);
    }

    #[test]
    fn hlog_round_trips_through_v2_deflate() {
        let t0 = Instant::now();
        let mut rec = Recorder::new(t0, Duration::from_secs(1));
        for i in 0..200u64 {
            let at = t0 + Duration::from_millis(i * 15);
            rec.record_us(Metric::FirstAudio, at, 500_000 + i * 997);
        }
        let series = rec.series(Metric::FirstAudio);
        assert_eq!(series.intervals.len(), 3, "0-1 s, 1-2 s, 2-3 s");
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut buf = Vec::new();
        write_hlog(series, Metric::FirstAudio, wall, rec.interval(), &mut buf).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.contains("#[StartTime: 1700000000.000"), "{text}");

        let mut read = Vec::new();
        for entry in IntervalLogIterator::new(&buf) {
            if let LogEntry::Interval(ilh) = entry.unwrap() {
                let bytes = base64_decode(ilh.encoded_histogram());
                let h: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .unwrap();
                read.push((ilh.start_timestamp(), ilh.duration(), h));
            }
        }
        assert_eq!(read.len(), 3);
        for ((start, duration, h), (index, original)) in read.iter().zip(&series.intervals) {
            assert_eq!(*start, Duration::from_secs(*index));
            assert_eq!(*duration, Duration::from_secs(1));
            assert_eq!(h, original);
        }
        let merged = read.iter().fold(new_histogram(), |mut acc, (_, _, h)| {
            acc.add(h).unwrap();
            acc
        });
        assert_eq!(merged, series.total);
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    #[test]
    fn hgrm_counts_are_cumulative_and_end_at_the_total() {
        let mut h = new_histogram();
        for v in [1000u64, 2000, 2000, 4000] {
            h.record(v).unwrap();
        }
        let mut out = Vec::new();
        write_hgrm(&h, &mut out, 1000.0).unwrap();
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        let counts: Vec<u64> = rows.iter().map(|r| r[2].parse().unwrap()).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{text}");
        assert_eq!(*counts.last().unwrap(), 4);
        // Like HdrHistogram's Java output: the highest value equivalent to the recorded 4 ms.
        let last: f64 = rows.last().unwrap()[0].parse().unwrap();
        assert!((4.0..=4.004).contains(&last), "{last}");
        assert!(text.contains("Total count    =            4"));
    }

    #[test]
    fn recorder_counts_interactions_errors_and_latencies() {
        let t0 = Instant::now();
        let mut rec = Recorder::new(t0, Duration::from_secs(1));
        let ok = Verdict {
            errors: vec![],
            stt: Some(Duration::from_millis(300)),
            first_audio: Some(Duration::from_millis(600)),
            tts_stop: None,
        };
        let bad = Verdict {
            errors: vec![ErrorKind::EarlyStt, ErrorKind::Alert],
            ..Verdict::default()
        };
        for verdict in [ok.clone(), ok, bad] {
            rec.add(&Report::Interaction {
                at: t0,
                verdict,
                frames: 10,
                jitter_us: vec![1000, 2000],
                send_lag: Some(Duration::from_micros(150)),
            });
        }
        rec.add(&Report::Connect {
            at: t0,
            ota: None,
            result: Err(ErrorKind::Refused),
        });
        assert_eq!((rec.interactions, rec.ok, rec.frames), (3, 2, 30));
        assert_eq!((rec.connects, rec.connects_ok), (1, 0));
        assert_eq!(rec.errors[&ErrorKind::EarlyStt], 1);
        assert_eq!(
            rec.errors[&ErrorKind::Refused],
            0,
            "connect reports do not count errors"
        );
        assert_eq!(rec.series(Metric::Stt).total.len(), 2);
        assert_eq!(rec.series(Metric::TtsStop).total.len(), 0);
        assert_eq!(rec.series(Metric::FrameJitter).total.len(), 6);
        assert_eq!(rec.series(Metric::SendLag).total.len(), 3);
        let e = errors_json(&rec.errors);
        assert_eq!(e["alert"], 1);
        assert_eq!(e["no_stt"], 0);
        assert!(table(&rec).contains("errors: early_stt 1, alert 1"));
    }
}
