//! The versioned model metadata carried in the ONNX file's `metadata_props`:
//! architecture, preprocessing, one calibration per exported score, provenance.
//!
//! Each top-level key holds one JSON document so that a person can read it with
//! any ONNX viewer, and so that adding a field inside a document does not need a
//! new key. Unknown keys are ignored (other tools add their own); a missing or
//! malformed key of ours is an error that names it.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::arch::ArchSpec;
use crate::patch::PatchSpec;

/// Version of the metadata schema this build writes and reads.
/// Version 2 added the calibration's `tail_fit` and `expected_far` and the methods
/// `conformal` and `lognormal_tail`; version 1 files read unchanged (the new fields are
/// optional), so models exported before still load.
pub const SCHEMA_VERSION: u32 = 2;

/// Schema versions this build reads.
pub const SCHEMA_VERSIONS_READ: std::ops::RangeInclusive<u32> = 1..=SCHEMA_VERSION;

pub const KEY_SCHEMA: &str = "ganomaly.schema_version";
pub const KEY_ARCH: &str = "ganomaly.arch";
pub const KEY_PREPROCESS: &str = "ganomaly.preprocess";
pub const KEY_SCORES: &str = "ganomaly.scores";
pub const KEY_DEFAULT_SCORE: &str = "ganomaly.default_score";
pub const KEY_PROVENANCE: &str = "ganomaly.provenance";
/// Optional: the tiling the model was trained on (`ganomaly-train train --tile`).
/// Its own key, so that builds from before it (which ignore unknown keys) still
/// read tiled models, and models without it read as untiled.
pub const KEY_TILING: &str = "ganomaly.tiling";

/// Errors reading model metadata; each names the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    #[error("model metadata key `{0}` is missing (was this model exported by ganomaly-train?)")]
    Missing(&'static str),
    #[error("model metadata key `{key}` is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("model metadata schema version {found} is not supported (this build reads versions 1 to {supported})")]
    Version { found: u32, supported: u32 },
}

/// How pixels become model input. Stored so the daemon cannot feed a gray model RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorMode {
    Gray,
    Rgb,
}

impl ColorMode {
    pub fn channels(self) -> u32 {
        match self {
            ColorMode::Gray => 1,
            ColorMode::Rgb => 3,
        }
    }
    pub fn from_channels(nc: u32) -> Option<ColorMode> {
        match nc {
            1 => Some(ColorMode::Gray),
            3 => Some(ColorMode::Rgb),
            _ => None,
        }
    }
}

/// Resize filter used by preprocessing (at training and serving alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    #[default]
    Bilinear,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessMeta {
    pub color: ColorMode,
    /// Square side the frame (or its ROI) is resized to.
    pub size: u32,
    pub resize: ResizeFilter,
    /// Pixel value range after normalisation; always [-1, 1] today (tanh output).
    pub value_range: [f32; 2],
}

impl PreprocessMeta {
    /// The preprocessing every model of `arch` uses today: the architecture's
    /// colour mode and size, bilinear resize, values in [-1, 1].
    pub fn for_arch(arch: &ArchSpec) -> PreprocessMeta {
        PreprocessMeta {
            color: ColorMode::from_channels(arch.nc).unwrap_or(ColorMode::Rgb),
            size: arch.isize,
            resize: ResizeFilter::Bilinear,
            value_range: [-1.0, 1.0],
        }
    }
}

/// The image-level scores the exported graph computes. The output tensor of each
/// is named by [`ScoreKind::output`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    /// The paper's score: mean((z_i − z_o)²).
    Latent,
    /// Mean absolute reconstruction error over pixels and channels.
    Recon,
    /// Maximum of the anomaly map after a k×k box filter.
    MapMax,
    /// How far the image's encoder features lie from the training images': f is
    /// encoder1's last 4×4×C activation (average-pooled to at most 1024 values),
    /// the score mean(((f − μ)ᵀW)²) is the squared Mahalanobis distance divided by
    /// D, with μ the training mean and WWᵀ the inverse of their (Ledoit–Wolf
    /// shrunk) covariance. The graph carries μ and W as `score.feature_mean` and
    /// `score.feature_whiten`. About 1 on typical training images.
    Mahalanobis,
    /// The maximum of the feature anomaly map `patch_map`: per position of a grid
    /// over encoder1's feature maps, the squared Mahalanobis distance (divided by d)
    /// of the position's feature vector from the training images' at that position
    /// ([`crate::patch`]; its configuration is the entry's `patch`).
    Patch,
    /// A fusion of other scores, each standardised on the held-out good images:
    /// `combine` over k of (s_k − mean_k) / std_k (the entry's `fusion`).
    Fused,
}

