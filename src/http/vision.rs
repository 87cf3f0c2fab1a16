//! `GET/POST /mcp/vision/explain` (spec §13): the camera's photo question.
//!
//! The device's `self.camera.take_photo` tool posts `multipart/form-data` with a `question`
//! part and a `file` part (the photo), headers `Device-Id` and `Authorization: Bearer <token>`,
//! where the token is the one this server put in MCP `initialize` for that device
//! ([`TokenSigner::sign_vision`]: stateless, expiring, bound to the device id). The body is
//! read with a bound (a larger `Content-Length` is refused before reading; a chunked body is cut
//! off as soon as it passes the bound), parsed with `multer`, the photo checked by its magic
//! bytes, and the question asked of the configured vision model with this shard's HTTP client.
//!
//! Answers: 200 `{"success":true,"action":"RESPONSE","response":…}` (the device returns it as
//! its tool result and the session speaks it as it is); 401 for a missing, bad or expired token;
//! 400 for a malformed request or a file that is not an image; 413 for a body over the limit;
//! 503 when no vision model is configured, or when this shard already has
//! `vision.max_in_flight` photos in hand (each holds up to `max_body_bytes` plus its base64
//! copy, so this bounds the endpoint's memory per shard); 429 when the device has its share of
//! those in hand or is over its request rate ([`super::vision_quota`]). A model failure or timeout is answered
//! `{"success":false,"message":…}` with **200**, as the reference does: the firmware hands a
//! 200 body to the LLM as the tool result (so it can say what went wrong), while any other
//! status only makes it report "Failed to upload photo". Every outcome is counted
//! ([`VisionCounters`], `xiaozhi_vision_requests_total{result=…}`).

use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::vision_quota::{QuotaRefusal, VisionQuota};
use crate::protocol::token::TokenSigner;
use crate::providers::http_client::HttpClient;
use crate::providers::vision::{explain, ImageKind, OpenAiVisionSettings};

/// Longest question passed to the model, bytes.
const MAX_QUESTION_BYTES: usize = 2048;

/// How one request ended (the `result` label of the counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionOutcome {
    /// The model answered.
    Ok,
    /// Missing, bad or expired token, or no `Device-Id`.
    Unauthorized,
    /// Not multipart, a part missing, or the file not an image.
    BadRequest,
    /// Body over `vision.max_body_bytes`.
    TooLarge,
    /// The model failed or timed out.
    UpstreamError,
    /// `vision.provider` is "none".
    NotConfigured,
    /// The shard already had `vision.max_in_flight` requests in hand.
    Busy,
    /// The device had its share in hand, or was over its request rate.
    RateLimited,
}

crate::metrics::counters::counters! {
    /// Requests to the vision endpoint by outcome.
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct VisionCounters {
        /// Answered by the model.
        ok: Sum Counter "xiaozhi_vision_requests_total" {result = "ok"}
            "Requests to /mcp/vision/explain by result.",
        /// Refused with 401.
        unauthorized: Sum Counter "xiaozhi_vision_requests_total" {result = "unauthorized"}
            "Requests to /mcp/vision/explain by result.",
        /// Refused with 400.
        bad_request: Sum Counter "xiaozhi_vision_requests_total" {result = "bad_request"}
            "Requests to /mcp/vision/explain by result.",
        /// Refused with 413.
        too_large: Sum Counter "xiaozhi_vision_requests_total" {result = "too_large"}
            "Requests to /mcp/vision/explain by result.",
        /// The model failed or timed out.
        upstream_error: Sum Counter "xiaozhi_vision_requests_total" {result = "upstream_error"}
            "Requests to /mcp/vision/explain by result.",
        /// Refused with 503 (no model configured).
        not_configured: Sum Counter "xiaozhi_vision_requests_total" {result = "not_configured"}
            "Requests to /mcp/vision/explain by result.",
        /// Refused with 503 (too many in flight on the shard).
        busy: Sum Counter "xiaozhi_vision_requests_total" {result = "busy"}
            "Requests to /mcp/vision/explain by result.",
        /// Refused with 429 (the device's in-flight share or request rate).
        rate_limited: Sum Counter "xiaozhi_vision_requests_total" {result = "rate_limited"}
            "Requests to /mcp/vision/explain by result.",
    }
}

