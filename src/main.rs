//! The `ganomalyd` binary: parses the command line, sets up logging, and hands
//! over to the command's module in `cmds/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ganomalyd::cmds;

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
    Run(cmds::run::Args),
    /// Check a config file (and the models and devices it names); every problem is printed, exit 1 if any.
    CheckConfig(cmds::check_config::Args),
    /// List the V4L2 cameras on this machine.
    Cameras,
    /// Score image files with a model, as the daemon would.
    Score(cmds::score::Args),
    /// Measure raw ONNX Runtime throughput against the whole pipeline's.
    Bench(cmds::bench::Args),
    /// Subscribe to a daemon's topics and pretty-print them.
    Watch(cmds::watch::WatchArgs),
    /// Export the inspection record (verdicts and alarms) as CSV, JSON lines or text.
    Verdicts(cmds::verdicts::Args),
    /// Write good frames of a configured camera (through its ROI) into DIR/train/good for training.
    Record(cmds::record::Args),
    /// Score a camera's good parts live and set its threshold (kept in [commissioning] dir/calibration.json).
    Calibrate(cmds::calibrate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let result = match cli.cmd {
        Cmd::Run(args) => cmds::run::run(&args),
        Cmd::CheckConfig(args) => cmds::check_config::run(&args),
        Cmd::Cameras => cmds::cameras::run(),
        Cmd::Score(args) => cmds::score::run(&args),
        Cmd::Bench(args) => cmds::bench::run(&args),
        Cmd::Watch(args) => cmds::watch::run(args),
        Cmd::Verdicts(args) => cmds::verdicts::run(&args),
        Cmd::Record(args) => cmds::record::run(&args),
        Cmd::Calibrate(args) => cmds::calibrate::run(&args),
    };
    result.unwrap_or_else(|e| {
        // The whole chain, each cause once: "MQTT publisher: mqtt.password_file /p: Permission denied".
        eprintln!("error: {}", ganomalyd::base::report::chain(e.as_ref()));
        ExitCode::FAILURE
    })
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
