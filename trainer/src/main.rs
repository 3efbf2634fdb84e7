//! `ganomaly-train` binary: parses the command line and runs it.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    ganomaly_train::cli::run(ganomaly_train::cli::Cli::parse())
}
