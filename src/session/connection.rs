//! The I/O loop of one device connection: handshake, then one task that waits on the socket,
//! the session's mailbox and its next timer, feeds the [`Session`] state machine, and writes
//! what it returns with a write timeout (a device that stops reading is disconnected).

use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use futures_lite::StreamExt;
use glommio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::Message;

use std::cell::RefCell;

use super::dialogue::{DialogueSettings, Request};
use super::{
    CloseCause, Outgoing, Session, SessionEvent, SessionSettings, SessionTimers, ToolSettings,
};
use crate::config::{Config, LlmProvider, TtsProvider, VisionProvider};
use crate::front_door::{proxy, write_plain};
use crate::pipeline::audio_in::AudioInLimits;
use crate::protocol::token::MISSING_CLIENT_ID;
use crate::protocol::{identify, AudioParams};
use crate::providers::asr::openai::{transcribe, OpenAiAsrSettings};
use crate::providers::asr::wav::wav_bytes;
use crate::providers::asr::AsrJob;
use crate::providers::http_client::ApiKey;
use crate::providers::llm::openai::{stream_chat, LlmEvent, OpenAiSettings};
use crate::providers::llm::ToolCall;
use crate::providers::tts::openai::{speech, OpenAiTtsSettings};
use crate::providers::tts::{TtsEngine, TtsJob};
use crate::shard::{Refusal, Shard};
use crate::tools::intents::Intents;
use crate::tools::mcp::McpSettings;
use crate::ws::handshake::{read_head_after, write_upgrade, HeadError, RequestHead};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

/// Text the reference sends before closing a connection without a device id.
const REF_MISSING_DEVICE_ID: &str = "端口正常，如需测试连接，请启动digital-human测试";
/// Text the reference sends before closing a connection that failed authentication.
const REF_AUTH_FAILED: &str = "认证失败";

/// A WebSocket upgrade request read and checked on the shard that accepted it (PROXY header,
/// forwarded address, key, per-address rate): everything admission and the session need, so a
/// full shard can hand it to another shard as is (`Send`: plain owned data).
pub struct Upgrade {
    /// The request head, with the bytes read past it.
    pub head: RequestHead,
    /// The device's address (from the PROXY header or trusted forwarded headers, else the peer).
    pub client: SocketAddr,
    /// `Sec-WebSocket-Key`.
    pub key: String,
}

