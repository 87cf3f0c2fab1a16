//! `POST …/audio/transcriptions` (multipart with a `file` part; answers the configured transcript
//! after `asr_delay`) and `POST …/audio/speech` (answers speech-like audio of `tts_audio` length
//! after `tts_delay`, as WAV or raw PCM16LE at 24 kHz mono). The audio is synthesised once per
//! configured length and shared by every request.

use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::http::{find, write_error, write_json, write_response, Request};
use super::{lock, MockSettings, Shared, TTS_SAMPLE_RATE_HZ};

/// Answers a transcription request with the configured transcript after `asr_delay`.
pub(super) fn transcription(
    out: &mut TcpStream,
    request: &Request,
    settings: &MockSettings,
    shared: &Shared,
) -> io::Result<()> {
    let keep_alive = request.keep_alive;
    let content_type = request.header("content-type").unwrap_or("");
    let Some(parts) = multipart_parts(content_type, &request.body) else {
        return write_error(out, 400, "expected multipart/form-data", keep_alive);
    };
    if !parts.iter().any(|p| p.name == "file" && !p.data.is_empty()) {
        return write_error(out, 400, "`file` is required", keep_alive);
    }
    let format = parts
        .iter()
        .find(|p| p.name == "response_format")
        .map(|p| String::from_utf8_lossy(&p.data).trim().to_string());
    if !shared
        .stop
        .wait_until(request.received + settings.asr_delay)
    {
        return Err(io::ErrorKind::Interrupted.into());
    }
    match format.as_deref() {
        Some("text") | Some("srt") | Some("vtt") => write_response(
            out,
            200,
            "text/plain; charset=utf-8",
            settings.asr_text.as_bytes(),
            keep_alive,
        ),
        _ => write_json(out, 200, &json!({"text": settings.asr_text}), keep_alive),
    }
}

/// One part of a multipart/form-data body.
struct Part {
    name: String,
    data: Vec<u8>,
}

/// The parts of a multipart/form-data body; `None` when it is not one.
fn multipart_parts(content_type: &str, body: &[u8]) -> Option<Vec<Part>> {
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return None;
    }
    let boundary = content_type
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()?
        .trim_matches('"');
    let delimiter = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    let mut rest = &body[find(body, &delimiter)? + delimiter.len()..];
    while !rest.starts_with(b"--") {
        let rest_of_part = rest.strip_prefix(b"\r\n")?;
        let head_end = find(rest_of_part, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest_of_part[..head_end]);
        let content = &rest_of_part[head_end + 4..];
        let mut closing = b"\r\n".to_vec();
        closing.extend_from_slice(&delimiter);
        let end = find(content, &closing)?;
        let name = head
            .split(';')
            .filter_map(|p| p.trim().strip_prefix("name="))
            .next()
            .unwrap_or("")
            .trim_matches('"')
            .to_string();
        parts.push(Part {
            name,
            data: content[..end].to_vec(),
        });
        rest = &content[end + closing.len()..];
    }
    Some(parts)
}

/// Answers a speech request with the shared synthesised audio after `tts_delay`.
pub(super) fn speech(
    out: &mut TcpStream,
    request: &Request,
    settings: &MockSettings,
    shared: &Shared,
) -> io::Result<()> {
    let keep_alive = request.keep_alive;
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return write_error(out, 400, "request body is not JSON", keep_alive);
    };
    if body
        .get("input")
        .and_then(Value::as_str)
        .is_none_or(|s| s.trim().is_empty())
    {
        return write_error(out, 400, "`input` is required", keep_alive);
    }
    let format = body
        .get("response_format")
        .and_then(Value::as_str)
        .unwrap_or("wav");
    if format != "wav" && format != "pcm" {
        return write_error(
            out,
            400,
            "the mock upstream only synthesises `wav` and `pcm`",
            keep_alive,
        );
    }
    let audio = Arc::clone(&lock(&shared.audio));
    if !shared
        .stop
        .wait_until(request.received + settings.tts_delay)
    {
        return Err(io::ErrorKind::Interrupted.into());
    }
    if format == "pcm" {
        write_response(out, 200, "audio/pcm", &audio.wav[44..], keep_alive)
    } else {
        write_response(out, 200, "audio/wav", &audio.wav, keep_alive)
    }
}

/// The synthesised audio, made once per duration: a WAV file whose data follows a 44-byte header.
pub(super) struct TtsAudio {
    wav: Vec<u8>,
}

