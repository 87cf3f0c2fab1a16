//! Server configuration: one serde tree with every knob, its defaults in one place.
//!
//! The file format is TOML (`config/default.toml` documents every key). A config is built from
//! the built-in defaults, then an optional file, then `--set key=value` overrides applied in
//! order on the parsed tree, so every key can be set the same way from the command line.
//! Unknown keys and bad values fail at start with the key's dotted path and the reason.
//!
//! Past 800 lines on purpose: one concept, the knobs. Every section's keys and defaults sit in
//! this one file, the single place to read what can be configured; logic that derives from them
//! lives in submodules (`language`: what the top-level `language` picks; `mqtt`: the MQTT
//! transport's section and its checks).

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::front_door::peer::TrustedProxies;
use crate::pipeline::segmenter::SegmenterConfig;
use crate::providers::asr::ChineseScript;
use crate::providers::onnx::OrtMemory;
use crate::tools::server::ServerToolName;

mod language;
mod mqtt;
pub use language::{Language, LocalTtsPlan};
pub use mqtt::{MqttConfig, OtaTransport};

/// Everything the server reads at start.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The language the embedded default speaks: `en`, `zh` or `auto` (both). It picks the
    /// Whisper model and language and the local voices unless those are set explicitly
    /// (`asr.whisper.model`, `asr.whisper.language`, `tts.provider` other than `local`).
    pub language: Language,
    /// Listeners, limits and the addresses handed out to devices.
    pub server: ServerConfig,
    /// Per-session timers.
    pub session: SessionConfig,
    /// Core plan and executor tuning.
    pub runtime: RuntimeConfig,
    /// Inference workers: models, queues, batching, load shedding.
    pub inference: InferenceConfig,
    /// Voice activity detection and utterance segmentation.
    pub vad: VadConfig,
    /// Speech recognition.
    pub asr: AsrConfig,
    /// The language model.
    pub llm: LlmConfig,
    /// Speech synthesis.
    pub tts: TtsConfig,
    /// Downlink audio: encoding and pacing.
    pub audio_out: AudioOutConfig,
    /// Device tools (MCP, IoT), server tools, LLM tool calling and built-in intents.
    pub tools: ToolsConfig,
    /// The camera's `/mcp/vision/explain` endpoint and the vision model behind it.
    pub vision: VisionConfig,
    /// Logging.
    pub log: LogConfig,
    /// Latency histograms: interval log and dumps.
    pub metrics: MetricsConfig,
    /// The MQTT + UDP device transport (off by default).
    pub mqtt: MqttConfig,
    /// HTTP connections to remote providers (ASR, LLM, TTS, vision), pooled per shard.
    pub upstream: UpstreamConfig,
}

/// The per-shard pool of HTTP connections to remote providers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Connections a shard keeps per origin (scheme, host, port) for reuse once their request
    /// is answered; beyond it a finished connection is closed.
    pub max_pooled_per_origin: usize,
    /// A pooled connection unused this long is closed instead of reused, s.
    pub idle_timeout_s: u64,
}

impl Default for UpstreamConfig {
    /// The HTTP client's own defaults, so the two cannot drift apart.
    fn default() -> Self {
        let client = crate::providers::http_client::ClientSettings::default();
        Self {
            max_pooled_per_origin: client.max_pooled_per_origin,
            idle_timeout_s: client.idle_timeout.as_secs(),
        }
    }
}

/// Device tools, server tools, LLM tool calling and the built-in intents.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolsConfig {
    /// Use the device's MCP tools (initialize + tools/list after hello when it announces MCP).
    pub mcp: bool,
    /// Accept legacy `iot` descriptors from old firmware as tools.
    pub iot: bool,
    /// Deadline of each device request (initialize, a tools/list page, tools/call), ms.
    pub call_timeout_ms: u64,
    /// Most LLM rounds with tool calls per turn; the round after the last gets no tools; 0 = no
    /// tools are offered to the LLM.
    pub max_rounds: u32,
    /// Most tool calls carried out per LLM round.
    pub max_calls_per_round: usize,
    /// Most device tool calls awaiting an answer per session.
    pub max_pending_calls: usize,
    /// Most tools kept from a device and offered to the LLM.
    pub max_tools: usize,
    /// Most tools/list pages read from a device.
    pub max_list_pages: u32,
    /// A turn ready for its answer while the device's tools are still being listed (right
    /// after hello) waits for the list at most this long, ms.
    pub discovery_wait_ms: u64,
    /// Longest tool result fed back to the LLM, bytes.
    pub max_result_bytes: usize,
    /// `capabilities.vision.url` sent in MCP initialize (camera explain endpoint). Empty: with
    /// `vision.provider` set, this server's own `http://<Host of the WebSocket request>:
    /// <http_port>/mcp/vision/explain`; otherwise no vision capability.
    pub vision_url: String,
    /// `capabilities.vision.token` sent with an external `vision_url` while `vision.provider`
    /// is "none"; with a provider set, each device gets its own expiring token instead.
    pub vision_token: String,
    /// Server-side tools offered to the LLM (built in: "get_time", "handle_exit_intent").
    pub server_tools: Vec<ServerToolName>,
    /// Utterances that end the session after a spoken farewell (whole utterance, any case,
    /// punctuation ignored).
    pub exit_phrases: Vec<String>,
    /// Wake words: a `listen detect` with one of these is greeted instead of answered.
    pub wake_words: Vec<String>,
    /// Greeting after an English wake word; empty = none.
    pub wake_greeting: String,
    /// Greeting after a Chinese wake word; empty = none.
    pub wake_greeting_zh: String,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            mcp: true,
            iot: true,
            call_timeout_ms: 10_000,
            max_rounds: 3,
            max_calls_per_round: 4,
            max_pending_calls: 8,
            max_tools: 32,
            max_list_pages: 8,
            discovery_wait_ms: 2_000,
            max_result_bytes: 2048,
            vision_url: String::new(),
            vision_token: String::new(),
            server_tools: vec![ServerToolName::GetTime, ServerToolName::HandleExitIntent],
            exit_phrases: strings(&["goodbye", "bye bye", "exit", "退出", "关闭", "再见"]),
            wake_words: strings(&[
                "你好小智",
                "你好小志",
                "嗨小智",
                "hi xiaozhi",
                "hey xiaozhi",
                "hello xiaozhi",
            ]),
            wake_greeting: "Hi! What can I do for you?".into(),
            wake_greeting_zh: "你好，有什么可以帮你？".into(),
        }
    }
}

/// Which vision model explains the camera's photos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VisionProvider {
    /// No vision endpoint (the route answers 503).
    None,
    /// OpenAI-compatible `POST /chat/completions` with an `image_url` part.
    Openai,
}

/// The camera's `POST /mcp/vision/explain` endpoint (spec §13) on the HTTP port.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VisionConfig {
    /// `none` (default) or `openai`.
    pub provider: VisionProvider,
    /// Largest request body (multipart: question + photo), bytes.
    pub max_body_bytes: usize,
    /// Most requests each shard handles at once (past authentication); more get 503.
    pub max_in_flight: usize,
    /// Most requests one device has in hand at once on a shard; more get 429.
    pub max_in_flight_per_device: usize,
    /// Requests per minute per device on a shard (a token bucket); 0 = no limit.
    pub per_device_per_minute: f64,
    /// Requests a device may make at once (bucket size).
    pub per_device_burst: u32,
    /// Lifetime of the per-device token handed out in MCP initialize, seconds.
    pub token_expire_seconds: u64,
    /// Remote OpenAI-compatible vision chat model.
    pub openai: RemoteVisionConfig,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            provider: VisionProvider::None,
            max_body_bytes: 5 * 1024 * 1024,
            max_in_flight: 8,
            max_in_flight_per_device: 2,
            per_device_per_minute: 10.0,
            per_device_burst: 5,
            token_expire_seconds: 24 * 3600,
            openai: RemoteVisionConfig::default(),
        }
    }
}

