//! `sweep`: the same fleet at growing sizes, one `fleet` run per size, with the server's CPU and
//! memory sampled from `/proc` (any server process: `--server-pid`). Prints one row per size
//! (end of speech → first audio p50/p95/p99, errors, server CPU and RSS, the bench's own CPU and
//! send lag) and writes `sweep.json` and `sweep.md` next to each step's fleet folder.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fleet::{self, FleetArgs};
use crate::procstat;

/// `xiaozhi-bench sweep` options.
#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// Fleet sizes, run in this order (the fleet's own --devices is ignored).
    #[arg(long, value_delimiter = ',', default_value = "1,10,25,50")]
    pub steps: Vec<u32>,
    /// Server process: its CPU time and RSS are sampled during every step.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Fetch this Prometheus endpoint after every step and save it as `metrics.txt` in the
    /// step's folder (e.g. http://127.0.0.1:8003/metrics).
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Pause between steps, seconds (lets the server close the previous fleet's sessions).
    #[arg(long, default_value_t = 2.0)]
    pub pause_s: f64,
    /// Stop after a step in which more than this share of interactions errored.
    #[arg(long, default_value_t = 0.5)]
    pub stop_error_rate: f64,
    /// The fleet to run at every size; --out is the sweep's folder (steps go in n<N>/).
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// The server's cost during one step.
#[derive(Debug, Clone, Copy, Default)]
struct ServerCost {
    cpu_percent: Option<f64>,
    rss_max_mib: Option<f64>,
    rss_end_mib: Option<f64>,
}

/// Samples `pid`'s RSS every 200 ms on a thread until stopped; returns the largest sample.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<u64>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut max = procstat::rss_kib(pid);
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                max = max.max(procstat::rss_kib(pid));
            }
            max
        });
        RssSampler { stop, handle }
    }

    fn finish(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs the sweep.
pub fn run(args: SweepArgs) -> Result<(), String> {
    if args.steps.is_empty() || args.steps.contains(&0) {
        return Err("--steps needs fleet sizes of at least 1".into());
    }
    if let Some(pid) = args.server_pid {
        procstat::cpu_time(pid).ok_or_else(|| format!("--server-pid {pid}: no such process"))?;
    }
    let root = args.fleet.out.clone();
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut rows = Vec::new();
    for (i, &n) in args.steps.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::try_from_secs_f64(args.pause_s).unwrap_or_default());
        }
        let mut fleet = args.fleet.clone();
        fleet.devices = n;
        fleet.out = root.join(format!("n{n}"));
        println!(
            "\n=== sweep step {}/{}: {n} devices ===",
            i + 1,
            args.steps.len()
        );
        let sampler = args.server_pid.map(RssSampler::start);
        let cpu_before = args.server_pid.and_then(procstat::cpu_time);
        let t0 = Instant::now();
        let summary = fleet::run(&fleet);
        let wall = t0.elapsed();
        let cost = ServerCost {
            cpu_percent: match (args.server_pid.and_then(procstat::cpu_time), cpu_before) {
                (Some(after), Some(before)) => {
                    Some(100.0 * after.saturating_sub(before).as_secs_f64() / wall.as_secs_f64())
                }
                _ => None,
            },
            rss_max_mib: sampler.and_then(RssSampler::finish).map(mib),
            rss_end_mib: args.server_pid.and_then(procstat::rss_kib).map(mib),
        };
        let summary = summary?;
        if let Some(url) = &args.metrics_url {
            save_metrics(url, &fleet.out.join("metrics.txt"));
        }
        let row = row(n, &summary, cost);
        let errored = row["interactions"]["errored"].as_u64().unwrap_or(0);
        let total = row["interactions"]["total"].as_u64().unwrap_or(0);
        rows.push(row);
        if total > 0 && errored as f64 / total as f64 > args.stop_error_rate {
            println!(
                "stopping: {errored} of {total} interactions errored (--stop-error-rate {})",
                args.stop_error_rate
            );
            break;
        }
    }
    let table = markdown(&rows);
    println!("\n{table}");
    let sweep = json!({
        "bench": "xiaozhi-bench sweep",
        "version": env!("CARGO_PKG_VERSION"),
        "steps": rows,
        "fleet": &args.fleet,
        "server_pid": args.server_pid,
    });
    let write = |name: &str, text: String| -> Result<PathBuf, String> {
        let path = root.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    };
    write(
        "sweep.json",
        serde_json::to_string_pretty(&sweep).map_err(|e| e.to_string())? + "\n",
    )?;
    let md = write("sweep.md", table)?;
    println!("wrote {} and sweep.json", md.display());
    Ok(())
}

