//! The GStreamer sources against a real RTSP camera: gst-rtsp-server in this
//! process serving `videotestsrc` as H.264 or H.265 on 127.0.0.1. Frames are
//! scored through the whole pipeline with the decoder in `stats`; the server
//! stopped mid-stream is an offline camera and restarted an online one; wrong
//! credentials are an open error that says so, retried, and the password is
//! never in the log; a resolution change mid-stream goes through; corrupt NAL
//! units are broken frames while the camera stays up.
#![cfg(feature = "gstreamer")]

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ganomalyd::capture::{CaptureError, FrameData, PixelFormat, SourcePlan};
use ganomalyd::config::Settings;
use ganomalyd::events::{Recorded, Recorder};
use ganomalyd::metrics::CameraCounters;
use ganomalyd::pipeline::{Pipeline, StartOptions};

mod gst_support;
mod support;

use gst_support::{Codec, RtspServer, ServerOptions};

/// Every log line of this test binary (all threads: camera threads are spawned).
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log() -> &'static LogBuf {
    static LOG: OnceLock<LogBuf> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = LogBuf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buf
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&log().0.lock().expect("log")).into_owned()
}

fn settings(dir: &std::path::Path, source: &str, extra: &str) -> Settings {
    let model = support::fixture_model(dir, "m.onnx", 7);
    let body = format!(
        r#"
        [inference]
        providers = ["cpu"]
        [snapshots]
        enabled = false
        [pipeline]
        stats_interval_s = 0.2
        [cameras.ipcam]
        model = "{}"
        width = 64
        height = 48
        fps = 15
        source = {source}
        {extra}
        "#,
        model.display()
    );
    support::compile(dir, &body)
}

fn start(cfg: &Settings, rec: &Recorder) -> Pipeline {
    let opts = StartOptions {
        sources: BTreeMap::new(),
        stats: true,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..StartOptions::default()
    };
    Pipeline::start(cfg, Arc::new(rec.clone()), opts).expect("pipeline starts")
}

/// Waits up to `secs` for `cond`, failing with `what`.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn online_changes(rec: &Recorder) -> Vec<bool> {
    rec.events()
        .into_iter()
        .filter_map(|e| if let Recorded::CameraOnline(_, on) = e { Some(on) } else { None })
        .collect()
}

/// What the camera threads logged about failed opens, lost cameras and
/// broken frames after `since` (a [`log_mark`]): printed when an assertion
/// on a camera's state or counts fails, so a failure says why.
fn camera_log(since: usize) -> String {
    let keep = ["camera open failed", "camera lost", "wedged", "broken frame", "camera state"];
    let text = log_text();
    let text = text.get(since..).unwrap_or(&text);
    text.lines().filter(|l| keep.iter().any(|k| l.contains(k))).collect::<Vec<_>>().join("\n")
}

/// Where the log stands: a test's own lines follow (the tests stream one at a time).
fn log_mark() -> usize {
    log().0.lock().map(|b| b.len()).unwrap_or(0)
}

/// Held by every test that streams: each runs an encoder, a decoder and a
/// pipeline, and side by side on a 2-core box they starve each other until
/// packets arrive late, timestamps jump and first frames time out; that is
/// the load these tests would then measure, not the behaviour they name. A
/// failed test's poisoned lock still serialises the rest.
fn one_stream_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static STREAMS: Mutex<()> = Mutex::new(());
    STREAMS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The compiled plan of a `source = {...}` table, as `run` builds it.
fn plan(dir: &std::path::Path, source: &str) -> Arc<dyn SourcePlan> {
    let cfg = settings(dir, source, "");
    cfg.cameras[0].source.clone()
}

