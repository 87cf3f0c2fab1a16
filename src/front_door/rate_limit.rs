//! Rate per client address (new connections on the WebSocket port, requests on the HTTP port):
//! one token bucket per address, in a table each shard owns for each port (no cross-core state). The table has a fixed maximum size; when it is full the
//! bucket untouched for longest is evicted (a full bucket is what a fresh one would be, so
//! evicting the oldest is forgiving, never stricter).
//!
//! Because the kernel spreads connections over shards, an address may get up to
//! `burst × shards` at once and `rate × shards` per second across the instance.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Instant;

/// One address's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets by key (a client address; a device id for the vision endpoint), bounded.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_second: f64,
    burst: f64,
    max_addresses: usize,
    buckets: HashMap<K, Bucket>,
    evictions: u64,
}

/// Token buckets by client address.
pub type AddressRateLimiter = RateLimiter<IpAddr>;

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `per_second` refill, `burst` capacity, at most `max_addresses` tracked (≥ 1).
    pub fn new(per_second: f64, burst: u32, max_addresses: usize) -> Self {
        RateLimiter {
            per_second,
            burst: f64::from(burst.max(1)),
            max_addresses: max_addresses.max(1),
            buckets: HashMap::new(),
            evictions: 0,
        }
    }

    /// Takes one token for `key` at `now`; false means the connection or request is over the
    /// rate.
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_addresses {
            self.evict(now);
        }
        let (rate, burst) = (self.per_second, self.burst);
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets that have refilled completely (they carry no state), and if none has, the
    /// one untouched for longest. O(n), only when the table is full.
    fn evict(&mut self, now: Instant) {
        let (rate, burst) = (self.per_second, self.burst);
        let before = self.buckets.len();
        self.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
        });
        if self.buckets.len() == before {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(key, _)| key.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
        self.evictions += (before - self.buckets.len()) as u64;
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Buckets evicted because the table was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut l = AddressRateLimiter::new(2.0, 3, 100);
        assert!((0..3).all(|_| l.allow(ip(1), t0)));
        assert!(!l.allow(ip(1), t0));
        // Other addresses have their own bucket.
        assert!(l.allow(ip(2), t0));
        // 0.5 s at 2/s refills one token.
        assert!(l.allow(ip(1), t0 + Duration::from_millis(500)));
        assert!(!l.allow(ip(1), t0 + Duration::from_millis(500)));
    }

    #[test]
    fn table_stays_bounded_and_evicts_the_oldest() {
        let t0 = Instant::now();
        let mut l = AddressRateLimiter::new(0.001, 1, 2);
        assert!(l.allow(ip(1), t0));
        assert!(l.allow(ip(2), t0 + Duration::from_millis(1)));
        assert!(l.allow(ip(3), t0 + Duration::from_millis(2)));
        assert_eq!(l.len(), 2);
        assert_eq!(l.evictions(), 1);
        // ip(1) was evicted: it starts again with a full bucket.
        assert!(l.allow(ip(1), t0 + Duration::from_millis(3)));
        // ip(3) is still limited.
        assert!(!l.allow(ip(3), t0 + Duration::from_millis(4)));
    }
}
