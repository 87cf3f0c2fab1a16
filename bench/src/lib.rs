//! The parts of `xiaozhi-bench` other crates may use: the mock OpenAI-compatible upstream
//! (the server's conversation tests start it in-process) and the firmware-like MQTT + UDP
//! device (the server's MQTT tests drive it).

pub mod mock_upstream;
pub mod mqtt_device;
