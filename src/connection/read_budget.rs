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
}
