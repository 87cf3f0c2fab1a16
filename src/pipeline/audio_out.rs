//! The downlink half of a turn, the twin of [`super::audio_in`]: synthesised sentences in,
//! Opus frames out at the pace the device plays them. Sans-I/O: every call takes `now`, nothing
//! here reads a clock, sleeps or sends; the caller sends what comes back and wakes at
//! [`Playout::next_due`].
//!
//! Pacing is by audio time against a per-session clock: `play_end` is when the device will
//! have played everything sent so far (each 60 ms frame pushes it forward by 60 ms from
//! `max(play_end, now)`); the next frame is due once the device holds no more than
//! `prebuffer_frames` of audio beyond the frame it is playing. So a reply starts with a burst of
//! `prebuffer_frames + 1` frames, then one frame per 60 ms; the device never holds more than the
//! pre-buffer (well under its 40-frame queue), a stall (waiting for synthesis) is followed by a
//! fresh pre-buffer, and no per-frame sleep accumulates drift. `tts stop` is due once `play_end`
//! plus a guard has passed ([`Playout::stop_time`]), so the device has played the last frame.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::audio::DownlinkEncoder;
use crate::metrics::Stage;

/// Duration of one downlink frame.
pub const FRAME: Duration = Duration::from_millis(60);

/// Frames encoded per [`Playout::pump`] call. A reply's first burst is `prebuffer_frames + 1`
/// frames, ~0.15 ms of Opus encoding each: encoded in one call it held the shard for ~1 ms, and
/// an inference reply arriving meanwhile waited that long (reply wake-up p99 at 100 devices
/// 1.7 ms with a 6-frame burst against 0.8–0.9 ms with a 2-frame one). With one frame per call
/// the rest of a burst is due at once ([`Playout::next_due`] is not later than now) and the
/// caller yields to the executor before pumping again.
pub const FRAMES_PER_PUMP: usize = 1;

/// What the play-out needs from config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayoutSettings {
    /// Downlink sample rate (Hz).
    pub rate: u32,
    /// Opus complexity (0–10).
    pub complexity: i32,
    /// Frames the device may hold ahead of the one it plays.
    pub prebuffer_frames: u32,
    /// Wait after the play-out end before `tts stop`.
    pub stop_guard: Duration,
}

/// One thing for the device, in send order.
#[derive(Debug, PartialEq, Eq)]
pub enum Played {
    /// The sentence whose audio follows starts (its text; never empty).
    Sentence(String),
    /// One 60 ms Opus packet.
    Frame(Vec<u8>),
}

/// A queued piece of a reply.
enum Queued {
    /// The text of the sentence whose PCM follows (empty: nothing is announced).
    Sentence(String),
    /// PCM at the downlink rate, sent from `pos` on.
    Pcm { pcm: Vec<i16>, pos: usize },
}

/// One session's downlink play-out: the queue, the encoder and the play-out clock.
pub struct Playout {
    settings: PlayoutSettings,
    frame_samples: usize,
    queue: VecDeque<Queued>,
    /// libopus state (~30 KiB): created with the first frame, kept for the session.
    encoder: Option<DownlinkEncoder>,
    /// When the device will have played everything sent so far.
    play_end: Option<Instant>,
    /// End of speech of the reply whose first frame is not sent yet (first-audio latency).
    first_audio_from: Option<Instant>,
    /// `now` of the last [`Playout::pump`]: the due time while no frame has set the clock.
    last_pump: Option<Instant>,
}

impl Playout {
    /// An idle play-out; the encoder is created when the first frame is sent.
    pub fn new(settings: PlayoutSettings) -> Playout {
        Playout {
            settings,
            frame_samples: settings.rate as usize * FRAME.as_millis() as usize / 1000,
            queue: VecDeque::new(),
            encoder: None,
            play_end: None,
            first_audio_from: None,
            last_pump: None,
        }
    }

    /// A reply to speech that ended at `eos` begins: its first frame records
    /// [`Stage::EosToFirstAudio`].
    pub fn begin_reply(&mut self, eos: Instant) {
        self.first_audio_from = Some(eos);
    }

    /// Queues one synthesised sentence: `text` is announced (unless empty) when its audio is
    /// next, then `pcm` (at the downlink rate) goes out frame by frame, the last one
    /// zero-padded.
    pub fn push_sentence(&mut self, text: String, pcm: Vec<i16>) {
        self.queue.push_back(Queued::Sentence(text));
        self.queue.push_back(Queued::Pcm { pcm, pos: 0 });
    }