impl VisionCounters {
    /// Counts one request.
    pub fn count(&mut self, outcome: VisionOutcome) {
        let n = match outcome {
            VisionOutcome::Ok => &mut self.ok,
            VisionOutcome::Unauthorized => &mut self.unauthorized,
            VisionOutcome::BadRequest => &mut self.bad_request,
            VisionOutcome::TooLarge => &mut self.too_large,
            VisionOutcome::UpstreamError => &mut self.upstream_error,
            VisionOutcome::NotConfigured => &mut self.not_configured,
            VisionOutcome::Busy => &mut self.busy,
            VisionOutcome::RateLimited => &mut self.rate_limited,
        };
        *n += 1;
    }
}

/// What the endpoint needs from its shard.
pub struct VisionEndpoint {
    /// The model; `None` when `vision.provider` is "none".
    pub model: Option<OpenAiVisionSettings>,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Most requests past authentication at once on this shard.
    pub max_in_flight: usize,
    /// Requests past authentication now.
    pub in_flight: Rc<Cell<usize>>,
    /// Each device's share of the places and its request rate.
    pub quota: Rc<VisionQuota>,
    /// Verifies the tokens handed out in MCP initialize.
    pub tokens: Option<TokenSigner>,
    /// This shard's HTTP client (keep-alive pool).
    pub client: Rc<HttpClient>,
    /// Counts an outcome in the shard's stats.
    pub record: Rc<dyn Fn(VisionOutcome)>,
}

/// A request refused before the model was asked.
struct Refusal {
    outcome: VisionOutcome,
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(outcome: VisionOutcome, status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            outcome,
            status,
            message: message.into(),
        }
    }
}

impl VisionEndpoint {
    /// `GET`: a plain-text status line.
    pub fn status(&self) -> Response<Full<Bytes>> {
        let line = match &self.model {
            Some(m) => format!(
                "MCP vision endpoint is running (model {}); POST multipart/form-data with \
                 \"question\" and \"file\", Device-Id and Authorization: Bearer <token>\n",
                m.model
            ),
            None => {
                "MCP vision endpoint: no vision model is configured (vision.provider)\n".to_string()
            }
        };
        super::text(StatusCode::OK, &line)
    }

