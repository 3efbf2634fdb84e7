//! Reload without a restart: what a new config changes, as a pure function.
//!
//! [`plan`] compares the running [`Settings`] with a newly compiled file (and
//! the set of model files whose contents changed on disk) and says, for every
//! camera, what the pipeline must do, and which sections cannot change while
//! running. It does no I/O and starts nothing, so every rule below is a unit
//! test; `Pipeline::apply_reload` carries a plan out.
//!
//! | what changed for a camera | action | its alarm |
//! | --- | --- | --- |
//! | nothing | kept: thread, queue, counters, alarm state untouched | carries on |
//! | `alarm` only | new thresholds/timing applied between batches | carries on under them |
//! | `score`, or its model (another path, or the file changed) | model swapped between batches; the camera thread keeps running | carries on (see below) |
//! | `shadow_model`/`shadow_score` | the shadow is attached, replaced or detached | the shadow's own alarm ends (`reload`) when it is replaced or detached |
//! | `source` (kind, device, URL, …), `width`/`height`, `limits`, `fps`, `roi`, `tiles`, `read_timeout_s` | restarted: a new camera thread and queue (frame `seq` counts from 0 again) | an active alarm ends, reason `reload` (a new view: whether the part is still bad is unknown) |
//! | added | started | new |
//! | removed | stopped; `camera` offline | an active alarm ends, reason `reload` |
//!
//! An alarm carries on across a model or score swap: scores are normalised by
//! each model's own calibration (0.5 = its calibrated threshold), so the
//! alarm machine's thresholds mean the same for the new model; the new
//! model's frames decide when the alarm ends (its id, start and peak stay).
//!
//! Sections that cannot change live ([`RESTART_ONLY`]) keep their running
//! values; the plan names them and why, and the reload answer carries the list.
//! `[commands]` applies at once.
//!
//! The comparisons destructure [`Settings`] and [`CameraPlan`] without `..`:
//! a field added to either does not compile until it is classified here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::config::{CameraPlan, Settings};

/// What a reload does to one camera.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraChange {
    Added,
    Removed,
    /// A new camera thread; the reasons are the keys that changed.
    Restart(Vec<&'static str>),
    /// Changes applied to the running camera (all false: kept as is).
    Update(Update),
}

/// Live changes of a camera that keeps its thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Update {
    /// Another model path, or the model file changed on disk.
    pub model: bool,
    /// Another score kind.
    pub score: bool,
    pub alarm: bool,
    /// Shadow added, removed, moved to another file or score, or its file changed.
    pub shadow: bool,
}

impl Update {
    pub fn is_empty(&self) -> bool {
        *self == Update::default()
    }

    /// The decision settings (kind, calibration) change.
    pub fn decision(&self) -> bool {
        self.model || self.score
    }
}

/// A section whose change needs a restart: the running values stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    pub section: &'static str,
    pub why: &'static str,
}

/// Sections that cannot change while running, and why.
pub const RESTART_ONLY: [Restart; 10] = [
    Restart {
        section: "inference",
        why: "ONNX Runtime's library and execution providers are set up once per process, and the running inference \
              threads were started with their batch size and wait",
    },
    Restart { section: "pipeline", why: "the preprocess pool and the camera queues are sized at start" },
    Restart { section: "snapshots", why: "the snapshot writer starts with its folder, quality and retention" },
    Restart {
        section: "mqtt",
        why: "the broker connection, its last will, the topic tree and the outbox are opened at start",
    },
    Restart { section: "metrics", why: "the endpoint's socket is bound at start" },
    Restart {
        section: "sparkplug",
        why: "the edge node's connection, its NDEATH will with the session's bdSeq and its outbox are opened at start",
    },
    Restart { section: "record", why: "the inspection record's file and thread are opened at start" },
    Restart { section: "console", why: "the console's socket and credentials are set up at start" },
    Restart {
        section: "triggered cameras",
        why: "a triggered camera's trigger station (ring buffer, deadlines, the model sha256 and calibration its \
              verdicts name) is set up at start: a triggered camera added, removed or changed keeps running as it \
              was until a restart",
    },
    Restart {
        section: "commissioning",
        why: "the record, calibrate and feedback handlers start with their folder, and cameras with their drift window",
    },
];

