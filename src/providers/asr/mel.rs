//! Whisper's log-mel input features, computed as OpenAI's reference `log_mel_spectrogram`
//! does: 400-point periodic Hann STFT with hop 160 over `center=True` reflect-padded audio that
//! is followed by 30 s of zeros, power spectrum, Slaney mel filters (0–8 kHz), `log10` clamped
//! at 1e-10, floored at the window's maximum − 8, then `(x + 4) / 4`.
//!
//! ct2rs ships its own feature code, but its `Whisper::generate` does not report the language
//! it detects and always runs the encoder twice when it has to detect one. Computing the
//! features here lets the worker drive CTranslate2's lower-level `sys::Whisper` directly: one
//! encoder pass, the detected language returned, and the right prompt for English-only models.
//!
//! Only frames that overlap the audio are transformed; the rest of the 30 s window is zeros,
//! whose log power is the clamp value, so they are filled in without an FFT.

/// Sample rate every Whisper model expects.
pub const SAMPLE_RATE: usize = 16_000;
/// Samples in one Whisper window (30 s).
pub const WINDOW_SAMPLES: usize = 30 * SAMPLE_RATE;
/// Feature frames in one Whisper window.
pub const WINDOW_FRAMES: usize = WINDOW_SAMPLES / HOP;

/// STFT size.
const N_FFT: usize = 400;
/// STFT hop (10 ms).
const HOP: usize = 160;
/// Spectrum bins kept (`N_FFT / 2 + 1`).
const BINS: usize = N_FFT / 2 + 1;
/// Smallest power before `log10`.
const POWER_FLOOR: f32 = 1e-10;

/// A complex number; only what the FFT needs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Complex {
    re: f32,
    im: f32,
}

