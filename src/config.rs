//! The daemon's TOML configuration: global `[defaults]` that each
//! `[cameras.<name>]` table may override field by field, `[inference]`,
//! `[pipeline]`, `[snapshots]` and `[mqtt]`.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere: a misspelt key is an
//! error, not a silently ignored setting). [`Config::validate`] then checks
//! every value and reports *all* problems at once, each naming its field as a
//! dotted path (`cameras.line3.alarm.min_frames: must be ≥ 1`), so that an ops
//! engineer fixes a file in one round trip.
//!
//! Relative paths (model, replay folder, snapshot dir, TensorRT cache, ORT
//! library) are resolved against the directory of the config file, so a config
//! means the same thing whatever the working directory of the process is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ganomaly_core::synth::{Defect, Texture};
use serde::{Deserialize, Serialize};

pub use ganomaly_core::preprocess::Roi;

use crate::publish::config::MqttConfig;

/// Errors loading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n  {}", problems.len(), problems.join("\n  "))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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
    /// Directory the relative paths were resolved against (not a TOML key).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// Execution provider names, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Tensorrt,
    Cuda,
    Cpu,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Tensorrt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
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
    pub max_wait_ms: u64,
    /// ONNX Runtime intra-op threads; 0 lets ONNX Runtime pick (one per core).
    pub intra_threads: usize,
    /// Where TensorRT keeps built engines: building one takes minutes, so it is
    /// cached across restarts.
    pub trt_cache_dir: Option<PathBuf>,
    /// Let TensorRT use FP16 kernels (faster on most GPUs; scores move slightly).
    pub trt_fp16: bool,
    /// Explicit path of libonnxruntime; otherwise `ORT_DYLIB_PATH`, then the
    /// project's `.venv`.
    pub ort_library: Option<PathBuf>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            providers: vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu],
            require_accelerator: false,
            device_id: 0,
            max_batch: 8,
            max_wait_ms: 5,
            intra_threads: 0,
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
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: false, listen: "127.0.0.1:9464".into(), stale_after_s: 10.0 }
    }
}

impl MetricsConfig {
    fn validate(&self, p: &str, problems: &mut Vec<String>) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "{p}.listen: `{}` is not an address and port like 127.0.0.1:9464 or [::1]:9464",
                self.listen
            ));
        }
        if !(self.stale_after_s.is_finite() && (2.0..=3600.0).contains(&self.stale_after_s)) {
            problems.push(format!(
                "{p}.stale_after_s: must be between 2 and 3600 (got {}): an idle inference thread beats once a second",
                self.stale_after_s
            ));
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
    /// Seconds between `stats` reports to the publisher.
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
    /// `latent`, `recon`, `map_max`, `mahalanobis` or `model-default`.
    pub score: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Frames per second requested from the camera; for replay, the pacing
    /// (0 = as fast as the pipeline takes them).
    pub fps: Option<f64>,
    pub roi: Option<Roi>,
    pub alarm: Option<AlarmTable>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmTable {
    pub threshold: Option<f64>,
    pub clear_threshold: Option<f64>,
    pub min_frames: Option<u64>,
    pub clear_frames: Option<u64>,
    pub cooldown_s: Option<f64>,
}

/// Where frames come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceConfig {
    V4l2(V4l2Source),
    Replay(ReplaySource),
    Synthetic(SyntheticSource),
    #[serde(rename = "http-mjpeg")]
    HttpMjpeg(HttpMjpegSource),
}

/// An IP camera's MJPEG stream over plain HTTP (`multipart/x-mixed-replace`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMjpegSource {
    /// `http://host[:port]/path`; `http://user:password@host/...` for basic
    /// authentication (the password is never logged).
    pub url: String,
    /// Seconds to resolve, connect, and the longest silence inside the stream,
    /// before the camera counts as lost and is reopened with backoff (at most 8:
    /// a stop waits for a blocked read). A stream that sends no complete part for
    /// twice this long is lost too.
    #[serde(default = "default_http_timeout")]
    pub timeout_s: f64,
}

