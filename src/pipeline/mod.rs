//! The dialogue pipeline: the pure steps between decoded audio and a turn (utterance
//! segmentation first; recognition, reply and synthesis stages sit beside it).

pub mod audio_in;
pub mod audio_out;
pub mod segmenter;
pub mod sentences;
