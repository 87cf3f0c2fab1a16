//! Open-loop interaction schedule of one simulated device, and the seeded randomness behind it.
//!
//! **Why open loop.** A closed-loop load generator starts interaction k+1 when interaction k has
//! finished (plus think time). A server that stalls then also stalls the load: fewer
//! interactions are started while it is slow, and the few slow ones are a small share of the
//! samples, so the percentiles look better than what users saw ("coordinated omission"). Here
//! every device has a fixed timetable instead:
//!
//! ```text
//! intended[0]   = connect_at + think
//! intended[k+1] = intended[k] + period,   period = utterance + expected_reply + think
//! ```
//!
//! A device starts interaction k at `max(intended[k], previous tts stop + think)`: it never
//! talks over its own reply, but when the server is late the next utterance starts late, and
//! every latency is measured from the **intended** time of the last speech frame
//! (`intended[k] + (frames − 1) × 60 ms`), not from when the frame was actually sent. The delay
//! the server caused to later interactions therefore appears in their latencies instead of
//! disappearing. When replies take about `expected_reply` or less, actual and intended times
//! coincide and the numbers are plain end-of-speech latencies.

use std::time::{Duration, Instant};

/// The timetable of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Intended start (`listen start`) of interaction 0.
    pub first: Instant,
    /// Distance between intended starts.
    pub period: Duration,
    /// Time from an interaction's start to its last speech frame being sent.
    pub last_frame_offset: Duration,
    /// Minimum gap between `tts stop` and the next `listen start`.
    pub think: Duration,
}

impl Schedule {
    /// Builds the timetable for a device that connects at `connect_at`.
    pub fn new(
        connect_at: Instant,
        speech_frames: u32,
        frame: Duration,
        think: Duration,
        expected_reply: Duration,
    ) -> Schedule {
        let utterance = frame * speech_frames;
        Schedule {
            first: connect_at + think,
            period: utterance + expected_reply + think,
            last_frame_offset: frame * speech_frames.saturating_sub(1),
            think,
        }
    }

    /// Intended start of interaction `k`.
    pub fn intended_start(&self, k: u32) -> Instant {
        self.first + self.period * k
    }

    /// Intended send time of interaction `k`'s last speech frame: latencies are measured from here.
    pub fn intended_last_frame(&self, k: u32) -> Instant {
        self.intended_start(k) + self.last_frame_offset
    }

    /// When interaction `k` actually starts, given when the previous one ended (`tts stop`, or
    /// its timeout); `None` for the first.
    pub fn actual_start(&self, k: u32, previous_end: Option<Instant>) -> Instant {
        let intended = self.intended_start(k);
        match previous_end {
            Some(end) => intended.max(end + self.think),
            None => intended,
        }
    }
}

/// How many interactions a device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Exactly this many per device.
    Interactions(u32),
    /// Every interaction whose intended start is before this instant.
    Until(Instant),
}

impl Limit {
    /// Whether interaction `k` (intended to start at `start`) is part of the run.
    pub fn includes(&self, k: u32, start: Instant) -> bool {
        match *self {
            Limit::Interactions(n) => k < n,
            Limit::Until(end) => start < end,
        }
    }
}

/// When device `index` of `devices` connects: evenly spread over the ramp, each moved by a
/// seeded random amount within its own slot so devices do not tick in lockstep.
pub fn connect_offset(index: u32, devices: u32, ramp: Duration, seed: u64) -> Duration {
    if devices == 0 || ramp.is_zero() {
        return Duration::ZERO;
    }
    let slot = ramp / devices;
    let jitter = unit_f64(mix(
        seed ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    ));
    slot * index + slot.mul_f64(jitter)
}

/// The SplitMix64 finaliser: a well-mixed 64-bit value from any input (deterministic).
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A value in `[0, 1)` from 64 random bits.
fn unit_f64(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(60);

    fn schedule(t0: Instant) -> Schedule {
        // 30 frames = 1.8 s of speech, 2.5 s expected reply, 0.5 s think.
        Schedule::new(
            t0,
            30,
            FRAME,
            Duration::from_millis(500),
            Duration::from_millis(2500),
        )
    }

    #[test]
    fn intended_starts_are_a_fixed_period_apart() {
        let t0 = Instant::now();
        let s = schedule(t0);
        assert_eq!(s.period, Duration::from_millis(1800 + 2500 + 500));
        assert_eq!(s.intended_start(0), t0 + Duration::from_millis(500));
        assert_eq!(
            s.intended_start(3),
            t0 + Duration::from_millis(500 + 3 * 4800)
        );
    }

    #[test]
    fn last_frame_is_sent_frames_minus_one_periods_after_start() {
        let t0 = Instant::now();
        let s = schedule(t0);
        assert_eq!(s.last_frame_offset, Duration::from_millis(29 * 60));
        assert_eq!(
            s.intended_last_frame(2),
            s.intended_start(2) + Duration::from_millis(1740)
        );
    }

    #[test]
    fn on_time_reply_keeps_the_intended_start() {
        let t0 = Instant::now();
        let s = schedule(t0);
        // Interaction 0 ended 1 s after its last frame (faster than expected).
        let end = s.intended_last_frame(0) + Duration::from_secs(1);
        assert_eq!(s.actual_start(1, Some(end)), s.intended_start(1));
    }

    #[test]
    fn late_reply_delays_the_next_start_but_not_its_intended_time() {
        let t0 = Instant::now();
        let s = schedule(t0);
        // Reply took 4 s instead of 2.5 s: 1.5 s late.
        let end = s.intended_last_frame(0) + Duration::from_millis(60 + 4000);
        let start = s.actual_start(1, Some(end));
        assert_eq!(start, end + Duration::from_millis(500));
        assert_eq!(start - s.intended_start(1), Duration::from_millis(1500));
        // The schedule itself does not slip: interaction 2 is still intended one period later.
        assert_eq!(s.intended_start(2) - s.intended_start(1), s.period);
    }

    #[test]
    fn limits_count_interactions_or_stop_at_a_deadline() {
        let t0 = Instant::now();
        assert!(Limit::Interactions(2).includes(1, t0));
        assert!(!Limit::Interactions(2).includes(2, t0));
        let end = t0 + Duration::from_secs(10);
        assert!(Limit::Until(end).includes(99, t0 + Duration::from_secs(9)));
        assert!(!Limit::Until(end).includes(0, end));
    }

    #[test]
    fn connect_offsets_stay_in_their_slot_and_depend_on_the_seed() {
        let ramp = Duration::from_secs(10);
        for i in 0..100 {
            let o = connect_offset(i, 100, ramp, 7);
            assert!(o >= Duration::from_millis(100) * i, "{i}: {o:?}");
            assert!(o < Duration::from_millis(100) * (i + 1), "{i}: {o:?}");
            assert_eq!(o, connect_offset(i, 100, ramp, 7), "deterministic");
        }
        assert_ne!(
            connect_offset(5, 100, ramp, 7),
            connect_offset(5, 100, ramp, 8)
        );
        assert_eq!(connect_offset(5, 100, Duration::ZERO, 7), Duration::ZERO);
    }
}
