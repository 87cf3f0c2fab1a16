//! Device tools over real sockets: a tungstenite client plays a device that serves MCP tools
//! (initialize, a paginated tools/list, tools/call answered with a result, an error or not at
//! all), the server calls them for the remote LLM (the loopback OpenAI-compatible mock returning
//! a streamed tool call) and for the offline responder, and the answer is spoken.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::Message;
use xiaozhi_bench::mock_upstream::{self, MockHandle, MockSettings};

/// How the simulated device answers `tools/call`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    /// A result, and the volume changes.
    Ok,
    /// A JSON-RPC error.
    RpcError,
    /// No answer at all.
    Silent,
}

/// A device with a speaker: serves `self.get_device_status` and
/// `self.audio_speaker.set_volume`, listed over two pages.
struct Device {
    ws: Ws,
    mac: String,
    volume: u64,
    answer: Answer,
    /// Every `tools/call` request received.
    calls: Vec<Value>,
    /// The `initialize` request received.
    initialize: Value,
}

/// The camera tool as the firmware lists it.
const CAMERA_TOOL: &str = "self.camera.take_photo";

impl Device {
    /// Connects, says hello and serves MCP until the tool list has been read.
    fn connect(server: &Server, mac: &str) -> Device {
        Device::connect_with(server, mac, false)
    }

    /// Like [`Device::connect`]; with `camera`, the device also lists `self.camera.take_photo`,
    /// which (as the firmware does) posts a photo to the vision URL from `initialize`.
    fn connect_with(server: &Server, mac: &str, camera: bool) -> Device {
        let mut ws = connect(&server.ws_url("/xiaozhi/v1/"), &device_headers(mac, "1"));
        hello(&mut ws, HELLO_MCP);
        let mut d = Device {
            ws,
            mac: mac.to_string(),
            volume: 30,
            answer: Answer::Ok,
            calls: vec![],
            initialize: Value::Null,
        };
        let init = d.next_mcp();
        assert_eq!(init["method"], "initialize", "{init}");
        d.reply(
            &init,
            json!({"protocolVersion":"2024-11-05","capabilities":{"tools":{}},
            "serverInfo":{"name":"test-board","version":"1.0"}}),
        );
        d.initialize = init;
        // Malformed and unexpected JSON-RPC is ignored, never fatal.
        for junk in [
            json!("not an object"),
            json!({"jsonrpc":"2.0","id":424242,"result":{}}),
            json!({"jsonrpc":"1.0","id":2}),
            json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info"}}),
        ] {
            d.send_mcp(junk);
        }
        let mut list = d.next_mcp();
        while list["method"] != "tools/list" {
            list = d.next_mcp();
        }
        assert_eq!(list["id"], 2);
        d.reply(
            &list,
            json!({"tools":[{"name":"self.get_device_status",
            "description":"Current status of the device: speaker volume, screen, battery.",
            "inputSchema":{"type":"object","properties":{}}}], "nextCursor":"page-2"}),
        );
        let list = d.next_mcp();
        assert_eq!(list["method"], "tools/list");
        assert_eq!(list["params"]["cursor"], "page-2");
        let mut tools = vec![json!({"name":"self.audio_speaker.set_volume",
            "description":"Set the volume of the audio speaker (0-100).",
            "inputSchema":{"type":"object","properties":{"volume":{"type":"integer","minimum":0,"maximum":100}},
                "required":["volume"]}})];
        if camera {
            tools.push(json!({"name": CAMERA_TOOL,
                "description":"Take a photo and explain it. Use when the user asks what you see.",
                "inputSchema":{"type":"object","properties":{"question":{"type":"string"}},
                    "required":["question"]}}));
        }
        d.reply(&list, json!({ "tools": tools }));
        // The server handles one socket's messages in order: the last page is taken in before
        // anything the test sends next.
        d
    }

    fn send_mcp(&mut self, payload: Value) {
        let msg = json!({"session_id":"","type":"mcp","payload":payload}).to_string();
        self.ws.send(Message::text(msg)).expect("send mcp");
    }

    fn reply(&mut self, request: &Value, result: Value) {
        self.send_mcp(json!({"jsonrpc":"2.0","id":request["id"],"result":result}));
    }

    /// The next MCP payload from the server (nothing else may come in between).
    fn next_mcp(&mut self) -> Value {
        let v = next_json(&mut self.ws);
        assert_eq!(v["type"], "mcp", "{v}");
        v["payload"].clone()
    }

    /// Answers a `tools/call` as the firmware would.
    fn serve_call(&mut self, call: &Value) {
        self.calls.push(call.clone());
        match self.answer {
            Answer::Silent => {}
            Answer::RpcError => self.send_mcp(json!({"jsonrpc":"2.0","id":call["id"],
                "error":{"code":-32000,"message":"speaker is busy"}})),
            Answer::Ok => {
                let args = &call["params"]["arguments"];
                let text = match call["params"]["name"].as_str() {
                    Some("self.get_device_status") => {
                        json!({"audio_speaker":{"volume":self.volume}}).to_string()
                    }
                    Some("self.audio_speaker.set_volume") => {
                        self.volume = args["volume"].as_u64().expect("volume argument");
                        "true".to_string()
                    }
                    Some(CAMERA_TOOL) => {
                        let caps = &self.initialize["params"]["capabilities"]["vision"];
                        let (url, token) = (caps["url"].as_str(), caps["token"].as_str());
                        let (url, token) = (url.expect("vision url"), token.expect("vision token"));
                        let question = args["question"].as_str().expect("question argument");
                        let mac = self.mac.clone();
                        post_photo(url, &mac, token, question, &test_jpeg()).body
                    }
                    other => panic!("unexpected tool {other:?}"),
                };
                self.reply(
                    call,
                    json!({"content":[{"type":"text","text":text}],"isError":false}),
                );
            }
        }
    }

