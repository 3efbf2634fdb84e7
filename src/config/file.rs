//! The TOML file as written: every table and key, with serde defaults.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere: a misspelt key is an
//! error, not a silently ignored setting). Values that need checking stay as
//! written here (names as strings, durations as seconds); [`compile`](super::compile)
//! turns them into [`Settings`](super::Settings) once.
//!
//! Durations: every duration key ends in `_s` and takes seconds, fractions
//! allowed (`max_wait_s = 0.005`). Old `_ms` keys are refused with the name of
//! their replacement (see `renamed.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::settings::Provider;
use crate::capture::limits::LimitsTable;
use crate::capture::SourceConfig;
use crate::publish::config::MqttConfig;
use ganomaly_core::preprocess::Roi;

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub inference: InferenceConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub snapshots: SnapshotConfig,
    /// Settings every camera inherits unless its own table sets them.
    #[serde(default)]
    pub defaults: CameraTable,
    /// Cameras by name; the name is used in MQTT topics, file names and logs.
    #[serde(default)]
    pub cameras: BTreeMap<String, CameraTable>,
    /// MQTT publisher; absent means scores and alarms are only logged.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// Prometheus `/metrics` and `/healthz` over HTTP (off by default).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Commands over MQTT and HTTP (`trigger`, `reload`, …): off by default.
    #[serde(default)]
    pub commands: CommandsConfig,
    /// Sparkplug B edge node (absent: none).
    #[serde(default)]
    pub sparkplug: Option<crate::publish::sparkplug::SparkplugConfig>,
    /// The inspection record: every verdict and alarm, kept in SQLite with retention.
    #[serde(default)]
    pub record: RecordConfig,
    /// The web console (`console/`): off by default.
    #[serde(default)]
    pub console: crate::console::config::ConsoleConfig,
    /// Recording, live calibration, drift and operator feedback (README "Commissioning a line").
    #[serde(default)]
    pub commissioning: CommissioningConfig,
}

/// `[record]`: the audit trail of verdicts and alarms (`record.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordConfig {
    pub enabled: bool,
    /// The SQLite file; unset: `record.sqlite` beside the MQTT outbox (without
    /// `[mqtt]` and without `path`, nothing is recorded).
    pub path: Option<PathBuf>,
    /// Rows older than this (wall clock) are deleted: 90 days by default.
    pub max_age_s: f64,
    /// At most this many rows are kept (oldest deleted first).
    pub max_rows: u64,
}

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig { enabled: true, path: None, max_age_s: 90.0 * 86_400.0, max_rows: 1_000_000 }
    }
}

/// `[commissioning]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommissioningConfig {
    /// Folder of the line's own data: `record/<name>/train/good/` (the `record`
    /// command), `feedback/<camera>/val/...` (the `feedback` command) and
    /// `calibration.json` (live calibrations). Relative to the config file.
    /// Unset: those commands are refused and no live calibration is read.
    pub dir: Option<PathBuf>,
    /// ROIs (full resolution) of the most recent alarm starts kept in memory per
    /// camera, for `feedback` to store (a 640×480 RGB ROI is 0.9 MiB).
    pub keep_alarm_frames: usize,
    /// Scores of alarm-free frames in the drift window.
    pub drift_window: usize,
    /// Drift bound: the window's median may move this many reference spreads
    /// (the calibration's p95 − p50) from the reference median before a `drift`
    /// event; 0 turns drift events off (the metric stays).
    pub drift_bound: f64,
}

