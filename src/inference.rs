//! Starting the inference workers: models verified and loaded on their pinned cores, one reply
//! channel per shard.

use std::time::Duration;

use shards::{Routed, WorkerPool, WorkerPoolConfig};

use crate::config::Config;
use crate::providers::vad::{VadJob, VadResult, VadWorker};

/// What the shards get: job queues into the workers, and each shard's reply receiver.
pub struct Inference {
    /// VAD job queues (clone per shard).
    pub vad: WorkerPool<VadJob>,
    /// VAD results, one receiver per shard (index = shard id).
    pub vad_replies: Vec<flume::Receiver<Routed<VadResult>>>,
}

/// Verifies the model files, then starts one VAD worker per inference core.
pub fn start(config: &Config, cores: &[usize], shards: usize) -> Result<Inference, String> {
    let models = config.inference.models_path();
    let lib = config.inference.onnxruntime_path();
    let vad_model = models.join(&config.vad.model);
    for path in [&lib, &vad_model] {
        crate::models::verify(path, &models).map_err(|e| e.to_string())?;
    }
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| flume::bounded(config.inference.reply_capacity))
        .unzip();
    let pool_config = WorkerPoolConfig {
        cores: cores.to_vec(),
        queue_capacity: config.inference.queue_capacity,
        max_batch: config.inference.max_batch,
        batch_deadline: Duration::from_micros(config.inference.batch_deadline_us),
        reply_timeout: Duration::from_millis(100),
        name: "vad".into(),
    };
    let vad = WorkerPool::spawn(
        &pool_config,
        move |_| VadWorker::load(&lib, &vad_model),
        senders,
    )
    .map_err(|e| format!("VAD workers: {e}"))?;
    Ok(Inference {
        vad,
        vad_replies: receivers,
    })
}
