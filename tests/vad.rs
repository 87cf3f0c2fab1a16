//! Server VAD on real speech: espeak-ng utterances streamed as Opus over a real WebSocket
//! client, segmented by the server (Silero on the inference core), compared with the same
//! model and segmenter run offline in this process.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;
use xiaozhi_tpc::audio::Chunker;
use xiaozhi_tpc::pipeline::segmenter::{Event, Mode, Segmenter, SegmenterConfig};
use xiaozhi_tpc::providers::vad::{SileroModel, VadStream};

const EN: &str = "Turn on the kitchen lights, and set a timer for ten minutes please.";
const ZH: &str = "ni3 hao3, jin1 tian1 tian1 qi4 zen3 me yang4? wo3 xiang3 ting1 yin1 yue4.";

/// (start_ms, end_ms) of each utterance, as the server reports it.
type Segments = Vec<(u64, u64)>;

fn offline_segments(frames: &[Vec<u8>]) -> Segments {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut model = SileroModel::load(
        &root.join("models/onnxruntime/libonnxruntime.so.1.31.1"),
        &root.join("models/silero_vad.onnx"),
    )
    .expect("model (run `make test`, which installs it)");
    let pcm = decode_frames(frames);
    let mut stream = VadStream::default();
    let mut seg = Segmenter::new(SegmenterConfig::default(), Mode::Auto);
    let mut chunker = Chunker::default();
    let mut events = Vec::new();
    let mut probs = Vec::new();
    chunker.push(&pcm, |_, chunk| {
        let mut f = [0f32; 512];
        for (o, s) in f.iter_mut().zip(chunk.iter()) {
            *o = f32::from(*s) / 32768.0;
        }
        probs.clear();
        model
            .infer_batch(&mut [(&f, &mut stream)], &mut probs)
            .expect("inference");
        seg.push(probs[0], chunk, &mut events);
    });
    events
        .iter()
        .filter_map(|e| match e {
            Event::Utterance(u) => Some((u.start_ms, u.end_ms)),
            _ => None,
        })
        .collect()
}

