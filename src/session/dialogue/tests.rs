//! Unit tests of the dialogue's turn phases, driven with synthetic results and `Instant`s:
//! recognising → answering → speaking → finishing, aborts, stale results and timeouts.

use std::time::{Duration, Instant};

use super::*;
use crate::providers::llm::Role;

/// Dialogue settings for tests (the session's tests use them too).
pub(crate) fn settings(offline_llm: bool) -> DialogueSettings {
    DialogueSettings {
        offline_llm,
        system_prompt: "Be brief.".into(),
        history_messages: 10,
        history_max_bytes: 1000,
        out_rate: 24_000,
        complexity: 5,
        prebuffer_frames: 5,
        stop_guard: Duration::from_millis(100),
        asr_timeout: Duration::from_secs(5),
        tts_timeout: Duration::from_secs(5),
        max_segment_chars: 100,
        tz_offset_minutes: 0,
        emotions: true,
        max_tool_rounds: 2,
        max_calls_per_round: 2,
        max_tool_result_bytes: 64,
        intents: Intents::new(&["goodbye".into()], &["hi xiaozhi".into()]),
        prefer_chinese: false,
    }
}

/// What the connection driver does after every call: `on_timer` again at once while something
/// is already due (the rest of a reply's first burst: one frame per pump, see
/// `audio_out::FRAMES_PER_PUMP`).
trait Settle {
    fn settle(&mut self, now: Instant, out: &mut Output);
}

impl Settle for Dialogue {
    fn settle(&mut self, now: Instant, out: &mut Output) {
        for _ in 0..1000 {
            if self.next_deadline().is_none_or(|t| t > now) {
                return;
            }
            self.on_timer(now, out);
        }
        panic!("a deadline stayed due after 1000 timer calls");
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `frames` × 60 ms of 24 kHz audio.
fn pcm(frames: usize) -> Vec<i16> {
    (0..frames * 1440)
        .map(|i| ((i as f32 * 0.05).sin() * 6000.0) as i16)
        .collect()
}

/// The `type` (and `state` for `tts`) of each text item, `#` for audio.
fn kinds(out: &Output) -> Vec<String> {
    out.items
        .iter()
        .map(|item| match item {
            OutItem::Audio(_) => "#".to_string(),
            OutItem::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t).expect("json");
                match v["state"].as_str() {
                    Some(state) if v["type"] == "tts" => format!("tts.{state}"),
                    _ => v["type"].as_str().unwrap_or("?").to_string(),
                }
            }
        })
        .collect()
}

fn frames(out: &Output) -> usize {
    out.items
        .iter()
        .filter(|i| matches!(i, OutItem::Audio(_)))
        .count()
}

/// The synthesis requests: (turn, seq, text).
fn tts_requests(out: &Output) -> Vec<(u32, u32, String)> {
    out.requests
        .iter()
        .filter_map(|r| match r {
            Request::Tts { turn, seq, text } => Some((*turn, *seq, text.clone())),
            _ => None,
        })
        .collect()
}

fn phase(d: &Dialogue) -> &'static str {
    match d.turn.as_ref().map(|t| &t.phase) {
        None => "none",
        Some(Phase::Recognizing { .. }) => "recognizing",
        Some(Phase::Answering { .. }) => "answering",
        Some(Phase::Speaking { .. }) => "speaking",
        Some(Phase::Finishing { .. }) => "finishing",
    }
}

/// A dialogue with turn 1 recognised as `text` at `t0` (LLM configured).
fn answering(text: &str, t0: Instant) -> (Dialogue, Output) {
    let mut d = Dialogue::new(settings(false), "sid".into());
    let mut out = Output::default();
    d.on_utterance(vec![0; 1600], t0, &mut out);
    d.on_asr(1, Ok(text.into()), t0 + ms(50), &mut out);
    (d, out)
}

/// Runs the timers at each deadline until the turn ends or `limit` passes; returns the instant
/// of the last timer.
fn run_timers(d: &mut Dialogue, out: &mut Output, limit: Instant) -> Instant {
    let mut last = None;
    for _ in 0..10_000 {
        let Some(at) = d.next_deadline().filter(|&at| at <= limit) else {
            break;
        };
        d.on_timer(at, out);
        d.settle(at, out);
        last = Some(at);
    }
    last.expect("a deadline before the limit")
}

