//! Wires the stages together, rewires them on a reload, and owns shutdown.
//!
//! ```text
//! camera threads ──bounded(frame_queue), drop-oldest──► preprocess pool ──bounded(max_batch)──► inference thread (one per model)
//!                                                            │                                      ├─► Publisher (scores, alarms, states)
//!                                                            │                                      └─► snapshot writer ──► Publisher
//!                                                            └─try_send, dropped when full──► shadow inference thread (one per shadow model)
//! ```
//! A triggered camera (`mode = "triggered"`) sends its frames to the trigger
//! thread's ring buffer instead (`trigger.rs`); the frames a trigger chooses
//! come back into the camera's queue to the pool, and their scores go from
//! the inference thread to the trigger thread, which publishes the verdict.
//!
//! It starts from compiled [`Settings`]: one [`CameraPlan`] per camera, each
//! with its own camera thread, queue and counters, and a **slot** (the
//! number its frames carry); one inference thread per distinct model file
//! (and one per distinct shadow model file: a shadow never shares a real
//! model's thread, so it cannot slow it). Start-up is all-or-nothing: models
//! are loaded and checked against the plans before any thread starts, so a
//! bad model or an impossible score choice fails `run` with an error naming it.
//!
//! # Reload ([`Pipeline::prepare_reload`], [`Pipeline::apply_reload`])
//! The structure is a set of parts that are added and removed one by one:
//! cameras by name (thread, queue, slot), models by [`ModelKey`] (session,
//! thread, input). A reload first loads, on a thread of its own, every model
//! file the new settings need that does not run yet or whose bytes changed
//! (the running sessions keep scoring meanwhile), and checks each camera's
//! score and shadow against them; any failure refuses the whole reload and
//! changes nothing. Then [`reload::plan`] says what changed and
//! `apply_reload` carries it out, all without waiting on any stage:
//! - a new model file gets a new inference thread; a changed file is sent
//!   to its thread, which swaps sessions between two batches
//!   ([`infer::Control::Swap`]); a model no camera uses any more is retired
//!   (its input closes once the workers drop it, and its thread ends);
//! - a camera whose model changed is handed, decision state and all, from its
//!   old model's thread to the new one's ([`infer::Control::Detach`] with a
//!   handoff); its camera thread and queue are untouched;
//! - a camera whose source, size, ROI or pacing changed gets a new thread,
//!   queue and slot (its counters go on; its active alarm ends, reason
//!   `reload`); an added camera starts; a removed one stops and goes offline;
//! - the preprocess workers get the whole new routing ([`PoolSpec`]) and take
//!   it between two frames.
//!
//! Unchanged cameras keep their threads, queues, alarm state and counters;
//! their frames keep flowing through the same queues (no frame of theirs is
//! dropped by the reload). See `reload.rs` for what happens to alarms.
//!
//! Shutdown ([`Pipeline::shutdown`]): the stop flags end the camera threads;
//! their queues close, the preprocess workers drain them and exit, which
//! closes the inference inputs; inference drains, ends the alarms still
//! active (reason `shutdown`) and exits, dropping the snapshot queue, so the
//! writer finishes its last jobs; the open-alarm journal hands its last
//! events to the publisher. Nothing in flight is lost on the way down. A
//! camera thread stuck in a read of its source is waited for [`STOP_GRACE`]
//! at most, then left behind with its queue closed (see `capture::watch`), so
//! a wedged driver cannot hold up a stop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ganomaly_core::ModelMetadata;

use crate::alarm_state::{self, JournalHandle};
use crate::base::stop::sleep_unless_stopped;
use crate::base::Liveness;
use crate::capture::watch::{self, Watched, STOP_GRACE};
use crate::capture::{self, CameraThread, CameraWatch, Frame, FrameData, SourceFactory};
use crate::commission::{self, CalibrationState, CameraHooks, SharedHooks};
use crate::config::{CameraPlan, Provider, ScoreChoice, Settings};
use crate::decide::{AlarmFrames, Camera, Decider};
use crate::events::{now_ms, EndReason, Publisher, StatsReport, PAYLOAD_SCHEMA};
use crate::infer::{self, Control, Decision, Handoff, InferError, InferThread, Model};
use crate::metrics::{CameraCounters, LatencyHistogram, StageLatency};
use crate::preprocess::{self, CameraPrep, ModelPrep, PoolSpec, Prepared};
use crate::recording::Tap;
use crate::reload::{self, CameraChange, Plan};
use crate::shadow::{self, ShadowCompare, Side};
use crate::snapshot::{self, SnapshotQueue};
use crate::trigger;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Model(#[from] InferError),
    #[error("cameras.{camera}.{field}: {reason}")]
    Score { camera: String, field: &'static str, reason: String },
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
    /// `trigger` commands (the intake's queue for them): triggered cameras
    /// judge a part on each. `None`: triggers come from nowhere.
    pub triggers: Option<Receiver<crate::commands::Command>>,
    /// The console's live-view taps (`run` with `[console]`).
    pub live: Option<Arc<crate::console::LiveTaps>>,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            sources: BTreeMap::new(),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            stats: true,
            alarm_journal: None,
            triggers: None,
            live: None,
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
    /// The same latencies by stage (`metrics::STAGE_NAMES`).
    pub stages: StageLatency,
    pub snapshots_skipped: u64,
}

/// Which inference thread a model file runs on: a shadow model always gets a
/// thread of its own, even when the same file is a camera's model too.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelKey {
    pub path: PathBuf,
    pub shadow: bool,
}

impl ModelKey {
    fn real(plan: &CameraPlan) -> ModelKey {
        ModelKey { path: plan.model.clone(), shadow: false }
    }

    fn shadow_of(plan: &CameraPlan) -> Option<ModelKey> {
        plan.shadow.as_ref().map(|s| ModelKey { path: s.model.clone(), shadow: true })
    }
}

