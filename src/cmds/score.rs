//! `ganomalyd score --model MODEL.onnx [--json] IMAGE...`: scores image files
//! offline through the daemon's own preprocessing and session code, so a
//! quality engineer sees exactly what the daemon would decide for them.
//!
//! One line (or JSON object) per image with every score the model exports:
//! raw, normalized (calibrated threshold at 0.5) and anomalous yes/no; the
//! model's default score decides the headline verdict.

use std::io::Write;
use std::path::PathBuf;

use ganomaly_core::preprocess::Preprocessor;
use ganomaly_core::ScoreKind;
use serde::Serialize;

use crate::config::{InferenceSettings, Provider};
use crate::infer::{BatchOutput, InferError, Model};

/// `ganomalyd score`: score image files with a model, as the daemon would.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    /// One JSON object per image.
    #[arg(long)]
    pub json: bool,
    /// Execution providers to try, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tensorrt,cuda,cpu")]
    pub providers: Vec<Provider>,
    /// libonnxruntime to load (default: ORT_DYLIB_PATH, then /usr/lib/ganomalyd/).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// Scores the images to stdout; fails (exit 1) when any could not be scored.
pub fn run(args: &Args) -> anyhow::Result<std::process::ExitCode> {
    let infer = InferenceSettings {
        providers: args.providers.clone(),
        // Relative to the working directory, as a command-line path is.
        ort_library: args.ort_library.as_deref().map(crate::base::paths::absolute),
        ..InferenceSettings::default()
    };
    let failed = score_images(&args.model, &args.images, args.json, &infer, &mut std::io::stdout().lock())?;
    Ok(if failed == 0 { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Model(#[from] InferError),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// One score kind of one image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KindScore {
    pub kind: &'static str,
    pub raw: f64,
    pub normalized: f64,
    pub threshold: f64,
    pub anomalous: bool,
}

/// One image's line.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageScore {
    pub path: String,
    /// The model's default score kind, which decides `anomalous`.
    pub default: &'static str,
    pub raw: f64,
    pub normalized: f64,
    pub anomalous: bool,
    pub scores: Vec<KindScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Scores every image; returns how many could not be read or scored.
pub fn score_images(
    model_path: &std::path::Path,
    images: &[PathBuf],
    json: bool,
    infer: &InferenceSettings,
    out: &mut dyn Write,
) -> Result<usize, ScoreError> {
    let mut model = Model::load(model_path, infer)?;
    let mut prep = Preprocessor::from_meta(&model.meta.preprocess);
    let mut tensor = vec![0.0f32; prep.tensor_len()];
    let mut batch = BatchOutput::default();
    let mut failed = 0;
    for path in images {
        let line = match score_one(&mut model, &mut prep, &mut tensor, &mut batch, path) {
            Ok(s) => s,
            Err(e) => {
                failed += 1;
                ImageScore {
                    path: path.display().to_string(),
                    default: model.meta.default_score.as_str(),
                    raw: f64::NAN,
                    normalized: f64::NAN,
                    anomalous: false,
                    scores: Vec::new(),
                    error: Some(e),
                }
            }
        };
        if json {
            // NaN is not JSON: failed images carry `null` scores and an `error`.
            let v = serde_json::to_value(&line).map_err(std::io::Error::other)?;
            writeln!(out, "{v}")?;
        } else if let Some(e) = &line.error {
            writeln!(out, "{}\terror: {e}", line.path)?;
        } else {
            let kinds: Vec<String> = line
                .scores
                .iter()
                .map(|k| {
                    format!(
                        "{}={:.6} ({:.3}{})",
                        k.kind,
                        k.raw,
                        k.normalized,
                        if k.anomalous { " ANOMALOUS" } else { "" }
                    )
                })
                .collect();
            writeln!(
                out,
                "{}\t{}\traw={:.6}\tnormalized={:.3}\t{}",
                line.path,
                if line.anomalous { "ANOMALOUS" } else { "ok" },
                line.raw,
                line.normalized,
                kinds.join("  ")
            )?;
        }
    }
    Ok(failed)
}

fn score_one(
    model: &mut Model,
    prep: &mut Preprocessor,
    tensor: &mut [f32],
    batch: &mut BatchOutput,
    path: &std::path::Path,
) -> Result<ImageScore, String> {
    let img = image::open(path).map_err(|e| e.to_string())?;
    prep.run_image(&img, None, tensor).map_err(|e| e.to_string())?;
    model.run(tensor, 1, batch).map_err(|e| e.to_string())?;
    let mut scores = Vec::new();
    for kind in ScoreKind::ALL {
        let (Some(raw), Some(cal)) = (batch.score(kind, 0), model.calibration(kind)) else { continue };
        let raw = raw as f64;
        let normalized = cal.normalize(raw);
        scores.push(KindScore {
            kind: kind.as_str(),
            raw,
            normalized,
            threshold: cal.threshold,
            anomalous: raw >= cal.threshold,
        });
    }
    let default = model.meta.default_score.as_str();
    let head = scores.iter().find(|s| s.kind == default).cloned().ok_or("model has no default score output")?;
    Ok(ImageScore {
        path: path.display().to_string(),
        default,
        raw: head.raw,
        normalized: head.normalized,
        anomalous: head.anomalous,
        scores,
        error: None,
    })
}
