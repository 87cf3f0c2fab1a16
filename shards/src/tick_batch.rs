//! A shard-local gatherer that turns many small jobs into one message per tick.
//!
//! Tasks on a shard push jobs ([`TickBatch::try_push`]); one flusher task waits until there is
//! something ([`TickBatch::ready`]), waits out the rest of the tick, and takes everything
//! gathered as one batch ([`TickBatch::take`]) to send across cores. The worker answers the
//! batch as a whole and the shard reports it ([`TickBatch::answered`]). So a shard pays one
//! cross-core send and one wake-up per tick instead of one per job, and an idle shard sends
//! nothing and does not wake.
//!
//! The bound counts jobs *outstanding*: gathered, or sent and not yet answered. Both ends are on
//! this shard, so the count needs no atomics, and it bounds what the shard has put on the
//! worker's queue as well as what waits here. Batches are answered in the order they were sent
//! (one worker per shard, FIFO), so an answer also settles every earlier batch whose answer was
//! lost (a dropped reply cannot leak its jobs' share of the bound for longer than one batch).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Jobs gathered on one shard between ticks, bounded by jobs outstanding.
pub struct TickBatch<J> {
    inner: RefCell<Inner<J>>,
}

struct Inner<J> {
    pending: Vec<J>,
    /// Batches sent and not yet answered: (sequence number, jobs), oldest first.
    sent: VecDeque<(u64, usize)>,
    outstanding: usize,
    capacity: usize,
    next_seq: u64,
    waker: Option<Waker>,
    refused: u64,
    removed: u64,
    batches: u64,
}

/// One tick's jobs, numbered for [`TickBatch::answered`].
#[derive(Debug)]
pub struct Batch<J> {
    /// Sequence number of the batch on its shard.
    pub seq: u64,
    /// The jobs, in the order they were pushed.
    pub jobs: Vec<J>,
}

impl<J> TickBatch<J> {
    /// An empty gatherer allowing `capacity` jobs outstanding.
    pub fn new(capacity: usize) -> Self {
        TickBatch {
            inner: RefCell::new(Inner {
                pending: Vec::new(),
                sent: VecDeque::new(),
                outstanding: 0,
                capacity: capacity.max(1),
                next_seq: 0,
                waker: None,
                refused: 0,
                removed: 0,
                batches: 0,
            }),
        }
    }

