//! The whole pipeline in-process: replay/synthetic/test sources → preprocess
//! pool → ONNX Runtime → alarm machines → a recording publisher.
//!
//! Fixture models are random-weights GANomaly graphs written by `core`
//! (`write_model`), calibrated here on the fixture images so that every good
//! frame scores below the threshold and every defect frame above it; that
//! makes the expected alarm frames exact. Nothing here asserts a speed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ganomaly_core::metadata::CalibrationMethod;
use ganomaly_core::{Calibration, ModelMetadata, ScoreKind, Weights};
use ganomalyd::capture::{self, CaptureError, FrameData, FrameSource, PixelFormat};
use ganomalyd::config::{InferenceSettings, Provider, Settings};
use ganomalyd::events::{AlarmEvent, AlarmKind, Publisher, Recorded, Recorder, ScoreEvent, Snapshot, StatsReport};
use ganomalyd::infer::{BatchOutput, InferError, Model};
use ganomalyd::metrics::CameraCounters;
use ganomalyd::pipeline::{Pipeline, StartOptions};

mod support;
use support::{arch, cpu};

/// Writes a random-weights fixture model; `recon` calibrated to `cal` if given
/// (and made the default score).
fn write_fixture(path: &Path, cal: Option<Calibration>) {
    let a = arch();
    let mut meta = ModelMetadata::uncalibrated(a, 5);
    if let Some(cal) = cal {
        for s in &mut meta.scores {
            if s.kind == ScoreKind::Recon {
                s.calibration = cal.clone();
            }
        }
        meta.default_score = ScoreKind::Recon;
    }
    let bytes = ganomaly_core::onnx::write_model(&a, &Weights::random_generator(&a, 11), &meta).expect("write model");
    std::fs::write(path, bytes).expect("write model file");
}

/// A flat mid-gray part with faint texture.
fn good_image(i: u32) -> image::RgbImage {
    image::RgbImage::from_fn(48, 48, |x, y| {
        let v = 128u8.wrapping_add(((x * 7 + y * 13 + i * 3) % 9) as u8);
        image::Rgb([v, v, v])
    })
}

/// A high-contrast black/white pattern: far from anything "good".
fn defect_image(i: u32) -> image::RgbImage {
    image::RgbImage::from_fn(48, 48, |x, y| {
        let on = ((x + i) / 4 + y / 4) % 2 == 0;
        let v = if on { 255 } else { 0 };
        image::Rgb([v, v, v])
    })
}

fn recon_scores(model: &mut Model, imgs: &[image::RgbImage]) -> Vec<f64> {
    let mut prep = ganomaly_core::preprocess::Preprocessor::from_meta(&model.meta.preprocess);
    let mut t = vec![0.0; prep.tensor_len()];
    let mut out = BatchOutput::default();
    imgs.iter()
        .map(|img| {
            prep.run_image(&image::DynamicImage::ImageRgb8(img.clone()), None, &mut t).expect("preprocess");
            model.run(&t, 1, &mut out).expect("run");
            out.score(ScoreKind::Recon, 0).expect("recon score") as f64
        })
        .collect()
}

/// A fixture model calibrated so that good images normalise to ~0 and
/// defect images to ~1 (threshold half-way).
fn calibrated_fixture(dir: &Path) -> PathBuf {
    let raw = dir.join("raw.onnx");
    write_fixture(&raw, None);
    let mut m = Model::load(&raw, &cpu()).expect("load fixture");
    let good = recon_scores(&mut m, &(0..6).map(good_image).collect::<Vec<_>>());
    let bad = recon_scores(&mut m, &(0..6).map(defect_image).collect::<Vec<_>>());
    let gmax = good.iter().copied().fold(f64::MIN, f64::max);
    let bmin = bad.iter().copied().fold(f64::MAX, f64::min);
    assert!(gmax < bmin, "fixture does not separate good {good:?} from defect {bad:?}");
    let cal = Calibration {
        threshold: (gmax + bmin) / 2.0,
        min: gmax,
        max: bmin,
        method: CalibrationMethod::F1Optimal,
        ..Calibration::uncalibrated()
    };
    let path = dir.join("fixture.onnx");
    write_fixture(&path, Some(cal));
    path
}

