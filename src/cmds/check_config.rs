//! `ganomalyd check-config FILE`: the compile `run` starts from, without
//! starting anything. Every problem is printed, one per line, each naming its
//! field; the exit status is 1 if there is any (so it serves as `ExecStartPre`).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, ConfigError};

/// `ganomalyd check-config FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    pub file: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match config::load(&args.file) {
        Ok(settings) => {
            println!("{}: ok ({} camera(s))", args.file.display(), settings.cameras.len());
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
