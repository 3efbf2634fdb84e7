//! Measurement only, for the quality benchmark: pixel localisation of a
//! generator's anomaly maps on test/ where MVTec-style masks exist
//! (`DIR/ground_truth/<defect>/<name>_mask.png`), and (`train --candidates`) the
//! test figures of other `patch` configurations and `fused` recipes on the very
//! same generator, so that one training run compares them all. Nothing here
//! chooses what is exported.

use std::collections::BTreeMap;
use std::path::Path;

use ganomaly_core::calibrate::auroc;
use ganomaly_core::metadata::{Combine, FusionSpec, ScoreKind};
use ganomaly_core::patch::PATCH_DIM_DEFAULT;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::{LabelledSet, TestItem};
use crate::evaluate::evaluate;
use crate::net::{NetError, NetG};
use crate::score::{outputs, score_all, Scores};

/// Pixel AUROC of each map over every test image (good images: no defect pixel).
#[derive(Debug, Clone, Serialize)]
pub struct Localisation {
    pub images: usize,
    pub defect_pixels: usize,
    /// Reconstruction map `anomaly_map` (mean |x − x̂| over channels).
    pub anomaly_map: f64,
    /// The `patch` score's feature map, when the generator has patch statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_map: Option<f64>,
    /// The same figures per defect type (its images and the good ones).
    pub per_defect: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Test figures of one candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub auroc: f64,
    pub per_defect: BTreeMap<String, f64>,
    /// Pixel AUROC of its map (patch candidates, where masks exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pixel_auroc: Option<f64>,
}

/// Defect masks of `test` at `side`×`side` (true = defect), image by image;
/// `None` unless every defective image has its mask.
pub fn masks(root: &Path, items: &[TestItem], side: u32) -> Option<Vec<Vec<bool>>> {
    let px = (side * side) as usize;
    items
        .iter()
        .map(|it| match &it.defect {
            None => Some(vec![false; px]),
            Some(d) => {
                let stem = it.path.file_stem()?.to_string_lossy().into_owned();
                let p = root.join("ground_truth").join(d).join(format!("{stem}_mask.png"));
                let img = image::open(&p).ok()?.to_luma8();
                let img = image::imageops::resize(&img, side, side, image::imageops::FilterType::Triangle);
                Some(img.pixels().map(|p| p.0[0] > 127).collect())
            }
        })
        .collect()
}

/// Every image's map `[N, 1, S, S]` flattened per image.
fn per_image(t: &Tensor) -> Vec<Vec<f32>> {
    let n = t.size()[0];
    (0..n).map(|i| Vec::<f32>::try_from(t.get(i).flatten(0, -1).to_kind(Kind::Float)).unwrap_or_default()).collect()
}

/// Pixel AUROC of `maps` against `masks` over the images `keep` selects.
fn pixel_auroc(maps: &[Vec<f32>], masks: &[Vec<bool>], keep: impl Fn(usize) -> bool) -> f64 {
    let (mut normal, mut defect) = (Vec::new(), Vec::new());
    for (_, (m, k)) in maps.iter().zip(masks).enumerate().filter(|(i, _)| keep(*i)) {
        for (&v, &d) in m.iter().zip(k) {
            if d {
                defect.push(f64::from(v));
            } else {
                normal.push(f64::from(v));
            }
        }
    }
    auroc(&normal, &defect)
}

/// The generator's maps on `test`, in batches: (anomaly_map, patch_map) per image.
fn maps_of(g: &NetG, test: &LabelledSet, kernel: u32, device: Device) -> (Vec<Vec<f32>>, Option<Vec<Vec<f32>>>) {
    let n = test.x.size()[0];
    let (mut recon, mut patch) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        let len = 64.min(n - start);
        let o = outputs(g, &test.x.narrow(0, start, len).to_device(device), kernel);
        recon.extend(per_image(&o.anomaly_map.to_device(Device::Cpu)));
        if let Some(m) = &o.patch_map {
            patch.extend(per_image(&m.to_device(Device::Cpu)));
        }
        start += len;
    }
    let has_patch = patch.len() == recon.len();
    (recon, has_patch.then_some(patch))
}

