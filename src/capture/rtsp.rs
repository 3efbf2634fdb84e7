//! RTSP IP cameras (H.264, H.265, anything `decodebin` can decode) through
//! GStreamer: `rtspsrc ! decodebin ! videoconvert ! appsink`.
//!
//! `decodebin` picks the decoder by rank, so a hardware one (nvv4l2decoder,
//! vaapi, va) is used where its plugin is installed; the one in use is logged
//! and reported in `stats`. The URL's credentials are taken out of it at
//! compile time and handed to `rtspsrc` as `user-id`/`user-pw`: the location
//! GStreamer sees, logs and quotes in its errors has none. A 401 from the
//! camera is an open error that says so, retried with backoff like any other.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::limits::FrameLimits;
use super::plan::{CameraContext, CompileSource, SourcePlan};
use crate::base::check::between;

/// `source = { kind = "rtsp", url = "rtsp://...", transport = "tcp", latency_ms = 200 }`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtspConfig {
    /// `rtsp://[user:password@]host[:port]/path` (the password is never logged).
    pub url: String,
    /// `tcp` (RTP interleaved in the RTSP connection: through NAT and
    /// firewalls, no loss) or `udp` (lower latency on a clean network).
    #[serde(default = "default_transport")]
    pub transport: String,
    /// The jitter buffer: how long packets wait to be put in order.
    #[serde(default = "default_latency_ms")]
    pub latency_ms: u32,
    /// Seconds without a frame (or before the first one) after which the
    /// camera counts as lost and is reopened with backoff.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
}

fn default_transport() -> String {
    "tcp".into()
}
fn default_latency_ms() -> u32 {
    200
}
fn default_timeout_s() -> f64 {
    5.0
}

impl std::fmt::Debug for RtspConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtspConfig")
            .field("url", &crate::base::redact::url(&self.url))
            .field("transport", &self.transport)
            .field("latency_ms", &self.latency_ms)
            .field("timeout_s", &self.timeout_s)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// A checked RTSP camera: the URL split into its location and credentials.
#[derive(Clone, PartialEq)]
pub struct RtspPlan {
    /// The URL without user info.
    pub location: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub transport: Transport,
    pub latency_ms: u32,
    pub timeout: Duration,
    pub limits: FrameLimits,
}

