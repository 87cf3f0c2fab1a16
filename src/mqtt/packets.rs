//! MQTT 3.1.1 packets as this server speaks them to devices (spec §15.1, §15.6, §10), glue over
//! the `mqtt-protocol` codec (why that crate: see the comment on it in `Cargo.toml`).
//!
//! The server terminates MQTT itself, as the stock gateway does: the firmware publishes every
//! JSON message to its `publish_topic` and never subscribes, and replies are PUBLISH packets on
//! `devices/p2p/<mac_>` written straight to the device's connection. Only what that needs is
//! accepted: CONNECT (protocol level 4, client id, username and password present), PUBLISH at
//! QoS 0 (QoS 1 and 2 are refused — the gateway closes on them), PINGREQ, DISCONNECT, and
//! SUBSCRIBE/UNSUBSCRIBE, answered (granting QoS 0) so that a standard MQTT client works too,
//! although nothing is routed by subscription.
//!
//! [`read_packet`] frames before it decodes: it reads the fixed header itself, refuses a packet
//! longer than the configured maximum as soon as its length is known (before buffering it), and
//! hands the codec exactly one complete packet, so the codec never allocates more than the
//! limit and never sees a partial packet. Every failure is a [`PacketError`] value to count
//! ([`PacketCounters`]) and close on, never a panic. Keepalive follows the MQTT rule the gateway
//! also applies: no packet for 1.5 × the CONNECT keepalive means the device is gone.

use std::time::{Duration, Instant};

use mqtt::control::variable_header::ConnectReturnCode;
use mqtt::packet::suback::SubscribeReturnCode;
use mqtt::packet::{
    ConnackPacket, PingrespPacket, PublishPacket, QoSWithPacketIdentifier, SubackPacket,
    UnsubackPacket, VariablePacket,
};
use mqtt::{Decodable, Encodable, TopicName};

use super::credentials::CredentialError;

/// CONNECT protocol level of MQTT 3.1.1, the only one accepted.
pub const PROTOCOL_LEVEL_3_1_1: u8 = 4;
/// Longest remaining-length field (4 bytes, 7 bits each).
const MAX_LENGTH_BYTES: usize = 4;
/// Packet type numbers (fixed header, high nibble).
const TYPE_PUBLISH: u8 = 3;

/// Why bytes from a device were not accepted as a packet. Each one closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The fixed header announces a packet longer than the limit.
    #[error("packet of {size} bytes is over the {max}-byte limit")]
    Oversized {
        /// Announced packet size, fixed header included.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// Not a well-formed MQTT 3.1.1 packet (bad length field, flags, strings, type).
    #[error("malformed MQTT packet: {0}")]
    Malformed(String),
    /// PUBLISH with QoS 1, 2 (or the invalid 3): only QoS 0 is served.
    #[error("PUBLISH with QoS {0} (only QoS 0 is supported)")]
    QosNotSupported(u8),
    /// A packet a device has no business sending here (CONNACK, SUBACK, PUBACK, …).
    #[error("unexpected {0} packet from a device")]
    Unexpected(&'static str),
    /// An outgoing packet could not be encoded (topic not a valid topic name, payload too long).
    #[error("cannot encode MQTT packet: {0}")]
    Encode(String),
}

/// A CONNECT's fields, before any check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Protocol level (4 for MQTT 3.1.1).
    pub protocol_level: u8,
    /// The client id (`GID_…@@@mac_@@@uuid` from the firmware).
    pub client_id: String,
    /// Username, if the flag was set.
    pub username: Option<String>,
    /// Password, if the flag was set.
    pub password: Option<String>,
    /// Keepalive, seconds (0 = none).
    pub keepalive_s: u16,
    /// The clean-session flag (nothing is kept across connections either way).
    pub clean_session: bool,
}

/// One packet from a device that this server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// CONNECT (check it with [`check_connect`], then the credentials).
    Connect(ConnectRequest),
    /// PUBLISH at QoS 0: a JSON message from the device (the topic is not checked, as in the
    /// gateway).
    Publish {
        /// The topic (`device-server` from the firmware).
        topic: String,
        /// The payload (JSON text from the firmware).
        payload: Vec<u8>,
    },
    /// SUBSCRIBE: answer with [`write_suback`] for that many filters.
    Subscribe {
        /// Packet identifier to echo.
        packet_id: u16,
        /// Number of topic filters.
        filters: usize,
    },
    /// UNSUBSCRIBE: answer with [`write_unsuback`].
    Unsubscribe {
        /// Packet identifier to echo.
        packet_id: u16,
    },
    /// PINGREQ: answer with [`write_pingresp`].
    PingReq,
    /// DISCONNECT: the device closes cleanly.
    Disconnect,
}

