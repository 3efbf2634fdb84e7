//! GenICam machine-vision cameras (GigE Vision, USB3 Vision) through Aravis's
//! GStreamer element: `aravissrc ! caps ! [bayer2rgb] ! videoconvert ! appsink`.
//!
//! The camera's `width`, `height` and `fps` and the `pixel_format` go into the
//! caps, which `aravissrc` sets on the camera (Width, Height,
//! AcquisitionFrameRate, PixelFormat); every other setting is a GenICam
//! feature by its name (`ExposureTime`, `Gain`, ...) in `features`, written by
//! Aravis after the caps. A feature the camera lacks fails the open with its
//! name ("the camera has no GenICam feature `Gain`"), so a config written for
//! another camera model is refused, not half applied. Mono frames stay gray,
//! Bayer and RGB arrive as RGB; preprocessing converts to the model's colour
//! mode. Cameras are found by Aravis's discovery (`arv-tool-0.8`, Debian's
//! `aravis-tools-cli`), which `ganomalyd cameras` lists.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::limits::FrameLimits;
use super::plan::{CameraContext, CompileSource, SourcePlan};
use super::PixelFormat;
use crate::base::check::between;

/// `source = { kind = "genicam", camera = "...", pixel_format = "bayer_rggb", features = { ExposureTime = 2000.0 } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenicamConfig {
    /// Aravis's device id (`Basler-21234567`, as `ganomalyd cameras` lists it)
    /// or the camera's IP address. With neither this nor `serial`: the first
    /// camera found.
    #[serde(default)]
    pub camera: Option<String>,
    /// The serial number alone (`21234567`): the camera whose id ends in it.
    #[serde(default)]
    pub serial: Option<String>,
    /// `mono8`, `rgb8`, `bayer_rggb`, `bayer_bggr`, `bayer_grbg`, `bayer_gbrg`.
    #[serde(default = "default_pixel_format")]
    pub pixel_format: String,
    /// GenICam features by name, set after the format: numbers, booleans or
    /// enumeration entries (`ExposureAuto = "Off"`).
    #[serde(default)]
    pub features: BTreeMap<String, FeatureValue>,
    /// Seconds without a frame (or before the first one) after which the
    /// camera counts as lost and is reopened with backoff.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
}

fn default_pixel_format() -> String {
    "mono8".into()
}
fn default_timeout_s() -> f64 {
    5.0
}

/// A feature's value as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeatureValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl std::fmt::Display for FeatureValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FeatureValue::Bool(b) => write!(f, "{b}"),
            FeatureValue::Int(i) => write!(f, "{i}"),
            FeatureValue::Float(x) => write!(f, "{x}"),
            FeatureValue::Text(s) => f.write_str(s),
        }
    }
}

/// The pixel formats the config names: GStreamer caps, and whether Bayer.
const PIXEL_FORMATS: [(&str, &str, &str); 6] = [
    ("mono8", "video/x-raw", "GRAY8"),
    ("rgb8", "video/x-raw", "RGB"),
    ("bayer_rggb", "video/x-bayer", "rggb"),
    ("bayer_bggr", "video/x-bayer", "bggr"),
    ("bayer_grbg", "video/x-bayer", "grbg"),
    ("bayer_gbrg", "video/x-bayer", "gbrg"),
];

/// Features the caps set: written in `features` they would fight the caps.
const SET_BY_CAPS: [(&str, &str); 4] =
    [("PixelFormat", "pixel_format"), ("Width", "width"), ("Height", "height"), ("AcquisitionFrameRate", "fps")];

/// How the camera is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraSelector {
    First,
    /// Device id or address, as Aravis opens it.
    Name(String),
    Serial(String),
}

/// A checked GenICam camera.
#[derive(Debug, Clone, PartialEq)]
pub struct GenicamPlan {
    pub camera: CameraSelector,
    /// `video/x-raw`/`video/x-bayer` and its format.
    pub media: &'static str,
    pub format: &'static str,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    /// `Name=value` pairs for aravissrc's `features`.
    pub features: Vec<(String, String)>,
    pub timeout: Duration,
    pub limits: FrameLimits,
}

