//! The MQTT + UDP transport's counters on one shard, declared once: connections, CONNECT
//! refusals and dropped packets by reason, and the UDP socket's datagrams by outcome and drop
//! reason. The shard fills them from its [`MqttEndpoint`](super::MqttEndpoint) at snapshot time.

use super::MqttEndpoint;

crate::metrics::counters::counters! {
    /// One shard's MQTT + UDP numbers (plain numbers; snapshot by value).
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct MqttStats {
        /// MQTT connections open now (with or without a session).
        connections: PerShard Gauge "xiaozhi_mqtt_connections"
            "Open MQTT device connections per shard (with or without a session).",
        /// CONNECTs accepted.
        accepted: Sum Counter "xiaozhi_mqtt_connects_total" {result = "accepted"}
            "MQTT CONNECTs by result.",
        /// CONNECTs refused: protocol level other than 3.1.1.
        refused_protocol: Sum Counter "xiaozhi_mqtt_connects_total" {result = "bad_protocol"}
            "MQTT CONNECTs by result.",
        /// CONNECTs refused: client id not `GID_…@@@mac_@@@uuid`.
        refused_identifier: Sum Counter "xiaozhi_mqtt_connects_total" {result = "bad_client_id"}
            "MQTT CONNECTs by result.",
        /// CONNECTs refused: username or password missing or malformed.
        refused_credentials: Sum Counter "xiaozhi_mqtt_connects_total" {result = "bad_credentials"}
            "MQTT CONNECTs by result.",
        /// CONNECTs refused: the password did not verify.
        refused_not_authorized: Sum Counter "xiaozhi_mqtt_connects_total" {result = "wrong_password"}
            "MQTT CONNECTs by result.",
        /// CONNECTs refused: full, draining, or over the per-address rate.
        refused_unavailable: Sum Counter "xiaozhi_mqtt_connects_total" {result = "unavailable"}
            "MQTT CONNECTs by result.",
        /// Connections that sent no CONNECT in time, or something else first.
        no_connect: Sum Counter "xiaozhi_mqtt_connects_total" {result = "no_connect"}
            "MQTT CONNECTs by result.",
        /// Packets over `mqtt.max_packet_bytes` (the connection is closed).
        oversized: Sum Counter "xiaozhi_mqtt_packets_refused_total" {reason = "oversized"}
            "MQTT packets refused (the connection is closed), by reason.",
        /// Malformed packets, or a PUBLISH that is not UTF-8 text.
        malformed: Sum Counter "xiaozhi_mqtt_packets_refused_total" {reason = "malformed"}
            "MQTT packets refused (the connection is closed), by reason.",
        /// PUBLISH with QoS 1 or 2.
        qos_refused: Sum Counter "xiaozhi_mqtt_packets_refused_total" {reason = "qos"}
            "MQTT packets refused (the connection is closed), by reason.",
        /// Packets only a server sends, or a second CONNECT.
        unexpected: Sum Counter "xiaozhi_mqtt_packets_refused_total" {reason = "unexpected"}
            "MQTT packets refused (the connection is closed), by reason.",
        /// Hellos over MQTT without `transport` "udp" and `version` 3 (closed, as the gateway does).
        bad_hellos: Sum Counter "xiaozhi_mqtt_packets_refused_total" {reason = "bad_hello"}
            "MQTT packets refused (the connection is closed), by reason.",
        /// Connections closed because the device was silent for 1.5 × its keepalive.
        keepalive_expired: Sum Counter "xiaozhi_mqtt_keepalive_expired_total"
            "MQTT connections closed because the device sent nothing for 1.5 x its keepalive.",
        /// Older connections closed because the same client id connected again.
        replaced: Sum Counter "xiaozhi_mqtt_replaced_total"
            "MQTT connections closed because the same client_id connected again (on any shard).",
        /// Sessions started over MQTT (one per hello after the previous session ended).
        sessions: Sum Counter "xiaozhi_mqtt_sessions_total"
            "Sessions started over MQTT + UDP (also counted in xiaozhi_sessions_accepted_total).",
        /// Uplink datagrams accepted.
        udp_accepted: Sum Counter "xiaozhi_udp_datagrams_total" {result = "accepted"}
            "UDP audio datagrams received, by result.",
        /// Dropped: shorter than the 16-byte header.
        udp_too_short: Sum Counter "xiaozhi_udp_datagrams_total" {result = "too_short"}
            "UDP audio datagrams received, by result.",
        /// Dropped: type other than 1.
        udp_bad_type: Sum Counter "xiaozhi_udp_datagrams_total" {result = "bad_type"}
            "UDP audio datagrams received, by result.",
        /// Dropped: length other than 16 + the header's payload length.
        udp_bad_length: Sum Counter "xiaozhi_udp_datagrams_total" {result = "bad_length"}
            "UDP audio datagrams received, by result.",
        /// Dropped: no connection on this shard has that id (or it sent no hello yet).
        udp_unknown_connection: Sum Counter "xiaozhi_udp_datagrams_total" {result = "unknown_connection"}
            "UDP audio datagrams received, by result.",
        /// Dropped: sequence not above the last accepted one.
        udp_replays: Sum Counter "xiaozhi_udp_datagrams_total" {result = "replay"}
            "UDP audio datagrams received, by result.",
        /// Dropped: from an IP address other than the device's MQTT connection.
        udp_forged_source: Sum Counter "xiaozhi_udp_datagrams_total" {result = "forged_source"}
            "UDP audio datagrams received, by result.",
        /// Dropped after acceptance: the connection's uplink queue was full.
        udp_queue_full: Sum Counter "xiaozhi_udp_datagrams_total" {result = "queue_full"}
            "UDP audio datagrams received, by result.",
        /// Accepted datagrams whose sequence skipped ahead.
        udp_gaps: Sum Counter "xiaozhi_udp_sequence_gaps_total"
            "Accepted UDP datagrams whose sequence skipped ahead (loss or reordering).",
        /// Sequence numbers skipped by those gaps.
        udp_lost: Sum Counter "xiaozhi_udp_sequence_skipped_total"
            "Sequence numbers skipped by gaps in accepted UDP uplink.",
        /// Downlink datagrams sent.
        udp_sent: Sum Counter "xiaozhi_udp_downlink_total" {result = "sent"}
            "UDP audio downlink packets, by result.",
        /// Downlink packets not sent: the device had sent no datagram yet.
        udp_no_address: Sum Counter "xiaozhi_udp_downlink_total" {result = "no_address"}
            "UDP audio downlink packets, by result.",
        /// Downlink sends the socket refused.
        udp_send_errors: Sum Counter "xiaozhi_udp_downlink_total" {result = "send_error"}
            "UDP audio downlink packets, by result.",
    }
}

