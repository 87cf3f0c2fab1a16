//! One shard of the server: the state a core owns and its main loop.
//!
//! A [`Shard`] lives on one executor (`Rc`, `Cell`, `RefCell`: it is `!Send` by construction,
//! so no other core can reach it). It owns its listeners on the WebSocket and HTTP ports
//! (SO_REUSEPORT: the kernel spreads connections across shards), the registry of its sessions
//! (their mailboxes), its counters, and its drain state. Other shards and threads talk to it
//! only through [`ShardRequest`] messages on its control channel.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::{Latency, Shares};
use shards::{Control, Mailbox, Routed, ShardContext, ShardMesh};

use crate::config::Config;
use crate::front_door::peer::TrustedProxies;
use crate::front_door::rate_limit::AddressRateLimiter;
use crate::http::{HttpAdmission, HttpContext, HttpCounters, OtaSettings};
use crate::inference::{InferenceQueues, ShardReplies};
use crate::metrics::intervals::{IntervalLog, IntervalLogCopy};
use crate::metrics::{Stage, StageHistograms};
use crate::protocol::TokenSigner;
use crate::providers::asr::AsrResult;
use crate::providers::http_client::{ClientSettings, HttpClient};
use crate::providers::tts::TtsResult;
use crate::providers::vad::VadResult;
use crate::session::connection::Upgrade;
use crate::session::{SessionCounters, SessionEvent};

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

/// A shard's counters and latency histograms, sent to whoever asked.
#[derive(Clone)]
pub struct ShardSnapshot {
    /// Counters.
    pub stats: ShardStats,
    /// Stage histograms.
    pub hist: StageHistograms,
}

/// A shard's counters (plain numbers; snapshot by value).
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardStats {
    /// Shard index.
    pub shard: usize,
    /// Sessions currently open.
    pub sessions: u64,
    /// WebSocket sessions accepted (upgraded).
    pub accepted: u64,
    /// Upgrades refused because the shard was full (and no other shard took them).
    pub refused_full: u64,
    /// Upgrades this shard, being full, handed to a shard with room.
    pub handed_off: u64,
    /// Upgrades this shard took over from a full shard.
    pub adopted: u64,
    /// Upgrades refused because the instance was draining.
    pub refused_draining: u64,
    /// Upgrades refused by the per-address connection rate (HTTP 429).
    pub refused_rate_limited: u64,
    /// Connections from trusted balancers without a valid PROXY header.
    pub proxy_header_errors: u64,
    /// Addresses in this shard's rate-limit table (gauge).
    pub rate_limit_addresses: u64,
    /// Rate-limit buckets forgotten because the table was full.
    pub rate_limit_evictions: u64,
    /// The HTTP port's connections and refusals.
    pub http: HttpCounters,
    /// This shard's connection limit (gauge: the smaller of the per-shard limit and its share of
    /// the instance limit).
    pub connection_limit: u64,
    /// Connections that failed before or during the HTTP handshake.
    pub handshake_errors: u64,
    /// Plain HTTP requests answered on the WebSocket port.
    pub plain_http: u64,
    /// Connections refused for a missing or invalid identity.
    pub identity_errors: u64,
    /// Connections refused by token authentication.
    pub auth_failures: u64,
    /// Sessions closed because the device stopped reading.
    pub slow_consumers: u64,
    /// Sessions closed for an oversized message.
    pub oversized: u64,
    /// Sessions closed for an oversized frame.
    pub oversized_frames: u64,
    /// Sessions closed by a WebSocket protocol error.
    pub protocol_errors: u64,
    /// Sessions closed by the hello timeout.
    pub hello_timeouts: u64,
    /// Sessions closed by idle / no-voice timeouts.
    pub idle_closes: u64,
    /// VAD results whose session had already ended.
    pub orphan_results: u64,
    /// Jobs waiting in the VAD workers' queues (gauge; same view from every shard).
    pub vad_queue_depth: u64,
    /// Per-session counters summed over ended sessions.
    pub ended: SessionCounters,
    /// Requests to `/mcp/vision/explain` by outcome.
    pub vision: crate::http::vision::VisionCounters,
}

