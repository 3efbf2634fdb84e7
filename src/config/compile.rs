//! Checks a parsed [`ConfigFile`] and compiles it into [`Settings`]: every
//! problem at once, each naming its field as a dotted path
//! (`cameras.line3.alarm.min_frames: must be ≥ 1`), so that an ops engineer
//! fixes a file in one round trip. The files and devices the config names are
//! probed too (models and their scores, replay images, camera devices), so
//! that `check-config` as `ExecStartPre` catches them.
//!
//! Relative paths (model, replay folder, snapshot dir, TensorRT cache, ORT
//! library, the MQTT files) are resolved against the directory of the config
//! file, so a config means the same thing whatever the process's working
//! directory is.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{
    AlarmTable, CameraTable, CommandsConfig, CommissioningConfig, ConfigFile, InferenceConfig, MetricsConfig, Overlap,
    PipelineConfig, RecordConfig, SnapshotConfig, TilesTable, TriggerTable,
};
use super::settings::{
    Aggregate, AlarmConfig, CameraMode, CameraPlan, CommissioningSettings, FramesFrom, InferenceSettings,
    MetricsSettings, PipelineSettings, Provider, RecordSettings, ScoreChoice, Settings, ShadowPlan, SnapshotSettings,
    TriggerSettings,
};
use crate::base::check::{between, count_between, level_name, not_zero};
use crate::base::report::chain;
use crate::capture::limits::LimitsTable;
use crate::capture::CameraContext;
use crate::commands::{CommandName, CommandSettings};
use crate::publish::config::MqttConfig;
use crate::publish::sparkplug::{SparkplugConfig, SparkplugSettings};
use ganomaly_core::tiles::Tiling;

const DEFAULT_WIDTH: u32 = 640;
const DEFAULT_HEIGHT: u32 = 480;
const DEFAULT_FPS: f64 = 15.0;
/// Largest frame side a camera may ask for: 8K video is 7680 wide; a frame of
/// 8192 × 8192 RGB is 200 MB, and each camera holds a few of them.
const MAX_FRAME_SIDE: u64 = 8192;
/// Longest alarm debounce in frames: at 15 fps, 100,000 frames are almost two
/// hours; beyond that an alarm would in practice never start or never end.
const MAX_ALARM_FRAMES: u64 = 100_000;
/// Most snapshots kept: retention lists the folder after every snapshot.
const MAX_SNAPSHOTS_RETAINED: u64 = 100_000;
/// A camera whose read has not returned for this long is reported offline.
/// 10 s: a frame interval at 0.1 fps, far beyond any streaming camera's, and
/// short enough for an operator to learn of a wedged driver at once. A
/// hardware-triggered camera that waits longer for parts sets its own.
const DEFAULT_READ_TIMEOUT_S: f64 = 10.0;

/// `base` joined to `p` unless `p` is absolute.
fn resolve(base: &Path, p: &Path) -> PathBuf {
    base.join(p)
}

/// How far a compile looks beyond the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The models, devices, image folders, library and MQTT files the config
    /// names are read (`check-config`, `run`).
    World,
    /// The file alone: schema, ranges, names, URLs (`check-config --offline`,
    /// for validating a fleet's configs on a machine without their files).
    Offline,
}

/// The settings, or every problem (never both: a file with a problem starts nothing).
pub fn compile(file: &ConfigFile, base: &Path, probe: Probe) -> Result<Settings, Vec<String>> {
    let mut problems = Vec::new();
    let inference = inference(&file.inference, base, probe, &mut problems);
    let pipeline = pipeline(&file.pipeline, &mut problems);
    let snapshots = snapshots(&file.snapshots, base, &mut problems);
    let metrics = metrics(&file.metrics, &mut problems);
    let commands = commands(&file.commands, file.metrics.enabled.then_some(&file.metrics), &mut problems);
    let commissioning = commissioning(&file.commissioning, base, probe, &mut problems);
    let mqtt = file.mqtt.as_ref().and_then(|m| mqtt(m, base, probe, &mut problems));
    let sparkplug = file.sparkplug.as_ref().and_then(|s| sparkplug(s, file.mqtt.as_ref(), base, probe, &mut problems));
    let record = record(&file.record, base, mqtt.as_ref(), &mut problems);
    let console = crate::console::config::compile(&file.console, base, probe == Probe::World, &mut problems);
    table_fields(&file.defaults, "defaults", &mut problems);
    if file.cameras.is_empty() {
        problems.push("cameras: at least one camera is needed ([cameras.<name>])".into());
    }
    // A `[defaults].source` no camera inherits is still checked, as written.
    if let (Some(s), true) = (&file.defaults.source, file.cameras.values().all(|c| c.source.is_some())) {
        let cx = context("defaults", &file.defaults, &file.defaults, base, probe);
        let _ = s.compile(&cx, "defaults.source", &mut problems);
    }
    let mut cameras = Vec::new();
    for (name, table) in &file.cameras {
        if let Some(cam) = camera(file, base, probe, name, table, &mut problems) {
            cameras.push(cam);
        }
    }
    if let Some(snaps) = &snapshots {
        for cam in &cameras {
            if let Some(folder) = cam.source.reads_folder().filter(|f| crate::base::paths::overlap(f, &snaps.dir)) {
                problems.push(format!(
                    "snapshots.dir: {} overlaps camera {}'s replay folder {}: retention would delete its images, \
                     and its snapshots would be replayed",
                    snaps.dir.display(),
                    cam.name,
                    folder.display()
                ));
            }
        }
    }
    // A triggered camera hears only `cmd/trigger`: without commands it would never judge a part.
    let triggers_on = commands.enabled && commands.allow.contains(&CommandName::Trigger);
    for cam in cameras.iter().filter(|c| c.mode.trigger().is_some()) {
        if !triggers_on {
            problems.push(format!(
                "cameras.{}.mode: triggered, but `trigger` commands are off ([commands] enabled = true and \
                 `trigger` in allow are needed): no part would ever be judged",
                cam.name
            ));
        }
    }
    // A problem in `[defaults]` shows once, not once per camera that inherits it.
    let mut seen = std::collections::HashSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    match (problems.is_empty(), inference, pipeline) {
        (true, Some(inference), Some(pipeline)) => Ok(Settings {
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
        }),
        _ => Err(problems),
    }
}

