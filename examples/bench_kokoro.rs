//! Microbenchmark of Kokoro-82M v1.0 (int8) on one pinned inference core: real-time factor and
//! CPU milliseconds per second of audio for a Chinese and an English sentence (front end
//! included and reported apart), plus the one-off load costs (model, jieba dictionary).
//!
//! Run: `cargo run --release --example bench_kokoro` (needs `scripts/setup.sh runtime kokoro`).
//! The thread is pinned to core 1 (override with `BENCH_CORE`); voices with `KOKORO_VOICE_ZH`
//! and `KOKORO_VOICE_EN` (defaults `zf_xiaoxiao`, `af_heart`).

use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

use common::BoxError;
use xiaozhi_tpc::providers::tts::kokoro::{KokoroModel, SAMPLE_RATE};
use xiaozhi_tpc::providers::tts::worker::kokoro_phonemes;
use xiaozhi_tpc::providers::tts::{espeak, zh};

const RUNS: usize = 3;
const TEXTS: [(&str, &str); 4] = [
    ("zh", "你好，我是小智。"),
    (
        "zh",
        "今天北京晴，最高气温25℃，下午3点以后有小雨，出门记得带伞。",
    ),
    ("en", "Hello! The kitchen lights are on."),
    (
        "en",
        "The weather today is sunny with a light breeze, and the high will be twenty two degrees.",
    ),
];

fn main() -> Result<(), BoxError> {
    let core = common::bench_core();
    if core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        println!("pinned to core {core}");
    } else {
        println!("WARNING: could not pin to core {core}; running unpinned");
    }
    let models = common::models_dir();
    let lib = common::onnxruntime_lib(&models);
    let voice_zh = std::env::var("KOKORO_VOICE_ZH").unwrap_or_else(|_| "zf_xiaoxiao".into());
    let voice_en = std::env::var("KOKORO_VOICE_EN").unwrap_or_else(|_| "af_heart".into());

    espeak::init()?;
    let t = Instant::now();
    zh::warm_up();
    println!("jieba dictionary build: {:.0} ms", common::ms(t.elapsed()));
    let t = Instant::now();
    let mut model = KokoroModel::load(
        &lib,
        &models.join("kokoro"),
        &[voice_zh.as_str(), voice_en.as_str()],
    )?;
    println!(
        "Kokoro load (1 intra-op thread): {:.0} ms\n",
        common::ms(t.elapsed())
    );

    println!("Kokoro-82M v1.0 int8, 24 kHz, median of {RUNS} runs after one warm-up\n");
    println!(
        "| lang | text | ids | audio s | front end ms | wall ms | CPU ms | RTF (wall) | CPU ms per \
         audio s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (lang, text) in TEXTS {
        let voice = if lang == "zh" { &voice_zh } else { &voice_en };
        let t = Instant::now();
        let phonemes = kokoro_phonemes(text)?;
        let front = common::ms(t.elapsed());
        let mut audio = Vec::new();
        let stats = model.synthesize(&phonemes, voice, 1.0, &mut audio)?;
        let secs = audio.len() as f64 / f64::from(SAMPLE_RATE);
        let mut wall = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..RUNS {
            audio.clear();
            let (run0, _) = common::schedstat();
            let t = Instant::now();
            model.synthesize(&phonemes, voice, 1.0, &mut audio)?;
            wall.push(common::ms(t.elapsed()));
            cpu.push((common::schedstat().0 - run0) as f64 / 1e6);
        }
        let (wall, cpu) = (common::median(wall), common::median(cpu));
        println!(
            "| {lang} | {text} | {} | {secs:.2} | {front:.2} | {wall:.0} | {cpu:.0} | {:.2} | {:.0} |",
            stats.ids,
            wall / 1e3 / secs,
            cpu / secs
        );
        if stats.unknown_symbols > 0 {
            println!(
                "  (unknown symbols skipped: {} {:?})",
                stats.unknown_symbols, stats.unknown
            );
        }
    }
    Ok(())
}
