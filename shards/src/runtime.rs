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

use crate::threads::{self, POKE_EVERY};

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
        self.broadcast(|| Control::User(msg()))
    }

    /// Asks every shard to drain. Blocks only if a control channel is full (it is drained by
    /// the shard continuously), so call it from a plain thread, never from a shard.
    pub fn drain_all(&self) {
        self.broadcast(|| Control::Drain);
    }

    /// Sends `msg()` to every shard, waiting while a channel is full; the shards whose channel
    /// is gone.
    fn broadcast(&self, msg: impl Fn() -> Control<U>) -> Vec<usize> {
        (self.senders.iter().enumerate())
            .filter(|(_, tx)| tx.send(msg()).is_err())
            .map(|(shard, _)| shard)
            .collect()
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
    threads::install_wake_handler();
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
    let mut pokes = vec![0u32; cores.len()];
    let glommio_thread = |id: usize| format!("{}{}-", settings.name_prefix, id);
    while up.iter().any(|u| !u) {
        // Wake-up signals to the shards not up yet, every POKE_EVERY until the deadline
        // (threads::poke_awake says why).
        match up_rx.recv_deadline((Instant::now() + POKE_EVERY).min(deadline)) {
            Ok((id, true)) => {
                up[id] = true;
                if pokes[id] > 0 {
                    tracing::warn!(
                        shard = id,
                        wake_up_signals = pokes[id],
                        "shard came up only after wake-up signals (glommio may have parked it before its first task)"
                    );
                }
            }
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
            Err(_) if Instant::now() < deadline => {
                for id in (0..cores.len()).filter(|&id| !up[id]) {
                    if threads::poke_awake(&glommio_thread(id)) {
                        pokes[id] += 1;
                    }
                }
            }
            Err(_) => {
                let missing: Vec<String> = (0..cores.len())
                    .filter(|&id| !up[id])
                    .map(|id| {
                        let state = threads::thread_state(&glommio_thread(id));
                        format!(
                            "shard {id} on core {} ({state}; {} wake-up signals sent)",
                            cores[id], pokes[id]
                        )
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
    fn executors_come_up_even_when_glommio_parks_before_their_first_task() {
        // A 20 µs preemption timer makes glommio 0.9 park many executors before their first
        // task (crate::threads says why); without the wake-up signals a start below fails at
        // its timeout with the shards asleep in io_cqring_wait.
        let cores = crate::CorePlan::available_cores();
        let settings = ShardSettings {
            preempt_timer: Duration::from_micros(20),
            start_timeout: Duration::from_secs(10),
            ..ShardSettings::default()
        };
        for _ in 0..20 {
            let handle = start_shards::<u32, _, _>(&cores, &settings, |_| async {})
                .expect("every shard came up");
            handle.join().expect("every shard ended");
        }
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
}
