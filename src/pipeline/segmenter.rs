//! Utterance segmentation: per-chunk speech probabilities in, utterances out.
//!
//! The VAD model (Silero, on an inference core) scores each 512-sample chunk of 16 kHz audio
//! (32 ms). The session feeds each chunk with its probability to a [`Segmenter`], and the segmenter
//! decides where an utterance starts and ends. It uses the reference server's rules: hysteresis
//! between two thresholds, "voice" when at least 3 of the last 5 chunks are voiced, a minimum
//! silence before the end, and a pre-roll of the audio before the start. An utterance goes to ASR;
//! a burst too short to be speech is reported as [`Event::Discarded`].
//!
//! # Why audio time, never wall-clock time
//! Every duration here is counted in audio: chunk `n` of a listen covers
//! `[n × 32 ms, (n + 1) × 32 ms)`. The segmenter has no clock. The reference measures its silence
//! hang-over with `time.time()` since the last voiced frame. When its event loop lags, frames
//! that were spoken 60 ms apart are processed seconds apart, so a comma pause is measured as a
//! long silence and the sentence is cut in two. The lag grows with load, so segmentation gets
//! worse exactly when the server is busy. Here the output depends only on the sequence of
//! (probability, PCM) pairs. How they are batched, how late they arrive and how loaded the
//! machine is make no difference (`same_input_same_segmentation` pins this down). Timeouts that
//! truly are wall-clock (a device that stops sending audio at all) belong to the session, not here.
//!
//! # Modes
//! - [`Mode::Auto`] and [`Mode::Realtime`]: the VAD both starts and ends utterances.
//! - [`Mode::Manual`] (push-to-talk): as in the reference, every frame counts as voice. Audio is
//!   buffered from the first chunk and recognised on [`Segmenter::stop`]. A safety is added
//!   because some clients never send `listen stop`: after the VAD has heard speech,
//!   [`SegmenterConfig::manual_max_silence_ms`] of continuous silence also ends the turn.
//!
//! The session calls [`Segmenter::reset`] on `listen start`, `abort` and wake-word `detect`. It
//! also drops the 2 s of audio after `detect` before pushing anything (protocol.md §7.4).

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Sample rate of the PCM the segmenter takes and returns.
pub const SAMPLE_RATE_HZ: u32 = 16_000;
/// Samples in one VAD chunk (Silero's frame at 16 kHz).
pub const CHUNK_SAMPLES: usize = 512;
/// Audio duration of one chunk, in milliseconds.
pub const CHUNK_MS: u64 = 32;

const SAMPLES_PER_MS: u64 = SAMPLE_RATE_HZ as u64 / 1000;
const CHUNK: u64 = CHUNK_SAMPLES as u64;

fn ms_to_samples(ms: u32) -> u64 {
    u64::from(ms) * SAMPLES_PER_MS
}

fn samples_to_ms(samples: u64) -> u64 {
    samples / SAMPLES_PER_MS
}

/// Tuning of the segmenter. `Default` is the reference server's behaviour where it has one.
///
/// Decisions are made once per chunk, so every duration is rounded up to a whole chunk (32 ms).
///
/// It deserialises from the config's `[vad]` keys (a missing key keeps its default); the vote
/// window is not a config key, so `window` and `min_voiced_in_window` always keep theirs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct SegmenterConfig {
    /// A chunk with probability `>= threshold` is voiced. Reference config: 0.5.
    pub threshold: f32,
    /// A chunk with probability `<= threshold_low` is silent. A chunk between the two thresholds
    /// repeats the previous chunk's decision. Reference config: 0.3 (code default 0.2).
    pub threshold_low: f32,
    /// Number of recent chunk decisions that vote on "have voice". Reference: 5.
    #[serde(skip)]
    pub window: usize,
    /// Voiced chunks needed in the window for "have voice". Reference: 3.
    #[serde(skip)]
    pub min_voiced_in_window: usize,
    /// Audio silence, counted from the end of the last voiced chunk, that ends an utterance
    /// (and "have voice" must be false as well). Default 400 ms. The reference config says 200,
    /// but the reference counts it from its last "have voice" window, which trails the last
    /// voiced chunk by about 96 ms, and checks it only on 60 ms packet boundaries. At nominal
    /// load its real hang-over is about 340–400 ms of audio; 400 keeps that and does not cut at
    /// commas. The reference code default is 1000; raise it for slow speakers.
    pub min_silence_ms: u32,
    /// Utterances whose speech (first voiced chunk to end of last voiced chunk) is shorter than
    /// this are dropped as noise. Default 250 ms, Silero's own `min_speech_duration_ms`. The
    /// reference has no such rule: only the buffer-length floor below.
    pub min_speech_ms: u32,
    /// Audio kept before the first voiced chunk, so a soft onset is not clipped. Reference: 10
    /// frames of 60 ms = 600 ms.
    pub pre_roll_ms: u32,
    /// Silence kept after the last voiced chunk (at most what was heard before the end was
    /// decided). Default 200 ms: this keeps the quiet word endings Silero scores low and still
    /// gives ASR a clean tail. The reference keeps its whole hang-over.
    pub post_pad_ms: u32,
    /// The most audio one utterance can hold, pre-roll included. A longer one is cut with
    /// [`EndReason::MaxLength`] and the next utterance continues seamlessly. Default 30 000 ms,
    /// Whisper's window. This also bounds memory per session. The minimum is raised to
    /// `pre_roll_ms + (window + 1) × 32 ms`.
    pub max_utterance_ms: u32,
    /// Manual mode only: this much continuous audio silence after some speech ends the turn even
    /// without `listen stop`, for clients that never send it. Default 10 000 ms.
    pub manual_max_silence_ms: u32,
    /// Utterances with less audio than this (pre-roll and padding included) are not sent to ASR.
    /// Reference: more than 15 frames of 60 ms, i.e. 900 ms. This only drops speech at the very
    /// start of a listen, where the pre-roll is short; elsewhere `min_speech_ms` decides.
    /// Config key `vad.min_utterance_ms`.
    #[serde(rename = "min_utterance_ms")]
    pub min_utterance_ms_for_asr: u32,
}

