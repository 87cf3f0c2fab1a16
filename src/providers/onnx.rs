//! The process-wide ONNX Runtime environment shared by every local model (Silero VAD, Piper,
//! Kokoro).
//!
//! ONNX Runtime allows one environment per process; [`init_runtime`] creates it once from the
//! library the set-up installs (`models/onnxruntime/`), and [`runtime`] hands it to any model
//! that needs it. The library is loaded at run time (`ort`'s `load-dynamic`), so a missing or
//! wrong library is an error value naming the path and the fix, never a panic.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use ort::environment::Environment;
use ort::session::Session;

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

struct Runtime {
    env: Environment,
    lib: PathBuf,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static RUNTIME_INIT: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime from `lib` and creates the process-wide environment; later calls return
/// `Ok` without reloading (the first library stays in use). `lib` must name an existing file on
/// every call, so a misconfigured path is reported even after another caller succeeded.
pub fn init_runtime(lib: &Path) -> Result<(), OnnxRuntimeError> {
    environment(lib).map(|_| ())
}

/// The process-wide ONNX Runtime environment, once [`init_runtime`] has succeeded.
pub fn runtime() -> Option<&'static Environment> {
    RUNTIME.get().map(|rt| &rt.env)
}

/// The environment created from `lib`, creating it on first use (see [`init_runtime`]).
pub(crate) fn environment(lib: &Path) -> Result<&'static Environment, OnnxRuntimeError> {
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
    tracing::info!(lib = %lib.display(), "ONNX Runtime loaded");
    let rt = RUNTIME.get_or_init(|| Runtime {
        env,
        lib: lib.to_path_buf(),
    });
    Ok(&rt.env)
}

fn already_loaded<'a>(rt: &'a Runtime, lib: &Path) -> &'a Environment {
    if rt.lib != lib {
        tracing::warn!(
            loaded = %rt.lib.display(),
            requested = %lib.display(),
            "ONNX Runtime already loaded from another path; keeping it"
        );
    }
    &rt.env
}

/// A session for `model` on one thread, not spinning: each model runs on its pinned inference
/// core, so ONNX Runtime must not start pools of its own (the shape every local model uses).
pub fn single_thread_session(env: &Environment, model: &Path) -> ort::Result<Session> {
    Session::builder(env)?
        .with_intra_threads(1)?
        .with_inter_threads(1)?
        .with_intra_op_spinning(false)?
        .with_inter_op_spinning(false)?
        .commit_from_file(model)
}

/// The names of a session's inputs and outputs (for checking a model's signature).
pub fn io_names(session: &Session) -> (Vec<String>, Vec<String>) {
    let names = |outlets: &[ort::value::Outlet]| -> Vec<String> {
        outlets.iter().map(|o| o.name().to_owned()).collect()
    };
    (names(session.inputs()), names(session.outputs()))
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