    /// Gathers `job` for the next tick, unless `capacity` jobs are outstanding (then it is
    /// handed back, and counted). Jobs for which `replaces(&pending)` holds are removed first
    /// (counted as removed): e.g. a stale job of the same key.
    pub fn try_push(&self, job: J, replaces: impl Fn(&J) -> bool) -> Result<(), J> {
        let mut inner = self.inner.borrow_mut();
        inner.remove_where(replaces);
        if inner.outstanding >= inner.capacity {
            inner.refused += 1;
            return Err(job);
        }
        inner.pending.push(job);
        inner.outstanding += 1;
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Removes the gathered (not yet sent) jobs for which `drop` holds; returns how many.
    pub fn remove(&self, drop: impl Fn(&J) -> bool) -> usize {
        self.inner.borrow_mut().remove_where(drop)
    }

    /// Completes when at least one job is gathered (one waiter: the flusher).
    pub async fn ready(&self) {
        poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if !inner.pending.is_empty() {
                return Poll::Ready(());
            }
            match &inner.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => inner.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Takes everything gathered as one numbered batch (`None` when nothing is gathered).
    pub fn take(&self) -> Option<Batch<J>> {
        let mut inner = self.inner.borrow_mut();
        if inner.pending.is_empty() {
            return None;
        }
        let jobs = std::mem::take(&mut inner.pending);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.sent.push_back((seq, jobs.len()));
        inner.batches += 1;
        Some(Batch { seq, jobs })
    }

    /// The batch could not be sent: its jobs go back in front of what was gathered since, and
    /// stay outstanding (the next tick sends them).
    pub fn unsent(&self, mut batch: Batch<J>) {
        let mut inner = self.inner.borrow_mut();
        if let Some(at) = inner.sent.iter().position(|(s, _)| *s == batch.seq) {
            inner.sent.remove(at);
        }
        inner.batches -= 1;
        batch.jobs.append(&mut inner.pending);
        inner.pending = batch.jobs;
    }

    /// Batch `seq` was answered: its jobs (and those of any earlier batch whose answer was
    /// lost) are no longer outstanding.
    pub fn answered(&self, seq: u64) {
        let mut inner = self.inner.borrow_mut();
        while let Some(&(s, n)) = inner.sent.front() {
            if s > seq {
                break;
            }
            inner.sent.pop_front();
            inner.outstanding = inner.outstanding.saturating_sub(n);
        }
    }

    /// Jobs gathered and not yet sent.
    pub fn pending(&self) -> usize {
        self.inner.borrow().pending.len()
    }

    /// Jobs gathered or sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.inner.borrow().outstanding
    }

    /// The bound on [`TickBatch::outstanding`].
    pub fn capacity(&self) -> usize {
        self.inner.borrow().capacity
    }

    /// Jobs refused because the bound was reached, since the start.
    pub fn refused(&self) -> u64 {
        self.inner.borrow().refused
    }

    /// Jobs removed before they were sent (replaced or withdrawn), since the start.
    pub fn removed(&self) -> u64 {
        self.inner.borrow().removed
    }

    /// Batches taken and sent, since the start.
    pub fn batches(&self) -> u64 {
        self.inner.borrow().batches
    }
}

impl<J> Inner<J> {
    fn remove_where(&mut self, drop: impl Fn(&J) -> bool) -> usize {
        let before = self.pending.len();
        self.pending.retain(|j| !drop(j));
        let n = before - self.pending.len();
        self.outstanding -= n;
        self.removed += n as u64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn jobs_of_a_tick_leave_as_one_batch_in_push_order() {
        let t = TickBatch::new(8);
        assert!(t.take().is_none(), "nothing gathered, nothing to send");
        for j in [1, 2, 3] {
            t.try_push(j, |_| false).unwrap();
        }
        block_on(t.ready());
        let b = t.take().expect("a batch");
        assert_eq!((b.seq, b.jobs), (0, vec![1, 2, 3]));
        assert_eq!(t.pending(), 0);
        assert_eq!(t.outstanding(), 3, "sent but unanswered jobs still count");
        t.answered(0);
        assert_eq!(t.outstanding(), 0);
        assert_eq!(t.batches(), 1);
    }

    #[test]
    fn the_bound_counts_sent_jobs_until_answered_and_an_answer_settles_lost_ones() {
        let t = TickBatch::new(3);
        t.try_push(1, |_| false).unwrap();
        t.try_push(2, |_| false).unwrap();
        let first = t.take().unwrap();
        t.try_push(3, |_| false).unwrap();
        assert_eq!(t.try_push(4, |_| false), Err(4), "3 outstanding: full");
        assert_eq!(t.refused(), 1);
        let second = t.take().unwrap();
        // The first batch's answer is lost; the second's settles both.
        t.answered(second.seq);
        assert_eq!(t.outstanding(), 0);
        t.answered(first.seq);
        assert_eq!(t.outstanding(), 0, "a late answer changes nothing");
        t.try_push(5, |_| false).unwrap();
        assert_eq!(t.outstanding(), 1);
    }

    #[test]
    fn a_replaced_or_withdrawn_job_is_removed_and_counted() {
        let t = TickBatch::new(8);
        t.try_push((1, "old"), |_| false).unwrap();
        t.try_push((2, "a"), |_| false).unwrap();
        t.try_push((1, "new"), |j| j.0 == 1).unwrap();
        assert_eq!(t.remove(|j| j.0 == 2), 1);
        assert_eq!(t.removed(), 2);
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.take().unwrap().jobs, vec![(1, "new")]);
    }

    #[test]
    fn an_unsent_batch_goes_back_in_front_and_stays_outstanding() {
        let t = TickBatch::new(8);
        t.try_push(1, |_| false).unwrap();
        let b = t.take().unwrap();
        t.try_push(2, |_| false).unwrap();
        t.unsent(b);
        assert_eq!(t.outstanding(), 2);
        assert_eq!(t.batches(), 0);
        let again = t.take().unwrap();
        assert_eq!(again.jobs, vec![1, 2]);
        t.answered(again.seq);
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn the_flusher_sleeps_while_nothing_is_gathered_and_wakes_on_the_first_job() {
        let t = TickBatch::new(8);
        let mut ready = Box::pin(t.ready());
        assert!(block_on(poll_once(&mut ready)).is_none(), "idle: not ready");
        t.try_push(7, |_| false).unwrap();
        assert!(block_on(poll_once(&mut ready)).is_some());
    }
}
