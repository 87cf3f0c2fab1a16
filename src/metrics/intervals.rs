//! The interval log behind `/histograms/<stage>.hlog` and the dumps.
//!
//! Shard 0 owns an [`IntervalLog`]: every `metrics.interval_ms` it collects every shard's
//! cumulative histograms (over the control channels), and the difference to the previous
//! collection becomes one interval. Intervals are kept V2 + deflate compressed (a few hundred
//! bytes per stage with samples, nothing for an empty one), at most `metrics.keep_intervals` of
//! them. Merging, subtracting, compressing and rendering are CPU work of a millisecond or more,
//! so they run in the functions here, which the shard calls on glommio's blocking thread pool.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;

use super::hdr_export::{self, Interval};
use super::{Stage, StageHistograms};

/// One interval: when it started (since the log began), how long it was, and per stage the
/// compressed histogram of what was recorded in it (`None`: nothing was).
#[derive(Clone)]
pub struct IntervalRecord {
    /// Start, relative to [`IntervalLog::started`].
    pub start: Duration,
    /// Length.
    pub length: Duration,
    /// V2 + deflate bytes per stage, in [`Stage::ALL`] order.
    pub stages: Vec<Option<Vec<u8>>>,
}

/// The cumulative histograms seen last and the retained intervals.
pub struct IntervalLog {
    /// Wall-clock time the log began (the `.hlog` `StartTime`).
    pub started: SystemTime,
    /// Retained intervals, oldest first.
    pub records: VecDeque<IntervalRecord>,
    keep: usize,
    /// Cumulative histograms at the end of the last interval.
    last: Option<StageHistograms>,
    /// Start of the interval in progress, relative to `started`.
    next_start: Duration,
}

/// A copy of the retained intervals, for rendering elsewhere.
#[derive(Clone)]
pub struct IntervalLogCopy {
    /// Wall-clock time the log began.
    pub started: SystemTime,
    /// Retained intervals, oldest first.
    pub records: Vec<IntervalRecord>,
}

impl IntervalLog {
    /// An empty log that keeps at most `keep` intervals.
    pub fn new(started: SystemTime, keep: usize) -> Self {
        IntervalLog {
            started,
            records: VecDeque::new(),
            keep: keep.max(1),
            last: None,
            next_start: Duration::ZERO,
        }
    }

    /// Takes the cumulative histograms at the end of the interval in progress (for
    /// [`close_interval`], off the shard) and what that function needs with them.
    pub fn take_last(&mut self) -> Option<StageHistograms> {
        self.last.take()
    }

    /// Stores a closed interval ending at `end` (relative to `started`) whose cumulative
    /// histograms are `cumulative`.
    pub fn push(
        &mut self,
        end: Duration,
        cumulative: StageHistograms,
        stages: Vec<Option<Vec<u8>>>,
    ) {
        let start = self.next_start;
        self.next_start = end.max(start);
        self.last = Some(cumulative);
        self.records.push_back(IntervalRecord {
            start,
            length: end.saturating_sub(start),
            stages,
        });
        while self.records.len() > self.keep {
            self.records.pop_front();
        }
    }

    /// A copy of the retained intervals.
    pub fn copy(&self) -> IntervalLogCopy {
        IntervalLogCopy {
            started: self.started,
            records: self.records.iter().cloned().collect(),
        }
    }

    /// Bytes held by the compressed intervals (for the memory bound's metric).
    pub fn compressed_bytes(&self) -> usize {
        self.records
            .iter()
            .flat_map(|r| r.stages.iter().flatten())
            .map(Vec::len)
            .sum()
    }
}