#[test]
fn an_utterance_asks_for_recognition_with_a_deadline() {
    let t0 = Instant::now();
    let mut d = Dialogue::new(settings(true), "sid".into());
    let mut out = Output::default();
    d.on_utterance(vec![7; 1600], t0, &mut out);
    assert!(matches!(
        out.requests.as_slice(),
        [Request::Asr { turn: 1, pcm }] if pcm.len() == 1600
    ));
    assert!(out.items.is_empty());
    assert_eq!(phase(&d), "recognizing");
    assert!(d.busy() && !d.speaking());
    assert_eq!(d.current_turn(), Some(1));
    assert_eq!(d.next_deadline(), Some(t0 + ms(5000)));
}

#[test]
fn a_transcript_goes_out_as_stt_and_the_offline_answer_to_synthesis() {
    let t0 = Instant::now();
    let mut d = Dialogue::new(settings(true), "sid".into());
    let mut out = Output::default();
    d.on_utterance(vec![0; 1600], t0, &mut out);
    let mut out = Output::default();
    d.on_asr(1, Ok(" Who are you? ".into()), t0 + ms(80), &mut out);
    assert_eq!(kinds(&out), ["stt", "tts.start", "llm"]);
    let OutItem::Text(stt) = &out.items[0] else {
        panic!("stt is text")
    };
    assert!(stt.contains(r#""text":"Who are you""#), "{stt}");
    let tts = tts_requests(&out);
    assert_eq!(tts.len(), 1, "one segment at a time: {tts:?}");
    assert_eq!(tts[0].0, 1);
    assert_eq!(tts[0].1, 0);
    assert!(tts[0].2.starts_with("I'm the offline responder"), "{tts:?}");
    assert!(out.samples.contains(&(Stage::EosToTranscript, 80_000)));
    // The offline responder answers at once: the text is complete.
    assert_eq!(phase(&d), "speaking");
    assert!(d.speaking());
    assert_eq!(d.user_text(), "Who are you");
}

#[test]
fn a_transcript_goes_to_the_llm_with_the_system_prompt() {
    let t0 = Instant::now();
    let (d, out) = answering("What is the weather like?", t0);
    let Some(Request::Llm {
        turn: 1,
        messages,
        tools: None,
    }) = out.requests.last()
    else {
        panic!("an LLM request: {:?}", out.requests)
    };
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::System, Role::User]);
    assert_eq!(
        messages[1].content.as_deref(),
        Some("What is the weather like")
    );
    assert_eq!(phase(&d), "answering");
}

#[test]
fn llm_text_is_cut_into_sentences_synthesised_one_at_a_time() {
    let t0 = Instant::now();
    let (mut d, _) = answering("Hi", t0);
    let mut out = Output::default();
    d.on_llm_text(1, "😊 Hello there! How ", t0 + ms(100), &mut out);
    assert_eq!(tts_requests(&out), [(1, 0, "Hello there!".to_string())]);
    assert!(out.samples.contains(&(Stage::EosToFirstToken, 100_000)));
    let mut out = Output::default();
    d.on_llm_text(1, "are you? Fine.", t0 + ms(120), &mut out);
    assert!(
        tts_requests(&out).is_empty(),
        "segment 0 is still synthesised"
    );
    d.on_llm_done(1, Ok(Vec::new()), t0 + ms(130), &mut out);
    assert_eq!(phase(&d), "speaking", "the text is complete");
    assert!(tts_requests(&out).is_empty());
    let mut out = Output::default();
    d.on_tts(1, 0, Ok((pcm(2), 24_000)), t0 + ms(200), &mut out);
    d.settle(t0 + ms(200), &mut out);
    assert_eq!(kinds(&out), ["tts.sentence_start", "#", "#"]);
    assert_eq!(tts_requests(&out), [(1, 1, "How are you?".to_string())]);
    let mut out = Output::default();
    d.on_tts(1, 1, Ok((pcm(1), 24_000)), t0 + ms(300), &mut out);
    d.settle(t0 + ms(300), &mut out);
    assert_eq!(tts_requests(&out), [(1, 2, "Fine.".to_string())]);
}

