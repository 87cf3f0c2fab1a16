//! OpenAI-compatible streaming Chat Completions (`POST {base_url}/chat/completions`,
//! `stream: true`), as served by OpenAI, DeepSeek, GLM, Qwen, Doubao, vLLM, Ollama, LM Studio.
//!
//! The reply is read as server-sent events; each `data:` chunk's `choices[0].delta` becomes
//! [`LlmEvent`]s. After `data: [DONE]` the body is drained to its end (briefly) so the
//! connection goes back to the pool.
//!
//! **Cancellation** is dropping the future returned by [`stream_chat`]: the request or the
//! response body is dropped with it, hyper closes that connection at once (the server sees the
//! disconnect and can stop generating), and the callback is not called again. Nothing keeps
//! running in the background.

use std::cell::Cell;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::Request;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sse_stream::SseStream;

use super::ThinkFilter;
// The provider-neutral types, also reachable from here.
pub use super::{ChatMessage, LlmError, LlmEvent, LlmSummary, Role, ToolCall, Usage};
use crate::providers::http_client::{
    error_for_status, read_body, with_timeout, ApiKey, ConnectTimeout, HttpClient, HttpError,
    ReqBody,
};

/// After `[DONE]`, how long to wait for the end of the body before closing the connection.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(250);
/// Largest non-streamed (`application/json`) reply accepted.
const MAX_JSON_REPLY: usize = 4 * 1024 * 1024;

/// Where and how to call the model.
#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    /// API root including the version, e.g. `https://api.deepseek.com/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …`; empty sends no header (local servers).
    pub api_key: ApiKey,
    pub model: String,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Bound on opening a new connection (DNS + TCP + TLS), instead of the client's default.
    pub connect_timeout: Duration,
    /// From the call until the first content, reasoning or tool-call delta.
    pub first_token_timeout: Duration,
    /// From the call until the reply is complete.
    pub total_timeout: Duration,
}

/// Streams one chat completion: `on_event` gets text and tool-call deltas as they arrive; the
/// result summarises the reply. `tools` is the Chat Completions `tools` array, sent as is.
///
/// Timeouts run on glommio timers: [`LlmError::FirstTokenTimeout`] if no content, reasoning
/// or tool-call delta arrived within `first_token_timeout` of the call, and
/// [`LlmError::TotalTimeout`] if the reply is not done within `total_timeout`. Either way the
/// connection is closed. Drop the future to cancel (see the module docs).
pub async fn stream_chat(
    client: &HttpClient,
    settings: &OpenAiSettings,
    messages: &[ChatMessage],
    tools: Option<&Value>,
    mut on_event: impl FnMut(LlmEvent),
) -> Result<LlmSummary, LlmError> {
    let started = Instant::now();
    let first_token = Cell::new(None::<Duration>);
    let exchange = exchange(client, settings, messages, tools, &mut on_event, || {
        if first_token.get().is_none() {
            first_token.set(Some(started.elapsed()));
        }
    });
    let total = settings.total_timeout;
    let watchdog = async {
        if settings.first_token_timeout < total {
            glommio::timer::sleep(settings.first_token_timeout).await;
            if first_token.get().is_none() {
                return Err(LlmError::FirstTokenTimeout(settings.first_token_timeout));
            }
        }
        glommio::timer::sleep(total.saturating_sub(started.elapsed())).await;
        Err(LlmError::TotalTimeout(total))
    };
    // Both futures are owned by `or` and dropped when it returns, so a timed-out exchange
    // closes its connection here rather than at the end of some enclosing scope.
    let result = futures_lite::future::or(exchange, watchdog).await;
    match &result {
        Ok(summary) => tracing::debug!(
            model = %settings.model,
            first_token_ms = first_token.get().map(|d| d.as_millis() as u64),
            total_ms = started.elapsed().as_millis() as u64,
            finish_reason = summary.finish_reason.as_deref().unwrap_or(""),
            tool_calls = summary.tool_calls.len(),
            prompt_tokens = summary.usage.map(|u| u.prompt_tokens),
            completion_tokens = summary.usage.map(|u| u.completion_tokens),
            "llm reply"
        ),
        Err(e) => tracing::warn!(model = %settings.model, error = %e, "llm call failed"),
    }
    result
}

