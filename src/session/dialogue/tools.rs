//! Tool rounds of a turn: the LLM's tool calls go out as [`ToolInvocation`]s, their results come
//! back through [`Dialogue::on_tool_result`], and when every result of the round is in the model
//! is asked again (at most `max_tool_rounds` rounds; the request after the last goes without
//! tools). The offline responder's device commands (volume) use the same calls, one step at a
//! time ([`OfflineStep`]). A tool result of the form `{"action":"RESPONSE","response":…}` is
//! spoken as the answer without asking the model again.

use std::time::Instant;

use super::turn::{Answer, Turn};
use super::{Dialogue, Output, Request, ToolInvocation};
use crate::providers::llm::openai::ChatMessage;
use crate::providers::llm::ToolCall;
use crate::tools::intents::{self, DeviceCommand, VolumeTools};

/// A step of an offline device command waiting for a tool result.
#[derive(Debug, Clone, Copy)]
pub(super) enum OfflineStep {
    /// Reading the status to change the volume by this much.
    ReadVolume { change: i32, zh: bool },
    /// Setting the volume to this value.
    SetVolume { volume: u8, zh: bool },
}

impl Dialogue {
    /// The LLM round of turn `turn` ended with `calls` (within the round limit): ask for them;
    /// the answer goes on when their results are in.
    pub(super) fn start_tool_round(
        &mut self,
        turn: u32,
        mut calls: Vec<ToolCall>,
        now: Instant,
        out: &mut Output,
    ) {
        let max = self.settings.max_calls_per_round;
        let Some(answer) = answer_of(&mut self.turn, turn) else {
            return;
        };
        answer.tool_rounds += 1;
        // Results are matched by call id: give a missing or repeated one a unique id.
        for i in 0..calls.len() {
            if calls[i].id.is_empty() || calls[..i].iter().any(|c| c.id == calls[i].id) {
                calls[i].id = format!("call_{turn}_{}_{i}", answer.tool_rounds);
            }
        }
        answer
            .messages
            .push(ChatMessage::assistant_tool_calls(&calls));
        let mut refused = Vec::new();
        for (i, call) in calls.into_iter().enumerate() {
            answer.awaiting.push((call.id.clone(), None));
            if i < max {
                self.counters.tool_calls += 1;
                out.calls.push(ToolInvocation {
                    turn,
                    call_id: call.id,
                    name: call.name,
                    arguments: call.arguments,
                });
            } else {
                refused.push(call.id);
            }
        }
        self.request_tts(now, out);
        for id in refused {
            let e = format!("only {max} tool calls are carried out per round");
            self.on_tool_result(turn, &id, Err(e), now, out);
        }
    }

    /// The offline responder carries out a device command with the device's tools.
    pub(super) fn offline_command(
        &mut self,
        turn: u32,
        cmd: DeviceCommand,
        zh: bool,
        now: Instant,
        out: &mut Output,
    ) {
        let VolumeTools { set, status } = &self.volume_tools;
        let (step, tool, arguments) = match (cmd, set, status) {
            (DeviceCommand::SetVolume(volume), Some(set), _) => (
                OfflineStep::SetVolume { volume, zh },
                set.clone(),
                serde_json::json!({ "volume": volume }),
            ),
            (DeviceCommand::ChangeVolume(change), Some(_), Some(status)) => (
                OfflineStep::ReadVolume { change, zh },
                status.clone(),
                serde_json::json!({}),
            ),
            _ => {
                self.on_llm_text(turn, intents::no_volume_tool(zh), now, out);
                self.on_llm_done(turn, Ok(Vec::new()), now, out);
                return;
            }
        };
        self.offline_call(turn, step, &tool, arguments, out);
    }

    fn offline_call(
        &mut self,
        turn: u32,
        step: OfflineStep,
        tool: &str,
        arguments: serde_json::Value,
        out: &mut Output,
    ) {
        let call_id = format!("offline_{}", self.next_call);
        self.next_call += 1;
        let Some(answer) = answer_of(&mut self.turn, turn) else {
            return;
        };
        answer.offline_step = Some(step);
        answer.awaiting = vec![(call_id.clone(), None)];
        self.counters.tool_calls += 1;
        out.calls.push(ToolInvocation {
            turn,
            call_id,
            name: tool.to_string(),
            arguments: arguments.to_string(),
        });
    }

