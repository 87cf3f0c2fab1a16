//! Property tests for every parser a peer controls: thousands of generated inputs per run
//! through the binary audio framing (v1/v2/v3), the device's JSON messages, PROXY v1/v2 headers,
//! the HTTP request head and the identity in it, forwarded-address headers and device tokens.
//! Each must return a value or an error — never panic — and what it returns must stay within
//! the input it was given (no allocation out of proportion to the input).

use std::net::{IpAddr, Ipv4Addr};

use futures_lite::future::block_on;
use proptest::prelude::*;
use xiaozhi_tpc::connection::handshake::{read_head, HeadError};
use xiaozhi_tpc::front_door::peer::TrustedProxies;
use xiaozhi_tpc::front_door::proxy::{self, Accept};
use xiaozhi_tpc::protocol::{identify, parse_client_message, BinaryProtocol, TokenSigner};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 4096,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// JSON-shaped text: real message types and keys with values of any type, so the generator
/// reaches the typed parsing, not only the JSON syntax check.
fn client_json() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just("hello".to_string()),
        Just("listen".to_string()),
        Just("abort".to_string()),
        Just("mcp".to_string()),
        Just("iot".to_string()),
        Just("ping".to_string()),
        Just("goodbye".to_string()),
        "[a-z]{0,12}",
    ];
    let key = prop_oneof![
        Just("state".to_string()),
        Just("mode".to_string()),
        Just("text".to_string()),
        Just("version".to_string()),
        Just("transport".to_string()),
        Just("features".to_string()),
        Just("audio_params".to_string()),
        Just("payload".to_string()),
        Just("descriptors".to_string()),
        Just("states".to_string()),
        Just("reason".to_string()),
        "[a-z_]{1,10}",
    ];
    let value = prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() {
            f.to_string()
        } else {
            "1e999".into()
        }),
        "[ -~]{0,20}".prop_map(|s| serde_json::Value::String(s).to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just(r#"{"mcp":true,"aec":"x"}"#.to_string()),
        Just(r#"[{"name":"Speaker","state":{"volume":50}}]"#.to_string()),
        Just(r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":1}]}}"#.to_string()),
    ];
    (kind, proptest::collection::vec((key, value), 0..6)).prop_map(|(kind, fields)| {
        let mut text = format!(r#"{{"type":"{kind}""#);
        for (k, v) in fields {
            text.push_str(&format!(r#","{k}":{v}"#));
        }
        text.push('}');
        text
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn binary_frames_of_any_bytes_decode_or_fail_cleanly(
        frame in proptest::collection::vec(any::<u8>(), 0..600),
        version in 1u8..=3,
    ) {
        let protocol = BinaryProtocol::from_version(version).expect("known version");
        if let Ok(audio) = protocol.decode(&frame) {
            prop_assert!(audio.payload.len() <= frame.len());
        }
    }

    #[test]
    fn any_text_parses_to_a_message_or_an_error(text in "\\PC{0,200}") {
        let _ = parse_client_message(&text);
    }

    #[test]
    fn json_shaped_messages_parse_to_a_message_or_an_error(text in client_json()) {
        let _ = parse_client_message(&text);
    }

    #[test]
    fn proxy_headers_of_any_bytes_parse_or_fail_cleanly(
        tail in proptest::collection::vec(any::<u8>(), 0..300),
        prefix in prop_oneof![
            Just(Vec::new()),
            Just(b"PROXY ".to_vec()),
            Just(b"PROXY TCP4 ".to_vec()),
            Just(b"PROXY TCP6 ".to_vec()),
            Just(b"PROXY UNKNOWN".to_vec()),
            Just(b"\r\n\r\n\0\r\nQUIT\n".to_vec()),
            Just(b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec()),
        ],
        accept in prop_oneof![Just(Accept::V1), Just(Accept::V2), Just(Accept::Any)],
    ) {
        let mut buf = prefix;
        buf.extend(tail);
        if let Ok(proxy::Parsed::Header(_, len)) = proxy::parse(&buf, accept) {
            prop_assert!(len <= buf.len());
        }
    }

    #[test]
    fn request_heads_of_any_bytes_parse_or_fail_cleanly(
        head in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2000),
            ("[ -~]{0,40}", proptest::collection::vec(("[!-9;-~]{1,20}", "[ -~]{0,60}"), 0..60))
                .prop_map(|(target, headers)| {
                    let mut s = format!("GET {target} HTTP/1.1\r\n");
                    for (n, v) in headers {
                        s.push_str(&format!("{n}: {v}\r\n"));
                    }
                    s.push_str("\r\n");
                    s.into_bytes()
                }),
        ],
    ) {
        let mut reader = futures_lite::io::Cursor::new(head.clone());
        match block_on(read_head(&mut reader, 4096)) {
            Ok(h) => {
                prop_assert!(h.leftover.len() <= head.len());
                prop_assert!(h.headers.len() <= 48);
                // The identity in it: an identity or an error, never a panic.
                let _ = identify(h.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())), &h.target);
            }
            Err(HeadError::TooLarge(limit)) => prop_assert_eq!(limit, 4096),
            Err(_) => {}
        }
    }

    #[test]
    fn identity_from_any_target_and_headers_or_an_error(
        target in "\\PC{0,120}",
        headers in proptest::collection::vec(
            (prop_oneof![Just("Device-Id".to_string()), Just("Client-Id".to_string()), Just("Protocol-Version".to_string()), Just("Authorization".to_string()), "[a-zA-Z-]{1,12}"],
             proptest::collection::vec(any::<u8>(), 0..80)),
            0..8,
        ),
    ) {
        let _ = identify(headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())), &target);
    }

    #[test]
    fn forwarded_addresses_from_any_header_value(value in "\\PC{0,200}") {
        let trusted = TrustedProxies::parse(&["127.0.0.0/8".to_string()]).expect("cidr");
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let _ = trusted.forwarded_for(peer, Some(&value));
        let _ = trusted.real_ip(peer, Some(&value));
        // An untrusted peer's header is never believed.
        let stranger = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
        prop_assert_eq!(trusted.forwarded_for(stranger, Some(&value)), None);
    }

    #[test]
    fn forged_tokens_never_verify(token in "\\PC{0,120}", device in "[ -~]{0,40}") {
        let signer = TokenSigner::new("secret-one");
        let now = 1_800_000_000;
        let verdict = signer.verify(Some(&token), "client", &device, now, 3600);
        let bearer = format!("Bearer {token}");
        let with_scheme = signer.verify(Some(&bearer), "client", &device, now, 3600);
        prop_assert!(verdict.is_err() && with_scheme.is_err());
        prop_assert!(signer.verify_vision(Some(&bearer), &device, now).is_err());
    }
}
