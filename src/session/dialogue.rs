//! The reply half of a session, with no I/O: utterance → recognition → answer → sentences →
//! synthesis → paced Opus frames → `tts stop`, plus barge-in, timeouts and apologies.
//!
//! [`Dialogue`] decides; the connection loop carries out the [`Request`]s it emits (a job for
//! an inference core, or a remote call on the shard) and feeds results back tagged with the
//! turn id, so a result of an aborted turn is recognised and dropped.
//!
//! Tools: an LLM round that ends with tool calls asks for them ([`Output::calls`]); when every
//! result is in (see [`Dialogue::on_tool_result`]) the model is asked again with the results,
//! at most `max_tool_rounds` times per turn (the last request goes without tools). Text spoken
//! before a call stays spoken. Exit phrases and the offline responder's device commands are
//! decided here too (see `crate::tools::intents`).
//!
//! Pacing is by audio time against a per-session clock: `play_end` is when the device will
//! have played everything sent so far (each 60 ms frame pushes it forward by 60 ms from
//! `max(play_end, now)`); the next frame is due when the device holds less than
//! `prebuffer_frames` of audio. So the device never holds more than the pre-buffer (well under
//! its 40-frame queue), a stall (waiting for synthesis) is followed by a fresh pre-buffer, and
//! no per-frame sleep accumulates drift. `tts stop` goes out once `play_end` (plus a guard) has
//! passed.
//!
//! Past 600 lines because one turn's states (recognition, LLM rounds, tools, synthesis,
//! pacing) change together on abort and timeout; splitting them would spread that one state
//! machine over files.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::audio::encode::DownlinkEncoder;
use crate::audio::resample::resample;
use crate::metrics::Stage;
use crate::pipeline::sentences::{emotion_of, SentenceSplitter};
use crate::protocol::ServerMessage;
use crate::providers::llm::offline::OfflineResponder;
use crate::providers::llm::openai::ChatMessage;
use crate::providers::llm::ToolCall;
use crate::tools::intents::{self, DeviceCommand, Intents, VolumeTools};