fn config(dir: &Path, body: &str) -> Settings {
    support::compile(dir, body)
}

#[test]
fn replayed_defects_raise_and_clear_alarms_on_exactly_the_expected_frames() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = calibrated_fixture(dir.path());
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).expect("mkdir");
    // 0-9 good, 10-14 defect (5 ≥ min_frames), 15-24 good, 25-26 defect (2 <
    // min_frames: no alarm), 27-29 good, 30-35 defect, 36-39 good.
    let defect = |i: u32| (10..15).contains(&i) || (25..27).contains(&i) || (30..36).contains(&i);
    for i in 0..40u32 {
        let img = if defect(i) { defect_image(i) } else { good_image(i) };
        img.save(frames.join(format!("{i:03}.png"))).expect("save frame");
    }
    let snaps = dir.path().join("snaps");
    let cfg = config(
        dir.path(),
        &format!(
            r#"
            [inference]
            providers = ["cpu"]
            max_batch = 4
            max_wait_s = 0.002
            [pipeline]
            frame_queue = 64   # larger than the replay: no frame may be dropped here
            [snapshots]
            dir = "{snaps}"
            retain = 10
            [defaults]
            model = "{model}"
            fps = 0
            [cameras.line3]
            source = {{ kind = "replay", path = "{frames}", loop = false }}
            [cameras.line3.alarm]
            min_frames = 3
            clear_frames = 2
            threshold = 0.5
            clear_threshold = 0.4
            "#,
            snaps = snaps.display(),
            model = model.display(),
            frames = frames.display()
        ),
    );
    let rec = Recorder::default();
    let p = Pipeline::start(&cfg, Arc::new(rec.clone()), StartOptions { stats: false, ..StartOptions::default() })
        .expect("pipeline starts");
    support::wait_sources_done(&p, "replay");
    let counters = p.counters()[0].1.clone();
    let report = p.join();
    assert_eq!(report.cameras[0].decided, 40, "{report:?}");
    assert_eq!(report.cameras[0].dropped, 0);
    // What /metrics reads: two alarms raised, none active after the last
    // clear, the last frame's (good) score below the threshold.
    assert_eq!(CameraCounters::get(&counters.alarms_raised), 2);
    assert!(!counters.alarm_active.load(Ordering::Relaxed));
    assert!(counters.last_score() < 0.5, "{}", counters.last_score());

    let seqs: Vec<u64> = rec.scores().iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (0..40).collect::<Vec<u64>>(), "every frame scored once, in order");
    for s in rec.scores() {
        assert_eq!(s.score >= 0.5, defect(s.seq as u32), "frame {} scored {}", s.seq, s.score);
        assert_eq!(s.kind, "recon");
    }
    let alarms: Vec<(AlarmKind, u64, u64)> = rec.alarms().iter().map(|a| (a.kind, a.first_seq, a.seq)).collect();
    assert_eq!(
        alarms,
        vec![
            (AlarmKind::Start, 10, 12),
            (AlarmKind::End, 10, 16),
            (AlarmKind::Start, 30, 32),
            (AlarmKind::End, 30, 37),
        ]
    );
    let a = rec.alarms();
    assert_eq!(a[0].id, a[1].id);
    assert_ne!(a[0].id, a[2].id);
    assert_eq!((a[1].frames, a[3].frames), (5, 6), "frames at or above the threshold");
    assert!(a[1].peak >= 0.5 && a[1].end_ts.is_some());

    // A snapshot per alarm start: on disk under the name the event carries,
    // decodable, and handed to the publisher.
    for start in [&a[0], &a[2]] {
        let name = start.snapshot.as_ref().expect("start event names its snapshot");
        let jpeg = std::fs::read(snaps.join(name)).expect("snapshot file");
        let img = image::load_from_memory(&jpeg).expect("snapshot is a JPEG");
        assert_eq!((img.width(), img.height()), (48, 48));
    }
    let published: Vec<String> = rec
        .events()
        .into_iter()
        .filter_map(|e| if let Recorded::Snapshot(s) = e { Some(s.alarm_id) } else { None })
        .collect();
    assert_eq!(published, vec![a[0].id.clone(), a[2].id.clone()]);
    let states: Vec<bool> = rec
        .events()
        .into_iter()
        .filter_map(|e| if let Recorded::AlarmState(_, on) = e { Some(on) } else { None })
        .collect();
    // The first `false` is the start-up announcement that clears a retained `ON`
    // a previous run may have left; then one ON/OFF per alarm.
    assert_eq!(states, vec![false, true, false, true, false]);
}

