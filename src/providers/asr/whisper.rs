//! Whisper speech recognition on CTranslate2 (through ct2rs), one utterance per job.
//!
//! [`WhisperWorker`] runs on an inference core fed by `shards::WorkerPool`. CTranslate2 does
//! not compute on the calling thread: loading a model starts one CTranslate2 worker thread per
//! replica, and each call blocks the caller until that thread is done. The worker therefore
//! loads exactly one replica with one intra-op thread, and pins that thread with
//! `cpu_core_offset` to the same core as the pool thread (which only computes the features and
//! then waits). Leaving `num_threads_per_replica` at its default starts four threads that fight
//! over one core and triples the latency (`shared/notes/http-on-glommio.md` §6).
//!
//! Jobs of a batch run one after another. Whisper pads every input to a 30 s window, so the
//! encoder costs the same for a 1 s command as for a 29 s one, and on one core a batch of B
//! windows costs B times one window: batching saves nothing and only holds back the first
//! result. The pool sends a batch's results after the whole batch, so an ASR pool should use
//! `max_batch: 1`.
//!
//! The worker drives CTranslate2's lower-level `sys::Whisper` with features from [`super::mel`]
//! rather than ct2rs's `Whisper::generate`, for three reasons: it reports the detected
//! language, it encodes the audio once when it also has to detect the language, and it gives
//! English-only (`*.en`) models their own prompt (`<|startoftranscript|><|notimestamps|>`, no
//! language or task token); ct2rs's multilingual-style prompt is what makes tiny.en int8 emit
//! a literal `<|notimestamps|>` (`shared/notes/crates-on-this-machine.md` §6).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ct2rs::sys::{ComputeType, Config, Device, StorageView, Whisper, WhisperOptions};
use ct2rs::tokenizers::hf;
use shards::{BatchWorker, Routed};

use crate::providers::reply::{Reply, Timings};

use super::mel::{LogMel, SAMPLE_RATE, WINDOW_FRAMES, WINDOW_SAMPLES};

/// Files CTranslate2 and the tokenizer read from a model directory.
const REQUIRED_FILES: [&str; 4] = [
    "model.bin",
    "config.json",
    "tokenizer.json",
    "vocabulary.txt",
];

/// A turn's utterance to transcribe.
#[derive(Debug)]
pub struct AsrJob {
    /// Session the audio belongs to.
    pub session: u64,
    /// Turn the audio belongs to, echoed so stale results can be dropped.
    pub turn: u32,
    /// 16 kHz mono PCM; only the first 30 s are transcribed.
    pub pcm: Vec<i16>,
    /// When the session queued the job.
    pub submitted: Instant,
}

/// A transcript as a worker sends it back inside an [`AsrReply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsrOutput {
    /// The transcript, trimmed, without special tokens; empty for empty audio.
    pub text: String,
    /// Language code (`"en"`, `"zh"`, …): the configured one, or the detected one when the
    /// settings leave it to the model.
    pub language: Option<String>,
    /// Length of the job's audio in milliseconds (before any cut to 30 s).
    pub audio_ms: u64,
}

/// A Whisper worker's answer to one [`AsrJob`] (`seq` is 0: one job per turn).
pub type AsrReply = Reply<AsrOutput>;

/// How to load and run a Whisper model.
#[derive(Debug, Clone)]
pub struct WhisperSettings {
    /// Directory with `model.bin`, `config.json`, `tokenizer.json` and `vocabulary.txt`.
    pub model_dir: PathBuf,
    /// Language to transcribe as: one code (`"zh"`) fixes it; `None` or `"auto"` detects it
    /// per utterance; a list (`"zh,en"`) detects it among those codes only, which is far more
    /// robust on short utterances. Detection needs a multilingual model; English-only (`*.en`)
    /// models always use `"en"`.
    pub language: Option<String>,
    /// Run with int8 weights (faster on CPU) instead of float32.
    pub int8: bool,
    /// CPU the CTranslate2 compute thread is pinned to (its `cpu_core_offset`).
    pub core: usize,
    /// Beam width; 1 is greedy decoding.
    pub beam_size: usize,
    /// Shortest encoder window, ms. The encoder sees the utterance plus 0.5 s of silence, but
    /// at least this much and at most 30 s (Whisper's training window, the default). Its cost
    /// is proportional to the window; too short a window makes the model guess.
    pub window_ms: u32,
    /// The script Chinese transcripts are written in.
    pub chinese_script: ChineseScript,
}

