//! Commissioning a line from the running daemon: the `record`, `calibrate` and
//! `feedback` command handlers, and the live-calibration state file.
//!
//! ```text
//! cmd/record    ─► record thread ◄── Tap (preprocess pool, drop-first copies) ─► <dir>/record/<name>/train/good/*.png
//! cmd/calibrate ─► Control::Calibrate ─► inference thread collects raw scores ─► reply ─► calibration.json
//! cmd/feedback  ─► AlarmFrames (last alarm starts) ─► <dir>/feedback/<camera>/val/{good,<defect>}/<id>.png + .json
//! ```
//! Each handler runs on its own thread and answers through the command intake
//! (`accepted`, `progress`, `done`/`failed`/`refused`). None of them touches the
//! frame path beyond one atomic load per frame (the tap) and a frame copy per
//! alarm start (the alarm frames).
//!
//! # Threshold precedence (what a camera decides with)
//! 1. the camera's entry in `<commissioning.dir>/calibration.json` (written by a
//!    live `calibrate`), when it was made for the same model export (its
//!    metadata's data digest and creation time) and score kind;
//! 2. else the calibration in the model's metadata.
//!
//! The config has no raw-threshold override: `[cameras.X.alarm] threshold` is on
//! the normalized score, where the calibrated threshold is 0.5, so it shifts
//! whichever calibration is in force. `check-config` prints the threshold in
//! force per camera and where it comes from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use ganomaly_core::calibrate::DEFAULT_NORMAL_METHOD;
use ganomaly_core::metadata::{CalibrationMethod, ModelMetadata};
use ganomaly_core::{Calibration, ScoreKind};
use serde::{Deserialize, Serialize};

use crate::commands::{Command, Status};
use crate::decide::{AlarmFrame, AlarmFrames, CalibrateReply, CalibrateRequest, MIN_CALIBRATION_SCORES};
use crate::metrics::CameraCounters;
use crate::recording::{self, RecordOptions, Selector, Tap};

/// Errors of the state file; each names it.
#[derive(Debug, thiserror::Error)]
pub enum CommissionError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a calibration state file: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// One camera's live calibration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveCalibration {
    /// The model export it was made for ([`model_id`]).
    pub model_id: String,
    /// The model file, for people reading the file.
    pub model: String,
    pub kind: ScoreKind,
    pub calibration: Calibration,
    /// ms since the epoch.
    pub ts: u64,
    pub scores: usize,
}

/// `calibration.json`: live calibrations by camera name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CalibrationState {
    pub cameras: BTreeMap<String, LiveCalibration>,
}

/// Which export of a model a calibration belongs to: a model copied over the old
/// file at the same path is another model, whose scores the old threshold does
/// not fit.
pub fn model_id(meta: &ModelMetadata) -> String {
    format!("{}@{}", meta.provenance.data_digest, meta.provenance.created)
}

impl CalibrationState {
    /// The file's state; an absent file is an empty state.
    pub fn load(path: &Path) -> Result<CalibrationState, CommissionError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| CommissionError::Parse { path: path.to_path_buf(), source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CalibrationState::default()),
            Err(source) => Err(CommissionError::Read { path: path.to_path_buf(), source }),
        }
    }

    /// Written to a temporary file and renamed: a crash leaves the old state whole.
    pub fn save(&self, path: &Path) -> Result<(), CommissionError> {
        let werr = |source| CommissionError::Write { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(werr)?;
        }
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(self).map_err(|e| werr(std::io::Error::other(e)))?;
        std::fs::write(&tmp, json).map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(werr)
    }

    /// The live calibration of `camera` if it fits this model and kind.
    pub fn for_camera(&self, camera: &str, meta: &ModelMetadata, kind: ScoreKind) -> Option<&LiveCalibration> {
        self.cameras.get(camera).filter(|c| c.kind == kind && c.model_id == model_id(meta))
    }
}

/// Where a camera's threshold comes from (precedence: see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub enum ThresholdSource {
    /// `calibration.json`, made live at this time (ms) from this many scores.
    Live {
        file: PathBuf,
        ts: u64,
        scores: usize,
    },
    Model,
}

/// The calibration a camera decides with and where it comes from.
pub fn effective(
    state: Option<(&Path, &CalibrationState)>,
    camera: &str,
    meta: &ModelMetadata,
    kind: ScoreKind,
) -> Option<(Calibration, ThresholdSource)> {
    if let Some((file, s)) = state {
        if let Some(live) = s.for_camera(camera, meta, kind) {
            let src = ThresholdSource::Live { file: file.to_path_buf(), ts: live.ts, scores: live.scores };
            return Some((live.calibration.clone(), src));
        }
    }
    meta.score(kind).map(|s| (s.calibration.clone(), ThresholdSource::Model))
}

