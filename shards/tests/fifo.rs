//! Per-session FIFO under load: many sessions on two pinned shards submit jobs with random
//! costs to two pinned workers; every session must see its results in submission order, on
//! its own shard, and must never apply a result of a turn it has aborted.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use shards::{
    start_shards, BatchWorker, Control, CorePlan, Mailbox, Routed, ShardSettings, WorkerPool,
    WorkerPoolConfig,
};

#[derive(Debug, Clone, Copy)]
struct Job {
    session: u64,
    seq: u64,
    turn: u32,
    cost_us: u64,
}

/// Spends the job's cost on the CPU (no sleeping: a real model computes), echoes the ids.
struct RandomCost;

impl BatchWorker for RandomCost {
    type Job = Job;
    type Output = Job;
    fn process(&mut self, jobs: &mut Vec<Routed<Job>>, out: &mut Vec<Routed<Job>>) {
        for j in jobs.drain(..) {
            let until = std::time::Instant::now() + Duration::from_micros(j.item.cost_us);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
            out.push(j);
        }
    }
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const SESSIONS_PER_SHARD: u64 = 100;
const JOBS_PER_SESSION: u64 = 60;

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    applied: u64,
    stale_dropped: u64,
    out_of_order: u64,
    wrong_shard: u64,
}

#[test]
fn results_arrive_per_session_in_order_and_aborted_turns_are_never_applied() {
    let cores = CorePlan::available_cores();
    let shard_cores: Vec<usize> = cores.iter().copied().cycle().take(2).collect();
    let (reply_tx, reply_rx): (Vec<_>, Vec<_>) = (0..2).map(|_| flume::bounded(100_000)).unzip();
    let pool = WorkerPool::spawn(
        &WorkerPoolConfig {
            cores: shard_cores.clone(),
            queue_capacity: 100_000,
            max_batch: 32,
            batch_deadline: Duration::from_micros(200),
            reply_timeout: Duration::from_secs(5),
            name: "fifo-worker".into(),
        },
        |_| Ok::<_, String>(RandomCost),
        reply_tx,
    )
    .expect("workers");
    let (tally_tx, tally_rx) = flume::unbounded::<(usize, Tally)>();
    let handle = start_shards::<(), _, _>(&shard_cores, &ShardSettings::default(), move |ctx| {
        let pool = pool.clone();
        let replies = reply_rx[ctx.id].clone();
        let tally_tx = tally_tx.clone();
        async move {
            let shard = ctx.id;
            let boxes: Rc<RefCell<HashMap<u64, Rc<Mailbox<Job>>>>> = Rc::default();
            // The shard's reply router: results to their session's mailbox.
            let router = {
                let boxes = boxes.clone();
                glommio::spawn_local(async move {
                    while let Ok(r) = replies.recv_async().await {
                        let mb = boxes.borrow().get(&r.item.session).cloned();
                        if let Some(mb) = mb {
                            assert!(mb.try_push(r.item).is_ok(), "mailbox bound exceeded");
                        }
                        let _ = r.shard;
                    }
                })
            };
            let tally = Rc::new(Cell::new(Tally::default()));
            let mut tasks = Vec::new();
            for s in 0..SESSIONS_PER_SHARD {
                let session = (shard as u64) << 32 | s;
                let mb = Rc::new(Mailbox::new(JOBS_PER_SESSION as usize + 1));
                boxes.borrow_mut().insert(session, mb.clone());
                let pool = pool.clone();
                let tally = tally.clone();
                tasks.push(glommio::spawn_local(async move {
                    let mut rng = XorShift(session * 2654435761 + 1);
                    let mut turn = 0u32;
                    let mut sent_in_turn: Vec<u64> = Vec::new();
                    let mut next_expected = 0usize;
                    let mut outstanding = 0u64;
                    for seq in 0..JOBS_PER_SESSION {
                        // Occasionally abort: everything of the old turn must be dropped.
                        if rng.next().is_multiple_of(10) {
                            turn += 1;
                            sent_in_turn.clear();
                            next_expected = 0;
                        }
                        let job = Job {
                            session,
                            seq,
                            turn,
                            cost_us: rng.next() % 300,
                        };
                        let mut job = job;
                        loop {
                            match pool.submit(session, shard, job) {
                                Ok(()) => break,
                                Err((_, j)) => {
                                    job = j;
                                    glommio::timer::sleep(Duration::from_micros(200)).await;
                                }
                            }
                        }
                        sent_in_turn.push(seq);
                        outstanding += 1;
                        if rng.next().is_multiple_of(3) {
                            glommio::timer::sleep(Duration::from_micros(rng.next() % 500)).await;
                        }
                    }
                    // Receive every result (of every turn) and apply only the current turn's.
                    let mut t = tally.get();
                    while outstanding > 0 {
                        let Some(r) = mb.recv().await else { break };
                        outstanding -= 1;
                        if r.session >> 32 != shard as u64 {
                            t.wrong_shard += 1;
                        }
                        if r.turn != turn {
                            t.stale_dropped += 1;
                            continue;
                        }
                        if sent_in_turn.get(next_expected) == Some(&r.seq) {
                            next_expected += 1;
                            t.applied += 1;
                        } else {
                            t.out_of_order += 1;
                        }
                    }
                    assert_eq!(
                        next_expected,
                        sent_in_turn.len(),
                        "session {session} missed results"
                    );
                    let mut total = tally.get();
                    total.applied += t.applied;
                    total.stale_dropped += t.stale_dropped;
                    total.out_of_order += t.out_of_order;
                    total.wrong_shard += t.wrong_shard;
                    tally.set(total);
                }));
            }
            for t in tasks {
                t.await;
            }
            drop(router);
            let _ = tally_tx.send((shard, tally.get()));
            // Wait for the test to release the shard.
            while let Ok(msg) = ctx.control.recv_async().await {
                if let Control::Drain = msg {
                    break;
                }
            }
        }
    })
    .expect("shards");
    let mut sum = Tally::default();
    for _ in 0..2 {
        let (_, t) = tally_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a shard finished");
        sum.applied += t.applied;
        sum.stale_dropped += t.stale_dropped;
        sum.out_of_order += t.out_of_order;
        sum.wrong_shard += t.wrong_shard;
    }
    handle.mesh().drain_all();
    handle.join().expect("join");
    eprintln!("{sum:?}");
    assert_eq!(sum.out_of_order, 0);
    assert_eq!(sum.wrong_shard, 0);
    assert!(
        sum.stale_dropped > 0,
        "the test aborted turns with results in flight"
    );
    assert_eq!(
        sum.applied + sum.stale_dropped,
        2 * SESSIONS_PER_SHARD * JOBS_PER_SESSION
    );
}