impl Default for InferenceSettings {
    /// What an `[inference]` table left out compiles to (`score`, `bench`, tests).
    fn default() -> Self {
        let mut problems = Vec::new();
        let defaults = inference(&InferenceConfig::default(), Path::new("/"), Probe::World, &mut problems);
        debug_assert!(problems.is_empty(), "the built-in defaults are valid: {problems:?}");
        defaults.unwrap_or_else(|| unreachable!("the built-in [inference] defaults compile"))
    }
}

/// `[mqtt]`, checked whether enabled or not (so that enabling it later holds
/// no surprise); while enabled, the password and TLS files it names are read
/// too, so that `run` cannot fail on them after `check-config` said ok.
fn mqtt(m: &MqttConfig, base: &Path, probe: Probe, problems: &mut Vec<String>) -> Option<MqttConfig> {
    let before = problems.len();
    m.validate("mqtt", problems);
    if !m.enabled || problems.len() != before {
        return None;
    }
    let m = m.resolved(base);
    if probe == Probe::Offline {
        return Some(m);
    }
    // Only whether they can be read: the password itself is dropped here.
    match m.password() {
        Err(e) => problems.push(chain(&e)),
        // MQTT carries the password as binary data with a 16-bit length.
        Ok(Some(pw)) if pw.expose().len() > crate::base::check::MQTT_STRING_BYTES => {
            let from = if m.password_file.is_some() { "password_file" } else { "password_env" };
            problems.push(format!("mqtt.{from}: the password is longer than 65535 bytes"));
        }
        Ok(_) => {}
    }
    if let (Some(tls), false) = (&m.tls, m.embedded) {
        if let Err(e) = crate::publish::tls::client_config(tls) {
            problems.push(chain(&e));
        }
    }
    (problems.len() == before).then_some(m)
}

/// `[sparkplug]`, checked whether enabled or not; while enabled, its own
/// broker's password and TLS files are read too (`[mqtt]`'s are read by its
/// section).
fn sparkplug(
    s: &SparkplugConfig,
    mqtt: Option<&MqttConfig>,
    base: &Path,
    probe: Probe,
    problems: &mut Vec<String>,
) -> Option<SparkplugSettings> {
    let before = problems.len();
    let compiled = s.compile(mqtt, base, problems)?;
    if !s.enabled {
        return None;
    }
    if let (Some(_), Probe::World) = (&s.broker, probe) {
        let b = &compiled.broker;
        match b.password() {
            Err(e) => problems.push(format!("sparkplug.broker: {}", chain(&e))),
            Ok(Some(pw)) if pw.expose().len() > crate::base::check::MQTT_STRING_BYTES => {
                problems.push("sparkplug.broker: the password is longer than 65535 bytes".into())
            }
            Ok(_) => {}
        }
        if let Some(tls) = &b.tls {
            if let Err(e) = crate::publish::tls::client_config(tls) {
                problems.push(format!("sparkplug.broker: {}", chain(&e)));
            }
        }
    }
    (problems.len() == before).then_some(compiled)
}

fn inference(c: &InferenceConfig, base: &Path, probe: Probe, problems: &mut Vec<String>) -> Option<InferenceSettings> {
    let p = "inference";
    let before = problems.len();
    if c.providers.is_empty() {
        problems.push(format!("{p}.providers: list at least one of {}", Provider::names().join(", ")));
    }
    if c.require_accelerator && c.providers.iter().all(|x| *x == Provider::Cpu) {
        problems.push(format!("{p}.require_accelerator: true, but providers lists no accelerator (tensorrt, cuda)"));
    }
    count_between(problems, &format!("{p}.max_batch"), c.max_batch as u64, 1, 256);
    between(problems, &format!("{p}.max_wait_s"), c.max_wait_s, 0.0, 1.0, ": it is latency added to every frame");
    // ONNX Runtime takes the CUDA device as an i32; no box has more than 64 GPUs.
    count_between(problems, &format!("{p}.device_id"), u64::from(c.device_id), 0, 64);
    if c.intra_threads > 1024 {
        problems.push(format!("{p}.intra_threads: must be ≤ 1024 (got {})", c.intra_threads));
    }
    let ort_library = c.ort_library.as_ref().map(|lib| resolve(base, lib));
    if let (Some(lib), Probe::World) = (&ort_library, probe) {
        if !lib.is_file() {
            problems.push(format!("{p}.ort_library: {} does not exist", lib.display()));
        }
    }
    (problems.len() == before).then(|| InferenceSettings {
        providers: c.providers.clone(),
        require_accelerator: c.require_accelerator,
        device_id: c.device_id,
        max_batch: c.max_batch,
        max_wait: Duration::from_secs_f64(c.max_wait_s),
        intra_threads: c.intra_threads,
        spin: c.spin,
        trt_cache_dir: c.trt_cache_dir.as_ref().map(|d| resolve(base, d)),
        trt_fp16: c.trt_fp16,
        ort_library,
    })
}

