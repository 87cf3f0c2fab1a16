//! xiaozhi-tpc: a thread-per-core voice-assistant server for xiaozhi ESP32 devices.
//!
//! Dependencies point one way (see ARCHITECTURE.md): `shard` owns one core's listeners and
//! sessions and wires the rest together; `connection` (one driver per transport) moves bytes
//! and runs what a session asks for on the shard's `providers`; `session` is the
//! transport-free state machine over `protocol` (pure wire format) and `pipeline` (audio in
//! and out, segmentation, sentences); `http` serves the OTA/health/metrics port; both ports
//! use `front_door` (real client addresses behind a balancer, per-address limits); `metrics`
//! is a leaf; the runtime (`shards`) knows nothing of xiaozhi.

pub mod audio;
pub mod clock;
pub mod config;
pub mod connection;
pub mod front_door;
pub mod http;
pub mod inference;
pub mod lang;
pub mod log_writer;
pub mod metrics;
pub mod models;
pub mod mqtt;
pub mod pipeline;
pub mod providers;
pub mod session;
pub mod shard;
pub mod tools;

/// The wire protocol is the `xiaozhi-protocol` workspace crate (the bench shares it); it keeps
/// its old path here so every `crate::protocol::…` import stays as it was.
pub use xiaozhi_protocol as protocol;
