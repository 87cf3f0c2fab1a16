//! Overload: when the inference core cannot keep up, the server sheds turns by its policy
//! (an `alert` to the device, counted) instead of queueing without bound, and recovers when
//! the load goes away.
//!
//! The overload is real: the server's VAD worker thread is put in SCHED_IDLE (`chrt -i`) and
//! its core is kept busy by a spinning thread, so the worker only gets leftovers.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

fn vad_thread_ids(pid: u32) -> Vec<String> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("proc") {
        let path = entry.expect("entry").path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim().starts_with("vad") {
            tids.push(path.file_name().expect("tid").to_string_lossy().to_string());
        }
    }
    tids
}

fn set_idle_policy(tid: &str, idle: bool) {
    let policy = if idle { "-i" } else { "-o" };
    let ok = std::process::Command::new("chrt")
        .args([policy, "-p", "0", tid])
        .status()
        .expect("chrt");
    assert!(ok.success(), "chrt {policy} failed");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Streams `frames` in real time and returns every JSON message received until `quiet` passes
/// without one.
fn talk(
    server_url: &str,
    device: &str,
    frames: &[Vec<u8>],
    quiet: Duration,
) -> Vec<serde_json::Value> {
    let mut ws = listening_device(server_url, device, "auto");
    send_paced(&mut ws, frames, Instant::now());
    set_timeout(&ws, quiet);
    let mut got = Vec::new();
    while let Ok(msg) = ws.read() {
        if let Message::Text(t) = msg {
            got.push(serde_json::from_str(t.as_str()).expect("json"));
        }
    }
    got
}

#[test]
fn a_starved_inference_core_sheds_turns_with_an_alert_and_recovers() {
    let speech = opus_frames(&speech_16k(
        "Turn on the kitchen lights, and set a timer for ten minutes please.",
        "en-us",
        1.0,
    ));
    let server = Server::start(&[
        "session.vad_events=true",
        "runtime.shard_cores=[0]",
        "runtime.inference_cores=[1]",
        "inference.queue_capacity=8",
        "inference.max_wait_ms=300",
    ]);
    let pid = server.child.id();
    let url = server.ws_url("/xiaozhi/v1/");
    let tids = vad_thread_ids(pid);
    // The worker and any thread ONNX Runtime started from it (they inherit its name).
    assert!(!tids.is_empty(), "a VAD worker thread");
    let rss_before = rss_kib(pid);

    // Starve the VAD worker: idle scheduling class, and a busy thread on its core.
    for t in &tids {
        set_idle_policy(t, true);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let hog = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            core_affinity::set_for_current(core_affinity::CoreId { id: 1 });
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let devices: Vec<_> = (0..12)
        .map(|i| {
            let url = url.clone();
            let speech = speech.clone();
            std::thread::spawn(move || {
                talk(
                    &url,
                    &format!("aa:bb:cc:01:00:{i:02x}"),
                    &speech,
                    Duration::from_secs(2),
                )
            })
        })
        .collect();
    let replies: Vec<Vec<serde_json::Value>> = devices
        .into_iter()
        .map(|d| d.join().expect("device"))
        .collect();
    let rss_loaded = rss_kib(pid);
    stop.store(true, Ordering::Relaxed);
    hog.join().expect("hog");
    for t in &tids {
        set_idle_policy(t, false);
    }

    let alerts = replies
        .iter()
        .flatten()
        .filter(|v| v["type"] == "alert" && v["status"] == "busy")
        .count();
    assert!(
        alerts > 0,
        "overloaded turns were shed with an alert: {replies:?}"
    );
    for v in replies.iter().flatten().filter(|v| v["type"] == "alert") {
        assert!(
            v["message"].as_str().unwrap_or("").contains("busy")
                || v["message"].as_str().unwrap_or("").contains("overloaded"),
            "{v}"
        );
    }
    // Bounded: the worker queue never exceeds its bound, memory did not balloon.
    assert!(server.metric("xiaozhi_vad_queue_depth") <= 8);
    assert!(
        rss_loaded < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_loaded} KiB under overload"
    );

    // Recovery: with the core free again, a new turn is admitted and segmented.
    let after = talk(&url, "aa:bb:cc:01:01:00", &speech, Duration::from_secs(3));
    assert!(
        after
            .iter()
            .any(|v| v["type"] == "vad" && v["state"] == "end"),
        "a turn after the overload is segmented: {after:?}"
    );
    let shed = server.metric("xiaozhi_turns_shed_total")
        + server.metric("xiaozhi_turns_refused_busy_total");
    eprintln!(
        "alerts {alerts}, shed or refused turns {shed}, RSS {rss_before} -> {rss_loaded} KiB"
    );
    assert!(shed > 0, "shed turns are counted");
}
