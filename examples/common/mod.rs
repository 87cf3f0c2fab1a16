//! What the benchmark examples share: the core to pin to, where the models are, and an espeak-ng
//! utterance resampled by sox. Included with `#[path = "common/mod.rs"] mod common;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Boxed error for the examples' `main`.
pub type BoxError = Box<dyn std::error::Error>;

/// The core to pin to: `BENCH_CORE`, default 1 (the inference core of a 2-core plan).
pub fn bench_core() -> usize {
    std::env::var("BENCH_CORE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// The models folder: `XIAOZHI_MODELS`, default `models/` in the repository.
pub fn models_dir() -> PathBuf {
    std::env::var_os("XIAOZHI_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// The ONNX Runtime library: `ORT_DYLIB_PATH`, default the one the set-up installs.
pub fn onnxruntime_lib(models: &Path) -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| models.join("onnxruntime/libonnxruntime.so.1.31.1"))
}

/// `text` spoken by espeak-ng, resampled by sox to `rate` Hz mono 16-bit without dither (every
/// run gets the same samples), with `pad_s` seconds of silence on each side.
pub fn speech(text: &str, rate: u32, pad_s: f32) -> Result<Vec<i16>, BoxError> {
    let dir = std::env::temp_dir();
    let tag = format!("bench-example-{}-{rate}", std::process::id());
    let raw = dir.join(format!("{tag}.wav"));
    let out = dir.join(format!("{tag}-out.wav"));
    let status = Command::new("espeak-ng")
        .arg("-w")
        .arg(&raw)
        .arg(text)
        .status()?;
    if !status.success() {
        return Err(format!("espeak-ng failed: {status}").into());
    }
    let pad = pad_s.to_string();
    let status = Command::new("sox")
        .args(["-V1", "-D"])
        .arg(&raw)
        .args(["-r", &rate.to_string(), "-c", "1", "-b", "16"])
        .arg(&out)
        .args(["pad", &pad, &pad])
        .status()?;
    if !status.success() {
        return Err(format!("sox failed: {status}").into());
    }
    let pcm = hound::WavReader::open(&out)?
        .into_samples::<i16>()
        .collect::<Result<Vec<_>, _>>()?;
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&out);
    Ok(pcm)
}

/// Nanoseconds this thread has run and waited on a run queue (`/proc/thread-self/schedstat`);
/// zeros where unavailable.
pub fn schedstat() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0));
    (fields.next().unwrap_or(0), fields.next().unwrap_or(0))
}

/// A duration in milliseconds.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The median of `v` (the upper one of an even count); `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds of CPU all of this process's live threads have used (the sum of
/// `/proc/self/task/*/schedstat`): work done on helper threads (CTranslate2's compute thread,
/// ONNX Runtime's pool) counts too.
pub fn process_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
