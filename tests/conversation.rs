//! Whole conversations over a real WebSocket client: speech in, `stt`, `tts start`, `llm`,
//! `sentence_start`, decodable 24 kHz Opus, `tts stop` out — with the local providers, with
//! remote OpenAI-compatible providers served by a real HTTP server on loopback (including slow
//! and failing ones), with barge-in, and with the third-party client `xiaozhi-sdk`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;
use xiaozhi_bench::mock_upstream::{self, MockSettings};
use xiaozhi_tpc::audio::resample;
use xiaozhi_tpc::providers::asr::{ChineseScript, WhisperSettings, WhisperWorker};
use xiaozhi_tpc::providers::tts::{KokoroSettings, TtsEngine, TtsWorker};

/// What a device saw during one turn.
#[derive(Debug, Default)]
struct Turn {
    /// Text messages in order, with the number of audio frames received before each.
    texts: Vec<(usize, serde_json::Value)>,
    /// Audio frames (raw Opus for protocol v1).
    frames: Vec<Vec<u8>>,
}

impl Turn {
    fn kinds(&self) -> Vec<String> {
        self.texts
            .iter()
            .map(|(_, v)| match v["state"].as_str() {
                Some(state) if v["type"] == "tts" => format!("tts.{state}"),
                _ => v["type"].as_str().unwrap_or("?").to_string(),
            })
            .filter(|k| k != "vad")
            .collect()
    }

    fn first(&self, kind: &str) -> Option<&serde_json::Value> {
        self.texts.iter().map(|(_, v)| v).find(|v| {
            v["type"] == kind
                || (v["type"] == "tts"
                    && format!("tts.{}", v["state"].as_str().unwrap_or("")) == kind)
        })
    }

