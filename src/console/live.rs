//! The live view: a latest-frame tap per camera on the inference thread, and
//! the encoder thread that turns tapped frames into JPEGs with the heat map.
//!
//! The tap costs the frame path nothing while nobody watches: two relaxed
//! atomic loads per decided frame. While a viewer is connected (a request
//! marks the camera wanted for [`WANTED_FOR`]), at most one frame per
//! `live_fps` interval is copied into a reused buffer and handed over with
//! `try_send` on a channel of one slot per camera. Policy when it is full
//! (the encoder is behind): the frame is not copied, and counted (`skipped`);
//! the console shows a slightly older frame. The encoder draws the anomaly
//! map over the region of interest with the snapshot code
//! ([`crate::snapshot::render`]) and publishes the JPEG on a `watch` channel
//! per camera, which any number of viewers read without copying it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::capture::{Frame, FrameData};
use crate::config::Roi;

/// How long one request keeps a camera's frames coming: longer than a page's
/// poll interval, short enough that a closed tab stops the copies soon.
pub const WANTED_FOR: Duration = Duration::from_secs(3);

/// Heat-map opacity over the live picture (the snapshot's is configurable;
/// the console's is for looking, so one value that shows both).
const OVERLAY_ALPHA: f32 = 0.4;
/// JPEG quality of live frames: for a screen, not for evidence.
const LIVE_QUALITY: u8 = 75;
/// Longest side of a live frame: frames are shrunk by a whole factor to fit.
/// Drawing and encoding cost per pixel: measured on this 2-core box (demo
/// model, one 640×640 camera, 5 live fps), full size took the encoder 9 % of
/// a core and the pipeline 17 % more CPU per frame; the overlay of a 64 px
/// anomaly map shows no more at 320 px.
pub const LIVE_MAX_SIDE: u32 = 480;

/// `frame` shrunk by the smallest whole factor that fits [`LIVE_MAX_SIDE`]
/// (nearest pixel), into `out`; the ROI scaled alike. Unchanged if it fits.
pub fn shrink(frame: &FrameData, roi: Option<Roi>, out: &mut FrameData) -> Option<Roi> {
    let side = frame.width.max(frame.height).max(1);
    let k = side.div_ceil(LIVE_MAX_SIDE).max(1);
    let bpp = match frame.format {
        crate::capture::PixelFormat::Rgb8 => 3,
        crate::capture::PixelFormat::Gray8 => 1,
    };
    out.format = frame.format;
    out.width = (frame.width / k).max(1);
    out.height = (frame.height / k).max(1);
    out.data.clear();
    let (w, h) = (frame.width as usize, frame.height as usize);
    if frame.data.len() < w * h * bpp {
        // A bad buffer: render reports it.
        out.width = frame.width;
        out.height = frame.height;
        out.data.extend_from_slice(&frame.data);
        return roi;
    }
    for y in 0..out.height as usize {
        let row = &frame.data[(y * k as usize) * w * bpp..];
        for x in 0..out.width as usize {
            let i = x * k as usize * bpp;
            out.data.extend_from_slice(&row[i..i + bpp]);
        }
    }
    roi.map(|r| Roi { x: r.x / k, y: r.y / k, width: (r.width / k).max(1), height: (r.height / k).max(1) })
}

/// A frame tapped for the console, in a buffer that goes back and forth.
#[derive(Debug, Default)]
pub struct LiveJob {
    camera: usize,
    seq: u64,
    ts_ms: u64,
    score: f64,
    frame: FrameData,
    map: Vec<f32>,
    side: usize,
}

/// One encoded live frame.
#[derive(Debug, Clone)]
pub struct LiveFrame {
    /// Counts the console's frames of this camera (1, 2, …), for long polls.
    pub n: u64,
    /// The camera's frame sequence number and capture time.
    pub seq: u64,
    pub ts_ms: u64,
    pub score: f64,
    pub jpeg: axum::body::Bytes,
}

#[derive(Debug)]
struct Tap {
    /// Milliseconds since the epoch until which a viewer wants frames.
    wanted_until_ms: AtomicU64,
    next_ms: AtomicU64,
}

/// The taps of every camera (indexed like the console's cameras), offered
/// frames by the inference threads.
#[derive(Debug)]
pub struct LiveTaps {
    /// The console's cameras, in its order. Frames are matched by name: a
    /// frame's `camera` is its pipeline slot, which a reload that restarts
    /// the camera changes.
    names: Vec<String>,
    epoch: Instant,
    interval_ms: u64,
    taps: Vec<Tap>,
    jobs: Sender<LiveJob>,
    free: Receiver<LiveJob>,
    /// Frames not handed over because the encoder was behind.
    pub skipped: AtomicU64,
}

