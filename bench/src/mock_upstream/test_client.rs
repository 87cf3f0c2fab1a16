//! A raw HTTP/1.1 test client for the mock's unit tests: it records when each chunk of a chunked
//! body arrives, so tests can check SSE timing, and keeps one connection for keep-alive checks.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::find;
use super::MockSettings;

/// A response read by the raw test client.
pub(super) struct Response {
    pub(super) status: u16,
    headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    /// For chunked bodies: each chunk with the time it arrived.
    pub(super) chunks: Vec<(Instant, Vec<u8>)>,
}

impl Response {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// The JSON `data:` events of an SSE body, and whether `[DONE]` ended it.
    pub(super) fn events(&self) -> (Vec<Value>, bool) {
        let text = String::from_utf8(self.body.clone()).expect("UTF-8 SSE");
        let mut events = Vec::new();
        let mut done = false;
        for block in text.split("\n\n").filter(|b| !b.is_empty()) {
            let data = block.strip_prefix("data: ").expect("data line");
            if data == "[DONE]" {
                done = true;
            } else {
                events.push(serde_json::from_str(data).expect("JSON event"));
            }
        }
        (events, done)
    }
}

/// A keep-alive HTTP/1.1 client over one raw socket.
pub(super) struct Client {
    pub(super) stream: TcpStream,
    pending: Vec<u8>,
}

impl Client {
    pub(super) fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self {
            stream,
            pending: Vec::new(),
        }
    }

    pub(super) fn send(&mut self, method: &str, path: &str, content_type: &str, body: &[u8]) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: mock\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        self.stream.write_all(head.as_bytes()).expect("write head");
        self.stream.write_all(body).expect("write body");
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        let n = self.stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pending.extend_from_slice(&buf[..n]);
        Ok(())
    }

    fn take_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = find(&self.pending, b"\r\n") {
                let line = String::from_utf8_lossy(&self.pending[..end]).into_owned();
                self.pending.drain(..end + 2);
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.pending.len() < n {
            self.fill()?;
        }
        Ok(self.pending.drain(..n).collect())
    }

    pub(super) fn receive(&mut self) -> io::Result<Response> {
        let status_line = self.take_line()?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let mut headers = Vec::new();
        loop {
            let line = self.take_line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("header");
            headers.push((name.to_string(), value.trim().to_string()));
        }
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
            chunks: Vec::new(),
        };
        if response.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.take_line()?, 16).expect("size");
                let chunk = self.take(size + 2)?;
                if size == 0 {
                    break;
                }
                response.body.extend_from_slice(&chunk[..size]);
                response
                    .chunks
                    .push((Instant::now(), chunk[..size].to_vec()));
            }
        } else {
            let len = response
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            response.body = self.take(len)?;
        }
        Ok(response)
    }

    pub(super) fn request(&mut self, method: &str, path: &str, body: &Value) -> Response {
        self.send(
            method,
            path,
            "application/json",
            body.to_string().as_bytes(),
        );
        self.receive().expect("response")
    }
}

/// The default settings with delays short enough for tests that do not measure timing.
pub(super) fn fast() -> MockSettings {
    MockSettings {
        llm_first_token: Duration::from_millis(5),
        llm_token: Duration::from_millis(1),
        asr_delay: Duration::ZERO,
        tts_delay: Duration::ZERO,
        ..MockSettings::default()
    }
}

/// A chat request: a system prompt and the user's question.
pub(super) fn chat_body(stream: bool) -> Value {
    json!({"model": "m", "stream": stream, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the weather"}]})
}
