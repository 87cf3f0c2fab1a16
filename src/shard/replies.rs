//! The one router that takes inference replies ([`Reply`]) from this shard's reply channels to
//! session mailboxes: it records the reply's timings in the stage histograms, turns it into
//! the [`SessionEvent`] the session already understands, and counts a reply whose session is
//! gone (or whose mailbox is full) as an orphan.
//!
//! What differs per kind of work — which histograms, which event, whether the mailbox bound
//! applies — is the [`RoutedReply`] impl of its payload; the loop is written once.

use std::rc::Rc;
use std::time::Instant;

use shards::Routed;

use super::Shard;
use crate::metrics::{Stage, StageHistograms};
use crate::providers::asr::AsrOutput;
use crate::providers::reply::Reply;
use crate::providers::tts::TtsAudio;
use crate::providers::vad::{VadBatchReply, VadFailure, VadResult, VadScores};
use crate::session::SessionEvent;

/// A payload an inference worker answers with, and how its reply reaches a session.
pub trait RoutedReply: Sized {
    /// The reply's error type.
    type Error;
    /// Whether delivery respects the mailbox bound (refused, and counted, when full) or is a
    /// control item (a session has at most its quota of ASR and TTS jobs outstanding, see
    /// `crate::session::dialogue`, so these are bounded anyway).
    const BOUNDED: bool;
    /// Records what the reply tells about latency; `received` is when the shard took it.
    fn record(reply: &Reply<Self, Self::Error>, received: Instant, hist: &mut StageHistograms);
    /// The session event the reply becomes.
    fn into_event(reply: Reply<Self, Self::Error>) -> SessionEvent;
}

impl RoutedReply for VadScores {
    type Error = VadFailure;
    const BOUNDED: bool = true;

    /// The wake-up is recorded once per batch, by [`route_vad`].
    fn record(reply: &Reply<Self, VadFailure>, _received: Instant, h: &mut StageHistograms) {
        let t = &reply.timings;
        h.record(Stage::VadQueueWait, t.queue_wait.as_micros() as u64);
        let scores = match &reply.result {
            Ok(scores) => scores,
            Err(failure) => &failure.partial,
        };
        if !scores.probs.is_empty() {
            h.record(
                Stage::VadPerChunk,
                (t.compute.as_micros() as u64) / scores.probs.len() as u64,
            );
        }
        h.record(Stage::VadBatchSize, scores.batch_size as u64);
    }

    fn into_event(reply: Reply<Self, VadFailure>) -> SessionEvent {
        SessionEvent::Vad(Box::new(VadResult::from(reply)))
    }
}

impl RoutedReply for AsrOutput {
    type Error = String;
    const BOUNDED: bool = false;

    fn record(reply: &Reply<Self>, _received: Instant, h: &mut StageHistograms) {
        if !reply.is_cancelled() {
            h.record(Stage::AsrCompute, reply.timings.compute.as_micros() as u64);
        }
    }

    fn into_event(reply: Reply<Self>) -> SessionEvent {
        SessionEvent::Asr {
            turn: reply.turn,
            result: reply.result.map(|o| o.text),
        }
    }
}

impl RoutedReply for TtsAudio {
    type Error = String;
    const BOUNDED: bool = false;

    fn record(reply: &Reply<Self>, _received: Instant, h: &mut StageHistograms) {
        if !reply.is_cancelled() {
            h.record(Stage::TtsCompute, reply.timings.compute.as_micros() as u64);
        }
    }

    fn into_event(reply: Reply<Self>) -> SessionEvent {
        SessionEvent::Tts {
            turn: reply.turn,
            // TTS jobs carry a u32 sequence; a worker echoes it, so this never saturates.
            seq: u32::try_from(reply.seq).unwrap_or(u32::MAX),
            result: reply.result.map(|a| (a.pcm, a.sample_rate)),
        }
    }
}

/// Receives one kind of this shard's inference replies and hands each to its session, until
/// the workers are gone. Spawned in a latency-sensitive task queue so a busy shard still picks
/// replies up promptly.
pub async fn route<T: RoutedReply>(
    shard: Rc<Shard>,
    rx: flume::Receiver<Routed<Reply<T, T::Error>>>,
) {
    while let Ok(Routed { item, .. }) = rx.recv_async().await {
        T::record(&item, Instant::now(), &mut shard.hist.borrow_mut());
        deliver::<T>(&shard, item);
    }
}

/// Receives this shard's VAD batch answers (one message per tick's batch, see
/// [`super::vad_tick`]) and hands each job's reply to its session, in the batch's order.
pub async fn route_vad(shard: Rc<Shard>, rx: flume::Receiver<Routed<VadBatchReply>>) {
    while let Ok(Routed { item: batch, .. }) = rx.recv_async().await {
        let received = Instant::now();
        {
            let mut hist = shard.hist.borrow_mut();
            let wake = received.saturating_duration_since(batch.finished);
            hist.record(Stage::VadReplyWake, wake.as_micros() as u64);
            for reply in &batch.replies {
                VadScores::record(reply, received, &mut hist);
            }
        }
        shard.providers.vad.answered(batch.seq);
        for reply in batch.replies {
            deliver::<VadScores>(&shard, reply);
        }
    }
}

/// Hands `reply` to its session's mailbox, or counts it as an orphan.
fn deliver<T: RoutedReply>(shard: &Shard, reply: Reply<T, T::Error>) {
    let session = reply.session;
    let event = T::into_event(reply);
    let delivered = match shard.mailbox(session) {
        Some(mb) if T::BOUNDED => mb.try_push(event).is_ok(),
        Some(mb) => {
            mb.push_control(event);
            true
        }
        None => false,
    };
    if !delivered {
        shard.stats.borrow_mut().orphan_results += 1;
    }
}
