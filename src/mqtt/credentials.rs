//! MQTT credentials as the stock gateway issues and checks them (spec §14.2, §14.3, §15.1, §15.6).
//!
//! The OTA answer's `mqtt` section hands the device `client_id`, `username` and `password`, and
//! the device sends them back unchanged in its CONNECT:
//! - `client_id` = `GID_<board>@@@<mac with '_'>@@@<uuid>`: exactly three `@@@` parts. The
//!   second is the device's MAC and names its reply topic (`devices/p2p/<mac_>`).
//! - `username` = standard base64 of a JSON object (the gateway overwrites its `ip` with the
//!   peer address; nothing else reads it).
//! - `password` = standard base64 (with padding) of HMAC-SHA256(signature key, `client_id + "|"
//!   + username`).
//!
//! The password is stateless, so any instance with the key accepts any device. Up to two keys
//! verify at once ([`SignatureKeys`]): the first signs new credentials, the second still admits
//! devices provisioned with the previous key while the fleet is re-provisioned. The comparison is
//! constant-time (`Mac::verify_slice`). Unlike the gateway we check the MAC's shape: the MAC part
//! becomes the device id and the reply topic, so it has to be one.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use super::hello::p2p_topic;

type HmacSha256 = Hmac<Sha256>;

/// Separator between the three `client_id` parts.
pub const CLIENT_ID_SEPARATOR: &str = "@@@";
/// Prefix of the group part the gateway and the Python OTA put before the board name.
pub const GROUP_PREFIX: &str = "GID_";
/// The topic the firmware publishes every JSON message to (the gateway never checks it).
pub const PUBLISH_TOPIC: &str = "device-server";
/// Most signature keys verified at once (current + previous, for rotation).
pub const MAX_SIGNATURE_KEYS: usize = 2;

/// `username` is decoded like Node's `Buffer.from(s, "base64")`, which the gateway uses: padding
/// optional. The password is not decoded this way (see [`SignatureKeys::verify`]).
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why credentials were refused or could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// `client_id` does not have exactly three non-empty `@@@` parts.
    #[error("client_id must be <group>@@@<mac_>@@@<uuid>")]
    BadClientId,
    /// The MAC part (or a MAC given to the issuer) is not six hex byte pairs.
    #[error("not a MAC address (aa_bb_cc_dd_ee_ff or aa:bb:cc:dd:ee:ff)")]
    BadMac,
    /// CONNECT carried no username, or no password.
    #[error("username and password are required")]
    MissingCredentials,
    /// `username` is not base64 of a JSON object.
    #[error("username is not base64 of a JSON object")]
    BadUsername,
    /// No configured key produced this password for this client id and username.
    #[error("password does not match")]
    WrongPassword,
    /// No signature key, more than [`MAX_SIGNATURE_KEYS`], or an empty one.
    #[error("need 1 or 2 non-empty signature keys")]
    BadKeys,
    /// A board name or uuid the issuer cannot put in a `client_id` (contains `@`).
    #[error("board and uuid must not contain '@'")]
    BadPart,
}

/// The three parts of a `client_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    /// First part, e.g. `GID_bread-compact-wifi` (not interpreted).
    pub group: String,
    /// The MAC, lower case with colons (`aa:bb:cc:dd:ee:ff`): the device id.
    pub mac: String,
    /// Third part: the device's uuid (`Client-Id` at OTA time; not interpreted).
    pub uuid: String,
}

impl ClientId {
    /// Splits and checks a `client_id` (three non-empty `@@@` parts, the second a MAC).
    pub fn parse(client_id: &str) -> Result<ClientId, CredentialError> {
        let mut parts = client_id.split(CLIENT_ID_SEPARATOR);
        let (Some(group), Some(mac), Some(uuid), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CredentialError::BadClientId);
        };
        if group.is_empty() || uuid.is_empty() {
            return Err(CredentialError::BadClientId);
        }
        Ok(ClientId {
            group: group.to_string(),
            mac: normalize_mac(mac)?,
            uuid: uuid.to_string(),
        })
    }

    /// The topic the server publishes this device's replies on: `devices/p2p/<mac with _>`.
    pub fn reply_topic(&self) -> String {
        p2p_topic(&self.mac)
    }
}