/// Serves one accepted TCP connection on the WebSocket port until it closes.
pub async fn serve(mut stream: TcpStream, shard: Rc<Shard>) {
    let _ = stream.set_nodelay(true);
    let cfg = &shard.config.server;
    let peer = match stream.peer_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let read = async {
        let mut client = peer;
        let mut already = Vec::new();
        // Only a trusted balancer's PROXY header is read; anyone else is a direct client.
        let accept = cfg.proxy_protocol.accept();
        if let Some(accept) = accept.filter(|_| shard.trusted.contains(peer.ip())) {
            let (header, rest) = proxy::read_header(&mut stream, accept).await?;
            client = header.source.unwrap_or(peer);
            already = rest;
        }
        let head = read_head_after(&mut stream, cfg.max_request_head_bytes, already).await?;
        Ok((head, client))
    };
    let timeout = async {
        glommio::timer::sleep(Duration::from_millis(cfg.handshake_timeout_ms)).await;
        Err(HeadError::Malformed(
            "request head not received in time".into(),
        ))
    };
    let (head, mut client) = match futures_lite::future::or(read, timeout).await {
        Ok(h) => h,
        Err(e) => {
            {
                let mut stats = shard.stats.borrow_mut();
                stats.handshake_errors += 1;
                if matches!(e, HeadError::Proxy(_)) {
                    stats.proxy_header_errors += 1;
                    tracing::info!(%peer, error = %e, "trusted balancer sent no valid PROXY header");
                }
            }
            let status = match e {
                HeadError::TooLarge(_) => "431 Request Header Fields Too Large",
                HeadError::Malformed(_) | HeadError::Proxy(_) => "400 Bad Request",
                HeadError::Closed | HeadError::Io(_) => return,
            };
            let _ = write_plain(&mut stream, status, "", &format!("{e}\n")).await;
            return;
        }
    };
    let forwarded = shard.trusted.forwarded(
        cfg.forwarded_header,
        client.ip(),
        head.header("x-real-ip"),
        head.header_list("x-forwarded-for").as_deref(),
    );
    if let Some(ip) = forwarded {
        client = SocketAddr::new(ip, 0);
    }
    if !head.is_websocket_upgrade() {
        shard.stats.borrow_mut().plain_http += 1;
        let _ = match head.method.as_str() {
            "GET" | "HEAD" => write_plain(&mut stream, "200 OK", "", "Server is running\n").await,
            _ => {
                write_plain(
                    &mut stream,
                    "405 Method Not Allowed",
                    "Allow: GET\r\n",
                    "this port speaks WebSocket; use GET with Upgrade: websocket\n",
                )
                .await
            }
        };
        return;
    }
    let key = match (
        head.header("sec-websocket-key"),
        head.header("sec-websocket-version"),
    ) {
        (Some(k), Some("13")) => k.to_string(),
        _ => {
            shard.stats.borrow_mut().handshake_errors += 1;
            let _ = write_plain(
                &mut stream,
                "400 Bad Request",
                "Sec-WebSocket-Version: 13\r\n",
                "missing Sec-WebSocket-Key or unsupported Sec-WebSocket-Version (13 required)\n",
            )
            .await;
            return;
        }
    };
    if !shard.allow_connection_from(client.ip()) {
        tracing::info!(addr = %client.ip(), "connection rate limit: refused");
        let _ = write_plain(
            &mut stream,
            "429 Too Many Requests",
            "Retry-After: 1\r\n",
            &format!(
                "too many new connections from {}; retry later\n",
                client.ip()
            ),
        )
        .await;
        return;
    }
    let upgrade = Upgrade { head, client, key };
    admit_and_serve(stream, shard, upgrade, MayHandOff::Yes).await
}

/// Serves a connection a full shard handed to this one: admitted on this shard's budget, or
/// refused here (never handed on again, so a connection cannot bounce between full shards).
pub async fn adopt(fd: OwnedFd, upgrade: Upgrade, shard: Rc<Shard>) {
    tracing::debug!(addr = %upgrade.client.ip(), shard = shard.id, "adopting a connection");
    // SAFETY: `fd` is an owned descriptor of a connected TCP socket (the sending shard
    // duplicated its accepted stream's descriptor, then closes its own); ownership moves into
    // the stream, which closes it when dropped.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    admit_and_serve(stream, shard, upgrade, MayHandOff::No).await
}

/// Whether a full shard may hand the connection to another shard (only the accepting one may).
#[derive(Clone, Copy, PartialEq, Eq)]
enum MayHandOff {
    Yes,
    No,
}

/// Hands the connection under `stream` to a shard with room; true when a shard took it (then
/// the caller drops `stream`, closing only its own descriptor).
fn hand_off(stream: &TcpStream, shard: &Shard, upgrade: Upgrade) -> bool {
    // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
    let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let Ok(fd) = borrowed.try_clone_to_owned() else {
        return false;
    };
    match shard.hand_off(fd, upgrade) {
        Some(to) => {
            tracing::debug!(shard = shard.id, to, "shard full: handed a connection over");
            true
        }
        None => false,
    }
}