impl Default for SegmenterConfig {
    fn default() -> Self {
        SegmenterConfig {
            threshold: 0.5,
            threshold_low: 0.3,
            window: 5,
            min_voiced_in_window: 3,
            min_silence_ms: 400,
            min_speech_ms: 250,
            pre_roll_ms: 600,
            post_pad_ms: 200,
            max_utterance_ms: 30_000,
            manual_max_silence_ms: 10_000,
            min_utterance_ms_for_asr: 900,
        }
    }
}

/// Why a [`SegmenterConfig`] was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSegmenterConfig(pub &'static str);

impl fmt::Display for InvalidSegmenterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid VAD segmenter config: {}", self.0)
    }
}

impl std::error::Error for InvalidSegmenterConfig {}

impl SegmenterConfig {
    /// Checks the values a config file could get wrong; [`Segmenter::new`] clamps instead.
    pub fn validate(&self) -> Result<(), InvalidSegmenterConfig> {
        let in_unit = |x: f32| (0.0..=1.0).contains(&x);
        if !in_unit(self.threshold) || !in_unit(self.threshold_low) {
            return Err(InvalidSegmenterConfig("thresholds must be within 0..=1"));
        }
        if self.threshold_low > self.threshold {
            return Err(InvalidSegmenterConfig(
                "threshold_low must not exceed threshold",
            ));
        }
        if self.window == 0 {
            return Err(InvalidSegmenterConfig("window must be at least 1 chunk"));
        }
        if self.min_voiced_in_window == 0 || self.min_voiced_in_window > self.window {
            return Err(InvalidSegmenterConfig(
                "min_voiced_in_window must be within 1..=window",
            ));
        }
        if u64::from(self.max_utterance_ms) < self.min_max_utterance_ms() {
            return Err(InvalidSegmenterConfig(
                "max_utterance_ms must be at least pre_roll_ms + (window + 1) x 32 ms",
            ));
        }
        Ok(())
    }

    fn min_max_utterance_ms(&self) -> u64 {
        u64::from(self.pre_roll_ms) + (self.window as u64 + 1) * CHUNK_MS
    }

    /// The config with out-of-range values clamped, so the segmenter never panics.
    fn normalised(mut self) -> Self {
        self.window = self.window.max(1);
        self.min_voiced_in_window = self.min_voiced_in_window.clamp(1, self.window);
        let floor = u32::try_from(self.min_max_utterance_ms()).unwrap_or(u32::MAX);
        self.max_utterance_ms = self.max_utterance_ms.max(floor);
        self
    }
}

/// The device's listening mode (`listen` `mode` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Server VAD starts and ends each utterance; the device mutes the mic while speaking.
    Auto,
    /// Push-to-talk: everything between `listen start` and `listen stop` is one utterance.
    Manual,
    /// Mic open while the server speaks; segmented exactly like `Auto`.
    Realtime,
}

/// What ended an utterance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// `min_silence_ms` of audio silence after the last voiced chunk.
    Silence,
    /// The device sent `listen stop`.
    Stop,
    /// The buffer reached `max_utterance_ms`; speech may go on in the next utterance.
    MaxLength,
    /// Manual mode: `manual_max_silence_ms` of silence after speech, without `listen stop`.
    ManualSilence,
}

/// Why an ended stretch of audio was not turned into an [`Utterance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardReason {
    /// Speech shorter than `min_speech_ms`: a noise burst, a cough, a click.
    SpeechTooShort { speech_ms: u64 },
    /// Less audio than `min_utterance_ms_for_asr`.
    AudioTooShort { audio_ms: u64 },
    /// Manual mode: the VAD heard no speech in audio that followed an earlier end (or in a
    /// buffer cut at the maximum length).
    NoSpeech,
}

/// One utterance, ready for ASR. Times are audio milliseconds since the listen started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Utterance {
    /// 16 kHz mono PCM: pre-roll, speech, then up to `post_pad_ms` of trailing silence.
    pub pcm: Vec<i16>,
    /// Audio time of `pcm[0]`.
    pub pcm_start_ms: u64,
    /// Audio time of the first voiced chunk (manual mode: of the first buffered chunk).
    pub start_ms: u64,
    /// Audio time at which the last voiced chunk ended (manual stop or length cut: of the last
    /// buffered chunk).
    pub end_ms: u64,
    /// Audio time at which the end was decided: `end_ms` plus the hang-over.
    pub decided_ms: u64,
    /// What ended it.
    pub reason: EndReason,
}

