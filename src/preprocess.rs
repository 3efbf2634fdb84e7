//! The preprocessing pool: worker threads that turn camera frames into model
//! input tensors with `ganomaly_core::preprocess` (the one preprocessing
//! function the trainer uses too), reusing frame and tensor buffers.
//!
//! # Backpressure, edge by edge
//! | edge | channel | when full |
//! | --- | --- | --- |
//! | camera → pool | one `bounded(frame_queue)` per camera | the camera drops its **oldest** queued frame (counted in `dropped`): a live camera never blocks, and fresh frames win |
//! | pool → inference | `bounded(max_batch)` per model, and an [`ImageBudget`] of `max_batch` model inputs (one batch waits while one runs: enough for full batches; a second waiting batch measured +8 MiB and +30 % full-load latency for no throughput) | the worker **blocks**: the frames then wait in (and drop from) the camera queues above, so memory and latency stay bounded by the queue sizes. A tiled frame counts its tiles, so a queue of tiled frames holds as many tiles as an untiled one holds frames (a frame with more tiles than the whole budget waits for an empty queue and goes alone) |
//! | inference → publisher | `Publisher` calls | never block (the publisher queues; scores may be dropped and counted there, alarms never) |
//! | inference → snapshot writer | `bounded(8)` | the snapshot is **skipped** (counted); the alarm is still published |
//! | pool → shadow model (`shadow_model`) | `bounded(max_batch)` and an image budget per shadow | the shadow's copy is **dropped** (counted in the camera's shadow `dropped`) when the shadow's budget is spent, and also whenever frames are already waiting at the camera's own model (the real path is behind: the shadow would take the cores it needs); checked before the copy is made, so the real path never waits for a shadow |
//! | pipeline → pool (a reload's new spec) | unbounded, one per worker | a worker takes it between frames; the pipeline sends one per reload |
//! | buffers back to camera / pool | recycle channels | buffer freed if the recycle channel is full |
//!
//! Workers take frames from all camera queues with `crossbeam_channel::Select`,
//! which picks among ready queues at random, so one busy camera cannot starve
//! the others. A reload sends each worker the whole new [`PoolSpec`] (cameras
//! added, removed or routed to another model); a worker switches to it
//! between two frames, so the queues of unchanged cameras are never closed
//! and none of their frames is lost.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

use crossbeam_channel::{Receiver, Select, Sender};
use ganomaly_core::metadata::ColorMode;
use ganomaly_core::preprocess::{FrameRef, PixelLayout, Preprocessor};

use crate::capture::{Frame, FrameData, PixelFormat};
use crate::metrics::{CameraCounters, Stamps};
use crate::shadow::ShadowCompare;
use ganomaly_core::preprocess::Roi;
use ganomaly_core::tiles::{Grid, Tiling};

/// A frame with its model input, on its way to inference.
#[derive(Debug)]
pub struct Prepared {
    pub frame: Frame,
    /// One model input, or (tiled) one per tile, back to back.
    pub tensor: Vec<f32>,
    /// The frame's tiles (`tiles.rs`): `None` for an untiled camera.
    pub tiles: Option<Arc<Grid>>,
    /// When the pool took the frame and when its tensor was ready: the
    /// frame's latency by stage (`metrics::STAGE_NAMES`).
    pub stamps: Stamps,
}

impl Prepared {
    /// Model inputs this frame takes in a batch (its tiles, or 1).
    pub fn images(&self) -> usize {
        self.tiles.as_ref().map_or(1, |g| g.len())
    }
}

/// How many model inputs may wait between the pool and one inference thread.
///
/// The channel between them counts frames, and a tiled frame is up to
/// [`MAX_TILES`](ganomaly_core::tiles::MAX_TILES) inputs: without this budget a
/// queue of `max_batch` tiled frames could hold thousands of tensors. A
/// worker takes a frame's inputs from the budget before it sends the frame;
/// the inference thread gives them back as it takes the frame off the queue.
pub struct ImageBudget {
    cap: usize,
    state: Mutex<BudgetState>,
    freed: Condvar,
}

#[derive(Default)]
struct BudgetState {
    queued: usize,
    /// Tickets handed out to waiting workers, and the one served next: workers
    /// are served in arrival order, so a large tiled frame waiting for room is
    /// not overtaken forever by small frames from other workers.
    next_ticket: u64,
    serving: u64,
    /// The inference thread has ended: nobody will give anything back.
    closed: bool,
}

