//! The OpenAI-compatible providers (LLM, ASR, TTS) and the shard HTTP client against a real
//! loopback server: `tests/fake_openai/server.py` (Python standard library), which splits SSE
//! events across TCP writes, counts connections and notices clients that hang up.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::Request;
use serde_json::{json, Value};
use xiaozhi_tpc::providers::asr::openai::{transcribe, OpenAiAsrSettings};
use xiaozhi_tpc::providers::error::ProviderError;
use xiaozhi_tpc::providers::http_client::{ClientSettings, HttpClient, HttpError, ReqBody};
use xiaozhi_tpc::providers::llm::{
    stream_chat, ChatMessage, LlmError, LlmEvent, LlmSummary, OpenAiSettings, ToolCall,
};
use xiaozhi_tpc::providers::tts::openai::{speech, OpenAiTtsSettings};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fake_openai")
        .join(name)
}

/// The fake server process, killed when dropped.
struct FakeServer {
    child: Child,
    port: u16,
    tls: bool,
}

impl FakeServer {
    fn start(tls: bool) -> FakeServer {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let mut cmd = Command::new(python);
        cmd.arg(fixture("server.py"));
        if tls {
            cmd.arg("--tls")
                .arg(fixture("server.crt"))
                .arg(fixture("server.key"));
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("start tests/fake_openai/server.py with python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("server output");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected server output {line:?}"));
        FakeServer { child, port, tls }
    }

    fn base_url(&self, host: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{host}:{}/v1", self.port)
    }

    /// Connections that served `/v1` requests, and the last request bodies.
    async fn stats(&self) -> Value {
        // A client of its own, so the test client's pool is not touched.
        let client = test_client();
        let scheme = if self.tls { "https" } else { "http" };
        let req = Request::get(format!("{scheme}://127.0.0.1:{}/_stats", self.port))
            .body(ReqBody::empty())
            .unwrap();
        let resp = client.request(req).await.expect("stats");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    /// Waits until the server saw the client hang up mid-stream on connection `id`.
    async fn wait_client_closed(&self, id: u64) -> Duration {
        let start = Instant::now();
        loop {
            let stats = self.stats().await;
            let conn = stats["connections"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["id"] == id)
                .cloned()
                .expect("connection");
            if conn["client_closed_mid_stream"] == true && conn["closed"] == true {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "server did not see the disconnect: {conn}"
            );
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run<F: Future<Output = ()>>(f: F) {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(f);
}

fn test_client() -> HttpClient {
    HttpClient::try_new(ClientSettings {
        extra_root_pem: Some(fixture("ca.crt")),
        ..ClientSettings::default()
    })
    .expect("client")
}

fn llm_settings(base_url: String, model: &str) -> OpenAiSettings {
    OpenAiSettings {
        base_url,
        api_key: "sk-test".into(),
        model: model.into(),
        temperature: Some(0.5),
        max_tokens: Some(100),
        connect_timeout: Duration::from_secs(2),
        first_token_timeout: Duration::from_secs(5),
        total_timeout: Duration::from_secs(10),
    }
}

fn dialogue() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("Say hello"),
    ]
}

/// Runs one chat and collects its events.
async fn chat(
    client: &HttpClient,
    settings: &OpenAiSettings,
    tools: Option<&Value>,
) -> (Vec<LlmEvent>, Result<LlmSummary, LlmError>) {
    let mut events = Vec::new();
    let result = stream_chat(client, settings, &dialogue(), tools, |e| events.push(e)).await;
    (events, result)
}

fn texts(events: &[LlmEvent]) -> String {
    events
        .iter()
        .map(|e| match e {
            LlmEvent::Text(t) => t.as_str(),
            LlmEvent::ToolCallDelta { .. } => panic!("unexpected tool call {e:?}"),
        })
        .collect()
}

fn v1_connections(stats: &Value) -> Vec<Value> {
    stats["connections"].as_array().unwrap().clone()
}

#[test]
fn split_sse_events_are_reassembled_and_think_blocks_stripped() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let settings = llm_settings(server.base_url("127.0.0.1"), "think");
        let (events, result) = chat(&client, &settings, None).await;
        let summary = result.expect("chat");
        assert_eq!(texts(&events), "Hello, world! 你好");
        assert_eq!(summary.text, "Hello, world! 你好");
        assert_eq!(summary.finish_reason.as_deref(), Some("stop"));
        assert_eq!(summary.usage.map(|u| u.total_tokens), Some(19));
        assert!(summary.tool_calls.is_empty());

        let last = &server.stats().await["last"]["chat"];
        assert_eq!(last["target"], "/v1/chat/completions");
        assert_eq!(last["host"], format!("127.0.0.1:{}", server.port));
        assert_eq!(last["authorization"], "Bearer sk-test");
        assert_eq!(
            last["body"],
            json!({
                "model": "think",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Say hello"}
                ],
                "stream": true,
                "stream_options": {"include_usage": true},
                "temperature": 0.5,
                "max_tokens": 100
            })
        );
    });
}

