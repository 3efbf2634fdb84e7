//! Score drift of a camera without defect labels: rolling statistics of the raw
//! scores of frames that raised no alarm, compared with the normal scores the
//! camera's calibration came from (lighting, focus, a dirty lens, a new batch of
//! material all move them before they raise alarms).
//!
//! The bound, documented in README ("Drift"): the window's median, in units of
//! the reference spread `p95 − p50` of the calibration's normal scores, is
//! `shift = (median − ref_p50) / (ref_p95 − ref_p50)`. `|shift| ≥ bound` is
//! drift (a median as high as the reference p95 at `bound = 1`, where 5 % of
//! good frames used to score); it is back once `|shift| < bound / 2`
//! (hysteresis: a shift hovering at the bound does not flap). Judged every
//! [`EVERY`] frames once the window holds [`MIN_FILL`] of its size.
//!
//! [`DriftMonitor::observe`] is pure (no clock, no I/O): the decision step
//! calls it per frame and returns the change, if any, as part of its outcome.

use std::collections::VecDeque;

use ganomaly_core::calibrate::quantile_sorted;
use ganomaly_core::metadata::ScoreStats;
use serde::Serialize;

/// Frames between two judgements: sorting a 500-score window costs a few µs,
/// and a drift is a matter of minutes, not frames.
pub const EVERY: usize = 50;

/// Share of the window that must be filled before the first judgement.
pub const MIN_FILL: f64 = 0.5;

/// The normal statistics drift is measured against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reference {
    pub p50: f64,
    pub p95: f64,
}

impl Reference {
    /// From a calibration's normal statistics; `None` without a spread to measure in.
    pub fn from_stats(s: &ScoreStats) -> Option<Reference> {
        (s.p95 > s.p50 && s.p50.is_finite() && s.p95.is_finite()).then_some(Reference { p50: s.p50, p95: s.p95 })
    }

    fn shift(&self, median: f64) -> f64 {
        (median - self.p50) / (self.p95 - self.p50)
    }
}

/// One judgement of the window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DriftReading {
    pub median: f64,
    pub p90: f64,
    /// The median's distance from the reference median, in reference spreads.
    pub shift: f64,
    /// Scores in the window.
    pub n: usize,
    pub reference_p50: f64,
    pub reference_p95: f64,
}

/// A crossing of the bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DriftChange {
    Drifted(DriftReading),
    Back(DriftReading),
}

/// Rolling window and state of one camera.
#[derive(Debug, Clone)]
pub struct DriftMonitor {
    window: VecDeque<f64>,
    cap: usize,
    scratch: Vec<f64>,
    since: usize,
    reference: Option<Reference>,
    bound: f64,
    drifted: bool,
    last: Option<DriftReading>,
}

impl DriftMonitor {
    /// `bound` 0: readings only, no changes.
    pub fn new(cap: usize, bound: f64, reference: Option<Reference>) -> DriftMonitor {
        let cap = cap.max(1);
        DriftMonitor {
            window: VecDeque::with_capacity(cap),
            cap,
            scratch: Vec::with_capacity(cap),
            since: 0,
            reference,
            bound,
            drifted: false,
            last: None,
        }
    }

    /// A new calibration: a new reference, a fresh window (the old scores were
    /// judged against the old one), not drifted.
    pub fn reset(&mut self, reference: Option<Reference>) {
        self.reference = reference;
        self.window.clear();
        self.since = 0;
        self.drifted = false;
        self.last = None;
    }

    pub fn is_drifted(&self) -> bool {
        self.drifted
    }

    /// The latest judgement.
    pub fn last(&self) -> Option<DriftReading> {
        self.last
    }