/// What the dialogue needs from config.
#[derive(Debug, Clone)]
pub struct DialogueSettings {
    /// Answer with the built-in offline responder (no LLM configured).
    pub offline_llm: bool,
    /// System prompt for the LLM.
    pub system_prompt: String,
    /// Most history messages kept.
    pub history_messages: usize,
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

/// A step of an offline device command waiting for a tool result.
#[derive(Debug, Clone, Copy)]
enum OfflineStep {
    /// Reading the status to change the volume by this much.
    ReadVolume { change: i32, zh: bool },
    /// Setting the volume to this value.
    SetVolume { volume: u8, zh: bool },
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage2 {
    Recognizing,
    Answering,
}

enum Queued {
    Sentence(String),
    Pcm { pcm: Vec<i16>, pos: usize },
}

struct Turn {
    id: u32,
    stage: Stage2,
    /// Wall-clock time the utterance was complete (end of speech decided).
    eos: Instant,
    user_text: String,
    reply: String,
    tts_started: bool,
    emotion_sent: bool,
    first_audio_sent: bool,
    splitter: SentenceSplitter,
    llm_done: bool,
    segments: VecDeque<String>,
    tts_in_flight: Option<(u32, Instant)>,
    in_flight_text: Option<String>,
    next_seq: u32,
    queue: VecDeque<Queued>,
    asr_deadline: Option<Instant>,
    first_segment_requested: bool,
    /// The conversation sent to the LLM in this turn (grows with tool rounds).
    messages: Vec<ChatMessage>,
    /// LLM rounds that called tools.
    tool_rounds: u32,
    /// Calls of the current round and their results, in call order.
    awaiting: Vec<(String, Option<Result<String, String>>)>,
    /// An offline device command in progress.
    offline_step: Option<OfflineStep>,
    /// Close the session after this turn's `tts stop` (exit intent).
    close_after: bool,
    /// A tool result to speak as the answer (`{"action":"RESPONSE","response":…}`).
    direct_reply: Option<String>,
}

impl Turn {
    /// A turn whose utterance ended at `eos`, waiting for its transcript.
    fn new(id: u32, eos: Instant, asr_deadline: Option<Instant>) -> Turn {
        Turn {
            id,
            stage: Stage2::Recognizing,
            eos,
            user_text: String::new(),
            reply: String::new(),
            tts_started: false,
            emotion_sent: false,
            first_audio_sent: false,
            splitter: SentenceSplitter::new(),
            llm_done: false,
            segments: VecDeque::new(),
            tts_in_flight: None,
            in_flight_text: None,
            next_seq: 0,
            queue: VecDeque::new(),
            asr_deadline,
            first_segment_requested: false,
            messages: Vec::new(),
            tool_rounds: 0,
            awaiting: Vec::new(),
            offline_step: None,
            close_after: false,
            direct_reply: None,
        }
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
}

/// The reply state of one session.
pub struct Dialogue {
    settings: DialogueSettings,
    session_id: String,
    history: VecDeque<ChatMessage>,
    next_turn: u32,
    turn: Option<Turn>,
    encoder: Option<DownlinkEncoder>,
    play_end: Option<Instant>,
    stop_at: Option<Instant>,
    offline: OfflineResponder,
    /// The `tools` array offered to the LLM, if any.
    tools: Option<Rc<serde_json::Value>>,
    /// The tools the offline responder's volume commands use.
    volume_tools: intents::VolumeTools,
    next_call: u64,
    close_requested: bool,
    /// Counters.
    pub counters: DialogueCounters,
}

/// Samples per 60 ms frame at `rate`.
fn frame_samples(rate: u32) -> usize {
    (rate as usize * 60) / 1000
}

const FRAME: Duration = Duration::from_millis(60);

impl Dialogue {
    /// A dialogue for one session.
    pub fn new(settings: DialogueSettings, session_id: String) -> Dialogue {
        Dialogue {
            settings,
            session_id,
            history: VecDeque::new(),
            next_turn: 1,
            turn: None,
            encoder: None,
            play_end: None,
            stop_at: None,
            offline: OfflineResponder,
            tools: None,
            volume_tools: intents::VolumeTools::default(),
            next_call: 1,
            close_requested: false,
            counters: DialogueCounters::default(),
        }
    }

    /// True between `tts start` and `tts stop`.
    pub fn speaking(&self) -> bool {
        self.turn.as_ref().is_some_and(|t| t.tts_started)
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
            t.tts_started = true;
            t.stage = Stage2::Answering;
        }
        self.on_llm_text(id, text, now, out);
        self.on_llm_done(id, Ok(Vec::new()), now, out);
    }

    /// True while a turn is being recognised or answered.
    pub fn busy(&self) -> bool {
        self.turn.is_some()
    }

    /// A complete utterance arrived: start recognising it (aborting an answer in progress).
    pub fn on_utterance(&mut self, pcm: Vec<i16>, now: Instant, out: &mut Output) {
        let id = self.begin_turn(now, Some(now + self.settings.asr_timeout), out);
        out.requests.push(Request::Asr { turn: id, pcm });
    }

    /// Aborts any turn in progress and starts a new one; returns its id.
    fn begin_turn(&mut self, now: Instant, asr_deadline: Option<Instant>, out: &mut Output) -> u32 {
        if self.turn.is_some() {
            self.abort(now, out);
        }
        let id = self.next_turn;
        self.next_turn = self.next_turn.wrapping_add(1).max(1);
        self.turn = Some(Turn::new(id, now, asr_deadline));
        id
    }

    /// A text turn (wake word or a client's typed text): answer it as if it had been spoken.
    pub fn on_text_turn(&mut self, text: &str, now: Instant, out: &mut Output) {
        let id = self.begin_turn(now, None, out);
        self.on_asr(id, Ok(text.to_string()), now, out);
    }

