//! One device's MQTT connection and UDP channel as the shared driver loop sees it: a
//! [`Link`] whose text is the device's QoS 0 PUBLISHes and whose audio is the shard's UDP
//! socket, and which writes the session's text as PUBLISHes on `devices/p2p/<mac_>` and its
//! audio as sealed datagrams.
//!
//! Bytes are framed with [`take_packet`](MqttLink::take_packet): a packet's length is checked
//! against `mqtt.max_packet_bytes` from its fixed header, before it is buffered, and the read
//! buffer grows only to the packet being read (idle connections keep a small one). Protocol
//! answers (PINGRESP, SUBACK) are queued and written by [`Link::flush`]. Every packet moves
//! the keepalive deadline; 1.5 × the CONNECT keepalive without one ends the connection.
//! At most one PUBLISH is handed to the session per input, so each of its effects is carried
//! out before the next message (the rest stay buffered and come back at once).

use std::future::pending;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::LocalReceiver;
use glommio::net::TcpStream;
use serde::Deserialize;

use super::{Kick, MqttEndpoint};
use crate::connection::driver::{self, Handled, Link};
use crate::connection::udp::AudioChannel;
use crate::connection::{ConnectionContext, End};
use crate::mqtt::hello::{check_device_hello, p2p_topic, UdpChannel};
use crate::mqtt::packets::{
    packet_len, read_packet, write_pingresp, write_publish, write_suback, write_unsuback, Inbound,
    KeepaliveDeadline, PacketError,
};
use crate::session::{Effects, Outgoing, Session};

/// Read buffer of a connection between packets (grown up to the packet being read).
const IDLE_BUFFER: usize = 2048;

/// What woke a link.
pub enum Input {
    /// A complete packet was already buffered.
    Buffered,
    /// The socket read this many bytes (0: the device closed), or failed.
    Read(io::Result<usize>),
    /// An uplink Opus packet from the UDP socket.
    Uplink(Option<Vec<u8>>),
    /// Someone told the connection to end (or its endpoint is gone).
    Kick(Option<Kick>),
}

/// What the wait between sessions ended with.
pub enum AwaitHello {
    /// A hello asking for UDP version 3 (its text): start a session.
    Hello(String),
    /// The connection ended (closed, kicked, keepalive, drain, bad input).
    Ended,
}

/// A device's MQTT connection and its UDP channel.
pub struct MqttLink {
    stream: TcpStream,
    /// Bytes read and not yet framed are `buf[start..filled]`.
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    /// Packets queued for the device (protocol answers, PUBLISHes being written).
    out: Vec<u8>,
    endpoint: Rc<MqttEndpoint>,
    topic: String,
    keepalive: KeepaliveDeadline,
    audio: AudioChannel,
    kick: LocalReceiver<Kick>,
    kick_open: bool,
    udp_host: String,
    session_id: Option<String>,
    /// The last text published was a `goodbye`.
    goodbye_sent: bool,
    ended: bool,
    draining: bool,
}

#[derive(Deserialize)]
struct MessageType {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// The `type` of a JSON message, if it is one.
fn message_type(text: &str) -> Option<String> {
    serde_json::from_str::<MessageType>(text).ok()?.kind
}

impl MqttLink {
    /// The link of a connection that CONNECTed as the device with MAC `mac` (`leftover`: bytes
    /// read past the CONNECT).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: TcpStream,
        leftover: Vec<u8>,
        endpoint: &Rc<MqttEndpoint>,
        mac: &str,
        keepalive_s: u16,
        audio: AudioChannel,
        kick: LocalReceiver<Kick>,
        udp_host: String,
        now: Instant,
    ) -> MqttLink {
        let filled = leftover.len();
        let mut buf = leftover;
        buf.resize(filled.max(IDLE_BUFFER), 0);
        MqttLink {
            stream,
            buf,
            start: 0,
            filled,
            out: Vec::new(),
            endpoint: endpoint.clone(),
            topic: p2p_topic(mac),
            keepalive: KeepaliveDeadline::new(keepalive_s, now),
            audio,
            kick,
            kick_open: true,
            udp_host,
            session_id: None,
            goodbye_sent: false,
            ended: false,
            draining: false,
        }
    }

