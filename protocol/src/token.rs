//! Device tokens in the reference server's format (spec §2.4).
//!
//! A token is `base64url_nopad(HMAC-SHA256(key = secret as UTF-8, msg =
//! "<client_id>|<device_id>|<ts>")) + "." + ts`, with `ts` in Unix seconds at issue time. The
//! Python reference (`core/auth.py` `AuthManager`), the Java manager-api and the MQTT gateway
//! all produce it, so a device provisioned by any of them authenticates here, and vice versa.
//!
//! [`TokenSigner`] holds one or more secrets: the first signs, every one verifies, so a secret
//! can be rotated without invalidating tokens already in devices. Verification follows the
//! reference — the `Authorization` value must start with exactly `Bearer `, a token older than
//! `expire_secs` is refused, signatures are compared in constant time — and adds one check of
//! its own: a timestamp more than [`MAX_CLOCK_SKEW_SECS`] in the future is refused as malformed,
//! since no honest issuer produces it and it would otherwise extend the token's life.
//!
//! The same signer also issues **vision tokens** (spec §13): what the server hands a device in
//! MCP `initialize` (`capabilities.vision.token`) for the camera's `POST /mcp/vision/explain`.
//! The device treats it as opaque. It has the same `<signature>.<unix-seconds>` shape, but the
//! seconds are the *expiry* and the HMAC covers `"xiaozhi-vision\0<device_id>\0<expiry>"`: the
//! NUL bytes cannot occur in a `Client-Id` header, so no device token is ever a valid vision
//! token or the other way round. Stateless, so any shard or instance with the secret verifies it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far in the future a token's timestamp may be (issuer clock ahead of ours) before refusal.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// The reference's default token lifetime: 30 days.
pub const DEFAULT_EXPIRE_SECS: u64 = 60 * 60 * 24 * 30;

