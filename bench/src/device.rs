//! One simulated ESP32 device: connect (optionally through OTA), hello, then interactions on an
//! open-loop schedule, each observed and classified.
//!
//! An interaction: `listen start` (mode auto/manual/realtime), the utterance as 60 ms Opus frames
//! on an absolute timetable (frame i is due at start + i × 60 ms; a late executor catches up
//! rather than drifting), then
//! - auto: floor frames (room noise by default, see `audio.rs`) until `stt` or `tts start` (the
//!   server's VAD needs them to end the utterance), after which the mic is off, as the firmware
//!   stops capturing while it speaks;
//! - manual: `listen stop` right after the last speech frame, no floor frames;
//! - realtime: the mic never stops (floor frames through the reply and the think time), and
//!   `listen start` is sent only once per connection, as the firmware does (spec §7.3).
//!
//! Then the device collects `stt`, `llm`, `tts start/sentence_start/stop` and the reply audio
//! until `tts stop`, answers the server's MCP requests whenever they come, and idles through the
//! think time (still reading: audio arriving then is a violation) until the next interaction's
//! start (see `schedule.rs`). A dropped connection is reopened at the next interaction.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use tungstenite::{Bytes, Message};
use xiaozhi_protocol::{BinaryProtocol, TokenSigner};

use crate::audio::{Uplink, FRAME_MS};
use crate::connect::{close_kind, open, ConnectTimes, DeviceId, IdentityMode, HELLO_TIMEOUT};
use crate::inbound::{check_downlink, parse_server_text, ServerEvent};
use crate::outcome::{classify, End, ErrorKind, Observed, Verdict};
use crate::schedule::{Limit, Schedule};
use crate::{mcp, ota};

const FRAME: Duration = Duration::from_millis(FRAME_MS);

/// The `listen` mode the device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Server VAD ends the utterance; mic off while the device speaks.
    Auto,
    /// Push-to-talk: `listen stop` ends the utterance.
    Manual,
    /// Mic always on; server VAD ends utterances.
    Realtime,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Manual => "manual",
            Mode::Realtime => "realtime",
        }
    }
}

/// What every device of a run shares.
pub struct DeviceConfig {
    /// WebSocket URL (replaced by the OTA answer's when `ota_url` is set).
    pub ws_url: String,
    /// OTA endpoint to ask first, if any.
    pub ota_url: Option<String>,
    /// Headers or query string.
    pub identity: IdentityMode,
    /// Binary framing version.
    pub protocol: BinaryProtocol,
    /// Listening mode.
    pub mode: Mode,
    /// Gap between `tts stop` and the next `listen start`.
    pub think: Duration,
    /// Reply time the schedule allows for (see `schedule.rs`).
    pub expected_reply: Duration,
    /// How long to wait for `stt` after the last frame, and for progress during a reply.
    pub timeout: Duration,
    /// The prepared utterance.
    pub uplink: Arc<Uplink>,
    /// Signs device tokens when the server checks them (unless OTA hands one out).
    pub auth_key: Option<String>,
}

/// What a device reports to the collector.
#[derive(Debug)]
pub enum Report {
    /// A connect attempt (OTA if configured, then WebSocket + hello).
    Connect {
        /// When it finished.
        at: Instant,
        /// OTA request duration, if one was made and answered.
        ota: Option<Duration>,
        /// Connect → hello reply, or why it failed.
        result: Result<Duration, ErrorKind>,
    },
    /// A finished interaction.
    Interaction {
        /// When its record was closed.
        at: Instant,
        /// Errors and latencies.
        verdict: Verdict,
        /// Reply audio frames received.
        frames: u32,
        /// Largest uplink send delay against the frame schedule (`None` if never connected).
        send_lag: Option<Duration>,
        /// Reply frame jitter samples, µs.
        jitter_us: Vec<u64>,
    },
}

/// A human-readable record of one device's run (for `probe`).
#[derive(Debug, Default)]
pub struct Trace {
    /// Timestamped lines.
    pub lines: Vec<(Instant, String)>,
    /// Reply Opus payloads, in order.
    pub reply: Vec<Vec<u8>>,
    /// Downlink sample rate announced in the hello.
    pub sample_rate: u32,
    /// The last interaction's raw observations.
    pub observed: Option<Observed>,
}

