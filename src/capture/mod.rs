//! Frame sources and the camera thread that drives one of them.
//!
//! Hardware sits behind [`FrameSource`] so that tests and the demo drive the
//! real pipeline with [`replay`] and [`synthetic`] sources; [`v4l2`] is the
//! real camera, [`http_mjpeg`] an IP camera's MJPEG stream. Each camera runs on its own thread ([`spawn_camera`]), which
//! - opens its source, retrying forever with exponential backoff while it
//!   fails, and reports the camera `offline`/`online` through the publisher
//!   (other cameras are untouched: they have their own threads);
//! - counts and skips broken frames (a frame over the camera's [`limits`] is
//!   one: decoders check a frame's header against them before allocating);
//! - is watched from outside ([`watch`]): a read that does not return within
//!   the camera's `read_timeout_s` reports it offline, and a stop does not
//!   wait for it longer than [`watch::STOP_GRACE`];
//! - paces sources that do not pace themselves;
//! - pushes frames into its own bounded queue, **dropping the oldest** queued
//!   frame when the queue is full (counted): a live camera must never block on
//!   a slow model, and a fresh frame is worth more than a stale one.
//!
//! Frame buffers come back from the end of the pipeline through a recycle
//! channel, so a steady-state camera allocates nothing per frame.

pub mod decode;
pub mod frame;
pub mod genicam;
#[cfg(feature = "gstreamer")]
pub mod gst_engine;
pub mod gstreamer;
pub mod http_mjpeg;
pub mod limits;
pub mod multipart;
pub mod plan;
pub mod replay;
pub mod rtsp;
pub mod source;
pub mod synthetic;
pub mod v4l2;
pub mod watch;

pub use frame::{FrameData, PixelFormat};
pub use limits::FrameLimits;
pub use plan::{CameraContext, SourcePlan};
pub use source::SourceConfig;
pub use watch::CameraWatch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::base::backoff::Backoff;
use crate::base::stop::sleep_unless_stopped;
use crate::events::now_ms;
use crate::metrics::CameraCounters;

/// Errors from a frame source. The camera thread decides what each means:
/// `Open`/`Disconnected` → offline and retry with backoff; `BrokenFrame` →
/// count and skip; `Ended` → the source is done (a non-looping replay).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open {source_name}: {reason}")]
    Open { source_name: String, reason: String },
    #[error("lost {source_name}: {reason}")]
    Disconnected { source_name: String, reason: String },
    #[error("broken frame from {source_name}: {reason}")]
    BrokenFrame { source_name: String, reason: String },
    #[error("{0} has no more frames")]
    Ended(String),
}

/// A frame on its way through the pipeline.
#[derive(Debug)]
pub struct Frame {
    /// Index of the camera in the pipeline's camera list.
    pub camera: usize,
    /// Per-camera sequence number, counting every frame the source delivered
    /// (so gaps in decided frames show drops).
    pub seq: u64,
    /// When the frame was captured (for latency) and its wall-clock time.
    pub captured: Instant,
    pub ts_ms: u64,
    pub pixels: FrameData,
}

/// A camera, a folder of images, a generator... Anything that yields frames.
///
/// Not `Send`: a source is built on its camera thread (see [`SourceFactory`])
/// because some backends (V4L2 through nokhwa) hold thread-bound handles.
pub trait FrameSource {
    /// Human-readable name for logs (`/dev/video0`, `replay /data/*.png`).
    fn describe(&self) -> String;
    /// (Re)opens the source; called before the first frame and after errors.
    /// Sources with nothing to open (generated frames) keep the default.
    fn open(&mut self) -> Result<(), CaptureError> {
        Ok(())
    }
    /// Writes the next frame into `out`, reusing its allocation. May block
    /// for up to one frame interval (a real camera does).
    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError>;
    /// Releases the device after an error or at shutdown.
    fn close(&mut self) {}
    /// True when `next_frame` itself waits for the next frame (a camera);
    /// false when the camera thread must pace it at the configured fps.
    fn self_paced(&self) -> bool {
        false
    }
    /// The decoder in use, once known (GStreamer sources: what `decodebin`
    /// picked), for the log and `stats`.
    fn decoder(&self) -> Option<String> {
        None
    }
    /// Frames the source itself dropped since the last call (its own
    /// drop-oldest queue), added to the camera's `dropped`.
    fn take_dropped(&mut self) -> u64 {
        0
    }
    /// Frames missing from the stream since the last call (it did not decode,
    /// or never arrived: gaps in a GStreamer stream's timestamps), added to
    /// the camera's `broken`. Not broken *reads*: a gap of a few seconds in a
    /// healthy stream must not count toward reopening it.
    fn take_missing(&mut self) -> u64 {
        0
    }
    /// Wall-clock time (ms since the epoch) the source gave the last frame;
    /// `None`: the camera thread stamps it on arrival.
    fn timestamp_ms(&self) -> Option<u64> {
        None
    }
}

