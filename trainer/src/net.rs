//! NetG and NetD in libtorch, built from `ganomaly_core::arch`'s layer lists so that
//! parameter names and shapes cannot disagree with the ONNX writer; DCGAN init;
//! the hand-off to and from `ganomaly_core::Weights`.

use std::collections::HashMap;

use ganomaly_core::arch::{ArchSpec, Layer, Op, BN_EPS};
use ganomaly_core::weights::{Weights, WeightsError};
use tch::{nn, Device, Kind, Tensor};

use crate::features::{FeatureStats, PatchStats, StatsError};
use ganomaly_core::metadata::{FusionSpec, ModelMetadata};
use ganomaly_core::patch::PatchSpec;

/// PyTorch's BatchNorm momentum default, which the reference keeps.
pub const BN_MOMENTUM: f64 = 0.1;

/// libtorch's default generator is process-wide: seeding it and drawing from it
/// must not interleave with another thread's draws (test threads, for one), or a
/// seeded run stops being reproducible.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Seeds libtorch's generator and runs `f` with nobody else drawing meanwhile.
pub fn seeded<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let _guard = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    f()
}

/// Errors moving weights between tch and `Weights`.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("feature statistics (mahalanobis score): {0}")]
    Stats(#[from] StatsError),
}

/// One module of a sequential part; tensors are shared with the owning VarStore.
enum Module {
    Conv {
        w: Tensor,
        s: i64,
        p: i64,
    },
    ConvT {
        w: Tensor,
        s: i64,
        p: i64,
    },
    Bn {
        w: Tensor,
        b: Tensor,
        mean: Tensor,
        var: Tensor,
    },
    /// LeakyReLU by libtorch's own kernel ([`crate::ops::leaky_relu`]: tch's
    /// binding has no slope argument).
    LeakyRelu {
        slope: f64,
    },
    Relu,
    Tanh,
    Sigmoid,
}

/// A sequential part (`encoder1`, `decoder`, `encoder2`, `netd`) in layer order.
pub struct Seq {
    modules: Vec<Module>,
}

impl Seq {
    /// Creates the variables of `layers` under `root` (names `{part}.{i}.{param}`).
    fn new(root: &nn::Path, layers: &[Layer]) -> Seq {
        let modules = layers
            .iter()
            .map(|layer| {
                let mut path = root.clone();
                for part in layer.name.split('.') {
                    path = path.sub(part);
                }
                let dims = |shape: Vec<usize>| shape.iter().map(|&d| d as i64).collect::<Vec<_>>();
                let weight_dims = || dims(layer.op.params().remove(0).1);
                match layer.op {
                    Op::Conv { s, p, .. } => Module::Conv {
                        w: path.var("weight", &weight_dims(), nn::Init::Const(0.0)),
                        s: s.into(),
                        p: p.into(),
                    },
                    Op::ConvT { s, p, .. } => Module::ConvT {
                        w: path.var("weight", &weight_dims(), nn::Init::Const(0.0)),
                        s: s.into(),
                        p: p.into(),
                    },
                    Op::BatchNorm { c } => {
                        let c = i64::from(c);
                        Module::Bn {
                            w: path.var("weight", &[c], nn::Init::Const(1.0)),
                            b: path.var("bias", &[c], nn::Init::Const(0.0)),
                            mean: path.zeros_no_train("running_mean", &[c]),
                            var: path.ones_no_train("running_var", &[c]),
                        }
                    }
                    Op::LeakyRelu { slope } => Module::LeakyRelu { slope: f64::from(slope) },
                    Op::Relu => Module::Relu,
                    Op::Tanh => Module::Tanh,
                    Op::Sigmoid => Module::Sigmoid,
                }
            })
            .collect();
        Seq { modules }
    }

    /// Runs modules `range` (all of them for `..`). `train` selects batch statistics.
    fn forward(&self, x: &Tensor, train: bool, range: std::ops::Range<usize>) -> Tensor {
        let mut x = x.shallow_clone();
        for m in &self.modules[range] {
            x = match m {
                Module::Conv { w, s, p } => x.conv2d(w, None::<&Tensor>, [*s, *s], [*p, *p], [1, 1], 1),
                Module::ConvT { w, s, p } => {
                    x.conv_transpose2d(w, None::<&Tensor>, [*s, *s], [*p, *p], [0, 0], 1, [1, 1])
                }
                Module::Bn { w, b, mean, var } => {
                    x.batch_norm(Some(w), Some(b), Some(mean), Some(var), train, BN_MOMENTUM, f64::from(BN_EPS), true)
                }
                Module::LeakyRelu { slope } => crate::ops::leaky_relu(&x, *slope),
                Module::Relu => x.relu(),
                Module::Tanh => x.tanh(),
                Module::Sigmoid => x.sigmoid(),
            };
        }
        x
    }