    /// Whether the connection is over (closed, kicked, timed out or refused input).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Waits between sessions for the device's next hello, answering MQTT's own packets; a
    /// message other than a hello (or a goodbye) is answered with `goodbye`, as the gateway
    /// does without a bridge.
    pub async fn await_hello(&mut self, ctx: &ConnectionContext) -> AwaitHello {
        let limit = Duration::from_millis(ctx.settings.server.write_timeout_ms);
        loop {
            if self.ended || self.draining || ctx.host.drain_deadline().is_some() {
                return AwaitHello::Ended;
            }
            if !matches!(driver::within(self.flush(), limit).await, Some(Ok(()))) {
                return AwaitHello::Ended;
            }
            let deadline = self.keepalive.deadline();
            let next = async { Some(self.next().await) };
            let timer = async {
                match deadline {
                    Some(d) => {
                        glommio::timer::sleep(d.saturating_duration_since(Instant::now())).await
                    }
                    None => pending::<()>().await,
                }
                None
            };
            let woke = futures_lite::future::or(next, timer).await;
            let now = Instant::now();
            let Some(input) = woke else {
                if self.expired(now).is_some() {
                    return AwaitHello::Ended;
                }
                continue;
            };
            match input {
                Input::Buffered | Input::Read(Ok(1..)) => loop {
                    match self.next_message(now) {
                        Ok(Some(text)) => match message_type(&text).as_deref() {
                            Some("hello") => match self.check_hello(&text) {
                                Ok(()) => return AwaitHello::Hello(text),
                                Err(_) => return AwaitHello::Ended,
                            },
                            Some("goodbye") => {}
                            _ => self.queue_goodbye(None),
                        },
                        Ok(None) => break,
                        Err(_) => return AwaitHello::Ended,
                    }
                },
                // Audio outside a session (the device's last frames after a goodbye): dropped.
                Input::Uplink(Some(_)) => {}
                Input::Kick(Some(Kick::Drain)) => self.draining = true,
                _ => {
                    self.ended = true;
                    return AwaitHello::Ended;
                }
            }
        }
    }

    /// Opens the UDP channel for a session's first hello (a fresh key) and gives the session
    /// the hello.
    pub fn open_session(
        &mut self,
        session: &mut Session,
        ctx: &ConnectionContext,
        hello: &str,
        now: Instant,
    ) -> Effects {
        self.session_id = Some(session.id.clone());
        self.goodbye_sent = false;
        self.announce_channel(session);
        driver::text_in(session, ctx, hello, now)
    }

    /// Publishes `{"type":"goodbye"}` (with the session's id, if any) now.
    pub async fn publish_goodbye(&mut self, session_id: Option<&str>) -> Result<(), ()> {
        self.queue_goodbye(session_id);
        self.flush().await
    }

    /// Writes what is queued and closes the socket (bounded by `limit`).
    pub async fn shutdown(&mut self, limit: Duration) {
        let close = async {
            let _ = self.flush().await;
            let _ = self.stream.close().await;
        };
        driver::within(close, limit).await;
    }

    fn queue_goodbye(&mut self, session_id: Option<&str>) {
        let text = match session_id {
            Some(id) => serde_json::json!({"type": "goodbye", "session_id": id}),
            None => serde_json::json!({"type": "goodbye"}),
        }
        .to_string();
        self.queue_text(&text);
    }

    fn queue_text(&mut self, text: &str) {
        self.goodbye_sent = message_type(text).as_deref() == Some("goodbye");
        if let Err(e) = write_publish(&self.topic, text.as_bytes(), &mut self.out) {
            tracing::warn!(error = %e, "reply not published");
        }
    }

