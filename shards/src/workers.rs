//! Inference workers: threads pinned with `core_affinity`, each owning its models, fed over a
//! bounded flume channel, replying on the originating shard's bounded reply channel.
//!
//! Ordering: a job's `key` (e.g. a session id) always maps to the same worker, and each worker
//! handles its queue in order and sends replies to a shard over one FIFO channel, so results
//! for one key reach its shard in submission order.
//!
//! Batching: a worker blocks for the first job, then takes whatever else is queued (up to
//! `max_batch`, waiting at most `batch_deadline` for more) and hands the batch to
//! [`BatchWorker::process`] in one call. Keeping two items of one key out of one batch is the
//! application's job (it submits a key's next chunk only after the previous result).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A job or a result tagged with the shard that must receive the result.
#[derive(Debug)]
pub struct Routed<T> {
    /// Index of the shard that sent the job (and gets the result).
    pub shard: usize,
    /// The payload.
    pub item: T,
}

/// What runs on an inference core: takes a batch of jobs, produces results.
pub trait BatchWorker: 'static {
    /// A unit of work.
    type Job: Send + 'static;
    /// A result.
    type Output: Send + 'static;
    /// Processes `jobs` (drained by the caller afterwards) and pushes results to `out`.
    fn process(&mut self, jobs: &mut Vec<Routed<Self::Job>>, out: &mut Vec<Routed<Self::Output>>);
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct WorkerPoolConfig {
    /// One worker thread per entry, pinned to that CPU id.
    pub cores: Vec<usize>,
    /// Bound of each worker's job queue.
    pub queue_capacity: usize,
    /// Most jobs per batch.
    pub max_batch: usize,
    /// How long a worker waits to fill a batch once it has one job.
    pub batch_deadline: Duration,
    /// How long a worker waits for room in a full shard reply channel before dropping a result.
    pub reply_timeout: Duration,
    /// Thread name prefix.
    pub name: String,
}

/// Why a job was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The worker's queue is at its bound: shed load.
    #[error("inference queue is full")]
    Full,
    /// The worker thread is gone.
    #[error("inference worker stopped")]
    Stopped,
}

/// Handle for submitting jobs; `Clone + Send`, one per shard.
pub struct WorkerPool<J> {
    queues: Vec<flume::Sender<Routed<J>>>,
    shed: Arc<PoolShed>,
}

/// What a pool turned away, counted where it happens (off the hot path: only a refusal or a
/// dropped result touches these, so the atomics cost nothing while the pool keeps up).
#[derive(Debug, Default)]
struct PoolShed {
    refused: AtomicU64,
    dropped_replies: AtomicU64,
}

impl<J> Clone for WorkerPool<J> {
    fn clone(&self) -> Self {
        WorkerPool {
            queues: self.queues.clone(),
            shed: self.shed.clone(),
        }
    }
}

impl<J: Send + 'static> WorkerPool<J> {
    /// Starts one worker per configured core. `make(index)` runs on the worker's own thread
    /// (so models are loaded there); `replies[s]` is shard `s`'s reply channel.
    pub fn spawn<W, F, E>(
        config: &WorkerPoolConfig,
        make: F,
        replies: Vec<flume::Sender<Routed<W::Output>>>,
    ) -> std::io::Result<WorkerPool<J>>
    where
        W: BatchWorker<Job = J>,
        F: Fn(usize) -> Result<W, E> + Send + Sync + Clone + 'static,
        E: std::fmt::Display,
    {
        let mut queues = Vec::new();
        let shed = Arc::new(PoolShed::default());
        let (ready_tx, ready_rx) = flume::bounded::<Result<(), String>>(config.cores.len());
        for (index, &core) in config.cores.iter().enumerate() {
            let (tx, rx) = flume::bounded::<Routed<J>>(config.queue_capacity.max(1));
            queues.push(tx);
            let make = make.clone();
            let replies = replies.clone();
            let cfg = config.clone();
            let ready = ready_tx.clone();
            let worker_shed = shed.clone();
            std::thread::Builder::new()
                .name(format!("{}{}", config.name, index))
                .spawn(move || {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                        tracing::warn!(core, "could not pin inference worker");
                    }
                    let worker = match make(index) {
                        Ok(w) => {
                            let _ = ready.send(Ok(()));
                            w
                        }
                        Err(e) => {
                            let _ = ready.send(Err(format!("worker {index} on core {core}: {e}")));
                            return;
                        }
                    };
                    drop(ready);
                    run_worker(worker, rx, replies, &cfg, &worker_shed);
                })?;
        }
        drop(ready_tx);
        for _ in 0..config.cores.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(std::io::Error::other(e)),
                Err(_) => {
                    return Err(std::io::Error::other(
                        "inference worker died while starting",
                    ))
                }
            }
        }
        Ok(WorkerPool { queues, shed })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.queues.len()
    }

    /// The worker that serves `key`.
    pub fn worker_for(&self, key: u64) -> usize {
        (key % self.queues.len().max(1) as u64) as usize
    }

    /// Queues a job for `key`'s worker without blocking; a refused job is handed back.
    pub fn submit(&self, key: u64, shard: usize, job: J) -> Result<(), (SubmitError, J)> {
        let Some(q) = self.queues.get(self.worker_for(key)) else {
            return Err((SubmitError::Stopped, job));
        };
        q.try_send(Routed { shard, item: job })
            .map_err(|e| match e {
                flume::TrySendError::Full(r) => {
                    self.shed.refused.fetch_add(1, Ordering::Relaxed);
                    (SubmitError::Full, r.item)
                }
                flume::TrySendError::Disconnected(r) => (SubmitError::Stopped, r.item),
            })
    }

    /// Jobs waiting in the queue of `key`'s worker, and that queue's bound.
    pub fn depth_for(&self, key: u64) -> (usize, usize) {
        self.queues
            .get(self.worker_for(key))
            .map(|q| (q.len(), q.capacity().unwrap_or(usize::MAX)))
            .unwrap_or((0, 0))
    }

    /// Jobs waiting in each worker's queue.
    pub fn queue_depths(&self) -> Vec<usize> {
        self.queues.iter().map(|q| q.len()).collect()
    }

    /// Jobs waiting in all the workers' queues together.
    pub fn depth(&self) -> usize {
        self.queues.iter().map(|q| q.len()).sum()
    }

    /// Jobs refused because their worker's queue was full, since the pool started (every
    /// handle of the pool sees the same number).
    pub fn refused(&self) -> u64 {
        self.shed.refused.load(Ordering::Relaxed)
    }

    /// Results dropped because their shard's reply channel stayed full (or was closed) for
    /// the pool's `reply_timeout`, since the pool started.
    pub fn dropped_replies(&self) -> u64 {
        self.shed.dropped_replies.load(Ordering::Relaxed)
    }
}

