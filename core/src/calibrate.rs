//! Turning raw scores into decisions: thresholds from validation scores,
//! score statistics, and the metrics (AUROC, best F1) that judge a model.
//!
//! Convention everywhere: higher score = more anomalous; a frame is anomalous
//! when `score >= threshold`; defects are the positive class.
//!
//! Thresholds for a target false-alarm rate α come from [`normal_calibration`], the
//! one place they are computed (trainer export and the daemon's live `calibrate`):
//! - `normal_quantile`: the interpolated 1−α sample quantile (the method before
//!   schema 2). With the trainer's ~40-image holdout and α = 1 % it sits between the
//!   two largest scores, so one unusual held-out image sets it.
//! - `conformal`: the ⌈(n+1)(1−α)⌉-th smallest score, which keeps the rate ≤ α for
//!   exchangeable data; below n = 1/α − 1 it is the sample maximum and says so
//!   (`expected_far`).
//! - `lognormal_tail`: ln(score) ~ N(μ, σ²) fitted to all the scores, the threshold at
//!   the fit's 1−α quantile: every score moves it a little, none sets it alone. Used
//!   when the fit passes a Kolmogorov–Smirnov check (Lilliefors' 1 % value), else
//!   `conformal`.
//!
//! Each records `expected_far`: the rate to expect on good images at its threshold
//! with a 95 % interval (for order statistics the exact Beta distribution of their
//! exceedance; for the fit the delta-method interval of its parameters).

use crate::metadata::{Calibration, CalibrationMethod, FarInterval, ScoreStats, TailFit};

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
    normal_calibration(normal, target_far, CalibrationMethod::NormalQuantile)
}

/// The methods [`normal_calibration`] knows (the others need defects or are placeholders).
pub const NORMAL_METHODS: [CalibrationMethod; 3] =
    [CalibrationMethod::NormalQuantile, CalibrationMethod::Conformal, CalibrationMethod::LognormalTail];

/// The method the trainer and the daemon use unless told otherwise: see the
/// module doc and benches/README.md ("Calibration") for the comparison.
pub const DEFAULT_NORMAL_METHOD: CalibrationMethod = CalibrationMethod::LognormalTail;

/// Fewest scores a tail fit is tried on.
pub const MIN_FIT_SCORES: usize = 10;

/// A threshold for `target_far` from good-only scores with `method` (one of
/// [`NORMAL_METHODS`]; anything else is treated as `normal_quantile`). The
/// method actually used is recorded: `lognormal_tail` whose fit fails its check
/// becomes `conformal`, with the rejected fit kept in `tail_fit`.
pub fn normal_calibration(normal: &[f64], target_far: f64, method: CalibrationMethod) -> Calibration {
    let v = sorted_finite(normal);
    let stats = score_stats(&v);
    let n = v.len();
    let mut tail_fit = None;
    let (threshold, used, far) = match method {
        CalibrationMethod::LognormalTail | CalibrationMethod::Conformal => {
            let fit = (method == CalibrationMethod::LognormalTail).then(|| lognormal_fit(&v)).flatten();
            match fit {
                Some(fit) if fit.accepted => {
                    let z = normal_quantile(1.0 - target_far);
                    let threshold = (fit.mu + z * fit.sigma).exp();
                    let far = lognormal_far_interval(z, n);
                    tail_fit = Some(fit);
                    (threshold, CalibrationMethod::LognormalTail, far)
                }
                rejected => {
                    tail_fit = rejected;
                    let (threshold, far) = conformal_threshold(&v, target_far);
                    (threshold, CalibrationMethod::Conformal, far)
                }
            }
        }
        _ => {
            let threshold = quantile_sorted(&v, 1.0 - target_far);
            let far = order_far_interval(&v, threshold, "normal_quantile");
            (threshold, CalibrationMethod::NormalQuantile, far)
        }
    };
    Calibration {
        threshold,
        min: stats.min,
        max: stats.max.max(threshold),
        method: used,
        target_false_alarm_rate: Some(target_far),
        normal_stats: Some(stats),
        val_auroc: None,
        val_f1: None,
        tail_fit,
        expected_far: far,
    }
}

/// The conformal threshold of ascending `v` and its expected rate; the sample
/// maximum (with its real, higher rate) when n is too small for `alpha`.
fn conformal_threshold(v: &[f64], alpha: f64) -> (f64, Option<FarInterval>) {
    let n = v.len();
    if n == 0 {
        return (f64::NAN, None);
    }
    let rank = ((n as f64 + 1.0) * (1.0 - alpha)).ceil() as usize;
    let capped = rank > n;
    let threshold = v[rank.clamp(1, n) - 1];
    let mut far = order_far_interval(v, threshold, "conformal");
    if let (true, Some(f)) = (capped, far.as_mut()) {
        f.how = format!(
            "{}; {n} scores are too few to certify α = {alpha} (needs {}), so the threshold is their maximum",
            f.how,
            ((1.0 / alpha).ceil() as usize).saturating_sub(1)
        );
    }
    (threshold, far)
}