    /// Sends a text turn and collects the messages until `tts stop`, serving tool calls.
    fn ask(&mut self, text: &str, limit: Duration) -> Vec<Value> {
        let detect = json!({"type":"listen","state":"detect","text":text}).to_string();
        self.ws.send(Message::text(detect)).expect("detect");
        self.collect(limit)
    }

    fn collect(&mut self, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        let mut texts = vec![];
        loop {
            assert!(
                Instant::now() < deadline,
                "no tts stop in {limit:?}: {texts:?}"
            );
            let v = next_json_skipping_audio(&mut self.ws);
            if v["type"] == "mcp" && v["payload"]["method"] == "tools/call" {
                let call = v["payload"].clone();
                self.serve_call(&call);
                continue;
            }
            let stop = v["type"] == "tts" && v["state"] == "stop";
            texts.push(v);
            if stop {
                return texts;
            }
        }
    }
}

/// The next text message, skipping audio frames.
fn next_json_skipping_audio(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json"),
            Message::Binary(_) | Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The spoken subtitles of a turn, joined.
fn spoken(texts: &[Value]) -> String {
    texts
        .iter()
        .filter(|v| v["type"] == "tts" && v["state"] == "sentence_start")
        .map(|v| v["text"].as_str().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A fast mock LLM that answers a user message containing `trigger` with a streamed call of
/// `tool` with `arguments`, and anything else (the tool result included) with `reply`.
fn tool_mock(reply: &str, trigger: &str, tool: &str, arguments: &str) -> MockHandle {
    mock_upstream::serve(MockSettings {
        llm_first_token: Duration::from_millis(20),
        llm_token: Duration::from_millis(2),
        llm_reply: reply.into(),
        tool_trigger: Some(trigger.into()),
        tool_name: Some(tool.into()),
        tool_arguments: arguments.into(),
        tts_delay: Duration::from_millis(10),
        tts_audio: Duration::from_millis(200),
        ..MockSettings::default()
    })
    .expect("mock upstream")
}

fn volume_mock() -> MockHandle {
    tool_mock(
        "Done. The speaker volume is set.",
        "volume",
        "self_audio_speaker_set_volume",
        r#"{"volume":55}"#,
    )
}

/// A server whose LLM (`remote_llm`) and TTS are the mock.
fn server(mock: &MockHandle, remote_llm: bool, extra: &[&str]) -> Server {
    let base = format!("\"{}\"", mock.base_url());
    let mut sets: Vec<String> = vec![
        "tts.provider=\"openai\"".into(),
        format!("tts.openai.base_url={base}"),
        format!("llm.openai.base_url={base}"),
    ];
    if remote_llm {
        sets.push("llm.provider=\"openai\"".into());
    }
    sets.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    Server::start(&refs)
}

/// The `tool` messages of a chat request.
fn tool_messages(request: &Value) -> Vec<Value> {
    request["messages"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] == "tool").cloned().collect())
        .unwrap_or_default()
}

#[test]
fn remote_llm_tool_call_sets_the_device_volume_and_the_answer_is_spoken() {
    let mock = volume_mock();
    let server = server(&mock, true, &[]);
    let mut device = Device::connect(&server, "aa:dd:00:00:00:01");
    assert!(
        device.initialize["params"]["capabilities"]
            .get("vision")
            .is_none(),
        "no vision capability unless configured"
    );
    let texts = device.ask("Please set the volume to 55", Duration::from_secs(20));
    assert_eq!(device.calls.len(), 1, "{:?}", device.calls);
    let call = &device.calls[0];
    assert!(call["id"].as_u64().unwrap() >= 10_000, "{call}");
    assert_eq!(call["params"]["name"], "self.audio_speaker.set_volume");
    assert_eq!(call["params"]["arguments"], json!({"volume":55}));
    assert_eq!(device.volume, 55);
    assert_eq!(spoken(&texts), "Done. The speaker volume is set.");
    let kinds: Vec<&str> = texts
        .iter()
        .map(|v| v["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds.first(), Some(&"stt"), "{kinds:?}");
    // Two LLM rounds: the first offered the server tools and the tools of both pages, the second
    // carried the device's result back.
    let requests = mock.chat_requests();
    assert_eq!(requests.len(), 2);
    let offered: Vec<&str> = requests[0]["tools"]
        .as_array()
        .expect("tools offered")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert_eq!(
        offered,
        [
            "get_time",
            "handle_exit_intent",
            "self_get_device_status",
            "self_audio_speaker_set_volume"
        ]
    );
    let results = tool_messages(&requests[1]);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["content"], "true");
    assert_eq!(
        results[0]["tool_call_id"],
        requests[1]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|m| m["tool_calls"][0]["id"].as_str())
            .unwrap()
    );
    // A turn without a tool call still works on the same session.
    let texts = device.ask("Tell me a joke", Duration::from_secs(20));
    assert_eq!(spoken(&texts), "Done. The speaker volume is set.");
    assert_eq!(device.calls.len(), 1);
}

#[test]
fn device_tool_errors_and_timeouts_go_back_to_the_llm_and_the_turn_still_ends() {
    let mock = volume_mock();
    let server = server(&mock, true, &["tools.call_timeout_ms=700"]);
    let mut device = Device::connect(&server, "aa:dd:00:00:00:02");
    device.answer = Answer::RpcError;
    let texts = device.ask("volume to 55 please", Duration::from_secs(20));
    assert_eq!(spoken(&texts), "Done. The speaker volume is set.");
    let results = tool_messages(&mock.chat_requests()[1]);
    assert_eq!(
        results[0]["content"],
        "error: speaker is busy (code -32000)"
    );

    device.answer = Answer::Silent;
    let asked = Instant::now();
    let texts = device.ask("volume to 55 again", Duration::from_secs(20));
    assert!(asked.elapsed() >= Duration::from_millis(700));
    assert_eq!(spoken(&texts), "Done. The speaker volume is set.");
    let requests = mock.chat_requests();
    assert_eq!(requests.len(), 4);
    let results = tool_messages(&requests[3]);
    assert_eq!(
        results.last().unwrap()["content"],
        "error: the device did not answer within 700 ms"
    );
    assert_eq!(device.calls.len(), 2);
}

#[test]
fn abort_during_a_pending_tool_call_drops_it_and_the_late_answer_is_ignored() {
    let mock = volume_mock();
    let server = server(&mock, true, &[]);
    let mut device = Device::connect(&server, "aa:dd:00:00:00:03");
    device.answer = Answer::Silent;
    let detect = json!({"type":"listen","state":"detect","text":"set the volume to 55"});
    device
        .ws
        .send(Message::text(detect.to_string()))
        .expect("detect");
    let call = loop {
        let v = next_json_skipping_audio(&mut device.ws);
        if v["type"] == "mcp" && v["payload"]["method"] == "tools/call" {
            break v["payload"].clone();
        }
    };
    let aborted = Instant::now();
    device
        .ws
        .send(Message::text(r#"{"type":"abort"}"#))
        .expect("abort");
    loop {
        let v = next_json_skipping_audio(&mut device.ws);
        if v["type"] == "tts" && v["state"] == "stop" {
            break;
        }
    }
    assert!(aborted.elapsed() < Duration::from_millis(500));
    // The device answers late: nothing follows, the LLM is not asked again.
    device.reply(
        &call,
        json!({"content":[{"type":"text","text":"true"}],"isError":false}),
    );
    set_timeout(&device.ws, Duration::from_millis(800));
    match device.ws.read() {
        Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("nothing expected after the abort, got {other:?}"),
    }
    set_timeout(&device.ws, Duration::from_secs(10));
    assert_eq!(mock.chat_requests().len(), 1);
    // The session carries on: the next turn's call is answered and used.
    device.answer = Answer::Ok;
    let texts = device.ask("set the volume to 55", Duration::from_secs(20));
    assert_eq!(spoken(&texts), "Done. The speaker volume is set.");
    assert_eq!(device.volume, 55);
    assert_eq!(mock.chat_requests().len(), 3);
    drop(device);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metric("xiaozhi_device_tool_calls_cancelled_total") == 0 {
        assert!(Instant::now() < deadline, "cancelled call not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        server.metric("xiaozhi_device_tool_calls_cancelled_total"),
        1
    );
    assert_eq!(server.metric("xiaozhi_device_tool_timeouts_total"), 0);
    // The junk at connect (3 ignored) plus the late answer.
    assert_eq!(server.metric("xiaozhi_mcp_ignored_total"), 4);
}

#[test]
fn offline_responder_drives_the_device_volume_with_its_tools() {
    let mock = volume_mock();
    let server = server(&mock, false, &[]);
    let mut device = Device::connect(&server, "aa:dd:00:00:00:04");
    let texts = device.ask("Set the volume to 40.", Duration::from_secs(20));
    assert_eq!(spoken(&texts), "OK, the volume is now 40.");
    assert_eq!(device.volume, 40);
    // "louder" reads the status first, then sets it 10 higher.
    let texts = device.ask("Louder, please", Duration::from_secs(20));
    let names: Vec<&str> = device.calls[1..]
        .iter()
        .filter_map(|c| c["params"]["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["self.get_device_status", "self.audio_speaker.set_volume"]
    );
    assert_eq!(device.volume, 50);
    assert_eq!(spoken(&texts), "OK, the volume is now 50.");
    // A failing device is reported, not ignored.
    device.answer = Answer::RpcError;
    let texts = device.ask("音量调到20", Duration::from_secs(20));
    assert_eq!(
        spoken(&texts).replace(' ', ""),
        "抱歉，设备没有完成这个操作。"
    );
    assert_eq!(
        mock.chat_requests().len(),
        0,
        "the offline responder needs no LLM"
    );
}

#[test]
fn a_spoken_volume_command_reaches_the_device_with_the_offline_responder() {
    let mock = volume_mock();
    let server = server(&mock, false, &[]);
    let mut device = Device::connect(&server, "aa:dd:00:00:00:05");
    // (whisper-tiny.en often mishears espeak's "volume"; "louder" it gets right.)
    let frames = opus_frames(&speech_16k("Make it louder.", "en-us", 0.8));
    device
        .ws
        .send(Message::text(
            r#"{"type":"listen","state":"start","mode":"auto"}"#,
        ))
        .expect("listen");
    let t0 = Instant::now();
    let silence = opus_frames(&vec![0i16; 960]).remove(0);
    send_paced(
        &mut device.ws,
        frames.iter().chain(std::iter::repeat_n(&silence, 25)),
        t0,
    );
    let texts = device.collect(Duration::from_secs(60));
    let stt = texts.iter().find(|v| v["type"] == "stt").expect("stt");
    assert_eq!(device.calls.len(), 2, "transcript {stt}");
    assert_eq!(device.calls[0]["params"]["name"], "self.get_device_status");
    assert_eq!(device.calls[1]["params"]["arguments"], json!({"volume":40}));
    assert_eq!(spoken(&texts), "OK, the volume is now 40.");
}

/// Sends a text turn on an old-firmware connection and collects the messages until `tts stop`;
/// returns the `commands` of every `iot` message (each also handed to `on_command` with the
/// socket, to answer as the device would) and the other messages.
fn iot_turn(
    ws: &mut Ws,
    text: &str,
    mut on_command: impl FnMut(&mut Ws, &Value),
) -> (Vec<Value>, Vec<Value>) {
    let detect = json!({"type":"listen","state":"detect","text":text});
    ws.send(Message::text(detect.to_string())).expect("detect");
    let (mut commands, mut texts) = (vec![], vec![]);
    loop {
        let v = next_json_skipping_audio(ws);
        if v["type"] == "iot" {
            on_command(ws, &v["commands"]);
            commands.push(v["commands"].clone());
            continue;
        }
        let stop = v["type"] == "tts" && v["state"] == "stop";
        texts.push(v);
        if stop {
            return (commands, texts);
        }
    }
}

/// Connects as old firmware (no MCP) and sends its IoT `descriptors`.
fn iot_device(server: &Server, mac: &str, descriptors: Value) -> Ws {
    let mut ws = connect(&server.ws_url("/"), &device_headers(mac, "1"));
    hello(&mut ws, HELLO);
    let msg = json!({"type":"iot","update":true,"descriptors":descriptors});
    ws.send(Message::text(msg.to_string())).expect("iot");
    ws
}

#[test]
fn offline_responder_sets_the_volume_of_an_iot_only_speaker() {
    let mock = volume_mock();
    let server = server(&mock, false, &[]);
    // Old firmware's Speaker thing as thing/speaker.cc describes it.
    let speaker = json!([{"name":"Speaker","description":"扬声器",
        "properties":{"volume":{"description":"当前音量值","type":"number"}},
        "methods":{"SetVolume":{"description":"设置音量","parameters":{"volume":
        {"description":"0到100之间的整数","type":"number"}}}}}]);
    let mut ws = iot_device(&server, "aa:dd:00:00:00:09", speaker);
    let report = |ws: &mut Ws, volume: &Value| {
        let states = json!({"type":"iot","states":[{"name":"Speaker","state":{"volume":volume}}]});
        ws.send(Message::text(states.to_string())).expect("states");
    };
    report(&mut ws, &json!(40));
    // The device applies a command and reports its new state, as old firmware does.
    let apply = |ws: &mut Ws, commands: &Value| report(ws, &commands[0]["parameters"]["volume"]);
    let (commands, texts) = iot_turn(&mut ws, "Set the volume to 70.", apply);
    assert_eq!(
        commands,
        [json!([{"name":"Speaker","method":"SetVolume","parameters":{"volume":70}}])]
    );
    assert_eq!(spoken(&texts), "OK, the volume is now 70.");
    // "louder" reads the cached state (70, reported after the command) and sets 10 more.
    let (commands, texts) = iot_turn(&mut ws, "Louder, please", apply);
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0][0]["parameters"], json!({"volume":80}));
    assert_eq!(spoken(&texts), "OK, the volume is now 80.");
    let (_, texts) = iot_turn(&mut ws, "静音", apply);
    assert_eq!(spoken(&texts).replace(' ', ""), "好的，音量已调到0。");
    assert_eq!(mock.chat_requests().len(), 0, "no LLM involved");
}

#[test]
fn legacy_iot_things_are_tools_for_the_llm() {
    let mock = tool_mock(
        "The lamp is on.",
        "lamp",
        "iot_Lamp_TurnOn",
        r#"{"brightness":80}"#,
    );
    let server = server(&mock, true, &[]);
    // Old firmware: no MCP, IoT descriptors and states instead.
    let lamp = json!([{"name":"Lamp",
        "description":"a lamp","properties":{"power":{"description":"on or off","type":"boolean"}},
        "methods":{"TurnOn":{"description":"switch on","parameters":{"brightness":
        {"description":"0-100","type":"number"}}}}}]);
    let mut ws = iot_device(&server, "aa:dd:00:00:00:06", lamp);
    ws.send(Message::text(
        r#"{"type":"iot","states":[{"name":"Lamp","state":{"power":false}}]}"#,
    ))
    .expect("states");
    let (commands, texts) = iot_turn(&mut ws, "switch the lamp on", |_, _| {});
    assert_eq!(
        commands,
        [json!([{"name":"Lamp","method":"TurnOn","parameters":{"brightness":80}}])]
    );
    assert_eq!(spoken(&texts), "The lamp is on.");
    let requests = mock.chat_requests();
    let offered = requests[0]["tools"].to_string();
    assert!(offered.contains("iot_Lamp_get_state"), "{offered}");
}

#[test]
fn exit_phrase_says_goodbye_and_closes_and_a_wake_word_is_greeted() {
    let mock = volume_mock();
    let server = server(&mock, false, &[]);
    let mut device = Device::connect(&server, "aa:dd:00:00:00:07");
    let texts = device.ask("Hi, Xiaozhi!", Duration::from_secs(20));
    assert!(texts.iter().all(|v| v["type"] != "stt"), "{texts:?}");
    assert_eq!(spoken(&texts), "Hi! What can I do for you?");
    let texts = device.ask("Goodbye.", Duration::from_secs(20));
    assert_eq!(spoken(&texts), "Goodbye! Talk to you soon.");
    let (code, _) = expect_close(&mut device.ws);
    assert_eq!(code, 1000);
}

#[test]
fn llm_exit_tool_speaks_its_farewell_then_says_goodbye_and_closes() {
    let mock = tool_mock(
        "Anything else?",
        "leave",
        "handle_exit_intent",
        r#"{"say_goodbye":"Bye for now, take care!"}"#,
    );
    let server = server(&mock, true, &[]);
    let mut device = Device::connect(&server, "aa:dd:00:00:00:08");
    // A turn that calls no tool leaves the session open.
    let texts = device.ask("What can you do?", Duration::from_secs(20));
    assert_eq!(spoken(&texts), "Anything else?");
    let texts = device.ask("I have to leave now", Duration::from_secs(20));
    assert!(texts.iter().any(|v| v["type"] == "stt"), "{texts:?}");
    assert_eq!(spoken(&texts), "Bye for now, take care!");
    assert_eq!(next_json_skipping_audio(&mut device.ws)["type"], "goodbye");
    let (code, _) = expect_close(&mut device.ws);
    assert_eq!(code, 1000);
    let requests = mock.chat_requests();
    assert_eq!(
        requests.len(),
        2,
        "the farewell is spoken without another LLM round"
    );
    let offered = requests[1]["tools"].to_string();
    assert!(offered.contains("say_goodbye"), "{offered}");
    assert!(
        device.calls.is_empty(),
        "the exit tool is the server's, not the device's"
    );
}

/// Runs tests/sdk/tool_call.py against a server whose LLM is the mock (`remote_llm`) or the
/// offline responder, sending `texts` as turns; returns the script's summary.
fn sdk_tool_run(mock: &MockHandle, remote_llm: bool, texts: &[&str]) -> Value {
    assert_sdk_installed();
    // The SDK answers `initialize` only when it carries the vision capability.
    let server = server(
        mock,
        remote_llm,
        &[
            "tools.vision_url=\"http://127.0.0.1:9/mcp/vision/explain\"",
            "tools.vision_token=\"test-token\"",
        ],
    );
    let url = server.ws_url("/xiaozhi/v1/");
    run_sdk_script(
        "tool_call.py",
        std::iter::once(url.as_str()).chain(texts.iter().copied()),
    )
}

/// What the server said in turn `i` of an SDK run.
fn sdk_said(summary: &Value, i: usize) -> String {
    summary["turns"][i]["sentences"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

#[test]
fn xiaozhi_sdk_with_a_registered_volume_tool_is_driven_through_tool_calls() {
    let mock = volume_mock();
    let summary = sdk_tool_run(
        &mock,
        false,
        &["Set the volume to 40.", "A bit louder, please."],
    );
    assert_eq!(
        summary["calls"],
        json!([
            ["self.audio_speaker.set_volume", {"volume": 40}],
            ["self.get_device_status", {}],
            ["self.audio_speaker.set_volume", {"volume": 50}],
        ]),
        "{summary}"
    );
    assert_eq!(summary["volume"], 50);
    assert_eq!(sdk_said(&summary, 0), "OK, the volume is now 40.");
    assert_eq!(sdk_said(&summary, 1), "OK, the volume is now 50.");
}

#[test]
fn xiaozhi_sdk_tool_is_called_by_the_remote_llm_and_its_result_fed_back() {
    let mock = volume_mock();
    let summary = sdk_tool_run(&mock, true, &["Please make the volume 55."]);
    assert_eq!(
        summary["calls"],
        json!([["self.audio_speaker.set_volume", {"volume": 55}]]),
        "{summary}"
    );
    assert_eq!(sdk_said(&summary, 0), "Done. The speaker volume is set.");
    let requests = mock.chat_requests();
    assert_eq!(requests.len(), 2);
    // The SDK's result text is the JSON its tool function returned.
    let results = tool_messages(&requests[1]);
    assert_eq!(results[0]["content"], r#"{"success": true, "volume": 55}"#);
}

/// The firmware camera's multipart boundary (F `esp32_camera.cc`).
const CAMERA_BOUNDARY: &str = "----ESP32_CAMERA_BOUNDARY";

/// A small real JPEG: a 32×24 colour gradient encoded by the `image` crate.
fn test_jpeg() -> Vec<u8> {
    let (w, h) = (32u32, 24u32);
    let mut pixels = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            pixels.extend_from_slice(&[(x * 8) as u8, (y * 10) as u8, 128]);
        }
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
        .encode(&pixels, w, h, image::ColorType::Rgb8)
        .expect("encode jpeg");
    assert_eq!(&out[..3], &[0xFF, 0xD8, 0xFF], "a JPEG starts with SOI");
    out
}

/// The body the firmware posts: a `question` part, then the photo as `file` (camera.jpg).
fn camera_form(question: &str, file: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{CAMERA_BOUNDARY}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n{question}\r\n\
         --{CAMERA_BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"camera.jpg\"\r\n\
         Content-Type: image/jpeg\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(file);
    b.extend_from_slice(format!("\r\n--{CAMERA_BOUNDARY}--\r\n").as_bytes());
    b
}

/// Posts `body` to `url` (an `http://127.0.0.1:<port>/…` URL) with the camera's content type.
fn post_form(
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    chunk: Option<usize>,
) -> HttpResponse {
    let rest = url.strip_prefix("http://127.0.0.1:").expect("loopback URL");
    let (port, path) = rest.split_once('/').expect("path");
    let content_type = format!("multipart/form-data; boundary={CAMERA_BOUNDARY}");
    let mut all = vec![("Content-Type", content_type.as_str())];
    all.extend_from_slice(headers);
    let port = port.parse().expect("port");
    http_request_bytes(port, "POST", &format!("/{path}"), &all, body, chunk).expect("post")
}

/// Posts a photo question as the firmware does: chunked, with its headers.
fn post_photo(url: &str, device: &str, token: &str, question: &str, jpeg: &[u8]) -> HttpResponse {
    let auth = format!("Bearer {token}");
    let headers = [
        ("Device-Id", device),
        ("Client-Id", "7b94d69a-9808-4c59-9c9b-704333b38aff"),
        ("Authorization", auth.as_str()),
    ];
    post_form(url, &headers, &camera_form(question, jpeg), Some(1024))
}

/// A fast mock vision model answering `reply`.
fn vision_mock(reply: &str) -> MockHandle {
    mock_upstream::serve(MockSettings {
        llm_first_token: Duration::from_millis(20),
        llm_token: Duration::from_millis(1),
        llm_reply: reply.into(),
        ..MockSettings::default()
    })
    .expect("vision mock")
}

/// `--set`s that make `base_url` the vision model.
fn vision_sets(base_url: &str) -> Vec<String> {
    vec![
        "vision.provider=\"openai\"".into(),
        format!("vision.openai.base_url=\"{base_url}\""),
        "vision.openai.model=\"vision-test-model\"".into(),
    ]
}

/// A server whose vision model is at `vision_base_url` (plus `extra` sets; the LLM is `llm`'s,
/// remote when `remote_llm`), and a device `mac` on it (with the camera tool when `camera`);
/// also the vision URL and token its `initialize` carried.
fn vision_session(
    llm: &MockHandle,
    remote_llm: bool,
    vision_base_url: &str,
    extra: &[&str],
    mac: &str,
    camera: bool,
) -> (Server, Device, String, String) {
    let mut sets = vision_sets(vision_base_url);
    sets.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let server = server(llm, remote_llm, &refs);
    let device = Device::connect_with(&server, mac, camera);
    let caps = &device.initialize["params"]["capabilities"]["vision"];
    let url = caps["url"].as_str().expect("vision url").to_string();
    let token = caps["token"].as_str().expect("vision token").to_string();
    (server, device, url, token)
}

/// `xiaozhi_vision_requests_total{result="<result>"}`.
fn vision_count(server: &Server, result: &str) -> u64 {
    let body = http_request(server.http_port, "GET", "/metrics", &[], "")
        .expect("metrics")
        .body;
    let key = format!("xiaozhi_vision_requests_total{{result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} missing in:\n{body}"))
}

fn json_body(resp: &HttpResponse) -> Value {
    serde_json::from_str(&resp.body).unwrap_or_else(|e| panic!("{e}: {}", resp.body))
}

#[test]
fn vision_endpoint_answers_the_device_its_token_was_issued_to_and_refuses_everything_else() {
    use base64::Engine;
    let llm = volume_mock();
    let vision = vision_mock("A gradient from green to pink.");
    let mac = "aa:dd:00:00:00:10";
    let (server, device, url, token) = vision_session(
        &llm,
        false,
        &vision.base_url(),
        &["vision.max_body_bytes=200000"],
        mac,
        false,
    );
    assert_eq!(
        url,
        format!("http://127.0.0.1:{}/mcp/vision/explain", server.http_port)
    );
    assert!(!token.is_empty());

    let jpeg = test_jpeg();
    let resp = post_photo(&url, mac, &token, "What do you see?", &jpeg);
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        json_body(&resp),
        json!({"success":true,"action":"RESPONSE","response":"A gradient from green to pink."})
    );
    let asked = vision.chat_requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["model"], "vision-test-model");
    let content = &asked[0]["messages"][0]["content"];
    assert_eq!(content[0]["text"], "What do you see?");
    let data_url = format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&jpeg)
    );
    assert_eq!(content[1]["image_url"]["url"], data_url.as_str());

    let status = http_request(server.http_port, "GET", "/mcp/vision/explain", &[], "").unwrap();
    assert_eq!(status.status, 200);
    assert!(status.body.contains("vision-test-model"), "{}", status.body);

    // Another device's id with this token, a forged token, no token: 401, model not asked.
    for (device, auth) in [
        ("aa:dd:00:00:00:11", format!("Bearer {token}")),
        (mac, "Bearer AAAA.99999999999".to_string()),
        (mac, String::new()),
    ] {
        let headers = [("Device-Id", device), ("Authorization", auth.as_str())];
        let resp = post_form(&url, &headers, &camera_form("q", &jpeg), None);
        assert_eq!(resp.status, 401, "{device} {auth}: {}", resp.body);
        assert_eq!(json_body(&resp)["success"], false);
        assert!(json_body(&resp)["message"]
            .as_str()
            .unwrap()
            .contains("token"));
    }
    // Not an image: 400.
    let resp = post_photo(&url, mac, &token, "q", b"%PDF-1.4 not a photo");
    assert_eq!(resp.status, 400, "{}", resp.body);
    assert!(json_body(&resp)["message"]
        .as_str()
        .unwrap()
        .contains("not a JPEG"));
    // Too large: refused from Content-Length before reading, and a chunked body cut off.
    let mut big = jpeg.clone();
    big.resize(300_000, 0);
    let auth = format!("Bearer {token}");
    let headers = [("Device-Id", mac), ("Authorization", auth.as_str())];
    let resp = post_form(&url, &headers, &camera_form("q", &big), None);
    assert_eq!(resp.status, 413, "{}", resp.body);
    let resp = post_form(&url, &headers, &camera_form("q", &big), Some(8192));
    // The server answers and closes as soon as the bound is passed; the client may still be
    // writing, so the answer can be lost to a reset: the counter below is the proof.
    assert!(
        matches!(resp.status, 413 | 0),
        "{} {}",
        resp.status,
        resp.body
    );

    assert_eq!(
        vision.chat_requests().len(),
        1,
        "refusals never reach the model"
    );
    assert_eq!(vision_count(&server, "ok"), 1);
    assert_eq!(vision_count(&server, "unauthorized"), 3);
    assert_eq!(vision_count(&server, "bad_request"), 1);
    assert_eq!(vision_count(&server, "too_large"), 2);
    // The session is untouched by all this.
    drop(device);
    assert_eq!(
        http_request(server.http_port, "GET", "/healthz", &[], "")
            .unwrap()
            .status,
        200
    );
}

#[test]
fn vision_model_failures_are_clear_answers_and_the_server_keeps_serving() {
    let llm = volume_mock();
    // Nothing listens on the vision model's port.
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let mac = "aa:dd:00:00:00:12";
    let (dead_server, _device, url, token) = vision_session(
        &llm,
        false,
        &dead,
        &["vision.openai.timeout_ms=1500"],
        mac,
        false,
    );
    let resp = post_photo(&url, mac, &token, "What is this?", &test_jpeg());
    assert_eq!(resp.status, 200, "{}", resp.body);
    let body = json_body(&resp);
    assert_eq!(body["success"], false);
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("the vision model did not answer: ") && message.contains("connect"),
        "{message}"
    );
    assert_eq!(vision_count(&dead_server, "upstream_error"), 1);
    assert_eq!(
        http_request(dead_server.http_port, "GET", "/healthz", &[], "")
            .unwrap()
            .status,
        200
    );
    // A model that accepts the request but never answers: bounded by vision.openai.timeout_ms.
    let stalled = vision_mock("never");
    stalled.update(|s| s.stall = true);
    let mac2 = "aa:dd:00:00:00:13";
    let (server2, _device2, url2, token2) = vision_session(
        &llm,
        false,
        &stalled.base_url(),
        // One shard, so both requests meet the same limit.
        &[
            "vision.openai.timeout_ms=1500",
            "vision.max_in_flight=1",
            "runtime.shard_cores=[0]",
        ],
        mac2,
        false,
    );
    let started = Instant::now();
    let first = {
        let (url, token) = (url2.clone(), token2.clone());
        std::thread::spawn(move || post_photo(&url, mac2, &token, "What is this?", &test_jpeg()))
    };
    while stalled.stats().requests == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the model was never asked"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // One photo in hand is this shard's limit: the next is refused at once, not queued.
    let busy = post_photo(&url2, mac2, &token2, "And this?", &test_jpeg());
    assert_eq!(busy.status, 503, "{}", busy.body);
    assert!(
        busy.head.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        busy.head
    );
    let resp = first.join().expect("first request");
    assert!(started.elapsed() < Duration::from_secs(5));
    let message = json_body(&resp)["message"].as_str().unwrap().to_string();
    assert!(message.contains("timed out"), "{message}");
    assert_eq!(vision_count(&server2, "busy"), 1);
    // The model recovers; the same token still works on the same server.
    stalled.update(|s| s.stall = false);
    let resp = post_photo(&url2, mac2, &token2, "And now?", &test_jpeg());
    assert_eq!(json_body(&resp)["response"], "never");
    assert_eq!(vision_count(&server2, "upstream_error"), 1);
    assert_eq!(vision_count(&server2, "ok"), 1);
}

