//! Recording good frames for training: a camera's frames, through its ROI, at
//! full resolution, into `DIR/train/good/` (the MVTec layout `ganomaly-train
//! train --data DIR` reads), without near-duplicates.
//!
//! The decision which frame to keep is [`Selector::offer`], a pure function of
//! the frame's time and a small grey thumbnail of its ROI: a frame is kept when
//! at least `min_interval` passed since the last kept one *and* its thumbnail's
//! mean absolute difference to the last kept thumbnail is at least `min_change`
//! (grey levels, 0–255). A still line therefore gives one image, not a thousand;
//! a moving one gives one per part as soon as the part differs.
//!
//! Used by `ganomalyd record` (its own source, `cmds/record.rs`) and by the
//! running daemon's `record` command, which taps a camera's frames on their way
//! into preprocessing ([`Tap`]): the tap's queue is tiny and never waited on, so
//! recording drops its own frames first and the camera never slows down.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use ganomaly_core::preprocess::Roi;
use serde::{Deserialize, Serialize};

use crate::capture::{FrameData, PixelFormat};

/// Side of the grey thumbnail compared for near-duplicates: big enough to see a
/// part move or change, small enough that sensor noise averages out (each
/// thumbnail pixel is the mean of a ROI block).
pub const THUMB: usize = 32;

/// Default `--min-change`: a mean grey difference of 2 levels of 255. Sensor
/// noise on a still scene averages to well under 1 level over the blocks of a
/// 32×32 thumbnail; a part that moved or differs changes it by several.
pub const DEFAULT_MIN_CHANGE: f64 = 2.0;

/// Largest `count` a recording may ask for: a day of frames at 1 fps is far more
/// than a training set needs, and a typo of extra zeros must not fill the disk.
pub const MAX_COUNT: u64 = 100_000;

/// Longest `duration` a recording may ask for (a shift).
pub const MAX_DURATION: Duration = Duration::from_secs(12 * 3600);

/// Errors of a recording; each names the folder, file or option.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "{dir} already holds {files} file(s): pass --append (command: \"append\": true) to add to them, or choose an empty folder"
    )]
    NotEmpty { dir: PathBuf, files: usize },
    #[error("cannot create {dir}: {source}")]
    CreateDir { dir: PathBuf, source: std::io::Error },
    #[error("cannot read {dir}: {source}")]
    ReadDir { dir: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: image::ImageError },
    #[error("{0}")]
    Options(String),
    #[error("the frame does not fit the camera's ROI {roi:?} ({width}×{height})")]
    RoiOutside { roi: Roi, width: u32, height: u32 },
    #[error("a frame has no pixels")]
    EmptyFrame,
}

/// What to record, checked ([`RecordOptions::check`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordOptions {
    /// Folder whose `train/good/` receives the frames.
    pub dir: PathBuf,
    /// Stop after this many kept frames.
    #[serde(default)]
    pub count: Option<u64>,
    /// Stop after this long (seconds).
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Least time between two kept frames (seconds).
    #[serde(default)]
    pub min_interval_s: f64,
    /// Least mean grey difference (0–255) to the last kept frame's thumbnail.
    #[serde(default = "default_min_change")]
    pub min_change: f64,
    /// Add to a folder that already holds images.
    #[serde(default)]
    pub append: bool,
}

fn default_min_change() -> f64 {
    DEFAULT_MIN_CHANGE
}