impl GenicamPlan {
    /// What the appsink gets: mono stays gray.
    pub fn output(&self) -> PixelFormat {
        if self.format == "GRAY8" {
            PixelFormat::Gray8
        } else {
            PixelFormat::Rgb8
        }
    }

    /// The launch line (no value in it comes from outside but numbers and the
    /// format names above; the camera name is set as a property).
    pub fn launch(&self) -> String {
        let (num, den) = fraction(self.fps);
        let caps = format!(
            "{},format={},width={},height={},framerate={num}/{den}",
            self.media, self.format, self.width, self.height
        );
        let debayer = if self.media == "video/x-bayer" { "bayer2rgb ! " } else { "" };
        format!("aravissrc name=src ! {caps} ! {debayer}videoconvert ! appsink name=ganomaly")
    }
}

/// `fps` as a fraction GStreamer takes (millihertz resolution).
fn fraction(fps: f64) -> (u64, u64) {
    let milli = (fps * 1000.0).round() as u64;
    if milli % 1000 == 0 {
        (milli / 1000, 1)
    } else {
        (milli, 1000)
    }
}

/// A GenICam feature name (SFNC names are letters, digits and underscores).
fn valid_feature_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl CompileSource for GenicamConfig {
    fn compile(&self, cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
        let before = problems.len();
        let camera = match (&self.camera, &self.serial) {
            (Some(_), Some(_)) => {
                problems.push(format!("{p}: give `camera` or `serial`, not both"));
                None
            }
            (Some(c), None) if c.trim().is_empty() => {
                problems.push(format!("{p}.camera: must not be empty"));
                None
            }
            (None, Some(s)) if s.trim().is_empty() => {
                problems.push(format!("{p}.serial: must not be empty"));
                None
            }
            (Some(c), None) => Some(CameraSelector::Name(c.trim().to_string())),
            (None, Some(s)) => Some(CameraSelector::Serial(s.trim().to_string())),
            (None, None) => Some(CameraSelector::First),
        };
        let format = PIXEL_FORMATS.iter().find(|f| f.0 == self.pixel_format);
        if format.is_none() {
            let names: Vec<&str> = PIXEL_FORMATS.iter().map(|f| f.0).collect();
            problems.push(format!("{p}.pixel_format: `{}` is not one of {}", self.pixel_format, names.join(", ")));
        }
        let mut features = Vec::new();
        for (name, value) in &self.features {
            let field = format!("{p}.features.{name}");
            if let Some((_, key)) = SET_BY_CAPS.iter().find(|(f, _)| f == name) {
                problems.push(format!("{field}: set by the camera's `{key}`, not as a feature"));
            } else if !valid_feature_name(name) {
                problems.push(format!("{field}: not a GenICam feature name (letters, digits, `_`)"));
            } else if matches!(value, FeatureValue::Text(t) if t.is_empty() || t.contains(|c: char| c.is_whitespace() || c == '='))
            {
                problems.push(format!("{field}: an enumeration entry is one word (got `{value}`)"));
            } else if matches!(value, FeatureValue::Float(x) if !x.is_finite()) {
                problems.push(format!("{field}: must be a finite number"));
            } else {
                features.push((name.clone(), value.to_string()));
            }
        }
        if cam.fps <= 0.0 {
            problems.push(format!("{}.fps: a GenICam camera needs a frame rate", cam.camera));
        }
        between(problems, &format!("{p}.timeout_s"), self.timeout_s, 0.5, 8.0, "");
        if problems.len() != before {
            return None;
        }
        let (_, media, format) = *format?;
        #[cfg(feature = "gstreamer")]
        if cam.probe {
            let mut needed = vec![("aravissrc", "libaravis-0.8-0"), ("videoconvert", "gstreamer1.0-plugins-base")];
            if media == "video/x-bayer" {
                needed.push(("bayer2rgb", "gstreamer1.0-plugins-bad"));
            }
            super::gst_engine::require_elements(&needed, &format!("{p}.kind"), problems);
            if problems.len() != before {
                return None;
            }
        }
        let plan = GenicamPlan {
            camera: camera?,
            media,
            format,
            width: cam.width,
            height: cam.height,
            fps: cam.fps,
            features,
            timeout: Duration::from_secs_f64(self.timeout_s),
            limits: cam.limits,
        };
        super::plan::with_gstreamer(plan, p, "genicam", problems)
    }

    fn frame_size(&self, cam: &CameraContext) -> Option<(u32, u32)> {
        Some((cam.width, cam.height))
    }
}

