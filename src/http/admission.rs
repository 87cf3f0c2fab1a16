//! Who sent a request on the HTTP port and whether to serve it, on one shard.
//!
//! The same rules as the WebSocket port, through [`crate::front_door`]: a PROXY header is read
//! only from trusted balancers and only when `server.http.proxy_protocol` is on (then they must
//! send it); the forwarded header `server.forwarded_header` is believed only from them. The
//! address found that way — the device's — is what the access log shows and what the request
//! rate is keyed on (`server.http.rate_limit`, 429). Requests whose address is itself a
//! trusted balancer (its health checks, which carry no device) are never rate-limited, so a
//! busy fleet cannot fail the balancer's probes.
//!
//! Connections are bounded three ways, so that idle sockets cannot take the port from anyone
//! else: each client address holds at most `server.http.max_connections_per_address` open
//! (waiting or served; 429 at accept; balancer addresses exempt), a connection waits at most
//! `server.http.head_timeout_ms` for its first complete request head (408), and only then
//! takes one of the shard's `server.http.max_connections_per_shard` places (503). Health and
//! readiness probes are answered even when no place is free (see [`super::serve_connection`]).
//! A served connection keeps its place only while it is used: it is closed when no request is
//! in progress for `server.http.keep_alive_idle_ms`, after
//! `server.http.max_requests_per_connection` requests, and at 60 s in any case.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hyper::HeaderMap;

use crate::config::{ForwardedHeader, ServerConfig};
use crate::front_door::peer::TrustedProxies;
use crate::front_door::proxy::Accept;
use crate::front_door::rate_limit::AddressRateLimiter;

crate::metrics::counters::counters! {
    /// The HTTP port's counters on one shard (plain numbers; snapshot by value).
    #[derive(Debug, Default, Clone, Copy)]
    pub struct HttpCounters {
        /// HTTP connections open now (gauge).
        connections: PerShard Gauge "xiaozhi_http_connections"
            "Open connections on a shard's HTTP port.",
        /// Most HTTP connections this shard holds (gauge).
        connection_limit: PerShard Gauge "xiaozhi_http_connection_limit"
            "Most HTTP connections a shard holds (server.http.max_connections_per_shard).",
        /// Connections that have not yet sent a complete first request head (gauge).
        connections_waiting: PerShard Gauge "xiaozhi_http_connections_waiting"
            "HTTP connections on a shard still waiting for their first complete request head (they take no place yet).",
        /// Client addresses holding connections now (gauge).
        connection_addresses: PerShard Gauge "xiaozhi_http_connection_addresses"
            "Client addresses with open HTTP connections on a shard (the per-address cap's table).",
        /// Addresses in the request-rate table (gauge).
        rate_limit_addresses: PerShard Gauge "xiaozhi_http_rate_limit_addresses"
            "Client addresses in a shard's HTTP request-rate table (bounded by http.rate_limit.max_addresses).",
        /// Connections answered 503 because the shard held its maximum.
        refused_full: Sum Counter "xiaozhi_http_refused_full_total"
            "HTTP connections refused because a shard held server.http.max_connections_per_shard (HTTP 503).",
        /// Connections answered 429 at accept: their address held its maximum of connections.
        refused_per_address: Sum Counter "xiaozhi_http_refused_per_address_total"
            "HTTP connections refused because their address held server.http.max_connections_per_address (HTTP 429).",
        /// Connections closed without a complete first head in time (408).
        head_timeouts: Sum Counter "xiaozhi_http_head_timeouts_total"
            "HTTP connections closed because no complete request head came within server.http.head_timeout_ms (HTTP 408).",
        /// Kept-alive connections closed for having no request in progress for too long.
        keep_alive_idle_closed: Sum Counter "xiaozhi_http_keep_alive_idle_closed_total"
            "HTTP connections closed after a request because no further one came within server.http.keep_alive_idle_ms.",
        /// Connections closed after their last allowed request.
        request_cap_closed: Sum Counter "xiaozhi_http_request_cap_closed_total"
            "HTTP connections closed after server.http.max_requests_per_connection requests (answered with Connection: close).",
        /// First request heads that were malformed or too large (400 / 431).
        bad_heads: Sum Counter "xiaozhi_http_bad_heads_total"
            "HTTP connections whose first request head was malformed or too large (HTTP 400/431).",
        /// Health or readiness probes answered while the shard held its maximum.
        health_over_budget: Sum Counter "xiaozhi_http_health_over_budget_total"
            "GET /healthz or /readyz answered while a shard held its maximum of HTTP connections (answered, then closed).",
        /// Requests answered 429 by the per-address rate.
        refused_rate_limited: Sum Counter "xiaozhi_http_refused_rate_limited_total"
            "HTTP requests refused by the per-address request rate (HTTP 429).",
        /// Connections from trusted balancers without a valid PROXY header (400).
        proxy_header_errors: Sum Counter "xiaozhi_http_proxy_header_errors_total"
            "HTTP-port connections from trusted balancers without a valid PROXY header (HTTP 400).",
        /// Request-rate buckets forgotten because the table was full.
        rate_limit_evictions: Sum Counter "xiaozhi_http_rate_limit_evictions_total"
            "HTTP request-rate buckets forgotten because a shard's table was full.",
        /// `GET /metrics` requests answered.
        metrics_requests: Sum Counter "xiaozhi_http_metrics_requests_total"
            "GET /metrics requests answered (each shares a render that started after it asked).",
        /// `/metrics` texts rendered (one at a time per shard, shared by waiting requests).
        metrics_renders: Sum Counter "xiaozhi_http_metrics_renders_total"
            "/metrics texts rendered; concurrent scrapes share one, so this grows slower than the requests under load.",
    }
}

