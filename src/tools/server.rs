//! Server-side tools: abilities of the server itself offered to the LLM beside the device's.
//!
//! A tool implements [`ServerTool`] (a name, a description, a JSON schema and a synchronous
//! `call`) and is registered by name in [`ServerToolName`]; the config key
//! `tools.server_tools` deserialises into those names, so a loaded config can only name tools
//! that exist and [`ServerTools::new`] cannot fail. Session code never changes for a new tool.
//! Calls run on the shard, so a tool must be quick and must not block; one that needs I/O
//! should answer from state it keeps fresh elsewhere.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What a server tool may know about the call.
#[derive(Debug, Clone, Copy)]
pub struct ToolContext<'a> {
    /// Seconds since the Unix epoch (UTC).
    pub now_unix: u64,
    /// The device's time zone, minutes east of UTC.
    pub tz_offset_minutes: i64,
    /// The device's id (its MAC).
    pub device_id: &'a str,
    /// What the user said in this turn (e.g. to answer in their language).
    pub user_text: &'a str,
}

/// One server-side tool.
pub trait ServerTool {
    /// Name offered to the LLM (`[a-zA-Z0-9_-]`, at most 64 characters).
    fn name(&self) -> &str;
    /// What it does, for the LLM.
    fn description(&self) -> &str;
    /// JSON schema of its arguments.
    fn parameters(&self) -> Value;
    /// Runs it: the result text for the LLM, or an error text. A result
    /// `{"action":"RESPONSE","response":…}` is spoken as it is instead of asking the LLM again.
    fn call(&self, arguments: &Value, ctx: &ToolContext<'_>) -> Result<String, String>;
    /// A successful call ends the session once this turn has been spoken (goodbye, close 1000).
    fn ends_session(&self) -> bool {
        false
    }
}

/// The server tools a shard offers.
#[derive(Default)]
pub struct ServerTools {
    tools: Vec<Box<dyn ServerTool>>,
}

impl std::fmt::Debug for ServerTools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.tools.iter().map(|t| t.name()))
            .finish()
    }
}

/// The name of a built-in server tool, as config `tools.server_tools` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum ServerToolName {
    /// [`TimeTool`].
    GetTime,
    /// [`ExitTool`].
    HandleExitIntent,
}

impl ServerToolName {
    /// Every built-in tool, in the order the error message lists them.
    pub const ALL: [ServerToolName; 2] =
        [ServerToolName::GetTime, ServerToolName::HandleExitIntent];

    /// The name offered to the LLM and written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerToolName::GetTime => "get_time",
            ServerToolName::HandleExitIntent => "handle_exit_intent",
        }
    }

    /// A fresh instance of the tool.
    pub fn tool(self) -> Box<dyn ServerTool> {
        match self {
            ServerToolName::GetTime => Box::new(TimeTool),
            ServerToolName::HandleExitIntent => Box::new(ExitTool),
        }
    }
}

impl FromStr for ServerToolName {
    type Err = String;

    /// An unknown name is an error naming it and the known ones.
    fn from_str(name: &str) -> Result<Self, String> {
        ServerToolName::ALL
            .into_iter()
            .find(|known| known.as_str() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = ServerToolName::ALL.iter().map(|n| n.as_str()).collect();
                format!("unknown server tool {name:?} (known: {})", known.join(", "))
            })
    }
}

impl TryFrom<String> for ServerToolName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

impl From<ServerToolName> for &'static str {
    fn from(name: ServerToolName) -> &'static str {
        name.as_str()
    }
}

impl fmt::Display for ServerToolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ServerTools {
    /// The built-in tools `names` (config `tools.server_tools`), in that order.
    pub fn new(names: &[ServerToolName]) -> ServerTools {
        names
            .iter()
            .fold(ServerTools::default(), |set, name| set.with(name.tool()))
    }

    /// The built-in tools named in `names`; an unknown name is an error naming it.
    pub fn from_names(names: &[String]) -> Result<ServerTools, String> {
        let names = names
            .iter()
            .map(|n| n.parse())
            .collect::<Result<Vec<ServerToolName>, String>>()?;
        Ok(ServerTools::new(&names))
    }

    /// Adds `tool`.
    pub fn with(mut self, tool: Box<dyn ServerTool>) -> ServerTools {
        self.tools.push(tool);
        self
    }

    /// The tools, in order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn ServerTool> {
        self.tools.iter().map(|t| t.as_ref())
    }

    /// Tool number `index`.
    pub fn get(&self, index: usize) -> Option<&dyn ServerTool> {
        self.tools.get(index).map(|t| t.as_ref())
    }
}

/// `get_time`: the current local date, time and weekday of the device.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimeTool;