/// One camera Aravis's discovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The device id Aravis opens it by (`Aravis-Fake-GV01`).
    pub id: String,
    /// Its address (`192.168.1.20`) or USB bus.
    pub address: String,
}

/// The discovery tool of Debian's `aravis-tools-cli`.
pub const ARV_TOOL: &str = "arv-tool-0.8";

/// Cameras on this machine's interfaces, as `arv-tool-0.8` lists them
/// (`Aravis-Fake-GV01 (127.0.0.1)` per line).
pub fn discover() -> Result<Vec<Discovered>, String> {
    let out = std::process::Command::new(ARV_TOOL)
        .output()
        .map_err(|e| format!("cannot run {ARV_TOOL} (Debian package aravis-tools-cli): {e}"))?;
    if !out.status.success() {
        return Err(format!("{ARV_TOOL} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(parse_discovery(&String::from_utf8_lossy(&out.stdout)))
}

/// `ID (ADDRESS)` lines; anything else (`No device found`) is skipped.
pub fn parse_discovery(text: &str) -> Vec<Discovered> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (id, rest) = l.rsplit_once(" (")?;
            let address = rest.strip_suffix(')')?;
            (!id.is_empty() && !id.contains(' '))
                .then(|| Discovered { id: id.to_string(), address: address.to_string() })
        })
        .collect()
}

/// The device id of the camera whose id ends in `-serial`.
pub fn by_serial<'a>(found: &'a [Discovered], serial: &str) -> Option<&'a Discovered> {
    found.iter().find(|d| d.id.rsplit('-').next() == Some(serial))
}

#[cfg(feature = "gstreamer")]
mod engine {
    use gst::prelude::*;

    use super::{by_serial, discover, CameraSelector, GenicamPlan};
    use crate::capture::gst_engine::{BusFault, GstSource, PipelineSpec};
    use crate::capture::{SourceFactory, SourcePlan};

    /// Aravis says "[Name] Not found" for a feature the camera lacks.
    pub fn missing_feature(text: &str) -> Option<&str> {
        let end = text.find("] Not found")?;
        let start = text[..end].rfind('[')?;
        Some(&text[start + 1..end])
    }

    fn explain(f: &BusFault) -> String {
        if let Some(name) = missing_feature(&f.message) {
            return format!("the camera has no GenICam feature `{name}` (remove it from `features`, or check its name with `arv-tool-0.8 features`)");
        }
        if f.message.contains("Could not find camera") {
            return format!("{} (`ganomalyd cameras` lists the cameras found)", f.message);
        }
        f.plain()
    }

    impl GenicamPlan {
        pub fn spec(&self) -> PipelineSpec {
            let camera = self.camera.clone();
            let features = self.features.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
            let label = match &self.camera {
                CameraSelector::First => "genicam (first camera)".to_string(),
                CameraSelector::Name(n) => format!("genicam {n}"),
                CameraSelector::Serial(s) => format!("genicam serial {s}"),
            };
            PipelineSpec {
                label,
                launch: self.launch(),
                configure: Some(std::sync::Arc::new(move |pipeline: &gst::Pipeline| {
                    let src = pipeline.by_name("src").ok_or("no aravissrc in the pipeline")?;
                    let name = match &camera {
                        CameraSelector::First => None,
                        CameraSelector::Name(n) => Some(n.clone()),
                        // Resolved at each open: the camera may have come up since.
                        CameraSelector::Serial(s) => {
                            let found = discover()?;
                            Some(
                                by_serial(&found, s)
                                    .ok_or_else(|| {
                                        format!("no camera with serial `{s}` found (`ganomalyd cameras` lists them)")
                                    })?
                                    .id
                                    .clone(),
                            )
                        }
                    };
                    if let Some(n) = name {
                        src.set_property("camera-name", n);
                    }
                    if !features.is_empty() {
                        src.set_property("features", features.as_str());
                    }
                    Ok(())
                })),
                formats: vec![self.output()],
                set_sync_false: true,
                timeout: self.timeout,
                explain,
                limits: self.limits,
            }
        }
    }

