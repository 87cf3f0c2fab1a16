//! Uplink Opus decoding: 16 kHz mono, any Opus frame length up to 120 ms.
//!
//! A packet that does not decode (garbage, wrong codec) is an error value the caller counts
//! and skips; the decoder stays usable.

/// Uplink sample rate (the device resamples its microphone to 16 kHz).
pub const UPLINK_RATE: u32 = 16_000;
/// Longest Opus packet duration (120 ms) in samples at 16 kHz.
const MAX_FRAME: usize = 1920;

/// Why a packet was not decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// libopus rejected the packet.
    #[error("opus packet not decodable: {0}")]
    Opus(String),
    /// The decoder could not be created.
    #[error("opus decoder unavailable: {0}")]
    Init(String),
}

/// One session's uplink decoder (libopus state is ~18 KiB: create it when audio starts).
pub struct UplinkDecoder {
    decoder: opus::Decoder,
    pcm: Vec<i16>,
}

impl UplinkDecoder {
    /// A 16 kHz mono decoder.
    pub fn new() -> Result<Self, DecodeError> {
        let decoder = opus::Decoder::new(UPLINK_RATE, opus::Channels::Mono)
            .map_err(|e| DecodeError::Init(e.to_string()))?;
        Ok(UplinkDecoder {
            decoder,
            pcm: vec![0; MAX_FRAME],
        })
    }

    /// Decodes one packet; returns its PCM (valid until the next call).
    pub fn decode(&mut self, packet: &[u8]) -> Result<&[i16], DecodeError> {
        if packet.is_empty() {
            return Err(DecodeError::Opus("empty packet".into()));
        }
        let n = self
            .decoder
            .decode(packet, &mut self.pcm, false)
            .map_err(|e| DecodeError::Opus(e.to_string()))?;
        Ok(&self.pcm[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_opus_round_trips_and_garbage_is_an_error_not_a_panic() {
        let mut enc =
            opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let pcm: Vec<i16> = (0..960)
            .map(|i| ((i as f32 * 0.1).sin() * 8000.0) as i16)
            .collect();
        let mut packet = vec![0u8; 4000];
        let n = enc.encode(&pcm, &mut packet).unwrap();
        let mut dec = UplinkDecoder::new().unwrap();
        assert_eq!(dec.decode(&packet[..n]).unwrap().len(), 960);
        assert!(dec.decode(&[0xff; 7]).is_err());
        assert!(dec.decode(&[]).is_err());
        // Still usable after garbage.
        assert_eq!(dec.decode(&packet[..n]).unwrap().len(), 960);
    }
}
