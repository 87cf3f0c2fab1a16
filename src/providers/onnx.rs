//! The process-wide ONNX Runtime environment shared by every local model (Silero VAD, Piper,
//! Kokoro).
//!
//! ONNX Runtime allows one environment per process; [`init_runtime`] creates it once from the
//! library the set-up installs (`models/onnxruntime/`), and [`runtime`] hands it to any model
//! that needs it. The library is loaded at run time (`ort`'s `load-dynamic`), so a missing or
//! wrong library is an error value naming the path and the fix, never a panic.
//!
//! The runtime also carries the process's [`OrtMemory`] policy (`inference.ort_memory`): how
//! every session built by [`single_thread_session`] holds the memory of its intermediate
//! tensors. ONNX Runtime's default CPU arena keeps its peak for the life of the session, so one
//! long synthesis would raise the resident size for good (tuning.md, "ONNX Runtime memory").

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use ort::environment::Environment;
use ort::session::{RunOptions, SelectedOutputMarker, Session, SessionInputs, SessionOutputs};
use serde::{Deserialize, Serialize};

/// Why the ONNX Runtime library could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum OnnxRuntimeError {
    /// The ONNX Runtime shared library is not where the configuration says.
    #[error("ONNX Runtime library not found at {}; run `make setup`", .0.display())]
    RuntimeMissing(PathBuf),
    /// The library exists but could not be loaded (wrong version, not a library, …).
    #[error("could not load ONNX Runtime from {}: {}", .0.display(), .1)]
    RuntimeLoad(PathBuf, String),
}

/// How ONNX Runtime holds the memory of a model's intermediate tensors (the process-wide
/// `inference.ort_memory`; measured in tuning.md, "ONNX Runtime memory").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrtMemory {
    /// ONNX Runtime's defaults: a CPU arena that grows to the largest run and keeps it, and
    /// memory patterns cached per input shape.
    Arena,
    /// The arena as above, without memory patterns.
    NoPattern,
    /// The arena, shrunk back after every run (run option
    /// `memory.enable_memory_arena_shrinkage`), without memory patterns. The default: with
    /// `inference.malloc_mmap_threshold_kib` the resident size stays at its level after the
    /// first turn, for up to ~13 % more synthesis CPU (Piper; within noise for Kokoro).
    #[default]
    ArenaShrink,
    /// No arena and no memory patterns: every tensor is allocated for its run and freed after.
    /// Costs Piper ~25 % more CPU, and Kokoro held 1.1 GB with it (tuning.md).
    NoArena,
}

struct Runtime {
    env: Environment,
    lib: PathBuf,
    memory: OrtMemory,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
// Taken only while the inference workers load their models at start-up (ONNX Runtime's
// environment is process-wide and must be created once); never on a hot path or a shard.
static RUNTIME_INIT: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime from `lib` and creates the process-wide environment; later calls return
/// `Ok` without reloading (the first library stays in use). `lib` must name an existing file on
/// every call, so a misconfigured path is reported even after another caller succeeded.
pub fn init_runtime(lib: &Path) -> Result<(), OnnxRuntimeError> {
    environment(lib).map(|_| ())
}

/// [`init_runtime`] with the memory policy every later session follows. The server calls it
/// before any model loads; once the runtime exists, its policy stays (a differing request is
/// logged).
pub fn init_runtime_with(lib: &Path, memory: OrtMemory) -> Result<(), OnnxRuntimeError> {
    create(lib, memory).map(|_| ())
}

/// The process-wide ONNX Runtime environment, once [`init_runtime`] has succeeded.
pub fn runtime() -> Option<&'static Environment> {
    RUNTIME.get().map(|rt| &rt.env)
}

/// The environment created from `lib`, creating it on first use (see [`init_runtime`]).
pub(crate) fn environment(lib: &Path) -> Result<&'static Environment, OnnxRuntimeError> {
    create(lib, OrtMemory::default()).map(|rt| &rt.env)
}

fn create(lib: &Path, memory: OrtMemory) -> Result<&'static Runtime, OnnxRuntimeError> {
    if !lib.is_file() {
        return Err(OnnxRuntimeError::RuntimeMissing(lib.to_path_buf()));
    }
    if let Some(rt) = RUNTIME.get() {
        return Ok(already_loaded(rt, lib));
    }
    let _guard = RUNTIME_INIT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(rt) = RUNTIME.get() {
        return Ok(already_loaded(rt, lib));
    }
    let load_error = |e: String| OnnxRuntimeError::RuntimeLoad(lib.to_path_buf(), e);
    let env = ort::init_from(lib)
        .map_err(|e| load_error(e.to_string()))?
        .with_name("xiaozhi-tpc")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_error(e.to_string()))?;
    tracing::info!(lib = %lib.display(), ?memory, "ONNX Runtime loaded");
    Ok(RUNTIME.get_or_init(|| Runtime {
        env,
        lib: lib.to_path_buf(),
        memory,
    }))
}

