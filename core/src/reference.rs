//! A slow, obviously-correct forward pass of NetG and the exported scores, in
//! plain loops over f64 accumulators. It exists to check the ONNX graph and
//! the trainer against something that shares none of their code paths; never
//! use it on the hot path.

use crate::arch::{ArchSpec, Layer, Op, BN_EPS, FEATURE_MEAN, FEATURE_WHITEN};
use crate::metadata::{FusionSpec, ScoreKind};
use crate::patch::{PatchSpec, PatchStatistic, PATCH_BANK, PATCH_CENTER, PATCH_MEAN, PATCH_SCALE, PATCH_WHITEN};
use crate::weights::{Weights, WeightsError};

/// A dense `[N, C, H, W]` tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Nchw {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl Nchw {
    pub fn zeros(n: usize, c: usize, h: usize, w: usize) -> Nchw {
        Nchw { n, c, h, w, data: vec![0.0; n * c * h * w] }
    }
    #[inline]
    fn at(&self, n: usize, c: usize, y: usize, x: usize) -> f32 {
        self.data[((n * self.c + c) * self.h + y) * self.w + x]
    }
    #[inline]
    fn idx(&self, n: usize, c: usize, y: usize, x: usize) -> usize {
        ((n * self.c + c) * self.h + y) * self.w + x
    }
}

/// Everything the exported graph outputs, per image.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    pub score: Vec<f32>,
    pub score_recon: Vec<f32>,
    pub score_map: Vec<f32>,
    /// `score_mahalanobis`, when the weights carry the feature statistics.
    pub score_mahalanobis: Option<Vec<f32>>,
    /// `score_patch` and `patch_map`, when the weights carry the patch statistics.
    pub score_patch: Option<Vec<f32>>,
    pub patch_map: Option<Nchw>,
    /// `score_fused`, when a recipe is given and its components were computed.
    pub score_fused: Option<Vec<f32>>,
    pub recon: Nchw,
    pub anomaly_map: Nchw,
}

/// Runs NetG on `x` and computes every score exactly as the ONNX graph of
/// `ModelMetadata::uncalibrated` defines them: the default patch configuration
/// (when the weights carry its statistics) and the default fusion recipe.
pub fn forward(arch: &ArchSpec, w: &Weights, x: &Nchw, map_kernel: usize) -> Result<Outputs, WeightsError> {
    let patch = w.tensors.contains_key(PATCH_MEAN).then(|| arch.default_patch());
    forward_spec(arch, w, x, map_kernel, patch.as_ref(), Some(&FusionSpec::uncalibrated()))
}

