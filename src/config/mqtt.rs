//! `[mqtt]`: the MQTT + UDP transport's settings (spec §14.2, §15), in their own file because
//! they are one concept with their own validation and tests. Served by
//! `connection::mqtt` on every shard.

use serde::{Deserialize, Serialize};

use super::{ConfigError, ServerConfig};

/// How the OTA answer sends devices to a transport (spec §14.2: an `mqtt` section makes the
/// firmware use MQTT + UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OtaTransport {
    /// Every device gets the `websocket` section.
    Websocket,
    /// Every device gets the `mqtt` section.
    Mqtt,
    /// Devices in `mqtt.mqtt_devices` get `mqtt`, the others `websocket`.
    PerDevice,
}

/// The MQTT + UDP transport (spec §15): an MQTT 3.1.1 listener for JSON and one UDP port per
/// shard for encrypted Opus.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Serve MQTT + UDP at all.
    pub enabled: bool,
    /// MQTT (TCP) port, every shard (SO_REUSEPORT).
    pub port: u16,
    /// UDP port of shard 0; shard N binds base + N. 0 = an ephemeral port per shard.
    pub udp_port_base: u16,
    /// Host or address devices send UDP to (hello `udp.server`); empty = the host of
    /// `public_endpoint`, else the address the device's MQTT connection reached.
    pub udp_public_host: String,
    /// `host:port` handed out as the OTA `mqtt.endpoint`; empty = the OTA request's host and
    /// `mqtt.port`.
    pub public_endpoint: String,
    /// HMAC-SHA256 keys of the MQTT passwords: the first signs, both verify (rotation).
    pub signature_keys: Vec<String>,
    /// Keepalive handed to devices, seconds; a device silent for 1.5 × this is disconnected.
    pub keepalive_s: u16,
    /// Largest MQTT packet accepted from a device, bytes (fixed header included).
    pub max_packet_bytes: usize,
    /// Which transport the OTA answer hands out.
    pub ota_transport: OtaTransport,
    /// MACs that get MQTT when `ota_transport` is "per_device".
    pub mqtt_devices: Vec<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            port: 1883,
            udp_port_base: 8884,
            udp_public_host: String::new(),
            public_endpoint: String::new(),
            signature_keys: Vec::new(),
            keepalive_s: 240,
            max_packet_bytes: 16 * 1024,
            ota_transport: OtaTransport::Websocket,
            mqtt_devices: Vec::new(),
        }
    }
}

impl MqttConfig {
    /// Whether the OTA answer for the device with this MAC should carry the `mqtt` section.
    pub fn ota_uses_mqtt(&self, mac: &str) -> bool {
        match self.ota_transport {
            OtaTransport::Websocket => false,
            OtaTransport::Mqtt => self.enabled,
            OtaTransport::PerDevice => {
                let Ok(mac) = crate::mqtt::credentials::normalize_mac(mac) else {
                    return false;
                };
                self.enabled
                    && self
                        .mqtt_devices
                        .iter()
                        .any(|d| crate::mqtt::credentials::normalize_mac(d).is_ok_and(|d| d == mac))
            }
        }
    }

