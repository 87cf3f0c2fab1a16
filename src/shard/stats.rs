//! A shard's counters, declared once with [`counters!`]: each line names the field, its
//! Prometheus name and help, its type and how shards combine, and the macro yields the struct,
//! its `merge` and the samples `/metrics` renders (see [`crate::metrics::counters`]).
//!
//! The per-session counters ([`SessionCounters`], summed over ended sessions) keep their own
//! struct in `session/`; their exported names are listed here in [`SESSION_METRICS`], one
//! table, read by the same renderer.

use crate::connection::mqtt::stats::MqttStats;
use crate::http::vision::VisionCounters;
use crate::http::HttpCounters;
use crate::metrics::counters::{self, counters, Counters, Kind, Metric, Sample, Scope};
use crate::metrics::{render_histograms, Stage, StageHistograms, Transport};
use crate::session::SessionCounters;

counters! {
    /// A shard's counters (plain numbers; snapshot by value).
    #[derive(Debug, Default, Clone, Copy)]
    pub struct ShardStats {
        /// Sessions currently open.
        sessions: PerShard Gauge "xiaozhi_sessions" "Open device sessions per shard.",
        /// This shard's connection limit (the smaller of the per-shard limit and its share of
        /// the instance limit).
        connection_limit: PerShard Gauge "xiaozhi_connection_limit"
            "Most sessions a shard admits (the smaller of max_connections_per_shard and its share of max_connections).",
        /// Addresses in this shard's rate-limit table.
        rate_limit_addresses: PerShard Gauge "xiaozhi_rate_limit_addresses"
            "Client addresses in a shard's connection-rate table (bounded by rate_limit.max_addresses).",
        /// Upgrades this shard, being full, handed to a shard with room.
        handed_off: PerShard Counter "xiaozhi_connections_handed_off_total"
            "Upgrades a full shard handed to a shard with room instead of refusing them.",
        /// Upgrades this shard took over from a full shard.
        adopted: PerShard Counter "xiaozhi_connections_adopted_total"
            "Upgrades a shard took over from a full shard (admitted or refused on its own budget).",
        /// WebSocket sessions accepted (upgraded).
        accepted: Sum Counter "xiaozhi_sessions_accepted_total" "WebSocket sessions accepted.",
        /// Upgrades refused because the shard was full (and no other shard took them).
        refused_full: Sum Counter "xiaozhi_refused_full_total"
            "Upgrades refused because a shard was at its connection limit and no other shard took them (HTTP 503).",
        /// Upgrades refused because the instance was draining.
        refused_draining: Sum Counter "xiaozhi_refused_draining_total"
            "Upgrades refused while draining.",
        /// Upgrades refused by the per-address connection rate (HTTP 429).
        refused_rate_limited: Sum Counter "xiaozhi_refused_rate_limited_total"
            "Upgrades refused by the per-address connection rate (HTTP 429).",
        /// Connections from trusted balancers without a valid PROXY header.
        proxy_header_errors: Sum Counter "xiaozhi_proxy_header_errors_total"
            "Connections from trusted balancers without a valid PROXY header (HTTP 400).",
        /// Rate-limit buckets forgotten because the table was full.
        rate_limit_evictions: Sum Counter "xiaozhi_rate_limit_evictions_total"
            "Connection-rate buckets forgotten because a shard's table was full.",
        /// Log lines dropped because the log writer's queue was full (process-wide).
        log_lines_dropped: Max Counter "xiaozhi_log_lines_dropped_total"
            "Log lines dropped because stderr was read too slowly and log.buffered_lines were queued.",
        /// Connections this shard opened to remote providers.
        upstream_opened: Sum Counter "xiaozhi_upstream_connections_opened_total"
            "HTTP connections opened to remote providers (a rate well above the turns' says upstream.max_pooled_per_origin is too small, or the provider closes them).",
        /// Connections in this shard's upstream pool (gauge).
        upstream_pooled: PerShard Gauge "xiaozhi_upstream_connections_pooled"
            "HTTP connections to remote providers a shard keeps for reuse (in use or idle; at most upstream.max_pooled_per_origin per origin).",
        /// Socket sweeps this shard ran (`server.socket_sweep_ms`).
        socket_sweeps: Sum Counter "xiaozhi_socket_sweeps_total"
            "Socket sweeps run (one epoll pass over a shard's device sockets per server.socket_sweep_ms; 0 when sweeps are off).",
        /// Tasks woken by this shard's socket sweeps.
        socket_sweep_wakes: Sum Counter "xiaozhi_socket_sweep_wakes_total"
            "Connection reads and writes woken by socket sweeps (divided by xiaozhi_socket_sweeps_total: connections served per wake-up of the shard).",
        /// Device sockets in this shard's sweep (gauge).
        swept_sockets: PerShard Gauge "xiaozhi_swept_sockets"
            "Device sockets a shard reads in sweeps.",
        /// Connections that failed before or during the HTTP handshake.
        handshake_errors: Sum Counter "xiaozhi_handshake_errors_total"
            "Connections that failed in the HTTP handshake.",
        /// Times a connection spent its read budget and yielded to the shard's other tasks.
        read_budget_yields: Sum Counter "xiaozhi_read_budget_yields_total"
            "Times a WebSocket connection handled server.read_budget_messages ready messages in a row and let the other devices on its shard run.",
        /// Times a connection's reads were paused by its inbound rate.
        inbound_throttled: Sum Counter "xiaozhi_inbound_throttled_total"
            "Times a device connection's reads were paused because it sent more messages or bytes a second than server.inbound_* allow (real devices stay far below).",
        /// Plain HTTP requests answered on the WebSocket port.
        plain_http: Sum Counter "xiaozhi_plain_http_total"
            "Plain HTTP requests answered on the WebSocket port.",
        /// Connections refused for a missing or invalid identity.
        identity_errors: Sum Counter "xiaozhi_identity_errors_total"
            "Connections refused for a missing or invalid identity.",
        /// Connections refused by token authentication.
        auth_failures: Sum Counter "xiaozhi_auth_failures_total"
            "Connections refused by token authentication.",
        /// Sessions closed because the device stopped reading.
        slow_consumers: Sum Counter "xiaozhi_slow_consumer_disconnects_total"
            "Sessions closed because the device stopped reading.",
        /// Sessions closed for an oversized message.
        oversized: Sum Counter "xiaozhi_oversized_messages_total"
            "Sessions closed for a message above max_message_bytes (close 1009).",
        /// Sessions closed for an oversized frame.
        oversized_frames: Sum Counter "xiaozhi_oversized_frames_total"
            "Sessions closed for a frame above max_frame_bytes (close 1009).",
        /// Sessions closed by a WebSocket protocol error.
        protocol_errors: Sum Counter "xiaozhi_protocol_errors_total"
            "Sessions closed by a WebSocket protocol error.",
        /// Sessions closed by the hello timeout.
        hello_timeouts: Sum Counter "xiaozhi_hello_timeouts_total"
            "Sessions closed because no hello arrived in time.",
        /// Sessions closed by idle / no-voice timeouts.
        idle_closes: Sum Counter "xiaozhi_idle_closes_total"
            "Sessions closed by idle or no-voice timeouts.",
        /// Inference results (VAD, ASR, TTS) whose session had already ended or whose mailbox
        /// refused them.
        orphan_results: Sum Counter "xiaozhi_vad_orphan_results_total"
            "Inference results (VAD, ASR, TTS) whose session had ended.",
    }
    plain {
        /// Shard index.
        shard: usize,
    }
    nested {
        /// The HTTP port's connections and refusals.
        http: HttpCounters,
        /// Inference and mailbox queue depths and refusals.
        queues: QueueStats,
        /// Per-session counters summed over ended sessions.
        ended: SessionCounters,
        /// Requests to `/mcp/vision/explain` by outcome.
        vision: VisionCounters,
        /// The MQTT + UDP transport's connections, refusals and datagrams.
        mqtt: MqttStats,
        /// Sessions and turns by transport (WebSocket, MQTT + UDP, the stock gateway).
        transports: TransportStats,
    }
}

