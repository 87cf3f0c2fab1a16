//! Binary audio framing for WebSocket protocol versions 1, 2 and 3 (spec §6.1–6.5).
//!
//! Each binary WebSocket message carries one Opus packet. Version 1 sends the bare packet;
//! version 2 prefixes a 16-byte big-endian header (`version u16, type u16, reserved u32,
//! timestamp u32, payload_size u32`); version 3 a 4-byte one (`type u8, reserved u8,
//! payload_size u16`). The version comes from the `Protocol-Version` header, else the hello's
//! `version`, else 1.
//!
//! Decoding never trusts `payload_size` beyond the frame (the firmware does; we must not), reads
//! exactly `payload_size` bytes and ignores any trailing bytes (as the firmware and the MQTT
//! gateway do). The v2 `version` and `reserved` fields are not checked: the stock MQTT gateway
//! sends uplink frames with bytes 0..8 all zero and only timestamp (8..12) and payload_size
//! (12..16) filled in, so v2 decoding accepts those too. Encoding always writes a complete,
//! correct header; the gateway reads only offsets 8 and 12 of it, so v2 serves both the firmware
//! and the gateway.

/// Header length of a version 2 frame.
pub const V2_HEADER_LEN: usize = 16;
/// Header length of a version 3 frame.
pub const V3_HEADER_LEN: usize = 4;

/// Payload `type` value for an Opus packet.
const TYPE_OPUS: u16 = 0;
/// Payload `type` value for JSON carried in a binary frame (never sent by the firmware).
const TYPE_JSON: u16 = 1;

/// The binary framing negotiated for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BinaryProtocol {
    /// Bare Opus packet, no header (the default).
    #[default]
    V1,
    /// 16-byte header with a millisecond timestamp (server-side AEC, MQTT gateway).
    V2,
    /// 4-byte header, no timestamp.
    V3,
}

/// One decoded audio frame, borrowing its payload from the received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioFrame<'a> {
    /// The Opus packet (may be 0–3 bytes during DTX silence).
    pub payload: &'a [u8],
    /// Milliseconds; v2 only (AEC reference or 0), always 0 for v1 and v3.
    pub timestamp: u32,
}

/// Why a binary frame could not be decoded or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A `Protocol-Version` / hello `version` this server does not implement.
    #[error("unsupported binary protocol version {0} (supported: 1, 2, 3)")]
    UnsupportedVersion(u8),
    /// The frame is shorter than the version's header.
    #[error("binary frame of {len} bytes is shorter than the {header}-byte v{version} header")]
    TruncatedHeader {
        /// Protocol version.
        version: u8,
        /// Header length.
        header: usize,
        /// Frame length.
        len: usize,
    },
    /// `payload_size` claims more bytes than the frame holds.
    #[error("binary frame declares a {declared}-byte payload but only {available} bytes follow the header")]
    PayloadBeyondFrame {
        /// The header's `payload_size`.
        declared: usize,
        /// Bytes after the header.
        available: usize,
    },
    /// `type` 1: JSON inside a binary frame, which the firmware never sends and we do not accept.
    #[error("binary frame carries JSON (type 1); send JSON as a text frame")]
    JsonInBinary,
    /// A `type` other than 0 (Opus) or 1 (JSON).
    #[error("binary frame has unknown payload type {0} (expected 0 = Opus)")]
    UnknownType(u16),
    /// The payload does not fit the version's `payload_size` field.
    #[error("payload of {len} bytes does not fit the v{version} header (max {max})")]
    PayloadTooLarge {
        /// Protocol version.
        version: u8,
        /// Payload length.
        len: usize,
        /// Largest encodable payload.
        max: usize,
    },
}

impl BinaryProtocol {
    /// The framing for a protocol version number; unknown versions are an error (fall back to V1).
    pub fn from_version(version: u8) -> Result<Self, FrameError> {
        match version {
            1 => Ok(BinaryProtocol::V1),
            2 => Ok(BinaryProtocol::V2),
            3 => Ok(BinaryProtocol::V3),
            other => Err(FrameError::UnsupportedVersion(other)),
        }
    }

    /// The protocol version number.
    pub fn version(self) -> u8 {
        match self {
            BinaryProtocol::V1 => 1,
            BinaryProtocol::V2 => 2,
            BinaryProtocol::V3 => 3,
        }
    }

