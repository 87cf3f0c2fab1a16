//! Session and connection settings and the shard's [`Providers`], built once per shard from the
//! config (before, each connection rebuilt them, and each remote call looked its API key up
//! again).

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::config::{AsrProvider, Config, LlmProvider, ServerConfig, VisionProvider};
use crate::front_door::peer::TrustedProxies;
use crate::pipeline::audio_in::AudioInLimits;
use crate::protocol::{AudioParams, TokenSigner};
use crate::providers::asr::openai::OpenAiAsrSettings;
use crate::providers::http_client::{ApiKey, ClientSettings, HttpClient};
use crate::providers::llm::openai::OpenAiSettings;
use crate::providers::select::{Asr, Llm, LocalVoices, Tts};
use crate::providers::tts::openai::OpenAiTtsSettings;
use crate::providers::{LocalQueues, Providers};
use crate::session::dialogue::DialogueSettings;
use crate::session::{SessionSettings, SessionTimers, ToolSettings};
use crate::tools::intents::Intents;
use crate::tools::mcp::McpSettings;
use crate::tools::server::ServerTools;
use crate::tools::ToolSet;

/// Everything a connection reads from config, computed once per shard.
pub struct ConnectionSettings {
    /// The WebSocket port's limits and timeouts (`[server]`).
    pub server: ServerConfig,
    /// Balancers whose PROXY header and forwarded headers are believed.
    pub trusted: TrustedProxies,
    /// Device token authentication, when on.
    pub auth: Option<DeviceAuth>,
    /// A new session's settings (the vision capability is added per device).
    pub session: SessionSettings,
    /// Our downlink audio parameters (sent in hello).
    pub downlink: AudioParams,
    /// Issues the camera's `capabilities.vision{url, token}`.
    pub vision: VisionIssuer,
    /// A new turn is refused while the session's VAD worker queue is fuller than this share.
    pub busy_watermark: f64,
}

/// Device token authentication (`[server.auth]` with `enabled = true`).
pub struct DeviceAuth {
    /// Verifies device tokens (every configured secret is accepted: rotation).
    pub signer: TokenSigner,
    /// Devices let in without a token (`allowed_devices` when `allowed_devices_skip_token`).
    pub skip_token: Vec<String>,
    /// Token lifetime, seconds (0 = never expires).
    pub expire_seconds: u64,
}

/// How a device was let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LetIn {
    /// Its token verified for its id: the device is who it says.
    Token,
    /// It claimed an id that needs no token (`allowed_devices_skip_token`): unverified.
    Claimed,
}

impl DeviceAuth {
    /// Checks a device's token; `Err` says why it was refused.
    pub fn check(&self, identity: &crate::protocol::DeviceIdentity) -> Result<LetIn, String> {
        if self.skip_token.iter().any(|d| d == &identity.device_id) {
            return Ok(LetIn::Claimed);
        }
        let client_id = identity
            .client_id
            .as_deref()
            .unwrap_or(crate::protocol::token::MISSING_CLIENT_ID);
        self.signer
            .verify(
                identity.authorization.as_deref(),
                client_id,
                &identity.device_id,
                crate::clock::unix_now(),
                self.expire_seconds,
            )
            .map(|()| LetIn::Token)
            .map_err(|e| e.to_string())
    }
}

/// Hands each device with a camera the URL and token for `/mcp/vision/explain`.
pub struct VisionIssuer {
    /// Signs per-device vision tokens, when our own vision endpoint is on.
    pub signer: Option<TokenSigner>,
    /// `tools.vision_url` (empty: our HTTP port on the host the device connected to).
    pub url: String,
    /// `tools.vision_token` for an external endpoint.
    pub external_token: String,
    /// Lifetime of our tokens, seconds.
    pub token_expire_seconds: u64,
    /// The HTTP port as bound (known once the shard has bound it).
    pub http_port: Rc<Cell<u16>>,
}

