//! Device → server JSON text messages (spec §3.1 and §4).
//!
//! A device sends one JSON object per WebSocket text frame (or MQTT publish). This module turns
//! that text into a [`ClientMessage`] so the session dispatcher can `match` on it. Parsing is
//! tolerant where the firmware and the reference are tolerant — unknown extra fields are ignored,
//! `session_id` is never checked (the reference never validates it), missing optional fields get
//! defaults — and strict where a wrong value would otherwise be silently misread: a known message
//! type whose fields have the wrong type or an unknown enum value is a [`ParseError`] whose text
//! is clear enough to send back to the device in an `error` message. An unknown `type` is not an
//! error: it parses as [`ClientMessage::Unknown`] so the caller can log it and carry on, as the
//! reference does.

use serde::Serialize;
use serde_json::{Map, Value};

/// One device → server text message, by its `type` field.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// `hello`: opens the audio channel and announces the device's capabilities.
    Hello(Hello),
    /// `listen`: start/stop of the user's turn, or a local wake-word detection.
    Listen(Listen),
    /// `abort`: barge-in; stop speaking now (`reason` is informational only).
    Abort {
        /// Optional reason, e.g. `wake_word_detected`.
        reason: Option<String>,
    },
    /// `mcp`: a JSON-RPC 2.0 message from the device's MCP server.
    Mcp {
        /// The JSON-RPC message, passed through untouched.
        payload: Value,
    },
    /// `iot`: legacy (pre-MCP) device descriptors and states.
    Iot(Iot),
    /// `ping`: application keepalive from web clients (not sent by the firmware).
    Ping,
    /// `server`: admin command (`update_config`, `restart`) from the manager, not from devices.
    Server {
        /// The requested action.
        action: String,
        /// Action arguments (the reference expects `{"secret": …}`); `null` when absent.
        content: Value,
    },
    /// `goodbye`: the device closes the audio channel (MQTT transport only).
    Goodbye,
    /// Any other `type`: log it and ignore it.
    Unknown {
        /// The unrecognised `type` value.
        kind: String,
    },
}

/// The fields of a device `hello`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    /// Binary framing version the device will use (equals its `Protocol-Version` header).
    pub version: Option<u8>,
    /// `websocket` or `udp` (MQTT); the hello reply must echo it.
    pub transport: Option<String>,
    /// Capability flags.
    pub features: Features,
    /// Uplink audio parameters; `None` when the client sent none (the web client does not).
    pub audio_params: Option<AudioParams>,
}

/// The `features` object of a device `hello`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Features {
    /// The device runs an MCP server (always true in current firmware).
    pub mcp: bool,
    /// The device wants echo cancellation done on the server.
    pub aec: bool,
    /// Web client flag: whether to send `llm` emotion messages; `None` when not sent.
    pub emoji: Option<bool>,
    /// The whole `features` object as sent, for flags this type does not name (`glyph_push`, …).
    pub raw: Map<String, Value>,
}

/// Opus stream parameters, as sent in both the device's and the server's `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AudioParams {
    /// Codec name; `opus` for every real device (the reference also knows `pcm`).
    pub format: String,
    /// Sample rate in Hz; one of the Opus rates in [`AudioParams::SAMPLE_RATES`].
    pub sample_rate: u32,
    /// Channel count, 1 or 2.
    pub channels: u8,
    /// Frame length in milliseconds; one of [`AudioParams::FRAME_DURATIONS_MS`].
    pub frame_duration: u32,
}

impl AudioParams {
    /// Sample rates Opus can encode and decode natively.
    pub const SAMPLE_RATES: [u32; 5] = [8000, 12000, 16000, 24000, 48000];
    /// Frame durations (ms) accepted: Opus frame sizes of 10 ms and up, multi-frame up to 120 ms.
    pub const FRAME_DURATIONS_MS: [u32; 7] = [10, 20, 40, 60, 80, 100, 120];

    /// What the firmware sends uplink: Opus, 16 kHz, mono, 60 ms.
    pub fn device_default() -> Self {
        AudioParams {
            format: "opus".to_owned(),
            sample_rate: 16000,
            channels: 1,
            frame_duration: 60,
        }
    }

    /// What the firmware assumes downlink when the server hello omits it: Opus, 24 kHz, mono, 60 ms.
    pub fn downlink_default() -> Self {
        AudioParams {
            sample_rate: 24000,
            ..Self::device_default()
        }
    }
}

