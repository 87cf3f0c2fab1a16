//! The HTTP port: `GET/POST/OPTIONS /xiaozhi/ota/` (provisioning), `GET/POST
//! /mcp/vision/explain` (the camera's photo question, [`vision`]), `/healthz`, `/readyz`,
//! `/metrics`, `/histograms/<stage>.hgrm|.hlog`. Served by hyper's HTTP/1 server on each shard (its own SO_REUSEPORT listener),
//! over glommio sockets through `smol-hyper`'s futures-io adapter.
//!
//! Before the routes, [`admission`] finds each request's real client address behind a
//! balancer (PROXY header, forwarded header) and applies the port's limits (connections per
//! address, time to the first head, connections per shard, requests per address); [`head`]
//! reads the first request head before a connection takes a place, so idle sockets take none
//! and health probes are answered even when every place is taken.

pub mod admission;
pub mod head;
pub mod ota;
pub mod shared_render;
pub mod vision;
pub mod vision_quota;

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};

pub use admission::{HttpAdmission, HttpCounters};
pub use head::Readiness;
use head::{FirstHead, Probe};
pub use ota::{OtaRequest, OtaSettings};

use crate::front_door::rewind::Rewind;
use crate::front_door::{proxy, write_plain};

/// Largest request body accepted (the OTA system-info JSON is ~2 KiB).
const MAX_BODY: usize = 64 * 1024;
/// An HTTP connection is closed after this long, keep-alive or not (bounds a slow client that
/// keeps a request in progress; an idle one is closed after `server.http.keep_alive_idle_ms`,
/// the first head has `server.http.head_timeout_ms`).
const MAX_CONNECTION_TIME: Duration = Duration::from_secs(60);

/// Produces the `/metrics` text (may ask other shards).
pub type MetricsSource = Rc<dyn Fn() -> Pin<Box<dyn Future<Output = String>>>>;

