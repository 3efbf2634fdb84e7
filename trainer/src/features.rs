//! The `mahalanobis` score's statistics: mean and whitening matrix of the training
//! images' feature vectors, fitted after training and carried in the model file as
//! two tensors beside NetG's (`score.feature_mean`, `score.feature_whiten`); and
//! the `patch` score's statistics ([`PatchStats`]: one Gaussian per grid position
//! over encoder1's maps, `score.patch_mean`, `score.patch_whiten`; or a memory bank
//! of training positions, `score.patch_center`, `score.patch_scale`,
//! `score.patch_bank`).

use ganomaly_core::arch::{ArchSpec, FEATURE_MEAN, FEATURE_WHITEN};
use ganomaly_core::patch::{
    PatchSpec, PatchStatistic, PATCH_BANK, PATCH_CENTER, PATCH_MEAN, PATCH_SCALE, PATCH_WHITEN,
};
use ganomaly_core::weights::{Weights, WeightsError};
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, TchError, Tensor};

/// Why feature statistics could not be fitted.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{0} training image(s): the feature covariance needs at least 2")]
    TooFew(i64),
    #[error(
        "the feature covariance of {n} images is not positive definite ({source}); are the training images all alike?"
    )]
    NotPositiveDefinite { n: i64, source: TchError },
    #[error("non-finite whitening matrix from {0} images")]
    NonFinite(i64),
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

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
    /// Fits the statistics on the feature vectors of the training images, given in
    /// batches (`[b, D]` each, on any device; `NetG::fit_feature_stats` computes them).
    pub fn fit(batches: &[Tensor]) -> Result<FeatureStats, StatsError> {
        let n: i64 = batches.iter().map(|b| b.size()[0]).sum();
        if n < 2 {
            return Err(StatsError::TooFew(n));
        }
        let parts: Vec<Tensor> = batches.iter().map(|b| b.to_device(Device::Cpu).to_kind(Kind::Double)).collect();
        let f = Tensor::cat(&parts, 0);
        let mean = f.mean_dim(&[0i64][..], false, Kind::Double);
        let (cov, shrinkage) = ledoit_wolf(&(&f - &mean));
        // Σ⁻¹ = L Lᵀ (Cholesky), so ‖(f − μ)ᵀL‖² is the squared Mahalanobis distance.
        let precision = Tensor::f_linalg_inv(&cov)?;
        let precision = (&precision + precision.transpose(0, 1)) * 0.5;
        let whiten =
            precision.f_linalg_cholesky(false).map_err(|source| StatsError::NotPositiveDefinite { n, source })?;
        let stats = FeatureStats { mean: mean.to_kind(Kind::Float), whiten: whiten.to_kind(Kind::Float), shrinkage };
        if !bool::try_from(stats.whiten.isfinite().all())? {
            return Err(StatsError::NonFinite(n));
        }
        Ok(stats)
    }

    /// Adds `score.feature_mean` and `score.feature_whiten` to `w`.
    pub fn insert_into(&self, w: &mut Weights) -> Result<(), TchError> {
        for (name, t) in [(FEATURE_MEAN, &self.mean), (FEATURE_WHITEN, &self.whiten)] {
            let shape = t.size().iter().map(|&d| d as usize).collect();
            w.insert(name, shape, Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))?);
        }
        Ok(())
    }

    /// The statistics `w` carries, checked against `arch`; `None` when it has none.
    pub fn from_weights(arch: &ArchSpec, w: &Weights, device: Device) -> Result<Option<FeatureStats>, WeightsError> {
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

/// The `patch` score's statistics of the training images' feature vectors
/// ([`PatchStats::grid_features`]), by the spec's statistic.
#[derive(Debug)]
pub struct PatchStats {
    /// The configuration fitted: a nearest-neighbour bank may hold fewer entries
    /// than asked for (as many as there are training positions).
    pub spec: PatchSpec,
    pub model: PatchModel,
    /// Mean Ledoit–Wolf intensity over the positions (NaN when read from a file or
    /// for the nearest-neighbour statistic).
    pub shrinkage: f64,
}

/// The tensors of a [`PatchStatistic`].
#[derive(Debug)]
pub enum PatchModel {
    /// Per position p, mean μₚ `[P, 1, d]` and whitening matrix Wₚ `[P, d, d]`
    /// (WₚWₚᵀ = Σₚ⁻¹, Ledoit–Wolf shrunk).
    Gaussian { mean: Tensor, whiten: Tensor },
    /// Per-channel centre and scale `[d]` (mean and 1/std over every training
    /// position), and the bank `[d, M]` of standardised training vectors.
    Nearest { center: Tensor, scale: Tensor, bank: Tensor },
}

impl Clone for PatchStats {
    fn clone(&self) -> Self {
        let model = match &self.model {
            PatchModel::Gaussian { mean, whiten } => PatchModel::Gaussian { mean: mean.copy(), whiten: whiten.copy() },
            PatchModel::Nearest { center, scale, bank } => {
                PatchModel::Nearest { center: center.copy(), scale: scale.copy(), bank: bank.copy() }
            }
        };
        PatchStats { spec: self.spec.clone(), model, shrinkage: self.shrinkage }
    }
}

/// Training positions the nearest-neighbour bank is chosen from (a seeded random
/// sample beyond this: MNIST's 7,000 images × 256 positions would make the greedy
/// selection 35× slower for a bank of the same size).
pub const BANK_POOL: i64 = 50_000;
/// Dimensions of the seeded random projection the coreset's distances are taken
/// in (PatchCore's trick: the selection, not the bank, is projected).
const BANK_PROJECTION: i64 = 32;
/// Distances held at once when scoring against the bank (16 M f32 = 64 MiB).
const SEARCH_CHUNK: i64 = 1 << 24;

impl PatchStats {
    /// The feature vectors per grid position `[N, d, G, G]` from encoder1's maps by
    /// depth (`maps[i]` = depth i + 1), as the graph computes them: each selected map
    /// average-pooled or bilinearly upsampled (half-pixel) to G×G, concatenated, the
    /// kept channels gathered.
    pub fn grid_features(spec: &PatchSpec, maps: &[Tensor]) -> Tensor {
        let g = i64::from(spec.grid);
        let parts: Vec<Tensor> = spec
            .maps
            .iter()
            .map(|&depth| {
                let m = &maps[depth as usize - 1];
                let side = m.size()[2];
                if side > g {
                    let k = side / g;
                    m.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>)
                } else if side < g {
                    m.upsample_bilinear2d([g, g], false, None::<f64>, None::<f64>)
                } else {
                    m.shallow_clone()
                }
            })
            .collect();
        let cat = if parts.len() == 1 { parts[0].shallow_clone() } else { Tensor::cat(&parts, 1) };
        let idx: Vec<i64> = spec.channels.iter().map(|&c| i64::from(c)).collect();
        cat.index_select(1, &Tensor::from_slice(&idx).to_device(cat.device()))
    }

    /// Fits the spec's statistic on feature vectors given in batches (`[b, d, G, G]`
    /// each, from [`PatchStats::grid_features`]).
    pub fn fit(spec: &PatchSpec, batches: &[Tensor]) -> Result<PatchStats, StatsError> {
        let n: i64 = batches.iter().map(|b| b.size()[0]).sum();
        if n < 2 {
            return Err(StatsError::TooFew(n));
        }
        if let PatchStatistic::Nearest { bank } = spec.statistic {
            return Self::fit_nearest(spec, batches, bank);
        }
        // f32 until one position is taken: MNIST's 7,000 images on a 16×16 grid of 64
        // channels are 0.5 GB as f32, twice that as f64.
        let parts: Vec<Tensor> = batches.iter().map(|b| b.to_device(Device::Cpu).to_kind(Kind::Float)).collect();
        let f = Tensor::cat(&parts, 0); // [n, d, G, G]
        let (d, g) = (f.size()[1], f.size()[2]);
        let f = f.flatten(2, 3); // [n, d, P]
        let p = g * g;
        let (mut means, mut whitens, mut shrink) = (Vec::new(), Vec::new(), 0.0);
        for q in 0..p {
            let x = f.select(2, q).to_kind(Kind::Double);
            let mean = x.mean_dim(&[0i64][..], true, Kind::Double);
            let (cov, s) = ledoit_wolf(&(&x - &mean));
            let precision = Tensor::f_linalg_inv(&cov)?;
            let precision = (&precision + precision.transpose(0, 1)) * 0.5;
            let whiten =
                precision.f_linalg_cholesky(false).map_err(|source| StatsError::NotPositiveDefinite { n, source })?;
            means.push(mean);
            whitens.push(whiten);
            shrink += s;
        }
        let whiten = Tensor::stack(&whitens, 0).to_kind(Kind::Float);
        if !bool::try_from(whiten.isfinite().all())? {
            return Err(StatsError::NonFinite(n));
        }
        Ok(PatchStats {
            spec: spec.clone(),
            model: PatchModel::Gaussian {
                mean: Tensor::stack(&means, 0).to_kind(Kind::Float).reshape([p, 1, d]),
                whiten,
            },
            shrinkage: shrink / p as f64,
        })
    }

    /// The nearest-neighbour statistic: every training position's vector,
    /// standardised per channel; a seeded sample of at most [`BANK_POOL`] of them;
    /// of those, `bank` chosen greedily, each the farthest from those already
    /// chosen (k-centre coreset, in a seeded random projection), so that rare kinds
    /// of patch are kept where a random sample would keep the common ones twice.
    fn fit_nearest(spec: &PatchSpec, batches: &[Tensor], bank: u32) -> Result<PatchStats, StatsError> {
        let n: i64 = batches.iter().map(|b| b.size()[0]).sum();
        let rows: Vec<Tensor> = batches
            .iter()
            .map(|b| {
                let (m, d) = (b.size()[0], b.size()[1]);
                b.to_device(Device::Cpu).to_kind(Kind::Float).reshape([m, d, -1]).permute([0, 2, 1]).reshape([-1, d])
            })
            .collect();
        let x = Tensor::cat(&rows, 0); // [n·P, d]
        drop(rows);
        let d = x.size()[1];
        let center = x.mean_dim(&[0i64][..], false, Kind::Float);
        let std = x.std_dim(&[0i64][..], false, false);
        // A channel that barely varies on the training images would otherwise get a
        // huge scale and decide every distance (the Gaussian has its shrinkage for
        // this): no channel's spread counts below 1 % of the mean spread.
        let floor = std.mean(Kind::Float) * 0.01 + 1e-6;
        let scale = std.maximum(&floor).reciprocal();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed ^ 0x6b6e_6e00);
        let total = x.size()[0];
        // Sampled before standardising: MNIST's 1.6 M positions need not be copied again.
        let pool = if total > BANK_POOL {
            let picks = rand::seq::index::sample(&mut rng, total as usize, BANK_POOL as usize);
            let mut idx: Vec<i64> = picks.into_iter().map(|i| i as i64).collect();
            idx.sort_unstable();
            x.index_select(0, &Tensor::from_slice(&idx))
        } else {
            x
        };
        let pool = (pool - &center) * &scale;
        let m = i64::from(bank).min(pool.size()[0]);
        let y = if d > BANK_PROJECTION {
            let proj: Vec<f32> = (0..d * BANK_PROJECTION).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            pool.matmul(&Tensor::from_slice(&proj).reshape([d, BANK_PROJECTION]))
        } else {
            pool.shallow_clone()
        };
        let first = rng.random_range(0..pool.size()[0]);
        let mut chosen = vec![first];
        let mut nearest = (&y - y.get(first)).square().sum_dim_intlist(&[1i64][..], false, Kind::Float);
        while (chosen.len() as i64) < m {
            let i = nearest.argmax(0, false).int64_value(&[]);
            chosen.push(i);
            let di = (&y - y.get(i)).square().sum_dim_intlist(&[1i64][..], false, Kind::Float);
            nearest = nearest.minimum(&di);
        }
        let bank_t = pool.index_select(0, &Tensor::from_slice(&chosen)).transpose(0, 1).contiguous();
        if !bool::try_from(bank_t.isfinite().all())? || !bool::try_from(scale.isfinite().all())? {
            return Err(StatsError::NonFinite(n));
        }
        let mut spec = spec.clone();
        spec.statistic = PatchStatistic::Nearest { bank: m as u32 };
        Ok(PatchStats { spec, model: PatchModel::Nearest { center, scale, bank: bank_t }, shrinkage: f64::NAN })
    }

    /// The G×G feature anomaly map `[N, 1, G, G]` of feature vectors `[N, d, G, G]`,
    /// as the graph computes it: Gaussian, per position the mean over d of
    /// ((fₚ − μₚ)ᵀWₚ)²; nearest, the squared distance of the standardised vector to
    /// the nearest bank entry, over d.
    pub fn grid_map(&self, f: &Tensor) -> Tensor {
        self.grid_map_in(f, SEARCH_CHUNK)
    }

    /// [`grid_map`](Self::grid_map), the bank's distances `chunk` at a time.
    fn grid_map_in(&self, f: &Tensor, chunk: i64) -> Tensor {
        let (n, d, g) = (f.size()[0], f.size()[1], f.size()[2]);
        let dev = f.device();
        match &self.model {
            PatchModel::Gaussian { mean, whiten } => {
                let pnd = f.reshape([n, d, g * g]).permute([2, 0, 1]);
                let white = (pnd - mean.to_device(dev)).matmul(&whiten.to_device(dev));
                let dist = white.square().mean_dim(&[2i64][..], false, Kind::Float); // [P, N]
                dist.transpose(0, 1).reshape([n, 1, g, g])
            }
            PatchModel::Nearest { center, scale, bank } => {
                let bank = bank.to_device(dev);
                let (center, scale) = (center.to_device(dev), scale.to_device(dev));
                // ‖b‖² per entry, [1, M]. The distances in chunks of images: the [n, P, M]
                // tensor of a 256-image batch would be 512 MiB at a 16×16 grid and 2,048
                // entries.
                let bb = bank.square().sum_dim_intlist(&[0i64][..], true, Kind::Float);
                let per = (chunk / (g * g * bank.size()[1]).max(1)).max(1);
                let parts: Vec<Tensor> = (0..n)
                    .step_by(per as usize)
                    .map(|s| {
                        let len = per.min(n - s);
                        let fc = f.narrow(0, s, len).reshape([len, d, g * g]).permute([0, 2, 1]);
                        let z = (fc - &center) * &scale;
                        let zz = z.square().sum_dim_intlist(&[2i64][..], true, Kind::Float); // [n, P, 1]
                        let d2 = zz - z.matmul(&bank) * 2.0 + &bb; // [n, P, M]
                        d2.amin(&[2i64][..], false).clamp_min(0.0) / d as f64
                    })
                    .collect();
                Tensor::cat(&parts, 0).reshape([n, 1, g, g])
            }
        }
    }

    /// `score_patch` `[N]` and `patch_map` `[N, 1, S, S]` from the maps by depth.
    pub fn score_and_map(&self, arch: &ArchSpec, maps: &[Tensor]) -> (Tensor, Tensor) {
        let grid = self.grid_map(&Self::grid_features(&self.spec, maps));
        let s = i64::from(arch.isize);
        let score = grid.amax(&[1i64, 2, 3][..], false);
        let map = grid.upsample_bilinear2d([s, s], false, None::<f64>, None::<f64>);
        (score, map)
    }

    /// Adds the statistic's tensors to `w` (`score.patch_mean`, `score.patch_whiten`;
    /// or `score.patch_center`, `score.patch_scale`, `score.patch_bank`).
    pub fn insert_into(&self, w: &mut Weights) -> Result<(), TchError> {
        let tensors: Vec<(&str, &Tensor)> = match &self.model {
            PatchModel::Gaussian { mean, whiten } => vec![(PATCH_MEAN, mean), (PATCH_WHITEN, whiten)],
            PatchModel::Nearest { center, scale, bank } => {
                vec![(PATCH_CENTER, center), (PATCH_SCALE, scale), (PATCH_BANK, bank)]
            }
        };
        for (name, t) in tensors {
            let shape = t.size().iter().map(|&d| d as usize).collect();
            w.insert(name, shape, Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))?);
        }
        Ok(())
    }

    /// The statistics `w` carries for `spec`, checked against `arch`.
    pub fn from_weights(
        arch: &ArchSpec,
        spec: &PatchSpec,
        w: &Weights,
        device: Device,
    ) -> Result<PatchStats, WeightsError> {
        w.check(&arch.patch_params(spec))?;
        let t = |name: &str| -> Result<Tensor, WeightsError> {
            let v = w.get(name)?;
            let shape: Vec<i64> = v.shape.iter().map(|&d| d as i64).collect();
            Ok(Tensor::from_slice(&v.data).reshape(&shape).to_device(device))
        };
        let model = match spec.statistic {
            PatchStatistic::Gaussian => PatchModel::Gaussian { mean: t(PATCH_MEAN)?, whiten: t(PATCH_WHITEN)? },
            PatchStatistic::Nearest { .. } => {
                PatchModel::Nearest { center: t(PATCH_CENTER)?, scale: t(PATCH_SCALE)?, bank: t(PATCH_BANK)? }
            }
        };
        Ok(PatchStats { spec: spec.clone(), model, shrinkage: f64::NAN })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::NetG;

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
        let stats = g.fit_feature_stats(&x, 64, Device::Cpu).unwrap();
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
        assert!(g.fit_feature_stats(&one, 8, Device::Cpu).unwrap_err().to_string().contains("at least 2"));
    }

    #[test]
    fn the_nearest_bank_is_a_coreset_of_standardised_training_positions() {
        use ganomaly_core::patch::PatchStatistic;
        let a = ArchSpec { isize: 16, nc: 1, nz: 4, ngf: 2, ndf: 2, extralayers: 0, ..Default::default() };
        let mut spec = a.patch_spec(&[1], 64, 0).unwrap(); // 8×8 grid, 2 channels
        spec.statistic = PatchStatistic::Nearest { bank: 16 };
        // Two clusters of training positions, one of them rare (1 in 64 positions):
        // a greedy k-centre bank keeps the rare one, which a small random sample would miss.
        let f = Tensor::randn([40, 2, 8, 8], (Kind::Float, Device::Cpu)) * 0.1;
        let _ = f.narrow(2, 0, 1).narrow(3, 0, 1).fill_(5.0);
        let stats = PatchStats::fit(&spec, &[f.narrow(0, 0, 20), f.narrow(0, 20, 20)]).unwrap();
        assert_eq!(stats.spec.statistic, PatchStatistic::Nearest { bank: 16 });
        let PatchModel::Nearest { center, scale, bank } = &stats.model else { panic!("{:?}", stats.model) };
        assert_eq!((center.size(), scale.size(), bank.size()), (vec![2], vec![2], vec![2, 16]));
        let rare = (Tensor::from_slice(&[5.0f32, 5.0]) - center) * scale;
        let to_rare = (bank - rare.reshape([2, 1])).square().sum_dim_intlist(&[0i64][..], false, Kind::Float);
        assert!(to_rare.min().double_value(&[]) < 0.5, "the rare cluster is in the bank");
        // Training images score low, a position unlike any of them high; the map is ≥ 0.
        let train = stats.grid_map(&f);
        let odd = f.narrow(0, 0, 1).copy();
        let _ = odd.narrow(2, 4, 1).narrow(3, 4, 1).fill_(-3.0);
        let odd_map = stats.grid_map(&odd);
        // Scored a few images at a time (the bound on the distance tensor), the same map.
        assert!(stats.grid_map_in(&f, 3 * 64 * 16).allclose(&train, 1e-6, 1e-6, false));
        assert!(train.min().double_value(&[]) >= 0.0);
        assert!(odd_map.max().double_value(&[]) > 10.0 * train.max().double_value(&[]), "{odd_map}");
        // Round trip through the model file's tensors, with the spec the fit recorded.
        let mut w = Weights::default();
        stats.insert_into(&mut w).unwrap();
        w.check(&a.patch_params(&stats.spec)).unwrap();
        let back = PatchStats::from_weights(&a, &stats.spec, &w, Device::Cpu).unwrap();
        assert!(back.grid_map(&odd).allclose(&odd_map, 1e-6, 1e-6, false));
        // Fewer training positions than bank entries: the bank holds them all, and says so.
        spec.statistic = PatchStatistic::Nearest { bank: 1000 };
        let small = PatchStats::fit(&spec, &[f.narrow(0, 0, 4)]).unwrap();
        assert_eq!(small.spec.statistic, PatchStatistic::Nearest { bank: 256 });
        assert!(small.grid_map(&f.narrow(0, 0, 4)).max().double_value(&[]) < 1e-4, "each is its own nearest");
    }
}
