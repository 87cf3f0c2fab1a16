//! Silero VAD under one `inference.ort_memory` setting: CPU per 32 ms chunk at batch sizes
//! 1, 8, 32 and 64 (interleaved, so the batch shapes change from run to run as they do on a
//! busy worker), and the resident size before and after. The TTS side is measured on the real
//! server by `scripts/measure-ort-memory.py`; tuning.md, "ONNX Runtime memory", has both.
//!
//! Run once per setting (the setting is process-wide), alternating:
//! `cargo run --release --example bench_ort_memory -- arena` (or `no_pattern`, `arena_shrink`,
//! `no_arena`). The thread is pinned to core 1 (override with `BENCH_CORE`).

#[path = "common/mod.rs"]
mod common;

use common::BoxError;
use xiaozhi_tpc::providers::onnx::{init_runtime_with, OrtMemory};
use xiaozhi_tpc::providers::vad::silero::{SileroModel, VadStream, CHUNK};

const BATCHES: [usize; 4] = [1, 8, 32, 64];
const ROUNDS: usize = 200;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> Result<(), BoxError> {
    let setting = std::env::args().nth(1).unwrap_or_else(|| "arena".into());
    let memory: OrtMemory = serde_json::from_value(serde_json::Value::String(setting.clone()))?;
    let core = common::bench_core();
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        println!("WARNING: could not pin to core {core}");
    }
    let models = common::models_dir();
    let lib = common::onnxruntime_lib(&models);
    init_runtime_with(&lib, memory)?;
    let mut model = SileroModel::load(&lib, &models.join("silero_vad.onnx"))?;
    let rss0 = rss_mib();
    let chunk = [0.01f32; CHUNK];
    let mut streams: Vec<VadStream> = (0..64).map(|_| VadStream::default()).collect();
    let mut probs = Vec::new();
    let mut cpu_ns = [0u64; BATCHES.len()];
    for _ in 0..ROUNDS {
        for (i, &b) in BATCHES.iter().enumerate() {
            let mut rows: Vec<(&[f32; CHUNK], &mut VadStream)> =
                streams.iter_mut().take(b).map(|s| (&chunk, s)).collect();
            probs.clear();
            let (run0, _) = common::schedstat();
            model.infer_batch(&mut rows, &mut probs)?;
            cpu_ns[i] += common::schedstat().0 - run0;
        }
    }
    let per_chunk: Vec<String> = BATCHES
        .iter()
        .zip(cpu_ns)
        .map(|(&b, ns)| format!("b{b} {:.1} µs", ns as f64 / 1e3 / (ROUNDS * b) as f64))
        .collect();
    println!(
        "{setting:12} VAD CPU per chunk: {}; RSS {rss0:.0} -> {:.0} MiB",
        per_chunk.join(", "),
        rss_mib()
    );
    Ok(())
}
