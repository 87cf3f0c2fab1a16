//! The OTA / provisioning answer (`POST /xiaozhi/ota/`), in the reference's response shape:
//! `server_time`, `firmware` and either `websocket{url, token}` or, for a device that should
//! use MQTT + UDP (`mqtt.ota_transport`), `mqtt{endpoint, client_id, username, password,
//! keepalive, publish_topic, subscribe_topic}` with credentials signed for it (spec §14). Only
//! one transport section is sent: the firmware uses MQTT whenever `mqtt` is present. Pure: the
//! caller passes the request's headers, body, client address and the clock.

use serde_json::{json, Map, Value};

use crate::config::MqttConfig;
use crate::config::OtaTokens;
use crate::mqtt::credentials::{IssueRequest, SignatureKeys};
use crate::protocol::token::TokenSigner;

/// What the OTA answer needs to hand out MQTT credentials.
#[derive(Debug, Clone)]
pub struct OtaMqtt {
    /// `[mqtt]` (port, public endpoint, keepalive, which devices get MQTT).
    pub config: MqttConfig,
    /// Signs the passwords (the first key).
    pub keys: SignatureKeys,
}

/// What the OTA answer depends on, fixed at start.
#[derive(Debug, Clone)]
pub struct OtaSettings {
    /// URL handed out; empty = derived from the request's Host and `ws_port`.
    pub public_ws_url: String,
    /// WebSocket port for derived URLs.
    pub ws_port: u16,
    /// Minutes east of UTC.
    pub timezone_offset_minutes: i64,
    /// Offered firmware version (empty = none) and its URL.
    pub firmware_version: String,
    /// Offered firmware download URL.
    pub firmware_url: String,
    /// Token signer when auth is on.
    pub signer: Option<TokenSigner>,
    /// `server.auth.allowed_devices`.
    pub allowed_devices: Vec<String>,
    /// Allowed devices connect without a token (then OTA gives them none, as the reference).
    pub allowed_devices_skip_token: bool,
    /// Which devices get a token.
    pub ota_tokens: OtaTokens,
    /// MQTT credentials for the devices `mqtt.ota_transport` sends to MQTT (`None`: MQTT off).
    pub mqtt: Option<OtaMqtt>,
}

/// The parts of an OTA request the answer uses.
#[derive(Debug, Default)]
pub struct OtaRequest<'a> {
    /// `Device-Id` header.
    pub device_id: Option<&'a str>,
    /// `Client-Id` header.
    pub client_id: Option<&'a str>,
    /// `Host` header (for the derived WebSocket URL).
    pub host: Option<&'a str>,
    /// Local address the request arrived on (fallback for the URL host).
    pub local_ip: Option<std::net::IpAddr>,
    /// The device's address (goes into the MQTT `username`, as the gateway's `ip`).
    pub client_ip: Option<std::net::IpAddr>,
    /// JSON body (the device's system info).
    pub body: &'a [u8],
}

impl OtaSettings {
    /// The WebSocket URL for a request: the configured public URL, or one derived from the Host.
    pub fn websocket_url(&self, host: Option<&str>, local_ip: Option<std::net::IpAddr>) -> String {
        if !self.public_ws_url.is_empty() {
            return self.public_ws_url.clone();
        }
        let host = public_host(host, local_ip);
        format!("ws://{host}:{}/xiaozhi/v1/", self.ws_port)
    }

