//! Wires the stages together and owns shutdown.
//!
//! ```text
//! camera threads ──bounded(frame_queue), drop-oldest──► preprocess pool ──bounded(2·max_batch)──► inference thread (one per model)
//!                                                                                                   ├─► Publisher (scores, alarms, states)
//!                                                                                                   └─► snapshot writer ──► Publisher
//! ```
//! It starts from compiled [`Settings`]: one [`CameraPlan`] per camera, each
//! wired to its own queues and to the inference thread of its model.
//! Start-up is all-or-nothing: models are loaded and checked against the
//! plans before any thread starts, so a bad model or an impossible score
//! choice fails `run` with an error naming it.
//!
//! Shutdown ([`Pipeline::shutdown`]): the stop flag ends the camera threads;
//! their queues close, the preprocess workers drain them and exit, which
//! closes the inference inputs; inference drains, ends the alarms still
//! active (reason `shutdown`) and exits, dropping the snapshot queue, so the
//! writer finishes its last jobs; the open-alarm journal hands its last
//! events to the publisher. Nothing in flight is lost on the way down. A
//! camera thread stuck in a read of its source is waited for [`STOP_GRACE`]
//! at most, then left behind with its queue closed (see `capture::watch`), so
//! a wedged driver cannot hold up a stop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ganomaly_core::ScoreKind;

use crate::alarm_state::{self, JournalHandle};
use crate::base::stop::sleep_unless_stopped;
use crate::base::Liveness;
use crate::capture::watch::{self, STOP_GRACE};
use crate::capture::{self, CameraThread, CameraWatch, Frame, FrameData, SourceFactory};
use crate::commission::{self, CalibrationState, Calibrator, CameraHooks};
use crate::config::{CameraPlan, CommissioningSettings, Provider, Settings};
use crate::decide::{AlarmFrames, CalibrateRequest, Camera, Decider};
use crate::events::{now_ms, Publisher, StatsReport, PAYLOAD_SCHEMA};
use crate::infer::{self, InferError, InferThread, Model};
use crate::metrics::{CameraCounters, LatencyHistogram};
use crate::preprocess::{self, CameraPrep, ModelPrep, PoolSpec, Prepared};
use crate::record::Tap;
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
    /// The open-alarm journal (`alarm_state`): `run` puts it beside the MQTT
    /// outbox. `None`: no journal (bench, tests, no MQTT): alarms open at a
    /// crash stay open, and ids count from 1 again.
    pub alarm_journal: Option<PathBuf>,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            sources: BTreeMap::new(),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            stats: true,
            alarm_journal: None,
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

/// A running pipeline.
pub struct Pipeline {
    stop: Arc<AtomicBool>,
    cameras: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    inference: Vec<JoinHandle<()>>,
    snapshot_writer: Option<JoinHandle<()>>,
    stats: Option<JoinHandle<()>>,
    stats_stop: Arc<AtomicBool>,
    /// The thread that reports wedged cameras offline, stopped with stats.
    watch: Option<JoinHandle<()>>,
    watches: Vec<Arc<CameraWatch>>,
    counters: Vec<(String, Arc<CameraCounters>)>,
    snapshots_skipped: Option<Arc<AtomicU64>>,
    /// Provider of each loaded model, by model path.
    pub providers: Vec<(PathBuf, Provider)>,
    liveness: Liveness,
    /// Camera names in pipeline order, with the control channel of their model's inference thread.
    control: Vec<(String, Sender<infer::Control>)>,
    journal: Option<JournalHandle>,
    /// What the record/calibrate/feedback handlers need of each camera.
    hooks: Vec<CameraHooks>,
}

/// One camera's channels and counters while the pipeline is wired up.
struct Wiring<'a> {
    plan: &'a CameraPlan,
    /// Index of its model in the pipeline's model list.
    model: usize,
    counters: Arc<CameraCounters>,
    frames: (Sender<Frame>, Receiver<Frame>),
    recycle: (Sender<FrameData>, Receiver<FrameData>),
    tap: Arc<Tap>,
    alarm_frames: Arc<AlarmFrames>,
}

/// One model's channels: frames in from the pool, tensor buffers back to it,
/// run-time settings (SIGHUP).
struct ModelChannels {
    input: (Sender<Prepared>, Receiver<Prepared>),
    tensors: (Sender<Vec<f32>>, Receiver<Vec<f32>>),
    control: (Sender<infer::Control>, Receiver<infer::Control>),
}

