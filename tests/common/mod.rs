//! Test harness: runs the real `xiaozhi-tpc` binary on free loopback ports and talks to it
//! with real clients (tungstenite for WebSocket, raw TCP for HTTP).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests), never one this
/// test process was handed before: a port released a moment ago can be drawn again, and two
/// equal ports once made a server refuse to start (`http_port` must differ from `port`).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// A running server process, stopped (SIGKILL) when dropped.
pub struct Server {
    pub child: Child,
    pub ws_port: u16,
    pub http_port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Starts the server with `--set` overrides on free ports and waits until it answers.
    pub fn start(sets: &[&str]) -> Server {
        Self::start_with_env(sets, &[])
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(sets: &[&str], env: &[(&str, &str)]) -> Server {
        let (ws_port, http_port) = (free_port(), free_port());
        let _ = std::fs::remove_file(Self::log_path(ws_port));
        Self::start_on(ws_port, http_port, sets, env)
    }

    fn log_path(ws_port: u16) -> PathBuf {
        std::env::temp_dir().join(format!("xiaozhi-test-{ws_port}.log"))
    }

    /// Starts the server on the given ports (e.g. again after a restart); the log is appended.
    pub fn start_on(ws_port: u16, http_port: u16, sets: &[&str], env: &[(&str, &str)]) -> Server {
        let log = Self::log_path(ws_port);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xiaozhi-tpc"));
        cmd.arg("serve")
            .arg("--set")
            .arg("server.ip=127.0.0.1")
            .arg("--set")
            .arg(format!("server.port={ws_port}"))
            .arg("--set")
            .arg(format!("server.http_port={http_port}"));
        // These tests were written against the English embedded default (Whisper tiny.en,
        // Piper); a test about another language sets `language` itself.
        if !sets.iter().any(|s| s.starts_with("language=")) {
            cmd.arg("--set").arg("language=\"en\"");
        }
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        cmd.env("RUST_LOG", "info")
            .envs(env.iter().copied())
            // The log (tracing writes to stdout) and any panic message (stderr), in one file.
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file);
        let child = cmd.spawn().expect("spawn xiaozhi-tpc");
        let mut server = Server {
            child,
            ws_port,
            http_port,
            log,
        };
        // Start-up loads and checksums every model (Whisper, Piper, Silero) on the inference
        // core: ~5 s here when idle, but 15 s+ when parallel tests start several servers at once
        // on 2 busy cores. Being slow to start is not what these tests are about.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Ready, not just up: every shard listens (with only some, the kernel would send
            // every connection to those, and tests about spreading would measure start-up).
            if let Ok(resp) = http_request(http_port, "GET", "/readyz", &[], "") {
                if resp.status == 200 {
                    break;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("server exited early ({status}):\n{}", server.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "server did not become healthy:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.ws_port, path)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit in {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Value of a Prometheus metric (no labels) from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let resp = http_request(self.http_port, "GET", "/metrics", &[], "").expect("metrics");
        metric_value(&resp.body, name)
    }
}

/// Value of Prometheus metric `name` (no labels) in a `/metrics` body; panics when missing.
pub fn metric_value(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{metrics}"))
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--set` overrides that send ASR, LLM and TTS to one OpenAI-compatible `base_url`.
pub fn remote_provider_sets(base_url: &str) -> Vec<String> {
    let base = format!("\"{base_url}\"");
    vec![
        "asr.provider=\"openai\"".into(),
        "llm.provider=\"openai\"".into(),
        "tts.provider=\"openai\"".into(),
        format!("asr.openai.base_url={base}"),
        format!("llm.openai.base_url={base}"),
        format!("tts.openai.base_url={base}"),
    ]
}

/// A minimal HTTP/1.1 response.
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpResponse> {
    http_request_bytes(port, method, path, headers, body.as_bytes(), None)
}

/// Like [`http_request`] with a binary body, sent with `Content-Length` or, given a chunk size,
/// with chunked transfer encoding as the firmware's camera does. The body is written by a second
/// thread while the response is read, so a server that answers before reading everything
/// (413) is heard; write errors after its answer are ignored.
pub fn http_request_bytes(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    chunk: Option<usize>,
) -> std::io::Result<HttpResponse> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    http_exchange(s, port, method, path, headers, body, chunk)
}

/// [`http_request_bytes`] over `s`, a connection to 127.0.0.1:`port` (e.g. from another
/// loopback source address).
pub fn http_exchange(
    mut s: TcpStream,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    chunk: Option<usize>,
) -> std::io::Result<HttpResponse> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    match chunk {
        Some(_) => req.push_str("Transfer-Encoding: chunked\r\n"),
        None => req.push_str(&format!("Content-Length: {}\r\n", body.len())),
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut wire = req.into_bytes();
    match chunk {
        Some(size) => {
            for piece in body.chunks(size.max(1)) {
                wire.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                wire.extend_from_slice(piece);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
        }
        None => wire.extend_from_slice(body),
    }
    let mut writer = s.try_clone()?;
    let sender = std::thread::spawn(move || {
        for piece in wire.chunks(16 * 1024) {
            if writer.write_all(piece).is_err() {
                break;
            }
        }
    });
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    let _ = sender.join();
    if raw.is_empty() {
        read?;
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(HttpResponse {
        status,
        head: head.to_string(),
        body,
    })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A TCP connection to 127.0.0.1:`port` from the loopback source address `src` (e.g. 127.0.0.2).
pub fn tcp_from(src: &str, port: u16) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let local: SocketAddr = format!("{src}:0").parse().expect("src");
    s.bind(&local.into())?;
    let remote: SocketAddr = ([127, 0, 0, 1], port).into();
    s.connect_timeout(&remote.into(), Duration::from_secs(5))?;
    let t: TcpStream = s.into();
    t.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(t)
}

/// Opens a WebSocket with the given extra headers.
pub fn connect(url: &str, headers: &[(&str, &str)]) -> Ws {
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    let (ws, _resp) = tungstenite::connect(req).expect("websocket connect");
    set_timeout(&ws, Duration::from_secs(10));
    ws
}

pub fn set_timeout(ws: &Ws, d: Duration) {
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(d)).expect("timeout");
        s.set_write_timeout(Some(d)).expect("timeout");
    }
}

/// Device headers as firmware sends them.
pub fn device_headers<'a>(device: &'a str, version: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("Device-Id", device),
        ("Client-Id", "7b94d69a-9808-4c59-9c9b-704333b38aff"),
        ("Protocol-Version", version),
    ]
}

/// A device hello without MCP: the server then sends no MCP requests, so these tests see only
/// the messages they are about (tests/tools.rs plays a device that serves MCP, [`HELLO_MCP`]).
pub const HELLO: &str = r#"{"type":"hello","version":1,"features":{"mcp":false},"transport":"websocket","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#;

/// A hello as current firmware sends it (`features.mcp`): the server starts MCP after it.
pub const HELLO_MCP: &str = r#"{"type":"hello","version":1,"features":{"mcp":true},"transport":"websocket","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#;

/// `n` masked, empty WebSocket pings as raw bytes, and the device's socket to write them on
/// directly (bypassing the client, so they arrive in one go).
pub fn ping_flood(ws: &Ws, n: usize) -> (TcpStream, Vec<u8>) {
    let raw = match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.try_clone().expect("clone"),
        _ => unreachable!("plain socket"),
    };
    (raw, [0x89u8, 0x80, 0, 0, 0, 0].repeat(n))
}

/// Reads until a pong with `payload` arrives; returns how many other pongs came first.
pub fn pongs_until(ws: &mut Ws, payload: &[u8]) -> usize {
    let mut others = 0;
    loop {
        match ws.read().expect("read") {
            Message::Pong(p) if p.as_ref() == payload => return others,
            Message::Pong(_) => others += 1,
            _ => {}
        }
    }
}

/// Reads the next text message as JSON (skipping pings/pongs).
pub fn next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sent JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Sends hello and returns the server's hello.
pub fn hello(ws: &mut Ws, text: &str) -> serde_json::Value {
    ws.send(Message::text(text)).expect("send hello");
    let v = next_json(ws);
    assert_eq!(v["type"], "hello", "{v}");
    v
}

/// Reads until the server's close frame; returns (code, reason).
pub fn expect_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => {
                return (frame.code.into(), frame.reason.to_string())
            }
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// Speech made with espeak-ng, resampled to 16 kHz mono s16 and padded with `pad_s` of silence
/// on each side by sox; returns the samples.
pub fn speech_16k(text: &str, voice: &str, pad_s: f32) -> Vec<i16> {
    let dir = std::env::temp_dir().join(format!("xz-speech-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    // One file pair per call: tests of one binary run in parallel threads, and two of them
    // asking for the same sentence must not read each other's half-written file.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tag = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let raw = dir.join(format!("raw-{tag}.wav"));
    let out = dir.join(format!("out-{tag}.wav"));
    let ok = Command::new("espeak-ng")
        .args(["-v", voice, "-w"])
        .arg(&raw)
        .arg(text)
        .status()
        .expect("espeak-ng (run `make test`, which installs it)");
    assert!(ok.success(), "espeak-ng failed");
    // `-D`: no dither, so every run gets the same samples (sox's dither is random, and a
    // borderline VAD decision flipped between CI runs because of it).
    let ok = Command::new("sox")
        .args(["-V1", "-D"])
        .arg(&raw)
        .args(["-r", "16000", "-c", "1", "-b", "16"])
        .arg(&out)
        .args(["pad", &pad_s.to_string(), &pad_s.to_string()])
        .status()
        .expect("sox");
    assert!(ok.success(), "sox failed");
    let mut reader = hound::WavReader::open(&out).expect("wav");
    let pcm = reader
        .samples::<i16>()
        .map(|s| s.expect("sample"))
        .collect();
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&out);
    pcm
}

/// Fails clearly when the sdk group (the `.venv` with `xiaozhi-sdk`) is not installed.
pub fn assert_sdk_installed() {
    assert!(
        sdk_python().exists(),
        "the sdk group is not installed: run `make test` (scripts/setup.sh sdk)"
    );
}

fn sdk_python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

/// Runs `tests/sdk/<script>` with the sdk venv's Python, asserts it succeeded and returns the
/// JSON summary it printed last.
pub fn run_sdk_script<I, S>(script: &str, args: I) -> serde_json::Value
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    assert_sdk_installed();
    let out = Command::new(sdk_python())
        .arg(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/sdk")
                .join(script),
        )
        .args(args)
        .output()
        .expect("run the sdk");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sdk run failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("summary json")
}

/// Encodes 16 kHz PCM into 60 ms Opus packets, as the firmware does (the last frame zero-padded).
pub fn opus_frames(pcm: &[i16]) -> Vec<Vec<u8>> {
    let mut enc =
        opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).expect("encoder");
    enc.set_bitrate(opus::Bitrate::Bits(24_000))
        .expect("bitrate");
    pcm.chunks(960)
        .map(|c| {
            let mut frame = c.to_vec();
            frame.resize(960, 0);
            let mut out = vec![0u8; 1500];
            let n = enc.encode(&frame, &mut out).expect("encode");
            out.truncate(n);
            out
        })
        .collect()
}

/// Decodes packets the way the server does (16 kHz mono).
pub fn decode_frames(frames: &[Vec<u8>]) -> Vec<i16> {
    let mut dec = opus::Decoder::new(16_000, opus::Channels::Mono).expect("decoder");
    let mut pcm = Vec::new();
    let mut buf = vec![0i16; 1920];
    for f in frames {
        let n = dec.decode(f, &mut buf, false).expect("decode");
        pcm.extend_from_slice(&buf[..n]);
    }
    pcm
}

/// The `xiaozhi-bench` binary next to this test's (`cargo test --workspace` builds it).
pub fn bench_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile> folder");
    let bin = dir.join("xiaozhi-bench");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p xiaozhi-bench` (`make test` builds the whole workspace)",
        bin.display()
    );
    bin
}

/// Connects as `device` (firmware headers, protocol 1), exchanges hello and starts listening in
/// `mode` ("auto", "manual", "realtime").
pub fn listening_device(url: &str, device: &str, mode: &str) -> Ws {
    let mut ws = connect(url, &device_headers(device, "1"));
    hello(&mut ws, HELLO);
    ws.send(Message::text(format!(
        r#"{{"type":"listen","state":"start","mode":"{mode}"}}"#
    )))
    .expect("listen");
    ws
}

/// Sends `frames` as binary messages in real time: frame i is due at `t0 + (i + 1) × 60 ms`,
/// on an absolute schedule as a device's audio clock keeps it.
pub fn send_paced<'a>(ws: &mut Ws, frames: impl IntoIterator<Item = &'a Vec<u8>>, t0: Instant) {
    for (i, f) in frames.into_iter().enumerate() {
        ws.send(Message::binary(f.clone())).expect("audio");
        let due = t0 + Duration::from_millis(60) * (i as u32 + 1);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}
