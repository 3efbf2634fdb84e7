//! The `ganomalyd` binary as an ops engineer meets it: `check-config` on
//! broken files, `run` on broken models and impossible provider demands,
//! `score` on images, and a clean SIGTERM shutdown. Every failure must be a
//! clear message naming the field, key or tensor, and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;

const BIN: &str = env!("CARGO_BIN_EXE_ganomalyd");

/// Runs the binary from the package root, with ONNX Runtime's path in the
/// environment (the daemon searches no `.venv` itself).
fn ganomalyd(args: &[&str], _dir: &Path) -> Output {
    support::dev_ort();
    Command::new(BIN)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "info")
        .output()
        .expect("run ganomalyd")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn fixture_model(dir: &Path) -> PathBuf {
    support::fixture_model(dir, "m.onnx", 3)
}

/// A valid config with one synthetic camera, plus `extra` appended.
fn write_config(dir: &Path, model: &Path, extra: &str) -> PathBuf {
    support::write_config(dir, model, 20, r#"{ kind = "synthetic", size = 48, variations = 2 }"#, extra)
}

fn check(dir: &Path, cfg: &Path) -> Output {
    ganomalyd(&["check-config", cfg.to_str().expect("utf8")], dir)
}

/// `check-config` fails on `cfg`, and what it prints contains `what`.
fn refused_saying(dir: &Path, cfg: &Path, what: &str) {
    let o = check(dir, cfg);
    assert!(!o.status.success(), "accepted: {}", text(&o));
    assert!(text(&o).contains(what), "{}", text(&o));
}

#[test]
fn a_valid_config_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &fixture_model(dir.path()), "");
    let o = check(dir.path(), &cfg);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ok (1 camera(s))"), "{}", text(&o));
}

#[test]
fn unknown_keys_fail_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &fixture_model(dir.path()), "[cameras.cam.alarm]\nmin_frame = 3\n");
    let o = check(dir.path(), &cfg);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("min_frame") && t.contains("unknown field"), "{t}");
}

#[test]
fn wrong_types_fail_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture_model(dir.path());
    let cfg = write_config(dir.path(), &model, "");
    let body = std::fs::read_to_string(&cfg).expect("read").replace("fps = 20", "fps = \"twenty\"");
    std::fs::write(&cfg, body).expect("write");
    refused_saying(dir.path(), &cfg, "fps");
}

#[test]
fn every_bad_range_is_reported_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture_model(dir.path());
    let cfg = write_config(
        dir.path(),
        &model,
        "[cameras.cam.alarm]\nmin_frames = 0\nclear_frames = 0\nthreshold = 1.5\n[cameras.other]\nscore = \"psnr\"\n\
         [cameras.ip]\nsource = { kind = \"http-mjpeg\", url = \"https://cam/mjpg\", timeout_s = 0 }\n\
         [cameras.ip2]\nsource = { kind = \"http-mjpeg\", url = \"cam:80/mjpg\" }\n\
         [metrics]\nenabled = true\nlisten = \"localhost\"\nstale_after_s = 0.5\n",
    );
    let body = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("providers = [\"cpu\"]", "providers = [\"cpu\"]\nmax_batch = 0");
    std::fs::write(&cfg, body).expect("write");
    let o = check(dir.path(), &cfg);
    assert!(!o.status.success());
    let t = text(&o);
    for want in [
        "inference.max_batch: must be between 1 and 256",
        "cameras.cam.alarm.min_frames: must be ≥ 1",
        "cameras.cam.alarm.clear_frames: must be ≥ 1",
        "cameras.cam.alarm.threshold: must be between 0 and 1",
        "cameras.other.score: `psnr`",
        "cameras.other.source: missing",
        "metrics.listen: `localhost` is not an address and port",
        "cameras.ip.source.url: `https://cam/mjpg`: https is not supported",
        "cameras.ip.source.timeout_s: must be between 0.1 and 8",
        "cameras.ip2.source.url: `cam:80/mjpg` is not an http:// URL",
        "metrics.stale_after_s: must be between 2 and 3600",
    ] {
        assert!(t.contains(want), "missing `{want}` in:\n{t}");
    }
}

#[test]
fn a_clear_threshold_that_can_never_be_reached_is_refused() {
    // threshold 0.03 derives clear_threshold −0.02: normalized scores never go
    // that low, so an alarm would never end.
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture_model(dir.path());
    let cfg = write_config(dir.path(), &model, "[cameras.cam.alarm]\nthreshold = 0.03\n");
    refused_saying(dir.path(), &cfg, "cameras.cam.alarm.clear_threshold: must be > 0");
}

#[test]
fn an_unknown_camera_device_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        dir.path(),
        &fixture_model(dir.path()),
        "[cameras.line3]\nsource = { kind = \"v4l2\", device = \"/dev/video42\" }\n",
    );
    let o = check(dir.path(), &cfg);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("cameras.line3.source.device: /dev/video42 does not exist"), "{t}");
}