/// Remote OpenAI-compatible vision model (chat completions with an image).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteVisionConfig {
    /// Base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// API key; `XIAOZHI_VISION_API_KEY` overrides.
    pub api_key: String,
    /// Model name (one that accepts images).
    pub model: String,
    /// Time for the whole answer (connect included), ms.
    pub timeout_ms: u64,
}

impl Default for RemoteVisionConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:18080/v1".into(),
            api_key: String::new(),
            model: "gpt-4o-mini".into(),
            timeout_ms: 30_000,
        }
    }
}

/// Listeners, device-facing URLs, auth and per-connection limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address both listeners bind to.
    #[serde(deserialize_with = "ip_address")]
    pub ip: IpAddr,
    /// WebSocket port (devices).
    pub port: u16,
    /// HTTP port (OTA, health, readiness, metrics).
    pub http_port: u16,
    /// WebSocket URL the OTA endpoint hands out; empty = `ws://<Host of the OTA request>:<port>/xiaozhi/v1/`.
    pub public_ws_url: String,
    /// Hours east of UTC reported to devices in the OTA `server_time.timezone_offset` (as minutes).
    pub timezone_offset_hours: f64,
    /// Most WebSocket connections one shard holds; further ones are refused with a message.
    pub max_connections_per_shard: usize,
    /// Most WebSocket connections the instance holds (0 = only the per-shard limit). Split into
    /// equal per-shard budgets (rounded up); a full shard hands a device to a shard with room.
    pub max_connections: usize,
    /// Largest WebSocket message accepted from a device, bytes.
    pub max_message_bytes: usize,
    /// Largest single WebSocket frame accepted from a device, bytes.
    pub max_frame_bytes: usize,
    /// WebSocket read buffer per connection, bytes (the main term of idle memory per device).
    pub read_buffer_bytes: usize,
    /// Largest HTTP request head on the WebSocket port, bytes.
    pub max_request_head_bytes: usize,
    /// Time a client has to finish the HTTP upgrade request, ms.
    pub handshake_timeout_ms: u64,
    /// Time a device has to send `hello` after the upgrade, ms.
    pub hello_timeout_ms: u64,
    /// A send that cannot complete in this time means the device stopped reading: disconnect, ms.
    pub write_timeout_ms: u64,
    /// Most messages queued for one device before it counts as not reading and is disconnected.
    pub outbound_queue_messages: usize,
    /// Messages (or other wake-ups) a connection handles in a row, each ready at once, before
    /// it lets the other devices on its shard run.
    pub read_budget_messages: u32,
    /// WebSocket device sockets are read in sweeps, every this many ms (one wake-up of the
    /// shard for all its devices' frames, instead of one per frame); 0 reads each socket as
    /// its data arrives (io_uring).
    pub socket_sweep_ms: u64,
    /// Messages a second one device connection is read at, sustained (bursts up to
    /// `inbound_messages_burst`); beyond it reads pause until the bucket refills.
    pub inbound_messages_per_s: f64,
    /// Messages a device may send at once above its sustained rate.
    pub inbound_messages_burst: f64,
    /// Bytes a second one device connection is read at, sustained.
    pub inbound_bytes_per_s: f64,
    /// Bytes a device may send at once above its sustained rate.
    pub inbound_bytes_burst: f64,
    /// Device token authentication.
    pub auth: AuthConfig,
    /// Firmware offered by the OTA endpoint.
    pub firmware: FirmwareConfig,
    /// Graceful shutdown.
    pub drain: DrainConfig,
    /// PROXY protocol on the WebSocket port: off, v1, v2 or any (from trusted proxies only).
    pub proxy_protocol: ProxyProtocol,
    /// Balancers (CIDRs or addresses) whose PROXY header and forwarded headers are believed.
    pub trusted_proxies: TrustedProxies,
    /// Which header, from trusted proxies only, names the device: off, x-forwarded-for, x-real-ip.
    pub forwarded_header: ForwardedHeader,
    /// New connections per client address.
    pub rate_limit: RateLimitConfig,
    /// The HTTP port's own balancer and limit settings (it shares `trusted_proxies` and
    /// `forwarded_header`).
    pub http: HttpPortConfig,
}

/// The HTTP port (OTA, health, metrics) behind a balancer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpPortConfig {
    /// PROXY protocol on the HTTP port: off, v1, v2 or any (from trusted proxies only). Separate
    /// from `server.proxy_protocol`: a balancer sends it per backend server line, and the OTA
    /// backend is often layer 7 (forwarded headers) while the WebSocket one is layer 4.
    pub proxy_protocol: ProxyProtocol,
    /// Most HTTP connections one shard serves at once, counted from a connection's first
    /// complete request head; beyond it a request gets 503 (`/healthz` and `/readyz` are still
    /// answered).
    pub max_connections_per_shard: usize,
    /// Most connections one client address holds open on a shard, waiting or served (balancer
    /// addresses are exempt); 0 = no cap.
    pub max_connections_per_address: usize,
    /// Time a new connection has to send its first complete request head, ms.
    pub head_timeout_ms: u64,
    /// A kept-alive connection with no request in progress for this long is closed, ms.
    pub keep_alive_idle_ms: u64,
    /// Requests one connection may carry; the last is answered with `Connection: close`.
    pub max_requests_per_connection: u32,
    /// Requests per client address (balancer addresses are exempt).
    pub rate_limit: RateLimitConfig,
}

impl Default for HttpPortConfig {
    fn default() -> Self {
        Self {
            proxy_protocol: ProxyProtocol::Off,
            max_connections_per_shard: 1024,
            max_connections_per_address: 64,
            head_timeout_ms: 5000,
            keep_alive_idle_ms: 5000,
            max_requests_per_connection: 100,
            rate_limit: RateLimitConfig::default(),
        }
    }
}

/// Whether the WebSocket port expects a PROXY protocol header from trusted balancers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No PROXY header is read.
    Off,
    /// Trusted peers must send a v1 (text) header.
    V1,
    /// Trusted peers must send a v2 (binary) header.
    V2,
    /// Trusted peers must send a v1 or v2 header.
    Any,
}

impl ProxyProtocol {
    /// The header versions a listener reads from trusted peers; `None` when off.
    pub fn accept(self) -> Option<crate::front_door::proxy::Accept> {
        use crate::front_door::proxy::Accept;
        match self {
            ProxyProtocol::Off => None,
            ProxyProtocol::V1 => Some(Accept::V1),
            ProxyProtocol::V2 => Some(Accept::V2),
            ProxyProtocol::Any => Some(Accept::Any),
        }
    }
}

/// Which header names the device behind a trusted balancer (defined beside the code that reads
/// it, so `front_door` needs nothing from the config).
pub use crate::front_door::peer::ForwardedHeader;

