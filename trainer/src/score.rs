//! Eval-mode scoring in libtorch, op for op what the exported ONNX graph computes
//! (`score`, `score_recon`, `score_map`, `score_mahalanobis`, `anomaly_map`), so that figures measured
//! here are the figures the daemon will see.

use ganomaly_core::arch::{ArchSpec, FEATURE_MEAN, FEATURE_WHITEN};
use ganomaly_core::metadata::ScoreKind;
use ganomaly_core::weights::{Weights, WeightsError};
use tch::{Device, Kind, Tensor};

use crate::net::{NetError, NetG};

/// Statistics of the training images' feature vectors f (`NetG::features`: the
/// encoder's last 4×4×C activation, pooled to D ≤ 1024 values) for the
/// `mahalanobis` score: mean μ `[D]` and whitening matrix W `[D, D]` with
/// WWᵀ = Σ⁻¹, Σ the Ledoit–Wolf shrunk covariance (a thousand dimensions from a
/// few hundred images: the plain sample covariance is singular).
#[derive(Debug)]
pub struct FeatureStats {
    pub mean: Tensor,
    pub whiten: Tensor,
    /// Ledoit–Wolf shrinkage intensity in [0, 1] (0: sample covariance).
    pub shrinkage: f64,
}

impl Clone for FeatureStats {
    fn clone(&self) -> Self {
        FeatureStats { mean: self.mean.copy(), whiten: self.whiten.copy(), shrinkage: self.shrinkage }
    }
}

impl FeatureStats {
    /// Fits the statistics on the features of `x` (CPU tensor of training images).
    pub fn fit(g: &NetG, x: &Tensor, batch: i64, device: Device) -> Result<FeatureStats, NetError> {
        let n = x.size()[0];
        if n < 2 {
            return Err(NetError::Stats(format!("{n} training image(s): the feature covariance needs at least 2")));
        }
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = batch.min(n - start);
            parts.push(
                g.features(&x.narrow(0, start, len).to_device(device)).to_device(Device::Cpu).to_kind(Kind::Double),
            );
            start += len;
        }
        let f = Tensor::cat(&parts, 0);
        let mean = f.mean_dim(&[0i64][..], false, Kind::Double);
        let (cov, shrinkage) = ledoit_wolf(&(&f - &mean));
        // Σ⁻¹ = L Lᵀ (Cholesky), so ‖(f − μ)ᵀL‖² is the squared Mahalanobis distance.
        let precision = Tensor::f_linalg_inv(&cov)?;
        let precision = (&precision + precision.transpose(0, 1)) * 0.5;
        let whiten = precision.f_linalg_cholesky(false).map_err(|e| {
            NetError::Stats(format!("the feature covariance of {n} images is not positive definite ({e}); are the training images all alike?"))
        })?;
        let stats = FeatureStats { mean: mean.to_kind(Kind::Float), whiten: whiten.to_kind(Kind::Float), shrinkage };
        if !bool::try_from(stats.whiten.isfinite().all())? {
            return Err(NetError::Stats(format!("non-finite whitening matrix from {n} images")));
        }
        Ok(stats)
    }

    /// Adds `score.feature_mean` and `score.feature_whiten` to `w`.
    pub fn insert_into(&self, w: &mut Weights) -> Result<(), NetError> {
        for (name, t) in [(FEATURE_MEAN, &self.mean), (FEATURE_WHITEN, &self.whiten)] {
            let shape = t.size().iter().map(|&d| d as usize).collect();
            w.insert(name, shape, Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))?);
        }
        Ok(())
    }

    /// The statistics `w` carries, checked against `arch`; `None` when it has none.
    pub fn from_weights(arch: &ArchSpec, w: &Weights, device: Device) -> Result<Option<FeatureStats>, NetError> {
        if !w.tensors.contains_key(FEATURE_MEAN) && !w.tensors.contains_key(FEATURE_WHITEN) {
            return Ok(None);
        }
        let specs = arch.feature_stats_params();
        // A model whose statistics do not fit its architecture is refused by name.
        w.check(&specs)?;
        let t = |name: &str| -> Result<Tensor, WeightsError> {
            let v = w.get(name)?;
            let shape: Vec<i64> = v.shape.iter().map(|&d| d as i64).collect();
            Ok(Tensor::from_slice(&v.data).reshape(&shape).to_device(device))
        };
        Ok(Some(FeatureStats { mean: t(FEATURE_MEAN)?, whiten: t(FEATURE_WHITEN)?, shrinkage: f64::NAN }))
    }

    /// mean(((f − μ)ᵀW)²) per row of `f` `[N, D]`: what `score_mahalanobis` computes.
    pub fn score(&self, f: &Tensor) -> Tensor {
        let white = (f - self.mean.to_device(f.device())).matmul(&self.whiten.to_device(f.device()));
        white.square().mean_dim(&[1i64][..], false, Kind::Float)
    }
}