#[test]
fn broken_models_fail_check_config_and_run_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_onnx = dir.path().join("junk.onnx");
    std::fs::write(&not_onnx, b"\xff\xfe definitely not protobuf").expect("write");
    let cfg = write_config(dir.path(), &not_onnx, "");
    let o = check(dir.path(), &cfg);
    assert!(!o.status.success());
    assert!(text(&o).contains("cameras.cam.model") && text(&o).contains("not an ONNX model"), "{}", text(&o));

    // A model without its metadata: `run` itself refuses it too.
    let good = std::fs::read(fixture_model(dir.path())).expect("read");
    let from = b"ganomaly.preprocess";
    let pos = good.windows(from.len()).position(|w| w == from).expect("key present");
    let mut stripped = good.clone();
    stripped[pos..pos + from.len()].copy_from_slice(b"ganomaly.xxxxxxxxxx");
    let no_meta = dir.path().join("nometa.onnx");
    std::fs::write(&no_meta, stripped).expect("write");
    let cfg = write_config(dir.path(), &no_meta, "");
    let o = ganomalyd(&["run", "--config", cfg.to_str().expect("utf8")], dir.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("ganomaly.preprocess") && text(&o).contains("missing"), "{}", text(&o));
}

#[test]
fn require_accelerator_fails_start_up_on_a_cpu_only_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &fixture_model(dir.path()), "");
    let body = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("providers = [\"cpu\"]", "providers = [\"tensorrt\", \"cuda\"]\nrequire_accelerator = true");
    std::fs::write(&cfg, body).expect("write");
    let o = ganomalyd(&["run", "--config", cfg.to_str().expect("utf8")], dir.path());
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("require_accelerator") && t.contains("tensorrt") && t.contains("cuda"), "{t}");
}

#[test]
fn score_prints_every_kind_and_warns_about_the_cpu_fallback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture_model(dir.path());
    let img = dir.path().join("part.png");
    image::RgbImage::from_pixel(50, 40, image::Rgb([90, 100, 110])).save(&img).expect("png");
    let missing = dir.path().join("missing.png");
    let o = ganomalyd(
        &[
            "score",
            "--model",
            model.to_str().expect("utf8"),
            "--json",
            img.to_str().expect("utf8"),
            missing.to_str().expect("utf8"),
        ],
        dir.path(),
    );
    // One image could not be read: reported on its line, and the exit says so.
    assert!(!o.status.success());
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let first = &lines[0];
    assert_eq!(first["path"], img.display().to_string());
    let kinds: Vec<&str> =
        first["scores"].as_array().expect("scores").iter().map(|k| k["kind"].as_str().expect("kind")).collect();
    assert_eq!(kinds, ["latent", "recon", "map_max", "mahalanobis", "patch", "fused"]);
    for k in first["scores"].as_array().expect("scores") {
        let (raw, norm) = (k["raw"].as_f64().expect("raw"), k["normalized"].as_f64().expect("normalized"));
        assert!(raw.is_finite() && (0.0..=1.0).contains(&norm), "{k}");
        assert_eq!(k["anomalous"].as_bool(), Some(raw >= k["threshold"].as_f64().expect("threshold")));
    }
    assert!(lines[1]["error"].is_string(), "{}", lines[1]);
    // Default providers (tensorrt, cuda, cpu) on a CPU-only ONNX Runtime.
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("falling back to the CPU"), "{stderr}");
}

