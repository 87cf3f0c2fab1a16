//! Recognition quality of the local ASR, and the Mandarin round trip: a fixed set of English and
//! Chinese questions is spoken by the local voices (Piper and Kokoro for English, three Kokoro
//! Mandarin voices for Chinese), put at 16 kHz over a low room-noise floor as a device microphone
//! would hear it, and transcribed by each Whisper setting the `language` key can pick. Prints the
//! word error rate (English) and character error rate (Chinese, punctuation ignored), how often
//! the language was detected right, and the CPU used per second of audio — and, on the way, what
//! each voice costs per second of speech it makes.
//!
//! Run: `cargo run --release --example eval_asr` (needs `scripts/setup.sh asr-tiny asr-base tts
//! kokoro`). Everything runs on one pinned core (`BENCH_CORE`, default 1). The speech is
//! synthetic (no recorded speech ships in a registry package this project may use), so the
//! figures compare models and settings; real voices in real rooms score worse.

use std::path::Path;
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

use common::BoxError;
use xiaozhi_tpc::audio::resample::resample;
use xiaozhi_tpc::providers::asr::{ChineseScript, WhisperSettings, WhisperWorker};
use xiaozhi_tpc::providers::tts::{KokoroSettings, TtsEngine, TtsWorker};

/// English questions (no digits: "ten" and "10" would both be right).
const ENGLISH: &[&str] = &[
    "What time is it right now?",
    "Turn on the kitchen lights and start a short timer.",
    "What is the weather like today?",
    "Please play some relaxing music in the living room.",
    "How far is the moon from the earth?",
    "Remind me to call my mother tomorrow morning.",
    "Can you tell me a short story about a dragon?",
    "Make the speaker a little louder.",
];

/// Chinese questions, as a device owner would ask them.
const CHINESE: &[&str] = &[
    "现在几点了？",
    "今天天气怎么样？",
    "请把客厅的灯打开。",
    "明天早上提醒我给妈妈打电话。",
    "给我讲一个关于小龙的故事。",
    "把音量调大一点。",
    "北京到上海有多远？",
    "播放一些轻松的音乐。",
];

const ENGLISH_VOICES: &[Voice] = &[
    Voice::Piper,
    Voice::Kokoro("af_heart"),
    Voice::Kokoro("am_michael"),
];
const CHINESE_VOICES: &[Voice] = &[
    Voice::Kokoro("zf_xiaoxiao"),
    Voice::Kokoro("zm_yunxi"),
    Voice::Kokoro("zf_xiaoyi"),
];

/// Room noise floor: about -50 dBFS RMS, some 30 dB under the voices.
const NOISE_RMS: f32 = 100.0;

#[derive(Clone, Copy)]
enum Voice {
    Piper,
    Kokoro(&'static str),
}

impl Voice {
    fn name(self) -> &'static str {
        match self {
            Voice::Piper => "piper joe",
            Voice::Kokoro(v) => v,
        }
    }
    fn engine(self) -> TtsEngine {
        match self {
            Voice::Piper => TtsEngine::Piper,
            Voice::Kokoro(v) => TtsEngine::Kokoro { voice: v.into() },
        }
    }
}

/// One spoken question at 16 kHz.
struct Utterance {
    text: &'static str,
    chinese: bool,
    pcm: Vec<i16>,
}

/// (label, model folder, language setting)
const SETTINGS: &[(&str, &str, Option<&str>)] = &[
    ("tiny.en (language=en)", "whisper-tiny.en", Some("en")),
    ("base, fixed en", "whisper-base", Some("en")),
    ("base, fixed zh (language=zh)", "whisper-base", Some("zh")),
    (
        "base, zh or en (language=auto)",
        "whisper-base",
        Some("zh,en"),
    ),
];

