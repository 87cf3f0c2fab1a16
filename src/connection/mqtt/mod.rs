//! The MQTT + UDP driver (spec §15): the firmware's other transport, served by every shard
//! itself, with no gateway in between.
//!
//! A device's MQTT connection is long-lived and carries one session per conversation: the
//! device CONNECTs once (credentials checked with the signature keys), keeps the connection
//! with PINGREQs, and opens a conversation with a `hello` (`transport: "udp"`, version 3).
//! Each hello starts a [`Session`] (admitted on the shard's budget like a WebSocket one),
//! answered with the shard's UDP port and a fresh key; the session is driven by the same
//! [`driver`](super::driver) loop as the WebSocket, through an [`MqttLink`](link::MqttLink):
//! PUBLISHes from the device are its text, the shard's UDP socket its audio, and its replies go
//! out as PUBLISHes on `devices/p2p/<mac_>` and sealed datagrams. When the session ends
//! (goodbye either way, timeouts) the server publishes `goodbye` and the connection waits for
//! the next hello, as the stock gateway's bridge does. Between sessions a PUBLISH other than
//! a hello is answered with `goodbye` (§15.2).
//!
//! [`MqttEndpoint`] is a shard's MQTT state: the signature keys, its UDP socket, the open
//! connections by client id (a second CONNECT with the same id replaces the first), the drain
//! signal for connections without a session, and the counters.

pub mod link;
pub mod stats;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;

use super::driver;
use super::udp::UdpAudio;
use super::{ConnectionContext, Count, Refusal};
use crate::config::MqttConfig;
use crate::front_door::proxy;
use crate::mqtt::credentials::{DeviceCredentials, SignatureKeys};
use crate::mqtt::packets::{
    check_connect, read_packet, write_connack, ConnackCode, ConnectRequest, Inbound, PacketCounters,
};
use crate::protocol::DeviceIdentity;
use link::{AwaitHello, MqttLink};

/// Why a connection is told to end by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// The same client id connected again (here or on another shard).
    Replaced,
    /// The shard is draining: a connection without a session closes now; one with a session
    /// closes when it ends (the session hears of the drain through its mailbox).
    Drain,
}

/// Counts the endpoint keeps beyond [`PacketCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// CONNECTs accepted.
    pub accepted: u64,
    /// Connections without a CONNECT in time (or with another packet first).
    pub no_connect: u64,
    /// Hellos that did not ask for UDP version 3.
    pub bad_hellos: u64,
    /// Connections replaced by a newer one with the same client id.
    pub replaced: u64,
    /// Sessions started.
    pub sessions: u64,
}

/// One shard's MQTT + UDP state.
pub struct MqttEndpoint {
    /// `[mqtt]` as configured.
    pub config: MqttConfig,
    /// Verify CONNECT passwords.
    pub keys: SignatureKeys,
    /// This shard's UDP audio socket.
    pub udp: Rc<UdpAudio>,
    /// Most MQTT connections this shard holds.
    limit: usize,
    clients: RefCell<HashMap<String, (u64, LocalSender<Kick>)>>,
    next_serial: Cell<u64>,
    draining: Cell<bool>,
    packets: RefCell<PacketCounters>,
    counters: Cell<EndpointCounters>,
    /// Tells the other shards a client id connected here (they close theirs).
    announce: Box<dyn Fn(&str)>,
}

impl MqttEndpoint {
    /// The endpoint of a shard holding at most `limit` MQTT connections, with its UDP socket;
    /// `announce` tells the other shards each client id that connects here.
    pub fn new(
        config: MqttConfig,
        udp: Rc<UdpAudio>,
        limit: usize,
        announce: Box<dyn Fn(&str)>,
    ) -> Result<Rc<MqttEndpoint>, String> {
        let keys = SignatureKeys::new(&config.signature_keys)
            .map_err(|e| format!("mqtt.signature_keys: {e}"))?;
        Ok(Rc::new(MqttEndpoint {
            config,
            keys,
            udp,
            limit,
            clients: RefCell::new(HashMap::new()),
            next_serial: Cell::new(0),
            draining: Cell::new(false),
            packets: RefCell::new(PacketCounters::default()),
            counters: Cell::new(EndpointCounters::default()),
            announce,
        }))
    }

    /// Open MQTT connections.
    pub fn connections(&self) -> usize {
        self.clients.borrow().len()
    }

    /// Refused packets and CONNECTs by reason.
    pub fn packet_counters(&self) -> PacketCounters {
        *self.packets.borrow()
    }

    /// The endpoint's other counts.
    pub fn counters(&self) -> EndpointCounters {
        self.counters.get()
    }