    /// Checks values that parse but cannot work (the error names the key).
    pub(super) fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                key: format!("mqtt.{key}"),
                reason: reason.into(),
            })
        };
        if self.signature_keys.len() > crate::mqtt::credentials::MAX_SIGNATURE_KEYS
            || self.signature_keys.iter().any(String::is_empty)
        {
            return bad(
                "signature_keys",
                "at most 2 non-empty keys (the signing one, then the previous one)",
            );
        }
        if self.enabled && self.signature_keys.is_empty() {
            return bad("signature_keys", "MQTT is enabled but no key is set");
        }
        if self.enabled && self.port != 0 && [server.port, server.http_port].contains(&self.port) {
            return bad("port", "must differ from server.port and server.http_port");
        }
        if self.keepalive_s < 10 {
            return bad("keepalive_s", "must be at least 10");
        }
        if !(1024..=1 << 20).contains(&self.max_packet_bytes) {
            return bad("max_packet_bytes", "must be between 1024 and 1048576");
        }
        if self.ota_transport != OtaTransport::Websocket && !self.enabled {
            return bad("ota_transport", "hands out MQTT but mqtt.enabled is false");
        }
        if self.ota_transport == OtaTransport::PerDevice && self.mqtt_devices.is_empty() {
            return bad(
                "mqtt_devices",
                "ota_transport is \"per_device\" but no device is listed",
            );
        }
        if let Some(d) = self
            .mqtt_devices
            .iter()
            .find(|d| crate::mqtt::credentials::normalize_mac(d).is_err())
        {
            return bad("mqtt_devices", &format!("{d:?} is not a MAC address"));
        }
        if self.public_endpoint.contains('/') {
            return bad(
                "public_endpoint",
                "must be host[:port], without a scheme or path",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    fn load(sets: &[&str]) -> Result<Config, ConfigError> {
        let v: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::load(None, &v)
    }

    #[test]
    fn mqtt_is_off_by_default_with_gateway_like_defaults() {
        let c = load(&[]).unwrap();
        assert!(!c.mqtt.enabled);
        assert_eq!(
            (c.mqtt.port, c.mqtt.udp_port_base, c.mqtt.keepalive_s),
            (1883, 8884, 240)
        );
        assert_eq!(c.mqtt.ota_transport, OtaTransport::Websocket);
        assert!(!c.mqtt.ota_uses_mqtt("aa:bb:cc:dd:ee:ff"));
    }

    #[test]
    fn per_device_transport_picks_listed_macs_in_any_spelling() {
        let c = load(&[
            "mqtt.enabled=true",
            "mqtt.signature_keys=[\"k1\", \"k0\"]",
            "mqtt.ota_transport=\"per_device\"",
            "mqtt.mqtt_devices=[\"AA:BB:CC:DD:EE:FF\"]",
        ])
        .unwrap();
        assert!(c.mqtt.ota_uses_mqtt("aa:bb:cc:dd:ee:ff"));
        assert!(c.mqtt.ota_uses_mqtt("aa_bb_cc_dd_ee_ff"));
        assert!(!c.mqtt.ota_uses_mqtt("aa:bb:cc:dd:ee:00"));
        let all = load(&[
            "mqtt.enabled=true",
            "mqtt.signature_keys=[\"k\"]",
            "mqtt.ota_transport=\"mqtt\"",
        ])
        .unwrap();
        assert!(all.mqtt.ota_uses_mqtt("anything"));
    }

    #[test]
    fn unworkable_mqtt_values_are_refused_with_their_key() {
        for (sets, key) in [
            (&["mqtt.enabled=true"][..], "mqtt.signature_keys"),
            (
                &["mqtt.signature_keys=[\"a\",\"b\",\"c\"]"][..],
                "mqtt.signature_keys",
            ),
            (
                &[
                    "mqtt.enabled=true",
                    "mqtt.signature_keys=[\"k\"]",
                    "mqtt.port=8000",
                ][..],
                "mqtt.port",
            ),
            (&["mqtt.keepalive_s=0"][..], "mqtt.keepalive_s"),
            (&["mqtt.max_packet_bytes=10"][..], "mqtt.max_packet_bytes"),
            (&["mqtt.ota_transport=\"mqtt\""][..], "mqtt.ota_transport"),
            (&["mqtt.ota_transport=\"udp\""][..], "mqtt.ota_transport"),
            (
                &[
                    "mqtt.enabled=true",
                    "mqtt.signature_keys=[\"k\"]",
                    "mqtt.ota_transport=\"per_device\"",
                ][..],
                "mqtt.mqtt_devices",
            ),
            (&["mqtt.mqtt_devices=[\"nope\"]"][..], "mqtt.mqtt_devices"),
            (
                &["mqtt.public_endpoint=\"mqtt://h:1883\""][..],
                "mqtt.public_endpoint",
            ),
            (&["mqtt.prot=1"][..], "mqtt.prot"),
        ] {
            let err = load(sets).unwrap_err().to_string();
            assert!(err.contains(key), "{sets:?}: {err}");
        }
    }
}