impl Default for AudioParams {
    fn default() -> Self {
        Self::device_default()
    }
}

/// The fields of a `listen` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// What happened.
    pub state: ListenState,
    /// Listening mode; any `listen` carrying it updates the session's mode.
    pub mode: Option<ListenMode>,
    /// The wake word, on `detect`.
    pub text: Option<String>,
}

/// The `state` of a `listen` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenState {
    /// The device started capturing the user's turn.
    Start,
    /// The user ended the turn (push-to-talk released).
    Stop,
    /// A local wake word fired; `text` holds it.
    Detect,
}

/// The `mode` of a `listen` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenMode {
    /// Server VAD ends each utterance; the mic is closed while speaking.
    Auto,
    /// Push-to-talk: the utterance ends on `listen/stop`.
    Manual,
    /// Mic stays open while speaking (AEC); server VAD ends utterances.
    Realtime,
}

/// The fields of a legacy `iot` message; values are passed through untouched.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Iot {
    /// Thing descriptors (an array in practice).
    pub descriptors: Option<Value>,
    /// Property states (an array in practice).
    pub states: Option<Value>,
    /// Old firmware's `update: true` flag.
    pub update: Option<bool>,
}

/// Why a device text message could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The text is not JSON at all.
    #[error("message is not valid JSON: {0}")]
    NotJson(String),
    /// The text is JSON but not an object.
    #[error("message must be a JSON object, got {0}")]
    NotObject(&'static str),
    /// The object has no `type`, or `type` is not a string.
    #[error("message must have a string field \"type\"")]
    MissingType,
    /// A known message type with a missing or wrong field.
    #[error("invalid \"{kind}\" message: {reason}")]
    InvalidField {
        /// The message `type`.
        kind: &'static str,
        /// What is wrong, naming the field.
        reason: String,
    },
}

/// Parses one device text frame into a [`ClientMessage`].
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ParseError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| ParseError::NotJson(e.to_string()))?;
    let mut object = match value {
        Value::Object(object) => object,
        other => return Err(ParseError::NotObject(json_kind(&other))),
    };
    let kind = match object.remove("type") {
        Some(Value::String(kind)) => kind,
        _ => return Err(ParseError::MissingType),
    };
    let message = match kind.as_str() {
        "hello" => ClientMessage::Hello(parse_hello(&mut Fields::new("hello", &mut object))?),
        "listen" => ClientMessage::Listen(parse_listen(&mut Fields::new("listen", &mut object))?),
        "abort" => ClientMessage::Abort {
            reason: Fields::new("abort", &mut object).opt_string("reason")?,
        },
        "mcp" => ClientMessage::Mcp {
            payload: Fields::new("mcp", &mut object).required_value("payload")?,
        },
        "iot" => {
            let mut f = Fields::new("iot", &mut object);
            ClientMessage::Iot(Iot {
                descriptors: f.take("descriptors"),
                states: f.take("states"),
                update: f.opt_bool("update")?,
            })
        }
        "ping" => ClientMessage::Ping,
        "server" => {
            let mut f = Fields::new("server", &mut object);
            ClientMessage::Server {
                action: f.required_string("action")?,
                content: f.take("content").unwrap_or(Value::Null),
            }
        }
        "goodbye" => ClientMessage::Goodbye,
        _ => ClientMessage::Unknown { kind },
    };
    Ok(message)
}

fn parse_hello(f: &mut Fields<'_>) -> Result<Hello, ParseError> {
    let version = match f.opt_u64("version")? {
        None => None,
        Some(v) => Some(u8::try_from(v).map_err(|_| f.invalid("version", "must be 0..=255"))?),
    };
    let transport = f.opt_string("transport")?;
    let features = match f.take("features") {
        None => Features::default(),
        Some(Value::Object(raw)) => parse_features(f, raw)?,
        Some(other) => return Err(f.wrong_type("features", "an object", &other)),
    };
    // The firmware writes `audio_params`; some clients write `audioParams`. Snake case wins.
    let (name, params) = match f.take("audio_params") {
        Some(value) => ("audio_params", Some(value)),
        None => ("audioParams", f.take("audioParams")),
    };
    let audio_params = match params {
        None => None,
        Some(Value::Object(mut object)) => {
            let mut inner = Fields {
                kind: f.kind,
                prefix: if name == "audio_params" {
                    "audio_params."
                } else {
                    "audioParams."
                },
                object: &mut object,
            };
            Some(parse_audio_params(&mut inner)?)
        }
        Some(other) => return Err(f.wrong_type(name, "an object", &other)),
    };
    Ok(Hello {
        version,
        transport,
        features,
        audio_params,
    })
}

