//! A fleet device's MQTT + UDP channel on its glommio executor (spec §15): CONNECT with the
//! credentials of the device's own OTA answer, a `hello` published with `transport: "udp"` and
//! version 3, then JSON over MQTT PUBLISH and Opus over AES-128-CTR UDP datagrams.
//!
//! The packet, hello, sealing and downlink rules are the blocking test device's
//! ([`xiaozhi_bench::mqtt_device`]); this is only their async I/O, so the fleet runs hundreds of
//! MQTT devices per executor as it runs WebSocket ones. Bytes read from the MQTT connection wait
//! in the channel's own buffer until a whole packet is there, so [`MqttChannel::next`] can be
//! raced against a timer and dropped without losing a packet half-read.

use std::net::SocketAddr;
use std::time::Instant;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpStream, UdpSocket};
use mqtt::packet::{DisconnectPacket, VariablePacket};
use serde_json::Value;
use tungstenite::Bytes;
use xiaozhi_bench::mqtt_device::{
    connect_packet, encode, hello_text, open_downlink, publish_packet, seal, split_packet,
    udp_channel, MqttCredentials,
};

use crate::connect::{within, ConnectTimes, HELLO_TIMEOUT};
use crate::inbound::{parse_server_text, ServerEvent};
use crate::outcome::ErrorKind;

/// Largest downlink datagram read (a 60 ms Opus frame is a few hundred bytes).
const DATAGRAM_BYTES: usize = 2048;
/// Largest MQTT packet the device buffers before calling the connection broken.
const MAX_PACKET_BYTES: usize = 64 << 10;

/// An open MQTT + UDP channel after a successful hello.
pub struct MqttChannel {
    tcp: TcpStream,
    udp: UdpSocket,
    topic: String,
    key: [u8; 16],
    nonce: [u8; 16],
    /// Last uplink sequence sent (the first datagram carries 1).
    seq: u32,
    /// Last downlink sequence accepted.
    last_down: u32,
    /// MQTT bytes read but not yet a whole packet.
    buf: Vec<u8>,
    datagram: Vec<u8>,
    /// `session_id` from the server's hello.
    pub session_id: String,
    /// Downlink sample rate the server announced.
    pub sample_rate: u32,
    /// Downlink frame duration the server announced, ms.
    pub frame_ms: u32,
}

/// What arrived on the channel.
pub enum Incoming {
    /// A PUBLISH's JSON text.
    Text(String),
    /// A downlink datagram that passed the firmware's checks, decrypted.
    Audio(Bytes),
    /// A downlink datagram the firmware would drop (type, length or sequence).
    BadAudio,
    /// The server said `goodbye`: the session is over (the firmware closes its channel).
    Goodbye,
    /// The MQTT connection ended.
    Closed(String),
    /// Something with no meaning for the device (PINGRESP, say).
    Nothing,
}

fn failed(e: impl std::fmt::Display) -> (ErrorKind, String) {
    (ErrorKind::ConnectFailed, e.to_string())
}

