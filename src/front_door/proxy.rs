//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that a load balancer puts in
//! front of a TCP stream to say who the client really is.
//!
//! Pure and bounded: [`parse`] looks at the bytes read so far and says "need more", "here is
//! the header and its length", or "not a valid header". A v1 header is at most 107 bytes; a v2
//! header at most [`MAX_V2_LEN`] (addresses plus TLVs, which are skipped). Only trusted peers'
//! headers are parsed (the caller decides), so an untrusted client cannot spoof its address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures_lite::AsyncReadExt;

/// The 12-byte signature that starts a v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header including CRLF (spec: 107).
pub const MAX_V1_LEN: usize = 107;
/// Longest v2 header accepted (16-byte fixed part + addresses + TLVs).
pub const MAX_V2_LEN: usize = 16 + 1024;

/// Which versions a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Only the text form.
    V1,
    /// Only the binary form.
    V2,
    /// Either.
    Any,
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    /// The client's address; `None` for `UNKNOWN` / `LOCAL` (health checks): use the peer's.
    pub source: Option<SocketAddr>,
}

/// Why the bytes are not an acceptable header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Neither signature (or not the accepted version).
    #[error("no PROXY protocol header (expected {0})")]
    Missing(&'static str),
    /// A v1 line that does not follow the grammar.
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
    /// A v2 header with a bad version, command, family or length.
    #[error("malformed PROXY v2 header: {0}")]
    BadV2(&'static str),
}

/// The outcome of looking at the first bytes of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet to decide.
    Incomplete,
    /// A header of `len` bytes.
    Header(ProxyHeader, usize),
}

fn expected(accept: Accept) -> &'static str {
    match accept {
        Accept::V1 => "v1",
        Accept::V2 => "v2",
        Accept::Any => "v1 or v2",
    }
}

/// Parses a header at the start of `buf`.
pub fn parse(buf: &[u8], accept: Accept) -> Result<Parsed, ProxyError> {
    let v1 = b"PROXY ";
    let n = buf.len();
    let could_be_v1 = accept != Accept::V2 && v1[..n.min(6)] == buf[..n.min(6)];
    let could_be_v2 = accept != Accept::V1 && V2_SIGNATURE[..n.min(12)] == buf[..n.min(12)];
    if could_be_v1 {
        if n < 6 {
            return Ok(Parsed::Incomplete);
        }
        return parse_v1(buf);
    }
    if could_be_v2 {
        if n < 16 {
            return Ok(Parsed::Incomplete);
        }
        return parse_v2(buf);
    }
    Err(ProxyError::Missing(expected(accept)))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(MAX_V1_LEN)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1_LEN {
            Err(ProxyError::BadV1("no CRLF within 107 bytes"))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| ProxyError::BadV1("not ASCII"))?;
    let mut parts = line.split(' ');
    let family = parts.next().unwrap_or("");
    if family == "UNKNOWN" {
        return Ok(Parsed::Header(
            ProxyHeader {
                version: 1,
                source: None,
            },
            end + 2,
        ));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields[..] else {
        return Err(ProxyError::BadV1("expected 4 fields after the family"));
    };
    let ip: IpAddr = match family {
        "TCP4" => src
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| ProxyError::BadV1("bad IPv4 source"))?,
        "TCP6" => src
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| ProxyError::BadV1("bad IPv6 source"))?,
        _ => return Err(ProxyError::BadV1("family must be TCP4, TCP6 or UNKNOWN")),
    };
    let port: u16 = sport
        .parse()
        .map_err(|_| ProxyError::BadV1("bad source port"))?;
    Ok(Parsed::Header(
        ProxyHeader {
            version: 1,
            source: Some(SocketAddr::new(ip, port)),
        },
        end + 2,
    ))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2("version is not 2"));
    }
    let command = ver_cmd & 0x0f;
    if command > 1 {
        return Err(ProxyError::BadV2("command is neither LOCAL nor PROXY"));
    }
    let family = buf[13];
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let total = 16 + len;
    if total > MAX_V2_LEN {
        return Err(ProxyError::BadV2("longer than the accepted maximum"));
    }
    if buf.len() < total {
        return Ok(Parsed::Incomplete);
    }
    let body = &buf[16..total];
    let source = if command == 0 {
        None // LOCAL: the balancer's own connection (a health check).
    } else {
        match family {
            0x11 | 0x12 => {
                if body.len() < 12 {
                    return Err(ProxyError::BadV2("IPv4 addresses truncated"));
                }
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                let port = u16::from_be_bytes([body[8], body[9]]);
                Some(SocketAddr::new(IpAddr::V4(ip), port))
            }
            0x21 | 0x22 => {
                if body.len() < 36 {
                    return Err(ProxyError::BadV2("IPv6 addresses truncated"));
                }
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[..16]);
                let port = u16::from_be_bytes([body[32], body[33]]);
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
            }
            // UNSPEC or UNIX sockets: no IP to report.
            _ => None,
        }
    };
    Ok(Parsed::Header(ProxyHeader { version: 2, source }, total))
}