fn parse_features(f: &Fields<'_>, raw: Map<String, Value>) -> Result<Features, ParseError> {
    let flag = |name: &'static str| -> Result<Option<bool>, ParseError> {
        match raw.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(f.wrong_type_at("features.", name, "a boolean", other)),
        }
    };
    Ok(Features {
        mcp: flag("mcp")?.unwrap_or(false),
        aec: flag("aec")?.unwrap_or(false),
        emoji: flag("emoji")?,
        raw,
    })
}

/// Missing fields take the firmware's uplink defaults; values no Opus stream can have are denied
/// (rather than clamped) so a misconfigured client fails loudly at hello instead of producing
/// garbled audio later.
fn parse_audio_params(f: &mut Fields<'_>) -> Result<AudioParams, ParseError> {
    let defaults = AudioParams::device_default();
    let format = f.opt_string("format")?.unwrap_or(defaults.format);
    let sample_rate = f
        .opt_u64("sample_rate")?
        .unwrap_or(defaults.sample_rate.into());
    let sample_rate = u32::try_from(sample_rate)
        .ok()
        .filter(|rate| AudioParams::SAMPLE_RATES.contains(rate))
        .ok_or_else(|| {
            f.invalid(
                "sample_rate",
                format!("must be one of 8000, 12000, 16000, 24000, 48000, got {sample_rate}"),
            )
        })?;
    let channels = f.opt_u64("channels")?.unwrap_or(defaults.channels.into());
    let channels = match channels {
        1 => 1,
        2 => 2,
        other => return Err(f.invalid("channels", format!("must be 1 or 2, got {other}"))),
    };
    let frame_duration = f
        .opt_u64("frame_duration")?
        .unwrap_or(defaults.frame_duration.into());
    let frame_duration = u32::try_from(frame_duration)
        .ok()
        .filter(|ms| AudioParams::FRAME_DURATIONS_MS.contains(ms))
        .ok_or_else(|| {
            f.invalid(
                "frame_duration",
                format!("must be one of 10, 20, 40, 60, 80, 100, 120 (ms), got {frame_duration}"),
            )
        })?;
    Ok(AudioParams {
        format,
        sample_rate,
        channels,
        frame_duration,
    })
}

fn parse_listen(f: &mut Fields<'_>) -> Result<Listen, ParseError> {
    let state = f.required_string("state")?;
    let state = match state.as_str() {
        "start" => ListenState::Start,
        "stop" => ListenState::Stop,
        "detect" => ListenState::Detect,
        _ => {
            return Err(f.invalid(
                "state",
                format!("must be \"start\", \"stop\" or \"detect\", got \"{state}\""),
            ))
        }
    };
    let mode = match f.opt_string("mode")?.as_deref() {
        None => None,
        Some("auto") => Some(ListenMode::Auto),
        Some("manual") => Some(ListenMode::Manual),
        Some("realtime") => Some(ListenMode::Realtime),
        Some(other) => {
            return Err(f.invalid(
                "mode",
                format!("must be \"auto\", \"manual\" or \"realtime\", got \"{other}\""),
            ))
        }
    };
    Ok(Listen {
        state,
        mode,
        text: f.opt_string("text")?,
    })
}

/// The fields of one message object, taken out one by one; `null` counts as absent.
struct Fields<'m> {
    kind: &'static str,
    prefix: &'static str,
    object: &'m mut Map<String, Value>,
}