    fn sentences(&self) -> Vec<String> {
        self.texts
            .iter()
            .filter(|(_, v)| v["type"] == "tts" && v["state"] == "sentence_start")
            .map(|(_, v)| v["text"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Decodes every frame at `rate`; returns samples per frame.
    fn decode(&self, rate: u32) -> Vec<usize> {
        let mut dec = opus::Decoder::new(rate, opus::Channels::Mono).expect("decoder");
        let mut buf = vec![0i16; rate as usize / 10];
        self.frames
            .iter()
            .map(|f| {
                dec.decode(f, &mut buf, false)
                    .expect("server audio decodes")
            })
            .collect()
    }
}

/// Sends `frames` in real time after `listen start`, then silence, and records everything
/// until `tts stop` (or `limit`).
fn speak(ws: &mut Ws, frames: &[Vec<u8>], limit: Duration) -> Turn {
    ws.send(Message::text(
        r#"{"type":"listen","state":"start","mode":"auto"}"#,
    ))
    .expect("listen");
    let silence = opus_frames(&vec![0i16; 960]).remove(0);
    let t0 = Instant::now();
    send_paced(ws, frames, t0);
    collect_until_stop(ws, Some(silence), t0, frames.len(), limit)
}

/// The turn has the expected message shape and its first sentence starts with `prefix`.
fn assert_answer_starts_with(turn: &Turn, prefix: &str) {
    assert_turn_shape(turn);
    assert!(
        turn.sentences()[0].starts_with(prefix),
        "{:?}",
        turn.sentences()
    );
}

/// Reads until `tts stop`; while no answer has started, keeps sending `silence` frames in real
/// time (as a device in auto mode keeps its microphone open).
fn collect_until_stop(
    ws: &mut Ws,
    silence: Option<Vec<u8>>,
    t0: Instant,
    mut sent: usize,
    limit: Duration,
) -> Turn {
    let mut turn = Turn::default();
    let deadline = Instant::now() + limit;
    set_timeout(ws, Duration::from_millis(20));
    loop {
        assert!(
            Instant::now() < deadline,
            "no tts stop within {limit:?}; got {:?}",
            turn.kinds()
        );
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                let stop = v["type"] == "tts" && v["state"] == "stop";
                turn.texts.push((turn.frames.len(), v));
                if stop {
                    break;
                }
            }
            Ok(Message::Binary(b)) => turn.frames.push(b.to_vec()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("connection failed: {e}"),
        }
        if let Some(s) = &silence {
            if turn.first("stt").is_none()
                && turn.first("alert").is_none()
                && Instant::now() >= t0 + Duration::from_millis(60) * sent as u32
            {
                ws.send(Message::binary(s.clone())).expect("silence");
                sent += 1;
            }
        }
    }
    set_timeout(ws, Duration::from_secs(10));
    turn
}

/// The message order the firmware relies on, and audio only inside tts start … stop.
fn assert_turn_shape(turn: &Turn) {
    let kinds = turn.kinds();
    let pos = |k: &str| {
        kinds
            .iter()
            .position(|x| x == k)
            .unwrap_or_else(|| panic!("no {k} in {kinds:?}"))
    };
    assert!(pos("stt") < pos("tts.start"), "{kinds:?}");
    assert!(pos("tts.start") < pos("llm"), "{kinds:?}");
    assert!(pos("llm") < pos("tts.sentence_start"), "{kinds:?}");
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("tts.stop"),
        "{kinds:?}"
    );
    let start_at = turn
        .texts
        .iter()
        .find(|(_, v)| v["type"] == "tts" && v["state"] == "start")
        .map(|(n, _)| *n);
    assert_eq!(start_at, Some(0), "no audio before tts start");
    let first_sentence_at = turn
        .texts
        .iter()
        .find(|(_, v)| v["state"] == "sentence_start")
        .map(|(n, _)| *n);
    assert_eq!(
        first_sentence_at,
        Some(0),
        "the first sentence_start precedes its audio"
    );
    assert!(!turn.frames.is_empty(), "audio was sent");
}

#[test]
fn local_providers_answer_a_spoken_question_with_paced_24khz_audio() {
    let frames = opus_frames(&speech_16k("What time is it now?", "en-us", 0.8));
    let server = Server::start(&["session.vad_events=true"]);
    let mut ws = connect(
        &server.ws_url("/xiaozhi/v1/"),
        &device_headers("aa:cc:00:00:00:01", "1"),
    );
    let hello = hello(&mut ws, HELLO);
    assert_eq!(hello["audio_params"]["sample_rate"], 24000);
    let started = Instant::now();
    let turn = speak(&mut ws, &frames, Duration::from_secs(60));
    let stt = turn.first("stt").expect("stt")["text"]
        .as_str()
        .unwrap_or("")
        .to_lowercase();
    assert!(stt.contains("time"), "transcript {stt:?}");
    assert_turn_shape(&turn);
    let samples = turn.decode(24_000);
    assert!(
        samples.iter().all(|&n| n == 1440),
        "every frame is 60 ms at 24 kHz"
    );
    let reply = turn.sentences().join(" ");
    assert!(
        reply.contains(':') || reply.to_lowercase().contains("it's"),
        "the offline responder tells the time: {reply}"
    );
    // Paced in real time: the turn cannot finish faster than its audio plays.
    let audio = Duration::from_millis(60) * turn.frames.len() as u32;
    assert!(
        started.elapsed() >= audio,
        "{:?} of audio arrived in {:?}",
        audio,
        started.elapsed()
    );
}

/// The models folder and the ONNX Runtime library the set-up installed (`make test` exports
/// both paths; the defaults are the set-up's own).
fn models_and_runtime() -> (PathBuf, PathBuf) {
    let models = std::env::var_os("XIAOZHI_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let lib = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| models.join("onnxruntime/libonnxruntime.so.1.31.1"));
    (models, lib)
}

#[test]
fn mandarin_question_gets_a_mandarin_answer_in_the_kokoro_voice_heard_back_by_whisper() {
    let (models, lib) = models_and_runtime();
    // The question, in a Kokoro voice the server does not answer with.
    let asker = "zm_yunxi";
    let mut tts = TtsWorker::load(
        &lib,
        None,
        Some(&KokoroSettings {
            dir: models.join("kokoro"),
            voices: vec![asker.into()],
            speed: 1.0,
        }),
    )
    .expect("Kokoro loads (scripts/setup.sh kokoro; `make test` installs it)");
    let (pcm, rate) = tts
        .synthesize(
            "你好，今天过得怎么样？",
            &TtsEngine::Kokoro {
                voice: asker.into(),
            },
        )
        .expect("the question is synthesised");
    let pad = vec![0i16; 12_800];
    let question: Vec<i16> = pad
        .iter()
        .chain(&resample(&pcm, rate, 16_000))
        .chain(&pad)
        .copied()
        .collect();
    let frames = opus_frames(&question);

    // Generous model timeouts: Kokoro costs about a core-second per second of speech, and the
    // tests share two cores; this test is about the language, not about timeouts.
    let server = Server::start(&[
        "language=\"zh\"",
        "tts.timeout_ms=60000",
        "asr.timeout_ms=60000",
    ]);
    assert!(
        server
            .log_text()
            .contains("kokoro_zh: Some(\"zf_xiaoxiao\")"),
        "language zh answers in Kokoro's Mandarin voice:\n{}",
        server.log_text()
    );
    let mut ws = connect(
        &server.ws_url("/xiaozhi/v1/"),
        &device_headers("aa:cc:00:00:00:86", "1"),
    );
    hello(&mut ws, HELLO);
    let turn = speak(&mut ws, &frames, Duration::from_secs(120));
    let stt = turn.first("stt").expect("stt")["text"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        stt.contains("你好") && stt.contains("怎么样"),
        "the question is transcribed in (simplified) Chinese characters: {stt:?}"
    );
    assert_turn_shape(&turn);
    let reply = turn.sentences().join("");
    // A fixed answer (the time would change the words from run to run).
    assert_eq!(
        reply, "你好！我可以告诉你现在的时间和日期。",
        "the offline responder greets in Chinese"
    );

    // Round trip: what the device would play, transcribed by the multilingual Whisper.
    let mut dec = opus::Decoder::new(24_000, opus::Channels::Mono).expect("decoder");
    let mut buf = vec![0i16; 2_880];
    let mut played = Vec::new();
    for f in &turn.frames {
        let n = dec
            .decode(f, &mut buf, false)
            .expect("server audio decodes");
        played.extend_from_slice(&buf[..n]);
    }
    let mut whisper = WhisperWorker::load(&WhisperSettings {
        model_dir: models.join("whisper-base"),
        language: Some("zh".into()),
        int8: true,
        core: 0,
        beam_size: 5,
        window_ms: 10_000,
        chinese_script: ChineseScript::Simplified,
    })
    .expect("Whisper base loads (scripts/setup.sh asr-base)");
    let heard = whisper
        .transcribe(&resample(&played, 24_000, 16_000))
        .expect("transcription")
        .text;
    assert!(
        heard.contains("时间") && heard.contains("日期"),
        "the spoken reply {reply:?} was heard back as {heard:?}"
    );
}

#[test]
fn espeak_provider_sends_exactly_the_synthesized_audio() {
    let frames = opus_frames(&speech_16k("Who are you?", "en-us", 0.8));
    let server = Server::start(&["tts.provider=\"espeak\""]);
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:cc:00:00:00:02", "1"),
    );
    hello(&mut ws, HELLO);
    let turn = speak(&mut ws, &frames, Duration::from_secs(60));
    assert_turn_shape(&turn);
    // The same library synthesises each sentence here; its output length varies a little from
    // call to call, so allow 15 %.
    let expected: f64 = turn
        .sentences()
        .iter()
        .map(|s| {
            use xiaozhi_tpc::providers::tts::espeak;
            let pcm = espeak::synthesize("en-us", s).expect("espeak");
            (pcm.len() as f64 / f64::from(espeak::sample_rate().expect("espeak rate")) / 0.06)
                .ceil()
        })
        .sum();
    let got = turn.frames.len() as f64;
    assert!(
        (got - expected).abs() <= expected * 0.15 + turn.sentences().len() as f64,
        "{got} frames for {expected} expected ({:?})",
        turn.sentences()
    );
}

fn remote_server(mock: &mock_upstream::MockHandle, extra: &[&str]) -> Server {
    let mut sets = remote_provider_sets(&mock.base_url());
    sets.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    Server::start(&refs)
}

#[test]
fn remote_openai_compatible_providers_answer_through_a_real_http_server() {
    let server = remote_conversation(&[]);
    // By default the device's frames come through the shard's socket sweep.
    assert!(server.metric("xiaozhi_socket_sweep_wakes_total") > 30);
}

/// The same turn with the device socket read as its data arrives (`server.socket_sweep_ms=0`,
/// glommio's io_uring socket): the same transcript, sentences and frames.
#[test]
fn a_turn_over_sockets_read_per_arrival_is_heard_and_answered_the_same() {
    let server = remote_conversation(&["server.socket_sweep_ms=0"]);
    assert_eq!(server.metric("xiaozhi_socket_sweeps_total"), 0);
}

/// One remote turn over protocol v2, checked end to end; the server, for its metrics.
fn remote_conversation(extra: &[&str]) -> Server {
    let mock = mock_upstream::serve(MockSettings {
        asr_text: "What is the weather like today?".into(),
        llm_reply: "It is sunny today. Enjoy the walk!".into(),
        tts_audio: Duration::from_millis(400),
        ..MockSettings::default()
    })
    .expect("mock upstream");
    let server = remote_server(&mock, extra);
    let frames = opus_frames(&speech_16k("What is the weather like today?", "en-us", 0.8));
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:cc:00:00:00:03", "2"),
    );
    hello(&mut ws, &HELLO.replace("\"version\":1", "\"version\":2"));
    let frames_v2: Vec<Vec<u8>> = frames.iter().map(|f| v2(f)).collect();
    let turn = speak(&mut ws, &frames_v2, Duration::from_secs(30));
    // The transcript is shown without its trailing punctuation, as the reference does.
    assert_eq!(
        turn.first("stt").expect("stt")["text"],
        "What is the weather like today"
    );
    assert_turn_shape(&turn);
    assert_eq!(
        turn.sentences(),
        vec!["It is sunny today.", "Enjoy the walk!"]
    );
    // Protocol v2 downlink: a 16-byte header with the payload size.
    let payloads: Vec<Vec<u8>> = turn
        .frames
        .iter()
        .map(|f| {
            assert_eq!(&f[..2], &[0, 2], "v2 header");
            let size = u32::from_be_bytes([f[12], f[13], f[14], f[15]]) as usize;
            assert_eq!(size, f.len() - 16);
            f[16..].to_vec()
        })
        .collect();
    // 400 ms per sentence = 7 frames of 60 ms each (the last one padded).
    assert_eq!(payloads.len(), 14, "two 400 ms sentences");
    let decoded = Turn {
        texts: vec![],
        frames: payloads,
    }
    .decode(24_000);
    assert!(decoded.iter().all(|&n| n == 1440));
    // Keep-alive: a turn's four requests (ASR, LLM, two TTS) need at most two connections
    // (TTS runs while the LLM stream still holds one).
    assert!(mock.stats().connections <= 2, "{:?}", mock.stats());
    server
}