/// Runs one device: connects at `connect_at`, then interactions until `limit`.
pub async fn run(
    cfg: &DeviceConfig,
    id: DeviceId,
    connect_at: Instant,
    limit: Limit,
    report: &dyn Fn(Report),
    trace: Option<&RefCell<Trace>>,
) {
    let speech_frames = u32::try_from(cfg.uplink.speech.len()).unwrap_or(u32::MAX);
    let schedule = Schedule::new(
        connect_at,
        speech_frames,
        FRAME,
        cfg.think,
        cfg.expected_reply,
    );
    let mut d = Device {
        cfg,
        id,
        report,
        trace,
        chan: None,
        mic: Mic::Off,
        listening: false,
        last_audio_at: None,
        send_lag: Duration::ZERO,
    };
    sleep_until(connect_at).await;
    let mut connect_error = d.connect().await.err();
    let mut previous_end = None;
    let mut pending: Option<Observed> = None;
    for k in 0.. {
        if !limit.includes(k, schedule.intended_start(k)) {
            break;
        }
        let start = schedule.actual_start(k, previous_end);
        d.idle_until(start, pending.as_mut()).await;
        if let Some(o) = pending.take() {
            d.emit(o);
        }
        if d.chan.is_none() {
            let kind = match connect_error.take() {
                Some(kind) => Some(kind),
                None => d.connect().await.err(),
            };
            if let Some(kind) = kind {
                let o = Observed {
                    end: End::NotConnected(kind),
                    ..Observed::new(schedule.intended_last_frame(k))
                };
                d.emit(o);
                previous_end = Some(Instant::now());
                continue;
            }
        }
        let o = d.interaction(schedule.intended_last_frame(k), start).await;
        previous_end = Some(o.tts_stop.unwrap_or_else(Instant::now));
        pending = Some(o);
    }
    if let Some(mut o) = pending.take() {
        // The last interaction gets the same think-time watch for late audio as the others.
        d.idle_until(Instant::now() + cfg.think, Some(&mut o)).await;
        d.emit(o);
    }
    if let Some(mut chan) = d.chan.take() {
        let _ = within_close(&mut chan.ws).await;
    }
}

async fn within_close(ws: &mut crate::connect::Ws) -> Option<()> {
    crate::connect::within(Duration::from_secs(1), async {
        let _ = ws.close(None).await;
    })
    .await
}

async fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        glommio::timer::sleep(t - now).await;
    }
}

/// The device's microphone: what to send next, and when.
enum Mic {
    Off,
    /// Speech frame `next` is due at `start + next × 60 ms`.
    Speech {
        start: Instant,
        next: usize,
    },
    /// Floor frame `next` (cycled) is due at `at`.
    Floor {
        at: Instant,
        next: usize,
    },
}

impl Mic {
    fn due(&self) -> Option<Instant> {
        match *self {
            Mic::Off => None,
            Mic::Speech { start, next } => Some(start + FRAME * next as u32),
            Mic::Floor { at, .. } => Some(at),
        }
    }
}

/// One thing that happened while the device waited.
enum Step {
    Server(ServerEvent, Instant),
    Audio(Bytes, Instant),
    BadText,
    SpeechDone(Instant),
    Deadline,
    Closed(ErrorKind, String),
}

/// Where an interaction is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Speaking,
    /// Utterance sent at this time; waiting for `stt` or `tts start`.
    AwaitingReply(Instant),
    /// Reply under way; waiting for `tts stop`.
    Replying,
}

struct Device<'a> {
    cfg: &'a DeviceConfig,
    id: DeviceId,
    report: &'a dyn Fn(Report),
    trace: Option<&'a RefCell<Trace>>,
    chan: Option<crate::connect::Channel>,
    mic: Mic,
    /// `listen start` sent on this connection (realtime sends it once).
    listening: bool,
    last_audio_at: Option<Instant>,
    /// Largest delay of an uplink frame against its due time in this interaction.
    send_lag: Duration,
}