impl ShardStats {
    /// Adds `other` into `self` (for a merged view across shards).
    pub fn merge(&mut self, o: &ShardStats) {
        self.sessions += o.sessions;
        self.accepted += o.accepted;
        self.refused_full += o.refused_full;
        self.handed_off += o.handed_off;
        self.adopted += o.adopted;
        self.refused_draining += o.refused_draining;
        self.refused_rate_limited += o.refused_rate_limited;
        self.proxy_header_errors += o.proxy_header_errors;
        self.rate_limit_addresses += o.rate_limit_addresses;
        self.rate_limit_evictions += o.rate_limit_evictions;
        self.http.merge(&o.http);
        self.connection_limit += o.connection_limit;
        self.handshake_errors += o.handshake_errors;
        self.plain_http += o.plain_http;
        self.identity_errors += o.identity_errors;
        self.auth_failures += o.auth_failures;
        self.slow_consumers += o.slow_consumers;
        self.oversized += o.oversized;
        self.oversized_frames += o.oversized_frames;
        self.protocol_errors += o.protocol_errors;
        self.hello_timeouts += o.hello_timeouts;
        self.idle_closes += o.idle_closes;
        self.orphan_results += o.orphan_results;
        self.vad_queue_depth = self.vad_queue_depth.max(o.vad_queue_depth);
        self.ended.add(&o.ended);
        self.vision.add(&o.vision);
    }
}

/// Everything a shard owns.
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
    pub http_port: Cell<u16>,
    /// Balancers whose PROXY header and forwarded headers are believed.
    pub trusted: TrustedProxies,
    /// Most sessions this shard admits (its share of the instance limit).
    pub connection_limit: usize,
    rate_limiter: RefCell<Option<AddressRateLimiter>>,
    /// The HTTP port's client addresses and limits (shared with its [`HttpContext`]).
    pub http_admission: Rc<HttpAdmission>,
    sessions: RefCell<HashMap<u64, Rc<Mailbox<SessionEvent>>>>,
    /// Open sessions of every shard as last announced to this one (own entry unused); stale by
    /// up to a load tick, which is fine: the shard a connection is handed to checks its own
    /// budget again.
    peer_sessions: RefCell<Vec<usize>>,
    next_key: Cell<u64>,
    /// False while draining (`/readyz`).
    pub ready: Rc<Cell<bool>>,
    drain_deadline: Cell<Option<Instant>>,
    /// Counters.
    pub stats: RefCell<ShardStats>,
    /// Latency histograms.
    pub hist: RefCell<StageHistograms>,
    /// Shard 0 only: the interval log of the merged histograms.
    pub intervals: Option<RefCell<IntervalLog>>,
    /// Job queues on the inference cores.
    pub queues: InferenceQueues,
    /// This shard's HTTP client (keep-alive pool) for remote providers.
    pub http: Rc<HttpClient>,
    /// Server-side tools offered to the LLM in every session of this shard.
    pub server_tools: Rc<crate::tools::server::ServerTools>,
    /// The tools of a session before its device announces any (shared by such sessions).
    pub base_tools: Rc<crate::tools::ToolSet>,
    mesh: ShardMesh<ShardRequest>,
}

/// A registered session; dropping it unregisters the session (its memory goes with it).
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
        self.shard.sessions.borrow_mut().remove(&self.key);
    }
}

/// Why a new session was not admitted.
pub enum Refusal {
    /// At this shard's connection limit. Not counted by [`Shard::admit`]: the caller may hand
    /// the connection to another shard instead, so it counts `refused_full` when it refuses.
    Full(usize),
    /// Draining.
    Draining,
}

impl Shard {
    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// When draining, the deadline for in-flight answers.
    pub fn drain_deadline(&self) -> Option<Instant> {
        self.drain_deadline.get()
    }

