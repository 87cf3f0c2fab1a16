//! The uplink half of a turn on the shard: Opus packets in, VAD jobs out to an inference core,
//! VAD results back in, utterances out.
//!
//! One VAD job per session is in flight at a time: the session's recurrent Silero state travels
//! with the job and comes back with the result, so the worker is stateless and results are
//! applied strictly in order. Chunks that arrive meanwhile wait in a bounded backlog and go in the
//! next job (several chunks per job). Every job carries the turn id; a result from an older
//! turn (after `listen start` or an abort) is dropped, never applied.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::audio::{Chunker, DecodeError, UplinkDecoder};
use crate::pipeline::segmenter::{Event, Mode, Segmenter, SegmenterConfig, CHUNK_SAMPLES};
use crate::providers::vad::{VadJob, VadResult, VadStream};

/// Limits of one session's uplink.
#[derive(Debug, Clone)]
pub struct AudioInLimits {
    /// Longest a chunk may wait for VAD (wall clock) before the turn is shed: the sign that
    /// inference is not keeping up. A burst of audio that is processed promptly is fine.
    pub max_wait: Duration,
    /// Most chunks waiting for VAD at all (memory bound, whatever the timing).
    pub max_backlog_chunks: usize,
    /// Most chunks in one VAD job.
    pub max_chunks_per_job: usize,
}

/// Counters of one session's uplink.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AudioInCounters {
    /// Packets decoded.
    pub decoded: u64,
    /// Packets that did not decode (skipped).
    pub garbage: u64,
    /// VAD jobs handed out.
    pub jobs: u64,
    /// Results dropped because their turn had ended.
    pub stale_results: u64,
    /// Results that carried a model error (their chunks counted as silence).
    pub vad_errors: u64,
    /// Utterances emitted.
    pub utterances: u64,
}

/// What happened to a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum PacketOutcome {
    /// Decoded and queued for VAD.
    Queued,
    /// Not decodable; skipped.
    Garbage,
    /// Audio waited too long for VAD, or the backlog is over its bound: the caller sheds the turn.
    Overloaded,
}

struct InFlight {
    seq: u64,
    chunks: Vec<[i16; CHUNK_SAMPLES]>,
}

/// One session's uplink pipeline state (created when audio starts; ~30 KiB with the decoder).
pub struct AudioIn {
    decoder: Option<UplinkDecoder>,
    chunker: Chunker,
    backlog: VecDeque<[i16; CHUNK_SAMPLES]>,
    /// When the oldest chunk in the backlog arrived (wall clock).
    oldest_waiting: Option<Instant>,
    in_flight: Option<InFlight>,
    stream: Option<VadStream>,
    segmenter: Segmenter,
    turn: u32,
    next_seq: u64,
    stop_requested: bool,
    limits: AudioInLimits,
    /// Counters.
    pub counters: AudioInCounters,
}

impl AudioIn {
    /// A fresh uplink in `mode`.
    pub fn new(config: SegmenterConfig, mode: Mode, limits: AudioInLimits) -> AudioIn {
        AudioIn {
            decoder: None,
            chunker: Chunker::default(),
            backlog: VecDeque::new(),
            oldest_waiting: None,
            in_flight: None,
            stream: Some(VadStream::default()),
            segmenter: Segmenter::new(config, mode),
            turn: 0,
            next_seq: 0,
            stop_requested: false,
            limits,
            counters: AudioInCounters::default(),
        }
    }

    /// Current turn id.
    pub fn turn(&self) -> u32 {
        self.turn
    }

    /// Audio time of the current turn so far, ms.
    pub fn audio_ms(&self) -> u64 {
        self.segmenter.audio_ms()
    }

    /// Chunks waiting for VAD.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// Starts a new turn (listen start, abort, wake word): forgets audio, VAD state and any
    /// result still in flight (it will arrive stale and be dropped).
    pub fn new_turn(&mut self, mode: Mode) {
        self.turn = self.turn.wrapping_add(1);
        self.backlog.clear();
        self.oldest_waiting = None;
        self.in_flight = None;
        self.stream = Some(VadStream::default());
        self.chunker.reset();
        self.segmenter.set_mode(mode);
        self.stop_requested = false;
    }