/// Hands out small frames as fast as it is called, counting them, and
/// counting the frame buffers it had to be given fresh (memory in use).
struct Firehose {
    produced: Arc<AtomicU64>,
    fresh_buffers: Arc<AtomicU64>,
}

impl FrameSource for Firehose {
    fn describe(&self) -> String {
        "firehose".into()
    }
    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        if out.data.capacity() == 0 {
            self.fresh_buffers.fetch_add(1, Ordering::Relaxed);
        }
        let n = self.produced.fetch_add(1, Ordering::Relaxed);
        out.reshape(64, 64, PixelFormat::Rgb8).fill((n % 251) as u8);
        Ok(())
    }
}

/// At every decision, counts the frames in flight (captured, not yet
/// decided nor dropped): what the bounded queues hold.
struct InFlightMeter {
    counters: OnceLock<Arc<CameraCounters>>,
    max_in_flight: Mutex<u64>,
    decided: AtomicU64,
}

impl Publisher for InFlightMeter {
    fn score(&self, _: &ScoreEvent) {
        if let Some(c) = self.counters.get() {
            let get = CameraCounters::get;
            let gone = get(&c.decided) + get(&c.dropped) + get(&c.broken);
            let in_flight = get(&c.captured).saturating_sub(gone);
            if let Ok(mut m) = self.max_in_flight.lock() {
                *m = (*m).max(in_flight);
            }
        }
        self.decided.fetch_add(1, Ordering::Relaxed);
    }
    fn alarm(&self, _: &AlarmEvent) {}
    fn camera_online(&self, _: &str, _: bool) {}
    fn alarm_state(&self, _: &str, _: bool) {}
    fn snapshot(&self, _: &Snapshot) {}
    fn stats(&self, _: &StatsReport) {}
}

