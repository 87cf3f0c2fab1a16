//! Device tools meet the dialogue here: the session carries out the tool calls its dialogue
//! queued (a device call goes out as MCP `tools/call` and its answer, error or timeout comes
//! back later; IoT and server tools answer at once) and offers the merged [`ToolSet`] to it.

use std::rc::Rc;
use std::time::Instant;

use serde_json::{json, Value};

use super::dialogue::{Output, ToolInvocation};
use super::{Outgoing, Session};
use crate::protocol::ServerMessage;
use crate::tools::iot::IotThings;
use crate::tools::mcp::McpEvent;
use crate::tools::server::ToolContext;
use crate::tools::{ToolSet, ToolTarget};

impl Session {
    /// Carries out one tool call: a device call goes out as `tools/call` (its answer comes
    /// later), the others answer at once.
    pub(super) fn dispatch_call(
        &mut self,
        call: ToolInvocation,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let ToolInvocation {
            turn,
            call_id,
            name,
            arguments,
        } = call;
        let args = match arguments.trim() {
            "" => Ok(json!({})),
            text => match serde_json::from_str::<Value>(text) {
                Ok(v @ Value::Object(_)) => Ok(v),
                _ => Err(format!("arguments of {name} are not a JSON object")),
            },
        };
        let result = match (args, self.toolset.resolve(&name).cloned()) {
            (Err(e), _) => Err(e),
            (_, None) => Err(format!("there is no tool named {name}")),
            (Ok(args), Some(ToolTarget::Device(device_name))) => match self.mcp_client.as_mut() {
                Some(c) => match c.call(&device_name, args, turn, &call_id, now) {
                    Ok(payload) => {
                        tracing::debug!(session = %self.id, tool = %device_name, "device tool call");
                        self.send(out, ServerMessage::Mcp { payload: &payload });
                        return;
                    }
                    Err(e) => Err(e),
                },
                None => Err("the device has no MCP tools".to_string()),
            },
            (Ok(args), Some(ToolTarget::IotMethod { thing, method })) => {
                let commands = IotThings::command(&thing, &method, &args);
                self.send(
                    out,
                    ServerMessage::Iot {
                        commands: &commands,
                    },
                );
                Ok(format!("{thing}.{method} sent to the device"))
            }
            (Ok(_), Some(ToolTarget::IotState { thing })) => self.iot.state_text(&thing),
            (Ok(args), Some(ToolTarget::Server(i))) => match self.settings.tools.server.get(i) {
                Some(tool) => {
                    let result = tool.call(
                        &args,
                        &ToolContext {
                            now_unix: crate::clock::unix_now(),
                            tz_offset_minutes: self.settings.dialogue.tz_offset_minutes,
                            device_id: &self.identity.device_id,
                            user_text: self.dialogue.user_text(),
                        },
                    );
                    if result.is_ok() && tool.ends_session() {
                        // As after an exit phrase: goodbye and close once this turn is spoken.
                        self.dialogue.close_after_turn(turn);
                    }
                    result
                }
                None => Err(format!("there is no tool named {name}")),
            },
        };
        self.on_tool_done(turn, &call_id, result, now, out);
    }

    pub(super) fn on_tool_done(
        &mut self,
        turn: u32,
        call_id: &str,
        result: Result<String, String>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let mut d = Output::default();
        self.dialogue
            .on_tool_result(turn, call_id, result, now, &mut d);
        self.absorb(d, now, out);
    }

    pub(super) fn on_mcp_events(
        &mut self,
        events: Vec<McpEvent>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        for event in events {
            match event {
                McpEvent::ToolsReady => self.rebuild_tools(),
                McpEvent::CallDone {
                    turn,
                    call_id,
                    result,
                } => self.on_tool_done(turn, &call_id, result, now, out),
            }
        }
    }

    /// Offers the current device, IoT and server tools to the dialogue.
    pub(super) fn rebuild_tools(&mut self) {
        let device = self.mcp_client.as_ref().map_or(&[][..], |c| c.tools());
        self.toolset = Rc::new(ToolSet::build(
            &self.settings.tools.server,
            device,
            &self.iot,
            self.settings.tools.max_tools,
        ));
        let toolset = &self.toolset;
        self.dialogue
            .set_tools(toolset.openai_tools().cloned(), toolset.volume_tools());
        tracing::debug!(session = %self.id, tools = toolset.len(), "tools offered");
    }

    /// Requests of device tools awaiting an answer.
    pub fn pending_tool_requests(&self) -> usize {
        self.mcp_client.as_ref().map_or(0, |c| c.pending())
    }
}
