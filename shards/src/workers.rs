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
//!
//! Cancellation: a job may carry an *epoch* (e.g. the turn it belongs to); [`WorkerPool::cancel`]
//! tells the worker that serves a key to skip that key's queued jobs up to an epoch. The worker
//! skips them without running them ([`BatchWorker::skipped`] says what answer, if any, a skipped
//! job gets) and counts them ([`WorkerPool::skipped`]).
//!
//! Why a channel and not a shared set: each worker has its own bounded cancellation channel
//! next to its job queue, and only that worker reads it (before taking each batch), keeping
//! what it learnt in a small map of its own. No lock is shared across cores and a shard never
//! waits: a cancellation that does not fit is dropped (counted), and the job simply runs (its
//! result is stale and the application drops it). The map is bounded, and emptied whenever the
//! worker's queue is empty: a cancellation is sent after the jobs it covers were queued, so
//! once the worker has read it and then finds its queue empty, no job it covers is left.

use std::collections::VecDeque;
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

    /// The answer a cancelled job gets instead of running (e.g. a "cancelled" error, so the
    /// sender learns the job is over); `None` (the default) sends nothing.
    fn skipped(&mut self, job: Routed<Self::Job>) -> Option<Routed<Self::Output>> {
        drop(job);
        None
    }
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
    queues: Vec<flume::Sender<Queued<J>>>,
    cancels: Vec<flume::Sender<Cancel>>,
    shed: Arc<PoolShed>,
}

/// A job in a worker's queue: its key and epoch (for cancellation) and the routed job.
struct Queued<J> {
    key: u64,
    epoch: u64,
    job: Routed<J>,
}

/// "Skip the queued jobs of `key` (sent from `shard`) whose epoch is at most `up_to`."
#[derive(Debug, Clone, Copy)]
struct Cancel {
    shard: usize,
    key: u64,
    up_to: u64,
}

/// Epoch of [`WorkerPool::cancel_all`]: every job of the key, skipped without an answer (the
/// key's owner is gone).
const ALL: u64 = u64::MAX;

/// Most keys a worker remembers cancellations for; past it the oldest is forgotten (its
/// jobs then run, and their results are dropped as stale).
const CANCEL_MAP_CAPACITY: usize = 256;

/// What a pool turned away, counted where it happens (off the hot path: only a refusal, a
/// skip or a dropped result touches these, so the atomics cost nothing while the pool keeps
/// up).
#[derive(Debug, Default)]
struct PoolShed {
    refused: AtomicU64,
    dropped_replies: AtomicU64,
    skipped: AtomicU64,
    cancels_dropped: AtomicU64,
}

impl<J> Clone for WorkerPool<J> {
    fn clone(&self) -> Self {
        WorkerPool {
            queues: self.queues.clone(),
            cancels: self.cancels.clone(),
            shed: self.shed.clone(),
        }
    }
}

/// A worker's memory of cancellations: (shard, key) → highest cancelled epoch, oldest first.
#[derive(Default)]
struct Cancelled {
    entries: VecDeque<((usize, u64), u64)>,
}

impl Cancelled {
    fn note(&mut self, c: Cancel) {
        let id = (c.shard, c.key);
        if let Some(e) = self.entries.iter_mut().find(|(k, _)| *k == id) {
            e.1 = e.1.max(c.up_to);
            return;
        }
        if self.entries.len() >= CANCEL_MAP_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back((id, c.up_to));
    }

