//! The one envelope every inference worker answers in: which session and turn a result is
//! for, the job's sequence number, how long it waited and computed, and the outcome.
//!
//! VAD, ASR and TTS workers differ only in the payload `T` (and, for VAD, in an error that
//! still carries the partial scores and the recurrent state). One envelope means one router on
//! the shard ([`crate::shard`]) records the timings and delivers every kind of result, instead
//! of three near-identical copies.

use std::time::{Duration, Instant};

/// When a job was queued, how long it waited and computed, and when it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// When the session queued the job.
    pub submitted: Instant,
    /// Time from `submitted` to the worker starting the job (or its batch).
    pub queue_wait: Duration,
    /// Wall time of the work this job took part in.
    pub compute: Duration,
    /// When the work finished.
    pub done: Instant,
}

impl Timings {
    /// Timings of a job submitted at `submitted`, started at `started`, finished at `done`.
    pub fn new(submitted: Instant, started: Instant, done: Instant) -> Self {
        Timings {
            submitted,
            queue_wait: started.saturating_duration_since(submitted),
            compute: done.saturating_duration_since(started),
            done,
        }
    }
}

/// An inference worker's answer to one job.
#[derive(Debug, Clone)]
pub struct Reply<T, E = String> {
    /// The job's session (its key on its shard).
    pub session: u64,
    /// The job's turn, echoed so the session can drop stale results.
    pub turn: u32,
    /// The job's sequence number: within the session for VAD jobs, within the turn for TTS
    /// pieces, 0 for ASR (one job per turn).
    pub seq: u64,
    /// Queue wait and compute.
    pub timings: Timings,
    /// The payload, or why there is none.
    pub result: Result<T, E>,
}

/// The error of a job skipped because its turn was cancelled while it waited (it never ran).
pub const CANCELLED: &str = "cancelled";

impl<T> Reply<T, String> {
    /// The answer to a job of `session`/`turn`/`seq`, queued at `submitted`, that a worker
    /// skipped because it was cancelled: no compute, [`CANCELLED`] as the error.
    pub fn cancelled(session: u64, turn: u32, seq: u64, submitted: Instant) -> Self {
        let now = Instant::now();
        Reply {
            session,
            turn,
            seq,
            timings: Timings::new(submitted, now, now),
            result: Err(CANCELLED.to_string()),
        }
    }

    /// Whether this is the answer to a skipped job.
    pub fn is_cancelled(&self) -> bool {
        matches!(&self.result, Err(e) if e == CANCELLED)
    }
}
