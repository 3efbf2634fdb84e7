//! Triggered inspection: a verdict for every part a trigger names, within
//! the camera's deadline.
//!
//! ```text
//! camera thread ──tap (drop-oldest)──► trigger thread: ring buffer per camera
//!   cmd/trigger (MQTT, HTTP) ─intake─►   pending triggers, de-duplication, deadlines
//!                                          │ chosen frames (copies)            ▲ scores, maps
//!                                          ▼                                   │
//!                              camera queue ─► preprocess pool ─► inference thread (batched with the others)
//!                                          │
//!                                          └─► Publisher::verdict (outbox, durable), `done` answer, ng snapshot
//! ```
//! A triggered camera's frames go to the trigger thread, not to the model:
//! they wait in a ring buffer (`buffer_frames`), and only the frames that a
//! trigger chooses are scored, with the camera's preprocessing (ROI, resize),
//! model and score kind, on the model's inference thread. A triggered camera
//! publishes no `score` and no `alarm` messages: its answer is the verdict.
//!
//! [`Station`] is one camera's state, I/O-free: its methods take the time as
//! an argument and return [`Action`]s (send a frame to be scored, publish a
//! verdict, refuse a duplicate, give a buffer back), so every rule below is
//! unit-tested without threads. The thread ([`spawn`]) carries them out.
//!
//! # Always an answer within the deadline
//! Every trigger ends in exactly one verdict no later than `deadline_s` after
//! it arrived (the deadline timer is the select timeout of the thread; it
//! fires a little early, see [`timer`]):
//! camera offline → `error`; no room (`max_pending` waiting, or the camera's
//! scoring queue full) → `timeout` at once; frames not captured or not scored
//! in time → `timeout`; inference failure or a non-finite score → `error`.
//! A part id seen again (per camera, among the last `dedup_parts`) is answered
//! once: the repeat is refused (counted), its first verdict stands.
//!
//! # Backpressure
//! | edge | channel | when full |
//! | --- | --- | --- |
//! | camera → trigger thread | the camera's queue (`frame_queue`) | drop-oldest, counted (the ring keeps the newest) |
//! | trigger thread → preprocess | the camera's scoring queue, `max_pending × frames` | the trigger is answered `timeout` at once |
//! | inference → trigger thread | unbounded, but at most the frames sent for scoring | — |
//! | intake → trigger thread | `HANDLER_QUEUE` | the intake refuses (`busy`) |

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, TrySendError};
use ganomaly_core::{Calibration, ScoreKind};

use crate::capture::{Frame, FrameData};
use crate::commands::Command;
use crate::config::{CameraPlan, FramesFrom, Roi, TriggerSettings};
use crate::events::{now_ms, Publisher, Verdict, VerdictEvent, PAYLOAD_SCHEMA};
use crate::metrics::CameraCounters;
use crate::snapshot::{SnapshotJob, SnapshotQueue};
use crate::verdict::{self, judge};

/// Longest part id accepted: it becomes a row key and a CSV cell, and PLC
/// part numbers are tens of characters.
pub const MAX_PART_ID_BYTES: usize = 256;

/// A trigger as its sender meant it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub part_id: String,
    /// The trigger's time (ms since epoch) if sent.
    pub ts: Option<u64>,
}

/// Reads `{"part_id": "4711", "ts": 1700000000000}` (`part_id` a string or an
/// integer, `ts` optional, integer milliseconds since the epoch). The error
/// says what to send instead.
pub fn parse(body: &serde_json::Map<String, serde_json::Value>) -> Result<Trigger, String> {
    let part_id = match body.get("part_id") {
        None | Some(serde_json::Value::Null) => {
            return Err(
                "part_id is missing: send {\"part_id\": \"4711\"} (and optionally \"ts\": <ms since epoch>)".into()
            )
        }
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
        Some(_) => return Err("part_id must be a string or an integer".into()),
    };
    if part_id.trim().is_empty() {
        return Err("part_id is empty".into());
    }
    if part_id.len() > MAX_PART_ID_BYTES || part_id.chars().any(char::is_control) {
        return Err(format!("part_id must be at most {MAX_PART_ID_BYTES} bytes without control characters"));
    }
    let ts = match body.get("ts") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or("ts must be an integer: milliseconds since the Unix epoch")?),
    };
    Ok(Trigger { part_id, ts })
}

/// What decides a camera's verdicts, fixed at start: the model's sha256, the
/// score and its calibration, the threshold, the region of interest and the
/// trigger settings. `settings_digest` is the sha256 of [`canonical`] of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Judging {
    pub kind: ScoreKind,
    pub calibration: Calibration,
    /// Normalised threshold (the camera's `alarm.threshold`).
    pub threshold: f64,
    pub model_sha256: String,
    pub settings_digest: String,
}

impl Judging {
    pub fn new(plan: &CameraPlan, kind: ScoreKind, calibration: Calibration, model_sha256: &str) -> Judging {
        let threshold = plan.alarm.threshold;
        let text = canonical(plan, kind, &calibration, model_sha256);
        Judging {
            kind,
            calibration,
            threshold,
            model_sha256: model_sha256.to_string(),
            settings_digest: crate::base::digest::sha256_hex(text.as_bytes()),
        }
    }
}

