//! The reply half of a session, with no I/O: utterance → recognition → answer → sentences →
//! synthesis → paced Opus frames → `tts stop`, plus barge-in, timeouts and apologies.
//!
//! [`Dialogue`] decides; the connection loop carries out the [`Request`]s it emits (a job for
//! an inference core, or a remote call on the shard) and feeds results back tagged with the
//! turn id, so a result of an aborted turn is recognised and dropped.
//!
//! A turn goes through phases (`turn.rs`): recognizing → answering (text still coming, complete
//! sentences already synthesised) → speaking (text complete, the rest synthesised and played)
//! → finishing (`tts stop` due); each phase holds only the state it needs.
//!
//! Tools (`tools.rs`): an LLM round that ends with tool calls asks for them
//! ([`Output::calls`]); when every result is in (see [`Dialogue::on_tool_result`]) the model is
//! asked again with the results, at most `max_tool_rounds` times per turn (the last request
//! goes without tools). Text spoken before a call stays spoken. Exit phrases and the offline
//! responder's device commands are decided here too (see `crate::tools::intents`).
//!
//! Jobs (`jobs.rs`): the session keeps at most a small quota of recognition and synthesis jobs
//! outstanding across its turns; what does not fit waits in the session. A turn that ends
//! with jobs outstanding (abort, new turn, timeout) asks for them to be cancelled
//! ([`Request::CancelJobs`]); their "cancelled" answers free the quota.
//!
//! Speech (`speech.rs`): sentences are synthesised one at a time and queued for play-out. The
//! play-out itself — the pre-buffer, real-time pacing by audio time, Opus encoding and when
//! `tts stop` is due — is [`crate::pipeline::audio_out::Playout`]'s; the dialogue feeds it
//! synthesised sentences and turns what it plays into messages.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::metrics::Stage;
use crate::pipeline::audio_out::{Playout, PlayoutSettings};
use crate::pipeline::sentences::emotion_of;
use crate::protocol::ServerMessage;
use crate::providers::llm::offline::OfflineResponder;
use crate::providers::llm::openai::ChatMessage;
use crate::providers::llm::ToolCall;
use crate::tools::intents::{self, Intents};

mod jobs;
mod speech;
#[cfg(test)]
pub(crate) mod tests;
mod tools;
mod turn;

use jobs::Outstanding;
pub use jobs::JOBS_PER_KIND;
use turn::{Phase, Turn};

/// What the dialogue needs from config.
#[derive(Debug, Clone)]
pub struct DialogueSettings {
    /// Answer with the built-in offline responder (no LLM configured).
    pub offline_llm: bool,
    /// System prompt for the LLM.
    pub system_prompt: String,
    /// Most history messages kept.
    pub history_messages: usize,
    /// Most bytes of history text kept (oldest messages dropped first).
    pub history_max_bytes: usize,
    /// Downlink sample rate.
    pub out_rate: u32,
    /// Opus complexity.
    pub complexity: i32,
    /// Frames the device may hold ahead.
    pub prebuffer_frames: u32,
    /// Wait after play-out before `tts stop`.
    pub stop_guard: Duration,
    /// Recognition timeout.
    pub asr_timeout: Duration,
    /// Synthesis timeout per segment.
    pub tts_timeout: Duration,
    /// Longest text of one synthesis job (see `crate::pipeline::sentences`).
    pub max_segment_chars: usize,
    /// Minutes east of UTC (offline responder's clock).
    pub tz_offset_minutes: i64,
    /// Send `llm` emotion messages.
    pub emotions: bool,
    /// Most LLM rounds with tool calls per turn (the round after the last gets no tools).
    pub max_tool_rounds: u32,
    /// Most tool calls carried out per round (further calls are answered with an error).
    pub max_calls_per_round: usize,
    /// Longest tool result fed back to the LLM, bytes.
    pub max_tool_result_bytes: usize,
    /// Exit phrases and wake words.
    pub intents: Intents,
    /// Apologies and replies with no user text to go by are in Chinese (`language = "zh"`);
    /// otherwise every reply follows the language of what the user said.
    pub prefer_chinese: bool,
}

