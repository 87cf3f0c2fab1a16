//! Piper (VITS) voices on ONNX Runtime, with phonemes from libespeak-ng.
//!
//! A voice is an `.onnx` model plus its `.onnx.json` config: the espeak-ng voice that
//! phonemises its language, the `phoneme_id_map` from IPA characters to token ids, the output
//! sample rate and the inference scales. Text is synthesised one sentence per forward pass:
//! each clause is phonemised, closed with its punctuation, and the sentence becomes the token
//! sequence `^ _ (p _)* $`. Sentences are joined with [`SENTENCE_SILENCE`].
//!
//! The session runs on one intra-op thread without spinning, so a forward pass stays on the
//! calling (pinned) inference thread. ONNX Runtime itself is the process-wide environment
//! created by [`crate::providers::onnx::init_runtime`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ort::environment::Environment;
use ort::value::{Tensor, TensorRef};
use serde::Deserialize;

use super::text::{self, Clause};
use super::{espeak, TtsError};
use crate::providers::onnx::{init_runtime, runtime, OnnxSession};

/// Silence inserted between two sentences (Piper's default).
pub const SENTENCE_SILENCE: Duration = Duration::from_millis(200);

/// The parts of a Piper `.onnx.json` this module uses; other fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct PiperConfig {
    /// Output audio format.
    pub audio: AudioConfig,
    /// Which espeak-ng voice phonemises the text.
    pub espeak: EspeakConfig,
    /// Default inference scales.
    pub inference: InferenceConfig,
    /// Must be "espeak" (voices phonemised otherwise are not supported).
    #[serde(default = "espeak_phonemes")]
    pub phoneme_type: String,
    /// IPA character (one Unicode scalar) → token ids.
    pub phoneme_id_map: HashMap<String, Vec<i64>>,
    /// Speakers in a multi-speaker model; this module always uses speaker 0.
    #[serde(default)]
    pub num_speakers: u32,
}

/// `audio` section of the config.
#[derive(Debug, Clone, Deserialize)]
pub struct AudioConfig {
    /// Output sample rate in Hz (22050 for "medium" voices).
    pub sample_rate: u32,
}

/// `espeak` section of the config.
#[derive(Debug, Clone, Deserialize)]
pub struct EspeakConfig {
    /// espeak-ng voice name, e.g. "en-us".
    pub voice: String,
}

/// `inference` section of the config.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct InferenceConfig {
    /// Noise added to the prior (expressiveness); 0.667 by default.
    pub noise_scale: f32,
    /// Phoneme duration multiplier: above 1 is slower speech.
    pub length_scale: f32,
    /// Noise in the duration predictor; 0.8 by default.
    pub noise_w: f32,
}

fn espeak_phonemes() -> String {
    "espeak".into()
}

/// What one [`PiperVoice::synthesize`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PiperStats {
    /// Forward passes (one per sentence).
    pub sentences: usize,
    /// Tokens fed to the model in total.
    pub phoneme_ids: usize,
    /// IPA characters missing from the voice's `phoneme_id_map`, skipped.
    pub unknown_phonemes: usize,
}

/// One loaded Piper voice: an ONNX Runtime session and its config.
pub struct PiperVoice {
    session: OnnxSession,
    config: PiperConfig,
    /// Token ids of `^`, `_` and `$`.
    bos: Vec<i64>,
    pad: Vec<i64>,
    eos: Vec<i64>,
    /// Whether the model takes a speaker id (`sid`) input.
    multi_speaker: bool,
    ids: Vec<i64>,
}

impl PiperVoice {
    /// Loads `model` and `<model>.json` in the ONNX Runtime environment created from the
    /// library `lib` (see [`init_runtime`]), and initialises espeak-ng.
    pub fn load(lib: &Path, model: &Path) -> Result<Self, TtsError> {
        init_runtime(lib)?;
        let env = runtime().ok_or_else(|| {
            TtsError::ModelLoad(model.to_path_buf(), "ONNX Runtime not initialised".into())
        })?;
        Self::load_in(env, model)
    }

