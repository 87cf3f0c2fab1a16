//! One abusive device (or HTTP client) for the noisy-neighbour and soak scenarios (issue 12):
//! what a buggy firmware or an attacker does to a server that other devices share.
//!
//! - `text-flood`: `listen detect` turns with ~100-character texts, 20 ms apart (each new turn
//!   aborts the last; a server without cancellation runs every aborted turn's synthesis).
//! - `iot-flood`: one IoT descriptor, then `states` messages of ~58 KB with fresh keys, and now
//!   and then a descriptor of a fresh thing, as fast as the socket takes them.
//! - `frame-flood`: `listen start` (realtime), then the utterance's Opus frames in a cycle as
//!   fast as the socket takes them (each one is VAD work on the inference core).
//! - `metrics-hammer`: `--abuser-concurrency` clients fetching `/metrics` and `/histograms` in
//!   a loop, each on a fresh connection.
//!
//! The abuser runs on its own glommio executor (a thread of its own, so it does not delay the
//! good devices' timetable on the bench executors) until it is told to stop. A device reconnects
//! when the server closes it; with a duty cycle (`off`), it disconnects after `on` and comes
//! back after `off` (the soak's churn). It reads everything the server sends and answers MCP
//! requests as a device would, and it reports what the server did to it: close codes and
//! reasons, alerts, refusals, HTTP statuses.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use glommio::Placement;
use serde_json::json;
use tungstenite::Message;
use xiaozhi_protocol::BinaryProtocol;

use crate::audio::Uplink;
use crate::connect::{open, within, ConnectTimes, DeviceId, IdentityMode, Ws};
use crate::inbound::{parse_server_text, ServerEvent};
use crate::mcp;
use crate::ota::split_url;

/// What the abusive device does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AbuserKind {
    /// `listen detect` turns with ~100-character texts, 20 ms apart.
    TextFlood,
    /// IoT states with fresh keys (~58 KB each) and descriptors of fresh things.
    IotFlood,
    /// Opus frames in realtime mode as fast as the socket takes them.
    FrameFlood,
    /// Concurrent GET /metrics and /histograms on the HTTP port.
    MetricsHammer,
}

impl AbuserKind {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            AbuserKind::TextFlood => "text-flood",
            AbuserKind::IotFlood => "iot-flood",
            AbuserKind::FrameFlood => "frame-flood",
            AbuserKind::MetricsHammer => "metrics-hammer",
        }
    }

    /// Gap between two messages when not given: 20 ms for text turns (as the flood),
    /// none for the others (as fast as the socket takes them).
    pub fn default_interval(self) -> Duration {
        match self {
            AbuserKind::TextFlood => Duration::from_millis(20),
            _ => Duration::ZERO,
        }
    }
}

/// Everything one abuser needs.
#[derive(Clone)]
pub struct AbuserPlan {
    /// What it does.
    pub kind: AbuserKind,
    /// WebSocket URL (device kinds).
    pub ws_url: String,
    /// HTTP base URL, e.g. `http://127.0.0.1:8003` (`metrics-hammer`).
    pub http_url: Option<String>,
    /// Binary framing.
    pub protocol: BinaryProtocol,
    /// Its identity.
    pub id: DeviceId,
    /// The utterance's frames (`frame-flood`).
    pub uplink: Arc<Uplink>,
    /// Gap between messages (requests, for the hammer).
    pub interval: Duration,
    /// Concurrent HTTP clients (`metrics-hammer`).
    pub concurrency: usize,
    /// Duty cycle: abuse for `on`, then pause for `off` (None: abuse without pause).
    pub duty: Option<(Duration, Duration)>,
    /// CPU to pin the executor to.
    pub cpu: Option<usize>,
}

/// What the server did to the abuser (and what the abuser managed to do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AbuserOutcome {
    /// The kind.
    pub kind: String,
    /// How long it ran, s.
    pub ran_s: f64,
    /// Connections that reached the server's hello.
    pub connects_ok: u64,
    /// Failed connects by reason (refusals included).
    pub connect_failures: BTreeMap<String, u64>,
    /// Connections the server ended, by `code: reason` (`reset` without a close frame).
    pub closed_by_server: BTreeMap<String, u64>,
    /// Messages (or HTTP requests) sent.
    pub sent: u64,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Sends that did not complete within 1 s (the server stopped reading for a while).
    pub send_stalls: u64,
    /// `alert` messages received.
    pub alerts: u64,
    /// The first few distinct alert texts.
    pub alert_texts: Vec<String>,
    /// `tts start` received.
    pub tts_starts: u64,
    /// `tts stop` received.
    pub tts_stops: u64,
    /// Binary audio frames received.
    pub audio_frames: u64,
    /// HTTP responses by status line code (`metrics-hammer`).
    pub http_status: BTreeMap<String, u64>,
    /// HTTP requests that failed (connect, reset, timeout).
    pub http_errors: BTreeMap<String, u64>,
    /// HTTP response bytes read.
    pub http_bytes: u64,
}