/// Token bucket per client address (per shard): new WebSocket connections (`server.rate_limit`)
/// or HTTP requests (`server.http.rate_limit`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Connections (or requests) per second per address and shard; 0 = no limit.
    pub per_address_per_s: f64,
    /// Connections (or requests) an address may make at once (bucket size) per shard.
    pub burst: u32,
    /// Addresses each shard tracks; beyond it the stalest bucket is forgotten.
    pub max_addresses: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_address_per_s: 0.0,
            burst: 20,
            max_addresses: 65_536,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 8000,
            http_port: 8003,
            public_ws_url: String::new(),
            timezone_offset_hours: 8.0,
            max_connections_per_shard: 10_000,
            max_connections: 0,
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            read_buffer_bytes: 4096,
            max_request_head_bytes: 8192,
            handshake_timeout_ms: 10_000,
            hello_timeout_ms: 10_000,
            write_timeout_ms: 5_000,
            outbound_queue_messages: 128,
            read_budget_messages: 32,
            socket_sweep_ms: 20,
            inbound_messages_per_s: 100.0,
            inbound_messages_burst: 400.0,
            inbound_bytes_per_s: 65536.0,
            inbound_bytes_burst: 524_288.0,
            auth: AuthConfig::default(),
            firmware: FirmwareConfig::default(),
            drain: DrainConfig::default(),
            proxy_protocol: ProxyProtocol::Off,
            trusted_proxies: TrustedProxies::default(),
            forwarded_header: ForwardedHeader::Off,
            rate_limit: RateLimitConfig::default(),
            http: HttpPortConfig::default(),
        }
    }
}

/// Device token authentication (reference-compatible HMAC-SHA256 `sig.ts` tokens).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Off by default: every device is accepted.
    pub enabled: bool,
    /// Shared secrets; the first signs new tokens, all verify (rotation). The environment
    /// variable `XIAOZHI_AUTH_SECRETS` (comma separated) overrides this list.
    pub secrets: Vec<String>,
    /// Token lifetime, seconds (reference default: 30 days).
    pub expire_seconds: u64,
    /// The fleet's device ids: with `ota_tokens = "allowed_devices"` the only ones OTA issues a
    /// token to; with `allowed_devices_skip_token` let in without one.
    pub allowed_devices: Vec<String>,
    /// Devices in `allowed_devices` connect without a token (the reference's bypass: anyone
    /// claiming such an id is let in). Off by default; warned about at start when on.
    pub allowed_devices_skip_token: bool,
    /// Which devices `POST /xiaozhi/ota/` hands a token to when auth is on.
    pub ota_tokens: OtaTokens,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            secrets: Vec::new(),
            expire_seconds: 30 * 24 * 3600,
            allowed_devices: Vec::new(),
            allowed_devices_skip_token: false,
            ota_tokens: OtaTokens::Any,
        }
    }
}

/// Which devices OTA issues a token to (with auth on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OtaTokens {
    /// Any `Device-Id` (the reference): OTA is then the way in, and auth only keeps out
    /// clients that never asked OTA.
    Any,
    /// Only devices in `server.auth.allowed_devices`; others get an empty token.
    AllowedDevices,
    /// None: tokens are handed out another way (`xiaozhi-tpc token`).
    None,
}

impl AuthConfig {
    /// Start-up warnings about choices that weaken auth (empty when auth is off).
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut w = Vec::new();
        if !self.enabled {
            return w;
        }
        if self.ota_tokens == OtaTokens::Any {
            w.push(
                "server.auth.ota_tokens = \"any\": POST /xiaozhi/ota/ hands a valid token to any \
                 Device-Id, so anyone who can reach the HTTP port can connect; set \
                 \"allowed_devices\" or \"none\" to close it",
            );
        }
        if self.allowed_devices_skip_token && !self.allowed_devices.is_empty() {
            w.push(
                "server.auth.allowed_devices_skip_token = true: any connection that claims an id \
                 in server.auth.allowed_devices is let in without a token",
            );
        }
        w
    }
}

/// Firmware offered by the OTA endpoint; empty version = no update (the device's own version is echoed).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirmwareConfig {
    /// Newest firmware version, e.g. "1.7.2"; empty = none offered.
    pub version: String,
    /// Download URL of that firmware.
    pub url: String,
}

/// Graceful shutdown on SIGTERM/SIGINT.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// After readiness turns false, new devices are still accepted this long (the balancer's
    /// health check needs time to notice), ms.
    pub delay_ms: u64,
    /// Time in-flight replies get to finish before sessions are closed, ms.
    pub grace_ms: u64,
    /// A device that began listening (`listen start` or a wake word) less than this before is
    /// given until then to begin speaking (then its turn finishes within `grace_ms`), ms.
    pub listen_grace_ms: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            delay_ms: 0,
            grace_ms: 10_000,
            listen_grace_ms: 4_000,
        }
    }
}

/// Per-session timers (reference: `close_connection_no_voice_time` = 120 s, hard close 60 s later).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Seconds without voice after which the device is told goodbye and closed.
    pub no_voice_close_s: u64,
    /// Seconds without any activity after which the connection is closed without ceremony.
    pub idle_close_s: u64,
    /// Answer `ping` with `pong` (the reference's `enable_websocket_ping`).
    pub answer_ping: bool,
    /// Send `{"type":"vad",...}` messages when server VAD finds speech start/end (our
    /// extension; firmware ignores it; useful for clients and benchmarks).
    pub vad_events: bool,
    /// Manual mode: after speech was heard, this long without any audio frame (wall clock)
    /// ends the turn as `listen stop` would, for clients that just stop sending, ms.
    pub manual_audio_gap_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            no_voice_close_s: 120,
            idle_close_s: 180,
            answer_ping: true,
            vad_events: false,
            manual_audio_gap_ms: 2_000,
        }
    }
}

/// Which cores shard and which infer, and executor tuning.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// CPU ids that run shard executors; empty = automatic plan.
    pub shard_cores: Vec<usize>,
    /// CPU ids that run inference workers; empty = automatic plan.
    pub inference_cores: Vec<usize>,
    /// io_uring registered buffer per executor, KiB (512 lets it start without root under an 8 MiB memlock).
    pub io_memory_kib: usize,
    /// glommio preempt timer, µs: bounds how long a busy task delays a cross-core wake.
    pub preempt_timer_us: u64,
    /// Period of each shard's watchdog tick, ms (guards against a lost foreign wake-up).
    pub tick_ms: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            shard_cores: Vec::new(),
            inference_cores: Vec::new(),
            io_memory_kib: 512,
            preempt_timer_us: 500,
            tick_ms: 50,
        }
    }
}

/// Inference workers (pinned to `runtime.inference_cores`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Folder with the models the set-up installed (`XIAOZHI_MODELS` overrides).
    pub models_dir: String,
    /// ONNX Runtime shared library (`ORT_DYLIB_PATH` overrides).
    pub onnxruntime: String,
    /// Bound of each worker's job queue; for VAD, the jobs a shard may have outstanding
    /// (gathered for its next tick, or sent and not yet answered).
    pub queue_capacity: usize,
    /// Most rows in one batched VAD forward pass.
    pub max_batch: usize,
    /// Period at which a shard sends its sessions' VAD jobs to its worker as one batch, ms
    /// (0: send as soon as a job is there). Adds at most one tick to a chunk's VAD latency.
    /// With `server.socket_sweep_ms` on, batches go right after sweeps, at most one per tick
    /// (rounded to the sweep grid).
    pub tick_ms: u64,
    /// Removed (replaced by `tick_ms`): still accepted so a config written for an older
    /// version loads, and a warning at start says it is ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_deadline_us: Option<u64>,
    /// Most 32 ms chunks one session sends in one VAD job.
    pub max_chunks_per_job: usize,
    /// Longest a session's audio may wait for VAD before its turn is shed, ms (the sign that
    /// inference cannot keep up; a burst processed promptly is fine).
    pub max_wait_ms: u64,
    /// A new turn is refused ("busy") when its worker's queue is fuller than this fraction.
    pub busy_watermark: f64,
    /// Bound of each shard's reply channel.
    pub reply_capacity: usize,
    /// How ONNX Runtime (Silero, Piper, Kokoro) holds the memory of intermediate tensors:
    /// `arena`, `no_pattern`, `arena_shrink` or `no_arena` (tuning.md, "ONNX Runtime memory").
    pub ort_memory: OrtMemory,
    /// Allocations at least this large are mapped and unmapped one by one (glibc
    /// `M_MMAP_THRESHOLD`), so tensors freed after a run leave the process, KiB; 0 = glibc's
    /// own threshold, which rises to 32 MiB and lets freed tensors stay in the heap.
    pub malloc_mmap_threshold_kib: u32,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            models_dir: "models".into(),
            onnxruntime: "models/onnxruntime/libonnxruntime.so.1.31.1".into(),
            queue_capacity: 1024,
            max_batch: 64,
            tick_ms: 20,
            batch_deadline_us: None,
            max_chunks_per_job: 16,
            max_wait_ms: 1500,
            busy_watermark: 0.75,
            reply_capacity: 4096,
            ort_memory: OrtMemory::default(),
            malloc_mmap_threshold_kib: 1024,
        }
    }
}

