//! A device session: the state machine, with no I/O.
//!
//! The connection loop ([`connection`]) feeds it what arrives (text, binary, timer expiries,
//! shard events) and writes what it returns. Keeping the decisions here lets them be tested
//! without sockets and keeps the wire format (in `protocol`) out of the I/O code.
//!
//! States: `AwaitingHello` → `Idle` (hello answered) → `Listening` / `Speaking` → `Closing`.

pub mod connection;
pub mod dialogue;

use std::time::{Duration, Instant};

use crate::metrics::Stage;
use crate::pipeline::audio_in::{AudioIn, AudioInCounters, AudioInLimits, PacketOutcome};
use crate::pipeline::segmenter::{Event, Mode, SegmenterConfig};
use crate::protocol::{
    parse_client_message, AudioParams, BinaryProtocol, ClientMessage, DeviceIdentity, ListenMode,
    ListenState, ServerMessage, Transport,
};
use crate::providers::vad::{VadJob, VadResult};
use dialogue::{Dialogue, DialogueSettings, OutItem, Output, Request};

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
}

/// Something the connection loop must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// A JSON text message.
    Text(String),
    /// A binary (audio) message.
    Binary(Vec<u8>),
    /// Close the WebSocket with this code and reason, after sending what is queued.
    Close {
        /// WebSocket close code (1000 normal, 1001 going away, 1008 policy, 1009 too big).
        code: u16,
        /// Human-readable reason (≤ 123 bytes).
        reason: String,
    },
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
    /// Uplink pipeline counters (folded in when the pipeline is released).
    pub audio: AudioInCounters,
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
        let (a, b) = (&mut self.audio, &o.audio);
        a.decoded += b.decoded;
        a.garbage += b.garbage;
        a.jobs += b.jobs;
        a.stale_results += b.stale_results;
        a.vad_errors += b.vad_errors;
        a.utterances += b.utterances;
    }
}