/// Streams `frames` after `listen start` and collects the server's `vad` end events.
fn server_segments(
    server: &Server,
    device: &str,
    frames: &[Vec<u8>],
    pace: Option<Duration>,
    expect: usize,
) -> Segments {
    let mut ws = listening_device(&server.ws_url("/xiaozhi/v1/"), device, "auto");
    let t0 = Instant::now();
    for (i, f) in frames.iter().enumerate() {
        ws.send(Message::binary(f.clone())).expect("audio");
        if let Some(p) = pace {
            // Real-time pacing against an absolute schedule, as a device's audio clock does.
            let due = t0 + p * (i as u32 + 1);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let mut segments = Vec::new();
    while segments.len() < expect {
        let v = next_json(&mut ws);
        if v["type"] == "vad" && v["state"] == "end" {
            segments.push((
                v["start_ms"].as_u64().expect("start_ms"),
                v["end_ms"].as_u64().expect("end_ms"),
            ));
        }
    }
    segments
}

fn assert_within_one_chunk(server: &Segments, offline: &Segments, what: &str) {
    assert_eq!(
        server.len(),
        offline.len(),
        "{what}: server {server:?} vs offline {offline:?}"
    );
    for (s, o) in server.iter().zip(offline) {
        assert!(
            s.0.abs_diff(o.0) <= 32 && s.1.abs_diff(o.1) <= 32,
            "{what}: server {s:?} vs offline {o:?} differ by more than one 32 ms chunk"
        );
    }
}

#[test]
fn english_speech_is_segmented_like_the_offline_model_in_real_time() {
    let frames = opus_frames(&speech_16k(EN, "en-us", 1.0));
    let offline = offline_segments(&frames);
    // The input is what we think it is: speech from about 1 s. How many utterances the model
    // cuts it into is the model's business; the server must cut it the same way.
    assert!(
        !offline.is_empty() && offline[0].0 >= 800 && offline[0].0 <= 1200,
        "speech starts near 1 s: {offline:?}"
    );
    let server = Server::start(&["session.vad_events=true"]);
    let got = server_segments(
        &server,
        "aa:bb:cc:00:00:01",
        &frames,
        Some(Duration::from_millis(60)),
        offline.len(),
    );
    assert_within_one_chunk(&got, &offline, "real-time English");
}

/// Sockets read as data arrives (`server.socket_sweep_ms=0`) instead of in sweeps (the
/// default): when frames are read and when VAD batches go changes, never how the audio is cut.
#[test]
fn segmentation_is_the_same_when_device_sockets_are_read_per_arrival() {
    let frames = opus_frames(&speech_16k(EN, "en-us", 1.0));
    let offline = offline_segments(&frames);
    let server = Server::start(&["session.vad_events=true", "server.socket_sweep_ms=0"]);
    let paced = server_segments(
        &server,
        "aa:bb:cc:00:00:11",
        &frames,
        Some(Duration::from_millis(60)),
        offline.len(),
    );
    let burst = server_segments(&server, "aa:bb:cc:00:00:12", &frames, None, offline.len());
    assert_within_one_chunk(&paced, &offline, "paced, sockets read per arrival");
    assert_eq!(paced, burst, "same audio, same segmentation, swept or not");
}

#[test]
fn mandarin_speech_is_segmented_like_the_offline_model() {
    let frames = opus_frames(&speech_16k(ZH, "cmn-latn-pinyin", 1.0));
    let offline = offline_segments(&frames);
    assert!(!offline.is_empty(), "Mandarin speech found offline");
    let server = Server::start(&["session.vad_events=true"]);
    let got = server_segments(
        &server,
        "aa:bb:cc:00:00:02",
        &frames,
        Some(Duration::from_millis(60)),
        offline.len(),
    );
    assert_within_one_chunk(&got, &offline, "Mandarin");
}

#[test]
fn segmentation_is_the_same_with_a_loaded_inference_core_and_bursty_audio() {
    let frames = opus_frames(&speech_16k(EN, "en-us", 1.0));
    let offline = offline_segments(&frames);
    let server = Server::start(&[
        "session.vad_events=true",
        "runtime.shard_cores=[0]",
        "runtime.inference_cores=[1]",
    ]);
    // Load the inference core with busy threads for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                core_affinity::set_for_current(core_affinity::CoreId { id: 1 });
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let paced = server_segments(
        &server,
        "aa:bb:cc:00:00:03",
        &frames,
        Some(Duration::from_millis(60)),
        offline.len(),
    );
    // All audio at once: wall-clock timing is nothing like the audio's; segmentation must not change.
    let burst = server_segments(&server, "aa:bb:cc:00:00:04", &frames, None, offline.len());
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().expect("hog");
    }
    assert_within_one_chunk(&paced, &offline, "paced, loaded inference core");
    assert_within_one_chunk(&burst, &offline, "burst, loaded inference core");
    assert_eq!(
        paced, burst,
        "same audio, same segmentation, whatever the timing"
    );
}

#[test]
fn abort_discards_the_speech_in_progress() {
    let speech = opus_frames(&speech_16k(EN, "en-us", 1.0));
    let server = Server::start(&["session.vad_events=true"]);
    let mut ws = listening_device(&server.ws_url("/"), "aa:bb:cc:00:00:05", "auto");
    // The first 2 s: silence then the start of speech; then the device aborts.
    for f in &speech[..34] {
        ws.send(Message::binary(f.clone())).expect("audio");
    }
    ws.send(Message::text(r#"{"type":"abort"}"#))
        .expect("abort");
    ws.send(Message::text(
        r#"{"type":"listen","state":"start","mode":"auto"}"#,
    ))
    .expect("listen");
    for f in &speech {
        ws.send(Message::binary(f.clone())).expect("audio");
    }
    let offline = offline_segments(&speech);
    let mut ends = Vec::new();
    while ends.len() < offline.len() {
        let v = next_json(&mut ws);
        if v["type"] == "vad" && v["state"] == "end" {
            ends.push((
                v["start_ms"].as_u64().unwrap_or(0),
                v["end_ms"].as_u64().unwrap_or(0),
            ));
        }
    }
    // Only the complete second stream is segmented, timed from its own listen start.
    assert_within_one_chunk(&ends, &offline, "after abort");
}

#[test]
fn garbage_opus_is_counted_and_skipped() {
    let speech = opus_frames(&speech_16k(EN, "en-us", 1.0));
    // The garbage packet is skipped, so the server hears exactly the speech.
    let expected = offline_segments(&speech).len();
    let server = Server::start(&["session.vad_events=true"]);
    let mut ws = listening_device(&server.ws_url("/"), "aa:bb:cc:00:00:06", "auto");
    for (i, f) in speech.iter().enumerate() {
        if i == 5 {
            ws.send(Message::binary(vec![0xff; 40])).expect("garbage");
        }
        ws.send(Message::binary(f.clone())).expect("audio");
    }
    let mut ends = 0;
    while ends < expected {
        let v = next_json(&mut ws);
        if v["type"] == "vad" && v["state"] == "end" {
            ends += 1;
        }
    }
    ws.close(None).expect("close");
    let _ = expect_close(&mut ws);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("xiaozhi_opus_garbage_total") != 1 {
        assert!(Instant::now() < deadline, "garbage packet not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.metric("xiaozhi_utterances_total"), expected as u64);
}

#[test]
fn manual_mode_ends_on_listen_stop_or_after_a_long_silence() {
    let speech = opus_frames(&speech_16k(EN, "en-us", 0.3));
    let server = Server::start(&["session.vad_events=true", "vad.manual_max_silence_ms=1500"]);
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:bb:cc:00:00:07", "1"),
    );
    hello(&mut ws, HELLO);
    // Push-to-talk: the key is released (listen stop) right after the speech.
    ws.send(Message::text(
        r#"{"type":"listen","state":"start","mode":"manual"}"#,
    ))
    .expect("listen");
    for f in &speech {
        ws.send(Message::binary(f.clone())).expect("audio");
    }
    ws.send(Message::text(r#"{"type":"listen","state":"stop"}"#))
        .expect("stop");
    let end = loop {
        let v = next_json(&mut ws);
        if v["type"] == "vad" && v["state"] == "end" {
            break v;
        }
    };
    let total_ms = speech.len() as u64 * 60;
    assert!(
        end["end_ms"].as_u64().unwrap_or(0) + 200 >= total_ms - 300,
        "manual keeps everything up to stop: {end}"
    );

    // A client that never sends stop: a long silence ends the turn anyway.
    ws.send(Message::text(
        r#"{"type":"listen","state":"start","mode":"manual"}"#,
    ))
    .expect("listen");
    let silence = opus_frames(&vec![0i16; 16_000 * 3]);
    for f in speech.iter().chain(&silence) {
        ws.send(Message::binary(f.clone())).expect("audio");
    }
    loop {
        let v = next_json(&mut ws);
        if v["type"] == "vad" && v["state"] == "end" {
            break;
        }
    }
}

#[test]
fn manual_mode_ends_when_a_client_stops_sending_audio_without_listen_stop() {
    // A load tester's pattern: push-to-talk speech, then no more frames and no `listen stop`.
    // No audio means no audio time passes, so only the wall-clock gap can end the turn.
    let speech = opus_frames(&speech_16k(EN, "en-us", 0.3));
    let server = Server::start(&[
        "session.vad_events=true",
        "session.manual_audio_gap_ms=1000",
        "tts.provider=\"espeak\"",
    ]);
    let mut ws = listening_device(&server.ws_url("/"), "aa:bb:cc:00:00:08", "manual");
    send_paced(&mut ws, &speech, Instant::now());
    let mut seen = Vec::new();
    let stt = loop {
        let v = next_json(&mut ws);
        seen.push(v["type"].as_str().unwrap_or("").to_string());
        if v["type"] == "stt" {
            break v;
        }
    };
    assert!(
        seen.iter().any(|t| t == "vad"),
        "the utterance was segmented: {seen:?}"
    );
    assert!(
        stt["text"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .contains("kitchen"),
        "the speech was recognised: {stt}"
    );
    // Session counters are added to /metrics when the session ends.
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("xiaozhi_manual_gap_ends_total") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.metric("xiaozhi_manual_gap_ends_total"), 1);
}