impl MqttStats {
    /// The numbers of `endpoint` now.
    pub fn of(endpoint: &MqttEndpoint) -> MqttStats {
        let p = endpoint.packet_counters();
        let c = endpoint.counters();
        let (u, s) = endpoint.udp.counters();
        MqttStats {
            connections: endpoint.connections() as u64,
            accepted: c.accepted,
            refused_protocol: p.refused_protocol,
            refused_identifier: p.refused_identifier,
            refused_credentials: p.refused_credentials,
            refused_not_authorized: p.refused_not_authorized,
            refused_unavailable: p.refused_unavailable,
            no_connect: c.no_connect,
            oversized: p.oversized,
            malformed: p.malformed,
            qos_refused: p.qos_refused,
            unexpected: p.unexpected,
            bad_hellos: c.bad_hellos,
            keepalive_expired: p.keepalive_expired,
            replaced: c.replaced,
            sessions: c.sessions,
            udp_accepted: u.accepted,
            udp_too_short: u.too_short,
            udp_bad_type: u.bad_type,
            udp_bad_length: u.bad_length,
            udp_unknown_connection: u.unknown_connection,
            udp_replays: u.replays,
            udp_forged_source: u.forged_source,
            udp_queue_full: s.uplink_queue_full,
            udp_gaps: u.gaps,
            udp_lost: u.lost,
            udp_sent: s.sent,
            udp_no_address: s.no_address,
            udp_send_errors: s.send_errors,
        }
    }
}
