//! The bench's glommio executors, with the server's guards against glommio 0.9 parking with
//! runnable tasks (`shards::threads` says how that happens): wake-up signals until the first
//! task ran, then a tick that bounds any later such sleep to 50 ms.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

/// Starts `main` on a new executor named `name` (512 KiB of io_uring memory, so it runs
/// without root; a 500 µs preemption timer).
pub fn spawn<T, F, Fut>(
    placement: Placement,
    name: &str,
    main: F,
) -> glommio::Result<ExecutorJoinHandle<T>, ()>
where
    T: 'static + Send,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let started = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&started);
    let handle = LocalExecutorBuilder::new(placement)
        .name(name)
        .io_memory(512 << 10)
        .preempt_timer(Duration::from_micros(500))
        .spawn(move || async move {
            flag.store(true, Ordering::Release);
            glommio::spawn_local(async {
                loop {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            })
            .detach();
            main().await
        })?;
    // glommio names the thread "<name>-<executor id>".
    shards::threads::wake_until_started(format!("{name}-"), started, Duration::from_secs(30));
    Ok(handle)
}
