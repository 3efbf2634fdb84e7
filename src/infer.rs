//! Inference: the ONNX Runtime session and the thread that owns it.
//!
//! [`Model`] loads a GANomaly ONNX file, checks it (size, no external data,
//! input `image` `[N, C, S, S]`, one output per score, `anomaly_map`, all
//! against its own metadata: `ganomaly_core::onnx::check`) and refuses it
//! with an error naming the tensor or key that is wrong. The
//! session is built once, with the execution providers from the config tried
//! in order (TensorRT → CUDA → CPU by default); the provider actually running
//! the model is logged and reported, and `require_accelerator` turns a CPU
//! fallback into a start-up error. `ganomalyd score` and `bench` use the same
//! `Model`, so there is one way to build a session.
//!
//! Those commands run the full graph. The daemon's sessions run it pruned
//! to what their cameras use ([`Wants`], `ganomaly_core::onnx::prune`): a
//! `mahalanobis` camera's frames run encoder 1 alone. A heat map the scores'
//! graph does not make on the way (the decoder's reconstruction map, for that
//! camera) is computed by a second session, pruned to the map, only for a
//! frame whose map is drawn (an alarm's snapshot, a live-view frame, a
//! triggered camera's scored frame when snapshots are on), and with the same
//! ops as the full graph, so the heat map is the one the full graph draws.
//!
//! [`spawn`] starts the inference thread: the session's only owner. It batches
//! frames across cameras (up to `max_batch`, waiting at most `max_wait_s`
//! after the first), runs the session, and hands each frame's scores to its
//! camera's decision step ([`crate::decide`]), which normalises, runs the
//! alarm machine and hands scores, alarms and snapshot jobs on without
//! waiting on any of them.
//!
//! Between two batches (and while it waits for frames) it takes the
//! [`Control`] messages a reload sends: a camera attached, detached (its
//! decision state handed on to another model's thread, or its alarm ended,
//! reason `reload`), its decision settings changed, or a new session swapped
//! in for a changed model file. Its cameras are indexed by slot (the number
//! a camera's frames carry), so that they come and go without touching the
//! others; frames of a camera no longer here, or prepared for the input size
//! of a model swapped out, are dropped and counted. A shadow model's thread
//! is the same loop with its own cameras (`shadow.rs`) and no part in the
//! daemon's liveness.
//!
//! When its input closes (shutdown), it ends the alarms still active
//! (reason `shutdown`) before it returns.
//!
//! Backpressure: this thread's input is a bounded channel that the preprocess
//! workers block on, so a slow model fills it, then the per-camera queues,
//! where frames are dropped oldest-first (see `preprocess`). Scores and
//! alarms go to the publisher, which must not block (see `events`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ganomaly_core::metadata::{ColorMode, OUTPUT_PATCH_MAP};
use ganomaly_core::onnx::prune::{self as prune_graph, Pruner};
use ganomaly_core::onnx::OUTPUT_MAP;
use ganomaly_core::{Calibration, ModelMetadata, ScoreKind};
use ort::ep::{ExecutionProvider, TensorRT, CUDA};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

use crate::base::liveness::Beat;
use crate::base::Liveness;
use crate::config::{AlarmConfig, InferenceSettings, Provider};
use crate::decide::{Camera, Outputs};
use crate::events::{EndReason, Publisher};
use crate::metrics::{CameraCounters, Passage};
use crate::preprocess::Prepared;
use crate::snapshot::SnapshotQueue;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("cannot read model {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("model {path} is not a usable GANomaly ONNX model: {source}")]
    Metadata { path: PathBuf, source: ganomaly_core::onnx::OnnxError },
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("ONNX Runtime could not load model {path}: {source}")]
    Session { path: PathBuf, source: ort::Error },
    #[error(
        "inference.require_accelerator is true but no accelerator could be used ({}); \
         install onnxruntime-gpu with CUDA/TensorRT, or set require_accelerator = false to run on the CPU",
        reasons.join("; ")
    )]
    NoAccelerator { reasons: Vec<String> },
    #[error("inference failed: {0}")]
    Run(#[from] ort::Error),
    #[error("inference failed: {0}")]
    Output(String),
}

/// Scores and anomaly maps of one batch, in buffers reused batch to batch.
#[derive(Debug, Default, Clone)]
pub struct BatchOutput {
    pub n: usize,
    /// Raw scores per kind, indexed like [`ScoreKind::ALL`]; empty for kinds
    /// the model does not export.
    pub scores: [Vec<f32>; ScoreKind::ALL.len()],
    /// `n × side × side` anomaly maps.
    pub maps: Vec<f32>,
    /// `n × side × side` maps of the `patch` score (`patch_map`); empty when the
    /// model does not export it.
    pub patch_maps: Vec<f32>,
}

impl BatchOutput {
    /// Empty, as before any run (the buffers keep their capacity).
    fn clear(&mut self) {
        self.n = 0;
        for v in &mut self.scores {
            v.clear();
        }
        self.maps.clear();
        self.patch_maps.clear();
    }

    pub fn score(&self, kind: ScoreKind, i: usize) -> Option<f32> {
        self.scores[kind_index(kind)].get(i).copied()
    }

    /// Image `i`'s heat map for a camera scoring with `kind`: that score's own map
    /// when it has one and the model exports it (`patch`), else the reconstruction
    /// map. `side × side`; empty if `i` is out of range.
    pub fn map(&self, kind: ScoreKind, i: usize, side: usize) -> &[f32] {
        self.maps(kind, i, 1, side)
    }