impl ImageBudget {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self { cap: cap.max(1), state: Mutex::default(), freed: Condvar::new() })
    }

    /// Blocks until `n` more inputs fit, or nothing is queued (a frame larger
    /// than the whole budget then goes alone, so it cannot wait forever), in
    /// the order workers asked. `false` once the inference thread has ended
    /// (the frame has nowhere to go).
    pub fn take(&self, n: usize) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        loop {
            if s.closed {
                return false;
            }
            if s.serving == ticket && fits(s.queued, n, self.cap) {
                s.queued += n;
                s.serving += 1;
                drop(s);
                // The next ticket may fit too.
                self.freed.notify_all();
                return true;
            }
            s = self.freed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// [`take`](Self::take) without waiting: `false` when the inputs do not
    /// fit now, or a worker is already waiting (it goes first).
    pub fn try_take(&self, n: usize) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let ok = !s.closed && s.serving == s.next_ticket && fits(s.queued, n, self.cap);
        if ok {
            s.queued += n;
        }
        ok
    }

    /// `n` inputs have left the queue (taken by inference, or never sent).
    pub fn give(&self, n: usize) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.queued = s.queued.saturating_sub(n);
        drop(s);
        self.freed.notify_all();
    }

    /// The inference thread has ended: wakes and refuses every waiting worker.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.freed.notify_all();
    }

    /// Inputs queued now (for tests and the backpressure table's claim).
    pub fn queued(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).queued
    }
}

/// The budget's rule, alone: `n` more inputs fit under `cap`, or the queue is
/// empty (an oversized frame goes alone).
fn fits(queued: usize, n: usize, cap: usize) -> bool {
    queued == 0 || queued + n <= cap
}

/// How often a camera's preprocessing failures are warned about (each one is counted).
const PREP_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// How one camera's frames are prepared.
#[derive(Clone)]
pub struct CameraPrep {
    pub name: String,
    /// The slot its frames carry (`Frame::camera`).
    pub slot: usize,
    pub roi: Option<Roi>,
    /// The ROI cut into tiles, each one model input (`tiles.rs`).
    pub tiles: Option<Tiling>,
    /// Index of the camera's model in [`PoolSpec::models`].
    pub model: usize,
    /// Its shadow model's index in [`PoolSpec::models`] (same input shape),
    /// with the comparison that counts dropped shadow frames.
    pub shadow: Option<(usize, Arc<ShadowCompare>)>,
    pub counters: Arc<CameraCounters>,
    pub input: Receiver<Frame>,
    pub recycle: Sender<FrameData>,
    /// A `record` command's copies of this camera's frames (one atomic load per
    /// frame while none records; see `recording::Tap` for its drop-first policy).
    pub tap: Arc<crate::recording::Tap>,
}

/// One model's input shape and where its tensors go.
#[derive(Clone)]
pub struct ModelPrep {
    pub color: ColorMode,
    pub size: u32,
    pub output: Sender<Prepared>,
    /// The model inputs `output` may hold (see [`ImageBudget`]).
    pub budget: Arc<ImageBudget>,
    pub tensor_recycle: Receiver<Vec<f32>>,
}

#[derive(Clone)]
pub struct PoolSpec {
    pub cameras: Vec<CameraPrep>,
    pub models: Vec<ModelPrep>,
}

/// Where a worker takes a new [`PoolSpec`] from.
pub type SpecSender = Sender<Arc<PoolSpec>>;

/// Starts `threads` workers on `spec`. Each takes a new spec (a reload added,
/// removed or re-routed cameras) from its own channel of the returned list,
/// between frames. A worker ends once its spec channel is closed and every
/// camera queue of its spec is closed and drained; its inference senders drop
/// with it, which ends inference.
pub fn spawn_pool(
    threads: usize,
    spec: PoolSpec,
) -> std::io::Result<(Vec<std::thread::JoinHandle<()>>, Vec<SpecSender>)> {
    let spec = Arc::new(spec);
    let mut handles = Vec::new();
    let mut controls = Vec::new();
    for i in 0..threads.max(1) {
        // A worker holds the newest spec only: one pending is enough (the
        // pipeline sends the whole spec each time, never a delta).
        let (tx, rx) = crossbeam_channel::unbounded();
        let spec = spec.clone();
        handles.push(std::thread::Builder::new().name(format!("prep-{i}")).spawn(move || worker(spec, rx))?);
        controls.push(tx);
    }
    Ok((handles, controls))
}

