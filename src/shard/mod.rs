//! One shard of the server: the state a core owns, built, started and drained as separate
//! steps.
//!
//! A [`Shard`] lives on one executor (`Rc`, `Cell`, `RefCell`: it is `!Send` by construction,
//! so no other core can reach it). It owns its listeners on the WebSocket and HTTP ports
//! (SO_REUSEPORT: the kernel spreads connections across shards), the registry of its sessions
//! (their mailboxes), its counters, and its drain state. Other shards and threads talk to it
//! only through [`ShardRequest`] messages on its control channel.
//!
//! - [`build`]: the shard from the configuration (signers, limits, tools, HTTP client) and the
//!   narrow context its HTTP port gets.
//! - [`run`]: [`run_shard`]: build, start the listeners and tasks, answer the control channel,
//!   drain, hand back the histograms.
//! - [`drain`]: the [`Drain`](drain::Drain) state and the drain steps; it completes when the
//!   last [`SessionSlot`] drops.
//! - [`replies`]: the one router that takes inference replies to session mailboxes.
//! - [`vad_tick`]: the flusher that sends the shard's VAD jobs as one batch per tick.
//! - [`peers`]: load announcements, the hand-off target, and questions to the other shards.
//! - [`stats`]: the counters, declared once, and the `/metrics` text.
//! - [`histograms`]: the interval recorder, `/histograms` and the SIGUSR1 dump.

pub mod build;
pub mod drain;
pub mod histograms;
mod host;
pub mod peers;
pub mod replies;
pub mod run;
pub mod stats;
pub mod vad_tick;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Instant;

use shards::{Mailbox, ShardMesh};

use crate::config::Config;
use crate::connection::settings::ConnectionSettings;
use crate::connection::{Refusal, Upgrade};
use crate::front_door::peer::TrustedProxies;
use crate::front_door::rate_limit::AddressRateLimiter;
use crate::http::shared_render::SharedRender;
use crate::http::HttpAdmission;
use crate::inference::{InferenceQueues, ShardReplies};
use crate::metrics::intervals::{IntervalLog, IntervalLogCopy};
use crate::metrics::StageHistograms;
use crate::protocol::TokenSigner;
use crate::providers::http_client::HttpClient;
use crate::providers::Providers;
use crate::session::SessionEvent;

use drain::Drain;
pub use run::{run_shard, ServerEnv};
pub use stats::{ShardSnapshot, ShardStats};

/// Cross-shard requests carried by `shards::Control::User`.
pub enum ShardRequest {
    /// Reply with this shard's counters and histograms.
    Stats(flume::Sender<ShardSnapshot>),
    /// (Shard 0) reply with a copy of the interval log.
    IntervalLog(flume::Sender<IntervalLogCopy>),
    /// (Shard 0) write the histograms into `metrics.dump_dir` (SIGUSR1).
    Dump,
    /// Shard `shard` has `sessions` open (sent on the load tick; feeds [`Shard::hand_off`]).
    Load {
        /// The sending shard.
        shard: usize,
        /// Its open sessions.
        sessions: usize,
    },
    /// A full shard hands over a connection whose upgrade request it has read and checked:
    /// admit it on this shard's budget (or refuse it here; it is never handed on again).
    Adopt {
        /// The connected socket (a duplicate; the sender closes its own descriptor).
        fd: OwnedFd,
        /// What the sender parsed: the request head, the client address, the WebSocket key.
        upgrade: Upgrade,
    },
    /// An MQTT device connected on another shard with this client id: close this shard's
    /// connection with the same id, if any (the newer one replaces it, spec §15.1).
    MqttClientConnected {
        /// The CONNECT's client id.
        client_id: String,
    },
    /// (From the main thread) every shard has bound its ports: `/readyz` may answer ready.
    AllShardsListening,
}

/// What a shard hands the main thread when it has drained: its histograms and, from shard 0,
/// the interval log, for the dump at shutdown.
pub struct ShardFinal {
    /// Shard index.
    pub shard: usize,
    /// Cumulative stage histograms.
    pub hist: StageHistograms,
    /// Shard 0's interval log.
    pub intervals: Option<IntervalLog>,
}

