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

pub use hist::{Stage, StageHistograms, Transport};

/// Renders stage histograms as Prometheus summaries (quantiles, sum, count).
pub fn render_histograms(out: &mut String, h: &StageHistograms) {
    for stage in Stage::ALL {
        let name = format!("xiaozhi_{}", stage.name());
        let _ = writeln!(out, "# HELP {name} {}", stage.help());
        let _ = writeln!(out, "# TYPE {name} summary");
        summary(out, &name, "", h.get(stage));
    }
    let name = "xiaozhi_transport_eos_to_first_audio_us";
    let _ = writeln!(
        out,
        "# HELP {name} End of speech decided -> first audio frame sent, microseconds, by transport."
    );
    let _ = writeln!(out, "# TYPE {name} summary");
    for transport in Transport::ALL {
        let label = format!("transport=\"{}\"", transport.name());
        summary(out, name, &label, h.first_audio_on(transport));
    }
}

/// One summary's samples: quantiles, sum and count, each with `labels` (`k="v",…` or empty).
fn summary(out: &mut String, name: &str, labels: &str, hist: &hdrhistogram::Histogram<u64>) {
    let sep = if labels.is_empty() { "" } else { "," };
    for q in [0.5, 0.9, 0.99, 0.999] {
        let v = if hist.is_empty() {
            0
        } else {
            hist.value_at_quantile(q)
        };
        let _ = writeln!(out, "{name}{{{labels}{sep}quantile=\"{q}\"}} {v}");
    }
    let sum = (hist.mean() * hist.len() as f64).round() as u64;
    let braced = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braced} {sum}");
    let _ = writeln!(out, "{name}_count{braced} {}", hist.len());
}
