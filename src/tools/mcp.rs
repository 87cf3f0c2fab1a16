//! The MCP client of one session (spec §12): the device runs an MCP server and we are its
//! client, over `{"type":"mcp","payload":<JSON-RPC 2.0>}` on the device's own channel.
//!
//! [`McpClient`] is a state machine with no I/O: the session hands it what the device sent and
//! sends the payloads it returns. After hello it sends `initialize` (id 1, with the vision
//! capability when configured), then `notifications/initialized` and `tools/list` (id 2, paged
//! with `cursor`/`nextCursor`, the same id per page as the reference), and keeps the tool list.
//! `tools/call` requests get ids from 10000 up (the range the MQTT gateway uses, clear of 1 and
//! 2) and are matched to responses by id, each with a deadline. Everything is bounded: pending
//! requests, tools kept, pages read, the size of a tool's description and schema. Anything
//! malformed or unexpected from the device is logged, counted and ignored.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Id of `initialize`.
const INITIALIZE_ID: u64 = 1;
/// Id of every `tools/list` page.
const LIST_ID: u64 = 2;
/// First id of `tools/call` requests.
const FIRST_CALL_ID: u64 = 10_000;
/// Longest tool description kept, bytes.
const MAX_DESCRIPTION_BYTES: usize = 1024;
/// Largest input schema kept (serialised), bytes; a larger one is replaced by an empty object.
const MAX_SCHEMA_BYTES: usize = 4096;
/// Longest tool name accepted, bytes.
const MAX_NAME_BYTES: usize = 128;

/// What the MCP client reads from config.
#[derive(Debug, Clone)]
pub struct McpSettings {
    /// Deadline of each request.
    pub call_timeout: Duration,
    /// Most `tools/call` requests awaiting an answer.
    pub max_pending_calls: usize,
    /// Most tools kept per session.
    pub max_tools: usize,
    /// Most `tools/list` pages read.
    pub max_pages: u32,
    /// `capabilities.vision{url,token}` for `initialize`, when configured.
    pub vision: Option<(String, String)>,
}

/// One tool the device offers.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTool {
    /// The device's name for it, e.g. `self.audio_speaker.set_volume`.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON schema of its arguments.
    pub input_schema: Value,
}

/// Something the session must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum McpEvent {
    /// The tool list is complete (all pages read, or the page limit reached).
    ToolsReady,
    /// A `tools/call` finished: the result text, or why it failed.
    CallDone {
        /// Turn that made the call.
        turn: u32,
        /// The LLM's (or the offline responder's) id of the call.
        call_id: String,
        /// Result text, or the error.
        result: Result<String, String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Pending {
    Initialize,
    List,
    Call { turn: u32, call_id: String },
}

/// Counters of what the MCP client saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct McpCounters {
    /// `tools/call` requests sent.
    pub calls: u64,
    /// Calls answered with an error (JSON-RPC error or `isError`).
    pub call_errors: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Calls dropped by abort or a new turn before their answer.
    pub cancelled: u64,
    /// Messages from the device that were malformed or answered nothing pending (ignored).
    pub ignored: u64,
}

/// The MCP client state of one session (see the module docs).
#[derive(Debug)]
pub struct McpClient {
    settings: McpSettings,
    /// The session id, for logs.
    session: String,
    started: bool,
    tools: Vec<DeviceTool>,
    pages: u32,
    pending: Vec<(u64, Pending, Instant)>,
    next_call_id: u64,
    /// Counters.
    pub counters: McpCounters,
}

impl McpClient {
    /// A client for session `session` (named in its logs) that has not started yet.
    pub fn new(settings: McpSettings, session: String) -> McpClient {
        McpClient {
            settings,
            session,
            started: false,
            tools: Vec::new(),
            pages: 0,
            pending: Vec::new(),
            next_call_id: FIRST_CALL_ID,
            counters: McpCounters::default(),
        }
    }

    /// The tools the device announced so far.
    pub fn tools(&self) -> &[DeviceTool] {
        &self.tools
    }

    /// Number of requests awaiting an answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// True while `initialize` or a `tools/list` page awaits its answer: the tool list is not
    /// known yet.
    pub fn discovering(&self) -> bool {
        self.pending
            .iter()
            .any(|(_, p, _)| matches!(p, Pending::Initialize | Pending::List))
    }

