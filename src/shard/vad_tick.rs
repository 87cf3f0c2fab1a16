//! The shard's VAD flusher: every session's next VAD job is gathered in the shard's
//! [`TickBatch`](shards::TickBatch) (`Providers::vad`), and this task sends what was gathered
//! to the shard's inference worker as one [`VadBatch`](crate::providers::vad::VadBatch) per
//! `inference.tick_ms`. The worker answers with one message per batch, which
//! [`super::replies::route_vad`] hands out to the sessions.
//!
//! Why a tick: a 60 ms Opus frame yields about two 32 ms chunks per session, so at a hundred
//! devices a job arrives every few hundred microseconds. Sent one by one, each paid a
//! cross-core send, a wake-up of the worker and of the shard, and a forward pass of a few rows.
//! Gathered for a tick, the shard and the worker wake once per tick and the forward passes are
//! as wide as the load. The VAD's latency budget is the silence hangover (hundreds of ms), so
//! one tick of waiting is not heard.
//!
//! The task sleeps while nothing is gathered (an idle shard sends nothing and does not wake),
//! sends at once when the previous send is a tick or more ago, and otherwise waits out the
//! rest of the tick: at most one batch per tick, and at most one tick of added latency.
//! With `server.socket_sweep_ms` set, the batch goes when the shard's socket sweep has been
//! handled instead (one batch per sweep, holding every chunk its reads produced; with a tick
//! longer than the sweep period, one per the first sweep a tick after the last batch).
//! A batch the worker's queue refuses goes back in front of the next one (counted).

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::Shard;

/// Sends the shard's gathered VAD jobs as one batch per tick, until the task is dropped.
pub async fn flush(shard: Rc<Shard>) {
    let tick = Duration::from_millis(shard.config.inference.tick_ms);
    let gather = shard.providers.vad.clone();
    let pool = shard.queues.vad.clone();
    let key = shard.id as u64;
    let mut last: Option<Instant> = None;
    let mut swept = 0;
    loop {
        gather.ready().await;
        match &shard.sweep {
            Some(sweep) if sweep.active() => swept = after_sweep(sweep, swept, last, tick).await,
            _ => wait_out_tick(last, tick).await,
        }
        last = Some(Instant::now());
        let Some(batch) = gather.take() else {
            continue;
        };
        if let Err((_, batch)) = pool.submit(key, shard.id, batch) {
            gather.unsent(batch);
            shard
                .vad_batches_unsent
                .set(shard.vad_batches_unsent.get() + 1);
        }
    }
}

/// Device sockets are read in sweeps: waits until the sweep's readers have all run, so one
/// batch holds every chunk the sweep brought in (a job from elsewhere, such as UDP audio, waits
/// for the next sweep), and a tick has passed since `last` (a tick longer than the sweep's
/// period skips sweeps; rounded to the sweep grid, half a period early at most). Returns the
/// sweep count to wait from next time.
async fn after_sweep(
    sweep: &shards::Sweep,
    mut swept: u64,
    last: Option<Instant>,
    tick: Duration,
) -> u64 {
    let gap = tick.saturating_sub(sweep.period() / 2);
    loop {
        swept = sweep.processed_since(swept).await;
        if last.is_none_or(|t| t.elapsed() >= gap) || !sweep.active() {
            return swept;
        }
    }
}

/// Waits out the rest of the tick that began at `last`.
async fn wait_out_tick(last: Option<Instant>, tick: Duration) {
    if let Some(due) = last.map(|t| t + tick) {
        let now = Instant::now();
        if due > now {
            glommio::timer::sleep(due - now).await;
        }
    }
}
