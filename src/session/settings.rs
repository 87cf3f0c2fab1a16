//! What a session reads from config, as plain values (the connection wing builds them once
//! per shard; the session never sees the config).

use std::rc::Rc;
use std::time::Duration;

use super::dialogue::DialogueSettings;
use crate::pipeline::audio_in::AudioInLimits;
use crate::pipeline::segmenter::SegmenterConfig;
use crate::tools::mcp::McpSettings;
use crate::tools::server::ServerTools;
use crate::tools::ToolSet;

/// Everything a session reads from config.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Timers.
    pub timers: SessionTimers,
    /// Answer `ping`.
    pub answer_ping: bool,
    /// Send `vad` start/end messages.
    pub vad_events: bool,
    /// Utterance segmentation.
    pub segmenter: SegmenterConfig,
    /// Uplink backlog bounds.
    pub limits: AudioInLimits,
    /// The reply side.
    pub dialogue: DialogueSettings,
    /// Device and server tools.
    pub tools: ToolSettings,
    /// Device-caused log lines per second this session may write (`log.session_lines_per_s`).
    pub log_lines_per_s: f64,
    /// Such lines it may write at once (`log.session_burst`).
    pub log_burst: u32,
}

/// Device tools, server tools and greetings (from config `[tools]`).
#[derive(Debug, Clone)]
pub struct ToolSettings {
    /// The device MCP client's settings; `None` = device MCP tools are not used.
    pub mcp: Option<McpSettings>,
    /// Accept legacy `iot` descriptors as tools.
    pub iot: bool,
    /// The shard's server-side tools.
    pub server: Rc<ServerTools>,
    /// The tools offered before the device announces any (server tools; shared).
    pub base: Rc<ToolSet>,
    /// Most tools offered to the LLM.
    pub max_tools: usize,
    /// A turn that is ready for its answer while the device's tool list is still being read
    /// (right after hello) waits for it at most this long.
    pub discovery_wait: Duration,
    /// Spoken after an English wake word (empty: no greeting).
    pub wake_greeting: String,
    /// Spoken after a Chinese wake word (empty: no greeting).
    pub wake_greeting_zh: String,
}

/// Session timers (from config).
#[derive(Debug, Clone, Copy)]
pub struct SessionTimers {
    /// Time the device has to send `hello`.
    pub hello_timeout: Duration,
    /// Time without voice before goodbye.
    pub no_voice_close: Duration,
    /// Time without any activity before close.
    pub idle_close: Duration,
    /// While draining, a device that began listening (`listen start` or a wake word) less than
    /// this long ago is given until then to begin speaking before it is told goodbye.
    pub drain_listen_grace: Duration,
    /// Manual mode: after speech, this long without an audio frame ends the turn.
    pub manual_audio_gap: Duration,
}
