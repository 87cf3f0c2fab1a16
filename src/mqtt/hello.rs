//! The hello exchange over MQTT (spec §3.1, §15.2): checking the device's hello and building the
//! reply that opens the UDP audio channel.
//!
//! The device sends the usual hello with `"transport":"udp","version":3`; the gateway closes on
//! any other version. The reply must carry `transport: "udp"` and `udp{server, port, encryption,
//! key, nonce}`; the firmware ignores a hello without a string `server`, a `port` in 1..65535
//! and `key`/`nonce` that decode to 16 bytes each, and then times out after 10 s. It reads
//! `encryption` nowhere, but the gateway sends `"aes-128-ctr"` and so do we. Key and nonce are
//! lower-case hex (Node's `toString('hex')`; the firmware's decoder takes either case). Every
//! hello gets a fresh random key; the nonce carries the connection's id (see `udp::nonce_for`).
//! Replies go to `devices/p2p/<mac_>` ([`p2p_topic`]).

use serde_json::{json, Map, Value};

use super::udp::HEADER_LEN;

/// The `udp.encryption` value.
pub const ENCRYPTION: &str = "aes-128-ctr";
/// The hello `transport` of the MQTT + UDP transport.
pub const TRANSPORT_UDP: &str = "udp";
/// The binary protocol version the firmware announces (and the gateway requires) over MQTT.
pub const MQTT_HELLO_VERSION: u64 = 3;

/// Prefix of the per-device reply topic; the MAC with `_` for `:` follows.
pub const P2P_TOPIC_PREFIX: &str = "devices/p2p/";

/// `devices/p2p/<mac with '_' for ':'>`: where every message to this device is published. The
/// firmware never subscribes; the gateway derives the topic from the `client_id`'s MAC part.
pub fn p2p_topic(mac: &str) -> String {
    format!("{P2P_TOPIC_PREFIX}{}", mac.replace(':', "_"))
}

/// Why a device's hello over MQTT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Not a JSON object with `"type":"hello"`.
    #[error("not a hello message")]
    NotHello,
    /// `transport` is not `"udp"`.
    #[error("hello over MQTT must have transport \"udp\"")]
    WrongTransport,
    /// `version` is not 3.
    #[error("hello over MQTT must have version 3")]
    WrongVersion,
}

/// Checks that a device's hello asks for the UDP audio channel (`transport` "udp", `version` 3).
pub fn check_device_hello(hello: &Value) -> Result<(), HelloError> {
    if hello.get("type").and_then(Value::as_str) != Some("hello") {
        return Err(HelloError::NotHello);
    }
    if hello.get("transport").and_then(Value::as_str) != Some(TRANSPORT_UDP) {
        return Err(HelloError::WrongTransport);
    }
    if hello.get("version").and_then(Value::as_u64) != Some(MQTT_HELLO_VERSION) {
        return Err(HelloError::WrongVersion);
    }
    Ok(())
}

/// Where and how the device sends its audio: what goes into the reply's `udp` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpChannel {
    /// Host or address the device sends datagrams to (this shard's public UDP address).
    pub server: String,
    /// This shard's UDP port (1..65535).
    pub port: u16,
    /// The fresh AES-128 key of this hello.
    pub key: [u8; HEADER_LEN],
    /// The nonce (header template with the connection id).
    pub nonce: [u8; HEADER_LEN],
}

impl UdpChannel {
    /// The channel as the session's hello reply carries it (key and nonce in hex).
    pub fn params(&self) -> crate::protocol::UdpParams {
        crate::protocol::UdpParams {
            server: self.server.clone(),
            port: self.port,
            key: hex(&self.key),
            nonce: hex(&self.nonce),
        }
    }

    /// The hello's `udp` object: `{server, port, encryption, key, nonce}`, key and nonce as
    /// 32 lower-case hex characters.
    pub fn to_json(&self) -> Value {
        json!({
            "server": self.server,
            "port": self.port,
            "encryption": ENCRYPTION,
            "key": hex(&self.key),
            "nonce": hex(&self.nonce),
        })
    }
}

