pub mod vad;