/// The request body.
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a Value>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// Sends the request and reads the reply; `progressed` is called on every chunk that counts
/// as a first token.
async fn exchange(
    client: &HttpClient,
    settings: &OpenAiSettings,
    messages: &[ChatMessage],
    tools: Option<&Value>,
    on_event: &mut impl FnMut(LlmEvent),
    progressed: impl Fn(),
) -> Result<LlmSummary, LlmError> {
    let url = format!(
        "{}/chat/completions",
        settings.base_url.trim_end_matches('/')
    );
    let body = ChatRequest {
        model: &settings.model,
        messages,
        stream: true,
        stream_options: StreamOptions {
            include_usage: true,
        },
        temperature: settings.temperature,
        max_tokens: settings.max_tokens,
        tools,
    };
    let body = serde_json::to_vec(&body).map_err(|e| LlmError::BadChunk(e.to_string()))?;
    let mut req = Request::post(&url)
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "text/event-stream");
    if let Some(bearer) = settings.api_key.bearer() {
        req = req.header(AUTHORIZATION, bearer);
    }
    let req = req
        .extension(ConnectTimeout(settings.connect_timeout))
        .body(ReqBody::full(body))
        .map_err(|e| HttpError::InvalidRequest {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let resp = error_for_status(client.request(req).await?).await?;

    let mut reply = ReplyAccumulator::default();
    let is_json = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        // A server that ignored `stream: true` (or reports an error with 200).
        let body = read_body(resp.into_body(), MAX_JSON_REPLY).await?;
        let chunk: ChatChunk = serde_json::from_slice(&body)
            .map_err(|e| LlmError::BadChunk(format!("{e}: {}", snippet(&body))))?;
        reply.apply(chunk, on_event)?;
        progressed();
        return Ok(reply.finish(on_event));
    }

    let mut events = SseStream::new(resp.into_body());
    let mut done = false;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| LlmError::Stream(e.to_string()))?;
        let Some(data) = event.data else { continue };
        let data = data.trim();
        if data == "[DONE]" {
            done = true;
            break;
        }
        if data.is_empty() {
            continue;
        }
        let chunk: ChatChunk = serde_json::from_str(data)
            .map_err(|e| LlmError::BadChunk(format!("{e}: {}", snippet(data.as_bytes()))))?;
        if reply.apply(chunk, on_event)? {
            progressed();
        }
    }
    if done {
        // Read the chunked-body terminator so the connection can be reused; if it does not
        // come soon, dropping the body closes the connection instead.
        let drain = async { while let Some(Ok(_)) = events.next().await {} };
        if with_timeout("drain", DRAIN_TIMEOUT, drain).await.is_err() {
            tracing::debug!("body did not end after [DONE]; closing the connection");
        }
    } else if reply.finish_reason.is_none() {
        return Err(LlmError::Truncated);
    }
    Ok(reply.finish(on_event))
}

fn snippet(data: &[u8]) -> String {
    let end = data.len().min(200);
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// One chunk of a streamed reply (or a whole non-streamed reply: `message` instead of `delta`).
#[derive(Debug, Deserialize)]
struct ChatChunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default, alias = "message")]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    /// DeepSeek-style separate reasoning: not shown, but counts as a first token.
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallChunk>>,
}

#[derive(Debug, Deserialize)]
struct ToolCallChunk {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionChunk>,
}

#[derive(Debug, Deserialize)]
struct FunctionChunk {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// Turns chunks into events and the summary: strips `<think>`, merges tool calls by index.
#[derive(Debug, Default)]
struct ReplyAccumulator {
    think: ThinkFilter,
    text: String,
    finish_reason: Option<String>,
    tool_calls: Vec<ToolCall>,
    usage: Option<Usage>,
}

impl ReplyAccumulator {
    /// Applies one chunk; returns whether it carried content, reasoning, tool calls or the end.
    fn apply(
        &mut self,
        chunk: ChatChunk,
        on_event: &mut impl FnMut(LlmEvent),
    ) -> Result<bool, LlmError> {
        if let Some(error) = chunk.error {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string());
            return Err(LlmError::Api(message));
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        let mut progressed = false;
        // Only the first choice is used (`n` is never set).
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            let delta = choice.delta.unwrap_or_default();
            if let Some(reasoning) = delta.reasoning_content {
                progressed |= !reasoning.is_empty();
            }
            if let Some(content) = delta.content {
                progressed |= !content.is_empty();
                let visible = self.think.push(&content);
                self.emit_text(visible, on_event);
            }
            for call in delta.tool_calls.unwrap_or_default() {
                progressed = true;
                self.apply_tool_call(call, on_event);
            }
            if let Some(reason) = choice.finish_reason {
                progressed = true;
                self.finish_reason = Some(reason);
            }
        }
        Ok(progressed)
    }

