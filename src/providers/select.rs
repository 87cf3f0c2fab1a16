//! Which provider does each job, decided once per shard: [`Providers`] holds, for ASR, LLM and
//! TTS, either a local engine (a queue into the inference cores' worker pool), a remote
//! OpenAI-compatible endpoint (its settings with the API key resolved once, at start), or the
//! built-in offline responder. The connection wing only matches on these values; the
//! language-based choice of a local voice lives here too ([`LocalVoices::engine_for`]).

use shards::{TickBatch, WorkerPool};
use std::rc::Rc;

use crate::providers::asr::openai::OpenAiAsrSettings;
use crate::providers::asr::AsrJob;
use crate::providers::http_client::HttpClient;
use crate::providers::llm::openai::OpenAiSettings;
use crate::providers::tts::openai::OpenAiTtsSettings;
use crate::providers::tts::{TtsEngine, TtsJob};
use crate::providers::vad::VadJob;

/// Speech recognition.
pub enum Asr {
    /// Whisper on the inference cores.
    Local(WorkerPool<AsrJob>),
    /// `POST /audio/transcriptions` from the shard.
    Remote(Rc<OpenAiAsrSettings>),
}

/// The language model.
pub enum Llm {
    /// The built-in responder (greetings, time, device commands, echo); no model.
    Offline,
    /// Streaming chat completions from the shard.
    Remote(Rc<OpenAiSettings>),
}

/// Speech synthesis.
pub enum Tts {
    /// Piper / espeak-ng on the inference cores.
    Local {
        /// The TTS workers' queue.
        pool: WorkerPool<TtsJob>,
        /// Which local engine speaks which text.
        voices: LocalVoices,
    },
    /// `POST /audio/speech` from the shard.
    Remote(Rc<OpenAiTtsSettings>),
}

/// The local engines and how a text picks one.
#[derive(Debug, Clone)]
pub struct LocalVoices {
    /// Kokoro voice for text with Chinese characters (else espeak-ng's Chinese voice).
    pub kokoro_zh: Option<String>,
    /// Kokoro voice for other text (else Piper, else espeak-ng).
    pub kokoro_en: Option<String>,
    /// A Piper voice is loaded (it speaks non-Chinese text).
    pub piper: bool,
    /// espeak-ng voice for text without a Piper voice.
    pub espeak: String,
    /// espeak-ng voice for Chinese text.
    pub espeak_zh: String,
}

impl LocalVoices {
    /// The engine for `text`. Chinese text (any CJK ideograph) goes to Kokoro's Chinese voice
    /// when one is loaded, else to espeak-ng's Chinese voice (the Piper voice is English only);
    /// Kokoro reads the English words inside it. Other text goes to Kokoro's other voice when
    /// set, else to Piper when loaded, else to espeak-ng.
    pub fn engine_for(&self, text: &str) -> TtsEngine {
        let (kokoro, chinese) = if crate::lang::has_cjk(text) {
            (&self.kokoro_zh, true)
        } else {
            (&self.kokoro_en, false)
        };
        if let Some(voice) = kokoro {
            TtsEngine::Kokoro {
                voice: voice.clone(),
            }
        } else if chinese {
            TtsEngine::Espeak {
                voice: self.espeak_zh.clone(),
            }
        } else if self.piper {
            TtsEngine::Piper
        } else {
            TtsEngine::Espeak {
                voice: self.espeak.clone(),
            }
        }
    }
}

/// One shard's providers (built once per shard from the config and the inference queues, by
/// `crate::connection::settings::providers`; this module does not read the config).
pub struct Providers {
    /// Voice activity detection (always local): this shard's jobs gathered for its next tick
    /// (the shard's flusher sends them to its worker as one batch).
    pub vad: Rc<TickBatch<VadJob>>,
    /// Speech recognition.
    pub asr: Asr,
    /// The language model.
    pub llm: Llm,
    /// Speech synthesis.
    pub tts: Tts,
    /// The shard's HTTP client (keep-alive pool) for the remote ones.
    pub http: Rc<HttpClient>,
}

/// The inference queues a shard can use (as started by `crate::inference::start`).
pub struct LocalQueues {
    /// The shard's VAD gatherer.
    pub vad: Rc<TickBatch<VadJob>>,
    /// Whisper, when started.
    pub asr: Option<WorkerPool<AsrJob>>,
    /// Piper/espeak-ng, when started.
    pub tts: Option<WorkerPool<TtsJob>>,
}

impl Providers {
    /// Whether the built-in responder answers (no LLM call).
    pub fn offline_llm(&self) -> bool {
        matches!(self.llm, Llm::Offline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chinese_text_goes_to_the_chinese_voice_and_other_text_to_piper_when_loaded() {
        let v = LocalVoices {
            kokoro_zh: None,
            kokoro_en: None,
            piper: true,
            espeak: "en-us".into(),
            espeak_zh: "cmn".into(),
        };
        assert_eq!(v.engine_for("Hello there."), TtsEngine::Piper);
        assert_eq!(
            v.engine_for("你好，world"),
            TtsEngine::Espeak {
                voice: "cmn".into()
            }
        );
        let no_piper = LocalVoices {
            piper: false,
            ..v.clone()
        };
        assert_eq!(
            no_piper.engine_for("Hello"),
            TtsEngine::Espeak {
                voice: "en-us".into()
            }
        );
        let kokoro = LocalVoices {
            kokoro_zh: Some("zf_xiaoxiao".into()),
            kokoro_en: Some("af_heart".into()),
            ..v.clone()
        };
        assert_eq!(
            kokoro.engine_for("今天天气很好"),
            TtsEngine::Kokoro {
                voice: "zf_xiaoxiao".into()
            }
        );
        assert_eq!(
            kokoro.engine_for("Hello"),
            TtsEngine::Kokoro {
                voice: "af_heart".into()
            }
        );
        // The Mandarin default: Kokoro for Chinese, Piper for English.
        let mixed = LocalVoices {
            kokoro_zh: Some("zf_xiaoxiao".into()),
            ..v
        };
        assert_eq!(
            mixed.engine_for("现在几点"),
            TtsEngine::Kokoro {
                voice: "zf_xiaoxiao".into()
            }
        );
        assert_eq!(mixed.engine_for("It is three o'clock."), TtsEngine::Piper);
    }
}
