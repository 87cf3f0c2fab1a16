//! `xiaozhi-bench`: drives any xiaozhi-compatible server over the real protocol.
//!
//! `hold` opens N device connections (headers as firmware sends them), completes the hello
//! exchange on each, records connect→hello latency in an HdrHistogram, then keeps them open
//! and idle for a while so the server's memory per idle device can be read off its RSS.
//! The fleet simulator with audio (issue "Latency you can export") grows from here.

use std::fs;
use std::io::Write as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

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
}

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Hold {
            url,
            devices,
            hold_s,
            server_pid,
            out,
        } => hold(&url, devices, hold_s, server_pid, &out),
    };
    if let Err(e) = result {
        eprintln!("xiaozhi-bench: {e}");
        std::process::exit(1);
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn device_mac(i: u32) -> String {
    let b = i.to_be_bytes();
    format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

fn connect_and_hello(url: &str, i: u32) -> Result<Ws, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    let mac = device_mac(i);
    let h = req.headers_mut();
    h.insert("Device-Id", mac.parse().map_err(|_| "bad header")?);
    h.insert(
        "Client-Id",
        format!("00000000-0000-4000-8000-{i:012x}")
            .parse()
            .map_err(|_| "bad header")?,
    );
    h.insert("Protocol-Version", "1".parse().map_err(|_| "bad header")?);
    let (mut ws, _) = tungstenite::connect(req).map_err(|e| format!("device {i}: connect: {e}"))?;
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    }
    ws.send(Message::text(
        r#"{"type":"hello","version":1,"features":{"mcp":true},"transport":"websocket","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#,
    ))
    .map_err(|e| format!("device {i}: send hello: {e}"))?;
    loop {
        match ws
            .read()
            .map_err(|e| format!("device {i}: no hello: {e}"))?
        {
            Message::Text(t) => {
                let v: serde_json::Value =
                    serde_json::from_str(t.as_str()).map_err(|e| format!("device {i}: {e}"))?;
                if v["type"] == "hello" {
                    return Ok(ws);
                }
            }
            Message::Close(f) => return Err(format!("device {i}: closed before hello: {f:?}")),
            _ => {}
        }
    }
}

fn hold(
    url: &str,
    devices: u32,
    hold_s: u64,
    server_pid: Option<u32>,
    out: &PathBuf,
) -> Result<(), String> {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let before = server_pid.and_then(rss_kib);
    let mut held = Vec::with_capacity(devices as usize);
    let t0 = Instant::now();
    for i in 0..devices {
        let start = Instant::now();
        let ws = connect_and_hello(url, i)?;
        hist.saturating_record(start.elapsed().as_micros() as u64);
        held.push(ws);
    }
    let connect_time = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = server_pid.and_then(rss_kib);
    println!(
        "devices {devices}  connected in {:.2} s  connect->hello µs: p50 {}  p90 {}  p99 {}  max {}",
        connect_time.as_secs_f64(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "server RSS: {b} KiB before, {a} KiB with {devices} idle devices: {:.1} KiB per device",
            (a.saturating_sub(b)) as f64 / f64::from(devices.max(1))
        );
    }
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let path = out.join("connect_hello.hgrm");
    let mut f = fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    write_hgrm(&hist, &mut f, 1.0).map_err(|e| e.to_string())?;
    println!("wrote {}", path.display());
    std::thread::sleep(Duration::from_secs(hold_s));
    for mut ws in held {
        let _ = ws.close(None);
    }
    Ok(())
}

/// Writes a percentile distribution in HdrHistogram's `.hgrm` text format (values scaled by `scale`).
fn write_hgrm(
    h: &Histogram<u64>,
    out: &mut impl std::io::Write,
    scale: f64,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    for v in h.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            1.0 / (1.0 - q)
        } else {
            f64::INFINITY
        };
        writeln!(
            out,
            "{:>12.3} {:>14.12} {:>10} {:>14.2}",
            v.value_iterated_to() as f64 / scale,
            q,
            v.count_since_last_iteration(),
            inv
        )?;
    }
    writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.mean() / scale,
        h.stdev() / scale,
        h.max() as f64 / scale,
        h.len(),
        h.buckets(),
        h.distinct_values()
    )?;
    let _ = std::io::stdout().flush();
    Ok(())
}