impl ModelChannels {
    fn new(max_batch: usize) -> ModelChannels {
        ModelChannels {
            input: crossbeam_channel::bounded(2 * max_batch),
            tensors: crossbeam_channel::bounded(4 * max_batch + 8),
            control: crossbeam_channel::unbounded(),
        }
    }
}

/// Loads each distinct model file once (one session, one inference thread)
/// and gives every camera its queues.
fn load_and_wire(settings: &Settings) -> Result<(Vec<Model>, Vec<Wiring<'_>>), PipelineError> {
    let max_batch = settings.inference.max_batch.max(1);
    let queue = settings.pipeline.frame_queue.max(1);
    // Enough spare buffers to cover the queue, the pool and a batch.
    let recycle_cap = queue + settings.pipeline.preprocess_threads + 2 * max_batch + 2;
    let mut models: Vec<Model> = Vec::new();
    let mut cams = Vec::new();
    for plan in &settings.cameras {
        let model = match models.iter().position(|m| m.path == plan.model) {
            Some(m) => m,
            None => {
                models.push(Model::load(&plan.model, &settings.inference)?);
                models.len() - 1
            }
        };
        cams.push(Wiring {
            plan,
            model,
            counters: Arc::new(CameraCounters::default()),
            frames: crossbeam_channel::bounded(queue),
            recycle: crossbeam_channel::bounded(recycle_cap),
            tap: Arc::new(Tap::default()),
            alarm_frames: Arc::new(AlarmFrames::new(settings.commissioning.keep_alarm_frames)),
        });
    }
    Ok((models, cams))
}

/// What the preprocess workers need: every camera's queue, every model's shape.
fn pool_spec(cams: &[Wiring], models: &[Model], channels: &[ModelChannels]) -> PoolSpec {
    PoolSpec {
        cameras: cams
            .iter()
            .map(|c| CameraPrep {
                name: c.plan.name.clone(),
                roi: c.plan.roi,
                model: c.model,
                counters: c.counters.clone(),
                input: c.frames.1.clone(),
                recycle: c.recycle.0.clone(),
                tap: c.tap.clone(),
            })
            .collect(),
        models: models
            .iter()
            .zip(channels)
            .map(|(model, ch)| ModelPrep {
                color: model.color(),
                size: model.side() as u32,
                output: ch.input.0.clone(),
                tensor_recycle: ch.tensors.1.clone(),
            })
            .collect(),
    }
}

impl Wiring<'_> {
    /// The camera as its model's inference thread decides for it; its alarm
    /// numbers continue after `last_alarm`. Its calibration: the live one in
    /// `live` when it fits the model, else the model's (`commission` module doc).
    fn decided_by(
        &self,
        model: &Model,
        kind: ScoreKind,
        last_alarm: u64,
        live: Option<(&std::path::Path, &CalibrationState)>,
        c: &CommissioningSettings,
    ) -> Camera {
        let calibration = match commission::effective(live, &self.plan.name, &model.meta, kind) {
            Some((cal, src)) => {
                if let commission::ThresholdSource::Live { file, ts, .. } = src {
                    tracing::info!(camera = %self.plan.name, threshold = cal.threshold, file = %file.display(), ts, "live calibration in force");
                }
                cal
            }
            None => ganomaly_core::Calibration::uncalibrated(),
        };
        Camera {
            name: self.plan.name.clone(),
            decider: Decider::new(&self.plan.name, kind, calibration, self.plan.alarm, last_alarm)
                .with_drift(c.drift_window, c.drift_bound),
            roi: self.plan.roi,
            counters: self.counters.clone(),
            recycle: self.recycle.0.clone(),
            collecting: None,
            alarm_frames: self.alarm_frames.clone(),
        }
    }

    fn hooks(&self, model: &Model) -> CameraHooks {
        CameraHooks {
            name: self.plan.name.clone(),
            tap: self.tap.clone(),
            alarm_frames: self.alarm_frames.clone(),
            counters: self.counters.clone(),
            roi: self.plan.roi,
            model: self.plan.model.clone(),
            model_id: commission::model_id(&model.meta),
        }
    }
}

