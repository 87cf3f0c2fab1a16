//! Server → device JSON text messages (spec §3.2 and §5).
//!
//! [`ServerMessage`] names every message the firmware understands, plus `pong` and the admin
//! `server` reply from the reference and an `error` message of our own. A message borrows its
//! text and payloads from the caller, so it is built right where it is sent and serialised by
//! [`ServerMessage::to_json`] straight into the one output string. Every message carries the
//! session's `session_id`, as the reference does. Key order is `type`, the message's own fields,
//! then `session_id`; the firmware (cJSON) does not care about order, but tests and logs do.
//!
//! `error` is not a firmware message type: the firmware logs unknown types and ignores them
//! (spec §5), so `{"type":"error","message":…,"session_id":…}` is safe to send to a device that
//! sent something malformed, and useful to a web client or a developer watching the socket.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::Value;

use super::client::AudioParams;

/// The transport named in a `hello`; the reply must echo what the device sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Direct WebSocket (also what the MQTT gateway uses towards the server).
    Websocket,
    /// MQTT + UDP, when this server talks to MQTT devices itself.
    Udp,
}

impl Transport {
    /// The wire name: `websocket` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Websocket => "websocket",
            Transport::Udp => "udp",
        }
    }
}

/// The `udp` object of an MQTT hello reply (spec §15.2); `encryption` is always `aes-128-ctr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpParams {
    /// Host or IP the device sends its datagrams to.
    pub server: String,
    /// UDP port.
    pub port: u16,
    /// AES-128 key, 32 lower-case hex characters.
    pub key: String,
    /// Initial header / IV, 32 lower-case hex characters.
    pub nonce: String,
}

/// One server → device text message; serialise it with [`ServerMessage::to_json`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerMessage<'a> {
    /// `hello` reply: opens the audio channel and announces the downlink audio parameters.
    Hello {
        /// Binary framing version in use.
        version: u8,
        /// Echo of the device's transport.
        transport: Transport,
        /// What the server actually encodes downlink (the device decodes at this rate).
        audio_params: &'a AudioParams,
        /// MQTT only: where and how to send UDP audio.
        udp: Option<&'a UdpParams>,
    },
    /// `stt`: the recognised user utterance.
    Stt {
        /// Recognised text.
        text: &'a str,
    },
    /// `llm`: the face to show; the firmware reads only `emotion`.
    Llm {
        /// The emoji character.
        text: &'a str,
        /// Emotion name, e.g. `happy`.
        emotion: &'a str,
    },
    /// `tts` `start`: enter the speaking state; downlink audio plays only after this.
    TtsStart,
    /// `tts` `sentence_start`: subtitle of the sentence whose audio follows.
    TtsSentenceStart {
        /// Sentence text.
        text: &'a str,
    },
    /// `tts` `stop`: leave the speaking state (send after the last frame has played out).
    TtsStop,
    /// `mcp`: a JSON-RPC 2.0 message for the device's MCP server.
    Mcp {
        /// The JSON-RPC message.
        payload: &'a Value,
    },
    /// `iot`: legacy device commands.
    Iot {
        /// `[{"name":…,"method":…,"parameters":{…}}]`.
        commands: &'a Value,
    },
    /// `system`: e.g. `reboot`; other commands are logged and ignored by the firmware.
    System {
        /// The command.
        command: &'a str,
    },
    /// `alert`: show an alert and play a vibration sound.
    Alert {
        /// Status line.
        status: &'a str,
        /// Message body.
        message: &'a str,
        /// Emotion name for the face.
        emotion: &'a str,
    },
    /// `custom`: free-form payload (firmware built with `CONFIG_RECEIVE_CUSTOM_MESSAGE`).
    Custom {
        /// Any JSON.
        payload: &'a Value,
    },
    /// `goodbye`: MQTT only; the device closes its UDP channel without replying.
    Goodbye,
    /// `pong`: reply to a client `ping`.
    Pong {
        /// Server time; the reference formats it as `YYYY-mm-dd HH:MM:SS`.
        timestamp: &'a str,
    },
    /// `server`: reply to an admin `server` command, as the reference shapes it.
    AdminReply {
        /// `success` or `error`.
        status: &'a str,
        /// Human-readable outcome.
        message: &'a str,
        /// The action that was requested.
        action: &'a str,
    },
    /// `error` (ours): the device's last message was malformed; firmware ignores this type.
    Error {
        /// What was wrong, e.g. a [`ParseError`](super::ParseError) rendered with `to_string`.
        message: &'a str,
    },
    /// `vad` (ours, off by default): where server VAD found speech, in audio time since the
    /// listen started. Firmware ignores unknown types; clients and benchmarks use it to see
    /// endpointing decisions.
    Vad {
        /// `start` (speech began) or `end` (utterance complete).
        state: &'a str,
        /// Audio time of the first voiced chunk, ms.
        start_ms: u64,
        /// Audio time where speech ended (`end` only; 0 on `start`), ms.
        end_ms: u64,
        /// Audio time at which the end was decided (`end` only), ms.
        decided_ms: u64,
    },
}

