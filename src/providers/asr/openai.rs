//! OpenAI-compatible batch transcription (`POST {base_url}/audio/transcriptions`), as served by
//! OpenAI, Groq, and self-hosted whisper servers (faster-whisper-server, LocalAI, vLLM).
//!
//! The utterance WAV is already in memory, so the multipart body is built by hand and sent
//! with a `Content-Length`.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use crate::providers::error::ProviderError;
use crate::providers::http_client::{post_for_body, with_timeout, ApiKey, HttpClient};

/// Largest transcription reply accepted.
const MAX_REPLY: usize = 1024 * 1024;

/// Where and how to transcribe.
#[derive(Debug, Clone)]
pub struct OpenAiAsrSettings {
    /// API root including the version, e.g. `https://api.groq.com/openai/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …`; empty sends no header.
    pub api_key: ApiKey,
    /// e.g. `whisper-1`, `whisper-large-v3-turbo`.
    pub model: String,
    /// ISO-639-1 hint (`zh`, `en`); `None` lets the service detect it.
    pub language: Option<String>,
    /// Bound on the whole exchange, upload to parsed reply.
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct Transcription {
    text: String,
}

/// Transcribes one utterance (a complete WAV file); returns the trimmed text.
pub async fn transcribe(
    client: &HttpClient,
    settings: &OpenAiAsrSettings,
    wav: Vec<u8>,
) -> Result<String, ProviderError> {
    with_timeout(
        "transcription",
        settings.timeout,
        exchange(client, settings, wav),
    )
    .await?
}

async fn exchange(
    client: &HttpClient,
    settings: &OpenAiAsrSettings,
    wav: Vec<u8>,
) -> Result<String, ProviderError> {
    let url = format!(
        "{}/audio/transcriptions",
        settings.base_url.trim_end_matches('/')
    );
    let mut fields = vec![
        ("model", settings.model.as_str()),
        ("response_format", "json"),
    ];
    if let Some(language) = &settings.language {
        fields.push(("language", language));
    }
    let (content_type, body) = multipart(&fields, "file", "audio.wav", "audio/wav", &wav);
    let body = post_for_body(
        client,
        &url,
        &settings.api_key,
        &content_type,
        body,
        MAX_REPLY,
    )
    .await?;
    let reply: Transcription = serde_json::from_slice(&body).map_err(|e| {
        let start = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        ProviderError::BadResponse(format!("{e}: {start}"))
    })?;
    Ok(reply.text.trim().to_string())
}

/// A `multipart/form-data` body with text `fields` and one file; returns (content type, body).
fn multipart(
    fields: &[(&str, &str)],
    file_field: &str,
    filename: &str,
    mime: &str,
    data: &[u8],
) -> (String, Bytes) {
    // A random boundary, checked against the file (practically never found).
    let boundary = loop {
        let b = format!("----xiaozhi{}", uuid::Uuid::new_v4().simple());
        if !data.windows(b.len()).any(|w| w == b.as_bytes()) {
            break b;
        }
    };
    let mut head = String::new();
    for (name, value) in fields {
        let _ = write!(
            head,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        );
    }
    let _ = write!(
        head,
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; \
         filename=\"{filename}\"\r\nContent-Type: {mime}\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let mut out = Vec::with_capacity(head.len() + data.len() + tail.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(tail.as_bytes());
    (
        format!("multipart/form-data; boundary={boundary}"),
        out.into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_body_has_fields_then_file() {
        let (ct, body) = multipart(
            &[("model", "whisper-1"), ("response_format", "json")],
            "file",
            "a.wav",
            "audio/wav",
            b"RIFF\x00\x01",
        );
        let boundary = ct.strip_prefix("multipart/form-data; boundary=").unwrap();
        let expected = format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\njson\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\nRIFF\x00\x01\r\n--{b}--\r\n",
            b = boundary
        );
        assert_eq!(body, Bytes::from(expected));
    }
}
