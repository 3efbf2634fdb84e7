//! Shadow models: a candidate model (`cameras.<name>.shadow_model`) scores
//! the same frames as the camera's model, and is compared with it.
//!
//! The shadow is a model of its own, on an inference thread of its own (never
//! the thread of a real model, even when the same file also serves as a
//! camera's model), fed by the preprocess pool with a copy of the camera's
//! tensor: check-config refuses a shadow whose input (size, colour mode)
//! differs from the camera model's. The copy is offered with `try_send`: when
//! the shadow is behind, its frame is **dropped** (counted in `dropped`)
//! before any work is spent on it, so the real path never waits for it.
//!
//! Its scores and alarms are published as the pseudo-camera
//! `<camera>/shadow` (a camera name cannot hold a `/`), i.e. on
//! `<camera>/shadow/score`, `<camera>/shadow/alarm` and `<camera>/shadow/state`:
//! they never touch the camera's own alarm, state or counters. Its alarm
//! machine runs with the camera's alarm settings.
//!
//! [`ShadowCompare`] pairs the two scores of each frame (by frame `seq`, in a
//! fixed ring: no allocation per frame) and counts, over the frames both
//! scored, the agreement of "at or above the alarm threshold" (both / real
//! only / shadow only / neither) and each side's score quantiles; the `stats`
//! payload and `/metrics` report them. The figures count from the moment the
//! shadow was attached (a reload that changes the shadow or restarts its
//! camera starts them again).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::metrics::CameraCounters;

/// The pseudo-camera a shadow publishes as.
pub fn publish_name(camera: &str) -> String {
    format!("{camera}/shadow")
}

/// Frames a pair may wait for its other half: the shadow may lag the real
/// model by this many frames (at 30 fps, 34 s) before its scores no longer pair.
const RING: usize = 1024;

/// Which model a score is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Real,
    Shadow,
}

#[derive(Debug, Clone, Copy, Default)]
struct Half {
    score: f64,
    above: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    seq: u64,
    real: Option<Half>,
    shadow: Option<Half>,
}

/// Normalised scores in [0, 1] in 1,000 bins (0.001 resolution).
#[derive(Debug, Clone)]
struct ScoreHistogram {
    counts: Vec<u64>,
    total: u64,
}

const BINS: usize = 1000;

impl Default for ScoreHistogram {
    fn default() -> Self {
        ScoreHistogram { counts: vec![0; BINS], total: 0 }
    }
}

impl ScoreHistogram {
    fn record(&mut self, score: f64) {
        let bin = if score.is_finite() { (score.clamp(0.0, 1.0) * BINS as f64) as usize } else { 0 };
        self.counts[bin.min(BINS - 1)] += 1;
        self.total += 1;
    }

    /// Upper edge of the bin holding quantile `q` (0 when empty).
    fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (i + 1) as f64 / BINS as f64;
            }
        }
        1.0
    }

    fn quantiles(&self) -> Quantiles {
        Quantiles { p50: self.quantile(0.5), p90: self.quantile(0.9), p99: self.quantile(0.99) }
    }
}

#[derive(Debug)]
struct Inner {
    ring: Vec<Slot>,
    both: u64,
    real_only: u64,
    shadow_only: u64,
    neither: u64,
    real: ScoreHistogram,
    shadow: ScoreHistogram,
}

/// One camera's comparison of its model with its shadow.
#[derive(Debug)]
pub struct ShadowCompare {
    /// The shadow model's file, for the report.
    pub model: String,
    inner: Mutex<Inner>,
    /// Shadow frames dropped because the shadow's input was full.
    dropped: AtomicU64,
    /// The shadow's own counters (decided, alarms raised).
    pub counters: Arc<CameraCounters>,
}

/// Score quantiles (normalised scores).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The comparison as `stats` reports it (`cameras[].shadow`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowStats {
    pub model: String,
    /// Frames both models scored (the figures below are over these).
    pub frames: u64,
    /// Frames at or above the alarm threshold for both / the real model only /
    /// the shadow only / neither.
    pub both: u64,
    pub real_only: u64,
    pub shadow_only: u64,
    pub neither: u64,
    /// (both + neither) / frames; 1 when no frame was compared yet.
    pub agreement: f64,
    /// Shadow frames dropped because the shadow was behind.
    pub dropped: u64,
    /// Frames the shadow decided, and the shadow alarms it raised.
    pub shadow_decided: u64,
    pub shadow_alarms: u64,
    pub real: Quantiles,
    pub shadow: Quantiles,
}

impl ShadowCompare {
    pub fn new(model: &str, counters: Arc<CameraCounters>) -> ShadowCompare {
        ShadowCompare {
            model: model.to_string(),
            inner: Mutex::new(Inner {
                ring: vec![Slot::default(); RING],
                both: 0,
                real_only: 0,
                shadow_only: 0,
                neither: 0,
                real: ScoreHistogram::default(),
                shadow: ScoreHistogram::default(),
            }),
            dropped: AtomicU64::new(0),
            counters,
        }
    }