fn pipeline(c: &PipelineConfig, problems: &mut Vec<String>) -> Option<PipelineSettings> {
    let p = "pipeline";
    let before = problems.len();
    count_between(problems, &format!("{p}.preprocess_threads"), c.preprocess_threads as u64, 1, 64);
    count_between(problems, &format!("{p}.frame_queue"), c.frame_queue as u64, 1, 64);
    // A day at most: beyond that the figures are no longer news, and a
    // Duration cannot hold every float.
    between(problems, &format!("{p}.stats_interval_s"), c.stats_interval_s, 0.1, 86_400.0, "");
    (problems.len() == before).then(|| PipelineSettings {
        preprocess_threads: c.preprocess_threads,
        frame_queue: c.frame_queue,
        stats_interval: Duration::from_secs_f64(c.stats_interval_s),
    })
}

fn snapshots(c: &SnapshotConfig, base: &Path, problems: &mut Vec<String>) -> Option<SnapshotSettings> {
    let p = "snapshots";
    count_between(problems, &format!("{p}.quality"), u64::from(c.quality), 1, 100);
    if !(0.0..=1.0).contains(&c.overlay_alpha) {
        problems.push(format!("{p}.overlay_alpha: must be between 0 and 1 (got {})", c.overlay_alpha));
    }
    if c.enabled && c.retain == 0 {
        problems.push(format!("{p}.retain: must be ≥ 1 while snapshots are enabled"));
    } else if c.retain as u64 > MAX_SNAPSHOTS_RETAINED {
        count_between(problems, &format!("{p}.retain"), c.retain as u64, 1, MAX_SNAPSHOTS_RETAINED);
    }
    if c.enabled && c.dir.as_os_str().is_empty() {
        problems.push(format!("{p}.dir: must not be empty while snapshots are enabled"));
    }
    c.enabled.then(|| SnapshotSettings {
        dir: resolve(base, &c.dir),
        retain: c.retain,
        quality: c.quality,
        overlay_alpha: c.overlay_alpha,
    })
}

fn metrics(c: &MetricsConfig, problems: &mut Vec<String>) -> Option<MetricsSettings> {
    let p = "metrics";
    let listen = c.listen.parse::<SocketAddr>().ok();
    if listen.is_none() {
        problems
            .push(format!("{p}.listen: `{}` is not an address and port like 127.0.0.1:9464 or [::1]:9464", c.listen));
    }
    let stale_ok = between(
        problems,
        &format!("{p}.stale_after_s"),
        c.stale_after_s,
        2.0,
        3600.0,
        ": an idle inference thread beats once a second",
    );
    // A scrape is one connection; a few dozen serve every monitor a box has,
    // and 1024 is a process's usual descriptor limit.
    let conns_ok = count_between(problems, &format!("{p}.max_connections"), c.max_connections as u64, 1, 1024);
    let header_ok = between(problems, &format!("{p}.header_timeout_s"), c.header_timeout_s, 0.5, 60.0, "");
    match (c.enabled, listen) {
        (true, Some(listen)) if stale_ok && conns_ok && header_ok => Some(MetricsSettings {
            listen,
            stale_after: Duration::from_secs_f64(c.stale_after_s),
            max_connections: c.max_connections,
            header_timeout: Duration::from_secs_f64(c.header_timeout_s),
        }),
        _ => None,
    }
}

/// `[commands]`: known names only; commands over HTTP only on a loopback port.
fn commands(c: &CommandsConfig, metrics: Option<&MetricsConfig>, problems: &mut Vec<String>) -> CommandSettings {
    let mut allow = std::collections::BTreeSet::new();
    for name in &c.allow {
        match CommandName::parse(name) {
            Some(n) => {
                allow.insert(n);
            }
            None => problems.push(format!(
                "commands.allow: `{name}` is not a command (known: {})",
                CommandName::names().join(", ")
            )),
        }
    }
    if let (true, true, Some(m)) = (c.enabled, c.http, metrics) {
        let public = m.listen.parse::<SocketAddr>().is_ok_and(|a| !a.ip().is_loopback());
        if public {
            problems.push(format!(
                "commands.http: the metrics port listens on {} (not loopback), so anyone who reaches it could send \
                 commands; set commands.http = false (MQTT commands stay), or metrics.listen to a loopback address",
                m.listen
            ));
        }
    }
    CommandSettings { enabled: c.enabled, allow, http: c.http }
}

