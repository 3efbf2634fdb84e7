//! Replay source: images from a folder or a glob, in name order, optionally
//! looped. How tests feed known good and defect frames through the real
//! pipeline, and how an engineer re-runs a recorded incident.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::limits::FrameLimits;
use super::plan::{CameraContext, CompileSource, SourcePlan};
use super::{CaptureError, FrameData, FrameSource, SourceFactory};

/// `source = { kind = "replay", path = "...", loop = true }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// A folder (all png/jpg/jpeg/bmp files in it, sorted by name) or a glob;
    /// relative to the config file's directory.
    pub path: String,
    /// Start again at the first image after the last one.
    #[serde(default = "yes", rename = "loop")]
    pub looped: bool,
}

fn yes() -> bool {
    true
}

/// A checked replay source: an absolute folder or glob that holds images.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayPlan {
    pub path: PathBuf,
    pub looped: bool,
    pub limits: FrameLimits,
}

impl CompileSource for ReplayConfig {
    fn compile(&self, cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
        if self.path.trim().is_empty() {
            problems.push(format!("{p}.path: must not be empty"));
            return None;
        }
        let path = cam.base_dir.join(&self.path);
        if !cam.probe {
            return Some(Arc::new(ReplayPlan { path, looped: self.looped, limits: cam.limits }));
        }
        match list_images(&path) {
            Ok(files) if files.is_empty() => {
                problems.push(format!("{p}.path: no images (png, jpg, jpeg, bmp) at {}", path.display()));
                None
            }
            Ok(_) => Some(Arc::new(ReplayPlan { path, looped: self.looped, limits: cam.limits })),
            Err(e) => {
                problems.push(format!("{p}.path: {e}"));
                None
            }
        }
    }
}

impl SourcePlan for ReplayPlan {
    fn factory(&self) -> SourceFactory {
        super::factory(ReplaySource::new(self.path.clone(), self.looped).with_limits(self.limits))
    }
}

/// Image file extensions a folder is scanned for.
const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "bmp"];

/// The images `path` names, sorted: every image file in a folder, or every
/// file a glob pattern matches.
pub fn list_images(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("cannot read folder {}: {e}", path.display()))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
            })
            .collect();
        files.sort();
        return Ok(files);
    }
    let text = path.to_string_lossy();
    if !text.contains(['*', '?', '[']) {
        return Err(format!("{} does not exist", path.display()));
    }
    let paths = glob::glob(&text).map_err(|e| format!("`{text}` is not a valid glob: {e}"))?;
    let mut files: Vec<PathBuf> = paths.filter_map(Result::ok).filter(|p| p.is_file()).collect();
    files.sort();
    Ok(files)
}

/// Replays image files as frames.
#[derive(Debug, Clone)]
pub struct ReplaySource {
    path: PathBuf,
    files: Vec<PathBuf>,
    pos: usize,
    looped: bool,
    limits: FrameLimits,
}

impl ReplaySource {
    /// A source over `path` (folder or glob); the file list is read at `open`.
    pub fn new(path: PathBuf, looped: bool) -> Self {
        ReplaySource { path, files: Vec::new(), pos: 0, looped, limits: FrameLimits::DEFAULT }
    }

    /// The camera's frame limits (the built-in defaults otherwise).
    pub fn with_limits(mut self, limits: FrameLimits) -> Self {
        self.limits = limits;
        self
    }

    /// A source over an explicit list of files (tests, `score`).
    pub fn from_files(files: Vec<PathBuf>, looped: bool) -> Self {
        ReplaySource { path: PathBuf::new(), files, pos: 0, looped, limits: FrameLimits::DEFAULT }
    }
}

impl FrameSource for ReplaySource {
    fn describe(&self) -> String {
        format!("replay {}", self.path.display())
    }

    fn open(&mut self) -> Result<(), CaptureError> {
        if !self.path.as_os_str().is_empty() {
            // Re-listed on every open, so a folder fixed while the camera was
            // offline is picked up; position kept when the list still fits.
            self.files = list_images(&self.path)
                .map_err(|reason| CaptureError::Open { source_name: self.describe(), reason })?;
        }
        if self.files.is_empty() {
            return Err(CaptureError::Open { source_name: self.describe(), reason: "no images".into() });
        }
        if self.pos > self.files.len() {
            self.pos = 0;
        }
        Ok(())
    }

    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        if self.pos >= self.files.len() {
            if !self.looped || self.files.is_empty() {
                return Err(CaptureError::Ended(self.describe()));
            }
            self.pos = 0;
        }
        let file = &self.files[self.pos];
        self.pos += 1;
        // Gray images stay gray: a gray model then needs no conversion at all.
        super::decode::image_file(file, &self.limits, out).map_err(|e| CaptureError::BrokenFrame {
            source_name: format!("replay {}", file.display()),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(dir: &Path, name: &str, v: u8) {
        image::RgbImage::from_pixel(4, 4, image::Rgb([v, v, v])).save(dir.join(name)).expect("write png");
    }

    #[test]
    fn folder_is_replayed_in_name_order_and_looped() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_png(dir.path(), "b.png", 2);
        write_png(dir.path(), "a.png", 1);
        std::fs::write(dir.path().join("notes.txt"), "x").expect("write");
        let mut src = ReplaySource::new(dir.path().into(), true);
        src.open().expect("open");
        let mut fd = FrameData::default();
        let mut seen = Vec::new();
        for _ in 0..3 {
            src.next_frame(&mut fd).expect("frame");
            seen.push(fd.data[0]);
        }
        assert_eq!(seen, vec![1, 2, 1]);
    }

    #[test]
    fn unlooped_replay_ends_and_broken_files_are_reported_as_broken() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_png(dir.path(), "a.png", 1);
        std::fs::write(dir.path().join("b.png"), b"not a png").expect("write");
        let mut src = ReplaySource::new(dir.path().join("*.png"), false);
        src.open().expect("open");
        let mut fd = FrameData::default();
        assert!(src.next_frame(&mut fd).is_ok());
        assert!(matches!(src.next_frame(&mut fd), Err(CaptureError::BrokenFrame { .. })));
        assert!(matches!(src.next_frame(&mut fd), Err(CaptureError::Ended(_))));
    }

    #[test]
    fn missing_path_is_an_error_naming_it() {
        let err = list_images(Path::new("/no/such/dir")).unwrap_err();
        assert!(err.contains("/no/such/dir"), "{err}");
        assert_eq!(list_images(Path::new("/no/such/*.png")).map(|v| v.len()), Ok(0));
    }
}
