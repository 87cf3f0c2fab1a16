//! A mock OpenAI-compatible upstream (LLM, ASR, TTS) for benchmarks and tests.
//!
//! The server under test talks to remote providers over HTTP: streaming chat completions (SSE),
//! `/v1/audio/transcriptions` and `/v1/audio/speech`. This module stands in for all three with
//! fixed, configurable latencies, so a benchmark measures the server and not a model. The standard
//! scenario (design.md, "What to beat") is the default: ASR 50 ms, LLM first token 100 ms then
//! 10 ms per token, TTS 50 ms for 400 ms of audio. Tests also get a tool-call reply, failure modes
//! (`fail_status`, `stall`) and counters of connections and requests (keep-alive checks).
//!
//! Routes (matched on the path's end, so any base URL prefix works):
//! - `POST …/chat/completions`: `stream: true` sends `chat.completion.chunk` events as SSE over
//!   chunked transfer encoding, one token per event, each written and sent when its time comes;
//!   otherwise one `chat.completion` after the whole generation time.
//! - `POST …/audio/transcriptions`: multipart with a `file` part; answers `{"text": …}` (or plain
//!   text for `response_format=text`).
//! - `POST …/audio/speech`: JSON with `input`; answers WAV (PCM16 mono 24 kHz) or, for
//!   `response_format: "pcm"`, raw PCM16LE. Other formats (mp3, opus …) get a 400.
//! - `GET …/models`: one model, `mock`.
//!
//! # Why a small HTTP/1.1 server on std threads
//! The mock must run beside anything: inside the bench (whose glommio executors drive the
//! simulated devices and must not share cores with it), in the server's tests, or alone. hyper 1
//! would need an executor and IO adapters for that; `tiny_http` buffers chunked responses (its
//! encoder writes when 8 KiB have collected), so SSE timing would not be real. Here `httparse`
//! parses request heads and the rest is written by hand: one thread per connection (a few
//! hundred at most, 256 KiB stacks, asleep almost all the time), `TCP_NODELAY`, and every SSE
//! event is one `write_all` of one HTTP chunk at its scheduled instant, so a client sees what a
//! real streaming upstream sends. Delays are deadlines from the moment the request body was
//! read, so they do not drift with sleep overshoot. Every wait also watches the stop signal, so
//! [`MockHandle::stop`] (or dropping the handle) ends stalled and streaming connections at once.

mod audio;
mod chat;
mod http;
#[cfg(test)]
mod test_client;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use audio::TtsAudio;
use http::{accept_loop, write_error, write_json, Request};

/// Default LLM reply: two short English sentences.
pub const DEFAULT_LLM_REPLY: &str = "It is sunny today with a high of twenty four degrees. \
     A light jacket should be enough this evening.";
/// Default transcript returned by the ASR route.
pub const DEFAULT_ASR_TEXT: &str = "What is the weather like today?";
/// Sample rate of the TTS audio (OpenAI's `pcm` format is 24 kHz PCM16LE mono).
pub const TTS_SAMPLE_RATE_HZ: u32 = 24_000;

/// Behaviour of the mock; `Default` is the standard benchmark scenario on an ephemeral port.
#[derive(Debug, Clone, PartialEq)]
pub struct MockSettings {
    /// Address to bind; port 0 picks a free port ([`MockHandle::addr`] tells which).
    pub bind: SocketAddr,
    /// Time from the request to the first token.
    pub llm_first_token: Duration,
    /// Time between tokens after the first.
    pub llm_token: Duration,
    /// The reply text, streamed in word-sized tokens (one token per CJK character).
    pub llm_reply: String,
    /// Reply with a tool call when the request has `tools`, the last message is the user's and
    /// contains this text (case-insensitive).
    pub tool_trigger: Option<String>,
    /// Name of the tool to call; `None` calls the first tool of the request.
    pub tool_name: Option<String>,
    /// JSON arguments of the tool call.
    pub tool_arguments: String,
    /// Time from the transcription request to its answer.
    pub asr_delay: Duration,
    /// The transcript.
    pub asr_text: String,
    /// Time from the speech request to its answer.
    pub tts_delay: Duration,
    /// Duration of the synthesised audio.
    pub tts_audio: Duration,
    /// Answer every request with this HTTP status and an OpenAI-style error body.
    pub fail_status: Option<u16>,
    /// Read requests but never answer them (until the mock stops).
    pub stall: bool,
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            llm_first_token: Duration::from_millis(100),
            llm_token: Duration::from_millis(10),
            llm_reply: DEFAULT_LLM_REPLY.to_string(),
            tool_trigger: None,
            tool_name: None,
            tool_arguments: "{}".to_string(),
            asr_delay: Duration::from_millis(50),
            asr_text: DEFAULT_ASR_TEXT.to_string(),
            tts_delay: Duration::from_millis(50),
            tts_audio: Duration::from_millis(400),
            fail_status: None,
            stall: false,
        }
    }
}

