//! OpenAI-compatible speech synthesis (`POST {base_url}/audio/speech`), as served by OpenAI,
//! Volcengine's AI gateway, and self-hosted servers (Kokoro-FastAPI, openedai-speech, LocalAI).
//!
//! Asks for `wav` or raw `pcm` (16-bit little-endian mono) so no decoder is needed; the
//! caller resamples to the device rate.

use std::time::Duration;

use serde::Serialize;

use crate::providers::error::ProviderError;
use crate::providers::http_client::{post_for_body, with_timeout, ApiKey, HttpClient};

/// Largest audio reply accepted (about 10 minutes of 24 kHz PCM16).
const MAX_AUDIO: usize = 32 * 1024 * 1024;

/// Where and how to synthesise.
#[derive(Debug, Clone)]
pub struct OpenAiTtsSettings {
    /// API root including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …`; empty sends no header.
    pub api_key: ApiKey,
    /// e.g. `tts-1`, `gpt-4o-mini-tts`, `kokoro`.
    pub model: String,
    pub voice: String,
    /// `wav` (PCM16; the rate is read from its header) or `pcm` (raw PCM16LE mono at
    /// `sample_rate_for_pcm`).
    pub response_format: String,
    /// Sample rate of `pcm` replies (the format carries none); OpenAI sends 24000.
    pub sample_rate_for_pcm: u32,
    /// Bound on the whole exchange, request to last audio byte.
    pub timeout: Duration,
}

#[derive(Serialize)]
struct SpeechRequest<'a> {
    model: &'a str,
    input: &'a str,
    voice: &'a str,
    response_format: &'a str,
}

/// Synthesises `text`; returns mono PCM16 samples and their sample rate.
pub async fn speech(
    client: &HttpClient,
    settings: &OpenAiTtsSettings,
    text: &str,
) -> Result<(Vec<i16>, u32), ProviderError> {
    with_timeout("speech", settings.timeout, exchange(client, settings, text)).await?
}

async fn exchange(
    client: &HttpClient,
    settings: &OpenAiTtsSettings,
    text: &str,
) -> Result<(Vec<i16>, u32), ProviderError> {
    let format = settings.response_format.as_str();
    if !matches!(format, "wav" | "pcm") {
        return Err(ProviderError::InvalidSettings(format!(
            "response_format {format:?}: only \"wav\" and \"pcm\" are decoded"
        )));
    }
    let url = format!("{}/audio/speech", settings.base_url.trim_end_matches('/'));
    let body = serde_json::to_vec(&SpeechRequest {
        model: &settings.model,
        input: text,
        voice: &settings.voice,
        response_format: format,
    })
    .map_err(|e| ProviderError::BadResponse(e.to_string()))?;
    let audio = post_for_body(
        client,
        &url,
        &settings.api_key,
        "application/json",
        body,
        MAX_AUDIO,
    )
    .await?;
    if format == "pcm" {
        Ok((pcm16le(&audio), settings.sample_rate_for_pcm))
    } else {
        parse_wav(&audio).map_err(ProviderError::BadResponse)
    }
}

/// Little-endian 16-bit samples (a trailing odd byte is ignored).
fn pcm16le(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Parses a PCM16 WAV leniently: skips chunks until `data`, and takes everything after the
/// `data` header when its size is a streaming placeholder (`0xFFFFFFFF`, `0x7FFFF000`) or
/// larger than the file. Multi-channel audio is averaged to mono.
fn parse_wav(bytes: &[u8]) -> Result<(Vec<i16>, u32), String> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        let start = String::from_utf8_lossy(&bytes[..bytes.len().min(100)]).into_owned();
        return Err(format!("not a WAV file: {start:?}"));
    }
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let mut format = None;
    let mut pos = 12;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let size = u32_at(pos + 4) as usize;
        let body = pos + 8;
        match id {
            b"fmt " => {
                if size < 16 || body + 16 > bytes.len() {
                    return Err("short fmt chunk".into());
                }
                let tag = u16_at(body);
                let channels = u16_at(body + 2);
                let rate = u32_at(body + 4);
                let bits = u16_at(body + 14);
                // 1 = PCM; 0xFFFE = WAVE_FORMAT_EXTENSIBLE (PCM16 in practice for these services).
                if !(tag == 1 || tag == 0xFFFE) || bits != 16 || channels == 0 {
                    return Err(format!(
                        "unsupported WAV format: tag {tag:#x}, {bits} bits, {channels} channels"
                    ));
                }
                format = Some((channels as usize, rate));
            }
            b"data" => {
                let (channels, rate) = format.ok_or("data chunk before fmt chunk")?;
                let end = if size >= 0x7FFF_F000 || body + size > bytes.len() {
                    bytes.len()
                } else {
                    body + size
                };
                let samples = pcm16le(&bytes[body..end]);
                let mono = if channels == 1 {
                    samples
                } else {
                    samples
                        .chunks_exact(channels)
                        .map(|frame| {
                            let sum: i32 = frame.iter().map(|&s| i32::from(s)).sum();
                            (sum / channels as i32) as i16
                        })
                        .collect()
                };
                return Ok((mono, rate));
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        pos = body.saturating_add(size).saturating_add(size & 1);
    }
    Err("no data chunk".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(
        channels: u16,
        rate: u32,
        extra_chunk: bool,
        data_size: u32,
        samples: &[i16],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        out.extend_from_slice(b"WAVE");
        out.extend_from_slice(b"fmt ");
        out.extend_from_slice(&16u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&channels.to_le_bytes());
        out.extend_from_slice(&rate.to_le_bytes());
        out.extend_from_slice(&(rate * 2 * u32::from(channels)).to_le_bytes());
        out.extend_from_slice(&(2 * channels).to_le_bytes());
        out.extend_from_slice(&16u16.to_le_bytes());
        if extra_chunk {
            out.extend_from_slice(b"LIST");
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(b"abc\0"); // odd size plus a pad byte
        }
        out.extend_from_slice(b"data");
        out.extend_from_slice(&data_size.to_le_bytes());
        for s in samples {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    #[test]
    fn parses_streaming_wav_with_placeholder_sizes_and_extra_chunks() {
        let samples = [1i16, -2, 300, -32768, 32767];
        for size in [0xFFFF_FFFF, 0x7FFF_F000, 10] {
            let got = parse_wav(&wav(1, 24000, true, size, &samples)).unwrap();
            assert_eq!(got, (samples.to_vec(), 24000), "data size {size:#x}");
        }
    }

    #[test]
    fn data_size_shorter_than_file_is_respected() {
        let got = parse_wav(&wav(1, 16000, false, 4, &[5, 6, 7])).unwrap();
        assert_eq!(got, (vec![5, 6], 16000));
    }

    #[test]
    fn stereo_is_averaged_to_mono() {
        let got = parse_wav(&wav(2, 22050, false, 8, &[100, 300, -10, -30])).unwrap();
        assert_eq!(got, (vec![200, -20], 22050));
    }

    #[test]
    fn rejects_non_wav_and_non_pcm16() {
        assert!(parse_wav(br#"{"error":"bad voice"}"#).is_err());
        let mut w = wav(1, 8000, false, 2, &[1]);
        w[34] = 8; // bits per sample
        assert!(parse_wav(&w).unwrap_err().contains("8 bits"));
    }

    #[test]
    fn raw_pcm_is_little_endian_and_ignores_odd_byte() {
        assert_eq!(pcm16le(&[0x01, 0x00, 0xFF, 0xFF, 0x7]), vec![1, -1]);
    }
}
