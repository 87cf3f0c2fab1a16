//! The server's measuring instruments, read the way operators read them: `/metrics` through an
//! independent Prometheus text parser, `/histograms/<stage>.hgrm|.hlog` and the SIGUSR1 /
//! shutdown dumps through the hdrhistogram crate's own log reader and deserializer.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;

const DEVICES: usize = 6;

/// Every interval histogram of an `.hlog`, read back with the crate's reader.
fn read_hlog(bytes: &[u8]) -> Vec<(Duration, Histogram<u64>)> {
    use base64::Engine;
    IntervalLogIterator::new(bytes)
        .filter_map(|e| match e.expect("interval log entry parses") {
            LogEntry::Interval(i) => Some(i),
            _ => None,
        })
        .map(|i| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(i.encoded_histogram())
                .expect("base64 histogram");
            let h = Deserializer::new()
                .deserialize(&mut raw.as_slice())
                .expect("V2 histogram deserializes");
            (i.start_timestamp(), h)
        })
        .collect()
}

/// Total count of an `.hlog` (sum over its intervals).
fn hlog_total(bytes: &[u8]) -> u64 {
    read_hlog(bytes).iter().map(|(_, h)| h.len()).sum()
}

/// Parses `.hgrm` text: (value, percentile, cumulative count) rows and the footer's total.
fn read_hgrm(text: &str) -> (Vec<(f64, f64, u64)>, u64) {
    let mut rows = Vec::new();
    let mut total = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Total count    =").nth(1) {
            total = rest.trim().trim_end_matches(']').trim().parse().ok();
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 3 && !line.starts_with('#') {
            if let (Ok(v), Ok(p), Ok(c)) = (cols[0].parse(), cols[1].parse(), cols[2].parse()) {
                rows.push((v, p, c));
            }
        }
    }
    (rows, total.expect("hgrm footer with the total count"))
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get(server: &Server, path: &str) -> HttpResponse {
    http_request(server.http_port, "GET", path, &[], "").expect("http request")
}

#[test]
fn metrics_parse_as_prometheus_text_and_histograms_round_trip() {
    let dump = std::env::temp_dir().join(format!("xiaozhi-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dump);
    let dump_set = format!("metrics.dump_dir={}", dump.display());
    let mut server = Server::start(&["metrics.interval_ms=200", &dump_set]);

    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let mac = format!("02:00:00:00:10:{i:02x}");
        let mut ws = connect(&server.ws_url("/xiaozhi/v1/"), &device_headers(&mac, "1"));
        hello(&mut ws, HELLO);
        devices.push(ws);
    }

    // /metrics through an independent parser: every sample line is understood, the stage
    // summaries carry the hellos, the per-shard session gauges add up to the open devices.
    let body = get(&server, "/metrics").body;
    let sample_lines = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line.rsplit_once(' ').expect("sample: name and value");
        let bare = name.split('{').next().unwrap_or(name);
        assert!(
            !bare.is_empty()
                && bare
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !bare.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let family = bare.trim_end_matches("_sum").trim_end_matches("_count");
        assert!(
            body.contains(&format!("# TYPE {bare} "))
                || body.contains(&format!("# TYPE {family} ")),
            "{bare} has no TYPE line"
        );
    }
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parse");
    let summaries = scrape
        .samples
        .iter()
        .filter(|s| matches!(s.value, prometheus_parse::Value::Summary(_)))
        .count();
    let flat = scrape.samples.len() - summaries;
    let quantile_lines = body.lines().filter(|l| l.contains("quantile=\"")).count();
    assert_eq!(
        flat + quantile_lines,
        sample_lines,
        "the parser skipped some lines"
    );
    let hello_summary = scrape
        .samples
        .iter()
        .find(|s| s.metric == "xiaozhi_connect_to_hello_us")
        .expect("connect→hello summary");
    match &hello_summary.value {
        prometheus_parse::Value::Summary(q) => {
            assert_eq!(q.len(), 4);
            assert!(q.windows(2).all(|w| w[0].count <= w[1].count), "{q:?}");
            assert!(q[0].count > 0.0);
        }
        other => panic!("connect→hello is not a summary: {other:?}"),
    }
    let value = |name: &str| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(value("xiaozhi_connect_to_hello_us_count"), DEVICES as f64);
    assert_eq!(value("xiaozhi_sessions"), DEVICES as f64);

    // The index and a bad name.
    let index = get(&server, "/histograms");
    assert_eq!(index.status, 200);
    assert!(
        index.body.contains("eos_to_first_audio_us"),
        "{}",
        index.body
    );
    let missing = get(&server, "/histograms/no_such_stage.hgrm");
    assert_eq!(missing.status, 404);
    assert!(
        missing.body.contains("connect_to_hello_us"),
        "{}",
        missing.body
    );

    // .hgrm: cumulative counts, monotone values and percentiles, ending at the hello count.
    let hgrm = get(&server, "/histograms/connect_to_hello_us.hgrm");
    assert_eq!(hgrm.status, 200);
    let (rows, total) = read_hgrm(&hgrm.body);
    assert_eq!(total, DEVICES as u64, "{}", hgrm.body);
    assert_eq!(rows.last().map(|r| r.2), Some(DEVICES as u64));
    assert!(rows
        .windows(2)
        .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1 && w[0].2 <= w[1].2));

    // .hlog: once an interval has closed after the hellos, its intervals add up to them.
    wait_for(
        "an interval with the hellos",
        Duration::from_secs(10),
        || {
            hlog_total(
                get(&server, "/histograms/connect_to_hello_us.hlog")
                    .body
                    .as_bytes(),
            ) == DEVICES as u64
        },
    );
    let hlog = get(&server, "/histograms/connect_to_hello_us.hlog").body;
    assert!(hlog.contains("#[StartTime: "), "{hlog}");
    let intervals = read_hlog(hlog.as_bytes());
    assert!(
        intervals.windows(2).all(|w| w[0].0 < w[1].0),
        "interval starts increase"
    );

    // SIGUSR1: every stage written into the dump folder, parseable.
    let status = Command::new("kill")
        .args(["-USR1", &server.child.id().to_string()])
        .status()
        .expect("kill -USR1");
    assert!(status.success());
    // The dump is complete when the server logs it (files appear one by one before that).
    wait_for("the SIGUSR1 dump", Duration::from_secs(10), || {
        server.log_text().contains("histograms written")
    });
    assert_dump(&dump, DEVICES as u64);

    // Shutdown: the dump is written again after the drain, with the last partial interval.
    let _ = std::fs::remove_dir_all(&dump);
    drop(devices);
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}:\n{}", server.log_text());
    assert_dump(&dump, DEVICES as u64);
    let log = server.log_text();
    assert_eq!(
        log.matches("histograms written").count(),
        2,
        "SIGUSR1 and shutdown dumps logged: {log}"
    );
    let _ = std::fs::remove_dir_all(&dump);
}

