//! A GigE Vision camera through the genicam source: Debian's
//! `arv-fake-gv-camera-0.8`, inside a private network namespace that has only
//! loopback. Aravis streams to the first non-loopback interface, and a test
//! may send nothing beyond loopback, so the test re-executes itself under
//! `unshare -n` (root; CI runs as root), brings `lo` up, and refuses to run the
//! camera where any other interface exists.
//!
//! Inside: the camera is discovered (`ganomalyd cameras`' list), a feature it
//! lacks is refused by name, its Bayer frames are scored through the whole
//! pipeline, and the camera process killed is an offline camera that comes
//! back online when it is restarted.
#![cfg(feature = "gstreamer")]

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ganomalyd::capture::{genicam, CaptureError, FrameData};
use ganomalyd::events::{Recorded, Recorder};
use ganomalyd::pipeline::{Pipeline, StartOptions};

mod support;

const INSIDE: &str = "GANOMALY_TEST_IN_NETNS";
const TEST: &str = "a_gige_camera_in_a_loopback_only_namespace";
const FAKE: &str = "arv-fake-gv-camera-0.8";

fn required() -> bool {
    std::env::var_os("GANOMALY_REQUIRE_GSTREAMER").is_some()
}

/// Skips (or fails, under `make test`) when the namespace cannot be had.
fn can_run() -> bool {
    let why = if Command::new(FAKE).arg("--help").output().is_err() {
        Some(format!("{FAKE} is not installed (Debian aravis-tools)"))
    } else if !Command::new("unshare").args(["-n", "true"]).status().is_ok_and(|s| s.success()) {
        Some("cannot create a network namespace (unshare -n needs root)".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if required() => panic!("{why}"),
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

#[test]
fn a_gige_camera_in_a_loopback_only_namespace() {
    if std::env::var_os(INSIDE).is_none() {
        if !can_run() {
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let status = Command::new("unshare")
            .args(["-n", "--", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
            .arg(exe)
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(INSIDE, "1")
            .status()
            .expect("run the test in a network namespace");
        assert!(status.success(), "the test inside the namespace failed: {status}");
        return;
    }
    inside_the_namespace();
}

struct Camera(Child);

impl Camera {
    fn start() -> Camera {
        let child = Command::new(FAKE).args(["-i", "127.0.0.1", "-s", "GV01"]).spawn().expect("start the fake camera");
        let t = Instant::now();
        while !genicam::discover().is_ok_and(|found| found.iter().any(|d| d.id.ends_with("-GV01"))) {
            assert!(t.elapsed() < Duration::from_secs(15), "the fake camera was never discovered");
            std::thread::sleep(Duration::from_millis(100));
        }
        Camera(child)
    }
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn inside_the_namespace() {
    // The one guard that keeps the camera's stream off any real network.
    // /proc/self/net is this namespace's (sysfs would show the mounter's).
    let interfaces: Vec<String> = std::fs::read_to_string("/proc/self/net/dev")
        .expect("/proc/self/net/dev")
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim().to_string()))
        .collect();
    assert_eq!(interfaces, ["lo"], "refusing to run a GigE camera with other interfaces present");

    let mut camera = Camera::start();
    let found = genicam::discover().expect("discovery");
    let fake = found.iter().find(|d| d.id.ends_with("-GV01")).expect("listed");
    assert_eq!(fake.address, "127.0.0.1");

    let dir = tempfile::tempdir().expect("tempdir");
    let model = support::fixture_model(dir.path(), "m.onnx", 3);
    let config = |source: &str| {
        support::compile(
            dir.path(),
            &format!(
                r#"
                [inference]
                providers = ["cpu"]
                [snapshots]
                enabled = false
                [cameras.gige]
                model = "{}"
                width = 64
                height = 48
                fps = 20
                source = {source}
                "#,
                model.display()
            ),
        )
    };

    // A feature this camera model does not have: refused by its name.
    let cfg = config(r#"{ kind = "genicam", serial = "GV01", features = { ExposureTimeAbs = 2000.0, Gain = 3.0 } }"#);
    let mut src = (cfg.cameras[0].source.factory())();
    match src.open() {
        Err(CaptureError::Open { reason, .. }) => assert!(reason.contains("no GenICam feature `Gain`"), "{reason}"),
        Err(other) => panic!("expected an open error, got {other}"),
        Ok(()) => panic!("opened with a feature the camera lacks"),
    }
    drop(src);

    // Mono stays gray.
    let cfg = config(r#"{ kind = "genicam", camera = "Aravis-Fake-GV01", pixel_format = "mono8" }"#);
    let mut src = (cfg.cameras[0].source.factory())();
    src.open().expect("open mono");
    let mut f = FrameData::default();
    src.next_frame(&mut f).expect("mono frame");
    assert_eq!((f.width, f.height, f.data.len()), (64, 48, 64 * 48));
    src.close();
    drop(src);

    // Bayer, debayered to RGB, through the whole pipeline.
    let cfg = config(
        r#"{ kind = "genicam", serial = "GV01", pixel_format = "bayer_rggb", features = { ExposureTimeAbs = 2000.0 }, timeout_s = 1 }"#,
    );
    let rec = Recorder::default();
    let opts = StartOptions {
        sources: BTreeMap::new(),
        stats: false,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        ..StartOptions::default()
    };
    let p = Pipeline::start(&cfg, Arc::new(rec.clone()), opts).expect("pipeline starts");
    let online = |rec: &Recorder| -> Vec<bool> {
        rec.events()
            .into_iter()
            .filter_map(|e| if let Recorded::CameraOnline(_, on) = e { Some(on) } else { None })
            .collect()
    };
    wait_for(30, "scored frames", || p.decided() >= 10);
    camera.kill();
    wait_for(30, "the camera offline", || online(&rec) == [true, false]);
    let before = p.decided();
    let _camera = Camera::start();
    wait_for(40, "the camera online again", || online(&rec) == [true, false, true]);
    wait_for(30, "frames after the restart", || p.decided() >= before + 10);
    let report = p.shutdown();
    assert!(rec.scores().len() as u64 >= before + 10, "{:?}", report.cameras[0]);
}
