//! The commands end to end on data written by core's synthetic generator:
//! a short CPU run learns strong defects (AUROC ≥ 0.95), exports a model whose
//! metadata the daemon accepts, `eval` reproduces the training report's figures
//! from the ONNX file, resume continues a run; bad input fails with an error that
//! names the problem.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use ganomaly_core::metadata::{CalibrationMethod, ScoreKind};
use ganomaly_train::cmd::{self, Cli};

fn parse(args: &[&str]) -> cmd::Command {
    Cli::try_parse_from(std::iter::once("ganomaly-train").chain(args.iter().copied())).expect("command line").command
}

fn train_args(args: &[&str]) -> cmd::train::Args {
    match parse(&[&["train"], args].concat()) {
        cmd::Command::Train(a) => *a,
        _ => unreachable!(),
    }
}

/// A small, fast training run on `data` (isize 16, one thread, on the CPU,
/// quiet), checkpointed in `ckpt`, then `extra`.
fn tiny_train(data: &Path, out: &Path, ckpt: &Path, epochs: &str, extra: &[&str]) -> cmd::train::Args {
    let flags = [
        "--data",
        s(data),
        "--out",
        s(out),
        "--isize",
        "16",
        "--nz",
        "8",
        "--ngf",
        "8",
        "--ndf",
        "8",
        "--epochs",
        epochs,
        "--batch",
        "8",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--checkpoint-dir",
        s(ckpt),
        "--quiet",
    ];
    train_args(&[&flags[..], extra].concat())
}

fn datagen(dir: &Path, extra: &[&str]) {
    let d = dir.to_str().unwrap();
    match parse(&[&["datagen", "--out", d], extra].concat()) {
        cmd::Command::Datagen(a) => {
            cmd::datagen::run(&a).unwrap();
        }
        _ => unreachable!(),
    }
}

