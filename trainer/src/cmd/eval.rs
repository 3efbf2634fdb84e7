//! `eval`: scores `DIR/test` with an exported model file, through the model's own
//! preprocessing and map kernel, and reports every score's figures.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ganomaly_core::preprocess::Preprocessor;

use super::flags::RunArgs;
use crate::data::{self, LabelledSet};
use crate::evaluate::{evaluate, thresholds};
use crate::net::NetG;
use crate::report::{self, EvalSummary};
use crate::score::score_all;

// These doc comments are the CLI's help, which writes placeholders as <defect>;
// rustdoc would read those as HTML tags.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    /// MVTec-style folder with test/good and test/<defect>.
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write plots and report.json into this folder.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Scores test/ with the model: every score's figures, plots and JSON in `--report`.
pub fn run(a: &Args) -> Result<EvalSummary> {
    let device = a.run.setup()?;
    let bytes = ganomaly_core::onnx::check::read_file(&a.model).context("cannot read the model")?;
    let (meta, weights) = ganomaly_core::onnx::read_model(&bytes)
        .with_context(|| format!("model {} is not usable", a.model.display()))?;
    let mut g = NetG::new(&meta.arch, device);
    g.load_weights(&weights).with_context(|| format!("weights of {}", a.model.display()))?;
    g.load_score_stats(&meta, &weights).with_context(|| format!("score statistics of {}", a.model.display()))?;
    let files = data::scan(&a.data, false)?;
    if files.defect_types().is_empty() {
        bail!("{} has no test/<defect> folders: AUROC needs defect images", a.data.display());
    }
    let mut pre = Preprocessor::from_meta(&meta.preprocess);
    // A model trained on tiles is evaluated on the same tiles, each image as its hottest tile.
    let test = match meta.tiling {
        None => LabelledSet::load(files.test, &mut pre)?,
        Some(t) => LabelledSet::load_tiled(files.test, &mut pre, t)?,
    };
    let kernel = meta.map_kernel().unwrap_or(7);
    let scores = score_all(&g, &test.x, kernel, a.batch.max(1) as i64, device);
    let scores = match &test.groups {
        Some(groups) => crate::tiles::max_per_image(&scores, groups),
        None => scores,
    };
    let evals = evaluate(&test.items, &scores, &thresholds(&meta));
    let summary = EvalSummary::new(Some(&a.model), &a.data, meta.default_score, evals).with_calibrations(&meta);
    if let Some(dir) = &a.report {
        report::write_plots(dir, None, Some(&summary.scores))?;
        report::write_json(&dir.join("report.json"), &summary)?;
    }
    Ok(summary)
}

/// The command's output on stdout: one JSON object with `--json`, else the table.
pub fn print(summary: &EvalSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
    } else {
        summary.print_table();
    }
    Ok(())
}
