//! Pinned glommio shards: one executor per shard core, a control channel into each, and a
//! watchdog tick per shard.
//!
//! A shard is started with a closure that builds its main future inside the executor thread,
//! so everything it creates (`Rc`, `RefCell`, sockets) stays on that core. Other threads reach
//! a shard only through [`ShardMesh`], which carries [`Control`] messages over bounded flume
//! channels.

use std::future::Future;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

/// A message to one shard from another thread or shard.
pub enum Control<U> {
    /// Stop accepting, finish what is in flight within the grace period, then return.
    Drain,
    /// An application-defined request (e.g. "send me a metrics snapshot").
    User(U),
}

/// Executor settings shared by every shard.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    /// io_uring registered buffer size per executor, bytes (512 KiB runs without root).
    pub io_memory: usize,
    /// How long a running task may keep the core before glommio asks it to yield.
    pub preempt_timer: Duration,
    /// Watchdog tick period: wakes the executor even if a cross-core wake-up is lost.
    pub tick: Duration,
    /// Thread name prefix ("shard" gives shard0, shard1, …).
    pub name_prefix: String,
    /// Bound of each shard's control channel.
    pub control_capacity: usize,
    /// How long [`start_shards`] waits for every executor to come up before it gives up and
    /// reports where the missing ones are stuck.
    pub start_timeout: Duration,
}