fn default_http_timeout() -> f64 {
    5.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V4l2Source {
    /// Device index (`"0"`) or path (`/dev/video0`, `/dev/v4l/by-id/...`).
    pub device: String,
    /// Pixel format requested from the camera: `mjpeg`, `yuyv`, `gray`, `rgb`.
    #[serde(default = "default_v4l2_format")]
    pub format: String,
}

fn default_v4l2_format() -> String {
    "mjpeg".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaySource {
    /// A folder (all png/jpg/jpeg/bmp files in it, sorted by name) or a glob.
    pub path: String,
    /// Start again at the first image after the last one.
    #[serde(default = "yes", rename = "loop")]
    pub looped: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSource {
    /// `brushed_metal`, `woven_fabric`, `wood_grain` or `noise`.
    #[serde(default = "default_texture")]
    pub texture: String,
    /// Side of the square frames generated.
    #[serde(default = "default_synth_size")]
    pub size: u32,
    #[serde(default)]
    pub seed: u64,
    /// Distinct frames generated up front and cycled: generating is slower
    /// than the model, so frames are made once.
    #[serde(default = "default_variations")]
    pub variations: u32,
    /// Defects come in episodes: in every `defect_every` frames the last
    /// `defect_frames` are defective (0 = never).
    #[serde(default)]
    pub defect_every: u64,
    #[serde(default)]
    pub defect_frames: u64,
    /// Defect kinds cycled through episode by episode.
    #[serde(default = "default_defects")]
    pub defects: Vec<String>,
    /// Defect strength in (0, 1].
    #[serde(default = "default_strength")]
    pub strength: f32,
}

fn default_texture() -> String {
    "brushed_metal".into()
}
fn default_synth_size() -> u32 {
    256
}
fn default_variations() -> u32 {
    8
}
fn default_defects() -> Vec<String> {
    vec!["scratch".into(), "stain".into(), "crack".into(), "hole".into()]
}
fn default_strength() -> f32 {
    0.8
}

pub const V4L2_FORMATS: [&str; 4] = ["mjpeg", "yuyv", "gray", "rgb"];

/// Which model score drives a camera's alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreChoice {
    ModelDefault,
    Kind(ganomaly_core::ScoreKind),
}

impl ScoreChoice {
    pub fn parse(s: &str) -> Option<ScoreChoice> {
        if s == "model-default" {
            return Some(ScoreChoice::ModelDefault);
        }
        ganomaly_core::ScoreKind::parse(s).map(ScoreChoice::Kind)
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

/// A camera with its defaults applied: what the pipeline runs.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    pub name: String,
    pub source: SourceConfig,
    pub model: PathBuf,
    pub score: ScoreChoice,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    pub roi: Option<Roi>,
    pub alarm: AlarmConfig,
}

const DEFAULT_WIDTH: u32 = 640;
const DEFAULT_HEIGHT: u32 = 480;
const DEFAULT_FPS: f64 = 15.0;

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let cfg = Config::parse(&text, &base).map_err(|message| ConfigError::Parse { path: path.into(), message })?;
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid { path: path.into(), problems })
        }
    }

    /// Parses TOML (no validation) and resolves relative paths against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.base_dir = base.to_path_buf();
        // The [mqtt] files follow the same rule as every other path here.
        if let Some(m) = cfg.mqtt.as_mut() {
            let rel = |p: &mut PathBuf| {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            };
            rel(&mut m.outbox_path);
            if let Some(p) = m.password_file.as_mut() {
                rel(p);
            }
            if let Some(t) = m.tls.as_mut() {
                rel(&mut t.ca_file);
                if let Some(p) = t.cert_file.as_mut() {
                    rel(p);
                }
                if let Some(p) = t.key_file.as_mut() {
                    rel(p);
                }
            }
        }
        Ok(cfg)
    }

    /// Resolves a path from the config against its directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Cameras with defaults applied, in name order. Call after [`validate`](Self::validate)
    /// returned no problems; fields that are still missing get built-in defaults.
    pub fn cameras(&self) -> Vec<CameraConfig> {
        self.cameras.iter().filter_map(|(name, t)| self.camera(name, t).ok()).collect()
    }

    fn camera(&self, name: &str, t: &CameraTable) -> Result<CameraConfig, Vec<String>> {
        let d = &self.defaults;
        let p = format!("cameras.{name}");
        let mut problems = Vec::new();
        let source = t.source.clone().or_else(|| d.source.clone());
        if source.is_none() {
            problems.push(format!("{p}.source: missing (set it here or in [defaults])"));
        }
        let model = t.model.clone().or_else(|| d.model.clone());
        if model.is_none() {
            problems.push(format!("{p}.model: missing (set it here or in [defaults])"));
        }
        let score_text = t.score.clone().or_else(|| d.score.clone()).unwrap_or_else(|| "model-default".into());
        let score = ScoreChoice::parse(&score_text).unwrap_or(ScoreChoice::ModelDefault);
        let da = d.alarm.clone().unwrap_or_default();
        let ta = t.alarm.clone().unwrap_or_default();
        let base = AlarmConfig::default();
        let threshold = ta.threshold.or(da.threshold).unwrap_or(base.threshold);
        // The clear threshold follows the alarm threshold unless set, so that
        // raising `threshold` alone keeps a sensible hysteresis band.
        let clear_threshold =
            ta.clear_threshold.or(da.clear_threshold).unwrap_or(threshold - (base.threshold - base.clear_threshold));
        let alarm = AlarmConfig {
            threshold,
            clear_threshold,
            min_frames: ta.min_frames.or(da.min_frames).unwrap_or(base.min_frames),
            clear_frames: ta.clear_frames.or(da.clear_frames).unwrap_or(base.clear_frames),
            cooldown_ms: (ta.cooldown_s.or(da.cooldown_s).unwrap_or(0.0).max(0.0) * 1000.0) as u64,
        };
        match (source, model) {
            (Some(source), Some(model)) if problems.is_empty() => Ok(CameraConfig {
                name: name.to_string(),
                source,
                model: self.resolve(&model),
                score,
                width: t.width.or(d.width).unwrap_or(DEFAULT_WIDTH),
                height: t.height.or(d.height).unwrap_or(DEFAULT_HEIGHT),
                fps: t.fps.or(d.fps).unwrap_or(DEFAULT_FPS),
                roi: t.roi.or(d.roi),
                alarm,
            }),
            _ => Err(problems),
        }
    }

    /// Every problem in the file, each naming its field. Empty means valid.
    /// Checks the files the config points at too (model, replay images,
    /// camera devices) so that `check-config` as `ExecStartPre` catches them.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        self.inference.validate("inference", self, &mut problems);
        self.pipeline.validate("pipeline", &mut problems);
        self.snapshots.validate("snapshots", &mut problems);
        self.metrics.validate("metrics", &mut problems);
        if let Some(mqtt) = &self.mqtt {
            mqtt.validate("mqtt", &mut problems);
        }
        self.defaults.validate_fields("defaults", &mut problems);
        if self.cameras.is_empty() {
            problems.push("cameras: at least one camera is needed ([cameras.<name>])".into());
        }
        for (name, table) in &self.cameras {
            let p = format!("cameras.{name}");
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                // The name becomes an MQTT topic level and a file name.
                problems.push(format!("{p}: camera names may only hold letters, digits, `_` and `-`"));
            }
            table.validate_fields(&p, &mut problems);
            match self.camera(name, table) {
                Ok(cam) => cam.validate_resolved(&p, self, &mut problems),
                Err(mut missing) => problems.append(&mut missing),
            }
        }
        problems
    }
}