    /// Decodes one Opus packet (arrived at `now`) and queues its chunks for VAD.
    pub fn on_packet(&mut self, packet: &[u8], now: Instant) -> Result<PacketOutcome, DecodeError> {
        if self.decoder.is_none() {
            self.decoder = Some(UplinkDecoder::new()?);
        }
        let Some(decoder) = self.decoder.as_mut() else {
            return Ok(PacketOutcome::Garbage);
        };
        let pcm = match decoder.decode(packet) {
            Ok(pcm) => pcm,
            Err(_) => {
                self.counters.garbage += 1;
                return Ok(PacketOutcome::Garbage);
            }
        };
        self.counters.decoded += 1;
        let backlog = &mut self.backlog;
        self.chunker.push(pcm, |_, chunk| backlog.push_back(*chunk));
        if self.backlog.is_empty() {
            return Ok(PacketOutcome::Queued);
        }
        let oldest = *self.oldest_waiting.get_or_insert(now);
        if self.backlog.len() > self.limits.max_backlog_chunks
            || now.saturating_duration_since(oldest) > self.limits.max_wait
        {
            return Ok(PacketOutcome::Overloaded);
        }
        Ok(PacketOutcome::Queued)
    }

    /// The next VAD job, if none is in flight and chunks are waiting.
    pub fn take_job(&mut self, session: u64, now: Instant) -> Option<VadJob> {
        if self.in_flight.is_some() || self.backlog.is_empty() {
            return None;
        }
        let stream = self.stream.take()?;
        let n = self
            .backlog
            .len()
            .min(self.limits.max_chunks_per_job.max(1));
        let chunks: Vec<_> = self.backlog.drain(..n).collect();
        // What is left waited since now at the latest (an approximation that only errs late).
        self.oldest_waiting = if self.backlog.is_empty() {
            None
        } else {
            Some(now)
        };
        let floats = chunks
            .iter()
            .map(|c| {
                let mut f = [0f32; CHUNK_SAMPLES];
                for (o, s) in f.iter_mut().zip(c.iter()) {
                    *o = f32::from(*s) / 32768.0;
                }
                f
            })
            .collect();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight = Some(InFlight { seq, chunks });
        self.counters.jobs += 1;
        Some(VadJob {
            session,
            seq,
            turn: self.turn,
            chunks: floats,
            stream,
            submitted: now,
        })
    }

    /// The job could not be queued (inference queue full): take it back, nothing is lost.
    pub fn job_refused(&mut self, job: VadJob) {
        if let Some(f) = self.in_flight.take() {
            if f.seq == job.seq {
                for c in f.chunks.into_iter().rev() {
                    self.backlog.push_front(c);
                }
                self.oldest_waiting = Some(
                    self.oldest_waiting
                        .map_or(job.submitted, |t| t.min(job.submitted)),
                );
                self.stream = Some(job.stream);
                self.counters.jobs -= 1;
                return;
            }
            self.in_flight = Some(f);
        }
    }

    /// Applies a VAD result; pushes segmentation events. Returns false for a stale result.
    pub fn on_result(&mut self, result: VadResult, events: &mut Vec<Event>) -> bool {
        let current =
            matches!(&self.in_flight, Some(f) if f.seq == result.seq) && result.turn == self.turn;
        if !current {
            self.counters.stale_results += 1;
            return false;
        }
        let Some(flight) = self.in_flight.take() else {
            return false;
        };
        if result.error.is_some() {
            self.counters.vad_errors += 1;
        }
        self.stream = Some(result.stream);
        for (i, chunk) in flight.chunks.iter().enumerate() {
            // A chunk the model could not score counts as silence: audio time stays exact.
            let prob = result.probs.get(i).copied().unwrap_or(0.0);
            self.segmenter.push(prob, chunk, events);
        }
        self.finish_stop_if_drained(events);
        self.counters.utterances += events
            .iter()
            .filter(|e| matches!(e, Event::Utterance(_)))
            .count() as u64;
        true
    }

    /// The device sent `listen stop`: end the utterance once every queued chunk is scored.
    pub fn stop(&mut self, events: &mut Vec<Event>) {
        self.stop_requested = true;
        self.finish_stop_if_drained(events);
        if events.iter().any(|e| matches!(e, Event::Utterance(_))) {
            self.counters.utterances += 1;
        }
    }

    fn finish_stop_if_drained(&mut self, events: &mut Vec<Event>) {
        if self.stop_requested && self.in_flight.is_none() && self.backlog.is_empty() {
            self.stop_requested = false;
            if let Some(e) = self.segmenter.stop() {
                events.push(e);
            }
        }
    }