/// Answers `/histograms/<path>`: content type and body, or status and message.
pub type HistogramSource = Rc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<(&'static str, Vec<u8>), (u16, String)>>>>,
>;

/// What the HTTP handlers need from their shard.
pub struct HttpContext {
    /// OTA answer settings.
    pub ota: OtaSettings,
    /// What `/readyz` answers: 503 while the process starts (not every shard listens yet)
    /// and while it drains.
    pub ready: Rc<Cell<Readiness>>,
    /// Real client addresses and the port's limits on this shard.
    pub admission: Rc<HttpAdmission>,
    /// `/metrics` text.
    pub metrics: MetricsSource,
    /// One `/metrics` render at a time on this shard, shared by the requests that waited.
    pub metrics_render: Rc<shared_render::SharedRender>,
    /// `/histograms` and `/histograms/<stage>[.hgrm|.hlog]`.
    pub histograms: HistogramSource,
    /// One `/histograms` render at a time on this shard (the others wait their turn).
    pub histogram_renders: Rc<glommio::sync::Semaphore>,
    /// `/mcp/vision/explain`.
    pub vision: vision::VisionEndpoint,
}

/// The address a request comes from as admission resolved it (the device behind a trusted
/// balancer, else the TCP peer); in every routed request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// Serves one HTTP connection until the client closes it or the time limit passes.
///
/// In order: the client address's connection cap (429), a trusted balancer's PROXY header,
/// the first complete request head within `server.http.head_timeout_ms` (408), and only then
/// a place in the shard's budget — without one, a health or readiness probe is still answered
/// and anything else gets 503; either way the connection is then closed.
pub async fn serve_connection(mut stream: glommio::net::TcpStream, ctx: Rc<HttpContext>) {
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let local_ip = stream.local_addr().ok().map(|a| a.ip());
    let waiting = ctx.admission.waiting_for_head();
    let deadline = Instant::now() + ctx.admission.head_timeout();
    let mut client = peer.ip();
    let mut already = Vec::new();
    if let Some(accept) = ctx.admission.proxy_header_from(peer.ip()) {
        let read = async { Some(proxy::read_header(&mut stream, accept).await) };
        let error = match futures_lite::future::or(read, none_at(deadline)).await {
            Some(Ok((header, rest))) => {
                client = header.source.map_or(client, |a| a.ip());
                already = rest;
                None
            }
            Some(Err(proxy::ReadError::Invalid(e))) => Some(e.to_string()),
            Some(Err(_)) => return,
            None => Some("no PROXY header received in time".to_string()),
        };
        if let Some(error) = error {
            ctx.admission.proxy_header_error();
            tracing::info!(%peer, %error, "trusted balancer sent no valid PROXY header (HTTP port)");
            let _ = write_plain(&mut stream, "400 Bad Request", "", &format!("{error}\n")).await;
            return;
        }
    }
    let Some(_address) = ctx.admission.open_from(client) else {
        let _ = write_plain(
            &mut stream,
            "429 Too Many Requests",
            "Retry-After: 1\r\n",
            &format!("too many connections from {client}; retry later\n"),
        )
        .await;
        return;
    };
    let read = async { Some(head::read_first_head(&mut stream, already).await) };
    let (bytes, probe) = match futures_lite::future::or(read, none_at(deadline)).await {
        Some(FirstHead::Complete { bytes, probe }) => (bytes, probe),
        Some(FirstHead::Closed) => return,
        Some(bad @ (FirstHead::Invalid | FirstHead::TooLarge)) => {
            ctx.admission.bad_head();
            let (status, what) = match bad {
                FirstHead::Invalid => ("400 Bad Request", "malformed HTTP request head"),
                _ => (
                    "431 Request Header Fields Too Large",
                    "request head too large",
                ),
            };
            let _ = write_plain(&mut stream, status, "", &format!("{what}\n")).await;
            return;
        }
        None => {
            ctx.admission.head_timed_out();
            let _ = write_plain(
                &mut stream,
                "408 Request Timeout",
                "",
                "no complete request head in time\n",
            )
            .await;
            return;
        }
    };
    drop(waiting);
    let Some(slot) = ctx.admission.open_connection() else {
        let _ = match probe {
            Some(probe) => {
                ctx.admission.health_over_budget();
                let (status, body) = probe.answer(ctx.ready.get());
                let line = match status {
                    200 => "200 OK",
                    _ => "503 Service Unavailable",
                };
                write_plain(&mut stream, line, "", body).await
            }
            None => {
                ctx.admission.refused_full();
                write_plain(
                    &mut stream,
                    "503 Service Unavailable",
                    "Retry-After: 1\r\n",
                    &shard_full_text(ctx.admission.max_connections()),
                )
                .await
            }
        };
        return;
    };
    let io = smol_hyper::rt::FuturesIo::new(Rewind::new(bytes, stream));
    let use_ = Rc::new(ConnectionUse::new(ctx.admission.max_requests()));
    let service = {
        let (ctx, use_) = (ctx.clone(), use_.clone());
        hyper::service::service_fn(move |req| {
            let (ctx, use_) = (ctx.clone(), use_.clone());
            async move {
                let request = use_.begin();
                let mut resp = admit(req, &ctx, client, local_ip).await;
                if request.last {
                    ctx.admission.request_cap_closed();
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(head::MAX_HEAD_BYTES)
        .serve_connection(io, service);
    if let Err(e) = drive(conn, &use_, &ctx.admission).await {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
    drop(slot);
}

/// Runs a served connection until it ends, closing it once it has had no request in progress
/// for `server.http.keep_alive_idle_ms` (gracefully: a response being written is finished),
/// and dropping it at [`MAX_CONNECTION_TIME`] whatever it is doing.
async fn drive<C>(conn: C, use_: &ConnectionUse, admission: &HttpAdmission) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>> + GracefulShutdown,
{
    let end = Instant::now() + MAX_CONNECTION_TIME;
    let idle = admission.keep_alive_idle();
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        let now = Instant::now();
        let wake = match use_.idle_since() {
            _ if closing => end,
            Some(since) => (since + idle).min(end),
            None => (now + idle).min(end),
        };
        let tick = async {
            glommio::timer::sleep(wake.saturating_duration_since(now)).await;
            None
        };
        match futures_lite::future::or(async { Some(conn.as_mut().await) }, tick).await {
            Some(ended) => return ended,
            None if Instant::now() >= end => return Ok(()),
            None => {
                let idle_for = use_.idle_since().map(|since| since.elapsed());
                if !closing && idle_for.is_some_and(|d| d >= idle) {
                    admission.keep_alive_idle_closed();
                    conn.as_mut().shut_down();
                    closing = true;
                }
            }
        }
    }
}

/// A connection that can be asked to close once its current request is answered.
trait GracefulShutdown {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S> GracefulShutdown for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// A served connection's requests: how many so far, and since when none is in progress.
struct ConnectionUse {
    max_requests: u32,
    served: Cell<u32>,
    in_progress: Cell<u32>,
    idle_since: Cell<Instant>,
}

/// One request in progress on a [`ConnectionUse`]; dropping it (answered or abandoned) marks
/// the connection idle from then if no other request is in progress.
struct RequestInProgress<'a> {
    use_: &'a ConnectionUse,
    /// The connection's last allowed request: answer it with `Connection: close`.
    last: bool,
}

impl ConnectionUse {
    fn new(max_requests: u32) -> Self {
        ConnectionUse {
            max_requests,
            served: Cell::new(0),
            in_progress: Cell::new(0),
            idle_since: Cell::new(Instant::now()),
        }
    }

    fn begin(&self) -> RequestInProgress<'_> {
        self.served.set(self.served.get().saturating_add(1));
        self.in_progress.set(self.in_progress.get() + 1);
        RequestInProgress {
            use_: self,
            last: self.served.get() >= self.max_requests,
        }
    }

    /// Since when no request is in progress; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        (self.in_progress.get() == 0).then(|| self.idle_since.get())
    }
}

impl Drop for RequestInProgress<'_> {
    fn drop(&mut self) {
        let n = self.use_.in_progress.get().saturating_sub(1);
        self.use_.in_progress.set(n);
        if n == 0 {
            self.use_.idle_since.set(Instant::now());
        }
    }
}

/// `None` at `deadline` (the losing side of a read raced against it).
async fn none_at<T>(deadline: Instant) -> Option<T> {
    glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
    None
}

/// Resolves the request's client address, applies its rate limit, routes it, and writes the
/// access log line (OTA at info, everything else at debug: balancers probe often).
async fn admit(
    mut req: Request<Incoming>,
    ctx: &HttpContext,
    connection_client: IpAddr,
    local_ip: Option<IpAddr>,
) -> Response<Full<Bytes>> {
    let client = ctx
        .admission
        .client_address(connection_client, req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let device = header(&req, "device-id");
    let resp = if ctx.admission.allow_request(client, Instant::now()) {
        req.extensions_mut().insert(ClientAddr(client));
        route(req, ctx, local_ip).await
    } else {
        let mut r = text(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("too many requests from {client}; retry later\n"),
        );
        r.headers_mut().insert(
            RETRY_AFTER,
            HeaderValue::from(ctx.admission.retry_after_s()),
        );
        r
    };
    let status = resp.status().as_u16();
    let device = device.as_deref().unwrap_or("-");
    if path.starts_with("/xiaozhi/ota") {
        tracing::info!(addr = %client, %method, %path, device, status, "ota request");
    } else {
        tracing::debug!(addr = %client, %method, %path, status, "http request");
    }
    resp
}

/// The body of the 503 a request gets when the shard holds its maximum of connections.
fn shard_full_text(max: usize) -> String {
    format!("server busy: this shard holds its maximum of {max} HTTP connections; retry later\n")
}

async fn route(
    req: Request<Incoming>,
    ctx: &HttpContext,
    local_ip: Option<std::net::IpAddr>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let probe = Probe::of(method.as_str(), &path);
    let mut resp = match (method.clone(), path.trim_end_matches('/')) {
        (Method::OPTIONS, _) => text(StatusCode::OK, ""),
        (_, _) if probe.is_some() => probe_response(probe, ctx.ready.get()),
        (Method::GET, "/metrics") => {
            let body = ctx.metrics_render.get(|| (ctx.metrics)()).await;
            let mut r = text(StatusCode::OK, &body);
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (Method::GET, p) if p == "/histograms" || p.starts_with("/histograms/") => {
            let rest = p.trim_start_matches("/histograms").trim_start_matches('/');
            // Never closed, so acquiring cannot fail (and would only mean no bound).
            let _turn = ctx.histogram_renders.acquire_permit(1).await.ok();
            match (ctx.histograms)(rest.to_string()).await {
                Ok((content_type, body)) => {
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                    r
                }
                Err((status, message)) => text(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    &message,
                ),
            }
        }
        (Method::GET, "/xiaozhi/ota") => {
            let host = header(&req, "host");
            let url = ctx.ota.websocket_url(host.as_deref(), local_ip);
            text(
                StatusCode::OK,
                &format!(
                    "OTA interface is running; the websocket address sent to devices is: {url}\n"
                ),
            )
        }
        (Method::POST, "/xiaozhi/ota") => ota_post(req, ctx, local_ip).await,
        (Method::GET, "/mcp/vision/explain") => ctx.vision.status(),
        (Method::POST, "/mcp/vision/explain") => ctx.vision.explain(req).await,
        (Method::POST, "/xiaozhi/ota/activate") => {
            // Activation codes are not used: every device counts as activated.
            text(StatusCode::OK, "success")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            &format!("no route for {method} {path}\n"),
        ),
    };
    let h = resp.headers_mut();
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("client-id, content-type, device-id, authorization"),
    );
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    resp
}

async fn ota_post(
    req: Request<Incoming>,
    ctx: &HttpContext,
    local_ip: Option<std::net::IpAddr>,
) -> Response<Full<Bytes>> {
    let client_ip = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let device_id = header(&req, "device-id");
    let client_id = header(&req, "client-id");
    let host = header(&req, "host");
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body refused: {e} (limit {MAX_BODY} bytes)\n"),
            )
        }
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let answer = ctx.ota.answer(
        &OtaRequest {
            device_id: device_id.as_deref(),
            client_id: client_id.as_deref(),
            host: host.as_deref(),
            local_ip,
            client_ip,
            body: &body,
        },
        now_ms,
    );
    let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// The answer to a health or readiness probe (`None`: not one, 404).
fn probe_response(probe: Option<Probe>, ready: Readiness) -> Response<Full<Bytes>> {
    match probe.map(|p| p.answer(ready)) {
        Some((status, body)) => text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        ),
        None => text(StatusCode::NOT_FOUND, "not a probe\n"),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