    /// Admits a new session, or says why not.
    pub fn admit(self: &Rc<Self>) -> Result<SessionSlot, Refusal> {
        if self.drain_deadline.get().is_some() {
            self.stats.borrow_mut().refused_draining += 1;
            return Err(Refusal::Draining);
        }
        let max = self.connection_limit;
        if self.session_count() >= max {
            return Err(Refusal::Full(max));
        }
        let key = self.next_key.get();
        self.next_key.set(key + 1);
        // Only shard-originated control events (drain) arrive here for now.
        let mailbox = Rc::new(Mailbox::new(16));
        self.sessions.borrow_mut().insert(key, mailbox.clone());
        self.stats.borrow_mut().accepted += 1;
        Ok(SessionSlot {
            shard: self.clone(),
            key,
            mailbox,
        })
    }

    /// Hands a connection this full shard cannot admit to the shard believed to have the most
    /// room; says which one took the message. `None` when no shard is believed to have room or
    /// the message cannot be sent (channel full, shard gone: the duplicate descriptor is closed
    /// with the message); then the caller refuses the connection itself.
    pub fn hand_off(&self, fd: OwnedFd, upgrade: Upgrade) -> Option<usize> {
        let to = roomiest_peer(&self.peer_sessions.borrow(), self.id, self.connection_limit)?;
        self.mesh
            .try_send(to, Control::User(ShardRequest::Adopt { fd, upgrade }))
            .ok()?;
        // Count it against the target until its next announcement, so a burst spreads over the
        // shards with room instead of piling onto the one that looked emptiest.
        if let Some(open) = self.peer_sessions.borrow_mut().get_mut(to) {
            *open += 1;
        }
        self.stats.borrow_mut().handed_off += 1;
        Some(to)
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
        s.sessions = self.session_count() as u64;
        s.vad_queue_depth = self.queues.vad.queue_depths().iter().sum::<usize>() as u64;
        ShardSnapshot {
            stats: s,
            hist: self.hist.borrow().clone(),
        }
    }

    /// The mailbox of session `key`, if it is still open.
    pub fn mailbox(&self, key: u64) -> Option<Rc<Mailbox<SessionEvent>>> {
        self.sessions.borrow().get(&key).cloned()
    }

    /// A copy of shard 0's interval log (asked over the control channel from other shards).
    pub async fn interval_log(&self) -> Option<IntervalLogCopy> {
        if let Some(log) = &self.intervals {
            return Some(log.borrow().copy());
        }
        let (tx, rx) = flume::bounded(1);
        self.mesh
            .try_send(0, Control::User(ShardRequest::IntervalLog(tx)))
            .ok()?;
        let answer = async { rx.recv_async().await.ok() };
        let deadline = async {
            glommio::timer::sleep(Duration::from_secs(2)).await;
            None
        };
        futures_lite::future::or(answer, deadline).await
    }

    /// Snapshots of every shard, asked over the control channels.
    pub async fn collect_stats(&self) -> Vec<ShardSnapshot> {
        let (tx, rx) = flume::bounded(self.mesh.len().max(1));
        let mut asked = 0;
        for shard in 0..self.mesh.len() {
            if shard == self.id {
                let _ = tx.try_send(self.snapshot());
                asked += 1;
            } else if self
                .mesh
                .try_send(shard, Control::User(ShardRequest::Stats(tx.clone())))
                .is_ok()
            {
                asked += 1;
            }
        }
        drop(tx);
        let mut all = Vec::with_capacity(asked);
        let deadline = glommio::timer::sleep(Duration::from_secs(2));
        let gather = async {
            while all.len() < asked {
                match rx.recv_async().await {
                    Ok(s) => all.push(s),
                    Err(_) => break,
                }
            }
        };
        futures_lite::future::or(gather, deadline).await;
        all.sort_by_key(|s| s.stats.shard);
        all
    }
}

/// The shard other than `me` with the fewest open sessions in `believed` (so the most room:
/// every shard has the same limit), lowest index on a tie; `None` when all are at `limit`.
fn roomiest_peer(believed: &[usize], me: usize, limit: usize) -> Option<usize> {
    believed
        .iter()
        .enumerate()
        .filter(|&(id, &open)| id != me && open < limit)
        .min_by_key(|&(id, &open)| (open, id))
        .map(|(id, _)| id)
}