/// Cameras a reload leaves as they run: triggered (before or after) and
/// changed in any way, added or removed.
pub fn held_triggered(old: &Settings, new: &Settings) -> BTreeSet<String> {
    let triggered = |c: &CameraPlan| c.mode.trigger().is_some();
    let mut held = BTreeSet::new();
    for c in &new.cameras {
        match old.cameras.iter().find(|o| o.name == c.name) {
            Some(o)
                if o.mode == c.mode
                    && matches!(camera_change(o, c, &BTreeSet::new()), CameraChange::Update(u) if u.is_empty()) => {}
            Some(o) if triggered(o) || triggered(c) => {
                held.insert(c.name.clone());
            }
            None if triggered(c) => {
                held.insert(c.name.clone());
            }
            _ => {}
        }
    }
    for o in &old.cameras {
        if triggered(o) && !new.cameras.iter().any(|c| c.name == o.name) {
            held.insert(o.name.clone());
        }
    }
    held
}

/// The triggered camera that runs model file `path` once `new` is applied
/// over `old` (held cameras keep their running plans, so a triggered camera
/// may run a model the new file no longer gives it), or that the new file
/// puts on it. Such a file cannot change under it: its verdicts name the
/// model they were judged with, set up at start.
pub fn triggered_on(old: &Settings, new: &Settings, path: &Path) -> Option<String> {
    let runs = applied(old, new.clone());
    runs.cameras
        .iter()
        .chain(&new.cameras)
        .find(|c| c.mode.trigger().is_some() && c.model == path)
        .map(|c| c.name.clone())
}

fn restart(section: &str) -> Restart {
    RESTART_ONLY.into_iter().find(|r| r.section == section).unwrap_or(Restart { section: "?", why: "" })
}

/// Everything a reload does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Every camera of the old and the new file, by name.
    pub cameras: BTreeMap<String, CameraChange>,
    /// `[commands]` changed (applied at once).
    pub commands: bool,
    /// Sections that changed but keep their running values until a restart.
    pub needs_restart: Vec<Restart>,
}

/// The plan from `old` (running) to `new`. `changed_files`: model files
/// (camera or shadow models) whose contents differ from the running session's.
pub fn plan(old: &Settings, new: &Settings, changed_files: &BTreeSet<PathBuf>) -> Plan {
    let Settings {
        inference,
        pipeline,
        snapshots,
        cameras,
        mqtt,
        metrics,
        commands,
        sparkplug,
        record,
        console,
        commissioning,
    } = new;
    let mut needs_restart = Vec::new();
    if *inference != old.inference {
        needs_restart.push(restart("inference"));
    }
    if *pipeline != old.pipeline {
        needs_restart.push(restart("pipeline"));
    }
    if *snapshots != old.snapshots {
        needs_restart.push(restart("snapshots"));
    }
    if *mqtt != old.mqtt {
        needs_restart.push(restart("mqtt"));
    }
    if *metrics != old.metrics {
        needs_restart.push(restart("metrics"));
    }
    if *sparkplug != old.sparkplug {
        needs_restart.push(restart("sparkplug"));
    }
    if *record != old.record {
        needs_restart.push(restart("record"));
    }
    if *console != old.console {
        needs_restart.push(restart("console"));
    }
    let held = held_triggered(old, new);
    if !held.is_empty() {
        needs_restart.push(restart("triggered cameras"));
    }
    // The commissioning handlers hold their folder from the start; drift
    // settings apply to cameras as they start.
    if *commissioning != old.commissioning {
        needs_restart.push(restart("commissioning"));
    }
    let old_cams: BTreeMap<&str, &CameraPlan> = old.cameras.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut out = BTreeMap::new();
    for cam in cameras {
        let change = match old_cams.get(cam.name.as_str()) {
            _ if held.contains(&cam.name) => continue,
            None => CameraChange::Added,
            Some(was) => camera_change(was, cam, changed_files),
        };
        out.insert(cam.name.clone(), change);
    }
    for name in old_cams.keys() {
        if !cameras.iter().any(|c| c.name == *name) && !held.contains(*name) {
            out.insert(name.to_string(), CameraChange::Removed);
        }
    }
    // Held cameras run on as they are.
    for name in &held {
        if old_cams.contains_key(name.as_str()) {
            out.insert(name.clone(), CameraChange::Update(Update::default()));
        }
    }
    Plan { cameras: out, commands: *commands != old.commands, needs_restart }
}