    impl SourcePlan for GenicamPlan {
        fn factory(&self) -> SourceFactory {
            crate::capture::factory(GstSource::new(self.spec()))
        }
    }

    #[cfg(test)]
    #[test]
    fn the_missing_feature_is_read_from_aravis_message() {
        assert_eq!(missing_feature("Could not set caps on camera \"X\": [Gain] Not found"), Some("Gain"));
        assert_eq!(missing_feature("Internal data stream error."), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cam(fps: f64) -> CameraContext<'static> {
        CameraContext {
            camera: "cameras.g",
            base_dir: std::path::Path::new("/"),
            width: 64,
            height: 48,
            fps,
            probe: false,
            limits: FrameLimits::default(),
        }
    }

    #[test]
    fn a_good_table_compiles_to_caps_and_features() {
        let cfg: GenicamConfig = toml::from_str(
            r#"serial = "GV01"
               pixel_format = "bayer_rggb"
               features = { ExposureTimeAbs = 2000.5, TestRegister = 3, ReverseX = true, ExposureAuto = "Off" }"#,
        )
        .expect("toml");
        let mut problems = Vec::new();
        let plan = cfg.compile(&cam(12.5), "cameras.g.source", &mut problems);
        if cfg!(feature = "gstreamer") {
            assert!(problems.is_empty() && plan.is_some(), "{problems:?}");
        } else {
            assert!(problems.len() == 1 && problems[0].contains("built without it"), "{problems:?}");
        }
        let p = GenicamPlan {
            camera: CameraSelector::Serial("GV01".into()),
            media: "video/x-bayer",
            format: "rggb",
            width: 64,
            height: 48,
            fps: 12.5,
            features: vec![],
            timeout: Duration::from_secs(5),
            limits: FrameLimits::default(),
        };
        assert_eq!(
            p.launch(),
            "aravissrc name=src ! video/x-bayer,format=rggb,width=64,height=48,framerate=12500/1000 ! bayer2rgb ! videoconvert ! appsink name=ganomaly"
        );
        assert_eq!(p.output(), PixelFormat::Rgb8);
        assert_eq!(fraction(15.0), (15, 1));
    }

    #[test]
    fn every_problem_is_named() {
        let cfg: GenicamConfig = toml::from_str(
            r#"camera = "a"
               serial = "b"
               pixel_format = "yuv"
               timeout_s = 100
               features = { PixelFormat = "Mono8", "Bad Name" = 1, ExposureAuto = "Off now" }"#,
        )
        .expect("toml");
        let mut problems = Vec::new();
        assert!(cfg.compile(&cam(0.0), "cameras.g.source", &mut problems).is_none());
        let all = problems.join("\n");
        for needle in [
            "`camera` or `serial`, not both",
            "pixel_format: `yuv`",
            "features.PixelFormat: set by the camera's `pixel_format`",
            "features.Bad Name: not a GenICam feature name",
            "features.ExposureAuto: an enumeration entry is one word",
            "cameras.g.fps",
            "timeout_s",
        ] {
            assert!(all.contains(needle), "{needle} missing in:\n{all}");
        }
        assert_eq!(problems.len(), 7, "{all}");
    }

    #[test]
    fn discovery_lines_and_serials() {
        let found =
            parse_discovery("Aravis-Fake-GV01 (127.0.0.1)\nBasler-acA1300-21234567 (192.168.3.4)\nNo device found\n");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0], Discovered { id: "Aravis-Fake-GV01".into(), address: "127.0.0.1".into() });
        assert_eq!(by_serial(&found, "21234567").map(|d| d.id.as_str()), Some("Basler-acA1300-21234567"));
        assert_eq!(by_serial(&found, "GV0"), None);
    }
}
