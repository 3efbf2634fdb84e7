//! The ONNX graph written by `ganomaly_core::onnx` against an independent
//! forward pass (`ganomaly_core::reference`, plain loops) through real ONNX
//! Runtime, at isize 32/64/128, nc 1/3, extralayers 0/1 — and the same files
//! through the official `onnx` checker and ONNX Runtime's Python API.

use std::path::PathBuf;

use ganomaly_core::arch::ArchSpec;
use ganomaly_core::metadata::ModelMetadata;
use ganomaly_core::reference::{self, Nchw};
use ganomaly_core::weights::Weights;
use ort::session::Session;
use ort::value::Tensor;

mod support;

const MAP_KERNEL: u32 = 5;
const BATCH: usize = 2;

struct OrtOut {
    names: Vec<(String, Vec<i64>, Vec<f32>)>,
}

impl OrtOut {
    fn get(&self, name: &str) -> &[f32] {
        &self.names.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("output {name} missing")).2
    }
    fn shape(&self, name: &str) -> &[i64] {
        &self.names.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("output {name} missing")).1
    }
}

fn run_ort(bytes: &[u8], input: &Nchw) -> OrtOut {
    support::dev_ort();
    let env = ganomalyd::runtime::environment(None).expect("ONNX Runtime library (run `make venv`)");
    let mut session = Session::builder(env).unwrap().with_intra_threads(1).unwrap().commit_from_memory(bytes).unwrap();
    let shape = [input.n as i64, input.c as i64, input.h as i64, input.w as i64];
    let t = Tensor::from_array((shape, input.data.clone())).unwrap();
    let outputs = session.run(ort::inputs!["image" => t]).unwrap();
    let mut names = Vec::new();
    for (name, value) in outputs.iter() {
        let (shape, data) = value.try_extract_tensor::<f32>().unwrap();
        names.push((name.to_string(), shape.iter().copied().collect(), data.to_vec()));
    }
    OrtOut { names }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A deterministic input that looks like an image: smooth gradients + a bright blob.
fn input(c: usize, s: usize) -> Nchw {
    let mut x = Nchw::zeros(BATCH, c, s, s);
    for n in 0..BATCH {
        for ch in 0..c {
            for y in 0..s {
                for xx in 0..s {
                    let v = ((y * 7 + xx * 3 + ch * 11 + n * 5) % 64) as f32 / 32.0 - 1.0;
                    let blob = if n == 1 && (y as i64 - s as i64 / 2).abs() < 4 && (xx as i64 - s as i64 / 3).abs() < 4
                    {
                        0.8
                    } else {
                        0.0
                    };
                    x.data[((n * c + ch) * s + y) * s + xx] = (v * 0.6 + blob).clamp(-1.0, 1.0);
                }
            }
        }
    }
    x
}

fn archs() -> Vec<ArchSpec> {
    let mut v = Vec::new();
    for isize in [32, 64, 128] {
        for nc in [1, 3] {
            for extralayers in [0, 1] {
                // Narrow nets keep the slow reference fast; every layer type and size rule is still exercised.
                v.push(ArchSpec { isize, nc, nz: 16, ngf: 4, ndf: 4, extralayers, ..Default::default() });
            }
        }
    }
    // ngf 32: the feature map has 128 channels, so the `mahalanobis` score pools it 2×2.
    v.push(ArchSpec { isize: 32, nc: 3, nz: 16, ngf: 32, ndf: 4, extralayers: 0, ..Default::default() });
    v
}

#[test]
fn onnx_graph_matches_reference_forward_pass() {
    let mut report = Vec::new();
    for (i, arch) in archs().into_iter().enumerate() {
        let weights = Weights::random_generator(&arch, 100 + i as u64);
        let meta = ModelMetadata::uncalibrated(arch, MAP_KERNEL);
        let bytes = ganomaly_core::onnx::write_model(&arch, &weights, &meta).unwrap();
        let x = input(arch.nc as usize, arch.isize as usize);
        let want = reference::forward(&arch, &weights, &x, MAP_KERNEL as usize).unwrap();
        let got = run_ort(&bytes, &x);

        let s = arch.isize as i64;
        assert_eq!(got.shape("score"), [BATCH as i64]);
        assert_eq!(got.shape("score_recon"), [BATCH as i64]);
        assert_eq!(got.shape("score_map"), [BATCH as i64]);
        assert_eq!(got.shape("score_mahalanobis"), [BATCH as i64]);
        assert_eq!(got.shape("recon"), [BATCH as i64, arch.nc as i64, s, s]);
        assert_eq!(got.shape("anomaly_map"), [BATCH as i64, 1, s, s]);

        let d_score = max_abs_diff(got.get("score"), &want.score);
        let d_recon = max_abs_diff(got.get("recon"), &want.recon.data);
        let d_map = max_abs_diff(got.get("anomaly_map"), &want.anomaly_map.data);
        let d_srecon = max_abs_diff(got.get("score_recon"), &want.score_recon);
        let d_smap = max_abs_diff(got.get("score_map"), &want.score_map);
        let want_mahal = want.score_mahalanobis.as_ref().expect("fixture weights carry feature statistics");
        let d_mahal = max_abs_diff(got.get("score_mahalanobis"), want_mahal);
        let want_patch = want.score_patch.as_ref().expect("fixture weights carry patch statistics");
        let d_patch = max_abs_diff(got.get("score_patch"), want_patch);
        assert_eq!(got.shape("patch_map"), [BATCH as i64, 1, s, s]);
        let d_pmap = max_abs_diff(got.get("patch_map"), &want.patch_map.as_ref().unwrap().data);
        let d_fused = max_abs_diff(got.get("score_fused"), want.score_fused.as_ref().unwrap());
        report.push(format!(
            "isize {:3} nc {} extra {}: score {:.1e} (|score| ≈ {:.3}) recon {:.1e} map {:.1e} score_recon {:.1e} score_map {:.1e} score_mahalanobis {:.1e} (≈ {:.3}) score_patch {:.1e} (≈ {:.3}) patch_map {:.1e} score_fused {:.1e}",
            arch.isize, arch.nc, arch.extralayers, d_score, want.score[0], d_recon, d_map, d_srecon, d_smap, d_mahal, want_mahal[0], d_patch, want_patch[0], d_pmap, d_fused
        ));
        for (name, d) in [
            ("score", d_score),
            ("recon", d_recon),
            ("anomaly_map", d_map),
            ("score_recon", d_srecon),
            ("score_map", d_smap),
            ("score_mahalanobis", d_mahal),
            ("score_patch", d_patch),
            ("patch_map", d_pmap),
            ("score_fused", d_fused),
        ] {
            assert!(d <= 1e-4, "{arch:?}: `{name}` differs by {d:e} from the reference\n{}", report.join("\n"));
        }
        // The two images differ, and so must their scores: a graph that ignored its
        // input (or the batch dimension) would pass the diff checks above only by luck.
        assert_ne!(got.get("score")[0], got.get("score")[1], "{arch:?}");
        assert_ne!(got.get("score_mahalanobis")[0], got.get("score_mahalanobis")[1], "{arch:?}");
        assert_ne!(got.get("score_patch")[0], got.get("score_patch")[1], "{arch:?}");
    }
    eprintln!("{}", report.join("\n"));
}

/// The `patch` score with the nearest-neighbour statistic (a memory bank instead of
/// per-position Gaussians) against the reference, on one, two and three maps.
#[test]
fn the_nearest_neighbour_patch_statistic_matches_the_reference() {
    use ganomaly_core::metadata::ScoreKind;
    use ganomaly_core::patch::PatchStatistic;
    let mut report = Vec::new();
    let cases = [
        (ArchSpec { isize: 32, nc: 1, nz: 16, ngf: 4, ndf: 4, extralayers: 0, ..Default::default() }, vec![1, 2], 64),
        (ArchSpec { isize: 64, nc: 3, nz: 16, ngf: 8, ndf: 4, extralayers: 1, ..Default::default() }, vec![2, 3], 37),
        (
            ArchSpec { isize: 32, nc: 3, nz: 16, ngf: 32, ndf: 4, extralayers: 0, ..Default::default() },
            vec![1, 2, 3],
            300,
        ),
    ];
    for (i, (arch, maps, bank)) in cases.into_iter().enumerate() {
        let mut spec = arch.patch_spec(&maps, 64, 3).unwrap();
        spec.statistic = PatchStatistic::Nearest { bank };
        let mut weights = Weights::random_generator(&arch, 300 + i as u64);
        weights.insert_random_patch(&arch, &spec, 400 + i as u64);
        let mut meta = ModelMetadata::uncalibrated(arch, MAP_KERNEL);
        meta.scores.iter_mut().filter(|s| s.kind == ScoreKind::Patch).for_each(|s| s.patch = Some(spec.clone()));
        let bytes = ganomaly_core::onnx::write_model(&arch, &weights, &meta).unwrap();
        // The spec travels in the metadata: what the daemon reads back is what was written.
        let back = ganomaly_core::onnx::check::check_model(&bytes).unwrap();
        assert_eq!(back.patch(), Some(&spec));
        let x = input(arch.nc as usize, arch.isize as usize);
        let fusion = meta.scores.iter().find_map(|s| s.fusion.clone());
        let want =
            reference::forward_spec(&arch, &weights, &x, MAP_KERNEL as usize, Some(&spec), fusion.as_ref()).unwrap();
        let got = run_ort(&bytes, &x);
        let s = arch.isize as i64;
        assert_eq!(got.shape("patch_map"), [BATCH as i64, 1, s, s]);
        let want_patch = want.score_patch.as_ref().unwrap();
        let d_patch = max_abs_diff(got.get("score_patch"), want_patch);
        let d_pmap = max_abs_diff(got.get("patch_map"), &want.patch_map.as_ref().unwrap().data);
        let d_fused = max_abs_diff(got.get("score_fused"), want.score_fused.as_ref().unwrap());
        report.push(format!(
            "isize {} maps {maps:?} bank {bank}: score_patch {d_patch:.1e} (≈ {:.3}) patch_map {d_pmap:.1e} score_fused {d_fused:.1e}",
            arch.isize, want_patch[0]
        ));
        // Relative to the score's size: distances to N(0, 1) bank columns are ≈ 1–3 per channel.
        let tol = 1e-4 * want_patch.iter().fold(1.0f32, |a, v| a.max(v.abs()));
        for (name, d) in [("score_patch", d_patch), ("patch_map", d_pmap), ("score_fused", d_fused)] {
            assert!(d <= tol, "{arch:?} {maps:?}: `{name}` differs by {d:e} from the reference\n{}", report.join("\n"));
        }
        assert_ne!(got.get("score_patch")[0], got.get("score_patch")[1], "{arch:?}");
        // Random bank columns are never the query itself: every distance is above 0.
        assert!(want_patch.iter().all(|v| v.is_finite() && *v > 0.0), "{want_patch:?}");
    }
    eprintln!("{}", report.join("\n"));
}

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GANOMALY_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    p.is_file().then_some(p)
}