impl RecordOptions {
    /// Every problem at once, each naming its option.
    pub fn check(&self) -> Result<(), RecordError> {
        let mut problems = Vec::new();
        if self.count.is_none() && self.duration_s.is_none() {
            problems.push("give count and/or duration_s (--count, --duration): a recording must end".to_string());
        }
        if let Some(c) = self.count {
            if c == 0 || c > MAX_COUNT {
                problems.push(format!("count must be in 1..={MAX_COUNT}, got {c}"));
            }
        }
        if let Some(d) = self.duration_s {
            if !(d > 0.0 && d <= MAX_DURATION.as_secs_f64()) {
                problems.push(format!("duration_s must be in (0, {}], got {d}", MAX_DURATION.as_secs()));
            }
        }
        if !(self.min_interval_s >= 0.0 && self.min_interval_s <= 3600.0) {
            problems.push(format!("min_interval_s must be in [0, 3600], got {}", self.min_interval_s));
        }
        if !(self.min_change >= 0.0 && self.min_change <= 255.0) {
            problems.push(format!("min_change must be in [0, 255], got {}", self.min_change));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RecordError::Options(problems.join("; ")))
        }
    }

    pub fn duration(&self) -> Option<Duration> {
        self.duration_s.map(Duration::from_secs_f64)
    }

    /// The folder the images go into.
    pub fn good_dir(&self) -> PathBuf {
        self.dir.join("train").join("good")
    }
}

/// A grey thumbnail of a frame's ROI: each pixel the mean of its block.
pub type Thumb = [u8; THUMB * THUMB];

/// The ROI of `frame` as a [`THUMB`]×[`THUMB`] grey thumbnail (block means).
pub fn thumbnail(frame: &FrameData, roi: Option<Roi>) -> Result<Thumb, RecordError> {
    let r = checked_roi(frame, roi)?;
    let bpp = frame.format.bytes_per_pixel();
    let mut sums = [0u32; THUMB * THUMB];
    let mut counts = [0u32; THUMB * THUMB];
    let stride = frame.width as usize * bpp;
    for y in 0..r.height as usize {
        let ty = y * THUMB / r.height as usize;
        let row = (r.y as usize + y) * stride + r.x as usize * bpp;
        for x in 0..r.width as usize {
            let tx = x * THUMB / r.width as usize;
            let p = row + x * bpp;
            let v = match frame.format {
                PixelFormat::Gray8 => u32::from(frame.data[p]),
                PixelFormat::Rgb8 => {
                    u32::from(ganomaly_core::preprocess::luma(frame.data[p], frame.data[p + 1], frame.data[p + 2]))
                }
            };
            sums[ty * THUMB + tx] += v;
            counts[ty * THUMB + tx] += 1;
        }
    }
    let mut t = [0u8; THUMB * THUMB];
    for i in 0..t.len() {
        // A ROI narrower than the thumbnail leaves some cells empty: they stay 0 in both.
        t[i] = sums[i].checked_div(counts[i]).unwrap_or(0) as u8;
    }
    Ok(t)
}

/// Mean absolute difference of two thumbnails, in grey levels (0–255).
pub fn mean_abs_diff(a: &Thumb, b: &Thumb) -> f64 {
    let sum: u64 = a.iter().zip(b).map(|(&x, &y)| u64::from(x.abs_diff(y))).sum();
    sum as f64 / a.len() as f64
}

/// What [`Selector::offer`] decided for a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Write it.
    Keep,
    /// Too soon after the last kept frame.
    TooSoon,
    /// Too much like the last kept frame (its difference).
    Duplicate(f64),
    /// The recording is complete (count reached or time up): stop.
    Done,
}

/// The keep/skip/stop decisions of one recording (pure: times are passed in).
#[derive(Debug, Clone)]
pub struct Selector {
    count: Option<u64>,
    duration: Option<Duration>,
    min_interval: Duration,
    min_change: f64,
    kept: u64,
    skipped_duplicates: u64,
    last: Option<(Duration, Thumb)>,
}

impl Selector {
    pub fn new(o: &RecordOptions) -> Selector {
        Selector {
            count: o.count,
            duration: o.duration(),
            min_interval: Duration::from_secs_f64(o.min_interval_s.max(0.0)),
            min_change: o.min_change,
            kept: 0,
            skipped_duplicates: 0,
            last: None,
        }
    }

    /// Whether time or count has run out at `elapsed` since the start.
    pub fn finished(&self, elapsed: Duration) -> bool {
        self.count.is_some_and(|c| self.kept >= c) || self.duration.is_some_and(|d| elapsed >= d)
    }

