//! The error type of request/response providers (ASR, TTS) that call remote services.

use crate::providers::http_client::HttpError;

/// Why a provider call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The HTTP exchange failed: DNS, connect, TLS, timeout, a non-2xx status, or the body.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The provider settings ask for something this client cannot do.
    #[error("invalid provider settings: {0}")]
    InvalidSettings(String),
    /// The service answered 2xx with something this provider cannot use.
    #[error("unexpected response: {0}")]
    BadResponse(String),
}
