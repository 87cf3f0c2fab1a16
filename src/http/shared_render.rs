//! One `/metrics` render at a time per shard, shared by every request that waited for it.
//!
//! Rendering asks every shard for a snapshot and formats thousands of lines; 300 scrapers at
//! once must not mean 300 renders, nor 300 sets of snapshots on every shard. A request waits
//! for the render in progress to finish, then takes the newest text if that render *started
//! after it asked* (so a request never sees counters older than itself), or renders one for
//! itself and everyone queued behind it. A burst of N requests costs at most two renders, and
//! a lone scraper always gets fresh numbers (tests read a counter right after an action).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;

/// The newest render and the gate that lets one run at a time.
pub struct SharedRender {
    gate: glommio::sync::Semaphore,
    /// Renders started so far; a request notes it when it asks.
    started: Cell<u64>,
    /// The newest finished render: the number it had when it started, and its text.
    last: RefCell<Option<(u64, Rc<str>)>>,
    requests: Cell<u64>,
}

impl Default for SharedRender {
    fn default() -> Self {
        SharedRender {
            gate: glommio::sync::Semaphore::new(1),
            started: Cell::new(0),
            last: RefCell::new(None),
            requests: Cell::new(0),
        }
    }
}

impl std::fmt::Debug for SharedRender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRender")
            .field("renders", &self.started.get())
            .field("requests", &self.requests.get())
            .finish()
    }
}

impl SharedRender {
    /// A text no older than this call: a render that started after it, or `render()`'s.
    pub async fn get<Fut: Future<Output = String>>(&self, render: impl FnOnce() -> Fut) -> Rc<str> {
        self.requests.set(self.requests.get() + 1);
        let asked_after = self.started.get();
        // The semaphore is never closed, so acquiring cannot fail; if it somehow did, render
        // without the gate rather than refuse the scrape.
        let _permit = self.gate.acquire_permit(1).await.ok();
        if let Some((n, text)) = self.last.borrow().as_ref() {
            if *n > asked_after {
                return text.clone();
            }
        }
        let n = self.started.get() + 1;
        self.started.set(n);
        let text: Rc<str> = render().await.into();
        *self.last.borrow_mut() = Some((n, text.clone()));
        text
    }

    /// Renders run so far.
    pub fn renders(&self) -> u64 {
        self.started.get()
    }

    /// Requests served so far (rendered or shared).
    pub fn requests(&self) -> u64 {
        self.requests.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_requests_share_renders_and_a_later_one_gets_a_fresh_render() {
        glommio::LocalExecutor::default().run(async {
            let shared = Rc::new(SharedRender::default());
            let (release, released) = flume::unbounded::<()>();
            let tasks: Vec<_> = (0..10)
                .map(|_| {
                    let shared = shared.clone();
                    let released = released.clone();
                    glommio::spawn_local(async move {
                        let shared2 = shared.clone();
                        shared
                            .get(|| async move {
                                let n = shared2.renders();
                                let _ = released.recv_async().await;
                                format!("render {n}")
                            })
                            .await
                    })
                })
                .collect();
            // Let every task ask (the first renders and waits for its release).
            for _ in 0..20 {
                futures_lite::future::yield_now().await;
            }
            assert_eq!((shared.requests(), shared.renders()), (10, 1));
            for _ in 0..10 {
                let _ = release.send(());
            }
            let mut texts = Vec::new();
            for t in tasks {
                texts.push(t.await.to_string());
            }
            // The first asked before any render; the other nine asked while render 1 ran, so
            // they share render 2, which started after all of them.
            assert_eq!(texts[0], "render 1");
            assert!(texts[1..].iter().all(|t| t == "render 2"), "{texts:?}");
            assert_eq!(shared.renders(), 2);
            let later = shared.get(|| async { "render 3".to_string() }).await;
            assert_eq!(&*later, "render 3");
            assert_eq!((shared.requests(), shared.renders()), (11, 3));
        });
    }
}