fn already_loaded<'a>(rt: &'a Runtime, lib: &Path) -> &'a Runtime {
    if rt.lib != lib {
        tracing::warn!(
            loaded = %rt.lib.display(),
            requested = %lib.display(),
            "ONNX Runtime already loaded from another path; keeping it"
        );
    }
    rt
}

/// The memory policy of the process's runtime (the default before it exists).
pub fn memory_policy() -> OrtMemory {
    RUNTIME
        .get()
        .map_or_else(OrtMemory::default, |rt| rt.memory)
}

/// The run-config key that makes the CPU arena give back its free chunks after a run.
const ARENA_SHRINKAGE: &str = "memory.enable_memory_arena_shrinkage";

/// A model's session with the run options its memory policy asks for.
pub struct OnnxSession {
    session: Session,
    /// Set for [`OrtMemory::ArenaShrink`]: the arena gives back its free chunks after each run.
    run_options: Option<RunOptions>,
}

impl OnnxSession {
    /// One forward pass (see `ort::session::Session::run`).
    pub fn run<'s, 'i, 'v: 'i, const N: usize>(
        &'s mut self,
        inputs: impl Into<SessionInputs<'i, 'v, N>>,
    ) -> ort::Result<SessionOutputs<'s>> {
        match &self.run_options {
            Some(options) => self.session.run_with_options(inputs, options),
            None => self.session.run(inputs),
        }
    }

    /// One forward pass with the caller's run options (e.g. preallocated outputs); build them
    /// with [`OnnxSession::run_options`] so they carry the memory policy.
    pub fn run_with_options<'r, 's: 'r, 'i, 'v: 'i, O: SelectedOutputMarker, const N: usize>(
        &'s mut self,
        inputs: impl Into<SessionInputs<'i, 'v, N>>,
        options: &'r RunOptions<O>,
    ) -> ort::Result<SessionOutputs<'r>> {
        self.session.run_with_options(inputs, options)
    }

    /// Fresh run options carrying this session's memory policy (arena shrinkage after each run
    /// under [`OrtMemory::ArenaShrink`]).
    pub fn run_options(&self) -> ort::Result<RunOptions> {
        let mut options = RunOptions::new()?;
        if self.run_options.is_some() {
            options.set(ARENA_SHRINKAGE, "cpu:0")?;
        }
        Ok(options)
    }

    /// The ONNX Runtime session (inputs, outputs, metadata).
    pub fn session(&self) -> &Session {
        &self.session
    }
}

/// A session for `model` on one thread, not spinning: each model runs on its pinned inference
/// core, so ONNX Runtime must not start pools of its own (the shape every local model uses).
/// Its memory follows the runtime's [`OrtMemory`] policy.
pub fn single_thread_session(env: &Environment, model: &Path) -> ort::Result<OnnxSession> {
    let memory = memory_policy();
    let mut builder = Session::builder(env)?
        .with_intra_threads(1)?
        .with_inter_threads(1)?
        .with_intra_op_spinning(false)?
        .with_inter_op_spinning(false)?;
    if memory != OrtMemory::Arena {
        // A pattern is planned and kept per distinct input shape: every new text length adds one.
        builder = builder.with_memory_pattern(false)?;
    }
    if memory == OrtMemory::NoArena {
        builder = builder.with_execution_providers([ort::ep::CPU::default()
            .with_arena_allocator(false)
            .build()])?;
    }
    let session = builder.commit_from_file(model)?;
    let run_options = if memory == OrtMemory::ArenaShrink {
        let mut options = RunOptions::new()?;
        options.set(ARENA_SHRINKAGE, "cpu:0")?;
        Some(options)
    } else {
        None
    };
    Ok(OnnxSession {
        session,
        run_options,
    })
}

/// The names of a session's inputs and outputs (for checking a model's signature).
pub fn io_names(session: &OnnxSession) -> (Vec<String>, Vec<String>) {
    let names = |outlets: &[ort::value::Outlet]| -> Vec<String> {
        outlets.iter().map(|o| o.name().to_owned()).collect()
    };
    (
        names(session.session.inputs()),
        names(session.session.outputs()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_runtime_library_names_the_path_and_the_fix() {
        let err = init_runtime(Path::new("/nonexistent/libonnxruntime.so")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ONNX Runtime library not found at /nonexistent/libonnxruntime.so; run `make setup`"
        );
    }
}