impl TtsAudio {
    /// Speech-like audio: a 140 Hz voice with three harmonics and a slow vibrato, in 4 Hz
    /// "syllables", peaking around -20 dBFS. It is deterministic and compresses like speech.
    pub(super) fn new(duration: Duration) -> Self {
        let rate = f64::from(TTS_SAMPLE_RATE_HZ);
        let samples = (duration.as_secs_f64() * rate).round() as usize;
        let data_len = u32::try_from(samples * 2).unwrap_or(u32::MAX - 44);
        let mut wav = Vec::with_capacity(44 + samples * 2);
        wav.extend_from_slice(b"RIFF");
        wav.extend_from_slice(&(36 + data_len).to_le_bytes());
        wav.extend_from_slice(b"WAVEfmt ");
        wav.extend_from_slice(&16u32.to_le_bytes());
        wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
        wav.extend_from_slice(&1u16.to_le_bytes()); // mono
        wav.extend_from_slice(&TTS_SAMPLE_RATE_HZ.to_le_bytes());
        wav.extend_from_slice(&(TTS_SAMPLE_RATE_HZ * 2).to_le_bytes());
        wav.extend_from_slice(&2u16.to_le_bytes()); // block align
        wav.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
        wav.extend_from_slice(b"data");
        wav.extend_from_slice(&data_len.to_le_bytes());
        let tau = std::f64::consts::TAU;
        let mut phase = 0.0f64;
        for n in 0..samples {
            let t = n as f64 / rate;
            let f0 = 140.0 + 12.0 * (tau * 5.0 * t).sin();
            phase += tau * f0 / rate;
            let voice = phase.sin() + 0.5 * (2.0 * phase).sin() + 0.25 * (3.0 * phase).sin();
            let syllable = (tau * 2.0 * t).sin().abs();
            let sample = 0.07 * syllable * voice * f64::from(i16::MAX);
            wav.extend_from_slice(&(sample as i16).to_le_bytes());
        }
        Self { wav }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::mock_upstream::serve;
    use crate::mock_upstream::test_client::{fast, Client};

    fn multipart(fields: &[(&str, &[u8])]) -> (String, Vec<u8>) {
        let boundary = "XyZbOuNdArY";
        let mut body = Vec::new();
        for (name, data) in fields {
            let disposition = if *name == "file" {
                "form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav"
                    .to_string()
            } else {
                format!("form-data; name=\"{name}\"")
            };
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }

    #[test]
    fn transcription_answers_the_configured_text_after_the_delay() {
        let mock = serve(MockSettings {
            asr_delay: Duration::from_millis(60),
            asr_text: "你好小智".into(),
            ..MockSettings::default()
        })
        .expect("serve");
        let (content_type, body) = multipart(&[("model", b"whisper-1"), ("file", b"RIFF....")]);
        let mut client = Client::connect(mock.addr());
        let sent = Instant::now();
        client.send("POST", "/v1/audio/transcriptions", &content_type, &body);
        let response = client.receive().expect("response");
        assert!(sent.elapsed() >= Duration::from_millis(60));
        assert_eq!(response.status, 200);
        assert_eq!(response.json(), json!({"text": "你好小智"}));
        let (content_type, body) = multipart(&[("file", b"x"), ("response_format", b"text")]);
        client.send("POST", "/v1/audio/transcriptions", &content_type, &body);
        assert_eq!(
            client.receive().expect("response").body,
            "你好小智".as_bytes()
        );
        assert_eq!(mock.stats().transcription_requests, 2);
    }

    #[test]
    fn transcription_without_a_file_is_rejected() {
        let mock = serve(fast()).expect("serve");
        let mut client = Client::connect(mock.addr());
        let (content_type, body) = multipart(&[("model", b"whisper-1")]);
        client.send("POST", "/v1/audio/transcriptions", &content_type, &body);
        assert_eq!(client.receive().expect("response").status, 400);
        client.send(
            "POST",
            "/v1/audio/transcriptions",
            "application/json",
            b"{}",
        );
        assert_eq!(client.receive().expect("response").status, 400);
    }

    #[test]
    fn speech_returns_a_pcm16_mono_24khz_wav_of_the_configured_length() {
        let mock = serve(MockSettings {
            tts_delay: Duration::from_millis(40),
            tts_audio: Duration::from_millis(400),
            ..MockSettings::default()
        })
        .expect("serve");
        let mut client = Client::connect(mock.addr());
        let sent = Instant::now();
        let response = client.request(
            "POST",
            "/v1/audio/speech",
            &json!({"model": "tts-1", "input": "Hello.", "voice": "alloy"}),
        );
        assert!(sent.elapsed() >= Duration::from_millis(40));
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("audio/wav"));
        let wav = &response.body;
        assert_eq!(&wav[0..4], b"RIFF");
        assert_eq!(&wav[8..16], b"WAVEfmt ");
        let u16_at = |i: usize| u16::from_le_bytes([wav[i], wav[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([wav[i], wav[i + 1], wav[i + 2], wav[i + 3]]);
        assert_eq!(u16_at(20), 1, "PCM");
        assert_eq!(u16_at(22), 1, "mono");
        assert_eq!(u32_at(24), 24_000);
        assert_eq!(u16_at(34), 16);
        assert_eq!(&wav[36..40], b"data");
        assert_eq!(u32_at(40), 400 * 24 * 2);
        assert_eq!(u32_at(4) as usize, wav.len() - 8);
        let peak = wav[44..]
            .chunks(2)
            .map(|s| i16::from_le_bytes([s[0], s[1]]).unsigned_abs())
            .max()
            .expect("samples");
        assert!(
            (1_000..8_000).contains(&peak),
            "audible but quiet: peak {peak}"
        );
    }

    #[test]
    fn speech_pcm_format_is_raw_samples_and_mp3_is_refused() {
        let mock = serve(MockSettings {
            tts_audio: Duration::from_millis(100),
            ..fast()
        })
        .expect("serve");
        let mut client = Client::connect(mock.addr());
        let body = json!({"input": "hi", "voice": "alloy", "response_format": "pcm"});
        let response = client.request("POST", "/v1/audio/speech", &body);
        assert_eq!(response.header("content-type"), Some("audio/pcm"));
        assert_eq!(response.body.len(), 100 * 24 * 2);
        let body = json!({"input": "hi", "voice": "alloy", "response_format": "mp3"});
        assert_eq!(
            client.request("POST", "/v1/audio/speech", &body).status,
            400
        );
        assert_eq!(
            client
                .request("POST", "/v1/audio/speech", &json!({}))
                .status,
            400
        );
    }
}