/// What the handlers need of one camera.
#[derive(Clone)]
pub struct CameraHooks {
    pub name: String,
    pub tap: Arc<Tap>,
    pub alarm_frames: Arc<AlarmFrames>,
    pub counters: Arc<CameraCounters>,
    pub roi: Option<ganomaly_core::preprocess::Roi>,
    pub model: PathBuf,
    pub model_id: String,
    /// Its slot on its model's inference thread, and that thread's control
    /// channel (a live calibration runs there).
    pub slot: usize,
    pub control: crossbeam_channel::Sender<crate::infer::Control>,
}

/// The cameras as they run now: the pipeline replaces the list after a
/// reload added, removed or restarted cameras.
pub type SharedHooks = Arc<std::sync::RwLock<Vec<CameraHooks>>>;

/// The camera a command addresses, as it runs now.
fn hook_of(hooks: &SharedHooks, cmd: &Command) -> Option<CameraHooks> {
    let list = hooks.read().unwrap_or_else(|e| e.into_inner());
    list.iter().find(|h| Some(h.name.as_str()) == cmd.camera.as_deref()).cloned()
}

fn detail(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// A file or folder name from a command: letters, digits, `-`, `_`, `.` (not
/// leading), so that no command can write outside its folder.
pub fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The `record` command: `{"name": "...", "count": N, "duration_s": S,
/// "min_interval_s": S, "min_change": X, "append": bool}` into
/// `<dir>/record/<name>/train/good/`.
pub fn spawn_record(
    rx: Receiver<Command>,
    dir: Option<PathBuf>,
    hooks: SharedHooks,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("cmd-record".into()).spawn(move || {
        for cmd in rx {
            // One thread per recording: cameras record side by side (the tap
            // refuses a second recording of the same camera).
            let (dir, hooks) = (dir.clone(), hooks.clone());
            let spawned = std::thread::Builder::new()
                .name("record".into())
                .spawn(move || record_one(&cmd, dir.as_deref(), &hooks));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a recording thread");
            }
        }
    })
}

/// Progress answers at most this often: an MQTT message per kept frame would
/// flood the events topic on a fast line.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