impl Default for CommissioningConfig {
    fn default() -> Self {
        CommissioningConfig { dir: None, keep_alarm_frames: 16, drift_window: 500, drift_bound: 1.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Off unless asked for: a daemon nobody meant to control remotely acts on
    /// no stray message (each is still answered, `refused`, with the reason).
    pub enabled: bool,
    /// The commands carried out; the others are refused.
    pub allow: Vec<String>,
    /// Also accept commands as `POST /api/cmd/<camera>/<name>` on the
    /// `[metrics]` port (which must then listen on loopback).
    pub http: bool,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            enabled: false,
            allow: crate::commands::CommandName::names().into_iter().map(String::from).collect(),
            http: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Tried in order; the first that registers runs the model. CPU is always
    /// the last resort, whether listed or not, unless `require_accelerator`.
    pub providers: Vec<Provider>,
    /// Refuse to start rather than silently run on the CPU: a box sized for a
    /// GPU would fall far behind its cameras on the CPU.
    pub require_accelerator: bool,
    /// CUDA device index for the CUDA and TensorRT providers.
    pub device_id: u32,
    /// Frames from all cameras are batched up to this size: bigger batches use
    /// the cores better, but every frame in a batch waits for the slowest.
    pub max_batch: usize,
    /// How long the inference thread waits to fill a batch once it holds one
    /// frame: bounds the latency batching adds.
    pub max_wait_s: f64,
    /// ONNX Runtime intra-op threads; 0 lets ONNX Runtime pick (one per core).
    pub intra_threads: usize,
    /// Let ONNX Runtime's intra-op threads busy-wait between operators instead of
    /// sleeping. Off by default: on a box whose cores the cameras and
    /// preprocessing share, spinning threads take their CPU under load. On: lower
    /// latency at low load (a sleeping thread pool wakes slowly after an idle
    /// gap between frames; see benches/README.md "Latency at low load").
    pub spin: bool,
    /// Where TensorRT keeps built engines: building one takes minutes, so it is
    /// cached across restarts.
    pub trt_cache_dir: Option<PathBuf>,
    /// Let TensorRT use FP16 kernels (faster on most GPUs; scores move slightly).
    pub trt_fp16: bool,
    /// Explicit path of libonnxruntime; otherwise `ORT_DYLIB_PATH`, then the
    /// package's `/usr/lib/ganomalyd/` (see `runtime.rs`: no `.venv` is searched).
    pub ort_library: Option<PathBuf>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            providers: vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu],
            require_accelerator: false,
            device_id: 0,
            max_batch: 8,
            max_wait_s: 0.005,
            intra_threads: 0,
            spin: false,
            trt_cache_dir: None,
            trt_fp16: true,
            ort_library: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Off unless asked for: an edge box should not open a port nobody uses.
    pub enabled: bool,
    /// `host:port` to listen on; loopback by default (put a reverse proxy or
    /// `0.0.0.0:PORT` behind a firewall in front of it to scrape from afar).
    pub listen: String,
    /// `/healthz` answers 503 once the inference threads have shown no life for
    /// this long (they beat at least once a second, frames or not).
    pub stale_after_s: f64,
    /// Connections served at once; one more is answered 503 and closed, so
    /// idle or leaked client sockets cannot exhaust the daemon's file descriptors.
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's head (and stay idle
    /// between requests) before it is closed.
    pub header_timeout_s: f64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            listen: "127.0.0.1:9464".into(),
            stale_after_s: 10.0,
            max_connections: 32,
            header_timeout_s: 5.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Threads that decode/crop/resize/normalise frames. Preprocessing is a
    /// fraction of the model's cost, so one is enough on small boxes.
    pub preprocess_threads: usize,
    /// Frames queued per camera before the oldest is dropped: small, because a
    /// stale frame is worth less than a fresh one and the queue is latency.
    pub frame_queue: usize,
    /// Seconds between `stats` reports (logged, and published over MQTT).
    pub stats_interval_s: f64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig { preprocess_threads: 1, frame_queue: 2, stats_interval_s: 10.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    pub enabled: bool,
    pub dir: PathBuf,
    /// Newest snapshots kept on disk; older ones are deleted so a flapping
    /// alarm cannot fill the disk.
    pub retain: usize,
    /// JPEG quality 1–100.
    pub quality: u8,
    /// Opacity of the heat overlay, 0 (invisible) to 1 (opaque).
    pub overlay_alpha: f32,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            enabled: true,
            dir: PathBuf::from("/var/lib/ganomalyd/snapshots"),
            retain: 200,
            quality: 85,
            overlay_alpha: 0.5,
        }
    }
}

