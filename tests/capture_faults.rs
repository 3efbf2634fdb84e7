//! Faults at the camera never stop the daemon (issue 12) and are reported
//! (issue 16.4): a source stuck in a read is offline within its
//! `read_timeout_s` and does not hold up a stop beyond the unit's
//! `TimeoutStopSec`; an HTTP-MJPEG camera trickling a byte at a time inside a
//! part is a lost camera within its timeout; frames over the camera's
//! `limits` are counted broken frames, and the stream goes on.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ganomalyd::capture::http_mjpeg::HttpMjpegSource;
use ganomalyd::capture::{self, CaptureError, FrameData, FrameLimits, FrameSource, PixelFormat};
use ganomalyd::events::{Recorded, Recorder};
use ganomalyd::pipeline::{Pipeline, StartOptions};

mod support;

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([120, 60, 200]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
    out.into_inner()
}

fn part(body: &[u8]) -> Vec<u8> {
    let mut p = format!("--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    p.extend_from_slice(body);
    p.extend_from_slice(b"\r\n");
    p
}

/// An HTTP camera on a raw socket: for each connection, the response head,
/// then `stream(socket)` writes what it wants.
fn camera(stream: impl Fn(&mut std::net::TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stream = Arc::new(stream);
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let stream = stream.clone();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") && sock.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
                    req.push(byte[0]);
                }
                let head = b"HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n";
                if sock.write_all(head).is_ok() {
                    stream(&mut sock);
                }
            });
        }
    });
    addr
}

fn camera_states(rec: &Recorder, name: &str) -> Vec<bool> {
    rec.events()
        .into_iter()
        .filter_map(|e| match e {
            Recorded::CameraOnline(c, on) if c == name => Some(on),
            _ => None,
        })
        .collect()
}