/// Largest `[record].max_rows`: a row is a few hundred bytes, so 100 million
/// rows are tens of GB, more than an edge box's disk.
const MAX_RECORD_ROWS: u64 = 100_000_000;
/// Longest record retention: ten years, longer than any warranty claim.
const MAX_RECORD_AGE_S: f64 = 10.0 * 365.0 * 86_400.0;

/// `[record]`: the file beside the MQTT outbox unless set.
fn record(
    c: &RecordConfig,
    base: &Path,
    mqtt: Option<&MqttConfig>,
    problems: &mut Vec<String>,
) -> Option<RecordSettings> {
    let p = "record";
    let age_ok = between(problems, &format!("{p}.max_age_s"), c.max_age_s, 60.0, MAX_RECORD_AGE_S, "");
    let rows_ok = count_between(problems, &format!("{p}.max_rows"), c.max_rows, 1, MAX_RECORD_ROWS);
    if c.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        problems.push(format!("{p}.path: must not be empty (leave it out for the default)"));
    }
    // Without MQTT there is no outbox to sit beside: only a path set asks for it.
    let path = match (&c.path, mqtt) {
        (Some(path), _) => resolve(base, path),
        (None, Some(m)) => m.outbox_path.with_file_name("record.sqlite"),
        (None, None) => return None,
    };
    if let Some(m) = mqtt {
        if path == m.outbox_path {
            problems.push(format!("{p}.path: {} is the MQTT outbox; the record needs its own file", path.display()));
        }
    }
    (c.enabled && age_ok && rows_ok).then(|| RecordSettings {
        path,
        max_age: Duration::from_secs_f64(c.max_age_s),
        max_rows: c.max_rows,
    })
}

/// Most frames one part is judged on: each is an inference.
const MAX_TRIGGER_FRAMES: u64 = 32;
/// Most frames a ring buffer holds: 300 frames of 640×480 RGB are 276 MB.
const MAX_BUFFER_FRAMES: u64 = 300;
/// Most triggers pending per camera (each holds a few frames' worth of work).
const MAX_PENDING_TRIGGERS: u64 = 4096;
/// Most part ids remembered per camera for de-duplication (tens of bytes each).
const MAX_DEDUP_PARTS: u64 = 1_000_000;

const MODES: [&str; 2] = ["continuous", "triggered"];

fn trigger_fields(t: &TriggerTable, p: &str, problems: &mut Vec<String>) {
    if let Some(v) = t.frames {
        count_between(problems, &format!("{p}.frames"), v, 1, MAX_TRIGGER_FRAMES);
    }
    if let Some(v) = t.buffer_frames {
        count_between(problems, &format!("{p}.buffer_frames"), v, 1, MAX_BUFFER_FRAMES);
    }
    if let Some(v) = t.max_pending {
        count_between(problems, &format!("{p}.max_pending"), v, 1, MAX_PENDING_TRIGGERS);
    }
    if let Some(v) = t.dedup_parts {
        count_between(problems, &format!("{p}.dedup_parts"), v, 1, MAX_DEDUP_PARTS);
    }
    if let Some(v) = t.delay_s {
        between(problems, &format!("{p}.delay_s"), v, 0.0, 10.0, "");
    }
    if let Some(v) = t.deadline_s {
        between(problems, &format!("{p}.deadline_s"), v, 0.01, 60.0, "");
    }
    if let Some(v) = t.tolerance_s {
        between(problems, &format!("{p}.tolerance_s"), v, 0.001, 3600.0, "");
    }
    if let Some(v) = t.from.as_deref().filter(|v| !matches!(*v, "nearest" | "after")) {
        problems.push(format!("{p}.from: `{v}` is not one of nearest, after"));
    }
    if let Some(v) = t.aggregate.as_deref().filter(|v| !matches!(*v, "max" | "mean")) {
        problems.push(format!("{p}.aggregate: `{v}` is not one of max, mean"));
    }
}

/// The trigger settings of a camera: its own table over `[defaults.trigger]`
/// over the built-in defaults, field by field; the merged product is checked.
fn merged_trigger(
    own: Option<&TriggerTable>,
    defaults: Option<&TriggerTable>,
    p: &str,
    problems: &mut Vec<String>,
) -> TriggerSettings {
    let empty = TriggerTable::default();
    let (t, d) = (own.unwrap_or(&empty), defaults.unwrap_or(&empty));
    let base = TriggerSettings::default();
    // Ranges were checked per table; clamped here so that a bad value is a
    // problem, never a panic.
    let secs = |v: Option<f64>, lo: f64, hi: f64| v.filter(|v| v.is_finite()).map(|v| v.clamp(lo, hi));
    let s = TriggerSettings {
        frames: t.frames.or(d.frames).map_or(base.frames, |v| v.clamp(1, MAX_TRIGGER_FRAMES) as usize),
        from: match t.from.as_deref().or(d.from.as_deref()) {
            Some("after") => FramesFrom::After,
            _ => FramesFrom::Nearest,
        },
        delay_ms: secs(t.delay_s.or(d.delay_s), 0.0, 10.0).map_or(base.delay_ms, |v| (v * 1000.0).round() as u64),
        aggregate: match t.aggregate.as_deref().or(d.aggregate.as_deref()) {
            Some("mean") => Aggregate::Mean,
            _ => Aggregate::Max,
        },
        deadline: secs(t.deadline_s.or(d.deadline_s), 0.01, 60.0).map_or(base.deadline, Duration::from_secs_f64),
        buffer_frames: t
            .buffer_frames
            .or(d.buffer_frames)
            .map_or(base.buffer_frames, |v| v.clamp(1, MAX_BUFFER_FRAMES) as usize),
        tolerance_ms: secs(t.tolerance_s.or(d.tolerance_s), 0.001, 3600.0)
            .map_or(base.tolerance_ms, |v| (v * 1000.0).round() as u64),
        max_pending: t
            .max_pending
            .or(d.max_pending)
            .map_or(base.max_pending, |v| v.clamp(1, MAX_PENDING_TRIGGERS) as usize),
        dedup_parts: t.dedup_parts.or(d.dedup_parts).map_or(base.dedup_parts, |v| v.clamp(1, MAX_DEDUP_PARTS) as usize),
    };
    if s.from == FramesFrom::Nearest && s.frames > s.buffer_frames {
        problems.push(format!(
            "{p}.frames: {} nearest frames need buffer_frames ≥ {} (got {})",
            s.frames, s.frames, s.buffer_frames
        ));
    }
    if s.deadline.as_millis() as u64 <= s.delay_ms {
        problems.push(format!(
            "{p}.deadline_s: must be longer than delay_s ({} ms ≤ {} ms): every part would time out",
            s.deadline.as_millis(),
            s.delay_ms
        ));
    }
    s
}