    /// The heat maps of images `i..i + n` (a tiled frame's tiles), back to back.
    pub fn maps(&self, kind: ScoreKind, i: usize, n: usize, side: usize) -> &[f32] {
        let px = side * side;
        let maps =
            if kind.map_output().is_some() && !self.patch_maps.is_empty() { &self.patch_maps } else { &self.maps };
        maps.get(i * px..(i + n) * px).unwrap_or(&[])
    }

    /// Image `i`'s map of graph output `output` (`anomaly_map` or `patch_map`);
    /// empty when the batch's session did not produce it.
    pub fn map_named(&self, output: &str, i: usize, side: usize) -> &[f32] {
        let px = side * side;
        let maps = if output == OUTPUT_PATCH_MAP { &self.patch_maps } else { &self.maps };
        maps.get(i * px..(i + 1) * px).unwrap_or(&[])
    }
}

fn kind_index(kind: ScoreKind) -> usize {
    ScoreKind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

/// What the cameras on one session need from it: their score kinds, and the
/// heat maps they may be shown (`anomaly_map`, `patch_map`: for snapshots,
/// the console's live view, a triggered camera's `ng` part). The session runs
/// the graph pruned to that ([`ganomaly_core::onnx::prune`]); a heat map
/// whose graph needs more heavy ops than the scores do (the decoder, for a
/// `mahalanobis` camera) is computed by a second session, only for the
/// frames whose map is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wants {
    pub kinds: BTreeSet<ScoreKind>,
    pub maps: BTreeSet<&'static str>,
}

/// The second session of a pruned model: the heat maps the scores' graph does
/// not produce, run on one frame at a time.
struct MapSession {
    session: Session,
    outputs: Vec<String>,
}

/// A loaded, checked model with its session.
pub struct Model {
    session: Session,
    /// Heat maps left out of `session` (see [`Wants`]); `None` when it produces
    /// every map its cameras need, or runs the full graph.
    map_session: Option<MapSession>,
    pub meta: ModelMetadata,
    pub path: PathBuf,
    /// Execution provider running the model.
    pub provider: Provider,
    channels: usize,
    side: usize,
    /// Score kinds `session` exports (all its metadata lists, for the full graph).
    kinds: Vec<ScoreKind>,
    /// Whether `session` exports `anomaly_map` / `patch_map` on every frame.
    every_map: bool,
    every_patch_map: bool,
    /// What the session was pruned to; `None`: the full graph.
    pub wants: Option<Wants>,
    /// sha256 (hex) of the file's bytes as loaded: what every verdict names,
    /// and how a reload tells a changed file from the one running.
    pub sha256: String,
}

/// The graphs a [`Wants`] runs: the scores' (every frame) and, if any, the
/// maps' (on demand), with the kinds and maps the first exports.
struct Cut {
    every_frame: Vec<u8>,
    on_demand: Option<(Vec<u8>, Vec<String>)>,
    kinds: Vec<ScoreKind>,
    outputs: Vec<String>,
}

fn cut(bytes: &[u8], meta: &ModelMetadata, wants: &Wants) -> Result<Cut, ganomaly_core::onnx::OnnxError> {
    let pruner = Pruner::new(bytes)?;
    // Kinds the model does not list cannot be chosen (the pipeline refuses
    // such a camera); with no camera at all, the default score keeps the graph valid.
    let mut kinds: Vec<ScoreKind> = wants.kinds.iter().copied().filter(|k| meta.score(*k).is_some()).collect();
    if kinds.is_empty() {
        kinds.push(meta.default_score);
    }
    let mut scores: Vec<&str> = Vec::new();
    for k in &kinds {
        for o in prune_graph::score_outputs(meta, *k) {
            if !scores.contains(&o) {
                scores.push(o);
            }
        }
    }
    let maps: Vec<&str> = wants.maps.iter().copied().collect();
    let split = pruner.split(&scores, &maps)?;
    let every: Vec<&str> = split.every_frame.iter().map(String::as_str).collect();
    let on_demand = if split.on_demand.is_empty() {
        None
    } else {
        let names: Vec<&str> = split.on_demand.iter().map(String::as_str).collect();
        Some((pruner.prune(&names)?, split.on_demand.clone()))
    };
    Ok(Cut {
        every_frame: pruner.prune(&every)?,
        on_demand,
        kinds: ScoreKind::ALL.into_iter().filter(|k| every.contains(&k.output())).collect(),
        outputs: split.every_frame,
    })
}

impl Model {
    /// Reads and checks `path` (size, external data, graph against metadata:
    /// [`ganomaly_core::onnx::check`], the same check as `check-config`),
    /// builds its session for the full graph.
    pub fn load(path: &Path, cfg: &InferenceSettings) -> Result<Model, InferError> {
        Model::from_bytes(&read_model_file(path)?, path, cfg)
    }

    /// The full graph: every score and map (`ganomalyd score`, `calibrate`, `bench`).
    pub fn from_bytes(bytes: &[u8], path: &Path, cfg: &InferenceSettings) -> Result<Model, InferError> {
        Model::from_bytes_for(bytes, path, cfg, |_| None)
    }

