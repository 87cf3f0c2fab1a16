//! Providers: voice activity detection, speech recognition, language models and speech
//! synthesis, local (on inference cores) or remote (over HTTP on the shard). Providers know
//! nothing of sessions.

pub mod asr;
pub mod error;
pub mod http_client;
pub mod llm;
pub mod tts;
pub mod vad;