#[test]
fn a_source_far_faster_than_inference_drops_oldest_and_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("m.onnx");
    write_fixture(&model, None);
    let cfg = config(
        dir.path(),
        &format!(
            r#"
            [inference]
            providers = ["cpu"]
            max_batch = 4
            [pipeline]
            frame_queue = 2
            [snapshots]
            enabled = false
            [defaults]
            model = "{}"
            fps = 0
            source = {{ kind = "synthetic" }}
            [cameras.fast]
            "#,
            model.display()
        ),
    );
    let produced = Arc::new(AtomicU64::new(0));
    let fresh = Arc::new(AtomicU64::new(0));
    let meter =
        Arc::new(InFlightMeter { counters: OnceLock::new(), max_in_flight: Mutex::new(0), decided: AtomicU64::new(0) });
    let mut sources = BTreeMap::new();
    sources.insert(
        "fast".to_string(),
        capture::factory(Firehose { produced: produced.clone(), fresh_buffers: fresh.clone() }),
    );
    let p = Pipeline::start(&cfg, meter.clone(), StartOptions { sources, stats: false, ..StartOptions::default() })
        .expect("pipeline starts");
    let _ = meter.counters.set(p.counters()[0].1.clone());
    let t = Instant::now();
    while meter.decided.load(Ordering::Relaxed) < 300 {
        assert!(t.elapsed() < Duration::from_secs(120), "pipeline stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = p.shutdown();
    let c = &report.cameras[0];
    assert!(c.dropped > 0, "a firehose must cause drops: {c:?}");
    assert!(c.captured > 2 * c.decided, "the camera was never held back by inference: {c:?}");
    // Everything captured was either decided or counted as dropped: the
    // stages drained on shutdown and nothing vanished uncounted.
    assert_eq!(c.captured, c.decided + c.dropped + c.broken, "{c:?}");
    // Bounded latency and memory, in frames: never more in flight than the
    // bounded queues hold (camera queue 2, one per worker, inference channel
    // 2·4, the batch 4, the camera's hand 1), whatever the source's rate.
    let in_flight = *meter.max_in_flight.lock().expect("lock");
    assert!(in_flight <= 24, "{in_flight} frames were in flight at once");
    assert!(report.latency.count() == c.decided);
    // Bounded memory: frame buffers are recycled, only a handful ever allocated.
    let buffers = fresh.load(Ordering::Relaxed);
    assert!(buffers <= 40, "{buffers} frame buffers allocated for {} frames", c.captured);
}

/// Fails to open until the other camera has delivered `more` frames since
/// this one went offline; then serves frames, and once (after `lose_after`
/// frames) loses the device.
struct Flaky {
    other_scores: Arc<AtomicU64>,
    mark: Option<u64>,
    more: u64,
    frames: u64,
    lose_after: u64,
    lost_once: bool,
}

impl Flaky {
    fn gate(&mut self, what: &str) -> Result<(), CaptureError> {
        let now = self.other_scores.load(Ordering::Relaxed);
        let mark = *self.mark.get_or_insert(now);
        if now < mark + self.more {
            return Err(CaptureError::Open { source_name: "flaky".into(), reason: format!("{what}: not yet") });
        }
        self.mark = None;
        Ok(())
    }
}

impl FrameSource for Flaky {
    fn describe(&self) -> String {
        "flaky".into()
    }
    fn open(&mut self) -> Result<(), CaptureError> {
        self.gate("open")
    }
    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        if self.frames == self.lose_after && !self.lost_once {
            self.lost_once = true;
            return Err(CaptureError::Disconnected { source_name: "flaky".into(), reason: "cable pulled".into() });
        }
        self.frames += 1;
        out.reshape(40, 40, PixelFormat::Gray8).fill(128);
        Ok(())
    }
}

/// Records everything and counts the steady camera's scores.
struct Counting {
    rec: Recorder,
    steady: Arc<AtomicU64>,
}

impl Publisher for Counting {
    fn score(&self, ev: &ScoreEvent) {
        if ev.camera == "steady" {
            self.steady.fetch_add(1, Ordering::Relaxed);
        }
        self.rec.score(ev)
    }
    fn alarm(&self, ev: &AlarmEvent) {
        self.rec.alarm(ev)
    }
    fn camera_online(&self, camera: &str, online: bool) {
        self.rec.camera_online(camera, online)
    }
    fn alarm_state(&self, camera: &str, active: bool) {
        self.rec.alarm_state(camera, active)
    }
    fn snapshot(&self, s: &Snapshot) {
        self.rec.snapshot(s)
    }
    fn stats(&self, r: &StatsReport) {
        self.rec.stats(r)
    }
}

