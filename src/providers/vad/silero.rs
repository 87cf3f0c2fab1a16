//! Silero VAD (v5/v6 ONNX signature) on ONNX Runtime, batched across sessions.
//!
//! The model is a small recurrent net: each call takes 512 new samples at 16 kHz (32 ms)
//! prefixed by the last 64 samples of the previous call, plus a `[2, B, 128]` state, and
//! returns one speech probability per row and the next state. Batching B streams into one
//! forward pass costs about half as much per chunk as B separate passes (see
//! `shared/notes/costs-and-wakeups.md` §1), and gives bitwise-identical results at the default
//! optimisation level.
//!
//! The per-session recurrent state ([`VadStream`]) travels with each [`VadJob`] and comes back
//! in the [`VadReply`], so [`VadWorker`] holds no session state: any worker can serve any
//! session, and a session keeps exactly one job in flight.
//!
//! The model runs in the process-wide ONNX Runtime environment of [`crate::providers::onnx`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ort::memory::Allocator;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions};
use ort::value::{DynValue, Tensor};
use shards::{Batch, BatchWorker, Routed};

use crate::providers::onnx::{environment, OnnxRuntimeError, OnnxSession};
use crate::providers::reply::{Reply, Timings};

/// New samples per chunk (32 ms at 16 kHz).
pub const CHUNK: usize = 512;
/// Samples of the previous chunk that prefix each model input.
pub const CONTEXT: usize = 64;
/// Recurrent state floats per stream: two layers of 128.
pub const STATE_LEN: usize = 2 * HIDDEN;
/// Sample rate the model is run at.
pub const SAMPLE_RATE: i64 = 16_000;

/// Floats per state layer per stream.
const HIDDEN: usize = 128;
/// Model input width: context followed by the new chunk.
const FRAME: usize = CONTEXT + CHUNK;

/// Why the runtime, the model, or a forward pass failed.
#[derive(Debug, thiserror::Error)]
pub enum VadError {
    /// The process-wide ONNX Runtime could not be loaded.
    #[error(transparent)]
    Runtime(#[from] OnnxRuntimeError),
    /// The model file is missing.
    #[error("Silero VAD model not found at {}; run `make setup`", .0.display())]
    ModelMissing(PathBuf),
    /// ONNX Runtime refused the model file.
    #[error("could not load Silero VAD model {}: {}", .0.display(), .1)]
    ModelLoad(PathBuf, String),
    /// The model's inputs or outputs are not Silero v5/v6's.
    #[error("{} is not a Silero VAD v5/v6 model: {}", .0.display(), .1)]
    Signature(PathBuf, String),
    /// A forward pass failed or returned tensors of the wrong size.
    #[error("Silero VAD inference failed: {0}")]
    Inference(String),
}

/// One session's recurrent VAD state: zero at the start of a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct VadStream {
    /// The last [`CONTEXT`] samples of the previous chunk.
    pub context: [f32; CONTEXT],
    /// The model's recurrent state, layer 0 then layer 1.
    pub state: [f32; STATE_LEN],
}

impl Default for VadStream {
    fn default() -> Self {
        VadStream {
            context: [0.0; CONTEXT],
            state: [0.0; STATE_LEN],
        }
    }
}

/// One ONNX Runtime session of Silero VAD, single-threaded, with its batch tensors.
pub struct SileroModel {
    session: OnnxSession,
    sr: Tensor<i64>,
    /// Tensors of the most recent batch sizes, most recently used last (at most [`SLOTS`]).
    slots: Vec<Slot>,
}

/// Batch sizes whose tensors a model keeps (a few hundred KiB at 64 rows).
const SLOTS: usize = 8;

/// The tensors of one batch size B, allocated once and reused by every pass of that size: rows
/// are gathered straight into the input tensors, and ONNX Runtime writes its outputs into
/// tensors the slot preallocated, so a pass allocates no tensor and copies each stream's
/// state once in and once out.
struct Slot {
    rows: usize,
    /// `[B, FRAME]`: row r = stream r's context then its new chunk.
    input: Tensor<f32>,
    /// `[2, B, HIDDEN]`: stream r owns `[l*B*HIDDEN + r*HIDDEN ..][..HIDDEN]` of layer l.
    state: Tensor<f32>,
    /// Run options holding the preallocated outputs `output` `[B, 1]` and `stateN`.
    options: RunOptions<HasSelectedOutputs>,
    /// The preallocated outputs as the last pass returned them (the same memory every pass).
    probs: Option<DynValue>,
    next: Option<DynValue>,
}

