//! V4L2 cameras through nokhwa: device by index or path, pixel format,
//! resolution and frame rate; frames converted to RGB (or kept gray).
//!
//! nokhwa opens devices by index only, so a path (`/dev/video2`, or a stable
//! `/dev/v4l/by-id/...` link, which is what a box with several USB cameras
//! should use) is resolved to its `/dev/videoN` index first. MJPEG is decoded
//! with the `image` crate: nokhwa's own decoder needs mozjpeg (a C build).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution};
use nokhwa::Camera;
use serde::{Deserialize, Serialize};

use super::plan::{CameraContext, CompileSource, SourcePlan};
use super::{CaptureError, FrameData, FrameSource, PixelFormat, SourceFactory};

/// `source = { kind = "v4l2", device = "/dev/video0", format = "mjpeg" }`; the
/// camera's `width`, `height` and `fps` are requested from the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V4l2Config {
    /// Device index (`"0"`) or path (`/dev/video0`, `/dev/v4l/by-id/...`).
    pub device: String,
    /// Pixel format requested from the camera: `mjpeg`, `yuyv`, `gray`, `rgb`.
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_format() -> String {
    FORMATS[0].0.into()
}

/// The config's format names and nokhwa's formats.
const FORMATS: [(&str, FrameFormat); 4] = [
    ("mjpeg", FrameFormat::MJPEG),
    ("yuyv", FrameFormat::YUYV),
    ("gray", FrameFormat::GRAY),
    ("rgb", FrameFormat::RAWRGB),
];

/// A checked V4L2 camera: the device exists, the format is known.
#[derive(Debug, Clone, PartialEq)]
pub struct V4l2Plan {
    pub device: DeviceSpec,
    pub format: FrameFormat,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
}

impl CompileSource for V4l2Config {
    fn compile(&self, cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
        let format = frame_format(&self.format);
        if format.is_none() {
            let names: Vec<&str> = FORMATS.iter().map(|f| f.0).collect();
            problems.push(format!("{p}.format: `{}` is not one of {}", self.format, names.join(", ")));
        }
        let device = match DeviceSpec::parse(&self.device) {
            Ok(spec) if !cam.probe => Some(spec),
            Ok(spec) => match spec.resolve() {
                Ok(_) => Some(spec),
                Err(e) => {
                    problems.push(format!("{p}.device: {e}"));
                    None
                }
            },
            Err(e) => {
                problems.push(format!("{p}.device: {e}"));
                None
            }
        };
        // nokhwa asks the driver for whole frames per second.
        if cam.fps < 1.0 {
            problems.push(format!("{}.fps: a camera needs a frame rate ≥ 1", cam.camera));
            return None;
        }
        Some(Arc::new(V4l2Plan {
            device: device?,
            format: format?,
            width: cam.width,
            height: cam.height,
            fps: cam.fps,
        }))
    }
    fn frame_size(&self, cam: &CameraContext) -> Option<(u32, u32)> {
        Some((cam.width, cam.height))
    }
}

impl SourcePlan for V4l2Plan {
    /// nokhwa's handles are thread-bound: the camera is made on its thread.
    fn factory(&self) -> SourceFactory {
        let p = self.clone();
        super::on_camera_thread(move || V4l2Camera::new(p.device, p.format, p.width, p.height, p.fps))
    }
}

/// How a camera is named in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    Index(u32),
    Path(PathBuf),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<DeviceSpec, String> {
        let s = s.trim();
        if let Ok(i) = s.parse::<u32>() {
            return Ok(DeviceSpec::Index(i));
        }
        if s.starts_with('/') {
            return Ok(DeviceSpec::Path(PathBuf::from(s)));
        }
        Err(format!("`{s}` is neither a device index (0) nor a device path (/dev/video0)"))
    }

    /// The `/dev/videoN` index, checking that the device node exists.
    pub fn resolve(&self) -> Result<u32, String> {
        match self {
            DeviceSpec::Index(i) => {
                let p = PathBuf::from(format!("/dev/video{i}"));
                if p.exists() {
                    Ok(*i)
                } else {
                    Err(format!("{} does not exist (no such camera; `ganomalyd cameras` lists them)", p.display()))
                }
            }
            DeviceSpec::Path(p) => {
                let real = std::fs::canonicalize(p).map_err(|_| {
                    format!("{} does not exist (no such camera; `ganomalyd cameras` lists them)", p.display())
                })?;
                video_index(&real).ok_or_else(|| format!("{} is not a V4L2 device (/dev/videoN)", p.display()))
            }
        }
    }
}

