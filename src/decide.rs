//! The decision step: what one scored frame means for its camera.
//!
//! [`Decider::decide`] is a pure function of (the camera's score kind and
//! calibration from the model's metadata, the frame's raw score, the camera's
//! alarm state) → an [`Outcome`] (ntp-proto's `NtpSourceAction` style): no
//! clock, no channel, no publisher, so the NaN guard, the normalisation and
//! the alarm transitions are unit-tested without ONNX Runtime.
//! [`Camera::act`] carries an outcome out (counters, score, snapshot job,
//! alarm, state), on the inference thread, without blocking on any of them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use ganomaly_core::{Calibration, ScoreKind};

use crate::alarm::{AlarmMachine, Scored};
use crate::capture::{Frame, FrameData};
use crate::config::{AlarmConfig, Roi};
use crate::events::{AlarmEvent, AlarmKind, EndReason, Publisher, ScoreEvent, PAYLOAD_SCHEMA};
use crate::metrics::CameraCounters;
use crate::shadow::{ShadowCompare, Side};
use crate::snapshot::{SnapshotJob, SnapshotQueue};

/// A camera's decision state: its score, its calibration, its alarm machine.
#[derive(Debug, Clone)]
pub struct Decider {
    pub kind: ScoreKind,
    pub calibration: Calibration,
    alarm: AlarmMachine,
}

/// What a frame's score means.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No usable score (missing, NaN or infinite): count the frame as broken,
    /// decide nothing. A NaN would never fall below the clear threshold and
    /// would hold an active alarm forever (FP16 engines can overflow).
    Broken { raw: f64 },
    /// Decided: publish the score; an alarm started or ended on this frame.
    Scored { score: f64, raw: f64, alarm: Option<AlarmEvent> },
}

impl Decider {
    /// `last_alarm`: the number of the camera's last alarm before this run
    /// (from the open-alarm journal; 0 if none), so that ids stay unique.
    pub fn new(
        camera: &str,
        kind: ScoreKind,
        calibration: Calibration,
        alarm: AlarmConfig,
        last_alarm: u64,
    ) -> Decider {
        Decider { kind, calibration, alarm: AlarmMachine::new(camera, alarm, last_alarm) }
    }

    /// Decides one frame (`raw`: the camera's score from the batch, if the
    /// model produced one) captured at `at` (monotonic) / `ts_ms` (wall clock).
    pub fn decide(&mut self, seq: u64, ts_ms: u64, at: Instant, raw: Option<f32>) -> Outcome {
        let raw = raw.map_or(f64::NAN, f64::from);
        if !raw.is_finite() {
            return Outcome::Broken { raw };
        }
        let score = self.calibration.normalize(raw);
        let alarm = self.alarm.observe(Scored { seq, ts_ms, at, score, raw });
        Outcome::Scored { score, raw, alarm }
    }

    /// The daemon is stopping: the `end` (reason `shutdown`) of an active alarm.
    pub fn stop(&mut self) -> Option<AlarmEvent> {
        self.alarm.stop()
    }

    /// New alarm thresholds/timing (SIGHUP); an alarm in progress carries on under them.
    pub fn reconfigure(&mut self, cfg: AlarmConfig) {
        self.alarm.reconfigure(cfg);
    }

    /// A new score kind and calibration (a model swapped by a reload). The
    /// alarm machine carries on: it works on normalised scores, where 0.5 is
    /// each model's own calibrated threshold (see `reload.rs`).
    pub fn rebase(&mut self, kind: ScoreKind, calibration: Calibration) {
        self.kind = kind;
        self.calibration = calibration;
    }

    /// Ends an active alarm now (see [`AlarmMachine::end_with`]).
    pub fn end_with(&mut self, reason: EndReason) -> Option<AlarmEvent> {
        self.alarm.end_with(reason)
    }

    pub fn alarm_active(&self) -> bool {
        self.alarm.is_active()
    }