    fn len(&self) -> usize {
        self.modules.len()
    }

    /// DCGAN init of the reference `weights_init`: conv and transposed-conv weights
    /// N(0, 0.02), BatchNorm weight N(1, 0.02) and bias 0. Running statistics are
    /// left alone, as `module.apply(weights_init)` leaves them.
    fn init(&mut self) {
        tch::no_grad(|| {
            for m in &mut self.modules {
                match m {
                    Module::Conv { w, .. } | Module::ConvT { w, .. } => {
                        let _ = w.normal_(0.0, 0.02);
                    }
                    Module::Bn { w, b, .. } => {
                        let _ = w.normal_(1.0, 0.02);
                        let _ = b.zero_();
                    }
                    _ => {}
                }
            }
        });
    }
}

/// The generator: encoder1 → decoder → encoder2.
pub struct NetG {
    pub vs: nn::VarStore,
    pub arch: ArchSpec,
    enc1: Seq,
    dec: Seq,
    enc2: Seq,
    /// Statistics of the training images' feature vectors for the `mahalanobis` score,
    /// once fitted ([`NetG::fit_feature_stats`]); outside the VarStore, so neither the
    /// optimiser nor the weight average touches them.
    pub feature_stats: Option<FeatureStats>,
    /// The `patch` score's configuration ([`NetG::fit_score_stats`] fits it).
    pub patch_spec: PatchSpec,
    /// The `patch` score's per-position statistics, once fitted.
    pub patch_stats: Option<PatchStats>,
    /// The `fused` score's recipe, once standardised on held-out good images.
    pub fusion: Option<FusionSpec>,
}

/// What NetG computes for a batch.
pub struct GOut {
    /// Reconstruction x̂, `[N, C, S, S]` in [-1, 1].
    pub fake: Tensor,
    /// z_i = E1(x), `[N, nz, 1, 1]`.
    pub latent_i: Tensor,
    /// z_o = E2(x̂), `[N, nz, 1, 1]`.
    pub latent_o: Tensor,
    /// encoder1's last activation, `[N, C, 4, 4]`: the `mahalanobis` score's input.
    pub feature_map: Tensor,
    /// encoder1's maps by depth (`ArchSpec::encoder1_maps`), the last being
    /// `feature_map`: the `patch` score's inputs.
    pub maps: Vec<Tensor>,
}

impl NetG {
    /// A freshly initialised generator (DCGAN init from torch's global generator).
    pub fn new(arch: &ArchSpec, device: Device) -> NetG {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut g = NetG {
            arch: *arch,
            enc1: Seq::new(&root, &arch.encoder1()),
            dec: Seq::new(&root, &arch.decoder()),
            enc2: Seq::new(&root, &arch.encoder2()),
            vs,
            feature_stats: None,
            patch_spec: arch.default_patch(),
            patch_stats: None,
            fusion: None,
        };
        // Module order of the reference: encoder1, decoder, encoder2.
        g.enc1.init();
        g.dec.init();
        g.enc2.init();
        g
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> GOut {
        // encoder1 in ranges ending at each map, so the `mahalanobis` and `patch`
        // scores read them without running the encoder a second time.
        let maps = self.encoder_maps(x, train);
        let split = self.arch.feature_layer() + 1;
        let feature_map = maps.last().map_or_else(|| self.enc1.forward(x, train, 0..split), |m| m.shallow_clone());
        let latent_i = self.enc1.forward(&feature_map, train, split..self.enc1.len());
        let fake = self.dec.forward(&latent_i, train, 0..self.dec.len());
        let latent_o = self.enc2.forward(&fake, train, 0..self.enc2.len());
        GOut { fake, latent_i, latent_o, feature_map, maps }
    }

    /// encoder1's maps by depth (the last is the `mahalanobis` feature map).
    fn encoder_maps(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut out = Vec::new();
        let (mut at, mut h) = (0, x.shallow_clone());
        for m in self.arch.encoder1_maps() {
            h = self.enc1.forward(&h, train, at..m.layer + 1);
            at = m.layer + 1;
            out.push(h.shallow_clone());
        }
        out
    }

    /// Trainable parameters in `arch.generator_params()` order (running stats excluded).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        trainable_in_order(&self.vs, self.arch.generator_params().into_iter().map(|p| p.name))
    }

