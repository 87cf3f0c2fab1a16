//! A device session: the state machine, with no I/O.
//!
//! A transport's driver (`crate::connection`) feeds it what arrives (text, binary, timer expiries,
//! shard events) and writes what it returns. Keeping the decisions here lets them be tested
//! without sockets and keeps the wire format (in `protocol`) out of the I/O code.
//!
//! States: `AwaitingHello` → `Idle` (hello answered) → `Listening` / `Speaking` → `Closing`.
//!
//! The session is also where device tools meet the dialogue: it runs the device's MCP client
//! (started after a hello with `features.mcp`), keeps legacy IoT things, offers the merged
//! [`ToolSet`] to the dialogue and carries out the tool calls the dialogue asks for (a device
//! call goes out as `tools/call` and its answer, error or timeout comes back later; IoT and
//! server tools answer at once). Calls of an aborted turn are dropped from the pending map.
//!
//! Every event goes in through one `on_*` method and comes out as one [`Effects`] value: what
//! to send (text, audio to play, a close), the next VAD job, the requests for the providers and
//! the latency samples. Files: `messages` (the device's JSON messages), `audio` (the uplink and
//! VAD), `tools` (tool calls), `dialogue` (the reply side), `settings` and `counters`.

mod audio;
mod counters;
pub mod dialogue;
mod messages;
pub mod repeated;
mod settings;
mod tools;

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::metrics::Stage;
use crate::pipeline::audio_in::AudioIn;
use crate::protocol::{
    AudioParams, BinaryProtocol, DeviceIdentity, ListenMode, ServerMessage, Transport, UdpParams,
};
use crate::providers::llm::ToolCall;
use crate::providers::vad::{VadJob, VadResult};
use crate::tools::iot::IotThings;
use crate::tools::mcp::McpClient;
use crate::tools::{truncate_utf8, ToolSet};
use dialogue::{Dialogue, OutItem, Output, Request, ToolInvocation};

use audio::segmenter_mode;
pub use counters::SessionCounters;
pub use settings::{SessionSettings, SessionTimers, ToolSettings};

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Upgraded, waiting for the device's `hello`.
    AwaitingHello,
    /// Hello answered; not listening.
    Idle,
    /// The device streams audio for recognition.
    Listening,
    /// The server is sending an answer (between `tts start` and `tts stop`).
    Speaking,
    /// A close has been decided; nothing more is processed.
    Closing,
}

/// One thing for the device, in send order.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// A JSON text message.
    Text(String),
    /// One Opus packet to play (60 ms), unframed: each transport frames it its own way (the
    /// WebSocket's binary protocol v1/v2/v3 with [`Session::protocol`], UDP its own header).
    Audio {
        /// The Opus packet.
        opus: Vec<u8>,
        /// Milliseconds since the session started (the v2/v3 header timestamp).
        timestamp_ms: u32,
    },
    /// Close the WebSocket with this code and reason, after sending what is queued.
    Close {
        /// WebSocket close code (1000 normal, 1001 going away, 1008 policy, 1009 too big).
        code: u16,
        /// Human-readable reason (≤ 123 bytes).
        reason: String,
    },
}

/// What a session asks its driver to do after one event: every `Session::on_*` returns one.
///
/// The driver (one per transport) sends `send` in order, hands `vad` and `requests` to the
/// providers, and records `samples`; a job a provider refuses comes back as another event
/// ([`Session::on_vad_refused`], or an error result), whose effects the driver handles the same
/// way.
#[derive(Debug, Default)]
pub struct Effects {
    /// For the device, in send order: JSON text, Opus audio to play, at most one close (last).
    pub send: Vec<Outgoing>,
    /// The session's next VAD job for its inference worker, when one is ready.
    pub vad: Option<VadJob>,
    /// Work to start: a recognition, an LLM stream or its cancellation, a synthesis.
    pub requests: Vec<Request>,
    /// Latency samples (stage, µs) for the shard's histograms.
    pub samples: Vec<(Stage, u64)>,
}

impl Effects {
    /// Appends `later`'s effects after this one's (send order kept).
    pub fn merge(&mut self, later: Effects) {
        self.send.extend(later.send);
        if later.vad.is_some() {
            self.vad = later.vad;
        }
        self.requests.extend(later.requests);
        self.samples.extend(later.samples);
    }
}

/// Why the session decided to close (for counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// The device said goodbye.
    DeviceGoodbye,
    /// No hello in time.
    HelloTimeout,
    /// No activity at all for `idle_close`.
    IdleTimeout,
    /// No voice for `no_voice_close`.
    NoVoice,
    /// The instance is draining.
    Drain,
    /// The user said an exit phrase (after the farewell was spoken).
    ExitIntent,
}

/// Events a shard delivers to a session's mailbox.
#[derive(Debug)]
pub enum SessionEvent {
    /// The instance is draining: finish the current answer by `deadline`, then say goodbye.
    Drain {
        /// When the session must be closed at the latest.
        deadline: Instant,
    },
    /// A VAD result from an inference core.
    Vad(Box<VadResult>),
    /// A recognition finished (local worker or remote provider).
    Asr {
        /// Turn id.
        turn: u32,
        /// Text, or why it failed.
        result: Result<String, String>,
    },
    /// New LLM output is waiting in the session's stream buffer.
    LlmReady {
        /// Turn id.
        turn: u32,
    },
    /// A segment's synthesis finished.
    Tts {
        /// Turn id.
        turn: u32,
        /// Segment number.
        seq: u32,
        /// PCM and its rate, or why it failed.
        result: Result<(Vec<i16>, u32), String>,
    },
}

/// How long an uplink pipeline stays allocated without audio.
/// A turn's input held back until the device's tool list is known.
#[derive(Debug)]
enum HeldTurn {
    /// A recognition result.
    Asr {
        turn: u32,
        result: Result<String, String>,
    },
    /// A typed (`listen detect` text) question.
    Text(String),
}

/// The line that says how many device-caused lines the session's log rate held back.
const SUPPRESSED_LINES: &str = "device-caused log lines suppressed (over log.session_lines_per_s)";

const AUDIO_IDLE_RELEASE: Duration = Duration::from_secs(10);
/// How soon a VAD job refused by a full queue is retried.
const VAD_RETRY: Duration = Duration::from_millis(5);

