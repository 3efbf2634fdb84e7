//! The verdict on one part, as pure functions: which buffered frames judge it
//! ([`nearest`], [`after`]), and what their scores mean ([`judge`]: the
//! aggregate raw score, normalised with the model's calibration, against the
//! camera's threshold → `ok` / `ng`, or `error` for an unusable score). No
//! clock, no channel: `trigger.rs` carries the results out.

use ganomaly_core::Calibration;

use crate::config::Aggregate;
use crate::events::Verdict;

/// What the scores of a part's frames say.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// Normalised aggregate (0.5 = the calibrated threshold); `None` for `error`.
    pub score: Option<f64>,
    pub raw: Option<f64>,
    /// Index (into the scores given) of the frame with the highest raw score:
    /// the one an `ng` snapshot shows.
    pub worst: Option<usize>,
    /// Why an `error`.
    pub reason: Option<String>,
}

/// Judges a part from the raw scores of its frames (`None`: the model gave
/// no score for that frame). `threshold` is on the normalised score, like the
/// alarm threshold: at or above it the part is `ng`.
///
/// The raw scores are aggregated first and the aggregate normalised, so that
/// `score` and `raw_score` of a verdict describe the same number (normalising
/// clamps to [0, 1], so a mean of normalised scores would not).
pub fn judge(raws: &[Option<f64>], aggregate: Aggregate, calibration: &Calibration, threshold: f64) -> Judgement {
    let error = |reason: String| Judgement {
        verdict: Verdict::Error,
        score: None,
        raw: None,
        worst: None,
        reason: Some(reason),
    };
    if raws.is_empty() {
        return error("no frame was scored".into());
    }
    let mut finite = Vec::with_capacity(raws.len());
    for (i, r) in raws.iter().enumerate() {
        match r {
            Some(v) if v.is_finite() => finite.push((i, *v)),
            Some(v) => return error(format!("frame {} of the part has a non-finite score ({v})", i + 1)),
            None => return error(format!("frame {} of the part has no score (inference failed)", i + 1)),
        }
    }
    let raw = match aggregate {
        Aggregate::Max => finite.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max),
        Aggregate::Mean => finite.iter().map(|x| x.1).sum::<f64>() / finite.len() as f64,
    };
    let worst = finite.iter().max_by(|a, b| a.1.total_cmp(&b.1)).map(|x| x.0);
    let score = calibration.normalize(raw);
    let verdict = if score >= threshold { Verdict::Ng } else { Verdict::Ok };
    Judgement { verdict, score: Some(score), raw: Some(raw), worst, reason: None }
}

/// The raw score that normalises to `threshold` (what a verdict reports as
/// `threshold`: comparable with `raw_score`).
pub fn raw_threshold(calibration: &Calibration, threshold: f64) -> f64 {
    let span = calibration.max - calibration.min;
    let span = if span > 0.0 && span.is_finite() { span } else { 1.0 };
    calibration.threshold + (threshold - 0.5) * span
}

/// Indexes of the `n` frames captured nearest `target` (ms), among frames
/// with capture times `ts` (oldest first), returned oldest first. Ties go to
/// the earlier frame.
pub fn nearest(ts: &[u64], target: u64, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..ts.len()).collect();
    idx.sort_by_key(|&i| (ts[i].abs_diff(target), ts[i]));
    idx.truncate(n);
    idx.sort_unstable();
    idx
}

/// Indexes of the first `n` frames captured at or after `target`.
pub fn after(ts: &[u64], target: u64, n: usize) -> Vec<usize> {
    ts.iter().enumerate().filter(|(_, &t)| t >= target).map(|(i, _)| i).take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cal() -> Calibration {
        // Raw threshold 2 at normalised 0.5; a raw span of 4.
        Calibration { threshold: 2.0, min: 1.0, max: 5.0, ..Calibration::uncalibrated() }
    }

    #[test]
    fn max_and_mean_aggregate_raw_scores_then_normalise() {
        let j = judge(&[Some(1.0), Some(3.0), Some(2.0)], Aggregate::Max, &cal(), 0.5);
        assert_eq!((j.verdict, j.raw, j.worst), (Verdict::Ng, Some(3.0), Some(1)));
        assert!((j.score.unwrap() - 0.75).abs() < 1e-12);
        let j = judge(&[Some(1.0), Some(3.0), Some(1.1)], Aggregate::Mean, &cal(), 0.5);
        assert_eq!(j.verdict, Verdict::Ok, "mean raw 1.7 < 2");
        assert!((j.raw.unwrap() - 1.7).abs() < 1e-12);
        assert_eq!(j.worst, Some(1), "the snapshot shows the worst frame whatever the aggregate");
    }

    #[test]
    fn the_threshold_is_inclusive_and_configurable() {
        assert_eq!(judge(&[Some(2.0)], Aggregate::Max, &cal(), 0.5).verdict, Verdict::Ng, "at the threshold: ng");
        assert_eq!(judge(&[Some(2.0)], Aggregate::Max, &cal(), 0.6).verdict, Verdict::Ok);
        assert!((raw_threshold(&cal(), 0.6) - 2.4).abs() < 1e-12);
        assert_eq!(raw_threshold(&cal(), 0.5), 2.0);
    }

    #[test]
    fn an_unusable_score_is_an_error_never_ok() {
        for raws in [vec![Some(1.0), Some(f64::NAN)], vec![None], vec![], vec![Some(f64::INFINITY)]] {
            let j = judge(&raws, Aggregate::Mean, &cal(), 0.5);
            assert_eq!((j.verdict, j.score), (Verdict::Error, None), "{raws:?}");
            assert!(j.reason.is_some());
        }
    }

    #[test]
    fn frames_are_chosen_nearest_or_after_the_target() {
        let ts = [100, 200, 300, 400, 500];
        assert_eq!(nearest(&ts, 290, 1), [2]);
        assert_eq!(nearest(&ts, 250, 1), [1], "a tie goes to the earlier frame");
        assert_eq!(nearest(&ts, 320, 3), [1, 2, 3]);
        assert_eq!(nearest(&ts, 10_000, 2), [3, 4]);
        assert_eq!(nearest(&[], 5, 2), Vec::<usize>::new());
        assert_eq!(after(&ts, 300, 2), [2, 3]);
        assert_eq!(after(&ts, 450, 3), [4], "fewer than asked: the rest are still to come");
    }
}
