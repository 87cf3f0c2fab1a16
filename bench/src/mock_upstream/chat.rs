//! `POST …/chat/completions`: the scripted reply, streamed as `chat.completion.chunk` SSE events
//! one token at a time on a fixed schedule (first token after `llm_first_token`, then one per
//! `llm_token`), or as one `chat.completion`; a tool call instead when the request has `tools`
//! and the user's last message contains `tool_trigger`. Every chat request body is logged for
//! [`MockHandle::chat_requests`](super::MockHandle::chat_requests).

use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::http::{write_error, write_json, write_sse, write_sse_head, write_sse_raw, Request};
use super::{lock, MockSettings, Shared};

/// Chat request bodies kept for [`MockHandle::chat_requests`].
const CHAT_LOG_LEN: usize = 64;
/// Characters of tool-call arguments per streamed event.
const ARGUMENT_PIECE_CHARS: usize = 8;

/// Answers a chat completion request: streamed or whole, text or a tool call.
pub(super) fn chat_completion(
    out: &mut TcpStream,
    request: &Request,
    settings: &MockSettings,
    shared: &Shared,
) -> io::Result<()> {
    let keep_alive = request.keep_alive;
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return write_error(out, 400, "request body is not JSON", keep_alive);
    };
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return write_error(out, 400, "`messages` is required", keep_alive);
    };
    let prompt_chars: usize = messages
        .iter()
        .map(|m| message_text(m).chars().count())
        .sum();
    let tool_call = tool_call_for(&body, messages, settings);
    {
        let mut log = lock(&shared.chat_log);
        if log.len() == CHAT_LOG_LEN {
            log.pop_front();
        }
        log.push_back(body.clone());
    }
    let n = shared.counters.chat.load(Ordering::Relaxed);
    let reply = ChatReply {
        id: format!("chatcmpl-mock-{n}"),
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("mock")
            .to_string(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        prompt_tokens: prompt_chars.div_ceil(4),
    };
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let schedule = Schedule {
        start: request.received,
        first: settings.llm_first_token,
        each: settings.llm_token,
    };
    let stop = &shared.stop;
    match (tool_call, stream) {
        (Some((name, arguments)), true) => {
            let pieces = split_pieces(&arguments, ARGUMENT_PIECE_CHARS);
            write_sse_head(out, keep_alive)?;
            let mut events = Vec::with_capacity(pieces.len() + 1);
            events.push(
                json!({"role": "assistant", "content": null, "tool_calls": [{
                "index": 0, "id": format!("call_mock_{n}"), "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
            );
            for piece in &pieces {
                events
                    .push(json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}));
            }
            for (i, delta) in events.iter().enumerate() {
                if !stop.wait_until(schedule.at(i)) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                write_sse(out, &reply.chunk(delta.clone(), None))?;
            }
            let usage = include_usage.then(|| reply.usage(pieces.len() + 1));
            finish_sse(out, &reply, "tool_calls", usage)
        }
        (Some((name, arguments)), false) => {
            let tokens = split_pieces(&arguments, ARGUMENT_PIECE_CHARS).len() + 1;
            if !stop.wait_until(schedule.at(tokens - 1)) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let message = json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": format!("call_mock_{n}"), "type": "function",
                "function": {"name": name, "arguments": arguments}}]});
            let body = reply.completion(message, "tool_calls", tokens);
            write_json(out, 200, &body, keep_alive)
        }
        (None, true) => {
            let tokens = split_tokens(&settings.llm_reply);
            write_sse_head(out, keep_alive)?;
            if tokens.is_empty() && !stop.wait_until(schedule.at(0)) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            for (i, token) in tokens.iter().enumerate() {
                if !stop.wait_until(schedule.at(i)) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": token})
                } else {
                    json!({"content": token})
                };
                write_sse(out, &reply.chunk(delta, None))?;
            }
            let usage = include_usage.then(|| reply.usage(tokens.len()));
            finish_sse(out, &reply, "stop", usage)
        }
        (None, false) => {
            let tokens = split_tokens(&settings.llm_reply).len().max(1);
            if !stop.wait_until(schedule.at(tokens - 1)) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let message = json!({"role": "assistant", "content": settings.llm_reply});
            let body = reply.completion(message, "stop", tokens);
            write_json(out, 200, &body, keep_alive)
        }
    }
}