/// The state of one device connection.
pub struct Session {
    /// Our session id (uuid4), sent in hello and every message.
    pub id: String,
    /// Who the device says it is.
    pub identity: DeviceIdentity,
    /// The shard's key for this session (routes inference results back).
    pub key: u64,
    state: SessionState,
    protocol: BinaryProtocol,
    transport: Transport,
    /// The UDP audio channel the next hello reply announces (MQTT transport only).
    udp: Option<UdpParams>,
    uplink: AudioParams,
    downlink: AudioParams,
    mode: ListenMode,
    mcp: bool,
    timers: SessionTimers,
    settings: SessionSettings,
    audio: Option<Box<AudioIn>>,
    last_audio: Instant,
    inference_busy: bool,
    turn_refused: bool,
    vad_retry_at: Option<Instant>,
    dialogue: Dialogue,
    requests: Vec<Request>,
    samples: Vec<(Stage, u64)>,
    /// Tool calls the dialogue asked for, carried out in order after the event that asked
    /// (a call answered at once can ask for more; they queue here instead of recursing).
    tool_calls: std::collections::VecDeque<ToolInvocation>,
    started: Instant,
    last_activity: Instant,
    last_voice: Instant,
    drain_deadline: Option<Instant>,
    /// When the device last began listening (`listen start` or a wake word); cleared by
    /// `listen stop`. A drain waits for its speech until `timers.drain_listen_grace` after it.
    listen_started: Option<Instant>,
    /// A turn ready for its answer, held while the device's tools are being listed (since).
    held: Option<(HeldTurn, Instant)>,
    /// VAD heard speech start and the utterance has not ended yet: the user is mid-sentence.
    speech_open: bool,
    close_cause: Option<CloseCause>,
    mcp_client: Option<Box<McpClient>>,
    iot: IotThings,
    toolset: Rc<ToolSet>,
    /// Counters of what this session saw.
    pub counters: SessionCounters,
    /// Device-caused log lines written so far, by kind (the rest are only counted).
    repeated: repeated::RepeatedLines,
    /// This session's budget of device-caused log lines.
    log_rate: repeated::LogRate,
}

impl Session {
    /// A session for an upgraded connection, before hello.
    pub fn new(
        id: String,
        key: u64,
        identity: DeviceIdentity,
        downlink: AudioParams,
        settings: SessionSettings,
        now: Instant,
    ) -> Session {
        // Framing follows the Protocol-Version header; hello's `version` is the fallback.
        let protocol = identity
            .protocol_version
            .and_then(|v| BinaryProtocol::from_version(v).ok())
            .unwrap_or(BinaryProtocol::V1);
        let mut dialogue = Dialogue::new(settings.dialogue.clone(), id.clone());
        let toolset = settings.tools.base.clone();
        let log_rate = repeated::LogRate::new(settings.log_lines_per_s, settings.log_burst);
        dialogue.set_tools(toolset.openai_tools().cloned(), toolset.volume_tools());
        Session {
            id,
            identity,
            key,
            state: SessionState::AwaitingHello,
            protocol,
            transport: Transport::Websocket,
            udp: None,
            uplink: AudioParams::device_default(),
            downlink,
            mode: ListenMode::Auto,
            mcp: false,
            timers: settings.timers,
            settings,
            audio: None,
            last_audio: now,
            inference_busy: false,
            turn_refused: false,
            vad_retry_at: None,
            dialogue,
            requests: Vec::new(),
            samples: Vec::new(),
            tool_calls: std::collections::VecDeque::new(),
            started: now,
            last_activity: now,
            last_voice: now,
            drain_deadline: None,
            listen_started: None,
            held: None,
            speech_open: false,
            close_cause: None,
            mcp_client: None,
            iot: IotThings::default(),
            toolset,
            counters: SessionCounters::default(),
            repeated: repeated::RepeatedLines::default(),
            log_rate,
        }
    }

    /// Writes one line per kind of device-caused line that was counted but not logged (call
    /// once, when the session ends).
    pub fn log_suppressed(&self) {
        for (kind, n) in self.repeated.suppressed() {
            tracing::info!(session = %self.id, suppressed = n, "{} not logged", kind.what());
        }
        let n = self.log_rate.pending();
        if n > 0 {
            tracing::info!(session = %self.id, suppressed = n, "{SUPPRESSED_LINES}");
        }
    }

    /// Whether a line this device caused may be written at `now` (the session's log rate;
    /// counted when not). A written line follows one saying how many were suppressed since the
    /// last, if any were.
    fn device_line(&mut self, now: Instant) -> bool {
        match self.log_rate.admit(now) {
            repeated::Admit::Write { suppressed_before } => {
                if suppressed_before > 0 {
                    tracing::info!(session = %self.id, suppressed = suppressed_before, "{SUPPRESSED_LINES}");
                }
                true
            }
            repeated::Admit::Suppress => {
                self.counters.log_lines_suppressed += 1;
                false
            }
        }
    }

    /// Current state.
    pub fn state(&self) -> SessionState {
        if self.state != SessionState::Closing && self.dialogue.speaking() {
            SessionState::Speaking
        } else {
            self.state
        }
    }

    /// Runs one event's handler and gathers everything it asked for into one [`Effects`]:
    /// the messages, the tool calls it queued (carried out here, in order), the next VAD job,
    /// the requests and the latency samples.
    fn step(
        &mut self,
        now: Instant,
        handle: impl FnOnce(&mut Self, &mut Vec<Outgoing>),
    ) -> Effects {
        let mut send = Vec::new();
        handle(self, &mut send);
        while let Some(call) = self.tool_calls.pop_front() {
            if self.state == SessionState::Closing {
                self.tool_calls.clear();
                break;
            }
            self.dispatch_call(call, now, &mut send);
        }
        self.forget_stale_calls();
        Effects {
            send,
            vad: self.take_vad_job(now),
            requests: std::mem::take(&mut self.requests),
            samples: std::mem::take(&mut self.samples),
        }
    }

    /// Moves what the dialogue produced into the session's outputs and queues the tool calls
    /// it asked for (carried out by [`Session::step`] once this handler returns).
    fn absorb(&mut self, d: Output, now: Instant, out: &mut Vec<Outgoing>) {
        for item in d.items {
            match item {
                OutItem::Text(t) => out.push(Outgoing::Text(t)),
                OutItem::Audio(opus) => out.push(Outgoing::Audio {
                    opus,
                    timestamp_ms: now.saturating_duration_since(self.started).as_millis() as u32,
                }),
            }
        }
        self.requests.extend(d.requests);
        self.samples.extend(d.samples);
        self.tool_calls.extend(d.calls);
        self.forget_stale_calls();
    }

    /// Calls of an aborted or replaced turn are forgotten: a late answer is ignored.
    fn forget_stale_calls(&mut self) {
        let turn = self.dialogue.current_turn();
        self.tool_calls.retain(|c| Some(c.turn) == turn);
        if let Some(c) = self.mcp_client.as_mut() {
            c.cancel_calls_except(turn);
        }
    }

