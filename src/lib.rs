//! xiaozhi-tpc: a thread-per-core voice-assistant server for xiaozhi ESP32 devices.
//!
//! Dependencies point one way: `session` uses `protocol` and the runtime (`shards`); `protocol`
//! is pure (no I/O); `ws` and `http` serve the two ports, both through `front_door` (real client
//! addresses behind a balancer, per-address limits); `shard` owns one core's state and wires
//! the rest together.

pub mod audio;
pub mod clock;
pub mod config;
pub mod front_door;
pub mod http;
pub mod inference;
pub mod metrics;
pub mod models;
pub mod mqtt;
pub mod pipeline;
pub mod protocol;
pub mod providers;
pub mod session;
pub mod shard;
pub mod tools;
pub mod ws;