/// The script of Chinese transcripts. Whisper writes Mandarin in traditional or simplified
/// characters more or less at random (both were in its training data; a simplified-Chinese
/// prompt only makes simplified more likely), so its text is converted with OpenCC's tables
/// (`ferrous-opencc`, pure Rust, phrase-aware) on the inference core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChineseScript {
    /// Simplified characters (mainland China, Singapore; what the offline responder writes).
    #[default]
    Simplified,
    /// Traditional characters (Taiwan, Hong Kong).
    Traditional,
    /// As Whisper wrote it.
    AsHeard,
}

/// Why a Whisper model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum AsrError {
    /// The model directory does not exist.
    #[error("Whisper model directory {} not found; run `make setup` (scripts/setup.sh {group})", .dir.display())]
    ModelDirMissing {
        /// The configured directory.
        dir: PathBuf,
        /// The set-up group that installs it.
        group: &'static str,
    },
    /// A file the model needs is missing.
    #[error("Whisper model file {} is missing; run `make setup` (scripts/setup.sh {group})", .path.display())]
    ModelFileMissing {
        /// The missing file.
        path: PathBuf,
        /// The set-up group that installs it.
        group: &'static str,
    },
    /// The settings cannot work.
    #[error("Whisper settings: {0}")]
    Settings(String),
    /// CTranslate2 refused the model.
    #[error("could not load Whisper model {}: {reason}", .dir.display())]
    Load {
        /// The model directory.
        dir: PathBuf,
        /// CTranslate2's message.
        reason: String,
    },
    /// `tokenizer.json` could not be read.
    #[error("could not load Whisper tokenizer {}: {reason}", .path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizer's message.
        reason: String,
    },
    /// The configured language has no token in the model's vocabulary.
    #[error("Whisper model {} does not know language {language:?}", .dir.display())]
    UnknownLanguage {
        /// The model directory.
        dir: PathBuf,
        /// The configured code.
        language: String,
    },
    /// Feature preparation, language detection or decoding failed.
    #[error("Whisper inference failed: {0}")]
    Inference(String),
}

/// One utterance's transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// The text, trimmed, without special tokens.
    pub text: String,
    /// The language it was transcribed as.
    pub language: String,
}

/// How the language of an utterance is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LanguageMode {
    /// Always this code.
    Fixed(String),
    /// Detected per utterance, among these codes (any language when empty).
    Detect(Vec<String>),
}

/// A loaded Whisper model and its reusable buffers; an inference core's [`BatchWorker`].
pub struct WhisperWorker {
    model: Whisper,
    tokenizer: hf::Tokenizer,
    mel: LogMel,
    language: LanguageMode,
    multilingual: bool,
    /// Converts Chinese transcripts to the configured script (`None`: as heard).
    script: Option<ferrous_opencc::OpenCC>,
    options: WhisperOptions,
    /// The job's audio as f32, reused.
    pcm: Vec<f32>,
    /// Shortest encoder input, frames (10 ms each), at most `WINDOW_FRAMES`.
    window_frames: usize,
    /// The features cut to `window_frames`, reused.
    window: Vec<f32>,
    name: String,
}

