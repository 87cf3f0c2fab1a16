//! Sample-rate conversion of whole segments (a synthesised sentence, a test clip), e.g. TTS
//! output at 22050 Hz to the 24 kHz downlink.
//!
//! rubato's FFT resampler (synchronous, fixed input chunk of 1024 frames) costs about 0.1 ms
//! per second of audio and delays its output by 7–10 ms; `process_all` trims that delay, so
//! the output lines up with the input sample for sample. Constructing a resampler costs about
//! 60 µs, so each thread keeps the last one it built and reuses it for the same pair of rates.

use std::cell::RefCell;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

/// Input frames per FFT chunk.
const CHUNK: usize = 1024;

/// A resampler kept for reuse, with the rates it converts between.
struct Cached {
    rates: (u32, u32),
    resampler: Fft<f32>,
}

thread_local! {
    /// The last resampler this thread built.
    static CACHED: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// `pcm` (mono) converted from `from` Hz to `to` Hz: `ceil(len × to / from)` samples, aligned
/// with the input (the filter delay is removed). Equal rates return a copy. A rate of 0 (no
/// resampler can be built) gives empty output and a warning.
pub fn resample(pcm: &[i16], from: u32, to: u32) -> Vec<i16> {
    if from == to {
        return pcm.to_vec();
    }
    if pcm.is_empty() {
        return Vec::new();
    }
    CACHED.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.as_ref().map(|c| c.rates) != Some((from, to)) {
            match Fft::<f32>::new(from as usize, to as usize, CHUNK, 1, FixedSync::Input) {
                Ok(resampler) => {
                    *cached = Some(Cached {
                        rates: (from, to),
                        resampler,
                    })
                }
                Err(e) => {
                    tracing::warn!(from, to, error = %e, "cannot build a resampler");
                    return Vec::new();
                }
            }
        }
        let Some(Cached { resampler, .. }) = cached.as_mut() else {
            return Vec::new();
        };
        run(resampler, pcm, from, to).unwrap_or_else(|e| {
            tracing::warn!(from, to, error = %e, "resampling failed");
            Vec::new()
        })
    })
}

fn run(resampler: &mut Fft<f32>, pcm: &[i16], from: u32, to: u32) -> Result<Vec<i16>, String> {
    let input: Vec<f32> = pcm.iter().map(|&s| f32::from(s) / 32768.0).collect();
    let adapter = InterleavedSlice::new(&input, 1, input.len()).map_err(|e| e.to_string())?;
    let output = resampler
        .process_all(&adapter, input.len(), None)
        .map_err(|e| e.to_string())?;
    // rubato sizes the output from a float ratio, which can round up one sample too many.
    let len = (pcm.len() as u64 * u64::from(to)).div_ceil(u64::from(from)) as usize;
    Ok(output
        .take_data()
        .into_iter()
        .take(len)
        .map(|x| (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, hz: f64, secs: f64) -> Vec<i16> {
        let n = (f64::from(rate) * secs) as usize;
        (0..n)
            .map(|i| {
                let t = i as f64 / f64::from(rate);
                (16_000.0 * (2.0 * std::f64::consts::PI * hz * t).sin()) as i16
            })
            .collect()
    }

    /// Normalised correlation of `pcm` (away from the edges) with a 1 kHz sine of the same
    /// phase at `rate`.
    fn match_with_sine(pcm: &[i16], rate: u32) -> f64 {
        let ideal = sine(rate, 1000.0, pcm.len() as f64 / f64::from(rate) + 0.01);
        let range = rate as usize / 10..pcm.len() - rate as usize / 10;
        let (mut xy, mut xx, mut yy) = (0.0, 0.0, 0.0);
        for i in range {
            let (x, y) = (f64::from(pcm[i]), f64::from(ideal[i]));
            xy += x * y;
            xx += x * x;
            yy += y * y;
        }
        xy / (xx * yy).sqrt()
    }

    /// Frequency from upward zero crossings over the middle of the clip.
    fn frequency(pcm: &[i16], rate: u32) -> f64 {
        let mid = &pcm[rate as usize / 10..pcm.len() - rate as usize / 10];
        let ups: Vec<usize> = mid
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0] < 0 && w[1] >= 0)
            .map(|(i, _)| i)
            .collect();
        let periods = (ups.len() - 1) as f64;
        periods * f64::from(rate) / (ups[ups.len() - 1] - ups[0]) as f64
    }

    #[test]
    fn one_khz_sine_keeps_its_frequency_phase_and_length_ratio() {
        for (from, to) in [(22_050, 24_000), (16_000, 24_000), (24_000, 16_000)] {
            let input = sine(from, 1000.0, 1.0);
            let out = resample(&input, from, to);
            assert_eq!(out.len(), to as usize, "{from} -> {to}");
            let hz = frequency(&out, to);
            assert!((hz - 1000.0).abs() < 1.0, "{from} -> {to}: {hz} Hz");
            let corr = match_with_sine(&out, to);
            assert!(
                corr > 0.999,
                "{from} -> {to}: delay not trimmed? corr {corr}"
            );
        }
    }

    #[test]
    fn reusing_the_cached_resampler_gives_identical_output() {
        let input = sine(22_050, 1000.0, 0.5);
        let first = resample(&input, 22_050, 24_000);
        let _other = resample(&input, 16_000, 24_000);
        let again = resample(&input, 22_050, 24_000);
        let third = resample(&input, 22_050, 24_000);
        assert_eq!(first, again);
        assert_eq!(first, third);
    }

    #[test]
    fn equal_rates_copy_and_empty_input_stays_empty() {
        let input = sine(24_000, 1000.0, 0.1);
        assert_eq!(resample(&input, 24_000, 24_000), input);
        assert!(resample(&[], 22_050, 24_000).is_empty());
    }

    #[test]
    fn zero_rate_gives_empty_output_not_a_panic() {
        assert!(resample(&[1, 2, 3], 0, 24_000).is_empty());
    }

    #[test]
    fn clip_shorter_than_one_chunk_is_resampled() {
        let input = sine(22_050, 1000.0, 0.02);
        let out = resample(&input, 22_050, 24_000);
        assert_eq!(out.len(), (input.len() * 24_000).div_ceil(22_050));
    }
}
