//! `xiaozhi-tpc`: a thread-per-core voice-assistant server for xiaozhi ESP32 devices.
//!
//! `serve` builds the core plan, starts one pinned glommio shard per shard core (each with
//! its own SO_REUSEPORT listeners on the WebSocket and HTTP ports), and turns SIGINT/SIGTERM
//! into a drain of every shard; the process exits 0 once every shard has drained.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use shards::Control;
use xiaozhi_tpc::config::Config;
use xiaozhi_tpc::metrics::intervals::close_interval;
use xiaozhi_tpc::shard::histograms::{log_dump, write_dump};
use xiaozhi_tpc::shard::{run_shard, ServerEnv, ShardFinal, ShardRequest};
use xiaozhi_tpc::{clock, protocol};

#[derive(Parser)]
#[command(
    name = "xiaozhi-tpc",
    version,
    about = "Thread-per-core voice-assistant server for xiaozhi ESP32 devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ConfigArgs),
    /// Load and validate the configuration, print it as TOML, and exit.
    CheckConfig(ConfigArgs),
    /// Issue a device token with the first configured auth secret (as the OTA endpoint would).
    Token {
        #[command(flatten)]
        config: ConfigArgs,
        /// Device id (MAC), e.g. aa:bb:cc:dd:ee:ff.
        #[arg(long)]
        device_id: String,
        /// Client id (board UUID).
        #[arg(long)]
        client_id: String,
        /// Issue time (Unix seconds); default now.
        #[arg(long)]
        issued_at: Option<u64>,
    },
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML config file (every key is documented in config/default.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override one key, e.g. --set server.port=18000 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config, String> {
        Config::load(self.config.as_deref(), &self.set).map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match args.load() {
            Ok(config) => serve(config),
            Err(e) => {
                eprintln!("xiaozhi-tpc: {e}");
                ExitCode::from(2)
            }
        },
        Command::CheckConfig(args) => match args.load() {
            Ok(config) => {
                print!("{}", toml::to_string(&config).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("xiaozhi-tpc: {e}");
                ExitCode::from(2)
            }
        },
        Command::Token {
            config,
            device_id,
            client_id,
            issued_at,
        } => {
            let config = match config.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("xiaozhi-tpc: {e}");
                    return ExitCode::from(2);
                }
            };
            let Some(secret) = config.server.auth.secrets.iter().find(|s| !s.is_empty()) else {
                eprintln!("xiaozhi-tpc: no auth secret configured (server.auth.secrets or XIAOZHI_AUTH_SECRETS)");
                return ExitCode::from(2);
            };
            let signer = protocol::TokenSigner::new(secret.clone());
            println!(
                "{}",
                signer.sign(
                    &client_id,
                    &device_id,
                    issued_at.unwrap_or_else(clock::unix_now)
                )
            );
            ExitCode::SUCCESS
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr (stdout stays free for command output) from a writer thread, never
    // from a shard; the guard flushes them when `serve` returns (keep it to the end).
    let log_guard = xiaozhi_tpc::log_writer::install(filter, config.log.buffered_lines);
    let code = serve_logged(config);
    let dropped = xiaozhi_tpc::log_writer::dropped_lines();
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "log lines dropped: stderr was not read fast enough"
        );
    }
    drop(log_guard);
    code
}