/// Ledoit & Wolf (2004) shrinkage of the sample covariance of centred rows `x`
/// `[n, p]` (f64) towards a scaled identity, with their optimal intensity (as
/// scikit-learn's `ledoit_wolf`). Returns the covariance and the intensity.
pub fn ledoit_wolf(x: &Tensor) -> (Tensor, f64) {
    let (n, p) = (x.size()[0] as f64, x.size()[1]);
    let s = x.transpose(0, 1).matmul(x) / n;
    let mu = s.trace().double_value(&[]) / p as f64;
    let eye = Tensor::eye(p, (Kind::Double, x.device()));
    let delta = (&s - &eye * mu).square().sum(Kind::Double).double_value(&[]) / p as f64;
    // Σ_k ‖x_k x_kᵀ − S‖²_F = Σ_k ‖x_k‖⁴ − n‖S‖²_F
    let norms4 =
        x.square().sum_dim_intlist(&[1i64][..], false, Kind::Double).square().sum(Kind::Double).double_value(&[]);
    let s2 = s.square().sum(Kind::Double).double_value(&[]);
    let beta = ((norms4 - n * s2) / (n * n * p as f64)).max(0.0);
    let shrinkage = if delta > 0.0 { beta.min(delta) / delta } else { 1.0 };
    // A tiny ridge keeps a degenerate set (all features equal: μ = 0) invertible.
    let ridge = 1e-9 * (mu.abs() + 1e-12);
    (&s * (1.0 - shrinkage) + &eye * (shrinkage * mu + ridge), shrinkage)
}

/// Per-image scores of one set of images, one vector per kind (same order as input).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores {
    pub latent: Vec<f64>,
    pub recon: Vec<f64>,
    pub map_max: Vec<f64>,
    /// Empty when the generator has no feature statistics.
    pub mahalanobis: Vec<f64>,
}

impl Scores {
    pub fn get(&self, kind: ScoreKind) -> &[f64] {
        match kind {
            ScoreKind::Latent => &self.latent,
            ScoreKind::Recon => &self.recon,
            ScoreKind::MapMax => &self.map_max,
            ScoreKind::Mahalanobis => &self.mahalanobis,
        }
    }
    pub fn len(&self) -> usize {
        self.latent.len()
    }
    /// Whether `kind` was scored (`mahalanobis` needs feature statistics).
    pub fn has(&self, kind: ScoreKind) -> bool {
        self.get(kind).len() == self.len()
    }
    pub fn is_empty(&self) -> bool {
        self.latent.is_empty()
    }
}

/// The graph's outputs for one batch (eval mode, no grad).
pub struct Outputs {
    pub score: Tensor,
    pub score_recon: Tensor,
    pub score_map: Tensor,
    /// `None` without feature statistics.
    pub score_mahalanobis: Option<Tensor>,
    pub recon: Tensor,
    pub anomaly_map: Tensor,
}

