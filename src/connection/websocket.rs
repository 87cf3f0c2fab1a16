//! The WebSocket driver: a [`Link`] over one device's WebSocket for the shared
//! [`driver`](super::driver) loop. Text frames go to the session as messages, binary frames as
//! audio in the session's binary protocol; the session's audio is framed with that protocol on
//! the way out, and its close becomes a close frame.

use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use futures_lite::StreamExt;
use futures_util::SinkExt;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

use super::driver::{self, Handled, Link};
use super::stream::DeviceStream;
use super::{ConnectionContext, End, Outcome};
use crate::metrics::Transport;
use crate::session::{Effects, Outgoing, Session, SessionEvent};

/// Runs `session` over `ws` until it closes.
pub async fn drive(
    ws: &mut WebSocketStream<DeviceStream>,
    mut session: Session,
    mailbox: &Rc<shards::Mailbox<SessionEvent>>,
    ctx: &ConnectionContext,
    drain_at_start: Option<Instant>,
) -> Outcome {
    let pending = match drain_at_start {
        Some(deadline) => session.on_drain(deadline, Instant::now()),
        None => Effects::default(),
    };
    driver::drive(&mut WsLink { ws }, session, mailbox, ctx, pending).await
}

/// A device's WebSocket as the driver sees it.
struct WsLink<'a> {
    ws: &'a mut WebSocketStream<DeviceStream>,
}

impl Link for WsLink<'_> {
    type Input = Option<Result<Message, tungstenite::Error>>;

    fn transport(&self, session: &Session) -> Transport {
        if session.identity.from_mqtt_gateway {
            Transport::Gateway
        } else {
            Transport::WebSocket
        }
    }

    fn weight(input: &Self::Input) -> usize {
        match input {
            Some(Ok(m)) => m.len(),
            _ => 0,
        }
    }

    async fn next(&mut self) -> Self::Input {
        self.ws.next().await
    }

    fn handle(
        &mut self,
        input: Self::Input,
        session: &mut Session,
        ctx: &ConnectionContext,
        now: Instant,
    ) -> Handled {
        match input {
            Some(Ok(Message::Text(t))) => {
                Handled::Effects(driver::text_in(session, ctx, t.as_str(), now))
            }
            Some(Ok(Message::Binary(b))) => Handled::Effects(session.on_binary(&b, now)),
            // tungstenite queues the close reply; keep polling until the stream ends.
            Some(Ok(
                Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_),
            )) => Handled::Effects(Effects::default()),
            Some(Err(e)) => match bad_frame(&e, ctx) {
                Some((code, reason, end)) => Handled::Close { code, reason, end },
                None => Handled::Gone(End::Normal),
            },
            None => Handled::Gone(End::Normal),
        }
    }

    async fn send(&mut self, item: Outgoing, session: &Session) -> Result<(), ()> {
        let msg = match item {
            Outgoing::Text(t) => Message::text(t),
            Outgoing::Audio { opus, timestamp_ms } => {
                let mut framed = Vec::with_capacity(opus.len() + 16);
                if session
                    .protocol()
                    .encode_into(&opus, timestamp_ms, &mut framed)
                    .is_err()
                {
                    return Ok(());
                }
                Message::binary(framed)
            }
            Outgoing::Close { .. } => return Ok(()),
        };
        // Queued, not flushed: the driver flushes once after the whole batch of effects, so
        // what one wake-up produces leaves in one write (tungstenite buffers up to its write
        // buffer size and writes through when it is full).
        self.ws.feed(msg).await.map_err(|_| ())
    }

    async fn flush(&mut self) -> Result<(), ()> {
        // Also writes what tungstenite queued itself (pongs, the close reply).
        SinkExt::flush(self.ws).await.map_err(|_| ())
    }

    async fn close(&mut self, code: u16, reason: String, limit: Duration) {
        close_gracefully(self.ws, code, reason, limit).await;
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

/// Sends a close frame and waits (bounded) for the peer's close reply.
pub(super) async fn close_gracefully(
    ws: &mut WebSocketStream<DeviceStream>,
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