/// Receives this shard's VAD results from the inference cores and hands each to its session.
/// Runs in a latency-sensitive task queue so a busy shard still picks results up promptly.
async fn route_vad_results(shard: Rc<Shard>, rx: flume::Receiver<Routed<VadResult>>) {
    while let Ok(Routed { item, .. }) = rx.recv_async().await {
        let received = Instant::now();
        {
            let mut h = shard.hist.borrow_mut();
            h.record(
                Stage::VadReplyWake,
                received.saturating_duration_since(item.done).as_micros() as u64,
            );
            h.record(Stage::VadQueueWait, item.queue_wait.as_micros() as u64);
            if !item.probs.is_empty() {
                h.record(
                    Stage::VadPerChunk,
                    (item.compute.as_micros() as u64) / item.probs.len() as u64,
                );
            }
            h.record(Stage::VadBatchSize, item.batch_size as u64);
        }
        match shard.mailbox(item.session) {
            Some(mb) => {
                if let Err(SessionEvent::Vad(_)) = mb.try_push(SessionEvent::Vad(Box::new(item))) {
                    shard.stats.borrow_mut().orphan_results += 1;
                }
            }
            None => shard.stats.borrow_mut().orphan_results += 1,
        }
    }
}

/// Hands a local ASR result to its session.
async fn route_asr_results(shard: Rc<Shard>, rx: flume::Receiver<Routed<AsrResult>>) {
    while let Ok(Routed { item, .. }) = rx.recv_async().await {
        shard
            .hist
            .borrow_mut()
            .record(Stage::AsrCompute, item.compute.as_micros() as u64);
        let result = match item.error {
            Some(e) => Err(e),
            None => Ok(item.text),
        };
        deliver(
            &shard,
            item.session,
            SessionEvent::Asr {
                turn: item.turn,
                result,
            },
        );
    }
}

/// Hands a local TTS result to its session.
async fn route_tts_results(shard: Rc<Shard>, rx: flume::Receiver<Routed<TtsResult>>) {
    while let Ok(Routed { item, .. }) = rx.recv_async().await {
        shard
            .hist
            .borrow_mut()
            .record(Stage::TtsCompute, item.compute.as_micros() as u64);
        let result = match item.error {
            Some(e) => Err(e),
            None => Ok((item.pcm, item.sample_rate)),
        };
        deliver(
            &shard,
            item.session,
            SessionEvent::Tts {
                turn: item.turn,
                seq: item.seq,
                result,
            },
        );
    }
}

/// Pushes a provider result (at most one in flight per kind and session, so the push is bounded).
fn deliver(shard: &Shard, session: u64, event: SessionEvent) {
    match shard.mailbox(session) {
        Some(mb) => mb.push_control(event),
        None => shard.stats.borrow_mut().orphan_results += 1,
    }
}

/// The `/mcp/vision/explain` endpoint of `shard`, counting into its stats.
fn vision_endpoint(shard: &Rc<Shard>) -> crate::http::vision::VisionEndpoint {
    let v = &shard.config.vision;
    let model = (v.provider == crate::config::VisionProvider::Openai).then(|| {
        crate::providers::vision::OpenAiVisionSettings {
            base_url: v.openai.base_url.clone(),
            api_key: crate::providers::http_client::ApiKey::from_env_or(
                "XIAOZHI_VISION_API_KEY",
                &v.openai.api_key,
            ),
            model: v.openai.model.clone(),
            timeout: Duration::from_millis(v.openai.timeout_ms),
        }
    });
    let counted = shard.clone();
    crate::http::vision::VisionEndpoint {
        model,
        max_body_bytes: v.max_body_bytes,
        max_in_flight: v.max_in_flight,
        in_flight: Rc::new(Cell::new(0)),
        tokens: shard.vision_signer.clone(),
        client: shard.http.clone(),
        record: Rc::new(move |outcome| counted.stats.borrow_mut().vision.count(outcome)),
    }
}

