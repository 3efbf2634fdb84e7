//! Alarm snapshots: the frame that raised an alarm, with the model's anomaly
//! map laid over its region of interest as a heat map, written as JPEG to the
//! snapshot directory (newest `retain` kept) and handed to the publisher.
//!
//! Retention deletes only files this daemon names ([`is_ours`]), never any
//! other file in the folder (a folder shared with images of another program
//! keeps them), and counts age by the order the writer wrote them, not by the
//! wall clock in their names: after NTP steps the clock back, the snapshot
//! just written is not taken for the oldest and deleted at once.
//!
//! Encoding a JPEG costs milliseconds, so it runs on its own thread: the
//! inference thread hands jobs over a small bounded channel and never waits
//! (policy: if the writer is behind, the snapshot is skipped and counted; the
//! alarm itself is still published, without a snapshot reference).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use image::RgbImage;

use crate::capture::{FrameData, PixelFormat};
use crate::config::{Roi, SnapshotSettings};
use crate::events::{Publisher, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot write snapshot {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot encode snapshot: {0}")]
    Encode(#[from] image::ImageError),
    #[error("frame buffer does not match its {width}x{height} size")]
    BadFrame { width: u32, height: u32 },
}

/// Everything needed to draw one snapshot, owned (the frame buffer is a copy).
#[derive(Debug)]
pub struct SnapshotJob {
    pub camera: String,
    pub alarm_id: String,
    pub file_name: String,
    pub frame: FrameData,
    pub roi: Option<Roi>,
    /// Anomaly map of the ROI, `side × side`, row-major.
    pub map: Vec<f32>,
    pub side: usize,
}

/// File name of an alarm's snapshot: starts with the zero-padded time so that
/// name order is age order (retention relies on it).
pub fn file_name(ts_ms: u64, alarm_id: &str) -> String {
    format!("{ts_ms:013}_{alarm_id}.jpg")
}

/// Draws the frame with the heat overlay.
pub fn render(
    frame: &FrameData,
    roi: Option<Roi>,
    map: &[f32],
    side: usize,
    alpha: f32,
) -> Result<RgbImage, SnapshotError> {
    let (w, h) = (frame.width, frame.height);
    let bad = || SnapshotError::BadFrame { width: w, height: h };
    let mut img = match frame.format {
        PixelFormat::Rgb8 => RgbImage::from_raw(w, h, frame.data.clone()).ok_or_else(bad)?,
        PixelFormat::Gray8 => {
            let g = image::GrayImage::from_raw(w, h, frame.data.clone()).ok_or_else(bad)?;
            image::DynamicImage::ImageLuma8(g).to_rgb8()
        }
    };
    if side == 0 || map.len() < side * side {
        return Ok(img);
    }
    let r = roi.unwrap_or(Roi { x: 0, y: 0, width: w, height: h });
    // Relative scale: the hottest spot of this frame is red. Absolute map
    // values differ between models and carry no meaning to an operator.
    let max = map.iter().copied().fold(0.0f32, f32::max).max(1e-6);
    let alpha = alpha.clamp(0.0, 1.0);
    for y in r.y..(r.y + r.height).min(h) {
        let my = ((y - r.y) as usize * side / r.height as usize).min(side - 1);
        for x in r.x..(r.x + r.width).min(w) {
            let mx = ((x - r.x) as usize * side / r.width as usize).min(side - 1);
            let heat = jet(map[my * side + mx] / max);
            let p = img.get_pixel_mut(x, y);
            for (v, h) in p.0.iter_mut().zip(heat) {
                *v = (*v as f32 * (1.0 - alpha) + h as f32 * alpha).round() as u8;
            }
        }
    }
    Ok(img)
}

/// Blue → cyan → yellow → red colour map of `v` in [0, 1].
fn jet(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let r = (1.5 - (4.0 * v - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8]
}

pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, SnapshotError> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100)).encode_image(img)?;
    Ok(out)
}