/// Pixel AUROC of `g`'s maps on `test` (masks from `root`), or `None` without masks.
pub fn localisation(g: &NetG, root: &Path, test: &LabelledSet, kernel: u32, device: Device) -> Option<Localisation> {
    let masks = masks(root, &test.items, g.arch.isize)?;
    let defect_pixels = masks.iter().flatten().filter(|&&d| d).count();
    if defect_pixels == 0 {
        return None;
    }
    let (recon, patch) = maps_of(g, test, kernel, device);
    let mut per_defect = BTreeMap::new();
    let kinds: std::collections::BTreeSet<&String> = test.items.iter().filter_map(|i| i.defect.as_ref()).collect();
    for d in kinds {
        let keep = |i: usize| test.items[i].defect.as_ref().is_none_or(|x| x == d);
        let mut m = BTreeMap::from([("anomaly_map".to_string(), pixel_auroc(&recon, &masks, keep))]);
        if let Some(p) = &patch {
            m.insert("patch_map".to_string(), pixel_auroc(p, &masks, keep));
        }
        per_defect.insert(d.clone(), m);
    }
    Some(Localisation {
        images: test.items.len(),
        defect_pixels,
        anomaly_map: pixel_auroc(&recon, &masks, |_| true),
        patch_map: patch.as_ref().map(|p| pixel_auroc(p, &masks, |_| true)),
        per_defect,
    })
}

/// The fusion recipes `--candidates` measures.
fn fusion_candidates() -> Vec<(Combine, Vec<ScoreKind>)> {
    use ScoreKind::*;
    let sets = [
        vec![Latent, Mahalanobis, Patch],
        vec![Mahalanobis, Patch],
        vec![Latent, Patch],
        vec![Latent, Recon, MapMax, Mahalanobis, Patch],
    ];
    let mut v = Vec::new();
    for c in [Combine::Mean, Combine::Max] {
        for s in &sets {
            v.push((c, s.clone()));
        }
    }
    v
}

fn fit_recipe(hold: &Scores, combine: Combine, components: &[ScoreKind]) -> Option<FusionSpec> {
    let (mut mean, mut std) = (Vec::new(), Vec::new());
    for &k in components {
        let v = hold.get(k);
        if v.len() < 2 {
            return None;
        }
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let s = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
        if !(s > 0.0 && s.is_finite()) {
            return None;
        }
        mean.push(m);
        std.push(s);
    }
    Some(FusionSpec { components: components.to_vec(), combine, mean, std })
}

fn fused_scores(f: &FusionSpec, s: &Scores) -> Vec<f64> {
    (0..s.len()).map(|i| f.fuse(&f.components.iter().map(|&k| s.get(k)[i]).collect::<Vec<_>>())).collect()
}

fn candidate(items: &[TestItem], values: Vec<f64>) -> Candidate {
    let scores = Scores { latent: values, ..Default::default() };
    let e = evaluate(items, &scores, &BTreeMap::new());
    let e = e.get(&ScoreKind::Latent);
    Candidate {
        auroc: e.map_or(f64::NAN, |e| e.auroc),
        per_defect: e.map(|e| e.per_defect.clone()).unwrap_or_default(),
        pixel_auroc: None,
    }
}