/// What the cameras of `settings` on `key`'s thread need from its session
/// (`meta`: the model's; a camera's `default` score is its model's): their
/// score kinds, and the heat maps they may be shown, when anything draws one
/// (`snapshots`, the console's `live` view; a shadow draws none).
///
/// One thread per model file, its session pruned to the union of its
/// cameras' needs, rather than one session per (file, score): cameras on one
/// file keep sharing batches and one session's memory, and the key does not
/// depend on the model's default score. A reload that changes the union
/// re-prunes the session and swaps it in ([`infer::Control::Swap`], sent
/// before the cameras' own changes, so a score a camera moves to is there
/// before its first frame is scored under it).
fn wants(settings: &Settings, key: &ModelKey, meta: &ModelMetadata, live: bool) -> infer::Wants {
    use ganomaly_core::onnx::prune::map_output;
    let mut w = infer::Wants::default();
    let drawn = !key.shadow && (settings.snapshots.is_some() || live);
    for c in &settings.cameras {
        if ModelKey::real(c) == *key {
            let kind = c.score.kind(meta.default_score);
            w.kinds.insert(kind);
            if c.mode.trigger().is_some() {
                // Its `ng` snapshots draw the reconstruction map (`trigger.rs`).
                if settings.snapshots.is_some() {
                    w.maps.insert(ganomaly_core::onnx::OUTPUT_MAP);
                }
            } else if drawn {
                w.maps.insert(map_output(meta, kind));
            }
        }
        if let (Some(s), Some(k)) = (&c.shadow, ModelKey::shadow_of(c)) {
            if k == *key {
                w.kinds.insert(s.score.kind(meta.default_score));
            }
        }
    }
    w
}

/// Every model a set of settings runs.
fn needed_models(settings: &Settings) -> BTreeSet<ModelKey> {
    settings.cameras.iter().flat_map(|c| std::iter::once(ModelKey::real(c)).chain(ModelKey::shadow_of(c))).collect()
}

/// How a camera is decided under a model: its score (which the model must
/// export: checked again here, the file may have changed since the config
/// was compiled), the model's calibration of it, the alarm settings.
fn decision(
    camera: &str,
    field: &'static str,
    choice: ScoreChoice,
    alarm: crate::config::AlarmConfig,
    meta: &ModelMetadata,
    path: &std::path::Path,
) -> Result<Decision, PipelineError> {
    let kind = choice.kind(meta.default_score);
    let Some(score) = meta.score(kind) else {
        return Err(PipelineError::Score {
            camera: camera.to_string(),
            field,
            reason: format!("model {} has no `{}` score", path.display(), kind.as_str()),
        });
    };
    Ok(Decision { kind, calibration: score.calibration.clone(), alarm })
}

/// A shadow must take its camera model's input: it scores a copy of the same tensor.
fn same_input(camera: &str, real: &ModelMetadata, shadow: &ModelMetadata) -> Result<(), PipelineError> {
    let (a, b) = (&real.preprocess, &shadow.preprocess);
    if (a.color, a.size) != (b.color, b.size) {
        return Err(PipelineError::Score {
            camera: camera.to_string(),
            field: "shadow_model",
            reason: format!("takes {} px {:?} input, the camera's model {} px {:?}", b.size, b.color, a.size, a.color),
        });
    }
    Ok(())
}

/// The decisions of a camera under `metas` (its model's and its shadow's).
/// The camera's own calibration comes from `live` (`calibration.json`) when
/// that holds one made for this model export and score (`commission` module
/// doc), else from the model: a reload re-reads it, so a live calibration
/// outlives reloads that keep the model, and a new model starts from its own.
fn decisions(
    plan: &CameraPlan,
    metas: &BTreeMap<ModelKey, (ModelMetadata, PathBuf)>,
    live: Option<&std::path::Path>,
) -> Result<(Decision, Option<Decision>), PipelineError> {
    let missing = |key: &ModelKey| PipelineError::Score {
        camera: plan.name.clone(),
        field: if key.shadow { "shadow_model" } else { "model" },
        reason: format!("{} is not loaded", key.path.display()),
    };
    let key = ModelKey::real(plan);
    let (meta, path) = metas.get(&key).ok_or_else(|| missing(&key))?;
    let mut real = decision(&plan.name, "score", plan.score, plan.alarm, meta, path)?;
    if let Some(file) = live {
        match CalibrationState::load(file) {
            Ok(state) => {
                if let Some((cal, commission::ThresholdSource::Live { ts, .. })) =
                    commission::effective(Some((file, &state)), &plan.name, meta, real.kind)
                {
                    tracing::info!(camera = %plan.name, threshold = cal.threshold, file = %file.display(), ts, "live calibration in force");
                    real.calibration = cal;
                }
            }
            Err(e) => {
                tracing::error!(error = %crate::base::report::chain(&e), "ignoring the live calibrations: using the models' own")
            }
        }
    }
    let shadow = match (&plan.shadow, ModelKey::shadow_of(plan)) {
        (Some(s), Some(skey)) => {
            let (smeta, spath) = metas.get(&skey).ok_or_else(|| missing(&skey))?;
            same_input(&plan.name, meta, smeta)?;
            Some(decision(&plan.name, "shadow_score", s.score, plan.alarm, smeta, spath)?)
        }
        _ => None,
    };
    Ok((real, shadow))
}

/// One running camera.
struct CameraRun {
    slot: usize,
    plan: CameraPlan,
    counters: Arc<CameraCounters>,
    watch: Arc<CameraWatch>,
    stop: Arc<AtomicBool>,
    /// Taken when the thread is stopped for good or joined.
    thread: Option<JoinHandle<()>>,
    /// Its queue, as the preprocess pool reads it.
    frames: Receiver<Frame>,
    /// Buffers back to the camera thread (kept across a restart).
    recycle: (Sender<FrameData>, Receiver<FrameData>),
    /// The comparison with its shadow, while it has one.
    shadow: Option<Arc<ShadowCompare>>,
    /// The `record` command's copies of its frames; its last alarms' ROIs (`feedback`).
    tap: Arc<Tap>,
    alarm_frames: Arc<AlarmFrames>,
}

/// Batches of frames that may wait for one inference thread: one is enough
/// for it to start a full batch the moment the last one is done (the workers
/// fill it while the model runs); more would only hold frames, their pixels
/// and latency.
const INFER_QUEUE_BATCHES: usize = 1;

/// Spare frame buffers a continuous camera keeps: its queue, one per
/// preprocess worker, the frames waiting for inference and a batch running.
pub fn frames_kept(frame_queue: usize, preprocess_threads: usize, max_batch: usize) -> usize {
    frame_queue + preprocess_threads + (INFER_QUEUE_BATCHES + 1) * max_batch + 2
}

/// One running model: its thread and the ends of its channels the pipeline keeps.
struct ModelRun {
    meta: ModelMetadata,
    provider: Provider,
    /// Of the file's bytes: verdicts name it, a reload compares it.
    sha256: String,
    /// What its session is pruned to (a reload compares it).
    wants: Option<infer::Wants>,
    /// The pool's way in (cloned into each spec; dropped to retire the model).
    input: Sender<Prepared>,
    /// How many model inputs `input` may hold (shared with the thread).
    budget: Arc<preprocess::ImageBudget>,
    /// Tensor buffers coming back from the thread, for the pool.
    tensors: Receiver<Vec<f32>>,
    control: Sender<Control>,
    thread: JoinHandle<()>,
}