/// Most alarm frames kept per camera for `feedback`: 256 full-HD RGB frames are 1.5 GiB.
const MAX_KEEP_ALARM_FRAMES: u64 = 256;
/// The drift window: 50 scores give a median worth comparing; 100,000 is about an
/// hour at 30 fps (the window is sorted every `drift::EVERY` frames).
const DRIFT_WINDOW: (u64, u64) = (50, 100_000);

/// `[commissioning]`: bounds; the folder is resolved, not created (the commands create it).
fn commissioning(
    c: &CommissioningConfig,
    base: &Path,
    probe: Probe,
    problems: &mut Vec<String>,
) -> CommissioningSettings {
    let p = "commissioning";
    count_between(problems, &format!("{p}.keep_alarm_frames"), c.keep_alarm_frames as u64, 0, MAX_KEEP_ALARM_FRAMES);
    count_between(problems, &format!("{p}.drift_window"), c.drift_window as u64, DRIFT_WINDOW.0, DRIFT_WINDOW.1);
    if c.drift_bound != 0.0 {
        between(problems, &format!("{p}.drift_bound"), c.drift_bound, 0.1, 100.0, " (or 0: no drift events)");
    }
    if let (Some(d), Probe::World) = (&c.dir, probe) {
        let abs = resolve(base, d);
        if abs.exists() && !abs.is_dir() {
            problems.push(format!("{p}.dir: {} exists and is not a folder", abs.display()));
        }
    }
    CommissioningSettings {
        dir: c.dir.as_ref().map(|d| resolve(base, d)),
        keep_alarm_frames: c.keep_alarm_frames,
        drift_window: c.drift_window,
        drift_bound: c.drift_bound,
    }
}

/// Range checks on the fields one table sets (`[defaults]` or one camera),
/// before merging: a bad value is named where it is written.
fn table_fields(t: &CameraTable, p: &str, problems: &mut Vec<String>) {
    for (key, score) in [("score", &t.score), ("shadow_score", &t.shadow_score)] {
        if let Some(s) = score {
            if ScoreChoice::parse(s).is_none() {
                problems.push(format!("{p}.{key}: `{s}` is not one of {}", ScoreChoice::names().join(", ")));
            }
        }
    }
    for (key, side) in [("width", t.width), ("height", t.height)] {
        if let Some(v) = side {
            count_between(problems, &format!("{p}.{key}"), u64::from(v), 1, MAX_FRAME_SIDE);
        }
    }
    // 0 means unpaced; below a frame in 17 minutes the pacing period would
    // overflow the camera thread's clock.
    if let Some(fps) = t.fps.filter(|&f| f != 0.0) {
        between(problems, &format!("{p}.fps"), fps, 0.001, 1000.0, " (or 0: as fast as the pipeline takes them)");
    }
    if let Some(r) = &t.roi {
        if r.width == 0 || r.height == 0 {
            problems.push(format!("{p}.roi: width and height must be ≥ 1"));
        }
        // Also for sources whose frame size is known only at the first frame:
        // no frame is larger than the largest camera side.
        let far = [r.x, r.y, r.width, r.height].iter().any(|&v| u64::from(v) > MAX_FRAME_SIDE);
        if far {
            problems.push(format!("{p}.roi: x, y, width and height must each be ≤ {MAX_FRAME_SIDE}"));
        }
    }
    if let Some(a) = &t.alarm {
        alarm_fields(a, &format!("{p}.alarm"), problems);
    }
    if let Some(m) = t.mode.as_deref().filter(|m| !MODES.contains(m)) {
        problems.push(format!("{p}.mode: `{m}` is not one of {}", MODES.join(", ")));
    }
    if let Some(tr) = &t.trigger {
        trigger_fields(tr, &format!("{p}.trigger"), problems);
    }
    if let Some(l) = &t.limits {
        l.check(&format!("{p}.limits"), problems);
    }
    if let Some(tiles) = &t.tiles {
        tiles_fields(tiles, &format!("{p}.tiles"), problems);
    }
    // An hour at most: beyond that a wedged camera goes unnoticed for a shift.
    if let Some(r) = t.read_timeout_s {
        between(problems, &format!("{p}.read_timeout_s"), r, 0.1, 3600.0, "");
    }
}