/// [`forward`] with an explicit patch configuration and fusion recipe.
pub fn forward_spec(
    arch: &ArchSpec,
    w: &Weights,
    x: &Nchw,
    map_kernel: usize,
    patch: Option<&PatchSpec>,
    fusion: Option<&FusionSpec>,
) -> Result<Outputs, WeightsError> {
    let z_i = sequential(&arch.encoder1(), w, x)?;
    let recon = sequential(&arch.decoder(), w, &z_i)?;
    let z_o = sequential(&arch.encoder2(), w, &recon)?;
    let n = x.n;
    let nz = z_i.c;
    let score = (0..n)
        .map(|b| {
            let s: f64 = (0..nz).map(|c| ((z_i.at(b, c, 0, 0) - z_o.at(b, c, 0, 0)) as f64).powi(2)).sum();
            (s / nz as f64) as f32
        })
        .collect();
    let mut map = Nchw::zeros(n, 1, x.h, x.w);
    for b in 0..n {
        for y in 0..x.h {
            for xx in 0..x.w {
                let s: f64 = (0..x.c).map(|c| (x.at(b, c, y, xx) - recon.at(b, c, y, xx)).abs() as f64).sum();
                let i = map.idx(b, 0, y, xx);
                map.data[i] = (s / x.c as f64) as f32;
            }
        }
    }
    let plane = x.h * x.w;
    let score_recon = (0..n)
        .map(|b| (map.data[b * plane..(b + 1) * plane].iter().map(|&v| v as f64).sum::<f64>() / plane as f64) as f32)
        .collect();
    let r = (map_kernel / 2) as isize;
    let score_map = (0..n)
        .map(|b| {
            let mut best = f32::NEG_INFINITY;
            for y in 0..x.h as isize {
                for xx in 0..x.w as isize {
                    let (mut s, mut cnt) = (0.0f64, 0usize);
                    for dy in -r..=r {
                        for dx in -r..=r {
                            let (yy, xq) = (y + dy, xx + dx);
                            if yy >= 0 && xq >= 0 && (yy as usize) < x.h && (xq as usize) < x.w {
                                s += map.at(b, 0, yy as usize, xq as usize) as f64;
                                cnt += 1;
                            }
                        }
                    }
                    best = best.max((s / cnt as f64) as f32);
                }
            }
            best
        })
        .collect();
    let score_mahalanobis = match (w.get(FEATURE_MEAN), w.get(FEATURE_WHITEN)) {
        (Ok(mean), Ok(whiten)) => {
            let enc = arch.encoder1();
            let f = sequential(&enc[..=arch.feature_layer()], w, x)?;
            let p = arch.feature_pool() as usize;
            let (fh, fw) = (f.h / p, f.w / p);
            let d = f.c * fh * fw;
            Some(
                (0..n)
                    .map(|b| {
                        // Average-pool p×p windows, flatten in (c, y, x) order, centre.
                        let mut v = Vec::with_capacity(d);
                        for c in 0..f.c {
                            for y in 0..fh {
                                for xx in 0..fw {
                                    let mut s = 0.0f64;
                                    for dy in 0..p {
                                        for dx in 0..p {
                                            s += f.at(b, c, y * p + dy, xx * p + dx) as f64;
                                        }
                                    }
                                    v.push(s / (p * p) as f64 - mean.data[v.len()] as f64);
                                }
                            }
                        }
                        let s: f64 = (0..d)
                            .map(|j| (0..d).map(|i| v[i] * whiten.data[i * d + j] as f64).sum::<f64>().powi(2))
                            .sum();
                        (s / d as f64) as f32
                    })
                    .collect(),
            )
        }
        _ => None,
    };
    let (score_patch, patch_map) = match patch {
        Some(spec) => {
            let (s, m) = patch_forward(arch, w, x, spec)?;
            (Some(s), Some(m))
        }
        None => (None, None),
    };
    let mut out = Outputs {
        score,
        score_recon,
        score_map,
        score_mahalanobis,
        score_patch,
        patch_map,
        score_fused: None,
        recon,
        anomaly_map: map,
    };
    if let Some(f) = fusion {
        let cols: Option<Vec<&Vec<f32>>> = f
            .components
            .iter()
            .map(|k| match k {
                ScoreKind::Latent => Some(&out.score),
                ScoreKind::Recon => Some(&out.score_recon),
                ScoreKind::MapMax => Some(&out.score_map),
                ScoreKind::Mahalanobis => out.score_mahalanobis.as_ref(),
                ScoreKind::Patch => out.score_patch.as_ref(),
                ScoreKind::Fused => None,
            })
            .collect();
        // The graph standardises in f32 with the recipe's values rounded to f32.
        let r = |v: f64| v as f32 as f64;
        let rounded = FusionSpec {
            mean: f.mean.iter().map(|&m| r(m)).collect(),
            std: f.std.iter().map(|&s| r(s)).collect(),
            ..f.clone()
        };
        out.score_fused = cols.map(|cols| {
            (0..n).map(|b| rounded.fuse(&cols.iter().map(|c| c[b] as f64).collect::<Vec<_>>()) as f32).collect()
        });
    }
    Ok(out)
}

/// Bilinear resampling of one plane `h × w` to `oh × ow`, half-pixel centres, edges
/// clamped (ONNX `Resize` linear/half_pixel, PyTorch `align_corners=False`).
fn bilinear(src: &[f64], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f64> {
    let coord = |o: usize, inn: usize, out: usize| {
        let c = ((o as f64 + 0.5) * inn as f64 / out as f64 - 0.5).max(0.0);
        let i0 = (c.floor() as usize).min(inn - 1);
        let i1 = (i0 + 1).min(inn - 1);
        (i0, i1, c - i0 as f64)
    };
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        let (y0, y1, fy) = coord(y, h, oh);
        for x in 0..ow {
            let (x0, x1, fx) = coord(x, w, ow);
            let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
            let bot = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
            out[y * ow + x] = top * (1.0 - fy) + bot * fy;
        }
    }
    out
}

/// The patch map's value at position `q` from its kept channels' values.
type CellFn<'a> = Box<dyn Fn(usize, &[f64]) -> f64 + 'a>;

