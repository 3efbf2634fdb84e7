//! The decision step: what one scored frame means for its camera.
//!
//! [`Decider::decide`] is a pure function of (the camera's score kind and
//! calibration from the model's metadata, the frame's raw score, the camera's
//! alarm state) → an [`Outcome`] (ntp-proto's `NtpSourceAction` style): no
//! clock, no channel, no publisher, so the NaN guard, the normalisation and
//! the alarm transitions are unit-tested without ONNX Runtime.
//! [`Camera::act`] carries an outcome out (counters, score, snapshot job,
//! alarm, state), on the inference thread, without blocking on any of them.
//!
//! Commissioning lives here too, because it needs the scores and the alarm
//! state of exactly this thread: the decider's [`DriftMonitor`] (pure, part of
//! the outcome), a live calibration in progress ([`Collecting`]: raw scores of
//! good parts until the request is met, then core's `normal_calibration` becomes
//! the camera's calibration at once), and the frames of the last alarm starts
//! ([`AlarmFrames`], for the operator's `feedback`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use ganomaly_core::calibrate::normal_calibration;
use ganomaly_core::metadata::CalibrationMethod;
use ganomaly_core::{Calibration, ScoreKind};

use crate::alarm::{AlarmMachine, Scored};
use crate::capture::{Frame, FrameData};
use crate::commands::{CommandEvent, Status};
use crate::config::{AlarmConfig, Roi};
use crate::drift::{DriftChange, DriftMonitor, Reference};
use crate::events::{AlarmEvent, AlarmKind, EndReason, Publisher, ScoreEvent, PAYLOAD_SCHEMA};
use crate::metrics::{stage_ms, CameraCounters, Passage};
use crate::shadow::{ShadowCompare, Side};
use crate::snapshot::{SnapshotJob, SnapshotQueue};

/// A camera's decision state: its score, its calibration, its alarm machine.
#[derive(Debug, Clone)]
pub struct Decider {
    pub kind: ScoreKind,
    pub calibration: Calibration,
    alarm: AlarmMachine,
    pub drift: DriftMonitor,
}