/// Builds a source on the camera thread.
pub type SourceFactory = Box<dyn FnOnce() -> Box<dyn FrameSource> + Send>;

/// A factory that makes its source on the camera thread: for backends whose
/// handles are thread-bound (V4L2 through nokhwa) or whose set-up is slow
/// (generating synthetic frames).
pub fn on_camera_thread<S: FrameSource + 'static>(make: impl FnOnce() -> S + Send + 'static) -> SourceFactory {
    Box::new(move || Box::new(make()) as Box<dyn FrameSource>)
}

/// Wraps a ready source (one that is `Send`) as a factory.
pub fn factory<S: FrameSource + Send + 'static>(source: S) -> SourceFactory {
    Box::new(move || Box::new(source) as Box<dyn FrameSource>)
}

/// How a camera thread is set up.
pub struct CameraThread {
    pub index: usize,
    pub name: String,
    /// Frames per second to pace at (ignored by self-paced sources; 0 = as
    /// fast as the pipeline takes them).
    pub fps: f64,
    pub counters: Arc<CameraCounters>,
    /// Online state, read watch, and the sender of the camera's queue.
    pub watch: Arc<CameraWatch>,
    /// A receiver of the camera's queue, used only to drop the oldest frame
    /// when the queue is full.
    pub rx_for_drops: Receiver<Frame>,
    /// Buffers coming back from the end of the pipeline.
    pub recycle: Receiver<FrameData>,
    pub stop: Arc<AtomicBool>,
    /// Retry waits for a failing source.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// Consecutive broken frames after which the source is treated as lost and
/// reopened: a camera that only sends garbage needs a reset, not patience.
const BROKEN_FRAMES_BEFORE_REOPEN: u32 = 50;

/// Starts the camera thread. It ends when `stop` is set or the source ends.
pub fn spawn_camera(cam: CameraThread, make_source: SourceFactory) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("cam-{}", cam.name)).spawn(move || run_camera(cam, make_source))
}