impl InferenceConfig {
    /// The models folder, honouring `XIAOZHI_MODELS`.
    pub fn models_path(&self) -> std::path::PathBuf {
        std::env::var_os("XIAOZHI_MODELS")
            .map(Into::into)
            .unwrap_or_else(|| self.models_dir.clone().into())
    }

    /// The ONNX Runtime library, honouring `ORT_DYLIB_PATH`.
    pub fn onnxruntime_path(&self) -> std::path::PathBuf {
        std::env::var_os("ORT_DYLIB_PATH")
            .map(Into::into)
            .unwrap_or_else(|| self.onnxruntime.clone().into())
    }
}

/// Server VAD (Silero) and how its decisions become utterances. Times are audio time.
///
/// `[vad]` holds the model and, beside it, the segmenter's keys (`threshold`, `threshold_low`,
/// `min_silence_ms`, `min_speech_ms`, `pre_roll_ms`, `post_pad_ms`, `max_utterance_ms`,
/// `manual_max_silence_ms`, `min_utterance_ms`): they deserialise straight into the
/// [`SegmenterConfig`] each session gets, so there is no second copy to keep in step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VadConfig {
    /// Silero model file inside `inference.models_dir`.
    pub model: String,
    /// How chunk probabilities become utterances (the rest of the `[vad]` keys).
    #[serde(flatten, deserialize_with = "keyed_flatten")]
    pub segmenter: SegmenterConfig,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            model: "silero_vad_op18_ifless.onnx".into(),
            segmenter: SegmenterConfig::default(),
        }
    }
}

/// An IP address written as a string, refused with a hint instead of the parser's terse message.
fn ip_address<'de, D>(deserializer: D) -> Result<IpAddr, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    text.parse()
        .map_err(|_| serde::de::Error::custom("not an IP address (e.g. 0.0.0.0 or 127.0.0.1)"))
}

/// Deserialises a `#[serde(flatten)]` field and keeps the inner key in its errors: serde reads a
/// flattened struct from a buffered copy, which the loader's key-path tracking cannot see into,
/// so without this a bad `vad.threshold` would be reported as just `vad`. The inner key leads
/// the message as `` `key`: `` and [`join_flattened_key`] moves it back onto the path.
fn keyed_flatten<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let segments = e.path().iter().count();
        let key = e.path().to_string();
        let message = e.into_inner().to_string();
        match segments {
            0 => serde::de::Error::custom(message.trim_end()),
            _ => serde::de::Error::custom(format_args!("`{key}`: {}", message.trim_end())),
        }
    })
}

/// The full key and the reason of an error at `key`: a key that [`keyed_flatten`] put at the
/// front of `reason` is appended to `key` (no serde or config message starts with a backtick).
fn join_flattened_key(key: String, reason: &str) -> (String, String) {
    match reason.strip_prefix('`').and_then(|r| r.split_once("`: ")) {
        Some((inner, rest)) => (format!("{key}.{inner}"), rest.to_string()),
        None => (key, reason.to_string()),
    }
}

/// Which ASR provider runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AsrProvider {
    /// Local Whisper (CTranslate2) on the inference cores.
    Whisper,
    /// OpenAI-compatible `POST /audio/transcriptions`.
    Openai,
}

/// Speech recognition.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsrConfig {
    /// `whisper` (local, default) or `openai` (remote).
    pub provider: AsrProvider,
    /// Local Whisper.
    pub whisper: WhisperConfig,
    /// Remote OpenAI-compatible transcription.
    pub openai: RemoteAsrConfig,
    /// A recognition that takes longer than this fails (apology, session carries on), ms.
    pub timeout_ms: u64,
}

impl Default for AsrConfig {
    fn default() -> Self {
        Self {
            provider: AsrProvider::Whisper,
            whisper: WhisperConfig::default(),
            openai: RemoteAsrConfig::default(),
            timeout_ms: 15_000,
        }
    }
}

/// Local Whisper settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WhisperConfig {
    /// Model folder inside `inference.models_dir`: `whisper-tiny.en` (fast, English) or
    /// `whisper-base` (multilingual: Chinese + English); empty = by the top-level `language`.
    pub model: String,
    /// Language code ("en", "zh"); `any` = detect among all languages; a list ("zh,en") =
    /// detect among those only (multilingual models only); empty = by the top-level `language`.
    pub language: String,
    /// int8 weights (faster) instead of float32.
    pub int8: bool,
    /// Beam width; 1 = greedy. Greedy tiny.en int8 mis-hears some sentences that beam 5 gets
    /// right at about the same cost (examples/bench_asr.rs).
    pub beam_size: usize,
    /// Shortest encoder window, ms (1000..=30000): the encoder sees the utterance plus 0.5 s,
    /// but at least this much. 30000 is Whisper's training window; 10000 gave the same
    /// transcripts at a quarter of the cost here (examples/bench_asr.rs).
    pub window_ms: u32,
    /// Script of Chinese transcripts: `simplified` (default), `traditional` or `as_heard`
    /// (Whisper mixes both; the text is converted with OpenCC's tables).
    pub chinese_script: ChineseScript,
}

impl Default for WhisperConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            language: String::new(),
            int8: true,
            beam_size: 5,
            window_ms: 10_000,
            chinese_script: ChineseScript::Simplified,
        }
    }
}

/// Remote OpenAI-compatible transcription.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteAsrConfig {
    /// Base URL, e.g. `http://127.0.0.1:18080/v1`.
    pub base_url: String,
    /// API key (sent as `Authorization: Bearer`); `XIAOZHI_ASR_API_KEY` overrides.
    pub api_key: String,
    /// Model name.
    pub model: String,
    /// Language hint; empty = none.
    pub language: String,
}

impl Default for RemoteAsrConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:18080/v1".into(),
            api_key: String::new(),
            model: "whisper-1".into(),
            language: String::new(),
        }
    }
}

/// Which LLM answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    /// The built-in offline responder (no model; greetings, time, echo).
    Offline,
    /// OpenAI-compatible streaming chat completions.
    Openai,
}

/// The language model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// `offline` (built-in responder, default) or `openai`.
    pub provider: LlmProvider,
    /// System prompt.
    pub system_prompt: String,
    /// Most messages of history kept per session (user + assistant).
    pub history_messages: usize,
    /// Most bytes of history text kept per session (oldest messages dropped first).
    pub history_max_bytes: usize,
    /// Remote OpenAI-compatible chat.
    pub openai: RemoteLlmConfig,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            provider: LlmProvider::Offline,
            system_prompt: "You are Xiaozhi, a friendly voice assistant on a small device. Answer in one to three short spoken sentences, without Markdown or lists, in the language the user speaks.".into(),
            history_messages: 20,
            history_max_bytes: 16_384,
            openai: RemoteLlmConfig::default(),
        }
    }
}