/// Admission and everything after it, on the accepting shard or the one it was handed to:
/// admit (or hand off, or refuse), upgrade, identify and authenticate, run the session.
async fn admit_and_serve(
    mut stream: TcpStream,
    shard: Rc<Shard>,
    upgrade: Upgrade,
    may_hand_off: MayHandOff,
) {
    let cfg = &shard.config.server;
    let local_ip = stream.local_addr().ok().map(|a| a.ip());
    let slot = match shard.admit() {
        Ok(slot) => slot,
        Err(Refusal::Full(max)) => {
            if may_hand_off == MayHandOff::Yes && hand_off(&stream, &shard, upgrade) {
                return;
            }
            shard.stats.borrow_mut().refused_full += 1;
            let _ = write_plain(
                &mut stream,
                "503 Service Unavailable",
                "Retry-After: 5\r\n",
                &format!(
                    "server full: this shard holds its maximum of {max} connections; retry later\n"
                ),
            )
            .await;
            return;
        }
        Err(Refusal::Draining) => {
            let _ = write_plain(
                &mut stream,
                "503 Service Unavailable",
                "Retry-After: 1\r\n",
                "server is shutting down; connect again (another instance will answer)\n",
            )
            .await;
            return;
        }
    };

    let Upgrade { head, client, key } = upgrade;
    if write_upgrade(&mut stream, &key).await.is_err() {
        return;
    }
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(cfg.read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(Some(cfg.max_message_bytes))
        .max_frame_size(Some(cfg.max_frame_bytes));
    let host = head.header("host").map(str::to_string);
    let RequestHead {
        headers,
        target,
        leftover,
        ..
    } = head;
    let mut ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(ws_config)).await;

    let identity = match identify(headers.iter().map(|(n, v)| (n, v.as_bytes())), &target) {
        Ok(id) => id,
        Err(e) => {
            shard.stats.borrow_mut().identity_errors += 1;
            refuse(&mut ws, REF_MISSING_DEVICE_ID, &e.to_string()).await;
            return;
        }
    };
    if let Some(signer) = &shard.signer {
        let auth = &cfg.auth;
        if !auth
            .allowed_devices
            .iter()
            .any(|d| d == &identity.device_id)
        {
            let client_id = identity.client_id.as_deref().unwrap_or(MISSING_CLIENT_ID);
            if let Err(e) = signer.verify(
                identity.authorization.as_deref(),
                client_id,
                &identity.device_id,
                crate::clock::unix_now(),
                auth.expire_seconds,
            ) {
                shard.stats.borrow_mut().auth_failures += 1;
                tracing::info!(device = %identity.device_id, error = %e, "authentication failed");
                refuse(
                    &mut ws,
                    REF_AUTH_FAILED,
                    &format!("authentication failed: {e}"),
                )
                .await;
                return;
            }
        }
    }

    let now = Instant::now();
    let inference = &shard.config.inference;
    let vision = vision_capability(&shard, &identity.device_id, host.as_deref(), local_ip);
    let session = Session::new(
        uuid::Uuid::new_v4().to_string(),
        slot.key(),
        identity,
        AudioParams {
            sample_rate: shard.config.audio_out.sample_rate,
            ..AudioParams::downlink_default()
        },
        SessionSettings {
            timers: SessionTimers {
                hello_timeout: Duration::from_millis(cfg.hello_timeout_ms),
                no_voice_close: Duration::from_secs(shard.config.session.no_voice_close_s),
                idle_close: Duration::from_secs(shard.config.session.idle_close_s),
            },
            answer_ping: shard.config.session.answer_ping,
            vad_events: shard.config.session.vad_events,
            segmenter: shard.config.vad.segmenter(),
            limits: AudioInLimits {
                max_wait: Duration::from_millis(inference.max_wait_ms),
                max_backlog_chunks: (shard.config.vad.max_utterance_ms / 32) as usize,
                max_chunks_per_job: inference.max_chunks_per_job,
            },
            dialogue: dialogue_settings(&shard.config),
            tools: tool_settings(&shard, vision),
        },
        now,
    );
    // The device's address as the balancer reported it (PROXY header or trusted forwarded
    // headers), else the TCP peer: what an operator greps for.
    tracing::info!(
        session = %session.id,
        device = %session.identity.device_id,
        addr = %client.ip(),
        shard = shard.id,
        "device connected"
    );
    let drain_deadline = shard.drain_deadline();
    let outcome = run(&mut ws, session, &slot.mailbox, &shard, drain_deadline).await;
    let mut stats = shard.stats.borrow_mut();
    match outcome.end {
        End::SlowConsumer => stats.slow_consumers += 1,
        End::Oversized => stats.oversized += 1,
        End::OversizedFrame => stats.oversized_frames += 1,
        End::ProtocolError => stats.protocol_errors += 1,
        End::HelloTimeout => stats.hello_timeouts += 1,
        End::Timeout => stats.idle_closes += 1,
        End::Normal => {}
    }
    stats.ended.add(&outcome.counters);
    drop(stats);
    drop(slot);
}