impl WhisperWorker {
    /// Loads the model in `settings.model_dir` with one CTranslate2 compute thread, pinned to
    /// `settings.core`. Call it on the thread that will run the jobs (the pool's `make`).
    pub fn load(settings: &WhisperSettings) -> Result<Self, AsrError> {
        let dir = settings.model_dir.as_path();
        let group = setup_group(dir);
        if !dir.is_dir() {
            return Err(AsrError::ModelDirMissing {
                dir: dir.to_path_buf(),
                group,
            });
        }
        if let Some(path) = REQUIRED_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| !p.is_file())
        {
            return Err(AsrError::ModelFileMissing { path, group });
        }
        // 10 ms per frame; at least 1 s.
        let window_frames = (settings.window_ms as usize / 10).clamp(100, WINDOW_FRAMES);
        if settings.beam_size == 0 {
            return Err(AsrError::Settings("beam_size must be at least 1".into()));
        }
        let core = i32::try_from(settings.core)
            .map_err(|_| AsrError::Settings(format!("core {} is out of range", settings.core)))?;
        let compute_type = if settings.int8 {
            ComputeType::INT8
        } else {
            ComputeType::FLOAT32
        };
        let config = Config {
            device: Device::CPU,
            compute_type,
            // One replica (CTranslate2's inter_threads = 1) with one intra-op thread.
            device_indices: vec![0],
            num_threads_per_replica: 1,
            cpu_core_offset: core,
            ..Config::default()
        };
        let started = Instant::now();
        let model = Whisper::new(dir, config).map_err(|e| AsrError::Load {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer =
            hf::Tokenizer::from_file(&tokenizer_path).map_err(|e| AsrError::Tokenizer {
                path: tokenizer_path,
                reason: e.to_string(),
            })?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let multilingual = model.is_multilingual();
        let mut requested = parse_languages(settings.language.as_deref());
        let language = if multilingual {
            if name.ends_with(".en") {
                tracing::warn!(model = %name, "model name says English-only but its vocabulary is multilingual");
            }
            if let Some(code) = requested
                .iter()
                .find(|c| tokenizer.token_to_id(&language_token(c)).is_none())
            {
                return Err(AsrError::UnknownLanguage {
                    dir: dir.to_path_buf(),
                    language: code.clone(),
                });
            }
            match requested.len() {
                1 => LanguageMode::Fixed(requested.remove(0)),
                _ => LanguageMode::Detect(requested),
            }
        } else {
            if requested != ["en"] {
                tracing::info!(
                    model = %name,
                    configured = settings.language.as_deref().unwrap_or("auto"),
                    "English-only Whisper model: transcribing as \"en\" whatever the configured language"
                );
            }
            LanguageMode::Fixed("en".to_owned())
        };
        let mel = LogMel::new(model.n_mels());
        let conversion = match settings.chinese_script {
            _ if !multilingual => None,
            ChineseScript::AsHeard => None,
            ChineseScript::Simplified => Some(ferrous_opencc::config::BuiltinConfig::T2s),
            ChineseScript::Traditional => Some(ferrous_opencc::config::BuiltinConfig::S2t),
        };
        let script = conversion
            .map(ferrous_opencc::OpenCC::from_config)
            .transpose()
            .map_err(|e| AsrError::Settings(format!("Chinese script conversion: {e}")))?;
        tracing::info!(
            model = %name,
            multilingual,
            language = ?language,
            int8 = settings.int8,
            core = settings.core,
            beam = settings.beam_size,
            load_ms = started.elapsed().as_millis() as u64,
            "Whisper model loaded"
        );
        Ok(WhisperWorker {
            model,
            tokenizer,
            mel,
            language,
            multilingual,
            script,
            options: WhisperOptions {
                beam_size: settings.beam_size,
                ..WhisperOptions::default()
            },
            pcm: Vec::with_capacity(WINDOW_SAMPLES),
            window_frames,
            window: Vec::new(),
            name,
        })
    }

    /// The language every utterance is transcribed as, or `None` when it is detected.
    pub fn language(&self) -> Option<&str> {
        match &self.language {
            LanguageMode::Fixed(code) => Some(code),
            LanguageMode::Detect(_) => None,
        }
    }

    /// The codes detection chooses among (empty: any language the model knows).
    pub fn detection_candidates(&self) -> &[String] {
        match &self.language {
            LanguageMode::Fixed(_) => &[],
            LanguageMode::Detect(codes) => codes,
        }
    }

    /// Whether the model can transcribe (and detect) languages other than English.
    pub fn is_multilingual(&self) -> bool {
        self.multilingual
    }

    /// Transcribes 16 kHz mono `pcm` (the first 30 s of it). Empty audio gives empty text
    /// without running the model.
    pub fn transcribe(&mut self, pcm: &[i16]) -> Result<Transcript, AsrError> {
        if pcm.is_empty() {
            return Ok(Transcript {
                text: String::new(),
                language: self.language().unwrap_or_default().to_owned(),
            });
        }
        if pcm.len() > WINDOW_SAMPLES {
            tracing::warn!(
                model = %self.name,
                seconds = pcm.len() as f64 / SAMPLE_RATE as f64,
                "utterance longer than 30 s: transcribing the first 30 s"
            );
        }
        self.pcm.clear();
        self.pcm.extend(
            pcm.iter()
                .take(WINDOW_SAMPLES)
                .map(|&s| f32::from(s) / 32768.0),
        );
        let n_mels = self.mel.n_mels();
        let frames =
            (self.pcm.len() / (SAMPLE_RATE / 100) + 50).clamp(self.window_frames, WINDOW_FRAMES);
        let features = self.mel.compute(&self.pcm);
        let view = if frames == WINDOW_FRAMES {
            StorageView::new(&[1, n_mels, WINDOW_FRAMES], features, Device::CPU)
        } else {
            // The first `frames` of every mel row: a shorter encoder input.
            self.window.clear();
            for row in features.chunks_exact(WINDOW_FRAMES) {
                self.window.extend_from_slice(&row[..frames]);
            }
            StorageView::new(&[1, n_mels, frames], &mut self.window, Device::CPU)
        }
        .map_err(inference)?;
        let encoded;
        let (input, language) = match &self.language {
            LanguageMode::Fixed(code) => (&view, code.clone()),
            LanguageMode::Detect(candidates) => {
                // Encode once; detection and decoding both reuse the encoder output.
                encoded = self.model.encode(&view, false).map_err(inference)?;
                let detected = self.model.detect_language(&encoded).map_err(inference)?;
                // CTranslate2 lists every language, most probable first.
                let code = detected
                    .first()
                    .into_iter()
                    .flatten()
                    .map(language_code)
                    .find(|c| !c.is_empty() && (candidates.is_empty() || candidates.contains(c)))
                    .ok_or_else(|| AsrError::Inference("no language detected".into()))?;
                (&encoded, code)
            }
        };
        let prompt: Vec<String> = if self.multilingual {
            vec![
                "<|startoftranscript|>".into(),
                language_token(&language),
                "<|transcribe|>".into(),
                "<|notimestamps|>".into(),
            ]
        } else {
            vec!["<|startoftranscript|>".into(), "<|notimestamps|>".into()]
        };
        let results = self
            .model
            .generate(input, &[prompt], &self.options)
            .map_err(inference)?;
        let best = results.into_iter().next().and_then(|r| {
            let tokens = r.sequences.into_iter().next()?;
            let ids = r.sequences_ids.into_iter().next()?;
            Some((tokens, ids))
        });
        let Some((tokens, ids)) = best else {
            return Err(AsrError::Inference("no hypothesis returned".into()));
        };
        let text_ids: Vec<u32> = tokens
            .iter()
            .zip(&ids)
            .filter(|(t, _)| !is_special_token(t))
            .filter_map(|(_, &id)| u32::try_from(id).ok())
            .collect();
        let text = self
            .tokenizer
            .decode(&text_ids, true)
            .map_err(|e| AsrError::Inference(format!("decode: {e}")))?;
        let mut text = strip_special_tokens(&text);
        if let Some(script) = self.script.as_ref().filter(|_| language == "zh") {
            text = script.convert(&text);
        }
        Ok(Transcript { text, language })
    }
}

impl BatchWorker for WhisperWorker {
    type Job = AsrJob;
    type Output = AsrReply;