/// Whether `name` is a snapshot that [`file_name`] made:
/// `<ts, ≥ 13 digits>_<camera>-<first ts>-<n>.jpg`.
pub fn is_ours(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some((ts, id)) = name.strip_suffix(".jpg").and_then(|stem| stem.split_once('_')) else { return false };
    let mut parts = id.rsplitn(3, '-');
    let (Some(n), Some(first), Some(camera)) = (parts.next(), parts.next(), parts.next()) else { return false };
    ts.len() >= 13 && digits(ts) && digits(first) && digits(n) && !camera.is_empty()
}

/// The daemon's snapshots in one folder, oldest first in the order written;
/// beyond `retain`, the oldest are deleted.
#[derive(Debug)]
pub struct Retention {
    dir: PathBuf,
    retain: usize,
    files: VecDeque<String>,
}

impl Retention {
    /// The snapshots earlier runs left in `dir`, in name order (their
    /// wall-clock time is the only order left of them; all are older than
    /// anything this run writes). Temporaries a crash left mid-write go.
    pub fn scan(dir: &Path, retain: usize) -> Retention {
        let mut files = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for name in entries.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
                if is_ours(&name) {
                    files.push(name);
                } else if name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")).is_some_and(is_ours) {
                    let _ = std::fs::remove_file(dir.join(&name));
                }
            }
        }
        files.sort();
        Retention { dir: dir.to_path_buf(), retain, files: files.into() }
    }

    /// `name` was just written: it is the newest. Deletes the oldest beyond
    /// `retain`; returns how many. A file already gone (removed by hand) is
    /// not an error.
    pub fn wrote(&mut self, name: &str) -> std::io::Result<usize> {
        self.files.retain(|f| f != name);
        self.files.push_back(name.to_string());
        let mut deleted = 0;
        while self.files.len() > self.retain {
            let Some(old) = self.files.pop_front() else { break };
            match std::fs::remove_file(self.dir.join(&old)) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }
}

/// Sender side used by the inference thread.
#[derive(Clone)]
pub struct SnapshotQueue {
    tx: Sender<SnapshotJob>,
    pub skipped: Arc<AtomicU64>,
}