counters! {
    /// Sessions open and started and turns answered, by transport, so an operator can tell
    /// WebSocket devices from MQTT + UDP ones (and from those behind the stock gateway). The
    /// unlabelled `xiaozhi_sessions` and `xiaozhi_sessions_accepted_total` stay the totals.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct TransportStats {
        /// WebSocket sessions open now.
        open_websocket: PerShard Gauge "xiaozhi_transport_sessions" {transport = "websocket"}
            "Open device sessions per shard, by transport.",
        /// MQTT + UDP sessions open now.
        open_mqtt: PerShard Gauge "xiaozhi_transport_sessions" {transport = "mqtt"}
            "Open device sessions per shard, by transport.",
        /// Stock-gateway sessions open now.
        open_gateway: PerShard Gauge "xiaozhi_transport_sessions" {transport = "gateway"}
            "Open device sessions per shard, by transport.",
        /// WebSocket sessions started.
        started_websocket: Sum Counter "xiaozhi_transport_sessions_total" {transport = "websocket"}
            "Sessions started, by transport.",
        /// MQTT + UDP sessions started.
        started_mqtt: Sum Counter "xiaozhi_transport_sessions_total" {transport = "mqtt"}
            "Sessions started, by transport.",
        /// Stock-gateway sessions started.
        started_gateway: Sum Counter "xiaozhi_transport_sessions_total" {transport = "gateway"}
            "Sessions started, by transport.",
        /// WebSocket turns answered.
        turns_websocket: Sum Counter "xiaozhi_transport_turns_total" {transport = "websocket"}
            "Turns answered (tts stop sent after an end of speech), by transport.",
        /// MQTT + UDP turns answered.
        turns_mqtt: Sum Counter "xiaozhi_transport_turns_total" {transport = "mqtt"}
            "Turns answered (tts stop sent after an end of speech), by transport.",
        /// Stock-gateway turns answered.
        turns_gateway: Sum Counter "xiaozhi_transport_turns_total" {transport = "gateway"}
            "Turns answered (tts stop sent after an end of speech), by transport.",
    }
}

