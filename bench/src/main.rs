//! `xiaozhi-bench`: drives any xiaozhi-compatible server over the real device protocol.
//!
//! - `fleet`: N simulated ESP32 devices speaking a real utterance on an open-loop schedule;
//!   writes HdrHistogram percentile distributions and interval logs, `summary.json` and a plot.
//! - `probe`: one device, one interaction, as a human-readable timeline; saves the reply audio.
//! - `hold`: N idle connected devices, for connect→hello latency and memory per idle device.
//! - `neighbour`: the fleet without and with one abusive device; does the abuser hurt the others?
//! - `soak`: good and abusive devices for a long time, sampling the server's memory and files.
//!
//! The bench shares only the `xiaozhi-protocol` crate with the server (message types, binary
//! framing, identity, tokens, and the HdrHistogram file writers) and depends on nothing else of
//! it, so it measures other servers (the Python reference, say) exactly as it measures ours.
//! (It also uses the `shards` runtime crate, for one thing only: the guard that wakes a glommio
//! executor parked before its first task, see `executor.rs`.)
//! See `bench/README.md`.

mod abuser;
mod audio;
mod channel;
mod connect;
mod device;
mod device_args;
mod executor;
mod fleet;
mod hold;
mod inbound;
mod mcp;
mod mqtt_link;
mod neighbour;
mod ota;
mod outcome;
mod plot;
mod probe;
mod procstat;
mod report;
mod rusage;
mod schedule;
mod soak;
mod sweep;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use xiaozhi_bench::mock_upstream;

#[derive(Parser)]
#[command(
    name = "xiaozhi-bench",
    about = "Benchmark and fleet simulator for xiaozhi-compatible servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulate N talking devices on an open-loop schedule; write latency histograms and a summary.
    Fleet(fleet::FleetArgs),
    /// Run `fleet` once per fleet size and print a table of latency, errors and server cost.
    Sweep(sweep::SweepArgs),
    /// The fleet without and with one abusive device (per kind): first-audio p50/p99 of both.
    Neighbour(neighbour::NeighbourArgs),
    /// Good and abusive devices for a long time; the server's RSS slope and open files.
    Soak(soak::SoakArgs),
    /// One device, one interaction: print a timeline and optionally save the reply audio.
    Probe(probe::ProbeArgs),
    /// Connect N devices, complete hello, hold them idle; report connect→hello latency.
    Hold {
        /// WebSocket URL of the server.
        #[arg(long, default_value = "ws://127.0.0.1:8000/xiaozhi/v1/")]
        url: String,
        /// Number of devices.
        #[arg(long, default_value_t = 100)]
        devices: u32,
        /// Seconds to hold the connections open after the last hello.
        #[arg(long, default_value_t = 5)]
        hold_s: u64,
        /// Server process id: its RSS is sampled before and after connecting.
        #[arg(long)]
        server_pid: Option<u32>,
        /// Output folder for the `.hgrm` file.
        #[arg(long, default_value = "bench/out")]
        out: PathBuf,
    },
    /// Serve a mock OpenAI-compatible upstream (LLM, ASR, TTS) with fixed latencies.
    MockUpstream(mock_upstream::MockArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Fleet(args) => fleet::run(&args).map(|_| ()),
        Cmd::Sweep(args) => sweep::run(args),
        Cmd::Neighbour(args) => neighbour::run(args),
        Cmd::Soak(args) => soak::run(args),
        Cmd::Probe(args) => probe::run(args),
        Cmd::MockUpstream(args) => mock_upstream::run(args),
        Cmd::Hold {
            url,
            devices,
            hold_s,
            server_pid,
            out,
        } => hold::run(&url, devices, hold_s, server_pid, &out),
    };
    if let Err(e) = result {
        eprintln!("xiaozhi-bench: {e}");
        std::process::exit(1);
    }
}
