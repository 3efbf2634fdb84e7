//! Wires the stages together and owns shutdown.
//!
//! ```text
//! camera threads ──bounded(frame_queue), drop-oldest──► preprocess pool ──bounded(2·max_batch)──► inference thread (one per model)
//!                                                                                                   ├─► Publisher (scores, alarms, states)
//!                                                                                                   └─► snapshot writer ──► Publisher
//! ```
//! Start-up is all-or-nothing: models are loaded and checked against the
//! config before any thread starts, so a bad model or an impossible score
//! choice fails `run` with an error naming it.
//!
//! Shutdown ([`Pipeline::shutdown`]): the stop flag ends the camera threads;
//! their queues close, the preprocess workers drain them and exit, which
//! closes the inference inputs; inference drains and exits, dropping the
//! snapshot queue, so the writer finishes its last jobs. Nothing in flight is
//! lost on the way down.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ganomaly_core::ScoreKind;

use crate::alarm::AlarmMachine;
use crate::capture::{self, CameraThread, SourceFactory};
use crate::config::{CameraConfig, Config, Provider, ScoreChoice, SourceConfig};
use crate::events::{now_ms, Publisher, StatsReport, PAYLOAD_SCHEMA};
use crate::infer::{self, InferCamera, InferError, InferThread, Model};
use crate::metrics::{CameraCounters, LatencyHistogram};
use crate::preprocess::{self, CameraPrep, ModelPrep, PoolSpec};
use crate::snapshot;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Model(#[from] InferError),
    #[error("cameras.{camera}.score: {reason}")]
    Score { camera: String, reason: String },
    #[error("no cameras configured")]
    NoCameras,
    #[error("cannot start thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// Knobs that are not in the config file (tests, bench).
pub struct StartOptions {
    /// Sources to use instead of the ones the config describes, by camera name.
    pub sources: BTreeMap<String, SourceFactory>,
    /// Retry waits of failing sources.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Publish `stats` every `pipeline.stats_interval_s`.
    pub stats: bool,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            sources: BTreeMap::new(),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            stats: true,
        }
    }
}

/// Figures of one camera at the end of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraReport {
    pub name: String,
    pub captured: u64,
    pub decided: u64,
    pub dropped: u64,
    pub broken: u64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub cameras: Vec<CameraReport>,
    /// All cameras' capture → decision latencies.
    pub latency: LatencyHistogram,
    pub snapshots_skipped: u64,
}

/// When the inference threads last showed life: they store the milliseconds
/// since `epoch` after every batch and at least once a second when idle.
#[derive(Debug, Clone)]
pub struct Liveness {
    heartbeat: Arc<AtomicU64>,
    epoch: Instant,
}

impl Liveness {
    pub fn silent_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).saturating_sub(self.heartbeat.load(Ordering::Relaxed))
    }

    /// A heartbeat last seen about `silent_ms` ago.
    #[cfg(test)]
    pub fn new_for_test(silent_ms: u64) -> Liveness {
        let now = Instant::now();
        let epoch = now.checked_sub(Duration::from_millis(silent_ms)).unwrap_or(now);
        Liveness { heartbeat: Arc::new(AtomicU64::new(0)), epoch }
    }
}

/// A running pipeline.
pub struct Pipeline {
    stop: Arc<AtomicBool>,
    cameras: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    inference: Vec<JoinHandle<()>>,
    snapshot_writer: Option<JoinHandle<()>>,
    stats: Option<JoinHandle<()>>,
    stats_stop: Arc<AtomicBool>,
    counters: Vec<(String, Arc<CameraCounters>)>,
    snapshots_skipped: Option<Arc<AtomicU64>>,
    /// Provider of each loaded model, by model path.
    pub providers: Vec<(PathBuf, Provider)>,
    liveness: Liveness,
    /// Camera names in pipeline order, with the control channel of their model's inference thread.
    control: Vec<(String, crossbeam_channel::Sender<infer::Control>)>,
}