#[test]
fn a_failing_source_goes_offline_and_back_online_while_other_cameras_keep_flowing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("m.onnx");
    write_fixture(&model, None);
    let cfg = config(
        dir.path(),
        &format!(
            r#"
            [inference]
            providers = ["cpu"]
            [snapshots]
            enabled = false
            [defaults]
            model = "{}"
            source = {{ kind = "synthetic", size = 48, variations = 2 }}
            [cameras.steady]
            fps = 200
            [cameras.flaky]
            fps = 200
            "#,
            model.display()
        ),
    );
    let steady = Arc::new(AtomicU64::new(0));
    let rec = Recorder::default();
    let publisher = Arc::new(Counting { rec: rec.clone(), steady: steady.clone() });
    let flaky =
        Flaky { other_scores: steady.clone(), mark: None, more: 5, frames: 0, lose_after: 20, lost_once: false };
    let mut sources = BTreeMap::new();
    sources.insert("flaky".to_string(), capture::factory(flaky));
    let opts = StartOptions {
        sources,
        stats: false,
        backoff_min: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..StartOptions::default()
    };
    let p = Pipeline::start(&cfg, publisher, opts).expect("pipeline starts");
    let flaky_online = |rec: &Recorder| {
        rec.events()
            .into_iter()
            .filter_map(|e| match e {
                Recorded::CameraOnline(c, on) if c == "flaky" => Some(on),
                _ => None,
            })
            .collect::<Vec<bool>>()
    };
    let t = Instant::now();
    while flaky_online(&rec).len() < 4 || rec.scores().iter().filter(|s| s.camera == "flaky").count() < 30 {
        assert!(t.elapsed() < Duration::from_secs(120), "flaky camera never recovered: {:?}", flaky_online(&rec));
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = p.shutdown();
    assert_eq!(flaky_online(&rec)[..4], [false, true, false, true]);

    // Between each offline report and the next online report of `flaky`,
    // `steady` kept being scored.
    let events = rec.events();
    let mut offline_at = None;
    let mut gaps = 0;
    for (i, e) in events.iter().enumerate() {
        match e {
            Recorded::CameraOnline(c, false) if c == "flaky" => offline_at = Some(i),
            Recorded::CameraOnline(c, true) if c == "flaky" => {
                if let Some(o) = offline_at.take() {
                    let steady_scores =
                        events[o..i].iter().filter(|e| matches!(e, Recorded::Score(s) if s.camera == "steady")).count();
                    assert!(steady_scores >= 5, "only {steady_scores} steady frames while flaky was offline");
                    gaps += 1;
                }
            }
            _ => {}
        }
    }
    assert_eq!(gaps, 2);
    let steady_report = report.cameras.iter().find(|c| c.name == "steady").expect("steady");
    assert!(steady_report.decided > 10);
}

#[test]
fn accelerators_fall_back_to_cpu_unless_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("m.onnx");
    write_fixture(&model, None);
    // Default provider list (tensorrt, cuda, cpu) on this CPU-only ONNX Runtime.
    let m = Model::load(&model, &InferenceSettings::default()).expect("falls back to the CPU");
    assert_eq!(m.provider, Provider::Cpu);

    let strict = InferenceSettings {
        providers: vec![Provider::Cuda],
        require_accelerator: true,
        ..InferenceSettings::default()
    };
    let err = match Model::load(&model, &strict) {
        Err(e) => e,
        Ok(_) => panic!("require_accelerator accepted a CPU-only runtime"),
    };
    assert!(matches!(err, InferError::NoAccelerator { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("require_accelerator") && msg.contains("cuda"), "{msg}");
}

#[test]
fn broken_models_are_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.onnx");
    write_fixture(&good, None);
    let bytes = std::fs::read(&good).expect("read");

    let not_onnx = dir.path().join("not.onnx");
    std::fs::write(&not_onnx, b"this is not a protobuf at all \xff\xff\xff").expect("write");
    let e = Model::load(&not_onnx, &cpu()).err().expect("refused").to_string();
    assert!(e.contains("not.onnx") && e.contains("not an ONNX model"), "{e}");

    // Same-length edits inside the protobuf keep it well-formed.
    let edit = |from: &str, to: &str| -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let mut b = bytes.clone();
        let pos =
            b.windows(from.len()).position(|w| w == from.as_bytes()).unwrap_or_else(|| panic!("`{from}` not in model"));
        b[pos..pos + to.len()].copy_from_slice(to.as_bytes());
        b
    };
    let no_meta = dir.path().join("nometa.onnx");
    std::fs::write(&no_meta, edit("ganomaly.scores", "ganomaly.xxxxxx")).expect("write");
    let e = Model::load(&no_meta, &cpu()).err().expect("refused").to_string();
    assert!(e.contains("ganomaly.scores") && e.contains("missing"), "{e}");

    // Metadata claiming 64×64 inputs on a 32×32 graph.
    let wrong = dir.path().join("wrong.onnx");
    let b = edit("\"isize\":32", "\"isize\":64");
    let mut b2 = b.clone();
    let from = "\"size\":32";
    let pos = b2.windows(from.len()).position(|w| w == from.as_bytes()).expect("preprocess size in metadata");
    b2[pos..pos + from.len()].copy_from_slice(b"\"size\":64");
    std::fs::write(&wrong, b2).expect("write");
    let e = Model::load(&wrong, &cpu()).err().expect("refused").to_string();
    assert!(e.contains("`image`") && e.contains("64"), "{e}");
}