    /// Starts the sequence (once per session): the `initialize` request to send.
    pub fn start(&mut self, now: Instant) -> Option<Value> {
        if self.started {
            return None;
        }
        self.started = true;
        let mut capabilities = json!({"roots": {"listChanged": true}, "sampling": {}});
        if let Some((url, token)) = &self.settings.vision {
            capabilities["vision"] = json!({"url": url, "token": token});
        }
        self.track(INITIALIZE_ID, Pending::Initialize, now);
        Some(request(
            INITIALIZE_ID,
            "initialize",
            json!({
                "protocolVersion": "2024-11-05",
                "capabilities": capabilities,
                "clientInfo": {"name": "xiaozhi-tpc", "version": env!("CARGO_PKG_VERSION")},
            }),
        ))
    }

    fn track(&mut self, id: u64, what: Pending, now: Instant) {
        self.pending.retain(|(i, _, _)| *i != id);
        self.pending
            .push((id, what, now + self.settings.call_timeout));
    }

    /// Sends `tools/call` for `name` with `arguments`; the payload to send, or why not.
    pub fn call(
        &mut self,
        name: &str,
        arguments: Value,
        turn: u32,
        call_id: &str,
        now: Instant,
    ) -> Result<Value, String> {
        let calls = self
            .pending
            .iter()
            .filter(|(_, p, _)| matches!(p, Pending::Call { .. }))
            .count();
        if calls >= self.settings.max_pending_calls {
            return Err(format!(
                "too many device tool calls in flight (limit {})",
                self.settings.max_pending_calls
            ));
        }
        let id = self.next_call_id;
        self.next_call_id = if id >= u64::from(u32::MAX) {
            FIRST_CALL_ID
        } else {
            id + 1
        };
        self.counters.calls += 1;
        self.track(
            id,
            Pending::Call {
                turn,
                call_id: call_id.to_string(),
            },
            now,
        );
        Ok(request(
            id,
            "tools/call",
            json!({"name": name, "arguments": arguments}),
        ))
    }

    /// Drops every pending call not made by `keep_turn` (abort, a new turn); returns how many.
    pub fn cancel_calls_except(&mut self, keep_turn: Option<u32>) -> usize {
        let before = self.pending.len();
        self.pending.retain(|(_, p, _)| match p {
            Pending::Call { turn, .. } => Some(*turn) == keep_turn,
            _ => true,
        });
        let n = before - self.pending.len();
        self.counters.cancelled += n as u64;
        n
    }

