//! A device session: the state machine, with no I/O.
//!
//! The connection loop ([`connection`]) feeds it what arrives (text, binary, timer expiries,
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

pub mod connection;
pub mod dialogue;

use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::metrics::Stage;
use crate::pipeline::audio_in::{AudioIn, AudioInCounters, AudioInLimits, PacketOutcome};
use crate::pipeline::segmenter::{Event, Mode, SegmenterConfig};
use crate::protocol::{
    parse_client_message, AudioParams, BinaryProtocol, ClientMessage, DeviceIdentity, ListenMode,
    ListenState, ServerMessage, Transport,
};
use crate::providers::llm::ToolCall;
use crate::providers::vad::{VadJob, VadResult};
use crate::tools::iot::IotThings;
use crate::tools::mcp::{McpClient, McpCounters, McpEvent, McpSettings};
use crate::tools::server::{ServerTools, ToolContext};
use crate::tools::{intents, truncate_utf8, ToolSet, ToolTarget};
use dialogue::{Dialogue, DialogueSettings, OutItem, Output, Request, ToolInvocation};

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
    /// Device and server tools.
    pub tools: ToolSettings,
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
    mcp_client: Option<Box<McpClient>>,
    iot: IotThings,
    toolset: Rc<ToolSet>,
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
        let mut dialogue = Dialogue::new(settings.dialogue.clone(), id.clone());
        let toolset = settings.tools.base.clone();
        dialogue.set_tools(toolset.openai_tools().cloned(), toolset.volume_tools());
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
            mcp_client: None,
            iot: IotThings::default(),
            toolset,
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

    /// Moves what the dialogue produced into the session's outputs, framing audio, and
    /// carries out the tool calls it asked for.
    fn absorb(&mut self, d: Output, now: Instant, out: &mut Vec<Outgoing>) {
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
        for call in d.calls {
            self.dispatch_call(call, now, out);
        }
        // Calls of an aborted or replaced turn are forgotten: a late answer is ignored.
        let turn = self.dialogue.current_turn();
        if let Some(c) = self.mcp_client.as_mut() {
            c.cancel_calls_except(turn);
        }
    }

    /// Carries out one tool call: a device call goes out as `tools/call` (its answer comes
    /// later), the others answer at once.
    fn dispatch_call(&mut self, call: ToolInvocation, now: Instant, out: &mut Vec<Outgoing>) {
        let ToolInvocation {
            turn,
            call_id,
            name,
            arguments,
        } = call;
        let args = match arguments.trim() {
            "" => Ok(json!({})),
            text => match serde_json::from_str::<Value>(text) {
                Ok(v @ Value::Object(_)) => Ok(v),
                _ => Err(format!("arguments of {name} are not a JSON object")),
            },
        };
        let result = match (args, self.toolset.resolve(&name).cloned()) {
            (Err(e), _) => Err(e),
            (_, None) => Err(format!("there is no tool named {name}")),
            (Ok(args), Some(ToolTarget::Device(device_name))) => match self.mcp_client.as_mut() {
                Some(c) => match c.call(&device_name, args, turn, &call_id, now) {
                    Ok(payload) => {
                        tracing::debug!(session = %self.id, tool = %device_name, "device tool call");
                        self.send(out, ServerMessage::Mcp { payload: &payload });
                        return;
                    }
                    Err(e) => Err(e),
                },
                None => Err("the device has no MCP tools".to_string()),
            },
            (Ok(args), Some(ToolTarget::IotMethod { thing, method })) => {
                let commands = IotThings::command(&thing, &method, &args);
                self.send(
                    out,
                    ServerMessage::Iot {
                        commands: &commands,
                    },
                );
                Ok(format!("{thing}.{method} sent to the device"))
            }
            (Ok(_), Some(ToolTarget::IotState { thing })) => self.iot.state_text(&thing),
            (Ok(args), Some(ToolTarget::Server(i))) => match self.settings.tools.server.get(i) {
                Some(tool) => {
                    let result = tool.call(
                        &args,
                        &ToolContext {
                            now_unix: crate::clock::unix_now(),
                            tz_offset_minutes: self.settings.dialogue.tz_offset_minutes,
                            device_id: &self.identity.device_id,
                            user_text: self.dialogue.user_text(),
                        },
                    );
                    if result.is_ok() && tool.ends_session() {
                        // As after an exit phrase: goodbye and close once this turn is spoken.
                        self.dialogue.close_after_turn(turn);
                    }
                    result
                }
                None => Err(format!("there is no tool named {name}")),
            },
        };
        self.on_tool_done(turn, &call_id, result, now, out);
    }

    fn on_tool_done(
        &mut self,
        turn: u32,
        call_id: &str,
        result: Result<String, String>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let mut d = Output::default();
        self.dialogue
            .on_tool_result(turn, call_id, result, now, &mut d);
        self.absorb(d, now, out);
    }

    fn on_mcp_events(&mut self, events: Vec<McpEvent>, now: Instant, out: &mut Vec<Outgoing>) {
        for event in events {
            match event {
                McpEvent::ToolsReady => self.rebuild_tools(),
                McpEvent::CallDone {
                    turn,
                    call_id,
                    result,
                } => self.on_tool_done(turn, &call_id, result, now, out),
            }
        }
    }

    /// Offers the current device, IoT and server tools to the dialogue.
    fn rebuild_tools(&mut self) {
        let device = self.mcp_client.as_ref().map_or(&[][..], |c| c.tools());
        self.toolset = Rc::new(ToolSet::build(
            &self.settings.tools.server,
            device,
            &self.iot,
            self.settings.tools.max_tools,
        ));
        let toolset = &self.toolset;
        self.dialogue
            .set_tools(toolset.openai_tools().cloned(), toolset.volume_tools());
        tracing::debug!(session = %self.id, tools = toolset.len(), "tools offered");
    }

    /// Requests of device tools awaiting an answer.
    pub fn pending_tool_requests(&self) -> usize {
        self.mcp_client.as_ref().map_or(0, |c| c.pending())
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
        self.absorb(d, now, out);
    }

    /// LLM text for turn `turn`; `done` carries the end of the stream (with its tool calls).
    pub fn on_llm(
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
        self.absorb(d, now, out);
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
                let start_mcp = self.mcp && self.mcp_client.is_none();
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
                if let Some(settings) = self.settings.tools.mcp.clone().filter(|_| start_mcp) {
                    let mut client = Box::new(McpClient::new(settings, self.id.clone()));
                    if let Some(init) = client.start(now) {
                        self.send(out, ServerMessage::Mcp { payload: &init });
                    }
                    self.mcp_client = Some(client);
                }
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
                            if self.settings.dialogue.intents.is_wake_word(text) {
                                let t = &self.settings.tools;
                                let greeting = if intents::is_chinese(text) {
                                    &t.wake_greeting_zh
                                } else {
                                    &t.wake_greeting
                                };
                                if !greeting.trim().is_empty() {
                                    let greeting = greeting.clone();
                                    self.dialogue.speak(&greeting, now, &mut d);
                                }
                            } else {
                                self.dialogue.on_text_turn(text, now, &mut d);
                            }
                            self.absorb(d, now, out);
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
                self.absorb(d, now, out);
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
            ClientMessage::Mcp { payload } => {
                self.last_activity = now;
                let Some(client) = self.mcp_client.as_mut() else {
                    self.counters.mcp.ignored += 1;
                    tracing::info!(session = %self.id, "mcp message without an MCP session ignored");
                    return;
                };
                let (mut sends, mut events) = (Vec::new(), Vec::new());
                client.on_message(&payload, now, &mut sends, &mut events);
                for payload in &sends {
                    self.send(out, ServerMessage::Mcp { payload });
                }
                self.on_mcp_events(events, now, out);
            }
            ClientMessage::Iot(iot) => {
                self.last_activity = now;
                if !self.settings.tools.iot {
                    return;
                }
                let mut changed = false;
                if let Some(d) = &iot.descriptors {
                    changed = self.iot.on_descriptors(d);
                }
                if let Some(states) = &iot.states {
                    self.iot.on_states(states);
                }
                if changed {
                    self.rebuild_tools();
                }
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
                    self.absorb(d, now, out);
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
        if let Some(x) = self.mcp_client.as_ref().and_then(|c| c.next_deadline()) {
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
        if let Some(c) = self.mcp_client.as_mut() {
            let mut events = Vec::new();
            c.on_timer(now, &mut events);
            self.on_mcp_events(events, now, out);
        }
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
        let server_tools = Rc::new(ServerTools::from_names(&["get_time".into()]).unwrap());
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
                    max_tool_rounds: 2,
                    max_calls_per_round: 2,
                    max_tool_result_bytes: 64,
                    intents: crate::tools::intents::Intents::new(
                        &["goodbye".into()],
                        &["hi xiaozhi".into()],
                    ),
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
                    wake_greeting: "Hi!".into(),
                    wake_greeting_zh: "你好".into(),
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
    fn session_with_device_tools(offline: bool, now: Instant) -> Session {
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
    fn spoken(s: &mut Session, now: Instant, out: &mut Vec<Outgoing>) -> Vec<String> {
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
                Outgoing::Binary(_) => "audio".into(),
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
