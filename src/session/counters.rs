//! What one session counts; the shard adds a session's counters to its totals when it ends.

use crate::pipeline::audio_in::AudioInCounters;
use crate::tools::mcp::McpCounters;

/// Per-session counters the shard adds to its totals when the session ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionCounters {
    /// Text messages that were not valid JSON or not a valid message.
    pub malformed: u64,
    /// Text messages of an unknown type (ignored).
    pub unknown: u64,
    /// Binary frames whose framing was invalid.
    pub bad_frames: u64,
    /// Audio frames received after hello.
    pub audio_frames: u64,
    /// Binary frames received before hello (dropped).
    pub early_frames: u64,
    /// Turns refused at `listen start` because inference was busy.
    pub turns_refused: u64,
    /// Turns shed mid-way because the VAD backlog passed its bound.
    pub turns_shed: u64,
    /// VAD jobs the inference queue refused (retried later).
    pub vad_queue_full: u64,
    /// Audio frames dropped in a refused or shed turn.
    pub shed_frames: u64,
    /// IoT state updates refused because the thing's state would pass its bound.
    pub iot_states_refused: u64,
    /// Manual-mode turns ended because audio stopped arriving (no `listen stop`).
    pub manual_gap_ends: u64,
    /// Recognition or synthesis jobs that waited because the session's quota was in use.
    pub jobs_held: u64,
    /// Sentences not spoken because a turn's segment queue was full.
    pub segments_dropped: u64,
    /// Remote recognition or synthesis calls dropped because their turn ended.
    pub remote_calls_cancelled: u64,
    /// Device-caused log lines not written because of the session's log rate.
    pub log_lines_suppressed: u64,
    /// Uplink pipeline counters (folded in when the pipeline is released).
    pub audio: AudioInCounters,
    /// Device tool (MCP) counters.
    pub mcp: McpCounters,
}

impl SessionCounters {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &SessionCounters) {
        self.malformed += o.malformed;
        self.unknown += o.unknown;
        self.bad_frames += o.bad_frames;
        self.audio_frames += o.audio_frames;
        self.early_frames += o.early_frames;
        self.turns_refused += o.turns_refused;
        self.turns_shed += o.turns_shed;
        self.vad_queue_full += o.vad_queue_full;
        self.shed_frames += o.shed_frames;
        self.iot_states_refused += o.iot_states_refused;
        self.manual_gap_ends += o.manual_gap_ends;
        self.jobs_held += o.jobs_held;
        self.segments_dropped += o.segments_dropped;
        self.remote_calls_cancelled += o.remote_calls_cancelled;
        self.log_lines_suppressed += o.log_lines_suppressed;
        let (a, b) = (&mut self.audio, &o.audio);
        a.decoded += b.decoded;
        a.garbage += b.garbage;
        a.jobs += b.jobs;
        a.stale_results += b.stale_results;
        a.vad_errors += b.vad_errors;
        a.utterances += b.utterances;
        let (m, n) = (&mut self.mcp, &o.mcp);
        m.calls += n.calls;
        m.call_errors += n.call_errors;
        m.timeouts += n.timeouts;
        m.cancelled += n.cancelled;
        m.ignored += n.ignored;
    }
}