/// Models loaded by [`Pipeline::prepare_reload`], ready to be applied.
pub struct Loaded {
    settings: Settings,
    models: BTreeMap<ModelKey, Model>,
    /// Model files that run now and whose bytes changed.
    changed: BTreeSet<PathBuf>,
}

/// A reload whose models are loading in the background.
pub struct PendingReload {
    rx: Receiver<Result<Loaded, String>>,
    thread: Option<JoinHandle<()>>,
}

impl PendingReload {
    /// The loaded models once ready (`Err`: why the reload is refused).
    pub fn try_take(&mut self) -> Option<Result<Loaded, String>> {
        let got = match self.rx.try_recv() {
            Ok(r) => r,
            Err(crossbeam_channel::TryRecvError::Empty) => return None,
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err("the model loader stopped unexpectedly".into()),
        };
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
        Some(got)
    }

    /// Waits up to `timeout` (tests, and callers without a loop of their own).
    pub fn wait(&mut self, timeout: Duration) -> Option<Result<Loaded, String>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.try_take() {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running pipeline.
pub struct Pipeline {
    cameras: BTreeMap<String, CameraRun>,
    models: BTreeMap<ModelKey, ModelRun>,
    /// One spec channel per preprocess worker.
    pool: Vec<Sender<Arc<PoolSpec>>>,
    workers: Vec<JoinHandle<()>>,
    /// Camera threads a reload stopped (joined at the end if they ended).
    retired_cameras: Vec<(JoinHandle<()>, Arc<CameraWatch>)>,
    /// Inference threads of models a reload retired.
    retired_models: Vec<JoinHandle<()>>,
    /// Counters of cameras a reload removed, for the final report.
    removed: Vec<(String, Arc<CameraCounters>)>,
    snapshot_writer: Option<JoinHandle<()>>,
    snapshots: Option<SnapshotQueue>,
    snapshots_skipped: Option<Arc<AtomicU64>>,
    stats: Option<JoinHandle<()>>,
    stats_stop: Arc<AtomicBool>,
    /// The thread that reports wedged cameras offline, stopped with stats.
    watch: Option<JoinHandle<()>>,
    watched: Watched,
    /// What the stats thread reports.
    listed: Listed,
    stopping: Arc<AtomicBool>,
    liveness: Liveness,
    journal: Option<JournalHandle>,
    /// Each camera's last alarm number before this run (open-alarm journal).
    last_numbers: BTreeMap<String, u64>,
    publisher: Arc<dyn Publisher>,
    /// The settings running now.
    settings: Settings,
    next_slot: usize,
    backoff: (Duration, Duration),
    /// Triggered cameras: where their inference threads send scored frames
    /// (the trigger thread's input), and the stations gathered while the
    /// cameras start; both are handed to the trigger thread at the end of
    /// `start` (a reload does not add triggered cameras: see `reload.rs`).
    scored: Option<(Sender<trigger::Scored>, Receiver<trigger::Scored>)>,
    trigger_cams: Vec<trigger::TriggerCamera>,
    /// The console's live-view taps, handed to every camera model's thread.
    live: Option<Arc<crate::console::LiveTaps>>,
    /// The trigger thread, and the flag that tells it the cameras have ended.
    trigger: Option<JoinHandle<()>>,
    cameras_done: Arc<AtomicBool>,
    /// What the record/calibrate/feedback handlers see of each camera (kept current by `relist`).
    hooks: SharedHooks,
}

/// The cameras the stats thread reports, and the provider of the first
/// camera model; a reload replaces both.
type Listed = Arc<RwLock<(Vec<(String, Arc<CameraCounters>)>, String)>>;

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
        let mut loaded = BTreeMap::new();
        let live = opts.live.is_some();
        for key in needed_models(settings) {
            let model = load_model(&key, settings, live)?;
            loaded.insert(key, model);
        }
        let metas = loaded.iter().map(|(k, m)| (k.clone(), (m.meta.clone(), m.path.clone()))).collect();
        for plan in &settings.cameras {
            decisions(plan, &metas, None)?;
        }

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
        let (snapshots, snapshot_writer) = match &settings.snapshots {
            Some(s) => {
                let (q, h) = snapshot::spawn_writer(s.clone(), publisher.clone())?;
                (Some(q), Some(h))
            }
            None => (None, None),
        };
        let snapshots_skipped = snapshots.as_ref().map(|q| q.skipped.clone());
        let mut p = Pipeline {
            cameras: BTreeMap::new(),
            models: BTreeMap::new(),
            pool: Vec::new(),
            workers: Vec::new(),
            retired_cameras: Vec::new(),
            retired_models: Vec::new(),
            removed: Vec::new(),
            snapshot_writer,
            snapshots,
            snapshots_skipped,
            stats: None,
            stats_stop: Arc::new(AtomicBool::new(false)),
            watch: None,
            watched: Arc::default(),
            listed: Arc::default(),
            stopping: Arc::new(AtomicBool::new(false)),
            liveness: Liveness::start(),
            journal,
            last_numbers,
            publisher,
            settings: settings.clone(),
            next_slot: 0,
            backoff: (opts.backoff_min, opts.backoff_max),
            scored: Some(crossbeam_channel::unbounded()),
            trigger_cams: Vec::new(),
            live: opts.live.clone(),
            trigger: None,
            cameras_done: Arc::new(AtomicBool::new(false)),
            hooks: SharedHooks::default(),
        };
        for (key, model) in loaded {
            p.spawn_model(key, model)?;
        }
        for plan in &settings.cameras {
            let source = opts.sources.remove(&plan.name);
            p.add_camera(plan.clone(), None, None, source)?;
        }
        // The trigger thread takes the triggered cameras' stations; it also
        // runs without any, to answer triggers sent to continuous cameras.
        let stations = std::mem::take(&mut p.trigger_cams);
        let scored = p.scored.take().map(|(_, rx)| rx);
        if let (true, Some(scored)) = (opts.triggers.is_some() || !stations.is_empty(), scored) {
            let continuous =
                settings.cameras.iter().filter(|c| c.mode.trigger().is_none()).map(|c| c.name.clone()).collect();
            p.trigger = Some(trigger::spawn(trigger::TriggerThread {
                cameras: stations,
                continuous,
                commands: opts.triggers.take(),
                scored,
                publisher: p.publisher.clone(),
                snapshots: p.snapshots.clone(),
                cameras_done: p.cameras_done.clone(),
            })?);
        }
        let (workers, pool) = preprocess::spawn_pool(settings.pipeline.preprocess_threads, p.spec())?;
        p.workers = workers;
        p.pool = pool;
        p.relist();
        p.watch = Some(watch::spawn_watch(p.watched.clone(), p.stats_stop.clone())?);
        if opts.stats {
            p.stats = Some(spawn_stats(
                p.listed.clone(),
                settings.pipeline.stats_interval,
                p.publisher.clone(),
                p.stats_stop.clone(),
            )?);
        }
        Ok(p)
    }