impl VisionIssuer {
    /// `capabilities.vision{url, token}` for this device's MCP initialize: with our vision
    /// endpoint, its URL (or `tools.vision_url`) and a token for this device; without one, an
    /// external `tools.vision_url` with the configured token; else none.
    pub fn capability(
        &self,
        device_id: &str,
        host: Option<&str>,
        local_ip: Option<IpAddr>,
    ) -> Option<(String, String)> {
        match &self.signer {
            Some(signer) => {
                let url = if self.url.is_empty() {
                    crate::http::vision::explain_url(host, local_ip, self.http_port.get())
                } else {
                    self.url.clone()
                };
                let expires = crate::clock::unix_now().saturating_add(self.token_expire_seconds);
                Some((url, signer.sign_vision(device_id, expires)))
            }
            None => (!self.url.is_empty()).then(|| (self.url.clone(), self.external_token.clone())),
        }
    }
}

/// What a shard has already built that the settings share.
pub struct SharedParts {
    /// Whether the built-in responder answers (from the shard's providers).
    pub offline_llm: bool,
    /// Verifies device tokens when auth is on.
    pub signer: Option<TokenSigner>,
    /// Signs vision tokens (any configured secret, auth on or not).
    pub vision_signer: Option<TokenSigner>,
    /// Server-side tools.
    pub server_tools: Rc<ServerTools>,
    /// The tools of a session before its device announces any.
    pub base_tools: Rc<ToolSet>,
    /// The HTTP port as bound.
    pub http_port: Rc<Cell<u16>>,
    /// Trusted balancers.
    pub trusted: TrustedProxies,
}

impl ConnectionSettings {
    /// The settings `c` describes, around the parts the shard built.
    pub fn new(c: &Config, parts: SharedParts) -> ConnectionSettings {
        let s = &c.server;
        let t = &c.tools;
        let inference = &c.inference;
        let session = SessionSettings {
            timers: SessionTimers {
                hello_timeout: Duration::from_millis(s.hello_timeout_ms),
                no_voice_close: Duration::from_secs(c.session.no_voice_close_s),
                idle_close: Duration::from_secs(c.session.idle_close_s),
                drain_listen_grace: Duration::from_millis(s.drain.listen_grace_ms),
                manual_audio_gap: Duration::from_millis(c.session.manual_audio_gap_ms),
            },
            answer_ping: c.session.answer_ping,
            vad_events: c.session.vad_events,
            segmenter: c.vad.segmenter.clone(),
            limits: AudioInLimits {
                max_wait: Duration::from_millis(inference.max_wait_ms),
                max_backlog_chunks: (c.vad.segmenter.max_utterance_ms / 32) as usize,
                max_chunks_per_job: inference.max_chunks_per_job,
            },
            dialogue: DialogueSettings {
                offline_llm: parts.offline_llm,
                system_prompt: c.llm.system_prompt.clone(),
                history_messages: c.llm.history_messages,
                history_max_bytes: c.llm.history_max_bytes,
                out_rate: c.audio_out.sample_rate,
                complexity: c.audio_out.complexity,
                prebuffer_frames: c.audio_out.prebuffer_frames,
                stop_guard: Duration::from_millis(c.audio_out.stop_guard_ms),
                asr_timeout: Duration::from_millis(c.asr.timeout_ms),
                tts_timeout: Duration::from_millis(c.tts.timeout_ms),
                max_segment_chars: c.tts.max_segment_chars,
                tz_offset_minutes: (s.timezone_offset_hours * 60.0).round() as i64,
                emotions: true,
                max_tool_rounds: t.max_rounds,
                max_calls_per_round: t.max_calls_per_round,
                max_tool_result_bytes: t.max_result_bytes,
                intents: Intents::new(&t.exit_phrases, &t.wake_words),
                prefer_chinese: c.language.prefers_chinese(),
            },
            tools: ToolSettings {
                mcp: t.mcp.then(|| McpSettings {
                    call_timeout: Duration::from_millis(t.call_timeout_ms),
                    max_pending_calls: t.max_pending_calls,
                    max_tools: t.max_tools,
                    max_pages: t.max_list_pages,
                    vision: None,
                }),
                iot: t.iot,
                server: parts.server_tools,
                base: parts.base_tools,
                max_tools: t.max_tools,
                discovery_wait: Duration::from_millis(t.discovery_wait_ms),
                wake_greeting: t.wake_greeting.clone(),
                wake_greeting_zh: t.wake_greeting_zh.clone(),
            },
            log_lines_per_s: c.log.session_lines_per_s,
            log_burst: c.log.session_burst,
        };
        let vision_on = c.vision.provider != VisionProvider::None;
        ConnectionSettings {
            server: s.clone(),
            trusted: parts.trusted,
            auth: parts.signer.map(|signer| DeviceAuth {
                signer,
                skip_token: if s.auth.allowed_devices_skip_token {
                    s.auth.allowed_devices.clone()
                } else {
                    Vec::new()
                },
                expire_seconds: s.auth.expire_seconds,
            }),
            session,
            downlink: AudioParams {
                sample_rate: c.audio_out.sample_rate,
                ..AudioParams::downlink_default()
            },
            vision: VisionIssuer {
                signer: parts.vision_signer.filter(|_| vision_on),
                url: t.vision_url.clone(),
                external_token: t.vision_token.clone(),
                token_expire_seconds: c.vision.token_expire_seconds,
                http_port: parts.http_port,
            },
            busy_watermark: inference.busy_watermark,
        }
    }