    /// One side's normalised score of frame `seq`; `above`: at or above the
    /// alarm threshold. The pair counts once both halves are in.
    pub fn record(&self, side: Side, seq: u64, score: f64, above: bool) {
        let Ok(mut g) = self.inner.lock() else { return };
        let inner = &mut *g;
        let slot = &mut inner.ring[(seq % RING as u64) as usize];
        if slot.seq != seq {
            // An older frame's half whose other half never came (dropped or
            // lagging beyond the ring): forgotten.
            *slot = Slot { seq, real: None, shadow: None };
        }
        let half = Some(Half { score, above });
        match side {
            Side::Real => slot.real = half,
            Side::Shadow => slot.shadow = half,
        }
        if let (Some(r), Some(s)) = (slot.real, slot.shadow) {
            slot.real = None;
            slot.shadow = None;
            // Never paired again: a seq far in the future marks the slot spent.
            slot.seq = u64::MAX;
            match (r.above, s.above) {
                (true, true) => inner.both += 1,
                (true, false) => inner.real_only += 1,
                (false, true) => inner.shadow_only += 1,
                (false, false) => inner.neither += 1,
            }
            inner.real.record(r.score);
            inner.shadow.record(s.score);
        }
    }

    /// A shadow frame was dropped (its input was full).
    pub fn drop_frame(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> ShadowStats {
        let dropped = self.dropped.load(Ordering::Relaxed);
        let shadow_decided = CameraCounters::get(&self.counters.decided);
        let shadow_alarms = CameraCounters::get(&self.counters.alarms_raised);
        let Ok(g) = self.inner.lock() else {
            return ShadowStats { model: self.model.clone(), dropped, ..ShadowStats::default() };
        };
        let frames = g.both + g.real_only + g.shadow_only + g.neither;
        ShadowStats {
            model: self.model.clone(),
            frames,
            both: g.both,
            real_only: g.real_only,
            shadow_only: g.shadow_only,
            neither: g.neither,
            agreement: if frames == 0 { 1.0 } else { (g.both + g.neither) as f64 / frames as f64 },
            dropped,
            shadow_decided,
            shadow_alarms,
            real: g.real.quantiles(),
            shadow: g.shadow.quantiles(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compare() -> ShadowCompare {
        ShadowCompare::new("/m/cand.onnx", Arc::new(CameraCounters::default()))
    }

    #[test]
    fn pairs_count_by_agreement_in_either_arrival_order() {
        let c = compare();
        c.record(Side::Real, 0, 0.9, true);
        c.record(Side::Shadow, 0, 0.8, true);
        c.record(Side::Shadow, 1, 0.7, true);
        c.record(Side::Real, 1, 0.2, false);
        c.record(Side::Real, 2, 0.6, true);
        c.record(Side::Shadow, 2, 0.1, false);
        c.record(Side::Real, 3, 0.1, false);
        c.record(Side::Shadow, 3, 0.1, false);
        let s = c.stats();
        assert_eq!((s.frames, s.both, s.shadow_only, s.real_only, s.neither), (4, 1, 1, 1, 1));
        assert!((s.agreement - 0.5).abs() < 1e-12);
    }

    #[test]
    fn a_half_without_its_other_half_is_not_counted() {
        let c = compare();
        // The shadow dropped frames 0..10: the real halves wait, then are overwritten.
        for seq in 0..10 {
            c.record(Side::Real, seq, 0.3, false);
        }
        c.record(Side::Real, 10 + RING as u64, 0.3, false);
        c.record(Side::Shadow, 10 + RING as u64, 0.3, false);
        // Frame 10's slot now belongs to 10 + RING: a late shadow half of 10 does not pair with it.
        c.record(Side::Shadow, 10, 0.9, true);
        assert_eq!(c.stats().frames, 1);
        // A pair counts once, even if a half is repeated.
        c.record(Side::Real, 10 + RING as u64, 0.3, false);
        assert_eq!(c.stats().frames, 1);
        c.drop_frame();
        assert_eq!(c.stats().dropped, 1);
    }

    #[test]
    fn quantiles_of_both_sides() {
        let c = compare();
        for i in 0..1000u64 {
            c.record(Side::Real, i, i as f64 / 1000.0, false);
            c.record(Side::Shadow, i, 0.25, false);
        }
        let s = c.stats();
        assert!((s.real.p50 - 0.5).abs() <= 0.002, "{:?}", s.real);
        assert!((s.real.p90 - 0.9).abs() <= 0.002, "{:?}", s.real);
        assert!((s.real.p99 - 0.99).abs() <= 0.002, "{:?}", s.real);
        assert!((s.shadow.p99 - 0.251).abs() <= 0.002, "{:?}", s.shadow);
        assert_eq!(compare().stats().agreement, 1.0, "nothing compared yet");
    }
}
