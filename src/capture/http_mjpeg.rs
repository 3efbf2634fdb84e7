//! HTTP MJPEG source: the `multipart/x-mixed-replace` JPEG stream that IP
//! cameras (and `mjpg-streamer`, `ffmpeg`, OctoPrint...) serve over plain HTTP.
//!
//! HTTP itself is ureq's; what is ours is reading the parts of the stream.
//! Cameras are lax about the multipart rules, so the reader is tolerant: a
//! boundary line may be `--B` as the rules say or the declared `B` as written,
//! `Content-Length` per part is used when given, and otherwise the part runs to
//! the next line that is a boundary line (so the boundary must start a line).
//! A part that is not a decodable JPEG is a broken frame (counted and skipped
//! by the camera thread); a stream that ends, stalls past `timeout_s`, or sends
//! no part for `2 × timeout_s` is a lost camera (offline, reopened with
//! backoff). The camera paces itself: frames are read as they arrive.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::plan::{CameraContext, CompileSource, SourcePlan};
use super::{CaptureError, FrameData, FrameSource, PixelFormat, SourceFactory};
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
}

impl std::fmt::Debug for HttpMjpegPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMjpegPlan").field("url", &redact(&self.url)).field("timeout", &self.timeout).finish()
    }
}

impl CompileSource for HttpMjpegConfig {
    fn compile(&self, _cam: &CameraContext, p: &str, problems: &mut Vec<String>) -> Option<Arc<dyn SourcePlan>> {
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
            Arc::new(HttpMjpegPlan { url: self.url.clone(), timeout: Duration::from_secs_f64(self.timeout_s) })
                as Arc<dyn SourcePlan>
        })
    }
}

impl SourcePlan for HttpMjpegPlan {
    fn factory(&self) -> SourceFactory {
        super::factory(HttpMjpegSource::new(self.url.clone(), self.timeout))
    }
}

/// Largest part accepted: a 4K JPEG at high quality is a few MB; a part that
/// runs past this is a broken stream, not a frame.
const MAX_PART_BYTES: usize = 32 << 20;
/// Longest header or boundary line accepted.
const MAX_LINE_BYTES: usize = 8 << 10;

/// Reads JPEG frames from an MJPEG-over-HTTP URL.
pub struct HttpMjpegSource {
    url: String,
    timeout: Duration,
    stream: Option<PartReader<Box<dyn Read + Send>>>,
    part: Vec<u8>,
}

impl HttpMjpegSource {
    pub fn new(url: String, timeout: Duration) -> Self {
        HttpMjpegSource { url, timeout, stream: None, part: Vec::new() }
    }
}

/// `url` without a `user:password@`, for logs.
pub fn redact(url: &str) -> String {
    crate::base::redact::url(url)
}

/// The `boundary` parameter of a `multipart/x-mixed-replace` content type.
pub fn boundary_of(content_type: &str) -> Option<String> {
    let (mime, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    if !mime.trim().eq_ignore_ascii_case("multipart/x-mixed-replace") {
        return None;
    }
    params
        .split(';')
        .find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
        })
        .filter(|b| !b.is_empty())
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
        self.stream = Some(PartReader::new(body, &boundary, Some(self.timeout * 2)));
        Ok(())
    }

    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(CaptureError::Disconnected { source_name: self.describe(), reason: "not open".into() });
        };
        let lost = match stream.next_part(&mut self.part) {
            Ok(true) => None,
            Ok(false) => Some("the stream ended".to_string()),
            Err(PartError::Io(e)) => Some(e.to_string()),
            // Lost our place in the stream: reconnect rather than guess.
            Err(PartError::Malformed(reason)) => Some(reason),
        };
        if let Some(reason) = lost {
            self.stream = None;
            return Err(CaptureError::Disconnected { source_name: self.describe(), reason });
        }
        let img = image::load_from_memory_with_format(&self.part, image::ImageFormat::Jpeg).map_err(|e| {
            CaptureError::BrokenFrame { source_name: self.describe(), reason: format!("not a JPEG: {e}") }
        })?;
        out.fill_from_image(&img, PixelFormat::Rgb8);
        Ok(())
    }

    fn close(&mut self) {
        self.stream = None;
    }

    fn self_paced(&self) -> bool {
        true
    }
}

#[derive(Debug)]
pub enum PartError {
    Io(std::io::Error),
    Malformed(String),
}

impl From<std::io::Error> for PartError {
    fn from(e: std::io::Error) -> Self {
        PartError::Io(e)
    }
}

/// Splits a multipart byte stream into its parts' bodies.
pub struct PartReader<R: Read> {
    inner: BufReader<R>,
    /// The lines that delimit parts: `--B` (the rules) and `B` (as declared;
    /// some cameras declare `--B` and write it so, or write `B` bare).
    delimiters: [Vec<u8>; 2],
    /// Longest wait for the next part to begin (a stream of blank lines or
    /// endless headers is a lost camera, not a slow one); `None`: no limit.
    max_wait: Option<Duration>,
    /// The boundary line of the next part was already read (a part without
    /// `Content-Length` ends where the next boundary starts).
    at_part_headers: bool,
    line: Vec<u8>,
}