/// The rate at a threshold set on the scores themselves: with k of n scores at or
/// above it, a new good score exceeds the (n−k+1)-th order statistic with a
/// probability distributed Beta(k, n−k+1) (mean k/(n+1)); its 2.5 % and 97.5 % quantiles.
fn order_far_interval(v: &[f64], threshold: f64, what: &str) -> Option<FarInterval> {
    let n = v.len();
    if n == 0 || !threshold.is_finite() {
        return None;
    }
    let k = v.iter().filter(|&&s| s >= threshold).count();
    let (estimate, low, high) = if k == 0 {
        // Above every score: at most the rule-of-three style bound.
        (0.0, 0.0, 1.0 - 0.025f64.powf(1.0 / n as f64))
    } else {
        let (a, b) = (k as f64, (n - k + 1) as f64);
        (a / (n as f64 + 1.0), beta_quantile(a, b, 0.025), beta_quantile(a, b, 0.975))
    };
    Some(FarInterval {
        estimate,
        low,
        high,
        level: 0.95,
        how: format!(
            "{what}: {k} of {n} normal scores at or above the threshold; exceedance ~ Beta({k}, {})",
            n + 1 - k
        ),
    })
}

/// The fit's rate is α by construction; its uncertainty comes from μ̂ and σ̂:
/// z = (ln t − μ̂)/σ̂ has variance ≈ (1 + z²/2)/n (delta method).
fn lognormal_far_interval(z: f64, n: usize) -> Option<FarInterval> {
    if n == 0 {
        return None;
    }
    let se = ((1.0 + z * z / 2.0) / n as f64).sqrt();
    Some(FarInterval {
        estimate: normal_sf(z),
        low: normal_sf(z + 1.96 * se),
        high: normal_sf(z - 1.96 * se),
        level: 0.95,
        how: format!("lognormal_tail: delta-method interval of the fit's parameters from {n} scores"),
    })
}

/// Log-normal fit of ascending `v` (all > 0, at least [`MIN_FIT_SCORES`]) with its
/// Kolmogorov–Smirnov check; `None` when it cannot be fitted at all.
pub fn lognormal_fit(v: &[f64]) -> Option<TailFit> {
    let n = v.len();
    if n < 2 || v.first().is_none_or(|&m| m <= 0.0) {
        return None;
    }
    let logs: Vec<f64> = v.iter().map(|s| s.ln()).collect();
    let mu = logs.iter().sum::<f64>() / n as f64;
    let sigma = (logs.iter().map(|l| (l - mu).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    if !(sigma > 0.0 && sigma.is_finite()) {
        return None;
    }
    // Logs are ascending because `v` is.
    let ks = logs
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let f = 1.0 - normal_sf((l - mu) / sigma);
            ((i + 1) as f64 / n as f64 - f).max(f - i as f64 / n as f64)
        })
        .fold(0.0, f64::max);
    let ks_critical = 1.031 / (n as f64).sqrt();
    Some(TailFit {
        family: "lognormal".into(),
        mu,
        sigma,
        ks,
        ks_critical,
        accepted: n >= MIN_FIT_SCORES && ks <= ks_critical,
    })
}

/// P(Z ≥ z) for a standard normal (erfc of Numerical Recipes' Chebyshev fit:
/// relative error below 1.2e-7).
pub fn normal_sf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let poly = -a * a - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    0.5 * if x >= 0.0 { erfc } else { 2.0 - erfc }
}

/// The standard normal quantile (Acklam's rational approximation, relative error
/// below 1.2e-9). NaN outside (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    if !(p > 0.0 && p < 1.0) {
        return f64::NAN;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const P_LOW: f64 = 0.02425;
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms: ~15 digits).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta I_x(a, b) (Numerical Recipes' continued fraction).
pub fn beta_cdf(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-14 {
            break;
        }
    }
    h
}

