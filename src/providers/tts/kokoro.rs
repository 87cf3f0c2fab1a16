//! Kokoro-82M v1.0 (int8 ONNX) on ONNX Runtime: phoneme strings in, 24 kHz audio out.
//!
//! The model reads token ids from its `vocab.json` (one id per phoneme symbol: IPA letters,
//! misaki's diphthong capitals, tone arrows, punctuation) framed as `[0, ids…, 0]`, a 256-float
//! style vector, and a speed. A voice is a `510 × 256` float32 table (`kokoro-js`'s
//! `voices/*.bin`, little-endian, no header); the style for an input of n ids is row n. The
//! model takes at most [`MAX_IDS`] ids per pass, so longer input is cut at phrase boundaries
//! (punctuation, else a space) and the pieces' audio is concatenated.
//!
//! Like Piper, the session runs on one intra-op thread without spinning, so a forward pass
//! stays on the calling (pinned) inference thread. Kokoro is several times costlier than
//! Piper per second of audio (see `tuning.md`), which is why the worker synthesises one
//! sentence per job and the session sends the first sentence early.
//!
//! Phoneme strings come from [`super::zh`] (Mandarin) or from espeak-ng's IPA mapped into
//! Kokoro's symbols by [`from_espeak_ipa`] (English, as misaki's espeak fallback does).
//! Symbols missing from the vocabulary are skipped and counted in [`KokoroStats`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ort::environment::Environment;
use ort::value::{Tensor, TensorRef};
use serde::Deserialize;

use super::TtsError;
use crate::providers::onnx::{init_runtime, runtime, OnnxSession};

/// Output sample rate of every Kokoro voice.
pub const SAMPLE_RATE: u32 = 24_000;
/// Most phoneme ids one forward pass takes (the context is 512 with the two framing zeros).
pub const MAX_IDS: usize = 510;
/// Floats per style vector.
pub const STYLE_DIM: usize = 256;
/// Rows of a voice table: one style per input length.
pub const VOICE_ROWS: usize = 510;

/// What one [`KokoroModel::synthesize`] call did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KokoroStats {
    /// Forward passes (more than one when the input exceeded [`MAX_IDS`]).
    pub passes: usize,
    /// Phoneme ids fed to the model in total.
    pub ids: usize,
    /// Symbols of the phoneme string missing from the vocabulary, skipped.
    pub unknown_symbols: usize,
    /// The distinct unknown symbols (at most 8), for the log.
    pub unknown: Vec<char>,
}

#[derive(Deserialize)]
struct VocabFile {
    vocab: HashMap<String, i64>,
}

/// Kokoro's phoneme vocabulary: symbol → token id.
#[derive(Debug, Clone)]
pub struct Vocab {
    ids: HashMap<char, i64>,
}

impl Vocab {
    /// Parses a `vocab.json` (`{"vocab": {"a": 43, …}}`); every key must be one character.
    pub fn from_json(json: &[u8]) -> Result<Self, String> {
        let file: VocabFile = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let mut ids = HashMap::with_capacity(file.vocab.len());
        for (symbol, id) in file.vocab {
            let mut chars = symbol.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => {
                    ids.insert(c, id);
                }
                _ => return Err(format!("vocab key {symbol:?} is not one character")),
            }
        }
        Ok(Vocab { ids })
    }

    /// Whether the model has an id for `symbol`.
    pub fn contains(&self, symbol: char) -> bool {
        self.ids.contains_key(&symbol)
    }

    /// Appends the ids of `phonemes` to `ids`, and for each id whether a phrase (2) or word (1)
    /// boundary follows it to `breaks`; unknown symbols are skipped and counted in `stats`.
    fn encode(
        &self,
        phonemes: &str,
        ids: &mut Vec<i64>,
        breaks: &mut Vec<u8>,
        stats: &mut KokoroStats,
    ) {
        for c in phonemes.chars() {
            match self.ids.get(&c) {
                Some(&id) => {
                    ids.push(id);
                    breaks.push(match c {
                        '.' | '!' | '?' | ';' | ':' | ',' | '—' | '…' => 2,
                        ' ' => 1,
                        _ => 0,
                    });
                }
                None => {
                    stats.unknown_symbols += 1;
                    if stats.unknown.len() < 8 && !stats.unknown.contains(&c) {
                        stats.unknown.push(c);
                    }
                }
            }
        }
    }
}

