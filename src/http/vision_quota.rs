//! Per-device limits on `/mcp/vision/explain`, on one shard: photos one device has in hand at
//! once (`vision.max_in_flight_per_device`) and its request rate (`vision.per_device_per_minute`,
//! a token bucket of `vision.per_device_burst`). The shard-wide `vision.max_in_flight` bounds
//! memory; these keep one device (twelve slow uploads, or a loop of photo questions) from
//! taking every one of those places. The device is the one the vision token names, so these
//! apply after the token check. Both tables are bounded: in-flight entries go at zero, and the
//! rate table holds at most [`MAX_DEVICES`] buckets (the stalest is forgotten first).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use crate::front_door::rate_limit::RateLimiter;

/// Devices whose request rate one shard tracks.
pub const MAX_DEVICES: usize = 4096;

/// Why a device's request was refused (429).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// It already has this many requests in hand.
    InFlight(usize),
    /// Over its request rate.
    Rate,
}

/// The per-device limits of one shard's vision endpoint.
#[derive(Debug)]
pub struct VisionQuota {
    max_in_flight: usize,
    in_flight: RefCell<HashMap<String, usize>>,
    rate: RefCell<Option<RateLimiter<String>>>,
}

/// One request's place among its device's; given back when dropped.
#[derive(Debug)]
pub struct DeviceSlot {
    quota: Rc<VisionQuota>,
    device: String,
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        let mut table = self.quota.in_flight.borrow_mut();
        if let Some(n) = table.get_mut(&self.device) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.remove(&self.device);
            }
        }
    }
}

impl VisionQuota {
    /// At most `max_in_flight` (≥ 1) requests per device at once, and `per_minute` (0 = no
    /// limit) with bursts of `burst`.
    pub fn new(max_in_flight: usize, per_minute: f64, burst: u32) -> Self {
        VisionQuota {
            max_in_flight: max_in_flight.max(1),
            in_flight: RefCell::new(HashMap::new()),
            rate: RefCell::new(
                (per_minute > 0.0).then(|| RateLimiter::new(per_minute / 60.0, burst, MAX_DEVICES)),
            ),
        }
    }

    /// A place for `device`'s request at `now`, or why not. A request refused for being one
    /// too many in hand spends nothing from the rate.
    pub fn take(self: &Rc<Self>, device: &str, now: Instant) -> Result<DeviceSlot, QuotaRefusal> {
        let held = self.in_flight.borrow().get(device).copied().unwrap_or(0);
        if held >= self.max_in_flight {
            return Err(QuotaRefusal::InFlight(self.max_in_flight));
        }
        if let Some(rate) = self.rate.borrow_mut().as_mut() {
            if !rate.allow(device.to_string(), now) {
                return Err(QuotaRefusal::Rate);
            }
        }
        *self
            .in_flight
            .borrow_mut()
            .entry(device.to_string())
            .or_insert(0) += 1;
        Ok(DeviceSlot {
            quota: self.clone(),
            device: device.to_string(),
        })
    }

    /// Devices with requests in hand now.
    pub fn devices_in_flight(&self) -> usize {
        self.in_flight.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_device_holds_at_most_its_share_and_others_are_untouched() {
        let q = Rc::new(VisionQuota::new(2, 0.0, 1));
        let t = Instant::now();
        let a1 = q.take("a", t).expect("first");
        let _a2 = q.take("a", t).expect("second");
        assert_eq!(q.take("a", t).err(), Some(QuotaRefusal::InFlight(2)));
        assert!(q.take("b", t).is_ok());
        drop(a1);
        assert!(q.take("a", t).is_ok());
    }

    #[test]
    fn the_rate_refuses_beyond_the_burst_and_refills_per_minute() {
        let q = Rc::new(VisionQuota::new(10, 6.0, 2));
        let t = Instant::now();
        assert!(q.take("a", t).is_ok() && q.take("a", t).is_ok());
        assert_eq!(q.take("a", t).err(), Some(QuotaRefusal::Rate));
        assert!(q.take("b", t).is_ok());
        // 6 per minute: one token every 10 s.
        assert!(q.take("a", t + Duration::from_secs(10)).is_ok());
        // Slots were dropped at once: nothing stays in flight.
        assert_eq!(q.devices_in_flight(), 0);
    }
}
