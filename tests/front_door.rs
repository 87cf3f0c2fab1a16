//! The WebSocket front door, sessions, HTTP endpoints and shutdown, over real loopback sockets
//! against the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use tungstenite::Message;

#[test]
fn hello_via_headers_is_answered_with_session_id_and_downlink_params() {
    let server = Server::start(&[]);
    let mut ws = connect(
        &server.ws_url("/xiaozhi/v1/"),
        &device_headers("aa:bb:cc:dd:ee:01", "1"),
    );
    let reply = hello(&mut ws, HELLO);
    assert_eq!(reply["transport"], "websocket");
    assert_eq!(reply["audio_params"]["format"], "opus");
    assert_eq!(reply["audio_params"]["sample_rate"], 24000);
    assert_eq!(reply["audio_params"]["frame_duration"], 60);
    let sid = reply["session_id"].as_str().expect("session_id");
    assert_eq!(sid.len(), 36, "uuid4 with dashes: {sid}");
}

#[test]
fn hello_via_query_parameters_on_any_path() {
    let server = Server::start(&[]);
    let url = server.ws_url("/some/other/path?device-id=aa%3Abb%3Acc%3Add%3Aee%3A02&client-id=web");
    let mut ws = connect(&url, &[]);
    let reply = hello(
        &mut ws,
        r#"{"type":"hello","version":1,"transport":"websocket"}"#,
    );
    assert!(reply["session_id"].is_string());
}

