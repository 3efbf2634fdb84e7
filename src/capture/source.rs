//! A camera's `source = { kind = "..." }` table: the one enum that dispatches
//! to the source kinds, and what a compiled source offers the pipeline.
//!
//! Each kind owns its config in its own file (`v4l2.rs`, `replay.rs`, ...):
//! the TOML struct, its checks, and the plan it compiles into (the traits
//! are in `plan.rs`), which builds the [`FrameSource`](super::FrameSource)
//! on the camera thread. Adding a kind is one file and one arm of
//! [`SourceConfig`] (vector's `SourceConfig::build`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::plan::{CameraContext, CompileSource, SourcePlan};
use super::{genicam, gstreamer, http_mjpeg, replay, rtsp, synthetic, v4l2};

/// Where frames come from, as written in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceConfig {
    V4l2(v4l2::V4l2Config),
    Replay(replay::ReplayConfig),
    Synthetic(synthetic::SyntheticConfig),
    #[serde(rename = "http-mjpeg")]
    HttpMjpeg(http_mjpeg::HttpMjpegConfig),
    Rtsp(rtsp::RtspConfig),
    Genicam(genicam::GenicamConfig),
    Gstreamer(gstreamer::GstreamerConfig),
}

impl SourceConfig {
    /// The one place that knows every kind.
    fn kind_config(&self) -> &dyn CompileSource {
        match self {
            SourceConfig::V4l2(c) => c,
            SourceConfig::Replay(c) => c,
            SourceConfig::Synthetic(c) => c,
            SourceConfig::HttpMjpeg(c) => c,
            SourceConfig::Rtsp(c) => c,
            SourceConfig::Genicam(c) => c,
            SourceConfig::Gstreamer(c) => c,
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