impl Slot {
    fn new(rows: usize, session: &OnnxSession) -> ort::Result<Slot> {
        let cpu = Allocator::default();
        let outputs = OutputSelector::default()
            .preallocate("output", Tensor::<f32>::new(&cpu, [rows, 1])?)
            .preallocate("stateN", Tensor::<f32>::new(&cpu, [2, rows, HIDDEN])?);
        Ok(Slot {
            rows,
            input: Tensor::new(&cpu, [rows, FRAME])?,
            state: Tensor::new(&cpu, [2, rows, HIDDEN])?,
            // The session's own options (its memory policy) with this slot's outputs.
            options: session.run_options()?.with_outputs(outputs),
            probs: None,
            next: None,
        })
    }
}

impl SileroModel {
    /// Loads `model_path` in the environment created from the ONNX Runtime library `lib`
    /// (see [`crate::providers::onnx::init_runtime`]): one intra-op and one inter-op thread, no spinning, so a forward
    /// pass runs entirely on the calling (pinned) thread.
    pub fn load(lib: &Path, model_path: &Path) -> Result<Self, VadError> {
        let env = environment(lib)?;
        if !model_path.is_file() {
            return Err(VadError::ModelMissing(model_path.to_path_buf()));
        }
        let session = crate::providers::onnx::single_thread_session(env, model_path)
            .map_err(|e| VadError::ModelLoad(model_path.to_path_buf(), e.to_string()))?;
        check_signature(&session).map_err(|e| VadError::Signature(model_path.to_path_buf(), e))?;
        let sr = Tensor::from_array(((), vec![SAMPLE_RATE]))
            .map_err(|e| VadError::ModelLoad(model_path.to_path_buf(), e.to_string()))?;
        Ok(SileroModel {
            session,
            sr,
            slots: Vec::with_capacity(SLOTS),
        })
    }

    /// Runs one forward pass over `rows` (one chunk of each of B different streams), advances
    /// each stream (state and context) and pushes B probabilities to `probs` in row order. On
    /// error no stream is changed and nothing is pushed.
    pub fn infer_batch(
        &mut self,
        rows: &mut [(&[f32; CHUNK], &mut VadStream)],
        probs: &mut Vec<f32>,
    ) -> Result<(), VadError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.begin(rows.len())?;
        for (r, (chunk, stream)) in rows.iter().enumerate() {
            self.put_row(r, chunk, stream);
        }
        self.forward()?;
        probs.reserve(rows.len());
        for (r, (chunk, stream)) in rows.iter_mut().enumerate() {
            probs.push(self.finish_row(r, chunk, stream));
        }
        Ok(())
    }

    /// Makes the tensors of a `rows`-row pass current: reused when this size ran recently,
    /// else allocated (forgetting the least recently used size when [`SLOTS`] are kept).
    fn begin(&mut self, rows: usize) -> Result<(), VadError> {
        if let Some(i) = self.slots.iter().position(|s| s.rows == rows) {
            let slot = self.slots.remove(i);
            self.slots.push(slot);
            return Ok(());
        }
        let slot =
            Slot::new(rows, &self.session).map_err(|e| VadError::Inference(e.to_string()))?;
        if self.slots.len() >= SLOTS {
            self.slots.remove(0);
        }
        self.slots.push(slot);
        Ok(())
    }

    /// Gathers one stream's context, chunk and state into row `r` of the current tensors.
    fn put_row(&mut self, r: usize, chunk: &[f32; CHUNK], stream: &VadStream) {
        let Some(slot) = self.slots.last_mut() else {
            return;
        };
        let b = slot.rows;
        if let Ok((_, input)) = slot.input.try_extract_tensor_mut() {
            let row = &mut input[r * FRAME..(r + 1) * FRAME];
            row[..CONTEXT].copy_from_slice(&stream.context);
            row[CONTEXT..].copy_from_slice(chunk);
        }
        if let Ok((_, state)) = slot.state.try_extract_tensor_mut() {
            for layer in 0..2 {
                let at = layer * b * HIDDEN + r * HIDDEN;
                state[at..at + HIDDEN]
                    .copy_from_slice(&stream.state[layer * HIDDEN..(layer + 1) * HIDDEN]);
            }
        }
    }

    /// Scatters row `r`'s next state back into its stream, moves the context on, and returns
    /// the row's speech probability (after a successful [`SileroModel::forward`]).
    fn finish_row(&self, r: usize, chunk: &[f32; CHUNK], stream: &mut VadStream) -> f32 {
        let Some(slot) = self.slots.last() else {
            return 0.0;
        };
        let b = slot.rows;
        if let Some(Ok((_, next))) = slot.next.as_ref().map(|v| v.try_extract_tensor::<f32>()) {
            for layer in 0..2 {
                let at = layer * b * HIDDEN + r * HIDDEN;
                stream.state[layer * HIDDEN..(layer + 1) * HIDDEN]
                    .copy_from_slice(&next[at..at + HIDDEN]);
            }
        }
        stream.context.copy_from_slice(&chunk[CHUNK - CONTEXT..]);
        match slot.probs.as_ref().map(|v| v.try_extract_tensor::<f32>()) {
            Some(Ok((_, probs))) => probs.get(r).copied().unwrap_or(0.0),
            _ => 0.0,
        }
    }

    /// Runs the model on the gathered rows; on success the current slot's outputs hold B
    /// probabilities and the next state of every row.
    fn forward(&mut self) -> Result<(), VadError> {
        self.forward_ort().map_err(VadError::Inference)
    }

    fn forward_ort(&mut self) -> Result<(), String> {
        let slot = self.slots.last_mut().ok_or("no batch gathered")?;
        let b = slot.rows;
        let mut out = self
            .session
            .run_with_options(
                ort::inputs![
                    "input" => &slot.input,
                    "state" => &slot.state,
                    "sr" => &self.sr,
                ],
                &slot.options,
            )
            .map_err(|e| e.to_string())?;
        let probs = out.remove("output").ok_or("no `output` tensor")?;
        let next = out.remove("stateN").ok_or("no `stateN` tensor")?;
        drop(out);
        let (_, p) = probs
            .try_extract_tensor::<f32>()
            .map_err(|e| e.to_string())?;
        let (_, n) = next
            .try_extract_tensor::<f32>()
            .map_err(|e| e.to_string())?;
        if p.len() != b || n.len() != 2 * b * HIDDEN {
            return Err(format!(
                "batch of {b}: got {} probabilities and {} state floats",
                p.len(),
                n.len()
            ));
        }
        slot.probs = Some(probs);
        slot.next = Some(next);
        Ok(())
    }
}

