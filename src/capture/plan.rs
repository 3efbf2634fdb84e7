//! What a source kind implements: its config compiles, once, into a plan
//! that builds the [`FrameSource`](super::FrameSource) on the camera thread.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::SourceFactory;

/// What a source may read of its camera's table (after `[defaults]` apply).
#[derive(Debug, Clone, Copy)]
pub struct CameraContext<'a> {
    /// Dotted path of the camera (`cameras.line3`), for problems with its own keys.
    pub camera: &'a str,
    /// Directory relative paths are resolved against (the config file's).
    pub base_dir: &'a Path,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    /// Look at the world the table names (device nodes, image files); off for
    /// `check-config --offline`, which checks a fleet's files on another machine.
    pub probe: bool,
}

/// One kind's config, compiled once into its plan.
pub trait CompileSource {
    fn compile(&self, cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>>;
    /// Frame size when it is known before the first frame; a replayed image's
    /// or a stream's is known only when it arrives.
    fn frame_size(&self, _cam: &CameraContext) -> Option<(u32, u32)> {
        None
    }
}

/// A checked, typed source: what the pipeline starts a camera thread with.
pub trait SourcePlan: Debug + Send + Sync {
    /// Builds the source on the camera thread (some backends are thread-bound).
    fn factory(&self) -> SourceFactory;
    /// The folder whose files the source reads, if any: the snapshot folder
    /// must not overlap it (retention deletes files there).
    fn reads_folder(&self) -> Option<PathBuf> {
        None
    }
}