/// When token `i` is due: the first after `first`, then one per `each`.
struct Schedule {
    start: Instant,
    first: Duration,
    each: Duration,
}

impl Schedule {
    fn at(&self, i: usize) -> Instant {
        let later = self
            .each
            .saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
        self.start + self.first + later
    }
}

/// The fields every chunk or completion of one reply shares.
struct ChatReply {
    id: String,
    model: String,
    created: u64,
    prompt_tokens: usize,
}

impl ChatReply {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn completion(&self, message: Value, finish_reason: &str, tokens: usize) -> Value {
        json!({
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": self.usage(tokens),
        })
    }
}

/// `Some((tool name, arguments))` when this request should get a tool call.
fn tool_call_for(
    body: &Value,
    messages: &[Value],
    settings: &MockSettings,
) -> Option<(String, String)> {
    let trigger = settings.tool_trigger.as_deref()?.to_lowercase();
    let tools = body.get("tools").and_then(Value::as_array)?;
    let last = messages.last()?;
    if last.get("role").and_then(Value::as_str) != Some("user")
        || !message_text(last).to_lowercase().contains(&trigger)
    {
        return None;
    }
    let name = match &settings.tool_name {
        Some(name) => name.clone(),
        None => tools
            .first()?
            .pointer("/function/name")
            .and_then(Value::as_str)?
            .to_string(),
    };
    Some((name, settings.tool_arguments.clone()))
}

