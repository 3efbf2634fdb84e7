//! Reload without a restart and shadow models (issue 13, items 2 and 3).
//!
//! In-process pipelines with a recording publisher (every score and alarm,
//! unthrottled), and the daemon in-process against a real broker (the
//! `events` answers, the shadow topics, promotion by reload):
//! - a model swapped by reload while a synthetic camera raises alarms: every
//!   alarm has its start and end, ids unique; the other, unchanged camera
//!   skips no more than one batch of frames (its score seqs);
//! - cameras added, removed and changed: only those restart;
//! - a broken config and a broken model are refused, published, and the old
//!   model keeps scoring;
//! - a shadow's scores and alarms go to `<camera>/shadow/...` and never raise
//!   the camera's alarm; the stats compare the two; promoting it is a config
//!   change and a reload.

mod mqtt_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ganomaly_core::{ModelMetadata, Weights};
use ganomalyd::cmds::run::{daemon, Signal};
use ganomalyd::events::{AlarmKind, EndReason, Recorded, Recorder};
use ganomalyd::pipeline::{Pipeline, StartOptions};
use ganomalyd::reload::{CameraChange, Update};
use mqtt_support::*;

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx")
}

/// A random-weights fixture (32 px RGB) whose every score has raw threshold
/// `threshold` over a span of 1: `-1e6` makes every frame score 1.0 (always
/// alarming), `1e6` every frame 0.0 (never).
fn fixed_model(dir: &Path, name: &str, seed: u64, threshold: f64) -> PathBuf {
    support::dev_ort();
    let arch = support::arch();
    let mut meta = ModelMetadata::uncalibrated(arch, 5);
    for s in &mut meta.scores {
        s.calibration.threshold = threshold;
        s.calibration.min = 0.0;
        s.calibration.max = 1.0;
    }
    let bytes = ganomaly_core::onnx::write_model(&arch, &Weights::random_generator(&arch, seed), &meta).expect("model");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write model");
    p
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Compiles `body` as `check-config` does, in `dir`.
fn settings(dir: &Path, body: &str) -> ganomalyd::config::Settings {
    support::compile(dir, body)
}

/// Loads and applies `body` as a reload; returns the plan.
/// Prints how long the background load and the apply took (a figure, not checked).
fn reload(p: &mut Pipeline, dir: &Path, body: &str) -> ganomalyd::reload::Plan {
    let t = Instant::now();
    let mut pending = p.prepare_reload(settings(dir, body)).expect("loader starts");
    let loaded = pending.wait(Duration::from_secs(120)).expect("models loaded in time").expect("the reload loads");
    let loaded_in = t.elapsed();
    let t = Instant::now();
    let plan = p.apply_reload(loaded).expect("applied");
    println!("reload: models loaded in {loaded_in:?} (background), applied in {:?}", t.elapsed());
    plan
}

fn scores_of(rec: &Recorder, camera: &str, from: usize) -> Vec<ganomalyd::events::ScoreEvent> {
    rec.events()
        .into_iter()
        .skip(from)
        .filter_map(|e| match e {
            Recorded::Score(s) if s.camera == camera => Some(s),
            _ => None,
        })
        .collect()
}

fn starts(rec: &Recorder, camera: &str) -> usize {
    rec.alarms().iter().filter(|a| a.camera == camera && a.kind == AlarmKind::Start).count()
}

const HEAD: &str = "[inference]\nproviders = [\"cpu\"]\nmax_batch = 8\n[snapshots]\nenabled = false\n\
                    [pipeline]\nframe_queue = 16\n";

#[test]
fn a_model_swap_loses_no_alarm_and_the_other_camera_skips_no_more_than_a_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a1, a2) = (dir.path().join("a1.onnx"), dir.path().join("a2.onnx"));
    std::fs::copy(demo(), &a1).expect("copy");
    std::fs::copy(demo(), &a2).expect("copy");
    let body = |model: &Path| {
        format!(
            "{HEAD}[cameras.a]\nmodel = \"{}\"\nfps = 25\n\
             source = {{ kind = \"synthetic\", size = 64, variations = 2, defect_every = 20, defect_frames = 6, strength = 1.0 }}\n\
             [cameras.a.alarm]\nmin_frames = 2\nclear_frames = 2\n\
             [cameras.b]\nmodel = \"{}\"\nfps = 25\nsource = {{ kind = \"synthetic\", size = 64, variations = 2 }}\n",
            model.display(),
            demo().display()
        )
    };
    let rec = Recorder::default();
    let opts = StartOptions { stats: false, ..StartOptions::default() };
    let mut p = Pipeline::start(&settings(dir.path(), &body(&a1)), Arc::new(rec.clone()), opts).expect("starts");
    let b_counters = p.counters().into_iter().find(|(n, _)| n == "b").expect("b").1;
    wait_for("two alarms on a", Duration::from_secs(120), || starts(&rec, "a") >= 2);

    // 1. Another model file for `a` (SIGHUP's path, in-process): handed to a new thread.
    let plan = reload(&mut p, dir.path(), &body(&a2));
    assert_eq!(plan.cameras["a"], CameraChange::Update(Update { model: true, ..Update::default() }));
    assert_eq!(plan.cameras["b"], CameraChange::Update(Update::default()));
    let models: Vec<PathBuf> = p.providers().into_iter().map(|(m, _)| m).collect();
    assert!(models.contains(&a2) && !models.contains(&a1), "a1 retired, a2 runs: {models:?}");
    let before = starts(&rec, "a");
    wait_for("two more alarms on a after the swap", Duration::from_secs(120), || starts(&rec, "a") >= before + 2);

    // 2. The same path, new bytes of another input size: swapped in place between batches.
    let old_threshold = scores_of(&rec, "a", 0).last().expect("a scored").threshold;
    let from = rec.events().len();
    let fixture = std::fs::read(fixed_model(dir.path(), "fixture.onnx", 7, 0.25)).expect("read");
    std::fs::write(&a2, fixture).expect("overwrite a2");
    let plan = reload(&mut p, dir.path(), &body(&a2));
    assert_eq!(plan.cameras["a"], CameraChange::Update(Update { model: true, ..Update::default() }));
    wait_for("a scored by the new bytes", Duration::from_secs(60), || {
        scores_of(&rec, "a", from).iter().any(|s| s.threshold == 0.25)
    });
    assert_ne!(old_threshold, 0.25);
    wait_for("b scores on", Duration::from_secs(60), || scores_of(&rec, "b", from).len() >= 20);

    let report = p.shutdown();
    // Every alarm of `a` has its start and exactly one end, with unique ids.
    let alarms: Vec<_> = rec.alarms().into_iter().filter(|a| a.camera == "a").collect();
    let ids: Vec<&str> = alarms.iter().filter(|a| a.kind == AlarmKind::Start).map(|a| a.id.as_str()).collect();
    assert!(ids.len() >= 4, "{ids:?}");
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "ids unique: {ids:?}");
    for id in &ids {
        let ends: Vec<_> = alarms.iter().filter(|a| a.kind == AlarmKind::End && a.id == *id).collect();
        assert_eq!(ends.len(), 1, "alarm {id} has {} ends", ends.len());
        assert!(matches!(ends[0].reason, Some(EndReason::Cleared | EndReason::Shutdown)), "{:?}", ends[0]);
    }
    assert_eq!(alarms.len(), 2 * ids.len(), "no end without a start");
    // `b` ran through both reloads on the same thread and counters, without a gap larger than a batch.
    let seqs: Vec<u64> = scores_of(&rec, "b", 0).iter().map(|s| s.seq).collect();
    let gap = seqs.windows(2).map(|w| w[1].saturating_sub(w[0])).max().expect("b scored");
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "b's seqs never restart");
    assert!(gap <= 8, "b skipped {} frames in a row (dropped {})", gap - 1, report.cameras[1].dropped);
    let reported = report.cameras.iter().find(|c| c.name == "b").expect("b reported");
    assert_eq!(reported.decided, ganomalyd::metrics::CameraCounters::get(&b_counters.decided), "b kept its counters");
}

