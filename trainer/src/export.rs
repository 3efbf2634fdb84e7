//! Model file assembly: a calibration for every exported score from the held-out
//! normal images, the test figures beside it, provenance, and the ONNX bytes
//! written by `ganomaly_core::onnx` (the one graph writer; the trainer never builds
//! a graph itself).

use std::collections::BTreeMap;
use std::path::Path;

use ganomaly_core::calibrate::{normal_calibration, NORMAL_METHODS};
use ganomaly_core::metadata::{
    CalibrationMethod, FarInterval, ModelMetadata, PreprocessMeta, Provenance, ScoreKind, ScoreMeta,
};
use ganomaly_core::onnx::{write_model, OnnxError};
use serde::Serialize;
use tch::Device;

use crate::data::Splits;
use crate::evaluate::{evaluate, thresholds, AtThreshold, KindEval};
use crate::net::{NetError, NetG};
use crate::score::Scores;
use crate::score_choice::{choose_score, ScoreChoice, BENCH_DEFAULT_SCORE, BENCH_EVIDENCE};

/// Problems writing a model file.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("ONNX writer: {0}")]
    Onnx(#[from] OnnxError),
    #[error("writing {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Calibration(String),
}

/// Settings that shape the exported metadata.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub target_far: f64,
    /// The good-only threshold method (`--calibration`).
    pub calibration: CalibrationMethod,
    pub map_kernel: u32,
    pub default_score: ScoreChoice,
}

/// Builds the metadata: one calibration per kind from the held-out scores with
/// `settings.calibration`; test-set AUROC/F1 recorded next to each when `test` is given.
pub fn build_metadata(
    g: &NetG,
    holdout: &Scores,
    test: Option<&BTreeMap<ScoreKind, KindEval>>,
    settings: &ExportSettings,
    mut provenance: Provenance,
) -> Result<ModelMetadata, ExportError> {
    if holdout.is_empty() {
        return Err(ExportError::Calibration(
            "no held-out normal images to calibrate on (use --holdout > 0 with enough train/good images)".into(),
        ));
    }
    if settings.map_kernel % 2 == 0 {
        return Err(ExportError::Calibration(format!("--map-kernel must be odd, got {}", settings.map_kernel)));
    }
    let arch = g.arch;
    // Every kind the generator scores (`mahalanobis` and `patch` need their statistics,
    // `fused` its recipe).
    let scores = ScoreKind::ALL
        .into_iter()
        .filter(|&kind| holdout.has(kind))
        .map(|kind| {
            let mut calibration = normal_calibration(holdout.get(kind), settings.target_far, settings.calibration);
            if let Some(e) = test.and_then(|t| t.get(&kind)) {
                if e.auroc.is_finite() {
                    calibration.val_auroc = Some(e.auroc);
                    calibration.val_f1 = Some(e.f1);
                }
            }
            ScoreMeta {
                kind,
                calibration,
                kernel: (kind == ScoreKind::MapMax).then_some(settings.map_kernel),
                patch: (kind == ScoreKind::Patch).then(|| g.patch_stats.as_ref().map(|p| p.spec.clone())).flatten(),
                fusion: (kind == ScoreKind::Fused).then(|| g.fusion.clone()).flatten(),
            }
        })
        .collect::<Vec<_>>();
    let default_score = match settings.default_score.fixed() {
        Some(kind) => kind,
        // Resolved by the caller ([`choose_score`], in [`finish`]) where validation images are
        // at hand; a caller that has none gets the benchmark's default.
        None => {
            provenance.score_choice = Some(format!("auto: no validation defects; {BENCH_EVIDENCE}"));
            BENCH_DEFAULT_SCORE
        }
    };
    if scores.iter().all(|s| s.kind != default_score) {
        return Err(ExportError::Calibration(format!(
            "the default score `{}` is not exported by this generator (no feature statistics fitted)",
            default_score.as_str()
        )));
    }
    if provenance.score_choice.is_none() {
        provenance.score_choice = Some(format!("--default-score {}", default_score.as_str()));
    }
    Ok(ModelMetadata {
        arch,
        preprocess: PreprocessMeta::for_arch(&arch),
        scores,
        default_score,
        provenance,
        tiling: None,
    })
}