impl LiveTaps {
    /// Whether camera `camera`'s frame captured at `at` should be copied now.
    /// Pure: (epoch, wanted, next) → decision, so the throttle is unit-tested.
    fn due(&self, camera: usize, at: Instant) -> bool {
        let Some(tap) = self.taps.get(camera) else { return false };
        let now = at.saturating_duration_since(self.epoch).as_millis() as u64;
        if now >= tap.wanted_until_ms.load(Ordering::Relaxed) || now < tap.next_ms.load(Ordering::Relaxed) {
            return false;
        }
        tap.next_ms.store(now + self.interval_ms, Ordering::Relaxed);
        true
    }

    /// Offered every decided frame of camera `name` by the inference thread; never blocks.
    pub fn offer(&self, name: &str, frame: &Frame, map: &mut dyn crate::decide::HeatMap, side: usize, score: f64) {
        let Some(camera) = self.names.iter().position(|n| n == name) else { return };
        if !self.due(camera, frame.captured) {
            return;
        }
        let mut job = self.free.try_recv().unwrap_or_default();
        job.camera = camera;
        job.seq = frame.seq;
        job.ts_ms = frame.ts_ms;
        job.score = score;
        job.side = side;
        job.frame.width = frame.pixels.width;
        job.frame.height = frame.pixels.height;
        job.frame.format = frame.pixels.format;
        job.frame.data.clear();
        job.frame.data.extend_from_slice(&frame.pixels.data);
        job.map.clear();
        // Taken only now: it may cost a run of the model's map session.
        job.map.extend_from_slice(map.get());
        match self.jobs.try_send(job) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A viewer of `camera` is connected: keep its frames coming a while.
    pub fn want(&self, camera: usize) {
        if let Some(tap) = self.taps.get(camera) {
            let until = self.epoch.elapsed() + WANTED_FOR;
            tap.wanted_until_ms.store(until.as_millis() as u64, Ordering::Relaxed);
        }
    }
}

/// The encoder's ends.
pub struct Encoder {
    jobs: Receiver<LiveJob>,
    free: Sender<LiveJob>,
    rois: Vec<Option<Roi>>,
    latest: Vec<tokio::sync::watch::Sender<Option<LiveFrame>>>,
}

/// The taps, the encoder to run, and a receiver of each camera's latest frame
/// (`cameras`: each camera's name and ROI, in the console's order).
pub fn taps(
    cameras: Vec<(String, Option<Roi>)>,
    interval: Duration,
) -> (Arc<LiveTaps>, Encoder, Vec<tokio::sync::watch::Receiver<Option<LiveFrame>>>) {
    let (names, rois): (Vec<String>, Vec<Option<Roi>>) = cameras.into_iter().unzip();
    let n = rois.len();
    // One frame in flight per camera; the free list holds the buffers back.
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(n.max(1));
    let (free_tx, free_rx) = crossbeam_channel::bounded(n.max(1) + 1);
    let taps = (0..n).map(|_| Tap { wanted_until_ms: AtomicU64::new(0), next_ms: AtomicU64::new(0) }).collect();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| tokio::sync::watch::channel(None)).unzip();
    let live = Arc::new(LiveTaps {
        names,
        epoch: Instant::now(),
        interval_ms: (interval.as_millis() as u64).max(1),
        taps,
        jobs: jobs_tx,
        free: free_rx,
        skipped: AtomicU64::new(0),
    });
    (live, Encoder { jobs: jobs_rx, free: free_tx, rois, latest: senders }, receivers)
}

