//! The MQTT + UDP device transport's pure building blocks (spec §14.2, §15): credentials,
//! MQTT packet glue, the hello that opens the UDP channel, and the encrypted datagrams.
//!
//! Nothing here does I/O: the MQTT + UDP driver (in `connection/`) reads bytes into these
//! functions and writes what they return, so every rule — password check, packet limits,
//! keepalive, sequence and replay checks — is tested without sockets.

pub mod credentials;
pub mod hello;
pub mod packets;
pub mod udp;