/// The text of a message whose `content` is a string or an array of parts.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Splits text into word-sized tokens like a BPE tokenizer's: a word keeps the spaces before it,
/// and each CJK character, punctuation mark or emoji is a token of its own.
fn split_tokens(text: &str) -> Vec<String> {
    let is_word = |ch: char| ch.is_ascii_alphanumeric() || ch == '\'' || ch == '-';
    let mut tokens: Vec<String> = Vec::new();
    let mut current = String::new();
    for ch in text.chars() {
        let continues = match current.chars().last() {
            None => true,
            Some(prev) if prev.is_whitespace() => ch.is_whitespace() || is_word(ch),
            Some(prev) if is_word(prev) => is_word(ch),
            Some(_) => false,
        };
        if !continues {
            tokens.push(std::mem::take(&mut current));
        }
        current.push(ch);
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

/// Splits text into pieces of at most `chars` characters.
fn split_pieces(text: &str, chars: usize) -> Vec<String> {
    let all: Vec<char> = text.chars().collect();
    all.chunks(chars.max(1))
        .map(|piece| piece.iter().collect())
        .collect()
}

/// The finish chunk, the optional usage chunk, `[DONE]` and the end of the chunked body.
fn finish_sse(
    out: &mut TcpStream,
    reply: &ChatReply,
    finish_reason: &str,
    usage: Option<Value>,
) -> io::Result<()> {
    write_sse(out, &reply.chunk(json!({}), Some(finish_reason)))?;
    if let Some(usage) = usage {
        let mut chunk = reply.chunk(json!({}), None);
        chunk["choices"] = json!([]);
        chunk["usage"] = usage;
        write_sse(out, &chunk)?;
    }
    write_sse_raw(out, "[DONE]")?;
    out.write_all(b"0\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_upstream::test_client::{chat_body, fast, Client};
    use crate::mock_upstream::{serve, DEFAULT_LLM_REPLY};

    fn streamed_text(events: &[Value]) -> String {
        events
            .iter()
            .filter_map(|e| {
                e.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
            })
            .collect()
    }

    #[test]
    fn streamed_reply_first_token_waits_for_the_configured_delay() {
        let mock = serve(MockSettings {
            llm_first_token: Duration::from_millis(120),
            llm_token: Duration::from_millis(15),
            llm_reply: "One two three. Four five.".into(),
            ..MockSettings::default()
        })
        .expect("serve");
        let mut client = Client::connect(mock.addr());
        let sent = Instant::now();
        let response = client.request("POST", "/v1/chat/completions", &chat_body(true));
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        let first = response.chunks[0].0 - sent;
        assert!(
            first >= Duration::from_millis(120),
            "first chunk after {first:?}"
        );
        // 7 tokens: the last one is due 6 × 15 ms after the first.
        let (last_token_at, _) = response.chunks[6];
        let spread = last_token_at - response.chunks[0].0;
        assert!(
            spread >= Duration::from_millis(85),
            "tokens spread over {spread:?}"
        );
        let (events, done) = response.events();
        assert!(done);
        assert_eq!(streamed_text(&events), "One two three. Four five.");
        assert_eq!(events.len(), 8, "7 tokens and the finish chunk");
        assert_eq!(events[0]["object"], "chat.completion.chunk");
        assert_eq!(events[0]["model"], "m");
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[7]["choices"][0]["finish_reason"], "stop");
        assert_eq!(mock.stats().chat_requests, 1);
        assert_eq!(
            mock.chat_requests()[0]["messages"][1]["content"],
            "what is the weather"
        );
    }

    #[test]
    fn usage_chunk_is_sent_when_asked_for() {
        let mock = serve(fast()).expect("serve");
        let mut body = chat_body(true);
        body["stream_options"] = json!({"include_usage": true});
        let response = Client::connect(mock.addr()).request("POST", "/v1/chat/completions", &body);
        let (events, _) = response.events();
        let usage = events.last().expect("usage chunk");
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 21);
    }

    #[test]
    fn non_streaming_reply_is_one_completion() {
        let mock = serve(fast()).expect("serve");
        let response =
            Client::connect(mock.addr()).request("POST", "/v1/chat/completions", &chat_body(false));
        assert_eq!(response.status, 200);
        let body = response.json();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], DEFAULT_LLM_REPLY);
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn trigger_with_tools_gets_a_streamed_tool_call() {
        let mock = serve(MockSettings {
            tool_trigger: Some("VOLUME".into()),
            tool_arguments: r#"{"volume":80,"unit":"percent"}"#.into(),
            ..fast()
        })
        .expect("serve");
        let mut body = chat_body(true);
        body["messages"][1]["content"] = json!("set the volume to 80");
        body["tools"] = json!([{"type": "function", "function": {"name": "self_audio_speaker_set_volume", "parameters": {}}}]);
        let mut client = Client::connect(mock.addr());
        let (events, done) = client
            .request("POST", "/v1/chat/completions", &body)
            .events();
        assert!(done);
        let first = &events[0]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(first["function"]["name"], "self_audio_speaker_set_volume");
        assert_eq!(first["id"], "call_mock_1");
        let arguments: String = events
            .iter()
            .filter_map(|e| e.pointer("/choices/0/delta/tool_calls/0/function/arguments"))
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(arguments, r#"{"volume":80,"unit":"percent"}"#);
        assert_eq!(
            events.last().expect("finish")["choices"][0]["finish_reason"],
            "tool_calls"
        );
        // After the tool result the same user message gets text, not another call.
        body["messages"]
            .as_array_mut()
            .expect("messages")
            .push(json!({"role": "tool", "tool_call_id": "call_mock_1", "content": "ok"}));
        let (events, _) = client
            .request("POST", "/v1/chat/completions", &body)
            .events();
        assert_eq!(streamed_text(&events), DEFAULT_LLM_REPLY);
        // Without tools there is no call either.
        let mut plain = chat_body(false);
        plain["messages"][1]["content"] = json!("volume up");
        let response = client.request("POST", "/v1/chat/completions", &plain);
        assert_eq!(
            response.json()["choices"][0]["message"]["content"],
            DEFAULT_LLM_REPLY
        );
    }

    #[test]
    fn non_streaming_tool_call_has_the_whole_arguments() {
        let mock = serve(MockSettings {
            tool_trigger: Some("bye".into()),
            tool_name: Some("handle_exit_intent".into()),
            tool_arguments: r#"{"say_goodbye":"bye"}"#.into(),
            ..fast()
        })
        .expect("serve");
        let mut body = chat_body(false);
        body["messages"][1]["content"] = json!([{"type": "text", "text": "ok bye now"}]);
        body["tools"] = json!([{"type": "function", "function": {"name": "other"}}]);
        let response = Client::connect(mock.addr()).request("POST", "/v1/chat/completions", &body);
        let body = response.json();
        let call = &body["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "handle_exit_intent");
        assert_eq!(call["function"]["arguments"], r#"{"say_goodbye":"bye"}"#);
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn tokens_keep_leading_spaces_and_split_cjk() {
        assert_eq!(
            split_tokens("Hi, I'm here. 你好！"),
            ["Hi", ",", " I'm", " here", ".", " ", "你", "好", "！"]
        );
        assert_eq!(split_tokens(DEFAULT_LLM_REPLY).concat(), DEFAULT_LLM_REPLY);
    }
}