    /// The JSON answer to a device's OTA POST. Missing ids give the reference's
    /// `{"success":false,"message":"request error."}` (still HTTP 200, as the reference does).
    pub fn answer(&self, req: &OtaRequest<'_>, now_unix_ms: u64) -> Value {
        let (Some(device_id), Some(client_id)) = (
            req.device_id.filter(|s| !s.is_empty()),
            req.client_id.filter(|s| !s.is_empty()),
        ) else {
            return json!({"success": false, "message": "request error."});
        };
        let body: Value = serde_json::from_slice(req.body).unwrap_or(Value::Null);
        let device_version = body
            .pointer("/application/version")
            .and_then(Value::as_str)
            .unwrap_or("0.0.0");
        let firmware = if !self.firmware_version.is_empty()
            && version_newer(&self.firmware_version, device_version)
        {
            json!({"version": self.firmware_version, "url": self.firmware_url})
        } else {
            json!({"version": device_version, "url": ""})
        };
        if let Some(mqtt) = self.mqtt_section(req, device_id, client_id, &body) {
            return json!({
                "server_time": {
                    "timestamp": now_unix_ms,
                    "timezone_offset": self.timezone_offset_minutes,
                },
                "firmware": firmware,
                "mqtt": mqtt,
            });
        }
        let token = match &self.signer {
            Some(signer) if self.issues_token_to(device_id) => {
                signer.sign(client_id, device_id, now_unix_ms / 1000)
            }
            _ => String::new(),
        };
        json!({
            "server_time": {
                "timestamp": now_unix_ms,
                "timezone_offset": self.timezone_offset_minutes,
            },
            "firmware": firmware,
            "websocket": {
                "url": self.websocket_url(req.host, req.local_ip),
                "token": token,
            },
        })
    }
}

impl OtaSettings {
    /// Whether `server.auth.ota_tokens` lets OTA hand this device credentials at all (a device
    /// token, or MQTT credentials when auth is on).
    fn may_issue_to(&self, device_id: &str) -> bool {
        match self.ota_tokens {
            OtaTokens::Any => true,
            OtaTokens::AllowedDevices => self.allowed_devices.iter().any(|d| d == device_id),
            OtaTokens::None => false,
        }
    }

    /// Whether a device gets a token (with auth on): per `server.auth.ota_tokens`, except an
    /// allowed device that needs none.
    pub fn issues_token_to(&self, device_id: &str) -> bool {
        let allowed = self.allowed_devices.iter().any(|d| d == device_id);
        if allowed && self.allowed_devices_skip_token {
            return false;
        }
        self.may_issue_to(device_id)
    }

    /// The `mqtt` section for this device when it should use MQTT + UDP; `None` for WebSocket
    /// (also when its MAC or board name cannot go into a `client_id`).
    fn mqtt_section(
        &self,
        req: &OtaRequest<'_>,
        device_id: &str,
        client_id: &str,
        body: &Value,
    ) -> Option<Value> {
        let mqtt = self.mqtt.as_ref()?;
        if !mqtt.config.ota_uses_mqtt(device_id) {
            return None;
        }
        // With auth on, MQTT credentials are a way in like a token: the same policy decides.
        if self.signer.is_some() && !self.may_issue_to(device_id) {
            return None;
        }
        let endpoint = if mqtt.config.public_endpoint.is_empty() {
            format!(
                "{}:{}",
                public_host(req.host, req.local_ip),
                mqtt.config.port
            )
        } else {
            mqtt.config.public_endpoint.clone()
        };
        let board = body
            .pointer("/board/type")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        let mut user_data = Map::new();
        let ip = req.client_ip.map_or("unknown".into(), |ip| ip.to_string());
        user_data.insert("ip".into(), ip.into());
        let issued = mqtt.keys.issue(&IssueRequest {
            endpoint: &endpoint,
            board,
            mac: device_id,
            uuid: client_id,
            user_data: &user_data,
            keepalive_s: mqtt.config.keepalive_s,
        });
        match issued {
            Ok(section) => serde_json::to_value(section).ok(),
            Err(e) => {
                tracing::info!(device = ?device_id, error = %e, "no MQTT credentials; WebSocket it is");
                None
            }
        }
    }
}

/// The host a device reached us by, for URLs handed back to it: the request's `Host` without
/// its port, else the local address the request arrived on, else `127.0.0.1`.
pub fn public_host(host: Option<&str>, local_ip: Option<std::net::IpAddr>) -> String {
    host.map(strip_port)
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .or_else(|| {
            local_ip.map(|ip| match ip {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            })
        })
        .unwrap_or_else(|| "127.0.0.1".into())
}