#[test]
fn tts_stop_follows_the_play_out_end_plus_the_guard() {
    let t0 = Instant::now();
    let (mut d, _) = answering("Hi", t0);
    let mut out = Output::default();
    d.on_llm_text(1, "Hello!", t0 + ms(100), &mut out);
    d.on_llm_done(1, Ok(Vec::new()), t0 + ms(150), &mut out);
    // One second of speech arrives at 22.05 kHz: it is resampled to 24 kHz.
    let audio: Vec<i16> = (0..22_050)
        .map(|i| ((i as f32 * 0.05).sin() * 6000.0) as i16)
        .collect();
    let want = crate::audio::resample(&audio, 22_050, 24_000)
        .len()
        .div_ceil(1440);
    let t1 = t0 + ms(400);
    let mut out = Output::default();
    d.on_tts(1, 0, Ok((audio, 22_050)), t1, &mut out);
    d.settle(t1, &mut out);
    assert_eq!(kinds(&out)[0], "tts.sentence_start");
    assert_eq!(frames(&out), 6, "the pre-buffer goes out at once");
    let stop = run_timers(&mut d, &mut out, t1 + ms(5000));
    assert_eq!(frames(&out), want);
    assert_eq!(d.counters.frames_sent, want as u64);
    assert_eq!(kinds(&out).last().map(String::as_str), Some("tts.stop"));
    // Frames went out on time, so the device plays until t1 + frames × 60 ms.
    assert_eq!(stop, t1 + ms(60 * want as u64 + 100));
    assert_eq!(phase(&d), "none");
    assert_eq!(d.counters.turns_completed, 1);
    assert!(out.samples.contains(&(Stage::EosToFirstAudio, 400_000)));
    assert!(out.samples.iter().any(|(s, _)| *s == Stage::EosToTtsStop));
    assert_eq!(d.next_deadline(), None);
}

#[test]
fn the_turn_finishes_only_when_the_last_frame_is_sent() {
    let t0 = Instant::now();
    let (mut d, _) = answering("Hi", t0);
    let mut out = Output::default();
    d.on_llm_text(1, "Hello!", t0, &mut out);
    d.on_llm_done(1, Ok(Vec::new()), t0, &mut out);
    d.on_tts(1, 0, Ok((pcm(10), 24_000)), t0, &mut out);
    d.settle(t0, &mut out);
    assert_eq!(phase(&d), "speaking", "4 frames still queued");
    assert_eq!(d.next_deadline(), Some(t0 + ms(60)), "the next frame");
    let mut out = Output::default();
    d.on_timer(t0 + ms(240), &mut out);
    d.settle(t0 + ms(240), &mut out);
    assert_eq!(frames(&out), 4);
    assert_eq!(phase(&d), "finishing");
    assert_eq!(d.next_deadline(), Some(t0 + ms(600 + 100)));
    d.on_timer(t0 + ms(699), &mut out);
    d.settle(t0 + ms(699), &mut out);
    assert!(!kinds(&out).contains(&"tts.stop".to_string()));
    d.on_timer(t0 + ms(700), &mut out);
    d.settle(t0 + ms(700), &mut out);
    assert_eq!(kinds(&out).last().map(String::as_str), Some("tts.stop"));
}

#[test]
fn abort_mid_answer_stops_at_once_and_stale_results_are_ignored() {
    let t0 = Instant::now();
    let (mut d, _) = answering("Tell me a story", t0);
    let mut out = Output::default();
    d.on_llm_text(1, "Once upon a time! There was ", t0 + ms(100), &mut out);
    d.on_tts(1, 0, Ok((pcm(30), 24_000)), t0 + ms(200), &mut out);
    d.settle(t0 + ms(200), &mut out);
    assert_eq!(frames(&out), 6);
    let mut out = Output::default();
    d.abort(t0 + ms(300), &mut out);
    assert_eq!(kinds(&out), ["tts.stop"]);
    assert!(matches!(out.requests.as_slice(), [Request::CancelLlm]));
    assert_eq!(d.counters.turns_aborted, 1);
    assert!(!d.busy() && !d.speaking());
    assert_eq!(d.next_deadline(), None, "nothing queued survives the abort");
    // Late results of the aborted turn change nothing.
    let mut out = Output::default();
    d.on_llm_text(1, "a dragon.", t0 + ms(310), &mut out);
    d.on_llm_done(1, Ok(Vec::new()), t0 + ms(320), &mut out);
    d.on_tts(1, 1, Ok((pcm(5), 24_000)), t0 + ms(330), &mut out);
    d.settle(t0 + ms(330), &mut out);
    d.on_asr(1, Ok("again".into()), t0 + ms(340), &mut out);
    d.on_timer(t0 + ms(2000), &mut out);
    d.settle(t0 + ms(2000), &mut out);
    assert!(out.items.is_empty() && out.requests.is_empty(), "{out:?}");
    // The next turn starts with a fresh pre-buffer, and turn 1's audio is still ignored.
    d.on_utterance(vec![0; 1600], t0 + ms(400), &mut out);
    d.on_asr(2, Ok("Hi".into()), t0 + ms(450), &mut out);
    d.on_llm_text(2, "Hello!", t0 + ms(460), &mut out);
    d.on_llm_done(2, Ok(Vec::new()), t0 + ms(460), &mut out);
    let mut out = Output::default();
    d.on_tts(1, 0, Ok((pcm(5), 24_000)), t0 + ms(470), &mut out);
    d.settle(t0 + ms(470), &mut out);
    assert_eq!(frames(&out), 0);
    d.on_tts(2, 0, Ok((pcm(8), 24_000)), t0 + ms(470), &mut out);
    d.settle(t0 + ms(470), &mut out);
    assert_eq!(frames(&out), 6);
}