    /// True while a VAD job of this session is on an inference core.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> AudioInLimits {
        AudioInLimits {
            max_wait: Duration::from_millis(1500),
            max_backlog_chunks: 64,
            max_chunks_per_job: 4,
        }
    }

    fn packet(enc: &mut opus::Encoder, loud: bool) -> Vec<u8> {
        let pcm: Vec<i16> = (0..960)
            .map(|i| {
                if loud {
                    ((i as f32 * 0.3).sin() * 9000.0) as i16
                } else {
                    0
                }
            })
            .collect();
        let mut out = vec![0u8; 1500];
        let n = enc.encode(&pcm, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn result_for(job: &VadJob, prob: f32) -> VadResult {
        VadResult {
            session: job.session,
            seq: job.seq,
            turn: job.turn,
            probs: vec![prob; job.chunks.len()],
            stream: job.stream.clone(),
            submitted: job.submitted,
            queue_wait: Duration::ZERO,
            compute: Duration::ZERO,
            batch_size: 1,
            done: Instant::now(),
            error: None,
        }
    }

    #[test]
    fn one_job_in_flight_and_refused_jobs_lose_nothing() {
        let mut enc =
            opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let mut a = AudioIn::new(SegmenterConfig::default(), Mode::Auto, limits());
        for _ in 0..4 {
            assert_eq!(
                a.on_packet(&packet(&mut enc, true), Instant::now())
                    .unwrap(),
                PacketOutcome::Queued
            );
        }
        // 4 × 960 = 3840 samples = 7 whole chunks.
        assert_eq!(a.backlog(), 7);
        let job = a.take_job(9, Instant::now()).unwrap();
        assert_eq!(job.chunks.len(), 4);
        assert!(
            a.take_job(9, Instant::now()).is_none(),
            "one job in flight at a time"
        );
        a.job_refused(job);
        assert_eq!(a.backlog(), 7);
        let job = a.take_job(9, Instant::now()).unwrap();
        assert_eq!(job.seq, 1);
        let mut ev = vec![];
        assert!(a.on_result(result_for(&job, 0.9), &mut ev));
        assert_eq!(a.backlog(), 3);
        assert_eq!(a.audio_ms(), 4 * 32);
    }

    #[test]
    fn results_of_an_ended_turn_are_dropped_not_applied() {
        let mut enc =
            opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let mut a = AudioIn::new(SegmenterConfig::default(), Mode::Auto, limits());
        a.on_packet(&packet(&mut enc, true), Instant::now())
            .unwrap();
        let job = a.take_job(1, Instant::now()).unwrap();
        a.new_turn(Mode::Auto);
        let mut ev = vec![];
        assert!(!a.on_result(result_for(&job, 0.9), &mut ev));
        assert_eq!(a.counters.stale_results, 1);
        assert_eq!(
            a.audio_ms(),
            0,
            "nothing of the old turn reached the segmenter"
        );
    }

    #[test]
    fn garbage_packets_are_counted_and_skipped() {
        let mut a = AudioIn::new(SegmenterConfig::default(), Mode::Auto, limits());
        assert_eq!(
            a.on_packet(&[0xff, 0xff, 0xff], Instant::now()).unwrap(),
            PacketOutcome::Garbage
        );
        assert_eq!(a.counters.garbage, 1);
        assert_eq!(a.backlog(), 0);
    }

    #[test]
    fn audio_waiting_too_long_reports_overload_but_a_prompt_burst_does_not() {
        let mut enc =
            opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let mut a = AudioIn::new(SegmenterConfig::default(), Mode::Auto, limits());
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                a.on_packet(&packet(&mut enc, false), t0).unwrap(),
                PacketOutcome::Queued
            );
        }
        let late = t0 + Duration::from_millis(1600);
        assert_eq!(
            a.on_packet(&packet(&mut enc, false), late).unwrap(),
            PacketOutcome::Overloaded
        );
    }

    #[test]
    fn backlog_over_its_bound_reports_overload() {
        let mut enc =
            opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let mut a = AudioIn::new(
            SegmenterConfig::default(),
            Mode::Auto,
            AudioInLimits {
                max_wait: Duration::from_secs(60),
                max_backlog_chunks: 5,
                max_chunks_per_job: 4,
            },
        );
        let outcomes: Vec<_> = (0..4)
            .map(|_| {
                a.on_packet(&packet(&mut enc, false), Instant::now())
                    .unwrap()
            })
            .collect();
        assert_eq!(outcomes.last(), Some(&PacketOutcome::Overloaded));
    }
}