    /// Abort: stop the answer now (`tts stop` if speaking), cancel the LLM, drop queued audio.
    pub fn abort(&mut self, now: Instant, out: &mut Output) {
        let Some(turn) = self.turn.take() else {
            return;
        };
        self.counters.turns_aborted += 1;
        if turn.stage == Stage2::Answering && !turn.llm_done {
            out.requests.push(Request::CancelLlm);
        }
        if turn.tts_started {
            out.text(&self.session_id, ServerMessage::TtsStop);
        }
        self.remember(&turn);
        self.stop_at = None;
        let _ = now;
    }

    /// The recognition of turn `turn` finished.
    pub fn on_asr(
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
            .filter(|t| t.id == turn && t.stage == Stage2::Recognizing)
        else {
            return;
        };
        t.asr_deadline = None;
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
                        message: "Sorry, I could not make out what you said.",
                        emotion: "sad",
                    },
                );
                self.turn = None;
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
        t.tts_started = true;
        t.stage = Stage2::Answering;
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
            t.messages = messages.clone();
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

    /// The offline responder carries out a device command with the device's tools.
    fn offline_command(
        &mut self,
        turn: u32,
        cmd: DeviceCommand,
        zh: bool,
        now: Instant,
        out: &mut Output,
    ) {
        let VolumeTools { set, status } = &self.volume_tools;
        let (step, tool, arguments) = match (cmd, set, status) {
            (DeviceCommand::SetVolume(volume), Some(set), _) => (
                OfflineStep::SetVolume { volume, zh },
                set.clone(),
                serde_json::json!({ "volume": volume }),
            ),
            (DeviceCommand::ChangeVolume(change), Some(_), Some(status)) => (
                OfflineStep::ReadVolume { change, zh },
                status.clone(),
                serde_json::json!({}),
            ),
            _ => {
                self.on_llm_text(turn, intents::no_volume_tool(zh), now, out);
                self.on_llm_done(turn, Ok(Vec::new()), now, out);
                return;
            }
        };
        self.offline_call(turn, step, &tool, arguments, out);
    }

    fn offline_call(
        &mut self,
        turn: u32,
        step: OfflineStep,
        tool: &str,
        arguments: serde_json::Value,
        out: &mut Output,
    ) {
        let call_id = format!("offline_{}", self.next_call);
        self.next_call += 1;
        let Some(t) = self.turn.as_mut().filter(|t| t.id == turn) else {
            return;
        };
        t.offline_step = Some(step);
        t.awaiting = vec![(call_id.clone(), None)];
        self.counters.tool_calls += 1;
        out.calls.push(ToolInvocation {
            turn,
            call_id,
            name: tool.to_string(),
            arguments: arguments.to_string(),
        });
    }

    /// The result of tool call `call_id` of turn `turn` (a late or unknown one is ignored).
    pub fn on_tool_result(
        &mut self,
        turn: u32,
        call_id: &str,
        result: Result<String, String>,
        now: Instant,
        out: &mut Output,
    ) {
        let max = self.settings.max_tool_result_bytes;
        let sid = self.session_id.clone();
        let Some(t) = answering(&mut self.turn, turn) else {
            return;
        };
        let Some(slot) = t
            .awaiting
            .iter_mut()
            .find(|(id, r)| id == call_id && r.is_none())
        else {
            return;
        };
        let result = result.map(|mut text| {
            if let Some(reply) = direct_response(&text) {
                t.direct_reply = Some(reply);
            }
            crate::tools::truncate_utf8(&mut text, max);
            text
        });
        if let Err(e) = &result {
            tracing::info!(session = %sid, call = call_id, error = %e, "tool call failed");
        }
        slot.1 = Some(result);
        if t.awaiting.iter().any(|(_, r)| r.is_none()) {
            return;
        }
        let results = std::mem::take(&mut t.awaiting);
        if let Some(step) = t.offline_step.take() {
            let result = results.into_iter().next().and_then(|(_, r)| r);
            return self.offline_result(turn, step, result, now, out);
        }
        if let Some(reply) = t.direct_reply.take() {
            // The tool answered for the model (the reference's vision tool does): say it.
            self.on_llm_text(turn, &reply, now, out);
            return self.on_llm_done(turn, Ok(Vec::new()), now, out);
        }
        for (id, r) in results {
            let content = match r {
                Some(Ok(text)) => text,
                Some(Err(e)) => format!("error: {e}"),
                None => continue,
            };
            t.messages.push(ChatMessage::tool_result(id, content));
        }
        let tools = if t.tool_rounds < self.settings.max_tool_rounds {
            self.tools.clone()
        } else {
            None
        };
        out.requests.push(Request::Llm {
            turn,
            messages: t.messages.clone(),
            tools,
        });
    }

