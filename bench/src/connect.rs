//! Opening a device's audio channel: who the device is, the WebSocket upgrade request (identity
//! in headers as the firmware sends it, or in the query string as browsers must), and the hello
//! exchange with the firmware's 10 s limit (spec §2–3).

use std::future::Future;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use futures_lite::StreamExt;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Request;
use tungstenite::Message;
use xiaozhi_protocol::BinaryProtocol;

use crate::inbound::{parse_server_text, ServerEvent};
use crate::ota::split_url;
use crate::outcome::ErrorKind;
use crate::schedule::mix;

/// The device's WebSocket.
pub type Ws = WebSocketStream<glommio::net::TcpStream>;

/// How long the firmware waits for the server's hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `fut` for at most `limit`; `None` if the time ran out first.
pub async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(limit).await;
        None
    })
    .await
}

/// One simulated device's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceId {
    /// Index in the fleet (after `--first-device`).
    pub index: u32,
    /// Locally administered MAC, `02:00:xx:xx:xx:xx`, lower case as the firmware sends it.
    pub mac: String,
    /// Board UUID, derived from the seed and index.
    pub client_id: String,
}

impl DeviceId {
    /// Device `index`: a distinct MAC per index, a client id per (seed, index).
    pub fn new(index: u32, seed: u64) -> DeviceId {
        let b = index.to_be_bytes();
        let hi = mix(seed ^ (u64::from(index) << 1));
        let lo = mix(hi ^ 0x5851_F42D_4C95_7F2D);
        // RFC 4122 variant-1, version-4 layout.
        let hi = (hi & !0xF000) | 0x4000;
        let lo = (lo & !(0xC << 60)) | (0x8 << 60);
        DeviceId {
            index,
            mac: format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]),
            client_id: format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                hi >> 32,
                (hi >> 16) & 0xFFFF,
                hi & 0xFFFF,
                lo >> 48,
                lo & 0xFFFF_FFFF_FFFF
            ),
        }
    }
}

/// Where the device puts its identity on the upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// `Device-Id`, `Client-Id`, `Protocol-Version`, `Authorization` headers (firmware).
    Headers,
    /// `device-id`, `client-id`, `authorization` query parameters (browsers); the protocol
    /// version then travels only in the hello.
    Query,
}

/// Builds the upgrade request for `url`.
pub fn upgrade_request(
    url: &str,
    id: &DeviceId,
    mode: IdentityMode,
    protocol: BinaryProtocol,
    token: Option<&str>,
) -> Result<Request, String> {
    // The firmware prefixes `Bearer ` unless the token already contains a space.
    let authorization = token.map(|t| {
        if t.contains(' ') {
            t.to_owned()
        } else {
            format!("Bearer {t}")
        }
    });
    let url = match mode {
        IdentityMode::Headers => url.to_owned(),
        IdentityMode::Query => {
            let mut q = format!(
                "device-id={}&client-id={}",
                percent_encode(&id.mac),
                percent_encode(&id.client_id)
            );
            if let Some(a) = &authorization {
                q.push_str("&authorization=");
                q.push_str(&percent_encode(a));
            }
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}{q}")
        }
    };
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if mode == IdentityMode::Headers {
        let h = req.headers_mut();
        let value = |s: &str| s.parse().map_err(|_| format!("bad header value {s:?}"));
        h.insert("Device-Id", value(&id.mac)?);
        h.insert("Client-Id", value(&id.client_id)?);
        h.insert("Protocol-Version", value(&protocol.version().to_string())?);
        if let Some(a) = &authorization {
            h.insert("Authorization", value(a)?);
        }
    }
    Ok(req)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The device's hello, as the firmware sends it (spec §3.1).
pub fn hello_text(protocol: BinaryProtocol) -> String {
    serde_json::json!({
        "type": "hello",
        "version": protocol.version(),
        "features": {"mcp": true},
        "transport": "websocket",
        "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60},
    })
    .to_string()
}