impl TransportStats {
    /// A session on `transport` started.
    pub fn opened(&mut self, transport: Transport) {
        let (open, started) = match transport {
            Transport::WebSocket => (&mut self.open_websocket, &mut self.started_websocket),
            Transport::Mqtt => (&mut self.open_mqtt, &mut self.started_mqtt),
            Transport::Gateway => (&mut self.open_gateway, &mut self.started_gateway),
        };
        *open += 1;
        *started += 1;
    }

    /// A session on `transport` ended.
    pub fn closed(&mut self, transport: Transport) {
        let open = match transport {
            Transport::WebSocket => &mut self.open_websocket,
            Transport::Mqtt => &mut self.open_mqtt,
            Transport::Gateway => &mut self.open_gateway,
        };
        *open = open.saturating_sub(1);
    }

    /// A session on `transport` answered a turn.
    pub fn turn_answered(&mut self, transport: Transport) {
        match transport {
            Transport::WebSocket => self.turns_websocket += 1,
            Transport::Mqtt => self.turns_mqtt += 1,
            Transport::Gateway => self.turns_gateway += 1,
        }
    }
}

counters! {
    /// How full every bounded queue a shard feeds or drains is, and what each turned away.
    /// The inference job queues are shared by every shard, so every shard reports the same
    /// number and the merged view keeps the largest.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct QueueStats {
        /// VAD jobs outstanding: gathered for the shard's next tick, or sent and unanswered.
        vad_jobs_queued: Sum Gauge "xiaozhi_vad_queue_depth"
            "VAD jobs outstanding: gathered for a shard's next tick, or sent to the worker and not yet answered.",
        /// Jobs waiting in the ASR workers' queues.
        asr_jobs_queued: Max Gauge "xiaozhi_asr_queue_depth"
            "Jobs waiting in the local ASR workers' queues (0 without local ASR).",
        /// Jobs waiting in the TTS workers' queues.
        tts_jobs_queued: Max Gauge "xiaozhi_tts_queue_depth"
            "Jobs waiting in the local TTS workers' queues (0 without local TTS).",
        /// VAD jobs refused because the shard had `inference.queue_capacity` outstanding.
        vad_jobs_refused: Sum Counter "xiaozhi_vad_jobs_refused_total"
            "VAD jobs refused because a shard had inference.queue_capacity jobs outstanding (the session retries them).",
        /// VAD jobs withdrawn before their tick: their turn ended or their session closed.
        vad_jobs_withdrawn: Sum Counter "xiaozhi_vad_jobs_withdrawn_total"
            "VAD jobs removed before their tick was sent (their turn ended or their session closed).",
        /// VAD batches (one per shard per tick with work) sent to the workers.
        vad_batches_sent: Sum Counter "xiaozhi_vad_batches_sent_total"
            "VAD batches sent to the inference workers (one per shard per tick that had jobs).",
        /// VAD batches the worker queue refused (retried on the next tick).
        vad_batches_unsent: Sum Counter "xiaozhi_vad_batches_unsent_total"
            "VAD batches a full worker queue refused (their jobs go with the next tick).",
        /// ASR jobs refused by a full worker queue.
        asr_jobs_refused: Max Counter "xiaozhi_asr_jobs_refused_total"
            "ASR jobs refused by a full worker queue (the turn fails with a busy error).",
        /// TTS jobs refused by a full worker queue.
        tts_jobs_refused: Max Counter "xiaozhi_tts_jobs_refused_total"
            "TTS jobs refused by a full worker queue (the sentence fails).",
        /// ASR jobs skipped because their turn was cancelled while they waited.
        asr_jobs_skipped: Max Counter "xiaozhi_inference_jobs_skipped_total" {kind = "asr"}
            "Inference jobs skipped unrun because their session's turn ended while they waited.",
        /// TTS jobs skipped because their turn was cancelled while they waited.
        tts_jobs_skipped: Max Counter "xiaozhi_inference_jobs_skipped_total" {kind = "tts"}
            "Inference jobs skipped unrun because their session's turn ended while they waited.",
        /// Cancellations the inference workers' channels had no room for (the jobs ran).
        cancels_dropped: Max Counter "xiaozhi_inference_cancels_dropped_total"
            "Job cancellations dropped because a worker's cancellation channel was full (the jobs ran).",
        /// Results the inference workers dropped because a shard's reply channel stayed full.
        replies_dropped: Max Counter "xiaozhi_inference_replies_dropped_total"
            "Inference results dropped because a shard's reply channel stayed full past the workers' reply timeout.",
        /// VAD results waiting in this shard's reply channel.
        vad_replies_queued: PerShard Gauge "xiaozhi_reply_queue_depth" {kind = "vad"}
            "Inference results waiting in a shard's reply channel.",
        /// ASR results waiting in this shard's reply channel.
        asr_replies_queued: PerShard Gauge "xiaozhi_reply_queue_depth" {kind = "asr"}
            "Inference results waiting in a shard's reply channel.",
        /// TTS results waiting in this shard's reply channel.
        tts_replies_queued: PerShard Gauge "xiaozhi_reply_queue_depth" {kind = "tts"}
            "Inference results waiting in a shard's reply channel.",
        /// Events waiting in this shard's session mailboxes.
        mailbox_events_queued: PerShard Gauge "xiaozhi_mailbox_queued"
            "Events waiting in a shard's session mailboxes (all sessions together).",
        /// Events session mailboxes refused because they were full (open and ended sessions).
        mailbox_refused: Sum Counter "xiaozhi_mailbox_refused_total"
            "Events a session mailbox refused because it was full (counted as orphan results too).",
    }
}

