//! `ganomaly-train` binary: sets up logging, parses the command line and runs it.

use std::io::IsTerminal;

use clap::Parser;
use ganomaly_train::cmd::Cli;

fn main() -> anyhow::Result<()> {
    // Progress and diagnostics at `info` unless RUST_LOG says otherwise; stdout
    // stays the commands' output (JSON that scripts parse).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Cli::parse().command.run()
}
