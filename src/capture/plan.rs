//! What a source kind implements: its config compiles, once, into a plan
//! that builds the [`FrameSource`](super::FrameSource) on the camera thread.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::limits::FrameLimits;
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
    /// What one frame may cost (`limits`, over `[defaults].limits`): every
    /// source applies them before it allocates for a frame.
    pub limits: FrameLimits,
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

/// A plan of a kind that runs on GStreamer (`rtsp`, `genicam`, `gstreamer`).
#[cfg(feature = "gstreamer")]
pub fn with_gstreamer<P: SourcePlan + 'static>(
    plan: P,
    _p: &str,
    _kind: &str,
    _problems: &mut Vec<String>,
) -> Option<Arc<dyn SourcePlan>> {
    Some(Arc::new(plan))
}

/// In a build without GStreamer, the problem that says so: check-config
/// refuses what `run` could not start.
#[cfg(not(feature = "gstreamer"))]
pub fn with_gstreamer<P>(_plan: P, p: &str, kind: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
    problems.push(format!(
        "{p}.kind: `{kind}` reads through GStreamer, and this ganomalyd was built without it (cargo feature `gstreamer`)"
    ));
    None
}