/// The `patch` score and its map, in plain loops.
fn patch_forward(arch: &ArchSpec, w: &Weights, x: &Nchw, spec: &PatchSpec) -> Result<(Vec<f32>, Nchw), WeightsError> {
    let enc = arch.encoder1();
    let maps = arch.patch_maps(spec).map_err(|e| WeightsError::Missing(e.to_string()))?;
    // Shapes first: the loops below index the statistics by the spec's sizes.
    w.check(&arch.patch_params(spec))?;
    let g = spec.grid as usize;
    let p = g * g;
    let d = spec.channels.len();
    // Concatenated channels on the grid: planes[b][c] of g×g.
    let mut planes: Vec<Vec<Vec<f64>>> = vec![Vec::new(); x.n];
    for m in &maps {
        let f = sequential(&enc[..=m.layer], w, x)?;
        let side = f.h;
        for (b, pl) in planes.iter_mut().enumerate() {
            for c in 0..f.c {
                let src: Vec<f64> = (0..side * side).map(|i| f.at(b, c, i / side, i % side) as f64).collect();
                let on_grid = if side > g {
                    let k = side / g;
                    (0..p)
                        .map(|q| {
                            let (gy, gx) = (q / g, q % g);
                            let mut s = 0.0;
                            for dy in 0..k {
                                for dx in 0..k {
                                    s += src[(gy * k + dy) * side + gx * k + dx];
                                }
                            }
                            s / (k * k) as f64
                        })
                        .collect()
                } else if side < g {
                    bilinear(&src, side, side, g, g)
                } else {
                    src
                };
                pl.push(on_grid);
            }
        }
    }
    // The map's value at one position from its kept channels' values.
    let cell: CellFn<'_> = match spec.statistic {
        PatchStatistic::Gaussian => {
            let (mean, whiten) = (w.get(PATCH_MEAN)?, w.get(PATCH_WHITEN)?);
            Box::new(move |q, f| {
                let v: Vec<f64> = f.iter().enumerate().map(|(i, &x)| x - mean.data[q * d + i] as f64).collect();
                let wq = &whiten.data[q * d * d..(q + 1) * d * d];
                let s: f64 = (0..d).map(|j| (0..d).map(|i| v[i] * wq[i * d + j] as f64).sum::<f64>().powi(2)).sum();
                s / d as f64
            })
        }
        PatchStatistic::Nearest { bank } => {
            let (center, scale, bank_t) = (w.get(PATCH_CENTER)?, w.get(PATCH_SCALE)?, w.get(PATCH_BANK)?);
            let m = bank as usize;
            Box::new(move |_, f| {
                let z: Vec<f64> =
                    f.iter().enumerate().map(|(i, &x)| (x - center.data[i] as f64) * scale.data[i] as f64).collect();
                let nearest = (0..m)
                    .map(|k| (0..d).map(|i| (z[i] - bank_t.data[i * m + k] as f64).powi(2)).sum::<f64>())
                    .fold(f64::INFINITY, f64::min);
                nearest / d as f64
            })
        }
    };
    let mut scores = Vec::with_capacity(x.n);
    let mut map = Nchw::zeros(x.n, 1, x.h, x.w);
    for (b, pl) in planes.iter().enumerate() {
        let mut grid_map = vec![0.0f64; p];
        for (q, v) in grid_map.iter_mut().enumerate() {
            let f: Vec<f64> = spec.channels.iter().map(|&c| pl[c as usize][q]).collect();
            *v = cell(q, &f);
        }
        scores.push(grid_map.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32);
        let up = bilinear(&grid_map, g, g, x.h, x.w);
        map.data[b * x.h * x.w..(b + 1) * x.h * x.w].iter_mut().zip(up).for_each(|(o, v)| *o = v as f32);
    }
    Ok((scores, map))
}

/// Applies one `nn.Sequential` part.
pub fn sequential(layers: &[Layer], w: &Weights, x: &Nchw) -> Result<Nchw, WeightsError> {
    let mut x = x.clone();
    for layer in layers {
        let p = |name: &str| format!("{}.{name}", layer.name);
        x = match layer.op {
            Op::Conv { cout, k, s, p: pad, .. } => {
                conv(&x, &w.get(&p("weight"))?.data, cout as usize, k as usize, s as usize, pad as usize)
            }
            Op::ConvT { cout, k, s, p: pad, .. } => {
                conv_t(&x, &w.get(&p("weight"))?.data, cout as usize, k as usize, s as usize, pad as usize)
            }
            Op::BatchNorm { .. } => {
                let (g, b, m, v) =
                    (w.get(&p("weight"))?, w.get(&p("bias"))?, w.get(&p("running_mean"))?, w.get(&p("running_var"))?);
                let mut y = x.clone();
                for n in 0..x.n {
                    for c in 0..x.c {
                        let scale = g.data[c] as f64 / (v.data[c] as f64 + BN_EPS as f64).sqrt();
                        for i in 0..x.h * x.w {
                            let j = (n * x.c + c) * x.h * x.w + i;
                            y.data[j] = ((x.data[j] as f64 - m.data[c] as f64) * scale + b.data[c] as f64) as f32;
                        }
                    }
                }
                y
            }
            Op::LeakyRelu { slope } => map(x, |v| if v >= 0.0 { v } else { v * slope }),
            Op::Relu => map(x, |v| v.max(0.0)),
            Op::Tanh => map(x, f32::tanh),
            Op::Sigmoid => map(x, |v| 1.0 / (1.0 + (-v).exp())),
        };
    }
    Ok(x)
}