/// A MAC written with `:`, `_` or `-` between six hex pairs, as lower case with colons.
pub fn normalize_mac(mac: &str) -> Result<String, CredentialError> {
    let pairs: Vec<&str> = mac.split([':', '_', '-']).collect();
    let well_formed = pairs.len() == 6
        && pairs
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(CredentialError::BadMac);
    }
    Ok(pairs.join(":").to_ascii_lowercase())
}

/// Decodes a `username`: base64 (padding optional) of a JSON object.
pub fn parse_username(
    username: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, CredentialError> {
    let bytes = LENIENT_BASE64
        .decode(username)
        .map_err(|_| CredentialError::BadUsername)?;
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(CredentialError::BadUsername),
    }
}

/// A device whose CONNECT credentials verified.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCredentials {
    /// The parsed `client_id`.
    pub client_id: ClientId,
    /// The decoded `username` object (informational: the gateway only stores `ip` in it).
    pub user_data: serde_json::Map<String, serde_json::Value>,
    /// Which key verified: 0 = the current one, 1 = the previous one (rotation in progress).
    pub key_index: usize,
}

/// The HMAC keys that sign and verify MQTT passwords: the first signs, all verify.
#[derive(Clone)]
pub struct SignatureKeys {
    /// One keyed HMAC state per key, cloned per use (cheaper than re-keying).
    keys: Vec<HmacSha256>,
}

