//! What the frame path tells the outside world: scores, alarm events, camera
//! status, snapshots and stats, and the [`Publisher`] trait they go through.
//!
//! The pipeline calls a `Publisher` from its own threads, so every method must
//! return quickly and never wait on the network: the MQTT implementation queues
//! (scores may be dropped under pressure and counted; alarms are written to the
//! durable outbox first and never dropped).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Version of the JSON payloads below; bumped on any incompatible change.
pub const PAYLOAD_SCHEMA: u32 = 1;

/// Milliseconds since the Unix epoch (what every payload's `ts` carries).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// One scored frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreEvent {
    pub schema: u32,
    pub camera: String,
    /// Frame sequence number of this camera (gaps mean drops).
    pub seq: u64,
    /// Capture time, ms since epoch.
    pub ts: u64,
    /// Normalized score in [0, 1]; the calibrated threshold maps to 0.5.
    pub score: f64,
    pub raw_score: f64,
    /// Raw-score threshold in force for this camera.
    pub threshold: f64,
    /// Which model score this is (`latent`, `recon`, `map_max`, `mahalanobis`).
    pub kind: String,
    /// Capture → alarm decision.
    pub latency_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmKind {
    Start,
    End,
}

/// Why an alarm ended (`end` events only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// Its frames fell below the clear threshold for `clear_frames` frames.
    Cleared,
    /// The daemon stopped cleanly while the alarm was active: whether the
    /// part is still anomalous is unknown from here on.
    Shutdown,
    /// The daemon found the alarm still open when it started again (it died
    /// during the alarm: crash, power cut, kill -9).
    Restart,
    /// A reload removed the camera, or restarted it (its source, frame size,
    /// ROI or pacing changed: a new view), or replaced or removed the shadow
    /// model whose alarm this was. See `reload.rs`.
    Reload,
}

/// An alarm start or end. `id` is shared by the start and end of one alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmEvent {
    pub schema: u32,
    pub id: String,
    pub camera: String,
    #[serde(rename = "type")]
    pub kind: AlarmKind,
    /// Time of this event, ms since epoch.
    pub ts: u64,
    /// When the alarm started (first frame of the run that raised it).
    pub start_ts: u64,
    /// When it ended (`end` events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ts: Option<u64>,
    /// Peak normalized / raw score so far.
    pub peak: f64,
    pub peak_raw: f64,
    /// Frames at or above the threshold counted so far.
    pub frames: u64,
    /// Frame seq numbers of the first frame and of this event's frame.
    pub first_seq: u64,
    pub seq: u64,
    /// Snapshot file written for this alarm, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Why it ended (`end` events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<EndReason>,
}

/// A JPEG of the frame that raised an alarm, with the anomaly map overlaid.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub camera: String,
    pub alarm_id: String,
    pub jpeg: Vec<u8>,
}

/// What a triggered inspection concluded about one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Scored below the threshold.
    Ok,
    /// Scored at or above the threshold: not good.
    Ng,
    /// Could not be judged: camera offline, model failure, unusable score.
    Error,
    /// Not judged within the camera's deadline (queue full, model too slow).
    Timeout,
}

/// The answer for one triggered part, on `<camera>/verdict` (durable, like alarms).
/// Consumers de-duplicate on (`camera`, `part_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictEvent {
    pub schema: u32,
    pub camera: String,
    pub part_id: String,
    pub verdict: Verdict,
    /// Per-camera verdict number, 1, 2, … in the order verdicts were decided.
    pub seq: u64,
    /// When the verdict was decided, ms since epoch.
    pub ts: u64,
    /// The trigger's time (as sent, else when it arrived), ms since epoch.
    pub trigger_ts: u64,
    /// Trigger arrival → verdict decided.
    pub latency_ms: f64,
    /// Normalised (threshold at 0.5) and raw aggregate score of the part's frames;
    /// absent for `error`/`timeout` verdicts without a score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_score: Option<f64>,
    /// Raw-score threshold in force (the raw score that normalises to `threshold_score`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// The same threshold on the normalised score (the camera's `alarm.threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_score: Option<f64>,
    /// Score kind (`mahalanobis`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// sha256 (hex) of the model file that scored the part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
    /// Digest of the camera's effective settings (see `docs/mqtt.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings_digest: Option<String>,
    /// Capture times of the frames scored, ms since epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frame_ts: Vec<u64>,
    /// The camera's frame numbers of those frames.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frame_seq: Vec<u64>,
    /// Snapshot file of an `ng` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Why an `error` or `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Per-camera figures for the periodic `stats` message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CameraStats {
    pub camera: String,
    pub online: bool,
    pub fps: f64,
    pub frames: u64,
    pub dropped: u64,
    pub broken: u64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// The video decoder in use (`avdec_h264`, `nvv4l2decoder`, `vaapih264dec`...),
    /// for sources that decode through GStreamer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<String>,
    /// The comparison with the camera's shadow model (`shadow_model`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::shadow::ShadowStats>,
    /// A triggered camera's verdict counts since start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdicts: Option<VerdictStats>,
}