impl InferenceConfig {
    fn validate(&self, p: &str, cfg: &Config, problems: &mut Vec<String>) {
        if self.providers.is_empty() {
            problems.push(format!("{p}.providers: list at least one of tensorrt, cuda, cpu"));
        }
        if self.require_accelerator && self.providers.iter().all(|x| *x == Provider::Cpu) {
            problems
                .push(format!("{p}.require_accelerator: true, but providers lists no accelerator (tensorrt, cuda)"));
        }
        if !(1..=256).contains(&self.max_batch) {
            problems.push(format!("{p}.max_batch: must be between 1 and 256 (got {})", self.max_batch));
        }
        if self.max_wait_ms > 1000 {
            problems.push(format!(
                "{p}.max_wait_ms: must be ≤ 1000 (got {}): it is latency added to every frame",
                self.max_wait_ms
            ));
        }
        if self.intra_threads > 1024 {
            problems.push(format!("{p}.intra_threads: must be ≤ 1024 (got {})", self.intra_threads));
        }
        if let Some(lib) = &self.ort_library {
            let lib = cfg.resolve(lib);
            if !lib.is_file() {
                problems.push(format!("{p}.ort_library: {} does not exist", lib.display()));
            }
        }
    }
}

impl PipelineConfig {
    fn validate(&self, p: &str, problems: &mut Vec<String>) {
        if !(1..=64).contains(&self.preprocess_threads) {
            problems
                .push(format!("{p}.preprocess_threads: must be between 1 and 64 (got {})", self.preprocess_threads));
        }
        if !(1..=64).contains(&self.frame_queue) {
            problems.push(format!("{p}.frame_queue: must be between 1 and 64 (got {})", self.frame_queue));
        }
        if !(self.stats_interval_s.is_finite() && self.stats_interval_s > 0.0) {
            problems.push(format!("{p}.stats_interval_s: must be > 0 (got {})", self.stats_interval_s));
        }
    }
}