    /// The graph pruned to what `wants` says, once the model's metadata is known
    /// (a camera's `default` score is the model's); `None`: the full graph. A
    /// graph that cannot be pruned runs in full, with a warning.
    pub fn from_bytes_for(
        bytes: &[u8],
        path: &Path,
        cfg: &InferenceSettings,
        wants: impl FnOnce(&ModelMetadata) -> Option<Wants>,
    ) -> Result<Model, InferError> {
        // Checked before ONNX Runtime sees a byte: it would act on external
        // data and memory markers that the daemon never reads itself.
        let meta = ganomaly_core::onnx::check::check_model(bytes)
            .map_err(|source| InferError::Metadata { path: path.into(), source })?;
        let env = crate::runtime::environment(cfg.ort_library.as_deref())?;
        let channels = meta.preprocess.color.channels() as usize;
        let side = meta.preprocess.size as usize;
        let sha256 = crate::base::digest::sha256_hex(bytes);
        let full_kinds: Vec<ScoreKind> = meta.scores.iter().map(|s| s.kind).collect();
        let wants = wants(&meta);
        let pruned = match wants.as_ref().map(|w| cut(bytes, &meta, w)) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                tracing::warn!(model = %path.display(), error = %e, "the graph cannot be pruned: running it in full");
                None
            }
            None => None,
        };
        // A pruned graph is ours, not the trainer's: if ONNX Runtime refuses
        // it (or its map session), the model still runs, in full, as before
        // pruning existed; only a full graph that fails is the model's error.
        let sessions = match pruned {
            None => None,
            Some(c) => {
                let built = build_session(env, &c.every_frame, path, cfg).and_then(|every| {
                    let map = match &c.on_demand {
                        Some((graph, outputs)) => Some(MapSession {
                            session: build_session(env, graph, path, cfg)?.0,
                            outputs: outputs.clone(),
                        }),
                        None => None,
                    };
                    Ok((every, map))
                });
                match built {
                    Ok(b) => Some((c, b)),
                    // Only ONNX Runtime refusing the graph: a missing accelerator
                    // would fail the full graph the same way (and a second
                    // TensorRT build can take minutes).
                    Err(e @ InferError::Session { .. }) => {
                        tracing::warn!(model = %path.display(), error = %crate::base::report::chain(&e), "the pruned graph did not load: running the full graph");
                        None
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let model = match sessions {
            Some((c, ((session, provider), map_session))) => {
                tracing::info!(
                    model = %path.display(), every_frame = ?c.outputs,
                    on_demand = ?map_session.as_ref().map(|m| &m.outputs), "graph pruned to what its cameras use"
                );
                Model {
                    session,
                    map_session,
                    provider,
                    kinds: c.kinds,
                    every_map: c.outputs.iter().any(|o| o == OUTPUT_MAP),
                    every_patch_map: c.outputs.iter().any(|o| o == OUTPUT_PATCH_MAP),
                    wants,
                    meta,
                    path: path.into(),
                    channels,
                    side,
                    sha256,
                }
            }
            None => {
                let (session, provider) = build_session(env, bytes, path, cfg)?;
                Model {
                    session,
                    map_session: None,
                    provider,
                    every_patch_map: full_kinds.contains(&ScoreKind::Patch),
                    kinds: full_kinds,
                    every_map: true,
                    wants: None,
                    meta,
                    path: path.into(),
                    channels,
                    side,
                    sha256,
                }
            }
        };
        release_freed_heap();
        tracing::info!(
            model = %path.display(),
            provider = model.provider.as_str(),
            input = ?[-1, channels as i64, side as i64, side as i64],
            default_score = model.meta.default_score.as_str(),
            "model loaded"
        );
        Ok(model)
    }

    /// Floats in one input image.
    pub fn tensor_len(&self) -> usize {
        self.channels * self.side * self.side
    }

    pub fn side(&self) -> usize {
        self.side
    }

    pub fn color(&self) -> ColorMode {
        self.meta.preprocess.color
    }

    /// Whether the session exports `kind` (a pruned one: only its cameras' kinds).
    pub fn has_score(&self, kind: ScoreKind) -> bool {
        self.kinds.contains(&kind)
    }

    /// Calibration of a score kind.
    pub fn calibration(&self, kind: ScoreKind) -> Option<&Calibration> {
        self.meta.score(kind).map(|s| &s.calibration)
    }

    /// Runs `n` images laid out back to back in `input`.
    pub fn run(&mut self, input: &[f32], n: usize, out: &mut BatchOutput) -> Result<(), InferError> {
        self.run_chunked(input, n, n, out)
    }

    /// The first `n` images of `input` in session runs of at most `chunk`
    /// images each, their outputs back to back in `out` as if from one run.
    /// A tiled frame is never split across batches (its score is its tiles'
    /// max), but a frame of hundreds of tiles must not size ONNX Runtime's
    /// arena (host or GPU) for hundreds of images: the inference thread runs
    /// its batches in chunks of `max_batch`.
    pub fn run_chunked(
        &mut self,
        input: &[f32],
        n: usize,
        chunk: usize,
        out: &mut BatchOutput,
    ) -> Result<(), InferError> {
        let len = self.tensor_len();
        let data =
            input.get(..n * len).ok_or_else(|| InferError::Output(format!("batch of {n} needs {} floats", n * len)))?;
        out.clear();
        for part in data.chunks(chunk.max(1) * len) {
            if let Err(e) = self.run_part(part, part.len() / len, out) {
                // No caller may read the chunks that did run as the batch's.
                out.clear();
                return Err(e);
            }
        }
        out.n = n;
        Ok(())
    }

    /// One session run of `n` images, its outputs appended to `out`.
    fn run_part(&mut self, data: &[f32], n: usize, out: &mut BatchOutput) -> Result<(), InferError> {
        let tensor = TensorRef::from_array_view(([n, self.channels, self.side, self.side], data))?;
        let outputs = self.session.run(ort::inputs!["image" => tensor])?;
        for (i, kind) in ScoreKind::ALL.into_iter().enumerate() {
            if !self.kinds.contains(&kind) {
                continue;
            }
            let (_, v) = outputs[kind.output()].try_extract_tensor::<f32>()?;
            if v.len() != n {
                return Err(InferError::Output(format!(
                    "output `{}` has {} values for {n} images",
                    kind.output(),
                    v.len()
                )));
            }
            out.scores[i].extend_from_slice(v);
        }
        let px = n * self.side * self.side;
        for (name, wanted, buf) in
            [(OUTPUT_MAP, self.every_map, &mut out.maps), (OUTPUT_PATCH_MAP, self.every_patch_map, &mut out.patch_maps)]
        {
            if !wanted {
                continue;
            }
            let (_, m) = outputs[name].try_extract_tensor::<f32>()?;
            if m.len() != px {
                return Err(InferError::Output(format!("output `{name}` has {} values for {n} images", m.len())));
            }
            buf.extend_from_slice(m);
        }
        Ok(())
    }

    /// Image `i` of the batch `input` ran as: its heat map `output`
    /// (`anomaly_map` or `patch_map`) into `buf`, from `out` when the session
    /// produced it, else computed now, for that image alone, by the map
    /// session. Empty if neither has it (an error is logged).
    pub fn heat_map_into(&mut self, out: &BatchOutput, input: &[f32], i: usize, output: &str, buf: &mut Vec<f32>) {
        buf.clear();
        let ready = out.map_named(output, i, self.side);
        if !ready.is_empty() {
            buf.extend_from_slice(ready);
            return;
        }
        if let Err(e) = self.map_of(input, i, output, buf) {
            tracing::warn!(model = %self.path.display(), map = output, error = %crate::base::report::chain(&e), "heat map not computed");
            buf.clear();
        }
    }

    /// Whether the map session computes `output` (it is left out of the scores' graph).
    pub fn map_on_demand(&self, output: &str) -> bool {
        self.map_session.as_ref().is_some_and(|m| m.outputs.iter().any(|o| o == output))
    }

    fn map_of(&mut self, input: &[f32], i: usize, output: &str, buf: &mut Vec<f32>) -> Result<(), InferError> {
        let (len, side) = (self.tensor_len(), self.side);
        let Some(ms) = self.map_session.as_mut().filter(|m| m.outputs.iter().any(|o| o == output)) else {
            return Err(InferError::Output(format!("no session of this model produces `{output}`")));
        };
        let data = input
            .get(i * len..(i + 1) * len)
            .ok_or_else(|| InferError::Output(format!("image {i} is not in the batch")))?;
        let tensor = TensorRef::from_array_view(([1, self.channels, side, side], data))?;
        let outputs = ms.session.run(ort::inputs!["image" => tensor])?;
        let (_, m) = outputs[output].try_extract_tensor::<f32>()?;
        if m.len() != side * side {
            return Err(InferError::Output(format!("output `{output}` has {} values for one image", m.len())));
        }
        buf.extend_from_slice(m);
        Ok(())
    }
}

/// Reads a model file (bounded: `onnx::check::read_file`), errors naming it.
pub fn read_model_file(path: &Path) -> Result<Vec<u8>, InferError> {
    ganomaly_core::onnx::check::read_file(path).map_err(|e| match e {
        ganomaly_core::onnx::OnnxError::Io { source, .. } => InferError::Read { path: path.into(), source },
        source => InferError::Metadata { path: path.into(), source },
    })
}

/// Hands the heap that building a session freed back to the system. ONNX
/// Runtime parses the file into protobuf tensors, copies them into its own
/// and frees the first: glibc keeps that memory mapped (measured on the
/// 128 px ngf 32 model, 46 MiB: VmRSS 175 → 98 MiB after the session is
/// built, 234 → 159 MiB steady with 4 cameras; the Python peer keeps it too).
/// Once per model load, so its cost (a walk of the malloc arenas) is nothing.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only returns free pages.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Builds the session with the configured providers; returns the one in use.
fn build_session(
    env: &ort::environment::Environment,
    bytes: &[u8],
    path: &Path,
    cfg: &InferenceSettings,
) -> Result<(Session, Provider), InferError> {
    // Builder errors carry the builder back (ort's recovery API); only the error is kept.
    let serr = |source: ort::Error<ort::session::builder::SessionBuilder>| InferError::Session {
        path: path.into(),
        source: source.into(),
    };
    let mut builder = Session::builder(env)
        .map_err(|source| InferError::Session { path: path.into(), source })?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(serr)?;
    if cfg.intra_threads > 0 {
        builder = builder.with_intra_threads(cfg.intra_threads).map_err(serr)?;
    }
    // The session shares the box's cores with the camera and preprocessing
    // threads; ORT's default busy-waiting intra-op threads steal their CPU.
    // Measured on 2 cores, demo model, 640×480, batch 8: pipeline 1,439 → 1,580
    // fps and p99 26 → 18 ms with 1 camera (raw session alone: 2,048 → 1,617).
    // `[inference] spin` turns it back on: a sleeping pool wakes slowly after
    // an idle gap, which costs latency at low load (benches/README.md).
    builder = builder.with_intra_op_spinning(cfg.spin).map_err(serr)?;
    let mut in_use: Option<Provider> = None;
    let mut reasons = Vec::new();
    // Every accelerator that registers is kept, in order: ONNX Runtime hands
    // nodes TensorRT cannot take to CUDA before the CPU.
    for p in &cfg.providers {
        let result = match p {
            Provider::Cpu => break,
            Provider::Tensorrt => {
                if !TensorRT::is_available().unwrap_or(false) {
                    Err("this ONNX Runtime build has no TensorRT support".to_string())
                } else {
                    let mut ep = TensorRT::default().with_device_id(cfg.device_id as i32).with_fp16(cfg.trt_fp16);
                    if let Some(dir) = &cfg.trt_cache_dir {
                        if let Err(e) = std::fs::create_dir_all(dir) {
                            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the TensorRT engine cache");
                        }
                        ep = ep.with_engine_cache(true).with_engine_cache_path(dir.display()).with_timing_cache(true);
                    }
                    ep.build().error_on_failure().register(&mut builder).map_err(|e| e.to_string())
                }
            }
            Provider::Cuda => {
                if !CUDA::is_available().unwrap_or(false) {
                    Err("this ONNX Runtime build has no CUDA support".to_string())
                } else {
                    CUDA::default()
                        .with_device_id(cfg.device_id as i32)
                        .build()
                        .error_on_failure()
                        .register(&mut builder)
                        .map_err(|e| e.to_string())
                }
            }
        };
        match result {
            Ok(()) => {
                in_use.get_or_insert(*p);
            }
            Err(reason) => reasons.push(format!("{}: {reason}", p.as_str())),
        }
    }
    let wanted_accelerator = cfg.providers.iter().any(|p| *p != Provider::Cpu);
    let provider = match in_use {
        Some(p) => p,
        None if cfg.require_accelerator => return Err(InferError::NoAccelerator { reasons }),
        None => {
            if wanted_accelerator {
                tracing::warn!(reasons = %reasons.join("; "), "no accelerator available: falling back to the CPU execution provider");
            }
            Provider::Cpu
        }
    };
    if in_use.is_some() && !reasons.is_empty() {
        tracing::warn!(provider = provider.as_str(), skipped = %reasons.join("; "), "some execution providers were skipped");
    }
    let session =
        builder.commit_from_memory(bytes).map_err(|source| InferError::Session { path: path.into(), source })?;
    Ok((session, provider))
}

/// How one camera is decided: its score kind and the model's calibration of
/// it, and its alarm settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub kind: ScoreKind,
    pub calibration: Calibration,
    pub alarm: AlarmConfig,
}

/// Where a detached camera goes next (a reload moved it to another model's
/// thread, or restarted it under a new slot).
pub struct Handoff {
    pub control: Sender<Control>,
    /// Its slot from now on (a restarted camera has a new one).
    pub slot: usize,
    pub decision: Decision,
    pub roi: Option<crate::config::Roi>,
}

/// Run-time changes for the inference thread, applied between batches. The
/// pipeline sends them on a reload (`pipeline.rs`); they are taken before a
/// batch runs and while the thread waits for frames.
pub enum Control {
    /// Decide for this camera from now on (added, restarted, or moved here).
    Attach { slot: usize, camera: Box<Camera> },
    /// The camera at `slot` is on its way here (handed on by another model's
    /// thread): its frames that arrive before its `Attach` are dropped and
    /// counted on these counters.
    Expect { slot: usize, counters: Arc<CameraCounters> },
    /// New decision settings for a camera: an alarm in progress carries on.
    Configure { slot: usize, decision: Decision },
    /// Stop deciding for a camera: first end its active alarm for `end`, if
    /// set; then hand it on to `to`, or drop it. Its frames still in this
    /// thread's queue are dropped (counted in the camera's `dropped`).
    Detach { slot: usize, end: Option<EndReason>, to: Option<Handoff> },
    /// A new session in place of this thread's (the model file changed, or
    /// the scores its cameras use: re-pruned), with the decisions of its
    /// cameras under it. Queued frames prepared for the
    /// old input shape are dropped (counted).
    Swap { model: Box<Model>, decisions: Vec<(usize, Decision)> },
    /// Start a live calibration of the camera at `slot` (the `calibrate` command).
    Calibrate { slot: usize, req: crate::decide::CalibrateRequest },
}

/// Inputs and outputs of the inference thread.
pub struct InferThread {
    pub model: Model,
    pub rx: Receiver<Prepared>,
    /// Given back as frames leave `rx` (the pool takes from it to send them).
    pub budget: Arc<crate::preprocess::ImageBudget>,
    /// Tensor buffers go back to the preprocess workers.
    pub tensor_recycle: Sender<Vec<f32>>,
    /// Indexed by camera slot (`Frame::camera`); `None` for cameras of other models.
    pub cameras: Vec<Option<Camera>>,
    pub max_batch: usize,
    pub max_wait: Duration,
    pub publisher: Arc<dyn Publisher>,
    pub snapshots: Option<SnapshotQueue>,
    /// Changes at run time (reload), applied between batches.
    pub control: Receiver<Control>,
    /// Told after every batch whether it was decided, and once a second when
    /// idle (watchdog, `/healthz`): see `base::liveness` for what counts.
    /// `None` for a shadow model's thread: the daemon's health is its real models'.
    pub liveness: Option<Liveness>,
    /// Run at a lower CPU priority (a shadow model: it must yield the cores to the real ones).
    pub background: bool,
    /// The console's live-view taps, if a console runs (none for a shadow).
    pub live: Option<Arc<crate::console::LiveTaps>>,
}

/// Starts the inference thread; it ends when its input channel closes.
pub fn spawn(t: InferThread) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("infer".into()).spawn(move || run(t))
}