#[test]
fn three_chats_share_one_keep_alive_connection() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let settings = llm_settings(server.base_url("127.0.0.1"), "think");
        for _ in 0..3 {
            let (events, result) = chat(&client, &settings, None).await;
            result.expect("chat");
            assert_eq!(texts(&events), "Hello, world! 你好");
        }
        let conns = v1_connections(&server.stats().await);
        assert_eq!(conns.len(), 1, "{conns:?}");
        assert_eq!(conns[0]["paths"].as_array().unwrap().len(), 3);
        assert_eq!(client.pooled_connections(), 1);
    });
}

/// `n` speech requests in flight at once on `client` (every response head read before any
/// body), then every body read: the client needs `n` connections for them.
async fn requests_in_flight(client: &HttpClient, server: &FakeServer, n: usize) {
    let mut heads = Vec::new();
    // 100 KB of speech, sent in 4 KiB chunks: a connection stays busy until its body is read.
    let body = json!({"model": "tts-1", "voice": "alloy", "input": "a".repeat(500)}).to_string();
    for _ in 0..n {
        let req = Request::post(format!("http://127.0.0.1:{}/v1/audio/speech", server.port))
            .header("content-type", "application/json")
            .body(ReqBody::full(body.clone()))
            .unwrap();
        heads.push(client.request(req).await.expect("request"));
    }
    for resp in heads {
        resp.into_body().collect().await.expect("body");
    }
}

#[test]
fn the_pool_keeps_as_many_connections_as_it_is_sized_for() {
    let server = FakeServer::start(false);
    run(async {
        for (pool, opened_after_two_rounds) in [(16, 12), (4, 20)] {
            let client = HttpClient::try_new(ClientSettings {
                max_pooled_per_origin: pool,
                ..ClientSettings::default()
            })
            .expect("client");
            requests_in_flight(&client, &server, 12).await;
            assert_eq!(client.opened(), 12, "pool {pool}: first round");
            assert_eq!(client.pooled_connections(), pool.min(12), "pool {pool}");
            requests_in_flight(&client, &server, 12).await;
            // Sized for the load, the second round reuses every connection; too small, it
            // opens again what it could not keep (the churn upstream.max_pooled_per_origin
            // prevents).
            assert_eq!(
                client.opened(),
                opened_after_two_rounds,
                "pool {pool}: after the second round"
            );
        }
    });
}

#[test]
fn tool_call_deltas_are_merged_by_index() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let settings = llm_settings(server.base_url("127.0.0.1"), "tools");
        let tools = json!([{"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let (events, result) = chat(&client, &settings, Some(&tools)).await;
        let summary = result.expect("chat");
        assert_eq!(events.len(), 5, "{events:?}");
        assert_eq!(
            events[0],
            LlmEvent::ToolCallDelta {
                index: 0,
                id: Some("call_w".into()),
                name: Some("get_weather".into()),
                arguments_fragment: String::new()
            }
        );
        assert_eq!(
            summary.tool_calls,
            vec![
                ToolCall {
                    index: 0,
                    id: "call_w".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into()
                },
                ToolCall {
                    index: 1,
                    id: "call_m".into(),
                    name: "play_music".into(),
                    arguments: r#"{"song":"Yesterday"}"#.into()
                },
            ]
        );
        assert_eq!(summary.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(summary.usage, None);
        assert_eq!(server.stats().await["last"]["chat"]["body"]["tools"], tools);
    });
}

#[test]
fn first_token_timeout_fires_and_closes_the_connection() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let mut settings = llm_settings(server.base_url("127.0.0.1"), "slow");
        settings.first_token_timeout = Duration::from_millis(300);
        let start = Instant::now();
        let (events, result) = chat(&client, &settings, None).await;
        let took = start.elapsed();
        assert!(
            matches!(result, Err(LlmError::FirstTokenTimeout(d)) if d == Duration::from_millis(300)),
            "{result:?}"
        );
        assert!(events.is_empty());
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(800),
            "{took:?}"
        );
        server.wait_client_closed(0).await;
        assert_eq!(client.pooled_connections(), 0);
    });
}

#[test]
fn total_timeout_fires_mid_stream() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let mut settings = llm_settings(server.base_url("127.0.0.1"), "endless");
        settings.total_timeout = Duration::from_millis(400);
        let (events, result) = chat(&client, &settings, None).await;
        assert!(
            matches!(result, Err(LlmError::TotalTimeout(_))),
            "{result:?}"
        );
        assert!(events.len() >= 5, "{} events", events.len());
        server.wait_client_closed(0).await;
    });
}

