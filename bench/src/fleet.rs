//! `fleet`: N simulated devices on the bench's own pinned glommio executors, measured open-loop.
//!
//! Devices are dealt round-robin onto `--cores` executors (pinned, `io_memory` 512 KiB so no
//! root is needed, 500 µs preempt timer so a busy executor still wakes timers promptly; see
//! notes/costs-and-wakeups.md §3). Each device is one task; it reports connects and finished
//! interactions over an unbounded flume channel to the main thread, which aggregates them into
//! HdrHistograms and, at the end, writes the `.hgrm`/`.hlog` files, `summary.json`, the SVG plot
//! and the table. Sending never blocks a device; the main thread is a plain blocking receiver.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::Placement;
use serde_json::json;

use crate::audio::{self, FRAME_MS};
use crate::connect::DeviceId;
use crate::device;
use crate::device_args::{DeviceArgs, Prepared};
use crate::report::{self, Metric, Recorder};
use crate::schedule::{connect_offset, Limit};
use crate::{plot, rusage};

/// `xiaozhi-bench fleet` options.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct FleetArgs {
    /// How every device connects and speaks.
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 10)]
    pub devices: u32,
    /// Index of the first device (MAC 02:00:…); use distinct ranges for concurrent bench processes.
    #[arg(long, default_value_t = 0)]
    pub first_device: u32,
    /// Bench executors (threads), each pinned to one CPU.
    #[arg(long, default_value_t = 1)]
    pub cores: usize,
    /// CPUs to pin the executors to, comma separated (default: the last --cores online CPUs).
    #[arg(long, value_delimiter = ',')]
    pub cpus: Option<Vec<usize>>,
    /// Do not pin the executors.
    #[arg(long)]
    pub no_pin: bool,
    /// Spread device connects evenly over this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub ramp_s: f64,
    /// Run interactions whose intended start is within this many seconds of the start.
    #[arg(long, conflicts_with = "interactions")]
    pub duration_s: Option<f64>,
    /// Interactions per device (default 5 when --duration-s is not given).
    #[arg(long)]
    pub interactions: Option<u32>,
    /// Think time between tts stop and the next listen start, ms.
    #[arg(long, default_value_t = 500)]
    pub think_ms: u64,
    /// Reply time (last speech frame → tts stop) the open-loop schedule allows for, ms.
    #[arg(long, default_value_t = 2500)]
    pub expected_reply_ms: u64,
    /// Seed for client ids and connect jitter.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Interval length of the .hlog files, seconds.
    #[arg(long, default_value_t = 1.0)]
    pub interval_s: f64,
    /// Output folder.
    #[arg(long, default_value = "bench/out/fleet")]
    pub out: PathBuf,
}

/// The CPUs to pin `cores` executors to (`None` = unpinned).
fn placement(args: &FleetArgs) -> Result<Vec<Option<usize>>, String> {
    if args.cores == 0 {
        return Err("--cores must be at least 1".into());
    }
    if args.no_pin {
        return Ok(vec![None; args.cores]);
    }
    if let Some(cpus) = &args.cpus {
        if cpus.len() != args.cores {
            return Err(format!(
                "--cpus lists {} CPUs for --cores {}",
                cpus.len(),
                args.cores
            ));
        }
        return Ok(cpus.iter().map(|c| Some(*c)).collect());
    }
    let online: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if online.is_empty() {
        return Ok(vec![None; args.cores]);
    }
    // The last CPUs, wrapping around when asked for more executors than CPUs.
    Ok((0..args.cores)
        .map(|i| Some(online[(online.len() * args.cores - args.cores + i) % online.len()]))
        .collect())
}

fn secs(s: f64, name: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("--{name} must be a non-negative number"))
}

/// Runs the fleet, writes the report and returns the summary (also in `summary.json`).
pub fn run(args: &FleetArgs) -> Result<serde_json::Value, String> {
    run_recorded(args).map(|(summary, _)| summary)
}