#[test]
fn added_removed_and_changed_cameras_restart_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cam = |name: &str, variations: u32| {
        format!(
            "[cameras.{name}]\nmodel = \"{}\"\nfps = 20\nsource = {{ kind = \"synthetic\", size = 64, variations = {variations} }}\n",
            demo().display()
        )
    };
    let before = format!("{HEAD}{}{}{}", cam("a", 2), cam("b", 2), cam("c", 2));
    let after = format!("{HEAD}{}{}{}", cam("a", 2), cam("c", 3), cam("d", 2));
    let rec = Recorder::default();
    let opts = StartOptions { stats: false, ..StartOptions::default() };
    let mut p = Pipeline::start(&settings(dir.path(), &before), Arc::new(rec.clone()), opts).expect("starts");
    let kept: BTreeMap<String, _> = p.counters().into_iter().collect();
    wait_for("every camera scored", Duration::from_secs(60), || {
        ["a", "b", "c"].iter().all(|c| scores_of(&rec, c, 0).len() >= 10)
    });

    let from = rec.events().len();
    let plan = reload(&mut p, dir.path(), &after);
    assert_eq!(plan.cameras["a"], CameraChange::Update(Update::default()));
    assert_eq!(plan.cameras["b"], CameraChange::Removed);
    assert_eq!(plan.cameras["c"], CameraChange::Restart(vec!["source"]));
    assert_eq!(plan.cameras["d"], CameraChange::Added);
    let names: Vec<String> = p.counters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["a", "c", "d"]);
    wait_for("d scores, c starts again from seq 0", Duration::from_secs(60), || {
        scores_of(&rec, "d", from).len() >= 10 && scores_of(&rec, "c", from).iter().any(|s| s.seq == 0)
    });
    // Frames of b already in a batch may still be decided; after that, none.
    std::thread::sleep(Duration::from_millis(500));
    let settled = rec.events().len();
    wait_for("a and c score on", Duration::from_secs(60), || {
        scores_of(&rec, "a", settled).len() >= 10 && scores_of(&rec, "c", settled).len() >= 10
    });
    assert!(scores_of(&rec, "b", settled).is_empty(), "the removed camera still scores");
    assert!(
        rec.events().iter().skip(from).any(|e| *e == Recorded::CameraOnline("b".into(), false)),
        "the removed camera is reported offline"
    );
    let after_counters: BTreeMap<String, _> = p.counters().into_iter().collect();
    assert!(Arc::ptr_eq(&kept["a"], &after_counters["a"]), "a kept its counters");
    assert!(Arc::ptr_eq(&kept["c"], &after_counters["c"]), "a restarted camera keeps its counters");
    // The unchanged camera's thread went on: its seqs never restart and skip at most a batch.
    let a: Vec<u64> = scores_of(&rec, "a", 0).iter().map(|s| s.seq).collect();
    assert!(a.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= 8), "a's frames: {a:?}");
    let report = p.shutdown();
    let reported: Vec<&str> = report.cameras.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(reported, ["a", "c", "d", "b"], "the removed camera's totals are reported too");
}

