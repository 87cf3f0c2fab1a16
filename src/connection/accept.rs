//! Accepting a device on the WebSocket port: the request head (after a PROXY header from a
//! trusted balancer), the device's real address, plain HTTP answers, the per-address rate,
//! admission or a hand-off to a shard with room, the upgrade, identity and authentication,
//! then the [`Session`](crate::session::Session) and its driver.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use futures_lite::StreamExt;
use glommio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::Message;

use super::handshake::{read_head_after, write_upgrade, HeadError, RequestHead};
use super::settings::LetIn;
use super::stream::DeviceStream;
use super::{websocket, ConnectionContext, Count, Refusal};
use crate::front_door::{proxy, write_plain};
use crate::protocol::identify;

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
pub async fn serve(mut stream: TcpStream, ctx: ConnectionContext) {
    let _ = stream.set_nodelay(true);
    let cfg = &ctx.settings.server;
    let trusted = &ctx.settings.trusted;
    let peer = match stream.peer_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let read = async {
        let mut client = peer;
        let mut already = Vec::new();
        // Only a trusted balancer's PROXY header is read; anyone else is a direct client.
        let accept = cfg.proxy_protocol.accept();
        if let Some(accept) = accept.filter(|_| trusted.contains(peer.ip())) {
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
            ctx.host.count(Count::HandshakeError);
            if matches!(e, HeadError::Proxy(_)) {
                ctx.host.count(Count::ProxyHeaderError);
                tracing::info!(%peer, error = %e, "trusted balancer sent no valid PROXY header");
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
    let forwarded = trusted.forwarded(
        cfg.forwarded_header,
        client.ip(),
        head.header("x-real-ip"),
        head.header_list("x-forwarded-for").as_deref(),
    );
    if let Some(ip) = forwarded {
        client = SocketAddr::new(ip, 0);
    }
    if !head.is_websocket_upgrade() {
        ctx.host.count(Count::PlainHttp);
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
            ctx.host.count(Count::HandshakeError);
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
    if !ctx.host.allow_connection_from(client.ip()) {
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
    admit_and_serve(stream, ctx, upgrade, MayHandOff::Yes).await
}

/// Serves a connection a full shard handed to this one: admitted on this shard's budget, or
/// refused here (never handed on again, so a connection cannot bounce between full shards).
pub async fn adopt(fd: OwnedFd, upgrade: Upgrade, ctx: ConnectionContext) {
    tracing::debug!(addr = %upgrade.client.ip(), shard = ctx.shard, "adopting a connection");
    // SAFETY: `fd` is an owned descriptor of a connected TCP socket (the sending shard
    // duplicated its accepted stream's descriptor, then closes its own); ownership moves into
    // the stream, which closes it when dropped.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    admit_and_serve(stream, ctx, upgrade, MayHandOff::No).await
}

/// Whether a full shard may hand the connection to another shard (only the accepting one may).
#[derive(Clone, Copy, PartialEq, Eq)]
enum MayHandOff {
    Yes,
    No,
}

/// Hands the connection under `stream` to a shard with room; true when a shard took it (then
/// the caller drops `stream`, closing only its own descriptor).
fn hand_off(stream: &TcpStream, ctx: &ConnectionContext, upgrade: Upgrade) -> bool {
    let Ok(fd) = super::stream::duplicate(stream) else {
        return false;
    };
    ctx.host.hand_off(fd, upgrade)
}

/// Admission and everything after it, on the accepting shard or the one it was handed to:
/// admit (or hand off, or refuse), upgrade, identify and authenticate, run the session.
async fn admit_and_serve(
    mut stream: TcpStream,
    ctx: ConnectionContext,
    upgrade: Upgrade,
    may_hand_off: MayHandOff,
) {
    let settings = ctx.settings.clone();
    let cfg = &settings.server;
    let local_ip = stream.local_addr().ok().map(|a| a.ip());
    let admission = match ctx.host.admit() {
        Ok(a) => a,
        Err(Refusal::Full(max)) => {
            if may_hand_off == MayHandOff::Yes && hand_off(&stream, &ctx, upgrade) {
                return;
            }
            ctx.host.count(Count::RefusedFull);
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
    let stream = match DeviceStream::new(stream, ctx.sweep.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot add the connection to the socket sweep");
            return;
        }
    };
    let mut ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(ws_config)).await;

    let identity = match identify(headers.iter().map(|(n, v)| (n, v.as_bytes())), &target) {
        Ok(id) => id,
        Err(e) => {
            ctx.host.count(Count::IdentityError);
            refuse(&mut ws, REF_MISSING_DEVICE_ID, &e.to_string()).await;
            return;
        }
    };
    // Off: every session counts as authenticated (the reference). On: only a verified token
    // does, and only such a session gets a vision token.
    let mut authenticated = true;
    if let Some(auth) = &settings.auth {
        match auth.check(&identity) {
            Ok(how) => authenticated = how == LetIn::Token,
            Err(e) => {
                ctx.host.count(Count::AuthFailure);
                // Device-controlled text is logged escaped (Debug), so it cannot forge a log line.
                tracing::info!(device = ?identity.device_id, error = %e, "authentication failed");
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

    let session = settings.new_session(
        admission.key,
        identity,
        host.as_deref(),
        local_ip,
        authenticated,
    );
    // The device's address as the balancer reported it (PROXY header or trusted forwarded
    // headers), else the TCP peer: what an operator greps for.
    tracing::info!(
        session = %session.id,
        device = ?session.identity.device_id,
        addr = %client.ip(),
        shard = ctx.shard,
        "device connected"
    );
    let drain_deadline = ctx.host.drain_deadline();
    let outcome =
        websocket::drive(&mut ws, session, &admission.mailbox, &ctx, drain_deadline).await;
    ctx.host.ended(&outcome);
    drop(admission);
}

/// Sends the reference's plain-text refusal, then a close frame with a clear English reason.
async fn refuse(ws: &mut WebSocketStream<DeviceStream>, reference_text: &str, reason: &str) {
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