    /// A text frame from the device (a JSON control message).
    pub fn on_text(&mut self, text: &str, now: Instant) -> Effects {
        self.step(now, |s, out| s.handle_text(text, now, out))
    }

    /// An event a provider or the shard delivered to the session's mailbox (LLM output is
    /// read by the driver from its stream buffer and given to [`Session::on_llm`]).
    pub fn on_event(&mut self, event: SessionEvent, now: Instant) -> Effects {
        match event {
            SessionEvent::Drain { deadline } => self.on_drain(deadline, now),
            SessionEvent::Vad(result) => self.on_vad_result(*result, now),
            SessionEvent::Asr { turn, result } => self.on_asr_result(turn, result, now),
            SessionEvent::Tts { turn, seq, result } => self.on_tts_result(turn, seq, result, now),
            SessionEvent::LlmReady { .. } => Effects::default(),
        }
    }

    /// A VAD result from an inference core.
    pub fn on_vad_result(&mut self, result: VadResult, now: Instant) -> Effects {
        self.step(now, |s, out| s.handle_vad_result(result, now, out))
    }

    /// A recognition result for turn `turn` (or why it failed, including a refused job).
    pub fn on_asr_result(
        &mut self,
        turn: u32,
        result: Result<String, String>,
        now: Instant,
    ) -> Effects {
        self.step(now, |s, out| s.handle_asr_result(turn, result, now, out))
    }

    /// LLM text for turn `turn`; `done` carries the end of the stream (with its tool calls).
    pub fn on_llm(
        &mut self,
        turn: u32,
        text: &str,
        done: Option<Result<Vec<ToolCall>, String>>,
        now: Instant,
    ) -> Effects {
        self.step(now, |s, out| s.handle_llm(turn, text, done, now, out))
    }

    /// A synthesis result for segment `seq` of turn `turn` (or why it failed).
    pub fn on_tts_result(
        &mut self,
        turn: u32,
        seq: u32,
        result: Result<(Vec<i16>, u32), String>,
        now: Instant,
    ) -> Effects {
        self.step(now, |s, out| {
            s.handle_tts_result(turn, seq, result, now, out)
        })
    }

    fn handle_asr_result(
        &mut self,
        turn: u32,
        result: Result<String, String>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        if self.discovering_tools() {
            self.held = Some((HeldTurn::Asr { turn, result }, now));
            return;
        }
        let mut d = Output::default();
        self.dialogue.on_asr(turn, result, now, &mut d);
        self.absorb(d, now, out);
    }

    /// True while the device's MCP tool list is being read (right after hello).
    fn discovering_tools(&self) -> bool {
        self.mcp_client.as_ref().is_some_and(|c| c.discovering())
    }

    /// Answers a held turn once the tools are known or the wait is over.
    fn release_held(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        let ready = self.held.as_ref().is_some_and(|(_, since)| {
            !self.discovering_tools() || now >= *since + self.settings.tools.discovery_wait
        });
        let Some((held, _)) = self.held.take_if(|_| ready) else {
            return;
        };
        let mut d = Output::default();
        match held {
            HeldTurn::Asr { turn, result } => self.dialogue.on_asr(turn, result, now, &mut d),
            HeldTurn::Text(text) => self.dialogue.on_text_turn(&text, now, &mut d),
        }
        self.absorb(d, now, out);
    }

    fn handle_llm(
        &mut self,
        turn: u32,
        text: &str,
        done: Option<Result<Vec<ToolCall>, String>>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let mut d = Output::default();
        if !text.is_empty() {
            self.dialogue.on_llm_text(turn, text, now, &mut d);
        }
        if let Some(result) = done {
            self.dialogue.on_llm_done(turn, result, now, &mut d);
        }
        self.absorb(d, now, out);
    }

    fn handle_tts_result(
        &mut self,
        turn: u32,
        seq: u32,
        result: Result<(Vec<i16>, u32), String>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let mut d = Output::default();
        self.dialogue.on_tts(turn, seq, result, now, &mut d);
        self.absorb(d, now, out);
    }

    /// Dialogue counters.
    pub fn dialogue_counters(&self) -> dialogue::DialogueCounters {
        self.dialogue.counters
    }

    /// The UDP audio channel (server, port, fresh key, nonce) to announce in the reply to the
    /// device's next hello: the MQTT driver sets it before handing the session a hello.
    pub fn set_udp_channel(&mut self, udp: UdpParams) {
        self.udp = Some(udp);
    }

    /// Binary framing in use.
    pub fn protocol(&self) -> BinaryProtocol {
        self.protocol
    }

    /// Uplink audio parameters announced by the device (defaults until hello).
    pub fn uplink(&self) -> &AudioParams {
        &self.uplink
    }

    /// Listening mode last announced.
    pub fn mode(&self) -> ListenMode {
        self.mode
    }

    /// Why the session decided to close, once it has.
    pub fn close_cause(&self) -> Option<CloseCause> {
        self.close_cause
    }

    /// Whether the device announced an MCP server.
    pub fn has_mcp(&self) -> bool {
        self.mcp
    }

    fn send(&self, out: &mut Vec<Outgoing>, msg: ServerMessage<'_>) {
        out.push(Outgoing::Text(msg.to_json(&self.id)));
    }

    fn close(
        &mut self,
        out: &mut Vec<Outgoing>,
        cause: CloseCause,
        code: u16,
        reason: impl Into<String>,
    ) {
        self.state = SessionState::Closing;
        self.close_cause = Some(cause);
        let mut reason = reason.into();
        truncate_utf8(&mut reason, 123);
        out.push(Outgoing::Close { code, reason });
    }

    /// Counters including the live uplink pipeline's and the dialogue's job limits.
    pub fn counters(&self) -> SessionCounters {
        let mut c = self.counters;
        let d = self.dialogue.counters;
        c.add(&SessionCounters {
            jobs_held: d.jobs_held,
            segments_dropped: d.segments_dropped,
            ..Default::default()
        });
        if let Some(m) = &self.mcp_client {
            c.add(&SessionCounters {
                mcp: m.counters,
                ..Default::default()
            });
        }
        if let Some(a) = &self.audio {
            c.add(&SessionCounters {
                audio: a.counters,
                ..Default::default()
            });
        }
        c
    }

