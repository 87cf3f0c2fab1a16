//! Who sent a request on the HTTP port and whether to serve it, on one shard.
//!
//! The same rules as the WebSocket port, through [`crate::front_door`]: a PROXY header is read
//! only from trusted balancers and only when `server.http.proxy_protocol` is on (then they must
//! send it); the forwarded header `server.forwarded_header` is believed only from them. The
//! address found that way — the device's — is what the access log shows and what the request
//! rate is keyed on (`server.http.rate_limit`, 429). Requests whose address is itself a
//! trusted balancer (its health checks, which carry no device) are never rate-limited, so a
//! busy fleet cannot fail the balancer's probes. Open connections are bounded per shard
//! (`server.http.max_connections_per_shard`, 503).

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

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
        /// Addresses in the request-rate table (gauge).
        rate_limit_addresses: PerShard Gauge "xiaozhi_http_rate_limit_addresses"
            "Client addresses in a shard's HTTP request-rate table (bounded by http.rate_limit.max_addresses).",
        /// Connections answered 503 because the shard held its maximum.
        refused_full: Sum Counter "xiaozhi_http_refused_full_total"
            "HTTP connections refused because a shard held server.http.max_connections_per_shard (HTTP 503).",
        /// Requests answered 429 by the per-address rate.
        refused_rate_limited: Sum Counter "xiaozhi_http_refused_rate_limited_total"
            "HTTP requests refused by the per-address request rate (HTTP 429).",
        /// Connections from trusted balancers without a valid PROXY header (400).
        proxy_header_errors: Sum Counter "xiaozhi_http_proxy_header_errors_total"
            "HTTP-port connections from trusted balancers without a valid PROXY header (HTTP 400).",
        /// Request-rate buckets forgotten because the table was full.
        rate_limit_evictions: Sum Counter "xiaozhi_http_rate_limit_evictions_total"
            "HTTP request-rate buckets forgotten because a shard's table was full.",
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
    open: Cell<usize>,
    counters: Cell<HttpCounters>,
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
            open: Cell::new(0),
            counters: Cell::new(HttpCounters::default()),
        }
    }

    fn count(&self, f: impl FnOnce(&mut HttpCounters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    /// A place for a new connection, or `None` (counted) when the shard holds its maximum.
    pub fn open_connection(self: &Rc<Self>) -> Option<HttpConnectionSlot> {
        if self.open.get() >= self.max_connections {
            self.count(|c| c.refused_full += 1);
            return None;
        }
        self.open.set(self.open.get() + 1);
        Some(HttpConnectionSlot(self.clone()))
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
        let c = a.counters();
        assert_eq!((c.refused_full, c.connection_limit), (1, 2));
    }
}