impl<R: Read> PartReader<R> {
    pub fn new(inner: R, boundary: &str, max_wait: Option<Duration>) -> Self {
        PartReader {
            inner: BufReader::with_capacity(64 << 10, inner),
            delimiters: [format!("--{boundary}").into_bytes(), boundary.as_bytes().to_vec()],
            max_wait,
            at_part_headers: false,
            line: Vec::new(),
        }
    }

    /// One line without its CRLF/LF; `false` at the end of the stream.
    fn read_line(&mut self) -> Result<bool, PartError> {
        self.line.clear();
        let n = (&mut self.inner).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut self.line)?;
        if n == 0 {
            return Ok(false);
        }
        if self.line.len() > MAX_LINE_BYTES {
            return Err(PartError::Malformed(format!("a header or boundary line longer than {MAX_LINE_BYTES} bytes")));
        }
        while self.line.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
            self.line.pop();
        }
        Ok(true)
    }

    /// Whether the whole `line` is a boundary line (`D` or the closing `D--`).
    fn is_boundary(&self, line: &[u8]) -> bool {
        let line = line.trim_ascii();
        let line = line.strip_suffix(b"--").filter(|l| self.delimiters.iter().any(|d| d == l)).unwrap_or(line);
        self.delimiters.iter().any(|d| d == line)
    }

    /// Reads the next part's body into `out`; `false` at the end of the stream.
    pub fn next_part(&mut self, out: &mut Vec<u8>) -> Result<bool, PartError> {
        out.clear();
        let started = std::time::Instant::now();
        let max_wait = self.max_wait;
        let waited_too_long = |what: &str| -> Result<(), PartError> {
            match max_wait {
                Some(w) if started.elapsed() > w => {
                    Err(PartError::Malformed(format!("no frame for {:.1} s: {what}", started.elapsed().as_secs_f64())))
                }
                _ => Ok(()),
            }
        };
        if !self.at_part_headers {
            // Skip to the boundary (a preamble, or the CRLF after the last part).
            let mut skipped = 0usize;
            loop {
                if !self.read_line()? {
                    return Ok(false);
                }
                if self.is_boundary(&self.line) {
                    break;
                }
                skipped += self.line.len() + 1;
                if skipped > MAX_PART_BYTES {
                    return Err(PartError::Malformed("no boundary line in the stream".into()));
                }
                waited_too_long("lines, but no boundary")?;
            }
        }
        self.at_part_headers = false;
        // Part headers up to the empty line.
        let mut length: Option<usize> = None;
        for n in 0.. {
            if n > 100 {
                return Err(PartError::Malformed("more than 100 part header lines".into()));
            }
            waited_too_long("part headers without end")?;
            if !self.read_line()? {
                return Ok(false);
            }
            if self.line.is_empty() {
                break;
            }
            let text = String::from_utf8_lossy(&self.line);
            if let Some((k, v)) = text.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    let n: usize =
                        v.trim().parse().map_err(|_| PartError::Malformed(format!("Content-Length `{}`", v.trim())))?;
                    if n > MAX_PART_BYTES {
                        return Err(PartError::Malformed(format!("a {n}-byte part (limit {MAX_PART_BYTES})")));
                    }
                    length = Some(n);
                }
            }
        }
        match length {
            Some(n) => {
                out.resize(n, 0);
                self.inner.read_exact(out)?;
            }
            None => {
                // To the next boundary line; the CRLF before it is not data.
                loop {
                    if !self.read_line_raw(out)? {
                        break;
                    }
                    if out.len() > MAX_PART_BYTES {
                        return Err(PartError::Malformed(format!("a part longer than {MAX_PART_BYTES} bytes")));
                    }
                }
                if out.is_empty() && !self.at_part_headers {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Appends one raw line (with its line end) to `out` unless it is the
    /// boundary; then strips the CRLF that precedes the boundary and returns
    /// `false`. Also `false` at the end of the stream.
    fn read_line_raw(&mut self, out: &mut Vec<u8>) -> Result<bool, PartError> {
        let start = out.len();
        // Bounded: a stream without line ends must not grow a part forever.
        let room = (MAX_PART_BYTES + 1).saturating_sub(start) as u64;
        let n = (&mut self.inner).take(room).read_until(b'\n', out)?;
        let boundary = n > 0 && self.is_boundary(&out[start..]);
        if n > 0 && !boundary {
            return Ok(true);
        }
        // The boundary line, or the end of the stream: neither they nor the
        // line end before them are data.
        out.truncate(start);
        if out.ends_with(b"\r\n") {
            out.truncate(out.len() - 2);
        } else if out.ends_with(b"\n") {
            out.truncate(out.len() - 1);
        }
        self.at_part_headers = boundary;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(stream: &[u8], boundary: &str) -> Result<Vec<Vec<u8>>, PartError> {
        let mut r = PartReader::new(stream, boundary, None);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while r.next_part(&mut buf)? {
            out.push(buf.clone());
        }
        Ok(out)
    }

    #[test]
    fn parts_with_content_length_keep_their_exact_bytes() {
        // Bodies holding CRLFs and a fake boundary must come back byte for byte.
        let a = b"\xff\xd8one\r\n--frame\r\nnot a boundary\xff\xd9".to_vec();
        let b = b"\xff\xd8two\xff\xd9".to_vec();
        let mut s = Vec::new();
        for body in [&a, &b] {
            s.extend_from_slice(
                format!("--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
            );
            s.extend_from_slice(body);
            s.extend_from_slice(b"\r\n");
        }
        assert_eq!(parts(&s, "frame").unwrap(), vec![a, b]);
    }

    #[test]
    fn parts_without_content_length_run_to_the_next_boundary() {
        // mjpg-streamer style without lengths, LF line ends, a preamble, and the
        // boundary declared with its dashes.
        let s = b"preamble\n--myboundary\nContent-Type: image/jpeg\n\nAAA\nBBB\n--myboundary\nContent-Type: image/jpeg\n\nCCC\n--myboundary--\n";
        assert_eq!(parts(s, "myboundary").unwrap(), vec![b"AAA\nBBB".to_vec(), b"CCC".to_vec()]);
        // Boundary lines without the leading dashes (some cameras).
        let s = b"myboundary\r\nContent-Type: image/jpeg\r\n\r\nDDD\r\nmyboundary\r\n\r\nEEE\r\n";
        assert_eq!(parts(s, "myboundary").unwrap(), vec![b"DDD".to_vec(), b"EEE".to_vec()]);
    }

    #[test]
    fn boundary_lines_match_whole_lines_in_both_declared_forms() {
        // Declared with dashes and written as declared (`--B` then `----B` would
        // be the rules); a body line that merely starts with the boundary is data.
        let s = b"--frame\r\n\r\nAAA\r\n--frameworks in the data\r\nBBB\r\n--frame\r\n\r\nCCC\r\n--frame--\r\n";
        assert_eq!(
            parts(s, "--frame").unwrap(),
            vec![b"AAA\r\n--frameworks in the data\r\nBBB".to_vec(), b"CCC".to_vec()]
        );
        assert_eq!(parts(s, "frame").unwrap().len(), 2);
        // Per the rules: declared `--B`, written `----B`.
        let s = b"----B\r\n\r\nDDD\r\n----B--\r\n";
        assert_eq!(parts(s, "--B").unwrap(), vec![b"DDD".to_vec()]);
    }

    #[test]
    fn a_stream_of_blank_lines_is_lost_after_the_wait() {
        struct Blank;
        impl Read for Blank {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_millis(5));
                buf[..2].copy_from_slice(b"\r\n");
                Ok(2)
            }
        }
        let mut r = PartReader::new(Blank, "frame", Some(Duration::from_millis(100)));
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        assert!(matches!(r.next_part(&mut out), Err(PartError::Malformed(m)) if m.contains("no frame for")));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn garbage_is_malformed_not_a_hang() {
        let s = b"--b\r\nContent-Length: lots\r\n\r\nxx";
        assert!(matches!(parts(s, "b"), Err(PartError::Malformed(m)) if m.contains("Content-Length `lots`")));
        let s = format!("--b\r\nContent-Length: {}\r\n\r\n", MAX_PART_BYTES + 1);
        assert!(matches!(parts(s.as_bytes(), "b"), Err(PartError::Malformed(m)) if m.contains("limit")));
        // A truncated part is an I/O error (the camera went away mid-frame).
        let s = b"--b\r\nContent-Length: 100\r\n\r\nshort";
        assert!(matches!(parts(s, "b"), Err(PartError::Io(_))));
        // No Content-Length and no line end for longer than a part may be.
        let mut s = b"--b\r\n\r\n".to_vec();
        s.resize(s.len() + MAX_PART_BYTES + 10, b'x');
        assert!(matches!(parts(&s, "b"), Err(PartError::Malformed(m)) if m.contains("longer than")));
    }

    #[test]
    fn boundary_and_redaction() {
        assert_eq!(boundary_of("multipart/x-mixed-replace; boundary=frame").as_deref(), Some("frame"));
        assert_eq!(boundary_of("multipart/x-mixed-replace;boundary=\"--myboundary\"").as_deref(), Some("--myboundary"));
        assert_eq!(boundary_of("multipart/x-mixed-replace; boundary=\"\""), None);
        assert_eq!(boundary_of("Multipart/X-Mixed-Replace; charset=x; Boundary=b1").as_deref(), Some("b1"));
        assert_eq!(boundary_of("image/jpeg"), None);
        assert_eq!(boundary_of("multipart/x-mixed-replace"), None);
        assert_eq!(redact("http://admin:secret@10.0.0.5/mjpg"), "http://***@10.0.0.5/mjpg");
        assert_eq!(redact("http://10.0.0.5/a@b"), "http://10.0.0.5/a@b");
        assert_eq!(redact("http://admin:p@ss@10.0.0.5/m?x=@"), "http://***@10.0.0.5/m?x=@");
    }
}