/// The canonical text of what decides a camera's verdicts: one `key=value`
/// line per setting, keys sorted (documented in `docs/mqtt.md`). The source
/// and its address are left out: they say where frames come from, not how a
/// part is judged (and a camera URL can hold a password).
pub fn canonical(plan: &CameraPlan, kind: ScoreKind, cal: &Calibration, model_sha256: &str) -> String {
    let t = plan.mode.trigger().copied().unwrap_or_default();
    let roi = plan.roi.map_or("none".to_string(), |r| format!("{},{},{},{}", r.x, r.y, r.width, r.height));
    let mut lines = [
        format!("camera={}", plan.name),
        format!("model_sha256={model_sha256}"),
        format!("score_kind={}", kind.as_str()),
        format!("calibration.threshold={:e}", cal.threshold),
        format!("calibration.min={:e}", cal.min),
        format!("calibration.max={:e}", cal.max),
        format!("threshold={:e}", plan.alarm.threshold),
        format!("roi={roi}"),
        format!("trigger.frames={}", t.frames),
        format!("trigger.from={}", if t.from == FramesFrom::After { "after" } else { "nearest" }),
        format!("trigger.delay_ms={}", t.delay_ms),
        format!("trigger.aggregate={}", if t.aggregate == crate::config::Aggregate::Mean { "mean" } else { "max" }),
        format!("trigger.tolerance_ms={}", t.tolerance_ms),
    ];
    lines.sort();
    lines.join("\n") + "\n"
}

/// When a trigger's deadline timer fires, from its arrival: a little before
/// the deadline (5 ms, or a tenth of it if that is less), so that its verdict
/// is out by the deadline, not decided at it.
pub fn timer(deadline: Duration) -> Duration {
    deadline.saturating_sub(Duration::from_millis(5).min(deadline / 10))
}

/// A buffered frame.
#[derive(Debug)]
pub struct RingFrame {
    pub seq: u64,
    pub ts_ms: u64,
    pub captured: Instant,
    pub pixels: FrameData,
    /// Its score, once a trigger had it scored (raw, anomaly map).
    scored: Option<(Option<f64>, Vec<f32>)>,
}

impl RingFrame {
    pub fn new(seq: u64, ts_ms: u64, captured: Instant, pixels: FrameData) -> RingFrame {
        RingFrame { seq, ts_ms, captured, pixels, scored: None }
    }
}

/// A scored frame coming back from inference.
#[derive(Debug)]
pub struct Scored {
    /// Pipeline index of the camera.
    pub camera: usize,
    pub seq: u64,
    /// `None`: no usable output (see `error`).
    pub raw: Option<f64>,
    /// Why inference failed, if it did.
    pub error: Option<String>,
    pub pixels: FrameData,
    pub map: Vec<f32>,
}

/// A scored frame of a triggered camera, as the inference thread hands it over
/// (`maps`: the batch's anomaly maps, `i`: the frame's place in the batch).
pub fn scored(
    frame: Frame,
    result: &Result<(), crate::infer::InferError>,
    raw: Option<f32>,
    maps: &[f32],
    i: usize,
    side: usize,
) -> Scored {
    let (raw, error, map) = match result {
        Ok(()) => (
            raw.map(f64::from).filter(|r| r.is_finite()),
            raw.filter(|r| !r.is_finite()).map(|r| format!("non-finite score ({r})")),
            maps.get(i * side * side..(i + 1) * side * side).map(<[f32]>::to_vec).unwrap_or_default(),
        ),
        Err(e) => (None, Some(crate::base::report::chain(e)), Vec::new()),
    };
    Scored { camera: frame.camera, seq: frame.seq, raw, error, pixels: frame.pixels, map }
}

/// What the thread does for a [`Station`].
#[derive(Debug)]
pub enum Action<T> {
    /// Score this copy of a buffered frame.
    Score { seq: u64, ts_ms: u64, captured: Instant, pixels: FrameData },
    /// Publish this verdict and answer its trigger (`token`); `snapshot`: the
    /// worst frame and its anomaly map, for an `ng` part.
    Verdict { ev: Box<VerdictEvent>, token: Option<T>, snapshot: Option<(FrameData, Vec<f32>)> },
    /// A repeated part id: refuse the trigger (its first verdict stands).
    Duplicate { token: T, part_id: String, reason: String },
    /// A buffer the ring let go of.
    Recycle(FrameData),
}

struct Pending<T> {
    part_id: String,
    token: Option<T>,
    arrived: Instant,
    trigger_ts: u64,
    target_ts: u64,
    deadline: Instant,
    /// Frames chosen (seq, capture time), oldest first, and their scores once known.
    chosen: Vec<(u64, u64)>,
    scores: Vec<Option<Option<f64>>>,
    /// `nearest` chooses once; `after` fills up as frames come.
    settled: bool,
    /// The highest-scoring frame so far, for an `ng` snapshot.
    worst: Option<(f64, FrameData, Vec<f32>)>,
    error: Option<String>,
}

impl<T> Pending<T> {
    fn complete(&self, frames: usize) -> bool {
        self.chosen.len() >= frames && self.scores.iter().all(Option::is_some)
    }
}

/// Counts a station keeps (also mirrored into the camera's counters by the thread).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StationCounts {
    pub ok: u64,
    pub ng: u64,
    pub error: u64,
    pub timeout: u64,
    pub duplicates: u64,
}

/// One triggered camera's state: ring buffer, pending triggers, de-duplication.
pub struct Station<T> {
    pub name: String,
    settings: TriggerSettings,
    judging: Judging,
    ring: VecDeque<RingFrame>,
    pending: Vec<Pending<T>>,
    /// Frames sent to be scored whose result has not come back.
    in_flight: BTreeSet<u64>,
    /// Part ids answered or pending → their verdict number (0 while pending).
    seen: HashMap<String, u64>,
    seen_order: VecDeque<String>,
    /// The last verdict number given.
    seq: u64,
    pub counts: StationCounts,
}

impl<T> Station<T> {
    pub fn new(name: &str, settings: TriggerSettings, judging: Judging) -> Station<T> {
        Station {
            name: name.to_string(),
            settings,
            judging,
            ring: VecDeque::with_capacity(settings.buffer_frames + 1),
            pending: Vec::new(),
            in_flight: BTreeSet::new(),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            seq: 0,
            counts: StationCounts::default(),
        }
    }

