//! `train --tile SIZE[:STRIDE]`: training on tiles of full-resolution good
//! images, for cameras that score their ROI as a grid of tiles (the daemon's
//! `[cameras.<name>.tiles]`).
//!
//! Every image is cut with `ganomaly_core::tiles::grid` (the daemon's
//! function) into tiles of SIZE source pixels every STRIDE pixels (default:
//! SIZE, abutting), each resized to the model's input by the one
//! preprocessing function. The tiles are a **fixed grid**, the same every
//! epoch (the epoch's shuffle mixes the tiles of all images): the daemon
//! scores that grid, and a fixed set keeps a run reproducible from its seed.
//!
//! Images with labels (test/, val/) and the held-out good slice are cut the
//! same way and each image's score is the **maximum over its tiles**, as the
//! daemon scores a frame: the AUROC and the calibrated thresholds are those
//! of frames, not of tiles. The feature statistics (`mahalanobis`, `patch`)
//! are fitted on tiles, which is what the model sees. The tiling is written
//! into the model's metadata (`ganomaly.tiling`), so the daemon tiles a
//! camera the same way unless told otherwise.

use std::path::PathBuf;

use ganomaly_core::metadata::ScoreKind;
use ganomaly_core::preprocess::{Preprocessor, Roi};
use ganomaly_core::tiles::Tiling;
use tch::{Device, Tensor};

use crate::data::{split_holdout, DataError, DataFiles, LabelledSet, Splits, TestItem};
use crate::net::NetG;
use crate::score::{score_all, Scores};

/// Decodes `paths` and preprocesses every tile of each into one `[T, C, S, S]`
/// tensor (T = all tiles, image after image); returns it with each image's tile count.
pub fn load_tiled(
    paths: &[PathBuf],
    pre: &mut Preprocessor,
    tiling: Tiling,
) -> Result<(Tensor, Vec<usize>), DataError> {
    let len = pre.tensor_len();
    let mut buf: Vec<f32> = Vec::new();
    let mut groups = Vec::with_capacity(paths.len());
    for p in paths {
        let img = image::open(p).map_err(|source| DataError::Decode { path: p.clone(), source })?;
        let region = Roi { x: 0, y: 0, width: img.width(), height: img.height() };
        let grid = ganomaly_core::tiles::grid(region, tiling)
            .map_err(|e| DataError::Split(format!("--tile {}: {}: {e}", tiling.label(), p.display())))?;
        let start = buf.len();
        buf.resize(start + len * grid.len(), 0.0);
        for (tile, out) in grid.tiles.iter().zip(buf[start..].chunks_exact_mut(len)) {
            pre.run_image(&img, Some(*tile), out)
                .map_err(|source| DataError::Preprocess { path: p.clone(), source })?;
        }
        groups.push(grid.len());
    }
    let c = i64::from(pre.color().channels());
    let s = i64::from(pre.size());
    let n: usize = groups.iter().sum();
    Ok((Tensor::from_slice(&buf).reshape([n as i64, c, s, s]), groups))
}

/// Per-tile scores → per-image scores: the maximum over each image's
/// `groups[i]` consecutive tiles (NaN if any of them is NaN: a broken frame).
pub fn max_per_image(s: &Scores, groups: &[usize]) -> Scores {
    let reduce = |v: &[f64]| -> Vec<f64> {
        let mut out = Vec::with_capacity(groups.len());
        let mut at = 0;
        for &n in groups {
            let tiles = v.get(at..at + n).unwrap_or(&[]);
            let m = if tiles.iter().any(|x| x.is_nan()) {
                f64::NAN
            } else {
                tiles.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            };
            out.push(m);
            at += n;
        }
        out
    };
    let mut out = Scores::default();
    for kind in ScoreKind::ALL {
        if s.has(kind) {
            let v = reduce(s.get(kind));
            match kind {
                ScoreKind::Latent => out.latent = v,
                ScoreKind::Recon => out.recon = v,
                ScoreKind::MapMax => out.map_max = v,
                ScoreKind::Mahalanobis => out.mahalanobis = v,
                ScoreKind::Patch => out.patch = v,
                ScoreKind::Fused => out.fused = v,
            }
        }
    }
    out
}

/// Scores of the images of `x`: per row, or (tiled, `groups`) per image as the
/// maximum over its tiles.
pub fn score_images(g: &NetG, x: &Tensor, groups: Option<&[usize]>, kernel: u32, device: Device) -> Scores {
    let s = score_all(g, x, kernel, 64, device);
    match groups {
        Some(groups) => max_per_image(&s, groups),
        None => s,
    }
}