impl AbuserOutcome {
    fn count(map: &mut BTreeMap<String, u64>, key: impl Into<String>) {
        *map.entry(key.into()).or_insert(0) += 1;
    }

    /// Adds `o`'s counts (and time) to these.
    pub fn add(&mut self, o: &AbuserOutcome) {
        self.ran_s += o.ran_s;
        self.connects_ok += o.connects_ok;
        self.sent += o.sent;
        self.sent_bytes += o.sent_bytes;
        self.send_stalls += o.send_stalls;
        self.alerts += o.alerts;
        self.tts_starts += o.tts_starts;
        self.tts_stops += o.tts_stops;
        self.audio_frames += o.audio_frames;
        self.http_bytes += o.http_bytes;
        for (a, b) in [
            (&mut self.connect_failures, &o.connect_failures),
            (&mut self.closed_by_server, &o.closed_by_server),
            (&mut self.http_status, &o.http_status),
            (&mut self.http_errors, &o.http_errors),
        ] {
            for (k, v) in b {
                *a.entry(k.clone()).or_insert(0) += v;
            }
        }
        for t in &o.alert_texts {
            if self.alert_texts.len() < 5 && !self.alert_texts.contains(t) {
                self.alert_texts.push(t.clone());
            }
        }
    }

    /// One line for the console and the tables.
    pub fn brief(&self) -> String {
        let join = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} ×{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = vec![format!(
            "sent {} ({:.1} MB)",
            self.sent,
            self.sent_bytes as f64 / 1e6
        )];
        if self.kind == AbuserKind::MetricsHammer.name() {
            parts.push(format!("HTTP {}", join(&self.http_status)));
            if !self.http_errors.is_empty() {
                parts.push(format!("failed {}", join(&self.http_errors)));
            }
        } else {
            parts.push(format!("connects {}", self.connects_ok));
            if !self.closed_by_server.is_empty() {
                parts.push(format!("closed {}", join(&self.closed_by_server)));
            }
            if !self.connect_failures.is_empty() {
                parts.push(format!("connect failed {}", join(&self.connect_failures)));
            }
            parts.push(format!("alerts {}", self.alerts));
            if self.tts_starts > 0 || self.audio_frames > 0 {
                parts.push(format!(
                    "tts start/stop {}/{}, audio frames {}",
                    self.tts_starts, self.tts_stops, self.audio_frames
                ));
            }
        }
        if self.send_stalls > 0 {
            parts.push(format!("send stalls {}", self.send_stalls));
        }
        parts.join("; ")
    }
}

/// A running abuser: stop it to get its outcome.
pub struct Abuser {
    stop: Arc<AtomicBool>,
    outcome: flume::Receiver<AbuserOutcome>,
    _executor: glommio::ExecutorJoinHandle<()>,
    kind: AbuserKind,
}

impl Abuser {
    /// Starts `plan` on an executor of its own.
    pub fn start(plan: AbuserPlan) -> Result<Abuser, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let kind = plan.kind;
        let (tx, outcome) = flume::bounded(1);
        let placement = plan.cpu.map_or(Placement::Unbound, Placement::Fixed);
        let name = format!("abuser-{}", plan.kind.name());
        let handle = crate::executor::spawn(placement, &name, move || async move {
            let _ = tx.send(run(plan, flag).await);
        })
        .map_err(|e| format!("starting the abuser's executor: {e}"))?;
        Ok(Abuser {
            stop,
            outcome,
            _executor: handle,
            kind,
        })
    }

    /// Stops the abuser and returns what happened to it. An abuser that does not stop within
    /// 15 s is left behind (its thread ends with the process) and reported as such: a report
    /// must not hang on it. (In a 30-minute soak a text-flood abuser's executor stopped making
    /// progress after its second duty cycle; the cause is not confirmed. A candidate is glommio
    /// 0.9 parking with runnable tasks and no timer, see `shards::threads`: bench executors
    /// now tick every 50 ms, which bounds such a sleep.)
    pub fn stop(self) -> Result<AbuserOutcome, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.outcome.recv_timeout(Duration::from_secs(15)) {
            // The executor ends on its own; its teardown is not waited for.
            Ok(o) => Ok(o),
            Err(_) => Ok(AbuserOutcome {
                kind: format!(
                    "{} (did not stop within 15 s; counts lost)",
                    self.kind.name()
                ),
                ..AbuserOutcome::default()
            }),
        }
    }
}

