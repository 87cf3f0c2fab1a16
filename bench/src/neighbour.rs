//! `neighbour`: does one abusive device hurt the others? (issue 12)
//!
//! For each `--abuser` kind, the standard fleet (the good devices, `fleet`'s options) runs twice
//! on the same server: once alone and once with one abusive device of that kind running beside
//! it (`abuser.rs`; it starts `--abuser-lead-s` before the fleet and stops when the fleet is
//! done). With `--rounds R` the pair is repeated, the order alternating (without/with, then
//! with/without, …) so a drift in the machine's load does not favour one side, and the good
//! devices' histograms are merged per side. The report gives, per kind, the good devices'
//! end of speech → first audio p50/p99 without and with the abuser, the difference against the
//! target (`--target-ms`, issue 12: p99 within +30 ms), their errors, the abuser's own outcome
//! (closed? with which code? alerts? HTTP statuses?), the server counters that moved during the
//! abusive phases (with `--http-url`) and the load average at each phase's start (the machine
//! may be shared). Files: `neighbour.json`, `neighbour.md`, and each phase's fleet folder.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::abuser::{Abuser, AbuserKind, AbuserOutcome, AbuserPlan};
use crate::connect::DeviceId;
use crate::fleet::{self, FleetArgs};
use crate::report::{self, Metric, Recorder};
use crate::sweep;

/// `xiaozhi-bench neighbour` options.
#[derive(clap::Args, Debug)]
pub struct NeighbourArgs {
    /// Abuser kinds to try, one pair of phases (without, with) each, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub abuser: Vec<AbuserKind>,
    /// The abuser's options.
    #[command(flatten)]
    pub abuse: AbuseArgs,
    /// Repeat each pair of phases this many times, alternating their order.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Pause between phases, seconds (lets the server close the previous phase's sessions).
    #[arg(long, default_value_t = 2.0)]
    pub pause_s: f64,
    /// Allowed first-audio p99 increase with the abuser, ms.
    #[arg(long, default_value_t = 30.0)]
    pub target_ms: f64,
    /// The good devices (`fleet`'s options); --out is the report's folder.
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// How abusers run (shared with `soak`).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct AbuseArgs {
    /// The server's HTTP base URL (e.g. http://127.0.0.1:8003): the target of metrics-hammer,
    /// and where /metrics is read to report the counters the abuse moved.
    #[arg(long)]
    pub http_url: Option<String>,
    /// Concurrent HTTP clients of metrics-hammer.
    #[arg(long, default_value_t = 16)]
    pub abuser_concurrency: usize,
    /// Gap between the abuser's messages, ms (default: 20 for text-flood, 0 for the others).
    #[arg(long)]
    pub abuser_interval_ms: Option<u64>,
    /// CPU to pin the abuser's executor to (default: unpinned).
    #[arg(long)]
    pub abuser_cpu: Option<usize>,
    /// The abuser starts this long before the good devices, seconds.
    #[arg(long, default_value_t = 1.0)]
    pub abuser_lead_s: f64,
}

impl AbuseArgs {
    /// The plan for abuser number `k` of `kind` beside `fleet`.
    pub fn plan(
        &self,
        kind: AbuserKind,
        k: u32,
        fleet: &FleetArgs,
        uplink: Arc<crate::audio::Uplink>,
        duty: Option<(Duration, Duration)>,
    ) -> Result<AbuserPlan, String> {
        if kind == AbuserKind::MetricsHammer && self.http_url.is_none() {
            return Err("--abuser metrics-hammer needs --http-url".into());
        }
        let protocol = xiaozhi_protocol::BinaryProtocol::from_version(fleet.device.protocol)
            .map_err(|e| e.to_string())?;
        Ok(AbuserPlan {
            kind,
            ws_url: fleet.device.url.clone(),
            http_url: self.http_url.clone(),
            protocol,
            // Past the good devices' MACs.
            id: DeviceId::new(fleet.first_device + fleet.devices + 100_000 + k, fleet.seed),
            uplink,
            interval: self
                .abuser_interval_ms
                .map_or_else(|| kind.default_interval(), Duration::from_millis),
            concurrency: self.abuser_concurrency,
            duty,
            cpu: self.abuser_cpu,
        })
    }

    /// The server's counters now (empty without --http-url or if it cannot be read).
    pub fn counters(&self) -> BTreeMap<String, f64> {
        self.http_url
            .as_deref()
            .and_then(|base| sweep::fetch(&format!("{}/metrics", base.trim_end_matches('/'))).ok())
            .map(|text| parse_counters(&text))
            .unwrap_or_default()
    }
}