/// Waits (polling, generous bound) until the camera's states begin with `want`.
fn wait_for_states(rec: &Recorder, name: &str, want: &[bool], within: Duration) -> Duration {
    let t = Instant::now();
    while !camera_states(rec, name).starts_with(want) {
        assert!(t.elapsed() < within, "camera states {:?}, waiting for {want:?}", camera_states(rec, name));
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

/// The unit's `TimeoutStopSec`, read from the file systemd gets.
fn unit_stop_timeout() -> Duration {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/ganomalyd.service")).expect("unit");
    let s = unit.lines().find_map(|l| l.strip_prefix("TimeoutStopSec=")).expect("TimeoutStopSec in the unit");
    Duration::from_secs(s.trim().parse().expect("seconds"))
}

/// Frames, then a read that never returns (a driver stuck in an ioctl).
struct StuckAfter {
    frames: u32,
    released: Arc<AtomicBool>,
}

impl FrameSource for StuckAfter {
    fn describe(&self) -> String {
        "stuck-after".into()
    }
    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        if self.frames == 0 {
            // Forever, as far as the daemon can tell (released after the test).
            while !self.released.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            return Err(CaptureError::Ended("released".into()));
        }
        self.frames -= 1;
        // A camera's pace, so that its queue does not drop the frames.
        std::thread::sleep(Duration::from_millis(100));
        out.reshape(64, 64, PixelFormat::Rgb8).fill(90);
        Ok(())
    }
    fn self_paced(&self) -> bool {
        true
    }
}

#[test]
fn a_read_that_never_returns_is_offline_within_its_timeout_and_the_stop_does_not_wait_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = support::fixture_model(dir.path(), "m.onnx", 3);
    support::write_config(dir.path(), &model, 0, r#"{ kind = "synthetic", size = 64 }"#, "read_timeout_s = 0.5");
    let cfg = ganomalyd::config::load(&dir.path().join("ganomalyd.toml")).expect("config");
    assert_eq!(cfg.cameras[0].read_timeout, Duration::from_millis(500));
    let released = Arc::new(AtomicBool::new(false));
    let rec = Recorder::default();
    let opts = StartOptions {
        sources: BTreeMap::from([(
            "cam".to_string(),
            capture::factory(StuckAfter { frames: 5, released: released.clone() }),
        )]),
        stats: false,
        ..StartOptions::default()
    };
    let p = Pipeline::start(&cfg, Arc::new(rec.clone()), opts).expect("pipeline starts");
    wait_for_states(&rec, "cam", &[true], Duration::from_secs(30));
    let c = p.counters()[0].1.clone();
    let settled = || {
        use ganomalyd::metrics::CameraCounters as C;
        (C::get(&c.captured), C::get(&c.decided) + C::get(&c.dropped))
    };
    let t = Instant::now();
    while settled() != (5, 5) {
        assert!(t.elapsed() < Duration::from_secs(30), "captured, decided + dropped: {:?}", settled());
        std::thread::sleep(Duration::from_millis(10));
    }
    // Stuck since the 6th read: reported offline by the watch, not by the camera thread.
    let took = wait_for_states(&rec, "cam", &[true, false], Duration::from_secs(10));
    let online = p.counters()[0].1.online.load(Ordering::Relaxed);
    assert!(!online, "the online gauge follows");
    // The read started after the 5th frame; offline after 0.5 s of it (the
    // bound only catches a watch that never fires).
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The stop: the camera thread is still stuck. The whole daemon stop (this,
    // then up to 2 s for the exporter and 5 s for the MQTT flush) must end
    // inside the unit's TimeoutStopSec.
    let t = Instant::now();
    let report = p.shutdown();
    let stop = t.elapsed();
    let budget = unit_stop_timeout().saturating_sub(Duration::from_secs(7));
    assert!(stop < budget, "stop took {stop:?}; the unit leaves the pipeline {budget:?}");
    let cam = &report.cameras[0];
    assert!(cam.decided >= 1 && cam.decided + cam.dropped == 5, "frames before the wedge went through: {cam:?}");
    released.store(true, Ordering::Relaxed);
}

#[test]
fn a_stream_trickling_inside_a_part_is_a_lost_camera_within_its_timeout() {
    // One good frame, then a part whose 50 kB body comes a byte every 100 ms:
    // every read returns well within the socket timeout, the part never ends.
    let trickling = Arc::new(AtomicBool::new(false));
    let flag = trickling.clone();
    let addr = camera(move |sock| {
        let _ = sock.write_all(&part(&jpeg(64, 48)));
        let _ = sock.write_all(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: 50000\r\n\r\n\xff\xd8");
        flag.store(true, Ordering::Relaxed);
        for _ in 0..600 {
            std::thread::sleep(Duration::from_millis(100));
            if sock.write_all(b"x").is_err() {
                return;
            }
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let model = support::fixture_model(dir.path(), "m.onnx", 4);
    let source = format!(r#"{{ kind = "http-mjpeg", url = "http://{addr}/mjpg", timeout_s = 0.5 }}"#);
    support::write_config(dir.path(), &model, 0, &source, "");
    let cfg = ganomalyd::config::load(&dir.path().join("ganomalyd.toml")).expect("config");
    let rec = Recorder::default();
    let opts = StartOptions {
        stats: false,
        // The reconnect comes after the offline report, not in its way.
        backoff_min: Duration::from_secs(30),
        backoff_max: Duration::from_secs(30),
        ..StartOptions::default()
    };
    let p = Pipeline::start(&cfg, Arc::new(rec.clone()), opts).expect("pipeline starts");
    wait_for_states(&rec, "cam", &[true], Duration::from_secs(30));
    let took = wait_for_states(&rec, "cam", &[true, false], Duration::from_secs(20));
    assert!(trickling.load(Ordering::Relaxed), "the camera was still sending when it was declared lost");
    // 2 × timeout_s for a part, plus one trickle interval and slack.
    assert!(took < Duration::from_secs(6), "{took:?}");
    let t = Instant::now();
    let report = p.shutdown();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(report.cameras[0].decided, 1);
}

#[test]
fn frames_over_the_limits_are_broken_frames_and_the_stream_goes_on() {
    let small = jpeg(64, 48);
    let wide = jpeg(200, 40);
    // A JPEG whose header claims 60000 × 60000 (10.8 GB of RGB).
    let mut lie = jpeg(16, 16);
    let sof = lie.windows(2).position(|m| m == [0xff, 0xc0]).expect("SOF0");
    lie[sof + 5..sof + 9].copy_from_slice(&[0xea, 0x60, 0xea, 0x60]);
    let body = {
        let mut b = Vec::new();
        for p in [&small[..], &wide, &small, &lie, &small] {
            b.extend(part(p));
        }
        // A part over max_bytes with its length, then one without.
        b.extend(part(&vec![0u8; 3000]));
        b.extend_from_slice(b"--frame\r\n\r\n");
        b.extend(std::iter::repeat_n(b'y', 3000));
        b.extend_from_slice(b"\r\n");
        b.extend(part(&small));
        b
    };
    let addr = camera(move |sock| {
        let _ = sock.write_all(&body);
    });
    let limits = FrameLimits { max_width: 100, max_height: 100, max_bytes: 2048 };
    let mut src = HttpMjpegSource::new(format!("http://{addr}/mjpg"), Duration::from_secs(5), limits);
    src.open().expect("open");
    let mut f = FrameData::default();
    let broken = |r: Result<(), CaptureError>| match r {
        Err(CaptureError::BrokenFrame { reason, .. }) => reason,
        other => panic!("expected a broken frame, got {other:?}"),
    };
    src.next_frame(&mut f).expect("64x48");
    let r = broken(src.next_frame(&mut f));
    assert!(r.contains("200x40") && r.contains("over the camera's limits"), "{r}");
    src.next_frame(&mut f).expect("64x48 after it");
    let r = broken(src.next_frame(&mut f));
    assert!(r.contains("60000x60000"), "{r}");
    assert!(f.data.capacity() < 1 << 20, "nothing allocated for the claim: {}", f.data.capacity());
    src.next_frame(&mut f).expect("64x48 after the lie");
    let r = broken(src.next_frame(&mut f));
    assert!(r.contains("3000-byte part") && r.contains("limits.max_bytes"), "{r}");
    let r = broken(src.next_frame(&mut f));
    assert!(r.contains("limits.max_bytes"), "{r}");
    src.next_frame(&mut f).expect("in step after the skipped parts");
    assert_eq!((f.width, f.height), (64, 48));
}

#[test]
fn limits_come_from_the_camera_table_over_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = support::fixture_model(dir.path(), "m.onnx", 2);
    let body = format!(
        "[inference]\nproviders = [\"cpu\"]\n[snapshots]\nenabled = false\n\
         [defaults]\nmodel = \"{}\"\nlimits = {{ max_width = 1920, max_height = 1080, max_bytes = 4_000_000 }}\n\
         [cameras.a]\nsource = {{ kind = \"http-mjpeg\", url = \"http://127.0.0.1:9/x\" }}\nlimits = {{ max_width = 640 }}\n",
        model.display()
    );
    let cfg = support::compile(dir.path(), &body);
    let plan = format!("{:?}", cfg.cameras[0].source);
    assert!(
        plan.contains("FrameLimits { max_width: 640, max_height: 1080, max_bytes: 4000000 }"),
        "the camera's width, the defaults' height and bytes: {plan}"
    );
    assert_eq!(cfg.cameras[0].read_timeout, Duration::from_secs(10), "the default");
    let bad = body.replace("max_width = 640", "max_width = 0").replace("4_000_000", "1") + "read_timeout_s = nan\n";
    let err = ganomalyd::config::compile_str(&bad, dir.path()).expect_err("refused").to_string();
    for key in ["cameras.a.limits.max_width", "defaults.limits.max_bytes", "cameras.a.read_timeout_s"] {
        assert!(err.contains(key), "{key} in {err}");
    }
    // Unset, a slow camera's timeout covers three of its frame intervals.
    let slow = support::compile(dir.path(), &(body.clone() + "fps = 0.1\n"));
    assert_eq!(slow.cameras[0].read_timeout, Duration::from_secs(30));
}
