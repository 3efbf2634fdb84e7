//! `ganomalyd bench`: how much the daemon adds around the model.
//!
//! In one run, on this machine:
//! 1. **raw ORT**: the model's session alone (same batch size, same threads,
//!    same session code) on preprocessed synthetic frames → `raw_ort_fps`;
//! 2. **pipeline**: the real pipeline (camera threads, preprocess pool,
//!    batching inference thread, alarm machines) with N synthetic cameras
//!    together offering a little more than the raw rate (`--offer`, default
//!    1.1×), so the model is the bottleneck and the figure says what the
//!    rest of the pipeline costs → `pipeline_fps`, `ratio`, capture→decision
//!    latency p50/p99, frames dropped at the cameras, peak RSS.
//!
//!
//! `--paced FPS` gives every camera that rate instead (4 × 15 fps: latency at
//! low load, against one batch-1 inference plus preprocessing, measured in
//! the same run); `--rss-breakdown` runs the pipeline alone, as the daemon
//! does, and reads `VmRSS` at each stage (ORT loaded, session built and
//! threads started, first batches, steady state); `--fixture 128x32` benches
//! a random-weights model of that size and width (core's `random_model`: all
//! scores, feature statistics included; weights do not change speed);
//! `--export DIR` writes the model and frames for the Python peer
//! (`benches/peer.py`); `benches/table.py` (`make bench`) runs it all.
//!
//! Figures from noisy shared machines vary run to run; that is why speed is
//! measured here and never asserted in tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ganomaly_core::preprocess::Preprocessor;
use ganomaly_core::synth::{self, Texture};
use serde::Serialize;

use crate::capture::{self, CaptureError, FrameData, FrameSource, PixelFormat, SourceFactory, SourcePlan};
use crate::commands::{CommandName, CommandSettings, Intake};
use crate::config::{
    AlarmConfig, CameraMode, CameraPlan, InferenceSettings, PipelineSettings, Provider, ScoreChoice, Settings,
    TriggerSettings,
};
use crate::events::{AlarmEvent, Publisher, ScoreEvent, Snapshot, StatsReport, Verdict, VerdictEvent};
use crate::infer::{BatchOutput, InferError, Model};
use crate::metrics::{peak_rss_mb, rss_mb, CameraCounters, LatencyHistogram, StageLatency, STAGE_NAMES};
use crate::pipeline::{Pipeline, PipelineError, StartOptions};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] InferError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("cannot write the fixture model: {0}")]
    Fixture(String),
    #[error("cannot preprocess the bench frames: {0}")]
    Preprocess(#[from] ganomaly_core::preprocess::PreprocessError),
    #[error("the pipeline decided no frame within {0:?}")]
    Stalled(Duration),
    #[error("cannot export the bench inputs to {path}: {reason}")]
    Export { path: PathBuf, reason: String },
}

/// `ganomalyd bench`: raw ONNX Runtime throughput against the whole pipeline's.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 1)]
    pub cameras: usize,
    /// Frames measured (raw ORT and pipeline alike).
    #[arg(long, default_value_t = 2000)]
    pub frames: u64,
    #[arg(long)]
    pub json: bool,
    /// Model to bench (default: models/demo.onnx, else a random-weights fixture of its shape).
    #[arg(long, conflicts_with = "fixture")]
    pub model: Option<PathBuf>,
    /// Bench a random-weights model of `SIDExNGF` instead (e.g. `128x32`: 128 px, ngf = ndf 32, RGB, nz 100).
    #[arg(long, value_parser = fixture_shape)]
    pub fixture: Option<(u32, u32)>,
    /// The score the cameras use (default: the model's own).
    #[arg(long, value_parser = score_choice)]
    pub score: Option<ScoreChoice>,
    /// Every camera at this frame rate instead of `--offer` (latency at a given load).
    #[arg(long)]
    pub paced: Option<f64>,
    /// Paced cameras deliver at the same instants (all started together)
    /// instead of spread over the frame period as free-running cameras are.
    #[arg(long)]
    pub aligned: bool,
    /// The pipeline alone, as the daemon runs it: RSS at each stage.
    #[arg(long)]
    pub rss_breakdown: bool,
    /// Write the model (`model.onnx`) and the frames (`frameN.png`) to this
    /// folder for `benches/peer.py`, and stop.
    #[arg(long)]
    pub export: Option<PathBuf>,
    #[arg(long = "batch", default_value_t = 8)]
    pub max_batch: usize,
    /// Seconds a batch waits to fill (the config's `inference.max_wait_s`).
    #[arg(long, default_value_t = 0.005, value_parser = seconds)]
    pub max_wait_s: f64,
    /// ONNX Runtime intra-op threads (0 = one per core).
    #[arg(long = "threads", default_value_t = 0)]
    pub intra_threads: usize,
    /// Intra-op threads busy-wait between operators (the config's `inference.spin`).
    #[arg(long)]
    pub spin: bool,
    #[arg(long, default_value_t = 1)]
    pub preprocess_threads: usize,
    /// Camera frame size (synthetic texture resized to it).
    #[arg(long, default_value_t = 640)]
    pub width: u32,
    #[arg(long, default_value_t = 480)]
    pub height: u32,
    /// Load offered by the cameras, as a multiple of the raw ORT rate.
    #[arg(long, default_value_t = 1.1)]
    pub offer: f64,
    /// libonnxruntime to load (default: ORT_DYLIB_PATH, then /usr/lib/ganomalyd/).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
    /// Triggered inspection instead: `--cameras` triggered cameras (use 4) at
    /// `--parts-per-s` parts a second each; trigger → verdict latency next to
    /// one batch-1 inference plus preprocessing.
    #[arg(long)]
    pub triggered: bool,
    /// Parts a second per camera (`--triggered`).
    #[arg(long, default_value_t = 10.0)]
    pub parts_per_s: f64,
    /// Parts per camera measured (`--triggered`).
    #[arg(long, default_value_t = 200)]
    pub parts: u64,
    /// Frame rate of each triggered camera (`--triggered`).
    #[arg(long, default_value_t = 30.0)]
    pub camera_fps: f64,
    /// Score every frame as tiles of SIZE source pixels every STRIDE (`tiles.rs`):
    /// raw ORT stays in model inputs per second, the pipeline counts frames.
    #[arg(long, value_name = "SIZE[:STRIDE]", value_parser = tiling)]
    pub tiles: Option<ganomaly_core::tiles::Tiling>,
}