impl ScoreKind {
    pub const ALL: [ScoreKind; 6] = [
        ScoreKind::Latent,
        ScoreKind::Recon,
        ScoreKind::MapMax,
        ScoreKind::Mahalanobis,
        ScoreKind::Patch,
        ScoreKind::Fused,
    ];

    /// Name of the graph output that carries this score.
    pub fn output(self) -> &'static str {
        match self {
            ScoreKind::Latent => "score",
            ScoreKind::Recon => "score_recon",
            ScoreKind::MapMax => "score_map",
            ScoreKind::Mahalanobis => "score_mahalanobis",
            ScoreKind::Patch => "score_patch",
            ScoreKind::Fused => "score_fused",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ScoreKind::Latent => "latent",
            ScoreKind::Recon => "recon",
            ScoreKind::MapMax => "map_max",
            ScoreKind::Mahalanobis => "mahalanobis",
            ScoreKind::Patch => "patch",
            ScoreKind::Fused => "fused",
        }
    }

    pub fn parse(s: &str) -> Option<ScoreKind> {
        ScoreKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Name of the graph output with this score's own anomaly map `[N, 1, S, S]`,
    /// for the kinds that have one (the snapshot heat map follows the camera's score).
    pub fn map_output(self) -> Option<&'static str> {
        match self {
            ScoreKind::Patch => Some(OUTPUT_PATCH_MAP),
            _ => None,
        }
    }
}

/// Graph output of the `patch` score's feature anomaly map `[N, 1, S, S]`.
pub const OUTPUT_PATCH_MAP: &str = "patch_map";

/// How a fused score combines its standardised components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The largest z-score: any one score far off alarms.
    Max,
    /// The mean z-score: the scores' evidence added up.
    Mean,
}

/// The `fused` score's recipe, with the standardisation measured on the held-out
/// good images (the graph carries `mean` and `std` as `score.fusion_mean` and
/// `score.fusion_std`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionSpec {
    pub components: Vec<ScoreKind>,
    pub combine: Combine,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl FusionSpec {
    /// The components and rule of the trainer's `fused` score (benches/README.md: the
    /// scores that stay above chance on every benchmark set, their z-scores averaged).
    pub const DEFAULT_COMPONENTS: [ScoreKind; 3] = [ScoreKind::Latent, ScoreKind::Mahalanobis, ScoreKind::Patch];
    pub const DEFAULT_COMBINE: Combine = Combine::Mean;

    /// The default recipe with placeholder standardisation (mean 0, std 1): fixtures.
    pub fn uncalibrated() -> FusionSpec {
        let k = Self::DEFAULT_COMPONENTS.len();
        FusionSpec {
            components: Self::DEFAULT_COMPONENTS.to_vec(),
            combine: Self::DEFAULT_COMBINE,
            mean: vec![0.0; k],
            std: vec![1.0; k],
        }
    }

    /// The fused value of one image's component scores (same order as `components`).
    pub fn fuse(&self, values: &[f64]) -> f64 {
        let z = values.iter().zip(self.mean.iter().zip(&self.std)).map(|(v, (m, s))| (v - m) / s);
        match self.combine {
            Combine::Max => z.fold(f64::NEG_INFINITY, f64::max),
            Combine::Mean => z.sum::<f64>() / self.components.len().max(1) as f64,
        }
    }

    /// Every problem with the recipe against the scores listed beside it.
    fn check(&self, listed: &[ScoreKind]) -> Result<(), String> {
        let k = self.components.len();
        if k == 0 {
            return Err("`fused` needs at least one component".into());
        }
        if self.mean.len() != k || self.std.len() != k {
            return Err(format!(
                "`fused` has {k} components but {} means and {} stds",
                self.mean.len(),
                self.std.len()
            ));
        }
        for (i, c) in self.components.iter().enumerate() {
            if *c == ScoreKind::Fused || self.components[..i].contains(c) {
                return Err(format!("`fused` component `{}` is repeated or is `fused` itself", c.as_str()));
            }
            if !listed.contains(c) {
                return Err(format!("`fused` component `{}` has no entry of its own", c.as_str()));
            }
        }
        if self.mean.iter().any(|m| !m.is_finite()) || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err("`fused` needs finite means and finite, positive stds".into());
        }
        Ok(())
    }
}