/// Remote OpenAI-compatible chat completions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteLlmConfig {
    /// Base URL, e.g. `http://127.0.0.1:18080/v1` or `https://api.openai.com/v1`.
    pub base_url: String,
    /// API key; `XIAOZHI_LLM_API_KEY` overrides.
    pub api_key: String,
    /// Model name.
    pub model: String,
    /// Sampling temperature; negative = provider default.
    pub temperature: f32,
    /// Most tokens per answer; 0 = provider default.
    pub max_tokens: u32,
    /// TCP/TLS connect timeout, ms.
    pub connect_timeout_ms: u64,
    /// Time to the first token, ms.
    pub first_token_timeout_ms: u64,
    /// Time for the whole answer, ms.
    pub total_timeout_ms: u64,
}

impl Default for RemoteLlmConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:18080/v1".into(),
            api_key: String::new(),
            model: "gpt-4o-mini".into(),
            temperature: -1.0,
            max_tokens: 500,
            connect_timeout_ms: 3_000,
            first_token_timeout_ms: 10_000,
            total_timeout_ms: 60_000,
        }
    }
}

/// Which TTS provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TtsProvider {
    /// The embedded default for the top-level `language`: `en` = Piper (Chinese text via
    /// espeak-ng); `zh` and `auto` = Kokoro's Mandarin voice (`tts.kokoro.voice_zh`) for text
    /// with Chinese characters and Piper for the rest (Piper costs a tenth of Kokoro's CPU per
    /// second of English speech: tuning.md).
    Local,
    /// Local Piper voice (ONNX) on the inference cores; espeak-ng for text it cannot speak.
    Piper,
    /// Local espeak-ng.
    Espeak,
    /// OpenAI-compatible `POST /audio/speech`.
    Openai,
    /// Local Kokoro-82M (ONNX) on the inference cores, Chinese and English (`[tts.kokoro]`).
    Kokoro,
}

/// Speech synthesis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtsConfig {
    /// `local` (default: by `language`), `piper`, `espeak`, `openai` or `kokoro`.
    pub provider: TtsProvider,
    /// Piper voice model inside `inference.models_dir`.
    pub piper_model: String,
    /// espeak-ng voice for the `espeak` provider and for text Piper cannot speak (e.g. Chinese).
    pub espeak_voice: String,
    /// espeak-ng voice used for Chinese text.
    pub espeak_voice_zh: String,
    /// A segment not synthesised within this time is skipped, ms.
    pub timeout_ms: u64,
    /// Longest text of one synthesis job, characters (a digit counts as eight); longer
    /// sentences are cut at spaces or commas (between characters in Chinese).
    pub max_segment_chars: usize,
    /// Remote OpenAI-compatible speech.
    pub openai: RemoteTtsConfig,
    /// Local Kokoro voices.
    pub kokoro: KokoroTtsConfig,
}

impl Default for TtsConfig {
    fn default() -> Self {
        Self {
            provider: TtsProvider::Local,
            piper_model: "piper/en_US-joe-medium.onnx".into(),
            espeak_voice: "en-us".into(),
            espeak_voice_zh: "cmn".into(),
            timeout_ms: 10_000,
            max_segment_chars: crate::pipeline::sentences::DEFAULT_MAX_SEGMENT_CHARS,
            openai: RemoteTtsConfig::default(),
            kokoro: KokoroTtsConfig::default(),
        }
    }
}

/// Local Kokoro-82M speech (`tts.provider = "kokoro"`); files in `<models_dir>/kokoro/`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KokoroTtsConfig {
    /// Voice for text with Chinese characters (a `zf_*`/`zm_*` file in `kokoro/voices/`).
    pub voice_zh: String,
    /// Voice for other text (English), e.g. `af_heart`.
    pub voice_en: String,
    /// Speaking rate: 1.0 normal, above 1 faster (0.5–2.0).
    pub speed: f32,
}

impl Default for KokoroTtsConfig {
    fn default() -> Self {
        Self {
            voice_zh: "zf_xiaoxiao".into(),
            voice_en: "af_heart".into(),
            speed: 1.0,
        }
    }
}

/// Remote OpenAI-compatible speech.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteTtsConfig {
    /// Base URL, e.g. `http://127.0.0.1:18080/v1`.
    pub base_url: String,
    /// API key; `XIAOZHI_TTS_API_KEY` overrides.
    pub api_key: String,
    /// Model name.
    pub model: String,
    /// Voice name.
    pub voice: String,
    /// `wav` or `pcm` (PCM16LE at `sample_rate`).
    pub response_format: String,
    /// Sample rate of `pcm` responses.
    pub sample_rate: u32,
}

impl Default for RemoteTtsConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:18080/v1".into(),
            api_key: String::new(),
            model: "tts-1".into(),
            voice: "alloy".into(),
            response_format: "wav".into(),
            sample_rate: 24_000,
        }
    }
}

/// Downlink audio encoding and pacing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioOutConfig {
    /// Rate announced in our hello and encoded at (8000, 12000, 16000, 24000 or 48000).
    pub sample_rate: u32,
    /// Opus complexity 0–10 (5 in audio mode is ~6x cheaper than the default 9 here).
    pub complexity: i32,
    /// Frames sent at once when audio starts (head start for the device's buffer).
    pub prebuffer_frames: u32,
    /// Extra wait after the last frame's play-out time before `tts stop`, ms.
    pub stop_guard_ms: u64,
}

impl Default for AudioOutConfig {
    fn default() -> Self {
        Self {
            sample_rate: 24_000,
            complexity: 5,
            prebuffer_frames: 5,
            stop_guard_ms: 120,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, e.g. "info" or "xiaozhi_tpc=debug,info"; `RUST_LOG` wins when set.
    pub level: String,
    /// Lines the log writer thread queues; beyond it lines are dropped and counted, so a slow
    /// stderr never blocks a shard.
    pub buffered_lines: usize,
    /// Lines one session's device may cause per second (malformed or unknown messages, …);
    /// beyond it they are counted, not written.
    pub session_lines_per_s: f64,
    /// Such lines one session may write at once.
    pub session_burst: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            buffered_lines: 16_384,
            session_lines_per_s: 1.0,
            session_burst: 10,
        }
    }
}

/// Latency histograms: the interval log behind `/histograms/<stage>.hlog` and the dumps.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Length of one interval of the `.hlog` interval logs, ms.
    pub interval_ms: u64,
    /// Intervals kept in memory (the oldest is dropped first).
    pub keep_intervals: usize,
    /// When set, every stage's `.hgrm` and `.hlog` are written into this folder on SIGUSR1
    /// and at shutdown (after the drain).
    pub dump_dir: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            interval_ms: 10_000,
            keep_intervals: 360,
            dump_dir: String::new(),
        }
    }
}

/// A configuration that could not be loaded, with the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// File path.
        path: String,
        /// Parser message.
        message: String,
    },
    /// A `--set` argument is not `key=value`.
    #[error("--set {0:?}: expected key=value, e.g. --set server.port=18000")]
    SetSyntax(String),
    /// A `--set` key walks through something that is not a table.
    #[error("--set {key}: `{at}` is not a table")]
    SetPath {
        /// Full key.
        key: String,
        /// The prefix that is not a table.
        at: String,
    },
    /// A key is unknown or its value has the wrong type.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Dotted key path.
        key: String,
        /// Why it was refused.
        reason: String,
    },
}