impl Complex {
    fn mul(self, o: Complex) -> Complex {
        Complex {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }

    fn add(self, o: Complex) -> Complex {
        Complex {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }
}

/// A mixed-radix decimation-in-time FFT plan (the KISS FFT recursion with its generic
/// butterfly): 400 = 4·4·5·5 costs 400·18 complex multiply-adds, against 160 000 for a DFT.
struct Fft {
    n: usize,
    /// `(radix p, remaining length m)` per stage, outermost first.
    stages: Vec<(usize, usize)>,
    /// `exp(-2πi k / n)` for k in 0..n.
    twiddles: Vec<Complex>,
    /// One butterfly's inputs (length = largest radix).
    scratch: Vec<Complex>,
}

impl Fft {
    fn new(n: usize) -> Fft {
        let mut stages = Vec::new();
        let mut m = n;
        let mut p = 4;
        while m > 1 {
            while !m.is_multiple_of(p) {
                p = match p {
                    4 => 2,
                    2 => 3,
                    _ => p + 2,
                };
                if p * p > m {
                    p = m;
                }
            }
            m /= p;
            stages.push((p, m));
        }
        let twiddles = (0..n)
            .map(|k| {
                let phase = -2.0 * std::f64::consts::PI * k as f64 / n as f64;
                Complex {
                    re: phase.cos() as f32,
                    im: phase.sin() as f32,
                }
            })
            .collect();
        let largest = stages.iter().map(|&(p, _)| p).max().unwrap_or(1);
        Fft {
            n,
            stages,
            twiddles,
            scratch: vec![Complex::default(); largest],
        }
    }

    /// `out = FFT(input)`; both slices are `n` long.
    fn process(&mut self, input: &[Complex], out: &mut [Complex]) {
        if self.n == 0 || input.len() != self.n || out.len() != self.n {
            return;
        }
        if self.stages.is_empty() {
            out.copy_from_slice(input);
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        self.work(out, input, 0, 1, 0, &mut scratch);
        self.scratch = scratch;
    }

    fn work(
        &self,
        out: &mut [Complex],
        input: &[Complex],
        offset: usize,
        stride: usize,
        stage: usize,
        scratch: &mut [Complex],
    ) {
        let (p, m) = self.stages[stage];
        if m == 1 {
            for (q, o) in out.iter_mut().take(p).enumerate() {
                *o = input[offset + q * stride];
            }
        } else {
            for q in 0..p {
                let part = &mut out[q * m..(q + 1) * m];
                self.work(
                    part,
                    input,
                    offset + q * stride,
                    stride * p,
                    stage + 1,
                    scratch,
                );
            }
        }
        // Generic radix-p butterfly: out[u + q1·m] = Σ_q sub_q[u] · W_n^(q·stride·(u + q1·m)).
        for u in 0..m {
            for q1 in 0..p {
                scratch[q1] = out[u + q1 * m];
            }
            for q1 in 0..p {
                let k = u + q1 * m;
                let mut acc = scratch[0];
                let mut tw = 0;
                for &s in &scratch[1..p] {
                    tw += stride * k;
                    if tw >= self.n {
                        tw -= self.n;
                    }
                    acc = acc.add(s.mul(self.twiddles[tw]));
                }
                out[k] = acc;
            }
        }
    }
}

/// One mel filter: its first non-zero bin and its weights from there.
struct MelFilter {
    first_bin: usize,
    weights: Vec<f32>,
}

/// Reusable feature extractor for one model's mel count (80, or 128 for large-v3).
pub struct LogMel {
    n_mels: usize,
    filters: Vec<MelFilter>,
    window: Vec<f32>,
    fft: Fft,
    frame: Vec<Complex>,
    spectrum: Vec<Complex>,
    power: Vec<f32>,
    /// `[n_mels, WINDOW_FRAMES]`, row-major: the model input.
    features: Vec<f32>,
}

impl LogMel {
    /// An extractor producing `n_mels` bands.
    pub fn new(n_mels: usize) -> LogMel {
        let window = (0..N_FFT)
            .map(|i| {
                let x = 2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64;
                (0.5 - 0.5 * x.cos()) as f32
            })
            .collect();
        LogMel {
            n_mels,
            filters: slaney_filters(n_mels),
            window,
            fft: Fft::new(N_FFT),
            frame: vec![Complex::default(); N_FFT],
            spectrum: vec![Complex::default(); N_FFT],
            power: vec![0.0; BINS],
            features: vec![0.0; n_mels * WINDOW_FRAMES],
        }
    }

    /// Mel bands per frame.
    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Computes the features of `audio` (16 kHz, at most [`WINDOW_SAMPLES`]; the rest is
    /// ignored) and returns them as `[n_mels, WINDOW_FRAMES]`, row-major.
    pub fn compute(&mut self, audio: &[f32]) -> &mut [f32] {
        let audio = &audio[..audio.len().min(WINDOW_SAMPLES)];
        let sample = |i: isize| -> f32 {
            // Reflect padding at the start; zeros after the audio (the 30 s pad).
            let i = i.unsigned_abs();
            audio.get(i).copied().unwrap_or(0.0)
        };
        // Frame t covers samples t·HOP − 200 .. t·HOP + 200; later frames see only zeros.
        let live = ((audio.len() + N_FFT / 2).div_ceil(HOP)).min(WINDOW_FRAMES);
        let silent = POWER_FLOOR.log10();
        let mut max = f32::NEG_INFINITY;
        for t in 0..live {
            let start = (t * HOP) as isize - (N_FFT / 2) as isize;
            for (j, c) in self.frame.iter_mut().enumerate() {
                *c = Complex {
                    re: sample(start + j as isize) * self.window[j],
                    im: 0.0,
                };
            }
            self.fft.process(&self.frame, &mut self.spectrum);
            for (p, c) in self.power.iter_mut().zip(&self.spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            for (m, f) in self.filters.iter().enumerate() {
                let band = &self.power[f.first_bin..f.first_bin + f.weights.len()];
                let energy: f32 = band.iter().zip(&f.weights).map(|(p, w)| p * w).sum();
                let v = energy.max(POWER_FLOOR).log10();
                max = max.max(v);
                self.features[m * WINDOW_FRAMES + t] = v;
            }
        }
        if live < WINDOW_FRAMES {
            max = max.max(silent);
        }
        let floor = max - 8.0;
        for row in self.features.chunks_exact_mut(WINDOW_FRAMES) {
            for (t, v) in row.iter_mut().enumerate() {
                let x = if t < live {
                    v.max(floor)
                } else {
                    silent.max(floor)
                };
                *v = (x + 4.0) / 4.0;
            }
        }
        &mut self.features
    }
}

/// librosa's `mel(sr=16000, n_fft=400, n_mels, htk=False, norm="slaney")`, as Whisper uses.
fn slaney_filters(n_mels: usize) -> Vec<MelFilter> {
    let max_mel = hz_to_mel(SAMPLE_RATE as f64 / 2.0);
    let edges: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(max_mel * i as f64 / (n_mels + 1) as f64))
        .collect();
    let bin_hz = |k: usize| k as f64 * SAMPLE_RATE as f64 / N_FFT as f64;
    (0..n_mels)
        .map(|i| {
            let (lo, mid, hi) = (edges[i], edges[i + 1], edges[i + 2]);
            let norm = 2.0 / (hi - lo);
            let w: Vec<f32> = (0..BINS)
                .map(|k| {
                    let f = bin_hz(k);
                    let rising = (f - lo) / (mid - lo);
                    let falling = (hi - f) / (hi - mid);
                    (rising.min(falling).max(0.0) * norm) as f32
                })
                .collect();
            let first = w.iter().position(|&x| x > 0.0).unwrap_or(0);
            let last = w.iter().rposition(|&x| x > 0.0).map_or(first, |l| l + 1);
            MelFilter {
                first_bin: first,
                weights: w[first..last].to_vec(),
            }
        })
        .collect()
}

/// Slaney mel scale: linear below 1 kHz, logarithmic above.
fn hz_to_mel(hz: f64) -> f64 {
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / logstep
    } else {
        hz / f_sp
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        mel * f_sp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dft(x: &[Complex]) -> Vec<Complex> {
        let n = x.len();
        (0..n)
            .map(|k| {
                x.iter()
                    .enumerate()
                    .fold(Complex::default(), |acc, (j, v)| {
                        let ph = -2.0 * std::f64::consts::PI * (j * k % n) as f64 / n as f64;
                        let w = Complex {
                            re: ph.cos() as f32,
                            im: ph.sin() as f32,
                        };
                        acc.add(v.mul(w))
                    })
            })
            .collect()
    }

    #[test]
    fn fft_matches_a_direct_dft_for_whisper_and_odd_sizes() {
        for n in [400, 64, 45, 49, 7, 1] {
            let x: Vec<Complex> = (0..n)
                .map(|i| Complex {
                    re: ((i * 37 % 11) as f32 - 5.0) / 5.0,
                    im: ((i * 13 % 7) as f32 - 3.0) / 3.0,
                })
                .collect();
            let mut fft = Fft::new(n);
            let mut out = vec![Complex::default(); n];
            fft.process(&x, &mut out);
            let want = dft(&x);
            let err = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a.re - b.re).abs().max((a.im - b.im).abs()))
                .fold(0.0f32, f32::max);
            assert!(err < 1e-3, "n={n}: max error {err}");
        }
        assert_eq!(
            Fft::new(400).stages,
            [(4, 100), (4, 25), (5, 5), (5, 1)],
            "400 factors as 4·4·5·5"
        );
    }

    #[test]
    fn slaney_filters_match_librosa_at_known_points() {
        // librosa.filters.mel(sr=16000, n_fft=400, n_mels=80): filter 0 peaks at bin 1 with
        // weight 0.02486259 (its centre, 33.3 Hz, sits between bins 0 and 1 at 40 Hz spacing).
        let f = slaney_filters(80);
        assert_eq!(f.len(), 80);
        assert_eq!(f[0].first_bin, 1);
        assert!(
            (f[0].weights[0] - 0.024_862_59).abs() < 1e-6,
            "{}",
            f[0].weights[0]
        );
        let last = f.last().map(|m| m.first_bin + m.weights.len()).unwrap_or(0);
        assert!(last <= BINS);
    }

    #[test]
    fn silence_gives_the_constant_floor_and_a_tone_lights_its_band() {
        let mut mel = LogMel::new(80);
        let silent = mel.compute(&[]).to_vec();
        assert!(silent
            .iter()
            .all(|&v| (v - (-10.0 + 4.0) / 4.0).abs() < 1e-6));

        // 1 s of a 1 kHz tone: the hottest band is the one centred nearest 1 kHz, and the
        // padding after the tone sits at the floor (max − 8).
        let tone: Vec<f32> = (0..SAMPLE_RATE)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin())
            .collect();
        let feats = mel.compute(&tone);
        let t = 50; // a frame well inside the tone
        let hottest = (0..80)
            .max_by(|&a, &b| feats[a * WINDOW_FRAMES + t].total_cmp(&feats[b * WINDOW_FRAMES + t]))
            .unwrap_or(0);
        let centre_hz = mel_to_hz(hz_to_mel(8000.0) * (hottest + 1) as f64 / 81.0);
        assert!(
            (centre_hz - 1000.0).abs() < 60.0,
            "band {hottest} at {centre_hz} Hz"
        );
        let max = feats.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let tail = feats[WINDOW_FRAMES - 1];
        assert!(
            (tail - (max - 2.0)).abs() < 1e-5,
            "floor {tail} vs max {max}"
        );
    }
}