/// Runs NetG in eval mode on `x` (`[N, C, S, S]` on any device) and computes the
/// exported outputs; `kernel` is the odd box-filter side of `score_map`.
pub fn outputs(g: &NetG, x: &Tensor, kernel: u32) -> Outputs {
    tch::no_grad(|| {
        let out = g.forward(x, false);
        let score = (&out.latent_i - &out.latent_o).square().mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
        let diff = (x - &out.fake).abs();
        let score_recon = diff.mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
        let anomaly_map = diff.mean_dim(&[1i64][..], true, Kind::Float);
        let k = i64::from(kernel);
        let smoothed = anomaly_map.avg_pool2d([k, k], [1, 1], [k / 2, k / 2], false, false, None::<i64>);
        let score_map = smoothed.amax(&[1i64, 2, 3][..], false);
        let score_mahalanobis = g.feature_stats.as_ref().map(|c| c.score(&g.pool_features(&out.feature_map)));
        Outputs { score, score_recon, score_map, score_mahalanobis, recon: out.fake, anomaly_map }
    })
}

/// Scores every image of `x` (CPU tensor) in batches of `batch` on `device`.
pub fn score_all(g: &NetG, x: &Tensor, kernel: u32, batch: i64, device: Device) -> Scores {
    let n = x.size()[0];
    let mut s = Scores::default();
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let xb = x.narrow(0, start, len).to_device(device);
        let o = outputs(g, &xb, kernel);
        let mahal = o.score_mahalanobis.as_ref();
        let pairs = [
            (&mut s.latent, Some(&o.score)),
            (&mut s.recon, Some(&o.score_recon)),
            (&mut s.map_max, Some(&o.score_map)),
            (&mut s.mahalanobis, mahal),
        ];
        for (dst, t) in pairs.into_iter().filter_map(|(d, t)| t.map(|t| (d, t))) {
            let v = Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float)).unwrap_or_default();
            dst.extend(v.into_iter().map(f64::from));
        }
        start += len;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ganomaly_core::arch::ArchSpec;

    #[test]
    fn ledoit_wolf_by_hand() {
        // Centred rows (±1, 0), (0, ±2): S = diag(0.5, 2), μ = tr(S)/p = 1.25,
        // δ = ‖S − μI‖²/p = 0.5625, β = (Σ‖x‖⁴ − n‖S‖²)/(n²p) = (34 − 17)/32 = 0.53125.
        let x = Tensor::from_slice(&[1.0f64, 0.0, -1.0, 0.0, 0.0, 2.0, 0.0, -2.0]).reshape([4, 2]);
        let (cov, shrink) = ledoit_wolf(&x);
        let want = 0.53125 / 0.5625;
        assert!((shrink - want).abs() < 1e-12, "{shrink}");
        let c = Vec::<f64>::try_from(cov.flatten(0, -1)).unwrap();
        let (a, b) = ((1.0 - want) * 0.5 + want * 1.25, (1.0 - want) * 2.0 + want * 1.25);
        assert!((c[0] - a).abs() < 1e-8 && (c[3] - b).abs() < 1e-8 && c[1].abs() < 1e-12, "{c:?}");
    }

    #[test]
    fn code_statistics_whiten_the_training_codes() {
        // isize 16, ngf 2: the feature map is 4×4×4, D = 64.
        let a = ArchSpec { isize: 16, nc: 1, nz: 4, ngf: 2, ndf: 2, extralayers: 0, ..Default::default() };
        let (g, x) = crate::net::seeded(5, || {
            (NetG::new(&a, Device::Cpu), Tensor::rand([300, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0)
        });
        let stats = FeatureStats::fit(&g, &x, 64, Device::Cpu).unwrap();
        assert!((0.0..=1.0).contains(&stats.shrinkage), "{}", stats.shrinkage);
        // W whitens the shrunk covariance: WWᵀΣ = I.
        let z = g.features(&x);
        assert_eq!(z.size(), [300, 64]);
        let zd = z.to_kind(Kind::Double);
        let (cov, shrink) = ledoit_wolf(&(&zd - zd.mean_dim(&[0i64][..], true, Kind::Double)));
        assert!((shrink - stats.shrinkage).abs() < 1e-9);
        let w = stats.whiten.to_kind(Kind::Double);
        let eye = w.matmul(&w.transpose(0, 1)).matmul(&cov);
        let err = (eye - Tensor::eye(64, (Kind::Double, Device::Cpu))).abs().max().double_value(&[]);
        assert!(err < 1e-4, "WWᵀΣ − I: {err}");
        let s = stats.score(&z);
        // Far from the training codes scores higher than any training image.
        let far = stats.score(&(z.mean_dim(&[0i64][..], true, Kind::Float) + z.std(true) * 20.0));
        assert!(far.double_value(&[0]) > s.max().double_value(&[]));
        // Round trip through the model file's tensors.
        let mut w = Weights::default();
        stats.insert_into(&mut w).unwrap();
        let back = FeatureStats::from_weights(&a, &w, Device::Cpu).unwrap().unwrap();
        assert!(back.score(&z).allclose(&s, 1e-6, 1e-6, false));
        assert!(FeatureStats::from_weights(&a, &Weights::default(), Device::Cpu).unwrap().is_none());
        w.tensors.remove(FEATURE_MEAN);
        assert!(FeatureStats::from_weights(&a, &w, Device::Cpu).unwrap_err().to_string().contains(FEATURE_MEAN));
        // Two images cannot make a covariance: the error says so.
        let one = x.narrow(0, 0, 1);
        assert!(FeatureStats::fit(&g, &one, 8, Device::Cpu).unwrap_err().to_string().contains("at least 2"));
    }

    #[test]
    fn scores_follow_their_definitions() {
        let a = ArchSpec { isize: 16, nc: 1, nz: 4, ngf: 4, ndf: 4, extralayers: 0, ..Default::default() };
        let (g, x) = crate::net::seeded(3, || {
            (NetG::new(&a, Device::Cpu), Tensor::rand([3, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0)
        });
        let o = outputs(&g, &x, 3);
        let gout = tch::no_grad(|| g.forward(&x, false));
        // Image 1 by hand: latent MSE, mean |x − x̂|, max of the 3×3 box-filtered map.
        let zi = Vec::<f32>::try_from(gout.latent_i.get(1).flatten(0, -1)).unwrap();
        let zo = Vec::<f32>::try_from(gout.latent_o.get(1).flatten(0, -1)).unwrap();
        let want = zi.iter().zip(&zo).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / zi.len() as f32;
        assert!((o.score.double_value(&[1]) - f64::from(want)).abs() < 1e-7);
        let xs = Vec::<f32>::try_from(x.get(1).flatten(0, -1)).unwrap();
        let rs = Vec::<f32>::try_from(gout.fake.get(1).flatten(0, -1)).unwrap();
        let d: Vec<f32> = xs.iter().zip(&rs).map(|(a, b)| (a - b).abs()).collect();
        let mean = d.iter().sum::<f32>() / d.len() as f32;
        assert!((o.score_recon.double_value(&[1]) - f64::from(mean)).abs() < 1e-6);
        // Box filter that ignores padding: the corner pixel averages a 2×2 window.
        let mut best = f32::MIN;
        for y in 0..16i64 {
            for x in 0..16i64 {
                let (mut sum, mut cnt) = (0.0, 0.0);
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (yy, xx) = (y + dy, x + dx);
                        if (0..16).contains(&yy) && (0..16).contains(&xx) {
                            sum += d[(yy * 16 + xx) as usize];
                            cnt += 1.0;
                        }
                    }
                }
                best = best.max(sum / cnt);
            }
        }
        assert!((o.score_map.double_value(&[1]) - f64::from(best)).abs() < 1e-6);
        assert_eq!(o.anomaly_map.size(), vec![3, 1, 16, 16]);
        // Batched scoring gives the same numbers as one batch.
        let s = score_all(&g, &x, 3, 2, Device::Cpu);
        assert_eq!(s.len(), 3);
        assert!((s.map_max[1] - o.score_map.double_value(&[1])).abs() < 1e-6);
    }
}