/// Everything a shard owns.
///
/// The public fields are what a connection reads and counts into (configuration, signers,
/// counters, histograms, inference queues, tools, the HTTP client); everything that decides
/// admission, hand-off and drain is private and reached through methods.
pub struct Shard {
    /// Shard index.
    pub id: usize,
    /// The configuration (each shard has its own copy).
    pub config: Config,
    /// Token signer/verifier when auth is on.
    pub signer: Option<TokenSigner>,
    /// Signs the per-device vision tokens (from `server.auth.secrets`, auth on or not); `None`
    /// without a secret (then no vision provider is set either, see
    /// `Config::ensure_vision_secret`).
    pub vision_signer: Option<TokenSigner>,
    /// The HTTP port as bound (for the vision URL handed to devices).
    pub http_port: Rc<Cell<u16>>,
    /// Balancers whose PROXY header and forwarded headers are believed.
    pub trusted: TrustedProxies,
    /// Counters.
    pub stats: RefCell<ShardStats>,
    /// Latency histograms.
    pub hist: RefCell<StageHistograms>,
    /// Job queues on the inference cores.
    pub queues: InferenceQueues,
    /// This shard's HTTP client (keep-alive pool) for remote providers.
    pub http: Rc<HttpClient>,
    /// This shard's providers (local worker pools, remote endpoints, or offline).
    pub providers: Rc<Providers>,
    /// What every connection on this shard runs with (built once).
    pub connection: Rc<ConnectionSettings>,
    /// The device sockets read in sweeps (`server.socket_sweep_ms` > 0).
    pub sweep: Option<shards::Sweep>,
    /// Server-side tools offered to the LLM in every session of this shard.
    pub server_tools: Rc<crate::tools::server::ServerTools>,
    /// The tools of a session before its device announces any (shared by such sessions).
    pub base_tools: Rc<crate::tools::ToolSet>,
    /// Most sessions this shard admits (its share of the instance limit).
    connection_limit: usize,
    rate_limiter: RefCell<Option<AddressRateLimiter>>,
    /// The HTTP port's client addresses and limits (shared with its `HttpContext`).
    http_admission: Rc<HttpAdmission>,
    /// `/metrics` renders on this shard, one at a time and shared (shared with its `HttpContext`).
    metrics_render: Rc<SharedRender>,
    sessions: RefCell<HashMap<u64, Rc<Mailbox<SessionEvent>>>>,
    /// Mailbox refusals of sessions that have ended (open ones are read at snapshot time).
    ended_mailbox_refusals: Cell<u64>,
    /// VAD batches a full worker queue refused (see [`vad_tick`]).
    vad_batches_unsent: Cell<u64>,
    /// Open sessions of every shard as last announced to this one (own entry unused); stale by
    /// up to a load tick, which is fine: the shard a connection is handed to checks its own
    /// budget again.
    peer_sessions: RefCell<Vec<usize>>,
    next_key: Cell<u64>,
    /// Readiness, the drain deadline, and the wake-up when the last session goes.
    drain: Drain,
    /// Shard 0 only: the interval log of the merged histograms.
    intervals: Option<RefCell<IntervalLog>>,
    /// This shard's reply receivers (read for their depth; the routers own clones).
    replies: Option<ShardReplies>,
    mesh: ShardMesh<ShardRequest>,
    /// The MQTT + UDP endpoint, once started (when `mqtt.enabled`).
    pub mqtt: RefCell<Option<Rc<crate::connection::mqtt::MqttEndpoint>>>,
}

/// A registered session; dropping it unregisters the session (its memory goes with it) and,
/// when it was the last one of a draining shard, completes the drain.
pub struct SessionSlot {
    shard: Rc<Shard>,
    key: u64,
    /// The session's inbox.
    pub mailbox: Rc<Mailbox<SessionEvent>>,
}

impl SessionSlot {
    /// The session's key on this shard.
    pub fn key(&self) -> u64 {
        self.key
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let shard = &self.shard;
        shard.sessions.borrow_mut().remove(&self.key);
        shard
            .ended_mailbox_refusals
            .set(shard.ended_mailbox_refusals.get() + self.mailbox.refused());
        shard.drain.session_closed(shard.session_count());
    }
}

/// Events a session's mailbox holds before it refuses more (only the router's VAD results
/// respect the bound; drain and provider results are control items).
const MAILBOX_CAPACITY: usize = 16;

impl Shard {
    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// When draining, the deadline for in-flight answers.
    pub fn drain_deadline(&self) -> Option<Instant> {
        self.drain.deadline()
    }

