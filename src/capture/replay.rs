//! Replay source: images from a folder or a glob, in name order, optionally
//! looped. How tests feed known good and defect frames through the real
//! pipeline, and how an engineer re-runs a recorded incident.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::plan::{CameraContext, CompileSource, SourcePlan};
use super::{CaptureError, FrameData, FrameSource, PixelFormat, SourceFactory};

/// `source = { kind = "replay", path = "...", loop = true }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// A folder (every image in it this build decodes, png/jpg/jpeg, sorted
    /// by name) or a glob; relative to the config file's directory.
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
}

impl CompileSource for ReplayConfig {
    fn compile(&self, cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
        if self.path.trim().is_empty() {
            problems.push(format!("{p}.path: must not be empty"));
            return None;
        }
        let path = cam.base_dir.join(&self.path);
        if !cam.probe {
            return Some(Arc::new(ReplayPlan { path, looped: self.looped }));
        }
        let before = problems.len();
        match list_images(&path) {
            Ok(files) if files.is_empty() => {
                let skipped = undecodable(&path);
                let why = match skipped.first() {
                    Some(f) => format!(
                        "; {} file(s) like {} are in a format this build cannot decode",
                        skipped.len(),
                        f.display()
                    ),
                    None => String::new(),
                };
                problems.push(format!(
                    "{p}.path: no images this build decodes ({}) at {}{why}",
                    extensions().join(", "),
                    path.display()
                ));
            }
            Ok(files) => {
                // The first file's header is read, so that a folder of files
                // named .png that are not PNGs is refused here, not frame by frame.
                if let Err(e) = header(&files[0]) {
                    problems.push(format!("{p}.path: {}: {e}", files[0].display()));
                }
            }
            Err(e) => problems.push(format!("{p}.path: {e}")),
        }
        (problems.len() == before).then(|| Arc::new(ReplayPlan { path, looped: self.looped }) as Arc<dyn SourcePlan>)
    }
}

impl SourcePlan for ReplayPlan {
    fn factory(&self) -> SourceFactory {
        super::factory(ReplaySource::new(self.path.clone(), self.looped))
    }
    /// The folder, or the folder a glob's pattern starts in.
    fn reads_folder(&self) -> Option<PathBuf> {
        let fixed: PathBuf =
            self.path.components().take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '['])).collect();
        Some(if fixed == self.path && !self.path.is_dir() { self.path.parent()?.to_path_buf() } else { fixed })
    }
}

/// Whether this build's `image` crate decodes files named like `p` (its
/// features decide: png and jpeg here, so a `.bmp` or `.tif` would only ever
/// be a broken frame).
fn decodable(p: &Path) -> bool {
    image::ImageFormat::from_path(p).is_ok_and(|f| f.reading_enabled())
}

/// The extensions this build decodes, for messages.
fn extensions() -> Vec<&'static str> {
    image::ImageFormat::all().filter(|f| f.reading_enabled()).flat_map(|f| f.extensions_str().iter().copied()).collect()
}

/// The size the first file's header says, read without decoding the pixels.
fn header(file: &Path) -> Result<(u32, u32), String> {
    image::ImageReader::open(file)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

/// Every file `path` names, sorted, decodable or not.
fn list_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("cannot read folder {}: {e}", path.display()))?;
        let mut files: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
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

/// Files `path` names whose format this build cannot decode (a folder's
/// other files, such as notes, are ignored alike; they are named in the
/// message when nothing else is there).
fn undecodable(path: &Path) -> Vec<PathBuf> {
    list_files(path).unwrap_or_default().into_iter().filter(|f| !decodable(f) && f.extension().is_some()).collect()
}

/// The images `path` names, sorted: every file in a folder, or every file a
/// glob pattern matches, that this build can decode.
pub fn list_images(path: &Path) -> Result<Vec<PathBuf>, String> {
    Ok(list_files(path)?.into_iter().filter(|f| decodable(f)).collect())
}

/// Replays image files as frames.
#[derive(Debug, Clone)]
pub struct ReplaySource {
    path: PathBuf,
    files: Vec<PathBuf>,
    pos: usize,
    looped: bool,
}

impl ReplaySource {
    /// A source over `path` (folder or glob); the file list is read at `open`.
    pub fn new(path: PathBuf, looped: bool) -> Self {
        ReplaySource { path, files: Vec::new(), pos: 0, looped }
    }

    /// A source over an explicit list of files (tests, `score`).
    pub fn from_files(files: Vec<PathBuf>, looped: bool) -> Self {
        ReplaySource { path: PathBuf::new(), files, pos: 0, looped }
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
        let img = image::open(file).map_err(|e| CaptureError::BrokenFrame {
            source_name: format!("replay {}", file.display()),
            reason: e.to_string(),
        })?;
        // Gray images stay gray: a gray model then needs no conversion at all.
        let format = match img {
            image::DynamicImage::ImageLuma8(_) => PixelFormat::Gray8,
            _ => PixelFormat::Rgb8,
        };
        out.fill_from_image(&img, format);
        Ok(())
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
    fn only_formats_this_build_decodes_are_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.bmp"), b"BM").expect("write");
        std::fs::write(dir.path().join("b.tif"), b"II").expect("write");
        assert_eq!(list_images(dir.path()), Ok(Vec::new()), "png and jpeg only in this build");
        assert_eq!(undecodable(dir.path()).len(), 2);
        write_png(dir.path(), "c.PNG", 3);
        assert_eq!(list_images(dir.path()).map(|v| v.len()), Ok(1));
        assert!(extensions().contains(&"png") && extensions().contains(&"jpg") && !extensions().contains(&"bmp"));
        let plan = ReplayPlan { path: dir.path().join("*.png"), looped: true };
        assert_eq!(plan.reads_folder().as_deref(), Some(dir.path()));
        let plan = ReplayPlan { path: dir.path().to_path_buf(), looped: true };
        assert_eq!(plan.reads_folder().as_deref(), Some(dir.path()));
    }

    #[test]
    fn missing_path_is_an_error_naming_it() {
        let err = list_images(Path::new("/no/such/dir")).unwrap_err();
        assert!(err.contains("/no/such/dir"), "{err}");
        assert_eq!(list_images(Path::new("/no/such/*.png")).map(|v| v.len()), Ok(0));
    }
}