fn check_signature(session: &OnnxSession) -> Result<(), String> {
    let (inputs, outputs) = crate::providers::onnx::io_names(session);
    for want in ["input", "state", "sr"] {
        if !inputs.iter().any(|n| n == want) {
            return Err(format!("inputs are {inputs:?}, expected input, state, sr"));
        }
    }
    for want in ["output", "stateN"] {
        if !outputs.iter().any(|n| n == want) {
            return Err(format!("outputs are {outputs:?}, expected output, stateN"));
        }
    }
    Ok(())
}

/// A session's next VAD work: one or more chunks, with the stream state they continue from.
#[derive(Debug)]
pub struct VadJob {
    /// Session the chunks belong to.
    pub session: u64,
    /// The session's job counter, echoed in the result.
    pub seq: u64,
    /// Turn the audio belongs to, echoed so stale results can be dropped.
    pub turn: u32,
    /// Consecutive 32 ms chunks, oldest first.
    pub chunks: Vec<[f32; CHUNK]>,
    /// The session's VAD state before the first chunk.
    pub stream: VadStream,
    /// When the session queued the job.
    pub submitted: Instant,
}

/// The scores of one [`VadJob`]: what a worker sends back inside a [`VadReply`].
#[derive(Debug)]
pub struct VadScores {
    /// One speech probability per chunk processed, in order.
    pub probs: Vec<f32>,
    /// The stream state after the last chunk processed.
    pub stream: VadStream,
    /// Rows in the largest forward pass this job took part in.
    pub batch_size: usize,
}

/// A failed forward pass: why, and the scores of the chunks processed before it (the session
/// still needs the stream state to continue).
#[derive(Debug)]
pub struct VadFailure {
    /// What went wrong.
    pub error: String,
    /// Chunks scored before the failure (fewer than the job's chunks).
    pub partial: VadScores,
}

/// A VAD worker's answer to one [`VadJob`] (`seq` is the job's `seq`).
pub type VadReply = Reply<VadScores, VadFailure>;

/// The outcome of one [`VadJob`] as a session applies it (made from a [`VadReply`]).
#[derive(Debug)]
pub struct VadResult {
    /// Session the chunks belong to.
    pub session: u64,
    /// The job's `seq`.
    pub seq: u64,
    /// The job's `turn`.
    pub turn: u32,
    /// One speech probability per chunk processed, in order (fewer than the job's chunks only
    /// if `error` is set).
    pub probs: Vec<f32>,
    /// The stream state after the last chunk processed.
    pub stream: VadStream,
    /// The job's `submitted`.
    pub submitted: Instant,
    /// Time from `submitted` to the worker starting the batch.
    pub queue_wait: Duration,
    /// Wall time of the forward passes this job took part in.
    pub compute: Duration,
    /// Rows in the largest forward pass this job took part in.
    pub batch_size: usize,
    /// When the job's last forward pass finished.
    pub done: Instant,
    /// Set when a forward pass failed; the job's remaining chunks were not processed.
    pub error: Option<String>,
}