/// Work the connection loop must start for the dialogue.
#[derive(Debug)]
pub enum Request {
    /// Recognise 16 kHz PCM.
    Asr {
        /// Turn id.
        turn: u32,
        /// Audio.
        pcm: Vec<i16>,
    },
    /// Stream an answer for these messages.
    Llm {
        /// Turn id.
        turn: u32,
        /// System prompt, history and the user's message (and tool rounds so far).
        messages: Vec<ChatMessage>,
        /// The Chat Completions `tools` array, when tools are offered.
        tools: Option<Rc<serde_json::Value>>,
    },
    /// Stop the running LLM stream (abort).
    CancelLlm,
    /// Drop this session's recognition and synthesis jobs of turns up to `up_to_turn` that
    /// have not run yet; each is answered with a "cancelled" error.
    CancelJobs {
        /// The last turn whose jobs are cancelled.
        up_to_turn: u32,
    },
    /// Synthesise one segment.
    Tts {
        /// Turn id.
        turn: u32,
        /// Segment number within the turn.
        seq: u32,
        /// Text.
        text: String,
    },
}

/// What the dialogue produced for the device or the shard.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages for the device, in send order.
    pub items: Vec<OutItem>,
    /// Work to start.
    pub requests: Vec<Request>,
    /// Latency samples (stage, µs).
    pub samples: Vec<(Stage, u64)>,
    /// Tool calls to carry out; each result comes back through [`Dialogue::on_tool_result`].
    pub calls: Vec<ToolInvocation>,
}

/// A tool call the dialogue wants made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolInvocation {
    /// Turn that makes it.
    pub turn: u32,
    /// Id of the call (the LLM's, or one of ours for the offline responder).
    pub call_id: String,
    /// Tool name: as offered to the LLM, or a device tool's own name.
    pub name: String,
    /// Arguments (JSON text as the model wrote it).
    pub arguments: String,
}

/// One message for the device, in send order.
#[derive(Debug, PartialEq)]
pub enum OutItem {
    /// A JSON text message.
    Text(String),
    /// One Opus packet (framing added by the session).
    Audio(Vec<u8>),
}

impl Output {
    fn text(&mut self, session_id: &str, msg: ServerMessage<'_>) {
        self.items.push(OutItem::Text(msg.to_json(session_id)));
    }
}
/// Counters of the dialogue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DialogueCounters {
    /// Turns answered to the end (`tts stop` after the audio).
    pub turns_completed: u64,
    /// Turns aborted (barge-in or `abort`).
    pub turns_aborted: u64,
    /// Recognitions that failed or timed out.
    pub asr_failures: u64,
    /// LLM streams that failed.
    pub llm_failures: u64,
    /// Segments whose synthesis failed or timed out (skipped).
    pub tts_failures: u64,
    /// Utterances recognised as empty (nothing said back).
    pub empty_transcripts: u64,
    /// Opus frames sent.
    pub frames_sent: u64,
    /// Tool calls requested (by the LLM or the offline responder).
    pub tool_calls: u64,
    /// Jobs that waited in the session because its quota of outstanding jobs was in use.
    pub jobs_held: u64,
    /// Sentences not spoken because the turn's segment queue was full.
    pub segments_dropped: u64,
}

/// The reply state of one session.
pub struct Dialogue {
    settings: DialogueSettings,
    session_id: String,
    history: VecDeque<ChatMessage>,
    next_turn: u32,
    turn: Option<Turn>,
    /// The downlink: queued audio, encoder and play-out clock (kept across turns).
    playout: Playout,
    offline: OfflineResponder,
    /// The `tools` array offered to the LLM, if any.
    tools: Option<Rc<serde_json::Value>>,
    /// The tools the offline responder's volume commands use.
    volume_tools: intents::VolumeTools,
    next_call: u64,
    close_requested: bool,
    /// Recognition jobs outstanding (see `jobs.rs`).
    asr_jobs: Outstanding,
    /// Synthesis jobs outstanding.
    tts_jobs: Outstanding,
    /// Counters.
    pub counters: DialogueCounters,
}