    /// Bytes of header before the payload.
    pub fn header_len(self) -> usize {
        match self {
            BinaryProtocol::V1 => 0,
            BinaryProtocol::V2 => V2_HEADER_LEN,
            BinaryProtocol::V3 => V3_HEADER_LEN,
        }
    }

    /// Decodes one received binary message into its Opus payload and timestamp.
    pub fn decode(self, frame: &[u8]) -> Result<AudioFrame<'_>, FrameError> {
        match self {
            BinaryProtocol::V1 => Ok(AudioFrame {
                payload: frame,
                timestamp: 0,
            }),
            BinaryProtocol::V2 => {
                let (header, body) = frame
                    .split_first_chunk::<V2_HEADER_LEN>()
                    .ok_or_else(|| self.truncated(frame))?;
                let [_, _, t0, t1, _, _, _, _, s0, s1, s2, s3, n0, n1, n2, n3] = *header;
                check_type(u16::from_be_bytes([t0, t1]))?;
                let size = u32::from_be_bytes([n0, n1, n2, n3]);
                Ok(AudioFrame {
                    payload: payload(body, usize::try_from(size).unwrap_or(usize::MAX))?,
                    timestamp: u32::from_be_bytes([s0, s1, s2, s3]),
                })
            }
            BinaryProtocol::V3 => {
                let (header, body) = frame
                    .split_first_chunk::<V3_HEADER_LEN>()
                    .ok_or_else(|| self.truncated(frame))?;
                let [kind, _, n0, n1] = *header;
                check_type(u16::from(kind))?;
                Ok(AudioFrame {
                    payload: payload(body, usize::from(u16::from_be_bytes([n0, n1])))?,
                    timestamp: 0,
                })
            }
        }
    }

    /// Decodes a frame from the stock MQTT gateway (`?from=mqtt_gateway`, spec §6.5, §15.5):
    /// the timestamp at bytes 8..12, the Opus packet from byte 16 to the end, the rest of the
    /// header not read, as the reference server reads it. (The server's frames back to the
    /// gateway are v2, which puts the timestamp and the length where the gateway reads them.)
    pub fn decode_gateway(frame: &[u8]) -> Result<AudioFrame<'_>, FrameError> {
        let (header, body) = frame
            .split_first_chunk::<V2_HEADER_LEN>()
            .ok_or_else(|| BinaryProtocol::V2.truncated(frame))?;
        let [_, _, _, _, _, _, _, _, s0, s1, s2, s3, _, _, _, _] = *header;
        Ok(AudioFrame {
            payload: body,
            timestamp: u32::from_be_bytes([s0, s1, s2, s3]),
        })
    }

    /// Appends one framed Opus packet to `out` (v3 ignores `timestamp`); `out` is not cleared.
    pub fn encode_into(
        self,
        payload: &[u8],
        timestamp: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        match self {
            BinaryProtocol::V1 => {}
            BinaryProtocol::V2 => {
                let size = u32::try_from(payload.len()).map_err(|_| self.too_large(payload))?;
                out.reserve(V2_HEADER_LEN + payload.len());
                out.extend_from_slice(&2u16.to_be_bytes());
                out.extend_from_slice(&TYPE_OPUS.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
                out.extend_from_slice(&timestamp.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
            }
            BinaryProtocol::V3 => {
                let size = u16::try_from(payload.len()).map_err(|_| self.too_large(payload))?;
                out.reserve(V3_HEADER_LEN + payload.len());
                // TYPE_OPUS is 0, which fits the v3 one-byte type field.
                out.push(0);
                out.push(0);
                out.extend_from_slice(&size.to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        Ok(())
    }

    fn truncated(self, frame: &[u8]) -> FrameError {
        FrameError::TruncatedHeader {
            version: self.version(),
            header: self.header_len(),
            len: frame.len(),
        }
    }

    fn too_large(self, payload: &[u8]) -> FrameError {
        FrameError::PayloadTooLarge {
            version: self.version(),
            len: payload.len(),
            max: match self {
                BinaryProtocol::V3 => usize::from(u16::MAX),
                _ => u32::MAX as usize,
            },
        }
    }
}

fn check_type(kind: u16) -> Result<(), FrameError> {
    match kind {
        TYPE_OPUS => Ok(()),
        TYPE_JSON => Err(FrameError::JsonInBinary),
        other => Err(FrameError::UnknownType(other)),
    }
}

/// The first `size` bytes after the header; trailing bytes are ignored.
fn payload(body: &[u8], size: usize) -> Result<&[u8], FrameError> {
    body.get(..size).ok_or(FrameError::PayloadBeyondFrame {
        declared: size,
        available: body.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(protocol: BinaryProtocol, payload: &[u8], timestamp: u32) -> Vec<u8> {
        let mut out = Vec::new();
        protocol.encode_into(payload, timestamp, &mut out).unwrap();
        let frame = protocol.decode(&out).unwrap();
        assert_eq!(frame.payload, payload);
        out
    }

    #[test]
    fn from_version_maps_known_and_rejects_unknown() {
        assert_eq!(BinaryProtocol::from_version(1), Ok(BinaryProtocol::V1));
        assert_eq!(BinaryProtocol::from_version(2), Ok(BinaryProtocol::V2));
        assert_eq!(BinaryProtocol::from_version(3), Ok(BinaryProtocol::V3));
        assert_eq!(
            BinaryProtocol::from_version(0),
            Err(FrameError::UnsupportedVersion(0))
        );
        assert_eq!(
            BinaryProtocol::from_version(4),
            Err(FrameError::UnsupportedVersion(4))
        );
        assert_eq!(BinaryProtocol::default(), BinaryProtocol::V1);
    }

    #[test]
    fn v1_is_the_raw_packet_both_ways() {
        let out = round_trip(BinaryProtocol::V1, &[0x58, 0x01, 0x02], 99);
        assert_eq!(out, [0x58, 0x01, 0x02]);
        assert_eq!(
            BinaryProtocol::V1.decode(&[]),
            Ok(AudioFrame {
                payload: &[],
                timestamp: 0
            })
        );
    }

    #[test]
    fn v2_round_trip_writes_big_endian_header() {
        let out = round_trip(BinaryProtocol::V2, &[0xAA, 0xBB, 0xCC], 0x0102_0304);
        assert_eq!(
            out,
            [0, 2, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 3, 0xAA, 0xBB, 0xCC]
        );
        assert_eq!(
            BinaryProtocol::V2.decode(&out).unwrap().timestamp,
            0x0102_0304
        );
    }

    #[test]
    fn v2_round_trips_empty_and_one_byte_dtx_payloads() {
        let empty = round_trip(BinaryProtocol::V2, &[], 7);
        assert_eq!(empty.len(), V2_HEADER_LEN);
        let one = round_trip(BinaryProtocol::V2, &[0xF8], 7);
        assert_eq!(one.len(), V2_HEADER_LEN + 1);
    }

    #[test]
    fn v3_round_trip_writes_four_byte_header() {
        let out = round_trip(BinaryProtocol::V3, &[9, 8, 7, 6, 5], 1234);
        assert_eq!(out, [0, 0, 0, 5, 9, 8, 7, 6, 5]);
        assert_eq!(BinaryProtocol::V3.decode(&out).unwrap().timestamp, 0);
    }

    #[test]
    fn v3_round_trips_empty_and_one_byte_dtx_payloads() {
        assert_eq!(round_trip(BinaryProtocol::V3, &[], 0), [0, 0, 0, 0]);
        assert_eq!(
            round_trip(BinaryProtocol::V3, &[0xF8], 0),
            [0, 0, 0, 1, 0xF8]
        );
    }

    #[test]
    fn v3_encodes_max_payload_and_rejects_larger() {
        let max = vec![1u8; 65535];
        let out = round_trip(BinaryProtocol::V3, &max, 0);
        assert_eq!(&out[..4], [0, 0, 0xFF, 0xFF]);
        let mut out = vec![0xEE];
        assert_eq!(
            BinaryProtocol::V3.encode_into(&vec![1u8; 65536], 0, &mut out),
            Err(FrameError::PayloadTooLarge {
                version: 3,
                len: 65536,
                max: 65535
            })
        );
        assert_eq!(out, [0xEE], "nothing is appended on error");
    }

    #[test]
    fn encode_into_appends_after_existing_bytes() {
        let mut out = vec![0xEE];
        BinaryProtocol::V3.encode_into(&[1], 0, &mut out).unwrap();
        assert_eq!(out, [0xEE, 0, 0, 0, 1, 1]);
    }

    #[test]
    fn v2_rejects_truncated_header() {
        assert_eq!(
            BinaryProtocol::V2.decode(&[0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::TruncatedHeader {
                version: 2,
                header: 16,
                len: 15
            })
        );
        assert_eq!(
            BinaryProtocol::V2.decode(&[]),
            Err(FrameError::TruncatedHeader {
                version: 2,
                header: 16,
                len: 0
            })
        );
    }

    #[test]
    fn v3_rejects_truncated_header() {
        assert_eq!(
            BinaryProtocol::V3.decode(&[0, 0, 0]),
            Err(FrameError::TruncatedHeader {
                version: 3,
                header: 4,
                len: 3
            })
        );
    }

    #[test]
    fn v2_rejects_payload_size_beyond_frame() {
        let frame = [
            0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2,
        ];
        assert_eq!(
            BinaryProtocol::V2.decode(&frame),
            Err(FrameError::PayloadBeyondFrame {
                declared: 0xFFFF_FFFF,
                available: 2
            })
        );
    }

    #[test]
    fn v3_rejects_payload_size_beyond_frame() {
        assert_eq!(
            BinaryProtocol::V3.decode(&[0, 0, 0, 3, 1, 2]),
            Err(FrameError::PayloadBeyondFrame {
                declared: 3,
                available: 2
            })
        );
    }

    #[test]
    fn gateway_frames_are_read_as_the_reference_reads_them() {
        // The gateway's uplink header: byte 0 = 1, its own length fields, timestamp at 8.
        let frame = [1, 0, 0, 2, 0, 0, 0, 9, 0, 0, 1, 0, 0, 0, 0, 2, 7, 8];
        assert_eq!(
            BinaryProtocol::decode_gateway(&frame),
            Ok(AudioFrame {
                payload: &[7, 8],
                timestamp: 256,
            })
        );
        assert!(BinaryProtocol::decode_gateway(&frame[..15]).is_err());
    }

    #[test]
    fn decode_ignores_bytes_after_declared_payload() {
        assert_eq!(
            BinaryProtocol::V3
                .decode(&[0, 0, 0, 1, 7, 8, 9])
                .unwrap()
                .payload,
            [7]
        );
        let v2 = [0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 1, 7, 8];
        assert_eq!(
            BinaryProtocol::V2.decode(&v2),
            Ok(AudioFrame {
                payload: &[7],
                timestamp: 5
            })
        );
    }

    #[test]
    fn v2_accepts_mqtt_gateway_frames_with_zero_version() {
        // The gateway's Buffer.alloc(16 + n) leaves version/type/reserved zero.
        let frame = [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x03, 0xE8, 0, 0, 0, 2, 0x11, 0x22,
        ];
        assert_eq!(
            BinaryProtocol::V2.decode(&frame),
            Ok(AudioFrame {
                payload: &[0x11, 0x22],
                timestamp: 1000
            })
        );
    }

    #[test]
    fn v2_and_v3_reject_json_and_unknown_types() {
        let json_v2 = [0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, b'{', b'}'];
        assert_eq!(
            BinaryProtocol::V2.decode(&json_v2),
            Err(FrameError::JsonInBinary)
        );
        let odd_v2 = [0, 2, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            BinaryProtocol::V2.decode(&odd_v2),
            Err(FrameError::UnknownType(9))
        );
        assert_eq!(
            BinaryProtocol::V3.decode(&[1, 0, 0, 0]),
            Err(FrameError::JsonInBinary)
        );
        assert_eq!(
            BinaryProtocol::V3.decode(&[2, 0, 0, 0]),
            Err(FrameError::UnknownType(2))
        );
    }

    #[test]
    fn header_len_matches_encoded_overhead() {
        for protocol in [BinaryProtocol::V1, BinaryProtocol::V2, BinaryProtocol::V3] {
            let mut out = Vec::new();
            protocol.encode_into(&[1, 2, 3], 0, &mut out).unwrap();
            assert_eq!(out.len(), protocol.header_len() + 3);
            assert_eq!(
                BinaryProtocol::from_version(protocol.version()),
                Ok(protocol)
            );
        }
    }
}