impl From<VadReply> for VadResult {
    fn from(reply: VadReply) -> Self {
        let (scores, error) = match reply.result {
            Ok(scores) => (scores, None),
            Err(f) => (f.partial, Some(f.error)),
        };
        VadResult {
            session: reply.session,
            seq: reply.seq,
            turn: reply.turn,
            probs: scores.probs,
            stream: scores.stream,
            submitted: reply.timings.submitted,
            queue_wait: reply.timings.queue_wait,
            compute: reply.timings.compute,
            batch_size: scores.batch_size,
            done: reply.timings.done,
            error,
        }
    }
}

/// Per-job bookkeeping while a batch is processed.
struct Progress {
    wave: usize,
    probs: Vec<f32>,
    compute: Duration,
    batch_size: usize,
    done: Instant,
    error: Option<String>,
}

/// An inference-core worker running Silero over batches of [`VadJob`]s from many sessions.
///
/// Pass k of a batch runs chunk k of every job that has one, so a job with n chunks takes n
/// sequential passes, each batched across sessions. A second job of the same session in one
/// batch goes to a later "wave" of passes: one forward pass never holds two rows of a session.
pub struct VadWorker {
    model: SileroModel,
    progress: Vec<Progress>,
    active: Vec<usize>,
    /// Most rows in one forward pass (`inference.max_batch`).
    max_rows: usize,
    /// Buffers of [`BatchWorker::process`], kept across calls.
    jobs: Vec<Routed<VadJob>>,
    replies: Vec<Routed<VadReply>>,
    sizes: Vec<usize>,
}

impl VadWorker {
    /// A worker running `model`.
    pub fn new(model: SileroModel) -> Self {
        VadWorker {
            model,
            progress: Vec::new(),
            active: Vec::new(),
            max_rows: usize::MAX,
            jobs: Vec::new(),
            replies: Vec::new(),
            sizes: Vec::new(),
        }
    }

    /// Caps the rows of one forward pass at `rows` (a pass over more active jobs is split).
    pub fn with_max_rows(mut self, rows: usize) -> Self {
        self.max_rows = rows.max(1);
        self
    }

    /// Loads the model (see [`SileroModel::load`]) and wraps it in a worker.
    pub fn load(lib: &Path, model_path: &Path) -> Result<Self, VadError> {
        SileroModel::load(lib, model_path).map(VadWorker::new)
    }

    /// Runs pass `k` of wave `wave` over every job that has a k-th chunk and no error (in
    /// forward passes of at most `max_rows` rows).
    fn run_pass(&mut self, jobs: &mut [Routed<VadJob>], wave: usize, k: usize) {
        let mut active = std::mem::take(&mut self.active);
        active.clear();
        for (i, p) in self.progress.iter().enumerate() {
            if p.wave == wave && p.error.is_none() && jobs[i].item.chunks.len() > k {
                active.push(i);
            }
        }
        for rows in active.chunks(self.max_rows) {
            self.forward_rows(jobs, rows, k);
        }
        self.active = active;
    }

    /// One forward pass over chunk `k` of the jobs at `rows`.
    fn forward_rows(&mut self, jobs: &mut [Routed<VadJob>], rows: &[usize], k: usize) {
        let t0 = Instant::now();
        let outcome = self.model.begin(rows.len()).and_then(|()| {
            for (r, &i) in rows.iter().enumerate() {
                let job = &jobs[i].item;
                self.model.put_row(r, &job.chunks[k], &job.stream);
            }
            self.model.forward()
        });
        let done = Instant::now();
        let took = done - t0;
        for (r, &i) in rows.iter().enumerate() {
            let p = &mut self.progress[i];
            p.compute += took;
            p.batch_size = p.batch_size.max(rows.len());
            p.done = done;
            match &outcome {
                Ok(()) => {
                    let VadJob { chunks, stream, .. } = &mut jobs[i].item;
                    p.probs.push(self.model.finish_row(r, &chunks[k], stream));
                }
                Err(e) => p.error = Some(e.to_string()),
            }
        }
        if let Err(e) = outcome {
            tracing::warn!(rows = rows.len(), error = %e, "VAD forward pass failed");
        }
    }
}

/// One shard's VAD jobs of one tick (at most one job per session), sent as one message.
pub type VadBatch = Batch<VadJob>;