/// The counters and gauges of a Prometheus text page (summaries' quantiles left out).
pub fn parse_counters(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains("quantile="))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The counters that grew from `before` to `after`, with their increase.
pub fn moved(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(name, _)| name.ends_with("_total") || name.contains("_total{"))
        .filter_map(|(name, v)| {
            let d = v - before.get(name).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (name.clone(), d))
        })
        .collect()
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The good devices of one side (without or with the abuser), merged over rounds.
struct Side {
    first_audio: Histogram<u64>,
    send_lag: Histogram<u64>,
    interactions: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    loadavg: Vec<String>,
}

impl Side {
    fn new() -> Side {
        Side {
            first_audio: report::new_histogram(),
            send_lag: report::new_histogram(),
            interactions: 0,
            ok: 0,
            errors: BTreeMap::new(),
            loadavg: Vec::new(),
        }
    }

    fn add(&mut self, rec: &Recorder, load: String) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.first_audio.add(&rec.series(Metric::FirstAudio).total);
        let _ = self.send_lag.add(&rec.series(Metric::SendLag).total);
        self.interactions += rec.interactions;
        self.ok += rec.ok;
        for (k, n) in &rec.errors {
            if *n > 0 {
                *self.errors.entry(k.name().to_owned()).or_insert(0) += n;
            }
        }
        self.loadavg.push(load);
    }

    fn json(&self) -> Value {
        json!({
            "interactions": {"total": self.interactions, "ok": self.ok, "errored": self.interactions - self.ok},
            "errors": self.errors,
            "first_audio_ms": (!self.first_audio.is_empty()).then(|| report::percentiles(&self.first_audio)),
            "send_lag_p99_ms": (!self.send_lag.is_empty()).then(|| report::percentiles(&self.send_lag).p99),
            "loadavg_at_start": self.loadavg,
        })
    }
}