    fn count(&self, f: impl FnOnce(&mut EndpointCounters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    /// The drain began: no CONNECT is accepted any more, connections without a session close,
    /// and the others close when their session ends.
    pub fn drain(&self) {
        self.draining.set(true);
        for (_, tx) in self.clients.borrow().values() {
            let _ = tx.try_send(Kick::Drain);
        }
    }

    /// Closes this shard's connection with `client_id`, if any (it connected again, maybe on
    /// another shard); true when there was one.
    pub fn replace(&self, client_id: &str) -> bool {
        let Some((_, tx)) = self.clients.borrow_mut().remove(client_id) else {
            return false;
        };
        let _ = tx.try_send(Kick::Replaced);
        self.count(|c| c.replaced += 1);
        true
    }

    /// Registers a connection under `client_id`, replacing an older one with the same id here
    /// and, through the control mesh, on the other shards.
    fn register(self: &Rc<Self>, client_id: &str) -> (Registration, LocalReceiver<Kick>) {
        self.replace(client_id);
        (self.announce)(client_id);
        let serial = self.next_serial.get();
        self.next_serial.set(serial + 1);
        let (tx, rx) = local_channel::new_bounded(2);
        self.clients
            .borrow_mut()
            .insert(client_id.to_string(), (serial, tx));
        let registration = Registration {
            endpoint: self.clone(),
            client_id: client_id.to_string(),
            serial,
        };
        (registration, rx)
    }
}

/// A connection's entry in its endpoint; dropping it removes the entry (unless a newer
/// connection with the same id took it).
struct Registration {
    endpoint: Rc<MqttEndpoint>,
    client_id: String,
    serial: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut clients = self.endpoint.clients.borrow_mut();
        if clients
            .get(&self.client_id)
            .is_some_and(|(serial, _)| *serial == self.serial)
        {
            clients.remove(&self.client_id);
        }
    }
}

/// Serves one accepted TCP connection on the MQTT port until it closes.
pub async fn serve(mut stream: TcpStream, ctx: ConnectionContext, mqtt: Rc<MqttEndpoint>) {
    let _ = stream.set_nodelay(true);
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let local_ip = stream.local_addr().ok().map(|a| a.ip());
    let server = &ctx.settings.server;
    let handshake = Duration::from_millis(server.handshake_timeout_ms);
    let max_packet = mqtt.config.max_packet_bytes;
    let read = read_connect(&mut stream, &ctx, peer, max_packet);
    let Some(Ok((connect, client, leftover))) = driver::within(read, handshake).await else {
        mqtt.count(|c| c.no_connect += 1);
        return;
    };
    let refuse = |code: ConnackCode| {
        mqtt.packets.borrow_mut().count_refusal(code);
        code
    };
    // Draining, full, or over the address's connection rate (checked last: it spends a token).
    let unavailable = mqtt.draining.get()
        || mqtt.connections() >= mqtt.limit
        || !ctx.host.allow_connection_from(client.ip());
    let verdict = if unavailable {
        Err(refuse(ConnackCode::ServerUnavailable))
    } else {
        check_connect(&connect)
            .map_err(refuse)
            .and_then(|()| verify(&mqtt, &connect).map_err(refuse))
    };
    let mut out = Vec::new();
    let code = match &verdict {
        Ok(_) => ConnackCode::Accepted,
        Err(code) => *code,
    };
    if write_connack(code, &mut out).is_err() {
        return;
    }
    let wrote = driver::within(stream.write_all(&out), handshake).await;
    let Ok(credentials) = verdict else {
        tracing::info!(addr = %client.ip(), code = code.code(), "MQTT CONNECT refused");
        let _ = driver::within(stream.close(), handshake).await;
        return;
    };
    if !matches!(wrote, Some(Ok(()))) {
        return;
    }
    mqtt.count(|c| c.accepted += 1);
    let (registration, kick) = mqtt.register(&connect.client_id);
    let audio = match mqtt.udp.open(Some(client.ip())) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "no UDP channel for an MQTT connection");
            return;
        }
    };
    let udp_host = udp_host(&mqtt.config, local_ip);
    tracing::info!(
        device = ?credentials.client_id.mac,
        addr = %client.ip(),
        shard = ctx.shard,
        "MQTT device connected"
    );
    let mut link = MqttLink::new(
        stream,
        leftover,
        &mqtt,
        &credentials.client_id.mac,
        connect.keepalive_s,
        audio,
        kick,
        udp_host,
        Instant::now(),
    );
    serve_sessions(&mut link, &ctx, &mqtt, &credentials, local_ip).await;
    link.shutdown(Duration::from_millis(server.write_timeout_ms))
        .await;
    drop(registration);
}

