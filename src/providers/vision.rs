//! Vision: what kind of image a photo is ([`ImageKind::sniff`], by its magic bytes), and an
//! OpenAI-compatible vision model that answers a question about it ([`explain`]): one
//! non-streamed `POST {base_url}/chat/completions` whose user message holds the question and the
//! photo as a `data:` URL `image_url` part, as OpenAI, Qwen-VL, GLM-4V, vLLM and Ollama accept.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use crate::providers::error::ProviderError;
use crate::providers::http_client::{post_for_body, with_timeout, ApiKey, HttpClient};

/// Largest reply accepted from the model.
const MAX_REPLY: usize = 1024 * 1024;

/// An image format the endpoint accepts (the reference's list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
    Gif,
    Bmp,
    Tiff,
    Webp,
}

impl ImageKind {
    /// The format of `bytes` by its magic number; `None` for anything else.
    pub fn sniff(bytes: &[u8]) -> Option<ImageKind> {
        let starts = |magic: &[u8]| bytes.starts_with(magic);
        if starts(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageKind::Jpeg)
        } else if starts(b"\x89PNG\r\n\x1a\n") {
            Some(ImageKind::Png)
        } else if starts(b"GIF87a") || starts(b"GIF89a") {
            Some(ImageKind::Gif)
        } else if starts(b"BM") && bytes.len() >= 26 {
            Some(ImageKind::Bmp)
        } else if starts(b"II*\0") || starts(b"MM\0*") {
            Some(ImageKind::Tiff)
        } else if bytes.len() >= 12 && starts(b"RIFF") && &bytes[8..12] == b"WEBP" {
            Some(ImageKind::Webp)
        } else {
            None
        }
    }

    /// Its MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::Png => "image/png",
            ImageKind::Gif => "image/gif",
            ImageKind::Bmp => "image/bmp",
            ImageKind::Tiff => "image/tiff",
            ImageKind::Webp => "image/webp",
        }
    }
}

/// Where and how to call the vision model.
#[derive(Debug, Clone)]
pub struct OpenAiVisionSettings {
    /// API root including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …`; empty sends no header.
    pub api_key: ApiKey,
    /// A model that accepts images.
    pub model: String,
    /// Bound on the whole exchange, connect included.
    pub timeout: Duration,
}

/// The Chat Completions body asking about `image` (of kind `kind`).
pub fn request_body(model: &str, question: &str, image: &[u8], kind: ImageKind) -> Value {
    let url = format!("data:{};base64,{}", kind.mime(), STANDARD.encode(image));
    json!({
        "model": model,
        "stream": false,
        "messages": [{
            "role": "user",
            "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }],
    })
}

/// Asks the model `question` about `image`; returns its answer text.
pub async fn explain(
    client: &HttpClient,
    settings: &OpenAiVisionSettings,
    question: &str,
    image: &[u8],
    kind: ImageKind,
) -> Result<String, ProviderError> {
    let body = request_body(&settings.model, question, image, kind);
    let exchange = exchange(client, settings, body);
    with_timeout("vision model", settings.timeout, exchange).await?
}

async fn exchange(
    client: &HttpClient,
    settings: &OpenAiVisionSettings,
    body: Value,
) -> Result<String, ProviderError> {
    let url = format!(
        "{}/chat/completions",
        settings.base_url.trim_end_matches('/')
    );
    let reply = post_for_body(
        client,
        &url,
        &settings.api_key,
        "application/json",
        body.to_string(),
        MAX_REPLY,
    )
    .await?;
    answer_text(&reply).map_err(ProviderError::BadResponse)
}

/// The answer in a Chat Completions reply: `choices[0].message.content` as a string or as text
/// parts; an empty answer is an error.
pub fn answer_text(reply: &[u8]) -> Result<String, String> {
    let v: Value = serde_json::from_slice(reply).map_err(|e| format!("reply is not JSON: {e}"))?;
    if let Some(error) = v.get("error").filter(|e| !e.is_null()) {
        return Err(format!("the model reported an error: {error}"));
    }
    let text = match v.pointer("/choices/0/message/content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => return Err("reply has no choices[0].message.content".into()),
    };
    let text = text.trim();
    if text.is_empty() {
        return Err("the model answered with no text".into());
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_recognised_by_their_magic_bytes_only() {
        let cases: [(&[u8], Option<ImageKind>); 9] = [
            (&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10], Some(ImageKind::Jpeg)),
            (b"\x89PNG\r\n\x1a\n\0\0", Some(ImageKind::Png)),
            (b"GIF89a...", Some(ImageKind::Gif)),
            (
                &[
                    b'B', b'M', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0,
                ],
                Some(ImageKind::Bmp),
            ),
            (b"II*\0\x08\0\0\0", Some(ImageKind::Tiff)),
            (b"RIFF\x10\0\0\0WEBPVP8 ", Some(ImageKind::Webp)),
            (b"RIFF\x10\0\0\0WAVEfmt ", None),
            (b"BMW is a car", None),
            (b"hello, not an image", None),
        ];
        for (bytes, want) in cases {
            assert_eq!(ImageKind::sniff(bytes), want, "{bytes:?}");
        }
        assert_eq!(ImageKind::sniff(&[]), None);
    }

    #[test]
    fn request_carries_the_question_and_the_image_as_a_data_url() {
        let body = request_body(
            "m",
            "What is this?",
            &[0xFF, 0xD8, 0xFF, 1],
            ImageKind::Jpeg,
        );
        assert_eq!(body["model"], "m");
        let content = &body["messages"][0]["content"];
        assert_eq!(content[0], json!({"type":"text","text":"What is this?"}));
        assert_eq!(
            content[1]["image_url"]["url"],
            "data:image/jpeg;base64,/9j/AQ=="
        );
    }

    #[test]
    fn answer_text_reads_string_or_parts_and_refuses_errors_and_empty_answers() {
        let ok = br#"{"choices":[{"message":{"role":"assistant","content":" A cat. "}}]}"#;
        assert_eq!(answer_text(ok).unwrap(), "A cat.");
        let parts = br#"{"choices":[{"message":{"content":[{"type":"text","text":"A "},{"type":"text","text":"dog."}]}}]}"#;
        assert_eq!(answer_text(parts).unwrap(), "A dog.");
        assert!(answer_text(br#"{"error":{"message":"quota"}}"#)
            .unwrap_err()
            .contains("quota"));
        assert!(answer_text(br#"{"choices":[{"message":{"content":""}}]}"#).is_err());
        assert!(answer_text(b"<html>").is_err());
    }
}