fn map(mut x: Nchw, f: impl Fn(f32) -> f32) -> Nchw {
    x.data.iter_mut().for_each(|v| *v = f(*v));
    x
}

/// Cross-correlation as PyTorch's Conv2d; weight `[cout, cin, k, k]`, no bias.
fn conv(x: &Nchw, wt: &[f32], cout: usize, k: usize, s: usize, p: usize) -> Nchw {
    let oh = (x.h + 2 * p - k) / s + 1;
    let ow = (x.w + 2 * p - k) / s + 1;
    let mut y = Nchw::zeros(x.n, cout, oh, ow);
    for n in 0..x.n {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0f64;
                    for ci in 0..x.c {
                        for ky in 0..k {
                            let iy = (oy * s + ky) as isize - p as isize;
                            if iy < 0 || iy as usize >= x.h {
                                continue;
                            }
                            for kx in 0..k {
                                let ix = (ox * s + kx) as isize - p as isize;
                                if ix < 0 || ix as usize >= x.w {
                                    continue;
                                }
                                let wv = wt[((co * x.c + ci) * k + ky) * k + kx];
                                acc += wv as f64 * x.at(n, ci, iy as usize, ix as usize) as f64;
                            }
                        }
                    }
                    let i = y.idx(n, co, oy, ox);
                    y.data[i] = acc as f32;
                }
            }
        }
    }
    y
}

