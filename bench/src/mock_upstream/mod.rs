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

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Default LLM reply: two short English sentences.
pub const DEFAULT_LLM_REPLY: &str = "It is sunny today with a high of twenty four degrees. \
     A light jacket should be enough this evening.";
/// Default transcript returned by the ASR route.
pub const DEFAULT_ASR_TEXT: &str = "What is the weather like today?";
/// Sample rate of the TTS audio (OpenAI's `pcm` format is 24 kHz PCM16LE mono).
pub const TTS_SAMPLE_RATE_HZ: u32 = 24_000;

/// Largest request head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Chat request bodies kept for [`MockHandle::chat_requests`].
const CHAT_LOG_LEN: usize = 64;
/// Stack of each connection thread: they only parse, format and sleep.
const CONNECTION_STACK_BYTES: usize = 256 * 1024;
/// Characters of tool-call arguments per streamed event.
const ARGUMENT_PIECE_CHARS: usize = 8;

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

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if shared.stop.is_stopped() {
            return;
        }
        let Ok(stream) = stream else {
            // EMFILE and friends: back off instead of spinning.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        next_id += 1;
        let id = next_id;
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .open_connections
            .fetch_add(1, Ordering::Relaxed);
        lock(&shared.open).insert(id, registered);
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("mock-upstream-conn-{id}"))
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || {
                serve_connection(stream, &conn_shared);
                lock(&conn_shared.open).remove(&id);
                conn_shared
                    .counters
                    .open_connections
                    .fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            lock(&shared.open).remove(&id);
            shared
                .counters
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One parsed HTTP request.
struct Request {
    method: String,
    /// Path without the query string.
    path: String,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
    /// When the body was fully read: every delay counts from here.
    received: Instant,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A connection's socket with the bytes read but not yet parsed.
struct Connection {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Connection {
    /// Reads more bytes; `Ok(0)` at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.pending.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next request, `None` when the client closed the connection between requests.
    fn read_request(&mut self) -> io::Result<Option<Request>> {
        let (method, path, version, headers) = loop {
            if !self.pending.is_empty() {
                let mut slots = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut slots);
                match req.parse(&self.pending) {
                    Ok(httparse::Status::Complete(len)) => {
                        let head = (
                            req.method.unwrap_or("").to_string(),
                            req.path.unwrap_or("/").to_string(),
                            req.version.unwrap_or(1),
                            req.headers
                                .iter()
                                .map(|h| {
                                    let value = String::from_utf8_lossy(h.value).trim().to_string();
                                    (h.name.to_ascii_lowercase(), value)
                                })
                                .collect::<Vec<_>>(),
                        );
                        self.pending.drain(..len);
                        break head;
                    }
                    Ok(httparse::Status::Partial) if self.pending.len() <= MAX_HEAD_BYTES => {}
                    Ok(httparse::Status::Partial) => return Err(invalid("request head too large")),
                    Err(e) => return Err(invalid(&format!("bad request head: {e}"))),
                }
            }
            if self.fill()? == 0 {
                return if self.pending.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let connection = header("connection").unwrap_or_default();
        let keep_alive = if version == 0 {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        if header("expect").is_some_and(|v| v.contains("100-continue")) {
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            self.read_chunked_body()?
        } else {
            let len = match header("content-length") {
                Some(v) => v
                    .parse::<usize>()
                    .map_err(|_| invalid("bad content-length"))?,
                None => 0,
            };
            self.read_exact_body(len)?
        };
        let path = path.split('?').next().unwrap_or("/").to_string();
        Ok(Some(Request {
            method,
            path,
            headers,
            body,
            keep_alive,
            received: Instant::now(),
        }))
    }

    fn read_exact_body(&mut self, len: usize) -> io::Result<Vec<u8>> {
        if len > MAX_BODY_BYTES {
            return Err(invalid("request body too large"));
        }
        while self.pending.len() < len {
            if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.pending.drain(..len).collect())
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = find(&self.pending, b"\r\n") {
                let line = String::from_utf8_lossy(&self.pending[..end]).into_owned();
                self.pending.drain(..end + 2);
                return Ok(line);
            }
            if self.pending.len() > MAX_HEAD_BYTES {
                return Err(invalid("chunk line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    fn read_chunked_body(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size =
                usize::from_str_radix(size_hex, 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > MAX_BODY_BYTES {
                return Err(invalid("request body too large"));
            }
            let chunk = self.read_exact_body(size + 2)?;
            body.extend_from_slice(&chunk[..size]);
        }
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut conn = Connection {
        stream,
        pending: Vec::new(),
    };
    loop {
        let request = match conn.read_request() {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData && !shared.stop.is_stopped() {
                    let _ = write_error(&mut conn.stream, 400, &e.to_string(), false);
                }
                return;
            }
        };
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        let settings = Arc::clone(&lock(&shared.settings));
        if settings.stall {
            shared.stop.wait_forever();
            return;
        }
        let answered = match settings.fail_status {
            Some(status) => write_error(
                &mut conn.stream,
                status,
                "mock upstream failure (fail_status)",
                request.keep_alive,
            ),
            None => route(&mut conn.stream, &request, &settings, shared),
        };
        if answered.is_err() || !request.keep_alive || shared.stop.is_stopped() {
            return;
        }
    }
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
            chat_completion(out, request, settings, shared)
        }
        ("POST", Some("/audio/transcriptions")) => {
            shared
                .counters
                .transcriptions
                .fetch_add(1, Ordering::Relaxed);
            transcription(out, request, settings, shared)
        }
        ("POST", Some("/audio/speech")) => {
            shared.counters.speech.fetch_add(1, Ordering::Relaxed);
            speech(out, request, settings, shared)
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

fn chat_completion(
    out: &mut TcpStream,
    request: &Request,
    settings: &MockSettings,
    shared: &Shared,
) -> io::Result<()> {
    let keep_alive = request.keep_alive;
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return write_error(out, 400, "request body is not JSON", keep_alive);
    };
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return write_error(out, 400, "`messages` is required", keep_alive);
    };
    let prompt_chars: usize = messages
        .iter()
        .map(|m| message_text(m).chars().count())
        .sum();
    let tool_call = tool_call_for(&body, messages, settings);
    {
        let mut log = lock(&shared.chat_log);
        if log.len() == CHAT_LOG_LEN {
            log.pop_front();
        }
        log.push_back(body.clone());
    }
    let n = shared.counters.chat.load(Ordering::Relaxed);
    let reply = ChatReply {
        id: format!("chatcmpl-mock-{n}"),
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("mock")
            .to_string(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        prompt_tokens: prompt_chars.div_ceil(4),
    };
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let schedule = Schedule {
        start: request.received,
        first: settings.llm_first_token,
        each: settings.llm_token,
    };
    let stop = &shared.stop;
    match (tool_call, stream) {
        (Some((name, arguments)), true) => {
            let pieces = split_pieces(&arguments, ARGUMENT_PIECE_CHARS);
            write_sse_head(out, keep_alive)?;
            let mut events = Vec::with_capacity(pieces.len() + 1);
            events.push(
                json!({"role": "assistant", "content": null, "tool_calls": [{
                "index": 0, "id": format!("call_mock_{n}"), "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
            );
            for piece in &pieces {
                events
                    .push(json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}));
            }
            for (i, delta) in events.iter().enumerate() {
                if !stop.wait_until(schedule.at(i)) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                write_sse(out, &reply.chunk(delta.clone(), None))?;
            }
            let usage = include_usage.then(|| reply.usage(pieces.len() + 1));
            finish_sse(out, &reply, "tool_calls", usage)
        }
        (Some((name, arguments)), false) => {
            let tokens = split_pieces(&arguments, ARGUMENT_PIECE_CHARS).len() + 1;
            if !stop.wait_until(schedule.at(tokens - 1)) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let message = json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": format!("call_mock_{n}"), "type": "function",
                "function": {"name": name, "arguments": arguments}}]});
            let body = reply.completion(message, "tool_calls", tokens);
            write_json(out, 200, &body, keep_alive)
        }
        (None, true) => {
            let tokens = split_tokens(&settings.llm_reply);
            write_sse_head(out, keep_alive)?;
            if tokens.is_empty() && !stop.wait_until(schedule.at(0)) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            for (i, token) in tokens.iter().enumerate() {
                if !stop.wait_until(schedule.at(i)) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": token})
                } else {
                    json!({"content": token})
                };
                write_sse(out, &reply.chunk(delta, None))?;
            }
            let usage = include_usage.then(|| reply.usage(tokens.len()));
            finish_sse(out, &reply, "stop", usage)
        }
        (None, false) => {
            let tokens = split_tokens(&settings.llm_reply).len().max(1);
            if !stop.wait_until(schedule.at(tokens - 1)) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let message = json!({"role": "assistant", "content": settings.llm_reply});
            let body = reply.completion(message, "stop", tokens);
            write_json(out, 200, &body, keep_alive)
        }
    }
}

/// When token `i` is due: the first after `first`, then one per `each`.
struct Schedule {
    start: Instant,
    first: Duration,
    each: Duration,
}

impl Schedule {
    fn at(&self, i: usize) -> Instant {
        let later = self
            .each
            .saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
        self.start + self.first + later
    }
}

/// The fields every chunk or completion of one reply shares.
struct ChatReply {
    id: String,
    model: String,
    created: u64,
    prompt_tokens: usize,
}

impl ChatReply {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn completion(&self, message: Value, finish_reason: &str, tokens: usize) -> Value {
        json!({
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": self.usage(tokens),
        })
    }
}

/// `Some((tool name, arguments))` when this request should get a tool call.
fn tool_call_for(
    body: &Value,
    messages: &[Value],
    settings: &MockSettings,
) -> Option<(String, String)> {
    let trigger = settings.tool_trigger.as_deref()?.to_lowercase();
    let tools = body.get("tools").and_then(Value::as_array)?;
    let last = messages.last()?;
    if last.get("role").and_then(Value::as_str) != Some("user")
        || !message_text(last).to_lowercase().contains(&trigger)
    {
        return None;
    }
    let name = match &settings.tool_name {
        Some(name) => name.clone(),
        None => tools
            .first()?
            .pointer("/function/name")
            .and_then(Value::as_str)?
            .to_string(),
    };
    Some((name, settings.tool_arguments.clone()))
}

/// The text of a message whose `content` is a string or an array of parts.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Splits text into word-sized tokens like a BPE tokenizer's: a word keeps the spaces before it,
/// and each CJK character, punctuation mark or emoji is a token of its own.
fn split_tokens(text: &str) -> Vec<String> {
    let is_word = |ch: char| ch.is_ascii_alphanumeric() || ch == '\'' || ch == '-';
    let mut tokens: Vec<String> = Vec::new();
    let mut current = String::new();
    for ch in text.chars() {
        let continues = match current.chars().last() {
            None => true,
            Some(prev) if prev.is_whitespace() => ch.is_whitespace() || is_word(ch),
            Some(prev) if is_word(prev) => is_word(ch),
            Some(_) => false,
        };
        if !continues {
            tokens.push(std::mem::take(&mut current));
        }
        current.push(ch);
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

/// Splits text into pieces of at most `chars` characters.
fn split_pieces(text: &str, chars: usize) -> Vec<String> {
    let all: Vec<char> = text.chars().collect();
    all.chunks(chars.max(1))
        .map(|piece| piece.iter().collect())
        .collect()
}

fn transcription(
    out: &mut TcpStream,
    request: &Request,
    settings: &MockSettings,
    shared: &Shared,
) -> io::Result<()> {
    let keep_alive = request.keep_alive;
    let content_type = request.header("content-type").unwrap_or("");
    let Some(parts) = multipart_parts(content_type, &request.body) else {
        return write_error(out, 400, "expected multipart/form-data", keep_alive);
    };
    if !parts.iter().any(|p| p.name == "file" && !p.data.is_empty()) {
        return write_error(out, 400, "`file` is required", keep_alive);
    }
    let format = parts
        .iter()
        .find(|p| p.name == "response_format")
        .map(|p| String::from_utf8_lossy(&p.data).trim().to_string());
    if !shared
        .stop
        .wait_until(request.received + settings.asr_delay)
    {
        return Err(io::ErrorKind::Interrupted.into());
    }
    match format.as_deref() {
        Some("text") | Some("srt") | Some("vtt") => write_response(
            out,
            200,
            "text/plain; charset=utf-8",
            settings.asr_text.as_bytes(),
            keep_alive,
        ),
        _ => write_json(out, 200, &json!({"text": settings.asr_text}), keep_alive),
    }
}

/// One part of a multipart/form-data body.
struct Part {
    name: String,
    data: Vec<u8>,
}

/// The parts of a multipart/form-data body; `None` when it is not one.
fn multipart_parts(content_type: &str, body: &[u8]) -> Option<Vec<Part>> {
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return None;
    }
    let boundary = content_type
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()?
        .trim_matches('"');
    let delimiter = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    let mut rest = &body[find(body, &delimiter)? + delimiter.len()..];
    while !rest.starts_with(b"--") {
        let rest_of_part = rest.strip_prefix(b"\r\n")?;
        let head_end = find(rest_of_part, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest_of_part[..head_end]);
        let content = &rest_of_part[head_end + 4..];
        let mut closing = b"\r\n".to_vec();
        closing.extend_from_slice(&delimiter);
        let end = find(content, &closing)?;
        let name = head
            .split(';')
            .filter_map(|p| p.trim().strip_prefix("name="))
            .next()
            .unwrap_or("")
            .trim_matches('"')
            .to_string();
        parts.push(Part {
            name,
            data: content[..end].to_vec(),
        });
        rest = &content[end + closing.len()..];
    }
    Some(parts)
}

fn speech(
    out: &mut TcpStream,
    request: &Request,
    settings: &MockSettings,
    shared: &Shared,
) -> io::Result<()> {
    let keep_alive = request.keep_alive;
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return write_error(out, 400, "request body is not JSON", keep_alive);
    };
    if body
        .get("input")
        .and_then(Value::as_str)
        .is_none_or(|s| s.trim().is_empty())
    {
        return write_error(out, 400, "`input` is required", keep_alive);
    }
    let format = body
        .get("response_format")
        .and_then(Value::as_str)
        .unwrap_or("wav");
    if format != "wav" && format != "pcm" {
        return write_error(
            out,
            400,
            "the mock upstream only synthesises `wav` and `pcm`",
            keep_alive,
        );
    }
    let audio = Arc::clone(&lock(&shared.audio));
    if !shared
        .stop
        .wait_until(request.received + settings.tts_delay)
    {
        return Err(io::ErrorKind::Interrupted.into());
    }
    if format == "pcm" {
        write_response(out, 200, "audio/pcm", &audio.wav[44..], keep_alive)
    } else {
        write_response(out, 200, "audio/wav", &audio.wav, keep_alive)
    }
}

/// The synthesised audio, made once per duration: a WAV file whose data follows a 44-byte header.
struct TtsAudio {
    wav: Vec<u8>,
}

impl TtsAudio {
    /// Speech-like audio: a 140 Hz voice with three harmonics and a slow vibrato, in 4 Hz
    /// "syllables", peaking around -20 dBFS. It is deterministic and compresses like speech.
    fn new(duration: Duration) -> Self {
        let rate = f64::from(TTS_SAMPLE_RATE_HZ);
        let samples = (duration.as_secs_f64() * rate).round() as usize;
        let data_len = u32::try_from(samples * 2).unwrap_or(u32::MAX - 44);
        let mut wav = Vec::with_capacity(44 + samples * 2);
        wav.extend_from_slice(b"RIFF");
        wav.extend_from_slice(&(36 + data_len).to_le_bytes());
        wav.extend_from_slice(b"WAVEfmt ");
        wav.extend_from_slice(&16u32.to_le_bytes());
        wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
        wav.extend_from_slice(&1u16.to_le_bytes()); // mono
        wav.extend_from_slice(&TTS_SAMPLE_RATE_HZ.to_le_bytes());
        wav.extend_from_slice(&(TTS_SAMPLE_RATE_HZ * 2).to_le_bytes());
        wav.extend_from_slice(&2u16.to_le_bytes()); // block align
        wav.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
        wav.extend_from_slice(b"data");
        wav.extend_from_slice(&data_len.to_le_bytes());
        let tau = std::f64::consts::TAU;
        let mut phase = 0.0f64;
        for n in 0..samples {
            let t = n as f64 / rate;
            let f0 = 140.0 + 12.0 * (tau * 5.0 * t).sin();
            phase += tau * f0 / rate;
            let voice = phase.sin() + 0.5 * (2.0 * phase).sin() + 0.25 * (3.0 * phase).sin();
            let syllable = (tau * 2.0 * t).sin().abs();
            let sample = 0.07 * syllable * voice * f64::from(i16::MAX);
            wav.extend_from_slice(&(sample as i16).to_le_bytes());
        }
        Self { wav }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn connection_header(keep_alive: bool) -> &'static str {
    if keep_alive {
        "keep-alive"
    } else {
        "close"
    }
}

fn write_response(
    out: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: {}\r\n\r\n",
        reason(status),
        body.len(),
        connection_header(keep_alive),
    );
    let mut response = Vec::with_capacity(head.len() + body.len());
    response.extend_from_slice(head.as_bytes());
    response.extend_from_slice(body);
    out.write_all(&response)
}

fn write_json(out: &mut TcpStream, status: u16, body: &Value, keep_alive: bool) -> io::Result<()> {
    write_response(
        out,
        status,
        "application/json",
        body.to_string().as_bytes(),
        keep_alive,
    )
}

/// An OpenAI-style error body.
fn write_error(
    out: &mut TcpStream,
    status: u16,
    message: &str,
    keep_alive: bool,
) -> io::Result<()> {
    let kind = if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    write_json(out, status, &body, keep_alive)
}

fn write_sse_head(out: &mut TcpStream, keep_alive: bool) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         Transfer-Encoding: chunked\r\nConnection: {}\r\n\r\n",
        connection_header(keep_alive),
    );
    out.write_all(head.as_bytes())
}

/// Sends one SSE event as one HTTP chunk, in one write.
fn write_sse(out: &mut TcpStream, data: &Value) -> io::Result<()> {
    write_sse_raw(out, &data.to_string())
}

fn write_sse_raw(out: &mut TcpStream, data: &str) -> io::Result<()> {
    let event = format!("data: {data}\n\n");
    let frame = format!("{:x}\r\n{event}\r\n", event.len());
    out.write_all(frame.as_bytes())
}

/// The finish chunk, the optional usage chunk, `[DONE]` and the end of the chunked body.
fn finish_sse(
    out: &mut TcpStream,
    reply: &ChatReply,
    finish_reason: &str,
    usage: Option<Value>,
) -> io::Result<()> {
    write_sse(out, &reply.chunk(json!({}), Some(finish_reason)))?;
    if let Some(usage) = usage {
        let mut chunk = reply.chunk(json!({}), None);
        chunk["choices"] = json!([]);
        chunk["usage"] = usage;
        write_sse(out, &chunk)?;
    }
    write_sse_raw(out, "[DONE]")?;
    out.write_all(b"0\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response read by the raw test client.
    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// For chunked bodies: each chunk with the time it arrived.
        chunks: Vec<(Instant, Vec<u8>)>,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("JSON body")
        }

        /// The JSON `data:` events of an SSE body, and whether `[DONE]` ended it.
        fn events(&self) -> (Vec<Value>, bool) {
            let text = String::from_utf8(self.body.clone()).expect("UTF-8 SSE");
            let mut events = Vec::new();
            let mut done = false;
            for block in text.split("\n\n").filter(|b| !b.is_empty()) {
                let data = block.strip_prefix("data: ").expect("data line");
                if data == "[DONE]" {
                    done = true;
                } else {
                    events.push(serde_json::from_str(data).expect("JSON event"));
                }
            }
            (events, done)
        }
    }

    /// A keep-alive HTTP/1.1 client over one raw socket.
    struct Client {
        stream: TcpStream,
        pending: Vec<u8>,
    }

    impl Client {
        fn connect(addr: SocketAddr) -> Self {
            let stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            Self {
                stream,
                pending: Vec::new(),
            }
        }

        fn send(&mut self, method: &str, path: &str, content_type: &str, body: &[u8]) {
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: mock\r\nContent-Type: {content_type}\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            );
            self.stream.write_all(head.as_bytes()).expect("write head");
            self.stream.write_all(body).expect("write body");
        }

        fn fill(&mut self) -> io::Result<()> {
            let mut buf = [0u8; 8192];
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.pending.extend_from_slice(&buf[..n]);
            Ok(())
        }

        fn take_line(&mut self) -> io::Result<String> {
            loop {
                if let Some(end) = find(&self.pending, b"\r\n") {
                    let line = String::from_utf8_lossy(&self.pending[..end]).into_owned();
                    self.pending.drain(..end + 2);
                    return Ok(line);
                }
                self.fill()?;
            }
        }

        fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
            while self.pending.len() < n {
                self.fill()?;
            }
            Ok(self.pending.drain(..n).collect())
        }

        fn receive(&mut self) -> io::Result<Response> {
            let status_line = self.take_line()?;
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("status");
            let mut headers = Vec::new();
            loop {
                let line = self.take_line()?;
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(':').expect("header");
                headers.push((name.to_string(), value.trim().to_string()));
            }
            let mut response = Response {
                status,
                headers,
                body: Vec::new(),
                chunks: Vec::new(),
            };
            if response.header("transfer-encoding") == Some("chunked") {
                loop {
                    let size = usize::from_str_radix(&self.take_line()?, 16).expect("size");
                    let chunk = self.take(size + 2)?;
                    if size == 0 {
                        break;
                    }
                    response.body.extend_from_slice(&chunk[..size]);
                    response
                        .chunks
                        .push((Instant::now(), chunk[..size].to_vec()));
                }
            } else {
                let len = response
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                response.body = self.take(len)?;
            }
            Ok(response)
        }

        fn request(&mut self, method: &str, path: &str, body: &Value) -> Response {
            self.send(
                method,
                path,
                "application/json",
                body.to_string().as_bytes(),
            );
            self.receive().expect("response")
        }
    }

    fn fast() -> MockSettings {
        MockSettings {
            llm_first_token: Duration::from_millis(5),
            llm_token: Duration::from_millis(1),
            asr_delay: Duration::ZERO,
            tts_delay: Duration::ZERO,
            ..MockSettings::default()
        }
    }

    fn chat_body(stream: bool) -> Value {
        json!({"model": "m", "stream": stream, "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is the weather"}]})
    }

    fn streamed_text(events: &[Value]) -> String {
        events
            .iter()
            .filter_map(|e| {
                e.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
            })
            .collect()
    }

    fn multipart(fields: &[(&str, &[u8])]) -> (String, Vec<u8>) {
        let boundary = "XyZbOuNdArY";
        let mut body = Vec::new();
        for (name, data) in fields {
            let disposition = if *name == "file" {
                "form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav"
                    .to_string()
            } else {
                format!("form-data; name=\"{name}\"")
            };
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }

    #[test]
    fn streamed_reply_first_token_waits_for_the_configured_delay() {
        let mock = serve(MockSettings {
            llm_first_token: Duration::from_millis(120),
            llm_token: Duration::from_millis(15),
            llm_reply: "One two three. Four five.".into(),
            ..MockSettings::default()
        })
        .expect("serve");
        let mut client = Client::connect(mock.addr());
        let sent = Instant::now();
        let response = client.request("POST", "/v1/chat/completions", &chat_body(true));
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        let first = response.chunks[0].0 - sent;
        assert!(
            first >= Duration::from_millis(120),
            "first chunk after {first:?}"
        );
        // 7 tokens: the last one is due 6 × 15 ms after the first.
        let (last_token_at, _) = response.chunks[6];
        let spread = last_token_at - response.chunks[0].0;
        assert!(
            spread >= Duration::from_millis(85),
            "tokens spread over {spread:?}"
        );
        let (events, done) = response.events();
        assert!(done);
        assert_eq!(streamed_text(&events), "One two three. Four five.");
        assert_eq!(events.len(), 8, "7 tokens and the finish chunk");
        assert_eq!(events[0]["object"], "chat.completion.chunk");
        assert_eq!(events[0]["model"], "m");
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[7]["choices"][0]["finish_reason"], "stop");
        assert_eq!(mock.stats().chat_requests, 1);
        assert_eq!(
            mock.chat_requests()[0]["messages"][1]["content"],
            "what is the weather"
        );
    }

    #[test]
    fn usage_chunk_is_sent_when_asked_for() {
        let mock = serve(fast()).expect("serve");
        let mut body = chat_body(true);
        body["stream_options"] = json!({"include_usage": true});
        let response = Client::connect(mock.addr()).request("POST", "/v1/chat/completions", &body);
        let (events, _) = response.events();
        let usage = events.last().expect("usage chunk");
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 21);
    }

    #[test]
    fn non_streaming_reply_is_one_completion() {
        let mock = serve(fast()).expect("serve");
        let response =
            Client::connect(mock.addr()).request("POST", "/v1/chat/completions", &chat_body(false));
        assert_eq!(response.status, 200);
        let body = response.json();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], DEFAULT_LLM_REPLY);
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn trigger_with_tools_gets_a_streamed_tool_call() {
        let mock = serve(MockSettings {
            tool_trigger: Some("VOLUME".into()),
            tool_arguments: r#"{"volume":80,"unit":"percent"}"#.into(),
            ..fast()
        })
        .expect("serve");
        let mut body = chat_body(true);
        body["messages"][1]["content"] = json!("set the volume to 80");
        body["tools"] = json!([{"type": "function", "function": {"name": "self_audio_speaker_set_volume", "parameters": {}}}]);
        let mut client = Client::connect(mock.addr());
        let (events, done) = client
            .request("POST", "/v1/chat/completions", &body)
            .events();
        assert!(done);
        let first = &events[0]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(first["function"]["name"], "self_audio_speaker_set_volume");
        assert_eq!(first["id"], "call_mock_1");
        let arguments: String = events
            .iter()
            .filter_map(|e| e.pointer("/choices/0/delta/tool_calls/0/function/arguments"))
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(arguments, r#"{"volume":80,"unit":"percent"}"#);
        assert_eq!(
            events.last().expect("finish")["choices"][0]["finish_reason"],
            "tool_calls"
        );
        // After the tool result the same user message gets text, not another call.
        body["messages"]
            .as_array_mut()
            .expect("messages")
            .push(json!({"role": "tool", "tool_call_id": "call_mock_1", "content": "ok"}));
        let (events, _) = client
            .request("POST", "/v1/chat/completions", &body)
            .events();
        assert_eq!(streamed_text(&events), DEFAULT_LLM_REPLY);
        // Without tools there is no call either.
        let mut plain = chat_body(false);
        plain["messages"][1]["content"] = json!("volume up");
        let response = client.request("POST", "/v1/chat/completions", &plain);
        assert_eq!(
            response.json()["choices"][0]["message"]["content"],
            DEFAULT_LLM_REPLY
        );
    }

    #[test]
    fn non_streaming_tool_call_has_the_whole_arguments() {
        let mock = serve(MockSettings {
            tool_trigger: Some("bye".into()),
            tool_name: Some("handle_exit_intent".into()),
            tool_arguments: r#"{"say_goodbye":"bye"}"#.into(),
            ..fast()
        })
        .expect("serve");
        let mut body = chat_body(false);
        body["messages"][1]["content"] = json!([{"type": "text", "text": "ok bye now"}]);
        body["tools"] = json!([{"type": "function", "function": {"name": "other"}}]);
        let response = Client::connect(mock.addr()).request("POST", "/v1/chat/completions", &body);
        let body = response.json();
        let call = &body["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "handle_exit_intent");
        assert_eq!(call["function"]["arguments"], r#"{"say_goodbye":"bye"}"#);
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn transcription_answers_the_configured_text_after_the_delay() {
        let mock = serve(MockSettings {
            asr_delay: Duration::from_millis(60),
            asr_text: "你好小智".into(),
            ..MockSettings::default()
        })
        .expect("serve");
        let (content_type, body) = multipart(&[("model", b"whisper-1"), ("file", b"RIFF....")]);
        let mut client = Client::connect(mock.addr());
        let sent = Instant::now();
        client.send("POST", "/v1/audio/transcriptions", &content_type, &body);
        let response = client.receive().expect("response");
        assert!(sent.elapsed() >= Duration::from_millis(60));
        assert_eq!(response.status, 200);
        assert_eq!(response.json(), json!({"text": "你好小智"}));
        let (content_type, body) = multipart(&[("file", b"x"), ("response_format", b"text")]);
        client.send("POST", "/v1/audio/transcriptions", &content_type, &body);
        assert_eq!(
            client.receive().expect("response").body,
            "你好小智".as_bytes()
        );
        assert_eq!(mock.stats().transcription_requests, 2);
    }

    #[test]
    fn transcription_without_a_file_is_rejected() {
        let mock = serve(fast()).expect("serve");
        let mut client = Client::connect(mock.addr());
        let (content_type, body) = multipart(&[("model", b"whisper-1")]);
        client.send("POST", "/v1/audio/transcriptions", &content_type, &body);
        assert_eq!(client.receive().expect("response").status, 400);
        client.send(
            "POST",
            "/v1/audio/transcriptions",
            "application/json",
            b"{}",
        );
        assert_eq!(client.receive().expect("response").status, 400);
    }

    #[test]
    fn speech_returns_a_pcm16_mono_24khz_wav_of_the_configured_length() {
        let mock = serve(MockSettings {
            tts_delay: Duration::from_millis(40),
            tts_audio: Duration::from_millis(400),
            ..MockSettings::default()
        })
        .expect("serve");
        let mut client = Client::connect(mock.addr());
        let sent = Instant::now();
        let response = client.request(
            "POST",
            "/v1/audio/speech",
            &json!({"model": "tts-1", "input": "Hello.", "voice": "alloy"}),
        );
        assert!(sent.elapsed() >= Duration::from_millis(40));
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("audio/wav"));
        let wav = &response.body;
        assert_eq!(&wav[0..4], b"RIFF");
        assert_eq!(&wav[8..16], b"WAVEfmt ");
        let u16_at = |i: usize| u16::from_le_bytes([wav[i], wav[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([wav[i], wav[i + 1], wav[i + 2], wav[i + 3]]);
        assert_eq!(u16_at(20), 1, "PCM");
        assert_eq!(u16_at(22), 1, "mono");
        assert_eq!(u32_at(24), 24_000);
        assert_eq!(u16_at(34), 16);
        assert_eq!(&wav[36..40], b"data");
        assert_eq!(u32_at(40), 400 * 24 * 2);
        assert_eq!(u32_at(4) as usize, wav.len() - 8);
        let peak = wav[44..]
            .chunks(2)
            .map(|s| i16::from_le_bytes([s[0], s[1]]).unsigned_abs())
            .max()
            .expect("samples");
        assert!(
            (1_000..8_000).contains(&peak),
            "audible but quiet: peak {peak}"
        );
    }

    #[test]
    fn speech_pcm_format_is_raw_samples_and_mp3_is_refused() {
        let mock = serve(MockSettings {
            tts_audio: Duration::from_millis(100),
            ..fast()
        })
        .expect("serve");
        let mut client = Client::connect(mock.addr());
        let body = json!({"input": "hi", "voice": "alloy", "response_format": "pcm"});
        let response = client.request("POST", "/v1/audio/speech", &body);
        assert_eq!(response.header("content-type"), Some("audio/pcm"));
        assert_eq!(response.body.len(), 100 * 24 * 2);
        let body = json!({"input": "hi", "voice": "alloy", "response_format": "mp3"});
        assert_eq!(
            client.request("POST", "/v1/audio/speech", &body).status,
            400
        );
        assert_eq!(
            client
                .request("POST", "/v1/audio/speech", &json!({}))
                .status,
            400
        );
    }

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
    fn keep_alive_reuses_one_connection_and_counts_requests() {
        let mock = serve(fast()).expect("serve");
        let mut client = Client::connect(mock.addr());
        for _ in 0..3 {
            let response = client.request("POST", "/v1/chat/completions", &chat_body(true));
            assert_eq!(response.status, 200);
        }
        let response = client.request("GET", "/v1/models", &json!({}));
        assert_eq!(response.json()["data"][0]["id"], "mock");
        let second = Client::connect(mock.addr());
        drop(second);
        let stats = mock.stats();
        assert_eq!(stats.requests, 4);
        assert_eq!(stats.chat_requests, 3);
        // The second connection may still be in the accept queue: wait for it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while mock.stats().connections < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(mock.stats().connections, 2);
    }

    #[test]
    fn connection_close_is_honoured() {
        let mock = serve(fast()).expect("serve");
        let mut client = Client::connect(mock.addr());
        let request = "GET /v1/models HTTP/1.1\r\nHost: mock\r\nConnection: close\r\n\r\n";
        client.stream.write_all(request.as_bytes()).expect("write");
        let response = client.receive().expect("response");
        assert_eq!(response.header("connection"), Some("close"));
        let mut buf = [0u8; 16];
        assert_eq!(client.stream.read(&mut buf).expect("eof"), 0);
    }

    #[test]
    fn chunked_request_bodies_are_read() {
        let mock = serve(fast()).expect("serve");
        let mut client = Client::connect(mock.addr());
        let body = json!({"input": "hi", "response_format": "pcm"}).to_string();
        let (a, b) = body.split_at(10);
        let request = format!(
            "POST /v1/audio/speech HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        client.stream.write_all(request.as_bytes()).expect("write");
        assert_eq!(client.receive().expect("response").status, 200);
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
    fn tokens_keep_leading_spaces_and_split_cjk() {
        assert_eq!(
            split_tokens("Hi, I'm here. 你好！"),
            ["Hi", ",", " I'm", " here", ".", " ", "你", "好", "！"]
        );
        assert_eq!(split_tokens(DEFAULT_LLM_REPLY).concat(), DEFAULT_LLM_REPLY);
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