fn assert_dump(dir: &Path, hellos: u64) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .expect("dump folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "no half-written file left: {names:?}"
    );
    for stage in [
        "connect_to_hello_us",
        "eos_to_first_audio_us",
        "vad_per_chunk_us",
    ] {
        assert!(names.contains(&format!("{stage}.hgrm")), "{names:?}");
        assert!(names.contains(&format!("{stage}.hlog")), "{names:?}");
    }
    let hgrm = std::fs::read_to_string(dir.join("connect_to_hello_us.hgrm")).expect("hgrm");
    assert_eq!(read_hgrm(&hgrm).1, hellos);
    let hlog = std::fs::read(dir.join("connect_to_hello_us.hlog")).expect("hlog");
    assert_eq!(hlog_total(&hlog), hellos);
}

/// The metric names of a `/metrics` body, in order.
fn metric_names(body: &str) -> Vec<String> {
    body.lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2).map(String::from))
        .collect()
}

#[test]
fn concurrent_scrapes_each_get_the_whole_text_while_health_answers() {
    let mut sets = remote_provider_sets("http://127.0.0.1:9/v1");
    sets.push("runtime.shard_cores=[0]".into());
    let server = Server::start(&sets.iter().map(String::as_str).collect::<Vec<_>>());
    let names = metric_names(&get(&server, "/metrics").body);
    assert!(names.contains(&"xiaozhi_http_metrics_renders_total".to_string()));
    // 50 scrapers at once (under the per-address connection cap of 64), and a health probe.
    const SCRAPERS: usize = 50;
    let start = std::sync::Arc::new(std::sync::Barrier::new(SCRAPERS + 1));
    let port = server.http_port;
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                http_request(port, "GET", "/metrics", &[], "").expect("metrics")
            })
        })
        .collect();
    start.wait();
    assert_eq!(get(&server, "/healthz").status, 200);
    for s in scrapers {
        let resp = s.join().expect("scraper");
        assert_eq!(resp.status, 200);
        assert_eq!(
            metric_names(&resp.body),
            names,
            "a whole text for every scraper"
        );
    }
    let last = get(&server, "/metrics").body;
    let requests = metric_value(&last, "xiaozhi_http_metrics_requests_total");
    let renders = metric_value(&last, "xiaozhi_http_metrics_renders_total");
    // The first scrape, the 50, and this one; shared renders never exceed the requests.
    assert_eq!(requests, SCRAPERS as u64 + 2);
    assert!((1..=requests).contains(&renders), "{renders} renders");
}