/// Connects to the OTA-issued endpoint, sends CONNECT and hello, and opens the UDP channel.
pub async fn open(
    creds: &MqttCredentials,
    times: &mut ConnectTimes,
) -> Result<MqttChannel, (ErrorKind, String)> {
    let (host, port) = creds
        .endpoint
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| failed(format!("bad mqtt endpoint {:?}", creds.endpoint)))?;
    let tcp = within(HELLO_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .ok_or_else(|| failed("tcp connect timed out"))?
        .map_err(|e| failed(format!("tcp connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    times.tcp = Some(Instant::now());
    let local_ip = tcp.local_addr().map_err(failed)?.ip();
    let mut chan = MqttChannel {
        tcp,
        udp: bind_udp(SocketAddr::new(local_ip, 0)).map_err(failed)?,
        topic: creds.publish_topic.clone(),
        key: [0; 16],
        nonce: [0; 16],
        seq: 0,
        last_down: 0,
        buf: Vec::with_capacity(1024),
        datagram: vec![0; DATAGRAM_BYTES],
        session_id: String::new(),
        sample_rate: 0,
        frame_ms: 0,
    };
    let handshake = async {
        chan.write(&connect_packet(creds).map_err(failed)?)
            .await
            .map_err(|e| failed(format!("send CONNECT: {e}")))?;
        match chan.next_packet().await.map_err(failed)? {
            VariablePacket::ConnackPacket(ack) => match ack.connect_return_code().to_u8() {
                0 => {}
                // 3: server unavailable (full or draining), the MQTT twin of a 503.
                3 => return Err((ErrorKind::Refused, "CONNACK 3: server unavailable".into())),
                code => return Err(failed(format!("CONNACK refused with code {code}"))),
            },
            other => return Err(failed(format!("expected CONNACK, got {other:?}"))),
        }
        times.upgraded = Some(Instant::now());
        chan.send_text(&hello_text(true))
            .await
            .map_err(|e| failed(format!("send hello: {e}")))?;
        loop {
            let VariablePacket::PublishPacket(p) = chan
                .next_packet()
                .await
                .map_err(|e| failed(format!("before hello: {e}")))?
            else {
                continue;
            };
            let text = String::from_utf8_lossy(p.payload());
            let Some(ServerEvent::Hello {
                session_id,
                sample_rate,
                frame_ms,
                ..
            }) = parse_server_text(&text)
            else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).map_err(failed)?;
            let (server, port, key, nonce) = udp_channel(&reply).map_err(failed)?;
            return Ok((session_id, sample_rate, frame_ms, server, port, key, nonce));
        }
    };
    let (session_id, sample_rate, frame_ms, server, port, key, nonce) =
        within(HELLO_TIMEOUT, handshake)
            .await
            .ok_or_else(|| (ErrorKind::NoHello, "no hello within 10 s".to_owned()))??;
    chan.udp
        .connect((server.as_str(), port))
        .await
        .map_err(|e| failed(format!("udp {server}:{port}: {e}")))?;
    times.hello = Some(Instant::now());
    chan.session_id = session_id;
    chan.sample_rate = sample_rate;
    chan.frame_ms = frame_ms;
    chan.key = key;
    chan.nonce = nonce;
    Ok(chan)
}

impl MqttChannel {
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tcp.write_all(bytes).await
    }

    /// Publishes one JSON message to the device's publish topic.
    pub async fn send_text(&mut self, json: &str) -> Result<(), String> {
        let packet = publish_packet(&self.topic, json).map_err(|e| e.to_string())?;
        self.write(&packet).await.map_err(|e| e.to_string())
    }

    /// Seals and sends one Opus packet as the next uplink datagram.
    pub async fn send_audio(&mut self, opus: &[u8]) -> Result<(), String> {
        self.seq = self.seq.wrapping_add(1);
        let datagram = seal(&self.key, &self.nonce, self.seq, opus);
        self.udp
            .send(&datagram)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Sends DISCONNECT (the device is done).
    pub async fn close(&mut self) {
        if let Ok(bytes) = encode(&DisconnectPacket::new()) {
            let _ = self.write(&bytes).await;
        }
        let _ = self.tcp.close().await;
    }

    /// The next whole MQTT packet (the handshake reads only the TCP side).
    async fn next_packet(&mut self) -> Result<VariablePacket, String> {
        loop {
            if let Some((packet, used)) = split_packet(&self.buf).map_err(|e| e.to_string())? {
                self.buf.drain(..used);
                return Ok(packet);
            }
            read_into(&mut self.tcp, &mut self.buf).await?;
        }
    }

    /// Waits for the next PUBLISH or downlink datagram.
    pub async fn next(&mut self) -> Incoming {
        match split_packet(&self.buf) {
            Ok(Some((packet, used))) => {
                self.buf.drain(..used);
                let VariablePacket::PublishPacket(p) = packet else {
                    return Incoming::Nothing;
                };
                let text = String::from_utf8_lossy(p.payload()).into_owned();
                if matches!(parse_server_text(&text), Some(ServerEvent::Other { ref kind, .. }) if kind == "goodbye")
                {
                    return Incoming::Goodbye;
                }
                return Incoming::Text(text);
            }
            Ok(None) => {}
            Err(e) => return Incoming::Closed(format!("bad MQTT packet: {e}")),
        }
        enum Ready {
            Tcp(Result<(), String>),
            Udp(Result<usize, ()>),
        }
        let Self {
            tcp,
            udp,
            buf,
            datagram,
            ..
        } = self;
        let tcp_read = async { Ready::Tcp(read_into(tcp, buf).await) };
        let udp_recv = async { Ready::Udp(udp.recv(datagram).await.map_err(drop)) };
        match futures_lite::future::or(tcp_read, udp_recv).await {
            Ready::Tcp(Ok(())) => Incoming::Nothing,
            Ready::Tcp(Err(e)) => Incoming::Closed(e),
            // A refused send (nothing listening yet) or an ICMP error: not the device's end.
            Ready::Udp(Err(_)) => Incoming::Nothing,
            Ready::Udp(Ok(n)) => {
                let Some(datagram) = self.datagram.get_mut(..n) else {
                    return Incoming::BadAudio;
                };
                match open_downlink(&self.key, datagram, &mut self.last_down) {
                    Some((opus, _)) => Incoming::Audio(Bytes::copy_from_slice(opus)),
                    None => Incoming::BadAudio,
                }
            }
        }
    }
}

/// A UDP socket on `addr` without `SO_REUSEPORT` (glommio's `UdpSocket::bind` sets it, and two
/// devices' ephemeral binds could then share one port: a 300-device run saw one device receive
/// another's datagrams, dropped for their sequence numbers).
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let std_socket = std::net::UdpSocket::bind(addr)?;
    // SAFETY: a freshly bound UDP socket this function owns; glommio takes over its fd.
    Ok(unsafe { UdpSocket::from_raw_fd(std_socket.into_raw_fd()) })
}

/// Reads what the MQTT connection has into `buf` (bounded: a device never buffers more than
/// one large packet).
async fn read_into(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    if buf.len() > MAX_PACKET_BYTES {
        return Err("MQTT packet too large".into());
    }
    let mut chunk = [0u8; 2048];
    match tcp.read(&mut chunk).await {
        Ok(0) => Err("closed".into()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}