impl std::fmt::Debug for SignatureKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("SignatureKeys")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl SignatureKeys {
    /// One or two non-empty keys (UTF-8 bytes, as the gateway's `MQTT_SIGNATURE_KEY`).
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Result<SignatureKeys, CredentialError> {
        if keys.is_empty()
            || keys.len() > MAX_SIGNATURE_KEYS
            || keys.iter().any(|k| k.as_ref().is_empty())
        {
            return Err(CredentialError::BadKeys);
        }
        let keys = keys
            .iter()
            .map(|k| HmacSha256::new_from_slice(k.as_ref().as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| CredentialError::BadKeys)?;
        Ok(SignatureKeys { keys })
    }

    fn mac(key: &HmacSha256, client_id: &str, username: &str) -> HmacSha256 {
        let mut mac = key.clone();
        mac.update(client_id.as_bytes());
        mac.update(b"|");
        mac.update(username.as_bytes());
        mac
    }

    /// The password for these credentials, signed with the first key.
    pub fn sign(&self, client_id: &str, username: &str) -> String {
        // `new` guarantees at least one key.
        let Some(first) = self.keys.first() else {
            return String::new();
        };
        STANDARD.encode(
            Self::mac(first, client_id, username)
                .finalize()
                .into_bytes(),
        )
    }

    /// Which key (0 or 1) signed `password` for these credentials, if any. The password must be
    /// canonical padded base64, as the gateway compares strings; the tag is compared in constant
    /// time.
    pub fn verify(&self, client_id: &str, username: &str, password: &[u8]) -> Option<usize> {
        let tag = STANDARD.decode(password).ok()?;
        self.keys.iter().position(|key| {
            Self::mac(key, client_id, username)
                .verify_slice(&tag)
                .is_ok()
        })
    }

    /// Checks a CONNECT's credentials: client id shape, username, then the password.
    pub fn verify_connect(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<DeviceCredentials, CredentialError> {
        let (Some(username), Some(password)) = (username, password) else {
            return Err(CredentialError::MissingCredentials);
        };
        let parsed = ClientId::parse(client_id)?;
        let user_data = parse_username(username)?;
        let key_index = self
            .verify(client_id, username, password)
            .ok_or(CredentialError::WrongPassword)?;
        Ok(DeviceCredentials {
            client_id: parsed,
            user_data,
            key_index,
        })
    }

    /// The OTA answer's `mqtt` section for one device (§14.2): the firmware stores every field
    /// in NVS and reads `endpoint` (`host[:port]`, default port 8883), `client_id`, `username`,
    /// `password`, `keepalive` and `publish_topic`. `subscribe_topic` is stored but unused; the
    /// Python OTA sends the p2p topic, and old firmware fails without the key.
    ///
    /// `board` is the board type (`board.type` in the OTA body); like the Python OTA, `:` and
    /// spaces become `_`. An empty `uuid` (no `Client-Id`) is replaced by the MAC, as the Python
    /// OTA does. `user_data` becomes the base64 `username`.
    pub fn issue(&self, device: &IssueRequest<'_>) -> Result<MqttOtaSection, CredentialError> {
        let mac = normalize_mac(device.mac)?;
        let mac_ = mac.replace(':', "_");
        let board: String = device
            .board
            .chars()
            .map(|c| if c == ':' || c == ' ' { '_' } else { c })
            .collect();
        let uuid = if device.uuid.is_empty() {
            mac_.as_str()
        } else {
            device.uuid
        };
        if board.contains('@') || uuid.contains('@') {
            return Err(CredentialError::BadPart);
        }
        let client_id = format!("{GROUP_PREFIX}{board}@@@{mac_}@@@{uuid}");
        let user_json = serde_json::Value::Object(device.user_data.clone()).to_string();
        let username = STANDARD.encode(user_json);
        let password = self.sign(&client_id, &username);
        Ok(MqttOtaSection {
            endpoint: device.endpoint.to_string(),
            client_id,
            username,
            password,
            keepalive: device.keepalive_s,
            publish_topic: PUBLISH_TOPIC.to_string(),
            subscribe_topic: p2p_topic(&mac),
        })
    }
}

/// What the issuer needs to know about one device.
#[derive(Debug, Clone)]
pub struct IssueRequest<'a> {
    /// `host:port` of this server's MQTT listener as devices reach it.
    pub endpoint: &'a str,
    /// Board type from the OTA body (`board.type`).
    pub board: &'a str,
    /// The device's MAC (`Device-Id`).
    pub mac: &'a str,
    /// The device's uuid (`Client-Id`); empty = use the MAC.
    pub uuid: &'a str,
    /// The JSON object encoded as `username`, e.g. `{"ip": "<peer address>"}`.
    pub user_data: &'a serde_json::Map<String, serde_json::Value>,
    /// Keepalive the device should use, seconds (its default without one is 240).
    pub keepalive_s: u16,
}

/// The OTA answer's `mqtt` object (spec §14.2); serialises with the firmware's key names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MqttOtaSection {
    /// `host:port` of the MQTT listener.
    pub endpoint: String,
    /// `GID_<board>@@@<mac_>@@@<uuid>`.
    pub client_id: String,
    /// Base64 of the user-data JSON object.
    pub username: String,
    /// Base64 HMAC-SHA256 of `client_id|username`.
    pub password: String,
    /// Keepalive, seconds.
    pub keepalive: u16,
    /// Where the device publishes (`device-server`).
    pub publish_topic: String,
    /// Stored but unused by the firmware; the p2p topic.
    pub subscribe_topic: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed independently with Python's hmac/hashlib/base64 in a one-off command:
    //   u = base64.b64encode(b'{"ip":"222.222.222.222"}')
    //   base64.b64encode(hmac.new(key, (cid + "|" + u).encode(), hashlib.sha256).digest())
    const CLIENT_ID: &str = "GID_test@@@11_22_33_44_55_66@@@36c98363-3656-43cb-a00f-8bced2391a90";
    const USERNAME: &str = "eyJpcCI6IjIyMi4yMjIuMjIyLjIyMiJ9";
    const PASSWORD_KEY_1: &str = "GjEBPab7eOITlsgbrCfZ68Q9DytiMe9JXF1rLKMCDLA=";
    const PASSWORD_KEY_2: &str = "TPGAccNKQvkLBUbCOF1+RKTDh58iZo5nuPhxdOx1ZXs=";