/// One step's row from its fleet summary and the server's cost.
fn row(devices: u32, summary: &Value, cost: ServerCost) -> Value {
    let m = |metric: &str, q: &str| summary["metrics_ms"][metric][q].as_f64();
    json!({
        "devices": devices,
        "interactions": summary["interactions"],
        "errors": summary["errors"],
        "first_audio_ms": {"p50": m("first_audio", "p50"), "p95": m("first_audio", "p95"), "p99": m("first_audio", "p99")},
        "stt_ms": {"p50": m("stt", "p50"), "p99": m("stt", "p99")},
        "tts_stop_ms": {"p50": m("tts_stop", "p50"), "p99": m("tts_stop", "p99")},
        "send_lag_p99_ms": m("send_lag", "p99"),
        "server_cpu_percent_of_one_core": cost.cpu_percent,
        "server_rss_max_mib": cost.rss_max_mib,
        "server_rss_end_mib": cost.rss_end_mib,
        "bench_cpu_percent_of_one_core": summary["bench_cpu"]["percent_of_one_core"],
        "wall_time_s": summary["wall_time_s"],
    })
}

/// The rows as a Markdown table.
fn markdown(rows: &[Value]) -> String {
    let f = |v: &Value, digits: usize| {
        v.as_f64()
            .map_or_else(|| "–".to_string(), |x| format!("{x:.digits$}"))
    };
    let mut out = String::from(
        "| devices | interactions | ok | errors | first audio p50 / p95 / p99 (ms) | stt p50 (ms) | server CPU (% of a core) | server RSS max (MiB) | bench CPU (%) | bench send lag p99 (ms) |\n\
         |---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let errors: Vec<String> = r["errors"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.as_u64().is_some_and(|n| n > 0))
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let errors = if errors.is_empty() {
            "0".to_string()
        } else {
            errors.join(", ")
        };
        let fa = &r["first_audio_ms"];
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} |\n",
            r["devices"],
            r["interactions"]["total"],
            r["interactions"]["ok"],
            errors,
            f(&fa["p50"], 0),
            f(&fa["p95"], 0),
            f(&fa["p99"], 0),
            f(&r["stt_ms"]["p50"], 0),
            f(&r["server_cpu_percent_of_one_core"], 0),
            f(&r["server_rss_max_mib"], 1),
            f(&r["bench_cpu_percent_of_one_core"], 0),
            f(&r["send_lag_p99_ms"], 1),
        ));
    }
    out
}

/// Fetches a Prometheus text page over plain HTTP and saves it (best effort: a failure is
/// printed, not fatal, so a sweep against a server without /metrics still completes).
fn save_metrics(url: &str, path: &std::path::Path) {
    match fetch(url) {
        Ok(body) => {
            if let Err(e) = std::fs::write(path, body) {
                eprintln!("{}: {e}", path.display());
            }
        }
        Err(e) => eprintln!("--metrics-url {url}: {e}"),
    }
}

/// GET `url` (plain `http://`) and return the body of a 200 answer.
pub fn fetch(url: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_table_carry_latency_errors_and_cost() {
        let summary = json!({
            "interactions": {"total": 20, "ok": 19, "errored": 1},
            "errors": {"no_stt": 1, "refused": 0},
            "metrics_ms": {
                "first_audio": {"p50": 310.2, "p95": 420.9, "p99": 480.0},
                "stt": {"p50": 120.0, "p99": 150.0},
                "tts_stop": {"p50": 900.0, "p99": 1000.0},
                "send_lag": {"p99": 1.5},
            },
            "bench_cpu": {"percent_of_one_core": 7.5},
            "wall_time_s": 12.0,
        });
        let r = row(
            10,
            &summary,
            ServerCost {
                cpu_percent: Some(35.0),
                rss_max_mib: Some(60.25),
                rss_end_mib: Some(58.0),
            },
        );
        assert_eq!(r["first_audio_ms"]["p95"], 420.9);
        let table = markdown(&[r]);
        let line = table.lines().nth(2).expect("a data row");
        assert_eq!(
            line,
            "| 10 | 20 | 19 | no_stt 1 | 310 / 421 / 480 | 120 | 35 | 60.2 | 8 | 1.5 |"
        );
        // A server without /proc numbers (another host) still gets a row.
        let r = row(1, &summary, ServerCost::default());
        assert!(markdown(&[r]).contains("| – | – |"));
    }
}