    /// The result of tool call `call_id` of turn `turn` (a late or unknown one is ignored).
    pub fn on_tool_result(
        &mut self,
        turn: u32,
        call_id: &str,
        result: Result<String, String>,
        now: Instant,
        out: &mut Output,
    ) {
        let max = self.settings.max_tool_result_bytes;
        let sid = self.session_id.clone();
        let Some(answer) = answer_of(&mut self.turn, turn) else {
            return;
        };
        let Some(slot) = answer
            .awaiting
            .iter_mut()
            .find(|(id, r)| id == call_id && r.is_none())
        else {
            return;
        };
        let result = result.map(|mut text| {
            if let Some(reply) = direct_response(&text) {
                answer.direct_reply = Some(reply);
            }
            crate::tools::truncate_utf8(&mut text, max);
            text
        });
        if let Err(e) = &result {
            tracing::info!(session = %sid, call = call_id, error = %e, "tool call failed");
        }
        slot.1 = Some(result);
        if answer.awaiting.iter().any(|(_, r)| r.is_none()) {
            return;
        }
        let results = std::mem::take(&mut answer.awaiting);
        if let Some(step) = answer.offline_step.take() {
            let result = results.into_iter().next().and_then(|(_, r)| r);
            return self.offline_result(turn, step, result, now, out);
        }
        if let Some(reply) = answer.direct_reply.take() {
            // The tool answered for the model (the reference's vision tool does): say it.
            self.on_llm_text(turn, &reply, now, out);
            return self.on_llm_done(turn, Ok(Vec::new()), now, out);
        }
        for (id, r) in results {
            let content = match r {
                Some(Ok(text)) => text,
                Some(Err(e)) => format!("error: {e}"),
                None => continue,
            };
            answer.messages.push(ChatMessage::tool_result(id, content));
        }
        let tools = if answer.tool_rounds < self.settings.max_tool_rounds {
            self.tools.clone()
        } else {
            None
        };
        out.requests.push(Request::Llm {
            turn,
            messages: answer.messages.clone(),
            tools,
        });
    }

    fn offline_result(
        &mut self,
        turn: u32,
        step: OfflineStep,
        result: Option<Result<String, String>>,
        now: Instant,
        out: &mut Output,
    ) {
        let reply = match (step, result) {
            (OfflineStep::ReadVolume { change, zh }, Some(Ok(status))) => {
                match intents::volume_in_status(&status) {
                    Some(v) => {
                        let volume = (i32::from(v) + change).clamp(0, 100) as u8;
                        let step = OfflineStep::SetVolume { volume, zh };
                        let arguments = serde_json::json!({ "volume": volume });
                        // Checked before the status was read.
                        let set = self.volume_tools.set.clone().unwrap_or_default();
                        return self.offline_call(turn, step, &set, arguments, out);
                    }
                    None => intents::command_failed(zh).to_string(),
                }
            }
            (OfflineStep::SetVolume { volume, zh }, Some(Ok(_))) => intents::volume_set(volume, zh),
            (OfflineStep::ReadVolume { zh, .. } | OfflineStep::SetVolume { zh, .. }, _) => {
                intents::command_failed(zh).to_string()
            }
        };
        self.on_llm_text(turn, &reply, now, out);
        self.on_llm_done(turn, Ok(Vec::new()), now, out);
    }
}

/// The text of a tool result that asks to be spoken as it is, as the reference's tools do
/// (`{"action":"RESPONSE","response":"…"}`).
fn direct_response(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    if v.get("action")?.as_str()? != "RESPONSE" {
        return None;
    }
    let reply = v.get("response")?.as_str()?.trim();
    (!reply.is_empty()).then(|| reply.to_string())
}

/// The LLM/tool state of turn `id` while it is being answered (a call for any other turn, or a
/// turn past answering, is stale).
fn answer_of(turn: &mut Option<Turn>, id: u32) -> Option<&mut Answer> {
    turn.as_mut()
        .filter(|t| t.id == id)
        .and_then(|t| t.answer_mut())
}