fn run_camera(cam: CameraThread, make_source: SourceFactory) {
    let mut source = make_source();
    let desc = source.describe();
    let mut backoff = Backoff::new(cam.backoff_min, cam.backoff_max);
    // The state starts unknown: the first open reports it either way, then
    // only changes are published (by this thread or the watch).
    let mut opened = false;
    let mut seq: u64 = 0;
    let mut broken_run = 0u32;
    // The decoder is reported once per open, after the first frame (a
    // GStreamer decodebin picks it when the stream's format is known).
    let mut decoder_known = false;
    let period =
        if cam.fps > 0.0 && !source.self_paced() { Some(Duration::from_secs_f64(1.0 / cam.fps)) } else { None };
    let mut next_due = Instant::now();
    // A buffer back from a dropped or broken frame, reused before asking the
    // recycle channel: under overload most buffers come back this way.
    let mut spare: Option<FrameData> = None;
    let watch = &cam.watch;
    let set_online = |now: bool| watch.set_online(now, &desc);
    tracing::info!(camera = %cam.name, source = %desc, "camera thread started");

    while !cam.stop.load(Ordering::Relaxed) {
        if !opened {
            watch.read_started();
            let result = source.open();
            watch.read_ended();
            match result {
                Ok(()) => {
                    opened = true;
                    decoder_known = false;
                }
                Err(e) => {
                    set_online(false);
                    let wait = backoff.next_delay();
                    tracing::warn!(camera = %cam.name, error = %e, retry_in_ms = wait.as_millis() as u64, "camera open failed");
                    sleep_unless_stopped(wait, &cam.stop);
                    continue;
                }
            }
        }
        let mut pixels = spare.take().or_else(|| cam.recycle.try_recv().ok()).unwrap_or_default();
        watch.read_started();
        let result = source.next_frame(&mut pixels);
        watch.read_ended();
        match result {
            Ok(()) => {
                broken_run = 0;
                backoff.reset();
                set_online(true);
                if !decoder_known {
                    decoder_known = true;
                    if let Some(d) = source.decoder() {
                        tracing::info!(camera = %cam.name, decoder = %d, "decoder in use");
                        cam.counters.set_decoder(d);
                    }
                }
                let ts_ms = source.timestamp_ms().unwrap_or_else(now_ms);
                let frame = Frame { camera: cam.index, seq, captured: Instant::now(), ts_ms, pixels };
                seq += 1;
                CameraCounters::add(&cam.counters.captured, 1);
                // No queue: the pipeline gave up on this thread at a stop.
                spare = watch.with_queue(|tx| push_drop_oldest(tx, &cam.rx_for_drops, frame, &cam.counters)).flatten();
                CameraCounters::add(&cam.counters.dropped, source.take_dropped());
                CameraCounters::add(&cam.counters.broken, source.take_missing());
            }
            Err(CaptureError::BrokenFrame { reason, .. }) => {
                spare = Some(pixels);
                seq += 1;
                CameraCounters::add(&cam.counters.broken, 1);
                tracing::debug!(camera = %cam.name, %reason, "broken frame skipped");
                broken_run += 1;
                if broken_run >= BROKEN_FRAMES_BEFORE_REOPEN {
                    tracing::warn!(camera = %cam.name, frames = broken_run, "only broken frames: reopening the source");
                    broken_run = 0;
                    source.close();
                    opened = false;
                }
            }
            Err(CaptureError::Ended(_)) => {
                tracing::info!(camera = %cam.name, "source ended");
                break;
            }
            Err(e) => {
                spare = Some(pixels);
                source.close();
                opened = false;
                set_online(false);
                let wait = backoff.next_delay();
                tracing::warn!(camera = %cam.name, error = %e, retry_in_ms = wait.as_millis() as u64, "camera lost");
                sleep_unless_stopped(wait, &cam.stop);
                continue;
            }
        }
        if let Some(period) = period {
            next_due += period;
            let now = Instant::now();
            if next_due > now {
                sleep_unless_stopped(next_due - now, &cam.stop);
            } else if now - next_due > period * 4 {
                // Far behind (a stall): don't burst to catch up, restart the clock.
                next_due = now;
            }
        }
    }
    source.close();
    // Closes the queue: the preprocess workers drain it and move on.
    watch.close_queue();
    tracing::info!(camera = %cam.name, frames = seq, "camera thread stopped");
}

/// Sends `frame`, dropping the oldest queued frame of this camera while the
/// queue is full. Never blocks. Returns the pixels of a dropped frame for reuse.
pub fn push_drop_oldest(
    tx: &Sender<Frame>,
    rx: &Receiver<Frame>,
    mut frame: Frame,
    counters: &CameraCounters,
) -> Option<FrameData> {
    let mut freed = None;
    loop {
        match tx.try_send(frame) {
            Ok(()) => return freed,
            Err(TrySendError::Full(f)) => {
                if let Ok(old) = rx.try_recv() {
                    CameraCounters::add(&counters.dropped, 1);
                    freed = Some(old.pixels);
                }
                frame = f;
            }
            Err(TrySendError::Disconnected(f)) => return Some(f.pixels),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Frame {
        Frame { camera: 0, seq, captured: Instant::now(), ts_ms: 0, pixels: FrameData::default() }
    }

    #[test]
    fn full_queue_drops_the_oldest_and_counts_it() {
        let (tx, rx) = crossbeam_channel::bounded(2);
        let c = CameraCounters::default();
        let freed: Vec<bool> = (0..5).map(|s| push_drop_oldest(&tx, &rx, frame(s), &c).is_some()).collect();
        assert_eq!(freed, [false, false, true, true, true], "dropped frames hand their buffer back");
        assert_eq!(CameraCounters::get(&c.dropped), 3);
        let kept: Vec<u64> = rx.try_iter().map(|f| f.seq).collect();
        assert_eq!(kept, vec![3, 4]);
    }

    #[test]
    fn fill_from_image_reuses_and_converts() {
        let mut fd = FrameData::default();
        let img = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 2, image::Luma([7])));
        fd.fill_from_image(&img, PixelFormat::Rgb8);
        assert_eq!((fd.width, fd.height, fd.data.len()), (4, 2, 24));
        assert!(fd.data.iter().all(|&b| b == 7));
        fd.fill_from_image(&img, PixelFormat::Gray8);
        assert_eq!(fd.data.len(), 8);
    }
}