#[test]
fn camera_tool_posts_the_photo_and_the_vision_answer_is_spoken_without_another_llm_round() {
    let llm = tool_mock(
        "I cannot see anything.",
        "photo",
        "self_camera_take_photo",
        r#"{"question":"What is in front of you?"}"#,
    );
    let vision = vision_mock("I see a colourful gradient.");
    let (_server, mut device, _, _) = vision_session(
        &llm,
        true,
        &vision.base_url(),
        &[],
        "aa:dd:00:00:00:14",
        true,
    );
    let texts = device.ask(
        "Take a photo and tell me what you see",
        Duration::from_secs(20),
    );
    assert_eq!(device.calls.len(), 1);
    assert_eq!(device.calls[0]["params"]["name"], CAMERA_TOOL);
    assert_eq!(spoken(&texts), "I see a colourful gradient.");
    assert_eq!(
        llm.chat_requests().len(),
        1,
        "the tool's RESPONSE is spoken as it is"
    );
    let asked = vision.chat_requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        asked[0]["messages"][0]["content"][0]["text"],
        "What is in front of you?"
    );
}

/// Connects `mac` (with `authorization`, if any), says hello with MCP and returns the socket
/// and the server's `initialize` request.
fn mcp_initialize(server: &Server, mac: &str, authorization: Option<&str>) -> (Ws, Value) {
    let mut headers = device_headers(mac, "1");
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    let mut ws = connect(&server.ws_url("/xiaozhi/v1/"), &headers);
    hello(&mut ws, HELLO_MCP);
    loop {
        let v = next_json_skipping_audio(&mut ws);
        if v["type"] == "mcp" && v["payload"]["method"] == "initialize" {
            return (ws, v["payload"].clone());
        }
    }
}

