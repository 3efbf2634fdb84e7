//! HTTP MJPEG source: the `multipart/x-mixed-replace` JPEG stream that IP
//! cameras (and `mjpg-streamer`, `ffmpeg`, OctoPrint...) serve over plain HTTP.
//!
//! HTTP itself is ureq's; reading the parts of the stream is
//! [`multipart`](super::multipart)'s, and decoding them [`decode`](super::decode)'s,
//! both within the camera's `limits`. A part that is not a decodable JPEG, or
//! is over the limits, is a broken frame (counted and skipped by the camera
//! thread); a stream that ends, stalls past `timeout_s`, or completes no part
//! within `2 × timeout_s` (a stream trickling a byte at a time inside a part
//! included) is a lost camera (offline, reopened with backoff). The camera
//! paces itself: frames are read as they arrive.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::limits::FrameLimits;
use super::multipart::{boundary_of, PartError, PartReader};
use super::plan::{CameraContext, CompileSource, SourcePlan};
use super::{CaptureError, FrameData, FrameSource, SourceFactory};
use crate::base::check::between;

/// `source = { kind = "http-mjpeg", url = "http://...", timeout_s = 5 }`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMjpegConfig {
    /// `http://host[:port]/path`; `http://user:password@host/...` for basic
    /// authentication (the password is never logged).
    pub url: String,
    /// Seconds to resolve, connect, and the longest silence inside the stream,
    /// before the camera counts as lost and is reopened with backoff (at most 8:
    /// a stop waits for a blocked read). A stream that sends no complete part for
    /// twice this long is lost too.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
}

fn default_timeout_s() -> f64 {
    5.0
}

/// Debug without the password.
impl std::fmt::Debug for HttpMjpegConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMjpegConfig").field("url", &redact(&self.url)).field("timeout_s", &self.timeout_s).finish()
    }
}

/// A checked MJPEG source.
#[derive(Clone, PartialEq)]
pub struct HttpMjpegPlan {
    pub url: String,
    pub timeout: Duration,
    pub limits: FrameLimits,
}

impl std::fmt::Debug for HttpMjpegPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMjpegPlan")
            .field("url", &redact(&self.url))
            .field("timeout", &self.timeout)
            .field("limits", &self.limits)
            .finish()
    }
}

impl CompileSource for HttpMjpegConfig {
    fn compile(&self, cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
        let before = problems.len();
        let shown = redact(&self.url);
        // Parsed as the URL standard says (what ureq will connect to); the
        // message shows the URL without its user info, and not url's error
        // text, which could quote it.
        match url::Url::parse(&self.url) {
            Ok(u) if u.scheme() == "http" && u.host_str().is_some_and(|h| !h.is_empty()) => {}
            Ok(u) if u.scheme() == "https" => problems.push(format!(
                "{p}.url: `{shown}`: https is not supported (cameras on a plant network serve plain http; put a TLS proxy in front otherwise)"
            )),
            Ok(_) => problems.push(format!("{p}.url: `{shown}` is not an http:// URL with a host")),
            Err(e) => problems.push(format!("{p}.url: `{shown}` is not an http:// URL ({e})")),
        }
        // A read blocks the camera thread for up to timeout_s, and shutdown
        // waits for it: kept well below systemd's TimeoutStopSec (20 s).
        between(problems, &format!("{p}.timeout_s"), self.timeout_s, 0.1, 8.0, "");
        (problems.len() == before).then(|| {
            Arc::new(HttpMjpegPlan {
                url: self.url.clone(),
                timeout: Duration::from_secs_f64(self.timeout_s),
                limits: cam.limits,
            }) as Arc<dyn SourcePlan>
        })
    }
}

impl SourcePlan for HttpMjpegPlan {
    fn factory(&self) -> SourceFactory {
        super::factory(HttpMjpegSource::new(self.url.clone(), self.timeout, self.limits))
    }
}

/// Reads JPEG frames from an MJPEG-over-HTTP URL.
pub struct HttpMjpegSource {
    url: String,
    timeout: Duration,
    limits: FrameLimits,
    stream: Option<PartReader<Box<dyn Read + Send>>>,
    part: Vec<u8>,
}

impl HttpMjpegSource {
    pub fn new(url: String, timeout: Duration, limits: FrameLimits) -> Self {
        HttpMjpegSource { url, timeout, limits, stream: None, part: Vec::new() }
    }
}

/// `url` without a `user:password@`, for logs.
pub fn redact(url: &str) -> String {
    crate::base::redact::url(url)
}

impl FrameSource for HttpMjpegSource {
    fn describe(&self) -> String {
        format!("http-mjpeg {}", redact(&self.url))
    }

    fn open(&mut self) -> Result<(), CaptureError> {
        let fail =
            |reason: String| CaptureError::Open { source_name: format!("http-mjpeg {}", redact(&self.url)), reason };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_resolve(Some(self.timeout))
            .timeout_connect(Some(self.timeout))
            .timeout_recv_response(Some(self.timeout))
            // Per read, not for the whole body: the stream never ends.
            .timeout_per_read(Some(self.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let response = agent.get(&self.url).call().map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let boundary = boundary_of(&content_type).ok_or_else(|| {
            fail(format!(
                "content type `{content_type}` is not multipart/x-mixed-replace with a boundary: not an MJPEG stream"
            ))
        })?;
        let body: Box<dyn Read + Send> = Box::new(response.into_body().into_reader());
        // Beyond per-read silence (ureq's timeout): a camera that keeps the
        // connection busy without ever completing a part is lost too.
        self.stream = Some(PartReader::new(body, &boundary, Some(self.timeout * 2), self.limits.max_bytes));
        Ok(())
    }

    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(CaptureError::Disconnected { source_name: self.describe(), reason: "not open".into() });
        };
        let lost = match stream.next_part(&mut self.part) {
            Ok(true) => None,
            Err(PartError::TooLarge(reason)) => {
                return Err(CaptureError::BrokenFrame { source_name: self.describe(), reason })
            }
            Ok(false) => Some("the stream ended".to_string()),
            Err(PartError::Io(e)) => Some(e.to_string()),
            // Lost our place in the stream: reconnect rather than guess.
            Err(PartError::Malformed(reason)) => Some(reason),
        };
        if let Some(reason) = lost {
            self.stream = None;
            return Err(CaptureError::Disconnected { source_name: self.describe(), reason });
        }
        super::decode::jpeg(&self.part, &self.limits, out)
            .map_err(|e| CaptureError::BrokenFrame { source_name: self.describe(), reason: e.to_string() })
    }

    fn close(&mut self) {
        self.stream = None;
    }

    fn self_paced(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        assert_eq!(redact("http://admin:secret@10.0.0.5/mjpg"), "http://***@10.0.0.5/mjpg");
        assert_eq!(redact("http://10.0.0.5/a@b"), "http://10.0.0.5/a@b");
        assert_eq!(redact("http://admin:p@ss@10.0.0.5/m?x=@"), "http://***@10.0.0.5/m?x=@");
    }
}
