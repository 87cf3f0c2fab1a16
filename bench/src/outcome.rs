//! What one interaction observed, and what it means: errors by kind and latencies.
//!
//! A device fills an [`Observed`] while an interaction runs (timestamps of `stt`, `tts start`,
//! the first audio frame, `tts stop`, counts of protocol violations, how it ended).
//! [`classify`] turns that into the errors it counts and the latencies it reports; it is pure so
//! the rules are tested without sockets. Every latency is measured from the **intended** send
//! time of the last speech frame (see `schedule.rs` for why).

use std::time::{Duration, Instant};

/// Everything that can go wrong with an interaction, by kind (the keys of `summary.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// TCP connect or WebSocket handshake failed (other than a 503), or the OTA request failed.
    ConnectFailed,
    /// The server refused the device: HTTP 503 on the upgrade or the OTA request, or close code
    /// 1013 (try again later).
    Refused,
    /// No `hello` reply within 10 s (the firmware's limit).
    NoHello,
    /// No `stt` within the timeout after the last speech frame (or a reply without `stt`).
    NoStt,
    /// `stt` arrived before the last speech frame was sent: the server cut the utterance short.
    EarlyStt,
    /// `stt` (or `tts start`) came but `tts stop` did not, with nothing received for the timeout.
    ReplyStalled,
    /// A binary audio frame before `tts start` (the firmware drops it).
    AudioBeforeTtsStart,
    /// A binary audio frame after `tts stop` (the firmware drops it).
    AudioAfterTtsStop,
    /// A binary frame whose header is wrong for the negotiated protocol version, or whose payload
    /// is not one Opus packet of the announced frame duration.
    BadFrame,
    /// A text frame that is not a JSON object with a string `type`.
    BadMessage,
    /// The server sent an `alert` during the interaction (e.g. "busy").
    Alert,
    /// The connection closed or failed while the interaction ran.
    Disconnected,
    /// The server closed the channel cleanly (close code 1000 or 1001, e.g. a drain or an idle
    /// timeout) while the interaction or its think time ran; a device just reconnects.
    ServerClosed,
}

impl ErrorKind {
    /// Every kind, in report order.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::ConnectFailed,
        ErrorKind::Refused,
        ErrorKind::NoHello,
        ErrorKind::NoStt,
        ErrorKind::EarlyStt,
        ErrorKind::ReplyStalled,
        ErrorKind::AudioBeforeTtsStart,
        ErrorKind::AudioAfterTtsStop,
        ErrorKind::BadFrame,
        ErrorKind::BadMessage,
        ErrorKind::Alert,
        ErrorKind::Disconnected,
        ErrorKind::ServerClosed,
    ];

    /// The snake_case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ConnectFailed => "connect_failed",
            ErrorKind::Refused => "refused",
            ErrorKind::NoHello => "no_hello",
            ErrorKind::NoStt => "no_stt",
            ErrorKind::EarlyStt => "early_stt",
            ErrorKind::ReplyStalled => "reply_stalled",
            ErrorKind::AudioBeforeTtsStart => "audio_before_tts_start",
            ErrorKind::AudioAfterTtsStop => "audio_after_tts_stop",
            ErrorKind::BadFrame => "bad_frame",
            ErrorKind::BadMessage => "bad_message",
            ErrorKind::Alert => "alert",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::ServerClosed => "server_closed",
        }
    }
}

/// How an interaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `tts stop` arrived.
    Completed,
    /// The device could not get a connection for it (connect, OTA, refusal, hello).
    NotConnected(ErrorKind),
    /// Nothing (no `stt`, no `tts start`) within the timeout after the last speech frame.
    NoReply,
    /// The reply started but `tts stop` did not come before the timeout.
    Stalled,
    /// The connection closed or failed mid-interaction.
    Disconnected,
    /// The server closed the channel cleanly (1000/1001) mid-interaction or in its think time.
    ServerClosed,
}

impl End {
    /// How an interaction ends when its channel closes with error kind `kind`.
    pub fn closed(kind: ErrorKind) -> End {
        if kind == ErrorKind::ServerClosed {
            End::ServerClosed
        } else {
            End::Disconnected
        }
    }
}

