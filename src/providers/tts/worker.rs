//! The TTS inference worker: turns [`TtsJob`]s (one sentence or so of reply text) into PCM.
//!
//! Jobs run one after another in arrival order, so a session's sentences come back in the
//! order it submitted them. A failed job becomes a [`TtsReply`] with an `Err` result, never a
//! panic, and text with nothing to pronounce (whitespace, emoji, Markdown symbols) becomes an
//! empty result without error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use shards::{BatchWorker, Routed};

use super::kokoro::{self, KokoroModel, KokoroStats};
use super::piper::PiperVoice;
use super::{espeak, text, zh, TtsError};
use crate::providers::reply::{Reply, Timings};

/// espeak-ng voice that phonemises English for Kokoro (alone, or inside Chinese text).
const KOKORO_ENGLISH_ESPEAK: &str = "en-us";

/// Which synthesiser reads a job's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtsEngine {
    /// The worker's Piper voice (English `en_US-joe-medium` in the default set-up).
    Piper,
    /// espeak-ng with the named voice (e.g. "cmn" for Mandarin): the fallback for languages
    /// the Piper voice cannot speak.
    Espeak {
        /// espeak-ng voice name.
        voice: String,
    },
    /// The worker's Kokoro model with the named voice (e.g. "zf_xiaoxiao"): text with Hanzi
    /// goes through the Mandarin front end (English words inside it through espeak-ng), other
    /// text is read as English from espeak-ng's phonemes.
    Kokoro {
        /// Kokoro voice name (a file in `models/kokoro/voices/`).
        voice: String,
    },
}

/// Where Kokoro's files are and how it speaks.
#[derive(Debug, Clone, PartialEq)]
pub struct KokoroSettings {
    /// Folder with `kokoro-v1.0.int8.onnx`, `vocab.json` and `voices/`.
    pub dir: PathBuf,
    /// Voices to load (jobs naming another voice fail).
    pub voices: Vec<String>,
    /// Speaking rate: 1.0 normal, above 1 faster.
    pub speed: f32,
}

/// A loaded Kokoro model and its speaking rate.
struct KokoroEngine {
    model: KokoroModel,
    speed: f32,
    audio: Vec<f32>,
}

/// A piece of reply text to synthesise.
#[derive(Debug, Clone)]
pub struct TtsJob {
    /// Session the reply belongs to.
    pub session: u64,
    /// Turn the reply belongs to, echoed so stale audio can be dropped.
    pub turn: u32,
    /// Position of this piece within the turn's reply, echoed.
    pub seq: u32,
    /// The text, possibly with emoji and Markdown (they are removed before synthesis).
    pub text: String,
    /// Which synthesiser reads it.
    pub engine: TtsEngine,
    /// When the session queued the job.
    pub submitted: Instant,
}

/// The audio of one [`TtsJob`], sent back inside a [`TtsReply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtsAudio {
    /// Mono 16-bit PCM; empty when there was nothing to say.
    pub pcm: Vec<i16>,
    /// Sample rate of `pcm` (22050 Hz for both Piper medium voices and espeak-ng, 24000 Hz for
    /// Kokoro).
    pub sample_rate: u32,
}

/// A TTS worker's answer to one [`TtsJob`] (`seq` is the job's `seq`).
pub type TtsReply = Reply<TtsAudio>;

/// An inference-core worker synthesising speech with an optional Piper voice, an optional
/// Kokoro model, and espeak-ng.
pub struct TtsWorker {
    piper: Option<PiperVoice>,
    kokoro: Option<KokoroEngine>,
}

impl TtsWorker {
    /// A worker using `piper` for [`TtsEngine::Piper`] jobs (without one, such jobs fail) and
    /// espeak-ng for [`TtsEngine::Espeak`] jobs.
    pub fn new(piper: Option<PiperVoice>) -> Self {
        TtsWorker {
            piper,
            kokoro: None,
        }
    }