/// How a threshold was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationMethod {
    /// A quantile of normal validation scores for a target false-alarm rate.
    NormalQuantile,
    /// The threshold that maximises F1 on a validation set with defects.
    F1Optimal,
    /// Not calibrated (fixtures, random weights): threshold is a placeholder.
    Uncalibrated,
    /// Split-conformal quantile: the ⌈(n+1)(1−α)⌉-th smallest normal score, the
    /// smallest rank that keeps the false-alarm rate at most α for exchangeable
    /// data (capped at the sample maximum when n is too small to certify α).
    Conformal,
    /// A log-normal fitted to the normal scores (mean and standard deviation of
    /// their logs), threshold at its 1−α quantile; used only when the fit passes
    /// its check ([`TailFit::accepted`]), else the calibration falls back to `conformal`.
    LognormalTail,
}

impl CalibrationMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CalibrationMethod::NormalQuantile => "normal_quantile",
            CalibrationMethod::F1Optimal => "f1_optimal",
            CalibrationMethod::Uncalibrated => "uncalibrated",
            CalibrationMethod::Conformal => "conformal",
            CalibrationMethod::LognormalTail => "lognormal_tail",
        }
    }
}

/// A parametric fit of the normal scores' upper tail and its check of fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailFit {
    /// `lognormal`: ln(score) ~ N(mu, sigma²).
    pub family: String,
    pub mu: f64,
    pub sigma: f64,
    /// Kolmogorov–Smirnov distance between the fit and the scores (parameters estimated).
    pub ks: f64,
    /// Lilliefors' 1 % critical value for that distance at this n (≈ 1.031/√n).
    pub ks_critical: f64,
    /// `ks <= ks_critical` and enough scores (≥ 10): the fit is used.
    pub accepted: bool,
}

/// The false-alarm rate expected on good images at a threshold, with an interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FarInterval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
    /// Coverage of [low, high] (0.95).
    pub level: f64,
    /// How the interval was made, in words.
    pub how: String,
}

/// Summary of the normal validation scores a calibration came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreStats {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// Threshold and normalisation range for one raw score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Raw score at or above which a frame is anomalous.
    pub threshold: f64,
    /// Normalisation range: normalized = clamp((s − threshold)/(max − min) + 0.5, 0, 1).
    pub min: f64,
    pub max: f64,
    pub method: CalibrationMethod,
    /// Target false-alarm rate for `normal_quantile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_false_alarm_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normal_stats: Option<ScoreStats>,
    /// Validation AUROC / F1, when defect images were available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_auroc: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_f1: Option<f64>,
    /// The tail fit a `lognormal_tail` calibration was made with (or, when its check
    /// failed and `conformal` was used instead, the rejected fit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_fit: Option<TailFit>,
    /// The false-alarm rate to expect on good images at `threshold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_far: Option<FarInterval>,
}

impl Calibration {
    /// A placeholder for uncalibrated models: threshold 0.5 over [0, 1].
    pub fn uncalibrated() -> Calibration {
        Calibration {
            threshold: 0.5,
            min: 0.0,
            max: 1.0,
            method: CalibrationMethod::Uncalibrated,
            target_false_alarm_rate: None,
            normal_stats: None,
            val_auroc: None,
            val_f1: None,
            tail_fit: None,
            expected_far: None,
        }
    }

    /// The normalized score of DESIGN.md: the threshold maps to 0.5.
    pub fn normalize(&self, raw: f64) -> f64 {
        let span = self.max - self.min;
        let span = if span > 0.0 && span.is_finite() { span } else { 1.0 };
        ((raw - self.threshold) / span + 0.5).clamp(0.0, 1.0)
    }
}