    /// Starts the inference thread of a loaded model, with no camera yet.
    fn spawn_model(&mut self, key: ModelKey, model: Model) -> Result<(), PipelineError> {
        let max_batch = self.settings.inference.max_batch.max(1);
        let (input, rx) = crossbeam_channel::bounded(INFER_QUEUE_BATCHES * max_batch);
        // The same bound in model inputs, for tiled frames (`preprocess::ImageBudget`).
        let budget = preprocess::ImageBudget::new(INFER_QUEUE_BATCHES * max_batch);
        let (tensor_tx, tensors) = crossbeam_channel::bounded(4 * max_batch + 8);
        let (control, control_rx) = crossbeam_channel::unbounded();
        let (meta, provider, sha256, wants) =
            (model.meta.clone(), model.provider, model.sha256.clone(), model.wants.clone());
        let thread = infer::spawn(InferThread {
            cameras: Vec::new(),
            model,
            rx,
            budget: budget.clone(),
            tensor_recycle: tensor_tx,
            max_batch,
            max_wait: self.settings.inference.max_wait,
            publisher: self.publisher.clone(),
            // A shadow takes no snapshots and says nothing about the daemon's health.
            snapshots: if key.shadow { None } else { self.snapshots.clone() },
            control: control_rx,
            liveness: (!key.shadow).then(|| self.liveness.clone()),
            background: key.shadow,
            live: if key.shadow { None } else { self.live.clone() },
        })?;
        self.models.insert(key, ModelRun { meta, provider, sha256, wants, input, budget, tensors, control, thread });
        Ok(())
    }

    fn metas(&self) -> BTreeMap<ModelKey, (ModelMetadata, PathBuf)> {
        self.models.iter().map(|(k, m)| (k.clone(), (m.meta.clone(), k.path.clone()))).collect()
    }

    fn control(&self, key: &ModelKey) -> Option<&Sender<Control>> {
        self.models.get(key).map(|m| &m.control)
    }

    /// The alarm number the camera (or pseudo-camera) `name` continues after.
    fn last_number(&self, name: &str) -> u64 {
        self.last_numbers.get(name).copied().unwrap_or(0)
    }

    /// Starts a camera: a new slot, queue and thread; its decision state is
    /// `carried` (a restart hands the old one on) or new. `counters`: kept
    /// from before a restart.
    fn add_camera(
        &mut self,
        plan: CameraPlan,
        counters: Option<Arc<CameraCounters>>,
        recycle: Option<(Sender<FrameData>, Receiver<FrameData>)>,
        source: Option<SourceFactory>,
    ) -> Result<usize, PipelineError> {
        let (real, shadow) = decisions(&plan, &self.metas(), self.live_file().as_deref())?;
        let slot = self.next_slot;
        self.next_slot += 1;
        let queue = self.settings.pipeline.frame_queue.max(1);
        let max_batch = self.settings.inference.max_batch.max(1);
        let trig = plan.mode.trigger().copied();
        // Enough spare buffers to cover the queue, the pool and a batch (and
        // a triggered camera's ring buffer).
        let recycle_cap = frames_kept(queue, self.settings.pipeline.preprocess_threads, max_batch)
            + trig.map_or(0, |t| t.buffer_frames);
        let recycle = recycle.unwrap_or_else(|| crossbeam_channel::bounded(recycle_cap));
        let counters = counters.unwrap_or_default();
        counters.triggered.store(trig.is_some(), Ordering::Relaxed);
        // A triggered camera's queue to the pool holds every frame its pending
        // triggers may ask for (see `trigger.rs`: a full one is a `timeout`);
        // its camera thread feeds the trigger thread's ring buffer instead.
        let (frames_tx, frames) = match trig {
            Some(t) => crossbeam_channel::bounded((t.max_pending * t.frames).clamp(1, 4096)),
            None => crossbeam_channel::bounded(queue),
        };
        let compare = self.attach_shadow(&plan, slot, shadow)?;
        let scored = match (trig, &self.scored) {
            (Some(_), Some((tx, _))) => Some(tx.clone()),
            (Some(_), None) => {
                return Err(PipelineError::Score {
                    camera: plan.name.clone(),
                    field: "mode",
                    reason: "a triggered camera starts with the daemon (not on a reload)".into(),
                })
            }
            (None, _) => None,
        };
        let c = &self.settings.commissioning;
        let alarm_frames = Arc::new(AlarmFrames::new(c.keep_alarm_frames));
        let camera = Camera {
            name: plan.name.clone(),
            decider: Decider::new(
                &plan.name,
                real.kind,
                real.calibration.clone(),
                real.alarm,
                self.last_number(&plan.name),
            )
            .with_drift(c.drift_window, c.drift_bound),
            roi: plan.roi,
            counters: counters.clone(),
            recycle: recycle.0.clone(),
            compare: compare.clone().map(|c| (c, Side::Real)),
            trigger: scored,
            collecting: None,
            alarm_frames: alarm_frames.clone(),
        };
        // Before the camera thread exists: the model's thread has the camera
        // before its first frame can arrive.
        if let Some(c) = self.control(&ModelKey::real(&plan)) {
            let _ = c.send(Control::Attach { slot, camera: Box::new(camera) });
        }
        let camera_queue = match trig {
            Some(t) => {
                let (tap_tx, tap_rx) = crossbeam_channel::bounded(queue);
                let (sha256, side) = self
                    .models
                    .get(&ModelKey::real(&plan))
                    .map(|m| (m.sha256.clone(), m.meta.preprocess.size as usize))
                    .unwrap_or_default();
                self.trigger_cams.push(trigger::TriggerCamera {
                    index: slot,
                    station: trigger::Station::new(
                        &plan.name,
                        t,
                        trigger::Judging::new(&plan, real.kind, real.calibration, &sha256),
                    ),
                    tap: tap_rx.clone(),
                    scoring: Some(frames_tx),
                    counters: counters.clone(),
                    recycle: recycle.0.clone(),
                    roi: plan.roi,
                    side,
                });
                (tap_tx, tap_rx)
            }
            None => (frames_tx, frames.clone()),
        };
        let hooks = (Arc::new(Tap::default()), alarm_frames);
        self.spawn_camera_thread(plan, slot, counters, recycle, camera_queue, frames, compare, source, hooks)?;
        Ok(slot)
    }