/// Starts `ganomalyd run` on `cfg`, logging to `log`, and waits until it runs
/// with its camera online.
fn start_daemon(cfg: &Path, log: &Path) -> std::process::Child {
    support::dev_ort();
    let mut child = Command::new(BIN)
        .args(["run", "--config", cfg.to_str().expect("utf8")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn daemon");
    let t = Instant::now();
    loop {
        let l = std::fs::read_to_string(log).unwrap_or_default();
        if l.contains("ganomalyd running") && l.contains("online=true") {
            return child;
        }
        if t.elapsed() > Duration::from_secs(60) || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("daemon did not come up:\n{l}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then the exit status once the daemon has stopped.
fn stop_daemon(mut child: std::process::Child) -> std::process::ExitStatus {
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("daemon did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_stops_the_daemon_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &fixture_model(dir.path()), "");
    let log = dir.path().join("log.txt");
    let status = stop_daemon(start_daemon(&cfg, &log));
    let l = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status:?}\n{l}");
    assert!(l.contains("camera totals") && l.contains("stopped"), "{l}");
}

#[test]
fn metrics_and_healthz_answer_while_the_daemon_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Port 0: the system picks a free one, and the log says which.
    let cfg =
        write_config(dir.path(), &fixture_model(dir.path()), "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n");
    let log = dir.path().join("log.txt");
    let child = start_daemon(&cfg, &log);
    let l = std::fs::read_to_string(&log).unwrap_or_default();
    let addr = l.split("metrics on http://").nth(1).and_then(|r| r.split("/metrics").next()).map(str::to_string);
    let Some(addr) = addr else {
        stop_daemon(child);
        panic!("no metrics address in the log:\n{l}");
    };
    let get = |path: &str| {
        let mut r = ureq::get(&format!("http://{addr}{path}"))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .expect("GET");
        (r.status().as_u16(), r.body_mut().read_to_string().expect("body"))
    };
    // Frames keep flowing: a later scrape counts more decided frames.
    let decided = |body: &str| -> u64 {
        body.lines()
            .find_map(|x| x.strip_prefix("ganomalyd_frames_decided_total{camera=\"cam\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no decided counter in\n{body}"))
    };
    let (code, first) = get("/metrics");
    assert_eq!(code, 200, "{first}");
    std::thread::sleep(Duration::from_millis(500));
    let (_, second) = get("/metrics");
    assert!(decided(&second) > decided(&first), "{first}\n---\n{second}");
    assert!(second.contains("ganomalyd_camera_online{camera=\"cam\"} 1"), "{second}");
    assert!(
        second.contains("ganomalyd_alarm_active{camera=\"cam\"} ")
            && second.contains("ganomalyd_score{camera=\"cam\"} "),
        "{second}"
    );
    assert!(second.contains("provider=\"cpu\"} 1") && second.ends_with("# EOF\n"), "{second}");
    let (code, health) = get("/healthz");
    assert_eq!(code, 200, "{health}");
    let h: serde_json::Value = serde_json::from_str(&health).expect("healthz is JSON");
    assert_eq!((h["status"].as_str(), h["cameras"]["cam"].as_bool()), (Some("ok"), Some(true)), "{h}");
    assert_eq!(get("/nothing").0, 404);

    // A second daemon on the same port refuses to start, naming the key.
    let second = dir.path().join("second");
    std::fs::create_dir_all(&second).expect("mkdir");
    let taken =
        write_config(&second, &fixture_model(&second), &format!("[metrics]\nenabled = true\nlisten = \"{addr}\"\n"));
    let o = ganomalyd(&["run", "--config", taken.to_str().expect("utf8")], &second);
    let status = stop_daemon(child);
    assert!(!o.status.success());
    assert!(text(&o).contains(&format!("metrics.listen {addr}: cannot listen")), "{}", text(&o));
    assert!(status.success(), "{status:?}");
}

#[test]
fn offline_checks_a_fleet_config_without_its_files_and_keeps_the_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), Path::new("/opt/models/line3.onnx"), "");
    refused_saying(dir.path(), &cfg, "cameras.cam.model: /opt/models/line3.onnx does not exist");
    let o = ganomalyd(&["check-config", "--offline", cfg.to_str().expect("utf8")], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ok (1 camera(s), offline"), "{}", text(&o));
    // A range problem is still a problem offline, with the same exit code and message.
    let bad = write_config(dir.path(), Path::new("/opt/models/line3.onnx"), "[cameras.cam.alarm]\nmin_frames = 0\n");
    let o = ganomalyd(&["check-config", "--offline", bad.to_str().expect("utf8")], dir.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("cameras.cam.alarm.min_frames: must be ≥ 1"), "{}", text(&o));
}

#[test]
fn bench_cuts_the_latency_into_stages_that_fit_inside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture_model(dir.path());
    let o = ganomalyd(
        &[
            "bench",
            "--model",
            model.to_str().expect("utf8"),
            "--cameras",
            "2",
            "--paced",
            "40",
            "--frames",
            "60",
            "--batch",
            "4",
            "--width",
            "160",
            "--height",
            "120",
            "--json",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON: {}", text(&o)));
    let r: serde_json::Value = serde_json::from_str(line).expect("bench JSON");
    let stages = r["stages"].as_array().expect("stages");
    let names: Vec<&str> = stages.iter().filter_map(|s| s["stage"].as_str()).collect();
    assert_eq!(names, ["camera queue", "preprocess", "inference queue", "inference run", "decision"]);
    let (p50, p99) = (r["p50_ms"].as_f64().expect("p50"), r["p99_ms"].as_f64().expect("p99"));
    for s in stages {
        let (s50, s99) = (s["p50_ms"].as_f64().expect("stage p50"), s["p99_ms"].as_f64().expect("stage p99"));
        // Each frame's stage is a part of its latency, so each quantile of a
        // stage is at most the same quantile of the whole.
        assert!(s50 <= p50 && s99 <= p99, "{s} against p50 {p50} / p99 {p99}");
    }
    // The session run and the preprocessing are real work: never zero.
    assert!(stages[3]["p50_ms"].as_f64().is_some_and(|v| v > 0.0), "{stages:?}");
    assert!(stages[1]["p50_ms"].as_f64().is_some_and(|v| v > 0.0), "{stages:?}");
}
