//! A connection's read budget: how many wake-ups in a row a driver may handle before it lets
//! the other devices on its shard run.
//!
//! A glommio task keeps its core until it returns `Pending`. A device whose socket always has
//! another frame buffered (a flood of pings, tiny frames or unknown messages) would otherwise
//! be served frame after frame while every other session on the shard waits: 20,000 pings
//! from one connection delayed others by up to 242 ms. With the budget, after
//! `server.read_budget_messages` wake-ups that were ready at once, the driver yields (it goes
//! to the back of its task queue), so one device delays another by at most one budget's worth
//! of frames. A wake-up that had to wait (the socket was drained) starts the count again.

use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};

/// Counts wake-ups that were ready at once and yields when the budget is spent.
#[derive(Debug, Clone)]
pub struct ReadBudget {
    limit: u32,
    ready_in_a_row: u32,
}

impl ReadBudget {
    /// A budget of `limit` ready wake-ups in a row (at least 1).
    pub fn new(limit: u32) -> Self {
        ReadBudget {
            limit: limit.max(1),
            ready_in_a_row: 0,
        }
    }

    /// Waits for `wake`. When it was ready at once for the `limit`-th time in a row, yields
    /// to the shard's other tasks before returning; the flag says whether it did.
    pub async fn next<F: Future>(&mut self, wake: F) -> (F::Output, bool) {
        let mut wake = pin!(wake);
        match futures_lite::future::poll_once(wake.as_mut()).await {
            Some(out) => {
                self.ready_in_a_row += 1;
                if self.ready_in_a_row >= self.limit {
                    self.ready_in_a_row = 0;
                    futures_lite::future::yield_now().await;
                    return (out, true);
                }
                (out, false)
            }
            None => {
                self.ready_in_a_row = 0;
                (wake.await, false)
            }
        }
    }
}

/// A connection's inbound rate: token buckets over the messages and the bytes a device sends.
///
/// The read budget bounds how long one device holds its core *in one go*; this bounds what it
/// takes *over time*. A device streams ~17 audio frames (~2 KB) a second plus a few JSON
/// messages; a buggy or hostile one can send frames or 60 KB IoT documents as fast as the
/// socket takes them, and every one is read, framed and parsed on the shard its neighbours
/// share (one such connection took ~60 % of a shard core in the neighbour bench). When either
/// bucket is empty the driver stops reading that socket until it has refilled: TCP flow control
/// then slows the sender, nothing is dropped, and the session's timers and answers go on. The
/// defaults (`server.inbound_*`) are several times what a real device sends, bursts included.
#[derive(Debug, Clone)]
pub struct InboundRate {
    messages: Bucket,
    bytes: Bucket,
}

#[derive(Debug, Clone)]
struct Bucket {
    per_s: f64,
    burst: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_s: f64, burst: f64, now: Instant) -> Bucket {
        let per_s = per_s.max(f64::MIN_POSITIVE);
        let burst = burst.max(1.0);
        Bucket {
            per_s,
            burst,
            level: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.per_s).min(self.burst);
        self.at = now;
    }

    /// Time until the level is back to zero (none when it is not below).
    fn deficit(&self) -> Option<Duration> {
        (self.level < 0.0).then(|| Duration::from_secs_f64(-self.level / self.per_s))
    }
}

impl InboundRate {
    /// Buckets of `messages_per_s` (burst `messages_burst`) and `bytes_per_s` (burst
    /// `bytes_burst`), both full.
    pub fn new(
        messages_per_s: f64,
        messages_burst: f64,
        bytes_per_s: f64,
        bytes_burst: f64,
        now: Instant,
    ) -> Self {
        InboundRate {
            messages: Bucket::new(messages_per_s, messages_burst, now),
            bytes: Bucket::new(bytes_per_s, bytes_burst, now),
        }
    }