impl Config {
    /// Builds the config: defaults, then `file` (if any), then each `key=value` override in order.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let mut tree = match file {
            Some(path) => {
                let p = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: p,
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for item in overrides {
            apply_override(&mut tree, item)?;
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| {
                let key = e.path().to_string();
                // The bare message: toml's `Display` repeats the key path the error already names.
                let (key, reason) = join_flattened_key(key, e.into_inner().message());
                ConfigError::Invalid { key, reason }
            })?;
        if let Ok(secrets) = std::env::var("XIAOZHI_AUTH_SECRETS") {
            config.server.auth.secrets = secrets
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
        config.resolve_language();
        config.validate()?;
        Ok(config)
    }

    /// The secrets that sign vision tokens: `server.auth.secrets` (auth enabled or not). With
    /// none configured and a vision provider set, a random secret is made for this process and
    /// a warning logged: its tokens verify only on this instance and only until it restarts.
    pub fn ensure_vision_secret(&mut self) {
        if self.vision.provider == VisionProvider::None
            || self.server.auth.secrets.iter().any(|s| !s.is_empty())
        {
            return;
        }
        let random = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        self.server.auth.secrets = vec![random];
        tracing::warn!(
            "no server.auth.secrets set: vision tokens are signed with a random per-process \
             secret (they verify only on this instance, until it restarts)"
        );
    }

    /// Checks values that parse but cannot work.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                reason: reason.into(),
            })
        };
        let s = &self.server;
        if s.port != 0 && s.port == s.http_port {
            return bad("server.http_port", "must differ from server.port");
        }
        if s.max_connections_per_shard == 0 {
            return bad("server.max_connections_per_shard", "must be at least 1");
        }
        if s.max_message_bytes < 1024 {
            return bad("server.max_message_bytes", "must be at least 1024");
        }
        if s.max_frame_bytes < 1024 {
            return bad("server.max_frame_bytes", "must be at least 1024");
        }
        if s.proxy_protocol != ProxyProtocol::Off && s.trusted_proxies.is_empty() {
            return bad(
                "server.trusted_proxies",
                "proxy_protocol is on but no balancer is trusted (list its address)",
            );
        }
        if s.http.proxy_protocol != ProxyProtocol::Off && s.trusted_proxies.is_empty() {
            return bad(
                "server.trusted_proxies",
                "http.proxy_protocol is on but no balancer is trusted (list its address)",
            );
        }
        if s.http.max_connections_per_shard == 0 {
            return bad(
                "server.http.max_connections_per_shard",
                "must be at least 1",
            );
        }
        if !(100..=60_000).contains(&s.http.head_timeout_ms) {
            return bad(
                "server.http.head_timeout_ms",
                "must be between 100 and 60000",
            );
        }
        if !(100..=60_000).contains(&s.http.keep_alive_idle_ms) {
            return bad(
                "server.http.keep_alive_idle_ms",
                "must be between 100 and 60000",
            );
        }
        if s.http.max_requests_per_connection == 0 {
            return bad(
                "server.http.max_requests_per_connection",
                "must be at least 1",
            );
        }
        for (key, rl) in [
            ("server.rate_limit", &s.rate_limit),
            ("server.http.rate_limit", &s.http.rate_limit),
        ] {
            if !(rl.per_address_per_s >= 0.0 && rl.per_address_per_s.is_finite()) {
                return bad(&format!("{key}.per_address_per_s"), "must be 0 or more");
            }
            if rl.burst == 0 || rl.max_addresses == 0 {
                return bad(key, "burst and max_addresses must be at least 1");
            }
        }
        if !(256..=1 << 20).contains(&s.read_buffer_bytes) {
            return bad(
                "server.read_buffer_bytes",
                "must be between 256 and 1048576",
            );
        }
        if s.max_request_head_bytes < 1024 {
            return bad("server.max_request_head_bytes", "must be at least 1024");
        }
        if s.outbound_queue_messages < 8 {
            return bad("server.outbound_queue_messages", "must be at least 8");
        }
        if !(1..=4096).contains(&s.read_budget_messages) {
            return bad("server.read_budget_messages", "must be between 1 and 4096");
        }
        if s.socket_sweep_ms > 100 {
            return bad(
                "server.socket_sweep_ms",
                "must be between 0 (off) and 100 (every sweep adds up to its period to each read)",
            );
        }
        for (key, v) in [
            ("server.inbound_messages_per_s", s.inbound_messages_per_s),
            ("server.inbound_messages_burst", s.inbound_messages_burst),
            ("server.inbound_bytes_per_s", s.inbound_bytes_per_s),
            ("server.inbound_bytes_burst", s.inbound_bytes_burst),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                return bad(key, "must be a number of at least 1");
            }
        }
        let url = &s.public_ws_url;
        if !(url.is_empty() || url.starts_with("ws://") || url.starts_with("wss://")) {
            return bad("server.public_ws_url", "must start with ws:// or wss://");
        }
        if s.auth.enabled && s.auth.secrets.iter().all(|k| k.is_empty()) {
            return bad(
                "server.auth.secrets",
                "auth is enabled but no secret is set (config or XIAOZHI_AUTH_SECRETS)",
            );
        }
        if self.session.idle_close_s == 0 || self.session.no_voice_close_s == 0 {
            return bad("session", "timeouts must be at least 1 s");
        }
        if self.session.manual_audio_gap_ms < 200 {
            return bad("session.manual_audio_gap_ms", "must be at least 200");
        }
        if self.runtime.io_memory_kib < 64 {
            return bad("runtime.io_memory_kib", "must be at least 64");
        }
        if ![8000, 12000, 16000, 24000, 48000].contains(&self.audio_out.sample_rate) {
            return bad(
                "audio_out.sample_rate",
                "must be one of 8000, 12000, 16000, 24000, 48000",
            );
        }
        if !(0..=10).contains(&self.audio_out.complexity) {
            return bad("audio_out.complexity", "must be between 0 and 10");
        }
        if !(256..=1_048_576).contains(&self.llm.history_max_bytes) {
            return bad("llm.history_max_bytes", "must be between 256 and 1048576");
        }
        if !(10..=1000).contains(&self.tts.max_segment_chars) {
            return bad("tts.max_segment_chars", "must be between 10 and 1000");
        }
        let kokoro = &self.tts.kokoro;
        if !(0.5..=2.0).contains(&kokoro.speed) {
            return bad("tts.kokoro.speed", "must be between 0.5 and 2.0");
        }
        for (key, voice) in [
            ("tts.kokoro.voice_zh", &kokoro.voice_zh),
            ("tts.kokoro.voice_en", &kokoro.voice_en),
        ] {
            let file_name = !voice.is_empty()
                && voice
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !file_name {
                return bad(key, "must be a voice file name such as \"zf_xiaoxiao\"");
            }
        }
        if !["wav", "pcm"].contains(&self.tts.openai.response_format.as_str()) {
            return bad("tts.openai.response_format", "must be \"wav\" or \"pcm\"");
        }
        if let Err(e) = self.vad.segmenter.validate() {
            return bad("vad", e.0);
        }
        let inf = &self.inference;
        if inf.queue_capacity == 0 || inf.max_batch == 0 || inf.max_chunks_per_job == 0 {
            return bad(
                "inference",
                "queue_capacity, max_batch and max_chunks_per_job must be at least 1",
            );
        }
        if inf.tick_ms > 200 {
            return bad(
                "inference.tick_ms",
                "must be at most 200 (it delays every VAD result)",
            );
        }
        if !(0.0..=1.0).contains(&inf.busy_watermark) {
            return bad("inference.busy_watermark", "must be between 0 and 1");
        }
        if inf.max_wait_ms < 100 {
            return bad("inference.max_wait_ms", "must be at least 100");
        }
        if self.runtime.tick_ms == 0 {
            return bad("runtime.tick_ms", "must be at least 1");
        }
        if !(1000..=30_000).contains(&self.asr.whisper.window_ms) {
            return bad("asr.whisper.window_ms", "must be between 1000 and 30000");
        }
        let v = &self.vision;
        if v.max_in_flight_per_device == 0 {
            return bad("vision.max_in_flight_per_device", "must be at least 1");
        }
        if !(v.per_device_per_minute >= 0.0 && v.per_device_per_minute.is_finite()) {
            return bad("vision.per_device_per_minute", "must be 0 or more");
        }
        if v.per_device_burst == 0 {
            return bad("vision.per_device_burst", "must be at least 1");
        }
        if s.auth.enabled
            && s.auth.ota_tokens == OtaTokens::AllowedDevices
            && s.auth.allowed_devices.is_empty()
        {
            return bad(
                "server.auth.ota_tokens",
                "\"allowed_devices\" with an empty server.auth.allowed_devices issues no token at all",
            );
        }
        if self.metrics.interval_ms < 100 {
            return bad("metrics.interval_ms", "must be at least 100");
        }
        if !(1..=100_000).contains(&self.metrics.keep_intervals) {
            return bad("metrics.keep_intervals", "must be between 1 and 100000");
        }
        if !(16..=1 << 20).contains(&self.log.buffered_lines) {
            return bad("log.buffered_lines", "must be between 16 and 1048576");
        }
        if self.inference.malloc_mmap_threshold_kib > 32 * 1024 {
            return bad(
                "inference.malloc_mmap_threshold_kib",
                "must be at most 32768 (glibc's largest)",
            );
        }
        let per_s = self.log.session_lines_per_s;
        if !(per_s.is_finite() && per_s > 0.0) {
            return bad("log.session_lines_per_s", "must be more than 0");
        }
        if self.log.session_burst == 0 {
            return bad("log.session_burst", "must be at least 1");
        }
        let t = &self.tools;
        if t.call_timeout_ms < 100 {
            return bad("tools.call_timeout_ms", "must be at least 100");
        }
        if t.max_calls_per_round == 0 || t.max_pending_calls == 0 || t.max_list_pages == 0 {
            return bad(
                "tools",
                "max_calls_per_round, max_pending_calls and max_list_pages must be at least 1",
            );
        }
        if t.max_result_bytes < 16 {
            return bad("tools.max_result_bytes", "must be at least 16");
        }
        let v = &self.vision;
        if !(1024..=64 << 20).contains(&v.max_body_bytes) {
            return bad("vision.max_body_bytes", "must be between 1024 and 67108864");
        }
        if v.max_in_flight == 0 {
            return bad("vision.max_in_flight", "must be at least 1");
        }
        if v.token_expire_seconds < 60 {
            return bad("vision.token_expire_seconds", "must be at least 60");
        }
        if v.openai.timeout_ms < 100 {
            return bad("vision.openai.timeout_ms", "must be at least 100");
        }
        let url = &t.vision_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return bad("tools.vision_url", "must start with http:// or https://");
        }
        let up = &self.upstream;
        if !(1..=65_536).contains(&up.max_pooled_per_origin) {
            return bad(
                "upstream.max_pooled_per_origin",
                "must be between 1 and 65536",
            );
        }
        if !(1..=3600).contains(&up.idle_timeout_s) {
            return bad("upstream.idle_timeout_s", "must be between 1 and 3600 s");
        }
        self.mqtt.validate(s)?;
        Ok(())
    }
}

