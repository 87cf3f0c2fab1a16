//! OpenAI-compatible batch transcription (`POST {base_url}/audio/transcriptions`), as served by
//! OpenAI, Groq, and self-hosted whisper servers (faster-whisper-server, LocalAI, vLLM).
//!
//! The utterance WAV is already in memory, so the multipart body is built in one buffer
//! ([`super::multipart_form`]) and sent with a `Content-Length`.

use std::time::Duration;

use serde::Deserialize;

use super::multipart_form;
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
    let seed = uuid::Uuid::new_v4().as_u128();
    let (content_type, body) =
        multipart_form(&fields, "file", "audio.wav", "audio/wav", &wav, seed);
    let body = post_for_body(
        client,
        &url,
        &settings.api_key,
        &content_type,
        bytes::Bytes::from(body),
        MAX_REPLY,
    )
    .await?;
    let reply: Transcription = serde_json::from_slice(&body).map_err(|e| {
        let start = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        ProviderError::BadResponse(format!("{e}: {start}"))
    })?;
    Ok(reply.text.trim().to_string())
}