/// Host without a port: "a.b:8003" → "a.b", "[::1]:8003" → "[::1]".
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

/// True when dotted version `offered` is numerically newer than `current` (as the firmware compares).
pub fn version_newer(offered: &str, current: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> {
        v.split('.')
            .map(|p| {
                p.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap_or(0)
            })
            .collect()
    };
    let (a, b) = (parse(offered), parse(current));
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x > y;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OtaSettings {
        OtaSettings {
            public_ws_url: String::new(),
            ws_port: 8000,
            timezone_offset_minutes: 480,
            firmware_version: String::new(),
            firmware_url: String::new(),
            signer: None,
            allowed_devices: vec![],
            allowed_devices_skip_token: false,
            ota_tokens: OtaTokens::Any,
            mqtt: None,
        }
    }

    fn with_mqtt(transport: &str, devices: &[&str]) -> OtaSettings {
        let mut config = MqttConfig {
            enabled: true,
            port: 1883,
            signature_keys: vec!["k1".into()],
            keepalive_s: 90,
            ..MqttConfig::default()
        };
        config.ota_transport = serde_json::from_value(json!(transport)).unwrap();
        config.mqtt_devices = devices.iter().map(|d| d.to_string()).collect();
        OtaSettings {
            mqtt: Some(OtaMqtt {
                keys: SignatureKeys::new(&config.signature_keys).unwrap(),
                config,
            }),
            ..settings()
        }
    }

    #[test]
    fn mqtt_devices_get_an_mqtt_section_whose_password_verifies_and_no_websocket() {
        let s = with_mqtt("mqtt", &[]);
        let mut r = req(br#"{"board":{"type":"bread-compact-wifi"}}"#);
        r.client_ip = Some("192.168.1.77".parse().unwrap());
        let v = s.answer(&r, 0);
        assert!(v.get("websocket").is_none(), "{v}");
        let m = &v["mqtt"];
        assert_eq!(m["endpoint"], "192.168.1.5:1883");
        assert_eq!(
            m["client_id"],
            "GID_bread-compact-wifi@@@aa_bb_cc_dd_ee_ff@@@uuid-1"
        );
        assert_eq!(m["keepalive"], 90);
        assert_eq!(m["publish_topic"], "device-server");
        assert_eq!(m["subscribe_topic"], "devices/p2p/aa_bb_cc_dd_ee_ff");
        let keys = &s.mqtt.as_ref().unwrap().keys;
        let creds = keys
            .verify_connect(
                m["client_id"].as_str().unwrap(),
                m["username"].as_str(),
                m["password"].as_str().map(str::as_bytes),
            )
            .unwrap();
        assert_eq!(creds.user_data["ip"], "192.168.1.77");
    }

    #[test]
    fn per_device_transport_sends_only_listed_devices_to_mqtt() {
        let s = with_mqtt("per_device", &["AA:BB:CC:DD:EE:FF"]);
        assert!(s.answer(&req(b"{}"), 0).get("mqtt").is_some());
        let mut other = req(b"{}");
        other.device_id = Some("aa:bb:cc:dd:ee:00");
        let v = s.answer(&other, 0);
        assert!(v.get("mqtt").is_none());
        assert!(v["websocket"]["url"].is_string());
        let mut public = with_mqtt("mqtt", &[]);
        if let Some(m) = public.mqtt.as_mut() {
            m.config.public_endpoint = "mqtt.example.com:8883".into();
        }
        assert_eq!(
            public.answer(&req(b"{}"), 0)["mqtt"]["endpoint"],
            "mqtt.example.com:8883"
        );
        assert!(with_mqtt("websocket", &[])
            .answer(&req(b"{}"), 0)
            .get("mqtt")
            .is_none());
    }

    fn req<'a>(body: &'a [u8]) -> OtaRequest<'a> {
        OtaRequest {
            device_id: Some("aa:bb:cc:dd:ee:ff"),
            client_id: Some("uuid-1"),
            host: Some("192.168.1.5:8003"),
            local_ip: None,
            client_ip: None,
            body,
        }
    }

    #[test]
    fn answer_has_reference_shape_and_derived_url() {
        let v = settings().answer(
            &req(br#"{"application":{"version":"1.6.0"}}"#),
            1_700_000_000_123,
        );
        assert_eq!(v["server_time"]["timestamp"], 1_700_000_000_123u64);
        assert_eq!(v["server_time"]["timezone_offset"], 480);
        assert_eq!(v["firmware"]["version"], "1.6.0");
        assert_eq!(v["firmware"]["url"], "");
        assert_eq!(v["websocket"]["url"], "ws://192.168.1.5:8000/xiaozhi/v1/");
        assert_eq!(v["websocket"]["token"], "");
        assert!(v.get("mqtt").is_none());
    }

    #[test]
    fn public_url_wins_over_host() {
        let mut s = settings();
        s.public_ws_url = "wss://lb.example/xiaozhi/v1/".into();
        assert_eq!(
            s.answer(&req(b"{}"), 0)["websocket"]["url"],
            "wss://lb.example/xiaozhi/v1/"
        );
    }

    #[test]
    fn missing_ids_get_the_reference_error_body() {
        let mut r = req(b"{}");
        r.client_id = None;
        let v = settings().answer(&r, 0);
        assert_eq!(v, json!({"success": false, "message": "request error."}));
    }

    #[test]
    fn auth_on_issues_a_token_that_verifies_except_for_allowed_devices_that_skip_it() {
        let mut s = settings();
        s.signer = Some(TokenSigner::new("secret"));
        let v = s.answer(&req(b"{}"), 1_700_000_000_000);
        let token = v["websocket"]["token"].as_str().unwrap().to_string();
        assert!(s
            .signer
            .as_ref()
            .unwrap()
            .verify(
                Some(&format!("Bearer {token}")),
                "uuid-1",
                "aa:bb:cc:dd:ee:ff",
                1_700_000_010,
                3600
            )
            .is_ok());
        s.allowed_devices = vec!["aa:bb:cc:dd:ee:ff".into()];
        assert_ne!(s.answer(&req(b"{}"), 0)["websocket"]["token"], "");
        s.allowed_devices_skip_token = true;
        assert_eq!(s.answer(&req(b"{}"), 0)["websocket"]["token"], "");
    }

    #[test]
    fn ota_tokens_policy_decides_who_gets_one() {
        let mut s = settings();
        s.allowed_devices = vec!["fleet-1".into()];
        let cases = [
            (OtaTokens::Any, [true, true]),
            (OtaTokens::AllowedDevices, [true, false]),
            (OtaTokens::None, [false, false]),
        ];
        for (policy, [fleet, stranger]) in cases {
            s.ota_tokens = policy;
            assert_eq!(s.issues_token_to("fleet-1"), fleet, "{policy:?}");
            assert_eq!(s.issues_token_to("victim"), stranger, "{policy:?}");
        }
        // Without a signer (auth off) nobody gets one, whatever the policy.
        s.ota_tokens = OtaTokens::Any;
        assert_eq!(s.answer(&req(b"{}"), 0)["websocket"]["token"], "");
    }

    #[test]
    fn newer_firmware_is_offered_only_when_newer() {
        let mut s = settings();
        s.firmware_version = "1.7.0".into();
        s.firmware_url = "http://fw/x.bin".into();
        let v = s.answer(&req(br#"{"application":{"version":"1.6.9"}}"#), 0);
        assert_eq!(v["firmware"]["url"], "http://fw/x.bin");
        let v = s.answer(&req(br#"{"application":{"version":"1.10.0"}}"#), 0);
        assert_eq!(v["firmware"]["version"], "1.10.0");
        assert_eq!(v["firmware"]["url"], "");
    }

    #[test]
    fn ipv6_host_keeps_brackets() {
        assert_eq!(
            settings().websocket_url(Some("[::1]:8003"), None),
            "ws://[::1]:8000/xiaozhi/v1/"
        );
    }
}
