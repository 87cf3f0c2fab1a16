//! The outbound HTTP/1.1 client each shard uses to call remote providers (LLM, ASR, TTS).
//!
//! One [`HttpClient`] lives on each shard (wrap it in an `Rc`); it is `!Send` on purpose, like
//! the sockets it owns. It runs hyper's low-level `client::conn::http1` over glommio sockets
//! (adapted with `smol-hyper`), with TLS from `futures-rustls` (ring, Mozilla roots plus optional
//! extra PEM roots). hyper-util's pooling client cannot be used: it needs `Send` connections.
//!
//! Connections are kept alive in a small pool per origin. A connection goes back into the pool
//! as soon as the response head arrives, and is only handed out again once hyper reports it
//! ready, which for HTTP/1 means the previous response body was read to its end. So callers
//! must read bodies to the end (SSE: drain after `[DONE]`) to get reuse; a dropped body closes
//! its connection, which is also how a request is cancelled.
//!
//! Past 600 lines because the pool, TLS set-up, request building and the SSE reader share one
//! connection type whose invariants (when a connection may be reused) are easier to keep in
//! one file than across several.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_rustls::pki_types::pem::PemObject;
use futures_rustls::pki_types::{CertificateDer, ServerName};
use futures_rustls::rustls::{ClientConfig, RootCertStore};
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, Response, Uri};
use smol_hyper::rt::FuturesIo;

/// Error type of request bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body: in memory (sent with `Content-Length`, and replayable, so the request can
/// be retried on a new connection) or streamed.
pub struct ReqBody {
    /// Not `Send`: a streamed body may come from shard-local state.
    inner: Pin<Box<dyn Body<Data = Bytes, Error = BoxError>>>,
    /// The whole body when it is in memory.
    replay: Option<Bytes>,
}

impl ReqBody {
    /// A body held in memory.
    pub fn full(data: impl Into<Bytes>) -> ReqBody {
        let data = data.into();
        ReqBody {
            inner: Box::pin(Full::new(data.clone()).map_err(|never| match never {})),
            replay: Some(data),
        }
    }

    /// An empty body.
    pub fn empty() -> ReqBody {
        ReqBody::full(Bytes::new())
    }

    /// A streamed body (not replayable: a request with it is never retried).
    pub fn stream<B>(body: B) -> ReqBody
    where
        B: Body<Data = Bytes> + 'static,
        B::Error: Into<BoxError>,
    {
        ReqBody {
            inner: Box::pin(body.map_err(Into::into)),
            replay: None,
        }
    }

    fn try_clone(&self) -> Option<ReqBody> {
        self.replay.clone().map(ReqBody::full)
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Request extension: bound on opening a new connection for this request, instead of
/// [`ClientSettings::connect_timeout`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectTimeout(pub Duration);

/// How long a resolved host name is reused before it is looked up again.
const DNS_CACHE_TTL: Duration = Duration::from_secs(30);
/// Most bytes of an error response's body kept in [`HttpError::Status`].
const STATUS_SNIPPET_BYTES: usize = 512;
/// How long to wait for an error response's body snippet.
const STATUS_SNIPPET_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not an absolute `http://` or `https://` URL, or a header could not be built.
    #[error("invalid request {url:?}: {reason}")]
    InvalidRequest { url: String, reason: String },
    /// The extra root certificates could not be loaded.
    #[error("root certificates {path}: {reason}")]
    Roots { path: PathBuf, reason: String },
    /// The host name did not resolve.
    #[error("DNS lookup of {host} failed: {source}")]
    Dns { host: String, source: io::Error },
    /// No resolved address accepted a TCP connection; `addr` is the last one tried.
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    /// The TLS handshake failed (for example an unknown issuer or a name mismatch).
    #[error("TLS handshake with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    /// A stage of the exchange did not finish in time.
    #[error("{stage} timed out after {after:?}")]
    Timeout {
        stage: &'static str,
        after: Duration,
    },
    /// The server answered with a non-success status.
    #[error("HTTP status {code}: {body_snippet}")]
    Status { code: u16, body_snippet: String },
    /// hyper reported a protocol or connection error.
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    /// The response body could not be read or was not what the caller accepts.
    #[error("response body: {0}")]
    Body(String),
}

/// Client settings (one set per shard; usually from the config file).
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Bound on DNS plus TCP connect plus TLS handshake for a new connection.
    pub connect_timeout: Duration,
    /// An idle pooled connection older than this is closed instead of reused
    /// (keep it below the servers' keep-alive timeouts, commonly 60–75 s).
    pub idle_timeout: Duration,
    /// Most connections kept per origin for reuse. A connection joins the pool when its
    /// response head arrives, so this counts connections still streaming a body as well as idle
    /// ones; too small, and a shard with many answers in flight closes and reopens connections.
    pub max_pooled_per_origin: usize,
    /// PEM file of extra trusted root certificates (self-hosted providers, tests).
    pub extra_root_pem: Option<PathBuf>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(50),
            max_pooled_per_origin: 128,
            extra_root_pem: None,
        }
    }
}

