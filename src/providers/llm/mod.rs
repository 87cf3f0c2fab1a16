//! Large-language-model providers: the dialogue message type, the events a streamed reply
//! produces, and the OpenAI-compatible Chat Completions client ([`openai::stream_chat`]).
//!
//! A reply streams as [`LlmEvent`]s through a callback, so the caller can feed text to TTS as it
//! arrives; the call then returns an [`LlmSummary`] with the merged tool calls.

pub mod offline;
pub mod openai;
mod think;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::providers::http_client::HttpError;

pub use offline::OfflineResponder;
pub use openai::{stream_chat, OpenAiSettings};
pub use think::ThinkFilter;

/// Who wrote a dialogue message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One dialogue message, in the OpenAI Chat Completions shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// Text; `None` for an assistant message that only calls tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Assistant tool calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// For `Role::Tool`: the id of the call this message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Optional author name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with text content only.
    pub fn text(role: Role, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role,
            content: Some(content.into()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }

    /// A system prompt.
    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::text(Role::System, content)
    }

    /// What the user said.
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::text(Role::User, content)
    }

    /// What the assistant answered.
    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage::text(Role::Assistant, content)
    }

    /// The assistant turn that made `calls` (goes into the history before the tool results).
    pub fn assistant_tool_calls(calls: &[ToolCall]) -> ChatMessage {
        let calls = calls
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                })
            })
            .collect();
        ChatMessage {
            tool_calls: Some(Value::Array(calls)),
            content: None,
            ..ChatMessage::assistant("")
        }
    }

    /// A tool's result, answering the call with id `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            tool_call_id: Some(call_id.into()),
            ..ChatMessage::text(Role::Tool, content)
        }
    }
}

/// Something the model streamed.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmEvent {
    /// Visible reply text (with `<think>` blocks removed); never empty.
    Text(String),
    /// A piece of tool call number `index`; `id` and `name` usually come with the first piece.
    ToolCallDelta {
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments_fragment: String,
    },
}

/// A complete tool call, merged from its deltas.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCall {
    pub index: u32,
    pub id: String,
    pub name: String,
    /// JSON text, as the model wrote it (may be invalid JSON).
    pub arguments: String,
}

/// Token counts, when the provider reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// How a streamed reply ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LlmSummary {
    /// All visible text (the concatenated [`LlmEvent::Text`]s).
    pub text: String,
    /// `stop`, `length`, `tool_calls`, … (`None` if the provider sent none).
    pub finish_reason: Option<String>,
    /// Tool calls merged by index, in index order.
    pub tool_calls: Vec<ToolCall>,
    pub usage: Option<Usage>,
}

/// Why a chat call failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The HTTP exchange failed (including a non-2xx status, with a body snippet).
    #[error(transparent)]
    Http(#[from] HttpError),
    /// No content arrived within the first-token timeout (counted from the call).
    #[error("no first token within {0:?}")]
    FirstTokenTimeout(Duration),
    /// The reply did not finish within the total timeout.
    #[error("reply not finished within {0:?}")]
    TotalTimeout(Duration),
    /// The event stream broke off or could not be decoded.
    #[error("event stream: {0}")]
    Stream(String),
    /// A stream chunk was not a Chat Completions chunk.
    #[error("bad chunk: {0}")]
    BadChunk(String),
    /// The provider reported an error inside the stream.
    #[error("provider error: {0}")]
    Api(String),
    /// The stream ended without `[DONE]` or a finish reason.
    #[error("stream ended before the reply finished")]
    Truncated,
}