fn v2(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn a_slow_llm_times_out_into_a_spoken_apology_and_the_session_carries_on() {
    let mock = mock_upstream::serve(MockSettings {
        llm_first_token: Duration::from_secs(5),
        ..MockSettings::default()
    })
    .expect("mock upstream");
    let server = remote_server(&mock, &["llm.openai.first_token_timeout_ms=400"]);
    let frames = opus_frames(&speech_16k("What is the weather like?", "en-us", 0.8));
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:cc:00:00:00:04", "1"),
    );
    hello(&mut ws, HELLO);
    let turn = speak(&mut ws, &frames, Duration::from_secs(30));
    assert_answer_starts_with(&turn, "Sorry");
    // The upstream recovers: the next turn is answered normally.
    mock.update(|s| s.llm_first_token = Duration::from_millis(50));
    let turn = speak(&mut ws, &frames, Duration::from_secs(30));
    assert_answer_starts_with(&turn, "It is sunny");
}

#[test]
fn a_failing_upstream_gives_an_alert_or_an_apology_never_a_stuck_session() {
    let mock = mock_upstream::serve(MockSettings {
        fail_status: Some(500),
        ..MockSettings::default()
    })
    .expect("mock upstream");
    let server = remote_server(&mock, &[]);
    let frames = opus_frames(&speech_16k("What is the weather like?", "en-us", 0.8));
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:cc:00:00:00:05", "1"),
    );
    hello(&mut ws, HELLO);
    // ASR fails: an alert, no stt, and the device keeps listening.
    ws.send(Message::text(
        r#"{"type":"listen","state":"start","mode":"auto"}"#,
    ))
    .expect("listen");
    let t0 = Instant::now();
    send_paced(&mut ws, &frames, t0);
    let silence = opus_frames(&vec![0i16; 960]).remove(0);
    let alert = loop {
        ws.send(Message::binary(silence.clone())).expect("silence");
        set_timeout(&ws, Duration::from_millis(60));
        if let Ok(Message::Text(t)) = ws.read() {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
            if v["type"] == "alert" {
                break v;
            }
            assert_ne!(v["type"], "stt", "no transcript from a failed recognition");
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no alert");
    };
    assert_eq!(alert["status"], "error");
    // Transcription works again but the LLM fails: a spoken apology (TTS works).
    mock.update(|s| s.fail_status = None);
    let server2 = remote_server(&mock, &["llm.openai.base_url=\"http://127.0.0.1:9/v1\""]);
    let mut ws = connect(
        &server2.ws_url("/"),
        &device_headers("aa:cc:00:00:00:06", "1"),
    );
    hello(&mut ws, HELLO);
    let turn = speak(&mut ws, &frames, Duration::from_secs(30));
    assert_answer_starts_with(&turn, "Sorry");
}