pub fn layout(f: PixelFormat) -> PixelLayout {
    match f {
        PixelFormat::Rgb8 => PixelLayout::Rgb8,
        PixelFormat::Gray8 => PixelLayout::Gray8,
    }
}

fn worker(mut spec: Arc<PoolSpec>, control: Receiver<Arc<PoolSpec>>) {
    let never = crossbeam_channel::never();
    let mut control_open = true;
    loop {
        let ctl = if control_open { &control } else { &never };
        match serve(&spec, ctl, &mut control_open) {
            Some(next) => spec = next,
            None => return,
        }
    }
}

/// Prepares the frames of `spec`'s cameras until a new spec arrives
/// (returned) or, with the spec channel closed, every camera queue is closed
/// and drained (`None`).
fn serve(spec: &PoolSpec, control: &Receiver<Arc<PoolSpec>>, control_open: &mut bool) -> Option<Arc<PoolSpec>> {
    let mut preps: Vec<Preprocessor> = spec.models.iter().map(|m| Preprocessor::new(m.color, m.size)).collect();
    // Each tiled camera's last grid (a camera's frames rarely change size).
    let mut grids: Vec<Option<Arc<Grid>>> = vec![None; spec.cameras.len()];
    // When each camera's last preprocessing failure was warned about.
    let mut warned: Vec<Option<Instant>> = vec![None; spec.cameras.len()];
    let mut sel = Select::new();
    // Index 0 is the spec channel; the cameras follow.
    sel.recv(control);
    for c in &spec.cameras {
        sel.recv(&c.input);
    }
    let mut live = spec.cameras.len();
    loop {
        if live == 0 && !*control_open {
            return None;
        }
        let op = sel.select();
        let idx = op.index();
        if idx == 0 {
            match op.recv(control) {
                Ok(next) => return Some(next),
                Err(_) => {
                    // The pipeline is going down: finish the queues.
                    sel.remove(0);
                    *control_open = false;
                    continue;
                }
            }
        }
        let cam = &spec.cameras[idx - 1];
        let frame = match op.recv(&cam.input) {
            Ok(f) => f,
            Err(_) => {
                // This camera stopped and its queue is drained.
                sel.remove(idx);
                live -= 1;
                continue;
            }
        };
        let taken = Instant::now();
        cam.tap.offer(&frame.pixels);
        let model = &spec.models[cam.model];
        let prep = &mut preps[cam.model];
        let mut tensor = model.tensor_recycle.try_recv().unwrap_or_default();
        let px = &frame.pixels;
        let fr = FrameRef { width: px.width, height: px.height, layout: layout(px.format), data: &px.data };
        let prepared = match cam.tiles {
            None => {
                tensor.resize(prep.tensor_len(), 0.0);
                prep.run(&fr, cam.roi, &mut tensor).map(|()| None).map_err(|e| e.to_string())
            }
            Some(tiling) => crate::tiles::prepare(prep, &fr, cam.roi, tiling, &mut grids[idx - 1], &mut tensor)
                .map(Some)
                .map_err(|e| e.to_string()),
        };
        match prepared {
            Ok(tiles) => {
                let stamps = Stamps { taken, ready: Instant::now() };
                let shadow = cam.shadow.as_ref().map(|(m, compare)| (&spec.models[*m], compare));
                // The shadow gets only frames the real model has slack for:
                // with frames already waiting at the real model, the shadow's
                // copy is dropped (it would take the cores the real path needs).
                let real_idle = model.output.is_empty();
                let copy = shadow.and_then(|(m, compare)| {
                    if real_idle {
                        shadow_copy(m, compare, &frame, &tensor, &tiles, stamps)
                    } else {
                        compare.drop_frame();
                        None
                    }
                });
                // Blocks while the model is behind (the policy above). A
                // refusal or an error: the model's thread is gone (a start-up
                // failure, or a reload retired it and a new spec is on its way).
                let p = Prepared { frame, tensor, tiles, stamps };
                let n = p.images();
                if model.budget.take(n) && model.output.send(p).is_err() {
                    model.budget.give(n);
                }
                if let (Some((m, compare)), Some(p)) = (shadow, copy) {
                    // `shadow_copy` took the copy's inputs from the shadow's budget.
                    let n = p.images();
                    if m.output.try_send(p).is_err() {
                        m.budget.give(n);
                        compare.drop_frame();
                    }
                }
            }
            Err(e) => {
                CameraCounters::add(&cam.counters.broken, 1);
                // A camera whose every frame fails (tiles larger than the frames
                // of a source whose size the config could not check, an ROI
                // outside them) must be visible in the log, not only in the
                // `broken` counter: warned at most once a minute per worker.
                let last = &mut warned[idx - 1];
                if last.is_none_or(|t| t.elapsed() >= PREP_WARN_EVERY) {
                    *last = Some(Instant::now());
                    tracing::warn!(camera = %cam.name, seq = frame.seq, width = px.width, height = px.height, error = %e,
                        "frame could not be preprocessed: counted broken and skipped (repeated at most once a minute)");
                } else {
                    tracing::debug!(camera = %cam.name, seq = frame.seq, error = %e, "frame could not be preprocessed");
                }
                let _ = cam.recycle.try_send(frame.pixels);
            }
        }
    }
}

