//! The WebSocket front door: reads the HTTP request head on the device port, answers plain
//! GETs and refusals itself, and hands upgraded sockets to tungstenite.
//!
//! Parsing the head ourselves (with `httparse`) instead of letting tungstenite do the
//! handshake lets one port answer a plain `GET` with 200 like the reference, refuse with a
//! proper HTTP status before upgrading (full shard, draining), and read identity from headers
//! or the query string.

//!
//! Who the client is behind a balancer, and the per-address limits, live in
//! [`crate::front_door`], shared with the HTTP port.

pub mod handshake;