/// One score the graph exports, with its calibration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreMeta {
    pub kind: ScoreKind,
    pub calibration: Calibration,
    /// Box-filter side for `map_max` (odd); absent for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<u32>,
    /// The `patch` score's maps, grid and channels; absent for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<PatchSpec>,
    /// The `fused` score's recipe; absent for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<FusionSpec>,
}

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// sha256 over the training file list and bytes.
    pub data_digest: String,
    pub epochs: u32,
    pub seed: u64,
    /// `ganomaly-train x.y.z`, libtorch version, etc.
    pub versions: BTreeMap<String, String>,
    /// RFC 3339 time of export.
    pub created: String,
    /// Why the default score was chosen (e.g. `--score auto` evidence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_choice: Option<String>,
    /// Free-form notes (e.g. `random weights: test fixture`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub notes: String,
}

/// Everything the daemon needs from a model file.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMetadata {
    pub arch: ArchSpec,
    pub preprocess: PreprocessMeta,
    pub scores: Vec<ScoreMeta>,
    pub default_score: ScoreKind,
    pub provenance: Provenance,
    /// The tiles the model was trained on (source pixels per tile and stride),
    /// `None` for a model trained on whole images: the daemon tiles a camera
    /// this way unless its config says otherwise (`[cameras.<name>.tiles]`).
    pub tiling: Option<crate::tiles::Tiling>,
}

impl ModelMetadata {
    /// Metadata for an uncalibrated model of `arch` (fixtures, tests).
    pub fn uncalibrated(arch: ArchSpec, map_kernel: u32) -> ModelMetadata {
        ModelMetadata {
            arch,
            preprocess: PreprocessMeta::for_arch(&arch),
            scores: ScoreKind::ALL
                .into_iter()
                .map(|kind| ScoreMeta {
                    kind,
                    calibration: Calibration::uncalibrated(),
                    kernel: (kind == ScoreKind::MapMax).then_some(map_kernel),
                    patch: (kind == ScoreKind::Patch).then(|| arch.default_patch()),
                    fusion: (kind == ScoreKind::Fused).then(FusionSpec::uncalibrated),
                })
                .collect(),
            default_score: ScoreKind::Latent,
            provenance: Provenance { notes: "uncalibrated".into(), ..Default::default() },
            tiling: None,
        }
    }

    /// The score entry of `kind`.
    pub fn score(&self, kind: ScoreKind) -> Option<&ScoreMeta> {
        self.scores.iter().find(|s| s.kind == kind)
    }

    /// Box-filter side used for `map_max`.
    pub fn map_kernel(&self) -> Option<u32> {
        self.score(ScoreKind::MapMax).and_then(|s| s.kernel)
    }

    /// The `patch` score's configuration, when the model exports it.
    pub fn patch(&self) -> Option<&PatchSpec> {
        self.score(ScoreKind::Patch).and_then(|s| s.patch.as_ref())
    }

    /// The `fused` score's recipe, when the model exports it.
    pub fn fusion(&self) -> Option<&FusionSpec> {
        self.score(ScoreKind::Fused).and_then(|s| s.fusion.as_ref())
    }

    /// Key/value pairs for `metadata_props`.
    pub fn to_props(&self) -> BTreeMap<String, String> {
        let json = |v: &dyn erased::Json| v.to_json();
        let mut m = BTreeMap::new();
        m.insert(KEY_SCHEMA.into(), SCHEMA_VERSION.to_string());
        m.insert(KEY_ARCH.into(), json(&self.arch));
        m.insert(KEY_PREPROCESS.into(), json(&self.preprocess));
        m.insert(KEY_SCORES.into(), json(&self.scores));
        m.insert(KEY_DEFAULT_SCORE.into(), self.default_score.as_str().into());
        m.insert(KEY_PROVENANCE.into(), json(&self.provenance));
        if let Some(t) = &self.tiling {
            m.insert(KEY_TILING.into(), json(t));
        }
        m
    }