    /// Initialises espeak-ng (phonemes for Piper and Kokoro's English, and the fallback voice)
    /// and loads, in the ONNX Runtime environment created from `lib`, the Piper voice
    /// `piper_model` and Kokoro with `kokoro.voices`, each when given (without one, jobs for
    /// that engine fail). Building Kokoro's Mandarin segmenter is part of its load. Call it on
    /// the worker's own thread.
    pub fn load(
        lib: &Path,
        piper_model: Option<&Path>,
        kokoro: Option<&KokoroSettings>,
    ) -> Result<Self, TtsError> {
        espeak::init()?;
        let piper = piper_model
            .map(|model| PiperVoice::load(lib, model))
            .transpose()?;
        let kokoro = match kokoro {
            Some(settings) => {
                zh::warm_up();
                let voices: Vec<&str> = settings.voices.iter().map(String::as_str).collect();
                Some(KokoroEngine {
                    model: KokoroModel::load(lib, &settings.dir, &voices)?,
                    speed: settings.speed,
                    audio: Vec::new(),
                })
            }
            None => None,
        };
        Ok(TtsWorker { piper, kokoro })
    }

    /// Whether [`TtsEngine::Piper`] jobs can be served.
    pub fn has_piper(&self) -> bool {
        self.piper.is_some()
    }

    /// Speech for `text` with `engine`: PCM and its sample rate. Emoji and Markdown symbols
    /// are removed first; nothing to pronounce gives empty PCM.
    pub fn synthesize(
        &mut self,
        text: &str,
        engine: &TtsEngine,
    ) -> Result<(Vec<i16>, u32), TtsError> {
        let cleaned = text::clean(text);
        let silent = text::is_silent(&cleaned);
        match engine {
            TtsEngine::Piper => {
                let voice = self.piper.as_mut().ok_or(TtsError::NoPiperVoice)?;
                let mut pcm = Vec::new();
                if !silent {
                    voice.synthesize(&cleaned, &mut pcm)?;
                }
                Ok((pcm, voice.sample_rate()))
            }
            TtsEngine::Espeak { voice } => {
                let rate = espeak::sample_rate()?;
                if silent {
                    return Ok((Vec::new(), rate));
                }
                Ok((espeak::synthesize(voice, &cleaned)?, rate))
            }
            TtsEngine::Kokoro { voice } => {
                let engine = self.kokoro.as_mut().ok_or(TtsError::NoKokoro)?;
                let mut pcm = Vec::new();
                if !silent {
                    engine.synthesize(&cleaned, voice, &mut pcm)?;
                }
                Ok((pcm, kokoro::SAMPLE_RATE))
            }
        }
    }

    fn run(&mut self, job: TtsJob) -> TtsReply {
        let start = Instant::now();
        let outcome = self.synthesize(&job.text, &job.engine);
        let done = Instant::now();
        let result = match outcome {
            Ok((pcm, sample_rate)) => Ok(TtsAudio { pcm, sample_rate }),
            Err(e) => {
                tracing::warn!(session = job.session, turn = job.turn, seq = job.seq, error = %e, "TTS failed");
                Err(e.to_string())
            }
        };
        Reply {
            session: job.session,
            turn: job.turn,
            seq: u64::from(job.seq),
            timings: Timings::new(job.submitted, start, done),
            result,
        }
    }
}

impl KokoroEngine {
    /// Reads `text` with `voice` and appends 16-bit PCM at 24 kHz to `pcm`.
    fn synthesize(&mut self, text: &str, voice: &str, pcm: &mut Vec<i16>) -> Result<(), TtsError> {
        let phonemes = kokoro_phonemes(text)?;
        self.audio.clear();
        let stats: KokoroStats =
            self.model
                .synthesize(&phonemes, voice, self.speed, &mut self.audio)?;
        if stats.unknown_symbols > 0 {
            tracing::warn!(
                unknown = stats.unknown_symbols,
                symbols = ?stats.unknown,
                "Kokoro skipped phoneme symbols missing from its vocabulary"
            );
        }
        pcm.extend(self.audio.iter().map(|&x| to_i16(x)));
        Ok(())
    }
}