impl Pipeline {
    /// Loads the models and starts every stage.
    pub fn start(
        settings: &Settings,
        publisher: Arc<dyn Publisher>,
        mut opts: StartOptions,
    ) -> Result<Pipeline, PipelineError> {
        if settings.cameras.is_empty() {
            return Err(PipelineError::NoCameras);
        }
        let max_batch = settings.inference.max_batch.max(1);
        let (models, cams) = load_and_wire(settings)?;
        let kinds = cams.iter().map(|c| score_kind(c.plan, &models[c.model])).collect::<Result<Vec<ScoreKind>, _>>()?;

        // After the models loaded (a run that cannot start publishes
        // nothing), before any thread can raise an alarm.
        let (publisher, journal, last_numbers) = match &opts.alarm_journal {
            Some(path) => match alarm_state::start(path, publisher.clone()) {
                Ok(s) => (s.publisher, Some(s.handle), s.last_numbers),
                Err(e) => {
                    tracing::error!(
                        error = %crate::base::report::chain(&e),
                        "running without the open-alarm journal: an alarm open at a crash will not be ended on restart"
                    );
                    (publisher, None, BTreeMap::new())
                }
            },
            None => (publisher, None, BTreeMap::new()),
        };
        // Live calibrations (`calibrate`): a file that cannot be read is logged and
        // the models' own calibrations are used; `check-config` reports it too.
        let live_file = settings.commissioning.calibration_file();
        let live_state = live_file.as_ref().and_then(|f| match CalibrationState::load(f) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %crate::base::report::chain(&e), "ignoring the live calibrations: using the models' own");
                None
            }
        });
        let live = live_file.as_deref().zip(live_state.as_ref());
        let hooks: Vec<CameraHooks> = cams.iter().map(|c| c.hooks(&models[c.model])).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let liveness = Liveness::start();
        let (snap_queue, snapshot_writer) = match &settings.snapshots {
            Some(s) => {
                let (q, h) = snapshot::spawn_writer(s.clone(), publisher.clone())?;
                (Some(q), Some(h))
            }
            None => (None, None),
        };
        let snapshots_skipped = snap_queue.as_ref().map(|q| q.skipped.clone());

        let channels: Vec<ModelChannels> = models.iter().map(|_| ModelChannels::new(max_batch)).collect();
        let pool = pool_spec(&cams, &models, &channels);
        let providers: Vec<(PathBuf, Provider)> = models.iter().map(|m| (m.path.clone(), m.provider)).collect();
        let control = cams.iter().map(|c| (c.plan.name.clone(), channels[c.model].control.0.clone())).collect();
        let mut inference_threads = Vec::new();
        for (m, (model, ch)) in models.into_iter().zip(&channels).enumerate() {
            // Indexed like the pipeline's cameras; `None` for other models' cameras.
            let cameras = cams.iter().zip(&kinds).map(|(c, &kind)| {
                let last = last_numbers.get(&c.plan.name).copied().unwrap_or(0);
                (c.model == m).then(|| c.decided_by(&model, kind, last, live, &settings.commissioning))
            });
            inference_threads.push(infer::spawn(InferThread {
                cameras: cameras.collect(),
                model,
                rx: ch.input.1.clone(),
                tensor_recycle: ch.tensors.0.clone(),
                max_batch,
                max_wait: settings.inference.max_wait,
                publisher: publisher.clone(),
                snapshots: snap_queue.clone(),
                control: ch.control.1.clone(),
                liveness: liveness.clone(),
            })?);
        }
        drop(snap_queue);
        let workers = preprocess::spawn_pool(settings.pipeline.preprocess_threads, pool)?;
        // Only the workers may hold the inference senders, or inference would
        // never see its input close.
        drop(channels);

        let named: Vec<(String, Arc<CameraCounters>)> =
            cams.iter().map(|c| (c.plan.name.clone(), c.counters.clone())).collect();
        let mut camera_threads = Vec::new();
        let mut watches = Vec::new();
        for (index, c) in cams.into_iter().enumerate() {
            let source = opts.sources.remove(&c.plan.name).unwrap_or_else(|| c.plan.source.factory());
            let camera_watch = Arc::new(CameraWatch::new(
                &c.plan.name,
                c.plan.read_timeout,
                c.counters.clone(),
                publisher.clone(),
                c.frames.0,
            ));
            watches.push(camera_watch.clone());
            camera_threads.push(capture::spawn_camera(
                CameraThread {
                    index,
                    name: c.plan.name.clone(),
                    fps: c.plan.fps,
                    counters: c.counters,
                    watch: camera_watch,
                    rx_for_drops: c.frames.1,
                    recycle: c.recycle.1,
                    stop: stop.clone(),
                    backoff_min: opts.backoff_min,
                    backoff_max: opts.backoff_max,
                },
                source,
            )?);
        }

        let stats_stop = Arc::new(AtomicBool::new(false));
        let watch = Some(watch::spawn_watch(watches.clone(), stats_stop.clone())?);
        let stats = if opts.stats {
            let provider = providers.first().map(|p| p.1.as_str()).unwrap_or("cpu").to_string();
            Some(spawn_stats(
                named.clone(),
                provider,
                settings.pipeline.stats_interval,
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
            inference: inference_threads,
            snapshot_writer,
            stats,
            stats_stop,
            watch,
            watches,
            counters: named,
            snapshots_skipped,
            providers,
            liveness,
            control,
            journal,
            hooks,
        })
    }

    /// What the commissioning command handlers need of each camera.
    pub fn hooks(&self) -> Vec<CameraHooks> {
        self.hooks.clone()
    }

    /// A [`Calibrator`] for the `calibrate` handler (live calibrations run on the
    /// camera's inference thread).
    pub fn calibrator(&self) -> Arc<dyn Calibrator> {
        Arc::new(ControlCalibrator { control: self.control.clone() })
    }

    /// Applies the alarm settings of `settings` to the running cameras without
    /// touching the frame path (SIGHUP). Other changes need a restart; the
    /// cameras they concern are returned so they can be logged.
    pub fn reload_alarms(&self, settings: &Settings) -> Vec<String> {
        let new: BTreeMap<&str, &CameraPlan> = settings.cameras.iter().map(|c| (c.name.as_str(), c)).collect();
        let mut not_applied = Vec::new();
        for (i, (name, tx)) in self.control.iter().enumerate() {
            match new.get(name.as_str()) {
                Some(c) => {
                    let _ = tx.send(infer::Control::Alarm { camera: i, cfg: c.alarm });
                }
                None => not_applied.push(name.clone()),
            }
        }
        not_applied.extend(new.keys().filter(|n| !self.control.iter().any(|(c, _)| c == *n)).map(|n| n.to_string()));
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
        self.join_cameras();
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
        if let Some(h) = self.watch.take() {
            let _ = h.join();
        }
        // Every stage has ended: the shutdown ends of active alarms are queued
        // at the journal; they reach the publisher before `join` returns (and
        // so before the caller drains the publisher).
        if let Some(j) = self.journal.take() {
            if !j.flush(JOURNAL_FLUSH) {
                tracing::warn!("the open-alarm journal did not drain in time");
            }
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

    /// Joins the camera threads: all of them while the sources run on their
    /// own; once a stop is asked for, only those that end within
    /// [`STOP_GRACE`]. The others are stuck in a read: their queues are
    /// closed so the rest drains, and the threads are left to the process exit.
    fn join_cameras(&mut self) {
        let mut stopping_since: Option<Instant> = None;
        while !self.cameras.iter().all(|h| h.is_finished()) {
            if self.stop.load(Ordering::Relaxed) {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= STOP_GRACE {
                    for (h, w) in self.cameras.iter().zip(&self.watches) {
                        if !h.is_finished() {
                            tracing::warn!(
                                camera = w.name(),
                                grace_s = STOP_GRACE.as_secs_f64(),
                                "camera thread did not stop (stuck in a read of its source): left behind"
                            );
                            w.close_queue();
                        }
                    }
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for h in self.cameras.drain(..) {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    /// Stop, drain, report.
    pub fn shutdown(self) -> Report {
        self.stop();
        self.join()
    }
}

/// Sends live calibrations to the inference thread of the camera's model.
struct ControlCalibrator {
    control: Vec<(String, Sender<infer::Control>)>,
}

impl Calibrator for ControlCalibrator {
    fn start(&self, camera: &str, req: CalibrateRequest) -> Result<(), String> {
        let (i, tx) = self
            .control
            .iter()
            .enumerate()
            .find(|(_, (n, _))| n == camera)
            .map(|(i, (_, tx))| (i, tx))
            .ok_or_else(|| format!("unknown camera `{camera}`"))?;
        tx.send(infer::Control::Calibrate { camera: i, req })
            .map_err(|_| "the inference thread has stopped".to_string())
    }
}

/// How long `join` waits for the open-alarm journal to hand its last events
/// on: a few SQLite commits, unless the disk has stalled.
const JOURNAL_FLUSH: Duration = Duration::from_secs(5);

/// The score kind a camera uses, which its model must export (checked again
/// here: the file may have changed since the config was compiled).
fn score_kind(c: &CameraPlan, model: &Model) -> Result<ScoreKind, PipelineError> {
    let kind = c.score.kind(model.meta.default_score);
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
            sleep_unless_stopped(every, &stop);
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
