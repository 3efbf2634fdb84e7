//! Reading the parts of a `multipart/x-mixed-replace` stream (MJPEG over
//! HTTP): what the http-mjpeg source does with the body ureq hands it.
//!
//! Cameras are lax about the multipart rules, so the reader is tolerant: a
//! boundary line may be `--B` as the rules say or the declared `B` as written,
//! `Content-Length` per part is used when given, and otherwise the part runs to
//! the next line that is a boundary line (so the boundary must start a line).
//!
//! What a camera controls is bounded: a part's size by the camera's
//! `limits.max_bytes` (a `Content-Length` over it is refused before anything
//! is read, and memory grows with the bytes that actually arrive), a line by
//! [`MAX_LINE_BYTES`], and the time one part may take by `max_wait`, checked
//! on every read from the connection, so that a stream trickling a byte every
//! few seconds inside a part (each read well within the socket's own timeout)
//! is a lost camera after `max_wait`, not a wedged one. Apart from the source
//! (std only) so that its fuzz target (`make fuzz`) builds without the daemon.

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use super::limits::fit_capacity;

/// Longest header or boundary line accepted.
pub const MAX_LINE_BYTES: usize = 8 << 10;

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

#[derive(Debug)]
pub enum PartError {
    Io(std::io::Error),
    /// Lost our place in the stream (the caller reconnects rather than guess),
    /// or the next part took longer than `max_wait`.
    Malformed(String),
    /// A part over `max_part`, skipped without keeping it: the stream is still
    /// in step, and the part is a broken frame.
    TooLarge(String),
}

/// A part over the limit is skipped (read and dropped) when it is at most
/// this many times the limit, so a camera whose frames are a little too big
/// shows broken frames rather than reconnecting at every frame; beyond it
/// the stream is dropped.
const SKIP_FACTOR: usize = 4;

impl From<std::io::Error> for PartError {
    fn from(e: std::io::Error) -> Self {
        PartError::Io(e)
    }
}

/// The connection under the buffer: a read after the part's deadline fails.
struct Deadline<R> {
    inner: R,
    until: Option<Instant>,
    expired: bool,
}

impl<R: Read> Read for Deadline<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.until.is_some_and(|t| Instant::now() > t) {
            self.expired = true;
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "part deadline passed"));
        }
        self.inner.read(buf)
    }
}

/// Splits a multipart byte stream into its parts' bodies.
pub struct PartReader<R: Read> {
    inner: BufReader<Deadline<R>>,
    /// The lines that delimit parts: `--B` (the rules) and `B` (as declared;
    /// some cameras declare `--B` and write it so, or write `B` bare).
    delimiters: [Vec<u8>; 2],
    /// Longest time one part may take, from the end of the previous one (a
    /// stream of blank lines, endless headers or a body trickling in is a
    /// lost camera, not a slow one); `None`: no limit.
    max_wait: Option<Duration>,
    /// Largest part body accepted (the camera's `limits.max_bytes`).
    max_part: usize,
    /// The boundary line of the next part was already read (a part without
    /// `Content-Length` ends where the next boundary starts).
    at_part_headers: bool,
    line: Vec<u8>,
}

