//! What a simulated device receives: server text messages and downlink audio frames, checked.
//!
//! The shared `protocol` module parses what devices send; this is the other direction, written
//! from the device's point of view and as strictly as a benchmark should be: a text frame must be
//! a JSON object with a string `type` (unknown types are fine, the firmware ignores them), and a
//! binary frame must carry exactly one Opus packet of the announced frame duration behind a
//! header that is right for the negotiated version (the firmware trusts `payload_size` blindly,
//! so a wrong one garbles audio on a real device).

use serde_json::Value;
use xiaozhi_protocol::{BinaryProtocol, FrameError};

/// A server text message, as far as the device cares.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// `hello` reply.
    Hello {
        /// `session_id`, echoed in later device messages.
        session_id: String,
        /// `transport` (must be `websocket`).
        transport: String,
        /// Downlink sample rate (24000 if the server omits it, as the firmware assumes).
        sample_rate: u32,
        /// Downlink frame duration in ms (60 if omitted).
        frame_ms: u32,
    },
    /// `stt` with the recognised text.
    Stt(String),
    /// `llm` emotion.
    Llm(String),
    /// `tts start`.
    TtsStart,
    /// `tts sentence_start` with the subtitle.
    SentenceStart(String),
    /// `tts stop`.
    TtsStop,
    /// `mcp` with its JSON-RPC payload.
    Mcp(Value),
    /// `alert` (`status: message`).
    Alert(String),
    /// Any other type (`vad`, `tts sentence_end`, `system`, …), with the raw text for timelines.
    Other {
        /// The `type` field.
        kind: String,
        /// The whole message.
        raw: String,
    },
}

/// Parses one server text frame; `None` if it is not a JSON object with a string `type`.
pub fn parse_server_text(text: &str) -> Option<ServerEvent> {
    let v: Value = serde_json::from_str(text).ok()?;
    let kind = v.get("type")?.as_str()?;
    let str_field = |name: &str| v.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
    let other = || ServerEvent::Other {
        kind: kind.to_owned(),
        raw: text.to_owned(),
    };
    Some(match kind {
        "hello" => {
            let params = v.get("audio_params");
            let number = |name: &str, default: u32| {
                params
                    .and_then(|p| p.get(name))
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(default)
            };
            ServerEvent::Hello {
                session_id: str_field("session_id"),
                transport: str_field("transport"),
                sample_rate: number("sample_rate", 24000),
                frame_ms: number("frame_duration", 60),
            }
        }
        "stt" => ServerEvent::Stt(str_field("text")),
        "llm" => ServerEvent::Llm(str_field("emotion")),
        "tts" => match v.get("state").and_then(Value::as_str) {
            Some("start") => ServerEvent::TtsStart,
            Some("sentence_start") => ServerEvent::SentenceStart(str_field("text")),
            Some("stop") => ServerEvent::TtsStop,
            _ => other(),
        },
        "mcp" => ServerEvent::Mcp(v.get("payload").cloned().unwrap_or(Value::Null)),
        "alert" => ServerEvent::Alert(format!("{}: {}", str_field("status"), str_field("message"))),
        _ => other(),
    })
}

/// Why a downlink binary frame is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameProblem {
    /// The shared decoder rejected the header.
    Header(FrameError),
    /// v2 `version` field is not 2.
    VersionField(u16),
    /// Bytes after the declared payload (the header's size does not match the frame).
    TrailingBytes(usize),
    /// Empty payload, or not a parseable Opus packet.
    NotOpus,
    /// The packet holds a different duration than the server announced.
    Duration {
        /// Samples in the packet at the announced rate.
        samples: usize,
        /// Samples expected (rate × frame duration).
        expected: usize,
    },
}