impl LabelledSet {
    /// Loads `items`, each cut into tiles.
    pub fn load_tiled(items: Vec<TestItem>, pre: &mut Preprocessor, tiling: Tiling) -> Result<LabelledSet, DataError> {
        let paths: Vec<PathBuf> = items.iter().map(|i| i.path.clone()).collect();
        let (x, groups) = load_tiled(&paths, pre, tiling)?;
        Ok(LabelledSet { items, x, groups: Some(groups) })
    }

    /// One score per item (the maximum over its tiles when tiled).
    pub fn scores(&self, g: &NetG, kernel: u32, device: Device) -> Scores {
        score_images(g, &self.x, self.groups.as_deref(), kernel, device)
    }
}

impl Splits {
    /// [`Splits::load`] with every image cut into tiles (`--tile`): `fit` and
    /// `hold` hold tiles, the held-out and labelled images score as the maximum
    /// over theirs. A `val/` split is not tiled-loaded: it is left out (with a warning).
    pub fn load_tiled(
        files: &DataFiles,
        holdout: f64,
        seed: u64,
        pre: &mut Preprocessor,
        tiling: Tiling,
    ) -> Result<Splits, DataError> {
        let (fit, hold) = split_holdout(&files.train, holdout, seed)?;
        let (fit, _) = load_tiled(&fit, pre, tiling)?;
        let (hold, hold_groups) = load_tiled(&hold, pre, tiling)?;
        let test =
            if files.test.is_empty() { None } else { Some(LabelledSet::load_tiled(files.test.clone(), pre, tiling)?) };
        if files.root.join("val").is_dir() {
            tracing::warn!("--tile: the val/ split is not used (tiled validation is not implemented)");
        }
        Ok(Splits {
            fit,
            hold,
            test: test.filter(LabelledSet::has_defects),
            val: None,
            hold_groups: Some(hold_groups),
            tiling: Some(tiling),
        })
    }

    /// One score per held-out good image (the maximum over its tiles when tiled).
    pub fn hold_scores(&self, g: &NetG, kernel: u32, device: Device) -> Scores {
        score_images(g, &self.hold, self.hold_groups.as_deref(), kernel, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ganomaly_core::metadata::ColorMode;

    #[test]
    fn images_score_as_their_hottest_tile() {
        let s = Scores {
            latent: vec![1.0, 5.0, 2.0, 0.5, 0.7],
            recon: vec![0.1, 0.2, 0.3, 0.4, f64::NAN],
            map_max: vec![0.0; 5],
            ..Default::default()
        };
        let m = max_per_image(&s, &[3, 2]);
        assert_eq!(m.latent, [5.0, 0.7]);
        assert_eq!(m.recon[0], 0.3);
        assert!(m.recon[1].is_nan(), "a broken tile breaks its image");
        assert_eq!(m.len(), 2);
        assert!(!m.has(ScoreKind::Mahalanobis));
    }

    #[test]
    fn every_image_is_cut_into_its_grid_of_tiles() {
        let dir = tempfile::tempdir().unwrap();
        // 40×24 gray: left 20 columns 0, right 20 columns 255.
        let img = image::GrayImage::from_fn(40, 24, |x, _| image::Luma([if x < 20 { 0 } else { 255 }]));
        let p = dir.path().join("a.png");
        img.save(&p).unwrap();
        let mut pre = Preprocessor::new(ColorMode::Gray, 4);
        // 20 px tiles at stride 20 → 2 × 2 (the second row flush with the bottom edge).
        let (x, groups) = load_tiled(&[p.clone(), p], &mut pre, Tiling::abutting(20)).unwrap();
        assert_eq!(groups, [4, 4]);
        assert_eq!(x.size(), [8, 1, 4, 4]);
        let v = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        // Tile 0 (top-left) dark, tile 1 (top-right) bright. The resize filter reads
        // a little past a tile's edge, as for any ROI (core's preprocessing), so the
        // column at the shared edge is pulled toward the neighbour; the far columns
        // are exact.
        assert!(v[..16].iter().all(|&a| a < -0.5), "{:?}", &v[..16]);
        assert!(v[16..32].iter().all(|&a| a > 0.5), "{:?}", &v[16..32]);
        assert!((0..4).all(|r| v[r * 4] == -1.0 && v[16 + r * 4 + 3] == 1.0));
    }
}