    /// The cancelled epoch bound for the key, if any.
    fn bound(&self, shard: usize, key: u64) -> Option<u64> {
        self.entries
            .iter()
            .find(|(k, _)| *k == (shard, key))
            .map(|(_, up_to)| *up_to)
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
        let mut cancels = Vec::new();
        let shed = Arc::new(PoolShed::default());
        let (ready_tx, ready_rx) = flume::bounded::<Result<(), String>>(config.cores.len());
        for (index, &core) in config.cores.iter().enumerate() {
            let (tx, rx) = flume::bounded::<Queued<J>>(config.queue_capacity.max(1));
            queues.push(tx);
            // Room for a cancellation per queued job and then some: one is sent per abort.
            let (cancel_tx, cancel_rx) =
                flume::bounded::<Cancel>(config.queue_capacity.max(32) * 2);
            cancels.push(cancel_tx);
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
                    run_worker(worker, rx, cancel_rx, replies, &cfg, &worker_shed);
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
        Ok(WorkerPool {
            queues,
            cancels,
            shed,
        })
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
        self.submit_in(key, 0, shard, job)
    }

    /// Queues a job of epoch `epoch` (which [`WorkerPool::cancel`] compares) for `key`'s
    /// worker without blocking; a refused job is handed back.
    pub fn submit_in(
        &self,
        key: u64,
        epoch: u64,
        shard: usize,
        job: J,
    ) -> Result<(), (SubmitError, J)> {
        let Some(q) = self.queues.get(self.worker_for(key)) else {
            return Err((SubmitError::Stopped, job));
        };
        let queued = Queued {
            key,
            epoch,
            job: Routed { shard, item: job },
        };
        q.try_send(queued).map_err(|e| match e {
            flume::TrySendError::Full(q) => {
                self.shed.refused.fetch_add(1, Ordering::Relaxed);
                (SubmitError::Full, q.job.item)
            }
            flume::TrySendError::Disconnected(q) => (SubmitError::Stopped, q.job.item),
        })
    }

    /// Asks `key`'s worker to skip the key's jobs from `shard` of epoch `up_to` or lower that
    /// are still queued (each gets the answer [`BatchWorker::skipped`] gives). Never blocks: a
    /// cancellation that does not fit is dropped and counted ([`WorkerPool::cancels_dropped`]).
    pub fn cancel(&self, key: u64, shard: usize, up_to: u64) {
        self.send_cancel(Cancel {
            shard,
            key,
            up_to: up_to.min(ALL - 1),
        });
    }

    /// The key's owner is gone: skip all its queued jobs from `shard`, without answers.
    pub fn cancel_all(&self, key: u64, shard: usize) {
        self.send_cancel(Cancel {
            shard,
            key,
            up_to: ALL,
        });
    }

    fn send_cancel(&self, cancel: Cancel) {
        let Some(tx) = self.cancels.get(self.worker_for(cancel.key)) else {
            return;
        };
        if let Err(flume::TrySendError::Full(_)) = tx.try_send(cancel) {
            self.shed.cancels_dropped.fetch_add(1, Ordering::Relaxed);
        }
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

    /// Jobs skipped because they were cancelled while queued, since the pool started.
    pub fn skipped(&self) -> u64 {
        self.shed.skipped.load(Ordering::Relaxed)
    }

    /// Cancellations dropped because a worker's cancellation channel was full (their jobs
    /// ran), since the pool started.
    pub fn cancels_dropped(&self) -> u64 {
        self.shed.cancels_dropped.load(Ordering::Relaxed)
    }
}

/// Takes `queued` into the batch, or skips it (counted, its answer in `out`) when cancelled.
fn take<W: BatchWorker>(
    worker: &mut W,
    queued: Queued<W::Job>,
    cancelled: &Cancelled,
    batch: &mut Vec<Routed<W::Job>>,
    out: &mut Vec<Routed<W::Output>>,
    shed: &PoolShed,
) {
    match cancelled.bound(queued.job.shard, queued.key) {
        Some(up_to) if queued.epoch <= up_to => {
            shed.skipped.fetch_add(1, Ordering::Relaxed);
            if up_to != ALL {
                out.extend(worker.skipped(queued.job));
            }
        }
        _ => batch.push(queued.job),
    }
}

fn run_worker<W: BatchWorker>(
    mut worker: W,
    rx: flume::Receiver<Queued<W::Job>>,
    cancel_rx: flume::Receiver<Cancel>,
    replies: Vec<flume::Sender<Routed<W::Output>>>,
    cfg: &WorkerPoolConfig,
    shed: &PoolShed,
) {
    let mut batch = Vec::with_capacity(cfg.max_batch.max(1));
    let mut out = Vec::with_capacity(cfg.max_batch.max(1));
    let mut cancelled = Cancelled::default();
    while let Ok(first) = rx.recv() {
        for c in cancel_rx.try_iter() {
            cancelled.note(c);
        }
        take(&mut worker, first, &cancelled, &mut batch, &mut out, shed);
        let deadline = Instant::now() + cfg.batch_deadline;
        while batch.len() < cfg.max_batch {
            match rx.try_recv() {
                Ok(job) => take(&mut worker, job, &cancelled, &mut batch, &mut out, shed),
                Err(flume::TryRecvError::Empty) => {
                    if cfg.batch_deadline.is_zero() {
                        break;
                    }
                    match rx.recv_deadline(deadline) {
                        Ok(job) => take(&mut worker, job, &cancelled, &mut batch, &mut out, shed),
                        Err(_) => break,
                    }
                }
                Err(flume::TryRecvError::Disconnected) => break,
            }
        }
        if !batch.is_empty() {
            worker.process(&mut batch, &mut out);
            batch.clear();
        }
        if rx.is_empty() {
            // Every job a noted cancellation covers was queued before it was sent, so none
            // is left (see the module doc).
            cancelled.entries.clear();
        }
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

    /// Runs jobs `(key, epoch)` one at a time, each when the test opens the gate; says when a
    /// job starts so the test knows what is still queued.
    struct Gated {
        gate: flume::Receiver<()>,
        started: flume::Sender<(u64, u64)>,
    }

    impl BatchWorker for Gated {
        type Job = (u64, u64);
        type Output = (u64, u64, &'static str);
        fn process(
            &mut self,
            jobs: &mut Vec<Routed<(u64, u64)>>,
            out: &mut Vec<Routed<Self::Output>>,
        ) {
            for j in jobs.drain(..) {
                let _ = self.started.send(j.item);
                let _ = self.gate.recv();
                out.push(Routed {
                    shard: j.shard,
                    item: (j.item.0, j.item.1, "ran"),
                });
            }
        }
        fn skipped(&mut self, job: Routed<(u64, u64)>) -> Option<Routed<Self::Output>> {
            Some(Routed {
                shard: job.shard,
                item: (job.item.0, job.item.1, "skipped"),
            })
        }
    }

    #[test]
    fn cancelled_jobs_are_skipped_in_order_answered_and_counted() {
        let (tx, rx) = flume::bounded(100);
        let (gate_tx, gate_rx) = flume::unbounded();
        let (started_tx, started_rx) = flume::unbounded();
        let cfg = WorkerPoolConfig {
            cores: vec![0],
            queue_capacity: 16,
            max_batch: 1,
            batch_deadline: Duration::ZERO,
            reply_timeout: Duration::from_secs(1),
            name: "test-cancel".into(),
        };
        let make = move |_| {
            Ok::<_, String>(Gated {
                gate: gate_rx.clone(),
                started: started_tx.clone(),
            })
        };
        let pool = WorkerPool::spawn(&cfg, make, vec![tx]).unwrap();
        // A job of key 1 that holds the worker while the rest queue up behind it.
        pool.submit_in(1, 9, 0, (1, 9)).unwrap();
        assert_eq!(started_rx.recv_timeout(Duration::from_secs(5)), Ok((1, 9)));
        for (key, epoch) in [(1, 1), (2, 1), (1, 2), (3, 1), (1, 3), (3, 2)] {
            pool.submit_in(key, epoch, 0, (key, epoch)).unwrap();
        }
        pool.cancel(1, 0, 2); // key 1's turns 1 and 2 are over
        pool.cancel(2, 1, 5); // another shard's key 2: not this one
        pool.cancel_all(3, 0); // key 3's owner is gone: skipped without answers
        for _ in 0..10 {
            gate_tx.send(()).unwrap();
        }
        let got: Vec<_> = (0..5)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(5))
                    .expect("a reply")
                    .item
            })
            .collect();
        assert_eq!(
            got,
            [
                (1, 9, "ran"),
                (1, 1, "skipped"),
                (2, 1, "ran"),
                (1, 2, "skipped"),
                (1, 3, "ran"),
            ]
        );
        // Key 3's last job follows the last answer; wait (boundedly) until it is skipped too.
        let until = Instant::now() + Duration::from_secs(5);
        while pool.skipped() < 4 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.skipped(), 4, "two of key 1, both of key 3");
        assert_eq!(pool.cancels_dropped(), 0);
        assert!(rx.try_recv().is_err(), "key 3's jobs got no answer");
    }

    #[test]
    fn the_cancellation_memory_is_bounded_and_forgets_the_oldest_key() {
        let mut c = Cancelled::default();
        for key in 0..(CANCEL_MAP_CAPACITY as u64 + 10) {
            c.note(Cancel {
                shard: 0,
                key,
                up_to: 1,
            });
        }
        assert_eq!(c.entries.len(), CANCEL_MAP_CAPACITY);
        assert_eq!(c.bound(0, 0), None, "the oldest key was forgotten");
        assert_eq!(c.bound(0, CANCEL_MAP_CAPACITY as u64 + 9), Some(1));
        let last = CANCEL_MAP_CAPACITY as u64 + 9;
        c.note(Cancel {
            shard: 0,
            key: last,
            up_to: 4,
        });
        c.note(Cancel {
            shard: 0,
            key: last,
            up_to: 3,
        });
        assert_eq!(c.bound(0, last), Some(4), "a key keeps its highest bound");
        assert_eq!(c.entries.len(), CANCEL_MAP_CAPACITY);
    }
}
