//! Speaking a turn's answer: complete sentences go to synthesis one at a time (so the audio
//! stays in order and an abort wastes at most one synthesis), synthesised audio is resampled
//! to the downlink rate and queued in the session's
//! [`Playout`](crate::pipeline::audio_out::Playout), and what the play-out sends becomes
//! `sentence_start` messages and audio frames. Once the text is complete and every frame is
//! sent, the turn waits for the play-out end plus the guard (`Phase::Finishing`).

use std::time::Instant;

use super::turn::{Phase, Synthesis, Turn};
use super::{Dialogue, OutItem, Output, Request};
use crate::audio::resample::resample;
use crate::pipeline::audio_out::Played;
use crate::protocol::ServerMessage;

impl Dialogue {
    /// Synthesis of segment `seq` finished (an answer or a timeout): queue its audio
    /// (resampled to the downlink rate).
    pub(super) fn tts_done(
        &mut self,
        turn: u32,
        seq: u32,
        result: Result<(Vec<i16>, u32), String>,
        now: Instant,
        out: &mut Output,
    ) {
        let out_rate = self.settings.out_rate;
        let sid = self.session_id.clone();
        let Some(speech) = self
            .turn
            .as_mut()
            .filter(|t| t.id == turn)
            .and_then(Turn::speech_mut)
        else {
            return;
        };
        let Some(synthesis) = speech.in_flight.take_if(|s| s.seq == seq) else {
            return;
        };
        match result {
            Ok((pcm, rate)) if !pcm.is_empty() => {
                let pcm = if rate == out_rate {
                    pcm
                } else {
                    resample(&pcm, rate, out_rate)
                };
                self.playout.push_sentence(synthesis.text, pcm);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::info!(session = %sid, error = %e, "synthesis failed; segment skipped");
                self.counters.tts_failures += 1;
            }
        }
        self.request_tts(now, out);
        self.pump(now, out);
        self.maybe_finish(now);
    }

    /// Sends the next sentence to synthesis, if none of the turn's is in flight (one at a time
    /// keeps the audio in order and lets an abort waste at most one synthesis) and the
    /// session's synthesis quota has room (else it waits for an answer, see `jobs.rs`).
    pub(super) fn request_tts(&mut self, now: Instant, out: &mut Output) {
        let timeout = self.settings.tts_timeout;
        let Some(t) = self.turn.as_mut() else { return };
        let id = t.id;
        let Some(speech) = t.speech_mut() else { return };
        if speech.in_flight.is_some() {
            return;
        }
        while speech.segments.front().is_some_and(|s| s.trim().is_empty()) {
            speech.segments.pop_front();
        }
        if speech.segments.is_empty() {
            return;
        }
        if !self.tts_jobs.has_room(now) {
            if !speech.held {
                speech.held = true;
                self.counters.jobs_held += 1;
            }
            return;
        }
        let Some(text) = speech.segments.pop_front() else {
            return;
        };
        speech.held = false;
        let seq = speech.next_seq;
        speech.next_seq += 1;
        let deadline = now + timeout;
        speech.in_flight = Some(Synthesis {
            seq,
            deadline,
            text: text.clone(),
        });
        self.tts_jobs.start(id, seq, deadline);
        out.requests.push(Request::Tts {
            turn: id,
            seq,
            text,
        });
    }

    /// Sends every frame that is due at `now`.
    pub fn pump(&mut self, now: Instant, out: &mut Output) {
        if self.turn.is_none() {
            return;
        }
        let mut played = Vec::new();
        self.playout.pump(now, &mut played, &mut out.samples);
        for item in played {
            match item {
                Played::Sentence(text) => out.text(
                    &self.session_id,
                    ServerMessage::TtsSentenceStart { text: &text },
                ),
                Played::Frame(packet) => {
                    out.items.push(OutItem::Audio(packet));
                    self.counters.frames_sent += 1;
                }
            }
        }
    }

    /// Once the text is complete, every sentence synthesised and every frame sent, `tts stop`
    /// is due when the device has played it all (plus the guard).
    pub(super) fn maybe_finish(&mut self, now: Instant) {
        let Some(t) = self.turn.as_mut() else { return };
        let complete = matches!(&t.phase, Phase::Speaking { speech } if speech.drained())
            && self.playout.is_idle();
        if complete {
            t.phase = Phase::Finishing {
                stop_at: self.playout.stop_time(now),
            };
        }
    }
}
