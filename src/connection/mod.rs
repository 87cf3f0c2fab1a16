//! The connection wing: everything between a shard's listener and a device's [`Session`].
//!
//! A shard owns listeners and sessions' mailboxes; a connection moves bytes and runs what its
//! session asks for. One link per transport over one shared loop:
//! - [`accept`] (with [`handshake`]): the WebSocket port's request head, the PROXY header from trusted balancers,
//!   forwarded addresses, the per-address rate, admission (or a hand-off to a shard with
//!   room), identity and token authentication, then the session;
//! - [`driver`]: the loop every transport shares (device, mailbox and timers in; the
//!   session's [`Effects`](crate::session::Effects) out, written with a write timeout), over
//!   a transport's [`Link`](driver::Link);
//! - [`websocket`]: the WebSocket's link (text and binary frames, close frames);
//! - [`mqtt`] (with [`udp`]): the MQTT + UDP transport: CONNECT and its credentials, one
//!   session per hello on a long-lived MQTT connection, PUBLISHes for text, the shard's own
//!   UDP socket for encrypted audio;
//! - [`stream`]: the socket under a device's WebSocket (glommio's, or swept by the shard);
//! - [`read_budget`]: how many ready wake-ups in a row the loop handles before it yields, so
//!   one flooding device cannot keep the shard to itself;
//! - [`effects`]: carries out what a session asks for on this shard's [`Providers`] (jobs for
//!   the inference cores, remote calls, the LLM stream and its cancellation);
//! - [`settings`]: the session and connection settings, built once per shard from the config.
//!
//! The wing sees its shard only through [`ConnectionContext`] (the way HTTP routes see
//! `HttpContext`): the shard implements [`Host`] (admission, hand-off, counters, histograms),
//! so nothing here imports the shard, and the shard decides where a connection goes.

pub mod accept;
pub mod driver;
pub mod effects;
pub mod handshake;
pub mod mqtt;
pub mod read_budget;
pub mod settings;
pub mod stream;
pub mod udp;
pub mod websocket;

use std::any::Any;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Instant;

use crate::metrics::{Stage, Transport};
use crate::providers::Providers;
use crate::session::{Session, SessionCounters, SessionEvent};

pub use accept::Upgrade;
pub use settings::ConnectionSettings;

/// What a connection gets from the shard that owns it.
#[derive(Clone)]
pub struct ConnectionContext {
    /// The shard's index (routes inference replies back to it).
    pub shard: usize,
    /// Session and connection settings (built once per shard).
    pub settings: Rc<ConnectionSettings>,
    /// The shard's providers.
    pub providers: Rc<Providers>,
    /// Admission, hand-off, counters and histograms: the shard's side.
    pub host: Rc<dyn Host>,
    /// The shard's socket sweep, when device sockets are read in sweeps
    /// (`server.socket_sweep_ms`).
    pub sweep: Option<shards::Sweep>,
}

/// What a connection asks of its shard.
pub trait Host {
    /// Registers a new session, or says why not (full or draining).
    fn admit(&self) -> Result<Admission, Refusal>;
    /// Hands a connection this full shard cannot admit to a shard with room; true when one took
    /// it (the caller then drops its own stream, closing only its descriptor).
    fn hand_off(&self, fd: OwnedFd, upgrade: Upgrade) -> bool;
    /// Takes a token from `ip`'s connection-rate bucket; false means refuse (HTTP 429).
    fn allow_connection_from(&self, ip: IpAddr) -> bool;
    /// When draining, the deadline for answers in progress.
    fn drain_deadline(&self) -> Option<Instant>;
    /// Counts what happened to a connection.
    fn count(&self, what: Count);
    /// A session on `transport` started (the per-transport gauge and counter).
    fn opened(&self, transport: Transport);
    /// The session on `transport` that [`Host::opened`] announced ended.
    fn closed(&self, transport: Transport);
    /// Records latency samples of a session on `transport` in the shard's histograms.
    fn record(&self, transport: Transport, samples: &[(Stage, u64)]);
    /// A session ended: count how, and add its counters to the shard's totals.
    fn ended(&self, outcome: &Outcome);
}

/// A registered session: its key and mailbox on this shard. Dropping it unregisters the
/// session (the shard's registration guard rides along).
pub struct Admission {
    /// The session's key on this shard (routes inference results back).
    pub key: u64,
    /// The session's inbox.
    pub mailbox: Rc<shards::Mailbox<SessionEvent>>,
    _registration: Box<dyn Any>,
}

impl Admission {
    /// An admission whose `registration` unregisters the session when dropped.
    pub fn new(
        key: u64,
        mailbox: Rc<shards::Mailbox<SessionEvent>>,
        registration: Box<dyn Any>,
    ) -> Admission {
        Admission {
            key,
            mailbox,
            _registration: registration,
        }
    }
}

/// Why a new session was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// At this shard's connection limit (the caller may hand the connection on; it counts
    /// [`Count::RefusedFull`] when it refuses).
    Full(usize),
    /// Draining.
    Draining,
}

/// Something a connection counts on its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// The request head failed (timeout, malformed, too large, bad PROXY header).
    HandshakeError,
    /// A trusted balancer sent no valid PROXY header.
    ProxyHeaderError,
    /// A plain HTTP request answered on the WebSocket port.
    PlainHttp,
    /// Refused for a missing or invalid identity.
    IdentityError,
    /// Refused by token authentication.
    AuthFailure,
    /// Refused because the shard was full and no other shard took it.
    RefusedFull,
    /// A connection spent its read budget and let the shard's other tasks run.
    ReadBudgetYield,
    /// A connection's reads were paused because it sent faster than its inbound rate.
    InboundThrottled,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Closed by either side, or the device vanished.
    Normal,
    /// The device stopped reading (write timeout or outbound queue full).
    SlowConsumer,
    /// A message over the size limit.
    Oversized,
    /// A frame over the size limit.
    OversizedFrame,
    /// A WebSocket protocol error (or invalid UTF-8).
    ProtocolError,
    /// No hello in time.
    HelloTimeout,
    /// Idle or no-voice timeout.
    Timeout,
}

/// A finished session: how it ended and what it counted.
pub struct Outcome {
    /// How it ended.
    pub end: End,
    /// Its counters (the shard adds them to its totals).
    pub counters: SessionCounters,
}

impl Outcome {
    /// The outcome of `session`, ended by `end`.
    pub fn of(session: &Session, end: End) -> Outcome {
        tracing::debug!(session = %session.id, ?end, "session ended");
        session.log_suppressed();
        Outcome {
            end,
            counters: session.counters(),
        }
    }
}