/// Runs every kind's phases and writes the report.
pub fn run(args: NeighbourArgs) -> Result<(), String> {
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    let lead = Duration::try_from_secs_f64(args.abuse.abuser_lead_s)
        .map_err(|_| "--abuser-lead-s must be a non-negative number")?;
    let pause = Duration::try_from_secs_f64(args.pause_s)
        .map_err(|_| "--pause-s must be a non-negative number")?;
    let root = args.fleet.out.clone();
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    // The abuser's frames are the good devices' utterance.
    let uplink = args
        .fleet
        .device
        .prepare(Duration::ZERO, Duration::ZERO)?
        .config
        .uplink;
    let mut kinds = Vec::new();
    let mut first_phase = true;
    for &kind in &args.abuser {
        let plan = args
            .abuse
            .plan(kind, 0, &args.fleet, Arc::clone(&uplink), None)?;
        let (mut without, mut with) = (Side::new(), Side::new());
        let mut outcome = AbuserOutcome {
            kind: kind.name().to_owned(),
            ..AbuserOutcome::default()
        };
        let mut counters = BTreeMap::new();
        for round in 0..args.rounds {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for abusive in order {
                if !first_phase {
                    std::thread::sleep(pause);
                }
                first_phase = false;
                let side = if abusive { "with" } else { "without" };
                println!(
                    "\n=== {}: round {}/{}, {side} the abuser (load {}) ===",
                    kind.name(),
                    round + 1,
                    args.rounds,
                    loadavg()
                );
                let mut fleet = args.fleet.clone();
                fleet.out = root
                    .join(kind.name())
                    .join(format!("r{}-{side}", round + 1));
                let load = loadavg();
                if abusive {
                    let before = args.abuse.counters();
                    let abuser = Abuser::start(plan.clone())?;
                    std::thread::sleep(lead);
                    let result = fleet::run_recorded(&fleet);
                    let o = abuser.stop()?;
                    println!("abuser {}: {}", kind.name(), o.brief());
                    outcome.add(&o);
                    for (name, d) in moved(&before, &args.abuse.counters()) {
                        *counters.entry(name).or_insert(0.0) += d;
                    }
                    with.add(&result?.1, load);
                } else {
                    without.add(&fleet::run_recorded(&fleet)?.1, load);
                }
            }
        }
        kinds.push(kind_json(
            kind,
            &without,
            &with,
            &outcome,
            &counters,
            args.target_ms,
        ));
    }
    let table = markdown(&kinds, args.target_ms);
    println!("\n{table}");
    let report = json!({
        "bench": "xiaozhi-bench neighbour",
        "version": env!("CARGO_PKG_VERSION"),
        "target_p99_increase_ms": args.target_ms,
        "rounds": args.rounds,
        "abuse": &args.abuse,
        "fleet": &args.fleet,
        "kinds": kinds,
    });
    let write = |name: &str, text: String| -> Result<(), String> {
        let path = root.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(
        "neighbour.json",
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n",
    )?;
    write("neighbour.md", table)?;
    println!("wrote {}", root.join("neighbour.md").display());
    Ok(())
}

/// One kind's entry in `neighbour.json`.
fn kind_json(
    kind: AbuserKind,
    without: &Side,
    with: &Side,
    outcome: &AbuserOutcome,
    counters: &BTreeMap<String, f64>,
    target_ms: f64,
) -> Value {
    let p = |s: &Side| (!s.first_audio.is_empty()).then(|| report::percentiles(&s.first_audio));
    let (a, b) = (p(without), p(with));
    let delta = |f: fn(&report::Percentiles) -> f64| match (&a, &b) {
        (Some(a), Some(b)) => Some(f(b) - f(a)),
        _ => None,
    };
    let p99_delta = delta(|p| p.p99);
    json!({
        "abuser": kind.name(),
        "without": without.json(),
        "with": with.json(),
        "first_audio_p50_increase_ms": delta(|p| p.p50),
        "first_audio_p99_increase_ms": p99_delta,
        "p99_within_target": p99_delta.map(|d| d <= target_ms && with.ok == with.interactions),
        "abuser_outcome": outcome,
        "abuser_summary": outcome.brief(),
        "server_counters_moved": counters,
    })
}

/// The kinds as a Markdown table.
fn markdown(kinds: &[Value], target_ms: f64) -> String {
    let f = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "–".to_string(), |x| format!("{x:.0}"))
    };
    let mut out = format!(
        "| abuser | good ok without / with | first audio p50 without → with (ms) | p99 without → with (ms) | Δp99 (ms) | within +{target_ms:.0} ms | load avg (without; with) | abuser outcome |\n\
         |---|---:|---:|---:|---:|---|---|---|\n"
    );
    for k in kinds {
        let side = |s: &str, q: &str| f(&k[s]["first_audio_ms"][q]);
        let ok = |s: &str| {
            format!(
                "{}/{}",
                k[s]["interactions"]["ok"], k[s]["interactions"]["total"]
            )
        };
        let load = |s: &str| {
            k[s]["loadavg_at_start"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(|l| l.split(' ').next().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        let verdict = match k["p99_within_target"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        out.push_str(&format!(
            "| {} | {} / {} | {} → {} | {} → {} | {} | {} | {}; {} | {} |\n",
            k["abuser"].as_str().unwrap_or(""),
            ok("without"),
            ok("with"),
            side("without", "p50"),
            side("with", "p50"),
            side("without", "p99"),
            side("with", "p99"),
            k["first_audio_p99_increase_ms"]
                .as_f64()
                .map_or_else(|| "–".into(), |d| format!("{d:+.0}")),
            verdict,
            load("without"),
            load("with"),
            k["abuser_summary"].as_str().unwrap_or("").replace('|', "/"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_that_grew_are_reported_with_their_increase() {
        let before = parse_counters(
            "# TYPE x counter\nxiaozhi_a_total 3\nxiaozhi_b_total{shard=\"0\"} 1\nxiaozhi_lat{quantile=\"0.5\"} 9\nxiaozhi_gauge 4\n",
        );
        assert_eq!(before.len(), 3, "{before:?}");
        let after = parse_counters(
            "xiaozhi_a_total 3\nxiaozhi_b_total{shard=\"0\"} 6\nxiaozhi_c_total 2\nxiaozhi_gauge 9\n",
        );
        let m = moved(&before, &after);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m["xiaozhi_b_total{shard=\"0\"}"], 5.0);
        assert_eq!(m["xiaozhi_c_total"], 2.0);
    }

    #[test]
    fn the_table_shows_both_sides_the_increase_and_the_verdict() {
        let k = json!({
            "abuser": "text-flood",
            "without": {"interactions": {"ok": 10, "total": 10}, "first_audio_ms": {"p50": 300.2, "p99": 400.0}, "loadavg_at_start": ["1.50 1.2 1.0"]},
            "with": {"interactions": {"ok": 10, "total": 10}, "first_audio_ms": {"p50": 310.0, "p99": 450.4}, "loadavg_at_start": ["2.00 1.3 1.0"]},
            "first_audio_p99_increase_ms": 50.4,
            "p99_within_target": false,
            "abuser_summary": "sent 5; closed 1008: too many turns ×1",
        });
        let table = markdown(&[k], 30.0);
        let row = table.lines().nth(2).expect("a row");
        assert_eq!(
            row,
            "| text-flood | 10/10 / 10/10 | 300 → 310 | 400 → 450 | +50 | **no** | 1.50; 2.00 | sent 5; closed 1008: too many turns ×1 |"
        );
    }
}
