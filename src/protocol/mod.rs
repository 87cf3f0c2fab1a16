//! The xiaozhi device wire protocol, as pure data types and functions (spec `protocol.md` §2–6).
//!
//! Everything a connection needs to understand a device and be understood by it, with no I/O:
//! who is connecting ([`identity`]), whether their token is genuine ([`token`]), the JSON text
//! messages in each direction ([`client`], [`server`]) and the binary audio framing
//! ([`binary`]). The session code at the edges reads sockets and calls into here; each module
//! has its own error type, and malformed input is always an error value, never a panic.

pub mod binary;
pub mod client;
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