/// Command-line flags of `xiaozhi-bench mock-upstream`; defaults are the standard scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 18080)]
    pub port: u16,
    /// LLM: time to the first token, ms.
    #[arg(long, default_value_t = 100)]
    pub llm_first_token_ms: u64,
    /// LLM: time per further token, ms.
    #[arg(long, default_value_t = 10)]
    pub llm_token_ms: u64,
    /// LLM: reply text.
    #[arg(long, default_value = DEFAULT_LLM_REPLY)]
    pub llm_reply: String,
    /// LLM: answer with a tool call when the last user message contains this text.
    #[arg(long)]
    pub tool_trigger: Option<String>,
    /// LLM: tool to call (default: the request's first tool).
    #[arg(long)]
    pub tool_name: Option<String>,
    /// LLM: JSON arguments of the tool call.
    #[arg(long, default_value = "{}")]
    pub tool_arguments: String,
    /// ASR: time to the transcript, ms.
    #[arg(long, default_value_t = 50)]
    pub asr_ms: u64,
    /// ASR: transcript text.
    #[arg(long, default_value = DEFAULT_ASR_TEXT)]
    pub asr_text: String,
    /// TTS: time to the audio, ms.
    #[arg(long, default_value_t = 50)]
    pub tts_ms: u64,
    /// TTS: duration of the returned audio, ms.
    #[arg(long, default_value_t = 400)]
    pub tts_audio_ms: u64,
    /// Fail every request with this HTTP status (e.g. 500).
    #[arg(long)]
    pub fail_status: Option<u16>,
    /// Accept requests and never answer them.
    #[arg(long)]
    pub stall: bool,
}

impl From<MockArgs> for MockSettings {
    fn from(args: MockArgs) -> Self {
        Self {
            bind: SocketAddr::new(args.host, args.port),
            llm_first_token: Duration::from_millis(args.llm_first_token_ms),
            llm_token: Duration::from_millis(args.llm_token_ms),
            llm_reply: args.llm_reply,
            tool_trigger: args.tool_trigger,
            tool_name: args.tool_name,
            tool_arguments: args.tool_arguments,
            asr_delay: Duration::from_millis(args.asr_ms),
            asr_text: args.asr_text,
            tts_delay: Duration::from_millis(args.tts_ms),
            tts_audio: Duration::from_millis(args.tts_audio_ms),
            fail_status: args.fail_status,
            stall: args.stall,
        }
    }
}

/// `xiaozhi-bench mock-upstream`: serves until the process is killed.
pub fn run(args: MockArgs) -> Result<(), String> {
    let handle = serve(args.into()).map_err(|e| format!("mock upstream: {e}"))?;
    println!("mock upstream listening on {}", handle.base_url());
    loop {
        thread::park();
    }
}

/// Counters since the mock started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MockStats {
    /// TCP connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub open_connections: u64,
    /// HTTP requests read, on every route.
    pub requests: u64,
    /// Chat completion requests.
    pub chat_requests: u64,
    /// Transcription requests.
    pub transcription_requests: u64,
    /// Speech requests.
    pub speech_requests: u64,
}