impl<R: Read> PartReader<R> {
    pub fn new(inner: R, boundary: &str, max_wait: Option<Duration>, max_part: usize) -> Self {
        PartReader {
            inner: BufReader::with_capacity(64 << 10, Deadline { inner, until: None, expired: false }),
            delimiters: [format!("--{boundary}").into_bytes(), boundary.as_bytes().to_vec()],
            max_wait,
            max_part,
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
        let started = Instant::now();
        let deadline = self.inner.get_mut();
        deadline.until = self.max_wait.map(|w| started + w);
        deadline.expired = false;
        let result = self.read_part(out);
        // Whatever the part was, the buffer keeps no more than it needs.
        fit_capacity(out, out.len());
        match result {
            Err(PartError::Io(_)) if self.inner.get_ref().expired => Err(PartError::Malformed(format!(
                "no complete frame for {:.1} s (limit {:.1} s): the stream is stalled or trickling",
                started.elapsed().as_secs_f64(),
                self.max_wait.unwrap_or_default().as_secs_f64()
            ))),
            other => other,
        }
    }

    fn read_part(&mut self, out: &mut Vec<u8>) -> Result<bool, PartError> {
        out.clear();
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
                if skipped > self.max_part {
                    return Err(PartError::Malformed("no boundary line in the stream".into()));
                }
            }
        }
        self.at_part_headers = false;
        // Part headers up to the empty line.
        let mut length: Option<u64> = None;
        for n in 0.. {
            if n > 100 {
                return Err(PartError::Malformed("more than 100 part header lines".into()));
            }
            if !self.read_line()? {
                return Ok(false);
            }
            if self.line.is_empty() {
                break;
            }
            let text = String::from_utf8_lossy(&self.line);
            if let Some((k, v)) = text.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    let n: u64 =
                        v.trim().parse().map_err(|_| PartError::Malformed(format!("Content-Length `{}`", v.trim())))?;
                    length = Some(n);
                }
            }
        }
        match length {
            Some(n) if n > self.max_part as u64 => {
                let what = format!("a {n}-byte part (limit {}: the camera's limits.max_bytes)", self.max_part);
                if n > (self.max_part * SKIP_FACTOR) as u64 {
                    return Err(PartError::Malformed(what));
                }
                // In step after its body, skipped through a small buffer.
                let skipped = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())?;
                if skipped < n {
                    return Err(PartError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                return Err(PartError::TooLarge(what));
            }
            Some(n) => {
                // Grown with what arrives, not with what the header claims.
                let got = (&mut self.inner).take(n).read_to_end(out)? as u64;
                if got < n {
                    return Err(PartError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the stream ended {got} bytes into a {n}-byte part"),
                    )));
                }
            }
            None => {
                // To the next boundary line; the CRLF before it is not data.
                let mut dropped = 0usize;
                loop {
                    if !self.read_line_raw(out)? {
                        break;
                    }
                    if out.len() > self.max_part {
                        // Dropped as it comes, to the next boundary or up to the skip bound.
                        dropped += out.len();
                        out.clear();
                        if dropped > self.max_part * SKIP_FACTOR {
                            return Err(PartError::Malformed(format!(
                                "a part longer than {} bytes (the camera's limits.max_bytes)",
                                self.max_part * SKIP_FACTOR
                            )));
                        }
                    }
                }
                if dropped > 0 {
                    out.clear();
                    return Err(PartError::TooLarge(format!(
                        "a part longer than {} bytes (the camera's limits.max_bytes)",
                        self.max_part
                    )));
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
        let room = (self.max_part + 1).saturating_sub(start) as u64;
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

    /// Part limit of the tests (a camera's `limits.max_bytes`).
    const MAX: usize = 1 << 20;

    fn parts(stream: &[u8], boundary: &str) -> Result<Vec<Vec<u8>>, PartError> {
        let mut r = PartReader::new(stream, boundary, None, MAX);
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
        let mut r = PartReader::new(Blank, "frame", Some(Duration::from_millis(100)), MAX);
        let t = Instant::now();
        let mut out = Vec::new();
        assert!(matches!(r.next_part(&mut out), Err(PartError::Malformed(m)) if m.contains("no complete frame for")));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn garbage_is_malformed_not_a_hang() {
        let s = b"--b\r\nContent-Length: lots\r\n\r\nxx";
        assert!(matches!(parts(s, "b"), Err(PartError::Malformed(m)) if m.contains("Content-Length `lots`")));
        let s = format!("--b\r\nContent-Length: {}\r\n\r\n", 4 * MAX + 1);
        assert!(matches!(parts(s.as_bytes(), "b"), Err(PartError::Malformed(m)) if m.contains("limit")));
        // A truncated part is an I/O error (the camera went away mid-frame).
        let s = b"--b\r\nContent-Length: 100\r\n\r\nshort";
        assert!(matches!(parts(s, "b"), Err(PartError::Io(_))));
        // No Content-Length and no line end for far longer than a part may be.
        let mut s = b"--b\r\n\r\n".to_vec();
        s.resize(s.len() + 4 * MAX + 10, b'x');
        assert!(matches!(parts(&s, "b"), Err(PartError::Malformed(m)) if m.contains("longer than")));
    }

    #[test]
    fn a_part_a_little_over_the_limit_is_skipped_and_the_stream_stays_in_step() {
        for with_length in [true, false] {
            let big = vec![b'x'; MAX + 100];
            let mut s = Vec::new();
            for body in [&big[..], b"next"] {
                s.extend_from_slice(b"--b\r\n");
                if with_length {
                    s.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
                }
                s.extend_from_slice(b"\r\n");
                s.extend_from_slice(body);
                s.extend_from_slice(b"\r\n");
            }
            let mut r = PartReader::new(&s[..], "b", None, MAX);
            let mut out = Vec::new();
            let first = r.next_part(&mut out);
            assert!(matches!(&first, Err(PartError::TooLarge(m)) if m.contains("limits.max_bytes")), "{first:?}");
            assert!(out.capacity() < 2 * MAX, "the part was not kept");
            assert!(r.next_part(&mut out).unwrap());
            assert_eq!(out, b"next", "with_length = {with_length}");
        }
    }

    #[test]
    fn a_part_trickling_in_is_lost_after_the_wait() {
        // A byte every 2 ms inside a 100 kB part: each read is prompt (a socket
        // timeout would never fire), the part would take minutes.
        struct Trickle(Vec<u8>, usize);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_millis(2));
                let Some(&b) = self.0.get(self.1) else { return Ok(0) };
                self.1 += 1;
                buf[0] = b;
                Ok(1)
            }
        }
        let mut s = b"--b\r\nContent-Length: 100000\r\n\r\n".to_vec();
        s.resize(s.len() + 100_000, b'x');
        let mut r = PartReader::new(Trickle(s, 0), "b", Some(Duration::from_millis(100)), MAX);
        let mut out = Vec::new();
        let err = r.next_part(&mut out);
        assert!(matches!(&err, Err(PartError::Malformed(m)) if m.contains("no complete frame for")), "{err:?}");
        assert!(out.len() < 100_000, "given up before the part was complete");
    }

    #[test]
    fn the_part_buffer_shrinks_after_a_huge_part() {
        let big = vec![b'x'; 600_000];
        let mut s = format!("--b\r\nContent-Length: {}\r\n\r\n", big.len()).into_bytes();
        s.extend_from_slice(&big);
        s.extend_from_slice(b"\r\n--b\r\nContent-Length: 3\r\n\r\nabc\r\n");
        let mut r = PartReader::new(&s[..], "b", None, MAX);
        let mut out = Vec::with_capacity(8 << 20);
        assert!(r.next_part(&mut out).unwrap());
        assert_eq!(out.len(), 600_000);
        assert!(r.next_part(&mut out).unwrap());
        assert_eq!(out, b"abc");
        assert!(out.capacity() < 2 << 20, "capacity {} after a 3-byte part", out.capacity());
    }

    #[test]
    fn boundary_parameter() {
        assert_eq!(boundary_of("multipart/x-mixed-replace; boundary=frame").as_deref(), Some("frame"));
        assert_eq!(boundary_of("multipart/x-mixed-replace;boundary=\"--myboundary\"").as_deref(), Some("--myboundary"));
        assert_eq!(boundary_of("multipart/x-mixed-replace; boundary=\"\""), None);
        assert_eq!(boundary_of("Multipart/X-Mixed-Replace; charset=x; Boundary=b1").as_deref(), Some("b1"));
        assert_eq!(boundary_of("image/jpeg"), None);
        assert_eq!(boundary_of("multipart/x-mixed-replace"), None);
    }
}