/// The `p` quantile of Beta(a, b), by bisection on [`beta_cdf`] (60 halvings: far
/// below any rate anyone reads).
pub fn beta_quantile(a: f64, b: f64, p: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if beta_cdf(a, b, mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
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
        tail_fit: None,
        expected_far: None,
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

    /// Deterministic log-normal sample: ln s = mu + sigma·Φ⁻¹((i+½)/n).
    fn lognormal_sample(n: usize, mu: f64, sigma: f64) -> Vec<f64> {
        (0..n).map(|i| (mu + sigma * normal_quantile((i as f64 + 0.5) / n as f64)).exp()).collect()
    }

    #[test]
    fn normal_functions_match_tables() {
        assert!((normal_quantile(0.99) - 2.326_347_874).abs() < 1e-7);
        assert!((normal_quantile(0.5)).abs() < 1e-12);
        assert!((normal_quantile(0.001) + 3.090_232_306).abs() < 1e-7);
        assert!((normal_sf(2.326_347_874) - 0.01).abs() < 1e-8);
        assert!((normal_sf(-1.0) - 0.841_344_746).abs() < 1e-7);
        assert!(normal_quantile(0.0).is_nan() && normal_quantile(1.0).is_nan());
        // Beta(1, 1) is uniform; Beta(1, n) has the closed form 1 − (1−x)^n.
        assert!((beta_cdf(1.0, 1.0, 0.3) - 0.3).abs() < 1e-12);
        assert!((beta_cdf(1.0, 40.0, 0.05) - (1.0 - 0.95f64.powi(40))).abs() < 1e-10);
        let q = beta_quantile(2.0, 39.0, 0.975);
        assert!((beta_cdf(2.0, 39.0, q) - 0.975).abs() < 1e-9, "{q}");
    }

    #[test]
    fn lognormal_tail_extrapolates_instead_of_taking_the_maximum() {
        // 40 good scores whose largest is an outlier (×3): the 99 % quantile sits
        // between the two largest; the fit's threshold hardly moves with it.
        let mut v = lognormal_sample(40, 0.0, 0.25);
        let clean = normal_calibration(&v, 0.01, CalibrationMethod::LognormalTail);
        *v.last_mut().unwrap() *= 3.0;
        let q = normal_calibration(&v, 0.01, CalibrationMethod::NormalQuantile);
        let fit = normal_calibration(&v, 0.01, CalibrationMethod::LognormalTail);
        assert_eq!(fit.method, CalibrationMethod::LognormalTail, "{:?}", fit.tail_fit);
        let exact = (0.25 * normal_quantile(0.99)).exp();
        assert!((clean.threshold / exact - 1.0).abs() < 0.05, "{} vs {exact}", clean.threshold);
        assert!(q.threshold > 2.0 * exact, "the quantile follows the outlier: {}", q.threshold);
        // The outlier widens the fit (σ 0.25 → ~0.35) but does not set the threshold.
        assert!(
            fit.threshold < 1.4 * exact && fit.threshold < 0.7 * q.threshold,
            "{} vs {}",
            fit.threshold,
            q.threshold
        );
        let far = fit.expected_far.unwrap();
        assert!((far.estimate - 0.01).abs() < 1e-6 && far.low < 0.01 && far.high > 0.01, "{far:?}");
    }

    #[test]
    fn a_bad_fit_falls_back_to_conformal_and_says_so() {
        // Two well separated clumps: no log-normal fits them.
        let v: Vec<f64> =
            (0..200).map(|i| if i % 2 == 0 { 1.0 + i as f64 * 1e-4 } else { 10.0 + i as f64 * 1e-4 }).collect();
        let c = normal_calibration(&v, 0.01, CalibrationMethod::LognormalTail);
        assert_eq!(c.method, CalibrationMethod::Conformal);
        let fit = c.tail_fit.as_ref().unwrap();
        assert!(!fit.accepted && fit.ks > fit.ks_critical, "{fit:?}");
        // ⌈201 · 0.99⌉ = 199th smallest of 200: two scores at or above it.
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(c.threshold, sorted[198]);
        let far = c.expected_far.unwrap();
        assert!((far.estimate - 2.0 / 201.0).abs() < 1e-12, "{far:?}");
        assert!(far.low < far.estimate && far.estimate < far.high);
        // Non-positive scores cannot be log-normal.
        let c = normal_calibration(
            &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
            0.1,
            CalibrationMethod::LognormalTail,
        );
        assert_eq!((c.method, c.tail_fit), (CalibrationMethod::Conformal, None));
    }

    #[test]
    fn conformal_on_too_few_scores_is_the_maximum_with_its_real_rate() {
        let v: Vec<f64> = (1..=40).map(f64::from).collect();
        let c = normal_calibration(&v, 0.01, CalibrationMethod::Conformal);
        assert_eq!(c.threshold, 40.0);
        let far = c.expected_far.unwrap();
        // The maximum of 40 is exceeded with probability 1/41 on average, not 1 %.
        assert!((far.estimate - 1.0 / 41.0).abs() < 1e-12);
        assert!(far.how.contains("too few to certify"), "{}", far.how);
        // Enough scores: the rank stays inside.
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        let c = normal_calibration(&v, 0.01, CalibrationMethod::Conformal);
        assert_eq!(c.threshold, 991.0, "⌈1001 · 0.99⌉ = 991");
        assert!(!c.expected_far.unwrap().how.contains("too few"));
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