impl Device<'_> {
    fn note(&self, at: Instant, line: impl FnOnce() -> String) {
        if let Some(t) = self.trace {
            t.borrow_mut().lines.push((at, line()));
        }
    }

    fn emit(&self, o: Observed) {
        let verdict = classify(&o);
        (self.report)(Report::Interaction {
            at: Instant::now(),
            verdict,
            frames: o.frames,
            send_lag: (!matches!(o.end, End::NotConnected(_))).then_some(o.max_send_lag),
            jitter_us: o.jitter_us.clone(),
        });
        if let Some(t) = self.trace {
            t.borrow_mut().observed = Some(o);
        }
    }

    fn token(&self) -> Option<String> {
        let key = self.cfg.auth_key.as_ref()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Some(TokenSigner::new(key.clone()).sign(&self.id.client_id, &self.id.mac, now))
    }

    /// OTA (if configured), WebSocket upgrade and hello; reports the attempt.
    async fn connect(&mut self) -> Result<(), ErrorKind> {
        let begin = Instant::now();
        self.note(begin, || {
            format!("connect as {} ({})", self.id.mac, self.id.client_id)
        });
        let mut url = self.cfg.ws_url.clone();
        let mut token = self.token();
        let mut ota_time = None;
        if let Some(ota_url) = &self.cfg.ota_url {
            match ota::check(ota_url, &self.id, HELLO_TIMEOUT).await {
                Ok(answer) => {
                    let now = Instant::now();
                    ota_time = Some(now - begin);
                    self.note(now, || format!("ota answered: {answer:?}"));
                    if let Some(u) = answer.websocket_url {
                        url = u;
                    }
                    if answer.token.is_some() {
                        token = answer.token;
                    }
                }
                Err((kind, why)) => return Err(self.connect_failed(kind, None, why)),
            }
        }
        let ws_begin = Instant::now();
        let mut times = ConnectTimes::default();
        let result = open(
            &url,
            &self.id,
            self.cfg.identity,
            self.cfg.protocol,
            token.as_deref(),
            &mut times,
        )
        .await;
        if let Some(t) = times.tcp {
            self.note(t, || format!("tcp connected to {url}"));
        }
        if let Some(t) = times.upgraded {
            self.note(t, || "websocket upgraded; hello sent".into());
        }
        match result {
            Ok(chan) => {
                let at = times.hello.unwrap_or_else(Instant::now);
                self.note(at, || {
                    format!(
                        "hello: session {} downlink {} Hz {} ms",
                        chan.session_id, chan.sample_rate, chan.frame_ms
                    )
                });
                if let Some(t) = self.trace {
                    t.borrow_mut().sample_rate = chan.sample_rate;
                }
                (self.report)(Report::Connect {
                    at,
                    ota: ota_time,
                    result: Ok(at - ws_begin),
                });
                self.chan = Some(chan);
                self.listening = false;
                self.mic = Mic::Off;
                Ok(())
            }
            Err((kind, why)) => Err(self.connect_failed(kind, ota_time, why)),
        }
    }

    fn connect_failed(&self, kind: ErrorKind, ota: Option<Duration>, why: String) -> ErrorKind {
        let at = Instant::now();
        self.note(at, || format!("connect failed ({}): {why}", kind.name()));
        (self.report)(Report::Connect {
            at,
            ota,
            result: Err(kind),
        });
        kind
    }

    async fn send_text(&mut self, text: String) -> Result<(), String> {
        let chan = self.chan.as_mut().ok_or("not connected")?;
        chan.ws
            .send(Message::text(text))
            .await
            .map_err(|e| e.to_string())
    }

    fn listen(&self, state: &str) -> String {
        let sid = self.chan.as_ref().map_or("", |c| c.session_id.as_str());
        listen_text(sid, state, self.cfg.mode)
    }

    /// Sends the mic frame that is due; returns the send time if it was the last speech frame.
    async fn send_mic_frame(&mut self) -> Result<Option<Instant>, String> {
        let uplink = &self.cfg.uplink;
        let (frame, done) = match &mut self.mic {
            Mic::Off => return Ok(None),
            Mic::Speech { next, .. } => {
                let f = uplink.speech[*next].clone();
                *next += 1;
                (f, *next == uplink.speech.len())
            }
            Mic::Floor { at, next } => {
                let f = uplink.floor[*next % uplink.floor.len()].clone();
                *next += 1;
                *at += FRAME;
                (f, false)
            }
        };
        let chan = self.chan.as_mut().ok_or("not connected")?;
        chan.ws
            .send(Message::Binary(frame))
            .await
            .map_err(|e| e.to_string())?;
        if done {
            self.mic = Mic::Off;
            return Ok(Some(Instant::now()));
        }
        Ok(None)
    }

    /// Sends due mic frames and reads the socket until something happens or `deadline` passes.
    async fn step(&mut self, deadline: Instant) -> Step {
        loop {
            let now = Instant::now();
            if let Some(due) = self.mic.due().filter(|due| *due <= now) {
                self.send_lag = self.send_lag.max(now - due);
                match self.send_mic_frame().await {
                    Ok(Some(at)) => return Step::SpeechDone(at),
                    Ok(None) => continue,
                    Err(e) => {
                        return self
                            .closed_after_send_error(format!("send audio: {e}"))
                            .await
                    }
                }
            }
            if now >= deadline {
                return Step::Deadline;
            }
            let wake = self.mic.due().map_or(deadline, |due| due.min(deadline));
            let Some(chan) = self.chan.as_mut() else {
                sleep_until(wake).await;
                continue;
            };
            let got = futures_lite::future::or(async { Some(chan.ws.next().await) }, async {
                sleep_until(wake).await;
                None
            })
            .await;
            let at = Instant::now();
            match got {
                None => continue,
                Some(None) => return self.closed("closed".into()),
                Some(Some(Err(e))) => return self.closed(e.to_string()),
                Some(Some(Ok(Message::Text(text)))) => match parse_server_text(text.as_str()) {
                    Some(ServerEvent::Mcp(payload)) => {
                        let method = payload["method"].as_str().unwrap_or("").to_owned();
                        let answered = match mcp::reply(&payload) {
                            Some(reply) => {
                                let sid = chan.session_id.clone();
                                let msg = serde_json::json!({"session_id": sid, "type": "mcp", "payload": reply});
                                if let Err(e) = self.send_text(msg.to_string()).await {
                                    return self.closed(format!("send mcp: {e}"));
                                }
                                " (answered)"
                            }
                            None => "",
                        };
                        self.note(at, || format!("mcp {method}{answered}"));
                    }
                    Some(event) => return Step::Server(event, at),
                    None => {
                        self.note(at, || format!("bad text frame: {}", text.as_str()));
                        return Step::BadText;
                    }
                },
                Some(Some(Ok(Message::Binary(b)))) => return Step::Audio(b, at),
                Some(Some(Ok(Message::Close(frame)))) => {
                    let (kind, why) = close_kind(frame.as_ref());
                    return self.closed_as(kind, why);
                }
                Some(Some(Ok(_))) => continue,
            }
        }
    }

    fn closed(&mut self, why: String) -> Step {
        self.closed_as(ErrorKind::Disconnected, why)
    }

    /// A send failed: the server may have closed the channel with a close frame we have not
    /// read yet. Read for a moment; if a close frame is there, its code says how it ended.
    async fn closed_after_send_error(&mut self, why: String) -> Step {
        if let Some(chan) = self.chan.as_mut() {
            let until = Instant::now() + Duration::from_millis(200);
            loop {
                let got = futures_lite::future::or(async { Some(chan.ws.next().await) }, async {
                    sleep_until(until).await;
                    None
                })
                .await;
                match got {
                    Some(Some(Ok(Message::Close(frame)))) => {
                        let (kind, reason) = close_kind(frame.as_ref());
                        return self.closed_as(kind, format!("{why}; {reason}"));
                    }
                    Some(Some(Ok(_))) => continue,
                    _ => break,
                }
            }
        }
        self.closed(why)
    }

    /// The channel ended; `kind` says whether the server closed it cleanly (1000/1001).
    fn closed_as(&mut self, kind: ErrorKind, why: String) -> Step {
        self.chan = None;
        self.mic = Mic::Off;
        Step::Closed(kind, why)
    }

    /// The mic goes off when the device starts speaking (auto and manual modes).
    fn mute_unless_realtime(&mut self) {
        if self.cfg.mode != Mode::Realtime {
            self.mic = Mic::Off;
        }
    }

    /// Handles one reply audio frame.
    fn on_audio(&mut self, o: &mut Observed, frame: &[u8], at: Instant) {
        if o.tts_stop.is_some() {
            o.violations.audio_after_stop += 1;
            return;
        }
        if o.tts_start.is_none() {
            o.violations.audio_before_start += 1;
            return;
        }
        let (rate, frame_ms) = self
            .chan
            .as_ref()
            .map_or((24000, 60), |c| (c.sample_rate, c.frame_ms));
        match check_downlink(self.cfg.protocol, frame, rate, frame_ms) {
            Ok(payload) => {
                if let Some(t) = self.trace {
                    t.borrow_mut().reply.push(payload.to_vec());
                }
            }
            Err(problem) => {
                o.violations.bad_frames += 1;
                self.note(at, || format!("bad audio frame: {problem:?}"));
            }
        }
        o.frames += 1;
        if o.first_audio.is_none() {
            o.first_audio = Some(at);
            self.note(at, || "first audio frame".into());
        }
        if let Some(prev) = self.last_audio_at {
            let gap = at.saturating_duration_since(prev);
            let expected = Duration::from_millis(u64::from(frame_ms));
            let jitter = gap.abs_diff(expected);
            o.jitter_us
                .push(u64::try_from(jitter.as_micros()).unwrap_or(u64::MAX));
        }
        self.last_audio_at = Some(at);
    }

    /// One interaction, starting now (no earlier than `start`).
    async fn interaction(&mut self, intended_last_frame: Instant, start: Instant) -> Observed {
        let mut o = Observed::new(intended_last_frame);
        let begin = Instant::now().max(start);
        if !(self.cfg.mode == Mode::Realtime && self.listening) {
            let text = self.listen("start");
            if let Err(e) = self.send_text(text).await {
                self.note(Instant::now(), || format!("send listen start: {e}"));
                o.end = End::Disconnected;
                self.chan = None;
                return o;
            }
            self.listening = true;
            self.note(begin, || {
                format!("listen start ({})", self.cfg.mode.as_str())
            });
        }
        self.last_audio_at = None;
        self.send_lag = Duration::ZERO;
        self.mic = Mic::Speech {
            start: begin,
            next: 0,
        };
        let speech = FRAME * self.cfg.uplink.speech.len() as u32;
        let mut phase = Phase::Speaking;
        let mut last_event = begin;
        loop {
            let deadline = match phase {
                Phase::Speaking => begin + speech + self.cfg.timeout,
                Phase::AwaitingReply(sent) => sent + self.cfg.timeout,
                Phase::Replying => last_event + self.cfg.timeout,
            };
            match self.step(deadline).await {
                Step::SpeechDone(at) => {
                    o.actual_last_frame = Some(at);
                    let n = self.cfg.uplink.speech.len();
                    self.note(at, || format!("last speech frame sent ({n} frames)"));
                    match self.cfg.mode {
                        Mode::Manual => {
                            let text = self.listen("stop");
                            if let Err(e) = self.send_text(text).await {
                                self.note(Instant::now(), || format!("send listen stop: {e}"));
                                o.end = End::Disconnected;
                                self.chan = None;
                                break;
                            }
                            self.note(Instant::now(), || "listen stop".into());
                        }
                        Mode::Auto | Mode::Realtime => {
                            self.mic = Mic::Floor {
                                at: begin + speech,
                                next: 0,
                            };
                        }
                    }
                    if phase == Phase::Speaking {
                        phase = Phase::AwaitingReply(at);
                    }
                }
                Step::Deadline => {
                    o.end = if phase == Phase::Replying {
                        End::Stalled
                    } else {
                        End::NoReply
                    };
                    self.note(Instant::now(), || "timed out".into());
                    break;
                }
                Step::Closed(kind, why) => {
                    self.note(Instant::now(), || format!("connection lost: {why}"));
                    o.end = End::closed(kind);
                    break;
                }
                Step::BadText => o.violations.bad_messages += 1,
                Step::Audio(frame, at) => {
                    last_event = at;
                    self.on_audio(&mut o, &frame, at);
                }
                Step::Server(event, at) => {
                    last_event = at;
                    self.note(at, || describe(&event));
                    match event {
                        ServerEvent::Stt(_) => {
                            o.stt.get_or_insert(at);
                            self.mute_unless_realtime();
                            phase = Phase::Replying;
                        }
                        ServerEvent::TtsStart => {
                            o.tts_start.get_or_insert(at);
                            self.mute_unless_realtime();
                            phase = Phase::Replying;
                        }
                        ServerEvent::TtsStop => {
                            o.tts_stop = Some(at);
                            self.note(at, || format!("reply: {} audio frames", o.frames));
                            break;
                        }
                        ServerEvent::Alert(_) => o.violations.alerts += 1,
                        _ => {}
                    }
                }
            }
        }
        self.mute_unless_realtime();
        o.max_send_lag = self.send_lag;
        o
    }

    /// Reads (and, in realtime mode, streams floor frames) until `until`; frames arriving now count
    /// against the interaction that just ended.
    async fn idle_until(&mut self, until: Instant, mut finished: Option<&mut Observed>) {
        if self.chan.is_none() {
            sleep_until(until).await;
            return;
        }
        // A server may start speaking on its own (a farewell, say); that audio is not late.
        let mut server_speaking = false;
        loop {
            match self.step(until).await {
                Step::Deadline => return,
                Step::Closed(kind, why) => {
                    self.note(Instant::now(), || {
                        format!("connection lost while idle: {why}")
                    });
                    if let Some(o) = finished.as_deref_mut() {
                        if o.end == End::Completed {
                            o.end = End::closed(kind);
                        }
                    }
                    sleep_until(until).await;
                    return;
                }
                Step::Audio(frame, at) => {
                    if let Some(o) = finished.as_deref_mut().filter(|_| !server_speaking) {
                        if o.tts_stop.is_some() {
                            o.violations.audio_after_stop += 1;
                            self.note(at, || {
                                format!("audio after tts stop ({} bytes)", frame.len())
                            });
                        }
                    }
                }
                Step::BadText => {
                    if let Some(o) = finished.as_deref_mut() {
                        o.violations.bad_messages += 1;
                    }
                }
                Step::Server(event, at) => {
                    match event {
                        ServerEvent::TtsStart => server_speaking = true,
                        ServerEvent::TtsStop => server_speaking = false,
                        _ => {}
                    }
                    self.note(at, || format!("{} (while idle)", describe(&event)));
                }
                Step::SpeechDone(_) => {}
            }
        }
    }
}