/// Protocol violations counted during one interaction (including its think time afterwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Violations {
    /// Audio frames before `tts start`.
    pub audio_before_start: u32,
    /// Audio frames after `tts stop`.
    pub audio_after_stop: u32,
    /// Frames with a wrong header or payload.
    pub bad_frames: u32,
    /// Text frames that are not a typed JSON object.
    pub bad_messages: u32,
    /// `alert` messages.
    pub alerts: u32,
}

/// The raw observations of one interaction.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Intended send time of the last speech frame (the latency origin).
    pub intended_last_frame: Instant,
    /// When the last speech frame was actually sent; `None` if the speech was cut short.
    pub actual_last_frame: Option<Instant>,
    /// First `stt`.
    pub stt: Option<Instant>,
    /// `tts start`.
    pub tts_start: Option<Instant>,
    /// First binary audio frame after `tts start`.
    pub first_audio: Option<Instant>,
    /// `tts stop`.
    pub tts_stop: Option<Instant>,
    /// Audio frames between `tts start` and `tts stop`.
    pub frames: u32,
    /// |inter-arrival gap − frame duration| of consecutive reply frames, µs.
    pub jitter_us: Vec<u64>,
    /// How late the most delayed uplink frame was sent against its schedule (bench self-check).
    pub max_send_lag: Duration,
    /// Violations seen.
    pub violations: Violations,
    /// How it ended.
    pub end: End,
}

impl Observed {
    /// An empty observation for an interaction whose last frame is intended at `intended_last_frame`.
    pub fn new(intended_last_frame: Instant) -> Observed {
        Observed {
            intended_last_frame,
            actual_last_frame: None,
            stt: None,
            tts_start: None,
            first_audio: None,
            tts_stop: None,
            frames: 0,
            jitter_us: Vec::new(),
            max_send_lag: Duration::ZERO,
            violations: Violations::default(),
            end: End::Completed,
        }
    }
}

/// The verdict on one interaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Each kind at most once, in [`ErrorKind::ALL`] order; empty means the interaction is ok.
    pub errors: Vec<ErrorKind>,
    /// Intended last speech frame → `stt`.
    pub stt: Option<Duration>,
    /// Intended last speech frame → first reply audio frame.
    pub first_audio: Option<Duration>,
    /// Intended last speech frame → `tts stop`.
    pub tts_stop: Option<Duration>,
}