/// `N` of a `/dev/videoN` path.
fn video_index(p: &Path) -> Option<u32> {
    p.file_name()?.to_str()?.strip_prefix("video")?.parse().ok()
}

/// The config's format name as nokhwa's.
pub fn frame_format(name: &str) -> Option<FrameFormat> {
    FORMATS.iter().find(|f| f.0 == name).map(|f| f.1)
}

/// One camera.
pub struct V4l2Camera {
    spec: DeviceSpec,
    format: FrameFormat,
    width: u32,
    height: u32,
    fps: u32,
    camera: Option<Camera>,
}

impl V4l2Camera {
    pub fn new(spec: DeviceSpec, format: FrameFormat, width: u32, height: u32, fps: f64) -> Self {
        V4l2Camera { spec, format, width, height, fps: fps.round().max(1.0) as u32, camera: None }
    }

    fn name(&self) -> String {
        match &self.spec {
            DeviceSpec::Index(i) => format!("/dev/video{i}"),
            DeviceSpec::Path(p) => p.display().to_string(),
        }
    }
}

impl FrameSource for V4l2Camera {
    fn describe(&self) -> String {
        format!("v4l2 {} {:?} {}x{}@{}", self.name(), self.format, self.width, self.height, self.fps)
    }

    fn self_paced(&self) -> bool {
        true
    }

    fn open(&mut self) -> Result<(), CaptureError> {
        let err = |reason: String| CaptureError::Open { source_name: self.name(), reason };
        let index = self.spec.resolve().map_err(err)?;
        // Closest, not Exact: cameras round resolutions and rates; what was
        // granted is logged below.
        let wanted = CameraFormat::new(Resolution::new(self.width, self.height), self.format, self.fps);
        let req = RequestedFormat::new::<RgbFormat>(RequestedFormatType::Closest(wanted));
        let mut cam = Camera::new(CameraIndex::Index(index), req).map_err(|e| err(e.to_string()))?;
        cam.open_stream().map_err(|e| err(e.to_string()))?;
        let got = cam.camera_format();
        tracing::info!(device = %self.name(), format = %got, "camera opened");
        if got.resolution() != Resolution::new(self.width, self.height) {
            // The ROI was checked against the configured size: a camera that grants
            // another one can push the ROI off the frame (every frame then counts
            // as broken), so say it loudly.
            tracing::warn!(
                device = %self.name(),
                wanted = %format!("{}x{}", self.width, self.height),
                granted = %got.resolution(),
                "camera granted a different resolution than configured; check `width`/`height` and the ROI"
            );
        }
        self.camera = Some(cam);
        Ok(())
    }

    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        let name = self.name();
        let cam = self
            .camera
            .as_mut()
            .ok_or_else(|| CaptureError::Disconnected { source_name: name.clone(), reason: "not open".into() })?;
        let buf =
            cam.frame().map_err(|e| CaptureError::Disconnected { source_name: name.clone(), reason: e.to_string() })?;
        let res = buf.resolution();
        convert(buf.source_frame_format(), res.width_x, res.height_y, buf.buffer(), out)
            .map_err(|reason| CaptureError::BrokenFrame { source_name: name, reason })
    }

    fn close(&mut self) {
        if let Some(mut cam) = self.camera.take() {
            let _ = cam.stop_stream();
        }
    }
}

