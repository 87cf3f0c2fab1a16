//! The mock's HTTP/1.1 plumbing: the accept loop (one thread per connection), reading requests
//! (heads with `httparse`, `Content-Length` and chunked bodies, `Expect: 100-continue`), the
//! per-connection loop with keep-alive, and writing responses, error bodies and SSE events as
//! HTTP chunks. Why it is written by hand on std threads: see the parent module.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{lock, route, Shared};

/// Largest request head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Stack of each connection thread: they only parse, format and sleep.
const CONNECTION_STACK_BYTES: usize = 256 * 1024;

/// Accepts connections until the mock stops, one thread per connection.
pub(super) fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if shared.stop.is_stopped() {
            return;
        }
        let Ok(stream) = stream else {
            // EMFILE and friends: back off instead of spinning.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        next_id += 1;
        let id = next_id;
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .open_connections
            .fetch_add(1, Ordering::Relaxed);
        lock(&shared.open).insert(id, registered);
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("mock-upstream-conn-{id}"))
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || {
                serve_connection(stream, &conn_shared);
                lock(&conn_shared.open).remove(&id);
                conn_shared
                    .counters
                    .open_connections
                    .fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            lock(&shared.open).remove(&id);
            shared
                .counters
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One parsed HTTP request.
pub(super) struct Request {
    pub(super) method: String,
    /// Path without the query string.
    pub(super) path: String,
    /// Header names lowercased.
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    pub(super) keep_alive: bool,
    /// When the body was fully read: every delay counts from here.
    pub(super) received: Instant,
}

impl Request {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A connection's socket with the bytes read but not yet parsed.
struct Connection {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Connection {
    /// Reads more bytes; `Ok(0)` at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.pending.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next request, `None` when the client closed the connection between requests.
    fn read_request(&mut self) -> io::Result<Option<Request>> {
        let (method, path, version, headers) = loop {
            if !self.pending.is_empty() {
                let mut slots = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut slots);
                match req.parse(&self.pending) {
                    Ok(httparse::Status::Complete(len)) => {
                        let head = (
                            req.method.unwrap_or("").to_string(),
                            req.path.unwrap_or("/").to_string(),
                            req.version.unwrap_or(1),
                            req.headers
                                .iter()
                                .map(|h| {
                                    let value = String::from_utf8_lossy(h.value).trim().to_string();
                                    (h.name.to_ascii_lowercase(), value)
                                })
                                .collect::<Vec<_>>(),
                        );
                        self.pending.drain(..len);
                        break head;
                    }
                    Ok(httparse::Status::Partial) if self.pending.len() <= MAX_HEAD_BYTES => {}
                    Ok(httparse::Status::Partial) => return Err(invalid("request head too large")),
                    Err(e) => return Err(invalid(&format!("bad request head: {e}"))),
                }
            }
            if self.fill()? == 0 {
                return if self.pending.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let connection = header("connection").unwrap_or_default();
        let keep_alive = if version == 0 {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        if header("expect").is_some_and(|v| v.contains("100-continue")) {
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            self.read_chunked_body()?
        } else {
            let len = match header("content-length") {
                Some(v) => v
                    .parse::<usize>()
                    .map_err(|_| invalid("bad content-length"))?,
                None => 0,
            };
            self.read_exact_body(len)?
        };
        let path = path.split('?').next().unwrap_or("/").to_string();
        Ok(Some(Request {
            method,
            path,
            headers,
            body,
            keep_alive,
            received: Instant::now(),
        }))
    }

    fn read_exact_body(&mut self, len: usize) -> io::Result<Vec<u8>> {
        if len > MAX_BODY_BYTES {
            return Err(invalid("request body too large"));
        }
        while self.pending.len() < len {
            if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.pending.drain(..len).collect())
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = find(&self.pending, b"\r\n") {
                let line = String::from_utf8_lossy(&self.pending[..end]).into_owned();
                self.pending.drain(..end + 2);
                return Ok(line);
            }
            if self.pending.len() > MAX_HEAD_BYTES {
                return Err(invalid("chunk line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    fn read_chunked_body(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size =
                usize::from_str_radix(size_hex, 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > MAX_BODY_BYTES {
                return Err(invalid("request body too large"));
            }
            let chunk = self.read_exact_body(size + 2)?;
            body.extend_from_slice(&chunk[..size]);
        }
    }
}

/// An `InvalidData` error: the client sent something that is not acceptable HTTP.
pub(super) fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

/// Where `needle` first occurs in `haystack`.
pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads and answers requests on one connection until it closes or the mock stops.
pub(super) fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut conn = Connection {
        stream,
        pending: Vec::new(),
    };
    loop {
        let request = match conn.read_request() {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData && !shared.stop.is_stopped() {
                    let _ = write_error(&mut conn.stream, 400, &e.to_string(), false);
                }
                return;
            }
        };
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        let settings = Arc::clone(&lock(&shared.settings));
        if settings.stall {
            shared.stop.wait_forever();
            return;
        }
        let answered = match settings.fail_status {
            Some(status) => write_error(
                &mut conn.stream,
                status,
                "mock upstream failure (fail_status)",
                request.keep_alive,
            ),
            None => route(&mut conn.stream, &request, &settings, shared),
        };
        if answered.is_err() || !request.keep_alive || shared.stop.is_stopped() {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn connection_header(keep_alive: bool) -> &'static str {
    if keep_alive {
        "keep-alive"
    } else {
        "close"
    }
}

/// Writes a complete response with a `Content-Length` body, in one write.
pub(super) fn write_response(
    out: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: {}\r\n\r\n",
        reason(status),
        body.len(),
        connection_header(keep_alive),
    );
    let mut response = Vec::with_capacity(head.len() + body.len());
    response.extend_from_slice(head.as_bytes());
    response.extend_from_slice(body);
    out.write_all(&response)
}

/// Writes `body` as an `application/json` response.
pub(super) fn write_json(
    out: &mut TcpStream,
    status: u16,
    body: &Value,
    keep_alive: bool,
) -> io::Result<()> {
    write_response(
        out,
        status,
        "application/json",
        body.to_string().as_bytes(),
        keep_alive,
    )
}

/// An OpenAI-style error body.
pub(super) fn write_error(
    out: &mut TcpStream,
    status: u16,
    message: &str,
    keep_alive: bool,
) -> io::Result<()> {
    let kind = if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    write_json(out, status, &body, keep_alive)
}

/// Starts a chunked `text/event-stream` response.
pub(super) fn write_sse_head(out: &mut TcpStream, keep_alive: bool) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         Transfer-Encoding: chunked\r\nConnection: {}\r\n\r\n",
        connection_header(keep_alive),
    );
    out.write_all(head.as_bytes())
}

/// Sends one SSE event as one HTTP chunk, in one write.
pub(super) fn write_sse(out: &mut TcpStream, data: &Value) -> io::Result<()> {
    write_sse_raw(out, &data.to_string())
}

/// Sends one SSE event whose data is `data` as is (`[DONE]`).
pub(super) fn write_sse_raw(out: &mut TcpStream, data: &str) -> io::Result<()> {
    let event = format!("data: {data}\n\n");
    let frame = format!("{:x}\r\n{event}\r\n", event.len());
    out.write_all(frame.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::mock_upstream::serve;
    use crate::mock_upstream::test_client::{chat_body, fast, Client};

    #[test]
    fn keep_alive_reuses_one_connection_and_counts_requests() {
        let mock = serve(fast()).expect("serve");
        let mut client = Client::connect(mock.addr());
        for _ in 0..3 {
            let response = client.request("POST", "/v1/chat/completions", &chat_body(true));
            assert_eq!(response.status, 200);
        }
        let response = client.request("GET", "/v1/models", &json!({}));
        assert_eq!(response.json()["data"][0]["id"], "mock");
        let second = Client::connect(mock.addr());
        drop(second);
        let stats = mock.stats();
        assert_eq!(stats.requests, 4);
        assert_eq!(stats.chat_requests, 3);
        // The second connection may still be in the accept queue: wait for it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while mock.stats().connections < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(mock.stats().connections, 2);
    }

    #[test]
    fn connection_close_is_honoured() {
        let mock = serve(fast()).expect("serve");
        let mut client = Client::connect(mock.addr());
        let request = "GET /v1/models HTTP/1.1\r\nHost: mock\r\nConnection: close\r\n\r\n";
        client.stream.write_all(request.as_bytes()).expect("write");
        let response = client.receive().expect("response");
        assert_eq!(response.header("connection"), Some("close"));
        let mut buf = [0u8; 16];
        assert_eq!(client.stream.read(&mut buf).expect("eof"), 0);
    }

    #[test]
    fn chunked_request_bodies_are_read() {
        let mock = serve(fast()).expect("serve");
        let mut client = Client::connect(mock.addr());
        let body = json!({"input": "hi", "response_format": "pcm"}).to_string();
        let (a, b) = body.split_at(10);
        let request = format!(
            "POST /v1/audio/speech HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        client.stream.write_all(request.as_bytes()).expect("write");
        assert_eq!(client.receive().expect("response").status, 200);
    }
}
