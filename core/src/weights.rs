//! Plain f32 weights keyed by the parameter names of [`crate::arch`]: the
//! hand-off format between the trainer (tch) and the ONNX writer.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_distr_free::normal;

use crate::arch::{ArchSpec, ParamSpec};

/// Errors when weights do not fit an architecture.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WeightsError {
    #[error("weight `{0}` is missing")]
    Missing(String),
    #[error("weight `{name}` has shape {got:?}, the architecture needs {want:?}")]
    Shape { name: String, got: Vec<usize>, want: Vec<usize> },
    #[error("weight `{name}` holds {got} values, its shape {shape:?} needs {want}")]
    Length { name: String, got: usize, want: usize, shape: Vec<usize> },
    #[error("weight `{0}` holds a NaN or infinite value")]
    NotFinite(String),
}

/// One tensor: row-major values and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Named tensors. Extra entries (e.g. NetD's) are allowed and ignored by consumers
/// that do not need them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Weights {
    pub tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) {
        self.tensors.insert(name.into(), Tensor { shape, data });
    }

    pub fn get(&self, name: &str) -> Result<&Tensor, WeightsError> {
        self.tensors.get(name).ok_or_else(|| WeightsError::Missing(name.to_string()))
    }

    /// Checks every parameter of `specs` is present, of the right shape and finite.
    pub fn check(&self, specs: &[ParamSpec]) -> Result<(), WeightsError> {
        for spec in specs {
            let t = self.get(&spec.name)?;
            if t.shape != spec.shape {
                return Err(WeightsError::Shape {
                    name: spec.name.clone(),
                    got: t.shape.clone(),
                    want: spec.shape.clone(),
                });
            }
            let want: usize = spec.shape.iter().product();
            if t.data.len() != want {
                return Err(WeightsError::Length {
                    name: spec.name.clone(),
                    got: t.data.len(),
                    want,
                    shape: t.shape.clone(),
                });
            }
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(WeightsError::NotFinite(spec.name.clone()));
            }
        }
        Ok(())
    }

    /// Random generator weights (and `mahalanobis` feature statistics) for tests and fixtures: conv weights N(0, 0.02) as the
    /// DCGAN init, BatchNorm gamma N(1, 0.02), and — unlike a fresh network — non-trivial
    /// beta and running statistics, so that a writer that mixes them up is caught.
    pub fn random_generator(arch: &ArchSpec, seed: u64) -> Weights {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut w = Weights::default();
        for spec in arch.generator_params() {
            let n: usize = spec.shape.iter().product();
            let data: Vec<f32> = if spec.name.ends_with("running_var") {
                (0..n).map(|_| 0.5 + normal(&mut rng).abs() * 0.5).collect()
            } else if spec.name.ends_with("running_mean") || spec.name.ends_with("bias") {
                (0..n).map(|_| normal(&mut rng) * 0.1).collect()
            } else if spec.shape.len() == 1 {
                (0..n).map(|_| 1.0 + normal(&mut rng) * 0.02).collect()
            } else {
                // Scale so activations neither vanish nor explode through deep nets:
                // N(0, 0.02) is the DCGAN init; at fan-in 4096 it keeps tanh outputs
                // in range but latent differences would be tiny, so widen it a bit.
                let fan_in: usize = spec.shape[1..].iter().product();
                let std = (2.0 / fan_in as f32).sqrt().max(0.02);
                (0..n).map(|_| normal(&mut rng) * std).collect()
            };
            w.insert(spec.name, spec.shape, data);
        }
        // Feature statistics for the `mahalanobis` score: a mean near the
        // features' scale and a dense whitening matrix (every entry matters, so a
        // writer that transposes it is caught).
        let d = arch.feature_dim();
        let mean = (0..d).map(|_| normal(&mut rng) * 0.1).collect();
        let whiten = (0..d * d)
            .map(|i| if i % (d + 1) == 0 { 1.0 } else { 0.0 } + normal(&mut rng) * 0.3 / (d as f32).sqrt())
            .collect();
        w.insert(crate::arch::FEATURE_MEAN, vec![d], mean);
        w.insert(crate::arch::FEATURE_WHITEN, vec![d, d], whiten);
        // The default `patch` score's per-position statistics, dense likewise.
        let spec = arch.default_patch();
        let (p, d) = ((spec.grid * spec.grid) as usize, spec.channels.len());
        let mean = (0..p * d).map(|_| normal(&mut rng) * 0.1).collect();
        let whiten = (0..p * d * d)
            .map(|i| if i % (d * d) % (d + 1) == 0 { 1.0 } else { 0.0 } + normal(&mut rng) * 0.3 / (d as f32).sqrt())
            .collect();
        w.insert(crate::patch::PATCH_MEAN, vec![p, 1, d], mean);
        w.insert(crate::patch::PATCH_WHITEN, vec![p, d, d], whiten);
        w
    }

    /// Replaces the `patch` statistics by random ones of `spec`'s statistic (tests
    /// of the nearest-neighbour graph): a bank of N(0, 1) columns, centres
    /// N(0, 0.1) and scales near 1, so that a writer that mixes them up is caught.
    pub fn insert_random_patch(&mut self, arch: &ArchSpec, spec: &crate::patch::PatchSpec, seed: u64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for name in [
            crate::patch::PATCH_MEAN,
            crate::patch::PATCH_WHITEN,
            crate::patch::PATCH_CENTER,
            crate::patch::PATCH_SCALE,
            crate::patch::PATCH_BANK,
        ] {
            self.tensors.remove(name);
        }
        for param in arch.patch_params(spec) {
            let n: usize = param.shape.iter().product();
            let data = match param.name.as_str() {
                crate::patch::PATCH_SCALE => (0..n).map(|_| 1.0 + normal(&mut rng).abs() * 0.5).collect(),
                crate::patch::PATCH_CENTER | crate::patch::PATCH_MEAN => {
                    (0..n).map(|_| normal(&mut rng) * 0.1).collect()
                }
                crate::patch::PATCH_WHITEN => {
                    let d = param.shape[2];
                    (0..n)
                        .map(|i| {
                            let eye = if i % (d * d) % (d + 1) == 0 { 1.0 } else { 0.0 };
                            eye + normal(&mut rng) * 0.3 / (d as f32).sqrt()
                        })
                        .collect()
                }
                _ => (0..n).map(|_| normal(&mut rng)).collect(),
            };
            self.insert(&param.name, param.shape, data);
        }
    }
}