/// Converts one camera buffer into `out` (RGB, or gray for gray cameras).
pub fn convert(format: FrameFormat, width: u32, height: u32, data: &[u8], out: &mut FrameData) -> Result<(), String> {
    let pixels = width as usize * height as usize;
    match format {
        FrameFormat::MJPEG => {
            let img = image::load_from_memory_with_format(data, image::ImageFormat::Jpeg).map_err(|e| e.to_string())?;
            out.fill_from_image(&img, PixelFormat::Rgb8);
        }
        FrameFormat::GRAY => {
            let src = data.get(..pixels).ok_or_else(|| short(data.len(), pixels))?;
            out.reshape(width, height, PixelFormat::Gray8).copy_from_slice(src);
        }
        FrameFormat::RAWRGB => {
            let src = data.get(..pixels * 3).ok_or_else(|| short(data.len(), pixels * 3))?;
            out.reshape(width, height, PixelFormat::Rgb8).copy_from_slice(src);
        }
        FrameFormat::RAWBGR => {
            let src = data.get(..pixels * 3).ok_or_else(|| short(data.len(), pixels * 3))?;
            let dst = out.reshape(width, height, PixelFormat::Rgb8);
            for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(3)) {
                d.copy_from_slice(&[s[2], s[1], s[0]]);
            }
        }
        FrameFormat::YUYV => {
            if data.len() < pixels * 2 {
                return Err(short(data.len(), pixels * 2));
            }
            let dst = out.reshape(width, height, PixelFormat::Rgb8);
            nokhwa::utils::buf_yuyv422_to_rgb(&data[..pixels * 2], dst, false).map_err(|e| e.to_string())?;
        }
        FrameFormat::NV12 => {
            let need = pixels * 3 / 2;
            if data.len() < need {
                return Err(short(data.len(), need));
            }
            let res = Resolution::new(width, height);
            let dst = out.reshape(width, height, PixelFormat::Rgb8);
            nokhwa::utils::buf_nv12_to_rgb(res, &data[..need], dst, false).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn short(got: usize, want: usize) -> String {
    format!("truncated frame: {got} bytes, expected {want}")
}

/// One line per camera nokhwa finds (`ganomalyd cameras`).
pub fn list_cameras() -> Result<Vec<String>, String> {
    let cams = nokhwa::query(nokhwa::utils::ApiBackend::Video4Linux).map_err(|e| e.to_string())?;
    Ok(cams
        .iter()
        .map(|c| {
            let idx = match c.index() {
                CameraIndex::Index(i) => format!("/dev/video{i}"),
                CameraIndex::String(s) => s.clone(),
            };
            format!("{idx}\t{}\t{}", c.human_name(), c.description())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_index_or_path() {
        assert_eq!(DeviceSpec::parse("2"), Ok(DeviceSpec::Index(2)));
        assert_eq!(DeviceSpec::parse(" /dev/video0 "), Ok(DeviceSpec::Path("/dev/video0".into())));
        assert!(DeviceSpec::parse("video0").unwrap_err().contains("video0"));
    }

    #[test]
    fn missing_devices_are_named_and_non_video_paths_refused() {
        let e = DeviceSpec::Index(93).resolve().unwrap_err();
        assert!(e.contains("/dev/video93"), "{e}");
        let e = DeviceSpec::Path("/dev/v4l/by-id/nope".into()).resolve().unwrap_err();
        assert!(e.contains("by-id/nope"), "{e}");
        let e = DeviceSpec::Path("/dev/null".into()).resolve().unwrap_err();
        assert!(e.contains("not a V4L2 device"), "{e}");
        assert_eq!(video_index(Path::new("/dev/video12")), Some(12));
    }

    #[test]
    fn format_names_map_to_nokhwa() {
        assert_eq!(frame_format("mjpeg"), Some(FrameFormat::MJPEG));
        assert_eq!(frame_format("yuyv"), Some(FrameFormat::YUYV));
        assert_eq!(frame_format("h264"), None);
        for (name, format) in FORMATS {
            assert_eq!(frame_format(name), Some(format), "{name}");
        }
    }

    #[test]
    fn conversions_produce_rgb_and_reject_truncated_frames() {
        let mut out = FrameData::default();
        convert(FrameFormat::RAWBGR, 1, 1, &[1, 2, 3], &mut out).expect("bgr");
        assert_eq!(out.data, vec![3, 2, 1]);
        convert(FrameFormat::GRAY, 2, 1, &[9, 8], &mut out).expect("gray");
        assert_eq!((out.format, out.data.clone()), (PixelFormat::Gray8, vec![9, 8]));
        // YUYV: Y=128 with neutral chroma is mid gray.
        convert(FrameFormat::YUYV, 2, 1, &[128, 128, 128, 128], &mut out).expect("yuyv");
        assert_eq!(out.data.len(), 6);
        assert!(out.data.iter().all(|&v| (120..=136).contains(&v)), "{:?}", out.data);
        assert!(convert(FrameFormat::RAWRGB, 2, 2, &[0; 5], &mut out).unwrap_err().contains("truncated"));
        assert!(convert(FrameFormat::MJPEG, 2, 2, b"garbage", &mut out).is_err());
        let mut jpeg = Vec::new();
        image::RgbImage::from_pixel(8, 4, image::Rgb([200, 10, 10]))
            .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .expect("encode");
        convert(FrameFormat::MJPEG, 8, 4, &jpeg, &mut out).expect("mjpeg");
        assert_eq!((out.width, out.height), (8, 4));
        assert!(out.data[0] > 150 && out.data[1] < 60);
    }
}