#[test]
fn dropping_the_chat_future_closes_the_connection() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let settings = llm_settings(server.base_url("127.0.0.1"), "endless");
        let received = Rc::new(Cell::new(0usize));
        let counter = received.clone();
        let chat = async {
            let messages = dialogue();
            Some(
                stream_chat(&client, &settings, &messages, None, |_| {
                    counter.set(counter.get() + 1)
                })
                .await,
            )
        };
        let cancel = async {
            while received.get() < 5 {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            None
        };
        // `or` drops the chat future as soon as `cancel` wins.
        let outcome = futures_lite::future::or(chat, cancel).await;
        assert!(outcome.is_none());
        let seen_after = server.wait_client_closed(0).await;
        assert!(seen_after < Duration::from_millis(500), "{seen_after:?}");
        assert!(received.get() < 10);
        // The client is still usable: a new request opens a new connection.
        let settings = llm_settings(server.base_url("127.0.0.1"), "think");
        chat_ok(&client, &settings).await;
        assert_eq!(v1_connections(&server.stats().await).len(), 2);
    });
}

async fn chat_ok(client: &HttpClient, settings: &OpenAiSettings) {
    let (events, result) = chat(client, settings, None).await;
    result.expect("chat");
    assert_eq!(texts(&events), "Hello, world! 你好");
}

#[test]
fn server_error_is_a_status_error_with_the_body_snippet() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let settings = llm_settings(server.base_url("127.0.0.1"), "boom");
        let (events, result) = chat(&client, &settings, None).await;
        assert!(events.is_empty());
        match result {
            Err(LlmError::Http(HttpError::Status { code, body_snippet })) => {
                assert_eq!(code, 500);
                assert!(body_snippet.contains("model exploded"), "{body_snippet}");
            }
            other => panic!("expected a 500 status error, got {other:?}"),
        }
    });
}

#[test]
fn dead_port_is_a_connect_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    run(async {
        let client = test_client();
        let settings = llm_settings(format!("http://127.0.0.1:{port}/v1"), "think");
        let (_, result) = chat(&client, &settings, None).await;
        match result {
            Err(LlmError::Http(HttpError::Connect { addr, source })) => {
                assert_eq!(
                    addr,
                    format!("127.0.0.1:{port}")
                        .parse::<std::net::SocketAddr>()
                        .unwrap()
                );
                assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    });
}

#[test]
fn connection_closed_by_the_server_is_replaced() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let settings = llm_settings(server.base_url("127.0.0.1"), "close");
        chat_ok(&client, &settings).await;
        glommio::timer::sleep(Duration::from_millis(150)).await;
        chat_ok(&client, &settings).await;
        assert_eq!(v1_connections(&server.stats().await).len(), 2);
    });
}

#[test]
fn request_on_a_connection_the_server_just_closed_is_sent_again() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        // The server reads the next request on this connection and closes it unanswered,
        // as when its keep-alive timeout fires just as the request goes out.
        chat_ok(
            &client,
            &llm_settings(server.base_url("127.0.0.1"), "stale"),
        )
        .await;
        chat_ok(
            &client,
            &llm_settings(server.base_url("127.0.0.1"), "think"),
        )
        .await;
        let conns = v1_connections(&server.stats().await);
        let paths: Vec<usize> = conns
            .iter()
            .map(|c| c["paths"].as_array().unwrap().len())
            .collect();
        assert_eq!(paths, vec![2, 1], "{conns:?}");
    });
}

/// A small mono PCM16 WAV.
fn test_wav() -> Vec<u8> {
    let samples: Vec<i16> = (0..4000).map(|i| ((i * 13) % 600 - 300) as i16).collect();
    let mut wav = Vec::new();
    let data_len = (samples.len() * 2) as u32;
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&[1, 0, 1, 0]);
    wav.extend_from_slice(&16000u32.to_le_bytes());
    wav.extend_from_slice(&32000u32.to_le_bytes());
    wav.extend_from_slice(&[2, 0, 16, 0]);
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        wav.extend_from_slice(&s.to_le_bytes());
    }
    wav
}

fn asr_settings(base_url: String) -> OpenAiAsrSettings {
    OpenAiAsrSettings {
        base_url,
        api_key: "sk-asr".into(),
        model: "whisper-1".into(),
        language: Some("zh".into()),
        timeout: Duration::from_secs(5),
    }
}

#[test]
fn transcription_round_trip() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let wav = test_wav();
        let text = transcribe(
            &client,
            &asr_settings(server.base_url("127.0.0.1")),
            wav.clone(),
        )
        .await
        .expect("transcribe");
        assert_eq!(text, "turn on the lights");
        let last = &server.stats().await["last"]["transcription"];
        assert_eq!(
            last["fields"],
            json!({"model": "whisper-1", "response_format": "json", "language": "zh"})
        );
        assert_eq!(last["file"]["name"], "file");
        assert_eq!(last["file"]["filename"], "audio.wav");
        assert_eq!(last["file"]["content_type"], "audio/wav");
        let hex: String = wav.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(last["file"]["hex"], hex);
        assert!(
            last["content_length"].is_string(),
            "sent with a Content-Length"
        );
        assert_eq!(last["authorization"], "Bearer sk-asr");
    });
}