/// An open audio channel after a successful hello.
pub struct Channel {
    /// The socket.
    pub ws: Ws,
    /// `session_id` from the server's hello.
    pub session_id: String,
    /// Downlink sample rate the server announced.
    pub sample_rate: u32,
    /// Downlink frame duration the server announced, ms.
    pub frame_ms: u32,
}

/// Milestones of a connect, for `probe`'s timeline.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectTimes {
    /// TCP connected.
    pub tcp: Option<Instant>,
    /// 101 Switching Protocols received.
    pub upgraded: Option<Instant>,
    /// Hello reply received.
    pub hello: Option<Instant>,
}

/// Connects, upgrades, sends hello and waits for the server's hello.
pub async fn open(
    url: &str,
    id: &DeviceId,
    mode: IdentityMode,
    protocol: BinaryProtocol,
    token: Option<&str>,
    times: &mut ConnectTimes,
) -> Result<Channel, (ErrorKind, String)> {
    let failed = |e: String| (ErrorKind::ConnectFailed, e);
    let u = split_url(url, "ws").map_err(failed)?;
    let req = upgrade_request(url, id, mode, protocol, token).map_err(failed)?;
    let stream = within(
        HELLO_TIMEOUT,
        glommio::net::TcpStream::connect((u.host.as_str(), u.port)),
    )
    .await
    .ok_or_else(|| failed("tcp connect timed out".into()))?
    .map_err(|e| failed(format!("tcp connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    times.tcp = Some(Instant::now());
    let (mut ws, _) = within(HELLO_TIMEOUT, async_tungstenite::client_async(req, stream))
        .await
        .ok_or_else(|| failed("websocket upgrade timed out".into()))?
        .map_err(|e| match e {
            tungstenite::Error::Http(resp) if resp.status().as_u16() == 503 => {
                (ErrorKind::Refused, "upgrade refused: 503".to_owned())
            }
            e => failed(format!("websocket upgrade: {e}")),
        })?;
    times.upgraded = Some(Instant::now());
    // Until the server's hello, a closed connection is a failed connect (e.g. a token the
    // server rejects), not a disconnect.
    ws.send(Message::text(hello_text(protocol)))
        .await
        .map_err(|e| failed(format!("send hello: {e}")))?;
    let hello = within(HELLO_TIMEOUT, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(t)) => {
                    if let Some(ServerEvent::Hello {
                        session_id,
                        transport,
                        sample_rate,
                        frame_ms,
                    }) = parse_server_text(t.as_str())
                    {
                        if transport == "websocket" {
                            return Ok((session_id, sample_rate, frame_ms));
                        }
                    }
                }
                Ok(Message::Close(frame)) => {
                    return Err(match close_kind(frame.as_ref()) {
                        (ErrorKind::Refused, why) => (ErrorKind::Refused, why),
                        (_, why) => failed(format!("before hello: {why}")),
                    })
                }
                Ok(_) => {}
                Err(e) => return Err(failed(format!("before hello: {e}"))),
            }
        }
        Err(failed("closed before hello".to_owned()))
    })
    .await
    .ok_or_else(|| (ErrorKind::NoHello, "no hello within 10 s".to_owned()))??;
    times.hello = Some(Instant::now());
    Ok(Channel {
        ws,
        session_id: hello.0,
        sample_rate: hello.1,
        frame_ms: hello.2,
    })
}

