//! `xiaozhi-bench` against this server on loopback: a small fleet completes with zero errors
//! and writes every file, a sweep reports the server's CPU and memory, the noisy-neighbour
//! scenario reports both phases and the abuser's outcome for every abuser kind, and a short
//! soak writes its samples and slope. The providers are the
//! bench's mock OpenAI-compatible upstream (a real HTTP server), so the run is deterministic.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use xiaozhi_bench::mock_upstream::{self, MockSettings};

/// One bench run at a time in this binary. Each test starts a server *and* a bench process with
/// pinned glommio executors of its own; five at once on two cores have twice left a server
/// whose shard did not start within 30 s (an open start-up bug, see the closing note of
/// 2026-12-04), so the tests here take turns.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn remote_server(mock: &mock_upstream::MockHandle) -> Server {
    remote_server_with(mock, &[])
}

/// [`remote_server`] with more `--set`s.
fn remote_server_with(mock: &mock_upstream::MockHandle, extra: &[String]) -> Server {
    let mut sets = remote_provider_sets(&mock.base_url());
    sets.extend_from_slice(extra);
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    Server::start(&refs)
}

fn mock() -> mock_upstream::MockHandle {
    mock_upstream::serve(MockSettings {
        bind: "127.0.0.1:0".parse().expect("addr"),
        ..MockSettings::default()
    })
    .expect("mock upstream")
}