/// As [`run`], and also returns the histograms (`neighbour` merges them over rounds).
pub fn run_recorded(args: &FleetArgs) -> Result<(serde_json::Value, Recorder), String> {
    let cpus = placement(args)?;
    let ramp = secs(args.ramp_s, "ramp-s")?;
    let interval = secs(args.interval_s, "interval-s")?;
    let Prepared { config, pcm } = args.device.prepare(
        Duration::from_millis(args.think_ms),
        Duration::from_millis(args.expected_reply_ms),
    )?;
    let speech_frames = config.uplink.speech.len();
    println!(
        "utterance: {:.2} s ({speech_frames} frames of {FRAME_MS} ms, {} bytes of Opus)",
        pcm.len() as f64 / f64::from(audio::UPLINK_RATE),
        config.uplink.speech_bytes
    );
    let cfg = Arc::new(config);

    // Executors start within a few ms; give them a moment before the first connect.
    let lead = Duration::from_millis(300);
    let start = Instant::now() + lead;
    let start_wall = SystemTime::now() + lead;
    let limit = match (args.interactions, args.duration_s) {
        (Some(k), _) => Limit::Interactions(k),
        (None, Some(d)) => Limit::Until(start + secs(d, "duration-s")?),
        (None, None) => Limit::Interactions(5),
    };
    let (tx, rx) = flume::unbounded::<device::Report>();
    let cpu_before = rusage::cpu_time();
    let mut executors = Vec::new();
    for (e, cpu) in cpus.iter().enumerate() {
        let devices: Vec<(DeviceId, Instant)> = (0..args.devices)
            .filter(|i| *i as usize % cpus.len() == e)
            .map(|i| {
                let id = DeviceId::new(args.first_device + i, args.seed);
                (id, start + connect_offset(i, args.devices, ramp, args.seed))
            })
            .collect();
        let cfg = Arc::clone(&cfg);
        let tx = tx.clone();
        let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
        let handle = crate::executor::spawn(placement, &format!("bench-{e}"), move || async move {
            let tasks: Vec<_> = devices
                .into_iter()
                .map(|(id, connect_at)| {
                    let cfg = Arc::clone(&cfg);
                    let tx = tx.clone();
                    glommio::spawn_local(async move {
                        let report = move |r| {
                            // The collector outlives the devices; a send can only fail if
                            // it stopped early, and then nobody needs the report.
                            let _ = tx.send(r);
                        };
                        device::run(&cfg, id, connect_at, limit, &report, None).await;
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
        })
        .map_err(|e| format!("starting executor {e}"))?;
        executors.push(handle);
    }
    drop(tx);
    println!(
        "fleet: {} devices on {} executor(s) {:?}, transport {:?}, mode {:?}, protocol v{}, identity {:?}",
        args.devices,
        cpus.len(),
        cpus,
        args.device.transport,
        args.device.mode,
        args.device.protocol,
        args.device.identity
    );

    let mut rec = Recorder::new(start, interval);
    let mut last_progress = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(r) => rec.add(&r),
            Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => break,
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            println!(
                "{:>6.1} s  connects {}/{}  interactions {} (ok {})",
                start.elapsed().as_secs_f64(),
                rec.connects_ok,
                rec.connects,
                rec.interactions,
                rec.ok
            );
        }
    }
    for (e, h) in executors.into_iter().enumerate() {
        h.join().map_err(|err| format!("executor {e}: {err}"))?;
    }
    let wall = start.elapsed();
    let cpu = rusage::cpu_time().since(&cpu_before);

    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    write_files(&args.out, &rec, start_wall)?;
    let cpu_percent = 100.0 * cpu.total().as_secs_f64() / wall.as_secs_f64().max(1e-9);
    let summary = json!({
        "bench": "xiaozhi-bench fleet",
        "version": env!("CARGO_PKG_VERSION"),
        "config": args,
        "utterance_s": pcm.len() as f64 / f64::from(audio::UPLINK_RATE),
        "speech_frames": speech_frames,
        "latency_origin": "intended send time of the last speech frame (open-loop schedule)",
        "started_unix_s": start_wall.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        "wall_time_s": wall.as_secs_f64(),
        "bench_cpu": {
            "user_s": cpu.user.as_secs_f64(),
            "system_s": cpu.system.as_secs_f64(),
            "percent_of_one_core": cpu_percent,
            "ms_per_interaction": cpu.total().as_secs_f64() * 1000.0 / (rec.interactions.max(1) as f64),
        },
        "connects": {"attempts": rec.connects, "ok": rec.connects_ok},
        "interactions": {"total": rec.interactions, "ok": rec.ok, "errored": rec.interactions - rec.ok},
        "reply_frames": rec.frames,
        "errors": report::errors_json(&rec.errors),
        "metrics_ms": report::metrics_json(&rec),
    });
    let path = args.out.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;

    println!(
        "\ndevices {}  interactions {} (ok {}, errored {})  connects {}/{}  wall {:.1} s  bench CPU {:.1} % of one core",
        args.devices,
        rec.interactions,
        rec.ok,
        rec.interactions - rec.ok,
        rec.connects_ok,
        rec.connects,
        wall.as_secs_f64(),
        cpu_percent
    );
    print!("{}", report::table(&rec));
    println!("wrote {}", args.out.display());
    Ok((summary, rec))
}

/// The `.hgrm` and `.hlog` per metric with samples, and the plot.
fn write_files(out: &Path, rec: &Recorder, start_wall: SystemTime) -> Result<(), String> {
    let create = |name: String| {
        let path = out.join(name);
        std::fs::File::create(&path)
            .map(std::io::BufWriter::new)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    for m in Metric::ALL {
        let series = rec.series(m);
        if series.total.is_empty() {
            continue;
        }
        let mut f = create(format!("{}.hgrm", m.name()))?;
        report::write_hgrm(&series.total, &mut f, 1000.0).map_err(|e| e.to_string())?;
        let mut f = create(format!("{}.hlog", m.name()))?;
        report::write_hlog(series, m, start_wall, rec.interval(), &mut f)
            .map_err(|e| e.to_string())?;
    }
    plot::latency_by_percentile(
        &out.join("latency.svg"),
        "xiaozhi-bench: latency from the intended last speech frame",
        &[
            ("stt", &rec.series(Metric::Stt).total),
            ("first audio", &rec.series(Metric::FirstAudio).total),
            ("tts stop", &rec.series(Metric::TtsStop).total),
        ],
    )
}