fn dialogue_settings(c: &Config) -> DialogueSettings {
    DialogueSettings {
        offline_llm: c.llm.provider == LlmProvider::Offline,
        system_prompt: c.llm.system_prompt.clone(),
        history_messages: c.llm.history_messages,
        out_rate: c.audio_out.sample_rate,
        complexity: c.audio_out.complexity,
        prebuffer_frames: c.audio_out.prebuffer_frames,
        stop_guard: Duration::from_millis(c.audio_out.stop_guard_ms),
        asr_timeout: Duration::from_millis(c.asr.timeout_ms),
        tts_timeout: Duration::from_millis(c.tts.timeout_ms),
        tz_offset_minutes: (c.server.timezone_offset_hours * 60.0).round() as i64,
        emotions: true,
        max_tool_rounds: c.tools.max_rounds,
        max_calls_per_round: c.tools.max_calls_per_round,
        max_tool_result_bytes: c.tools.max_result_bytes,
        intents: Intents::new(&c.tools.exit_phrases, &c.tools.wake_words),
    }
}

/// `capabilities.vision{url, token}` for this device's MCP initialize: with a vision provider,
/// our own endpoint (or `tools.vision_url`) and a token for this device; without one, an
/// external `tools.vision_url` with the configured token; else none.
fn vision_capability(
    shard: &Shard,
    device_id: &str,
    host: Option<&str>,
    local_ip: Option<std::net::IpAddr>,
) -> Option<(String, String)> {
    let t = &shard.config.tools;
    let v = &shard.config.vision;
    match &shard.vision_signer {
        Some(signer) if v.provider != VisionProvider::None => {
            let url = if t.vision_url.is_empty() {
                crate::http::vision::explain_url(host, local_ip, shard.http_port.get())
            } else {
                t.vision_url.clone()
            };
            let expires = crate::clock::unix_now().saturating_add(v.token_expire_seconds);
            Some((url, signer.sign_vision(device_id, expires)))
        }
        _ => (!t.vision_url.is_empty()).then(|| (t.vision_url.clone(), t.vision_token.clone())),
    }
}

fn tool_settings(shard: &Shard, vision: Option<(String, String)>) -> ToolSettings {
    let t = &shard.config.tools;
    ToolSettings {
        mcp: t.mcp.then(|| McpSettings {
            call_timeout: Duration::from_millis(t.call_timeout_ms),
            max_pending_calls: t.max_pending_calls,
            max_tools: t.max_tools,
            max_pages: t.max_list_pages,
            vision,
        }),
        iot: t.iot,
        server: shard.server_tools.clone(),
        base: shard.base_tools.clone(),
        max_tools: t.max_tools,
        wake_greeting: t.wake_greeting.clone(),
        wake_greeting_zh: t.wake_greeting_zh.clone(),
    }
}

