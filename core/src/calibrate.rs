//! Turning raw scores into decisions: thresholds from validation scores,
//! score statistics, and the metrics (AUROC, best F1) that judge a model.
//!
//! Convention everywhere: higher score = more anomalous; a frame is anomalous
//! when `score >= threshold`; defects are the positive class.

use crate::metadata::{Calibration, CalibrationMethod, ScoreStats};

/// Linear-interpolated quantile of an ascending-sorted slice (`q` in [0, 1]),
/// as numpy's default. NaN for an empty slice.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

fn sorted_finite(scores: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Summary statistics of a set of scores (non-finite values are ignored).
pub fn score_stats(scores: &[f64]) -> ScoreStats {
    let v = sorted_finite(scores);
    let n = v.len();
    let mean = if n > 0 { v.iter().sum::<f64>() / n as f64 } else { f64::NAN };
    let var = if n > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
    ScoreStats {
        n,
        mean,
        std: var.sqrt(),
        min: v.first().copied().unwrap_or(f64::NAN),
        p50: quantile_sorted(&v, 0.5),
        p95: quantile_sorted(&v, 0.95),
        p99: quantile_sorted(&v, 0.99),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// Threshold at the `1 − target_far` quantile of normal validation scores: on data
/// like the validation set, about `target_far` of good frames score at or above it.
/// Normalisation range: the normal scores' min to max.
pub fn quantile_calibration(normal: &[f64], target_far: f64) -> Calibration {
    let v = sorted_finite(normal);
    let threshold = quantile_sorted(&v, 1.0 - target_far);
    let stats = score_stats(&v);
    Calibration {
        threshold,
        min: stats.min,
        max: stats.max.max(threshold),
        method: CalibrationMethod::NormalQuantile,
        target_false_alarm_rate: Some(target_far),
        normal_stats: Some(stats),
        val_auroc: None,
        val_f1: None,
    }
}

/// The F1-optimal threshold on a validation set with defects; normalisation over
/// all validation scores.
pub fn f1_calibration(normal: &[f64], defect: &[f64]) -> Calibration {
    let (f1, threshold) = best_f1(normal, defect);
    let all = sorted_finite(&[normal, defect].concat());
    Calibration {
        threshold,
        min: all.first().copied().unwrap_or(0.0),
        max: all.last().copied().unwrap_or(1.0),
        method: CalibrationMethod::F1Optimal,
        target_false_alarm_rate: None,
        normal_stats: Some(score_stats(normal)),
        val_auroc: Some(auroc(normal, defect)),
        val_f1: Some(f1),
    }
}

/// Area under the ROC curve with defects as positives (Mann–Whitney U; ties
/// count one half). 0.5 = chance. NaN if either set is empty.
pub fn auroc(normal: &[f64], defect: &[f64]) -> f64 {
    if normal.is_empty() || defect.is_empty() {
        return f64::NAN;
    }
    // Rank all scores together (average ranks for ties), sum the defect ranks.
    let mut all: Vec<(f64, bool)> =
        normal.iter().map(|&s| (s, false)).chain(defect.iter().map(|&s| (s, true))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += all[i..=j].iter().filter(|x| x.1).count() as f64 * avg_rank;
        i = j + 1;
    }
    let (n_pos, n_neg) = (defect.len() as f64, normal.len() as f64);
    (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
}

/// Lowers a threshold from the highest score down, one group of equal scores at
/// a time: `(threshold, true positives, false positives)` at `score >= threshold`.
fn sweep(normal: &[f64], defect: &[f64]) -> Vec<(f64, f64, f64)> {
    let mut all: Vec<(f64, bool)> =
        normal.iter().map(|&s| (s, false)).chain(defect.iter().map(|&s| (s, true))).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut steps = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let t = all[i].0;
        while i < all.len() && all[i].0 == t {
            if all[i].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        steps.push((t, tp, fp));
    }
    steps
}

/// The best F1 over all thresholds `score >= t`, and the threshold that reaches it
/// (the lowest such score). `(0, +inf)` when there are no defects.
pub fn best_f1(normal: &[f64], defect: &[f64]) -> (f64, f64) {
    let total_pos = defect.len() as f64;
    let (mut best, mut best_t) = (0.0, f64::INFINITY);
    if defect.is_empty() {
        return (best, best_t);
    }
    for (t, tp, fp) in sweep(normal, defect) {
        let f1 = 2.0 * tp / (tp + fp + total_pos);
        if f1 > best {
            best = f1;
            best_t = t;
        }
    }
    (best, best_t)
}

/// ROC curve points (false-positive rate, true-positive rate), from (0,0) to (1,1).
pub fn roc_curve(normal: &[f64], defect: &[f64]) -> Vec<(f64, f64)> {
    let (np, nn) = (defect.len().max(1) as f64, normal.len().max(1) as f64);
    std::iter::once((0.0, 0.0)).chain(sweep(normal, defect).into_iter().map(|(_, tp, fp)| (fp / nn, tp / np))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_known_values() {
        assert_eq!(auroc(&[1.0, 2.0], &[3.0, 4.0]), 1.0);
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), 0.0);
        assert_eq!(auroc(&[1.0, 1.0], &[1.0, 1.0]), 0.5);
        // normal {1,3}, defect {2,4}: pairs (d>n): 2>1, 4>1, 4>3 = 3 of 4.
        assert_eq!(auroc(&[1.0, 3.0], &[2.0, 4.0]), 0.75);
        // One tie counts half: normal {1,2}, defect {2,3}: 2>1, 2=2 (½), 3>1, 3>2 → 3.5/4.
        assert_eq!(auroc(&[1.0, 2.0], &[2.0, 3.0]), 0.875);
        assert!(auroc(&[], &[1.0]).is_nan());
    }

    #[test]
    fn auroc_matches_roc_area() {
        let normal = [0.1, 0.4, 0.35, 0.8, 0.2, 0.5];
        let defect = [0.9, 0.3, 0.7, 0.45, 0.95];
        let pts = roc_curve(&normal, &defect);
        let area: f64 = pts.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum();
        assert!((area - auroc(&normal, &defect)).abs() < 1e-12);
        assert_eq!(pts.last(), Some(&(1.0, 1.0)));
    }

    #[test]
    fn best_f1_finds_the_separating_threshold() {
        let (f1, t) = best_f1(&[0.1, 0.2, 0.3], &[0.6, 0.7]);
        assert_eq!(f1, 1.0);
        assert_eq!(t, 0.6);
        // Overlap: normal {1,2,5}, defect {3,4}: t=3 → tp 2, fp 1 → F1 = 4/5 = 0.8;
        // t=1 → tp2 fp3 → 4/7; so 0.8 at t=3.
        let (f1, t) = best_f1(&[1.0, 2.0, 5.0], &[3.0, 4.0]);
        assert!((f1 - 0.8).abs() < 1e-12);
        assert_eq!(t, 3.0);
    }

    #[test]
    fn quantile_threshold_hits_target_rate() {
        let normal: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        let c = quantile_calibration(&normal, 0.01);
        // 1% of 1000 normals above threshold ≈ 10.
        let above = normal.iter().filter(|&&s| s >= c.threshold).count();
        assert!((9..=11).contains(&above), "{above} above {}", c.threshold);
        assert_eq!(c.method, CalibrationMethod::NormalQuantile);
        assert_eq!(c.normalize(c.threshold), 0.5);
        let stats = c.normal_stats.unwrap();
        assert_eq!(stats.n, 1000);
        assert_eq!(stats.min, 0.0);
        assert_eq!(stats.max, 999.0);
        assert!((stats.p50 - 499.5).abs() < 1e-9);
    }

    #[test]
    fn f1_calibration_records_evidence() {
        let c = f1_calibration(&[0.1, 0.2], &[0.8, 0.9]);
        assert_eq!(c.method, CalibrationMethod::F1Optimal);
        assert_eq!(c.threshold, 0.8);
        assert_eq!(c.val_auroc, Some(1.0));
        assert_eq!(c.val_f1, Some(1.0));
        assert_eq!((c.min, c.max), (0.1, 0.9));
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.5), 2.5);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert!((quantile_sorted(&v, 0.9) - 3.7).abs() < 1e-12);
    }
}
