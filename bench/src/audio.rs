//! Audio for the simulated devices: the utterance they speak (a WAV file or generated speech),
//! Opus-encoded like the firmware does, and decoding of the server's reply for `probe`.
//!
//! The firmware captures 16 kHz mono, encodes 60 ms frames with libopus (application AUDIO,
//! complexity 0, VBR, DTX on; spec §6.6) and sends each packet as it is ready. The bench encodes
//! the utterance once at start-up, followed by a run of *floor* frames from the same encoder: what
//! the microphone hears when nobody speaks. By default that is room noise (pink noise at
//! `--noise-dbfs`, -50 dBFS, also mixed under the speech), because real microphones never send
//! digital silence and a DTX encoder turns digital silence into tiny packets that cost the server
//! almost nothing to decode and classify; `--uplink-floor silence` keeps the old behaviour. Each
//! packet is framed for the negotiated protocol version, and every device sends the same
//! prepared bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

use tungstenite::Bytes;
use xiaozhi_protocol::BinaryProtocol;

/// Uplink sample rate and frame size (firmware constants).
pub const UPLINK_RATE: u32 = 16_000;
/// Samples in one 60 ms uplink frame.
pub const UPLINK_FRAME: usize = 960;
/// Uplink frame duration in ms.
pub const FRAME_MS: u64 = 60;
/// Floor frames prepared after the speech (3 s); devices cycle through them.
const FLOOR_FRAMES: usize = 50;
/// Default room-noise level, dBFS (RMS): a quiet room through an ESP32 MEMS microphone.
pub const DEFAULT_NOISE_DBFS: f64 = -50.0;

/// What the microphone sends when nobody speaks.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Floor {
    /// Pink noise at `--noise-dbfs`, also mixed under the speech (default: what devices send).
    Noise,
    /// Digital silence (DTX packets of a few bytes): the cheapest case, not what devices send.
    Silence,
}

/// The uplink's floor: its kind and, for noise, its RMS level in dBFS.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloorSpec {
    /// Noise or silence.
    pub kind: Floor,
    /// RMS level of the noise, dBFS (ignored for silence).
    pub dbfs: f64,
}

impl Default for FloorSpec {
    fn default() -> Self {
        FloorSpec {
            kind: Floor::Noise,
            dbfs: DEFAULT_NOISE_DBFS,
        }
    }
}

/// `n` samples of pink noise with RMS `dbfs` (relative to full scale), from a fixed seed so every
/// run streams the same bytes. White noise from xorshift, shaped by Paul Kellet's economy pink
/// filter, then scaled to the measured RMS.
pub fn pink_noise(n: usize, dbfs: f64, seed: u64) -> Vec<i16> {
    let mut x = seed | 1;
    let mut white = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Uniform in [-1, 1).
        (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    };
    let (mut b0, mut b1, mut b2) = (0.0f64, 0.0f64, 0.0f64);
    let raw: Vec<f64> = (0..n)
        .map(|_| {
            let w = white();
            b0 = 0.99765 * b0 + w * 0.099_046;
            b1 = 0.96300 * b1 + w * 0.296_516_4;
            b2 = 0.57000 * b2 + w * 1.052_691_3;
            b0 + b1 + b2 + w * 0.1848
        })
        .collect();
    let rms = (raw.iter().map(|v| v * v).sum::<f64>() / n.max(1) as f64).sqrt();
    let target = 32767.0 * 10f64.powf(dbfs / 20.0);
    let gain = if rms > 0.0 { target / rms } else { 0.0 };
    raw.iter()
        .map(|v| (v * gain).round().clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// The default utterance: about 1.77 s with espeak-ng's en-us voice at its default rate.
pub const DEFAULT_TEXT: &str = "What's the weather like today?";

/// The prepared uplink: speech frames, then floor frames, framed for one protocol version.
#[derive(Debug, Clone)]
pub struct Uplink {
    /// One framed binary message per 60 ms of speech.
    pub speech: Vec<Bytes>,
    /// Framed floor (room noise or silence), sent in a cycle when the device is not speaking.
    pub floor: Vec<Bytes>,
    /// Opus payload bytes of the speech (for the report).
    pub speech_bytes: usize,
}

/// Loads 16 kHz mono 16-bit PCM from a WAV file.
pub fn read_wav(path: &Path) -> Result<Vec<i16>, String> {
    let mut reader =
        hound::WavReader::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let spec = reader.spec();
    if spec.sample_rate != UPLINK_RATE || spec.channels != 1 {
        return Err(format!(
            "{}: {} Hz, {} channel(s); the device sends 16000 Hz mono \
             (convert with `sox in.wav -r 16000 -c 1 -b 16 out.wav`)",
            path.display(),
            spec.sample_rate,
            spec.channels
        ));
    }
    match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, 16) => reader
            .samples::<i16>()
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", path.display())),
        (hound::SampleFormat::Float, 32) => reader
            .samples::<f32>()
            .map(|s| s.map(|x| (x.clamp(-1.0, 1.0) * 32767.0) as i16))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", path.display())),
        (format, bits) => Err(format!(
            "{}: {bits}-bit {format:?} samples; use 16-bit PCM",
            path.display()
        )),
    }
}