/// A worker's answer to one [`VadBatch`]: one reply per job, in the batch's order.
#[derive(Debug)]
pub struct VadBatchReply {
    /// The batch's sequence number on its shard.
    pub seq: u64,
    /// When the worker finished the batch (the answer left right after): the start of the
    /// shard's wake-up.
    pub finished: Instant,
    /// One reply per job of the batch.
    pub replies: Vec<VadReply>,
}

impl BatchWorker for VadWorker {
    type Job = VadBatch;
    type Output = VadBatchReply;

    /// Runs every job of the batches taken together (from several shards, or several ticks of
    /// one shard when the worker fell behind) in the same passes, and answers each batch with
    /// one message.
    fn process(
        &mut self,
        batches: &mut Vec<Routed<VadBatch>>,
        out: &mut Vec<Routed<VadBatchReply>>,
    ) {
        let mut jobs = std::mem::take(&mut self.jobs);
        let mut replies = std::mem::take(&mut self.replies);
        self.sizes.clear();
        for b in batches.iter_mut() {
            self.sizes.push(b.item.jobs.len());
            jobs.extend(b.item.jobs.drain(..).map(|item| Routed {
                shard: b.shard,
                item,
            }));
        }
        self.run_jobs(&mut jobs, &mut replies);
        let finished = Instant::now();
        let mut answers = replies.drain(..);
        for (b, &n) in batches.drain(..).zip(&self.sizes) {
            out.push(Routed {
                shard: b.shard,
                item: VadBatchReply {
                    seq: b.item.seq,
                    finished,
                    replies: answers.by_ref().take(n).map(|r| r.item).collect(),
                },
            });
        }
        drop(answers);
        self.jobs = jobs;
        self.replies = replies;
    }
}