    /// One decided frame's raw score; `in_alarm`: the camera is in an alarm (its
    /// frames are not normal and stay out of the window).
    pub fn observe(&mut self, raw: f64, in_alarm: bool) -> Option<DriftChange> {
        if in_alarm || !raw.is_finite() {
            return None;
        }
        if self.window.len() == self.cap {
            self.window.pop_front();
        }
        self.window.push_back(raw);
        self.since += 1;
        if self.since < EVERY || (self.window.len() as f64) < MIN_FILL * self.cap as f64 {
            return None;
        }
        self.since = 0;
        let r = self.reference?;
        self.scratch.clear();
        self.scratch.extend(self.window.iter().copied());
        self.scratch.sort_by(f64::total_cmp);
        let median = quantile_sorted(&self.scratch, 0.5);
        let reading = DriftReading {
            median,
            p90: quantile_sorted(&self.scratch, 0.9),
            shift: r.shift(median),
            n: self.scratch.len(),
            reference_p50: r.p50,
            reference_p95: r.p95,
        };
        self.last = Some(reading);
        if self.bound <= 0.0 {
            return None;
        }
        let a = reading.shift.abs();
        if !self.drifted && a >= self.bound {
            self.drifted = true;
            return Some(DriftChange::Drifted(reading));
        }
        if self.drifted && a < self.bound / 2.0 {
            self.drifted = false;
            return Some(DriftChange::Back(reading));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monitor() -> DriftMonitor {
        DriftMonitor::new(100, 1.0, Some(Reference { p50: 1.0, p95: 2.0 }))
    }

    /// Feeds `n` scores cycling around `centre` (±0.1); returns the changes.
    fn feed(m: &mut DriftMonitor, n: usize, centre: f64, in_alarm: bool) -> Vec<DriftChange> {
        (0..n).filter_map(|i| m.observe(centre + 0.1 * ((i % 3) as f64 - 1.0), in_alarm)).collect()
    }

    #[test]
    fn a_moved_median_is_drift_once_and_back_once() {
        let mut m = monitor();
        assert!(feed(&mut m, 300, 1.0, false).is_empty(), "normal scores");
        assert!((m.last().unwrap().shift).abs() < 0.05, "{:?}", m.last());
        // Lighting changed: scores sit at the old p95 and above.
        let changes = feed(&mut m, 300, 2.5, false);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let DriftChange::Drifted(r) = changes[0] else { panic!("{changes:?}") };
        assert!(r.shift >= 1.0 && r.median > 2.0 && r.p90 >= r.median, "{r:?}");
        assert!(m.is_drifted());
        // Cleaned lens: back to normal, one `Back`.
        let changes = feed(&mut m, 300, 1.0, false);
        assert!(matches!(changes.as_slice(), [DriftChange::Back(r)] if r.shift.abs() < 0.5), "{changes:?}");
    }

    #[test]
    fn hysteresis_holds_a_shift_between_half_and_whole_bound() {
        let mut m = monitor();
        assert_eq!(feed(&mut m, 200, 2.2, false).len(), 1, "drifted");
        // 0.7 spreads: below the bound, above half of it: still drifted, no event.
        assert!(feed(&mut m, 400, 1.7, false).is_empty());
        assert!(m.is_drifted());
    }

    #[test]
    fn alarm_frames_and_broken_scores_stay_out_and_no_reference_means_no_events() {
        let mut m = monitor();
        feed(&mut m, 200, 1.0, false);
        assert!(feed(&mut m, 1000, 50.0, true).is_empty(), "frames in an alarm are not normal");
        assert!(m.observe(f64::NAN, false).is_none());
        assert!(m.last().unwrap().median < 1.2);
        let mut blind = DriftMonitor::new(100, 1.0, None);
        assert!(feed(&mut blind, 500, 9.0, false).is_empty());
        assert!(blind.last().is_none());
        let mut quiet = DriftMonitor::new(100, 0.0, Some(Reference { p50: 1.0, p95: 2.0 }));
        assert!(feed(&mut quiet, 500, 9.0, false).is_empty(), "bound 0: no events");
        assert!(quiet.last().unwrap().shift > 5.0, "but readings");
        assert_eq!(
            Reference::from_stats(&ScoreStats {
                n: 3,
                mean: 1.0,
                std: 0.0,
                min: 1.0,
                p50: 1.0,
                p95: 1.0,
                p99: 1.0,
                max: 1.0
            }),
            None
        );
    }

    #[test]
    fn a_new_reference_starts_afresh() {
        let mut m = monitor();
        feed(&mut m, 200, 3.0, false);
        assert!(m.is_drifted());
        m.reset(Some(Reference { p50: 3.0, p95: 4.0 }));
        assert!(!m.is_drifted() && m.last().is_none());
        assert!(feed(&mut m, 200, 3.0, false).is_empty());
        assert!(m.last().unwrap().shift.abs() < 0.1);
    }
}