/// Scheme, host and port: the key of the connection pool.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Origin {
    tls: bool,
    /// Host without IPv6 brackets.
    host: String,
    port: u16,
}

impl Origin {
    fn of(uri: &Uri) -> Result<Origin, String> {
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => return Err(format!("unsupported scheme {other:?}")),
            None => return Err("not an absolute URL".into()),
        };
        let host = uri.host().ok_or("no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("empty host".into());
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Origin {
            tls,
            host: host.to_string(),
            port,
        })
    }

    /// The `Host` header value: the port only when it is not the scheme's default.
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// A cached DNS answer.
struct Resolved {
    addrs: Vec<SocketAddr>,
    at: Instant,
}

/// A pooled connection waiting for its next request.
struct IdleConn {
    sender: SendRequest<ReqBody>,
    since: Instant,
}

/// The per-shard HTTP/1.1 client with a keep-alive pool per origin.
pub struct HttpClient {
    settings: ClientSettings,
    tls: TlsConnector,
    idle: RefCell<HashMap<Origin, Vec<IdleConn>>>,
    dns: RefCell<HashMap<(String, u16), Resolved>>,
    /// Connections opened (TCP connected), for `/metrics`.
    opened: Cell<u64>,
    /// Shard-local: the pool holds this executor's connections.
    _not_send: PhantomData<Rc<()>>,
}