/// The shadow's copy of a frame's tensor (its pixels stay with the real
/// frame: a shadow takes no snapshots), or `None` when the shadow's input is
/// full: dropped before any work is spent on it (counted).
fn shadow_copy(
    model: &ModelPrep,
    compare: &ShadowCompare,
    frame: &Frame,
    tensor: &[f32],
    tiles: &Option<Arc<Grid>>,
    stamps: Stamps,
) -> Option<Prepared> {
    let n = tiles.as_ref().map_or(1, |g| g.len());
    if model.output.is_full() || !model.budget.try_take(n) {
        compare.drop_frame();
        return None;
    }
    let mut copy = model.tensor_recycle.try_recv().unwrap_or_default();
    copy.clear();
    copy.extend_from_slice(tensor);
    let frame = Frame {
        camera: frame.camera,
        seq: frame.seq,
        captured: frame.captured,
        ts_ms: frame.ts_ms,
        pixels: FrameData::default(),
    };
    Some(Prepared { frame, tensor: copy, tiles: tiles.clone(), stamps })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A worker blocked in `take(n)` on its own thread.
    fn taking(b: &Arc<ImageBudget>, n: usize) -> std::thread::JoinHandle<bool> {
        let b = b.clone();
        std::thread::spawn(move || b.take(n))
    }

    #[test]
    fn budget_counts_inputs_and_lets_an_oversized_frame_go_alone() {
        let b = ImageBudget::new(8);
        assert!(b.try_take(5));
        assert!(b.try_take(3));
        assert!(!b.try_take(1), "8 of 8 inputs queued");
        b.give(8);
        // A frame of 20 tiles is larger than the whole budget: it waits for an
        // empty queue, then goes alone, and nothing joins it.
        assert!(b.try_take(20));
        assert!(!b.try_take(1));
        b.give(20);
        assert_eq!(b.queued(), 0);
    }

    #[test]
    fn a_large_frame_waiting_is_not_overtaken_by_small_ones() {
        let b = ImageBudget::new(8);
        assert!(b.take(7));
        // A 4-tile frame waits (7 + 4 > 8) ...
        let large = taking(&b, 4);
        while b.state.lock().unwrap().next_ticket < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // ... and a 1-input frame that would fit must queue behind it.
        assert!(!b.try_take(1), "the waiting frame goes first");
        b.give(7);
        assert!(large.join().expect("joined"));
        assert_eq!(b.queued(), 4);
        assert!(b.try_take(1), "nobody waits now");
    }

    #[test]
    fn a_waiting_worker_goes_when_inputs_are_given_back_and_is_refused_once_closed() {
        let b = ImageBudget::new(4);
        assert!(b.take(4));
        let waiting = taking(&b, 2);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished(), "no room yet");
        b.give(2);
        assert!(waiting.join().expect("joined"), "room for 2 after 2 were given back");
        assert_eq!(b.queued(), 4);
        let refused = taking(&b, 1);
        std::thread::sleep(Duration::from_millis(50));
        b.close();
        assert!(!refused.join().expect("joined"), "the inference thread ended: nowhere to send");
        assert!(!b.try_take(1));
    }
}
