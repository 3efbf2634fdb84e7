//! The preprocessing pool: worker threads that turn camera frames into model
//! input tensors with `ganomaly_core::preprocess` (the one preprocessing
//! function the trainer uses too), reusing frame and tensor buffers.
//!
//! # Backpressure, edge by edge
//! | edge | channel | when full |
//! | --- | --- | --- |
//! | camera → pool | one `bounded(frame_queue)` per camera | the camera drops its **oldest** queued frame (counted in `dropped`): a live camera never blocks, and fresh frames win |
//! | pool → inference | `bounded(2 × max_batch)` per model | the worker **blocks**: the frames then wait in (and drop from) the camera queues above, so memory and latency stay bounded by the queue sizes |
//! | inference → publisher | `Publisher` calls | never block (the publisher queues; scores may be dropped and counted there, alarms never) |
//! | inference → snapshot writer | `bounded(8)` | the snapshot is **skipped** (counted); the alarm is still published |
//! | buffers back to camera / pool | recycle channels | buffer freed if the recycle channel is full |
//!
//! Workers take frames from all camera queues with `crossbeam_channel::Select`,
//! which picks among ready queues at random, so one busy camera cannot starve
//! the others.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Select, Sender};
use ganomaly_core::metadata::ColorMode;
use ganomaly_core::preprocess::{FrameRef, PixelLayout, Preprocessor};

use crate::capture::{Frame, FrameData, PixelFormat};
use crate::metrics::CameraCounters;
use ganomaly_core::preprocess::Roi;

/// A frame with its model input, on its way to inference.
#[derive(Debug)]
pub struct Prepared {
    pub frame: Frame,
    pub tensor: Vec<f32>,
}

/// How one camera's frames are prepared.
#[derive(Clone)]
pub struct CameraPrep {
    pub name: String,
    pub roi: Option<Roi>,
    /// Index of the camera's model in [`PoolSpec::models`].
    pub model: usize,
    pub counters: Arc<CameraCounters>,
    pub input: Receiver<Frame>,
    pub recycle: Sender<FrameData>,
    /// A `record` command's copies of this camera's frames (one atomic load per
    /// frame while none records; see `record::Tap` for its drop-first policy).
    pub tap: Arc<crate::record::Tap>,
}

/// One model's input shape and where its tensors go.
#[derive(Clone)]
pub struct ModelPrep {
    pub color: ColorMode,
    pub size: u32,
    pub output: Sender<Prepared>,
    pub tensor_recycle: Receiver<Vec<f32>>,
}

#[derive(Clone)]
pub struct PoolSpec {
    pub cameras: Vec<CameraPrep>,
    pub models: Vec<ModelPrep>,
}

/// Starts `threads` workers. They end when every camera queue is closed and
/// drained; their inference senders drop with them, which ends inference.
pub fn spawn_pool(threads: usize, spec: PoolSpec) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    (0..threads.max(1))
        .map(|i| {
            let spec = spec.clone();
            std::thread::Builder::new().name(format!("prep-{i}")).spawn(move || worker(spec))
        })
        .collect()
}

pub fn layout(f: PixelFormat) -> PixelLayout {
    match f {
        PixelFormat::Rgb8 => PixelLayout::Rgb8,
        PixelFormat::Gray8 => PixelLayout::Gray8,
    }
}

fn worker(spec: PoolSpec) {
    let mut preps: Vec<Preprocessor> = spec.models.iter().map(|m| Preprocessor::new(m.color, m.size)).collect();
    let mut sel = Select::new();
    for c in &spec.cameras {
        sel.recv(&c.input);
    }
    let mut live = spec.cameras.len();
    while live > 0 {
        let op = sel.select();
        let idx = op.index();
        let cam = &spec.cameras[idx];
        let frame = match op.recv(&cam.input) {
            Ok(f) => f,
            Err(_) => {
                // This camera stopped and its queue is drained.
                sel.remove(idx);
                live -= 1;
                continue;
            }
        };
        cam.tap.offer(&frame.pixels);
        let model = &spec.models[cam.model];
        let prep = &mut preps[cam.model];
        let mut tensor = model.tensor_recycle.try_recv().unwrap_or_default();
        tensor.resize(prep.tensor_len(), 0.0);
        let px = &frame.pixels;
        let fr = FrameRef { width: px.width, height: px.height, layout: layout(px.format), data: &px.data };
        match prep.run(&fr, cam.roi, &mut tensor) {
            Ok(()) => {
                if model.output.send(Prepared { frame, tensor }).is_err() {
                    // Inference is gone (start-up failure or shutdown): nothing left to do.
                    return;
                }
            }
            Err(e) => {
                CameraCounters::add(&cam.counters.broken, 1);
                tracing::debug!(camera = %cam.name, seq = frame.seq, error = %e, "frame could not be preprocessed");
                let _ = cam.recycle.try_send(frame.pixels);
            }
        }
    }
}