    /// Loads `model` and its config in an existing environment.
    pub fn load_in(env: &Environment, model: &Path) -> Result<Self, TtsError> {
        let mut json = model.as_os_str().to_owned();
        json.push(".json");
        let json = PathBuf::from(json);
        for path in [model, json.as_path()] {
            if !path.is_file() {
                return Err(TtsError::ModelMissing(path.to_path_buf()));
            }
        }
        let load_error = |e: String| TtsError::ModelLoad(model.to_path_buf(), e);
        let config = read_config(&json).map_err(load_error)?;
        if config.phoneme_type != "espeak" {
            return Err(load_error(format!(
                "phoneme_type {:?} is not supported (only \"espeak\")",
                config.phoneme_type
            )));
        }
        let symbol = |s: &str| -> Result<Vec<i64>, TtsError> {
            match config.phoneme_id_map.get(s) {
                Some(ids) if !ids.is_empty() => Ok(ids.clone()),
                _ => Err(load_error(format!("phoneme_id_map has no {s:?}"))),
            }
        };
        let (bos, pad, eos) = (symbol("^")?, symbol("_")?, symbol("$")?);
        espeak::init()?;
        let session = crate::providers::onnx::single_thread_session(env, model)
            .map_err(|e| load_error(e.to_string()))?;
        let multi_speaker = check_signature(&session).map_err(load_error)?;
        tracing::info!(
            model = %model.display(),
            voice = %config.espeak.voice,
            sample_rate = config.audio.sample_rate,
            "Piper voice loaded"
        );
        Ok(PiperVoice {
            session,
            config,
            bos,
            pad,
            eos,
            multi_speaker,
            ids: Vec::new(),
        })
    }

    /// Output sample rate in Hz.
    pub fn sample_rate(&self) -> u32 {
        self.config.audio.sample_rate
    }

    /// The voice's config.
    pub fn config(&self) -> &PiperConfig {
        &self.config
    }

    /// The IPA phoneme string of one sentence: each clause's phonemes followed by its
    /// punctuation, clauses separated by a space.
    pub fn sentence_phonemes(&self, clauses: &[Clause<'_>]) -> Result<String, TtsError> {
        let mut out = String::new();
        for (i, clause) in clauses.iter().enumerate() {
            let ipa = espeak::phonemize(&self.config.espeak.voice, clause.text)?;
            if ipa.is_empty() {
                continue;
            }
            if i > 0 && !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&ipa);
            out.push(clause.end);
        }
        Ok(out)
    }

    /// Appends `^ _ (p _)* $` token ids for `phonemes` to `ids`; returns how many characters
    /// were skipped because the voice has no id for them.
    pub fn phoneme_ids(&self, phonemes: &str, ids: &mut Vec<i64>) -> usize {
        let mut unknown = 0;
        let mut buf = [0u8; 4];
        ids.extend_from_slice(&self.bos);
        ids.extend_from_slice(&self.pad);
        for c in phonemes.chars() {
            match self.config.phoneme_id_map.get(&*c.encode_utf8(&mut buf)) {
                Some(p) => {
                    ids.extend_from_slice(p);
                    ids.extend_from_slice(&self.pad);
                }
                None => unknown += 1,
            }
        }
        ids.extend_from_slice(&self.eos);
        unknown
    }

    /// Synthesises `text` (already cleaned, see [`text::clean`]) and appends 16-bit PCM at
    /// [`Self::sample_rate`] to `pcm`. Text with nothing to pronounce appends nothing.
    pub fn synthesize(&mut self, text: &str, pcm: &mut Vec<i16>) -> Result<PiperStats, TtsError> {
        let mut stats = PiperStats::default();
        let gap = (self.sample_rate() as u128 * SENTENCE_SILENCE.as_millis() / 1000) as usize;
        for sentence in text::sentences(text) {
            let phonemes = self.sentence_phonemes(&sentence)?;
            if text::is_silent(&phonemes) {
                continue;
            }
            let mut ids = std::mem::take(&mut self.ids);
            ids.clear();
            stats.unknown_phonemes += self.phoneme_ids(&phonemes, &mut ids);
            stats.phoneme_ids += ids.len();
            stats.sentences += 1;
            if stats.sentences > 1 {
                pcm.resize(pcm.len() + gap, 0);
            }
            let outcome = self.forward(&ids, pcm);
            self.ids = ids;
            outcome?;
        }
        if stats.unknown_phonemes > 0 {
            tracing::debug!(
                unknown = stats.unknown_phonemes,
                "phonemes missing from the Piper voice were skipped"
            );
        }
        Ok(stats)
    }