#[test]
fn abort_while_recognising_sends_no_tts_stop() {
    let t0 = Instant::now();
    let mut d = Dialogue::new(settings(false), "sid".into());
    let mut out = Output::default();
    d.on_utterance(vec![0; 1600], t0, &mut out);
    let mut out = Output::default();
    d.abort(t0 + ms(10), &mut out);
    assert!(out.items.is_empty(), "{out:?}");
    assert!(
        matches!(
            out.requests.as_slice(),
            [Request::CancelJobs { up_to_turn: 1 }]
        ),
        "the queued recognition is cancelled: {out:?}"
    );
    d.on_asr(1, Ok("hello".into()), t0 + ms(20), &mut out);
    assert!(out.items.is_empty(), "the stale transcript is dropped");
}

#[test]
fn asr_timeout_counts_a_failure_and_says_so() {
    let t0 = Instant::now();
    let mut d = Dialogue::new(settings(true), "sid".into());
    let mut out = Output::default();
    d.on_utterance(vec![0; 1600], t0, &mut out);
    let mut out = Output::default();
    d.on_timer(t0 + ms(4999), &mut out);
    d.settle(t0 + ms(4999), &mut out);
    assert!(out.items.is_empty());
    d.on_timer(t0 + ms(5000), &mut out);
    d.settle(t0 + ms(5000), &mut out);
    assert_eq!(kinds(&out), ["alert"]);
    assert_eq!(d.counters.asr_failures, 1);
    assert!(!d.busy());
    // The real result, arriving late, is dropped.
    let mut out = Output::default();
    d.on_asr(1, Ok("hello".into()), t0 + ms(5100), &mut out);
    assert!(out.items.is_empty());
}

#[test]
fn an_empty_transcript_ends_the_turn_silently() {
    let t0 = Instant::now();
    let mut d = Dialogue::new(settings(true), "sid".into());
    let mut out = Output::default();
    d.on_utterance(vec![0; 1600], t0, &mut out);
    let mut out = Output::default();
    d.on_asr(1, Ok(" ... ".into()), t0 + ms(50), &mut out);
    assert!(out.items.is_empty() && out.requests.is_empty());
    assert_eq!(d.counters.empty_transcripts, 1);
    assert!(!d.busy());
}

#[test]
fn tts_timeout_skips_the_segment_and_the_answer_goes_on() {
    let t0 = Instant::now();
    let (mut d, _) = answering("Hi", t0);
    let mut out = Output::default();
    d.on_llm_text(1, "First one! Second one!", t0, &mut out);
    d.on_llm_done(1, Ok(Vec::new()), t0, &mut out);
    assert_eq!(tts_requests(&out), [(1, 0, "First one!".to_string())]);
    assert_eq!(d.next_deadline(), Some(t0 + ms(5000)));
    let mut out = Output::default();
    d.on_timer(t0 + ms(5000), &mut out);
    d.settle(t0 + ms(5000), &mut out);
    assert_eq!(d.counters.tts_failures, 1);
    assert_eq!(tts_requests(&out), [(1, 1, "Second one!".to_string())]);
    // The skipped segment's audio, arriving late, is not played.
    let mut out = Output::default();
    d.on_tts(1, 0, Ok((pcm(3), 24_000)), t0 + ms(5100), &mut out);
    d.settle(t0 + ms(5100), &mut out);
    assert!(out.items.is_empty());
    d.on_tts(1, 1, Ok((pcm(3), 24_000)), t0 + ms(5200), &mut out);
    d.settle(t0 + ms(5200), &mut out);
    assert_eq!(kinds(&out), ["tts.sentence_start", "#", "#", "#"]);
    let OutItem::Text(sentence) = &out.items[0] else {
        panic!("text")
    };
    assert!(sentence.contains("Second one!"), "{sentence}");
    run_timers(&mut d, &mut out, t0 + ms(9000));
    assert_eq!(kinds(&out).last().map(String::as_str), Some("tts.stop"));
    assert_eq!(d.counters.turns_completed, 1);
}

