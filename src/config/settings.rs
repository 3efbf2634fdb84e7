//! Compiled settings: what `run` starts from, after every check passed.
//!
//! Names are enums, durations are [`Duration`]s, paths are resolved against
//! the config file's directory, and each camera is one [`CameraPlan`] with its
//! `[defaults]` applied. Nothing downstream parses a string from the config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ganomaly_core::preprocess::Roi;
use ganomaly_core::ScoreKind;
use serde::{Deserialize, Serialize};

use crate::capture::SourcePlan;
use crate::publish::config::MqttConfig;

/// Everything the daemon runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub inference: InferenceSettings,
    pub pipeline: PipelineSettings,
    /// `None`: snapshots are off.
    pub snapshots: Option<SnapshotSettings>,
    /// In name order; never empty.
    pub cameras: Vec<CameraPlan>,
    /// `None`: no `[mqtt]` table, or `enabled = false` (alarms are only logged).
    pub mqtt: Option<MqttConfig>,
    /// `None`: the metrics endpoint is off.
    pub metrics: Option<MetricsSettings>,
    pub commands: crate::commands::CommandSettings,
    /// `None`: no `[sparkplug]` table, or `enabled = false`.
    pub sparkplug: Option<crate::publish::SparkplugSettings>,
    /// `None`: `[record] enabled = false`.
    pub record: Option<RecordSettings>,
    /// `None`: the console is off.
    pub console: Option<crate::console::config::ConsoleSettings>,
    pub commissioning: CommissioningSettings,
}

/// `[record]` while enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordSettings {
    /// Absolute.
    pub path: PathBuf,
    pub max_age: Duration,
    pub max_rows: u64,
}

/// `[commissioning]`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct CommissioningSettings {
    /// Absolute; `None`: record/calibrate/feedback commands are refused.
    pub dir: Option<PathBuf>,
    pub keep_alarm_frames: usize,
    pub drift_window: usize,
    /// 0: no drift events.
    pub drift_bound: f64,
}

impl Default for CommissioningSettings {
    fn default() -> Self {
        CommissioningSettings { dir: None, keep_alarm_frames: 16, drift_window: 500, drift_bound: 1.0 }
    }
}

impl CommissioningSettings {
    /// Where live calibrations are kept (`calibration.json` in `dir`).
    pub fn calibration_file(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("calibration.json"))
    }
}

/// Execution provider names, in the order they are tried.
/// serde, clap and [`Provider::as_str`] all spell them in lowercase; a test
/// holds the three together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Tensorrt,
    Cuda,
    Cpu,
}

impl Provider {
    /// The name in the config, on the command line, in logs and `stats`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Tensorrt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }

    /// Every name, in the order they are tried by default.
    pub fn names() -> Vec<&'static str> {
        <Provider as clap::ValueEnum>::value_variants().iter().map(|p| p.as_str()).collect()
    }
}

/// `[inference]`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceSettings {
    pub providers: Vec<Provider>,
    pub require_accelerator: bool,
    pub device_id: u32,
    pub max_batch: usize,
    /// How long a batch waits to fill once it holds a frame.
    pub max_wait: Duration,
    pub intra_threads: usize,
    /// ONNX Runtime's intra-op threads busy-wait between operators (`spin`).
    pub spin: bool,
    /// Absolute.
    pub trt_cache_dir: Option<PathBuf>,
    pub trt_fp16: bool,
    /// Absolute; `None`: `ORT_DYLIB_PATH`, then `/usr/lib/ganomalyd/`.
    pub ort_library: Option<PathBuf>,
}

/// `[pipeline]`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSettings {
    pub preprocess_threads: usize,
    pub frame_queue: usize,
    pub stats_interval: Duration,
}

/// `[snapshots]` while enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSettings {
    /// Absolute.
    pub dir: PathBuf,
    pub retain: usize,
    pub quality: u8,
    pub overlay_alpha: f32,
}

/// `[metrics]` while enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
    pub stale_after: Duration,
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Which model score drives a camera's alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreChoice {
    ModelDefault,
    Kind(ScoreKind),
}

impl ScoreChoice {
    const MODEL_DEFAULT: &'static str = "model-default";

    pub fn parse(s: &str) -> Option<ScoreChoice> {
        if s == Self::MODEL_DEFAULT {
            return Some(ScoreChoice::ModelDefault);
        }
        ScoreKind::parse(s).map(ScoreChoice::Kind)
    }