impl Encoder {
    /// Encodes tapped frames until `stop`.
    pub fn spawn(self, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("console-live".into()).spawn(move || {
            let mut counts = vec![0u64; self.latest.len()];
            let mut small = FrameData::default();
            while !stop.load(Ordering::Relaxed) {
                let job = match self.jobs.recv_timeout(Duration::from_millis(250)) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                let roi = shrink(&job.frame, self.rois.get(job.camera).copied().flatten(), &mut small);
                let jpeg = crate::snapshot::render(&small, roi, &job.map, job.side, OVERLAY_ALPHA)
                    .and_then(|img| crate::snapshot::encode_jpeg(&img, LIVE_QUALITY));
                match (jpeg, self.latest.get(job.camera), counts.get_mut(job.camera)) {
                    (Ok(jpeg), Some(tx), Some(n)) => {
                        *n += 1;
                        let frame = LiveFrame {
                            n: *n,
                            seq: job.seq,
                            ts_ms: job.ts_ms,
                            score: job.score,
                            jpeg: axum::body::Bytes::from(jpeg),
                        };
                        tx.send_replace(Some(frame));
                    }
                    (Err(e), _, _) => tracing::debug!(camera = job.camera, error = %e, "live frame not encoded"),
                    _ => {}
                }
                let _ = self.free.try_send(job);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::PixelFormat;

    /// Cameras `c0`, `c1`, … without ROI.
    fn cams(n: usize) -> Vec<(String, Option<Roi>)> {
        (0..n).map(|i| (format!("c{i}"), None)).collect()
    }

    #[test]
    fn frames_are_matched_by_camera_name_not_by_pipeline_slot() {
        // Camera `c1` restarted by a reload runs at slot 7 now.
        let (live, enc, _rx) = taps(cams(2), Duration::from_millis(1));
        live.want(1);
        live.offer("c1", &frame(7, Instant::now() + Duration::from_millis(5)), &mut &[0.0; 4][..], 2, 0.3);
        let job = enc.jobs.try_recv().expect("the watched camera's frame is copied");
        assert_eq!(job.camera, 1, "under its console index");
        live.offer("gone", &frame(1, Instant::now() + Duration::from_millis(50)), &mut &[0.0; 4][..], 2, 0.3);
        assert!(enc.jobs.try_recv().is_err(), "a camera the console does not know is not copied");
    }

    fn frame(camera: usize, at: Instant) -> Frame {
        Frame {
            camera,
            seq: 1,
            captured: at,
            ts_ms: 1,
            pixels: FrameData { width: 4, height: 2, format: PixelFormat::Gray8, data: vec![50; 8] },
        }
    }

    #[test]
    fn nothing_is_copied_until_a_viewer_wants_it_then_at_most_once_per_interval() {
        let (live, enc, _rx) = taps(cams(2), Duration::from_millis(200));
        let t0 = live.epoch;
        let at = |ms| t0 + Duration::from_millis(ms);
        live.offer("c0", &frame(0, at(10)), &mut &[0.0; 4][..], 2, 0.1);
        assert!(enc.jobs.try_recv().is_err(), "no viewer: no copy");
        live.want(0);
        assert!(live.due(0, at(10)));
        assert!(!live.due(0, at(100)), "within the interval");
        assert!(live.due(0, at(250)));
        assert!(!live.due(1, at(250)), "the other camera is not watched");
        assert!(!live.due(9, at(250)), "no such camera");
        assert!(!live.due(0, at(10_000)), "the viewer's want expired");
    }

    #[test]
    fn big_frames_shrink_by_a_whole_factor_with_their_roi() {
        let mut big = FrameData { width: 1000, height: 500, format: PixelFormat::Rgb8, data: vec![0; 1000 * 500 * 3] };
        big.data[(3 * 1000 + 6) * 3] = 9; // pixel (6, 3) is the nearest of (2, 1)
        let mut out = FrameData::default();
        let roi = shrink(&big, Some(Roi { x: 100, y: 50, width: 600, height: 400 }), &mut out);
        assert_eq!((out.width, out.height, out.data.len()), (333, 166, 333 * 166 * 3));
        assert_eq!(out.data[(333 + 2) * 3], 9);
        assert_eq!(roi, Some(Roi { x: 33, y: 16, width: 200, height: 133 }));
        let small = FrameData { width: 64, height: 64, format: PixelFormat::Gray8, data: vec![7; 64 * 64] };
        assert_eq!(shrink(&small, None, &mut out), None);
        assert_eq!(out, small, "a frame that fits is unchanged");
    }

    #[test]
    fn a_busy_encoder_skips_frames_and_counts_them() {
        let (live, enc, _rx) = taps(cams(1), Duration::from_millis(1));
        live.want(0);
        let t0 = Instant::now();
        for i in 0..4 {
            live.offer("c0", &frame(0, t0 + Duration::from_millis(10 * i)), &mut &[0.0; 4][..], 2, 0.1);
        }
        assert_eq!(enc.jobs.len(), 1);
        assert_eq!(live.skipped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_encoder_publishes_a_jpeg_with_the_frame_numbers() {
        let (live, enc, mut rx) = taps(cams(1), Duration::from_millis(1));
        let stop = Arc::new(AtomicBool::new(false));
        let h = enc.spawn(stop.clone()).expect("spawn");
        live.want(0);
        live.offer("c0", &frame(0, Instant::now() + Duration::from_millis(5)), &mut &[0.0, 1.0, 0.0, 0.0][..], 2, 0.7);
        let deadline = Instant::now() + Duration::from_secs(20);
        while rx[0].borrow_and_update().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let f = rx[0].borrow().clone().expect("a live frame");
        assert_eq!((f.n, f.seq, f.score), (1, 1, 0.7));
        assert_eq!(image::load_from_memory(&f.jpeg).expect("jpeg").width(), 4);
        stop.store(true, Ordering::Relaxed);
        h.join().expect("join");
    }
}
