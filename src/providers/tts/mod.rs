//! Text-to-speech on inference workers: Piper voices on ONNX Runtime for the languages they
//! speak, espeak-ng for the rest, or Kokoro-82M for Chinese and English.
//!
//! A session sends each piece of reply text as a [`TtsJob`] to a [`TtsWorker`] (a
//! `shards::BatchWorker` on a pinned inference core) and gets a [`TtsReply`] with mono PCM
//! at the engine's rate (22050 Hz); resampling to the downlink rate and Opus encoding are
//! `crate::audio`'s job. `text` cleans and splits the text, `espeak` wraps libespeak-ng
//! (phonemes for Piper, and direct synthesis), `piper` runs the model, `kokoro` runs Kokoro on
//! phoneme strings from `zh` (the Mandarin front end) or espeak-ng, `worker` ties them to the
//! job/result types.

pub mod espeak;
pub mod kokoro;
pub mod openai;
pub mod piper;
pub mod text;
pub mod worker;
pub mod zh;

use std::path::PathBuf;

use crate::providers::onnx::OnnxRuntimeError;

pub use kokoro::{KokoroModel, KokoroStats};
pub use piper::{PiperConfig, PiperStats, PiperVoice};
pub use worker::{KokoroSettings, TtsAudio, TtsEngine, TtsJob, TtsReply, TtsWorker};

/// Why a voice could not be loaded or a text not synthesised.
#[derive(Debug, thiserror::Error)]
pub enum TtsError {
    /// libespeak-ng could not be initialised (library data missing).
    #[error("espeak-ng unavailable: {0}")]
    EspeakInit(String),
    /// espeak-ng does not know the voice.
    #[error("espeak-ng has no voice {0:?}")]
    UnknownVoice(String),
    /// An espeak-ng call failed, or the text cannot be passed to it.
    #[error("espeak-ng failed: {0}")]
    Espeak(String),
    /// The process-wide ONNX Runtime could not be loaded.
    #[error(transparent)]
    Runtime(#[from] OnnxRuntimeError),
    /// The Piper model or its `.json` config is missing.
    #[error("Piper voice file not found at {}; run `make setup`", .0.display())]
    ModelMissing(PathBuf),
    /// The Piper model or config is unusable.
    #[error("could not load Piper voice {}: {}", .0.display(), .1)]
    ModelLoad(PathBuf, String),
    /// A Piper forward pass failed.
    #[error("Piper inference failed: {0}")]
    Inference(String),
    /// A Piper job reached a worker that has no Piper voice.
    #[error("no Piper voice is loaded")]
    NoPiperVoice,
    /// A Kokoro job reached a worker that has no Kokoro model.
    #[error("no Kokoro model is loaded")]
    NoKokoro,
    /// The Kokoro voice is not loaded (or its name is not a voice file name).
    #[error("Kokoro has no voice {0:?} (installed: models/kokoro/voices/*.bin)")]
    UnknownKokoroVoice(String),
}

/// Model paths and a shared voice for the tests of this module.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    use super::PiperVoice;

    pub fn models_dir() -> PathBuf {
        std::env::var_os("XIAOZHI_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
    }

    pub fn runtime_lib() -> PathBuf {
        models_dir().join("onnxruntime/libonnxruntime.so.1.31.1")
    }

    /// The English Piper voice, or `None` (with a message) when it or the runtime is absent.
    pub fn voice_or_skip() -> Option<PiperVoice> {
        let lib = runtime_lib();
        let model = models_dir().join("piper/en_US-joe-medium.onnx");
        for path in [&lib, &model] {
            if !path.is_file() {
                eprintln!("SKIPPED: {} is absent (run `make setup`)", path.display());
                return None;
            }
        }
        Some(PiperVoice::load(&lib, &model).expect("load the Piper voice"))
    }
}
