//! Microbenchmark of the downlink's CPU costs on an inference core: Piper real-time factor per
//! sentence, espeak-ng synthesis time, FFT resampling 22050 → 24000 Hz per second of audio, and
//! Opus encode of a 60 ms, 24 kHz downlink frame at complexity 0, 5 and 9 (`Application::Audio`).
//!
//! Run: `cargo run --release --example bench_tts` (needs `make setup` for the Piper voice and
//! ONNX Runtime). The thread is pinned to core 1 (override with `BENCH_CORE`).

use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

use common::BoxError;
use xiaozhi_tpc::audio::encode::{frames, DownlinkEncoder, DOWNLINK_RATE};
use xiaozhi_tpc::audio::resample::resample;
use xiaozhi_tpc::providers::tts::{espeak, PiperVoice};

const RUNS: usize = 5;
const SENTENCES: [&str; 5] = [
    "Hello! The kitchen lights are on.",
    "The weather today is sunny with a light breeze, and the high will be twenty two degrees.",
    "Okay, I have set a timer for ten minutes, and I will remind you to call your mother at \
     six o'clock this evening.",
    // A segment at the default tts.max_segment_chars (100) ...
    "the quick brown fox jumps over the lazy dog while the old cat sleeps on the warm mat by the door",
    // ... and the heaviest one the splitter makes of digits (12 digits weigh 96).
    "999999999999",
];
const ESPEAK_TEXTS: [(&str, &str); 2] = [
    ("en-us", "The weather today is sunny with a light breeze."),
    ("cmn", "你好，我是小智，今天天气很好。"),
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

    let t = Instant::now();
    espeak::init()?;
    println!("espeak-ng init: {:.1} ms", common::ms(t.elapsed()));
    let t = Instant::now();
    let mut voice = PiperVoice::load(&lib, &models.join("piper/en_US-joe-medium.onnx"))?;
    println!("Piper voice load: {:.1} ms\n", common::ms(t.elapsed()));

    let (run0, wait0) = common::schedstat();
    let wall0 = Instant::now();
    let speech = bench_piper(&mut voice)?;
    bench_espeak()?;
    let speech24 = bench_resample(&speech, voice.sample_rate());
    bench_encode(&speech24)?;
    let (run1, wait1) = common::schedstat();
    println!(
        "\nthis thread over the benchmarks: {:.2} s wall, {:.2} s on CPU, {:.2} s runnable but \
         waiting for the CPU (other load on core {core})",
        wall0.elapsed().as_secs_f64(),
        (run1 - run0) as f64 / 1e9,
        (wait1 - wait0) as f64 / 1e9
    );
    Ok(())
}

/// Piper per sentence: median of `RUNS` timed runs after one warm-up. Returns all the audio.
fn bench_piper(voice: &mut PiperVoice) -> Result<Vec<i16>, BoxError> {
    println!("Piper en_US-joe-medium, 1 intra-op thread, median of {RUNS} runs\n");
    println!(
        "| sentence | audio s | phoneme ids | wall ms (median) | min–max ms | RTF | CPU ms | \
         RTF (CPU) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut all = Vec::new();
    for text in SENTENCES {
        let mut pcm = Vec::new();
        let stats = voice.synthesize(text, &mut pcm)?;
        let secs = pcm.len() as f64 / f64::from(voice.sample_rate());
        let mut times = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..RUNS {
            pcm.clear();
            let (run0, _) = common::schedstat();
            let t = Instant::now();
            voice.synthesize(text, &mut pcm)?;
            times.push(common::ms(t.elapsed()));
            cpu.push((common::schedstat().0 - run0) as f64 / 1e6);
        }
        let (lo, hi) = (
            times.iter().copied().fold(f64::MAX, f64::min),
            times.iter().copied().fold(0.0, f64::max),
        );
        let med = common::median(times);
        let cpu = common::median(cpu);
        println!(
            "| {:.40} | {secs:.2} | {} | {med:.1} | {lo:.1}–{hi:.1} | {:.3} | {cpu:.1} | {:.3} |",
            text,
            stats.phoneme_ids,
            med / 1e3 / secs,
            cpu / 1e3 / secs
        );
        all.extend_from_slice(&pcm);
    }
    Ok(all)
}

fn bench_espeak() -> Result<(), BoxError> {
    println!("\nespeak-ng direct synthesis (22050 Hz), median of {RUNS} runs\n");
    println!("| voice | text | audio s | synth ms | RTF |");
    println!("|---|---|---:|---:|---:|");
    for (voice, text) in ESPEAK_TEXTS {
        let pcm = espeak::synthesize(voice, text)?;
        let secs = pcm.len() as f64 / f64::from(espeak::sample_rate()?);
        let mut times = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            espeak::synthesize(voice, text)?;
            times.push(common::ms(t.elapsed()));
        }
        let med = common::median(times);
        println!(
            "| {voice} | {text} | {secs:.2} | {med:.2} | {:.4} |",
            med / 1e3 / secs
        );
    }
    Ok(())
}