    /// Decides for a frame seen `elapsed` after the start with thumbnail `thumb`;
    /// a `Keep` counts it as kept.
    pub fn offer(&mut self, elapsed: Duration, thumb: &Thumb) -> Decision {
        if self.finished(elapsed) {
            return Decision::Done;
        }
        if let Some((at, last)) = &self.last {
            if elapsed.saturating_sub(*at) < self.min_interval {
                return Decision::TooSoon;
            }
            let d = mean_abs_diff(last, thumb);
            if d < self.min_change {
                self.skipped_duplicates += 1;
                return Decision::Duplicate(d);
            }
        }
        self.last = Some((elapsed, *thumb));
        self.kept += 1;
        Decision::Keep
    }

    pub fn kept(&self) -> u64 {
        self.kept
    }

    pub fn duplicates(&self) -> u64 {
        self.skipped_duplicates
    }

    /// The progress bar's length: the count if one was asked for.
    pub fn target(&self) -> Option<u64> {
        self.count
    }
}

/// Creates `DIR/train/good/`; refuses one that holds files unless `append`.
/// Returns the number of files already there (the next file's number).
pub fn prepare_dir(o: &RecordOptions) -> Result<usize, RecordError> {
    let dir = o.good_dir();
    std::fs::create_dir_all(&dir).map_err(|source| RecordError::CreateDir { dir: dir.clone(), source })?;
    let files = std::fs::read_dir(&dir)
        .map_err(|source| RecordError::ReadDir { dir: dir.clone(), source })?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .count();
    if files > 0 && !o.append {
        return Err(RecordError::NotEmpty { dir, files });
    }
    Ok(files)
}

fn checked_roi(frame: &FrameData, roi: Option<Roi>) -> Result<Roi, RecordError> {
    if frame.width == 0 || frame.height == 0 {
        return Err(RecordError::EmptyFrame);
    }
    let need = frame.width as usize * frame.height as usize * frame.format.bytes_per_pixel();
    if frame.data.len() < need {
        return Err(RecordError::EmptyFrame);
    }
    let r = roi.unwrap_or(Roi { x: 0, y: 0, width: frame.width, height: frame.height });
    let fits = r.width > 0
        && r.height > 0
        && r.x.checked_add(r.width).is_some_and(|e| e <= frame.width)
        && r.y.checked_add(r.height).is_some_and(|e| e <= frame.height);
    if !fits {
        return Err(RecordError::RoiOutside { roi: r, width: frame.width, height: frame.height });
    }
    Ok(r)
}

/// The ROI of `frame` at full resolution, as an image (RGB or grey as captured).
pub fn crop(frame: &FrameData, roi: Option<Roi>) -> Result<image::DynamicImage, RecordError> {
    let r = checked_roi(frame, roi)?;
    let bpp = frame.format.bytes_per_pixel();
    let stride = frame.width as usize * bpp;
    let mut out = Vec::with_capacity(r.width as usize * r.height as usize * bpp);
    for y in r.y as usize..(r.y + r.height) as usize {
        let start = y * stride + r.x as usize * bpp;
        out.extend_from_slice(&frame.data[start..start + r.width as usize * bpp]);
    }
    let img = match frame.format {
        PixelFormat::Rgb8 => image::RgbImage::from_raw(r.width, r.height, out).map(image::DynamicImage::ImageRgb8),
        PixelFormat::Gray8 => image::GrayImage::from_raw(r.width, r.height, out).map(image::DynamicImage::ImageLuma8),
    };
    img.ok_or(RecordError::EmptyFrame)
}

/// Writes the ROI of `frame` as PNG `dir/<prefix>-<n:06>.png`; returns the path.
pub fn write_png(
    dir: &Path,
    prefix: &str,
    n: usize,
    frame: &FrameData,
    roi: Option<Roi>,
) -> Result<PathBuf, RecordError> {
    let img = crop(frame, roi)?;
    let path = dir.join(format!("{prefix}-{n:06}.png"));
    // Written under a temporary name and renamed: the trainer never reads half a PNG.
    let tmp = dir.join(format!(".{prefix}-{n:06}.png.tmp"));
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|source| RecordError::Write { path: path.clone(), source })?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| RecordError::Write { path: path.clone(), source: image::ImageError::IoError(e) })?;
    Ok(path)
}