/// Sends the reference's plain-text refusal, then a close frame with a clear English reason.
async fn refuse(ws: &mut WebSocketStream<TcpStream>, reference_text: &str, reason: &str) {
    let _ = ws.send(Message::text(reference_text)).await;
    let mut reason = reason.to_string();
    reason.truncate(120);
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: reason.into(),
        }))
        .await;
    // Wait briefly for the client's close reply so the close handshake completes.
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    futures_lite::future::or(drain, glommio::timer::sleep(Duration::from_secs(1))).await;
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Normal,
    SlowConsumer,
    Oversized,
    OversizedFrame,
    ProtocolError,
    HelloTimeout,
    Timeout,
}

struct Outcome {
    end: End,
    counters: super::SessionCounters,
}

enum Wake {
    Incoming(Option<Result<Message, tungstenite::Error>>),
    Event(Option<SessionEvent>),
    Timer,
}

/// The session loop: waits for input, runs the state machine, writes the output.
async fn run(
    ws: &mut WebSocketStream<TcpStream>,
    mut session: Session,
    mailbox: &Rc<shards::Mailbox<SessionEvent>>,
    shard: &Rc<Shard>,
    drain_at_start: Option<Instant>,
) -> Outcome {
    let llm_buffer = Rc::new(RefCell::new(LlmBuffer::default()));
    // Cancelling this task drops the LLM stream (and closes its connection); it is cancelled on
    // abort and whenever this function returns.
    let mut llm_task = LlmTask(None);
    let write_timeout = Duration::from_millis(shard.config.server.write_timeout_ms);
    let max_queue = shard.config.server.outbound_queue_messages;
    let mut out: Vec<Outgoing> = Vec::with_capacity(4);
    let mut end = End::Normal;
    if let Some(deadline) = drain_at_start {
        session.on_drain(deadline, Instant::now(), &mut out);
    }
    loop {
        if out.len() > max_queue {
            end = End::SlowConsumer;
            break;
        }
        let mut closing = None;
        for item in out.drain(..) {
            let msg = match item {
                Outgoing::Text(t) => Message::text(t),
                Outgoing::Binary(b) => Message::binary(b),
                Outgoing::Close { code, reason } => {
                    closing = Some((code, reason));
                    break;
                }
            };
            match send_within(ws, msg, write_timeout).await {
                SendResult::Sent => {}
                SendResult::TimedOut => {
                    end = End::SlowConsumer;
                    break;
                }
                SendResult::Failed => return finish(session, End::Normal),
            }
        }
        if end == End::SlowConsumer {
            tracing::info!(session = %session.id, "device stopped reading; disconnecting");
            break;
        }
        if let Some((code, reason)) = closing {
            end = match session.close_cause() {
                Some(CloseCause::HelloTimeout) => End::HelloTimeout,
                Some(CloseCause::IdleTimeout | CloseCause::NoVoice) => End::Timeout,
                _ => End::Normal,
            };
            close_gracefully(ws, code, reason, write_timeout).await;
            break;
        }

        let deadline = session.next_deadline();
        let wake = {
            let incoming = async { Wake::Incoming(ws.next().await) };
            let event = async { Wake::Event(mailbox.recv().await) };
            let timer = async {
                let now = Instant::now();
                if deadline > now {
                    glommio::timer::sleep(deadline - now).await;
                }
                Wake::Timer
            };
            futures_lite::future::or(incoming, futures_lite::future::or(event, timer)).await
        };
        let now = Instant::now();
        match wake {
            Wake::Incoming(Some(Ok(msg))) => match msg {
                Message::Text(t) => {
                    let (depth, cap) = shard.queues.vad.depth_for(session.key);
                    let watermark = shard.config.inference.busy_watermark;
                    session.set_inference_busy(depth as f64 > watermark * cap as f64);
                    session.on_text(t.as_str(), now, &mut out)
                }
                Message::Binary(b) => {
                    if let Some(payload) = session.on_binary(&b, now) {
                        session.on_audio(payload, now, &mut out);
                    }
                }
                Message::Close(_) => {
                    // tungstenite queues the close reply; keep polling until the stream ends.
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            },
            Wake::Incoming(Some(Err(e))) => {
                use tungstenite::error::CapacityError;
                use tungstenite::Error as E;
                let (code, reason, why) = match &e {
                    // tungstenite reports both limits alike; the limit tells which one it was.
                    E::Capacity(CapacityError::MessageTooLong { size, max_size })
                        if *max_size == shard.config.server.max_frame_bytes
                            && *max_size != shard.config.server.max_message_bytes =>
                    {
                        (
                            1009,
                            format!("frame too big: {size} bytes, limit {max_size}"),
                            End::OversizedFrame,
                        )
                    }
                    E::Capacity(CapacityError::MessageTooLong { size, max_size }) => (
                        1009,
                        format!("message too big: {size} bytes, limit {max_size}"),
                        End::Oversized,
                    ),
                    E::Capacity(c) => (1009, format!("message too big: {c}"), End::Oversized),
                    E::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ) => {
                        // The device vanished (power loss, Wi-Fi drop): not an error of ours.
                        return finish(session, End::Normal);
                    }
                    E::Protocol(p) => (1002, format!("protocol error: {p}"), End::ProtocolError),
                    E::Utf8(_) => (
                        1007,
                        "invalid UTF-8 in a text message".into(),
                        End::ProtocolError,
                    ),
                    _ => return finish(session, End::Normal),
                };
                tracing::info!(session = %session.id, error = %e, "closing on a bad frame");
                close_gracefully(ws, code, reason, write_timeout).await;
                end = why;
                break;
            }
            Wake::Incoming(None) => break,
            Wake::Event(Some(SessionEvent::Drain { deadline })) => {
                session.on_drain(deadline, now, &mut out)
            }
            Wake::Event(Some(SessionEvent::Vad(result))) => {
                session.on_vad_result(*result, now, &mut out)
            }
            Wake::Event(Some(SessionEvent::Asr { turn, result })) => {
                session.on_asr_result(turn, result, now, &mut out)
            }
            Wake::Event(Some(SessionEvent::Tts { turn, seq, result })) => {
                session.on_tts_result(turn, seq, result, now, &mut out)
            }
            Wake::Event(Some(SessionEvent::LlmReady { turn })) => {
                let (text, done) = {
                    let mut b = llm_buffer.borrow_mut();
                    b.notified = false;
                    if b.turn == turn {
                        (std::mem::take(&mut b.text), b.done.take())
                    } else {
                        (String::new(), None)
                    }
                };
                session.on_llm(turn, &text, done, now, &mut out);
            }
            Wake::Event(None) => break,
            Wake::Timer => session.on_timer(now, &mut out),
        }
        submit_vad(&mut session, shard, now);
        // Requests can produce output at once (a refused job); loop until none are left.
        loop {
            let requests = session.take_requests();
            if requests.is_empty() {
                break;
            }
            for req in requests {
                execute(
                    req,
                    &mut session,
                    shard,
                    mailbox,
                    &llm_buffer,
                    &mut llm_task.0,
                    now,
                    &mut out,
                );
            }
        }
        let samples = session.take_samples();
        if !samples.is_empty() {
            let mut h = shard.hist.borrow_mut();
            for (stage, v) in samples {
                h.record(stage, v);
            }
        }
    }
    finish(session, end)
}