/// Merges shards' cumulative histograms; with the previous cumulative ones, returns the new
/// cumulative histograms and, per stage, the compressed difference (what the interval saw).
pub fn close_interval(
    previous: Option<StageHistograms>,
    shards: Vec<StageHistograms>,
) -> (StageHistograms, Vec<Option<Vec<u8>>>) {
    let mut cumulative = StageHistograms::default();
    for h in &shards {
        cumulative.merge(h);
    }
    let mut serializer = V2DeflateSerializer::new();
    let stages = Stage::ALL
        .iter()
        .map(|&stage| {
            let mut delta = cumulative.get(stage).clone();
            if let Some(prev) = &previous {
                // A shard that did not answer this time makes the difference negative:
                // that interval then reports nothing rather than something wrong.
                if delta.subtract(prev.get(stage)).is_err() {
                    return None;
                }
            }
            if delta.is_empty() {
                return None;
            }
            let mut bytes = Vec::new();
            serializer.serialize(&delta, &mut bytes).ok()?;
            Some(bytes)
        })
        .collect();
    (cumulative, stages)
}

/// Writes `stage`'s interval log: one line per retained interval (empty intervals included,
/// so gaps read as zero counts rather than missing time).
pub fn write_stage_hlog(
    log: &IntervalLogCopy,
    stage: Stage,
    out: &mut impl Write,
) -> io::Result<()> {
    let index = stage as usize;
    let empty = StageHistograms::default().get(stage).clone();
    let mut deserializer = Deserializer::new();
    let hists: Vec<Histogram<u64>> = log
        .records
        .iter()
        .map(|r| match r.stages.get(index).and_then(Option::as_ref) {
            Some(bytes) => deserializer
                .deserialize(&mut bytes.as_slice())
                .unwrap_or_else(|_| empty.clone()),
            None => empty.clone(),
        })
        .collect();
    let comment = format!(
        "xiaozhi-tpc {}: {} Intervals of the server's merged shard histograms.",
        stage.name(),
        stage.help()
    );
    let divisor = if stage.name().ends_with("_us") {
        1000.0
    } else {
        1.0
    };
    hdr_export::write_hlog(
        &comment,
        log.started,
        divisor,
        log.records.iter().zip(&hists).map(|(r, h)| Interval {
            start: r.start,
            length: r.length,
            hist: h,
        }),
        out,
    )
}

/// Writes `<stage>.hgrm` (values as recorded: µs for `_us` stages) and `<stage>.hlog` for
/// every stage into `dir`, creating it. Returns the number of files written.
pub fn dump(dir: &Path, merged: &StageHistograms, log: &IntervalLogCopy) -> io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut written = 0;
    for stage in Stage::ALL {
        write_replacing(&dir.join(format!("{}.hgrm", stage.name())), |w| {
            hdr_export::write_hgrm(merged.get(stage), w, 1.0)
        })?;
        write_replacing(&dir.join(format!("{}.hlog", stage.name())), |w| {
            write_stage_hlog(log, stage, w)
        })?;
        written += 2;
    }
    Ok(written)
}