#[test]
fn hello_with_camel_case_audio_params_or_none_is_accepted() {
    let server = Server::start(&[]);
    let headers = device_headers("aa:bb:cc:dd:ee:03", "1");
    let mut ws = connect(&server.ws_url("/"), &headers);
    hello(
        &mut ws,
        r#"{"type":"hello","transport":"websocket","audioParams":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#,
    );
    let mut ws = connect(&server.ws_url("/"), &headers);
    hello(&mut ws, r#"{"type":"hello"}"#);
}

#[test]
fn missing_device_id_is_refused_with_the_reference_text_and_a_reason() {
    let server = Server::start(&[]);
    let mut ws = connect(&server.ws_url("/xiaozhi/v1/"), &[]);
    match ws.read().expect("read") {
        Message::Text(t) => assert!(t.as_str().contains("digital-human"), "{t}"),
        other => panic!("expected the reference's text, got {other:?}"),
    }
    let (code, reason) = expect_close(&mut ws);
    assert_eq!(code, 1008);
    assert!(reason.contains("missing device id"), "{reason}");
}

#[test]
fn auth_accepts_valid_tokens_and_refuses_bad_expired_and_missing_ones() {
    let server = Server::start_with_env(
        &[
            "server.auth.enabled=true",
            "server.auth.expire_seconds=3600",
            "server.auth.allowed_devices=[\"aa:bb:cc:dd:ee:99\"]",
            "server.auth.allowed_devices_skip_token=true",
        ],
        &[("XIAOZHI_AUTH_SECRETS", "new-secret,old-secret")],
    );
    // Both choices that weaken auth are warned about at start.
    let log = server.log_text();
    assert!(log.contains("server.auth.ota_tokens = \"any\""), "{log}");
    assert!(log.contains("allowed_devices_skip_token = true"), "{log}");
    let device = "aa:bb:cc:dd:ee:04";
    let client = "7b94d69a-9808-4c59-9c9b-704333b38aff";

    // A token handed out by our OTA endpoint.
    let ota = http_request(
        server.http_port,
        "POST",
        "/xiaozhi/ota/",
        &[
            ("Device-Id", device),
            ("Client-Id", client),
            ("Content-Type", "application/json"),
        ],
        r#"{"application":{"version":"1.0.0"}}"#,
    )
    .expect("ota");
    let body: serde_json::Value = serde_json::from_str(&ota.body).expect("ota json");
    let token = body["websocket"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    assert!(token.contains('.'), "{token}");
    let bearer = format!("Bearer {token}");
    let mut headers = device_headers(device, "1");
    headers.push(("Authorization", &bearer));
    let mut ws = connect(&server.ws_url("/xiaozhi/v1/"), &headers);
    hello(&mut ws, HELLO);

    // A token signed with the previous secret (rotation) is accepted too.
    let old = sign("old-secret", client, device, unix_now());
    let old_bearer = format!("Bearer {old}");
    let mut headers = device_headers(device, "1");
    headers.push(("Authorization", &old_bearer));
    let mut ws = connect(&server.ws_url("/xiaozhi/v1/"), &headers);
    hello(&mut ws, HELLO);

    // The same token via the query string (browser clients).
    let url = server.ws_url(&format!(
        "/xiaozhi/v1/?device-id={device}&client-id={client}&authorization=Bearer%20{token}"
    ));
    let mut ws = connect(&url, &[]);
    hello(&mut ws, HELLO);

    let refused = |auth: Option<String>, expect: &str| {
        let mut headers = device_headers(device, "1");
        let value;
        if let Some(a) = auth {
            value = a;
            headers.push(("Authorization", &value));
        }
        let mut ws = connect(&server.ws_url("/xiaozhi/v1/"), &headers);
        match ws.read().expect("read") {
            Message::Text(t) => assert_eq!(t.as_str(), "认证失败"),
            other => panic!("expected the reference's auth failure text, got {other:?}"),
        }
        let (code, reason) = expect_close(&mut ws);
        assert_eq!(code, 1008);
        assert!(reason.contains(expect), "{reason} should mention {expect}");
    };
    refused(
        Some(format!(
            "Bearer {}",
            sign("wrong", client, device, unix_now())
        )),
        "signature",
    );
    refused(
        Some(format!(
            "Bearer {}",
            sign("new-secret", client, device, unix_now() - 7200)
        )),
        "expired",
    );
    refused(None, "missing");

    // Allowed devices need no token (allowed_devices_skip_token).
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:dd:ee:99", "1"),
    );
    hello(&mut ws, HELLO);
    assert_eq!(server.metric("xiaozhi_auth_failures_total"), 3);
}

/// `POST /xiaozhi/ota/` for `device`; the token in the answer.
fn ota_token(server: &Server, device: &str) -> String {
    let ota = http_request(
        server.http_port,
        "POST",
        "/xiaozhi/ota/",
        &[
            ("Device-Id", device),
            ("Client-Id", "7b94d69a-9808-4c59-9c9b-704333b38aff"),
            ("Content-Type", "application/json"),
        ],
        r#"{"application":{"version":"1.0.0"}}"#,
    )
    .expect("ota");
    let body: serde_json::Value = serde_json::from_str(&ota.body).expect("ota json");
    body["websocket"]["token"]
        .as_str()
        .expect("token")
        .to_string()
}

#[test]
fn ota_issues_tokens_only_to_the_fleet_and_the_fleet_still_needs_them() {
    let fleet = "aa:bb:cc:dd:ee:f1";
    let sets = remote_provider_sets("http://127.0.0.1:9/v1");
    let mut sets: Vec<String> = sets;
    sets.extend(
        [
            "server.auth.enabled=true",
            "server.auth.secrets=[\"fleet-secret\"]",
            &format!("server.auth.allowed_devices=[\"{fleet}\"]"),
            "server.auth.ota_tokens=\"allowed_devices\"",
        ]
        .map(String::from),
    );
    let server = Server::start(&sets.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !server.log_text().contains("auth: "),
        "no warning: {}",
        server.log_text()
    );
    // A stranger asking OTA for a token gets none, so cannot connect as itself...
    assert_eq!(ota_token(&server, "victim"), "");
    // ...while a fleet device gets one, and it works.
    let token = ota_token(&server, fleet);
    assert!(token.contains('.'), "{token}");
    let bearer = format!("Bearer {token}");
    let mut headers = device_headers(fleet, "1");
    headers.push(("Authorization", &bearer));
    let mut ws = connect(&server.ws_url("/xiaozhi/v1/"), &headers);
    hello(&mut ws, HELLO);
    // Claiming the fleet's id without a token is refused (allowed_devices_skip_token = false).
    let mut claimed = connect(&server.ws_url("/xiaozhi/v1/"), &device_headers(fleet, "1"));
    match claimed.read().expect("read") {
        Message::Text(t) => assert_eq!(t.as_str(), "认证失败"),
        other => panic!("expected the auth failure text, got {other:?}"),
    }
    let (code, reason) = expect_close(&mut claimed);
    assert_eq!(code, 1008);
    assert!(reason.contains("missing"), "{reason}");
    assert_eq!(server.metric("xiaozhi_auth_failures_total"), 1);
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Issues a token with the server binary's own `token` command (same code path as OTA).
fn sign(secret: &str, client: &str, device: &str, ts: u64) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xiaozhi-tpc"))
        .args([
            "token",
            "--device-id",
            device,
            "--client-id",
            client,
            "--issued-at",
        ])
        .arg(ts.to_string())
        .env("XIAOZHI_AUTH_SECRETS", secret)
        .output()
        .expect("token command");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

#[test]
fn v2_and_v3_framed_audio_is_parsed_and_bad_frames_are_counted() {
    let server = Server::start(&[]);
    for (version, frame, bad) in [
        (
            "2",
            v2_frame(&[0xfc; 40], 1234),
            vec![0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        ),
        ("3", v3_frame(&[0xfc; 40]), vec![0, 0, 0, 200, 1, 2, 3]),
    ] {
        let mut ws = connect(
            &server.ws_url("/"),
            &device_headers("aa:bb:cc:dd:ee:05", version),
        );
        hello(
            &mut ws,
            &HELLO.replace("\"version\":1", &format!("\"version\":{version}")),
        );
        for _ in 0..3 {
            ws.send(Message::binary(frame.clone())).expect("send audio");
        }
        ws.send(Message::binary(bad)).expect("send bad frame");
        // The connection stays usable after a bad frame.
        ws.send(Message::text(r#"{"type":"ping"}"#)).expect("ping");
        assert_eq!(next_json(&mut ws)["type"], "pong");
        ws.close(None).expect("close");
        let _ = expect_close(&mut ws);
    }
    // Counters of ended sessions are folded in when each session's task finishes.
    wait_until(|| server.metric("xiaozhi_audio_frames_total") == 6);
    assert_eq!(server.metric("xiaozhi_bad_frames_total"), 2);
}

fn v2_frame(payload: &[u8], ts: u32) -> Vec<u8> {
    let mut f = vec![0, 2, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&ts.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn v3_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0, 0];
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached in 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn malformed_and_unknown_messages_get_errors_or_are_ignored_without_dropping_the_connection() {
    let server = Server::start(&[]);
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:dd:ee:06", "1"),
    );
    ws.send(Message::text("{this is not json")).expect("send");
    let err = next_json(&mut ws);
    assert_eq!(err["type"], "error");
    assert!(
        err["message"].as_str().unwrap_or("").contains("JSON"),
        "{err}"
    );
    ws.send(Message::text(r#"{"type":"listen","state":"jump"}"#))
        .expect("send");
    // Before hello every message other than hello is answered with an error.
    let err = next_json(&mut ws);
    assert_eq!(err["type"], "error");
    hello(&mut ws, HELLO);
    ws.send(Message::text(r#"{"type":"listen","state":"jump"}"#))
        .expect("send");
    let err = next_json(&mut ws);
    assert!(
        err["message"].as_str().unwrap_or("").contains("state"),
        "{err}"
    );
    ws.send(Message::text(r#"{"type":"teleport"}"#))
        .expect("send");
    ws.send(Message::text("42")).expect("send");
    let err = next_json(&mut ws);
    assert_eq!(
        err["type"], "error",
        "a JSON number is not a message: {err}"
    );
    ws.send(Message::text(r#"{"type":"ping"}"#)).expect("send");
    // The unknown type produced no reply: the next message is the pong.
    assert_eq!(next_json(&mut ws)["type"], "pong");
}

#[test]
fn a_device_repeating_unknown_messages_is_logged_three_times_then_summed_up_once() {
    let sets = remote_provider_sets("http://127.0.0.1:9/v1");
    let server = Server::start(&sets.iter().map(String::as_str).collect::<Vec<_>>());
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:dd:ee:07", "1"),
    );
    hello(&mut ws, HELLO);
    for _ in 0..50 {
        ws.send(Message::text(r#"{"type":"teleport\nforged line"}"#))
            .expect("send");
    }
    ws.send(Message::text(r#"{"type":"ping"}"#)).expect("send");
    assert_eq!(next_json(&mut ws)["type"], "pong");
    ws.close(None).expect("close");
    let summary = "unknown message types not logged";
    wait_until(|| server.log_text().contains(summary));
    let log = server.log_text();
    let ignored: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("unknown message type ignored"))
        .collect();
    assert_eq!(ignored.len(), 3, "{log}");
    assert!(ignored[2].contains("last=true"), "{log}");
    let summed: Vec<&str> = log.lines().filter(|l| l.contains(summary)).collect();
    assert_eq!(summed.len(), 1, "{log}");
    assert!(summed[0].contains("suppressed=47"), "{log}");
    // The device's newline stays escaped inside the line; it never starts one.
    assert!(!log.lines().any(|l| l.starts_with("forged line")), "{log}");
}

/// Sends one 10 000-byte binary frame under `limit`; expects close 1009 naming `what`, and
/// `counter` (not `other`) counted.
fn oversized_closes_with_1009(limit: &str, what: &str, counter: &str, other: &str) {
    let server = Server::start(&[limit]);
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:dd:ee:07", "1"),
    );
    hello(&mut ws, HELLO);
    ws.send(Message::binary(vec![0u8; 10_000])).expect("send");
    let (code, reason) = expect_close(&mut ws);
    assert_eq!(code, 1009);
    assert!(reason.contains(what), "{reason}");
    drop(ws);
    wait_until(|| server.metric(counter) == 1);
    assert_eq!(server.metric(other), 0);
}

#[test]
fn oversized_message_closes_with_1009_and_a_reason() {
    oversized_closes_with_1009(
        "server.max_message_bytes=4096",
        "message too big",
        "xiaozhi_oversized_messages_total",
        "xiaozhi_oversized_frames_total",
    );
}

#[test]
fn oversized_frame_closes_with_1009_and_its_own_counter() {
    oversized_closes_with_1009(
        "server.max_frame_bytes=2048",
        "frame too big",
        "xiaozhi_oversized_frames_total",
        "xiaozhi_oversized_messages_total",
    );
}

#[test]
fn no_voice_timeout_says_goodbye_and_closes() {
    let server = Server::start(&["session.no_voice_close_s=1"]);
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:dd:ee:08", "1"),
    );
    hello(&mut ws, HELLO);
    assert_eq!(next_json(&mut ws)["type"], "goodbye");
    let (code, _reason) = expect_close(&mut ws);
    assert_eq!(code, 1000);
}

#[test]
fn missing_hello_closes_with_policy_violation() {
    let server = Server::start(&["server.hello_timeout_ms=300"]);
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:dd:ee:09", "1"),
    );
    let (code, reason) = expect_close(&mut ws);
    assert_eq!(code, 1008);
    assert!(reason.contains("hello"), "{reason}");
    drop(ws);
    wait_until(|| server.metric("xiaozhi_hello_timeouts_total") == 1);
}

#[test]
fn a_client_that_never_reads_is_disconnected_and_forgotten() {
    never_reading_client_is_disconnected(&[]);
}

/// The same with the device sockets written through io_uring instead of the shard's socket
/// sweep (by default a write that finds the send buffer full waits for a sweep, still under
/// the write timeout).
#[test]
fn a_client_that_never_reads_is_disconnected_and_forgotten_with_sockets_read_per_arrival() {
    never_reading_client_is_disconnected(&["server.socket_sweep_ms=0"]);
}

fn never_reading_client_is_disconnected(extra: &[&str]) {
    // The pings must be read as fast as they come for the pongs to pile up (at the default
    // inbound rate the server reads them slowly and its writes never back up).
    let mut sets = vec![
        "server.write_timeout_ms=300",
        "server.inbound_messages_per_s=1e9",
        "server.inbound_messages_burst=1e9",
        "server.inbound_bytes_per_s=1e12",
        "server.inbound_bytes_burst=1e12",
    ];
    sets.extend_from_slice(extra);
    let server = Server::start(&sets);
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:dd:ee:0a", "1"),
    );
    hello(&mut ws, HELLO);
    set_timeout(&ws, Duration::from_secs(5));
    // Every ping makes the server write a pong we never read: its send buffer fills up.
    let mut sent = 0u64;
    let failed = loop {
        match ws.send(Message::text(r#"{"type":"ping"}"#)) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(
            sent < 5_000_000,
            "server never gave up on a client that does not read"
        );
    };
    eprintln!("client write failed after {sent} pings: {failed}");
    wait_until(|| server.metric("xiaozhi_slow_consumer_disconnects_total") == 1);
    let metrics = http_request(server.http_port, "GET", "/metrics", &[], "").expect("metrics");
    assert!(
        metrics.body.contains("xiaozhi_sessions{shard=\"0\"} 0"),
        "{}",
        metrics.body
    );
}

#[test]
fn full_shard_refuses_new_devices_with_503() {
    let server = Server::start(&[
        "server.max_connections_per_shard=1",
        "runtime.shard_cores=[0]",
    ]);
    let mut first = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:dd:ee:0b", "1"),
    );
    hello(&mut first, HELLO);
    let mut s = TcpStream::connect(("127.0.0.1", server.ws_port)).expect("connect");
    s.write_all(b"GET /xiaozhi/v1/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nDevice-Id: aa:bb:cc:dd:ee:0c\r\n\r\n").expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("server full"), "{resp}");
    assert_eq!(server.metric("xiaozhi_refused_full_total"), 1);
}

/// A keep-alive connection to the HTTP port that has been answered once (so it holds a place).
fn held_http_connection(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"ok\n") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    s
}

/// Everything the server sends on `s` until it closes.
fn read_until_closed(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn full_http_shard_refuses_requests_but_answers_probes_and_idle_sockets_take_no_place() {
    let mut sets = remote_provider_sets("http://127.0.0.1:9/v1");
    sets.extend(
        [
            "server.http.max_connections_per_shard=2",
            "server.http.head_timeout_ms=60000",
            // The held connections stay open however slowly this test runs.
            "server.http.keep_alive_idle_ms=60000",
            "runtime.shard_cores=[0]",
        ]
        .map(String::from),
    );
    let server = Server::start(&sets.iter().map(String::as_str).collect::<Vec<_>>());
    // Twenty sockets that never send a byte wait for their first head but take no place.
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", server.http_port)).expect("connect"))
        .collect();
    wait_until(|| server.metric("xiaozhi_http_connections_waiting{shard=\"0\"}") == 20);
    // Two keep-alive connections, each answered once (so both are open and counted), hold
    // both places.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| held_http_connection(server.http_port))
        .collect();
    let refused = http_request(server.http_port, "GET", "/xiaozhi/ota/", &[], "").expect("answer");
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(
        refused.body,
        "server busy: this shard holds its maximum of 2 HTTP connections; retry later\n"
    );
    assert!(refused.head.to_ascii_lowercase().contains("retry-after: 1"));
    // The balancer's probes are answered all the same: a full shard is busy, not down.
    let health = http_request(server.http_port, "GET", "/healthz", &[], "").expect("health");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = http_request(server.http_port, "GET", "/readyz/", &[], "").expect("ready");
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    // Closing one frees its place (the server notices the close asynchronously).
    drop(held);
    let mut refusals = 1;
    wait_until(|| {
        let ok = http_request(server.http_port, "GET", "/xiaozhi/ota/", &[], "")
            .is_ok_and(|r| r.status == 200);
        refusals += u64::from(!ok);
        ok
    });
    let metrics = http_request(server.http_port, "GET", "/metrics", &[], "").expect("metrics");
    assert_eq!(
        metric_value(&metrics.body, "xiaozhi_http_refused_full_total"),
        refusals
    );
    assert_eq!(
        metric_value(&metrics.body, "xiaozhi_http_health_over_budget_total"),
        2
    );
    assert_eq!(
        metric_value(
            &metrics.body,
            "xiaozhi_http_connections_waiting{shard=\"0\"}"
        ),
        20
    );
    drop(idle);
}

/// Reads `s` until the server closes it; panics if it sends anything or is still open after
/// a generous wait (the close is what is asserted, not when it comes).
fn expect_closed_without_data(mut s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("unexpected bytes: {}", String::from_utf8_lossy(&buf[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the idle connection was not closed: {e}"),
    }
}

#[test]
fn an_idle_kept_alive_connection_is_closed_and_frees_its_place_and_requests_are_capped() {
    let mut sets = remote_provider_sets("http://127.0.0.1:9/v1");
    sets.extend(
        [
            "server.http.max_connections_per_shard=1",
            "server.http.keep_alive_idle_ms=300",
            "server.http.max_requests_per_connection=3",
            "runtime.shard_cores=[0]",
        ]
        .map(String::from),
    );
    let server = Server::start(&sets.iter().map(String::as_str).collect::<Vec<_>>());
    // Answered once and kept alive, then silent: it holds the shard's only place until the
    // server closes it.
    let held = held_http_connection(server.http_port);
    expect_closed_without_data(held);
    // Its place is free: a request that needs one is served, not refused with 503.
    let ota = http_request(server.http_port, "GET", "/xiaozhi/ota/", &[], "").expect("ota");
    assert_eq!(ota.status, 200, "{}", ota.body);
    assert_eq!(
        server.metric("xiaozhi_http_keep_alive_idle_closed_total"),
        1
    );
    assert_eq!(server.metric("xiaozhi_http_refused_full_total"), 0);

    // Four pipelined requests on one connection: three are answered, the third with
    // `Connection: close`, and the connection ends there.
    let mut s = TcpStream::connect(("127.0.0.1", server.http_port)).expect("connect");
    s.write_all(&b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4))
        .expect("write");
    let answers = read_until_closed(s);
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 3, "{answers}");
    let last = answers.rsplit("HTTP/1.1 200 OK").next().unwrap_or("");
    assert!(
        last.to_ascii_lowercase().contains("connection: close"),
        "{answers}"
    );
    assert_eq!(server.metric("xiaozhi_http_request_cap_closed_total"), 1);
}

#[test]
fn a_connection_without_a_complete_head_in_time_gets_408_and_is_closed() {
    let mut sets = remote_provider_sets("http://127.0.0.1:9/v1");
    sets.extend(["server.http.head_timeout_ms=300", "runtime.shard_cores=[0]"].map(String::from));
    let server = Server::start(&sets.iter().map(String::as_str).collect::<Vec<_>>());
    let silent = TcpStream::connect(("127.0.0.1", server.http_port)).expect("connect");
    let mut slow = TcpStream::connect(("127.0.0.1", server.http_port)).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    for s in [silent, slow] {
        let answer = read_until_closed(s);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.ends_with("no complete request head in time\n"),
            "{answer}"
        );
    }
    let mut garbage = TcpStream::connect(("127.0.0.1", server.http_port)).expect("connect");
    garbage
        .write_all(b"\x16\x03\x01\x00\x05hello\r\n\r\n")
        .expect("write");
    let answer = read_until_closed(garbage);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(server.metric("xiaozhi_http_head_timeouts_total"), 2);
    assert_eq!(server.metric("xiaozhi_http_bad_heads_total"), 1);
}

#[test]
fn each_address_holds_at_most_its_connection_cap_and_trusted_balancers_are_exempt() {
    let mut sets = remote_provider_sets("http://127.0.0.1:9/v1");
    sets.extend(
        [
            "server.http.max_connections_per_address=3",
            "server.http.head_timeout_ms=60000",
            "server.trusted_proxies=[\"127.0.0.4\"]",
            "runtime.shard_cores=[0]",
        ]
        .map(String::from),
    );
    let server = Server::start(&sets.iter().map(String::as_str).collect::<Vec<_>>());
    let port = server.http_port;
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| tcp_from("127.0.0.2", port).expect("connect"))
        .collect();
    wait_until(|| server.metric("xiaozhi_http_connections_waiting{shard=\"0\"}") == 3);
    let answer = read_until_closed(tcp_from("127.0.0.2", port).expect("connect"));
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.ends_with("too many connections from 127.0.0.2; retry later\n"),
        "{answer}"
    );
    // Another address is served; so is a trusted balancer holding many more.
    let other = http_exchange(
        tcp_from("127.0.0.3", port).expect("connect"),
        port,
        "GET",
        "/xiaozhi/ota/",
        &[],
        b"",
        None,
    )
    .expect("other");
    assert_eq!(other.status, 200, "{}", other.body);
    let pool: Vec<TcpStream> = (0..10)
        .map(|_| tcp_from("127.0.0.4", port).expect("connect"))
        .collect();
    let balancer = http_exchange(
        tcp_from("127.0.0.4", port).expect("connect"),
        port,
        "GET",
        "/readyz",
        &[],
        b"",
        None,
    )
    .expect("balancer");
    assert_eq!(balancer.status, 200, "{}", balancer.body);
    assert_eq!(server.metric("xiaozhi_http_refused_per_address_total"), 1);
    // Closed connections give their address's places back (the one address left in the table
    // is 127.0.0.1's, the /metrics request asking).
    drop(idle);
    wait_until(|| server.metric("xiaozhi_http_connection_addresses{shard=\"0\"}") == 1);
    let again = http_exchange(
        tcp_from("127.0.0.2", port).expect("connect"),
        port,
        "GET",
        "/healthz",
        &[],
        b"",
        None,
    )
    .expect("again");
    assert_eq!(again.status, 200, "{}", again.body);
    drop(pool);
}

#[test]
fn plain_get_on_the_websocket_port_answers_200() {
    let server = Server::start(&[]);
    let resp = http_request(server.ws_port, "GET", "/xiaozhi/v1/", &[], "").expect("get");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, "Server is running\n");
}

#[test]
fn ota_answers_in_the_reference_shape_and_health_endpoints_answer() {
    let server = Server::start(&["server.public_ws_url=ws://lb.example:8080/xiaozhi/v1/"]);
    let resp = http_request(
        server.http_port,
        "POST",
        "/xiaozhi/ota/",
        &[("Device-Id", "aa:bb:cc:dd:ee:0d"), ("Client-Id", "c1"), ("Content-Type", "application/json")],
        r#"{"version":2,"application":{"name":"xiaozhi","version":"1.6.2"},"board":{"type":"bread-compact-wifi"}}"#,
    )
    .expect("ota");
    assert_eq!(resp.status, 200);
    assert!(resp
        .head
        .to_ascii_lowercase()
        .contains("access-control-allow-origin: *"));
    let v: serde_json::Value = serde_json::from_str(&resp.body).expect("json");
    assert_eq!(v["websocket"]["url"], "ws://lb.example:8080/xiaozhi/v1/");
    assert_eq!(v["websocket"]["token"], "");
    assert_eq!(v["firmware"]["version"], "1.6.2");
    assert_eq!(v["server_time"]["timezone_offset"], 480);
    assert!(v["server_time"]["timestamp"].as_u64().unwrap_or(0) > 1_700_000_000_000);

    let missing = http_request(server.http_port, "POST", "/xiaozhi/ota/", &[], "{}").expect("ota");
    assert_eq!(
        missing.body,
        r#"{"message":"request error.","success":false}"#
    );
    let get = http_request(server.http_port, "GET", "/xiaozhi/ota/", &[], "").expect("get");
    assert!(
        get.body.contains("ws://lb.example:8080/xiaozhi/v1/"),
        "{}",
        get.body
    );
    assert_eq!(
        http_request(server.http_port, "GET", "/healthz", &[], "")
            .expect("h")
            .status,
        200
    );
    assert_eq!(
        http_request(server.http_port, "GET", "/readyz", &[], "")
            .expect("r")
            .status,
        200
    );
    assert_eq!(
        http_request(server.http_port, "GET", "/nope", &[], "")
            .expect("n")
            .status,
        404
    );
}

#[test]
fn sigterm_says_goodbye_closes_cleanly_and_exits_zero() {
    let mut server = Server::start(&["server.drain.grace_ms=3000"]);
    let mut devices: Vec<_> = (0..3)
        .map(|i| {
            let mut ws = connect(
                &server.ws_url("/"),
                &device_headers(&format!("aa:bb:cc:dd:ef:0{i}"), "1"),
            );
            hello(&mut ws, HELLO);
            ws
        })
        .collect();
    server.terminate();
    for ws in &mut devices {
        assert_eq!(next_json(ws)["type"], "goodbye");
        let (code, reason) = expect_close(ws);
        assert_eq!(code, 1001);
        assert!(reason.contains("shutting down"), "{reason}");
    }
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        server.log_text()
    );
}

/// Opens a session for `device`, sends SIGTERM, and waits until `/readyz` answers 503.
fn connect_then_terminate_until_not_ready(server: &Server, device: &str) -> Ws {
    let mut ws = connect(&server.ws_url("/"), &device_headers(device, "1"));
    hello(&mut ws, HELLO);
    server.terminate();
    wait_until(|| {
        http_request(server.http_port, "GET", "/readyz", &[], "")
            .map(|r| r.status == 503)
            .unwrap_or(false)
    });
    ws
}

#[test]
fn readiness_turns_false_while_draining() {
    let mut server = Server::start(&["server.drain.grace_ms=3000"]);
    // A device that does not answer the close handshake keeps the drain going for a moment.
    let ws = connect_then_terminate_until_not_ready(&server, "aa:bb:cc:dd:ee:0e");
    drop(ws);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn invalid_config_fails_at_start_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xiaozhi-tpc"))
        .args(["serve", "--set", "server.prot=8000"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.prot") && err.contains("unknown field"),
        "{err}"
    );
}

#[test]
fn instance_connection_limit_is_split_into_per_shard_budgets() {
    let server = Server::start(&[
        "server.max_connections=3",
        "runtime.shard_cores=[0,1]",
        "runtime.inference_cores=[1]",
    ]);
    let metrics = http_request(server.http_port, "GET", "/metrics", &[], "").expect("metrics");
    for shard in 0..2 {
        // ceil(3 / 2 shards) = 2 per shard: no shard consults another.
        assert!(
            metrics.body.contains(&format!(
                "xiaozhi_connection_limit{{shard=\"{shard}\"}} 2\n"
            )),
            "{}",
            metrics.body
        );
    }
    // Full shards hand devices to a shard with room, so however the kernel spreads the six
    // connections, the instance admits exactly its 2 + 2 and refuses the rest.
    let (mut admitted, mut refused) = (Vec::new(), 0);
    for i in 0..6 {
        let url = format!("{}?device-id=aa:bb:cc:dd:f0:0{i}", server.ws_url("/"));
        match tungstenite::connect(url.as_str()) {
            Ok((mut ws, _)) => {
                set_timeout(&ws, Duration::from_secs(10));
                hello(&mut ws, HELLO);
                admitted.push(ws);
            }
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 503);
                let body =
                    String::from_utf8_lossy(resp.body().as_deref().unwrap_or(&[])).to_string();
                assert!(body.contains("server full"), "{body}");
                refused += 1;
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!((admitted.len(), refused), (4, 2));
    let metrics = http_request(server.http_port, "GET", "/metrics", &[], "").expect("metrics");
    assert_eq!(metric_value(&metrics.body, "xiaozhi_refused_full_total"), 2);
    for shard in 0..2 {
        let line = format!("xiaozhi_sessions{{shard=\"{shard}\"}} 2\n");
        assert!(metrics.body.contains(&line), "{}", metrics.body);
    }
    assert_eq!(
        per_shard_sum(&metrics.body, "xiaozhi_connections_handed_off_total"),
        per_shard_sum(&metrics.body, "xiaozhi_connections_adopted_total")
    );
}

/// Sum over shards of a per-shard metric (`name{shard="…"} value` lines).
fn per_shard_sum(metrics: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{");
    let values: Vec<u64> = metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!values.is_empty(), "metric {name} missing in:\n{metrics}");
    values.iter().sum()
}

/// Eight devices on two shards with four places each: every one is admitted, whatever the
/// kernel's SO_REUSEPORT spread, and those a full shard handed over work end to end (hello,
/// ping/pong) under the address their balancer forwarded. A server whose kernel split them 4/4
/// hands nothing over and proves nothing, so a fresh one is started (a 4/4 split has odds of
/// 70/256; ten in a row, about 2 in a million).
#[test]
fn a_full_shard_hands_devices_to_a_shard_with_room() {
    let mut sets = remote_provider_sets("http://127.0.0.1:9/v1");
    sets.extend(
        [
            "server.max_connections=8",
            "runtime.shard_cores=[0,1]",
            "runtime.inference_cores=[1]",
            "server.forwarded_header=\"x-forwarded-for\"",
            "server.trusted_proxies=[\"127.0.0.1\"]",
        ]
        .map(String::from),
    );
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    for _ in 0..10 {
        let server = Server::start(&sets);
        let addrs: Vec<String> = (1..=8).map(|i| format!("198.51.100.{i}")).collect();
        let _devices: Vec<Ws> = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let device = format!("aa:bb:cc:dd:f2:0{i}");
                let mut headers = device_headers(&device, "1");
                headers.push(("X-Forwarded-For", addr));
                let mut ws = connect(&server.ws_url("/xiaozhi/v1/"), &headers);
                assert!(hello(&mut ws, HELLO)["session_id"].is_string());
                ws.send(Message::text(r#"{"type":"ping"}"#)).expect("ping");
                assert_eq!(next_json(&mut ws)["type"], "pong");
                ws
            })
            .collect();
        let metrics = http_request(server.http_port, "GET", "/metrics", &[], "").expect("metrics");
        let handed_off = per_shard_sum(&metrics.body, "xiaozhi_connections_handed_off_total");
        assert_eq!(
            handed_off,
            per_shard_sum(&metrics.body, "xiaozhi_connections_adopted_total")
        );
        assert_eq!(metric_value(&metrics.body, "xiaozhi_refused_full_total"), 0);
        if handed_off == 0 {
            continue;
        }
        for shard in 0..2 {
            let line = format!("xiaozhi_sessions{{shard=\"{shard}\"}} 4\n");
            assert!(metrics.body.contains(&line), "{}", metrics.body);
        }
        // The access log names each device by its forwarded address, handed over or not (the
        // log thread writes a line a moment after the event: wait for all of them).
        let logged_now = || -> Vec<String> {
            server
                .log_text()
                .lines()
                .filter(|l| l.contains("device connected"))
                .filter_map(|l| l.split("addr=").nth(1)?.split_whitespace().next())
                .map(String::from)
                .collect()
        };
        wait_until(|| logged_now().len() >= addrs.len());
        let mut logged = logged_now();
        logged.sort();
        assert_eq!(logged, addrs);
        return;
    }
    panic!("ten servers in a row had the kernel split eight devices 4/4");
}

#[test]
fn drain_delay_keeps_accepting_while_not_ready_then_closes_everyone() {
    let mut server = Server::start(&["server.drain.delay_ms=1500", "server.drain.grace_ms=3000"]);
    let mut early = connect_then_terminate_until_not_ready(&server, "aa:bb:cc:dd:f1:00");
    // Not ready, but within the delay: a device the balancer still sends is served.
    let mut late = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:dd:f1:01", "1"),
    );
    hello(&mut late, HELLO);
    // After the delay both idle devices are told goodbye and closed with 1001.
    for ws in [&mut early, &mut late] {
        assert_eq!(next_json(ws)["type"], "goodbye");
        assert_eq!(expect_close(ws).0, 1001);
    }
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_ping_flood_from_one_device_does_not_keep_another_device_waiting() {
    ping_flood_does_not_keep_a_neighbour_waiting(&[]);
}

/// The same with the device sockets read as data arrives (io_uring) instead of in sweeps (by
/// default the flooder's socket is ready at every sweep, and the read budget still makes it
/// yield to its neighbour).
#[test]
fn a_ping_flood_from_one_device_does_not_keep_another_device_waiting_with_sockets_read_per_arrival()
{
    ping_flood_does_not_keep_a_neighbour_waiting(&["server.socket_sweep_ms=0"]);
}

fn ping_flood_does_not_keep_a_neighbour_waiting(extra: &[&str]) {
    let mut sets = remote_provider_sets("http://127.0.0.1:9/v1");
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets.push("runtime.shard_cores=[0]".into());
    // The read budget is what this test is about: lift the inbound rate (which would read the
    // flood at 100 messages a second) out of the way.
    sets.push("server.inbound_messages_per_s=1e9".into());
    sets.push("server.inbound_messages_burst=1e9".into());
    let server = Server::start(&sets.iter().map(String::as_str).collect::<Vec<_>>());
    let url = server.ws_url("/xiaozhi/v1/");
    let mut a = connect(&url, &device_headers("aa:bb:cc:dd:ee:a1", "1"));
    hello(&mut a, HELLO);
    let mut b = connect(&url, &device_headers("aa:bb:cc:dd:ee:b1", "1"));
    hello(&mut b, HELLO);
    // A writes 20,000 masked, empty pings in one go, straight onto its socket.
    const FLOOD: usize = 20_000;
    let (mut raw, flood) = ping_flood(&a, FLOOD);
    let flooder = std::thread::spawn(move || raw.write_all(&flood).expect("flood"));
    // B, on the same shard, is answered; and A's every ping is answered too, in order.
    b.send(Message::Ping(b"b".to_vec().into())).expect("ping");
    assert_eq!(pongs_until(&mut b, b"b"), 0);
    flooder.join().expect("flooder");
    a.send(Message::Ping(b"a".to_vec().into())).expect("ping");
    assert_eq!(pongs_until(&mut a, b"a"), FLOOD);
    assert!(server.metric("xiaozhi_read_budget_yields_total") > 0);
}