async fn run(plan: AbuserPlan, stop: Arc<AtomicBool>) -> AbuserOutcome {
    let begin = Instant::now();
    let mut out = AbuserOutcome {
        kind: plan.kind.name().to_owned(),
        ..AbuserOutcome::default()
    };
    if plan.kind == AbuserKind::MetricsHammer {
        let tasks: Vec<_> = (0..plan.concurrency.max(1))
            .map(|i| {
                let (plan, stop) = (plan.clone(), Arc::clone(&stop));
                glommio::spawn_local(async move { hammer(&plan, &stop, i).await })
            })
            .collect();
        for t in tasks {
            let o = t.await;
            out.add(&o);
        }
    } else {
        device_loop(&plan, &stop, &mut out).await;
    }
    out.ran_s = begin.elapsed().as_secs_f64();
    out
}

async fn sleep_for(d: Duration, stop: &AtomicBool) {
    // Short naps so a stop is noticed within 50 ms.
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            break;
        }
        glommio::timer::sleep((until - now).min(Duration::from_millis(50))).await;
    }
}

/// Connect, abuse until closed, stopped or the duty cycle's `on` ends; again.
async fn device_loop(plan: &AbuserPlan, stop: &AtomicBool, out: &mut AbuserOutcome) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut times = ConnectTimes::default();
        let chan = open(
            &plan.ws_url,
            &plan.id,
            IdentityMode::Headers,
            plan.protocol,
            None,
            &mut times,
        )
        .await;
        let chan = match chan {
            Ok(c) => c,
            Err((kind, why)) => {
                AbuserOutcome::count(&mut out.connect_failures, format!("{}: {why}", kind.name()));
                sleep_for(Duration::from_millis(500), stop).await;
                continue;
            }
        };
        out.connects_ok += 1;
        let mut d = Abusive {
            ws: chan.ws,
            session_id: chan.session_id,
            out,
            closed: false,
        };
        let until = plan.duty.map(|(on, _)| Instant::now() + on);
        d.abuse(plan, stop, until, &mut seq).await;
        let closed = d.closed;
        if !closed {
            let mut ws = d.ws;
            let _ = within(Duration::from_secs(1), async { ws.close(None).await }).await;
        }
        match plan.duty {
            Some((_, off)) if !closed => sleep_for(off, stop).await,
            // Closed by the server: come back soon, as a buggy firmware would.
            _ => sleep_for(Duration::from_millis(200), stop).await,
        }
    }
}

/// A ~100-character text turn; `n` makes each one distinct.
fn turn_text(n: u64) -> String {
    format!("turn {n} the quick brown fox jumps over the lazy dog while the old cat sleeps on the warm mat by the door")
}

/// An IoT states message of ~58 KB: 30 fresh keys of 1800 bytes on one thing.
fn iot_states(n: u64) -> String {
    let value = "x".repeat(1800);
    let state: serde_json::Map<String, serde_json::Value> = (0..30)
        .map(|i| (format!("k{n}_{i}"), json!(value)))
        .collect();
    json!({"type":"iot","states":[{"name":"Speaker","state":state}]}).to_string()
}

/// An IoT descriptor of thing `name` with one property and one method.
fn iot_descriptor(name: &str) -> String {
    json!({"type":"iot","update":true,"descriptors":[{"name":name,"description":"speaker",
        "properties":{"volume":{"description":"volume","type":"number"}},
        "methods":{"SetVolume":{"description":"set the volume","parameters":{"volume":
        {"description":"0 to 100","type":"number"}}}}}]})
    .to_string()
}

struct Abusive<'a> {
    ws: Ws,
    session_id: String,
    out: &'a mut AbuserOutcome,
    closed: bool,
}

