//! Legacy IoT things (pre-MCP firmware, spec §4 `iot`): descriptors become tools, states are
//! cached so the LLM can read them.
//!
//! A descriptor is `{name, description, properties{p:{description,type}},
//! methods{m:{description, parameters{a:{description,type}}}}}`. Each method becomes a tool
//! `iot_<thing>_<method>` whose call sends `{"type":"iot","commands":[{name,method,parameters}]}`
//! (old firmware does not answer commands, so the call succeeds once sent); each thing with
//! properties gets `iot_<thing>_get_state`, answered from the last `states` the device sent.
//! Bounded: things, methods and the state kept per thing.

use serde_json::{json, Map, Value};

/// Most things kept per session.
const MAX_THINGS: usize = 16;
/// Most methods kept per thing.
const MAX_METHODS: usize = 16;
/// Largest state kept per thing (serialised), bytes: a bound on what the merged state may
/// grow to, not only on one update (a device sending fresh keys would otherwise grow it
/// without end).
const MAX_STATE_BYTES: usize = 2048;
/// Most keys kept in one thing's state.
const MAX_STATE_KEYS: usize = 64;

/// One method of a thing, offered as a tool.
#[derive(Debug, Clone, PartialEq)]
pub struct IotMethod {
    /// Method name, e.g. `SetVolume`.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON schema of its parameters.
    pub parameters: Value,
}

/// One legacy IoT thing.
#[derive(Debug, Clone, PartialEq)]
pub struct IotThing {
    /// Thing name, e.g. `Speaker`.
    pub name: String,
    /// What it is.
    pub description: String,
    /// Whether it has properties (then it gets a state query tool).
    pub has_properties: bool,
    /// Its methods.
    pub methods: Vec<IotMethod>,
    /// Last reported state (`{}` until the device sends one).
    pub state: Value,
}

/// The IoT things of one session.
#[derive(Debug, Default)]
pub struct IotThings {
    things: Vec<IotThing>,
}

impl IotThings {
    /// The things known so far.
    pub fn things(&self) -> &[IotThing] {
        &self.things
    }

    /// Adds or replaces things from a `descriptors` value; returns false if nothing usable.
    pub fn on_descriptors(&mut self, descriptors: &Value) -> bool {
        let list: Vec<&Value> = match descriptors {
            Value::Array(a) => a.iter().collect(),
            Value::Object(_) => vec![descriptors],
            _ => return false,
        };
        let mut any = false;
        for d in list {
            let Some(thing) = parse_thing(d) else {
                tracing::debug!("iot descriptor without a name ignored");
                continue;
            };
            any = true;
            if let Some(old) = self.things.iter_mut().find(|t| t.name == thing.name) {
                let state = std::mem::take(&mut old.state);
                *old = IotThing { state, ..thing };
            } else if self.things.len() < MAX_THINGS {
                self.things.push(thing);
            } else {
                tracing::debug!(max = MAX_THINGS, "too many iot things; descriptor ignored");
            }
        }
        any
    }

    /// Applies a `states` value (`[{"name":…,"state":{…}}]`); returns how many updates were
    /// refused because the thing's state would pass its bound (the old state is kept).
    pub fn on_states(&mut self, states: &Value) -> u64 {
        let mut refused = 0;
        let Some(list) = states.as_array() else {
            tracing::debug!("iot states is not an array; ignored");
            return 0;
        };
        for s in list {
            let (Some(name), Some(state)) = (s.get("name").and_then(Value::as_str), s.get("state"))
            else {
                continue;
            };
            let Some(thing) = self.things.iter_mut().find(|t| t.name == name) else {
                continue;
            };
            if state.as_object().map_or(0, Map::len) > MAX_STATE_KEYS {
                refused += 1;
                continue;
            }
            let merged = match (&thing.state, state) {
                (Value::Object(old), Value::Object(new)) => {
                    let mut merged = old.clone();
                    merged.extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
                    Value::Object(merged)
                }
                (_, new) => new.clone(),
            };
            let keys = merged.as_object().map_or(0, Map::len);
            if keys > MAX_STATE_KEYS || merged.to_string().len() > MAX_STATE_BYTES {
                refused += 1;
                tracing::debug!(thing = ?name, keys, "iot state would pass its bound; update refused");
                continue;
            }
            thing.state = merged;
        }
        refused
    }

    /// The `commands` array for calling `method` of `thing`.
    pub fn command(thing: &str, method: &str, arguments: &Value) -> Value {
        let parameters = match arguments {
            Value::Object(_) => arguments.clone(),
            _ => Value::Object(Map::new()),
        };
        json!([{"name": thing, "method": method, "parameters": parameters}])
    }

    /// The cached state of `thing`, as text for the LLM.
    pub fn state_text(&self, thing: &str) -> Result<String, String> {
        self.things
            .iter()
            .find(|t| t.name == thing)
            .map(|t| t.state.to_string())
            .ok_or_else(|| format!("no iot thing named {thing}"))
    }
}

