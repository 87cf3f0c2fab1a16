//! Downlink Opus encoding: mono, 60 ms frames, 24 kHz by default, 24 kb/s.
//!
//! `Application::Audio` at complexity 5 makes libopus 1.6 code 24 kHz speech as CELT only,
//! which costs about 100 µs per 60 ms frame: a sixth of the hybrid (SILK + CELT) mode the
//! `Voip` application or complexity 9 picks (`shared/notes/costs-and-wakeups.md` §2). The
//! encoder is the largest per-stream cost on the downlink, so the complexity is configurable.
//!
//! [`frames`] cuts a segment into whole frames, zero-padding the last one.

use std::borrow::Cow;

/// Default downlink sample rate (what xiaozhi devices play).
pub const DOWNLINK_RATE: u32 = 24_000;
/// Frame duration in milliseconds.
pub const FRAME_MS: u32 = 60;
/// Default encoder complexity (0–10).
pub const DEFAULT_COMPLEXITY: i32 = 5;
/// Target bitrate in bits per second.
pub const BITRATE: i32 = 24_000;
/// Largest packet accepted from libopus (its recommended maximum).
const MAX_PACKET: usize = 4000;

/// Why an encoder was not built or a frame not encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// Opus supports 8, 12, 16, 24 and 48 kHz only.
    #[error("opus cannot encode at {0} Hz")]
    Rate(u32),
    /// The frame does not hold exactly one frame of samples.
    #[error("frame of {got} samples, expected {want}")]
    FrameLength {
        /// Samples given.
        got: usize,
        /// Samples per frame.
        want: usize,
    },
    /// libopus refused the settings or the frame.
    #[error("opus encoder: {0}")]
    Opus(String),
}

/// One session's downlink encoder (libopus state is ~30 KiB: create it when a reply starts).
pub struct DownlinkEncoder {
    encoder: opus::Encoder,
    rate: u32,
    frame_samples: usize,
    packet: Vec<u8>,
}

impl DownlinkEncoder {
    /// A mono encoder at `rate` Hz with `complexity` (0–10), 24 kb/s, 60 ms frames.
    pub fn new(rate: u32, complexity: i32) -> Result<Self, EncodeError> {
        if !matches!(rate, 8_000 | 12_000 | 16_000 | 24_000 | 48_000) {
            return Err(EncodeError::Rate(rate));
        }
        let opus_error = |e: opus::Error| EncodeError::Opus(e.to_string());
        let mut encoder = opus::Encoder::new(rate, opus::Channels::Mono, opus::Application::Audio)
            .map_err(opus_error)?;
        encoder
            .set_bitrate(opus::Bitrate::Bits(BITRATE))
            .map_err(opus_error)?;
        encoder.set_complexity(complexity).map_err(opus_error)?;
        Ok(DownlinkEncoder {
            encoder,
            rate,
            frame_samples: (rate * FRAME_MS / 1000) as usize,
            packet: vec![0; MAX_PACKET],
        })
    }

    /// Sample rate in Hz.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Samples per 60 ms frame (1440 at 24 kHz).
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// Samples of delay the encoder adds before the input appears in the decoded output.
    pub fn lookahead(&mut self) -> Result<usize, EncodeError> {
        self.encoder
            .get_lookahead()
            .map(|n| n.max(0) as usize)
            .map_err(|e| EncodeError::Opus(e.to_string()))
    }

    /// Encodes exactly one frame ([`Self::frame_samples`] samples) into one Opus packet.
    pub fn encode(&mut self, pcm: &[i16]) -> Result<Vec<u8>, EncodeError> {
        if pcm.len() != self.frame_samples {
            return Err(EncodeError::FrameLength {
                got: pcm.len(),
                want: self.frame_samples,
            });
        }
        let n = self
            .encoder
            .encode(pcm, &mut self.packet)
            .map_err(|e| EncodeError::Opus(e.to_string()))?;
        Ok(self.packet[..n].to_vec())
    }

    /// Forgets the previous audio (start of a new reply after an abort).
    pub fn reset(&mut self) -> Result<(), EncodeError> {
        self.encoder
            .reset_state()
            .map_err(|e| EncodeError::Opus(e.to_string()))
    }
}