/// A camera table, or `[defaults]`: every field optional so that a camera
/// inherits what it does not set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraTable {
    pub source: Option<SourceConfig>,
    pub model: Option<PathBuf>,
    /// `latent`, `recon`, `map_max`, `mahalanobis`, `patch`, `fused` or `model-default` (the snapshot heat map is the score's own map when it has one: `patch`).
    pub score: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Frames per second requested from the camera; for replay, the pacing
    /// (0 = as fast as the pipeline takes them).
    pub fps: Option<f64>,
    pub roi: Option<Roi>,
    pub alarm: Option<AlarmTable>,
    /// Largest frame accepted from the camera (width, height, encoded bytes);
    /// fields inherit `[defaults].limits` one by one.
    pub limits: Option<LimitsTable>,
    /// Seconds one read of the source (a frame, or opening it) may take before
    /// the camera is reported offline: a driver read that never returns.
    pub read_timeout_s: Option<f64>,
    /// A candidate model that scores the same frames on `<camera>/shadow/...`
    /// and never raises the camera's alarm (see `shadow.rs`).
    pub shadow_model: Option<PathBuf>,
    /// The shadow model's score (`model-default` unless set).
    pub shadow_score: Option<String>,
    /// `continuous` (every frame scored, alarms) or `triggered` (a verdict per
    /// part on `cmd/trigger`, see `[cameras.<name>.trigger]`).
    pub mode: Option<String>,
    /// Triggered inspection; fields inherit `[defaults.trigger]` one by one.
    pub trigger: Option<TriggerTable>,
    /// Score the ROI as a grid of tiles, each resized to the model's input
    /// (see `tiles.rs`); the table as a whole overrides `[defaults.tiles]`.
    pub tiles: Option<TilesTable>,
}

/// `[cameras.<name>.tiles]` (or `[defaults.tiles]`): the ROI cut into square
/// tiles of `size` source pixels, neighbours sharing `overlap`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TilesTable {
    /// `false`: score the whole frame, even with a model trained on tiles
    /// (a triggered camera, or a line that wants the old behaviour). Default true.
    pub enabled: Option<bool>,
    /// Tile side in source pixels. Default: the tiling the model was trained
    /// on, else the model's input side (tiles scored at the camera's resolution).
    pub size: Option<u32>,
    /// Pixels shared by neighbouring tiles: a whole number of pixels (`16`),
    /// or a fraction of the tile side below 1 (`0.25`). Default 0.
    pub overlap: Option<Overlap>,
}

/// A tile overlap as written: pixels, or a fraction of the tile side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Overlap {
    Pixels(u32),
    Fraction(f64),
}

/// `[defaults.trigger]` or `[cameras.<name>.trigger]`; unset fields inherit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerTable {
    /// Frames scored per part (default 1).
    pub frames: Option<u64>,
    /// `nearest`: the buffered frames captured nearest the trigger time (+ delay);
    /// `after`: the next `frames` frames captured from the trigger time + delay on.
    pub from: Option<String>,
    /// Seconds from the trigger to the part being in view (added to the trigger time).
    pub delay_s: Option<f64>,
    /// How the part's frame scores combine: `max` or `mean`.
    pub aggregate: Option<String>,
    /// Seconds from the trigger's arrival within which a verdict is always
    /// published (`timeout` or `error` if no better one).
    pub deadline_s: Option<f64>,
    /// Frames kept in the camera's ring buffer (memory: frames × width × height × 3 bytes).
    pub buffer_frames: Option<u64>,
    /// A frame further than this from the trigger time does not judge the part (`error`).
    pub tolerance_s: Option<f64>,
    /// Triggers waiting for their verdict at once; one more is answered `timeout`.
    pub max_pending: Option<u64>,
    /// Part ids remembered per camera for de-duplication (the newest this many).
    pub dedup_parts: Option<u64>,
}

/// `[defaults.alarm]` or `[cameras.<name>.alarm]`; unset fields inherit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmTable {
    /// Normalized score (0–1; the model's calibrated threshold is 0.5) at
    /// or above which a frame counts toward an alarm.
    pub threshold: Option<f64>,
    /// An active alarm ends only below this (hysteresis); default threshold − 0.05.
    pub clear_threshold: Option<f64>,
    /// Consecutive frames at or above `threshold` that raise an alarm.
    pub min_frames: Option<u64>,
    /// Consecutive frames below `clear_threshold` that end it.
    pub clear_frames: Option<u64>,
    /// Seconds after an alarm ends before another may start.
    pub cooldown_s: Option<f64>,
}