/// Classifies an interaction: which errors it counts and which latencies it reports.
///
/// Latencies are reported for every event that happened, errors or not, except after an early
/// `stt`: then the server answered a different (truncated) utterance and its timing says nothing
/// about end-of-speech latency.
pub fn classify(o: &Observed) -> Verdict {
    let mut errors = Vec::new();
    match o.end {
        End::NotConnected(kind) => {
            return Verdict {
                errors: vec![kind],
                ..Verdict::default()
            }
        }
        End::NoReply => errors.push(ErrorKind::NoStt),
        End::Stalled => errors.push(ErrorKind::ReplyStalled),
        End::Disconnected => errors.push(ErrorKind::Disconnected),
        End::ServerClosed => errors.push(ErrorKind::ServerClosed),
        End::Completed => {}
    }
    let early = match (o.stt, o.actual_last_frame) {
        (Some(stt), Some(last)) => stt < last,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if early {
        errors.push(ErrorKind::EarlyStt);
    }
    if o.stt.is_none() && o.end != End::NoReply {
        // A reply (or a stall, or a drop) without a transcript.
        errors.push(ErrorKind::NoStt);
    }
    let v = &o.violations;
    for (count, kind) in [
        (v.audio_before_start, ErrorKind::AudioBeforeTtsStart),
        (v.audio_after_stop, ErrorKind::AudioAfterTtsStop),
        (v.bad_frames, ErrorKind::BadFrame),
        (v.bad_messages, ErrorKind::BadMessage),
        (v.alerts, ErrorKind::Alert),
    ] {
        if count > 0 {
            errors.push(kind);
        }
    }
    errors.sort();
    errors.dedup();
    let since = |t: Option<Instant>| {
        if early {
            None
        } else {
            t.map(|t| t.saturating_duration_since(o.intended_last_frame))
        }
    };
    Verdict {
        errors,
        stt: since(o.stt),
        first_audio: since(o.first_audio),
        tts_stop: since(o.tts_stop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A clean interaction: last frame on time at t0, stt +300, audio +600, stop +2000.
    fn clean(t0: Instant) -> Observed {
        Observed {
            actual_last_frame: Some(t0),
            stt: Some(t0 + ms(300)),
            tts_start: Some(t0 + ms(320)),
            first_audio: Some(t0 + ms(600)),
            tts_stop: Some(t0 + ms(2000)),
            frames: 20,
            ..Observed::new(t0)
        }
    }

    #[test]
    fn clean_interaction_has_no_errors_and_three_latencies() {
        let t0 = Instant::now();
        assert_eq!(
            classify(&clean(t0)),
            Verdict {
                errors: vec![],
                stt: Some(ms(300)),
                first_audio: Some(ms(600)),
                tts_stop: Some(ms(2000)),
            }
        );
    }

    #[test]
    fn latencies_count_from_the_intended_frame_even_when_sent_late() {
        let t0 = Instant::now();
        let mut o = clean(t0 + ms(1000));
        o.intended_last_frame = t0;
        let v = classify(&o);
        assert!(v.errors.is_empty());
        assert_eq!(v.stt, Some(ms(1300)));
        assert_eq!(v.first_audio, Some(ms(1600)));
    }

    #[test]
    fn stt_before_the_last_frame_is_early_and_reports_no_latency() {
        let t0 = Instant::now();
        let mut o = clean(t0);
        o.stt = Some(t0 - ms(120));
        let v = classify(&o);
        assert_eq!(v.errors, vec![ErrorKind::EarlyStt]);
        assert_eq!((v.stt, v.first_audio, v.tts_stop), (None, None, None));
        // Speech cut short by the stt: the last frame was never sent.
        o.actual_last_frame = None;
        assert_eq!(classify(&o).errors, vec![ErrorKind::EarlyStt]);
    }

    #[test]
    fn timeout_without_any_reply_is_no_stt() {
        let t0 = Instant::now();
        let o = Observed {
            actual_last_frame: Some(t0),
            end: End::NoReply,
            ..Observed::new(t0)
        };
        assert_eq!(classify(&o).errors, vec![ErrorKind::NoStt]);
    }

    #[test]
    fn reply_without_stt_counts_no_stt_but_keeps_audio_latency() {
        let t0 = Instant::now();
        let mut o = clean(t0);
        o.stt = None;
        let v = classify(&o);
        assert_eq!(v.errors, vec![ErrorKind::NoStt]);
        assert_eq!(v.first_audio, Some(ms(600)));
    }

    #[test]
    fn stalled_and_disconnected_keep_what_arrived() {
        let t0 = Instant::now();
        let mut o = clean(t0);
        o.tts_stop = None;
        o.end = End::Stalled;
        let v = classify(&o);
        assert_eq!(v.errors, vec![ErrorKind::ReplyStalled]);
        assert_eq!((v.stt, v.tts_stop), (Some(ms(300)), None));
        o.end = End::Disconnected;
        assert_eq!(classify(&o).errors, vec![ErrorKind::Disconnected]);
    }

    #[test]
    fn violations_map_to_their_kinds_once_each_in_order() {
        let t0 = Instant::now();
        let mut o = clean(t0);
        o.violations = Violations {
            audio_before_start: 3,
            audio_after_stop: 1,
            bad_frames: 2,
            bad_messages: 1,
            alerts: 1,
        };
        let v = classify(&o);
        assert_eq!(
            v.errors,
            vec![
                ErrorKind::AudioBeforeTtsStart,
                ErrorKind::AudioAfterTtsStop,
                ErrorKind::BadFrame,
                ErrorKind::BadMessage,
                ErrorKind::Alert,
            ]
        );
        assert_eq!(v.first_audio, Some(ms(600)), "violations keep latencies");
    }

    #[test]
    fn connection_failures_report_their_kind_only() {
        let t0 = Instant::now();
        for kind in [
            ErrorKind::ConnectFailed,
            ErrorKind::Refused,
            ErrorKind::NoHello,
        ] {
            let o = Observed {
                end: End::NotConnected(kind),
                ..Observed::new(t0)
            };
            assert_eq!(
                classify(&o),
                Verdict {
                    errors: vec![kind],
                    ..Verdict::default()
                }
            );
        }
    }

    #[test]
    fn error_names_are_unique_snake_case() {
        let mut names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.name()).collect();
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }
}