fn run_worker<W: BatchWorker>(
    mut worker: W,
    rx: flume::Receiver<Routed<W::Job>>,
    replies: Vec<flume::Sender<Routed<W::Output>>>,
    cfg: &WorkerPoolConfig,
    shed: &PoolShed,
) {
    let mut batch = Vec::with_capacity(cfg.max_batch.max(1));
    let mut out = Vec::with_capacity(cfg.max_batch.max(1));
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let deadline = Instant::now() + cfg.batch_deadline;
        while batch.len() < cfg.max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(flume::TryRecvError::Empty) => {
                    if cfg.batch_deadline.is_zero() {
                        break;
                    }
                    match rx.recv_deadline(deadline) {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                Err(flume::TryRecvError::Disconnected) => break,
            }
        }
        worker.process(&mut batch, &mut out);
        batch.clear();
        for r in out.drain(..) {
            if let Some(tx) = replies.get(r.shard) {
                if tx.send_timeout(r, cfg.reply_timeout).is_err() {
                    shed.dropped_replies.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("shard reply channel full or closed; result dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo {
        max_seen: usize,
    }

    impl BatchWorker for Echo {
        type Job = (u64, u32);
        type Output = (u64, u32, usize);
        fn process(
            &mut self,
            jobs: &mut Vec<Routed<(u64, u32)>>,
            out: &mut Vec<Routed<(u64, u32, usize)>>,
        ) {
            self.max_seen = self.max_seen.max(jobs.len());
            let n = jobs.len();
            for j in jobs.drain(..) {
                out.push(Routed {
                    shard: j.shard,
                    item: (j.item.0, j.item.1, n),
                });
            }
        }
    }

    #[test]
    fn results_per_key_arrive_in_submission_order_on_the_right_shard() {
        let (tx0, rx0) = flume::bounded(10_000);
        let (tx1, rx1) = flume::bounded(10_000);
        let cfg = WorkerPoolConfig {
            cores: vec![0, 0],
            queue_capacity: 10_000,
            max_batch: 16,
            batch_deadline: Duration::from_micros(200),
            reply_timeout: Duration::from_secs(1),
            name: "test-worker".into(),
        };
        let pool = WorkerPool::spawn(
            &cfg,
            |_| Ok::<_, String>(Echo { max_seen: 0 }),
            vec![tx0, tx1],
        )
        .unwrap();
        for seq in 0..500u32 {
            for key in 0..8u64 {
                pool.submit(key, (key % 2) as usize, (key, seq)).unwrap();
            }
        }
        let mut next = [0u32; 8];
        for _ in 0..4000 {
            let (shard, r) = flume::Selector::new()
                .recv(&rx0, |r| (0, r))
                .recv(&rx1, |r| (1, r))
                .wait_timeout(Duration::from_secs(5))
                .expect("a result within 5 s");
            let r = r.expect("worker alive");
            let (key, seq, _) = r.item;
            assert_eq!(shard, (key % 2) as usize, "result went to the wrong shard");
            assert_eq!(seq, next[key as usize], "key {key} out of order");
            next[key as usize] += 1;
        }
        assert_eq!(next, [500; 8]);
    }

    #[test]
    fn full_queue_is_refused_not_grown() {
        let (tx, _rx) = flume::bounded(1);
        let cfg = WorkerPoolConfig {
            cores: vec![0],
            queue_capacity: 2,
            max_batch: 1,
            batch_deadline: Duration::ZERO,
            reply_timeout: Duration::from_millis(10),
            name: "test-full".into(),
        };
        struct Slow;
        impl BatchWorker for Slow {
            type Job = ();
            type Output = ();
            fn process(&mut self, jobs: &mut Vec<Routed<()>>, _out: &mut Vec<Routed<()>>) {
                jobs.clear();
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let pool = WorkerPool::spawn(&cfg, |_| Ok::<_, String>(Slow), vec![tx]).unwrap();
        let results: Vec<_> = (0..10)
            .map(|_| pool.submit(1, 0, ()).map_err(|(e, ())| e))
            .collect();
        assert!(results.contains(&Err(SubmitError::Full)));
        assert!(pool.queue_depths()[0] <= 2);
        assert!(pool.depth() <= 2);
        let refused = results.iter().filter(|r| r.is_err()).count() as u64;
        assert_eq!(pool.refused(), refused, "every refusal is counted");
        assert_eq!(pool.clone().refused(), refused, "clones share the count");
    }
}
