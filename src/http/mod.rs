//! The HTTP port: `GET/POST/OPTIONS /xiaozhi/ota/` (provisioning), `GET/POST
//! /mcp/vision/explain` (the camera's photo question, [`vision`]), `/healthz`, `/readyz`,
//! `/metrics`, `/histograms/<stage>.hgrm|.hlog`. Served by hyper's HTTP/1 server on each shard (its own SO_REUSEPORT listener),
//! over glommio sockets through `smol-hyper`'s futures-io adapter.

pub mod ota;
pub mod vision;

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

pub use ota::{OtaRequest, OtaSettings};

/// Largest request body accepted (the OTA system-info JSON is ~2 KiB).
const MAX_BODY: usize = 64 * 1024;
/// An HTTP connection is closed after this long, keep-alive or not (bounds slow clients).
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
    /// False while the instance drains (`/readyz` then answers 503).
    pub ready: Rc<Cell<bool>>,
    /// `/metrics` text.
    pub metrics: MetricsSource,
    /// `/histograms` and `/histograms/<stage>[.hgrm|.hlog]`.
    pub histograms: HistogramSource,
    /// `/mcp/vision/explain`.
    pub vision: vision::VisionEndpoint,
}

/// Serves one HTTP connection until the client closes it or the time limit passes.
pub async fn serve_connection(stream: glommio::net::TcpStream, ctx: Rc<HttpContext>) {
    let local_ip = stream.local_addr().ok().map(|a| a.ip());
    let io = smol_hyper::rt::FuturesIo::new(stream);
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(route(req, &ctx, local_ip).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(16 * 1024)
        .serve_connection(io, service);
    let limit = async {
        glommio::timer::sleep(MAX_CONNECTION_TIME).await;
        Ok(())
    };
    if let Err(e) = futures_lite::future::or(conn, limit).await {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
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
