//! A camera's `source = { kind = "..." }` table: the one enum that dispatches
//! to the source kinds, and what a compiled source offers the pipeline.
//!
//! Each kind owns its config in its own file (`v4l2.rs`, `replay.rs`, ...):
//! the TOML struct, its checks, and the plan it compiles into, which builds
//! the [`FrameSource`](super::FrameSource) on the camera thread. Adding a
//! kind is one file and one arm of [`SourceConfig`] (vector's
//! `SourceConfig::build`).

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{http_mjpeg, replay, synthetic, v4l2, SourceFactory};

/// Where frames come from, as written in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceConfig {
    V4l2(v4l2::V4l2Config),
    Replay(replay::ReplayConfig),
    Synthetic(synthetic::SyntheticConfig),
    #[serde(rename = "http-mjpeg")]
    HttpMjpeg(http_mjpeg::HttpMjpegConfig),
}

impl SourceConfig {
    /// The one place that knows every kind.
    fn kind_config(&self) -> &dyn CompileSource {
        match self {
            SourceConfig::V4l2(c) => c,
            SourceConfig::Replay(c) => c,
            SourceConfig::Synthetic(c) => c,
            SourceConfig::HttpMjpeg(c) => c,
        }
    }

    /// Checks the table (`p` is its dotted path, e.g. `cameras.line3.source`)
    /// and the world it names (device nodes, image files), pushing every
    /// problem; `None` when there was one.
    pub fn compile(&self, cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
        self.kind_config().compile(cam, p, problems)
    }

    /// Frame size when it is known before the first frame (for the ROI check).
    pub fn frame_size(&self, cam: &CameraContext) -> Option<(u32, u32)> {
        self.kind_config().frame_size(cam)
    }
}

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
    /// The config's `kind`.
    fn kind(&self) -> &'static str;
    /// Builds the source on the camera thread (some backends are thread-bound).
    fn factory(&self) -> SourceFactory;
}
