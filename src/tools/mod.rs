//! Tools the LLM (and the offline responder) can call: the device's MCP tools ([`mcp`]),
//! legacy IoT things ([`iot`]), and server-side tools ([`server`]), merged into one
//! [`ToolSet`] per session with names the OpenAI API accepts; plus the built-in intents that
//! need no LLM ([`intents`]). Everything here is pure: the session feeds it and sends what it
//! returns.

pub mod intents;
pub mod iot;
pub mod mcp;
pub mod server;

use std::rc::Rc;

use serde_json::{json, Value};

use iot::IotThings;
use mcp::DeviceTool;
use server::ServerTools;

/// What a tool offered to the LLM is, so a call can be carried out.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolTarget {
    /// A device MCP tool, by the device's own name.
    Device(String),
    /// A legacy IoT method.
    IotMethod {
        /// Thing name.
        thing: String,
        /// Method name.
        method: String,
    },
    /// The cached state of a legacy IoT thing.
    IotState {
        /// Thing name.
        thing: String,
    },
    /// Server tool number `n` of the shard's [`ServerTools`].
    Server(usize),
}

/// The tools of one session, as offered to the LLM.
#[derive(Debug, Default)]
pub struct ToolSet {
    offered: Vec<(String, ToolTarget)>,
    /// Shared with the dialogue and the LLM requests (one copy per distinct set).
    openai: Option<Rc<Value>>,
}

impl ToolSet {
    /// Merges server tools, device tools and IoT things (in that order), at most `max_tools`.
    pub fn build(
        server: &ServerTools,
        device: &[DeviceTool],
        iot: &IotThings,
        max_tools: usize,
    ) -> ToolSet {
        let mut set = ToolSet::default();
        let mut functions = Vec::new();
        let mut offer =
            |set: &mut ToolSet, name: &str, description: &str, schema: Value, target| {
                if set.offered.len() >= max_tools {
                    return;
                }
                let name = set.unique(sanitize_name(name));
                functions.push(json!({"type": "function", "function": {
                "name": name, "description": description, "parameters": schema}}));
                set.offered.push((name, target));
            };
        for (i, t) in server.iter().enumerate() {
            offer(
                &mut set,
                t.name(),
                t.description(),
                t.parameters(),
                ToolTarget::Server(i),
            );
        }
        for t in device {
            let target = ToolTarget::Device(t.name.clone());
            offer(
                &mut set,
                &t.name,
                &t.description,
                t.input_schema.clone(),
                target,
            );
        }
        for thing in iot.things() {
            for m in &thing.methods {
                let name = format!("iot_{}_{}", thing.name, m.name);
                let description =
                    format!("{} ({}): {}", thing.name, thing.description, m.description);
                let target = ToolTarget::IotMethod {
                    thing: thing.name.clone(),
                    method: m.name.clone(),
                };
                offer(&mut set, &name, &description, m.parameters.clone(), target);
            }
            if thing.has_properties {
                let name = format!("iot_{}_get_state", thing.name);
                let description =
                    format!("Current state of {} ({}).", thing.name, thing.description);
                let schema = json!({"type": "object", "properties": {}});
                let target = ToolTarget::IotState {
                    thing: thing.name.clone(),
                };
                offer(&mut set, &name, &description, schema, target);
            }
        }
        set.openai = (!functions.is_empty()).then(|| Rc::new(Value::Array(functions)));
        set
    }

    fn unique(&self, name: String) -> String {
        let taken = |n: &str| self.offered.iter().any(|(o, _)| o == n);
        if !taken(&name) {
            return name;
        }
        (2..)
            .map(|i| {
                let suffix = format!("_{i}");
                let mut base = name.clone();
                truncate_utf8(&mut base, 64 - suffix.len());
                base + &suffix
            })
            .find(|n| !taken(n))
            .unwrap_or(name)
    }

    /// Number of tools offered.
    pub fn len(&self) -> usize {
        self.offered.len()
    }

    /// Whether no tool is offered.
    pub fn is_empty(&self) -> bool {
        self.offered.is_empty()
    }

    /// The Chat Completions `tools` array; `None` when there is no tool.
    pub fn openai_tools(&self) -> Option<&Rc<Value>> {
        self.openai.as_ref()
    }

    /// What `name` calls: an offered name, or a device tool's own name.
    pub fn resolve(&self, name: &str) -> Option<&ToolTarget> {
        self.offered
            .iter()
            .find(|(n, _)| n == name)
            .or_else(|| {
                self.offered
                    .iter()
                    .find(|(_, t)| matches!(t, ToolTarget::Device(d) if d == name))
            })
            .map(|(_, t)| t)
    }

