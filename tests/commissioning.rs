//! Commissioning a line through the binaries (issue 13): a replay camera of good
//! frames → `ganomalyd record` → `ganomaly-train train` → the daemon running the
//! new model → a live `calibrate` → an alarm's `feedback` lands in `val/` → the
//! next `ganomaly-train train --init … --feedback …` uses it (its report says so).
//! Bad input on the way: a record into a non-empty folder without `--append`,
//! an unknown alarm id, a calibrate while an alarm is active: each refused with
//! its reason, nothing lost.
//!
//! The trainer is another package: its binary is found at `GANOMALY_TRAIN_BIN`,
//! else `target/debug/ganomaly-train` (`cargo test --workspace`, as `make test`
//! runs it, builds it before any test runs). Without it the test is skipped,
//! unless `GANOMALY_REQUIRE_TRAINER=1` (the Makefile sets it) makes that a failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

const DAEMON: &str = env!("CARGO_BIN_EXE_ganomalyd");

fn trainer() -> Option<PathBuf> {
    let p = std::env::var_os("GANOMALY_TRAIN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/ganomaly-train"));
    if p.is_file() {
        return Some(p);
    }
    let required = std::env::var("GANOMALY_REQUIRE_TRAINER").is_ok_and(|v| v == "1");
    assert!(!required, "GANOMALY_REQUIRE_TRAINER=1 but there is no trainer binary at {}", p.display());
    eprintln!("skipped: no trainer binary at {} (cargo build -p ganomaly-train)", p.display());
    None
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Runs a binary to its end; (success, stdout, stderr).
fn run(bin: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn images(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "png")).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    let code = got.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = got.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)))
}

fn get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes());
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    got
}