/// Splits `n` ids into pieces of at most `max`, cutting after the last phrase boundary that
/// fits, else after the last word boundary, else at `max`. Returns the end of each piece.
fn split_points(breaks: &[u8], max: usize) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut start = 0;
    while breaks.len() - start > max {
        let window = &breaks[start..start + max];
        let cut = [2u8, 1]
            .iter()
            .find_map(|&level| window.iter().rposition(|&b| b >= level))
            .map_or(max, |p| p + 1);
        start += cut;
        ends.push(start);
    }
    ends.push(breaks.len());
    ends
}

/// One voice's style table.
#[derive(Clone)]
pub struct Voice {
    rows: Vec<f32>,
}

impl Voice {
    /// Parses a raw little-endian float32 `510 × 256` table.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let want = VOICE_ROWS * STYLE_DIM * 4;
        if bytes.len() != want {
            return Err(format!(
                "{} bytes, expected {want} (510 × 256 float32)",
                bytes.len()
            ));
        }
        let rows = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Voice { rows })
    }

    /// The style vector for an input of `n` ids.
    fn style(&self, n: usize) -> &[f32] {
        let row = n.min(VOICE_ROWS - 1);
        &self.rows[row * STYLE_DIM..(row + 1) * STYLE_DIM]
    }
}

/// Kokoro's model, vocabulary and the voices loaded from its folder.
pub struct KokoroModel {
    session: OnnxSession,
    vocab: Vocab,
    voices: HashMap<String, Voice>,
    /// Name of the token input (`tokens` in this export, `input_ids` in others).
    tokens_input: String,
    ids: Vec<i64>,
    breaks: Vec<u8>,
}

impl KokoroModel {
    /// Loads `dir/kokoro-v1.0.int8.onnx`, `dir/vocab.json` and `dir/voices/<name>.bin` for each
    /// of `voices`, in the ONNX Runtime environment created from the library `lib`.
    pub fn load(lib: &Path, dir: &Path, voices: &[&str]) -> Result<Self, TtsError> {
        init_runtime(lib)?;
        let model = dir.join("kokoro-v1.0.int8.onnx");
        let env = runtime().ok_or_else(|| {
            TtsError::ModelLoad(model.clone(), "ONNX Runtime not initialised".into())
        })?;
        Self::load_in(env, dir, voices)
    }

    /// [`Self::load`] in an existing environment.
    pub fn load_in(env: &Environment, dir: &Path, voices: &[&str]) -> Result<Self, TtsError> {
        let model = dir.join("kokoro-v1.0.int8.onnx");
        let vocab_path = dir.join("vocab.json");
        let vocab = Vocab::from_json(&read(&vocab_path)?)
            .map_err(|e| TtsError::ModelLoad(vocab_path.clone(), e))?;
        let mut loaded = HashMap::new();
        for &name in voices {
            let path = voice_path(dir, name)?;
            let voice =
                Voice::from_bytes(&read(&path)?).map_err(|e| TtsError::ModelLoad(path, e))?;
            loaded.insert(name.to_owned(), voice);
        }
        if !model.is_file() {
            return Err(TtsError::ModelMissing(model));
        }
        let load_error = |e: String| TtsError::ModelLoad(model.clone(), e);
        let session = crate::providers::onnx::single_thread_session(env, &model)
            .map_err(|e| load_error(e.to_string()))?;
        let tokens_input = check_signature(&session).map_err(load_error)?;
        tracing::info!(model = %model.display(), voices = ?voices, "Kokoro loaded");
        Ok(KokoroModel {
            session,
            vocab,
            voices: loaded,
            tokens_input,
            ids: Vec::new(),
            breaks: Vec::new(),
        })
    }

    /// The model's vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Whether `voice` was loaded.
    pub fn has_voice(&self, voice: &str) -> bool {
        self.voices.contains_key(voice)
    }