impl ServerTool for TimeTool {
    fn name(&self) -> &str {
        "get_time"
    }

    fn description(&self) -> &str {
        "Current local date, time and weekday where the device is."
    }

    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {}})
    }

    fn call(&self, _arguments: &Value, ctx: &ToolContext<'_>) -> Result<String, String> {
        let t = crate::clock::LocalTime::at(ctx.now_unix, ctx.tz_offset_minutes);
        let weekday = crate::clock::WEEKDAYS_EN[t.weekday];
        let off = ctx.tz_offset_minutes;
        let sign = if off < 0 { '-' } else { '+' };
        Ok(format!(
            "{:04}-{:02}-{:02} {:02}:{:02} ({weekday}), UTC{sign}{:02}:{:02}",
            t.year,
            t.month,
            t.day,
            t.hour,
            t.minute,
            off.abs() / 60,
            off.abs() % 60
        ))
    }
}

/// `handle_exit_intent` (the reference's name): the user wants to end the conversation. The
/// farewell (`say_goodbye`, else a built-in one in the user's language) is spoken as it is, then
/// the session ends exactly as after an exit phrase.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExitTool;

/// Longest farewell spoken, bytes.
const MAX_FAREWELL_BYTES: usize = 512;

impl ServerTool for ExitTool {
    fn name(&self) -> &str {
        "handle_exit_intent"
    }

    fn description(&self) -> &str {
        "Call when the user wants to end the conversation or leave (goodbye, that's all, exit). \
         Pass a short farewell in the user's language as say_goodbye; it is spoken, then the \
         device disconnects."
    }

    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"say_goodbye": {"type": "string",
            "description": "Farewell to say to the user, in their language."}}})
    }

    fn call(&self, arguments: &Value, ctx: &ToolContext<'_>) -> Result<String, String> {
        let mut farewell = arguments
            .get("say_goodbye")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| super::intents::farewell(super::intents::is_chinese(ctx.user_text)))
            .to_string();
        super::truncate_utf8(&mut farewell, MAX_FAREWELL_BYTES);
        Ok(json!({"action": "RESPONSE", "response": farewell}).to_string())
    }

    fn ends_session(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_tool_answers_in_the_device_time_zone() {
        let ctx = ToolContext {
            // 2024-03-05 15:07:00 UTC, a Tuesday.
            now_unix: 1_709_651_220,
            tz_offset_minutes: 8 * 60,
            device_id: "aa",
            user_text: "what time is it",
        };
        assert_eq!(
            TimeTool.call(&json!({}), &ctx).unwrap(),
            "2024-03-05 23:07 (Tuesday), UTC+08:00"
        );
        let west = ToolContext {
            tz_offset_minutes: -330,
            ..ctx
        };
        assert_eq!(
            TimeTool.call(&json!({}), &west).unwrap(),
            "2024-03-05 09:37 (Tuesday), UTC-05:30"
        );
    }

    #[test]
    fn exit_tool_speaks_the_given_farewell_or_one_in_the_users_language_and_ends_the_session() {
        let ctx = |user_text| ToolContext {
            now_unix: 0,
            tz_offset_minutes: 0,
            device_id: "aa",
            user_text,
        };
        let spoken = |args: Value, text| {
            let r: Value =
                serde_json::from_str(&ExitTool.call(&args, &ctx(text)).unwrap()).unwrap();
            assert_eq!(r["action"], "RESPONSE");
            r["response"].as_str().unwrap().to_string()
        };
        assert_eq!(
            spoken(json!({"say_goodbye":" See you! "}), "bye"),
            "See you!"
        );
        assert_eq!(
            spoken(json!({}), "I'm done, bye"),
            "Goodbye! Talk to you soon."
        );
        assert_eq!(spoken(json!({"say_goodbye": 5}), "我走了"), "好的，再见！");
        assert!(ExitTool.ends_session());
        assert!(!TimeTool.ends_session());
    }

    #[test]
    fn registry_knows_built_in_names_only() {
        let set =
            ServerTools::from_names(&["get_time".into(), "handle_exit_intent".into()]).unwrap();
        assert_eq!(
            set.iter().map(|t| t.name()).collect::<Vec<_>>(),
            ["get_time", "handle_exit_intent"]
        );
        assert!(ServerTools::from_names(&["rm_rf".into()])
            .unwrap_err()
            .contains("rm_rf"));
    }

    #[test]
    fn every_name_builds_the_tool_it_names() {
        for name in ServerToolName::ALL {
            assert_eq!(name.tool().name(), name.as_str());
            assert_eq!(name.as_str().parse(), Ok(name));
        }
    }
}