impl ServerMessage<'_> {
    /// The `type` field of this message.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMessage::Hello { .. } => "hello",
            ServerMessage::Stt { .. } => "stt",
            ServerMessage::Llm { .. } => "llm",
            ServerMessage::TtsStart
            | ServerMessage::TtsSentenceStart { .. }
            | ServerMessage::TtsStop => "tts",
            ServerMessage::Mcp { .. } => "mcp",
            ServerMessage::Iot { .. } => "iot",
            ServerMessage::System { .. } => "system",
            ServerMessage::Alert { .. } => "alert",
            ServerMessage::Custom { .. } => "custom",
            ServerMessage::Goodbye => "goodbye",
            ServerMessage::Pong { .. } => "pong",
            ServerMessage::AdminReply { .. } => "server",
            ServerMessage::Error { .. } => "error",
            ServerMessage::Vad { .. } => "vad",
        }
    }

    /// Serialises the message with its `session_id` into the JSON text the firmware expects.
    pub fn to_json(&self, session_id: &str) -> String {
        let envelope = Envelope {
            session_id,
            message: self,
        };
        // Cannot fail: every key is a string and a `serde_json::Value` holds no NaN/inf.
        serde_json::to_string(&envelope).unwrap_or_default()
    }
}

/// A message plus its session id, serialised as one flat object without intermediate buffers.
struct Envelope<'m, 'a> {
    session_id: &'m str,
    message: &'m ServerMessage<'a>,
}

#[derive(Serialize)]
struct UdpWire<'a> {
    server: &'a str,
    port: u16,
    encryption: &'static str,
    key: &'a str,
    nonce: &'a str,
}

#[derive(Serialize)]
struct ActionWire<'a> {
    action: &'a str,
}

