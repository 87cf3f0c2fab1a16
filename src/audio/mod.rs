//! Audio on the shard: uplink Opus decoding, cutting PCM into the VAD's 512-sample chunks,
//! resampling synthesised speech to the downlink rate, downlink Opus encoding.
//! Codecs know nothing of sessions; the session owns its decoder, chunker and encoder.

pub mod chunker;
pub mod decode;
pub mod encode;
pub mod resample;

pub use chunker::Chunker;
pub use decode::{DecodeError, UplinkDecoder};
pub use encode::{DownlinkEncoder, EncodeError};
pub use resample::resample;
