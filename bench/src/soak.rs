//! `soak`: good and abusive devices together for a long time, watching the server for leaks
//! (issue 12).
//!
//! The good devices are the standard fleet run for `--duration-s` (default 30 min); beside them
//! run one abuser per `--abusers` entry, each on a duty cycle (`--abuser-on-s` abusing, then
//! `--abuser-off-s` disconnected: the churn of sessions opening and closing is part of what a
//! leak would show). Every `--sample-s` the server's resident memory (`VmRSS` from
//! `/proc/<pid>/status`), open files (entries of `/proc/<pid>/fd`), threads and CPU time are
//! written as a row of `soak.csv`. At the end it prints and writes (`soak.json`) the RSS slope
//! (least-squares fit, MiB per hour, over the whole run and over its second half, which leaves
//! out the warm-up), RSS first/last/max, the open-file min/max, the good devices' results and
//! the abusers' outcomes.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::abuser::{Abuser, AbuserKind};
use crate::fleet::{self, FleetArgs};
use crate::neighbour::{loadavg, moved, AbuseArgs};
use crate::procstat;

/// `xiaozhi-bench soak` options.
#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// Server process to watch.
    #[arg(long)]
    pub server_pid: u32,
    /// How long the good devices talk, seconds (their --duration-s).
    #[arg(long, default_value_t = 1800.0)]
    pub soak_s: f64,
    /// Abusers running beside them, one of each listed kind (repeat a kind for two).
    #[arg(long, value_delimiter = ',', default_value = "text-flood,iot-flood")]
    pub abusers: Vec<AbuserKind>,
    /// Each abuser abuses for this long, seconds …
    #[arg(long, default_value_t = 10.0)]
    pub abuser_on_s: f64,
    /// … then stays away this long, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub abuser_off_s: f64,
    /// Sampling period of the server's memory and files, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub sample_s: f64,
    /// The abusers' options.
    #[command(flatten)]
    pub abuse: AbuseArgs,
    /// The good devices (`fleet`'s options; its --duration-s is --soak-s); --out is the soak's
    /// folder.
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// One sample of the server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the soak began.
    pub t_s: f64,
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
    /// CPU time so far, s.
    pub cpu_s: f64,
}

fn sample(pid: u32, t_s: f64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample {
        t_s,
        rss_kib: field("VmRSS:")?,
        fds,
        threads: field("Threads:")?,
        cpu_s: procstat::cpu_time(pid).map_or(0.0, |d| d.as_secs_f64()),
    })
}

/// Least-squares slope of `(x, y)` points; `None` with fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// RSS slope in MiB per hour over `samples`.
pub fn rss_mib_per_hour(samples: &[Sample]) -> Option<f64> {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.t_s, s.rss_kib as f64 / 1024.0))
        .collect();
    slope(&points).map(|mib_per_s| mib_per_s * 3600.0)
}