fn main() -> Result<(), BoxError> {
    let core = common::bench_core();
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        eprintln!("warning: could not pin the evaluation to core {core}");
    }
    let models = common::models_dir();
    let lib = common::onnxruntime_lib(&models);
    let utterances = speak(&lib, &models)?;
    let audio_s = |chinese: bool| {
        utterances
            .iter()
            .filter(|u| u.chinese == chinese)
            .map(|u| u.pcm.len() as f64 / 16_000.0)
            .sum::<f64>()
    };
    println!(
        "{} English utterances ({:.1} s) by {}; {} Chinese ({:.1} s) by {}; noise floor {NOISE_RMS} RMS; core {core}\n",
        ENGLISH.len() * ENGLISH_VOICES.len(),
        audio_s(false),
        ENGLISH_VOICES.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "),
        CHINESE.len() * CHINESE_VOICES.len(),
        audio_s(true),
        CHINESE_VOICES.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "),
    );
    println!("| Whisper (int8, beam 5) | English WER | Chinese CER | language right | CPU ms per audio s |");
    println!("|---|---:|---:|---:|---:|");
    for &(label, model, language) in SETTINGS {
        let mut worker = match WhisperWorker::load(&WhisperSettings {
            model_dir: models.join(model),
            language: language.map(String::from),
            int8: true,
            core,
            beam_size: 5,
            window_ms: 10_000,
            chinese_script: ChineseScript::Simplified,
        }) {
            Ok(w) => w,
            Err(e) => {
                println!("| {label} | {e} | | | |");
                continue;
            }
        };
        // One untimed run: the first call pays one-off allocations.
        worker.transcribe(&utterances[0].pcm)?;
        let mut en = Score::default();
        let mut zh = Score::default();
        let (mut right, mut cpu_ns, mut seconds) = (0, 0u64, 0.0);
        let english_only = !worker.is_multilingual();
        for u in &utterances {
            if english_only && u.chinese {
                continue;
            }
            let cpu0 = common::process_cpu_ns();
            let t = worker.transcribe(&u.pcm)?;
            cpu_ns += common::process_cpu_ns() - cpu0;
            seconds += u.pcm.len() as f64 / 16_000.0;
            right += usize::from((t.language == "zh") == u.chinese);
            if std::env::var_os("EVAL_VERBOSE").is_some() {
                println!("  [{}] {} -> {}", t.language, u.text, t.text);
            }
            if u.chinese {
                zh.add(chars(u.text), chars(&t.text));
            } else {
                en.add(words(u.text), words(&t.text));
            }
        }
        let heard = if english_only {
            utterances.iter().filter(|u| !u.chinese).count()
        } else {
            utterances.len()
        };
        println!(
            "| {label} | {} | {} | {right}/{heard} | {:.0} |",
            en.percent(),
            if english_only {
                "(English only)".into()
            } else {
                zh.percent()
            },
            cpu_ns as f64 / 1e6 / seconds
        );
    }
    Ok(())
}

/// Every question in every voice, at 16 kHz with 0.3 s of noise before and after.
fn speak(lib: &Path, models: &Path) -> Result<Vec<Utterance>, BoxError> {
    let kokoro_voices: Vec<String> = ENGLISH_VOICES
        .iter()
        .chain(CHINESE_VOICES)
        .filter_map(|v| match v {
            Voice::Kokoro(name) => Some(name.to_string()),
            Voice::Piper => None,
        })
        .collect();
    let mut tts = TtsWorker::load(
        lib,
        Some(&models.join("piper/en_US-joe-medium.onnx")),
        Some(&KokoroSettings {
            dir: models.join("kokoro"),
            voices: kokoro_voices,
            speed: 1.0,
        }),
    )?;
    let mut noise = Noise::new(0x5eed);
    let mut out = Vec::new();
    let started = Instant::now();
    println!("| voice | audio s | CPU ms per audio s |");
    println!("|---|---:|---:|");
    for (texts, voices, chinese) in [
        (ENGLISH, ENGLISH_VOICES, false),
        (CHINESE, CHINESE_VOICES, true),
    ] {
        for &voice in voices {
            let (mut cpu_ns, mut audio_s) = (0u64, 0.0);
            for &text in texts {
                let cpu0 = common::process_cpu_ns();
                let (pcm, rate) = tts.synthesize(text, &voice.engine())?;
                cpu_ns += common::process_cpu_ns() - cpu0;
                audio_s += pcm.len() as f64 / f64::from(rate);
                let speech = resample(&pcm, rate, 16_000);
                let pad = vec![0i16; 4_800];
                let mut pcm: Vec<i16> = pad.iter().chain(&speech).chain(&pad).copied().collect();
                noise.add_to(&mut pcm);
                out.push(Utterance { text, chinese, pcm });
            }
            println!(
                "| {} | {audio_s:.1} | {:.0} |",
                voice.name(),
                cpu_ns as f64 / 1e6 / audio_s
            );
        }
    }
    println!();
    eprintln!(
        "synthesised {} utterances in {:.1} s",
        out.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// Errors and reference length, summed over utterances.
#[derive(Default)]
struct Score {
    errors: usize,
    length: usize,
}

impl Score {
    fn add<T: PartialEq>(&mut self, reference: Vec<T>, heard: Vec<T>) {
        self.errors += strsim::generic_levenshtein(&reference, &heard);
        self.length += reference.len();
    }
    fn percent(&self) -> String {
        if self.length == 0 {
            return "-".into();
        }
        format!("{:.1} %", 100.0 * self.errors as f64 / self.length as f64)
    }
}

/// Lowercase words without punctuation.
fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .flat_map(char::to_lowercase)
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// The characters that count for CER: letters and digits (Han included), no punctuation.
fn chars(text: &str) -> Vec<char> {
    text.chars().filter(|c| c.is_alphanumeric()).collect()
}

/// Low-passed white noise (xorshift, fixed seed): a steady, slightly dull room hiss.
struct Noise {
    state: u64,
    low: f32,
}

impl Noise {
    fn new(seed: u64) -> Self {
        Noise {
            state: seed,
            low: 0.0,
        }
    }
    fn add_to(&mut self, pcm: &mut [i16]) {
        for s in pcm {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let white = (self.state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            // One-pole low-pass; the gain keeps the RMS near NOISE_RMS.
            self.low = 0.9 * self.low + 0.1 * white;
            let n = self.low * NOISE_RMS * 7.5;
            *s = (f32::from(*s) + n).clamp(-32768.0, 32767.0) as i16;
        }
    }
}