/// The exported numbers of [`SessionCounters`] (summed over ended sessions), in one table.
pub const SESSION_METRICS: &[Metric<SessionCounters>] = &[
    sum(
        "xiaozhi_malformed_messages_total",
        "Malformed text messages (answered with an error).",
        |e| e.malformed,
    ),
    sum(
        "xiaozhi_iot_states_refused_total",
        "IoT state updates refused because a thing's state would pass its bound (16 things, 64 keys, 2 KiB each).",
        |e| e.iot_states_refused,
    ),
    sum(
        "xiaozhi_manual_gap_ends_total",
        "Manual-mode turns ended because audio frames stopped arriving without listen stop (session.manual_audio_gap_ms).",
        |e| e.manual_gap_ends,
    ),
    sum(
        "xiaozhi_log_lines_suppressed_total",
        "Device-caused log lines not written because their session passed log.session_lines_per_s (ended sessions).",
        |e| e.log_lines_suppressed,
    ),
    sum(
        "xiaozhi_unknown_messages_total",
        "Text messages of unknown type (ignored).",
        |e| e.unknown,
    ),
    sum(
        "xiaozhi_bad_frames_total",
        "Binary frames with invalid framing (dropped).",
        |e| e.bad_frames,
    ),
    sum(
        "xiaozhi_audio_frames_total",
        "Audio frames received (ended sessions).",
        |e| e.audio_frames,
    ),
    sum(
        "xiaozhi_early_frames_total",
        "Binary frames received before hello (dropped).",
        |e| e.early_frames,
    ),
    sum(
        "xiaozhi_opus_decoded_total",
        "Uplink Opus packets decoded (ended sessions).",
        |e| e.audio.decoded,
    ),
    sum(
        "xiaozhi_opus_garbage_total",
        "Uplink packets that did not decode, skipped (ended sessions).",
        |e| e.audio.garbage,
    ),
    sum(
        "xiaozhi_vad_jobs_total",
        "VAD jobs sent to inference cores (ended sessions).",
        |e| e.audio.jobs,
    ),
    sum(
        "xiaozhi_vad_stale_results_total",
        "VAD results dropped because their turn had ended (ended sessions).",
        |e| e.audio.stale_results,
    ),
    sum(
        "xiaozhi_vad_errors_total",
        "VAD results carrying a model error (ended sessions).",
        |e| e.audio.vad_errors,
    ),
    sum(
        "xiaozhi_utterances_total",
        "Utterances segmented (ended sessions).",
        |e| e.audio.utterances,
    ),
    sum(
        "xiaozhi_turns_refused_busy_total",
        "Turns refused at listen start because inference was busy (ended sessions).",
        |e| e.turns_refused,
    ),
    sum(
        "xiaozhi_turns_shed_total",
        "Turns shed because their VAD backlog passed its bound (ended sessions).",
        |e| e.turns_shed,
    ),
    sum(
        "xiaozhi_vad_queue_full_total",
        "VAD jobs refused by a full inference queue, retried (ended sessions).",
        |e| e.vad_queue_full,
    ),
    sum(
        "xiaozhi_inference_jobs_held_total",
        "Recognition or synthesis jobs a session held back because its quota of outstanding jobs was in use (ended sessions).",
        |e| e.jobs_held,
    ),
    sum(
        "xiaozhi_tts_segments_dropped_total",
        "Sentences not spoken because a turn's segment queue was full (ended sessions).",
        |e| e.segments_dropped,
    ),
    sum(
        "xiaozhi_remote_calls_cancelled_total",
        "Remote recognition or synthesis calls dropped because their turn ended (ended sessions).",
        |e| e.remote_calls_cancelled,
    ),
    sum(
        "xiaozhi_device_tool_calls_total",
        "Device tool calls (MCP tools/call) sent (ended sessions).",
        |e| e.mcp.calls,
    ),
    sum(
        "xiaozhi_device_tool_errors_total",
        "Device tool calls answered with an error (ended sessions).",
        |e| e.mcp.call_errors,
    ),
    sum(
        "xiaozhi_device_tool_timeouts_total",
        "Device MCP requests that got no answer in time (ended sessions).",
        |e| e.mcp.timeouts,
    ),
    sum(
        "xiaozhi_device_tool_calls_cancelled_total",
        "Device tool calls dropped by abort or a new turn (ended sessions).",
        |e| e.mcp.cancelled,
    ),
    sum(
        "xiaozhi_mcp_ignored_total",
        "Malformed or unexpected MCP messages from devices, ignored (ended sessions).",
        |e| e.mcp.ignored,
    ),
];