    /// True when nothing is waiting to be sent.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Abort: forgets everything queued and the play-out clock (the device drops its buffer on
    /// `tts stop`, so the next reply starts with a fresh pre-buffer). The encoder is kept.
    pub fn clear(&mut self) {
        self.queue.clear();
        self.play_end = None;
        self.first_audio_from = None;
    }

    /// When the device will have played everything sent so far (`None` before the first frame).
    pub fn play_end(&self) -> Option<Instant> {
        self.play_end
    }

    /// When the next frame is due, if anything is queued.
    pub fn next_due(&self) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        self.due().or(self.last_pump)
    }

    /// When `tts stop` may go out for a reply whose last frame has been sent by `now`: the
    /// play-out end (or `now`, whichever is later) plus the stop guard.
    pub fn stop_time(&self, now: Instant) -> Instant {
        self.play_end.unwrap_or(now).max(now) + self.settings.stop_guard
    }

    /// Due time of the next frame by the clock: the device then holds just the pre-buffer.
    fn due(&self) -> Option<Instant> {
        let prebuffer = FRAME * self.settings.prebuffer_frames;
        self.play_end
            .map(|end| end.checked_sub(prebuffer).unwrap_or(end))
    }

    /// Emits what is due at `now` into `played`, in order, with latency samples
    /// ([`Stage::FramePacingJitter`], [`Stage::EosToFirstAudio`]) into `samples`: at most
    /// [`FRAMES_PER_PUMP`] frames (and the sentence markers before them); call again at
    /// [`Playout::next_due`] for the rest.
    pub fn pump(
        &mut self,
        now: Instant,
        played: &mut Vec<Played>,
        samples: &mut Vec<(Stage, u64)>,
    ) {
        self.last_pump = Some(now);
        let fs = self.frame_samples;
        let mut encoded = 0;
        loop {
            if encoded == FRAMES_PER_PUMP {
                return;
            }
            let due = self.due();
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            let (pcm, pos) = match front {
                Queued::Sentence(text) => {
                    let text = std::mem::take(text);
                    self.queue.pop_front();
                    if !text.is_empty() {
                        played.push(Played::Sentence(text));
                    }
                    continue;
                }
                Queued::Pcm { pcm, pos } => (pcm, pos),
            };
            if let Some(due) = due {
                if due > now {
                    return;
                }
                // Pacing jitter: how late a frame goes out while the device is still playing.
                // After a stall (the device ran dry) a frame starts a new pre-buffer instead.
                if now.saturating_duration_since(due) < FRAME
                    && self.play_end.is_some_and(|e| e > now)
                {
                    samples.push((
                        Stage::FramePacingJitter,
                        micros(now.saturating_duration_since(due)),
                    ));
                }
            }
            let end = (*pos + fs).min(pcm.len());
            let mut frame = pcm[*pos..end].to_vec();
            frame.resize(fs, 0);
            *pos = end;
            if *pos >= pcm.len() {
                self.queue.pop_front();
            }
            let encoder = match self.encoder.as_mut() {
                Some(e) => e,
                None => match DownlinkEncoder::new(self.settings.rate, self.settings.complexity) {
                    Ok(e) => self.encoder.insert(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "downlink encoder unavailable");
                        return;
                    }
                },
            };
            encoded += 1;
            match encoder.encode(&frame) {
                Ok(packet) => {
                    if let Some(eos) = self.first_audio_from.take() {
                        samples.push((
                            Stage::EosToFirstAudio,
                            micros(now.saturating_duration_since(eos)),
                        ));
                    }
                    played.push(Played::Frame(packet));
                    let start = self.play_end.map_or(now, |e| e.max(now));
                    self.play_end = Some(start + FRAME);
                }
                Err(e) => tracing::warn!(error = %e, "opus encode failed; frame skipped"),
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: u32 = 24_000;
    const FS: usize = 1440;

    fn settings(prebuffer_frames: u32) -> PlayoutSettings {
        PlayoutSettings {
            rate: RATE,
            complexity: 5,
            prebuffer_frames,
            stop_guard: Duration::from_millis(100),
        }
    }

    /// `frames` × 60 ms of a 440 Hz tone at 24 kHz.
    fn tone(frames: usize) -> Vec<i16> {
        (0..frames * FS)
            .map(|i| {
                ((i as f32 * 440.0 * std::f32::consts::TAU / RATE as f32).sin() * 8000.0) as i16
            })
            .collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Pumps at `now` until nothing more is due, as the caller does (waking again at
    /// `next_due` while it is not later than `now`); returns what was played.
    fn pump(p: &mut Playout, now: Instant) -> Vec<Played> {
        let mut played = Vec::new();
        pump_all(p, now, &mut played, &mut Vec::new());
        played
    }

    fn pump_all(
        p: &mut Playout,
        now: Instant,
        played: &mut Vec<Played>,
        samples: &mut Vec<(Stage, u64)>,
    ) {
        loop {
            let before = played.len();
            p.pump(now, played, samples);
            if played.len() == before || p.next_due().is_none_or(|due| due > now) {
                return;
            }
        }
    }

    #[test]
    fn one_call_encodes_one_frame_and_the_rest_of_a_burst_is_due_at_once() {
        let t0 = Instant::now();
        let mut p = Playout::new(settings(5));
        p.begin_reply(t0);
        p.push_sentence("A.".into(), tone(10));
        let mut played = Vec::new();
        p.pump(t0, &mut played, &mut Vec::new());
        assert_eq!(frames(&played), FRAMES_PER_PUMP);
        assert!(
            p.next_due().is_some_and(|due| due <= t0),
            "the burst goes on at once"
        );
        assert_eq!(frames(&pump(&mut p, t0)), 6 - FRAMES_PER_PUMP);
        assert!(p.next_due().is_some_and(|due| due > t0));
    }

    fn frames(played: &[Played]) -> usize {
        played
            .iter()
            .filter(|p| matches!(p, Played::Frame(_)))
            .count()
    }

    #[test]
    fn a_reply_starts_with_the_prebuffer_then_one_frame_per_60_ms() {
        let t0 = Instant::now();
        let mut p = Playout::new(settings(5));
        assert_eq!(p.next_due(), None, "nothing queued, nothing due");
        p.push_sentence("Hello.".into(), tone(20));
        let first = pump(&mut p, t0);
        assert_eq!(first[0], Played::Sentence("Hello.".into()));
        // The frame the device starts playing plus the 5-frame pre-buffer, at once.
        assert_eq!(frames(&first), 6);
        assert_eq!(p.play_end(), Some(t0 + ms(360)));
        assert_eq!(p.next_due(), Some(t0 + ms(60)));
        assert!(pump(&mut p, t0 + ms(59)).is_empty(), "not due before 60 ms");
        for k in 1..=14u64 {
            let played = pump(&mut p, t0 + ms(60 * k));
            assert_eq!(frames(&played), 1, "one frame at {} ms", 60 * k);
        }
        assert!(p.is_idle());
        assert_eq!(p.next_due(), None);
        assert_eq!(p.play_end(), Some(t0 + ms(60 * 20)));
    }

    #[test]
    fn pacing_never_runs_ahead_of_the_clock_beyond_the_prebuffer() {
        let t0 = Instant::now();
        let prebuffer = 3;
        let mut p = Playout::new(settings(prebuffer));
        p.push_sentence(String::new(), tone(50));
        let mut sent = 0;
        // Wake-ups at an irregular 7–23 ms, as a loaded shard would.
        let mut t = Duration::ZERO;
        let mut step = 0u64;
        while !p.is_idle() {
            let now = t0 + t;
            sent += frames(&pump(&mut p, now));
            let ahead = p
                .play_end()
                .map_or(Duration::ZERO, |e| e.saturating_duration_since(now));
            assert!(
                ahead <= FRAME * (prebuffer + 1),
                "{ahead:?} queued on the device at {t:?}"
            );
            let allowed = prebuffer as u128 + 1 + t.as_millis() / 60;
            assert!(sent as u128 <= allowed, "{sent} frames by {t:?}");
            step += 1;
            t += ms(7 + (step * 5) % 17);
        }
        assert_eq!(sent, 50);
        // Real time: 50 frames need 3 s of audio, and the last went out 4 frames before its end.
        assert!(t >= ms(50 * 60 - 4 * 60), "finished at {t:?}");
    }

    #[test]
    fn sentence_markers_come_in_order_between_the_audio() {
        let t0 = Instant::now();
        let mut p = Playout::new(settings(10));
        p.push_sentence("One.".into(), tone(2));
        p.push_sentence(String::new(), tone(1));
        let mut two = tone(1);
        two.truncate(FS / 2);
        p.push_sentence("Two.".into(), two);
        let played = pump(&mut p, t0);
        let shape: Vec<String> = played
            .iter()
            .map(|x| match x {
                Played::Sentence(s) => s.clone(),
                Played::Frame(_) => "#".into(),
            })
            .collect();
        // An empty text is not announced; half a frame is padded to one.
        assert_eq!(shape, ["One.", "#", "#", "#", "Two.", "#"]);
    }

    #[test]
    fn tts_stop_is_due_at_the_play_out_end_plus_the_guard() {
        let t0 = Instant::now();
        let mut p = Playout::new(settings(5));
        assert_eq!(
            p.stop_time(t0),
            t0 + ms(100),
            "nothing played: guard from now"
        );
        p.push_sentence("Hi.".into(), tone(4));
        pump(&mut p, t0);
        assert!(p.is_idle());
        assert_eq!(p.stop_time(t0), t0 + ms(4 * 60 + 100));
        assert_eq!(
            p.stop_time(t0 + ms(100)),
            t0 + ms(4 * 60 + 100),
            "the clock, not the call"
        );
        assert_eq!(
            p.stop_time(t0 + ms(500)),
            t0 + ms(600),
            "already played: guard from now"
        );
    }

    #[test]
    fn clear_drops_everything_queued_and_restarts_the_prebuffer() {
        let t0 = Instant::now();
        let mut p = Playout::new(settings(5));
        p.push_sentence("Long.".into(), tone(30));
        p.push_sentence("Never said.".into(), tone(5));
        assert_eq!(frames(&pump(&mut p, t0)), 6);
        p.clear();
        assert!(p.is_idle());
        assert_eq!(p.next_due(), None);
        assert_eq!(p.play_end(), None);
        assert!(
            pump(&mut p, t0 + ms(5000)).is_empty(),
            "nothing queued is sent afterwards"
        );
        // A new reply 100 ms later (the old clock ran to 360 ms) gets a whole pre-buffer.
        p.push_sentence("New.".into(), tone(10));
        assert_eq!(frames(&pump(&mut p, t0 + ms(100))), 6);
    }

    #[test]
    fn a_stall_is_followed_by_a_fresh_prebuffer() {
        let t0 = Instant::now();
        let mut p = Playout::new(settings(2));
        p.push_sentence("A.".into(), tone(3));
        assert_eq!(frames(&pump(&mut p, t0)), 3);
        // Synthesis of the next sentence took longer than the device needed to play A.
        p.push_sentence("B.".into(), tone(5));
        let later = t0 + ms(1000);
        assert_eq!(frames(&pump(&mut p, later)), 3);
        assert_eq!(p.play_end(), Some(later + ms(180)));
    }

    #[test]
    fn frames_decode_to_60_ms_each() {
        let t0 = Instant::now();
        let mut p = Playout::new(settings(100));
        let mut pcm = tone(7);
        pcm.truncate(6 * FS + 100);
        p.push_sentence("x".into(), pcm);
        let played = pump(&mut p, t0);
        let mut dec = opus::Decoder::new(RATE, opus::Channels::Mono).expect("decoder");
        let mut buf = vec![0i16; 5760];
        let sizes: Vec<usize> = played
            .iter()
            .filter_map(|x| match x {
                Played::Frame(packet) => {
                    Some(dec.decode(packet, &mut buf, false).expect("decodes"))
                }
                Played::Sentence(_) => None,
            })
            .collect();
        assert_eq!(sizes, vec![FS; 7], "6 whole frames and a padded seventh");
    }

    #[test]
    fn first_audio_and_pacing_jitter_are_sampled() {
        let eos = Instant::now();
        let mut p = Playout::new(settings(1));
        p.begin_reply(eos);
        p.push_sentence("A.".into(), tone(4));
        let mut samples = Vec::new();
        let t1 = eos + ms(250);
        pump_all(&mut p, t1, &mut Vec::new(), &mut samples);
        // Two frames at once: the first records end of speech → first audio, the second is on
        // time.
        assert_eq!(
            samples,
            vec![
                (Stage::EosToFirstAudio, 250_000),
                (Stage::FramePacingJitter, 0)
            ]
        );
        samples.clear();
        // The third frame was due at t1 + 60 ms; it goes out 5 ms late.
        pump_all(&mut p, t1 + ms(65), &mut Vec::new(), &mut samples);
        assert_eq!(samples, vec![(Stage::FramePacingJitter, 5_000)]);
        samples.clear();
        // A new reply records its own first audio, once.
        p.begin_reply(t1 + ms(100));
        p.push_sentence("B.".into(), tone(1));
        pump_all(&mut p, t1 + ms(300), &mut Vec::new(), &mut samples);
        assert!(
            samples.contains(&(Stage::EosToFirstAudio, 200_000)),
            "{samples:?}"
        );
    }

    #[test]
    fn an_encoder_that_cannot_be_built_sends_nothing_and_does_not_panic() {
        let t0 = Instant::now();
        let mut p = Playout::new(PlayoutSettings {
            rate: 22_050,
            ..settings(5)
        });
        p.push_sentence("A.".into(), vec![1; 5000]);
        assert_eq!(frames(&pump(&mut p, t0)), 0);
        assert_eq!(p.next_due(), Some(t0), "still due: the caller retries");
    }
}