impl Abusive<'_> {
    async fn abuse(
        &mut self,
        plan: &AbuserPlan,
        stop: &AtomicBool,
        until: Option<Instant>,
        seq: &mut u64,
    ) {
        let sid = self.session_id.clone();
        // What opens the abuse: a thing to flood, or listening for the frames.
        let opening = match plan.kind {
            AbuserKind::IotFlood => Some(iot_descriptor("Speaker")),
            AbuserKind::FrameFlood => Some(
                json!({"session_id":sid,"type":"listen","state":"start","mode":"realtime"})
                    .to_string(),
            ),
            _ => None,
        };
        if let Some(text) = opening {
            if !self.send(Message::text(text)).await {
                return;
            }
        }
        let mut next = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) || until.is_some_and(|u| Instant::now() >= u) {
                return;
            }
            // Read what is there (without waiting) so the server's replies do not back up.
            if !self.drain_until(next).await {
                return;
            }
            *seq += 1;
            let n = *seq;
            let msg = match plan.kind {
                AbuserKind::TextFlood => Message::text(
                    json!({"session_id":sid,"type":"listen","state":"detect","text":turn_text(n)})
                        .to_string(),
                ),
                AbuserKind::IotFlood if n.is_multiple_of(8) => {
                    Message::text(iot_descriptor(&format!("Thing{n}")))
                }
                AbuserKind::IotFlood => Message::text(iot_states(n)),
                AbuserKind::FrameFlood => {
                    let frames = &plan.uplink.speech;
                    Message::Binary(frames[(n as usize) % frames.len()].clone())
                }
                AbuserKind::MetricsHammer => return,
            };
            if !self.send(msg).await {
                return;
            }
            next = Instant::now() + plan.interval;
        }
    }

    /// Sends one message (at most 1 s); false when the connection is gone.
    async fn send(&mut self, msg: Message) -> bool {
        let len = msg.len() as u64;
        match within(Duration::from_secs(1), self.ws.send(msg)).await {
            None => {
                self.out.send_stalls += 1;
                true
            }
            Some(Ok(())) => {
                self.out.sent += 1;
                self.out.sent_bytes += len;
                true
            }
            Some(Err(_)) => {
                // The close frame, if the server sent one, is still to be read.
                self.read_close(Instant::now() + Duration::from_millis(200))
                    .await;
                if !self.closed {
                    self.closed = true;
                    AbuserOutcome::count(&mut self.out.closed_by_server, "reset");
                }
                false
            }
        }
    }

    /// After a failed send: reads until `until` for the close frame that explains it.
    async fn read_close(&mut self, until: Instant) {
        loop {
            let wait = until.saturating_duration_since(Instant::now());
            let got = futures_lite::future::or(async { Some(self.ws.next().await) }, async {
                glommio::timer::sleep(wait).await;
                None
            })
            .await;
            match got {
                Some(Some(Ok(Message::Close(frame)))) => {
                    self.closed = true;
                    AbuserOutcome::count(&mut self.out.closed_by_server, close_key(frame));
                    return;
                }
                Some(Some(Ok(_))) => {}
                _ => return,
            }
        }
    }

    /// Reads until `until` (at least one poll), answering MCP requests; false when the
    /// connection is gone.
    async fn drain_until(&mut self, until: Instant) -> bool {
        loop {
            let now = Instant::now();
            let wait = until.saturating_duration_since(now);
            let got = futures_lite::future::or(async { Some(self.ws.next().await) }, async {
                if !wait.is_zero() {
                    glommio::timer::sleep(wait).await;
                }
                None
            })
            .await;
            match got {
                None => return true,
                Some(None) | Some(Some(Err(_))) => {
                    if !self.closed {
                        self.closed = true;
                        AbuserOutcome::count(&mut self.out.closed_by_server, "reset");
                    }
                    return false;
                }
                Some(Some(Ok(Message::Close(frame)))) => {
                    self.closed = true;
                    AbuserOutcome::count(&mut self.out.closed_by_server, close_key(frame));
                    return false;
                }
                Some(Some(Ok(Message::Binary(_)))) => self.out.audio_frames += 1,
                Some(Some(Ok(Message::Text(t)))) => match parse_server_text(t.as_str()) {
                    Some(ServerEvent::Alert(a)) => {
                        self.out.alerts += 1;
                        if self.out.alert_texts.len() < 5 && !self.out.alert_texts.contains(&a) {
                            self.out.alert_texts.push(a);
                        }
                    }
                    Some(ServerEvent::TtsStart) => self.out.tts_starts += 1,
                    Some(ServerEvent::TtsStop) => self.out.tts_stops += 1,
                    Some(ServerEvent::Mcp(payload)) => {
                        if let Some(reply) = mcp::reply(&payload) {
                            let msg = json!({"session_id": self.session_id, "type": "mcp", "payload": reply});
                            if !self.send(Message::text(msg.to_string())).await {
                                return false;
                            }
                        }
                    }
                    _ => {}
                },
                Some(Some(Ok(_))) => {}
            }
        }
    }
}