/// Range checks of a `tiles` table as written (the merged tiling, whose size
/// may be the model's, is checked against its overlap, the ROI and the model
/// in [`camera_tiles`]).
fn tiles_fields(t: &TilesTable, pt: &str, problems: &mut Vec<String>) {
    if let Some(size) = t.size {
        count_between(problems, &format!("{pt}.size"), u64::from(size), 1, MAX_FRAME_SIDE);
    }
    if let Some(Overlap::Fraction(f)) = t.overlap {
        if !(0.0..1.0).contains(&f) {
            problems.push(format!(
                "{pt}.overlap: {f} is not a fraction of the tile in [0, 1) (or write a whole number of pixels)"
            ));
        }
    }
}

/// The camera's tiling: its `tiles` table (over `[defaults.tiles]`), sizes
/// defaulting to the model's; with no table, the model's own tiling (a model
/// trained on tiles is served on tiles). Checked against the ROI when its
/// size is known, so that a config `check-config` passes runs.
fn camera_tiles(
    t: &CameraTable,
    d: &CameraTable,
    p: &str,
    meta: Option<&ganomaly_core::ModelMetadata>,
    region: Option<(u32, u32)>,
    triggered: bool,
    problems: &mut Vec<String>,
) -> Option<Tiling> {
    let model_tiling = meta.and_then(|m| m.tiling);
    let written = t.tiles.as_ref().or(d.tiles.as_ref());
    let tiling = match written {
        None => model_tiling?,
        Some(table) if table.enabled == Some(false) => {
            if let Some(m) = model_tiling {
                tracing::warn!(
                    camera = p, model = %m.label(),
                    "tiles disabled: the camera scores whole frames with a model trained on tiles; calibrate it on whole frames"
                );
            }
            return None;
        }
        Some(table) => {
            // Unprobed (no model read): the demo model's side.
            let size = table.size.or(model_tiling.map(|m| m.size)).or(meta.map(|m| m.preprocess.size)).unwrap_or(64);
            let overlap = match table.overlap {
                None => 0,
                Some(Overlap::Pixels(px)) => px,
                Some(Overlap::Fraction(f)) => (f.clamp(0.0, 1.0) * f64::from(size)).round() as u32,
            };
            if overlap >= size {
                problems.push(format!(
                    "{p}.tiles.overlap: {overlap} px must be below the tile size ({size} px): tiles would not advance"
                ));
                return None;
            }
            let tiling = Tiling { size, stride: size - overlap };
            match (model_tiling, meta) {
                (Some(m), _) if m != tiling => tracing::warn!(
                    camera = p, model = %m.label(), config = %tiling.label(),
                    "the camera's tiles differ from the tiles the model was trained on (size:stride in source pixels)"
                ),
                (None, Some(_)) => tracing::warn!(
                    camera = p, config = %tiling.label(),
                    "the model was trained on whole images, the camera scores tiles: calibrate it on the tiles"
                ),
                _ => {}
            }
            tiling
        }
    };
    let key = if written.is_some() { format!("{p}.tiles") } else { format!("{p}.model") };
    if triggered {
        problems.push(format!(
            "{key}: tiles are not supported on a triggered camera yet (the model is tiled {}, or [tiles] is set; \
             `[tiles] enabled = false` scores whole frames)",
            tiling.label()
        ));
        return None;
    }
    if let Some((w, h)) = region {
        if tiling.size > w || tiling.size > h {
            problems.push(format!(
                "{key}: {} px tiles do not fit the {w}x{h} region scored (the ROI, or the frame): \
                 set a smaller {p}.tiles.size",
                tiling.size
            ));
            return None;
        }
        let n = ganomaly_core::tiles::count(w, h, tiling);
        if n > ganomaly_core::tiles::MAX_TILES {
            problems.push(format!(
                "{key}: {n} tiles of {} px at stride {} over {w}x{h}, more than {}: set a larger {p}.tiles.size or less overlap",
                tiling.size,
                tiling.stride,
                ganomaly_core::tiles::MAX_TILES
            ));
            return None;
        }
    }
    Some(tiling)
}

fn alarm_fields(a: &AlarmTable, pa: &str, problems: &mut Vec<String>) {
    for (name, v) in [("threshold", a.threshold), ("clear_threshold", a.clear_threshold)] {
        if let Some(v) = v {
            between(problems, &format!("{pa}.{name}"), v, 0.0, 1.0, " on the normalized score");
        }
    }
    not_zero(problems, &format!("{pa}.min_frames"), a.min_frames);
    not_zero(problems, &format!("{pa}.clear_frames"), a.clear_frames);
    for (name, v) in [("min_frames", a.min_frames), ("clear_frames", a.clear_frames)] {
        if let Some(v) = v.filter(|&v| v > MAX_ALARM_FRAMES) {
            count_between(problems, &format!("{pa}.{name}"), v, 1, MAX_ALARM_FRAMES);
        }
    }
    if let Some(c) = a.cooldown_s {
        between(problems, &format!("{pa}.cooldown_s"), c, 0.0, 86_400.0, "");
    }
}

