//! Any GStreamer pipeline that ends in `appsink name=ganomaly`: files,
//! `v4l2src` with hardware conversion, `nvarguscamerasrc`, a stream this
//! daemon has no kind for. The pipeline is the user's, as written; the engine
//! (`gst_engine.rs`) asks its appsink for RGB or gray frames when the appsink
//! has no caps of its own, and treats end of stream and errors as a lost
//! camera like every source.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::limits::FrameLimits;
use super::plan::{CameraContext, CompileSource, SourcePlan};
use super::PixelFormat;
use crate::base::check::between;

/// `source = { kind = "gstreamer", pipeline = "... ! videoconvert ! appsink name=ganomaly" }`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GstreamerConfig {
    /// A `gst-launch-1.0` line ending in `appsink name=ganomaly`.
    pub pipeline: String,
    /// `rgb` or `gray`: what the appsink is asked for when the pipeline does
    /// not set its caps (put `videoconvert` before it).
    #[serde(default = "default_format")]
    pub format: String,
    /// Seconds without a frame (or before the first one) after which the
    /// camera counts as lost and the pipeline is restarted with backoff.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
}

fn default_format() -> String {
    "rgb".into()
}
fn default_timeout_s() -> f64 {
    5.0
}

/// Debug with any URL's credentials hidden (a pipeline may hold an rtsp:// URL).
impl std::fmt::Debug for GstreamerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GstreamerConfig")
            .field("pipeline", &crate::base::redact::text(&self.pipeline))
            .field("format", &self.format)
            .field("timeout_s", &self.timeout_s)
            .finish()
    }
}

/// A checked pipeline.
#[derive(Clone, PartialEq)]
pub struct GstreamerPlan {
    pub pipeline: String,
    pub format: PixelFormat,
    pub timeout: Duration,
    pub limits: FrameLimits,
}

impl std::fmt::Debug for GstreamerPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GstreamerPlan")
            .field("pipeline", &crate::base::redact::text(&self.pipeline))
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The config's colour names.
pub fn pixel_format(name: &str) -> Option<PixelFormat> {
    match name {
        "rgb" => Some(PixelFormat::Rgb8),
        "gray" => Some(PixelFormat::Gray8),
        _ => None,
    }
}

impl CompileSource for GstreamerConfig {
    fn compile(&self, cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
        let before = problems.len();
        let format = pixel_format(&self.format);
        if format.is_none() {
            problems.push(format!("{p}.format: `{}` is not one of rgb, gray", self.format));
        }
        between(problems, &format!("{p}.timeout_s"), self.timeout_s, 0.5, 8.0, "");
        let line = self.pipeline.trim();
        if line.is_empty() {
            problems.push(format!("{p}.pipeline: must not be empty"));
        } else if !line.contains("appsink") || !line.contains("name=ganomaly") {
            problems
                .push(format!("{p}.pipeline: must end in `appsink name=ganomaly` (where the daemon takes its frames)"));
        } else if cam.probe {
            // The elements exist (a missing plugin is named now, not at run).
            #[cfg(feature = "gstreamer")]
            if let Err(e) = probe(line) {
                problems.push(format!("{p}.pipeline: {}", crate::base::redact::text(&e)));
            }
        }
        if problems.len() != before {
            return None;
        }
        let plan = GstreamerPlan {
            pipeline: line.to_string(),
            format: format?,
            timeout: Duration::from_secs_f64(self.timeout_s),
            limits: cam.limits,
        };
        super::plan::with_gstreamer(plan, p, "gstreamer", problems)
    }
}

/// Parses the line (creating its elements, starting nothing).
#[cfg(feature = "gstreamer")]
fn probe(line: &str) -> Result<(), String> {
    use gst::prelude::*;
    super::gst_engine::init().map_err(|e| e.to_string())?;
    let element = gst::parse::launch(line).map_err(|e| e.to_string())?;
    let bin = element.downcast::<gst::Bin>().map_err(|_| "a single element, not a pipeline ending in an appsink")?;
    match bin.by_name(super::gst_engine::APPSINK_NAME) {
        Some(e) if e.factory().is_some_and(|f| f.name() == "appsink") => Ok(()),
        Some(_) => Err("the element named `ganomaly` is not an appsink".into()),
        None => Err("no appsink named `ganomaly`".into()),
    }
}

#[cfg(feature = "gstreamer")]
impl SourcePlan for GstreamerPlan {
    fn factory(&self) -> super::SourceFactory {
        use super::gst_engine::{explain_plain, GstSource, PipelineSpec};
        let spec = PipelineSpec {
            label: format!("gstreamer {}", crate::base::redact::text(&self.pipeline)),
            launch: self.pipeline.clone(),
            configure: None,
            formats: vec![self.format],
            set_sync_false: false,
            timeout: self.timeout,
            explain: explain_plain,
            limits: self.limits,
        };
        super::factory(GstSource::new(spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(cfg: &GstreamerConfig, probe: bool) -> (bool, Vec<String>) {
        let cam = CameraContext {
            camera: "cameras.c",
            base_dir: std::path::Path::new("/"),
            width: 64,
            height: 64,
            fps: 10.0,
            probe,
            limits: FrameLimits::default(),
        };
        let mut problems = Vec::new();
        let ok = cfg.compile(&cam, "cameras.c.source", &mut problems).is_some();
        (ok, problems)
    }

    #[test]
    fn a_pipeline_without_the_appsink_or_with_a_bad_format_is_refused() {
        let cfg = GstreamerConfig { pipeline: "videotestsrc ! fakesink".into(), format: "yuv".into(), timeout_s: 5.0 };
        let (ok, problems) = compile(&cfg, false);
        assert!(!ok);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("format: `yuv`"));
        assert!(problems[1].contains("appsink name=ganomaly"));
    }

    #[cfg(feature = "gstreamer")]
    #[test]
    fn probing_names_a_missing_element_and_passes_a_good_line() {
        let cfg = GstreamerConfig {
            pipeline: "videotestsrc ! nosuchconverter ! appsink name=ganomaly".into(),
            format: "rgb".into(),
            timeout_s: 5.0,
        };
        let (ok, problems) = compile(&cfg, true);
        assert!(!ok && problems[0].contains("nosuchconverter"), "{problems:?}");
        let cfg = GstreamerConfig { pipeline: "videotestsrc ! videoconvert ! appsink name=ganomaly".into(), ..cfg };
        let (ok, problems) = compile(&cfg, true);
        assert!(ok, "{problems:?}");
    }

    #[cfg(not(feature = "gstreamer"))]
    #[test]
    fn a_build_without_gstreamer_refuses_the_kind_by_name() {
        let cfg = GstreamerConfig {
            pipeline: "videotestsrc ! videoconvert ! appsink name=ganomaly".into(),
            format: "rgb".into(),
            timeout_s: 5.0,
        };
        let (ok, problems) = compile(&cfg, true);
        assert!(!ok);
        assert!(
            problems[0].contains("`gstreamer` reads through GStreamer") && problems[0].contains("built without it"),
            "{problems:?}"
        );
    }
}
