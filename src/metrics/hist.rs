//! Per-shard latency histograms (HdrHistogram, microseconds), merged across shards on request.

use hdrhistogram::Histogram;

/// A measured stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A VAD batch finished on its worker → the shard's reply router received the answer
    /// (the cross-core wake-up; one sample per batch).
    VadReplyWake,
    /// VAD job queued on the shard → a worker started it.
    VadQueueWait,
    /// Wall time of the forward passes a job took part in ÷ its chunks: the latency a chunk
    /// sees, not the per-row cost (a batched pass counts whole for each of its rows).
    VadPerChunk,
    /// Rows in the forward pass that computed a job.
    VadBatchSize,
    /// WebSocket upgrade done → hello answered, microseconds.
    ConnectToHello,
    /// End of speech decided → transcript, microseconds.
    EosToTranscript,
    /// End of speech decided → first LLM token, microseconds.
    EosToFirstToken,
    /// End of speech decided → first audio frame sent, microseconds.
    EosToFirstAudio,
    /// End of speech decided → `tts stop` sent, microseconds.
    EosToTtsStop,
    /// A paced frame's send time minus its due time, microseconds.
    FramePacingJitter,
    /// Local ASR model time per utterance, microseconds.
    AsrCompute,
    /// Local TTS model time per segment, microseconds.
    TtsCompute,
    /// How late a periodic 50 ms timer on the shard's default queue fired, microseconds: the
    /// wait any session task can see (a busy executor, or the thread descheduled).
    ShardTimerLate,
}

impl Stage {
    /// Every stage, in export order.
    pub const ALL: [Stage; 13] = [
        Stage::VadReplyWake,
        Stage::VadQueueWait,
        Stage::VadPerChunk,
        Stage::VadBatchSize,
        Stage::ConnectToHello,
        Stage::EosToTranscript,
        Stage::EosToFirstToken,
        Stage::EosToFirstAudio,
        Stage::EosToTtsStop,
        Stage::FramePacingJitter,
        Stage::AsrCompute,
        Stage::TtsCompute,
        Stage::ShardTimerLate,
    ];

    /// Metric / file name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::VadReplyWake => "vad_reply_wake_us",
            Stage::VadQueueWait => "vad_queue_wait_us",
            Stage::VadPerChunk => "vad_per_chunk_us",
            Stage::VadBatchSize => "vad_batch_size",
            Stage::ConnectToHello => "connect_to_hello_us",
            Stage::EosToTranscript => "eos_to_transcript_us",
            Stage::EosToFirstToken => "eos_to_first_token_us",
            Stage::EosToFirstAudio => "eos_to_first_audio_us",
            Stage::EosToTtsStop => "eos_to_tts_stop_us",
            Stage::FramePacingJitter => "frame_pacing_jitter_us",
            Stage::AsrCompute => "asr_compute_us",
            Stage::TtsCompute => "tts_compute_us",
            Stage::ShardTimerLate => "shard_timer_late_us",
        }
    }

    /// The stage called `name` (as in [`Stage::name`]).
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }

    /// One-line description.
    pub fn help(self) -> &'static str {
        match self {
            Stage::VadReplyWake => {
                "VAD batch finished on its worker -> shard received the answer (cross-core wake-up, one sample per batch), microseconds."
            }
            Stage::VadQueueWait => {
                "VAD job queued on the shard -> worker started it, microseconds."
            }
            Stage::VadPerChunk => {
                "Wall time of the forward passes a VAD job took part in, per 32 ms chunk of the job (a batched pass counts whole for each of its rows), microseconds."
            }
            Stage::VadBatchSize => "Rows in the batched forward pass that computed a VAD job.",
            Stage::ConnectToHello => "WebSocket upgrade -> hello answered, microseconds.",
            Stage::EosToTranscript => "End of speech decided -> transcript ready, microseconds.",
            Stage::EosToFirstToken => "End of speech decided -> first LLM token, microseconds.",
            Stage::EosToFirstAudio => {
                "End of speech decided -> first audio frame sent, microseconds."
            }
            Stage::EosToTtsStop => "End of speech decided -> tts stop sent, microseconds.",
            Stage::FramePacingJitter => "Paced frame sent minus due time, microseconds.",
            Stage::AsrCompute => "Local ASR model time per utterance, microseconds.",
            Stage::TtsCompute => "Local TTS model time per segment, microseconds.",
            Stage::ShardTimerLate => {
                "Lateness of a 50 ms timer on the shard's default task queue, microseconds."
            }
        }
    }
}