/// Reads the fixed header at the start of `buf`: the whole packet's length once known, `None`
/// while the header itself is incomplete. A length over `max_bytes` is refused at once.
pub fn packet_len(buf: &[u8], max_bytes: usize) -> Result<Option<usize>, PacketError> {
    let mut remaining: usize = 0;
    for i in 0..MAX_LENGTH_BYTES {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let size = 1 + (i + 1) + remaining;
            if size > max_bytes {
                return Err(PacketError::Oversized {
                    size,
                    max: max_bytes,
                });
            }
            return Ok(Some(size));
        }
    }
    Err(PacketError::Malformed(
        "remaining length longer than 4 bytes".into(),
    ))
}

/// Reads one packet from the start of `buf`: the packet and how many bytes it used, `None` if
/// `buf` does not hold a whole packet yet (read more and call again), or why it is refused.
pub fn read_packet(buf: &[u8], max_bytes: usize) -> Result<Option<(Inbound, usize)>, PacketError> {
    let Some(size) = packet_len(buf, max_bytes)? else {
        return Ok(None);
    };
    let Some(frame) = buf.get(..size) else {
        return Ok(None);
    };
    // QoS is refused from the first byte, before decoding: cheap, and it is counted apart.
    let first = frame.first().copied().unwrap_or_default();
    if first >> 4 == TYPE_PUBLISH {
        let qos = (first >> 1) & 0b11;
        if qos != 0 {
            return Err(PacketError::QosNotSupported(qos));
        }
    }
    let mut reader = frame;
    let packet =
        VariablePacket::decode(&mut reader).map_err(|e| PacketError::Malformed(e.to_string()))?;
    let inbound = match packet {
        VariablePacket::ConnectPacket(c) => Inbound::Connect(ConnectRequest {
            protocol_level: c.protocol_level() as u8,
            client_id: c.client_identifier().to_string(),
            username: c.user_name().map(str::to_string),
            password: c.password().map(str::to_string),
            keepalive_s: c.keep_alive(),
            clean_session: c.clean_session(),
        }),
        VariablePacket::PublishPacket(p) => Inbound::Publish {
            topic: p.topic_name().to_string(),
            payload: p.payload().to_vec(),
        },
        VariablePacket::SubscribePacket(s) => Inbound::Subscribe {
            packet_id: s.packet_identifier(),
            filters: s.subscribes().len(),
        },
        VariablePacket::UnsubscribePacket(u) => Inbound::Unsubscribe {
            packet_id: u.packet_identifier(),
        },
        VariablePacket::PingreqPacket(_) => Inbound::PingReq,
        VariablePacket::DisconnectPacket(_) => Inbound::Disconnect,
        VariablePacket::ConnackPacket(_) => return Err(PacketError::Unexpected("CONNACK")),
        VariablePacket::PubackPacket(_) => return Err(PacketError::Unexpected("PUBACK")),
        VariablePacket::PubrecPacket(_) => return Err(PacketError::Unexpected("PUBREC")),
        VariablePacket::PubrelPacket(_) => return Err(PacketError::Unexpected("PUBREL")),
        VariablePacket::PubcompPacket(_) => return Err(PacketError::Unexpected("PUBCOMP")),
        VariablePacket::SubackPacket(_) => return Err(PacketError::Unexpected("SUBACK")),
        VariablePacket::UnsubackPacket(_) => return Err(PacketError::Unexpected("UNSUBACK")),
        VariablePacket::PingrespPacket(_) => return Err(PacketError::Unexpected("PINGRESP")),
    };
    Ok(Some((inbound, size)))
}

/// CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnackCode {
    /// 0: connection accepted.
    Accepted,
    /// 1: the server does not speak the requested protocol level.
    UnacceptableProtocolVersion,
    /// 2: the client id is not allowed (not `GID_…@@@mac_@@@uuid`).
    IdentifierRejected,
    /// 3: the service is unavailable (full, draining).
    ServerUnavailable,
    /// 4: username or password missing or malformed.
    BadUsernameOrPassword,
    /// 5: the password does not verify (§15.6: the gateway sends 0 then closes; we say 5).
    NotAuthorized,
}

impl ConnackCode {
    /// The wire value.
    pub fn code(self) -> u8 {
        match self {
            ConnackCode::Accepted => 0,
            ConnackCode::UnacceptableProtocolVersion => 1,
            ConnackCode::IdentifierRejected => 2,
            ConnackCode::ServerUnavailable => 3,
            ConnackCode::BadUsernameOrPassword => 4,
            ConnackCode::NotAuthorized => 5,
        }
    }

    /// The refusal for credentials that did not verify.
    pub fn for_credentials(error: &CredentialError) -> ConnackCode {
        match error {
            CredentialError::BadClientId | CredentialError::BadMac | CredentialError::BadPart => {
                ConnackCode::IdentifierRejected
            }
            CredentialError::MissingCredentials | CredentialError::BadUsername => {
                ConnackCode::BadUsernameOrPassword
            }
            CredentialError::WrongPassword | CredentialError::BadKeys => ConnackCode::NotAuthorized,
        }
    }
}

/// Checks a CONNECT's shape (credentials are checked apart): protocol level 4, a non-empty
/// client id, username and password present. The error is the CONNACK to answer before closing.
pub fn check_connect(connect: &ConnectRequest) -> Result<(), ConnackCode> {
    if connect.protocol_level != PROTOCOL_LEVEL_3_1_1 {
        return Err(ConnackCode::UnacceptableProtocolVersion);
    }
    if connect.client_id.is_empty() {
        return Err(ConnackCode::IdentifierRejected);
    }
    if connect.username.is_none() || connect.password.is_none() {
        return Err(ConnackCode::BadUsernameOrPassword);
    }
    Ok(())
}

fn encode(packet: &impl Encodable, out: &mut Vec<u8>) -> Result<(), PacketError> {
    packet
        .encode(out)
        .map_err(|e| PacketError::Encode(e.to_string()))
}

/// Appends a CONNACK (session present = false: nothing is kept across connections).
pub fn write_connack(code: ConnackCode, out: &mut Vec<u8>) -> Result<(), PacketError> {
    let packet = ConnackPacket::new(false, ConnectReturnCode::from_u8(code.code()));
    encode(&packet, out)
}

/// Appends a QoS 0 PUBLISH of `payload` on `topic` (e.g. the device's `devices/p2p/<mac_>`).
pub fn write_publish(topic: &str, payload: &[u8], out: &mut Vec<u8>) -> Result<(), PacketError> {
    let topic = TopicName::new(topic).map_err(|e| PacketError::Encode(e.to_string()))?;
    if payload.len() > 0x0fff_ffff {
        return Err(PacketError::Encode("payload too long".into()));
    }
    let packet = PublishPacket::new(topic, QoSWithPacketIdentifier::Level0, payload);
    encode(&packet, out)
}

/// Appends a SUBACK granting QoS 0 to each of `filters` topic filters.
pub fn write_suback(packet_id: u16, filters: usize, out: &mut Vec<u8>) -> Result<(), PacketError> {
    let codes = vec![SubscribeReturnCode::MaximumQoSLevel0; filters];
    encode(&SubackPacket::new(packet_id, codes), out)
}

/// Appends an UNSUBACK.
pub fn write_unsuback(packet_id: u16, out: &mut Vec<u8>) -> Result<(), PacketError> {
    encode(&UnsubackPacket::new(packet_id), out)
}

/// Appends a PINGRESP.
pub fn write_pingresp(out: &mut Vec<u8>) -> Result<(), PacketError> {
    encode(&PingrespPacket::new(), out)
}

/// How long a device may stay silent: 1.5 × its CONNECT keepalive (MQTT 3.1.1 §3.1.2.10, and the
/// gateway's rule). `None` for keepalive 0 (the session's own idle timeout applies then).
pub fn keepalive_timeout(keepalive_s: u16) -> Option<Duration> {
    (keepalive_s > 0).then(|| Duration::from_millis(u64::from(keepalive_s) * 1500))
}