/// The Kokoro phoneme string of `text`: the Mandarin front end when it has Hanzi (English
/// words inside it from espeak-ng), else English from espeak-ng clause by clause with the
/// clause punctuation kept (Kokoro pauses on it).
pub fn kokoro_phonemes(text: &str) -> Result<String, TtsError> {
    let english = |run: &str| -> Result<String, TtsError> {
        Ok(kokoro::from_espeak_ipa(&espeak::phonemize(
            KOKORO_ENGLISH_ESPEAK,
            run,
        )?))
    };
    if zh::has_hanzi(text) {
        let out = zh::phonemize(text, &english)?;
        if out.stats.unreadable > 0 {
            tracing::debug!(
                unreadable = out.stats.unreadable,
                "Mandarin front end could not read some characters"
            );
        }
        return Ok(out.phonemes);
    }
    let mut out = String::new();
    for sentence in text::sentences(text) {
        for clause in sentence {
            let ipa = english(clause.text)?;
            if ipa.is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&ipa);
            out.push(clause.end);
        }
    }
    Ok(out)
}

/// A float sample in [-1, 1] as 16-bit PCM, clipped.
fn to_i16(x: f32) -> i16 {
    (x * 32767.0).round().clamp(-32768.0, 32767.0) as i16
}

impl BatchWorker for TtsWorker {
    type Job = TtsJob;
    type Output = TtsReply;

    fn process(&mut self, jobs: &mut Vec<Routed<TtsJob>>, out: &mut Vec<Routed<TtsReply>>) {
        for job in jobs.drain(..) {
            let item = self.run(job.item);
            out.push(Routed {
                shard: job.shard,
                item,
            });
        }
    }