/// What the Python reference signs in place of a missing `Client-Id` (it formats `None`).
pub const MISSING_CLIENT_ID: &str = "None";

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization` value, or an empty one.
    #[error("missing Authorization")]
    Missing,
    /// Not `Bearer <signature>.<unix-seconds>`, or a timestamp too far in the future.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// Correctly signed but older than the allowed lifetime.
    #[error("token expired {age} s after issue")]
    Expired {
        /// Seconds since the token was issued.
        age: u64,
    },
    /// A genuine vision token past its expiry.
    #[error("token expired {ago} s ago")]
    ExpiredAt {
        /// Seconds since the expiry.
        ago: u64,
    },
    /// No configured secret produced this signature for this client and device.
    #[error("token signature does not match")]
    BadSignature,
}

/// Signs and verifies device tokens with a list of secrets (first signs, all verify).
#[derive(Clone)]
pub struct TokenSigner {
    secrets: Vec<String>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("TokenSigner")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl TokenSigner {
    /// A signer whose `signing_secret` both signs and verifies.
    pub fn new(signing_secret: impl Into<String>) -> Self {
        TokenSigner {
            secrets: vec![signing_secret.into()],
        }
    }

    /// Also accepts tokens signed with `secret` (a retired key during rotation); never signs with it.
    pub fn also_accepting(mut self, secret: impl Into<String>) -> Self {
        self.secrets.push(secret.into());
        self
    }

    /// Issues a token for this client and device, stamped `now_unix`.
    pub fn sign(&self, client_id: &str, device_id: &str, now_unix: u64) -> String {
        token(
            mac(self.signing_secret(), client_id, device_id, now_unix),
            now_unix,
        )
    }

    /// The secret that signs. `secrets` is never empty: `new` puts it first.
    fn signing_secret(&self) -> &str {
        self.secrets.first().map(String::as_str).unwrap_or_default()
    }

    /// Checks an `Authorization` value (`Bearer <token>`) for this client and device.
    ///
    /// Pass the header (or query) value as received; `None` means absent. When the device sent
    /// no `Client-Id`, pass [`MISSING_CLIENT_ID`] to match what the reference signs. The
    /// signature is checked first, so `Expired` is only reported for a genuine token.
    pub fn verify(
        &self,
        authorization: Option<&str>,
        client_id: &str,
        device_id: &str,
        now_unix: u64,
        expire_secs: u64,
    ) -> Result<(), TokenError> {
        let (signature, ts) = parse_bearer(authorization)?;
        let genuine = self.secrets.iter().any(|secret| {
            mac(secret, client_id, device_id, ts)
                .is_some_and(|mac| mac.verify_slice(&signature).is_ok())
        });
        if !genuine {
            return Err(TokenError::BadSignature);
        }
        if ts > now_unix.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(TokenError::Malformed(
                "timestamp is more than 300 s in the future",
            ));
        }
        let age = now_unix.saturating_sub(ts);
        if age > expire_secs {
            return Err(TokenError::Expired { age });
        }
        Ok(())
    }

    /// Issues a vision token for `device_id` that expires at `expires_unix`.
    pub fn sign_vision(&self, device_id: &str, expires_unix: u64) -> String {
        token(
            vision_mac(self.signing_secret(), device_id, expires_unix),
            expires_unix,
        )
    }

    /// Checks an `Authorization` value (`Bearer <vision token>`) for `device_id` at `now_unix`.
    /// The signature is checked first, so `ExpiredAt` is only reported for a genuine token.
    pub fn verify_vision(
        &self,
        authorization: Option<&str>,
        device_id: &str,
        now_unix: u64,
    ) -> Result<(), TokenError> {
        let (signature, expires) = parse_bearer(authorization)?;
        let genuine = self.secrets.iter().any(|secret| {
            vision_mac(secret, device_id, expires)
                .is_some_and(|mac| mac.verify_slice(&signature).is_ok())
        });
        if !genuine {
            return Err(TokenError::BadSignature);
        }
        if now_unix > expires {
            return Err(TokenError::ExpiredAt {
                ago: now_unix - expires,
            });
        }
        Ok(())
    }
}

/// `base64url(mac).ts`. An empty token (fails closed) if the key were refused, which HMAC never
/// does: it takes keys of any length.
fn token(mac: Option<HmacSha256>, ts: u64) -> String {
    let Some(mac) = mac else {
        return String::new();
    };
    let mut token = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    token.push('.');
    token.push_str(&ts.to_string());
    token
}

/// Splits `Bearer <signature>.<unix-seconds>` into the decoded signature and the seconds.
fn parse_bearer(authorization: Option<&str>) -> Result<(Vec<u8>, u64), TokenError> {
    let value = authorization.unwrap_or_default();
    if value.is_empty() {
        return Err(TokenError::Missing);
    }
    let token = value.strip_prefix("Bearer ").ok_or(TokenError::Malformed(
        "Authorization must start with \"Bearer \"",
    ))?;
    let (signature, ts) = token.split_once('.').ok_or(TokenError::Malformed(
        "token must be <signature>.<unix-seconds>",
    ))?;
    let ts = parse_unix_seconds(ts)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed("signature is not unpadded base64url"))?;
    Ok((signature, ts))
}

/// The HMAC of a vision token (see the module docs).
fn vision_mac(secret: &str, device_id: &str, expires: u64) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(b"xiaozhi-vision\0");
    mac.update(device_id.as_bytes());
    mac.update(b"\0");
    mac.update(expires.to_string().as_bytes());
    Some(mac)
}

/// The HMAC over `"<client_id>|<device_id>|<ts>"`, fed piecewise to avoid formatting a string.
/// `None` only if the key were refused, which HMAC never does (it takes keys of any length).
fn mac(secret: &str, client_id: &str, device_id: &str, ts: u64) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(client_id.as_bytes());
    mac.update(b"|");
    mac.update(device_id.as_bytes());
    mac.update(b"|");
    mac.update(ts.to_string().as_bytes());
    Some(mac)
}

/// Decimal digits only. The reference runs Python `int()` and signs the re-formatted number, so
/// leading zeros are accepted and signed without them, exactly as there.
fn parse_unix_seconds(text: &str) -> Result<u64, TokenError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenError::Malformed(
            "timestamp must be decimal unix seconds",
        ));
    }
    text.parse()
        .map_err(|_| TokenError::Malformed("timestamp is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "5f0c5e3a-9f3e-4c55-9f0a-1b2c3d4e5f60";
    const DEVICE: &str = "aa:bb:cc:dd:ee:ff";
    const TS: u64 = 1_767_225_600;
    const SECRET: &str = "xiaozhi-secret-密钥";

    /// Produced by the reference's `AuthManager._sign` / `generate_token` logic in CPython 3.11:
    /// `hmac.new(secret.encode("utf-8"), f"{client_id}|{device_id}|{ts}".encode("utf-8"),
    /// hashlib.sha256).digest()`, then `base64.urlsafe_b64encode(sig).decode().rstrip("=")`.
    const PYTHON_TOKEN: &str = "mZg-R29xTOGbyaoRjWFk42jsDm5lCd4WIdnnw9ZpJss.1767225600";
    /// Same, with `client_id=None` (the reference formats it as `None`).
    const PYTHON_TOKEN_NO_CLIENT: &str = "cvGitjW5F3ZGXW2a9esA9q6-tHNi5T_uMLuW6I_bvO4.1767225600";
    /// Same, with secret `""`, client `c`, device `d`, ts `1`.
    const PYTHON_TOKEN_EMPTY_SECRET: &str = "0AiGnBCRy5uYLK6Rlw-Asjl0hpeB_uOexCrAiczqSfE.1";

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[test]
    fn sign_matches_reference_python() {
        let signer = TokenSigner::new(SECRET);
        assert_eq!(signer.sign(CLIENT, DEVICE, TS), PYTHON_TOKEN);
        assert_eq!(
            signer.sign(MISSING_CLIENT_ID, DEVICE, TS),
            PYTHON_TOKEN_NO_CLIENT
        );
        assert_eq!(
            TokenSigner::new("").sign("c", "d", 1),
            PYTHON_TOKEN_EMPTY_SECRET
        );
    }

    #[test]
    fn token_from_reference_python_verifies() {
        let signer = TokenSigner::new(SECRET);
        let auth = bearer(PYTHON_TOKEN);
        assert_eq!(
            signer.verify(Some(&auth), CLIENT, DEVICE, TS + 60, DEFAULT_EXPIRE_SECS),
            Ok(())
        );
        let auth = bearer(PYTHON_TOKEN_NO_CLIENT);
        assert_eq!(
            signer.verify(
                Some(&auth),
                MISSING_CLIENT_ID,
                DEVICE,
                TS,
                DEFAULT_EXPIRE_SECS
            ),
            Ok(())
        );
    }

    #[test]
    fn token_accepted_until_exactly_expire_secs_old() {
        let signer = TokenSigner::new(SECRET);
        let auth = bearer(&signer.sign(CLIENT, DEVICE, TS));
        assert_eq!(
            signer.verify(Some(&auth), CLIENT, DEVICE, TS + 100, 100),
            Ok(())
        );
        assert_eq!(
            signer.verify(Some(&auth), CLIENT, DEVICE, TS + 101, 100),
            Err(TokenError::Expired { age: 101 })
        );
    }

    #[test]
    fn token_for_other_device_or_client_has_bad_signature() {
        let signer = TokenSigner::new(SECRET);
        let auth = bearer(PYTHON_TOKEN);
        assert_eq!(
            signer.verify(Some(&auth), CLIENT, "aa:bb:cc:dd:ee:00", TS, 100),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            signer.verify(Some(&auth), "other", DEVICE, TS, 100),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            TokenSigner::new("wrong").verify(Some(&auth), CLIENT, DEVICE, TS, 100),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_timestamp_has_bad_signature() {
        let signer = TokenSigner::new(SECRET);
        let (sig, _) = PYTHON_TOKEN.split_once('.').unwrap();
        let auth = format!("Bearer {sig}.{}", TS + 1);
        assert_eq!(
            signer.verify(Some(&auth), CLIENT, DEVICE, TS, 100),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn expired_and_badly_signed_reports_bad_signature() {
        let auth = bearer(PYTHON_TOKEN);
        assert_eq!(
            TokenSigner::new("wrong").verify(Some(&auth), CLIENT, DEVICE, TS + 1000, 1),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn rotated_key_still_verifies_but_new_key_signs() {
        let old = TokenSigner::new("old-secret");
        let rotated = TokenSigner::new("new-secret").also_accepting("old-secret");
        let old_token = bearer(&old.sign(CLIENT, DEVICE, TS));
        assert_eq!(
            rotated.verify(Some(&old_token), CLIENT, DEVICE, TS, 100),
            Ok(())
        );
        let new_token = rotated.sign(CLIENT, DEVICE, TS);
        assert_eq!(
            new_token,
            TokenSigner::new("new-secret").sign(CLIENT, DEVICE, TS)
        );
        assert_eq!(
            old.verify(Some(&bearer(&new_token)), CLIENT, DEVICE, TS, 100),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn missing_or_empty_authorization_is_missing() {
        let signer = TokenSigner::new(SECRET);
        assert_eq!(
            signer.verify(None, CLIENT, DEVICE, TS, 100),
            Err(TokenError::Missing)
        );
        assert_eq!(
            signer.verify(Some(""), CLIENT, DEVICE, TS, 100),
            Err(TokenError::Missing)
        );
    }

    #[test]
    fn token_without_bearer_prefix_is_malformed() {
        let signer = TokenSigner::new(SECRET);
        let want = Err(TokenError::Malformed(
            "Authorization must start with \"Bearer \"",
        ));
        for value in [
            PYTHON_TOKEN.to_owned(),
            format!("bearer {PYTHON_TOKEN}"),
            format!("Bearer{PYTHON_TOKEN}"),
            format!("Token {PYTHON_TOKEN}"),
        ] {
            assert_eq!(
                signer.verify(Some(&value), CLIENT, DEVICE, TS, 100),
                want,
                "{value}"
            );
        }
    }

    #[test]
    fn structurally_broken_tokens_are_malformed() {
        let signer = TokenSigner::new(SECRET);
        let (sig, _) = PYTHON_TOKEN.split_once('.').unwrap();
        for (value, reason) in [
            ("Bearer ", "token must be <signature>.<unix-seconds>"),
            ("Bearer abc", "token must be <signature>.<unix-seconds>"),
            ("Bearer abc.", "timestamp must be decimal unix seconds"),
            ("Bearer abc.-5", "timestamp must be decimal unix seconds"),
            ("Bearer abc.12x", "timestamp must be decimal unix seconds"),
            ("Bearer abc.1.2", "timestamp must be decimal unix seconds"),
            (
                "Bearer abc.99999999999999999999999",
                "timestamp is out of range",
            ),
            ("Bearer ab+/.1", "signature is not unpadded base64url"),
        ] {
            assert_eq!(
                signer.verify(Some(value), CLIENT, DEVICE, TS, 100),
                Err(TokenError::Malformed(reason)),
                "{value}"
            );
        }
        let padded = format!("Bearer {sig}=.{TS}");
        assert_eq!(
            signer.verify(Some(&padded), CLIENT, DEVICE, TS, 100),
            Err(TokenError::Malformed("signature is not unpadded base64url"))
        );
    }

    #[test]
    fn leading_zeros_in_timestamp_are_signed_canonically_like_python_int() {
        let signer = TokenSigner::new(SECRET);
        let (sig, ts) = PYTHON_TOKEN.split_once('.').unwrap();
        let auth = format!("Bearer {sig}.00{ts}");
        assert_eq!(signer.verify(Some(&auth), CLIENT, DEVICE, TS, 100), Ok(()));
    }

    #[test]
    fn future_timestamp_beyond_skew_is_malformed() {
        let signer = TokenSigner::new(SECRET);
        let auth = bearer(&signer.sign(CLIENT, DEVICE, TS + MAX_CLOCK_SKEW_SECS));
        assert_eq!(signer.verify(Some(&auth), CLIENT, DEVICE, TS, 100), Ok(()));
        let auth = bearer(&signer.sign(CLIENT, DEVICE, TS + MAX_CLOCK_SKEW_SECS + 1));
        assert_eq!(
            signer.verify(Some(&auth), CLIENT, DEVICE, TS, 100),
            Err(TokenError::Malformed(
                "timestamp is more than 300 s in the future"
            ))
        );
    }

    #[test]
    fn vision_tokens_verify_for_their_device_until_expiry_only() {
        let signer = TokenSigner::new(SECRET).also_accepting("old");
        let auth = bearer(&signer.sign_vision(DEVICE, TS + 3600));
        assert_eq!(signer.verify_vision(Some(&auth), DEVICE, TS), Ok(()));
        assert_eq!(signer.verify_vision(Some(&auth), DEVICE, TS + 3600), Ok(()));
        assert_eq!(
            signer.verify_vision(Some(&auth), DEVICE, TS + 3601),
            Err(TokenError::ExpiredAt { ago: 1 })
        );
        assert_eq!(
            signer.verify_vision(Some(&auth), "aa:bb:cc:dd:ee:00", TS),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            TokenSigner::new("other").verify_vision(Some(&auth), DEVICE, TS),
            Err(TokenError::BadSignature)
        );
        // Another instance with the same secret verifies it; a rotated-out secret still does.
        let rotated = TokenSigner::new("new").also_accepting(SECRET);
        assert_eq!(rotated.verify_vision(Some(&auth), DEVICE, TS), Ok(()));
        let (sig, _) = auth.rsplit_once('.').unwrap();
        let extended = format!("{sig}.{}", TS + 999_999);
        assert_eq!(
            signer.verify_vision(Some(&extended), DEVICE, TS),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            signer.verify_vision(None, DEVICE, TS),
            Err(TokenError::Missing)
        );
        assert_eq!(
            signer.verify_vision(Some("Bearer garbage"), DEVICE, TS),
            Err(TokenError::Malformed(
                "token must be <signature>.<unix-seconds>"
            ))
        );
    }

    #[test]
    fn device_and_vision_tokens_are_not_interchangeable() {
        let signer = TokenSigner::new(SECRET);
        let device_token = bearer(&signer.sign("xiaozhi-vision", DEVICE, TS + 60));
        assert_eq!(
            signer.verify_vision(Some(&device_token), DEVICE, TS),
            Err(TokenError::BadSignature)
        );
        let vision_token = bearer(&signer.sign_vision(DEVICE, TS));
        assert_eq!(
            signer.verify(Some(&vision_token), "xiaozhi-vision", DEVICE, TS, 100),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn debug_does_not_print_secrets() {
        let text = format!("{:?}", TokenSigner::new(SECRET).also_accepting("old"));
        assert_eq!(text, "TokenSigner { secrets: 2 }");
    }
}