    /// The earliest request deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|(_, _, d)| *d).min()
    }

    /// Expires requests whose deadline has passed.
    pub fn on_timer(&mut self, now: Instant, events: &mut Vec<McpEvent>) {
        let mut expired = Vec::new();
        self.pending.retain(|(id, p, d)| {
            if now >= *d {
                expired.push((*id, p.clone()));
                false
            } else {
                true
            }
        });
        for (id, p) in expired {
            self.counters.timeouts += 1;
            match p {
                Pending::Call { turn, call_id } => {
                    tracing::info!(session = %self.session, id, "device tool call timed out");
                    events.push(McpEvent::CallDone {
                        turn,
                        call_id,
                        result: Err(format!(
                            "the device did not answer within {} ms",
                            self.settings.call_timeout.as_millis()
                        )),
                    });
                }
                Pending::Initialize => {
                    tracing::info!(session = %self.session, "device did not answer MCP initialize; no device tools");
                }
                Pending::List => {
                    tracing::info!(
                        session = %self.session,
                        tools = self.tools.len(),
                        "device did not answer tools/list; keeping the tools read so far"
                    );
                    events.push(McpEvent::ToolsReady);
                }
            }
        }
    }

    /// Handles one `mcp` payload from the device; requests to send go to `sends`.
    pub fn on_message(
        &mut self,
        payload: &Value,
        now: Instant,
        sends: &mut Vec<Value>,
        events: &mut Vec<McpEvent>,
    ) {
        let Some(obj) = payload.as_object() else {
            return self.ignore("payload is not a JSON object");
        };
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return self.ignore("not JSON-RPC 2.0");
        }
        if let Some(method) = obj.get("method").and_then(Value::as_str) {
            // A notification or a request from the device: nothing to do but log it.
            tracing::debug!(session = %self.session, method, "device MCP message");
            return;
        }
        let Some(id) = obj.get("id").and_then(id_number) else {
            return self.ignore("response without a usable id");
        };
        let Some(pos) = self.pending.iter().position(|(i, _, _)| *i == id) else {
            return self.ignore("response to no pending request (late or unknown id)");
        };
        let (_, what, _) = self.pending.remove(pos);
        let outcome = match (obj.get("result"), obj.get("error")) {
            (Some(result), None) => Ok(result),
            (None, Some(error)) => Err(error_text(error)),
            _ => Err("response has neither result nor error (or both)".to_string()),
        };
        match what {
            Pending::Initialize => match outcome {
                Ok(_) => {
                    sends.push(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
                    self.pages = 0;
                    self.tools.clear();
                    self.list_page(None, now, sends);
                }
                Err(e) => {
                    tracing::info!(session = %self.session, error = %e, "device refused MCP initialize")
                }
            },
            Pending::List => match outcome {
                Ok(result) => self.on_list(result, now, sends, events),
                Err(e) => {
                    tracing::info!(session = %self.session, error = %e, "device refused tools/list");
                    events.push(McpEvent::ToolsReady);
                }
            },
            Pending::Call { turn, call_id } => {
                let result = outcome.and_then(call_result);
                if result.is_err() {
                    self.counters.call_errors += 1;
                }
                events.push(McpEvent::CallDone {
                    turn,
                    call_id,
                    result,
                });
            }
        }
    }

    fn list_page(&mut self, cursor: Option<&str>, now: Instant, sends: &mut Vec<Value>) {
        self.pages += 1;
        self.track(LIST_ID, Pending::List, now);
        let params = match cursor {
            Some(c) => json!({"cursor": c}),
            None => json!({}),
        };
        sends.push(request(LIST_ID, "tools/list", params));
    }

    fn on_list(
        &mut self,
        result: &Value,
        now: Instant,
        sends: &mut Vec<Value>,
        events: &mut Vec<McpEvent>,
    ) {
        let Some(tools) = result.get("tools").and_then(Value::as_array) else {
            self.ignore("tools/list result without a tools array");
            events.push(McpEvent::ToolsReady);
            return;
        };
        for t in tools {
            if self.tools.len() >= self.settings.max_tools {
                tracing::info!(
                    session = %self.session,
                    max = self.settings.max_tools,
                    "device offers more tools than kept; the rest are ignored"
                );
                break;
            }
            match parse_tool(t) {
                Some(tool) if !self.tools.iter().any(|x| x.name == tool.name) => {
                    self.tools.push(tool)
                }
                Some(_) => {}
                None => self.ignore("tool without a usable name"),
            }
        }
        let cursor = result
            .get("nextCursor")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty());
        match cursor {
            Some(c)
                if self.pages < self.settings.max_pages
                    && self.tools.len() < self.settings.max_tools =>
            {
                let c = c.to_string();
                self.list_page(Some(&c), now, sends);
            }
            _ => {
                tracing::debug!(
                    session = %self.session,
                    tools = self.tools.len(),
                    pages = self.pages,
                    "device tools listed"
                );
                events.push(McpEvent::ToolsReady);
            }
        }
    }

    fn ignore(&mut self, why: &str) {
        self.counters.ignored += 1;
        tracing::info!(session = %self.session, reason = why, "device MCP message ignored");
    }
}