/// Hands the session's next VAD job to its inference worker; a full queue gives it back.
fn submit_vad(session: &mut Session, shard: &Shard, now: Instant) {
    if let Some(job) = session.take_vad_job(now) {
        if let Err((_, job)) = shard.queues.vad.submit(session.key, shard.id, job) {
            session.vad_job_refused(job, now);
        }
    }
}

/// The running LLM stream task of a session; cancelled when dropped.
struct LlmTask(Option<glommio::task::JoinHandle<()>>);

impl Drop for LlmTask {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.cancel();
        }
    }
}

/// Where a session's LLM stream task leaves text for the session (coalesced: one pending
/// notification at a time, so a fast stream cannot flood the mailbox).
#[derive(Default)]
struct LlmBuffer {
    turn: u32,
    text: String,
    done: Option<Result<Vec<ToolCall>, String>>,
    notified: bool,
}

impl LlmBuffer {
    fn notify(&mut self, mailbox: &shards::Mailbox<SessionEvent>) {
        if !self.notified {
            self.notified = true;
            mailbox.push_control(SessionEvent::LlmReady { turn: self.turn });
        }
    }
}

/// Carries out one dialogue request: a job for an inference core or a remote call on this shard.
#[allow(clippy::too_many_arguments)]
fn execute(
    req: Request,
    session: &mut Session,
    shard: &Rc<Shard>,
    mailbox: &Rc<shards::Mailbox<SessionEvent>>,
    llm_buffer: &Rc<RefCell<LlmBuffer>>,
    llm_task: &mut Option<glommio::task::JoinHandle<()>>,
    now: Instant,
    out: &mut Vec<Outgoing>,
) {
    let key = session.key;
    match req {
        Request::Asr { turn, pcm } => match &shard.queues.asr {
            Some(pool) => {
                let job = AsrJob {
                    session: key,
                    turn,
                    pcm,
                    submitted: now,
                };
                if pool.submit(key, shard.id, job).is_err() {
                    session.on_asr_result(
                        turn,
                        Err("speech recognition queue is full".into()),
                        now,
                        out,
                    );
                }
            }
            None => {
                let (client, mb) = (shard.http.clone(), mailbox.clone());
                let settings = remote_asr_settings(&shard.config);
                glommio::spawn_local(async move {
                    let wav = wav_bytes(&pcm, 16_000);
                    let result = transcribe(&client, &settings, wav)
                        .await
                        .map_err(|e| e.to_string());
                    mb.push_control(SessionEvent::Asr { turn, result });
                })
                .detach();
            }
        },
        Request::Llm {
            turn,
            messages,
            tools,
        } => {
            {
                let mut b = llm_buffer.borrow_mut();
                *b = LlmBuffer {
                    turn,
                    ..LlmBuffer::default()
                };
            }
            let (client, mb, buf) = (shard.http.clone(), mailbox.clone(), llm_buffer.clone());
            let settings = remote_llm_settings(&shard.config);
            let task = glommio::spawn_local(async move {
                let result =
                    stream_chat(&client, &settings, &messages, tools.as_deref(), |event| {
                        if let LlmEvent::Text(t) = event {
                            let mut b = buf.borrow_mut();
                            b.text.push_str(&t);
                            b.notify(&mb);
                        }
                    })
                    .await;
                let mut b = buf.borrow_mut();
                b.done = Some(result.map(|s| s.tool_calls).map_err(|e| e.to_string()));
                b.notify(&mb);
            });
            *llm_task = Some(task.detach());
        }
        Request::CancelLlm => {
            if let Some(task) = llm_task.take() {
                task.cancel();
            }
        }
        Request::Tts { turn, seq, text } => {
            let cfg = &shard.config.tts;
            match &shard.queues.tts {
                Some(pool) => {
                    let engine = if cfg.provider == TtsProvider::Kokoro {
                        let voice = if has_cjk(&text) {
                            &cfg.kokoro.voice_zh
                        } else {
                            &cfg.kokoro.voice_en
                        };
                        TtsEngine::Kokoro {
                            voice: voice.clone(),
                        }
                    } else if has_cjk(&text) {
                        TtsEngine::Espeak {
                            voice: cfg.espeak_voice_zh.clone(),
                        }
                    } else if cfg.provider == TtsProvider::Piper {
                        TtsEngine::Piper
                    } else {
                        TtsEngine::Espeak {
                            voice: cfg.espeak_voice.clone(),
                        }
                    };
                    let job = TtsJob {
                        session: key,
                        turn,
                        seq,
                        text,
                        engine,
                        submitted: now,
                    };
                    if pool.submit(key, shard.id, job).is_err() {
                        session.on_tts_result(
                            turn,
                            seq,
                            Err("speech synthesis queue is full".into()),
                            now,
                            out,
                        );
                    }
                }
                None => {
                    let (client, mb) = (shard.http.clone(), mailbox.clone());
                    let settings = remote_tts_settings(&shard.config);
                    glommio::spawn_local(async move {
                        let result = speech(&client, &settings, &text)
                            .await
                            .map_err(|e| e.to_string());
                        mb.push_control(SessionEvent::Tts { turn, seq, result });
                    })
                    .detach();
                }
            }
        }
    }
}