    fn offline_result(
        &mut self,
        turn: u32,
        step: OfflineStep,
        result: Option<Result<String, String>>,
        now: Instant,
        out: &mut Output,
    ) {
        let reply = match (step, result) {
            (OfflineStep::ReadVolume { change, zh }, Some(Ok(status))) => {
                match intents::volume_in_status(&status) {
                    Some(v) => {
                        let volume = (i32::from(v) + change).clamp(0, 100) as u8;
                        let step = OfflineStep::SetVolume { volume, zh };
                        let arguments = serde_json::json!({ "volume": volume });
                        // Checked before the status was read.
                        let set = self.volume_tools.set.clone().unwrap_or_default();
                        return self.offline_call(turn, step, &set, arguments, out);
                    }
                    None => intents::command_failed(zh).to_string(),
                }
            }
            (OfflineStep::SetVolume { volume, zh }, Some(Ok(_))) => intents::volume_set(volume, zh),
            (OfflineStep::ReadVolume { zh, .. } | OfflineStep::SetVolume { zh, .. }, _) => {
                intents::command_failed(zh).to_string()
            }
        };
        self.on_llm_text(turn, &reply, now, out);
        self.on_llm_done(turn, Ok(Vec::new()), now, out);
    }

    /// More answer text from the LLM.
    pub fn on_llm_text(&mut self, turn: u32, delta: &str, now: Instant, out: &mut Output) {
        let sid = self.session_id.clone();
        let emotions = self.settings.emotions;
        let Some(t) = answering(&mut self.turn, turn) else {
            return;
        };
        if !t.emotion_sent && !delta.trim().is_empty() {
            t.emotion_sent = true;
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
        t.splitter.push(delta, &mut segs);
        t.segments.extend(segs);
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
        let Some(t) = answering(&mut self.turn, turn) else {
            return;
        };
        if t.llm_done || !t.awaiting.is_empty() {
            return;
        }
        let mut segs = Vec::new();
        t.splitter.finish(&mut segs);
        t.segments.extend(segs);
        let result = match result {
            Ok(mut calls) if !calls.is_empty() && t.tool_rounds < self.settings.max_tool_rounds => {
                // Speak what came before the calls, run them, then ask the model again.
                t.tool_rounds += 1;
                // Results are matched by call id: give a missing or repeated one a unique id.
                for i in 0..calls.len() {
                    if calls[i].id.is_empty() || calls[..i].iter().any(|c| c.id == calls[i].id) {
                        calls[i].id = format!("call_{turn}_{}_{i}", t.tool_rounds);
                    }
                }
                t.messages.push(ChatMessage::assistant_tool_calls(&calls));
                let max = self.settings.max_calls_per_round;
                let mut refused = Vec::new();
                for (i, call) in calls.into_iter().enumerate() {
                    t.awaiting.push((call.id.clone(), None));
                    if i < max {
                        self.counters.tool_calls += 1;
                        out.calls.push(ToolInvocation {
                            turn,
                            call_id: call.id,
                            name: call.name,
                            arguments: call.arguments,
                        });
                    } else {
                        refused.push(call.id);
                    }
                }
                self.request_tts(now, out);
                for id in refused {
                    let e = format!("only {max} tool calls are carried out per round");
                    self.on_tool_result(turn, &id, Err(e), now, out);
                }
                return;
            }
            Ok(calls) => {
                if !calls.is_empty() {
                    tracing::info!(session = %sid, "tool calls beyond the round limit ignored");
                }
                Ok(())
            }
            Err(e) => Err(e),
        };
        t.llm_done = true;
        if let Err(e) = result {
            tracing::info!(session = %sid, error = %e, "LLM failed");
            self.counters.llm_failures += 1;
            if t.reply.trim().is_empty() {
                let sorry = "Sorry, I'm having trouble answering right now.";
                t.segments.push_back(sorry.to_string());
                t.reply.push_str(sorry);
                if !t.emotion_sent {
                    t.emotion_sent = true;
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
        self.request_tts(now, out);
        self.maybe_finish(now);
    }

    /// Synthesis of segment `seq` finished: queue its audio (resampled to the downlink rate).
    pub fn on_tts(
        &mut self,
        turn: u32,
        seq: u32,
        result: Result<(Vec<i16>, u32), String>,
        now: Instant,
        out: &mut Output,
    ) {
        let out_rate = self.settings.out_rate;
        let sid = self.session_id.clone();
        let Some(t) = self.turn.as_mut().filter(|t| t.id == turn) else {
            return;
        };
        let Some((expected, _)) = t.tts_in_flight else {
            return;
        };
        if expected != seq {
            return;
        }
        let text = t.in_flight_text.take();
        t.tts_in_flight = None;
        match result {
            Ok((pcm, rate)) if !pcm.is_empty() => {
                let pcm = if rate == out_rate {
                    pcm
                } else {
                    resample(&pcm, rate, out_rate)
                };
                t.queue
                    .push_back(Queued::Sentence(text.unwrap_or_default()));
                t.queue.push_back(Queued::Pcm { pcm, pos: 0 });
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

    fn request_tts(&mut self, now: Instant, out: &mut Output) {
        let timeout = self.settings.tts_timeout;
        let Some(t) = self.turn.as_mut() else { return };
        if t.tts_in_flight.is_some() {
            return;
        }
        while let Some(text) = t.segments.pop_front() {
            if text.trim().is_empty() {
                continue;
            }
            let seq = t.next_seq;
            t.next_seq += 1;
            t.tts_in_flight = Some((seq, now + timeout));
            t.in_flight_text = Some(text.clone());
            t.first_segment_requested = true;
            out.requests.push(Request::Tts {
                turn: t.id,
                seq,
                text,
            });
            return;
        }
    }

    /// Sends every frame that is due at `now`.
    pub fn pump(&mut self, now: Instant, out: &mut Output) {
        let prebuffer = FRAME * self.settings.prebuffer_frames;
        let fs = frame_samples(self.settings.out_rate);
        let sid = self.session_id.clone();
        loop {
            let Some(t) = self.turn.as_mut() else { return };
            let Some(front) = t.queue.front_mut() else {
                return;
            };
            match front {
                Queued::Sentence(text) => {
                    let text = std::mem::take(text);
                    t.queue.pop_front();
                    if !text.is_empty() {
                        out.text(&sid, ServerMessage::TtsSentenceStart { text: &text });
                    }
                }
                Queued::Pcm { pcm, pos } => {
                    // Due when the device holds less than the pre-buffer.
                    let due = self
                        .play_end
                        .map(|end| end.checked_sub(prebuffer).unwrap_or(end));
                    if let Some(due) = due {
                        if due > now {
                            return;
                        }
                        if now.saturating_duration_since(due) < FRAME
                            && self.play_end.is_some_and(|e| e > now)
                        {
                            out.samples.push((
                                Stage::FramePacingJitter,
                                micros(now.saturating_duration_since(due)),
                            ));
                        }
                    }
                    let end = (*pos + fs).min(pcm.len());
                    let mut frame = pcm[*pos..end].to_vec();
                    frame.resize(fs, 0);
                    *pos = end;
                    let done = *pos >= pcm.len();
                    if done {
                        t.queue.pop_front();
                    }
                    let encoder = match self.encoder.as_mut() {
                        Some(e) => e,
                        None => match DownlinkEncoder::new(
                            self.settings.out_rate,
                            self.settings.complexity,
                        ) {
                            Ok(e) => self.encoder.insert(e),
                            Err(e) => {
                                tracing::warn!(error = %e, "downlink encoder unavailable");
                                return;
                            }
                        },
                    };
                    match encoder.encode(&frame) {
                        Ok(packet) => {
                            if !t.first_audio_sent {
                                t.first_audio_sent = true;
                                out.samples.push((
                                    Stage::EosToFirstAudio,
                                    micros(now.saturating_duration_since(t.eos)),
                                ));
                            }
                            out.items.push(OutItem::Audio(packet));
                            self.counters.frames_sent += 1;
                            let start = self.play_end.map_or(now, |e| e.max(now));
                            self.play_end = Some(start + FRAME);
                        }
                        Err(e) => tracing::warn!(error = %e, "opus encode failed; frame skipped"),
                    }
                }
            }
        }
    }

    fn maybe_finish(&mut self, _now: Instant) {
        let Some(t) = self.turn.as_ref() else { return };
        let complete = t.stage == Stage2::Answering
            && t.llm_done
            && t.segments.is_empty()
            && t.tts_in_flight.is_none()
            && t.queue.is_empty();
        if complete && self.stop_at.is_none() {
            let end = self.play_end.unwrap_or(_now).max(_now);
            self.stop_at = Some(end + self.settings.stop_guard);
        }
    }

    /// The next instant at which [`Dialogue::on_timer`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = self.turn.as_ref()?;
        let mut d: Option<Instant> = None;
        let mut consider = |x: Instant| d = Some(d.map_or(x, |y: Instant| y.min(x)));
        if let Some(a) = t.asr_deadline {
            consider(a);
        }
        if let Some((_, deadline)) = t.tts_in_flight {
            consider(deadline);
        }
        if matches!(
            t.queue.front(),
            Some(Queued::Pcm { .. }) | Some(Queued::Sentence(_))
        ) {
            let prebuffer = FRAME * self.settings.prebuffer_frames;
            let due = self
                .play_end
                .map(|end| end.checked_sub(prebuffer).unwrap_or(end))
                .unwrap_or_else(Instant::now);
            consider(due);
        }
        if let Some(s) = self.stop_at {
            consider(s);
        }
        d
    }

    /// Timers: recognition/synthesis timeouts, due frames, the final `tts stop`.
    pub fn on_timer(&mut self, now: Instant, out: &mut Output) {
        let (asr_late, tts_late) = match self.turn.as_ref() {
            Some(t) => (
                t.asr_deadline.is_some_and(|d| now >= d),
                t.tts_in_flight
                    .is_some_and(|(_, d)| now >= d)
                    .then(|| t.tts_in_flight.map(|(s, _)| (t.id, s)))
                    .flatten(),
            ),
            None => return,
        };
        if asr_late {
            let id = self.turn.as_ref().map_or(0, |t| t.id);
            self.on_asr(id, Err("recognition timed out".into()), now, out);
            return;
        }
        if let Some((id, seq)) = tts_late {
            self.on_tts(id, seq, Err("synthesis timed out".into()), now, out);
        }
        self.pump(now, out);
        self.maybe_finish(now);
        if self.stop_at.is_some_and(|s| now >= s) {
            self.stop_at = None;
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
        while self.history.len() > self.settings.history_messages {
            self.history.pop_front();
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

/// The text of a tool result that asks to be spoken as it is, as the reference's tools do
/// (`{"action":"RESPONSE","response":"…"}`).
fn direct_response(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    if v.get("action")?.as_str()? != "RESPONSE" {
        return None;
    }
    let reply = v.get("response")?.as_str()?.trim();
    (!reply.is_empty()).then(|| reply.to_string())
}

/// Turn `id` while it is being answered.
fn answering(turn: &mut Option<Turn>, id: u32) -> Option<&mut Turn> {
    turn.as_mut()
        .filter(|t| t.id == id && t.stage == Stage2::Answering)
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
