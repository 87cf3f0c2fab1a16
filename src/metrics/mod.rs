//! Prometheus text for the counters every shard keeps (merged on request over the shards'
//! control channels; no shared atomics).

pub mod hist;
pub mod intervals;
pub mod service;

/// The `.hgrm` / `.hlog` writers live in the protocol crate, shared with the bench so both write
/// the same formats; re-exported under their old name.
pub use xiaozhi_protocol::hdr_files as hdr_export;

use std::fmt::Write;

pub use hist::{Stage, StageHistograms};

use crate::shard::{ShardSnapshot, ShardStats};

/// Renders counters of every shard plus the merged histograms.
pub fn render_snapshots(snapshots: &[ShardSnapshot]) -> String {
    let stats: Vec<ShardStats> = snapshots.iter().map(|s| s.stats).collect();
    let mut out = render(&stats);
    let mut merged = StageHistograms::default();
    for s in snapshots {
        merged.merge(&s.hist);
    }
    render_histograms(&mut out, &merged);
    out
}

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

/// A per-shard gauge or counter: name, help, and how to read it from a shard's stats.
type PerShardGauge = (&'static str, &'static str, fn(&ShardStats) -> u64);

/// Renders per-shard gauges and instance-wide counters in the Prometheus text format.
pub fn render(shards: &[ShardStats]) -> String {
    let mut total = ShardStats::default();
    for s in shards {
        total.merge(s);
    }
    let mut out = String::with_capacity(4096);
    let _ = writeln!(
        out,
        "# HELP xiaozhi_sessions Open device sessions per shard."
    );
    let _ = writeln!(out, "# TYPE xiaozhi_sessions gauge");
    for s in shards {
        let _ = writeln!(
            out,
            "xiaozhi_sessions{{shard=\"{}\"}} {}",
            s.shard, s.sessions
        );
    }
    let per_shard: [PerShardGauge; 5] = [
        (
            "xiaozhi_connection_limit",
            "Most sessions a shard admits (the smaller of max_connections_per_shard and its share of max_connections).",
            |s| s.connection_limit,
        ),
        (
            "xiaozhi_rate_limit_addresses",
            "Client addresses in a shard's connection-rate table (bounded by rate_limit.max_addresses).",
            |s| s.rate_limit_addresses,
        ),
        (
            "xiaozhi_http_connections",
            "Open connections on a shard's HTTP port.",
            |s| s.http.connections,
        ),
        (
            "xiaozhi_http_connection_limit",
            "Most HTTP connections a shard holds (server.http.max_connections_per_shard).",
            |s| s.http.connection_limit,
        ),
        (
            "xiaozhi_http_rate_limit_addresses",
            "Client addresses in a shard's HTTP request-rate table (bounded by http.rate_limit.max_addresses).",
            |s| s.http.rate_limit_addresses,
        ),
    ];
    for (name, help, get) in per_shard {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for s in shards {
            let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", s.shard, get(s));
        }
    }
    let per_shard_counters: [PerShardGauge; 2] = [
        (
            "xiaozhi_connections_handed_off_total",
            "Upgrades a full shard handed to a shard with room instead of refusing them.",
            |s| s.handed_off,
        ),
        (
            "xiaozhi_connections_adopted_total",
            "Upgrades a shard took over from a full shard (admitted or refused on its own budget).",
            |s| s.adopted,
        ),
    ];
    for (name, help, get) in per_shard_counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for s in shards {
            let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", s.shard, get(s));
        }
    }
    let _ = writeln!(
        out,
        "# HELP xiaozhi_vad_queue_depth Jobs waiting in the VAD workers' queues."
    );
    let _ = writeln!(out, "# TYPE xiaozhi_vad_queue_depth gauge");
    let _ = writeln!(out, "xiaozhi_vad_queue_depth {}", total.vad_queue_depth);
    let e = &total.ended;
    let counters: &[(&str, &str, u64)] = &[
        (
            "xiaozhi_sessions_accepted_total",
            "WebSocket sessions accepted.",
            total.accepted,
        ),
        (
            "xiaozhi_refused_full_total",
            "Upgrades refused because a shard was at its connection limit and no other shard took them (HTTP 503).",
            total.refused_full,
        ),
        (
            "xiaozhi_refused_draining_total",
            "Upgrades refused while draining.",
            total.refused_draining,
        ),
        (
            "xiaozhi_refused_rate_limited_total",
            "Upgrades refused by the per-address connection rate (HTTP 429).",
            total.refused_rate_limited,
        ),
        (
            "xiaozhi_proxy_header_errors_total",
            "Connections from trusted balancers without a valid PROXY header (HTTP 400).",
            total.proxy_header_errors,
        ),
        (
            "xiaozhi_rate_limit_evictions_total",
            "Connection-rate buckets forgotten because a shard's table was full.",
            total.rate_limit_evictions,
        ),
        (
            "xiaozhi_http_refused_full_total",
            "HTTP connections refused because a shard held server.http.max_connections_per_shard (HTTP 503).",
            total.http.refused_full,
        ),
        (
            "xiaozhi_http_refused_rate_limited_total",
            "HTTP requests refused by the per-address request rate (HTTP 429).",
            total.http.refused_rate_limited,
        ),
        (
            "xiaozhi_http_proxy_header_errors_total",
            "HTTP-port connections from trusted balancers without a valid PROXY header (HTTP 400).",
            total.http.proxy_header_errors,
        ),
        (
            "xiaozhi_http_rate_limit_evictions_total",
            "HTTP request-rate buckets forgotten because a shard's table was full.",
            total.http.rate_limit_evictions,
        ),
        (
            "xiaozhi_handshake_errors_total",
            "Connections that failed in the HTTP handshake.",
            total.handshake_errors,
        ),
        (
            "xiaozhi_plain_http_total",
            "Plain HTTP requests answered on the WebSocket port.",
            total.plain_http,
        ),
        (
            "xiaozhi_identity_errors_total",
            "Connections refused for a missing or invalid identity.",
            total.identity_errors,
        ),
        (
            "xiaozhi_auth_failures_total",
            "Connections refused by token authentication.",
            total.auth_failures,
        ),
        (
            "xiaozhi_slow_consumer_disconnects_total",
            "Sessions closed because the device stopped reading.",
            total.slow_consumers,
        ),
        (
            "xiaozhi_oversized_messages_total",
            "Sessions closed for a message above max_message_bytes (close 1009).",
            total.oversized,
        ),
        (
            "xiaozhi_oversized_frames_total",
            "Sessions closed for a frame above max_frame_bytes (close 1009).",
            total.oversized_frames,
        ),
        (
            "xiaozhi_protocol_errors_total",
            "Sessions closed by a WebSocket protocol error.",
            total.protocol_errors,
        ),
        (
            "xiaozhi_hello_timeouts_total",
            "Sessions closed because no hello arrived in time.",
            total.hello_timeouts,
        ),
        (
            "xiaozhi_idle_closes_total",
            "Sessions closed by idle or no-voice timeouts.",
            total.idle_closes,
        ),
        (
            "xiaozhi_malformed_messages_total",
            "Malformed text messages (answered with an error).",
            total.ended.malformed,
        ),
        (
            "xiaozhi_unknown_messages_total",
            "Text messages of unknown type (ignored).",
            total.ended.unknown,
        ),
        (
            "xiaozhi_bad_frames_total",
            "Binary frames with invalid framing (dropped).",
            total.ended.bad_frames,
        ),
        (
            "xiaozhi_audio_frames_total",
            "Audio frames received (ended sessions).",
            total.ended.audio_frames,
        ),
        (
            "xiaozhi_early_frames_total",
            "Binary frames received before hello (dropped).",
            total.ended.early_frames,
        ),
        (
            "xiaozhi_opus_decoded_total",
            "Uplink Opus packets decoded (ended sessions).",
            e.audio.decoded,
        ),
        (
            "xiaozhi_opus_garbage_total",
            "Uplink packets that did not decode, skipped (ended sessions).",
            e.audio.garbage,
        ),
        (
            "xiaozhi_vad_jobs_total",
            "VAD jobs sent to inference cores (ended sessions).",
            e.audio.jobs,
        ),
        (
            "xiaozhi_vad_stale_results_total",
            "VAD results dropped because their turn had ended (ended sessions).",
            e.audio.stale_results,
        ),
        (
            "xiaozhi_vad_errors_total",
            "VAD results carrying a model error (ended sessions).",
            e.audio.vad_errors,
        ),
        (
            "xiaozhi_utterances_total",
            "Utterances segmented (ended sessions).",
            e.audio.utterances,
        ),
        (
            "xiaozhi_turns_refused_busy_total",
            "Turns refused at listen start because inference was busy (ended sessions).",
            e.turns_refused,
        ),
        (
            "xiaozhi_turns_shed_total",
            "Turns shed because their VAD backlog passed its bound (ended sessions).",
            e.turns_shed,
        ),
        (
            "xiaozhi_vad_queue_full_total",
            "VAD jobs refused by a full inference queue, retried (ended sessions).",
            e.vad_queue_full,
        ),
        (
            "xiaozhi_device_tool_calls_total",
            "Device tool calls (MCP tools/call) sent (ended sessions).",
            e.mcp.calls,
        ),
        (
            "xiaozhi_device_tool_errors_total",
            "Device tool calls answered with an error (ended sessions).",
            e.mcp.call_errors,
        ),
        (
            "xiaozhi_device_tool_timeouts_total",
            "Device MCP requests that got no answer in time (ended sessions).",
            e.mcp.timeouts,
        ),
        (
            "xiaozhi_device_tool_calls_cancelled_total",
            "Device tool calls dropped by abort or a new turn (ended sessions).",
            e.mcp.cancelled,
        ),
        (
            "xiaozhi_mcp_ignored_total",
            "Malformed or unexpected MCP messages from devices, ignored (ended sessions).",
            e.mcp.ignored,
        ),
        (
            "xiaozhi_vad_orphan_results_total",
            "VAD results whose session had ended.",
            total.orphan_results,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
    let name = "xiaozhi_vision_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} Requests to /mcp/vision/explain by result."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for (result, value) in total.vision.by_result() {
        let _ = writeln!(out, "{name}{{result=\"{result}\"}} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_across_shards_and_gauges_kept_per_shard() {
        let a = ShardStats {
            shard: 0,
            sessions: 2,
            accepted: 5,
            handed_off: 3,
            ..Default::default()
        };
        let b = ShardStats {
            shard: 1,
            sessions: 1,
            accepted: 7,
            adopted: 3,
            ..Default::default()
        };
        let text = render(&[a, b]);
        assert!(text.contains("xiaozhi_sessions{shard=\"0\"} 2\n"));
        assert!(text.contains("xiaozhi_sessions{shard=\"1\"} 1\n"));
        assert!(text.contains("xiaozhi_sessions_accepted_total 12\n"));
        for line in [
            "xiaozhi_connections_handed_off_total{shard=\"0\"} 3\n",
            "xiaozhi_connections_handed_off_total{shard=\"1\"} 0\n",
            "xiaozhi_connections_adopted_total{shard=\"1\"} 3\n",
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
    }
}