fn has_cjk(text: &str) -> bool {
    text.chars()
        .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c) || ('\u{3400}'..='\u{4dbf}').contains(&c))
}

fn remote_asr_settings(c: &Config) -> OpenAiAsrSettings {
    OpenAiAsrSettings {
        base_url: c.asr.openai.base_url.clone(),
        api_key: ApiKey::from_env_or("XIAOZHI_ASR_API_KEY", &c.asr.openai.api_key),
        model: c.asr.openai.model.clone(),
        language: (!c.asr.openai.language.is_empty()).then(|| c.asr.openai.language.clone()),
        timeout: Duration::from_millis(c.asr.timeout_ms),
    }
}

fn remote_llm_settings(c: &Config) -> OpenAiSettings {
    let o = &c.llm.openai;
    OpenAiSettings {
        base_url: o.base_url.clone(),
        api_key: ApiKey::from_env_or("XIAOZHI_LLM_API_KEY", &o.api_key),
        model: o.model.clone(),
        temperature: (o.temperature >= 0.0).then_some(o.temperature),
        max_tokens: (o.max_tokens > 0).then_some(o.max_tokens),
        connect_timeout: Duration::from_millis(o.connect_timeout_ms),
        first_token_timeout: Duration::from_millis(o.first_token_timeout_ms),
        total_timeout: Duration::from_millis(o.total_timeout_ms),
    }
}