impl<'m> Fields<'m> {
    fn new(kind: &'static str, object: &'m mut Map<String, Value>) -> Self {
        Fields {
            kind,
            prefix: "",
            object,
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.object.remove(name).filter(|value| !value.is_null())
    }

    fn invalid(&self, name: &str, what: impl std::fmt::Display) -> ParseError {
        ParseError::InvalidField {
            kind: self.kind,
            reason: format!("field \"{}{name}\" {what}", self.prefix),
        }
    }

    fn wrong_type(&self, name: &str, expected: &str, got: &Value) -> ParseError {
        self.wrong_type_at(self.prefix, name, expected, got)
    }

    fn wrong_type_at(&self, prefix: &str, name: &str, expected: &str, got: &Value) -> ParseError {
        ParseError::InvalidField {
            kind: self.kind,
            reason: format!(
                "field \"{prefix}{name}\" must be {expected}, got {}",
                json_kind(got)
            ),
        }
    }

    fn opt_string(&mut self, name: &str) -> Result<Option<String>, ParseError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(name, "a string", &other)),
        }
    }

    fn required_string(&mut self, name: &str) -> Result<String, ParseError> {
        self.opt_string(name)?
            .ok_or_else(|| self.invalid(name, "is missing (expected a string)"))
    }

    fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, ParseError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(self.wrong_type(name, "a boolean", &other)),
        }
    }

    fn opt_u64(&mut self, name: &str) -> Result<Option<u64>, ParseError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.invalid(name, format!("must be a whole number, got {n}"))),
            Some(other) => Err(self.wrong_type(name, "a number", &other)),
        }
    }

    fn required_value(&mut self, name: &str) -> Result<Value, ParseError> {
        self.take(name)
            .ok_or_else(|| self.invalid(name, "is missing"))
    }
}

