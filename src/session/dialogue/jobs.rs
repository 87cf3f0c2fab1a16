//! The session's share of the inference queues: at most [`JOBS_PER_KIND`] recognition jobs
//! and [`JOBS_PER_KIND`] synthesis jobs outstanding (submitted, answer not back) at once,
//! across all its turns. The workers' queues are FIFO and shared by every session on the
//! instance, so one session's backlog delays another session's job by at most its quota; the
//! rest waits inside the session (a turn's sentences in its segment queue, an utterance in its
//! turn) and goes out as answers come back.
//!
//! Every job gets exactly one answer: its result, a refusal, or — when its turn ended while it
//! waited — a "cancelled" answer from the worker that skipped it (or from the runner, for a
//! remote call it dropped). That answer frees the slot, so an aborted turn's job holds the
//! next turn back only until the worker reaches it, which is cheap. A job whose answer never
//! comes (a reply dropped on a full channel) stops counting at its deadline, so a lost reply
//! cannot wedge the session.

use std::time::Instant;

/// Most jobs of one kind (recognition, synthesis) a session has outstanding at once: one
/// running and one queued behind it, so a new turn's first sentence need not wait for the
/// answer of the job it replaces to travel back.
pub const JOBS_PER_KIND: usize = 2;

/// Jobs of one kind this session has outstanding.
#[derive(Debug, Default)]
pub(super) struct Outstanding {
    jobs: Vec<Job>,
}

#[derive(Debug)]
struct Job {
    turn: u32,
    seq: u32,
    expires: Instant,
}

impl Outstanding {
    /// Whether another job may go out at `now` (jobs past their deadline no longer count).
    pub(super) fn has_room(&mut self, now: Instant) -> bool {
        self.jobs.retain(|j| j.expires > now);
        self.jobs.len() < JOBS_PER_KIND
    }

    /// A job of `turn`/`seq` went out; it counts until answered or until `expires`.
    pub(super) fn start(&mut self, turn: u32, seq: u32, expires: Instant) {
        self.jobs.push(Job { turn, seq, expires });
    }

    /// The job of `turn`/`seq` was answered (nothing if it had already expired).
    pub(super) fn finish(&mut self, turn: u32, seq: u32) {
        if let Some(i) = self
            .jobs
            .iter()
            .position(|j| j.turn == turn && j.seq == seq)
        {
            self.jobs.swap_remove(i);
        }
    }

    /// Whether any job is outstanding (expired ones included: they may still be queued).
    pub(super) fn any(&self) -> bool {
        !self.jobs.is_empty()
    }

    /// When the first outstanding job stops counting, if any.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.jobs.iter().map(|j| j.expires).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_slot_frees_on_its_answer_or_at_its_deadline() {
        let t0 = Instant::now();
        let mut o = Outstanding::default();
        for seq in 0..JOBS_PER_KIND as u32 {
            assert!(o.has_room(t0));
            o.start(1, seq, t0 + Duration::from_secs(1 + u64::from(seq)));
        }
        assert!(!o.has_room(t0), "the quota is in use");
        o.finish(7, 0);
        assert!(!o.has_room(t0), "another turn's answer frees nothing");
        o.finish(1, 0);
        assert!(o.has_room(t0));
        o.start(2, 0, t0 + Duration::from_secs(5));
        assert!(!o.has_room(t0));
        assert_eq!(o.next_expiry(), Some(t0 + Duration::from_secs(2)));
        assert!(
            o.has_room(t0 + Duration::from_secs(2)),
            "a lost answer stops counting"
        );
        assert!(o.any());
    }
}