/// Builds the source a camera's config describes.
pub fn source_from_config(cfg: &Config, cam: &CameraConfig) -> SourceFactory {
    match &cam.source {
        SourceConfig::V4l2(v) => {
            let spec = capture::v4l2::DeviceSpec::parse(&v.device).unwrap_or(capture::v4l2::DeviceSpec::Index(0));
            let format = capture::v4l2::frame_format(&v.format).unwrap_or(nokhwa::utils::FrameFormat::MJPEG);
            let (w, h, fps) = (cam.width, cam.height, cam.fps);
            Box::new(move || {
                Box::new(capture::v4l2::V4l2Camera::new(spec, format, w, h, fps)) as Box<dyn capture::FrameSource>
            })
        }
        SourceConfig::Replay(r) => {
            capture::factory(capture::replay::ReplaySource::new(cfg.resolve(std::path::Path::new(&r.path)), r.looped))
        }
        SourceConfig::HttpMjpeg(h) => capture::factory(capture::http_mjpeg::HttpMjpegSource::new(
            h.url.clone(),
            std::time::Duration::from_secs_f64(h.timeout_s),
        )),
        SourceConfig::Synthetic(s) => {
            let s = s.clone();
            // Generated on the camera thread: it takes a while for large frames.
            Box::new(move || Box::new(capture::synthetic::SyntheticCamera::new(&s)) as Box<dyn capture::FrameSource>)
        }
    }
}

impl Pipeline {
    /// Loads the models and starts every stage. `cfg` must have passed
    /// validation.
    pub fn start(
        cfg: &Config,
        publisher: Arc<dyn Publisher>,
        mut opts: StartOptions,
    ) -> Result<Pipeline, PipelineError> {
        let cams = cfg.cameras();
        if cams.is_empty() {
            return Err(PipelineError::NoCameras);
        }
        // One model (session, inference thread) per distinct model file.
        let mut model_paths: Vec<PathBuf> = Vec::new();
        for c in &cams {
            if !model_paths.contains(&c.model) {
                model_paths.push(c.model.clone());
            }
        }
        let mut models = Vec::new();
        for p in &model_paths {
            models.push(Model::load(p, &cfg.inference, &cfg.base_dir)?);
        }
        let cam_model: Vec<usize> =
            cams.iter().map(|c| model_paths.iter().position(|p| *p == c.model).unwrap_or(0)).collect();
        let mut kinds = Vec::new();
        for (c, &m) in cams.iter().zip(&cam_model) {
            kinds.push(score_kind(c, &models[m])?);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let heartbeat = Arc::new(AtomicU64::new(0));
        let counters: Vec<Arc<CameraCounters>> = cams.iter().map(|_| Arc::new(CameraCounters::default())).collect();
        let max_batch = cfg.inference.max_batch.max(1);

        let (snap_queue, snapshot_writer) = if cfg.snapshots.enabled {
            let dir = cfg.resolve(&cfg.snapshots.dir);
            let (q, h) = snapshot::spawn_writer(cfg.snapshots.clone(), dir, publisher.clone())?;
            (Some(q), Some(h))
        } else {
            (None, None)
        };
        let snapshots_skipped = snap_queue.as_ref().map(|q| q.skipped.clone());

        // Channels.
        let queue = cfg.pipeline.frame_queue.max(1);
        let frame_q: Vec<_> = cams.iter().map(|_| crossbeam_channel::bounded(queue)).collect();
        // Enough spare buffers to cover the queue, the pool and a batch.
        let recycle_cap = queue + cfg.pipeline.preprocess_threads + 2 * max_batch + 2;
        let recycle: Vec<_> = cams.iter().map(|_| crossbeam_channel::bounded(recycle_cap)).collect();
        let infer_q: Vec<_> = models.iter().map(|_| crossbeam_channel::bounded(2 * max_batch)).collect();
        let tensor_recycle: Vec<_> = models.iter().map(|_| crossbeam_channel::bounded(4 * max_batch + 8)).collect();

        let pool = PoolSpec {
            cameras: cams
                .iter()
                .enumerate()
                .map(|(i, c)| CameraPrep {
                    name: c.name.clone(),
                    roi: c.roi,
                    model: cam_model[i],
                    counters: counters[i].clone(),
                    input: frame_q[i].1.clone(),
                    recycle: recycle[i].0.clone(),
                })
                .collect(),
            models: models
                .iter()
                .enumerate()
                .map(|(m, model)| ModelPrep {
                    color: model.color(),
                    size: model.side() as u32,
                    output: infer_q[m].0.clone(),
                    tensor_recycle: tensor_recycle[m].1.clone(),
                })
                .collect(),
        };
        let providers: Vec<(PathBuf, Provider)> = models.iter().map(|m| (m.path.clone(), m.provider)).collect();

        let mut inference = Vec::new();
        let controls: Vec<_> = (0..models.len()).map(|_| crossbeam_channel::unbounded()).collect();
        let control = cams.iter().zip(&cam_model).map(|(c, &m)| (c.name.clone(), controls[m].0.clone())).collect();
        for (m, model) in models.into_iter().enumerate() {
            let cameras = cams
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (cam_model[i] == m).then(|| InferCamera {
                        name: c.name.clone(),
                        kind: kinds[i],
                        calibration: model
                            .calibration(kinds[i])
                            .cloned()
                            .unwrap_or_else(ganomaly_core::Calibration::uncalibrated),
                        alarm: AlarmMachine::new(&c.name, c.alarm),
                        roi: c.roi,
                        counters: counters[i].clone(),
                        recycle: recycle[i].0.clone(),
                    })
                })
                .collect();
            inference.push(infer::spawn(InferThread {
                model,
                rx: infer_q[m].1.clone(),
                tensor_recycle: tensor_recycle[m].0.clone(),
                cameras,
                max_batch,
                max_wait: Duration::from_millis(cfg.inference.max_wait_ms),
                publisher: publisher.clone(),
                snapshots: snap_queue.clone(),
                control: controls[m].1.clone(),
                heartbeat: heartbeat.clone(),
                epoch,
            })?);
        }
        drop(snap_queue);
        let workers = preprocess::spawn_pool(cfg.pipeline.preprocess_threads, pool)?;
        // Only the workers may hold the inference senders, or inference would
        // never see its input close.
        drop(infer_q);