/// Turns a hello reply built for any transport (`type`, `session_id`, `audio_params`, …) into
/// the MQTT one: `transport` "udp", `version` 3 and the `udp` object; other keys are kept.
pub fn make_udp_hello(reply: &mut Map<String, Value>, channel: &UdpChannel) {
    reply.insert("type".into(), "hello".into());
    reply.insert("version".into(), MQTT_HELLO_VERSION.into());
    reply.insert("transport".into(), TRANSPORT_UDP.into());
    reply.insert("udp".into(), channel.to_json());
}

/// The complete hello reply over MQTT (§15.2).
pub fn udp_hello_reply(session_id: &str, audio_params: &Value, channel: &UdpChannel) -> Value {
    let mut reply = Map::new();
    reply.insert("session_id".into(), session_id.into());
    reply.insert("audio_params".into(), audio_params.clone());
    make_udp_hello(&mut reply, channel);
    Value::Object(reply)
}

/// A fresh random AES-128 key from the operating system's generator.
pub fn fresh_key() -> Result<[u8; HEADER_LEN], getrandom::Error> {
    let mut key = [0u8; HEADER_LEN];
    getrandom::fill(&mut key)?;
    Ok(key)
}

/// A random connection id candidate (see `udp::UdpPeerTable::unused_connection_id`).
pub fn random_u32() -> Result<u32, getrandom::Error> {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::udp::nonce_for;

    fn channel() -> UdpChannel {
        UdpChannel {
            server: "203.0.113.5".into(),
            port: 8884,
            key: [0xab; 16],
            nonce: nonce_for(0x0102_0304),
        }
    }

    #[test]
    fn reply_has_the_gateway_shape() {
        let audio =
            json!({"format": "opus", "sample_rate": 24000, "channels": 1, "frame_duration": 60});
        let reply = udp_hello_reply("s-1", &audio, &channel());
        assert_eq!(
            reply,
            json!({
                "type": "hello",
                "version": 3,
                "transport": "udp",
                "session_id": "s-1",
                "audio_params": audio,
                "udp": {
                    "server": "203.0.113.5",
                    "port": 8884,
                    "encryption": "aes-128-ctr",
                    "key": "abababababababababababababababab",
                    "nonce": "01000000010203040000000000000000",
                },
            })
        );
    }

    #[test]
    fn a_websocket_style_reply_becomes_a_udp_one() {
        let mut reply = json!({"type": "hello", "transport": "websocket", "version": 1,
            "session_id": "x", "audio_params": {"sample_rate": 24000}})
        .as_object()
        .cloned()
        .unwrap();
        make_udp_hello(&mut reply, &channel());
        assert_eq!(reply["transport"], "udp");
        assert_eq!(reply["version"], 3);
        assert_eq!(reply["session_id"], "x");
        assert_eq!(reply["udp"]["key"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn device_hello_must_ask_for_udp_version_3() {
        let firmware = json!({"type":"hello","version":3,"transport":"udp",
            "features":{"mcp":true},"audio_params":{"format":"opus","sample_rate":16000}});
        assert_eq!(check_device_hello(&firmware), Ok(()));
        let mut v2 = firmware.clone();
        v2["version"] = 2.into();
        assert_eq!(check_device_hello(&v2), Err(HelloError::WrongVersion));
        let mut ws = firmware.clone();
        ws["transport"] = "websocket".into();
        assert_eq!(check_device_hello(&ws), Err(HelloError::WrongTransport));
        assert_eq!(
            check_device_hello(&json!({"type":"listen"})),
            Err(HelloError::NotHello)
        );
        assert_eq!(check_device_hello(&json!([1])), Err(HelloError::NotHello));
    }

    #[test]
    fn p2p_topic_uses_underscores() {
        assert_eq!(
            p2p_topic("aa:bb:cc:dd:ee:ff"),
            "devices/p2p/aa_bb_cc_dd_ee_ff"
        );
    }

    #[test]
    fn fresh_keys_differ() {
        assert_ne!(fresh_key().unwrap(), fresh_key().unwrap());
    }

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