/// The HTTP port's admission state on one shard.
#[derive(Debug)]
pub struct HttpAdmission {
    trusted: TrustedProxies,
    forwarded_header: ForwardedHeader,
    proxy: Option<Accept>,
    limiter: RefCell<Option<AddressRateLimiter>>,
    retry_after_s: u64,
    max_connections: usize,
    max_per_address: usize,
    head_timeout: Duration,
    keep_alive_idle: Duration,
    max_requests: u32,
    open: Cell<usize>,
    waiting: Cell<usize>,
    /// Open connections (waiting or served) per client address; an entry goes at zero, so the
    /// table is never larger than the number of open sockets.
    per_address: RefCell<HashMap<IpAddr, usize>>,
    counters: Cell<HttpCounters>,
}

/// A connection's hold on its client address's share of the shard; dropping it frees it.
/// Balancer addresses hold an empty one (they are not capped).
#[derive(Debug)]
pub struct AddressSlot {
    admission: Rc<HttpAdmission>,
    ip: Option<IpAddr>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut table = self.admission.per_address.borrow_mut();
        if let Some(n) = table.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.remove(&ip);
            }
        }
    }
}

/// A connection waiting for its first complete request head (counted in a gauge).
#[derive(Debug)]
pub struct WaitingForHead(Rc<HttpAdmission>);

impl Drop for WaitingForHead {
    fn drop(&mut self) {
        self.0.waiting.set(self.0.waiting.get().saturating_sub(1));
    }
}

/// An open connection's place in its shard's budget; dropping it frees the place.
#[derive(Debug)]
pub struct HttpConnectionSlot(Rc<HttpAdmission>);

impl Drop for HttpConnectionSlot {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get().saturating_sub(1));
    }
}

impl HttpAdmission {
    /// From the server settings.
    pub fn new(s: &ServerConfig) -> Self {
        let rl = &s.http.rate_limit;
        HttpAdmission {
            trusted: s.trusted_proxies.clone(),
            forwarded_header: s.forwarded_header,
            proxy: s.http.proxy_protocol.accept(),
            limiter: RefCell::new((rl.per_address_per_s > 0.0).then(|| {
                AddressRateLimiter::new(rl.per_address_per_s, rl.burst, rl.max_addresses)
            })),
            retry_after_s: if rl.per_address_per_s > 0.0 {
                (1.0 / rl.per_address_per_s).ceil().clamp(1.0, 3600.0) as u64
            } else {
                1
            },
            max_connections: s.http.max_connections_per_shard.max(1),
            max_per_address: s.http.max_connections_per_address,
            head_timeout: Duration::from_millis(s.http.head_timeout_ms),
            keep_alive_idle: Duration::from_millis(s.http.keep_alive_idle_ms),
            max_requests: s.http.max_requests_per_connection.max(1),
            open: Cell::new(0),
            waiting: Cell::new(0),
            per_address: RefCell::new(HashMap::new()),
            counters: Cell::new(HttpCounters::default()),
        }
    }

