//! `--patch-maps auto`: which of encoder1's feature maps the `patch` score reads,
//! and with which statistic, chosen per data set on the validation split
//! `DIR/val/` (never test/). Each candidate (a run of consecutive depths among the
//! first three maps, with the per-position Gaussian or, unless `--patch-bank 0`,
//! the nearest-neighbour bank) is fitted on the training images, as the exported
//! one is, and scored on `val/`'s defects against its good images and the held-out
//! good slice. The fixed default (depths
//! 2,3) is kept unless a candidate's validation AUROC beats it by more than one
//! standard error of the default's (the guard `--select val-auroc` uses): the best
//! of up to twelve candidates is partly noise.

use ganomaly_core::calibrate::auroc;
use ganomaly_core::patch::{PatchSpec, PatchStatistic};
use serde::Serialize;
use tch::{Device, Tensor};

use crate::data::LabelledSet;
use crate::net::{NetError, NetG};
use crate::score::score_all;
use crate::score_choice::auroc_se;

/// Every run of consecutive depths among the first three maps of `g` (or as many
/// as the net has): `[1], [1,2], [1,2,3], [2], [2,3], [3]`.
pub fn depth_runs(g: &NetG) -> Vec<Vec<u32>> {
    let n = (g.arch.encoder1_maps().len() as u32).min(3);
    let mut v = Vec::new();
    for a in 1..=n {
        for b in a..=n {
            v.push((a..=b).collect());
        }
    }
    v
}

/// One candidate's validation figure.
#[derive(Debug, Clone, Serialize)]
pub struct PatchCandidate {
    pub maps: Vec<u32>,
    /// `gaussian` or `nearest`.
    pub statistic: &'static str,
    pub val_auroc: f64,
}

/// The choice and its evidence (report.json `patch_choice`, the model's provenance).
#[derive(Debug, Clone, Serialize)]
pub struct PatchChoice {
    /// The depths chosen.
    pub maps: Vec<u32>,
    /// The statistic chosen (`gaussian`, `nearest`).
    pub statistic: &'static str,
    /// The default's depths and statistic, validation AUROC and its standard error.
    pub default_maps: Vec<u32>,
    pub default_statistic: &'static str,
    pub default_auroc: f64,
    pub default_se: f64,
    pub candidates: Vec<PatchCandidate>,
    #[serde(skip)]
    pub spec: PatchSpec,
}

impl PatchChoice {
    /// One line for the log and the provenance notes.
    pub fn summary(&self) -> String {
        let depths = |m: &[u32]| m.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        let best = self
            .candidates
            .iter()
            .find(|c| c.maps == self.maps && c.statistic == self.statistic)
            .map_or(f64::NAN, |c| c.val_auroc);
        if self.statistic == self.default_statistic && self.maps == self.default_maps {
            format!(
                "patch maps {} ({}, default kept: val AUROC {:.4}, no candidate ahead by more than one standard error {:.4})",
                depths(&self.maps),
                self.statistic,
                self.default_auroc,
                self.default_se
            )
        } else {
            format!(
                "patch maps {} ({}) chosen on val/ (AUROC {best:.4} against the default {} ({})'s {:.4} ± {:.4})",
                depths(&self.maps),
                self.statistic,
                depths(&self.default_maps),
                self.default_statistic,
                self.default_auroc,
                self.default_se
            )
        }
    }
}

/// The rule on the candidates' validation AUROCs: the default unless some candidate
/// leads it by more than `se`; then the highest. Returns the index into `aurocs`.
pub fn rule(aurocs: &[f64], default: usize, se: f64) -> usize {
    let base = aurocs[default];
    let best = (0..aurocs.len())
        .filter(|&i| aurocs[i].is_finite())
        .max_by(|&a, &b| aurocs[a].total_cmp(&aurocs[b]).then(b.cmp(&a)));
    match best {
        Some(b) if !base.is_finite() || aurocs[b] - base > se => b,
        _ => default,
    }
}