/// The alarm settings of a camera: its own table over `[defaults.alarm]` over
/// the built-in defaults, field by field.
fn merged_alarm(own: Option<&AlarmTable>, defaults: Option<&AlarmTable>) -> AlarmConfig {
    let empty = AlarmTable::default();
    let (ta, da) = (own.unwrap_or(&empty), defaults.unwrap_or(&empty));
    let base = AlarmConfig::default();
    let threshold = ta.threshold.or(da.threshold).unwrap_or(base.threshold);
    // The clear threshold follows the alarm threshold unless set, so that
    // raising `threshold` alone keeps a sensible hysteresis band.
    let clear_threshold =
        ta.clear_threshold.or(da.clear_threshold).unwrap_or(threshold - (base.threshold - base.clear_threshold));
    AlarmConfig {
        threshold,
        clear_threshold,
        min_frames: ta.min_frames.or(da.min_frames).unwrap_or(base.min_frames),
        clear_frames: ta.clear_frames.or(da.clear_frames).unwrap_or(base.clear_frames),
        // Range-checked above (0..=86400 s), so the product fits.
        cooldown_ms: (ta.cooldown_s.or(da.cooldown_s).unwrap_or(0.0).max(0.0) * 1000.0) as u64,
    }
}

/// What a source sees of camera `camera`: its own `width`/`height`/`fps`/`limits`
/// over `[defaults]` over the built-in defaults.
fn context<'a>(
    camera: &'a str,
    own: &CameraTable,
    defaults: &CameraTable,
    base: &'a Path,
    probe: Probe,
) -> CameraContext<'a> {
    // Range problems were pushed by `table_fields`; the merged product is
    // checked in `camera`.
    let limits = LimitsTable::merge(own.limits.as_ref(), defaults.limits.as_ref(), camera, &mut Vec::new());
    CameraContext {
        limits,
        camera,
        base_dir: base,
        width: own.width.or(defaults.width).unwrap_or(DEFAULT_WIDTH),
        height: own.height.or(defaults.height).unwrap_or(DEFAULT_HEIGHT),
        fps: own.fps.or(defaults.fps).unwrap_or(DEFAULT_FPS),
        probe: probe == Probe::World,
    }
}

/// Merges one camera's table over `[defaults]` (the only place that does),
/// checks it against the world and compiles its plan.
fn camera(
    file: &ConfigFile,
    base: &Path,
    probe: Probe,
    name: &str,
    t: &CameraTable,
    problems: &mut Vec<String>,
) -> Option<CameraPlan> {
    let d = &file.defaults;
    let p = format!("cameras.{name}");
    let before = problems.len();
    level_name(problems, &p, name);
    table_fields(t, &p, problems);
    // Where the source and model came from, for problems with them.
    let (source, source_path) = match (&t.source, &d.source) {
        (Some(s), _) => (Some(s), format!("{p}.source")),
        (None, Some(s)) => (Some(s), "defaults.source".to_string()),
        (None, None) => {
            problems.push(format!("{p}.source: missing (set it here or in [defaults])"));
            (None, String::new())
        }
    };
    let model = t.model.as_ref().or(d.model.as_ref()).map(|m| resolve(base, m));
    if model.is_none() {
        problems.push(format!("{p}.model: missing (set it here or in [defaults])"));
    }
    let score =
        t.score.as_ref().or(d.score.as_ref()).map_or(Some(ScoreChoice::ModelDefault), |s| ScoreChoice::parse(s));
    let alarm = merged_alarm(t.alarm.as_ref(), d.alarm.as_ref());
    let mode = match t.mode.as_deref().or(d.mode.as_deref()) {
        Some("triggered") => CameraMode::Triggered(merged_trigger(
            t.trigger.as_ref(),
            d.trigger.as_ref(),
            &format!("{p}.trigger"),
            problems,
        )),
        _ => CameraMode::Continuous,
    };
    if alarm.clear_threshold > alarm.threshold {
        problems.push(format!(
            "{p}.alarm.clear_threshold: must be ≤ threshold ({} > {}): the alarm would end while still anomalous",
            alarm.clear_threshold, alarm.threshold
        ));
    }
    // Normalized scores never go below 0: a clear threshold at or under 0
    // (set, or derived as threshold − 0.05 from a tiny threshold) would keep
    // an alarm active forever.
    if alarm.clear_threshold <= 0.0 {
        problems.push(format!(
            "{p}.alarm.clear_threshold: must be > 0 (got {}; it defaults to threshold − 0.05, so set it when threshold is below 0.05): \
             a normalized score never falls below 0, so the alarm would never end",
            alarm.clear_threshold
        ));
    }
    let meta = match (&model, probe) {
        (Some(model), Probe::World) => model_check(model, score, &p, "model", "score", problems),
        _ => None,
    };
    let shadow = shadow(t, d, base, probe, &p, meta.as_ref(), problems);
    let cx = context(&p, t, d, base, probe);
    let fps = cx.fps;
    LimitsTable::merge(t.limits.as_ref(), d.limits.as_ref(), &format!("{p}.limits"), problems);
    // Range-checked in `table_fields`; kept finite here so that a bad value is
    // a problem, never a panic.
    // Unset, at least three frame intervals: a 0.1 fps camera is not wedged
    // between its frames.
    let read_timeout_s = t.read_timeout_s.or(d.read_timeout_s).filter(|v| v.is_finite()).unwrap_or(if fps > 0.0 {
        DEFAULT_READ_TIMEOUT_S.max(3.0 / fps)
    } else {
        DEFAULT_READ_TIMEOUT_S
    });
    let read_timeout = Duration::from_secs_f64(read_timeout_s.clamp(0.1, 3600.0));
    let plan = source.and_then(|s| s.compile(&cx, &source_path, problems));
    let source_key = source_key(source, &cx);
    let roi = t.roi.or(d.roi);
    let frame_size = source.and_then(|s| s.frame_size(&cx));
    // A source that delivers a known size must fit the camera's limits, or
    // every frame would be a broken frame at run time.
    if let Some((w, h)) = frame_size {
        if w > cx.limits.max_width || h > cx.limits.max_height {
            problems.push(format!(
                "{p}.width/height: a {w}x{h} frame is over the camera's limits ({}x{}): raise {p}.limits.max_width/max_height",
                cx.limits.max_width, cx.limits.max_height
            ));
        }
    }
    if let (Some(r), Some((w, h))) = (&roi, frame_size) {
        if r.x.saturating_add(r.width) > w || r.y.saturating_add(r.height) > h {
            problems.push(format!(
                "{p}.roi: {}x{} at ({}, {}) does not fit in the {w}x{h} frame",
                r.width, r.height, r.x, r.y
            ));
        }
    }
    let region = roi.map(|r| (r.width, r.height)).or(frame_size);
    let triggered = matches!(mode, CameraMode::Triggered(_));
    let tiles = camera_tiles(t, d, &p, meta.as_ref(), region, triggered, problems);
    if problems.len() != before {
        return None;
    }
    Some(CameraPlan {
        name: name.to_string(),
        source: plan?,
        model: model?,
        score: score?,
        fps,
        roi,
        alarm,
        read_timeout,
        source_key,
        shadow: shadow?,
        mode,
        tiles,
    })
}

