//! `ganomalyd check-config [--offline] FILE`: the compile `run` starts from,
//! without starting anything. Every problem is printed, one per line, each
//! naming its field; the exit status is 1 if there is any (so it serves as
//! `ExecStartPre`). `--offline` checks the file alone (schema, ranges, names,
//! URLs), not the models, devices and files it names: for validating a
//! fleet's configs in CI before rollout.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, ConfigError, Probe};

/// `ganomalyd check-config FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    pub file: PathBuf,
    /// Check the file alone: no model, device, image folder, library or MQTT file is opened.
    #[arg(long)]
    pub offline: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let probe = if args.offline { Probe::Offline } else { Probe::World };
    match config::load_with(&args.file, probe) {
        Ok(settings) => {
            let scope = if args.offline { ", offline: the files it names were not opened" } else { "" };
            println!("{}: ok ({} camera(s){scope})", args.file.display(), settings.cameras.len());
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
    }
}
