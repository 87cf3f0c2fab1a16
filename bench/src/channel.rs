//! A device's open channel, whichever transport carries it: a WebSocket ([`crate::connect`]) or
//! MQTT + UDP ([`crate::mqtt_link`]). The device's turn logic, schedule and classification
//! (`device.rs`) see only this: send a text message, send one uplink audio frame, wait for the
//! next thing from the server, close.

use futures_lite::StreamExt;
use tungstenite::{Bytes, Message};
use xiaozhi_protocol::BinaryProtocol;

use crate::connect::{close_kind, Channel as WsChannel};
use crate::mqtt_link::{self, MqttChannel};
use crate::outcome::ErrorKind;

/// How fleet devices reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One WebSocket for JSON and audio.
    Websocket,
    /// MQTT for JSON (credentials from each device's OTA answer), audio over encrypted UDP.
    Mqtt,
}

/// An open channel after a successful hello.
pub enum Channel {
    /// WebSocket.
    Ws(WsChannel),
    /// MQTT + UDP.
    Mqtt(MqttChannel),
}

/// What arrived from the server.
pub enum Incoming {
    /// A JSON text message.
    Text(String),
    /// A downlink audio frame (framed for the WebSocket's protocol; bare Opus over UDP).
    Audio(Bytes),
    /// A UDP datagram the firmware's checks dropped.
    BadAudio,
    /// The channel ended: how (a clean close, a refusal, a drop) and why.
    Closed(ErrorKind, String),
    /// Nothing the device acts on (ping, pong, PINGRESP).
    Nothing,
}

impl Channel {
    /// `session_id` from the server's hello.
    pub fn session_id(&self) -> &str {
        match self {
            Channel::Ws(c) => &c.session_id,
            Channel::Mqtt(c) => &c.session_id,
        }
    }

    /// Downlink sample rate and frame duration (ms) the server announced.
    pub fn downlink(&self) -> (u32, u32) {
        match self {
            Channel::Ws(c) => (c.sample_rate, c.frame_ms),
            Channel::Mqtt(c) => (c.sample_rate, c.frame_ms),
        }
    }

    /// The framing a downlink frame is checked with: the negotiated one on a WebSocket, bare
    /// Opus (version 1's) for a decrypted datagram.
    pub fn downlink_protocol(&self, negotiated: BinaryProtocol) -> BinaryProtocol {
        match self {
            Channel::Ws(_) => negotiated,
            Channel::Mqtt(_) => BinaryProtocol::V1,
        }
    }

    /// Sends a JSON text message.
    pub async fn send_text(&mut self, text: String) -> Result<(), String> {
        match self {
            Channel::Ws(c) => {
                c.ws.send(Message::text(text))
                    .await
                    .map_err(|e| e.to_string())
            }
            Channel::Mqtt(c) => c.send_text(&text).await,
        }
    }

    /// Sends one uplink audio frame (framed for the WebSocket; bare Opus for UDP).
    pub async fn send_audio(&mut self, frame: Bytes) -> Result<(), String> {
        match self {
            Channel::Ws(c) => {
                c.ws.send(Message::Binary(frame))
                    .await
                    .map_err(|e| e.to_string())
            }
            Channel::Mqtt(c) => c.send_audio(&frame).await,
        }
    }

    /// Waits for the next thing from the server (cancel-safe: raced against timers).
    pub async fn next(&mut self) -> Incoming {
        match self {
            Channel::Ws(c) => match c.ws.next().await {
                None => Incoming::Closed(ErrorKind::Disconnected, "closed".into()),
                Some(Err(e)) => Incoming::Closed(ErrorKind::Disconnected, e.to_string()),
                Some(Ok(Message::Text(t))) => Incoming::Text(t.as_str().to_owned()),
                Some(Ok(Message::Binary(b))) => Incoming::Audio(b),
                Some(Ok(Message::Close(frame))) => {
                    let (kind, why) = close_kind(frame.as_ref());
                    Incoming::Closed(kind, why)
                }
                Some(Ok(_)) => Incoming::Nothing,
            },
            Channel::Mqtt(c) => match c.next().await {
                mqtt_link::Incoming::Text(t) => Incoming::Text(t),
                mqtt_link::Incoming::Audio(b) => Incoming::Audio(b),
                mqtt_link::Incoming::BadAudio => Incoming::BadAudio,
                mqtt_link::Incoming::Goodbye => {
                    Incoming::Closed(ErrorKind::ServerClosed, "goodbye".into())
                }
                mqtt_link::Incoming::Closed(why) => Incoming::Closed(ErrorKind::Disconnected, why),
                mqtt_link::Incoming::Nothing => Incoming::Nothing,
            },
        }
    }

    /// Closes the channel (a close frame, or MQTT DISCONNECT).
    pub async fn close(&mut self) {
        match self {
            Channel::Ws(c) => {
                let _ = c.ws.close(None).await;
            }
            Channel::Mqtt(c) => c.close().await,
        }
    }
}