/// Fits and scores every candidate of `g` (trained, any statistics) with `dim`
/// channels each, each depth run also with a nearest-neighbour bank of `bank`
/// entries unless `bank` is 0; `default` is the spec the run would otherwise export.
#[allow(clippy::too_many_arguments)]
pub fn choose(
    g: &NetG,
    default: &PatchSpec,
    dim: u32,
    bank: u32,
    x_fit: &Tensor,
    x_hold: &Tensor,
    val: &LabelledSet,
    device: Device,
) -> Result<PatchChoice, NetError> {
    let mut specs = Vec::new();
    for maps in depth_runs(g) {
        let gaussian = if maps == default.maps && default.statistic.is_gaussian() {
            Some(default.clone())
        } else {
            g.arch.patch_spec(&maps, dim, 0).ok()
        };
        if let Some(s) = gaussian {
            if bank > 0 {
                let near = PatchSpec { statistic: PatchStatistic::Nearest { bank }, ..s.clone() };
                specs.push(s);
                if g.arch.check_patch(&near).is_ok() {
                    specs.push(near);
                }
            } else {
                specs.push(s);
            }
        }
    }
    if !specs.contains(default) {
        specs.push(default.clone());
    }
    let n_def = val.items.iter().filter(|i| i.defect.is_some()).count();
    let n_good = val.items.len() - n_def + x_hold.size()[0] as usize;
    let mut aurocs = Vec::new();
    let mut fitted = Vec::new();
    for spec in &specs {
        let mut c = g.duplicate();
        c.patch_spec = spec.clone();
        let stats = c.fit_patch_stats(x_fit, 256, device)?;
        // A bank may hold fewer entries than asked for: the spec the fit recorded.
        fitted.push(stats.spec.clone());
        c.patch_stats = Some(stats);
        c.fusion = None;
        // The kernel only shapes `map_max`, which is not read here.
        let hold = score_all(&c, x_hold, 1, 64, device).patch;
        let vs = score_all(&c, &val.x, 1, 64, device).patch;
        let mut normal = hold;
        let mut defect = Vec::new();
        for (item, v) in val.items.iter().zip(vs) {
            if item.defect.is_some() {
                defect.push(v);
            } else {
                normal.push(v);
            }
        }
        aurocs.push(auroc(&normal, &defect));
    }
    let d = specs.iter().position(|s| s == default).unwrap_or(0);
    let se = auroc_se(aurocs[d], n_def, n_good);
    let pick = rule(&aurocs, d, se);
    Ok(PatchChoice {
        maps: specs[pick].maps.clone(),
        statistic: specs[pick].statistic.name(),
        default_maps: default.maps.clone(),
        default_statistic: default.statistic.name(),
        default_auroc: aurocs[d],
        default_se: se,
        candidates: specs
            .iter()
            .zip(&aurocs)
            .map(|(s, &a)| PatchCandidate { maps: s.maps.clone(), statistic: s.statistic.name(), val_auroc: a })
            .collect(),
        spec: fitted[pick].clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::TestItem;
    use crate::fixtures::{data, tiny};

    #[test]
    fn the_default_stays_unless_beaten_by_more_than_the_error() {
        assert_eq!(rule(&[0.80, 0.70, 0.82], 1, 0.03), 2, "both lead 0.70 by more than 0.03: the highest");
        assert_eq!(rule(&[0.72, 0.70, 0.71], 1, 0.03), 1, "0.02 is within the error");
        assert_eq!(rule(&[0.90, 0.70, 0.90], 1, 0.03), 0, "ties: the first (finest) of the best");
        assert_eq!(rule(&[f64::NAN, 0.70, 0.75], 1, 0.03), 2, "NaN never wins");
        assert_eq!(rule(&[0.6, f64::NAN], 1, f64::INFINITY), 0, "an undefined default gives way");
    }

    #[test]
    fn choose_scores_every_candidate_on_val_and_returns_a_usable_spec() {
        let g = NetG::new(&tiny(), Device::Cpu);
        let x = data(24);
        let val = LabelledSet {
            items: (0..8)
                .map(|i| TestItem { path: format!("v{i}").into(), defect: (i % 2 == 1).then(|| "d".into()) })
                .collect(),
            x: data(8) * 1.5,
            groups: None,
        };
        let default = g.arch.default_patch();
        let c = choose(&g, &default, 8, 0, &x.narrow(0, 0, 16), &x.narrow(0, 16, 8), &val, Device::Cpu).unwrap();
        assert_eq!(c.candidates.len(), depth_runs(&g).len());
        assert!(c.candidates.iter().all(|k| k.statistic == "gaussian"), "--patch-bank 0: Gaussians only");
        assert!(c.candidates.iter().any(|k| k.maps == default.maps));
        // With a bank, every depth run is a candidate twice, and a chosen bank scores like any spec.
        let n = choose(&g, &default, 8, 32, &x.narrow(0, 0, 16), &x.narrow(0, 16, 8), &val, Device::Cpu).unwrap();
        assert_eq!(n.candidates.len(), 2 * depth_runs(&g).len());
        assert_eq!(n.candidates.iter().filter(|k| k.statistic == "nearest").count(), depth_runs(&g).len());
        assert_eq!(n.statistic, n.spec.statistic.name());
        let mut h = g.duplicate();
        h.patch_spec = n.spec.clone();
        h.fit_score_stats(&x.narrow(0, 0, 16), &x.narrow(0, 16, 8), Device::Cpu).unwrap();
        assert!(score_all(&h, &val.x, 1, 64, Device::Cpu).patch.iter().all(|v| v.is_finite()));
        assert!(c.candidates.iter().all(|k| (0.0..=1.0).contains(&k.val_auroc)), "{:?}", c.candidates);
        assert_eq!(c.spec.maps, c.maps);
        assert!(c.summary().contains("patch maps"));
        // The chosen spec fits and scores like any other.
        let mut h = g.duplicate();
        h.patch_spec = c.spec.clone();
        h.fit_score_stats(&x.narrow(0, 0, 16), &x.narrow(0, 16, 8), Device::Cpu).unwrap();
        assert!(score_all(&h, &val.x, 1, 64, Device::Cpu).patch.iter().all(|v| v.is_finite()));
    }
}
