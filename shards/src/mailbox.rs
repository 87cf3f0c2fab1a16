//! A bounded, shard-local, single-consumer inbox.
//!
//! One task owns the receiving side (it awaits [`Mailbox::recv`]); any task on the same shard
//! may push. Ordinary items respect the bound and are refused when it is reached, so a slow
//! consumer never grows memory; control items (drain, close) bypass the bound because there are
//! at most a handful of them. There is one waker slot, so polling never allocates.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// A bounded single-consumer queue living on one shard.
pub struct Mailbox<T> {
    inner: RefCell<Inner<T>>,
}

struct Inner<T> {
    queue: VecDeque<T>,
    capacity: usize,
    waker: Option<Waker>,
    closed: bool,
    refused: u64,
}

impl<T> Mailbox<T> {
    /// An empty mailbox holding at most `capacity` ordinary items.
    pub fn new(capacity: usize) -> Self {
        Mailbox {
            inner: RefCell::new(Inner {
                queue: VecDeque::new(),
                capacity: capacity.max(1),
                waker: None,
                closed: false,
                refused: 0,
            }),
        }
    }

    /// Queues `item` unless the mailbox is full or closed; gives it back otherwise.
    pub fn try_push(&self, item: T) -> Result<(), T> {
        let mut inner = self.inner.borrow_mut();
        if inner.closed || inner.queue.len() >= inner.capacity {
            inner.refused += 1;
            return Err(item);
        }
        inner.queue.push_back(item);
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Queues a control item regardless of the bound (not after close).
    pub fn push_control(&self, item: T) {
        let mut inner = self.inner.borrow_mut();
        if inner.closed {
            return;
        }
        inner.queue.push_back(item);
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
    }

    /// The next item; `None` once the mailbox is closed and empty.
    pub async fn recv(&self) -> Option<T> {
        poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if let Some(item) = inner.queue.pop_front() {
                return Poll::Ready(Some(item));
            }
            if inner.closed {
                return Poll::Ready(None);
            }
            match &inner.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => inner.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Refuses further pushes; queued items can still be received.
    pub fn close(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.closed = true;
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.inner.borrow().queue.len()
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Items refused so far because the mailbox was full or closed.
    pub fn refused(&self) -> u64 {
        self.inner.borrow().refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn full_mailbox_refuses_ordinary_items_but_takes_control_items() {
        let m = Mailbox::new(2);
        assert!(m.try_push(1).is_ok());
        assert!(m.try_push(2).is_ok());
        assert_eq!(m.try_push(3), Err(3));
        m.push_control(99);
        assert_eq!(m.refused(), 1);
        assert_eq!(block_on(m.recv()), Some(1));
        assert_eq!(block_on(m.recv()), Some(2));
        assert_eq!(block_on(m.recv()), Some(99));
    }

    #[test]
    fn closed_mailbox_drains_then_ends() {
        let m = Mailbox::new(4);
        m.try_push("a").unwrap();
        m.close();
        assert_eq!(m.try_push("b"), Err("b"));
        assert_eq!(block_on(m.recv()), Some("a"));
        assert_eq!(block_on(m.recv()), None);
    }
}
