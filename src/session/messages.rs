//! The device's JSON control messages (`hello`, `listen`, `abort`, `ping`, `goodbye`, `mcp`,
//! `iot`, …) and what each does to the session.

use std::time::Instant;

use super::dialogue::Output;
use super::repeated::{Repeated, Shown};
use super::{segmenter_mode, CloseCause, HeldTurn, Outgoing, Session, SessionState};
use crate::metrics::Stage;
use crate::protocol::{
    parse_client_message, BinaryProtocol, ClientMessage, ListenState, ServerMessage, Transport,
};
use crate::tools::intents;
use crate::tools::mcp::McpClient;

impl Session {
    /// Handles a text frame (one JSON control message).
    pub(super) fn handle_text(&mut self, text: &str, now: Instant, out: &mut Vec<Outgoing>) {
        if self.state == SessionState::Closing {
            return;
        }
        let msg = match parse_client_message(text) {
            Ok(m) => m,
            Err(e) => {
                self.counters.malformed += 1;
                let message = e.to_string();
                if self.device_line(now) {
                    let mut error = message.clone();
                    crate::tools::truncate_utf8(&mut error, 200);
                    tracing::info!(session = %self.id, error = ?error, "malformed message");
                }
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
                        udp: self
                            .udp
                            .as_ref()
                            .filter(|_| self.transport == Transport::Udp),
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
                        self.listen_started = Some(now);
                        self.state = SessionState::Listening;
                        self.start_turn(now, out);
                    }
                    ListenState::Stop => {
                        self.listen_started = None;
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
                        self.listen_started = Some(now);
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
                            } else if self.discovering_tools() {
                                self.held = Some((HeldTurn::Text(text.to_string()), now));
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
                self.held = None;
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
                    let shown = self.repeated.note(Repeated::StrayMcp);
                    if shown.logged() && self.device_line(now) {
                        let last = shown == Shown::Last;
                        tracing::info!(session = %self.id, last, "mcp message without an MCP session ignored");
                    }
                    return;
                };
                let (mut sends, mut events) = (Vec::new(), Vec::new());
                client.on_message(&payload, now, &mut sends, &mut events);
                for payload in &sends {
                    self.send(out, ServerMessage::Mcp { payload });
                }
                self.on_mcp_events(events, now, out);
                self.release_held(now, out);
            }
            ClientMessage::Iot(iot) => {
                self.last_activity = now;
                if !self.settings.tools.iot {
                    return;
                }
                let mut changed = false;
                if let Some(d) = &iot.descriptors {
                    changed = self.iot.on_descriptors(d);
                    // Device-caused: one line per descriptor message at most, under the
                    // session's log rate (the details are at debug level).
                    if !changed && self.device_line(now) {
                        tracing::info!(session = %self.id, "iot descriptors without a usable thing ignored");
                    }
                }
                if let Some(states) = &iot.states {
                    self.counters.iot_states_refused += self.iot.on_states(states);
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
                // The type is the device's text: logged escaped (Debug) and cut, never verbatim
                // (a 12 MB type would be a 12 MB log line; a newline would forge one).
                let shown = self.repeated.note(Repeated::UnknownType);
                if shown.logged() && self.device_line(now) {
                    let mut kind = kind.clone();
                    crate::tools::truncate_utf8(&mut kind, 64);
                    // `last`: further ones are counted, and summed up when the session ends.
                    let last = shown == Shown::Last;
                    tracing::info!(session = %self.id, kind = ?kind, last, "unknown message type ignored");
                }
            }
        }
    }
}
