//! A connection's first request head on the HTTP port, read before the connection takes a
//! place in its shard's budget (see [`super::admission`]).
//!
//! Reading it first is what lets the port tell an idle socket (it never completes a head, is
//! closed at `server.http.head_timeout_ms`, and never held a place) from a client, and answer
//! a balancer's health probe even when every place is taken. The bytes read are handed on
//! whole (head and whatever followed) to the HTTP server, which parses the request again.

use futures_lite::{AsyncRead, AsyncReadExt};

/// Largest first head read (hyper's own buffer limit on this port is the same).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines parsed in a first head (hyper's default is 100).
const MAX_HEADERS: usize = 100;

/// What `/readyz` says of a shard: starting until every shard of the process listens (so a
/// balancer's health check does not pass while the kernel can spread devices over only some of
/// the shards), ready, then draining from the first drain step on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Not every shard has bound its ports yet.
    Starting,
    /// Takes new devices.
    Ready,
    /// Draining: the balancer should take the instance out of rotation.
    Draining,
}

/// A health or readiness probe, answered even when the shard has no place free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `GET /healthz`: the process is up.
    Health,
    /// `GET /readyz`: the instance takes new devices (false while draining).
    Ready,
}

impl Probe {
    /// The probe a request for `method` `target` is (query and trailing `/` ignored), if any.
    pub fn of(method: &str, target: &str) -> Option<Probe> {
        if method != "GET" {
            return None;
        }
        let path = target.split(['?', '#']).next().unwrap_or("");
        match path.trim_end_matches('/') {
            "/healthz" => Some(Probe::Health),
            "/readyz" => Some(Probe::Ready),
            _ => None,
        }
    }

    /// The status and body of this probe's answer when the shard is `ready`.
    pub fn answer(self, ready: Readiness) -> (u16, &'static str) {
        match (self, ready) {
            (Probe::Health, _) => (200, "ok\n"),
            (Probe::Ready, Readiness::Ready) => (200, "ready\n"),
            (Probe::Ready, Readiness::Starting) => (503, "starting\n"),
            (Probe::Ready, Readiness::Draining) => (503, "draining\n"),
        }
    }
}

/// What the bytes read so far make of a first head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadStatus {
    /// Not complete yet.
    Partial,
    /// A complete head; `probe` when it is a health or readiness probe.
    Complete {
        /// The probe it is, if any.
        probe: Option<Probe>,
    },
    /// Not an HTTP/1.x request head (400).
    Invalid,
    /// Over [`MAX_HEAD_BYTES`] without being complete (431).
    TooLarge,
}

/// Parses the first head in `buf` (pure; called again as bytes arrive).
pub fn parse(buf: &[u8]) -> HeadStatus {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => HeadStatus::Complete {
            probe: Probe::of(req.method.unwrap_or(""), req.path.unwrap_or("")),
        },
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => HeadStatus::TooLarge,
        Ok(httparse::Status::Partial) => HeadStatus::Partial,
        Err(httparse::Error::TooManyHeaders) => HeadStatus::TooLarge,
        Err(_) => HeadStatus::Invalid,
    }
}

/// How reading a first head ended.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstHead {
    /// A complete head: every byte read (head and what followed) and the probe it is.
    Complete {
        /// The bytes read, from the request's first byte.
        bytes: Vec<u8>,
        /// The probe it is, if any.
        probe: Option<Probe>,
    },
    /// The client closed (or the socket failed) before a complete head.
    Closed,
    /// Not an HTTP/1.x request head.
    Invalid,
    /// Too large.
    TooLarge,
}

/// Reads from `stream` (after the bytes `already` read past a PROXY header) until a complete
/// head, a close, or a bad head. The caller bounds the time.
pub async fn read_first_head<S: AsyncRead + Unpin>(stream: &mut S, already: Vec<u8>) -> FirstHead {
    let mut bytes = already;
    let mut chunk = [0u8; 2048];
    loop {
        if !bytes.is_empty() {
            match parse(&bytes) {
                HeadStatus::Partial => {}
                HeadStatus::Complete { probe } => return FirstHead::Complete { bytes, probe },
                HeadStatus::Invalid => return FirstHead::Invalid,
                HeadStatus::TooLarge => return FirstHead::TooLarge,
            }
        }
        let room = (MAX_HEAD_BYTES - bytes.len().min(MAX_HEAD_BYTES)).clamp(1, chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return FirstHead::Closed,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn probes_are_get_health_and_ready_with_or_without_slash_or_query() {
        assert_eq!(Probe::of("GET", "/healthz"), Some(Probe::Health));
        assert_eq!(Probe::of("GET", "/healthz/?x=1"), Some(Probe::Health));
        assert_eq!(Probe::of("GET", "/readyz"), Some(Probe::Ready));
        assert_eq!(Probe::of("POST", "/healthz"), None);
        assert_eq!(Probe::of("GET", "/healthzz"), None);
        assert_eq!(Probe::of("GET", "/metrics"), None);
        assert_eq!(
            Probe::Ready.answer(Readiness::Draining),
            (503, "draining\n")
        );
        assert_eq!(
            Probe::Ready.answer(Readiness::Starting),
            (503, "starting\n")
        );
        assert_eq!(Probe::Ready.answer(Readiness::Ready), (200, "ready\n"));
        assert_eq!(Probe::Health.answer(Readiness::Starting), (200, "ok\n"));
    }

    #[test]
    fn a_head_is_complete_only_at_its_blank_line() {
        let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 1..head.len() {
            assert_eq!(parse(&head[..cut]), HeadStatus::Partial, "cut at {cut}");
        }
        assert_eq!(
            parse(head),
            HeadStatus::Complete {
                probe: Some(Probe::Health)
            }
        );
        assert_eq!(
            parse(b"POST /xiaozhi/ota/ HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
            HeadStatus::Complete { probe: None }
        );
    }

    #[test]
    fn garbage_and_oversized_heads_are_refused() {
        assert_eq!(
            parse(b"PROXY TCP4 6.6.6.6 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\n\r\n"),
            HeadStatus::Invalid
        );
        assert_eq!(parse(b"\x16\x03\x01\x02\x00"), HeadStatus::Invalid);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD_BYTES, b'a');
        assert_eq!(parse(&long), HeadStatus::TooLarge);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many), HeadStatus::TooLarge);
    }

    #[test]
    fn reading_keeps_every_byte_after_the_head_and_stops_at_the_limit() {
        let wire = b"POST /xiaozhi/ota/ HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec();
        let mut r = futures_lite::io::Cursor::new(wire[4..].to_vec());
        let got = block_on(read_first_head(&mut r, wire[..4].to_vec()));
        assert_eq!(
            got,
            FirstHead::Complete {
                bytes: wire,
                probe: None
            }
        );
        let mut closed = futures_lite::io::Cursor::new(b"GET / HT".to_vec());
        assert_eq!(
            block_on(read_first_head(&mut closed, Vec::new())),
            FirstHead::Closed
        );
        let mut endless = futures_lite::io::repeat(b'a');
        assert_eq!(
            block_on(read_first_head(
                &mut endless,
                b"GET / HTTP/1.1\r\nX: ".to_vec()
            )),
            FirstHead::TooLarge
        );
    }
}