    /// The normalised score at or above which a frame counts toward an alarm.
    pub fn threshold(&self) -> f64 {
        self.alarm.config().threshold
    }
}

/// What the inference thread knows about one camera.
pub struct Camera {
    pub name: String,
    pub decider: Decider,
    /// The crop the model saw, for drawing the snapshot's heat map in place.
    pub roi: Option<Roi>,
    /// Decided, broken, latency, alarm figures (read by stats and `/metrics`).
    pub counters: Arc<CameraCounters>,
    /// Where this camera's frame buffers go back to.
    pub recycle: Sender<FrameData>,
    /// The camera's comparison with its shadow model, and which side this is.
    pub compare: Option<(Arc<ShadowCompare>, Side)>,
    /// A triggered camera: its scored frames go to the trigger thread, not
    /// through the alarm machine (see `trigger.rs`).
    pub trigger: Option<Sender<crate::trigger::Scored>>,
}

/// Where outcomes go (shared by a model's cameras).
pub struct Outputs<'a> {
    pub publisher: &'a dyn Publisher,
    pub snapshots: Option<&'a SnapshotQueue>,
    /// The console's live-view taps (non-blocking; see `console::live`).
    pub live: Option<&'a crate::console::LiveTaps>,
}

impl Camera {
    /// Carries out `outcome` for `frame`; `map` is the frame's anomaly map
    /// (`side × side`), copied only when a snapshot is taken.
    pub fn act(&self, outcome: Outcome, frame: Frame, map: &[f32], side: usize, out: &Outputs) {
        match outcome {
            Outcome::Broken { raw } => {
                CameraCounters::add(&self.counters.broken, 1);
                tracing::debug!(camera = %self.name, seq = frame.seq, raw, "non-finite score: frame counted as broken");
            }
            Outcome::Scored { score, raw, alarm } => {
                let latency_ms = frame.captured.elapsed().as_secs_f64() * 1000.0;
                self.counters.record_latency(latency_ms);
                self.counters.set_last_score(score);
                CameraCounters::add(&self.counters.decided, 1);
                if let Some((compare, side)) = &self.compare {
                    compare.record(*side, frame.seq, score, score >= self.decider.threshold());
                }
                tracing::trace!(camera = %self.name, seq = frame.seq, raw, score, "scored");
                out.publisher.score(&ScoreEvent {
                    schema: PAYLOAD_SCHEMA,
                    camera: self.name.clone(),
                    seq: frame.seq,
                    ts: frame.ts_ms,
                    score,
                    raw_score: raw,
                    threshold: self.decider.calibration.threshold,
                    kind: self.decider.kind.as_str().to_string(),
                    latency_ms,
                });
                if let Some(ev) = alarm {
                    self.alarm(ev, &frame, map, side, out);
                }
                if let Some(live) = out.live {
                    live.offer(&frame, map, side, score);
                }
            }
        }
        let _ = self.recycle.try_send(frame.pixels);
    }

    /// The daemon is stopping: ends this camera's active alarm, if any
    /// (published like any end: through the outbox, before the publisher drains).
    pub fn stop(&mut self, out: &Outputs) {
        self.end_with(EndReason::Shutdown, out);
    }

    /// Ends this camera's active alarm, if any, for `reason` (published like any end).
    pub fn end_with(&mut self, reason: EndReason, out: &Outputs) {
        if let Some(ev) = self.decider.end_with(reason) {
            self.publish_alarm(&ev, out);
        }
    }

    fn alarm(&self, mut ev: AlarmEvent, frame: &Frame, map: &[f32], side: usize, out: &Outputs) {
        let start = ev.kind == AlarmKind::Start;
        if let (true, Some(q)) = (start, out.snapshots) {
            let name = crate::snapshot::file_name(ev.ts, &ev.id);
            let job = SnapshotJob {
                camera: self.name.clone(),
                alarm_id: ev.id.clone(),
                file_name: name.clone(),
                frame: frame.pixels.clone(),
                roi: self.roi,
                map: map.to_vec(),
                side,
            };
            if q.offer(job) {
                ev.snapshot = Some(name);
            }
        }
        self.publish_alarm(&ev, out);
    }