impl SnapshotConfig {
    fn validate(&self, p: &str, problems: &mut Vec<String>) {
        if !(1..=100).contains(&self.quality) {
            problems.push(format!("{p}.quality: must be between 1 and 100 (got {})", self.quality));
        }
        if !(0.0..=1.0).contains(&self.overlay_alpha) {
            problems.push(format!("{p}.overlay_alpha: must be between 0 and 1 (got {})", self.overlay_alpha));
        }
        if self.enabled && self.retain == 0 {
            problems.push(format!("{p}.retain: must be ≥ 1 while snapshots are enabled"));
        }
        if self.enabled && self.dir.as_os_str().is_empty() {
            problems.push(format!("{p}.dir: must not be empty while snapshots are enabled"));
        }
    }
}

impl CameraTable {
    /// Range checks on the fields this table sets (defaults or one camera).
    fn validate_fields(&self, p: &str, problems: &mut Vec<String>) {
        if let Some(s) = &self.score {
            if ScoreChoice::parse(s).is_none() {
                problems
                    .push(format!("{p}.score: `{s}` is not one of latent, recon, map_max, mahalanobis, model-default"));
            }
        }
        if self.width == Some(0) {
            problems.push(format!("{p}.width: must be ≥ 1"));
        }
        if self.height == Some(0) {
            problems.push(format!("{p}.height: must be ≥ 1"));
        }
        if let Some(fps) = self.fps {
            if !(fps.is_finite() && (0.0..=1000.0).contains(&fps)) {
                problems.push(format!("{p}.fps: must be between 0 and 1000 (got {fps})"));
            }
        }
        if let Some(r) = &self.roi {
            if r.width == 0 || r.height == 0 {
                problems.push(format!("{p}.roi: width and height must be ≥ 1"));
            }
        }
        if let Some(a) = &self.alarm {
            let pa = format!("{p}.alarm");
            for (name, v) in [("threshold", a.threshold), ("clear_threshold", a.clear_threshold)] {
                if let Some(v) = v {
                    if !(0.0..=1.0).contains(&v) {
                        problems.push(format!("{pa}.{name}: must be between 0 and 1 (normalized score; got {v})"));
                    }
                }
            }
            if a.min_frames == Some(0) {
                problems.push(format!("{pa}.min_frames: must be ≥ 1"));
            }
            if a.clear_frames == Some(0) {
                problems.push(format!("{pa}.clear_frames: must be ≥ 1"));
            }
            if let Some(c) = a.cooldown_s {
                if !(c.is_finite() && (0.0..=86_400.0).contains(&c)) {
                    problems.push(format!("{pa}.cooldown_s: must be between 0 and 86400 (got {c})"));
                }
            }
        }
        if let Some(s) = &self.source {
            s.validate_fields(&format!("{p}.source"), problems);
        }
    }
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::V4l2(_) => "v4l2",
            SourceConfig::Replay(_) => "replay",
            SourceConfig::Synthetic(_) => "synthetic",
            SourceConfig::HttpMjpeg(_) => "http-mjpeg",
        }
    }

    fn validate_fields(&self, p: &str, problems: &mut Vec<String>) {
        match self {
            SourceConfig::V4l2(v) => {
                if !V4L2_FORMATS.contains(&v.format.as_str()) {
                    problems.push(format!("{p}.format: `{}` is not one of {}", v.format, V4L2_FORMATS.join(", ")));
                }
                if let Err(e) = crate::capture::v4l2::DeviceSpec::parse(&v.device) {
                    problems.push(format!("{p}.device: {e}"));
                }
            }
            SourceConfig::Replay(r) => {
                if r.path.trim().is_empty() {
                    problems.push(format!("{p}.path: must not be empty"));
                }
            }
            SourceConfig::HttpMjpeg(h) => {
                let shown = crate::capture::http_mjpeg::redact(&h.url);
                match h.url.split_once("://") {
                    Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") && !rest.is_empty() => {}
                    Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => problems.push(format!(
                        "{p}.url: `{shown}`: https is not supported (cameras on a plant network serve plain http; put a TLS proxy in front otherwise)"
                    )),
                    _ => problems.push(format!("{p}.url: `{shown}` is not an http:// URL")),
                }
                // A read blocks the camera thread for up to timeout_s, and shutdown
                // waits for it: kept well below systemd's TimeoutStopSec (20 s).
                if !(h.timeout_s.is_finite() && (0.1..=8.0).contains(&h.timeout_s)) {
                    problems.push(format!("{p}.timeout_s: must be between 0.1 and 8 (got {})", h.timeout_s));
                }
            }
            SourceConfig::Synthetic(s) => {
                if Texture::parse(&s.texture).is_none() {
                    let names: Vec<&str> = Texture::ALL.iter().map(|t| t.as_str()).collect();
                    problems.push(format!("{p}.texture: `{}` is not one of {}", s.texture, names.join(", ")));
                }
                for d in &s.defects {
                    if Defect::parse(d).is_none() {
                        let names: Vec<&str> = Defect::ALL.iter().map(|d| d.as_str()).collect();
                        problems.push(format!("{p}.defects: `{d}` is not one of {}", names.join(", ")));
                    }
                }
                if !(16..=4096).contains(&s.size) {
                    problems.push(format!("{p}.size: must be between 16 and 4096 (got {})", s.size));
                }
                if !(1..=1024).contains(&s.variations) {
                    problems.push(format!("{p}.variations: must be between 1 and 1024 (got {})", s.variations));
                }
                if s.defect_frames > s.defect_every {
                    problems.push(format!(
                        "{p}.defect_frames: must be ≤ defect_every ({} > {})",
                        s.defect_frames, s.defect_every
                    ));
                }
                if s.defect_every > 0 && (s.defect_frames == 0 || s.defects.is_empty()) {
                    problems.push(format!(
                        "{p}.defect_frames: must be ≥ 1 (and defects non-empty) when defect_every is set"
                    ));
                }
                if !(s.strength > 0.0 && s.strength <= 1.0) {
                    problems.push(format!("{p}.strength: must be in (0, 1] (got {})", s.strength));
                }
            }
        }
    }
}