/// Frames of one camera handed to a recording in the running daemon.
///
/// Backpressure: the queue holds [`TAP_QUEUE`] frames and is offered with
/// `try_send`; when the recorder is behind (PNG encoding of a large ROI is
/// slow), the tapped copy is dropped, never the camera's frame.
#[derive(Debug, Default)]
pub struct Tap {
    active: AtomicBool,
    tx: Mutex<Option<Sender<FrameData>>>,
}

/// Frames waiting for the recorder: two, so that one is encoded while the next waits.
pub const TAP_QUEUE: usize = 2;

impl Tap {
    /// Starts tapping; `None` while another recording holds the tap.
    pub fn open(&self) -> Option<Receiver<FrameData>> {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if tx.is_some() {
            return None;
        }
        let (s, r) = crossbeam_channel::bounded(TAP_QUEUE);
        *tx = Some(s);
        self.active.store(true, Ordering::Release);
        Some(r)
    }

    /// Stops tapping (the recorder is done).
    pub fn close(&self) {
        self.active.store(false, Ordering::Release);
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn is_open(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Offers a copy of `frame` when a recording listens; one atomic load otherwise.
    pub fn offer(&self, frame: &FrameData) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = guard.as_ref() {
            // A full queue means the recorder is behind: skip this frame (see above).
            if let Err(TrySendError::Disconnected(_)) = tx.try_send(frame.clone()) {
                drop(guard);
                self.close();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> FrameData {
        let mut d = FrameData::default();
        let buf = d.reshape(w, h, PixelFormat::Gray8);
        for y in 0..h {
            for x in 0..w {
                buf[(y * w + x) as usize] = f(x, y);
            }
        }
        d
    }

    fn opts(count: Option<u64>, duration_s: Option<f64>, min_interval_s: f64) -> RecordOptions {
        RecordOptions {
            dir: PathBuf::from("/nonexistent"),
            count,
            duration_s,
            min_interval_s,
            min_change: DEFAULT_MIN_CHANGE,
            append: false,
        }
    }

    #[test]
    fn a_still_line_gives_one_image_and_a_change_gives_the_next() {
        let still = gray(64, 48, |x, y| ((x * 3 + y) % 200) as u8);
        // Sensor noise: ±1 level on every other pixel.
        let noisy = gray(64, 48, |x, y| (((x * 3 + y) % 200) as u8).saturating_add(((x + y) % 2) as u8));
        let moved = gray(64, 48, |x, y| ((x * 3 + y + 40) % 200) as u8);
        let mut s = Selector::new(&opts(Some(10), None, 0.0));
        let ms = Duration::from_millis;
        assert_eq!(s.offer(ms(0), &thumbnail(&still, None).unwrap()), Decision::Keep);
        for i in 1..1000 {
            let t = thumbnail(if i % 2 == 0 { &still } else { &noisy }, None).unwrap();
            assert!(matches!(s.offer(ms(i), &t), Decision::Duplicate(d) if d < 1.0), "frame {i}");
        }
        assert_eq!((s.kept(), s.duplicates()), (1, 999));
        assert_eq!(s.offer(ms(1000), &thumbnail(&moved, None).unwrap()), Decision::Keep);
        assert_eq!(s.kept(), 2);
    }

    #[test]
    fn interval_count_and_duration_end_or_space_a_recording() {
        let frames: Vec<Thumb> = (0..8u8).map(|i| [i * 30; THUMB * THUMB]).collect();
        let ms = Duration::from_millis;
        let mut s = Selector::new(&opts(Some(3), None, 0.5));
        assert_eq!(s.offer(ms(0), &frames[0]), Decision::Keep);
        assert_eq!(s.offer(ms(499), &frames[1]), Decision::TooSoon);
        assert_eq!(s.offer(ms(500), &frames[2]), Decision::Keep);
        assert_eq!(s.offer(ms(1000), &frames[3]), Decision::Keep);
        assert_eq!(s.offer(ms(5000), &frames[4]), Decision::Done, "count reached");

        let mut s = Selector::new(&opts(None, Some(2.0), 0.0));
        assert_eq!(s.offer(ms(1999), &frames[0]), Decision::Keep);
        assert_eq!(s.offer(ms(2000), &frames[1]), Decision::Done, "time up");
        assert!(s.finished(ms(2000)) && !s.finished(ms(1999)));
    }

    #[test]
    fn options_are_checked_all_at_once() {
        let mut o = opts(None, None, -1.0);
        o.min_change = 300.0;
        let err = o.check().unwrap_err().to_string();
        for want in ["count and/or duration_s", "min_interval_s", "min_change"] {
            assert!(err.contains(want), "{err} lacks {want}");
        }
        assert!(opts(Some(0), None, 0.0).check().unwrap_err().to_string().contains("count must be"));
        assert!(opts(None, Some(1e9), 0.0).check().unwrap_err().to_string().contains("duration_s"));
        assert!(opts(Some(5), None, 0.0).check().is_ok());
        // Unknown JSON keys (a typo in a command) are refused, not ignored.
        let e = serde_json::from_str::<RecordOptions>(r#"{"dir":"/x","cuont":3}"#).unwrap_err();
        assert!(e.to_string().contains("cuont"), "{e}");
    }

    #[test]
    fn crops_the_roi_at_full_resolution_and_thumbnails_only_it() {
        let mut f = FrameData::default();
        let buf = f.reshape(8, 4, PixelFormat::Rgb8);
        for (i, px) in buf.chunks_exact_mut(3).enumerate() {
            let x = (i % 8) as u8;
            px.copy_from_slice(&[x * 10, 0, 0]);
        }
        let roi = Roi { x: 2, y: 1, width: 4, height: 2 };
        let img = crop(&f, Some(roi)).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (4, 2));
        assert_eq!(img.get_pixel(0, 0).0, [20, 0, 0]);
        assert_eq!(img.get_pixel(3, 1).0, [50, 0, 0]);
        let out = crop(&f, Some(Roi { x: 6, y: 0, width: 4, height: 1 })).unwrap_err();
        assert!(matches!(out, RecordError::RoiOutside { .. }), "{out}");
        // Changing pixels outside the ROI does not change its thumbnail.
        let before = thumbnail(&f, Some(roi)).unwrap();
        f.data[0] = 255;
        assert_eq!(thumbnail(&f, Some(roi)).unwrap(), before);
    }

    #[test]
    fn a_folder_with_images_is_refused_without_append() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(Some(1), None, 0.0);
        o.dir = d.path().to_path_buf();
        assert_eq!(prepare_dir(&o).unwrap(), 0);
        let f = gray(4, 4, |_, _| 7);
        let p = write_png(&o.good_dir(), "rec", 0, &f, None).unwrap();
        assert!(p.is_file());
        let err = prepare_dir(&o).unwrap_err();
        assert!(matches!(err, RecordError::NotEmpty { files: 1, .. }) && err.to_string().contains("--append"), "{err}");
        assert!(p.is_file(), "nothing was deleted");
        o.append = true;
        assert_eq!(prepare_dir(&o).unwrap(), 1);
        let back = image::open(&p).unwrap().to_luma8();
        assert_eq!((back.dimensions(), back.get_pixel(1, 1).0), ((4, 4), [7]));
    }

    #[test]
    fn the_tap_drops_its_own_copies_when_the_recorder_is_behind() {
        let tap = Tap::default();
        let f = gray(2, 2, |_, _| 1);
        tap.offer(&f); // closed: nothing happens
        let rx = tap.open().expect("free");
        assert!(tap.open().is_none(), "one recording at a time");
        for _ in 0..10 {
            tap.offer(&f);
        }
        assert_eq!(rx.len(), TAP_QUEUE);
        drop(rx);
        tap.offer(&f);
        assert!(!tap.is_open(), "a gone recorder closes the tap");
        assert!(tap.open().is_some());
    }
}