#[test]
fn a_failed_llm_without_text_is_answered_with_an_apology() {
    let t0 = Instant::now();
    let (mut d, _) = answering("Hi", t0);
    let mut out = Output::default();
    d.on_llm_done(1, Err("connection refused".into()), t0 + ms(100), &mut out);
    assert_eq!(d.counters.llm_failures, 1);
    assert_eq!(kinds(&out), ["llm"]);
    let tts = tts_requests(&out);
    assert!(tts[0].2.starts_with("Sorry"), "{tts:?}");
    assert_eq!(phase(&d), "speaking");
}

#[test]
fn a_tool_round_waits_for_every_result_then_asks_the_llm_again() {
    let t0 = Instant::now();
    let (mut d, _) = answering("Turn it up", t0);
    let call = |id: &str| ToolCall {
        index: 0,
        id: id.into(),
        name: "self_audio_speaker_set_volume".into(),
        arguments: r#"{"volume":80}"#.into(),
    };
    let mut out = Output::default();
    d.on_llm_done(1, Ok(vec![call("a"), call("b")]), t0, &mut out);
    assert_eq!(out.calls.len(), 2);
    assert_eq!(phase(&d), "answering", "the answer waits for the tools");
    let mut out = Output::default();
    d.on_tool_result(1, "a", Ok("done".into()), t0, &mut out);
    assert!(out.requests.is_empty(), "b is still awaited");
    d.on_tool_result(1, "a", Ok("again".into()), t0, &mut out);
    d.on_tool_result(1, "b", Err("device busy".into()), t0, &mut out);
    let Some(Request::Llm { messages, .. }) = out.requests.last() else {
        panic!("asked again: {:?}", out.requests)
    };
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [
            Role::System,
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::Tool
        ]
    );
    assert_eq!(messages[3].content.as_deref(), Some("done"));
    assert_eq!(messages[4].content.as_deref(), Some("error: device busy"));
}

#[test]
fn history_keeps_the_aborted_and_the_finished_turns() {
    let t0 = Instant::now();
    let (mut d, _) = answering("First question", t0);
    let mut out = Output::default();
    d.on_llm_text(1, "Partial answer", t0, &mut out);
    d.on_utterance(vec![0; 1600], t0 + ms(100), &mut out);
    let mut out = Output::default();
    d.on_asr(2, Ok("Second question".into()), t0 + ms(200), &mut out);
    let Some(Request::Llm { messages, .. }) = out.requests.last() else {
        panic!("an LLM request")
    };
    let texts: Vec<&str> = messages
        .iter()
        .filter_map(|m| m.content.as_deref())
        .collect();
    assert_eq!(
        texts,
        [
            "Be brief.",
            "First question",
            "Partial answer",
            "Second question"
        ]
    );
}

#[test]
fn a_long_echo_of_digits_is_synthesised_in_bounded_segments() {
    use crate::pipeline::sentences::segment_weight;
    let t0 = Instant::now();
    let mut d = Dialogue::new(settings(true), "sid".into());
    let mut out = Output::default();
    let said = "999999999999999 ".repeat(6);
    d.on_text_turn(&said, t0, &mut out);
    let mut texts = Vec::new();
    for step in 0..100u64 {
        let Some((turn, seq, text)) = tts_requests(&out).pop() else {
            break;
        };
        texts.push(text);
        out = Output::default();
        d.on_tts(turn, seq, Ok((pcm(1), 24_000)), t0 + ms(step), &mut out);
        d.settle(t0 + ms(step), &mut out);
    }
    assert!(texts.len() > 1, "{texts:?}");
    for text in &texts {
        assert!(segment_weight(text) <= 100, "{text:?}");
    }
    let spoken: String = texts
        .concat()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    assert_eq!(spoken.len(), 90, "every digit of the echo is spoken once");
}