/// The keepalive deadline of one connection: moved by every packet from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveDeadline {
    timeout: Option<Duration>,
    last_packet: Instant,
}

impl KeepaliveDeadline {
    /// The deadline for a CONNECT with this keepalive, received at `now`.
    pub fn new(keepalive_s: u16, now: Instant) -> KeepaliveDeadline {
        KeepaliveDeadline {
            timeout: keepalive_timeout(keepalive_s),
            last_packet: now,
        }
    }

    /// A packet (any type) arrived at `now`.
    pub fn touch(&mut self, now: Instant) {
        self.last_packet = self.last_packet.max(now);
    }

    /// When the device counts as gone if nothing arrives before; `None` = never (keepalive 0).
    pub fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| self.last_packet + t)
    }

    /// Whether the device has been silent too long at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

/// What the MQTT listener refused, by reason (per shard; exported as metrics by the driver).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketCounters {
    /// Packets over `mqtt.max_packet_bytes`.
    pub oversized: u64,
    /// Malformed packets.
    pub malformed: u64,
    /// PUBLISH with QoS > 0.
    pub qos_refused: u64,
    /// Packets only a server sends (CONNACK, SUBACK, …) or QoS acknowledgements.
    pub unexpected: u64,
    /// CONNECTs refused: wrong protocol level.
    pub refused_protocol: u64,
    /// CONNECTs refused: client id rejected.
    pub refused_identifier: u64,
    /// CONNECTs refused: username or password missing or malformed.
    pub refused_credentials: u64,
    /// CONNECTs refused: password did not verify.
    pub refused_not_authorized: u64,
    /// CONNECTs refused: server unavailable.
    pub refused_unavailable: u64,
    /// Connections closed for keepalive expiry.
    pub keepalive_expired: u64,
}

impl PacketCounters {
    /// Counts one refused packet under its reason.
    pub fn count(&mut self, error: &PacketError) {
        let slot = match error {
            PacketError::Oversized { .. } => &mut self.oversized,
            PacketError::Malformed(_) | PacketError::Encode(_) => &mut self.malformed,
            PacketError::QosNotSupported(_) => &mut self.qos_refused,
            PacketError::Unexpected(_) => &mut self.unexpected,
        };
        *slot += 1;
    }