fn record_one(cmd: &Command, dir: Option<&Path>, hooks: &SharedHooks) {
    let Some(root) = dir else {
        return cmd.refuse("[commissioning] dir is not set: nowhere to record to");
    };
    let Some(h) = hook_of(hooks, cmd) else {
        return cmd.refuse("unknown camera");
    };
    let mut body = cmd.body.clone();
    body.remove("request_id");
    let name = match body.remove("name") {
        None => h.name.clone(),
        Some(serde_json::Value::String(n)) if safe_name(&n) => n,
        Some(other) => {
            return cmd.refuse(format!("name {other}: letters, digits, '-', '_' and '.' only (a folder name)"));
        }
    };
    let folder = root.join("record").join(&name);
    body.insert("dir".into(), serde_json::json!(folder));
    let opts: RecordOptions = match serde_json::from_value(serde_json::Value::Object(body)) {
        Ok(o) => o,
        Err(e) => return cmd.refuse(format!("bad record options: {e}")),
    };
    if let Err(e) = opts.check() {
        return cmd.refuse(e.to_string());
    }
    let first = match recording::prepare_dir(&opts) {
        Ok(n) => n,
        Err(e) => return cmd.refuse(e.to_string()),
    };
    let Some(frames) = h.tap.open() else {
        return cmd.refuse(format!("camera {} is already recording", h.name));
    };
    cmd.accept();
    let good = opts.good_dir();
    let mut sel = Selector::new(&opts);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut failure = None;
    while !sel.finished(started.elapsed()) {
        let frame = match frames.recv_timeout(Duration::from_millis(500)) {
            Ok(f) => f,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                // A camera a reload removed sends no more frames, but its tap
                // lives on in `h`: without this a `count` recording never ends.
                let runs = hooks.read().unwrap_or_else(|e| e.into_inner()).iter().any(|x| Arc::ptr_eq(&x.tap, &h.tap));
                if !runs {
                    failure = Some(format!("camera {} was removed by a reload", h.name));
                    break;
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        let Ok(thumb) = recording::thumbnail(&frame, h.roi) else { continue };
        match sel.offer(started.elapsed(), &thumb) {
            recording::Decision::Keep => {
                let n = first + sel.kept() as usize - 1;
                if let Err(e) = recording::write_png(&good, &h.name, n, &frame, h.roi) {
                    failure = Some(e.to_string());
                    break;
                }
            }
            recording::Decision::Done => break,
            _ => {}
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let d = serde_json::json!({"kept": sel.kept(), "duplicates_skipped": sel.duplicates(), "elapsed_s": started.elapsed().as_secs_f64()});
            cmd.answer(Status::Progress, None, detail(d));
        }
    }
    h.tap.close();
    let d = serde_json::json!({
        "dir": good, "kept": sel.kept(), "duplicates_skipped": sel.duplicates(),
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    match failure {
        Some(reason) => cmd.answer(Status::Failed, Some(reason), detail(d)),
        None => cmd.done(detail(d)),
    }
}

/// The `calibrate` command: `{"frames": N, "duration_s": S, "target_far": α,
/// "method": "lognormal_tail"|"conformal"|"normal_quantile"}`; the result is
/// applied at once and kept in `calibration.json`.
pub fn spawn_calibrate(
    rx: Receiver<Command>,
    state_file: Option<PathBuf>,
    hooks: SharedHooks,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("cmd-calibrate".into()).spawn(move || {
        // Calibrations of different cameras run side by side (each waits minutes
        // for its scores); the state file is rewritten under this lock.
        let file_lock = Arc::new(std::sync::Mutex::new(()));
        for cmd in rx {
            let (file, hooks, lock) = (state_file.clone(), hooks.clone(), file_lock.clone());
            let spawned = std::thread::Builder::new()
                .name("calibrate".into())
                .spawn(move || calibrate_one(&cmd, file.as_deref(), &hooks, &lock));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a calibration thread");
            }
        }
    })
}

/// Most frames a live calibration may ask for.
pub const MAX_CALIBRATION_FRAMES: u64 = 100_000;

fn calibrate_one(cmd: &Command, state_file: Option<&Path>, hooks: &SharedHooks, lock: &std::sync::Mutex<()>) {
    let Some(file) = state_file else {
        return cmd.refuse("[commissioning] dir is not set: nowhere to keep the calibration");
    };
    let Some(h) = hook_of(hooks, cmd) else {
        return cmd.refuse("unknown camera");
    };
    let req = match calibrate_options(&cmd.body) {
        Ok(r) => r,
        Err(e) => return cmd.refuse(e),
    };
    let (frames, duration, target, method) = req;
    let (tx, reply) = crossbeam_channel::bounded(1);
    let request = CalibrateRequest { frames, duration, target_far: target, method, reply: tx };
    if h.control.send(crate::infer::Control::Calibrate { slot: h.slot, req: request }).is_err() {
        return cmd.fail("the camera's inference thread has stopped");
    }
    // Refusals come back at once (the inference thread checks between batches).
    let wait = duration.unwrap_or(Duration::ZERO) + Duration::from_secs(3600);
    match reply.recv_timeout(Duration::from_secs(5)) {
        Ok(CalibrateReply::Refused(r)) => return cmd.refuse(r),
        Ok(other) => return finish_calibration(cmd, file, &h, other, lock),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            return cmd.fail("the camera's inference thread stopped");
        }
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
    }
    cmd.accept();
    match reply.recv_timeout(wait) {
        Ok(r) => finish_calibration(cmd, file, &h, r, lock),
        Err(_) => cmd.fail("no calibration result (camera without frames, or the daemon is stopping)"),
    }
}

type CalibrateOptions = (Option<u64>, Option<Duration>, f64, CalibrationMethod);

/// The command's options, every problem at once.
pub fn calibrate_options(body: &serde_json::Map<String, serde_json::Value>) -> Result<CalibrateOptions, String> {
    let mut problems = Vec::new();
    for k in body.keys() {
        if !matches!(k.as_str(), "frames" | "duration_s" | "target_far" | "method" | "request_id") {
            problems.push(format!("unknown option `{k}` (known: frames, duration_s, target_far, method)"));
        }
    }
    let frames = body.get("frames").map(|v| v.as_u64().unwrap_or(0));
    if let Some(f) = frames {
        if !(MIN_CALIBRATION_SCORES..=MAX_CALIBRATION_FRAMES).contains(&f) {
            problems.push(format!("frames must be in {MIN_CALIBRATION_SCORES}..={MAX_CALIBRATION_FRAMES}"));
        }
    }
    let duration = body.get("duration_s").map(|v| v.as_f64().unwrap_or(-1.0));
    if let Some(d) = duration {
        if !(d > 0.0 && d <= 12.0 * 3600.0) {
            problems.push("duration_s must be in (0, 43200]".to_string());
        }
    }
    if frames.is_none() && duration.is_none() {
        problems.push("give frames and/or duration_s: how many good parts to calibrate on".to_string());
    }
    let target = body.get("target_far").map_or(Some(0.01), |v| v.as_f64()).unwrap_or(-1.0);
    if !(target > 0.0 && target < 0.5) {
        problems.push("target_far must be in (0, 0.5)".to_string());
    }
    let method = match body.get("method").map(|v| v.as_str()) {
        None => DEFAULT_NORMAL_METHOD,
        Some(Some("lognormal_tail")) => CalibrationMethod::LognormalTail,
        Some(Some("conformal")) => CalibrationMethod::Conformal,
        Some(Some("normal_quantile")) => CalibrationMethod::NormalQuantile,
        Some(_) => {
            problems.push("method must be lognormal_tail, conformal or normal_quantile".to_string());
            DEFAULT_NORMAL_METHOD
        }
    };
    if problems.is_empty() {
        Ok((frames, duration.map(Duration::from_secs_f64), target, method))
    } else {
        Err(problems.join("; "))
    }
}

fn finish_calibration(cmd: &Command, file: &Path, h: &CameraHooks, reply: CalibrateReply, lock: &std::sync::Mutex<()>) {
    match reply {
        CalibrateReply::Refused(r) => cmd.refuse(r),
        CalibrateReply::Aborted(r) => cmd.fail(r),
        CalibrateReply::Done { kind, before, after, scores } => {
            let d = serde_json::json!({
                "score": kind.as_str(),
                "scores": scores,
                "before": {"threshold": before.threshold, "method": before.method.as_str(), "expected_far": before.expected_far},
                "after": {"threshold": after.threshold, "method": after.method.as_str(), "expected_far": after.expected_far,
                          "target_far": after.target_false_alarm_rate},
                "state_file": file,
            });
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let saved = CalibrationState::load(file).and_then(|mut s| {
                s.cameras.insert(
                    h.name.clone(),
                    LiveCalibration {
                        model_id: h.model_id.clone(),
                        model: h.model.display().to_string(),
                        kind,
                        calibration: *after,
                        ts: crate::events::now_ms(),
                        scores,
                    },
                );
                s.save(file)
            });
            match saved {
                Ok(()) => cmd.done(detail(d)),
                Err(e) => cmd.answer(
                    Status::Failed,
                    Some(format!("applied until the daemon restarts or reloads, but not kept: {e}")),
                    detail(d),
                ),
            }
        }
    }
}

/// The operator's verdict on an alarm.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// A false alarm: the part was good.
    Ok,
    /// A real defect.
    Defect,
}

/// The `feedback` command's body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackBody {
    pub alarm_id: String,
    pub verdict: Verdict,
    /// The defect's name (`val/<defect>/`); `defect` when absent.
    #[serde(default)]
    pub defect: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
}

