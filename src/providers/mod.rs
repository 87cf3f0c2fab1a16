//! Providers: voice activity detection, speech recognition, language models and speech
//! synthesis, local (on inference cores) or remote (over HTTP on the shard), and the vision
//! model behind the camera endpoint. Providers know nothing of sessions; [`Providers`] is the
//! per-shard choice among them. `onnx` holds the process-wide ONNX Runtime environment that
//! every local model shares.

pub mod asr;
pub mod error;
pub mod http_client;
pub mod llm;
pub mod onnx;
pub mod reply;
pub mod select;
pub mod tts;
pub mod vad;
pub mod vision;

pub use select::{LocalQueues, Providers};