/// Transposed convolution as PyTorch's ConvTranspose2d; weight `[cin, cout, k, k]`.
/// Scatter form: each input pixel adds `w · x` to a k×k window of the output.
fn conv_t(x: &Nchw, wt: &[f32], cout: usize, k: usize, s: usize, p: usize) -> Nchw {
    let oh = (x.h - 1) * s + k - 2 * p;
    let ow = (x.w - 1) * s + k - 2 * p;
    let mut acc = vec![0.0f64; x.n * cout * oh * ow];
    for n in 0..x.n {
        for ci in 0..x.c {
            for iy in 0..x.h {
                for ix in 0..x.w {
                    let xv = x.at(n, ci, iy, ix) as f64;
                    for co in 0..cout {
                        for ky in 0..k {
                            let oy = (iy * s + ky) as isize - p as isize;
                            if oy < 0 || oy as usize >= oh {
                                continue;
                            }
                            for kx in 0..k {
                                let ox = (ix * s + kx) as isize - p as isize;
                                if ox < 0 || ox as usize >= ow {
                                    continue;
                                }
                                let wv = wt[((ci * cout + co) * k + ky) * k + kx] as f64;
                                acc[((n * cout + co) * oh + oy as usize) * ow + ox as usize] += wv * xv;
                            }
                        }
                    }
                }
            }
        }
    }
    Nchw { n: x.n, c: cout, h: oh, w: ow, data: acc.into_iter().map(|v| v as f32).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_and_conv_t_hand_examples() {
        // 1×1×3×3 input 1..9, 2×2 kernel of ones, stride 1, no pad → 2×2 sums of windows.
        let x = Nchw { n: 1, c: 1, h: 3, w: 3, data: (1..=9).map(|v| v as f32).collect() };
        let y = conv(&x, &[1.0; 4], 1, 2, 1, 0);
        assert_eq!(y.data, vec![12.0, 16.0, 24.0, 28.0]);
        // Transposed conv of a single 1 with a 2×2 kernel [1,2,3,4], stride 2 → the kernel itself.
        let x = Nchw { n: 1, c: 1, h: 1, w: 1, data: vec![1.0] };
        let y = conv_t(&x, &[1.0, 2.0, 3.0, 4.0], 1, 2, 2, 0);
        assert_eq!((y.h, y.w), (2, 2));
        assert_eq!(y.data, vec![1.0, 2.0, 3.0, 4.0]);
        // Stride 2, 2×2 input, k 2 → windows tile without overlap.
        let x = Nchw { n: 1, c: 1, h: 2, w: 2, data: vec![1.0, 10.0, 100.0, 1000.0] };
        let y = conv_t(&x, &[1.0; 4], 1, 2, 2, 0);
        assert_eq!(y.data[0..4], [1.0, 1.0, 10.0, 10.0]);
        assert_eq!(y.data[12..16], [100.0, 100.0, 1000.0, 1000.0]);
    }

    #[test]
    fn netg_shapes_and_score_ranges() {
        let arch = ArchSpec { isize: 32, nc: 3, nz: 8, ngf: 4, ndf: 4, extralayers: 0, ..Default::default() };
        let w = Weights::random_generator(&arch, 1);
        let x = Nchw {
            n: 2,
            c: 3,
            h: 32,
            w: 32,
            data: (0..2 * 3 * 32 * 32).map(|i| ((i % 17) as f32 / 8.0) - 1.0).collect(),
        };
        let o = forward(&arch, &w, &x, 5).unwrap();
        assert_eq!((o.recon.n, o.recon.c, o.recon.h, o.recon.w), (2, 3, 32, 32));
        assert!(o.recon.data.iter().all(|v| v.abs() <= 1.0));
        assert_eq!(o.score.len(), 2);
        assert!(o.score.iter().all(|&s| s > 0.0));
        // The max of a smoothed map never exceeds the max of the map; the mean never exceeds it either.
        for b in 0..2 {
            let mx = o.anomaly_map.data[b * 1024..(b + 1) * 1024].iter().cloned().fold(f32::MIN, f32::max);
            assert!(o.score_map[b] <= mx + 1e-6 && o.score_recon[b] <= o.score_map[b] + 1e-6);
        }
    }

    #[test]
    fn mahalanobis_by_hand_and_only_with_feature_statistics() {
        // isize 16, ngf 4: encoder1 is conv(1→4) 8×8, lrelu, conv(4→8) 4×4, bn, lrelu,
        // conv(8→nz). Feature vector: the 4×4×8 map, D = 128 (no pooling).
        let arch = ArchSpec { isize: 16, nc: 1, nz: 2, ngf: 4, ndf: 4, extralayers: 0, ..Default::default() };
        assert_eq!((arch.feature_pool(), arch.feature_dim()), (1, 128));
        let mut w = Weights::random_generator(&arch, 2);
        let x = Nchw { n: 1, c: 1, h: 16, w: 16, data: (0..256).map(|i| ((i % 7) as f32 / 3.0) - 1.0).collect() };
        let f = sequential(&arch.encoder1()[..5], &w, &x).unwrap();
        assert_eq!((f.c, f.h, f.w), (8, 4, 4));
        // μ = 0.5 everywhere; W = 2·I except W[0][1] = 1 (row-major, applied as (f − μ)ᵀW):
        // column 0 is 2·v0, column 1 is v0 + 2·v1, the rest 2·vj.
        let d = 128;
        let mut whiten = vec![0.0f32; d * d];
        (0..d).for_each(|i| whiten[i * d + i] = 2.0);
        whiten[1] = 1.0;
        w.insert(FEATURE_MEAN, vec![d], vec![0.5; d]);
        w.insert(FEATURE_WHITEN, vec![d, d], whiten);
        let v: Vec<f64> = f.data.iter().map(|&a| a as f64 - 0.5).collect();
        let want = (v.iter().map(|a| (2.0 * a).powi(2)).sum::<f64>() - (2.0 * v[1]).powi(2)
            + (v[0] + 2.0 * v[1]).powi(2))
            / d as f64;
        let got = forward(&arch, &w, &x, 3).unwrap().score_mahalanobis.unwrap()[0] as f64;
        assert!((got - want).abs() < 1e-5 * want.max(1.0), "{got} vs {want}");
        w.tensors.remove(FEATURE_WHITEN);
        assert!(forward(&arch, &w, &x, 3).unwrap().score_mahalanobis.is_none());
        // With pooling (C = 256 > 64): 2×2 windows, D = 1024; checked against ONNX
        // Runtime in tests/onnx_parity.rs.
        let big = ArchSpec { isize: 32, ngf: 64, ..Default::default() };
        assert_eq!((big.feature_pool(), big.feature_dim()), (2, 1024));
    }
}
