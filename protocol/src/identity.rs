//! Who is connecting: device identity from the WebSocket upgrade request (spec §2.1–2.2, §15.5).
//!
//! Firmware sends `Device-Id`, `Client-Id`, `Authorization` and `Protocol-Version` headers.
//! Browsers cannot set headers, so — exactly when the `Device-Id` header is absent — the
//! reference reads `device-id`, `client-id` and `authorization` from the query string instead.
//! [`identify`] applies the same rule to the header pairs and request target the HTTP parser
//! produced, without any I/O. Header names match case-insensitively; query values are
//! URL-decoded (`%XX` and `+` → space, as Python's `parse_qs`). The MQTT gateway marks its
//! connections with `?from=mqtt_gateway`, which selects its audio framing.
//!
//! Choices where the reference is silent or accidental: values are trimmed; an empty value
//! counts as absent (so an empty `Device-Id` header falls back to the query, and an empty
//! `device-id` parameter is missing, as `parse_qs` drops blank values); in the query fallback a
//! `Client-Id`/`Authorization` header still wins over the parameter; a repeated identity header
//! is refused rather than guessed at; `device_id` keeps its case (the reference does not
//! normalise it); an unparseable `Protocol-Version` is treated as absent (the reference ignores
//! the header entirely, so refusing the connection would be a regression). Lengths are capped so
//! a hostile client cannot make the server carry megabyte "ids" around.

/// Longest accepted device id in bytes (a MAC address is 17).
pub const MAX_DEVICE_ID_LEN: usize = 64;
/// Longest accepted `Client-Id` or `Authorization` value in bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// The identity a connection claims (not yet authenticated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The device's id (lower-case MAC from firmware), trimmed, case kept.
    pub device_id: String,
    /// The board UUID, if sent.
    pub client_id: Option<String>,
    /// The raw `Authorization` value (`Bearer …`), if sent.
    pub authorization: Option<String>,
    /// The `Protocol-Version` header, if present and a number 0..=255.
    pub protocol_version: Option<u8>,
    /// The request came from the stock MQTT gateway (`from=mqtt_gateway` in the query).
    pub from_mqtt_gateway: bool,
}

/// Why a connection's identity could not be established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Neither a `Device-Id` header nor a `device-id` query parameter.
    #[error("missing device id: send a Device-Id header or a device-id query parameter")]
    MissingDeviceId,
    /// A value is longer than allowed.
    #[error("{field} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// Which value.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value is not valid UTF-8 (after URL-decoding, for query parameters).
    #[error("{field} is not valid UTF-8")]
    NotUtf8 {
        /// Which value.
        field: &'static str,
    },
    /// An identity header appears more than once.
    #[error("header {name} appears more than once")]
    DuplicateHeader {
        /// The header's canonical name.
        name: &'static str,
    },
}