/// Cameras detached from this thread whose frames may still be queued, so
/// that those frames count as dropped for them.
type Orphans = Vec<(usize, Arc<CameraCounters>)>;

impl InferThread {
    fn beat(&self, b: Beat) {
        if let Some(l) = &self.liveness {
            l.beat(b);
        }
    }

    fn camera(&mut self, slot: usize) -> Option<&mut Camera> {
        self.cameras.get_mut(slot).and_then(Option::as_mut)
    }

    fn apply(&mut self, c: Control, orphans: &mut Orphans) {
        match c {
            Control::Attach { slot, camera } => {
                if self.cameras.len() <= slot {
                    self.cameras.resize_with(slot + 1, || None);
                }
                // A retained `ON` from an earlier life of this camera name must not stay.
                if !camera.decider.alarm_active() {
                    self.publisher.alarm_state(&camera.name, false);
                }
                orphans.retain(|(s, _)| *s != slot);
                tracing::info!(camera = %camera.name, slot, model = %self.model.path.display(), "camera attached");
                self.cameras[slot] = Some(*camera);
            }
            Control::Expect { slot, counters } => {
                if self.camera(slot).is_none() {
                    orphans.push((slot, counters));
                }
            }
            Control::Configure { slot, decision } => {
                if let Some(cam) = self.camera(slot) {
                    cam.decider.rebase(decision.kind, decision.calibration);
                    cam.decider.reconfigure(decision.alarm);
                    tracing::info!(camera = %cam.name, kind = decision.kind.as_str(), alarm = ?decision.alarm, "decision settings reloaded");
                }
            }
            Control::Detach { slot, end, to } => {
                let Some(mut cam) = self.cameras.get_mut(slot).and_then(Option::take) else { return };
                if let Some(reason) = end {
                    let out = Outputs { publisher: self.publisher.as_ref(), snapshots: None, live: None };
                    cam.end_with(reason, &out);
                }
                orphans.push((slot, cam.counters.clone()));
                match to {
                    Some(h) => {
                        cam.decider.rebase(h.decision.kind, h.decision.calibration);
                        cam.decider.reconfigure(h.decision.alarm);
                        cam.roi = h.roi;
                        tracing::info!(camera = %cam.name, from = slot, to = h.slot, "camera handed on");
                        // The receiving thread is gone only at shutdown.
                        let _ = h.control.send(Control::Attach { slot: h.slot, camera: Box::new(cam) });
                    }
                    None => tracing::info!(camera = %cam.name, "camera detached"),
                }
            }
            Control::Calibrate { slot, req } => match self.camera(slot) {
                Some(cam) => cam.start_calibration(req),
                None => {
                    let _ = req.reply.try_send(crate::decide::CalibrateReply::Refused(
                        "the camera is being moved by a reload: try again".into(),
                    ));
                }
            },
            Control::Swap { model, decisions } => {
                tracing::info!(
                    old = %self.model.path.display(), new = %model.path.display(), provider = model.provider.as_str(),
                    "model swapped between batches"
                );
                self.model = *model;
                for (slot, d) in decisions {
                    self.apply(Control::Configure { slot, decision: d }, orphans);
                }
            }
        }
    }

