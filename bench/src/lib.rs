//! The parts of `xiaozhi-bench` other crates may use: the mock OpenAI-compatible upstream
//! (the server's conversation tests start it in-process).

pub mod mock_upstream;