/// The error kind for a close frame: 1013 (try again later) is a refusal; 1000 (normal) and
/// 1001 (going away) are a clean close by the server.
pub fn close_kind(frame: Option<&tungstenite::protocol::CloseFrame>) -> (ErrorKind, String) {
    match frame {
        Some(f) if u16::from(f.code) == 1013 => {
            (ErrorKind::Refused, format!("closed 1013: {}", f.reason))
        }
        Some(f) if matches!(u16::from(f.code), 1000 | 1001) => (
            ErrorKind::ServerClosed,
            format!("closed {}: {}", u16::from(f.code), f.reason),
        ),
        Some(f) => (
            ErrorKind::Disconnected,
            format!("closed {}: {}", u16::from(f.code), f.reason),
        ),
        None => (ErrorKind::Disconnected, "closed".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xiaozhi_protocol::{identify, parse_client_message, ClientMessage};

    fn headers_and_target(req: &Request) -> (Vec<(String, Vec<u8>)>, String) {
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let target = req
            .uri()
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        (headers, target)
    }

    #[test]
    fn device_ids_are_distinct_macs_and_uuid_shaped_client_ids() {
        let a = DeviceId::new(0, 1);
        let b = DeviceId::new(258, 1);
        assert_eq!(a.mac, "02:00:00:00:00:00");
        assert_eq!(b.mac, "02:00:00:00:01:02");
        assert_ne!(a.client_id, b.client_id);
        assert_ne!(a.client_id, DeviceId::new(0, 2).client_id, "seeded");
        assert_eq!(a.client_id, DeviceId::new(0, 1).client_id, "deterministic");
        let parts: Vec<_> = a.client_id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
        assert_eq!(&a.client_id[14..15], "4");
    }

    #[test]
    fn header_identity_is_what_the_server_reads() {
        let id = DeviceId::new(7, 3);
        let req = upgrade_request(
            "ws://127.0.0.1:8000/xiaozhi/v1/",
            &id,
            IdentityMode::Headers,
            BinaryProtocol::V3,
            Some("sig.123"),
        )
        .unwrap();
        let (headers, target) = headers_and_target(&req);
        let who = identify(headers, &target).unwrap();
        assert_eq!(who.device_id, id.mac);
        assert_eq!(who.client_id.as_deref(), Some(id.client_id.as_str()));
        assert_eq!(who.authorization.as_deref(), Some("Bearer sig.123"));
        assert_eq!(who.protocol_version, Some(3));
    }

    #[test]
    fn query_identity_is_what_the_server_reads() {
        let id = DeviceId::new(9, 3);
        let req = upgrade_request(
            "ws://127.0.0.1:8000/xiaozhi/v1/?x=1",
            &id,
            IdentityMode::Query,
            BinaryProtocol::V2,
            Some("sig.123"),
        )
        .unwrap();
        assert!(req.headers().get("device-id").is_none());
        let (headers, target) = headers_and_target(&req);
        assert!(
            target.starts_with("/xiaozhi/v1/?x=1&device-id="),
            "{target}"
        );
        let who = identify(headers, &target).unwrap();
        assert_eq!(who.device_id, id.mac);
        assert_eq!(who.client_id.as_deref(), Some(id.client_id.as_str()));
        assert_eq!(who.authorization.as_deref(), Some("Bearer sig.123"));
        assert_eq!(
            who.protocol_version, None,
            "query mode: version only in hello"
        );
    }

    #[test]
    fn hello_parses_as_a_firmware_hello() {
        let ClientMessage::Hello(h) =
            parse_client_message(&hello_text(BinaryProtocol::V2)).unwrap()
        else {
            panic!("not a hello")
        };
        assert_eq!(h.version, Some(2));
        assert_eq!(h.transport.as_deref(), Some("websocket"));
        assert!(h.features.mcp);
        assert_eq!(h.audio_params.map(|p| p.sample_rate), Some(16000));
    }

    #[test]
    fn close_1013_is_a_refusal() {
        use tungstenite::protocol::frame::coding::CloseCode;
        use tungstenite::protocol::CloseFrame;
        let f = CloseFrame {
            code: CloseCode::Again,
            reason: "busy".into(),
        };
        assert_eq!(close_kind(Some(&f)).0, ErrorKind::Refused);
        for code in [CloseCode::Normal, CloseCode::Away] {
            let f = CloseFrame {
                code,
                reason: "server shutting down".into(),
            };
            assert_eq!(close_kind(Some(&f)).0, ErrorKind::ServerClosed);
        }
        let f = CloseFrame {
            code: CloseCode::Error,
            reason: "".into(),
        };
        assert_eq!(close_kind(Some(&f)).0, ErrorKind::Disconnected);
        assert_eq!(close_kind(None).0, ErrorKind::Disconnected);
    }
}