/// Speaks `text` with espeak-ng (en-us) and converts it with sox to 16 kHz mono 16-bit, undithered.
pub fn generate_speech(text: &str) -> Result<Vec<i16>, String> {
    let dir = std::env::temp_dir().join(format!("xiaozhi-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let raw = dir.join("utterance-22k.wav");
    let out = dir.join("utterance-16k.wav");
    run(Command::new("espeak-ng")
        .args(["-v", "en-us", "-w"])
        .arg(&raw)
        .arg(text))?;
    // `-D`: no dither, so every run streams the same samples.
    run(Command::new("sox")
        .args(["-V1", "-D"])
        .arg(&raw)
        .args(["-r", "16000", "-c", "1", "-b", "16"])
        .arg(&out))?;
    let pcm = read_wav(&out);
    let _ = std::fs::remove_dir_all(&dir);
    pcm
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd
        .status()
        .map_err(|e| format!("{name}: {e} (install espeak-ng and sox, or pass --wav)"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed: {status}"))
    }
}

/// The utterance: `--wav FILE` or generated speech.
pub fn utterance(wav: Option<&PathBuf>) -> Result<Vec<i16>, String> {
    let pcm = match wav {
        Some(path) => read_wav(path)?,
        None => generate_speech(DEFAULT_TEXT)?,
    };
    if pcm.len() < UPLINK_FRAME {
        return Err("the utterance is shorter than one 60 ms frame".into());
    }
    Ok(pcm)
}

/// Encodes `pcm` (16 kHz mono) as the firmware does and frames it for `protocol`, with the
/// `floor` mixed under the speech and sent after it.
pub fn encode_uplink(
    pcm: &[i16],
    protocol: BinaryProtocol,
    floor: FloorSpec,
) -> Result<Uplink, String> {
    let opus_err = |e: opus::Error| format!("opus: {e}");
    let mut enc = opus::Encoder::new(UPLINK_RATE, opus::Channels::Mono, opus::Application::Audio)
        .map_err(opus_err)?;
    enc.set_complexity(0).map_err(opus_err)?;
    enc.set_vbr(true).map_err(opus_err)?;
    enc.set_dtx(true).map_err(opus_err)?;
    let mut packet = vec![0u8; 1500];
    let mut frame = |enc: &mut opus::Encoder, pcm: &[i16]| -> Result<(Bytes, usize), String> {
        let mut block = [0i16; UPLINK_FRAME];
        block[..pcm.len()].copy_from_slice(pcm);
        let n = enc.encode(&block, &mut packet).map_err(opus_err)?;
        let mut framed = Vec::with_capacity(n + protocol.header_len());
        protocol
            .encode_into(&packet[..n], 0, &mut framed)
            .map_err(|e| e.to_string())?;
        Ok((Bytes::from(framed), n))
    };
    let speech_frames = pcm.len().div_ceil(UPLINK_FRAME);
    let noise = match floor.kind {
        Floor::Noise => pink_noise((speech_frames + FLOOR_FRAMES) * UPLINK_FRAME, floor.dbfs, 7),
        Floor::Silence => vec![0; (speech_frames + FLOOR_FRAMES) * UPLINK_FRAME],
    };
    let mut speech = Vec::new();
    let mut speech_bytes = 0;
    for (chunk, under) in pcm.chunks(UPLINK_FRAME).zip(noise.chunks(UPLINK_FRAME)) {
        let mixed: Vec<i16> = chunk
            .iter()
            .zip(under)
            .map(|(s, n)| s.saturating_add(*n))
            .collect();
        let (f, n) = frame(&mut enc, &mixed)?;
        speech.push(f);
        speech_bytes += n;
    }
    let floor = noise[speech_frames * UPLINK_FRAME..]
        .chunks(UPLINK_FRAME)
        .map(|block| frame(&mut enc, block).map(|(f, _)| f))
        .collect::<Result<_, _>>()?;
    Ok(Uplink {
        speech,
        floor,
        speech_bytes,
    })
}

/// Decodes reply packets at the server's announced rate and writes them as a mono WAV file.
pub fn save_reply(path: &Path, packets: &[Vec<u8>], sample_rate: u32) -> Result<f64, String> {
    let opus_err = |e: opus::Error| format!("opus: {e}");
    let mut dec = opus::Decoder::new(sample_rate, opus::Channels::Mono).map_err(opus_err)?;
    let mut pcm = Vec::new();
    // 120 ms is the longest Opus packet.
    let mut buf = vec![0i16; sample_rate as usize * 120 / 1000];
    for p in packets {
        let n = dec.decode(p, &mut buf, false).map_err(opus_err)?;
        pcm.extend_from_slice(&buf[..n]);
    }
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w =
        hound::WavWriter::create(path, spec).map_err(|e| format!("{}: {e}", path.display()))?;
    for s in &pcm {
        w.write_sample(*s)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    w.finalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(pcm.len() as f64 / f64::from(sample_rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(samples: usize) -> Vec<i16> {
        (0..samples)
            .map(|i| ((i as f32 * 0.07).sin() * 8000.0) as i16)
            .collect()
    }

    #[test]
    fn uplink_has_one_frame_per_60_ms_rounding_up() {
        let up = encode_uplink(
            &tone(960 * 10 + 1),
            BinaryProtocol::V1,
            FloorSpec::default(),
        )
        .unwrap();
        assert_eq!(up.speech.len(), 11);
        assert_eq!(up.floor.len(), FLOOR_FRAMES);
        for f in up.speech.iter().chain(&up.floor) {
            assert_eq!(opus::packet::get_nb_samples(f, 16000).unwrap(), 960);
        }
    }

    #[test]
    fn uplink_frames_carry_the_version_header() {
        let up = encode_uplink(&tone(960 * 3), BinaryProtocol::V3, FloorSpec::default()).unwrap();
        for f in &up.speech {
            let decoded = BinaryProtocol::V3.decode(f).unwrap();
            assert_eq!(decoded.payload.len() + 4, f.len());
        }
        let up = encode_uplink(&tone(960 * 3), BinaryProtocol::V2, FloorSpec::default()).unwrap();
        assert!(up.speech.iter().all(|f| f[..4] == [0, 2, 0, 0]));
    }

    #[test]
    fn noise_has_the_asked_level_and_costs_real_packets_unlike_silence() {
        let n = pink_noise(16000 * 3, -50.0, 7);
        let rms = (n.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n.len() as f64).sqrt();
        let dbfs = 20.0 * (rms / 32767.0).log10();
        assert!((dbfs + 50.0).abs() < 0.5, "{dbfs} dBFS");
        let bytes = |kind| {
            let up = encode_uplink(
                &tone(960),
                BinaryProtocol::V1,
                FloorSpec { kind, dbfs: -50.0 },
            )
            .unwrap();
            up.floor.iter().map(|f| f.len()).sum::<usize>() / up.floor.len()
        };
        let (noise, silence) = (bytes(Floor::Noise), bytes(Floor::Silence));
        // DTX sends silence as packets of a few bytes; noise needs real packets.
        eprintln!("floor bytes per frame: noise {noise}, silence {silence}");
        assert!(silence <= 8, "silence {silence} bytes per frame");
        assert!(
            noise > 10 * silence.max(1),
            "noise {noise} vs silence {silence}"
        );
    }

    #[test]
    fn reply_round_trips_through_a_wav_file() {
        let mut enc =
            opus::Encoder::new(24000, opus::Channels::Mono, opus::Application::Audio).unwrap();
        let packets: Vec<Vec<u8>> = (0..5)
            .map(|_| enc.encode_vec(&tone(1440), 1500).unwrap())
            .collect();
        let path = std::env::temp_dir().join(format!("bench-reply-{}.wav", std::process::id()));
        let seconds = save_reply(&path, &packets, 24000).unwrap();
        assert!((seconds - 0.3).abs() < 1e-9);
        let reader = hound::WavReader::open(&path).unwrap();
        assert_eq!(reader.spec().sample_rate, 24000);
        assert_eq!(reader.len(), 5 * 1440);
        let _ = std::fs::remove_file(path);
    }
}