/// The process-wide inputs each shard copies at start.
#[derive(Clone)]
pub struct ServerEnv {
    /// Configuration.
    pub config: Config,
    /// Job queues into the inference workers.
    pub queues: InferenceQueues,
    /// Reply receivers, by shard id.
    pub replies: Vec<ShardReplies>,
    /// Reports each shard's bind result to the main thread.
    pub startup: flume::Sender<Result<(usize, SocketAddr, SocketAddr), String>>,
    /// Each shard's histograms once it has drained (bounded: one per shard).
    pub finals: flume::Sender<ShardFinal>,
}

/// A shard's main future: bind, accept, serve, and on `Control::Drain` drain and return.
pub async fn run_shard(ctx: ShardContext<ShardRequest>, env: ServerEnv) {
    let config = env.config;
    let vision_signer = {
        let mut secrets = config.server.auth.secrets.iter().filter(|s| !s.is_empty());
        secrets.next().map(|first| {
            secrets.fold(TokenSigner::new(first.clone()), |s, k| {
                s.also_accepting(k.clone())
            })
        })
    };
    let signer = vision_signer.clone().filter(|_| config.server.auth.enabled);
    // Names were checked when the config was loaded.
    let server_tools = Rc::new(
        crate::tools::server::ServerTools::from_names(&config.tools.server_tools)
            .unwrap_or_default(),
    );
    let shards = ctx.mesh.len().max(1);
    let s = &config.server;
    let connection_limit = match s.max_connections {
        0 => s.max_connections_per_shard,
        n => s.max_connections_per_shard.min(n.div_ceil(shards)),
    };
    let rate_limiter = (s.rate_limit.per_address_per_s > 0.0).then(|| {
        AddressRateLimiter::new(
            s.rate_limit.per_address_per_s,
            s.rate_limit.burst,
            s.rate_limit.max_addresses,
        )
    });
    // Validated at load; an error here cannot happen, and trusting nobody is the safe fallback.
    let trusted = TrustedProxies::parse(&s.trusted_proxies).unwrap_or_default();
    let shard = Rc::new(Shard {
        id: ctx.id,
        signer,
        vision_signer,
        http_port: Cell::new(config.server.http_port),
        trusted,
        connection_limit,
        rate_limiter: RefCell::new(rate_limiter),
        http_admission: Rc::new(HttpAdmission::new(s)),
        sessions: RefCell::new(HashMap::new()),
        peer_sessions: RefCell::new(vec![0; shards]),
        next_key: Cell::new(0),
        ready: Rc::new(Cell::new(true)),
        drain_deadline: Cell::new(None),
        stats: RefCell::new(ShardStats::default()),
        hist: RefCell::new(StageHistograms::default()),
        intervals: (ctx.id == 0).then(|| {
            RefCell::new(IntervalLog::new(
                std::time::SystemTime::now(),
                config.metrics.keep_intervals,
            ))
        }),
        queues: env.queues.clone(),
        http: Rc::new(HttpClient::new(ClientSettings {
            connect_timeout: Duration::from_millis(config.llm.openai.connect_timeout_ms),
            ..ClientSettings::default()
        })),
        mesh: ctx.mesh.clone(),
        base_tools: Rc::new(crate::tools::ToolSet::build(
            &server_tools,
            &[],
            &crate::tools::iot::IotThings::default(),
            config.tools.max_tools,
        )),
        server_tools,
        config,
    });
    let replies_tq = glommio::executor().create_task_queue(
        Shares::default(),
        Latency::Matters(Duration::from_millis(1)),
        "inference-replies",
    );
    let mut _routers = Vec::new();
    if let Some(r) = env.replies.get(ctx.id).cloned() {
        let tq = replies_tq;
        _routers
            .extend(glommio::spawn_local_into(route_vad_results(shard.clone(), r.vad), tq).ok());
        _routers
            .extend(glommio::spawn_local_into(route_asr_results(shard.clone(), r.asr), tq).ok());
        _routers
            .extend(glommio::spawn_local_into(route_tts_results(shard.clone(), r.tts), tq).ok());
    }

    let ip = shard.config.server.ip.clone();
    let bind = |port: u16| -> Result<glommio::net::TcpListener, String> {
        let addr: SocketAddr = format!("{ip}:{port}")
            .parse()
            .map_err(|e| format!("bad listen address {ip}:{port}: {e}"))?;
        glommio::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let (ws_listener, http_listener) = match (
        bind(shard.config.server.port),
        bind(shard.config.server.http_port),
    ) {
        (Ok(w), Ok(h)) => (w, h),
        (Err(e), _) | (_, Err(e)) => {
            let _ = env.startup.send(Err(format!("shard {}: {e}", ctx.id)));
            return;
        }
    };
    let ws_addr = ws_listener
        .local_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let http_addr = http_listener
        .local_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    shard.http_port.set(http_addr.port());
    let _ = env.startup.send(Ok((ctx.id, ws_addr, http_addr)));

    let http_ctx = Rc::new(HttpContext {
        ota: OtaSettings {
            public_ws_url: shard.config.server.public_ws_url.clone(),
            ws_port: ws_addr.port(),
            timezone_offset_minutes: (shard.config.server.timezone_offset_hours * 60.0).round()
                as i64,
            firmware_version: shard.config.server.firmware.version.clone(),
            firmware_url: shard.config.server.firmware.url.clone(),
            signer: shard.signer.clone(),
            allowed_devices: shard.config.server.auth.allowed_devices.clone(),
        },
        ready: shard.ready.clone(),
        admission: shard.http_admission.clone(),
        metrics: {
            let shard = shard.clone();
            Rc::new(move || {
                let shard = shard.clone();
                Box::pin(
                    async move { crate::metrics::render_snapshots(&shard.collect_stats().await) },
                )
            })
        },
        histograms: {
            let shard = shard.clone();
            Rc::new(move |path: String| {
                let shard = shard.clone();
                Box::pin(async move { crate::metrics::service::histogram(&shard, &path).await })
            })
        },
        vision: vision_endpoint(&shard),
    });
    let _timer_probe = glommio::spawn_local(crate::metrics::service::measure_timer_lateness(
        shard.clone(),
    ));
    let _intervals = shard
        .intervals
        .is_some()
        .then(|| glommio::spawn_local(crate::metrics::service::record_intervals(shard.clone())));

    let _load = (shard.mesh.len() > 1).then(|| glommio::spawn_local(announce_load(shard.clone())));

    let ws_accept = glommio::spawn_local({
        let shard = shard.clone();
        async move {
            loop {
                match ws_listener.accept().await {
                    Ok(stream) => {
                        let shard = shard.clone();
                        glommio::spawn_local(crate::session::connection::serve(stream, shard))
                            .detach();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed on the WebSocket port");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    });
    let http_accept = glommio::spawn_local(async move {
        loop {
            match http_listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(crate::http::serve_connection(stream, http_ctx.clone()))
                        .detach();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the HTTP port");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });

    // Control loop: answer other shards until asked to drain.
    while let Ok(msg) = ctx.control.recv_async().await {
        match msg {
            Control::User(request) => answer(&shard, request),
            Control::Drain => break,
        }
    }
    // Answers stats requests (and ignores repeated drains) for the rest of the shard's life.
    let control_during_drain = || async {
        while let Ok(msg) = ctx.control.recv_async().await {
            if let Control::User(request) = msg {
                answer(&shard, request);
            }
        }
    };

    // Drain, step 1: not ready, so the balancer's health check takes us out of rotation; keep
    // accepting for `delay_ms` so devices it still sends meanwhile are served.
    shard.ready.set(false);
    let delay = Duration::from_millis(shard.config.server.drain.delay_ms);
    tracing::info!(
        shard = shard.id,
        delay_ms = delay.as_millis() as u64,
        "not ready; still accepting until the drain delay ends"
    );
    if !delay.is_zero() {
        futures_lite::future::or(glommio::timer::sleep(delay), async {
            control_during_drain().await;
            // The control channel is gone: nobody waits for us; still honour the delay.
            glommio::timer::sleep(delay).await
        })
        .await;
    }

    // Step 2: stop accepting new devices, let answers finish, say goodbye, then return.
    let grace = Duration::from_millis(shard.config.server.drain.grace_ms);
    let deadline = Instant::now() + grace;
    shard.drain_deadline.set(Some(deadline));
    drop(ws_accept);
    let open = shard.session_count();
    tracing::info!(
        shard = shard.id,
        sessions = open,
        grace_ms = grace.as_millis() as u64,
        "draining"
    );
    let mailboxes: Vec<_> = shard.sessions.borrow().values().cloned().collect();
    for m in mailboxes {
        m.push_control(SessionEvent::Drain { deadline });
    }
    // Sessions close themselves by the deadline; allow a little extra for close handshakes.
    let hard_stop = deadline + Duration::from_secs(2);
    let wait_sessions = async {
        while shard.session_count() > 0 && Instant::now() < hard_stop {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
    };
    futures_lite::future::or(wait_sessions, control_during_drain()).await;
    drop(http_accept);
    drop(_intervals);
    drop(_load);
    drop(_timer_probe);
    tracing::info!(shard = shard.id, left = shard.session_count(), "drained");
    let _ = env.finals.try_send(ShardFinal {
        shard: shard.id,
        hist: shard.hist.borrow().clone(),
        intervals: shard
            .intervals
            .as_ref()
            .map(|l| l.replace(IntervalLog::new(std::time::SystemTime::now(), 1))),
    });
}

/// Tells the other shards this shard's session count every `runtime.tick_ms` when it changed,
/// and at least every [`LOAD_REFRESH_TICKS`] ticks (a lost announcement heals itself).
async fn announce_load(shard: Rc<Shard>) {
    let period = Duration::from_millis(shard.config.runtime.tick_ms.max(1));
    let mut last = None;
    let mut quiet_ticks = 0;
    loop {
        glommio::timer::sleep(period).await;
        let sessions = shard.session_count();
        quiet_ticks += 1;
        if last == Some(sessions) && quiet_ticks < LOAD_REFRESH_TICKS {
            continue;
        }
        (last, quiet_ticks) = (Some(sessions), 0);
        for to in (0..shard.mesh.len()).filter(|&to| to != shard.id) {
            let load = ShardRequest::Load {
                shard: shard.id,
                sessions,
            };
            let _ = shard.mesh.try_send(to, Control::User(load));
        }
    }
}

/// Load ticks after which a shard repeats an unchanged session count.
const LOAD_REFRESH_TICKS: u32 = 20;

/// Answers a request from another shard (or the main thread).
fn answer(shard: &Rc<Shard>, request: ShardRequest) {
    match request {
        ShardRequest::Stats(reply) => {
            let _ = reply.try_send(shard.snapshot());
        }
        ShardRequest::IntervalLog(reply) => {
            if let Some(log) = &shard.intervals {
                let _ = reply.try_send(log.borrow().copy());
            }
        }
        ShardRequest::Dump => {
            glommio::spawn_local(crate::metrics::service::dump(shard.clone())).detach();
        }
        ShardRequest::Load {
            shard: from,
            sessions,
        } => {
            if let Some(open) = shard.peer_sessions.borrow_mut().get_mut(from) {
                *open = sessions;
            }
        }
        ShardRequest::Adopt { fd, upgrade } => {
            shard.stats.borrow_mut().adopted += 1;
            glommio::spawn_local(crate::session::connection::adopt(
                fd,
                upgrade,
                shard.clone(),
            ))
            .detach();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::roomiest_peer;

    #[test]
    fn hand_off_goes_to_the_emptiest_other_shard_and_never_to_a_full_one() {
        assert_eq!(roomiest_peer(&[4, 3, 1, 1], 0, 4), Some(2));
        assert_eq!(roomiest_peer(&[4, 3, 0, 1], 2, 4), Some(3));
        assert_eq!(roomiest_peer(&[0, 4, 5], 0, 4), None);
        assert_eq!(roomiest_peer(&[0], 0, 4), None);
    }
}