/// A `listen` message as the firmware sends it; `mode` only on `start`.
fn listen_text(session_id: &str, state: &str, mode: Mode) -> String {
    let mut v = serde_json::json!({"session_id": session_id, "type": "listen", "state": state});
    if state == "start" {
        v["mode"] = mode.as_str().into();
    }
    v.to_string()
}

/// A timeline line for a server event.
fn describe(event: &ServerEvent) -> String {
    match event {
        ServerEvent::Hello { session_id, .. } => format!("hello again (session {session_id})"),
        ServerEvent::Stt(text) => format!("stt \"{text}\""),
        ServerEvent::Llm(emotion) => format!("llm emotion {emotion}"),
        ServerEvent::TtsStart => "tts start".into(),
        ServerEvent::SentenceStart(text) => format!("tts sentence_start \"{text}\""),
        ServerEvent::TtsStop => "tts stop".into(),
        ServerEvent::Mcp(p) => format!("mcp {p}"),
        ServerEvent::Alert(a) => format!("alert {a}"),
        ServerEvent::Other { raw, .. } => raw.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xiaozhi_protocol::{parse_client_message, ClientMessage, ListenMode, ListenState};

    #[test]
    fn listen_messages_parse_as_the_firmware_sends_them() {
        for (mode, expected) in [
            (Mode::Auto, ListenMode::Auto),
            (Mode::Manual, ListenMode::Manual),
            (Mode::Realtime, ListenMode::Realtime),
        ] {
            let ClientMessage::Listen(l) =
                parse_client_message(&listen_text("s", "start", mode)).unwrap()
            else {
                panic!("not listen")
            };
            assert_eq!((l.state, l.mode), (ListenState::Start, Some(expected)));
        }
        let ClientMessage::Listen(l) =
            parse_client_message(&listen_text("s", "stop", Mode::Manual)).unwrap()
        else {
            panic!("not listen")
        };
        assert_eq!((l.state, l.mode), (ListenState::Stop, None));
    }
}