#[test]
fn check_config_refuses_a_shadow_with_another_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = fixed_model(dir.path(), "small.onnx", 1, 0.5);
    let text = format!(
        "[defaults]\nmodel = \"{}\"\nsource = {{ kind = \"synthetic\", size = 64 }}\n[cameras.a]\nshadow_model = \"{}\"\n\
         [cameras.b]\nshadow_score = \"recon\"\n",
        demo().display(),
        small.display()
    );
    let err = ganomalyd::config::compile_str(&text, dir.path()).expect_err("refused").to_string();
    assert!(err.contains("cameras.a.shadow_model:") && err.contains("32 px") && err.contains("64 px"), "{err}");
    assert!(err.contains("cameras.b.shadow_score: set without shadow_model"), "{err}");
}

fn mqtt_section(b: &Broker, prefix: &str) -> String {
    format!(
        "[mqtt]\nhost = \"{}\"\nport = {}\ntopic_prefix = \"{prefix}\"\nnode_id = \"box\"\nclient_id = \"{prefix}\"\n\
         outbox_path = \"outbox.sqlite\"\nkeep_alive_s = 5\nreconnect_min_s = 0.05\nreconnect_max_s = 0.5\n\
         score_max_rate_hz = 50\n[commands]\nenabled = true\n",
        b.host, b.port
    )
}