    fn keys() -> SignatureKeys {
        SignatureKeys::new(&["test-signature-key", "next-key"]).unwrap()
    }

    #[test]
    fn client_id_splits_into_group_mac_and_uuid() {
        let id = ClientId::parse(CLIENT_ID).unwrap();
        assert_eq!(id.group, "GID_test");
        assert_eq!(id.mac, "11:22:33:44:55:66");
        assert_eq!(id.uuid, "36c98363-3656-43cb-a00f-8bced2391a90");
        assert_eq!(id.reply_topic(), "devices/p2p/11_22_33_44_55_66");
    }

    #[test]
    fn client_id_without_three_parts_or_a_mac_is_refused() {
        for bad in [
            "",
            "GID_x@@@aa_bb_cc_dd_ee_ff",
            "GID_x@@@aa_bb_cc_dd_ee_ff@@@u@@@v",
            "@@@aa_bb_cc_dd_ee_ff@@@u",
            "GID_x@@@aa_bb_cc_dd_ee_ff@@@",
        ] {
            assert_eq!(
                ClientId::parse(bad),
                Err(CredentialError::BadClientId),
                "{bad}"
            );
        }
        for bad in ["GID_x@@@aabbccddeeff@@@u", "GID_x@@@aa_bb_cc_dd_ee_gg@@@u"] {
            assert_eq!(ClientId::parse(bad), Err(CredentialError::BadMac), "{bad}");
        }
    }

    #[test]
    fn password_from_python_verifies_with_either_key() {
        let k = keys();
        assert_eq!(
            k.verify(CLIENT_ID, USERNAME, PASSWORD_KEY_1.as_bytes()),
            Some(0)
        );
        assert_eq!(
            k.verify(CLIENT_ID, USERNAME, PASSWORD_KEY_2.as_bytes()),
            Some(1)
        );
        assert_eq!(k.sign(CLIENT_ID, USERNAME), PASSWORD_KEY_1);
        let only_new = SignatureKeys::new(&["next-key"]).unwrap();
        assert_eq!(
            only_new.verify(CLIENT_ID, USERNAME, PASSWORD_KEY_1.as_bytes()),
            None
        );
    }

    #[test]
    fn wrong_or_malformed_passwords_are_refused() {
        let k = keys();
        let unpadded = PASSWORD_KEY_1.trim_end_matches('=');
        for bad in [
            "",
            unpadded,
            "GjEBPab7eOITlsgbrCfZ68Q9DytiMe9JXF1rLKMCDLB=",
            "not base64 at all",
        ] {
            assert_eq!(k.verify(CLIENT_ID, USERNAME, bad.as_bytes()), None, "{bad}");
        }
        // The signature covers the client id: another device's id does not verify.
        let other = CLIENT_ID.replace("11_22", "11_23");
        assert_eq!(
            k.verify_connect(&other, Some(USERNAME), Some(PASSWORD_KEY_1.as_bytes())),
            Err(CredentialError::WrongPassword)
        );
    }

    #[test]
    fn connect_credentials_verify_and_name_the_device() {
        let device = keys()
            .verify_connect(CLIENT_ID, Some(USERNAME), Some(PASSWORD_KEY_2.as_bytes()))
            .unwrap();
        assert_eq!(device.client_id.mac, "11:22:33:44:55:66");
        assert_eq!(device.user_data["ip"], "222.222.222.222");
        assert_eq!(device.key_index, 1);
        assert_eq!(
            keys().verify_connect(CLIENT_ID, None, Some(b"x")),
            Err(CredentialError::MissingCredentials)
        );
        assert_eq!(
            keys().verify_connect(CLIENT_ID, Some("bm90IGpzb24="), Some(b"x")),
            Err(CredentialError::BadUsername)
        );
    }

