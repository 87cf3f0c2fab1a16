//! Microbenchmark of the per-stream CPU costs on an inference core: Silero VAD per 32 ms chunk
//! at several batch sizes (both model files), Opus decode of a 60 ms uplink frame at 16 kHz, and
//! Opus encode of a 60 ms downlink frame at 24 kHz.
//!
//! Run: `cargo run --release --example bench_vad_opus` (needs espeak-ng, sox and `make setup`).
//! The thread is pinned to core 1 (override with `BENCH_CORE`). Configurations are interleaved
//! within each round so a slow phase of the VM hits all of them alike. `VAD_GAP_US=5000` sleeps
//! that long before each timed VAD pass, as the server's worker idles between ticks, so the
//! passes run on cold caches (back-to-back passes are the best case).

use std::path::Path;
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

use common::BoxError;
use hdrhistogram::Histogram;
use opus::{Application, Bitrate, Channels, Decoder, Encoder};
use xiaozhi_tpc::providers::vad::silero::{SileroModel, VadStream, CHUNK};

const ROUNDS: usize = 5;
const BATCHES: [usize; 4] = [1, 8, 32, 64];
const MODELS: [&str; 2] = ["silero_vad.onnx", "silero_vad_op18_ifless.onnx"];
const TEXT: &str = "Hello, this is a benchmark of the voice assistant server. \
    The weather today is sunny with a light breeze, and the kitchen lights are on. \
    Please set a timer for ten minutes, then remind me to call my mother at six o'clock. \
    What is the capital of France, and how far is it from Berlin by train? \
    Play some quiet music in the living room while I read the news.";

fn main() -> Result<(), BoxError> {
    let core = common::bench_core();
    let _pin = pin_to_core(core);

    let models = common::models_dir();
    let lib = common::onnxruntime_lib(&models);

    let speech16 = common::speech(TEXT, 16_000, 1.0)?;
    let speech24 = common::speech(TEXT, 24_000, 1.0)?;
    println!(
        "audio: espeak-ng, {:.1} s at 16 kHz and 24 kHz; {ROUNDS} interleaved rounds\n",
        speech16.len() as f64 / 16_000.0
    );

    bench_vad(&lib, &models, &speech16)?;
    bench_opus_decode(&speech16)?;
    bench_opus_encode(&speech24)?;
    Ok(())
}

/// Pins this thread: glommio's executor builder binds the calling thread to its placement
/// (the crate has no direct `core_affinity` dependency). The executor itself stays idle.
fn pin_to_core(core: usize) -> Option<glommio::LocalExecutor> {
    match glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(core)).make() {
        Ok(ex) => {
            let allowed = std::fs::read_to_string("/proc/thread-self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("Cpus_allowed_list"))
                        .map(|l| l.split_whitespace().last().unwrap_or("?").to_owned())
                })
                .unwrap_or_else(|| "?".into());
            println!("pinned to core {core} (Cpus_allowed_list {allowed})");
            Some(ex)
        }
        Err(e) => {
            println!("WARNING: could not pin to core {core}: {e}; running unpinned");
            None
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn row(label: &str, h: &Histogram<u64>, extra: &str) {
    println!(
        "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {extra} |",
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.9)),
        us(h.value_at_quantile(0.99)),
        h.mean() / 1000.0,
    );
}

/// One VAD configuration: B streams, each with its own state and its own place in the audio.
struct VadCase {
    model: usize,
    batch: usize,
    chunks: Vec<Vec<[f32; CHUNK]>>,
    streams: Vec<VadStream>,
    step: usize,
    per_chunk: Histogram<u64>,
    per_run: Histogram<u64>,
    round_p50: Vec<u64>,
}