    /// The next instant at which [`Session::on_timer`] has something to check.
    pub fn next_deadline(&self) -> Instant {
        let mut d = if self.state == SessionState::AwaitingHello {
            self.started + self.timers.hello_timeout
        } else {
            (self.last_voice + self.timers.no_voice_close)
                .min(self.last_activity + self.timers.idle_close)
        };
        if let Some(drain) = self.drain_deadline {
            d = d.min(drain);
            // Cleared by on_timer once passed, so this never stays in the past.
            if let Some(listen) = self.listen_started {
                d = d.min(listen + self.timers.drain_listen_grace);
            }
        }
        if let Some(retry) = self.vad_retry_at {
            d = d.min(retry);
        }
        if self.audio.is_some() {
            d = d.min(self.last_audio + AUDIO_IDLE_RELEASE);
            if self.awaiting_manual_end() {
                d = d.min(self.last_audio + self.timers.manual_audio_gap);
            }
        }
        if let Some(x) = self.dialogue.next_deadline() {
            d = d.min(x);
        }
        if let Some(x) = self.mcp_client.as_ref().and_then(|c| c.next_deadline()) {
            d = d.min(x);
        }
        if let Some((_, since)) = &self.held {
            d = d.min(*since + self.settings.tools.discovery_wait);
        }
        d
    }

    /// Checks timers at `now` (call at [`Session::next_deadline`]).
    pub fn on_timer(&mut self, now: Instant) -> Effects {
        self.step(now, |s, out| s.handle_timer(now, out))
    }

    fn handle_timer(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        if self.state == SessionState::Closing {
            return;
        }
        if self
            .listen_started
            .is_some_and(|t| now >= t + self.timers.drain_listen_grace)
        {
            self.listen_started = None;
        }
        if self.awaiting_manual_end() && now >= self.last_audio + self.timers.manual_audio_gap {
            // Push-to-talk speech, then no more frames: the client let go without `listen stop`.
            self.counters.manual_gap_ends += 1;
            if let Some(audio) = self.audio.as_mut() {
                let mut events = Vec::new();
                audio.stop(&mut events);
                self.apply_events(events, now, out);
            }
            self.speech_open = false;
        }
        let release = self
            .audio
            .as_ref()
            .is_some_and(|a| !a.in_flight() && now >= self.last_audio + AUDIO_IDLE_RELEASE);
        if release {
            // No audio for a while: free the decoder and segmenter (~30 KiB) of an idle device.
            if let Some(a) = self.audio.take() {
                self.counters.add(&SessionCounters {
                    audio: a.counters,
                    ..Default::default()
                });
            }
        }
        if self.state == SessionState::AwaitingHello {
            if now >= self.started + self.timers.hello_timeout {
                self.close(
                    out,
                    CloseCause::HelloTimeout,
                    1008,
                    "no hello received in time",
                );
            }
            return;
        }
        if let Some(c) = self.mcp_client.as_mut() {
            let mut events = Vec::new();
            c.on_timer(now, &mut events);
            self.on_mcp_events(events, now, out);
        }
        self.release_held(now, out);
        let mut d = Output::default();
        self.dialogue.on_timer(now, &mut d);
        self.absorb(d, now, out);
        if self.dialogue.take_close_request() {
            self.goodbye(out, CloseCause::ExitIntent, 1000, "goodbye");
            return;
        }
        if self.dialogue.busy() {
            // An answer in progress counts as activity.
            self.last_activity = now;
        }
        let drained = self.drain_deadline.is_some() && !self.mid_interaction(now);
        if self.drain_deadline.is_some_and(|d| now >= d) || drained {
            self.goodbye(out, CloseCause::Drain, 1001, "server shutting down");
        } else if now >= self.last_activity + self.timers.idle_close {
            self.close(out, CloseCause::IdleTimeout, 1000, "idle timeout");
        } else if now >= self.last_voice + self.timers.no_voice_close {
            self.goodbye(
                out,
                CloseCause::NoVoice,
                1000,
                "no voice detected for a while",
            );
        }
    }

    /// True while an interaction is under way: the user is mid-sentence or an answer is being
    /// prepared or spoken. A drain lets it finish (until its deadline).
    /// Manual mode with speech heard and the utterance still open.
    fn awaiting_manual_end(&self) -> bool {
        self.mode == ListenMode::Manual && self.speech_open && self.audio.is_some()
    }

    fn mid_interaction(&self, now: Instant) -> bool {
        let about_to_speak = self.audio.is_some()
            && self
                .listen_started
                .is_some_and(|t| now < t + self.timers.drain_listen_grace);
        self.dialogue.busy() || (self.speech_open && self.audio.is_some()) || about_to_speak
    }

    /// The instance is draining: close now unless an interaction is under way.
    pub fn on_drain(&mut self, deadline: Instant, now: Instant) -> Effects {
        self.step(now, |s, out| s.handle_drain(deadline, now, out))
    }

    fn handle_drain(&mut self, deadline: Instant, now: Instant, out: &mut Vec<Outgoing>) {
        self.drain_deadline = Some(deadline);
        match self.state() {
            SessionState::Closing => {}
            _ if self.mid_interaction(now) => {}
            _ => {
                self.goodbye(out, CloseCause::Drain, 1001, "server shutting down");
            }
        }
    }