/// Calibration (held-out normals) and test evaluation of a trained NetG.
pub struct Finished {
    /// `None` when there are no held-out images to calibrate on.
    pub meta: Option<ModelMetadata>,
    /// Every score's test figures, at the calibrated thresholds; `None` without test defects.
    pub evals: Option<BTreeMap<ScoreKind, KindEval>>,
    /// Every good-only calibration method on the same held-out scores, and what each
    /// threshold does on test/ (the comparison behind the default method).
    pub methods: BTreeMap<ScoreKind, Vec<MethodCheck>>,
}

/// One calibration method's threshold for one score, and its test figures.
#[derive(Debug, Clone, Serialize)]
pub struct MethodCheck {
    /// The method asked for.
    pub asked: CalibrationMethod,
    /// The method used (`lognormal_tail` falls back to `conformal`).
    pub method: CalibrationMethod,
    pub threshold: f64,
    pub target_far: f64,
    pub expected_far: Option<FarInterval>,
    /// False-alarm rate on test/good and recall on `test/<defect>` at this threshold.
    pub test: Option<AtThreshold>,
}

/// [`MethodCheck`]s of every method for every kind the held-out scores cover.
pub fn compare_methods(
    holdout: &Scores,
    test: Option<&BTreeMap<ScoreKind, KindEval>>,
    target_far: f64,
) -> BTreeMap<ScoreKind, Vec<MethodCheck>> {
    ScoreKind::ALL
        .into_iter()
        .filter(|&kind| holdout.has(kind))
        .map(|kind| {
            let checks = NORMAL_METHODS
                .into_iter()
                .map(|asked| {
                    let c = normal_calibration(holdout.get(kind), target_far, asked);
                    MethodCheck {
                        asked,
                        method: c.method,
                        threshold: c.threshold,
                        target_far,
                        expected_far: c.expected_far,
                        test: test
                            .and_then(|t| t.get(&kind))
                            .map(|e| AtThreshold::new(&e.normal, &e.defect, c.threshold)),
                    }
                })
                .collect();
            (kind, checks)
        })
        .collect()
}

/// Scores `g` on the test and held-out images of `splits`, resolves `--score auto`
/// on the validation split, and builds the metadata ([`build_metadata`]).
pub fn finish(
    g: &NetG,
    splits: &Splits,
    settings: &ExportSettings,
    mut provenance: Provenance,
    device: Device,
) -> Result<Finished, ExportError> {
    let raw_evals =
        splits.test.as_ref().map(|t| evaluate(&t.items, &t.scores(g, settings.map_kernel, device), &BTreeMap::new()));
    let mut methods = BTreeMap::new();
    let meta = if splits.n_hold() > 0 {
        let hold_scores: Scores = splits.hold_scores(g, settings.map_kernel, device);
        methods = compare_methods(&hold_scores, raw_evals.as_ref(), settings.target_far);
        let mut settings = settings.clone();
        if settings.default_score == ScoreChoice::Auto {
            let (kind, evidence) = choose_score(g, &hold_scores, splits.val.as_ref(), settings.map_kernel, device);
            tracing::info!(score = kind.as_str(), %evidence, "default score");
            settings.default_score = ScoreChoice::from(kind);
            provenance.score_choice = Some(evidence);
        }
        Some(build_metadata(g, &hold_scores, raw_evals.as_ref(), &settings, provenance)?)
    } else {
        None
    };
    // Re-evaluate with the calibrated thresholds, so the report says what they do.
    let evals = raw_evals.map(|mut e| {
        let th = meta.as_ref().map(thresholds).unwrap_or_default();
        for (kind, ke) in e.iter_mut() {
            ke.calibrated = th.get(kind).map(|&t| AtThreshold::new(&ke.normal, &ke.defect, t));
        }
        e
    });
    Ok(Finished { meta, evals, methods })
}

/// Writes NetG with `meta` as ONNX to `path`.
pub fn write_onnx(path: &Path, g: &NetG, meta: &ModelMetadata) -> Result<(), ExportError> {
    let weights = g.to_weights()?;
    let bytes = write_model(&g.arch, &weights, meta)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ExportError::Io { path: dir.display().to_string(), source })?;
    }
    std::fs::write(path, bytes).map_err(|source| ExportError::Io { path: path.display().to_string(), source })
}

/// Versions recorded in the provenance.
pub fn versions() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("ganomaly-train".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("tch".to_string(), "0.26".to_string()),
        ("libtorch".to_string(), env!("GANOMALY_LIBTORCH_VERSION").to_string()),
    ])
}

/// Now as RFC 3339 UTC (no date crate needed for one timestamp).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
