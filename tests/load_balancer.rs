//! A real HAProxy (installed by `scripts/setup.sh apt`) in front of two `xiaozhi-tpc`
//! instances on loopback: PROXY protocol v1 and v2, forwarded headers, trust only for listed
//! balancers, per-address limits keyed on the device's real address, OTA handing out the
//! balancer's URL, tokens valid on every instance, and a rolling restart under a bench fleet.
//!
//! Devices use distinct loopback source addresses (127.0.0.2, .3, …) while HAProxy reaches the
//! servers from 127.0.0.1, so the address a session reports says who told it: the TCP peer or
//! the balancer. The session's address is read where an operator reads it: the server's
//! `device connected … addr=…` and `ota request … addr=…` log lines and the 429 refusal text.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tungstenite::client::IntoClientRequest;
use xiaozhi_bench::mock_upstream::{self, MockSettings};

/// A running `haproxy -db` with a generated config, killed (and reaped) on drop.
struct Haproxy {
    child: Child,
    dir: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy with `body` after a common `global`/`defaults` section; `None` (after a
    /// loud message) when HAProxy is not installed.
    fn start(body: &str, listen_ports: &[u16]) -> Option<Haproxy> {
        if !Command::new("haproxy")
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            eprintln!(
                "\n*** SKIPPED: haproxy is not installed. `make test` installs it \
                 (scripts/setup.sh apt); this test needs it. ***\n"
            );
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "xiaozhi-haproxy-{}-{}",
            std::process::id(),
            listen_ports[0]
        ));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let cfg = format!(
            "global\n  maxconn 2000\n\ndefaults\n  timeout connect 2s\n  timeout client 60s\n  \
             timeout server 60s\n  timeout tunnel 60s\n  timeout check 1s\n\n{body}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        let mut h = Haproxy { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        for &port in listen_ports {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Ok(Some(status)) = h.child.try_wait() {
                    panic!("haproxy exited ({status}):\n{}", h.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "haproxy not listening:\n{}",
                    h.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Some(h)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens a WebSocket from source address `src`; `Err` carries the HTTP status and body of a
/// refused upgrade.
fn ws_from(
    src: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, (u16, String)> {
    let stream = tcp_from(src, port).map_err(|e| (0, e.to_string()))?;
    let mut req = format!("ws://127.0.0.1:{port}{path}")
        .into_client_request()
        .expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    match tungstenite::client::client(req, tungstenite::stream::MaybeTlsStream::Plain(stream)) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            Err((resp.status().as_u16(), body))
        }
        Err(e) => Err((0, e.to_string())),
    }
}

/// Connects from `src`, says hello, and returns the open session.
fn device_from(src: &str, port: u16, device: &str, extra: &[(&str, &str)]) -> Ws {
    let mut headers = device_headers(device, "1");
    headers.extend_from_slice(extra);
    let mut ws = ws_from(src, port, "/xiaozhi/v1/", &headers)
        .unwrap_or_else(|e| panic!("{device} from {src} via :{port} refused: {e:?}"));
    hello(&mut ws, HELLO);
    ws
}

/// Addresses the server logged for its sessions (`device connected … addr=…`).
fn logged_addrs(server: &Server) -> Vec<String> {
    addrs_in_log(server, "device connected")
}

/// The `addr=` of every log line containing `marker`, in order.
fn addrs_in_log(server: &Server, marker: &str) -> Vec<String> {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| l.split("addr=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// [`addrs_in_log`] once it holds at least `n` lines: the server's log lines are written by
/// its log thread a moment after the event, so a test waits for them (up to 10 s).
fn addrs_logged(server: &Server, marker: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let addrs = addrs_in_log(server, marker);
        if addrs.len() >= n || Instant::now() >= deadline {
            return addrs;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 10 s) until the server has logged a session from `addr`.
fn wait_logged_session_from(server: &Server, addr: &str) {
    wait_for(
        &format!("a session from {addr} in the log"),
        Duration::from_secs(10),
        || logged_addrs(server).iter().any(|a| a == addr),
    );
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A TCP backend section for both instances (WebSocket ports), health-checked on `/readyz`.
fn tcp_backend(name: &str, proxy: &str, a: &Server, b: &Server) -> String {
    format!(
        "backend {name}\n  mode tcp\n  balance roundrobin\n  option httpchk GET /readyz\n  \
         default-server inter 100ms fall 1 rise 2\n  \
         server a 127.0.0.1:{} {proxy} check port {}\n  \
         server b 127.0.0.1:{} {proxy} check port {}\n\n",
        a.ws_port, a.http_port, b.ws_port, b.http_port
    )
}

#[test]
fn proxy_protocol_v1_and_v2_give_each_session_the_device_address_and_only_from_trusted_balancers() {
    let sets = [
        "server.proxy_protocol=\"any\"",
        "server.trusted_proxies=[\"127.0.0.1/32\"]",
        // Keyed on the device's address: two devices behind one balancer have separate buckets.
        "server.rate_limit.per_address_per_s=0.01",
        "server.rate_limit.burst=2",
    ];
    let a = Server::start(&sets);
    let b = Server::start(&sets);
    let (v1, v2) = (free_port(), free_port());
    let cfg = format!(
        "frontend ws_v1\n  mode tcp\n  bind 127.0.0.1:{v1}\n  default_backend be_v1\n\n\
         frontend ws_v2\n  mode tcp\n  bind 127.0.0.1:{v2}\n  default_backend be_v2\n\n{}{}",
        tcp_backend("be_v1", "send-proxy", &a, &b),
        tcp_backend("be_v2", "send-proxy-v2", &a, &b),
    );
    let Some(lb) = Haproxy::start(&cfg, &[v1, v2]) else {
        return;
    };
    // Let the first health checks pass (rise 2 × 100 ms).
    std::thread::sleep(Duration::from_millis(400));

    // Two devices at different addresses, two connections each through each PROXY version:
    // round robin puts one of each on each instance (4 per instance, 2 per address).
    let mut open = Vec::new();
    for (i, src) in ["127.0.0.2", "127.0.0.3"].iter().enumerate() {
        for (j, port) in [v1, v1, v2, v2].iter().enumerate() {
            open.push(device_from(
                src,
                *port,
                &format!("aa:bb:cc:00:0{i}:0{j}"),
                &[],
            ));
        }
    }
    for server in [&a, &b] {
        let mut addrs = addrs_logged(server, "device connected", 4);
        addrs.sort();
        assert_eq!(
            addrs,
            ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"],
            "PROXY v1 and v2 sources; haproxy log:\n{}",
            lb.log()
        );
    }

    // A third connection from 127.0.0.2 to either instance exceeds its bucket (burst 2): the
    // refusal names the device's address, not the balancer's.
    let refused = ws_from(
        "127.0.0.2",
        v1,
        "/",
        &device_headers("aa:bb:cc:00:09:09", "1"),
    );
    let (status, body) = refused.expect_err("a third connection from .2 is refused");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("127.0.0.2"), "{body}");
    assert_eq!(
        a.metric("xiaozhi_refused_rate_limited_total")
            + b.metric("xiaozhi_refused_rate_limited_total"),
        1
    );

    // A peer that is not a trusted balancer cannot claim another address with a PROXY header:
    // the header is not read, so the request is malformed (400) and no session exists for 6.6.6.6.
    let mut s = tcp_from("127.0.0.4", a.ws_port).expect("connect");
    s.write_all(
        b"PROXY TCP4 6.6.6.6 127.0.0.1 1111 8000\r\nGET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The same untrusted peer without a header is a direct client, known by its TCP address.
    let _direct = device_from("127.0.0.4", a.ws_port, "aa:bb:cc:00:04:00", &[]);
    wait_logged_session_from(&a, "127.0.0.4");
    assert!(!a.log_text().contains("6.6.6.6"));

    // A trusted balancer's connection without a PROXY header is refused and counted.
    let missing = ws_from(
        "127.0.0.1",
        a.ws_port,
        "/",
        &device_headers("aa:bb:cc:00:05:00", "1"),
    );
    assert_eq!(missing.err().map(|e| e.0), Some(400));
    assert_eq!(a.metric("xiaozhi_proxy_header_errors_total"), 1);
    drop(open);
}

/// An OTA POST for `device` from loopback source `src` to HTTP port `port`.
fn ota_from(src: &str, port: u16, device: &str, extra: &[(&str, &str)]) -> HttpResponse {
    let mut headers = vec![
        ("Device-Id", device),
        ("Client-Id", "7b94d69a-9808-4c59-9c9b-704333b38aff"),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    let s = tcp_from(src, port).expect("connect");
    http_exchange(
        s,
        port,
        "POST",
        "/xiaozhi/ota/",
        &headers,
        br#"{"application":{"version":"1.6.0"}}"#,
        None,
    )
    .expect("ota")
}

/// The OTA answer of the HTTP port `port` (an instance or the balancer) for `device`.
fn ota(port: u16, device: &str) -> serde_json::Value {
    let resp = ota_from("127.0.0.1", port, device, &[]);
    assert_eq!(resp.status, 200, "{}", resp.body);
    serde_json::from_str(&resp.body).expect("ota json")
}

/// `Bearer <token>` from the OTA answer of HTTP port `port` for `device`.
fn bearer(port: u16, device: &str) -> String {
    let answer = ota(port, device);
    let token = answer["websocket"]["token"].as_str().expect("token");
    assert!(!token.is_empty(), "auth is on: {answer}");
    format!("Bearer {token}")
}

#[test]
fn ota_through_the_balancer_hands_out_its_url_and_any_instance_accepts_the_token() {
    let (lb_ws, lb_xrip, lb_http) = (free_port(), free_port(), free_port());
    let public = format!("ws://127.0.0.1:{lb_ws}/xiaozhi/v1/");
    let public_set = format!("server.public_ws_url=\"{public}\"");
    let sets = [
        "server.auth.enabled=true",
        "server.forwarded_header=\"x-forwarded-for\"",
        "server.trusted_proxies=[\"127.0.0.1\"]",
        public_set.as_str(),
    ];
    // Mid-rotation: a signs with the new key k2, b still with k1; both accept both.
    let a = Server::start_with_env(&sets, &[("XIAOZHI_AUTH_SECRETS", "k2,k1")]);
    let b = Server::start_with_env(&sets, &[("XIAOZHI_AUTH_SECRETS", "k1,k2")]);
    // c sits behind a frontend that sets X-Real-IP.
    let c = Server::start_with_env(
        &[
            "server.auth.enabled=true",
            "server.forwarded_header=\"x-real-ip\"",
            "server.trusted_proxies=[\"127.0.0.1\"]",
        ],
        &[("XIAOZHI_AUTH_SECRETS", "k1,k2")],
    );
    let http_backend = |name: &str, port: fn(&Server) -> u16| {
        format!(
            "backend {name}\n  mode http\n  balance roundrobin\n  option httpchk GET /readyz\n  \
             default-server inter 100ms fall 1 rise 2\n  \
             server a 127.0.0.1:{} check port {}\n  server b 127.0.0.1:{} check port {}\n\n",
            port(&a),
            a.http_port,
            port(&b),
            b.http_port
        )
    };
    let cfg = format!(
        "frontend ota\n  mode http\n  bind 127.0.0.1:{lb_http}\n  option forwardfor\n  default_backend be_ota\n\n\
         frontend ws_xff\n  mode http\n  bind 127.0.0.1:{lb_ws}\n  option forwardfor\n  default_backend be_ws\n\n\
         frontend ws_real_ip\n  mode http\n  bind 127.0.0.1:{lb_xrip}\n  \
         http-request set-header X-Real-IP %[src]\n  default_backend be_c\n\n\
         backend be_c\n  mode http\n  server c 127.0.0.1:{}\n\n{}{}",
        c.ws_port,
        http_backend("be_ota", |s| s.http_port),
        http_backend("be_ws", |s| s.ws_port),
    );
    let Some(lb) = Haproxy::start(&cfg, &[lb_ws, lb_xrip, lb_http]) else {
        return;
    };
    std::thread::sleep(Duration::from_millis(400));

    // OTA through the balancer (round robin: one answer from each instance) hands out the
    // balancer's public URL and a token; a device following it gets a session, whichever
    // instance answers the OTA and whichever takes the WebSocket.
    let mut open = Vec::new();
    for i in 0..4 {
        let device = format!("aa:bb:cc:01:00:0{i}");
        let answer = ota(lb_http, &device);
        assert_eq!(answer["websocket"]["url"], public.as_str(), "{answer}");
        let token = answer["websocket"]["token"].as_str().expect("token");
        assert!(!token.is_empty());
        let auth = format!("Bearer {token}");
        // The device forges both headers; haproxy appends the real address to X-Forwarded-For
        // (on a line of its own), and a and b do not read X-Real-IP.
        open.push(device_from(
            "127.0.0.2",
            lb_ws,
            &device,
            &[
                ("Authorization", &auth),
                ("X-Forwarded-For", "6.6.6.6"),
                ("X-Real-IP", "6.6.6.6"),
            ],
        ));
    }
    for server in [&a, &b] {
        assert_eq!(
            addrs_logged(server, "device connected", 2),
            ["127.0.0.2", "127.0.0.2"],
            "the right-most untrusted X-Forwarded-For hop; haproxy log:\n{}",
            lb.log()
        );
    }
    assert_eq!(a.metric("xiaozhi_auth_failures_total"), 0);
    assert_eq!(b.metric("xiaozhi_auth_failures_total"), 0);

    // X-Real-IP set by the balancer; c ignores the device's forged X-Forwarded-For.
    let token_c = bearer(c.http_port, "aa:bb:cc:01:00:10");
    let _r = device_from(
        "127.0.0.3",
        lb_xrip,
        "aa:bb:cc:01:00:10",
        &[("Authorization", &token_c), ("X-Forwarded-For", "6.6.6.6")],
    );
    assert_eq!(addrs_logged(&c, "device connected", 1), ["127.0.0.3"]);

    // Forwarded headers from a peer that is not a trusted balancer are ignored.
    let token_b = bearer(b.http_port, "aa:bb:cc:01:00:20");
    let _d = device_from(
        "127.0.0.4",
        a.ws_port,
        "aa:bb:cc:01:00:20",
        &[
            ("Authorization", &token_b),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
        ],
    );
    wait_logged_session_from(&a, "127.0.0.4");
    for server in [&a, &b, &c] {
        assert!(!server.log_text().contains("6.6.6.6"));
    }

    // Tokens cross instances directly too: b's (k1) on a, a's (k2) on b; an unknown key fails.
    let token_a = bearer(a.http_port, "aa:bb:cc:01:00:21");
    let _x = device_from(
        "127.0.0.5",
        b.ws_port,
        "aa:bb:cc:01:00:21",
        &[("Authorization", &token_a)],
    );
    let mut bad = ws_from(
        "127.0.0.5",
        a.ws_port,
        "/",
        &[
            ("Device-Id", "aa:bb:cc:01:00:22"),
            ("Client-Id", "7b94d69a-9808-4c59-9c9b-704333b38aff"),
            ("Authorization", &token_a),
        ],
    )
    .expect("upgrade (auth is checked after it, as the reference does)");
    let (code, _) = expect_close(&mut bad);
    assert_eq!(code, 1008, "a token for another device is refused");
    drop(open);
}

/// Counter `name` from `/metrics` of `server`, asked from loopback source `src` (not
/// 127.0.0.1, whose requests the harness already spent from its bucket).
fn counter_from(src: &str, server: &Server, name: &str) -> u64 {
    let s = tcp_from(src, server.http_port).expect("connect");
    let resp =
        http_exchange(s, server.http_port, "GET", "/metrics", &[], b"", None).expect("metrics");
    metric_value(&resp.body, name)
}

#[test]
fn ota_through_the_balancer_is_rate_limited_per_device_address_from_proxy_or_forwarded_for() {
    // HAProxy reaches the instances from 127.0.0.9 (`source`), the only trusted balancer; the
    // test's own requests from 127.0.0.1 are a direct client's. One shard, so one bucket per
    // address; a bucket of 3 that does not refill within the test.
    // Remote providers that are never called: no local model to load, a quick start.
    let mut common = remote_provider_sets("http://127.0.0.1:9/v1");
    common.extend(
        [
            "server.trusted_proxies=[\"127.0.0.9\"]",
            "server.http.rate_limit.per_address_per_s=0.01",
            "server.http.rate_limit.burst=3",
            "runtime.shard_cores=[0]",
        ]
        .map(String::from),
    );
    let start = |extra: &str| {
        let sets: Vec<&str> = common.iter().map(String::as_str).chain([extra]).collect();
        Server::start(&sets)
    };
    // a: the OTA backend sends PROXY v2 (`send-proxy-v2` on its server line).
    let a = start("server.http.proxy_protocol=\"v2\"");
    // b: layer 7 only, the device in X-Forwarded-For (`option forwardfor`).
    let b = start("server.forwarded_header=\"x-forwarded-for\"");
    let (lb_proxy, lb_xff) = (free_port(), free_port());
    // Health checks every 50 ms from the balancer's address, far above the bucket: they pass
    // only because the balancer itself is exempt. With send-proxy-v2 and no `port`, HAProxy
    // sends its checks a PROXY v2 LOCAL header.
    let cfg = format!(
        "frontend ota_proxy\n  mode http\n  bind 127.0.0.1:{lb_proxy}\n  default_backend be_a\n\n\
         frontend ota_xff\n  mode http\n  bind 127.0.0.1:{lb_xff}\n  option forwardfor\n  default_backend be_b\n\n\
         backend be_a\n  mode http\n  option httpchk GET /readyz\n  default-server inter 50ms fall 1 rise 1\n  \
         server a 127.0.0.1:{} send-proxy-v2 source 127.0.0.9 check\n\n\
         backend be_b\n  mode http\n  option httpchk GET /readyz\n  default-server inter 50ms fall 1 rise 1\n  \
         server b 127.0.0.1:{} source 127.0.0.9 check\n",
        a.http_port, b.http_port
    );
    let Some(lb) = Haproxy::start(&cfg, &[lb_proxy, lb_xff]) else {
        return;
    };
    std::thread::sleep(Duration::from_millis(400));

    for (port, server) in [(lb_proxy, &a), (lb_xff, &b)] {
        // Device A forges X-Forwarded-For; it is served its burst, then refused by its own
        // address: the balancer's is the same for every device, so only the real one can
        // tell A from B.
        for i in 0..3 {
            let r = ota_from(
                "127.0.0.2",
                port,
                "aa:bb:cc:03:00:01",
                &[("X-Forwarded-For", "6.6.6.6")],
            );
            assert_eq!(
                r.status,
                200,
                "request {i} of A via :{port}: {}\n{}",
                r.body,
                lb.log()
            );
        }
        let refused = ota_from("127.0.0.2", port, "aa:bb:cc:03:00:01", &[]);
        assert_eq!(refused.status, 429, "{}", refused.body);
        assert_eq!(
            refused.body,
            "too many requests from 127.0.0.2; retry later\n"
        );
        assert!(
            refused
                .head
                .to_ascii_lowercase()
                .contains("retry-after: 100"),
            "{}",
            refused.head
        );
        // Device B behind the same balancer still has its whole bucket.
        let r = ota_from("127.0.0.3", port, "aa:bb:cc:03:00:02", &[]);
        assert_eq!(r.status, 200, "B via :{port}: {}", r.body);
        assert_eq!(
            addrs_logged(server, "ota request", 5),
            [
                "127.0.0.2",
                "127.0.0.2",
                "127.0.0.2",
                "127.0.0.2",
                "127.0.0.3"
            ],
            "the OTA access log names the devices"
        );
    }

    // A peer that is not a trusted balancer is not believed. Its PROXY header is not read (the
    // request is malformed: 400)…
    let mut s = tcp_from("127.0.0.4", a.http_port).expect("connect");
    s.write_all(
        b"PROXY TCP4 6.6.6.6 127.0.0.1 1111 8003\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // …and its X-Forwarded-For is ignored: a different forged address each time, yet its own
    // address runs out after the burst.
    for i in 0..3 {
        let forged = format!("198.51.100.{i}");
        let r = ota_from(
            "127.0.0.4",
            b.http_port,
            "aa:bb:cc:03:00:04",
            &[("X-Forwarded-For", &forged)],
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = ota_from(
        "127.0.0.4",
        b.http_port,
        "aa:bb:cc:03:00:04",
        &[("X-Forwarded-For", "198.51.100.9")],
    );
    assert_eq!(
        (r.status, r.body.as_str()),
        (429, "too many requests from 127.0.0.4; retry later\n")
    );

    // The trusted balancer's address without a PROXY header is refused on a, and counted.
    let missing = http_exchange(
        tcp_from("127.0.0.9", a.http_port).expect("connect"),
        a.http_port,
        "GET",
        "/healthz",
        &[],
        b"",
        None,
    )
    .expect("answer");
    assert_eq!(missing.status, 400, "{}", missing.body);

    // Exactly the 429s above were counted: none of the balancer's health checks.
    assert_eq!(
        counter_from("127.0.0.20", &a, "xiaozhi_http_refused_rate_limited_total"),
        1
    );
    assert_eq!(
        counter_from("127.0.0.21", &b, "xiaozhi_http_refused_rate_limited_total"),
        2
    );
    assert_eq!(
        counter_from("127.0.0.22", &a, "xiaozhi_http_proxy_header_errors_total"),
        1
    );
    for server in [&a, &b] {
        assert!(!server.log_text().contains("6.6.6.6"));
        assert!(!server.log_text().contains("198.51.100."));
        assert!(!addrs_in_log(server, "ota request").contains(&"127.0.0.9".to_string()));
    }
}

#[test]
fn rolling_restart_behind_the_balancer_loses_no_interaction_but_those_the_drain_ended() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_xiaozhi-tpc")).with_file_name("xiaozhi-bench");
    if !bench.exists() {
        eprintln!(
            "\n*** SKIPPED: {} is not built; `cargo test --workspace` (what `make test` runs) \
             builds it. ***\n",
            bench.display()
        );
        return;
    }
    let mock = mock_upstream::serve(MockSettings {
        tts_audio: Duration::from_millis(400),
        ..MockSettings::default()
    })
    .expect("mock upstream");
    let (lb_ws, lb_http) = (free_port(), free_port());
    let public = format!("server.public_ws_url=\"ws://127.0.0.1:{lb_ws}/xiaozhi/v1/\"");
    let mut owned = remote_provider_sets(&mock.base_url());
    owned.extend([
        "server.proxy_protocol=\"v2\"".into(),
        "server.trusted_proxies=[\"127.0.0.1\"]".into(),
        "server.auth.enabled=true".into(),
        "server.drain.delay_ms=600".into(),
        "server.drain.grace_ms=8000".into(),
        public,
    ]);
    let sets: Vec<&str> = owned.iter().map(String::as_str).collect();
    let env = [("XIAOZHI_AUTH_SECRETS", "fleet-secret")];
    let mut a = Server::start_with_env(&sets, &env);
    let b = Server::start_with_env(&sets, &env);
    let cfg = format!(
        "frontend ws\n  mode tcp\n  bind 127.0.0.1:{lb_ws}\n  default_backend be_ws\n\n\
         frontend ota\n  mode http\n  bind 127.0.0.1:{lb_http}\n  option forwardfor\n  default_backend be_ota\n\n\
         {}backend be_ota\n  mode http\n  balance roundrobin\n  option httpchk GET /readyz\n  \
         default-server inter 100ms fall 1 rise 2\n  \
         server a 127.0.0.1:{} check\n  server b 127.0.0.1:{} check\n",
        tcp_backend("be_ws", "send-proxy-v2", &a, &b),
        a.http_port,
        b.http_port
    );
    let Some(lb) = Haproxy::start(&cfg, &[lb_ws, lb_http]) else {
        return;
    };
    std::thread::sleep(Duration::from_millis(400));

    let out = std::env::temp_dir().join(format!("xiaozhi-rolling-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let fleet = Command::new(&bench)
        .args(["fleet", "--ota-url"])
        .arg(format!("http://127.0.0.1:{lb_http}/xiaozhi/ota/"))
        .args([
            "--devices",
            "4",
            "--duration-s",
            "12",
            "--ramp-s",
            "1",
            "--think-ms",
            "500",
            "--expected-reply-ms",
            "2500",
            "--no-pin",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xiaozhi-bench");

    // Mid-run: drain a, wait for it to exit, start it again on the same ports.
    std::thread::sleep(Duration::from_secs(4));
    let before = a.metric("xiaozhi_sessions_accepted_total");
    assert!(before > 0, "round robin put devices on a");
    a.terminate();
    wait_for("a's /readyz to turn 503", Duration::from_secs(2), || {
        http_request(a.http_port, "GET", "/readyz", &[], "").is_ok_and(|r| r.status == 503)
    });
    let status = a.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "a exit {status}:\n{}", a.log_text());
    let drained: u64 = a
        .log_text()
        .lines()
        .filter(|l| l.contains("draining"))
        .filter_map(|l| l.split("sessions=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let (ws_port, http_port) = (a.ws_port, a.http_port);
    drop(a);
    let a2 = Server::start_on(ws_port, http_port, &sets, &env);

    let output = fleet.wait_with_output().expect("bench");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("summary.json")).expect("summary.json"),
    )
    .expect("summary json");
    let total = summary["interactions"]["total"].as_u64().unwrap_or(0);
    let ok = summary["interactions"]["ok"].as_u64().unwrap_or(0);
    let errored = summary["interactions"]["errored"].as_u64().unwrap_or(0);
    let errors = summary["errors"].as_object().cloned().unwrap_or_default();
    let server_closed = errors
        .get("server_closed")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    for (kind, n) in &errors {
        if kind != "server_closed" {
            assert_eq!(n.as_u64(), Some(0), "{kind} errors:\n{text}\n{}", lb.log());
        }
    }
    // 4 devices × ~3 interactions intended within 12 s (period ≈ 1.8 + 2.5 + 0.5 s).
    assert!(total >= 8, "the fleet ran ({total} interactions):\n{text}");
    assert_eq!(errored, server_closed, "{text}");
    assert!(
        server_closed <= drained,
        "{server_closed} interactions ended by a clean server close, but the drain closed only \
         {drained} sessions:\n{text}"
    );
    eprintln!(
        "rolling restart: {total} interactions, {ok} ok, {server_closed} ended by the drain \
         ({drained} sessions drained)"
    );

    // The restarted instance is back in rotation: two new devices through the balancer land
    // one on each instance.
    wait_for("a to be ready again", Duration::from_secs(5), || {
        http_request(a2.http_port, "GET", "/readyz", &[], "").is_ok_and(|r| r.status == 200)
    });
    std::thread::sleep(Duration::from_millis(400));
    let _devices: Vec<Ws> = (0..2)
        .map(|i| {
            let device = format!("aa:bb:cc:02:00:0{i}");
            let auth = bearer(lb_http, &device);
            device_from("127.0.0.2", lb_ws, &device, &[("Authorization", &auth)])
        })
        .collect();
    assert!(a2.metric("xiaozhi_sessions_accepted_total") >= 1);
    assert!(b.metric("xiaozhi_sessions_accepted_total") >= 1);
    let _ = std::fs::remove_dir_all(&out);
}

/// Waits (up to 10 s) until `/metrics` shows `series` at `want`.
fn wait_metric(server: &Server, series: &str, want: u64) {
    wait_for(
        &format!("{series} = {want}"),
        Duration::from_secs(10),
        || server.metric(series) >= want,
    );
    assert_eq!(server.metric(series), want, "{series}");
}

#[test]
fn mqtt_through_the_balancer_takes_the_device_address_from_proxy_v2_for_its_session_and_udp() {
    use xiaozhi_bench::mqtt_device::{self, MqttDevice};
    let (mqtt_port, lb_mqtt) = (free_port(), free_port());
    let sets = [
        "mqtt.enabled=true".to_string(),
        format!("mqtt.port={mqtt_port}"),
        "mqtt.udp_port_base=0".into(),
        "mqtt.udp_public_host=\"127.0.0.1\"".into(),
        format!("mqtt.public_endpoint=\"127.0.0.1:{lb_mqtt}\""),
        "mqtt.signature_keys=[\"lb-mqtt-key\"]".into(),
        "mqtt.ota_transport=\"mqtt\"".into(),
        "server.proxy_protocol=\"v2\"".into(),
        "server.trusted_proxies=[\"127.0.0.1/32\"]".into(),
    ];
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let server = Server::start(&refs);
    // The README's MQTT frontend and backend (one instance; checks every 100 ms, not 1 s).
    let cfg = format!(
        "frontend devices_mqtt\n  mode tcp\n  bind 127.0.0.1:{lb_mqtt}\n  timeout client 400s\n  \
         default_backend xiaozhi_mqtt\n\n\
         backend xiaozhi_mqtt\n  mode tcp\n  balance leastconn\n  timeout server 400s\n  \
         option httpchk GET /readyz\n  default-server inter 100ms fall 1 rise 2\n  \
         server a 127.0.0.1:{mqtt_port} send-proxy-v2 check port {}\n",
        server.http_port
    );
    let Some(lb) = Haproxy::start(&cfg, &[lb_mqtt]) else {
        return;
    };
    std::thread::sleep(Duration::from_millis(400));

    // OTA hands out the balancer's endpoint; the device reaches it from 127.0.0.5.
    let creds = mqtt_device::ota_credentials(
        &format!("127.0.0.1:{}", server.http_port),
        "aa:ee:00:00:00:01",
        "7b94d69a-9808-4c59-9c9b-704333b38aff",
    )
    .expect("OTA mqtt section");
    assert_eq!(creds.endpoint, format!("127.0.0.1:{lb_mqtt}"));
    let wait = Duration::from_secs(10);
    let stream = tcp_from("127.0.0.5", lb_mqtt).expect("connect to the balancer");
    let mut device = MqttDevice::over(stream, &creds, wait)
        .unwrap_or_else(|e| panic!("{e}; haproxy log:\n{}", lb.log()));
    let hello = device.hello(false, wait).expect("hello over the balancer");
    assert_eq!(hello["udp"]["server"], "127.0.0.1");
    // The session is the device's, as the PROXY header said, not the balancer's.
    assert_eq!(
        addrs_logged(&server, "MQTT device connected", 1),
        ["127.0.0.5"],
        "haproxy log:\n{}",
        lb.log()
    );

    // UDP goes straight to the instance, from the device's address: accepted.
    let silence = opus_frames(&vec![0i16; 960]).remove(0);
    for _ in 0..3 {
        device.send_audio(&silence).unwrap();
    }
    wait_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"accepted\"}",
        3,
    );
    // The same session's key and a later sequence, but from the balancer's address (the TCP
    // peer the server saw): not the device's, so dropped as forged.
    let hex = |s: &str| -> [u8; 16] {
        let v: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        v.try_into().expect("16 bytes")
    };
    let key = hex(hello["udp"]["key"].as_str().expect("key"));
    let nonce = hex(hello["udp"]["nonce"].as_str().expect("nonce"));
    let from_balancer = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    from_balancer
        .send_to(
            &mqtt_device::seal(&key, &nonce, 100, &silence),
            device.udp_server().expect("udp server"),
        )
        .expect("send");
    wait_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"forged_source\"}",
        1,
    );
    // …and it did not move the session's sequence: the device's next datagram is taken.
    device.send_audio(&silence).unwrap();
    wait_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"accepted\"}",
        4,
    );
    assert_eq!(
        server.metric("xiaozhi_transport_sessions_total{transport=\"mqtt\"}"),
        1
    );

    // An untrusted peer's PROXY header is not read: it claims 6.6.6.6, and gets no session
    // (the header is not MQTT, so the connection is closed without a CONNACK).
    let mut s = tcp_from("127.0.0.6", mqtt_port).expect("connect");
    let mut forged = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    forged.extend_from_slice(&[6, 6, 6, 6, 127, 0, 0, 1, 0x04, 0x57, 0x07, 0x5b]);
    s.write_all(&forged).expect("write");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(answer.is_empty(), "no CONNACK: {answer:?}");
    // A trusted balancer's connection without a PROXY header is refused and counted.
    let before = server.metric("xiaozhi_proxy_header_errors_total");
    let bare = tcp_from("127.0.0.1", mqtt_port).expect("connect");
    assert!(MqttDevice::over(bare, &creds, wait).is_err());
    wait_metric(&server, "xiaozhi_proxy_header_errors_total", before + 1);
    assert_eq!(
        server.metric("xiaozhi_mqtt_connects_total{result=\"accepted\"}"),
        1
    );
    assert!(!server.log_text().contains("6.6.6.6"));
    drop(device);
}