/// `ganomaly-train export` of checkpoint `ckpt` on `data` to `out`, then `extra`.
fn export_checkpoint(ckpt: &Path, data: &Path, out: &Path, extra: &[&str]) {
    let args =
        [&["export", "--checkpoint", s(ckpt), "--data", s(data), "--out", s(out), "--threads", "1"], extra].concat();
    match parse(&args) {
        cmd::Command::Export(a) => cmd::export::run(&a).unwrap(),
        _ => unreachable!(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn short_cpu_run_learns_strong_defects_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    datagen(
        &data,
        // Strong defects: obvious holes and stains at full strength, at the model's own size.
        &[
            "--texture",
            "brushed_metal",
            "--size",
            "64",
            "--seed",
            "1",
            "--train-good",
            "240",
            "--test-good",
            "40",
            "--test-per-defect",
            "20",
            "--defects",
            "hole,stain",
            "--strength",
            "1.0",
        ],
    );
    // A validation split for `--default-score auto`: a few test images move to val/.
    for (kind, n) in [("good", 8), ("hole", 4), ("stain", 4)] {
        let (from, to) = (data.join("test").join(kind), data.join("val").join(kind));
        std::fs::create_dir_all(&to).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&from).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in &files[..n] {
            std::fs::rename(f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    let model = tmp.path().join("m.onnx");
    let report_dir = tmp.path().join("report");
    let a = train_args(&[
        "--data",
        s(&data),
        "--out",
        s(&model),
        "--isize",
        "64",
        "--nz",
        "100",
        "--ngf",
        "16",
        "--ndf",
        "16",
        "--epochs",
        "15",
        "--batch",
        "32",
        "--seed",
        "0",
        "--threads",
        "2",
        "--device",
        "cpu",
        "--map-kernel",
        "5",
        "--default-score",
        "auto",
        "--eval-every",
        "5",
        "--report",
        s(&report_dir),
        "--quiet",
    ]);
    let report = cmd::train::run(&a).unwrap();
    let last = report.last_epoch.as_ref().expect("test figures");
    let best = last.scores.values().map(|e| e.auroc).fold(0.0, f64::max);
    let table: Vec<String> =
        last.scores.values().map(|e| format!("{} {:.3} {:?}", e.kind.as_str(), e.auroc, e.per_defect)).collect();
    assert!(best >= 0.95, "best image AUROC {best} < 0.95: {table:?}");
    assert_eq!(last.scores[&last.best_score].auroc, best);
    // auto chooses on val/ (never test/) and says why.
    let chosen = report.default_score.expect("a default score");

    // The model file: metadata the daemon reads, a calibration per kind from the held-out slice.
    let bytes = std::fs::read(&model).unwrap();
    let meta = ganomaly_core::onnx::read_metadata(&bytes).unwrap();
    assert_eq!(meta.arch.isize, 64);
    assert_eq!(meta.map_kernel(), Some(5));
    for kind in ScoreKind::ALL {
        let c = &meta.score(kind).unwrap().calibration;
        // The default `--calibration lognormal_tail`, or its recorded fallback.
        assert!(matches!(c.method, CalibrationMethod::LognormalTail | CalibrationMethod::Conformal), "{:?}", c.method);
        assert_eq!(c.method == CalibrationMethod::LognormalTail, c.tail_fit.as_ref().is_some_and(|f| f.accepted));
        let far = c.expected_far.as_ref().expect("an expected false-alarm interval");
        assert!(far.low <= far.estimate && far.estimate <= far.high, "{far:?}");
        assert_eq!(c.target_false_alarm_rate, Some(0.01));
        assert_eq!(c.normal_stats.as_ref().unwrap().n, 24, "10% of 240 held out");
        assert!(c.val_auroc.is_some());
    }
    assert!(meta.provenance.data_digest.starts_with("sha256:"));
    assert_eq!(meta.provenance.epochs, 15);
    let why = meta.provenance.score_choice.as_deref().unwrap_or("");
    assert!(why.starts_with(&format!("auto: {} (validation AUROC ", chosen.as_str())), "{why}");
    assert!(why.contains("on 32 good and 8 defective validation images"), "24 held out + 8 val/good: {why}");
    assert_eq!(meta.default_score, chosen);
    // --select auto with val/ defects: val-auroc, and the exported epoch is explained.
    assert_eq!(report.selection.select, ganomaly_train::select::Select::ValAuroc);
    let reason = report.selection.reason.as_deref().expect("a reason for the exported epoch");
    assert!(reason.starts_with("val-auroc: "), "{reason}");
    assert!(
        meta.provenance.notes.contains(&format!("exported epoch {}: {reason}", report.selection.epoch)),
        "{}",
        meta.provenance.notes
    );

    // Report: JSON and plots.
    for f in [
        "report.json",
        "losses.png",
        "auroc_per_epoch.png",
        "roc.png",
        "hist_latent.png",
        "hist_map_max.png",
        "hist_mahalanobis.png",
    ] {
        assert!(report_dir.join(f).is_file(), "{f} missing");
    }
    assert_eq!(report.history.len(), 15);
    // Every method compared on the same held-out scores, with its test figures.
    for (kind, checks) in &report.calibration_methods {
        assert_eq!(checks.len(), 3, "{kind:?}");
        assert!(checks.iter().all(|c| c.test.is_some() && c.threshold.is_finite()), "{checks:?}");
    }
    assert_eq!(report.calibration_methods.len(), ScoreKind::ALL.len());
    assert!(report.best_epoch_optimistic.as_ref().is_some_and(|b| b.note.contains("optimistic")));

    // eval from the ONNX file gives the training report's figures (same weights, same preprocessing).
    let e = match parse(&["eval", "--model", s(&model), "--data", s(&data), "--json", "--threads", "2"]) {
        cmd::Command::Eval(a) => cmd::eval::run(&a).unwrap(),
        _ => unreachable!(),
    };
    for kind in ScoreKind::ALL {
        assert!((e.scores[&kind].auroc - last.scores[&kind].auroc).abs() < 1e-9, "{kind:?}");
    }
    let json = serde_json::to_value(&e).unwrap();
    for key in ["auroc", "f1", "threshold", "per_defect"] {
        assert!(json.get(key).is_some(), "eval --json lacks `{key}`");
    }
    assert_eq!(json["per_defect"].as_object().unwrap().len(), 2);

    // The binary prints one JSON object with --json.
    let out = Command::new(env!("CARGO_BIN_EXE_ganomaly-train"))
        .args(["eval", "--model", s(&model), "--data", s(&data), "--json", "--threads", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert!((v["auroc"].as_f64().unwrap() - e.auroc).abs() < 1e-9);
}

#[test]
fn resume_continues_where_the_checkpoint_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    datagen(
        &data,
        &[
            "--size",
            "32",
            "--train-good",
            "40",
            "--test-good",
            "8",
            "--test-per-defect",
            "4",
            "--defects",
            "hole,stain",
        ],
    );
    let common = |out: &Path, epochs: &str, ckpt: &Path| tiny_train(&data, out, ckpt, epochs, &[]);
    let (m1, c1) = (tmp.path().join("a.onnx"), tmp.path().join("a.ckpt"));
    cmd::train::run(&common(&m1, "3", &c1)).unwrap();
    let (m2, c2) = (tmp.path().join("b.onnx"), tmp.path().join("b.ckpt"));
    cmd::train::run(&common(&m2, "2", &c2)).unwrap();
    let mut a = common(&m2, "3", &c2);
    a.resume = true;
    let r = cmd::train::run(&a).unwrap();
    assert_eq!(r.history.len(), 3);
    // 2 epochs + resume for 1 = 3 epochs straight: the same weights.
    let w = |p: &PathBuf| ganomaly_core::onnx::read_model(&std::fs::read(p).unwrap()).unwrap().1;
    assert_eq!(w(&m1), w(&m2));

    // `export` of the checkpoint writes the trained weights with the same calibration.
    let m3 = tmp.path().join("c.onnx");
    match parse(&["export", "--checkpoint", s(&c1), "--data", s(&data), "--out", s(&m3), "--threads", "1"]) {
        cmd::Command::Export(a) => cmd::export::run(&a).unwrap(),
        _ => unreachable!(),
    }
    assert_eq!(w(&m3), w(&m1));
    let meta = |p: &PathBuf| ganomaly_core::onnx::read_metadata(&std::fs::read(p).unwrap()).unwrap();
    for kind in ScoreKind::ALL {
        let (a, b) = (meta(&m1), meta(&m3));
        assert_eq!(a.score(kind).unwrap().calibration.threshold, b.score(kind).unwrap().calibration.threshold);
    }
    assert_eq!(meta(&m3).provenance.epochs, 3);
}

#[test]
fn export_of_a_checkpoint_keeps_the_patch_maps_train_exported_with() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    datagen(&data, &["--size", "32", "--train-good", "24", "--test-good", "4", "--test-per-defect", "2"]);
    let (m1, ckpt) = (tmp.path().join("a.onnx"), tmp.path().join("a.ckpt"));
    cmd::train::run(&tiny_train(&data, &m1, &ckpt, "1", &["--patch-maps", "1"])).unwrap();
    let state = ganomaly_train::checkpoint::read_checkpoint_state(&ckpt).unwrap();
    assert_eq!(state.exported.as_ref().map(|e| (e.epoch, e.patch.maps.clone())), Some((1, vec![1])));
    let export = |out: &Path, extra: &[&str]| export_checkpoint(&ckpt, &data, out, extra);
    let patch = |p: &Path| ganomaly_core::onnx::read_metadata(&std::fs::read(p).unwrap()).unwrap().patch().cloned();
    let m2 = tmp.path().join("b.onnx");
    export(&m2, &[]);
    assert_eq!(patch(&m2), patch(&m1), "export writes the maps train exported with, not 2,3");
    assert_eq!(patch(&m2).unwrap().maps, vec![1]);
    // The flag still wins.
    let m3 = tmp.path().join("c.onnx");
    export(&m3, &["--patch-maps", "2"]);
    assert_eq!(patch(&m3).unwrap().maps, vec![2]);

    // A run on tiles: its export is tiled (and calibrated on tiles) as train's model is.
    let (t1, tckpt) = (tmp.path().join("t.onnx"), tmp.path().join("t.ckpt"));
    cmd::train::run(&tiny_train(&data, &t1, &tckpt, "1", &["--patch-maps", "1", "--tile", "16"])).unwrap();
    let t2 = tmp.path().join("t2.onnx");
    match parse(&["export", "--checkpoint", s(&tckpt), "--data", s(&data), "--out", s(&t2), "--threads", "1"]) {
        cmd::Command::Export(a) => cmd::export::run(&a).unwrap(),
        _ => unreachable!(),
    }
    let meta = |p: &Path| ganomaly_core::onnx::read_metadata(&std::fs::read(p).unwrap()).unwrap();
    assert_eq!(meta(&t1).tiling, Some(ganomaly_core::tiles::Tiling::abutting(16)));
    assert_eq!(meta(&t2).tiling, meta(&t1).tiling);
    for kind in ScoreKind::ALL {
        if let (Some(a), Some(b)) = (meta(&t1).score(kind), meta(&t2).score(kind)) {
            assert_eq!(a.calibration.threshold, b.calibration.threshold, "{kind:?}: calibrated on the same tiles");
        }
    }
}

#[test]
fn the_nearest_patch_statistic_trains_exports_and_is_kept_by_export() {
    use ganomaly_core::patch::PatchStatistic;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    datagen(&data, &["--size", "32", "--train-good", "24", "--test-good", "4", "--test-per-defect", "2"]);
    let (m1, ckpt) = (tmp.path().join("n.onnx"), tmp.path().join("n.ckpt"));
    let flags = ["--patch-maps", "1,2", "--patch-statistic", "nearest", "--patch-bank", "100"];
    cmd::train::run(&tiny_train(&data, &m1, &ckpt, "1", &flags)).unwrap();
    let bytes = std::fs::read(&m1).unwrap();
    // The daemon's own check of the file (metadata against the graph's tensors).
    let meta = ganomaly_core::onnx::check::check_model(&bytes).unwrap();
    let spec = meta.patch().cloned().unwrap();
    assert_eq!((spec.maps.clone(), spec.statistic), (vec![1, 2], PatchStatistic::Nearest { bank: 100 }));
    assert!(meta.score(ScoreKind::Patch).unwrap().calibration.threshold > 0.0);
    // `export` keeps the statistic train exported with; explicit depths go back to the Gaussian.
    let export = |out: &Path, extra: &[&str]| export_checkpoint(&ckpt, &data, out, extra);
    let patch = |p: &Path| ganomaly_core::onnx::read_metadata(&std::fs::read(p).unwrap()).unwrap().patch().cloned();
    let m2 = tmp.path().join("n2.onnx");
    export(&m2, &[]);
    assert_eq!(patch(&m2), Some(spec));
    let m3 = tmp.path().join("n3.onnx");
    export(&m3, &["--patch-maps", "2"]);
    assert_eq!(patch(&m3).unwrap().statistic, PatchStatistic::Gaussian);
    // Bad banks are refused by flag name.
    let err = train_err(&data, &["--patch-maps", "2", "--patch-statistic", "nearest", "--patch-bank", "0"]);
    assert!(err.contains("--patch-bank of at least 1"), "{err}");
    let err = train_err(&data, &["--patch-maps", "2", "--patch-statistic", "nearest", "--patch-bank", "100000"]);
    assert!(err.contains("--patch-bank") && err.contains("100000 entries"), "{err}");
}

fn train_err(data: &Path, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.onnx");
    let a = train_args(
        &[&["--data", s(data), "--out", s(&out), "--epochs", "1", "--quiet", "--threads", "1"], extra].concat(),
    );
    format!("{:#}", cmd::train::run(&a).unwrap_err())
}

#[test]
fn bad_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();

    let err = train_err(&root.join("missing"), &[]);
    assert!(err.contains("does not exist") && err.contains("missing"), "{err}");

    std::fs::create_dir_all(root.join("empty/train/good")).unwrap();
    let err = train_err(&root.join("empty"), &[]);
    assert!(err.contains("holds no images") && err.contains("train/good"), "{err}");

    let mixed = root.join("mixed/train/good");
    std::fs::create_dir_all(&mixed).unwrap();
    image::RgbImage::new(32, 32).save(mixed.join("a.png")).unwrap();
    image::RgbImage::new(48, 32).save(mixed.join("b.png")).unwrap();
    let err = train_err(&root.join("mixed"), &[]);
    assert!(err.contains("mixed sizes") && err.contains("b.png"), "{err}");

    image::GrayImage::new(32, 32).save(mixed.join("b.png")).unwrap();
    let err = train_err(&root.join("mixed"), &[]);
    assert!(err.contains("mixed colour modes") && err.contains("gray"), "{err}");

    let good = root.join("good/train/good");
    std::fs::create_dir_all(&good).unwrap();
    for i in 0..4 {
        image::RgbImage::new(32, 32).save(good.join(format!("{i}.png"))).unwrap();
    }
    let err = train_err(&root.join("good"), &["--isize", "40"]);
    assert!(err.contains("multiple of 16") && err.contains("40"), "{err}");

    let err = train_err(&root.join("good"), &["--select", "val-auroc"]);
    assert!(err.contains("--select val-auroc needs validation images") && err.contains("val/good"), "{err}");

    let ckpt = root.join("bad.ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("state.json"), b"{ not json").unwrap();
    let err = train_err(&root.join("good"), &["--resume", "--checkpoint-dir", s(&ckpt)]);
    assert!(err.contains("unreadable") && err.contains("state.json"), "{err}");
    let err = train_err(&root.join("good"), &["--resume", "--checkpoint-dir", s(&root.join("nockpt"))]);
    assert!(err.contains("unreadable") && err.contains("nockpt"), "{err}");

    // The binary exits non-zero and says why on stderr.
    let out = Command::new(env!("CARGO_BIN_EXE_ganomaly-train"))
        .args(["train", "--data", s(&root.join("good")), "--out", s(&root.join("x.onnx")), "--isize", "20"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 16"));

    let out = Command::new(env!("CARGO_BIN_EXE_ganomaly-train"))
        .args(["eval", "--model", s(&root.join("nope.onnx")), "--data", s(&root.join("good"))])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.onnx"));
}
