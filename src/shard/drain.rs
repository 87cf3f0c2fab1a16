//! Graceful drain as a type: not ready → a delay while the balancer notices → stop accepting
//! → tell every session the deadline → done when the last session is gone.
//!
//! Completion is woken by the drop of the last [`SessionSlot`](super::SessionSlot), never
//! polled: [`Drain::session_closed`] is called from that drop and wakes the task waiting in
//! [`Drain::sessions_gone`]. A session that ignores its deadline is cut off
//! [`HARD_STOP_AFTER`] past it, so a shard always finishes draining.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use shards::Control;

use super::{peers, Shard, ShardRequest};
use crate::http::Readiness;
use crate::session::SessionEvent;

/// How long after the grace deadline a shard stops waiting for sessions (close handshakes).
pub const HARD_STOP_AFTER: Duration = Duration::from_secs(2);

/// A shard's drain state: readiness for the balancer, the deadline once draining, and the
/// waker of whoever waits for the last session.
#[derive(Debug)]
pub struct Drain {
    ready: Rc<Cell<Readiness>>,
    deadline: Cell<Option<Instant>>,
    last_session_gone: RefCell<Option<Waker>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            ready: Rc::new(Cell::new(Readiness::Starting)),
            deadline: Cell::new(None),
            last_session_gone: RefCell::new(None),
        }
    }
}

impl Drain {
    /// The readiness `/readyz` reads.
    pub fn ready_flag(&self) -> Rc<Cell<Readiness>> {
        self.ready.clone()
    }

    /// Every shard of the process listens: ready, unless a drain began meanwhile.
    pub fn all_shards_listening(&self) {
        if self.ready.get() == Readiness::Starting {
            self.ready.set(Readiness::Ready);
        }
    }

    /// Step 1: not ready, so the balancer's health check takes the instance out of rotation.
    pub fn not_ready(&self) {
        self.ready.set(Readiness::Draining);
    }

    /// Step 2: from now on no session is admitted, and open ones must finish by `deadline`.
    pub fn stop_accepting(&self, deadline: Instant) {
        self.deadline.set(Some(deadline));
    }

    /// The deadline for in-flight answers, once the shard stopped accepting.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.get()
    }

    /// A session ended and `open` remain: wakes [`Drain::sessions_gone`] when none do.
    pub fn session_closed(&self, open: usize) {
        if open == 0 {
            if let Some(w) = self.last_session_gone.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Completes when `open()` is 0, woken by [`Drain::session_closed`].
    pub async fn sessions_gone(&self, open: impl Fn() -> usize) {
        poll_fn(|cx| {
            if open() == 0 {
                return Poll::Ready(());
            }
            let mut slot = self.last_session_gone.borrow_mut();
            match &*slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }
}

/// Runs the drain steps on `shard`. `accepts` are the device ports' accept loops (WebSocket,
/// MQTT; stopped at step 2, when MQTT connections without a session close too); `control` keeps being answered throughout (stats for `/metrics`, repeated drains
/// ignored), so a draining shard still reports.
pub async fn drain(
    shard: &Rc<Shard>,
    accepts: Vec<glommio::Task<()>>,
    control: &flume::Receiver<Control<ShardRequest>>,
) {
    let control_during_drain = || async {
        while let Ok(msg) = control.recv_async().await {
            if let Control::User(request) = msg {
                peers::answer(shard, request);
            }
        }
    };

    // Step 1: not ready; keep accepting for `delay_ms` so devices the balancer still sends
    // meanwhile are served.
    shard.drain.not_ready();
    let delay = Duration::from_millis(shard.config.server.drain.delay_ms);
    tracing::info!(
        shard = shard.id,
        delay_ms = delay.as_millis() as u64,
        "not ready; still accepting until the drain delay ends"
    );
    if !delay.is_zero() {
        futures_lite::future::or(glommio::timer::sleep(delay), async {
            control_during_drain().await;
            // The control channel is gone: nobody waits for us; still honour the delay.
            glommio::timer::sleep(delay).await
        })
        .await;
    }

    // Step 2: stop accepting new devices, tell sessions the deadline, wait for the last one.
    let grace = Duration::from_millis(shard.config.server.drain.grace_ms);
    let deadline = Instant::now() + grace;
    shard.drain.stop_accepting(deadline);
    drop(accepts);
    if let Some(mqtt) = shard.mqtt.borrow().as_ref() {
        mqtt.drain();
    }
    tracing::info!(
        shard = shard.id,
        sessions = shard.session_count(),
        grace_ms = grace.as_millis() as u64,
        "draining"
    );
    for m in shard.mailboxes() {
        m.push_control(SessionEvent::Drain { deadline });
    }
    // Sessions close themselves by the deadline; allow a little extra for close handshakes.
    let hard_stop = (deadline + HARD_STOP_AFTER).saturating_duration_since(Instant::now());
    let sessions_gone = futures_lite::future::or(
        shard.drain.sessions_gone(|| shard.session_count()),
        glommio::timer::sleep(hard_stop),
    );
    futures_lite::future::or(sessions_gone, control_during_drain()).await;
    tracing::info!(shard = shard.id, left = shard.session_count(), "drained");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Wake};

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn drain_completes_when_the_last_session_closes_woken_not_polled() {
        let drain = Drain::default();
        let open = Cell::new(2usize);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut gone = std::pin::pin!(drain.sessions_gone(|| open.get()));
        assert!(gone.as_mut().poll(&mut cx).is_pending());
        open.set(1);
        drain.session_closed(1);
        assert!(
            !flag.0.load(Ordering::SeqCst),
            "one session left: no wake-up"
        );
        open.set(0);
        drain.session_closed(0);
        assert!(
            flag.0.load(Ordering::SeqCst),
            "the last close wakes the drain"
        );
        assert!(gone.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn starting_until_every_shard_listens_and_a_drain_is_never_undone() {
        let drain = Drain::default();
        let ready = drain.ready_flag();
        assert_eq!(ready.get(), Readiness::Starting);
        drain.all_shards_listening();
        assert_eq!(ready.get(), Readiness::Ready);
        // A drain that began before the last shard came up stays a drain.
        let early = Drain::default();
        early.not_ready();
        early.all_shards_listening();
        assert_eq!(early.ready_flag().get(), Readiness::Draining);
    }

    #[test]
    fn draining_is_not_ready_then_refuses_after_the_delay() {
        let drain = Drain::default();
        let ready = drain.ready_flag();
        drain.all_shards_listening();
        assert!(ready.get() == Readiness::Ready && drain.deadline().is_none());
        drain.not_ready();
        assert_eq!(ready.get(), Readiness::Draining);
        assert!(
            drain.deadline().is_none(),
            "still accepting during the delay"
        );
        let deadline = Instant::now();
        drain.stop_accepting(deadline);
        assert_eq!(drain.deadline(), Some(deadline));
    }
}