    /// Speech for a phoneme string read by `voice` at `speed` (1.0 normal, above is faster):
    /// float samples at [`SAMPLE_RATE`] appended to `audio`. Input beyond [`MAX_IDS`] ids is
    /// cut at phrase boundaries into several passes. An empty or all-unknown string appends
    /// nothing.
    pub fn synthesize(
        &mut self,
        phonemes: &str,
        voice: &str,
        speed: f32,
        audio: &mut Vec<f32>,
    ) -> Result<KokoroStats, TtsError> {
        let style_table = self
            .voices
            .get(voice)
            .ok_or_else(|| TtsError::UnknownKokoroVoice(voice.to_owned()))?;
        let mut stats = KokoroStats::default();
        let mut ids = std::mem::take(&mut self.ids);
        let mut breaks = std::mem::take(&mut self.breaks);
        ids.clear();
        breaks.clear();
        self.vocab
            .encode(phonemes, &mut ids, &mut breaks, &mut stats);
        let mut start = 0;
        let mut outcome = Ok(());
        if !ids.is_empty() {
            for end in split_points(&breaks, MAX_IDS) {
                let piece = &ids[start..end];
                start = end;
                if piece.iter().all(|&id| id == self.space_id()) {
                    continue;
                }
                stats.passes += 1;
                stats.ids += piece.len();
                let style = style_table.style(piece.len());
                outcome = forward(
                    &mut self.session,
                    &self.tokens_input,
                    piece,
                    style,
                    speed,
                    audio,
                )
                .map_err(TtsError::Inference);
                if outcome.is_err() {
                    break;
                }
            }
        }
        self.ids = ids;
        self.breaks = breaks;
        outcome?;
        if stats.unknown_symbols > 0 {
            tracing::debug!(
                unknown = stats.unknown_symbols,
                symbols = ?stats.unknown,
                "phoneme symbols missing from Kokoro's vocabulary were skipped"
            );
        }
        Ok(stats)
    }

    fn space_id(&self) -> i64 {
        self.vocab.ids.get(&' ').copied().unwrap_or(-1)
    }
}

/// One forward pass: `[0, ids…, 0]` with `style`; appends the audio to `audio`.
fn forward(
    session: &mut OnnxSession,
    tokens_input: &str,
    ids: &[i64],
    style: &[f32],
    speed: f32,
    audio: &mut Vec<f32>,
) -> Result<(), String> {
    let err = |e: ort::Error| e.to_string();
    let mut framed = Vec::with_capacity(ids.len() + 2);
    framed.push(0);
    framed.extend_from_slice(ids);
    framed.push(0);
    let tokens = Tensor::from_array(([1usize, framed.len()], framed)).map_err(err)?;
    let style = TensorRef::from_array_view(([1usize, STYLE_DIM], style)).map_err(err)?;
    let speed = Tensor::from_array(([1usize], vec![speed])).map_err(err)?;
    let out = session
        .run(ort::inputs![
            tokens_input => tokens,
            "style" => style,
            "speed" => speed,
        ])
        .map_err(err)?;
    let (_, samples) = out
        .get("audio")
        .or_else(|| out.get("waveform"))
        .ok_or("no `audio` tensor")?
        .try_extract_tensor::<f32>()
        .map_err(err)?;
    audio.extend_from_slice(samples);
    Ok(())
}

/// `dir/voices/<name>.bin`, refusing names that could leave the folder.
fn voice_path(dir: &Path, name: &str) -> Result<PathBuf, TtsError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(TtsError::UnknownKokoroVoice(name.to_owned()));
    }
    Ok(dir.join("voices").join(format!("{name}.bin")))
}

fn read(path: &Path) -> Result<Vec<u8>, TtsError> {
    if !path.is_file() {
        return Err(TtsError::ModelMissing(path.to_path_buf()));
    }
    std::fs::read(path).map_err(|e| TtsError::ModelLoad(path.to_path_buf(), e.to_string()))
}

/// Checks Kokoro's inputs and outputs; returns the name of the token input.
fn check_signature(session: &OnnxSession) -> Result<String, String> {
    let (inputs, outputs) = crate::providers::onnx::io_names(session);
    let tokens = ["tokens", "input_ids"]
        .into_iter()
        .find(|want| inputs.iter().any(|n| n == want));
    let Some(tokens) = tokens else {
        return Err(format!(
            "inputs are {inputs:?}, expected tokens, style, speed"
        ));
    };
    for want in ["style", "speed"] {
        if !inputs.iter().any(|n| n == want) {
            return Err(format!(
                "inputs are {inputs:?}, expected tokens, style, speed"
            ));
        }
    }
    if !outputs.iter().any(|n| n == "audio" || n == "waveform") {
        return Err(format!("outputs are {outputs:?}, expected audio"));
    }
    Ok(tokens.to_owned())
}

