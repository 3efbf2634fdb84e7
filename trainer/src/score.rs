//! Eval-mode scoring in libtorch, op for op what the exported ONNX graph computes
//! (`score`, `score_recon`, `score_map`, `score_mahalanobis`, `score_patch`,
//! `score_fused`, `anomaly_map`, `patch_map`), so that figures measured here are the
//! figures the daemon will see.

use ganomaly_core::metadata::{FusionSpec, ScoreKind};
use tch::{Device, Kind, Tensor};

use crate::net::NetG;

/// Per-image scores of one set of images, one vector per kind (same order as input).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores {
    pub latent: Vec<f64>,
    pub recon: Vec<f64>,
    pub map_max: Vec<f64>,
    /// Empty when the generator has no feature statistics.
    pub mahalanobis: Vec<f64>,
    /// Empty when the generator has no patch statistics.
    pub patch: Vec<f64>,
    /// Empty when the generator has no fusion recipe.
    pub fused: Vec<f64>,
}

impl Scores {
    pub fn get(&self, kind: ScoreKind) -> &[f64] {
        match kind {
            ScoreKind::Latent => &self.latent,
            ScoreKind::Recon => &self.recon,
            ScoreKind::MapMax => &self.map_max,
            ScoreKind::Mahalanobis => &self.mahalanobis,
            ScoreKind::Patch => &self.patch,
            ScoreKind::Fused => &self.fused,
        }
    }

    fn get_mut(&mut self, kind: ScoreKind) -> &mut Vec<f64> {
        match kind {
            ScoreKind::Latent => &mut self.latent,
            ScoreKind::Recon => &mut self.recon,
            ScoreKind::MapMax => &mut self.map_max,
            ScoreKind::Mahalanobis => &mut self.mahalanobis,
            ScoreKind::Patch => &mut self.patch,
            ScoreKind::Fused => &mut self.fused,
        }
    }

    /// These scores followed by `other`'s, kind by kind (a kind missing from either is dropped).
    pub fn concat(&self, other: &Scores) -> Scores {
        let mut out = Scores::default();
        for kind in ScoreKind::ALL {
            if self.has(kind) && other.has(kind) {
                *out.get_mut(kind) = self.get(kind).iter().chain(other.get(kind)).copied().collect();
            }
        }
        out
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
    /// `None` without patch statistics.
    pub score_patch: Option<Tensor>,
    pub patch_map: Option<Tensor>,
    /// `None` without a fusion recipe (or without one of its components).
    pub score_fused: Option<Tensor>,
    pub recon: Tensor,
    pub anomaly_map: Tensor,
}

impl Outputs {
    /// The output tensor of `kind`, when computed.
    pub fn get(&self, kind: ScoreKind) -> Option<&Tensor> {
        match kind {
            ScoreKind::Latent => Some(&self.score),
            ScoreKind::Recon => Some(&self.score_recon),
            ScoreKind::MapMax => Some(&self.score_map),
            ScoreKind::Mahalanobis => self.score_mahalanobis.as_ref(),
            ScoreKind::Patch => self.score_patch.as_ref(),
            ScoreKind::Fused => self.score_fused.as_ref(),
        }
    }
}

/// `score_fused` of a batch: the recipe's components standardised in f32 with its
/// values rounded to f32, as the graph does.
fn fused(f: &FusionSpec, o: &Outputs) -> Option<Tensor> {
    let cols: Option<Vec<Tensor>> = f.components.iter().map(|&k| o.get(k).map(|t| t.reshape([-1, 1]))).collect();
    let cat = Tensor::cat(&cols?, 1);
    let dev = cat.device();
    let as_f32 = |v: &[f64]| Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<f32>>()).to_device(dev);
    let z = (cat - as_f32(&f.mean)) / as_f32(&f.std);
    Some(match f.combine {
        ganomaly_core::metadata::Combine::Max => z.amax(&[1i64][..], false),
        ganomaly_core::metadata::Combine::Mean => z.mean_dim(&[1i64][..], false, Kind::Float),
    })
}

/// The `fused` recipe standardised on held-out good images' scores: each default
/// component's mean and standard deviation. `None` when a component is missing or
/// has no spread (a constant score cannot be standardised).
pub fn fit_fusion(hold: &Scores) -> Option<FusionSpec> {
    let comps = FusionSpec::DEFAULT_COMPONENTS;
    let mut mean = Vec::new();
    let mut std = Vec::new();
    for k in comps {
        let v = hold.get(k);
        if v.len() < 2 || v.len() != hold.len() {
            return None;
        }
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let s = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
        if !(s.is_finite() && s > 0.0) {
            return None;
        }
        mean.push(m);
        std.push(s);
    }
    Some(FusionSpec { components: comps.to_vec(), combine: FusionSpec::DEFAULT_COMBINE, mean, std })
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
        let (score_patch, patch_map) = match &g.patch_stats {
            Some(p) => {
                let (s, m) = p.score_and_map(&g.arch, &out.maps);
                (Some(s), Some(m))
            }
            None => (None, None),
        };
        let mut o = Outputs {
            score,
            score_recon,
            score_map,
            score_mahalanobis,
            score_patch,
            patch_map,
            score_fused: None,
            recon: out.fake,
            anomaly_map,
        };
        o.score_fused = g.fusion.as_ref().and_then(|f| fused(f, &o));
        o
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
        for kind in ScoreKind::ALL {
            if let Some(t) = o.get(kind) {
                let v = Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float)).unwrap_or_default();
                s.get_mut(kind).extend(v.into_iter().map(f64::from));
            }
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
