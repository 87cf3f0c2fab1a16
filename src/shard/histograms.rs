//! The shard side of histogram export (moved here from `metrics/service.rs` so `metrics/`
//! stays a leaf): shard 0's interval recorder, the `/histograms` answers
//! and the SIGUSR1 dump. Histograms travel between shards by message; merging, compressing and
//! rendering run on glommio's blocking thread pool, never on the shard's executor.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::Shard;
use crate::metrics::intervals::{self, IntervalLogCopy};
use crate::metrics::{hdr_export, Stage, StageHistograms};

/// Shard 0: closes one interval of the merged histograms every `metrics.interval_ms`.
pub async fn record_intervals(shard: Rc<Shard>) {
    let Some(log) = &shard.intervals else {
        return;
    };
    let period = Duration::from_millis(shard.config.metrics.interval_ms.max(1));
    let t0 = Instant::now();
    let started_wall = log.borrow().started;
    let mut next = 1u32;
    loop {
        let due = t0 + period * next;
        glommio::timer::sleep(due.saturating_duration_since(Instant::now())).await;
        // A late wake-up (a stalled shard) skips the intervals it missed: one longer interval.
        let elapsed = t0.elapsed();
        next = u32::try_from(elapsed.as_nanos() / period.as_nanos().max(1))
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let hists = every_shard(&shard).await;
        let previous = log.borrow_mut().take_last();
        let (cumulative, stages) = glommio::executor()
            .spawn_blocking(move || intervals::close_interval(previous, hists))
            .await;
        let end = started_wall
            .elapsed()
            .unwrap_or(elapsed)
            .max(Duration::from_millis(1));
        log.borrow_mut().push(end, cumulative, stages);
    }
}

/// Every shard's cumulative histograms, asked over the control channels.
async fn every_shard(shard: &Rc<Shard>) -> Vec<StageHistograms> {
    shard
        .collect_stats()
        .await
        .into_iter()
        .map(|s| s.hist)
        .collect()
}

/// Every shard: a 50 ms timer in the default task queue (where sessions run), its lateness
/// recorded. It measures what a session's own timers and wake-ups wait for on a busy shard.
pub async fn measure_timer_lateness(shard: Rc<Shard>) {
    const PERIOD: Duration = Duration::from_millis(50);
    loop {
        let t0 = Instant::now();
        glommio::timer::sleep(PERIOD).await;
        let late = t0.elapsed().saturating_sub(PERIOD);
        shard
            .hist
            .borrow_mut()
            .record(Stage::ShardTimerLate, late.as_micros() as u64);
    }
}

/// Answers `/histograms/<rest>`: an index for `""`, `<stage>` or `<stage>.hgrm` (percentile
/// distribution of everything since start), `<stage>.hlog` (the retained intervals).
pub async fn histogram(
    shard: &Rc<Shard>,
    rest: &str,
) -> Result<(&'static str, Vec<u8>), (u16, String)> {
    if rest.is_empty() {
        return Ok(("text/plain; charset=utf-8", index().into_bytes()));
    }
    let (name, format) = match rest.rsplit_once('.') {
        Some((name, "hgrm")) => (name, Format::Hgrm),
        Some((name, "hlog")) => (name, Format::Hlog),
        _ => (rest, Format::Hgrm),
    };
    let Some(stage) = Stage::from_name(name) else {
        return Err((404, format!("no stage {name:?}\n\n{}", index())));
    };
    match format {
        Format::Hgrm => {
            let hists = every_shard(shard).await;
            let body = glommio::executor()
                .spawn_blocking(move || {
                    let mut merged = StageHistograms::default();
                    for h in &hists {
                        merged.merge(h);
                    }
                    let mut out = Vec::new();
                    hdr_export::write_hgrm(merged.get(stage), &mut out, 1.0).map(|_| out)
                })
                .await
                .map_err(|e| (500, format!("cannot render {name}.hgrm: {e}\n")))?;
            Ok(("text/plain; charset=utf-8", body))
        }
        Format::Hlog => {
            let Some(log) = shard.interval_log().await else {
                return Err((
                    503,
                    "the interval log is not available (shard 0 did not answer)\n".into(),
                ));
            };
            let body = glommio::executor()
                .spawn_blocking(move || {
                    let mut out = Vec::new();
                    intervals::write_stage_hlog(&log, stage, &mut out).map(|_| out)
                })
                .await
                .map_err(|e| (500, format!("cannot render {name}.hlog: {e}\n")))?;
            Ok(("text/plain; charset=utf-8", body))
        }
    }
}

enum Format {
    Hgrm,
    Hlog,
}

fn index() -> String {
    let mut out = String::from(
        "Stage histograms (values in microseconds for *_us, since the server started):\n\
         GET /histograms/<stage>.hgrm  percentile distribution (HdrHistogram text)\n\
         GET /histograms/<stage>.hlog  interval log (V2 + deflate), metrics.interval_ms each\n\n",
    );
    for stage in Stage::ALL {
        out.push_str(&format!("{:<24} {}\n", stage.name(), stage.help()));
    }
    out
}

/// SIGUSR1 on shard 0: writes every stage's `.hgrm` and `.hlog` into `metrics.dump_dir`.
pub async fn dump(shard: Rc<Shard>) {
    let dir = shard.config.metrics.dump_dir.clone();
    if dir.is_empty() {
        tracing::warn!("SIGUSR1: metrics.dump_dir is not set; nothing written");
        return;
    }
    let hists = every_shard(&shard).await;
    let Some(log) = shard.interval_log().await else {
        return;
    };
    let result = glommio::executor()
        .spawn_blocking(move || write_dump(&PathBuf::from(dir), &hists, &log))
        .await;
    log_dump(result);
}

/// Merges `hists` and writes the dump (blocking file I/O: call it off the shards).
pub fn write_dump(
    dir: &std::path::Path,
    hists: &[StageHistograms],
    log: &IntervalLogCopy,
) -> Result<(PathBuf, usize), String> {
    let mut merged = StageHistograms::default();
    for h in hists {
        merged.merge(h);
    }
    intervals::dump(dir, &merged, log)
        .map(|n| (dir.to_path_buf(), n))
        .map_err(|e| format!("cannot write histograms into {}: {e}", dir.display()))
}

/// Logs the outcome of a dump.
pub fn log_dump(result: Result<(PathBuf, usize), String>) {
    match result {
        Ok((dir, files)) => tracing::info!(dir = %dir.display(), files, "histograms written"),
        Err(e) => tracing::error!("{e}"),
    }
}