/// espeak-ng's IPA (no tie bars) → Kokoro's English symbols, as misaki's espeak fallback maps
/// them for American English: diphthongs and affricates become misaki's single letters
/// (`eɪ` → `A`, `aɪ` → `I`, `aʊ` → `W`, `ɔɪ` → `Y`, `oʊ` → `O`, `dʒ` → `ʤ`, `tʃ` → `ʧ`), `r` → `ɹ`,
/// `ɚ` → `əɹ`, `ɜː` → `ɜɹ`, syllabic consonants get `ᵊ`, and length marks go.
pub fn from_espeak_ipa(ipa: &str) -> String {
    // Longest first, so a diphthong is replaced before its parts.
    const PAIRS: [(&str, &str); 13] = [
        ("ʔˌn\u{329}", "tᵊn"),
        ("ʔn\u{329}", "tᵊn"),
        ("ɜːɹ", "ɜɹ"),
        ("aɪ", "I"),
        ("aʊ", "W"),
        ("dʒ", "ʤ"),
        ("eɪ", "A"),
        ("tʃ", "ʧ"),
        ("ɔɪ", "Y"),
        ("oʊ", "O"),
        ("ʔn", "tᵊn"),
        ("ɜː", "ɜɹ"),
        ("ɪə", "iə"),
    ];
    let mut s = ipa.to_owned();
    for (from, to) in PAIRS {
        s = s.replace(from, to);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        // A syllabic consonant (n̩, l̩) is written as schwa + consonant.
        if chars.peek() == Some(&'\u{329}') {
            chars.next();
            out.push('ᵊ');
            out.push(c);
            continue;
        }
        match c {
            '\u{303}' | 'ʲ' | 'ː' | '\u{329}' => {}
            'e' => out.push('A'),
            'r' => out.push('ɹ'),
            'x' | 'ç' => out.push('k'),
            'ɐ' => out.push('ə'),
            'ɚ' => out.push_str("əɹ"),
            'ɬ' => out.push('l'),
            'ʔ' => out.push('t'),
            'o' => out.push('ɔ'),
            'ɡ' | 'g' => out.push('ɡ'),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::tts::testing::{models_dir, runtime_lib};

    fn vocab() -> Vocab {
        Vocab::from_json(
            r#"{"vocab": {" ": 16, ",": 3, ".": 4, "a": 43, "n": 56, "i": 51, "↓": 169}}"#
                .as_bytes(),
        )
        .expect("vocab")
    }

    #[test]
    fn unknown_symbols_are_skipped_and_counted() {
        let mut stats = KokoroStats::default();
        let (mut ids, mut breaks) = (Vec::new(), Vec::new());
        vocab().encode("ni↓ ☃a☃x.", &mut ids, &mut breaks, &mut stats);
        assert_eq!(ids, [56, 51, 169, 16, 43, 4]);
        assert_eq!(breaks, [0, 0, 0, 1, 0, 2]);
        assert_eq!(stats.unknown_symbols, 3);
        assert_eq!(stats.unknown, ['☃', 'x']);
    }

    #[test]
    fn long_input_is_cut_after_punctuation_then_spaces() {
        // Phrase boundary at index 5, word boundary at 8.
        let breaks = [0, 0, 0, 0, 0, 2, 0, 0, 1, 0, 0, 0];
        assert_eq!(split_points(&breaks, 10), [6, 12]);
        let words = [0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(split_points(&words, 8), [6, 12]);
        let none = [0u8; 25];
        assert_eq!(split_points(&none, 10), [10, 20, 25]);
        assert_eq!(split_points(&none[..10], 10), [10]);
        assert_eq!(split_points(&[], 10), [0]);
    }

    #[test]
    fn voice_tables_must_be_510_by_256_floats() {
        let mut bytes = vec![0u8; VOICE_ROWS * STYLE_DIM * 4];
        bytes[(3 * STYLE_DIM) * 4..(3 * STYLE_DIM) * 4 + 4].copy_from_slice(&1.5f32.to_le_bytes());
        let voice = Voice::from_bytes(&bytes).expect("voice");
        assert_eq!(voice.style(3)[0], 1.5);
        assert_eq!(voice.style(3).len(), STYLE_DIM);
        assert_eq!(voice.style(10_000).len(), STYLE_DIM);
        assert!(Voice::from_bytes(&bytes[4..]).is_err());
    }

    #[test]
    fn espeak_ipa_maps_to_misakis_english_symbols() {
        assert_eq!(from_espeak_ipa("həlˈoʊ wˈɜːld"), "həlˈO wˈɜɹld");
        assert_eq!(from_espeak_ipa("ðə kˈæt"), "ðə kˈæt");
        assert_eq!(from_espeak_ipa("tʃˈeɪndʒ"), "ʧˈAnʤ");
        assert_eq!(from_espeak_ipa("mˈaɪ hˈaʊs"), "mˈI hˈWs");
        assert_eq!(from_espeak_ipa("bˈʌtn̩"), "bˈʌtᵊn");
        assert_eq!(from_espeak_ipa("bˈʌʔn̩"), "bˈʌtᵊn");
        assert_eq!(from_espeak_ipa("wˈɔːɾɚ"), "wˈɔɾəɹ");
        assert_eq!(from_espeak_ipa("wˈɔːtɚ"), "wˈɔtəɹ");
    }

    #[test]
    fn voice_names_cannot_leave_the_voices_folder() {
        assert!(voice_path(Path::new("/m"), "../../etc/passwd").is_err());
        assert!(voice_path(Path::new("/m"), "").is_err());
        assert_eq!(
            voice_path(Path::new("/m"), "zf_xiaoxiao").expect("ok"),
            Path::new("/m/voices/zf_xiaoxiao.bin")
        );
    }

    /// The Kokoro model with a Mandarin and an English voice, or `None` when absent.
    pub(crate) fn model_or_skip() -> Option<KokoroModel> {
        let dir = models_dir().join("kokoro");
        let lib = runtime_lib();
        for path in [lib.clone(), dir.join("kokoro-v1.0.int8.onnx")] {
            if !path.is_file() {
                eprintln!(
                    "SKIPPED: {} is absent (run `scripts/setup.sh kokoro`)",
                    path.display()
                );
                return None;
            }
        }
        Some(KokoroModel::load(&lib, &dir, &["zf_xiaoxiao", "af_heart"]).expect("load Kokoro"))
    }

    #[test]
    fn vocab_file_matches_the_symbols_the_front_end_checks_against() {
        let path = models_dir().join("kokoro/vocab.json");
        let Ok(json) = std::fs::read(&path) else {
            eprintln!("SKIPPED: {} is absent", path.display());
            return;
        };
        let vocab = Vocab::from_json(&json).expect("vocab.json");
        let symbols = crate::providers::tts::zh::KOKORO_SYMBOLS;
        for c in symbols.chars() {
            assert!(vocab.contains(c), "{c:?} is not in vocab.json");
        }
        assert_eq!(vocab.ids.len(), symbols.chars().count());
    }

    #[test]
    #[ignore = "runs Kokoro (~1-2 s of CPU); cargo test -- --ignored kokoro"]
    fn kokoro_reads_a_short_chinese_sentence_as_audible_speech() {
        let Some(mut model) = model_or_skip() else {
            return;
        };
        let zh = crate::providers::tts::zh::phonemize("你好，今天天气很好。", |_| {
            Err::<String, ()>(())
        })
        .expect("phonemes");
        let mut audio = Vec::new();
        let start = std::time::Instant::now();
        let stats = model
            .synthesize(&zh.phonemes, "zf_xiaoxiao", 1.0, &mut audio)
            .expect("synthesize");
        let secs = audio.len() as f64 / f64::from(SAMPLE_RATE);
        let rms = (audio.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>()
            / audio.len().max(1) as f64)
            .sqrt();
        eprintln!(
            "kokoro zh: {:?} → {secs:.2} s of audio in {:?}, rms {rms:.3}, {stats:?}",
            zh.phonemes,
            start.elapsed()
        );
        assert_eq!(stats.unknown_symbols, 0);
        assert_eq!(stats.passes, 1);
        assert!((1.0..=5.0).contains(&secs), "{secs} s");
        assert!(rms > 0.01, "rms {rms}");
    }
}