impl Dialogue {
    /// A dialogue for one session.
    pub fn new(settings: DialogueSettings, session_id: String) -> Dialogue {
        let playout = Playout::new(PlayoutSettings {
            rate: settings.out_rate,
            complexity: settings.complexity,
            prebuffer_frames: settings.prebuffer_frames,
            stop_guard: settings.stop_guard,
        });
        let offline = OfflineResponder::new(settings.prefer_chinese);
        Dialogue {
            settings,
            session_id,
            history: VecDeque::new(),
            next_turn: 1,
            turn: None,
            playout,
            offline,
            tools: None,
            volume_tools: intents::VolumeTools::default(),
            next_call: 1,
            close_requested: false,
            asr_jobs: Outstanding::default(),
            tts_jobs: Outstanding::default(),
            counters: DialogueCounters::default(),
        }
    }

    /// True between `tts start` and `tts stop`.
    pub fn speaking(&self) -> bool {
        self.turn.as_ref().is_some_and(Turn::speaking)
    }

    /// Sets the tools offered to the LLM and the ones the offline responder's volume commands
    /// use.
    pub fn set_tools(
        &mut self,
        tools: Option<Rc<serde_json::Value>>,
        volume_tools: intents::VolumeTools,
    ) {
        self.tools = tools;
        self.volume_tools = volume_tools;
    }

    /// True once (then false) after a turn that ends the session has finished speaking.
    pub fn take_close_request(&mut self) -> bool {
        std::mem::take(&mut self.close_requested)
    }

    /// Says `text` as a turn of its own (wake-word greeting): no `stt`, not in the history.
    pub fn speak(&mut self, text: &str, now: Instant, out: &mut Output) {
        let id = self.begin_turn(now, None, out);
        out.text(&self.session_id, ServerMessage::TtsStart);
        if let Some(t) = self.turn.as_mut() {
            t.start_answer(self.settings.max_segment_chars);
        }
        self.on_llm_text(id, text, now, out);
        self.on_llm_done(id, Ok(Vec::new()), now, out);
    }

    /// True while a turn is being recognised or answered.
    pub fn busy(&self) -> bool {
        self.turn.is_some()
    }

    /// A complete utterance arrived: start recognising it (aborting an answer in progress). The
    /// job waits in the turn while the session's recognition quota is in use.
    pub fn on_utterance(&mut self, pcm: Vec<i16>, now: Instant, out: &mut Output) {
        self.begin_turn(now, Some(now + self.settings.asr_timeout), out);
        if let Some(Phase::Recognizing { waiting, .. }) = self.turn.as_mut().map(|t| &mut t.phase) {
            *waiting = Some(pcm);
        }
        self.submit_waiting(now, out);
        let held = matches!(
            self.turn.as_ref().map(|t| &t.phase),
            Some(Phase::Recognizing {
                waiting: Some(_),
                ..
            })
        );
        if held {
            self.counters.jobs_held += 1;
        }
    }

    /// Sends what waits for the quota: the utterance to recognise, the next sentence.
    fn submit_waiting(&mut self, now: Instant, out: &mut Output) {
        let timeout = self.settings.asr_timeout;
        if let Some(t) = self.turn.as_mut() {
            if let Phase::Recognizing {
                asr_deadline,
                waiting,
            } = &mut t.phase
            {
                if waiting.is_some() && self.asr_jobs.has_room(now) {
                    if let Some(pcm) = waiting.take() {
                        let expires = asr_deadline.unwrap_or(now + timeout);
                        self.asr_jobs.start(t.id, 0, expires);
                        out.requests.push(Request::Asr { turn: t.id, pcm });
                    }
                }
            }
        }
        self.request_tts(now, out);
    }

    /// A recognition job's answer (its result, a refusal or a cancellation): frees its quota
    /// slot, then is handled like any recognition result.
    pub fn on_asr(
        &mut self,
        turn: u32,
        result: Result<String, String>,
        now: Instant,
        out: &mut Output,
    ) {
        self.asr_jobs.finish(turn, 0);
        self.asr_done(turn, result, now, out);
        self.submit_waiting(now, out);
    }