/// The JSON sidecar stored beside a feedback image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeedbackRecord {
    pub alarm_id: String,
    pub camera: String,
    pub verdict: String,
    pub defect: Option<String>,
    pub note: Option<String>,
    pub ts: u64,
    pub seq: u64,
    pub peak: f64,
    pub peak_raw: f64,
    pub threshold: f64,
    pub score: String,
    pub model: String,
    pub model_id: String,
    pub received_ms: u64,
    pub image: String,
}

/// The `feedback` command: stores the alarm's ROI frame and a sidecar under
/// `<dir>/feedback/<camera>/val/{good,<defect>}/` (`ganomaly-train train --feedback`).
pub fn spawn_feedback(
    rx: Receiver<Command>,
    dir: Option<PathBuf>,
    hooks: SharedHooks,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("cmd-feedback".into()).spawn(move || {
        for cmd in rx {
            feedback_one(&cmd, dir.as_deref(), &hooks);
        }
    })
}

/// The folder `ganomaly-train train --feedback` reads for `camera`.
pub fn feedback_dir(root: &Path, camera: &str) -> PathBuf {
    root.join("feedback").join(camera)
}

fn feedback_one(cmd: &Command, dir: Option<&Path>, hooks: &SharedHooks) {
    let Some(root) = dir else {
        return cmd.refuse("[commissioning] dir is not set: nowhere to keep feedback");
    };
    let Some(h) = hook_of(hooks, cmd) else {
        return cmd.refuse("unknown camera");
    };
    let body: FeedbackBody = match serde_json::from_value(serde_json::Value::Object(cmd.body.clone())) {
        Ok(b) => b,
        Err(e) => {
            return cmd.refuse(format!("bad feedback: {e} (expected alarm_id, verdict ok|defect, defect?, note?)"))
        }
    };
    let class = match (&body.verdict, &body.defect) {
        (Verdict::Ok, None) => "good".to_string(),
        (Verdict::Ok, Some(_)) => return cmd.refuse("verdict ok (a false alarm) takes no defect name"),
        (Verdict::Defect, None) => "defect".to_string(),
        (Verdict::Defect, Some(d)) if safe_name(d) && d != "good" => d.clone(),
        (Verdict::Defect, Some(d)) => {
            return cmd.refuse(format!("defect `{d}`: a folder name (letters, digits, '-', '_', '.'), not `good`"));
        }
    };
    let Some(alarm) = h.alarm_frames.take(&body.alarm_id) else {
        let known = h.alarm_frames.ids();
        return cmd.refuse(format!(
            "unknown alarm id `{}` on camera {}: the frames of its last {} alarm starts are kept (known now: {})",
            body.alarm_id,
            h.name,
            h.alarm_frames.keep(),
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        ));
    };
    let folder = feedback_dir(root, &h.name).join("val").join(&class);
    match store_feedback(&folder, &alarm, &body, &h, cmd.received_ms) {
        Ok(image) => {
            let counter = if body.verdict == Verdict::Ok {
                &h.counters.feedback_false_alarms
            } else {
                &h.counters.feedback_defects
            };
            counter.fetch_add(1, Ordering::Relaxed);
            cmd.done(detail(serde_json::json!({"alarm_id": body.alarm_id, "stored": image, "class": class})));
        }
        Err(e) => {
            // Nothing lost: the frame stays available for another try.
            h.alarm_frames.put_back(alarm);
            cmd.fail(e);
        }
    }
}

