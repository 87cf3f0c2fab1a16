//! The MQTT + UDP transport over real sockets: the bench's firmware-like device (credentials
//! from the OTA answer, MQTT for JSON, AES-128-CTR Opus over the shard's UDP port) runs a whole
//! spoken turn with the local providers; wrong passwords are refused with CONNACK 5; replayed,
//! forged and malformed datagrams are dropped and counted by reason; QoS 1 closes the
//! connection; a drain says goodbye to an idle MQTT device.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::*;
use xiaozhi_bench::mqtt_device::{self, ConnectError, Event, MqttCredentials, MqttDevice};

const KEY: &str = "mqtt-test-signature-key";
const WAIT: Duration = Duration::from_secs(10);

/// A server with MQTT on (every device gets MQTT from OTA) on free ports; returns it and the
/// MQTT port.
fn mqtt_server(extra: &[&str]) -> (Server, u16) {
    let port = free_port();
    let mut sets = vec![
        "mqtt.enabled=true".to_string(),
        format!("mqtt.port={port}"),
        "mqtt.udp_port_base=0".into(),
        format!("mqtt.signature_keys=[\"{KEY}\"]"),
        "mqtt.ota_transport=\"mqtt\"".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    (Server::start(&refs), port)
}

fn credentials(server: &Server, mac: &str) -> MqttCredentials {
    mqtt_device::ota_credentials(
        &format!("127.0.0.1:{}", server.http_port),
        mac,
        "7b94d69a-9808-4c59-9c9b-704333b38aff",
    )
    .expect("OTA answer with an mqtt section")
}

fn connect(server: &Server, mac: &str) -> MqttDevice {
    let creds = credentials(server, mac);
    MqttDevice::connect(None, &creds, WAIT).expect("MQTT connect")
}

/// Value of `name{label}` in `/metrics` (0 when absent).
fn labelled(server: &Server, name_and_labels: &str) -> u64 {
    let resp = http_request(server.http_port, "GET", "/metrics", &[], "").expect("metrics");
    resp.body
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name_and_labels} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `name{label}` reaches `want` (datagrams are counted asynchronously).
fn wait_for_metric(server: &Server, name_and_labels: &str, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = labelled(server, name_and_labels);
        if got >= want {
            assert_eq!(got, want, "{name_and_labels}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name_and_labels} stayed at {got}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ota_credentials_open_an_mqtt_session_whose_hello_announces_a_udp_channel() {
    let (server, port) = mqtt_server(&[]);
    let creds = credentials(&server, "aa:dd:00:00:00:01");
    assert_eq!(creds.endpoint, format!("127.0.0.1:{port}"));
    assert_eq!(creds.publish_topic, "device-server");
    let mut device = MqttDevice::connect(None, &creds, WAIT).expect("connect");
    let hello = device.hello(false, WAIT).expect("hello reply");
    assert_eq!(hello["transport"], "udp");
    assert_eq!(hello["version"], 3);
    assert_eq!(hello["udp"]["encryption"], "aes-128-ctr");
    assert_eq!(hello["udp"]["server"], "127.0.0.1");
    let nonce = hello["udp"]["nonce"].as_str().unwrap();
    assert!(
        nonce.starts_with("01000000") && nonce.ends_with(&"0".repeat(16)),
        "{nonce}"
    );
    assert_eq!(hello["audio_params"]["sample_rate"], 24000);
    // A second hello gets a fresh key on the same shard port and connection id.
    let again = device.hello(false, WAIT).expect("second hello");
    assert_ne!(again["udp"]["key"], hello["udp"]["key"]);
    assert_eq!(again["udp"]["nonce"], hello["udp"]["nonce"]);
    assert_eq!(again["udp"]["port"], hello["udp"]["port"]);
    // Control messages travel over MQTT: ping is answered with pong.
    device.publish(r#"{"type":"ping"}"#).unwrap();
    assert!(device.wait_for("pong", WAIT).is_some());
    device.ping().unwrap();
    assert_eq!(
        labelled(&server, "xiaozhi_mqtt_connects_total{result=\"accepted\"}"),
        1
    );
}

/// What a device heard during one spoken turn over MQTT + UDP.
struct Turn {
    /// The `stt` text, lower-cased.
    stt: String,
    /// Every message's `type.state`, in order, up to `tts.stop`.
    kinds: Vec<String>,
    /// The reply's Opus packets (they passed the firmware's checks).
    audio: Vec<Vec<u8>>,
    /// Uplink datagrams sent.
    sent: u32,
    /// When the device started speaking.
    t0: Instant,
}

/// Says `frames` in real time after `listen start` (then silence until the server heard it)
/// and collects what comes back up to `tts stop`.
fn speak_one_turn(device: &mut MqttDevice, frames: &[Vec<u8>]) -> Turn {
    device
        .publish(r#"{"type":"listen","state":"start","mode":"auto"}"#)
        .unwrap();
    let silence = opus_frames(&vec![0i16; 960]).remove(0);
    let t0 = Instant::now();
    let mut sent = 0u32;
    let (mut stt, mut audio, mut kinds) = (None, Vec::new(), Vec::new());
    let deadline = t0 + Duration::from_secs(90);
    loop {
        assert!(Instant::now() < deadline, "no tts stop; saw {kinds:?}");
        // The utterance, then silence until the server has heard it, in real time.
        let due = t0 + Duration::from_millis(60) * sent;
        if Instant::now() >= due && (sent as usize) < frames.len() {
            device.send_audio(&frames[sent as usize]).unwrap();
            sent += 1;
        } else if Instant::now() >= due && stt.is_none() {
            device.send_audio(&silence).unwrap();
            sent += 1;
        }
        match device.next_event(Duration::from_millis(10)) {
            Some(Event::Text(v)) => {
                let kind = format!(
                    "{}.{}",
                    v["type"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("")
                );
                if v["type"] == "stt" {
                    stt = v["text"].as_str().map(str::to_lowercase);
                }
                let stop = kind == "tts.stop";
                kinds.push(kind);
                if stop {
                    break;
                }
            }
            Some(Event::Audio { opus, .. }) => {
                assert!(
                    kinds.iter().any(|k| k == "tts.start"),
                    "audio before tts start: {kinds:?}"
                );
                audio.push(opus);
            }
            Some(Event::Closed) => panic!("connection closed; saw {kinds:?}"),
            None => {}
        }
    }
    Turn {
        stt: stt.expect("stt"),
        kinds,
        audio,
        sent,
        t0,
    }
}

/// Every packet is one 60 ms frame of 24 kHz Opus, none failed the firmware's checks, and the
/// reply came no faster than it plays.
fn assert_paced_opus(device: &MqttDevice, turn: &Turn) {
    assert!(!turn.audio.is_empty(), "reply audio over UDP");
    let mut dec = opus::Decoder::new(24_000, opus::Channels::Mono).unwrap();
    let mut pcm = vec![0i16; 2880];
    for f in &turn.audio {
        assert_eq!(dec.decode(f, &mut pcm, false).expect("decodes"), 1440);
    }
    assert_eq!(
        device
            .bad_downlink
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "every downlink datagram passed the firmware's checks"
    );
    // Paced like the WebSocket: the reply cannot arrive faster than it plays.
    let played = Duration::from_millis(60) * turn.audio.len() as u32;
    assert!(
        turn.t0.elapsed() >= played,
        "{played:?} of audio in {:?}",
        turn.t0.elapsed()
    );
}

/// The sum of every line of `name{…}` whose labels include `label` (all shards).
fn summed(server: &Server, name: &str, label: &str) -> u64 {
    let resp = http_request(server.http_port, "GET", "/metrics", &[], "").expect("metrics");
    resp.body
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn mqtt_device_speaks_over_udp_and_hears_stt_and_paced_audio_back() {
    let frames = opus_frames(&speech_16k("What time is it now?", "en-us", 0.8));
    let (server, _) = mqtt_server(&[]);
    let mut device = connect(&server, "aa:dd:00:00:00:02");
    device.hello(false, WAIT).expect("hello");
    let turn = speak_one_turn(&mut device, &frames);
    assert!(turn.stt.contains("time"), "transcript {:?}", turn.stt);
    assert_paced_opus(&device, &turn);
    wait_for_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"accepted\"}",
        u64::from(turn.sent),
    );
    assert_eq!(
        labelled(&server, "xiaozhi_udp_downlink_total{result=\"sent\"}"),
        turn.audio.len() as u64
    );
    // The turn is counted under its transport, not under WebSocket's.
    for (series, want) in [
        ("xiaozhi_transport_turns_total{transport=\"mqtt\"}", 1),
        ("xiaozhi_transport_turns_total{transport=\"websocket\"}", 0),
        (
            "xiaozhi_transport_eos_to_first_audio_us_count{transport=\"mqtt\"}",
            1,
        ),
        (
            "xiaozhi_transport_eos_to_first_audio_us_count{transport=\"websocket\"}",
            0,
        ),
    ] {
        assert_eq!(labelled(&server, series), want, "{series}");
    }
}

#[test]
fn mqtt_device_runs_a_turn_on_remote_providers() {
    let mock = xiaozhi_bench::mock_upstream::serve(xiaozhi_bench::mock_upstream::MockSettings {
        bind: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    })
    .expect("mock upstream");
    let remote = remote_provider_sets(&mock.base_url());
    let extra: Vec<&str> = remote.iter().map(String::as_str).collect();
    let (server, _) = mqtt_server(&extra);
    let frames = opus_frames(&speech_16k("What time is it now?", "en-us", 0.8));
    let mut device = connect(&server, "aa:dd:00:00:00:10");
    device.hello(false, WAIT).expect("hello");
    let turn = speak_one_turn(&mut device, &frames);
    // The mock's transcript and reply, not the local models': the turn went upstream.
    // (The server's `stt` drops the transcript's final question mark.)
    assert_eq!(
        turn.stt,
        xiaozhi_bench::mock_upstream::DEFAULT_ASR_TEXT
            .to_lowercase()
            .trim_end_matches('?')
    );
    let position = |k: &str| turn.kinds.iter().position(|x| x == k);
    let (stt, start, stop) = (
        position("stt."),
        position("tts.start"),
        position("tts.stop"),
    );
    assert!(
        stt < start && start < stop && stt.is_some(),
        "{:?}",
        turn.kinds
    );
    assert!(
        turn.kinds.iter().any(|k| k == "llm."),
        "llm emotion message: {:?}",
        turn.kinds
    );
    assert!(
        turn.kinds.iter().any(|k| k == "tts.sentence_start"),
        "{:?}",
        turn.kinds
    );
    assert_paced_opus(&device, &turn);
    let stats = mock.stats();
    assert_eq!(stats.transcription_requests, 1, "{stats:?}");
    assert_eq!(stats.chat_requests, 1, "{stats:?}");
    assert!(stats.speech_requests >= 1, "{stats:?}");
    assert_eq!(
        labelled(&server, "xiaozhi_transport_turns_total{transport=\"mqtt\"}"),
        1
    );
}

#[test]
fn sessions_are_counted_under_their_own_transport() {
    let (server, _) = mqtt_server(&[]);
    let mut device = connect(&server, "aa:dd:00:00:00:11");
    let reply = device.hello(false, WAIT).expect("hello");
    let mut ws = common::connect(
        &server.ws_url("/xiaozhi/v1/"),
        &device_headers("aa:dd:00:00:00:12", "1"),
    );
    hello(&mut ws, HELLO);
    let open = |t: &str| {
        summed(
            &server,
            "xiaozhi_transport_sessions",
            &format!("transport=\"{t}\""),
        )
    };
    assert_eq!(
        (open("mqtt"), open("websocket"), open("gateway")),
        (1, 1, 0)
    );
    assert_eq!(
        labelled(
            &server,
            "xiaozhi_transport_sessions_total{transport=\"mqtt\"}"
        ),
        1
    );
    assert_eq!(
        labelled(
            &server,
            "xiaozhi_transport_sessions_total{transport=\"websocket\"}"
        ),
        1
    );
    // The MQTT device says goodbye: its session ends, its connection and the WebSocket stay.
    device
        .publish(&format!(
            r#"{{"type":"goodbye","session_id":"{}"}}"#,
            reply["session_id"].as_str().unwrap()
        ))
        .unwrap();
    assert!(device.wait_for("goodbye", WAIT).is_some());
    let deadline = Instant::now() + WAIT;
    while open("mqtt") != 0 {
        assert!(Instant::now() < deadline, "the MQTT session stayed open");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(open("websocket"), 1);
    drop(ws);
    let deadline = Instant::now() + WAIT;
    while open("websocket") != 0 {
        assert!(
            Instant::now() < deadline,
            "the WebSocket session stayed open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn wrong_password_is_refused_with_connack_5_and_counted() {
    let (server, _) = mqtt_server(&[]);
    let mut creds = credentials(&server, "aa:dd:00:00:00:03");
    let good = creds.password.clone();
    let other_first = if good.starts_with('A') { "B" } else { "A" };
    creds.password = format!("{other_first}{}", &good[1..]);
    match MqttDevice::connect(None, &creds, WAIT) {
        Err(ConnectError::Refused(5)) => {}
        Err(e) => panic!("expected CONNACK 5, got {e}"),
        Ok(_) => panic!("a wrong password was accepted"),
    }
    // A client id the password was not signed for is refused the same way.
    let mut other = credentials(&server, "aa:dd:00:00:00:03");
    other.client_id = other
        .client_id
        .replace("aa_dd_00_00_00_03", "aa_dd_00_00_00_04");
    assert!(matches!(
        MqttDevice::connect(None, &other, WAIT),
        Err(ConnectError::Refused(5))
    ));
    assert_eq!(
        labelled(
            &server,
            "xiaozhi_mqtt_connects_total{result=\"wrong_password\"}"
        ),
        2
    );
    creds.password = good;
    assert!(MqttDevice::connect(None, &creds, WAIT).is_ok());
}

#[test]
fn replayed_forged_and_malformed_datagrams_are_dropped_and_counted() {
    let (server, _) = mqtt_server(&[]);
    let mut device = connect(&server, "aa:dd:00:00:00:05");
    let hello = device.hello(false, WAIT).expect("hello");
    let silence = opus_frames(&vec![0i16; 960]).remove(0);
    let first = device.send_audio(&silence).unwrap();
    device.send_audio(&silence).unwrap();
    wait_for_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"accepted\"}",
        2,
    );
    // Replays: the same datagram again, and an older one.
    device.send_datagram(&first).unwrap();
    device
        .send_datagram(device.last_datagram().unwrap().to_vec().as_slice())
        .unwrap();
    wait_for_metric(&server, "xiaozhi_udp_datagrams_total{result=\"replay\"}", 2);
    // A forged source: a later sequence, correctly sealed, but from another address.
    let key: Vec<u8> = (0..16)
        .map(|i| {
            u8::from_str_radix(&hello["udp"]["key"].as_str().unwrap()[2 * i..2 * i + 2], 16)
                .unwrap()
        })
        .collect();
    let nonce: Vec<u8> = (0..16)
        .map(|i| {
            u8::from_str_radix(
                &hello["udp"]["nonce"].as_str().unwrap()[2 * i..2 * i + 2],
                16,
            )
            .unwrap()
        })
        .collect();
    let forged = mqtt_device::seal(
        &key.clone().try_into().unwrap(),
        &nonce.clone().try_into().unwrap(),
        100,
        &silence,
    );
    let attacker = UdpSocket::bind("127.0.0.2:0").expect("a second loopback address");
    let shard = device.udp_server().unwrap();
    attacker.send_to(&forged, shard).unwrap();
    wait_for_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"forged_source\"}",
        1,
    );
    // Unknown connection id, wrong length, too short.
    let mut unknown = forged.clone();
    unknown[4..8].copy_from_slice(&[0xfe, 0xed, 0xfa, 0xce]);
    device.send_datagram(&unknown).unwrap();
    let mut truncated = device.send_audio(&silence).unwrap();
    truncated.pop();
    device.send_datagram(&truncated).unwrap();
    device.send_datagram(&[1, 0, 0]).unwrap();
    wait_for_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"unknown_connection\"}",
        1,
    );
    wait_for_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"bad_length\"}",
        1,
    );
    wait_for_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"too_short\"}",
        1,
    );
    // The forged sequence did not move the device's: its next datagram is still taken.
    device.send_audio(&silence).unwrap();
    wait_for_metric(
        &server,
        "xiaozhi_udp_datagrams_total{result=\"accepted\"}",
        4,
    );
}

#[test]
fn qos_1_and_oversized_packets_close_the_connection_and_are_counted() {
    let (server, _) = mqtt_server(&["mqtt.max_packet_bytes=1024"]);
    let mut device = connect(&server, "aa:dd:00:00:00:06");
    // PUBLISH QoS 1, topic "t", packet id 1, payload "{}".
    device
        .write_raw(&[0x32, 7, 0, 1, b't', 0, 1, b'{', b'}'])
        .unwrap();
    assert!(matches!(device.next_event(WAIT), Some(Event::Closed)));
    wait_for_metric(
        &server,
        "xiaozhi_mqtt_packets_refused_total{reason=\"qos\"}",
        1,
    );
    let mut big = connect(&server, "aa:dd:00:00:00:07");
    big.publish(&format!(
        "{{\"type\":\"x\",\"pad\":\"{}\"}}",
        "a".repeat(2000)
    ))
    .unwrap();
    assert!(matches!(big.next_event(WAIT), Some(Event::Closed)));
    wait_for_metric(
        &server,
        "xiaozhi_mqtt_packets_refused_total{reason=\"oversized\"}",
        1,
    );
}

#[test]
fn drain_says_goodbye_to_an_idle_mqtt_device_and_the_server_exits() {
    let (mut server, _) = mqtt_server(&["server.drain.delay_ms=0"]);
    let mut device = connect(&server, "aa:dd:00:00:00:08");
    let hello = device.hello(false, WAIT).expect("hello");
    server.terminate();
    let bye = device.wait_for("goodbye", WAIT).expect("goodbye on drain");
    assert_eq!(bye["session_id"], hello["session_id"]);
    assert!(matches!(device.next_event(WAIT), Some(Event::Closed)));
    assert!(server.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn after_a_goodbye_the_connection_waits_for_the_next_hello() {
    let (server, _) = mqtt_server(&[]);
    let mut device = connect(&server, "aa:dd:00:00:00:09");
    let first = device.hello(false, WAIT).expect("hello");
    device
        .publish(&format!(
            r#"{{"type":"goodbye","session_id":"{}"}}"#,
            first["session_id"].as_str().unwrap()
        ))
        .unwrap();
    let bye = device
        .wait_for("goodbye", WAIT)
        .expect("goodbye after the device's");
    assert_eq!(bye["session_id"], first["session_id"]);
    // Without a session a message other than hello is answered with goodbye.
    device
        .publish(r#"{"type":"listen","state":"start","mode":"auto"}"#)
        .unwrap();
    assert!(device.wait_for("goodbye", WAIT).is_some());
    let second = device.hello(false, WAIT).expect("a new session");
    assert_ne!(second["session_id"], first["session_id"]);
    assert_eq!(labelled(&server, "xiaozhi_mqtt_sessions_total"), 2);
}

#[test]
fn a_standard_mqtt_client_connects_with_ota_credentials_and_exchanges_hello_and_listen() {
    let (server, _) = mqtt_server(&[]);
    let ota = format!("http://127.0.0.1:{}/xiaozhi/ota/", server.http_port);
    let summary = run_sdk_script("paho_hello.py", [ota.as_str(), "aa:dd:00:00:00:0a"]);
    assert_eq!(summary["connack"], "Success", "{summary}");
    let hello = &summary["hello"];
    assert_eq!(hello["transport"], "udp", "{summary}");
    assert_eq!(hello["udp"]["key"].as_str().map(str::len), Some(32));
    let types: Vec<&str> = summary["types"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    // The typed question is answered like a spoken one, all of it published to the device.
    for kind in ["stt", "tts.start", "llm", "tts.stop", "goodbye"] {
        assert!(types.contains(&kind), "{kind} missing in {types:?}");
    }
    assert!(summary["topics"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t == "devices/p2p/aa_dd_00_00_00_0a"));
    assert_eq!(summary["goodbye"]["session_id"], hello["session_id"]);
    let refused = run_sdk_script(
        "paho_hello.py",
        [ota.as_str(), "aa:dd:00:00:00:0b", "--password-suffix", "x"],
    );
    assert_eq!(refused["connack"], "Not authorized", "{refused}");
}

#[test]
fn a_duplicate_client_id_replaces_the_older_connection_on_any_shard() {
    let (server, _) = mqtt_server(&["runtime.shard_cores=[0,1]", "runtime.inference_cores=[1]"]);
    let creds = credentials(&server, "aa:dd:00:00:00:0c");
    let mut older = MqttDevice::connect(None, &creds, WAIT).expect("connect");
    let mut older_port = older.hello(false, WAIT).expect("hello")["udp"]["port"].clone();
    let (mut replaced, mut across) = (0, 0);
    // The kernel spreads connections over the shards; keep reconnecting until one replacement
    // crossed shards (each shard announces its own UDP port).
    while across == 0 {
        assert!(replaced < 40, "40 connections all landed on one shard");
        let mut newer = MqttDevice::connect(None, &creds, WAIT).expect("connect again");
        assert!(
            matches!(older.next_event(WAIT), Some(Event::Closed)),
            "the older connection was closed"
        );
        replaced += 1;
        let port = newer.hello(false, WAIT).expect("hello")["udp"]["port"].clone();
        if port != older_port {
            across += 1;
        }
        (older, older_port) = (newer, port);
    }
    wait_for_metric(&server, "xiaozhi_mqtt_replaced_total", replaced);
    // The newest one is still served.
    older.publish(r#"{"type":"ping"}"#).unwrap();
    assert!(older.wait_for("pong", WAIT).is_some());
}

/// A binary frame as the stock gateway sends it (spec §6.5): byte 0 = 1, the length at 2..4,
/// a sequence at 4..8, the timestamp at 8..12, the length again at 12..16, then the Opus packet.
fn gateway_frame(seq: u32, opus: &[u8]) -> Vec<u8> {
    let mut f = vec![1, 0];
    f.extend_from_slice(&(opus.len() as u16).to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&(seq * 60).to_be_bytes());
    f.extend_from_slice(&(opus.len() as u32).to_be_bytes());
    f.extend_from_slice(opus);
    f
}

#[test]
fn a_stock_gateway_connection_speaks_its_own_framing_both_ways() {
    use tungstenite::Message;
    let frames = opus_frames(&speech_16k("What time is it now?", "en-us", 0.8));
    let server = Server::start(&[]);
    let mut ws = common::connect(
        &server.ws_url("/xiaozhi/v1/?from=mqtt_gateway"),
        &[
            ("device-id", "aa:dd:00:00:00:0d"),
            ("client-id", "7b94d69a-9808-4c59-9c9b-704333b38aff"),
            ("protocol-version", "2"),
            ("authorization", "Bearer test-token"),
            ("x-forwarded-for", "192.0.2.7"),
        ],
    );
    let reply = hello(
        &mut ws,
        r#"{"type":"hello","version":2,"transport":"websocket","features":{"mcp":false},"audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#,
    );
    assert_eq!(reply["transport"], "websocket");
    ws.send(Message::text(
        r#"{"type":"listen","state":"start","mode":"auto"}"#,
    ))
    .unwrap();
    let silence = opus_frames(&vec![0i16; 960]).remove(0);
    set_timeout(&ws, Duration::from_millis(20));
    let t0 = Instant::now();
    let (mut sent, mut stt, mut audio) = (0u32, None::<String>, Vec::new());
    loop {
        assert!(t0.elapsed() < Duration::from_secs(90), "no tts stop");
        if Instant::now() >= t0 + Duration::from_millis(60) * sent && (stt.is_none()) {
            let opus = frames.get(sent as usize).unwrap_or(&silence);
            ws.send(Message::binary(gateway_frame(sent + 1, opus)))
                .unwrap();
            sent += 1;
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "stt" {
                    stt = v["text"].as_str().map(str::to_lowercase);
                }
                if v["type"] == "tts" && v["state"] == "stop" {
                    break;
                }
            }
            Ok(Message::Binary(b)) => audio.push(b.to_vec()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("connection failed: {e}"),
        }
    }
    let stt = stt.expect("the gateway-framed speech was recognised");
    assert!(stt.contains("time"), "{stt:?}");
    assert!(!audio.is_empty());
    let mut dec = opus::Decoder::new(24_000, opus::Channels::Mono).unwrap();
    let mut pcm = vec![0i16; 2880];
    for f in &audio {
        // What the gateway reads: the length at 12..16, the Opus packet after 16 bytes.
        let len = u32::from_be_bytes(f[12..16].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - 16);
        assert_eq!(
            dec.decode(&f[16..], &mut pcm, false).expect("decodes"),
            1440
        );
    }
    // Counted as the gateway's, apart from devices' own WebSockets.
    let turns = |t: &str| {
        labelled(
            &server,
            &format!("xiaozhi_transport_turns_total{{transport=\"{t}\"}}"),
        )
    };
    assert_eq!((turns("gateway"), turns("websocket")), (1, 0));
}