/// An instance-wide counter of the session table.
const fn sum(
    name: &'static str,
    help: &'static str,
    read: fn(&SessionCounters) -> u64,
) -> Metric<SessionCounters> {
    Metric {
        name,
        help,
        kind: Kind::Counter,
        scope: Scope::Sum,
        label: None,
        read,
    }
}

impl Counters for SessionCounters {
    fn merge_from(&mut self, other: &Self) {
        self.add(other);
    }

    fn samples(&self, out: &mut Vec<Sample>) {
        out.extend(SESSION_METRICS.iter().map(|m| m.sample(self)));
    }
}

/// A shard's counters and latency histograms, sent to whoever asked.
#[derive(Clone)]
pub struct ShardSnapshot {
    /// Counters.
    pub stats: ShardStats,
    /// Stage histograms.
    pub hist: StageHistograms,
}

/// The `/metrics` text: every shard's counters (per shard where the metric says so, merged
/// otherwise) and the merged stage histograms.
pub fn render_snapshots(snapshots: &[ShardSnapshot]) -> String {
    let stats: Vec<ShardStats> = snapshots.iter().map(|s| s.stats).collect();
    let mut out = render(&stats);
    let mut merged = StageHistograms::default();
    for s in snapshots {
        merged.merge(&s.hist);
    }
    render_histograms(&mut out, &merged);
    let interactions = merged.get(Stage::EosToTtsStop).len();
    crate::metrics::cpu::render(
        &mut out,
        crate::metrics::cpu::sample().as_ref(),
        interactions,
    );
    out
}

