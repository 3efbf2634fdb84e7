//! The `ganomalyd` binary: parses the command line, sets up logging and
//! signals, and hands over to the library (`daemon::run`, `score::run`, ...).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ganomalyd::config::{Config, ConfigError, InferenceConfig, Provider};
use ganomalyd::daemon::{self, Signal};

#[derive(Parser)]
#[command(
    name = "ganomalyd",
    version,
    about = "Camera anomaly detection with GANomaly on ONNX Runtime, published over MQTT"
)]
struct Cli {
    /// Log as JSON lines (for journald/Loki) instead of text.
    #[arg(long, global = true, env = "GANOMALYD_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon until SIGTERM/SIGINT (SIGHUP reloads alarm settings).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file (and the models and devices it names); every problem is printed, exit 1 if any.
    CheckConfig { file: PathBuf },
    /// List the V4L2 cameras on this machine.
    Cameras,
    /// Score image files with a model, as the daemon would.
    Score {
        #[arg(long)]
        model: PathBuf,
        /// One JSON object per image.
        #[arg(long)]
        json: bool,
        /// Execution providers to try, in order.
        #[arg(long, value_delimiter = ',', default_value = "tensorrt,cuda,cpu")]
        providers: Vec<String>,
        /// libonnxruntime to load (default: ORT_DYLIB_PATH, then the project's .venv).
        #[arg(long)]
        ort_library: Option<PathBuf>,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Measure raw ONNX Runtime throughput against the whole pipeline's.
    Bench {
        #[arg(long, default_value_t = 1)]
        cameras: usize,
        #[arg(long, default_value_t = 2000)]
        frames: u64,
        #[arg(long)]
        json: bool,
        /// Model to bench (default: models/demo.onnx, else a random-weights fixture of its shape).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        max_wait_ms: u64,
        /// ONNX Runtime intra-op threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long, default_value_t = 1)]
        preprocess_threads: usize,
        #[arg(long, default_value_t = 640)]
        width: u32,
        #[arg(long, default_value_t = 480)]
        height: u32,
        /// Load offered by the cameras, as a multiple of the raw ORT rate.
        #[arg(long, default_value_t = 1.1)]
        offer: f64,
        #[arg(long)]
        ort_library: Option<PathBuf>,
    },
    /// Subscribe to a daemon's topics and pretty-print them.
    Watch(ganomalyd::watch::WatchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    // ONNX Runtime's own log (through ort's tracing bridge) is chatty at
    // info: allocations per session. Warnings and up unless asked for.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into());
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Run { config } => {
            let cfg = Config::load(&config)?;
            let signals = spawn_signal_thread()?;
            daemon::run(cfg, config, signals)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                println!("{}: ok ({} camera(s))", file.display(), cfg.cameras.len());
                Ok(ExitCode::SUCCESS)
            }
            Err(ConfigError::Invalid { path, problems }) => {
                eprintln!("{}: {} problem(s)", path.display(), problems.len());
                for p in problems {
                    eprintln!("  {p}");
                }
                Ok(ExitCode::FAILURE)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Cmd::Cameras => {
            let cams = ganomalyd::capture::v4l2::list_cameras().map_err(anyhow::Error::msg)?;
            if cams.is_empty() {
                eprintln!("no V4L2 cameras found");
            }
            for c in cams {
                println!("{c}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Score { model, json, providers, ort_library, images } => {
            let providers = providers.iter().map(|p| parse_provider(p)).collect::<anyhow::Result<Vec<Provider>>>()?;
            let infer = InferenceConfig { providers, ort_library, ..InferenceConfig::default() };
            let failed = ganomalyd::score::run(&model, &images, json, &infer, &mut std::io::stdout().lock())?;
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Bench {
            cameras,
            frames,
            json,
            model,
            batch,
            max_wait_ms,
            threads,
            preprocess_threads,
            width,
            height,
            offer,
            ort_library,
        } => {
            let opts = ganomalyd::bench::BenchOptions {
                model,
                cameras,
                frames,
                max_batch: batch,
                max_wait_ms,
                intra_threads: threads,
                preprocess_threads,
                width,
                height,
                offer,
                ort_library,
            };
            let report = ganomalyd::bench::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Watch(args) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(ganomalyd::watch::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_provider(s: &str) -> anyhow::Result<Provider> {
    Ok(match s.trim() {
        "tensorrt" => Provider::Tensorrt,
        "cuda" => Provider::Cuda,
        "cpu" => Provider::Cpu,
        other => anyhow::bail!("unknown execution provider `{other}` (tensorrt, cuda, cpu)"),
    })
}

/// SIGTERM/SIGINT → Stop (a second one exits at once), SIGHUP → Reload.
fn spawn_signal_thread() -> anyhow::Result<crossbeam_channel::Receiver<Signal>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = crossbeam_channel::unbounded();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("signal runtime")?;
    let (mut term, mut int, mut hup) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        rt.block_on(async move {
            let mut stops = 0;
            loop {
                let sig = tokio::select! {
                    _ = term.recv() => Signal::Stop,
                    _ = int.recv() => Signal::Stop,
                    _ = hup.recv() => Signal::Reload,
                };
                if sig == Signal::Stop {
                    stops += 1;
                    if stops > 1 {
                        eprintln!("second stop signal: exiting without draining");
                        std::process::exit(130);
                    }
                }
                let _ = tx.send(sig);
            }
        })
    })?;
    Ok(rx)
}
