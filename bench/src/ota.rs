//! The device's OTA check (spec §14): `POST <ota-url>` with the firmware's headers and a small
//! system-info body; the answer's `websocket{url, token}` says where to connect, and its `mqtt`
//! section (when the server hands out MQTT) the credentials of an MQTT + UDP device.
//!
//! A minimal HTTP/1.1 client over a glommio socket (`Connection: close`, read to the end,
//! `Content-Length` or chunked bodies): one request per device connect does not need a pool.
//! Only `http://` URLs are supported.

use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use serde_json::{json, Value};
use xiaozhi_bench::mqtt_device::MqttCredentials;

use crate::connect::{within, DeviceId};
use crate::outcome::ErrorKind;

/// What the OTA endpoint told the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaAnswer {
    /// `websocket.url`, if present.
    pub websocket_url: Option<String>,
    /// `websocket.token`, if present and non-empty.
    pub token: Option<String>,
    /// `websocket.version` (binary protocol), if present.
    pub version: Option<u8>,
    /// The `mqtt` section, if present and complete.
    pub mqtt: Option<MqttCredentials>,
}

/// An `http://host[:port]/path` URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host name or IP.
    pub host: String,
    /// Port (80 if absent).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

/// Splits an `http://` (or, with `scheme = "ws"`, a `ws://`) URL.
pub fn split_url(url: &str, scheme: &str) -> Result<HttpUrl, String> {
    let rest = url
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(|| format!("{url}: only {scheme}:// URLs are supported"))?;
    let (authority, target) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_owned()),
    };
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (h, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{url}: unclosed IPv6 address"))?;
            (h, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("{url}: bad port \"{p}\""))?,
        None => 80,
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok(HttpUrl {
        host: host.to_owned(),
        port,
        target,
    })
}

/// Performs the OTA request for `id`.
pub async fn check(
    url: &str,
    id: &DeviceId,
    timeout: Duration,
) -> Result<OtaAnswer, (ErrorKind, String)> {
    let fail = |e: String| (ErrorKind::ConnectFailed, format!("ota: {e}"));
    let u = split_url(url, "http").map_err(fail)?;
    let body = json!({
        "version": 2,
        "language": "en-US",
        "flash_size": 16_777_216,
        "minimum_free_heap_size": "8318916",
        "mac_address": id.mac,
        "uuid": id.client_id,
        "chip_model_name": "esp32s3",
        "application": {"name": "xiaozhi", "version": "1.9.0", "idf_version": "v5.4"},
        "board": {"type": "xiaozhi-bench", "name": "xiaozhi-bench", "mac": id.mac},
    })
    .to_string();
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nActivation-Version: 1\r\nDevice-Id: {}\r\nClient-Id: {}\r\n\
         User-Agent: xiaozhi-bench/{}\r\nAccept-Language: en-US\r\n\r\n{body}",
        u.target,
        u.host,
        u.port,
        body.len(),
        id.mac,
        id.client_id,
        env!("CARGO_PKG_VERSION"),
    );
    let exchange = async {
        let mut s = glommio::net::TcpStream::connect((u.host.as_str(), u.port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(raw)
    };
    let raw = within(timeout, exchange)
        .await
        .ok_or_else(|| fail(format!("no answer within {timeout:?}")))?
        .map_err(fail)?;
    let (status, body) = parse_response(&raw).map_err(fail)?;
    if status == 503 {
        return Err((ErrorKind::Refused, "ota: 503 Service Unavailable".into()));
    }
    if status != 200 {
        return Err(fail(format!("HTTP {status}")));
    }
    parse_answer(&body).map_err(fail)
}

/// Status and body of a complete HTTP/1.1 response (`Content-Length`, chunked, or to EOF).
pub fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("truncated response head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {}", head.lines().next().unwrap_or("")))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(body)?
    } else if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.get(..n)
            .ok_or("body shorter than Content-Length")?
            .to_owned()
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or("truncated chunk")?;
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size \"{size}\""))?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).ok_or("truncated chunk")?);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
}

/// Reads `websocket{url, token, version}` from the OTA JSON.
pub fn parse_answer(body: &str) -> Result<OtaAnswer, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let ws = v.get("websocket");
    let field = |name: &str| {
        ws.and_then(|w| w.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let version = ws.and_then(|w| w.get("version")).and_then(|v| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .and_then(|n| u8::try_from(n).ok())
    });
    let mqtt = v
        .get("mqtt")
        .and_then(|m| serde_json::from_value(m.clone()).ok());
    Ok(OtaAnswer {
        websocket_url: field("url"),
        token: field("token"),
        version,
        mqtt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_target() {
        assert_eq!(
            split_url("http://127.0.0.1:8003/xiaozhi/ota/", "http"),
            Ok(HttpUrl {
                host: "127.0.0.1".into(),
                port: 8003,
                target: "/xiaozhi/ota/".into()
            })
        );
        assert_eq!(
            split_url("ws://example.com?device-id=x", "ws"),
            Ok(HttpUrl {
                host: "example.com".into(),
                port: 80,
                target: "/?device-id=x".into()
            })
        );
        assert!(split_url("https://x/", "http").is_err());
        assert!(split_url("http://:80/", "http").is_err());
    }

    #[test]
    fn responses_with_length_chunks_or_eof_parse() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra";
        assert_eq!(parse_response(r), Ok((200, "{}".into())));
        let r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(r), Ok((200, "{\"a\":1}".into())));
        let r = b"HTTP/1.1 503 Service Unavailable\r\n\r\nfull";
        assert_eq!(parse_response(r), Ok((503, "full".into())));
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }

    #[test]
    fn answer_reads_the_websocket_section() {
        let a = parse_answer(
            r#"{"server_time":{"timestamp":1},"websocket":{"url":"ws://h:8000/xiaozhi/v1/","token":"abc.123","version":3}}"#,
        )
        .unwrap();
        assert_eq!(
            a,
            OtaAnswer {
                websocket_url: Some("ws://h:8000/xiaozhi/v1/".into()),
                token: Some("abc.123".into()),
                version: Some(3),
                mqtt: None,
            }
        );
        let a = parse_answer(r#"{"websocket":{"url":"ws://h/","token":""}}"#).unwrap();
        assert_eq!(a.token, None);
        assert!(parse_answer("<html>").is_err());
        let a = parse_answer(
            r#"{"mqtt":{"endpoint":"h:1883","client_id":"GID_b@@@02_00@@@u","username":"e30=","password":"p","keepalive":240,"publish_topic":"device-server","subscribe_topic":"null"}}"#,
        )
        .unwrap();
        let mqtt = a.mqtt.expect("mqtt section");
        assert_eq!((mqtt.endpoint.as_str(), mqtt.keepalive), ("h:1883", 240));
    }
}