    /// Accounts one input of `bytes` read at `now` (the level may go below zero: the size of
    /// a message is known only once it is read).
    pub fn take(&mut self, bytes: usize, now: Instant) {
        self.messages.refill(now);
        self.bytes.refill(now);
        self.messages.level -= 1.0;
        self.bytes.level -= bytes as f64;
    }

    /// How long to wait before reading again: `None` when both buckets are at or above zero.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.messages.refill(now);
        self.bytes.refill(now);
        match (self.messages.deficit(), self.bytes.deficit()) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or_default().max(b.unwrap_or_default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn an_always_ready_source_lets_another_task_run_after_one_budget() {
        glommio::LocalExecutor::default().run(async {
            let iteration = Rc::new(Cell::new(None));
            let go = Rc::new(Cell::new(false));
            let other_ran_at = Rc::new(Cell::new(None));
            // Another session: runnable the whole time, it notes the iteration it got to run at.
            let other = glommio::spawn_local({
                let (iteration, go, ran) = (iteration.clone(), go.clone(), other_ran_at.clone());
                async move {
                    while !go.get() {
                        futures_lite::future::yield_now().await;
                    }
                    ran.set(iteration.get());
                }
            });
            // Let it start and wait.
            for _ in 0..3 {
                futures_lite::future::yield_now().await;
            }
            go.set(true);
            let mut budget = ReadBudget::new(8);
            let mut yields = 0;
            for i in 0..100u32 {
                iteration.set(Some(i));
                let ((), yielded) = budget.next(std::future::ready(())).await;
                yields += u32::from(yielded);
            }
            other.await;
            // It ran while the 8th ready wake-up was being handled, not after all 100.
            assert_eq!(other_ran_at.get(), Some(7));
            assert_eq!(yields, 12);
        });
    }

    #[test]
    fn a_wake_up_that_waited_starts_the_count_again() {
        glommio::LocalExecutor::default().run(async {
            let mut budget = ReadBudget::new(3);
            let ready = || std::future::ready(());
            assert!(!budget.next(ready()).await.1);
            assert!(!budget.next(ready()).await.1);
            // Pending once, then ready: a drained socket.
            let mut polled = false;
            let waits = std::future::poll_fn(|cx| {
                if polled {
                    std::task::Poll::Ready(())
                } else {
                    polled = true;
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                }
            });
            assert!(!budget.next(waits).await.1);
            assert!(!budget.next(ready()).await.1);
            assert!(!budget.next(ready()).await.1);
            assert!(budget.next(ready()).await.1);
        });
    }

    #[test]
    fn a_device_within_its_rate_never_waits_and_a_flood_waits_for_the_refill() {
        let t0 = Instant::now();
        let mut rate = InboundRate::new(100.0, 400.0, 65536.0, 524_288.0, t0);
        // A real device: 17 frames of 120 bytes and a JSON message a second, for a minute.
        for i in 0..60 * 18 {
            let now = t0 + Duration::from_millis(i * 1000 / 18);
            assert_eq!(rate.wait(now), None, "frame {i}");
            rate.take(120, now);
        }
        // A burst of 400 messages at once is allowed; the next read waits 1/100 s per message.
        let t1 = t0 + Duration::from_secs(120);
        for _ in 0..401 {
            assert_eq!(rate.wait(t1), None);
            rate.take(10, t1);
        }
        let w = rate.wait(t1).expect("over the message burst");
        assert!(
            w > Duration::from_millis(9) && w <= Duration::from_millis(11),
            "{w:?}"
        );
        assert_eq!(rate.wait(t1 + w), None);
        // Bytes: a 1 MiB message puts the byte bucket 512 KiB under: 8 s at 64 KiB/s.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(rate.wait(t2), None);
        rate.take(1 << 20, t2);
        let w = rate.wait(t2).expect("over the byte burst");
        assert!((w.as_secs_f64() - 8.0).abs() < 0.01, "{w:?}");
    }
}