impl HttpClient {
    /// Builds a client. If `extra_root_pem` cannot be loaded, logs an error and trusts only
    /// the built-in roots (use [`HttpClient::try_new`] to check the file at start-up).
    pub fn new(settings: ClientSettings) -> HttpClient {
        match HttpClient::try_new(settings.clone()) {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "extra root certificates not loaded");
                HttpClient::try_new(ClientSettings {
                    extra_root_pem: None,
                    ..settings
                })
                .expect("the built-in roots always load")
            }
        }
    }

    /// Builds a client; fails if `extra_root_pem` cannot be read or holds no certificate.
    pub fn try_new(settings: ClientSettings) -> Result<HttpClient, HttpError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = &settings.extra_root_pem {
            let roots_err = |reason: String| HttpError::Roots {
                path: path.clone(),
                reason,
            };
            let mut added = 0;
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| roots_err(e.to_string()))? {
                let cert = cert.map_err(|e| roots_err(e.to_string()))?;
                roots.add(cert).map_err(|e| roots_err(e.to_string()))?;
                added += 1;
            }
            if added == 0 {
                return Err(roots_err("no certificate in the file".into()));
            }
        }
        let provider = Arc::new(futures_rustls::rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpError::Tls {
                host: String::new(),
                source: io::Error::other(e),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HttpClient {
            settings,
            tls: TlsConnector::from(Arc::new(config)),
            idle: RefCell::new(HashMap::new()),
            dns: RefCell::new(HashMap::new()),
            opened: Cell::new(0),
            _not_send: PhantomData,
        })
    }

    /// Sends `req` (absolute `http://` or `https://` URI) and returns the response head; the
    /// body streams from the connection. Any status is `Ok`: see [`error_for_status`].
    ///
    /// Uses a ready pooled connection when there is one. If that connection turns out dead
    /// (closed before the request was written, or closed by the server before any response
    /// byte with an in-memory body), sends the request once more on a new connection. A
    /// [`ConnectTimeout`] extension overrides the connect timeout. Dropping the returned
    /// future, or the response body before its end, closes the connection.
    pub async fn request(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, HttpError> {
        let invalid = |reason: String| HttpError::InvalidRequest {
            url: req.uri().to_string(),
            reason,
        };
        let origin = Origin::of(req.uri()).map_err(invalid)?;
        let path: Uri = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| invalid(e.to_string()))?;
        let host =
            HeaderValue::from_str(&origin.host_header()).map_err(|e| invalid(e.to_string()))?;
        // hyper serializes the URI as given and does not add `Host` on this API.
        *req.uri_mut() = path;
        req.headers_mut().entry(HOST).or_insert(host);

        if let Some(mut sender) = self.checkout(&origin) {
            let replay = try_clone_request(&req);
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin(origin, sender);
                    return Ok(resp);
                }
                Err(mut e) => {
                    req = match (e.take_message(), replay) {
                        (Some(back), _) => back,
                        // The server closed the idle connection as the request went out
                        // (keep-alive race): no response byte came, so send it once more.
                        (None, Some(replay)) if closed_while_idle(e.error()) => replay,
                        (None, _) => return Err(HttpError::Http(e.into_error())),
                    };
                    tracing::debug!(host = %origin.host, error = %e.error(), "pooled connection was dead; reconnecting");
                }
            }
        }
        let limit = req
            .extensions()
            .get::<ConnectTimeout>()
            .map_or(self.settings.connect_timeout, |t| t.0);
        let mut sender = self.connect(&origin, limit).await?;
        let resp = sender.send_request(req).await?;
        self.checkin(origin, sender);
        Ok(resp)
    }

    /// Connections opened so far (TCP connected; for metrics and tests).
    pub fn opened(&self) -> u64 {
        self.opened.get()
    }

    /// Number of pooled connections that are still open (for metrics and tests).
    pub fn pooled_connections(&self) -> usize {
        self.idle
            .borrow()
            .values()
            .flatten()
            .filter(|c| !c.sender.is_closed())
            .count()
    }

    fn checkout(&self, origin: &Origin) -> Option<SendRequest<ReqBody>> {
        let mut idle = self.idle.borrow_mut();
        let conns = idle.get_mut(origin)?;
        let max_age = self.settings.idle_timeout;
        // Dropping a sender that is not in use lets its connection task end.
        conns.retain(|c| !c.sender.is_closed() && c.since.elapsed() < max_age);
        let pos = conns.iter().position(|c| c.sender.is_ready())?;
        Some(conns.swap_remove(pos).sender)
    }

    fn checkin(&self, origin: Origin, sender: SendRequest<ReqBody>) {
        let max_age = self.settings.idle_timeout;
        let mut idle = self.idle.borrow_mut();
        idle.retain(|_, conns| {
            conns.retain(|c| !c.sender.is_closed() && c.since.elapsed() < max_age);
            !conns.is_empty()
        });
        if sender.is_closed() {
            return;
        }
        let conns = idle.entry(origin).or_default();
        if conns.len() < self.settings.max_pooled_per_origin {
            conns.push(IdleConn {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Opens a new connection (DNS, TCP, TLS, HTTP/1 handshake) within `limit`.
    async fn connect(
        &self,
        origin: &Origin,
        limit: Duration,
    ) -> Result<SendRequest<ReqBody>, HttpError> {
        let deadline = Instant::now() + limit;
        let timed_out = |stage| HttpError::Timeout {
            stage,
            after: limit,
        };
        let addrs = with_timeout("DNS lookup", limit, self.resolve(origin)).await??;
        let mut last_err = None;
        let mut tcp = None;
        for addr in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(*addr, left).await {
                Ok(stream) => {
                    self.opened.set(self.opened.get() + 1);
                    tcp = Some(stream);
                    break;
                }
                Err(e) => {
                    let e = io::Error::from(e);
                    tracing::debug!(%addr, error = %e, "connect failed");
                    last_err = Some((*addr, e));
                }
            }
        }
        let tcp = match (tcp, last_err) {
            (Some(tcp), _) => tcp,
            (None, Some((_, e))) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(timed_out("connect"))
            }
            (None, Some((addr, source))) => {
                // The cached addresses may be stale.
                self.dns
                    .borrow_mut()
                    .remove(&(origin.host.clone(), origin.port));
                return Err(HttpError::Connect { addr, source });
            }
            (None, None) => return Err(timed_out("connect")),
        };
        tcp.set_nodelay(true).map_err(|e| HttpError::Connect {
            addr: addrs[0],
            source: io::Error::from(e),
        })?;
        let left = deadline.saturating_duration_since(Instant::now());
        if origin.tls {
            let name = ServerName::try_from(origin.host.clone()).map_err(|e| {
                HttpError::InvalidRequest {
                    url: origin.host.clone(),
                    reason: e.to_string(),
                }
            })?;
            let stream = with_timeout("TLS handshake", left, self.tls.connect(name, tcp))
                .await
                .map_err(|_| timed_out("TLS handshake"))?
                .map_err(|source| HttpError::Tls {
                    host: origin.host.clone(),
                    source,
                })?;
            handshake(FuturesIo::new(stream)).await
        } else {
            handshake(FuturesIo::new(tcp)).await
        }
    }

    /// Resolves the origin's host off the executor thread (getaddrinfo blocks), with a small cache.
    async fn resolve(&self, origin: &Origin) -> Result<Vec<SocketAddr>, HttpError> {
        if let Ok(ip) = origin.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, origin.port)]);
        }
        let key = (origin.host.clone(), origin.port);
        if let Some(cached) = self.dns.borrow().get(&key) {
            if cached.at.elapsed() < DNS_CACHE_TTL {
                return Ok(cached.addrs.clone());
            }
        }
        let (host, port) = key.clone();
        let looked_up = glommio::executor()
            .spawn_blocking(move || {
                (host.as_str(), port)
                    .to_socket_addrs()
                    .map(|addrs| addrs.collect::<Vec<_>>())
            })
            .await;
        let dns_err = |source| HttpError::Dns {
            host: origin.host.clone(),
            source,
        };
        let addrs = looked_up.map_err(dns_err)?;
        if addrs.is_empty() {
            return Err(dns_err(io::Error::new(
                io::ErrorKind::NotFound,
                "no addresses",
            )));
        }
        let resolved = Resolved {
            addrs: addrs.clone(),
            at: Instant::now(),
        };
        self.dns.borrow_mut().insert(key, resolved);
        Ok(addrs)
    }
}