    /// Every NetG tensor (incl. running statistics) as plain f32 weights on the CPU.
    pub fn to_weights(&self) -> Result<Weights, NetError> {
        let vars = self.vs.variables();
        let mut w = Weights::default();
        for spec in self.arch.generator_params() {
            let t = vars.get(&spec.name).ok_or_else(|| WeightsError::Missing(spec.name.clone()))?;
            let data = Vec::<f32>::try_from(t.detach().to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))?;
            w.insert(spec.name, spec.shape, data);
        }
        if let Some(stats) = &self.feature_stats {
            stats.insert_into(&mut w)?;
        }
        if let Some(stats) = &self.patch_stats {
            stats.insert_into(&mut w)?;
        }
        Ok(w)
    }

    /// The `mahalanobis` score's feature vectors in eval mode, `[N, D]`: encoder1's
    /// last 4×4×C activation, average-pooled by `arch.feature_pool()`, flattened.
    pub fn features(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.pool_features(&self.enc1.forward(x, false, 0..self.arch.feature_layer() + 1)))
    }

    /// [`GOut::feature_map`] → the `mahalanobis` feature vectors `[N, D]`.
    pub fn pool_features(&self, feature_map: &Tensor) -> Tensor {
        let p = i64::from(self.arch.feature_pool());
        let f = if p > 1 {
            feature_map.avg_pool2d([p, p], [p, p], [0, 0], false, true, None::<i64>)
        } else {
            feature_map.shallow_clone()
        };
        f.flatten(1, -1)
    }

    /// A NetG with this one's architecture and a copy of its tensors (running
    /// statistics included) and feature statistics. The copy is built as a fresh
    /// NetG first, so it draws from libtorch's generator as [`NetG::new`] does.
    pub fn duplicate(&self) -> NetG {
        let mut c = NetG::new(&self.arch, self.vs.device());
        tch::no_grad(|| c.vs.copy(&self.vs)).expect("same architecture, same variables");
        c.copy_score_stats(self);
        c
    }

    /// Takes `other`'s score statistics (feature, patch, fusion) and patch configuration.
    pub fn copy_score_stats(&mut self, other: &NetG) {
        self.feature_stats = other.feature_stats.clone();
        self.patch_spec = other.patch_spec.clone();
        self.patch_stats = other.patch_stats.clone();
        self.fusion = other.fusion.clone();
    }

    /// Fits the `patch` score's statistics for `self.patch_spec` on the training
    /// images `x` (CPU tensor), `batch` at a time on `device`.
    pub fn fit_patch_stats(&self, x: &Tensor, batch: i64, device: Device) -> Result<PatchStats, NetError> {
        let n = x.size()[0];
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = batch.min(n - start);
            let maps = tch::no_grad(|| self.encoder_maps(&x.narrow(0, start, len).to_device(device), false));
            parts.push(PatchStats::grid_features(&self.patch_spec, &maps));
            start += len;
        }
        Ok(PatchStats::fit(&self.patch_spec, &parts)?)
    }

    /// Fits every score statistic in place: the `mahalanobis` and `patch` Gaussians on
    /// the training images `x_fit`, then the `fused` score's standardisation on the
    /// held-out good images `x_hold` (skipped when there are fewer than 2).
    pub fn fit_score_stats(&mut self, x_fit: &Tensor, x_hold: &Tensor, device: Device) -> Result<(), NetError> {
        // One encoder pass feeds both Gaussians (the `mahalanobis` features are its
        // last map, pooled): the stats are refitted every epoch, for both generators.
        let n = x_fit.size()[0];
        let (mut features, mut grids) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < n {
            let len = 256.min(n - start);
            let xb = x_fit.narrow(0, start, len).to_device(device);
            let maps = tch::no_grad(|| self.encoder_maps(&xb, false));
            features.push(maps.last().map_or_else(|| self.features(&xb), |m| self.pool_features(m)));
            grids.push(PatchStats::grid_features(&self.patch_spec, &maps));
            start += len;
        }
        self.feature_stats = Some(FeatureStats::fit(&features)?);
        self.patch_stats = Some(PatchStats::fit(&self.patch_spec, &grids)?);
        self.fusion = None;
        if x_hold.size()[0] >= 2 {
            let hold = crate::score::score_all(self, x_hold, 1, 256, device);
            self.fusion = crate::score::fit_fusion(&hold);
        }
        Ok(())
    }

    /// The statistics and recipes a model file carries (`meta`, `weights`): the
    /// feature statistics, the patch configuration and statistics, the fusion recipe.
    pub fn load_score_stats(&mut self, meta: &ModelMetadata, weights: &Weights) -> Result<(), NetError> {
        self.feature_stats = FeatureStats::from_weights(&self.arch, weights, self.vs.device())?;
        self.patch_stats = match meta.patch() {
            Some(spec) => {
                self.patch_spec = spec.clone();
                Some(PatchStats::from_weights(&self.arch, spec, weights, self.vs.device())?)
            }
            None => None,
        };
        self.fusion = meta.fusion().cloned();
        Ok(())
    }

    /// Fits the `mahalanobis` score's statistics on the features of `x` (CPU tensor
    /// of training images), `batch` images at a time on `device`.
    pub fn fit_feature_stats(&self, x: &Tensor, batch: i64, device: Device) -> Result<FeatureStats, NetError> {
        let n = x.size()[0];
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = batch.min(n - start);
            parts.push(self.features(&x.narrow(0, start, len).to_device(device)));
            start += len;
        }
        Ok(FeatureStats::fit(&parts)?)
    }

    /// A copy of this generator with its score statistics fitted ([`NetG::fit_score_stats`]):
    /// the Gaussians on the training images `x_fit` (never the held-out slice, which
    /// calibrates), the fusion's standardisation on the held-out slice: what is exported.
    pub fn with_feature_stats(&self, x_fit: &Tensor, x_hold: &Tensor, device: Device) -> Result<NetG, NetError> {
        let mut c = self.duplicate();
        c.fit_score_stats(x_fit, x_hold, device)?;
        let shrink = |s: Option<f64>| format!("{:.3}", s.unwrap_or(f64::NAN));
        tracing::info!(
            values = self.arch.feature_dim(),
            images = x_fit.size()[0],
            ledoit_wolf_shrinkage = %shrink(c.feature_stats.as_ref().map(|s| s.shrinkage)),
            patch_maps = ?c.patch_spec.maps,
            patch_grid = c.patch_spec.grid,
            patch_dim = c.patch_spec.channels.len(),
            patch_shrinkage = %shrink(c.patch_stats.as_ref().map(|s| s.shrinkage)),
            fusion = ?c.fusion.as_ref().map(|f| (&f.components, &f.mean, &f.std)),
            "score statistics (mahalanobis, patch, fused)"
        );
        Ok(c)
    }

    /// Overwrites every NetG tensor from `weights` (checked against the architecture
    /// first); the feature statistics too when `weights` carries them.
    pub fn load_weights(&mut self, weights: &Weights) -> Result<(), NetError> {
        let specs = self.arch.generator_params();
        weights.check(&specs)?;
        let vars = self.vs.variables();
        tch::no_grad(|| -> Result<(), NetError> {
            for spec in &specs {
                let t = weights.get(&spec.name)?;
                let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                let src = Tensor::from_slice(&t.data).reshape(&shape);
                let mut dst =
                    vars.get(&spec.name).ok_or_else(|| WeightsError::Missing(spec.name.clone()))?.shallow_clone();
                dst.f_copy_(&src)?;
            }
            Ok(())
        })?;
        self.feature_stats = FeatureStats::from_weights(&self.arch, weights, self.vs.device())?;
        Ok(())
    }
}

