//! Figures from scores: AUROC (defect = positive), best F1 and its threshold,
//! per-defect-type AUROC, behaviour at the calibrated threshold, histograms and ROC
//! points — for every score kind the graph exports. Arithmetic lives in
//! `ganomaly_core::calibrate` (one implementation for trainer and daemon).

use std::collections::BTreeMap;

use ganomaly_core::calibrate::{auroc, best_f1, roc_curve, score_stats};
use ganomaly_core::metadata::{ModelMetadata, ScoreKind, ScoreStats};
use serde::Serialize;

use crate::data::TestItem;
use crate::score::Scores;

/// Bins of the score histograms in reports.
pub const HIST_BINS: usize = 30;

/// A histogram of normal and defect scores over shared bins.
#[derive(Debug, Clone, Serialize)]
pub struct Histogram {
    /// `bins + 1` edges.
    pub edges: Vec<f64>,
    pub normal: Vec<u32>,
    pub defect: Vec<u32>,
}

impl Histogram {
    pub fn new(normal: &[f64], defect: &[f64], bins: usize) -> Histogram {
        let all = normal.iter().chain(defect).copied().filter(|v| v.is_finite());
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (lo.min(0.0), lo.max(0.0) + 1.0) };
        let width = (hi - lo) / bins as f64;
        let edges = (0..=bins).map(|i| lo + width * i as f64).collect();
        let count = |v: &[f64]| {
            let mut c = vec![0u32; bins];
            for &x in v.iter().filter(|x| x.is_finite()) {
                c[(((x - lo) / width) as usize).min(bins - 1)] += 1;
            }
            c
        };
        Histogram { edges, normal: count(normal), defect: count(defect) }
    }
}

/// Figures for one score kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindEval {
    pub kind: ScoreKind,
    /// Image AUROC, all defect types pooled against test/good.
    pub auroc: f64,
    /// Best F1 over thresholds (optimistic: the threshold is chosen on these images).
    pub f1: f64,
    /// The threshold of that best F1.
    pub threshold: f64,
    /// AUROC of each defect type against test/good.
    pub per_defect: BTreeMap<String, f64>,
    /// The model's calibrated threshold and what it does on this test set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibrated: Option<AtThreshold>,
    pub normal_stats: ScoreStats,
    pub defect_stats: ScoreStats,
    pub histogram: Histogram,
    /// ROC points (false-positive rate, true-positive rate).
    #[serde(skip)]
    pub roc: Vec<(f64, f64)>,
    #[serde(skip)]
    pub normal: Vec<f64>,
    #[serde(skip)]
    pub defect: Vec<f64>,
}

/// Behaviour at one fixed threshold.
#[derive(Debug, Clone, Serialize)]
pub struct AtThreshold {
    pub threshold: f64,
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
    pub false_alarm_rate: f64,
}

impl AtThreshold {
    pub fn new(normal: &[f64], defect: &[f64], threshold: f64) -> AtThreshold {
        let tp = defect.iter().filter(|&&s| s >= threshold).count() as f64;
        let fp = normal.iter().filter(|&&s| s >= threshold).count() as f64;
        let fnn = defect.len() as f64 - tp;
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        AtThreshold {
            threshold,
            f1: div(2.0 * tp, 2.0 * tp + fp + fnn),
            precision: div(tp, tp + fp),
            recall: div(tp, tp + fnn),
            false_alarm_rate: div(fp, normal.len() as f64),
        }
    }
}

/// Evaluates every kind of `scores` (aligned with `items`); kinds without scores
/// (`mahalanobis` of a generator without feature statistics) are left out. `thresholds` holds the
/// model's calibrated threshold per kind where one exists.
pub fn evaluate(
    items: &[TestItem],
    scores: &Scores,
    thresholds: &BTreeMap<ScoreKind, f64>,
) -> BTreeMap<ScoreKind, KindEval> {
    let mut out = BTreeMap::new();
    for kind in ScoreKind::ALL {
        let s = scores.get(kind);
        if s.len() != items.len() {
            continue;
        }
        let pick = |want: &dyn Fn(&TestItem) -> bool| -> Vec<f64> {
            items.iter().zip(s).filter(|(i, _)| want(i)).map(|(_, &v)| v).collect()
        };
        let normal = pick(&|i| i.defect.is_none());
        let defect = pick(&|i| i.defect.is_some());
        let mut per_defect = BTreeMap::new();
        for item in items {
            if let Some(d) = &item.defect {
                if !per_defect.contains_key(d) {
                    let these = pick(&|i| i.defect.as_deref() == Some(d.as_str()));
                    per_defect.insert(d.clone(), auroc(&normal, &these));
                }
            }
        }
        let (f1, threshold) = best_f1(&normal, &defect);
        out.insert(
            kind,
            KindEval {
                kind,
                auroc: auroc(&normal, &defect),
                f1,
                threshold,
                per_defect,
                calibrated: thresholds.get(&kind).map(|&t| AtThreshold::new(&normal, &defect, t)),
                normal_stats: score_stats(&normal),
                defect_stats: score_stats(&defect),
                histogram: Histogram::new(&normal, &defect, HIST_BINS),
                roc: roc_curve(&normal, &defect),
                normal,
                defect,
            },
        );
    }
    out
}

/// Calibrated thresholds of a model by kind.
pub fn thresholds(meta: &ModelMetadata) -> BTreeMap<ScoreKind, f64> {
    meta.scores.iter().map(|s| (s.kind, s.calibration.threshold)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn per_defect_and_threshold_figures() {
        let item = |d: Option<&str>| TestItem { path: PathBuf::new(), defect: d.map(String::from) };
        let items = vec![item(None), item(None), item(Some("a")), item(Some("b")), item(Some("b"))];
        let v = vec![0.1, 0.2, 0.15, 0.9, 0.8];
        let scores = Scores { latent: v.clone(), recon: v.clone(), map_max: v, ..Default::default() };
        let th = BTreeMap::from([(ScoreKind::Latent, 0.5)]);
        let e = evaluate(&items, &scores, &th);
        let l = &e[&ScoreKind::Latent];
        assert_eq!(l.per_defect["b"], 1.0);
        assert_eq!(l.per_defect["a"], 0.5);
        assert!((l.auroc - 5.0 / 6.0).abs() < 1e-12);
        let c = l.calibrated.as_ref().unwrap();
        assert_eq!((c.recall, c.false_alarm_rate, c.precision), (2.0 / 3.0, 0.0, 1.0));
        assert!(e[&ScoreKind::Recon].calibrated.is_none());
        assert!(!e.contains_key(&ScoreKind::Mahalanobis), "no scores, no entry");
        assert_eq!(l.histogram.normal.iter().sum::<u32>(), 2);
        assert_eq!(l.histogram.defect.iter().sum::<u32>(), 3);
    }
}