/// A copy of a request whose body is in memory (for one retry on a new connection).
fn try_clone_request(req: &Request<ReqBody>) -> Option<Request<ReqBody>> {
    let mut copy = Request::new(req.body().try_clone()?);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    if let Some(limit) = req.extensions().get::<ConnectTimeout>() {
        copy.extensions_mut().insert(*limit);
    }
    Some(copy)
}

/// Whether a reused connection failed because the server had closed it: it ended before any
/// response byte, or the write hit a reset.
fn closed_while_idle(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            );
        }
        source = err.source();
    }
    false
}

/// HTTP/1 handshake; the connection task runs on this executor until the connection closes.
async fn handshake<T>(io: T) -> Result<SendRequest<ReqBody>, HttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(io)
        .await?;
    glommio::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "outbound HTTP connection ended with an error");
        }
    })
    .detach();
    Ok(sender)
}

/// Runs `fut` for at most `after` on a glommio timer. Whichever loses is dropped before this
/// returns (a dropped request or body closes its connection).
pub async fn with_timeout<F: Future>(
    stage: &'static str,
    after: Duration,
    fut: F,
) -> Result<F::Output, HttpError> {
    futures_lite::future::or(async { Ok(fut.await) }, async {
        glommio::timer::sleep(after).await;
        Err(HttpError::Timeout { stage, after })
    })
    .await
}