/// A tiny, deterministic normal sampler (Box–Muller on ChaCha output), so that
/// fixtures are the same bytes on every machine without another dependency.
mod rand_distr_free {
    use rand::Rng;

    pub fn normal<R: Rng>(rng: &mut R) -> f32 {
        let u1: f64 = rng.random::<f64>().max(1e-12);
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_fit_their_arch_and_check_names_problems() {
        let arch = ArchSpec { isize: 32, nc: 1, nz: 8, ngf: 8, ndf: 8, extralayers: 1, ..Default::default() };
        let mut w = Weights::random_generator(&arch, 1);
        assert_eq!(w.check(&arch.generator_params()), Ok(()));
        w.tensors.remove("decoder.1.running_var");
        assert_eq!(w.check(&arch.generator_params()), Err(WeightsError::Missing("decoder.1.running_var".into())));
        let mut w = Weights::random_generator(&arch, 1);
        w.insert("encoder1.0.weight", vec![8, 1, 4, 3], vec![0.0; 96]);
        assert!(
            matches!(w.check(&arch.generator_params()), Err(WeightsError::Shape { name, .. }) if name == "encoder1.0.weight")
        );
    }

    #[test]
    fn random_weights_are_deterministic() {
        let arch = ArchSpec { isize: 32, nc: 3, nz: 8, ngf: 8, ndf: 8, extralayers: 0, ..Default::default() };
        assert_eq!(Weights::random_generator(&arch, 7), Weights::random_generator(&arch, 7));
        assert_ne!(Weights::random_generator(&arch, 7), Weights::random_generator(&arch, 8));
    }
}