    fn goodbye(&mut self, out: &mut Vec<Outgoing>, cause: CloseCause, code: u16, reason: &str) {
        self.send(out, ServerMessage::Goodbye);
        self.close(out, cause, code, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::audio_in::AudioInLimits;
    use crate::pipeline::segmenter::SegmenterConfig;
    use crate::tools::mcp::McpSettings;
    use crate::tools::server::ServerTools;
    use dialogue::DialogueSettings;
    use serde_json::json;

    fn identity(version: Option<u8>) -> DeviceIdentity {
        DeviceIdentity {
            device_id: "aa:bb:cc:dd:ee:ff".into(),
            client_id: Some("c".into()),
            authorization: None,
            protocol_version: version,
            from_mqtt_gateway: false,
        }
    }

    fn timers() -> SessionTimers {
        SessionTimers {
            hello_timeout: Duration::from_secs(10),
            no_voice_close: Duration::from_secs(120),
            idle_close: Duration::from_secs(180),
            drain_listen_grace: Duration::from_secs(4),
            manual_audio_gap: Duration::from_secs(2),
        }
    }

    /// A session with a driver's bookkeeping: the old push-style calls (`out` collects what
    /// to send, requests wait for `take_requests`) over the effects API, so each test reads as
    /// the conversation it checks.
    struct Harness {
        s: Session,
        requests: Vec<Request>,
    }

    impl std::ops::Deref for Harness {
        type Target = Session;
        fn deref(&self) -> &Session {
            &self.s
        }
    }

    impl std::ops::DerefMut for Harness {
        fn deref_mut(&mut self) -> &mut Session {
            &mut self.s
        }
    }

    impl Harness {
        fn apply(&mut self, fx: Effects, out: &mut Vec<Outgoing>) {
            out.extend(fx.send);
            self.requests.extend(fx.requests);
        }
        /// As the connection driver does after every event: `on_timer` again at once while a
        /// deadline is already due (the rest of a reply's first burst, one frame per pump).
        fn settle(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
            for _ in 0..1000 {
                // A closed session has no driver left to wake it.
                let closed = out.iter().any(|o| matches!(o, Outgoing::Close { .. }));
                if closed || self.s.next_deadline() > now {
                    return;
                }
                let fx = self.s.on_timer(now);
                self.apply(fx, out);
            }
            panic!("a deadline stayed due after 1000 timer calls");
        }
        fn on_text(&mut self, text: &str, now: Instant, out: &mut Vec<Outgoing>) {
            let fx = self.s.on_text(text, now);
            self.apply(fx, out);
        }
        fn on_timer(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
            let fx = self.s.on_timer(now);
            self.apply(fx, out);
            self.settle(now, out);
        }
        fn on_drain(&mut self, deadline: Instant, now: Instant, out: &mut Vec<Outgoing>) {
            let fx = self.s.on_drain(deadline, now);
            self.apply(fx, out);
        }
        fn on_llm(
            &mut self,
            turn: u32,
            text: &str,
            done: Option<Result<Vec<ToolCall>, String>>,
            now: Instant,
            out: &mut Vec<Outgoing>,
        ) {
            let fx = self.s.on_llm(turn, text, done, now);
            self.apply(fx, out);
        }
        fn on_tts_result(
            &mut self,
            turn: u32,
            seq: u32,
            result: Result<(Vec<i16>, u32), String>,
            now: Instant,
            out: &mut Vec<Outgoing>,
        ) {
            let fx = self.s.on_tts_result(turn, seq, result, now);
            self.apply(fx, out);
            self.settle(now, out);
        }
        fn take_requests(&mut self) -> Vec<Request> {
            std::mem::take(&mut self.requests)
        }
    }

    fn session(version: Option<u8>, now: Instant) -> Harness {
        let server_tools = Rc::new(ServerTools::from_names(&["get_time".into()]).unwrap());
        let s = Session::new(
            "sid".into(),
            1,
            identity(version),
            AudioParams::downlink_default(),
            SessionSettings {
                timers: timers(),
                answer_ping: true,
                vad_events: true,
                segmenter: SegmenterConfig::default(),
                limits: AudioInLimits {
                    max_wait: Duration::from_millis(1500),
                    max_backlog_chunks: 938,
                    max_chunks_per_job: 16,
                },
                dialogue: DialogueSettings {
                    system_prompt: String::new(),
                    ..dialogue::tests::settings(true)
                },
                tools: ToolSettings {
                    mcp: Some(McpSettings {
                        call_timeout: Duration::from_secs(5),
                        max_pending_calls: 4,
                        max_tools: 8,
                        max_pages: 4,
                        vision: None,
                    }),
                    iot: true,
                    server: server_tools.clone(),
                    base: Rc::new(ToolSet::build(&server_tools, &[], &IotThings::default(), 8)),
                    max_tools: 8,
                    discovery_wait: Duration::from_secs(2),
                    wake_greeting: "Hi!".into(),
                    wake_greeting_zh: "你好".into(),
                },
                log_lines_per_s: 2.0,
                log_burst: 10,
            },
            now,
        );
        Harness {
            s,
            requests: Vec::new(),
        }
    }

    fn json(o: &Outgoing) -> serde_json::Value {
        match o {
            Outgoing::Text(t) => serde_json::from_str(t).unwrap(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn hello_is_answered_with_session_id_and_our_downlink_params() {
        let now = Instant::now();
        let mut s = session(None, now);
        let mut out = vec![];
        s.on_text(r#"{"type":"hello","version":1,"transport":"websocket","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#, now, &mut out);
        assert_eq!(out.len(), 1);
        let v = json(&out[0]);
        assert_eq!(v["type"], "hello");
        assert_eq!(v["session_id"], "sid");
        assert_eq!(v["transport"], "websocket");
        assert_eq!(v["audio_params"]["sample_rate"], 24000);
        assert_eq!(v["audio_params"]["frame_duration"], 60);
        assert_eq!(s.state(), SessionState::Idle);
    }

    #[test]
    fn a_udp_hello_is_answered_with_the_channel_the_driver_set() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.set_udp_channel(UdpParams {
            server: "192.0.2.1".into(),
            port: 8884,
            key: "00".repeat(16),
            nonce: "01".repeat(16),
        });
        let mut out = vec![];
        s.on_text(
            r#"{"type":"hello","version":3,"transport":"udp"}"#,
            now,
            &mut out,
        );
        let v = json(&out[0]);
        assert_eq!(
            (v["transport"].as_str(), v["version"].as_u64()),
            (Some("udp"), Some(3))
        );
        assert_eq!(v["udp"]["port"], 8884);
        assert_eq!(v["udp"]["encryption"], "aes-128-ctr");
        assert_eq!(v["udp"]["nonce"], "01".repeat(16));
        // A WebSocket hello never carries it, even if a channel was set.
        let mut ws = session(None, now);
        ws.set_udp_channel(UdpParams {
            server: "x".into(),
            port: 1,
            key: String::new(),
            nonce: String::new(),
        });
        let mut out = vec![];
        ws.on_text(r#"{"type":"hello","version":1}"#, now, &mut out);
        assert!(json(&out[0]).get("udp").is_none());
    }

    #[test]
    fn hello_version_sets_framing_only_without_protocol_header() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.on_text(r#"{"type":"hello","version":3}"#, now, &mut vec![]);
        assert_eq!(s.protocol(), BinaryProtocol::V3);
        let mut s = session(Some(2), now);
        s.on_text(r#"{"type":"hello","version":3}"#, now, &mut vec![]);
        assert_eq!(s.protocol(), BinaryProtocol::V2);
    }

    #[test]
    fn malformed_json_gets_an_error_and_the_session_stays_open() {
        let now = Instant::now();
        let mut s = session(None, now);
        let mut out = vec![];
        s.on_text("{not json", now, &mut out);
        let v = json(&out[0]);
        assert_eq!(v["type"], "error");
        assert!(v["message"].as_str().unwrap().contains("JSON"), "{v}");
        assert_eq!(s.state(), SessionState::AwaitingHello);
        assert_eq!(s.counters.malformed, 1);
    }

    #[test]
    fn unknown_type_is_ignored_silently() {
        let now = Instant::now();
        let mut s = session(None, now);
        let mut out = vec![];
        s.on_text(r#"{"type":"hello"}"#, now, &mut out);
        out.clear();
        s.on_text(r#"{"type":"teleport","to":"mars"}"#, now, &mut out);
        assert!(out.is_empty());
        assert_eq!(s.counters.unknown, 1);
    }

    #[test]
    fn audio_before_hello_is_dropped_and_counted() {
        let now = Instant::now();
        let mut s = session(None, now);
        let fx = s.on_binary(&[1, 2, 3, 4], now);
        assert!(fx.send.is_empty() && fx.vad.is_none());
        assert_eq!(s.counters.early_frames, 1);
    }

    #[test]
    fn no_hello_in_time_closes_with_policy_code() {
        let now = Instant::now();
        let mut s = session(None, now);
        let mut out = vec![];
        s.on_timer(now + Duration::from_secs(11), &mut out);
        assert!(matches!(&out[0], Outgoing::Close { code: 1008, .. }));
        assert_eq!(s.state(), SessionState::Closing);
    }

    #[test]
    fn no_voice_timeout_says_goodbye_then_closes() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        assert_eq!(s.next_deadline(), now + Duration::from_secs(120));
        let mut out = vec![];
        s.on_timer(now + Duration::from_secs(120), &mut out);
        assert_eq!(json(&out[0])["type"], "goodbye");
        assert!(matches!(&out[1], Outgoing::Close { code: 1000, .. }));
    }

    #[test]
    fn abort_answers_tts_stop_at_once() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        let mut out = vec![];
        s.on_text(
            r#"{"type":"abort","reason":"wake_word_detected"}"#,
            now,
            &mut out,
        );
        let v = json(&out[0]);
        assert_eq!(
            (v["type"].as_str(), v["state"].as_str()),
            (Some("tts"), Some("stop"))
        );
    }

    #[test]
    fn drain_closes_an_idle_session_with_goodbye() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        let mut out = vec![];
        s.on_drain(now + Duration::from_secs(5), now, &mut out);
        assert_eq!(json(&out[0])["type"], "goodbye");
        assert!(matches!(&out[1], Outgoing::Close { code: 1001, .. }));
    }

    #[test]
    fn drain_gives_a_device_that_just_began_listening_time_to_speak() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut s = session(None, now);
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        s.on_text(
            r#"{"type":"listen","state":"start","mode":"auto"}"#,
            now,
            &mut vec![],
        );
        let mut out = vec![];
        s.on_drain(now + Duration::from_secs(10), now + ms(500), &mut out);
        assert!(out.is_empty(), "not cut while about to speak: {out:?}");
        // The session wakes when the grace ends, not only at the drain deadline.
        assert!(s.s.next_deadline() <= now + ms(4000));
        s.on_timer(now + ms(3000), &mut out);
        assert!(out.is_empty(), "{out:?}");
        // No speech began within the grace: goodbye, before the drain deadline.
        s.on_timer(now + ms(4000), &mut out);
        assert_eq!(json(&out[0])["type"], "goodbye");
        assert!(matches!(&out[1], Outgoing::Close { code: 1001, .. }));

        // A device that stopped listening is idle: closed at once.
        let mut s = session(None, now);
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        s.on_text(r#"{"type":"listen","state":"start"}"#, now, &mut vec![]);
        s.on_text(r#"{"type":"listen","state":"stop"}"#, now, &mut vec![]);
        let mut out = vec![];
        s.on_drain(now + Duration::from_secs(10), now + ms(100), &mut out);
        assert_eq!(json(&out[0])["type"], "goodbye");

        // Listening that began long before the drain (auto mode's open microphone) is idle.
        let mut s = session(None, now);
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        s.on_text(r#"{"type":"listen","state":"start"}"#, now, &mut vec![]);
        let mut out = vec![];
        let later = now + Duration::from_secs(30);
        s.on_timer(later, &mut out);
        s.on_drain(later + Duration::from_secs(10), later, &mut out);
        assert_eq!(json(&out[0])["type"], "goodbye", "{out:?}");
    }

    /// Device MCP payloads the session sent, in order.
    fn mcp_sent(out: &[Outgoing]) -> Vec<serde_json::Value> {
        out.iter()
            .filter_map(|o| match o {
                Outgoing::Text(t) => serde_json::from_str::<serde_json::Value>(t).ok(),
                _ => None,
            })
            .filter(|v| v["type"] == "mcp")
            .map(|v| v["payload"].clone())
            .collect()
    }

    fn mcp_text(payload: serde_json::Value) -> String {
        json!({"type": "mcp", "payload": payload}).to_string()
    }

    /// A session whose device announced MCP and listed a volume and a status tool.
    fn session_with_device_tools(offline: bool, now: Instant) -> Harness {
        let mut s = session(None, now);
        s.settings.dialogue.offline_llm = offline;
        s.dialogue = Dialogue::new(s.settings.dialogue.clone(), "sid".into());
        let mut out = vec![];
        s.on_text(r#"{"type":"hello","features":{"mcp":true}}"#, now, &mut out);
        let init = mcp_sent(&out);
        assert_eq!(init[0]["method"], "initialize");
        out.clear();
        s.on_text(
            &mcp_text(json!({"jsonrpc":"2.0","id":1,"result":{}})),
            now,
            &mut out,
        );
        assert_eq!(mcp_sent(&out)[1]["method"], "tools/list");
        out.clear();
        let tools = json!([
            {"name":"self.get_device_status","description":"status","inputSchema":{"type":"object"}},
            {"name":"self.audio_speaker.set_volume","description":"volume","inputSchema":{"type":"object"}}
        ]);
        s.on_text(
            &mcp_text(json!({"jsonrpc":"2.0","id":2,"result":{"tools":tools}})),
            now,
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        s
    }

    /// Synthesises every segment the session asks for (100 ms of silence each); their texts.
    fn spoken(s: &mut Harness, now: Instant, out: &mut Vec<Outgoing>) -> Vec<String> {
        let mut texts = Vec::new();
        loop {
            let tts: Vec<_> = s
                .take_requests()
                .into_iter()
                .filter_map(|r| match r {
                    Request::Tts { turn, seq, text } => Some((turn, seq, text)),
                    _ => None,
                })
                .collect();
            if tts.is_empty() {
                return texts;
            }
            for (turn, seq, text) in tts {
                texts.push(text);
                s.on_tts_result(turn, seq, Ok((vec![0; 2400], 24_000)), now, out);
            }
        }
    }

    #[test]
    fn offline_volume_command_reads_status_then_sets_and_confirms() {
        let now = Instant::now();
        let mut s = session_with_device_tools(true, now);
        let mut out = vec![];
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"Turn the volume up"}"#,
            now,
            &mut out,
        );
        let call = &mcp_sent(&out)[0];
        assert_eq!(call["id"], 10_000);
        assert_eq!(call["params"]["name"], "self.get_device_status");
        out.clear();
        s.on_text(
            &mcp_text(json!({"jsonrpc":"2.0","id":10000,"result":{"content":[{"type":"text","text":"{\"audio_speaker\":{\"volume\":70}}"}]}})),
            now,
            &mut out,
        );
        let call = &mcp_sent(&out)[0];
        assert_eq!(
            call["params"],
            json!({"name":"self.audio_speaker.set_volume","arguments":{"volume":80}})
        );
        out.clear();
        s.on_text(
            &mcp_text(json!({"jsonrpc":"2.0","id":10001,"result":{"content":[{"type":"text","text":"true"}]}})),
            now,
            &mut out,
        );
        assert_eq!(
            spoken(&mut s, now, &mut out).concat(),
            "OK,the volume is now 80."
        );
        assert_eq!(s.pending_tool_requests(), 0);
    }

    #[test]
    fn a_question_right_after_hello_waits_for_the_device_tool_list() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut s = session(None, now);
        s.settings.dialogue.offline_llm = false;
        s.dialogue = Dialogue::new(s.settings.dialogue.clone(), "sid".into());
        let mut out = vec![];
        s.on_text(r#"{"type":"hello","features":{"mcp":true}}"#, now, &mut out);
        // The question comes before the device has answered initialize.
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"set the volume to 50"}"#,
            now + ms(10),
            &mut out,
        );
        assert!(
            s.take_requests().is_empty(),
            "held until the tools are known"
        );
        assert!(s.s.next_deadline() <= now + ms(10) + Duration::from_secs(2));
        s.on_text(
            &mcp_text(json!({"jsonrpc":"2.0","id":1,"result":{}})),
            now + ms(20),
            &mut out,
        );
        assert!(s.take_requests().is_empty(), "tools/list still in flight");
        let tools = json!([
            {"name":"self.audio_speaker.set_volume","description":"volume","inputSchema":{"type":"object"}}
        ]);
        s.on_text(
            &mcp_text(json!({"jsonrpc":"2.0","id":2,"result":{"tools":tools}})),
            now + ms(30),
            &mut out,
        );
        let reqs = s.take_requests();
        let Some(Request::Llm { tools, .. }) = reqs.into_iter().next() else {
            panic!("the held question is answered once the list is in");
        };
        assert!(tools
            .unwrap()
            .to_string()
            .contains("self_audio_speaker_set_volume"));

        // A device that never answers: the question is answered after the wait, without tools.
        let mut s = session(None, now);
        s.settings.dialogue.offline_llm = false;
        s.dialogue = Dialogue::new(s.settings.dialogue.clone(), "sid".into());
        s.on_text(r#"{"type":"hello","features":{"mcp":true}}"#, now, &mut out);
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"hello"}"#,
            now,
            &mut out,
        );
        s.on_timer(now + ms(1900), &mut out);
        assert!(s.take_requests().is_empty());
        s.on_timer(now + ms(2000), &mut out);
        assert!(matches!(
            s.take_requests().first(),
            Some(Request::Llm { .. })
        ));
    }

    #[test]
    fn llm_tool_call_goes_to_the_device_and_its_result_back_to_the_llm() {
        let now = Instant::now();
        let mut s = session_with_device_tools(false, now);
        let mut out = vec![];
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"set the volume to 50"}"#,
            now,
            &mut out,
        );
        let reqs = s.take_requests();
        let Some(Request::Llm { turn, tools, .. }) = reqs.into_iter().next() else {
            panic!("no llm request");
        };
        let names: Vec<String> = tools
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "get_time",
                "self_get_device_status",
                "self_audio_speaker_set_volume"
            ]
        );
        out.clear();
        let calls = vec![
            ToolCall {
                index: 0,
                id: "c1".into(),
                name: "self_audio_speaker_set_volume".into(),
                arguments: r#"{"volume":50}"#.into(),
            },
            ToolCall {
                index: 1,
                id: "c2".into(),
                name: "get_time".into(),
                arguments: String::new(),
            },
        ];
        s.on_llm(turn, "", Some(Ok(calls)), now, &mut out);
        let sent = mcp_sent(&out);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["params"]["arguments"]["volume"], 50);
        assert!(s.take_requests().is_empty(), "waits for the device");
        s.on_text(
            &mcp_text(json!({"jsonrpc":"2.0","id":10000,"result":{"content":[{"type":"text","text":"x".repeat(100)}]}})),
            now,
            &mut out,
        );
        let reqs = s.take_requests();
        let Some(Request::Llm {
            messages, tools, ..
        }) = reqs.into_iter().next()
        else {
            panic!("no second llm request");
        };
        assert!(tools.is_some(), "round 1 of 2: tools still offered");
        let tail: Vec<_> = messages.iter().rev().take(3).rev().collect();
        assert!(tail[0].tool_calls.is_some());
        assert_eq!(tail[1].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(
            tail[1].content.as_deref().map(str::len),
            Some(64),
            "result bounded"
        );
        assert_eq!(tail[2].tool_call_id.as_deref(), Some("c2"));
        assert!(tail[2].content.as_deref().unwrap().contains("UTC+00:00"));
    }

    #[test]
    fn abort_during_a_device_call_forgets_it_and_ignores_the_late_answer() {
        let now = Instant::now();
        let mut s = session_with_device_tools(true, now);
        let mut out = vec![];
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"set volume to 20"}"#,
            now,
            &mut out,
        );
        assert_eq!(s.pending_tool_requests(), 1);
        assert!(s.next_deadline() <= now + Duration::from_secs(5));
        out.clear();
        s.on_text(r#"{"type":"abort"}"#, now, &mut out);
        assert_eq!(json(&out[0])["state"], "stop");
        assert_eq!(s.pending_tool_requests(), 0);
        s.take_requests();
        out.clear();
        s.on_text(
            &mcp_text(json!({"jsonrpc":"2.0","id":10000,"result":{"content":[]}})),
            now,
            &mut out,
        );
        assert!(out.is_empty() && s.take_requests().is_empty());
        let c = s.counters();
        assert_eq!((c.mcp.cancelled, c.mcp.ignored), (1, 1));
    }