    fn publish_alarm(&self, ev: &AlarmEvent, out: &Outputs) {
        let start = ev.kind == AlarmKind::Start;
        tracing::info!(
            camera = %self.name, id = %ev.id, kind = ?ev.kind, reason = ?ev.reason, seq = ev.seq,
            peak = ev.peak, frames = ev.frames, "alarm"
        );
        out.publisher.alarm(ev);
        out.publisher.alarm_state(&self.name, start);
        self.counters.alarm_active.store(start, Ordering::Relaxed);
        if start {
            CameraCounters::add(&self.counters.alarms_raised, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decider() -> Decider {
        // Raw threshold 2 at normalized 0.5; a raw span of 4.
        let cal = Calibration { threshold: 2.0, min: 1.0, max: 5.0, ..Calibration::uncalibrated() };
        let alarm =
            AlarmConfig { threshold: 0.5, clear_threshold: 0.4, min_frames: 2, clear_frames: 2, cooldown_ms: 0 };
        Decider::new("cam", ScoreKind::Recon, cal, alarm, 0)
    }

    fn t(ms: u64) -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now) + std::time::Duration::from_millis(ms)
    }

    #[test]
    fn non_finite_or_missing_scores_are_broken_and_leave_the_alarm_alone() {
        let mut d = decider();
        assert!(matches!(d.decide(0, 0, t(0), Some(9.0)), Outcome::Scored { alarm: None, .. }));
        for (seq, raw) in [(1, Some(f32::NAN)), (2, Some(f32::INFINITY)), (3, None)] {
            assert!(matches!(d.decide(seq, seq, t(seq), raw), Outcome::Broken { .. }), "{raw:?}");
        }
        // The run of high scores was not broken by the NaNs: one more raises the alarm.
        match d.decide(4, 4, t(4), Some(9.0)) {
            Outcome::Scored { alarm: Some(ev), .. } => assert_eq!((ev.kind, ev.first_seq), (AlarmKind::Start, 0)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scores_are_normalized_with_the_models_calibration() {
        let mut d = decider();
        assert_eq!(d.decide(0, 0, t(0), Some(2.0)), Outcome::Scored { score: 0.5, raw: 2.0, alarm: None });
        let Outcome::Scored { score, .. } = d.decide(1, 1, t(1), Some(1.0)) else { panic!() };
        assert!((score - 0.25).abs() < 1e-12, "{score}");
    }

    #[test]
    fn an_alarm_starts_after_min_frames_and_ends_after_clear_frames() {
        let mut d = decider();
        let events: Vec<(u64, AlarmKind)> = [3.0, 3.0, 3.0, 1.0, 1.0, 1.0]
            .iter()
            .enumerate()
            .filter_map(|(i, &raw)| match d.decide(i as u64, i as u64 * 100, t(i as u64 * 100), Some(raw)) {
                Outcome::Scored { alarm: Some(ev), .. } => Some((ev.seq, ev.kind)),
                _ => None,
            })
            .collect();
        assert_eq!(events, [(1, AlarmKind::Start), (4, AlarmKind::End)]);
    }

    #[test]
    fn reconfigure_applies_new_thresholds() {
        let mut d = decider();
        d.reconfigure(AlarmConfig {
            threshold: 0.9,
            clear_threshold: 0.8,
            min_frames: 1,
            clear_frames: 1,
            cooldown_ms: 0,
        });
        // 0.75 normalized: above the old threshold, below the new one.
        assert!(matches!(d.decide(0, 0, t(0), Some(3.0)), Outcome::Scored { alarm: None, .. }));
        assert!(matches!(d.decide(1, 1, t(1), Some(9.0)), Outcome::Scored { alarm: Some(_), .. }));
    }
}