    /// A fresh key for this hello; the session's reply announces it with the shard's port.
    fn announce_channel(&mut self, session: &mut Session) {
        match self.audio.rekey() {
            Ok((key, nonce)) => session.set_udp_channel(
                UdpChannel {
                    server: self.udp_host.clone(),
                    port: self.endpoint.udp.port(),
                    key,
                    nonce,
                }
                .params(),
            ),
            Err(e) => tracing::warn!(error = %e, "no UDP key for a hello"),
        }
    }

    /// Checks a hello over MQTT (`transport` "udp", version 3); the gateway closes on anything
    /// else, and so does this server.
    fn check_hello(&mut self, text: &str) -> Result<(), End> {
        let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        match check_device_hello(&value) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::info!(error = %e, "MQTT hello refused; closing");
                self.endpoint.count(|c| c.bad_hellos += 1);
                Err(self.end(End::ProtocolError))
            }
        }
    }

    fn end(&mut self, end: End) -> End {
        self.ended = true;
        end
    }

    /// Whether `buf` holds a complete packet (or a header to refuse).
    fn has_packet(&self) -> bool {
        let pending = self.buf.get(self.start..self.filled).unwrap_or_default();
        match packet_len(pending, self.endpoint.config.max_packet_bytes) {
            Ok(Some(size)) => pending.len() >= size,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Frames the next buffered packet, if a whole one is there.
    fn take_packet(&mut self) -> Result<Option<Inbound>, PacketError> {
        let pending = self.buf.get(self.start..self.filled).unwrap_or_default();
        let Some((packet, used)) = read_packet(pending, self.endpoint.config.max_packet_bytes)?
        else {
            return Ok(None);
        };
        self.start += used;
        if self.start == self.filled {
            (self.start, self.filled) = (0, 0);
            if self.buf.len() > IDLE_BUFFER {
                self.buf.truncate(IDLE_BUFFER);
                self.buf.shrink_to_fit();
            }
        }
        Ok(Some(packet))
    }

    /// Room to read into: the unframed bytes moved to the front, the buffer grown to the
    /// packet being read (its size is known from its header and within the limit).
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.filled, 0);
            self.filled -= self.start;
            self.start = 0;
        }
        let pending = self.buf.get(..self.filled).unwrap_or_default();
        let want = match packet_len(pending, self.endpoint.config.max_packet_bytes) {
            Ok(Some(size)) => size.max(IDLE_BUFFER),
            _ => IDLE_BUFFER,
        };
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
    }

    /// The next PUBLISH's text, answering the protocol's own packets on the way; `None` when
    /// no whole packet is buffered. An `Err` ends the connection (counted).
    fn next_message(&mut self, now: Instant) -> Result<Option<String>, End> {
        loop {
            let packet = match self.take_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(None),
                Err(e) => {
                    tracing::info!(error = %e, "closing an MQTT connection on a bad packet");
                    self.endpoint.packets.borrow_mut().count(&e);
                    let end = match e {
                        PacketError::Oversized { .. } => End::Oversized,
                        _ => End::ProtocolError,
                    };
                    return Err(self.end(end));
                }
            };
            self.keepalive.touch(now);
            let answered = match packet {
                Inbound::Publish { payload, .. } => match String::from_utf8(payload) {
                    Ok(text) => return Ok(Some(text)),
                    Err(_) => {
                        self.endpoint.packets.borrow_mut().malformed += 1;
                        return Err(self.end(End::ProtocolError));
                    }
                },
                Inbound::PingReq => write_pingresp(&mut self.out),
                Inbound::Subscribe { packet_id, filters } => {
                    write_suback(packet_id, filters, &mut self.out)
                }
                Inbound::Unsubscribe { packet_id } => write_unsuback(packet_id, &mut self.out),
                Inbound::Disconnect => return Err(self.end(End::Normal)),
                Inbound::Connect(_) => {
                    self.endpoint.packets.borrow_mut().unexpected += 1;
                    return Err(self.end(End::ProtocolError));
                }
            };
            if let Err(e) = answered {
                tracing::warn!(error = %e, "MQTT answer not encoded");
            }
        }
    }
}