    /// One forward pass over `ids`; appends the audio as i16 to `pcm`.
    fn forward(&mut self, ids: &[i64], pcm: &mut Vec<i16>) -> Result<(), TtsError> {
        self.forward_ort(ids, pcm).map_err(TtsError::Inference)
    }

    fn forward_ort(&mut self, ids: &[i64], pcm: &mut Vec<i16>) -> Result<(), String> {
        let err = |e: ort::Error| e.to_string();
        let inf = self.config.inference;
        let input = TensorRef::from_array_view(([1usize, ids.len()], ids)).map_err(err)?;
        let lengths = Tensor::from_array(([1usize], vec![ids.len() as i64])).map_err(err)?;
        let scales = Tensor::from_array((
            [3usize],
            vec![inf.noise_scale, inf.length_scale, inf.noise_w],
        ))
        .map_err(err)?;
        let out = if self.multi_speaker {
            let sid = Tensor::from_array(([1usize], vec![0i64])).map_err(err)?;
            self.session.run(ort::inputs![
                "input" => input,
                "input_lengths" => lengths,
                "scales" => scales,
                "sid" => sid,
            ])
        } else {
            self.session.run(ort::inputs![
                "input" => input,
                "input_lengths" => lengths,
                "scales" => scales,
            ])
        }
        .map_err(err)?;
        let (_, audio) = out
            .get("output")
            .ok_or("no `output` tensor")?
            .try_extract_tensor::<f32>()
            .map_err(err)?;
        pcm.extend(audio.iter().map(|&x| to_i16(x)));
        Ok(())
    }
}

/// A float sample in [-1, 1] as 16-bit PCM, clipped.
fn to_i16(x: f32) -> i16 {
    (x * 32767.0).round().clamp(-32768.0, 32767.0) as i16
}

fn read_config(path: &Path) -> Result<PiperConfig, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Checks Piper's inputs and outputs; returns whether the model also takes `sid`.
fn check_signature(session: &OnnxSession) -> Result<bool, String> {
    let (inputs, outputs) = crate::providers::onnx::io_names(session);
    for want in ["input", "input_lengths", "scales"] {
        if !inputs.iter().any(|n| n == want) {
            return Err(format!(
                "inputs are {inputs:?}, expected input, input_lengths, scales (and sid)"
            ));
        }
    }
    if !outputs.iter().any(|n| n == "output") {
        return Err(format!("outputs are {outputs:?}, expected output"));
    }
    Ok(inputs.iter().any(|n| n == "sid"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::tts::testing::voice_or_skip;

    #[test]
    fn token_ids_are_bos_pad_each_phoneme_then_eos_and_unknowns_are_counted() {
        let Some(voice) = voice_or_skip() else {
            return;
        };
        let map = &voice.config().phoneme_id_map;
        let id = |s: &str| map[s][0];
        let mut ids = Vec::new();
        let unknown = voice.phoneme_ids("hə☃!", &mut ids);
        assert_eq!(unknown, 1);
        assert_eq!(
            ids,
            [
                id("^"),
                id("_"),
                id("h"),
                id("_"),
                id("ə"),
                id("_"),
                id("!"),
                id("_"),
                id("$")
            ]
        );
    }

    #[test]
    fn sentence_phonemes_carry_clause_punctuation() {
        let Some(voice) = voice_or_skip() else {
            return;
        };
        let sentences = text::sentences("Hello, world!");
        let ipa = voice.sentence_phonemes(&sentences[0]).expect("phonemes");
        assert!(ipa.ends_with("d!"), "{ipa}");
        assert!(ipa.contains(", "), "{ipa}");
        let mut ids = Vec::new();
        assert_eq!(voice.phoneme_ids(&ipa, &mut ids), 0, "{ipa}");
    }

    #[test]
    fn missing_model_is_reported_not_panicked() {
        let env_lib = crate::providers::tts::testing::runtime_lib();
        if !env_lib.is_file() {
            eprintln!(
                "SKIPPED: {} is absent (run `make setup`)",
                env_lib.display()
            );
            return;
        }
        let err = PiperVoice::load(&env_lib, Path::new("/nonexistent/voice.onnx"))
            .err()
            .expect("missing model must fail");
        assert!(matches!(err, TtsError::ModelMissing(_)), "{err}");
    }
}