/// Why no header could be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed before a whole header arrived.
    #[error("connection closed before the PROXY header was complete")]
    Closed,
    /// The bytes are not an acceptable header.
    #[error("{0}")]
    Invalid(#[from] ProxyError),
    /// Socket error.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a header from the start of `stream` (at most [`MAX_V2_LEN`] bytes are buffered);
/// returns it and the bytes read past it (the start of the HTTP request).
pub async fn read_header<S: futures_lite::AsyncRead + Unpin>(
    stream: &mut S,
    accept: Accept,
) -> Result<(ProxyHeader, Vec<u8>), ReadError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse(&buf, accept)? {
            // `parse` refuses a header longer than MAX_V2_LEN, so this only guards the bound.
            Parsed::Incomplete if buf.len() > MAX_V2_LEN => {
                return Err(ProxyError::BadV2("longer than the accepted maximum").into())
            }
            Parsed::Incomplete => {}
            Parsed::Header(h, len) => return Ok((h, buf.split_off(len))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | command);
        b.push(family);
        b.extend_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn v1_tcp4_gives_source_and_length() {
        let raw = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8000\r\nGET / HTTP/1.1\r\n";
        let Ok(Parsed::Header(h, len)) = parse(raw, Accept::Any) else {
            panic!("not parsed")
        };
        assert_eq!(h.source, Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(h.version, 1);
        assert_eq!(&raw[len..len + 3], b"GET");
    }

    #[test]
    fn v1_tcp6_and_unknown() {
        let raw = b"PROXY TCP6 2001:db8::1 ::1 4000 8000\r\n";
        let Ok(Parsed::Header(h, _)) = parse(raw, Accept::V1) else {
            panic!()
        };
        assert_eq!(h.source, Some("[2001:db8::1]:4000".parse().unwrap()));
        let Ok(Parsed::Header(h, len)) = parse(b"PROXY UNKNOWN\r\n", Accept::V1) else {
            panic!()
        };
        assert_eq!((h.source, len), (None, 15));
    }

    #[test]
    fn v1_partial_is_incomplete_and_garbage_is_refused() {
        assert_eq!(parse(b"PRO", Accept::Any), Ok(Parsed::Incomplete));
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4", Accept::Any),
            Ok(Parsed::Incomplete)
        );
        assert!(parse(b"PROXY TCP4 1.2.3.999 1.1.1.1 1 2\r\n", Accept::Any).is_err());
        assert!(parse(b"PROXY TCP5 1.2.3.4 1.1.1.1 1 2\r\n", Accept::Any).is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 1.1.1.1 99999 2\r\n", Accept::Any).is_err());
        let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
        assert!(parse(&long, Accept::Any).is_err());
    }

    #[test]
    fn v2_ipv4_ipv6_local_and_tlvs() {
        let mut body = vec![198, 51, 100, 9, 10, 0, 0, 1];
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&8000u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xff]); // a NOOP TLV, skipped
        let raw = [v2(1, 0x11, &body), b"GET".to_vec()].concat();
        let Ok(Parsed::Header(h, len)) = parse(&raw, Accept::V2) else {
            panic!()
        };
        assert_eq!(h.source, Some("198.51.100.9:40000".parse().unwrap()));
        assert_eq!(&raw[len..], b"GET");

        let mut body6 = vec![0u8; 36];
        body6[0] = 0x20;
        body6[1] = 0x01;
        body6[15] = 5;
        body6[32..34].copy_from_slice(&7u16.to_be_bytes());
        let Ok(Parsed::Header(h, _)) = parse(&v2(1, 0x21, &body6), Accept::Any) else {
            panic!()
        };
        assert_eq!(h.source, Some("[2001::5]:7".parse().unwrap()));

        let Ok(Parsed::Header(h, len)) = parse(&v2(0, 0x00, &[]), Accept::Any) else {
            panic!()
        };
        assert_eq!((h.source, len), (None, 16));
    }

    #[test]
    fn v2_bad_or_partial() {
        let raw = v2(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(parse(&raw[..20], Accept::Any), Ok(Parsed::Incomplete));
        assert_eq!(parse(&raw[..5], Accept::Any), Ok(Parsed::Incomplete));
        let mut bad = raw.clone();
        bad[12] = 0x11;
        assert!(parse(&bad, Accept::Any).is_err());
        assert!(parse(&v2(1, 0x11, &[1, 2, 3]), Accept::Any).is_err());
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(parse(&huge, Accept::Any).is_err());
    }

    #[test]
    fn wrong_version_or_plain_http_is_missing() {
        let v1 = b"PROXY TCP4 1.2.3.4 1.1.1.1 1 2\r\n";
        assert!(matches!(parse(v1, Accept::V2), Err(ProxyError::Missing(_))));
        assert!(matches!(
            parse(&v2(0, 0, &[]), Accept::V1),
            Err(ProxyError::Missing(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n", Accept::Any),
            Err(ProxyError::Missing(_))
        ));
    }
}
