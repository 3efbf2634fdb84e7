//! `export`: a checkpoint → ONNX model file, calibrated on the same held-out slice
//! as its training run (re-drawn with the checkpoint's seed).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ganomaly_core::metadata::{ColorMode, Provenance};
use ganomaly_core::preprocess::Preprocessor;

use super::flags::{CalibArgs, RunArgs};
use crate::checkpoint::load_checkpoint;
use crate::data::{self, Splits};
use crate::export::{finish, now_rfc3339, versions, write_onnx};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Checkpoint folder written by `train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The dataset it was trained on (the held-out slice is re-drawn with the checkpoint's seed).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub calib: CalibArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Writes the checkpoint's generator (its weight average when it has one: what
/// `train` exports too) as a calibrated model file.
pub fn run(a: &Args) -> Result<()> {
    let settings = a.calib.settings()?;
    let device = a.run.setup()?;
    let (model, state) = load_checkpoint(&a.checkpoint, device)?;
    let files = data::scan(&a.data, true)?;
    let digest = data::digest(&files.root, &files.train)?;
    if digest != state.data_digest {
        tracing::warn!(
            data = %a.data.display(),
            "not the data the checkpoint was trained on; the held-out slice may overlap training"
        );
    }
    let color = ColorMode::from_channels(state.arch.nc).context("nc")?;
    let mut pre = Preprocessor::new(color, state.arch.isize);
    // A run trained on tiles is calibrated (and its model served) on tiles.
    let tiling = state.exported.as_ref().and_then(|e| e.tiling);
    let splits = match tiling {
        None => Splits::load(&files, state.holdout, state.seed, &mut pre)?,
        Some(t) => Splits::load_tiled(&files, state.holdout, state.seed, &mut pre, t)?,
    };
    let provenance = Provenance {
        data_digest: state.data_digest.clone(),
        epochs: state.epoch,
        seed: state.seed,
        versions: versions(),
        created: now_rfc3339(),
        score_choice: None,
        notes: format!("ganomaly-train export of {}", a.checkpoint.display()),
    };
    let mut g = model.candidate().duplicate();
    if a.calib.patch_auto_asked() {
        bail!("--patch-maps auto is chosen by `train` on the validation split; give the depths (e.g. 2,3)");
    }
    g.patch_spec = match (&a.calib.patch_maps, &state.exported) {
        // What `train` exported with, unless the flags say otherwise.
        (None, Some(done)) => {
            tracing::info!(maps = ?done.patch.maps, statistic = done.patch.statistic.name(), "patch maps: the ones `train` exported with");
            a.calib.patch_spec_over(&state.arch, done.patch.clone())?
        }
        (None, None) => {
            tracing::info!("patch maps: the default 2,3 (this checkpoint does not say which maps `train` chose)");
            a.calib.patch_spec(&state.arch)?
        }
        (Some(_), _) => a.calib.patch_spec(&state.arch)?,
    };
    if let Some(done) = state.exported.as_ref().filter(|d| d.epoch != state.epoch) {
        tracing::warn!(
            train_exported = done.epoch,
            checkpoint = state.epoch,
            "`train` exported the generator of an earlier epoch (--select); a checkpoint keeps the last epoch's: \
             this model differs from train's"
        );
    }
    let g = &g.with_feature_stats(&splits.fit, &splits.hold, device)?;
    let finished = finish(g, &splits, &settings, provenance, device)?;
    let mut meta = finished
        .meta
        .context("the checkpoint's held-out slice is empty (trained with --holdout 0): nothing to calibrate on")?;
    meta.tiling = splits.tiling;
    write_onnx(&a.out, g, &meta)?;
    tracing::info!(path = %a.out.display(), "wrote the model");
    Ok(())
}