fn store_feedback(
    folder: &Path,
    alarm: &AlarmFrame,
    body: &FeedbackBody,
    h: &CameraHooks,
    received_ms: u64,
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
    // The id is `<camera>-<ts>-<n>`: already a file name, but it came from outside.
    let stem = alarm.id.replace(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'), "_");
    let png = folder.join(format!("{stem}.png"));
    if png.exists() {
        return Err(format!("{} exists: feedback on this alarm was stored already", png.display()));
    }
    // Sidecar first, image second: the trainer lists images, so a half-stored
    // feedback (sidecar only) never enters a training run.
    let record = FeedbackRecord {
        alarm_id: alarm.id.clone(),
        camera: alarm.camera.clone(),
        verdict: match body.verdict {
            Verdict::Ok => "ok".into(),
            Verdict::Defect => "defect".into(),
        },
        defect: body.defect.clone(),
        note: body.note.clone(),
        ts: alarm.ts,
        seq: alarm.seq,
        peak: alarm.peak,
        peak_raw: alarm.peak_raw,
        threshold: alarm.threshold,
        score: alarm.kind.as_str().to_string(),
        model: h.model.display().to_string(),
        model_id: h.model_id.clone(),
        received_ms,
        image: png.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let json = folder.join(format!("{stem}.json"));
    let text = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
    std::fs::write(&json, text).map_err(|e| format!("cannot write {}: {e}", json.display()))?;
    let dir = png.parent().unwrap_or(folder);
    let name = png.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    // write_png adds `-<n>`; write under the alarm's own name instead.
    let img = &alarm.image;
    let tmp = dir.join(format!(".{name}.png.tmp"));
    img.save_with_format(&tmp, image::ImageFormat::Png).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &png).map_err(|e| format!("cannot write {}: {e}", png.display()))?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_of_a_camera_a_reload_removed_ends() {
        let dir = tempfile::tempdir().unwrap();
        let rec = crate::events::Recorder::default();
        let settings = crate::commands::CommandSettings { enabled: true, ..Default::default() };
        let intake = crate::commands::Intake::new(settings, Arc::new(rec.clone()), &["cam".to_string()]);
        let rx = intake.register(crate::commands::CommandName::Record);
        intake.from_mqtt("g/n", "g/n/cam/cmd/record", br#"{"count": 5}"#, false);
        let cmd = rx.try_recv().expect("the command");
        let (control, _control_rx) = crossbeam_channel::unbounded();
        let hook = CameraHooks {
            name: "cam".into(),
            tap: Arc::new(Tap::default()),
            alarm_frames: Arc::new(AlarmFrames::new(0)),
            counters: Arc::default(),
            roi: None,
            model: PathBuf::from("m.onnx"),
            model_id: String::new(),
            slot: 0,
            control,
        };
        let hooks: SharedHooks = Arc::new(std::sync::RwLock::new(vec![hook]));
        let (root, h2) = (dir.path().to_path_buf(), hooks.clone());
        let t = std::thread::spawn(move || record_one(&cmd, Some(&root), &h2));
        std::thread::sleep(Duration::from_millis(100));
        hooks.write().unwrap().clear(); // the reload removed the camera
        let deadline = Instant::now() + Duration::from_secs(10);
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(t.is_finished(), "the recording still waits for frames of a removed camera");
        let failed = rec.events().into_iter().any(|e| {
            matches!(e, crate::events::Recorded::Event(ev) if ev.status == Status::Failed
                && ev.reason.as_deref().is_some_and(|r| r.contains("removed")))
        });
        assert!(failed, "{:?}", rec.events());
    }

    #[test]
    fn calibrate_options_are_checked_all_at_once() {
        let m = |v: serde_json::Value| detail(v);
        let (f, d, t, method) = calibrate_options(&m(serde_json::json!({"frames": 200}))).unwrap();
        assert_eq!((f, d, t, method), (Some(200), None, 0.01, DEFAULT_NORMAL_METHOD));
        let err = calibrate_options(&m(serde_json::json!({"frames": 3, "target_far": 2, "method": "max", "x": 1})))
            .unwrap_err();
        for want in ["frames must be", "target_far", "method must be", "unknown option `x`"] {
            assert!(err.contains(want), "{err} lacks {want}");
        }
        assert!(calibrate_options(&m(serde_json::json!({}))).unwrap_err().contains("frames and/or duration_s"));
    }

    #[test]
    fn names_from_commands_cannot_leave_their_folder() {
        for bad in ["", "..", "../x", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(!safe_name(bad), "{bad}");
        }
        for good in ["line1", "scratch_2", "v1.2", "A-b"] {
            assert!(safe_name(good), "{good}");
        }
    }

    #[test]
    fn the_state_file_round_trips_and_fits_only_its_model() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sub/calibration.json");
        assert_eq!(CalibrationState::load(&path).unwrap(), CalibrationState::default(), "absent = empty");
        let arch = ganomaly_core::ArchSpec { isize: 32, nc: 1, nz: 8, ngf: 8, ndf: 8, ..Default::default() };
        let mut meta = ModelMetadata::uncalibrated(arch, 5);
        meta.provenance.data_digest = "sha256:ab".into();
        meta.provenance.created = "2026-12-01T10:00:00Z".into();
        let live = Calibration { threshold: 7.0, ..Calibration::uncalibrated() };
        let mut s = CalibrationState::default();
        s.cameras.insert(
            "cam".into(),
            LiveCalibration {
                model_id: model_id(&meta),
                model: "/m.onnx".into(),
                kind: ScoreKind::Latent,
                calibration: live.clone(),
                ts: 5,
                scores: 300,
            },
        );
        s.save(&path).unwrap();
        let back = CalibrationState::load(&path).unwrap();
        assert_eq!(back, s);
        let (c, src) = effective(Some((&path, &back)), "cam", &meta, ScoreKind::Latent).unwrap();
        assert_eq!((c.threshold, matches!(src, ThresholdSource::Live { scores: 300, .. })), (7.0, true));
        // Another kind, another camera or a re-exported model: the model's own.
        for (cam, kind) in [("cam", ScoreKind::Recon), ("other", ScoreKind::Latent)] {
            let (c, src) = effective(Some((&path, &back)), cam, &meta, kind).unwrap();
            assert_eq!((c.threshold, src), (0.5, ThresholdSource::Model));
        }
        meta.provenance.created = "2026-12-02T10:00:00Z".into();
        assert_eq!(effective(Some((&path, &back)), "cam", &meta, ScoreKind::Latent).unwrap().1, ThresholdSource::Model);
        std::fs::write(&path, b"{not json").unwrap();
        let err = CalibrationState::load(&path).unwrap_err();
        assert!(err.to_string().contains("calibration.json"), "{err}");
    }
}
