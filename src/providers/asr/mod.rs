//! Speech recognition: turns a finished utterance into text.
//!
//! Local recognition runs Whisper (CTranslate2) on an inference core: [`WhisperWorker`] is the
//! `shards::BatchWorker` that takes [`AsrJob`]s from the shards and answers with
//! [`AsrReply`]s. Its input features are computed in `mel`. [`wav`] builds the request
//! body for a remote transcription service instead (a WAV in a multipart form), and [`openai`]
//! sends it to an OpenAI-compatible `/audio/transcriptions` endpoint.

mod mel;
pub mod openai;
pub mod wav;
pub mod whisper;

pub use wav::{multipart_form, wav_bytes};
pub use whisper::{
    AsrError, AsrJob, AsrOutput, AsrReply, ChineseScript, Transcript, WhisperSettings,
    WhisperWorker,
};
