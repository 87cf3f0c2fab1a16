//! Timing of local Whisper ASR on one pinned core: model load, then the median of 5
//! transcriptions of a ~3.3 s espeak-ng utterance (after one untimed warm-up), for tiny.en and
//! base in int8 and float32, greedy and beam 5, with a fixed and a detected language. A
//! transcription is features + (detection) + `generate`. Also lists the process's threads after
//! each load, to show CTranslate2's single compute thread and where it is pinned.
//!
//! Run: `cargo run --release --example bench_asr` (needs espeak-ng, sox and `make setup`).
//! Everything runs on core 1 (override with `BENCH_CORE`).

use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::BoxError;
use xiaozhi_tpc::providers::asr::{ChineseScript, WhisperSettings, WhisperWorker};

const RUNS: usize = 5;
const TEXT: &str = "Turn on the kitchen lights and set a timer for ten minutes.";

/// (label, model directory, int8, language, beam, shortest encoder window ms)
type Case = (
    &'static str,
    &'static str,
    bool,
    Option<&'static str>,
    usize,
    u32,
);

fn main() -> Result<(), BoxError> {
    let core = common::bench_core();
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        eprintln!("warning: could not pin the benchmark thread to core {core}");
    }
    let models = common::models_dir();
    let pcm = common::speech(TEXT, 16_000, 0.0)?;
    println!(
        "audio: espeak-ng {:?}, {:.2} s at 16 kHz; core {core}; {RUNS} timed runs after 1 warm-up\n",
        TEXT,
        pcm.len() as f64 / 16_000.0
    );

    let cases: [Case; 9] = [
        (
            "tiny.en int8",
            "whisper-tiny.en",
            true,
            Some("en"),
            1,
            30_000,
        ),
        (
            "tiny.en int8 beam5",
            "whisper-tiny.en",
            true,
            Some("en"),
            5,
            30_000,
        ),
        (
            "tiny.en int8 b5 w10s",
            "whisper-tiny.en",
            true,
            Some("en"),
            5,
            10_000,
        ),
        (
            "tiny.en int8 b5 w5s",
            "whisper-tiny.en",
            true,
            Some("en"),
            5,
            5_000,
        ),
        (
            "tiny.en f32",
            "whisper-tiny.en",
            false,
            Some("en"),
            1,
            30_000,
        ),
        ("base int8", "whisper-base", true, Some("en"), 1, 30_000),
        (
            "base int8 w10s",
            "whisper-base",
            true,
            Some("en"),
            1,
            10_000,
        ),
        (
            "base int8 zh|en",
            "whisper-base",
            true,
            Some("zh,en"),
            1,
            30_000,
        ),
        ("base f32", "whisper-base", false, Some("en"), 1, 30_000),
    ];
    let mut rows = Vec::new();
    for (label, dir, int8, language, beam_size, window_ms) in cases {
        let settings = WhisperSettings {
            model_dir: models.join(dir),
            language: language.map(str::to_owned),
            int8,
            core,
            beam_size,
            window_ms,
            chinese_script: ChineseScript::Simplified,
        };
        let t0 = Instant::now();
        let mut worker = match WhisperWorker::load(&settings) {
            Ok(w) => w,
            Err(e) => {
                println!("{label}: skipped: {e}");
                continue;
            }
        };
        let load = t0.elapsed();
        println!("{label}: threads after load (name, CPUs allowed, last CPU):");
        for (name, allowed, last) in threads() {
            println!("    {name:<16} {allowed:<6} {last}");
        }
        let warm = worker.transcribe(&pcm)?;
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let t = Instant::now();
            let out = worker.transcribe(&pcm)?;
            times.push(t.elapsed());
            if out != warm {
                println!("    note: transcript changed between runs: {:?}", out.text);
            }
        }
        times.sort();
        println!("    [{}] {:?}\n", warm.language, warm.text);
        rows.push((label, load, times));
        drop(worker);
    }

    println!(
        "{:<22} {:>9} {:>11} {:>9} {:>9}",
        "model", "load ms", "median ms", "min ms", "max ms"
    );
    for (label, load, times) in rows {
        println!(
            "{label:<22} {:>9} {:>11} {:>9} {:>9}",
            ms(load),
            ms(times[times.len() / 2]),
            ms(times[0]),
            ms(times[times.len() - 1])
        );
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// `(name, Cpus_allowed_list, CPU it last ran on)` of every thread of this process.
fn threads() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        let name = read("comm").trim().to_owned();
        let allowed = read("status")
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        // Field 39 of /proc/…/stat is the CPU the thread last ran on; count after the `)`.
        let stat = read("stat");
        let last = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(36))
            .unwrap_or("?")
            .to_owned();
        out.push((name, allowed, last));
    }
    out
}
