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

use super::{CloseCause, Outgoing, Session, SessionEvent, SessionSettings, SessionTimers};
use crate::pipeline::audio_in::AudioInLimits;
use crate::protocol::token::MISSING_CLIENT_ID;
use crate::protocol::{identify, AudioParams};
use crate::shard::{Refusal, Shard};
use crate::ws::handshake::{read_head, write_plain, write_upgrade, HeadError, RequestHead};

/// Text the reference sends before closing a connection without a device id.
const REF_MISSING_DEVICE_ID: &str = "端口正常，如需测试连接，请启动digital-human测试";
/// Text the reference sends before closing a connection that failed authentication.
const REF_AUTH_FAILED: &str = "认证失败";

/// Serves one accepted TCP connection on the WebSocket port until it closes.
pub async fn serve(mut stream: TcpStream, shard: Rc<Shard>) {
    let _ = stream.set_nodelay(true);
    let cfg = &shard.config.server;
    let head = {
        let read = read_head(&mut stream, cfg.max_request_head_bytes);
        let timeout = async {
            glommio::timer::sleep(Duration::from_millis(cfg.handshake_timeout_ms)).await;
            Err(HeadError::Malformed(
                "request head not received in time".into(),
            ))
        };
        futures_lite::future::or(read, timeout).await
    };
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            shard.stats.borrow_mut().handshake_errors += 1;
            let status = match e {
                HeadError::TooLarge(_) => "431 Request Header Fields Too Large",
                HeadError::Malformed(_) => "400 Bad Request",
                HeadError::Closed | HeadError::Io(_) => return,
            };
            let _ = write_plain(&mut stream, status, "", &format!("{e}\n")).await;
            return;
        }
    };
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
    let slot = match shard.admit() {
        Ok(slot) => slot,
        Err(Refusal::Full(max)) => {
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

    if write_upgrade(&mut stream, &key).await.is_err() {
        return;
    }
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(cfg.read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(Some(cfg.max_message_bytes))
        .max_frame_size(Some(cfg.max_message_bytes));
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
    let session = Session::new(
        uuid::Uuid::new_v4().to_string(),
        slot.key(),
        identity,
        AudioParams::downlink_default(),
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
        },
        now,
    );
    tracing::debug!(session = %session.id, device = %session.identity.device_id, "connected");
    let drain_deadline = shard.drain_deadline();
    let outcome = run(&mut ws, session, &slot.mailbox, &shard, drain_deadline).await;
    let mut stats = shard.stats.borrow_mut();
    match outcome.end {
        End::SlowConsumer => stats.slow_consumers += 1,
        End::Oversized => stats.oversized += 1,
        End::ProtocolError => stats.protocol_errors += 1,
        End::HelloTimeout => stats.hello_timeouts += 1,
        End::Timeout => stats.idle_closes += 1,
        End::Normal => {}
    }
    stats.ended.add(&outcome.counters);
    drop(stats);
    drop(slot);
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
    mailbox: &shards::Mailbox<SessionEvent>,
    shard: &Shard,
    drain_at_start: Option<Instant>,
) -> Outcome {
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
                    let (depth, cap) = shard.vad.depth_for(session.key);
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
            Wake::Event(None) => break,
            Wake::Timer => session.on_timer(now, &mut out),
        }
        submit_vad(&mut session, shard, now);
    }
    finish(session, end)
}

/// Hands the session's next VAD job to its inference worker; a full queue gives it back.
fn submit_vad(session: &mut Session, shard: &Shard, now: Instant) {
    if let Some(job) = session.take_vad_job(now) {
        if let Err((_, job)) = shard.vad.submit(session.key, shard.id, job) {
            session.vad_job_refused(job, now);
        }
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