/// Runs one session per hello until the connection ends.
async fn serve_sessions(
    link: &mut MqttLink,
    ctx: &ConnectionContext,
    mqtt: &Rc<MqttEndpoint>,
    credentials: &DeviceCredentials,
    local_ip: Option<IpAddr>,
) {
    loop {
        let hello = match link.await_hello(ctx).await {
            AwaitHello::Hello(text) => text,
            AwaitHello::Ended => return,
        };
        let admission = match ctx.host.admit() {
            Ok(a) => a,
            Err(Refusal::Full(_)) => {
                ctx.host.count(Count::RefusedFull);
                tracing::info!(device = ?credentials.client_id.mac, "shard full: MQTT hello refused");
                if link.publish_goodbye(None).await.is_err() {
                    return;
                }
                continue;
            }
            Err(Refusal::Draining) => return,
        };
        mqtt.count(|c| c.sessions += 1);
        let identity = DeviceIdentity {
            device_id: credentials.client_id.mac.clone(),
            client_id: Some(credentials.client_id.uuid.clone()),
            authorization: None,
            protocol_version: None,
            from_mqtt_gateway: false,
        };
        let mut session = ctx
            .settings
            // Its CONNECT credentials were verified with the signature keys.
            .new_session(admission.key, identity, None, local_ip, true);
        tracing::info!(session = %session.id, device = ?session.identity.device_id, "MQTT session");
        let first = link.open_session(&mut session, ctx, &hello, Instant::now());
        let outcome = driver::drive(link, session, &admission.mailbox, ctx, first).await;
        ctx.host.ended(&outcome);
        drop(admission);
        if link.ended() || ctx.host.drain_deadline().is_some() {
            return;
        }
    }
}

/// Reads the PROXY header (from a trusted balancer) and the first packet, which must be a
/// CONNECT; returns it, the device's address and the bytes read past it.
async fn read_connect(
    stream: &mut TcpStream,
    ctx: &ConnectionContext,
    peer: SocketAddr,
    max_packet: usize,
) -> Result<(ConnectRequest, SocketAddr, Vec<u8>), ()> {
    let mut client = peer;
    let mut buf = Vec::new();
    let accept = ctx.settings.server.proxy_protocol.accept();
    if let Some(accept) = accept.filter(|_| ctx.settings.trusted.contains(peer.ip())) {
        match proxy::read_header(stream, accept).await {
            Ok((header, rest)) => {
                client = header.source.unwrap_or(peer);
                buf = rest;
            }
            Err(e) => {
                ctx.host.count(Count::ProxyHeaderError);
                tracing::info!(%peer, error = %e, "trusted balancer sent no valid PROXY header");
                return Err(());
            }
        }
    }
    let mut chunk = [0u8; 512];
    loop {
        match read_packet(&buf, max_packet) {
            Ok(Some((Inbound::Connect(connect), used))) => {
                buf.drain(..used);
                return Ok((connect, client, buf));
            }
            Ok(Some(_)) | Err(_) => return Err(()),
            Ok(None) => {}
        }
        let n = stream.read(&mut chunk).await.map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// Checks a CONNECT's credentials; the CONNACK refusal when they fail.
fn verify(mqtt: &MqttEndpoint, connect: &ConnectRequest) -> Result<DeviceCredentials, ConnackCode> {
    mqtt.keys
        .verify_connect(
            &connect.client_id,
            connect.username.as_deref(),
            connect.password.as_deref().map(str::as_bytes),
        )
        .map_err(|e| {
            tracing::info!(client_id = ?connect.client_id, error = %e, "MQTT credentials refused");
            ConnackCode::for_credentials(&e)
        })
}

/// The host devices send UDP to: `mqtt.udp_public_host`, else the host of
/// `mqtt.public_endpoint`, else the address the device's MQTT connection reached.
pub fn udp_host(config: &MqttConfig, local_ip: Option<IpAddr>) -> String {
    if !config.udp_public_host.is_empty() {
        return config.udp_public_host.clone();
    }
    let endpoint = config.public_endpoint.as_str();
    let endpoint_host = match endpoint.strip_prefix('[') {
        Some(v6) => v6.split(']').next(),
        None => endpoint.split(':').next(),
    };
    if let Some(host) = endpoint_host.filter(|h| !h.is_empty()) {
        return host.to_string();
    }
    match local_ip.map(|ip| ip.to_canonical()) {
        Some(ip) if !ip.is_unspecified() => ip.to_string(),
        _ => "127.0.0.1".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_host_prefers_the_configured_host_then_the_endpoint_then_the_local_address() {
        let mut c = MqttConfig::default();
        let local = Some("::ffff:10.0.0.5".parse().unwrap());
        assert_eq!(udp_host(&c, local), "10.0.0.5");
        c.public_endpoint = "mqtt.example.com:1883".into();
        assert_eq!(udp_host(&c, local), "mqtt.example.com");
        c.public_endpoint = "[2001:db8::1]:1883".into();
        assert_eq!(udp_host(&c, local), "2001:db8::1");
        c.public_endpoint = "mqtt.example.com".into();
        assert_eq!(udp_host(&c, local), "mqtt.example.com");
        c.udp_public_host = "203.0.113.9".into();
        assert_eq!(udp_host(&c, local), "203.0.113.9");
    }
}