/// `pcm` cut into frames of `frame_samples`; whole frames are borrowed, a shorter last frame
/// is copied and zero-padded. `frame_samples` of 0 yields nothing.
pub fn frames(pcm: &[i16], frame_samples: usize) -> impl Iterator<Item = Cow<'_, [i16]>> {
    let usable = if frame_samples == 0 { 0 } else { pcm.len() };
    pcm[..usable].chunks(frame_samples.max(1)).map(move |c| {
        if c.len() == frame_samples {
            Cow::Borrowed(c)
        } else {
            let mut padded = c.to_vec();
            padded.resize(frame_samples, 0);
            Cow::Owned(padded)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One second of a speech-like signal at 24 kHz: a 140 Hz voice with decaying harmonics
    /// through two formant-like peaks, gliding in pitch and amplitude-modulated at 4 Hz.
    fn speech_like() -> Vec<i16> {
        let rate = 24_000.0;
        let mut phase = 0.0f64;
        (0..24_000)
            .map(|i| {
                let t = f64::from(i) / rate;
                let f0 = 140.0 + 30.0 * (2.0 * std::f64::consts::PI * 1.5 * t).sin();
                phase += 2.0 * std::f64::consts::PI * f0 / rate;
                let mut x = 0.0;
                for h in 1..=20 {
                    let f = f0 * f64::from(h);
                    let formant = (-((f - 600.0) / 300.0).powi(2)).exp()
                        + 0.6 * (-((f - 1800.0) / 400.0).powi(2)).exp();
                    x += (0.2 / f64::from(h) + formant) * (phase * f64::from(h)).sin();
                }
                let envelope = 0.55 + 0.45 * (2.0 * std::f64::consts::PI * 4.0 * t).sin();
                (x * envelope * 6000.0).clamp(-32768.0, 32767.0) as i16
            })
            .collect()
    }

    fn correlation(a: &[i16], b: &[i16]) -> f64 {
        let (mut xy, mut xx, mut yy) = (0.0, 0.0, 0.0);
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (f64::from(x), f64::from(y));
            xy += x * y;
            xx += x * x;
            yy += y * y;
        }
        xy / (xx * yy).sqrt()
    }

    #[test]
    fn one_second_round_trips_through_a_24khz_decoder() {
        let pcm = speech_like();
        let mut enc = DownlinkEncoder::new(DOWNLINK_RATE, DEFAULT_COMPLEXITY).expect("encoder");
        assert_eq!(enc.frame_samples(), 1440);
        let delay = enc.lookahead().expect("lookahead");
        let mut dec = opus::Decoder::new(24_000, opus::Channels::Mono).expect("decoder");
        let mut decoded = Vec::new();
        let mut buf = [0i16; 5760];
        let mut bytes = 0;
        let mut packets = 0;
        for frame in frames(&pcm, enc.frame_samples()) {
            let packet = enc.encode(&frame).expect("encode");
            bytes += packet.len();
            packets += 1;
            let n = dec.decode(&packet, &mut buf, false).expect("decode");
            assert_eq!(n, 1440);
            decoded.extend_from_slice(&buf[..n]);
        }
        assert_eq!(packets, 17); // 24000 / 1440 = 16.7, last frame padded
        let corr = correlation(&pcm[..pcm.len() - delay], &decoded[delay..pcm.len()]);
        eprintln!(
            "lookahead {delay} samples, {} B/packet, correlation {corr:.3}",
            bytes / packets
        );
        assert!(corr > 0.8, "correlation {corr}");
        // 24 kb/s over 60 ms is 180 B; allow VBR swings.
        assert!(
            (100..=300).contains(&(bytes / packets)),
            "{} B",
            bytes / packets
        );
    }

    #[test]
    fn wrong_frame_length_and_rate_are_errors() {
        let mut enc = DownlinkEncoder::new(24_000, 5).expect("encoder");
        assert_eq!(
            enc.encode(&[0; 960]),
            Err(EncodeError::FrameLength {
                got: 960,
                want: 1440
            })
        );
        assert!(matches!(
            DownlinkEncoder::new(22_050, 5),
            Err(EncodeError::Rate(22_050))
        ));
        assert!(matches!(
            DownlinkEncoder::new(24_000, 11),
            Err(EncodeError::Opus(_))
        ));
        assert_eq!(
            DownlinkEncoder::new(16_000, 0)
                .expect("16k")
                .frame_samples(),
            960
        );
    }

    #[test]
    fn frames_borrow_whole_frames_and_pad_the_last() {
        let pcm: Vec<i16> = (1..=7).collect();
        let got: Vec<Cow<'_, [i16]>> = frames(&pcm, 3).collect();
        assert_eq!(got.len(), 3);
        assert!(matches!(got[0], Cow::Borrowed(_)));
        assert_eq!(&*got[1], &[4, 5, 6]);
        assert!(matches!(got[2], Cow::Owned(_)));
        assert_eq!(&*got[2], &[7, 0, 0]);
        assert_eq!(frames(&pcm, 7).count(), 1);
        assert_eq!(frames(&[], 3).count(), 0);
        assert_eq!(frames(&pcm, 0).count(), 0);
    }
}
