//! Reading and answering the HTTP/1.1 request head on the WebSocket port.
//!
//! Parsing the head ourselves (with `httparse`) instead of letting tungstenite do the
//! handshake lets one port answer a plain `GET` with 200 like the reference, refuse with a
//! proper HTTP status before upgrading (full shard, draining), and read identity from headers
//! or the query string; the upgraded socket then goes to tungstenite.

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::front_door::proxy;

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Request method, e.g. "GET".
    pub method: String,
    /// Request target: path and query.
    pub target: String,
    /// Header (name, value) pairs as sent.
    pub headers: Vec<(String, String)>,
    /// Bytes read past the end of the head (the start of the WebSocket stream, if any).
    pub leftover: Vec<u8>,
}

impl RequestHead {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, joined with commas in order (repeated headers are one list,
    /// RFC 9110 §5.3: a balancer may add its own `X-Forwarded-For` line after the client's).
    pub fn header_list(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// True when the client asks for a WebSocket upgrade.
    pub fn is_websocket_upgrade(&self) -> bool {
        let upgrade = self
            .header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let connection = self.header("connection").is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
        upgrade && connection && self.method == "GET"
    }
}

/// Why a request head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The peer closed before sending a full head.
    #[error("connection closed before the request head was complete")]
    Closed,
    /// The head exceeds the configured limit.
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    /// Not HTTP/1.x.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// A trusted balancer's connection without a valid PROXY header.
    #[error("{0}")]
    Proxy(proxy::ProxyError),
    /// Socket error.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<proxy::ReadError> for HeadError {
    fn from(e: proxy::ReadError) -> Self {
        match e {
            proxy::ReadError::Closed => HeadError::Closed,
            proxy::ReadError::Invalid(e) => HeadError::Proxy(e),
            proxy::ReadError::Io(e) => HeadError::Io(e),
        }
    }
}

/// Reads one request head of at most `limit` bytes.
pub async fn read_head<S: futures_lite::AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
) -> Result<RequestHead, HeadError> {
    read_head_after(stream, limit, Vec::new()).await
}

/// Reads one request head whose first bytes (`already`, e.g. read past a PROXY header) are
/// already in hand.
pub async fn read_head_after<S: futures_lite::AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
    already: Vec<u8>,
) -> Result<RequestHead, HeadError> {
    let mut buf = already;
    buf.reserve(1024);
    let mut chunk = [0u8; 1024];
    let mut first = !buf.is_empty();
    loop {
        if !first {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(HeadError::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        first = false;
        let mut headers = [httparse::EMPTY_HEADER; 48];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let head = RequestHead {
                    method: req.method.unwrap_or("").to_string(),
                    target: req.path.unwrap_or("/").to_string(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).trim().to_string(),
                            )
                        })
                        .collect(),
                    leftover: buf[len..].to_vec(),
                };
                return Ok(head);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() >= limit {
                    return Err(HeadError::TooLarge(limit));
                }
            }
            Err(e) => return Err(HeadError::Malformed(e.to_string())),
        }
    }
}

/// Writes the `101 Switching Protocols` answer for a request carrying `Sec-WebSocket-Key`.
pub async fn write_upgrade<S: futures_lite::AsyncWrite + Unpin>(
    stream: &mut S,
    key: &str,
) -> std::io::Result<()> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn head_with_upgrade_headers_is_recognised_and_leftover_kept() {
        let raw = b"GET /xiaozhi/v1/?device-id=aa HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nEXTRA";
        let mut r = futures_lite::io::Cursor::new(raw.to_vec());
        let head = block_on(read_head(&mut r, 8192)).unwrap();
        assert!(head.is_websocket_upgrade());
        assert_eq!(head.target, "/xiaozhi/v1/?device-id=aa");
        assert_eq!(
            head.header("sec-websocket-key"),
            Some("dGhlIHNhbXBsZSBub25jZQ==")
        );
        assert_eq!(head.leftover, b"EXTRA");
    }

    #[test]
    fn repeated_headers_join_in_order() {
        let raw = b"GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\nHost: x\r\nx-forwarded-for: 10.0.0.1\r\n\r\n";
        let mut r = futures_lite::io::Cursor::new(raw.to_vec());
        let head = block_on(read_head(&mut r, 8192)).unwrap();
        assert_eq!(
            head.header_list("X-Forwarded-For").as_deref(),
            Some("6.6.6.6, 10.0.0.1")
        );
        assert_eq!(head.header_list("x-real-ip"), None);
    }

    #[test]
    fn plain_get_is_not_an_upgrade() {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut r = futures_lite::io::Cursor::new(raw.to_vec());
        let head = block_on(read_head(&mut r, 8192)).unwrap();
        assert!(!head.is_websocket_upgrade());
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 5000));
        let mut r = futures_lite::io::Cursor::new(raw);
        assert!(matches!(
            block_on(read_head(&mut r, 2048)),
            Err(HeadError::TooLarge(2048))
        ));
    }

    #[test]
    fn proxy_header_then_head_from_the_leftover() {
        let raw =
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8000\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\nWS";
        let mut r = futures_lite::io::Cursor::new(raw.to_vec());
        let (h, rest) = block_on(proxy::read_header(&mut r, proxy::Accept::Any)).unwrap();
        assert_eq!(h.source, Some("203.0.113.7:51000".parse().unwrap()));
        let head = block_on(read_head_after(&mut r, 8192, rest)).unwrap();
        assert_eq!(head.target, "/x");
        assert_eq!(head.leftover, b"WS");
        let mut plain = futures_lite::io::Cursor::new(b"GET / HTTP/1.1\r\n\r\n".to_vec());
        assert!(matches!(
            block_on(proxy::read_header(&mut plain, proxy::Accept::Any)),
            Err(proxy::ReadError::Invalid(_))
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        let mut r = futures_lite::io::Cursor::new(b"\x16\x03\x01garbage\r\n\r\n".to_vec());
        assert!(matches!(
            block_on(read_head(&mut r, 2048)),
            Err(HeadError::Malformed(_))
        ));
    }
}