/// Passes a 2xx response through; otherwise reads a snippet of the body (for the log and
/// the error) and returns [`HttpError::Status`].
pub async fn error_for_status(resp: Response<Incoming>) -> Result<Response<Incoming>, HttpError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let mut body = resp.into_body();
    let mut snippet = BytesMut::new();
    let read = async {
        while snippet.len() < STATUS_SNIPPET_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        snippet.extend_from_slice(data);
                    }
                }
                _ => break,
            }
        }
    };
    // A body that is slow or cut short still gives the status.
    let _ = with_timeout("error body", STATUS_SNIPPET_TIMEOUT, read).await;
    snippet.truncate(STATUS_SNIPPET_BYTES);
    Err(HttpError::Status {
        code: status.as_u16(),
        body_snippet: String::from_utf8_lossy(&snippet).trim().to_string(),
    })
}

/// POSTs `body` as `content_type` to `url` (with `Authorization: Bearer …` when `api_key` is
/// set) and reads the 2xx reply, at most `limit` bytes: the request/response exchange of the
/// remote providers that do not stream.
pub async fn post_for_body(
    client: &HttpClient,
    url: &str,
    api_key: &ApiKey,
    content_type: &str,
    body: impl Into<Bytes>,
    limit: usize,
) -> Result<Bytes, HttpError> {
    let mut req = Request::post(url).header(CONTENT_TYPE, content_type);
    if let Some(bearer) = api_key.bearer() {
        req = req.header(AUTHORIZATION, bearer);
    }
    let req = req
        .body(ReqBody::full(body))
        .map_err(|e| HttpError::InvalidRequest {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    let resp = error_for_status(client.request(req).await?).await?;
    read_body(resp.into_body(), limit).await
}

/// Reads a whole body into memory, failing with [`HttpError::Body`] past `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, HttpError> {
    let mut body = body;
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > limit {
                return Err(HttpError::Body(format!("larger than {limit} bytes")));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_is_sent_as_bearer_and_never_shown_by_debug() {
        let key = ApiKey::new("sk-secret");
        assert_eq!(key.bearer().as_deref(), Some("Bearer sk-secret"));
        assert_eq!(format!("{key:?}"), "\"***\"");
        assert_eq!(ApiKey::default().bearer(), None);
        assert_eq!(format!("{:?}", ApiKey::default()), "\"\"");
    }

    #[test]
    fn origin_defaults_ports_and_strips_ipv6_brackets() {
        let o = Origin::of(&"https://api.example.com/v1/x".parse().unwrap()).unwrap();
        assert_eq!(
            (o.tls, o.host.as_str(), o.port),
            (true, "api.example.com", 443)
        );
        assert_eq!(o.host_header(), "api.example.com");
        let o = Origin::of(&"http://[::1]:8080/v1".parse().unwrap()).unwrap();
        assert_eq!((o.tls, o.host.as_str(), o.port), (false, "::1", 8080));
        assert_eq!(o.host_header(), "[::1]:8080");
        let o = Origin::of(&"http://127.0.0.1/".parse().unwrap()).unwrap();
        assert_eq!(o.host_header(), "127.0.0.1");
    }

    #[test]
    fn origin_rejects_relative_and_unknown_schemes() {
        assert!(Origin::of(&"/v1/chat".parse().unwrap()).is_err());
        assert!(Origin::of(&"ftp://host/x".parse().unwrap()).is_err());
    }

    #[test]
    fn missing_root_file_is_reported() {
        let err = HttpClient::try_new(ClientSettings {
            extra_root_pem: Some("/nonexistent/ca.pem".into()),
            ..ClientSettings::default()
        })
        .err()
        .expect("error");
        assert!(matches!(err, HttpError::Roots { .. }), "{err}");
    }
}

/// A remote provider's API key, sent as `Authorization: Bearer …`. Its `Debug` never shows
/// the key (settings are logged), only whether one is set.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// The key; empty means none.
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// The key in environment variable `var` when it is set, else `configured`.
    pub fn from_env_or(var: &str, configured: &str) -> Self {
        ApiKey(std::env::var(var).unwrap_or_else(|_| configured.to_string()))
    }

    /// The `Authorization` header value, if a key is set.
    pub fn bearer(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| format!("Bearer {}", self.0))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl From<&str> for ApiKey {
    fn from(key: &str) -> Self {
        ApiKey::new(key)
    }
}