/// Applies one `a.b.c=value` override to the tree. The value is read as a TOML value
/// (`18000`, `true`, `["a","b"]`, `"text"`), falling back to a bare string.
fn apply_override(tree: &mut toml::Table, item: &str) -> Result<(), ConfigError> {
    let (key, raw) = item
        .split_once('=')
        .ok_or_else(|| ConfigError::SetSyntax(item.to_string()))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::SetSyntax(item.to_string()));
    }
    let value = parse_value(raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts
        .split_last()
        .ok_or(ConfigError::SetSyntax(item.into()))?;
    let mut table = tree;
    for (i, part) in parents.iter().enumerate() {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| ConfigError::SetPath {
            key: key.into(),
            at: parts[..=i].join("."),
        })?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(sets: &[&str]) -> Result<Config, ConfigError> {
        let v: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::load(None, &v)
    }

    #[test]
    fn language_picks_the_whisper_model_and_the_voices() {
        let auto = load(&[]).unwrap();
        assert_eq!(auto.language, Language::Auto);
        assert_eq!(auto.asr.whisper.model, "whisper-base");
        assert_eq!(auto.whisper_language().as_deref(), Some("zh,en"));
        let mixed = LocalTtsPlan {
            piper: true,
            kokoro_zh: Some("zf_xiaoxiao".into()),
            kokoro_en: None,
        };
        assert_eq!(auto.local_tts(), Some(mixed.clone()));

        let zh = load(&["language=\"zh\""]).unwrap();
        assert_eq!(zh.asr.whisper.model, "whisper-base");
        assert_eq!(zh.whisper_language().as_deref(), Some("zh"));
        assert_eq!(zh.local_tts(), Some(mixed));

        let en = load(&["language=\"en\""]).unwrap();
        assert_eq!(en.asr.whisper.model, "whisper-tiny.en");
        assert_eq!(en.whisper_language().as_deref(), Some("en"));
        let piper = LocalTtsPlan {
            piper: true,
            kokoro_zh: None,
            kokoro_en: None,
        };
        assert_eq!(en.local_tts(), Some(piper.clone()));

        // Explicit settings win over the language.
        let set = load(&[
            "language=\"en\"",
            "asr.whisper.model=\"whisper-base\"",
            "asr.whisper.language=\"any\"",
            "tts.provider=\"kokoro\"",
            "tts.kokoro.voice_en=\"am_michael\"",
        ])
        .unwrap();
        assert_eq!(set.asr.whisper.model, "whisper-base");
        assert_eq!(set.whisper_language(), None);
        assert_eq!(
            set.local_tts(),
            Some(LocalTtsPlan {
                piper: false,
                kokoro_zh: Some("zf_xiaoxiao".into()),
                kokoro_en: Some("am_michael".into()),
            })
        );
        let zh_piper = load(&["language=\"zh\"", "tts.provider=\"piper\""]).unwrap();
        assert_eq!(zh_piper.local_tts(), Some(piper));
        assert_eq!(
            load(&["language=\"zh\"", "tts.provider=\"openai\""])
                .unwrap()
                .local_tts(),
            None
        );
        let err = load(&["language=\"fr\""]).unwrap_err().to_string();
        assert!(err.contains("language"), "{err}");
    }

    #[test]
    fn defaults_match_the_reference_ports() {
        let c = load(&[]).unwrap();
        assert_eq!(c.server.port, 8000);
        assert_eq!(c.server.http_port, 8003);
        assert_eq!(c.server.ip, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert!(!c.server.auth.enabled);
    }

    #[test]
    fn set_overrides_any_key_with_typed_values() {
        let c = load(&[
            "server.port=18000",
            "server.auth.allowed_devices=[\"aa:bb\"]",
            "server.public_ws_url=ws://lb.example:80/xiaozhi/v1/",
            "runtime.shard_cores=[0,1]",
        ])
        .unwrap();
        assert_eq!(c.server.port, 18000);
        assert_eq!(c.server.auth.allowed_devices, vec!["aa:bb".to_string()]);
        assert_eq!(c.server.public_ws_url, "ws://lb.example:80/xiaozhi/v1/");
        assert_eq!(c.runtime.shard_cores, vec![0, 1]);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let err = load(&["server.prot=1"]).unwrap_err().to_string();
        assert!(err.contains("server.prot"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let err = load(&["server.port=\"eighty\""]).unwrap_err().to_string();
        assert!(err.contains("server.port"), "{err}");
    }

    #[test]
    fn auth_without_secret_is_refused() {
        let err = load(&["server.auth.enabled=true"]).unwrap_err().to_string();
        assert!(err.contains("server.auth.secrets"), "{err}");
    }

    #[test]
    fn set_without_equals_is_refused() {
        assert!(matches!(
            load(&["server.port"]),
            Err(ConfigError::SetSyntax(_))
        ));
    }

    #[test]
    fn fleet_profile_parses_with_the_balancer_settings() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fleet.toml");
        // Auth needs a secret; the profile leaves it to the environment.
        let c = Config::load(Some(&path), &["server.auth.secrets=[\"k\"]".into()]).unwrap();
        assert_eq!(c.server.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(
            c.server.trusted_proxies,
            TrustedProxies::parse(&["10.0.0.0/24".into()]).unwrap()
        );
        assert_eq!(c.server.drain.delay_ms, 2000);
        assert_eq!(c.server.forwarded_header, ForwardedHeader::XForwardedFor);
        assert_eq!(c.server.http.proxy_protocol, ProxyProtocol::Off);
        assert_eq!(c.server.http.rate_limit.per_address_per_s, 1.0);
        assert_eq!(c.llm.provider, LlmProvider::Openai);
    }

    #[test]
    fn proxy_protocol_without_trusted_proxies_or_with_a_bad_cidr_is_refused() {
        for (set, named) in [
            ("server.proxy_protocol=\"v1\"", "server.trusted_proxies"),
            (
                "server.trusted_proxies=[\"10.0.0.0/40\"]",
                "server.trusted_proxies",
            ),
            ("server.http.proxy_protocol=\"v2\"", "http.proxy_protocol"),
            ("server.http.rate_limit.burst=0", "server.http.rate_limit"),
        ] {
            let err = load(&[set]).unwrap_err().to_string();
            assert!(err.contains(named), "{set}: {err}");
        }
    }

    #[test]
    fn trusted_proxies_load_parsed_and_a_set_override_replaces_them() {
        let c = load(&["server.trusted_proxies=[\"10.0.0.0/8\", \"::1\"]"]).unwrap();
        let t = &c.server.trusted_proxies;
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(t.contains("::1".parse().unwrap()));
        assert!(!t.contains("11.0.0.1".parse().unwrap()));
        let err = load(&["server.trusted_proxies=[\"10.0.0.0/40\"]"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config key `server.trusted_proxies`: \"10.0.0.0/40\": prefix must be 0..=32"
        );
    }

    #[test]
    fn server_tools_load_as_names_and_an_unknown_one_is_refused_with_its_key() {
        let c = load(&["tools.server_tools=[\"get_time\"]"]).unwrap();
        assert_eq!(c.tools.server_tools, [ServerToolName::GetTime]);
        let err = load(&["tools.server_tools=[\"get_time\", \"rm_rf\"]"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tools.server_tools"), "{err}");
        assert!(err.contains("unknown server tool \"rm_rf\""), "{err}");
    }

    #[test]
    fn server_ip_loads_as_an_address_and_a_bad_one_is_refused_with_its_key() {
        let c = load(&["server.ip=\"::1\""]).unwrap();
        assert_eq!(c.server.ip, IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
        let err = load(&["server.ip=\"localhost\""]).unwrap_err().to_string();
        assert_eq!(
            err,
            "config key `server.ip`: not an IP address (e.g. 0.0.0.0 or 127.0.0.1)"
        );
    }

    #[test]
    fn vad_keys_load_into_the_segmenter_and_bad_ones_name_their_key() {
        let c = load(&[
            "vad.model=\"other.onnx\"",
            "vad.threshold=0.6",
            "vad.min_utterance_ms=500",
        ])
        .unwrap();
        assert_eq!(c.vad.model, "other.onnx");
        assert_eq!(
            c.vad.segmenter,
            SegmenterConfig {
                threshold: 0.6,
                min_utterance_ms_for_asr: 500,
                ..SegmenterConfig::default()
            }
        );
        for (set, named) in [
            ("vad.threshold=\"high\"", "`vad.threshold`: invalid type"),
            ("vad.pre_roll_ms=-1", "`vad.pre_roll_ms`: invalid value"),
            ("vad.window=3", "`vad`: unknown field `window`"),
            (
                "vad.min_utterance_ms_for_asr=3",
                "unknown field `min_utterance_ms_for_asr`",
            ),
            (
                "vad.threshold_low=0.9",
                "threshold_low must not exceed threshold",
            ),
        ] {
            let err = load(&[set]).unwrap_err().to_string();
            assert!(err.contains(named), "{set}: {err}");
        }
    }

    #[test]
    fn vision_gets_a_random_secret_only_when_on_and_none_is_configured() {
        let mut c = load(&["vision.provider=\"openai\""]).unwrap();
        c.ensure_vision_secret();
        assert_eq!(c.server.auth.secrets.len(), 1);
        assert_eq!(c.server.auth.secrets[0].len(), 64);
        let mut other = load(&["vision.provider=\"openai\""]).unwrap();
        other.ensure_vision_secret();
        assert_ne!(other.server.auth.secrets, c.server.auth.secrets);
        let mut kept = load(&[
            "vision.provider=\"openai\"",
            "server.auth.secrets=[\"fleet\"]",
        ])
        .unwrap();
        kept.ensure_vision_secret();
        assert_eq!(kept.server.auth.secrets, ["fleet"]);
        let mut off = load(&[]).unwrap();
        off.ensure_vision_secret();
        assert!(off.server.auth.secrets.is_empty());
    }

    #[test]
    fn unworkable_vision_values_are_refused_with_their_key() {
        for (set, key) in [
            ("vision.max_body_bytes=10", "vision.max_body_bytes"),
            ("vision.max_in_flight=0", "vision.max_in_flight"),
            ("vision.provider=\"gpt\"", "vision.provider"),
            ("tools.vision_url=\"ftp://x\"", "tools.vision_url"),
        ] {
            let err = load(&[set]).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
        }
    }

    #[test]
    fn the_upstream_pool_loads_and_out_of_range_values_are_refused_with_their_key() {
        let c = load(&[
            "upstream.max_pooled_per_origin=512",
            "upstream.idle_timeout_s=20",
        ])
        .unwrap();
        assert_eq!(c.upstream.max_pooled_per_origin, 512);
        assert_eq!(c.upstream.idle_timeout_s, 20);
        for (set, key) in [
            (
                "upstream.max_pooled_per_origin=0",
                "upstream.max_pooled_per_origin",
            ),
            ("upstream.idle_timeout_s=0", "upstream.idle_timeout_s"),
            ("upstream.idle_timeout_s=3601", "upstream.idle_timeout_s"),
        ] {
            let err = load(&[set]).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
        }
    }

    #[test]
    fn the_vad_tick_loads_and_a_tick_past_200_ms_is_refused_with_its_key() {
        assert_eq!(load(&["inference.tick_ms=0"]).unwrap().inference.tick_ms, 0);
        assert_eq!(
            load(&["inference.tick_ms=25"]).unwrap().inference.tick_ms,
            25
        );
        let err = load(&["inference.tick_ms=201"]).unwrap_err().to_string();
        assert!(err.contains("inference.tick_ms"), "{err}");
        // The old key still loads (an upgraded fleet's config keeps working) and is ignored.
        let old = load(&["inference.batch_deadline_us=500"]).unwrap();
        assert_eq!(old.inference.batch_deadline_us, Some(500));
        assert_eq!(old.inference.tick_ms, 20);
    }

    #[test]
    fn default_toml_file_parses_and_equals_builtin_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let from_file = Config::load(Some(&path), &[]).unwrap();
        let builtin = load(&[]).unwrap();
        assert_eq!(
            toml::to_string(&from_file).unwrap(),
            toml::to_string(&builtin).unwrap()
        );
    }
}
