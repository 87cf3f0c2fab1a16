//! The uplink side of a session: audio frames in, turns started, refused or shed, VAD jobs
//! out and their results turned into speech events and utterances for the dialogue.

use std::time::Instant;

use super::dialogue::Output;
use super::{Effects, Outgoing, Session, SessionState, VAD_RETRY};
use crate::pipeline::audio_in::{AudioIn, PacketOutcome};
use crate::pipeline::segmenter::{Event, Mode};
use crate::protocol::{BinaryProtocol, ListenMode, ServerMessage};
use crate::providers::vad::{VadJob, VadResult};

impl Session {
    /// A binary WebSocket frame: unframed with the negotiated binary protocol (v1/v2/v3), or
    /// the stock MQTT gateway's framing for a `?from=mqtt_gateway` connection, then handled as
    /// audio ([`Session::on_audio`]).
    pub fn on_binary(&mut self, frame: &[u8], now: Instant) -> Effects {
        if !self.accepts_audio() {
            return Effects::default();
        }
        let decoded = if self.identity.from_mqtt_gateway {
            BinaryProtocol::decode_gateway(frame)
        } else {
            self.protocol.decode(frame)
        };
        match decoded {
            Ok(audio) => self.on_audio(audio.payload, now),
            Err(e) => {
                self.counters.bad_frames += 1;
                tracing::debug!(session = %self.id, error = %e, "bad binary frame dropped");
                Effects::default()
            }
        }
    }

    /// One uplink Opus packet, already unframed by the transport: decoded and queued for VAD.
    pub fn on_audio(&mut self, payload: &[u8], now: Instant) -> Effects {
        if !self.accepts_audio() {
            return Effects::default();
        }
        self.counters.audio_frames += 1;
        self.last_activity = now;
        self.step(now, |s, out| s.handle_audio(payload, now, out))
    }

    /// Whether an audio frame is taken now (after hello, before the close); one that is not
    /// is counted as early when it came before hello.
    pub(super) fn accepts_audio(&mut self) -> bool {
        match self.state {
            SessionState::Closing => false,
            SessionState::AwaitingHello => {
                self.counters.early_frames += 1;
                false
            }
            _ => true,
        }
    }

    /// Tells the session whether its inference worker is over the busy watermark (checked at
    /// `listen start` to refuse new turns while overloaded).
    pub fn set_inference_busy(&mut self, busy: bool) {
        self.inference_busy = busy;
    }

    pub(super) fn start_turn(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
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

    pub(super) fn handle_audio(&mut self, payload: &[u8], now: Instant, out: &mut Vec<Outgoing>) {
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
    pub(super) fn take_vad_job(&mut self, now: Instant) -> Option<VadJob> {
        if self.vad_retry_at.is_some_and(|t| now < t) {
            return None;
        }
        self.vad_retry_at = None;
        let key = self.key;
        self.audio.as_mut()?.take_job(key, now)
    }

    /// The inference queue refused `job`: keep it and retry shortly (the retry time is part
    /// of [`Session::next_deadline`]).
    pub fn on_vad_refused(&mut self, job: VadJob, now: Instant) -> Effects {
        self.counters.vad_queue_full += 1;
        self.vad_retry_at = Some(now + VAD_RETRY);
        if let Some(audio) = self.audio.as_mut() {
            audio.job_refused(job);
        }
        Effects::default()
    }

    pub(super) fn handle_vad_result(
        &mut self,
        result: VadResult,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let Some(audio) = self.audio.as_mut() else {
            self.counters.audio.stale_results += 1;
            return;
        };
        let mut events = Vec::new();
        audio.on_result(result, &mut events);
        self.apply_events(events, now, out);
    }

    pub(super) fn apply_events(
        &mut self,
        events: Vec<Event>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
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
}

/// The segmenter mode for a listening mode.
pub(super) fn segmenter_mode(mode: ListenMode) -> Mode {
    match mode {
        ListenMode::Auto => Mode::Auto,
        ListenMode::Manual => Mode::Manual,
        ListenMode::Realtime => Mode::Realtime,
    }
}