/// Extracts the claimed identity from request headers and the request target (`/path?query`).
pub fn identify<I, N, V>(headers: I, target: &str) -> Result<DeviceIdentity, IdentityError>
where
    I: IntoIterator<Item = (N, V)>,
    N: AsRef<str>,
    V: AsRef<[u8]>,
{
    let mut found = HeaderValues::default();
    for (name, value) in headers {
        let name = name.as_ref();
        let slot = if name.eq_ignore_ascii_case("device-id") {
            (&mut found.device_id, DEVICE_ID)
        } else if name.eq_ignore_ascii_case("client-id") {
            (&mut found.client_id, CLIENT_ID)
        } else if name.eq_ignore_ascii_case("authorization") {
            (&mut found.authorization, AUTHORIZATION)
        } else if name.eq_ignore_ascii_case("protocol-version") {
            (&mut found.protocol_version, PROTOCOL_VERSION)
        } else {
            continue;
        };
        let (seen, field) = slot;
        if seen.is_some() {
            return Err(IdentityError::DuplicateHeader { name: field.header });
        }
        *seen = Some(field.read_header(value.as_ref())?);
    }

    let query = query_of(target);
    let from_mqtt_gateway = query_pairs(query).any(|(k, v)| k == b"from" && v == b"mqtt_gateway");
    let protocol_version = found
        .protocol_version
        .flatten()
        .and_then(|v| v.parse::<u8>().ok());

    let (device_id, client_id, authorization) = match found.device_id.flatten() {
        Some(device_id) => (
            device_id,
            found.client_id.flatten(),
            found.authorization.flatten(),
        ),
        None => {
            let device_id = DEVICE_ID
                .read_query(query)?
                .ok_or(IdentityError::MissingDeviceId)?;
            let client_id = match found.client_id.flatten() {
                Some(header) => Some(header),
                None => CLIENT_ID.read_query(query)?,
            };
            let authorization = match found.authorization.flatten() {
                Some(header) => Some(header),
                None => AUTHORIZATION.read_query(query)?,
            };
            (device_id, client_id, authorization)
        }
    };
    Ok(DeviceIdentity {
        device_id,
        client_id,
        authorization,
        protocol_version,
        from_mqtt_gateway,
    })
}

/// Each identity header: `None` = not seen, `Some(None)` = seen but empty.
#[derive(Default)]
struct HeaderValues {
    device_id: Option<Option<String>>,
    client_id: Option<Option<String>>,
    authorization: Option<Option<String>>,
    protocol_version: Option<Option<String>>,
}

/// One identity value: its names and length limit.
#[derive(Clone, Copy)]
struct Field {
    header: &'static str,
    param: &'static [u8],
    param_label: &'static str,
    max: usize,
}

const DEVICE_ID: Field = Field {
    header: "Device-Id",
    param: b"device-id",
    param_label: "device-id parameter",
    max: MAX_DEVICE_ID_LEN,
};
const CLIENT_ID: Field = Field {
    header: "Client-Id",
    param: b"client-id",
    param_label: "client-id parameter",
    max: MAX_VALUE_LEN,
};
const AUTHORIZATION: Field = Field {
    header: "Authorization",
    param: b"authorization",
    param_label: "authorization parameter",
    max: MAX_VALUE_LEN,
};
const PROTOCOL_VERSION: Field = Field {
    header: "Protocol-Version",
    param: b"protocol-version",
    param_label: "protocol-version parameter",
    max: MAX_VALUE_LEN,
};

impl Field {
    /// A header value, trimmed and checked; `None` if empty.
    fn read_header(self, raw: &[u8]) -> Result<Option<String>, IdentityError> {
        self.checked(raw.trim_ascii(), self.header)
    }

    /// The first non-empty query parameter of this name, URL-decoded, trimmed and checked.
    fn read_query(self, query: &str) -> Result<Option<String>, IdentityError> {
        for (name, value) in query_pairs(query) {
            if name != self.param {
                continue;
            }
            if let Some(value) = self.checked(value.trim_ascii(), self.param_label)? {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    fn checked(self, value: &[u8], field: &'static str) -> Result<Option<String>, IdentityError> {
        if value.is_empty() {
            return Ok(None);
        }
        if value.len() > self.max {
            return Err(IdentityError::TooLong {
                field,
                len: value.len(),
                max: self.max,
            });
        }
        match std::str::from_utf8(value) {
            Ok(text) => Ok(Some(text.to_owned())),
            Err(_) => Err(IdentityError::NotUtf8 { field }),
        }
    }
}

/// The query part of a request target, without any fragment.
fn query_of(target: &str) -> &str {
    let query = target.split_once('?').map_or("", |(_, query)| query);
    query.split_once('#').map_or(query, |(query, _)| query)
}

/// `name=value` pairs of a query, URL-decoded; pairs without `=` or with an empty value are
/// skipped, as `parse_qs` does by default.
fn query_pairs(query: &str) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
    query.split('&').filter_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        if value.is_empty() {
            return None;
        }
        Some((url_decode(name), url_decode(value)))
    })
}