    #[test]
    fn username_is_lenient_base64_of_a_json_object() {
        assert_eq!(parse_username(USERNAME).unwrap()["ip"], "222.222.222.222");
        // {"ip":"unknown"} without its padding, as Node accepts it.
        assert!(parse_username("eyJpcCI6InVua25vd24ifQ").is_ok());
        // A JSON string, not an object.
        assert_eq!(
            parse_username("IngiCg=="),
            Err(CredentialError::BadUsername)
        );
        assert_eq!(parse_username("%%%"), Err(CredentialError::BadUsername));
    }

    #[test]
    fn issued_section_matches_python_and_verifies() {
        // Python: cid = "GID_bread-compact-wifi@@@aa_bb_cc_dd_ee_ff@@@0b7e2f7c-1234-4abc-9def-001122334455",
        // u = base64(b'{"ip":"192.0.2.7"}'), password = base64(hmac(b"k1", cid|u, sha256)).
        let keys = SignatureKeys::new(&["k1"]).unwrap();
        let mut user = serde_json::Map::new();
        user.insert("ip".into(), "192.0.2.7".into());
        let section = keys
            .issue(&IssueRequest {
                endpoint: "mqtt.example.com:1883",
                board: "bread-compact-wifi",
                mac: "AA:BB:CC:DD:EE:FF",
                uuid: "0b7e2f7c-1234-4abc-9def-001122334455",
                user_data: &user,
                keepalive_s: 240,
            })
            .unwrap();
        assert_eq!(
            section.client_id,
            "GID_bread-compact-wifi@@@aa_bb_cc_dd_ee_ff@@@0b7e2f7c-1234-4abc-9def-001122334455"
        );
        assert_eq!(section.username, "eyJpcCI6IjE5Mi4wLjIuNyJ9");
        assert_eq!(
            section.password,
            "ak3aATFKwMWZeCoac/VeZXYxDU8+PwwPSs96NMu5pC4="
        );
        assert_eq!(section.publish_topic, "device-server");
        assert_eq!(section.subscribe_topic, "devices/p2p/aa_bb_cc_dd_ee_ff");
        let json = serde_json::to_value(&section).unwrap();
        for key in [
            "endpoint",
            "client_id",
            "username",
            "password",
            "keepalive",
            "publish_topic",
            "subscribe_topic",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        let device = keys
            .verify_connect(
                &section.client_id,
                Some(&section.username),
                Some(section.password.as_bytes()),
            )
            .unwrap();
        assert_eq!(device.client_id.mac, "aa:bb:cc:dd:ee:ff");
    }

    #[test]
    fn issuer_sanitises_the_board_and_falls_back_to_the_mac() {
        let keys = SignatureKeys::new(&["k1"]).unwrap();
        let user = serde_json::Map::new();
        let mut req = IssueRequest {
            endpoint: "h:1883",
            board: "esp box:3",
            mac: "aa:bb:cc:dd:ee:ff",
            uuid: "",
            user_data: &user,
            keepalive_s: 240,
        };
        let section = keys.issue(&req).unwrap();
        assert_eq!(
            section.client_id,
            "GID_esp_box_3@@@aa_bb_cc_dd_ee_ff@@@aa_bb_cc_dd_ee_ff"
        );
        req.board = "a@@@b";
        assert_eq!(keys.issue(&req), Err(CredentialError::BadPart));
        req.board = "ok";
        req.mac = "not-a-mac";
        assert_eq!(keys.issue(&req), Err(CredentialError::BadMac));
    }

    #[test]
    fn key_lists_must_hold_one_or_two_keys() {
        let none: [&str; 0] = [];
        assert!(SignatureKeys::new(&none).is_err());
        assert!(SignatureKeys::new(&["a", "b", "c"]).is_err());
        assert!(SignatureKeys::new(&["a", ""]).is_err());
        assert!(!format!("{:?}", keys()).contains("test-signature-key"));
    }
}
