//! Parity: the ONNX file the trainer exports, run through ONNX Runtime as the
//! daemon runs it, agrees with the tch model in eval mode on every output
//! (`score`, `score_recon`, `score_map`, `score_mahalanobis`, `score_patch`,
//! `score_fused`, `recon`, `anomaly_map`, `patch_map`) for a batch of real
//! (synthetic-texture) images, within 1e-4.
//!
//! Needs ONNX Runtime: `ORT_DYLIB_PATH`, else the onnxruntime wheel in `.venv`.

use std::path::PathBuf;

use ganomaly_core::arch::ArchSpec;
use ganomaly_core::metadata::{ColorMode, Combine, ModelMetadata, ScoreKind};
use ganomaly_core::preprocess::Preprocessor;
use ganomaly_core::synth::{self, Defect, Texture};
use ganomaly_core::weights::Weights;
use ganomaly_train::model::{Ema, Hyper, Model};
use ganomaly_train::net::{seeded, NetG};
use ganomaly_train::score::outputs;
use ort::session::Session;
use ort::value::TensorRef;
use tch::{Device, Kind, Tensor};

const TOL: f32 = 1e-4;

fn ort_library() -> PathBuf {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let capi = root.join(".venv/lib/python3.11/site-packages/onnxruntime/capi");
    std::fs::read_dir(&capi)
        .ok()
        .and_then(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so")))
        })
        .unwrap_or_else(|| {
            panic!("ONNX Runtime not found: set ORT_DYLIB_PATH or install onnxruntime into {}", capi.display())
        })
}

fn session(bytes: &[u8]) -> Session {
    static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();
    let env = ENV.get_or_init(|| {
        ort::init_from(ort_library()).expect("load ONNX Runtime").with_name("parity").build().expect("ORT environment")
    });
    Session::builder(env).unwrap().with_intra_threads(1).unwrap().commit_from_memory(bytes).unwrap()
}

/// Good and defective synthetic images, preprocessed by core's function.
fn images(arch: &ArchSpec, n: usize) -> (Vec<f32>, Tensor) {
    let color = ColorMode::from_channels(arch.nc).unwrap();
    let mut pre = Preprocessor::new(color, arch.isize);
    let len = pre.tensor_len();
    let mut buf = vec![0f32; n * len];
    for (i, out) in buf.chunks_exact_mut(len).enumerate() {
        let defect = [None, Some(Defect::Scratch), Some(Defect::Hole), Some(Defect::Stain)][i % 4];
        let img = synth::sample(Texture::BrushedMetal, defect, 1.0, 96, 3, i as u64).image;
        pre.run_image(&image::DynamicImage::ImageRgb8(img), None, out).unwrap();
    }
    let s = i64::from(arch.isize);
    let t = Tensor::from_slice(&buf).reshape([n as i64, i64::from(arch.nc), s, s]);
    (buf, t)
}

fn assert_close(name: &str, onnx: &[f32], torch: &Tensor) {
    let torch = Vec::<f32>::try_from(torch.to_kind(Kind::Float).flatten(0, -1)).unwrap();
    assert_eq!(onnx.len(), torch.len(), "{name}: lengths");
    let (worst, at) = onnx
        .iter()
        .zip(&torch)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0f32, 0), |(w, wi), (i, d)| if d > w { (d, i) } else { (w, wi) });
    eprintln!("{name}: max |onnx − tch| = {worst:.2e} over {} values", onnx.len());
    assert!(worst <= TOL, "{name}: |onnx − tch| = {worst} at {at} (onnx {}, tch {})", onnx[at], torch[at]);
}

fn check(g: &NetG, kernel: u32, n: usize) {
    let arch = g.arch;
    let (buf, x) = images(&arch, n);
    // The generator's own patch configuration and fusion recipe go into the file.
    let mut meta = ModelMetadata::uncalibrated(arch, kernel);
    for e in &mut meta.scores {
        match e.kind {
            ScoreKind::Patch => e.patch = Some(g.patch_stats.as_ref().expect("patch statistics").spec.clone()),
            ScoreKind::Fused => e.fusion = Some(g.fusion.clone().expect("a fusion recipe")),
            _ => {}
        }
    }
    let bytes = ganomaly_core::onnx::write_model(&arch, &g.to_weights().unwrap(), &meta).unwrap();
    let mut sess = session(&bytes);
    let s = arch.isize as usize;
    let input = TensorRef::from_array_view(([n, arch.nc as usize, s, s], &buf[..])).unwrap();
    let out = sess.run(ort::inputs!["image" => input]).unwrap();
    let want = outputs(g, &x, kernel);
    let mahal = want.score_mahalanobis.as_ref().expect("the generator has feature statistics");
    let patch = want.score_patch.as_ref().expect("the generator has patch statistics");
    let fused = want.score_fused.as_ref().expect("the generator has a fusion recipe");
    for (name, t) in [
        ("score_mahalanobis", mahal),
        ("score_patch", patch),
        ("patch_map", want.patch_map.as_ref().unwrap()),
        ("score_fused", fused),
        ("score", &want.score),
        ("score_recon", &want.score_recon),
        ("score_map", &want.score_map),
        ("recon", &want.recon),
        ("anomaly_map", &want.anomaly_map),
    ] {
        let (_, v) = out[name].try_extract_tensor::<f32>().unwrap();
        assert_close(name, v, t);
    }
    // The check must have teeth: scores differ between images.
    for t in [&want.score, mahal, patch, fused] {
        let sc = Vec::<f32>::try_from(t).unwrap();
        assert!(sc.iter().any(|&v| (v - sc[0]).abs() > 1e-6), "degenerate scores {sc:?}");
    }
}

