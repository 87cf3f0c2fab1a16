//! The OTA / provisioning answer (`POST /xiaozhi/ota/`), in the reference's response shape:
//! `server_time`, `firmware` and `websocket{url, token}` (spec §14). Pure: the caller passes
//! the request's headers, body and the clock.

use serde_json::{json, Value};

use crate::config::OtaTokens;
use crate::protocol::token::TokenSigner;

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
    /// Whether a device gets a token (with auth on): per `server.auth.ota_tokens`, except an
    /// allowed device that needs none.
    pub fn issues_token_to(&self, device_id: &str) -> bool {
        let allowed = self.allowed_devices.iter().any(|d| d == device_id);
        if allowed && self.allowed_devices_skip_token {
            return false;
        }
        match self.ota_tokens {
            OtaTokens::Any => true,
            OtaTokens::AllowedDevices => allowed,
            OtaTokens::None => false,
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
        }
    }

    fn req<'a>(body: &'a [u8]) -> OtaRequest<'a> {
        OtaRequest {
            device_id: Some("aa:bb:cc:dd:ee:ff"),
            client_id: Some("uuid-1"),
            host: Some("192.168.1.5:8003"),
            local_ip: None,
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