    /// A synthesis job's answer (its audio, a refusal or a cancellation): frees its quota slot,
    /// then is handled like any synthesis result.
    pub fn on_tts(
        &mut self,
        turn: u32,
        seq: u32,
        result: Result<(Vec<i16>, u32), String>,
        now: Instant,
        out: &mut Output,
    ) {
        self.tts_jobs.finish(turn, seq);
        self.tts_done(turn, seq, result, now, out);
        self.submit_waiting(now, out);
    }

    /// Turn `id` is over: jobs still outstanding are for nothing, so ask for them to be dropped.
    fn cancel_jobs(&mut self, id: u32, out: &mut Output) {
        if self.asr_jobs.any() || self.tts_jobs.any() {
            out.requests.push(Request::CancelJobs { up_to_turn: id });
        }
    }

    /// Aborts any turn in progress and starts a new one; returns its id.
    fn begin_turn(&mut self, now: Instant, asr_deadline: Option<Instant>, out: &mut Output) -> u32 {
        if self.turn.is_some() {
            self.abort(now, out);
        }
        let id = self.next_turn;
        self.next_turn = self.next_turn.wrapping_add(1).max(1);
        self.turn = Some(Turn::new(id, now, asr_deadline));
        self.playout.begin_reply(now);
        id
    }

    /// A text turn (wake word or a client's typed text): answer it as if it had been spoken.
    pub fn on_text_turn(&mut self, text: &str, now: Instant, out: &mut Output) {
        let id = self.begin_turn(now, None, out);
        self.asr_done(id, Ok(text.to_string()), now, out);
    }

    /// Abort: stop the answer now (`tts stop` if speaking), cancel the LLM, drop queued audio.
    pub fn abort(&mut self, _now: Instant, out: &mut Output) {
        let Some(turn) = self.turn.take() else {
            return;
        };
        self.counters.turns_aborted += 1;
        if matches!(turn.phase, Phase::Answering { .. }) {
            out.requests.push(Request::CancelLlm);
        }
        if turn.speaking() {
            out.text(&self.session_id, ServerMessage::TtsStop);
        }
        self.cancel_jobs(turn.id, out);
        self.remember(&turn);
        self.playout.clear();
    }

    /// The recognition of turn `turn` finished (an answer, a timeout, or a typed text).
    fn asr_done(
        &mut self,
        turn: u32,
        result: Result<String, String>,
        now: Instant,
        out: &mut Output,
    ) {
        let sid = self.session_id.clone();
        let offline = self.settings.offline_llm;
        let Some(t) = self
            .turn
            .as_mut()
            .filter(|t| t.id == turn && matches!(t.phase, Phase::Recognizing { .. }))
        else {
            return;
        };
        out.samples.push((
            Stage::EosToTranscript,
            micros(now.saturating_duration_since(t.eos)),
        ));
        let text = match result {
            Ok(text) => clean_transcript(&text),
            Err(e) => {
                tracing::info!(session = %sid, error = %e, "speech recognition failed");
                self.counters.asr_failures += 1;
                out.text(
                    &sid,
                    ServerMessage::Alert {
                        status: "error",
                        message: if self.settings.prefer_chinese {
                            "抱歉，我没有听清你说的话。"
                        } else {
                            "Sorry, I could not make out what you said."
                        },
                        emotion: "sad",
                    },
                );
                self.turn = None;
                self.cancel_jobs(turn, out);
                return;
            }
        };
        if text.is_empty() {
            self.counters.empty_transcripts += 1;
            self.turn = None;
            return;
        }
        out.text(&sid, ServerMessage::Stt { text: &text });
        out.text(&sid, ServerMessage::TtsStart);
        t.start_answer(self.settings.max_segment_chars);
        t.user_text = text.clone();
        let zh = intents::is_chinese(&text);
        if self.settings.intents.is_exit(&text) {
            t.close_after = true;
            self.on_llm_text(turn, intents::farewell(zh), now, out);
            self.on_llm_done(turn, Ok(Vec::new()), now, out);
        } else if offline {
            if let Some(cmd) = intents::device_command(&text) {
                return self.offline_command(turn, cmd, zh, now, out);
            }
            let reply = self.offline.reply(
                &text,
                crate::clock::unix_now(),
                self.settings.tz_offset_minutes,
            );
            self.on_llm_text(turn, &reply, now, out);
            self.on_llm_done(turn, Ok(Vec::new()), now, out);
        } else {
            let mut messages = Vec::with_capacity(self.history.len() + 2);
            messages.push(ChatMessage::system(&self.settings.system_prompt));
            messages.extend(self.history.iter().cloned());
            messages.push(ChatMessage::user(&text));
            if let Some(answer) = t.answer_mut() {
                answer.messages = messages.clone();
            }
            let tools = self
                .tools
                .clone()
                .filter(|_| self.settings.max_tool_rounds > 0);
            out.requests.push(Request::Llm {
                turn,
                messages,
                tools,
            });
        }
    }

