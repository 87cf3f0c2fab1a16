//! Starting the inference workers: models verified and loaded on their pinned cores, one reply
//! channel per shard and per kind of work.
//!
//! Every inference core runs one VAD worker; when the local providers are selected it also
//! runs one Whisper worker (ASR) and one Piper/espeak worker (TTS). They are separate threads
//! pinned to the same core: VAD jobs are short and frequent, ASR jobs long and rare, and the
//! kernel time-slices between them, so a long recognition does not hold VAD results hostage.

use std::time::Duration;

use shards::{Routed, WorkerPool, WorkerPoolConfig};

use crate::config::{AsrProvider, Config};
use crate::providers::asr::{AsrJob, AsrReply, WhisperSettings, WhisperWorker};
use crate::providers::tts::{KokoroSettings, TtsJob, TtsReply, TtsWorker};
use crate::providers::vad::{VadBatch, VadBatchReply, VadWorker};

/// Job queues into the inference workers (cheap to clone, `Send`).
#[derive(Clone)]
pub struct InferenceQueues {
    /// VAD: one batch per shard per tick (keyed by the shard, so a shard's batches stay in
    /// order on one worker).
    pub vad: WorkerPool<VadBatch>,
    /// Local ASR, when selected.
    pub asr: Option<WorkerPool<AsrJob>>,
    /// Local TTS, when selected.
    pub tts: Option<WorkerPool<TtsJob>>,
}

/// One shard's reply receivers.
#[derive(Clone)]
pub struct ShardReplies {
    /// VAD results, one message per batch.
    pub vad: flume::Receiver<Routed<VadBatchReply>>,
    /// ASR results.
    pub asr: flume::Receiver<Routed<AsrReply>>,
    /// TTS results.
    pub tts: flume::Receiver<Routed<TtsReply>>,
}

/// What `start` returns: the queues and every shard's receivers (index = shard id).
pub struct Inference {
    /// Job queues.
    pub queues: InferenceQueues,
    /// Reply receivers by shard.
    pub replies: Vec<ShardReplies>,
}

/// Fixes glibc's mmap threshold at `kib` (0 leaves glibc's dynamic one): allocations that
/// large are unmapped when freed instead of staying in a heap.
fn set_mmap_threshold(kib: u32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if kib > 0 {
        let bytes = i32::try_from(u64::from(kib) * 1024).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes allocator parameters; it is called once at start.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
        if ok != 1 {
            tracing::warn!(kib, "could not set the malloc mmap threshold");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = kib;
}

fn channels<T>(shards: usize, cap: usize) -> (Vec<flume::Sender<T>>, Vec<flume::Receiver<T>>) {
    (0..shards).map(|_| flume::bounded(cap)).unzip()
}

/// Verifies the model files, then starts the workers on `cores`.
pub fn start(config: &Config, cores: &[usize], shards: usize) -> Result<Inference, String> {
    let models = config.inference.models_path();
    let lib = config.inference.onnxruntime_path();
    let verify = |p: &std::path::Path| crate::models::verify(p, &models).map_err(|e| e.to_string());
    verify(&lib)?;
    set_mmap_threshold(config.inference.malloc_mmap_threshold_kib);
    // Before any model loads: every session follows the process's memory policy.
    crate::providers::onnx::init_runtime_with(&lib, config.inference.ort_memory)
        .map_err(|e| e.to_string())?;
    let vad_model = models.join(&config.vad.model);
    verify(&vad_model)?;
    let cap = config.inference.reply_capacity;
    let pool_config = |name: &str| WorkerPoolConfig {
        cores: cores.to_vec(),
        queue_capacity: config.inference.queue_capacity,
        max_batch: config.inference.max_batch,
        batch_deadline: Duration::ZERO,
        reply_timeout: Duration::from_millis(100),
        name: name.into(),
    };

    let (vad_tx, vad_rx) = channels(shards, cap);
    let vad_lib = lib.clone();
    let max_rows = config.inference.max_batch;
    // The shards batch per tick: a worker takes whatever batches are queued (from several
    // shards, or several ticks of one that it fell behind on) without waiting for more, and
    // runs them in the same passes of at most `max_batch` rows.
    let mut vad_config = pool_config("vad");
    vad_config.max_batch = shards.max(1) * 4;
    let vad = WorkerPool::spawn(
        &vad_config,
        move |_| VadWorker::load(&vad_lib, &vad_model).map(|w| w.with_max_rows(max_rows)),
        vad_tx,
    )
    .map_err(|e| format!("VAD workers: {e}"))?;

    let (asr_tx, asr_rx) = channels(shards, cap);
    let asr = if config.asr.provider == AsrProvider::Whisper {
        let dir = models.join(&config.asr.whisper.model);
        for f in [
            "model.bin",
            "config.json",
            "tokenizer.json",
            "vocabulary.txt",
        ] {
            verify(&dir.join(f))?;
        }
        let language = config.whisper_language();
        let int8 = config.asr.whisper.int8;
        let beam_size = config.asr.whisper.beam_size;
        let window_ms = config.asr.whisper.window_ms;
        let chinese_script = config.asr.whisper.chinese_script;
        let cores = cores.to_vec();
        let mut asr_config = pool_config("asr");
        asr_config.max_batch = 1;
        Some(
            WorkerPool::spawn(
                &asr_config,
                move |i| {
                    WhisperWorker::load(&WhisperSettings {
                        model_dir: dir.clone(),
                        language: language.clone(),
                        int8,
                        core: cores[i],
                        beam_size,
                        window_ms,
                        chinese_script,
                    })
                },
                asr_tx,
            )
            .map_err(|e| format!("Whisper workers: {e}"))?,
        )
    } else {
        None
    };

    let (tts_tx, tts_rx) = channels(shards, cap);
    let tts = match config.local_tts() {
        Some(plan) => {
            let piper = if plan.piper {
                let model = models.join(&config.tts.piper_model);
                verify(&model)?;
                verify(&model.with_extension("onnx.json"))?;
                Some(model)
            } else {
                None
            };
            let mut voices: Vec<String> = plan.kokoro_zh.iter().cloned().collect();
            if let Some(en) = plan.kokoro_en.filter(|en| !voices.contains(en)) {
                voices.push(en);
            }
            let kokoro = if voices.is_empty() {
                None
            } else {
                let dir = models.join("kokoro");
                verify(&dir.join("kokoro-v1.0.int8.onnx"))?;
                verify(&dir.join("vocab.json"))?;
                for voice in &voices {
                    verify(&dir.join("voices").join(format!("{voice}.bin")))?;
                }
                Some(KokoroSettings {
                    dir,
                    voices,
                    speed: config.tts.kokoro.speed,
                })
            };
            let lib = lib.clone();
            // One synthesis per core at a time: Kokoro costs about a core-second per second of
            // speech, so batching or a second job on the same core would only add latency (and
            // Piper and espeak-ng run one job at a time anyway).
            let mut tts_config = pool_config("tts");
            tts_config.max_batch = 1;
            Some(
                WorkerPool::spawn(
                    &tts_config,
                    move |_| TtsWorker::load(&lib, piper.as_deref(), kokoro.as_ref()),
                    tts_tx,
                )
                .map_err(|e| format!("TTS workers: {e}"))?,
            )
        }
        None => None,
    };

    let replies = vad_rx
        .into_iter()
        .zip(asr_rx)
        .zip(tts_rx)
        .map(|((vad, asr), tts)| ShardReplies { vad, asr, tts })
        .collect();
    Ok(Inference {
        queues: InferenceQueues { vad, asr, tts },
        replies,
    })
}