/// What a frame's score means.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No usable score (missing, NaN or infinite): count the frame as broken,
    /// decide nothing. A NaN would never fall below the clear threshold and
    /// would hold an active alarm forever (FP16 engines can overflow).
    Broken { raw: f64 },
    /// Decided: publish the score; an alarm started or ended on this frame; the
    /// score drift crossed its bound on this frame.
    /// (The drift change is boxed: it happens a few times a day, and the
    /// outcome of every frame would otherwise carry its size.)
    Scored { score: f64, raw: f64, alarm: Option<AlarmEvent>, drift: Option<Box<DriftChange>> },
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
        let drift = DriftMonitor::new(500, 1.0, reference(&calibration));
        Decider { kind, calibration, alarm: AlarmMachine::new(camera, alarm, last_alarm), drift }
    }

    /// The same with `[commissioning]`'s drift window and bound.
    pub fn with_drift(mut self, window: usize, bound: f64) -> Decider {
        self.drift = DriftMonitor::new(window, bound, reference(&self.calibration));
        self
    }

    /// A new calibration (live `calibrate`): scores are normalised with it from
    /// the next frame on, and drift is measured against its normal statistics.
    pub fn set_calibration(&mut self, calibration: Calibration) {
        self.drift.reset(reference(&calibration));
        self.calibration = calibration;
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
        // The frame that ends an alarm belongs to it too.
        let in_alarm = self.alarm.is_active() || alarm.is_some();
        let drift = self.drift.observe(raw, in_alarm).map(Box::new);
        Outcome::Scored { score, raw, alarm, drift }
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
        // Drift is measured against the normal scores of the calibration in force.
        if kind != self.kind || calibration != self.calibration {
            self.drift.reset(reference(&calibration));
        }
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

/// Drift is measured against the normal scores the calibration came from.
fn reference(c: &Calibration) -> Option<Reference> {
    c.normal_stats.as_ref().and_then(Reference::from_stats)
}

/// A live calibration asked for: collect this camera's raw scores of good parts.
#[derive(Debug)]
pub struct CalibrateRequest {
    /// Stop after this many scores…
    pub frames: Option<u64>,
    /// …or after this long (capture time of the first to the last).
    pub duration: Option<Duration>,
    pub target_far: f64,
    pub method: CalibrationMethod,
    pub reply: Sender<CalibrateReply>,
}

/// How a live calibration ended (sent back to the command's handler).
#[derive(Debug, Clone)]
pub enum CalibrateReply {
    /// Not started (an alarm is active, another calibration runs…).
    Refused(String),
    /// Started, then given up (an alarm started: the parts were not all good).
    Aborted(String),
    /// Applied: the camera decides with `after` from now on.
    Done { kind: ScoreKind, before: Box<Calibration>, after: Box<Calibration>, scores: usize },
}

/// A live calibration in progress.
#[derive(Debug)]
pub struct Collecting {
    req: CalibrateRequest,
    scores: Vec<f64>,
    first: Option<Instant>,
}

/// Fewest live scores a calibration is computed from.
pub const MIN_CALIBRATION_SCORES: u64 = 20;

impl Collecting {
    pub fn new(req: CalibrateRequest) -> Collecting {
        let cap = req.frames.unwrap_or(1000).min(100_000) as usize;
        Collecting { req, scores: Vec::with_capacity(cap), first: None }
    }

    /// Adds a score; true once the request is met.
    fn add(&mut self, raw: f64, at: Instant) -> bool {
        let first = *self.first.get_or_insert(at);
        self.scores.push(raw);
        let n = self.scores.len() as u64;
        let by_count = self.req.frames.is_some_and(|f| n >= f);
        let by_time = self.req.duration.is_some_and(|d| at.saturating_duration_since(first) >= d);
        by_count || (by_time && n >= MIN_CALIBRATION_SCORES)
    }
}

/// A kept alarm frame, for the operator's `feedback`.
#[derive(Debug, Clone)]
pub struct AlarmFrame {
    pub id: String,
    pub camera: String,
    pub ts: u64,
    pub seq: u64,
    pub peak: f64,
    pub peak_raw: f64,
    pub threshold: f64,
    pub kind: ScoreKind,
    /// The frame's ROI at full resolution.
    pub image: image::DynamicImage,
}

/// The ROIs of a camera's last `keep` alarm starts (oldest forgotten first).
/// Memory is bounded by `keep` frames; the inference thread copies a frame in
/// only when an alarm starts.
#[derive(Debug, Default)]
pub struct AlarmFrames {
    keep: usize,
    frames: Mutex<VecDeque<AlarmFrame>>,
}

impl AlarmFrames {
    pub fn new(keep: usize) -> AlarmFrames {
        AlarmFrames { keep, frames: Mutex::new(VecDeque::with_capacity(keep)) }
    }

    pub fn keep(&self) -> usize {
        self.keep
    }

    fn push(&self, f: AlarmFrame) {
        if self.keep == 0 {
            return;
        }
        let mut q = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        while q.len() >= self.keep {
            q.pop_front();
        }
        q.push_back(f);
    }

    /// Takes the frame of alarm `id` out (feedback is given once per alarm).
    pub fn take(&self, id: &str) -> Option<AlarmFrame> {
        let mut q = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        let i = q.iter().position(|f| f.id == id)?;
        q.remove(i)
    }

    /// Puts a taken frame back (its feedback could not be stored).
    pub fn put_back(&self, f: AlarmFrame) {
        self.push(f);
    }

    pub fn ids(&self) -> Vec<String> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.id.clone()).collect()
    }
}

/// A frame's heat map, asked for only when a snapshot or the live view draws
/// it: the scores' session may not produce it, and then it costs a run of
/// the model's map session for that frame (`infer::Model::heat_map`).
pub trait HeatMap {
    fn get(&mut self) -> &[f32];
}