    pub fn settings(&self) -> &TriggerSettings {
        &self.settings
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The earliest deadline of a pending trigger.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.deadline).min()
    }

    /// A trigger arrived at `arrived` (`now_ms`: the wall clock then);
    /// `online`: whether the camera delivers frames.
    pub fn on_trigger(
        &mut self,
        trig: Trigger,
        token: T,
        arrived: Instant,
        now_ms: u64,
        online: bool,
        out: &mut Vec<Action<T>>,
    ) {
        if let Some(&first) = self.seen.get(&trig.part_id) {
            self.counts.duplicates += 1;
            let reason = if first == 0 {
                format!("duplicate trigger: part `{}` is being judged; it is answered once", trig.part_id)
            } else {
                format!("duplicate trigger: part `{}` was answered already (verdict seq {first})", trig.part_id)
            };
            out.push(Action::Duplicate { token, part_id: trig.part_id, reason });
            return;
        }
        self.remember(&trig.part_id);
        let trigger_ts = trig.ts.unwrap_or(now_ms);
        let mut p = Pending {
            part_id: trig.part_id,
            token: Some(token),
            arrived,
            trigger_ts,
            target_ts: trigger_ts.saturating_add(self.settings.delay_ms),
            deadline: arrived + timer(self.settings.deadline),
            chosen: Vec::new(),
            scores: Vec::new(),
            settled: false,
            worst: None,
            error: None,
        };
        if !online {
            self.finish(p, Verdict::Error, Some("camera offline".into()), arrived, out);
            return;
        }
        if self.pending.len() >= self.settings.max_pending {
            let reason = format!("queue full: {} triggers of this camera are pending", self.pending.len());
            self.finish(p, Verdict::Timeout, Some(reason), arrived, out);
            return;
        }
        match self.progress(&mut p, now_ms, out) {
            Ok(()) if p.complete(self.settings.frames) => self.decide(p, arrived, out),
            Ok(()) => self.pending.push(p),
            Err((verdict, reason)) => self.finish(p, verdict, Some(reason), arrived, out),
        }
    }

    /// A frame from the camera: buffered, and offered to the waiting triggers.
    pub fn on_frame(&mut self, frame: RingFrame, now: Instant, now_ms: u64, out: &mut Vec<Action<T>>) {
        self.ring.push_back(frame);
        while self.ring.len() > self.settings.buffer_frames {
            if let Some(old) = self.ring.pop_front() {
                out.push(Action::Recycle(old.pixels));
            }
        }
        self.advance(now, now_ms, out);
    }

    /// A frame's score came back.
    pub fn on_scored(&mut self, s: Scored, now: Instant, out: &mut Vec<Action<T>>) {
        self.in_flight.remove(&s.seq);
        let raw = if s.error.is_some() { None } else { s.raw };
        if let Some(f) = self.ring.iter_mut().find(|f| f.seq == s.seq) {
            // A failed run is not cached: another trigger may try the frame again.
            if s.error.is_none() {
                f.scored = Some((raw, s.map.clone()));
            }
        }
        let mut pixels = Some(s.pixels);
        for p in &mut self.pending {
            let Some(i) = p.chosen.iter().position(|c| c.0 == s.seq) else { continue };
            if p.scores[i].is_some() {
                continue;
            }
            p.scores[i] = Some(raw);
            if let Some(e) = &s.error {
                p.error.get_or_insert_with(|| format!("inference failed: {e}"));
            }
            if let Some(r) = raw.filter(|r| p.worst.as_ref().is_none_or(|w| *r > w.0)) {
                let px = pixels.take().unwrap_or_default();
                p.worst = Some((r, px.clone(), s.map.clone()));
                pixels = Some(px);
            }
        }
        if let Some(px) = pixels {
            out.push(Action::Recycle(px));
        }
        self.decide_complete(now, out);
    }

    /// Deadlines: every trigger past its deadline is answered now (`timeout`,
    /// or `error` when the camera is offline).
    pub fn on_tick(&mut self, now: Instant, online: bool, out: &mut Vec<Action<T>>) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].deadline > now {
                i += 1;
                continue;
            }
            let p = self.pending.remove(i);
            let (verdict, reason) = if !online {
                (Verdict::Error, "camera offline".to_string())
            } else if p.chosen.len() < self.settings.frames {
                (
                    Verdict::Timeout,
                    format!("{} of {} frames captured by the deadline", p.chosen.len(), self.settings.frames),
                )
            } else {
                (Verdict::Timeout, "frames not scored by the deadline (inference behind)".to_string())
            };
            self.finish(p, verdict, Some(reason), now, out);
        }
        // Results that nobody waits for any more are not waited for either.
        let wanted: BTreeSet<u64> = self.pending.iter().flat_map(|p| p.chosen.iter().map(|c| c.0)).collect();
        self.in_flight.retain(|s| wanted.contains(s));
    }

    /// The camera stopped (shutdown): triggers still waiting for frames are
    /// answered `error`; those waiting only for scores keep their deadline.
    pub fn on_closed(&mut self, now: Instant, out: &mut Vec<Action<T>>) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].chosen.len() >= self.settings.frames {
                i += 1;
                continue;
            }
            let p = self.pending.remove(i);
            self.finish(p, Verdict::Error, Some("camera stopped (daemon shutting down)".into()), now, out);
        }
        for f in self.ring.drain(..) {
            out.push(Action::Recycle(f.pixels));
        }
    }

    /// Marks `part_id` seen; the window keeps the newest `dedup_parts` ids.
    fn remember(&mut self, part_id: &str) {
        self.seen.insert(part_id.to_string(), 0);
        self.seen_order.push_back(part_id.to_string());
        while self.seen_order.len() > self.settings.dedup_parts {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    /// Offers the buffer to every pending trigger; decides the complete ones.
    fn advance(&mut self, now: Instant, now_ms: u64, out: &mut Vec<Action<T>>) {
        for mut p in std::mem::take(&mut self.pending) {
            match self.progress(&mut p, now_ms, out) {
                Ok(()) => self.pending.push(p),
                Err((verdict, reason)) => self.finish(p, verdict, Some(reason), now, out),
            }
        }
        self.decide_complete(now, out);
    }

    fn decide_complete(&mut self, now: Instant, out: &mut Vec<Action<T>>) {
        // In arrival order among those complete now.
        let frames = self.settings.frames;
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].complete(frames) {
                done.push(self.pending.remove(i));
            } else {
                i += 1;
            }
        }
        for p in done {
            self.decide(p, now, out);
        }
    }

    /// Chooses frames for `p` from the buffer as far as it can; asks for
    /// their scores. Err: the part cannot be judged (verdict, reason).
    fn progress(&mut self, p: &mut Pending<T>, now_ms: u64, out: &mut Vec<Action<T>>) -> Result<(), (Verdict, String)> {
        if p.settled {
            return Ok(());
        }
        let n = self.settings.frames;
        let picked: Vec<usize> = match self.settings.from {
            FramesFrom::Nearest => {
                let newest = self.ring.back().map(|f| f.ts_ms);
                // Frames captured after the trigger is handled are not waited
                // for, unless the target time is still ahead (a delay).
                let ready = newest.is_some_and(|t| t >= p.target_ts) || (newest.is_some() && now_ms >= p.target_ts);
                if !ready {
                    return Ok(());
                }
                let ts: Vec<u64> = self.ring.iter().map(|f| f.ts_ms).collect();
                let picked = verdict::nearest(&ts, p.target_ts, n);
                let far = picked.iter().map(|&i| ts[i].abs_diff(p.target_ts)).max().unwrap_or(0);
                if far > self.settings.tolerance_ms {
                    return Err((
                        Verdict::Error,
                        format!(
                            "no frame within tolerance_s of the trigger time: the nearest buffered frame{} {far} ms away",
                            if n > 1 { "s are up to" } else { " is" }
                        ),
                    ));
                }
                p.settled = true;
                picked
            }
            FramesFrom::After => {
                let from = p.chosen.last().map_or(p.target_ts, |c| c.1.saturating_add(1));
                let ts: Vec<u64> = self.ring.iter().map(|f| f.ts_ms).collect();
                let taken: BTreeSet<u64> = p.chosen.iter().map(|c| c.0).collect();
                let picked: Vec<usize> = verdict::after(&ts, from, n - p.chosen.len())
                    .into_iter()
                    .filter(|&i| !taken.contains(&self.ring[i].seq))
                    .collect();
                if p.chosen.len() + picked.len() >= n {
                    p.settled = true;
                }
                picked
            }
        };
        for i in picked {
            let f = &self.ring[i];
            p.chosen.push((f.seq, f.ts_ms));
            match &f.scored {
                Some((raw, map)) => {
                    p.scores.push(Some(*raw));
                    if let Some(r) = raw.filter(|r| p.worst.as_ref().is_none_or(|w| *r > w.0)) {
                        p.worst = Some((r, f.pixels.clone(), map.clone()));
                    }
                }
                None => {
                    p.scores.push(None);
                    if self.in_flight.insert(f.seq) {
                        out.push(Action::Score {
                            seq: f.seq,
                            ts_ms: f.ts_ms,
                            captured: f.captured,
                            pixels: f.pixels.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The scoring queue refused frame `seq`: triggers waiting for it are
    /// answered `timeout` now (a full queue means inference is behind).
    pub fn not_sent(&mut self, seq: u64, now: Instant, out: &mut Vec<Action<T>>) {
        self.in_flight.remove(&seq);
        let mut i = 0;
        while i < self.pending.len() {
            let waits =
                self.pending[i].chosen.iter().zip(&self.pending[i].scores).any(|(c, s)| c.0 == seq && s.is_none());
            if !waits {
                i += 1;
                continue;
            }
            let p = self.pending.remove(i);
            self.finish(
                p,
                Verdict::Timeout,
                Some("queue full: the camera's scoring queue has no room".into()),
                now,
                out,
            );
        }
    }

    fn decide(&mut self, p: Pending<T>, now: Instant, out: &mut Vec<Action<T>>) {
        if let Some(e) = p.error.clone() {
            return self.finish(p, Verdict::Error, Some(e), now, out);
        }
        let raws: Vec<Option<f64>> = p.scores.iter().map(|s| s.flatten()).collect();
        let j = judge(&raws, self.settings.aggregate, &self.judging.calibration, self.judging.threshold);
        let mut p = p;
        let snapshot = if j.verdict == Verdict::Ng { p.worst.take().map(|w| (w.1, w.2)) } else { None };
        let (verdict, reason, score, raw) = (j.verdict, j.reason, j.score, j.raw);
        let ev = self.event(&p, verdict, reason, score, raw, now);
        self.record(&ev);
        out.push(Action::Verdict { ev: Box::new(ev), token: p.token, snapshot });
    }

    /// A verdict without a judgement (`error`, `timeout`).
    fn finish(
        &mut self,
        mut p: Pending<T>,
        verdict: Verdict,
        reason: Option<String>,
        now: Instant,
        out: &mut Vec<Action<T>>,
    ) {
        let ev = self.event(&p, verdict, reason, None, None, now);
        self.record(&ev);
        out.push(Action::Verdict { ev: Box::new(ev), token: p.token.take(), snapshot: None });
    }

    fn record(&mut self, ev: &VerdictEvent) {
        if let Some(s) = self.seen.get_mut(&ev.part_id) {
            *s = ev.seq;
        }
        match ev.verdict {
            Verdict::Ok => self.counts.ok += 1,
            Verdict::Ng => self.counts.ng += 1,
            Verdict::Error => self.counts.error += 1,
            Verdict::Timeout => self.counts.timeout += 1,
        }
    }

    fn event(
        &mut self,
        p: &Pending<T>,
        verdict: Verdict,
        reason: Option<String>,
        score: Option<f64>,
        raw: Option<f64>,
        now: Instant,
    ) -> VerdictEvent {
        self.seq += 1;
        let j = &self.judging;
        let judged = score.is_some();
        VerdictEvent {
            schema: PAYLOAD_SCHEMA,
            camera: self.name.clone(),
            part_id: p.part_id.clone(),
            verdict,
            seq: self.seq,
            ts: now_ms(),
            trigger_ts: p.trigger_ts,
            latency_ms: now.saturating_duration_since(p.arrived).as_secs_f64() * 1000.0,
            score,
            raw_score: raw,
            threshold: Some(verdict::raw_threshold(&j.calibration, j.threshold)),
            threshold_score: Some(j.threshold),
            kind: Some(j.kind.as_str().to_string()),
            model_sha256: Some(j.model_sha256.clone()),
            settings_digest: Some(j.settings_digest.clone()),
            frame_ts: if judged { p.chosen.iter().map(|c| c.1).collect() } else { Vec::new() },
            frame_seq: if judged { p.chosen.iter().map(|c| c.0).collect() } else { Vec::new() },
            snapshot: None,
            reason,
        }
    }
}

/// One triggered camera as the thread runs it.
pub struct TriggerCamera {
    /// Pipeline index of the camera (what [`Scored::camera`] names).
    pub index: usize,
    pub station: Station<Command>,
    /// Frames from the camera thread.
    pub tap: Receiver<Frame>,
    /// The camera's queue to the preprocess pool; dropped once the camera
    /// stopped and nothing is in flight, so that the pool can end.
    pub scoring: Option<Sender<Frame>>,
    pub counters: Arc<CameraCounters>,
    /// Where ring buffers go back to the camera thread.
    pub recycle: Sender<FrameData>,
    pub roi: Option<Roi>,
    /// Side of the model's anomaly map (for snapshots).
    pub side: usize,
}

/// The trigger thread's inputs and outputs.
pub struct TriggerThread {
    pub cameras: Vec<TriggerCamera>,
    /// Cameras that take no triggers (continuous), for the refusal's wording.
    pub continuous: BTreeSet<String>,
    /// `trigger` commands from the intake; `None`: no intake (bench, tests).
    pub commands: Option<Receiver<Command>>,
    /// Frames scored by the inference threads.
    pub scored: Receiver<Scored>,
    pub publisher: Arc<dyn Publisher>,
    pub snapshots: Option<SnapshotQueue>,
    /// Set by `Pipeline::join` once the camera threads have ended.
    pub cameras_done: Arc<AtomicBool>,
}

/// Starts the trigger thread. It ends once the camera threads have ended and
/// every trigger has been answered.
pub fn spawn(t: TriggerThread) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("trigger".into()).spawn(move || run(t))
}

/// The longest the thread sleeps without looking at the stop flag.
const IDLE_WAKE: Duration = Duration::from_millis(200);

fn run(mut t: TriggerThread) {
    let mut out: Vec<Action<Command>> = Vec::new();
    let mut open: Vec<bool> = vec![true; t.cameras.len()];
    // Closed once every inference thread has ended (or none holds a sender).
    let mut scored_open = true;
    loop {
        let now = Instant::now();
        for (i, c) in t.cameras.iter_mut().enumerate() {
            c.station.on_tick(now, c.counters.online.load(Ordering::Relaxed), &mut out);
            carry_out(&t.publisher, &t.snapshots, c, &mut out);
            // The camera stopped and nothing is in flight: let the pool end.
            if !open[i] && c.station.in_flight() == 0 && c.station.pending() == 0 {
                c.scoring = None;
            }
        }
        let done = t.cameras_done.load(Ordering::Relaxed);
        let idle = t.cameras.iter().all(|c| c.station.pending() == 0 && c.station.in_flight() == 0);
        if done && open.iter().all(|o| !o) && idle {
            break;
        }
        let next = t.cameras.iter().filter_map(|c| c.station.next_deadline()).min();
        let wait = next.map_or(IDLE_WAKE, |d| d.saturating_duration_since(now).min(IDLE_WAKE));

        let got = {
            let mut sel = Select::new();
            let cmd_op = t.commands.as_ref().map(|rx| sel.recv(rx));
            let scored_op = if scored_open { sel.recv(&t.scored) } else { usize::MAX };
            let taps: Vec<(usize, usize)> =
                t.cameras.iter().enumerate().filter(|(i, _)| open[*i]).map(|(i, c)| (sel.recv(&c.tap), i)).collect();
            let Ok(op) = sel.select_timeout(wait) else { continue };
            let index = op.index();
            match (t.commands.as_ref(), taps.iter().find(|(o, _)| *o == index)) {
                (Some(rx), _) if Some(index) == cmd_op => Got::Command(op.recv(rx).ok()),
                _ if index == scored_op => Got::Scored(op.recv(&t.scored).ok()),
                (_, Some(&(_, i))) => Got::Frame(i, op.recv(&t.cameras[i].tap).ok()),
                // Unreachable: every operation registered is matched above.
                _ => continue,
            }
        };
        match got {
            Got::Command(Some(cmd)) => on_command(&mut t, cmd, &mut out),
            // The intake is gone: no more triggers come.
            Got::Command(None) => t.commands = None,
            Got::Scored(Some(s)) => {
                if let Some(c) = t.cameras.iter_mut().find(|c| c.index == s.camera) {
                    CameraCounters::add(&c.counters.decided, u64::from(s.raw.is_some() && s.error.is_none()));
                    c.station.on_scored(s, Instant::now(), &mut out);
                    carry_out(&t.publisher, &t.snapshots, c, &mut out);
                }
            }
            Got::Scored(None) => scored_open = false,
            Got::Frame(i, frame) => {
                let c = &mut t.cameras[i];
                match frame {
                    Some(f) => {
                        let ring = RingFrame::new(f.seq, f.ts_ms, f.captured, f.pixels);
                        c.station.on_frame(ring, Instant::now(), now_ms(), &mut out);
                    }
                    None => {
                        open[i] = false;
                        c.station.on_closed(Instant::now(), &mut out);
                    }
                }
                carry_out(&t.publisher, &t.snapshots, c, &mut out);
            }
        }
    }
    tracing::info!("trigger thread stopped");
}

/// What one wait of the thread brought.
enum Got {
    Command(Option<Command>),
    Scored(Option<Scored>),
    Frame(usize, Option<Frame>),
}

fn on_command(t: &mut TriggerThread, cmd: Command, out: &mut Vec<Action<Command>>) {
    let Some(camera) = cmd.camera.clone() else {
        cmd.refuse("`trigger` is a camera command");
        return;
    };
    let Some(c) = t.cameras.iter_mut().find(|c| c.station.name == camera) else {
        let why = if t.continuous.contains(&camera) {
            format!("camera `{camera}` is continuous: set [cameras.{camera}] mode = \"triggered\" to judge parts on a trigger")
        } else {
            format!("unknown camera `{camera}`")
        };
        cmd.refuse(why);
        return;
    };
    let trig = match parse(&cmd.body) {
        Ok(trig) => trig,
        Err(why) => {
            CameraCounters::add(&c.counters.triggers_refused, 1);
            cmd.refuse(why);
            return;
        }
    };
    let (arrived, arrived_ms) = (cmd.received, cmd.received_ms);
    let online = c.counters.online.load(Ordering::Relaxed);
    c.station.on_trigger(trig, cmd, arrived, arrived_ms, online, out);
    carry_out(&t.publisher, &t.snapshots, c, out);
}

/// Carries out a station's actions.
fn carry_out(
    publisher: &Arc<dyn Publisher>,
    snapshots: &Option<SnapshotQueue>,
    c: &mut TriggerCamera,
    out: &mut Vec<Action<Command>>,
) {
    // Sending may fail and add actions: loop until none are left.
    while !out.is_empty() {
        for a in std::mem::take(out) {
            match a {
                Action::Score { seq, ts_ms, captured, pixels } => {
                    let frame = Frame { camera: c.index, seq, captured, ts_ms, pixels };
                    let sent = match &c.scoring {
                        Some(tx) => match tx.try_send(frame) {
                            Ok(()) => true,
                            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
                        },
                        None => false,
                    };
                    if !sent {
                        c.station.not_sent(seq, Instant::now(), out);
                    }
                }
                Action::Verdict { mut ev, token, snapshot } => {
                    if let (Some((frame, map)), Some(q)) = (snapshot, snapshots) {
                        // The id has the snapshot writer's `<camera>-<digits>-<digits>` shape.
                        let id = format!("{}-{}-{}", ev.camera, ev.trigger_ts, ev.seq);
                        let name = crate::snapshot::file_name(ev.ts, &id);
                        let job = SnapshotJob {
                            camera: ev.camera.clone(),
                            alarm_id: id,
                            file_name: name.clone(),
                            frame,
                            roi: c.roi,
                            map,
                            side: c.side,
                        };
                        if q.offer(job) {
                            ev.snapshot = Some(name);
                        }
                    }
                    let counter = match ev.verdict {
                        Verdict::Ok => &c.counters.verdicts_ok,
                        Verdict::Ng => &c.counters.verdicts_ng,
                        Verdict::Error => &c.counters.verdicts_error,
                        Verdict::Timeout => &c.counters.verdicts_timeout,
                    };
                    CameraCounters::add(counter, 1);
                    tracing::debug!(
                        camera = %ev.camera, part_id = %ev.part_id, verdict = ?ev.verdict, seq = ev.seq,
                        latency_ms = ev.latency_ms, reason = ev.reason.as_deref().unwrap_or(""), "verdict"
                    );
                    publisher.verdict(&ev);
                    if let Some(cmd) = token {
                        let detail = match serde_json::to_value(&*ev) {
                            Ok(serde_json::Value::Object(m)) => m,
                            _ => serde_json::Map::new(),
                        };
                        cmd.done(detail);
                    }
                }
                Action::Duplicate { token, part_id, reason } => {
                    CameraCounters::add(&c.counters.triggers_duplicate, 1);
                    tracing::info!(camera = %c.station.name, part_id, "duplicate trigger refused");
                    token.refuse(reason);
                }
                Action::Recycle(px) => {
                    let _ = c.recycle.try_send(px);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Aggregate;

    fn judging() -> Judging {
        Judging {
            kind: ScoreKind::Recon,
            calibration: Calibration { threshold: 2.0, min: 1.0, max: 5.0, ..Calibration::uncalibrated() },
            threshold: 0.5,
            model_sha256: "ab".repeat(32),
            settings_digest: "cd".repeat(32),
        }
    }

    fn station(s: TriggerSettings) -> Station<u32> {
        Station::new("cam", s, judging())
    }

    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    fn at(ms: u64) -> Instant {
        t0() + Duration::from_millis(ms)
    }

    fn frame(seq: u64, ts: u64) -> RingFrame {
        RingFrame::new(seq, ts, at(ts), FrameData::default())
    }

    fn trig(id: &str, ts: Option<u64>) -> Trigger {
        Trigger { part_id: id.into(), ts }
    }

    fn scored(seq: u64, raw: f64) -> Scored {
        Scored { camera: 0, seq, raw: Some(raw), error: None, pixels: FrameData::default(), map: vec![0.0; 4] }
    }

    fn sent(out: &[Action<u32>]) -> Vec<u64> {
        out.iter().filter_map(|a| if let Action::Score { seq, .. } = a { Some(*seq) } else { None }).collect()
    }

    fn verdicts(out: &mut Vec<Action<u32>>) -> Vec<VerdictEvent> {
        out.drain(..).filter_map(|a| if let Action::Verdict { ev, .. } = a { Some(*ev) } else { None }).collect()
    }

    #[test]
    fn nearest_scores_the_buffered_frame_nearest_the_trigger_time_and_judges_it() {
        let mut s = station(TriggerSettings::default());
        let mut out = Vec::new();
        for (seq, ts) in [(1, 100), (2, 200), (3, 300)] {
            s.on_frame(frame(seq, ts), at(ts), ts, &mut out);
        }
        out.clear();
        s.on_trigger(trig("p1", Some(210)), 7, at(320), 320, true, &mut out);
        assert_eq!(sent(&out), [2]);
        out.clear();
        s.on_scored(scored(2, 3.0), at(325), &mut out);
        let v = verdicts(&mut out);
        assert_eq!(v.len(), 1);
        let v = &v[0];
        assert_eq!((v.verdict, v.seq, v.part_id.as_str(), v.trigger_ts), (Verdict::Ng, 1, "p1", 210));
        assert_eq!((v.frame_ts.as_slice(), v.frame_seq.as_slice()), ([200u64].as_slice(), [2u64].as_slice()));
        assert!((v.latency_ms - 5.0).abs() < 1e-6, "{}", v.latency_ms);
        assert_eq!((v.raw_score, v.threshold), (Some(3.0), Some(2.0)));
        assert_eq!(s.counts, StationCounts { ng: 1, ..StationCounts::default() });
    }

    #[test]
    fn after_waits_for_the_next_frames_past_the_delay_and_aggregates_them() {
        let settings = TriggerSettings {
            frames: 2,
            from: FramesFrom::After,
            delay_ms: 50,
            aggregate: Aggregate::Mean,
            ..TriggerSettings::default()
        };
        let mut s = station(settings);
        let mut out = Vec::new();
        s.on_frame(frame(1, 100), at(100), 100, &mut out);
        s.on_trigger(trig("p", Some(100)), 1, at(101), 101, true, &mut out);
        assert!(sent(&out).is_empty(), "frame 1 is before trigger + delay");
        for (seq, ts) in [(2, 140), (3, 160), (4, 180), (5, 200)] {
            s.on_frame(frame(seq, ts), at(ts), ts, &mut out);
        }
        assert_eq!(sent(&out), [3, 4], "the first two frames at or after 150 ms");
        out.clear();
        s.on_scored(scored(4, 1.0), at(210), &mut out);
        assert!(verdicts(&mut out).is_empty(), "one score of two");
        s.on_scored(scored(3, 2.0), at(211), &mut out);
        let v = verdicts(&mut out);
        assert_eq!((v[0].verdict, v[0].raw_score), (Verdict::Ok, Some(1.5)));
        assert_eq!(v[0].frame_ts, [160, 180]);
    }

    #[test]
    fn every_trigger_is_answered_by_its_deadline() {
        let mut s = station(TriggerSettings { from: FramesFrom::After, ..TriggerSettings::default() });
        let mut out = Vec::new();
        s.on_trigger(trig("late", Some(0)), 1, at(0), 0, true, &mut out);
        s.on_tick(at(494), true, &mut out);
        assert!(verdicts(&mut out).is_empty());
        assert_eq!(s.next_deadline(), Some(at(495)), "5 ms before the 500 ms deadline");
        assert_eq!(timer(Duration::from_millis(20)), Duration::from_millis(18), "a tenth of a short deadline");
        s.on_tick(at(495), true, &mut out);
        let v = verdicts(&mut out);
        assert_eq!(v[0].verdict, Verdict::Timeout);
        assert!(v[0].reason.as_deref().unwrap().contains("0 of 1 frames"), "{:?}", v[0].reason);
        // A frame chosen but never scored: timeout too, saying so.
        s.on_frame(frame(1, 600), at(600), 600, &mut out);
        s.on_trigger(trig("slow", Some(600)), 2, at(600), 600, true, &mut out);
        assert_eq!(sent(&out), [1]);
        out.clear();
        s.on_tick(at(1100), true, &mut out);
        let v = verdicts(&mut out);
        assert_eq!((v[0].verdict, v[0].seq), (Verdict::Timeout, 2));
        assert!(v[0].reason.as_deref().unwrap().contains("not scored"), "{:?}", v[0].reason);
        assert_eq!(s.in_flight(), 0, "nobody waits for the late score any more");
        // The late score arrives: no second verdict for the part.
        s.on_scored(scored(1, 9.0), at(1200), &mut out);
        assert!(verdicts(&mut out).is_empty());
    }

    #[test]
    fn offline_full_and_far_away_are_answered_at_once() {
        let mut s = station(TriggerSettings { max_pending: 1, from: FramesFrom::After, ..TriggerSettings::default() });
        let mut out = Vec::new();
        s.on_trigger(trig("off", None), 1, at(0), 0, false, &mut out);
        s.on_trigger(trig("a", Some(10)), 2, at(0), 0, true, &mut out);
        s.on_trigger(trig("b", Some(10)), 3, at(0), 0, true, &mut out);
        let v = verdicts(&mut out);
        assert_eq!(
            v.iter().map(|v| (v.part_id.as_str(), v.verdict)).collect::<Vec<_>>(),
            [("off", Verdict::Error), ("b", Verdict::Timeout)]
        );
        assert_eq!(v[0].reason.as_deref(), Some("camera offline"));
        assert!(v[1].reason.as_deref().unwrap().starts_with("queue full"));

        let mut s = station(TriggerSettings { tolerance_ms: 100, ..TriggerSettings::default() });
        s.on_frame(frame(1, 1000), at(1000), 1000, &mut out);
        out.clear();
        s.on_trigger(trig("stale", Some(5000)), 1, at(5000), 5000, true, &mut out);
        let v = verdicts(&mut out);
        assert_eq!(v[0].verdict, Verdict::Error);
        assert!(v[0].reason.as_deref().unwrap().contains("4000 ms away"), "{:?}", v[0].reason);
    }

    #[test]
    fn a_part_id_is_answered_once_and_repeats_are_counted() {
        let mut s = station(TriggerSettings { dedup_parts: 2, ..TriggerSettings::default() });
        let mut out = Vec::new();
        s.on_frame(frame(1, 100), at(100), 100, &mut out);
        out.clear();
        s.on_trigger(trig("p1", Some(100)), 1, at(100), 100, true, &mut out);
        s.on_trigger(trig("p1", Some(100)), 2, at(100), 100, true, &mut out);
        assert!(matches!(&out[1], Action::Duplicate { token: 2, reason, .. } if reason.contains("being judged")));
        assert_eq!(sent(&out), [1], "scored once");
        out.clear();
        s.on_scored(scored(1, 1.0), at(101), &mut out);
        assert_eq!(verdicts(&mut out).len(), 1);
        s.on_trigger(trig("p1", None), 3, at(102), 102, true, &mut out);
        assert!(matches!(&out[0], Action::Duplicate { reason, .. } if reason.contains("verdict seq 1")));
        // The same frame judges another part from its cached score: no new inference.
        out.clear();
        s.on_trigger(trig("p2", Some(100)), 4, at(103), 103, true, &mut out);
        assert!(sent(&out).is_empty());
        assert_eq!(verdicts(&mut out)[0].seq, 2);
        // Beyond the window the oldest id is forgotten.
        s.on_trigger(trig("p3", Some(100)), 5, at(104), 104, true, &mut out);
        out.clear();
        s.on_trigger(trig("p1", Some(100)), 6, at(105), 105, true, &mut out);
        assert_eq!(verdicts(&mut out).len(), 1, "p1 left the window of 2");
        assert_eq!(s.counts.duplicates, 2);
    }

    #[test]
    fn inference_failure_and_a_full_queue_give_error_and_timeout() {
        let mut s = station(TriggerSettings::default());
        let mut out = Vec::new();
        s.on_frame(frame(1, 100), at(100), 100, &mut out);
        s.on_trigger(trig("p", Some(100)), 1, at(100), 100, true, &mut out);
        out.clear();
        let failed = Scored { error: Some("boom".into()), raw: None, ..scored(1, 0.0) };
        s.on_scored(failed, at(101), &mut out);
        let v = verdicts(&mut out);
        assert_eq!(v[0].verdict, Verdict::Error);
        assert!(v[0].reason.as_deref().unwrap().contains("boom"));
        s.on_trigger(trig("q", Some(100)), 2, at(102), 102, true, &mut out);
        assert_eq!(sent(&out), [1], "a failed run is not cached: tried again");
        out.clear();
        s.not_sent(1, at(103), &mut out);
        let v = verdicts(&mut out);
        assert_eq!(v[0].verdict, Verdict::Timeout);
        assert!(v[0].reason.as_deref().unwrap().contains("queue full"));
    }

    #[test]
    fn the_ring_keeps_the_newest_frames_and_gives_buffers_back() {
        let mut s = station(TriggerSettings { buffer_frames: 2, ..TriggerSettings::default() });
        let mut out = Vec::new();
        for seq in 0..5 {
            s.on_frame(frame(seq, seq * 10), at(seq * 10), seq * 10, &mut out);
        }
        assert_eq!(out.iter().filter(|a| matches!(a, Action::Recycle(_))).count(), 3);
        assert_eq!(s.ring.iter().map(|f| f.seq).collect::<Vec<_>>(), [3, 4]);
    }

    #[test]
    fn triggers_are_parsed_with_reasons_for_bad_ones() {
        let body = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert_eq!(parse(&body(serde_json::json!({"part_id": "4711", "ts": 5}))), Ok(trig("4711", Some(5))));
        assert_eq!(parse(&body(serde_json::json!({"part_id": 4711}))), Ok(trig("4711", None)));
        for (b, want) in [
            (serde_json::json!({}), "part_id is missing"),
            (serde_json::json!({"part_id": ""}), "empty"),
            (serde_json::json!({"part_id": [1]}), "string or an integer"),
            (serde_json::json!({"part_id": "a\nb"}), "control"),
            (serde_json::json!({"part_id": "x".repeat(300)}), "256 bytes"),
            (serde_json::json!({"part_id": "a", "ts": -5}), "ts must be"),
            (serde_json::json!({"part_id": "a", "ts": "now"}), "ts must be"),
        ] {
            let e = parse(&body(b.clone())).expect_err("refused");
            assert!(e.contains(want), "{b}: {e}");
        }
    }

    #[test]
    fn the_settings_digest_changes_with_what_judges_a_part_only() {
        let text = format!(
            "[defaults]\nmodel = \"{}\"\nsource = {{ kind = \"synthetic\" }}\nmode = \"triggered\"\n[commands]\nenabled = true\n[cameras.a]\n",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx").display()
        );
        let s = crate::config::compile_str(&text, std::path::Path::new("/")).expect("compiles");
        let plan = &s.cameras[0];
        let cal = Calibration::uncalibrated();
        let base = Judging::new(plan, ScoreKind::Recon, cal.clone(), "00");
        assert_eq!(base.settings_digest.len(), 64);
        assert_eq!(base.settings_digest, Judging::new(plan, ScoreKind::Recon, cal.clone(), "00").settings_digest);
        let mut other = plan.clone();
        other.fps = 99.0;
        assert_eq!(
            Judging::new(&other, ScoreKind::Recon, cal.clone(), "00").settings_digest,
            base.settings_digest,
            "pacing does not judge"
        );
        other.alarm.threshold = 0.7;
        assert_ne!(Judging::new(&other, ScoreKind::Recon, cal.clone(), "00").settings_digest, base.settings_digest);
        assert_ne!(Judging::new(plan, ScoreKind::Latent, cal.clone(), "00").settings_digest, base.settings_digest);
        assert_ne!(Judging::new(plan, ScoreKind::Recon, cal, "01").settings_digest, base.settings_digest);
        assert!(canonical(plan, ScoreKind::Recon, &Calibration::uncalibrated(), "00").contains("trigger.frames=1\n"));
    }
}