fn out_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("xiaozhi-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs the bench with `args`; panics with its output (and the server's log) if it fails.
fn run_bench(args: &[&str], out: &Path, server: &Server) -> String {
    let output = Command::new(bench_bin())
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run xiaozhi-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log_text()
    );
    stdout
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

#[test]
fn a_small_fleet_completes_without_errors_and_writes_every_file() {
    let _turn = one_at_a_time();
    let mock = mock();
    let server = remote_server(&mock);
    let out = out_dir("fleet");
    let url = server.ws_url("/xiaozhi/v1/");
    run_bench(
        &[
            "fleet",
            "--url",
            &url,
            "--devices",
            "4",
            "--interactions",
            "2",
            "--ramp-s",
            "1",
            "--no-pin",
            "--protocol",
            "2",
            "--interval-s",
            "0.5",
        ],
        &out,
        &server,
    );
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["interactions"]["total"], 8, "{summary}");
    assert_eq!(summary["interactions"]["ok"], 8, "{summary}");
    assert_eq!(summary["interactions"]["errored"], 0, "{summary}");
    assert_eq!(summary["connects"]["ok"], 4, "{summary}");
    for metric in [
        "stt",
        "first_audio",
        "tts_stop",
        "connect_hello",
        "frame_jitter",
        "send_lag",
    ] {
        for ext in ["hgrm", "hlog"] {
            let f = out.join(format!("{metric}.{ext}"));
            assert!(
                std::fs::metadata(&f).is_ok_and(|m| m.len() > 0),
                "{} missing or empty",
                f.display()
            );
        }
        assert!(
            summary["metrics_ms"][metric]["count"]
                .as_u64()
                .is_some_and(|c| c > 0),
            "{metric}: {summary}"
        );
    }
    let svg = std::fs::read_to_string(out.join("latency.svg")).expect("latency.svg");
    assert!(
        svg.starts_with("<svg") || svg.contains("<svg"),
        "not an SVG"
    );
    // The server saw the same turns: its own histogram counted one first audio per interaction.
    let first_audio = server.metric("xiaozhi_eos_to_first_audio_us_count");
    assert_eq!(first_audio, 8);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_small_mqtt_fleet_gets_credentials_from_ota_and_completes_over_mqtt_and_udp() {
    let _turn = one_at_a_time();
    let mock = mock();
    let mqtt_port = free_port();
    let server = remote_server_with(
        &mock,
        &[
            "mqtt.enabled=true".into(),
            format!("mqtt.port={mqtt_port}"),
            "mqtt.udp_port_base=0".into(),
            "mqtt.signature_keys=[\"bench-fleet-mqtt-key\"]".into(),
            "mqtt.ota_transport=\"mqtt\"".into(),
        ],
    );
    let out = out_dir("fleet-mqtt");
    let ota = format!("http://127.0.0.1:{}/xiaozhi/ota/", server.http_port);
    run_bench(
        &[
            "fleet",
            "--transport",
            "mqtt",
            "--ota-url",
            &ota,
            "--devices",
            "4",
            "--interactions",
            "2",
            "--ramp-s",
            "1",
            "--no-pin",
            "--interval-s",
            "0.5",
        ],
        &out,
        &server,
    );
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["config"]["transport"], "mqtt", "{summary}");
    assert_eq!(summary["interactions"]["total"], 8, "{summary}");
    assert_eq!(summary["interactions"]["ok"], 8, "{summary}");
    assert_eq!(summary["connects"]["ok"], 4, "{summary}");
    assert!(
        summary["reply_frames"].as_u64().is_some_and(|f| f > 0),
        "{summary}"
    );
    // The server saw them as MQTT sessions with UDP audio, not as WebSockets.
    let turns = |t: &str| {
        server.metric(&format!(
            "xiaozhi_transport_turns_total{{transport=\"{t}\"}}"
        ))
    };
    assert_eq!((turns("mqtt"), turns("websocket")), (8, 0));
    assert_eq!(
        server.metric("xiaozhi_mqtt_connects_total{result=\"accepted\"}"),
        4
    );
    assert!(server.metric("xiaozhi_udp_datagrams_total{result=\"accepted\"}") > 0);
    assert!(server.metric("xiaozhi_udp_downlink_total{result=\"sent\"}") > 0);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_sweep_reports_latency_errors_and_server_cost_per_fleet_size() {
    let _turn = one_at_a_time();
    let mock = mock();
    let server = remote_server(&mock);
    let out = out_dir("sweep");
    let metrics_url = format!("http://127.0.0.1:{}/metrics", server.http_port);
    let (pid, url) = (server.child.id().to_string(), server.ws_url("/xiaozhi/v1/"));
    let stdout = run_bench(
        &[
            "sweep",
            "--steps",
            "1,3",
            "--pause-s",
            "0.5",
            "--server-pid",
            &pid,
            "--metrics-url",
            &metrics_url,
            "--url",
            &url,
            "--interactions",
            "1",
            "--ramp-s",
            "0.5",
            "--no-pin",
        ],
        &out,
        &server,
    );
    let sweep = read_json(&out.join("sweep.json"));
    let steps = sweep["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{sweep}");
    for (step, devices) in steps.iter().zip([1, 3]) {
        assert_eq!(step["devices"], devices);
        assert_eq!(step["interactions"]["ok"], devices, "{step}");
        assert!(
            step["first_audio_ms"]["p95"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "{step}"
        );
        assert!(
            step["server_cpu_percent_of_one_core"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "{step}"
        );
        assert!(
            step["server_rss_max_mib"].as_f64().is_some_and(|v| v > 1.0),
            "{step}"
        );
        let metrics = std::fs::read_to_string(out.join(format!("n{devices}/metrics.txt")))
            .expect("saved /metrics");
        assert!(metrics.contains("xiaozhi_eos_to_first_audio_us_count"));
        // The server's own split: its interactions counter moved by this step's replies and
        // its shard threads and VAD worker used CPU for them.
        let roles = &step["server_cpu_ms_per_interaction_by_role"];
        assert_eq!(roles["interactions_counted_by_server"], devices, "{step}");
        for role in ["shard", "inference"] {
            assert!(
                roles[role].as_f64().is_some_and(|v| v > 0.0),
                "{role}: {step}"
            );
        }
        assert!(
            step["server_cpu_ms_per_interaction"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "{step}"
        );
    }
    let table = std::fs::read_to_string(out.join("sweep.md")).expect("sweep.md");
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(stdout.contains("| devices |"), "{stdout}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_neighbour_scenario_reports_both_phases_and_every_abuser_while_the_good_devices_finish() {
    let _turn = one_at_a_time();
    let mock = mock();
    let server = remote_server(&mock);
    let out = out_dir("neighbour");
    let url = server.ws_url("/xiaozhi/v1/");
    let http = format!("http://127.0.0.1:{}", server.http_port);
    let kinds = ["text-flood", "iot-flood", "frame-flood", "metrics-hammer"];
    let stdout = run_bench(
        &[
            "neighbour",
            "--abuser",
            &kinds.join(","),
            "--http-url",
            &http,
            "--abuser-concurrency",
            "4",
            "--abuser-lead-s",
            "0.5",
            "--pause-s",
            "0.5",
            "--url",
            &url,
            "--devices",
            "2",
            "--interactions",
            "1",
            "--ramp-s",
            "0.5",
            "--no-pin",
        ],
        &out,
        &server,
    );
    let report = read_json(&out.join("neighbour.json"));
    let entries = report["kinds"].as_array().expect("kinds");
    assert_eq!(entries.len(), kinds.len(), "{report}");
    for (k, kind) in entries.iter().zip(kinds) {
        assert_eq!(k["abuser"], kind);
        // The good devices finished every interaction on both sides, abuser or not.
        for side in ["without", "with"] {
            assert_eq!(k[side]["interactions"]["total"], 2, "{kind} {side}: {k}");
            assert_eq!(k[side]["interactions"]["ok"], 2, "{kind} {side}: {k}");
            for q in ["p50", "p99"] {
                assert!(
                    k[side]["first_audio_ms"][q]
                        .as_f64()
                        .is_some_and(|v| v > 0.0),
                    "{kind} {side} {q}: {k}"
                );
            }
            assert_eq!(
                k[side]["loadavg_at_start"].as_array().map(Vec::len),
                Some(1)
            );
        }
        assert!(k["first_audio_p99_increase_ms"].is_f64(), "{k}");
        assert!(k["p99_within_target"].is_boolean(), "{k}");
        let abuser = &k["abuser_outcome"];
        assert_eq!(abuser["kind"], kind);
        assert!(
            abuser["sent"].as_u64().is_some_and(|n| n > 0),
            "{kind}: {abuser}"
        );
        if kind == "metrics-hammer" {
            assert!(
                abuser["http_status"]["200"].as_u64().is_some_and(|n| n > 0),
                "{abuser}"
            );
        } else {
            assert!(
                abuser["connects_ok"].as_u64().is_some_and(|n| n >= 1),
                "{kind}: {abuser}"
            );
        }
    }
    // The text flood started turns the server answered or cut: it moved the server's counters.
    assert!(
        entries[0]["server_counters_moved"]
            .as_object()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        entries[0]
    );
    let table = std::fs::read_to_string(out.join("neighbour.md")).expect("neighbour.md");
    assert_eq!(table.lines().count(), 2 + kinds.len(), "{table}");
    assert!(stdout.contains("| abuser |"), "{stdout}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_short_soak_samples_the_server_and_reports_the_rss_slope_and_open_files() {
    let _turn = one_at_a_time();
    let mock = mock();
    let server = remote_server(&mock);
    let out = out_dir("soak");
    let (pid, url) = (server.child.id().to_string(), server.ws_url("/xiaozhi/v1/"));
    let http = format!("http://127.0.0.1:{}", server.http_port);
    run_bench(
        &[
            "soak",
            "--server-pid",
            &pid,
            "--soak-s",
            "4",
            "--sample-s",
            "0.5",
            "--abusers",
            "text-flood,iot-flood",
            "--abuser-on-s",
            "1",
            "--abuser-off-s",
            "1",
            "--http-url",
            &http,
            "--url",
            &url,
            "--devices",
            "2",
            "--ramp-s",
            "0.5",
            "--no-pin",
        ],
        &out,
        &server,
    );
    let report = read_json(&out.join("soak.json"));
    assert!(
        report["samples"].as_u64().is_some_and(|n| n >= 6),
        "{report}"
    );
    assert!(report["rss_slope_mib_per_hour"].is_f64(), "{report}");
    assert!(
        report["rss_mib"]["max"].as_f64().is_some_and(|v| v > 1.0),
        "{report}"
    );
    let fds = &report["fds"];
    assert!(fds["min"].as_u64().is_some_and(|n| n > 0), "{report}");
    assert!(fds["max"].as_u64() >= fds["min"].as_u64(), "{report}");
    assert!(
        report["good"]["interactions"]["ok"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{report}"
    );
    assert_eq!(
        report["abuser_outcomes"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    let csv = std::fs::read_to_string(out.join("soak.csv")).expect("soak.csv");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("t_s,rss_kib,fds,threads,cpu_s,loadavg1"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(
        rows.len() as u64,
        report["samples"].as_u64().unwrap_or(0),
        "{csv}"
    );
    assert!(rows.iter().all(|r| r.split(',').count() == 6), "{csv}");
    let _ = std::fs::remove_dir_all(&out);
}