    /// `POST`: answers the question about the photo (see the module docs).
    pub async fn explain(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (outcome, status, body) = match self.answer(req).await {
            Ok(text) => (
                VisionOutcome::Ok,
                StatusCode::OK,
                json!({"success": true, "action": "RESPONSE", "response": text}),
            ),
            Err(r) => (
                r.outcome,
                r.status,
                json!({"success": false, "message": r.message}),
            ),
        };
        (self.record)(outcome);
        if outcome != VisionOutcome::Ok {
            tracing::info!(status = status.as_u16(), ?outcome, message = %body["message"], "vision request refused");
        }
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let refused_unread = matches!(
            outcome,
            VisionOutcome::TooLarge | VisionOutcome::Busy | VisionOutcome::RateLimited
        );
        if refused_unread {
            // The rest of the body is not read: the connection cannot be reused.
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(outcome, VisionOutcome::Busy | VisionOutcome::RateLimited) {
            h.insert("retry-after", HeaderValue::from_static("1"));
        }
        r
    }

    async fn answer(&self, req: Request<Incoming>) -> Result<String, Refusal> {
        use StatusCode as S;
        use VisionOutcome as O;
        let Some(model) = &self.model else {
            return Err(Refusal::new(
                O::NotConfigured,
                S::SERVICE_UNAVAILABLE,
                "no vision model is configured on this server (vision.provider = \"none\")",
            ));
        };
        let header = |name| super::header(&req, name);
        let Some(device_id) = header("device-id").filter(|d| !d.is_empty()) else {
            return Err(Refusal::new(
                O::Unauthorized,
                S::UNAUTHORIZED,
                "missing Device-Id header",
            ));
        };
        let verified = match &self.tokens {
            Some(t) => t
                .verify_vision(
                    header("authorization").as_deref(),
                    &device_id,
                    crate::clock::unix_now(),
                )
                .map_err(|e| e.to_string()),
            None => Err("no token secret is configured".to_string()),
        };
        if let Err(e) = verified {
            return Err(Refusal::new(
                O::Unauthorized,
                S::UNAUTHORIZED,
                format!("invalid vision token: {e}"),
            ));
        }
        let _device_slot = self
            .quota
            .take(&device_id, std::time::Instant::now())
            .map_err(|why| {
                let message = match why {
                    QuotaRefusal::InFlight(n) => {
                        format!("this device has {n} photos being explained already; retry shortly")
                    }
                    QuotaRefusal::Rate => {
                        "this device asks about photos too often; retry later".to_string()
                    }
                };
                Refusal::new(O::RateLimited, S::TOO_MANY_REQUESTS, message)
            })?;
        let Some(_slot) = InFlight::take(&self.in_flight, self.max_in_flight) else {
            return Err(Refusal::new(
                O::Busy,
                S::SERVICE_UNAVAILABLE,
                format!(
                    "this server is explaining {} photos already; retry shortly",
                    self.max_in_flight
                ),
            ));
        };
        let max = self.max_body_bytes;
        let too_large = || {
            Refusal::new(
                O::TooLarge,
                S::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {max} bytes"),
            )
        };
        let declared = header("content-length").and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        let content_type = header("content-type").unwrap_or_default();
        let boundary = multer::parse_boundary(&content_type).map_err(|e| {
            Refusal::new(
                O::BadRequest,
                S::BAD_REQUEST,
                format!("expected multipart/form-data with a boundary: {e}"),
            )
        })?;
        let body = Limited::new(req.into_body(), max)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    Refusal::new(
                        O::BadRequest,
                        S::BAD_REQUEST,
                        format!("request body could not be read: {e}"),
                    )
                }
            })?
            .to_bytes();
        let (question, image) = parse_form(body, boundary)
            .await
            .map_err(|e| Refusal::new(O::BadRequest, S::BAD_REQUEST, e))?;
        let Some(kind) = ImageKind::sniff(&image) else {
            return Err(Refusal::new(
                O::BadRequest,
                S::BAD_REQUEST,
                "the file is not a JPEG, PNG, GIF, BMP, TIFF or WEBP image",
            ));
        };
        tracing::info!(device = ?device_id, bytes = image.len(), ?kind, "vision question");
        explain(&self.client, model, &question, &image, kind)
            .await
            .map_err(|e| {
                tracing::warn!(device = ?device_id, error = %e, "vision model failed");
                Refusal::new(
                    O::UpstreamError,
                    S::OK,
                    format!("the vision model did not answer: {e}"),
                )
            })
    }
}

/// One request's place among those in flight; given back when dropped (also when the client
/// goes away and the request's future is dropped).
struct InFlight(Rc<Cell<usize>>);