    /// The tools the offline responder's volume commands use: the device's MCP tools, else a
    /// legacy IoT `Speaker` thing's `SetVolume` method and cached state.
    pub fn volume_tools(&self) -> intents::VolumeTools {
        let offered = |want: &dyn Fn(&ToolTarget) -> bool| {
            self.offered
                .iter()
                .find(|(_, t)| want(t))
                .map(|(n, _)| n.clone())
        };
        let speaker = |thing: &str| thing.eq_ignore_ascii_case(intents::IOT_SPEAKER);
        let set = if self.has_device_tool(intents::SET_VOLUME_TOOL) {
            Some(intents::SET_VOLUME_TOOL.to_string())
        } else {
            offered(&|t| {
                matches!(t, ToolTarget::IotMethod { thing, method }
                    if speaker(thing) && method == intents::IOT_SET_VOLUME)
            })
        };
        let status = if self.has_device_tool(intents::STATUS_TOOL) {
            Some(intents::STATUS_TOOL.to_string())
        } else {
            offered(&|t| matches!(t, ToolTarget::IotState { thing } if speaker(thing)))
        };
        intents::VolumeTools { set, status }
    }

    /// Whether the device offers a tool with this (device) name.
    pub fn has_device_tool(&self, name: &str) -> bool {
        self.offered
            .iter()
            .any(|(_, t)| matches!(t, ToolTarget::Device(d) if d == name))
    }
}

/// A tool name the OpenAI API accepts (`^[a-zA-Z0-9_-]{1,64}$`): every other character becomes
/// `_` (`self.audio_speaker.set_volume` → `self_audio_speaker_set_volume`).
pub fn sanitize_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() {
        s.push('_');
    }
    s
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str) -> DeviceTool {
        DeviceTool {
            name: name.into(),
            description: "d".into(),
            input_schema: json!({"type":"object"}),
        }
    }

    #[test]
    fn names_are_sanitised_unique_and_resolve_back() {
        let server = ServerTools::from_names(&["get_time".into()]).unwrap();
        let tools = [
            device("self.audio_speaker.set_volume"),
            device("self_audio_speaker_set_volume"),
            device("灯.开"),
        ];
        let mut iot = IotThings::default();
        iot.on_descriptors(
            &json!([{"name":"Lamp","properties":{"on":{"type":"boolean"}},
            "methods":{"TurnOn":{"description":"on"}}}]),
        );
        let set = ToolSet::build(&server, &tools, &iot, 10);
        let names: Vec<_> = set
            .openai_tools()
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["function"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "get_time",
                "self_audio_speaker_set_volume",
                "self_audio_speaker_set_volume_2",
                "___",
                "iot_Lamp_TurnOn",
                "iot_Lamp_get_state"
            ]
        );
        assert_eq!(
            set.resolve("self_audio_speaker_set_volume"),
            Some(&ToolTarget::Device("self.audio_speaker.set_volume".into()))
        );
        assert_eq!(
            set.resolve("self_audio_speaker_set_volume_2"),
            Some(&ToolTarget::Device("self_audio_speaker_set_volume".into()))
        );
        assert_eq!(
            set.resolve("灯.开"),
            Some(&ToolTarget::Device("灯.开".into()))
        );
        assert_eq!(set.resolve("get_time"), Some(&ToolTarget::Server(0)));
        assert!(set.resolve("nope").is_none());
        assert!(set.has_device_tool("self.audio_speaker.set_volume"));
    }

    #[test]
    fn volume_tools_prefer_mcp_and_fall_back_to_the_iot_speaker() {
        let mut iot = IotThings::default();
        iot.on_descriptors(
            &json!([{"name":"Speaker","properties":{"volume":{"type":"number"}},
            "methods":{"SetVolume":{"parameters":{"volume":{"type":"number"}}}}}]),
        );
        let server = ServerTools::default();
        let only_iot = ToolSet::build(&server, &[], &iot, 10).volume_tools();
        assert_eq!(only_iot.set.as_deref(), Some("iot_Speaker_SetVolume"));
        assert_eq!(only_iot.status.as_deref(), Some("iot_Speaker_get_state"));
        let mcp = [
            device(intents::SET_VOLUME_TOOL),
            device(intents::STATUS_TOOL),
        ];
        let both = ToolSet::build(&server, &mcp, &iot, 10).volume_tools();
        assert_eq!(both.set.as_deref(), Some(intents::SET_VOLUME_TOOL));
        assert_eq!(both.status.as_deref(), Some(intents::STATUS_TOOL));
        let none = ToolSet::build(&server, &[device("self.x")], &IotThings::default(), 10);
        assert_eq!(none.volume_tools(), intents::VolumeTools::default());
    }

    #[test]
    fn tool_count_is_bounded_and_empty_sets_offer_nothing() {
        let tools: Vec<_> = (0..10).map(|i| device(&format!("t{i}"))).collect();
        let set = ToolSet::build(&ServerTools::default(), &tools, &IotThings::default(), 4);
        assert_eq!(set.openai_tools().unwrap().as_array().unwrap().len(), 4);
        let empty = ToolSet::build(&ServerTools::default(), &[], &IotThings::default(), 4);
        assert!(empty.openai_tools().is_none());
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        let mut s = "音量音量".to_string();
        truncate_utf8(&mut s, 7);
        assert_eq!(s, "音量");
    }
}