/// Runs the soak.
pub fn run(args: SoakArgs) -> Result<(), String> {
    let pid = args.server_pid;
    let first = sample(pid, 0.0).ok_or_else(|| format!("--server-pid {pid}: no such process"))?;
    let period = Duration::try_from_secs_f64(args.sample_s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or("--sample-s must be a positive number")?;
    let secs = |s: f64, name: &str| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| format!("--{name} must be a non-negative number"))
    };
    let duty = (
        secs(args.abuser_on_s, "abuser-on-s")?,
        secs(args.abuser_off_s, "abuser-off-s")?,
    );
    let root = args.fleet.out.clone();
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let csv_path = root.join("soak.csv");
    let mut csv = std::fs::File::create(&csv_path)
        .map(std::io::BufWriter::new)
        .map_err(|e| format!("{}: {e}", csv_path.display()))?;
    writeln!(csv, "t_s,rss_kib,fds,threads,cpu_s,loadavg1").map_err(|e| e.to_string())?;

    let mut fleet = args.fleet.clone();
    fleet.duration_s = Some(args.soak_s);
    fleet.interactions = None;
    fleet.out = root.join("good");
    let uplink = fleet
        .device
        .prepare(Duration::ZERO, Duration::ZERO)?
        .config
        .uplink;
    let plans = args
        .abusers
        .iter()
        .zip(0..)
        .map(|(kind, k)| {
            args.abuse
                .plan(*kind, k, &fleet, Arc::clone(&uplink), Some(duty))
        })
        .collect::<Result<Vec<_>, _>>()?;

    // The sampler: a plain thread writing the CSV as it goes (a cut-short soak keeps its data).
    let begin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let sampler = std::thread::spawn(move || {
        let mut samples = vec![first];
        let mut next = begin + period;
        let write = |csv: &mut std::io::BufWriter<std::fs::File>, s: &Sample| {
            let load = loadavg();
            let _ = writeln!(
                csv,
                "{:.1},{},{},{},{:.2},{}",
                s.t_s,
                s.rss_kib,
                s.fds,
                s.threads,
                s.cpu_s,
                load.split(' ').next().unwrap_or("")
            );
            let _ = csv.flush();
        };
        write(&mut csv, &first);
        while !flag.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(200)));
                continue;
            }
            next += period;
            match sample(pid, begin.elapsed().as_secs_f64()) {
                Some(s) => {
                    write(&mut csv, &s);
                    samples.push(s);
                }
                None => break, // the server is gone
            }
        }
        samples
    });

    let before = args.abuse.counters();
    let load_start = loadavg();
    let mut abusers = Vec::new();
    for plan in plans {
        abusers.push(Abuser::start(plan)?);
    }
    println!(
        "soak: {} good devices for {:.0} s beside {} abuser(s) ({} s on, {} s off); server pid {pid}; load {load_start}",
        fleet.devices,
        args.soak_s,
        abusers.len(),
        args.abuser_on_s,
        args.abuser_off_s
    );
    let summary = fleet::run(&fleet);
    let outcomes = abusers
        .into_iter()
        .map(Abuser::stop)
        .collect::<Result<Vec<_>, _>>()?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().map_err(|_| "the sampler panicked")?;
    let summary = summary?;
    let counters = moved(&before, &args.abuse.counters());

    let second_half: Vec<Sample> = samples
        .iter()
        .filter(|s| s.t_s >= begin.elapsed().as_secs_f64() / 2.0)
        .copied()
        .collect();
    let mib = |k: u64| k as f64 / 1024.0;
    let rss_max = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let fd_min = samples.iter().map(|s| s.fds).min().unwrap_or(0);
    let fd_max = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let last = samples.last().copied().unwrap_or(first);
    let report = json!({
        "bench": "xiaozhi-bench soak",
        "version": env!("CARGO_PKG_VERSION"),
        "soak_s": args.soak_s,
        "abusers": args.abusers,
        "abuser_on_s": args.abuser_on_s,
        "abuser_off_s": args.abuser_off_s,
        "abuse": &args.abuse,
        "samples": samples.len(),
        "sample_s": args.sample_s,
        "rss_mib": {"first": mib(first.rss_kib), "last": mib(last.rss_kib), "max": mib(rss_max)},
        "rss_slope_mib_per_hour": rss_mib_per_hour(&samples),
        "rss_slope_second_half_mib_per_hour": rss_mib_per_hour(&second_half),
        "fds": {"first": first.fds, "last": last.fds, "min": fd_min, "max": fd_max},
        "threads": {"first": first.threads, "last": last.threads},
        "server_cpu_s": last.cpu_s - first.cpu_s,
        "loadavg": {"start": load_start, "end": loadavg()},
        "good": {
            "interactions": summary["interactions"],
            "errors": summary["errors"],
            "first_audio_ms": summary["metrics_ms"]["first_audio"],
        },
        "abuser_outcomes": outcomes,
        "server_counters_moved": counters,
    });
    let path = root.join("soak.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n",
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    let f = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |x| format!("{x:+.1}"));
    println!(
        "\nsoak {:.0} s, {} samples: RSS {:.1} → {:.1} MiB (max {:.1}), slope {} MiB/h (second half {} MiB/h); open files {}..{} (first {}, last {}); load {} → {}",
        begin.elapsed().as_secs_f64(),
        samples.len(),
        mib(first.rss_kib),
        mib(last.rss_kib),
        mib(rss_max),
        f(rss_mib_per_hour(&samples)),
        f(rss_mib_per_hour(&second_half)),
        fd_min,
        fd_max,
        first.fds,
        last.fds,
        load_start,
        loadavg()
    );
    for o in &outcomes {
        println!("abuser {}: {}", o.kind, o.brief());
    }
    println!("wrote {} and {}", csv_path.display(), path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_is_its_gradient() {
        let line: Vec<(f64, f64)> = (0..10)
            .map(|i| (f64::from(i), 3.0 + 2.0 * f64::from(i)))
            .collect();
        assert!((slope(&line).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn rss_growing_1_mib_per_minute_is_60_mib_per_hour() {
        let samples: Vec<Sample> = (0..30u32)
            .map(|i| Sample {
                t_s: f64::from(i) * 5.0,
                rss_kib: 100_000 + u64::from(i) * 1024 * 5 / 60,
                fds: 20,
                threads: 5,
                cpu_s: 0.0,
            })
            .collect();
        let s = rss_mib_per_hour(&samples).unwrap();
        assert!((s - 60.0).abs() < 1.5, "{s}");
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id(), 0.0).expect("own /proc");
        assert!(s.rss_kib > 0 && s.fds > 0 && s.threads > 0);
    }
}
