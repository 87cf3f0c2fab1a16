//! The top-level `language` key: which Whisper model, recognition language and local voices the
//! embedded default uses, resolved once at load; explicit keys win.

use serde::{Deserialize, Serialize};

use super::{Config, TtsProvider};

/// The language of the embedded default (top-level `language`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// English: Whisper tiny.en, Piper (Chinese text, if any, via espeak-ng).
    En,
    /// Mandarin: Whisper base fixed to Chinese, Kokoro's Mandarin voice (English words and
    /// sentences via Piper).
    Zh,
    /// Both: Whisper base detecting between Chinese and English, Kokoro's Mandarin voice for
    /// Chinese replies and Piper for English ones.
    #[default]
    Auto,
}

impl Language {
    /// The Whisper model folder this language needs.
    pub fn whisper_model(self) -> &'static str {
        match self {
            Language::En => "whisper-tiny.en",
            Language::Zh | Language::Auto => "whisper-base",
        }
    }

    /// The Whisper language setting: one code, or the list detection chooses from.
    pub fn whisper_language(self) -> &'static str {
        match self {
            Language::En => "en",
            Language::Zh => "zh",
            Language::Auto => "zh,en",
        }
    }

    /// Whether a reply with nothing to go by (no user text) is in Chinese.
    pub fn prefers_chinese(self) -> bool {
        self == Language::Zh
    }
}

/// The local speech engines the TTS workers load and which text each speaks (from
/// `tts.provider` and `language`; [`Config::local_tts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTtsPlan {
    /// Load the Piper voice (`tts.piper_model`); it speaks text without Chinese characters
    /// unless `kokoro_en` is set.
    pub piper: bool,
    /// Kokoro voice for text with Chinese characters (else espeak-ng's Chinese voice).
    pub kokoro_zh: Option<String>,
    /// Kokoro voice for other text (else Piper, else espeak-ng).
    pub kokoro_en: Option<String>,
}

impl Config {
    /// Fills the keys left to the top-level `language` (an empty `asr.whisper.model` or
    /// `asr.whisper.language`); explicit values stay.
    pub(super) fn resolve_language(&mut self) {
        let w = &mut self.asr.whisper;
        if w.model.is_empty() {
            w.model = self.language.whisper_model().into();
        }
        if w.language.is_empty() {
            w.language = self.language.whisper_language().into();
        }
    }

    /// The Whisper language setting for the worker: `None` = detect among all languages.
    pub fn whisper_language(&self) -> Option<String> {
        let l = self.asr.whisper.language.trim();
        (!l.is_empty() && l != "any").then(|| l.to_string())
    }

    /// The local speech engines, or `None` with a remote TTS provider.
    pub fn local_tts(&self) -> Option<LocalTtsPlan> {
        let k = &self.tts.kokoro;
        let plan = |piper, kokoro_zh: Option<&String>, kokoro_en: Option<&String>| {
            Some(LocalTtsPlan {
                piper,
                kokoro_zh: kokoro_zh.cloned(),
                kokoro_en: kokoro_en.cloned(),
            })
        };
        match (self.tts.provider, self.language) {
            (TtsProvider::Openai, _) => None,
            (TtsProvider::Piper, _) | (TtsProvider::Local, Language::En) => plan(true, None, None),
            (TtsProvider::Espeak, _) => plan(false, None, None),
            (TtsProvider::Kokoro, _) => plan(false, Some(&k.voice_zh), Some(&k.voice_en)),
            (TtsProvider::Local, Language::Zh | Language::Auto) => {
                plan(true, Some(&k.voice_zh), None)
            }
        }
    }
}
