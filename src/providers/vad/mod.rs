//! Voice-activity detection: Silero VAD on ONNX Runtime, run in batches on inference workers.

pub mod silero;

pub use silero::{
    SileroModel, VadBatch, VadBatchReply, VadError, VadFailure, VadJob, VadReply, VadResult,
    VadScores, VadStream, VadWorker,
};