    /// Counts one refused CONNECT under its CONNACK code (`Accepted` counts nothing).
    pub fn count_refusal(&mut self, code: ConnackCode) {
        let slot = match code {
            ConnackCode::Accepted => return,
            ConnackCode::UnacceptableProtocolVersion => &mut self.refused_protocol,
            ConnackCode::IdentifierRejected => &mut self.refused_identifier,
            ConnackCode::BadUsernameOrPassword => &mut self.refused_credentials,
            ConnackCode::NotAuthorized => &mut self.refused_not_authorized,
            ConnackCode::ServerUnavailable => &mut self.refused_unavailable,
        };
        *slot += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt::packet::{ConnectPacket, SubscribePacket};
    use mqtt::{QualityOfService, TopicFilter};
    use proptest::prelude::*;

    const MAX: usize = 8192;

    fn firmware_connect() -> Vec<u8> {
        let mut c = ConnectPacket::new("GID_test@@@11_22_33_44_55_66@@@uuid");
        c.set_user_name(Some("eyJpcCI6IjIyMi4yMjIuMjIyLjIyMiJ9".into()));
        c.set_password(Some("GjEBPab7eOITlsgbrCfZ68Q9DytiMe9JXF1rLKMCDLA=".into()));
        c.set_keep_alive(240);
        c.set_clean_session(true);
        let mut out = Vec::new();
        c.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn firmware_connect_is_read_and_passes_the_shape_check() {
        let bytes = firmware_connect();
        let (packet, used) = read_packet(&bytes, MAX).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        let Inbound::Connect(connect) = packet else {
            panic!("{packet:?}")
        };
        assert_eq!(connect.protocol_level, 4);
        assert_eq!(connect.client_id, "GID_test@@@11_22_33_44_55_66@@@uuid");
        assert_eq!(connect.keepalive_s, 240);
        assert_eq!(
            connect.password.as_deref(),
            Some("GjEBPab7eOITlsgbrCfZ68Q9DytiMe9JXF1rLKMCDLA=")
        );
        assert_eq!(check_connect(&connect), Ok(()));
    }

    #[test]
    fn connect_shape_refusals_carry_their_connack_code() {
        let base = ConnectRequest {
            protocol_level: 4,
            client_id: "c".into(),
            username: Some("u".into()),
            password: Some("p".into()),
            keepalive_s: 60,
            clean_session: true,
        };
        let mut v31 = base.clone();
        v31.protocol_level = 3;
        assert_eq!(
            check_connect(&v31),
            Err(ConnackCode::UnacceptableProtocolVersion)
        );
        let mut anon = base.clone();
        anon.client_id.clear();
        assert_eq!(check_connect(&anon), Err(ConnackCode::IdentifierRejected));
        let mut nopass = base.clone();
        nopass.password = None;
        assert_eq!(
            check_connect(&nopass),
            Err(ConnackCode::BadUsernameOrPassword)
        );
        assert_eq!(
            ConnackCode::for_credentials(&CredentialError::WrongPassword),
            ConnackCode::NotAuthorized
        );
        assert_eq!(
            ConnackCode::for_credentials(&CredentialError::BadClientId),
            ConnackCode::IdentifierRejected
        );
    }

    #[test]
    fn mqtt_3_1_connect_decodes_and_is_refused_with_code_1() {
        let c = ConnectPacket::with_level("MQIsdp", "id", 3).unwrap();
        let mut bytes = Vec::new();
        c.encode(&mut bytes).unwrap();
        let Some((Inbound::Connect(connect), _)) = read_packet(&bytes, MAX).unwrap() else {
            panic!("not a CONNECT")
        };
        assert_eq!(
            check_connect(&connect),
            Err(ConnackCode::UnacceptableProtocolVersion)
        );
    }

    #[test]
    fn partial_packet_needs_more_and_two_packets_are_read_in_turn() {
        let mut bytes = firmware_connect();
        for cut in 0..bytes.len() {
            assert_eq!(read_packet(&bytes[..cut], MAX), Ok(None), "cut at {cut}");
        }
        bytes.extend_from_slice(&[0xc0, 0x00]); // PINGREQ
        let (_, used) = read_packet(&bytes, MAX).unwrap().unwrap();
        assert_eq!(
            read_packet(&bytes[used..], MAX),
            Ok(Some((Inbound::PingReq, 2)))
        );
    }

    #[test]
    fn qos0_publish_round_trips_and_qos_above_0_is_refused() {
        let mut out = Vec::new();
        write_publish("devices/p2p/aa_bb", br#"{"type":"hello"}"#, &mut out).unwrap();
        let (packet, _) = read_packet(&out, MAX).unwrap().unwrap();
        assert_eq!(
            packet,
            Inbound::Publish {
                topic: "devices/p2p/aa_bb".into(),
                payload: br#"{"type":"hello"}"#.to_vec()
            }
        );
        for qos in [1u8, 2, 3] {
            let mut bytes = out.clone();
            bytes[0] |= qos << 1;
            assert_eq!(
                read_packet(&bytes, MAX),
                Err(PacketError::QosNotSupported(qos))
            );
        }
        assert!(matches!(
            write_publish("bad/#", b"x", &mut Vec::new()),
            Err(PacketError::Encode(_))
        ));
    }

    #[test]
    fn oversized_packet_is_refused_from_its_header_alone() {
        // PUBLISH announcing 10 000 bytes: refused with only the 3-byte header in hand.
        let header = [0x30, 0x90, 0x4e];
        assert_eq!(
            read_packet(&header, MAX),
            Err(PacketError::Oversized {
                size: 10_003,
                max: MAX
            })
        );
        // The largest remaining length MQTT allows (268 435 455), and a fifth length byte.
        assert!(matches!(
            read_packet(&[0x30, 0xff, 0xff, 0xff, 0x7f], MAX),
            Err(PacketError::Oversized { .. })
        ));
        assert!(matches!(
            read_packet(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], MAX),
            Err(PacketError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_and_server_only_packets_are_refused() {
        // Reserved type 0, PINGREQ with flags, CONNECT with a truncated body.
        for bytes in [&[0x00, 0x00][..], &[0xc1, 0x00], &[0x10, 0x02, 0x00, 0x04]] {
            assert!(
                matches!(read_packet(bytes, MAX), Err(PacketError::Malformed(_))),
                "{bytes:?}"
            );
        }
        let mut connack = Vec::new();
        write_connack(ConnackCode::Accepted, &mut connack).unwrap();
        assert_eq!(
            read_packet(&connack, MAX),
            Err(PacketError::Unexpected("CONNACK"))
        );
        assert_eq!(
            read_packet(&[0x40, 0x02, 0x00, 0x01], MAX),
            Err(PacketError::Unexpected("PUBACK"))
        );
    }

    #[test]
    fn replies_have_their_exact_wire_bytes() {
        let mut out = Vec::new();
        write_connack(ConnackCode::NotAuthorized, &mut out).unwrap();
        assert_eq!(out, [0x20, 0x02, 0x00, 0x05]);
        out.clear();
        write_connack(ConnackCode::Accepted, &mut out).unwrap();
        assert_eq!(out, [0x20, 0x02, 0x00, 0x00]);
        out.clear();
        write_pingresp(&mut out).unwrap();
        assert_eq!(out, [0xd0, 0x00]);
        out.clear();
        write_suback(7, 2, &mut out).unwrap();
        assert_eq!(out, [0x90, 0x04, 0x00, 0x07, 0x00, 0x00]);
        out.clear();
        write_unsuback(7, &mut out).unwrap();
        assert_eq!(out, [0xb0, 0x02, 0x00, 0x07]);
    }

    #[test]
    fn subscribe_is_read_for_a_suback() {
        let filter = TopicFilter::new("devices/p2p/aa_bb").unwrap();
        let sub = SubscribePacket::new(9, vec![(filter, QualityOfService::Level1)]);
        let mut bytes = Vec::new();
        sub.encode(&mut bytes).unwrap();
        assert_eq!(
            read_packet(&bytes, MAX).unwrap().unwrap().0,
            Inbound::Subscribe {
                packet_id: 9,
                filters: 1
            }
        );
        assert_eq!(
            read_packet(&[0xe0, 0x00], MAX).unwrap().unwrap().0,
            Inbound::Disconnect
        );
    }

    #[test]
    fn keepalive_deadline_is_one_and_a_half_keepalives_after_the_last_packet() {
        assert_eq!(keepalive_timeout(240), Some(Duration::from_secs(360)));
        assert_eq!(keepalive_timeout(0), None);
        let t0 = Instant::now();
        let mut k = KeepaliveDeadline::new(10, t0);
        assert_eq!(k.deadline(), Some(t0 + Duration::from_secs(15)));
        assert!(!k.expired(t0 + Duration::from_millis(14_999)));
        assert!(k.expired(t0 + Duration::from_secs(15)));
        k.touch(t0 + Duration::from_secs(10));
        assert!(!k.expired(t0 + Duration::from_secs(20)));
        assert!(k.expired(t0 + Duration::from_secs(25)));
        assert!(!KeepaliveDeadline::new(0, t0).expired(t0 + Duration::from_secs(1 << 20)));
    }

    #[test]
    fn counters_sort_refusals_by_reason() {
        let mut c = PacketCounters::default();
        c.count(&PacketError::QosNotSupported(1));
        c.count(&PacketError::Oversized { size: 1, max: 0 });
        c.count(&PacketError::Malformed("x".into()));
        c.count_refusal(ConnackCode::NotAuthorized);
        c.count_refusal(ConnackCode::Accepted);
        assert_eq!(
            (
                c.qos_refused,
                c.oversized,
                c.malformed,
                c.refused_not_authorized
            ),
            (1, 1, 1, 1)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut rest = &bytes[..];
            // Read packets until the input is used up, needs more, or is refused.
            while let Ok(Some((_, used))) = read_packet(rest, 512) {
                prop_assert!(used > 0 && used <= rest.len());
                rest = &rest[used..];
            }
        }

        #[test]
        fn random_bodies_behind_valid_headers_never_panic(
            kind in 1u8..15,
            flags in 0u8..16,
            body in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            // A one-byte remaining length that matches the body: the codec sees every body.
            let mut bytes = vec![(kind << 4) | flags, body.len() as u8];
            bytes.extend_from_slice(&body);
            let _ = read_packet(&bytes, MAX);
        }
    }
}