/// The discriminator: the encoder with nz = 1 plus a sigmoid.
pub struct NetD {
    pub vs: nn::VarStore,
    pub arch: ArchSpec,
    seq: Seq,
}

impl NetD {
    pub fn new(arch: &ArchSpec, device: Device) -> NetD {
        let vs = nn::VarStore::new(device);
        let seq = Seq::new(&vs.root(), &arch.netd());
        let mut d = NetD { vs, arch: *arch, seq };
        d.seq.init();
        d
    }

    /// `(p, features)`: p `[N]` is the sigmoid output, features the activations
    /// before the final conv (the reference's `features` = all layers but the last two).
    pub fn forward(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let n = self.seq.len();
        let features = self.seq.forward(x, train, 0..n - 2);
        let p = self.seq.forward(&features, train, n - 2..n).view([-1]);
        (p, features)
    }

    /// The reference's `reinit_d`: `netd.apply(weights_init)`.
    pub fn reinit(&mut self) {
        let _guard = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
        self.seq.init();
    }

    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        trainable_in_order(&self.vs, self.arch.discriminator_params().into_iter().map(|p| p.name))
    }
}

fn trainable_in_order(vs: &nn::VarStore, names: impl Iterator<Item = String>) -> Vec<(String, Tensor)> {
    let vars: HashMap<String, Tensor> = vs.variables();
    names
        .filter(|n| !n.ends_with("running_mean") && !n.ends_with("running_var"))
        .filter_map(|n| vars.get(&n).map(|t| (n.clone(), t.shallow_clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ArchSpec {
        ArchSpec { isize: 32, nc: 3, nz: 16, ngf: 8, ndf: 8, extralayers: 1, ..Default::default() }
    }

    #[test]
    fn shapes_follow_the_arch() {
        let a = small();
        let (g, d, x) = seeded(0, || {
            (
                NetG::new(&a, Device::Cpu),
                NetD::new(&a, Device::Cpu),
                Tensor::rand([4, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0,
            )
        });
        let out = g.forward(&x, true);
        assert_eq!(out.fake.size(), vec![4, 3, 32, 32]);
        assert_eq!(out.latent_i.size(), vec![4, 16, 1, 1]);
        assert_eq!(out.latent_o.size(), vec![4, 16, 1, 1]);
        let (p, f) = d.forward(&x, true);
        assert_eq!(p.size(), vec![4]);
        assert_eq!(f.size(), vec![4, 32, 4, 4]);
        // Every parameter the ONNX writer will ask for exists with its shape.
        let vars = g.vs.variables();
        for spec in a.generator_params() {
            let t = &vars[&spec.name];
            assert_eq!(t.size(), spec.shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), "{}", spec.name);
        }
        assert_eq!(vars.len(), a.generator_params().len());
    }

    #[test]
    fn dcgan_init_statistics() {
        let a = ArchSpec { isize: 64, nc: 3, nz: 100, ngf: 32, ndf: 32, extralayers: 0, ..Default::default() };
        let g = seeded(1, || NetG::new(&a, Device::Cpu));
        let vars = g.vs.variables();
        let w = &vars["encoder1.2.weight"];
        let (std, mean) = w.std_mean(false);
        assert!((std.double_value(&[]) - 0.02).abs() < 0.001, "conv std {std}");
        assert!(mean.double_value(&[]).abs() < 0.001);
        let bn = &vars["encoder1.3.weight"];
        assert!((bn.mean(Kind::Float).double_value(&[]) - 1.0).abs() < 0.01);
        assert_eq!(vars["encoder1.3.bias"].abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(vars["encoder1.3.running_var"].mean(Kind::Float).double_value(&[]), 1.0);
    }

    #[test]
    fn weights_round_trip() {
        let a = small();
        let (g, mut h, x) = seeded(2, || {
            (
                NetG::new(&a, Device::Cpu),
                NetG::new(&a, Device::Cpu),
                Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu)),
            )
        });
        let w = g.to_weights().unwrap();
        assert_eq!(w.check(&a.generator_params()), Ok(()));
        h.load_weights(&w).unwrap();
        assert_eq!(h.to_weights().unwrap(), w);
        let d = (g.forward(&x, false).fake - h.forward(&x, false).fake).abs().max().double_value(&[]);
        assert_eq!(d, 0.0);
        // A weight set for another architecture is refused by name.
        let other = ArchSpec { nz: 17, ..a };
        let err = h.load_weights(&Weights::random_generator(&other, 0)).unwrap_err();
        assert!(err.to_string().contains("encoder1"), "{err}");
    }
}