    /// Every name `parse` accepts, for error messages.
    pub fn names() -> Vec<&'static str> {
        ScoreKind::ALL.iter().map(|k| k.as_str()).chain([Self::MODEL_DEFAULT]).collect()
    }

    /// The kind this choice means for a model whose default is `default`.
    pub fn kind(self, default: ScoreKind) -> ScoreKind {
        match self {
            ScoreChoice::ModelDefault => default,
            ScoreChoice::Kind(k) => k,
        }
    }
}

/// Alarm timing of one camera (DESIGN.md "Scores and alarms"). Thresholds are
/// on the normalized score, where the model's calibrated threshold is 0.5.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlarmConfig {
    pub threshold: f64,
    /// Hysteresis: an active alarm clears only below this.
    pub clear_threshold: f64,
    /// Consecutive frames at or above `threshold` that raise an alarm.
    pub min_frames: u64,
    /// Consecutive frames below `clear_threshold` that end it.
    pub clear_frames: u64,
    /// Quiet time after an alarm ends before another may start.
    pub cooldown_ms: u64,
}

impl Default for AlarmConfig {
    fn default() -> Self {
        AlarmConfig { threshold: 0.5, clear_threshold: 0.45, min_frames: 3, clear_frames: 5, cooldown_ms: 0 }
    }
}

/// One camera with its defaults applied: what the pipeline runs.
#[derive(Debug, Clone)]
pub struct CameraPlan {
    pub name: String,
    pub source: Arc<dyn SourcePlan>,
    /// Absolute.
    pub model: PathBuf,
    pub score: ScoreChoice,
    /// Pacing for sources that do not pace themselves (0 = as fast as taken).
    pub fps: f64,
    pub roi: Option<Roi>,
    pub alarm: AlarmConfig,
    /// A read of the source longer than this reports the camera offline.
    pub read_timeout: Duration,
    /// Digest of what the camera thread is built from (the source table as
    /// written, width, height, limits): a reload restarts the camera when it
    /// changes. Compared within one process only.
    pub source_key: u64,
    /// A candidate model scoring the same frames (`shadow_model`).
    pub shadow: Option<ShadowPlan>,
    pub mode: CameraMode,
    /// The ROI scored as a grid of tiles (`[cameras.<name>.tiles]`, or the
    /// model's own tiling); `None`: the whole ROI resized to the model's input.
    pub tiles: Option<ganomaly_core::tiles::Tiling>,
}

/// How a camera is inspected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CameraMode {
    /// Every frame scored; alarms and scores published.
    Continuous,
    /// Frames buffered; a verdict per triggered part (`trigger.rs`).
    Triggered(TriggerSettings),
}

impl CameraMode {
    pub fn trigger(&self) -> Option<&TriggerSettings> {
        match self {
            CameraMode::Continuous => None,
            CameraMode::Triggered(t) => Some(t),
        }
    }
}

/// Which frames judge a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FramesFrom {
    /// The buffered frames captured nearest the trigger time (+ delay).
    Nearest,
    /// The next frames captured from the trigger time (+ delay) on.
    After,
}

/// How the scores of a part's frames combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    Max,
    Mean,
}

/// `[cameras.<name>.trigger]`, compiled (ranges in `config/compile.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TriggerSettings {
    pub frames: usize,
    pub from: FramesFrom,
    /// Milliseconds (ms, not a `Duration`: it is added to wall-clock trigger times).
    pub delay_ms: u64,
    pub aggregate: Aggregate,
    #[serde(serialize_with = "millis")]
    pub deadline: Duration,
    pub buffer_frames: usize,
    pub tolerance_ms: u64,
    pub max_pending: usize,
    pub dedup_parts: usize,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl Default for TriggerSettings {
    fn default() -> Self {
        TriggerSettings {
            frames: 1,
            from: FramesFrom::Nearest,
            delay_ms: 0,
            aggregate: Aggregate::Max,
            deadline: Duration::from_millis(500),
            buffer_frames: 8,
            tolerance_ms: 1000,
            max_pending: 64,
            dedup_parts: 1024,
        }
    }
}

/// `shadow_model` / `shadow_score` of a camera, compiled: checked to take the
/// same input as the camera's model (it scores the same tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowPlan {
    /// Absolute.
    pub model: PathBuf,
    pub score: ScoreChoice,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_agree_in_serde_clap_and_logs() {
        for p in <Provider as clap::ValueEnum>::value_variants() {
            let clap = clap::ValueEnum::to_possible_value(p).expect("named");
            assert_eq!(clap.get_name(), p.as_str());
            assert_eq!(serde_json::to_string(p).expect("serializes"), format!("\"{}\"", p.as_str()));
        }
        assert_eq!(Provider::names(), ["tensorrt", "cuda", "cpu"]);
    }
}
