//! `hold`: opens N device connections (headers as firmware sends them), completes the hello
//! exchange on each, records connect→hello latency in an HdrHistogram, then keeps them open and
//! idle for a while so the server's memory per idle device can be read off its RSS.
//!
//! Connections are opened one after another with the blocking tungstenite client: this measures
//! an idle fleet, not a concurrent connect storm (use `fleet --ramp-s 0` for that).

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use crate::connect::DeviceId;
use crate::procstat::rss_kib;
use crate::report::write_hgrm;

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

fn connect_and_hello(url: &str, i: u32) -> Result<Ws, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    let mac = DeviceId::new(i, 0).mac;
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

/// Runs `hold`.
pub fn run(
    url: &str,
    devices: u32,
    hold_s: u64,
    server_pid: Option<u32>,
    out: &Path,
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
