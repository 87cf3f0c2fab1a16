//! The options every command that runs talking devices shares (`fleet`, `probe`, `sweep`): how
//! a device connects, frames and speaks, and how long it waits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use xiaozhi_protocol::BinaryProtocol;

use crate::audio;
use crate::connect::IdentityMode;
use crate::device::{DeviceConfig, Mode};

/// How a simulated device talks to the server.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct DeviceArgs {
    /// WebSocket URL of the server (replaced by the OTA answer's when --ota-url is given).
    #[arg(long, default_value = "ws://127.0.0.1:8000/xiaozhi/v1/")]
    pub url: String,
    /// Ask this OTA endpoint first (POST, as the firmware) and use the websocket URL/token it returns.
    #[arg(long)]
    pub ota_url: Option<String>,
    /// Send the device identity as headers (firmware) or query parameters (browsers).
    #[arg(long, value_enum, default_value = "headers")]
    pub identity: IdentityMode,
    /// Binary protocol version (1 = bare Opus, 2 = 16-byte header, 3 = 4-byte header).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub protocol: u8,
    /// Listening mode: auto (server VAD), manual (listen stop after the speech), realtime.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Utterance to speak: a 16 kHz mono WAV file (default: generated with espeak-ng + sox).
    #[arg(long)]
    pub wav: Option<PathBuf>,
    /// What the microphone sends when nobody speaks: room noise (default, as real microphones)
    /// or digital silence (cheap DTX packets; the bench's behaviour before room noise).
    #[arg(long, value_enum, default_value = "noise")]
    pub uplink_floor: audio::Floor,
    /// RMS level of the room noise, dBFS (mixed under the speech and sent between utterances).
    #[arg(long, default_value_t = audio::DEFAULT_NOISE_DBFS, allow_hyphen_values = true)]
    pub noise_dbfs: f64,
    /// Wait this long for stt after the last speech frame, and for progress during a reply.
    #[arg(long, default_value_t = 10.0)]
    pub timeout_s: f64,
    /// Sign device tokens with this secret (server.auth_key) when the server checks them.
    #[arg(long)]
    #[serde(skip)]
    pub auth_key: Option<String>,
}

/// A device configuration and the utterance's PCM (16 kHz) it was encoded from.
pub struct Prepared {
    /// What every device runs with.
    pub config: DeviceConfig,
    /// The utterance, 16 kHz mono.
    pub pcm: Vec<i16>,
}

impl DeviceArgs {
    /// Loads and encodes the utterance and builds the device configuration.
    pub fn prepare(&self, think: Duration, expected_reply: Duration) -> Result<Prepared, String> {
        let protocol = BinaryProtocol::from_version(self.protocol).map_err(|e| e.to_string())?;
        let pcm = audio::utterance(self.wav.as_ref())?;
        if !(-90.0..=-20.0).contains(&self.noise_dbfs) {
            return Err(format!(
                "--noise-dbfs {} is outside -90..-20 (room noise is about -60 to -40)",
                self.noise_dbfs
            ));
        }
        let floor = audio::FloorSpec {
            kind: self.uplink_floor,
            dbfs: self.noise_dbfs,
        };
        let uplink = audio::encode_uplink(&pcm, protocol, floor)?;
        let timeout = Duration::try_from_secs_f64(self.timeout_s)
            .map_err(|_| "--timeout-s must be a non-negative number")?;
        Ok(Prepared {
            config: DeviceConfig {
                ws_url: self.url.clone(),
                ota_url: self.ota_url.clone(),
                identity: self.identity,
                protocol,
                mode: self.mode,
                think,
                expected_reply,
                timeout,
                uplink: Arc::new(uplink),
                auth_key: self.auth_key.clone(),
            },
            pcm,
        })
    }
}