/// Test figures of every candidate on generator `g` (its statistics fitted):
/// `patch:<depths>` (fitted on `x_fit`) and `fused:<combine>:<components>`
/// (standardised on `x_hold`).
pub fn measure(
    g: &NetG,
    root: &Path,
    x_fit: &Tensor,
    x_hold: &Tensor,
    test: &LabelledSet,
    kernel: u32,
    device: Device,
) -> Result<BTreeMap<String, Candidate>, NetError> {
    let mut out = BTreeMap::new();
    let masks = masks(root, &test.items, g.arch.isize);
    let test_scores = score_all(g, &test.x, kernel, 64, device);
    let hold_scores = score_all(g, x_hold, kernel, 64, device);
    for maps in crate::patch_choice::depth_runs(g) {
        let Ok(spec) = g.arch.patch_spec(&maps, PATCH_DIM_DEFAULT, 0) else { continue };
        let mut c = g.duplicate();
        c.patch_spec = spec;
        c.patch_stats = Some(c.fit_patch_stats(x_fit, 256, device)?);
        c.fusion = None;
        let s = score_all(&c, &test.x, kernel, 64, device);
        let mut cand = candidate(&test.items, s.patch.clone());
        if let Some(m) = &masks {
            if let (_, Some(p)) = maps_of(&c, test, kernel, device) {
                cand.pixel_auroc = Some(pixel_auroc(&p, m, |_| true));
            }
        }
        let name = maps.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        out.insert(format!("patch:{name}"), cand);
    }
    for (combine, comps) in fusion_candidates() {
        let Some(f) = fit_recipe(&hold_scores, combine, &comps) else { continue };
        if comps.iter().any(|&k| !test_scores.has(k)) {
            continue;
        }
        let name = comps.iter().map(|k| k.as_str()).collect::<Vec<_>>().join("+");
        let combine = match combine {
            Combine::Max => "max",
            Combine::Mean => "mean",
        };
        out.insert(format!("fused:{combine}:{name}"), candidate(&test.items, fused_scores(&f, &test_scores)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_auroc_counts_every_pixel_of_the_kept_images() {
        // Image 0: good, map low; image 1: defect at pixel 1, map high there.
        let maps = vec![vec![0.1f32, 0.2, 0.1, 0.0], vec![0.0, 0.9, 0.3, 0.2]];
        let masks = vec![vec![false; 4], vec![false, true, false, false]];
        assert_eq!(pixel_auroc(&maps, &masks, |_| true), 1.0);
        // A map that peaks beside the defect: the defect pixel (0.15) ranks above 4 of
        // the 7 good pixels (0.1, 0.1, 0.0, 0.0) and below 0.2, 0.9, 0.3.
        let maps = vec![vec![0.1f32, 0.2, 0.1, 0.0], vec![0.0, 0.15, 0.9, 0.3]];
        let a = pixel_auroc(&maps, &masks, |_| true);
        assert!((a - 4.0 / 7.0).abs() < 1e-12, "{a}");
        assert!(pixel_auroc(&maps, &masks, |i| i == 0).is_nan(), "no defect pixel, no AUROC");
    }

    #[test]
    fn masks_follow_mvtec_names_and_need_every_defect() {
        let dir = std::env::temp_dir().join(format!("ganomaly-masks-{}", std::process::id()));
        let gt = dir.join("ground_truth/scratch");
        std::fs::create_dir_all(&gt).unwrap();
        let mut m = image::GrayImage::new(8, 8);
        for x in 0..4 {
            m.put_pixel(x, 0, image::Luma([255]));
            m.put_pixel(x, 1, image::Luma([255]));
        }
        m.save(gt.join("007_mask.png")).unwrap();
        let items = vec![
            TestItem { path: dir.join("test/good/001.png"), defect: None },
            TestItem { path: dir.join("test/scratch/007.png"), defect: Some("scratch".into()) },
        ];
        let got = masks(&dir, &items, 4).unwrap();
        assert_eq!(got[0], vec![false; 16]);
        assert_eq!(got[1][..4], [true, true, false, false], "8 px → 4 px: two rows of four become half a row");
        assert!(got[1][4..].iter().all(|&d| !d));
        let missing = vec![TestItem { path: dir.join("test/scratch/008.png"), defect: Some("scratch".into()) }];
        assert!(masks(&dir, &missing, 4).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