    /// A new shadow camera for `plan` at `slot` on its shadow model's thread;
    /// returns the comparison both sides record into.
    fn attach_shadow(
        &mut self,
        plan: &CameraPlan,
        slot: usize,
        decision: Option<Decision>,
    ) -> Result<Option<Arc<ShadowCompare>>, PipelineError> {
        let (Some(d), Some(key)) = (decision, ModelKey::shadow_of(plan)) else { return Ok(None) };
        let name = shadow::publish_name(&plan.name);
        let compare = Arc::new(ShadowCompare::new(&key.path.display().to_string(), Arc::default()));
        // A shadow's frames carry no pixels; its buffers have nowhere to go.
        let (nowhere, _) = crossbeam_channel::bounded(0);
        let camera = Camera {
            name: name.clone(),
            // A shadow's drift is not the line's: no drift events for it.
            decider: Decider::new(&name, d.kind, d.calibration, d.alarm, self.last_number(&name))
                .with_drift(self.settings.commissioning.drift_window, 0.0),
            roi: None,
            counters: compare.counters.clone(),
            recycle: nowhere,
            compare: Some((compare.clone(), Side::Shadow)),
            trigger: None,
            collecting: None,
            alarm_frames: Arc::new(AlarmFrames::new(0)),
        };
        if let Some(c) = self.control(&key) {
            let _ = c.send(Control::Attach { slot, camera: Box::new(camera) });
        }
        Ok(Some(compare))
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_camera_thread(
        &mut self,
        plan: CameraPlan,
        slot: usize,
        counters: Arc<CameraCounters>,
        recycle: (Sender<FrameData>, Receiver<FrameData>),
        (frames_tx, drops): (Sender<Frame>, Receiver<Frame>),
        frames: Receiver<Frame>,
        shadow: Option<Arc<ShadowCompare>>,
        source: Option<SourceFactory>,
        (tap, alarm_frames): (Arc<Tap>, Arc<AlarmFrames>),
    ) -> Result<(), PipelineError> {
        // `(frames_tx, drops)`: the queue the camera thread fills (its own
        // end for drop-oldest); `frames`: what the pool reads (the same
        // queue, except for a triggered camera).
        counters.set_shadow(shadow.clone());
        let watch = Arc::new(CameraWatch::new(
            &plan.name,
            plan.read_timeout,
            counters.clone(),
            self.publisher.clone(),
            frames_tx,
        ));
        let stop = Arc::new(AtomicBool::new(self.stopping.load(Ordering::Relaxed)));
        let source = source.unwrap_or_else(|| plan.source.factory());
        let thread = capture::spawn_camera(
            CameraThread {
                index: slot,
                name: plan.name.clone(),
                fps: plan.fps,
                counters: counters.clone(),
                watch: watch.clone(),
                rx_for_drops: drops,
                recycle: recycle.1.clone(),
                stop: stop.clone(),
                backoff_min: self.backoff.0,
                backoff_max: self.backoff.1,
            },
            source,
        )?;
        let name = plan.name.clone();
        let thread = Some(thread);
        self.cameras.insert(
            name,
            CameraRun { slot, plan, counters, watch, stop, thread, frames, recycle, shadow, tap, alarm_frames },
        );
        Ok(())
    }

    /// Stops a camera's thread and takes it out of the pipeline (its
    /// decision state stays with its model's thread until detached).
    fn stop_camera_thread(&mut self, name: &str, why: &str) -> Option<CameraRun> {
        let mut c = self.cameras.remove(name)?;
        c.stop.store(true, Ordering::Relaxed);
        c.watch.retire(why);
        // Its thread may be stuck in a read: not waited for here (see `join`).
        if let Some(thread) = c.thread.take() {
            self.retired_cameras.push((thread, c.watch.clone()));
        }
        Some(c)
    }

    /// Ends a camera's shadow (its alarm ends, reason `reload`).
    fn detach_shadow(&self, plan: &CameraPlan, slot: usize) {
        if let Some(c) = ModelKey::shadow_of(plan).and_then(|k| self.control(&k)) {
            let _ = c.send(Control::Detach { slot, end: Some(EndReason::Reload), to: None });
        }
    }

    /// The routing the preprocess workers run.
    fn spec(&self) -> PoolSpec {
        let keys: Vec<&ModelKey> = self.models.keys().collect();
        let index = |k: &ModelKey| keys.iter().position(|x| *x == k);
        let cameras = self
            .cameras
            .values()
            .filter_map(|c| {
                let model = index(&ModelKey::real(&c.plan))?;
                let shadow = match (ModelKey::shadow_of(&c.plan).and_then(|k| index(&k)), &c.shadow) {
                    (Some(i), Some(cmp)) => Some((i, cmp.clone())),
                    _ => None,
                };
                Some(CameraPrep {
                    name: c.plan.name.clone(),
                    slot: c.slot,
                    roi: c.plan.roi,
                    tiles: c.plan.tiles,
                    model,
                    shadow,
                    counters: c.counters.clone(),
                    input: c.frames.clone(),
                    recycle: c.recycle.0.clone(),
                    tap: c.tap.clone(),
                })
            })
            .collect();
        let models = self
            .models
            .values()
            .map(|m| ModelPrep {
                color: m.meta.preprocess.color,
                size: m.meta.preprocess.size,
                output: m.input.clone(),
                budget: m.budget.clone(),
                tensor_recycle: m.tensors.clone(),
            })
            .collect();
        PoolSpec { cameras, models }
    }

    /// Hands the stats and watch threads the cameras running now.
    fn relist(&self) {
        let provider = self.providers().first().map(|p| p.1.as_str()).unwrap_or("cpu").to_string();
        if let Ok(mut l) = self.listed.write() {
            *l = (self.counters(), provider);
        }
        if let Ok(mut w) = self.watched.write() {
            *w = self.cameras.values().map(|c| c.watch.clone()).collect();
        }
        let hooks: Vec<CameraHooks> = self
            .cameras
            .values()
            .filter_map(|c| {
                let key = ModelKey::real(&c.plan);
                let run = self.models.get(&key)?;
                Some(CameraHooks {
                    name: c.plan.name.clone(),
                    tap: c.tap.clone(),
                    alarm_frames: c.alarm_frames.clone(),
                    counters: c.counters.clone(),
                    roi: c.plan.roi,
                    model: c.plan.model.clone(),
                    model_id: commission::model_id(&run.meta),
                    slot: c.slot,
                    control: run.control.clone(),
                })
            })
            .collect();
        if let Ok(mut h) = self.hooks.write() {
            *h = hooks;
        }
    }

    /// What the commissioning command handlers see of each camera (kept
    /// current across reloads).
    pub fn hooks(&self) -> SharedHooks {
        self.hooks.clone()
    }

    /// `calibration.json` of the running settings, if `[commissioning] dir` is set.
    fn live_file(&self) -> Option<PathBuf> {
        self.settings.commissioning.calibration_file()
    }

    /// Starts a reload of `new` (compiled by `config::load`, like
    /// `check-config`): loads, on a thread of its own, every model file it
    /// needs that does not run yet or whose bytes changed, and checks each
    /// camera's score and shadow against the models. The running pipeline is
    /// untouched; [`apply_reload`](Self::apply_reload) applies the result.
    pub fn prepare_reload(&self, new: Settings) -> Result<PendingReload, PipelineError> {
        let running: BTreeMap<ModelKey, Running> = self
            .models
            .iter()
            .map(|(k, m)| {
                (k.clone(), Running { sha256: m.sha256.clone(), meta: m.meta.clone(), wants: m.wants.clone() })
            })
            .collect();
        let old = self.settings.clone();
        let live = self.live.is_some();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new().name("reload".into()).spawn(move || {
            let _ = tx.send(load_for_reload(&old, new, &running, live));
        })?;
        Ok(PendingReload { rx, thread: Some(thread) })
    }

    /// Applies loaded models and settings (see the module doc); returns the
    /// plan carried out. Nothing here waits on a stage.
    pub fn apply_reload(&mut self, loaded: Loaded) -> Result<Plan, PipelineError> {
        let Loaded { settings: new, models, changed } = loaded;
        let plan = reload::plan(&self.settings, &new, &changed);
        let new = reload::applied(&self.settings, new);
        let new_plans: BTreeMap<String, CameraPlan> = new.cameras.iter().map(|c| (c.name.clone(), c.clone())).collect();

        // Models: a changed file is swapped in its thread; a new one gets a thread.
        let live = self.live_file();
        let mut metas = self.metas();
        for (key, model) in &models {
            metas.insert(key.clone(), (model.meta.clone(), key.path.clone()));
        }
        for (key, model) in models {
            let Some(run) = self.models.get_mut(&key) else {
                self.spawn_model(key, model)?;
                continue;
            };
            // The cameras that stay on this thread get their decisions under the new model.
            let mut decided = Vec::new();
            for (name, c) in &self.cameras {
                let Some(p) = new_plans.get(name) else { continue };
                if !matches!(plan.cameras.get(name), Some(CameraChange::Update(_))) {
                    continue;
                }
                let (real, shadow) = decisions(p, &metas, live.as_deref())?;
                if !key.shadow && ModelKey::real(&c.plan) == key && ModelKey::real(p) == key {
                    decided.push((c.slot, real));
                } else if let (true, Some(d)) = (key.shadow, shadow) {
                    if ModelKey::shadow_of(&c.plan).as_ref() == Some(&key)
                        && ModelKey::shadow_of(p).as_ref() == Some(&key)
                    {
                        decided.push((c.slot, d));
                    }
                }
            }
            run.meta = model.meta.clone();
            run.provider = model.provider;
            run.sha256 = model.sha256.clone();
            run.wants = model.wants.clone();
            let _ = run.control.send(Control::Swap { model: Box::new(model), decisions: decided });
        }

        for (name, change) in &plan.cameras {
            match change {
                CameraChange::Removed => {
                    if let Some(c) = self.stop_camera_thread(name, "removed by a reload") {
                        if let Some(ctl) = self.control(&ModelKey::real(&c.plan)) {
                            let _ = ctl.send(Control::Detach { slot: c.slot, end: Some(EndReason::Reload), to: None });
                        }
                        self.detach_shadow(&c.plan, c.slot);
                        c.counters.set_shadow(None);
                        self.removed.push((name.clone(), c.counters.clone()));
                    }
                }
                CameraChange::Added => {
                    if let Some(p) = new_plans.get(name) {
                        self.add_camera(p.clone(), None, None, None)?;
                    }
                }
                CameraChange::Restart(why) => {
                    let (Some(p), Some(old)) =
                        (new_plans.get(name), self.stop_camera_thread(name, "restarted by a reload"))
                    else {
                        continue;
                    };
                    let (real, shadow) = decisions(p, &metas, live.as_deref())?;
                    let slot = self.next_slot;
                    self.next_slot += 1;
                    tracing::info!(camera = %name, because = %why.join(", "), old_slot = old.slot, slot, "camera restarted");
                    // Its decision state moves to the new slot (alarm numbers
                    // go on), after its active alarm ends: a new view. The new
                    // slot's first frames may beat the handoff: counted there.
                    if let Some(ctl) = self.control(&ModelKey::real(p)) {
                        let _ = ctl.send(Control::Expect { slot, counters: old.counters.clone() });
                    }
                    let to = self.control(&ModelKey::real(p)).map(|control| Handoff {
                        control: control.clone(),
                        slot,
                        decision: real,
                        roi: p.roi,
                    });
                    if let Some(ctl) = self.control(&ModelKey::real(&old.plan)) {
                        let _ = ctl.send(Control::Detach { slot: old.slot, end: Some(EndReason::Reload), to });
                    }
                    self.detach_shadow(&old.plan, old.slot);
                    let compare = self.attach_shadow(p, slot, shadow)?;
                    let queue = self.settings.pipeline.frame_queue.max(1);
                    let (frames_tx, frames) = crossbeam_channel::bounded(queue);
                    // Its decision state (with its kept alarm frames) moved on; so do its hooks.
                    let CameraRun { counters, recycle, tap, alarm_frames, .. } = old;
                    let hooks = (tap, alarm_frames);
                    let queue = (frames_tx, frames.clone());
                    self.spawn_camera_thread(p.clone(), slot, counters, recycle, queue, frames, compare, None, hooks)?;
                }
                CameraChange::Update(u) if u.is_empty() => {}
                CameraChange::Update(u) => {
                    let Some(p) = new_plans.get(name) else { continue };
                    let (real, shadow) = decisions(p, &metas, live.as_deref())?;
                    let Some(c) = self.cameras.get(name) else { continue };
                    let (slot, old_key, new_key) = (c.slot, ModelKey::real(&c.plan), ModelKey::real(p));
                    if old_key != new_key {
                        // Handed, alarm state and all, to the new model's thread,
                        // which counts the frames that beat the handoff there.
                        if let Some(ctl) = self.control(&new_key) {
                            let _ = ctl.send(Control::Expect { slot, counters: c.counters.clone() });
                        }
                        let to = self.control(&new_key).map(|control| Handoff {
                            control: control.clone(),
                            slot,
                            decision: real,
                            roi: p.roi,
                        });
                        if let Some(ctl) = self.control(&old_key) {
                            let _ = ctl.send(Control::Detach { slot, end: None, to });
                        }
                    } else if u.model || u.score || u.alarm {
                        if let Some(ctl) = self.control(&new_key) {
                            let _ = ctl.send(Control::Configure { slot, decision: real });
                        }
                    }
                    let old_plan = c.plan.clone();
                    if u.shadow {
                        self.detach_shadow(&old_plan, slot);
                        let compare = self.attach_shadow(p, slot, shadow)?;
                        if let Some(c) = self.cameras.get_mut(name) {
                            c.counters.set_shadow(compare.clone());
                            c.shadow = compare;
                        }
                    } else if let (true, Some(d), Some(key)) = (u.alarm, shadow, ModelKey::shadow_of(p)) {
                        if let Some(ctl) = self.control(&key) {
                            let _ = ctl.send(Control::Configure { slot, decision: d });
                        }
                    }
                    if let Some(c) = self.cameras.get_mut(name) {
                        c.plan = p.clone();
                    }
                }
            }
        }

        // Models no camera uses any more: their inputs close once the workers
        // take the new spec, and their threads end.
        let used = needed_models(&new);
        let unused: Vec<ModelKey> = self.models.keys().filter(|k| !used.contains(k)).cloned().collect();
        for key in unused {
            if let Some(m) = self.models.remove(&key) {
                tracing::info!(model = %key.path.display(), shadow = key.shadow, "model retired");
                self.retired_models.push(m.thread);
            }
        }
        let spec = Arc::new(self.spec());
        for w in &self.pool {
            let _ = w.send(spec.clone());
        }
        self.settings = new;
        self.relist();
        Ok(plan)
    }

    /// The settings running now (after the reloads applied so far).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Asks the sources to stop; the rest drains (see the module doc).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        for c in self.cameras.values() {
            c.stop.store(true, Ordering::Relaxed);
        }
    }

    /// True once every camera thread has ended (stopped, or a finite replay ran out).
    pub fn sources_done(&self) -> bool {
        self.cameras.values().all(|c| c.thread.as_ref().is_none_or(JoinHandle::is_finished))
    }

    /// Frames decided so far, all cameras.
    pub fn decided(&self) -> u64 {
        self.cameras.values().map(|c| CameraCounters::get(&c.counters.decided)).sum()
    }

    /// The running cameras' counters, in name order.
    pub fn counters(&self) -> Vec<(String, Arc<CameraCounters>)> {
        self.cameras.iter().map(|(n, c)| (n.clone(), c.counters.clone())).collect()
    }

    /// Each running (camera) model and the execution provider running it.
    pub fn providers(&self) -> Vec<(PathBuf, Provider)> {
        self.models.iter().filter(|(k, _)| !k.shadow).map(|(k, m)| (k.path.clone(), m.provider)).collect()
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
        // The trigger thread answers what is pending, then lets the pool end
        // (it holds the triggered cameras' scoring queues).
        self.cameras_done.store(true, Ordering::Relaxed);
        if let Some(h) = self.trigger.take() {
            let _ = h.join();
        }
        // Closing the spec channels lets the workers end once their queues are drained.
        self.pool.clear();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        // The pipeline's own ends of the model inputs, or inference would
        // never see its input close.
        let models = std::mem::take(&mut self.models);
        let mut inference: Vec<JoinHandle<()>> = models.into_values().map(|m| m.thread).collect();
        inference.append(&mut self.retired_models);
        for h in inference {
            let _ = h.join();
        }
        self.snapshots = None;
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
        let mut stages = StageLatency::default();
        let mut all = self.counters();
        all.append(&mut self.removed);
        let cameras = all
            .iter()
            .map(|(name, c)| {
                if let Ok(h) = c.latency.lock() {
                    latency.merge(&h);
                }
                if let Ok(h) = c.stages.lock() {
                    stages.merge(&h);
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
        Report { cameras, latency, stages, snapshots_skipped }
    }

    /// Joins the camera threads (those a reload stopped too): all of them
    /// while the sources run on their own; once a stop is asked for, only
    /// those that end within [`STOP_GRACE`]. The others are stuck in a read:
    /// their queues are closed so the rest drains, and the threads are left
    /// to the process exit.
    fn join_cameras(&mut self) {
        let mut threads: Vec<(JoinHandle<()>, Arc<CameraWatch>)> = std::mem::take(&mut self.retired_cameras);
        for c in self.cameras.values_mut() {
            if let Some(h) = c.thread.take() {
                threads.push((h, c.watch.clone()));
            }
        }
        let mut stopping_since: Option<Instant> = None;
        while !threads.iter().all(|(h, _)| h.is_finished()) {
            if self.stopping.load(Ordering::Relaxed) {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= STOP_GRACE {
                    for (h, w) in &threads {
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
        for (h, _) in threads {
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

/// Loads a model for `key`, pruned to what its cameras in `settings` need
/// ([`wants`]); a shadow's session is built at the lower CPU priority (ONNX
/// Runtime's threads inherit it from the thread that builds it).
fn load_model(key: &ModelKey, settings: &Settings, live: bool) -> Result<Model, InferError> {
    let bytes = infer::read_model_file(&key.path)?;
    build_model(key, &bytes, settings, live)
}

fn build_model(key: &ModelKey, bytes: &[u8], settings: &Settings, live: bool) -> Result<Model, InferError> {
    let build =
        || Model::from_bytes_for(bytes, &key.path, &settings.inference, |m| Some(wants(settings, key, m, live)));
    if key.shadow {
        crate::base::priority::in_background(build)
    } else {
        build()
    }
}

/// The reload's loader thread: every model `new` needs that does not run
/// with the same bytes, loaded and checked; then every camera's decisions
/// checked against the models it will run with. `Err`: the reasons, each
/// naming its camera or file.
/// What a reload knows of a running model.
struct Running {
    sha256: String,
    meta: ModelMetadata,
    /// What its session is pruned to (`None`: the full graph).
    wants: Option<infer::Wants>,
}

fn load_for_reload(
    old: &Settings,
    new: Settings,
    running: &BTreeMap<ModelKey, Running>,
    live: bool,
) -> Result<Loaded, String> {
    let mut models = BTreeMap::new();
    let mut changed = BTreeSet::new();
    let mut metas: BTreeMap<ModelKey, (ModelMetadata, PathBuf)> = BTreeMap::new();
    // What will run: new sessions are built as the running ones were
    // (`[inference]` and `[snapshots]` changes need a restart), for the cameras
    // the reload leaves running (held triggered ones keep their plans).
    let built = reload::applied(old, new.clone());
    for key in needed_models(&new) {
        let bytes = ganomaly_core::onnx::check::read_file(&key.path)
            .map_err(|e| format!("model {}: {e}", key.path.display()))?;
        let sha256 = crate::base::digest::sha256_hex(&bytes);
        if let Some(r) = running.get(&key) {
            if r.sha256 == sha256 {
                metas.insert(key.clone(), (r.meta.clone(), key.path.clone()));
                // The same file, but its cameras may need other outputs now:
                // re-pruned (a session that runs in full has them all).
                let w = wants(&built, &key, &r.meta, live);
                if r.wants.as_ref().is_some_and(|now| *now != w) {
                    let model = build_model(&key, &bytes, &built, live).map_err(|e| crate::base::report::chain(&e))?;
                    tracing::info!(model = %key.path.display(), kinds = ?w.kinds, maps = ?w.maps, "model re-pruned for its cameras' new scores");
                    models.insert(key, model);
                }
                continue;
            }
            // A triggered camera's verdicts name the model they were judged
            // with (its station is set up at start): its file cannot change
            // under it, nor under a held one that runs on after this reload.
            if let Some(c) = (!key.shadow).then(|| reload::triggered_on(old, &new, &key.path)).flatten() {
                return Err(format!(
                    "model {} changed, and triggered camera `{c}` runs it: restart to change a triggered camera's model",
                    key.path.display(),
                ));
            }
            changed.insert(key.path.clone());
        }
        // A shadow's session, and so its ONNX Runtime threads, at the lower priority.
        let model = build_model(&key, &bytes, &built, live).map_err(|e| crate::base::report::chain(&e))?;
        metas.insert(key.clone(), (model.meta.clone(), key.path.clone()));
        models.insert(key, model);
    }
    for plan in &new.cameras {
        decisions(plan, &metas, None).map_err(|e| e.to_string())?;
    }
    Ok(Loaded { settings: new, models, changed })
}

/// How long `join` waits for the open-alarm journal to hand its last events
/// on: a few SQLite commits, unless the disk has stalled.
const JOURNAL_FLUSH: Duration = Duration::from_secs(5);

fn spawn_stats(
    cams: Listed,
    every: Duration,
    publisher: Arc<dyn Publisher>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("stats".into()).spawn(move || {
        let decided = |c: &CameraCounters| CameraCounters::get(&c.decided);
        let now_listed = || cams.read().map(|c| c.clone()).unwrap_or_default();
        // By name: a reload adds and removes cameras between two reports.
        let mut last: BTreeMap<String, u64> = now_listed().0.iter().map(|(n, c)| (n.clone(), decided(c))).collect();
        let mut last_t = Instant::now();
        loop {
            sleep_unless_stopped(every, &stop);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let dt = last_t.elapsed().as_secs_f64().max(1e-9);
            last_t = Instant::now();
            let (listed, provider) = now_listed();
            let cameras = listed
                .iter()
                .map(|(name, c)| {
                    let now = decided(c);
                    let prev = last.insert(name.clone(), now).unwrap_or(now);
                    c.stats(name, now.saturating_sub(prev) as f64 / dt)
                })
                .collect();
            last.retain(|n, _| listed.iter().any(|(l, _)| l == n));
            publisher.stats(&StatsReport { schema: PAYLOAD_SCHEMA, ts: now_ms(), provider, cameras });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ganomaly_core::onnx::OUTPUT_MAP;
    use ganomaly_core::{ArchSpec, ScoreKind};

    #[test]
    fn a_threads_session_is_cut_to_its_cameras_scores_and_the_maps_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let arch = ArchSpec { isize: 32, nc: 3, nz: 8, ngf: 4, ndf: 4, ..Default::default() };
        let (m, o) = (dir.path().join("m.onnx"), dir.path().join("o.onnx"));
        std::fs::write(&m, ganomaly_core::onnx::random_model(&arch, 1).unwrap()).unwrap();
        std::fs::write(&o, ganomaly_core::onnx::random_model(&arch, 2).unwrap()).unwrap();
        let settings = |snapshots: bool| {
            let text = format!(
                "[inference]\nproviders = [\"cpu\"]\n[snapshots]\nenabled = {snapshots}\ndir = \"snaps\"\n\
                 [cameras.a]\nmodel = \"{m}\"\nscore = \"mahalanobis\"\nsource = {{ kind = \"synthetic\", size = 32 }}\n\
                 [cameras.b]\nmodel = \"{m}\"\nscore = \"patch\"\nshadow_model = \"{o}\"\nshadow_score = \"recon\"\n\
                 source = {{ kind = \"synthetic\", size = 32 }}\n\
                 [cameras.c]\nmodel = \"{o}\"\nsource = {{ kind = \"synthetic\", size = 32 }}\n",
                m = m.display(),
                o = o.display()
            );
            crate::config::compile_str(&text, dir.path()).unwrap()
        };
        let meta = ganomaly_core::onnx::check::check_model_file(&m).unwrap();
        let key = |p: &std::path::Path, shadow| ModelKey { path: p.to_path_buf(), shadow };
        let (on, off) = (settings(true), settings(false));
        let w = wants(&on, &key(&m, false), &meta, false);
        assert_eq!(w.kinds, BTreeSet::from([ScoreKind::Mahalanobis, ScoreKind::Patch]));
        assert_eq!(w.maps, BTreeSet::from([OUTPUT_MAP, ganomaly_core::metadata::OUTPUT_PATCH_MAP]));
        let w = wants(&off, &key(&m, false), &meta, false);
        assert!(w.maps.is_empty(), "nothing draws a map: {w:?}");
        assert_eq!(wants(&off, &key(&m, false), &meta, true).maps.len(), 2, "the live view draws them");
        // The shadow's thread: its camera's shadow score, never a map.
        let w = wants(&on, &key(&o, true), &meta, true);
        assert_eq!((w.kinds, w.maps), (BTreeSet::from([ScoreKind::Recon]), BTreeSet::new()));
        // `default`: the model's default score.
        let w = wants(&on, &key(&o, false), &meta, false);
        assert_eq!(w.kinds, BTreeSet::from([meta.default_score]));
    }
}