fn request(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// A JSON-RPC id as a number (devices echo ours; a numeric string is accepted).
fn id_number(id: &Value) -> Option<u64> {
    match id {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn error_text(error: &Value) -> String {
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("unknown error");
    match error.get("code").and_then(Value::as_i64) {
        Some(code) => format!("{message} (code {code})"),
        None => message.to_string(),
    }
}

/// The text of a `tools/call` result: its text parts joined; `isError` makes it an error.
fn call_result(result: &Value) -> Result<String, String> {
    let text = match result.get("content").and_then(Value::as_array) {
        Some(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        None => return Err("tools/call result without content".to_string()),
    };
    if result.get("isError").and_then(Value::as_bool) == Some(true) {
        Err(if text.is_empty() {
            "the tool failed".to_string()
        } else {
            text
        })
    } else {
        Ok(text)
    }
}

fn parse_tool(t: &Value) -> Option<DeviceTool> {
    let name = t.get("name")?.as_str()?;
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return None;
    }
    let mut description = t
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    super::truncate_utf8(&mut description, MAX_DESCRIPTION_BYTES);
    let schema = t
        .get("inputSchema")
        .filter(|s| s.is_object())
        .filter(|s| s.to_string().len() <= MAX_SCHEMA_BYTES)
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    Some(DeviceTool {
        name: name.to_string(),
        description,
        input_schema: schema,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> McpSettings {
        McpSettings {
            call_timeout: Duration::from_secs(5),
            max_pending_calls: 2,
            max_tools: 3,
            max_pages: 2,
            vision: None,
        }
    }

    fn tool(name: &str) -> Value {
        json!({"name": name, "description": "d", "inputSchema": {"type": "object"}})
    }

    /// A client whose `initialize` was answered (its first `tools/list` is pending).
    fn initialized(now: Instant) -> McpClient {
        let mut c = McpClient::new(settings(), "s".into());
        c.start(now);
        c.on_message(
            &json!({"jsonrpc":"2.0","id":1,"result":{}}),
            now,
            &mut vec![],
            &mut vec![],
        );
        c
    }

    /// A client that has read `tools`, in one page.
    fn ready(tools: &[&str], now: Instant) -> McpClient {
        let mut c = initialized(now);
        let (mut sends, mut events) = (vec![], vec![]);
        let list: Vec<Value> = tools.iter().map(|t| tool(t)).collect();
        c.on_message(
            &json!({"jsonrpc":"2.0","id":2,"result":{"tools": list}}),
            now,
            &mut sends,
            &mut events,
        );
        assert_eq!(events, vec![McpEvent::ToolsReady]);
        c
    }

    #[test]
    fn initialize_carries_vision_only_when_configured() {
        let now = Instant::now();
        let mut c = McpClient::new(settings(), "s".into());
        let init = c.start(now).unwrap();
        assert_eq!(init["id"], 1);
        assert_eq!(init["method"], "initialize");
        assert!(init["params"]["capabilities"].get("vision").is_none());
        assert!(c.start(now).is_none(), "once per session");
        let mut c = McpClient::new(
            McpSettings {
                vision: Some(("http://v/explain".into(), "tok".into())),
                ..settings()
            },
            "s".into(),
        );
        let init = c.start(now).unwrap();
        assert_eq!(
            init["params"]["capabilities"]["vision"],
            json!({"url":"http://v/explain","token":"tok"})
        );
    }

    #[test]
    fn tools_list_follows_next_cursor_up_to_the_page_limit() {
        let now = Instant::now();
        let mut c = McpClient::new(settings(), "s".into());
        c.start(now);
        let (mut sends, mut events) = (vec![], vec![]);
        c.on_message(
            &json!({"jsonrpc":"2.0","id":1,"result":{"capabilities":{"tools":{}}}}),
            now,
            &mut sends,
            &mut events,
        );
        assert_eq!(sends[0]["method"], "notifications/initialized");
        assert_eq!(sends[1]["method"], "tools/list");
        assert_eq!(sends[1]["id"], 2);
        sends.clear();
        c.on_message(
            &json!({"jsonrpc":"2.0","id":2,"result":{"tools":[tool("a")],"nextCursor":"p2"}}),
            now,
            &mut sends,
            &mut events,
        );
        assert_eq!(sends[0]["params"]["cursor"], "p2");
        assert!(events.is_empty());
        sends.clear();
        // Page 2 of at most 2: a further cursor is not followed.
        c.on_message(
            &json!({"jsonrpc":"2.0","id":2,"result":{"tools":[tool("b"),tool("a")],"nextCursor":"p3"}}),
            now,
            &mut sends,
            &mut events,
        );
        assert!(sends.is_empty());
        assert_eq!(events, vec![McpEvent::ToolsReady]);
        let names: Vec<_> = c.tools().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "duplicates dropped");
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn tool_count_is_bounded() {
        let c = ready(&["a", "b", "c", "d", "e"], Instant::now());
        assert_eq!(c.tools().len(), 3);
    }

    #[test]
    fn calls_get_ids_from_10000_and_results_match_by_id() {
        let now = Instant::now();
        let mut c = ready(&["self.x"], now);
        let p1 = c.call("self.x", json!({"v":1}), 7, "call_a", now).unwrap();
        let p2 = c.call("self.x", json!({}), 7, "call_b", now).unwrap();
        assert_eq!(p1["id"], 10_000);
        assert_eq!(p2["id"], 10_001);
        assert_eq!(p1["params"], json!({"name":"self.x","arguments":{"v":1}}));
        assert!(c.call("self.x", json!({}), 7, "c", now).is_err(), "bounded");
        let (mut sends, mut events) = (vec![], vec![]);
        c.on_message(
            &json!({"jsonrpc":"2.0","id":10001,"error":{"code":-32601,"message":"Unknown tool"}}),
            now,
            &mut sends,
            &mut events,
        );
        c.on_message(
            &json!({"jsonrpc":"2.0","id":10000,"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}),
            now,
            &mut sends,
            &mut events,
        );
        assert_eq!(
            events,
            vec![
                McpEvent::CallDone {
                    turn: 7,
                    call_id: "call_b".into(),
                    result: Err("Unknown tool (code -32601)".into())
                },
                McpEvent::CallDone {
                    turn: 7,
                    call_id: "call_a".into(),
                    result: Ok("ok".into())
                },
            ]
        );
        assert_eq!(c.counters.call_errors, 1);
    }

    #[test]
    fn is_error_results_are_errors() {
        let now = Instant::now();
        let mut c = ready(&["t"], now);
        c.call("t", json!({}), 1, "c", now).unwrap();
        let mut events = vec![];
        c.on_message(
            &json!({"jsonrpc":"2.0","id":10000,"result":{"content":[{"type":"text","text":"工具调用失败"}],"isError":true}}),
            now,
            &mut vec![],
            &mut events,
        );
        assert!(
            matches!(&events[0], McpEvent::CallDone { result: Err(e), .. } if e == "工具调用失败")
        );
    }

    #[test]
    fn calls_time_out_and_cancel_removes_them() {
        let now = Instant::now();
        let mut c = ready(&["t"], now);
        c.call("t", json!({}), 1, "a", now).unwrap();
        c.call("t", json!({}), 2, "b", now).unwrap();
        assert_eq!(c.cancel_calls_except(Some(2)), 1);
        assert_eq!(c.pending(), 1);
        assert_eq!(c.next_deadline(), Some(now + Duration::from_secs(5)));
        let mut events = vec![];
        c.on_timer(now + Duration::from_secs(4), &mut events);
        assert!(events.is_empty());
        c.on_timer(now + Duration::from_secs(5), &mut events);
        assert!(matches!(
            &events[0],
            McpEvent::CallDone {
                turn: 2,
                result: Err(_),
                ..
            }
        ));
        assert_eq!(c.pending(), 0);
        assert_eq!((c.counters.timeouts, c.counters.cancelled), (1, 1));
    }

    #[test]
    fn a_device_that_never_answers_initialize_ends_with_no_tools_and_nothing_pending() {
        let now = Instant::now();
        let mut c = McpClient::new(settings(), "s".into());
        c.start(now);
        assert_eq!(c.next_deadline(), Some(now + Duration::from_secs(5)));
        let mut events = vec![];
        c.on_timer(now + Duration::from_secs(5), &mut events);
        assert!(events.is_empty());
        assert_eq!(
            (c.pending(), c.tools().len(), c.counters.timeouts),
            (0, 0, 1)
        );
        assert_eq!(c.next_deadline(), None);
        // A late initialize result is ignored: no tools/list follows.
        let mut sends = vec![];
        c.on_message(
            &json!({"jsonrpc":"2.0","id":1,"result":{}}),
            now,
            &mut sends,
            &mut events,
        );
        assert!(sends.is_empty());
    }

    #[test]
    fn a_tools_list_page_that_never_comes_keeps_the_tools_read_so_far() {
        let now = Instant::now();
        let mut c = initialized(now);
        let (mut sends, mut events) = (vec![], vec![]);
        c.on_message(
            &json!({"jsonrpc":"2.0","id":2,"result":{"tools":[tool("a")],"nextCursor":"p2"}}),
            now,
            &mut sends,
            &mut events,
        );
        c.on_timer(now + Duration::from_secs(6), &mut events);
        assert_eq!(events, vec![McpEvent::ToolsReady]);
        assert_eq!(c.tools().len(), 1);
    }

    #[test]
    fn malformed_and_unexpected_messages_are_ignored() {
        let now = Instant::now();
        let mut c = ready(&["t"], now);
        c.call("t", json!({}), 1, "a", now).unwrap();
        let (mut sends, mut events) = (vec![], vec![]);
        for bad in [
            json!("text"),
            json!(42),
            json!({"id": 10000, "result": {}}),
            json!({"jsonrpc":"2.0","id":{"x":1},"result":{}}),
            json!({"jsonrpc":"2.0","id":99999,"result":{}}),
            json!({"jsonrpc":"2.0","id":-1,"result":{}}),
            json!({"jsonrpc":"2.0","id":2,"result":{"tools":"many"}}),
        ] {
            c.on_message(&bad, now, &mut sends, &mut events);
        }
        c.on_message(
            &json!({"jsonrpc":"2.0","method":"notifications/state_changed","params":{}}),
            now,
            &mut sends,
            &mut events,
        );
        assert!(sends.is_empty() && events.is_empty(), "{events:?}");
        assert_eq!(c.counters.ignored, 7);
        assert_eq!(c.pending(), 1, "the real call is still pending");
        // A response with neither result nor error fails the call, it does not hang it.
        c.on_message(
            &json!({"jsonrpc":"2.0","id":10000}),
            now,
            &mut sends,
            &mut events,
        );
        assert!(matches!(
            &events[0],
            McpEvent::CallDone { result: Err(_), .. }
        ));
    }
}