    fn process(&mut self, jobs: &mut Vec<Routed<AsrJob>>, out: &mut Vec<Routed<AsrReply>>) {
        for job in jobs.drain(..) {
            let started = Instant::now();
            let outcome = self.transcribe(&job.item.pcm);
            let done = Instant::now();
            let j = job.item;
            let audio_ms = j.pcm.len() as u64 * 1000 / SAMPLE_RATE as u64;
            let result = match outcome {
                Ok(t) => Ok(AsrOutput {
                    text: t.text,
                    language: Some(t.language).filter(|l| !l.is_empty()),
                    audio_ms,
                }),
                Err(e) => {
                    tracing::warn!(session = j.session, turn = j.turn, error = %e, "ASR failed");
                    Err(e.to_string())
                }
            };
            out.push(Routed {
                shard: job.shard,
                item: Reply {
                    session: j.session,
                    turn: j.turn,
                    seq: 0,
                    timings: Timings::new(j.submitted, started, done),
                    result,
                },
            });
        }
    }

    fn skipped(&mut self, job: Routed<AsrJob>) -> Option<Routed<AsrReply>> {
        let j = job.item;
        Some(Routed {
            shard: job.shard,
            item: Reply::cancelled(j.session, j.turn, 0, j.submitted),
        })
    }
}

/// `"zh, EN"` → `["zh", "en"]`; `None`, `""` and `"auto"` → `[]` (any language).
fn parse_languages(setting: Option<&str>) -> Vec<String> {
    let mut codes: Vec<String> = Vec::new();
    for code in setting
        .unwrap_or_default()
        .split(|c: char| c == ',' || c.is_whitespace())
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "auto")
    {
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    codes
}

/// The set-up group that installs a model directory, for error messages.
fn setup_group(dir: &Path) -> &'static str {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_lowercase());
    match name {
        Some(n) if n.contains("base") => "asr-base",
        _ => "asr-tiny",
    }
}

