//! Black-box tests of `xiaozhi-bench` against a scripted fake xiaozhi server on loopback.
//!
//! The fake answers hello, counts uplink frames after `listen start`, and replies (stt, tts
//! start, llm, sentence_start, ten 60 ms Opus frames at 24 kHz, tts stop) three frames after the
//! ten-frame utterance ends, or on `listen stop` in manual mode. The URL path picks a
//! misbehaviour, so each of the bench's error kinds can be provoked on purpose.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::{Bytes, Message};

/// Frames in the test utterance (600 ms).
const SPEECH_FRAMES: usize = 10;

/// One upgrade request as the fake saw it.
struct Upgrade {
    path: String,
    device_id_header: Option<String>,
    device_id_in_query: bool,
    protocol_version: Option<String>,
    authorization: Option<String>,
}

/// What the fake saw.
#[derive(Default)]
struct Seen {
    upgrades: Vec<Upgrade>,
    /// Device-Id headers of OTA requests.
    ota: Vec<String>,
}

struct Fake {
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

impl Fake {
    fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = Arc::clone(&s);
                thread::spawn(move || serve(stream, port, s));
            }
        });
        Fake { port, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }
}

fn header(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// One connection: the OTA endpoint for `POST /ota`, else a WebSocket device.
fn serve(stream: TcpStream, port: u16, seen: Arc<Mutex<Seen>>) {
    let mut peek = [0u8; 8];
    if matches!(stream.peek(&mut peek), Ok(8)) && &peek == b"POST /ot" {
        return serve_ota(stream, port, &seen);
    }
    let mut path = String::new();
    let mut version = 1u8;
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let pv = header(req, "protocol-version");
        version = pv.as_deref().and_then(|v| v.parse().ok()).unwrap_or(1);
        seen.lock().unwrap().upgrades.push(Upgrade {
            path: path.clone(),
            device_id_header: header(req, "device-id"),
            device_id_in_query: query.contains("device-id=02%3A00%3A"),
            protocol_version: pv,
            authorization: header(req, "authorization"),
        });
        if path == "/refuse" {
            return Err(tungstenite::http::Response::builder()
                .status(503)
                .body(Some("full".into()))
                .unwrap());
        }
        Ok(resp)
    };
    stream.set_nodelay(true).unwrap();
    let Ok(mut ws) = tungstenite::accept_hdr(stream.try_clone().unwrap(), callback) else {
        return;
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let reply = reply_frames();
    let mut frames = 0usize;
    let mut manual = false;
    loop {
        let msg = match ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        match msg {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                match (v["type"].as_str(), v["state"].as_str()) {
                    (Some("hello"), _) => {
                        if let Some(n) = v["version"].as_u64() {
                            if ws_query_mode(&seen) {
                                version = n as u8;
                            }
                        }
                        send(
                            &mut ws,
                            r#"{"type":"hello","transport":"websocket","session_id":"fake-1","audio_params":{"format":"opus","sample_rate":24000,"channels":1,"frame_duration":60}}"#,
                        );
                        send(
                            &mut ws,
                            r#"{"type":"mcp","payload":{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}}"#,
                        );
                    }
                    (Some("listen"), Some("start")) => {
                        frames = 0;
                        manual = v["mode"] == "manual";
                        if path == "/alert" {
                            send(
                                &mut ws,
                                r#"{"type":"alert","status":"busy","message":"m","emotion":"sad"}"#,
                            );
                        }
                    }
                    (Some("listen"), Some("stop"))
                        if manual && respond(&mut ws, &path, version, &reply).is_err() =>
                    {
                        return
                    }
                    _ => {}
                }
            }
            Message::Binary(_) => {
                frames += 1;
                let trigger = if path == "/early" {
                    5
                } else {
                    SPEECH_FRAMES + 3
                };
                if !manual
                    && frames == trigger
                    && path != "/silent"
                    && respond(&mut ws, &path, version, &reply).is_err()
                {
                    return;
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

/// Query-mode upgrades carry no Protocol-Version header: the hello's version counts.
fn ws_query_mode(seen: &Arc<Mutex<Seen>>) -> bool {
    seen.lock()
        .unwrap()
        .upgrades
        .last()
        .is_some_and(|u| u.device_id_header.is_none())
}

type Ws = tungstenite::WebSocket<TcpStream>;

fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).unwrap();
}

fn frame(version: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::new();
    match version {
        2 => {
            out.extend_from_slice(&[0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        }
        3 => {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        _ => {}
    }
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Ten 60 ms Opus packets at 24 kHz (a tone).
fn reply_frames() -> Vec<Vec<u8>> {
    let mut enc =
        opus::Encoder::new(24000, opus::Channels::Mono, opus::Application::Audio).unwrap();
    (0..10)
        .map(|k| {
            let pcm: Vec<i16> = (0..1440)
                .map(|i| (((k * 1440 + i) as f32 * 0.06).sin() * 6000.0) as i16)
                .collect();
            enc.encode_vec(&pcm, 1500).unwrap()
        })
        .collect()
}

/// The reply: stt, tts start, llm, sentence_start, paced audio (3 frames lead), tts stop.
fn respond(ws: &mut Ws, path: &str, version: u8, reply: &[Vec<u8>]) -> tungstenite::Result<()> {
    let audio = |ws: &mut Ws, p: &[u8]| {
        let f = if path == "/badheader" {
            // A v3 header where none was negotiated (or a wrong size for v2/v3).
            frame(if version == 3 { 1 } else { 3 }, p)
        } else {
            frame(version, p)
        };
        ws.send(Message::Binary(f))
    };
    ws.send(Message::text(r#"{"type":"stt","text":"hello bench"}"#))?;
    if path == "/drop" {
        return Err(tungstenite::Error::ConnectionClosed);
    }
    if path == "/before" {
        audio(ws, &reply[0])?;
    }
    ws.send(Message::text(r#"{"type":"tts","state":"start"}"#))?;
    ws.send(Message::text(
        r#"{"type":"llm","emotion":"happy","text":"🙂"}"#,
    ))?;
    ws.send(Message::text(
        r#"{"type":"tts","state":"sentence_start","text":"Hi there."}"#,
    ))?;
    for (i, p) in reply.iter().enumerate() {
        if i >= 3 {
            thread::sleep(Duration::from_millis(60));
        }
        audio(ws, p)?;
    }
    thread::sleep(Duration::from_millis(100));
    ws.send(Message::text(r#"{"type":"tts","state":"stop"}"#))?;
    if path == "/after" {
        audio(ws, &reply[0])?;
    }
    if path == "/goodbye" {
        // A draining server: goodbye, then a clean close (1001) while the device thinks.
        ws.send(Message::text(r#"{"type":"goodbye"}"#))?;
        ws.close(Some(tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Away,
            reason: "server shutting down".into(),
        }))?;
        while ws.read().is_ok() {}
        return Err(tungstenite::Error::ConnectionClosed);
    }
    Ok(())
}

fn serve_ota(mut stream: TcpStream, port: u16, seen: &Arc<Mutex<Seen>>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                let device = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Device-Id: ").map(str::to_owned))
                    .unwrap_or_default();
                seen.lock().unwrap().ota.push(device);
                break;
            }
        }
    }
    let body = format!(
        r#"{{"server_time":{{"timestamp":0,"timezone_offset":0}},"firmware":{{"version":"1.9.0","url":""}},"websocket":{{"url":"ws://127.0.0.1:{port}/ok","token":"tok.123"}}}}"#
    );
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
}

/// A 600 ms 16 kHz mono tone (exactly ten frames).
fn utterance_wav() -> PathBuf {
    let path = std::env::temp_dir().join(format!("bench-utterance-{}.wav", std::process::id()));
    if !path.exists() {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let tmp = path
            .with_extension(format!("{:?}.tmp", thread::current().id()).replace(['(', ')'], ""));
        let mut w = hound::WavWriter::create(&tmp, spec).unwrap();
        for i in 0..SPEECH_FRAMES * 960 {
            w.write_sample(((i as f32 * 0.05).sin() * 9000.0) as i16)
                .unwrap();
        }
        w.finalize().unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

fn bench(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xiaozhi-bench"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bench-out-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs a small fleet against `url` and returns summary.json.
fn fleet(url: &str, name: &str, extra: &[&str]) -> (serde_json::Value, PathBuf, String) {
    let dir = out_dir(name);
    let wav = utterance_wav();
    let mut args = vec![
        "fleet",
        "--url",
        url,
        "--wav",
        wav.to_str().unwrap(),
        "--devices",
        "2",
        "--interactions",
        "2",
        "--ramp-s",
        "0.2",
        "--think-ms",
        "200",
        "--expected-reply-ms",
        "1200",
        "--timeout-s",
        "1.5",
        "--no-pin",
        "--out",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (_, text) = bench(&args);
    let summary = std::fs::read_to_string(dir.join("summary.json"))
        .unwrap_or_else(|e| panic!("no summary.json ({e}):\n{text}"));
    (serde_json::from_str(&summary).unwrap(), dir, text)
}

fn errors(summary: &serde_json::Value) -> Vec<(String, u64)> {
    summary["errors"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, n)| n.as_u64() != Some(0))
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect()
}

#[test]
fn probe_prints_a_timeline_and_saves_the_reply() {
    let fake = Fake::start();
    let reply = out_dir("probe").with_extension("wav");
    let wav = utterance_wav();
    let (ok, text) = bench(&[
        "probe",
        "--url",
        &fake.url("/ok"),
        "--wav",
        wav.to_str().unwrap(),
        "--save-reply",
        reply.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    eprintln!("{text}");
    for line in [
        "hello: session fake-1 downlink 24000 Hz 60 ms",
        "mcp initialize (answered)",
        "listen start (auto)",
        "last speech frame sent (10 frames)",
        "stt \"hello bench\"",
        "tts sentence_start \"Hi there.\"",
        "first audio frame",
        "reply: 10 audio frames",
        "tts stop",
        "errors: none",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    let r = hound::WavReader::open(&reply).unwrap();
    assert_eq!(r.spec().sample_rate, 24000);
    assert_eq!(r.len(), 10 * 1440);
    let _ = std::fs::remove_file(reply);
}

#[test]
fn fleet_counts_clean_interactions_and_writes_every_report() {
    let fake = Fake::start();
    let (s, dir, text) = fleet(&fake.url("/ok"), "ok", &["--protocol", "2"]);
    eprintln!("{text}");
    assert_eq!(s["interactions"]["total"], 4, "{text}");
    assert_eq!(s["interactions"]["ok"], 4, "{text}");
    assert_eq!(s["connects"]["ok"], 2);
    assert!(errors(&s).is_empty(), "{text}");
    for m in ["stt", "first_audio", "tts_stop"] {
        let p = &s["metrics_ms"][m];
        assert_eq!(p["count"], 4, "{m}");
        // The fake answers 3 frames (180 ms) after the utterance; never before it.
        assert!(p["p50"].as_f64().unwrap() >= 150.0, "{m}: {p}");
    }
    assert_eq!(s["metrics_ms"]["frame_jitter"]["count"], 4 * 9);
    for f in [
        "stt.hgrm",
        "stt.hlog",
        "first_audio.hgrm",
        "tts_stop.hlog",
        "connect_hello.hgrm",
        "frame_jitter.hlog",
        "latency.svg",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let seen = fake.seen.lock().unwrap();
    let devices: Vec<_> = seen
        .upgrades
        .iter()
        .map(|u| u.device_id_header.clone().unwrap())
        .collect();
    assert_eq!(devices.len(), 2);
    assert_ne!(devices[0], devices[1]);
    assert!(seen
        .upgrades
        .iter()
        .all(|u| u.protocol_version.as_deref() == Some("2")));
}

#[test]
fn fleet_uses_ota_and_query_identity_with_protocol_3() {
    let fake = Fake::start();
    let ota = format!("http://127.0.0.1:{}/ota/", fake.port);
    let (s, _, text) = fleet(
        &fake.url("/unused"),
        "ota",
        &["--ota-url", &ota, "--identity", "query", "--protocol", "3"],
    );
    assert_eq!(s["interactions"]["ok"], 4, "{text}");
    assert_eq!(s["metrics_ms"]["ota"]["count"], 2);
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.ota.len(), 2);
    for u in &seen.upgrades {
        assert_eq!(u.path, "/ok", "the OTA answer's URL is used");
        assert_eq!(u.device_id_header, None);
        assert!(u.device_id_in_query, "identity in the query string");
        assert_eq!(u.protocol_version, None);
        assert_eq!(
            u.authorization, None,
            "query mode sends no Authorization header"
        );
    }
}

#[test]
fn fleet_manual_mode_replies_on_listen_stop() {
    let fake = Fake::start();
    let (s, _, text) = fleet(&fake.url("/ok"), "manual", &["--mode", "manual"]);
    assert_eq!(s["interactions"]["ok"], 4, "{text}");
}

#[test]
fn fleet_classifies_misbehaving_servers() {
    let fake = Fake::start();
    for (path, kind) in [
        ("/early", "early_stt"),
        ("/before", "audio_before_tts_start"),
        ("/after", "audio_after_tts_stop"),
        ("/badheader", "bad_frame"),
        ("/alert", "alert"),
        ("/silent", "no_stt"),
        ("/refuse", "refused"),
        ("/drop", "disconnected"),
        ("/goodbye", "server_closed"),
    ] {
        let (s, _, text) = fleet(&fake.url(path), &path[1..], &[]);
        let e = errors(&s);
        assert_eq!(s["interactions"]["total"], 4, "{path}: {text}");
        assert!(
            e.iter().any(|(k, n)| k == kind && *n == 4),
            "{path}: expected {kind} in all 4 interactions, got {e:?}\n{text}"
        );
        if path == "/early" {
            assert_eq!(
                s["metrics_ms"].get("first_audio"),
                None,
                "no latency after early stt"
            );
        }
    }
}
