//! Metrics as plain data: stage histograms ([`hist`]), their interval log and HdrHistogram
//! exports, and the Prometheus text of counters declared with [`counters::counters!`].
//!
//! A leaf: nothing here imports the shard, sessions, HTTP or config. The shard gathers its
//! numbers (merged on request over the shards' control channels; no shared atomics) and hands
//! them here to be rendered.

pub mod counters;
pub mod cpu;
pub mod hist;
pub mod intervals;

/// The `.hgrm` / `.hlog` writers live in the protocol crate, shared with the bench so both write
/// the same formats; re-exported under their old name.
pub use xiaozhi_protocol::hdr_files as hdr_export;

use std::fmt::Write;

pub use hist::{Stage, StageHistograms};

/// Renders stage histograms as Prometheus summaries (quantiles, sum, count).
pub fn render_histograms(out: &mut String, h: &StageHistograms) {
    for stage in Stage::ALL {
        let hist = h.get(stage);
        let name = format!("xiaozhi_{}", stage.name());
        let _ = writeln!(out, "# HELP {name} {}", stage.help());
        let _ = writeln!(out, "# TYPE {name} summary");
        for q in [0.5, 0.9, 0.99, 0.999] {
            let v = if hist.is_empty() {
                0
            } else {
                hist.value_at_quantile(q)
            };
            let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
        }
        let sum = (hist.mean() * hist.len() as f64).round() as u64;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", hist.len());
    }
}