fn parse_thing(d: &Value) -> Option<IotThing> {
    let name = d
        .get("name")?
        .as_str()
        .filter(|n| !n.is_empty() && n.len() <= 64)?;
    let text = |v: &Value| {
        let mut s = v
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        super::truncate_utf8(&mut s, 512);
        s
    };
    let methods = d
        .get("methods")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .take(MAX_METHODS)
                .map(|(mname, spec)| IotMethod {
                    name: mname.clone(),
                    description: text(spec),
                    parameters: schema(spec.get("parameters")),
                })
                .collect()
        })
        .unwrap_or_default();
    Some(IotThing {
        name: name.to_string(),
        description: text(d),
        has_properties: d
            .get("properties")
            .and_then(Value::as_object)
            .is_some_and(|p| !p.is_empty()),
        methods,
        state: json!({}),
    })
}

/// An IoT parameter map (`{a:{description,type}}`) as a JSON schema.
fn schema(params: Option<&Value>) -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    if let Some(p) = params.and_then(Value::as_object) {
        for (name, spec) in p.iter().take(16) {
            let ty = match spec.get("type").and_then(Value::as_str) {
                Some("number") => "number",
                Some("boolean") => "boolean",
                Some("integer") => "integer",
                _ => "string",
            };
            let description = spec
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("");
            properties.insert(
                name.clone(),
                json!({"type": ty, "description": description}),
            );
            required.push(Value::String(name.clone()));
        }
    }
    json!({"type": "object", "properties": properties, "required": required})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn speaker() -> Value {
        json!([{"name":"Speaker","description":"扬声器",
            "properties":{"volume":{"description":"当前音量值","type":"number"}},
            "methods":{"SetVolume":{"description":"设置音量",
                "parameters":{"volume":{"description":"0到100之间的整数","type":"number"}}}}}])
    }

    #[test]
    fn descriptors_become_methods_with_schemas_and_states_are_merged() {
        let mut things = IotThings::default();
        assert!(things.on_descriptors(&speaker()));
        let t = &things.things()[0];
        assert_eq!(t.name, "Speaker");
        assert!(t.has_properties);
        assert_eq!(t.methods[0].name, "SetVolume");
        assert_eq!(
            t.methods[0].parameters["properties"]["volume"]["type"],
            "number"
        );
        things.on_states(
            &json!([{"name":"Speaker","state":{"volume":40}},{"name":"Nope","state":{}}]),
        );
        things.on_states(&json!([{"name":"Speaker","state":{"muted":false}}]));
        assert_eq!(
            things.state_text("Speaker").unwrap(),
            r#"{"muted":false,"volume":40}"#
        );
        // A repeated descriptor keeps the state.
        things.on_descriptors(&speaker());
        assert_eq!(things.things().len(), 1);
        assert_eq!(things.things()[0].state["volume"], 40);
    }

    #[test]
    fn junk_is_ignored_and_things_are_bounded() {
        let mut things = IotThings::default();
        assert!(!things.on_descriptors(&json!("x")));
        assert!(!things.on_descriptors(&json!([{"description":"no name"}])));
        things.on_states(&json!({"not":"an array"}));
        let many: Vec<Value> = (0..40).map(|i| json!({"name": format!("T{i}")})).collect();
        things.on_descriptors(&Value::Array(many));
        assert_eq!(things.things().len(), MAX_THINGS);
    }

    #[test]
    fn command_has_the_reference_shape() {
        assert_eq!(
            IotThings::command("Speaker", "SetVolume", &json!({"volume": 30})),
            json!([{"name":"Speaker","method":"SetVolume","parameters":{"volume":30}}])
        );
    }

    #[test]
    fn merged_state_stays_bounded_when_a_device_keeps_sending_fresh_keys() {
        let mut things = IotThings::default();
        things.on_descriptors(&json!([{"name":"Speaker","description":"s",
            "properties":{"volume":{"type":"number"}},"methods":{}}]));
        let mut refused = 0;
        for i in 0..1000 {
            let value = "x".repeat(100);
            refused +=
                things.on_states(&json!([{"name":"Speaker","state":{format!("k{i}"): value}}]));
        }
        let kept = things.state_text("Speaker").expect("state");
        assert!(kept.len() <= MAX_STATE_BYTES, "{} bytes kept", kept.len());
        assert!(refused >= 980, "only {refused} updates refused");
        // An update that fits still applies to existing keys.
        assert_eq!(
            things.on_states(&json!([{"name":"Speaker","state":{"k0":"y"}}])),
            0
        );
        assert!(things
            .state_text("Speaker")
            .unwrap()
            .contains("\"k0\":\"y\""));
        let too_many: Map<String, Value> = (0..=MAX_STATE_KEYS)
            .map(|i| (format!("n{i}"), json!(1)))
            .collect();
        assert_eq!(
            things.on_states(&json!([{"name":"Speaker","state":too_many}])),
            1
        );
    }
}