        let mut camera_threads = Vec::new();
        for (i, ((c, (tx, rx)), (_, rrx))) in cams.iter().zip(frame_q).zip(recycle).enumerate() {
            let source = opts.sources.remove(&c.name).unwrap_or_else(|| source_from_config(cfg, c));
            camera_threads.push(capture::spawn_camera(
                CameraThread {
                    index: i,
                    name: c.name.clone(),
                    fps: c.fps,
                    counters: counters[i].clone(),
                    publisher: publisher.clone(),
                    tx,
                    rx_for_drops: rx,
                    recycle: rrx,
                    stop: stop.clone(),
                    backoff_min: opts.backoff_min,
                    backoff_max: opts.backoff_max,
                },
                source,
            )?);
        }

        let named: Vec<(String, Arc<CameraCounters>)> =
            cams.iter().map(|c| c.name.clone()).zip(counters.iter().cloned()).collect();
        let stats_stop = Arc::new(AtomicBool::new(false));
        let stats = if opts.stats {
            let provider = providers.first().map(|p| p.1.as_str()).unwrap_or("cpu").to_string();
            Some(spawn_stats(
                named.clone(),
                provider,
                Duration::from_secs_f64(cfg.pipeline.stats_interval_s),
                publisher.clone(),
                stats_stop.clone(),
            )?)
        } else {
            None
        };

