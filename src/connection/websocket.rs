//! The WebSocket driver: one task per device that waits on the socket, the session's mailbox
//! and its next timer, gives each event to the [`Session`], hands what it asks for to the
//! [`Runner`], and writes what is left for the device with a write timeout (a device that stops
//! reading is disconnected). Audio is framed here with the session's binary protocol.

use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use futures_lite::StreamExt;
use glommio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

use super::effects::Runner;
use super::{ConnectionContext, End, Outcome};
use crate::session::{CloseCause, Effects, Outgoing, Session, SessionEvent};

enum Wake {
    Incoming(Option<Result<Message, tungstenite::Error>>),
    Event(Option<SessionEvent>),
    Timer,
}

/// Runs `session` over `ws` until it closes.
pub async fn drive(
    ws: &mut WebSocketStream<TcpStream>,
    mut session: Session,
    mailbox: &Rc<shards::Mailbox<SessionEvent>>,
    ctx: &ConnectionContext,
    drain_at_start: Option<Instant>,
) -> Outcome {
    let server = &ctx.settings.server;
    // Dropping the runner cancels the LLM stream, the remote calls and the session's queued
    // inference jobs: whenever this function returns.
    let mut runner = Runner::new(
        ctx.shard,
        session.key,
        ctx.providers.clone(),
        mailbox.clone(),
    );
    let write_timeout = Duration::from_millis(server.write_timeout_ms);
    let max_queue = server.outbound_queue_messages;
    let mut pending = Effects::default();
    if let Some(deadline) = drain_at_start {
        pending = session.on_drain(deadline, Instant::now());
    }
    loop {
        let fx = runner.settle(&mut session, std::mem::take(&mut pending), Instant::now());
        if !fx.samples.is_empty() {
            ctx.host.record(&fx.samples);
        }
        if fx.send.len() > max_queue {
            tracing::info!(session = %session.id, "device stopped reading; disconnecting");
            return Outcome::of(&session, End::SlowConsumer);
        }
        for item in fx.send {
            let msg = match item {
                Outgoing::Text(t) => Message::text(t),
                Outgoing::Audio { opus, timestamp_ms } => {
                    let mut framed = Vec::with_capacity(opus.len() + 16);
                    if session
                        .protocol()
                        .encode_into(&opus, timestamp_ms, &mut framed)
                        .is_err()
                    {
                        continue;
                    }
                    Message::binary(framed)
                }
                Outgoing::Close { code, reason } => {
                    let end = match session.close_cause() {
                        Some(CloseCause::HelloTimeout) => End::HelloTimeout,
                        Some(CloseCause::IdleTimeout | CloseCause::NoVoice) => End::Timeout,
                        _ => End::Normal,
                    };
                    close_gracefully(ws, code, reason, write_timeout).await;
                    return Outcome::of(&session, end);
                }
            };
            match send_within(ws, msg, write_timeout).await {
                SendResult::Sent => {}
                SendResult::TimedOut => {
                    tracing::info!(session = %session.id, "device stopped reading; disconnecting");
                    return Outcome::of(&session, End::SlowConsumer);
                }
                SendResult::Failed => return Outcome::of(&session, End::Normal),
            }
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
        pending = match wake {
            Wake::Incoming(Some(Ok(msg))) => match msg {
                Message::Text(t) => {
                    let (depth, cap) = ctx.providers.vad.depth_for(session.key);
                    session.set_inference_busy(
                        depth as f64 > ctx.settings.busy_watermark * cap as f64,
                    );
                    session.on_text(t.as_str(), now)
                }
                Message::Binary(b) => session.on_binary(&b, now),
                // tungstenite queues the close reply; keep polling until the stream ends.
                Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                    Effects::default()
                }
            },
            Wake::Incoming(Some(Err(e))) => {
                let Some((code, reason, end)) = bad_frame(&e, ctx) else {
                    return Outcome::of(&session, End::Normal);
                };
                tracing::info!(session = %session.id, error = %e, "closing on a bad frame");
                close_gracefully(ws, code, reason, write_timeout).await;
                return Outcome::of(&session, end);
            }
            Wake::Incoming(None) | Wake::Event(None) => return Outcome::of(&session, End::Normal),
            Wake::Event(Some(event)) => runner.on_event(&mut session, event, now),
            Wake::Timer => session.on_timer(now),
        };
    }
}

/// The close code, reason and outcome for a bad incoming frame; `None` when the device simply
/// vanished or the error is not the device's (then the session ends without a close frame).
fn bad_frame(e: &tungstenite::Error, ctx: &ConnectionContext) -> Option<(u16, String, End)> {
    use tungstenite::error::CapacityError;
    use tungstenite::Error as E;
    let server = &ctx.settings.server;
    Some(match e {
        // tungstenite reports both limits alike; the limit tells which one it was.
        E::Capacity(CapacityError::MessageTooLong { size, max_size })
            if *max_size == server.max_frame_bytes && *max_size != server.max_message_bytes =>
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
        // The device vanished (power loss, Wi-Fi drop): not an error of ours.
        E::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {
            return None
        }
        E::Protocol(p) => (1002, format!("protocol error: {p}"), End::ProtocolError),
        E::Utf8(_) => (
            1007,
            "invalid UTF-8 in a text message".into(),
            End::ProtocolError,
        ),
        _ => return None,
    })
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
pub(super) async fn close_gracefully(
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