#[test]
fn history_is_bounded_by_bytes_dropping_the_oldest_first() {
    let t0 = Instant::now();
    let mut d = Dialogue::new(settings(false), "sid".into());
    let mut turn = 0;
    let mut ask = |d: &mut Dialogue, text: &str, answer: &str| {
        turn += 1;
        let mut out = Output::default();
        d.on_text_turn(text, t0, &mut out);
        d.on_llm_text(turn, answer, t0, &mut out);
        d.abort(t0, &mut out);
    };
    ask(&mut d, &"a".repeat(300), "ok one");
    ask(&mut d, &"b".repeat(300), "ok two");
    ask(&mut d, "short", "ok three");
    let texts: Vec<String> = d.history.iter().filter_map(|m| m.content.clone()).collect();
    assert_eq!(texts.len(), 6, "within both bounds: {texts:?}");
    ask(&mut d, &"c".repeat(500), "ok four");
    let texts: Vec<String> = d.history.iter().filter_map(|m| m.content.clone()).collect();
    let bytes: usize = texts.iter().map(String::len).sum();
    assert!(bytes <= 1000, "{bytes}");
    assert_eq!(
        texts.iter().map(|t| &t[..1]).collect::<Vec<_>>(),
        ["o", "b", "o", "s", "o", "c", "o"],
        "the oldest message went first, until the text fits"
    );
    ask(&mut d, &"d".repeat(2000), "ok five");
    assert!(
        d.history
            .iter()
            .all(|m| m.content.as_deref().is_some_and(|c| c.len() < 2000)),
        "a message larger than the bound is not kept"
    );
    let bytes: usize = d
        .history
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(String::len)
        .sum();
    assert!(bytes <= 1000, "{bytes}");
}

#[test]
fn a_turn_flood_keeps_at_most_the_quota_outstanding_and_cancels_stale_jobs() {
    let t0 = Instant::now();
    let mut d = Dialogue::new(settings(true), "sid".into());
    let cancels = |out: &Output| -> Vec<u32> {
        out.requests
            .iter()
            .filter_map(|r| match r {
                Request::CancelJobs { up_to_turn } => Some(*up_to_turn),
                _ => None,
            })
            .collect()
    };
    let mut out = Output::default();
    d.on_text_turn("the first long question", t0, &mut out);
    assert_eq!(tts_requests(&out).len(), 1);
    let mut out = Output::default();
    d.on_text_turn("the second long question", t0 + ms(20), &mut out);
    assert_eq!(cancels(&out), [1], "turn 1's job is cancelled");
    assert_eq!(
        tts_requests(&out).len(),
        1,
        "the quota has room for one more"
    );
    let mut out = Output::default();
    d.on_text_turn("the third long question", t0 + ms(40), &mut out);
    assert_eq!(cancels(&out), [2]);
    assert!(tts_requests(&out).is_empty(), "turn 3 waits for the quota");
    assert_eq!(d.counters.jobs_held, 1);
    // Turn 2's job was skipped by the worker: its "cancelled" answer frees the slot.
    let mut out = Output::default();
    d.on_tts(2, 0, Err("cancelled".into()), t0 + ms(50), &mut out);
    d.settle(t0 + ms(50), &mut out);
    assert!(matches!(&tts_requests(&out)[..], [(3, 0, _)]), "{out:?}");
    assert_eq!(d.counters.tts_failures, 0, "a stale answer is no failure");
    // Turn 1's job ran anyway; its audio is dropped and turn 3 keeps one job in flight.
    let mut out = Output::default();
    d.on_tts(1, 0, Ok((pcm(5), 24_000)), t0 + ms(60), &mut out);
    d.settle(t0 + ms(60), &mut out);
    assert!(
        tts_requests(&out).is_empty() && frames(&out) == 0,
        "{out:?}"
    );
}

#[test]
fn a_held_utterance_is_recognised_when_the_quota_frees() {
    let t0 = Instant::now();
    let mut d = Dialogue::new(settings(false), "sid".into());
    let asr = |out: &Output| -> Vec<u32> {
        out.requests
            .iter()
            .filter_map(|r| match r {
                Request::Asr { turn, .. } => Some(*turn),
                _ => None,
            })
            .collect()
    };
    let mut out = Output::default();
    for i in 0..3 {
        d.on_utterance(vec![0; 1600], t0 + ms(i * 10), &mut out);
    }
    assert_eq!(asr(&out), [1, 2], "two recognitions at most");
    assert_eq!(d.counters.jobs_held, 1);
    let mut out = Output::default();
    d.on_asr(1, Err("cancelled".into()), t0 + ms(50), &mut out);
    assert_eq!(
        asr(&out),
        [3],
        "turn 3's utterance goes out once a slot frees"
    );
    assert!(out.items.is_empty(), "no alert for a stale turn: {out:?}");
}