impl Utterance {
    /// Duration of the speech itself, `end_ms - start_ms`.
    pub fn speech_ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }
}

/// What the segmenter reports to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// "Have voice" became true. `chunk` is the first voiced chunk of the window, numbered from
    /// the listen start, and `audio_ms` is its start time.
    SpeechStart { chunk: u64, audio_ms: u64 },
    /// An utterance ended and is long enough for ASR.
    Utterance(Utterance),
    /// Speech ended but was dropped; the session keeps listening.
    Discarded { reason: DiscardReason },
}

/// The utterance being collected.
#[derive(Debug)]
struct Active {
    /// Audio from `pcm_start` (absolute sample index) up to the last pushed chunk.
    pcm: Vec<i16>,
    pcm_start: u64,
    /// First voiced chunk. Always set in auto mode; in manual mode set once the VAD hears speech.
    speech_start_chunk: Option<u64>,
    /// Manual mode: this buffer follows an earlier end within the same listen.
    continuation: bool,
}

/// Turns per-chunk speech probabilities into utterances, by audio time. One per session.
#[derive(Debug)]
pub struct Segmenter {
    config: SegmenterConfig,
    mode: Mode,
    /// Chunks pushed since the last reset; also the index of the next chunk.
    chunks: u64,
    /// Hysteresis state: the previous chunk's decision.
    last_decision: bool,
    /// The last `config.window` decisions, oldest first.
    window: VecDeque<bool>,
    voiced_in_window: usize,
    last_voiced_chunk: Option<u64>,
    /// The most recent audio (pre-roll plus one window), for the start of an utterance.
    recent: VecDeque<i16>,
    recent_capacity: usize,
    /// Audio before this sample index already belongs to an earlier utterance; pre-roll stops
    /// here so that no audio is sent twice.
    floor: u64,
    active: Option<Active>,
    /// Manual mode: an utterance already ended in this listen.
    manual_ended_once: bool,
}

impl Segmenter {
    /// A segmenter for one listening session. Out-of-range config values are clamped.
    pub fn new(config: SegmenterConfig, mode: Mode) -> Self {
        let config = config.normalised();
        let recent_capacity =
            ms_to_samples(config.pre_roll_ms) as usize + config.window * CHUNK_SAMPLES;
        Segmenter {
            window: VecDeque::with_capacity(config.window),
            recent: VecDeque::with_capacity(recent_capacity),
            recent_capacity,
            config,
            mode,
            chunks: 0,
            last_decision: false,
            voiced_in_window: 0,
            last_voiced_chunk: None,
            floor: 0,
            active: None,
            manual_ended_once: false,
        }
    }

    /// The config in use, after clamping.
    pub fn config(&self) -> &SegmenterConfig {
        &self.config
    }

    /// The current listening mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Audio time pushed since the last reset.
    pub fn audio_ms(&self) -> u64 {
        self.chunks * CHUNK_MS
    }

    /// Whether an utterance is being collected (auto: speech started; manual: audio buffered).
    pub fn in_utterance(&self) -> bool {
        self.active.is_some()
    }

    /// Forgets everything: `listen start`, `abort`, wake-word `detect`. Chunk numbering restarts.
    pub fn reset(&mut self) {
        self.chunks = 0;
        self.last_decision = false;
        self.window.clear();
        self.voiced_in_window = 0;
        self.last_voiced_chunk = None;
        self.recent.clear();
        self.floor = 0;
        self.active = None;
        self.manual_ended_once = false;
    }