    fn skipped(&mut self, job: Routed<TtsJob>) -> Option<Routed<TtsReply>> {
        let j = job.item;
        Some(Routed {
            shard: job.shard,
            item: Reply::cancelled(j.session, j.turn, u64::from(j.seq), j.submitted),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::tts::testing::voice_or_skip;

    fn job(seq: u32, text: &str, engine: TtsEngine) -> Routed<TtsJob> {
        Routed {
            shard: seq as usize % 2,
            item: TtsJob {
                session: 42,
                turn: 3,
                seq,
                text: text.into(),
                engine,
                submitted: Instant::now(),
            },
        }
    }

    fn rms(pcm: &[i16]) -> f64 {
        let sum: f64 = pcm.iter().map(|&s| f64::from(s).powi(2)).sum();
        (sum / pcm.len().max(1) as f64).sqrt()
    }

    fn run(worker: &mut TtsWorker, jobs: Vec<Routed<TtsJob>>) -> Vec<Routed<TtsReply>> {
        let mut jobs = jobs;
        let mut out = Vec::new();
        worker.process(&mut jobs, &mut out);
        assert!(jobs.is_empty());
        out
    }

    #[test]
    fn piper_reads_a_short_english_reply_in_one_to_four_seconds() {
        let Some(voice) = voice_or_skip() else {
            return;
        };
        let mut worker = TtsWorker::new(Some(voice));
        let out = run(
            &mut worker,
            vec![job(
                0,
                "Hello! The kitchen lights are on.",
                TtsEngine::Piper,
            )],
        );
        let reply = &out[0].item;
        let r = reply.result.as_ref().expect("no error");
        assert_eq!(r.sample_rate, 22_050);
        let secs = r.pcm.len() as f64 / 22_050.0;
        let level = rms(&r.pcm);
        eprintln!(
            "piper: {secs:.2} s of audio in {:?}, rms {level:.0}",
            reply.timings.compute
        );
        assert!((1.0..=4.0).contains(&secs), "{secs} s");
        assert!(level > 500.0, "rms {level}");
    }

    #[test]
    fn espeak_mandarin_voice_reads_chinese() {
        let mut worker = TtsWorker::new(None);
        let out = run(
            &mut worker,
            vec![job(
                0,
                "你好",
                TtsEngine::Espeak {
                    voice: "cmn".into(),
                },
            )],
        );
        let reply = &out[0].item;
        let r = reply.result.as_ref().expect("no error");
        assert_eq!(r.sample_rate, 22_050);
        let secs = r.pcm.len() as f64 / 22_050.0;
        eprintln!(
            "espeak cmn: {secs:.2} s in {:?}, rms {:.0}",
            reply.timings.compute,
            rms(&r.pcm)
        );
        assert!(secs > 0.2, "{secs} s");
        assert!(rms(&r.pcm) > 300.0);
    }

    #[test]
    fn emoji_only_job_gives_empty_audio_and_no_error() {
        let mut worker = TtsWorker::new(voice_or_skip());
        let engines = [
            TtsEngine::Espeak {
                voice: "en-us".into(),
            },
            TtsEngine::Piper,
        ];
        for engine in engines {
            if engine == TtsEngine::Piper && !worker.has_piper() {
                continue;
            }
            let out = run(&mut worker, vec![job(0, "😀🎉 ** ##", engine.clone())]);
            let r = out[0].item.result.as_ref().expect("no error");
            assert!(r.pcm.is_empty(), "{engine:?}");
            assert_eq!(r.sample_rate, 22_050, "{engine:?}");
        }
    }

    #[test]
    fn kokoro_job_without_a_model_fails_with_a_clear_error() {
        let mut worker = TtsWorker::new(None);
        let engine = TtsEngine::Kokoro {
            voice: "zf_xiaoxiao".into(),
        };
        let out = run(&mut worker, vec![job(0, "你好", engine)]);
        assert_eq!(
            out[0].item.result.as_ref().err().map(String::as_str),
            Some("no Kokoro model is loaded")
        );
    }

    #[test]
    fn kokoro_phonemes_read_chinese_with_english_words_and_plain_english() {
        let zh = kokoro_phonemes("我用iPhone打电话。").expect("phonemes");
        assert!(zh.starts_with("wo↓jʊ↘ŋ ˈI fˈOn "), "{zh}");
        assert!(zh.contains("ˈI"), "English word via espeak-ng: {zh}");
        assert!(zh.ends_with('.'), "{zh}");
        let en = kokoro_phonemes("Hello, world!").expect("phonemes");
        assert_eq!(en, "həlˈO, wˈɜɹld!");
    }

    #[test]
    fn failures_become_error_results_in_job_order() {
        let mut worker = TtsWorker::new(None);
        let out = run(
            &mut worker,
            vec![
                job(0, "Hello.", TtsEngine::Piper),
                job(
                    1,
                    "hello",
                    TtsEngine::Espeak {
                        voice: "no-such-voice".into(),
                    },
                ),
                job(
                    2,
                    "hello",
                    TtsEngine::Espeak {
                        voice: "en-us".into(),
                    },
                ),
            ],
        );
        let seqs: Vec<u64> = out.iter().map(|r| r.item.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
        let shards: Vec<usize> = out.iter().map(|r| r.shard).collect();
        assert_eq!(shards, [0, 1, 0]);
        assert_eq!(
            out[0].item.result.as_ref().err().map(String::as_str),
            Some("no Piper voice is loaded")
        );
        assert_eq!(
            out[1].item.result.as_ref().err().map(String::as_str),
            Some("espeak-ng has no voice \"no-such-voice\"")
        );
        assert!(out[2]
            .item
            .result
            .as_ref()
            .is_ok_and(|audio| !audio.pcm.is_empty()));
        assert!(out.iter().all(|r| r.item.session == 42 && r.item.turn == 3));
    }
}