    /// A new session (a fresh id) for `identity` under shard key `key`; `host` and `local_ip`
    /// are where the device reached us (for the vision URL handed to its camera).
    pub fn new_session(
        &self,
        key: u64,
        identity: crate::protocol::DeviceIdentity,
        host: Option<&str>,
        local_ip: Option<IpAddr>,
        authenticated: bool,
    ) -> crate::session::Session {
        // Vision tokens go only to sessions whose identity was verified (see `LetIn`).
        let vision = self
            .vision
            .capability(&identity.device_id, host, local_ip)
            .filter(|_| authenticated);
        crate::session::Session::new(
            uuid::Uuid::new_v4().to_string(),
            key,
            identity,
            self.downlink.clone(),
            self.session_settings(vision),
            std::time::Instant::now(),
        )
    }

    /// A new session's settings, with this device's vision capability.
    pub fn session_settings(&self, vision: Option<(String, String)>) -> SessionSettings {
        let mut s = self.session.clone();
        if let Some(mcp) = s.tools.mcp.as_mut() {
            mcp.vision = vision;
        }
        s
    }
}

/// The providers `config` selects, built once per shard; an error names a local provider whose
/// workers were not started (cannot happen when the queues come from the same config). API keys
/// are resolved here, once (the environment variable wins over the config value).
pub fn providers(config: &Config, queues: LocalQueues) -> Result<Providers, String> {
    let asr = match config.asr.provider {
        AsrProvider::Whisper => Asr::Local(
            queues
                .asr
                .ok_or("asr.provider = whisper but no Whisper workers were started")?,
        ),
        AsrProvider::Openai => {
            let o = &config.asr.openai;
            Asr::Remote(Rc::new(OpenAiAsrSettings {
                base_url: o.base_url.clone(),
                api_key: ApiKey::from_env_or("XIAOZHI_ASR_API_KEY", &o.api_key),
                model: o.model.clone(),
                language: (!o.language.is_empty()).then(|| o.language.clone()),
                timeout: Duration::from_millis(config.asr.timeout_ms),
            }))
        }
    };
    let llm = match config.llm.provider {
        LlmProvider::Offline => Llm::Offline,
        LlmProvider::Openai => {
            let o = &config.llm.openai;
            Llm::Remote(Rc::new(OpenAiSettings {
                base_url: o.base_url.clone(),
                api_key: ApiKey::from_env_or("XIAOZHI_LLM_API_KEY", &o.api_key),
                model: o.model.clone(),
                temperature: (o.temperature >= 0.0).then_some(o.temperature),
                max_tokens: (o.max_tokens > 0).then_some(o.max_tokens),
                connect_timeout: Duration::from_millis(o.connect_timeout_ms),
                first_token_timeout: Duration::from_millis(o.first_token_timeout_ms),
                total_timeout: Duration::from_millis(o.total_timeout_ms),
            }))
        }
    };
    let t = &config.tts;
    let tts = match config.local_tts() {
        Some(plan) => Tts::Local {
            pool: queues
                .tts
                .ok_or("a local tts.provider is selected but no TTS workers were started")?,
            voices: LocalVoices {
                kokoro_zh: plan.kokoro_zh,
                kokoro_en: plan.kokoro_en,
                piper: plan.piper,
                espeak: t.espeak_voice.clone(),
                espeak_zh: t.espeak_voice_zh.clone(),
            },
        },
        None => {
            let o = &t.openai;
            Tts::Remote(Rc::new(OpenAiTtsSettings {
                base_url: o.base_url.clone(),
                api_key: ApiKey::from_env_or("XIAOZHI_TTS_API_KEY", &o.api_key),
                model: o.model.clone(),
                voice: o.voice.clone(),
                response_format: o.response_format.clone(),
                sample_rate_for_pcm: o.sample_rate,
                timeout: Duration::from_millis(t.timeout_ms),
            }))
        }
    };
    Ok(Providers {
        vad: queues.vad,
        asr,
        llm,
        tts,
        http: Rc::new(HttpClient::new(ClientSettings {
            connect_timeout: Duration::from_millis(config.llm.openai.connect_timeout_ms),
            idle_timeout: Duration::from_secs(config.upstream.idle_timeout_s),
            max_pooled_per_origin: config.upstream.max_pooled_per_origin,
            ..ClientSettings::default()
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DeviceIdentity;

    fn identity(device: &str, authorization: Option<String>) -> DeviceIdentity {
        DeviceIdentity {
            device_id: device.into(),
            client_id: Some("client-1".into()),
            authorization,
            protocol_version: None,
            from_mqtt_gateway: false,
        }
    }

    fn auth(allowed: &[&str]) -> DeviceAuth {
        DeviceAuth {
            signer: TokenSigner::new("old").also_accepting("new"),
            skip_token: allowed.iter().map(|d| d.to_string()).collect(),
            expire_seconds: 3600,
        }
    }

    #[test]
    fn a_token_signed_with_either_secret_for_this_device_is_accepted() {
        let now = crate::clock::unix_now();
        let a = auth(&[]);
        let old = TokenSigner::new("old").sign("client-1", "aa:bb", now);
        let new = TokenSigner::new("new").sign("client-1", "aa:bb", now);
        assert_eq!(
            a.check(&identity("aa:bb", Some(format!("Bearer {old}")))),
            Ok(LetIn::Token)
        );
        assert_eq!(
            a.check(&identity("aa:bb", Some(format!("Bearer {new}")))),
            Ok(LetIn::Token)
        );
    }

    #[test]
    fn a_token_of_another_device_a_foreign_secret_or_none_is_refused() {
        let now = crate::clock::unix_now();
        let a = auth(&[]);
        let other = TokenSigner::new("old").sign("client-1", "victim", now);
        let foreign = TokenSigner::new("guess").sign("client-1", "aa:bb", now);
        assert!(a
            .check(&identity("aa:bb", Some(format!("Bearer {other}"))))
            .is_err());
        assert!(a
            .check(&identity("aa:bb", Some(format!("Bearer {foreign}"))))
            .is_err());
        assert!(a.check(&identity("aa:bb", None)).is_err());
    }

    #[test]
    fn devices_that_skip_the_token_are_let_in_as_claimed_not_verified() {
        assert_eq!(
            auth(&["aa:bb"]).check(&identity("aa:bb", None)),
            Ok(LetIn::Claimed)
        );
        assert!(auth(&["aa:bb"]).check(&identity("cc:dd", None)).is_err());
    }

    fn issuer(signer: Option<TokenSigner>, url: &str) -> VisionIssuer {
        VisionIssuer {
            signer,
            url: url.into(),
            external_token: "ext-token".into(),
            token_expire_seconds: 60,
            http_port: Rc::new(Cell::new(8003)),
        }
    }

    #[test]
    fn vision_capability_points_at_our_port_with_a_device_token_or_at_the_external_url() {
        let ours = issuer(Some(TokenSigner::new("s")), "");
        let (url, token) = ours
            .capability("aa:bb", Some("10.0.0.5:8000"), None)
            .expect("capability");
        assert_eq!(url, "http://10.0.0.5:8003/mcp/vision/explain");
        assert!(TokenSigner::new("s")
            .verify_vision(
                Some(&format!("Bearer {token}")),
                "aa:bb",
                crate::clock::unix_now()
            )
            .is_ok());
        let external = issuer(None, "https://vision.example/explain");
        assert_eq!(
            external.capability("aa:bb", None, None),
            Some((
                "https://vision.example/explain".to_string(),
                "ext-token".to_string()
            ))
        );
        assert_eq!(issuer(None, "").capability("aa:bb", None, None), None);
    }
}