/// The first `n` frames of a source, then the end.
struct Take<S> {
    inner: S,
    left: u64,
}

impl<S: FrameSource> FrameSource for Take<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn open(&mut self) -> Result<(), CaptureError> {
        self.inner.open()
    }
    fn next_frame(&mut self, out: &mut FrameData) -> Result<(), CaptureError> {
        if self.left == 0 {
            return Err(CaptureError::Ended("take".into()));
        }
        self.left -= 1;
        self.inner.next_frame(out)
    }
}

#[test]
fn the_bundled_model_raises_one_alarm_per_synthetic_defect_episode() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo.onnx");
    assert!(model.is_file(), "models/demo.onnx is part of the repository");
    let dir = tempfile::tempdir().expect("tempdir");
    // Brushed metal at 64 px, seed 0: the demo model's training distribution.
    // In every 40 frames the last 10 are defective: episodes at 30-39, 70-79, 110-119.
    let body = format!(
        r#"
            [inference]
            providers = ["cpu"]
            [pipeline]
            frame_queue = 64
            [snapshots]
            dir = "{snaps}"
            [defaults]
            model = "{model}"
            fps = 50
            [cameras.demo]
            source = {{ kind = "synthetic", texture = "brushed_metal", size = 64, seed = 0, variations = 16, defect_every = 40, defect_frames = 10, strength = 1.0 }}
            [cameras.demo.alarm]
            min_frames = 3
            clear_frames = 3
            "#,
        snaps = dir.path().join("snaps").display(),
        model = model.display()
    );
    let cfg = config(dir.path(), &body);
    // The camera's own source, wrapped so that it ends after 120 frames.
    let file = ganomalyd::config::parse(&body).expect("parses");
    let synthetic = match &file.cameras["demo"].source {
        Some(capture::SourceConfig::Synthetic(s)) => s.plan("demo", &mut Vec::new()).expect("plan"),
        other => panic!("{other:?}"),
    };
    let mut sources = BTreeMap::new();
    sources.insert(
        "demo".to_string(),
        capture::factory(Take { inner: capture::synthetic::SyntheticCamera::new(&synthetic), left: 120 }),
    );
    let rec = Recorder::default();
    let p =
        Pipeline::start(&cfg, Arc::new(rec.clone()), StartOptions { sources, stats: false, ..StartOptions::default() })
            .expect("pipeline starts");
    support::wait_sources_done(&p, "source");
    let report = p.join();
    assert_eq!(report.cameras[0].dropped, 0, "{report:?}");
    let episodes = [30..40u64, 70..80, 110..120];
    let starts: Vec<AlarmEvent> = rec.alarms().into_iter().filter(|a| a.kind == AlarmKind::Start).collect();
    assert_eq!(starts.len(), 3, "{:#?}", rec.alarms());
    for (a, ep) in starts.iter().zip(&episodes) {
        assert!(
            ep.contains(&a.first_seq) && ep.contains(&a.seq),
            "alarm {}..{} outside episode {ep:?}",
            a.first_seq,
            a.seq
        );
        assert!(a.snapshot.is_some());
    }
    // The model's default score (map_max) drives the decisions.
    assert!(rec.scores().iter().all(|s| s.kind == "map_max"));
}
