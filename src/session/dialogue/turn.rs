//! One turn of the dialogue as a phase enum whose variants carry only what that phase needs.
//!
//! The cut follows what the code reads and writes in each phase:
//! - [`Phase::Recognizing`]: the recognition deadline (`None` for a typed turn), and the
//!   utterance while it waits for the session's recognition quota (`jobs.rs`).
//! - [`Phase::Answering`]: the text of the answer is still coming — from the LLM stream, the
//!   offline responder, or a tool round ([`Answer`]: splitter, the conversation sent to the LLM,
//!   calls awaited). Sentences are synthesised while the text streams, so the synthesis state
//!   ([`Speech`]) is already here.
//! - [`Phase::Speaking`]: the answer's text is complete (the LLM state is dropped); the
//!   remaining sentences are synthesised and played out.
//! - [`Phase::Finishing`]: everything is sent; `tts stop` is due at `stop_at` (play-out end
//!   plus the stop guard).
//!
//! What the whole turn needs whatever its phase stays on [`Turn`]: its id, the end of speech
//! (latency samples), the user's text and the reply so far (both go to the history, also on
//! abort), and whether the session closes after it. The queued audio and the play-out clock are
//! the session's, in [`crate::pipeline::audio_out::Playout`].

use std::collections::VecDeque;
use std::time::Instant;

use super::tools::OfflineStep;
use crate::pipeline::sentences::SentenceSplitter;
use crate::providers::llm::openai::ChatMessage;

/// One turn: an utterance (or typed text) and its answer.
pub(super) struct Turn {
    /// Turn id; results of other turns are dropped.
    pub(super) id: u32,
    /// Wall-clock time the utterance was complete (end of speech decided).
    pub(super) eos: Instant,
    /// What the user said (empty until recognised, and for a greeting).
    pub(super) user_text: String,
    /// The answer's text so far.
    pub(super) reply: String,
    /// Close the session after this turn's `tts stop` (exit intent).
    pub(super) close_after: bool,
    /// Where the turn is.
    pub(super) phase: Phase,
}

/// Where a turn is; see the module doc.
pub(super) enum Phase {
    /// Waiting for the transcript.
    Recognizing {
        /// When recognition times out (`None`: no recognition job, the text is given).
        asr_deadline: Option<Instant>,
        /// The utterance, while it waits for the session's recognition quota.
        waiting: Option<Vec<i16>>,
    },
    /// The answer's text is still coming; complete sentences are synthesised meanwhile.
    Answering {
        /// LLM and tool-round state (boxed: the other phases are a fraction of its size).
        answer: Box<Answer>,
        /// Synthesis of the sentences so far.
        speech: Speech,
    },
    /// The text is complete; the rest is synthesised and played out.
    Speaking {
        /// Synthesis of the remaining sentences.
        speech: Speech,
    },
    /// All audio sent: `tts stop` at `stop_at`.
    Finishing {
        /// Play-out end plus the stop guard.
        stop_at: Instant,
    },
}

/// The state of an answer whose text is still being produced.
#[derive(Default)]
pub(super) struct Answer {
    /// Cuts the streamed text into sentences.
    pub(super) splitter: SentenceSplitter,
    /// The `llm` emotion message went out (or the first token arrived).
    pub(super) emotion_sent: bool,
    /// The conversation sent to the LLM in this turn (grows with tool rounds).
    pub(super) messages: Vec<ChatMessage>,
    /// LLM rounds that called tools.
    pub(super) tool_rounds: u32,
    /// Calls of the current round and their results, in call order.
    pub(super) awaiting: Vec<(String, Option<Result<String, String>>)>,
    /// An offline device command in progress.
    pub(super) offline_step: Option<OfflineStep>,
    /// A tool result to speak as the answer (`{"action":"RESPONSE","response":…}`).
    pub(super) direct_reply: Option<String>,
}

/// Synthesis of a turn's sentences, one segment at a time, in order.
#[derive(Default)]
pub(super) struct Speech {
    /// Sentences not yet sent to synthesis.
    pub(super) segments: VecDeque<String>,
    /// The segment being synthesised.
    pub(super) in_flight: Option<Synthesis>,
    /// Number of the next segment.
    pub(super) next_seq: u32,
    /// The next segment is waiting for the session's synthesis quota (counted once).
    pub(super) held: bool,
}

/// A segment sent to synthesis.
pub(super) struct Synthesis {
    /// Segment number within the turn.
    pub(super) seq: u32,
    /// When synthesis times out (the segment is skipped).
    pub(super) deadline: Instant,
    /// Its text (announced with `sentence_start` before its audio).
    pub(super) text: String,
}

impl Turn {
    /// A turn whose utterance ended at `eos`, waiting for its transcript.
    pub(super) fn new(id: u32, eos: Instant, asr_deadline: Option<Instant>) -> Turn {
        Turn {
            id,
            eos,
            user_text: String::new(),
            reply: String::new(),
            close_after: false,
            phase: Phase::Recognizing {
                asr_deadline,
                waiting: None,
            },
        }
    }

    /// True from `tts start` on (the device has been told an answer is being spoken).
    pub(super) fn speaking(&self) -> bool {
        !matches!(self.phase, Phase::Recognizing { .. })
    }

    /// Starts answering (after `tts start`); segments are cut at `max_segment_chars`.
    pub(super) fn start_answer(&mut self, max_segment_chars: usize) {
        self.phase = Phase::Answering {
            answer: Box::new(Answer {
                splitter: SentenceSplitter::with_max_chars(max_segment_chars),
                ..Answer::default()
            }),
            speech: Speech::default(),
        };
    }

    /// The answer's text is complete: keep the synthesis, drop the LLM state.
    pub(super) fn end_answer(&mut self) {
        let placeholder = Phase::Recognizing {
            asr_deadline: None,
            waiting: None,
        };
        self.phase = match std::mem::replace(&mut self.phase, placeholder) {
            Phase::Answering { speech, .. } => Phase::Speaking { speech },
            other => other,
        };
    }

    /// The answer state, while answering.
    pub(super) fn answer_mut(&mut self) -> Option<&mut Answer> {
        match &mut self.phase {
            Phase::Answering { answer, .. } => Some(answer),
            _ => None,
        }
    }

    /// The synthesis state, while answering or speaking.
    pub(super) fn speech(&self) -> Option<&Speech> {
        match &self.phase {
            Phase::Answering { speech, .. } | Phase::Speaking { speech } => Some(speech),
            _ => None,
        }
    }

    /// The synthesis state, while answering or speaking.
    pub(super) fn speech_mut(&mut self) -> Option<&mut Speech> {
        match &mut self.phase {
            Phase::Answering { speech, .. } | Phase::Speaking { speech } => Some(speech),
            _ => None,
        }
    }
}

/// Most sentences a turn keeps waiting for synthesis (about six minutes of speech at the
/// default segment length); later ones are dropped and counted.
pub(super) const MAX_QUEUED_SEGMENTS: usize = 64;

impl Speech {
    /// Queues sentences for synthesis, up to [`MAX_QUEUED_SEGMENTS`]; returns how many were
    /// dropped.
    pub(super) fn queue(&mut self, segments: Vec<String>) -> u64 {
        let mut dropped = 0;
        for s in segments {
            if self.segments.len() < MAX_QUEUED_SEGMENTS {
                self.segments.push_back(s);
            } else {
                dropped += 1;
            }
        }
        dropped
    }

    /// True when every sentence has been synthesised (or skipped).
    pub(super) fn drained(&self) -> bool {
        self.segments.is_empty() && self.in_flight.is_none()
    }
}