/// A running mock; stops when dropped or on [`stop`](Self::stop).
pub struct MockHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl MockHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL for OpenAI clients, e.g. `http://127.0.0.1:18080/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Counters so far.
    pub fn stats(&self) -> MockStats {
        let c = &self.shared.counters;
        MockStats {
            connections: c.connections.load(Ordering::Relaxed),
            open_connections: c.open_connections.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            chat_requests: c.chat.load(Ordering::Relaxed),
            transcription_requests: c.transcriptions.load(Ordering::Relaxed),
            speech_requests: c.speech.load(Ordering::Relaxed),
        }
    }

    /// Bodies of the last chat completion requests (up to 64), oldest first.
    pub fn chat_requests(&self) -> Vec<Value> {
        lock(&self.shared.chat_log).iter().cloned().collect()
    }

    /// Changes the behaviour for requests read from now on (`bind` is ignored).
    pub fn update(&self, change: impl FnOnce(&mut MockSettings)) {
        let mut current = lock(&self.shared.settings);
        let mut settings = MockSettings::clone(&current);
        change(&mut settings);
        if settings.tts_audio != current.tts_audio {
            *lock(&self.shared.audio) = Arc::new(TtsAudio::new(settings.tts_audio));
        }
        *current = Arc::new(settings);
    }

    /// Stops accepting, closes every connection and waits (up to 2 s) for their threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stop.stop();
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let _ = acceptor.join();
        for stream in lock(&self.shared.open).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self
            .shared
            .counters
            .open_connections
            .load(Ordering::Relaxed)
            > 0
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds `settings.bind` and serves on background threads until the handle is dropped.
pub fn serve(settings: MockSettings) -> io::Result<MockHandle> {
    let listener = TcpListener::bind(settings.bind)?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        audio: Mutex::new(Arc::new(TtsAudio::new(settings.tts_audio))),
        settings: Mutex::new(Arc::new(settings)),
        stop: StopSignal::default(),
        open: Mutex::new(HashMap::new()),
        counters: Counters::default(),
        chat_log: Mutex::new(VecDeque::new()),
    });
    let acceptor = {
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("mock-upstream-accept".into())
            .spawn(move || accept_loop(&listener, &shared))?
    };
    Ok(MockHandle {
        addr,
        shared,
        acceptor: Some(acceptor),
    })
}

/// State shared by the acceptor, the connections and the handle.
struct Shared {
    settings: Mutex<Arc<MockSettings>>,
    audio: Mutex<Arc<TtsAudio>>,
    stop: StopSignal,
    /// Open connections by id, to shut them down on stop.
    open: Mutex<HashMap<u64, TcpStream>>,
    counters: Counters,
    chat_log: Mutex<VecDeque<Value>>,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    open_connections: AtomicU64,
    requests: AtomicU64,
    chat: AtomicU64,
    transcriptions: AtomicU64,
    speech: AtomicU64,
}

/// Set once on stop; every wait in the mock returns early when it is set.
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl StopSignal {
    fn stop(&self) {
        *lock(&self.stopped) = true;
        self.changed.notify_all();
    }

    fn is_stopped(&self) -> bool {
        *lock(&self.stopped)
    }

    /// Waits until `deadline`; `false` when the mock stopped first.
    fn wait_until(&self, deadline: Instant) -> bool {
        let mut stopped = lock(&self.stopped);
        loop {
            if *stopped {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            stopped = match self.changed.wait_timeout(stopped, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn wait_forever(&self) {
        let mut stopped = lock(&self.stopped);
        while !*stopped {
            stopped = match self.changed.wait(stopped) {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }
}

/// Locks a mutex, ignoring poisoning (a panicked connection thread leaves valid data).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Answers one request; `Err` when the connection must close.
fn route(
    out: &mut TcpStream,
    request: &Request,
    settings: &MockSettings,
    shared: &Shared,
) -> io::Result<()> {
    let path = request.path.trim_end_matches('/');
    let endpoint = [
        "/chat/completions",
        "/audio/transcriptions",
        "/audio/speech",
        "/models",
    ]
    .into_iter()
    .find(|e| path.ends_with(e));
    let keep_alive = request.keep_alive;
    match (request.method.as_str(), endpoint) {
        ("POST", Some("/chat/completions")) => {
            shared.counters.chat.fetch_add(1, Ordering::Relaxed);
            chat::chat_completion(out, request, settings, shared)
        }
        ("POST", Some("/audio/transcriptions")) => {
            shared
                .counters
                .transcriptions
                .fetch_add(1, Ordering::Relaxed);
            audio::transcription(out, request, settings, shared)
        }
        ("POST", Some("/audio/speech")) => {
            shared.counters.speech.fetch_add(1, Ordering::Relaxed);
            audio::speech(out, request, settings, shared)
        }
        ("GET", Some("/models")) => {
            let body = json!({"object": "list", "data": [
                {"id": "mock", "object": "model", "created": 0, "owned_by": "xiaozhi-bench"}
            ]});
            write_json(out, 200, &body, keep_alive)
        }
        (_, Some(_)) => write_error(out, 405, "method not allowed", keep_alive),
        (_, None) => write_error(out, 404, "no such route on the mock upstream", keep_alive),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::test_client::{chat_body, fast, Client};
    use super::*;

    #[test]
    fn fail_status_answers_every_request_with_an_error() {
        let mock = serve(MockSettings {
            fail_status: Some(503),
            ..fast()
        })
        .expect("serve");
        let mut client = Client::connect(mock.addr());
        for path in ["/v1/chat/completions", "/v1/audio/speech", "/anything"] {
            let response = client.request("POST", path, &chat_body(true));
            assert_eq!(response.status, 503, "{path}");
            assert_eq!(response.json()["error"]["type"], "server_error");
        }
        mock.update(|s| s.fail_status = None);
        let response = client.request("POST", "/v1/chat/completions", &chat_body(false));
        assert_eq!(response.status, 200);
        assert_eq!(mock.stats().connections, 1);
    }

    #[test]
    fn stall_never_answers_and_stop_closes_the_connection() {
        let mock = serve(MockSettings {
            stall: true,
            ..fast()
        })
        .expect("serve");
        let mut client = Client::connect(mock.addr());
        client
            .stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        client.send("POST", "/v1/chat/completions", "application/json", b"{}");
        let err = client.receive().err().expect("no answer");
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        assert_eq!(mock.stats().requests, 1);
        assert_eq!(mock.stats().open_connections, 1);
        let stopped = Instant::now();
        mock.stop();
        assert!(stopped.elapsed() < Duration::from_secs(1));
        client
            .stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        assert!(matches!(client.stream.read(&mut buf), Ok(0) | Err(_)));
    }

    #[test]
    fn unknown_route_is_404_and_bad_json_is_400() {
        let mock = serve(fast()).expect("serve");
        let mut client = Client::connect(mock.addr());
        assert_eq!(client.request("GET", "/nope", &json!({})).status, 404);
        assert_eq!(
            client
                .request("GET", "/v1/chat/completions", &json!({}))
                .status,
            405
        );
        client.send(
            "POST",
            "/v1/chat/completions",
            "application/json",
            b"{not json",
        );
        assert_eq!(client.receive().expect("response").status, 400);
    }

    #[test]
    fn cli_flags_map_to_settings() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            mock: MockArgs,
        }
        let cli = Cli::parse_from([
            "bench",
            "--port",
            "18080",
            "--llm-first-token-ms",
            "100",
            "--llm-token-ms",
            "10",
            "--asr-ms",
            "50",
            "--asr-text",
            "hello there",
            "--tts-ms",
            "50",
            "--tts-audio-ms",
            "400",
        ]);
        let settings = MockSettings::from(cli.mock);
        assert_eq!(
            settings,
            MockSettings {
                bind: "127.0.0.1:18080".parse().expect("addr"),
                asr_text: "hello there".into(),
                ..MockSettings::default()
            }
        );
    }
}