#[test]
fn onnx_matches_tch_with_nontrivial_batchnorm_statistics() {
    // Random weights with non-trivial BN beta and running statistics (a fresh
    // network's are 0/1 and would hide a writer that swaps them).
    let arch = ArchSpec { isize: 32, nc: 3, nz: 16, ngf: 16, ndf: 16, extralayers: 1, ..Default::default() };
    let mut g = seeded(0, || NetG::new(&arch, Device::Cpu));
    let w = Weights::random_generator(&arch, 11);
    g.load_weights(&w).unwrap();
    // The fixture's statistics (default patch configuration, placeholder fusion).
    g.load_score_stats(&ModelMetadata::uncalibrated(arch, 5), &w).unwrap();
    check(&g, 5, 6);
}

/// A generator trained 5 steps (running statistics and weights moved by real
/// updates) with its score statistics fitted as the trainer fits them: code
/// statistics on the training batch itself (8 codes of up to 32 dimensions, so the
/// shrinkage must carry the covariance); the patch score for `spec` and the fusion
/// on 40 other images (the fusion divides by each score's spread on good images, so
/// a spread taken from 8 images would magnify float rounding beyond what a real
/// hold-out shows).
fn trained_with_scores(arch: &ArchSpec, seed: u64, spec: ganomaly_core::patch::PatchSpec, combine: Combine) -> Model {
    let mut m = Model::new(arch, Hyper::default(), seed, Device::Cpu);
    let (_, x) = images(arch, 8);
    for _ in 0..5 {
        m.step(&x);
    }
    m.g.feature_stats = Some(m.g.fit_feature_stats(&x, 3, Device::Cpu).unwrap());
    let (_, xs) = images(arch, 48);
    let (fit, hold) = (xs.narrow(0, 8, 24), xs.narrow(0, 32, 16));
    m.g.patch_spec = spec;
    m.g.patch_stats = Some(m.g.fit_patch_stats(&fit, 5, Device::Cpu).unwrap());
    let hold = ganomaly_train::score::score_all(&m.g, &hold, 1, 8, Device::Cpu);
    let mut f = ganomaly_train::score::fit_fusion(&hold).unwrap();
    f.combine = combine;
    m.g.fusion = Some(f);
    m
}

#[test]
fn onnx_matches_tch_after_training_steps() {
    // The patch score over all three maps (16×16 grid: depth 3 upsampled ×4, depth 2
    // ×2), and a max-fusion.
    let arch = ArchSpec { isize: 32, nc: 1, nz: 32, ngf: 16, ndf: 16, extralayers: 0, ..Default::default() };
    let m = trained_with_scores(&arch, 4, arch.patch_spec(&[1, 2, 3], 48, 7).unwrap(), Combine::Max);
    check(&m.g, 7, 8);
}

#[test]
fn onnx_matches_tch_for_the_weight_average() {
    // `--ema-decay` exports the averaged generator (running statistics averaged too):
    // it must go through the writer as faithfully as the raw one.
    let arch = ArchSpec { isize: 32, nc: 3, nz: 16, ngf: 16, ndf: 16, extralayers: 0, ..Default::default() };
    let mut m = Model::new(&arch, Hyper::default(), 6, Device::Cpu);
    m.ema = Some(Ema::new(&m.g, 0.9));
    let (_, x) = images(&arch, 8);
    for _ in 0..5 {
        m.step(&x);
    }
    let ema = &mut m.ema.as_mut().unwrap().g;
    // Default patch configuration (isize/4 and isize/8 maps at 8×8), mean-fusion.
    ema.fit_score_stats(&x, &x, Device::Cpu).unwrap();
    check(&m.ema.as_ref().unwrap().g, 5, 8);
}

#[test]
fn onnx_matches_tch_for_the_nearest_neighbour_patch_statistic() {
    // `--patch-statistic nearest`: a coreset bank over the two finest maps (16×16
    // grid, depth 2 upsampled ×2), then a mean-fusion.
    use ganomaly_core::patch::PatchStatistic;
    let arch = ArchSpec { isize: 32, nc: 3, nz: 16, ngf: 16, ndf: 16, extralayers: 0, ..Default::default() };
    let mut spec = arch.patch_spec(&[1, 2], 64, 5).unwrap();
    spec.statistic = PatchStatistic::Nearest { bank: 512 };
    let m = trained_with_scores(&arch, 8, spec, ganomaly_core::metadata::FusionSpec::DEFAULT_COMBINE);
    let fitted = &m.g.patch_stats.as_ref().unwrap().spec;
    assert_eq!(fitted.statistic, PatchStatistic::Nearest { bank: 512 });
    check(&m.g, 7, 8);
}
