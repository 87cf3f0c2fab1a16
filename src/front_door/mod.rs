//! What both listening ports (WebSocket and HTTP) do before they serve a client: learn who it
//! really is behind a load balancer, and decide whether to let it in.
//!
//! - [`proxy`]: the PROXY protocol header (v1/v2) a layer-4 balancer puts before the stream;
//! - [`peer`]: which balancers are trusted, and the forwarded header they name the device in;
//! - [`rate_limit`]: token buckets per client address, one bounded table per shard;
//! - [`rewind`]: replays the bytes read past a PROXY header to the server that reads next.
//!
//! Each port keeps its own state (its own limiter, its own budgets) on each shard; nothing here
//! is shared across cores.

pub mod peer;
pub mod proxy;
pub mod rate_limit;
pub mod rewind;

use futures_lite::AsyncWriteExt;

/// Writes a complete, connection-closing plain-text HTTP response (a refusal sent before any
/// HTTP server runs on the connection, or instead of one).
pub async fn write_plain<S: futures_lite::AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    extra_headers: &str,
    body: &str,
) -> std::io::Result<()> {
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.flush().await
}