/// How long an uplink pipeline stays allocated without audio.
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
    started: Instant,
    last_activity: Instant,
    last_voice: Instant,
    drain_deadline: Option<Instant>,
    /// VAD heard speech start and the utterance has not ended yet: the user is mid-sentence.
    speech_open: bool,
    close_cause: Option<CloseCause>,
    /// Counters of what this session saw.
    pub counters: SessionCounters,
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
        let dialogue = Dialogue::new(settings.dialogue.clone(), id.clone());
        Session {
            id,
            identity,
            key,
            state: SessionState::AwaitingHello,
            protocol,
            transport: Transport::Websocket,
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
            started: now,
            last_activity: now,
            last_voice: now,
            drain_deadline: None,
            speech_open: false,
            close_cause: None,
            counters: SessionCounters::default(),
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

    /// Work the dialogue asked for (jobs, remote calls), to be carried out by the caller.
    pub fn take_requests(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.requests)
    }

    /// Latency samples recorded since the last call.
    pub fn take_samples(&mut self) -> Vec<(Stage, u64)> {
        std::mem::take(&mut self.samples)
    }

    /// Moves what the dialogue produced into the session's outputs, framing audio.
    fn absorb(&mut self, d: Output, out: &mut Vec<Outgoing>) {
        for item in d.items {
            match item {
                OutItem::Text(t) => out.push(Outgoing::Text(t)),
                OutItem::Audio(packet) => {
                    let ts = self.started.elapsed().as_millis() as u32;
                    let mut framed = Vec::with_capacity(packet.len() + 16);
                    if self.protocol.encode_into(&packet, ts, &mut framed).is_ok() {
                        out.push(Outgoing::Binary(framed));
                    }
                }
            }
        }
        self.requests.extend(d.requests);
        self.samples.extend(d.samples);
    }

    /// A recognition result for turn `turn`.
    pub fn on_asr_result(
        &mut self,
        turn: u32,
        result: Result<String, String>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let mut d = Output::default();
        self.dialogue.on_asr(turn, result, now, &mut d);
        self.absorb(d, out);
    }

    /// LLM text for turn `turn`; `done` carries the end of the stream.
    pub fn on_llm(
        &mut self,
        turn: u32,
        text: &str,
        done: Option<Result<(), String>>,
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
        self.absorb(d, out);
    }

    /// A synthesis result for segment `seq` of turn `turn`.
    pub fn on_tts_result(
        &mut self,
        turn: u32,
        seq: u32,
        result: Result<(Vec<i16>, u32), String>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let mut d = Output::default();
        self.dialogue.on_tts(turn, seq, result, now, &mut d);
        self.absorb(d, out);
    }

    /// Dialogue counters.
    pub fn dialogue_counters(&self) -> dialogue::DialogueCounters {
        self.dialogue.counters
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

    /// Handles a text frame.
    pub fn on_text(&mut self, text: &str, now: Instant, out: &mut Vec<Outgoing>) {
        if self.state == SessionState::Closing {
            return;
        }
        let msg = match parse_client_message(text) {
            Ok(m) => m,
            Err(e) => {
                self.counters.malformed += 1;
                let message = e.to_string();
                tracing::debug!(session = %self.id, error = %message, "malformed message");
                self.send(out, ServerMessage::Error { message: &message });
                return;
            }
        };
        match msg {
            ClientMessage::Hello(hello) => {
                self.last_activity = now;
                if self.identity.protocol_version.is_none() {
                    if let Some(p) = hello
                        .version
                        .and_then(|v| BinaryProtocol::from_version(v).ok())
                    {
                        self.protocol = p;
                    }
                }
                if hello.transport.as_deref() == Some("udp") {
                    self.transport = Transport::Udp;
                }
                if let Some(params) = hello.audio_params {
                    self.uplink = params;
                }
                self.mcp = hello.features.mcp;
                if self.state == SessionState::AwaitingHello {
                    self.state = SessionState::Idle;
                    self.samples.push((
                        Stage::ConnectToHello,
                        now.saturating_duration_since(self.started).as_micros() as u64,
                    ));
                }
                self.send(
                    out,
                    ServerMessage::Hello {
                        version: self.protocol.version(),
                        transport: self.transport,
                        audio_params: &self.downlink,
                        udp: None,
                    },
                );
            }
            _ if self.state == SessionState::AwaitingHello => {
                let message = "send hello first";
                self.send(out, ServerMessage::Error { message });
            }
            ClientMessage::Listen(listen) => {
                self.last_activity = now;
                if let Some(mode) = listen.mode {
                    self.mode = mode;
                }
                match listen.state {
                    ListenState::Start => {
                        self.state = SessionState::Listening;
                        self.start_turn(now, out);
                    }
                    ListenState::Stop => {
                        if self.state == SessionState::Listening {
                            self.state = SessionState::Idle;
                        }
                        if let Some(audio) = self.audio.as_mut() {
                            let mut events = Vec::new();
                            audio.stop(&mut events);
                            self.apply_events(events, now, out);
                        }
                    }
                    ListenState::Detect => {
                        // The wake word (or a client's typed text): counts as voice; the
                        // wake-word audio sent before it is not an utterance; the text is
                        // answered like a spoken turn.
                        self.last_voice = now;
                        self.speech_open = false;
                        if let Some(audio) = self.audio.as_mut() {
                            audio.new_turn(segmenter_mode(self.mode));
                        }
                        if let Some(text) = listen.text.as_deref().filter(|t| !t.trim().is_empty())
                        {
                            let mut d = Output::default();
                            self.dialogue.on_text_turn(text, now, &mut d);
                            self.absorb(d, out);
                        }
                    }
                }
            }
            ClientMessage::Abort { .. } => {
                self.last_activity = now;
                self.speech_open = false;
                if let Some(audio) = self.audio.as_mut() {
                    audio.new_turn(segmenter_mode(self.mode));
                }
                let was_speaking = self.dialogue.speaking();
                let mut d = Output::default();
                self.dialogue.abort(now, &mut d);
                self.absorb(d, out);
                if !was_speaking {
                    // The reference always answers abort with an immediate tts stop.
                    self.send(out, ServerMessage::TtsStop);
                }
            }
            ClientMessage::Ping => {
                self.last_activity = now;
                if self.settings.answer_ping {
                    let ts = crate::clock::local_timestamp();
                    self.send(out, ServerMessage::Pong { timestamp: &ts });
                }
            }
            ClientMessage::Goodbye => {
                self.close(out, CloseCause::DeviceGoodbye, 1000, "goodbye");
            }
            ClientMessage::Mcp { .. } | ClientMessage::Iot(_) => {
                // Device tools arrive with the tools issue; accepted and ignored for now.
                self.last_activity = now;
            }
            ClientMessage::Server { action, .. } => {
                self.send(
                    out,
                    ServerMessage::AdminReply {
                        status: "error",
                        message: "admin commands are not accepted on device connections",
                        action: &action,
                    },
                );
            }
            ClientMessage::Unknown { kind } => {
                self.counters.unknown += 1;
                tracing::info!(session = %self.id, kind = %kind, "unknown message type ignored");
            }
        }
    }

    /// Handles a binary frame; returns the Opus payload when it is audio to process.
    pub fn on_binary<'f>(&mut self, frame: &'f [u8], now: Instant) -> Option<&'f [u8]> {
        match self.state {
            SessionState::Closing => return None,
            SessionState::AwaitingHello => {
                self.counters.early_frames += 1;
                return None;
            }
            _ => {}
        }
        match self.protocol.decode(frame) {
            Ok(audio) => {
                self.counters.audio_frames += 1;
                self.last_activity = now;
                Some(audio.payload)
            }
            Err(e) => {
                self.counters.bad_frames += 1;
                tracing::debug!(session = %self.id, error = %e, "bad binary frame dropped");
                None
            }
        }
    }

    /// Tells the session whether its inference worker is over the busy watermark (checked at
    /// `listen start` to refuse new turns while overloaded).
    pub fn set_inference_busy(&mut self, busy: bool) {
        self.inference_busy = busy;
    }

    fn start_turn(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        self.turn_refused = false;
        self.last_audio = now;
        if self.inference_busy {
            // Admission: keep admitted sessions on time by refusing new turns while overloaded.
            self.turn_refused = true;
            self.counters.turns_refused += 1;
            self.send(
                out,
                ServerMessage::Alert {
                    status: "busy",
                    message: "The server is busy; please try again in a moment.",
                    emotion: "sad",
                },
            );
            self.speech_open = false;
            if let Some(audio) = self.audio.as_mut() {
                audio.new_turn(segmenter_mode(self.mode));
            }
            return;
        }
        self.speech_open = false;
        let mode = segmenter_mode(self.mode);
        match self.audio.as_mut() {
            Some(audio) => audio.new_turn(mode),
            None => {
                self.audio = Some(Box::new(AudioIn::new(
                    self.settings.segmenter.clone(),
                    mode,
                    self.settings.limits.clone(),
                )))
            }
        }
    }

    /// Handles the Opus payload of an audio frame: decode, queue for VAD.
    pub fn on_audio(&mut self, payload: &[u8], now: Instant, out: &mut Vec<Outgoing>) {
        if matches!(
            self.state,
            SessionState::AwaitingHello | SessionState::Closing
        ) {
            return;
        }
        if self.turn_refused {
            self.counters.shed_frames += 1;
            return;
        }
        self.last_audio = now;
        if self.audio.is_none() {
            // Audio without `listen start` (some clients): treat as a turn in the current mode.
            self.start_turn(now, out);
            if self.turn_refused {
                self.counters.shed_frames += 1;
                return;
            }
        }
        let Some(audio) = self.audio.as_mut() else {
            return;
        };
        match audio.on_packet(payload, now) {
            Ok(PacketOutcome::Queued) | Ok(PacketOutcome::Garbage) => {}
            Ok(PacketOutcome::Overloaded) => {
                // Shed this turn: its audio waited too long for VAD.
                self.speech_open = false;
                audio.new_turn(segmenter_mode(self.mode));
                self.turn_refused = true;
                self.counters.turns_shed += 1;
                self.send(
                    out,
                    ServerMessage::Alert {
                        status: "busy",
                        message: "The server is overloaded; please say that again.",
                        emotion: "sad",
                    },
                );
            }
            Err(e) => {
                tracing::warn!(session = %self.id, error = %e, "uplink decoder unavailable");
            }
        }
    }

    /// The next VAD job to submit, if one is ready (none in flight, audio waiting).
    pub fn take_vad_job(&mut self, now: Instant) -> Option<VadJob> {
        if self.vad_retry_at.is_some_and(|t| now < t) {
            return None;
        }
        self.vad_retry_at = None;
        let key = self.key;
        self.audio.as_mut()?.take_job(key, now)
    }

    /// The inference queue refused `job`: keep it and retry shortly.
    pub fn vad_job_refused(&mut self, job: VadJob, now: Instant) {
        self.counters.vad_queue_full += 1;
        self.vad_retry_at = Some(now + VAD_RETRY);
        if let Some(audio) = self.audio.as_mut() {
            audio.job_refused(job);
        }
    }

    /// Applies a VAD result from an inference core.
    pub fn on_vad_result(&mut self, result: VadResult, now: Instant, out: &mut Vec<Outgoing>) {
        let Some(audio) = self.audio.as_mut() else {
            self.counters.audio.stale_results += 1;
            return;
        };
        let mut events = Vec::new();
        audio.on_result(result, &mut events);
        self.apply_events(events, now, out);
    }

    fn apply_events(&mut self, events: Vec<Event>, now: Instant, out: &mut Vec<Outgoing>) {
        for event in events {
            match event {
                Event::SpeechStart { audio_ms, .. } => {
                    self.last_voice = now;
                    self.speech_open = true;
                    if self.settings.vad_events {
                        self.send(
                            out,
                            ServerMessage::Vad {
                                state: "start",
                                start_ms: audio_ms,
                                end_ms: 0,
                                decided_ms: 0,
                            },
                        );
                    }
                }
                Event::Utterance(u) => {
                    self.last_voice = now;
                    self.speech_open = false;
                    if self.settings.vad_events {
                        self.send(
                            out,
                            ServerMessage::Vad {
                                state: "end",
                                start_ms: u.start_ms,
                                end_ms: u.end_ms,
                                decided_ms: u.decided_ms,
                            },
                        );
                    }
                    tracing::debug!(session = %self.id, start_ms = u.start_ms, end_ms = u.end_ms, "utterance");
                    let mut d = Output::default();
                    self.dialogue.on_utterance(u.pcm, now, &mut d);
                    self.absorb(d, out);
                }
                Event::Discarded { reason } => {
                    self.speech_open = false;
                    tracing::debug!(session = %self.id, ?reason, "speech discarded");
                }
            }
        }
    }

    /// Counters including the live uplink pipeline's.
    pub fn counters(&self) -> SessionCounters {
        let mut c = self.counters;
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
        }
        if let Some(retry) = self.vad_retry_at {
            d = d.min(retry);
        }
        if self.audio.is_some() {
            d = d.min(self.last_audio + AUDIO_IDLE_RELEASE);
        }
        if let Some(x) = self.dialogue.next_deadline() {
            d = d.min(x);
        }
        d
    }

    /// Checks timers at `now`.
    pub fn on_timer(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        if self.state == SessionState::Closing {
            return;
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
        let mut d = Output::default();
        self.dialogue.on_timer(now, &mut d);
        self.absorb(d, out);
        if self.dialogue.busy() {
            // An answer in progress counts as activity.
            self.last_activity = now;
        }
        let drained = self.drain_deadline.is_some() && !self.mid_interaction();
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
    fn mid_interaction(&self) -> bool {
        self.dialogue.busy() || (self.speech_open && self.audio.is_some())
    }

    /// The instance is draining: close now unless an interaction is under way.
    pub fn on_drain(&mut self, deadline: Instant, now: Instant, out: &mut Vec<Outgoing>) {
        self.drain_deadline = Some(deadline);
        match self.state() {
            SessionState::Closing => {}
            _ if self.mid_interaction() => {}
            _ => {
                let _ = now;
                self.goodbye(out, CloseCause::Drain, 1001, "server shutting down");
            }
        }
    }

    fn goodbye(&mut self, out: &mut Vec<Outgoing>, cause: CloseCause, code: u16, reason: &str) {
        self.send(out, ServerMessage::Goodbye);
        self.close(out, cause, code, reason);
    }
}

fn segmenter_mode(mode: ListenMode) -> Mode {
    match mode {
        ListenMode::Auto => Mode::Auto,
        ListenMode::Manual => Mode::Manual,
        ListenMode::Realtime => Mode::Realtime,
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    fn session(version: Option<u8>, now: Instant) -> Session {
        Session::new(
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
                    offline_llm: true,
                    system_prompt: String::new(),
                    history_messages: 10,
                    out_rate: 24_000,
                    complexity: 5,
                    prebuffer_frames: 5,
                    stop_guard: Duration::from_millis(100),
                    asr_timeout: Duration::from_secs(5),
                    tts_timeout: Duration::from_secs(5),
                    tz_offset_minutes: 0,
                    emotions: true,
                },
            },
            now,
        )
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
        assert!(s.on_binary(&[1, 2, 3, 4], now).is_none());
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
}