fn remote_tts_settings(c: &Config) -> OpenAiTtsSettings {
    let o = &c.tts.openai;
    OpenAiTtsSettings {
        base_url: o.base_url.clone(),
        api_key: ApiKey::from_env_or("XIAOZHI_TTS_API_KEY", &o.api_key),
        model: o.model.clone(),
        voice: o.voice.clone(),
        response_format: o.response_format.clone(),
        sample_rate_for_pcm: o.sample_rate,
        timeout: Duration::from_millis(c.tts.timeout_ms),
    }
}

fn finish(session: Session, end: End) -> Outcome {
    tracing::debug!(session = %session.id, ?end, "session ended");
    Outcome {
        end,
        counters: session.counters(),
    }
}

enum SendResult {
    Sent,
    TimedOut,
    Failed,
}

async fn send_within(
    ws: &mut WebSocketStream<TcpStream>,
    msg: Message,
    limit: Duration,
) -> SendResult {
    let send = async {
        match ws.send(msg).await {
            Ok(()) => SendResult::Sent,
            Err(_) => SendResult::Failed,
        }
    };
    let timeout = async {
        glommio::timer::sleep(limit).await;
        SendResult::TimedOut
    };
    futures_lite::future::or(send, timeout).await
}

/// Sends a close frame and waits (bounded) for the peer's close reply.
async fn close_gracefully(
    ws: &mut WebSocketStream<TcpStream>,
    code: u16,
    reason: String,
    limit: Duration,
) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let close = async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    };
    futures_lite::future::or(
        close,
        glommio::timer::sleep(limit.min(Duration::from_secs(2))),
    )
    .await;
}