impl InFlight {
    fn take(count: &Rc<Cell<usize>>, max: usize) -> Option<InFlight> {
        (count.get() < max).then(|| {
            count.set(count.get() + 1);
            InFlight(count.clone())
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// This server's vision URL for a device that reached the WebSocket port as `host` (its `Host`
/// header) on `local_ip`: the same host on the HTTP port (as the OTA answer derives the
/// WebSocket URL).
pub fn explain_url(
    host: Option<&str>,
    local_ip: Option<std::net::IpAddr>,
    http_port: u16,
) -> String {
    let host = super::ota::public_host(host, local_ip);
    format!("http://{host}:{http_port}/mcp/vision/explain")
}

/// The `question` text and the `file` bytes of a multipart body already in memory.
async fn parse_form(body: Bytes, boundary: String) -> Result<(String, Bytes), String> {
    let stream = futures_lite::stream::once(Ok::<Bytes, Infallible>(body));
    let mut form = multer::Multipart::new(stream, boundary);
    let (mut question, mut file) = (None, None);
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(format!("malformed multipart body: {e}")),
        };
        let name = field.name().map(str::to_string);
        let data = field
            .bytes()
            .await
            .map_err(|e| format!("malformed multipart body: {e}"))?;
        match name.as_deref() {
            Some("question") => {
                let mut q = String::from_utf8_lossy(&data).trim().to_string();
                crate::tools::truncate_utf8(&mut q, MAX_QUESTION_BYTES);
                question = Some(q);
            }
            Some("file") => file = Some(data),
            _ => {}
        }
    }
    let question = question
        .filter(|q| !q.is_empty())
        .ok_or("missing \"question\" part")?;
    let file = file
        .filter(|f| !f.is_empty())
        .ok_or("missing \"file\" part")?;
    Ok((question, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, &[u8])]) -> Bytes {
        let mut b = Vec::new();
        for (name, data) in parts {
            b.extend_from_slice(b"------ESP32_CAMERA_BOUNDARY\r\n");
            let disposition = if *name == "file" {
                "Content-Disposition: form-data; name=\"file\"; filename=\"camera.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".to_string()
            } else {
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n")
            };
            b.extend_from_slice(disposition.as_bytes());
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"------ESP32_CAMERA_BOUNDARY--\r\n");
        Bytes::from(b)
    }

    fn parse(body: Bytes) -> Result<(String, Bytes), String> {
        futures_lite::future::block_on(parse_form(body, "----ESP32_CAMERA_BOUNDARY".into()))
    }

    #[test]
    fn firmware_form_gives_question_and_file() {
        let jpeg: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, b'\r', b'\n', 0];
        let (q, f) = parse(form(&[
            ("question", "What is this?".as_bytes()),
            ("file", jpeg),
        ]))
        .unwrap();
        assert_eq!(q, "What is this?");
        assert_eq!(&f[..], jpeg);
    }

    #[test]
    fn missing_parts_and_garbage_are_errors() {
        assert!(parse(form(&[("file", b"x")]))
            .unwrap_err()
            .contains("question"));
        assert!(parse(form(&[("question", b"q")]))
            .unwrap_err()
            .contains("file"));
        assert!(parse(Bytes::from_static(b"not multipart at all")).is_err());
    }

    #[test]
    fn explain_url_uses_the_device_facing_host_and_the_http_port() {
        assert_eq!(
            explain_url(Some("voice.example:8000"), None, 8003),
            "http://voice.example:8003/mcp/vision/explain"
        );
        assert_eq!(
            explain_url(None, Some("10.1.2.3".parse().unwrap()), 80),
            "http://10.1.2.3:80/mcp/vision/explain"
        );
    }

    #[test]
    fn in_flight_places_are_bounded_and_given_back() {
        let count = Rc::new(Cell::new(0));
        let a = InFlight::take(&count, 2).unwrap();
        let b = InFlight::take(&count, 2).unwrap();
        assert!(InFlight::take(&count, 2).is_none());
        drop(a);
        assert!(InFlight::take(&count, 2).is_some());
        drop(b);
        assert_eq!(count.get(), 0);
    }

    #[test]
    fn counters_count_each_outcome() {
        let mut c = VisionCounters::default();
        c.count(VisionOutcome::Ok);
        c.count(VisionOutcome::TooLarge);
        c.count(VisionOutcome::TooLarge);
        let mut total = VisionCounters::default();
        total.merge(&c);
        let mut samples = Vec::new();
        crate::metrics::counters::Counters::samples(&total, &mut samples);
        let by_result: Vec<_> = samples.iter().map(|s| (s.label, s.value)).collect();
        assert_eq!(by_result[0], (Some(("result", "ok")), 1));
        assert_eq!(by_result[3], (Some(("result", "too_large")), 2));
    }
}