impl VadWorker {
    /// Runs `jobs` (drained) in batched passes and pushes one reply per job, in order.
    pub fn run_jobs(&mut self, jobs: &mut Vec<Routed<VadJob>>, out: &mut Vec<Routed<VadReply>>) {
        let started = Instant::now();
        self.progress.clear();
        let mut waves = 0;
        let mut depth = 0;
        for (i, job) in jobs.iter().enumerate() {
            let session = job.item.session;
            let wave = jobs[..i]
                .iter()
                .filter(|j| j.item.session == session)
                .count();
            if wave > 0 {
                tracing::debug!(session, "two VAD jobs of one session in a batch");
            }
            waves = waves.max(wave + 1);
            depth = depth.max(job.item.chunks.len());
            self.progress.push(Progress {
                wave,
                probs: Vec::with_capacity(job.item.chunks.len()),
                compute: Duration::ZERO,
                batch_size: 0,
                done: started,
                error: None,
            });
        }
        for wave in 0..waves {
            for k in 0..depth {
                self.run_pass(jobs, wave, k);
            }
        }
        for (job, p) in jobs.drain(..).zip(self.progress.drain(..)) {
            let j = job.item;
            out.push(Routed {
                shard: job.shard,
                item: Reply {
                    session: j.session,
                    turn: j.turn,
                    seq: j.seq,
                    timings: Timings {
                        submitted: j.submitted,
                        queue_wait: started.saturating_duration_since(j.submitted),
                        compute: p.compute,
                        done: p.done,
                    },
                    result: {
                        let scores = VadScores {
                            probs: p.probs,
                            stream: j.stream,
                            batch_size: p.batch_size,
                        };
                        match p.error {
                            None => Ok(scores),
                            Some(error) => Err(VadFailure {
                                error,
                                partial: scores,
                            }),
                        }
                    },
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::OnceLock;

    const SENTENCE: &str = "Hello, this is a test of the voice activity detector. \
                            It should find speech here and silence around it.";

    fn models_dir() -> PathBuf {
        std::env::var_os("XIAOZHI_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
    }

    fn runtime_lib() -> PathBuf {
        models_dir().join("onnxruntime/libonnxruntime.so.1.31.1")
    }

    /// The model, or `None` (with a message) when the runtime or the model file is absent.
    fn model_or_skip(file: &str) -> Option<SileroModel> {
        let (lib, model) = (runtime_lib(), models_dir().join(file));
        for path in [&lib, &model] {
            if !path.is_file() {
                eprintln!("SKIPPED: {} is absent (run `make setup`)", path.display());
                return None;
            }
        }
        Some(SileroModel::load(&lib, &model).expect("load Silero VAD"))
    }

    /// espeak-ng speech, resampled to 16 kHz mono with 1 s of silence on each side.
    fn speech_16k() -> &'static [f32] {
        static SPEECH: OnceLock<Vec<f32>> = OnceLock::new();
        SPEECH.get_or_init(|| {
            let dir = std::env::temp_dir();
            let raw = dir.join(format!("xiaozhi-vad-test-{}.wav", std::process::id()));
            let wav = dir.join(format!("xiaozhi-vad-test-{}-16k.wav", std::process::id()));
            let status = Command::new("espeak-ng")
                .arg("-w")
                .arg(&raw)
                .arg(SENTENCE)
                .status()
                .expect("run espeak-ng (installed by the set-up)");
            assert!(status.success(), "espeak-ng failed: {status}");
            let status = Command::new("sox")
                .arg("-V1")
                .arg(&raw)
                .args(["-r", "16000", "-c", "1", "-b", "16"])
                .arg(&wav)
                .args(["pad", "1", "1"])
                .status()
                .expect("run sox (installed by the set-up)");
            assert!(status.success(), "sox failed: {status}");
            let reader = hound::WavReader::open(&wav).expect("read the sox output");
            assert_eq!(reader.spec().sample_rate, 16_000);
            let samples = reader
                .into_samples::<i16>()
                .map(|s| f32::from(s.expect("16-bit sample")) / 32768.0)
                .collect();
            let _ = std::fs::remove_file(&raw);
            let _ = std::fs::remove_file(&wav);
            samples
        })
    }

    /// Chunk `i` of a stream that starts `offset` samples into `audio`, wrapping around.
    fn chunk_at(audio: &[f32], offset: usize, i: usize) -> [f32; CHUNK] {
        let mut c = [0.0; CHUNK];
        for (j, s) in c.iter_mut().enumerate() {
            *s = audio[(offset + i * CHUNK + j) % audio.len()];
        }
        c
    }

    fn single_stream_probs(model: &mut SileroModel, chunks: &[[f32; CHUNK]]) -> Vec<f32> {
        let mut stream = VadStream::default();
        let mut probs = Vec::new();
        for c in chunks {
            model
                .infer_batch(&mut [(c, &mut stream)], &mut probs)
                .expect("batch-1 pass");
        }
        probs
    }

    #[test]
    fn the_ifless_variant_hears_what_the_default_model_hears() {
        let (Some(mut default), Some(mut ifless)) = (
            model_or_skip("silero_vad.onnx"),
            model_or_skip("silero_vad_op18_ifless.onnx"),
        ) else {
            return;
        };
        let audio = speech_16k();
        let chunks: Vec<[f32; CHUNK]> = (0..audio.len() / CHUNK)
            .map(|i| chunk_at(audio, 0, i))
            .collect();
        let a = single_stream_probs(&mut default, &chunks);
        let b = single_stream_probs(&mut ifless, &chunks);
        let max_delta = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        let speech = a.iter().filter(|&&p| p > 0.5).count();
        eprintln!(
            "{} chunks, {speech} above 0.5: max |default - ifless| = {max_delta:e}",
            a.len()
        );
        assert!(speech > 10, "the test audio should hold speech");
        assert!(max_delta < 1e-4, "the two files differ by {max_delta}");
        let decide = |p: &[f32]| p.iter().map(|&x| x > 0.5).collect::<Vec<_>>();
        assert_eq!(decide(&a), decide(&b), "a chunk is heard differently");
    }

    #[test]
    fn batch_of_streams_matches_each_stream_run_alone() {
        for file in ["silero_vad.onnx", "silero_vad_op18_ifless.onnx"] {
            let Some(mut model) = model_or_skip(file) else {
                continue;
            };
            let audio = speech_16k();
            let b = 8;
            let steps = audio.len() / CHUNK;
            let rows: Vec<Vec<[f32; CHUNK]>> = (0..b)
                .map(|r| (0..steps).map(|i| chunk_at(audio, r * 7919, i)).collect())
                .collect();
            let mut streams = vec![VadStream::default(); b];
            let mut batched = vec![Vec::new(); b];
            let mut probs = Vec::new();
            for i in 0..steps {
                let mut batch: Vec<(&[f32; CHUNK], &mut VadStream)> = rows
                    .iter()
                    .zip(streams.iter_mut())
                    .map(|(row, s)| (&row[i], s))
                    .collect();
                probs.clear();
                model
                    .infer_batch(&mut batch, &mut probs)
                    .expect("batched pass");
                assert_eq!(probs.len(), b);
                for (r, p) in probs.iter().enumerate() {
                    batched[r].push(*p);
                }
            }
            let mut max_delta = 0.0f32;
            for (r, row) in rows.iter().enumerate() {
                let alone = single_stream_probs(&mut model, row);
                for (x, y) in alone.iter().zip(&batched[r]) {
                    max_delta = max_delta.max((x - y).abs());
                }
            }
            eprintln!(
                "{file}: {b} streams × {steps} chunks, max |batched - alone| = {max_delta:e}"
            );
            assert!(
                max_delta < 1e-5,
                "{file}: batched vs alone differ by {max_delta}"
            );
            let spread = batched[0]
                .iter()
                .zip(&batched[b - 1])
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                spread > 0.3,
                "{file}: rows should differ, max spread {spread}"
            );
        }
    }

    #[test]
    fn speech_map_is_silent_in_the_padding_and_speech_in_the_middle() {
        let Some(mut model) = model_or_skip("silero_vad.onnx") else {
            return;
        };
        let audio = speech_16k();
        let chunks: Vec<[f32; CHUNK]> = audio
            .chunks_exact(CHUNK)
            .map(|c| c.try_into().expect("512 samples"))
            .collect();
        let probs = single_stream_probs(&mut model, &chunks);
        let map: String = probs
            .iter()
            .map(|&p| match p {
                p if p > 0.5 => '#',
                p if p > 0.2 => '+',
                _ => '.',
            })
            .collect();
        eprintln!("speech map (# p>0.5, + p>0.2, . below): {map}");
        let second = 16_000 / CHUNK; // whole chunks in one second
        assert!(
            probs[..second].iter().all(|&p| p < 0.2),
            "leading second should be silence: {map}"
        );
        let middle = &probs[second..probs.len() - second];
        let speech = middle.iter().filter(|&&p| p > 0.5).count();
        assert!(
            speech * 2 > middle.len(),
            "most of the middle should be speech ({speech}/{}): {map}",
            middle.len()
        );
        let longest_run = middle
            .split(|&p| p <= 0.5)
            .map(<[f32]>::len)
            .max()
            .unwrap_or(0);
        assert!(longest_run >= 10, "expected a 320 ms speech run: {map}");
        let tail = &probs[probs.len() - second / 2..];
        assert!(
            tail.iter().all(|&p| p < 0.2),
            "trailing half-second should be silence: {map}"
        );
    }

    #[test]
    fn worker_batches_sessions_splits_duplicates_and_keeps_job_order() {
        let Some(mut reference) = model_or_skip("silero_vad.onnx") else {
            return;
        };
        let mut worker = VadWorker::new(model_or_skip("silero_vad.onnx").expect("model"));
        let audio = speech_16k();
        let t0 = Instant::now();
        // (session, number of chunks, offset into the audio); session 1 appears twice.
        let plan = [
            (1u64, 2usize, 16_000usize),
            (2, 1, 24_000),
            (3, 3, 40_000),
            (1, 1, 56_000),
        ];
        let mut jobs: Vec<Routed<VadJob>> = plan
            .iter()
            .enumerate()
            .map(|(seq, &(session, n, offset))| Routed {
                shard: seq % 2,
                item: VadJob {
                    session,
                    seq: seq as u64,
                    turn: 7,
                    chunks: (0..n).map(|i| chunk_at(audio, offset, i)).collect(),
                    stream: VadStream::default(),
                    submitted: t0,
                },
            })
            .collect();
        let expected: Vec<(Vec<f32>, VadStream)> = jobs
            .iter()
            .map(|j| {
                let mut stream = VadStream::default();
                let mut probs = Vec::new();
                for c in &j.item.chunks {
                    reference
                        .infer_batch(&mut [(c, &mut stream)], &mut probs)
                        .expect("reference pass");
                }
                (probs, stream)
            })
            .collect();
        let mut out = Vec::new();
        worker.run_jobs(&mut jobs, &mut out);
        assert!(jobs.is_empty());
        assert_eq!(out.len(), plan.len());
        let out: Vec<Routed<VadResult>> = out
            .into_iter()
            .map(|r| Routed {
                shard: r.shard,
                item: VadResult::from(r.item),
            })
            .collect();
        for (seq, (r, (probs, stream))) in out.iter().zip(&expected).enumerate() {
            assert_eq!(r.shard, seq % 2);
            assert_eq!(r.item.seq, seq as u64, "results keep arrival order");
            assert_eq!(r.item.session, plan[seq].0);
            assert_eq!(r.item.turn, 7);
            assert_eq!(r.item.error, None);
            assert_eq!(r.item.probs.len(), plan[seq].1);
            for (x, y) in r.item.probs.iter().zip(probs) {
                assert!((x - y).abs() < 1e-5, "job {seq}: {x} vs {y}");
            }
            let state_delta = r
                .item
                .stream
                .state
                .iter()
                .zip(&stream.state)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                state_delta < 1e-4,
                "job {seq}: state differs by {state_delta}"
            );
            assert_eq!(r.item.stream.context, stream.context);
        }
        // Wave 0 = jobs 0, 1, 2 (3 rows in pass 0); the repeated session 1 runs alone later.
        let sizes: Vec<usize> = out.iter().map(|r| r.item.batch_size).collect();
        assert_eq!(sizes, [3, 3, 3, 1]);
        assert!(out[3].item.done >= out[0].item.done);
    }

    #[test]
    fn passes_of_changing_sizes_reuse_their_tensors_and_score_like_a_lone_stream() {
        let Some(mut model) = model_or_skip("silero_vad.onnx") else {
            return;
        };
        let Some(mut reference) = model_or_skip("silero_vad.onnx") else {
            return;
        };
        let audio = speech_16k();
        let b = 12;
        let steps = 40;
        let rows: Vec<Vec<[f32; CHUNK]>> = (0..b)
            .map(|r| {
                (0..steps)
                    .map(|i| chunk_at(audio, 16_000 + r * 4001, i))
                    .collect()
            })
            .collect();
        let mut streams = vec![VadStream::default(); b];
        let mut next = vec![0usize; b];
        let mut got = vec![Vec::new(); b];
        // Pass i runs the first (i % b) + 1 streams: 12 sizes cycle through 8 slots.
        let mut probs = Vec::new();
        for i in 0..3 * steps {
            let n = i % b + 1;
            let mut batch: Vec<(&[f32; CHUNK], &mut VadStream)> = Vec::new();
            for (r, s) in streams.iter_mut().enumerate().take(n) {
                if next[r] < steps {
                    batch.push((&rows[r][next[r]], s));
                }
            }
            let used: Vec<usize> = (0..n).filter(|&r| next[r] < steps).collect();
            probs.clear();
            model.infer_batch(&mut batch, &mut probs).expect("pass");
            for (&r, p) in used.iter().zip(&probs) {
                got[r].push(*p);
                next[r] += 1;
            }
        }
        assert!(model.slots.len() <= SLOTS, "the kept sizes are bounded");
        for (r, row) in rows.iter().enumerate() {
            let alone = single_stream_probs(&mut reference, &row[..got[r].len()]);
            for (x, y) in alone.iter().zip(&got[r]) {
                assert!((x - y).abs() < 1e-5, "stream {r}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn a_worker_answers_each_batch_with_one_message_in_job_order() {
        let Some(model) = model_or_skip("silero_vad.onnx") else {
            return;
        };
        let mut worker = VadWorker::new(model).with_max_rows(2);
        let audio = speech_16k();
        let t0 = Instant::now();
        let job = |session: u64, n: usize| VadJob {
            session,
            seq: session * 10,
            turn: 1,
            chunks: (0..n).map(|i| chunk_at(audio, 20_000, i)).collect(),
            stream: VadStream::default(),
            submitted: t0,
        };
        let mut batches = vec![
            Routed {
                shard: 1,
                item: Batch {
                    seq: 5,
                    jobs: vec![job(1, 2), job(2, 1), job(3, 1)],
                },
            },
            Routed {
                shard: 0,
                item: Batch {
                    seq: 9,
                    jobs: vec![job(4, 1)],
                },
            },
        ];
        let mut out = Vec::new();
        worker.process(&mut batches, &mut out);
        assert!(batches.is_empty());
        let answers: Vec<(usize, u64, Vec<u64>)> = out
            .iter()
            .map(|r| {
                let seqs = r.item.replies.iter().map(|x| x.seq).collect();
                (r.shard, r.item.seq, seqs)
            })
            .collect();
        assert_eq!(answers, [(1, 5, vec![10, 20, 30]), (0, 9, vec![40])]);
        let sizes: Vec<usize> = out
            .iter()
            .flat_map(|r| &r.item.replies)
            .map(|x| x.result.as_ref().expect("scored").batch_size)
            .collect();
        // 4 jobs in one pass, split at 2 rows per forward pass.
        assert_eq!(sizes, [2, 2, 2, 2]);
        let first = out[0].item.replies[0].result.as_ref().expect("scored");
        assert_eq!(first.probs.len(), 2);
    }

    #[test]
    fn missing_model_file_is_reported_not_panicked() {
        let lib = runtime_lib();
        if !lib.is_file() {
            eprintln!("SKIPPED: {} is absent (run `make setup`)", lib.display());
            return;
        }
        let err = SileroModel::load(&lib, Path::new("/nonexistent/vad.onnx"))
            .err()
            .expect("missing model must fail");
        assert!(matches!(err, VadError::ModelMissing(_)), "{err}");
    }

    #[test]
    fn empty_batch_is_a_no_op() {
        let Some(mut model) = model_or_skip("silero_vad.onnx") else {
            return;
        };
        let mut probs = vec![1.0];
        model.infer_batch(&mut [], &mut probs).expect("empty batch");
        assert_eq!(probs, [1.0]);
    }
}