/// Verdicts of one triggered camera, by outcome, and the triggers refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictStats {
    pub ok: u64,
    pub ng: u64,
    pub error: u64,
    pub timeout: u64,
    /// Repeated part ids (answered once).
    pub duplicates: u64,
    /// Triggers refused for their payload.
    pub refused: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub schema: u32,
    pub ts: u64,
    /// Execution provider actually running the model (`cpu`, `cuda`, `tensorrt`).
    pub provider: String,
    pub cameras: Vec<CameraStats>,
}

/// Where the pipeline's outputs go. Implementations must not block.
pub trait Publisher: Send + Sync {
    fn score(&self, ev: &ScoreEvent);
    fn alarm(&self, ev: &AlarmEvent);
    /// [`alarm`](Self::alarm), then waits up to `timeout` until the event is
    /// stored durably (the MQTT outbox's file); `false` when it is not known
    /// to be (queue full, write failed, held in memory). The open-alarm
    /// journal forgets an alarm only once its `end` is durable. Publishers
    /// with nothing durable behind them hand it over and say `true`.
    fn alarm_durable(&self, ev: &AlarmEvent, timeout: std::time::Duration) -> bool {
        let _ = timeout;
        self.alarm(ev);
        true
    }
    fn camera_online(&self, camera: &str, online: bool);
    /// Alarm state of a camera (`ON` while an alarm is active).
    fn alarm_state(&self, camera: &str, active: bool);
    fn snapshot(&self, snap: &Snapshot);
    fn stats(&self, report: &StatsReport);
    /// A triggered part's verdict: durable like an alarm (never dropped).
    /// Publishers without a durable store log it.
    fn verdict(&self, ev: &VerdictEvent) {
        tracing::info!(camera = %ev.camera, part_id = %ev.part_id, verdict = ?ev.verdict, "verdict (not published)");
    }
    /// An answer to a command, or an event a stage reports (drift, reload):
    /// best effort, on the `events` topics (see `commands`).
    fn event(&self, ev: &crate::commands::CommandEvent) {
        tracing::info!(command = %ev.command, status = ?ev.status, reason = ev.reason.as_deref().unwrap_or(""), "event (not published)");
    }
}

/// Everything a [`Recorder`] was given, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    Score(ScoreEvent),
    Alarm(AlarmEvent),
    CameraOnline(String, bool),
    AlarmState(String, bool),
    Snapshot(Snapshot),
    Stats(StatsReport),
    Verdict(VerdictEvent),
    Event(crate::commands::CommandEvent),
}

/// Test double: records every call. Cheap to clone; clones share the log.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    log: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    pub fn events(&self) -> Vec<Recorded> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
    pub fn alarms(&self) -> Vec<AlarmEvent> {
        self.events().into_iter().filter_map(|e| if let Recorded::Alarm(a) = e { Some(a) } else { None }).collect()
    }
    pub fn scores(&self) -> Vec<ScoreEvent> {
        self.events().into_iter().filter_map(|e| if let Recorded::Score(s) = e { Some(s) } else { None }).collect()
    }
    fn push(&self, r: Recorded) {
        if let Ok(mut l) = self.log.lock() {
            l.push(r);
        }
    }
}

impl Publisher for Recorder {
    fn score(&self, ev: &ScoreEvent) {
        self.push(Recorded::Score(ev.clone()))
    }
    fn alarm(&self, ev: &AlarmEvent) {
        self.push(Recorded::Alarm(ev.clone()))
    }
    fn camera_online(&self, camera: &str, online: bool) {
        self.push(Recorded::CameraOnline(camera.into(), online))
    }
    fn alarm_state(&self, camera: &str, active: bool) {
        self.push(Recorded::AlarmState(camera.into(), active))
    }
    fn snapshot(&self, snap: &Snapshot) {
        self.push(Recorded::Snapshot(snap.clone()))
    }
    fn stats(&self, report: &StatsReport) {
        self.push(Recorded::Stats(report.clone()))
    }
    fn verdict(&self, ev: &VerdictEvent) {
        self.push(Recorded::Verdict(ev.clone()))
    }
    fn event(&self, ev: &crate::commands::CommandEvent) {
        self.push(Recorded::Event(ev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarm_payload_uses_type_field_and_omits_absent_end() {
        let ev = AlarmEvent {
            schema: PAYLOAD_SCHEMA,
            id: "line3-1".into(),
            camera: "line3".into(),
            kind: AlarmKind::Start,
            ts: 10,
            start_ts: 9,
            end_ts: None,
            peak: 0.9,
            peak_raw: 1.5,
            frames: 3,
            first_seq: 7,
            seq: 9,
            snapshot: None,
            reason: None,
        };
        let v: serde_json::Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["type"], "start");
        assert!(v.get("end_ts").is_none() && v.get("reason").is_none());
        let back: AlarmEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, ev);
        let end = AlarmEvent { kind: AlarmKind::End, end_ts: Some(12), reason: Some(EndReason::Restart), ..ev };
        let v: serde_json::Value = serde_json::to_value(&end).unwrap();
        assert_eq!((v["type"].as_str(), v["reason"].as_str()), (Some("end"), Some("restart")));
    }

    #[test]
    fn recorder_keeps_order() {
        let r = Recorder::default();
        r.camera_online("a", false);
        r.alarm_state("a", true);
        assert_eq!(r.events(), vec![Recorded::CameraOnline("a".into(), false), Recorded::AlarmState("a".into(), true)]);
    }
}