    /// Reads and checks the metadata; the first problem is returned, naming its key.
    pub fn from_props(props: &BTreeMap<String, String>) -> Result<ModelMetadata, MetadataError> {
        let version_text = props.get(KEY_SCHEMA).ok_or(MetadataError::Missing(KEY_SCHEMA))?;
        let found: u32 = version_text.trim().parse().map_err(|_| MetadataError::Invalid {
            key: KEY_SCHEMA,
            reason: format!("`{version_text}` is not a number"),
        })?;
        if !SCHEMA_VERSIONS_READ.contains(&found) {
            return Err(MetadataError::Version { found, supported: SCHEMA_VERSION });
        }
        let arch: ArchSpec = parse(props, KEY_ARCH)?;
        arch.validate().map_err(|errs| MetadataError::Invalid {
            key: KEY_ARCH,
            reason: errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "),
        })?;
        let preprocess: PreprocessMeta = parse(props, KEY_PREPROCESS)?;
        if preprocess.color.channels() != arch.nc {
            return Err(MetadataError::Invalid {
                key: KEY_PREPROCESS,
                reason: format!("color {:?} does not match the architecture's nc = {}", preprocess.color, arch.nc),
            });
        }
        if preprocess.size != arch.isize {
            return Err(MetadataError::Invalid {
                key: KEY_PREPROCESS,
                reason: format!("size {} does not match the architecture's isize = {}", preprocess.size, arch.isize),
            });
        }
        let scores: Vec<ScoreMeta> = parse(props, KEY_SCORES)?;
        if scores.iter().all(|s| s.kind != ScoreKind::Latent) {
            return Err(MetadataError::Invalid { key: KEY_SCORES, reason: "no entry for the `latent` score".into() });
        }
        for s in &scores {
            let c = &s.calibration;
            if !(c.threshold.is_finite() && c.min.is_finite() && c.max.is_finite()) || c.max < c.min {
                return Err(MetadataError::Invalid {
                    key: KEY_SCORES,
                    reason: format!(
                        "calibration of `{}` needs finite threshold/min/max with min ≤ max",
                        s.kind.as_str()
                    ),
                });
            }
            if s.kind == ScoreKind::MapMax && !matches!(s.kernel, Some(k) if k % 2 == 1) {
                return Err(MetadataError::Invalid {
                    key: KEY_SCORES,
                    reason: "`map_max` needs an odd `kernel`".into(),
                });
            }
            let invalid = |reason: String| MetadataError::Invalid { key: KEY_SCORES, reason };
            if s.kind == ScoreKind::Patch {
                let spec = s.patch.as_ref().ok_or_else(|| invalid("`patch` needs its `patch` configuration".into()))?;
                arch.check_patch(spec).map_err(|e| invalid(e.to_string()))?;
            }
            if s.kind == ScoreKind::Fused {
                let listed: Vec<ScoreKind> = scores.iter().map(|s| s.kind).collect();
                let f = s.fusion.as_ref().ok_or_else(|| invalid("`fused` needs its `fusion` recipe".into()))?;
                f.check(&listed).map_err(invalid)?;
            }
        }
        let default_text = props.get(KEY_DEFAULT_SCORE).ok_or(MetadataError::Missing(KEY_DEFAULT_SCORE))?;
        let default_score = ScoreKind::parse(default_text.trim()).ok_or_else(|| MetadataError::Invalid {
            key: KEY_DEFAULT_SCORE,
            reason: format!(
                "`{default_text}` is not one of {}",
                ScoreKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
            ),
        })?;
        if scores.iter().all(|s| s.kind != default_score) {
            return Err(MetadataError::Invalid {
                key: KEY_DEFAULT_SCORE,
                reason: format!("`{}` has no entry in `{KEY_SCORES}`", default_score.as_str()),
            });
        }
        let provenance: Provenance = parse(props, KEY_PROVENANCE)?;
        let tiling = match props.get(KEY_TILING) {
            None => None,
            Some(_) => {
                let t: crate::tiles::Tiling = parse(props, KEY_TILING)?;
                t.check().map_err(|e| MetadataError::Invalid { key: KEY_TILING, reason: e.to_string() })?;
                Some(t)
            }
        };
        Ok(ModelMetadata { arch, preprocess, scores, default_score, provenance, tiling })
    }
}

fn parse<T: DeserializeOwned>(props: &BTreeMap<String, String>, key: &'static str) -> Result<T, MetadataError> {
    let text = props.get(key).ok_or(MetadataError::Missing(key))?;
    serde_json::from_str(text).map_err(|e| MetadataError::Invalid { key, reason: e.to_string() })
}

mod erased {
    /// Object-safe JSON serialisation for the few metadata documents.
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            // Serialising plain structs of numbers and strings cannot fail.
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ModelMetadata {
        let arch = ArchSpec { isize: 64, nc: 3, nz: 100, ngf: 32, ndf: 32, extralayers: 0, ..Default::default() };
        ModelMetadata::uncalibrated(arch, 5)
    }