fn expected_speech(text: &str) -> Vec<i16> {
    // The server makes 100 samples per character.
    (0..text.chars().count() * 100)
        .map(|i| ((i * 37 % 2000) as i32 - 1000) as i16)
        .collect()
}

#[test]
fn speech_round_trip_wav_and_pcm() {
    let server = FakeServer::start(false);
    run(async {
        let client = test_client();
        let mut settings = OpenAiTtsSettings {
            base_url: server.base_url("127.0.0.1"),
            api_key: Default::default(),
            model: "tts-1".into(),
            voice: "alloy".into(),
            response_format: "wav".into(),
            sample_rate_for_pcm: 24000,
            timeout: Duration::from_secs(5),
        };
        let text = "今天天气很好。";
        let (samples, rate) = speech(&client, &settings, text).await.expect("wav");
        assert_eq!(rate, 22050, "rate from the WAV header");
        assert!(
            samples == expected_speech(text),
            "{} samples",
            samples.len()
        );
        assert_eq!(
            server.stats().await["last"]["speech"],
            json!({"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"})
        );

        settings.response_format = "pcm".into();
        let (samples, rate) = speech(&client, &settings, "Hello.").await.expect("pcm");
        assert_eq!(rate, 24000, "configured pcm rate");
        assert!(
            samples == expected_speech("Hello."),
            "{} samples",
            samples.len()
        );
        assert_eq!(
            server.stats().await["last"]["speech"]["response_format"],
            "pcm"
        );
        assert_eq!(v1_connections(&server.stats().await).len(), 1);

        settings.response_format = "mp3".into();
        let err = speech(&client, &settings, "Hello.").await.unwrap_err();
        assert!(matches!(err, ProviderError::InvalidSettings(_)), "{err}");
    });
}

#[test]
fn https_with_a_local_ca_keeps_connections_alive() {
    let server = FakeServer::start(true);
    run(async {
        let client = test_client();
        // By name (resolved off the executor; may try ::1 first) and by IP SAN.
        for host in ["localhost", "127.0.0.1"] {
            let settings = llm_settings(server.base_url(host), "think");
            chat_ok(&client, &settings).await;
            chat_ok(&client, &settings).await;
            let text = transcribe(&client, &asr_settings(server.base_url(host)), test_wav())
                .await
                .expect("transcribe");
            assert_eq!(text, "turn on the lights");
        }
        let conns = v1_connections(&server.stats().await);
        assert_eq!(conns.len(), 2, "one connection per origin: {conns:?}");
        for c in conns {
            assert_eq!(c["paths"].as_array().unwrap().len(), 3);
        }
    });
}

#[test]
fn https_without_the_ca_is_a_tls_error() {
    let server = FakeServer::start(true);
    run(async {
        let client = HttpClient::new(ClientSettings::default());
        let settings = llm_settings(server.base_url("localhost"), "think");
        let (_, result) = chat(&client, &settings, None).await;
        match result {
            Err(LlmError::Http(HttpError::Tls { host, source })) => {
                assert_eq!(host, "localhost");
                assert!(source.to_string().contains("UnknownIssuer"), "{source}");
            }
            other => panic!("expected a TLS error, got {other:?}"),
        }
        let asr = asr_settings(server.base_url("localhost"));
        let err = transcribe(&client, &asr, test_wav()).await.unwrap_err();
        assert!(
            matches!(err, ProviderError::Http(HttpError::Tls { .. })),
            "{err}"
        );
    });
}

#[test]
fn a_request_during_a_running_stream_opens_a_second_connection() {
    let server = FakeServer::start(false);
    run(async {
        let client = Rc::new(test_client());
        let endless = llm_settings(server.base_url("127.0.0.1"), "endless");
        let first_text = Rc::new(RefCell::new(String::new()));
        let sink = first_text.clone();
        let streaming = glommio::spawn_local({
            let client = client.clone();
            async move {
                let messages = dialogue();
                let _ = stream_chat(&client, &endless, &messages, None, |e| {
                    if let LlmEvent::Text(t) = e {
                        sink.borrow_mut().push_str(&t);
                    }
                })
                .await;
            }
        });
        while first_text.borrow().is_empty() {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let start = Instant::now();
        chat_ok(
            &client,
            &llm_settings(server.base_url("127.0.0.1"), "think"),
        )
        .await;
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "no wait behind the stream"
        );
        streaming.cancel().await;
        assert_eq!(v1_connections(&server.stats().await).len(), 2);
    });
}
