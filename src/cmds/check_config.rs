//! `ganomalyd check-config [--offline] FILE`: the compile `run` starts from,
//! without starting anything. Every problem is printed, one per line, each
//! naming its field; the exit status is 1 if there is any (so it serves as
//! `ExecStartPre`). `--offline` checks the file alone (schema, ranges, names,
//! URLs), not the models, devices and files it names: for validating a
//! fleet's configs in CI before rollout.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::commission::{self, CalibrationState, ThresholdSource};
use crate::config::{self, ConfigError, Probe, Settings};

/// The threshold each camera decides with and where it comes from (the
/// precedence of `commission`'s module doc), one line per camera.
pub fn thresholds(settings: &Settings) -> Vec<String> {
    let file = settings.commissioning.calibration_file();
    let state = file.as_ref().map(|f| CalibrationState::load(f));
    let mut lines = Vec::new();
    if let Some(Err(e)) = &state {
        lines.push(format!("warning: {e}; the models' own calibrations are used"));
    }
    let live = file.as_deref().zip(state.as_ref().and_then(|s| s.as_ref().ok()));
    for cam in &settings.cameras {
        let meta = ganomaly_core::onnx::check::read_file(&cam.model)
            .and_then(|bytes| ganomaly_core::onnx::check::check_model(&bytes));
        let line = match meta {
            Err(e) => format!("camera {}: model {}: {e}", cam.name, cam.model.display()),
            Ok(meta) => {
                let kind = cam.score.kind(meta.default_score);
                match commission::effective(live, &cam.name, &meta, kind) {
                    None => format!("camera {}: the model has no `{}` score", cam.name, kind.as_str()),
                    Some((c, src)) => {
                        let from = match src {
                            ThresholdSource::Live { file, ts, scores } => {
                                format!("live calibration in {} ({scores} scores, ts {ts})", file.display())
                            }
                            ThresholdSource::Model => format!("model metadata ({})", cam.model.display()),
                        };
                        let far = c.expected_far.as_ref().map_or(String::new(), |f| {
                            format!(", expected false-alarm rate {:.4} [{:.4}, {:.4}]", f.estimate, f.low, f.high)
                        });
                        format!(
                            "camera {}: threshold {} on raw `{}` ({}{far}) from {from}",
                            cam.name,
                            c.threshold,
                            kind.as_str(),
                            c.method.as_str()
                        )
                    }
                }
            }
        };
        lines.push(line);
    }
    lines
}

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
            if !args.offline {
                for line in thresholds(&settings) {
                    println!("  {line}");
                }
            }
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