impl Serialize for Envelope<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.message.kind())?;
        match *self.message {
            ServerMessage::Hello {
                version,
                transport,
                audio_params,
                udp,
            } => {
                map.serialize_entry("version", &version)?;
                map.serialize_entry("transport", &transport)?;
                if let Some(udp) = udp {
                    let wire = UdpWire {
                        server: &udp.server,
                        port: udp.port,
                        encryption: "aes-128-ctr",
                        key: &udp.key,
                        nonce: &udp.nonce,
                    };
                    map.serialize_entry("udp", &wire)?;
                }
                map.serialize_entry("audio_params", audio_params)?;
            }
            ServerMessage::Stt { text } => map.serialize_entry("text", text)?,
            ServerMessage::Llm { text, emotion } => {
                map.serialize_entry("text", text)?;
                map.serialize_entry("emotion", emotion)?;
            }
            ServerMessage::TtsStart => map.serialize_entry("state", "start")?,
            ServerMessage::TtsSentenceStart { text } => {
                map.serialize_entry("state", "sentence_start")?;
                map.serialize_entry("text", text)?;
            }
            ServerMessage::TtsStop => map.serialize_entry("state", "stop")?,
            ServerMessage::Mcp { payload } => map.serialize_entry("payload", payload)?,
            ServerMessage::Iot { commands } => map.serialize_entry("commands", commands)?,
            ServerMessage::System { command } => map.serialize_entry("command", command)?,
            ServerMessage::Alert {
                status,
                message,
                emotion,
            } => {
                map.serialize_entry("status", status)?;
                map.serialize_entry("message", message)?;
                map.serialize_entry("emotion", emotion)?;
            }
            ServerMessage::Custom { payload } => map.serialize_entry("payload", payload)?,
            ServerMessage::Goodbye => {}
            ServerMessage::Pong { timestamp } => map.serialize_entry("timestamp", timestamp)?,
            ServerMessage::AdminReply {
                status,
                message,
                action,
            } => {
                map.serialize_entry("status", status)?;
                map.serialize_entry("message", message)?;
                map.serialize_entry("content", &ActionWire { action })?;
            }
            ServerMessage::Error { message } => map.serialize_entry("message", message)?,
            ServerMessage::Vad {
                state,
                start_ms,
                end_ms,
                decided_ms,
            } => {
                map.serialize_entry("state", state)?;
                map.serialize_entry("start_ms", &start_ms)?;
                if state == "end" {
                    map.serialize_entry("end_ms", &end_ms)?;
                    map.serialize_entry("decided_ms", &decided_ms)?;
                }
            }
        }
        map.serialize_entry("session_id", self.session_id)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SID: &str = "0b9a4c1e-6f7d-4e0a-9a43-2f1d5c3b7e10";

    #[test]
    fn hello_reply_announces_downlink_params_and_session() {
        let params = AudioParams::downlink_default();
        let msg = ServerMessage::Hello {
            version: 1,
            transport: Transport::Websocket,
            audio_params: &params,
            udp: None,
        };
        assert_eq!(
            msg.to_json(SID),
            format!(
                r#"{{"type":"hello","version":1,"transport":"websocket","audio_params":{{"format":"opus","sample_rate":24000,"channels":1,"frame_duration":60}},"session_id":"{SID}"}}"#
            )
        );
    }

    #[test]
    fn udp_hello_reply_carries_udp_object_with_aes_ctr() {
        let params = AudioParams::downlink_default();
        let udp = UdpParams {
            server: "203.0.113.7".into(),
            port: 8884,
            key: "00112233445566778899aabbccddeeff".into(),
            nonce: "01000000cafef00d0000000000000000".into(),
        };
        let msg = ServerMessage::Hello {
            version: 3,
            transport: Transport::Udp,
            audio_params: &params,
            udp: Some(&udp),
        };
        let value: Value = serde_json::from_str(&msg.to_json("s")).unwrap();
        assert_eq!(
            value,
            json!({"type":"hello","version":3,"transport":"udp",
                "udp":{"server":"203.0.113.7","port":8884,"encryption":"aes-128-ctr",
                       "key":"00112233445566778899aabbccddeeff",
                       "nonce":"01000000cafef00d0000000000000000"},
                "audio_params":{"format":"opus","sample_rate":24000,"channels":1,"frame_duration":60},
                "session_id":"s"})
        );
    }

    #[test]
    fn tts_messages_have_exact_shapes() {
        assert_eq!(
            ServerMessage::TtsStart.to_json("s"),
            r#"{"type":"tts","state":"start","session_id":"s"}"#
        );
        assert_eq!(
            ServerMessage::TtsSentenceStart { text: "你好。" }.to_json("s"),
            r#"{"type":"tts","state":"sentence_start","text":"你好。","session_id":"s"}"#
        );
        assert_eq!(
            ServerMessage::TtsStop.to_json("s"),
            r#"{"type":"tts","state":"stop","session_id":"s"}"#
        );
    }

    #[test]
    fn text_messages_have_exact_shapes() {
        assert_eq!(
            ServerMessage::Stt { text: "hi" }.to_json("s"),
            r#"{"type":"stt","text":"hi","session_id":"s"}"#
        );
        assert_eq!(
            ServerMessage::Llm {
                text: "🙂",
                emotion: "happy"
            }
            .to_json("s"),
            r#"{"type":"llm","text":"🙂","emotion":"happy","session_id":"s"}"#
        );
        assert_eq!(
            ServerMessage::System { command: "reboot" }.to_json("s"),
            r#"{"type":"system","command":"reboot","session_id":"s"}"#
        );
        assert_eq!(
            ServerMessage::Alert {
                status: "Warning",
                message: "Battery low",
                emotion: "sad"
            }
            .to_json("s"),
            r#"{"type":"alert","status":"Warning","message":"Battery low","emotion":"sad","session_id":"s"}"#
        );
        assert_eq!(
            ServerMessage::Goodbye.to_json("s"),
            r#"{"type":"goodbye","session_id":"s"}"#
        );
        assert_eq!(
            ServerMessage::Pong {
                timestamp: "2026-01-01 08:00:00"
            }
            .to_json("s"),
            r#"{"type":"pong","timestamp":"2026-01-01 08:00:00","session_id":"s"}"#
        );
        assert_eq!(
            ServerMessage::AdminReply {
                status: "success",
                message: "ok",
                action: "restart"
            }
            .to_json("s"),
            r#"{"type":"server","status":"success","message":"ok","content":{"action":"restart"},"session_id":"s"}"#
        );
    }

    #[test]
    fn payload_messages_embed_json_verbatim() {
        // Keys in sorted order, so the output is the same with or without `preserve_order`.
        let rpc = json!({"id":2,"jsonrpc":"2.0","method":"tools/list","params":{"cursor":""}});
        assert_eq!(
            ServerMessage::Mcp { payload: &rpc }.to_json("s"),
            r#"{"type":"mcp","payload":{"id":2,"jsonrpc":"2.0","method":"tools/list","params":{"cursor":""}},"session_id":"s"}"#
        );
        let commands = json!([{"method":"TurnOn","name":"Lamp","parameters":{}}]);
        assert_eq!(
            ServerMessage::Iot {
                commands: &commands
            }
            .to_json("s"),
            r#"{"type":"iot","commands":[{"method":"TurnOn","name":"Lamp","parameters":{}}],"session_id":"s"}"#
        );
        let custom = json!({"k":[1,2]});
        assert_eq!(
            ServerMessage::Custom { payload: &custom }.to_json("s"),
            r#"{"type":"custom","payload":{"k":[1,2]},"session_id":"s"}"#
        );
    }

    #[test]
    fn error_message_escapes_quotes_in_text() {
        let message = r#"invalid "listen" message: field "state" must be "start", "stop" or "detect", got "jump""#;
        let text = ServerMessage::Error { message }.to_json("");
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({"type":"error","message":message,"session_id":""})
        );
        assert!(text.starts_with(r#"{"type":"error","#));
    }

    #[test]
    fn kind_matches_serialised_type() {
        let v = Value::Null;
        let p = AudioParams::default();
        let all = [
            ServerMessage::Hello {
                version: 1,
                transport: Transport::Websocket,
                audio_params: &p,
                udp: None,
            },
            ServerMessage::Stt { text: "" },
            ServerMessage::Llm {
                text: "",
                emotion: "",
            },
            ServerMessage::TtsStart,
            ServerMessage::TtsSentenceStart { text: "" },
            ServerMessage::TtsStop,
            ServerMessage::Mcp { payload: &v },
            ServerMessage::Iot { commands: &v },
            ServerMessage::System { command: "" },
            ServerMessage::Alert {
                status: "",
                message: "",
                emotion: "",
            },
            ServerMessage::Custom { payload: &v },
            ServerMessage::Goodbye,
            ServerMessage::Pong { timestamp: "" },
            ServerMessage::AdminReply {
                status: "",
                message: "",
                action: "",
            },
            ServerMessage::Error { message: "" },
        ];
        for msg in all {
            let value: Value = serde_json::from_str(&msg.to_json("x")).unwrap();
            assert_eq!(value["type"], msg.kind());
            assert_eq!(value["session_id"], "x");
        }
    }
}