fn tiling(s: &str) -> Result<ganomaly_core::tiles::Tiling, String> {
    ganomaly_core::tiles::Tiling::parse(s).map_err(|e| e.to_string())
}

/// A wait in seconds that a `Duration` can hold (0..=1 s, as the config allows).
fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

/// `SIDExNGF`, e.g. `128x32`.
fn fixture_shape(s: &str) -> Result<(u32, u32), String> {
    let (side, ngf) = s.split_once('x').ok_or_else(|| format!("`{s}` is not SIDExNGF (e.g. 128x32)"))?;
    let n = |v: &str| v.parse::<u32>().map_err(|e| format!("`{v}`: {e}"));
    Ok((n(side)?, n(ngf)?))
}

fn score_choice(s: &str) -> Result<ScoreChoice, String> {
    ScoreChoice::parse(s).ok_or_else(|| format!("`{s}` is not one of {}", ScoreChoice::names().join(", ")))
}

/// Runs the bench and prints its report (text, or one JSON line).
pub fn run(args: &Args) -> anyhow::Result<std::process::ExitCode> {
    if let Some(dir) = &args.export {
        let written = export(args, dir)?;
        println!("{}", serde_json::to_string(&written)?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if args.rss_breakdown {
        let report = measure_rss(args)?;
        emit(args.json, &report, || report.text())?;
    } else if args.triggered {
        let report = measure_triggered(args)?;
        emit(args.json, &report, || report.text())?;
    } else {
        let report = measure(args)?;
        emit(args.json, &report, || report.text())?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Prints one report: one JSON line with `--json`, else its text.
fn emit<T: Serialize>(json: bool, report: &T, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{}", text());
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub provider: String,
    pub cameras: usize,
    pub frames: u64,
    pub batch: usize,
    pub intra_threads: usize,
    pub frame_size: String,
    /// Mean of the raw runs before and after the pipeline run.
    pub raw_ort_fps: f64,
    pub raw_ort_fps_before: f64,
    pub raw_ort_fps_after: f64,
    /// One thread of core preprocessing alone, frames per second.
    pub preprocess_fps: f64,
    pub offered_fps: f64,
    pub pipeline_fps: f64,
    pub ratio: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub dropped: u64,
    pub broken: u64,
    pub peak_rss_mb: f64,
    /// Model inputs per frame: its tiles (`--tiles`), else 1. `raw_ort_fps` is
    /// inputs per second; `ratio` compares the pipeline's frames with raw ORT's
    /// inputs ÷ this.
    pub tiles_per_frame: usize,
    /// The cameras' score, and each camera's rate when `--paced`.
    pub score: String,
    pub paced_fps: Option<f64>,
    pub aligned: bool,
    /// One batch-1 inference and one frame's preprocessing (medians, this
    /// run): the latency reference (`p99 / reference`, the goal is ≤ 2).
    pub infer_b1_ms: f64,
    /// `--paced`: the same batch-1 run after sleeping the gap between two
    /// frames (all cameras together), as the inference thread meets it at low
    /// load: a thread pool (and a VM's idle cores) woken from sleep.
    pub infer_b1_after_gap_ms: Option<f64>,
    /// Intra-op threads spin (`--spin`).
    pub spin: bool,
    pub preprocess_ms: f64,
    pub p99_ratio: f64,
    /// The measured frames' latency by stage (`metrics::STAGE_NAMES`): where
    /// capture → decision went.
    pub stages: Vec<StageFigure>,
}

/// One stage of the latency, over the measured frames.
#[derive(Debug, Clone, Serialize)]
pub struct StageFigure {
    pub stage: &'static str,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn stage_figures(s: &StageLatency) -> Vec<StageFigure> {
    STAGE_NAMES
        .iter()
        .zip(&s.0)
        .map(|(stage, h)| StageFigure { stage, p50_ms: h.quantile(0.5), p99_ms: h.quantile(0.99) })
        .collect()
}

/// Publisher that only counts: the bench measures the frame path, not MQTT.
#[derive(Default)]
struct Discard;

impl Publisher for Discard {
    fn score(&self, _: &ScoreEvent) {}
    fn alarm(&self, _: &AlarmEvent) {}
    fn camera_online(&self, _: &str, _: bool) {}
    fn alarm_state(&self, _: &str, _: bool) {}
    fn snapshot(&self, _: &Snapshot) {}
    fn stats(&self, _: &StatsReport) {}
}

/// Cycles pre-made frames: costs a copy per frame, like a camera driver's.
struct BenchSource {
    frames: Arc<Vec<FrameData>>,
    next: usize,
    pace: Option<Pace>,
    gate: Arc<Gate>,
    /// Frames delivered since the gate opened (paced sources).
    k: u32,
}

/// A bench camera's own clock: frame `k` is due at `offset + k × period`
/// after the gate opened. Cameras are spread over the period (camera `i` of
/// `n` at `i / n` of it), as free-running cameras are, instead of all
/// delivering at the same instant because they were started together.
#[derive(Debug, Clone, Copy)]
struct Pace {
    period: Duration,
    offset: Duration,
}

/// Holds every bench camera's first frame until opened, so that the RSS of
/// a started pipeline with no frame in it can be read.
#[derive(Debug, Default)]
struct Gate {
    open: AtomicBool,
    at: OnceLock<Instant>,
}

impl Gate {
    fn opened() -> Arc<Gate> {
        let g = Arc::new(Gate::default());
        g.open();
        g
    }
    fn open(&self) {
        let _ = self.at.set(Instant::now());
        self.open.store(true, Ordering::Release);
    }
    /// Waits until open; when it opened.
    fn wait(&self) -> Instant {
        while !self.open.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.at.get().copied().unwrap_or_else(Instant::now)
    }
}

/// Camera `next` of the bench: cycles the shared frames from its own offset.
struct BenchPlan {
    frames: Arc<Vec<FrameData>>,
    next: usize,
    pace: Option<Pace>,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for BenchPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BenchPlan({} frames from {})", self.frames.len(), self.next)
    }
}

impl SourcePlan for BenchPlan {
    fn factory(&self) -> SourceFactory {
        capture::factory(BenchSource {
            frames: self.frames.clone(),
            next: self.next,
            pace: self.pace,
            gate: self.gate.clone(),
            k: 0,
        })
    }
}

impl FrameSource for BenchSource {
    fn describe(&self) -> String {
        "bench frames".into()
    }
    fn self_paced(&self) -> bool {
        self.pace.is_some()
    }
    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        let start = self.gate.wait();
        if let Some(p) = self.pace {
            let due = start + p.offset + p.period * self.k;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else if now - due > p.period * 4 {
                // Far behind (the box stalled us): skip ahead instead of bursting.
                self.k = ((now - start).saturating_sub(p.offset).as_secs_f64() / p.period.as_secs_f64()) as u32;
            }
            self.k += 1;
        }
        let f = &self.frames[self.next % self.frames.len()];
        self.next += 1;
        out.reshape(f.width, f.height, f.format).copy_from_slice(&f.data);
        Ok(())
    }
}

fn frames(width: u32, height: u32) -> Vec<FrameData> {
    (0..4u64)
        .map(|i| {
            let sq = synth::good(Texture::BrushedMetal, width.max(height).min(1024), 7, i);
            let img = image::imageops::resize(&sq, width, height, image::imageops::FilterType::Triangle);
            FrameData { width, height, format: PixelFormat::Rgb8, data: img.into_raw() }
        })
        .collect()
}

/// The model to bench: the given one, the bundled demo model, or a
/// random-weights fixture of the demo's shape (64×64 RGB, ngf 32).
fn model_path(opts: &Args, tmp: &Path) -> Result<PathBuf, BenchError> {
    if let Some(m) = &opts.model {
        return Ok(m.clone());
    }
    if let Some((side, ngf)) = opts.fixture {
        let arch = ganomaly_core::ArchSpec {
            isize: side,
            nc: 3,
            nz: 100,
            ngf,
            ndf: ngf,
            extralayers: 0,
            ..Default::default()
        };
        let bytes = ganomaly_core::onnx::random_model(&arch, 1).map_err(|e| BenchError::Fixture(e.to_string()))?;
        let p = tmp.join(format!("fixture-{side}px-ngf{ngf}.onnx"));
        std::fs::write(&p, bytes).map_err(|e| BenchError::Fixture(e.to_string()))?;
        return Ok(p);
    }
    let demo = PathBuf::from("models/demo.onnx");
    if demo.is_file() {
        return Ok(demo);
    }
    let arch =
        ganomaly_core::ArchSpec { isize: 64, nc: 3, nz: 100, ngf: 32, ndf: 32, extralayers: 0, ..Default::default() };
    let bytes = ganomaly_core::onnx::random_model(&arch, 1).map_err(|e| BenchError::Fixture(e.to_string()))?;
    let p = tmp.join("bench-fixture.onnx");
    std::fs::write(&p, bytes).map_err(|e| BenchError::Fixture(e.to_string()))?;
    tracing::warn!("models/demo.onnx not found: benchmarking a random-weights 64x64x3 ngf 32 fixture");
    Ok(p)
}

/// The session settings of both bench modes: the CPU provider and the
/// command line's batching and threads.
fn inference(opts: &Args) -> InferenceSettings {
    InferenceSettings {
        providers: vec![Provider::Cpu],
        max_batch: opts.max_batch.max(1),
        max_wait: Duration::from_secs_f64(opts.max_wait_s),
        intra_threads: opts.intra_threads,
        spin: opts.spin,
        // Relative to the working directory, as a command-line path is.
        ort_library: opts.ort_library.as_deref().map(crate::base::paths::absolute),
        ..InferenceSettings::default()
    }
}

/// What the bench cameras share: frames, model, score, and the gate.
struct Rig<'a> {
    frames: &'a Arc<Vec<FrameData>>,
    model: &'a Path,
    score: ScoreChoice,
    gate: Arc<Gate>,
}

/// A bench camera `i`: the shared frames, offset by `i`, at `fps`; paced
/// by its own clock (`pace`, continuous cameras) or by the camera thread.
fn camera(name: &str, i: usize, rig: &Rig<'_>, fps: f64, pace: Option<Pace>, mode: CameraMode) -> CameraPlan {
    CameraPlan {
        name: name.to_string(),
        source: Arc::new(BenchPlan { frames: rig.frames.clone(), next: i, pace, gate: rig.gate.clone() }),
        model: rig.model.to_path_buf(),
        score: rig.score,
        fps,
        roi: None,
        alarm: AlarmConfig::default(),
        read_timeout: Duration::from_secs(10),
        source_key: i as u64,
        shadow: None,
        mode,
        tiles: None,
    }
}

/// The daemon's settings around the bench cameras: no MQTT, snapshots,
/// metrics, commands or console; stats effectively never.
fn settings(inference: InferenceSettings, cameras: Vec<CameraPlan>, opts: &Args) -> Settings {
    Settings {
        inference,
        pipeline: PipelineSettings {
            preprocess_threads: opts.preprocess_threads.max(1),
            frame_queue: 2,
            stats_interval: Duration::from_secs(3600),
        },
        snapshots: None,
        cameras,
        mqtt: None,
        sparkplug: None,
        metrics: None,
        commands: Default::default(),
        record: None,
        console: None,
        commissioning: Default::default(),
    }
}

/// The figures of one bench run.
pub fn measure(opts: &Args) -> Result<BenchReport, BenchError> {
    let tmp = std::env::temp_dir().join(format!("ganomalyd-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&tmp);
    let model = model_path(opts, &tmp)?;
    let infer = inference(opts);
    let frames = Arc::new(frames(opts.width, opts.height));
    let score = opts.score.unwrap_or(ScoreChoice::ModelDefault);

    // 1. Raw ORT: the session alone, full batches.
    // Dropped before the pipeline starts so that its threads and memory do
    // not count against the pipeline; loaded again for the second raw run.
    let (raw_before, provider, preprocess_fps, default_score) = {
        let mut raw = RawRun::new(&model, &infer, &frames, score)?;
        (raw.measure(opts.frames)?, raw.provider(), raw.preprocess_fps(&frames)?, raw.model.meta.default_score)
    };
    // Frames per second the session could take: inputs ÷ the tiles of a frame.
    let per_frame = opts.tiles.map_or(1, |t| ganomaly_core::tiles::count(opts.width, opts.height, t)).max(1);
    let raw_fps = raw_before / per_frame as f64;
    // The latency reference: one frame's preprocessing and one batch-1 run.
    let (infer_b1_ms, preprocess_ms) = {
        let mut raw = RawRun::new(&model, &InferenceSettings { max_batch: 1, ..infer.clone() }, &frames, score)?;
        (raw.batch1_ms(200)?, raw.preprocess_ms(&frames, 200)?)
    };
    let infer_b1_after_gap_ms = match opts.paced {
        Some(fps) if fps > 0.0 => {
            let gap = Duration::from_secs_f64(1.0 / (fps * opts.cameras.max(1) as f64));
            let mut raw = RawRun::new(&model, &InferenceSettings { max_batch: 1, ..infer.clone() }, &frames, score)?;
            Some(raw.batch1_after_gap_ms(100, gap)?)
        }
        _ => None,
    };

    // 2. The pipeline, offered a little more than the model can take (or `--paced`).
    let n = opts.cameras.max(1);
    let per_camera = opts.paced.unwrap_or(raw_fps * opts.offer / n as f64);
    let offered = per_camera * n as f64;
    let rig = Rig { frames: &frames, model: &model, score, gate: Gate::opened() };
    let spread = if opts.aligned { 0 } else { n };
    let cameras = (0..n)
        .map(|i| {
            let mut c = continuous(&rig, i, spread, per_camera);
            c.tiles = opts.tiles;
            c
        })
        .collect();
    let settings = settings(infer, cameras, opts);
    let pipeline =
        Pipeline::start(&settings, Arc::new(Discard), StartOptions { stats: false, ..StartOptions::default() })?;
    let warmup = (opts.max_batch as u64 * 4).max(16);
    let limit = Duration::from_secs(60);
    wait_for(&pipeline, warmup, limit)?;
    for (_, c) in pipeline.counters() {
        c.reset_latency();
    }
    let sum = |f: fn(&CameraCounters) -> u64| -> u64 { pipeline.counters().iter().map(|(_, c)| f(c)).sum() };
    let d0 = pipeline.decided();
    let drops0 = sum(|c| CameraCounters::get(&c.dropped));
    let t0 = Instant::now();
    wait_for(
        &pipeline,
        d0 + opts.frames,
        limit + Duration::from_secs_f64(opts.frames as f64 / raw_fps.max(1.0) * 4.0),
    )?;
    let elapsed = t0.elapsed().as_secs_f64();
    let d1 = pipeline.decided();
    let dropped = sum(|c| CameraCounters::get(&c.dropped)) - drops0;
    let report = pipeline.shutdown();
    let pipeline_fps = (d1 - d0) as f64 / elapsed;
    // Raw ORT again, after: on a shared machine the load drifts, and the
    // ratio should compare like with like.
    let raw_after = RawRun::new(&model, &settings.inference, &frames, score)?.measure(opts.frames)?;
    let raw_fps = (raw_before + raw_after) / 2.0;
    let _ = std::fs::remove_dir_all(&tmp);
    let raw_frame_fps = raw_fps / per_frame as f64;
    let p99_ms = report.latency.quantile(0.99);
    Ok(BenchReport {
        model: model.display().to_string(),
        provider,
        cameras: n,
        frames: opts.frames,
        batch: opts.max_batch,
        intra_threads: opts.intra_threads,
        frame_size: format!("{}x{}", opts.width, opts.height),
        raw_ort_fps: raw_fps,
        raw_ort_fps_before: raw_before,
        raw_ort_fps_after: raw_after,
        preprocess_fps,
        offered_fps: offered,
        pipeline_fps,
        ratio: pipeline_fps / raw_frame_fps,
        p50_ms: report.latency.quantile(0.5),
        p99_ms,
        dropped,
        broken: report.cameras.iter().map(|c| c.broken).sum(),
        peak_rss_mb: peak_rss_mb().unwrap_or(0.0),
        tiles_per_frame: per_frame,
        score: match rig.score {
            ScoreChoice::Kind(k) => k,
            ScoreChoice::ModelDefault => default_score,
        }
        .as_str()
        .to_string(),
        paced_fps: opts.paced,
        aligned: opts.aligned,
        infer_b1_ms,
        infer_b1_after_gap_ms,
        spin: opts.spin,
        preprocess_ms,
        p99_ratio: p99_ms / (infer_b1_ms + preprocess_ms).max(1e-9),
        stages: stage_figures(&report.stages),
    })
}

/// Continuous bench camera `i` at `fps`, on its own clock, its frames at
/// `i / spread` of the period (`spread` 0: every camera at its start).
fn continuous(rig: &Rig<'_>, i: usize, spread: usize, fps: f64) -> CameraPlan {
    let period = Duration::from_secs_f64(1.0 / fps.max(0.1));
    let phase = if spread == 0 { 0.0 } else { (i % spread) as f64 / spread as f64 };
    let pace = Pace { period, offset: period.mul_f64(phase) };
    camera(&format!("bench{i}"), i, rig, fps, Some(pace), CameraMode::Continuous)
}

/// The session alone, on full batches of preprocessed frames.
struct RawRun {
    model: Model,
    input: Vec<f32>,
    batch: usize,
}

impl RawRun {
    /// The session the pipeline's inference thread builds for bench cameras
    /// scoring with `score` (no snapshots, no live view): the graph pruned to
    /// that score (`infer::Wants`), so that raw ORT and the pipeline run the
    /// same graph and their ratio is the pipeline's cost alone.
    fn new(
        path: &Path,
        infer: &InferenceSettings,
        frames: &[FrameData],
        score: ScoreChoice,
    ) -> Result<RawRun, BenchError> {
        let bytes = crate::infer::read_model_file(path)?;
        let m = Model::from_bytes_for(&bytes, path, infer, |meta| {
            Some(crate::infer::Wants { kinds: [score.kind(meta.default_score)].into(), maps: Default::default() })
        })?;
        drop(bytes);
        let mut prep = Preprocessor::from_meta(&m.meta.preprocess);
        let len = m.tensor_len();
        let b = infer.max_batch;
        let mut input = vec![0.0f32; len * b];
        for i in 0..b {
            let f = &frames[i % frames.len()];
            prep.run(&frame_ref(f), None, &mut input[i * len..(i + 1) * len])?;
        }
        Ok(RawRun { model: m, input, batch: b })
    }

    fn provider(&self) -> String {
        self.model.provider.as_str().to_string()
    }

    fn measure(&mut self, frames: u64) -> Result<f64, BenchError> {
        let m = &mut self.model;
        let mut out = BatchOutput::default();
        for _ in 0..3 {
            m.run(&self.input, self.batch, &mut out)?;
        }
        let batches = frames.div_ceil(self.batch as u64).max(1);
        let t = Instant::now();
        for _ in 0..batches {
            m.run(&self.input, self.batch, &mut out)?;
        }
        Ok((batches * self.batch as u64) as f64 / t.elapsed().as_secs_f64())
    }

    fn preprocess_fps(&self, frames: &[FrameData]) -> Result<f64, BenchError> {
        let m = &self.model;
        let mut prep = Preprocessor::from_meta(&m.meta.preprocess);
        let mut out = vec![0.0f32; m.tensor_len()];
        let n = 500;
        let t = Instant::now();
        for i in 0..n {
            prep.run(&frame_ref(&frames[i % frames.len()]), None, &mut out)?;
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    }
}

fn frame_ref(f: &FrameData) -> ganomaly_core::preprocess::FrameRef<'_> {
    ganomaly_core::preprocess::FrameRef {
        width: f.width,
        height: f.height,
        layout: crate::preprocess::layout(f.format),
        data: &f.data,
    }
}

fn wait_for(p: &Pipeline, decided: u64, limit: Duration) -> Result<(), BenchError> {
    let t = Instant::now();
    while p.decided() < decided {
        if t.elapsed() > limit {
            return Err(BenchError::Stalled(limit));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

impl BenchReport {
    pub fn text(&self) -> String {
        let gap = self
            .infer_b1_after_gap_ms
            .map(|g| format!("\nafter idle gap  {g:>8.2} ms = batch-1 inference after sleeping one frame interval"))
            .unwrap_or_default();
        let text = format!(
            "model {} on {} ({} camera(s) of {}, batch {}, {} intra threads{})\n\
             raw ORT         {:>8.1} fps (before {:.1}, after {:.1})\n\
             preprocess      {:>8.1} fps (one thread)\n\
             pipeline        {:>8.1} fps (offered {:.1})\n\
             ratio           {:>8.3}\n\
             latency p50/p99 {:>8.2} / {:.2} ms (capture → alarm decision, score {})\n\
             reference       {:>8.2} ms = batch-1 inference {:.2} + preprocessing {:.2}; p99 / reference {:.2}\n\
             dropped         {:>8} frames at the cameras (load above capacity, by design)\n\
             peak RSS        {:>8.1} MiB\n\
             tiles per frame {:>8} (raw ORT in model inputs/s: {:.1} frames/s)",
            self.model,
            self.provider,
            self.cameras,
            self.frame_size,
            self.batch,
            if self.intra_threads == 0 { "auto".to_string() } else { self.intra_threads.to_string() },
            if self.spin { ", spinning" } else { "" },
            self.raw_ort_fps,
            self.raw_ort_fps_before,
            self.raw_ort_fps_after,
            self.preprocess_fps,
            self.pipeline_fps,
            self.offered_fps,
            self.ratio,
            self.p50_ms,
            self.p99_ms,
            self.score,
            self.infer_b1_ms + self.preprocess_ms,
            self.infer_b1_ms,
            self.preprocess_ms,
            self.p99_ratio,
            self.dropped,
            self.peak_rss_mb,
            self.tiles_per_frame,
            self.raw_ort_fps / self.tiles_per_frame.max(1) as f64
        );
        let stages: String = self
            .stages
            .iter()
            .map(|s| format!("\n  {:<15} {:>6.2} / {:.2} ms (p50 / p99)", s.stage, s.p50_ms, s.p99_ms))
            .collect();
        text + &gap + "\nlatency by stage" + &stages
    }
}

/// The figures of `bench --triggered`.
#[derive(Debug, Clone, Serialize)]
pub struct TriggeredReport {
    pub model: String,
    pub provider: String,
    pub cameras: usize,
    pub parts_per_s: f64,
    pub camera_fps: f64,
    pub frame_size: String,
    pub max_wait_s: f64,
    /// Triggers sent (measured ones) and verdicts received for them.
    pub triggers: u64,
    pub verdicts: u64,
    pub ok: u64,
    pub ng: u64,
    pub error: u64,
    pub timeout: u64,
    /// Trigger arrival → verdict decided.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// One batch-1 inference (median) and one frame's preprocessing (median), measured in this run.
    pub infer_b1_ms: f64,
    pub preprocess_ms: f64,
    pub reference_ms: f64,
    /// p99 / reference; the goal is ≤ 2.
    pub p99_ratio: f64,
}

impl TriggeredReport {
    pub fn text(&self) -> String {
        format!(
            "model {} on {} ({} triggered camera(s) of {} at {} fps, {} parts/s each, max_wait_s {})\n\
             verdicts        {:>8} of {} triggers (ok {}, ng {}, error {}, timeout {})\n\
             trigger→verdict {:>8.2} / {:.2} ms p50/p99 (max {:.2})\n\
             reference       {:>8.2} ms = batch-1 inference {:.2} + preprocessing {:.2} (medians, this run)\n\
             p99 / reference {:>8.2} (goal ≤ 2)",
            self.model,
            self.provider,
            self.cameras,
            self.frame_size,
            self.camera_fps,
            self.parts_per_s,
            self.max_wait_s,
            self.verdicts,
            self.triggers,
            self.ok,
            self.ng,
            self.error,
            self.timeout,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.reference_ms,
            self.infer_b1_ms,
            self.preprocess_ms,
            self.p99_ratio
        )
    }
}

/// Collects the verdicts' latencies; everything else is dropped.
#[derive(Default)]
struct VerdictMeter {
    latency: std::sync::Mutex<LatencyHistogram>,
    counts: std::sync::Mutex<[u64; 4]>,
}

impl VerdictMeter {
    fn reset(&self) {
        if let (Ok(mut h), Ok(mut c)) = (self.latency.lock(), self.counts.lock()) {
            *h = LatencyHistogram::default();
            *c = [0; 4];
        }
    }
    fn total(&self) -> u64 {
        self.counts.lock().map(|c| c.iter().sum()).unwrap_or(0)
    }
}

impl Publisher for VerdictMeter {
    fn score(&self, _: &ScoreEvent) {}
    fn alarm(&self, _: &AlarmEvent) {}
    fn camera_online(&self, _: &str, _: bool) {}
    fn alarm_state(&self, _: &str, _: bool) {}
    fn snapshot(&self, _: &Snapshot) {}
    fn stats(&self, _: &StatsReport) {}
    fn verdict(&self, ev: &VerdictEvent) {
        if let (Ok(mut h), Ok(mut c)) = (self.latency.lock(), self.counts.lock()) {
            h.record(ev.latency_ms);
            c[ev.verdict as usize] += 1;
        }
    }
    fn event(&self, _: &crate::commands::CommandEvent) {}
}

/// `bench --triggered`: triggered cameras fed by the intake like MQTT triggers.
pub fn measure_triggered(opts: &Args) -> Result<TriggeredReport, BenchError> {
    let tmp = std::env::temp_dir().join(format!("ganomalyd-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&tmp);
    let model = model_path(opts, &tmp)?;
    let infer = inference(opts);
    let frames = Arc::new(frames(opts.width, opts.height));
    let score = opts.score.unwrap_or(ScoreChoice::ModelDefault);
    // The reference: one frame's preprocessing and one batch-1 run, medians.
    let (infer_b1_ms, preprocess_ms, provider) = {
        let mut raw = RawRun::new(&model, &InferenceSettings { max_batch: 1, ..infer.clone() }, &frames, score)?;
        (raw.batch1_ms(300)?, raw.preprocess_ms(&frames, 300)?, raw.provider())
    };
    let n = opts.cameras.max(1);
    let names: Vec<String> = (0..n).map(|i| format!("trig{i}")).collect();
    let trigger = TriggerSettings { deadline: Duration::from_secs(5), ..TriggerSettings::default() };
    let rig = Rig { frames: &frames, model: &model, score, gate: Gate::opened() };
    let cameras = names
        .iter()
        .enumerate()
        .map(|(i, name)| camera(name, i, &rig, opts.camera_fps, None, CameraMode::Triggered(trigger)))
        .collect();
    let settings = settings(infer, cameras, opts);
    let meter = Arc::new(VerdictMeter::default());
    let commands = CommandSettings { enabled: true, ..CommandSettings::default() };
    let intake = Intake::new(commands, meter.clone(), &names);
    let triggers = intake.register(CommandName::Trigger);
    let opts_start = StartOptions { stats: false, triggers: Some(triggers), ..StartOptions::default() };
    let pipeline = Pipeline::start(&settings, meter.clone(), opts_start)?;
    // Rings filled, sessions warm: a second of frames, then 5 parts per camera not counted.
    std::thread::sleep(Duration::from_secs(1));
    let send = |cam: &str, part: &str| {
        let topic = format!("bench/box/{cam}/cmd/trigger");
        intake.from_mqtt("bench/box", &topic, format!("{{\"part_id\":\"{part}\"}}").as_bytes(), false);
    };
    let limit = Duration::from_secs(30);
    for k in 0..5 {
        for name in &names {
            send(name, &format!("warm{k}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    while meter.total() < 5 * n as u64 {
        if t.elapsed() > limit {
            return Err(BenchError::Stalled(limit));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    meter.reset();
    // Cameras take turns: each gets `parts_per_s`, spread evenly over the second.
    let gap = Duration::from_secs_f64(1.0 / (opts.parts_per_s.max(0.1) * n as f64));
    let start = Instant::now();
    let total = opts.parts * n as u64;
    for k in 0..total {
        let due = start + gap * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        send(&names[(k % n as u64) as usize], &format!("p{}", k / n as u64));
    }
    let t = Instant::now();
    while meter.total() < total {
        if t.elapsed() > limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    pipeline.shutdown();
    let _ = std::fs::remove_dir_all(&tmp);
    let h = meter.latency.lock().map(|h| h.clone()).unwrap_or_default();
    let c = meter.counts.lock().map(|c| *c).unwrap_or_default();
    let reference_ms = infer_b1_ms + preprocess_ms;
    let p99 = h.quantile(0.99);
    Ok(TriggeredReport {
        model: model.display().to_string(),
        provider,
        cameras: n,
        parts_per_s: opts.parts_per_s,
        camera_fps: opts.camera_fps,
        frame_size: format!("{}x{}", opts.width, opts.height),
        max_wait_s: opts.max_wait_s,
        triggers: total,
        verdicts: c.iter().sum(),
        ok: c[Verdict::Ok as usize],
        ng: c[Verdict::Ng as usize],
        error: c[Verdict::Error as usize],
        timeout: c[Verdict::Timeout as usize],
        p50_ms: h.quantile(0.5),
        p99_ms: p99,
        max_ms: h.max_ms(),
        infer_b1_ms,
        preprocess_ms,
        reference_ms,
        p99_ratio: p99 / reference_ms.max(1e-9),
    })
}

impl RawRun {
    /// Median milliseconds of one run that follows `gap` of sleep.
    fn batch1_after_gap_ms(&mut self, runs: usize, gap: Duration) -> Result<f64, BenchError> {
        let mut out = BatchOutput::default();
        let mut h = LatencyHistogram::default();
        for i in 0..runs + 3 {
            std::thread::sleep(gap);
            let t = Instant::now();
            self.model.run(&self.input, self.batch, &mut out)?;
            if i >= 3 {
                h.record(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Ok(h.quantile(0.5))
    }

    /// Median milliseconds of one run of the batch this was built for.
    fn batch1_ms(&mut self, runs: usize) -> Result<f64, BenchError> {
        let mut out = BatchOutput::default();
        let mut h = LatencyHistogram::default();
        for i in 0..runs + 10 {
            let t = Instant::now();
            self.model.run(&self.input, self.batch, &mut out)?;
            if i >= 10 {
                h.record(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Ok(h.quantile(0.5))
    }

    /// Median milliseconds of one frame's preprocessing.
    fn preprocess_ms(&self, frames: &[FrameData], n: usize) -> Result<f64, BenchError> {
        let mut prep = Preprocessor::from_meta(&self.model.meta.preprocess);
        let mut out = vec![0.0f32; self.model.tensor_len()];
        let mut h = LatencyHistogram::default();
        for i in 0..n {
            let t = Instant::now();
            prep.run(&frame_ref(&frames[i % frames.len()]), None, &mut out)?;
            h.record(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(h.quantile(0.5))
    }
}

/// What `--export` wrote.
#[derive(Debug, Serialize)]
pub struct Exported {
    pub model: PathBuf,
    pub frames: Vec<PathBuf>,
}

/// `--export DIR`: the bench's model and frames, for a peer to run the same.
pub fn export(opts: &Args, dir: &Path) -> Result<Exported, BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError::Export { path: dir.into(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    let model = model_path(opts, dir)?;
    let dest = dir.join("model.onnx");
    if model != dest {
        std::fs::copy(&model, &dest).map_err(|e| err(&e))?;
    }
    if opts.fixture.is_some() {
        let _ = std::fs::remove_file(&model);
    }
    let mut written = Vec::new();
    for (i, f) in frames(opts.width, opts.height).iter().enumerate() {
        let p = dir.join(format!("frame{i}.png"));
        image::save_buffer(&p, &f.data, f.width, f.height, image::ExtendedColorType::Rgb8).map_err(|e| err(&e))?;
        written.push(p);
    }
    Ok(Exported { model: dest, frames: written })
}

/// One stage of `--rss-breakdown`.
#[derive(Debug, Clone, Serialize)]
pub struct RssStage {
    pub stage: String,
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
}

/// The figures of `bench --rss-breakdown`.
#[derive(Debug, Clone, Serialize)]
pub struct RssReport {
    pub model: String,
    pub cameras: usize,
    pub batch: usize,
    pub frame_size: String,
    pub score: String,
    pub offered_fps: f64,
    pub pipeline_fps: f64,
    pub stages: Vec<RssStage>,
    pub model_file_mb: f64,
    /// One camera frame's pixels, and the most a camera's recycle channel keeps.
    pub frame_mb: f64,
    pub frames_kept_per_camera: usize,
    /// One preprocessed tensor, and the most the model's recycle channel keeps.
    pub tensor_mb: f64,
    pub tensors_kept: usize,
    /// Steady state: the daemon's figure.
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
}

/// `--rss-breakdown`: the pipeline alone, as `ganomalyd run` starts it, with
/// `VmRSS` read at each stage. The cameras are held at the gate until the
/// pipeline is up, so "started" is the session and threads with no frame.
pub fn measure_rss(opts: &Args) -> Result<RssReport, BenchError> {
    let stage = |name: &str| RssStage {
        stage: name.to_string(),
        rss_mb: rss_mb().unwrap_or(0.0),
        peak_rss_mb: peak_rss_mb().unwrap_or(0.0),
    };
    let mut stages = vec![stage("process (before ONNX Runtime)")];
    let tmp = std::env::temp_dir().join(format!("ganomalyd-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&tmp);
    let model = model_path(opts, &tmp)?;
    let infer = inference(opts);
    let frames = Arc::new(frames(opts.width, opts.height));
    stages.push(stage("frames made"));
    crate::runtime::environment(infer.ort_library.as_deref()).map_err(InferError::from)?;
    stages.push(stage("ONNX Runtime loaded, environment built"));
    let n = opts.cameras.max(1);
    // Unpaced cameras would spin copying frames that are dropped: give a rate.
    let per_camera = opts.paced.unwrap_or(1000.0);
    let rig = Rig {
        frames: &frames,
        model: &model,
        score: opts.score.unwrap_or(ScoreChoice::ModelDefault),
        gate: Arc::new(Gate::default()),
    };
    let cameras = (0..n).map(|i| continuous(&rig, i, n, per_camera)).collect();
    let settings = settings(infer, cameras, opts);
    let started =
        Pipeline::start(&settings, Arc::new(Discard), StartOptions { stats: false, ..StartOptions::default() });
    // Open before anything can fail: a camera thread waits at the gate.
    rig.gate.open();
    let pipeline = started?;
    // The gate was shut until here: no frame has been captured yet.
    stages.push(stage("pipeline started: session built, threads up, no frame yet"));
    let limit = Duration::from_secs(60);
    wait_for(&pipeline, (opts.max_batch as u64 * 4).max(16), limit)?;
    stages.push(stage("first batches decided"));
    let d0 = pipeline.decided();
    let t0 = Instant::now();
    wait_for(&pipeline, d0 + opts.frames, limit + Duration::from_secs_f64(opts.frames as f64 / 10.0))?;
    let pipeline_fps = (pipeline.decided() - d0) as f64 / t0.elapsed().as_secs_f64();
    let steady = stage(&format!("steady state ({} frames more)", opts.frames));
    let (rss, peak) = (steady.rss_mb, steady.peak_rss_mb);
    stages.push(steady);
    pipeline.shutdown();
    // Read after the figures: its copies of the file must not count in them.
    let (meta, model_bytes) = ganomaly_core::onnx::check::read_file(&model)
        .and_then(|b| ganomaly_core::onnx::check::check_model(&b).map(|m| (m, b.len())))
        .map_err(|source| InferError::Metadata { path: model.clone(), source })?;
    let _ = std::fs::remove_dir_all(&tmp);
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let p = &settings.pipeline;
    let side = meta.preprocess.size as usize;
    let b = settings.inference.max_batch;
    Ok(RssReport {
        model: model.display().to_string(),
        cameras: n,
        batch: b,
        frame_size: format!("{}x{}", opts.width, opts.height),
        score: match rig.score {
            ScoreChoice::Kind(k) => k,
            ScoreChoice::ModelDefault => meta.default_score,
        }
        .as_str()
        .to_string(),
        offered_fps: per_camera * n as f64,
        pipeline_fps,
        stages,
        model_file_mb: mib(model_bytes),
        frame_mb: mib(opts.width as usize * opts.height as usize * 3),
        // As `Pipeline::add_camera` sizes a continuous camera's recycle channel.
        frames_kept_per_camera: crate::pipeline::frames_kept(p.frame_queue.max(1), p.preprocess_threads, b),
        tensor_mb: mib(meta.preprocess.color.channels() as usize * side * side * 4),
        tensors_kept: 4 * b + 8,
        rss_mb: rss,
        peak_rss_mb: peak,
    })
}

impl RssReport {
    pub fn text(&self) -> String {
        let mut s = format!(
            "model {} ({} camera(s) of {}, batch {}, score {}, offered {:.0} fps, decided {:.1} fps)\n",
            self.model, self.cameras, self.frame_size, self.batch, self.score, self.offered_fps, self.pipeline_fps
        );
        let mut last = 0.0;
        for st in &self.stages {
            s += &format!(
                "{:<62} VmRSS {:>7.1} MiB ({:>+6.1})  VmHWM {:>7.1}\n",
                st.stage,
                st.rss_mb,
                st.rss_mb - last,
                st.peak_rss_mb
            );
            last = st.rss_mb;
        }
        s += &format!(
            "model file {:.1} MiB; a frame {:.2} MiB, up to {} kept per camera; a tensor {:.3} MiB, up to {} kept",
            self.model_file_mb, self.frame_mb, self.frames_kept_per_camera, self.tensor_mb, self.tensors_kept
        );
        s
    }
}