impl CameraConfig {
    /// Checks that need the merged settings and the outside world.
    fn validate_resolved(&self, p: &str, cfg: &Config, problems: &mut Vec<String>) {
        let a = &self.alarm;
        if a.clear_threshold > a.threshold {
            problems.push(format!(
                "{p}.alarm.clear_threshold: must be ≤ threshold ({} > {}): the alarm would end while still anomalous",
                a.clear_threshold, a.threshold
            ));
        }
        // Normalized scores never go below 0: a clear threshold at or under 0
        // (set, or derived as threshold − 0.05 from a tiny threshold) would
        // keep an alarm active forever.
        if a.clear_threshold <= 0.0 {
            problems.push(format!(
                "{p}.alarm.clear_threshold: must be > 0 (got {}; it defaults to threshold − 0.05, so set it when threshold is below 0.05): \
                 a normalized score never falls below 0, so the alarm would never end",
                a.clear_threshold
            ));
        }
        if !self.model.is_file() {
            problems.push(format!("{p}.model: {} does not exist", self.model.display()));
        } else {
            // The model's own metadata must be readable, and carry the score
            // this camera wants: caught here rather than at the first frame.
            match ganomaly_core::onnx::read_metadata_file(&self.model) {
                Ok(meta) => {
                    if let ScoreChoice::Kind(k) = self.score {
                        if meta.score(k).is_none() {
                            problems.push(format!(
                                "{p}.score: model {} has no `{}` score",
                                self.model.display(),
                                k.as_str()
                            ));
                        }
                    }
                }
                Err(e) => problems.push(format!("{p}.model: {}: {e}", self.model.display())),
            }
        }
        match &self.source {
            SourceConfig::V4l2(v) => {
                if let Ok(spec) = crate::capture::v4l2::DeviceSpec::parse(&v.device) {
                    if let Err(e) = spec.resolve() {
                        problems.push(format!("{p}.source.device: {e}"));
                    }
                }
                if self.fps == 0.0 {
                    problems.push(format!("{p}.fps: a camera needs a frame rate ≥ 1"));
                }
            }
            SourceConfig::Replay(r) => {
                let path = cfg.resolve(Path::new(&r.path));
                match crate::capture::replay::list_images(&path) {
                    Ok(files) if files.is_empty() => {
                        problems.push(format!("{p}.source.path: no images (png, jpg, jpeg, bmp) at {}", path.display()))
                    }
                    Ok(_) => {}
                    Err(e) => problems.push(format!("{p}.source.path: {e}")),
                }
            }
            SourceConfig::Synthetic(_) | SourceConfig::HttpMjpeg(_) => {}
        }
        // Frame size is known up front for cameras and synthetic frames; a
        // replay image's size is only known when it is read.
        let frame = match &self.source {
            SourceConfig::V4l2(_) => Some((self.width, self.height)),
            SourceConfig::Synthetic(s) => Some((s.size, s.size)),
            SourceConfig::Replay(_) | SourceConfig::HttpMjpeg(_) => None,
        };
        if let (Some(r), Some((w, h))) = (&self.roi, frame) {
            if r.x.saturating_add(r.width) > w || r.y.saturating_add(r.height) > h {
                problems.push(format!(
                    "{p}.roi: {}x{} at ({}, {}) does not fit in the {w}x{h} frame",
                    r.width, r.height, r.x, r.y
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/nonexistent")).expect("parses")
    }

    #[test]
    fn camera_inherits_defaults_and_overrides_single_fields() {
        let cfg = parse(
            r#"
            [defaults]
            model = "/m.onnx"
            fps = 10
            score = "recon"
            source = { kind = "synthetic" }
            [defaults.alarm]
            min_frames = 4
            threshold = 0.6
            [cameras.a]
            [cameras.b]
            fps = 30
            score = "map_max"
            [cameras.b.alarm]
            min_frames = 2
            "#,
        );
        let cams = cfg.cameras();
        assert_eq!(cams.len(), 2);
        let (a, b) = (&cams[0], &cams[1]);
        assert_eq!(a.fps, 10.0);
        assert_eq!(a.alarm.min_frames, 4);
        assert_eq!(a.score, ScoreChoice::Kind(ganomaly_core::ScoreKind::Recon));
        assert_eq!(b.fps, 30.0);
        assert_eq!(b.alarm.min_frames, 2);
        // Not overridden: inherited from [defaults.alarm], not the built-in default.
        assert_eq!(b.alarm.threshold, 0.6);
        // Clear threshold follows the threshold when unset.
        assert!((b.alarm.clear_threshold - 0.55).abs() < 1e-9);
        assert_eq!(b.score, ScoreChoice::Kind(ganomaly_core::ScoreKind::MapMax));
        assert_eq!(a.model, PathBuf::from("/m.onnx"));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let cfg = Config::parse(
            "[defaults]\nmodel = \"../models/x.onnx\"\nsource = { kind = \"synthetic\" }\n[cameras.a]\n",
            Path::new("/etc/ganomalyd"),
        )
        .expect("parses");
        assert_eq!(cfg.cameras()[0].model, PathBuf::from("/etc/ganomalyd/../models/x.onnx"));
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let cfg = parse(
            r#"
            [inference]
            max_batch = 0
            [pipeline]
            frame_queue = 0
            [defaults]
            model = "/does/not/exist.onnx"
            [cameras.line3]
            source = { kind = "synthetic", texture = "plaid", size = 64 }
            roi = { x = 60, y = 0, width = 10, height = 10 }
            score = "psnr"
            [cameras.line3.alarm]
            min_frames = 0
            threshold = 0.4
            clear_threshold = 0.6
            "#,
        );
        let problems = cfg.validate();
        let want = [
            "inference.max_batch:",
            "pipeline.frame_queue:",
            "cameras.line3.alarm.min_frames: must be ≥ 1",
            "cameras.line3.alarm.clear_threshold: must be ≤ threshold",
            "cameras.line3.source.texture: `plaid`",
            "cameras.line3.score: `psnr`",
            "cameras.line3.roi:",
            "cameras.line3.model: /does/not/exist.onnx does not exist",
        ];
        for w in want {
            assert!(problems.iter().any(|p| p.starts_with(w)), "missing `{w}` in {problems:#?}");
        }
        assert_eq!(problems.len(), want.len(), "{problems:#?}");
    }

    #[test]
    fn unknown_keys_are_rejected_at_every_level() {
        for text in [
            "colour = 1\n",
            "[inference]\nprovider = [\"cpu\"]\n",
            "[cameras.a]\nfsp = 3\n",
            "[cameras.a.alarm]\nmin_frame = 3\n",
            "[cameras.a]\nsource = { kind = \"replay\", path = \"x\", lop = true }\n",
            "[cameras.a]\nsource = { kind = \"firewire\" }\n",
        ] {
            assert!(Config::parse(text, Path::new("/")).is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err = Config::parse("[cameras.a]\nfps = \"fast\"\n", Path::new("/")).unwrap_err();
        assert!(err.contains("fps"), "{err}");
    }

    #[test]
    fn missing_camera_device_is_named() {
        let cfg = parse(
            "[defaults]\nmodel = \"/m.onnx\"\n[cameras.cam1]\nsource = { kind = \"v4l2\", device = \"/dev/video97\" }\n",
        );
        let problems = cfg.validate();
        assert!(
            problems.iter().any(|p| p.starts_with("cameras.cam1.source.device:") && p.contains("/dev/video97")),
            "{problems:#?}"
        );
    }

    #[test]
    fn shipped_configs_use_only_known_keys_and_sane_values() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        // On a dev machine the example's models, devices and files don't
        // exist; anything else it reports is a mistake in the example.
        let example = Config::parse(include_str!("../config/ganomalyd.toml"), &dir).expect("example parses");
        for p in example.validate() {
            assert!(p.contains("does not exist") || p.starts_with("mqtt."), "example config: {p}");
        }
        assert_eq!(example.cameras().len(), 2);
        let demo = Config::parse(include_str!("../config/demo.toml"), &dir).expect("demo parses");
        for p in demo.validate() {
            assert!(p.contains("models/demo.onnx"), "demo config: {p}");
        }
        let cams = demo.cameras();
        assert!(matches!(cams[0].source, SourceConfig::Synthetic(ref s) if s.defect_every > 0));
        assert_eq!(cams[0].model, dir.join("../models/demo.onnx"));
    }

    #[test]
    fn no_cameras_is_a_problem() {
        assert!(parse("").validate().iter().any(|p| p.starts_with("cameras:")));
    }
}