/// `code: reason` of a close frame.
fn close_key(frame: Option<tungstenite::protocol::CloseFrame>) -> String {
    frame.map_or("no code".to_owned(), |f| {
        format!("{}: {}", u16::from(f.code), f.reason)
    })
}

/// One hammering HTTP client: GET /metrics, GET /histograms, again, each on a new connection.
async fn hammer(plan: &AbuserPlan, stop: &AtomicBool, i: usize) -> AbuserOutcome {
    let mut out = AbuserOutcome::default();
    let Some(base) = plan.http_url.as_deref() else {
        AbuserOutcome::count(&mut out.http_errors, "no --http-url");
        return out;
    };
    let Ok(u) = split_url(base, "http") else {
        AbuserOutcome::count(&mut out.http_errors, format!("bad --http-url {base}"));
        return out;
    };
    let paths = ["/metrics", "/histograms"];
    let mut k = i;
    while !stop.load(Ordering::Relaxed) {
        let path = paths[k % paths.len()];
        k += 1;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n\r\n",
            u.host, u.port
        );
        out.sent += 1;
        out.sent_bytes += req.len() as u64;
        match within(Duration::from_secs(10), get(&u.host, u.port, &req)).await {
            None => AbuserOutcome::count(&mut out.http_errors, "timeout 10 s"),
            Some(Err(e)) => AbuserOutcome::count(&mut out.http_errors, e),
            Some(Ok((status, bytes))) => {
                out.http_bytes += bytes;
                AbuserOutcome::count(&mut out.http_status, status);
            }
        }
        if !plan.interval.is_zero() {
            sleep_for(plan.interval, stop).await;
        }
    }
    out
}

/// One request on a fresh connection: (status code, response bytes).
async fn get(host: &str, port: u16, req: &str) -> Result<(String, u64), String> {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let mut s = glommio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect: {}", e.kind_name()))?;
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {:?}", e.kind()))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut head = Vec::new();
    let mut total = 0u64;
    loop {
        let n = s
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {:?}", e.kind()))?;
        if n == 0 {
            break;
        }
        if head.len() < 16 {
            head.extend_from_slice(&buf[..n.min(16)]);
        }
        total += n as u64;
    }
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .unwrap_or("no status")
        .to_owned();
    Ok((status, total))
}

trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for glommio::GlommioError<()> {
    fn kind_name(&self) -> String {
        match self {
            glommio::GlommioError::IoError(e) => format!("{:?}", e.kind()),
            e => e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xiaozhi_protocol::{parse_client_message, ClientMessage};

    #[test]
    fn flood_messages_are_valid_client_messages_within_the_default_size_limit() {
        let states = iot_states(7);
        assert!(states.len() < 65_536, "{} bytes", states.len());
        assert!(states.len() > 50_000);
        assert!(matches!(
            parse_client_message(&states),
            Ok(ClientMessage::Iot(_))
        ));
        assert!(matches!(
            parse_client_message(&iot_descriptor("Thing8")),
            Ok(ClientMessage::Iot(_))
        ));
        let text = turn_text(12);
        assert!((95..=110).contains(&text.chars().count()), "{}", text.len());
        assert_ne!(iot_states(1), iot_states(2), "fresh keys every time");
    }

    #[test]
    fn outcomes_add_up() {
        let mut a = AbuserOutcome::default();
        let mut b = AbuserOutcome {
            sent: 3,
            alerts: 1,
            alert_texts: vec!["warning: busy".into()],
            ..AbuserOutcome::default()
        };
        AbuserOutcome::count(&mut b.http_status, "200");
        a.add(&b);
        a.add(&b);
        assert_eq!((a.sent, a.alerts), (6, 2));
        assert_eq!(a.http_status["200"], 2);
        assert_eq!(a.alert_texts, ["warning: busy"]);
    }
}