/// What a camera thread is built from, as one number: the source table as
/// written and the frame size and limits it is compiled with. The table is
/// hashed, never shown (it may hold a password).
fn source_key(source: Option<&crate::capture::SourceConfig>, cx: &CameraContext) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&source).unwrap_or_default().hash(&mut h);
    (cx.width, cx.height, format!("{:?}", cx.limits)).hash(&mut h);
    h.finish()
}

/// `shadow_model` / `shadow_score` over `[defaults]`: the shadow must carry
/// its score and take the camera model's input (colour mode and size), since
/// it scores the same tensor. `Some(None)`: no shadow; `None`: a problem.
fn shadow(
    t: &CameraTable,
    d: &CameraTable,
    base: &Path,
    probe: Probe,
    p: &str,
    camera_model: Option<&ganomaly_core::ModelMetadata>,
    problems: &mut Vec<String>,
) -> Option<Option<ShadowPlan>> {
    let written = t.shadow_score.as_ref().or(d.shadow_score.as_ref());
    let Some(model) = t.shadow_model.as_ref().or(d.shadow_model.as_ref()).map(|m| resolve(base, m)) else {
        if written.is_some() {
            problems.push(format!("{p}.shadow_score: set without shadow_model"));
            return None;
        }
        return Some(None);
    };
    let score = written.map_or(Some(ScoreChoice::ModelDefault), |s| ScoreChoice::parse(s))?;
    if probe == Probe::World {
        let meta = model_check(&model, Some(score), p, "shadow_model", "shadow_score", problems)?;
        if let Some(cam) = camera_model {
            let (a, b) = (&cam.preprocess, &meta.preprocess);
            if (a.color, a.size) != (b.color, b.size) {
                problems.push(format!(
                    "{p}.shadow_model: {} takes {} px {:?} input, the camera's model {} px {:?}: a shadow scores the \
                     camera's own tensor, so it must take the same input (train it at the same size and colour mode)",
                    model.display(),
                    b.size,
                    b.color,
                    a.size,
                    a.color
                ));
                return None;
            }
        }
    }
    Some(Some(ShadowPlan { model, score }))
}

/// The model's own metadata must be readable and carry the score this camera
/// wants: caught here rather than at the first frame.
/// `model_key`/`score_key` name the fields in problems (`model`/`score`, or
/// the shadow's). Returns the metadata when the model is usable.
fn model_check(
    model: &Path,
    score: Option<ScoreChoice>,
    p: &str,
    model_key: &str,
    score_key: &str,
    problems: &mut Vec<String>,
) -> Option<ganomaly_core::ModelMetadata> {
    if !model.is_file() {
        problems.push(format!("{p}.{model_key}: {} does not exist", model.display()));
        return None;
    }
    match ganomaly_core::onnx::check::check_model_file(model) {
        Ok(meta) => {
            if let Some(ScoreChoice::Kind(k)) = score {
                if meta.score(k).is_none() {
                    problems.push(format!("{p}.{score_key}: model {} has no `{}` score", model.display(), k.as_str()));
                    return None;
                }
            }
            Some(meta)
        }
        Err(e) => {
            problems.push(format!("{p}.{model_key}: {}: {e}", model.display()));
            None
        }
    }
}
