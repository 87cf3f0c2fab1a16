//! The HTTP port: `GET/POST/OPTIONS /xiaozhi/ota/` (provisioning), `GET/POST
//! /mcp/vision/explain` (the camera's photo question, [`vision`]), `/healthz`, `/readyz`,
//! `/metrics`, `/histograms/<stage>.hgrm|.hlog`. Served by hyper's HTTP/1 server on each shard (its own SO_REUSEPORT listener),
//! over glommio sockets through `smol-hyper`'s futures-io adapter.
//!
//! Before the routes, [`admission`] finds each request's real client address behind a
//! balancer (PROXY header, forwarded header) and applies the port's limits (connections per
//! shard, requests per address).

pub mod admission;
pub mod ota;
pub mod vision;

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
pub use ota::{OtaRequest, OtaSettings};

use crate::front_door::rewind::Rewind;
use crate::front_door::{proxy, write_plain};

/// Largest request body accepted (the OTA system-info JSON is ~2 KiB).
const MAX_BODY: usize = 64 * 1024;
/// An HTTP connection is closed after this long, keep-alive or not (bounds slow clients).
const MAX_CONNECTION_TIME: Duration = Duration::from_secs(60);
/// Time a trusted balancer has to send its PROXY header.
const PROXY_HEADER_TIME: Duration = Duration::from_secs(5);
/// A connection refused because its shard is full is answered and closed within this time.
const REFUSED_CONNECTION_TIME: Duration = Duration::from_secs(5);

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
    /// False while the instance drains (`/readyz` then answers 503).
    pub ready: Rc<Cell<bool>>,
    /// Real client addresses and the port's limits on this shard.
    pub admission: Rc<HttpAdmission>,
    /// `/metrics` text.
    pub metrics: MetricsSource,
    /// `/histograms` and `/histograms/<stage>[.hgrm|.hlog]`.
    pub histograms: HistogramSource,
    /// `/mcp/vision/explain`.
    pub vision: vision::VisionEndpoint,
}

/// The address a request comes from as admission resolved it (the device behind a trusted
/// balancer, else the TCP peer); in every routed request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// Serves one HTTP connection until the client closes it or the time limit passes.
pub async fn serve_connection(mut stream: glommio::net::TcpStream, ctx: Rc<HttpContext>) {
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let local_ip = stream.local_addr().ok().map(|a| a.ip());
    // Taken before anything is read: a full shard answers 503 whatever the client sends.
    let slot = ctx.admission.open_connection();
    let mut client = peer.ip();
    let mut already = Vec::new();
    if let Some(accept) = ctx.admission.proxy_header_from(peer.ip()) {
        let read = async { Some(proxy::read_header(&mut stream, accept).await) };
        let timeout = async {
            glommio::timer::sleep(PROXY_HEADER_TIME).await;
            None
        };
        let error = match futures_lite::future::or(read, timeout).await {
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
    let io = smol_hyper::rt::FuturesIo::new(Rewind::new(already, stream));
    let full = slot.is_none().then(|| ctx.admission.max_connections());
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move {
            Ok::<_, Infallible>(match full {
                Some(max) => shard_full(max),
                None => admit(req, &ctx, client, local_ip).await,
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(16 * 1024)
        .serve_connection(io, service);
    let limit = async {
        let time = if full.is_some() {
            REFUSED_CONNECTION_TIME
        } else {
            MAX_CONNECTION_TIME
        };
        glommio::timer::sleep(time).await;
        Ok(())
    };
    if let Err(e) = futures_lite::future::or(conn, limit).await {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
    drop(slot);
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

/// The answer on a connection over the shard's HTTP connection limit (then closed).
fn shard_full(max: usize) -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!(
            "server busy: this shard holds its maximum of {max} HTTP connections; retry later\n"
        ),
    );
    let h = r.headers_mut();
    h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn route(
    req: Request<Incoming>,
    ctx: &HttpContext,
    local_ip: Option<std::net::IpAddr>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let mut resp = match (method.clone(), path.trim_end_matches('/')) {
        (Method::OPTIONS, _) => text(StatusCode::OK, ""),
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET, "/readyz") => {
            if ctx.ready.get() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
        }
        (Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, &(ctx.metrics)().await);
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (Method::GET, p) if p == "/histograms" || p.starts_with("/histograms/") => {
            let rest = p.trim_start_matches("/histograms").trim_start_matches('/');
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

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