impl std::fmt::Debug for RtspPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtspPlan")
            .field("location", &self.location)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("transport", &self.transport)
            .field("latency_ms", &self.latency_ms)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `url` as location + user + password, or what is wrong with it (without
/// quoting the password).
pub fn split_url(url: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let shown = crate::base::redact::url(url);
    let mut u = url::Url::parse(url).map_err(|e| format!("`{shown}` is not a URL: {e}"))?;
    if !matches!(u.scheme(), "rtsp" | "rtsps" | "rtspt") {
        return Err(format!("`{shown}` is not an rtsp:// URL"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{shown}` has no host"));
    }
    let decode = |s: &str| percent_decode(s);
    let user = (!u.username().is_empty()).then(|| decode(u.username()));
    let password = u.password().map(decode);
    // Both setters only fail for URLs that cannot have a host: not these.
    let _ = u.set_username("");
    let _ = u.set_password(None);
    Ok((u.to_string(), user, password))
}

/// `%40` → `@` and the like (a password with reserved characters is written
/// percent-encoded in a URL).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

impl CompileSource for RtspConfig {
    fn compile(&self, cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
        let before = problems.len();
        #[cfg(feature = "gstreamer")]
        if cam.probe {
            super::gst_engine::require_elements(
                &[
                    ("rtspsrc", "gstreamer1.0-plugins-good"),
                    ("decodebin", "gstreamer1.0-plugins-base"),
                    ("videoconvert", "gstreamer1.0-plugins-base"),
                    ("appsink", "gstreamer1.0-plugins-base"),
                ],
                &format!("{p}.kind"),
                problems,
            );
        }
        #[cfg(not(feature = "gstreamer"))]
        let _ = cam;
        let url = split_url(&self.url).map_err(|e| problems.push(format!("{p}.url: {e}"))).ok();
        let transport = match self.transport.as_str() {
            "tcp" => Some(Transport::Tcp),
            "udp" => Some(Transport::Udp),
            other => {
                problems.push(format!("{p}.transport: `{other}` is not one of tcp, udp"));
                None
            }
        };
        // Beyond 10 s a jitter buffer is a recording, not a live camera.
        between(problems, &format!("{p}.latency_ms"), f64::from(self.latency_ms), 0.0, 10_000.0, "");
        // The camera thread waits this long for a frame, and a stop waits for it.
        between(problems, &format!("{p}.timeout_s"), self.timeout_s, 0.5, 8.0, "");
        if problems.len() != before {
            return None;
        }
        let (location, user, password) = url?;
        let plan = RtspPlan {
            location,
            user,
            password,
            transport: transport?,
            latency_ms: self.latency_ms,
            timeout: Duration::from_secs_f64(self.timeout_s),
            limits: cam.limits,
        };
        super::plan::with_gstreamer(plan, p, "rtsp", problems)
    }
}

#[cfg(feature = "gstreamer")]
mod engine {
    use gst::prelude::*;

    use super::{RtspPlan, Transport};
    use crate::capture::gst_engine::{BusFault, GstSource, PipelineSpec};
    use crate::capture::{PixelFormat, SourceFactory, SourcePlan};

    /// Only the video stream goes to `decodebin` (a camera with a microphone
    /// offers audio too).
    const LAUNCH: &str =
        "rtspsrc name=src ! application/x-rtp,media=video ! decodebin ! videoconvert ! appsink name=ganomaly";

    fn explain(f: &BusFault) -> String {
        if f.resource == Some(gst::ResourceError::NotAuthorized) || f.debug.contains("401") {
            return format!(
                "the camera refused the credentials (RTSP 401 Unauthorized): check the user and password in `url` [{}]",
                f.plain()
            );
        }
        if f.debug.contains("404") {
            return format!(
                "the camera has no such stream (RTSP 404 Not Found): check the path in `url` [{}]",
                f.plain()
            );
        }
        f.plain()
    }

    impl RtspPlan {
        pub fn spec(&self) -> PipelineSpec {
            let plan = self.clone();
            PipelineSpec {
                label: format!("rtsp {}", self.location),
                launch: LAUNCH.into(),
                configure: Some(std::sync::Arc::new(move |pipeline: &gst::Pipeline| {
                    let src = pipeline.by_name("src").ok_or("no rtspsrc in the pipeline")?;
                    src.set_property("location", plan.location.as_str());
                    if let Some(u) = &plan.user {
                        src.set_property("user-id", u.as_str());
                    }
                    if let Some(pw) = &plan.password {
                        src.set_property("user-pw", pw.as_str());
                    }
                    let protocols = match plan.transport {
                        Transport::Tcp => "tcp",
                        Transport::Udp => "udp",
                    };
                    src.set_property_from_str("protocols", protocols);
                    src.set_property("latency", plan.latency_ms);
                    // Connect and UDP silence: the same patience as for a frame.
                    let us = plan.timeout.as_micros() as u64;
                    src.set_property("tcp-timeout", us);
                    src.set_property("timeout", us);
                    Ok(())
                })),
                formats: vec![PixelFormat::Rgb8],
                set_sync_false: true,
                timeout: self.timeout,
                explain,
                limits: self.limits,
            }
        }
    }

    impl SourcePlan for RtspPlan {
        fn factory(&self) -> SourceFactory {
            crate::capture::factory(GstSource::new(self.spec()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_and_keep_the_rest() {
        let (loc, user, pw) = split_url("rtsp://admin:p%40ss:w@10.0.0.5:8554/live/ch1?x=1").expect("url");
        assert_eq!(loc, "rtsp://10.0.0.5:8554/live/ch1?x=1");
        assert_eq!(user.as_deref(), Some("admin"));
        assert_eq!(pw.as_deref(), Some("p@ss:w"));
        let (loc, user, pw) = split_url("rtsp://cam.local/stream").expect("url");
        assert_eq!((loc.as_str(), user, pw), ("rtsp://cam.local/stream", None, None));
        let e = split_url("http://admin:hunter2@cam/x").unwrap_err();
        assert!(e.contains("not an rtsp:// URL") && !e.contains("hunter2"), "{e}");
        let e = split_url("rtsp://admin:hunter2@").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(percent_decode("a%2Fb%zz%"), "a/b%zz%");
    }

    #[test]
    fn every_problem_is_named() {
        let cfg = RtspConfig {
            url: "rtsp://u:hunter2@".into(),
            transport: "quic".into(),
            latency_ms: 60_000,
            timeout_s: 0.0,
        };
        let cam = CameraContext {
            camera: "cameras.c",
            base_dir: std::path::Path::new("/"),
            width: 64,
            height: 64,
            fps: 10.0,
            probe: false,
            limits: FrameLimits::default(),
        };
        let mut problems = Vec::new();
        assert!(cfg.compile(&cam, "cameras.c.source", &mut problems).is_none());
        let all = problems.join("\n");
        for field in ["source.url", "source.transport: `quic`", "source.latency_ms", "source.timeout_s"] {
            assert!(all.contains(field), "{field} missing in {all}");
        }
        assert!(!all.contains("hunter2"), "{all}");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
