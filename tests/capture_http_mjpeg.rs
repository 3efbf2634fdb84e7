//! The http-mjpeg camera source against a real HTTP server (axum, in-process)
//! serving a `multipart/x-mixed-replace` JPEG stream: frames come through with
//! their pixels, a corrupt part is a broken frame, the end of the stream is a
//! lost camera that reconnects, and what is not an MJPEG stream is refused with
//! a reason. Then the same stream through the whole pipeline.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::header;
use axum::routing::get;
use axum::Router;
use ganomalyd::capture::http_mjpeg::HttpMjpegSource;
use ganomalyd::capture::{CaptureError, FrameData, FrameLimits, FrameSource};
use ganomalyd::events::Recorder;
use ganomalyd::pipeline::{Pipeline, StartOptions};

mod support;

const COLORS: [[u8; 3]; 4] = [[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]];

fn jpeg(color: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(64, 48, image::Rgb(color));
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
    out.into_inner()
}

/// Three JPEG parts with Content-Length, a part that is not a JPEG, one JPEG
/// part without Content-Length, then the end of the stream.
fn stream_body() -> Vec<u8> {
    let mut b = Vec::new();
    let mut part = |body: &[u8], with_length: bool| {
        b.extend_from_slice(b"--frame\r\nContent-Type: image/jpeg\r\n");
        if with_length {
            b.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        b.extend_from_slice(body);
        b.extend_from_slice(b"\r\n");
    };
    for c in &COLORS[..3] {
        part(&jpeg(*c), true);
    }
    part(b"this is not a JPEG", true);
    part(&jpeg(COLORS[3]), false);
    b.extend_from_slice(b"--frame--\r\n");
    b
}

struct Server {
    addr: SocketAddr,
    streams: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

fn serve() -> Server {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let streams = Arc::new(AtomicU64::new(0));
    let body = stream_body();
    let counter = streams.clone();
    let app = Router::new()
        .route(
            "/mjpg",
            get(move || {
                counter.fetch_add(1, Ordering::Relaxed);
                let body = body.clone();
                async move { ([(header::CONTENT_TYPE, "multipart/x-mixed-replace; boundary=frame")], body) }
            }),
        )
        .route("/still.jpg", get(|| async { ([(header::CONTENT_TYPE, "image/jpeg")], jpeg(COLORS[0])) }));
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(async move { axum::serve(listener, app).await });
    Server { addr, streams, _rt: rt }
}

fn mean_rgb(f: &FrameData) -> [f64; 3] {
    let mut sum = [0.0; 3];
    for px in f.data.chunks_exact(3) {
        for c in 0..3 {
            sum[c] += px[c] as f64;
        }
    }
    let n = (f.data.len() / 3) as f64;
    sum.map(|s| s / n)
}

#[test]
fn frames_broken_parts_and_reconnects() {
    let s = serve();
    let mut src = HttpMjpegSource::new(format!("http://{}/mjpg", s.addr), Duration::from_secs(5), FrameLimits::DEFAULT);
    assert!(src.self_paced());
    src.open().expect("open");
    let mut f = FrameData::default();
    let expect_color = |f: &FrameData, c: [u8; 3]| {
        assert_eq!((f.width, f.height, f.data.len()), (64, 48, 64 * 48 * 3));
        let m = mean_rgb(f);
        for k in 0..3 {
            assert!((m[k] - c[k] as f64).abs() < 6.0, "mean {m:?}, served {c:?}");
        }
    };
    for c in &COLORS[..3] {
        src.next_frame(&mut f).expect("frame");
        expect_color(&f, *c);
    }
    match src.next_frame(&mut f) {
        Err(CaptureError::BrokenFrame { reason, .. }) => assert!(reason.contains("not a JPEG"), "{reason}"),
        other => panic!("expected a broken frame, got {other:?}"),
    }
    src.next_frame(&mut f).expect("the part without Content-Length");
    expect_color(&f, COLORS[3]);
    match src.next_frame(&mut f) {
        Err(CaptureError::Disconnected { reason, .. }) => assert!(reason.contains("ended"), "{reason}"),
        other => panic!("expected the end of the stream, got {other:?}"),
    }
    // The camera thread reopens a lost source: the stream starts again.
    src.open().expect("reopen");
    src.next_frame(&mut f).expect("frame after reconnect");
    expect_color(&f, COLORS[0]);
    assert_eq!(s.streams.load(Ordering::Relaxed), 2);
}

#[test]
fn a_stream_that_goes_silent_is_a_lost_camera_after_the_timeout() {
    use std::io::{Read, Write};
    // A camera that sends one frame and then nothing, keeping the connection
    // open (a raw socket: axum would need a streaming body for this).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().expect("accept");
        let mut req = Vec::new();
        let mut byte = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") && sock.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
            req.push(byte[0]);
        }
        let part = jpeg(COLORS[1]);
        let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n".to_vec();
        out.extend_from_slice(format!("--frame\r\nContent-Length: {}\r\n\r\n", part.len()).as_bytes());
        out.extend_from_slice(&part);
        out.extend_from_slice(b"\r\n");
        sock.write_all(&out).expect("write");
        std::thread::sleep(Duration::from_secs(20));
    });
    let mut src = HttpMjpegSource::new(format!("http://{addr}/mjpg"), Duration::from_millis(500), FrameLimits::DEFAULT);
    src.open().expect("open");
    let mut f = FrameData::default();
    src.next_frame(&mut f).expect("the one frame");
    let t = Instant::now();
    match src.next_frame(&mut f) {
        Err(CaptureError::Disconnected { .. }) => {}
        other => panic!("expected a lost camera, got {other:?}"),
    }
    // Well before the camera's 20 s of silence end.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn what_is_not_an_mjpeg_stream_is_refused_with_the_reason() {
    let s = serve();
    let open = |path: &str| {
        let mut src = HttpMjpegSource::new(
            format!("http://admin:hunter2@{}{path}", s.addr),
            Duration::from_secs(5),
            FrameLimits::DEFAULT,
        );
        match src.open() {
            Err(e @ CaptureError::Open { .. }) => e.to_string(),
            other => panic!("expected an open error for {path}, got {other:?}"),
        }
    };
    let e = open("/still.jpg");
    assert!(e.contains("image/jpeg") && e.contains("not an MJPEG stream"), "{e}");
    let e = open("/missing");
    assert!(e.contains("HTTP 404"), "{e}");
    // The password never reaches a log line.
    assert!(!e.contains("hunter2") && e.contains("***@"), "{e}");
    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let mut src = HttpMjpegSource::new(format!("http://{closed}/mjpg"), Duration::from_secs(2), FrameLimits::DEFAULT);
    assert!(matches!(src.open(), Err(CaptureError::Open { .. })));
}

