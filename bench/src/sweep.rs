//! `sweep`: the same fleet at growing sizes, one `fleet` run per size, with the server's CPU and
//! memory sampled from `/proc` (any server process: `--server-pid`). Prints one row per size
//! (end of speech → first audio p50/p95/p99, errors, server CPU and RSS, the bench's own CPU and
//! send lag) and writes `sweep.json` and `sweep.md` next to each step's fleet folder.
//!
//! CPU per interaction: the server's CPU time over the step (from `/proc`, `--server-pid`)
//! divided by the interactions the bench completed, and, when `--metrics-url` is given, the
//! server's own split by thread role (`xiaozhi_cpu_seconds_total{role}` read before and after the
//! step, over its `xiaozhi_interactions_total`): shard executors vs inference workers.

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
    /// Count these kernel events of the server during every step with `perf stat` (needs
    /// --server-pid and perf; e.g. syscalls:sys_enter_io_uring_enter,context-switches); the
    /// counts per completed interaction go in sweep.json and a second table.
    #[arg(long, value_delimiter = ',')]
    pub perf_events: Vec<String>,
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
    /// Server CPU seconds over the step (`/proc`).
    cpu_seconds: Option<f64>,
    rss_max_mib: Option<f64>,
    rss_end_mib: Option<f64>,
    /// The server's own CPU per interaction by role, from two `/metrics` scrapes.
    roles: Option<RoleCost>,
}

/// CPU ms per interaction by thread role, from the server's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct RoleCost {
    shard_ms: f64,
    inference_ms: f64,
    other_ms: f64,
    interactions: u64,
}

/// `perf stat` attached to the server for one step, writing CSV to a file.
struct PerfStat {
    child: std::process::Child,
    out: PathBuf,
}

impl PerfStat {
    fn start(pid: u32, events: &[String], out: PathBuf) -> Result<Self, String> {
        let child = std::process::Command::new("perf")
            .args(["stat", "-x", ",", "-o"])
            .arg(&out)
            .arg("-e")
            .arg(events.join(","))
            .arg("-p")
            .arg(pid.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("perf: {e} (install linux-perf, or drop --perf-events)"))?;
        // perf needs a moment to attach before the step starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(PerfStat { child, out })
    }

    /// Stops perf (SIGINT makes it print its counts) and returns event → count.
    fn finish(mut self) -> Vec<(String, f64)> {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
        if pid > 0 {
            // SAFETY: kill has no memory-safety preconditions; `pid` is our child.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        parse_perf_csv(&text)
    }
}

/// `perf stat -x ,` lines: `count,unit,event,…` (comments start with `#`; uncounted events
/// say `<not counted>`).
fn parse_perf_csv(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let mut f = l.split(',');
            let count: f64 = f.next()?.trim().parse().ok()?;
            let _unit = f.next()?;
            let event = f.next()?.trim();
            (!event.is_empty()).then(|| (event.to_string(), count))
        })
        .collect()
}

/// `xiaozhi_cpu_seconds_total{role}` (shard, vad+asr+tts, other) and `xiaozhi_interactions_total`
/// from a Prometheus text page.
fn cpu_counters(text: &str) -> Option<([f64; 3], u64)> {
    let mut cpu = [0.0; 3];
    let mut found = false;
    let mut interactions = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("xiaozhi_cpu_seconds_total{role=\"") {
            let (role, value) = rest.split_once("\"} ")?;
            let v: f64 = value.trim().parse().ok()?;
            let i = match role {
                "shard" => 0,
                "vad" | "asr" | "tts" => 1,
                _ => 2,
            };
            cpu[i] += v;
            found = true;
        } else if let Some(v) = line.strip_prefix("xiaozhi_interactions_total ") {
            interactions = v.trim().parse().ok();
        }
    }
    found.then_some(())?;
    Some((cpu, interactions?))
}