impl HeatMap for &[f32] {
    fn get(&mut self) -> &[f32] {
        self
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
    /// The live calibration in progress, if any.
    pub collecting: Option<Collecting>,
    /// Frames of the last alarm starts, shared with the `feedback` handler.
    pub alarm_frames: Arc<AlarmFrames>,
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
    /// A triggered camera's scored frame (`raw`: its score, `None` when the
    /// run failed) for its shadow comparison: its frames skip [`act`](Self::act),
    /// where continuous cameras record theirs, so without this the shadow's
    /// halves would never be paired.
    pub fn compare_triggered(&self, seq: u64, raw: Option<f64>) {
        let (Some((compare, side)), Some(raw)) = (&self.compare, raw.filter(|r| r.is_finite())) else { return };
        let score = self.decider.calibration.normalize(raw);
        compare.record(*side, seq, score, score >= self.decider.threshold());
    }

    /// Carries out `outcome` for `frame`; `map` is the frame's anomaly map
    /// (`side × side`), taken only when a snapshot or the live view draws it;
    /// `passage`, where the frame was when, cuts its latency into stages.
    pub fn act(
        &mut self,
        outcome: Outcome,
        frame: Frame,
        map: &mut dyn HeatMap,
        side: usize,
        out: &Outputs,
        passage: Option<&Passage>,
    ) {
        match outcome {
            Outcome::Broken { raw } => {
                CameraCounters::add(&self.counters.broken, 1);
                tracing::debug!(camera = %self.name, seq = frame.seq, raw, "non-finite score: frame counted as broken");
            }
            Outcome::Scored { score, raw, alarm, drift } => {
                // One instant for the whole and its parts: they add up.
                let now = Instant::now();
                let latency_ms = now.saturating_duration_since(frame.captured).as_secs_f64() * 1000.0;
                self.counters.record_latency(latency_ms, passage.map(|p| stage_ms(frame.captured, p, now)));
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
                let started = alarm.as_ref().is_some_and(|ev| ev.kind == AlarmKind::Start);
                if let Some(ev) = alarm {
                    self.alarm(ev, &frame, map, side, out);
                }
                if let Some(live) = out.live {
                    live.offer(&self.name, &frame, map, side, score);
                }
                if let Some(d) = self.decider.drift.last() {
                    self.counters.set_drift_shift(d.shift);
                }
                if let Some(change) = drift {
                    self.publish_drift(*change, out);
                }
                self.collect(raw, started, frame.captured);
            }
        }
        let _ = self.recycle.try_send(frame.pixels);
    }

    /// Starts a live calibration, unless it cannot be one now.
    pub fn start_calibration(&mut self, req: CalibrateRequest) {
        // A triggered camera's scores go to the trigger thread, never through
        // `collect`: a calibration would wait for scores that never come, and
        // its verdicts are judged with the calibration it started with.
        let refuse = if self.trigger.is_some() {
            Some(format!(
                "camera {} is triggered: its verdicts keep the calibration it started with; calibrate it offline \
                 (`ganomalyd calibrate`) and restart",
                self.name
            ))
        } else if self.decider.alarm_active() {
            Some(format!(
                "an alarm is active on camera {}: calibrate only while the line runs good parts (after the alarm ends)",
                self.name
            ))
        } else if self.collecting.is_some() {
            Some(format!("a calibration of camera {} is already running", self.name))
        } else {
            None
        };
        match refuse {
            Some(reason) => {
                let _ = req.reply.try_send(CalibrateReply::Refused(reason));
            }
            None => {
                tracing::info!(camera = %self.name, frames = ?req.frames, duration = ?req.duration, "live calibration started");
                self.collecting = Some(Collecting::new(req));
            }
        }
    }

    /// One decided score for a calibration in progress; applies it once complete.
    fn collect(&mut self, raw: f64, alarm_started: bool, at: Instant) {
        let Some(c) = self.collecting.as_mut() else { return };
        if alarm_started {
            let reason = format!(
                "an alarm started on camera {} after {} good-part score(s): the calibration is given up, the threshold is unchanged",
                self.name,
                c.scores.len()
            );
            let _ = c.req.reply.try_send(CalibrateReply::Aborted(reason));
            self.collecting = None;
            return;
        }
        if !c.add(raw, at) {
            return;
        }
        let Some(c) = self.collecting.take() else { return };
        let after = normal_calibration(&c.scores, c.req.target_far, c.req.method);
        if !(after.threshold.is_finite() && after.max >= after.min) {
            let _ = c.req.reply.try_send(CalibrateReply::Aborted("the live scores gave no finite threshold".into()));
            return;
        }
        let before = self.decider.calibration.clone();
        self.decider.set_calibration(after.clone());
        tracing::info!(
            camera = %self.name, before = before.threshold, after = after.threshold, method = after.method.as_str(),
            scores = c.scores.len(), "live calibration applied"
        );
        let _ = c.req.reply.try_send(CalibrateReply::Done {
            kind: self.decider.kind,
            before: Box::new(before),
            after: Box::new(after),
            scores: c.scores.len(),
        });
    }

    fn publish_drift(&self, change: DriftChange, out: &Outputs) {
        let (state, r) = match change {
            DriftChange::Drifted(r) => ("drifted", r),
            DriftChange::Back(r) => ("normal", r),
        };
        tracing::warn!(camera = %self.name, state, shift = r.shift, median = r.median, "score drift");
        let mut ev = CommandEvent::spontaneous("drift", Some(&self.name), Status::Done);
        ev.detail.insert("state".into(), serde_json::json!(state));
        if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(r) {
            ev.detail.extend(m);
        }
        ev.detail.insert("score".into(), serde_json::json!(self.decider.kind.as_str()));
        out.publisher.event(&ev);
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

    fn alarm(&self, mut ev: AlarmEvent, frame: &Frame, map: &mut dyn HeatMap, side: usize, out: &Outputs) {
        let start = ev.kind == AlarmKind::Start;
        if start && self.alarm_frames.keep() > 0 {
            // Only the ROI is kept (what the model saw, at full resolution): a
            // ROI of a large frame costs a fraction of the whole frame.
            match crate::recording::crop(&frame.pixels, self.roi) {
                Ok(image) => self.alarm_frames.push(AlarmFrame {
                    id: ev.id.clone(),
                    camera: self.name.clone(),
                    ts: ev.ts,
                    seq: ev.seq,
                    peak: ev.peak,
                    peak_raw: ev.peak_raw,
                    threshold: self.decider.calibration.threshold,
                    kind: self.decider.kind,
                    image,
                }),
                Err(e) => tracing::debug!(camera = %self.name, error = %e, "alarm frame not kept for feedback"),
            }
        }
        if let (true, Some(q)) = (start, out.snapshots) {
            let name = crate::snapshot::file_name(ev.ts, &ev.id);
            let job = SnapshotJob {
                camera: self.name.clone(),
                alarm_id: ev.id.clone(),
                file_name: name.clone(),
                frame: frame.pixels.clone(),
                roi: self.roi,
                map: map.get().to_vec(),
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
        *T0.get_or_init(Instant::now) + Duration::from_millis(ms)
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
        assert_eq!(d.decide(0, 0, t(0), Some(2.0)), Outcome::Scored { score: 0.5, raw: 2.0, alarm: None, drift: None });
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

    /// A camera on the inference thread's side, with its frames' recycle queue.
    fn camera(keep: usize) -> (Camera, crossbeam_channel::Receiver<FrameData>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stats = ganomaly_core::calibrate::score_stats(&[1.0, 1.5, 2.0, 2.5, 3.0]);
        let cal = Calibration {
            threshold: 2.0,
            min: 1.0,
            max: 5.0,
            normal_stats: Some(stats),
            ..Calibration::uncalibrated()
        };
        let alarm =
            AlarmConfig { threshold: 0.5, clear_threshold: 0.4, min_frames: 2, clear_frames: 2, cooldown_ms: 0 };
        let cam = Camera {
            name: "cam".into(),
            decider: Decider::new("cam", ScoreKind::Recon, cal, alarm, 0).with_drift(50, 1.0),
            roi: None,
            counters: Arc::new(CameraCounters::default()),
            recycle: tx,
            compare: None,
            trigger: None,
            collecting: None,
            alarm_frames: Arc::new(AlarmFrames::new(keep)),
        };
        (cam, rx)
    }

    fn feed(cam: &mut Camera, seq: u64, raw: f32, out: &Outputs) {
        let mut pixels = FrameData::default();
        pixels.reshape(2, 2, crate::capture::PixelFormat::Gray8);
        let frame = Frame { camera: 0, seq, captured: t(seq), ts_ms: seq, pixels };
        let outcome = cam.decider.decide(seq, seq, t(seq), Some(raw));
        cam.act(outcome, frame, &mut &[0.0][..], 1, out, None);
    }

    fn request(frames: u64) -> (CalibrateRequest, crossbeam_channel::Receiver<CalibrateReply>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let req = CalibrateRequest {
            frames: Some(frames),
            duration: None,
            target_far: 0.05,
            method: CalibrationMethod::Conformal,
            reply: tx,
        };
        (req, rx)
    }

    #[test]
    fn a_live_calibration_applies_when_complete_and_gives_way_to_alarms() {
        let rec = crate::events::Recorder::default();
        let out = Outputs { publisher: &rec, snapshots: None, live: None };
        let (mut cam, _frames) = camera(2);
        // 20 good scores 1.00..1.19: conformal at 5 % takes the ⌈21 · 0.95⌉ = 20th.
        let (req, reply) = request(20);
        cam.start_calibration(req);
        for i in 0..20 {
            feed(&mut cam, i, 1.0 + i as f32 * 0.01, &out);
        }
        match reply.try_recv().expect("a reply") {
            CalibrateReply::Done { before, after, scores, .. } => {
                assert_eq!((before.threshold, scores), (2.0, 20));
                assert!((after.threshold - 1.19).abs() < 1e-6, "{}", after.threshold);
            }
            other => panic!("{other:?}"),
        }
        assert!((cam.decider.calibration.threshold - 1.19).abs() < 1e-6, "applied at once");
        assert!(cam.collecting.is_none());

        // An alarm during the collection gives it up; the threshold stays.
        let (req, reply) = request(100);
        cam.start_calibration(req);
        for i in 20..25 {
            feed(&mut cam, i, 9.0, &out);
        }
        assert!(matches!(reply.try_recv(), Ok(CalibrateReply::Aborted(r)) if r.contains("alarm started")));
        assert!((cam.decider.calibration.threshold - 1.19).abs() < 1e-6);
        // While the alarm is active, a calibration is refused.
        assert!(cam.decider.alarm_active());
        let (req, reply) = request(20);
        cam.start_calibration(req);
        assert!(matches!(reply.try_recv(), Ok(CalibrateReply::Refused(r)) if r.contains("alarm is active")));
        // Its frame was kept for feedback (2 at most).
        let ids = cam.alarm_frames.ids();
        assert_eq!(ids.len(), 1);
        assert!(cam.alarm_frames.take(&ids[0]).is_some() && cam.alarm_frames.take(&ids[0]).is_none(), "taken once");
    }

    #[test]
    fn a_triggered_cameras_scores_pair_with_its_shadows() {
        let (mut cam, _frames) = camera(0);
        let compare = Arc::new(ShadowCompare::new("shadow.onnx", Arc::default()));
        cam.compare = Some((compare.clone(), Side::Real));
        // raw 5.0 is the top of the calibration (normalised 1.0): above 0.5.
        cam.compare_triggered(7, Some(5.0));
        cam.compare_triggered(8, None);
        compare.record(Side::Shadow, 7, 0.9, true);
        compare.record(Side::Shadow, 8, 0.1, false);
        let st = compare.stats();
        assert_eq!((st.frames, st.both), (1, 1), "the scored frame is compared, the failed one is not");
    }

    #[test]
    fn a_live_calibration_of_a_triggered_camera_is_refused_at_once() {
        let (mut cam, _frames) = camera(0);
        let (scored, _rx) = crossbeam_channel::unbounded();
        cam.trigger = Some(scored);
        let (req, reply) = request(20);
        cam.start_calibration(req);
        assert!(matches!(reply.try_recv(), Ok(CalibrateReply::Refused(r)) if r.contains("triggered")));
        assert!(cam.collecting.is_none(), "nothing waits for scores that never come");
    }

    #[test]
    fn drift_is_published_on_the_events_topic_and_in_the_counters() {
        let rec = crate::events::Recorder::default();
        let out = Outputs { publisher: &rec, snapshots: None, live: None };
        let (mut cam, _frames) = camera(0);
        // Reference p50 2.0, p95 2.9: 1.95 is normal, 3.9 is two spreads off. The
        // alarm threshold is put out of reach (3.9 normalizes to 0.975), so that
        // the window is not emptied by alarm frames.
        cam.decider.reconfigure(AlarmConfig {
            threshold: 1.1,
            clear_threshold: 1.0,
            min_frames: 1,
            clear_frames: 1,
            cooldown_ms: 0,
        });
        for i in 0..100 {
            feed(&mut cam, i, 1.95, &out);
        }
        assert!(cam.counters.drift_shift().abs() < 0.2, "{}", cam.counters.drift_shift());
        for i in 100..200 {
            feed(&mut cam, i, 3.9, &out);
        }
        let drifts: Vec<_> = rec
            .events()
            .into_iter()
            .filter_map(|e| if let crate::events::Recorded::Event(e) = e { Some(e) } else { None })
            .filter(|e| e.command == "drift")
            .collect();
        assert_eq!(drifts.len(), 1, "{drifts:?}");
        assert_eq!((drifts[0].camera.as_deref(), drifts[0].detail["state"].as_str()), (Some("cam"), Some("drifted")));
        assert!(cam.counters.drift_shift() >= 1.0);
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