impl Default for ShardSettings {
    fn default() -> Self {
        ShardSettings {
            io_memory: 512 << 10,
            preempt_timer: Duration::from_micros(500),
            tick: Duration::from_millis(50),
            name_prefix: "shard".into(),
            control_capacity: 256,
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// The senders into every shard's control channel; cheap to clone, `Send`.
pub struct ShardMesh<U> {
    senders: Vec<flume::Sender<Control<U>>>,
}

impl<U> Clone for ShardMesh<U> {
    fn clone(&self) -> Self {
        ShardMesh {
            senders: self.senders.clone(),
        }
    }
}

impl<U> ShardMesh<U> {
    /// Number of shards.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// True when there are no shards.
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Sends without blocking; gives the message back if that shard's channel is full or gone.
    pub fn try_send(&self, shard: usize, msg: Control<U>) -> Result<(), Control<U>> {
        match self.senders.get(shard) {
            Some(tx) => tx.try_send(msg).map_err(|e| e.into_inner()),
            None => Err(msg),
        }
    }

    /// Sends `msg()` to every shard, waiting while a control channel is full (it is drained by
    /// the shard continuously), so call it from a plain thread, never from a shard. Returns the
    /// shards whose channel is gone.
    pub fn send_all(&self, msg: impl Fn() -> U) -> Vec<usize> {
        (self.senders.iter().enumerate())
            .filter(|(_, tx)| tx.send(Control::User(msg())).is_err())
            .map(|(shard, _)| shard)
            .collect()
    }

    /// Asks every shard to drain. Blocks only if a control channel is full (it is drained by
    /// the shard continuously), so call it from a plain thread, never from a shard.
    pub fn drain_all(&self) {
        for tx in &self.senders {
            let _ = tx.send(Control::Drain);
        }
    }
}

/// What a shard's main future gets: its identity and its control channel.
pub struct ShardContext<U> {
    /// Shard index, 0-based.
    pub id: usize,
    /// CPU the shard is pinned to.
    pub core: usize,
    /// Channels into every shard (this one included).
    pub mesh: ShardMesh<U>,
    /// This shard's control messages.
    pub control: flume::Receiver<Control<U>>,
}

/// Running shards: join them to wait for every shard to return.
pub struct ShardsHandle<U> {
    mesh: ShardMesh<U>,
    joins: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl<U> ShardsHandle<U> {
    /// Channels into every shard.
    pub fn mesh(&self) -> ShardMesh<U> {
        self.mesh.clone()
    }

    /// Waits until every shard's main future has returned.
    pub fn join(self) -> Result<(), String> {
        let mut errors = Vec::new();
        for (i, j) in self.joins.into_iter().enumerate() {
            if let Err(e) = j.join() {
                errors.push(format!("shard {i}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// Starts one pinned executor per core in `cores`, running `main(ShardContext)` on each, and
/// returns once every executor is up (its thread pinned, its io_uring rings built and its main
/// future polled once). An executor that fails to build is joined and its error returned; one
/// that does not come up within `settings.start_timeout` is reported with its thread's kernel
/// state, so a start-up that hangs says where instead of waiting forever.
pub fn start_shards<U, F, Fut>(
    cores: &[usize],
    settings: &ShardSettings,
    main: F,
) -> std::io::Result<ShardsHandle<U>>
where
    U: Send + 'static,
    F: Fn(ShardContext<U>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let (senders, receivers): (Vec<_>, Vec<_>) = cores
        .iter()
        .map(|_| flume::bounded(settings.control_capacity))
        .unzip();
    let mesh = ShardMesh { senders };
    let (up_tx, up_rx) = flume::bounded::<(usize, bool)>(cores.len());
    let mut joins = Vec::with_capacity(cores.len());
    for (id, (core, control)) in cores.iter().copied().zip(receivers).enumerate() {
        let main = main.clone();
        let mesh = mesh.clone();
        let tick = settings.tick;
        let name = format!("{}{}", settings.name_prefix, id);
        let mut guard = StartGuard {
            id,
            tx: up_tx.clone(),
            up: false,
        };
        let join = LocalExecutorBuilder::new(Placement::Fixed(core))
            .name(&name)
            .io_memory(settings.io_memory)
            .preempt_timer(settings.preempt_timer)
            .spawn(move || async move {
                guard.started();
                glommio::spawn_local(watchdog(id, tick)).detach();
                main(ShardContext {
                    id,
                    core,
                    mesh,
                    control,
                })
                .await
            })
            .map_err(|e| {
                std::io::Error::other(format!("cannot start shard {id} on core {core}: {e}"))
            })?;
        joins.push(Some(join));
    }
    drop(up_tx);
    let deadline = Instant::now() + settings.start_timeout;
    let mut up = vec![false; cores.len()];
    while up.iter().any(|u| !u) {
        match up_rx.recv_deadline(deadline) {
            Ok((id, true)) => up[id] = true,
            Ok((id, false)) => {
                let why = match joins[id].take().map(|j| j.join()) {
                    Some(Err(e)) => e.to_string(),
                    _ => "its thread ended before the executor ran".into(),
                };
                return Err(std::io::Error::other(format!(
                    "cannot start shard {id} on core {}: {why}",
                    cores[id]
                )));
            }
            Err(_) => {
                let missing: Vec<String> = (0..cores.len())
                    .filter(|&id| !up[id])
                    .map(|id| {
                        let name = format!("{}{}", settings.name_prefix, id);
                        format!("shard {id} on core {} ({})", cores[id], thread_state(&name))
                    })
                    .collect();
                return Err(std::io::Error::other(format!(
                    "executors not up after {:?}: {}",
                    settings.start_timeout,
                    missing.join("; ")
                )));
            }
        }
    }
    Ok(ShardsHandle {
        mesh,
        joins: joins.into_iter().flatten().collect(),
    })
}

/// Tells [`start_shards`] whether an executor came up: `started()` from inside it, or, if the
/// executor could not be built and its closure is dropped unrun, "not up" from `Drop`.
struct StartGuard {
    id: usize,
    tx: flume::Sender<(usize, bool)>,
    up: bool,
}

impl StartGuard {
    fn started(&mut self) {
        self.up = true;
        let _ = self.tx.try_send((self.id, true));
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if !self.up {
            let _ = self.tx.try_send((self.id, false));
        }
    }
}

/// The kernel's view of the thread named `name` in this process (state, wait channel and, when
/// readable, its kernel stack), for the error of an executor that never came up.
fn thread_state(name: &str) -> String {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return "no /proc".into();
    };
    let comm = &name[..name.len().min(15)];
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        // glommio names the thread "<name>-<n>"; the kernel keeps 15 bytes of it.
        if !read("comm").trim_end().starts_with(comm) {
            continue;
        }
        let stat = read("stat");
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .unwrap_or("?")
            .to_string();
        let stack: Vec<String> = read("stack")
            .lines()
            .take(8)
            .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
            .collect();
        return format!(
            "thread {} state {state}, wchan {}, kernel stack [{}]",
            task.file_name().to_string_lossy(),
            read("wchan").trim(),
            stack.join(" < ")
        );
    }
    "its thread is gone".into()
}

/// Ticks every `period` so the executor never sleeps indefinitely (a lost foreign wake-up then
/// costs at most one tick), and reports ticks that come back late: a task that hogged the core.
async fn watchdog(shard: usize, period: Duration) {
    let stall = period.max(Duration::from_millis(20)) * 4;
    loop {
        let t0 = Instant::now();
        glommio::timer::sleep(period).await;
        let late = t0.elapsed().saturating_sub(period);
        if late > stall {
            tracing::warn!(
                shard,
                late_ms = late.as_millis() as u64,
                "shard watchdog tick came back late: something kept the core busy"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_run_pinned_and_answer_control_messages() {
        let cores = crate::CorePlan::available_cores();
        let settings = ShardSettings::default();
        let (tx, rx) = flume::unbounded::<(usize, usize)>();
        let handle = start_shards::<u32, _, _>(&cores[..1], &settings, move |ctx| {
            let tx = tx.clone();
            async move {
                while let Ok(msg) = ctx.control.recv_async().await {
                    match msg {
                        Control::User(n) => {
                            let _ = tx.send((ctx.id, n as usize));
                        }
                        Control::Drain => break,
                    }
                }
            }
        })
        .unwrap();
        let mesh = handle.mesh();
        assert!(mesh.try_send(0, Control::User(7)).is_ok());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (0, 7));
        mesh.drain_all();
        handle.join().unwrap();
    }

    #[test]
    fn an_executor_that_cannot_be_built_is_an_error_not_a_hang() {
        let cores = crate::CorePlan::available_cores();
        // 1 TiB of registered io_uring memory cannot be mapped and locked: the executor fails
        // inside its thread, before the main future runs.
        let settings = ShardSettings {
            io_memory: 1 << 40,
            start_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let t0 = Instant::now();
        let err = match start_shards::<u32, _, _>(&cores[..1], &settings, |_ctx| async {}) {
            Ok(_) => panic!("an executor with 1 TiB of io memory started"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("cannot start shard 0"), "{err}");
        assert!(
            t0.elapsed() < settings.start_timeout,
            "the failure was only noticed at the start timeout: {err}"
        );
    }

    #[test]
    fn thread_state_names_the_kernel_state_of_a_thread() {
        let (tx, rx) = flume::bounded::<()>(0);
        let t = std::thread::Builder::new()
            .name("probe-sleeper".into())
            .spawn(move || {
                let _ = rx.recv();
            })
            .unwrap();
        let mut state = String::new();
        for _ in 0..100 {
            state = thread_state("probe-sleeper");
            if state.contains("state S") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(state.starts_with("thread "), "{state}");
        assert!(state.contains("state S"), "{state}");
        assert_eq!(thread_state("no-such-thread"), "its thread is gone");
        drop(tx);
        t.join().unwrap();
    }
}