/// The daemon as a child process, its JSON log in a file.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(cfg: &Path, log: &Path) -> Daemon {
        let file = std::fs::File::create(log).expect("log file");
        let child = Command::new(DAEMON)
            .args(["--log-json", "run", "--config", s(cfg)])
            .env("RUST_LOG", "info,ort=warn")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start ganomalyd");
        Daemon { child, log: log.to_path_buf() }
    }

    /// The id of the latest logged alarm start of `camera`.
    fn alarm_start(&self, camera: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            // The latest: the daemon keeps only the last few alarms' frames.
            let last = text.lines().rev().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| {
                let f = &v["fields"];
                f["message"] == "alarm" && f["camera"] == camera && f["kind"] == "Start"
            });
            if let Some(v) = last {
                return v["fields"]["id"].as_str().unwrap_or_default().to_string();
            }
            assert!(Instant::now() < deadline, "no alarm on {camera} within {within:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Daemon {
    /// Log lines whose message is `message`.
    fn log_lines(&self, message: &str) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn record_train_run_calibrate_feedback_and_retrain() {
    let Some(train) = trainer() else { return };
    support::dev_ort();
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();

    // Good frames of "the line": core's generator through the trainer's datagen.
    let frames = t.join("frames");
    let (ok, _, err) = run(
        &train,
        &[
            "datagen",
            "--out",
            s(&frames),
            "--size",
            "64",
            "--seed",
            "3",
            "--train-good",
            "48",
            "--test-good",
            "4",
            "--test-per-defect",
            "2",
        ],
    );
    assert!(ok, "datagen: {err}");
    let commissioning = t.join("commissioning");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    let config = |good_model: &Path| {
        format!(
            "[inference]\nproviders = [\"cpu\"]\n[snapshots]\nenabled = false\n\
             [commands]\nenabled = true\n[metrics]\nenabled = true\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             [commissioning]\ndir = \"{}\"\nkeep_alarm_frames = 4\n\
             [cameras.good]\nmodel = \"{}\"\nfps = 40\nsource = {{ kind = \"replay\", path = \"{}\" }}\n\
             [cameras.good.alarm]\nthreshold = 1.0\nclear_threshold = 0.9\nmin_frames = 100000\n\
             [cameras.line]\nmodel = \"{}\"\nfps = 40\n\
             source = {{ kind = \"synthetic\", size = 64, variations = 8, defect_every = 120, defect_frames = 60, strength = 1.0 }}\n\
             [cameras.line.alarm]\nmin_frames = 2\nclear_frames = 3\n",
            commissioning.display(),
            good_model.display(),
            frames.join("train/good").display(),
            demo.display()
        )
    };

    // 1. ganomalyd record: 30 ROI frames of the replay camera into REC/train/good.
    let cfg = t.join("ganomalyd.toml");
    std::fs::write(&cfg, config(&demo)).expect("config");
    let rec = t.join("rec");
    let (ok, out, err) = run(
        Path::new(DAEMON),
        &[
            "record",
            "--config",
            s(&cfg),
            "--camera",
            "good",
            "--out",
            s(&rec),
            "--count",
            "30",
            "--min-change",
            "0.5",
            "--quiet",
        ],
    );
    assert!(ok, "record: {out}{err}");
    let recorded = images(&rec.join("train/good"));
    assert_eq!(recorded.len(), 30, "{out}");
    assert!(out.contains("recorded 30 image(s)"), "{out}");
    assert_eq!(image::open(&recorded[0]).expect("a PNG").to_rgb8().dimensions(), (64, 64), "full resolution");
    // Bad input: the same folder again without --append is refused, nothing lost.
    let (ok, _, err) = run(
        Path::new(DAEMON),
        &["record", "--config", s(&cfg), "--camera", "good", "--out", s(&rec), "--count", "5", "--quiet"],
    );
    assert!(!ok && err.contains("--append") && err.contains("30 file(s)"), "{err}");
    assert_eq!(images(&rec.join("train/good")), recorded, "nothing lost or added");

    // 2. ganomaly-train train on the recording (small and short: the test is the loop, not the model).
    let model = t.join("line.onnx");
    let common = [
        "--isize",
        "32",
        "--ngf",
        "8",
        "--ndf",
        "8",
        "--nz",
        "16",
        "--batch",
        "16",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--holdout",
        "0.2",
    ];
    let mut args = vec!["train", "--data", s(&rec), "--out", s(&model), "--epochs", "2"];
    args.extend(common);
    let (ok, out, err) = run(&train, &args);
    assert!(ok && model.is_file(), "train: {out}{err}");

    // 3. The daemon with the new model on camera `good` (and the demo model on `line`, whose defects raise alarms).
    std::fs::write(&cfg, config(&model)).expect("config");
    let (ok, out, err) = run(Path::new(DAEMON), &["check-config", s(&cfg)]);
    assert!(ok, "check-config: {out}{err}");
    assert!(out.contains("camera good: threshold") && out.contains("from model metadata"), "{out}");
    let daemon = Daemon::spawn(&cfg, &t.join("daemon.log"));
    let addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().expect("addr");
    wait_for("/healthz ok", Duration::from_secs(60), || get(addr, "/healthz").starts_with("HTTP/1.1 200"));

    // ---- SIGHUP model swap (issue 13 item 2): its guarantees (every alarm arrives, no
    // frame gap on the other camera) are tests/reload.rs's; here only how it meets a
    // live calibration, below (step 4b). ----

    // 4. Live calibration of `good` on 60 frames: applied at once, kept in calibration.json.
    let (code, ans) = post(addr, "/api/cmd/good/calibrate", r#"{"frames": 60, "target_far": 0.05}"#);
    assert_eq!(code, 200, "{ans}");
    let state_file = commissioning.join("calibration.json");
    wait_for("calibration.json", Duration::from_secs(60), || state_file.is_file());
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_file).expect("read")).expect("json");
    let live = &state["cameras"]["good"];
    assert_eq!(live["scores"], 60, "{state}");
    assert!(live["calibration"]["threshold"].as_f64().is_some_and(f64::is_finite), "{state}");
    let (ok, out, _) = run(Path::new(DAEMON), &["check-config", s(&cfg)]);
    assert!(ok && out.contains("camera good: threshold") && out.contains("live calibration in"), "{out}");

    // 4b. A second export swapped in by SIGHUP: the live calibration was made for the
    // first, so the camera decides with the new model's own until calibrated again,
    // and a calibration then is kept for the new model.
    let model_b = t.join("line-b.onnx");
    let mut args = vec!["train", "--data", s(&rec), "--out", s(&model_b), "--epochs", "1", "--seed", "7"];
    args.extend(common);
    let (ok, out, err) = run(&train, &args);
    assert!(ok, "train b: {out}{err}");
    std::fs::write(&cfg, config(&model_b)).expect("config");
    let (ok, out, _) = run(Path::new(DAEMON), &["check-config", s(&cfg)]);
    assert!(ok && out.contains("camera good: threshold") && out.contains("from model metadata"), "{out}");
    let before_swap = daemon.log_lines("reload");
    assert!(Command::new("kill").args(["-HUP", &daemon.child.id().to_string()]).status().expect("kill").success());
    wait_for("the swap", Duration::from_secs(60), || daemon.log_lines("reload") > before_swap);
    let (code, ans) = post(addr, "/api/cmd/good/calibrate", r#"{"frames": 40, "target_far": 0.05}"#);
    assert_eq!(code, 200, "{ans}");
    let model_b_id = |st: &serde_json::Value| st["cameras"]["good"]["model"].as_str().map(String::from);
    wait_for("a calibration for the new model", Duration::from_secs(60), || {
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_file).unwrap_or_default()).unwrap_or_default();
        model_b_id(&st).as_deref() == Some(s(&model_b))
    });
    let (ok, out, _) = run(Path::new(DAEMON), &["check-config", s(&cfg)]);
    assert!(ok && out.contains("live calibration in"), "{out}");

    // The running daemon records too (frames tapped on their way to preprocessing).
    let (code, ans) = post(addr, "/api/cmd/good/record", r#"{"name": "live", "count": 5, "min_change": 0.5}"#);
    assert_eq!(code, 200, "{ans}");
    let live_dir = commissioning.join("record/live/train/good");
    wait_for("5 recorded frames", Duration::from_secs(60), || images(&live_dir).len() == 5);
    wait_for("the recording ends", Duration::from_secs(30), || {
        let (code, ans) = post(addr, "/api/cmd/good/record", r#"{"name": "live", "count": 1}"#);
        // While the first runs the tap is busy; once it is done the folder is not empty.
        code == 422 && ans["reason"].as_str().unwrap_or("").contains("append")
    });
    assert_eq!(images(&live_dir).len(), 5, "the refused recordings added nothing");

    // Bad input: calibrate `line` while its alarm is active: refused, saying why.
    let mut refused = None;
    for _ in 0..40 {
        let m = get(addr, "/metrics");
        if m.contains("ganomalyd_alarm_active{camera=\"line\"} 1") {
            let (code, ans) = post(addr, "/api/cmd/line/calibrate", r#"{"frames": 50}"#);
            if code == 422 {
                refused = Some(ans);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = refused.expect("a calibrate during an alarm was refused");
    assert!(refused["reason"].as_str().unwrap_or("").contains("alarm is active"), "{refused}");

    // 5. Feedback on a `line` alarm: its ROI frame and sidecar land in val/good.
    let id = daemon.alarm_start("line", Duration::from_secs(60));
    let (code, ans) = post(addr, "/api/cmd/line/feedback", r#"{"alarm_id": "line-0-999", "verdict": "ok"}"#);
    assert_eq!(code, 422, "{ans}");
    assert!(ans["reason"].as_str().unwrap_or("").contains("unknown alarm id `line-0-999`"), "{ans}");
    let (code, ans) =
        post(addr, "/api/cmd/line/feedback", &format!(r#"{{"alarm_id": "{id}", "verdict": "ok", "note": "glare"}}"#));
    assert_eq!(code, 200, "{ans}");
    let fb = commissioning.join("feedback/line");
    let stored = images(&fb.join("val/good"));
    assert_eq!(stored.len(), 1, "{ans}");
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored[0].with_extension("json")).expect("sidecar")).expect("json");
    assert_eq!((sidecar["alarm_id"].as_str(), sidecar["note"].as_str()), (Some(id.as_str()), Some("glare")));
    wait_for("feedback counted", Duration::from_secs(10), || {
        get(addr, "/metrics").contains("ganomalyd_feedback_false_alarms_total{camera=\"line\"} 1")
    });
    drop(daemon);

    // Without a running daemon, `ganomalyd calibrate` does the same with its own source.
    let (ok, out, err) =
        run(Path::new(DAEMON), &["calibrate", "--config", s(&cfg), "--camera", "good", "--frames", "30"]);
    assert!(ok && out.contains("camera good: threshold on raw") && out.contains("30 live scores"), "{out}{err}");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_file).expect("read")).expect("json");
    assert_eq!(state["cameras"]["good"]["scores"], 30, "{state}");
    let (ok, _, err) = run(Path::new(DAEMON), &["calibrate", "--config", s(&cfg), "--camera", "good"]);
    assert!(!ok && err.contains("frames and/or --duration"), "{err}");

    // 6. The next training run starts from the model and uses the feedback.
    let model2 = t.join("line2.onnx");
    let report = t.join("report2");
    let mut args = vec![
        "train",
        "--data",
        s(&rec),
        "--out",
        s(&model2),
        "--epochs",
        "1",
        "--init",
        s(&model),
        "--feedback",
        s(&fb),
        "--report",
        s(&report),
    ];
    args.extend(common);
    let (ok, out, err) = run(&train, &args);
    assert!(ok, "retrain: {out}{err}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).expect("report")).expect("json");
    assert_eq!(r["feedback"]["good"], 1, "{}", r["feedback"]);
    assert_eq!(r["init"].as_str(), Some(s(&model)));
    assert!(r["n_holdout"].as_u64().is_some());
}