impl Link for MqttLink {
    type Input = Input;

    fn transport(&self, _session: &Session) -> crate::metrics::Transport {
        crate::metrics::Transport::Mqtt
    }

    fn weight(input: &Input) -> usize {
        match input {
            Input::Read(Ok(n)) => *n,
            Input::Uplink(Some(opus)) => opus.len(),
            _ => 0,
        }
    }

    async fn next(&mut self) -> Input {
        if self.has_packet() {
            return Input::Buffered;
        }
        self.make_room();
        let input = {
            let MqttLink {
                stream,
                buf,
                filled,
                audio,
                kick,
                kick_open,
                ..
            } = self;
            let room = buf.get_mut(*filled..).unwrap_or_default();
            let read = async { Input::Read(stream.read(room).await) };
            let uplink = async { Input::Uplink(audio.recv().await) };
            let kicked = async {
                if !*kick_open {
                    pending::<()>().await;
                }
                Input::Kick(kick.recv().await)
            };
            futures_lite::future::or(read, futures_lite::future::or(uplink, kicked)).await
        };
        match input {
            Input::Read(Ok(n)) => self.filled += n,
            Input::Kick(None) => self.kick_open = false,
            _ => {}
        }
        input
    }

    fn handle(
        &mut self,
        input: Input,
        session: &mut Session,
        ctx: &ConnectionContext,
        now: Instant,
    ) -> Handled {
        match input {
            Input::Buffered | Input::Read(Ok(1..)) => match self.next_message(now) {
                Ok(Some(text)) => {
                    if message_type(&text).as_deref() == Some("hello") {
                        if let Err(end) = self.check_hello(&text) {
                            return Handled::Gone(end);
                        }
                        self.announce_channel(session);
                    }
                    Handled::Effects(driver::text_in(session, ctx, &text, now))
                }
                Ok(None) => Handled::Effects(Effects::default()),
                Err(end) => Handled::Gone(end),
            },
            Input::Uplink(Some(opus)) => Handled::Effects(session.on_audio(&opus, now)),
            Input::Kick(Some(Kick::Drain)) => {
                // The session hears of the drain through its mailbox; the connection closes
                // when it ends.
                self.draining = true;
                Handled::Effects(Effects::default())
            }
            Input::Read(_) | Input::Uplink(None) | Input::Kick(_) => {
                Handled::Gone(self.end(End::Normal))
            }
        }
    }

    async fn send(&mut self, item: Outgoing, _session: &Session) -> Result<(), ()> {
        match item {
            Outgoing::Text(text) => {
                self.queue_text(&text);
                self.flush().await
            }
            Outgoing::Audio { opus, timestamp_ms } => {
                // A refused datagram is counted by the channel; UDP loss is not the end.
                let _ = self.audio.send(&opus, timestamp_ms).await;
                Ok(())
            }
            Outgoing::Close { .. } => Ok(()),
        }
    }

    async fn flush(&mut self) -> Result<(), ()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.out).await;
        self.out.clear();
        result.map_err(|_| {
            self.ended = true;
        })
    }

    async fn close(&mut self, _code: u16, _reason: String, limit: Duration) {
        // The session is over; the MQTT connection stays for the next hello. The device closes
        // its audio channel on `goodbye` (sent by the session before a close it decided, and
        // here after the device's own goodbye or a timeout, as the gateway does).
        if !self.goodbye_sent {
            let id = self.session_id.take();
            self.queue_goodbye(id.as_deref());
        }
        self.session_id = None;
        if !matches!(driver::within(self.flush(), limit).await, Some(Ok(()))) {
            self.ended = true;
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.keepalive.deadline()
    }

    fn expired(&mut self, now: Instant) -> Option<End> {
        if !self.keepalive.expired(now) {
            return None;
        }
        tracing::info!(topic = %self.topic, "MQTT keepalive expired");
        self.endpoint.packets.borrow_mut().keepalive_expired += 1;
        Some(self.end(End::Timeout))
    }
}