#[test]
fn an_mjpeg_camera_feeds_the_whole_pipeline() {
    let s = serve();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = support::fixture_model(dir.path(), "m.onnx", 5);
    let body = format!(
        r#"
        [inference]
        providers = ["cpu"]
        [snapshots]
        enabled = false
        [cameras.ipcam]
        model = "{}"
        source = {{ kind = "http-mjpeg", url = "http://{}/mjpg", timeout_s = 5 }}
        "#,
        model.display(),
        s.addr
    );
    let cfg = support::compile(dir.path(), &body);
    let opts = StartOptions {
        sources: BTreeMap::new(),
        stats: false,
        backoff_min: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..StartOptions::default()
    };
    let p = Pipeline::start(&cfg, Arc::new(Recorder::default()), opts).expect("pipeline starts");
    let t = Instant::now();
    // Each stream holds 4 good frames and 1 broken one, then ends; the camera
    // reconnects and goes on.
    while p.decided() < 12 {
        assert!(t.elapsed() < Duration::from_secs(60), "only {} frames decided", p.decided());
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = p.shutdown();
    let cam = &report.cameras[0];
    assert!(cam.decided >= 12 && cam.broken >= 3, "{cam:?}");
    assert!(s.streams.load(Ordering::Relaxed) >= 3);
}