#[test]
fn official_checker_and_python_onnxruntime_agree() {
    let Some(python) = python() else {
        // `make test` sets GANOMALY_REQUIRE_PYTHON so CI cannot skip this silently.
        assert!(std::env::var_os("GANOMALY_REQUIRE_PYTHON").is_none(), "no .venv/bin/python; run `make venv`");
        eprintln!("SKIPPED: no .venv/bin/python (run `make venv`)");
        return;
    };
    for (i, arch) in archs().into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let weights = Weights::random_generator(&arch, 200 + i as u64);
        let bytes =
            ganomaly_core::onnx::write_model(&arch, &weights, &ModelMetadata::uncalibrated(arch, MAP_KERNEL)).unwrap();
        std::fs::write(dir.path().join("model.onnx"), &bytes).unwrap();
        let x = input(arch.nc as usize, arch.isize as usize);
        std::fs::write(dir.path().join("input.f32"), f32_bytes(&x.data)).unwrap();
        let got = run_ort(&bytes, &x);
        let mut outputs = serde_json::Map::new();
        for (name, shape, data) in &got.names {
            std::fs::write(dir.path().join(format!("{name}.f32")), f32_bytes(data)).unwrap();
            outputs.insert(name.clone(), serde_json::json!(shape));
        }
        let spec = serde_json::json!({"input_shape": [x.n, x.c, x.h, x.w], "outputs": outputs});
        std::fs::write(dir.path().join("outputs.json"), spec.to_string()).unwrap();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/onnx_check.py");
        let out = std::process::Command::new(&python).arg(&script).arg(dir.path()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{arch:?}: onnx checker / python onnxruntime failed:\n{text}");
        assert!(text.contains("checker OK"), "{text}");
        eprintln!(
            "isize {} nc {} extra {}: {}",
            arch.isize,
            arch.nc,
            arch.extralayers,
            text.lines().last().unwrap_or("")
        );
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