/// The role split between two scrapes; `None` without interactions in between.
fn role_cost(before: &str, after: &str) -> Option<RoleCost> {
    let (b, bi) = cpu_counters(before)?;
    let (a, ai) = cpu_counters(after)?;
    let n = ai.checked_sub(bi).filter(|n| *n > 0)?;
    let per = |i: usize| 1000.0 * (a[i] - b[i]).max(0.0) / n as f64;
    Some(RoleCost {
        shard_ms: per(0),
        inference_ms: per(1),
        other_ms: per(2),
        interactions: n,
    })
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
    if !args.perf_events.is_empty() && args.server_pid.is_none() {
        return Err("--perf-events needs --server-pid".into());
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
        let metrics_before = args.metrics_url.as_deref().and_then(|u| fetch(u).ok());
        std::fs::create_dir_all(&fleet.out).map_err(|e| format!("{}: {e}", fleet.out.display()))?;
        let perf = match (args.server_pid, args.perf_events.is_empty()) {
            (Some(pid), false) => Some(PerfStat::start(
                pid,
                &args.perf_events,
                fleet.out.join("perf.csv"),
            )?),
            _ => None,
        };
        let sampler = args.server_pid.map(RssSampler::start);
        let cpu_before = args.server_pid.and_then(procstat::cpu_time);
        let t0 = Instant::now();
        let summary = fleet::run(&fleet);
        let wall = t0.elapsed();
        let perf_counts = perf.map(PerfStat::finish).unwrap_or_default();
        let cpu_seconds = match (args.server_pid.and_then(procstat::cpu_time), cpu_before) {
            (Some(after), Some(before)) => Some(after.saturating_sub(before).as_secs_f64()),
            _ => None,
        };
        let mut cost = ServerCost {
            cpu_percent: cpu_seconds.map(|s| 100.0 * s / wall.as_secs_f64()),
            cpu_seconds,
            rss_max_mib: sampler.and_then(RssSampler::finish).map(mib),
            rss_end_mib: args.server_pid.and_then(procstat::rss_kib).map(mib),
            roles: None,
        };
        let summary = summary?;
        if let Some(url) = &args.metrics_url {
            let path = fleet.out.join("metrics.txt");
            save_metrics(url, &path);
            let after = std::fs::read_to_string(&path).ok();
            cost.roles = metrics_before
                .as_deref()
                .zip(after.as_deref())
                .and_then(|(b, a)| role_cost(b, a));
        }
        let mut row = row(n, &summary, cost);
        if !perf_counts.is_empty() {
            let ok = summary["interactions"]["ok"].as_u64().unwrap_or(0).max(1) as f64;
            row["perf_per_interaction"] = perf_counts
                .iter()
                .map(|(e, c)| (e.clone(), json!(c / ok)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
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
    let mut table = markdown(&rows);
    table.push_str(&perf_markdown(&rows));
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
        "server_cpu_ms_per_interaction": cost.cpu_seconds.zip(summary["interactions"]["ok"].as_u64())
            .filter(|(_, ok)| *ok > 0)
            .map(|(s, ok)| 1000.0 * s / ok as f64),
        "server_cpu_ms_per_interaction_by_role": cost.roles.map(|r| json!({
            "shard": r.shard_ms, "inference": r.inference_ms, "other": r.other_ms,
            "interactions_counted_by_server": r.interactions,
        })),
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
        "| devices | interactions | ok | errors | first audio p50 / p95 / p99 (ms) | stt p50 (ms) | server CPU (% of a core) | server CPU per interaction (ms): total (shard / inference / other) | server RSS max (MiB) | bench CPU (%) | bench send lag p99 (ms) |\n\
         |---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
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
        let roles = &r["server_cpu_ms_per_interaction_by_role"];
        let per_interaction = if roles.is_object() {
            format!(
                "{} ({} / {} / {})",
                f(&r["server_cpu_ms_per_interaction"], 1),
                f(&roles["shard"], 1),
                f(&roles["inference"], 1),
                f(&roles["other"], 1)
            )
        } else {
            f(&r["server_cpu_ms_per_interaction"], 1)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} |\n",
            r["devices"],
            r["interactions"]["total"],
            r["interactions"]["ok"],
            errors,
            f(&fa["p50"], 0),
            f(&fa["p95"], 0),
            f(&fa["p99"], 0),
            f(&r["stt_ms"]["p50"], 0),
            f(&r["server_cpu_percent_of_one_core"], 0),
            per_interaction,
            f(&r["server_rss_max_mib"], 1),
            f(&r["bench_cpu_percent_of_one_core"], 0),
            f(&r["send_lag_p99_ms"], 1),
        ));
    }
    out
}

/// The kernel events per interaction, one row per step (empty without --perf-events).
fn perf_markdown(rows: &[Value]) -> String {
    let events: Vec<String> = rows
        .iter()
        .filter_map(|r| r["perf_per_interaction"].as_object())
        .flat_map(|m| m.keys().cloned())
        .fold(Vec::new(), |mut v, k| {
            if !v.contains(&k) {
                v.push(k);
            }
            v
        });
    if events.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\nServer kernel events per completed interaction (perf stat):\n\n| devices | {} |\n|---:|{}\n",
        events.join(" | "),
        "---:|".repeat(events.len())
    );
    for r in rows {
        let cells: Vec<String> = events
            .iter()
            .map(|e| {
                r["perf_per_interaction"][e]
                    .as_f64()
                    .map_or_else(|| "–".into(), |v| format!("{v:.1}"))
            })
            .collect();
        out.push_str(&format!("| {} | {} |\n", r["devices"], cells.join(" | ")));
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
                cpu_seconds: Some(0.38),
                rss_max_mib: Some(60.25),
                rss_end_mib: Some(58.0),
                roles: role_cost(
                    "xiaozhi_cpu_seconds_total{role=\"shard\"} 1.00\n\
                     xiaozhi_cpu_seconds_total{role=\"vad\"} 2.00\n\
                     xiaozhi_cpu_seconds_total{role=\"other\"} 0.50\n\
                     xiaozhi_interactions_total 100\n",
                    "xiaozhi_cpu_seconds_total{role=\"shard\"} 1.10\n\
                     xiaozhi_cpu_seconds_total{role=\"vad\"} 2.15\n\
                     xiaozhi_cpu_seconds_total{role=\"tts\"} 0.05\n\
                     xiaozhi_cpu_seconds_total{role=\"other\"} 0.52\n\
                     xiaozhi_interactions_total 120\n",
                ),
            },
        );
        assert_eq!(r["first_audio_ms"]["p95"], 420.9);
        let table = markdown(&[r]);
        let line = table.lines().nth(2).expect("a data row");
        assert_eq!(
            line,
            "| 10 | 20 | 19 | no_stt 1 | 310 / 421 / 480 | 120 | 35 | 20.0 (5.0 / 10.0 / 1.0) | 60.2 | 8 | 1.5 |"
        );
        // A server without /proc numbers (another host) still gets a row.
        let r = row(1, &summary, ServerCost::default());
        assert!(markdown(&[r]).contains("| – | – |"));
        assert_eq!(
            parse_perf_csv(
                "# started on Fri Dec  4\n\n1234,,syscalls:sys_enter_io_uring_enter,10.00,100.00,,\n\
                 <not counted>,,context-switches,0,100.00,,\n56,,cs,1,100,,\n"
            ),
            vec![
                ("syscalls:sys_enter_io_uring_enter".to_string(), 1234.0),
                ("cs".to_string(), 56.0)
            ]
        );
        let mut r = row(1, &summary, ServerCost::default());
        r["perf_per_interaction"] = json!({"cs": 2.5});
        assert!(perf_markdown(&[r]).contains("| 1 | 2.5 |"));
        // No interactions between the scrapes: no per-interaction split.
        assert_eq!(
            role_cost(
                "xiaozhi_interactions_total 3\n",
                "xiaozhi_interactions_total 3\n"
            ),
            None
        );
    }
}
