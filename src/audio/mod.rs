//! Audio on the shard: uplink Opus decoding and cutting PCM into the VAD's 512-sample chunks.
//! Codecs know nothing of sessions; the session owns one decoder and one chunker.

pub mod chunker;
pub mod decode;

pub use chunker::Chunker;
pub use decode::{DecodeError, UplinkDecoder};