fn bench_vad(lib: &Path, dir: &Path, audio: &[i16]) -> Result<(), BoxError> {
    let mut models = Vec::new();
    for name in MODELS {
        let t = Instant::now();
        models.push(SileroModel::load(lib, &dir.join(name))?);
        println!("loaded {name} in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    let steps = audio.len() / CHUNK;
    let mut cases = Vec::new();
    for model in 0..models.len() {
        for &batch in &BATCHES {
            let chunks = (0..batch)
                .map(|r| {
                    (0..steps)
                        .map(|i| {
                            let mut c = [0.0f32; CHUNK];
                            for (j, s) in c.iter_mut().enumerate() {
                                let at = (r * 102_947 + i * CHUNK + j) % audio.len();
                                *s = f32::from(audio[at]) / 32768.0;
                            }
                            c
                        })
                        .collect()
                })
                .collect();
            cases.push(VadCase {
                model,
                batch,
                chunks,
                streams: vec![VadStream::default(); batch],
                step: 0,
                per_chunk: histogram(),
                per_run: histogram(),
                round_p50: Vec::new(),
            });
        }
    }
    // VAD_GAP_US: sleep this long before every timed pass, as a server's worker idles between
    // ticks (caches and the core cool down); 0 = back-to-back passes.
    let gap = std::time::Duration::from_micros(
        std::env::var("VAD_GAP_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let mut probs = Vec::with_capacity(64);
    let mut speech_rows = 0usize;
    let mut all_rows = 0usize;
    // One forward pass of `case`; returns its wall time in ns.
    let mut run = |case: &mut VadCase, models: &mut [SileroModel]| -> Result<u64, BoxError> {
        let step = case.step % steps;
        if step == 0 {
            case.streams.fill(VadStream::default());
        }
        case.step += 1;
        let mut rows: Vec<(&[f32; CHUNK], &mut VadStream)> = case
            .chunks
            .iter()
            .zip(case.streams.iter_mut())
            .map(|(c, s)| (&c[step], s))
            .collect();
        probs.clear();
        let t = Instant::now();
        models[case.model].infer_batch(&mut rows, &mut probs)?;
        let ns = t.elapsed().as_nanos() as u64;
        speech_rows += probs.iter().filter(|&&p| p > 0.5).count();
        all_rows += probs.len();
        Ok(ns)
    };
    for round in 0..ROUNDS {
        for case in cases.iter_mut() {
            let warm = if round == 0 { 2000 / case.batch } else { 0 }.max(30);
            let timed = (24_000 / case.batch).max(300);
            let timed = if gap.is_zero() { timed } else { timed.min(400) };
            for _ in 0..warm {
                run(case, &mut models)?;
            }
            let mut this_round = histogram();
            for _ in 0..timed {
                if !gap.is_zero() {
                    std::thread::sleep(gap);
                }
                let ns = run(case, &mut models)?;
                let per_chunk = ns / case.batch as u64;
                case.per_run.record(ns.max(1))?;
                case.per_chunk.record(per_chunk.max(1))?;
                this_round.record(per_chunk.max(1))?;
            }
            case.round_p50.push(this_round.value_at_quantile(0.5));
        }
    }
    println!(
        "\nSilero VAD, cost per 32 ms chunk (µs; infer_batch = gather + run + scatter); \
         {:.0} % of row-chunks had p > 0.5\n",
        100.0 * speech_rows as f64 / all_rows.max(1) as f64
    );
    println!("| model | B | chunk p50 | chunk p90 | chunk p99 | chunk mean | run p50 / p99; p50 range over rounds |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for case in &cases {
        let lo = case.round_p50.iter().min().copied().unwrap_or(0);
        let hi = case.round_p50.iter().max().copied().unwrap_or(0);
        let extra = format!(
            "{:.0} / {:.0}; {:.1}–{:.1}",
            us(case.per_run.value_at_quantile(0.5)),
            us(case.per_run.value_at_quantile(0.99)),
            us(lo),
            us(hi)
        );
        row(
            &format!("{} | {}", MODELS[case.model], case.batch),
            &case.per_chunk,
            &extra,
        );
    }
    Ok(())
}

/// Times `op` on every frame: one warm-up pass, then `ROUNDS` rounds of `passes` passes.
fn time_frames(
    frames: usize,
    passes: usize,
    mut op: impl FnMut(usize) -> Result<(), BoxError>,
    hist: &mut Histogram<u64>,
    warm: bool,
) -> Result<(), BoxError> {
    if warm {
        for f in 0..frames {
            op(f)?;
        }
    }
    for _ in 0..passes {
        for f in 0..frames {
            let t = Instant::now();
            op(f)?;
            hist.record((t.elapsed().as_nanos() as u64).max(1))?;
        }
    }
    Ok(())
}

fn bench_opus_decode(audio16: &[i16]) -> Result<(), BoxError> {
    const FRAME: usize = 960; // 60 ms at 16 kHz
    let mut enc = Encoder::new(16_000, Channels::Mono, Application::Voip)?;
    enc.set_bitrate(Bitrate::Bits(24_000))?;
    let mut buf = [0u8; 4000];
    let mut packets = Vec::new();
    for frame in audio16.chunks_exact(FRAME) {
        let n = enc.encode(frame, &mut buf)?;
        packets.push(buf[..n].to_vec());
    }
    let bytes: usize = packets.iter().map(Vec::len).sum();
    let mut dec = Decoder::new(16_000, Channels::Mono)?;
    let mut pcm = [0i16; FRAME];
    let mut hist = histogram();
    for round in 0..ROUNDS {
        time_frames(
            packets.len(),
            4,
            |f| {
                let n = dec.decode(&packets[f], &mut pcm, false)?;
                assert_eq!(n, FRAME);
                Ok(())
            },
            &mut hist,
            round == 0,
        )?;
    }
    println!(
        "\nOpus per 60 ms frame (µs), {} frames × 4 passes × {ROUNDS} rounds\n",
        packets.len()
    );
    println!("| operation | p50 | p90 | p99 | mean | bytes/packet |");
    println!("|---|---:|---:|---:|---:|---|");
    row(
        "decode @16 kHz (16 kHz VOIP 24 kb/s packets)",
        &hist,
        &format!("{:.0}", bytes as f64 / packets.len() as f64),
    );
    Ok(())
}

fn bench_opus_encode(audio24: &[i16]) -> Result<(), BoxError> {
    const FRAME: usize = 1440; // 60 ms at 24 kHz
    let frames: Vec<&[i16]> = audio24.chunks_exact(FRAME).collect();
    struct Case {
        label: String,
        enc: Encoder,
        hist: Histogram<u64>,
        bytes: usize,
        packets: usize,
    }
    let mut cases = Vec::new();
    for (app, complexity) in [(Application::Audio, Some(5)), (Application::Voip, None)] {
        let mut enc = Encoder::new(24_000, Channels::Mono, app)?;
        enc.set_bitrate(Bitrate::Bits(32_000))?;
        if let Some(c) = complexity {
            enc.set_complexity(c)?;
        }
        let label = format!(
            "encode @24 kHz {:?} 32 kb/s, complexity {}{}",
            app,
            enc.get_complexity()?,
            if complexity.is_none() {
                " (default)"
            } else {
                ""
            }
        );
        cases.push(Case {
            label,
            enc,
            hist: histogram(),
            bytes: 0,
            packets: 0,
        });
    }
    let mut buf = [0u8; 4000];
    for round in 0..ROUNDS {
        for case in cases.iter_mut() {
            let (enc, bytes, packets) = (&mut case.enc, &mut case.bytes, &mut case.packets);
            time_frames(
                frames.len(),
                2,
                |f| {
                    *bytes += enc.encode(frames[f], &mut buf)?;
                    *packets += 1;
                    Ok(())
                },
                &mut case.hist,
                round == 0,
            )?;
        }
    }
    for case in &cases {
        row(
            &case.label,
            &case.hist,
            &format!("{:.0}", case.bytes as f64 / case.packets.max(1) as f64),
        );
    }
    Ok(())
}