/// 22050 → 24000 Hz of the Piper audio: cost per second of audio, median of 21 calls,
/// first call (which builds the resampler) reported apart.
fn bench_resample(speech: &[i16], rate: u32) -> Vec<i16> {
    let secs = speech.len() as f64 / f64::from(rate);
    let one_second = &speech[..(rate as usize).min(speech.len())];
    let t = Instant::now();
    let out = resample(speech, rate, DOWNLINK_RATE);
    let first = common::ms(t.elapsed());
    let mut whole = Vec::new();
    let mut short = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        std::hint::black_box(resample(speech, rate, DOWNLINK_RATE));
        whole.push(common::ms(t.elapsed()) * 1e3 / secs);
        let t = Instant::now();
        std::hint::black_box(resample(one_second, rate, DOWNLINK_RATE));
        short.push(common::ms(t.elapsed()) * 1e3);
    }
    println!("\nresample {rate} → {DOWNLINK_RATE} Hz (rubato Fft, chunk 1024, delay trimmed)\n");
    println!(
        "- {secs:.1} s clip: {:.0} µs per second of audio (median of 21); first call incl. \
         resampler construction {:.0} µs per second",
        common::median(whole),
        first * 1e3 / secs
    );
    println!(
        "- 1 s clip: {:.0} µs per call (median of 21)",
        common::median(short)
    );
    out
}

fn bench_encode(speech24: &[i16]) -> Result<(), BoxError> {
    const PASSES: usize = 10;
    let frame = (DOWNLINK_RATE * 60 / 1000) as usize;
    let all: Vec<Vec<i16>> = frames(speech24, frame).map(|f| f.into_owned()).collect();
    println!(
        "\nOpus encode, 24 kHz mono, Application::Audio, 24 kb/s, 60 ms frames; {} frames × \
         {PASSES} passes, per-frame µs\n",
        all.len()
    );
    println!("| complexity | p50 | p90 | p99 | mean | bytes/packet | CPU ms per audio s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for complexity in [0, 5, 9] {
        let mut enc = DownlinkEncoder::new(DOWNLINK_RATE, complexity)?;
        for f in &all {
            enc.encode(f)?;
        }
        let mut times = Vec::with_capacity(all.len() * PASSES);
        let mut bytes = 0usize;
        for _ in 0..PASSES {
            for f in &all {
                let t = Instant::now();
                bytes += enc.encode(f)?.len();
                times.push(t.elapsed().as_nanos() as f64 / 1e3);
            }
        }
        let n = times.len();
        let mean = times.iter().sum::<f64>() / n as f64;
        times.sort_by(f64::total_cmp);
        let q = |p: f64| times[((n - 1) as f64 * p) as usize];
        println!(
            "| {complexity} | {:.0} | {:.0} | {:.0} | {mean:.0} | {} | {:.2} |",
            q(0.5),
            q(0.9),
            q(0.99),
            bytes / n,
            mean / 60.0
        );
    }
    Ok(())
}
