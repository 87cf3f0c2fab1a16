//! `probe`: one device, one interaction, printed as a timeline (ms since the connect began), with
//! the reply audio decoded at the server's announced rate and saved as a WAV file.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use glommio::Placement;

use crate::audio;
use crate::connect::DeviceId;
use crate::device::{self, Report, Trace};
use crate::device_args::{DeviceArgs, Prepared};
use crate::outcome::{classify, End};
use crate::schedule::Limit;

/// `xiaozhi-bench probe` options.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// How the device connects and speaks.
    #[command(flatten)]
    pub talk: DeviceArgs,
    /// Device index (MAC 02:00:…).
    #[arg(long, default_value_t = 0)]
    pub device: u32,
    /// Save the reply audio (decoded Opus) as a WAV file.
    #[arg(long)]
    pub save_reply: Option<PathBuf>,
}

/// Runs the probe and prints the timeline.
pub fn run(args: ProbeArgs) -> Result<(), String> {
    // Settle after hello (MCP set-up) before speaking, as a person would.
    let Prepared { config: cfg, .. } = args
        .talk
        .prepare(Duration::from_millis(500), Duration::from_secs(3))?;
    let id = DeviceId::new(args.device, 1);
    let (trace, reports) =
        crate::executor::spawn(Placement::Unbound, "probe", move || async move {
            let trace = RefCell::new(Trace::default());
            let reports = RefCell::new(Vec::new());
            let report = |r: Report| reports.borrow_mut().push(r);
            // Like fleet: a short lead so executor start-up does not land in the first connect.
            let start = Instant::now() + Duration::from_millis(100);
            device::run(
                &cfg,
                id,
                start,
                Limit::Interactions(1),
                &report,
                Some(&trace),
            )
            .await;
            (trace.into_inner(), reports.into_inner())
        })
        .map_err(|e| format!("starting executor: {e}"))?
        .join()
        .map_err(|e| format!("probe executor: {e}"))?;

    let mut lines = trace.lines.clone();
    lines.sort_by_key(|(at, _)| *at);
    let Some(t0) = lines.first().map(|(at, _)| *at) else {
        return Err("nothing happened".into());
    };
    let ms = |at: Instant| at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
    for (at, line) in &lines {
        println!("{:>9.1} ms  {line}", ms(*at));
    }
    println!();
    let Some(o) = &trace.observed else {
        return Err("no interaction took place".into());
    };
    let verdict = classify(o);
    // The probe's one interaction starts on time, so intended and actual last frame coincide
    // unless the connect was slow; show latencies from the frame actually sent.
    if let Some(last) = o.actual_last_frame {
        let since = |t: Option<Instant>| {
            t.map_or("-".to_owned(), |t| {
                format!(
                    "{:.1} ms",
                    t.saturating_duration_since(last).as_secs_f64() * 1000.0
                )
            })
        };
        println!(
            "from the last speech frame: stt {}  first audio {}  tts stop {}",
            since(o.stt),
            since(o.first_audio),
            since(o.tts_stop)
        );
    }
    if let End::NotConnected(kind) = o.end {
        return Err(format!("no connection ({})", kind.name()));
    }
    let seconds = o.frames as f64 * 0.06;
    let mut jitter = o.jitter_us.clone();
    jitter.sort_unstable();
    let pct = |q: f64| {
        jitter
            .get(((jitter.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    println!(
        "reply: {} audio frames (~{seconds:.2} s at {} Hz), frame jitter p50 {:.1} ms, max {:.1} ms",
        o.frames,
        trace.sample_rate,
        pct(0.5),
        pct(1.0)
    );
    let errors: Vec<_> = verdict.errors.iter().map(|k| k.name()).collect();
    println!(
        "errors: {}",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(", ")
        }
    );
    if let Some(path) = &args.save_reply {
        if trace.reply.is_empty() {
            println!("no reply audio to save");
        } else {
            let secs = audio::save_reply(path, &trace.reply, trace.sample_rate)?;
            println!("saved reply audio: {} ({secs:.2} s)", path.display());
        }
    }
    let connects_failed = reports
        .iter()
        .any(|r| matches!(r, Report::Connect { result: Err(_), .. }));
    if connects_failed || !verdict.errors.is_empty() {
        return Err("the interaction did not complete cleanly".into());
    }
    Ok(())
}