impl SnapshotQueue {
    /// Queues a job without waiting; false (and counted) if the writer is behind.
    pub fn offer(&self, job: SnapshotJob) -> bool {
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(job)) => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(camera = %job.camera, alarm = %job.alarm_id, "snapshot writer behind: snapshot skipped");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Jobs the writer may hold: alarm starts are rare, a burst of a few cameras
/// at once fits.
const QUEUE: usize = 8;

/// Starts the writer thread; it ends when every [`SnapshotQueue`] is dropped.
pub fn spawn_writer(
    cfg: SnapshotSettings,
    publisher: Arc<dyn Publisher>,
) -> std::io::Result<(SnapshotQueue, std::thread::JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let handle = std::thread::Builder::new().name("snapshots".into()).spawn(move || writer(cfg, rx, publisher))?;
    Ok((SnapshotQueue { tx, skipped: Arc::new(AtomicU64::new(0)) }, handle))
}

fn writer(cfg: SnapshotSettings, rx: Receiver<SnapshotJob>, publisher: Arc<dyn Publisher>) {
    let dir = cfg.dir.clone();
    let mut retention = Retention::scan(&dir, cfg.retain);
    for job in rx {
        match write_one(&cfg, &dir, &job, &mut retention) {
            Ok(jpeg) => {
                publisher.snapshot(&Snapshot { camera: job.camera.clone(), alarm_id: job.alarm_id.clone(), jpeg });
            }
            Err(e) => tracing::warn!(camera = %job.camera, alarm = %job.alarm_id, error = %e, "snapshot failed"),
        }
    }
}

fn write_one(
    cfg: &SnapshotSettings,
    dir: &Path,
    job: &SnapshotJob,
    retention: &mut Retention,
) -> Result<Vec<u8>, SnapshotError> {
    let img = render(&job.frame, job.roi, &job.map, job.side, cfg.overlay_alpha)?;
    let jpeg = encode_jpeg(&img, cfg.quality)?;
    let path = dir.join(&job.file_name);
    let io = |source| SnapshotError::Write { path: path.clone(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    // Written under a temporary name then renamed: a reader never sees half a JPEG.
    let tmp = dir.join(format!(".{}.tmp", job.file_name));
    std::fs::write(&tmp, &jpeg).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    if let Err(e) = retention.wrote(&job.file_name) {
        tracing::warn!(dir = %dir.display(), error = %e, "snapshot retention failed");
    }
    tracing::info!(camera = %job.camera, alarm = %job.alarm_id, path = %path.display(), "snapshot written");
    Ok(jpeg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_colours_only_the_roi_and_marks_the_hot_spot_red() {
        let frame = FrameData { width: 8, height: 4, format: PixelFormat::Gray8, data: vec![100; 32] };
        let roi = Roi { x: 4, y: 0, width: 4, height: 4 };
        let mut map = vec![0.0f32; 4];
        map[3] = 1.0; // bottom-right quarter of the ROI is the hot spot
        let img = render(&frame, Some(roi), &map, 2, 1.0).expect("render");
        assert_eq!(img.get_pixel(0, 0).0, [100, 100, 100], "outside the ROI untouched");
        let hot = img.get_pixel(7, 3).0;
        assert!(hot[0] > 100 && hot[2] < 50, "hot spot red: {hot:?}");
        let cold = img.get_pixel(4, 0).0;
        assert!(cold[2] > 100 && cold[0] < 50, "cold area blue: {cold:?}");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut left: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        left.sort();
        left
    }

    #[test]
    fn only_the_daemons_own_names_count_as_ours() {
        assert!(is_ours(&file_name(1_718_000_000_180, "line3-1718000000100-1")));
        assert!(is_ours(&file_name(5, "cam_a-b-5-12")), "camera names may hold - and _");
        for other in [
            "IMG_0001.jpg",
            "1718000000180_line3-1718000000100-1.jpeg",
            "171800000018_line3-1-1.jpg",
            "1718000000180_line3.jpg",
            "1718000000180_-1-1.jpg",
            "1718000000180_line3-x-1.jpg",
            "part-0001.jpg",
        ] {
            assert!(!is_ours(other), "{other}");
        }
    }

    #[test]
    fn retention_keeps_the_newest_files_and_deletes_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        for ts in [3u64, 1, 2] {
            std::fs::write(dir.path().join(file_name(ts, &format!("c-{ts}-1"))), b"x").expect("write");
        }
        // Not ours: a camera's own images, a note, a temporary of another program.
        for other in ["keep.txt", "good_0001.jpg", "1.jpg", ".other.tmp"] {
            std::fs::write(dir.path().join(other), b"x").expect("write");
        }
        // Ours, left half-written by a crash.
        std::fs::write(dir.path().join(format!(".{}.tmp", file_name(9, "c-9-1"))), b"x").expect("write");
        let mut r = Retention::scan(dir.path(), 2);
        let new = file_name(4, "c-4-1");
        std::fs::write(dir.path().join(&new), b"x").expect("write");
        assert_eq!(r.wrote(&new).expect("retention"), 2);
        let mut want = vec![
            file_name(3, "c-3-1"),
            new,
            ".other.tmp".into(),
            "1.jpg".into(),
            "good_0001.jpg".into(),
            "keep.txt".into(),
        ];
        want.sort();
        assert_eq!(names(dir.path()), want);
    }

    #[test]
    fn retention_follows_write_order_when_the_clock_steps_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Retention::scan(dir.path(), 2);
        // Written in this order; the wall clock stepped back an hour before the third.
        let written = [file_name(10_000_000, "c-1-1"), file_name(10_000_100, "c-2-2"), file_name(6_400_200, "c-3-3")];
        for name in &written {
            std::fs::write(dir.path().join(name), b"x").expect("write");
            r.wrote(name).expect("retention");
        }
        // Name order would have deleted the newest (the smallest time); write order keeps it.
        let mut want = vec![written[1].clone(), written[2].clone()];
        want.sort();
        assert_eq!(names(dir.path()), want);
    }

    #[test]
    fn jpeg_round_trips() {
        let img = RgbImage::from_pixel(16, 16, image::Rgb([10, 200, 30]));
        let jpeg = encode_jpeg(&img, 90).expect("encode");
        let back = image::load_from_memory(&jpeg).expect("decode").to_rgb8();
        assert_eq!(back.dimensions(), (16, 16));
    }
}