/// Renders per-shard gauges and instance-wide counters in the Prometheus text format.
pub fn render(shards: &[ShardStats]) -> String {
    let mut total = ShardStats::default();
    let mut per_shard = Vec::with_capacity(shards.len());
    for s in shards {
        total.merge(s);
        let mut samples = Vec::new();
        s.samples(&mut samples);
        per_shard.push((s.shard, samples));
    }
    let mut totals = Vec::new();
    total.samples(&mut totals);
    let mut out = String::with_capacity(8192);
    counters::render(&mut out, &per_shard, &totals);
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

    #[test]
    fn queue_metrics_keep_the_largest_shared_depth_and_label_reply_channels() {
        let mut a = ShardStats {
            shard: 0,
            ..Default::default()
        };
        a.queues.asr_jobs_queued = 4;
        a.queues.vad_jobs_queued = 4;
        a.queues.tts_replies_queued = 2;
        a.queues.mailbox_refused = 1;
        let mut b = ShardStats {
            shard: 1,
            ..Default::default()
        };
        b.queues.asr_jobs_queued = 3;
        b.queues.vad_jobs_queued = 3;
        b.queues.mailbox_refused = 2;
        let text = render(&[a, b]);
        for line in [
            "# HELP xiaozhi_asr_queue_depth Jobs waiting in the local ASR workers' queues (0 without local ASR).\n",
            "xiaozhi_asr_queue_depth 4\n",
            "xiaozhi_vad_queue_depth 7\n",
            "xiaozhi_reply_queue_depth{shard=\"0\",kind=\"tts\"} 2\n",
            "xiaozhi_reply_queue_depth{shard=\"1\",kind=\"vad\"} 0\n",
            "xiaozhi_mailbox_refused_total 3\n",
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
        assert_eq!(
            text.matches("# HELP xiaozhi_reply_queue_depth ").count(),
            1,
            "one HELP line per name"
        );
    }

    #[test]
    fn transports_are_labelled_apart() {
        let mut a = ShardStats {
            shard: 0,
            ..Default::default()
        };
        a.transports.opened(Transport::Mqtt);
        a.transports.opened(Transport::WebSocket);
        a.transports.closed(Transport::WebSocket);
        a.transports.turn_answered(Transport::Mqtt);
        let text = render(&[a]);
        for line in [
            "xiaozhi_transport_sessions{shard=\"0\",transport=\"mqtt\"} 1\n",
            "xiaozhi_transport_sessions{shard=\"0\",transport=\"websocket\"} 0\n",
            "xiaozhi_transport_sessions_total{transport=\"websocket\"} 1\n",
            "xiaozhi_transport_turns_total{transport=\"mqtt\"} 1\n",
            "xiaozhi_transport_turns_total{transport=\"gateway\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
    }

    #[test]
    fn every_exported_name_is_declared_once() {
        let mut samples = Vec::new();
        ShardStats::default().samples(&mut samples);
        let mut names: Vec<&str> = samples.iter().map(|s| s.name).collect();
        names.dedup();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            names.len(),
            unique.len(),
            "a name split by another: {names:?}"
        );
    }
}