    #[test]
    fn round_trips_through_props() {
        let m = sample();
        assert_eq!(ModelMetadata::from_props(&m.to_props()), Ok(m));
    }

    #[test]
    fn missing_key_is_named() {
        for key in [KEY_SCHEMA, KEY_ARCH, KEY_PREPROCESS, KEY_SCORES, KEY_DEFAULT_SCORE, KEY_PROVENANCE] {
            let mut p = sample().to_props();
            p.remove(key);
            let err = ModelMetadata::from_props(&p).unwrap_err();
            assert_eq!(err, MetadataError::Missing(key));
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let mut p = sample().to_props();
        p.insert(
            KEY_ARCH.into(),
            r#"{"isize": 60, "nc": 3, "nz": 100, "ngf": 32, "ndf": 32, "extralayers": 0}"#.into(),
        );
        let err = ModelMetadata::from_props(&p).unwrap_err();
        assert!(
            matches!(&err, MetadataError::Invalid { key: KEY_ARCH, reason } if reason.contains("multiple of 16")),
            "{err}"
        );

        let mut p = sample().to_props();
        p.insert(
            KEY_PREPROCESS.into(),
            r#"{"color":"gray","size":64,"resize":"bilinear","value_range":[-1,1]}"#.into(),
        );
        assert!(matches!(ModelMetadata::from_props(&p), Err(MetadataError::Invalid { key: KEY_PREPROCESS, .. })));

        let mut p = sample().to_props();
        p.insert(KEY_DEFAULT_SCORE.into(), "psnr".into());
        assert!(matches!(ModelMetadata::from_props(&p), Err(MetadataError::Invalid { key: KEY_DEFAULT_SCORE, .. })));

        let mut p = sample().to_props();
        p.insert(KEY_SCHEMA.into(), "3".into());
        assert_eq!(ModelMetadata::from_props(&p), Err(MetadataError::Version { found: 3, supported: 2 }));

        let mut p = sample().to_props();
        p.insert(KEY_SCORES.into(), "not json".into());
        assert!(matches!(ModelMetadata::from_props(&p), Err(MetadataError::Invalid { key: KEY_SCORES, .. })));
    }

    #[test]
    fn tiling_is_optional_and_round_trips() {
        // Models from before tiling (no key) are untiled.
        let m = sample();
        assert!(!m.to_props().contains_key(KEY_TILING));
        assert_eq!(ModelMetadata::from_props(&m.to_props()).unwrap().tiling, None);
        let mut t = sample();
        t.tiling = Some(crate::tiles::Tiling { size: 128, stride: 96 });
        assert_eq!(ModelMetadata::from_props(&t.to_props()), Ok(t.clone()));
        let mut p = t.to_props();
        p.insert(KEY_TILING.into(), r#"{"size":64,"stride":0}"#.into());
        let err = ModelMetadata::from_props(&p).unwrap_err();
        assert!(matches!(&err, MetadataError::Invalid { key: KEY_TILING, .. }), "{err}");
    }

    #[test]
    fn version_1_models_still_load() {
        // A version-1 calibration document has none of the version-2 fields.
        let mut p = sample().to_props();
        p.insert(KEY_SCHEMA.into(), "1".into());
        let v1_scores = r#"[{"kind":"latent","calibration":{"threshold":0.5,"min":0.0,"max":1.0,"method":"normal_quantile","target_false_alarm_rate":0.01}}]"#;
        p.insert(KEY_SCORES.into(), v1_scores.into());
        p.insert(KEY_DEFAULT_SCORE.into(), "latent".into());
        let m = ModelMetadata::from_props(&p).expect("version 1 loads");
        let c = &m.score(ScoreKind::Latent).unwrap().calibration;
        assert_eq!(
            (c.method, c.tail_fit.as_ref(), c.expected_far.as_ref()),
            (CalibrationMethod::NormalQuantile, None, None)
        );
    }

    #[test]
    fn normalize_puts_threshold_at_half() {
        let c = Calibration { threshold: 2.0, min: 1.0, max: 5.0, ..Calibration::uncalibrated() };
        assert_eq!(c.normalize(2.0), 0.5);
        assert_eq!(c.normalize(3.0), 0.75);
        assert_eq!(c.normalize(100.0), 1.0);
        assert_eq!(c.normalize(-100.0), 0.0);
    }
}