/// Checks one downlink frame and returns its Opus payload.
pub fn check_downlink(
    protocol: BinaryProtocol,
    frame: &[u8],
    sample_rate: u32,
    frame_ms: u32,
) -> Result<&[u8], FrameProblem> {
    let decoded = protocol.decode(frame).map_err(FrameProblem::Header)?;
    let payload = decoded.payload;
    if protocol == BinaryProtocol::V2 {
        let version = u16::from_be_bytes([frame[0], frame[1]]);
        if version != 2 {
            return Err(FrameProblem::VersionField(version));
        }
    }
    let trailing = frame.len() - protocol.header_len() - payload.len();
    if trailing > 0 {
        return Err(FrameProblem::TrailingBytes(trailing));
    }
    if payload.is_empty() {
        return Err(FrameProblem::NotOpus);
    }
    let samples =
        opus::packet::get_nb_samples(payload, sample_rate).map_err(|_| FrameProblem::NotOpus)?;
    let expected = (sample_rate as usize * frame_ms as usize) / 1000;
    if samples != expected {
        return Err(FrameProblem::Duration { samples, expected });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One real 60 ms Opus packet at 24 kHz.
    fn packet_24k() -> Vec<u8> {
        let mut enc =
            opus::Encoder::new(24000, opus::Channels::Mono, opus::Application::Audio).unwrap();
        let pcm = vec![0i16; 1440];
        let mut out = vec![0u8; 1500];
        let n = enc.encode(&pcm, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn framed(protocol: BinaryProtocol, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        protocol.encode_into(payload, 0, &mut out).unwrap();
        out
    }

    #[test]
    fn correct_frames_pass_for_every_version() {
        let p = packet_24k();
        for protocol in [BinaryProtocol::V1, BinaryProtocol::V2, BinaryProtocol::V3] {
            let f = framed(protocol, &p);
            assert_eq!(check_downlink(protocol, &f, 24000, 60), Ok(&p[..]));
        }
    }

    #[test]
    fn v2_frame_read_as_v3_or_v3_read_as_v2_is_caught() {
        let p = packet_24k();
        let v2 = framed(BinaryProtocol::V2, &p);
        assert!(check_downlink(BinaryProtocol::V3, &v2, 24000, 60).is_err());
        let v3 = framed(BinaryProtocol::V3, &p);
        assert!(check_downlink(BinaryProtocol::V2, &v3, 24000, 60).is_err());
        // A headered frame sent to a v1 device is not a valid 60 ms Opus packet.
        assert!(check_downlink(BinaryProtocol::V1, &v3, 24000, 60).is_err());
    }

    #[test]
    fn wrong_v2_version_field_and_trailing_bytes_are_caught() {
        let p = packet_24k();
        let mut f = framed(BinaryProtocol::V2, &p);
        f[1] = 0;
        assert_eq!(
            check_downlink(BinaryProtocol::V2, &f, 24000, 60),
            Err(FrameProblem::VersionField(0))
        );
        let mut f = framed(BinaryProtocol::V3, &p);
        f.push(0);
        assert_eq!(
            check_downlink(BinaryProtocol::V3, &f, 24000, 60),
            Err(FrameProblem::TrailingBytes(1))
        );
    }

    #[test]
    fn wrong_duration_and_empty_payload_are_caught() {
        let p = packet_24k();
        assert_eq!(
            check_downlink(BinaryProtocol::V1, &p, 24000, 20),
            Err(FrameProblem::Duration {
                samples: 1440,
                expected: 480
            })
        );
        assert_eq!(
            check_downlink(BinaryProtocol::V3, &[0, 0, 0, 0], 24000, 60),
            Err(FrameProblem::NotOpus)
        );
    }

    #[test]
    fn server_messages_parse_by_type_and_state() {
        assert_eq!(
            parse_server_text(
                r#"{"type":"hello","transport":"websocket","session_id":"s1","audio_params":{"sample_rate":16000,"frame_duration":60}}"#
            ),
            Some(ServerEvent::Hello {
                session_id: "s1".into(),
                transport: "websocket".into(),
                sample_rate: 16000,
                frame_ms: 60
            })
        );
        assert_eq!(
            parse_server_text(r#"{"type":"hello","transport":"websocket"}"#),
            Some(ServerEvent::Hello {
                session_id: String::new(),
                transport: "websocket".into(),
                sample_rate: 24000,
                frame_ms: 60
            }),
            "firmware defaults when audio_params is missing"
        );
        assert_eq!(
            parse_server_text(r#"{"type":"stt","text":"hi","session_id":"s"}"#),
            Some(ServerEvent::Stt("hi".into()))
        );
        assert_eq!(
            parse_server_text(r#"{"type":"tts","state":"sentence_start","text":"Yes."}"#),
            Some(ServerEvent::SentenceStart("Yes.".into()))
        );
        assert_eq!(
            parse_server_text(r#"{"type":"tts","state":"stop"}"#),
            Some(ServerEvent::TtsStop)
        );
        assert!(matches!(
            parse_server_text(r#"{"type":"vad","state":"end"}"#),
            Some(ServerEvent::Other { kind, .. }) if kind == "vad"
        ));
        assert_eq!(parse_server_text("认证失败"), None);
        assert_eq!(parse_server_text(r#"{"text":"no type"}"#), None);
        assert_eq!(parse_server_text("[1,2]"), None);
    }
}