/// JSON type name for error messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> ClientMessage {
        match parse_client_message(text) {
            Ok(message) => message,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    fn invalid(text: &str) -> String {
        match parse_client_message(text) {
            Err(e @ ParseError::InvalidField { .. }) => e.to_string(),
            other => panic!("{text}: expected InvalidField, got {other:?}"),
        }
    }

    #[test]
    fn hello_from_firmware_parses_all_fields() {
        let text = r#"{"type":"hello","version":2,
            "features":{"aec":true,"mcp":true,"glyph_push":true},
            "text_font":{"bundle":"noto-v1","charset":"common","size":20,"bpp":4},
            "transport":"websocket",
            "audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60},
            "session_id":""}"#;
        let ClientMessage::Hello(hello) = parse(text) else {
            panic!("not a hello")
        };
        assert_eq!(hello.version, Some(2));
        assert_eq!(hello.transport.as_deref(), Some("websocket"));
        assert!(hello.features.mcp);
        assert!(hello.features.aec);
        assert_eq!(hello.features.emoji, None);
        assert_eq!(hello.features.raw.get("glyph_push"), Some(&json!(true)));
        assert_eq!(hello.audio_params, Some(AudioParams::device_default()));
    }

    #[test]
    fn hello_without_audio_params_or_features_uses_none_and_defaults() {
        let ClientMessage::Hello(hello) = parse(r#"{"type":"hello"}"#) else {
            panic!("not a hello")
        };
        assert_eq!(
            hello,
            Hello {
                version: None,
                transport: None,
                features: Features::default(),
                audio_params: None,
            }
        );
    }

    #[test]
    fn hello_from_web_client_reads_emoji_flag() {
        let text = r#"{"type":"hello","device_id":"web","transport":"websocket","features":{"mcp":true,"emoji":false}}"#;
        let ClientMessage::Hello(hello) = parse(text) else {
            panic!("not a hello")
        };
        assert_eq!(hello.features.emoji, Some(false));
        assert!(hello.features.mcp);
        assert!(!hello.features.aec);
        assert_eq!(hello.audio_params, None);
    }

    #[test]
    fn hello_accepts_camel_case_audio_params() {
        let text = r#"{"type":"hello","audioParams":{"format":"opus","sample_rate":24000,"channels":1,"frame_duration":20}}"#;
        let ClientMessage::Hello(hello) = parse(text) else {
            panic!("not a hello")
        };
        assert_eq!(
            hello.audio_params,
            Some(AudioParams {
                format: "opus".into(),
                sample_rate: 24000,
                channels: 1,
                frame_duration: 20,
            })
        );
    }

    #[test]
    fn hello_prefers_snake_case_when_both_spellings_present() {
        let text = r#"{"type":"hello","audioParams":{"sample_rate":8000},"audio_params":{"sample_rate":48000}}"#;
        let ClientMessage::Hello(hello) = parse(text) else {
            panic!("not a hello")
        };
        assert_eq!(hello.audio_params.map(|p| p.sample_rate), Some(48000));
    }

    #[test]
    fn hello_fills_missing_audio_params_fields_with_defaults() {
        let ClientMessage::Hello(hello) =
            parse(r#"{"type":"hello","audio_params":{"format":"pcm","sample_rate":null}}"#)
        else {
            panic!("not a hello")
        };
        assert_eq!(
            hello.audio_params,
            Some(AudioParams {
                format: "pcm".into(),
                ..AudioParams::device_default()
            })
        );
    }

    #[test]
    fn hello_rejects_non_opus_sample_rate() {
        assert_eq!(
            invalid(r#"{"type":"hello","audio_params":{"sample_rate":44100}}"#),
            r#"invalid "hello" message: field "audio_params.sample_rate" must be one of 8000, 12000, 16000, 24000, 48000, got 44100"#
        );
        assert_eq!(
            invalid(r#"{"type":"hello","audioParams":{"sample_rate":99999999999}}"#),
            r#"invalid "hello" message: field "audioParams.sample_rate" must be one of 8000, 12000, 16000, 24000, 48000, got 99999999999"#
        );
    }

    #[test]
    fn hello_rejects_unsupported_frame_duration_and_channels() {
        assert_eq!(
            invalid(r#"{"type":"hello","audio_params":{"frame_duration":30}}"#),
            r#"invalid "hello" message: field "audio_params.frame_duration" must be one of 10, 20, 40, 60, 80, 100, 120 (ms), got 30"#
        );
        assert_eq!(
            invalid(r#"{"type":"hello","audio_params":{"channels":0}}"#),
            r#"invalid "hello" message: field "audio_params.channels" must be 1 or 2, got 0"#
        );
        assert_eq!(
            invalid(r#"{"type":"hello","audio_params":{"sample_rate":16000.5}}"#),
            r#"invalid "hello" message: field "audio_params.sample_rate" must be a whole number, got 16000.5"#
        );
    }

    #[test]
    fn hello_rejects_wrongly_typed_fields() {
        assert_eq!(
            invalid(r#"{"type":"hello","version":"2"}"#),
            r#"invalid "hello" message: field "version" must be a number, got a string"#
        );
        assert_eq!(
            invalid(r#"{"type":"hello","version":300}"#),
            r#"invalid "hello" message: field "version" must be 0..=255"#
        );
        assert_eq!(
            invalid(r#"{"type":"hello","features":[]}"#),
            r#"invalid "hello" message: field "features" must be an object, got an array"#
        );
        assert_eq!(
            invalid(r#"{"type":"hello","features":{"mcp":"yes"}}"#),
            r#"invalid "hello" message: field "features.mcp" must be a boolean, got a string"#
        );
        assert_eq!(
            invalid(r#"{"type":"hello","audio_params":"opus"}"#),
            r#"invalid "hello" message: field "audio_params" must be an object, got a string"#
        );
    }

    #[test]
    fn listen_parses_every_state_and_mode() {
        assert_eq!(
            parse(r#"{"session_id":"s","type":"listen","state":"start","mode":"auto"}"#),
            ClientMessage::Listen(Listen {
                state: ListenState::Start,
                mode: Some(ListenMode::Auto),
                text: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"listen","state":"start","mode":"manual"}"#),
            ClientMessage::Listen(Listen {
                state: ListenState::Start,
                mode: Some(ListenMode::Manual),
                text: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"listen","state":"start","mode":"realtime"}"#),
            ClientMessage::Listen(Listen {
                state: ListenState::Start,
                mode: Some(ListenMode::Realtime),
                text: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"listen","state":"stop"}"#),
            ClientMessage::Listen(Listen {
                state: ListenState::Stop,
                mode: None,
                text: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"listen","state":"detect","text":"你好小智"}"#),
            ClientMessage::Listen(Listen {
                state: ListenState::Detect,
                mode: None,
                text: Some("你好小智".into())
            })
        );
    }

    #[test]
    fn listen_rejects_unknown_state_and_mode() {
        assert_eq!(
            invalid(r#"{"type":"listen","state":"jump"}"#),
            r#"invalid "listen" message: field "state" must be "start", "stop" or "detect", got "jump""#
        );
        assert_eq!(
            invalid(r#"{"type":"listen"}"#),
            r#"invalid "listen" message: field "state" is missing (expected a string)"#
        );
        assert_eq!(
            invalid(r#"{"type":"listen","state":"start","mode":"turbo"}"#),
            r#"invalid "listen" message: field "mode" must be "auto", "manual" or "realtime", got "turbo""#
        );
        assert_eq!(
            invalid(r#"{"type":"listen","state":"detect","text":5}"#),
            r#"invalid "listen" message: field "text" must be a string, got a number"#
        );
    }

    #[test]
    fn abort_with_and_without_reason() {
        assert_eq!(
            parse(r#"{"session_id":"s","type":"abort"}"#),
            ClientMessage::Abort { reason: None }
        );
        assert_eq!(
            parse(r#"{"type":"abort","reason":"wake_word_detected"}"#),
            ClientMessage::Abort {
                reason: Some("wake_word_detected".into())
            }
        );
        assert_eq!(
            invalid(r#"{"type":"abort","reason":1}"#),
            r#"invalid "abort" message: field "reason" must be a string, got a number"#
        );
    }

    #[test]
    fn mcp_passes_payload_through_and_requires_it() {
        assert_eq!(
            parse(r#"{"type":"mcp","payload":{"jsonrpc":"2.0","id":1,"result":{}}}"#),
            ClientMessage::Mcp {
                payload: json!({"jsonrpc":"2.0","id":1,"result":{}})
            }
        );
        assert_eq!(
            invalid(r#"{"type":"mcp"}"#),
            r#"invalid "mcp" message: field "payload" is missing"#
        );
        assert_eq!(
            invalid(r#"{"type":"mcp","payload":null}"#),
            r#"invalid "mcp" message: field "payload" is missing"#
        );
    }

    #[test]
    fn iot_keeps_descriptors_states_and_update() {
        assert_eq!(
            parse(r#"{"type":"iot","update":true,"descriptors":[{"name":"Speaker"}]}"#),
            ClientMessage::Iot(Iot {
                descriptors: Some(json!([{"name":"Speaker"}])),
                states: None,
                update: Some(true),
            })
        );
        assert_eq!(
            parse(r#"{"type":"iot","states":[]}"#),
            ClientMessage::Iot(Iot {
                descriptors: None,
                states: Some(json!([])),
                update: None,
            })
        );
        assert_eq!(
            invalid(r#"{"type":"iot","update":"yes"}"#),
            r#"invalid "iot" message: field "update" must be a boolean, got a string"#
        );
    }

    #[test]
    fn ping_goodbye_and_server_parse() {
        assert_eq!(parse(r#"{"type":"ping"}"#), ClientMessage::Ping);
        assert_eq!(
            parse(r#"{"type":"goodbye","session_id":"s"}"#),
            ClientMessage::Goodbye
        );
        assert_eq!(
            parse(r#"{"type":"server","action":"restart","content":{"secret":"x"}}"#),
            ClientMessage::Server {
                action: "restart".into(),
                content: json!({"secret":"x"})
            }
        );
        assert_eq!(
            parse(r#"{"type":"server","action":"update_config"}"#),
            ClientMessage::Server {
                action: "update_config".into(),
                content: Value::Null
            }
        );
        assert_eq!(
            invalid(r#"{"type":"server"}"#),
            r#"invalid "server" message: field "action" is missing (expected a string)"#
        );
    }

    #[test]
    fn unknown_type_is_not_an_error() {
        assert_eq!(
            parse(r#"{"type":"glyph_request","chars":"你"}"#),
            ClientMessage::Unknown {
                kind: "glyph_request".into()
            }
        );
        assert_eq!(
            parse(r#"{"type":""}"#),
            ClientMessage::Unknown { kind: "".into() }
        );
    }

    #[test]
    fn extra_fields_never_fail_parsing() {
        assert_eq!(
            parse(r#"{"type":"ping","session_id":5,"extra":{"deep":[1,2]}}"#),
            ClientMessage::Ping
        );
    }

    #[test]
    fn malformed_text_gives_distinct_errors() {
        assert!(matches!(
            parse_client_message("hello"),
            Err(ParseError::NotJson(_))
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"ping""#),
            Err(ParseError::NotJson(_))
        ));
        assert_eq!(
            parse_client_message("42"),
            Err(ParseError::NotObject("a number"))
        );
        assert_eq!(
            parse_client_message(r#"["hello"]"#),
            Err(ParseError::NotObject("an array"))
        );
        assert_eq!(
            parse_client_message(r#"{"state":"start"}"#),
            Err(ParseError::MissingType)
        );
        assert_eq!(
            parse_client_message(r#"{"type":7}"#),
            Err(ParseError::MissingType)
        );
    }

    #[test]
    fn error_messages_read_well() {
        let err = parse_client_message("@").unwrap_err().to_string();
        assert!(
            err.starts_with("message is not valid JSON: expected value at line 1 column 1"),
            "{err}"
        );
        assert_eq!(
            ParseError::NotObject("a string").to_string(),
            "message must be a JSON object, got a string"
        );
        assert_eq!(
            ParseError::MissingType.to_string(),
            r#"message must have a string field "type""#
        );
    }
}