    /// More answer text from the LLM.
    pub fn on_llm_text(&mut self, turn: u32, delta: &str, now: Instant, out: &mut Output) {
        let sid = self.session_id.clone();
        let emotions = self.settings.emotions;
        let Some(t) = self.turn.as_mut().filter(|t| t.id == turn) else {
            return;
        };
        let Phase::Answering { answer, speech } = &mut t.phase else {
            return;
        };
        if !answer.emotion_sent && !delta.trim().is_empty() {
            answer.emotion_sent = true;
            out.samples.push((
                Stage::EosToFirstToken,
                micros(now.saturating_duration_since(t.eos)),
            ));
            if emotions {
                let (emoji, name) = emotion_of(delta);
                out.text(
                    &sid,
                    ServerMessage::Llm {
                        text: emoji,
                        emotion: name,
                    },
                );
            }
        }
        t.reply.push_str(delta);
        let mut segs = Vec::new();
        answer.splitter.push(delta, &mut segs);
        self.counters.segments_dropped += speech.queue(segs);
        self.request_tts(now, out);
    }

    /// The LLM stream ended (with the tool calls it made), or failed.
    pub fn on_llm_done(
        &mut self,
        turn: u32,
        result: Result<Vec<ToolCall>, String>,
        now: Instant,
        out: &mut Output,
    ) {
        let sid = self.session_id.clone();
        let Some(t) = self.turn.as_mut().filter(|t| t.id == turn) else {
            return;
        };
        let Phase::Answering { answer, speech } = &mut t.phase else {
            return;
        };
        if !answer.awaiting.is_empty() {
            return;
        }
        let mut segs = Vec::new();
        answer.splitter.finish(&mut segs);
        self.counters.segments_dropped += speech.queue(segs);
        let result = match result {
            Ok(calls)
                if !calls.is_empty() && answer.tool_rounds < self.settings.max_tool_rounds =>
            {
                // Speak what came before the calls, run them, then ask the model again.
                return self.start_tool_round(turn, calls, now, out);
            }
            Ok(calls) => {
                if !calls.is_empty() {
                    tracing::info!(session = %sid, "tool calls beyond the round limit ignored");
                }
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::info!(session = %sid, error = %e, "LLM failed");
            self.counters.llm_failures += 1;
            if t.reply.trim().is_empty() {
                let chinese = intents::is_chinese(&t.user_text)
                    || (t.user_text.trim().is_empty() && self.settings.prefer_chinese);
                let sorry = if chinese {
                    "抱歉，我现在没法回答。"
                } else {
                    "Sorry, I'm having trouble answering right now."
                };
                self.counters.segments_dropped += speech.queue(vec![sorry.to_string()]);
                t.reply.push_str(sorry);
                if !answer.emotion_sent {
                    answer.emotion_sent = true;
                    if self.settings.emotions {
                        out.text(
                            &sid,
                            ServerMessage::Llm {
                                text: "😔",
                                emotion: "sad",
                            },
                        );
                    }
                }
            }
        }
        t.end_answer();
        self.request_tts(now, out);
        self.maybe_finish(now);
    }

    /// The next instant at which [`Dialogue::on_timer`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = self.turn.as_ref()?;
        let phase_deadline = match &t.phase {
            Phase::Recognizing {
                asr_deadline,
                waiting,
            } => {
                let expiry = waiting.as_ref().and(self.asr_jobs.next_expiry());
                min_of(*asr_deadline, expiry)
            }
            Phase::Answering { speech, .. } | Phase::Speaking { speech } => {
                let expiry = (speech.in_flight.is_none() && !speech.segments.is_empty())
                    .then(|| self.tts_jobs.next_expiry())
                    .flatten();
                min_of(speech.in_flight.as_ref().map(|s| s.deadline), expiry)
            }
            Phase::Finishing { stop_at } => Some(*stop_at),
        };
        match (phase_deadline, self.playout.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Timers: recognition/synthesis timeouts, due frames, the final `tts stop`.
    pub fn on_timer(&mut self, now: Instant, out: &mut Output) {
        let Some(t) = self.turn.as_ref() else { return };
        let asr_late =
            matches!(t.phase, Phase::Recognizing { asr_deadline: Some(d), .. } if now >= d);
        let tts_late = t
            .speech()
            .and_then(|s| s.in_flight.as_ref())
            .filter(|s| now >= s.deadline)
            .map(|s| (t.id, s.seq));
        let id = t.id;
        if asr_late {
            self.asr_done(id, Err("recognition timed out".into()), now, out);
            return;
        }
        if let Some((id, seq)) = tts_late {
            self.tts_done(id, seq, Err("synthesis timed out".into()), now, out);
        }
        // A slot whose answer never came may have expired.
        self.submit_waiting(now, out);
        self.pump(now, out);
        self.maybe_finish(now);
        let stop_due = self
            .turn
            .as_ref()
            .is_some_and(|t| matches!(t.phase, Phase::Finishing { stop_at } if now >= stop_at));
        if stop_due {
            if let Some(t) = self.turn.take() {
                out.text(&self.session_id, ServerMessage::TtsStop);
                out.samples.push((
                    Stage::EosToTtsStop,
                    micros(now.saturating_duration_since(t.eos)),
                ));
                self.counters.turns_completed += 1;
                self.close_requested |= t.close_after;
                self.remember(&t);
            }
        }
    }

    fn remember(&mut self, t: &Turn) {
        if t.user_text.is_empty() {
            return;
        }
        self.history.push_back(ChatMessage::user(&t.user_text));
        if !t.reply.trim().is_empty() {
            self.history
                .push_back(ChatMessage::assistant(t.reply.trim()));
        }
        let text_bytes = |m: &ChatMessage| m.content.as_ref().map_or(0, String::len);
        let mut bytes: usize = self.history.iter().map(text_bytes).sum();
        while self.history.len() > self.settings.history_messages
            || bytes > self.settings.history_max_bytes
        {
            let Some(oldest) = self.history.pop_front() else {
                break;
            };
            bytes -= text_bytes(&oldest);
        }
    }

    /// What the user said in the current turn (empty if none).
    pub fn user_text(&self) -> &str {
        self.turn.as_ref().map_or("", |t| t.user_text.as_str())
    }

    /// Ends the session after turn `turn` has been spoken (as an exit phrase does); nothing if
    /// that turn is over.
    pub fn close_after_turn(&mut self, turn: u32) {
        if let Some(t) = self.turn.as_mut().filter(|t| t.id == turn) {
            t.close_after = true;
        }
    }

    /// Id of the current turn, if any.
    pub fn current_turn(&self) -> Option<u32> {
        self.turn.as_ref().map(|t| t.id)
    }
}

/// The earlier of two optional instants.
fn min_of(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Trims whitespace and surrounding punctuation; an utterance of only punctuation is empty.
pub fn clean_transcript(text: &str) -> String {
    let is_edge = |c: char| {
        c.is_whitespace() || c.is_ascii_punctuation() || "，。？！、；：…“”‘’「」".contains(c)
    };
    text.trim_matches(is_edge).to_string()
}