/// Writes `path` through a temporary file in the same folder and renames it into place, so a
/// reader (a collector scraping the dump folder) sees the previous dump or the new one, never a
/// file being written.
fn write_replacing(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<std::fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut out = io::BufWriter::new(std::fs::File::create(&tmp)?);
    write(&mut out)?;
    out.flush()?;
    drop(out);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    fn base64_decode(s: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .expect("base64")
    }

    /// Reads an interval log back with the crate's iterator and deserializer.
    fn read_back(bytes: &[u8]) -> Vec<(Duration, Duration, Histogram<u64>)> {
        IntervalLogIterator::new(bytes)
            .filter_map(|e| match e.expect("log entry parses") {
                LogEntry::Interval(i) => Some(i),
                _ => None,
            })
            .map(|i| {
                let h = Deserializer::new()
                    .deserialize(&mut base64_decode(i.encoded_histogram()).as_slice())
                    .expect("histogram deserializes");
                (i.start_timestamp(), i.duration(), h)
            })
            .collect()
    }

    #[test]
    fn intervals_are_differences_and_round_trip_through_the_log() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut log = IntervalLog::new(started, 10);
        // Two shards; each "interval" adds values to their cumulative histograms.
        let mut a = StageHistograms::default();
        let mut b = StageHistograms::default();
        let mut expected = Vec::new();
        for interval in 0..3u64 {
            let mut want = StageHistograms::default();
            for v in 0..50 + interval * 10 {
                let x = 1000 + v * 37 + interval * 100_000;
                let h = if v % 2 == 0 { &mut a } else { &mut b };
                h.record(Stage::EosToFirstAudio, x);
                want.record(Stage::EosToFirstAudio, x);
            }
            let (cumulative, stages) = close_interval(log.take_last(), vec![a.clone(), b.clone()]);
            log.push(Duration::from_secs(10 * (interval + 1)), cumulative, stages);
            expected.push(want);
        }
        assert_eq!(log.records.len(), 3);
        assert!(log.compressed_bytes() > 0);

        let mut out = Vec::new();
        write_stage_hlog(&log.copy(), Stage::EosToFirstAudio, &mut out).expect("write");
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(text.contains("#[StartTime: 1800000000.000"), "{text}");
        let read = read_back(&out);
        assert_eq!(read.len(), 3);
        for (i, ((start, length, h), want)) in read.iter().zip(&expected).enumerate() {
            assert_eq!(*start, Duration::from_secs(10 * i as u64));
            assert_eq!(*length, Duration::from_secs(10));
            assert_eq!(h, want.get(Stage::EosToFirstAudio), "interval {i}");
        }
        // A stage without samples: every interval is there, with zero counts.
        let mut out = Vec::new();
        write_stage_hlog(&log.copy(), Stage::AsrCompute, &mut out).expect("write");
        let read = read_back(&out);
        assert_eq!(read.len(), 3);
        assert!(read.iter().all(|(_, _, h)| h.is_empty()));
    }

    #[test]
    fn only_the_newest_intervals_are_kept() {
        let mut log = IntervalLog::new(SystemTime::UNIX_EPOCH, 2);
        let mut h = StageHistograms::default();
        for i in 1..=5u64 {
            h.record(Stage::ConnectToHello, i * 100);
            let (c, s) = close_interval(log.take_last(), vec![h.clone()]);
            log.push(Duration::from_secs(i), c, s);
        }
        assert_eq!(log.records.len(), 2);
        assert_eq!(log.records[0].start, Duration::from_secs(3));
        assert_eq!(log.records[1].start, Duration::from_secs(4));
    }

    #[test]
    fn a_missing_shard_gives_an_empty_interval_not_a_wrong_one() {
        let mut log = IntervalLog::new(SystemTime::UNIX_EPOCH, 4);
        let mut a = StageHistograms::default();
        let mut b = StageHistograms::default();
        a.record(Stage::ConnectToHello, 500);
        b.record(Stage::ConnectToHello, 700);
        let (c, s) = close_interval(log.take_last(), vec![a.clone(), b]);
        log.push(Duration::from_secs(1), c, s);
        // Shard b did not answer: the merged total went down.
        let (c, s) = close_interval(log.take_last(), vec![a]);
        assert!(s[Stage::ConnectToHello as usize].is_none());
        log.push(Duration::from_secs(2), c, s);
        assert_eq!(log.records.len(), 2);
    }

    #[test]
    fn dump_writes_every_stage_and_the_files_parse_back() {
        let dir = std::env::temp_dir().join(format!("xiaozhi-dump-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut log = IntervalLog::new(SystemTime::now(), 4);
        let mut h = StageHistograms::default();
        for v in 1..=100u64 {
            h.record(Stage::EosToTranscript, v * 1000);
        }
        let (c, s) = close_interval(log.take_last(), vec![h.clone()]);
        log.push(Duration::from_secs(1), c, s);
        let n = dump(&dir, &h, &log.copy()).expect("dump");
        assert_eq!(n, 2 * Stage::ALL.len());
        let hgrm = std::fs::read_to_string(dir.join("eos_to_transcript_us.hgrm")).expect("hgrm");
        assert!(hgrm.contains("Total count    =          100"), "{hgrm}");
        let hlog = std::fs::read(dir.join("eos_to_transcript_us.hlog")).expect("hlog");
        let read = read_back(&hlog);
        assert_eq!(read.len(), 1);
        assert_eq!(&read[0].2, h.get(Stage::EosToTranscript));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
