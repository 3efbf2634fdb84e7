//! `datagen`: the project's synthetic MVTec-style dataset, written by core's
//! generator (`ganomaly_core::synth`), for tests, demos and the quality benchmark.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ganomaly_core::synth::{self, DatasetSpec, Defect, Texture};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    /// brushed_metal, woven_fabric, wood_grain or noise.
    #[arg(long, default_value = "brushed_metal")]
    pub texture: String,
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 400)]
    pub train_good: usize,
    #[arg(long, default_value_t = 50)]
    pub test_good: usize,
    #[arg(long, default_value_t = 25)]
    pub test_per_defect: usize,
    /// Comma-separated defect kinds (scratch, crack, stain, hole).
    #[arg(long, value_delimiter = ',', default_value = "scratch,crack,stain,hole")]
    pub defects: Vec<String>,
    /// Defect strength in [0, 1] (1 = obvious).
    #[arg(long, default_value_t = 1.0)]
    pub strength: f32,
    /// Defect size against the image side, in (0, 1]: 1 = the usual defects; 0.05 on
    /// 512 px images draws defects a few pixels across (the tiling benchmark).
    #[arg(long, default_value_t = 1.0)]
    pub defect_scale: f32,
}

/// `datagen`: core's synthetic dataset writer.
pub fn run(a: &Args) -> Result<synth::DatasetSummary> {
    let texture = Texture::parse(&a.texture).with_context(|| {
        let names: Vec<&str> = Texture::ALL.iter().map(|t| t.as_str()).collect();
        format!("unknown --texture `{}` (one of {})", a.texture, names.join(", "))
    })?;
    let defects = a
        .defects
        .iter()
        .filter(|d| !d.is_empty())
        .map(|d| {
            Defect::parse(d).with_context(|| {
                let names: Vec<&str> = Defect::ALL.iter().map(|t| t.as_str()).collect();
                format!("unknown defect `{d}` (one of {})", names.join(", "))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = DatasetSpec {
        texture,
        size: a.size,
        seed: a.seed,
        train_good: a.train_good,
        test_good: a.test_good,
        test_per_defect: a.test_per_defect,
        defects,
        strength: a.strength,
        defect_scale: a.defect_scale,
    };
    let summary = synth::write_mvtec(&a.out, &spec)?;
    tracing::info!(
        out = %a.out.display(),
        train_good = summary.train_good,
        test_good = summary.test_good,
        test_defective = summary.test_defective,
        "wrote the dataset"
    );
    Ok(summary)
}