/// How a session's device is connected: the label that tells transports apart in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A device's own WebSocket.
    WebSocket,
    /// The MQTT + UDP transport terminated by this server.
    Mqtt,
    /// A WebSocket from the stock MQTT gateway (`?from=mqtt_gateway`).
    Gateway,
}

impl Transport {
    /// Every transport, in export order.
    pub const ALL: [Transport; 3] = [Transport::WebSocket, Transport::Mqtt, Transport::Gateway];

    /// The `transport` label value.
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Mqtt => "mqtt",
            Transport::Gateway => "gateway",
        }
    }
}

/// One histogram per stage, and end of speech → first audio once more per transport.
#[derive(Clone)]
pub struct StageHistograms {
    hists: Vec<Histogram<u64>>,
    first_audio_by_transport: Vec<Histogram<u64>>,
}

fn microseconds() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

impl Default for StageHistograms {
    fn default() -> Self {
        StageHistograms {
            hists: Stage::ALL.iter().map(|_| microseconds()).collect(),
            first_audio_by_transport: Transport::ALL.iter().map(|_| microseconds()).collect(),
        }
    }
}

impl StageHistograms {
    /// Records `value` (saturating at the bounds).
    pub fn record(&mut self, stage: Stage, value: u64) {
        if let Some(h) = self.hists.get_mut(stage as usize) {
            h.saturating_record(value.max(1));
        }
    }

    /// Records `value` for `stage` of a session on `transport`: in the stage's histogram and,
    /// for [`Stage::EosToFirstAudio`], in that transport's own.
    pub fn record_on(&mut self, transport: Transport, stage: Stage, value: u64) {
        self.record(stage, value);
        if stage == Stage::EosToFirstAudio {
            if let Some(h) = self.first_audio_by_transport.get_mut(transport as usize) {
                h.saturating_record(value.max(1));
            }
        }
    }

    /// The histogram of `stage`.
    pub fn get(&self, stage: Stage) -> &Histogram<u64> {
        &self.hists[stage as usize]
    }

    /// End of speech → first audio of the sessions on `transport`.
    pub fn first_audio_on(&self, transport: Transport) -> &Histogram<u64> {
        &self.first_audio_by_transport[transport as usize]
    }

    /// Adds every histogram of `other` into this one.
    pub fn merge(&mut self, other: &StageHistograms) {
        for (a, b) in self.hists.iter_mut().zip(&other.hists) {
            let _ = a.add(b);
        }
        for (a, b) in self
            .first_audio_by_transport
            .iter_mut()
            .zip(&other.first_audio_by_transport)
        {
            let _ = a.add(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_equals_histogram_of_the_union() {
        let mut a = StageHistograms::default();
        let mut b = StageHistograms::default();
        let mut union = StageHistograms::default();
        for v in 1..1000u64 {
            let (h, x) = if v % 3 == 0 {
                (&mut a, v * 7)
            } else {
                (&mut b, v * 13)
            };
            h.record(Stage::VadReplyWake, x);
            union.record(Stage::VadReplyWake, x);
        }
        a.merge(&b);
        let (m, u) = (a.get(Stage::VadReplyWake), union.get(Stage::VadReplyWake));
        assert_eq!(m.len(), u.len());
        for q in [0.5, 0.9, 0.99, 1.0] {
            assert_eq!(m.value_at_quantile(q), u.value_at_quantile(q));
        }
    }
}