    /// Admits a new session, or says why not.
    pub fn admit(self: &Rc<Self>) -> Result<SessionSlot, Refusal> {
        if self.drain.deadline().is_some() {
            self.stats.borrow_mut().refused_draining += 1;
            return Err(Refusal::Draining);
        }
        let max = self.connection_limit;
        if self.session_count() >= max {
            return Err(Refusal::Full(max));
        }
        let key = self.next_key.get();
        self.next_key.set(key + 1);
        let mailbox = Rc::new(Mailbox::new(MAILBOX_CAPACITY));
        self.sessions.borrow_mut().insert(key, mailbox.clone());
        self.stats.borrow_mut().accepted += 1;
        Ok(SessionSlot {
            shard: self.clone(),
            key,
            mailbox,
        })
    }

    /// Takes a token from `ip`'s connection-rate bucket; false means refuse (HTTP 429).
    pub fn allow_connection_from(&self, ip: std::net::IpAddr) -> bool {
        let mut limiter = self.rate_limiter.borrow_mut();
        let Some(l) = limiter.as_mut() else {
            return true;
        };
        let ok = l.allow(ip, Instant::now());
        if !ok {
            self.stats.borrow_mut().refused_rate_limited += 1;
        }
        ok
    }

    /// A snapshot of this shard's counters and histograms.
    pub fn snapshot(&self) -> ShardSnapshot {
        let mut s = *self.stats.borrow();
        s.shard = self.id;
        s.connection_limit = self.connection_limit as u64;
        if let Some(l) = self.rate_limiter.borrow().as_ref() {
            s.rate_limit_addresses = l.len() as u64;
            s.rate_limit_evictions = l.evictions();
        }
        s.http = self.http_admission.counters();
        s.http.metrics_requests = self.metrics_render.requests();
        s.http.metrics_renders = self.metrics_render.renders();
        s.sessions = self.session_count() as u64;
        s.log_lines_dropped = crate::log_writer::dropped_lines();
        s.upstream_opened = self.http.opened();
        s.upstream_pooled = self.http.pooled_connections() as u64;
        if let Some(sweep) = &self.sweep {
            let st = sweep.stats();
            s.socket_sweeps = st.sweeps;
            s.socket_sweep_wakes = st.woken;
            s.swept_sockets = st.streams as u64;
        }
        if let Some(mqtt) = self.mqtt.borrow().as_ref() {
            s.mqtt = crate::connection::mqtt::stats::MqttStats::of(mqtt);
        }
        self.read_queues(&mut s.queues);
        ShardSnapshot {
            stats: s,
            hist: self.hist.borrow().clone(),
        }
    }

    /// Fills the queue gauges and refusal counts from the queues themselves.
    fn read_queues(&self, q: &mut stats::QueueStats) {
        let pools = &self.queues;
        let vad = &self.providers.vad;
        q.vad_jobs_queued = vad.outstanding() as u64;
        q.vad_jobs_refused = vad.refused();
        q.vad_jobs_withdrawn = vad.removed();
        q.vad_batches_sent = vad.batches();
        q.vad_batches_unsent = self.vad_batches_unsent.get();
        q.replies_dropped = pools.vad.dropped_replies();
        if let Some(asr) = &pools.asr {
            q.asr_jobs_queued = asr.depth() as u64;
            q.asr_jobs_refused = asr.refused();
            q.asr_jobs_skipped = asr.skipped();
            q.cancels_dropped += asr.cancels_dropped();
            q.replies_dropped += asr.dropped_replies();
        }
        if let Some(tts) = &pools.tts {
            q.tts_jobs_queued = tts.depth() as u64;
            q.tts_jobs_refused = tts.refused();
            q.tts_jobs_skipped = tts.skipped();
            q.cancels_dropped += tts.cancels_dropped();
            q.replies_dropped += tts.dropped_replies();
        }
        if let Some(r) = &self.replies {
            q.vad_replies_queued = r.vad.len() as u64;
            q.asr_replies_queued = r.asr.len() as u64;
            q.tts_replies_queued = r.tts.len() as u64;
        }
        let sessions = self.sessions.borrow();
        q.mailbox_events_queued = sessions.values().map(|m| m.len() as u64).sum();
        q.mailbox_refused =
            self.ended_mailbox_refusals.get() + sessions.values().map(|m| m.refused()).sum::<u64>();
    }

    /// The mailbox of session `key`, if it is still open.
    pub fn mailbox(&self, key: u64) -> Option<Rc<Mailbox<SessionEvent>>> {
        self.sessions.borrow().get(&key).cloned()
    }

    /// The mailboxes of every open session.
    fn mailboxes(&self) -> Vec<Rc<Mailbox<SessionEvent>>> {
        self.sessions.borrow().values().cloned().collect()
    }
}

/// Where a shard's listeners ended up (reported to the main thread).
pub type BoundAddrs = (usize, SocketAddr, SocketAddr);