    fn count(&self, f: impl FnOnce(&mut HttpCounters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    /// A place for a connection that has sent its first request head, or `None` when the
    /// shard holds its maximum (not counted here: the caller says which answer it gave, a
    /// refusal or a health probe answered anyway).
    pub fn open_connection(self: &Rc<Self>) -> Option<HttpConnectionSlot> {
        if self.open.get() >= self.max_connections {
            return None;
        }
        self.open.set(self.open.get() + 1);
        Some(HttpConnectionSlot(self.clone()))
    }

    /// Counts a request refused (503) because the shard held its maximum.
    pub fn refused_full(&self) {
        self.count(|c| c.refused_full += 1);
    }

    /// Counts a health or readiness probe answered although the shard held its maximum.
    pub fn health_over_budget(&self) {
        self.count(|c| c.health_over_budget += 1);
    }

    /// A share of `client`'s connections for a new one, or `None` (counted) when that address
    /// already holds `server.http.max_connections_per_address`. Trusted balancers are exempt.
    pub fn open_from(self: &Rc<Self>, client: IpAddr) -> Option<AddressSlot> {
        if self.max_per_address == 0 || self.trusted.contains(client) {
            return Some(AddressSlot {
                admission: self.clone(),
                ip: None,
            });
        }
        let mut table = self.per_address.borrow_mut();
        let n = table.entry(client).or_insert(0);
        if *n >= self.max_per_address {
            drop(table);
            self.count(|c| c.refused_per_address += 1);
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            admission: self.clone(),
            ip: Some(client),
        })
    }

    /// Marks a connection as waiting for its first request head until the guard drops.
    pub fn waiting_for_head(self: &Rc<Self>) -> WaitingForHead {
        self.waiting.set(self.waiting.get() + 1);
        WaitingForHead(self.clone())
    }

    /// Counts a connection closed for sending no complete head in time.
    pub fn head_timed_out(&self) {
        self.count(|c| c.head_timeouts += 1);
    }

    /// Counts a connection whose first head was malformed or too large.
    pub fn bad_head(&self) {
        self.count(|c| c.bad_heads += 1);
    }

    /// Time a new connection has to send its first complete head (and a PROXY header).
    pub fn head_timeout(&self) -> Duration {
        self.head_timeout
    }

    /// How long a kept-alive connection may wait for its next request.
    pub fn keep_alive_idle(&self) -> Duration {
        self.keep_alive_idle
    }

    /// Requests one connection may carry.
    pub fn max_requests(&self) -> u32 {
        self.max_requests
    }

    /// Counts a kept-alive connection closed for idling.
    pub fn keep_alive_idle_closed(&self) {
        self.count(|c| c.keep_alive_idle_closed += 1);
    }

    /// Counts a connection closed after its last allowed request.
    pub fn request_cap_closed(&self) {
        self.count(|c| c.request_cap_closed += 1);
    }

    /// Most connections this shard holds.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The PROXY header versions to read from `peer`: `None` unless the port expects one and
    /// the peer is a trusted balancer (anyone else is a direct client).
    pub fn proxy_header_from(&self, peer: IpAddr) -> Option<Accept> {
        self.proxy.filter(|_| self.trusted.contains(peer))
    }

    /// Counts a trusted balancer's connection that came without a valid PROXY header.
    pub fn proxy_header_error(&self) {
        self.count(|c| c.proxy_header_errors += 1);
    }

    /// The address a request comes from: the device a trusted `connection_client` (the TCP
    /// peer, or the PROXY header's source) names in the forwarded header, else that client.
    pub fn client_address(&self, connection_client: IpAddr, headers: &HeaderMap) -> IpAddr {
        let x_real_ip = headers
            .get("x-real-ip")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let lines: Vec<_> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        let x_forwarded_for = (!lines.is_empty()).then(|| lines.join(", "));
        self.trusted
            .forwarded(
                self.forwarded_header,
                connection_client,
                x_real_ip.as_deref(),
                x_forwarded_for.as_deref(),
            )
            .unwrap_or(connection_client)
    }

    /// Takes a token from `client`'s bucket at `now`; false (counted) means answer 429. A
    /// trusted balancer's own requests (health checks) are exempt.
    pub fn allow_request(&self, client: IpAddr, now: Instant) -> bool {
        if self.trusted.contains(client) {
            return true;
        }
        let allowed = match self.limiter.borrow_mut().as_mut() {
            Some(l) => l.allow(client, now),
            None => true,
        };
        if !allowed {
            self.count(|c| c.refused_rate_limited += 1);
        }
        allowed
    }

    /// Seconds a rate-limited client should wait (one token's refill time).
    pub fn retry_after_s(&self) -> u64 {
        self.retry_after_s
    }

    /// This shard's HTTP counters now.
    pub fn counters(&self) -> HttpCounters {
        let mut c = self.counters.get();
        c.connections = self.open.get() as u64;
        c.connection_limit = self.max_connections as u64;
        c.connections_waiting = self.waiting.get() as u64;
        c.connection_addresses = self.per_address.borrow().len() as u64;
        if let Some(l) = self.limiter.borrow().as_ref() {
            c.rate_limit_addresses = l.len() as u64;
            c.rate_limit_evictions = l.evictions();
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HttpPortConfig, ProxyProtocol, RateLimitConfig};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn admission(header: ForwardedHeader) -> Rc<HttpAdmission> {
        let s = ServerConfig {
            trusted_proxies: TrustedProxies::parse(&["10.0.0.9".into()]).unwrap(),
            forwarded_header: header,
            http: HttpPortConfig {
                proxy_protocol: ProxyProtocol::V2,
                max_connections_per_shard: 2,
                max_connections_per_address: 2,
                head_timeout_ms: 1000,
                keep_alive_idle_ms: 1000,
                max_requests_per_connection: 10,
                rate_limit: RateLimitConfig {
                    per_address_per_s: 0.5,
                    burst: 2,
                    max_addresses: 16,
                },
            },
            ..ServerConfig::default()
        };
        Rc::new(HttpAdmission::new(&s))
    }

    fn xff(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", value.parse().unwrap());
        h
    }

    #[test]
    fn only_a_trusted_balancer_names_the_client_and_must_send_a_proxy_header() {
        let a = admission(ForwardedHeader::XForwardedFor);
        let h = xff("6.6.6.6, 203.0.113.5");
        assert_eq!(a.client_address(ip("10.0.0.9"), &h), ip("203.0.113.5"));
        assert_eq!(a.client_address(ip("192.0.2.4"), &h), ip("192.0.2.4"));
        assert_eq!(
            a.client_address(ip("10.0.0.9"), &HeaderMap::new()),
            ip("10.0.0.9")
        );
        assert_eq!(a.proxy_header_from(ip("10.0.0.9")), Some(Accept::V2));
        assert_eq!(a.proxy_header_from(ip("192.0.2.4")), None);
        let off = admission(ForwardedHeader::Off);
        assert_eq!(off.client_address(ip("10.0.0.9"), &h), ip("10.0.0.9"));
    }

    #[test]
    fn addresses_are_limited_apart_and_the_balancer_never() {
        let a = admission(ForwardedHeader::XForwardedFor);
        let t0 = Instant::now();
        let (dev_a, dev_b) = (ip("203.0.113.5"), ip("203.0.113.6"));
        assert!(a.allow_request(dev_a, t0) && a.allow_request(dev_a, t0));
        assert!(!a.allow_request(dev_a, t0));
        assert!(a.allow_request(dev_b, t0));
        assert!((0..100).all(|_| a.allow_request(ip("10.0.0.9"), t0)));
        let c = a.counters();
        assert_eq!((c.refused_rate_limited, c.rate_limit_addresses), (1, 2));
        assert_eq!(a.retry_after_s(), 2);
    }

    #[test]
    fn connection_budget_refuses_beyond_the_limit_and_frees_on_drop() {
        let a = admission(ForwardedHeader::Off);
        let first = a.open_connection();
        let second = a.open_connection();
        assert!(first.is_some() && second.is_some());
        assert!(a.open_connection().is_none());
        assert_eq!(a.counters().connections, 2);
        drop(first);
        assert!(a.open_connection().is_some());
        assert_eq!(a.counters().connection_limit, 2);
    }

    #[test]
    fn each_address_holds_at_most_its_cap_and_the_balancer_is_exempt() {
        let a = admission(ForwardedHeader::Off);
        let (dev_a, dev_b) = (ip("203.0.113.5"), ip("203.0.113.6"));
        let held: Vec<_> = (0..2).map(|_| a.open_from(dev_a)).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(a.open_from(dev_a).is_none());
        assert!(a.open_from(dev_b).is_some());
        let balancer: Vec<_> = (0..10).map(|_| a.open_from(ip("10.0.0.9"))).collect();
        assert!(balancer.iter().all(Option::is_some));
        let c = a.counters();
        assert_eq!((c.refused_per_address, c.connection_addresses), (1, 1));
        drop(held);
        // Freed places leave no entry behind: the table is bounded by the open sockets.
        assert_eq!(a.counters().connection_addresses, 0);
        assert!(a.open_from(dev_a).is_some());
    }

    #[test]
    fn waiting_connections_are_a_gauge_not_a_place() {
        let a = admission(ForwardedHeader::Off);
        let waiting: Vec<_> = (0..5).map(|_| a.waiting_for_head()).collect();
        assert_eq!(a.counters().connections_waiting, 5);
        assert!(a.open_connection().is_some());
        drop(waiting);
        assert_eq!(a.counters().connections_waiting, 0);
    }
}
