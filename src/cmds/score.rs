//! `ganomalyd score --model MODEL.onnx [--json] IMAGE...`: scores image files
//! offline through the daemon's own preprocessing and session code, so a
//! quality engineer sees exactly what the daemon would decide for them.
//!
//! One line (or JSON object) per image with every score the model exports:
//! raw, normalized (calibrated threshold at 0.5) and anomalous yes/no; the
//! model's default score decides the headline verdict.
//!
//! A model trained on tiles (`ganomaly-train train --tile`) scores each image
//! as the daemon scores a camera's frame with it: the model-sized tiles of the
//! whole image, each score the maximum over the tiles (the line names the
//! tile count and the default score's hottest tile).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use ganomaly_core::preprocess::{image_frame, Preprocessor};
use ganomaly_core::tiles::{Grid, Tiling};
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
    /// A tiled model: the tiles the image was scored as, and the one with
    /// the default score's maximum (index in row-major order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiles: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hottest_tile: Option<usize>,
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
    let mut run = Scorer {
        prep: Preprocessor::from_meta(&model.meta.preprocess),
        tensor: Vec::new(),
        batch: BatchOutput::default(),
        tiling: model.meta.tiling,
        grid: None,
        chunk: infer.max_batch.max(1),
    };
    let mut failed = 0;
    for path in images {
        let line = match run.score_one(&mut model, path) {
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
                    tiles: None,
                    hottest_tile: None,
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
            let tiles = match (line.tiles, line.hottest_tile) {
                (Some(n), Some(t)) => format!("\ttiles={n} hottest={t}"),
                _ => String::new(),
            };
            writeln!(
                out,
                "{}\t{}\traw={:.6}\tnormalized={:.3}\t{}{tiles}",
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

/// What scoring one image after another reuses.
struct Scorer {
    prep: Preprocessor,
    tensor: Vec<f32>,
    batch: BatchOutput,
    /// The model's tiling, when it was trained on tiles.
    tiling: Option<Tiling>,
    /// The last image's grid (images of one folder are mostly one size).
    grid: Option<Arc<Grid>>,
    /// Tiles per session run, as the daemon's `max_batch`.
    chunk: usize,
}

impl Scorer {
    fn score_one(&mut self, model: &mut Model, path: &std::path::Path) -> Result<ImageScore, String> {
        let img = image::open(path).map_err(|e| e.to_string())?;
        // Per image: one input, or its tiles.
        let tiles = match self.tiling {
            None => {
                self.tensor.resize(self.prep.tensor_len(), 0.0);
                self.prep.run_image(&img, None, &mut self.tensor).map_err(|e| e.to_string())?;
                model.run(&self.tensor, 1, &mut self.batch).map_err(|e| e.to_string())?;
                None
            }
            Some(tiling) => {
                // As check-config refuses such a camera: a tile is never stretched.
                if tiling.size > img.width() || tiling.size > img.height() {
                    return Err(format!(
                        "the model is tiled {} and this {}x{} image is smaller than one tile",
                        tiling.label(),
                        img.width(),
                        img.height()
                    ));
                }
                let grid = image_frame(&img, |frame| {
                    crate::tiles::prepare(&mut self.prep, frame, None, tiling, &mut self.grid, &mut self.tensor)
                })
                .map_err(|e| e.to_string())?;
                model.run_chunked(&self.tensor, grid.len(), self.chunk, &mut self.batch).map_err(|e| e.to_string())?;
                Some(grid.len())
            }
        };
        let default = model.meta.default_score;
        let mut scores = Vec::new();
        let mut hottest_tile = None;
        for kind in ScoreKind::ALL {
            let Some(cal) = model.calibration(kind) else { continue };
            let (raw, tile) = match tiles {
                None => (self.batch.score(kind, 0), None),
                Some(n) => match crate::tiles::frame_score(&self.batch, kind, 0, n) {
                    Some((raw, tile)) => (Some(raw), Some(tile)),
                    None => (None, None),
                },
            };
            let Some(raw) = raw else { continue };
            let raw = raw as f64;
            if kind == default {
                hottest_tile = tile;
            }
            scores.push(KindScore {
                kind: kind.as_str(),
                raw,
                normalized: cal.normalize(raw),
                threshold: cal.threshold,
                anomalous: raw >= cal.threshold,
            });
        }
        let default = default.as_str();
        let head = scores.iter().find(|s| s.kind == default).cloned().ok_or("model has no default score output")?;
        Ok(ImageScore {
            path: path.display().to_string(),
            default,
            raw: head.raw,
            normalized: head.normalized,
            anomalous: head.anomalous,
            scores,
            tiles,
            hottest_tile,
            error: None,
        })
    }
}
