//! The xiaozhi device wire protocol, as pure data types and functions (spec `protocol.md` §2–6).
//!
//! Everything a connection needs to understand a device and be understood by it, with no I/O:
//! who is connecting ([`identity`]), whether their token is genuine ([`token`]), the JSON text
//! messages in each direction ([`client`], [`server`]) and the binary audio framing
//! ([`binary`]). The session code at the edges reads sockets and calls into here; each module
//! has its own error type, and malformed input is always an error value, never a panic.
//!
//! This is a crate of its own because two programs speak the protocol: the server (which
//! re-exports it as `xiaozhi_tpc::protocol`) and `xiaozhi-bench`, which simulates devices and
//! must know nothing else of the server so that it measures any xiaozhi-compatible server the
//! same way. The bench also writes its latency histograms with [`hdr_files`], so its files and
//! the server's exports compare directly.

pub mod binary;
pub mod client;
pub mod hdr_files;
pub mod identity;
pub mod server;
pub mod token;

pub use binary::{AudioFrame, BinaryProtocol, FrameError};
pub use client::{
    parse_client_message, AudioParams, ClientMessage, Features, Hello, Iot, Listen, ListenMode,
    ListenState, ParseError,
};
pub use identity::{identify, DeviceIdentity, IdentityError};
pub use server::{ServerMessage, Transport, UdpParams};
pub use token::{TokenError, TokenSigner};
