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

use ort::value::{Tensor, TensorRef};
use shards::{BatchWorker, Routed};

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

/// One ONNX Runtime session of Silero VAD, single-threaded, with its batch buffers.
pub struct SileroModel {
    session: OnnxSession,
    sr: Tensor<i64>,
    /// `[B, FRAME]`: row r = stream r's context then its new chunk.
    input: Vec<f32>,
    /// `[2, B, HIDDEN]`: stream r owns `state[l*B*HIDDEN + r*HIDDEN ..][..HIDDEN]`.
    state: Vec<f32>,
    /// `[B]` probabilities of the last forward pass.
    probs: Vec<f32>,
    rows: usize,
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
            input: Vec::new(),
            state: Vec::new(),
            probs: Vec::new(),
            rows: 0,
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
        self.begin(rows.len());
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

    /// Sizes the batch buffers for `rows` streams (reusing their allocation).
    fn begin(&mut self, rows: usize) {
        self.rows = rows;
        self.input.resize(rows * FRAME, 0.0);
        self.state.resize(2 * rows * HIDDEN, 0.0);
    }

    /// Gathers one stream's context, chunk and state into row `r`.
    fn put_row(&mut self, r: usize, chunk: &[f32; CHUNK], stream: &VadStream) {
        let row = &mut self.input[r * FRAME..(r + 1) * FRAME];
        row[..CONTEXT].copy_from_slice(&stream.context);
        row[CONTEXT..].copy_from_slice(chunk);
        for layer in 0..2 {
            let at = layer * self.rows * HIDDEN + r * HIDDEN;
            self.state[at..at + HIDDEN]
                .copy_from_slice(&stream.state[layer * HIDDEN..(layer + 1) * HIDDEN]);
        }
    }

    /// Scatters row `r`'s next state back into its stream, moves the context on, and returns
    /// the row's speech probability.
    fn finish_row(&self, r: usize, chunk: &[f32; CHUNK], stream: &mut VadStream) -> f32 {
        for layer in 0..2 {
            let at = layer * self.rows * HIDDEN + r * HIDDEN;
            stream.state[layer * HIDDEN..(layer + 1) * HIDDEN]
                .copy_from_slice(&self.state[at..at + HIDDEN]);
        }
        stream.context.copy_from_slice(&chunk[CHUNK - CONTEXT..]);
        self.probs[r]
    }

    /// Runs the model on the gathered rows; on success `probs` holds B probabilities and
    /// `state` the next state of every row.
    fn forward(&mut self) -> Result<(), VadError> {
        self.forward_ort().map_err(VadError::Inference)
    }

    fn forward_ort(&mut self) -> Result<(), String> {
        let b = self.rows;
        let input =
            TensorRef::from_array_view(([b, FRAME], &self.input[..])).map_err(|e| e.to_string())?;
        let state = TensorRef::from_array_view(([2usize, b, HIDDEN], &self.state[..]))
            .map_err(|e| e.to_string())?;
        let out = self
            .session
            .run(ort::inputs![
                "input" => input,
                "state" => state,
                "sr" => &self.sr,
            ])
            .map_err(|e| e.to_string())?;
        let (_, probs) = out
            .get("output")
            .ok_or("no `output` tensor")?
            .try_extract_tensor::<f32>()
            .map_err(|e| e.to_string())?;
        let (_, next) = out
            .get("stateN")
            .ok_or("no `stateN` tensor")?
            .try_extract_tensor::<f32>()
            .map_err(|e| e.to_string())?;
        if probs.len() != b || next.len() != self.state.len() {
            return Err(format!(
                "batch of {b}: got {} probabilities and {} state floats",
                probs.len(),
                next.len()
            ));
        }
        self.probs.clear();
        self.probs.extend_from_slice(probs);
        self.state.copy_from_slice(next);
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
}

impl VadWorker {
    /// A worker running `model`.
    pub fn new(model: SileroModel) -> Self {
        VadWorker {
            model,
            progress: Vec::new(),
            active: Vec::new(),
        }
    }

    /// Loads the model (see [`SileroModel::load`]) and wraps it in a worker.
    pub fn load(lib: &Path, model_path: &Path) -> Result<Self, VadError> {
        SileroModel::load(lib, model_path).map(VadWorker::new)
    }

    /// Runs pass `k` of wave `wave` over every job that has a k-th chunk and no error.
    fn run_pass(&mut self, jobs: &mut [Routed<VadJob>], wave: usize, k: usize) {
        self.active.clear();
        for (i, p) in self.progress.iter().enumerate() {
            if p.wave == wave && p.error.is_none() && jobs[i].item.chunks.len() > k {
                self.active.push(i);
            }
        }
        if self.active.is_empty() {
            return;
        }
        let t0 = Instant::now();
        self.model.begin(self.active.len());
        for (r, &i) in self.active.iter().enumerate() {
            let job = &jobs[i].item;
            self.model.put_row(r, &job.chunks[k], &job.stream);
        }
        let outcome = self.model.forward();
        let done = Instant::now();
        let took = done - t0;
        let rows = self.active.len();
        for (r, &i) in self.active.iter().enumerate() {
            let p = &mut self.progress[i];
            p.compute += took;
            p.batch_size = p.batch_size.max(rows);
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
            tracing::warn!(rows, error = %e, "VAD forward pass failed");
        }
    }
}

impl BatchWorker for VadWorker {
    type Job = VadJob;
    type Output = VadReply;

    fn process(&mut self, jobs: &mut Vec<Routed<VadJob>>, out: &mut Vec<Routed<VadReply>>) {
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
        worker.process(&mut jobs, &mut out);
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