    /// Takes every control message waiting.
    fn take_control(&mut self, orphans: &mut Orphans) {
        while let Ok(c) = self.control.try_recv() {
            self.apply(c, orphans);
        }
    }

    /// A frame this thread will not score: the camera is not (or no longer)
    /// here, or it was prepared for another input shape (before a swap).
    fn drop_frame(&mut self, p: Prepared, orphans: &Orphans) {
        let Prepared { frame, tensor, .. } = p;
        let _ = self.tensor_recycle.try_send(tensor);
        let slot = frame.camera;
        let counters = match self.camera(slot) {
            Some(cam) => {
                let _ = cam.recycle.try_send(frame.pixels);
                Some(cam.counters.clone())
            }
            None => orphans.iter().find(|(s, _)| *s == slot).map(|(_, c)| c.clone()),
        };
        if let Some(c) = counters {
            CameraCounters::add(&c.dropped, 1);
        }
    }
}

/// Closes the image budget when the inference thread ends, however it ends,
/// so that no worker waits for room that will never be given back.
struct CloseBudget(Arc<crate::preprocess::ImageBudget>);

impl Drop for CloseBudget {
    fn drop(&mut self) {
        self.0.close();
    }
}

fn run(mut t: InferThread) {
    let _close = CloseBudget(t.budget.clone());
    if t.background {
        crate::base::priority::lower_this_thread();
    }
    let mut input = vec![0.0f32; t.model.tensor_len() * t.max_batch];
    let mut out = BatchOutput::default();
    // One frame's heat map, when a snapshot, the live view or a trigger asks for it.
    let mut map_buf: Vec<f32> = Vec::new();
    let mut batch: Vec<Prepared> = Vec::with_capacity(t.max_batch);
    let mut orphans: Orphans = Vec::new();
    // A tiled frame's stitched anomaly map (`tiles.rs`), reused frame to frame.
    let mut stitched: Vec<f32> = Vec::new();
    // Its tiles' maps, back to back, before stitching.
    let mut tile_maps: Vec<f32> = Vec::new();
    // Every alarm machine starts idle: say so, so that a retained `ON` left by a
    // previous run that died mid-alarm does not stay on the broker.
    for cam in t.cameras.iter().flatten() {
        t.publisher.alarm_state(&cam.name, false);
    }
    // Frames in the batch before this one (see `batch_wait`).
    let mut last_batch = 0usize;
    loop {
        // Wake at least every second so the watchdog sees a live thread even
        // when no camera delivers (nothing to decide is not a wedge); control
        // messages are taken while waiting too.
        let first = crossbeam_channel::select! {
            recv(t.rx) -> p => match p {
                Ok(p) => {
                    t.budget.give(p.images());
                    p
                }
                Err(_) => break,
            },
            recv(t.control) -> c => {
                match c {
                    Ok(c) => t.apply(c, &mut orphans),
                    // The pipeline is going down; the input closes next.
                    Err(_) => t.control = crossbeam_channel::never(),
                }
                continue;
            },
            default(Duration::from_secs(1)) => {
                t.beat(Beat::Idle);
                continue;
            },
        };
        // `max_batch` counts model inputs: a tiled frame is all its tiles,
        // never split across batches (`tiles.rs`), so the last frame in may
        // take the batch past `max_batch`; the batch then runs in session runs
        // of `max_batch` inputs (`Model::run_chunked`), so ONNX Runtime never
        // sees more than `max_batch` at once.
        let mut images = first.images();
        batch.push(first);
        let deadline = Instant::now() + batch_wait(last_batch, t.max_wait);
        while images < t.max_batch {
            // Whatever is already queued joins without waiting.
            match t.rx.try_recv() {
                Ok(p) => {
                    t.budget.give(p.images());
                    images += p.images();
                    batch.push(p);
                    continue;
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => break,
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            match t.rx.recv_deadline(deadline) {
                Ok(p) => {
                    t.budget.give(p.images());
                    images += p.images();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        last_batch = batch.len();
        // Between batches: a camera added by a reload is attached before its
        // first frame can be here (the pipeline sends the attach first).
        t.take_control(&mut orphans);
        let len = t.model.tensor_len();
        let side = t.model.side();
        // Order kept (`remove`, not `swap_remove`): a camera's frames must
        // reach its alarm machine in sequence. Drops are rare (a reload; or,
        // for one batch, a camera whose score the session was just re-pruned
        // without, on its way to another thread).
        let mut i = 0;
        while i < batch.len() {
            let p = &batch[i];
            let scored_here = t.cameras.get(p.frame.camera).and_then(Option::as_ref).map(|c| c.decider.kind);
            if p.tensor.len() == len * p.images() && scored_here.is_some_and(|k| t.model.has_score(k)) {
                i += 1;
            } else {
                let p = batch.remove(i);
                t.drop_frame(p, &orphans);
            }
        }
        if batch.is_empty() {
            continue;
        }
        let n: usize = batch.iter().map(Prepared::images).sum();
        if input.len() < len * n.max(t.max_batch) {
            input.resize(len * n.max(t.max_batch), 0.0);
        }
        let mut at = 0;
        for p in &batch {
            input[at * len..(at + p.images()) * len].copy_from_slice(&p.tensor);
            at += p.images();
        }
        let frames = batch.len();
        let run_started = Instant::now();
        let result = t.model.run_chunked(&input, n, t.max_batch, &mut out);
        let run = (run_started, Instant::now());
        if let Err(e) = &result {
            tracing::error!(error = %crate::base::report::chain(e), frames, images = n, "inference failed; frames skipped");
        }
        let outputs = Outputs { publisher: &*t.publisher, snapshots: t.snapshots.as_ref(), live: t.live.as_deref() };
        let mut decided = 0usize;
        // The frame's first model input in the batch.
        let mut first = 0;
        for p in batch.drain(..) {
            let Prepared { frame, tensor, tiles, stamps } = p;
            let passage = Passage { pool: stamps, run };
            let i = first;
            first += tiles.as_ref().map_or(1, |g| g.len());
            let _ = t.tensor_recycle.try_send(tensor);
            let Some(cam) = t.cameras.get_mut(frame.camera).and_then(Option::as_mut) else { continue };
            if let Some(grid) = &tiles {
                if result.is_err() {
                    CameraCounters::add(&cam.counters.broken, 1);
                    let _ = cam.recycle.try_send(frame.pixels);
                    continue;
                }
                // One score per frame, as for any camera: its hottest tile's.
                CameraCounters::add(&cam.counters.tiles, grid.len() as u64);
                let kind = cam.decider.kind;
                let scored = crate::tiles::frame_score(&out, kind, i, grid.len());
                if let Some((_, tile)) = scored {
                    cam.counters.set_hot_tile(tile);
                }
                let outcome = cam.decider.decide(frame.seq, frame.ts_ms, frame.captured, scored.map(|(s, _)| s));
                decided += usize::from(matches!(outcome, crate::decide::Outcome::Scored { .. }));
                // The stitched map is computed only if `act` draws it (an alarm's
                // snapshot, a live-view frame that is due): each tile's map from
                // the batch, or from the map session when the scores' graph was
                // pruned without it (`Model::heat_map_into`).
                let map_side = grid.stitched_side(side);
                let output = prune_graph::map_output(&t.model.meta, kind);
                let mut map = TiledMap {
                    model: &mut t.model,
                    out: &out,
                    input: &input,
                    first: i,
                    grid,
                    side,
                    output,
                    tile: &mut map_buf,
                    tiles: &mut tile_maps,
                    buf: &mut stitched,
                    done: false,
                };
                cam.act(outcome, frame, &mut map, map_side, &outputs, Some(&passage));
                continue;
            }
            if let Some(tx) = &cam.trigger {
                // A triggered camera's frame: its verdict is decided on the trigger
                // thread, which keeps the anomaly map of an `ng` part's worst
                // frame for its snapshot, so every scored frame carries its map.
                if t.snapshots.is_some() && result.is_ok() {
                    t.model.heat_map_into(&out, &input, i, OUTPUT_MAP, &mut map_buf);
                } else {
                    map_buf.clear();
                }
                let raw = out.score(cam.decider.kind, i);
                let scored = crate::trigger::scored(frame, &result, raw, &map_buf, 0, side);
                cam.compare_triggered(scored.seq, scored.raw.filter(|_| scored.error.is_none()));
                decided += usize::from(scored.raw.is_some());
                let _ = tx.send(scored);
                continue;
            }
            if result.is_err() {
                CameraCounters::add(&cam.counters.broken, 1);
                let _ = cam.recycle.try_send(frame.pixels);
                continue;
            }
            let outcome = cam.decider.decide(frame.seq, frame.ts_ms, frame.captured, out.score(cam.decider.kind, i));
            decided += usize::from(matches!(outcome, crate::decide::Outcome::Scored { .. }));
            let output = prune_graph::map_output(&t.model.meta, cam.decider.kind);
            let mut map =
                FrameMap { model: &mut t.model, out: &out, input: &input, i, output, buf: &mut map_buf, done: false };
            cam.act(outcome, frame, &mut map, side, &outputs, Some(&passage));
        }
        // Life is decided frames: a failed run, or a batch of only unusable
        // scores, does not count (see `base::liveness`).
        t.beat(if decided > 0 { Beat::Decided } else { Beat::Failed });
    }
    // Input closed: the sources have stopped, every frame is decided. An
    // alarm still active would dangle on the broker (a `start` with no `end`
    // forever); end it, through the same outbox, before the publisher drains.
    t.take_control(&mut orphans);
    let outputs = Outputs { publisher: &*t.publisher, snapshots: None, live: None };
    for cam in t.cameras.iter_mut().flatten() {
        cam.stop(&outputs);
    }
    tracing::info!(model = %t.model.path.display(), "inference thread stopped");
}

/// One frame's heat map for [`Camera::act`](crate::decide::Camera::act),
/// filled on the first `get` (from the batch's outputs, or by the model's map
/// session for this frame alone: [`Model::heat_map_into`]).
struct FrameMap<'a> {
    model: &'a mut Model,
    out: &'a BatchOutput,
    input: &'a [f32],
    i: usize,
    output: &'static str,
    buf: &'a mut Vec<f32>,
    done: bool,
}

/// A tiled frame's stitched heat map, computed on first use (see [`FrameMap`]).
struct TiledMap<'a> {
    model: &'a mut Model,
    out: &'a BatchOutput,
    input: &'a [f32],
    /// The frame's first tile in the batch.
    first: usize,
    grid: &'a ganomaly_core::tiles::Grid,
    side: usize,
    output: &'static str,
    tile: &'a mut Vec<f32>,
    tiles: &'a mut Vec<f32>,
    buf: &'a mut Vec<f32>,
    done: bool,
}

impl crate::decide::HeatMap for TiledMap<'_> {
    fn get(&mut self) -> &[f32] {
        if !self.done {
            self.done = true;
            self.tiles.clear();
            for k in 0..self.grid.len() {
                self.model.heat_map_into(self.out, self.input, self.first + k, self.output, self.tile);
                if self.tile.is_empty() {
                    // Not computed (logged once by heat_map_into): no map rather than a wrong one.
                    break;
                }
                self.tiles.extend_from_slice(self.tile);
            }
            crate::tiles::stitch_tile_maps(self.grid, self.tiles, self.side, self.buf);
        }
        self.buf
    }
}

impl crate::decide::HeatMap for FrameMap<'_> {
    fn get(&mut self) -> &[f32] {
        if !self.done {
            self.done = true;
            self.model.heat_map_into(self.out, self.input, self.i, self.output, self.buf);
        }
        self.buf
    }
}

/// How long a batch that holds one frame waits for company: `max_wait`
/// only while the thread is loaded, i.e. its last batch held more than one
/// frame. When it keeps up, frames arrive one at a time and waiting would
/// only add `max_wait` to each one's latency (a triggered part's verdict, an
/// alarm); under load frames queue up while the model runs, and whatever is
/// queued joins the batch without waiting anyway.
fn batch_wait(last_batch: usize, max_wait: Duration) -> Duration {
    if last_batch > 1 {
        max_wait
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_waits_for_company_only_under_load() {
        let w = Duration::from_millis(5);
        // Idle or keeping up (one frame at a time): no wait.
        assert_eq!((batch_wait(0, w), batch_wait(1, w)), (Duration::ZERO, Duration::ZERO));
        // Loaded: the last batch had company, so this one may wait for it.
        assert_eq!((batch_wait(2, w), batch_wait(8, w)), (w, w));
    }

    #[test]
    fn batch_output_indexes_by_kind() {
        let mut o = BatchOutput::default();
        o.scores[kind_index(ScoreKind::Recon)] = vec![1.0, 2.0];
        assert_eq!(o.score(ScoreKind::Recon, 1), Some(2.0));
        assert_eq!(o.score(ScoreKind::Latent, 0), None);
    }

    #[test]
    fn heat_map_follows_the_cameras_score_when_it_has_a_map() {
        // Two images of 2×2: reconstruction maps 0..8, patch maps 10..18.
        let mut o = BatchOutput { n: 2, maps: (0..8).map(|v| v as f32).collect(), ..Default::default() };
        // A model without the patch score: every camera gets the reconstruction map.
        assert_eq!(o.map(ScoreKind::Patch, 1, 2), [4.0, 5.0, 6.0, 7.0]);
        o.patch_maps = (10..18).map(|v| v as f32).collect();
        assert_eq!(o.map(ScoreKind::Patch, 1, 2), [14.0, 15.0, 16.0, 17.0]);
        for kind in [ScoreKind::Latent, ScoreKind::Mahalanobis, ScoreKind::Fused] {
            assert_eq!(o.map(kind, 0, 2), [0.0, 1.0, 2.0, 3.0], "{kind:?} has no map of its own");
        }
        assert!(o.map(ScoreKind::Patch, 2, 2).is_empty());
    }
}