/// The JSON payloads received on `topic`, in arrival order.
fn json_on(msgs: &[Msg], topic: &str) -> Vec<serde_json::Value> {
    msgs.iter().filter(|m| m.topic == topic).filter_map(|m| serde_json::from_slice(&m.payload).ok()).collect()
}

#[test]
fn a_broken_config_or_model_is_refused_published_and_the_old_model_keeps_scoring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = broker(dir.path());
    let prefix = unique("reload-refused");
    let cfg = dir.path().join("ganomalyd.toml");
    let good = |threshold: f64| {
        format!(
            "{HEAD}[defaults]\nmodel = \"{}\"\nfps = 20\n[cameras.cam]\nsource = {{ kind = \"synthetic\", size = 64 }}\n\
             [cameras.cam.alarm]\nthreshold = {threshold}\n{}",
            demo().display(),
            mqtt_section(&b, &prefix)
        )
    };
    std::fs::write(&cfg, good(0.5)).expect("write");
    let sub = rt.block_on(Sub::start(&b.host, b.port, &format!("{prefix}/#"), false));
    let settings = ganomalyd::config::load(&cfg).expect("compiles");
    let (tx, rx) = crossbeam_channel::unbounded();
    let path = cfg.clone();
    let run = std::thread::spawn(move || daemon(settings, path, rx));
    let events = format!("{prefix}/box/events");
    let scores = format!("{prefix}/box/cam/score");
    rt.block_on(sub.wait(Duration::from_secs(90), "scores", |m| json_on(m, &scores).len() >= 3));

    // A file that does not compile, by SIGHUP: `failed`, with the key.
    std::fs::write(&cfg, "[cameras.cam]\nfsp = 3\n").expect("break");
    tx.send(Signal::Reload).expect("reload");
    let msgs = rt.block_on(sub.wait(Duration::from_secs(30), "the refusal", |m| !json_on(m, &events).is_empty()));
    let ev = &json_on(&msgs, &events)[0];
    assert_eq!((ev["command"].as_str(), ev["status"].as_str()), (Some("reload"), Some("failed")), "{ev}");
    assert!(
        ev["reason"].as_str().is_some_and(|r| r.contains("fsp") && r.contains("running settings are kept")),
        "{ev}"
    );

    // A broken model file, by the reload command: failed, naming the file.
    let broken = dir.path().join("broken.onnx");
    std::fs::write(&broken, b"this is not an ONNX model").expect("write");
    std::fs::write(&cfg, good(0.5).replace(&demo().display().to_string(), &broken.display().to_string()))
        .expect("write");
    let topic = format!("{prefix}/box/cmd/reload");
    rt.block_on(sub.client.publish(&topic, rumqttc::QoS::AtLeastOnce, false, r#"{"request_id":"r1"}"#))
        .expect("publish");
    let msgs = rt.block_on(sub.wait(Duration::from_secs(30), "the command's refusal", |m| {
        json_on(m, &events).iter().any(|e| e["request_id"] == "r1")
    }));
    let ev = json_on(&msgs, &events).into_iter().find(|e| e["request_id"] == "r1").expect("answer");
    assert_eq!(ev["status"], "failed", "{ev}");
    assert!(ev["reason"].as_str().is_some_and(|r| r.contains("broken.onnx")), "{ev}");

    // The old model still scores, and a good reload is taken and answered `done`.
    let seen = json_on(&msgs, &scores).len();
    let last_seq = json_on(&msgs, &scores).last().and_then(|s| s["seq"].as_u64()).expect("seq");
    let msgs = rt.block_on(
        sub.wait(Duration::from_secs(30), "scores after the refusals", |m| json_on(m, &scores).len() >= seen + 3),
    );
    assert!(json_on(&msgs, &scores).last().and_then(|s| s["seq"].as_u64()).is_some_and(|s| s > last_seq));
    std::fs::write(&cfg, good(0.6)).expect("write");
    rt.block_on(sub.client.publish(&topic, rumqttc::QoS::AtLeastOnce, false, r#"{"request_id":"r2"}"#))
        .expect("publish");
    let msgs = rt.block_on(sub.wait(Duration::from_secs(120), "the good reload's answer", |m| {
        json_on(m, &events).iter().any(|e| e["request_id"] == "r2" && e["status"] == "done")
    }));
    let answers: Vec<_> = json_on(&msgs, &events).into_iter().filter(|e| e["request_id"] == "r2").collect();
    assert_eq!(answers.len(), 1, "one answer, the outcome: {answers:?}");
    let done = &answers[0];
    assert_eq!(done["detail"]["cameras"]["cam"], "updated (alarm)", "{done}");

    tx.send(Signal::Stop).expect("stop");
    run.join().expect("no panic").expect("clean stop");
}

#[test]
fn a_shadow_alarms_on_its_own_topics_is_compared_and_is_promoted_by_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = broker(dir.path());
    let prefix = unique("shadow");
    // The running model never alarms; the candidate always does.
    let cold = fixed_model(dir.path(), "cold.onnx", 1, 1e6);
    let hot = fixed_model(dir.path(), "hot.onnx", 2, -1e6);
    let cfg = dir.path().join("ganomalyd.toml");
    let body = |camera: &str| {
        format!(
            "{HEAD}stats_interval_s = 0.5\n[cameras.cam]\nfps = 20\nsource = {{ kind = \"synthetic\", size = 64 }}\n{camera}\n\
             [cameras.cam.alarm]\nmin_frames = 1\nclear_frames = 3\n{}",
            mqtt_section(&b, &prefix)
        )
    };
    let shadowed = body(&format!("model = \"{}\"\nshadow_model = \"{}\"", cold.display(), hot.display()));
    std::fs::write(&cfg, &shadowed).expect("write");
    let sub = rt.block_on(Sub::start(&b.host, b.port, &format!("{prefix}/#"), false));
    let settings = ganomalyd::config::load(&cfg).expect("compiles");
    let (tx, rx) = crossbeam_channel::unbounded();
    let path = cfg.clone();
    let run = std::thread::spawn(move || daemon(settings, path, rx));
    let t = |leaf: &str| format!("{prefix}/box/{leaf}");
    let compared = |m: &[Msg]| {
        json_on(m, &t("stats")).iter().any(|s| s["cameras"][0]["shadow"]["frames"].as_u64().is_some_and(|f| f >= 10))
    };
    let msgs = rt.block_on(sub.wait(Duration::from_secs(90), "a shadow alarm and compared frames", |m| {
        alarms_of(&m.iter().filter(|m| m.topic == t("cam/shadow/alarm")).cloned().collect::<Vec<_>>())
            .iter()
            .any(|a| a.kind == AlarmKind::Start)
            && compared(m)
    }));
    assert!(json_on(&msgs, &t("cam/alarm")).is_empty(), "the shadow raised the camera's alarm");
    assert!(!json_on(&msgs, &t("cam/shadow/score")).is_empty() && !json_on(&msgs, &t("cam/score")).is_empty());
    let shadow_state = msgs.iter().rfind(|m| m.topic == t("cam/shadow/state")).map(Msg::text);
    assert_eq!(shadow_state.as_deref(), Some("ON"));
    assert_eq!(msgs.iter().rfind(|m| m.topic == t("cam/state")).map(Msg::text).as_deref(), Some("OFF"));
    let stats = json_on(&msgs, &t("stats")).into_iter().rev().find(|s| !s["cameras"][0]["shadow"].is_null());
    let sh = stats.expect("stats with a shadow")["cameras"][0]["shadow"].clone();
    let n = |k: &str| sh[k].as_u64().unwrap_or(u64::MAX);
    assert!(n("shadow_only") >= 10 && n("both") == 0 && n("real_only") == 0, "{sh}");
    assert!(n("frames") == n("shadow_only") + n("neither"), "{sh}");
    assert!(sh["real"]["p99"].as_f64().is_some_and(|q| q <= 0.01), "{sh}");
    assert!(sh["shadow"]["p50"].as_f64().is_some_and(|q| q >= 0.99), "{sh}");

    // Promotion: the candidate becomes the camera's model; the shadow goes.
    std::fs::write(&cfg, body(&format!("model = \"{}\"", hot.display()))).expect("write");
    let topic = t("cmd/reload");
    rt.block_on(sub.client.publish(&topic, rumqttc::QoS::AtLeastOnce, false, r#"{"request_id":"promote"}"#))
        .expect("publish");
    let msgs = rt.block_on(sub.wait(Duration::from_secs(120), "the promotion and a real alarm", |m| {
        let done = json_on(m, &t("events")).iter().any(|e| e["request_id"] == "promote" && e["status"] == "done");
        done && !json_on(m, &t("cam/alarm")).is_empty()
    }));
    let done = json_on(&msgs, &t("events")).into_iter().find(|e| e["status"] == "done").expect("done");
    assert_eq!(done["detail"]["cameras"]["cam"], "updated (model, shadow)", "{done}");
    let shadow_alarms =
        alarms_of(&msgs.iter().filter(|m| m.topic == t("cam/shadow/alarm")).cloned().collect::<Vec<_>>());
    let last = shadow_alarms.last().expect("shadow alarms");
    assert_eq!((last.kind, last.reason), (AlarmKind::End, Some(EndReason::Reload)), "{last:?}");

    tx.send(Signal::Stop).expect("stop");
    run.join().expect("no panic").expect("clean stop");
    let msgs = rt.block_on(sub.wait(Duration::from_secs(10), "the real alarm's end", |m| {
        alarms_of(&m.iter().filter(|m| m.topic == t("cam/alarm")).cloned().collect::<Vec<_>>())
            .iter()
            .any(|a| a.kind == AlarmKind::End)
    }));
    let real = alarms_of(&msgs.iter().filter(|m| m.topic == t("cam/alarm")).cloned().collect::<Vec<_>>());
    assert_eq!(real.iter().filter(|a| a.kind == AlarmKind::Start).count(), 1, "{real:?}");
}

#[test]
fn a_model_swapped_by_sighup_loses_no_alarm_on_the_broker_and_the_other_camera_no_frames() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = broker(dir.path());
    let prefix = unique("reload-sighup");
    let (m1, m2) = (dir.path().join("m1.onnx"), dir.path().join("m2.onnx"));
    std::fs::copy(demo(), &m1).expect("copy");
    std::fs::copy(demo(), &m2).expect("copy");
    let cfg = dir.path().join("ganomalyd.toml");
    let body = |model: &Path| {
        format!(
            "{HEAD}[cameras.a]\nmodel = \"{}\"\nfps = 25\n\
             source = {{ kind = \"synthetic\", size = 64, variations = 2, defect_every = 20, defect_frames = 6, strength = 1.0 }}\n\
             [cameras.a.alarm]\nmin_frames = 2\nclear_frames = 2\n\
             [cameras.b]\nmodel = \"{}\"\nfps = 25\nsource = {{ kind = \"synthetic\", size = 64, variations = 2 }}\n{}",
            model.display(),
            demo().display(),
            mqtt_section(&b, &prefix).replace("score_max_rate_hz = 50", "score_max_rate_hz = 1000")
        )
    };
    std::fs::write(&cfg, body(&m1)).expect("write");
    let sub = rt.block_on(Sub::start(&b.host, b.port, &format!("{prefix}/#"), false));
    let settings = ganomalyd::config::load(&cfg).expect("compiles");
    let (tx, rx) = crossbeam_channel::unbounded();
    let path = cfg.clone();
    let run = std::thread::spawn(move || daemon(settings, path, rx));
    let t = |leaf: &str| format!("{prefix}/box/{leaf}");
    let a_alarms = |m: &[Msg]| alarms_of(&m.iter().filter(|m| m.topic == t("a/alarm")).cloned().collect::<Vec<_>>());
    let started = |m: &[Msg]| a_alarms(m).iter().filter(|a| a.kind == AlarmKind::Start).count();
    rt.block_on(sub.wait(Duration::from_secs(120), "two alarms before the swap", |m| started(m) >= 2));

    std::fs::write(&cfg, body(&m2)).expect("write");
    tx.send(Signal::Reload).expect("SIGHUP");
    let msgs = rt
        .block_on(sub.wait(Duration::from_secs(120), "the reload's outcome", |m| !json_on(m, &t("events")).is_empty()));
    let ev = &json_on(&msgs, &t("events"))[0];
    assert_eq!(
        (ev["status"].as_str(), ev["detail"]["cameras"]["a"].as_str()),
        (Some("done"), Some("updated (model)")),
        "{ev}"
    );
    assert_eq!(ev["detail"]["cameras"]["b"], "kept", "{ev}");
    let n = started(&msgs);
    rt.block_on(sub.wait(Duration::from_secs(120), "two alarms after the swap", |m| started(m) >= n + 2));

    tx.send(Signal::Stop).expect("stop");
    run.join().expect("no panic").expect("clean stop");
    let msgs = rt.block_on(sub.wait(Duration::from_secs(10), "every end", |m| {
        let (keys, _) = dedupe(&a_alarms(m));
        let starts = keys.iter().filter(|(_, k)| k == "start").count();
        starts == keys.len() - starts
    }));
    // At least once on the wire: de-duplicated on (id, type), every start has its end.
    let (keys, _) = dedupe(&a_alarms(&msgs));
    let starts: BTreeSet<&str> = keys.iter().filter(|(_, k)| k == "start").map(|(id, _)| id.as_str()).collect();
    let ends: BTreeSet<&str> = keys.iter().filter(|(_, k)| k == "end").map(|(id, _)| id.as_str()).collect();
    assert!(starts.len() >= 4 && starts == ends, "starts {starts:?} ends {ends:?}");
    // b: every score, in order, no gap larger than a batch across the swap.
    let seqs: Vec<u64> = json_on(&msgs, &t("b/score")).iter().filter_map(|s| s["seq"].as_u64()).collect();
    assert!(seqs.len() > 50, "{}", seqs.len());
    let gap = seqs.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0);
    assert!(seqs.windows(2).all(|w| w[1] > w[0]) && gap <= 8, "b's frames around the swap: gap {gap}");
}

#[test]
fn an_active_alarm_carries_on_across_a_model_swap_and_ends_with_reload_on_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every frame alarms: the alarm starts at once and never clears by itself.
    let hot1 = fixed_model(dir.path(), "hot1.onnx", 3, -1e6);
    let hot2 = fixed_model(dir.path(), "hot2.onnx", 4, -1e6);
    let body = |model: &Path, fps: u32| {
        format!(
            "{HEAD}[cameras.a]\nmodel = \"{}\"\nfps = {fps}\nsource = {{ kind = \"synthetic\", size = 64 }}\n\
             [cameras.a.alarm]\nmin_frames = 1\nclear_frames = 3\n",
            model.display()
        )
    };
    let rec = Recorder::default();
    let opts = StartOptions { stats: false, ..StartOptions::default() };
    let mut p = Pipeline::start(&settings(dir.path(), &body(&hot1, 20)), Arc::new(rec.clone()), opts).expect("starts");
    wait_for("the alarm", Duration::from_secs(60), || starts(&rec, "a") == 1);

    // Another model: the same alarm goes on (no end, no new start).
    let from = rec.events().len();
    let plan = reload(&mut p, dir.path(), &body(&hot2, 20));
    assert_eq!(plan.cameras["a"], CameraChange::Update(Update { model: true, ..Update::default() }));
    wait_for("frames scored by the new model", Duration::from_secs(60), || scores_of(&rec, "a", from).len() >= 20);
    let alarms = rec.alarms();
    assert_eq!(alarms.len(), 1, "the swap ended or restarted the alarm: {alarms:?}");

    // A restart (new pacing): the alarm ends, reason `reload`; a new one starts with a new id.
    let plan = reload(&mut p, dir.path(), &body(&hot2, 25));
    assert_eq!(plan.cameras["a"], CameraChange::Restart(vec!["fps"]));
    wait_for("the next alarm", Duration::from_secs(60), || starts(&rec, "a") == 2);
    drop(p.shutdown());
    let alarms = rec.alarms();
    let kinds: Vec<(AlarmKind, Option<EndReason>)> = alarms.iter().map(|a| (a.kind, a.reason)).collect();
    assert_eq!(
        kinds,
        [
            (AlarmKind::Start, None),
            (AlarmKind::End, Some(EndReason::Reload)),
            (AlarmKind::Start, None),
            (AlarmKind::End, Some(EndReason::Shutdown))
        ]
    );
    assert_eq!(alarms[0].id, alarms[1].id);
    assert_ne!(alarms[0].id, alarms[2].id, "ids stay unique across the restart");
    assert!(alarms[1].frames >= 20, "the first alarm counted frames of both models: {:?}", alarms[1]);
}

#[test]
fn the_loader_refuses_a_model_that_does_not_load_or_fit_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = |model: &Path, extra: &str| {
        format!(
            "{HEAD}[cameras.a]\nmodel = \"{}\"\nfps = 20\nsource = {{ kind = \"synthetic\", size = 64 }}\n{extra}",
            model.display()
        )
    };
    let rec = Recorder::default();
    let opts = StartOptions { stats: false, ..StartOptions::default() };
    let p = Pipeline::start(&settings(dir.path(), &body(&demo(), "")), Arc::new(rec.clone()), opts).expect("starts");
    wait_for("scores", Duration::from_secs(60), || scores_of(&rec, "a", 0).len() >= 5);
    // Compiled offline (no model checks): what the loader itself must catch,
    // e.g. a file that changed between `config::load` and the load.
    let offline = |text: &str| {
        let file = ganomalyd::config::parse(text).expect("parses");
        ganomalyd::config::compile_with(&file, dir.path(), ganomalyd::config::Probe::Offline).expect("compiles")
    };
    let broken = dir.path().join("broken.onnx");
    std::fs::write(&broken, b"not a model").expect("write");
    let small = fixed_model(dir.path(), "small.onnx", 5, 0.5);
    for (text, want) in [
        (body(&broken, ""), "broken.onnx"),
        (body(&demo(), &format!("shadow_model = \"{}\"\n", small.display())), "cameras.a.shadow_model"),
    ] {
        let mut pending = p.prepare_reload(offline(&text)).expect("loader starts");
        let err = pending.wait(Duration::from_secs(60)).expect("answered").err().expect("refused");
        assert!(err.contains(want), "{err}");
    }
    assert_eq!(p.settings().cameras[0].model, demo(), "nothing changed");
    assert!(p.settings().cameras[0].shadow.is_none());
    let from = rec.events().len();
    wait_for("the old model scoring on", Duration::from_secs(60), || scores_of(&rec, "a", from).len() >= 5);
    drop(p.shutdown());
}