    #[test]
    fn device_call_timeout_is_spoken_as_a_failure() {
        let now = Instant::now();
        let mut s = session_with_device_tools(true, now);
        let mut out = vec![];
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"mute"}"#,
            now,
            &mut out,
        );
        s.take_requests();
        s.on_timer(now + Duration::from_secs(5), &mut out);
        assert_eq!(
            spoken(&mut s, now, &mut out).concat(),
            "Sorry,the device could not do that."
        );
        assert_eq!(s.counters().mcp.timeouts, 1);
    }

    #[test]
    fn exit_phrase_speaks_a_farewell_then_closes_after_tts_stop() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        let mut out = vec![];
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"Goodbye!"}"#,
            now,
            &mut out,
        );
        assert_eq!(
            spoken(&mut s, now, &mut out).concat(),
            "Goodbye!Talk to you soon."
        );
        out.clear();
        s.on_timer(now + Duration::from_secs(2), &mut out);
        let kinds: Vec<String> = out
            .iter()
            .map(|o| match o {
                Outgoing::Text(t) => serde_json::from_str::<serde_json::Value>(t).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                Outgoing::Close { code, .. } => format!("close {code}"),
                Outgoing::Audio { .. } => "audio".into(),
            })
            .collect();
        assert_eq!(kinds, ["tts", "goodbye", "close 1000"]);
        assert_eq!(s.close_cause(), Some(CloseCause::ExitIntent));
    }

    #[test]
    fn wake_word_is_greeted_without_stt() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        let mut out = vec![];
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"Hi, Xiaozhi."}"#,
            now,
            &mut out,
        );
        assert!(!out
            .iter()
            .any(|o| matches!(o, Outgoing::Text(t) if t.contains("\"stt\""))));
        assert_eq!(spoken(&mut s, now, &mut out), ["Hi!"]);
    }

    #[test]
    fn iot_descriptors_become_tools_and_calls_send_iot_commands() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.settings.dialogue.offline_llm = false;
        s.dialogue = Dialogue::new(s.settings.dialogue.clone(), "sid".into());
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        s.on_text(r#"{"type":"iot","descriptors":[{"name":"Lamp","description":"a lamp","properties":{"power":{"type":"boolean"}},"methods":{"TurnOn":{"description":"switch on"}}}]}"#, now, &mut vec![]);
        s.on_text(
            r#"{"type":"iot","states":[{"name":"Lamp","state":{"power":false}}]}"#,
            now,
            &mut vec![],
        );
        let mut out = vec![];
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"lamp on"}"#,
            now,
            &mut out,
        );
        let Some(Request::Llm { turn, tools, .. }) = s.take_requests().into_iter().next() else {
            panic!()
        };
        assert!(tools.unwrap().to_string().contains("iot_Lamp_TurnOn"));
        out.clear();
        let calls = vec![
            ToolCall {
                index: 0,
                id: "a".into(),
                name: "iot_Lamp_TurnOn".into(),
                arguments: "{}".into(),
            },
            ToolCall {
                index: 1,
                id: "b".into(),
                name: "iot_Lamp_get_state".into(),
                arguments: "{}".into(),
            },
        ];
        s.on_llm(turn, "", Some(Ok(calls)), now, &mut out);
        let v = json(&out[0]);
        assert_eq!(v["type"], "iot");
        assert_eq!(v["commands"][0]["method"], "TurnOn");
        let Some(Request::Llm { messages, .. }) = s.take_requests().into_iter().next() else {
            panic!()
        };
        assert_eq!(
            messages.last().unwrap().content.as_deref(),
            Some(r#"{"power":false}"#)
        );
    }

    #[test]
    fn a_tool_result_with_action_response_is_spoken_without_asking_the_llm_again() {
        let now = Instant::now();
        let mut s = session_with_device_tools(false, now);
        let mut out = vec![];
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"what do you see"}"#,
            now,
            &mut out,
        );
        let Some(Request::Llm { turn, .. }) = s.take_requests().into_iter().next() else {
            panic!("no llm request")
        };
        let call = ToolCall {
            index: 0,
            id: "c".into(),
            name: "self_get_device_status".into(),
            arguments: "{}".into(),
        };
        s.on_llm(turn, "", Some(Ok(vec![call])), now, &mut out);
        let text = json!({"success":true,"action":"RESPONSE","response":"A cat on a sofa."});
        s.on_text(
            &mcp_text(json!({"jsonrpc":"2.0","id":10000,"result":{"content":[{"type":"text","text":text.to_string()}]}})),
            now,
            &mut out,
        );
        let reqs = s.take_requests();
        assert!(!reqs.iter().any(|r| matches!(r, Request::Llm { .. })));
        assert!(matches!(&reqs[..], [Request::Tts { text, .. }] if text == "A cat on a sofa."));
    }

    #[test]
    fn zero_tool_rounds_offers_no_tools_to_the_llm() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.settings.dialogue.offline_llm = false;
        s.settings.dialogue.max_tool_rounds = 0;
        s.dialogue = Dialogue::new(s.settings.dialogue.clone(), "sid".into());
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"what time is it"}"#,
            now,
            &mut vec![],
        );
        let reqs = s.take_requests();
        assert!(
            matches!(&reqs[..], [Request::Llm { tools: None, .. }]),
            "{reqs:?}"
        );
    }

    #[test]
    fn calls_without_ids_or_with_repeated_ids_get_unique_ones() {
        let now = Instant::now();
        let mut s = session(None, now);
        s.settings.dialogue.offline_llm = false;
        s.dialogue = Dialogue::new(s.settings.dialogue.clone(), "sid".into());
        s.on_text(r#"{"type":"hello"}"#, now, &mut vec![]);
        s.on_text(
            r#"{"type":"listen","state":"detect","text":"time?"}"#,
            now,
            &mut vec![],
        );
        let Some(Request::Llm { turn, .. }) = s.take_requests().into_iter().next() else {
            panic!()
        };
        let call = |id: &str| ToolCall {
            index: 0,
            id: id.into(),
            name: "get_time".into(),
            arguments: "{}".into(),
        };
        s.on_llm(
            turn,
            "",
            Some(Ok(vec![call(""), call("x"), call("x")])),
            now,
            &mut vec![],
        );
        let Some(Request::Llm { messages, .. }) = s.take_requests().into_iter().next() else {
            panic!("no second round")
        };
        let ids: Vec<_> = messages
            .iter()
            .filter_map(|m| m.tool_call_id.clone())
            .collect();
        assert_eq!(ids, ["call_1_1_0", "x", "call_1_1_2"]);
    }
}