#[test]
fn abort_mid_answer_stops_promptly_and_no_audio_follows_tts_stop() {
    let mock = mock_upstream::serve(MockSettings {
        llm_reply: "This is a long answer. It has several sentences. Each one takes a while to say. The end is far away.".into(),
        tts_audio: Duration::from_millis(3000),
        ..MockSettings::default()
    })
    .expect("mock upstream");
    let server = remote_server(&mock, &[]);
    let frames = opus_frames(&speech_16k("Tell me a story.", "en-us", 0.8));
    let mut ws = listening_device(&server.ws_url("/"), "aa:cc:00:00:00:07", "auto");
    let t0 = Instant::now();
    send_paced(&mut ws, &frames, t0);
    let silence = opus_frames(&vec![0i16; 960]).remove(0);
    // Wait for the answer's audio to start, then barge in.
    let mut audio_before = 0;
    set_timeout(&ws, Duration::from_millis(60));
    while audio_before < 8 {
        match ws.read() {
            Ok(Message::Binary(_)) => audio_before += 1,
            Ok(_) => {}
            Err(_) => {
                ws.send(Message::binary(silence.clone())).expect("silence");
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "answer audio never started"
        );
    }
    let aborted = Instant::now();
    ws.send(Message::text(
        r#"{"type":"abort","reason":"wake_word_detected"}"#,
    ))
    .expect("abort");
    set_timeout(&ws, Duration::from_secs(5));
    loop {
        if let Message::Text(t) = ws.read().expect("read") {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
            if v["type"] == "tts" && v["state"] == "stop" {
                break;
            }
        }
    }
    assert!(
        aborted.elapsed() < Duration::from_millis(500),
        "tts stop took {:?}",
        aborted.elapsed()
    );
    // Nothing of the aborted answer after tts stop.
    set_timeout(&ws, Duration::from_millis(1500));
    let mut after = Vec::new();
    while let Ok(msg) = ws.read() {
        after.push(msg);
    }
    assert!(
        !after.iter().any(|m| matches!(m, Message::Binary(_))),
        "audio after tts stop: {} frames",
        after.len()
    );
}

#[test]
fn xiaozhi_sdk_holds_a_conversation_and_records_the_reply() {
    assert_sdk_installed();
    let server = Server::start(&[]);
    let pcm = speech_16k("Hello, who are you?", "en-us", 0.5);
    let dir = std::env::temp_dir().join(format!("xz-sdk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let wav = dir.join("question.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&wav, spec).expect("wav");
    for s in &pcm {
        w.write_sample(*s).expect("sample");
    }
    w.finalize().expect("wav");
    let reply = dir.join("reply.wav");
    let url = server.ws_url("/xiaozhi/v1/");
    let summary = run_sdk_script(
        "converse.py",
        [url.as_ref(), wav.as_os_str(), reply.as_os_str()]
            .into_iter()
            .chain(["--mode", "auto", "--timeout", "60"].map(std::ffi::OsStr::new)),
    );
    let stt = summary["stt"].as_str().unwrap_or("").to_lowercase();
    assert!(
        stt.contains("who are you") || stt.contains("hello"),
        "{summary}"
    );
    assert!(
        summary["reply_seconds"].as_f64().unwrap_or(0.0) > 1.0,
        "{summary}"
    );
    let r = hound::WavReader::open(&reply).expect("reply wav");
    assert!(r.duration() > 16_000, "reply audio recorded");
}

#[test]
fn a_drain_lets_the_sentence_being_spoken_and_its_answer_finish_then_says_goodbye() {
    let mock = mock_upstream::serve(MockSettings {
        asr_text: "What is the weather like today?".into(),
        llm_reply: "It is sunny today.".into(),
        tts_audio: Duration::from_millis(400),
        ..MockSettings::default()
    })
    .expect("mock upstream");
    let mut server = remote_server(&mock, &["server.drain.grace_ms=10000"]);
    let frames = opus_frames(&speech_16k("What is the weather like today?", "en-us", 0.8));
    let mut ws = connect(
        &server.ws_url("/"),
        &device_headers("aa:cc:00:00:00:0d", "1"),
    );
    hello(&mut ws, HELLO);
    // SIGTERM while the device is mid-sentence (0.8 s of silence, then speech).
    let pid = server.child.id().to_string();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1600));
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
    });
    let turn = speak(&mut ws, &frames, Duration::from_secs(30));
    assert!(killer.join().expect("killer").success());
    assert_eq!(
        turn.first("stt").expect("stt")["text"],
        "What is the weather like today"
    );
    assert_turn_shape(&turn);
    // Then the idle device is told goodbye and closed as going away, and the server exits.
    assert_eq!(next_json(&mut ws)["type"], "goodbye");
    let (code, reason) = expect_close(&mut ws);
    assert_eq!(code, 1001, "{reason}");
    assert!(server.wait_exit(Duration::from_secs(15)).success());
}