/// The bearer token OTA hands `mac`.
fn ota_bearer(server: &Server, mac: &str) -> String {
    let ota = http_request(
        server.http_port,
        "POST",
        "/xiaozhi/ota/",
        &[
            ("Device-Id", mac),
            ("Client-Id", "7b94d69a-9808-4c59-9c9b-704333b38aff"),
        ],
        "{}",
    )
    .expect("ota");
    let token = json_body(&ota)["websocket"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    assert!(!token.is_empty(), "{}", ota.body);
    format!("Bearer {token}")
}

#[test]
fn with_auth_on_only_verified_sessions_get_vision_and_one_device_cannot_hold_every_slot() {
    let llm = volume_mock();
    let stalled = vision_mock("slow");
    stalled.update(|s| s.stall = true);
    let claimed = "aa:dd:00:00:00:20";
    let (a, b) = ("aa:dd:00:00:00:21", "aa:dd:00:00:00:22");
    let mut sets = vision_sets(&stalled.base_url());
    sets.extend([
        "server.auth.enabled=true".to_string(),
        "server.auth.secrets=[\"vision-test\"]".to_string(),
        format!("server.auth.allowed_devices=[\"{claimed}\"]"),
        "server.auth.allowed_devices_skip_token=true".to_string(),
        // One shard with three places: device A may hold two of them, not all three.
        "runtime.shard_cores=[0]".to_string(),
        "vision.max_in_flight=3".to_string(),
        "vision.max_in_flight_per_device=2".to_string(),
        "vision.openai.timeout_ms=3000".to_string(),
    ]);
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let server = server(&llm, false, &refs);

    // Let in by claiming an allowed id, without a token: no vision token for it.
    let (_claimed_ws, init) = mcp_initialize(&server, claimed, None);
    assert!(
        init["params"]["capabilities"].get("vision").is_none(),
        "{init}"
    );
    // Verified devices get theirs.
    let vision_of = |mac: &str| {
        let (ws, init) = mcp_initialize(&server, mac, Some(&ota_bearer(&server, mac)));
        let caps = &init["params"]["capabilities"]["vision"];
        let url = caps["url"].as_str().expect("vision url").to_string();
        let token = caps["token"].as_str().expect("vision token").to_string();
        (ws, url, token)
    };
    let (_a_ws, url, token_a) = vision_of(a);
    let (_b_ws, _, token_b) = vision_of(b);

    // A's two slow uploads are in the model's hands...
    let post = |mac: &'static str, token: &str| {
        let (url, token) = (url.clone(), token.to_string());
        std::thread::spawn(move || post_photo(&url, mac, &token, "What is this?", &test_jpeg()))
    };
    let held: Vec<_> = (0..2).map(|_| post(a, &token_a)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stalled.stats().requests < 2 {
        assert!(Instant::now() < deadline, "the model was never asked");
        std::thread::sleep(Duration::from_millis(10));
    }
    // ...its third is refused at once...
    let third = post_photo(&url, a, &token_a, "And this?", &test_jpeg());
    assert_eq!(third.status, 429, "{}", third.body);
    assert!(
        json_body(&third)["message"]
            .as_str()
            .unwrap_or("")
            .contains("this device has 2 photos"),
        "{}",
        third.body
    );
    // ...and B still gets the shard's last place.
    let b_post = post(b, &token_b);
    while stalled.stats().requests < 3 {
        assert!(
            Instant::now() < deadline,
            "B's photo never reached the model"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for t in held.into_iter().chain([b_post]) {
        let resp = t.join().expect("post");
        assert_eq!(json_body(&resp)["success"], false, "{}", resp.body);
    }
    assert_eq!(vision_count(&server, "rate_limited"), 1);
    assert_eq!(vision_count(&server, "busy"), 0);
}