    /// Switches mode (a `listen start` carrying `mode`) and resets.
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
        self.reset();
    }

    /// Feeds one chunk and its speech probability; events are appended to `out` in order.
    pub fn push(&mut self, prob: f32, pcm: &[i16; CHUNK_SAMPLES], out: &mut Vec<Event>) {
        let chunk = self.chunks;
        self.chunks += 1;
        let have_voice = self.decide(chunk, prob);
        self.remember(pcm);
        match self.mode {
            Mode::Auto | Mode::Realtime => self.push_auto(have_voice, pcm, out),
            Mode::Manual => self.push_manual(chunk, have_voice, pcm, out),
        }
    }

    /// Feeds consecutive chunks: `pcm` holds `probs.len()` chunks back to back. Same events as
    /// pushing them one by one. A trailing partial chunk or extra probability is ignored.
    pub fn push_chunks(&mut self, probs: &[f32], pcm: &[i16], out: &mut Vec<Event>) {
        for (prob, samples) in probs.iter().zip(pcm.chunks_exact(CHUNK_SAMPLES)) {
            if let Ok(samples) = <&[i16; CHUNK_SAMPLES]>::try_from(samples) {
                self.push(*prob, samples, out);
            }
        }
    }

    /// The device sent `listen stop`: ends the current utterance now. Returns `None` when nothing
    /// was being collected, [`Event::Discarded`] when it is too short.
    pub fn stop(&mut self) -> Option<Event> {
        self.active.as_ref()?;
        Some(self.finish(EndReason::Stop))
    }

    /// Hysteresis and window vote for one chunk; returns "have voice".
    fn decide(&mut self, chunk: u64, prob: f32) -> bool {
        let voiced = if prob >= self.config.threshold {
            true
        } else if prob <= self.config.threshold_low {
            false
        } else {
            // Between the thresholds (or NaN): repeat the previous decision.
            self.last_decision
        };
        self.last_decision = voiced;
        if voiced {
            self.last_voiced_chunk = Some(chunk);
        }
        if self.window.len() == self.config.window && self.window.pop_front() == Some(true) {
            self.voiced_in_window -= 1;
        }
        self.window.push_back(voiced);
        if voiced {
            self.voiced_in_window += 1;
        }
        self.voiced_in_window >= self.config.min_voiced_in_window
    }

    /// Keeps the most recent audio, bounded, for pre-roll.
    fn remember(&mut self, pcm: &[i16; CHUNK_SAMPLES]) {
        self.recent.extend(pcm.iter().copied());
        let excess = self.recent.len().saturating_sub(self.recent_capacity);
        self.recent.drain(..excess);
    }

    /// Absolute sample index where the last pushed chunk ends.
    fn now(&self) -> u64 {
        self.chunks * CHUNK
    }

    /// The first voiced chunk still in the window, at or after `from_chunk`.
    fn first_voiced_in_window(&self, from_chunk: u64) -> Option<u64> {
        let oldest = self.chunks - self.window.len() as u64;
        (oldest..)
            .zip(self.window.iter())
            .find(|(chunk, voiced)| **voiced && *chunk >= from_chunk)
            .map(|(chunk, _)| chunk)
    }

    /// Audio silence since the end of the last voiced chunk, in samples.
    fn silence(&self) -> u64 {
        let last_voiced_end = self.last_voiced_chunk.map_or(0, |c| (c + 1) * CHUNK);
        self.now().saturating_sub(last_voiced_end)
    }

    /// Whether one more chunk would overflow the buffer.
    fn buffer_full(&self, active: &Active) -> bool {
        (active.pcm.len() + CHUNK_SAMPLES) as u64 > ms_to_samples(self.config.max_utterance_ms)
    }

    fn push_auto(&mut self, have_voice: bool, pcm: &[i16; CHUNK_SAMPLES], out: &mut Vec<Event>) {
        match self.active.as_mut() {
            None => {
                if !have_voice {
                    return;
                }
                let Some(start_chunk) = self.first_voiced_in_window(self.floor.div_ceil(CHUNK))
                else {
                    // All voiced chunks in the window belong to the previous utterance.
                    return;
                };
                self.begin_auto(start_chunk);
                out.push(Event::SpeechStart {
                    chunk: start_chunk,
                    audio_ms: start_chunk * CHUNK_MS,
                });
            }
            Some(active) => {
                active.pcm.extend_from_slice(pcm);
                if !have_voice && self.silence() >= ms_to_samples(self.config.min_silence_ms) {
                    out.push(self.finish(EndReason::Silence));
                } else if self.active.as_ref().is_some_and(|a| self.buffer_full(a)) {
                    out.push(self.finish(EndReason::MaxLength));
                }
            }
        }
    }

    /// Starts an utterance at `start_chunk`, seeded with pre-roll and the window's audio.
    fn begin_auto(&mut self, start_chunk: u64) {
        let recent_start = self.now() - self.recent.len() as u64;
        let pcm_start = (start_chunk * CHUNK)
            .saturating_sub(ms_to_samples(self.config.pre_roll_ms))
            .max(self.floor)
            .max(recent_start);
        let skip = (pcm_start - recent_start) as usize;
        self.active = Some(Active {
            pcm: self.recent.iter().skip(skip).copied().collect(),
            pcm_start,
            speech_start_chunk: Some(start_chunk),
            continuation: false,
        });
    }

    fn push_manual(
        &mut self,
        chunk: u64,
        have_voice: bool,
        pcm: &[i16; CHUNK_SAMPLES],
        out: &mut Vec<Event>,
    ) {
        let continuation = self.manual_ended_once;
        let active = self.active.get_or_insert_with(|| Active {
            pcm: Vec::new(),
            pcm_start: chunk * CHUNK,
            speech_start_chunk: None,
            continuation,
        });
        active.pcm.extend_from_slice(pcm);
        let heard_speech = active.speech_start_chunk.is_some();
        let buffer_start_chunk = active.pcm_start / CHUNK;
        if !heard_speech && have_voice {
            if let Some(start_chunk) = self.first_voiced_in_window(buffer_start_chunk) {
                if let Some(active) = self.active.as_mut() {
                    active.speech_start_chunk = Some(start_chunk);
                }
                out.push(Event::SpeechStart {
                    chunk: start_chunk,
                    audio_ms: start_chunk * CHUNK_MS,
                });
            }
        } else if heard_speech
            && !have_voice
            && self.silence() >= ms_to_samples(self.config.manual_max_silence_ms)
        {
            out.push(self.finish(EndReason::ManualSilence));
            return;
        }
        if self.active.as_ref().is_some_and(|a| self.buffer_full(a)) {
            out.push(self.finish(EndReason::MaxLength));
        }
    }

    /// Ends the active utterance and judges whether it goes to ASR.
    fn finish(&mut self, reason: EndReason) -> Event {
        let now = self.now();
        let Some(mut active) = self.active.take() else {
            return Event::Discarded {
                reason: DiscardReason::NoSpeech,
            };
        };
        let last_voiced_end = self
            .last_voiced_chunk
            .map_or(active.pcm_start, |c| (c + 1) * CHUNK)
            .max(active.pcm_start);
        let manual = self.mode == Mode::Manual;
        // In manual mode every frame counts as voice, except for the silence that ended it.
        let (start, end) = match (manual, reason) {
            (true, EndReason::ManualSilence) => (active.pcm_start, last_voiced_end),
            (true, _) => (active.pcm_start, now),
            (false, _) => (
                active
                    .speech_start_chunk
                    .map_or(active.pcm_start, |c| c * CHUNK),
                last_voiced_end,
            ),
        };
        let keep_until = match reason {
            EndReason::MaxLength => now,
            EndReason::Stop if manual => now,
            _ => (end + ms_to_samples(self.config.post_pad_ms)).min(now),
        };
        active
            .pcm
            .truncate(keep_until.saturating_sub(active.pcm_start) as usize);
        self.floor = keep_until;
        if manual {
            self.manual_ended_once = true;
        }

        // A manual buffer is trusted without VAD speech only when it is the whole listen,
        // ended by the user: that is what the reference recognises.
        let needs_vad_speech = manual && (active.continuation || reason == EndReason::MaxLength);
        let speech_ms = samples_to_ms(end.saturating_sub(start));
        let audio_ms = samples_to_ms(active.pcm.len() as u64);
        let discard = if needs_vad_speech && active.speech_start_chunk.is_none() {
            Some(DiscardReason::NoSpeech)
        } else if speech_ms < u64::from(self.config.min_speech_ms) {
            Some(DiscardReason::SpeechTooShort { speech_ms })
        } else if audio_ms < u64::from(self.config.min_utterance_ms_for_asr) {
            Some(DiscardReason::AudioTooShort { audio_ms })
        } else {
            None
        };
        match discard {
            Some(reason) => Event::Discarded { reason },
            None => Event::Utterance(Utterance {
                pcm: active.pcm,
                pcm_start_ms: samples_to_ms(active.pcm_start),
                start_ms: samples_to_ms(start),
                end_ms: samples_to_ms(end),
                decided_ms: samples_to_ms(now),
                reason,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SILENT: f32 = 0.05;
    const VOICED: f32 = 0.9;

    /// The sample at absolute index `index`: a ramp, so any slice tells where it came from.
    fn sample_at(salt: i16, index: u64) -> i16 {
        salt + (index % 10_000) as i16
    }

    fn chunk_pcm(salt: i16, chunk: u64) -> [i16; CHUNK_SAMPLES] {
        std::array::from_fn(|i| sample_at(salt, chunk * CHUNK + i as u64))
    }

    /// Drives a segmenter with runs of equal probabilities, numbering chunks like the session.
    struct Feed {
        seg: Segmenter,
        chunk: u64,
        salt: i16,
        events: Vec<Event>,
    }

    impl Feed {
        fn new(mode: Mode) -> Self {
            Feed::with(SegmenterConfig::default(), mode)
        }

        fn with(config: SegmenterConfig, mode: Mode) -> Self {
            Feed {
                seg: Segmenter::new(config, mode),
                chunk: 0,
                salt: 0,
                events: Vec::new(),
            }
        }

        /// Pushes `n` chunks of probability `prob`.
        fn run(&mut self, prob: f32, n: u64) -> &mut Self {
            for _ in 0..n {
                let pcm = chunk_pcm(self.salt, self.chunk);
                self.seg.push(prob, &pcm, &mut self.events);
                self.chunk += 1;
            }
            self
        }

        fn take(&mut self) -> Vec<Event> {
            std::mem::take(&mut self.events)
        }

        fn reset(&mut self, salt: i16) {
            self.seg.reset();
            self.chunk = 0;
            self.salt = salt;
        }
    }

    fn start(chunk: u64) -> Event {
        Event::SpeechStart {
            chunk,
            audio_ms: chunk * CHUNK_MS,
        }
    }

    fn utterance(event: &Event) -> &Utterance {
        match event {
            Event::Utterance(u) => u,
            other => panic!("expected an utterance, got {other:?}"),
        }
    }

    /// Asserts `u.pcm` is exactly the contiguous audio from `pcm_start_ms` on.
    fn assert_contiguous(u: &Utterance, salt: i16) {
        let first = u.pcm_start_ms * SAMPLES_PER_MS;
        for (k, s) in u.pcm.iter().enumerate() {
            assert_eq!(*s, sample_at(salt, first + k as u64), "sample {k}");
        }
    }

    #[test]
    fn silence_only_emits_nothing() {
        let mut feed = Feed::new(Mode::Auto);
        // Silence, the hysteresis band after silence, and isolated voiced blips (2 of 5).
        feed.run(SILENT, 500).run(0.45, 100);
        for _ in 0..50 {
            feed.run(VOICED, 2).run(SILENT, 3);
        }
        assert_eq!(feed.take(), vec![]);
        assert!(!feed.seg.in_utterance());
        assert_eq!(feed.seg.stop(), None);
        assert_eq!(feed.seg.audio_ms(), 850 * CHUNK_MS);
    }

    #[test]
    fn short_burst_below_min_speech_is_discarded() {
        let mut feed = Feed::new(Mode::Auto);
        // 5 voiced chunks = 160 ms < 250 ms.
        feed.run(SILENT, 30).run(VOICED, 5).run(SILENT, 12);
        assert_eq!(feed.take(), vec![start(30)]);
        // Silence since chunk 35 ends; 13 chunks = 416 ms >= 400 ms decides at chunk 47.
        feed.run(SILENT, 1);
        assert_eq!(
            feed.take(),
            vec![Event::Discarded {
                reason: DiscardReason::SpeechTooShort { speech_ms: 160 }
            }]
        );
        // The segmenter keeps listening: real speech afterwards is an utterance.
        feed.run(VOICED, 20).run(SILENT, 20);
        let events = feed.take();
        assert_eq!(events[0], start(48));
        assert_eq!(utterance(&events[1]).start_ms, 48 * 32);
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn speech_then_silence_ends_after_min_silence_of_audio_time() {
        let mut feed = Feed::new(Mode::Auto);
        feed.run(SILENT, 30).run(VOICED, 20);
        // "Have voice" needs 3 voiced chunks: reported on chunk 32, dated at chunk 30.
        assert_eq!(feed.take(), vec![start(30)]);
        // Last voiced chunk 49 ends at 1600 ms. 12 silent chunks = 384 ms < 400 ms: still open.
        feed.run(SILENT, 12);
        assert_eq!(feed.take(), vec![]);
        assert!(feed.seg.in_utterance());
        // The 13th (416 ms of audio silence) decides, whatever the wall clock says.
        feed.run(SILENT, 1);
        let events = feed.take();
        assert_eq!(events.len(), 1);
        let u = utterance(&events[0]);
        assert_eq!(u.reason, EndReason::Silence);
        assert_eq!(u.start_ms, 960);
        assert_eq!(u.end_ms, 1600);
        assert_eq!(u.decided_ms, 2016);
        assert_eq!(u.speech_ms(), 640);
        // 600 ms pre-roll, 640 ms speech, 200 ms post pad.
        assert_eq!(u.pcm_start_ms, 360);
        assert_eq!(u.pcm.len(), (600 + 640 + 200) * 16);
        assert_contiguous(u, 0);
        assert!(!feed.seg.in_utterance());
    }

    #[test]
    fn comma_pause_shorter_than_min_silence_does_not_split() {
        // A 352 ms pause (11 chunks): the reference, lagging under load, can measure it as
        // seconds of wall-clock silence and split here. In audio time it is 352 ms.
        let mut feed = Feed::new(Mode::Auto);
        feed.run(SILENT, 30)
            .run(VOICED, 20)
            .run(SILENT, 11)
            .run(VOICED, 20)
            .run(SILENT, 40);
        let events = feed.take();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], start(30));
        let u = utterance(&events[1]);
        assert_eq!(
            (u.start_ms, u.end_ms, u.decided_ms, u.reason),
            (960, 81 * 32, 94 * 32, EndReason::Silence)
        );
        assert_contiguous(u, 0);

        // A 416 ms pause (13 chunks) does split, into two complete utterances.
        let mut feed = Feed::new(Mode::Auto);
        feed.run(SILENT, 30)
            .run(VOICED, 20)
            .run(SILENT, 13)
            .run(VOICED, 20)
            .run(SILENT, 40);
        let events = feed.take();
        assert_eq!(events.len(), 4);
        assert_eq!(events[0], start(30));
        assert_eq!(utterance(&events[1]).end_ms, 50 * 32);
        assert_eq!(events[2], start(63));
        let second = utterance(&events[3]);
        assert_eq!((second.start_ms, second.end_ms), (63 * 32, 83 * 32));
        // The second pre-roll starts where the first utterance's post pad ended.
        assert_eq!(second.pcm_start_ms, 50 * 32 + 200);
        assert_contiguous(second, 0);
    }

    #[test]
    fn pre_roll_is_included() {
        let mut feed = Feed::new(Mode::Auto);
        feed.run(SILENT, 40).run(VOICED, 20).run(SILENT, 13);
        let events = feed.take();
        let u = utterance(&events[1]);
        // Exactly 600 ms (9600 samples) before the first voiced chunk at 1280 ms, which is not a
        // chunk boundary: pre-roll is cut to the sample.
        assert_eq!(u.start_ms, 1280);
        assert_eq!(u.pcm_start_ms, 680);
        assert_eq!(u.pcm.len(), (600 + 640 + 200) * 16);
        assert_contiguous(u, 0);

        // Speech right after listen start gets only the audio there is.
        let mut feed = Feed::new(Mode::Auto);
        feed.run(SILENT, 3).run(VOICED, 30).run(SILENT, 13);
        let events = feed.take();
        let u = utterance(&events[1]);
        assert_eq!((u.pcm_start_ms, u.start_ms, u.end_ms), (0, 96, 33 * 32));
        assert_eq!(u.pcm.len(), (33 * 32 + 200) * 16);
        assert_contiguous(u, 0);
    }

    #[test]
    fn max_length_forces_an_end() {
        let config = SegmenterConfig {
            max_utterance_ms: 2000,
            ..SegmenterConfig::default()
        };
        let mut feed = Feed::with(config, Mode::Auto);
        feed.run(SILENT, 30).run(VOICED, 42);
        assert_eq!(feed.take(), vec![start(30)]);
        // Chunk 72 fills the buffer: one more chunk would pass 2000 ms.
        feed.run(VOICED, 1);
        let events = feed.take();
        let first = utterance(&events[0]).clone();
        assert_eq!(first.reason, EndReason::MaxLength);
        assert_eq!(
            (
                first.pcm_start_ms,
                first.start_ms,
                first.end_ms,
                first.decided_ms
            ),
            (360, 960, 2336, 2336)
        );
        assert_eq!(first.pcm.len(), (2336 - 360) * 16);
        assert!(first.pcm.len() <= 2000 * 16);

        // Speech goes on: the next utterance starts on the next chunk, without overlap or gap.
        feed.run(VOICED, 37).run(SILENT, 13);
        let events = feed.take();
        assert_eq!(events[0], start(73));
        let second = utterance(&events[1]);
        assert_eq!(second.reason, EndReason::Silence);
        assert_eq!(
            (
                second.pcm_start_ms,
                second.start_ms,
                second.end_ms,
                second.decided_ms
            ),
            (2336, 2336, 3520, 3936)
        );
        assert_eq!(events.len(), 2);
        let mut joined = first.pcm.clone();
        joined.extend_from_slice(&second.pcm);
        let both = Utterance {
            pcm: joined,
            ..first
        };
        assert_contiguous(&both, 0);
    }

    #[test]
    fn manual_mode_ends_on_stop_only_or_long_silence() {
        // Speech then 3.2 s of silence: auto would have ended; manual waits for stop.
        let mut feed = Feed::new(Mode::Manual);
        feed.run(SILENT, 30).run(VOICED, 40).run(SILENT, 100);
        assert_eq!(feed.take(), vec![start(30)]);
        let stopped = feed.seg.stop().expect("stop ends the turn");
        let u = utterance(&stopped);
        assert_eq!(u.reason, EndReason::Stop);
        // Every frame counts as voice: the whole buffer, from the listen start to the stop.
        assert_eq!(
            (u.pcm_start_ms, u.start_ms, u.end_ms, u.decided_ms),
            (0, 0, 5440, 5440)
        );
        assert_eq!(u.pcm.len(), 170 * CHUNK_SAMPLES);
        assert_contiguous(u, 0);

        // No stop: 10 s of audio silence after speech ends the turn.
        let mut feed = Feed::new(Mode::Manual);
        feed.run(SILENT, 30).run(VOICED, 40).run(SILENT, 312);
        assert_eq!(feed.take(), vec![start(30)]);
        feed.run(SILENT, 1);
        let events = feed.take();
        let u = utterance(&events[0]);
        assert_eq!(u.reason, EndReason::ManualSilence);
        // Silence since 2240 ms reaches 10 000 ms at chunk 382 (10 016 ms).
        assert_eq!((u.start_ms, u.end_ms, u.decided_ms), (0, 2240, 12_256));
        assert_eq!(u.pcm.len(), (2240 + 200) * 16);
        // A later stop over nothing but silence is not sent to ASR.
        feed.run(SILENT, 50);
        assert_eq!(
            feed.seg.stop(),
            Some(Event::Discarded {
                reason: DiscardReason::NoSpeech
            })
        );

        // Without speech, silence never ends a manual turn; stop recognises what was buffered,
        // as the reference does.
        let mut feed = Feed::new(Mode::Manual);
        feed.run(SILENT, 400);
        assert_eq!(feed.take(), vec![]);
        let stopped = feed.seg.stop().expect("stop ends the turn");
        assert_eq!(utterance(&stopped).pcm.len(), 400 * CHUNK_SAMPLES);
        // ...unless there is too little of it for ASR.
        let mut feed = Feed::new(Mode::Manual);
        feed.run(SILENT, 10);
        assert_eq!(
            feed.seg.stop(),
            Some(Event::Discarded {
                reason: DiscardReason::AudioTooShort { audio_ms: 320 }
            })
        );
        assert_eq!(feed.seg.stop(), None);
    }

    #[test]
    fn hysteresis_band_repeats_previous_decision() {
        let mut feed = Feed::new(Mode::Auto);
        // 0.45 after silence stays silence; exactly 0.5 is voice; 0.31 after voice stays voice;
        // exactly 0.3 is silence.
        feed.run(0.45, 30).run(0.5, 3).run(0.31, 12).run(0.3, 12);
        assert_eq!(feed.take(), vec![start(30)]);
        feed.run(0.3, 1);
        let events = feed.take();
        let u = utterance(&events[0]);
        // The band chunks 33..44 count as voiced: the last voiced chunk is 44.
        assert_eq!(
            (u.start_ms, u.end_ms, u.decided_ms),
            (960, 45 * 32, 58 * 32)
        );
    }

    /// A deterministic speech-like probability track: runs of speech with dips, and silences.
    fn speech_like_track(len: usize) -> Vec<f32> {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        let mut probs = Vec::with_capacity(len);
        let mut speaking = false;
        while probs.len() < len {
            let run = 1 + (next() % 60) as usize;
            for _ in 0..run {
                let noise = (next() % 1000) as f32 / 1000.0;
                probs.push(if speaking {
                    0.2 + 0.8 * noise
                } else {
                    0.45 * noise
                });
            }
            speaking = !speaking;
        }
        probs.truncate(len);
        probs
    }

    fn segment_in_batches(mode: Mode, probs: &[f32], batch: impl Fn(usize) -> usize) -> Vec<Event> {
        let pcm: Vec<i16> = (0..probs.len() as u64 * CHUNK)
            .map(|i| sample_at(0, i))
            .collect();
        let mut seg = Segmenter::new(SegmenterConfig::default(), mode);
        let mut events = Vec::new();
        let (mut at, mut call) = (0, 0);
        while at < probs.len() {
            let n = batch(call).clamp(1, probs.len() - at);
            let samples = &pcm[at * CHUNK_SAMPLES..(at + n) * CHUNK_SAMPLES];
            seg.push_chunks(&probs[at..at + n], samples, &mut events);
            at += n;
            call += 1;
        }
        events.extend(seg.stop());
        events
    }

    #[test]
    fn same_input_same_segmentation() {
        let probs = speech_like_track(4000);
        let one_by_one = segment_in_batches(Mode::Auto, &probs, |_| 1);
        let utterances = one_by_one
            .iter()
            .filter(|e| matches!(e, Event::Utterance(_)))
            .count();
        assert!(utterances >= 5, "the track should hold several utterances");
        for size in [2, 3, 7, 64, 4000] {
            assert_eq!(segment_in_batches(Mode::Auto, &probs, |_| size), one_by_one);
        }
        // Irregular batches, as a lagging shard would deliver them.
        let irregular = segment_in_batches(Mode::Auto, &probs, |call| [1, 9, 2, 31, 5][call % 5]);
        assert_eq!(irregular, one_by_one);
        // Realtime segments exactly like auto.
        assert_eq!(
            segment_in_batches(Mode::Realtime, &probs, |_| 13),
            one_by_one
        );
        // Manual mode too is independent of batching.
        let manual = segment_in_batches(Mode::Manual, &probs, |_| 1);
        assert_eq!(segment_in_batches(Mode::Manual, &probs, |_| 17), manual);
    }

    #[test]
    fn reset_forgets_partial_speech() {
        let mut feed = Feed::new(Mode::Auto);
        feed.salt = 20_000;
        feed.run(SILENT, 30).run(VOICED, 10);
        assert_eq!(feed.take(), vec![start(30)]);
        assert!(feed.seg.in_utterance());

        feed.reset(0);
        assert!(!feed.seg.in_utterance());
        assert_eq!(feed.seg.stop(), None);
        // Hysteresis is forgotten too: the band right after reset is silence, not voice.
        feed.run(0.4, 10);
        assert_eq!(feed.take(), vec![]);
        // Chunks are numbered from the reset, and no audio from before it leaks into pre-roll.
        feed.run(VOICED, 20).run(SILENT, 13);
        let events = feed.take();
        assert_eq!(events[0], start(10));
        let u = utterance(&events[1]);
        assert_eq!((u.pcm_start_ms, u.start_ms, u.end_ms), (0, 320, 960));
        assert!(u.pcm.iter().all(|s| *s < 20_000));
        assert_contiguous(u, 0);
    }

    #[test]
    fn stop_in_auto_mode_ends_the_utterance_now() {
        let mut feed = Feed::new(Mode::Auto);
        feed.run(SILENT, 30).run(VOICED, 20).run(SILENT, 4);
        assert_eq!(feed.take(), vec![start(30)]);
        let stopped = feed.seg.stop().expect("speech was in progress");
        let u = utterance(&stopped);
        // Trailing silence is kept up to the post pad; only 128 ms of it was heard.
        assert_eq!((u.start_ms, u.end_ms, u.decided_ms), (960, 1600, 1728));
        assert_eq!(u.pcm.len(), (1728 - 360) * 16);
        assert_eq!(u.reason, EndReason::Stop);
        assert_eq!(feed.seg.stop(), None);

        // A stop during a short burst discards it.
        let mut feed = Feed::new(Mode::Auto);
        feed.run(SILENT, 30).run(VOICED, 4);
        assert_eq!(
            feed.seg.stop(),
            Some(Event::Discarded {
                reason: DiscardReason::SpeechTooShort { speech_ms: 128 }
            })
        );
    }

    #[test]
    fn config_validation_rejects_what_new_clamps() {
        assert_eq!(SegmenterConfig::default().validate(), Ok(()));
        let bad = SegmenterConfig {
            threshold: 0.2,
            threshold_low: 0.4,
            ..SegmenterConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = SegmenterConfig {
            window: 0,
            min_voiced_in_window: 9,
            max_utterance_ms: 10,
            ..SegmenterConfig::default()
        };
        assert!(bad.validate().is_err());
        let seg = Segmenter::new(bad, Mode::Auto);
        assert_eq!(seg.config().window, 1);
        assert_eq!(seg.config().min_voiced_in_window, 1);
        assert_eq!(seg.config().max_utterance_ms, 600 + 2 * 32);
    }
}