/// [`serve`] once logging is installed.
fn serve_logged(mut config: Config) -> ExitCode {
    config.ensure_vision_secret();
    if config.inference.batch_deadline_us.is_some() {
        tracing::warn!(
            "inference.batch_deadline_us is ignored: VAD jobs now go to the inference core once \
             per inference.tick_ms; remove the key"
        );
    }
    for warning in config.server.auth.warnings() {
        tracing::warn!("auth: {warning}");
    }

    let available = shards::CorePlan::available_cores();
    let plan = match shards::CorePlan::from_config(
        &config.runtime.shard_cores,
        &config.runtime.inference_cores,
        &available,
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("xiaozhi-tpc: core plan: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(%plan, available = ?available, "core plan");
    if !plan.shared_cores().is_empty() {
        tracing::info!(cores = ?plan.shared_cores(), "shards and inference share these cores");
    }

    let settings = shards::ShardSettings {
        io_memory: config.runtime.io_memory_kib << 10,
        preempt_timer: Duration::from_micros(config.runtime.preempt_timer_us),
        tick: Duration::from_millis(config.runtime.tick_ms),
        ..Default::default()
    };
    let inference =
        match xiaozhi_tpc::inference::start(&config, &plan.inference_cores, plan.shard_cores.len())
        {
            Ok(i) => i,
            Err(e) => {
                eprintln!("xiaozhi-tpc: {e}");
                return ExitCode::from(1);
            }
        };
    tracing::info!(
        workers = inference.queues.vad.workers(),
        vad = %config.vad.model,
        language = ?config.language,
        asr = ?config.asr.provider,
        whisper = %config.asr.whisper.model,
        llm = ?config.llm.provider,
        tts = ?config.tts.provider,
        voices = ?config.local_tts(),
        "inference workers ready"
    );
    let (startup_tx, startup_rx) = flume::unbounded();
    let (finals_tx, finals_rx) = flume::bounded(plan.shard_cores.len());
    let env = ServerEnv {
        config: config.clone(),
        queues: inference.queues.clone(),
        replies: inference.replies,
        startup: startup_tx,
        finals: finals_tx,
    };
    let handle =
        match shards::start_shards::<ShardRequest, _, _>(&plan.shard_cores, &settings, move |ctx| {
            run_shard(ctx, env.clone())
        }) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("xiaozhi-tpc: {e}");
                return ExitCode::from(1);
            }
        };
    let mesh = handle.mesh();
    for _ in 0..plan.shard_cores.len() {
        match startup_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok((shard, ws, http))) => {
                tracing::info!(shard, core = plan.shard_cores[shard], websocket = %ws, http = %http, "shard listening")
            }
            Ok(Err(e)) => {
                eprintln!("xiaozhi-tpc: {e}");
                mesh.drain_all();
                let _ = handle.join();
                return ExitCode::from(1);
            }
            Err(flume::RecvTimeoutError::Timeout) => {
                eprintln!("xiaozhi-tpc: a shard's executor is up but it did not bind its ports within 30 s");
                return ExitCode::from(1);
            }
            Err(flume::RecvTimeoutError::Disconnected) => {
                eprintln!("xiaozhi-tpc: a shard ended before it bound its ports");
                mesh.drain_all();
                let _ = handle.join();
                return ExitCode::from(1);
            }
        }
    }
    // Until now `/readyz` answered 503 "starting": a balancer must not send devices while the
    // kernel can spread them over only the shards that listen already.
    let gone = mesh.send_all(|| ShardRequest::AllShardsListening);
    if !gone.is_empty() {
        eprintln!("xiaozhi-tpc: shards {gone:?} ended while starting");
        mesh.drain_all();
        let _ = handle.join();
        return ExitCode::from(1);
    }
    tracing::info!(
        "ready: devices connect to ws://{}:{}/xiaozhi/v1/, OTA at http://{}:{}/xiaozhi/ota/",
        config.server.ip,
        config.server.port,
        config.server.ip,
        config.server.http_port
    );

    let drain_mesh = mesh.clone();
    if let Err(e) = shards::signals::on_termination(move |n, signo| {
        if n == 1 {
            tracing::info!(signal = signo, "shutting down: draining every shard");
            drain_mesh.drain_all();
        } else {
            tracing::warn!(signal = signo, "second signal: exiting now");
            std::process::exit(130);
        }
    }) {
        eprintln!("xiaozhi-tpc: cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }

    let dump_mesh = mesh.clone();
    if let Err(e) = on_user1(move || {
        if dump_mesh
            .try_send(0, Control::User(ShardRequest::Dump))
            .is_err()
        {
            tracing::warn!("SIGUSR1: shard 0 is not answering; no dump");
        }
    }) {
        eprintln!("xiaozhi-tpc: cannot install the SIGUSR1 handler: {e}");
        return ExitCode::from(1);
    }

    let joined = handle.join();
    if !config.metrics.dump_dir.is_empty() {
        dump_at_exit(&config.metrics.dump_dir, finals_rx.drain().collect());
    }
    match joined {
        Ok(()) => {
            tracing::info!("all shards drained; bye");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xiaozhi-tpc: {e}");
            ExitCode::from(1)
        }
    }
}

/// Calls `f` from a dedicated thread on every SIGUSR1.
fn on_user1(f: impl Fn() + Send + 'static) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])?;
    std::thread::Builder::new()
        .name("sigusr1".into())
        .spawn(move || {
            for _ in signals.forever() {
                f();
            }
        })?;
    Ok(())
}

/// After the drain: closes the last interval with every shard's final histograms and writes
/// the dump (on the main thread: the shards are gone).
fn dump_at_exit(dir: &str, finals: Vec<ShardFinal>) {
    let hists: Vec<_> = finals.iter().map(|f| f.hist.clone()).collect();
    let Some(mut log) = finals.into_iter().find_map(|f| f.intervals) else {
        tracing::warn!("shard 0 left no interval log; writing the totals only");
        let log =
            xiaozhi_tpc::metrics::intervals::IntervalLog::new(std::time::SystemTime::now(), 1);
        log_dump(write_dump(std::path::Path::new(dir), &hists, &log.copy()));
        return;
    };
    let (cumulative, stages) = close_interval(log.take_last(), hists.clone());
    let end = log.started.elapsed().unwrap_or_default();
    log.push(end, cumulative, stages);
    log_dump(write_dump(std::path::Path::new(dir), &hists, &log.copy()));
}
