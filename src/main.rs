//! `xiaozhi-tpc`: a thread-per-core voice-assistant server for xiaozhi ESP32 devices.
//!
//! `serve` builds the core plan, starts one pinned glommio shard per shard core (each with
//! its own SO_REUSEPORT listeners on the WebSocket and HTTP ports), and turns SIGINT/SIGTERM
//! into a drain of every shard; the process exits 0 once every shard has drained.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use xiaozhi_tpc::config::Config;
use xiaozhi_tpc::shard::{run_shard, ServerEnv, ShardRequest};
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
    // Colours only on a terminal: log files and journald get plain `key=value` fields.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();

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
        asr = ?config.asr.provider,
        llm = ?config.llm.provider,
        tts = ?config.tts.provider,
        "inference workers ready"
    );
    let (startup_tx, startup_rx) = flume::unbounded();
    let env = ServerEnv {
        config: config.clone(),
        queues: inference.queues.clone(),
        replies: inference.replies,
        startup: startup_tx,
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
            Err(_) => {
                eprintln!("xiaozhi-tpc: a shard did not start within 30 s");
                return ExitCode::from(1);
            }
        }
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

    match handle.join() {
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