fn camera_change(old: &CameraPlan, new: &CameraPlan, changed_files: &BTreeSet<PathBuf>) -> CameraChange {
    // `mode`: a camera triggered before or after is held by `plan` (see `held_triggered`).
    let CameraPlan {
        name: _,
        source: _,
        model,
        score,
        fps,
        roi,
        alarm,
        read_timeout,
        source_key,
        shadow,
        mode: _,
        tiles,
    } = new;
    // `source` is compiled from the table `source_key` digests.
    let mut restart = Vec::new();
    if *source_key != old.source_key {
        restart.push("source");
    }
    if *fps != old.fps {
        restart.push("fps");
    }
    if *roi != old.roi {
        restart.push("roi");
    }
    // A new grid is a new view of the part, as a new ROI is.
    if *tiles != old.tiles {
        restart.push("tiles");
    }
    if *read_timeout != old.read_timeout {
        restart.push("read_timeout_s");
    }
    if !restart.is_empty() {
        return CameraChange::Restart(restart);
    }
    let shadow_file_changed = shadow.as_ref().is_some_and(|s| changed_files.contains(&s.model));
    CameraChange::Update(Update {
        model: *model != old.model || changed_files.contains(model),
        score: *score != old.score,
        alarm: *alarm != old.alarm,
        shadow: *shadow != old.shadow || shadow_file_changed,
    })
}

impl Plan {
    /// Nothing to do for any camera.
    pub fn cameras_unchanged(&self) -> bool {
        self.cameras.values().all(|c| matches!(c, CameraChange::Update(u) if u.is_empty()))
    }

    /// The answer's `detail`: each camera's fate, and what waits for a restart.
    pub fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        let cameras: serde_json::Map<String, serde_json::Value> =
            self.cameras.iter().map(|(name, c)| (name.clone(), serde_json::Value::String(describe(c)))).collect();
        let restart: Vec<serde_json::Value> =
            self.needs_restart.iter().map(|r| serde_json::json!({ "section": r.section, "why": r.why })).collect();
        let mut m = serde_json::Map::new();
        m.insert("cameras".into(), cameras.into());
        m.insert("commands".into(), serde_json::Value::Bool(self.commands));
        m.insert("needs_restart".into(), restart.into());
        m
    }
}

/// `kept`, `added`, `removed`, `restarted (source, fps)`, `updated (model, alarm)`.
pub fn describe(c: &CameraChange) -> String {
    match c {
        CameraChange::Added => "added".into(),
        CameraChange::Removed => "removed".into(),
        CameraChange::Restart(why) => format!("restarted ({})", why.join(", ")),
        CameraChange::Update(u) if u.is_empty() => "kept".into(),
        CameraChange::Update(u) => {
            let parts: Vec<&str> = [(u.model, "model"), (u.score, "score"), (u.alarm, "alarm"), (u.shadow, "shadow")]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
            format!("updated ({})", parts.join(", "))
        }
    }
}