    fn apply_tool_call(&mut self, call: ToolCallChunk, on_event: &mut impl FnMut(LlmEvent)) {
        let (name, arguments) = match call.function {
            Some(f) => (f.name, f.arguments.unwrap_or_default()),
            None => (None, String::new()),
        };
        // Some providers omit `index`: a new id starts a new call, otherwise continue the last.
        let index = call.index.unwrap_or_else(|| {
            let known = |id: &String| self.tool_calls.iter().any(|c| &c.id == id);
            match (&call.id, self.tool_calls.last()) {
                (Some(id), _) if !known(id) => self.tool_calls.len() as u32,
                (_, Some(last)) => last.index,
                (_, None) => 0,
            }
        });
        let slot = match self.tool_calls.iter().position(|c| c.index == index) {
            Some(pos) => &mut self.tool_calls[pos],
            None => {
                self.tool_calls.push(ToolCall {
                    index,
                    ..ToolCall::default()
                });
                self.tool_calls.last_mut().expect("just pushed")
            }
        };
        if let Some(id) = call.id.as_ref().filter(|id| !id.is_empty()) {
            if slot.id.is_empty() {
                slot.id.clone_from(id);
            }
        }
        if let Some(name) = name.as_ref().filter(|n| !n.is_empty()) {
            if slot.name.is_empty() {
                slot.name.clone_from(name);
            }
        }
        slot.arguments.push_str(&arguments);
        on_event(LlmEvent::ToolCallDelta {
            index,
            id: call.id,
            name,
            arguments_fragment: arguments,
        });
    }

    fn emit_text(&mut self, text: String, on_event: &mut impl FnMut(LlmEvent)) {
        if !text.is_empty() {
            self.text.push_str(&text);
            on_event(LlmEvent::Text(text));
        }
    }

    fn finish(mut self, on_event: &mut impl FnMut(LlmEvent)) -> LlmSummary {
        let tail = self.think.finish();
        self.emit_text(tail, on_event);
        self.tool_calls.sort_by_key(|c| c.index);
        LlmSummary {
            text: self.text,
            finish_reason: self.finish_reason,
            tool_calls: self.tool_calls,
            usage: self.usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&str]) -> (Vec<LlmEvent>, LlmSummary) {
        let mut acc = ReplyAccumulator::default();
        let mut events = Vec::new();
        let mut on_event = |e| events.push(e);
        for c in chunks {
            acc.apply(serde_json::from_str(c).unwrap(), &mut on_event)
                .unwrap();
        }
        let summary = acc.finish(&mut on_event);
        (events, summary)
    }

    #[test]
    fn merges_interleaved_tool_calls_by_index() {
        let (events, summary) = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"play_music","arguments":"{\"song"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"\":\"x\"}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#,
        ]);
        assert_eq!(events.len(), 5);
        assert_eq!(
            summary.tool_calls,
            vec![
                ToolCall {
                    index: 0,
                    id: "call_a".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into()
                },
                ToolCall {
                    index: 1,
                    id: "call_b".into(),
                    name: "play_music".into(),
                    arguments: r#"{"song":"x"}"#.into()
                },
            ]
        );
        assert_eq!(summary.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(summary.usage.map(|u| u.total_tokens), Some(15));
        assert_eq!(summary.text, "");
    }

    #[test]
    fn tool_calls_without_index_are_told_apart_by_id() {
        let (_, summary) = run(&[
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"a","function":{"name":"f","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"b","function":{"name":"g","arguments":"{"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"}"}}]}}]}"#,
        ]);
        let got: Vec<_> = summary
            .tool_calls
            .iter()
            .map(|c| (c.index, c.id.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(got, vec![(0, "a", "{}"), (1, "b", "{}")]);
    }

    #[test]
    fn text_is_think_stripped_and_summarised() {
        let (events, summary) = run(&[
            r#"{"choices":[{"delta":{"content":"<thi"}}]}"#,
            r#"{"choices":[{"delta":{"content":"nk>plan</th"}}]}"#,
            r#"{"choices":[{"delta":{"content":"ink>\n\nHello"}}]}"#,
            r#"{"choices":[{"delta":{"content":" there"},"finish_reason":"stop"}]}"#,
        ]);
        assert_eq!(
            events,
            vec![
                LlmEvent::Text("Hello".into()),
                LlmEvent::Text(" there".into())
            ]
        );
        assert_eq!(summary.text, "Hello there");
    }

    #[test]
    fn error_object_in_stream_is_an_api_error() {
        let mut acc = ReplyAccumulator::default();
        let chunk = serde_json::from_str(r#"{"error":{"message":"quota exceeded"}}"#).unwrap();
        let err = acc.apply(chunk, &mut |_| {}).unwrap_err();
        assert!(matches!(err, LlmError::Api(m) if m == "quota exceeded"));
    }

    #[test]
    fn request_body_has_stream_options_and_skips_unset_fields() {
        let messages = [ChatMessage::user("hi")];
        let body = serde_json::to_value(ChatRequest {
            model: "m",
            messages: &messages,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            temperature: None,
            max_tokens: Some(50),
            tools: None,
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"model":"m","messages":[{"role":"user","content":"hi"}],
                "stream":true,"stream_options":{"include_usage":true},"max_tokens":50})
        );
    }
}