        Ok(Pipeline {
            stop,
            cameras: camera_threads,
            workers,
            inference,
            snapshot_writer,
            stats,
            stats_stop,
            counters: named,
            snapshots_skipped,
            providers,
            liveness: Liveness { heartbeat, epoch },
            control,
        })
    }

    /// Applies the alarm settings of `cfg` (already validated) to the running
    /// cameras without touching the frame path (SIGHUP). Other changes need a
    /// restart; the cameras they concern are returned so they can be logged.
    pub fn reload_alarms(&self, cfg: &Config) -> Vec<String> {
        let new: BTreeMap<String, CameraConfig> = cfg.cameras().into_iter().map(|c| (c.name.clone(), c)).collect();
        let mut not_applied = Vec::new();
        for (i, (name, tx)) in self.control.iter().enumerate() {
            match new.get(name) {
                Some(c) => {
                    let _ = tx.send(infer::Control::Alarm { camera: i, cfg: c.alarm });
                }
                None => not_applied.push(name.clone()),
            }
        }
        not_applied.extend(new.keys().filter(|n| !self.control.iter().any(|(c, _)| c == *n)).cloned());
        not_applied
    }

    /// Asks the sources to stop; the rest drains (see the module doc).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// True once every camera thread has ended (stopped, or a finite replay ran out).
    pub fn sources_done(&self) -> bool {
        self.cameras.iter().all(|h| h.is_finished())
    }

    /// Frames decided so far, all cameras.
    pub fn decided(&self) -> u64 {
        self.counters.iter().map(|(_, c)| CameraCounters::get(&c.decided)).sum()
    }

    pub fn counters(&self) -> &[(String, Arc<CameraCounters>)] {
        &self.counters
    }

    /// Milliseconds since the inference threads last showed life.
    pub fn inference_silent_ms(&self) -> u64 {
        self.liveness.silent_ms()
    }

    /// A handle on the inference heartbeat for readers outside the pipeline
    /// (the `/healthz` endpoint).
    pub fn liveness(&self) -> Liveness {
        self.liveness.clone()
    }

    /// Waits for every stage to finish (after [`stop`](Self::stop), or when
    /// the sources end by themselves) and reports the counts.
    pub fn join(mut self) -> Report {
        for h in self.cameras.drain(..) {
            let _ = h.join();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        for h in self.inference.drain(..) {
            let _ = h.join();
        }
        if let Some(h) = self.snapshot_writer.take() {
            let _ = h.join();
        }
        self.stats_stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.stats.take() {
            let _ = h.join();
        }
        let mut latency = LatencyHistogram::default();
        let cameras = self
            .counters
            .iter()
            .map(|(name, c)| {
                if let Ok(h) = c.latency.lock() {
                    latency.merge(&h);
                }
                CameraReport {
                    name: name.clone(),
                    captured: CameraCounters::get(&c.captured),
                    decided: CameraCounters::get(&c.decided),
                    dropped: CameraCounters::get(&c.dropped),
                    broken: CameraCounters::get(&c.broken),
                }
            })
            .collect();
        let snapshots_skipped = self.snapshots_skipped.as_ref().map(|s| s.load(Ordering::Relaxed)).unwrap_or(0);
        Report { cameras, latency, snapshots_skipped }
    }

    /// Stop, drain, report.
    pub fn shutdown(self) -> Report {
        self.stop();
        self.join()
    }
}

/// The score kind a camera uses, which its model must export.
fn score_kind(c: &CameraConfig, model: &Model) -> Result<ScoreKind, PipelineError> {
    let kind = match c.score {
        ScoreChoice::ModelDefault => model.meta.default_score,
        ScoreChoice::Kind(k) => k,
    };
    if !model.has_score(kind) {
        return Err(PipelineError::Score {
            camera: c.name.clone(),
            reason: format!("model {} has no `{}` score", model.path.display(), kind.as_str()),
        });
    }
    Ok(kind)
}

fn spawn_stats(
    cams: Vec<(String, Arc<CameraCounters>)>,
    provider: String,
    every: Duration,
    publisher: Arc<dyn Publisher>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("stats".into()).spawn(move || {
        let mut last: Vec<u64> = cams.iter().map(|(_, c)| CameraCounters::get(&c.decided)).collect();
        let mut last_t = Instant::now();
        loop {
            capture::sleep_unless_stopped(every, &stop);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let dt = last_t.elapsed().as_secs_f64().max(1e-9);
            last_t = Instant::now();
            let cameras = cams
                .iter()
                .zip(last.iter_mut())
                .map(|((name, c), prev)| {
                    let now = CameraCounters::get(&c.decided);
                    let fps = (now - *prev) as f64 / dt;
                    *prev = now;
                    c.stats(name, fps)
                })
                .collect();
            publisher.stats(&StatsReport { schema: PAYLOAD_SCHEMA, ts: now_ms(), provider: provider.clone(), cameras });
        }
    })
}