#[test]
fn rtsp_h264_is_scored_through_the_whole_pipeline_with_its_decoder_in_stats() {
    let _serial = one_stream_at_a_time();
    let mark = log_mark();
    let server = RtspServer::start_new(ServerOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg =
        settings(dir.path(), &format!(r#"{{ kind = "rtsp", url = "{}", latency_ms = 50 }}"#, server.url(None)), "");
    let rec = Recorder::default();
    let p = start(&cfg, &rec);
    wait_for(30, "20 decided frames", || p.decided() >= 20);
    wait_for(10, "a stats message naming the decoder", || {
        rec.events().iter().any(|e| matches!(e, Recorded::Stats(s) if s.cameras[0].decoder.is_some()))
    });
    let report = p.shutdown();
    let stats = rec
        .events()
        .into_iter()
        .rev()
        .find_map(|e| if let Recorded::Stats(s) = e { s.cameras[0].decoder.clone() } else { None })
        .expect("decoder");
    // No hardware decoder on the test machines: libav's.
    assert_eq!(stats, "avdec_h264");
    assert!(log_text().contains("decoder in use"), "the decoder is logged");
    let scores = rec.scores();
    assert!(scores.len() >= 20, "{} scores", scores.len());
    // Timestamps from the pipeline's realtime clock: within seconds of now.
    let now = ganomalyd::events::now_ms();
    assert!(scores.iter().all(|s| s.ts <= now && now - s.ts < 60_000), "timestamps {:?}", &scores[..3]);
    let cam = &report.cameras[0];
    assert_eq!(cam.broken, 0, "{cam:?}\n{}", camera_log(mark));
    assert_eq!(online_changes(&rec), vec![true], "{}", camera_log(mark));
}

#[test]
fn rtsp_h265_is_decoded() {
    let _serial = one_stream_at_a_time();
    let server = RtspServer::start_new(ServerOptions { codec: Codec::H265, ..ServerOptions::default() });
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = plan(dir.path(), &format!(r#"{{ kind = "rtsp", url = "{}", transport = "udp" }}"#, server.url(None)));
    let mut src = (plan.factory())();
    src.open().expect("open");
    let mut f = FrameData::default();
    for _ in 0..5 {
        src.next_frame(&mut f).expect("frame");
    }
    assert_eq!((f.width, f.height, f.format), (64, 48, PixelFormat::Rgb8));
    assert_eq!(src.decoder().as_deref(), Some("avdec_h265"));
    // The ball pattern moves on black: not an empty frame.
    assert!(f.data.iter().any(|&v| v > 128) && f.data.iter().any(|&v| v < 64));
}

#[test]
fn rtsp_server_stopped_is_offline_and_restarted_is_online() {
    let _serial = one_stream_at_a_time();
    let mut server = RtspServer::start_new(ServerOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = settings(
        dir.path(),
        &format!(r#"{{ kind = "rtsp", url = "{}", latency_ms = 50, timeout_s = 1 }}"#, server.url(None)),
        "",
    );
    let rec = Recorder::default();
    let p = start(&cfg, &rec);
    wait_for(30, "frames", || p.decided() >= 5);
    server.stop();
    wait_for(20, "the camera offline", || online_changes(&rec) == [true, false]);
    let before = p.decided();
    server.start();
    wait_for(30, "the camera online again", || online_changes(&rec) == [true, false, true]);
    wait_for(30, "frames after the restart", || p.decided() >= before + 5);
    p.shutdown();
}

#[test]
fn rtsp_wrong_credentials_are_named_retried_and_never_logged() {
    let _serial = one_stream_at_a_time();
    log();
    let server = RtspServer::start_new(ServerOptions {
        auth: Some(("op".into(), "s3cret-Right".into())),
        ..ServerOptions::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = "Wr0ng-hunter2";
    let rtsp = |pw: &str| format!(r#"{{ kind = "rtsp", url = "{}" }}"#, server.url(Some(("op", pw))));
    // The source alone: the reason names the credentials, not the password.
    let mut src = (plan(dir.path(), &rtsp(wrong)).factory())();
    for _ in 0..2 {
        match src.open() {
            Err(e @ CaptureError::Open { .. }) => {
                let e = e.to_string();
                assert!(e.contains("401") && e.contains("credentials"), "{e}");
                assert!(!e.contains(wrong), "{e}");
            }
            Err(other) => panic!("expected an open error, got {other}"),
            Ok(()) => panic!("opened with a wrong password"),
        }
    }
    let mut ok = (plan(dir.path(), &rtsp("s3cret-Right")).factory())();
    ok.open().expect("the right password opens");
    ok.next_frame(&mut FrameData::default()).expect("frame");
    ok.close();
    // The whole daemon: retried with backoff, offline, the password nowhere in the log.
    let cfg = settings(dir.path(), &rtsp(wrong), "");
    let rec = Recorder::default();
    let p = start(&cfg, &rec);
    wait_for(20, "two failed opens in the log", || log_text().matches("camera open failed").count() >= 2);
    p.shutdown();
    assert_eq!(online_changes(&rec), vec![false]);
    let text = log_text();
    assert!(text.contains("401"), "the reason is logged");
    assert!(!text.contains(wrong) && !text.contains("s3cret-Right"), "a password in the log:\n{text}");
}

#[test]
fn rtsp_resolution_change_mid_stream() {
    let _serial = one_stream_at_a_time();
    let server = RtspServer::start_new(ServerOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = (plan(dir.path(), &format!(r#"{{ kind = "rtsp", url = "{}" }}"#, server.url(None))).factory())();
    src.open().expect("open");
    let mut f = FrameData::default();
    src.next_frame(&mut f).expect("frame");
    assert_eq!((f.width, f.height), (64, 48));
    server.set_size(96, 80);
    let t = Instant::now();
    loop {
        src.next_frame(&mut f).expect("frames go on through the change");
        if (f.width, f.height) == (96, 80) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "still {}x{}", f.width, f.height);
    }
    assert_eq!(f.data.len(), 96 * 80 * 3);
}

#[test]
fn rtsp_corrupt_nal_units_are_broken_frames_and_the_camera_stays_up() {
    let _serial = one_stream_at_a_time();
    let mark = log_mark();
    let server = RtspServer::start_new(ServerOptions { corrupt_every: 4, ..ServerOptions::default() });
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg =
        settings(dir.path(), &format!(r#"{{ kind = "rtsp", url = "{}", latency_ms = 50 }}"#, server.url(None)), "");
    let rec = Recorder::default();
    let p = start(&cfg, &rec);
    let c = p.counters()[0].1.clone();
    wait_for(40, "broken frames and decided frames", || {
        CameraCounters::get(&c.broken) >= 3 && CameraCounters::get(&c.decided) >= 10
    });
    let report = p.shutdown();
    assert!(server.corrupted.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    // Never offline: a corrupt frame is not a lost camera.
    assert_eq!(online_changes(&rec), vec![true], "{:?}\n{}", report.cameras[0], camera_log(mark));
}

#[test]
fn rtsp_a_stream_that_starts_damaged_opens_at_its_next_key_frame() {
    let _serial = one_stream_at_a_time();
    // The first two frames (the first key frame among them) do not decode;
    // the next key frame, a second later, starts the picture. avdec_h264
    // drops such frames without a word, so they are not counted as broken
    // (a warning before the first frame is: gst_engine's unit tests).
    let server = RtspServer::start_new(ServerOptions { corrupt_first: 2, ..ServerOptions::default() });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = (plan(dir.path(), &format!(r#"{{ kind = "rtsp", url = "{}" }}"#, server.url(None))).factory())();
    src.open().expect("a damaged start is not a failed open");
    let mut f = FrameData::default();
    let mut frames = 0;
    while frames < 3 {
        match src.next_frame(&mut f) {
            Ok(()) => frames += 1,
            Err(CaptureError::BrokenFrame { .. }) => {}
            Err(e) => panic!("the camera was lost: {e}"),
        }
    }
    // At least: a reconnect would make a new stream, damaged again.
    assert!(server.corrupted.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert_eq!((f.width, f.height), (64, 48));
    assert!(f.data.iter().any(|&v| v > 128), "a picture, not a gray frame");
}

#[test]
fn a_user_pipeline_feeds_the_whole_pipeline() {
    let _serial = one_stream_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = settings(
        dir.path(),
        r#"{ kind = "gstreamer", pipeline = "videotestsrc is-live=true num-buffers=12 ! video/x-raw,width=40,height=30,framerate=30/1 ! videoconvert ! appsink name=ganomaly" }"#,
        "",
    );
    let rec = Recorder::default();
    let p = start(&cfg, &rec);
    // 12 frames, then end of stream: offline, restarted, 12 more.
    wait_for(30, "frames from two runs of the pipeline", || p.decided() >= 15);
    p.shutdown();
    let changes = online_changes(&rec);
    assert!(changes.starts_with(&[true, false, true]), "{changes:?}");
}

#[test]
fn check_config_names_what_a_gstreamer_source_lacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = support::fixture_model(dir.path(), "m.onnx", 7);
    let body = |source: &str| {
        format!("[inference]\nproviders = [\"cpu\"]\n[cameras.c]\nmodel = \"{}\"\nsource = {source}\n", model.display())
    };
    let e = ganomalyd::config::compile_str(
        &body(r#"{ kind = "gstreamer", pipeline = "videotestsrc ! nosuchelement ! appsink name=ganomaly" }"#),
        dir.path(),
    )
    .expect_err("a missing element is refused")
    .to_string();
    assert!(e.contains("cameras.c.source.pipeline") && e.contains("nosuchelement"), "{e}");
    let e = ganomalyd::config::compile_str(
        &body(r#"{ kind = "rtsp", url = "rtsp://op:hunter2@127.0.0.1:1/x", transport = "sctp" }"#),
        dir.path(),
    )
    .expect_err("a bad transport is refused")
    .to_string();
    assert!(e.contains("cameras.c.source.transport") && !e.contains("hunter2"), "{e}");
    ganomalyd::config::compile_str(
        &body(r#"{ kind = "genicam", serial = "GV01", pixel_format = "bayer_rggb", features = { ExposureTime = 100.0 } }"#),
        dir.path(),
    )
    .expect("a genicam table compiles (the camera is looked for at open)");
}