/// `application/x-www-form-urlencoded` decoding: `+` → space, `%XX` → byte; a `%` not followed
/// by two hex digits is kept literally (as Python's `unquote_plus`).
fn url_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push((hi << 4) | lo);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            other => out.push(other),
        }
        i += 1;
    }
    out
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_HEADERS: [(&str, &str); 0] = [];

    #[test]
    fn firmware_headers_give_full_identity() {
        let headers = [
            ("Host", "example.com:8000"),
            ("Authorization", "Bearer abc.123"),
            ("Protocol-Version", "2"),
            ("Device-Id", "aa:bb:cc:dd:ee:ff"),
            ("Client-Id", "5f0c5e3a-9f3e-4c55-9f0a-1b2c3d4e5f60"),
        ];
        assert_eq!(
            identify(headers, "/xiaozhi/v1/"),
            Ok(DeviceIdentity {
                device_id: "aa:bb:cc:dd:ee:ff".into(),
                client_id: Some("5f0c5e3a-9f3e-4c55-9f0a-1b2c3d4e5f60".into()),
                authorization: Some("Bearer abc.123".into()),
                protocol_version: Some(2),
                from_mqtt_gateway: false,
            })
        );
    }

    #[test]
    fn header_names_match_case_insensitively_and_values_are_trimmed() {
        let headers = [("DEVICE-ID", " AA:BB:CC:DD:EE:FF "), ("client-id", "\tc1 ")];
        let id = identify(headers, "/").unwrap();
        assert_eq!(id.device_id, "AA:BB:CC:DD:EE:FF", "case is kept");
        assert_eq!(id.client_id.as_deref(), Some("c1"));
        assert_eq!(id.authorization, None);
        assert_eq!(id.protocol_version, None);
    }

    #[test]
    fn header_device_id_ignores_query_parameters() {
        let headers = [("device-id", "from-header")];
        let id = identify(headers, "/?device-id=q&client-id=qc&authorization=Bearer+q").unwrap();
        assert_eq!(id.device_id, "from-header");
        assert_eq!(id.client_id, None);
        assert_eq!(id.authorization, None);
    }

    #[test]
    fn query_fallback_decodes_percent_encoded_bearer() {
        let id = identify(
            NO_HEADERS,
            "/xiaozhi/v1/?authorization=Bearer%20xyz.17&device-id=aa%3Abb%3Acc%3Add%3Aee%3Aff&client-id=web+client",
        )
        .unwrap();
        assert_eq!(
            id,
            DeviceIdentity {
                device_id: "aa:bb:cc:dd:ee:ff".into(),
                client_id: Some("web client".into()),
                authorization: Some("Bearer xyz.17".into()),
                protocol_version: None,
                from_mqtt_gateway: false,
            }
        );
    }

    #[test]
    fn query_fallback_keeps_header_client_id_and_authorization() {
        let headers = [("Client-Id", "hc"), ("Authorization", "Bearer h.1")];
        let id = identify(
            headers,
            "/?device-id=d&client-id=qc&authorization=Bearer+q.1",
        )
        .unwrap();
        assert_eq!(id.device_id, "d");
        assert_eq!(id.client_id.as_deref(), Some("hc"));
        assert_eq!(id.authorization.as_deref(), Some("Bearer h.1"));
    }

    #[test]
    fn query_takes_first_non_empty_value_and_skips_blank_or_bare_names() {
        let id = identify(
            NO_HEADERS,
            "/?device-id&device-id=&device-id=first&device-id=second",
        )
        .unwrap();
        assert_eq!(id.device_id, "first");
    }

    #[test]
    fn empty_device_id_header_falls_back_to_query() {
        let id = identify([("Device-Id", "  ")], "/?device-id=q").unwrap();
        assert_eq!(id.device_id, "q");
    }

    #[test]
    fn missing_device_id_everywhere_is_an_error() {
        assert_eq!(
            identify([("Client-Id", "c")], "/xiaozhi/v1/"),
            Err(IdentityError::MissingDeviceId)
        );
        assert_eq!(
            identify(NO_HEADERS, "/?client-id=c&device-id="),
            Err(IdentityError::MissingDeviceId)
        );
    }

    #[test]
    fn mqtt_gateway_is_detected_from_query() {
        let headers = [
            ("device-id", "aa:bb:cc:dd:ee:ff"),
            ("protocol-version", "2"),
        ];
        let id = identify(headers, "/xiaozhi/v1/?from=mqtt_gateway").unwrap();
        assert!(id.from_mqtt_gateway);
        assert_eq!(id.protocol_version, Some(2));
        let id = identify([("device-id", "d")], "/?x=1&from=mqtt_gateway#frag").unwrap();
        assert!(id.from_mqtt_gateway);
        let id = identify([("device-id", "d")], "/?from=browser").unwrap();
        assert!(!id.from_mqtt_gateway);
    }

    #[test]
    fn unparseable_protocol_version_is_absent() {
        for value in ["abc", "256", "-1", ""] {
            let id = identify([("device-id", "d"), ("protocol-version", value)], "/").unwrap();
            assert_eq!(id.protocol_version, None, "{value:?}");
        }
        let id = identify([("device-id", "d"), ("protocol-version", " 3 ")], "/").unwrap();
        assert_eq!(id.protocol_version, Some(3));
    }

    #[test]
    fn device_id_longer_than_64_bytes_is_refused() {
        let ok = "d".repeat(MAX_DEVICE_ID_LEN);
        assert_eq!(
            identify([("device-id", ok.as_str())], "/")
                .unwrap()
                .device_id,
            ok
        );
        let long = "d".repeat(MAX_DEVICE_ID_LEN + 1);
        assert_eq!(
            identify([("device-id", long.as_str())], "/"),
            Err(IdentityError::TooLong {
                field: "Device-Id",
                len: 65,
                max: 64
            })
        );
        assert_eq!(
            identify(NO_HEADERS, &format!("/?device-id={long}")),
            Err(IdentityError::TooLong {
                field: "device-id parameter",
                len: 65,
                max: 64
            })
        );
    }

    #[test]
    fn authorization_longer_than_1024_bytes_is_refused() {
        let long = format!("Bearer {}", "a".repeat(1020));
        assert_eq!(
            identify([("device-id", "d"), ("authorization", long.as_str())], "/"),
            Err(IdentityError::TooLong {
                field: "Authorization",
                len: 1027,
                max: 1024
            })
        );
    }

    #[test]
    fn duplicate_identity_header_is_refused() {
        assert_eq!(
            identify([("Device-Id", "a"), ("device-id", "b")], "/"),
            Err(IdentityError::DuplicateHeader { name: "Device-Id" })
        );
    }

    #[test]
    fn non_utf8_values_are_refused() {
        let headers: [(&str, &[u8]); 1] = [("device-id", b"\xff\xfe")];
        assert_eq!(
            identify(headers, "/"),
            Err(IdentityError::NotUtf8 { field: "Device-Id" })
        );
        assert_eq!(
            identify(NO_HEADERS, "/?device-id=%FF"),
            Err(IdentityError::NotUtf8 {
                field: "device-id parameter"
            })
        );
    }

    #[test]
    fn url_decode_handles_plus_percent_and_broken_escapes() {
        assert_eq!(url_decode("a+b%20c"), b"a b c");
        assert_eq!(url_decode("%e4%BD%A0"), "你".as_bytes());
        assert_eq!(url_decode("100%"), b"100%");
        assert_eq!(url_decode("%zz%4"), b"%zz%4");
        assert_eq!(url_decode("%2B"), b"+");
    }
}