/// What runs after the reload: `new`, with the restart-only sections kept as
/// they run (so the next reload still reports them until a restart).
///
/// `commands.http` keeps its running value too while `[metrics]` waits for a
/// restart: the new file was checked with its own metrics port (HTTP
/// commands only on loopback), not with the one still running.
pub fn applied(old: &Settings, new: Settings) -> Settings {
    let mut commands = new.commands.clone();
    if new.metrics != old.metrics {
        commands.http = old.commands.http;
    }
    // Held triggered cameras keep their running plans (an added one is not running).
    let held = held_triggered(old, &new);
    let mut cameras: Vec<CameraPlan> = new.cameras.iter().filter(|c| !held.contains(&c.name)).cloned().collect();
    cameras.extend(old.cameras.iter().filter(|c| held.contains(&c.name)).cloned());
    cameras.sort_by(|a, b| a.name.cmp(&b.name));
    Settings {
        cameras,
        inference: old.inference.clone(),
        pipeline: old.pipeline.clone(),
        snapshots: old.snapshots.clone(),
        mqtt: old.mqtt.clone(),
        metrics: old.metrics.clone(),
        sparkplug: old.sparkplug.clone(),
        record: old.record.clone(),
        console: old.console.clone(),
        commissioning: old.commissioning.clone(),
        commands,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ScoreChoice, ShadowPlan};
    use std::path::Path;

    fn settings(body: &str) -> Settings {
        // Offline: the models named need not exist for the plan.
        let text = format!("[defaults]\nmodel = \"/m/a.onnx\"\nsource = {{ kind = \"synthetic\", size = 64 }}\n{body}");
        let file = crate::config::parse(&text).expect("parses");
        match crate::config::compile_with(&file, Path::new("/"), crate::config::Probe::Offline) {
            Ok(s) => s,
            Err(p) => panic!("{p:?}"),
        }
    }

    fn three() -> Settings {
        settings("[cameras.a]\n[cameras.b]\n[cameras.c]\n")
    }

    #[test]
    fn a_held_triggered_camera_still_owns_the_model_it_runs() {
        let on = "[commands]\nenabled = true\n";
        let old = settings(&format!("{on}[cameras.t]\nmode = \"triggered\"\n"));
        // The new file moves t to b.onnx (held: t runs on a.onnx until a
        // restart) and puts a continuous camera on a.onnx.
        let new = settings(&format!("{on}[cameras.c]\n[cameras.t]\nmode = \"triggered\"\nmodel = \"/m/b.onnx\"\n"));
        assert_eq!(triggered_on(&old, &new, Path::new("/m/a.onnx")).as_deref(), Some("t"));
        assert_eq!(triggered_on(&old, &new, Path::new("/m/b.onnx")).as_deref(), Some("t"), "named by the new file");
        assert_eq!(triggered_on(&old, &old, Path::new("/m/b.onnx")), None);
    }

    #[test]
    fn triggered_cameras_are_held_as_they_run_until_a_restart() {
        let on = "[commands]\nenabled = true\n";
        let old = settings(&format!("{on}[cameras.a]\n[cameras.t]\nmode = \"triggered\"\n"));
        // t changed, u added (triggered), a changed (continuous: applied).
        let new = settings(&format!(
            "{on}[cameras.a]\nfps = 7\n[cameras.t]\nmode = \"triggered\"\nfps = 3\n[cameras.u]\nmode = \"triggered\"\n"
        ));
        let p = plan(&old, &new, &BTreeSet::new());
        assert_eq!(p.cameras.get("t"), Some(&CameraChange::Update(Update::default())), "{p:?}");
        assert!(!p.cameras.contains_key("u"), "{p:?}");
        assert!(matches!(p.cameras.get("a"), Some(CameraChange::Restart(_))), "{p:?}");
        assert!(p.needs_restart.iter().any(|r| r.section == "triggered cameras"));
        let running = applied(&old, new);
        let names: Vec<&str> = running.cameras.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "t"]);
        assert_eq!(running.cameras[1].fps, old.cameras[1].fps, "t keeps its running plan");
        // A triggered camera removed keeps running too.
        let p = plan(&old, &settings(&format!("{on}[cameras.a]\n")), &BTreeSet::new());
        assert_eq!(p.cameras.get("t"), Some(&CameraChange::Update(Update::default())));
    }

    #[test]
    fn the_same_file_keeps_everything() {
        let p = plan(&three(), &three(), &BTreeSet::new());
        assert!(p.cameras_unchanged() && !p.commands && p.needs_restart.is_empty(), "{p:?}");
        assert_eq!(p.cameras.len(), 3);
        assert_eq!(describe(&p.cameras["a"]), "kept");
    }

    #[test]
    fn added_removed_and_restarted_cameras_are_the_only_ones_touched() {
        let new = settings("[cameras.a]\n[cameras.c]\nsource = { kind = \"synthetic\", size = 32 }\n[cameras.d]\n");
        let p = plan(&three(), &new, &BTreeSet::new());
        assert_eq!(p.cameras["a"], CameraChange::Update(Update::default()));
        assert_eq!(p.cameras["b"], CameraChange::Removed);
        assert_eq!(p.cameras["c"], CameraChange::Restart(vec!["source"]));
        assert_eq!(p.cameras["d"], CameraChange::Added);
        assert_eq!(describe(&p.cameras["c"]), "restarted (source)");
    }

    #[test]
    fn fps_roi_and_read_timeout_restart_the_camera() {
        let new = settings(
            "[cameras.a]\nfps = 3\n[cameras.b]\nroi = { x = 0, y = 0, width = 10, height = 10 }\n[cameras.c]\nread_timeout_s = 2\n",
        );
        let p = plan(&three(), &new, &BTreeSet::new());
        assert_eq!(p.cameras["a"], CameraChange::Restart(vec!["fps"]));
        assert_eq!(p.cameras["b"], CameraChange::Restart(vec!["roi"]));
        assert_eq!(p.cameras["c"], CameraChange::Restart(vec!["read_timeout_s"]));
    }

    #[test]
    fn a_password_change_restarts_the_camera_without_showing_it() {
        let cam = |pw: &str| {
            settings(&format!(
                "[cameras.a]\nsource = {{ kind = \"http-mjpeg\", url = \"http://u:{pw}@127.0.0.1:9/m\" }}\n"
            ))
        };
        let p = plan(&cam("one-secret"), &cam("two-secret"), &BTreeSet::new());
        assert_eq!(p.cameras["a"], CameraChange::Restart(vec!["source"]));
        assert!(!format!("{:?}", p.summary()).contains("secret"));
    }

    #[test]
    fn model_score_alarm_and_shadow_changes_update_the_running_camera() {
        let new = settings(
            "[cameras.a]\nmodel = \"/m/b.onnx\"\n[cameras.b]\nscore = \"recon\"\n[cameras.b.alarm]\nmin_frames = 9\n\
             [cameras.c]\nshadow_model = \"/m/s.onnx\"\n",
        );
        let p = plan(&three(), &new, &BTreeSet::new());
        assert_eq!(p.cameras["a"], CameraChange::Update(Update { model: true, ..Update::default() }));
        assert_eq!(p.cameras["b"], CameraChange::Update(Update { score: true, alarm: true, ..Update::default() }));
        assert_eq!(p.cameras["c"], CameraChange::Update(Update { shadow: true, ..Update::default() }));
        assert_eq!(describe(&p.cameras["b"]), "updated (score, alarm)");
        let c = new.cameras.iter().find(|c| c.name == "c").expect("c");
        assert_eq!(
            c.shadow,
            Some(ShadowPlan { model: "/m/s.onnx".into(), score: ScoreChoice::ModelDefault }),
            "shadow compiled"
        );
    }

    #[test]
    fn a_model_file_that_changed_on_disk_is_a_model_swap_for_its_cameras() {
        let old = settings("[cameras.a]\n[cameras.b]\nmodel = \"/m/b.onnx\"\nshadow_model = \"/m/a.onnx\"\n");
        let changed: BTreeSet<PathBuf> = [PathBuf::from("/m/a.onnx")].into();
        let p = plan(&old, &old, &changed);
        assert_eq!(p.cameras["a"], CameraChange::Update(Update { model: true, ..Update::default() }));
        assert_eq!(p.cameras["b"], CameraChange::Update(Update { shadow: true, ..Update::default() }));
    }

    #[test]
    fn promoting_the_shadow_swaps_the_model_and_drops_the_shadow() {
        let old = settings("[cameras.a]\nshadow_model = \"/m/cand.onnx\"\n");
        let new = settings("[cameras.a]\nmodel = \"/m/cand.onnx\"\n");
        let p = plan(&old, &new, &BTreeSet::new());
        assert_eq!(p.cameras["a"], CameraChange::Update(Update { model: true, shadow: true, ..Update::default() }));
    }

    #[test]
    fn http_commands_are_not_opened_on_a_metrics_port_that_waits_for_a_restart() {
        // Running: metrics on a public port, so HTTP commands off (check-config's rule).
        let old = settings(
            "[cameras.a]\n[metrics]\nenabled = true\nlisten = \"0.0.0.0:9464\"\n[commands]\nenabled = true\nhttp = false\n",
        );
        // The new file moves metrics to loopback and turns HTTP commands on.
        let new = settings("[cameras.a]\n[metrics]\nenabled = true\n[commands]\nenabled = true\nhttp = true\n");
        let running = applied(&old, new.clone());
        assert!(!running.commands.http, "HTTP commands opened on the public port still running");
        assert_eq!(running.metrics, old.metrics);
        // Without a metrics change, `http` applies at once.
        let same_port = settings("[cameras.a]\n[metrics]\nenabled = true\n[commands]\nenabled = true\nhttp = false\n");
        assert!(applied(&same_port, new).commands.http);
    }

    #[test]
    fn restart_only_sections_are_named_and_keep_their_running_values() {
        let old = three();
        let new = settings(
            "[cameras.a]\n[cameras.b]\n[cameras.c]\n[inference]\nmax_batch = 2\n[pipeline]\nframe_queue = 5\n\
             [snapshots]\nenabled = false\n[metrics]\nenabled = true\n[mqtt]\nhost = \"elsewhere\"\n[commands]\nenabled = true\n",
        );
        let p = plan(&old, &new, &BTreeSet::new());
        let sections: Vec<&str> = p.needs_restart.iter().map(|r| r.section).collect();
        // `[record]` follows `[mqtt]`: it lies beside the outbox by default.
        assert_eq!(sections, ["inference", "pipeline", "snapshots", "mqtt", "metrics", "record"]);
        assert!(p.needs_restart.iter().all(|r| !r.why.is_empty()));
        assert!(p.commands && p.cameras_unchanged());
        let running = applied(&old, new.clone());
        assert_eq!(running.inference, old.inference);
        assert_eq!(running.pipeline, old.pipeline);
        assert_eq!(running.snapshots, old.snapshots);
        assert_eq!(running.mqtt, old.mqtt);
        assert_eq!(running.metrics, old.metrics);
        assert_eq!(running.commands, new.commands, "commands apply at once");
        // The next reload of the same file still names them.
        assert_eq!(plan(&running, &new, &BTreeSet::new()).needs_restart.len(), 6);
        let detail = p.summary();
        assert_eq!(detail["needs_restart"].as_array().map(Vec::len), Some(6));
        assert_eq!(detail["cameras"]["a"], "kept");
    }
}
