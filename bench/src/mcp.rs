//! The simulated device's MCP server (spec §12): enough to answer a server that initialises the
//! device's tools after hello, as the firmware would. Requests get a result (`initialize`,
//! `tools/list` with two common device tools, `tools/call`) or a JSON-RPC "method not found";
//! notifications get nothing.

use serde_json::{json, Value};

/// The reply payload for one JSON-RPC message from the server, if it needs one.
pub fn reply(request: &Value) -> Option<Value> {
    let id = request.get("id")?.clone();
    let method = request.get("method")?.as_str()?;
    let result = match method {
        "initialize" => json!({
            "protocolVersion": "2024-11-05",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "xiaozhi-bench", "version": env!("CARGO_PKG_VERSION")},
        }),
        "tools/list" => json!({"tools": [
            {
                "name": "self.get_device_status",
                "description": "Current device status: audio speaker volume, screen, battery, network.",
                "inputSchema": {"type": "object", "properties": {}},
            },
            {
                "name": "self.audio_speaker.set_volume",
                "description": "Set the volume of the audio speaker (0-100).",
                "inputSchema": {
                    "type": "object",
                    "properties": {"volume": {"type": "integer", "minimum": 0, "maximum": 100}},
                    "required": ["volume"],
                },
            },
        ]}),
        "tools/call" => json!({
            "content": [{"type": "text", "text": "{\"audio_speaker\":{\"volume\":70}}"}],
            "isError": false,
        }),
        _ => {
            return Some(json!({
                "jsonrpc": "2.0",
                "id": id,
                "error": {"code": -32601, "message": format!("Method not found: {method}")},
            }))
        }
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_get_results_with_their_id() {
        let r = reply(&json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{}})).unwrap();
        assert_eq!(r["id"], 1);
        assert_eq!(r["result"]["protocolVersion"], "2024-11-05");
        let r = reply(&json!({"jsonrpc":"2.0","id":2,"method":"tools/list"})).unwrap();
        assert_eq!(r["result"]["tools"].as_array().map(Vec::len), Some(2));
        let r = reply(&json!({"jsonrpc":"2.0","id":10001,"method":"tools/call",
            "params":{"name":"self.get_device_status","arguments":{}}}))
        .unwrap();
        assert_eq!(r["result"]["isError"], false);
    }

    #[test]
    fn unknown_methods_get_an_error_and_notifications_nothing() {
        let r = reply(&json!({"jsonrpc":"2.0","id":"x","method":"resources/list"})).unwrap();
        assert_eq!(r["error"]["code"], -32601);
        assert_eq!(r["id"], "x");
        assert_eq!(
            reply(&json!({"jsonrpc":"2.0","method":"notifications/initialized"})),
            None
        );
        assert_eq!(reply(&json!({"jsonrpc":"2.0","id":3,"result":{}})), None);
    }
}