fn inference(e: impl std::fmt::Display) -> AsrError {
    AsrError::Inference(e.to_string())
}

/// `"zh"` → `"<|zh|>"`.
fn language_token(code: &str) -> String {
    format!("<|{code}|>")
}

/// The code in a detection result (`DetectionResult { language: "<|zh|>", … }` → `"zh"`).
///
/// ct2rs declares the result's fields private (a cxx shared struct without `pub`), so the
/// token is read from its `Debug` form; an unexpected form gives an empty code.
fn language_code(detected: &ct2rs::sys::DetectionResult) -> String {
    language_from_debug(&format!("{detected:?}"))
}

fn language_from_debug(debug: &str) -> String {
    debug
        .split_once("language: \"<|")
        .and_then(|(_, rest)| rest.split_once("|>\""))
        .map(|(code, _)| code.to_owned())
        .unwrap_or_default()
}

fn is_special_token(token: &str) -> bool {
    token.starts_with("<|") && token.ends_with("|>")
}

/// Removes `<|…|>` markers that survive decoding (e.g. `<|notimestamps|>`) and trims.
fn strip_special_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<|") {
        match rest[start + 2..].find("|>") {
            Some(len) => {
                out.push_str(&rest[..start]);
                rest = &rest[start + 2 + len + 2..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    const SENTENCE: &str = "Turn on the kitchen lights and set a timer for ten minutes.";
    const PINYIN: &str = "ni3 hao3, jin1 tian1 tian1 qi4 zen3 me yang4?";
    const PINYIN_LONG: &str = "ni3 hao3, jin1 tian1 tian1 qi4 zen3 me yang4? \
        wo3 xiang3 ting1 yi1 shou3 yin1 yue4, qing3 ba3 ke4 ting1 de5 deng1 da3 kai1.";

    fn models_dir() -> PathBuf {
        std::env::var_os("XIAOZHI_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
    }

    /// Greedy decoding, except beam 5 for tiny.en int8: greedy tiny.en int8 hears "set at
    /// time at 14 minutes" on about a quarter of sox's dithered renderings of [`SENTENCE`];
    /// beam 5 (and greedy float32 or base) got all 24 tried right.
    fn settings(model: &str, language: Option<&str>, int8: bool) -> WhisperSettings {
        WhisperSettings {
            model_dir: models_dir().join(model),
            language: language.map(str::to_owned),
            int8,
            core: 0,
            beam_size: if int8 && model.ends_with(".en") { 5 } else { 1 },
            // What the server runs with unless configured otherwise.
            window_ms: crate::config::WhisperConfig::default().window_ms,
            chinese_script: ChineseScript::Simplified,
        }
    }

    /// The worker, or `None` (with a message) when the model is not installed.
    fn worker_or_skip(s: &WhisperSettings) -> Option<WhisperWorker> {
        if !s.model_dir.join("model.bin").is_file() {
            eprintln!(
                "SKIPPED: {} is absent (run `make setup`)",
                s.model_dir.display()
            );
            return None;
        }
        Some(WhisperWorker::load(s).expect("load Whisper"))
    }

    /// espeak-ng speech as 16 kHz mono i16, with 0.3 s of silence on each side. `-D` turns
    /// off sox's random dither so every run feeds the model the same samples.
    fn speech(voice: &str, text: &str) -> Vec<i16> {
        // Tests run in parallel in one process: a counter keeps their files apart.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir();
        let tag = format!("xiaozhi-asr-test-{}-{n}-{voice}", std::process::id());
        let raw = dir.join(format!("{tag}.wav"));
        let wav = dir.join(format!("{tag}-16k.wav"));
        let status = Command::new("espeak-ng")
            .args(["-v", voice, "-w"])
            .arg(&raw)
            .arg(text)
            .status()
            .expect("run espeak-ng (installed by the set-up)");
        assert!(status.success(), "espeak-ng failed: {status}");
        let status = Command::new("sox")
            .args(["-V1", "-D"])
            .arg(&raw)
            .args(["-r", "16000", "-c", "1", "-b", "16"])
            .arg(&wav)
            .args(["pad", "0.3", "0.3"])
            .status()
            .expect("run sox (installed by the set-up)");
        assert!(status.success(), "sox failed: {status}");
        let reader = hound::WavReader::open(&wav).expect("read the sox output");
        assert_eq!(reader.spec().sample_rate, 16_000);
        assert_eq!(reader.spec().channels, 1);
        let pcm = reader
            .into_samples::<i16>()
            .map(|s| s.expect("16-bit sample"))
            .collect();
        let _ = std::fs::remove_file(&raw);
        let _ = std::fs::remove_file(&wav);
        pcm
    }

    fn assert_kitchen_timer(text: &str) {
        let lower = text.to_lowercase();
        assert!(
            lower.contains("kitchen") && lower.contains("timer"),
            "transcript: {text:?}"
        );
        assert_eq!(text, text.trim());
        assert!(!text.contains("<|"), "special token left in {text:?}");
    }

    #[test]
    fn tiny_en_transcribes_the_kitchen_sentence_in_int8_and_f32() {
        let pcm = speech("en-us", SENTENCE);
        // int8 with no language configured (forced to "en"), f32 with "en".
        for (int8, language) in [(true, None), (false, Some("en"))] {
            let Some(mut worker) = worker_or_skip(&settings("whisper-tiny.en", language, int8))
            else {
                return;
            };
            assert!(!worker.is_multilingual());
            assert_eq!(worker.language(), Some("en"));
            let t = worker.transcribe(&pcm).expect("transcribe");
            eprintln!("tiny.en int8={int8}: {:?}", t.text);
            assert_kitchen_timer(&t.text);
            assert_eq!(t.language, "en");
        }
    }

    #[test]
    fn an_utterance_longer_than_the_shortest_window_is_heard_to_its_end() {
        let mut s = settings("whisper-tiny.en", Some("en"), true);
        s.window_ms = 2_000;
        let Some(mut worker) = worker_or_skip(&s) else {
            return;
        };
        // ~3.3 s of speech plus 0.6 s of padding: the window grows to the utterance.
        let pcm = speech("en-us", SENTENCE);
        assert!(pcm.len() > 3 * 16_000);
        let t = worker.transcribe(&pcm).expect("transcribe");
        eprintln!("tiny.en, 2 s shortest window: {:?}", t.text);
        assert_kitchen_timer(&t.text);
    }

    #[test]
    fn english_only_model_ignores_a_configured_chinese_language() {
        let Some(mut worker) = worker_or_skip(&settings("whisper-tiny.en", Some("zh"), true))
        else {
            return;
        };
        assert_eq!(worker.language(), Some("en"));
        let t = worker
            .transcribe(&speech("en-us", SENTENCE))
            .expect("transcribe");
        assert_kitchen_timer(&t.text);
    }

    fn han_count(text: &str) -> usize {
        text.chars()
            .filter(|c| ('\u{4e00}'..='\u{9fff}').contains(c))
            .count()
    }

    #[test]
    fn base_detects_mandarin_among_zh_and_en_and_writes_chinese() {
        let Some(mut worker) = worker_or_skip(&settings("whisper-base", Some("zh, en"), true))
        else {
            return;
        };
        assert!(worker.is_multilingual());
        assert_eq!(worker.language(), None);
        assert_eq!(worker.detection_candidates(), ["zh", "en"]);
        assert_mandarin_then_english(&mut worker, PINYIN, "zh|en");
    }

    #[test]
    fn base_auto_detects_a_longer_mandarin_utterance_and_english() {
        let Some(mut worker) = worker_or_skip(&settings("whisper-base", None, true)) else {
            return;
        };
        assert_eq!(worker.language(), None);
        assert!(worker.detection_candidates().is_empty());
        // espeak's Mandarin is poor: on the one short sentence, unrestricted detection says
        // Thai (p ≈ 0.5–0.7, zh second); three sentences give zh (p ≈ 0.78).
        let short = worker
            .transcribe(&speech("cmn-latn-pinyin", PINYIN))
            .expect("transcribe");
        eprintln!("base, auto, short espeak Mandarin: {short:?}");
        assert_mandarin_then_english(&mut worker, PINYIN_LONG, "auto");
    }

    /// `pinyin` spoken by espeak is detected as Chinese and written in Han characters; then the
    /// English sentence is detected as English and heard right.
    fn assert_mandarin_then_english(worker: &mut WhisperWorker, pinyin: &str, mode: &str) {
        let t = worker
            .transcribe(&speech("cmn-latn-pinyin", pinyin))
            .expect("transcribe");
        eprintln!("base, {mode}, espeak Mandarin: {t:?}");
        assert_eq!(t.language, "zh");
        assert!(han_count(&t.text) > 0, "expected Chinese: {:?}", t.text);

        let en = worker
            .transcribe(&speech("en-us", SENTENCE))
            .expect("transcribe");
        eprintln!("base, {mode}, English: {en:?}");
        assert_eq!(en.language, "en");
        assert_kitchen_timer(&en.text);
    }

    #[test]
    fn language_settings_parse_to_codes() {
        assert!(parse_languages(None).is_empty());
        assert!(parse_languages(Some(" auto ")).is_empty());
        assert_eq!(parse_languages(Some("ZH")), ["zh"]);
        assert_eq!(parse_languages(Some("zh, en,zh  ja")), ["zh", "en", "ja"]);
    }

    #[test]
    fn unknown_language_is_refused_at_load() {
        let s = settings("whisper-base", Some("zh,xx"), true);
        if !s.model_dir.join("model.bin").is_file() {
            eprintln!("SKIPPED: {} is absent", s.model_dir.display());
            return;
        }
        let err = WhisperWorker::load(&s).err().expect("xx is not a language");
        assert!(
            matches!(&err, AsrError::UnknownLanguage { language, .. } if language == "xx"),
            "{err}"
        );
    }

    #[test]
    fn batch_keeps_order_routes_results_and_handles_empty_and_overlong_audio() {
        let Some(mut worker) = worker_or_skip(&settings("whisper-tiny.en", Some("en"), true))
        else {
            return;
        };
        let sentence = speech("en-us", SENTENCE);
        // 31 s: the sentence, then silence past the 30 s window.
        let mut long = sentence.clone();
        long.resize(31 * SAMPLE_RATE, 0);
        let t0 = Instant::now();
        let plan: [(u64, Vec<i16>); 3] = [(7, sentence), (8, Vec::new()), (9, long)];
        let mut jobs: Vec<Routed<AsrJob>> = plan
            .into_iter()
            .enumerate()
            .map(|(i, (session, pcm))| Routed {
                shard: i % 2,
                item: AsrJob {
                    session,
                    turn: 3,
                    pcm,
                    submitted: t0,
                },
            })
            .collect();
        let mut out = Vec::new();
        worker.process(&mut jobs, &mut out);
        assert!(jobs.is_empty());
        assert_eq!(out.len(), 3);
        for (i, r) in out.iter().enumerate() {
            assert_eq!(r.shard, i % 2);
            assert_eq!(r.item.session, 7 + i as u64, "results keep job order");
            assert_eq!(r.item.turn, 3);
            let output = r.item.result.as_ref().expect("no error");
            assert_eq!(output.language.as_deref(), Some("en"));
            assert!(r.item.timings.done >= t0 + r.item.timings.queue_wait);
        }
        let text = |i: usize| out[i].item.result.as_ref().map_or("", |o| o.text.as_str());
        let audio_ms = |i: usize| out[i].item.result.as_ref().map_or(0, |o| o.audio_ms);
        assert_kitchen_timer(text(0));
        assert_eq!(text(1), "");
        assert_eq!(audio_ms(1), 0);
        assert!(out[1].item.timings.compute < Duration::from_millis(5));
        assert_kitchen_timer(text(2));
        assert_eq!(audio_ms(2), 31_000);
        assert!(out[2].item.timings.queue_wait >= out[0].item.timings.compute);
    }

    /// Lists `(name, Cpus_allowed_list)` of this process's threads named `name`.
    fn threads_named(name: &str) -> Vec<String> {
        let mut found = Vec::new();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return found;
        };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("?")
                .trim()
                .to_owned();
            found.push(allowed);
        }
        found
    }

    #[test]
    fn load_starts_one_compute_thread_pinned_to_the_configured_core() {
        let core = 1;
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        if !cores.iter().any(|c| c.id == core) {
            eprintln!("SKIPPED: no CPU {core}");
            return;
        }
        let mut s = settings("whisper-tiny.en", None, true);
        s.core = core;
        if !s.model_dir.join("model.bin").is_file() {
            eprintln!("SKIPPED: {} is absent", s.model_dir.display());
            return;
        }
        // CTranslate2's thread inherits its creator's name, so a unique name finds both.
        let name = "asr-pin-test";
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: core });
                let before = threads_named(name);
                let worker = WhisperWorker::load(&s).map_err(|e| e.to_string());
                let after = threads_named(name);
                (pinned, before, worker.map(|_| ()), after)
            })
            .expect("spawn");
        let (pinned, before, loaded, after) = handle.join().expect("join");
        assert!(pinned);
        loaded.expect("load");
        assert_eq!(before, ["1"]);
        eprintln!("threads named {name} after load, CPUs allowed: {after:?}");
        assert_eq!(after, ["1", "1"], "our thread plus one CTranslate2 worker");
    }

    #[test]
    fn missing_model_directory_names_the_setup_step() {
        let err = WhisperWorker::load(&WhisperSettings {
            model_dir: PathBuf::from("/nonexistent/whisper-tiny.en"),
            language: None,
            int8: true,
            core: 0,
            beam_size: 1,
            window_ms: 30_000,
            chinese_script: ChineseScript::Simplified,
        })
        .err()
        .expect("missing directory must fail");
        assert_eq!(
            err.to_string(),
            "Whisper model directory /nonexistent/whisper-tiny.en not found; \
             run `make setup` (scripts/setup.sh asr-tiny)"
        );
    }

    #[test]
    fn missing_model_file_is_named() {
        let dir = std::env::temp_dir().join(format!("xiaozhi-asr-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("config.json"), "{}").expect("write");
        let err = WhisperWorker::load(&WhisperSettings {
            model_dir: dir.clone(),
            language: None,
            int8: true,
            core: 0,
            beam_size: 1,
            window_ms: 30_000,
            chinese_script: ChineseScript::Simplified,
        })
        .err()
        .expect("missing model.bin must fail");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            matches!(&err, AsrError::ModelFileMissing { path, group: "asr-tiny" }
                if path.ends_with("model.bin")),
            "{err}"
        );
    }

    #[test]
    fn special_token_markers_and_whitespace_are_stripped() {
        assert_eq!(
            strip_special_tokens("<|notimestamps|> Turn on the lights. "),
            "Turn on the lights."
        );
        assert_eq!(strip_special_tokens(" a<|en|>b <|x"), "ab <|x");
        assert_eq!(strip_special_tokens(""), "");
        assert!(is_special_token("<|zh|>"));
        assert_eq!(
            language_from_debug(r#"DetectionResult { language: "<|zh|>", probability: 0.9 }"#),
            "zh"
        );
        assert_eq!(language_from_debug("DetectionResult { }"), "");
        assert!(!is_special_token("Ġkitchen"));
    }
}
